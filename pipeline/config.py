"""Typed configuration: nested dataclasses, YAML deltas over their defaults, dotted overrides.

    from pipeline.catalog import load_config       # the one loader: every command and the API use it
    cfg = load_config("configs/mnist_dcgan.yaml", ["data.batch_size=32", "seed=1"])

This module is the floor under everything but `errors`: it imports nothing else of ours. Names
that registries own (networks, losses, penalties) are checked against the `names` that
`pipeline.catalog` hands down to `_build`; it also runs the checks that span fields (`catalog.check`).

Every field has a default and a one-line comment giving its unit. Constraints live in the field's
metadata (`min`, `max`, `choices`), so one validator serves every section and every error names
the dotted key and what is allowed. Later stages add their sections to `Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from pipeline.errors import ConfigError

__all__ = ["Config", "ConfigError", "validate"]


def opt(default: Any, *, min: float | None = None, max: float | None = None, below: float | None = None,
        choices: Iterable[Any] | None = None, registry: str | None = None, length: int | None = None) -> Any:
    """A dataclass field with range/choice constraints checked by `validate`. `registry` names
    the kind whose registered names are the allowed values; the floors that own those registries
    hand the names down (`pipeline.catalog`), so this module imports none of them. `below` is an
    exclusive maximum; for a list, `length` is its required length and the bounds hold per item."""
    meta = {"min": min, "max": max, "below": below, "choices": choices, "registry": registry, "length": length}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    path: str = opt("")                 # prepared shard directory (has manifest.json), or a URL pattern
    split: str = opt("train")           # manifest split to stream from a prepared directory
    batch_size: int = opt(64, min=1, max=1 << 20)    # global batch in images per optimizer step, all processes together
    num_workers: int = opt(-1, min=-1, max=256)  # loader worker processes per training process (-1 = auto: 0 on a CPU-only run, 2 with a GPU)
    shuffle_buffer: int = opt(1000, min=0, max=10_000_000)  # samples held for shuffling per stream (0 = no shuffle)
    hflip: bool = opt(False)            # random horizontal flip, probability 0.5
    max_bad_fraction: float = opt(0.05, min=0.0, max=1.0)  # bad samples per shard pass above this are an error
    cache_mb: float = opt(256.0, min=0.0, max=1 << 24)  # decoded samples kept in memory per loader process, in MiB (0 = decode every pass)
    require_labels: bool = opt(False)   # a sample without a label is bad (conditional models set this)
    resolution: int = opt(0, min=0, max=8192)     # expected image side in pixels for URL patterns (0 = from manifest)
    channels: int = opt(0, choices=(0, 1, 3))  # expected channels for URL patterns (0 = from manifest)
    num_classes: int = opt(0, min=0, max=1_000_000)  # classes of the labels for URL patterns (0 = from manifest, or unlabelled)


@dataclass
class ModelConfig:
    name: str = opt("dcgan", registry="network")  # network family (mlp, dcgan, resnet, biggan, stylegan2, r3gan)
    z_dim: int = opt(0, min=0, max=65536)          # latent numbers per sample (0 = family default: 100, 128 resnet, 512 stylegan2, 64 r3gan, biggan 128/120/120/140 at 32/64/128/256 px, in equal chunks)
    g_width: float = opt(1.0, min=1e-3, max=64.0)  # multiplier on G's published layer widths (feature maps or units)
    d_width: float = opt(1.0, min=1e-3, max=64.0)  # multiplier on D's published layer widths (feature maps or units)
    conditional: bool = opt(False)      # class-conditional G and D; needs labelled data
    spectral_norm: bool | None = opt(None)  # spectral norm in D, and in G for biggan (null = family default: on for resnet and biggan only)
    d_norm: str = opt("none", choices=("none", "batch"))  # dcgan: normalisation of D's layers (batch: BatchNorm after every conv but the first, as Radford et al.; refused with r1, r2, wgan-gp)
    d_head: int = opt(0, min=0, max=65536)  # dcgan: hidden units of a fully connected LeakyReLU layer between D's last feature map and its logit (0 = the paper's single linear read-out)
    blocks_per_stage: int = opt(0, min=0, max=64)  # r3gan: residual blocks at each side in G and in D (0 = family default: 2)
    expansion: int = opt(0, min=0, max=64)         # r3gan: a residual block's hidden maps per input map (0 = family default: 2)
    group_width: int = opt(0, min=0, max=65536)    # r3gan: maps per group of the grouped 3x3 conv (0 = family default: 16)
    w_dim: int = opt(512, min=1, max=65536)        # stylegan2: numbers in the intermediate latent w
    mapping_layers: int = opt(8, min=1, max=64)  # stylegan2: fully connected layers in the mapping network
    mbstd_group: int = opt(4, min=0, max=1024)    # stylegan2: samples per minibatch-stddev group (0 = no mbstd layer)
    attention_res: int = opt(64, choices=(0, 4, 8, 16, 32, 64, 128, 256))  # biggan: side in pixels after which G and D have a self-attention block (0 = none; a network without that side has none)
    style_mixing: float = opt(0.9, min=0.0, max=1.0)  # stylegan2: probability that a training image takes its w from a second z from a random layer on (0 = off)


@dataclass
class ScheduleConfig:
    """A value's course over training, as a multiple of its configured value: `start` at the start,
    `end` at the end ({kind: cosine, start: 0, end: 1} ramps up from 0 to the value)."""
    kind: str = opt("constant", choices=("constant", "linear", "cosine"))  # shape from start to end (constant: `start` throughout)
    start: float = opt(1.0, min=0.0, max=1e6)     # multiple of the configured value at the start (after the warm-up)
    end: float = opt(1.0, min=0.0, max=1e6)       # multiple of the configured value reached at the end
    warmup_kimg: float = opt(0.0, min=0.0)        # linear ramp from 0 to `start` over this many kimg first (0 = none)
    length_kimg: float = opt(0.0, min=0.0)        # kimg from the start (after warm-up) to `end` (0 = until train.total_kimg)


@dataclass
class PenaltyConfig:
    name: str = opt("r1", registry="penalty")     # on D: wgan-gp, r1, r2; on G: pl (path length), ortho (BigGAN)
    weight: float = opt(1.0, min=0.0)             # lambda for wgan-gp, gamma for r1/r2 (gamma/2 * E|grad D|^2), w_pl for pl (2 in StyleGAN2), beta for ortho (1e-4 in BigGAN)
    interval: int = opt(1, min=1, max=10_000)     # steps of the penalty's side (D steps; G steps for pl, ortho) between evaluations (lazy when > 1; the loss is scaled by it)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # course of the weight over kimg
    approximate: bool = opt(False)                # r1, r2: ((D(x + sigma eps) - D(x)) / sigma)^2, eps ~ N(0, I), in place of |grad D|^2 (GAT, Hyun et al. 2026): no double backward, same weight
    sigma: float = opt(0.01, min=1e-4, max=1.0)   # with approximate: the finite difference's step, in image units ([-1, 1] images; GAT's 0.01)


@dataclass
class LossConfig:
    name: str = opt("nonsaturating", registry="loss")  # adversarial loss from the LOSSES registry (rpgan: R3GAN's)
    clip: float = opt(0.0, min=0.0)     # WGAN weight clipping bound c, D kept in [-c, c] (0 = off; wasserstein only)
    penalties: list[PenaltyConfig] = opt([])  # regularisers of D and G, each with its weight, interval, schedule (R3GAN: r1 + r2; [] = none)
    penalty_inputs: str = opt("clean", choices=("clean", "augmented"))  # gradient w.r.t. the un-augmented image through the augmentation (StyleGAN2-ADA) or w.r.t. the augmented one


@dataclass
class TrainConfig:
    total_kimg: float = opt(100.0, min=0.0)      # training length in thousands of real images shown to D
    tick_kimg: float = opt(4.0, min=1e-6)        # kimg between status lines / stats.jsonl rows / sample grids
    snapshot_kimg: float = opt(20.0, min=0.0)    # kimg between EMA-G snapshots for eval (0 = only at the end)
    checkpoint_kimg: float = opt(20.0, min=0.0)  # kimg between full resumable checkpoints (0 = only at the end)
    keep_checkpoints: int = opt(3, min=1, max=10_000)        # newest full checkpoints kept on disk
    keep_snapshots: int = opt(0, min=0, max=1_000_000)      # newest snapshots kept, plus every unscored and best one (0 = all)
    batch_per_process: int = opt(0, min=0, max=1 << 20)       # images per process per forward (0 = data.batch_size / processes)
    n_critic: int = opt(1, min=1, max=1000)                # D steps per G step (5 for WGAN)
    max_nonfinite_steps: int = opt(10, min=1, max=1_000_000)    # consecutive skipped (inf/NaN) steps that stop the run
    reuse_fakes: bool = opt(False)               # G's step trains on the fakes of the D step before it (PyTorch's DCGAN example): one G forward per step instead of two; needs n_critic 1 and one micro-batch
    threads: int = opt(0, min=0, max=4096)                 # torch CPU threads per process (0 = cores / local processes)
    peer_timeout_s: float = opt(300.0, min=1.0, max=86400.0)  # a collective waiting longer for another rank ends the run
    init_from: str = opt("")                      # start a new run from weights: a checkpoint dir, a run dir (its newest), or a snapshot .json (G only)
    freeze_d_layers: int = opt(0, min=0, max=1000)  # FreezeD (Mo et al. 2020): D's first N layers from the input keep their weights
    snapshot_raw: bool = opt(False)              # each snapshot also keeps the raw (non-EMA) G's weights, for `--generator raw`
    gen_labels: str = opt("data", choices=("data", "uniform"))  # classes of G's own steps (conditional models): data = drawn in proportion to the training split's class_counts in the manifest (StyleGAN2-ADA), uniform = every class alike; snapshots record it, eval draws alike by default


@dataclass
class OptimConfig:
    """The optimizer of G and D (Adam, or RMSProp for the original WGAN), and the course of its settings over training."""
    name: str = opt("adam", choices=("adam", "rmsprop"))  # optimizer of G and D (rmsprop: the original WGAN's, torch's alpha 0.99 and eps 1e-8; the betas are then unused)
    g_lr: float = opt(2e-4, min=0.0)             # learning rate of G (Adam or RMSProp)
    d_lr: float = opt(2e-4, min=0.0)             # learning rate of D (Adam or RMSProp)
    g_betas: list[float] = opt([0.5, 0.999], min=0.0, below=1.0, length=2)     # Adam (beta1, beta2) of G
    d_betas: list[float] = opt([0.5, 0.999], min=0.0, below=1.0, length=2)     # Adam (beta1, beta2) of D
    lazy_adjust: bool = opt(True)                # scale D's (G's) lr and betas by k/(k+1) for a D (G) penalty every k D (G) steps (StyleGAN2)
    lr_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)     # course of g_lr and d_lr over kimg
    beta2_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # course of both Adam beta2 (kept below 1)
    adam_impl: str = opt("fused", choices=("fused", "foreach", "for-loop"))  # torch's Adam implementation (fused: one kernel, skips without a host read)


@dataclass
class EMAConfig:
    """The exponential moving average of G that snapshots keep, and EDM2's post-hoc EMA profiles."""
    halflife_kimg: float = opt(10.0, min=0.0)  # half-life of G's EMA in kimg (0 = EMA is a plain copy)
    rampup: float = opt(0.05, min=0.0)       # EMA half-life at most this x kimg seen (0 = no ramp-up)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)    # course of halflife_kimg
    standing_stats: int = opt(0, min=0, max=100_000)  # batches of G's own samples (one per-process batch each) each snapshot's BatchNorm statistics are recomputed from (BigGAN's standing statistics; 0 = the EMA's averaged statistics)
    posthoc_std: list[float] = opt([], min=1e-3, below=0.2886)  # relative EMA lengths (sigma_rel) of EDM2 power-function EMA profiles kept in snapshots for `ganpipe posthoc-ema` ([] = off; EDM2: [0.05, 0.1])


