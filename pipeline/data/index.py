"""`ganpipe index-shards DIR_OR_PATTERN [--out DIR]`: the manifest for webdataset shards that
ganpipe did not write.

    ganpipe index-shards ~/shards/celeba64        # DIR/*.tar (or .tar.gz): writes DIR/manifest.json
    ganpipe index-shards '/data/celeba/train-{000000..000099}.tar' --out ~/data/celeba64
    ganpipe verify ~/data/celeba64
    ganpipe train --config ... data.path=~/data/celeba64

The shards are a directory (its top level; `.tar`, `.tar.gz`, `.tgz`) or a brace pattern of local
files, expanded as webdataset expands URLs (`::` joins several). The manifest goes to --out
(default: the directory indexed; required for a pattern); shards outside --out are listed with
their absolute path, shards below it relative to it, so DIR can move with them. Every shard is
read once: its size and sha256, its samples counted, each sample's image decoded with
`decode_sample` (the loader's decoder: PNG, JPEG or WebP), its `cls` read when present (a sample
over the reader's bounds of members or bytes is a problem, never read whole). The first
image fixes the resolution and channels; every other image must agree, every sample must have an
image, keys must not repeat within a shard, and either every sample has a class or none has. Any
disagreement is listed (shard and key) and no manifest is written: a manifest that lied about its
shards would fail later, mid-training.

Splits come from the shard names: `test-*`, `val-*`, `validation-*` (also with `_` or `.` after the
name) go to that split, every other shard to `--split` (default train). The shards are never
modified or renamed; the manifest lists them by name (and path).
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline import __version__
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, write_manifest
from pipeline.data.shards import IMAGE_EXTS, decode_image, decode_sample, iter_tar_samples, key_digest
from pipeline.data.verify import SHARD_SUFFIXES
from pipeline.errors import BadSample, DataError, TruncatedTar, UserError, printable
from pipeline.io import sha256_file

NAMED_SPLITS = ("test", "val", "validation")
MAX_LISTED = 20                 # problems named in the error (all are counted)


def split_of(name: str, default: str) -> str:
    head = re.split(r"[-_.]", name, maxsplit=1)[0].lower()
    return head if head in NAMED_SPLITS else default


def _at(path: Path, key: str | None = None) -> str:
    """A shard, and a sample's key in it, as a message may show them."""
    return printable(path.name) + ("" if key is None else f" key {printable(key)}")


def image_ext(files: dict[str, bytes]) -> str | None:
    return next((e for e in IMAGE_EXTS if e in files), None)


def first_image(path: Path) -> tuple[int, int]:
    """(channels, side) of the first sample with an image entry in shard `path`, as decoded."""
    for key, files in iter_tar_samples(open(path, "rb"), path.name):
        ext = image_ext(files)
        if ext is None:
            continue
        try:
            with Image.open(io.BytesIO(files[ext])) as img:
                width, height = img.size
        except Exception as exc:
            raise DataError(f"{_at(path, key)}: the first image cannot be read "
                            f"({type(exc).__name__}: {printable(str(exc))})") from None
        if width != height:
            raise DataError(f"{_at(path, key)}: images are {width}x{height}; ganpipe trains on squares: "
                            "re-prepare them with `ganpipe prepare --source folder:... --crop center|pad`")
        for channels in (3, 1, 4, 2):         # what the decoder delivers: RGB, grey, with alpha
            try:
                decode_image(files[ext], channels, width)
            except BadSample:
                continue
            if channels not in (1, 3):
                raise DataError(f"{_at(path, key)}: images with an alpha channel; ganpipe trains on grey "
                                "or RGB: re-prepare with `ganpipe prepare`, which composites transparency")
            return channels, width
        raise DataError(f"{_at(path, key)}: the first image does not decode (PNG, JPEG or WebP expected)")
    raise DataError(f"{_at(path)}: no sample with an image entry (.{', .'.join(IMAGE_EXTS)})")


def find_shards(source: str | Path) -> tuple[list[Path], Path | None]:
    """(shard files, the directory they were found in or None for a pattern) of DIR_OR_PATTERN."""
    path = Path(source).expanduser()
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
        if not shards:
            raise UserError(f"no shards in {printable(str(path))} (expected *.tar, *.tar.gz or *.tgz at its top level)")
        return shards, path
    source = str(source)
    if source.startswith("pipe:") or "://" in source:
        raise UserError(f"{printable(source)}: index-shards reads local files (a directory or a brace pattern such as "
                        "'shards/train-{000000..000009}.tar'); copy remote shards first, or train on the URL "
                        "with data.resolution, data.channels and data.num_classes set")
    from webdataset.shardlists import expand_urls

    shards = [Path(u.removeprefix("file:")).expanduser() for u in dict.fromkeys(expand_urls(source))]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise UserError(f"{printable(source)}: {len(missing)} of {len(shards)} shards are not files "
                        f"(first: {printable(str(missing[0]))}); "
                        "give a directory of shards or a brace pattern of existing ones")
    return shards, None


def _entry_path(shard: Path, out: Path) -> str | None:
    """The manifest `path` of a shard: None beside the manifest, relative below it, else absolute."""
    # The directory resolved, not the file: a shard that is a symlink stays where it was named.
    shard, out = shard.parent.resolve() / shard.name, out.resolve()
    if shard.parent == out:
        return None
    return shard.relative_to(out).as_posix() if shard.is_relative_to(out) else str(shard)


