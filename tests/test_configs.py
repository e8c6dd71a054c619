"""Every file in configs/ loads, and trains for a step at tiny scale, so no catalogue entry rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, make_npz
from pipeline import cli as ganpipe
from pipeline.catalog import load_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def rgb32(tmp_path_factory) -> Path:
    from pipeline.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("rgb32")
    make_npz(tmp / "x.npz", 64, 32, channels=3, classes=4)
    prepare(f"npz:{tmp / 'x.npz'}", tmp / "data", shard_size=16, workers=1, progress=False)
    return tmp / "data"


def test_catalogue_is_complete():
    names = {p.stem for p in CONFIGS}
    assert {"mnist_mlp", "mnist_dcgan", "cifar10_dcgan", "cifar10_wgan_gp", "cifar10_sngan_hinge",
            "cifar10_sngan_hinge_cond", "ffhq256_stylegan2"} <= names
    for path in CONFIGS:
        head = path.read_text().splitlines()[0]
        assert head.startswith("# ") and len(head) > 30, f"{path.name} must say what it reproduces"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_one_step_at_tiny_scale(path, tmp_path, mnist_dir, rgb32):
    cfg = load_config(path)
    data = mnist_dir if cfg.data.path.endswith("mnist") else rgb32
    run = tmp_path / "run"
    width = "0.0625" if cfg.model.name != "mlp" else "0.03125"
    # The real CLI, in this process: a subprocess per config would spend most of its time importing.
    code = ganpipe.main(["train", "--config", str(path), "--run-dir", str(run), f"data.path={data}",
                         "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
                         f"model.g_width={width}", f"model.d_width={width}", "model.w_dim=32",
                         "model.mapping_layers=2", "train.total_kimg=0.008", "train.tick_kimg=0.008",
                         "log.progress=false", "train.threads=1", "log.grid_size=4",
                         "speed.mixed_precision=fp32"])
    assert code == 0
    row = json.loads((run / "stats.jsonl").read_text().splitlines()[-1])
    assert row["g_steps"] == 1 and row["d_steps"] == cfg.train.n_critic
    assert row["Loss/G/main"] == row["Loss/G/main"] and (run / "FINISHED").is_file()
