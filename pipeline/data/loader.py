"""Endless, deterministic, resumable streaming of shard batches to every rank and worker.

    loader = StreamLoader.from_config(cfg.data, batch_size=32, seed=cfg.seed, rank=0, world_size=1,
                                      device=device, require_labels=cfg.model.conditional)
    for images, labels in loader:        # images float [-1, 1] NCHW, labels int64 (-1 = none)
        ...
    state = loader.state_dict()          # exact position of every stream; load_state_dict resumes

How the stream is split. There are S = world_size x num_workers streams; stream s belongs to
rank s // W, worker s % W. Every epoch, one permutation of the shards (seeded by seed and epoch,
the same on every rank) is dealt out round-robin: stream s reads positions s, s+S, s+2S, ... So
within an epoch the streams read disjoint shards that together cover all of them, and over epochs
every stream sees every shard (the stream never ends: "resampled" by epoch-wise reshuffling).
With fewer shards than streams, each shard is split into k = ceil(S / num_shards) parts by sample
index (part r keeps samples i with i % k == r), so the dealing still covers every sample once per
epoch without overlap.

Each stream reads its shards sequentially (plain or gzip tar; a shard that cannot be read at all,
such as a `pipe:` command that fails, is an error naming its URL unless data.max_bad_fraction=1).
A shard named by a manifest or a local pattern is opened as a local file, always; only a
`data.path` the user wrote with a URL scheme (`pipe:`, `https://`, ...) goes through webdataset's
`gopen`, so no file name and no manifest entry can make the loader run a command (docs/data.md).
A manifest's shards must be what it lists: every size is checked when the loader is built, and
each shard's sha256 when a process first opens it, before any of its samples is used (a
`DataError` naming the shard otherwise: the run's record names the manifest, so it would lie).
Each stream decodes and checks each sample
(`shards.read_samples`, the reader `ganpipe verify` uses too), feeds a shuffle buffer, and emits
whole batches. Every batch carries the stream's state after it: epoch, shard position, sample
index, RNG state, the (shard, index) references of what is in the shuffle buffer, and bad-sample
counters. The main process keeps the newest state per stream; restoring re-reads exactly the
buffered samples, so a resumed stream continues with the very batches the uninterrupted one
would have produced.

Worker processes ignore the signals the trainer handles (`dist.Preemption`: SIGTERM, SIGUSR1,
SIGINT): Slurm, `kill -- -PGID` and launchers signal the whole process group, and a worker that
died of it would take the preemption checkpoint with it. The signals are blocked while the
workers are forked, so a worker is covered from its first instruction, not only once
`worker_init_fn` runs. Only a SIGTERM sent by the worker's own parent (how DataLoader stops a
worker that does not exit in time) ends it. On Linux a worker is also killed when its parent dies
(PR_SET_PDEATHSIG), so a SIGKILLed trainer leaves no workers. A DataError
in a worker travels to the main process as a record and is raised there as one line.

Batches go to the training device without making the host wait for it. With `speed.pin_memory`
(on a GPU) the workers hand images and labels over as tensors, which DataLoader's pin thread copies
into page-locked memory, so the copy to the device is an asynchronous DMA; without it the copy is
from pageable memory (staged by the driver, still not waiting for the device's queued work).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import re
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import dist
from pipeline.data.manifest import check_shard, read_manifest, shard_path
from pipeline.data.shards import bad_sample, read_samples
from pipeline.errors import DataError, printable


URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass
class ShardSet:
    """Resolved input: shard URLs plus the shape every sample must have."""
    urls: list[str]
    num_samples: list[int | None]   # per shard, from the manifest (None for bare URL patterns)
    resolution: int
    channels: int
    num_classes: int                # 0 = unlabelled or unknown
    remote: bool = False            # urls are the user's own URL pattern (gopen); else local file paths
    data_dir: Path | None = None    # the manifest's directory (None for URL patterns)
    entries: list[dict] | None = None   # per shard, its manifest entry: what the file must be
    verified: set[int] = field(default_factory=set, repr=False)   # shards hashed by this process

    def open(self, shard: int):
        """A binary stream of shard `shard`: a local file, or (remote only) webdataset's gopen.

        A shard of a manifest is hashed the first time this process opens it, from the very
        file object then read, and a `DataError` ends the run when it is not the manifest's.
        """
        if not self.remote:
            f = open(self.urls[shard], "rb")
            if self.entries is not None and shard not in self.verified:
                try:
                    check_shard(self.data_dir, self.entries[shard], fileobj=f)
                except BaseException:
                    f.close()
                    raise
                self.verified.add(shard)
            return f
        from webdataset.gopen import gopen

        return gopen(self.urls[shard], "rb")

    def name(self, shard: int) -> str:
        """Shard `shard` as it may be printed in a message."""
        return printable(self.urls[shard])

    @staticmethod
    def resolve(path: str, split: str = "train", resolution: int = 0, channels: int = 0,
                num_classes: int = 0) -> "ShardSet":
        """A prepared directory (manifest.json) or a URL pattern with brace expansion ('::' joins lists).

        A URL pattern has no manifest, so its shape and number of classes come from the
        arguments (`data.resolution`, `data.channels`, `data.num_classes`); for a directory the
        manifest's count is used, and a different nonzero `num_classes` is an error.
        """
        if not path:
            raise DataError("data.path is empty: set it to a directory made by `ganpipe prepare` "
                            "or to a shard URL pattern like 'shards/train-{000000..000009}.tar'")
        p = Path(path).expanduser()
        if p.is_dir():
            m = read_manifest(p)
            if split not in m["splits"]:
                raise DataError(f"{printable(str(p))}: no split '{printable(split)}' in the manifest "
                                f"(has: {printable(', '.join(m['splits']))}); "
                                "set data.split")
            # The data's shape is the manifest's: a different one asked for is refused, never ignored
            # (the run directory would record a shape that was not trained).
            for key, asked, has in (("num_classes", num_classes, m["num_classes"]),
                                    ("resolution", resolution, m["resolution"]), ("channels", channels, m["channels"])):
                if asked and asked != has:
                    again = "" if key == "num_classes" else f", re-prepare the data with `ganpipe prepare --{key} {asked}`"
                    raise DataError(f"data.{key}={asked} but {printable(str(p))}'s manifest says {has}; set "
                                    f"data.{key}=0 (the manifest's){again}, or point data.path at the intended data")
            shards = m["splits"][split]["shards"]
            # Every size now (a stat each), every hash when its shard is first read (`open`).
            for shard in shards:
                check_shard(p, shard, full=False)
            # Absolute local paths: a manifest entry is a file name, never a URL or a command.
            return ShardSet([str(shard_path(p, s).absolute()) for s in shards], [s["num_samples"] for s in shards],
                            m["resolution"], m["channels"], m["num_classes"], data_dir=p, entries=shards)
        from webdataset.shardlists import expand_urls

        remote = bool(URL_SCHEME.match(path)) and not path.startswith("file:")
        urls = expand_urls(path)
        if not remote:
            urls = [str(Path(u.removeprefix("file:")).expanduser().absolute()) for u in urls]
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise DataError(f"data.path '{printable(path)}': {len(missing)} of {len(urls)} shards do not exist "
                                f"(first: {printable(missing[0])}); point it at a prepared directory or existing "
                                "shards")
        if not resolution or not channels:
            raise DataError(f"data.path '{printable(path)}' is a URL pattern without a manifest: set data.resolution "
                            "and data.channels to the shape of its images")
        return ShardSet(list(urls), [None] * len(urls), resolution, channels, num_classes, remote)


def epoch_assignment(num_shards: int, num_streams: int, seed: int, epoch: int, stream: int
                     ) -> list[tuple[int, int, int]]:
    """(shard, part, num_parts) read by `stream` in `epoch`: disjoint across streams, covering all."""
    parts = max(1, math.ceil(num_streams / num_shards))
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards * parts)
    return [(int(v) % num_shards, int(v) // num_shards, parts) for v in order[stream::num_streams]]


def _collate_identity(batch):
    return batch


def _collate_tensors(batch):
    """In the worker: images and labels as tensors, which DataLoader's pin thread can pin (it
    leaves numpy arrays as they are) and which travel to the main process in shared memory."""
    if "images" in batch:
        batch = {**batch, "images": torch.from_numpy(batch["images"]), "labels": torch.from_numpy(batch["labels"])}
    return batch


def to_device(tensor: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    """`tensor` on `device`, copied without making the host wait for the device either way.

    Pinned (`speed.pin_memory` on a GPU): page-locked memory, so the copy is a DMA that overlaps
    the host's next work; a tensor that comes unpinned (no worker process) is pinned here first.
    Unpinned: from pageable memory, which the driver stages through a buffer of its own before the
    copy returns, but still without waiting for the device's queued work, unlike a blocking copy
    (a host synchronisation in every step, which `speed.sync_debug` would fail).
    """
    if pinned and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


_PR_SET_PDEATHSIG = 1
AUTO_WORKERS_GPU = 2


def auto_workers(configured: int, device: torch.device | str | None) -> int:
    """`data.num_workers`, with -1 (auto) resolved: 2 per process when training on a GPU, where
    decoding overlaps the device's work; 0 on a CPU-only run, where torch's threads already fill
    every core and a worker would take cycles from them (`ganpipe bench train`, docs/benchmarks.md)."""
    if configured >= 0:
        return configured
    return AUTO_WORKERS_GPU if device is not None and torch.device(device).type == "cuda" else 0


@contextlib.contextmanager
def _signals_held(signals) -> Iterator[None]:
    """Block `signals` in this thread while DataLoader forks its workers, then restore the mask.

    A forked child inherits the mask, so a signal sent to the whole group while a worker starts
    up stays pending until `_init_worker` has decided what it means: before that, torch's own
    SIGTERM handler (installed before `worker_init_fn` runs) would end the worker, and with it
    the preemption checkpoint. Here, what arrives meanwhile is delivered when the mask is restored.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _init_worker(trainer_pid: int, direct_child: bool, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: survive the trainer's signals, die with the trainer."""
    # The main process turns these into a checkpoint and a clean exit; a worker must not die of
    # them first (the main process then fails with "DataLoader worker ... killed by signal").
    # They are blocked since the fork (`_signals_held`): one that came while this worker started
    # is pending, and ignoring a signal discards it.
    linux = sys.platform.startswith("linux")
    if linux:
        # ... but a pending SIGTERM from the trainer itself (below) still means "stop". (Blocked
        # here too: a forkserver's children do not inherit the trainer's mask.)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        while (info := signal.sigtimedwait({signal.SIGTERM}, 0)) is not None:
            if info.si_pid == trainer_pid:
                os._exit(0)
    for sig in dist.Preemption.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if not linux:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, dist.Preemption.SIGNALS)
        return
    # Yet the trainer itself stops workers with SIGTERM (one slow to shut down; exiting with the
    # loader still alive). Only it means it: take SIGTERM synchronously, where the sender's pid is
    # visible, and exit when the sender is the trainer. SIGTERM stays blocked (threads started
    # later inherit that); the others need not be.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(dist.Preemption.SIGNALS) - {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(trainer_pid,), daemon=True,
                     name="sigterm-from-trainer").start()
    if not direct_child:
        return
    # PDEATHSIG fires when the parent (thread) that started us exits, even by SIGKILL. Armed only
    # now, so the parent may already be gone: then we were re-parented, and exit ourselves.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != trainer_pid:
        os._exit(1)


