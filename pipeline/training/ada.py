"""Adaptive discriminator augmentation (ADA; Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data"), written from the paper.

    ada = AdaptiveAugment(groups="blit,geom,color", target=0.6, speed_kimg=500, interval=4)
    real_logits = D(ada(real)); fake_logits = D(ada(fake))   # every image D sees, in D and G steps
    ada.observe(real_logits)                                 # D step's and lazy R1 step's real logits (no sync)
    ada.update(d_step, batch=global_batch)                   # after every D step (syncs every `interval`)
    for name, value in ada.stats().items(): report(name, value)
    ckpt["ada"] = ada.state_dict(); ada.load_state_dict(ckpt["ada"])

    AdaptiveAugment(p=0.2, adaptive=False); ada.set_p(schedule(cur_nimg))   # fixed / scheduled p (R3GAN)

The heuristic. D overfits when its outputs on real images drift positive: r_t = E[sign(D(real))]
is 0 when D cannot tell reals from fakes and 1 when it is sure of every real. Every `interval`
D steps r_t is measured over those steps (summed across ranks) and p moves by
sign(r_t - target) * batch * interval / (speed_kimg * 1000): p can go from 0 to 1 in `speed_kimg`
kimg. The adaptive p lives on D's device and moves there (all-reduced numbers, so every rank holds
the same p): a step reads nothing back from the GPU (StyleGAN2-ADA keeps it so); reading `ada.p` or
`stats()` copies it to the host, which the trainer does at ticks. Once the first update has run, an
adaptive pipeline augments every batch, with whatever p the device holds (at p = 0 every gate says
no and the images pass unchanged), since the host no longer knows whether p is 0; before that, and
for a fixed or scheduled p (a Python float), p = 0 skips the work.

The pipeline (paper, Sec. 2.3 and Appendix B), in this order, each transform applied to each
image independently with probability p (one Bernoulli draw per image per transform):

    blit   xflip       mirror left-right, i ~ U{0,1}: a fair coin behind the gate, so the flip rate
                       is p/2 and stays below 1/2, where D could no longer tell a flip from none and
                       the flip would leak into G (paper, Sec. 2.2; the reference draws it so)
           rot90       k * 90 degrees, k ~ U{0,1,2,3}
           xint        integer shift, t ~ U(-0.125, 0.125) of the side per axis, rounded to pixels
    geom   scale       isotropic, s ~ lognormal(0, (0.2 ln 2)^2)
           rotate      theta ~ U(-pi, pi), applied before AND after `aniso`, each with probability
                       1 - sqrt(1 - p), so that an image is rotated at all with probability p
           aniso       x scaled by s, y by 1/s, s ~ lognormal(0, (0.2 ln 2)^2)
           xfrac       shift t ~ N(0, 0.125^2) of the side per axis
    color  brightness  add b ~ N(0, 0.2^2)
           contrast    multiply by c ~ lognormal(0, (0.5 ln 2)^2)
           lumaflip    reflect through the plane orthogonal to the luma axis v = (1,1,1)/sqrt(3), i ~ U{0,1}
           hue         rotate about v by theta ~ U(-pi, pi)                      (RGB only)
           saturation  scale the component orthogonal to v by s ~ lognormal(0, (ln 2)^2) (RGB only)

A group name (`blit`, `geom`, `color`) or single transform names may be listed in `groups`
(`"xflip,rot90"` is the paper's ablation style). Differences from the paper, on purpose:

- Blit is an exact integer gather of pixels (reflected at the border), not part of the resampling:
  it is lossless by construction, where bilinear sampling at "integer" offsets is only exact when
  the grid lands on pixel centres to the last bit, which float round-off does not promise.
- Geom composes its steps into one inverse affine matrix per image and resamples once with
  `affine_grid` + `grid_sample` (bilinear, reflection padding, so no black border leaks into D's
  view of the reals). The paper upsamples with a wavelet filter first to limit aliasing; plain
  bilinear aliases slightly when scaling down, which we accept for speed.
- Colour is one (C+1)x(C+1) homogeneous matrix per image in the images' own value range (0 is the
  mid-grey of [-1, 1] images). With one channel the luma axis is the channel itself: brightness,
  contrast and lumaflip (a negation) apply; saturation is then the identity and hue is skipped.

Randomness comes from torch's global RNG of x's device (what exact resume restores). The warp and
the colour matrix run in float32 (float64 for float64 input) with autocast off; the result has
x's dtype. Images must be square NCHW for blit and geom (90-degree rotations and rotations in
normalised coordinates assume it); flat (non-4-D) inputs pass through untouched, as with
DiffAugment. On CUDA the backward of `grid_sample` accumulates with atomics, so geom makes D's
gradients non-bitwise-reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.errors import ConfigError

# The allowed values of augment.ada_groups: a group expands to its transforms, in pipeline order.
GROUPS: dict[str, tuple[str, ...]] = {
    "blit": ("xflip", "rot90", "xint"),
    "geom": ("scale", "rotate", "aniso", "xfrac"),
    "color": ("brightness", "contrast", "lumaflip", "hue", "saturation"),
}
TRANSFORMS: tuple[str, ...] = tuple(t for ts in GROUPS.values() for t in ts)

XINT_MAX = 0.125            # integer translation: uniform up to this fraction of the side
SCALE_STD = 0.2 * math.log(2)
ANISO_STD = 0.2 * math.log(2)
XFRAC_STD = 0.125           # fractional translation: std as a fraction of the side
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5 * math.log(2)
SATURATION_STD = 1.0 * math.log(2)

# p within this of 0 or 1 is snapped to it: repeated +-step leaves float dust (1e-17), and a p of
# 1e-17 instead of 0 would cost a full augmentation pass for nothing.
_SNAP = 1e-9


def parse_groups(text: str) -> list[str]:
    """`"blit,geom,color"` -> ["blit", "geom", "color"]; group or transform names, comma-separated."""
    names = list(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    unknown = [n for n in names if n not in GROUPS and n not in TRANSFORMS]
    if unknown or not names:
        what = f"unknown name(s) {', '.join(repr(n) for n in unknown)}" if unknown else "no group given"
        raise ConfigError(f"augment.ada_groups: {what}; choose comma-separated groups from "
                          f"{', '.join(GROUPS)} or single transforms from {', '.join(TRANSFORMS)}")
    return names


def _expand(names: list[str]) -> frozenset[str]:
    return frozenset(t for n in names for t in GROUPS.get(n, (n,)))


# ------------------------------------------------------------------------------------------------
# Random draws: one per image, replaced by the identity value where the per-image coin says no.

Prob = "float | torch.Tensor"      # p: a Python float, or a 0-d float64 tensor on the images' device


def _coin(n: int, p: Prob, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def _gated(value: torch.Tensor, on: torch.Tensor, identity: float) -> torch.Tensor:
    return torch.where(on, value, torch.full_like(value, identity))


def _lognormal(n: int, std: float, p: Prob, device: torch.device) -> torch.Tensor:
    log = torch.randn(n, device=device) * std
    return _gated(log, _coin(n, p, device), 0.0).exp()


# ------------------------------------------------------------------------------------------------
# Blit: an exact gather.

def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index reflection with the edge pixel repeated (-1 -> 0), matching `grid_sample`'s reflection
    padding with align_corners=False, for any offset."""
    i = torch.remainder(i, 2 * size)
    return torch.where(i >= size, 2 * size - 1 - i, i)


