"""`ganpipe train --config FILE --run-dir RUN [key=value ...]`: resolve the run's config (new or
resumed) and run the loop, which records it in RUN/config.yaml once training really starts.

    ganpipe train --config configs/mnist_dcgan.yaml --run-dir runs/mnist
    ganpipe train --config configs/mnist_dcgan.yaml --run-dir runs/mnist --dry-run   # build, read a batch, write nothing
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
from pathlib import Path

from pipeline import config as config_module
from pipeline.catalog import BEFORE_FIELD, load_config, load_recorded
from pipeline.config import Config, diff_configs, flat_config
from pipeline.errors import UserError
from pipeline.rundir import RunDir

# Keys that may differ between a run's recorded config and the resuming command.
RESUMABLE = {"train.total_kimg", "train.tick_kimg", "train.snapshot_kimg", "train.checkpoint_kimg",
             "train.keep_checkpoints", "train.keep_snapshots", "train.peer_timeout_s",
             "log.progress", "train.threads", "train.max_nonfinite_steps",
             "log.grid_size", "train.snapshot_raw", "data.num_workers", "data.path",
             "log.trackers", "log.tracker_project", "log.mlflow_uri",
             "speed.cudnn_benchmark", "speed.pin_memory"}     # how fast, not what: runs recorded with cuDNN on resume


def resolve_run_config(config: str | None, run_dir: Path, overrides: list[str]) -> Config:
    recorded = RunDir(run_dir).config
    if recorded.is_file():
        old = load_recorded(recorded)
        # A field the run predates keeps the run's value unless the command sets it.
        kept = [f"{key}={flat_config(old)[key]}" for key in BEFORE_FIELD if config and not _sets(config, overrides, key)]
        new = load_config(config, [*kept, *overrides]) if config else load_recorded(recorded, overrides)
        conflicts = [k for k in diff_configs(old, new) if k not in RESUMABLE]
        if conflicts:
            was, now = flat_config(old), flat_config(new)
            values = "; ".join(f"{k}: {was.get(k)!r} there, {now.get(k)!r} now" for k in conflicts)
            raise UserError(f"{run_dir} was trained with a different config: {', '.join(conflicts)} differ from "
                            f"{recorded} ({values}); resume with the same values or start a new --run-dir")
        return new
    if config is None:
        raise UserError(f"{run_dir} has no config.yaml: pass --config FILE to start a new run")
    return load_config(config, overrides)


def _sets(path: str, overrides: list[str], key: str) -> bool:
    """Whether the config file at `path` or an override gives `key` (section.field) a value."""
    section, name = key.split(".", 1)
    return any(o.split("=", 1)[0].strip() == key for o in overrides) or \
        name in (config_module._read(path).get(section) or {})


def train_command(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *(["log.progress=false"] if args.no_progress else [])]
    cfg = resolve_run_config(args.config, args.run_dir, overrides)
    from pipeline.training.loop import training_loop

    return training_loop(cfg, args.run_dir, dry_run=args.dry_run)
