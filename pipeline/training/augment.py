"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for GANs trained on small data.

    x = diff_augment(x, "color,translation,cutout")

Applied identically in kind (not in random draw) to real and fake images right before D, in both
the D and the G step, so gradients flow through the augmentation to G. Every op is a tensor
operation on the batch, so it runs on the device and under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError


def _color(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    r = lambda: torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (r() - 0.5)                                           # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r() * 2) + mean                             # saturation
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (r() + 0.5) + mean                        # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift by up to ratio x side, zero padding, one random shift per sample."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    ys = (gy[None] + dy + 1).clamp(0, h + 1)
    xs = (gx[None] + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    idx = (ys * (w + 2) + xs).view(n, 1, h * w).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, idx).view_as(x)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a random square of ratio x side per sample."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    inside = ((gy[None] - cy + ch // 2).clamp(min=-1) // max(ch, 1) == 0) & \
             ((gx[None] - cx + cw // 2).clamp(min=-1) // max(cw, 1) == 0)
    return x * (~inside).unsqueeze(1).to(x.dtype)


OPS = {"color": _color, "translation": _translation, "cutout": _cutout}


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    for name in names:
        if name not in OPS:
            raise ConfigError(f"augment.diffaugment: unknown op '{name}'; choose from {', '.join(OPS)} (comma-separated)")
    return names


def diff_augment(x: torch.Tensor, policy: list[str]) -> torch.Tensor:
    if x.dim() != 4:
        return x                    # flat data (the 2-D toy): nothing to augment
    for name in policy:
        x = OPS[name](x)
    return x.contiguous()
