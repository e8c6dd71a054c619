"""The Python API (`import pipeline as ganpipe`): the README's example runs as written, samples are
the bits `ganpipe sample` writes, and a run's scores and best snapshot read as `ganpipe eval` left them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline as ganpipe
from conftest import REPO
from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.generate import images
from pipeline.metrics.records import append_records
from pipeline.networks import build_networks
from pipeline.training.snapshot import SnapshotInfo, save_snapshot

CLASSES = 4


def tiny_run(run_dir, name: str = "dcgan", classes: int = 0, channels: int = 1, kimgs=(1, 2, 3)):
    """RUN/snapshots with one tiny snapshot per kimg (different weights each); returns their paths."""
    cfg = ModelConfig(name=name, g_width=1 / 32, d_width=1 / 32, w_dim=16, mapping_layers=2, conditional=bool(classes))
    paths = []
    for i, kimg in enumerate(kimgs):
        torch.manual_seed(i)
        G, _ = build_networks(cfg, resolution=28, channels=channels, num_classes=classes or CLASSES)
        if name == "stylegan2":                 # noise strengths start at 0: make the noise act
            with torch.no_grad():
                for layer in G.synthesis.convs:
                    layer.noise_strength.fill_(0.5)
        paths.append(save_snapshot(G.eval(), run_dir / "snapshots", cur_nimg=kimg * 1000, info=SnapshotInfo(cfg, 28, channels, classes)))
    return paths


def record(snapshot, metric: str, value: float, extractor: str = "mnist", num_gen: int = 1000) -> dict:
    """A metrics.jsonl line as `ganpipe eval` writes it (the keys records.py requires)."""
    import json

    meta = json.loads(snapshot.read_text())
    return {"name": f"{metric}_{extractor}", "metric": metric, "value": value, "snapshot": snapshot.stem,
            "snapshot_sha256": meta["sha256"], "cur_nimg": meta["cur_nimg"], "kimg": meta["kimg"],
            "extractor": extractor, "extractor_sha256": "e" * 64, "resize": "none", "num_gen": num_gen,
            "seed": 0, "seeding": "seed-index-v1", "time": "2026-01-01T00:00:00",
            "reference": {"data": "data/mnist", "split": "train", "num": 4000, "manifest_sha256": "m" * 64}}


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_and_makes_what_ganpipe_sample_makes(tmp_path, capsys):
    run = tmp_path / "runs" / "mnist_dcgan"
    snaps = tiny_run(run)
    append_records(run, [record(s, "fid", v) for s, v in zip(snaps, (30.0, 12.5, 20.0))])
    append_records(run, [record(s, "kid", v) for s, v in zip(snaps, (0.3, 0.2, 0.01))])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(readme_example(), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "2.0 kimg" in out and "12.50" in out                  # the FID series, as printed
    # The grid is the one `ganpipe sample` writes from the best snapshot (the lowest FID: kimg 2).
    assert main(["sample", "--snapshot", str(snaps[1]), "--num", "64", "--seed", "0",
                 "--out", str(tmp_path / "cli.png"), "--device", "cpu"]) == 0
    mine, theirs = np.array(Image.open(tmp_path / "grid.png")), np.array(Image.open(tmp_path / "cli.png"))
    assert mine.shape == theirs.shape and np.array_equal(mine, theirs)
    assert main(["sample", "--snapshot", str(snaps[0]), "--num", "64", "--seed", "0",
                 "--out", str(tmp_path / "other.png"), "--device", "cpu"]) == 0
    assert not np.array_equal(mine, np.array(Image.open(tmp_path / "other.png")))   # the choice mattered


@pytest.mark.parametrize("name", ["stylegan2", "resnet"])
def test_samples_are_the_convention_bits_whatever_the_labels_form(tmp_path, name):
    snap = tiny_run(tmp_path, name, classes=CLASSES, channels=3, kimgs=(1,))[0]
    gen = ganpipe.load_generator(snap, device="cpu")
    assert (gen.family, gen.num_classes, gen.z_dim, gen.resolution) == (name, CLASSES, gen.module.z_dim, 28)
    G = gen.module
    # None: the CLI's balanced order; an int: --label; both for any start and count.
    assert torch.equal(gen.sample(5, seed=2, start=14), images(G, seed=2, start=14, count=5))
    assert torch.equal(gen.sample(3, seed=2, labels=1, start=30), images(G, seed=2, start=30, count=3, label=1))
    # A list: image start+j is exactly what `--label labels[j]` gives at that index.
    labels = [3, 0, 3, 1, 2, 2, 0]
    got = gen.sample(len(labels), seed=2, labels=labels, start=12)       # crosses a micro-batch boundary
    for j, label in enumerate(labels):
        assert torch.equal(got[j], images(G, seed=2, start=12 + j, count=1, label=label)[0]), j
    assert torch.equal(gen.sample(7, seed=2, labels=np.array(labels), start=12), got)
    assert not torch.equal(got[0], gen.sample(1, seed=2, labels=[0], start=12)[0])    # the label acts
    with pytest.raises(UserError, match="label 4 outside 0..3"):
        gen.sample(2, labels=[0, 4])
    with pytest.raises(UserError, match="2 given for 3 images"):
        gen.sample(3, labels=[0, 1])


def test_uint8_and_save_are_what_ganpipe_sample_writes(tmp_path):
    snap = tiny_run(tmp_path, "stylegan2", channels=3, kimgs=(1,))[0]
    gen = ganpipe.load_generator(snap)
    assert main(["sample", "--snapshot", str(snap), "--num", "6", "--start", "3", "--seed", "7",
                 "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    u8 = gen.sample_uint8(6, seed=7, start=3)
    assert u8.shape == (6, 28, 28, 3) and u8.dtype == np.uint8
    for i in range(6):
        assert np.array_equal(u8[i], np.array(Image.open(tmp_path / "cli" / f"{i + 3:06d}.png"))), i
    gen.save(6, tmp_path / "api", seed=7, start=3)
    assert sorted(p.name for p in (tmp_path / "api").iterdir()) == [f"{i:06d}.png" for i in range(3, 9)]
    # Truncation is passed through: psi acts on stylegan2 as `ganpipe sample --psi` does.
    assert torch.equal(gen.sample(4, seed=7, psi=0.5), images(gen.module, seed=7, count=4, psi=0.5))
    assert not torch.equal(gen.sample(4, seed=7, psi=0.5), gen.sample(4, seed=7))
    dcgan = ganpipe.load_generator(tiny_run(tmp_path / "d", kimgs=(1,))[0])
    with pytest.raises(UserError, match="dcgan generator has no truncation"):
        dcgan.sample(2, psi=0.7)


def test_read_metrics_and_best_snapshot_follow_the_records(tmp_path):
    snaps = tiny_run(tmp_path, kimgs=(1, 2, 3))
    with pytest.raises(UserError, match="no scores in metrics.jsonl.*ganpipe eval"):
        ganpipe.best_snapshot(tmp_path)
    append_records(tmp_path, [record(s, "fid", v) for s, v in zip(snaps, (9.0, 4.0, 6.0))])
    append_records(tmp_path, [record(s, "precision", v) for s, v in zip(snaps, (0.2, 0.3, 0.7))])
    assert ganpipe.best_snapshot(tmp_path) == snaps[1]
    assert ganpipe.best_snapshot(tmp_path, "precision") == snaps[2]         # higher is better
    assert ganpipe.best_snapshot(tmp_path, "fid_mnist") == snaps[1]
    assert [r["value"] for r in ganpipe.read_metrics(tmp_path, "fid")] == [9.0, 4.0, 6.0]
    assert len(ganpipe.read_metrics(tmp_path)) == 6
    # Only the newest protocol counts, as in best.json: a rescoring with more images replaces the old.
    append_records(tmp_path, [record(s, "fid", v, num_gen=5000) for s, v in zip(snaps, (3.0, 5.0, 8.0))])
    assert ganpipe.best_snapshot(tmp_path) == snaps[0]
    append_records(tmp_path, [record(snaps[0], "fid", 1.0, extractor="inception")])
    with pytest.raises(UserError, match="more than one series.*fid_mnist, .*fid_inception"):
        ganpipe.best_snapshot(tmp_path)
    assert ganpipe.best_snapshot(tmp_path, "fid_inception") == snaps[0]


def test_import_pipeline_stays_light():
    code = ("import sys, pipeline; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'load_generator' in dir(pipeline); print(pipeline.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ganpipe.nope
