"""Configs checked against what is registered: the names of networks, losses and penalties are
handed down from their registries to `pipeline.config`, which imports none of them.

    cfg = load_config("configs/mnist_dcgan.yaml", ["loss.name=hinge"])   # every command uses this
    ganpipe config --config configs/cifar10_wgan_gp.yaml train.total_kimg=50   # print the result
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

from pipeline import config
from pipeline.config import Config


def registered_names() -> dict[str, list[str]]:
    """Registry kind -> allowed names, for the config fields declared with `registry=`."""
    from pipeline.losses import LOSSES, PENALTIES
    from pipeline.networks import NETWORKS

    return {"network": NETWORKS.keys(), "loss": LOSSES.keys(), "penalty": ["none", *PENALTIES.keys()]}


def from_dict(data: dict, overrides: Iterable[str] = ()) -> Config:
    return config.from_dict(data, overrides, registered_names())


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, the YAML delta at `path`, then `key=value` overrides; every name checked."""
    return config.load_config(path, overrides, registered_names())


def config_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(config.config_yaml(cfg), end="")
    return 0
