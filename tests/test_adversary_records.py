"""The record must never lie (issue 27, items 2 and 6-10; issue 25, items 3-4): forged extractor
weights, pruning by one-off scores, a stale best.json, two scorers at once, bad snapshot records,
a full disk at a snapshot, and one-off evals taking over best.json. Every crafted input is made
here, small and seeded."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pipeline as ganpipe
from conftest import REPO, cli
from pipeline.errors import TrainingError, UserError
from pipeline.io import sha256_file
from pipeline.io import LockFile as Claim
from pipeline.metrics.features import INCEPTION_FILE, PUBLISHED_SHA256, get_extractor, inception_path
from pipeline.metrics.records import append_records, protocol_key, record_main_protocol
from pipeline.rundir import RunDir
from pipeline.training.snapshot import list_snapshots, prune_snapshots, save_snapshot
from stubs import inception_stub
from test_metrics import (MODEL, add_snapshot, make_run, mlp_generator, mnist_ext, mnist_ref,  # noqa: F401
                          one_digit_generator, records)
from test_train import TINY, final_state

W = ["--extractor", "mnist", "--num-gen", "500", "--metrics", "fid", "--batch-size", "250"]


def score(meta: dict, snapshot: str, value: float, name: str = "fid_mnist", **protocol) -> dict:
    """A metrics.jsonl score line of a snapshot record `meta`, as `ganpipe eval` writes one."""
    rec = {"name": name, "metric": name.split("_")[0], "value": value, "snapshot": snapshot,
           "snapshot_sha256": meta["sha256"], "cur_nimg": meta["cur_nimg"], "kimg": meta["cur_nimg"] / 1000,
           "extractor": "mnist", "extractor_sha256": "e" * 64, "resize": "clean28", "num_gen": 1000, "seed": 0,
           "seeding": "seed-index-v1", "time": "2026-01-01T00:00:00",
           "reference": {"data": "data", "split": "train", "num": 4000, "manifest_sha256": "m" * 64}}
    return {**rec, **protocol}


def tiny_snapshots(run: Path, nimgs) -> dict[int, dict]:
    """Snapshots of a tiny mlp G (other weights each) in RUN/snapshots; their records by cur_nimg."""
    from pipeline.networks import build_networks
    from pipeline.training.snapshot import SnapshotInfo

    G, _ = build_networks(MODEL, resolution=28, channels=1, num_classes=10)
    metas = {}
    for nimg in nimgs:
        with torch.no_grad():
            next(G.parameters()).add_(1.0)
        metas[nimg] = json.loads(save_snapshot(G, RunDir(run).snapshots, cur_nimg=nimg,
                                               info=SnapshotInfo(MODEL, 28, 1, 10)).read_text())
    return metas


def kept(run: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in list_snapshots(RunDir(run).snapshots)]


# ---------------------------------------------------------------------------------------------
# 27.2: FID forged through the extractor's weights

@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_forged_extractor_file_is_refused_with_both_hashes(tmp_path, mnist_dir, monkeypatch):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator()})
    forged = inception_stub(tmp_path / "planted" / INCEPTION_FILE, constant=True)
    assert forged.stat().st_size < 5000
    monkeypatch.setenv("GANPIPE_INCEPTION_WEIGHTS", str(forged.parent))
    out = cli("eval", "--run-dir", str(run), "--extractor", "inception", "--num-gen", "100", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert sha256_file(forged) in out.stderr and PUBLISHED_SHA256["inception"][0] in out.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "best.json").exists()
    # The bundled mnist network, one byte changed: refused the same way, the same two hashes named.
    from pipeline.metrics.mnist_net import WEIGHTS

    data = bytearray(WEIGHTS.read_bytes())
    data[-1] ^= 1
    (tmp_path / "mnist.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        get_extractor("mnist", weights=tmp_path / "mnist.safetensors")
    assert sha256_file(tmp_path / "mnist.safetensors") in str(info.value)
    assert PUBLISHED_SHA256["mnist"][0] == sha256_file(WEIGHTS) and PUBLISHED_SHA256["mnist"][0] in str(info.value)


def test_the_default_inception_path_is_in_the_users_own_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("GANPIPE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inception_path() == tmp_path / "xdg" / "ganpipe" / INCEPTION_FILE
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert inception_path() == tmp_path / "home" / ".cache" / "ganpipe" / INCEPTION_FILE
    # Never clean-fid's /tmp: a file anyone may put there is not looked at.
    assert inception_path() != Path("/tmp") / INCEPTION_FILE


# ---------------------------------------------------------------------------------------------
# 27.6 and 27.7: pruning follows the main protocol and the records, not a one-off nor a stale best.json

def test_pruning_keeps_what_the_main_series_has_not_scored(tmp_path, mnist_dir, mnist_ref):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator(0), 2000: mlp_generator(1)})
    cli("watch", "--run-dir", str(run), "--once", *W)                 # the main series: 1000 and 2000
    for nimg, seed in ((3000, 2), (4000, 3), (5000, 4)):
        add_snapshot(run, nimg, mlp_generator(seed))                   # the watcher has not come to these
    out = cli("eval", "--run-dir", str(run), "--all", *W[:2], "--num-gen", "50", *W[4:])   # a one-off, every snapshot
    assert "another protocol than the run's main one" in out.stdout
    assert len([r for r in records(run) if r["num_gen"] == 50]) == 5
    removed = prune_snapshots(run, 1, print)                           # what a resume with keep_snapshots=1 does
    best = json.loads((run / "best.json").read_text())["fid_mnist"]["snapshot"]
    assert [p.stem for p in removed] == [s for s in ("snapshot-000001000", "snapshot-000002000") if s != best]
    assert kept(run)[-3:] == [3000, 4000, 5000]
    # Only the main series' scores make a snapshot prunable: without a main protocol, nothing is pruned.
    bare = tmp_path / "bare"
    metas = tiny_snapshots(bare, (1000, 2000, 3000))
    append_records(bare, [score(metas[n], f"snapshot-{n:09d}", v) for n, v in ((1000, 3.0), (2000, 2.0))])
    assert prune_snapshots(bare, 1, print) == []


def test_pruning_keeps_the_best_by_the_records_when_best_json_is_stale(tmp_path):
    metas = tiny_snapshots(tmp_path, (1000, 2000, 3000, 4000))
    lines = [score(metas[n], f"snapshot-{n:09d}", v) for n, v in ((1000, 1.5), (2000, 4.0), (3000, 5.0))]
    append_records(tmp_path, lines)
    record_main_protocol(tmp_path, {"fid_mnist": protocol_key(lines[0])}, {}, "watch")
    # A watcher killed between appending 1000's score and rewriting best.json left 2000 named.
    (tmp_path / "best.json").write_text(json.dumps({"fid_mnist": {"metric": "fid", "snapshot": "snapshot-000002000"}}))
    removed = prune_snapshots(tmp_path, 1, print)
    assert [p.stem for p in removed] == ["snapshot-000003000"]         # 1000, the true best, stays
    assert kept(tmp_path) == [1000, 2000, 4000]


def test_a_restarted_watcher_rewrites_a_stale_best_json(tmp_path, mnist_dir, mnist_ref):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator(0)})
    cli("watch", "--run-dir", str(run), "--once", *W)
    stale = (run / "best.json").read_text()
    add_snapshot(run, 2000, one_digit_generator(mnist_dir))           # a real digit: far better than noise
    cli("watch", "--run-dir", str(run), "--once", *W)
    fresh = json.loads((run / "best.json").read_text())
    assert fresh["fid_mnist"]["snapshot"] == "snapshot-000002000"
    (run / "best.json").write_text(stale)                              # as if killed before the rewrite
    out = cli("watch", "--run-dir", str(run), "--once", *W)
    assert "scored 0 snapshot(s)" in out.stdout and "best.json disagreed with metrics.jsonl" in out.stdout
    assert json.loads((run / "best.json").read_text()) == fresh
    (run / "best.json").write_text(stale)
    out = cli("eval", "--run-dir", str(run), "--snapshot", "snapshot-000001000", *W[:2], "--num-gen", "60", *W[4:])
    assert "best.json disagreed" in out.stdout and json.loads((run / "best.json").read_text()) == fresh


# ---------------------------------------------------------------------------------------------
# 27.8: one scorer per snapshot and protocol

def test_eval_all_beside_watch_scores_each_snapshot_once(tmp_path, mnist_dir, mnist_ref):
    run = make_run(tmp_path, mnist_dir, {n: mlp_generator(i) for i, n in enumerate((1000, 2000, 3000))})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Every generation call sleeps first (tests/faults.py), so the two scorers overlap.
    slow = [sys.executable, str(REPO / "tests" / "faults.py"), "slow-generate=1.5", "--"]
    procs = [subprocess.Popen([*slow, *cmd, "--run-dir", str(run), *W], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for cmd in (["watch", "--once"], ["eval", "--all"])]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    scored = sorted(r["snapshot"] for r in records(run))
    assert scored == ["snapshot-000001000", "snapshot-000002000", "snapshot-000003000"], outs
    assert "being scored under this protocol by" in "".join(outs)
    assert list(RunDir(run).claims.iterdir()) == []                    # every claim released


def test_a_claim_of_a_dead_local_process_is_taken_and_a_live_one_is_not(tmp_path):
    path = RunDir(tmp_path).claim("abc")
    first = Claim(path)
    assert first.acquire()
    second = Claim(path)
    assert not second.acquire() and second.holder["pid"] == os.getpid()
    assert f"{socket.gethostname()} pid {os.getpid()}" in second.describe()
    first.release()
    assert not path.exists() and second.acquire()
    second.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}))
    claim = Claim(path)
    assert claim.acquire() and json.loads(path.read_text())["pid"] == os.getpid()
    claim.release()
    # Another host's claim counts while its heartbeat is fresh, and is stale after Claim.STALE_S.
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "now"}))
    assert not Claim(path).acquire()
    old = time.time() - Claim.STALE_S - 10
    os.utime(path, (old, old))
    claim = Claim(path)
    assert claim.acquire()
    claim.release()


# ---------------------------------------------------------------------------------------------
# 27.9: one bad snapshot record does not stop the watcher

def bad_snapshots(run: Path) -> list[str]:
    """Four snapshots between good ones whose records lie, each with a sha256 that matches its weights."""
    snaps = RunDir(run).snapshots

    def edit(nimg: int, **fields) -> str:
        path = add_snapshot(run, nimg, mlp_generator(nimg))
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
        return path.stem

    wrong_type = edit(2000, resolution="28")
    no_hash = edit(2500, sha256=[1, 2, 3])
    misfit = edit(3000, model={**json.loads(snaps.joinpath("snapshot-000001000.json").read_text())["model"],
                               "g_width": 0.5})                       # weights of width 0.25
    weights = snaps / "snapshot-000004000.safetensors"
    header = struct.pack("<Q", 2 ** 40) + b"{}"                       # declares a 1 TiB header
    path = add_snapshot(run, 4000, mlp_generator(4))
    weights.write_bytes(header)
    path.write_text(json.dumps({**json.loads(path.read_text()), "sha256": sha256_file(weights)}))
    return [wrong_type, no_hash, misfit, path.stem]


def test_bad_snapshot_records_are_reported_once_marked_and_skipped(tmp_path, mnist_dir, mnist_ref):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator(0)})
    bad = bad_snapshots(run)
    add_snapshot(run, 5000, mlp_generator(5))
    out = cli("watch", "--run-dir", str(run), "--once", *W, check=False)
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert [r["snapshot"] for r in records(run)] == ["snapshot-000001000", "snapshot-000005000"]
    for name in bad:
        assert f"ignoring {name}.json" in out.stdout
    assert "ignored 4 bad one(s)" in out.stdout
    marks = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m["snapshot"] for m in marks if m.get("kind") == "bad_snapshot") == sorted(bad)
    # A restart does not die on the oldest bad record, nor report them again; eval --all neither.
    out = cli("watch", "--run-dir", str(run), "--once", *W)
    assert "scored 0 snapshot(s)" in out.stdout and "skipping 4 snapshot(s) marked bad" in out.stdout
    assert "ignoring" not in out.stdout
    out = cli("eval", "--run-dir", str(run), "--all", *W)
    assert "skipping 4 snapshot(s) marked bad" in out.stdout and "already scored" in out.stdout
    # A snapshot whose files change is tried again: 3000 with its weights' own model is fine.
    misfit = RunDir(run).snapshot("snapshot-000003000")
    meta = json.loads(misfit.read_text())
    misfit.write_text(json.dumps({**meta, "model": {**meta["model"], "g_width": 0.25}}))
    cli("eval", "--run-dir", str(run), "--all", *W)
    assert records(run)[-1]["snapshot"] == "snapshot-000003000"
    # Named alone, a bad snapshot is an error of one line.
    out = cli("eval", "--run-dir", str(run), "--snapshot", "snapshot-000004000", *W, check=False)
    assert out.returncode == 2 and "header too large" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# 27.10: a full disk while writing a snapshot

def test_a_full_disk_at_a_snapshot_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch):
    import pipeline.training.snapshot as snapshot

    run = tmp_path / "run"
    tiny_snapshots(run, (1000,))
    write, calls = snapshot._write, []

    def full(data, path):
        calls.append(path)
        with open(path, "wb") as f:
            f.write(data[:100])                     # what fitted before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(snapshot, "_write", full)
    with pytest.raises(TrainingError) as info:
        tiny_snapshots(run, (2000,))
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "snapshot-000002000" in msg
    assert "free the space" in msg and calls
    monkeypatch.setattr(snapshot, "_write", write)
    assert kept(run) == [1000] and sorted(p.name for p in RunDir(run).snapshots.iterdir()) == [
        "snapshot-000001000.json", "snapshot-000001000.safetensors"]


FULL_DISK = """
import errno, os, sys
import pipeline.training.snapshot as snapshot

