"""`resnet`: the residual G and D of SNGAN (Miyato et al. 2018, App. B.4) and BigGAN (Brock et al. 2019).

G: z -> linear to start x start -> residual up-blocks (BN, ReLU, 2x nearest up, 3x3 conv, twice;
1x1 conv shortcut) -> BN, ReLU, 3x3 conv, Tanh. With classes the BatchNorms are class-conditional
(per-class gain and bias, de Vries et al. 2017 as used in the projection-discriminator paper).
D: residual down-blocks, spectral norm on every layer, ReLU, global sum pooling, linear; with classes
a projection term (Miyato & Koyama 2018). Width tables follow BigGAN's (ch = 64, times the multipliers
of BigGAN-PyTorch's G_arch/D_arch at 64, 128 and 256 pixels); 32 and 28 pixels follow SNGAN's CIFAR
networks (256 maps in G, 128 in D).

Initialisation as SNGAN's chainer reference and Mimicry: Xavier-uniform weights, gain sqrt(2) in the
two 3x3 convs of every residual block and gain 1 in the 1x1 shortcuts, the linear layers, the class
embedding of D and G's output conv; biases 0 (chainer's default; Mimicry leaves PyTorch's uniform
biases). Conditional BN gains start at N(1, 0.02) per class, biases at 0 (Mimicry's cGAN-PD).
`pipeline.networks.biggan` builds on these blocks with its own initialisation.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.networks.base import (Network, projection, resolution_plan,
                                      scaled, sn)

BASE = 64
Z_DIM = 128
# Channel multipliers of G at each side, from the start side up to the image side.
G_MULTS = {28: (4, 4, 4), 32: (4, 4, 4, 4), 64: (16, 16, 8, 4, 2), 128: (16, 16, 8, 4, 2, 1),
           256: (16, 16, 8, 8, 4, 2, 1)}
# D blocks as (channel multiplier, halves the side), from the image side down.
D_BLOCKS = {28: ((2, True), (2, True), (2, False)),
            32: ((2, True), (2, True), (2, False), (2, False)),
            64: ((1, True), (2, True), (4, True), (8, True), (16, False)),
            128: ((1, True), (2, True), (4, True), (8, True), (16, True), (16, False)),
            256: ((1, True), (2, True), (4, True), (8, True), (8, True), (16, True), (16, False))}
RESOLUTIONS = tuple(sorted(G_MULTS))
RES_GAIN = math.sqrt(2.0)     # Xavier gain of the 3x3 convs inside a residual block (SNGAN)

Init = Callable[[nn.Module, float], nn.Module]


def xavier(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """SNGAN's initialisation of one layer: Xavier-uniform weight with `gain`, zero bias; returns it
    (call before spectral norm wraps the layer, so its u and v start from the final weight)."""
    nn.init.xavier_uniform_(module.weight, gain)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose gain and bias are looked up per class (plain affine BN without classes)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=not num_classes)
        if num_classes:
            self.gain = nn.Embedding(num_classes, channels)
            self.bias = nn.Embedding(num_classes, channels)
            # Gains near 1 with a small per-class spread (as DCGAN initialises BN gains), so the
            # classes differ from the first step instead of waiting for D to break the symmetry.
            nn.init.normal_(self.gain.weight, 1.0, 0.02)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.bn(x)
        if labels is None:
            return x
        return x * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]


class GBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_classes: int, init: Init = xavier):
        super().__init__()
        self.bn1 = ConditionalBatchNorm(c_in, num_classes)
        self.conv1 = init(nn.Conv2d(c_in, c_out, 3, 1, 1), RES_GAIN)
        self.bn2 = ConditionalBatchNorm(c_out, num_classes)
        self.conv2 = init(nn.Conv2d(c_out, c_out, 3, 1, 1), RES_GAIN)
        self.shortcut = init(nn.Conv2d(c_in, c_out, 1), 1.0)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, labels)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), labels)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """Pre-activation residual block; the first block skips its leading ReLU (SNGAN's "optimized" block)."""

    def __init__(self, c_in: int, c_out: int, down: bool, first: bool, spectral_norm: bool,
                 init: Init = xavier):
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = sn(init(nn.Conv2d(c_in, c_out, 3, 1, 1), RES_GAIN), spectral_norm)
        self.conv2 = sn(init(nn.Conv2d(c_out, c_out, 3, 1, 1), RES_GAIN), spectral_norm)
        self.shortcut = (sn(init(nn.Conv2d(c_in, c_out, 1), 1.0), spectral_norm)
                         if (c_in != c_out or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.shortcut is not None:
            # Pool before the 1x1 conv in the first block (on raw pixels), after it elsewhere.
            if self.first and self.down:
                s = self.shortcut(F.avg_pool2d(s, 2))
            else:
                s = self.shortcut(s)
                s = F.avg_pool2d(s, 2) if self.down else s
        return h + s


class Generator(Network):
    def __init__(self, *, resolution: int, channels: int, z_dim: int = Z_DIM, num_classes: int = 0,
                 base: int = BASE):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes, z_dim=z_dim,
                         family="resnet", resolutions=RESOLUTIONS)
        self.start, _ = resolution_plan(resolution)
        widths = [base * m for m in G_MULTS[resolution]]
        self.linear = xavier(nn.Linear(z_dim, widths[0] * self.start ** 2))
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes) for a, b in zip(widths[:-1], widths[1:]))
        self.bn = nn.BatchNorm2d(widths[-1])
        self.to_image = xavier(nn.Conv2d(widths[-1], channels, 3, 1, 1))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        # `noise` is ignored: this G has no noise inputs (see Network.noise_shapes).
        labels = self._check_labels(z, labels)
        h = self.linear(z).view(z.shape[0], -1, self.start, self.start)
        for block in self.blocks:
            h = block(h, labels)
        return torch.tanh(self.to_image(F.relu(self.bn(h))))


class Discriminator(Network):
    def __init__(self, *, resolution: int, channels: int, num_classes: int = 0, base: int = BASE,
                 spectral_norm: bool = True):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes,
                         family="resnet", resolutions=RESOLUTIONS)
        blocks, c_in = [], channels
        for i, (mult, down) in enumerate(D_BLOCKS[resolution]):
            blocks.append(DBlock(c_in, base * mult, down, first=(i == 0), spectral_norm=spectral_norm))
            c_in = base * mult
        self.blocks = nn.Sequential(*blocks)
        self.out = sn(xavier(nn.Linear(c_in, 1)), spectral_norm)
        self.embed = sn(xavier(nn.Embedding(num_classes, c_in)), spectral_norm) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._check_labels(x, labels)
        h = F.relu(self.blocks(x)).sum((2, 3))
        return self.out(h).squeeze(1) + projection(h, self.embed, labels)


def build(cfg, *, resolution: int, channels: int, num_classes: int) -> tuple[Generator, Discriminator]:
    G = Generator(resolution=resolution, channels=channels, z_dim=cfg.z_dim or Z_DIM,
                  num_classes=num_classes, base=scaled(BASE, cfg.g_width))
    D = Discriminator(resolution=resolution, channels=channels, num_classes=num_classes,
                      base=scaled(BASE, cfg.d_width),
                      spectral_norm=True if cfg.spectral_norm is None else cfg.spectral_norm)
    return G, D
