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

Each sample also holds a `json` entry (`source_record`): the item's source (path under a folder,
array index, hf split/row) and the image's size, so a bad sample found later can be traced. Images
whose scaled side is under the resolution are upscaled: counted and listed in the manifest
(`upscaled`), named in the summary, and those upscaled more than DEGENERATE_UPSCALE times named in
one warning; `--min-size N` skips images with a side under N pixels instead (`Findings`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
from dataclasses import asdict, dataclass, field
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

# At most this many skipped (and degenerate) paths are listed in the manifest, and this many
# upscaled ones (all are counted).
MAX_LISTED_SKIPS = 1000
MAX_LISTED_UPSCALED = 20
# An image upscaled more than this many times (the side the crop scales is under a quarter of
# --resolution) is degenerate: a blur, or a 1x1 image made a flat square. prepare names them.
DEGENERATE_UPSCALE = 4
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


@dataclass(frozen=True)
class Encoded:
    """What the pool worker made of one item: the entry's bytes and extension, or why there are
    none (`error`: unreadable, or `too_small` for --min-size); `size` is the source image's
    (width, height), upright, where it could be read."""
    data: bytes | None
    ext: str | None
    error: str | None = None
    size: tuple[int, int] | None = None
    too_small: bool = False


def load_and_encode(task: tuple[Any, Encoding, int]) -> Encoded:
    """Pool worker: (payload, encoding, --min-size) -> `Encoded`."""
    payload, enc, min_size = task
    try:
        image, source_bytes = open_payload(payload)
        changed = False
        if image.getexif().get(0x0112, 1) not in (1, None):       # EXIF orientation other than upright
            image, changed = ImageOps.exif_transpose(image), True
        size = image.size
        if min(size) < min_size:
            return Encoded(None, None, f"too small ({size[0]}x{size[1]}, under --min-size {min_size})", size, True)
        image, converted = to_mode(image, enc.channels, enc.background)
        if image.size != (enc.resolution, enc.resolution):
            image, changed = to_square(image, enc.resolution, enc.crop, enc.background), True
        changed = changed or converted
    except Exception as exc:  # unreadable file: reported and skipped by the caller
        # No object addresses (PIL names "<_io.BytesIO object at 0x7f...>"): the manifest, which
        # keeps these reasons, must be the same bytes on every rerun.
        return Encoded(None, None, re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}"))
    if enc.format == "keep" and not changed and source_bytes is not None and image.format in KEEPABLE:
        try:
            decode_image(source_bytes, enc.channels, enc.resolution)      # what every reader will do
            return Encoded(source_bytes, KEEPABLE[image.format], size=size)
        except BadSample:
            pass              # e.g. a 16-bit or CMYK file: stored re-encoded instead
    ext = "png" if enc.format == "keep" else enc.format
    return Encoded(encode_image(image, ext, enc.quality or DEFAULT_QUALITY), ext, size=size)


def scaled_side(size: tuple[int, int], crop: str) -> int:
    """The side of a (width, height) image that `to_square` scales to the resolution: the shorter
    for --crop center, the longer for --crop pad."""
    return min(size) if crop == "center" else max(size)


def source_record(ident: str, size: tuple[int, int]) -> bytes:
    """A sample's `json` entry: where it came from (the path under a folder, an index or an
    `hf` split/row) and the source image's size, so a bad or upscaled sample can be found. Keys as
    img2dataset's `json` entries (`original_width`, `original_height`); readers ignore the entry."""
    return json.dumps({"source": ident, "original_width": size[0], "original_height": size[1]},
                      sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Listed:
    """A count, and the first `limit` entries counted (what a manifest lists)."""
    limit: int
    count: int = 0
    files: list[dict] = field(default_factory=list)

    def add(self, **entry) -> None:
        self.count += 1
        if len(self.files) < self.limit:
            self.files.append(entry)

    def record(self) -> dict:
        return {"count": self.count, "files": self.files}


@dataclass
class Findings:
    """What prepare saw besides the samples it wrote; recorded in the manifest, said in the summary."""
    min_size: int = 0                    # --min-size: a source image with a side under it is skipped
    skipped: Listed = field(default_factory=lambda: Listed(MAX_LISTED_SKIPS))       # unreadable or too small
    too_small: int = 0                   # of `skipped`, those under --min-size
    upscaled: Listed = field(default_factory=lambda: Listed(MAX_LISTED_UPSCALED))   # smaller than the resolution
    degenerate: Listed = field(default_factory=lambda: Listed(MAX_LISTED_SKIPS))    # upscaled > DEGENERATE_UPSCALE x

    def note(self, ident: str, result: Encoded, enc: Encoding) -> None:
        if result.data is None:
            self.skipped.add(path=ident, error=result.error)
            self.too_small += result.too_small
            return
        side = scaled_side(result.size, enc.crop)
        if side < enc.resolution:
            self.upscaled.add(path=ident, size=list(result.size))
            if side * DEGENERATE_UPSCALE < enc.resolution:
                self.degenerate.add(path=ident, size=list(result.size))

    def record(self) -> dict:
        """The manifest's fields."""
        return {"min_size": self.min_size, "skipped": {**self.skipped.record(), "too_small": self.too_small},
                "upscaled": {**self.upscaled.record(), "degenerate": self.degenerate.record()}}


def split_items(items: list, holdout: int, seed: int) -> dict[str, list]:
    """One seeded permutation: the first `holdout` go to 'test', the rest (shuffled) to 'train'."""
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    splits = {"train": shuffled[holdout:]}
    if holdout:
        splits["test"] = shuffled[:holdout]
    return splits


def write_split(split: str, items: list, out: Path, enc: Encoding, shard_size: int,
                pool, progress: bool, findings: Findings) -> dict:
    """Encode `items` in order and write `{split}-%06d.tar` shards; returns the manifest entry.
    Each sample is the image entry, `cls` when labelled, and `json` (`source_record`)."""
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

    tasks = ((payload, enc, findings.min_size) for _, payload, _ in items)
    results = pool.imap(load_and_encode, tasks, chunksize=64) if pool else map(load_and_encode, tasks)
    written = 0
    for (ident, _, label), result in tqdm(zip(items, results), total=len(items),
                                          disable=not progress, desc=f"prepare {split}", unit="img"):
        findings.note(str(ident), result, enc)
        if result.data is None:
            if not result.too_small:       # those are counted and named in the summary instead
                print(f"skipped unreadable image {printable(str(ident))}: {printable(str(result.error))}")
            continue
        if writer is None:
            name = f"{split}-{len(shards):06d}.tar"
            shards.append({"name": name})
            # mtime fixed and owner constant: identical input gives byte-identical tar files.
            writer = TarWriter(str(out / name), encoder=False, mtime=0, user="ganpipe", group="ganpipe")
        sample = {"__key__": f"{split}{written:09d}", result.ext: result.data,
                  "json": source_record(str(ident), result.size)}
        formats[result.ext] = formats.get(result.ext, 0) + 1
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
            crop: str = "center", background: str = "white", options: SourceOptions | None = None,
            min_size: int = 0) -> dict:
    """Build a shard directory at `out`; returns the manifest. `options`: the source's own
    (labels file, Hugging Face columns). `min_size`: source images with a side under this many
    pixels are skipped (listed in the manifest's `skipped`); 0 keeps every readable image."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty; it is never overwritten: "
                              "choose another --out or remove it first")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if holdout < 0:
        raise UserError(f"--holdout must be >= 0, got {holdout}")
    if min_size < 0:
        raise UserError(f"--min-size must be >= 0 (pixels; 0 keeps every size), got {min_size}")
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

    findings = Findings(min_size)
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with atomic_path(out, directory=True) as tmp:
            entries = {name: write_split(name, items, tmp, enc, shard_size, pool, progress, findings)
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
                **findings.record(),
            }
            write_manifest(tmp, manifest)
            if out.exists():
                out.rmdir()       # empty, checked above; rmdir (not rmtree) fails if someone wrote there since
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    degenerate = findings.degenerate
    if degenerate.count:
        below = -(-resolution // DEGENERATE_UPSCALE)
        print(f"warning: {degenerate.count} image(s) upscaled more than {DEGENERATE_UPSCALE}x to {resolution} px: "
              f"{_names(degenerate)}; they train as blurs or flat squares: pass --min-size {below} to skip images "
              f"with a side under {below} px, or remove them from the source")
    return manifest


def _names(listed: dict | Listed, shown: int = 5) -> str:
    """'a.png (1x1), b.png (3x2), and 7 more (listed in the manifest)'."""
    count, files = (listed.count, listed.files) if isinstance(listed, Listed) else (listed["count"], listed["files"])
    names = ", ".join(f"{printable(str(f['path']), 80)} ({f['size'][0]}x{f['size'][1]})" for f in files[:shown])
    more = count - min(shown, len(files))
    return names + (f", and {more} more (listed in the manifest)" if more > 0 else "")


def summary(manifest: dict, out: Path) -> str:
    lines = [f"{printable(str(out))}: {printable(str(manifest['source']))} at "
             f"{manifest['channels']}x{manifest['resolution']}x{manifest['resolution']}, "
             f"{manifest['num_classes'] or 'no'} classes"]
    for name, s in manifest["splits"].items():
        size = sum(sh["bytes"] for sh in s["shards"])
        stored = ", ".join(f"{n} {ext}" for ext, n in s.get("image_formats", {}).items())
        lines.append(f"  {printable(name)}: {s['num_samples']} images in {len(s['shards'])} shards ({size / 1e6:.1f} MB"
                     + (f"; {stored})" if stored else ")"))
    skipped, upscaled = manifest["skipped"], manifest.get("upscaled")
    too_small = skipped.get("too_small", 0)
    if too_small:
        lines.append(f"  skipped {skipped['count']} images ({too_small} under --min-size {manifest['min_size']}, "
                     f"{skipped['count'] - too_small} unreadable; listed in the manifest)")
    elif skipped["count"]:
        lines.append(f"  skipped {skipped['count']} unreadable images (listed in the manifest)")
    if upscaled and upscaled["count"]:
        side = "shorter" if manifest["encoding"].get("crop") == "center" else "longer"
        worst = upscaled["degenerate"]["count"]
        lines.append(f"  upscaled {upscaled['count']} image(s) whose {side} side is under {manifest['resolution']} px"
                     + (f" ({worst} more than {DEGENERATE_UPSCALE}x)" if worst else "") + ": " + _names(upscaled, 3))
    return "\n".join(lines)


def prepare_command(args: argparse.Namespace) -> int:
    options = SourceOptions(labels=args.labels, image_column=args.image_column, label_column=args.label_column)
    manifest = prepare(args.source, args.out, resolution=args.resolution, channels=args.channels,
                       holdout=args.holdout, shard_size=args.shard_size, seed=args.seed,
                       workers=max(1, args.workers), progress=not args.no_progress, image_format=args.format,
                       quality=args.quality, crop=args.crop, background=args.background, options=options,
                       min_size=args.min_size)
    print(summary(manifest, args.out))
    return 0
