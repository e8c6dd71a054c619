"""The scores of a run: RUN/metrics.jsonl (history and state), RUN/best.json and RUN/metrics.png.

    append_records(RUN, records)        # all lines of one snapshot in one O_APPEND write
    everything = read_records(RUN)      # complete score lines only (a torn last line is skipped)
    main = main_protocol(RUN)           # the run's main protocol: {record name: protocol key}
    write_best(RUN, everything, main=main)   # per metric (fid, kid by default), the best of its series
    plot_metrics(RUN, everything, main=main) # one panel per series against kimg, best starred
    sync_best(RUN)                      # rewrite best.json when it disagrees with metrics.jsonl

metrics.jsonl is also the evaluator's memory: a snapshot counts as scored under a protocol when a
line with its sha256 and that protocol's key exists, so a restarted `ganpipe watch` continues where
it stopped. Only scores with equal `protocol_key` are compared (best.json, the plot).

The run's main protocol is the one of its series over all snapshots: a line of kind
`main_protocol` holds, per record name ("fid_mnist"), the protocol key the scores of that series
carry. `ganpipe watch` records its own at start; `ganpipe eval --all` records its own when the
run has none yet (or with `--main`); the newest such line counts. best.json, metrics.png, the
watcher's alerts and snapshot pruning follow it: a name of the main protocol is ranked and drawn
under the main key alone, so a one-off `eval --num-gen 1000 --split test` is recorded and printed
but takes over nothing, and only a score under the main protocol lets `train.keep_snapshots`
prune a snapshot. A name the main protocol lacks (a one-off metric, the raw G's scores before any
`--all` of them) is ranked under its newest protocol, as every name is in a run with no main
protocol. Lines of kind `bad_snapshot` mark snapshots that cannot be scored (evaluator.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
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


KIND_MAIN = "main_protocol"          # the line that records the run's main protocol
KIND_BAD = "bad_snapshot"            # the line that marks a snapshot which cannot be scored


def read_lines(run_dir: str | Path) -> list[dict]:
    """Every complete JSON object line of RUN/metrics.jsonl (a torn last line from a crash is ignored)."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def scores(lines: list[dict]) -> list[dict]:
    """The score records among lines of metrics.jsonl (a line with a `kind` is an alert, a mark, the main protocol)."""
    return [r for r in lines if REQUIRED <= r.keys() and "kind" not in r]


def read_records(run_dir: str | Path) -> list[dict]:
    """The score lines of RUN/metrics.jsonl."""
    return scores(read_lines(run_dir))


def main_protocol(run_dir: str | Path, lines: list[dict] | None = None) -> dict[str, tuple]:
    """{record name: protocol key} of the run's main protocol (the newest `main_protocol` line); {} when none."""
    for rec in reversed(read_lines(run_dir) if lines is None else lines):
        if rec.get("kind") == KIND_MAIN and isinstance(rec.get("series"), dict):
            return {name: tuple(key) for name, key in rec["series"].items() if isinstance(key, list)}
    return {}


def main_protocol_line(run_dir: str | Path) -> dict | None:
    """The newest `main_protocol` line itself (who recorded it, when, what it is), or None."""
    return next((r for r in reversed(read_lines(run_dir)) if r.get("kind") == KIND_MAIN), None)


def record_main_protocol(run_dir: str | Path, series: dict[str, tuple], about: dict, by: str) -> None:
    """Append a `main_protocol` line: `series` {record name: protocol key}, `about` the protocol in words."""
    append_records(run_dir, [{"kind": KIND_MAIN, "by": by, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              **about, "series": {name: list(key) for name, key in series.items()}}])


def bad_marks(run_dir: str | Path) -> list[dict]:
    """The `bad_snapshot` lines of RUN/metrics.jsonl."""
    return [r for r in read_lines(run_dir) if r.get("kind") == KIND_BAD]


def main_scored(records: list[dict], main: dict[str, tuple]) -> set[str]:
    """sha256 of every snapshot scored under each name of the main protocol (none without one)."""
    if not main:
        return set()
    per_name = {name: set() for name in main}
    for r in records:
        if r["name"] in main and protocol_key(r) == main[r["name"]]:
            per_name[r["name"]].add(r["snapshot_sha256"])
    return set.intersection(*per_name.values())


def protected_snapshots(run_dir: str | Path) -> tuple[set[str], set[str]]:
    """(sha256 of every snapshot scored under the run's main protocol, names of the best ones):
    what snapshot retention must know to keep every snapshot the main series has not scored and
    every best one. The best are derived from metrics.jsonl (a best.json left stale by a killed
    watcher could name an old one) and joined with those best.json names."""
    lines = read_lines(run_dir)
    path = RunDir(run_dir).best
    try:
        records, main = scores(lines), main_protocol(run_dir, lines)
        entries = json.loads(path.read_text()) if path.is_file() else {}
        named = {e["snapshot"] for e in entries.values() if isinstance(e, dict) and "snapshot" in e}
        derived = best_entries(records, main, best_metrics_of(entries))
        return main_scored(records, main), named | {e["snapshot"] for e in derived.values()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return set(), set()         # unreadable: prune nothing


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
    """What must match for two scores to be comparable (everything but the snapshot). Scores of
    classes drawn from the data's distribution end in `labels_key` (the keys of i % num_classes
    scores, which records from before the choice all are, keep their length)."""
    ref = rec["reference"]
    # Records from before truncation existed were made without it: psi 1, no cutoff.
    key = (rec["metric"], rec["extractor"], rec["extractor_sha256"], rec["resize"], rec["num_gen"],
           rec["seed"], rec.get("seeding", OLD_SEEDING), ref["split"], ref["num"], ref["manifest_sha256"],
           float(rec.get("psi", 1.0)), rec.get("cutoff"), *(rec.get(k) for k in METRIC_PROTOCOL),
           rec.get("weights", "ema"), rec.get("posthoc_std"))   # which G: ema (records before it), raw, posthoc
    labels = labels_key(rec)
    return key if labels is None else (*key, labels)


def labels_key(rec: dict) -> str | None:
    """How a score's generated classes were chosen, as a key: None for i % num_classes (and for an
    unconditional G), else "data" and a digest of the class weights drawn from (`label_weights`)."""
    weights = rec.get("label_weights")
    if weights is None:
        return None
    return "data " + hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:16]


