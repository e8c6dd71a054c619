"""GAN training phases as data: each is (name, module, optimizer, scaler, interval, terms).

    phases = build_phases(cfg, G=G, D=D, report=stats.report, dtype=None)
    for phase in phases.due("D", d_steps):          # D main, then D's lazy penalty when due
        accumulate(phase, micro_batches)
        step(phase, guard)

A phase trains one network (`module`, maybe DDP-wrapped) with its own optimizer and GradScaler,
runs every `interval` steps of its side (D phases count D steps, G phases G steps), and sums its
`terms` (callables micro-batch -> loss) into one loss. `accumulate` runs the terms over the
micro-batches of one global batch: `no_sync` on all but the last (DDP all-reduces once),
autocast, scaled backward of loss / micro-batches, so the update equals one pass over the whole
batch (up to float summation order; networks with batch statistics, BatchNorm in G, see each
micro-batch's own). The other network's parameters are frozen meanwhile, so G's phase computes
no gradients for D's weights (and D's none for G's). `step` unscales, measures the gradient norm,
skips a non-finite step (counted; too many in a row stop the run), steps and runs the phase's
after-step hook (WGAN weight clipping).

A new regulariser is a new entry in `build_phases`, not a new branch in the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import Config
from pipeline.errors import ConfigError, TrainingError
from pipeline.losses import PENALTIES, build_loss, clip_weights
from pipeline.training.ada import AdaptiveAugment
from pipeline.training.augment import diff_augment, parse_policy


@dataclass
class MicroBatch:
    """One process's share of one global batch, on the device. D phases see real images and the
    fakes G made for them (detached); G phases see latents and labels only."""
    z: Tensor
    labels: Tensor | None           # real labels (D) or drawn labels (G); None if unconditional
    real: Tensor | None = None
    fake: Tensor | None = None


Term = Callable[[MicroBatch], Tensor]


@dataclass
class Phase:
    name: str                       # "D", "Dreg", "G": the name in stats (Loss/<name>, Grad/<name>/norm)
    side: str                       # "D" or "G": which step counter `interval` counts
    module: nn.Module               # the network trained (as called: DDP-wrapped under several processes)
    others: list[nn.Module]         # networks used but not trained (frozen, never all-reduced)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    interval: int                   # runs when (side's step counter) % interval == 0
    terms: list[Term]
    after_step: Callable[[], None] = lambda: None   # after a real (finite) optimizer step
    ratio: float = 1.0              # lazy-regularisation adjustment of the optimizer's lr and betas
    frozen: list[nn.Parameter] = field(default_factory=list)   # never trained (FreezeD's first D layers)
    params: list[nn.Parameter] = field(default_factory=list)

    def __post_init__(self):
        self.params = list(unwrap(self.module).parameters())

    def due(self, step: int) -> bool:
        return step % self.interval == 0


class Phases(list):
    """The phase list, in the order the loop runs them; `penalties` holds (penalty, configured
    weight, schedule) for the schedules to set each penalty's weight."""

    penalties: tuple = ()           # set by build_phases
    pairs_reals: bool = False       # G's step pairs each fake with a real (relativistic losses)
    ada = None                      # the AdaptiveAugment every image D sees goes through, if on

    def due(self, side: str, step: int) -> list[Phase]:
        return [p for p in self if p.side == side and p.due(step)]

    def named(self, name: str) -> Phase:
        return next(p for p in self if p.name == name)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def no_sync(module: nn.Module):
    """DDP's no_sync for a wrapped module; nothing for a plain one."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    return lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class NonFiniteGuard:
    """Counts skipped (inf/NaN) steps per phase; too many in a row stop the run with a clear error."""

    def __init__(self, limit: int, last_checkpoint: Callable[[], str], kimg: Callable[[], float]):
        self.limit, self.last_checkpoint, self.kimg = limit, last_checkpoint, kimg
        self.skipped = 0
        self.in_a_row: dict[str, int] = {}

    def record(self, name: str, ok: bool) -> None:
        self.skipped += 0 if ok else 1
        self.in_a_row[name] = 0 if ok else self.in_a_row.get(name, 0) + 1
        if self.in_a_row[name] >= self.limit:
            raise TrainingError(f"{self.in_a_row[name]} consecutive {name} steps with non-finite gradients at kimg "
                                f"{self.kimg():.3f}; last good checkpoint: {self.last_checkpoint()}. "
                                "Lower the learning rates, use train.mixed_precision=fp32 or bf16, or check the data")


def grad_norm(params: list[nn.Parameter]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros(())


# ------------------------------------------------------------------------------------------------
# Running a phase.

def accumulate(phase: Phase, micro_batches: list[MicroBatch], autocast: Callable) -> None:
    """Gradients of the phase's terms summed over the micro-batches, as for one global batch."""
    for m in phase.others:
        m.requires_grad_(False)
    phase.module.requires_grad_(True)
    for p in phase.frozen:
        p.requires_grad_(False)
    phase.optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        sync = contextlib.nullcontext() if i == n - 1 else no_sync(phase.module)
        with sync, contextlib.ExitStack() as frozen:
            for m in phase.others:
                frozen.enter_context(no_sync(m))
            with autocast():
                loss = sum(term(mb) for term in phase.terms)
            phase.scaler.scale(loss / n).backward()
    for m in phase.others:
        m.requires_grad_(True)
    for p in phase.frozen:
        p.requires_grad_(False)


