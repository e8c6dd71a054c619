"""The evaluator: one run, one extractor, one reference and one protocol; many snapshots.

    ev = Evaluator(RUN, metrics=["fid", "kid"], extractor="mnist")   # every process builds one
    for meta in ev.pending():                                        # snapshots not yet scored
        ev.record(ev.score(meta["json_path"]))                       # score on all, record on rank 0
    ev.close()

Scoring a snapshot: load the EMA generator (safetensors + JSON, no code executed, sha256 checked),
generate N images with `pipeline.generate` (image i depends only on the seed and i, so neither the
batch size nor the number of processes changes which images are scored; labels i % num_classes
for conditional models), quantise them to uint8 as a saved PNG would be, extract features with
clean-fid's clean resize, and score them against the reference statistics of the run's data
(`refstats.py`, computed on first use). With several processes each generates every world_size-th
batch and rank 0 gathers the features, scores and writes (`records.py`). `ganpipe eval` and
`ganpipe watch` (`commands.py`) both drive it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import dist, generate
from pipeline.data.manifest import MANIFEST
from pipeline.errors import DataError, SnapshotError, UserError
from pipeline.metrics.features import Extractor, get_extractor
from pipeline.metrics.fid import METRICS
from pipeline.metrics.records import append_records, plot_metrics, protocol_key, read_records, write_best
from pipeline.metrics.refstats import RefStats, reference_stats
from pipeline.training.snapshot import list_snapshots, load_snapshot, read_snapshot_meta


def generated_features(G: torch.nn.Module, extractor: Extractor, *, num: int, batch_size: int, seed: int
                       ) -> np.ndarray | None:
    """Features of images 0..num-1 of `seed`; rank r does batches r, r+world, ... (batches rounded
    up to whole micro-batches of `pipeline.generate`, so none is computed twice); the whole array
    on rank 0, None elsewhere."""
    if getattr(G, "resolution", 0) == 0:
        raise UserError("this snapshot's generator makes flat vectors (resolution 0), not images: "
                        "FID/KID need images")
    step = generation_batch(batch_size)
    mine = []
    for b in range(dist.rank(), math.ceil(num / step), dist.world_size()):
        start = b * step
        x = generate.images(G, seed=seed, start=start, count=min(step, num - start), device=extractor.device,
                            batch=step)
        mine.append((b, extractor(generate.to_uint8(x))))
    parts = dist.gather_objects(mine)
    if parts is None:
        return None
    batches = sorted((b, f) for part in parts for b, f in part)
    return np.concatenate([f for _, f in batches])


def generation_batch(batch_size: int) -> int:
    """--batch-size rounded up to whole micro-batches of `pipeline.generate` (250 -> 256)."""
    return math.ceil(batch_size / generate.MICRO_BATCH) * generate.MICRO_BATCH


class Evaluator:
    """Scores snapshots of one run under one protocol; all processes call `score`, rank 0 records."""

    def __init__(self, run_dir: str | Path, *, metrics: list[str], extractor: str, num_gen: int | None = None,
                 split: str = "train", seed: int = 0, batch_size: int = 250, device: str | None = None,
                 inception_weights: str | None = None, data: str | Path | None = None,
                 log: Callable[[str], None] = print):
        from pipeline.catalog import load_config

        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.yaml").is_file():
            raise UserError(f"{self.run_dir}: not a run directory (no config.yaml; `ganpipe train` writes it)")
        cfg = load_config(self.run_dir / "config.yaml")
        self.data_dir = Path(data or cfg.data.path).expanduser()
        if not (self.data_dir / MANIFEST).is_file():
            raise UserError(f"reference data {self.data_dir} (data.path of {self.run_dir / 'config.yaml'}) has no "
                            f"{MANIFEST}: reference statistics need a directory made by `ganpipe prepare`; "
                            "pass --data DIR")
        if seed < 0:
            raise UserError(f"--seed {seed}: must be >= 0")
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be at least 1")
        self.metrics = metrics
        self.split, self.seed = split, seed
        self.batch_size = generation_batch(batch_size)
        self.device = dist.init_process_group(dist.default_device(device))
        self.rank, self.world = dist.rank(), dist.world_size()
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.extractor = get_extractor(extractor, self.device, inception_weights)
        self.num_gen = num_gen or self.extractor.default_num_gen
        if self.num_gen < 2:
            raise UserError(f"--num-gen {self.num_gen}: FID/KID need at least 2 generated images")
        # Rank 0 alone needs the reference (it scores); the others only generate.
        self.ref: RefStats | None = dist.on_main(lambda: reference_stats(
            self.data_dir, split, self.extractor, batch_size=batch_size, log=self.log),
            (UserError, DataError, FileNotFoundError))
        if self.ref is not None and min(self.ref.num, self.num_gen) <= self.extractor.dim:
            self.log(f"warning: {min(self.ref.num, self.num_gen)} samples for {self.extractor.dim}-d features: "
                     "the covariance is singular and FID is unreliable (use more images)")
        self._writer = None

    def protocol(self) -> dict:
        """The fields that make a score comparable; stored with every record."""
        assert self.ref is not None
        return {**self.extractor.protocol(), "num_gen": self.num_gen, "seed": self.seed,
                "seeding": generate.SEEDING,
                "reference": {"data": str(self.data_dir.resolve()), "split": self.split, "num": self.ref.num,
                              "manifest_sha256": self.ref.meta["manifest_sha256"]}}

    def _keys(self, sha: str) -> set[tuple]:
        proto = self.protocol()
        return {(sha, protocol_key({**proto, "metric": m})) for m in self.metrics}

    def pending(self) -> list[dict]:
        """Records (unchecked JSON) of complete snapshots not yet scored under this protocol, oldest first."""
        done = {(r["snapshot_sha256"], protocol_key(r)) for r in read_records(self.run_dir)}
        out = []
        for path in list_snapshots(self.run_dir / "snapshots"):
            try:
                meta = read_snapshot_meta(path, check_hash=False)
            except SnapshotError:
                continue                 # weights missing or record unreadable: not a complete snapshot
            if not self._keys(meta["sha256"]) <= done:
                out.append(meta)
        return out

    def score(self, snapshot: str | Path) -> list[dict]:
        """Score one snapshot (sha256 checked); records on rank 0, [] on other ranks."""
        t0 = time.perf_counter()
        G, meta = load_snapshot(snapshot, device=self.extractor.device)
        t1 = time.perf_counter()
        feats = generated_features(G, self.extractor, num=self.num_gen, batch_size=self.batch_size, seed=self.seed)
        gen_s = time.perf_counter() - t1
        if self.rank != 0:
            return []
        assert feats is not None and self.ref is not None and len(feats) == self.num_gen
        records = []
        for metric in self.metrics:
            t2 = time.perf_counter()
            value, extra = METRICS.get(metric)(feats, self.ref, self.seed)
            records.append({
                "name": f"{metric}_{self.extractor.name}", "metric": metric, "value": value,
                "snapshot": Path(meta["json_path"]).stem, "snapshot_sha256": meta["sha256"],
                "cur_nimg": meta["cur_nimg"], "kimg": meta["kimg"], **self.protocol(), **extra,
                "labels": "balanced (i % num_classes)" if G.num_classes else "none",
                "seconds": round(time.perf_counter() - t2 + gen_s + (t1 - t0), 3),
                "generate_featurize_s": round(gen_s, 3), "images_per_s": round(self.num_gen / max(gen_s, 1e-9), 1),
                "batch_size": self.batch_size, "world_size": self.world, "device": str(self.extractor.device),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        return records

    def record(self, records: list[dict]) -> None:
        """Append to metrics.jsonl, then refresh best.json, TensorBoard and metrics.png (rank 0)."""
        if self.rank != 0 or not records:
            return
        append_records(self.run_dir, records)
        everything = read_records(self.run_dir)
        write_best(self.run_dir, everything)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"), filename_suffix=".eval")
        for r in records:
            self._writer.add_scalar(f"Metrics/{r['name']}", r["value"], global_step=r["cur_nimg"])
        self._writer.flush()
        plot_metrics(self.run_dir, everything)
        for r in records:
            ref = r["reference"]
            self.log(f"{r['snapshot']} kimg {r['kimg']:g}: {r['name']} {r['value']:.6g} "
                     f"({r['num_gen']} generated vs {ref['split']} {ref['num']}, {r['seconds']:.1f} s)")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
