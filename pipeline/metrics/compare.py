"""`ganpipe compare`: several runs' scores against kimg on one figure, and each run's best snapshot.

    ganpipe compare runs/dcgan runs/rpgan --metric fid --out compare.png
    ganpipe compare runs/a runs/b --metric fid,precision,recall --extractor inception --out cmp.png

Reads every RUN/metrics.jsonl (written by `ganpipe eval` / `ganpipe watch`). Scores are only
comparable under one protocol (extractor and its weights, resize, N generated, seed, truncation,
how the generated classes were chosen, reference split/N/manifest, k and sample sizes): per metric,
the runs must share one, else the command stops and names the fields that differ. Where a run was
scored under several, the first run's main protocol (`ganpipe eval --all`'s) is used when every run
has it, else its newest one that every run has; an unconditional G's scores compare with a
conditional one's whatever classes it was given. `--metric` takes record
metrics (fid, kid, precision, recall, density, coverage, is) or full names (fid_inception);
`--extractor` picks one extractor's scores when runs hold several. Prints one table per metric (best snapshot of each run: lowest FID/KID,
highest precision/recall/density/coverage/IS) and writes the figure: one panel per metric, one
line per run, each run's best starred.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import UserError
from pipeline.metrics.records import (METRIC_PROTOCOL, HIGHER_IS_BETTER, best_of, labels_key, main_protocol,
                                      protocol_key, read_records)
from pipeline.rundir import RunDir

# Names of protocol_key's fields, for saying what differs.
KEY_FIELDS = ("metric", "extractor", "extractor_sha256", "resize", "num_gen", "seed", "seeding", "reference split",
              "reference num", "reference manifest_sha256", "psi", "cutoff", *METRIC_PROTOCOL, "weights",
              "posthoc_std")


def _differences(a: dict, b: dict) -> str:
    # Only a key of classes drawn from the data ends in its labels part (records.labels_key).
    ka, kb = ((*protocol_key(r), labels_key(r)) if labels_key(r) is None else protocol_key(r) for r in (a, b))
    names = (*KEY_FIELDS, "labels") if len(KEY_FIELDS) + 1 == len(ka) else [f"field {i}" for i in range(len(ka))]
    return ", ".join(f"{n} {x} vs {y}" for n, x, y in zip(names, ka, kb) if x != y)


def _select(records: list[dict], metric: str, extractor: str | None) -> list[dict]:
    out = [r for r in records if metric in (r["metric"], r["name"])]
    return [r for r in out if r["extractor"] == extractor] if extractor else out


def _split_key(rec: dict) -> tuple[tuple, str | None]:
    """(protocol key without the labels part, the labels part): "*" for an unconditional G's score,
    which matches any choice of classes (it made none), else `labels_key` (None: i % num_classes)."""
    key = protocol_key(rec)
    base = key[:len(KEY_FIELDS)]
    return base, "*" if rec.get("labels") == "none" else labels_key(rec)


def _shared_labels(per_run: list[set]) -> set | None:
    """The labels parts every conditional run holds (unconditional runs hold "*"); None if none is shared."""
    conditional = [labels for labels in per_run if "*" not in labels]
    if not conditional:
        return {"*"}
    shared = set.intersection(*conditional)
    return shared or None


def comparable_series(runs: list[Path], metric: str, extractor: str | None = None) -> tuple[str, dict[Path, list[dict]]]:
    """(metric name, per run the records of one shared protocol, one per snapshot, by kimg).

    The protocol is the first run's main one (`ganpipe eval --all`) where every run has it, else
    the newest of the first run's that every run has. An unconditional run's scores compare with
    a conditional run's under any choice of classes; two conditional runs must have chosen alike.
    """
    chosen: dict[Path, list[dict]] = {}
    for run in runs:
        recs = _select(read_records(run), metric, extractor)
        if not recs:
            which = f" with --extractor {extractor}" if extractor else ""
            raise UserError(f"{run} has no '{metric}' scores{which} in {RunDir(run).metrics} "
                            f"(score it with `ganpipe eval --run-dir {run} --all --metrics ...`)")
        chosen[run] = recs
    names = sorted({r["name"] for recs in chosen.values() for r in recs})
    if len(names) > 1:
        raise UserError(f"'{metric}' names several scores ({', '.join(names)}): pick one extractor with "
                        "--extractor NAME, or give the full name (e.g. --metric "
                        f"{names[0]})")
    first = runs[0]
    main_key = main_protocol(first).get(names[0])
    candidates = [r for r in chosen[first] if protocol_key(r) == main_key] + list(reversed(chosen[first]))
    for candidate in candidates:
        base = _split_key(candidate)[0]
        per_run = [{labels for b, labels in map(_split_key, recs) if b == base} for recs in chosen.values()]
        if not all(per_run):
            continue
        shared = _shared_labels(per_run)
        if shared is None:
            continue
        mine = _split_key(candidate)[1]
        want = mine if mine in shared else sorted(shared, key=str)[0]
        series = {}
        for run, recs in chosen.items():
            per_snapshot = {r["snapshot_sha256"]: r for r in recs
                            if _split_key(r)[0] == base and _split_key(r)[1] in (want, "*")}
            series[run] = sorted(per_snapshot.values(), key=lambda r: r["cur_nimg"])
        return names[0], series
    # Say what differs between each run's main (else newest) protocol and the first run's.
    shown = {run: next((r for r in reversed(recs) if protocol_key(r) == main_protocol(run).get(names[0])), recs[-1])
             for run, recs in chosen.items()}
    a, b = first, next((run for run in runs[1:] if _split_key(shown[run])[0] != _split_key(shown[first])[0]), None)
    if b is None:       # the same protocol but for the classes: name two conditional runs that differ
        conditional = [run for run in runs if _split_key(shown[run])[1] != "*"] or runs
        a = conditional[0]
        b = next((run for run in conditional[1:] if _split_key(shown[run])[1] != _split_key(shown[a])[1]),
                 conditional[-1])
    raise UserError(f"{names[0]} of {a} and {b} were scored under different protocols "
                    f"({_differences(shown[a], shown[b])}); scores are only "
                    "comparable under one: score both alike (`ganpipe eval --all` with the same --extractor, "
                    "--num-gen, --seed, --labels, ...)")


def describe(rec: dict) -> str:
    """One line of the protocol of a record."""
    ref = rec["reference"]
    extra = "".join(f", {k} {rec[k]}" for k in METRIC_PROTOCOL if rec.get(k) is not None)
    psi = f", psi {rec['psi']:g}" if rec.get("psi", 1.0) != 1.0 else ""
    psi += ", classes drawn from the data" if labels_key(rec) is not None else ""
    return (f"{rec['num_gen']} generated (seed {rec['seed']}{psi}) vs {ref['split']} ({ref['num']} images), "
            f"{rec['extractor']} {rec['resize']}{extra}")


def table(name: str, series: dict[Path, list[dict]], labels: dict[Path, str] | None = None) -> str:
    first = next(iter(series.values()))[-1]
    better = "highest" if first["metric"] in HIGHER_IS_BETTER else "lowest"
    rows = [("run", "best snapshot", "kimg", name, "snapshots")]
    for run, recs in series.items():
        b = best_of(recs)
        rows.append(((labels or {}).get(run, str(run)), b["snapshot"], f"{b['kimg']:g}", f"{b['value']:.6g}", str(len(recs))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{name} ({better} is best): {describe(first)}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def plot(panels: list[tuple[str, dict[Path, list[dict]]]], out: Path, labels: dict[Path, str] | None = None) -> Path:
    from pipeline.extras import require

    require("matplotlib", "plots", "compare's figure")
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.8 * len(panels) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, series) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        values = []
        # Up to 10 runs: matplotlib's default cycle; more: tab20, so no two runs share a colour up to 20.
        colors = [f"C{j}" for j in range(10)] if len(series) <= 10 else [matplotlib.colormaps["tab20"](j) for j in range(20)]
        for j, (run, recs) in enumerate(series.items()):
            color = colors[j % len(colors)]
            x, y = [r["kimg"] for r in recs], [r["value"] for r in recs]
            values += y
            ax.plot(x, y, marker="o", ms=3, lw=1.2, color=color, label=(labels or {}).get(run, str(run)))
            b = best_of(recs)
            ax.plot([b["kimg"]], [b["value"]], marker="*", ms=12, color=color, ls="none")
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_title(f"{name}: {describe(next(iter(series.values()))[-1])} (best starred)", fontsize=8)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax.set_xlabel("kimg (thousands of real images shown to D)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def run_labels(runs: list[Path], given: list[str] | None) -> dict[Path, str]:
    """What each run is called in the table and the legend: `--label`s in run order, else its path."""
    if given and len(given) != len(runs):
        raise UserError(f"--label given {len(given)} times for {len(runs)} runs: one label per run, in order")
    return dict(zip(runs, given or [str(run) for run in runs]))


def compare_command(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not run.is_dir():
            raise UserError(f"run directory {run} does not exist")
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    if not metrics:
        raise UserError("--metric is empty; name one, e.g. --metric fid")
    labels = run_labels(runs, args.label)
    panels = [comparable_series(runs, m, args.extractor) for m in metrics]
    for name, series in panels:
        print(table(name, series, labels) + "\n")
    if args.out is not None:
        print(f"wrote {plot(panels, args.out, labels)}")
    return 0
