"""Adversarial losses, gradient penalties on D's logits and regularisers of G, by config name.

    loss = build_loss(cfg.loss)                    # LOSSES[cfg.loss.name]
    penalties = build_penalties(cfg.loss)          # one per entry of cfg.loss.penalties, in order
    d_loss = loss.d_loss(D(real, y), D(fake.detach(), y))
    for p in penalties:                            # a D-side penalty (side "D"), every p.interval D steps
        if p.side == "D" and d_step % p.interval == 0:
            reg, stats = p(D, real, fake, y, scaler=scaler)    # already x weight x interval
            d_loss = d_loss + reg
    ...; clip_weights(D, cfg.loss.clip) after D's optimizer step (original WGAN only)
    g_loss = loss.g_loss(D(G(z, y), y))
    reg, stats = PENALTIES.get("pl")(2.0, 4)(G, z, y)   # a G-side penalty (side "G"): G's own graph

Every penalty has a `side`: "D" (wgan-gp, r1, r2: called as penalty(D, real, fake, labels), its
interval counted in D steps; r1 and r2 also in a finite-difference form without double backward,
`approximate`) or "G" (pl, ortho: called as penalty(G, z, labels), interval in G
steps). The trainer's phases (training/phases.py) put each on its side. A penalty that works
with some network families only names them (`networks`), so a config is checked before any
network is built (`pipeline.catalog.check`). A penalty with running state (pl's mean path
length) hands it out as `state_dict()` for the checkpoint.
Losses are means over the batch, written on logits with softplus (log sigmoid(t) = -softplus(-t)),
never as sigmoid followed by log, so they stay finite for any logit. A penalty takes D as an
argument and owns no optimizer (StyleGAN2-ADA's phases, EDM's losses).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import dist
from pipeline.errors import ConfigError
from pipeline.registry import Registry

LOSSES = Registry("loss")
PENALTIES = Registry("penalty")


# ----------------------------------------------------------------------------------------------
# Adversarial losses. D minimises d_loss, G minimises g_loss.

class AdversarialLoss:
    """D minimises d_loss(real, fake); G minimises g_loss(fake, real). `relativistic` losses compare
    a fake with its paired real, so G's step needs D's logits of real images too (the trainer
    passes them, detached: G's gradient flows through the fake logits only)."""

    name: ClassVar[str]
    relativistic: ClassVar[bool] = False

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        raise NotImplementedError

    def g_loss(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _LogisticD(AdversarialLoss):
    """D of Goodfellow et al. (2014), Eq. 1: maximise log D(x) + log(1 - D(G(z))), D = sigmoid(logit).

    -log sigmoid(t) = softplus(-t) and -log(1 - sigmoid(t)) = softplus(t).
    """

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


@LOSSES.register("minimax")
class Minimax(_LogisticD):
    """G minimises log(1 - D(G(z))) = -softplus(t): the original, saturating game of Eq. 1."""

    name = "minimax"

    def g_loss(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return -F.softplus(fake_logits).mean()


@LOSSES.register("nonsaturating")
class NonSaturating(_LogisticD):
    """G minimises -log D(G(z)) = softplus(-t) (Goodfellow et al. 2014, Sec. 3: strong early gradients)."""

    name = "nonsaturating"

    def g_loss(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return F.softplus(-fake_logits).mean()


@LOSSES.register("hinge")
class Hinge(AdversarialLoss):
    """Lim & Ye (2017), as used by SNGAN (Miyato et al. 2018):
    D: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]; G: -E[D(G(z))]."""

    name = "hinge"

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()

    def g_loss(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return -fake_logits.mean()


@LOSSES.register("wasserstein")
class Wasserstein(AdversarialLoss):
    """Arjovsky et al. (2017), Eq. 3: the critic maximises E[D(x)] - E[D(G(z))]; G: -E[D(G(z))].

    D must be kept Lipschitz: weight clipping (`loss.clip`, the original WGAN; `clip_weights`) or
    a gradient penalty (`loss.penalties=[{name: wgan-gp, weight: 10}]`).
    """

    name = "wasserstein"

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return fake_logits.mean() - real_logits.mean()

    def g_loss(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return -fake_logits.mean()


@LOSSES.register("lsgan")
class LeastSquares(AdversarialLoss):
    """Mao et al. (2017), Eq. 2 with the 0-1 coding of Eq. 9 (a=0 fake, b=1 real, c=1 G's target):
    D: 1/2 E[(D(x) - b)^2] + 1/2 E[(D(G(z)) - a)^2]; G: 1/2 E[(D(G(z)) - c)^2]; D(.) is the raw logit.
    """

    name = "lsgan"

    def __init__(self, a: float = 0.0, b: float = 1.0, c: float = 1.0):
        self.a, self.b, self.c = a, b, c

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return 0.5 * (real_logits - self.b).square().mean() + 0.5 * (fake_logits - self.a).square().mean()

    def g_loss(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return 0.5 * (fake_logits - self.c).square().mean()

    def __repr__(self) -> str:
        return f"LeastSquares(a={self.a}, b={self.b}, c={self.c})"


@LOSSES.register("rpgan")
class RelativisticPairing(AdversarialLoss):
    """RpGAN (Jolicoeur-Martineau 2019; the loss of R3GAN, Huang et al. 2024, Eq. 2) on paired
    samples: D: E[softplus(-(D(x_i) - D(G(z_i))))]; G: E[softplus(-(D(G(z_i)) - D(x_i)))]."""

    name = "rpgan"
    relativistic = True

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return F.softplus(fake_logits - real_logits).mean()

    def g_loss(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return F.softplus(real_logits - fake_logits).mean()


@LOSSES.register("rpgan-avg")
class RelativisticAverage(AdversarialLoss):
    """Relativistic average GAN (RaSGAN, Jolicoeur-Martineau 2019, Eqs. 9-10):
    D: E_x[softplus(-(D(x) - E D(G(z))))] + E_z[softplus(D(G(z)) - E D(x))];
    G: E_z[softplus(-(D(G(z)) - E D(x)))] + E_x[softplus(D(x) - E D(G(z)))]. The means are over the
    (micro-)batch."""

    name = "rpgan-avg"
    relativistic = True

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return (F.softplus(-(real_logits - fake_logits.mean())).mean()
                + F.softplus(fake_logits - real_logits.mean()).mean())

    def g_loss(self, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
        return (F.softplus(-(fake_logits - real_logits.mean())).mean()
                + F.softplus(real_logits - fake_logits.mean()).mean())


def build_loss(loss_cfg) -> AdversarialLoss:
    """The adversarial loss named by `loss_cfg.name` (a `LossConfig`)."""
    return LOSSES.get(loss_cfg.name)()


@torch.no_grad()
def clip_weights(D: nn.Module, c: float) -> None:
    """Clamp every parameter of D to [-c, c] after each D step (Arjovsky et al. 2017, Alg. 1; c=0.01 there).

    c <= 0 does nothing, so the trainer can call it unconditionally with `cfg.loss.clip`.
    """
    if c > 0:
        for p in D.parameters():
            p.clamp_(-c, c)


# ----------------------------------------------------------------------------------------------
# Gradient penalties on D's input gradient.

def input_gradients(logits: Tensor, x: Tensor, scaler=None) -> Tensor:
    """d(sum of logits)/dx in fp32, kept in the graph so the penalty can be backpropagated.

    Under fp16 with a GradScaler this is PyTorch's AMP gradient-penalty recipe: differentiate the
    scaled output so small gradients survive fp16, then unscale by ordinary division (these
    gradients belong to no optimizer, so `scaler.unscale_` does not apply). An overflow leaves
    inf/NaN here; the penalty then comes out non-finite and `scaler.step` skips the D step and
    lowers the scale, exactly as for an overflow in the main loss. bf16 and fp32 need no scaler.
    """
    out = logits.float().sum()
    scaled = scaler is not None and scaler.is_enabled()
    if scaled:
        out = scaler.scale(out)
    # autograd.grad, never backward(create_graph=True): DDP does not reduce gradients of gradients,
    # and backward(create_graph=True) leaks memory (pytorch #47562, #63812).
    (grad,) = torch.autograd.grad(out, x, create_graph=True)
    grad = grad.float()
    if scaled:
        grad = grad / scaler.scale(torch.ones((), device=grad.device))   # the scale, read on the device
    return grad


def _norm_sq(grad: Tensor) -> Tensor:
    """Per-sample squared L2 norm, in fp32 whatever autocast is active."""
    with torch.autocast(grad.device.type, enabled=False):
        return grad.float().flatten(1).square().sum(1)


class Penalty:
    """A gradient penalty applied lazily: every `interval` D steps, its loss multiplied by `interval`.

    Call `penalty(D, real, fake, labels, scaler=...)` under the same autocast as D's main loss and
    add the returned loss to D's loss before its one ordinary backward. Labels condition D for the
    real, the fake and the interpolated points alike (the trainer draws fake labels = real labels).
    """

    name: ClassVar[str]
    side: ClassVar[str] = "D"       # the network it regularises; `interval` counts that side's steps
    networks: ClassVar[tuple[str, ...] | None] = None   # the network families it can regularise (None = any)
    needs: ClassVar[str] = ""       # what those families have and the others lack, for the error
    approximable: ClassVar[bool] = False    # has a finite-difference form (`approximate`): r1, r2
    approximate: bool = False       # this one uses it (`finite_difference_penalty`)

    def __init__(self, weight: float = 10.0, interval: int = 1):
        if weight < 0 or interval < 1:
            raise ConfigError(f"penalty {self.name}: need weight >= 0 and interval >= 1, "
                              f"got weight={weight}, interval={interval}")
        self.weight, self.interval = float(weight), int(interval)

    @property
    def label(self) -> str:
        """The name its statistics go by: `r1_approx` for the finite-difference R1."""
        return f"{self.name}_approx" if self.approximate else self.name

    def state_dict(self) -> dict:
        """Running state to checkpoint (none for the gradient penalties)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def points(self, real: Tensor | None, fake: Tensor | None) -> Tensor:
        """Where the gradient is taken."""
        raise NotImplementedError

    def per_sample(self, grad_norm_sq: Tensor) -> Tensor:
        """The unweighted penalty of each sample from its squared gradient norm."""
        raise NotImplementedError

    def __call__(self, D: nn.Module, real: Tensor | None, fake: Tensor | None,
                 labels: Tensor | None = None, *, scaler=None, augment=None) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, stats): loss = weight x interval x mean penalty, ready to add to D's loss.

        stats holds detached values named for reporting: `Loss/D/<name>` (the unweighted mean
        penalty) and `Grad/D/<name>_norm` (mean ||grad_x D||); for an `approximate` one
        `Loss/D/<name>_approx` and `Grad/D/<name>_approx_rms` (`finite_difference_penalty`).
        """
        return joint_penalty([self], D, real, fake, labels, scaler=scaler, augment=augment)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, interval={self.interval})"


def joint_penalty(penalties: list[Penalty], D: nn.Module, real: Tensor | None, fake: Tensor | None,
                  labels: Tensor | None = None, *, scaler=None, augment=None, observe_real=None,
                  forward=None, joint: bool | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The sum of several D penalties (R1 and R2, say) from one forward of D and one input gradient,
    on the concatenation of their points: each sample's gradient is its own when D treats samples
    independently (`not D.mixes_batch`), so this equals calling each penalty and adding the losses
    (up to float summation order), in fewer, larger products. One penalty: `penalty(D, ...)` itself.

    With `augment`, D sees augment(x) of each penalty's points (augmented one penalty at a time, in
    order, as separate calls would) and the gradient is still taken w.r.t. x (StyleGAN2-ADA).
    `observe_real`, if given, is called with D's detached logits of the real images (R1's points):
    a lazy R1 step's logits count towards ADA's r_t, as StyleGAN2-ADA counts them.
    Penalties with `approximate` go to `finite_difference_penalty` (`forward` and `joint` are its),
    the others take the input gradient here.
    """
    if any(p.approximate for p in penalties):
        exact = [p for p in penalties if not p.approximate]
        loss, stats = finite_difference_penalty([p for p in penalties if p.approximate], D, real, fake, labels,
                                                augment=augment, observe_real=observe_real, forward=forward,
                                                joint=joint)
        if exact:
            more, more_stats = joint_penalty(exact, D, real, fake, labels, scaler=scaler, augment=augment,
                                             observe_real=observe_real)
            loss, stats = loss + more, {**stats, **more_stats}
        return loss, stats
    parts = [p.points(real, fake).detach() for p in penalties]
    x = (parts[0] if len(parts) == 1 else torch.cat(parts)).requires_grad_(True)
    sizes = [len(part) for part in parts]
    if augment is None:
        seen = x
    else:
        seen = augment(x) if len(parts) == 1 else torch.cat([augment(part) for part in x.split(sizes)])
    if labels is not None and len(parts) > 1:
        labels = labels.repeat(len(parts))      # the same labels for the real, fake and mixed points
    logits = D(seen, labels)
    norm_sq = _norm_sq(input_gradients(logits, x, scaler))
    # 0 * logits puts every D parameter into this loss's graph (the last layer's bias, for one,
    # does not reach the input gradient), so under DDP every parameter gets a gradient in the
    # backward and the reducer never waits for a missing one (StyleGAN2-ADA does the same).
    loss, stats = 0 * logits.float().sum(), {}
    if observe_real is not None:
        for p, part in zip(penalties, logits.detach().split(sizes)):
            if getattr(p, "on", None) == "real":
                observe_real(part)
    for p, part in zip(penalties, norm_sq.split(sizes)):
        value = p.per_sample(part).mean()
        loss = loss + value * (p.weight * p.interval)
        stats.update({f"Loss/D/{p.name}": value.detach(), f"Grad/D/{p.name}_norm": part.detach().sqrt().mean()})
    return loss, stats


def finite_difference_penalty(penalties: list[Penalty], D: nn.Module, real: Tensor | None, fake: Tensor | None,
                              labels: Tensor | None = None, *, augment=None, observe_real=None, forward=None,
                              joint: bool | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """R1/R2 without double backward (GAT: Hyun et al., "Scalable GANs with Transformers", ICML 2026):
    each sample's ||grad_x D||^2 is replaced by q^2, q = (D(x + sigma eps) - D(x)) / sigma with one
    eps ~ N(0, I) per sample. For small sigma q -> eps . grad_x D, and E[(eps . g)^2] = ||g||^2, so
    q^2 estimates the squared norm without bias in the limit and takes the exact penalty's weight
    (gamma/2, x interval when lazy), as the authors' code does; the per-sample estimate is noisy (q^2
    is ||g||^2 times a chi-square of one degree of freedom), the batch mean averages it. The loss is
    an ordinary function of D's parameters: one backward, no create_graph.

    Both forwards see the same augmentation draws (`augment` is called twice under one forked RNG
    state, so the perturbation is taken through the augmentation as the exact penalty's gradient is),
    and, where D treats samples independently (`joint`, default `not D.mixes_batch`), run as one
    forward on cat(x, x + sigma eps); otherwise as two, each with its own batch statistics (minibatch
    stddev), so a sample's perturbation reaches the other samples' logits as the exact penalty's
    gradient of the summed logits does. `forward` evaluates D (the trainer's compiled D, or D).

    Precision: the difference of two logits divided by sigma = 0.01 magnifies their rounding 100
    times, and an 8-bit-mantissa bf16 image cannot even hold x + 0.01 eps apart from x (its spacing
    near 1 is 2^-7 = 0.0078); fp16 (spacing 2^-10) keeps the step only to about 10%. So both forwards
    run in fp32 with autocast off whatever the phase's precision, and the difference is taken in
    fp32: a logit of magnitude L then carries about L x 6e-8 of rounding, 1e-5 L after division.
    Under fp16 the phase's GradScaler scales this loss like any other.

    Stats: `Loss/D/<name>_approx` (the mean unweighted penalty, gamma-free: mean q^2 / 2) and
    `Grad/D/<name>_approx_rms` (sqrt of mean q^2: the RMS of ||grad_x D|| over the batch).
    """
    forward = D if forward is None else forward
    if joint is None:
        joint = not getattr(getattr(D, "module", D), "mixes_batch", True)
    parts = [p.points(real, fake).detach().float() for p in penalties]
    sizes = [len(part) for part in parts]
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    sigma = torch.cat([x.new_full((n,), p.sigma) for p, n in zip(penalties, sizes)])
    shifted = x + sigma.view(-1, *[1] * (x.dim() - 1)) * torch.randn_like(x)
    if labels is not None and len(parts) > 1:
        labels = labels.repeat(len(parts))      # the same labels for the real and the fake points
    with torch.autocast(x.device.type, enabled=False):
        if augment is not None:
            pairs = [_same_draws(augment, a, b) for a, b in zip(x.split(sizes), shifted.split(sizes))]
            x, shifted = (torch.cat([pair[i] for pair in pairs]).float() for i in (0, 1))
        if joint:
            both = None if labels is None else torch.cat([labels, labels])
            before, after = forward(torch.cat([x, shifted]), both).float().chunk(2)
        else:
            before, after = forward(x, labels).float(), forward(shifted, labels).float()
        q_sq = ((after - before) / sigma).square()
    loss, stats = before.new_zeros(()), {}
    if observe_real is not None:
        for p, part in zip(penalties, before.detach().split(sizes)):
            if getattr(p, "on", None) == "real":
                observe_real(part)
    for p, part in zip(penalties, q_sq.split(sizes)):
        value = p.per_sample(part).mean()
        loss = loss + value * (p.weight * p.interval)
        stats.update({f"Loss/D/{p.label}": value.detach(), f"Grad/D/{p.label}_rms": part.detach().mean().sqrt()})
    return loss, stats


def _same_draws(augment, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(augment(a), augment(b)) with the same random draws: the RNG of a's device is forked for the
    first call and restored for the second (the augmentations draw from torch's global RNG only, and
    the same number of draws for inputs of one shape)."""
    devices = [a.device] if a.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=a.device.type if devices else "cuda"):
        first = augment(a)
    return first, augment(b)


@PENALTIES.register("wgan-gp")
class WGANGP(Penalty):
    """Gulrajani et al. (2017), Eq. 3 and Alg. 1: lambda E[(||grad D(x_hat)||_2 - 1)^2] at
    x_hat = eps x + (1 - eps) x_fake, eps ~ U[0, 1] per sample."""

    name = "wgan-gp"

    def points(self, real: Tensor | None, fake: Tensor | None) -> Tensor:
        if real is None or fake is None:
            raise ValueError("wgan-gp needs both real and fake samples")
        eps = torch.rand([real.shape[0]] + [1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
        return torch.lerp(fake.detach().to(real.dtype), real.detach(), eps)

    def per_sample(self, grad_norm_sq: Tensor) -> Tensor:
        # The tiny epsilon keeps sqrt differentiable at a zero gradient (pytorch #2534).
        return ((grad_norm_sq + 1e-12).sqrt() - 1).square()


class ZeroCentred(Penalty):
    """Mescheder et al. (2018): gamma/2 E[||grad D(x)||^2] at the real (R1) or fake (R2) samples.
    `approximate`: the squared norm estimated by a finite difference with step `sigma`
    (`finite_difference_penalty`), at the same weight."""

    on: ClassVar[str]           # "real" or "fake"
    approximable = True

    def __init__(self, weight: float = 10.0, interval: int = 1, *, approximate: bool = False, sigma: float = 0.01):
        super().__init__(weight, interval)
        if approximate and not sigma > 0:
            raise ConfigError(f"penalty {self.name}: the finite difference needs sigma > 0, got {sigma}")
        self.approximate, self.sigma = bool(approximate), float(sigma)

    def __repr__(self) -> str:
        extra = f", approximate=True, sigma={self.sigma}" if self.approximate else ""
        return f"{type(self).__name__}(weight={self.weight}, interval={self.interval}{extra})"

    def points(self, real: Tensor | None, fake: Tensor | None) -> Tensor:
        x = real if self.on == "real" else fake
        if x is None:
            raise ValueError(f"{self.name} needs {self.on} samples")
        return x

    def per_sample(self, grad_norm_sq: Tensor) -> Tensor:
        return 0.5 * grad_norm_sq


@PENALTIES.register("r1")
class R1(ZeroCentred):
    """Mescheder et al. (2018), Eq. 9: gamma/2 E_{x ~ data}[||grad D(x)||^2]."""

    name, on = "r1", "real"


@PENALTIES.register("r2")
class R2(ZeroCentred):
    """Mescheder et al. (2018), Eq. 10: gamma/2 E_{x ~ G}[||grad D(x)||^2]."""

    name, on = "r2", "fake"


# ----------------------------------------------------------------------------------------------
# Regularisers of G (side "G"): called as penalty(G, z, labels), interval counted in G steps.

class GPenalty(Penalty):
    """A regulariser of G applied lazily like the D penalties: every `interval` G steps, its loss
    multiplied by `interval`. `penalty(G, z, labels, scaler=...)` -> (loss, stats) under G's autocast;
    G may be DDP-wrapped (the trainer passes the module it trains)."""

    side = "G"

    def __call__(self, G: nn.Module, z: Tensor, labels: Tensor | None = None, *,
                 scaler=None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


@PENALTIES.register("pl")
class PathLength(GPenalty):
    """Path length regularisation (Karras et al. 2020, StyleGAN2, Sec. 4 and Appendix B):
    E_{w, y}[(||J_w^T y||_2 - a)^2], y ~ N(0, I) / sqrt(H W) an image-shaped random direction,
    J_w the Jacobian of the image w.r.t. the per-layer ws, and a the running mean of the lengths.

    As the reference implementation: the length of a sample is sqrt(mean over layers of the sum
    over w_dim of (J^T y)^2); a is updated before the penalty, a <- a + decay (mean length - a)
    with decay 0.01, from the mean over every process's samples (so every rank holds the same a,
    which the checkpoint keeps: `state_dict`); the penalty runs on the first 1/batch_shrink of the
    micro-batch (2: half); weight 2 with y scaled by 1/sqrt(H W), the reference implementation's
    default (the paper states its weight as gamma_pl = ln 2 / (r^2 (ln r - ln 2)) for resolution r,
    under its own normalisation of y; we follow the code's weight and scaling).
    Its loss adds 0 * (sum of the images) so that under DDP every G parameter is in the graph
    (biases and noise strengths do not reach J^T y).
    """

    name = "pl"
    networks, needs = ("stylegan2",), "a generator with a mapping network and per-layer w"

    def __init__(self, weight: float = 2.0, interval: int = 4, *, decay: float = 0.01, batch_shrink: int = 2):
        super().__init__(weight, interval)
        self.decay, self.batch_shrink = float(decay), int(batch_shrink)
        self.pl_mean = torch.zeros([])

    def lengths(self, G: nn.Module, z: Tensor, labels: Tensor | None, scaler=None) -> tuple[Tensor, Tensor]:
        """(||J^T y|| per sample in fp32, the images) on the first 1/batch_shrink of z."""
        n = max(1, z.shape[0] // self.batch_shrink)
        img, ws = G(z[:n], None if labels is None else labels[:n], return_ws=True)
        y = torch.randn(img.shape, device=img.device) / math.sqrt(img.shape[2] * img.shape[3])
        grad = input_gradients(img.float() * y, ws, scaler)          # J^T y, (n, num_ws, w_dim), fp32
        with torch.autocast(grad.device.type, enabled=False):
            return grad.square().sum(2).mean(1).sqrt(), img

    def __call__(self, G: nn.Module, z: Tensor, labels: Tensor | None = None, *,
                 scaler=None) -> tuple[Tensor, dict[str, Tensor]]:
        lengths, img = self.lengths(G, z, labels, scaler)
        # The mean over every process (sum of the means and of the process count: 1 without a group).
        total = dist.all_reduce_sum(torch.stack([lengths.detach().mean(), torch.ones((), device=lengths.device)]))
        mean = total[0] / total[1]
        pl_mean = self.pl_mean.to(mean.device)
        # A non-finite mean (an fp16 overflow, whose step the scaler skips) leaves a unchanged.
        self.pl_mean = torch.where(torch.isfinite(mean), pl_mean.lerp(mean, self.decay), pl_mean)
        value = (lengths - self.pl_mean).square().mean()
        loss = value * (self.weight * self.interval) + 0 * img.float().sum()
        stats = {"Loss/G/pl": value.detach(), "PL/mean": self.pl_mean.clone(), "PL/length": lengths.detach().mean()}
        return loss, stats

    def state_dict(self) -> dict:
        return {"pl_mean": self.pl_mean.detach().float().cpu()}

    def load_state_dict(self, state: dict) -> None:
        if "pl_mean" in state:
            self.pl_mean = torch.as_tensor(state["pl_mean"], dtype=torch.float32).clone()


@PENALTIES.register("ortho")
class Orthogonal(GPenalty):
    """Orthogonal regularisation of BigGAN (Brock et al. 2019, Sec. 3.1, Eq. 2) at the strength of
    the authors' released code (BigGAN-PyTorch's `ortho`, the code whose CIFAR-10 script and numbers
    configs/cifar10_biggan.yaml follows): the loss is beta/2 sum_W ||W W^T (.) (1 - I)||_F^2 over
    G's weight matrices, so that its gradient is that code's 2 beta (W W^T (.) (1 - I)) W at the
    same beta = 1e-4 (checked numerically in tests/test_papers.py). Eq. 2 as printed,
    beta ||...||_F^2 without the 1/2, would push twice as hard (gradient 4 beta (...) W). Each
    parameter with 2 or more dimensions is reshaped to (outputs, -1) (a conv's filters are its
    rows), class embeddings excluded; only the filters' mutual cosines are pushed to 0, not their
    norms. `Loss/G/ortho` reports sum_W ||...||_F^2 itself. It needs no images; computed in fp32
    whatever the autocast."""

    name = "ortho"

    def __init__(self, weight: float = 1e-4, interval: int = 1):
        super().__init__(weight, interval)

    def value(self, G: nn.Module) -> Tensor:
        net = getattr(G, "module", G)
        embeddings = {id(p) for m in net.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        total = torch.zeros((), device=next(net.parameters()).device)
        with torch.autocast(total.device.type, enabled=False):
            for p in net.parameters():
                if p.dim() < 2 or id(p) in embeddings:
                    continue
                w = p.float().flatten(1)
                gram = w @ w.t()
                total = total + (gram - torch.diag_embed(gram.diagonal())).square().sum()
        return total

    def __call__(self, G: nn.Module, z: Tensor | None = None, labels: Tensor | None = None, *,
                 scaler=None) -> tuple[Tensor, dict[str, Tensor]]:
        value = self.value(G)
        return value * (0.5 * self.weight * self.interval), {"Loss/G/ortho": value.detach()}


def build_penalties(loss_cfg) -> list[Penalty]:
    """One penalty per entry of `loss_cfg.penalties` (a `LossConfig`), in order, each with its
    configured weight and interval (and, for r1 and r2, `approximate` and `sigma`)."""
    out = []
    for p in loss_cfg.penalties:
        cls = PENALTIES.get(p.name)
        extra = {"approximate": True, "sigma": p.sigma} if getattr(p, "approximate", False) else {}
        if extra and not cls.approximable:
            raise ConfigError(f"loss.penalties: {p.name} has no finite-difference form (approximate: true is "
                              "for r1 and r2); remove approximate")
        out.append(cls(p.weight, p.interval, **extra))
    return out
