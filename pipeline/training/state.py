"""The training state: everything a checkpoint holds, as one object with one schema.

    state = TrainState(G, D, ema, phases, guard, posthoc=posthoc)
    shared = state.state_dict(world_size=2, config=to_dict(cfg), finite=state.finite())  # state.pt
    state.load_state_dict(shared)                                   # resume: the same keys, read back
    mine = state.rank_state_dict(loader, device)                    # each rank's rank-NNNN.pt

`state_dict` and `load_state_dict` are the only writer and reader of a checkpoint's content, and
`check_counters` the check a loaded file must pass before anything trusts it (checkpoint.py runs
it on every load): a new piece of state is added here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import dist
from pipeline.training.ema import EMA, PowerEMA
from pipeline.training.phases import NonFiniteGuard, Phases, unwrap

# Counters every checkpoint holds; a file whose counters are not counts is damaged.
COUNTERS = ("cur_nimg", "d_steps", "g_steps", "skipped", "world_size")


@dataclass
class Progress:
    """Where training stands."""
    cur_nimg: int = 0               # real images shown to D so far
    d_steps: int = 0
    g_steps: int = 0


def check_counters(state: dict, cur_nimg: int) -> str:
    """What is wrong with a loaded checkpoint's counters ("" when nothing): each a count, and
    cur_nimg the one its directory is named after."""
    for key in COUNTERS:
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"counter {key}={value!r} is not a count"
    if state["cur_nimg"] != cur_nimg or state["world_size"] < 1:
        return f"cur_nimg {state['cur_nimg']} does not match the directory"
    return ""


class TrainState:
    """Networks, EMA (and its post-hoc profiles), optimizers and scalers (in the phases), ADA,
    penalty state, progress and the non-finite guard."""

    def __init__(self, G: nn.Module, D: nn.Module, ema: EMA, phases: Phases, guard: NonFiniteGuard,
                 posthoc: PowerEMA | None = None):
        self.G, self.D, self.ema, self.phases, self.guard, self.posthoc = G, D, ema, phases, guard, posthoc
        self.progress = Progress()
        self.good_checkpoint: Path | None = None     # newest checkpoint with finite weights (not saved)

    @property
    def networks(self) -> dict[str, nn.Module]:
        """G and D, unwrapped from DDP."""
        return {"G": unwrap(self.G), "D": unwrap(self.D)}

    def finite(self) -> bool:
        """Whether every weight of G and D is finite: only such a checkpoint is a good one to go back to."""
        return all(bool(torch.isfinite(p).all()) for net in self.networks.values() for p in net.parameters())

    def state_dict(self, world_size: int, config: dict, finite: bool) -> dict:
        """What rank 0 writes into a checkpoint (the same on every rank); `finite`: `self.finite()`,
        which the caller has already read."""
        d, g, ada = self.phases.named("D"), self.phases.named("G"), self.phases.ada
        return {"G": unwrap(self.G).state_dict(), "D": unwrap(self.D).state_dict(), "G_ema": self.ema.state_dict(),
                "opt_G": g.optimizer.state_dict(), "opt_D": d.optimizer.state_dict(),
                "scaler_G": g.scaler.state_dict(), "scaler_D": d.scaler.state_dict(),
                "cur_nimg": self.progress.cur_nimg, "d_steps": self.progress.d_steps,
                "g_steps": self.progress.g_steps, "skipped": self.guard.skipped, "world_size": world_size,
                "config": config, "finite": finite,
                "ada": ada.state_dict() if ada is not None else {},
                "penalties": self.phases.penalty_state(),
                "posthoc_ema": self.posthoc.state_dict() if self.posthoc is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` wrote."""
        unwrap(self.G).load_state_dict(state["G"])
        unwrap(self.D).load_state_dict(state["D"])
        self.ema.load_state_dict(state["G_ema"])
        if self.posthoc is not None:
            self.posthoc.load_state_dict(state["posthoc_ema"])     # the profiles go on as if never stopped
        for key in ("G", "D"):
            phase = self.phases.named(key)
            phase.optimizer.load_state_dict(state[f"opt_{key}"])
            phase.scaler.load_state_dict(state[f"scaler_{key}"])
        if self.phases.ada is not None and state.get("ada"):
            self.phases.ada.load_state_dict(state["ada"])
        self.phases.load_penalty_state(state.get("penalties", {}))     # pl's running mean
        self.progress = Progress(state["cur_nimg"], state["d_steps"], state["g_steps"])
        self.guard.skipped = state["skipped"]

    def load_weights(self, weights: dict) -> None:
        """G, G_ema and (when given) D from another run (`train.init_from`); nothing else."""
        unwrap(self.G).load_state_dict(weights["G"])
        self.ema.load_state_dict(weights["G_ema"])
        if "D" in weights:
            unwrap(self.D).load_state_dict(weights["D"])

    def rank_state_dict(self, loader, device: torch.device) -> dict:
        """What each rank writes: its RNG states, its loader position, a digest of its replicas and
        (with ADA) its p, which every rank must agree on (adaptive p is all-reduced)."""
        state = {"torch_cpu": torch.get_rng_state(), "loader": loader.state_dict(),
                 "param_digest": {name: dist.param_digest(net) for name, net in self.networks.items()}}
        if self.phases.ada is not None:
            state["ada_p"] = self.phases.ada.p
        if device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(device)
        return state

    @staticmethod
    def load_rank_state_dict(mine: dict, device: torch.device) -> dict:
        """Restore this rank's RNG; returns its loader position."""
        torch.set_rng_state(mine["torch_cpu"])
        if device.type == "cuda" and "torch_cuda" in mine:
            torch.cuda.set_rng_state(mine["torch_cuda"], device)
        return mine["loader"]
