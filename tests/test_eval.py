"""`ganpipe eval` end to end: records with the protocol, determinism, best/plot/TensorBoard, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, cli
from pipeline.io import sha256_file
from test_metrics import (make_run, mlp_generator, mnist_ext, mnist_ref, one_digit_generator,  # noqa: F401
                          records)

ARGS = ["--extractor", "mnist", "--num-gen", "1000", "--batch-size", "250"]


def test_eval_records_the_protocol_and_repeats_exactly(tmp_path, mnist_dir, mnist_ref, mnist_ext):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator(), 2000: one_digit_generator(mnist_dir)})
    cli("eval", "--run-dir", str(run), *ARGS)                                       # the newest snapshot
    cli("eval", "--run-dir", str(run), "--snapshot", "snapshot-000002000", "--metrics", "fid", *ARGS)
    recs = records(run)
    assert [(r["snapshot"], r["metric"]) for r in recs] == [("snapshot-000002000", "fid"),
                                                            ("snapshot-000002000", "kid"),
                                                            ("snapshot-000002000", "fid")]
    # Same seed, snapshot and extractor: the same score, to the last bit (KID's seeding: test_metrics).
    assert recs[0]["value"] == recs[2]["value"]
    r = recs[0]
    snap = json.loads((run / "snapshots" / "snapshot-000002000.json").read_text())
    assert (r["name"], r["extractor"], r["resize"], r["feature_dim"]) == ("fid_mnist", "mnist", "clean28", 64)
    assert r["extractor_sha256"] == sha256_file(mnist_ext.weights)
    assert (r["num_gen"], r["seed"], r["cur_nimg"], r["kimg"]) == (1000, 0, 2000, 2.0)
    assert r["snapshot_sha256"] == snap["sha256"]
    assert r["reference"]["split"] == "train" and r["reference"]["num"] == 4000
    assert r["reference"]["manifest_sha256"] == sha256_file(mnist_dir / "manifest.json")
    assert r["seconds"] > 0 and r["images_per_s"] > 0 and r["world_size"] == 1
    assert recs[1]["kid_subsets"] == 100 and recs[1]["kid_subset_size"] == 1000
    assert r["value"] > 10 and 0 < recs[1]["value"]

    # --all scores only what is not yet scored under this protocol; a second --all does nothing.
    cli("eval", "--run-dir", str(run), "--all", "--metrics", "fid", *ARGS)
    recs = records(run)
    assert [(r["snapshot"], r["metric"]) for r in recs[3:]] == [("snapshot-000001000", "fid")]
    out = cli("eval", "--run-dir", str(run), "--all", "--metrics", "fid", *ARGS)
    assert "already scored" in out.stdout and len(records(run)) == 4

    # best.json: the lowest FID of the two snapshots; metrics.png redrawn; TensorBoard scalars.
    best = json.loads((run / "best.json").read_text())
    fids = {r["snapshot"]: r["value"] for r in recs if r["metric"] == "fid"}
    assert best["fid_mnist"]["snapshot"] == min(fids, key=fids.get)
    assert best["fid_mnist"]["value"] == min(fids.values()) and best["fid_mnist"]["snapshots_scored"] == 2
    assert set(best) == {"fid_mnist", "kid_mnist"} and best["kid_mnist"]["snapshots_scored"] == 1
    png = (run / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    scalars = {e.step: e.value for e in acc.Scalars("Metrics/fid_mnist")}     # float32 in the event file
    assert scalars == pytest.approx({1000: fids["snapshot-000001000"], 2000: fids["snapshot-000002000"]}, rel=1e-6)

    # A different seed is another protocol: scored anew, kept apart from the main series (the first
    # --all's), which keeps best.json; the API ranks the other one when asked, and --main makes it main.
    out = cli("eval", "--run-dir", str(run), "--all", "--seed", "1", "--metrics", "fid", *ARGS)
    recs = records(run)
    assert len(recs) == 6 and {r["seed"] for r in recs[4:]} == {1}
    assert all(r["value"] != fids[r["snapshot"]] for r in recs[4:])
    assert "another protocol than the run's main one" in out.stdout
    assert json.loads((run / "best.json").read_text())["fid_mnist"]["seed"] == 0
    import pipeline as ganpipe

    seed1 = {r["snapshot"]: r["value"] for r in recs[4:]}
    assert ganpipe.best_snapshot(run, protocol={"seed": 1}).stem == min(seed1, key=seed1.get)
    cli("eval", "--run-dir", str(run), "--all", "--seed", "1", "--metrics", "fid", "--main", *ARGS)
    assert len(records(run)) == 6 and json.loads((run / "best.json").read_text())["fid_mnist"]["seed"] == 1


def test_two_processes_give_the_one_process_score(tmp_path, mnist_dir, mnist_ref):
    """torchrun with 2 gloo processes: each generates half the batches, rank 0 gathers and writes."""
    run = make_run(tmp_path, mnist_dir, {3000: one_digit_generator(mnist_dir, seed=3)})
    args = ["eval", "--run-dir", str(run), "--extractor", "mnist", "--num-gen", "1000", "--batch-size", "100",
            "--metrics", "fid"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli(*args)
    two, one = records(run)
    assert (two["world_size"], one["world_size"]) == (2, 1) and two["value"] == one["value"]
    assert proc.stdout.count("snapshot-000003000 kimg 3") == 1      # only rank 0 reports


def test_eval_explains_bad_input(tmp_path, mnist_dir):
    out = cli("eval", "--run-dir", str(tmp_path / "nope"), "--extractor", "mnist", check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr
    run = make_run(tmp_path, mnist_dir, {})
    out = cli("eval", "--run-dir", str(run), "--extractor", "mnist", "--num-gen", "100", check=False)
    assert out.returncode == 2 and "no snapshots in" in out.stderr
    out = cli("eval", "--run-dir", str(run), "--extractor", "mnist", "--metrics", "fid,fd", check=False)
    assert out.returncode == 2 and "unknown metric 'fd'; choose one of dc, fid, is, kid, pr" in out.stderr


def test_eval_refuses_a_damaged_snapshot(tmp_path, mnist_dir, mnist_ref):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator()})
    weights = run / "snapshots" / "snapshot-000001000.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = cli("eval", "--run-dir", str(run), *ARGS, check=False)
    assert out.returncode == 2 and "sha256 does not match its record" in out.stderr
    assert records(run) == []
