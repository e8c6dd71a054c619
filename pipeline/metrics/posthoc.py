"""Scores against EMA length: `ganpipe eval --posthoc-std 0.05,0.1,0.15` rebuilds the post-hoc EMA
generator of each relative length (`training/posthoc_ema.py`, EDM2) at one snapshot, scores it
and plots every metric against sigma_rel.

    ganpipe eval --run-dir RUN --posthoc-std 0.05,0.08,0.1,0.15 --extractor mnist [--at-kimg 400]

Everything goes to RUN/posthoc/, apart from the kimg history of RUN/metrics.jsonl:

    RUN/posthoc/posthoc-000400000-std0.08.{json,safetensors}   the rebuilt G (an ordinary snapshot)
    RUN/posthoc/metrics.jsonl    one line per rebuild and metric, with the protocol plus
                                 weights "posthoc" and posthoc_std (records.protocol_key)
    RUN/posthoc/metrics.png      each metric against sigma_rel, one line per snapshot, best starred

A rebuilt snapshot given to `ganpipe eval --snapshot` is recorded here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.errors import UserError
from pipeline.io import atomic_path
from pipeline.metrics.records import append_records, best_of, protocol_key, read_records
from pipeline.rundir import RunDir



def parse_stds(text: str) -> list[float]:
    try:
        stds = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--posthoc-std {text!r}: give numbers separated by commas, e.g. 0.05,0.1,0.15") from None
    if not stds:
        raise UserError("--posthoc-std is empty; give relative EMA lengths, e.g. 0.05,0.1,0.15")
    return stds


def rebuild(run_dir: Path, stds: list[float], at_kimg: float | None, log: Callable[[str], None]) -> list[str]:
    """Write the post-hoc EMA snapshot of each std into RUN/posthoc/; their JSON paths."""
    from pipeline.training.posthoc_ema import reconstruct, write_reconstruction

    paths = []
    for std in stds:
        G, base, info = reconstruct(run_dir, std, at_kimg)
        out = RunDir(run_dir).posthoc / f"posthoc-{base['cur_nimg']:09d}-std{std:g}.json"
        paths.append(str(write_reconstruction(G, base, info, out)))
        log(f"rebuilt sigma_rel {std:g} at kimg {base['kimg']:g} from {len(info['sources'])} profiles "
            f"(relative fit error {info['relative_error']:.1e})")
    return paths


def record(run_dir: Path, records: list[dict], log: Callable[[str], None]) -> None:
    """Append post-hoc scores to RUN/posthoc/metrics.jsonl and redraw RUN/posthoc/metrics.png."""
    if not records:
        return
    directory = RunDir(run_dir).posthoc
    directory.mkdir(parents=True, exist_ok=True)
    append_records(directory, records)
    plot(directory, read_records(directory))
    for r in records:
        log(f"{r['snapshot']} (sigma_rel {r['posthoc_std']:g}, kimg {r['kimg']:g}): {r['name']} {r['value']:.6g}")


def series(records: list[dict]) -> dict[str, dict[float, list[dict]]]:
    """Per metric name, per kimg: the newest score of each std under that name's newest protocol
    (std aside), by std."""
    out: dict[str, dict[float, list[dict]]] = {}
    for name in dict.fromkeys(r["name"] for r in records):
        mine = [r for r in records if r["name"] == name]
        key = protocol_key({**mine[-1], "posthoc_std": None})
        by_kimg: dict[float, dict[float, dict]] = {}
        for r in mine:
            if protocol_key({**r, "posthoc_std": None}) == key:
                by_kimg.setdefault(r["kimg"], {})[r["posthoc_std"]] = r
        out[name] = {k: sorted(v.values(), key=lambda r: r["posthoc_std"]) for k, v in sorted(by_kimg.items())}
    return out


def plot(directory: Path, records: list[dict]) -> Path | None:
    """One panel per metric name: the metric against sigma_rel, a line per snapshot kimg."""
    from pipeline.extras import optional

    if not optional("matplotlib", "plots", "RUN/posthoc/metrics.png"):     # a side output, as RUN/metrics.png
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = series(records)
    if not panels:
        return None
    fig = Figure(figsize=(7, 2.8 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, by_kimg) in enumerate(panels.items()):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for kimg, recs in by_kimg.items():
            ax.plot([r["posthoc_std"] for r in recs], [r["value"] for r in recs], marker="o", ms=3, lw=1.2,
                    label=f"kimg {kimg:g}")
            b = best_of(recs)
            ax.plot([b["posthoc_std"]], [b["value"]], marker="*", ms=12, color="tab:red", ls="none")
        last = next(reversed(by_kimg.values()))[-1]
        ax.set_title(f"{name} against post-hoc EMA length: {last['num_gen']} generated vs "
                     f"{last['reference']['split']}, seed {last['seed']} (best starred)", fontsize=9)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax.set_xlabel("sigma_rel (EMA length relative to training time, EDM2)")
    path = directory / RunDir.PLOT
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
