"""`ganpipe prepare`: turn an image collection into webdataset shards plus a manifest.

    ganpipe prepare --source mnist --out data/mnist --holdout 1000
    ganpipe prepare --source folder:~/photos --out data/photos --resolution 64 --shard-size 5000

Items are shuffled once with `--seed` (so every shard is a random sample of the data, which is
what a streaming loader needs), resized and centre-cropped to a square, and encoded as lossless
PNG by a pool of processes; results come back in order, so the same input and options give
byte-identical shards and manifest. Everything is written to a hidden sibling directory that is
renamed to `--out` only when complete: a half-prepared directory is never mistaken for a dataset.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm
from webdataset import TarWriter

from pipeline import __version__
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, write_manifest
from pipeline.data.shards import encode_png
from pipeline.data.sources import parse_source
from pipeline.errors import UserError
from pipeline.io import atomic_path, sha256_file

# At most this many skipped paths are listed in the manifest (all are counted).
MAX_LISTED_SKIPS = 1000


def load_and_encode(task: tuple[Any, int, int]) -> tuple[bytes | None, str | None]:
    """Pool worker: payload -> PNG bytes at (resolution, channels), or (None, reason)."""
    payload, resolution, channels = task
    try:
        if isinstance(payload, str):
            with Image.open(payload) as img:
                img.load()
                image = img.convert("L" if channels == 1 else "RGB")
        else:
            arr = payload[..., 0] if payload.shape[-1] == 1 else payload
            image = Image.fromarray(arr)
            image = image.convert("L" if channels == 1 else "RGB")
    except Exception as exc:  # unreadable file: reported and skipped by the caller
        return None, f"{type(exc).__name__}: {exc}"
    if image.size != (resolution, resolution):
        # Shorter side to `resolution`, then a centred square crop; LANCZOS antialiases downscaling.
        image = ImageOps.fit(image, (resolution, resolution), method=Image.LANCZOS, centering=(0.5, 0.5))
    return encode_png(image), None


def split_items(items: list, holdout: int, seed: int) -> dict[str, list]:
    """One seeded permutation: the first `holdout` go to 'test', the rest (shuffled) to 'train'."""
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    splits = {"train": shuffled[holdout:]}
    if holdout:
        splits["test"] = shuffled[:holdout]
    return splits


def write_split(split: str, items: list, out: Path, resolution: int, channels: int, shard_size: int,
                pool, progress: bool, skipped: list[tuple[str, str]]) -> dict:
    """Encode `items` in order and write `{split}-%06d.tar` shards; returns the manifest entry."""
    shards: list[dict] = []
    class_counts: dict[int, int] = {}
    writer: TarWriter | None = None
    count = 0

    def close_shard() -> None:
        nonlocal writer, count
        if writer is None:
            return
        writer.close()
        path = out / shards[-1]["name"]
        shards[-1].update(num_samples=count, bytes=path.stat().st_size, sha256=sha256_file(path))
        writer, count = None, 0

    tasks = ((payload, resolution, channels) for _, payload, _ in items)
    results = pool.imap(load_and_encode, tasks, chunksize=64) if pool else map(load_and_encode, tasks)
    written = 0
    for (ident, _, label), (png, error) in tqdm(zip(items, results), total=len(items), disable=not progress,
                                                desc=f"prepare {split}", unit="img"):
        if png is None:
            print(f"skipped unreadable image {ident}: {error}")
            skipped.append((ident, error))
            continue
        if writer is None:
            name = f"{split}-{len(shards):06d}.tar"
            shards.append({"name": name})
            # mtime fixed and owner constant: identical input gives byte-identical tar files.
            writer = TarWriter(str(out / name), encoder=False, mtime=0, user="ganpipe", group="ganpipe")
        sample = {"__key__": f"{split}{written:09d}", "png": png}
        if label >= 0:
            sample["cls"] = str(label).encode()
            class_counts[label] = class_counts.get(label, 0) + 1
        writer.write(sample)
        written += 1
        count += 1
        if count >= shard_size:
            close_shard()
    close_shard()
    if written == 0:
        raise UserError(f"split '{split}' has no readable images ({len(items)} tried, all skipped)")
    return {"num_samples": written, "class_counts": [class_counts.get(i, 0) for i in range(max(class_counts, default=-1) + 1)],
            "shards": shards}


def prepare(source_spec: str, out: Path, *, resolution: int | None = None, channels: int | None = None,
            holdout: int = 0, shard_size: int = 1000, seed: int = 0, workers: int = 1,
            progress: bool = True) -> dict:
    """Build a shard directory at `out`; returns the manifest."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty; it is never overwritten: "
                              "choose another --out or remove it first")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if holdout < 0:
        raise UserError(f"--holdout must be >= 0, got {holdout}")
    source = parse_source(source_spec)      # a SourceError (a UserError) names the path and the remedy
    resolution = resolution or source.resolution
    if not resolution:
        raise UserError(f"source '{source_spec}' has images of varying size: pass --resolution (e.g. 64)")
    if resolution < 4:
        raise UserError(f"--resolution must be >= 4, got {resolution}")
    channels = channels or source.channels

    if source.fixed_splits is not None:
        if holdout:
            raise UserError(f"source '{source.name}' comes with its own test split; drop --holdout")
        splits = {name: [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
                  for name, items in source.fixed_splits.items()}
    else:
        if holdout >= len(source.items):
            raise UserError(f"--holdout {holdout} leaves no training images (source has {len(source.items)})")
        splits = split_items(source.items, holdout, seed)

    skipped: list[tuple[str, str]] = []
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with atomic_path(out, directory=True) as tmp:
            entries = {name: write_split(name, items, tmp, resolution, channels, shard_size, pool, progress,
                                         skipped)
                       for name, items in splits.items()}
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created_by": f"ganpipe {__version__}",
                "source": source.name,
                "source_spec": source_spec,
                "resolution": resolution,
                "channels": channels,
                "image_format": "png",
                "classes": source.classes,
                "num_classes": len(source.classes),
                "seed": seed,
                "holdout": holdout,
                "shard_size": shard_size,
                "splits": entries,
                "skipped": {"count": len(skipped),
                            "files": [{"path": p, "error": e} for p, e in skipped[:MAX_LISTED_SKIPS]]},
            }
            write_manifest(tmp, manifest)
            if out.exists():
                out.rmdir()       # empty, checked above; rmdir (not rmtree) fails if someone wrote there since
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return manifest


def summary(manifest: dict, out: Path) -> str:
    lines = [f"{out}: {manifest['source']} at {manifest['channels']}x{manifest['resolution']}x"
             f"{manifest['resolution']}, {manifest['num_classes'] or 'no'} classes"]
    for name, s in manifest["splits"].items():
        size = sum(sh["bytes"] for sh in s["shards"])
        lines.append(f"  {name}: {s['num_samples']} images in {len(s['shards'])} shards ({size / 1e6:.1f} MB)")
    if manifest["skipped"]["count"]:
        lines.append(f"  skipped {manifest['skipped']['count']} unreadable images (listed in the manifest)")
    return "\n".join(lines)


def prepare_command(args: argparse.Namespace) -> int:
    manifest = prepare(args.source, args.out, resolution=args.resolution, channels=args.channels,
                       holdout=args.holdout, shard_size=args.shard_size, seed=args.seed,
                       workers=max(1, args.workers), progress=not args.no_progress)
    print(summary(manifest, args.out))
    return 0
