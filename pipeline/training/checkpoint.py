"""Full training checkpoints for exact resume, written atomically; the newest K are kept.

    RUN/checkpoints/ckpt-000012345/state.pt      G, D, G_ema, both optimizers and scalers,
                                                 counters, resolved config (written by rank 0)
    RUN/checkpoints/ckpt-000012345/rank-0003.pt  that rank's RNG states and loader position

Every file goes into `.ckpt-...tmp/` first and the directory is renamed when all ranks have
written theirs: a directory named `ckpt-*` is always complete. Loading uses
`torch.load(weights_only=True)`: a checkpoint cannot execute code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

PREFIX = "ckpt-"


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
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.pt").is_file())


def save_checkpoint(run_dir: Path, cur_nimg: int, *, rank: int, world_size: int, shared: Callable[[], dict] | None,
                    per_rank: dict, barrier: Callable[[], None], keep: int) -> Path:
    """Collective: every rank calls it. `shared()` is evaluated on rank 0 only."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{cur_nimg:09d}"
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(_portable(per_rank), tmp / f"rank-{rank:04d}.pt")
    if rank == 0:
        torch.save(_portable(shared()), tmp / "state.pt")
    barrier()
    if rank == 0:
        expected = {f"rank-{r:04d}.pt" for r in range(world_size)}
        missing = expected - {p.name for p in tmp.iterdir()}
        if missing:
            raise RuntimeError(f"checkpoint {final}: ranks did not write {sorted(missing)}; is {run_dir} "
                               "on storage shared by every node?")
        if final.exists():          # the same nimg saved twice (e.g. preempted right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> tuple[dict, dict | None]:
    """(shared state, this rank's state or None when the checkpoint has no file for this rank)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rank_file = path / f"rank-{rank:04d}.pt"
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else None
    return state, per_rank
