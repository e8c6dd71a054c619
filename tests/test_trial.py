"""What a new user's trial hit (issue 25): two trainers on one run, threads on shared nodes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from pipeline.errors import UserError
from pipeline.rundir import RunDir, TrainerLock
from pipeline.training.loop import usable_cpus
from test_train import TINY


def start_trainer(run: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--config", "configs/mnist_dcgan.yaml",
                             "--run-dir", str(run), f"data.path={data}", *TINY, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_second_trainer_on_the_same_run_is_refused_and_a_dead_ones_lock_is_not_in_the_way(tmp_path, mnist_dir):
    run = tmp_path / "run"
    first = start_trainer(run, mnist_dir, "train.total_kimg=100", "train.tick_kimg=0.032")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "stats.jsonl").is_file():
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        holder = json.loads(RunDir(run).train_lock.read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = start_trainer(run, mnist_dir, "train.total_kimg=100", "train.tick_kimg=0.032")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, out + err
        assert f"is being trained by {socket.gethostname()} pid {first.pid} since {holder['since']}" in err
        assert first.poll() is None                      # the first one trains on
    finally:
        os.killpg(first.pid, signal.SIGKILL)             # a trainer killed -9 leaves its lock behind ...
        first.communicate()
    assert RunDir(run).train_lock.is_file()
    third = start_trainer(run, mnist_dir, "train.total_kimg=0.064", "train.tick_kimg=0.032")
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, out + err              # ... which does not block a restart
    assert "resumed from" in out or "training dcgan" in out
    assert not RunDir(run).train_lock.exists()           # released at the end


def test_a_lock_from_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    run = RunDir(tmp_path)
    run.train_lock.write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "2026-12-04 03:00:00"}))
    with pytest.raises(UserError, match="being trained by node-17 pid 4242 since 2026-12-04 03:00:00"):
        TrainerLock(run).acquire()
    old = time.time() - TrainerLock.STALE_S - 5          # a lost node: no heartbeat for too long
    os.utime(run.train_lock, (old, old))
    lock = TrainerLock(run)
    lock.acquire()
    assert json.loads(run.train_lock.read_text())["pid"] == os.getpid()
    lock.release()
    assert not run.train_lock.exists()


def test_threads_follow_the_cpus_this_process_may_use(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")       # a 1.5-CPU container quota
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")   # cgroup v1, half a CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1
    # An affinity mask of one CPU (Slurm's --cpus-per-task=1, taskset): one thread, shown at start.
    probe = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                            "from pipeline.training.loop import usable_cpus; print(usable_cpus())"],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "1"


def test_the_start_line_shows_the_threads(tmp_path, mnist_dir):
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "pipeline", "train", "--config",
                          "configs/mnist_dcgan.yaml", "--run-dir", str(tmp_path / "run"), f"data.path={mnist_dir}",
                          *TINY, "train.threads=0", "train.total_kimg=0.016", "train.tick_kimg=0.016"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 threads and 0 loader workers per process" in out.stdout


def test_overrides_anywhere_on_the_line_and_no_progress(tmp_path, mnist_dir):
    from conftest import cli

    out = cli("train", "--config", "configs/mnist_dcgan.yaml", f"data.path={mnist_dir}", "--run-dir",
              str(tmp_path / "run"), "data.batch_size=8", "--no-progress", "log.grid_size=4", "--dry-run")
    assert "one batch (8, 1, 28, 28) read" in out.stdout
    bad = cli("config", "--config", "configs/mnist_dcgan.yaml", "data.batch_size=8", "--bogus", check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


def test_ctrl_c_to_two_processes_says_so_once(tmp_path, mnist_dir):
    from test_train_faults import LONG, finish, start, wait_for_ticks

    run = tmp_path / "ddp"
    proc = start(run, mnist_dir, *LONG, procs=2, port=29547)
    wait_for_ticks(proc, run)
    os.killpg(proc.pid, signal.SIGINT)            # a terminal's Ctrl-C: the launcher and both ranks
    _, out = finish(proc)
    assert (run / "PREEMPTED").is_file(), out
    assert out.count("interrupted: finishing this step") == 1, out


def test_a_new_run_writes_a_grid_of_real_images_beside_its_fakes(tmp_path, mnist_dir):
    from PIL import Image

    from conftest import cli
    from pipeline.data.loader import ShardSet
    from pipeline.figures import real_images
    from pipeline.generate import grid_array

    run = tmp_path / "run"
    cli("train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run), f"data.path={mnist_dir}", *TINY,
        "train.total_kimg=0.016", "train.tick_kimg=0.016")
    with Image.open(RunDir(run).reals) as img:
        grid = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    found, _ = real_images(ShardSet.resolve(str(mnist_dir)), lambda f: len(f.get(0, [])) >= 16)
    assert np.array_equal(grid, grid_array(np.stack(found[0][:16])))     # log.grid_size=16 of TINY
    with Image.open(next(RunDir(run).samples.glob("fakes-*.png"))) as fakes:
        assert fakes.size == (grid.shape[2], grid.shape[1])              # the same layout as the fakes


def test_a_shape_override_that_the_data_does_not_have_is_refused_not_recorded(tmp_path, mnist_dir):
    from conftest import cli

    run = tmp_path / "run"
    for override, message in (("data.resolution=128", "data.resolution=128 but"),
                              ("data.channels=3", "data.channels=3 but")):
        out = cli("train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run), f"data.path={mnist_dir}",
                  *TINY, override, check=False)
        assert out.returncode == 2 and message in out.stderr and "manifest says" in out.stderr, out.stderr[-800:]
        assert not RunDir(run).config.exists()           # nothing recorded
    out = cli("train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(run), f"data.path={mnist_dir}",
              *TINY, "data.resolution=28", "data.channels=1", "--dry-run")
    assert "one batch (16, 1, 28, 28) read" in out.stdout    # the manifest's own shape is accepted


def test_prepare_writes_the_same_manifest_twice_even_with_unreadable_files(tmp_path):
    from PIL import Image

    from pipeline.data.prepare import prepare

    photos = tmp_path / "photos" / "cats"
    photos.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 10, 200)).save(photos / f"{i}.png")
    (photos / "notes.jpg").write_text("not an image at all")     # PIL's error names a BytesIO and its address
    (photos / "empty.jpg").write_bytes(b"")
    manifests = []
    for out in ("a", "b"):
        prepare(f"folder:{tmp_path / 'photos'}", tmp_path / out, resolution=16, workers=1, progress=False)
        manifests.append((tmp_path / out / "manifest.json").read_bytes())
    assert b"notes.jpg" in manifests[0] and b" at 0x" not in manifests[0]
    assert manifests[0] == manifests[1]


def test_the_mnist_extractor_is_refused_on_data_it_was_not_made_for(tmp_path):
    from conftest import cli, make_npz
    from pipeline.config import Config, DataConfig, dump_config
    from pipeline.data.prepare import prepare

    prepare(f"npz:{make_npz(tmp_path / 'c.npz', 20, 64, channels=3)}", tmp_path / "photos", workers=1,
            progress=False)
    run = tmp_path / "run"
    run.mkdir()
    dump_config(Config(data=DataConfig(path=str(tmp_path / "photos"))), RunDir(run).config)
    out = cli("eval", "--run-dir", str(run), "--all", "--extractor", "mnist", check=False)
    assert out.returncode == 2, out.stderr
    assert "--extractor mnist scores grey digits" in out.stderr and "3-channel 64 px images" in out.stderr
    assert "inception-2015-12-05.pt" in out.stderr and "dinov2_vitb14_pretrain.pth" in out.stderr