@dataclass
class AugmentConfig:
    """Augmentation of what D sees: DiffAugment's fixed policy and ADA's adaptive pipeline."""
    diffaugment: str = opt("")                       # DiffAugment policy, comma-separated: color, translation, cutout ("" = off)
    ada_groups: str = opt("")                    # ADA augmentation before D, comma-separated: blit, geom, color ("" = off)
    ada_p: float = opt(0.0, min=0.0, max=1.0)    # ADA's starting probability (the fixed p when ada_target=0)
    ada_target: float = opt(0.6, min=0.0, max=1.0)  # target of r_t = E[sign(D(real))] (0 = fixed or scheduled p)
    ada_speed_kimg: float = opt(500.0, min=1e-3)  # kimg in which the adaptive p can go from 0 to 1
    ada_interval: int = opt(4, min=1, max=10_000)  # D steps between adjustments of p
    ada_p_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # course of a fixed p (ada_target=0)


@dataclass
class SpeedConfig:
    """How the same arithmetic is run fast: precision, memory format, kernels; none changes what is computed beyond rounding."""
    mixed_precision: str = opt("auto", choices=("auto", "fp32", "bf16", "fp16"))  # autocast dtype (auto: bf16 on capable GPUs, fp32 on CPU)
    channels_last: bool = opt(True)              # NHWC memory format for conv nets' weights and activations (faster convolutions; docs/benchmarks.md)
    joint_d_forward: bool = opt(True)            # D's step runs D once on cat(reals, fakes) where D treats samples independently (no BatchNorm, no minibatch stddev); two forwards otherwise
    compile: str = opt("off", choices=("off", "inductor", "aot_eager"))  # torch.compile backend for G's and D's forwards in the main phases and approximate r1/r2 (exact penalties stay eager: double backward)
    cudnn_benchmark: bool = opt(False)           # CUDA only: cuDNN times conv algorithms per shape and keeps the fastest (StyleGAN2-ADA's default; off here until measured: `make gpu-check` measures it on and off)
    pin_memory: bool = opt(False)                # CUDA only: batches reach the host in page-locked memory and are copied to the GPU without blocking (off until measured: `make gpu-check` measures it on and off)
    tf32: bool = opt(False)                      # CUDA only: TF32 matmuls and convolutions on Ampere and later (off, as StyleGAN2-ADA: full fp32 precision)
    sync_debug: bool = opt(False)                # CUDA only: steps between ticks (after the first tick) run under torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises where it happens


