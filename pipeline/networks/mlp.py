"""`mlp`: the fully connected GAN of Goodfellow et al. (2014), for images or flat vectors.

G: z (100) -> 256 -> 512 -> 1024 -> data, ReLU then Tanh; D: data -> 1024 -> 512 -> 256 -> 1 with
LeakyReLU(0.2). Widths scale with `model.g_width`/`model.d_width`. `resolution=0` means flat data
of `channels` numbers per sample (the 2-D toy of the WGAN-GP and Unrolled GAN papers).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.networks.base import Network, projection, scaled, sn

HIDDEN = (256, 512, 1024)   # G's hidden widths; D uses them reversed
Z_DIM = 100


def _data_shape(resolution: int, channels: int) -> tuple[int, ...]:
    return (channels,) if resolution == 0 else (channels, resolution, resolution)


class Generator(Network):
    def __init__(self, *, resolution: int, channels: int, z_dim: int = Z_DIM, num_classes: int = 0,
                 hidden: tuple[int, ...] = HIDDEN):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes, z_dim=z_dim)
        self.data_shape = _data_shape(resolution, channels)
        # The label enters as a learned embedding concatenated to z (Mirza & Osindero 2014).
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        layers: list[nn.Module] = []
        width = z_dim * (2 if num_classes else 1)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers += [nn.Linear(width, math.prod(self.data_shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        # `noise` is ignored: this G has no noise inputs (see Network.noise_shapes).
        z = self._latent_with_label(z, labels)
        return self.net(z).view(z.shape[0], *self.data_shape)


class Discriminator(Network):
    def __init__(self, *, resolution: int, channels: int, num_classes: int = 0,
                 hidden: tuple[int, ...] = tuple(reversed(HIDDEN)), spectral_norm: bool = False):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes)
        layers: list[nn.Module] = []
        width = math.prod(_data_shape(resolution, channels))
        for h in hidden:
            layers += [sn(nn.Linear(width, h), spectral_norm), nn.LeakyReLU(0.2)]
            width = h
        self.features = nn.Sequential(*layers)
        self.out = sn(nn.Linear(width, 1), spectral_norm)
        self.embed = sn(nn.Embedding(num_classes, width), spectral_norm) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._check_labels(x, labels)
        h = self.features(x.flatten(1))
        return self.out(h).squeeze(1) + projection(h, self.embed, labels)


def build(cfg, *, resolution: int, channels: int, num_classes: int) -> tuple[Generator, Discriminator]:
    if resolution < 0:
        raise ConfigError(f"model.name: mlp needs a resolution >= 1 (0 = flat data), got {resolution}")
    g_hidden = tuple(scaled(h, cfg.g_width) for h in HIDDEN)
    d_hidden = tuple(scaled(h, cfg.d_width) for h in reversed(HIDDEN))
    G = Generator(resolution=resolution, channels=channels, z_dim=cfg.z_dim or Z_DIM,
                  num_classes=num_classes, hidden=g_hidden)
    D = Discriminator(resolution=resolution, channels=channels, num_classes=num_classes,
                      hidden=d_hidden, spectral_norm=bool(cfg.spectral_norm))
    return G, D
