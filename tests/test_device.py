"""The device suite: everything whose subject has a device side, run on $GANPIPE_TEST_DEVICE.

    GANPIPE_TEST_DEVICE=cuda python -m pytest tests/test_device.py -m device   # on a GPU (`make gpu-check` runs it)
    GANPIPE_TEST_DEVICE=cpu python -m pytest tests/test_device.py -m device    # the same bodies on this CPU
    python -m pytest tests/test_device.py                                       # CI: the device tests skip, saying why

What runs on the device, each against the CPU or against itself:

- every network family, conditional and not, at 32 and 64 px (stylegan2 also 256), through the
  real phases (`build_phases`, `accumulate`, `step`) with every penalty it takes, each in a phase
  of its own (r1 in D's main step, r2 every 2 D steps, wgan-gp every 4, pl or ortho every 2 G
  steps), under fp32, bf16 and fp16 autocast: every loss and gradient finite and within
  `TOLERANCE` of the CPU's fp32 value from the same weights and inputs (or, where a low precision
  cannot get that close on these untrained networks, no worse than the CPU's own arithmetic in it);
- `ganpipe train` of each family for a few steps, checkpoint and resume: exact (see
  `test_resume_is_exact`), and the steady-state steps of each family and precision under
  `speed.sync_debug=true` (torch's sync debug mode "error": no host synchronisation between ticks);
- the loader's copies to the device with `speed.pin_memory` on and off: the same batches, no host
  synchronisation;
- ADA and DiffAugment, FID / KID / precision-recall / IS on the same features, and `ganpipe eval`,
  each equal to the CPU's within tolerance; ONNX and TorchScript export of a device-trained
  snapshot; a process group of one (NCCL on a GPU, gloo on the CPU) with DDP through it.

The cheap tests come first and the phases, the costliest, last: `make gpu-check` stops the suite
at its share of the time budget, and what it did not reach is then the least. Tolerances are
stated beside each test. Comparisons with the CPU run with TF32 off (matmul and
cuDNN) and cuDNN autotuning off, so that fp32 on the device is fp32. Random draws inside the code
under test (wgan-gp's mixing weights, pl's directions, stylegan2's noise and style mixing, the
augmentations) come from one CPU generator during a comparison (`host_random`), so the device and
the CPU see the same numbers: torch's CUDA and CPU generators give different streams for a seed.

The tests at the end (not marked `device`) check `tools/gpu_check.py` on the CPU: its one line
and exit status without CUDA, its budget, its dry run and report.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import REPO, cli, make_npz
from pipeline.catalog import from_dict, load_config
from pipeline.networks import build_networks
from pipeline.rundir import RunDir
from pipeline.training.phases import MicroBatch, NonFiniteGuard, accumulate, autocast_for, build_phases, step

CPU = torch.device("cpu")
FAMILIES = ("mlp", "dcgan", "resnet", "biggan", "stylegan2", "r3gan")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CLASSES = 4


# torch's global flags for TF32 (matmuls, convolutions) and cuDNN autotuning.
FLAGS = ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), (torch.backends.cudnn, "benchmark"))


@contextlib.contextmanager
def restored_flags():
    """FLAGS as they were when the block began, after it (the trainer sets them from speed.*)."""
    saved = [getattr(owner, name) for owner, name in FLAGS]
    try:
        yield
    finally:
        for (owner, name), value in zip(FLAGS, saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def exact_arithmetic():
    """fp32 as fp32 on a GPU (no TF32 in matmuls or convolutions) and no cuDNN autotuning, restored after."""
    with restored_flags():
        for owner, name in FLAGS:
            setattr(owner, name, False)
        yield


@contextlib.contextmanager
def host_random(seed: int):
    """torch.rand/randn/randint/rand_like/randn_like draw on the CPU from one generator seeded with
    `seed` and move the result to the device asked for; a call with its own generator is left alone."""
    gen = torch.Generator().manual_seed(seed)
    saved = {name: getattr(torch, name) for name in ("rand", "randn", "randint", "rand_like", "randn_like")}

    def drawn(name):
        original = saved[name]

        def draw(*args, device=None, **kw):
            if kw.get("generator") is not None:
                return original(*args, device=device, **kw)
            out = original(*args, generator=gen, **kw)
            return out if device is None else out.to(device)
        return draw

    def drawn_like(name):
        base = saved[name.removesuffix("_like")]

        def draw(x, *, dtype=None, device=None, **kw):
            return base(x.shape, generator=gen, dtype=dtype or x.dtype).to(device or x.device)
        return draw

    for name in saved:
        setattr(torch, name, drawn_like(name) if name.endswith("_like") else drawn(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


# ------------------------------------------------------------------------------------------------
# Augmentation and metrics, device against CPU.

def augmenter(what: str):
    from pipeline.training.ada import AdaptiveAugment
    from pipeline.training.augment import diff_augment, parse_policy

    if what == "diffaugment":
        policy = parse_policy("color,translation,cutout")
        return lambda x: diff_augment(x, policy)
    return AdaptiveAugment(groups=what.removeprefix("ada-"), p=1.0, adaptive=False)


@pytest.mark.device
@pytest.mark.parametrize("what", ["ada-blit", "ada-geom", "ada-color", "diffaugment"])
def test_augmentation_matches_the_cpu(device, what):
    """The same draws give the same images (atol 1e-5: blit and DiffAugment move whole pixels, geom
    resamples bilinearly, colour is a 4x4 matrix) and the same gradient to the input (atol 1e-4:
    grid_sample's backward accumulates with atomics on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
    w = torch.randn(8, 3, 32, 32, generator=gen)
    out = []
    with exact_arithmetic():
        for dev in (CPU, device):
            xi = x.to(dev, copy=True).requires_grad_(True)     # a leaf of its own on each device
            with host_random(3):
                y = augmenter(what)(xi)
            (y * w.to(dev)).sum().backward()
            out.append((y.detach().cpu(), xi.grad.cpu()))
    (y_cpu, g_cpu), (y_dev, g_dev) = out
    assert not torch.equal(y_cpu, x)            # p = 1: something happened
    torch.testing.assert_close(y_dev, y_cpu, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_dev, g_cpu, rtol=0, atol=1e-4)


@pytest.mark.device
def test_metrics_on_the_same_features_match_the_cpu(device):
    """FID from the running float64 sums (rel 1e-6: float64 in another order, then a matrix square
    root), KID (rel 1e-4:
    float32 kernels), precision/recall/density/coverage (float64 distances: at most one point
    of 600 changes sides) and the Inception Score's sums (rel 1e-9)."""
    from pipeline.metrics.fid import feature_stats, frechet_distance, kernel_distance
    from pipeline.metrics.manifold import manifold_scores
    from pipeline.metrics.stats import ClassSums, FeatureStats

    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 64)).astype(np.float32)
    fake = (rng.normal(size=(600, 64)) * 1.1 + 0.2).astype(np.float32)
    logits = rng.normal(size=(600, 10)).astype(np.float32)
    mu_r, sigma_r = feature_stats(real)
    scores = []
    with exact_arithmetic():
        for dev in (CPU, device):
            stats = FeatureStats(64, dev, moments=True, class_sums=ClassSums(10, 600, device=dev))
            for lo in range(0, 600, 256):       # batches as the evaluator adds them
                stats.add(stats.packet(lo, torch.from_numpy(fake[lo:lo + 256]).to(dev),
                                       torch.from_numpy(logits[lo:lo + 256]).to(dev)))
            scores.append({
                "fid": frechet_distance(stats.mean(), stats.cov(), mu_r, sigma_r),
                "kid": kernel_distance(real, fake, seed=0, device=dev),
                "is": stats.class_sums.score()[0],
                **manifold_scores(real, fake, pr_k=3, dc_k=5, device=dev)})
    cpu, dev = scores
    assert cpu["fid"] > 1 and cpu["kid"] > 0.01           # two different distributions: nothing near 0
    assert dev["fid"] == pytest.approx(cpu["fid"], rel=1e-6)
    assert dev["is"] == pytest.approx(cpu["is"], rel=1e-9)
    assert dev["kid"] == pytest.approx(cpu["kid"], rel=1e-4)
    for name in ("precision", "recall", "density", "coverage"):
        assert dev[name] == pytest.approx(cpu[name], abs=1.01 / 600), name


