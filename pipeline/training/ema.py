"""Exponential moving average of G, with the half-life counted in images (StyleGAN2-ADA style).

    ema = EMA(G, halflife_kimg=10, rampup=0.05)
    ema.update(G, cur_nimg=..., batch=..., taken=ok)   # after each G step; a skipped one (ok False) moves nothing

beta = 0.5 ** (batch / halflife_nimg), with halflife_nimg = min(halflife_kimg * 1000,
rampup * cur_nimg) during the ramp-up: the average forgets the random initial weights quickly,
and the result does not depend on batch size or the number of processes. The EMA model stays in
eval mode with gradients off.

Buffers: BatchNorm running means and variances are averaged with the same beta as the weights,
so the statistics that eval-mode BatchNorm uses belong to the averaged weights rather than to the
raw G of the last step (BigGAN's authors average them too); every other buffer (BatchNorm's
`num_batches_tracked`, spectral norm's u and v, StyleGAN2's w_avg and fixed noise) is copied, as
StyleGAN2-ADA copies all of them. Standing statistics go further (Brock et al. 2019, Appendix C):

    G_snap = standing_stats(ema.model, batches=16, batch=64, seed=0, device=device)   # ema.standing_stats

recomputes the BatchNorm statistics of a copy of the EMA G from its own samples, as an equal
average over `batches` forwards with only the BatchNorms in training mode; the trainer does it at
snapshot time when `ema.standing_stats` > 0, and the EMA itself goes on unchanged.

Power-function EMA profiles for post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models" (EDM2), sec. 3):

    profiles = PowerEMA(G, stds=[0.05, 0.10])            # ema.posthoc_std
    profiles.update(G, t=g_steps)                          # after each G step, t = G steps so far (1, 2, ...)

Profile k averages G with weights proportional to tau^gamma_k over the steps tau = 1..t so far:
beta_t = (1 - 1/t)^(gamma + 1), so step s carries (s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1),
exactly the integral over (s-1, s] of the continuous profile (gamma+1) tau^gamma / t^(gamma+1).
BatchNorm statistics are averaged with the same profile, other buffers copied, as for `EMA`.
Its width relative to t, sigma_rel = sqrt(gamma+1) / ((gamma+2) sqrt(gamma+3)) (the standard
deviation of that density on [0, 1]), names a profile: 0.05 and 0.10 are gamma 16.97 and 6.94.
The profile has no length in kimg to choose: it scales with the run, and `ganpipe posthoc-ema`
(posthoc_ema.py) rebuilds any other sigma_rel from the stored ones. Unlike `EMA`, a skipped G
step still updates the profiles (with G unchanged): the weights must stay those of t steps.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def averaged_buffers(model: nn.Module) -> set[str]:
    """Names of the buffers an average of `model` averages: BatchNorm running means and variances."""
    bns = {id(m) for m in batchnorms(model)}
    return {f"{name}.{b}" if name else b for name, m in model.named_modules() if id(m) in bns
            for b in ("running_mean", "running_var")}


def follow_buffers(average: nn.Module, G: nn.Module, averaged: set[str], weight) -> None:
    """Move the `averaged` buffers of `average` towards G's by `weight` (a number or a device
    scalar) and copy the others (buffers are paired in order: `average` is a copy of G)."""
    for (name, b_avg), b in zip(average.named_buffers(), G.buffers()):
        if name in averaged:
            b_avg.lerp_(b.to(b_avg.dtype), weight.to(b_avg.dtype) if torch.is_tensor(weight) else weight)
        else:
            b_avg.copy_(b)


@torch.no_grad()
def standing_stats(model: nn.Module, batches: int, batch: int, seed: int, device: torch.device) -> nn.Module:
    """A copy of `model` (a G) whose BatchNorm statistics are recomputed from `batches` forwards of
    its own samples (`batch` latents each, labels drawn uniformly for a conditional G), averaged
    equally, with only the BatchNorms in training mode; `model` itself when it has no BatchNorm
    or `batches` is 0. The draws come from a generator seeded with `seed`, so the global RNG (what
    exact resume restores) is left alone."""
    if batches <= 0 or not batchnorms(model):
        return model
    net = copy.deepcopy(model).eval()
    bns = batchnorms(net)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                   # cumulative average: each forward counts the same
        m.train()
    gen = torch.Generator(device=device).manual_seed(int(seed))
    for _ in range(batches):
        z = torch.randn(batch, net.z_dim, generator=gen, device=device)
        labels = (torch.randint(net.num_classes, (batch,), generator=gen, device=device)
                  if net.num_classes else None)
        net(z, labels)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return net.eval()


class EMA:
    def __init__(self, G: nn.Module, halflife_kimg: float, rampup: float = 0.05):
        self.model = copy.deepcopy(G).eval().requires_grad_(False)
        self.halflife_kimg = halflife_kimg
        self.rampup = rampup
        self.averaged = averaged_buffers(self.model)

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
            weight = 1.0 - beta
            torch._foreach_lerp_(params, [p.detach() for p in G.parameters()], weight)
        else:
            weight = taken.to(params[0].dtype) * (1.0 - beta)
            torch._foreach_lerp_(params, [p.detach() for p in G.parameters()], [weight] * len(params))
        follow_buffers(self.model, G, self.averaged, weight)
        return beta

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile of exponent `gamma` (EDM2 eq. 3)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


MAX_STD = sigma_rel(0.0)        # 1/sqrt(12): gamma = 0, the plain average of every step so far


def gamma_for(std: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width `std`: the positive root of
    std^2 (gamma+2)^2 (gamma+3) - (gamma+1) = 0 (sigma_rel falls monotonically for gamma >= 0)."""
    if not 0 < std < MAX_STD:
        raise ValueError(f"relative EMA length {std} outside (0, {MAX_STD:.4f}) (sigma_rel of gamma >= 0)")
    s2 = std * std
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0))
    for _ in range(3):      # Newton polish on the cubic: np.roots is good to ~1e-10 relative only
        f = s2 * (gamma + 2) ** 2 * (gamma + 3) - (gamma + 1)
        df = s2 * (2 * (gamma + 2) * (gamma + 3) + (gamma + 2) ** 2) - 1
        gamma -= f / df
    return gamma


