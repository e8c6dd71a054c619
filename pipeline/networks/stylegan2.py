"""`stylegan2`: Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (CVPR 2020).

Written from the paper (config E/F of Table 1: skip G, residual D), not from NVlabs code:
- mapping network: z normalised to unit second moment, 8 fully connected layers, learning-rate
  multiplier 0.01 (StyleGAN 2019, Sec. 2); `w_avg`, a running mean of w (decay 0.995 per training
  forward, a buffer, so the EMA copy and every snapshot carry it) for the truncation trick
  w' = w_avg + psi (w - w_avg) on the first `cutoff` layers (StyleGAN 2019, Eq. 3);
- style mixing regularisation (StyleGAN 2019, Sec. 3.1; probability 0.9 in StyleGAN2's configs):
  in training mode each image, with probability `style_mixing`, takes its w from a second latent
  from a random crossover layer on (torch's global RNG); eval mode never mixes;
- `G.map(z, labels)` gives the per-layer ws (N, num_ws, w_dim) and `G.synthesis(ws, ...)` the
  image; `G(z, labels, return_ws=True)` returns both from one call, which is how the path-length
  penalty (`pipeline.losses.PathLength`) takes J^T y w.r.t. ws through a DDP wrapper;
- modulated convolution (Sec. 2.2, Eq. 1): w'_ijk = s_i * w_ijk; demodulation (Eq. 3):
  w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + eps);
- per-pixel noise inputs with a learned per-layer strength; a learned constant 4x4 input;
  the noise is drawn from torch's global RNG unless given explicitly (`G(z, labels, noise=[...])`,
  one (N, 1, side, side) map per synthesis layer, shapes from `G.noise_shapes()`), which is how
  `pipeline.generate` makes image i depend only on (seed, i);
- skip generator (Fig. 7b): each resolution adds its tRGB output to the upsampled image;
- residual discriminator (Fig. 7c): per block conv 3x3, then conv 3x3 on the full-resolution grid
  with the downsampling fused into it (blur, then stride 2), plus a 1x1 skip of the blurred and
  subsampled input; the minibatch standard deviation layer of ProGAN (Sec. 3) at 4x4;
- conditional D as StyleGAN2-ADA's (its DiscriminatorEpilogue with cmap_dim; the paper states no
  conditional D): the label goes through D's own mapping network (`LabelMapping`: the one-hot label
  through a fully connected embedding to cmap_dim = D's maps at 4x4, normalised to unit second
  moment, then 8 fully connected layers cmap_dim -> cmap_dim with leaky ReLU and learning-rate
  multiplier 0.01, the reference MappingNetwork's defaults, which its train.py leaves as they are
  for D whatever G's mapping depth), and the logit is the projection (features . cmap) / sqrt(cmap_dim)
  of D's last layer's cmap_dim outputs on it;
- equalized learning rate everywhere: weights stored as N(0, 1) and scaled by He's constant per call.
Up/downsampling use the separable [1, 3, 3, 1] filter the paper uses ("bilinear").

Training mode returns the generator's raw output as the paper does (a clamp would stop gradients
of saturated pixels); eval mode clamps it to [-1, 1], the range every G in ganpipe promises.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, SnapshotError
from pipeline.networks.base import Network, resolution_plan, scaled, separable_filter

RESOLUTIONS = (28, 32, 64, 128, 256, 512, 1024)
Z_DIM = 512
CHANNEL_BASE, CHANNEL_MAX = 16384, 512      # maps at side s: min(base / s, max); config F doubles the base
LRELU_GAIN = math.sqrt(2.0)                 # keeps the activations' second moment through leaky ReLU
D_MAPPING_LAYERS = 8                        # layers of D's label mapping (StyleGAN2-ADA's default)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(1, keepdim=True) + eps).rsqrt()


def upsample(x: torch.Tensor) -> torch.Tensor:
    """2x up with the [1, 3, 3, 1] filter, which is what bilinear interpolation with half-pixel
    centres computes (edges aside: it repeats the border instead of padding with zeros)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def blur(x: torch.Tensor, *, padding: int, stride: int = 1) -> torch.Tensor:
    """Per-channel convolution with the separable [1, 3, 3, 1] filter (normalised), zero padding."""
    k = separable_filter((1.0, 3.0, 3.0, 1.0), x.device, x.dtype).expand(x.shape[1], 1, 4, 4)
    return F.conv2d(x, k, stride=stride, padding=padding, groups=x.shape[1])


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Blur with the separable [1, 3, 3, 1] filter and keep every second pixel."""
    return blur(x, padding=1, stride=2)


class EqualLinear(nn.Module):
    def __init__(self, c_in: int, c_out: int, *, bias_init: float = 0.0, lr_mul: float = 1.0,
                 act: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((c_out,), bias_init / lr_mul))
        self.weight_gain, self.lr_mul, self.act = lr_mul / math.sqrt(c_in), lr_mul, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.act else x


class EqualConv2d(nn.Module):
    """`down=True`: a 3x3 conv on the full-resolution grid evaluated at every second pixel, after
    the [1, 3, 3, 1] blur (pad 2, so H -> H/2). Away from the border this equals the conv at full
    resolution followed by `downsample` (both filters are linear and commute), at a quarter of the
    cost; the bias and the activation come after the downsampling, as in the paper's D."""

    def __init__(self, c_in: int, c_out: int, k: int, *, bias: bool = True, act: bool = True,
                 down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.weight_gain, self.act, self.down = 1 / math.sqrt(c_in * k * k), act, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.weight_gain
        if self.down:
            x = F.conv2d(blur(x, padding=2), weight, self.bias, stride=2)
        else:
            x = F.conv2d(x, weight, self.bias, padding=self.weight.shape[-1] // 2)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.act else x


class ModulatedConv2d(nn.Module):
    """Modulation as scaling the input maps and demodulation as scaling the output maps.

    conv(x * s, w) * d equals conv(x, w'') with the per-sample weights of Eq. 1 and 3, because both
    scalings are per channel; it avoids one grouped convolution with N weight copies (the paper's
    implementation), which is slow on CPUs and in fp16.
    """

    def __init__(self, c_in: int, c_out: int, k: int, w_dim: int, *, demodulate: bool = True,
                 up: bool = False):
        super().__init__()
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)   # styles start at 1: plain conv at init
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.weight_gain, self.demodulate, self.up = 1 / math.sqrt(c_in * k * k), demodulate, up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)                                  # s_i, (N, c_in)
        weight = self.weight * self.weight_gain
        x = x * styles[:, :, None, None]
        if self.up:
            x = upsample(x)
        x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
        if self.demodulate:
            # sum_{i,k} (s_i w_ijk)^2 = sum_i s_i^2 (sum_k w_ijk^2): one small matmul per sample,
            # in fp32 even under autocast (eps = 1e-8 vanishes in fp16).
            with torch.autocast(x.device.type, enabled=False):
                sigma_sq = styles.float().square() @ weight.float().square().sum((2, 3)).t()
            x = x * (sigma_sq + 1e-8).rsqrt().to(x.dtype)[:, :, None, None]
        return x


class SynthesisLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, w_dim: int, side: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, c_out, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("noise_const", torch.randn(1, 1, side, side))  # for repeatable samples

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x, w)
        if noise is not None:
            x = x + noise.to(x.dtype) * self.noise_strength      # the caller's draw, (N, 1, side, side)
        elif noise_mode == "random":
            x = x + torch.randn_like(x[:, :1]) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be random, const or none, got {noise_mode!r}")
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * LRELU_GAIN


class ToRGB(nn.Module):
    def __init__(self, c_in: int, channels: int, w_dim: int):
        super().__init__()
        # No demodulation: the output's scale is the image's scale (paper, Sec. 2.2).
        self.conv = ModulatedConv2d(c_in, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, num_classes: int, layers: int = 8, lr_mul: float = 0.01,
                 w_avg_beta: float = 0.995):
        super().__init__()
        # Labels enter like StyleGAN2-ADA's conditional networks: a normalised embedding next to z.
        self.embed = nn.Embedding(num_classes, w_dim) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * layers
        self.net = nn.Sequential(*(EqualLinear(a, b, lr_mul=lr_mul, act=True) for a, b in zip(dims[:-1], dims[1:])))
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                truncation_psi: float = 1.0, *, update_w_avg: bool = True) -> torch.Tensor:
        x = normalize_2nd_moment(z)
        if labels is not None:
            x = torch.cat([x, normalize_2nd_moment(self.embed(labels)).to(x.dtype)], 1)
        w = self.net(x)
        if self.training and update_w_avg:
            with torch.no_grad():
                self.w_avg.lerp_(w.detach().float().mean(0), 1 - self.w_avg_beta)
        if truncation_psi != 1:
            # Truncation trick (StyleGAN 2019, Eq. 3): w' = w_avg + psi (w - w_avg).
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        return w


