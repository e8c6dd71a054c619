"""Schedules over images seen: a value's multiple of its configured value at `cur_nimg`.

    factor(ScheduleConfig(kind="cosine", end=0.25), nimg=50_000, total_nimg=100_000)   # 0.625
    values = apply(cfg, phases, ema, cur_nimg)     # set lr, Adam's beta2, penalty weights, EMA half-life, ADA's fixed p

Shapes, with t the fraction of the schedule done (after the warm-up), s = `start` and e = `end`:
`constant` s; `linear` s + (e - s) t (the linear decay of SNGAN's and WGAN-GP's CIFAR runs with
e = 0); `cosine` e + (s - e)(1 + cos(pi t)) / 2 (R3GAN schedules lr, beta2 and gamma this way, and
ramps the EMA half-life and ADA's p up from s = 0). A warm-up multiplies by nimg / warmup_nimg
first. The value is a function of `cur_nimg` alone, so a resumed run follows the same course as an
uninterrupted one: nothing of it needs to be in the checkpoint.
"""

from __future__ import annotations

import math

from pipeline.config import Config, ScheduleConfig


def factor(s: ScheduleConfig, nimg: int, total_nimg: int) -> float:
    warmup = s.warmup_kimg * 1000
    ramp = min(1.0, nimg / warmup) if warmup > 0 else 1.0
    length = s.length_kimg * 1000 or max(total_nimg - warmup, 1)
    t = min(1.0, max(0.0, (nimg - warmup) / length))
    if s.kind == "linear":
        shape = s.start + (s.end - s.start) * t
    elif s.kind == "cosine":
        shape = s.end + (s.start - s.end) * (1 + math.cos(math.pi * t)) / 2
    else:
        shape = s.start
    return ramp * shape


def apply(cfg: Config, phases, ema, nimg: int) -> dict[str, float]:
    """Set every scheduled value for the step at `nimg`; returns them for the stats (Schedule/*)."""
    total = int(cfg.train.total_kimg * 1000)
    lr, beta2 = factor(cfg.optim.lr_schedule, nimg, total), factor(cfg.optim.beta2_schedule, nimg, total)
    out = {}
    for phase in phases:
        base_lr, (beta1, base_beta2) = (cfg.optim.g_lr, cfg.optim.g_betas) if phase.side == "G" else (cfg.optim.d_lr, cfg.optim.d_betas)
        b2 = min(base_beta2 * beta2, 0.9999)
        for group in phase.optimizer.param_groups:
            # A lazy regulariser's adjustment (phases.lazy_ratio) applies on top of the schedule.
            group["lr"] = base_lr * lr * phase.ratio
            if "betas" in group:        # Adam's; RMSProp has none
                group["betas"] = (beta1 ** phase.ratio, b2 ** phase.ratio)
        out[f"Schedule/lr_{phase.side}"] = base_lr * lr
        if cfg.optim.name == "adam":
            out[f"Schedule/beta2_{phase.side}"] = b2
    for penalty, base, schedule in phases.penalties:
        penalty.weight = base * factor(schedule, nimg, total)
        out[f"Schedule/weight_{penalty.name}"] = penalty.weight
    ema.halflife_kimg = cfg.ema.halflife_kimg * factor(cfg.ema.schedule, nimg, total)
    out["Schedule/ema_halflife_kimg"] = ema.halflife_kimg
    if phases.ada is not None and cfg.augment.ada_target == 0:        # a fixed p may follow a schedule (R3GAN)
        phases.ada.set_p(cfg.augment.ada_p * factor(cfg.augment.ada_p_schedule, nimg, total))
    return out