# ------------------------------------------------------------------------------------------------
# The loader's copies to the device (speed.pin_memory).

@pytest.mark.device
@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_batches_equal_pageable_ones_without_a_host_sync(device, rgb_data, workers):
    """`speed.pin_memory` on and off give the same batches on the device, from the main process and
    from worker processes; on a GPU the pinned path's batches arrive page-locked, and fetching
    batches either way makes no host synchronisation (torch's sync debug mode "error", under which
    a blocking copy raises): the unpinned copy is non-blocking too."""
    from pipeline.data.loader import ShardSet, StreamLoader
    from pipeline.training.loop import no_host_sync

    got = {}
    for pin in (False, True):
        ld = StreamLoader(ShardSet.resolve(str(rgb_data)), batch_size=16, seed=0, rank=0, world_size=1,
                          num_workers=workers, shuffle_buffer=64, hflip=True, device=device, pin_memory=pin)
        assert ld.pinned == (pin and device.type == "cuda")
        batches = [ld.next()]                      # the workers start outside the check: not a step
        with no_host_sync(device, True):
            batches += [ld.next() for _ in range(3)]
        assert all(x.device.type == device.type and y.device.type == device.type for x, y in batches)
        got[pin] = [(x.cpu(), y.cpu()) for x, y in batches]
        raw = ld.next_raw()
        assert isinstance(raw["images"], torch.Tensor) == (pin and workers > 0)
        if ld.pinned and workers:
            assert raw["images"].is_pinned() and raw["labels"].is_pinned()
        ld.close()
    for (x0, y0), (x1, y1) in zip(got[False], got[True], strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


# ------------------------------------------------------------------------------------------------
# A process group of one on the device, and DDP through it.

@pytest.mark.device
@pytest.mark.filterwarnings("ignore:.*broadcast_buffers.*:FutureWarning")     # what the trainer means too (loop.py)
def test_ddp_through_a_process_group_of_one(device, tmp_path):
    """NCCL (gloo on the CPU) with world size 1: an all-reduce, then D's main, lazy R1 and G's phase
    of a tiny DCGAN through DDP-wrapped networks (two micro-batches: `no_sync` on the first) give
    the weights of the same phases without DDP (a sum over one rank: the same numbers)."""
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    torch_dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        t = torch.arange(4.0, device=device)
        torch_dist.all_reduce(t)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0] and torch_dist.get_backend() == backend
        cfg = from_dict({"model": {"name": "dcgan", "g_width": 1 / 16, "d_width": 1 / 16},
                         "loss": {"penalties": [{"name": "r1", "weight": 1.0, "interval": 2}]}})
        torch.manual_seed(0)
        G0, D0 = build_networks(cfg.model, resolution=32, channels=3, num_classes=0)
        gen = torch.Generator().manual_seed(1)
        z = torch.randn(8, G0.z_dim, generator=gen).to(device)
        real = (torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1).to(device)
        weights = {}
        for wrapped in (False, True):
            G, D = copy.deepcopy(G0).to(device), copy.deepcopy(D0).to(device)
            with torch.no_grad():
                fake = G(z)
            if wrapped:
                ids = [device.index or 0] if device.type == "cuda" else None
                G = DistributedDataParallel(G, device_ids=ids, broadcast_buffers=False)
                D = DistributedDataParallel(D, device_ids=ids, broadcast_buffers=False)
            phases = build_phases(cfg, G=G, D=D, device=device, dtype=None, report=lambda name, value: None)
            guard = NonFiniteGuard(10, lambda: "none", lambda: 0.0)
            for phase in phases:
                mbs = [MicroBatch(z=a, labels=None, real=b, fake=c) for a, b, c in zip(z.chunk(2), real.chunk(2), fake.chunk(2))]
                with exact_arithmetic():
                    accumulate(phase, mbs, autocast_for(device, None))
                    assert bool(step(phase, guard, lambda name, value: None)), phase.name
            weights[wrapped] = {f"{n}.{k}": v.detach().cpu() for n, net in (("G", G), ("D", D))
                                for k, v in getattr(net, "module", net).state_dict().items()}
        assert weights[True].keys() == weights[False].keys()
        for key, value in weights[False].items():
            torch.testing.assert_close(weights[True][key], value, rtol=0, atol=1e-6, msg=key)
    finally:
        torch_dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# The real trainer on the device.

