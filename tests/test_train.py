"""The trainer, run for real through the CLI on tiny networks and the bundled MNIST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli
from pipeline.training.checkpoint import list_checkpoints
from pipeline.training.snapshot import list_snapshots, load_snapshot

# Tiny DCGAN (8 feature maps), 16-image batches, fp32, no loader workers unless a test asks.
TINY = ["model.g_width=0.125", "model.d_width=0.125", "data.batch_size=16", "data.num_workers=0",
        "data.shuffle_buffer=100", "log.progress=false", "train.threads=1", "log.grid_size=16",
        "ema.halflife_kimg=0.1"]


def train(run_dir: Path, data: Path, *extra: str, check: bool = True, env: dict | None = None,
          faults: list[str] | None = None):
    return cli("train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run_dir),
               f"data.path={data}", *TINY, *extra, check=check, env=env, faults=faults)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict:
    return torch.load(list_checkpoints(run_dir)[-1] / "state.pt", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["cur_nimg"] == b["cur_nimg"]
    for key in ("G", "D", "G_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for key in ("opt_G", "opt_D"):
        for pid, st in a[key]["state"].items():
            for name, v in st.items():
                assert torch.equal(v, b[key]["state"][pid][name]), f"{key} state {pid}.{name} differs"


def test_tiny_run_writes_every_artifact(tmp_path, mnist_dir):
    run = tmp_path / "run"
    out = train(run, mnist_dir, "train.total_kimg=0.256", "train.tick_kimg=0.128", "train.snapshot_kimg=0.128",
                "train.checkpoint_kimg=0.128", "train.keep_checkpoints=1")
    assert "done: 0.256 kimg" in out.stdout
    assert (run / "config.yaml").is_file() and (run / "FINISHED").is_file()
    stats = rows(run)
    assert [r["kimg"] for r in stats] == [0.128, 0.256]
    for r in stats:
        assert r["world_size"] == 1 and r["d_steps"] == r["cur_nimg"] // 16
        for key in ("Loss/D/main", "Loss/G/main", "D/real", "D/fake", "Grad/D/norm", "Grad/G/norm", "LR/G",
                    "Timing/sec_per_kimg", "Timing/images_per_s", "Data/skipped_undecodable", "Mem/cpu_maxrss_gb"):
            assert key in r and r[key] == r[key], key          # present and not NaN
        # from the process start to the first step: a fresh interpreter importing torch takes seconds
        assert 0.5 < r["Timing/startup_s"] < 120
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["fakes-000000128.png", "fakes-000000256.png"]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    # TensorBoard holds each tick's grid as the very PNG bytes written to samples/ (not encoded twice).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    shown = {e.step: e for e in acc.Images("Samples/fakes")}
    assert sorted(shown) == [128, 256]
    for step, event in shown.items():
        png = (run / "samples" / f"fakes-{step:09d}.png").read_bytes()
        assert event.encoded_image_string == png and (event.width, event.height) == (4 * 30 + 2, 4 * 30 + 2)   # 16 digits
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000000256"]           # keep_checkpoints=1
    snaps = list_snapshots(run / "snapshots")
    assert [p.name for p in snaps] == ["snapshot-000000128.json", "snapshot-000000256.json"]
    G, meta = load_snapshot(snaps[-1])
    assert meta["kimg"] == 0.256 and not any(k.startswith("module.") for k in G.state_dict())
    img = G(torch.randn(2, G.z_dim))
    assert img.shape == (2, 1, 28, 28) and img.abs().max() <= 1
    # the EMA weights in the snapshot are the checkpoint's G_ema
    ema = final_state(run)["G_ema"]
    assert all(torch.equal(v, ema[k]) for k, v in G.state_dict().items())
    out = cli("sample", "--snapshot", str(snaps[-1]), "--num", "16", "--out", str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 100 and "wrote 16 images" in out.stdout


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_exact(tmp_path, mnist_dir, workers):
    common = ["train.checkpoint_kimg=0.192", "train.tick_kimg=0.096", f"data.num_workers={workers}",
              "loss.penalties=[{name: r1, weight: 1, interval: 2}]", "data.hflip=true"]
    train(tmp_path / "straight", mnist_dir, "train.total_kimg=0.384", *common)
    train(tmp_path / "split", mnist_dir, "train.total_kimg=0.192", *common)
    out = train(tmp_path / "split", mnist_dir, "train.total_kimg=0.384", *common)
    assert "resumed from" in out.stdout and "ckpt-000000192" in out.stdout
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path, mnist_dir):
    args = ["train.total_kimg=1.6", "train.tick_kimg=0.032", "train.checkpoint_kimg=10", "train.snapshot_kimg=10"]
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run),
           f"data.path={mnist_dir}", *TINY, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "stats.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output
    assert "preempted: checkpoint" in output and not (run / "FINISHED").exists()
    stopped_at = final_state(run)["cur_nimg"]
    assert 0 < stopped_at < 1600
    out = train(run, mnist_dir, *args)
    assert f"resumed from" in out.stdout and (run / "FINISHED").is_file()
    train(tmp_path / "straight", mnist_dir, *args)
    assert_same_state(final_state(run), final_state(tmp_path / "straight"))


@pytest.mark.parametrize("reuse", [False, True])      # train.reuse_fakes: G's graph kept across D's step under DDP
def test_two_processes_stay_in_sync_with_r1_and_batchnorm(tmp_path, mnist_dir, reuse):
    run = tmp_path / "ddp"
    port = str(29531 + reuse)
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_PORT": port}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu.yaml",
           "--main_process_port", port, "-m", "pipeline", "train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run),
           f"data.path={mnist_dir}", *TINY, "data.num_workers=1", "train.total_kimg=0.256", "train.tick_kimg=0.128",
           "loss.penalties=[{name: r1, weight: 1}]", f"train.reuse_fakes={str(reuse).lower()}"]
    if not reuse:      # adaptive ADA: r_t all-reduced, p moving on each rank's device in step
        cmd += ["augment.ada_groups=blit,geom,color", "augment.ada_target=0.01", "augment.ada_speed_kimg=0.5",
                "augment.ada_interval=1"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = rows(run)
    assert all(r["world_size"] == 2 for r in stats) and "Loss/D/r1" in stats[-1]
    assert "batch 16 = 2 x 1 x 8" in proc.stdout
    ckpt = list_checkpoints(run)[-1]
    r0 = torch.load(ckpt / "rank-0000.pt", weights_only=True)
    r1 = torch.load(ckpt / "rank-0001.pt", weights_only=True)
    for net in ("G", "D"):
        assert torch.equal(r0["param_digest"][net], r1["param_digest"][net]), f"{net} differs between ranks"
    if not reuse:
        assert r0["ada_p"] == r1["ada_p"] == stats[-1]["Augment/p"]
        assert r0["ada_p"] > 0 and "ADA p" in proc.stdout
    else:
        assert "ada_p" not in r0
    # the ranks read different data: their loader streams are distinct
    assert set(r0["loader"]["streams"]).isdisjoint(r1["loader"]["streams"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_finish_with_finite_losses(tmp_path, mnist_dir, precision):
    run = tmp_path / precision
    train(run, mnist_dir, f"speed.mixed_precision={precision}", "train.total_kimg=0.128", "train.tick_kimg=0.064",
          "loss.penalties=[{name: r1, weight: 1}]")
    for r in rows(run):
        assert all(r[k] == r[k] and abs(r[k]) < 1e4 for k in ("Loss/D/main", "Loss/G/main", "Loss/D/r1"))
    if precision == "fp16":     # the scaler starts at 2^16 and halves on overflow: a few skipped steps
        assert 0 < rows(run)[-1]["AMP/scale_D"] <= 65536 and rows(run)[-1]["Steps/skipped_nonfinite"] <= 4


def test_injected_nan_is_skipped_and_counted_then_stops_when_persistent(tmp_path, mnist_dir):
    run = tmp_path / "nan"
    train(run, mnist_dir, "train.total_kimg=0.128", "train.tick_kimg=0.128", faults=["nan-d-steps=2,5"])
    assert rows(run)[-1]["Steps/skipped_nonfinite"] == 2
    out = train(tmp_path / "nan2", mnist_dir, "train.total_kimg=0.256", "train.checkpoint_kimg=0.064",
                "train.max_nonfinite_steps=3", check=False, faults=["nan-d-steps=6,7,8"])
    assert out.returncode == 1
    assert "3 consecutive D steps with non-finite gradients" in out.stderr
    named = out.stderr.split("last good checkpoint: ")[1].split(". ")[0]
    assert Path(named) == list_checkpoints(tmp_path / "nan2")[-1] and Path(named).name == "ckpt-000000128"


def test_resume_with_a_conflicting_config_names_the_keys(tmp_path, mnist_dir):
    run = tmp_path / "run"
    train(run, mnist_dir, "train.total_kimg=0.032", "train.tick_kimg=0.032")
    out = train(run, mnist_dir, "train.total_kimg=0.064", "loss.name=hinge", "optim.g_lr=0.001", check=False)
    assert out.returncode == 2 and "loss.name, optim.g_lr differ" in out.stderr
    # ... with what the run recorded and what the command asked for.
    assert "loss.name: 'nonsaturating' there, 'hinge' now; optim.g_lr: 0.0002 there, 0.001 now" in out.stderr
