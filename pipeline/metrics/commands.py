"""`ganpipe eval` and `ganpipe watch`: score a run's snapshots (FID, KID, precision/recall,
density/coverage, Inception Score) and record the protocol.

    ganpipe eval --run-dir RUN --extractor mnist                 # the newest snapshot
    ganpipe eval --run-dir RUN --all --extractor mnist           # every snapshot not yet scored
    ganpipe eval --run-dir RUN --snapshot snapshot-000004000.json --metrics fid --num-gen 5000
    torchrun --nproc_per_node 2 -m pipeline eval --run-dir RUN --all   # generation split over 2 processes
    ganpipe eval --run-dir RUN --metrics fid,kid,pr,dc,is --extractor inception,dinov2-l14 --weights ~/weights
    ganpipe eval --run-dir RUN --metrics fid,pr,dc,is --weights ~/weights      # pr, dc on vgg16; fid, is on inception
    ganpipe eval --run-dir RUN --metrics pr --num-gen 50000 --num-real all     # StyleGAN2-ADA's pr50k3(_full)
    ganpipe eval --run-dir RUN --metrics is --is-resize tf-bilinear            # the IS as published

    ganpipe watch --run-dir RUN --extractor mnist --interval 60     # until the run finishes
    ganpipe watch --run-dir RUN --extractor mnist --once            # one pass (cron / Slurm array)

Both build one `Evaluator` (evaluator.py) from the same arguments (cli.py). Outputs, all in RUN:
`metrics.jsonl` (one line per snapshot and metric: the value with extractor and its weights hash,
resize, N generated, reference data/split/N/manifest hash, seed and seeding convention,
truncation psi and cutoff (`--psi`, `--cutoff`; a different psi is a different protocol), snapshot
sha256, kimg, seconds; k and sample sizes (sample_gen, and sample_ref = num_real) for the k-NN metrics and
KID, subsets for KID, splits and resize for the IS),
`best.json` (the best value per metric under the newest protocol, for FID and KID or the
`--best-metric` list; lower is better except for precision, recall, density, coverage and IS),
TensorBoard scalars `Metrics/{metric}_{extractor}` in RUN/tb at step cur_nimg (and the same in the
run's W&B and MLflow runs when log.trackers chose them: training/trackers.py), and `metrics.png`
(each metric against kimg). Same seed, snapshot and extractor give the same score.

The watcher, a periodic job beside training, scores each new snapshot exactly once: every
`--interval` seconds it lists the complete snapshots (their JSON record exists; the trainer writes
it last), skips those already in RUN/metrics.jsonl under the same protocol, and scores the rest
oldest first with the sha256 checked before loading. A snapshot that cannot be scored (truncated
or modified weights, a record of the wrong types, a model its weights do not fit) is reported
once, marked in metrics.jsonl (`kind: "bad_snapshot"`) and skipped, by this and every later
watcher, until its files change. metrics.jsonl is the state, appended one snapshot at a time, so
a restarted watcher continues where it stopped and never scores a snapshot twice. When RUN/FINISHED
(the trainer's end marker) exists, the watcher scores what is left and exits 0. SIGTERM or SIGINT
stop it at once (a snapshot being scored is dropped and scored after a restart), also with exit 0.
One watcher per run: a second one finds RUN/.watch.lock held and exits with an error. Whoever
scores a snapshot holds a claim on it under its protocol (RUN/.claims/, io.LockFile), so
`eval --all` beside the watcher scores only what the watcher is not scoring, and neither scores a
snapshot the other has scored.

The watcher's protocol is the run's main protocol (records.py): best.json, metrics.png, its alerts
and `train.keep_snapshots` follow it. `eval --all` sets it when the run has none yet, or with
`--main`; any other eval is a one-off: recorded in metrics.jsonl and printed, but best.json and
metrics.png stay with the main series. At its start every eval and watch rewrites best.json and
metrics.png when they disagree with metrics.jsonl.

After each snapshot the watcher checks for a run going wrong (alerts.py): a metric of
`--alert-metrics` worse than its best by `--alert-worse-by` for `--alert-patience` snapshots in a
row, or recall/coverage below `--alert-min-recall`/`--alert-min-coverage`. Alerts go to
metrics.jsonl (`kind: "alert"`), TensorBoard (`Alerts/...`) and the log; with `--stop-on-alert`
the watcher writes RUN/STOP, which the trainer reads at its next tick (it checkpoints and exits 0),
scores what is pending and exits 0.

    ganpipe watch --run-dir RUN --extractor mnist --metrics fid,pr --alert-min-recall 0.2 --stop-on-alert
    ganpipe eval --run-dir RUN --generator raw --all        # the raw G (train.snapshot_raw): fid_mnist_raw
    ganpipe eval --run-dir RUN --posthoc-std 0.05,0.1,0.15  # post-hoc EMA lengths: RUN/posthoc/ (posthoc.py)
The extractors and the reference statistics are loaded once and kept between polls.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Callable

from pipeline import dist
from pipeline.errors import SnapshotError, UserError
from pipeline.io import write_text_atomic
from pipeline.metrics import posthoc
from pipeline.metrics.alerts import AlertRules, check, new_alerts, record_alerts
from pipeline.metrics.evaluator import Evaluator
from pipeline.metrics.records import main_protocol, read_lines, scores
from pipeline.metrics.refstats import SAMPLE_MAX
from pipeline.metrics.scores import parse_metrics
from pipeline.training.snapshot import list_snapshots
from pipeline.rundir import RunDir



def evaluator_from_args(args: argparse.Namespace, log: Callable[[str], None] = print) -> Evaluator:
    return Evaluator(args.run_dir, metrics=parse_metrics(args.metrics), extractor=args.extractor,
                     num_gen=args.num_gen, num_real=getattr(args, "num_real", SAMPLE_MAX),
                     is_resize=getattr(args, "is_resize", "clean"), split=args.split, seed=args.seed, batch_size=args.batch_size,
                     device=args.device, inception_weights=args.inception_weights, data=args.data, log=log,
                     psi=getattr(args, "psi", 1.0), cutoff=getattr(args, "cutoff", None),
                     best_metrics=parse_best_metrics(getattr(args, "best_metric", None)),
                     weights=getattr(args, "generator", "ema"), labels=getattr(args, "labels", None))


def parse_best_metrics(text: str | None) -> list[str] | None:
    """--best-metric 'fid' or 'fid,precision' -> record metrics best.json ranks (None: fid and kid)."""
    if not text:
        return None
    from pipeline.errors import ConfigError
    from pipeline.metrics.scores import record_metrics

    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in record_metrics():
            raise ConfigError(f"unknown --best-metric '{name}'; choose from {', '.join(record_metrics())}")
    return names


# ---------------------------------------------------------------------------------------------
# ganpipe eval

def _select(ev: Evaluator, args: argparse.Namespace) -> list[str]:
    """Snapshot JSON paths to score, in order (decided on rank 0)."""
    if args.snapshot:
        from pipeline.api import resolve_snapshot

        return [str(resolve_snapshot(args.snapshot, args.run_dir))]
    found = [str(p) for p in list_snapshots(RunDir(args.run_dir).snapshots)]
    if not found:
        raise UserError(f"no snapshots in {RunDir(args.run_dir).snapshots} yet (training writes them "
                        "periodically; `ganpipe watch` waits for them)")
    if args.all and not args.force:
        if marked := ev.marked_bad():
            ev.log(f"skipping {len(marked)} snapshot(s) marked bad in metrics.jsonl "
                   f"({', '.join(m['snapshot'] for m in marked)}); a snapshot whose files change is tried again")
        pending = [m["json_path"] for m in ev.pending()]
        if not pending:
            ev.log("every snapshot is already scored under this protocol (use --force to score again)")
        return pending
    return found if args.all else found[-1:]


def eval_command(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise UserError(f"run directory {args.run_dir} does not exist")
    stds = posthoc.parse_stds(args.posthoc_std) if args.posthoc_std is not None else None
    if stds is not None and args.generator != "ema":
        raise UserError("--posthoc-std rebuilds EMA generators from the EMA profiles; leave --generator at ema")
    if stds is None and args.at_kimg is not None:
        raise UserError("--at-kimg goes with --posthoc-std (to score one snapshot, give --snapshot)")
    if getattr(args, "main", False) and not args.all:
        raise UserError("--main goes with --all: the run's main protocol is the one of its series over every snapshot")
    ev = None
    try:
        ev = evaluator_from_args(args)
        if stds is not None:
            targets = dist.broadcast_object(dist.on_main(lambda: posthoc.rebuild(args.run_dir, stds, args.at_kimg, ev.log),
                                                         (UserError,)))
            for path in targets:
                posthoc.record(args.run_dir, ev.score(path), ev.log)    # RUN/posthoc/, apart from the kimg history
            return 0
        dist.on_main(lambda: ev.start("eval --all" if args.all else None, force=getattr(args, "main", False)),
                     (UserError,))
        targets = dist.broadcast_object(dist.on_main(lambda: _select(ev, args), (UserError,)))
        bad = 0
        for path in targets:
            with ev.claimed(path, recheck=args.all and not args.force) as mine:
                if not mine:
                    continue
                try:
                    records = ev.score(path)
                except SnapshotError as exc:
                    if not Path(path).is_file():
                        continue                   # pruned since it was listed (train.keep_snapshots)
                    ev.mark_bad(path, exc)
                    if not args.all:
                        raise                      # the one snapshot asked for: one line, exit 2
                    ev.log(f"ignoring {Path(path).name}: {exc} (marked bad in metrics.jsonl)")
                    bad += 1
                    continue
                if records and records[0].get("weights") == "posthoc":
                    posthoc.record(args.run_dir, records, ev.log)      # a rebuild scored by name: RUN/posthoc/
                else:
                    ev.record(records)
        if not targets:
            ev.refresh_best()              # nothing new, yet --best-metric may have changed
        if bad:
            ev.log(f"ignored {bad} bad snapshot(s): see the lines above")
    finally:
        if ev is not None:
            ev.close()
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# ganpipe watch

class Stop(Exception):
    """Raised by the signal handler to abandon a snapshot being scored."""


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] watch: {msg}", flush=True)


def _lock(run_dir: Path):
    """An exclusive flock on RUN/.watch.lock; the kernel releases it when the process dies."""
    path = RunDir(run_dir).watch_lock
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(f"another `ganpipe watch` is scoring {run_dir} (lock {path} held by pid {holder}); "
                        "run one watcher per run, or stop the other one") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def alert_rules(args: argparse.Namespace) -> AlertRules:
    from pipeline.metrics.scores import record_metrics

    names = tuple(t.strip() for t in args.alert_metrics.split(",") if t.strip())
    for name in names:
        if name not in record_metrics():
            raise UserError(f"unknown --alert-metrics '{name}'; choose from {', '.join(record_metrics())}")
    try:
        return AlertRules(metrics=names, worse_by=args.alert_worse_by, patience=args.alert_patience,
                          min_recall=args.alert_min_recall, min_coverage=args.alert_min_coverage)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _alert(ev: Evaluator, run_dir: Path, rules: AlertRules, stop: bool) -> bool:
    """Record and log the alerts the scores so far raise; with `stop`, write RUN/STOP (first line:
    why, which the trainer prints). Whether RUN/STOP was written."""
    lines = read_lines(run_dir)
    alerts = new_alerts(run_dir, check(scores(lines), rules, main_protocol(run_dir, lines)))
    if not alerts:
        return False
    record_alerts(run_dir, alerts, ev.writer)
    for a in alerts:
        _log(f"ALERT {a['alert']}: {a['message']}")
    if stop:
        write_text_atomic(RunDir(run_dir).stop, "".join(f"ganpipe watch --stop-on-alert: {a['message']}\n" for a in alerts))
    return stop


def watch_command(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist (start training first, or fix --run-dir)")
    if dist.launch_env().world_size > 1:
        raise UserError("`ganpipe watch` runs as one process; use `ganpipe eval --all` under torchrun to "
                        "split generation over several")
    rules = alert_rules(args)
    lock = _lock(run_dir)
    state = {"stop": "", "busy": False}      # stop: name of the signal received

    def on_signal(signum, frame):
        # No printing here: a handler that prints can interrupt a print (reentrant write error).
        state["stop"] = signal.Signals(signum).name
        if state["busy"]:
            raise Stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while not state["stop"] and time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    ev = None
    scored, bad, stopping = 0, 0, False
    try:
        while not RunDir(run_dir).config.is_file() and not state["stop"] and not args.once:
            _log(f"waiting for {RunDir(run_dir).config}")
            sleep(args.interval)
        if state["stop"]:
            _log(f"{state['stop']}: stopping before the run started")
            return 0
        ev = evaluator_from_args(args, log=_log)
        ev.start("watch")
        if marked := ev.marked_bad():
            _log(f"skipping {len(marked)} snapshot(s) marked bad in metrics.jsonl "
                 f"({', '.join(m['snapshot'] for m in marked)}); a snapshot whose files change is tried again")
        _log(f"watching {RunDir(run_dir).snapshots} every {args.interval:g} s "
             f"({', '.join(ev.metrics)} with {', '.join(e.name for e in ev.extractors)}, {ev.num_gen} generated "
             f"vs {args.split})")
        while not state["stop"]:
            finished = RunDir(run_dir).is_finished()   # checked before listing: snapshots precede the marker
            for meta in ev.pending():
                if state["stop"]:
                    break
                path = meta["json_path"]
                try:
                    with ev.claimed(path, recheck=True) as mine:
                        if not mine:
                            continue              # another scorer has it, or has scored it since the listing
                        state["busy"] = True
                        try:
                            records = ev.score(path)
                        finally:
                            state["busy"] = False
                        ev.record(records)
                except SnapshotError as exc:
                    if Path(path).is_file():      # else removed since the listing (train.keep_snapshots)
                        ev.mark_bad(path, exc)
                        bad += 1
                        _log(f"ignoring {Path(path).name}: {exc} (marked bad in metrics.jsonl; tried again when "
                             "its files change)")
                    continue
                except Stop:
                    _log(f"abandoned {Path(path).name}; it is scored after a restart")
                    break
                scored += 1
                stopping = _alert(ev, run_dir, rules, args.stop_on_alert) or stopping
            if state["stop"]:
                break
            if stopping:
                _log(f"--stop-on-alert: {RunDir(run_dir).stop} written, the trainer checkpoints and exits at its next "
                     f"tick; scored {scored} snapshot(s) in this session; remove {RunDir(run_dir).stop} and restart both to go on")
                return 0
            if finished or args.once:
                why = "training finished" if finished else "--once"
                _log(f"{why}: scored {scored} snapshot(s) in this session"
                     + (f", ignored {bad} bad one(s)" if bad else ""))
                return 0
            sleep(args.interval)
        _log(f"{state['stop']}: stopping after scoring {scored} snapshot(s) in this session; "
             "a restart continues")
        return 0
    finally:
        state["busy"] = False
        for s, h in old.items():
            signal.signal(s, h)
        if ev is not None:
            ev.close()
        lock.close()
