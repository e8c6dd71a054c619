"""No host synchronisation in the hot loop: a training step issues no blocking read of a tensor
(`.item()`, `bool()`, `float()`, `.tolist()`, ...) except at tick and checkpoint boundaries.

Counted on CPU by wrapping the Tensor methods that copy a value to the host: two runs with the
same maintenance (one tick, one snapshot, one checkpoint, at the end) and 8 vs 24 G steps must
read the same number of values, and make the same number of tensors from Python data (a copy to
the device, which waits for it). On a GPU the same property is what
`torch.cuda.set_sync_debug_mode("error")` checks (tests/test_device.py); its first run on an H200
found StyleGAN2's blur filter made from a Python list in every forward, which these counts now see."""

import threading

import pytest
import torch

from pipeline.catalog import load_config
from pipeline.networks.base import separable_filter
from pipeline.training.loop import training_loop

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
# A tensor made from Python data (a list or a number) is a host-to-device copy on a GPU, which
# waits for the device: `make gpu-check` found StyleGAN2's blur filter built so in every forward.
# (The loader's batches come from arrays, copied by `to_device` with `non_blocking`: not counted.)
COPIES = ("tensor", "as_tensor")
PYTHON_DATA = (list, tuple, int, float, bool)


def count_reads(fn):
    main = threading.get_ident()
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in READS}
    saved_copies = {name: getattr(torch, name) for name in COPIES}

    def wrap(name, original, when=lambda *args: True):
        def counted(*args, **kwargs):
            if threading.get_ident() == main and when(*args):
                counts["n"] += 1
            return original(*args, **kwargs)
        return counted

    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(name, original))
    for name, original in saved_copies.items():
        setattr(torch, name, wrap(name, original, lambda data, *rest: isinstance(data, PYTHON_DATA)))
    try:
        fn()
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        for name, original in saved_copies.items():
            setattr(torch, name, original)
    return counts["n"]


RECIPE = ["loss.name=rpgan", "loss.penalties=[{name: r1, weight: 0.1, interval: 2}, {name: r2, weight: 0.1}]",
          "optim.lr_schedule={kind: cosine, end: 0.25}"]


@pytest.mark.parametrize("impl", [
    "fused",        # the default: a skip happens in the optimizer's kernel
    "for-loop",     # the control: the finite check is read per phase (and torch's own loop reads its step counts)
])
def test_steps_between_ticks_read_nothing_from_the_device(tmp_path, mnist_dir, impl):
    # relativistic G step, lazy R1 (every 2 D steps) and an every-step R2, a schedule, EMA ramp-up
    def run(steps: int, name: str) -> int:
        cfg = load_config("configs/mnist_dcgan.yaml", [
            f"data.path={mnist_dir}", "data.batch_size=16", "data.num_workers=0", "model.g_width=0.125",
            "model.d_width=0.125", f"train.total_kimg={steps * 16 / 1000}", "train.tick_kimg=1000",
            "train.snapshot_kimg=0", "train.checkpoint_kimg=0", "log.progress=false", "log.grid_size=4",
            "train.threads=1", f"optim.adam_impl={impl}", *RECIPE])
        return count_reads(lambda: training_loop(cfg, tmp_path / name))

    short, long = run(4, "short"), run(12, "long")
    assert short > 0                       # the wrapper sees the reads at the end (stats, checkpoint)
    per_step = (long - short) / 8
    if impl == "fused":
        assert per_step == 0, f"{per_step:.2f} host reads per extra G step"
    else:
        assert per_step >= 2.5, per_step       # D, G and every 2nd step Dreg: the counter sees them


