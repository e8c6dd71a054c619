"""A dataset someone else made must never run a command: shard file names and manifest entries are
local files, always; only a `data.path` the user wrote with a URL scheme reaches webdataset's gopen.
The crafted inputs are made here, small and seeded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_npz
from pipeline.data.loader import ShardSet
from pipeline.errors import DataError

TINY = ["model.g_width=0.125", "model.d_width=0.125", "data.batch_size=16", "data.shuffle_buffer=50",
        "log.progress=false", "train.threads=1", "log.grid_size=16", "train.snapshot_kimg=10",
        "train.tick_kimg=0.032", "train.total_kimg=0.032", "data.num_workers=1"]


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """64 random 28x28 grey images with 10 classes in one shard, prepared."""
    from pipeline.data.prepare import prepare

    prepare(f"npz:{make_npz(tmp_path / 'src.npz', 64, 28, channels=1, classes=10)}", tmp_path / "d",
            shard_size=64, workers=1, progress=False)
    return tmp_path / "d"


def ganpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_shard_file_named_like_a_pipe_url_is_read_as_a_file(dataset):
    # The adversary's folder: a valid shard whose *file name* is a shell command, indexed as data.
    evil = "pipe:touch PWNED;cat train-000000.tar"
    shutil.copy(dataset / "train-000000.tar", dataset / evil)
    (dataset / "manifest.json").unlink()
    for extra in dataset.glob("test-*"):
        extra.unlink()
    indexed = ganpipe(dataset, "index-shards", ".")
    assert indexed.returncode == 0, indexed.stderr
    names = [s["name"] for s in json.loads((dataset / "manifest.json").read_text())["splits"]["train"]["shards"]]
    assert evil in names
    assert ganpipe(dataset, "verify", ".", "--quiet").returncode == 0
    run = ganpipe(dataset, "train", "--config", str(REPO / "configs/mnist_dcgan.yaml"), "--run-dir", "run",
                  "data.path=.", *TINY)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert not (dataset / "PWNED").exists()
    # Both shards were read as files: every sample decoded, none lost to a read error.
    row = json.loads((dataset / "run/stats.jsonl").read_text().splitlines()[-1])
    assert row["Data/skipped_read_error"] == 0 and row["cur_nimg"] == 32


def test_a_manifest_entry_naming_a_command_is_a_missing_file(dataset, monkeypatch):
    manifest = json.loads((dataset / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    entry["path"] = entry["name"] = "pipe:touch PWNED;cat train-000000.tar"
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(dataset)
    with pytest.raises(DataError, match=r"shard .*/pipe:touch PWNED;cat train-000000\.tar is missing"):
        ShardSet.resolve(".")
    assert not (dataset / "PWNED").exists()


def test_only_a_url_the_user_wrote_is_opened_as_a_url(dataset, tmp_path):
    shard = dataset / "train-000000.tar"
    local = ShardSet.resolve(f"file:{shard}", resolution=28, channels=1)
    assert not local.remote and local.urls == [str(shard)]
    plain = ShardSet.resolve(str(shard), resolution=28, channels=1)
    assert not plain.remote and plain.urls == [str(shard)]
    piped = ShardSet.resolve(f"pipe:cat {shard}", resolution=28, channels=1)
    assert piped.remote
    with piped.open(0) as stream:
        assert stream.read(512) == shard.read_bytes()[:512]
