"""Files: hashing and the one atomic write every writer uses.

    with atomic_path(RUN / "best.json") as tmp:   # write tmp however you like; renamed on success
        tmp.write_text(...)
    write_json_atomic(RUN / "best.json", record)
    sha256_file(path)

A reader never sees half a file: the data goes to a hidden temp file beside the target (same
filesystem, so the rename is atomic) and `os.replace` puts it in place only when the write
finished; on an exception the temp file is removed and the old target stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, tag: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` (a file, or a new directory if `directory`); on success it
    replaces `path` in one rename (an existing directory target is removed first). The temp name
    is `temp_path(path, tag)`: by default this process's, or one that other processes can
    compute too (a checkpoint directory all ranks write into)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, tag)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def temp_path(path: str | Path, tag: str | None = None) -> Path:
    """The hidden temp name beside `path` that `atomic_path` writes first."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{tag or os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
