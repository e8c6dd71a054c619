"""Full training checkpoints for exact resume, written atomically; the newest K are kept.

    RUN/checkpoints/ckpt-000012345/state.pt      G, D, G_ema, both optimizers and scalers,
                                                 counters, ADA's p, penalty state (pl's mean),
                                                 resolved config (written by rank 0)
    RUN/checkpoints/ckpt-000012345/rank-0003.pt  that rank's RNG states and loader position

Every file goes into `.ckpt-....tmp-partial/` first and the directory is renamed when all ranks have
written theirs: a directory named `ckpt-*` is always complete. `checksums.json` holds the sha256
of every file, so damage (a truncated copy, a bad disk) is recognised before unpickling; resume
then names the file and falls back to the checkpoint before. Loading uses
`torch.load(weights_only=True)`: a checkpoint cannot execute code.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline import dist
from pipeline.errors import TrainingError
from pipeline.io import atomic_path, sha256_file, temp_path, write_json_atomic
from pipeline.rundir import RunDir
from pipeline.training.state import check_counters

PREFIX = "ckpt-"
CHECKSUMS = "checksums.json"     # sha256 of every file, written last
TMP_TAG = "partial"         # one temp name all ranks can compute (not a pid: ranks differ)


def _portable(obj: Any) -> Any:
    """numpy arrays -> tensors, so that the weights-only unpickler accepts the state."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(v) for v in obj)
    return obj


def checkpoint_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.pt").is_file())


def save_checkpoint(run_dir: Path, cur_nimg: int, *, shared: Callable[[], dict] | None, per_rank: dict,
                    keep: int) -> Path:
    """Collective: every rank (of `pipeline.dist`) calls it. `shared()` is evaluated on rank 0 only;
    the directory is renamed into place by rank 0 once every rank's file is in it."""
    rank, world_size = dist.rank(), dist.world_size()
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{cur_nimg:09d}"
    tmp = temp_path(final, TMP_TAG)
    with (atomic_path(final, directory=True, tag=TMP_TAG) if rank == 0 else contextlib.nullcontext(tmp)):
        dist.barrier()                          # rank 0 made the directory
        try:
            _write(_portable(per_rank), tmp / f"rank-{rank:04d}.pt")
            if rank == 0:
                _write(_portable(shared()), tmp / "state.pt")
        except OSError as exc:
            raise TrainingError(f"checkpoint {final} not written: {exc.strerror or exc} ({exc.filename}); the "
                                f"earlier checkpoints in {root} are kept; free the space (or fix the permissions) "
                                "and run the same command again to resume") from None
        dist.barrier()                          # every rank wrote its file
        if rank == 0:
            missing = {f"rank-{r:04d}.pt" for r in range(world_size)} - {p.name for p in tmp.iterdir()}
            if missing:
                raise RuntimeError(f"checkpoint {final}: ranks did not write {sorted(missing)}; is {run_dir} "
                                   "on storage shared by every node?")
            # Written last: a damaged file is recognised before it is unpickled.
            write_json_atomic(tmp / CHECKSUMS, {p.name: sha256_file(p) for p in sorted(tmp.glob("*.pt"))})
    if rank == 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _write(obj: dict, path: Path) -> None:
    """torch.save through a Python file, so that a full disk or a read-only directory is an
    OSError naming the file and the reason (torch's own writer reports only a stream failure)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def load_checkpoint(path: Path, rank: int) -> tuple[dict, dict | None]:
    """(shared state, this rank's state or None when the checkpoint has no file for this rank).
    Raises `CheckpointDamaged` naming the file when a checksum, the safe unpickler or a counter
    says it is not what was written."""
    sums = _checksums(path)
    state = _load(path / "state.pt", sums)
    if problem := check_counters(state, int(path.name[len(PREFIX):])):
        raise CheckpointDamaged(f"{path / 'state.pt'}: {problem}")
    rank_file = path / f"rank-{rank:04d}.pt"
    per_rank = _load(rank_file, sums) if rank_file.is_file() else None
    return state, per_rank


def load_newest_checkpoint(run_dir: Path, rank: int, log: Callable[[str], None]
                           ) -> tuple[Path, dict, dict | None] | None:
    """The newest checkpoint that loads, falling back past damaged ones (each named in the log)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return (path, *load_checkpoint(path, rank))
        except CheckpointDamaged as exc:
            log(f"resume: skipping damaged checkpoint: {exc}; trying the one before")
    return None


class CheckpointDamaged(ValueError):
    """A checkpoint file that does not match its checksum or does not load safely."""


def _checksums(path: Path) -> dict | None:
    """The checksums written with the checkpoint (None for checkpoints that predate them)."""
    f = path / CHECKSUMS
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(f"{f}: unreadable ({exc})") from None


def _load(file: Path, sums: dict | None) -> dict:
    try:
        if sums is not None and sums.get(file.name) != sha256_file(file):
            raise CheckpointDamaged(f"{file}: sha256 does not match {CHECKSUMS} (truncated or modified)")
        # weights_only: a checkpoint never runs code. Its own errors suggest unsafe loading: not ours.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except CheckpointDamaged:
        raise
    except Exception as exc:  # noqa: BLE001 - EOF, unpickling, zip errors come in many types
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "empty or truncated"
        raise CheckpointDamaged(f"{file}: does not load ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointDamaged(f"{file}: holds {type(state).__name__}, not a checkpoint")
    return state