def best_of(series: list[dict]) -> dict:
    """The best record of one metric's series: the lowest value, or the highest where higher is
    better (precision, recall, density, coverage, IS); ties go to the earliest snapshot."""
    sign = -1 if series[0]["metric"] in HIGHER_IS_BETTER else 1
    return min(series, key=lambda r: (sign * r["value"], r["cur_nimg"]))


def current_series(records: list[dict], main: dict[str, tuple] | None = None) -> dict[str, list[dict]]:
    """Per record name, its series, one record per snapshot, by kimg: the records under the name's
    key in `main` (the run's main protocol) when it has one, else under the name's newest protocol."""
    out: dict[str, list[dict]] = {}
    for name in dict.fromkeys(r["name"] for r in records):
        mine = [r for r in records if r["name"] == name]
        key = (main or {}).get(name) or protocol_key(mine[-1])
        per_snapshot = {r["snapshot_sha256"]: r for r in mine if protocol_key(r) == key}
        if per_snapshot:
            out[name] = sorted(per_snapshot.values(), key=lambda r: r["cur_nimg"])
    return out


def best_metrics_of(entries: dict) -> tuple[str, ...]:
    """The metrics a best.json ranks (those of its entries), or BEST_METRICS for an empty one."""
    found = tuple(dict.fromkeys(e["metric"] for e in entries.values() if isinstance(e, dict) and "metric" in e))
    return found or BEST_METRICS


def best_entries(records: list[dict], main: dict[str, tuple], metrics: tuple[str, ...] | list[str] = BEST_METRICS
                 ) -> dict:
    """What best.json holds: per record name whose metric is in `metrics` (default FID and KID), the
    best score of its series (`current_series`: lowest, or highest for precision/recall/density/coverage/IS)."""
    best = {}
    for name, series in current_series(records, main).items():
        if series[0]["metric"] not in metrics:
            continue
        r = best_of(series)
        best[name] = {k: r[k] for k in ("value", "metric", "snapshot", "snapshot_sha256", "cur_nimg", "kimg",
                                        "extractor", "resize", "num_gen", "seed", "reference", "time")}
        best[name]["seeding"] = r.get("seeding", OLD_SEEDING)
        best[name]["psi"], best[name]["cutoff"] = r.get("psi", 1.0), r.get("cutoff")
        best[name]["weights"] = r.get("weights", "ema")
        best[name]["snapshots_scored"] = len(series)
    return best


def write_best(run_dir: str | Path, records: list[dict], metrics: tuple[str, ...] | list[str] = BEST_METRICS,
               main: dict[str, tuple] | None = None) -> dict:
    """RUN/best.json: `best_entries` of `records` under the main protocol `main`."""
    best = best_entries(records, main or {}, metrics)
    write_json_atomic(RunDir(run_dir).best, best)
    return best


def sync_best(run_dir: str | Path, metrics: tuple[str, ...] | list[str] | None = None) -> str:
    """Rewrite RUN/best.json (and RUN/metrics.png) from metrics.jsonl when they disagree, ranking
    `metrics` (default: those best.json ranks now). What was wrong, in words ("" when they agreed)."""
    lines = read_lines(run_dir)
    records = scores(lines)
    path = RunDir(run_dir).best
    try:
        current = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        current = "unreadable"
    if current is None and not records:
        return ""
    main = main_protocol(run_dir, lines)
    derived = best_entries(records, main, metrics or best_metrics_of(current if isinstance(current, dict) else {}))
    if current == derived:
        return ""
    write_json_atomic(path, derived)
    plot_metrics(run_dir, records, main)
    if not isinstance(current, dict):
        return f"{path} was {current or 'missing'}"
    differ = sorted(n for n in set(current) | set(derived) if current.get(n) != derived.get(n))
    said = {n: (current.get(n) or {}).get("snapshot", "nothing") if isinstance(current.get(n), dict) else "?"
            for n in differ}
    return "; ".join(f"{n}: {said[n]} -> {derived[n]['snapshot'] if n in derived else 'nothing'}" for n in differ)


def plot_metrics(run_dir: str | Path, records: list[dict], main: dict[str, tuple] | None = None) -> Path | None:
    """Redraw RUN/metrics.png: one panel per series (`current_series` under the main protocol
    `main`) against kimg, the best point starred."""
    from pipeline.extras import optional

    if not optional("matplotlib", "plots", "RUN/metrics.png"):     # a side output: the scores are recorded
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = current_series(records, main)
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
