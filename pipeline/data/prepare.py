"""`ganpipe prepare`: turn an image collection into webdataset shards plus a manifest.

    ganpipe prepare --source mnist --out data/mnist --holdout 1000
    ganpipe prepare --source folder:~/photos --out data/photos --resolution 64 --shard-size 5000
    ganpipe prepare --source folder:~/photos --out data/photos --resolution 256 --format jpg --quality 90
    ganpipe prepare --source folder:~/icons --out data/icons --resolution 64 --crop pad --background black
    ganpipe prepare --source hf:~/hf/cifar10 --out data/c10 --resolution 32 --label-column label

Items are shuffled once with `--seed` (so every shard is a random sample of the data, which is
what a streaming loader needs), turned into a square of `--resolution` with `--channels`, and
encoded by a pool of processes; results come back in order, so the same input and options give
byte-identical shards and manifest. Everything is written to a hidden sibling directory that is
renamed to `--out` only when complete: a half-prepared directory is never mistaken for a dataset.

Each image, in `load_and_encode`: its EXIF orientation applied (phones store photos sideways with
a tag); the mode made explicit (16-bit scaled to 8 bits by value / 257, palette expanded,
transparency composited onto `--background`, white by default, then L for `--channels 1` (ITU-R
601 luma) or RGB for 3); then, if it is not already resolution x resolution, `--crop center`
(shorter side to the resolution with Lanczos, centred square crop) or `--crop pad` (longer side to
the resolution, centred, borders of `--background`). Stored as `--format`: `keep` (the default)
stores a PNG, JPEG or WebP source's own bytes when none of the above changed anything (and
`decode_sample` reads them at the expected shape), with no re-encoding loss and no growth of a
JPEG into a PNG several times its size, and lossless PNG otherwise (so in-memory sources and
resized images are PNG); `png` re-encodes everything losslessly; `jpg` and `webp` encode
everything at `--quality` (default 95; webp 100 = lossless). The manifest records the encoding
and how many samples each stored format holds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm
from webdataset import TarWriter

from pipeline import __version__
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, write_manifest
from pipeline.data.shards import decode_image, encode_image
from pipeline.data.sources import SourceOptions, open_payload, parse_source
from pipeline.errors import BadSample, UserError, printable
from pipeline.io import atomic_path, sha256_file

# At most this many skipped paths are listed in the manifest (all are counted).
MAX_LISTED_SKIPS = 1000
FORMATS = ("keep", "png", "jpg", "webp")
CROPS = ("center", "pad")
BACKGROUNDS = {"white": 255, "black": 0}
DEFAULT_QUALITY = 95
KEEPABLE = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}     # PIL format -> entry extension


@dataclass(frozen=True)
class Encoding:
    """How every image is stored (see the module docstring); recorded in the manifest."""
    resolution: int
    channels: int
    format: str = "keep"            # keep | png | jpg | webp
    quality: int | None = None      # jpg, webp: 1..100 (None: DEFAULT_QUALITY)
    crop: str = "center"            # center | pad
    background: str = "white"       # transparency and --crop pad borders: white | black


def to_mode(image: Image.Image, channels: int, background: str) -> tuple[Image.Image, bool]:
    """`image` as L (channels 1) or RGB (3), and whether that changed it."""
    target = "L" if channels == 1 else "RGB"
    if image.mode == target and "transparency" not in image.info:
        return image, False
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PIL's "I" is how some files hold it): PIL's own convert would clip at 255.
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image, dtype=np.float64).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (BACKGROUNDS[background],) * 3 + (255,))
        image = Image.alpha_composite(base, rgba)
    return image.convert(target), True


def to_square(image: Image.Image, resolution: int, crop: str, background: str) -> Image.Image:
    if crop == "pad":
        fill = BACKGROUNDS[background] if image.mode == "L" else (BACKGROUNDS[background],) * 3
        return ImageOps.pad(image, (resolution, resolution), method=Image.LANCZOS, color=fill, centering=(0.5, 0.5))
    # Shorter side to `resolution`, then a centred square crop; LANCZOS antialiases downscaling.
    return ImageOps.fit(image, (resolution, resolution), method=Image.LANCZOS, centering=(0.5, 0.5))


def load_and_encode(task: tuple[Any, Encoding]) -> tuple[bytes | None, str | None]:
    """Pool worker: payload -> (entry bytes, extension), or (None, reason) for an unreadable image."""
    payload, enc = task
    try:
        image, source_bytes = open_payload(payload)
        changed = False
        if image.getexif().get(0x0112, 1) not in (1, None):       # EXIF orientation other than upright
            image, changed = ImageOps.exif_transpose(image), True
        image, converted = to_mode(image, enc.channels, enc.background)
        if image.size != (enc.resolution, enc.resolution):
            image, changed = to_square(image, enc.resolution, enc.crop, enc.background), True
        changed = changed or converted
    except Exception as exc:  # unreadable file: reported and skipped by the caller
        # No object addresses (PIL names "<_io.BytesIO object at 0x7f...>"): the manifest, which
        # keeps these reasons, must be the same bytes on every rerun.
        return None, re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")
    if enc.format == "keep" and not changed and source_bytes is not None and image.format in KEEPABLE:
        try:
            decode_image(source_bytes, enc.channels, enc.resolution)      # what every reader will do
            return source_bytes, KEEPABLE[image.format]
        except BadSample:
            pass              # e.g. a 16-bit or CMYK file: stored re-encoded instead
    ext = "png" if enc.format == "keep" else enc.format
    return encode_image(image, ext, enc.quality or DEFAULT_QUALITY), ext


def split_items(items: list, holdout: int, seed: int) -> dict[str, list]:
    """One seeded permutation: the first `holdout` go to 'test', the rest (shuffled) to 'train'."""
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    splits = {"train": shuffled[holdout:]}
    if holdout:
        splits["test"] = shuffled[:holdout]
    return splits


def write_split(split: str, items: list, out: Path, enc: Encoding, shard_size: int,
                pool, progress: bool, skipped: list[tuple[str, str]]) -> dict:
    """Encode `items` in order and write `{split}-%06d.tar` shards; returns the manifest entry."""
    shards: list[dict] = []
    class_counts: dict[int, int] = {}
    formats: dict[str, int] = {}
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

    tasks = ((payload, enc) for _, payload, _ in items)
    results = pool.imap(load_and_encode, tasks, chunksize=64) if pool else map(load_and_encode, tasks)
    written = 0
    for (ident, _, label), (data, ext_or_error) in tqdm(zip(items, results), total=len(items),
                                                         disable=not progress, desc=f"prepare {split}", unit="img"):
        if data is None:
            error = ext_or_error
            print(f"skipped unreadable image {printable(str(ident))}: {printable(str(error))}")
            skipped.append((ident, error))
            continue
        if writer is None:
            name = f"{split}-{len(shards):06d}.tar"
            shards.append({"name": name})
            # mtime fixed and owner constant: identical input gives byte-identical tar files.
            writer = TarWriter(str(out / name), encoder=False, mtime=0, user="ganpipe", group="ganpipe")
        sample = {"__key__": f"{split}{written:09d}", ext_or_error: data}
        formats[ext_or_error] = formats.get(ext_or_error, 0) + 1
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
            "image_formats": dict(sorted(formats.items())), "shards": shards}


def prepare(source_spec: str, out: Path, *, resolution: int | None = None, channels: int | None = None,
            holdout: int = 0, shard_size: int = 1000, seed: int = 0, workers: int = 1,
            progress: bool = True, image_format: str = "keep", quality: int | None = None,
            crop: str = "center", background: str = "white", options: SourceOptions | None = None) -> dict:
    """Build a shard directory at `out`; returns the manifest. `options`: the source's own
    (labels file, Hugging Face columns)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty; it is never overwritten: "
                              "choose another --out or remove it first")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if holdout < 0:
        raise UserError(f"--holdout must be >= 0, got {holdout}")
    if image_format not in FORMATS:
        raise UserError(f"--format {image_format}: choose one of {', '.join(FORMATS)}")
    if quality is not None and (image_format not in ("jpg", "webp") or not 1 <= quality <= 100):
        given = "is lossless" if image_format in ("png", "keep") else "given"
        raise UserError(f"--quality {quality}: a number from 1 to 100, for --format jpg or webp only "
                        f"(--format {image_format} {given})")
    if crop not in CROPS or background not in BACKGROUNDS:
        raise UserError(f"--crop {crop} --background {background}: choose --crop from {', '.join(CROPS)} and "
                        f"--background from {', '.join(BACKGROUNDS)}")
    source = parse_source(source_spec, options)   # a SourceError (a UserError) names the path and the remedy
    resolution = resolution or source.resolution
    if not resolution:
        raise UserError(f"source '{source_spec}' has images of varying size: pass --resolution (e.g. 64)")
    if resolution < 4:
        raise UserError(f"--resolution must be >= 4, got {resolution}")
    channels = channels or source.channels
    if image_format == "webp" and channels == 1:
        raise UserError("--format webp stores RGB only; for --channels 1 use png, jpg or keep")
    enc = Encoding(resolution, channels, image_format, quality, crop, background)

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
            entries = {name: write_split(name, items, tmp, enc, shard_size, pool, progress, skipped)
                       for name, items in splits.items()}
            formats: dict[str, int] = {}
            for entry in entries.values():
                for ext, n in entry["image_formats"].items():
                    formats[ext] = formats.get(ext, 0) + n
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created_by": f"ganpipe {__version__}",
                "source": source.name,
                "source_spec": source_spec,
                "resolution": resolution,
                "channels": channels,
                # the entry extension every sample has, or "mixed" (--format keep): see image_formats
                "image_format": next(iter(formats)) if len(formats) == 1 else "mixed",
                "image_formats": dict(sorted(formats.items())),
                "encoding": {k: v for k, v in asdict(enc).items() if k not in ("resolution", "channels")},
                "classes": source.classes,
                "num_classes": len(source.classes),
                "seed": seed,
                "holdout": holdout,
                "shard_size": shard_size,
                "splits": entries,
                **({"source_notes": source.notes} if source.notes else {}),
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
    lines = [f"{printable(str(out))}: {printable(str(manifest['source']))} at "
             f"{manifest['channels']}x{manifest['resolution']}x{manifest['resolution']}, "
             f"{manifest['num_classes'] or 'no'} classes"]
    for name, s in manifest["splits"].items():
        size = sum(sh["bytes"] for sh in s["shards"])
        stored = ", ".join(f"{n} {ext}" for ext, n in s.get("image_formats", {}).items())
        lines.append(f"  {printable(name)}: {s['num_samples']} images in {len(s['shards'])} shards ({size / 1e6:.1f} MB"
                     + (f"; {stored})" if stored else ")"))
    if manifest["skipped"]["count"]:
        lines.append(f"  skipped {manifest['skipped']['count']} unreadable images (listed in the manifest)")
    return "\n".join(lines)


def prepare_command(args: argparse.Namespace) -> int:
    options = SourceOptions(labels=args.labels, image_column=args.image_column, label_column=args.label_column)
    manifest = prepare(args.source, args.out, resolution=args.resolution, channels=args.channels,
                       holdout=args.holdout, shard_size=args.shard_size, seed=args.seed,
                       workers=max(1, args.workers), progress=not args.no_progress, image_format=args.format,
                       quality=args.quality, crop=args.crop, background=args.background, options=options)
    print(summary(manifest, args.out))
    return 0
