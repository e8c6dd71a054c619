"""`r3gan`: the backbone of R3GAN (Huang, Gokaslan, Kuleshov & Tompkin, "The GAN is dead; long live
the GAN! A Modern GAN Baseline", NeurIPS 2024; config E of its roadmap), written from the paper.

    G, D = build_networks(ModelConfig(name="r3gan", conditional=True), resolution=32, channels=3,
                          num_classes=10)          # the CIFAR-10 networks: 20.8M + 21.3M parameters

A plain residual network with no StyleGAN tricks (no mapping network, styles, noise inputs,
equalized learning rate, minibatch stddev) and no normalisation layers:
- residual block (ConvNeXt-style inverted bottleneck): 1x1 conv to `expansion` x the maps, grouped
  3x3 conv (`group_width` maps per group), 1x1 conv back, each of the first two followed by a bias
  and leaky ReLU(0.2); the block adds its branch to its input;
- fix-up initialisation (Zhang et al. 2019, as the paper applies it): the branch's last layer starts
  at zero, so every block is the identity at initialisation, and the other two layers have He
  initialisation for leaky ReLU scaled by L^(-1/(2m-2)), L the blocks in the network and m = 3 the
  layers per branch (L^(-1/4));
- G: the latent (z, with a conditional G's class embedding concatenated; both 64 numbers by default)
  goes through a linear layer whose output weights a learned start x start basis channel by
  channel (the "generative basis", in place of StyleGAN's constant input); stages of residual
  blocks at each side; between stages a transition: a 1x1 conv where the width changes, then 2x
  upsampling; a final 1x1 conv to the image channels;
- D mirrors it: 1x1 conv from the image; at each side residual blocks then a transition (2x
  downsampling, then a 1x1 conv where the width changes); at the start side a depthwise
  start x start conv (the "discriminative basis") flattens each map to one number and a linear
  layer gives the logit; with classes it gives a vector projected on the label's embedding
  (Miyato & Koyama 2018), the conditional D of the paper.
- Resampling: the paper's [1, 2, 1] low-pass. A 3-tap filter at stride 2 is centred on every
  second input pixel, which shifts the image by half a pixel per step, so here it is composed with
  the 2x box of the resampling step (nearest-neighbour hold up, 2x2 average down): the separable
  [1, 3, 3, 1] / 8 filter, centred between pixels. Up is then exactly bilinear interpolation with
  half-pixel centres; down is the same filter at stride 2. Borders repeat the edge pixel, so a
  constant image stays constant in both directions.

Widths follow the paper's configurations per side: 768 maps at sides up to 32 (CIFAR-10), 384 at
64 (FFHQ-64), 192 at 128 and 96 at 256 (FFHQ-256); 28 pixels (7, 14, 28) takes CIFAR-10's.
ImageNet-32 is twice CIFAR-10's width with groups of 32 maps: model.g_width=d_width=2,
model.group_width=32. Two blocks per stage, expansion 2, groups of 16 maps.

Output range: training mode returns G's raw output, as the paper's networks do (a clamp would stop
the gradient of saturated pixels); eval mode clamps it to [-1, 1], the range every G in ganpipe
promises (what snapshots, samples and FID see).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.networks.base import Network, projection, resolution_plan, scaled, separable_filter

RESOLUTIONS = (28, 32, 64, 128, 256)
Z_DIM = 64                          # noise numbers; a conditional G's class embedding has as many
CHANNEL_BASE, CHANNEL_MAX = 24576, 768   # maps at side s: min(base / s, max)
BLOCKS, EXPANSION, GROUP_WIDTH = 2, 2, 16
LAYERS_PER_BRANCH = 3               # m of the fix-up scaling L^(-1/(2m-2))
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2 / (1 + LRELU_SLOPE ** 2))   # He et al. 2015's gain for leaky ReLU


def stage_width(side: int) -> int:
    """The paper's feature maps at a stage of side `side` (before model.g_width/d_width)."""
    return min(CHANNEL_BASE // side, CHANNEL_MAX)


def group_count(channels: int, group_width: int) -> int:
    """Groups of about `group_width` maps that divide `channels` (narrow test widths round down)."""
    groups = max(1, channels // group_width)
    while channels % groups:
        groups -= 1
    return groups


def _init(layer: nn.Module, gain: float) -> nn.Module:
    """Weights ~ N(0, gain^2 / fan_in) (He et al. 2015 with `gain`), biases zero."""
    fan_in = layer.weight[0].numel()
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _kernel(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """The separable 2-D filter of 1-D `taps` (normalised to sum 1), one copy per channel of x."""
    k = separable_filter(tuple(taps), x.device, x.dtype)
    return k.expand(x.shape[1], 1, *k.shape)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """2x up: nearest-neighbour hold, then the [1, 2, 1] / 4 low-pass (edge pixels repeated).

    Per axis, pixels (a, b) become (a, (3a + b) / 4, (a + 3b) / 4, b): bilinear interpolation with
    half-pixel centres, i.e. the [1, 3, 3, 1] / 8 filter at the new resolution."""
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _kernel(x, [1, 2, 1]), groups=x.shape[1])


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x down: the [1, 2, 1] / 4 low-pass composed with the 2x2 average, i.e. the [1, 3, 3, 1] / 8
    filter at stride 2 (edge pixels repeated). Per axis, (p, q, r, s) becomes
    ((4p + 3q + r) / 8, (q + 3r + 4s) / 8)."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _kernel(x, [1, 3, 3, 1]), stride=2,
                    groups=x.shape[1])


class ResidualBlock(nn.Module):
    """x + conv1x1(act(grouped conv3x3(act(conv1x1(x))))); act = bias + leaky ReLU(0.2)."""

    def __init__(self, channels: int, *, expansion: int, group_width: int, num_blocks: int):
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, hidden, 1)            # its bias is the first activation's
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=group_count(hidden, group_width))
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        # Fix-up: the branch starts at zero and the layers before the last are scaled down with depth.
        scale = num_blocks ** (-1 / (2 * LAYERS_PER_BRANCH - 2))
        _init(self.expand, LRELU_GAIN * scale)
        _init(self.conv, LRELU_GAIN * scale)
        nn.init.zeros_(self.project.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.expand(x), LRELU_SLOPE)
        h = F.leaky_relu(self.conv(h), LRELU_SLOPE)
        return x + self.project(h)


