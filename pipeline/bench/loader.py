"""Streaming loader throughput vs a plain in-memory DataLoader over the same images.

    ganpipe bench loader [--batches 150] [--batch-size 64]

Two datasets are prepared into a temporary directory with the real `prepare`: the bundled MNIST
(5,000 x 1x28x28) and a synthetic 32x32 RGB set (5,000 smooth random images, PNG sizes close to
natural photos). For each, the shard loader runs with 0, 1 and 2 workers (shuffle buffer 1000,
decode + checks + float conversion included), next to `torch.utils.data.DataLoader` over a
`TensorDataset` of the already-decoded uint8 images with shuffling: the plain PyTorch way when
the data fits in memory. Reported: steady-state images/s after a warm-up, start-up seconds (first
batch, including the shuffle buffer fill) and the ratio to the in-memory loader; and the stream
once its decoded-pass cache (`data.cache_mb`) is warm, replaying later epochs without decoding.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.data.prepare import prepare




def smooth_rgb(n: int, res: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour noise: compresses like photos, unlike white noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (n, 3, res // 4, res // 4)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(res, res), mode="bicubic", align_corners=False)
    fine += torch.from_numpy(rng.normal(0, 6, fine.shape).astype(np.float32))
    return fine.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def time_iter(next_batch, batches: int) -> tuple[float, float]:
    """(first-batch seconds, steady images/s over `batches` after 10 warm-up batches)."""
    t0 = time.perf_counter()
    x, _ = next_batch()
    first = time.perf_counter() - t0
    for _ in range(10):
        next_batch()
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _ = next_batch()
        n += x.shape[0]
    return first, n / (time.perf_counter() - t0)


def in_memory_loader(data_dir: Path, batch_size: int):
    """Decode every shard sample once into a uint8 tensor, then a plain shuffled DataLoader."""
    shards = ShardSet.resolve(str(data_dir))
    total = sum(shards.num_samples)
    ld = StreamLoader(shards, batch_size=total, seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=0)
    raw = ld.next_raw()
    images = torch.from_numpy(raw["images"])
    labels = torch.from_numpy(raw["labels"])
    dl = DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True, drop_last=True,
                    generator=torch.Generator().manual_seed(0))

    def endless():
        while True:
            for x, y in dl:
                yield x.float().div_(127.5).sub_(1.0), y
    it = endless()
    return lambda: next(it)


def run(args: argparse.Namespace) -> dict:
    results = []
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "rgb32.npz", images=smooth_rgb(5000, 32), labels=np.zeros(5000, dtype=np.int64))
        sets = {"mnist-28x28x1": "mnist", "rgb-32x32x3": f"npz:{tmp / 'rgb32.npz'}"}
        for name, source in sets.items():
            out = tmp / name
            t0 = time.perf_counter()
            m = prepare(source, out, shard_size=500, workers=2, progress=False)
            prep_s = time.perf_counter() - t0
            plain_first, plain_ips = time_iter(in_memory_loader(out, args.batch_size), args.batches)
            entry = {"dataset": name, "images": m["splits"]["train"]["num_samples"],
                     "shards": len(m["splits"]["train"]["shards"]), "prepare_s": round(prep_s, 2),
                     "plain_in_memory": {"images_per_s": round(plain_ips), "first_batch_s": round(plain_first, 3)},
                     "stream": []}
            for w in args.workers:
                ld = StreamLoader(ShardSet.resolve(str(out)), batch_size=args.batch_size, seed=0, rank=0,
                                  world_size=1, num_workers=w, shuffle_buffer=1000, hflip=True)
                first, ips = time_iter(ld.next, args.batches)
                entry["stream"].append({"workers": w, "images_per_s": round(ips), "first_batch_s": round(first, 3),
                                        "ratio_to_plain": round(ips / plain_ips, 3)})
            # The decoded-pass cache (data.cache_mb): warm it with one epoch, then time replayed epochs.
            ld = StreamLoader(ShardSet.resolve(str(out)), batch_size=args.batch_size, seed=0, rank=0,
                              world_size=1, num_workers=0, shuffle_buffer=1000, hflip=True, cache_mb=256)
            for _ in range(m["splits"]["train"]["num_samples"] // args.batch_size + 20):
                ld.next()
            _, ips = time_iter(ld.next, args.batches)
            entry["stream_cached_0_workers"] = {"images_per_s": round(ips), "ratio_to_plain": round(ips / plain_ips, 3)}
            results.append(entry)
    return {"batch_size": args.batch_size, "timed_batches": args.batches, "shuffle_buffer": 1000,
            "results": results}
