"""The one way to a config: defaults, a YAML delta, overrides, every registry name and every check
that spans fields. The names of networks, losses and penalties are handed down from their
registries to `pipeline.config`, which imports none of them.

    cfg = load_config("configs/mnist_dcgan.yaml", ["loss.name=hinge"])   # every command and the API
    cfg = from_dict({"model": {"name": "mlp"}}, ["train.total_kimg=1"])   # the same, from plain data
    check(cfg, world_size=4)       # at train start: also what depends on the processes and this machine
    ganpipe config --config configs/cifar10_wgan_gp.yaml train.total_kimg=50   # print the result

`check` holds every check that a config can fail before its first step and that the config
alone decides; what needs the data (its resolution, channels and classes) is checked where the
data is opened and the networks are built.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

from pipeline import config
from pipeline.config import Config
from pipeline.errors import ConfigError

# Network families that refuse spectral norm in D, and why (their builders say the same).
NO_SPECTRAL_NORM = {
    "r3gan": "r3gan uses no normalisation in D (R1 + R2 keep it in check)",
    "stylegan2": "stylegan2 does not use spectral norm (its D relies on R1 instead)",
}


def registered_names() -> dict[str, list[str]]:
    """Registry kind -> allowed names, for the config fields declared with `registry=`."""
    from pipeline.losses import LOSSES, PENALTIES
    from pipeline.networks import NETWORKS

    return {"network": NETWORKS.keys(), "loss": LOSSES.keys(), "penalty": PENALTIES.keys()}


def from_dict(data: dict, overrides: Iterable[str] = ()) -> Config:
    """Defaults, the sections in `data`, then `key=value` overrides; every name and field checked."""
    cfg = config._build(data, overrides, registered_names())
    check(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, the YAML delta at `path`, then `key=value` overrides; every name and field checked."""
    data = config._read(path) if path is not None else {}
    try:
        return from_dict(data, overrides)
    except ConfigError as exc:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from None


# Fields added after runs were recorded, with the value that keeps such a run's behaviour: RUN/config.yaml
# is a full dump, so a recorded config without the field was trained before it existed, that way.
BEFORE_FIELD = {"train.gen_labels": "uniform"}