def _blit(x: torch.Tensor, p: Prob, ops: frozenset[str]) -> torch.Tensor:
    n, c, h, w = x.shape
    dev = x.device
    # The forward chain is xflip -> rot90 -> xint. The gather needs each output pixel's source,
    # src = F^-1 R^-1 (out - shift), composed per image from small integer draws and applied once.
    # Coordinates are doubled and centred (2j - (w-1)): integers, so quarter turns of a square
    # image and whole-pixel shifts map pixel centres onto pixel centres exactly.
    flip = torch.ones(n, dtype=torch.long, device=dev)
    cos, sin = torch.ones_like(flip), torch.zeros_like(flip)
    tx, ty = torch.zeros_like(flip), torch.zeros_like(flip)
    if "xflip" in ops:
        flip = 1 - 2 * torch.randint(0, 2, (n,), device=dev) * _coin(n, p, dev).long()
    if "rot90" in ops:
        k = torch.randint(0, 4, (n,), device=dev) * _coin(n, p, dev)
        cos, sin = (k == 0).long() - (k == 2).long(), (k == 1).long() - (k == 3).long()
    if "xint" in ops:
        on = _coin(n, p, dev)
        tx = torch.round((torch.rand(n, device=dev) * 2 - 1) * XINT_MAX * w).long() * on
        ty = torch.round((torch.rand(n, device=dev) * 2 - 1) * XINT_MAX * h).long() * on
    a00, a01, a10, a11 = flip * cos, flip * sin, -sin, cos       # F^-1 R^-1
    o0, o1 = -2 * (a00 * tx + a01 * ty), -2 * (a10 * tx + a11 * ty)
    col = (torch.arange(w, device=dev) * 2 - (w - 1))[None, None, :]
    row = (torch.arange(h, device=dev) * 2 - (h - 1))[None, :, None]
    e = lambda t: t[:, None, None]  # noqa: E731  (per-image coefficient against the pixel grid)
    j = torch.div(e(a00) * col + e(a01) * row + e(o0) + (w - 1), 2, rounding_mode="floor")
    i = torch.div(e(a10) * col + e(a11) * row + e(o1) + (h - 1), 2, rounding_mode="floor")
    if "xint" in ops:               # only a shift can point outside the image
        j, i = _reflect(j, w), _reflect(i, h)
    index = (i * w + j).reshape(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


# ------------------------------------------------------------------------------------------------
# Geom: one inverse affine matrix per image, one resampling.

def _affine(n: int, device: torch.device, linear: tuple, shift: tuple = (0, 0)) -> torch.Tensor:
    """Batch of 3x3 matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] for linear (a, b, c, d) and shift
    (tx, ty), each entry a per-image tensor or a number."""
    m = torch.zeros(n, 3, 3, device=device)
    for (r, col), val in zip(((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2)), (*linear, *shift)):
        m[:, r, col] = val
    m[:, 2, 2] = 1
    return m


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    cos, sin = theta.cos(), theta.sin()
    return _affine(len(theta), theta.device, (cos, -sin, sin, cos))


def _geom(x: torch.Tensor, p: Prob, ops: frozenset[str]) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    # Coordinates are affine_grid's normalised ones (centre 0, edges +-1), so scaling and rotation
    # are about the image centre and a shift of t sides is 2t. The forward map is
    # T . R2 . A . R1 . S; grid_sample needs output -> input, its inverse S^-1 R1^-1 A^-1 R2^-1 T^-1,
    # built by right-multiplying each step's inverse in forward order.
    inv = torch.eye(3, device=dev).expand(n, 3, 3)
    p_rot = 1 - ((1 - p).sqrt() if torch.is_tensor(p) else math.sqrt(1 - p))
    for step in ("scale", "rotate", "aniso", "rotate", "xfrac"):
        if step not in ops:
            continue
        if step == "scale":
            s = _lognormal(n, SCALE_STD, p, dev)
            inv = inv @ _affine(n, dev, (1 / s, 0, 0, 1 / s))
        elif step == "rotate":
            theta = _gated((torch.rand(n, device=dev) * 2 - 1) * math.pi, _coin(n, p_rot, dev), 0.0)
            inv = inv @ _rotation(-theta)
        elif step == "aniso":
            s = _lognormal(n, ANISO_STD, p, dev)
            inv = inv @ _affine(n, dev, (1 / s, 0, 0, s))
        else:
            on = _coin(n, p, dev)
            t = _gated(torch.randn(2, n, device=dev) * XFRAC_STD, on.expand(2, n), 0.0)
            inv = inv @ _affine(n, dev, (1, 0, 0, 1), (-2 * t[0], -2 * t[1]))
    grid = F.affine_grid(inv[:, :2, :].to(x.dtype), list(x.shape), align_corners=False)
    return grid_sample(x, grid)


class _GridSample(torch.autograd.Function):
    """Bilinear `grid_sample` (reflection padding, align_corners=False) with a backward that can
    itself be differentiated w.r.t. the image, as R1 through the augmentation needs (the gradient
    w.r.t. the un-augmented reals, `loss.penalty_inputs: clean`). torch's own CUDA kernel has no
    derivative for its backward (torch 2.11: "derivative for aten::grid_sampler_2d_backward is not
    implemented", found by `make gpu-check`). The map is linear in the image, so the backward's
    own derivative w.r.t. its incoming gradient is the forward again (StyleGAN2-ADA's
    grid_sample_gradfix does the same). The grid takes no gradient: it is drawn, not learnt."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grid)
        ctx.shape = x.shape
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grid,) = ctx.saved_tensors
        return _GridSampleBackward.apply(grad_out, grid, ctx.shape), None


class _GridSampleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out: torch.Tensor, grid: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        ctx.save_for_backward(grid)
        # The image's values are not read when only its gradient is asked for: an expanded zero stands in.
        blank = grad_out.new_zeros(()).expand(shape)
        grad_x, _ = torch.ops.aten.grid_sampler_2d_backward(grad_out, blank, grid, 0, 2, False, [True, False])
        return grad_x

    @staticmethod
    def backward(ctx, grad_grad_x: torch.Tensor):
        (grid,) = ctx.saved_tensors
        return _GridSample.apply(grad_grad_x, grid), None, None


def grid_sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """`F.grid_sample(x, grid, "bilinear", "reflection", align_corners=False)`, twice differentiable
    w.r.t. x on every device (`_GridSample`)."""
    return _GridSample.apply(x, grid)


# ------------------------------------------------------------------------------------------------
# Colour: one homogeneous matrix per image.

def _color(x: torch.Tensor, p: Prob, ops: frozenset[str]) -> torch.Tensor:
    n, c = x.shape[:2]
    dev = x.device
    eye = torch.eye(c + 1, device=dev)
    luma = torch.zeros(c + 1, device=dev)
    luma[:c] = 1 / math.sqrt(c)
    vv = torch.outer(luma, luma)                 # projection onto the luma axis (homogeneous)
    mat = eye.expand(n, c + 1, c + 1)
    # Each step left-multiplies: forward order brightness, contrast, lumaflip, hue, saturation.
    if "brightness" in ops:
        b = _gated(torch.randn(n, device=dev) * BRIGHTNESS_STD, _coin(n, p, dev), 0.0)
        step = eye.repeat(n, 1, 1)
        step[:, :c, c] = b[:, None]
        mat = step @ mat
    if "contrast" in ops:
        s = _lognormal(n, CONTRAST_STD, p, dev)
        step = eye.repeat(n, 1, 1)
        step[:, :c, :c] *= s[:, None, None]
        mat = step @ mat
    if "lumaflip" in ops:
        flip = (torch.randint(0, 2, (n,), device=dev) * _coin(n, p, dev)).float()
        mat = (eye - 2 * vv * flip[:, None, None]) @ mat
    if "hue" in ops and c == 3:
        theta = _gated((torch.rand(n, device=dev) * 2 - 1) * math.pi, _coin(n, p, dev), 0.0)
        k = torch.zeros(4, 4, device=dev)        # cross-product matrix of the luma axis
        a = 1 / math.sqrt(3)
        k[0, 1], k[0, 2], k[1, 0], k[1, 2], k[2, 0], k[2, 1] = -a, a, a, -a, -a, a
        cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
        rgb = eye.clone()
        rgb[3, 3] = 0
        # Rodrigues about v on RGB (cos I + sin K + (1 - cos) v v^T); the homogeneous row stays put.
        rot = (eye - rgb) + cos * rgb + sin * k + (1 - cos) * vv
        mat = rot @ mat
    if "saturation" in ops:
        s = _lognormal(n, SATURATION_STD, p, dev)[:, None, None]
        # Keep the luma component and the homogeneous coordinate, scale the rest (chroma) by s.
        keep = vv.clone()
        keep[c, c] = 1
        mat = (keep + (eye - keep) * s) @ mat
    mat = mat.to(x.dtype)
    return torch.einsum("nij,njhw->nihw", mat[:, :c, :c], x) + mat[:, :c, c, None, None]


_STAGES = ((GROUPS["blit"], _blit), (GROUPS["geom"], _geom), (GROUPS["color"], _color))


# ------------------------------------------------------------------------------------------------

class AdaptiveAugment:
    """The ADA pipeline plus its controller for p; see the module docstring for usage."""

    def __init__(self, *, groups: str = "blit,geom,color", p: float = 0.0, target: float = 0.6,
                 speed_kimg: float = 500.0, interval: int = 4, adaptive: bool = True):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"AdaptiveAugment: p={p} must lie in [0, 1]")
        if not speed_kimg > 0:
            raise ValueError(f"AdaptiveAugment: speed_kimg={speed_kimg} must be > 0 (kimg for p to go 0 -> 1)")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"AdaptiveAugment: interval={interval} must be a positive number of D steps")
        self.groups = parse_groups(groups)
        self._ops = _expand(self.groups)
        self._p = float(p)                          # fixed or scheduled p; adaptive: its last host copy
        self._p_dev: torch.Tensor | None = None     # adaptive: p on D's device once an update ran
        self._rt_dev: torch.Tensor | None = None
        self._engaged = False                       # adaptive: an update has run (augment every batch)
        self.target = float(target)
        self.speed_kimg = float(speed_kimg)
        self.interval = int(interval)
        self.adaptive = bool(adaptive)
        self._rt = math.nan
        self._acc: torch.Tensor | None = None       # [sum of sign(D(real)), count], on D's device

    # Augment ------------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a batch of NCHW images; `x` itself (no work, no random draws) while p is 0 and,
        for an adaptive p, no update has run yet."""
        p = self._p_dev if self._p_dev is not None else self._p
        if not (self._engaged or self._p > 0.0) or x.dim() != 4:
            return x
        n, c, h, w = x.shape
        spatial = self._ops & frozenset(GROUPS["blit"] + GROUPS["geom"])
        if spatial and h != w:
            raise ValueError(f"ADA {', '.join(sorted(spatial))} need square images, got {h}x{w}")
        # The warp and colour matrices in float32 (float64 for float64 input, e.g. gradcheck)
        # whatever autocast says: bf16 coordinates would misplace pixels by whole steps at 256 px.
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = x if x.dtype == torch.float64 else x.float()
            for names, stage in _STAGES:
                ops = self._ops.intersection(names)
                if ops:
                    y = stage(y, p, ops)
        return y.to(x.dtype)

    # Controller ---------------------------------------------------------------------------------

    def observe(self, real_logits: torch.Tensor) -> None:
        """Add sign(D(real)) of one forward to the accumulator, on the logits' device (no sync)."""
        if not self.adaptive:
            return
        logits = real_logits.detach().float()
        if self._acc is None:
            self._acc = torch.zeros(2, device=logits.device)
        elif self._acc.device != logits.device:
            self._acc = self._acc.to(logits.device)
        # float32 counts +-1 exactly up to 2^24 per interval, far above interval * batch.
        self._acc[0] += logits.sign().sum()
        self._acc[1] += logits.numel()

    def update(self, d_step: int, batch: int) -> None:
        """After every D step: `d_step` D steps done so far (1, 2, ...), `batch` the global batch.
        Every `interval` steps, a collective: every rank must call it at the same steps, after
        at least one `observe` (which puts the accumulator on D's device, as NCCL needs). p moves
        on that device, in float64, with the host's arithmetic: nothing is read back."""
        if not self.adaptive or d_step % self.interval != 0:
            return
        if self._acc is None:
            self._acc = torch.zeros(2)
        acc = dist.all_reduce_sum(self._acc).double()
        if self._p_dev is None or self._p_dev.device != acc.device:
            # torch.full: a fill with the value as an argument, not a copy of host memory (a sync).
            self._p_dev = torch.full((), self._p, dtype=torch.float64, device=acc.device)
            self._rt_dev = torch.full((), self._rt, dtype=torch.float64, device=acc.device)
        total, count = acc[0], acc[1]
        rt = total / count.clamp(min=1)
        direction = torch.sign(rt - self.target)
        p = self._snap(self._p_dev + direction * (batch * self.interval / (self.speed_kimg * 1000)))
        counted = count > 0
        self._p_dev = torch.where(counted, p, self._p_dev)
        self._rt_dev = torch.where(counted, rt, self._rt_dev)
        self._acc.zero_()
        self._engaged = True

    @staticmethod
    def _snap(p: torch.Tensor) -> torch.Tensor:
        p = p.clamp(0.0, 1.0)
        return torch.where(p < _SNAP, 0.0, torch.where(p > 1.0 - _SNAP, 1.0, p))

    @property
    def p(self) -> float:
        """The current p as a Python float (adaptive: a copy from the device, a host sync)."""
        if self._p_dev is not None:
            self._p = float(self._p_dev)
        return self._p

    @property
    def rt(self) -> float:
        return float(self._rt_dev) if self._rt_dev is not None else self._rt

    def set_p(self, p: float) -> None:
        """Set p (clamped to [0, 1]), e.g. from a schedule when adaptive=False."""
        p = float(p)
        if math.isnan(p):
            raise ValueError("AdaptiveAugment.set_p: p is NaN")
        p = min(max(p, 0.0), 1.0)
        self._p = 0.0 if p < _SNAP else 1.0 if p > 1.0 - _SNAP else p
        if self._p_dev is not None:
            self._p_dev = torch.full((), self._p, dtype=torch.float64, device=self._p_dev.device)

    def stats(self) -> dict[str, float]:
        return {"Augment/p": self.p, "Augment/rt": self.rt}

    # Checkpoint ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        acc = self._acc.detach().cpu().clone() if self._acc is not None else torch.zeros(2)
        return {"p": self.p, "rt": self.rt, "acc": acc, "engaged": self._engaged}

    def load_state_dict(self, state: dict) -> None:
        self._p, self._p_dev, self._rt_dev = float(state["p"]), None, None
        self._rt = float(state["rt"])
        # Checkpoints from before p moved on the device skipped the work at p = 0 whenever it was 0.
        self._engaged = bool(state.get("engaged", self._p > 0))
        self._acc = torch.as_tensor(state["acc"], dtype=torch.float32).detach().clone().reshape(2)
