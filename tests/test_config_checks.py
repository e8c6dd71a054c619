"""Every config that would fail at training's first step fails at `ganpipe config`, in one line
that names the keys (`pipeline.catalog.check`); what depends on the processes is checked when
training starts, with their number."""

from __future__ import annotations

import pytest

from conftest import cli
from pipeline.catalog import check, from_dict
from pipeline.errors import ConfigError

# (config file or None, overrides, keys the message names): each trained until its first step before.
STEP0 = {
    "reuse_fakes with several D steps": (
        "configs/cifar10_dcgan.yaml", ["train.n_critic=2"], ["train.reuse_fakes", "train.n_critic"]),
    "batch not a multiple of the per-process batch": (
        None, ["data.batch_size=64", "train.batch_per_process=48"], ["data.batch_size", "train.batch_per_process"]),
    "per-process batch above the batch": (
        None, ["data.batch_size=16", "train.batch_per_process=32"], ["data.batch_size", "train.batch_per_process"]),
    "DiffAugment and ADA together": (
        None, ["augment.diffaugment=color", "augment.ada_groups=blit"], ["augment.diffaugment", "augment.ada_groups"]),
    "an unknown DiffAugment op": (None, ["augment.diffaugment=color,flip"], ["augment.diffaugment", "flip"]),
    "an unknown ADA group": (
        "configs/stylegan2_ada_small.yaml", ["augment.ada_groups=blit,warp"], ["augment.ada_groups", "warp"]),
    "ADA groups that name none": (None, ["augment.ada_groups=' , '"], ["augment.ada_groups"]),
    "adaptive ADA with a loss whose logits have no zero": (
        "configs/mnist_rpgan.yaml", ["augment.ada_groups=blit"], ["augment.ada_target", "loss.name=rpgan"]),
    "adaptive ADA with the Wasserstein loss": (
        "configs/cifar10_wgan_gp.yaml", ["augment.ada_groups=blit"], ["augment.ada_target", "loss.name=wasserstein"]),
    "a penalty twice": (None, ["loss.penalties=[{name: r1}, {name: r1}]"], ["loss.penalties", "r1"]),
    "path length without StyleGAN2": (
        "configs/ffhq256_stylegan2.yaml", ["model.name=dcgan"], ["loss.penalties", "pl", "model.name=stylegan2"]),
    "weight clipping without WGAN": (None, ["loss.name=hinge", "loss.clip=0.01"], ["loss.clip", "loss.name"]),
    "spectral norm in R3GAN": ("configs/cifar10_r3gan.yaml", ["model.spectral_norm=true"], ["model.spectral_norm"]),
    "spectral norm in StyleGAN2": (None, ["model.name=stylegan2", "model.spectral_norm=true"], ["model.spectral_norm"]),
    "an EMA profile twice": (None, ["ema.posthoc_std=[0.05, 0.05]"], ["ema.posthoc_std"]),
}


@pytest.mark.parametrize("case", STEP0)
def test_ganpipe_config_rejects_what_would_fail_at_step_0(case):
    path, overrides, keys = STEP0[case]
    ok = cli("config", *(["--config", path] if path else []), *overrides[:-1])
    assert ok.returncode == 0                 # the config without the last override is fine ...
    bad = cli("config", *(["--config", path] if path else []), *overrides, check=False)
    assert bad.returncode == 2 and bad.stdout == ""     # ... and with it refused, in one line naming the keys
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("ganpipe config: error: "), line
    for key in keys:
        assert key in line, (key, line)
    if path:
        assert f"(in {path})" in line


def test_the_world_size_decides_the_split_when_training_starts():
    cfg = from_dict({}, ["data.batch_size=64"])
    check(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"data\.batch_size=64 is not a multiple of train\.batch_per_process=21 x 3 "
                                          "processes"):
        check(cfg, world_size=3)
    per_process = from_dict({}, ["data.batch_size=64", "train.batch_per_process=16"])
    check(per_process, world_size=4)
    with pytest.raises(ConfigError, match=r"data\.batch_size=64 is not a multiple of train\.batch_per_process=16 x 3"):
        check(per_process, world_size=3)
    # One micro-batch per step for reuse_fakes: 16 x 2 processes = 32 is one, 16 x 1 is two.
    reuse = from_dict({}, ["data.batch_size=32", "train.batch_per_process=16", "train.reuse_fakes=true"])
    check(reuse, world_size=2)
    with pytest.raises(ConfigError, match=r"train\.reuse_fakes needs train\.n_critic=1 and one micro-batch per step "
                                          r"\(here 2 micro-batches of train\.batch_per_process=16 on 1 processes\)"):
        check(reuse, world_size=1)


def test_a_tracker_not_installed_here_is_refused_when_training_starts_only(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = from_dict({}, ["log.trackers=[tensorboard,wandb]"])      # a recorded config loads on any machine
    with pytest.raises(ConfigError, match="log.trackers: wandb is chosen but not installed"):
        check(cfg, world_size=1)
