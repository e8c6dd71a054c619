"""ganpipe from Python, without the CLI: load a snapshot's generator, sample it, read a run's scores.

    import pipeline as ganpipe

    gen = ganpipe.load_generator("runs/mnist/snapshots/snapshot-000100032.json", device="cpu")
    x = gen.sample(16, seed=0)                # float32 (16, C, H, W) in [-1, 1], on the CPU
    u8 = gen.sample_uint8(16, seed=0)         # uint8 (16, H, W, C): what the PNGs hold
    gen.save(64, "grid.png", seed=0)          # the grid `ganpipe sample --num 64 --seed 0` writes
    x = gen.sample(8, labels=[3, 1, 4, 1, 5, 9, 2, 6])   # conditional: one class per image

    ganpipe.read_metrics("runs/mnist")        # every score of RUN/metrics.jsonl, as dicts
    ganpipe.best_snapshot("runs/mnist")       # Path of the best snapshot's .json (FID unless told)
    ganpipe.latest_snapshot("runs/mnist")     # Path of the newest snapshot's .json
    gen = ganpipe.load_generator("best", run_dir="runs/mnist")    # best, latest or a snapshot's name
    ganpipe.best_snapshot("runs/mnist", protocol={"num_gen": 1000, "split": "test"})   # another protocol's best

Images follow the seeding convention of `ganpipe sample` and `ganpipe eval` (`pipeline.generate`):
image i of seed S is made from (S, i) alone, so `gen.sample(n, seed=S, start=k)` returns the very
bits that `ganpipe sample --seed S --start k` writes (uint8 after `to_uint8`), whatever `n` or the
batch. Labels: None gives the balanced i % num_classes of the CLI, an int is `--label`, and a list
gives image start+j the class labels[j], computed exactly as `--label labels[j]` would compute it.
Loading executes no code: `load_snapshot` reads safetensors and checks the weights' sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from pipeline.errors import SnapshotError, UserError
from pipeline.generate import MICRO_BATCH, images, save_grid, save_pngs, to_uint8, truncation
from pipeline.metrics.records import best_of, current_series, main_protocol, read_lines, read_records, scores
from pipeline.training.snapshot import load_snapshot
from pipeline.rundir import RunDir

Labels = int | Iterable[int] | torch.Tensor | np.ndarray | None


class Generator:
    """A snapshot's EMA generator (`module`, in eval mode, gradients off) with the convention's sampler."""

    def __init__(self, module: torch.nn.Module, meta: dict):
        self.module, self.meta = module, meta
        self.family: str = meta["model"]["name"]
        self.z_dim: int = module.z_dim
        self.num_classes: int = module.num_classes
        self.resolution: int = module.resolution
        self.channels: int = module.channels
        self.kimg: float = float(meta.get("kimg", meta["cur_nimg"] / 1000))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __repr__(self) -> str:
        shape = f"{self.channels}x{self.resolution}x{self.resolution}" if self.resolution else f"{self.channels}"
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return f"<ganpipe Generator {self.family} {shape}{classes}, kimg {self.kimg:g}, on {self.device}>"

    def sample(self, n: int, seed: int = 0, labels: Labels = None, psi: float = 1.0, start: int = 0,
               cutoff: int | None = None, batch: int = 256) -> torch.Tensor:
        """Images start..start+n-1 of `seed`: float32 on the CPU, (n, C, H, W) in [-1, 1] (flat data:
        (n, C)). `psi`, `cutoff`: truncation, as `ganpipe sample --psi --cutoff`; `batch` changes
        nothing but speed and memory."""
        if n < 0:
            raise UserError(f"n = {n}: the number of images must be >= 0")
        truncation(self.module, psi, cutoff)      # a psi this G cannot apply is refused before any work
        kw = dict(seed=seed, batch=batch, psi=psi, cutoff=cutoff)
        if labels is None or isinstance(labels, (int, np.integer)):
            return images(self.module, start=start, count=n, label=None if labels is None else int(labels), **kw)
        per_image = [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
        if len(per_image) != n:
            raise UserError(f"labels: {len(per_image)} given for {n} images (one per image, an int, or None)")
        if not self.num_classes:
            raise UserError("labels given but the generator is unconditional (no classes)")
        bad = [v for v in per_image if not 0 <= v < self.num_classes]
        if bad:
            raise UserError(f"label {bad[0]} outside 0..{self.num_classes - 1} "
                            f"(the generator has {self.num_classes} classes)")
        out = None
        for label in sorted(set(per_image)):
            # Per class, the micro-batches holding its images, each computed whole as `--label` does:
            # then image i is the same bits as in `ganpipe sample --label`, not a mix-dependent one.
            mine = [j for j, v in enumerate(per_image) if v == label]
            for block in sorted({(start + j) // MICRO_BATCH for j in mine}):
                lo = block * MICRO_BATCH
                x = images(self.module, start=lo, count=MICRO_BATCH, label=label, **kw)
                if out is None:
                    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype)
                for j in mine:
                    if lo <= start + j < lo + MICRO_BATCH:
                        out[j] = x[start + j - lo]
        return out if out is not None else images(self.module, start=start, count=0, **kw)

    def sample_uint8(self, n: int, seed: int = 0, labels: Labels = None, psi: float = 1.0, start: int = 0,
                     cutoff: int | None = None, batch: int = 256) -> np.ndarray:
        """As `sample`, rounded to uint8 as every PNG ganpipe writes: (n, H, W, C), the layout of
        image files (PIL: `Image.fromarray(u8[i].squeeze())`); flat data: (n, C)."""
        u8 = to_uint8(self.sample(n, seed=seed, labels=labels, psi=psi, start=start, cutoff=cutoff, batch=batch))
        return np.ascontiguousarray(u8.transpose(0, 2, 3, 1)) if u8.ndim == 4 else u8

    def save(self, n: int, path: str | Path, seed: int = 0, labels: Labels = None, psi: float = 1.0,
             start: int = 0, cutoff: int | None = None) -> Path:
        """Write images start..start+n-1 as `ganpipe sample` does: a PATH ending in .png gets one grid,
        any other PATH becomes a directory of PNGs named by image index. Returns PATH."""
        if not self.resolution:
            raise UserError("this generator makes flat vectors (resolution 0), not images: nothing to save as PNG")
        path = Path(path)
        x = self.sample(n, seed=seed, labels=labels, psi=psi, start=start, cutoff=cutoff)
        if path.suffix.lower() == ".png":
            save_grid(x, path)
        else:
            save_pngs(x, path, start=start)
        return path


def load_generator(snapshot: str | Path | None = None, device: str | torch.device = "cpu",
                   run_dir: str | Path | None = None) -> Generator:
    """The EMA generator of a snapshot (its .json or .safetensors; or, with `run_dir`, "best",
    "latest" (the default) or a snapshot's name in that run), on `device`. The weights are
    safetensors checked against the record's sha256; nothing is unpickled."""
    module, meta = load_snapshot(resolve_snapshot(snapshot, run_dir), device=device)
    return Generator(module, meta)


def read_metrics(run_dir: str | Path, name: str | None = None) -> list[dict]:
    """The complete records of RUN/metrics.jsonl, oldest first (each: name, metric, value, snapshot,
    cur_nimg, kimg and the protocol it was scored under), optionally only those of one metric
    `name` ("fid_mnist") or metric ("fid")."""
    records = read_records(run_dir)
    return records if name is None else [r for r in records if name in (r["name"], r["metric"])]


def best_snapshot(run_dir: str | Path, metric: str | None = None, protocol: dict | None = None) -> Path:
    """Path of the .json of the run's best snapshot under `metric`, by the rule of `ganpipe eval`'s
    best.json (lowest FID/KID, highest precision/recall/...). `metric` is a name ("fid_mnist") or a
    metric ("fid"); default: FID, or the run's only metric. The series is the run's main protocol
    (docs/evaluation.md) unless `protocol` names another by its fields, e.g. {"num_gen": 1000,
    "split": "test"} (record fields, and those of its "reference": split, num, data): the newest
    protocol whose scores have all of them."""
    run_dir = Path(run_dir)
    lines = read_lines(run_dir)
    records, main = scores(lines), main_protocol(run_dir, lines)
    if protocol is not None:
        records = [r for r in records if all(_field(r, k) == v for k, v in protocol.items())]
        main = {}
        if not records:
            raise UserError(f"{run_dir}: no scores in metrics.jsonl with {protocol}; the protocols there: "
                            f"{_protocols(scores(lines))}")
    series = current_series(records, main)
    if not series:
        raise UserError(f"{run_dir}: no scores in metrics.jsonl; score the snapshots first "
                        f"(`ganpipe eval --run-dir {run_dir} --all`)")
    if metric is None:
        names = list(series) if len(series) == 1 else [n for n, s in series.items() if s[0]["metric"] == "fid"]
    else:
        names = [metric] if metric in series else [n for n, s in series.items() if s[0]["metric"] == metric]
    if len(names) != 1:
        what = "metric" if metric is None else f"metric {metric!r}"
        raise UserError(f"{run_dir}: {'no' if not names else 'more than one'} series for {what}; "
                        f"choose one of {', '.join(series)} (best_snapshot(run_dir, metric=NAME))")
    best = best_of(series[names[0]])
    path = RunDir(run_dir).snapshot(best['snapshot'])
    if not path.is_file():
        raise SnapshotError(f"{path}: the best snapshot under {names[0]} is gone (moved or deleted)")
    return path


def latest_snapshot(run_dir: str | Path) -> Path:
    """Path of the .json of the run's newest snapshot."""
    from pipeline.training.snapshot import list_snapshots

    found = list_snapshots(RunDir(run_dir).snapshots)
    if not found:
        raise UserError(f"{run_dir}: no snapshots yet in {RunDir(run_dir).snapshots} (training writes them "
                        "every train.snapshot_kimg)")
    return found[-1]


def resolve_snapshot(snapshot: str | Path | None, run_dir: str | Path | None = None) -> Path:
    """The snapshot record a command or the API means: with `run_dir`, `snapshot` is best, latest
    (the default) or a name in it (`snapshot-000040000`); without, the path of a snapshot's .json or
    .safetensors. A run directory or a checkpoint given as a snapshot is an error that says what to
    pass instead."""
    if run_dir is not None:
        which = str(snapshot or "latest")
        if which == "best":
            return best_snapshot(run_dir)
        if which == "latest":
            return latest_snapshot(run_dir)
        for path in (RunDir(run_dir).snapshot(which), RunDir(run_dir).snapshots / which, Path(which)):
            if path.is_file():
                return path
        raise UserError(f"snapshot {which} not found in {RunDir(run_dir).snapshots}; pass best, latest or a name "
                        "listed there")
    if snapshot is None:
        raise UserError("no snapshot given: pass --snapshot FILE.json, or --run RUN (its latest snapshot; "
                        "--snapshot best|latest|NAME chooses)")
    path = Path(snapshot)
    if path.is_dir() and (RunDir(path).snapshots.is_dir() or RunDir(path).config.is_file()):
        raise UserError(f"{path} is a run directory, not a snapshot: pass --run {path} (and --snapshot "
                        "best|latest|NAME), or one of its snapshots/*.json")
    if path.is_dir() and (path / "state.pt").is_file():
        raise UserError(f"{path} is a training checkpoint (the full state, for resuming), not a snapshot: pass "
                        f"--run {path.parent.parent} --snapshot latest, or a .json from its run's snapshots/")
    return path


def _field(record: dict, key: str):
    return record[key] if key in record else record.get("reference", {}).get(key)


def _protocols(records: list[dict]) -> str:
    seen = dict.fromkeys((r["name"], r["num_gen"], r["reference"]["split"], r["seed"]) for r in records)
    return "; ".join(f"{n}: num_gen {g}, split {s}, seed {sd}" for n, g, s, sd in seen) or "none"


__all__ = ["Generator", "load_generator", "read_metrics", "best_snapshot"]