class UpTransition(nn.Module):
    """A 1x1 conv where the width changes (at the low side, where it is cheaper), then 2x up."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(c_in, c_out, 1, bias=False), 1.0) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample(x if self.conv is None else self.conv(x))


class DownTransition(nn.Module):
    """2x down, then a 1x1 conv where the width changes (at the low side, where it is cheaper)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(c_in, c_out, 1, bias=False), 1.0) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = downsample(x)
        return x if self.conv is None else self.conv(x)


class GenerativeBasis(nn.Module):
    """A learned side x side map per channel, weighted per sample by a linear map of the latent."""

    def __init__(self, in_dim: int, channels: int, side: int):
        super().__init__()
        self.basis = nn.Parameter(torch.randn(channels, side, side))
        self.linear = _init(nn.Linear(in_dim, channels, bias=False), 1.0)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.basis[None] * self.linear(latent)[:, :, None, None]


def _blocks(channels: int, count: int, expansion: int, group_width: int, total: int) -> list[nn.Module]:
    return [ResidualBlock(channels, expansion=expansion, group_width=group_width, num_blocks=total)
            for _ in range(count)]


class Generator(Network):
    def __init__(self, *, resolution: int, channels: int, z_dim: int = Z_DIM, num_classes: int = 0,
                 width: float = 1.0, blocks: int = BLOCKS, expansion: int = EXPANSION,
                 group_width: int = GROUP_WIDTH):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes, z_dim=z_dim,
                         family="r3gan", resolutions=RESOLUTIONS)
        start, steps = resolution_plan(resolution)
        ch = [scaled(stage_width(start * 2 ** i), width) for i in range(steps + 1)]
        total = blocks * len(ch)
        # The class embedding is as long as z and concatenated to it (the paper's conditional G).
        # N(0, 1/C) for C classes, as the authors' code: there it is a bias-free linear layer on the
        # one-hot label with He's N(0, 1/fan_in) and fan_in = C.
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 1 / math.sqrt(num_classes))
        self.basis = GenerativeBasis(z_dim * (2 if num_classes else 1), ch[0], start)
        stages = [nn.Sequential(*_blocks(ch[0], blocks, expansion, group_width, total))]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            stages.append(nn.Sequential(UpTransition(c_in, c_out),
                                        *_blocks(c_out, blocks, expansion, group_width, total)))
        self.stages = nn.Sequential(*stages)
        self.to_image = _init(nn.Conv2d(ch[-1], channels, 1, bias=False), 1.0)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        # `noise` is ignored: this G has no noise inputs (see Network.noise_shapes).
        img = self.to_image(self.stages(self.basis(self._latent_with_label(z, labels))))
        return img if self.training else img.clamp(-1, 1)


