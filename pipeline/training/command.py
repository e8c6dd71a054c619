"""`ganpipe train --config FILE --run-dir RUN [key=value ...]`: validate, record, run the loop.

    ganpipe train --config configs/mnist_dcgan.yaml --run-dir runs/mnist
    accelerate launch --multi_gpu --num_processes 2 -m pipeline train --config ... --run-dir ...

A second `ganpipe train` on an existing RUN resumes from its newest checkpoint. The config is
then RUN/config.yaml plus overrides (or --config plus overrides, which must agree with it): keys
that change the model or the optimisation are refused by name; run length, intervals, workers and
display may change. Exit status: 0 done, 3 preempted after writing a checkpoint (requeue), 2 bad
input, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.config import diff_configs, dump_config, load_config

# Keys that may differ between a run's recorded config and the resuming command.
RESUMABLE = {"train.total_kimg", "train.tick_kimg", "train.snapshot_kimg", "train.checkpoint_kimg",
             "train.keep_checkpoints", "train.progress", "train.threads", "train.max_nonfinite_steps",
             "train.inject_nan_steps", "train.grid_size", "data.num_workers", "data.path"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file from configs/ (optional when resuming RUN)")
    p.add_argument("--run-dir", required=True, type=Path, help="run directory; resumed when it has checkpoints")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_kimg=50 loss.name=hinge")


def resolve_run_config(config: str | None, run_dir: Path, overrides: list[str]):
    recorded = run_dir / "config.yaml"
    if recorded.is_file():
        old = load_config(recorded)
        new = load_config(config or recorded, overrides)
        conflicts = [k for k in diff_configs(old, new) if k not in RESUMABLE]
        if conflicts:
            raise UserError(f"{run_dir} was trained with a different config: {', '.join(conflicts)} differ from "
                            f"{recorded}; resume with the same values or start a new --run-dir")
        return new
    if config is None:
        raise UserError(f"{run_dir} has no config.yaml: pass --config FILE to start a new run")
    return load_config(config, overrides)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_run_config(args.config, args.run_dir, args.overrides)
    if int(os.environ.get("RANK", 0)) == 0:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = args.run_dir / f".config.yaml.tmp-{os.getpid()}"
        dump_config(cfg, tmp)
        os.replace(tmp, args.run_dir / "config.yaml")
    from pipeline.training.loop import training_loop

    return training_loop(cfg, args.run_dir)