def full(data, path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

snapshot._write = full
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_trainer_stops_in_one_line_on_a_full_disk_at_a_snapshot_and_resumes(tmp_path, mnist_dir):
    run = tmp_path / "run"
    args = ["train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run), f"data.path={mnist_dir}", *TINY,
            "train.total_kimg=0.128", "train.tick_kimg=0.064", "train.checkpoint_kimg=0.064",
            "train.snapshot_kimg=0.128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "No space left on device" in out.stderr and "snapshot-000000128" in out.stderr
    assert final_state(run)["cur_nimg"] == 64 and not list(run.rglob(".*tmp*"))
    cli(*args)                                       # the disk has room again: resumed, finished
    assert final_state(run)["cur_nimg"] == 128 and kept(run) == [128]


# ---------------------------------------------------------------------------------------------
# 25.3 and 25.4: best.json, metrics.png and best_snapshot() belong to the main protocol

def test_a_one_off_eval_takes_over_nothing_and_eval_all_restores(tmp_path, mnist_dir, mnist_ref):
    from pipeline.metrics.records import plot_metrics, read_records, write_best

    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator(0), 2000: one_digit_generator(mnist_dir),
                                         3000: mlp_generator(3)})
    cli("watch", "--run-dir", str(run), "--once", *W)
    best, png = (run / "best.json").read_text(), (run / "metrics.png").read_bytes()
    main_best = ganpipe.best_snapshot(run)
    assert main_best.stem == "snapshot-000002000"
    # A one-off on the test split with fewer images: printed and recorded, best of its own protocol.
    out = cli("eval", "--run-dir", str(run), "--snapshot", "snapshot-000003000", "--split", "test",
              *W[:2], "--num-gen", "200", *W[4:])
    assert "snapshot-000003000 kimg 3: fid_mnist" in out.stdout and "(not the main protocol)" in out.stdout
    assert records(run)[-1]["reference"]["split"] == "test"
    assert (run / "best.json").read_text() == best and (run / "metrics.png").read_bytes() == png
    assert ganpipe.best_snapshot(run) == main_best
    assert ganpipe.best_snapshot(run, protocol={"split": "test"}).stem == "snapshot-000003000"
    # As the one-off once did it: best.json and the plot of its protocol. `eval --all` under the
    # watcher's protocol (nothing left to score) puts back the main series.
    everything = read_records(run)
    write_best(run, everything)
    plot_metrics(run, everything)
    assert (run / "best.json").read_text() != best
    out = cli("eval", "--run-dir", str(run), "--all", *W)
    assert "already scored" in out.stdout
    assert json.loads((run / "best.json").read_text()) == json.loads(best)
    assert (run / "metrics.png").read_bytes() == png


def test_eval_all_without_snapshots_is_an_error(tmp_path, mnist_dir):
    run = make_run(tmp_path, mnist_dir, {})
    out = cli("eval", "--run-dir", str(run), "--all", *W, check=False)
    assert out.returncode == 2 and "no snapshots in" in out.stderr and "already scored" not in out.stdout
