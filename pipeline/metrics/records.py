"""The scores of a run: RUN/metrics.jsonl (history and state), RUN/best.json and RUN/metrics.png.

    append_records(RUN, records)        # all lines of one snapshot in one O_APPEND write
    everything = read_records(RUN)      # complete lines only (a torn last line is skipped)
    write_best(RUN, everything)         # per metric (fid, kid by default), the best score under its newest protocol
    plot_metrics(RUN, everything)       # one panel per metric against kimg, best starred

metrics.jsonl is also the evaluator's memory: a snapshot counts as scored under a protocol when a
line with its sha256 and that protocol's key exists, so a restarted `ganpipe watch` continues where
it stopped. Only scores with equal `protocol_key` are compared (best.json, the plot).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.io import atomic_path, write_json_atomic
from pipeline.rundir import RunDir

REQUIRED = {"name", "metric", "value", "snapshot", "snapshot_sha256", "cur_nimg", "kimg", "extractor",
            "extractor_sha256", "resize", "num_gen", "seed", "reference"}   # keys of a metrics.jsonl record
# Records written before `pipeline.generate` existed carry no "seeding": their images were drawn
# another way, so they are another protocol (a re-evaluation scores those snapshots anew).
OLD_SEEDING = "chunked-v0"
# Per-metric protocol fields (scores.py): k of the k-NN metrics, the feature samples' sizes, KID's
# subsets, the Inception Score's splits. Absent ones compare as None.
METRIC_PROTOCOL = ("k", "sample_gen", "sample_ref", "kid_subsets", "kid_subset_size", "splits")
HIGHER_IS_BETTER = {"precision", "recall", "density", "coverage", "is"}   # every other metric: lower is better
BEST_METRICS = ("fid", "kid")           # what best.json ranks unless --best-metric says otherwise


def read_records(run_dir: str | Path) -> list[dict]:
    """Every complete line of RUN/metrics.jsonl (a torn last line from a crash is ignored)."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and REQUIRED <= rec.keys() and "kind" not in rec:   # kind: alerts (alerts.py)
            out.append(rec)
    return out


def protected_snapshots(run_dir: str | Path) -> tuple[set[str], set[str]]:
    """(sha256 of every scored snapshot, names of the best ones in best.json): what snapshot
    retention must know to keep every unscored snapshot and every best one."""
    scored = {r["snapshot_sha256"] for r in read_records(run_dir)}
    best: set[str] = set()
    path = RunDir(run_dir).best
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        best = {e["snapshot"] for e in entries.values() if isinstance(e, dict) and "snapshot" in e}
    except (OSError, ValueError, AttributeError):
        best = set()                # unreadable: prune nothing that could be best, see the caller
        scored = set()
    return scored, best


def append_records(run_dir: str | Path, records: list[dict]) -> None:
    """All lines of one snapshot in one write with O_APPEND: a crash leaves all of them or none."""
    path = RunDir(run_dir).metrics
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text          # end a torn line from a crash, so ours stays parseable
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def protocol_key(rec: dict) -> tuple:
    """What must match for two scores to be comparable (everything but the snapshot)."""
    ref = rec["reference"]
    # Records from before truncation existed were made without it: psi 1, no cutoff.
    return (rec["metric"], rec["extractor"], rec["extractor_sha256"], rec["resize"], rec["num_gen"],
            rec["seed"], rec.get("seeding", OLD_SEEDING), ref["split"], ref["num"], ref["manifest_sha256"],
            float(rec.get("psi", 1.0)), rec.get("cutoff"), *(rec.get(k) for k in METRIC_PROTOCOL),
            rec.get("weights", "ema"), rec.get("posthoc_std"))   # which G: ema (records before it), raw, posthoc


def best_of(series: list[dict]) -> dict:
    """The best record of one metric's series: the lowest value, or the highest where higher is
    better (precision, recall, density, coverage, IS); ties go to the earliest snapshot."""
    sign = -1 if series[0]["metric"] in HIGHER_IS_BETTER else 1
    return min(series, key=lambda r: (sign * r["value"], r["cur_nimg"]))


def current_series(records: list[dict]) -> dict[str, list[dict]]:
    """Per metric name, the records under that name's newest protocol, one per snapshot, by kimg."""
    out: dict[str, list[dict]] = {}
    for name in dict.fromkeys(r["name"] for r in records):
        mine = [r for r in records if r["name"] == name]
        key = protocol_key(mine[-1])
        per_snapshot = {r["snapshot_sha256"]: r for r in mine if protocol_key(r) == key}
        out[name] = sorted(per_snapshot.values(), key=lambda r: r["cur_nimg"])
    return out


def write_best(run_dir: str | Path, records: list[dict], metrics: tuple[str, ...] | list[str] = BEST_METRICS
               ) -> dict:
    """RUN/best.json: per metric name whose metric is in `metrics` (default FID and KID), the best
    score under its newest protocol (lowest, or highest for precision/recall/density/coverage/IS)."""
    best = {}
    for name, series in current_series(records).items():
        if series[0]["metric"] not in metrics:
            continue
        r = best_of(series)
        best[name] = {k: r[k] for k in ("value", "metric", "snapshot", "snapshot_sha256", "cur_nimg", "kimg",
                                        "extractor", "resize", "num_gen", "seed", "reference", "time")}
        best[name]["seeding"] = r.get("seeding", OLD_SEEDING)
        best[name]["psi"], best[name]["cutoff"] = r.get("psi", 1.0), r.get("cutoff")
        best[name]["weights"] = r.get("weights", "ema")
        best[name]["snapshots_scored"] = len(series)
    write_json_atomic(RunDir(run_dir).best, best)
    return best


def plot_metrics(run_dir: str | Path, records: list[dict]) -> Path | None:
    """Redraw RUN/metrics.png: one panel per metric against kimg, the best point starred."""
    from pipeline.extras import optional

    if not optional("matplotlib", "plots", "RUN/metrics.png"):     # a side output: the scores are recorded
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = current_series(records)
    if not series:
        return None
    fig = Figure(figsize=(7, 2.8 * len(series)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, recs) in enumerate(series.items()):
        ax = fig.add_subplot(len(series), 1, i + 1)
        x = [r["kimg"] for r in recs]
        y = [r["value"] for r in recs]
        ax.plot(x, y, marker="o", ms=3, lw=1.2)
        b = best_of(recs)
        ax.plot([b["kimg"]], [b["value"]], marker="*", ms=12, color="tab:red", ls="none",
                label=f"best {b['value']:.4g} at {b['kimg']:g} kimg")
        if min(y) > 0 and max(y) / min(y) > 20:
            ax.set_yscale("log")
        ref = recs[-1]["reference"]
        ax.set_title(f"{name}: {recs[-1]['num_gen']} generated vs {ref['split']} "
                     f"({ref['num']} images), {recs[-1]['resize']}, seed {recs[-1]['seed']}", fontsize=9)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax.set_xlabel("kimg (thousands of real images shown to D)")
    path = RunDir(run_dir).plot
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