def index_dir(data_dir: Path, default_split: str = "train", progress: bool = True) -> dict:
    """Write DIR/manifest.json for the shards in DIR; returns the manifest."""
    return index_shards(data_dir, None, default_split, progress)


def index_shards(source: str | Path, out: Path | None = None, default_split: str = "train",
                 progress: bool = True) -> dict:
    """Write OUT/manifest.json for the shards of a directory or brace pattern; returns the manifest."""
    shards, found_in = find_shards(source)
    if out is None:
        if found_in is None:
            raise UserError(f"{printable(str(source))} is a pattern: give --out DIR, the directory the manifest "
                            "is written to")
        out = found_in
    data_dir = Path(out).expanduser()
    if (data_dir / MANIFEST).exists():
        raise UserError(f"{printable(str(data_dir / MANIFEST))} exists already: this directory is indexed "
                        "(or prepared); "
                        "`ganpipe verify` checks it, or delete the manifest to index again")
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--out {printable(str(data_dir))} is a file, not a directory")
    names: dict[str, Path] = {}
    for p in shards:
        if names.setdefault(p.name, p) != p:
            raise UserError(f"two shards are named {printable(p.name)} ({printable(str(names[p.name]))}, "
                            f"{printable(str(p))}): a manifest lists shards by "
                            "file name; index each directory into its own --out")
    channels, resolution = first_image(shards[0])
    problems: list[str] = []    # the first MAX_LISTED; all are counted
    n_problems = 0

    def problem(text: str) -> None:
        nonlocal n_problems
        n_problems += 1
        if len(problems) < MAX_LISTED:
            problems.append(text)

    splits: dict[str, dict] = {}
    class_counts: dict[str, dict[int, int]] = {}
    formats: dict[str, int] = {}
    unlabelled = 0
    for path in tqdm(shards, disable=not progress, desc="index", unit="shard"):
        split = split_of(path.name, default_split)
        counts = class_counts.setdefault(split, {})
        n, seen = 0, set()
        try:
            for key, files in iter_tar_samples(open(path, "rb"), path.name):
                n += 1
                digest = key_digest(key)
                if digest in seen:
                    problem(f"{_at(path, key)}: duplicate key (an earlier sample has it)")
                    continue
                seen.add(digest)
                try:
                    _, label = decode_sample(files, channels=channels, resolution=resolution, num_classes=0,
                                             require_label=False)
                except BadSample as exc:
                    problem(f"{_at(path, key)}: {exc}")
                    continue
                if label < 0:
                    unlabelled += 1
                else:
                    counts[label] = counts.get(label, 0) + 1
                formats[image_ext(files)] = formats.get(image_ext(files), 0) + 1
        except (TruncatedTar, OSError) as exc:
            problem(f"{_at(path)}: unreadable after {n} samples ({type(exc).__name__}: {exc})")
        entry = splits.setdefault(split, {"num_samples": 0, "shards": []})
        record = {"name": path.name, "num_samples": n, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        where = _entry_path(path, data_dir)
        if where is not None:
            record["path"] = where
        entry["shards"].append(record)
        entry["num_samples"] += n
    labelled = sum(sum(c.values()) for c in class_counts.values())
    if labelled and unlabelled:
        problem(f"{labelled} samples have a class (.cls) and {unlabelled} have none: label all or none")
    if any(label < 0 for c in class_counts.values() for label in c):
        problem("negative classes in .cls entries; classes are 0, 1, ...")
    if n_problems:
        listed = "; ".join(problems) + (f"; ... ({n_problems} in all)" if n_problems > len(problems) else "")
        raise DataError(f"{printable(str(source))}: {n_problems} problem(s), no manifest written (the shape of the "
                        f"first image of {_at(shards[0])} is {channels}x{resolution}x{resolution}): {listed}")
    num_classes = max((label + 1 for c in class_counts.values() for label in c), default=0)
    for split, entry in splits.items():
        entry["class_counts"] = [class_counts[split].get(i, 0) for i in range(num_classes)]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"ganpipe {__version__} index",
        "source": "index",
        "source_spec": str(source),
        "resolution": resolution,
        "channels": channels,
        "image_format": next(iter(formats)) if len(formats) == 1 else "mixed",
        "image_formats": dict(sorted(formats.items())),
        "classes": [str(i) for i in range(num_classes)],
        "num_classes": num_classes,
        # the default split first: it is what data.split reads unless told otherwise
        "splits": dict(sorted(splits.items(), key=lambda kv: kv[0] != default_split)),
        "skipped": {"count": 0, "files": []},
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(data_dir, manifest)
    return manifest


def index_shards_command(args: argparse.Namespace) -> int:
    m = index_shards(args.source, args.out, args.split, progress=not args.quiet)
    out = args.out if args.out is not None else Path(args.source).expanduser()
    parts = ", ".join(f"{name} {e['num_samples']} samples in {len(e['shards'])} shards"
                      for name, e in m["splits"].items())
    print(f"{printable(str(args.source))}: indexed {parts}; {m['channels']}x{m['resolution']}x{m['resolution']} "
          f"({', '.join(f'{n} {ext}' for ext, n in m['image_formats'].items())}), "
          f"{m['num_classes'] or 'no'} classes; wrote {printable(str(out / MANIFEST))}")
    return 0
