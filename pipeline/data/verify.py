"""`ganpipe verify DIR`: re-hash every shard against the manifest and decode every sample.

    ganpipe verify data/mnist

Each problem is printed with its shard (and key, where there is one); the exit status is 0 only
when every shard matches its size and sha256, every sample decodes to the manifest's shape, and
every label is present (for labelled data) and in range.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from pipeline.data.manifest import (BadSample, decode_image, decode_label, iter_tar_samples, read_manifest,
                                    sha256_file)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", type=Path, help="a directory written by `ganpipe prepare`")
    p.add_argument("--quiet", action="store_true", help="print only problems and the final line")


def verify_dir(data_dir: Path, progress: bool = True) -> tuple[list[str], dict]:
    """Returns (problems, counts); each problem names the shard and, if any, the key."""
    m = read_manifest(data_dir)
    res, ch, ncls = m["resolution"], m["channels"], m["num_classes"]
    problems: list[str] = []
    counts = {"shards": 0, "samples": 0}
    listed = set()
    for split, entry in m["splits"].items():
        total = 0
        for shard in entry["shards"]:
            name = shard["name"]
            listed.add(name)
            path = data_dir / name
            counts["shards"] += 1
            if not path.is_file():
                problems.append(f"{name}: missing (listed in the manifest)")
                continue
            size = path.stat().st_size
            if size != shard["bytes"]:
                problems.append(f"{name}: {size} bytes, manifest says {shard['bytes']}")
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                problems.append(f"{name}: sha256 {digest[:12]}... does not match the manifest's "
                                f"{shard['sha256'][:12]}... (file changed or corrupt)")
            n, seen = 0, set()
            try:
                for key, files in tqdm(iter_tar_samples(open(path, "rb"), name), total=shard["num_samples"],
                                       disable=not progress, desc=name, leave=False):
                    n += 1
                    if key in seen:
                        problems.append(f"{name} key {key}: duplicate key")
                    seen.add(key)
                    try:
                        if "png" not in files:
                            raise BadSample(f"no .png entry (has: {', '.join(sorted(files)) or 'nothing'})")
                        decode_image(files["png"], ch, res)
                        decode_label(files.get("cls"), ncls, required=ncls > 0)
                    except BadSample as exc:
                        problems.append(f"{name} key {key}: {exc}")
            except (EOFError, OSError) as exc:
                problems.append(f"{name}: unreadable tar after {n} samples ({type(exc).__name__}: {exc})")
            if n != shard["num_samples"]:
                problems.append(f"{name}: {n} samples, manifest says {shard['num_samples']}")
            counts["samples"] += n
            total += n
        if total != entry["num_samples"]:
            problems.append(f"split {split}: {total} samples, manifest says {entry['num_samples']}")
    for extra in sorted(p.name for p in data_dir.glob("*.tar") if p.name not in listed):
        problems.append(f"{extra}: shard not listed in the manifest (left over from another run?)")
    return problems, counts


def run(args: argparse.Namespace) -> int:
    problems, counts = verify_dir(args.data_dir, progress=not args.quiet)
    for p in problems:
        print(f"PROBLEM {p}")
    if problems:
        print(f"{args.data_dir}: {len(problems)} problem(s) in {counts['shards']} shards; "
              "re-run `ganpipe prepare` into a new directory, or restore the listed shards")
        return 1
    print(f"{args.data_dir}: OK, {counts['shards']} shards, {counts['samples']} samples verified")
    return 0