# Per family: its loss and penalties, conditioning and augmentation, as its configs use them.
RECIPES = {
    "mlp": ["model.name=mlp", "loss.penalties=[{name: r1, weight: 1, interval: 2}]"],
    "dcgan": ["model.name=dcgan", "loss.penalties=[{name: r1, weight: 1, interval: 2}, {name: r2, weight: 1}]",
              "augment.diffaugment=color,translation,cutout"],
    "resnet": ["model.name=resnet", "loss.name=hinge", "train.n_critic=2",
               "loss.penalties=[{name: wgan-gp, weight: 1, interval: 2}]"],
    "biggan": ["model.name=biggan", "model.conditional=true", "model.attention_res=16", "loss.name=hinge",
               "loss.penalties=[{name: ortho, weight: 1.0e-4}]"],
    "stylegan2": ["model.name=stylegan2", "model.w_dim=32", "model.mapping_layers=2",
                  "loss.penalties=[{name: r1, weight: 1, interval: 4}, {name: pl, weight: 2, interval: 2}]"],
    "r3gan": ["model.name=r3gan", "model.conditional=true", "loss.name=rpgan",
              "loss.penalties=[{name: r1, weight: 0.1}, {name: r2, weight: 0.1}]",
              "augment.ada_groups=blit,geom,color", "augment.ada_target=0", "augment.ada_p=0.5"],
}
# configs/stylegan2_ada_small.yaml's adaptive ADA: p follows r_t, adjusted every 4 D steps.
RECIPES["stylegan2-ada"] = [*RECIPES["stylegan2"], "augment.ada_groups=blit,geom,color", "augment.ada_target=0.6",
                            "augment.ada_interval=4", "augment.ada_speed_kimg=0.1"]
