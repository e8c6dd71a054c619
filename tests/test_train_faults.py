"""The trainer under a cluster's normal life, for real: signals to the whole process group with
loader workers on, Ctrl-C, a damaged newest checkpoint, a full disk, a dead peer rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO
from pipeline.training.checkpoint import list_checkpoints, load_newest_checkpoint, save_checkpoint
from test_train import TINY, final_state, rows, train

WORKERS = [*TINY, "data.num_workers=2"]          # the default users run: loader workers on
LONG = ["train.total_kimg=3.2", "train.tick_kimg=0.032", "train.checkpoint_kimg=10", "train.snapshot_kimg=10"]


def start(run: Path, data: Path, *extra: str, procs: int = 1, port: int = 29541,
          faults: list[str] | None = None) -> subprocess.Popen:
    """`ganpipe train` (or `accelerate launch` of it) in a new session, so that it and its loader
    workers form one process group, as under Slurm or a terminal."""
    entry = [str(REPO / "tests" / "faults.py"), *faults, "--"] if faults else ["-m", "pipeline"]
    args = [*entry, "train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run),
            f"data.path={data}", *WORKERS, *extra]
    if procs > 1:
        args = ["-m", "accelerate.commands.launch", "--config_file", "launch/cpu.yaml",
                "--main_process_port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_ticks(proc: subprocess.Popen, run: Path, ticks: int = 2, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "stats.jsonl").is_file() and len((run / "stats.jsonl").read_text().splitlines()) >= ticks:
            return
        time.sleep(0.2)
    out = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"no {ticks} ticks in {run} (status {proc.poll()}):\n{out[-3000:]}")


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"did not exit within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_with_workers_checkpoints_at_the_stopping_step(tmp_path, mnist_dir, sig):
    run = tmp_path / "run"
    proc = start(run, mnist_dir, *LONG)
    wait_for_ticks(proc, run)
    os.killpg(proc.pid, sig)                      # the trainer and its loader workers, as Slurm does
    status, out = finish(proc)
    assert status == 3, out
    assert "preempted: checkpoint" in out and "Traceback" not in out and "killed by signal" not in out
    marker = json.loads((run / "PREEMPTED").read_text())
    stopped = final_state(run)["cur_nimg"]
    assert marker["cur_nimg"] == stopped and 0 < stopped < 3200
    assert rows(run)[-1]["cur_nimg"] == stopped   # the checkpoint is at the step it stopped on
    out = train(run, mnist_dir, *LONG, "train.total_kimg=0.64", "data.num_workers=2").stdout
    assert "resumed from" in out and (run / "FINISHED").is_file() and not (run / "PREEMPTED").exists()
    assert [r["cur_nimg"] for r in rows(run)] == sorted({r["cur_nimg"] for r in rows(run)})   # no duplicate ticks


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path, mnist_dir):
    run = tmp_path / "run"
    proc = start(run, mnist_dir, *LONG, faults=["slow-checkpoint=20"])   # the second comes while it writes
    wait_for_ticks(proc, run)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    status, out = finish(proc, timeout=60)
    assert time.time() - t0 < 15, out
    assert status not in (0, 3) and not (run / "PREEMPTED").exists(), out
    assert "press Ctrl-C again to abort" in out


def test_two_processes_signalled_as_a_group_checkpoint_together(tmp_path, mnist_dir):
    run = tmp_path / "ddp"
    proc = start(run, mnist_dir, *LONG, procs=2)
    wait_for_ticks(proc, run)
    os.killpg(proc.pid, signal.SIGTERM)           # the launcher, both trainers and their workers
    status, out = finish(proc)
    # accelerate launch reports its trainers' status 3 as 1: RUN/PREEMPTED is what tells.
    assert (run / "PREEMPTED").is_file(), out
    ckpt = list_checkpoints(run)[-1]
    assert {p.name for p in ckpt.iterdir()} >= {"state.pt", "rank-0000.pt", "rank-0001.pt", "checksums.json"}
    assert json.loads((run / "PREEMPTED").read_text())["cur_nimg"] == final_state(run)["cur_nimg"]


def test_a_damaged_newest_checkpoint_is_named_skipped_and_the_previous_one_resumes(tmp_path, mnist_dir):
    run = tmp_path / "run"
    train(run, mnist_dir, "train.total_kimg=0.128", "train.tick_kimg=0.064", "train.checkpoint_kimg=0.064")
    newest = list_checkpoints(run)[-1]
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])       # a truncated copy
    out = train(run, mnist_dir, "train.total_kimg=0.192", "train.tick_kimg=0.064", "train.checkpoint_kimg=0.064")
    assert f"skipping damaged checkpoint: {state}: sha256 does not match" in out.stdout
    assert "resumed from" in out.stdout and "ckpt-000000064" in out.stdout and "weights_only=False" not in out.stdout
    assert final_state(run)["cur_nimg"] == 192


def test_checkpoint_loading_refuses_what_it_cannot_trust(tmp_path):
    def save(nimg: int, **state) -> Path:
        base = {"cur_nimg": nimg, "d_steps": 1, "g_steps": 1, "skipped": 0, "world_size": 1}
        return save_checkpoint(tmp_path, nimg, per_rank={"x": torch.ones(1)}, keep=10,
                               shared=lambda: {**base, **state})

    save(16)
    second = save(32)
    logs: list[str] = []
    assert load_newest_checkpoint(tmp_path, 0, logs.append)[0] == second and not logs
    (second / "checksums.json").unlink()                   # an older format: loads when it unpickles
    assert load_newest_checkpoint(tmp_path, 0, logs.append)[0] == second
    (second / "state.pt").write_bytes(b"")                 # empty, no checksums to tell
    path, state, _ = load_newest_checkpoint(tmp_path, 0, logs.append)
    assert path.name == "ckpt-000000016" and "state.pt: does not load (EOFError: empty or truncated" in logs[-1]
    assert "weights_only" not in logs[-1]
    third = save(48, d_steps=-5)                            # a counter that is no count
    assert load_newest_checkpoint(tmp_path, 0, logs.append)[0].name == "ckpt-000000016"
    assert any(f"{third / 'state.pt'}: counter d_steps=-5" in line for line in logs[-2:])


def test_a_full_disk_says_so_keeps_earlier_checkpoints_and_leaves_no_temporaries(tmp_path, mnist_dir):
    run = tmp_path / "run"
    common = ["train.tick_kimg=0.064", "train.checkpoint_kimg=0.064"]
    train(run, mnist_dir, "train.total_kimg=0.064", *common)
    out = train(run, mnist_dir, "train.total_kimg=0.128", *common, check=False, faults=["enospc-checkpoint=1"])
    assert out.returncode == 1, out.stdout + out.stderr
    assert "No space left on device" in out.stderr and "checkpoints" in out.stderr
    assert "Traceback" not in out.stderr
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000000064"]
    leftovers = [p for p in run.rglob(".*tmp*")]
    assert leftovers == []
    out = train(run, mnist_dir, "train.total_kimg=0.128", *common)       # the disk has room again
    assert "resumed from" in out.stdout and final_state(run)["cur_nimg"] == 128


def test_a_rank_whose_peer_dies_exits_within_the_peer_timeout(tmp_path, mnist_dir):
    run = tmp_path / "ddp"
    proc = start(run, mnist_dir, *LONG, "train.peer_timeout_s=20", procs=2, port=29543)
    wait_for_ticks(proc, run)
    # The launcher's children are the two ranks (their own children are loader workers).
    ranks = [p for p in psutil.Process(proc.pid).children() if p.is_running()]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    t0 = time.time()
    ranks[1].kill()                                # SIGKILL one rank: no checkpoint, no goodbye
    status, out = finish(proc, timeout=120)
    assert status != 0 and time.time() - t0 < 60, out
    assert "lost contact with another rank" in out, out[-3000:]


def test_snapshot_retention_keeps_the_newest_the_unscored_and_the_best(tmp_path):
    from pipeline.config import ModelConfig
    from pipeline.metrics.records import append_records
    from pipeline.rundir import RunDir
    from pipeline.networks import build_networks
    from pipeline.training.snapshot import SnapshotInfo, list_snapshots, prune_snapshots, save_snapshot

    cfg = ModelConfig(name="mlp", g_width=0.0625, d_width=0.0625)
    G, _ = build_networks(cfg, resolution=8, channels=1, num_classes=0)
    metas = {}
    for nimg in (1000, 2000, 3000, 4000, 5000):
        with torch.no_grad():
            next(G.parameters()).add_(1.0)            # every snapshot has other weights
        path = save_snapshot(G, tmp_path / "snapshots", cur_nimg=nimg, info=SnapshotInfo(cfg, 8, 1, 0))
        metas[nimg] = json.loads(path.read_text())
    # 1000, 2000 and 4000 scored under the run's main protocol; 2000 is the best; 3000 never scored.
    from pipeline.metrics.records import protocol_key, record_main_protocol
    from test_adversary_records import score

    scores = [score(metas[n], f"snapshot-{n:09d}", v) for n, v in ((1000, 9.0), (2000, 4.0), (4000, 6.0))]
    append_records(tmp_path, scores)
    record_main_protocol(tmp_path, {"fid_mnist": protocol_key(scores[0])}, {}, "watch")
    (tmp_path / RunDir.BEST).write_text(json.dumps({"fid_mnist": {"snapshot": "snapshot-000002000"}}))
    assert prune_snapshots(tmp_path, 0, print) == []          # 0 keeps all
    removed = prune_snapshots(tmp_path, 2, print)
    assert [p.name for p in removed] == ["snapshot-000001000.json"]
    assert [p.stem for p in list_snapshots(tmp_path / "snapshots")] == [
        "snapshot-000002000", "snapshot-000003000", "snapshot-000004000", "snapshot-000005000"]
    assert not (tmp_path / "snapshots" / "snapshot-000001000.safetensors").exists()


@pytest.mark.parametrize("procs", [1, 2])
def test_a_signal_during_a_checkpoint_write_ends_with_a_checkpoint_at_the_stopping_step(tmp_path, mnist_dir, procs):
    run = tmp_path / "run"
    proc = start(run, mnist_dir, "train.total_kimg=3.2", "train.tick_kimg=0.032", "train.checkpoint_kimg=0.064",
                 procs=procs, port=29545, faults=["slow-checkpoint=3"])
    deadline = time.time() + 180
    while time.time() < deadline and not list((run / "checkpoints").glob(".ckpt-*.tmp-*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGTERM)           # while a periodic checkpoint is being written
    status, out = finish(proc)
    assert status == (3 if procs == 1 else status) and (run / "PREEMPTED").is_file(), out
    marker = json.loads((run / "PREEMPTED").read_text())
    assert Path(marker["checkpoint"]) == list_checkpoints(run)[-1]
    assert marker["cur_nimg"] == final_state(run)["cur_nimg"] == rows(run)[-1]["cur_nimg"]
    assert not list((run / "checkpoints").glob(".ckpt-*"))


def test_a_snapshot_record_cannot_point_at_weights_elsewhere(tmp_path):
    from pipeline.errors import SnapshotError
    from pipeline.training.snapshot import read_snapshot_meta

    record = {"format": "ganpipe-snapshot", "format_version": 1, "sha256": "0" * 64, "model": {},
              "resolution": 8, "channels": 1, "num_classes": 0, "cur_nimg": 1}
    for weights in ("../../other-run/snapshots/snapshot-000000001.safetensors", "/etc/passwd", "..", ""):
        path = tmp_path / "snapshot-000000001.json"
        path.write_text(json.dumps({**record, "weights": weights}))
        with pytest.raises(SnapshotError, match="not a file name beside the record"):
            read_snapshot_meta(path)
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "sha256"}))
    with pytest.raises(SnapshotError, match="record lacks sha256, weights"):
        read_snapshot_meta(path)
    path.write_text("[1, 2]")
    with pytest.raises(SnapshotError, match="not a ganpipe-snapshot"):
        read_snapshot_meta(path)
