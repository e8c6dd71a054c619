"""`ganpipe verify DIR`: re-hash every shard against the manifest and decode every sample.

    ganpipe verify data/mnist

Each problem is printed with its shard (and key, where there is one, with the source file or
row `ganpipe prepare` recorded in the sample); the exit status is 0 only
when every shard (tar or tar.gz) matches its size and sha256, every sample decodes to the
manifest's shape (with `read_samples`, the loader's reader: PNG, JPEG or WebP, no duplicate keys),
and every label is present (for labelled data) and in range. A damaged shard is a reported
problem, never a crash; a damaged manifest is a one-line error naming it. Names from the data
(shards, keys) are printed through `printable`: a name cannot draw on the terminal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from pipeline.data.manifest import read_manifest, shard_path
from pipeline.data.shards import bad_sample, read_samples
from pipeline.errors import TruncatedTar, printable
from pipeline.io import sha256_file

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def verify_shard(path: Path, name: str, shard: dict, shape: dict, progress: bool) -> tuple[list[str], int]:
    """(problems, samples read) of one listed shard: size, sha256, then every sample."""
    problems: list[str] = []
    shown = printable(name)
    size = path.stat().st_size
    if size != shard["bytes"]:
        problems.append(f"{shown}: {size} bytes, manifest says {shard['bytes']}")
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        problems.append(f"{shown}: sha256 {digest[:12]}... does not match the manifest's "
                        f"{printable(shard['sha256'][:12])}... (file changed or corrupt)")
    n = 0
    try:
        samples = read_samples(open(path, "rb"), name, **shape, require_label=shape["num_classes"] > 0)
        for _, key, _, _, bad in tqdm(samples, total=shard["num_samples"], disable=not progress, desc=shown,
                                      leave=False):
            n += 1
            if bad is not None:
                problems.append(f"{shown} {bad_sample(key, bad)}")
    except (TruncatedTar, OSError) as exc:
        problems.append(f"{shown}: unreadable tar after {n} samples ({type(exc).__name__}: {exc})")
    if n != shard["num_samples"]:
        problems.append(f"{shown}: {n} samples, manifest says {shard['num_samples']}")
    return problems, n


def verify_dir(data_dir: Path, progress: bool = True) -> tuple[list[str], dict]:
    """Returns (problems, counts); each problem names the shard and, if any, the key."""
    m = read_manifest(data_dir)
    shape = dict(channels=m["channels"], resolution=m["resolution"], num_classes=m["num_classes"])
    problems: list[str] = []
    counts = {"shards": 0, "samples": 0}
    listed = set()
    for split, entry in m["splits"].items():
        total = 0
        for shard in entry["shards"]:
            name = shard["name"]
            path = shard_path(data_dir, shard)
            listed.add(path.resolve())
            counts["shards"] += 1
            if not path.is_file():
                at = f" at {printable(str(path))}" if "path" in shard else ""
                problems.append(f"{printable(name)}: missing (listed in the manifest{at})")
                continue
            try:
                found, n = verify_shard(path, name, shard, shape, progress)
            except OSError as exc:             # unreadable file (permissions, I/O error)
                found, n = [f"{printable(name)}: cannot be read ({type(exc).__name__}: {exc})"], 0
            problems += found
            counts["samples"] += n
            total += n
        if total != entry["num_samples"]:
            problems.append(f"split {printable(split)}: {total} samples, manifest says {entry['num_samples']}")
    extras = (p.name for p in data_dir.iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.resolve() not in listed)
    for extra in sorted(extras):
        problems.append(f"{printable(extra)}: shard not listed in the manifest (left over from another run?)")
    return problems, counts


def verify_command(args: argparse.Namespace) -> int:
    problems, counts = verify_dir(args.data_dir, progress=not args.quiet)
    for p in problems:
        print(f"PROBLEM {p}")
    where = printable(str(args.data_dir))
    if problems:
        print(f"{where}: {len(problems)} problem(s) in {counts['shards']} shards; "
              "re-run `ganpipe prepare` into a new directory, or restore the listed shards")
        return 1
    print(f"{where}: OK, {counts['shards']} shards, {counts['samples']} samples verified")
    return 0
