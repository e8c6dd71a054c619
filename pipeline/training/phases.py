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

A new regulariser is a new entry in `build_phases`, not a new branch in the loop. Penalties have
a side (`pipeline.losses`): D-side ones (r1, r2, wgan-gp; r1 and r2 exact or `approximate`, by
finite differences without double backward, under the same phases, intervals and scaler) join D's
main phase when every-step or get "Dreg" phases; G-side ones (pl, ortho) join G's main phase or get "Greg" phases, every k G
steps, with G's Adam adjusted for them as D's is for its lazy penalties. A penalty's running
state (pl's mean) travels in the checkpoint through `Phases.penalty_state()`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.catalog import check
from pipeline.config import Config
from pipeline.errors import TrainingError
from pipeline.losses import build_loss, build_penalties, clip_weights, joint_penalty
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
    kept: Tensor | None = None      # G(z) with its graph, for G's step (train.reuse_fakes)


Term = Callable[[MicroBatch], Tensor]


@dataclass
class Phase:
    name: str                       # "D", "Dreg", "G", "Greg": the name in stats (Grad/<name>/norm)
    side: str                       # "D" or "G": which step counter `interval` counts
    module: nn.Module               # the network trained (as called: DDP-wrapped under several processes)
    others: list[nn.Module]         # networks used but not trained (frozen, never all-reduced)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    interval: int                   # runs when (side's step counter) % interval == 0
    terms: list[Term]
    after_step: Callable[[], None] = lambda: None   # after every step, taken or skipped (must be idempotent)
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

    def penalty_state(self) -> dict[str, dict]:
        """{penalty name: its running state} for the checkpoint (penalties with state only: pl)."""
        return {p.name: state for p, _, _ in self.penalties if (state := p.state_dict())}

    def load_penalty_state(self, state: dict[str, dict]) -> None:
        for p, _, _ in self.penalties:
            if p.name in state:
                p.load_state_dict(state[p.name])


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def no_sync(module: nn.Module):
    """DDP's no_sync for a wrapped module; nothing for a plain one."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    return lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class NonFiniteGuard:
    """Counts skipped (inf/NaN) steps per phase on the device; `check()`, called at every tick and
    checkpoint, reads the counts once and stops the run with a clear error when a phase had
    `limit` non-finite steps in a row. Nothing is lost by checking late: a skipped step leaves the
    weights as they were."""

    def __init__(self, limit: int, last_checkpoint: Callable[[], str], kimg: Callable[[], float]):
        self.limit, self.last_checkpoint, self.kimg = limit, last_checkpoint, kimg
        self.restored = 0                       # skipped steps before this process (from the checkpoint)
        self._skipped: Tensor | None = None     # skipped since, on the device
        self.in_a_row: dict[str, Tensor] = {}   # current run of non-finite steps per phase
        self.worst: dict[str, Tensor] = {}      # longest run since the last check

    @property
    def skipped(self) -> int:
        """Every skipped step of the run (a host read: at ticks and checkpoints only)."""
        return self.restored + (int(self._skipped) if self._skipped is not None else 0)

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.restored, self._skipped = int(value), None

    def record(self, name: str, ok: Tensor) -> None:
        bad = (~ok).to(torch.int64)
        self._skipped = bad if self._skipped is None else self._skipped + bad
        run = bad if name not in self.in_a_row else (self.in_a_row[name] + 1) * bad
        self.in_a_row[name] = run
        self.worst[name] = run if name not in self.worst else torch.maximum(self.worst[name], run)

    def check(self) -> None:
        worst = {name: int(run) for name, run in self.worst.items()}
        self.worst = dict(self.in_a_row)
        for name, n in worst.items():
            if n >= self.limit:
                raise TrainingError(f"{n} consecutive {name} steps with non-finite gradients by kimg "
                                    f"{self.kimg():.3f}; last good checkpoint: {self.last_checkpoint()}. "
                                    "Lower the learning rates, use speed.mixed_precision=fp32 or bf16, or check the data")


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


def step(phase: Phase, guard: NonFiniteGuard, report: Callable[[str, Tensor], None]) -> Tensor:
    """Unscale, measure, and step unless the gradients are not finite (then skip and count).
    Returns whether the step was taken, as a device tensor: with the fused Adam
    (`optim.adam_impl=fused`, the default) nothing here waits for the device, because the skip
    happens inside the optimizer's kernel (its `found_inf` input, which GradScaler also uses)."""
    scaler, opt = phase.scaler, phase.optimizer
    scaler.unscale_(opt)
    norm = grad_norm(phase.params)
    report(f"Grad/{phase.name}/norm", norm)
    ok = torch.isfinite(norm)
    if scaler.is_enabled():
        scaler.step(opt)        # skips non-finite steps itself (on the device for fused Adam), lowers its scale
    elif getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale, opt.found_inf = None, (~ok).float()
        try:
            opt.step()          # the kernel leaves weights, moments and step count alone when found_inf
        finally:
            del opt.grad_scale, opt.found_inf
    elif bool(ok):              # a host read: only the fused optimizer can skip on the device
        opt.step()
    scaler.update()
    opt.zero_grad(set_to_none=True)
    guard.record(phase.name, ok)
    phase.after_step()          # idempotent after a skipped step (WGAN's clip of unchanged weights)
    return ok


# ------------------------------------------------------------------------------------------------
# The phases of a config.

def lazy_ratio(intervals: list[int], adjust: bool) -> float:
    """StyleGAN2 (Appendix B): a regulariser step every k steps adds 1 step per k; Adam's lr and
    betas are scaled by k / (k + 1) so that the effective optimisation speed is unchanged. With
    several lazy intervals, 1 / (1 + sum 1/k) (the extra steps per step of that side add up)."""
    extra = sum(1 / k for k in set(intervals) if k > 1)
    return 1 / (1 + extra) if adjust else 1.0


def build_optimizer(module: nn.Module, side: str, optim, ratio: float = 1.0) -> torch.optim.Optimizer:
    """The optimizer of G or D (`side`) from the `optim` section, with the lazy adjustment `ratio`.

    `optim.name=adam`: Adam with the side's lr and betas, lr x ratio and betas ^ ratio.
    `optim.name=rmsprop`: RMSProp with the side's lr x ratio and torch's defaults otherwise (alpha
    0.99, eps 1e-8, no momentum), as the original WGAN's code; the betas are unused.
    `optim.adam_impl` is torch's implementation: fused (one kernel, and a skipped step without a
    host read), foreach (batched ops) or for-loop (per parameter). RMSProp has no fused kernel in
    torch, so fused means foreach there (a skipped step then costs one host read)."""
    lr, betas = (optim.g_lr, optim.g_betas) if side == "G" else (optim.d_lr, optim.d_betas)
    params = unwrap(module).parameters()
    if optim.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr * ratio, foreach=optim.adam_impl != "for-loop")
    kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[optim.adam_impl]
    return torch.optim.Adam(params, lr=lr * ratio, betas=tuple(b ** ratio for b in betas), **kind)