def first_layers(module: nn.Module, n: int) -> list[nn.Parameter]:
    """Parameters of the first `n` layers in registration order (the input side of every D here);
    a layer is a module path, its spectral-norm parametrisation included."""
    layers: dict[str, list[nn.Parameter]] = {}
    for name, p in unwrap(module).named_parameters():
        layers.setdefault(name.split(".parametrizations")[0].rsplit(".", 1)[0], []).append(p)
    return [p for params in list(layers.values())[:n] for p in params]


def step(phase: Phase, guard: NonFiniteGuard, report: Callable[[str, Tensor], None]) -> bool:
    """Unscale, measure, and step unless the gradients are not finite (then skip and count)."""
    scaler, opt = phase.scaler, phase.optimizer
    scaler.unscale_(opt)
    norm = grad_norm(phase.params)
    report(f"Grad/{phase.name}/norm", norm)
    ok = bool(torch.isfinite(norm))
    if ok or scaler.is_enabled():
        scaler.step(opt)        # an enabled scaler skips non-finite steps itself and lowers its scale
    scaler.update()
    opt.zero_grad(set_to_none=True)
    guard.record(phase.name, ok)
    if ok:
        phase.after_step()
    return ok


# ------------------------------------------------------------------------------------------------
# The phases of a config.

def lazy_ratio(intervals: list[int], adjust: bool) -> float:
    """StyleGAN2 (Appendix B): a regulariser step every k steps adds 1 step per k; Adam's lr and
    betas are scaled by k / (k + 1) so that the effective optimisation speed is unchanged. With
    several lazy intervals, 1 / (1 + sum 1/k) (the extra steps per D step add up)."""
    extra = sum(1 / k for k in set(intervals) if k > 1)
    return 1 / (1 + extra) if adjust else 1.0


def adam(module: nn.Module, lr: float, betas: list[float], ratio: float = 1.0) -> torch.optim.Adam:
    return torch.optim.Adam(unwrap(module).parameters(), lr=lr * ratio, betas=tuple(b ** ratio for b in betas))


def penalty_specs(loss_cfg) -> list:
    """(name, weight, interval, schedule) of every penalty: `loss.penalty` and `loss.penalties`."""
    specs = [(p.name, p.weight, p.interval, p.schedule) for p in loss_cfg.penalties if p.name != "none"]
    if loss_cfg.penalty != "none":
        specs.insert(0, (loss_cfg.penalty, loss_cfg.penalty_weight, loss_cfg.penalty_interval,
                         loss_cfg.penalty_schedule))
    names = [s[0] for s in specs]
    if len(set(names)) < len(names):
        raise ConfigError(f"loss.penalties: {', '.join(names)} names a penalty twice; give each once")
    return specs


