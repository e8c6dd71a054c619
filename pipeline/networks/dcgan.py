"""`dcgan`: Radford et al. (2016), generalised to 28, 32, 64, 128 and 256 pixels.

G: z -> (transposed conv, BatchNorm, ReLU) blocks doubling the side -> Tanh. D: strided convs with
LeakyReLU(0.2), optional spectral norm, and with `model.d_norm=batch` the paper's BatchNorm after
every conv but the first (and the last, which gives the logit). The default is no normalisation in
D: BatchNorm couples the samples of a batch, which breaks the per-sample gradient penalties
(WGAN-GP paper, Sec. 4; `catalog.check` refuses r1, r2 and wgan-gp with it), and D's reals and
fakes then need separate forwards (`Network.mixes_batch`), as the authors' code runs them.
Widths follow the paper (64 feature maps at the image side, doubling per halving, at most 512),
times `model.g_width`/`model.d_width`.

`model.d_head=H` (not in the paper) puts a fully connected layer of H units with LeakyReLU(0.2)
between D's last feature map and its logit (a conditional D then projects the label onto those H
units). The paper's read-out is linear in the last map's local features, which at 28 and 32 pixels
each see only a 10-pixel patch; a nonlinear head can weigh what the whole image holds. On
StackedMNIST it halved the KL to uniform (configs/stackedmnist_rpgan.yaml, docs/benchmarks.md).
The head's weights keep PyTorch's default initialisation and its biases start at 0, as measured.

Initialisation as the paper (Sec. 4): every conv and transposed-conv weight N(0, 0.02); BatchNorm
gains N(1, 0.02) and biases 0 (the authors' code and the PyTorch example); conv biases (D's) 0.
The label embedding of a conditional G keeps PyTorch's N(0, 1), the same law as the z it is
concatenated to (the paper has no classes).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.networks.base import (Network, projection, resolution_plan,
                                      scaled, sn)

RESOLUTIONS = (28, 32, 64, 128, 256)
BASE, MAX_MULT = 64, 8
Z_DIM = 100


def init(module: nn.Module) -> nn.Module:
    """Radford et al.'s initialisation of one conv, transposed conv or BatchNorm; returns it (call
    before spectral norm wraps a layer, so its u and v start from the final weight)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


def _widths(steps: int, base: int) -> list[int]:
    """Feature maps at each side from the start side up to half the image side."""
    return [base * min(MAX_MULT, 2 ** (steps - 1 - i)) for i in range(steps)]


class Generator(Network):
    def __init__(self, *, resolution: int, channels: int, z_dim: int = Z_DIM, num_classes: int = 0,
                 base: int = BASE):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes, z_dim=z_dim,
                         family="dcgan", resolutions=RESOLUTIONS)
        start, steps = resolution_plan(resolution)
        widths = _widths(steps, base)
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        z_in = z_dim * (2 if num_classes else 1)
        # The first transposed conv maps the 1x1 latent to start x start: the paper's "projection".
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_in, widths[0], start, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers).apply(init)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        # `noise` is ignored: this G has no noise inputs (see Network.noise_shapes).
        z = self._latent_with_label(z, labels)
        return self.net(z[:, :, None, None])


class Discriminator(Network):
    def __init__(self, *, resolution: int, channels: int, num_classes: int = 0, base: int = BASE,
                 spectral_norm: bool = False, norm: str = "none", head: int = 0):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes,
                         family="dcgan", resolutions=RESOLUTIONS)
        start, steps = resolution_plan(resolution)
        widths = list(reversed(_widths(steps, base)))
        layers: list[nn.Module] = []
        c_in = channels
        for i, c_out in enumerate(widths):
            bn = norm == "batch" and i > 0          # the paper: not on the layer that sees the image
            conv = sn(init(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not bn)), spectral_norm)
            layers += [conv, *([init(nn.BatchNorm2d(c_out))] if bn else []), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        if head:
            self.head = nn.Sequential(nn.Flatten(), sn(init(nn.Linear(c_in * start * start, head)), spectral_norm),
                                      nn.LeakyReLU(0.2))
            self.out = sn(init(nn.Linear(head, 1)), spectral_norm)
        else:
            self.head = None
            self.out = sn(init(nn.Conv2d(c_in, 1, start, 1, 0)), spectral_norm)
        self.embed = sn(nn.Embedding(num_classes, head or c_in), spectral_norm) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._check_labels(x, labels)
        h = self.features(x)
        if self.head is not None:
            h = self.head(h)
            return self.out(h).flatten() + projection(h, self.embed, labels)
        return self.out(h).flatten() + projection(h.sum((2, 3)), self.embed, labels)


def build(cfg, *, resolution: int, channels: int, num_classes: int) -> tuple[Generator, Discriminator]:
    G = Generator(resolution=resolution, channels=channels, z_dim=cfg.z_dim or Z_DIM,
                  num_classes=num_classes, base=scaled(BASE, cfg.g_width))
    D = Discriminator(resolution=resolution, channels=channels, num_classes=num_classes,
                      base=scaled(BASE, cfg.d_width), spectral_norm=bool(cfg.spectral_norm), norm=cfg.d_norm,
                      head=cfg.d_head)
    return G, D