def _exit_on_sigterm_from(trainer_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == trainer_pid:
            os._exit(0)


class ShardStreamDataset(IterableDataset):
    """The per-worker half: one stream per (rank, worker), yielding numpy batches plus state."""

    def __init__(self, shards: ShardSet, *, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, shuffle_buffer: int, hflip: bool, require_labels: bool,
                 max_bad_fraction: float, cache_mb: float = 0, resume: dict[int, dict] | None = None,
                 worker_offset: int = 0):
        self.shards = shards
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.hflip = hflip
        self.require_labels = require_labels
        self.max_bad_fraction = max_bad_fraction
        self.resume = resume or {}
        self.worker_offset = worker_offset
        self.last_error = ""
        self.first_bad: dict[int, str] = {}    # shard -> its first bad sample, named with its source
        self.cache: dict[tuple[int, int, int], tuple[list, str]] = {}
        self.cache_bytes = int(cache_mb * 2**20)
        self.cache_used = 0

    @property
    def num_streams(self) -> int:
        return self.world_size * self.workers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.worker_offset) % self.workers
        if info is None:
            yield from self.stream(self.rank * self.workers + local)
            return
        try:
            yield from self.stream(self.rank * self.workers + local)
        except DataError as exc:
            # Raised in a worker, torch would wrap it in a RuntimeError with the worker's whole
            # traceback; the main process raises it again from this record (`StreamLoader.next_raw`).
            yield {"error": str(exc)}

    # -- reading -------------------------------------------------------------------------------

    def _read(self, shard: int, start: int, part: int, parts: int, counts: Counter
              ) -> Iterator[tuple[int, np.ndarray | None, int]]:
        """(index, CHW uint8, label) for samples i >= start with i % parts == part, in file order.

        A bad sample comes out with image None (and is counted by kind), so callers can still
        advance their position past it. A truncated or corrupt tar ends the shard early: counted as
        `read_error`, its message kept in `self.last_error`. Complete passes are kept decoded in
        memory while `cache_bytes` allows, and later passes replay them (same samples, same order,
        same counts), so small datasets are decoded once per worker.
        """
        key = (shard, part, parts)
        if key in self.cache:
            entries, error = self.cache[key]
            for index, image, label, kind in entries:
                if index >= start:
                    if kind is not None:
                        counts[kind] += 1
                    yield index, image, label
            if error:
                counts["read_error"] += 1
                self.last_error = error
            return
        url = self.shards.urls[shard]
        index, error, record = -1, "", start == 0 and self.cache_used < self.cache_bytes
        entries: list = []
        stream = None
        try:
            stream = self.shards.open(shard)
            for index, sample_key, image, label, bad in read_samples(
                    stream, url, channels=self.shards.channels, resolution=self.shards.resolution,
                    num_classes=self.shards.num_classes, require_label=self.require_labels,
                    select=lambda i: i >= start and i % parts == part):
                kind = bad.kind if bad is not None else None
                if kind is not None:
                    counts[kind] += 1
                    self.first_bad.setdefault(shard, bad_sample(sample_key, bad))
                if record:
                    entries.append((index, image, label, kind))
                yield index, image, label
        except DataError:          # not the manifest's shard: nothing of it may be used
            raise
        except Exception as exc:  # TruncatedTar, a failed pipe or file: skip the rest, go on
            counts["read_error"] += 1
            where = f"after sample {index}" if index >= 0 else "before its first sample"
            status = getattr(stream, "status", None)         # a `pipe:` command's exit status
            if self.shards.remote and url.startswith("pipe:") and status not in (None, 0, 141):
                # gopen's own message is a repr of Popen's arguments: say it plainly
                cause = f"the command exited with status {status} (its own message, if any, is on stderr)"
                if not isinstance(exc, OSError):
                    cause += f"; {type(exc).__name__}: {exc}"
            else:
                cause = f"{type(exc).__name__}: {exc}"
            error = self.last_error = f"{cause} ({where})"
        finally:
            if stream is not None and not self.shards.remote:
                stream.close()
        if record:
            self.cache[key] = (entries, error)
            self.cache_used += sum(e[1].nbytes for e in entries if e[1] is not None)

    def _fetch(self, refs: np.ndarray) -> list[tuple[int, int, np.ndarray, int]]:
        """Re-read the samples named by (shard, index) refs, in ref order (buffer restore)."""
        found: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
        for shard in sorted({int(s) for s in refs[:, 0]}):
            wanted = {int(i) for s, i in refs if s == shard}
            for index, image, label in self._read(shard, min(wanted), 0, 1, Counter()):
                if index in wanted and image is not None:
                    found[(shard, index)] = (image, label)
                    wanted.discard(index)
                    if not wanted:
                        break
        missing = [(int(s), int(i)) for s, i in refs if (int(s), int(i)) not in found]
        if missing:
            s, i = missing[0]
            raise DataError(f"resume: sample {i} of shard {self.shards.name(s)} can no longer be read "
                            f"({len(missing)} buffered samples missing); the shards changed since the "
                            "checkpoint; restore them or start a new run")
        return [(int(s), int(i), *found[(int(s), int(i))]) for s, i in refs]

    def _check_pass(self, shard: int, part: int, parts: int, start: int, seen: int, good: int,
                    pass_counts: Counter) -> None:
        """Count samples a truncated shard lost; fail when a shard pass is too bad to train on."""
        expected = self.shards.num_samples[shard]
        decoded_bad = seen - good
        if expected is None and seen == 0 and pass_counts["read_error"] and self.max_bad_fraction < 1:
            # Nothing says how many samples were lost (no manifest): the whole shard is, as the
            # manifest's count would make it. A failed `pipe:` command ends here, in one line.
            raise DataError(f"shard {self.shards.name(shard)} could not be read: {self.last_error}; check the "
                            "URL (for pipe: run its command by hand), or set data.max_bad_fraction=1 to skip "
                            "unreadable shards")
        if expected is not None:
            # Indices i >= start with i % parts == part below `expected`, counted (not listed: the
            # manifest's count is bounded by the shard's size, yet may be large).
            first = part + max(0, -(-(start - part) // parts)) * parts
            total = max(0, -(-(expected - first) // parts))
            missing = total - seen
            if missing > 0:
                pass_counts["truncated"] += missing
        else:
            total, missing = seen, 0
        bad = decoded_bad + max(missing, 0)
        if total and bad / total > self.max_bad_fraction:
            detail = f"; {self.last_error}" if pass_counts["read_error"] else ""
            if shard in self.first_bad:
                detail += f"; first bad sample: {self.first_bad[shard]}"
            raise DataError(
                f"shard {self.shards.name(shard)}: {bad} of {total} samples bad ({dict(pass_counts)}{detail}), "
                f"above data.max_bad_fraction={self.max_bad_fraction}; run `ganpipe verify` on the data, "
                "re-prepare it, or raise data.max_bad_fraction")

    def stream(self, sid: int) -> Iterator[dict]:
        """Endless batches of stream `sid`, each with the stream's state after it."""
        n_shards = len(self.shards.urls)
        st = self.resume.get(sid)
        rng = np.random.default_rng([self.seed, sid, 0xB0F])
        counts: Counter = Counter()
        epoch, pos, start = 0, 0, 0
        buffer: list[tuple[int, int, np.ndarray, int]] = []   # (shard, index, image, label)
        if st is not None:
            epoch, pos, start = st["epoch"], st["pos"], st["next_index"]
            rng.bit_generator.state = st["rng"]
            counts.update(st["counts"])
            if len(st["buffer"]):
                buffer = self._fetch(np.asarray(st["buffer"]).reshape(-1, 2))

        def samples() -> Iterator[tuple[int, int, np.ndarray, int]]:
            nonlocal epoch, pos, start
            while True:
                full_epoch, good_this_epoch = pos == 0 and start == 0, 0
                plan = epoch_assignment(n_shards, self.num_streams, self.seed, epoch, sid)
                while pos < len(plan):
                    shard, part, parts = plan[pos]
                    pass_counts: Counter = Counter()
                    pass_start, seen, good = start, 0, 0
                    for index, image, label in self._read(shard, start, part, parts, pass_counts):
                        seen += 1
                        start = index + 1
                        if image is not None:
                            good += 1
                            yield shard, index, image, label
                    self._check_pass(shard, part, parts, pass_start, seen, good, pass_counts)
                    counts.update(pass_counts)
                    good_this_epoch += good
                    pos, start = pos + 1, 0
                if full_epoch and good_this_epoch == 0:
                    cause = f"bad samples: {dict(counts) or 'none'}"
                    if self.last_error:
                        cause += f"; last read error: {self.last_error}"
                    raise DataError(f"stream {sid} read a whole epoch of shards without one usable sample "
                                    f"(first shard: {self.shards.name(0)}; {cause}); check data.path, "
                                    "data.resolution and data.channels, and run `ganpipe verify`")
                epoch, pos = epoch + 1, 0

        source = samples()
        while len(buffer) < self.shuffle_buffer:
            buffer.append(next(source))
        batches = 0 if st is None else st["batches"]
        while True:
            images, labels, refs = [], [], []
            for _ in range(self.batch_size):
                item = next(source)
                if self.shuffle_buffer:
                    j = int(rng.integers(len(buffer)))
                    item, buffer[j] = buffer[j], item
                shard, index, image, label = item
                if self.hflip and rng.random() < 0.5:
                    image = image[:, :, ::-1]
                images.append(image)
                labels.append(label)
                refs.append((shard, index))
            batches += 1
            yield {
                "images": np.stack(images),
                "labels": np.asarray(labels, dtype=np.int64),
                "refs": np.asarray(refs, dtype=np.int64),
                "state": {
                    "stream": sid, "epoch": epoch, "pos": pos, "next_index": start, "batches": batches,
                    "rng": rng.bit_generator.state, "counts": dict(counts),
                    "buffer": np.asarray([(s, i) for s, i, _, _ in buffer], dtype=np.int64).reshape(-1, 2),
                },
            }


class StreamLoader:
    """The main-process half: a DataLoader over the streams of one rank, with resumable state.

    Training builds it with `from_config`; the constructor spells every option (tests, benches).
    """

    def __init__(self, shards: ShardSet, *, batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, num_workers: int = 0, shuffle_buffer: int = 1000,
                 hflip: bool = False, require_labels: bool = False, max_bad_fraction: float = 0.05,
                 cache_mb: float = 0, device: torch.device | str | None = None, pin_memory: bool = False):
        if rank is None or world_size is None:
            rank, world_size = dist.rank(), dist.world_size()
        if not 0 <= rank < world_size:
            raise DataError(f"loader rank {rank} is outside world_size {world_size}: start the process group "
                            "before building the loader, or pass rank and world_size that match the launch")
        if require_labels and shards.num_classes == 0:
            raise DataError(f"labels are required but the data ({shards.name(0)} ...) has no classes; "
                            "prepare labelled data (for a URL pattern, set data.num_classes), or train an "
                            "unconditional model (model.conditional=false, data.require_labels=false)")
        self.shards = shards
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.options = dict(shuffle_buffer=shuffle_buffer, hflip=hflip, require_labels=require_labels,
                            max_bad_fraction=max_bad_fraction, cache_mb=cache_mb)
        self.device = torch.device(device) if device is not None else None
        # speed.pin_memory: workers hand over tensors (for pinning); pinned only where there is a GPU.
        self.pin_memory = bool(pin_memory)
        self.pinned = self.pin_memory and self.device is not None and self.device.type == "cuda"
        self.streams: dict[int, dict] = {}     # newest state per stream of this rank
        self.next_local = 0                    # local stream the next batch comes from
        self.last_refs: np.ndarray | None = None
        self.last_stream: int | None = None
        self._iter: Iterator[dict] | None = None

    @classmethod
    def from_config(cls, data_cfg, *, batch_size: int, seed: int, rank: int | None = None,
                    world_size: int | None = None, device: torch.device | str | None = None,
                    require_labels: bool, pin_memory: bool = False) -> "StreamLoader":
        """The loader `data_cfg` (a `DataConfig`) describes: the way training builds one.

        `batch_size` is per process; rank and world size default to `pipeline.dist`'s. Labels are
        required when the model needs them (`require_labels`, a conditional model) or when
        `data.require_labels` says so: the config can add the requirement, never waive it.
        `pin_memory` is `speed.pin_memory` (page-locked batches and asynchronous copies to a GPU).
        """
        shards = ShardSet.resolve(data_cfg.path, data_cfg.split, data_cfg.resolution, data_cfg.channels,
                                  data_cfg.num_classes)
        return cls(shards, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                   num_workers=auto_workers(data_cfg.num_workers, device), shuffle_buffer=data_cfg.shuffle_buffer,
                   hflip=data_cfg.hflip, require_labels=data_cfg.require_labels or require_labels,
                   max_bad_fraction=data_cfg.max_bad_fraction, cache_mb=data_cfg.cache_mb, device=device,
                   pin_memory=pin_memory)

    def _start(self) -> Iterator[dict]:
        dataset = ShardStreamDataset(
            self.shards, batch_size=self.batch_size, seed=self.seed, rank=self.rank,
            world_size=self.world_size, num_workers=self.num_workers, resume=dict(self.streams),
            worker_offset=self.next_local, **self.options)
        if self.num_workers == 0:
            return iter(dataset)
        context = torch.multiprocessing.get_context()
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            collate_fn=_collate_tensors if self.pin_memory else _collate_identity,
                            pin_memory=self.pinned,
                            prefetch_factor=2, persistent_workers=False, multiprocessing_context=context,
                            # A forkserver's children are not ours: only fork and spawn get PDEATHSIG.
                            worker_init_fn=functools.partial(_init_worker, os.getpid(),
                                                             context.get_start_method() in ("fork", "spawn")),
                            # Its own generator: starting workers draws a base seed, and drawing it
                            # from the global RNG would shift training randomness on every resume.
                            generator=torch.Generator().manual_seed(self.seed))
        with _signals_held(dist.Preemption.SIGNALS):       # workers start with them blocked
            return iter(loader)

    def next_raw(self) -> dict:
        """The next batch as produced by its stream (uint8 images and labels: numpy, or tensors from
        worker processes under `pin_memory`), recording its state."""
        if self._iter is None:
            self._iter = self._start()
        batch = next(self._iter)
        if "error" in batch:
            self._iter = None                  # shuts the workers down
            raise DataError(batch["error"])
        st = batch["state"]
        self.streams[st["stream"]] = st
        workers = max(1, self.num_workers)
        self.next_local = (st["stream"] - self.rank * workers + 1) % workers
        self.last_refs, self.last_stream = batch["refs"], st["stream"]
        return batch

    def close(self) -> None:
        """Stop the worker processes now (the next batch starts them again, where the stream was)."""
        self._iter = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.next_raw()
        images, labels = torch.as_tensor(batch["images"]), torch.as_tensor(batch["labels"])
        if self.device is not None:
            images, labels = (to_device(t, self.device, self.pinned) for t in (images, labels))
        # uint8 travels from the worker; the float conversion happens here (on the device if given).
        return images.float().div_(127.5).sub_(1.0), labels

    # -- counters and state ----------------------------------------------------------------------

    def bad_counts(self) -> dict[str, int]:
        """Bad samples skipped so far by this rank's streams, by kind (undecodable, truncated, ...)."""
        total: Counter = Counter()
        for st in self.streams.values():
            total.update(st["counts"])
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "rank": self.rank,
                "seed": self.seed, "num_shards": len(self.shards.urls), "next_local": self.next_local,
                "streams": {int(k): v for k, v in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; only exact when world size, workers, seed and shards match."""
        same = (state["world_size"] == self.world_size and state["num_workers"] == self.num_workers
                and state["seed"] == self.seed and state["num_shards"] == len(self.shards.urls))
        if not same:
            raise DataError(
                "loader state was saved with world_size={world_size}, num_workers={num_workers}, seed={seed}, "
                "{num_shards} shards; this run has a different layout, so the stream position cannot be "
                "restored exactly; start a fresh stream (load no loader state)".format(**state))
        self.streams = {int(k): v for k, v in state["streams"].items()}
        self.next_local = state["next_local"]
        self._iter = None

