"""`ganpipe train --config FILE --run-dir RUN [key=value ...]`: resolve the run's config (new or
resumed), record it, run the loop.

    ganpipe train --config configs/mnist_dcgan.yaml --run-dir runs/mnist
    accelerate launch --multi_gpu --num_processes 2 -m pipeline train --config ... --run-dir ...

A second `ganpipe train` on an existing RUN resumes from its newest checkpoint. The config is
then RUN/config.yaml plus overrides (or --config plus overrides, which must agree with it): keys
that change the model or the optimisation are refused by name; run length, intervals, workers and
display may change. Exit status: 0 done, or stopped on request (RUN/STOP, e.g. from `ganpipe watch
--stop-on-alert`: checkpoint written; remove the file and run again to resume), 3 preempted after
writing a checkpoint (requeue), 2 bad input, 1 anything else.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline import dist
from pipeline.catalog import load_config
from pipeline.config import Config, config_yaml, diff_configs
from pipeline.errors import UserError
from pipeline.io import write_text_atomic

# Keys that may differ between a run's recorded config and the resuming command.
RESUMABLE = {"train.total_kimg", "train.tick_kimg", "train.snapshot_kimg", "train.checkpoint_kimg",
             "train.keep_checkpoints", "train.keep_snapshots", "train.peer_timeout_s",
             "log.progress", "train.threads", "train.max_nonfinite_steps",
             "log.grid_size", "train.snapshot_raw", "data.num_workers", "data.path",
             "log.trackers", "log.tracker_project", "log.mlflow_uri"}


def resolve_run_config(config: str | None, run_dir: Path, overrides: list[str]) -> Config:
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


def record_config(cfg: Config, run_dir: Path) -> None:
    """RUN/config.yaml, written atomically by the first process only (before any process group)."""
    if dist.launch_env().rank == 0:
        remove_temporaries(run_dir)
        write_text_atomic(run_dir / "config.yaml", config_yaml(cfg))


def remove_temporaries(run_dir: Path) -> None:
    """What a killed trainer left half-written (`.NAME.tmp-*` of its config, stats, markers,
    checkpoints, snapshots and grids); the evaluator's own temporaries in RUN are not touched."""
    for pattern in (".config.yaml.tmp-*", ".stats.jsonl.tmp-*", ".FINISHED.tmp-*", ".PREEMPTED.tmp-*",
                    "checkpoints/.ckpt-*.tmp-*", "snapshots/.snapshot-*.tmp-*", "samples/.fakes-*.tmp-*"):
        for path in run_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def train_command(args: argparse.Namespace) -> int:
    cfg = resolve_run_config(args.config, args.run_dir, args.overrides)
    record_config(cfg, args.run_dir)
    from pipeline.training.loop import training_loop

    return training_loop(cfg, args.run_dir)