class SynthesisNetwork(nn.Module):
    def __init__(self, *, resolution: int, channels: int, w_dim: int, width: float):
        super().__init__()
        start, steps = resolution_plan(resolution)
        sides = [start * 2 ** i for i in range(steps + 1)]
        ch = {s: scaled(min(CHANNEL_BASE // s, CHANNEL_MAX), width) for s in sides}
        self.const = nn.Parameter(torch.randn(ch[start], start, start))
        self.convs = nn.ModuleList([SynthesisLayer(ch[start], ch[start], w_dim, start)])
        self.to_rgbs = nn.ModuleList([ToRGB(ch[start], channels, w_dim)])
        for prev, side in zip(sides[:-1], sides[1:]):
            self.convs.append(SynthesisLayer(ch[prev], ch[side], w_dim, side, up=True))
            self.convs.append(SynthesisLayer(ch[side], ch[side], w_dim, side))
            self.to_rgbs.append(ToRGB(ch[side], channels, w_dim))
        # One w per conv; each tRGB shares its w with the next block's first conv.
        self.num_ws = len(self.convs) + 1

    def noise_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(layer.noise_const.shape[1:]) for layer in self.convs]

    def forward(self, ws: torch.Tensor, noise_mode: str = "random",
                noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """ws: (N, num_ws, w_dim); different rows per layer give style mixing. `noise`: one
        (N, 1, side, side) map per conv (replaces the random draw), or None."""
        if noise is not None:
            want = [(ws.shape[0], *s) for s in self.noise_shapes()]
            got = [tuple(n.shape) for n in noise]
            if got != want:
                raise ValueError(f"noise: expected {len(want)} maps of shapes {want} (one per synthesis layer, "
                                 f"see G.noise_shapes()), got {got}")
            if noise_mode != "random":
                raise ValueError(f"noise_mode={noise_mode!r} with explicit noise: pass one or the other")
        layer_noise = noise if noise is not None else [None] * len(self.convs)
        x = self.const.expand(ws.shape[0], *self.const.shape)
        x = self.convs[0](x, ws[:, 0], noise_mode, layer_noise[0])
        img = self.to_rgbs[0](x, ws[:, 1])
        for b, to_rgb in enumerate(self.to_rgbs[1:], start=1):
            x = self.convs[2 * b - 1](x, ws[:, 2 * b - 1], noise_mode, layer_noise[2 * b - 1])
            x = self.convs[2 * b](x, ws[:, 2 * b], noise_mode, layer_noise[2 * b])
            img = upsample(img) + to_rgb(x, ws[:, 2 * b + 1])
        return img


class Generator(Network):
    truncation = "w"        # pipeline.generate: this G truncates in w (psi, cutoff), see `map`

    def __init__(self, *, resolution: int, channels: int, z_dim: int = Z_DIM, num_classes: int = 0,
                 w_dim: int = 512, mapping_layers: int = 8, width: float = 1.0, style_mixing: float = 0.0):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes, z_dim=z_dim,
                         family="stylegan2", resolutions=RESOLUTIONS)
        if not 0 <= style_mixing <= 1:
            raise ValueError(f"style_mixing is a probability, got {style_mixing}")
        self.w_dim, self.style_mixing = w_dim, float(style_mixing)
        self.mapping = MappingNetwork(z_dim, w_dim, num_classes, mapping_layers)
        self.synthesis = SynthesisNetwork(resolution=resolution, channels=channels, w_dim=w_dim, width=width)
        self.num_ws = self.synthesis.num_ws

    def noise_shapes(self) -> list[tuple[int, ...]]:
        return self.synthesis.noise_shapes()

    def map(self, z: torch.Tensor, labels: torch.Tensor | None = None, *, truncation_psi: float = 1.0,
            truncation_cutoff: int | None = None) -> torch.Tensor:
        """ws (N, num_ws, w_dim): one w per synthesis layer. Training mode mixes styles; psi != 1
        truncates the first `truncation_cutoff` layers (all when None) towards `w_avg`."""
        labels = self._check_labels(z, labels)
        ws = self.mapping(z, labels)[:, None].expand(-1, self.num_ws, -1)
        if self.training and self.style_mixing > 0:
            # Per image: with probability p, layers from a random crossover c in [1, num_ws) on take
            # their w from a second latent (its w does not enter the running mean, one draw per image).
            n, layer = z.shape[0], torch.arange(self.num_ws, device=z.device)
            w2 = self.mapping(torch.randn_like(z), labels, update_w_avg=False)
            crossover = torch.randint(1, self.num_ws, (n,), device=z.device)
            crossover = torch.where(torch.rand(n, device=z.device) < self.style_mixing, crossover, self.num_ws)
            ws = torch.where((layer[None, :] >= crossover[:, None])[:, :, None], w2[:, None], ws)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            if not 1 <= cutoff <= self.num_ws:
                raise ValueError(f"truncation cutoff {truncation_cutoff}: this generator has {self.num_ws} w layers "
                                 f"(1..{self.num_ws})")
            # Truncation trick (StyleGAN 2019, Eq. 3): w' = w_avg + psi (w - w_avg), coarse layers first.
            near = self.mapping.w_avg.to(ws.dtype).lerp(ws, truncation_psi)
            ws = torch.where((torch.arange(self.num_ws, device=z.device) < cutoff)[None, :, None], near, ws)
        return ws

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                noise: list[torch.Tensor] | None = None, *, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "random", return_ws: bool = False):
        """`noise`: the per-pixel noise maps (see `noise_shapes`); None draws them as `noise_mode`
        says: "random" from torch's global RNG (training), "const" the fixed buffers, or "none".
        `return_ws`: (image, ws) instead of the image."""
        ws = self.map(z, labels, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        img = self.synthesis(ws, noise_mode, noise)
        img = img if self.training else img.clamp(-1, 1)
        return (img, ws) if return_ws else img


def minibatch_stddev(x: torch.Tensor, group: int) -> torch.Tensor:
    """Append the mean over features of the per-group standard deviation as one more map (ProGAN Sec. 3)."""
    n, c, h, w = x.shape
    g = math.gcd(group, n)                  # a group size that divides the batch
    y = x.float().view(g, n // g, c, h, w)  # sample k*(n/g)+m is in group m
    y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))   # (n/g,)
    y = y.view(-1, 1, 1, 1).repeat(g, 1, h, w).to(x.dtype)
    return torch.cat([x, y], 1)


class LabelMapping(nn.Module):
    """D's mapping of a label to cmap (N, dim), as StyleGAN2-ADA's conditional D: the one-hot label
    through a fully connected embedding (linear, lr multiplier 1), normalised to unit second moment,
    then `layers` fully connected layers dim -> dim with leaky ReLU and lr multiplier `lr_mul`, all
    with equalised learning rate (weights stored as N(0, 1/lr_mul^2), scaled by lr_mul / sqrt(fan_in)
    per call, so an optimizer step moves the used weights lr_mul times as far as elsewhere in D)."""

    def __init__(self, num_classes: int, dim: int, layers: int = D_MAPPING_LAYERS, lr_mul: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.embed = EqualLinear(num_classes, dim)
        self.net = nn.Sequential(*(EqualLinear(dim, dim, lr_mul=lr_mul, act=True) for _ in range(layers)))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(self.embed.weight.dtype)
        return self.net(normalize_2nd_moment(self.embed(onehot)))


class DBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv0 = EqualConv2d(c_in, c_in, 3)
        self.conv1 = EqualConv2d(c_in, c_out, 3, down=True)     # full-resolution grid, then half
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.conv0(x))
        # 1/sqrt(2) keeps the variance of the sum equal to that of each branch.
        return (self.skip(downsample(x)) + h) * math.sqrt(0.5)


class Discriminator(Network):
    def __init__(self, *, resolution: int, channels: int, num_classes: int = 0, width: float = 1.0,
                 mbstd_group: int = 4):
        super().__init__(resolution=resolution, channels=channels, num_classes=num_classes,
                         family="stylegan2", resolutions=RESOLUTIONS)
        start, steps = resolution_plan(resolution)
        sides = [resolution // 2 ** i for i in range(steps + 1)]
        ch = {s: scaled(min(CHANNEL_BASE // s, CHANNEL_MAX), width) for s in sides}
        self.from_rgb = EqualConv2d(channels, ch[resolution], 1)
        self.blocks = nn.Sequential(*(DBlock(ch[a], ch[b]) for a, b in zip(sides[:-1], sides[1:])))
        self.mbstd_group = mbstd_group
        c = ch[start]
        self.conv = EqualConv2d(c + (1 if mbstd_group else 0), c, 3)
        self.fc = EqualLinear(c * start * start, c, act=True)
        # With classes D outputs cmap_dim = c numbers and the logit is their projection on the
        # label's cmap from D's own mapping network (StyleGAN2-ADA's epilogue).
        self.out = EqualLinear(c, c if num_classes else 1)
        self.mapping = LabelMapping(num_classes, c) if num_classes else None
        self.register_load_state_dict_pre_hook(_refuse_plain_embedding)

    @property
    def mixes_batch(self) -> bool:
        return bool(self.mbstd_group) or super().mixes_batch     # the stddev is taken across samples

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self._check_labels(x, labels)
        h = self.blocks(self.from_rgb(x))
        if self.mbstd_group:
            h = minibatch_stddev(h, self.mbstd_group)
        out = self.out(self.fc(self.conv(h).flatten(1)))
        if labels is None:
            return out.squeeze(1)
        cmap = self.mapping(labels)
        return (out * cmap).sum(1) / math.sqrt(cmap.shape[1])


def _refuse_plain_embedding(module, state_dict, prefix, *args) -> None:
    """A conditional D saved when it embedded labels with a plain nn.Embedding (`embed.weight`, no
    mapping network) does not load into this D: say so, rather than torch's list of missing keys."""
    if f"{prefix}embed.weight" in state_dict:
        raise SnapshotError(
            "this checkpoint's conditional stylegan2 discriminator embeds labels with a plain embedding "
            f"({prefix}embed.weight), the layout before D mapped labels through its own mapping network "
            "(StyleGAN2-ADA's); its D cannot be loaded into this version: start a new --run-dir, and keep its "
            "generator with train.init_from=SNAPSHOT.json (a snapshot record holds G only)")


def build(cfg, *, resolution: int, channels: int, num_classes: int) -> tuple[Generator, Discriminator]:
    if cfg.spectral_norm:
        raise ConfigError("model.spectral_norm: stylegan2 does not use spectral norm (its D relies on "
                          "R1 instead); leave it unset or choose model.name=resnet")
    G = Generator(resolution=resolution, channels=channels, z_dim=cfg.z_dim or Z_DIM,
                  num_classes=num_classes, w_dim=cfg.w_dim, mapping_layers=cfg.mapping_layers,
                  width=cfg.g_width, style_mixing=cfg.style_mixing)
    D = Discriminator(resolution=resolution, channels=channels, num_classes=num_classes,
                      width=cfg.d_width, mbstd_group=cfg.mbstd_group)
    return G, D