def build_phases(cfg: Config, *, G: nn.Module, D: nn.Module, device: torch.device, dtype: torch.dtype | None,
                 report: Callable[[str, Tensor], None]) -> Phases:
    """G's and D's phases for `cfg`: D main (with the every-step penalties), one lazy D step per
    distinct penalty interval, G main. Every image D sees goes through the augmentation: ADA
    (`train.ada_groups`), DiffAugment (`train.augment`) or none."""
    t = cfg.train
    loss = build_loss(cfg.loss)
    penalties = [(PENALTIES.get(name)(weight, interval), weight, schedule)
                 for name, weight, interval, schedule in penalty_specs(cfg.loss)]
    ada, augment = build_augment(t)
    fp16 = dtype == torch.float16
    scaler_D = torch.amp.GradScaler(device.type, enabled=fp16)    # one per optimizer: the penalty
    scaler_G = torch.amp.GradScaler(device.type, enabled=fp16)    # recipe needs D's own scale
    ratio = lazy_ratio([p.interval for p, _, _ in penalties], t.lazy_adjust)
    opt_D = adam(D, t.d_lr, t.d_betas, ratio)
    opt_G = adam(G, t.g_lr, t.g_betas)
    clean = cfg.loss.penalty_inputs == "clean"

    def d_main(mb: MicroBatch) -> Tensor:
        real_logits = D(augment(mb.real), mb.labels).float()
        fake_logits = D(augment(mb.fake), mb.labels).float()
        value = loss.d_loss(real_logits, fake_logits)
        if ada is not None:
            ada.observe(real_logits.detach())       # the overfitting heuristic's r_t
        report("Loss/D/main", value)
        report("D/real", real_logits.mean())
        report("D/fake", fake_logits.mean())
        return value

    def penalty_term(penalty) -> Term:
        def term(mb: MicroBatch) -> Tensor:
            # clean: the gradient w.r.t. the un-augmented image, taken through the augmentation
            # (StyleGAN2-ADA); augmented: w.r.t. the augmented image itself.
            if clean:
                value, stats = penalty(D, mb.real, mb.fake, mb.labels, scaler=scaler_D, augment=augment)
            else:
                value, stats = penalty(D, augment(mb.real), augment(mb.fake), mb.labels, scaler=scaler_D)
            for name, v in stats.items():
                report(name, v)
            return value
        return term

    def g_main(mb: MicroBatch) -> Tensor:
        fake_logits = D(augment(G(mb.z, mb.labels)), mb.labels).float()
        real_logits = None
        if loss.relativistic:           # paired with this micro-batch's reals; no gradient through them
            with torch.no_grad():
                real_logits = D(augment(mb.real), mb.labels).float()
        value = loss.g_loss(fake_logits, real_logits)
        report("Loss/G/main", value)
        return value

    every_step = [penalty_term(p) for p, _, _ in penalties if p.interval == 1]
    frozen = first_layers(D, t.freeze_d_layers)
    phases = Phases([Phase("D", "D", D, [G], opt_D, scaler_D, 1, [d_main, *every_step], ratio=ratio,
                           after_step=lambda: clip_weights(unwrap(D), cfg.loss.clip), frozen=frozen)])
    intervals = sorted({p.interval for p, _, _ in penalties if p.interval > 1})
    for k in intervals:
        # Its own D step every k D steps, on the D step's batch; each loss is x k.
        phases.append(Phase("Dreg" if len(intervals) == 1 else f"Dreg{k}", "D", D, [G], opt_D, scaler_D, k,
                            [penalty_term(p) for p, _, _ in penalties if p.interval == k], ratio=ratio,
                            frozen=frozen))
    phases.append(Phase("G", "G", G, [D], opt_G, scaler_G, 1, [g_main]))
    phases.penalties, phases.pairs_reals, phases.ada = penalties, loss.relativistic, ada
    return phases


def build_augment(t) -> tuple:
    """(AdaptiveAugment or None, the callable applied to D's inputs) from the train config."""
    policy = parse_policy(t.augment)
    if t.ada_groups:
        if policy:
            raise ConfigError(f"train.augment={t.augment!r} and train.ada_groups={t.ada_groups!r}: choose one "
                              "augmentation (set the other to \"\")")
        ada = AdaptiveAugment(groups=t.ada_groups, p=t.ada_p, target=t.ada_target or 0.6,
                              speed_kimg=t.ada_speed_kimg, interval=t.ada_interval, adaptive=t.ada_target > 0)
        return ada, ada
    return None, ((lambda x: diff_augment(x, policy)) if policy else (lambda x: x))