SYNC_CASES = [(family, precision) for family in FAMILIES for precision in PRECISIONS] + [("stylegan2-ada", "bf16")]
# 16-image batches of tiny networks, no loader workers, no progress bar.
TINY = ["data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=64", "model.g_width=0.0625",
        "model.d_width=0.0625", "log.progress=false", "log.grid_size=4", "train.threads=1", "ema.halflife_kimg=0.1"]


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory) -> Path:
    """512 random 32x32 RGB images with 4 classes, in 4 shards."""
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("rgb32")
    prepare(f"npz:{make_npz(root / 'src.npz', 512, 32, classes=CLASSES)}", root / "data", shard_size=128, workers=1,
            progress=False)
    return root / "data"


def stats_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in RunDir(run).stats.read_text().splitlines()]


@pytest.mark.device
@pytest.mark.parametrize("family,precision", SYNC_CASES, ids=[f"{f}-{p}" for f, p in SYNC_CASES])
def test_steady_steps_make_no_host_sync(device, rgb_data, tmp_path, family, precision, monkeypatch):
    """10 D steps (5 G steps for resnet) with a tick every 32 images: every step after the first
    tick runs under torch.cuda.set_sync_debug_mode("error") (`speed.sync_debug`), so a step that
    waits for the GPU raises, naming its line, and the run fails. Every family under every
    precision, and adaptive ADA once (its p moves with r_t, all-reduced every ada_interval D
    steps). On the CPU the mode does not exist and the same run only shows that it trains,
    finite, under each precision."""
    modes = []
    real_set = torch.cuda.set_sync_debug_mode
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: (modes.append(mode), real_set(mode))[1])
    cfg = load_config(None, [f"data.path={rgb_data}", *TINY, *RECIPES[family], f"speed.mixed_precision={precision}",
                             "speed.sync_debug=true", "train.total_kimg=0.16", "train.tick_kimg=0.032",
                             "train.snapshot_kimg=0", "train.checkpoint_kimg=0"])
    from pipeline.training.loop import training_loop

    with restored_flags():
        assert training_loop(cfg, tmp_path / "run") == 0
    rows = stats_rows(tmp_path / "run")
    assert len(rows) == 5
    for row in rows:
        for key in ("Loss/D/main", "Loss/G/main"):
            assert math.isfinite(row[key]), (key, row)
    if device.type == "cuda":
        assert "error" in modes           # the steps were checked (and the run got through them)


def train_cli(run: Path, data: Path, family: str, *extra: str) -> None:
    """`ganpipe train` through the real CLI, in this process (a fresh interpreter would cost a CUDA start)."""
    from pipeline.cli import main

    config = run.parent / "base.yaml"
    config.write_text("# the defaults: the tests' overrides say the rest\n")
    with restored_flags():
        assert main(["train", "--config", str(config), "--run-dir", str(run), f"data.path={data}", *TINY,
                     *RECIPES[family], *extra]) == 0


def final_state(run: Path) -> dict:
    from pipeline.training.checkpoint import list_checkpoints

    return torch.load(list_checkpoints(run)[-1] / "state.pt", weights_only=True, map_location="cpu")


def state_distance(a: dict, b: dict) -> float:
    """Relative L2 distance of two checkpoints' networks, EMA and optimizer states (0: bitwise the same)."""
    num = den = 0.0
    pairs = [(a[k], b[k]) for k in ("G", "D", "G_ema")]
    pairs += [(a[k]["state"][i], b[k]["state"][i]) for k in ("opt_G", "opt_D") for i in a[k]["state"]]
    for x, y in pairs:
        for name, t in x.items():
            if torch.is_tensor(t) and t.is_floating_point():
                num += float((t.double() - y[name].double()).square().sum())
                den += float(t.double().square().sum())
            elif torch.is_tensor(t):
                num += float((t != y[name]).sum())
    assert a["cur_nimg"] == b["cur_nimg"]
    return math.sqrt(num / max(den, 1e-30))


# Each family trained twice straight through (8 steps of 16 images) and once split (4 steps,
# checkpoint, resume, 4 more), in fp16 (scaler state included), with torch's deterministic
# algorithms (warn-only) and no cuDNN autotuning; kept for the export and eval tests.
HALF_KIMG = 0.064
_TRAINED: dict[str, dict] = {}


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, device, rgb_data, tmp_path_factory) -> dict:
    """The three runs of the family `request.param` (trained once per session, whoever asks first)."""
    family = request.param
    if family not in _TRAINED:
        _TRAINED[family] = train_three(family, device, rgb_data, tmp_path_factory.mktemp(f"trained-{family}"))
    return _TRAINED[family]