def load_recorded(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """A run's recorded config (RUN/config.yaml), read as what that run did: a field it predates
    takes the value of the behaviour it had (BEFORE_FIELD), unless `overrides` set it."""
    data, overrides = config._read(path), list(overrides)
    set_here = {o.split("=", 1)[0].strip() for o in overrides}
    missing = [f"{key}={value}" for key, value in BEFORE_FIELD.items()
               if key not in set_here and key.split(".")[1] not in (data.get(key.split(".")[0]) or {})]
    return load_config(path, [*missing, *overrides])


def check(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError, naming the keys and the remedy, for the first combination of fields that
    would fail at training's start. With `world_size` (the number of processes, known when
    training starts) also how the batch splits over them, and that the chosen trackers are
    installed on this machine (not checked without it: a recorded config must load anywhere)."""
    from pipeline.losses import LOSSES, PENALTIES
    from pipeline.training.ada import parse_groups
    from pipeline.training.augment import parse_policy
    from pipeline.training.ema import profile_name

    # The loss and its penalties.
    loss = cfg.loss
    if loss.clip > 0 and loss.name != "wasserstein":
        raise ConfigError(f"loss.clip: weight clipping belongs to the original WGAN; it needs "
                          f"loss.name=wasserstein, not {loss.name} (or set loss.clip=0)")
    names = [p.name for p in loss.penalties]
    if len(set(names)) < len(names):
        raise ConfigError(f"loss.penalties: {', '.join(names)} names a penalty twice; give each once")
    for name in names:
        penalty = PENALTIES.get(name)
        if penalty.networks is not None and cfg.model.name not in penalty.networks:
            raise ConfigError(f"loss.penalties: {name} needs {penalty.needs} (model.name="
                              f"{' or '.join(penalty.networks)}); the {cfg.model.name} generator has none")
    # The finite-difference form (no double backward) exists for R1 and R2 only; its step belongs to it.
    for i, spec in enumerate(loss.penalties):
        if spec.approximate and not PENALTIES.get(spec.name).approximable:
            raise ConfigError(f"loss.penalties[{i}].approximate: {spec.name} has no finite-difference form (only "
                              "r1 and r2 have one); remove approximate from this entry")
        if not spec.approximate and spec.sigma != config.PenaltyConfig.sigma:
            raise ConfigError(f"loss.penalties[{i}].sigma={spec.sigma} is the step of the finite-difference "
                              f"{spec.name}; set approximate: true in this entry too, or remove sigma")

    # The networks.
    if cfg.model.spectral_norm and cfg.model.name in NO_SPECTRAL_NORM:
        raise ConfigError(f"model.spectral_norm: {NO_SPECTRAL_NORM[cfg.model.name]}; leave it unset or choose "
                          "model.name=resnet")
    if cfg.model.d_head and cfg.model.name != "dcgan":
        raise ConfigError(f"model.d_head={cfg.model.d_head}: only model.name=dcgan offers a hidden head in D "
                          f"(the {cfg.model.name} D has its own design); set model.d_head=0")
    if cfg.model.d_norm != "none":
        if cfg.model.name != "dcgan":
            raise ConfigError(f"model.d_norm={cfg.model.d_norm}: only model.name=dcgan offers D normalisation "
                              f"(the {cfg.model.name} D has its own design); set model.d_norm=none")
        # A BatchNorm D mixes the samples of a batch: a gradient penalty's per-sample input gradient
        # is then not the sample's own (WGAN-GP paper, Sec. 4).
        per_sample = [n for n in names if PENALTIES.get(n).side == "D"]
        if per_sample:
            raise ConfigError(f"model.d_norm={cfg.model.d_norm} with loss.penalties {', '.join(per_sample)}: a "
                              "BatchNorm D couples the samples of a batch, so a per-sample gradient penalty is not "
                              "each sample's own; set model.d_norm=none or remove the penalty")

    # The optimizer: RMSProp has no betas to schedule.
    o = cfg.optim
    if o.name != "adam" and (o.beta2_schedule.kind != "constant" or o.beta2_schedule.start != 1.0
                             or o.beta2_schedule.warmup_kimg > 0):
        raise ConfigError(f"optim.beta2_schedule schedules Adam's beta2; optim.name={o.name} has none: "
                          "remove the schedule or set optim.name=adam")

    # What D sees: one augmentation, each spelled right.
    a = cfg.augment
    policy = parse_policy(a.diffaugment)
    if a.ada_groups:
        parse_groups(a.ada_groups)
        if policy:
            raise ConfigError(f"augment.diffaugment={a.diffaugment!r} and augment.ada_groups={a.ada_groups!r}: "
                              "choose one augmentation (set the other to \"\")")
        # ADA's heuristic r_t = E[sign(D(real))] needs a logit whose zero means something: the relativistic
        # and Wasserstein losses see only differences of logits, so D's offset drifts freely and r_t with it
        # (measured: rpgan on MNIST drove p to 0.48 and FID_mnist from 1.69 to 3.44; R3GAN schedules p instead).
        if a.ada_target > 0 and (loss.name == "wasserstein" or LOSSES.get(loss.name).relativistic):
            raise ConfigError(f"augment.ada_target={a.ada_target} with loss.name={loss.name}: adaptive ADA reads "
                              "sign(D(real)), which this loss leaves without a zero (only differences of logits "
                              "count); set augment.ada_target=0 and a fixed augment.ada_p or augment.ada_p_schedule, "
                              "as R3GAN does")

    # The EMA profiles: each a snapshot variant of its own.
    stds = [profile_name(s) for s in cfg.ema.posthoc_std]
    if len(set(stds)) < len(stds):
        raise ConfigError(f"ema.posthoc_std: {cfg.ema.posthoc_std} gives a profile twice; give each value once")

    # The batch: split into processes x micro-batches x images per process per forward.
    t, batch = cfg.train, cfg.data.batch_size
    if t.batch_per_process and batch % t.batch_per_process:
        raise ConfigError(f"data.batch_size={batch} is not a multiple of train.batch_per_process="
                          f"{t.batch_per_process}; pick a per-process batch that divides it (or 0: data.batch_size "
                          "/ processes)")
    if t.reuse_fakes and t.n_critic != 1:
        raise ConfigError(f"train.reuse_fakes needs train.n_critic=1 and one micro-batch per step (here n_critic "
                          f"{t.n_critic}); set train.reuse_fakes=false")
    if world_size is None:
        return
    per_proc = t.batch_per_process or batch // world_size
    if per_proc < 1 or batch % (per_proc * world_size):
        raise ConfigError(f"data.batch_size={batch} is not a multiple of train.batch_per_process={per_proc} x "
                          f"{world_size} processes; pick a global batch divisible by both")
    accum = batch // (per_proc * world_size)
    if t.reuse_fakes and accum != 1:
        raise ConfigError(f"train.reuse_fakes needs train.n_critic=1 and one micro-batch per step (here {accum} "
                          f"micro-batches of train.batch_per_process={per_proc} on {world_size} processes); set "
                          "train.reuse_fakes=false or train.batch_per_process=0")

    # This machine: the trackers it is asked to write to.
    from pipeline.training.trackers import chosen
    chosen(cfg)


def config_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(config.config_yaml(cfg), end="")
    return 0
