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
import socket
import threading
import time
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


class LockFile:
    """One holder at a time of `path`, on any filesystem and across hosts: the file is created with
    O_EXCL (atomic on local disks, NFS v3+ and Lustre, where flock may not be) and says who holds
    it (host, pid, since, and `extra`). Its holder refreshes its mtime every `HEARTBEAT_S`. It is
    stale when its process is gone (same host) or its heartbeat is older than `STALE_S` (another
    host: a killed job, a lost node); a stale one is moved aside by rename, which only one newcomer
    can do, and taken. Used for the trainer's run lock and the evaluator's per-snapshot claims."""

    HEARTBEAT_S = 30.0
    STALE_S = 180.0

    def __init__(self, path: Path, extra: dict | None = None):
        self.path, self.extra = path, extra or {}
        self.holder: dict = {}          # who holds it when `acquire` returned False
        self.age = 0.0                  # seconds since the holder's last heartbeat
        self._mine: dict | None = None
        self._stop = threading.Event()

    def acquire(self) -> bool:
        """Take the claim (True), or find it held by a live scorer (False, `holder` says who)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              **self.extra}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.holder, self.age = self._read()
                if not self._stale(self.holder, self.age):
                    return False
                try:        # stale: move it aside (one newcomer wins the rename), then try again
                    os.rename(self.path, self.path.with_name(f"{self.path.name}.stale-{os.getpid()}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._mine, self._stop = me, threading.Event()
            threading.Thread(target=self._beat, args=(self._stop,), name="ganpipe-lock", daemon=True).start()
            for old in self.path.parent.glob(f"{self.path.name}.stale-*"):
                old.unlink(missing_ok=True)
            return True
        self.holder = self._read()[0] or {"host": "?", "pid": "?", "since": "?"}
        return False

    def release(self) -> None:
        self._stop.set()
        if self._mine is not None and self._read()[0] == self._mine:
            self.path.unlink(missing_ok=True)
        self._mine = None

    def describe(self) -> str:
        h = self.holder
        return f"{h.get('host', '?')} pid {h.get('pid', '?')} since {h.get('since', '?')} ({self.path})"

    def _read(self) -> tuple[dict, float]:
        """(what the claim says, seconds since its last heartbeat); ({}, 0) when it is gone or being written."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}, 0.0
        return (holder if isinstance(holder, dict) else {}), age

    def _stale(self, holder: dict, age: float) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True                 # its process is gone
            except PermissionError:
                pass                        # alive, another user's
            return False
        return age > self.STALE_S

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