def build_phases(cfg: Config, *, G: nn.Module, D: nn.Module, device: torch.device, dtype: torch.dtype | None,
                 report: Callable[[str, Tensor], None]) -> Phases:
    """G's and D's phases for `cfg`: D main (with the every-step D penalties), one lazy D step per
    distinct D-penalty interval, G main (with the every-step G penalties), one lazy G step per
    distinct G-penalty interval. Every image D sees goes through the augmentation: ADA
    (`augment.ada_groups`), DiffAugment (`augment.diffaugment`) or none. `cfg` is checked first
    (`pipeline.catalog.check`), as loading it did: a config changed since fails here, not mid-step."""
    check(cfg)
    loss = build_loss(cfg.loss)
    penalties = [(p, spec.weight, spec.schedule) for p, spec in zip(build_penalties(cfg.loss), cfg.loss.penalties)]
    on_D = [p for p, _, _ in penalties if p.side == "D"]
    on_G = [p for p, _, _ in penalties if p.side == "G"]
    ada, augment = build_augment(cfg.augment)
    fp16 = dtype == torch.float16
    scaler_D = torch.amp.GradScaler(device.type, enabled=fp16)    # one per optimizer: the penalty
    scaler_G = torch.amp.GradScaler(device.type, enabled=fp16)    # recipe needs D's own scale
    ratio = lazy_ratio([p.interval for p in on_D], cfg.optim.lazy_adjust)
    ratio_G = lazy_ratio([p.interval for p in on_G], cfg.optim.lazy_adjust)
    opt_D = build_optimizer(D, "D", cfg.optim, ratio)
    opt_G = build_optimizer(G, "G", cfg.optim, ratio_G)
    clean = cfg.loss.penalty_inputs == "clean"
    fwd_G, fwd_D = compiled(G, cfg.speed.compile), compiled(D, cfg.speed.compile)     # the main phases' forwards

    # One forward on cat(reals, fakes) gives the same logits as two (up to float summation order)
    # when D treats samples independently, in larger, faster matrix products; and a spectrally
    # normalised D then runs one power iteration per D step, as Miyato et al. do.
    joint = cfg.speed.joint_d_forward and not getattr(unwrap(D), "mixes_batch", True)

    def d_main(mb: MicroBatch) -> Tensor:
        real, fake = augment(mb.real), augment(mb.fake)
        if joint:
            labels = None if mb.labels is None else torch.cat([mb.labels, mb.labels])
            real_logits, fake_logits = fwd_D(torch.cat([real, fake]), labels).float().chunk(2)
        else:
            real_logits, fake_logits = fwd_D(real, mb.labels).float(), fwd_D(fake, mb.labels).float()
        value = loss.d_loss(real_logits, fake_logits)
        if ada is not None:
            ada.observe(real_logits.detach())       # the overfitting heuristic's r_t
        report("Loss/D/main", value)
        report("D/real", real_logits.mean())
        report("D/fake", fake_logits.mean())
        return value

    def penalty_term(group: list) -> Term:
        """One term for D penalties that run together: one forward on their points' concatenation
        (`joint_penalty`) when D is per-sample and `speed.joint_d_forward`, else one each. In a
        lazy step R1's logits of the reals count towards ADA's r_t (StyleGAN2-ADA's Dreg does so);
        an every-step R1 joins D's main step, whose reals are counted already."""
        lazy = group[0].interval > 1
        observe = ada.observe if ada is not None and lazy else None

        def term(mb: MicroBatch) -> Tensor:
            # clean: the gradient w.r.t. the un-augmented image, taken through the augmentation
            # (StyleGAN2-ADA); augmented: w.r.t. the augmented image itself.
            real, fake, aug = (mb.real, mb.fake, augment) if clean else (augment(mb.real), augment(mb.fake), None)
            value = 0
            for part in ([group] if joint else [[p] for p in group]):
                # An approximate (finite-difference) R1/R2 has no double backward, so it may run
                # through the compiled forward; the exact ones differentiate D eagerly.
                loss_part, stats = joint_penalty(part, D, real, fake, mb.labels, scaler=scaler_D, augment=aug,
                                                 observe_real=observe, forward=fwd_D, joint=joint)
                value = value + loss_part
                for name, v in stats.items():
                    report(name, v)
            return value
        return term

    def g_main(mb: MicroBatch) -> Tensor:
        fake = mb.kept if mb.kept is not None else fwd_G(mb.z, mb.labels)
        fake_logits = fwd_D(augment(fake), mb.labels).float()
        real_logits = None
        if loss.relativistic:           # paired with this micro-batch's reals; no gradient through them
            with torch.no_grad():
                real_logits = fwd_D(augment(mb.real), mb.labels).float()
        value = loss.g_loss(fake_logits, real_logits)
        report("Loss/G/main", value)
        return value

    def g_penalty_term(penalty) -> Term:
        def term(mb: MicroBatch) -> Tensor:
            value, stats = penalty(G, mb.z, mb.labels, scaler=scaler_G)
            for name, v in stats.items():
                report(name, v)
            return value
        return term

    every_step = [penalty_term(group)] if (group := [p for p in on_D if p.interval == 1]) else []
    frozen = first_layers(D, cfg.train.freeze_d_layers)
    phases = Phases([Phase("D", "D", D, [G], opt_D, scaler_D, 1, [d_main, *every_step], ratio=ratio,
                           after_step=lambda: clip_weights(unwrap(D), cfg.loss.clip), frozen=frozen)])
    intervals = sorted({p.interval for p in on_D if p.interval > 1})
    for k in intervals:
        # Its own D step every k D steps, on the D step's batch; each loss is x k.
        phases.append(Phase("Dreg" if len(intervals) == 1 else f"Dreg{k}", "D", D, [G], opt_D, scaler_D, k,
                            [penalty_term([p for p in on_D if p.interval == k])], ratio=ratio,
                            frozen=frozen))
    phases.append(Phase("G", "G", G, [D], opt_G, scaler_G, 1,
                        [g_main, *(g_penalty_term(p) for p in on_G if p.interval == 1)], ratio=ratio_G))
    g_intervals = sorted({p.interval for p in on_G if p.interval > 1})
    for k in g_intervals:
        # Its own G step every k G steps, on the G step's latents; each loss is x k.
        phases.append(Phase("Greg" if len(g_intervals) == 1 else f"Greg{k}", "G", G, [D], opt_G, scaler_G, k,
                            [g_penalty_term(p) for p in on_G if p.interval == k], ratio=ratio_G))
    phases.penalties, phases.pairs_reals, phases.ada = penalties, loss.relativistic, ada
    return phases


def compiled(module: nn.Module, backend: str) -> nn.Module:
    """`module` itself (`speed.compile=off`), or torch.compile of it with `backend`, sharing its
    parameters: the main phases' forwards and the approximate (finite-difference) R1/R2 use it. The
    exact penalties call the eager module: they differentiate through the gradient (create_graph),
    which compiled graphs do not support."""
    if backend == "off":
        return module
    return torch.compile(module, backend=backend, dynamic=False)


def build_augment(a) -> tuple:
    """(AdaptiveAugment or None, the callable applied to D's inputs) from the `augment` section
    (checked: at most one of ada_groups and diffaugment is set)."""
    policy = parse_policy(a.diffaugment)
    if a.ada_groups:
        ada = AdaptiveAugment(groups=a.ada_groups, p=a.ada_p, target=a.ada_target or 0.6,
                              speed_kimg=a.ada_speed_kimg, interval=a.ada_interval, adaptive=a.ada_target > 0)
        return ada, ada
    return None, ((lambda x: diff_augment(x, policy)) if policy else (lambda x: x))
