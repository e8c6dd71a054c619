"""Alerts for a run going wrong, decided from its scores: `ganpipe watch` checks them after each snapshot.

    rules = AlertRules(metrics=("fid", "kid"), worse_by=0.25, patience=3, min_recall=0.2)
    for alert in new_alerts(RUN, check(read_records(RUN), rules)):
        ...                                   # recorded, logged, sent to TensorBoard; RUN/STOP on request

Two rules, each over one series (one metric name under the run's main protocol, or its newest
protocol where the main one lacks the name: `records.current_series`):

- divergence: the newest `patience` snapshots are all worse than the series' best by more than
  `worse_by` x |best| (lower is better, except precision, recall, density, coverage and IS);
- collapse: recall or coverage, when scored and given a threshold, below it for the newest
  `patience` snapshots (a generator that covers few modes of the data scores low on both).

An alert is a line of RUN/metrics.jsonl with `kind: "alert"` (score readers skip lines with a
kind), one per (rule, series, snapshot): while a run stays bad every newly scored snapshot adds
one, and a restarted watcher does not repeat those already written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.metrics.records import HIGHER_IS_BETTER, append_records, best_of, current_series, read_lines

KIND = "alert"


@dataclass(frozen=True)
class AlertRules:
    metrics: tuple[str, ...] = ("fid", "kid")   # metrics checked for divergence
    worse_by: float = 0.25                      # margin, as a fraction of |best|
    patience: int = 3                           # snapshots in a row
    min_recall: float | None = None             # collapse threshold of recall (None = off)
    min_coverage: float | None = None           # collapse threshold of coverage (None = off)

    def __post_init__(self):
        if self.patience < 1:
            raise ValueError(f"--alert-patience {self.patience}: must be at least 1")
        if self.worse_by < 0:
            raise ValueError(f"--alert-worse-by {self.worse_by}: must be >= 0")


def _worse(rec: dict, best: dict, margin: float) -> bool:
    if rec["metric"] in HIGHER_IS_BETTER:
        return rec["value"] < best["value"] - margin * abs(best["value"])
    return rec["value"] > best["value"] + margin * abs(best["value"])


def check(records: list[dict], rules: AlertRules, main: dict[str, tuple] | None = None) -> list[dict]:
    """The alerts that hold at the newest snapshot of each series of `records` (score records;
    `main`: the run's main protocol, `records.main_protocol`)."""
    out = []
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for name, series in current_series(records, main).items():
        if len(series) < rules.patience:
            continue
        metric, newest = series[0]["metric"], series[-rules.patience:]
        last = newest[-1]
        base = {"kind": KIND, "name": name, "metric": metric, "snapshot": last["snapshot"],
                "snapshot_sha256": last["snapshot_sha256"], "cur_nimg": last["cur_nimg"], "kimg": last["kimg"],
                "value": last["value"], "patience": rules.patience, "time": now}
        if metric in rules.metrics:
            best = best_of(series)
            if all(_worse(r, best, rules.worse_by) for r in newest):
                out.append({**base, "alert": "divergence", "best": best["value"], "best_snapshot": best["snapshot"],
                            "best_kimg": best["kimg"], "worse_by": rules.worse_by,
                            "message": f"{name} diverging: {last['value']:.4g} at kimg {last['kimg']:g}, worse than "
                                       f"its best {best['value']:.4g} (kimg {best['kimg']:g}) by more than "
                                       f"{rules.worse_by:.0%} for {rules.patience} snapshot(s) in a row"})
        threshold = {"recall": rules.min_recall, "coverage": rules.min_coverage}.get(metric)
        if threshold is not None and all(r["value"] < threshold for r in newest):
            out.append({**base, "alert": "collapse", "threshold": threshold,
                        "message": f"{name} {last['value']:.3g} at kimg {last['kimg']:g}: below {threshold:g} for "
                                   f"{rules.patience} snapshot(s) in a row (mode collapse?)"})
    return out


def recorded_alerts(run_dir: str | Path) -> list[dict]:
    """The alert lines of RUN/metrics.jsonl."""
    return [rec for rec in read_lines(run_dir) if rec.get("kind") == KIND]


def new_alerts(run_dir: str | Path, alerts: list[dict]) -> list[dict]:
    """Those of `alerts` not yet in RUN/metrics.jsonl (same rule, series and snapshot)."""
    seen = {(a.get("alert"), a.get("name"), a.get("snapshot_sha256")) for a in recorded_alerts(run_dir)}
    return [a for a in alerts if (a["alert"], a["name"], a["snapshot_sha256"]) not in seen]


def record_alerts(run_dir: str | Path, alerts: list[dict], writer=None) -> None:
    """Append alerts to RUN/metrics.jsonl and, given a TensorBoard writer, to its Alerts text and
    an `Alerts/{name}` scalar (1 at the alerting snapshot's cur_nimg)."""
    if not alerts:
        return
    append_records(run_dir, alerts)
    if writer is not None:
        for a in alerts:
            writer.add_text(f"Alerts/{a['alert']}", a["message"], global_step=a["cur_nimg"])
            writer.add_scalar(f"Alerts/{a['name']}", 1.0, global_step=a["cur_nimg"])
        writer.flush()
