"""`ganpipe export`: every network family's snapshot generator as ONNX (run with onnxruntime) and
TorchScript (run with torch.jit.load), equal to the eager generator at batch sizes other than the
traced one, or one clear line saying which family cannot go to which format."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, UserError
from pipeline.export import TRACE_BATCH, export_generator
from pipeline.generate import draw, images, labels_for
from pipeline.networks import NETWORKS, build_networks
from pipeline.training.snapshot import SnapshotInfo, load_snapshot, save_snapshot

TOLERANCE = 1e-4            # max abs difference on images in [-1, 1]
BATCHES = (2 * TRACE_BATCH + 1, 1)   # neither is the batch the graph was traced at
CLASSES = 3
# (family, format) pairs the exporter cannot handle today, each failing with one clear line:
# r3gan's resampling filter is built from the input's channel count, a shape the TorchScript-based
# ONNX exporter cannot make static. A pair that starts to work fails this test: drop it from here.
UNEXPORTABLE = {("r3gan", "onnx")}


def tiny_snapshot(tmp_path, name: str, classes: int):
    """A tiny G of family `name`, with state that eval mode must get right (BatchNorm running
    statistics away from 0/1, nonzero noise strengths), saved as a snapshot; (path, G)."""
    cfg = ModelConfig(name=name, g_width=1 / 32, d_width=1 / 32, w_dim=16, mapping_layers=2, conditional=bool(classes))
    for resolution in (28, 32):
        try:
            torch.manual_seed(0)
            G, _ = build_networks(cfg, resolution=resolution, channels=3, num_classes=classes or CLASSES)
            break
        except ConfigError:
            continue
    with torch.no_grad():
        for pname, p in G.named_parameters():
            if pname.endswith("noise_strength"):
                p.fill_(0.5)
        # Running statistics of real activations (a cumulative average over one training-mode
        # batch): not the 0/1 they start at, so an export in training mode would differ.
        norms = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if norms:
            for m in norms:
                m.momentum = None
            G.train()
            G(*inputs(G, 16, seed=9)[:1 + bool(classes)])
            G.eval()
            for m in norms:
                m.momentum = 0.1
    path = save_snapshot(G, tmp_path / f"{name}-{classes}", cur_nimg=2000, info=SnapshotInfo(cfg, G.resolution, 3, classes))
    return path, load_snapshot(path)[0]


def inputs(G, count: int, seed: int = 5) -> tuple[torch.Tensor, ...]:
    z, noise = draw(G, seed, 0, count)
    labels = labels_for(G, 0, count)
    return (z, *([labels] if labels is not None else []), *noise)


def run_onnx(path, xs) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["image"], {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs)})[0]


def run_torchscript(path, xs) -> np.ndarray:
    with torch.no_grad():
        return torch.jit.load(str(path))(*xs).numpy()


def call(G, xs, classes):
    with torch.no_grad():
        return G(xs[0], xs[1] if classes else None, noise=list(xs[1 + bool(classes):]))


@pytest.mark.parametrize("name", NETWORKS.keys())
def test_every_family_exports_to_both_formats_and_matches_eager(tmp_path, name):
    for classes in (0, CLASSES):
        snap, G = tiny_snapshot(tmp_path, name, classes)
        names = ["z"] + (["label"] if classes else []) + [f"noise_{i}" for i in range(len(G.noise_shapes()))]
        for fmt, run in (("onnx", run_onnx), ("torchscript", run_torchscript)):
            out = tmp_path / f"{name}-{classes}.{fmt}"
            if (name, fmt) in UNEXPORTABLE:
                with pytest.raises(UserError, match=rf"^the {name} generator cannot be exported to {fmt}: \w"):
                    export_generator(G, fmt, out, family=name)
                assert not out.exists()
                continue
            if fmt == "onnx":         # the command, on the snapshot
                assert main(["export", "--snapshot", str(snap), "--format", fmt, "--out", str(out)]) == 0
            else:                     # the function, on the loaded generator
                export_generator(G, fmt, out, family=name)
            assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))) \
                == [out.name]                                       # no temp file left beside it
            for batch in BATCHES:
                xs = inputs(G, batch)
                want = call(G, xs, classes).numpy()
                got = run(out, xs)
                assert got.shape == want.shape == (batch, 3, G.resolution, G.resolution), (fmt, batch)
                err = float(np.abs(got - want).max())
                assert err <= TOLERANCE, f"{name} {fmt} classes={classes} batch={batch}: max abs diff {err:.2e}"
            assert not np.allclose(run(out, inputs(G, 2, seed=6)), run(out, inputs(G, 2)), atol=1e-3)
            if fmt == "onnx":
                model = onnx.load(str(out))
                assert [i.name for i in model.graph.input] == names and model.graph.output[0].name == "image"
                assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in model.graph.input)
                meta = {p.key: p.value for p in model.metadata_props}
                assert meta["ganpipe_family"] == name
                assert meta["ganpipe_snapshot_sha256"] == json.loads(snap.read_text())["sha256"]
        # Exporting left the caller's generator as it was (spectral norm is folded in a copy).
        xs = inputs(G, 2)
        assert not G.training and torch.equal(call(G, xs, classes), call(load_snapshot(snap)[0], xs, classes))


def test_onnx_with_the_seeded_inputs_reproduces_ganpipe_sample(tmp_path):
    snap, G = tiny_snapshot(tmp_path, "stylegan2", CLASSES)
    out = tmp_path / "g.onnx"
    assert main(["export", "--snapshot", str(snap), "--format", "onnx", "--out", str(out)]) == 0
    xs = inputs(G, 7, seed=3)                       # images 0..6 of seed 3, as `ganpipe sample --seed 3` draws them
    got = run_onnx(out, xs)
    want = images(G, seed=3, count=7).numpy()
    assert float(np.abs(got - want).max()) <= TOLERANCE
    # The noise inputs act: zero noise gives other images.
    zero = (*xs[:2], *(torch.zeros_like(n) for n in xs[2:]))
    assert float(np.abs(run_onnx(out, zero) - got).max()) > 1e-3


def test_a_family_that_cannot_be_exported_says_so_in_one_line(tmp_path, capfd):
    if not UNEXPORTABLE:
        pytest.skip("every family exports to every format")
    name, fmt = sorted(UNEXPORTABLE)[0]
    snap, _ = tiny_snapshot(tmp_path, name, 0)
    out = tmp_path / f"g.{fmt}"
    capfd.readouterr()
    # In this process, with the file descriptors captured: torch's exporter writes its IR dump to
    # fd 2 directly, so this sees what a terminal would.
    assert main(["export", "--snapshot", str(snap), "--format", fmt, "--out", str(out)]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ganpipe export: error: the {name} generator cannot be "
                                                   f"exported to {fmt}: "), lines[-20:]
    assert not out.exists() and list(tmp_path.glob(".g.*")) == []
