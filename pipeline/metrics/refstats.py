"""Reference statistics of a prepared data split: feature mean, covariance and a feature sample.

    ganpipe refstats data/mnist --split train --extractor mnist
    ganpipe refstats data/ffhq --extractor inception --inception-weights ~/weights/inception-2015-12-05.pt
    ganpipe refstats data/ffhq --extractor vgg16 --weights ~/weights --num-real all   # pr50k3's real side

Computed once and cached beside the data as

    DATA_DIR/refstats/{split}-{extractor}-{resize}-{split_sha256[:12]}.npz           # --num-real 10000
    DATA_DIR/refstats/{split}-{extractor}-{resize}-{split_sha256[:12]}-real{R}.npz   # any other (R: N or all)

(`mu`, `sigma` as clean-fid computes them from every image, `feats`: the float32 features of a
seeded random sample of at most R images (`--num-real`, default `SAMPLE_MAX`; `all`: every image),
for KID, precision/recall and density/coverage; `meta` JSON with the protocol: N, the sample's
size, cap and seed, extractor weights hash, the manifest's and the split's hashes, seconds). The key is the split's data as the manifest
lists it (`manifest.split_sha256`: its shards' sizes and sha256), and every shard is checked
against those before its images are read, so the statistics are of exactly that data: a shard
replaced under an unchanged manifest is an error, never a cache of other images under the
manifest's name. A new `prepare` changes the shards' hashes and so the key; a retrained
extractor is caught by the weights hash stored inside. The file is written
atomically (temp file + rename). Where the data directory is read-only the cache goes to
`$XDG_CACHE_HOME/ganpipe/refstats/` (default `~/.cache`). `ganpipe eval` calls `reference_stats`
and so computes them on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.data.manifest import check_shard, manifest_hash, read_manifest, split_sha256
from pipeline.data.splits import iter_split
from pipeline.errors import UserError
from pipeline.metrics.features import Extractor
from pipeline.io import atomic_path
from pipeline.metrics.fid import feature_stats

CACHE_SUBDIR = "refstats"
VERSION = 2             # of how the statistics are computed; a cached file of another version is redone
SAMPLE_MAX = 10_000     # real features kept for KID and the k-NN metrics unless --num-real says (Naeem et al.: 10k)
SAMPLE_SEED = 0         # of the choice of those images


@dataclass
class RefStats:
    mu: np.ndarray          # (D,) in the features' dtype (float32), as clean-fid keeps it
    sigma: np.ndarray       # (D, D) float64
    feats: np.ndarray       # (min(N, sample_max), D) float32: a seeded sample, for KID and the k-NN metrics
    meta: dict              # protocol: data, split, num, sample_num, extractor, resize, manifest_sha256, seconds
    path: Path | None = None
    knn_radii: dict = field(default_factory=dict, repr=False)   # k -> radii of `feats`, filled by the k-NN metrics

    @property
    def num(self) -> int:
        """Images the mean and covariance were computed from (the whole split)."""
        return int(self.meta["num"])

    @property
    def sample_num(self) -> int:
        return int(self.feats.shape[0])


# ---------------------------------------------------------------------------------------------
# Computing and caching.

def _cap(sample_max: int | None) -> str:
    """The real-sample cap as written in file names and meta: a number, or "all"."""
    return "all" if sample_max is None else str(int(sample_max))


def cache_name(data_dir: str | Path, split: str, extractor: Extractor, sample_max: int | None = SAMPLE_MAX) -> str:
    m = read_manifest(data_dir)
    if split not in m["splits"]:
        raise UserError(f"{data_dir}: no split '{split}' in the manifest (has: {', '.join(m['splits'])}); "
                        "choose --split, or re-prepare with --holdout N for a test split")
    real = "" if sample_max == SAMPLE_MAX else f"-real{_cap(sample_max)}"
    return f"{split}-{extractor.name}-{extractor.resize}-{split_sha256(m, split)[:12]}{real}.npz"


def cache_paths(data_dir: str | Path, split: str, extractor: Extractor, sample_max: int | None = SAMPLE_MAX
                ) -> list[Path]:
    """Where the stats may live: beside the data first, then the user cache (read-only data)."""
    name = cache_name(data_dir, split, extractor, sample_max)
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ganpipe" / CACHE_SUBDIR
    return [Path(data_dir) / CACHE_SUBDIR / name, user / name]


def compute_refstats(data_dir: str | Path, split: str, extractor: Extractor, *, batch_size: int = 250,
                     sample_max: int | None = SAMPLE_MAX) -> RefStats:
    """Features of every image of the split, then clean-fid-style mean and covariance, and a
    seeded sample of `sample_max` of them (None: all). Every shard of the split must be the
    manifest's (size and sha256), or a `DataError` says which."""
    t0 = time.perf_counter()
    m = read_manifest(data_dir)
    if split in m["splits"]:               # else iter_split names the splits there are
        for shard in m["splits"][split]["shards"]:
            check_shard(data_dir, shard)
    feats = np.concatenate([extractor(images) for images, _ in iter_split(data_dir, split, batch_size)])
    mu, sigma = feature_stats(feats)
    size = len(feats) if sample_max is None else min(len(feats), sample_max)
    sample = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(feats), size, replace=False))
    seconds = time.perf_counter() - t0
    meta = {"refstats_version": VERSION, "data": str(Path(data_dir).resolve()), "split": split,
            "num": int(len(feats)), "sample_num": int(len(sample)), "sample_max": _cap(sample_max),
            "sample_seed": SAMPLE_SEED,
            "manifest_sha256": manifest_hash(data_dir), "split_sha256": split_sha256(m, split),
            **extractor.protocol(),
            "seconds": round(seconds, 3), "images_per_s": round(len(feats) / max(seconds, 1e-9), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return RefStats(mu, sigma, np.asarray(feats[sample], np.float32), meta)


def save_refstats(stats: RefStats, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, feats=stats.feats, meta=np.array(json.dumps(stats.meta)))
    stats.path = path
    return path


def load_refstats(path: str | Path) -> RefStats:
    with np.load(path, allow_pickle=False) as z:
        return RefStats(z["mu"], z["sigma"], z["feats"], json.loads(str(z["meta"])), Path(path))


def reference_stats(data_dir: str | Path, split: str, extractor: Extractor, *, batch_size: int = 250,
                    force: bool = False, log: Callable[[str], None] = print, sample_max: int | None = SAMPLE_MAX
                    ) -> RefStats:
    """The cached statistics for (data, split, extractor, real-sample cap `sample_max`: None for
    the whole split), computing and caching them if needed."""
    paths = cache_paths(data_dir, split, extractor, sample_max)
    if not force:
        for path in paths:
            if not path.is_file():
                continue
            try:
                stats = load_refstats(path)
            except (OSError, ValueError, KeyError) as exc:
                log(f"refstats: {path} is unreadable ({exc}); recomputing")
                continue
            if stats.meta.get("refstats_version") != VERSION:
                log(f"refstats: {path} was made by another ganpipe version; recomputing")
            elif stats.meta.get("extractor_sha256") != extractor.weights_sha256:
                log(f"refstats: {path} was made with other {extractor.name} weights; recomputing")
            elif stats.meta.get("sample_max", _cap(SAMPLE_MAX)) != _cap(sample_max):
                log(f"refstats: {path} holds a sample of another size; recomputing")
            else:
                return stats
    log(f"refstats: computing {extractor.name} features of {data_dir} split '{split}' ...")
    stats = compute_refstats(data_dir, split, extractor, batch_size=batch_size, sample_max=sample_max)
    for path in paths:
        try:
            save_refstats(stats, path)
            break
        except OSError as exc:           # read-only data directory: use the user cache
            log(f"refstats: cannot write {path} ({exc.strerror}); trying the user cache")
    log(f"refstats: {stats.num} images in {stats.meta['seconds']:.1f} s -> {stats.path}")
    return stats


# ---------------------------------------------------------------------------------------------
# `ganpipe refstats DATA_DIR [--split train|test] [--extractor NAME]`

def refstats_command(args: argparse.Namespace) -> int:
    from pipeline.metrics.features import get_extractor

    read_manifest(args.data_dir)                       # a clear error before loading any network
    from pipeline.dist import default_device

    ext = get_extractor(args.extractor, default_device(args.device), args.inception_weights)
    stats = reference_stats(args.data_dir, args.split, ext, batch_size=args.batch_size, force=args.force,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True),
                            sample_max=getattr(args, "num_real", SAMPLE_MAX))
    print(json.dumps({"path": str(stats.path), **stats.meta}, indent=2))   # stdout: JSON only
    return 0