@dataclass
class LogConfig:
    """Where progress, scalars and sample grids go."""
    grid_size: int = opt(64, min=1, max=4096)              # images in the fixed-z sample grid
    trackers: list[str] = opt(["tensorboard"], choices=("tensorboard", "wandb", "mlflow"))  # where scalars, grids, params and eval metrics go (RUN/tb; wandb offline in RUN/wandb; mlflow in RUN/mlruns)
    tracker_project: str = opt("ganpipe")        # W&B project and MLflow experiment the run is filed under
    mlflow_uri: str = opt("")                     # MLflow tracking URI, e.g. http://host:5000 or sqlite:///mlflow.db ("" = file store RUN/mlruns)
    progress: bool = opt(True)                   # progress bar on rank 0 (status lines are printed either way)


@dataclass
class Config:
    seed: int = opt(0, min=0, max=2**63 - 1)           # global seed; ranks and loader streams derive theirs from it
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------------------------
# Building typed configs from plain data.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float and nothing else implicit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return float(value)     # YAML 1.1 reads 4e-4 (no dot) as a string; everyone means the number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported annotation {tp!r}")
    hint = "; YAML reads yes/no/on/off as booleans: quote the value" if tp is str and isinstance(value, bool) else ""
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")


# Keys that moved to their own section: an old spelling is refused with the new one.
RENAMED = {
    "train.g_lr": "optim.g_lr",
    "train.d_lr": "optim.d_lr",
    "train.g_betas": "optim.g_betas",
    "train.d_betas": "optim.d_betas",
    "train.lazy_adjust": "optim.lazy_adjust",
    "train.lr_schedule": "optim.lr_schedule",
    "train.beta2_schedule": "optim.beta2_schedule",
    "train.adam_impl": "optim.adam_impl",
    "train.ema_halflife_kimg": "ema.halflife_kimg",
    "train.ema_rampup": "ema.rampup",
    "train.ema_schedule": "ema.schedule",
    "train.posthoc_ema_std": "ema.posthoc_std",
    "train.augment": "augment.diffaugment",
    "train.ada_groups": "augment.ada_groups",
    "train.ada_p": "augment.ada_p",
    "train.ada_target": "augment.ada_target",
    "train.ada_speed_kimg": "augment.ada_speed_kimg",
    "train.ada_interval": "augment.ada_interval",
    "train.ada_p_schedule": "augment.ada_p_schedule",
    "train.mixed_precision": "speed.mixed_precision",
    "train.channels_last": "speed.channels_last",
    "train.joint_d_forward": "speed.joint_d_forward",
    "train.compile": "speed.compile",
    "train.cudnn_benchmark": "speed.cudnn_benchmark",
    "train.tf32": "speed.tf32",
    "train.sync_debug": "speed.sync_debug",
    "train.trackers": "log.trackers",
    "train.tracker_project": "log.tracker_project",
    "train.mlflow_uri": "log.mlflow_uri",
    "train.progress": "log.progress",
    "train.grid_size": "log.grid_size",
}


