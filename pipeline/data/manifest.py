"""`manifest.json`, the description of a prepared shard directory.

    m = read_manifest("data/mnist")      # m["resolution"], m["channels"], m["splits"]["train"]["shards"]
    manifest_hash("data/mnist")          # sha256 of the file: the key of everything derived from the data

A prepared directory holds `{split}-%06d.tar` shards (read by `pipeline.data.shards`) and
`manifest.json`, which `ganpipe prepare` writes last: a directory without it is not a dataset.
A shard entry's `name` is a file name in that directory; `ganpipe index-shards PATTERN --out DIR`
indexes shards that lie elsewhere, and their entries add `path`: where the file is, relative to
DIR (shards inside it) or absolute. Readers find a shard with `shard_path`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import DataError
from pipeline.io import sha256_file, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "ganpipe-shards"
FORMAT_VERSION = 1


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
        raise DataError(f"{path}: {problem} (truncated or edited by hand?); re-run `ganpipe prepare`")
    return m


def _count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _shape_problem(m: dict) -> str:
    """What is missing or mistyped in a manifest that readers index without further checks."""
    for key, low in (("resolution", 1), ("channels", 1), ("num_classes", 0)):
        if not _count(m.get(key), low):
            return f"'{key}' is {m.get(key)!r}, expected an integer >= {low}"
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "'splits' is missing or empty"
    for split, entry in splits.items():
        if not isinstance(entry, dict) or not _count(entry.get("num_samples")) \
                or not isinstance(entry.get("shards"), list):
            return f"split '{split}' needs 'num_samples' and a list of 'shards'"
        for shard in entry["shards"]:
            if not isinstance(shard, dict):
                return f"split '{split}' has a shard entry that is not an object"
            name = shard.get("name")
            # A bare file name: readers look in the manifest's directory, unless `path` (written by
            # index-shards, never guessed) says where that file lies.
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                return f"split '{split}' has a shard name {name!r} that is not a file name in the directory"
            where = shard.get("path", name)
            if not isinstance(where, str) or not where or Path(where).name != name:
                return f"shard {name} has a path {where!r} that does not end in its name"
            if not (_count(shard.get("num_samples")) and _count(shard.get("bytes"))
                    and isinstance(shard.get("sha256"), str)):
                return f"shard {name} needs 'num_samples', 'bytes' and 'sha256'"
    return ""


def shard_path(data_dir: str | Path, shard: dict) -> Path:
    """The file of a manifest's shard entry: DIR/name, or its `path` (relative to DIR, or absolute)."""
    return Path(data_dir) / shard.get("path", shard["name"])


def write_manifest(data_dir: str | Path, manifest: dict) -> Path:
    """Write DIR/manifest.json atomically; returns its path."""
    path = Path(data_dir) / MANIFEST
    write_json_atomic(path, manifest)
    return path


def manifest_hash(data_dir: str | Path) -> str:
    return sha256_file(Path(data_dir) / MANIFEST)
