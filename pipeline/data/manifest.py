"""`manifest.json`, the description of a prepared shard directory.

    m = read_manifest("data/mnist")      # m["resolution"], m["channels"], m["splits"]["train"]["shards"]
    manifest_hash("data/mnist")          # sha256 of the file: the key of everything derived from the data

A prepared directory holds `{split}-%06d.tar` shards (read by `pipeline.data.shards`) and
`manifest.json`, which `ganpipe prepare` writes last: a directory without it is not a dataset.
A shard entry's `name` is a file name in that directory; `ganpipe index-shards PATTERN --out DIR`
indexes shards that lie elsewhere, and their entries add `path`: where the file is, relative to
DIR (shards inside it) or absolute. Readers find a shard with `shard_path`.

A manifest is untrusted input (a downloaded or copied dataset), so its numbers are bounded before
anyone sizes anything by them: a shard cannot list more samples than its `bytes` can hold, a
split's `num_samples` is the sum of its shards'. Its shard entries are what the data must be:
`check_shard` compares a file with its entry (size, and sha256 when asked), and readers that
train or compute reference statistics from a split call it before they use a shard's samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.errors import DataError, printable
from pipeline.io import sha256_file, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "ganpipe-shards"
FORMAT_VERSION = 1

# Bounds of a manifest's numbers. A sample is at least one 512-byte tar header; a shard's bytes
# may be gzip, which inflates at most 1032-fold (deflate's limit), so a shard of B bytes holds at
# most B * 1032 / 512 samples.
MIN_SAMPLE_BYTES = 512
MAX_INFLATE_RATIO = 1032
MAX_RESOLUTION = 8192           # as data.resolution
MAX_CHANNELS = 4
MAX_CLASSES = 1_000_000
MAX_SHARD_BYTES = 1 << 50


def read_manifest(data_dir: str | Path) -> dict:
    """Load and sanity-check DIR/manifest.json; a `DataError` (one line) names the file and what to run."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: {data_dir} is not a prepared data directory "
                        f"(create one with `ganpipe prepare --source ... --out {data_dir}`)")
    try:
        m = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:   # unreadable, empty, truncated, not UTF-8, not JSON
        raise DataError(f"{path} cannot be read as JSON ({type(exc).__name__}: {str(exc)[:120]}); "
                        "re-run `ganpipe prepare`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DataError(f"{path}: not a {FORMAT} manifest (format={got!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {m.get('format_version')} is not supported "
                        f"(this ganpipe reads version {FORMAT_VERSION}); re-run `ganpipe prepare`")
    problem = _shape_problem(m)
    if problem:
        raise DataError(f"{path}: {printable(problem, 600)} (truncated or edited by hand?); "
                        "re-run `ganpipe prepare` (or `ganpipe index-shards`)")
    return m


def _count(value, low: int = 0, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low \
        and (high is None or value <= high)


def _shape_problem(m: dict) -> str:
    """What is missing, mistyped or out of bounds in a manifest that readers index without
    further checks."""
    for key, low, high in (("resolution", 1, MAX_RESOLUTION), ("channels", 1, MAX_CHANNELS),
                           ("num_classes", 0, MAX_CLASSES)):
        if not _count(m.get(key), low, high):
            return f"'{key}' is {m.get(key)!r}, expected an integer from {low} to {high}"
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "'splits' is missing or empty"
    for split, entry in splits.items():
        if not isinstance(entry, dict) or not _count(entry.get("num_samples")) \
                or not isinstance(entry.get("shards"), list):
            return f"split {split!r} needs 'num_samples' and a list of 'shards'"
        total = 0
        for shard in entry["shards"]:
            if not isinstance(shard, dict):
                return f"split {split!r} has a shard entry that is not an object"
            name = shard.get("name")
            # A bare file name: readers look in the manifest's directory, unless `path` (written by
            # index-shards, never guessed) says where that file lies.
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                return f"split {split!r} has a shard name {name!r} that is not a file name in the directory"
            where = shard.get("path", name)
            if not isinstance(where, str) or not where or Path(where).name != name:
                return f"shard {name!r} has a path {where!r} that does not end in its name"
            n, size = shard.get("num_samples"), shard.get("bytes")
            if not (_count(n) and _count(size, 0, MAX_SHARD_BYTES) and isinstance(shard.get("sha256"), str)):
                return f"shard {name!r} needs 'num_samples', 'bytes' (at most 2**50) and 'sha256'"
            if n * MIN_SAMPLE_BYTES > size * MAX_INFLATE_RATIO:
                return (f"shard {name!r} lists {n} samples, more than its {size} bytes can hold "
                        f"(a sample takes at least {MIN_SAMPLE_BYTES} bytes of tar)")
            total += n
        if entry["num_samples"] != total:
            return f"split {split!r} lists {entry['num_samples']} samples, its shards {total}"
    return ""


def shard_path(data_dir: str | Path, shard: dict) -> Path:
    """The file of a manifest's shard entry: DIR/name, or its `path` (relative to DIR, or absolute)."""
    return Path(data_dir) / shard.get("path", shard["name"])


def check_shard(data_dir: str | Path, shard: dict, *, full: bool = True, fileobj=None) -> None:
    """Raise a one-line `DataError` unless the shard file of entry `shard` has the entry's size
    and, if `full`, its sha256 (of `fileobj`, an open binary file of it, when given: the bytes
    then read are those checked). A mismatch means the data is not what the manifest, and every
    record that names the manifest, says it is."""
    path = shard_path(data_dir, shard).absolute()
    where = f"shard {printable(str(path))}"
    listed = f"{printable(str((Path(data_dir) / MANIFEST).absolute()))} lists"
    remedy = ("restore it, or re-run `ganpipe prepare` / `ganpipe index-shards` for the data as it is now "
              "(`ganpipe verify` lists every changed shard)")
    try:
        size = os.fstat(fileobj.fileno()).st_size if fileobj is not None else path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{where} is missing ({listed} it); {remedy}") from None
    if size != shard["bytes"]:
        raise DataError(f"{where} has {size} bytes where {listed} {shard['bytes']}: it changed after it was "
                        f"indexed; {remedy}")
    if not full:
        return
    if fileobj is not None:
        h = hashlib.sha256()
        while block := fileobj.read(1 << 20):
            h.update(block)
        digest = h.hexdigest()
        fileobj.seek(0)
    else:
        digest = sha256_file(path)
    if digest != shard["sha256"]:
        raise DataError(f"{where} has sha256 {digest[:16]}... where {listed} {printable(shard['sha256'][:16])}...: "
                        f"it changed after it was indexed; {remedy}")


def split_sha256(m: dict, split: str) -> str:
    """The identity of a split's data: sha256 over its shards' names, sizes and hashes and the
    image shape they are decoded to (what reference statistics are keyed by)."""
    shards = [[s["name"], s["bytes"], s["sha256"], s["num_samples"]] for s in m["splits"][split]["shards"]]
    identity = {"resolution": m["resolution"], "channels": m["channels"], "shards": shards}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def write_manifest(data_dir: str | Path, manifest: dict) -> Path:
    """Write DIR/manifest.json atomically; returns its path."""
    path = Path(data_dir) / MANIFEST
    write_json_atomic(path, manifest)
    return path


def manifest_hash(data_dir: str | Path) -> str:
    return sha256_file(Path(data_dir) / MANIFEST)