# The single-penalty keys of `loss`: refused with the `loss.penalties` entry that says the same.
PENALTY_KEYS = ("penalty", "penalty_weight", "penalty_interval", "penalty_schedule")


def _flow(value: Any) -> str:
    """`value` as one line of YAML flow style: [{name: r1, weight: 10}]."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip()


def _penalty_gone(loss: dict) -> ConfigError:
    """The error for a `loss` section with single-penalty keys, showing the penalties list that
    does the same: the old penalty first (with the old default weight 10 unless given), then the
    section's own `penalties`."""
    old = [k for k in PENALTY_KEYS if k in loss]
    entry = {"name": loss.get("penalty", "r1"), "weight": loss.get("penalty_weight", 10)}
    if "penalty_interval" in loss:
        entry["interval"] = loss["penalty_interval"]
    if "penalty_schedule" in loss:
        entry["schedule"] = loss["penalty_schedule"]
    rest = loss.get("penalties") or []
    new = _flow(([] if entry["name"] == "none" else [entry]) + (rest if isinstance(rest, list) else [rest]))
    keys = ", ".join(f"loss.{k}" for k in old)
    return ConfigError(f"{keys} {'is' if len(old) == 1 else 'are'} gone: write loss.penalties={new} "
                       f"(in YAML: penalties: {new} under loss:)")


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    if prefix == "loss" and any(k in data for k in PENALTY_KEYS):
        raise _penalty_gone(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if key in RENAMED:
            raise ConfigError(f"config key '{key}' is now '{RENAMED[key]}': write {RENAMED[key]}="
                              f"{data[unknown[0]]!r} (in YAML, under the section '{RENAMED[key].split('.')[0]}:')")
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown config key '{key}'; {hint}allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def validate(obj: Any, prefix: str = "", names: Mapping[str, Iterable[str]] | None = None) -> None:
    """Check every field's `min`/`max`/`choices`; raise ConfigError naming the first bad key.
    `names` maps a registry kind to its allowed names; fields of kinds not given are not checked."""
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key, names)
            continue
        choices = f.metadata.get("choices")
        registry = f.metadata.get("registry")
        if registry is not None and names is not None and registry in names:
            choices = names[registry]
        if choices is not None:
            allowed = list(choices)
            for i, item in enumerate(value if isinstance(value, list) else [value]):   # per item for a list
                if item not in allowed:
                    where = f"{key}[{i}]" if isinstance(value, list) else key
                    raise ConfigError(f"{where}: {item!r} is not allowed; choose one of "
                                      f"{', '.join(map(str, allowed))}")
        length = f.metadata.get("length")
        if length is not None and len(value) != length:
            raise ConfigError(f"{key}: {value!r} has {len(value)} values, expected {length}")
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            if dataclasses.is_dataclass(item):
                validate(item, where, names)
            else:
                _check_bounds(where, item, f.metadata)


