"""The speed levers a GPU needs, on the CPU: each off by default until `make gpu-check` measures it,
each equal to the plain path where it runs here; and gpu-check's verdict on the loader.

    .venv/bin/python -m pytest tests/test_speed_levers.py -q

`speed.pin_memory` pins only where there is a GPU; what runs here is everything around it: the
worker processes handing over tensors (for DataLoader's pin thread) instead of numpy arrays, the
choice of path, and the trainer passing the lever on. tests/test_device.py runs the pinned copies
themselves on a GPU (the same batches, no host synchronisation).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, make_npz
from pipeline.catalog import load_config
from pipeline.config import Config
from pipeline.data import loader as loader_module
from pipeline.data.loader import ShardSet, StreamLoader, to_device


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """96 random 8x8 RGB images with labels, in 3 shards."""
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("levers")
    prepare(f"npz:{make_npz(root / 'src.npz', 96, 8)}", root / "data", shard_size=32, workers=1, progress=False)
    return root / "data"


def test_the_unmeasured_levers_are_off_by_default():
    speed = Config().speed
    assert (speed.cudnn_benchmark, speed.pin_memory, speed.compile) == (False, False, "off")
    assert load_config(None, ["speed.pin_memory=true"]).speed.pin_memory is True


@pytest.mark.parametrize("workers", [0, 1])
def test_pin_memory_on_and_off_give_the_same_batches(shards, workers):
    """The same images, labels and stream state with the lever on and off, from the main process
    and from a worker (which then hands over tensors, the form DataLoader's pin thread pins)."""
    got = {}
    for pin in (False, True):
        ld = StreamLoader(ShardSet.resolve(str(shards)), batch_size=8, seed=3, rank=0, world_size=1,
                          num_workers=workers, shuffle_buffer=16, hflip=True, device="cpu", pin_memory=pin)
        assert ld.pin_memory is pin and ld.pinned is False         # no GPU here: nothing is pinned
        got[pin] = [ld.next() for _ in range(5)]
        raw = ld.next_raw()
        assert isinstance(raw["images"], torch.Tensor) == (pin and workers > 0)
        got[pin].append((torch.as_tensor(raw["images"]), torch.as_tensor(raw["labels"])))
        got[pin].append(ld.state_dict())
        ld.close()
    *batches_off, state_off = got[False]
    *batches_on, state_on = got[True]
    for (x0, y0), (x1, y1) in zip(batches_off, batches_on, strict=True):
        assert x0.dtype == x1.dtype and torch.equal(x0, x1) and torch.equal(y0, y1)
    assert repr(state_off) == repr(state_on)


class Recorded:
    """A stand-in tensor that records what is done to it."""

    def __init__(self, pinned: bool):
        self.pinned, self.calls = pinned, []

    def is_pinned(self) -> bool:
        return self.pinned

    def pin_memory(self) -> "Recorded":
        self.calls.append("pin_memory")
        self.pinned = True
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking))
        return self


@pytest.mark.parametrize("pinned,arrives_pinned,calls", [
    (False, False, [("to", "cuda", True)]),                     # pageable, still without a host wait
    (True, False, ["pin_memory", ("to", "cuda", True)]),        # no worker: pinned in the main process
    (True, True, [("to", "cuda", True)]),                       # pinned by DataLoader's pin thread
])
def test_the_copy_to_the_device_pins_only_when_asked_and_never_blocks(pinned, arrives_pinned, calls):
    t = Recorded(arrives_pinned)
    assert to_device(t, torch.device("cuda"), pinned) is t and t.calls == calls


@pytest.mark.parametrize("device,pin,pinned", [("cuda", True, True), ("cuda", False, False), ("cpu", True, False)])
def test_the_dataloader_pins_only_on_a_gpu_with_the_lever_on(shards, monkeypatch, device, pin, pinned):
    seen = {}

    def fake_loader(dataset, **kw):
        seen.update(kw)
        return []
    monkeypatch.setattr(loader_module, "DataLoader", fake_loader)
    ld = StreamLoader(ShardSet.resolve(str(shards)), batch_size=8, rank=0, world_size=1, num_workers=1,
                      device=device, pin_memory=pin)
    ld._start()
    assert ld.pinned is pinned and seen["pin_memory"] is pinned
    assert seen["collate_fn"] is (loader_module._collate_tensors if pin else loader_module._collate_identity)


def test_the_trainer_hands_the_lever_to_its_loader(shards):
    from pipeline.training.loop import open_loader

    session = SimpleNamespace(per_proc=8, rank=0, world=1, device=torch.device("cpu"), log=print)
    state = SimpleNamespace(progress=SimpleNamespace(cur_nimg=0))
    for value in (False, True):
        cfg = load_config(None, [f"data.path={shards}", "data.num_workers=0", f"speed.pin_memory={value}"])
        loader = open_loader(cfg, session, state, None)
        assert loader.pin_memory is value and loader.pinned is False