class Discriminator(Network):
    def __init__(self, *, resolution: int, channels: int, num_classes: int = 0, width: float = 1.0,
                 blocks: int = BLOCKS, expansion: int = EXPANSION, group_width: int = GROUP_WIDTH):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes,
                         family="r3gan", resolutions=RESOLUTIONS)
        start, steps = resolution_plan(resolution)
        ch = [scaled(stage_width(resolution // 2 ** i), width) for i in range(steps + 1)]
        total = blocks * len(ch)
        # Registered from the input side, in the order FreezeD (train.freeze_d_layers) counts layers.
        self.from_image = _init(nn.Conv2d(channels, ch[0], 1, bias=False), 1.0)
        stages = []
        for i, c in enumerate(ch):
            transition = [DownTransition(c, ch[i + 1])] if i + 1 < len(ch) else []
            stages.append(nn.Sequential(*_blocks(c, blocks, expansion, group_width, total), *transition))
        self.stages = nn.Sequential(*stages)
        c = ch[-1]
        self.basis = _init(nn.Conv2d(c, c, start, groups=c, bias=False), 1.0)   # start x start -> 1 x 1
        out = c if num_classes else 1
        self.out = _init(nn.Linear(c, out, bias=False), 1.0)
        self.embed = nn.Embedding(num_classes, out) if num_classes else None
        if self.embed is not None:
            # N(0, 1/(E C)) for E = `out` numbers and C classes, as the authors' code (a linear layer
            # on the one-hot label, fan_in C, gain 1/sqrt(E)).
            nn.init.normal_(self.embed.weight, 0.0, 1 / math.sqrt(out * num_classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._check_labels(x, labels)
        h = self.out(self.basis(self.stages(self.from_image(x))).flatten(1))
        return h.squeeze(1) if labels is None else projection(h, self.embed, labels)


def build(cfg, *, resolution: int, channels: int, num_classes: int) -> tuple[Generator, Discriminator]:
    if cfg.spectral_norm:
        raise ConfigError("model.spectral_norm: r3gan uses no normalisation in D (R1 + R2 keep it in check); "
                          "leave it unset or choose model.name=resnet")
    arch = dict(blocks=cfg.blocks_per_stage or BLOCKS, expansion=cfg.expansion or EXPANSION,
                group_width=cfg.group_width or GROUP_WIDTH)
    G = Generator(resolution=resolution, channels=channels, z_dim=cfg.z_dim or Z_DIM,
                  num_classes=num_classes, width=cfg.g_width, **arch)
    D = Discriminator(resolution=resolution, channels=channels, num_classes=num_classes,
                      width=cfg.d_width, **arch)
    return G, D
