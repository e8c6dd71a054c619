"""One scorer per snapshot and protocol: `ganpipe eval --all` beside `ganpipe watch` (or two of
either, on one host or several) never score the same snapshot twice.

    claim = Claim(RunDir(RUN).claim(key))      # key: the snapshot's sha256 and the protocol's
    if claim.acquire():                        # False: someone else is scoring it (claim.holder says who)
        try:
            ...score, record...
        finally:
            claim.release()

A claim is a file created with O_EXCL (atomic on local disks, NFS v3+ and Lustre, where flock
may not be) that says who holds it: host, pid, since. Its holder refreshes its mtime every
`HEARTBEAT_S` while it scores. A claim is stale when its process is gone (same host) or its
heartbeat is older than `STALE_S` (another host: a killed job, a lost node); a stale claim is
moved aside by rename, which only one newcomer can do, and taken.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path


class Claim:
    HEARTBEAT_S = 30.0
    STALE_S = 180.0

    def __init__(self, path: Path):
        self.path = path
        self.holder: dict = {}          # who holds it when `acquire` returned False
        self._mine: dict | None = None
        self._stop = threading.Event()

    def acquire(self) -> bool:
        """Take the claim (True), or find it held by a live scorer (False, `holder` says who)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.holder, age = self._read()
                if not self._stale(self.holder, age):
                    return False
                try:        # stale: move it aside (one newcomer wins the rename), then try again
                    os.rename(self.path, self.path.with_name(f"{self.path.name}.stale-{os.getpid()}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._mine, self._stop = me, threading.Event()
            threading.Thread(target=self._beat, args=(self._stop,), name="ganpipe-claim", daemon=True).start()
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
        return f"{h.get('host', '?')} pid {h.get('pid', '?')} since {h.get('since', '?')} (claim {self.path})"

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