# ------------------------------------------------------------------------------------------------
# tools/gpu_check.py: the loader's section.

@pytest.fixture(scope="module")
def tool():
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check

    return gpu_check


def test_worker_counts_double_up_to_the_cpus():
    from pipeline.bench.loader import worker_counts

    assert worker_counts(1) == [1] and worker_counts(2) == [1, 2]
    assert worker_counts(6) == [1, 2, 4, 6] and worker_counts(16) == [1, 2, 4, 8, 16]


def test_the_loader_then_the_levers_run_after_the_first_precisions_cases(tool):
    args = tool.parse_args(["--cases", "r3gan32", "resnet32", "--precision", "bf16", "fp16"])
    units = tool.bench_units(args)
    assert units[:4] == [("r3gan32", "bf16", ()), ("resnet32", "bf16", ()), ("loader", 64, ()), ("loader", 256, ())]
    levers = [("resnet32", "bf16", (lever,)) for lever in tool.LEVERS]
    assert units[4:4 + len(levers)] == levers
    assert levers[:2] == [("resnet32", "bf16", ("speed.cudnn_benchmark=true",)),
                          ("resnet32", "bf16", ("speed.pin_memory=true",))]
    assert units[4 + len(levers):] == [("r3gan32", "fp16", ()), ("resnet32", "fp16", ())]
    assert all(u[0] != "loader" for u in tool.bench_units(tool.parse_args(["--loader-px"])))


def unit(case, trainer, bare, precision="bf16", levers=()):
    return {"case": case, "precision": precision, "levers": list(levers), "images_per_s": trainer,
            "bare_images_per_s": bare}


def scaling(px, *rates):
    return {"loader": True, "resolution": px, "workers": [{"workers": 1 << i, "images_per_s": r, "first_batch_s": 0.1}
                                                          for i, r in enumerate(rates)]}


def test_the_loader_verdict_compares_with_what_the_gpu_consumes(tool):
    """Per side: the fastest of trainer and bare loop among the benchmarks at that side (or the
    nearest side below, said to be an upper bound), the fewest workers that keep up, or the
    loader named as the bottleneck; a side that was skipped or had nothing to compare says so."""
    units = [unit("resnet32", 9000, 12000), unit("dcgan32", 15000, 14000), unit("stylegan2-256", 300, 420),
             {"case": "r3gan32", "precision": "bf16", "levers": [], "error": "RuntimeError: boom"}]
    loader = {"resolutions": [scaling(64, 4000, 8000, 16000, 20000), scaling(256, 150, 290, 400)],
              "skipped": [{"resolution": 128, "reason": "needs about 40 s, 3 s left"}]}
    v64, v128, v256 = tool.loader_verdicts(loader, units)
    assert v64["gpu_images_per_s"] == 15000 and v64["keeps_up_with_workers"] == 4
    assert v64["verdict"].startswith("64 px: loader keeps up with 4 workers (16000 img/s against the 15000 img/s "
                                     "consumed in dcgan32 bf16, trainer, at 32 px: an upper bound)")
    assert "data.num_workers=-1 gives 2 per GPU process: set 4" in v64["verdict"]
    assert v128["verdict"] == "128 px: loader not measured, skipped: needs about 40 s, 3 s left"
    assert v256["keeps_up_with_workers"] is None
    assert v256["verdict"] == ("256 px: loader is the bottleneck: 400 img/s of 420 (its best, with 4 workers; "
                               "consumed in stylegan2-256 bf16, bare loop)")

    (alone,) = tool.loader_verdicts({"resolutions": [scaling(64, 500)], "skipped": []}, [unit("stylegan2-256", 30, 40)])
    assert alone["verdict"] == "64 px: no benchmark at or below 64 px ran: nothing to compare the loader with"
    (one,) = tool.loader_verdicts({"resolutions": [scaling(256, 500)], "skipped": []}, [unit("stylegan2-256", 30, 40)])
    assert one["verdict"] == ("256 px: loader keeps up with 1 worker (500 img/s against the 40 img/s consumed in "
                              "stylegan2-256 bf16, bare loop)")


def test_bench_train_help_names_every_gpu_case():
    import argparse

    from pipeline.bench.train import CASES, CPU_CASES
    from pipeline.cli import bench_train_arguments

    p = argparse.ArgumentParser()
    bench_train_arguments(p)
    (cases,) = [a for a in p._actions if a.dest == "cases"]
    gpu = [c for c in CASES if c not in CPU_CASES]
    assert "r3gan32" in gpu and all(c in cases.help for c in gpu), cases.help