def profile_name(std: float) -> str:
    """The snapshot variant name of the profile of `std` ("phema-0.05")."""
    return f"phema-{std:g}"


class PowerEMA:
    """Power-function EMA profiles of G, one model copy per relative width (see the module doc)."""

    def __init__(self, G: nn.Module, stds: list[float]):
        self.stds = [float(s) for s in stds]
        if len({profile_name(s) for s in self.stds}) != len(self.stds):
            raise ValueError(f"ema.posthoc_std {self.stds}: each value once")
        self.gammas = [gamma_for(s) for s in self.stds]
        self.models = [copy.deepcopy(G).eval().requires_grad_(False) for _ in self.stds]
        self.averaged = averaged_buffers(G)
        self.t = 0              # G steps averaged in so far

    def to(self, device: torch.device) -> "PowerEMA":
        for m in self.models:
            m.to(device)
        return self

    @torch.no_grad()
    def update(self, G: nn.Module, t: int) -> None:
        """Average in G after G step `t` (1 for the first: beta 0, a plain copy)."""
        self.t = int(t)
        src = [p.detach() for p in G.parameters()]
        for gamma, model in zip(self.gammas, self.models):
            beta = (1.0 - 1.0 / t) ** (gamma + 1)
            torch._foreach_lerp_(list(model.parameters()), src, 1.0 - beta)
            follow_buffers(model, G, self.averaged, 1.0 - beta)

    def variants(self) -> dict[str, tuple[nn.Module, dict]]:
        """Snapshot variants: name -> (model, what the reconstruction needs to know of it)."""
        return {profile_name(s): (m, {"std": s, "gamma": g, "t": self.t})
                for s, g, m in zip(self.stds, self.gammas, self.models)}

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "t": self.t, "models": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state.get("stds", [])] != self.stds:
            raise ValueError(f"checkpoint holds EMA profiles for {state.get('stds')}, the config asks for {self.stds}")
        for model, sd in zip(self.models, state["models"]):
            model.load_state_dict(sd)
        self.t = int(state["t"])
