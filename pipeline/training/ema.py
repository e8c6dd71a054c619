"""Exponential moving average of G, with the half-life counted in images (StyleGAN2-ADA style).

    ema = EMA(G, halflife_kimg=10, rampup=0.05)
    ema.update(G, cur_nimg=..., batch=..., taken=ok)   # after each G step; a skipped one (ok False) moves nothing

beta = 0.5 ** (batch / halflife_nimg), with halflife_nimg = min(halflife_kimg * 1000,
rampup * cur_nimg) during the ramp-up: the average forgets the random initial weights quickly,
and the result does not depend on batch size or the number of processes. Buffers (BatchNorm
statistics) are copied, not averaged. The EMA model stays in eval mode with gradients off.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, G: nn.Module, halflife_kimg: float, rampup: float = 0.05):
        self.model = copy.deepcopy(G).eval().requires_grad_(False)
        self.halflife_kimg = halflife_kimg
        self.rampup = rampup

    def beta(self, cur_nimg: int, batch: int) -> float:
        halflife_nimg = self.halflife_kimg * 1000.0
        if self.rampup > 0:
            halflife_nimg = min(halflife_nimg, cur_nimg * self.rampup)
        return 0.5 ** (batch / max(halflife_nimg, 1e-8))

    @torch.no_grad()
    def update(self, G: nn.Module, cur_nimg: int, batch: int, taken: torch.Tensor | None = None) -> float:
        """Move towards G; `taken` (a device bool from `phases.step`) masks the move on the device,
        so a skipped G step leaves the average alone without a host read."""
        beta = self.beta(cur_nimg, batch)
        params = list(self.model.parameters())
        # One fused call over all tensors: per-parameter lerp_ calls cost more than the math.
        if taken is None:
            torch._foreach_lerp_(params, [p.detach() for p in G.parameters()], 1.0 - beta)
        else:
            weight = taken.to(params[0].dtype) * (1.0 - beta)
            torch._foreach_lerp_(params, [p.detach() for p in G.parameters()], [weight] * len(params))
        for b_ema, b in zip(self.model.buffers(), G.buffers()):
            b_ema.copy_(b)
        return beta

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