def train_three(family: str, device: torch.device, data: Path, root: Path) -> dict:
    common = ["speed.mixed_precision=fp16", "speed.cudnn_benchmark=false", f"train.tick_kimg={HALF_KIMG}",
              f"train.snapshot_kimg={HALF_KIMG}", f"train.checkpoint_kimg={HALF_KIMG}"]
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name in ("straight", "again"):
                train_cli(root / name, data, family, *common, f"train.total_kimg={2 * HALF_KIMG}")
            train_cli(root / "split", data, family, *common, f"train.total_kimg={HALF_KIMG}")
            train_cli(root / "split", data, family, *common, f"train.total_kimg={2 * HALF_KIMG}")
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    nondeterministic = sorted({str(w.message).split(" does not have a deterministic")[0] for w in caught
                               if "does not have a deterministic implementation" in str(w.message)})
    return {"family": family, "device": device, "runs": root, "nondeterministic": nondeterministic}


@pytest.mark.device
def test_resume_is_exact(trained, record_property):
    """A run split by a checkpoint ends where the uninterrupted run ends: bitwise, when two
    uninterrupted runs are bitwise equal to each other (deterministic algorithms available for every
    op used). Where an op has no deterministic CUDA kernel (atomics in a backward: torch names it,
    e.g. grid_sample's for ADA's geom), two uninterrupted runs differ by float reordering; then the
    resumed run may differ from the first by at most 10x what the second does. A resume that lost
    anything (an RNG, the data position, an optimizer or scaler state) differs by the size of a
    training step, orders of magnitude more."""
    runs = trained["runs"]
    straight, again, split = (final_state(runs / name) for name in ("straight", "again", "split"))
    floor, resumed = state_distance(straight, again), state_distance(straight, split)
    record_property("resume", {"run_to_run": floor, "resumed": resumed, "nondeterministic_ops": trained["nondeterministic"]})
    if floor == 0:
        assert resumed == 0, f"the resumed run differs from the straight one by {resumed:.3e} (relative L2)"
    else:
        assert resumed <= 10 * floor, (f"resumed {resumed:.3e} vs run-to-run {floor:.3e} (nondeterministic ops: "
                                       f"{trained['nondeterministic']})")
    assert final_state(runs / "split")["skipped"] == straight["skipped"]


