"""The one owner of distributed state: every other module asks here, none touches
`torch.distributed` or the launcher's environment variables itself.

    rank(), world_size(), is_main(), barrier()          # work with or without a process group
    all_reduce_sum(t), all_reduce_max(t), all_gather(t), gather_objects(x), broadcast_object(x)
    with Preemption() as stop: ... stop.requested()     # SIGTERM/SIGUSR1 -> flag, handlers restored
    check_ranks_identical({"G": G, "D": D})             # raise if DDP let the replicas drift

Without a process group (one process) every collective is the identity. The launcher's variables
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, set by torchrun, accelerate and our
Slurm scripts) are read by `launch_env()` only.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as _dist

from pipeline.errors import TrainingError


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process, before (or without) a process group."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    mixed_precision: str        # accelerate launch --mixed_precision (no, fp16, bf16)


def launch_env() -> LaunchEnv:
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return LaunchEnv(rank=int(env.get("RANK", 0)), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                     local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                     mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no"))


def initialized() -> bool:
    return _dist.is_available() and _dist.is_initialized()


def rank() -> int:
    return _dist.get_rank() if initialized() else launch_env().rank


def world_size() -> int:
    return _dist.get_world_size() if initialized() else launch_env().world_size


def is_main() -> bool:
    return rank() == 0


def _group() -> bool:
    """Whether collectives have anyone to talk to."""
    return initialized() and _dist.get_world_size() > 1


def default_device(device: str | None = None) -> torch.device:
    """The device a command runs on: the one asked for, else cuda if available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def init_process_group(device: torch.device) -> torch.device:
    """Start the process group when launched with WORLD_SIZE > 1 (no-op otherwise or if started);
    returns the device of this process (cuda:LOCAL_RANK for an index-less cuda device)."""
    env = launch_env()
    if device.type == "cuda" and device.index is None and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
    if env.world_size > 1 and not initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def destroy_process_group() -> None:
    if initialized():
        _dist.destroy_process_group()


def barrier() -> None:
    if _group():
        _dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned."""
    if _group():
        _dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _group():
        _dist.all_reduce(t, op=_dist.ReduceOp.MAX)
    return t


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (same shape everywhere), in rank order."""
    if not _group():
        return [t]
    out = [torch.empty_like(t) for _ in range(_dist.get_world_size())]
    _dist.all_gather(out, t)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    if not _group():
        return [obj]
    out: list = [None] * _dist.get_world_size()
    _dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere."""
    if not _group():
        return [obj]
    out = [None] * _dist.get_world_size() if _dist.get_rank() == 0 else None
    _dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _group():
        return obj
    box = [obj]
    _dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any:
    """`fn()` on rank 0 (None elsewhere). An error of the given types on rank 0 is raised on every
    rank (as the same type, same message), instead of leaving the others blocked in the next
    collective."""
    result, failure = None, None
    if is_main():
        try:
            result = fn()
        except errors as exc:
            failure = (type(exc), str(exc))
    failure = broadcast_object(failure)
    if failure is not None:
        raise failure[0](failure[1])
    return result


def process_group_timeout(seconds: float):
    """The Accelerate kwargs handler that bounds every collective: a rank whose peer died (or
    hangs) fails within `seconds` instead of waiting forever."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))


PEER_FAILURE_HINTS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe")


@contextlib.contextmanager
def peer_failures(what: str, timeout_s: float):
    """Turn a collective's failure (a dead or hung peer rank) into one TrainingError line."""
    try:
        yield
    except RuntimeError as exc:
        if not _group() or isinstance(exc, TrainingError):
            raise
        text = str(exc).strip()
        if not isinstance(exc, _dist.DistError) and not any(h in text.lower() for h in PEER_FAILURE_HINTS):
            raise
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise TrainingError(f"rank {rank()} of {world_size()} lost contact with another rank during {what} "
                            f"(within train.peer_timeout_s={timeout_s:g} s: {first}); the job must be restarted, "
                            "and resumes from its last checkpoint") from None


# ------------------------------------------------------------------------------------------------
# Preemption: a signal sets a flag; the loop checks it at a step boundary on every rank.

class Preemption:
    """SIGTERM/SIGUSR1 (what Slurm and launchers send before killing a job) and a first Ctrl-C
    (SIGINT) set a flag; the loop finishes its step, checkpoints and exits. A second Ctrl-C aborts
    at once (KeyboardInterrupt). Use as a context manager: the previous handlers are restored."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self._main = True
        self._old: dict = {}
        self._pending = None                # (work, flags) of the all-reduce issued by the last check
        self._group = None

    def __enter__(self) -> "Preemption":
        self._main = rank() == 0            # one message for the whole job: Ctrl-C reaches every rank
        self._old = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self._pending is not None and exc[0] is None:
            self._pending[0].wait()         # every rank issued it: let it finish before the group goes
        self._pending = None

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.flag:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            # os.write, not print: a handler that prints can interrupt a print (reentrant write).
            if self._main:
                os.write(2, b"\ninterrupted: finishing this step and writing a checkpoint "
                            b"(press Ctrl-C again to abort without one)\n")
        self.flag = True

    def requested(self) -> bool:
        """Whether any rank had received a signal by the previous call: a collective, so every rank
        calls it at the same steps and all get the same answer. With several processes the flags
        travel in a non-blocking all-reduce on a CPU (gloo) group, issued at one call and read at
        the next, so the check never waits for the accelerator (one step later than a blocking
        check would see it)."""
        if not _group():
            return self.flag
        seen = False
        if self._pending is not None:
            work, flags = self._pending
            work.wait()                      # issued one step ago: done by now on every rank
            seen = bool(flags.item())        # a CPU tensor: no device synchronisation
        flags = torch.tensor([1 if self.flag else 0], dtype=torch.int32)
        if self._group is None:
            self._group = (_dist.group.WORLD if _dist.get_backend() == "gloo"
                           else _dist.new_group(backend="gloo"))   # a CPU group beside NCCL
        self._pending = (_dist.all_reduce(flags, op=_dist.ReduceOp.MAX, group=self._group, async_op=True), flags)
        return seen


# ------------------------------------------------------------------------------------------------
# Replica consistency.

def param_digest(module: torch.nn.Module) -> torch.Tensor:
    """Per-tensor (sum, sum of squares) in float64: equal across ranks iff the replicas agree."""
    return torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                        for p in module.parameters()])


def check_ranks_identical(named_modules: dict[str, torch.nn.Module], device: torch.device) -> None:
    """Raise `TrainingError` naming the module and rank if any rank holds different parameters."""
    if not _group():
        return
    for name, module in named_modules.items():
        everyone = all_gather(param_digest(module).to(device))
        for r, other in enumerate(everyone):
            if not torch.equal(other, everyone[0]):
                raise TrainingError(f"{name} parameters differ between rank 0 and rank {r}: DDP lost sync")
