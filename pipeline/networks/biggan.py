"""`biggan`: the G and D of BigGAN (Brock et al. 2019, Sec. 3 and App. B, Table 4 and Fig. 15).

G: z is split into equal chunks, one for the first linear layer and one per residual up-block
("hierarchical latent", skip-z). The class embedding (128 numbers, shared by all blocks) is
concatenated with each block's chunk, and every BatchNorm of that block takes its gain and bias
from that vector through two linear layers without bias (gain = 1 + W_g c, bias = W_b c: the gain
starts around 1). Residual blocks are resnet's (BN, ReLU, 2x nearest up, 3x3 conv, twice; 1x1
shortcut); a SAGAN self-attention block (Zhang et al. 2019; learned gamma starting at 0) follows
the block that reaches `model.attention_res` (64 in the paper). BN, ReLU, 3x3 conv, Tanh at the end.
Unconditional: no embedding; the chunks alone feed the BatchNorms through the same linear layers.

D: resnet's pre-activation down-blocks, attention after the block that reaches `attention_res`,
ReLU, global sum pooling, linear, projection term (Miyato & Koyama 2018).

Spectral norm on every conv and linear layer of G and D, and on D's class embedding (not on G's
shared embedding), as the paper; `model.spectral_norm=false` turns it off in both. Orthogonal
initialisation (Saxe et al. 2014) of every conv, linear and embedding weight, as the paper; biases 0.

Widths are ch times BigGAN-PyTorch's G_arch/D_arch tables (resnet's, whose 32-pixel D is SNGAN's
instead: here it is BigGAN's 4ch), with ch = 96 at 128 and 256 pixels (the paper) and 64 at 32 and
64 pixels (BigGAN-PyTorch's default, which its CIFAR script uses); `model.g_width`/`d_width`
multiply ch. The paper's 128-pixel ImageNet model (ch 96, z 120, 1000 classes, attention at 64)
comes out at 70.43M G + 87.98M D = 158.4M parameters against 158.3M in the paper's Table 1.

Truncation trick (Sec. 3.1): `G.truncate_z(z, threshold)` gives z from the normal truncated to
[-threshold, threshold]; samplers call it on the latents they drew, before `G(z, labels)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, UserError
from pipeline.networks import resnet
from pipeline.networks.base import (Network, check_resolution, projection,
                                      resolution_plan, scaled, sn)

RESOLUTIONS = (32, 64, 128, 256)
CH = {32: 64, 64: 64, 128: 96, 256: 96}          # ch of the paper (128, 256) and of BigGAN-PyTorch (32, 64)
# Latent sizes: the paper's 120 at 128 px and 140 at 256 (chunks of 20); BigGAN-PyTorch's 128 at 32.
Z_DIM = {32: 128, 64: 120, 128: 120, 256: 140}
SHARED_DIM = 128                                 # numbers in the shared class embedding
G_MULTS = {r: resnet.G_MULTS[r] for r in RESOLUTIONS}
D_BLOCKS = {**{r: resnet.D_BLOCKS[r] for r in RESOLUTIONS},
            32: ((4, True), (4, True), (4, False), (4, False))}


def orthogonal(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """BigGAN's initialisation of one layer: orthogonal weight (gain 1 everywhere: `gain`, the
    residual gain of SNGAN's init that resnet's blocks pass, is ignored), zero bias; returns it.
    Call before spectral norm wraps the layer, so its u and v start from the final weight."""
    if not module.weight.is_meta:           # parameter counts build on the meta device
        nn.init.orthogonal_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose per-sample gain and bias are linear in a conditioning vector c:
    BN(x) * (1 + W_g c) + W_b c (BigGAN's conditional BN; c = [class embedding, z chunk])."""

    def __init__(self, channels: int, cond_dim: int, spectral_norm: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = sn(orthogonal(nn.Linear(cond_dim, channels, bias=False)), spectral_norm)
        self.bias = sn(orthogonal(nn.Linear(cond_dim, channels, bias=False)), spectral_norm)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain(cond)[:, :, None, None]
        return self.bn(x) * gain + self.bias(cond)[:, :, None, None]


class GBlock(resnet.GBlock):
    """resnet's up-block with BigGAN's conditional BN (from a vector) and spectral-normed convs.
    `forward(x, cond)` is resnet's, which hands its second argument to both BatchNorms."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, spectral_norm: bool):
        super().__init__(c_in, c_out, num_classes=0, init=orthogonal)
        self.bn1 = ConditionalBatchNorm(c_in, cond_dim, spectral_norm)
        self.bn2 = ConditionalBatchNorm(c_out, cond_dim, spectral_norm)
        self.conv1, self.conv2, self.shortcut = (sn(m, spectral_norm)
                                                 for m in (self.conv1, self.conv2, self.shortcut))


class SelfAttention(nn.Module):
    """SAGAN's non-local block as BigGAN uses it: queries and keys with C/8 maps, values with C/2,
    keys and values 2x2 max-pooled, no bias; out = x + gamma * o(attention), gamma starts at 0, so
    the block starts as the identity. Plain matmul + softmax, not a fused attention kernel: R1 and
    WGAN-GP need the double backward, which the fused GPU kernels lack."""

    def __init__(self, channels: int, spectral_norm: bool):
        super().__init__()
        c_key, c_value = max(1, channels // 8), max(1, channels // 2)

        def conv(c_in: int, c_out: int) -> nn.Module:
            return sn(orthogonal(nn.Conv2d(c_in, c_out, 1, bias=False)), spectral_norm)

        self.query, self.key, self.value = conv(channels, c_key), conv(channels, c_key), conv(channels, c_value)
        self.out = conv(c_value, channels)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        q = self.query(x).flatten(2)                              # (n, C/8, hw)
        k = F.max_pool2d(self.key(x), 2).flatten(2)               # (n, C/8, hw/4)
        v = F.max_pool2d(self.value(x), 2).flatten(2)             # (n, C/2, hw/4)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)       # (n, hw, hw/4), no 1/sqrt(d) as SAGAN
        o = (v @ attn.transpose(1, 2)).view(n, -1, h, w)          # (n, C/2, h, w)
        return x + self.gamma * self.out(o)


class Generator(Network):
    def __init__(self, *, resolution: int, channels: int, z_dim: int = 0, num_classes: int = 0,
                 ch: int | None = None, attention_res: int = 64, spectral_norm: bool = True,
                 shared_dim: int = SHARED_DIM):
        check_resolution("biggan", resolution, RESOLUTIONS)
        z_dim = z_dim or Z_DIM[resolution]
        widths = [(ch or CH[resolution]) * m for m in G_MULTS[resolution]]
        n_chunks = len(widths)               # the first linear and one per block
        if z_dim % n_chunks:
            lo = z_dim // n_chunks * n_chunks
            raise ConfigError(f"model.z_dim: biggan at {resolution} pixels splits z into {n_chunks} equal "
                              f"chunks (the first layer and {n_chunks - 1} blocks); {z_dim} is not a multiple "
                              f"of {n_chunks}: use {lo or n_chunks} or {lo + n_chunks}")
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes, z_dim=z_dim,
                         family="biggan", resolutions=RESOLUTIONS)
        self.start, _ = resolution_plan(resolution)
        self.chunk = z_dim // n_chunks
        self.shared = nn.Embedding(num_classes, shared_dim) if num_classes else None
        if self.shared is not None:
            orthogonal(self.shared)
        cond_dim = self.chunk + (shared_dim if num_classes else 0)
        self.linear = sn(orthogonal(nn.Linear(self.chunk, widths[0] * self.start ** 2)), spectral_norm)
        self.blocks = nn.ModuleList(GBlock(a, b, cond_dim, spectral_norm)
                                    for a, b in zip(widths[:-1], widths[1:]))
        # Attention after the block whose output side is attention_res (block i outputs start * 2^(i+1)).
        sides = [self.start * 2 ** (i + 1) for i in range(len(self.blocks))]
        self.attention_index = sides.index(attention_res) if attention_res in sides else -1
        self.attention_res = attention_res if self.attention_index >= 0 else 0
        self.attention = (SelfAttention(widths[self.attention_index + 1], spectral_norm)
                          if self.attention_index >= 0 else None)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.to_image = sn(orthogonal(nn.Conv2d(widths[-1], channels, 3, 1, 1)), spectral_norm)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        # `noise` is ignored: this G has no noise inputs (see Network.noise_shapes).
        labels = self._check_labels(z, labels)
        if z.shape[1] != self.z_dim:
            raise ValueError(f"z must have {self.z_dim} numbers per sample, got {z.shape[1]}")
        chunks = z.split(self.chunk, dim=1)
        embedding = None if labels is None else self.shared(labels)
        h = self.linear(chunks[0]).view(z.shape[0], -1, self.start, self.start)
        for i, (block, chunk) in enumerate(zip(self.blocks, chunks[1:])):
            cond = chunk if embedding is None else torch.cat([embedding.to(chunk.dtype), chunk], 1)
            h = block(h, cond)
            if i == self.attention_index:
                h = self.attention(h)
        return torch.tanh(self.to_image(F.relu(self.bn(h))))

    @staticmethod
    def truncate_z(z: torch.Tensor, threshold: float | None) -> torch.Tensor:
        """BigGAN's truncation trick: latents from N(0, I) truncated to [-threshold, threshold].

        The paper resamples the entries beyond the threshold; this maps every entry through the
        normal CDF onto the truncated normal instead (u = Phi(z) rescaled to [Phi(-t), Phi(t)],
        then Phi^-1), which gives the same distribution but is a function of z, so image i of seed
        S stays a function of (S, i) (see `pipeline.generate`). Monotone: entries keep their order
        and sign. `threshold` None or inf returns z unchanged; smaller thresholds trade variety for
        fidelity."""
        if threshold is None or math.isinf(threshold):
            return z
        if not threshold > 0:
            raise UserError(f"biggan truncation threshold (--psi) must be > 0 (smaller truncates more), "
                            f"got {threshold}")
        t = torch.tensor(float(threshold), dtype=torch.float64)
        lo, hi = torch.special.ndtr(-t), torch.special.ndtr(t)
        u = lo + torch.special.ndtr(z.double()) * (hi - lo)
        return torch.special.ndtri(u).clamp(-threshold, threshold).to(z.dtype)


class Discriminator(Network):
    def __init__(self, *, resolution: int, channels: int, num_classes: int = 0, ch: int | None = None,
                 attention_res: int = 64, spectral_norm: bool = True):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes,
                         family="biggan", resolutions=RESOLUTIONS)
        ch = ch or CH[resolution]
        blocks: list[nn.Module] = []
        c_in, side, self.attention_res = channels, resolution, 0
        for i, (mult, down) in enumerate(D_BLOCKS[resolution]):
            blocks.append(resnet.DBlock(c_in, ch * mult, down, first=(i == 0), spectral_norm=spectral_norm,
                                        init=orthogonal))
            c_in, side = ch * mult, side // 2 if down else side
            if side == attention_res and not self.attention_res:
                blocks.append(SelfAttention(c_in, spectral_norm))
                self.attention_res = side
        self.blocks = nn.Sequential(*blocks)
        self.out = sn(orthogonal(nn.Linear(c_in, 1)), spectral_norm)
        self.embed = sn(orthogonal(nn.Embedding(num_classes, c_in)), spectral_norm) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._check_labels(x, labels)
        h = F.relu(self.blocks(x)).sum((2, 3))
        return self.out(h).squeeze(1) + projection(h, self.embed, labels)


def build(cfg, *, resolution: int, channels: int, num_classes: int) -> tuple[Generator, Discriminator]:
    check_resolution("biggan", resolution, RESOLUTIONS)
    spectral_norm = True if cfg.spectral_norm is None else cfg.spectral_norm
    G = Generator(resolution=resolution, channels=channels, z_dim=cfg.z_dim, num_classes=num_classes,
                  ch=scaled(CH[resolution], cfg.g_width), attention_res=cfg.attention_res,
                  spectral_norm=spectral_norm)
    D = Discriminator(resolution=resolution, channels=channels, num_classes=num_classes,
                      ch=scaled(CH[resolution], cfg.d_width), attention_res=cfg.attention_res,
                      spectral_norm=spectral_norm)
    return G, D