def _check_bounds(key: str, value: Any, meta: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    lo, hi, below = meta.get("min"), meta.get("max"), meta.get("below")
    if value is None or isinstance(value, (str, bool)):
        return
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is above the maximum {hi}")
    if below is not None and value >= below:
        raise ConfigError(f"{key}: {value!r} must be below {below}")


def _merge(base: dict, delta: dict, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in delta.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{prefix}{k}.")
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """`a.b.c=VALUE` -> {'a': {'b': {'c': VALUE}}}; VALUE is parsed as YAML (1, 0.5, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. data.batch_size=32)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({' '.join(str(exc).split())})") from None
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _build(data: dict, overrides: Iterable[str], names: Mapping[str, Iterable[str]]) -> Config:
    """Defaults, the sections of `data`, then `key=value` overrides; every field's bounds and
    registry names checked. Use `pipeline.catalog.from_dict`, which hands `names` down and runs
    the cross-field checks."""
    merged = dict(data or {})
    for text in overrides:
        merged = _merge(merged, parse_override(text))
    cfg = build_dataclass(Config, merged, "")
    validate(cfg, "", names)
    return cfg


def _read(path: str | Path) -> dict:
    """The sections of the YAML file at `path` (a delta over the defaults), as plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for the catalogue)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, every key in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))


def config_hash(cfg: Config) -> str:
    """Short stable hash of the resolved config, for snapshot and metric records."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as {dotted key: value}; lists stay lists."""
    def walk(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            out.update(walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    return walk(to_dict(cfg), "")


def diff_configs(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = flat_config(a), flat_config(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
