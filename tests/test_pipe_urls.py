"""Shards behind `pipe:` URLs, the way users stream from object stores: a brace pattern with no
manifest, trained on through the real CLI with loader workers, in two processes, resumed; and a
failing pipe command is one line naming its shard, never a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli, make_npz
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.errors import DataError
from pipeline.training.checkpoint import list_checkpoints

TINY = ["model.g_width=0.125", "model.d_width=0.125", "data.batch_size=16", "data.shuffle_buffer=50",
        "log.progress=false", "train.threads=1", "log.grid_size=16", "train.snapshot_kimg=10"]
# No manifest behind a URL: the shape and classes come from the config.
SHAPE = ["data.resolution=28", "data.channels=1", "data.num_classes=10"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """256 random 28x28 grey images with 10 classes in 4 shards of 64 (train-000000..000003.tar)."""
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("pipe")
    prepare(f"npz:{make_npz(root / 'src.npz', 256, 28, channels=1, classes=10)}", root / "d", shard_size=64,
            workers=1, progress=False)
    return root / "d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(run: Path, *args: str) -> subprocess.CompletedProcess:
    port = str(free_port())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu.yaml",
           "--main_process_port", port, "-m", "pipeline", "train", "--config", "configs/mnist_dcgan.yaml",
           "--run-dir", str(run), *TINY, *SHAPE, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_PORT": port}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_pipe_pattern_trains_in_two_processes_with_workers_and_resumes(tmp_path, shards):
    url = f"data.path=pipe:cat {shards}/train-{{000000..000003}}.tar"
    run = tmp_path / "run"
    common = [url, "data.num_workers=2", "train.tick_kimg=0.032", "train.checkpoint_kimg=0.064"]
    first = launch_two(run, *common, "train.total_kimg=0.064")
    assert "batch 16 = 2 x 1 x 8" in first.stdout and "resumed" not in first.stdout
    second = launch_two(run, *common, "train.total_kimg=0.128")
    assert "resumed from" in second.stdout and "ckpt-000000064" in second.stdout
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    # The resumed run appended to the first one's rows, counting on from its checkpoint.
    assert [r["cur_nimg"] for r in rows] == [32, 64, 96, 128] and all(r["world_size"] == 2 for r in rows)
    assert [r["d_steps"] for r in rows] == [2, 4, 6, 8]
    assert all(r["Data/skipped_read_error"] == 0 and r["Data/skipped_undecodable"] == 0 for r in rows)
    ckpt = list_checkpoints(run)[-1]
    assert ckpt.name == "ckpt-000000128" and torch.load(ckpt / "state.pt", weights_only=True)["cur_nimg"] == 128
    streams = {}
    for rank in (0, 1):
        loader = torch.load(ckpt / f"rank-{rank:04d}.pt", weights_only=True)["loader"]
        assert loader["num_workers"] == 2 and loader["num_shards"] == 4
        streams.update(loader["streams"])
    # Four streams (2 ranks x 2 workers), each 4 batches in: 2 before the resume and 2 after it,
    # so every stream went on from its saved position instead of starting over.
    assert sorted(streams) == [0, 1, 2, 3] and all(st["batches"] == 4 for st in streams.values())


def test_a_failing_pipe_command_is_one_line_naming_its_shard(tmp_path, shards):
    # train-000004.tar does not exist: `cat` fails on that one shard of five, after training began.
    out = cli("train", "--config", "configs/mnist_dcgan.yaml", "--run-dir", str(tmp_path / "run"),
              f"data.path=pipe:cat {shards}/train-{{000000..000004}}.tar", *TINY, *SHAPE, "data.num_workers=2",
              "train.total_kimg=2", "train.tick_kimg=0.032", check=False, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    ours = [line for line in out.stderr.splitlines() if not line.startswith("cat: ")]
    assert len(ours) == 1 and "Traceback" not in out.stderr, out.stderr
    assert ours[0].startswith("ganpipe train: error: shard pipe:cat ") and f"{shards}/train-000004.tar" in ours[0]
    assert "exited with status 1" in ours[0]
    # The same from Python, with and without workers, for a pattern that names no existing file.
    for workers in (0, 2):
        ld = StreamLoader(ShardSet.resolve("pipe:cat /nonexistent", resolution=28, channels=1), batch_size=4,
                          rank=0, world_size=1, num_workers=workers, shuffle_buffer=0)
        with pytest.raises(DataError, match=r"^shard pipe:cat /nonexistent could not be read: the command exited "
                                            r"with status 1 .*data.max_bad_fraction=1") as err:
            ld.next()
        assert "\n" not in str(err.value)
    # data.max_bad_fraction=1 skips unreadable shards: the four good ones still stream.
    ld = StreamLoader(ShardSet.resolve(f"pipe:cat {shards}/train-{{000000..000004}}.tar", resolution=28, channels=1),
                      batch_size=64, rank=0, world_size=1, num_workers=0, shuffle_buffer=0, max_bad_fraction=1.0)
    for _ in range(5):
        ld.next()
    assert ld.bad_counts() == {"read_error": 1}