# The families whose forwards filter (StyleGAN2's blur, R3GAN's resampling) and adaptive ADA, whose
# p moves every `ada_interval` D steps: the same counts, on networks too small to matter.
FAMILIES = {
    "stylegan2-ada": ["model.name=stylegan2", "model.w_dim=32", "model.mapping_layers=2",
                      "loss.penalties=[{name: r1, weight: 1, interval: 4}, {name: pl, weight: 2, interval: 2}]",
                      "augment.ada_groups=blit,geom,color", "augment.ada_target=0.6", "augment.ada_interval=2",
                      "augment.ada_speed_kimg=0.1"],
    "r3gan": ["model.name=r3gan", "model.conditional=true", "loss.name=rpgan",
              "loss.penalties=[{name: r1, weight: 0.1}, {name: r2, weight: 0.1}]",
              "augment.ada_groups=blit,geom,color", "augment.ada_target=0", "augment.ada_p=0.5"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_filtering_families_and_adaptive_ada_read_nothing_between_ticks(tmp_path, mnist_dir, family):
    def run(steps: int, name: str) -> int:
        cfg = load_config(None, [
            f"data.path={mnist_dir}", "data.batch_size=16", "data.num_workers=0", "model.g_width=0.0625",
            "model.d_width=0.0625", f"train.total_kimg={steps * 16 / 1000}", "train.tick_kimg=1000",
            "train.snapshot_kimg=0", "train.checkpoint_kimg=0", "log.progress=false", "log.grid_size=4",
            "train.threads=1", "ema.halflife_kimg=0.1", *FAMILIES[family]])
        separable_filter.cache_clear()      # each run builds its filters once, as a fresh process does
        return count_reads(lambda: training_loop(cfg, tmp_path / name))

    short, long = run(4, "short"), run(8, "long")
    assert short > 0
    assert long == short, f"{(long - short) / 4:.2f} host reads or host-to-device copies per extra G step"


def test_speed_levers_give_the_plain_path_results(tmp_path, mnist_dir):
    """channels_last, each Adam implementation, D's joint forward on cat(reals, fakes) and torch.compile of the main phases' forwards train
    to the same weights as the plain path (float summation order differs, so within a tolerance;
    their speed is measured with `ganpipe bench train --set ...`). The compiled path runs with
    the aot_eager backend, which traces G and D through dynamo and AOTAutograd as inductor does but
    needs no C++ compiler; the R1 phase stays eager (double backward)."""
    from safetensors.torch import load_file

    def weights(name: str, *extra: str) -> dict:
        cfg = load_config("configs/mnist_dcgan.yaml", [
            f"data.path={mnist_dir}", "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=0",
            "model.g_width=0.125", "model.d_width=0.125", "train.total_kimg=0.096", "train.tick_kimg=1000",
            "train.snapshot_kimg=0", "train.checkpoint_kimg=0", "log.progress=false", "log.grid_size=4",
            "train.threads=1", "loss.penalties=[{name: r1, weight: 1, interval: 2}]", *extra])
        training_loop(cfg, tmp_path / name)
        return load_file(next((tmp_path / name / "snapshots").glob("*.safetensors")))

    off = ["optim.adam_impl=for-loop", "speed.channels_last=false", "speed.joint_d_forward=false"]
    plain = weights("plain", *off)
    for name, extra in (("fused", [*off, "optim.adam_impl=fused"]),
                        ("foreach", [*off, "optim.adam_impl=foreach"]),
                        ("nhwc", [*off, "speed.channels_last=true"]),
                        ("joint", [*off, "speed.joint_d_forward=true"]),
                        ("compiled", [*off, "speed.compile=aot_eager"])):
        from torch._dynamo.utils import counters

        counters.clear()
        other = weights(name, *extra)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0 if name == "compiled" else graphs == 0, (name, graphs)   # compiled only when asked
        assert other.keys() == plain.keys()
        worst = max(float((other[k].float() - plain[k].float()).abs().max()) for k in plain)
        assert worst < 1e-5, (name, worst)     # measured: 0 (foreach), 7e-8 (fused), 1.5e-7 (nhwc), 9e-8 (joint)


def test_device_flags_are_set_on_a_gpu_only():
    """speed.cudnn_benchmark and speed.tf32 reach torch's backend flags on a CUDA device; a CPU run
    leaves them as they were."""
    from types import SimpleNamespace

    from pipeline.training.loop import device_flags

    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
        assert device_flags(torch.device("cpu"), SimpleNamespace(cudnn_benchmark=True, tf32=True)) == {}
        assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        out = device_flags(torch.device("cuda"), SimpleNamespace(cudnn_benchmark=True, tf32=True))
        assert out == {"cudnn_benchmark": True, "tf32": True}
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        device_flags(torch.device("cuda"), SimpleNamespace(cudnn_benchmark=False, tf32=False))
        assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_reuse_fakes_runs_G_once_per_step(tmp_path, mnist_dir, monkeypatch):
    """train.reuse_fakes: G's step trains on the fakes the D step made (PyTorch's DCGAN example), so
    G runs forward once per step (twice without); the run trains, and the lever refuses settings
    where there is no single D step's batch to reuse."""
    from pipeline.errors import ConfigError
    from pipeline.training import loop

    calls = {"n": 0}
    build = loop.build_networks

    def counting(*args, **kwargs):
        G, D = build(*args, **kwargs)
        # The EMA copy (deep-copied, hook included) is in eval mode: only the training G counts.
        G.register_forward_pre_hook(lambda module, inputs: calls.__setitem__("n", calls["n"] + module.training))
        return G, D

    monkeypatch.setattr(loop, "build_networks", counting)

    def forwards(name: str, *extra: str) -> int:
        calls["n"] = 0
        cfg = load_config("configs/mnist_dcgan.yaml", [
            f"data.path={mnist_dir}", "data.batch_size=16", "data.num_workers=0", "model.g_width=0.125",
            "model.d_width=0.125", "train.total_kimg=0.16", "train.tick_kimg=1000", "train.snapshot_kimg=0",
            "train.checkpoint_kimg=0", "log.progress=false", "log.grid_size=4", "train.threads=1",
            "loss.name=rpgan", "loss.penalties=[{name: r1, weight: 10, interval: 2}]", *extra])
        assert training_loop(cfg, tmp_path / name) == 0
        return calls["n"]

    # 10 G steps of 16 images.
    assert forwards("plain") == 20
    assert forwards("reuse", "train.reuse_fakes=true") == 10
    for bad in (["train.n_critic=2"], ["train.batch_per_process=8"]):
        with pytest.raises(ConfigError, match="train.reuse_fakes needs train.n_critic=1"):
            forwards("bad", "train.reuse_fakes=true", *bad)


def test_sync_debug_guards_the_steps_after_the_first_tick(tmp_path, mnist_dir, monkeypatch):
    """speed.sync_debug: on a GPU the steps between ticks run under torch's sync debug mode "error"
    (restored after each block of steps, even when one raises); the loop asks for it from the first
    tick of the process on, so warm-up steps are not checked. The CUDA calls are stood in for here:
    no GPU is lent to this machine."""
    from pipeline.training import loop

    modes = ["default"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))
    with loop.no_host_sync(torch.device("cuda"), True):
        assert modes[-1] == "error"
    assert modes == ["default", "error", "default"]
    with pytest.raises(RuntimeError), loop.no_host_sync(torch.device("cuda"), True):
        raise RuntimeError("a synchronising call")
    assert modes[-1] == "default"
    with loop.no_host_sync(torch.device("cpu"), True), loop.no_host_sync(torch.device("cuda"), False):
        assert modes[-1] == "default" and len(modes) == 5      # nothing set on a CPU or when off

    asked = []
    real = loop.no_host_sync
    monkeypatch.setattr(loop, "no_host_sync", lambda device, enabled: (asked.append(enabled), real(device, enabled))[1])
    cfg = load_config("configs/mnist_mlp.yaml", [
        f"data.path={mnist_dir}", "data.batch_size=16", "data.num_workers=0", "model.g_width=0.125",
        "model.d_width=0.125", "train.total_kimg=0.16", "train.tick_kimg=0.064", "train.snapshot_kimg=0",
        "train.checkpoint_kimg=0", "log.progress=false", "log.grid_size=4", "train.threads=1",
        "speed.sync_debug=true"])
    assert training_loop(cfg, tmp_path / "run") == 0
    # 10 G steps of 16 images; the first tick ends step 4 (at 64 images)
    assert asked == [False] * 4 + [True] * 6
