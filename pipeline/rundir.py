"""The run directory: every name and marker in RUN/, owned here and asked for everywhere else.

    run = RunDir("runs/mnist")
    run.config, run.stats, run.snapshots, run.checkpoints      # paths; nothing is created
    run.stop_request()                                         # RUN/STOP's first line, or ""
    run.mark_preempted(cur_nimg, checkpoint)                   # the markers the job scripts read
    python -m pipeline.rundir state RUN                        # one word for shell scripts (Slurm)

RUN/ is the user's record of a run (docs/architecture.md):

    config.yaml     resolved config, written when training really starts
    stats.jsonl     one row per tick          tb/            TensorBoard events
    samples/        fixed-z grids             snapshots/     EMA G for eval and sampling
    reals.png       a grid of real images, written when a run starts, to set beside the fakes
    checkpoints/    full training state       posthoc/       post-hoc EMA rebuilds
    metrics.jsonl   every score               best.json      best snapshot per metric
    metrics.png     score-vs-kimg plot        trackers.json  ids of W&B / MLflow runs
    FINISHED        training reached train.total_kimg (removed when a run is extended)
    PREEMPTED       a checkpoint was written on a signal: requeue and run again
    STOP            a request (by hand or `ganpipe watch --stop-on-alert`) to stop at the next tick
    .train.lock     who is training the run (host, pid, since): one trainer at a time (TrainerLock)
    .claims/        one file per snapshot being scored, per protocol (host, pid, since): one scorer each
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.io import LockFile, write_json_atomic


class RunDir:
    """Paths and markers of one run directory. Cheap to build: holds only the path."""

    CONFIG = "config.yaml"
    STATS = "stats.jsonl"
    TB = "tb"
    SAMPLES = "samples"
    REALS = "reals.png"
    SNAPSHOTS = "snapshots"
    CHECKPOINTS = "checkpoints"
    POSTHOC = "posthoc"
    METRICS = "metrics.jsonl"
    BEST = "best.json"
    PLOT = "metrics.png"
    TRACKERS = "trackers.json"
    MLRUNS = "mlruns"
    WANDB = "wandb"
    WATCH_LOCK = ".watch.lock"
    TRAIN_LOCK = ".train.lock"
    CLAIMS = ".claims"
    FINISHED = "FINISHED"
    PREEMPTED = "PREEMPTED"
    STOP = "STOP"
    # What a killed trainer can leave half-written (io.atomic_path's `.NAME.tmp-*`).
    TRAINER_TEMPORARIES = (f".{CONFIG}.tmp-*", f".{STATS}.tmp-*", f".{FINISHED}.tmp-*", f".{PREEMPTED}.tmp-*",
                           f"{CHECKPOINTS}/.ckpt-*.tmp-*", f"{SNAPSHOTS}/.snapshot-*.tmp-*",
                           f"{SAMPLES}/.fakes-*.tmp-*")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    config = property(lambda self: self.path / self.CONFIG)
    stats = property(lambda self: self.path / self.STATS)
    tb = property(lambda self: self.path / self.TB)
    samples = property(lambda self: self.path / self.SAMPLES)
    reals = property(lambda self: self.path / self.REALS)
    snapshots = property(lambda self: self.path / self.SNAPSHOTS)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    posthoc = property(lambda self: self.path / self.POSTHOC)
    metrics = property(lambda self: self.path / self.METRICS)
    best = property(lambda self: self.path / self.BEST)
    plot = property(lambda self: self.path / self.PLOT)
    trackers = property(lambda self: self.path / self.TRACKERS)
    mlruns = property(lambda self: self.path / self.MLRUNS)
    wandb = property(lambda self: self.path / self.WANDB)
    watch_lock = property(lambda self: self.path / self.WATCH_LOCK)
    train_lock = property(lambda self: self.path / self.TRAIN_LOCK)
    claims = property(lambda self: self.path / self.CLAIMS)
    finished = property(lambda self: self.path / self.FINISHED)
    preempted = property(lambda self: self.path / self.PREEMPTED)
    stop = property(lambda self: self.path / self.STOP)

    def grid(self, cur_nimg: int) -> Path:
        """The fixed-z sample grid written at `cur_nimg`."""
        return self.samples / f"fakes-{cur_nimg:09d}.png"

    def snapshot(self, name: str) -> Path:
        """A snapshot's JSON record by name (`snapshot-000002000`)."""
        return self.snapshots / (name if name.endswith(".json") else f"{name}.json")

    def claim(self, key: str) -> Path:
        """The claim file of one (snapshot, protocol) being scored (`key` names both)."""
        return self.claims / f"{key}.claim"

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir()

    # -- markers -------------------------------------------------------------------------------

    def stop_request(self) -> str:
        """What RUN/STOP says (its first line, or its path when empty); "" when there is none."""
        if not self.stop.is_file():
            return ""
        try:
            return next(iter(self.stop.read_text(errors="replace").strip().splitlines()), "")[:300] or str(self.stop)
        except OSError:
            return str(self.stop)    # removed between the check and the read, or unreadable: still a request

    def mark_finished(self, cur_nimg: int, checkpoint: Path | None) -> None:
        write_json_atomic(self.finished, {"cur_nimg": cur_nimg, "kimg": cur_nimg / 1000,
                                          "checkpoint": str(checkpoint)})

    def mark_preempted(self, cur_nimg: int, checkpoint: Path | None) -> None:
        """RUN/PREEMPTED, tagged with this attempt (Slurm job and restart count), so that a job script
        requeues only on a marker written by its own trainer."""
        write_json_atomic(self.preempted, {"cur_nimg": cur_nimg, "checkpoint": str(checkpoint),
                                           "attempt": attempt()})

    def clear_start_markers(self, total_nimg: int, cur_nimg: int) -> None:
        """At the start of a run: PREEMPTED is history now, and FINISHED is stale when images remain."""
        self.preempted.unlink(missing_ok=True)
        if cur_nimg < total_nimg:
            self.finished.unlink(missing_ok=True)

    def is_finished(self) -> bool:
        return self.finished.is_file()

    def state(self, this_attempt: str | None = None) -> str:
        """One word for job scripts: `finished`, `preempted` (a marker of `this_attempt` when given),
        `stopped` (RUN/STOP present), else `none`."""
        if self.finished.is_file():
            return "finished"
        if self.preempted.is_file():
            try:
                written_by = json.loads(self.preempted.read_text()).get("attempt")
            except (OSError, ValueError, AttributeError):
                written_by = None
            if this_attempt is None or written_by == this_attempt:
                return "preempted"
        if self.stop.is_file():
            return "stopped"
        return "none"

    def remove_temporaries(self) -> None:
        """What a killed trainer left half-written; the evaluator's own temporaries are not touched."""
        for pattern in self.TRAINER_TEMPORARIES:
            for path in self.path.glob(pattern):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class TrainerLock(LockFile):
    """One trainer per run directory: RUN/.train.lock (`io.LockFile`), tagged with the job attempt."""

    def __init__(self, run: RunDir):
        super().__init__(run.train_lock, {"attempt": attempt()})

    def acquire(self) -> bool:
        """Take the lock (True) or raise UserError saying who holds it and what to do."""
        if super().acquire():
            return True
        h = self.holder
        raise UserError(f"{self.path.parent} is being trained by {h.get('host', '?')} pid {h.get('pid', '?')} "
                        f"since {h.get('since', '?')} (lock {self.path}, heartbeat {self.age:.0f} s ago); wait for it "
                        f"to finish or stop it (touch {RunDir(self.path.parent).stop}), or, if that process is "
                        f"gone, run again after {self.STALE_S:.0f} s without a heartbeat")


def attempt() -> str:
    """This attempt of a Slurm job (job id and restart count), or "" outside Slurm."""
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm:{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return ""


def main(argv: list[str]) -> int:
    """`python -m pipeline.rundir state RUN`: print the run's state word (see `RunDir.state`); with
    Slurm's variables set, a PREEMPTED marker counts only when this job attempt wrote it."""
    if len(argv) != 2 or argv[0] != "state":
        print("usage: python -m pipeline.rundir state RUN", file=sys.stderr)
        return 2
    print(RunDir(argv[1]).state(attempt() or None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