@pytest.mark.device
def test_a_device_trained_snapshot_exports(trained, tmp_path):
    """ONNX and TorchScript of the newest snapshot (r3gan to ONNX: one line saying it cannot, see
    tests/test_export.py); the TorchScript file on the CPU gives the device generator's images
    (atol 1e-3: the device's and the CPU's convolutions, in fp32)."""
    from pipeline.cli import main
    from pipeline.export import example_inputs
    from pipeline.training.snapshot import list_snapshots, load_snapshot

    snap = list_snapshots(RunDir(trained["runs"] / "straight").snapshots)[-1]
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt")):
        status = main(["export", "--snapshot", str(snap), "--format", fmt, "--out", str(tmp_path / f"G{suffix}")])
        assert status == (2 if (trained["family"], fmt) == ("r3gan", "onnx") else 0), fmt
    G, _ = load_snapshot(snap, device=trained["device"])
    inputs = example_inputs(G, 3, seed=4)
    with torch.no_grad(), exact_arithmetic():
        labels = inputs[1] if G.num_classes else None
        noise = list(inputs[1 + bool(G.num_classes):])
        want = G.eval()(inputs[0].to(trained["device"]), None if labels is None else labels.to(trained["device"]),
                        noise=[n.to(trained["device"]) for n in noise]).float().cpu()
        got = torch.jit.load(str(tmp_path / "G.pt"))(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


@pytest.mark.device
def test_eval_on_the_device_gives_the_cpus_fid(device, tmp_path):
    """`ganpipe eval` of one device-trained snapshot (a DCGAN on grey 32 px images, what the bundled
    `mnist` extractor is made for) on the device and on the CPU, each with its own copy of the run
    and the data (so each computes its own reference statistics), with torch's flags as a user has
    them (cuDNN may use TF32 for convolutions): FID within 1e-3 relative, KID within 1e-2 relative,
    precision and recall within 3 of the 512 images."""
    from pipeline.data.prepare import prepare
    from pipeline.metrics.records import read_records
    from pipeline.training.snapshot import list_snapshots

    data = tmp_path / "grey"
    prepare(f"npz:{make_npz(tmp_path / 'grey.npz', 512, 32, channels=1, classes=CLASSES)}", data, shard_size=128,
            workers=1, progress=False)
    trained = tmp_path / "trained"
    train_cli(trained, data, "dcgan", f"train.total_kimg={2 * HALF_KIMG}", f"train.snapshot_kimg={HALF_KIMG}")
    values = {}
    for where in ("device", "cpu"):
        run, ref = tmp_path / f"run-{where}", tmp_path / f"data-{where}"
        shutil.copytree(trained, run)
        shutil.copytree(data, ref)
        snap = list_snapshots(RunDir(run).snapshots)[-1]
        dev = str(device) if where == "device" else "cpu"
        cli("eval", "--run-dir", str(run), "--snapshot", snap.name, "--extractor", "mnist", "--metrics", "fid,kid,pr",
            "--num-gen", "512", "--batch-size", "128", "--device", dev, "--data", str(ref))
        values[where] = {r["metric"]: r["value"] for r in read_records(run)}
    assert values["device"]["fid"] == pytest.approx(values["cpu"]["fid"], rel=1e-3)
    assert values["device"]["kid"] == pytest.approx(values["cpu"]["kid"], rel=1e-2, abs=1e-4)
    for name in ("precision", "recall"):
        assert values["device"][name] == pytest.approx(values["cpu"][name], abs=3 / 512), name


# ------------------------------------------------------------------------------------------------
# Every network family through the real phases, on the device against the CPU's fp32.

# Each phase runs from the same weights and inputs (a step would carry rounding into the next
# phase: Adam's first step moves a weight by lr whatever the size of its gradient). Compared with
# the CPU's fp32: each reported loss, |difference| / max(|value|, 1e-3), and the phase's gradients
# (all of its network's parameters), ||difference|| / max(||gradient||, ||gradient of its side's
# main phase||): a lazy penalty's gradient counts beside the main step's, from which Adam's second
# moment and so the size of every update come, and at initialisation r2's can be 1e-6 of it.
# fp32 differs only in summation order; bf16 keeps 8 bits of mantissa (0.4% per rounding), fp16
# 11 bits but underflows below 6e-8. On these untrained networks the sums cancel (a G gradient can
# be 1e-3 of its terms), which multiplies the relative error of a low precision: the CPU's own bf16
# stays within 0.1 on all but one case (0.19, the 64 px ResNet's G), its fp16 within 0.05 on all
# but four (up to 0.09). Where a case is beyond TOLERANCE, the device must do no worse than 2x the
# CPU's own arithmetic in that precision on the same case, plus TOLERANCE.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}
LOSS_FLOOR = 1e-3
BATCH = 4
G_PENALTY = {"stylegan2": "pl", "biggan": "ortho"}
LOSS = {"resnet": "hinge", "biggan": "hinge", "r3gan": "rpgan"}
NET_CASES = [(family, res, cond) for res in (32, 64, 256) for family in FAMILIES if res < 256 or family == "stylegan2"
             for cond in (False, True)]


def net_id(case) -> str:
    family, res, cond = case
    return f"{family}-{res}px-{'cond' if cond else 'uncond'}"


def phase_config(family: str, conditional: bool):
    """Tiny widths; r1 in D's main step, r2 every 2 D steps, wgan-gp every 4, the G penalty every 2 G steps."""
    penalties = [{"name": "r1", "weight": 1.0}, {"name": "r2", "weight": 1.0, "interval": 2},
                 {"name": "wgan-gp", "weight": 1.0, "interval": 4}]
    if family in G_PENALTY:
        penalties.append({"name": G_PENALTY[family], "weight": 2.0 if family == "stylegan2" else 1e-4, "interval": 2})
    return from_dict({"model": {"name": family, "g_width": 1 / 32, "d_width": 1 / 32, "w_dim": 16, "mapping_layers": 2,
                                "conditional": conditional, "attention_res": 16},
                      "loss": {"name": LOSS.get(family, "nonsaturating"), "penalties": penalties}})


def snapshot_state(nets, phases) -> tuple:
    return ([copy.deepcopy(n.state_dict()) for n in nets], copy.deepcopy(phases.penalty_state()))


def restore_state(nets, phases, saved) -> None:
    for n, state in zip(nets, saved[0]):
        n.load_state_dict(state)
    phases.load_penalty_state(saved[1])


def run_phases(case, device: torch.device, precision: str) -> dict:
    """Each phase of the case once, every one from the initial weights and on the same inputs:
    {phase: {"grads": CPU fp32 tensor, "losses": {name: value}, "tries": n}}. Under fp16 a step
    whose gradients overflow is skipped and its scale halved (GradScaler), as in training: the
    phase is then run again from the same state, and its first finite try is kept. Each step
    taken must leave finite weights."""
    family, res, cond = case
    cfg = phase_config(family, cond)
    torch.manual_seed(0)
    G, D = build_networks(cfg.model, resolution=res, channels=3, num_classes=CLASSES if cond else 0)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(BATCH, G.z_dim, generator=gen)
    real = torch.rand(BATCH, 3, res, res, generator=gen) * 2 - 1
    labels = torch.arange(BATCH) % CLASSES if cond else None
    with torch.no_grad(), host_random(2):
        fake = G(z, labels)                     # the same fakes for every run: made on the CPU in fp32
    G, D = G.to(device), D.to(device)
    if device.type != "cpu" or precision != "fp32":
        # The trainer's memory format (speed.channels_last), on every run but the reference.
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    dtype = DTYPES[precision]
    reports: dict[str, torch.Tensor] = {}
    phases = build_phases(cfg, G=G, D=D, device=device, dtype=dtype,
                          report=lambda name, value: reports.__setitem__(name, value.detach()))
    guard = NonFiniteGuard(1000, lambda: "none", lambda: 0.0)
    on = lambda t: None if t is None else t.to(device)      # noqa: E731
    initial = snapshot_state((G, D), phases)
    out = {}
    for i, phase in enumerate(phases):
        mb = (MicroBatch(z=on(z), labels=on(labels), real=on(real), fake=on(fake)) if phase.side == "D"
              else MicroBatch(z=on(z), labels=on(labels), real=on(real)))
        for tries in range(1, 31):
            restore_state((G, D), phases, initial)
            reports.clear()
            with host_random(10 + i):
                accumulate(phase, [mb], autocast_for(device, dtype))
            scale = phase.scaler.get_scale() if phase.scaler.is_enabled() else 1.0
            grads = torch.cat([(p.grad.float() / scale if p.grad is not None else torch.zeros_like(p)).flatten().cpu()
                               for p in phase.params])
            losses = {name: float(v.float()) for name, v in reports.items() if name.startswith("Loss/")}
            if bool(step(phase, guard, lambda name, value: None)):
                assert all(bool(torch.isfinite(p).all()) for p in phase.params), f"{phase.name}: non-finite weights"
                break
            assert precision == "fp16", f"{phase.name}: a non-finite step under {precision}"
        out[phase.name] = {"grads": grads, "losses": losses, "tries": tries}
    return out


@functools.lru_cache(maxsize=None)
def cpu_run(case, precision: str) -> dict:
    """The case's phases on the CPU, once per case and precision, on the cores this process may use
    (fp32 is the reference: no channels_last, as plain as it gets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(8, len(os.sched_getaffinity(0)))))
    try:
        return run_phases(case, CPU, precision)
    finally:
        torch.set_num_threads(threads)


def phase_errors(got: dict, want: dict) -> dict[str, dict[str, float]]:
    """Per phase: the gradients' and each loss's error against `want` (see TOLERANCE)."""
    norm = {name: float(phase["grads"].double().norm()) for name, phase in want.items()}
    out = {}
    for name, phase in got.items():
        scale = max(norm[name], norm[name[0]], 1e-30)          # name[0]: "D" or "G", the side's main phase
        errors = {"grads": float((phase["grads"].double() - want[name]["grads"].double()).norm()) / scale}
        for loss, value in phase["losses"].items():
            ref = want[name]["losses"][loss]
            errors[loss] = abs(value - ref) / max(abs(ref), LOSS_FLOOR)
        out[name] = errors
    return out


def beyond(errors: dict, allowed: Callable[[str, str], float]) -> dict:
    return {name: {k: round(v, 6) for k, v in e.items() if not v <= allowed(name, k)} for name, e in errors.items()
            if any(not v <= allowed(name, k) for k, v in e.items())}


@pytest.mark.device
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", NET_CASES, ids=net_id)
def test_phases_match_the_cpu(device, case, precision, record_property):
    with exact_arithmetic():
        want = cpu_run(case, "fp32")
        got = run_phases(case, device, precision)
    assert list(got) == list(want)
    for name, phase in got.items():
        assert torch.isfinite(phase["grads"]).all(), f"{name}: non-finite gradients under {precision}"
        assert all(math.isfinite(v) for v in phase["losses"].values()), f"{name}: {phase['losses']}"
        assert phase["losses"].keys() == want[name]["losses"].keys(), name
    errors = phase_errors(got, want)
    tol = TOLERANCE[precision]
    record_property("relative_error", {name: {k: float(f"{v:.3g}") for k, v in e.items()} | {"tries": got[name]["tries"]}
                                       for name, e in errors.items()})
    over = beyond(errors, lambda name, key: tol)
    if over and precision != "fp32":
        with exact_arithmetic():
            own = phase_errors(cpu_run(case, precision), want)     # the CPU's own arithmetic in this precision
        record_property("cpu_own_error", {name: {k: float(f"{v:.3g}") for k, v in e.items()} for name, e in own.items()})
        over = beyond(errors, lambda name, key: 2 * own[name][key] + tol)
        assert not over, f"beyond 2x the CPU's own {precision} error + {tol:g}: {over} (CPU's own: {own})"
    assert not over, f"beyond {tol:g} of the CPU's fp32: {over}"


# ------------------------------------------------------------------------------------------------
# tools/gpu_check.py on the CPU: not device tests, they run in CI.

GPU_CHECK = REPO / "tools" / "gpu_check.py"


def gpu_check(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full.pop("GANPIPE_TEST_DEVICE", None)
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    proc = gpu_check("--out", str(tmp_path / "report"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "report").exists()


def test_gpu_check_budget_runs_what_fits_and_names_the_rest():
    """The budget on a fake clock: a unit runs when its estimate fits what is left, a later cheaper
    one still may; a unit stopped at the deadline is reported so, and nothing runs after."""
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check as tool

    now = [0.0]
    budget = tool.Budget(100, clock=lambda: now[0])
    ran = []

    def measure(unit, deadline):
        assert deadline == pytest.approx(100)
        ran.append(unit)
        now[0] += {"a": 30, "c": 10, "d": 80}[unit]
        if now[0] > deadline:
            raise tool.OutOfBudget(f"{unit} stopped")
        return {"unit": unit}

    estimates = {"a": 20, "b": 90, "c": 10, "d": 40, "e": 1}
    results, skipped = tool.run_units(["a", "b", "c", "d", "e"], budget, measure, estimates.__getitem__)
    assert ran == ["a", "c", "d"] and [r["unit"] for r in results] == ["a", "c"]
    assert [(s["unit"], s["reason"]) for s in skipped] == [
        ("b", "needs about 90 s, 70 s left"), ("d", "stopped at the budget: d stopped"),
        ("e", "needs about 1 s, 0 s left")]
    assert budget.left() == 0 and budget.share(0.5) == 0


def test_gpu_check_dry_run_writes_the_report_and_names_what_it_skipped(tmp_path):
    """`--dry-run` on the CPU at toy size: a few device tests on the CPU, one toy benchmark, the
    loader at 64 and 256 px with a verdict each, the report in both formats, the directory named on
    the last line. A second dry run with a budget too small for anything skips everything, says so,
    and still writes its report."""
    out = tmp_path / "report"
    proc = gpu_check("--dry-run", "--budget-s", "900", "--out", str(out))   # room for a loaded machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"gpu-check: report in {out} (report.json, report.md)"
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] and report["environment"]["device"] == "cpu"
    suite = report["device_suite"]
    assert suite["counts"]["passed"] >= 3 and suite["counts"]["failed"] == 0, suite
    assert {t["outcome"] for t in suite["tests"]} == {"passed"}
    (unit,) = report["benchmarks"]["units"]
    assert unit["s_per_kimg"] > 0 and unit["images_per_s"] > 0 and unit["trainer_over_bare"] > 0
    assert {"speed.cudnn_benchmark", "speed.pin_memory"} <= {lever["key"] for lever in report["speed_levers"]}
    loader = report["loader"]
    assert [r["resolution"] for r in loader["resolutions"]] == [64, 256] and loader["skipped"] == []
    for entry in loader["resolutions"]:
        assert [w["workers"] for w in entry["workers"]] == loader["workers"][:len(entry["workers"])]
        assert entry["workers"] and all(w["images_per_s"] > 0 for w in entry["workers"])
    verdicts = [v["verdict"] for v in loader["verdicts"]]
    assert len(verdicts) == 2 and all(v.split(": ")[1].startswith(("loader keeps up with", "loader is the bottleneck"))
                                      for v in verdicts), verdicts
    assert all(v["gpu_images_per_s"] == max(unit["images_per_s"], unit["bare_images_per_s"]) for v in loader["verdicts"])
    md = (out / "report.md").read_text()
    assert "| test |" in md and unit["case"] in md
    assert "## Loader" in md and all(v in md for v in verdicts)

    small = tmp_path / "small"
    proc = gpu_check("--dry-run", "--budget-s", "1", "--out", str(small))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((small / "report.json").read_text())
    assert report["device_suite"]["skipped"].startswith("budget")
    assert report["benchmarks"]["units"] == [] and len(report["benchmarks"]["skipped"]) == 1
    assert report["loader"]["resolutions"] == [] and len(report["loader"]["skipped"]) == 2
    assert all("not measured, skipped" in v["verdict"] for v in report["loader"]["verdicts"])
    assert "skipped" in (small / "report.md").read_text()
