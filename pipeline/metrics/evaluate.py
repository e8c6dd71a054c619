"""`ganpipe eval`: score snapshots of a run with FID/KID and record the full protocol.

    ganpipe eval --run-dir RUN --extractor mnist                 # the newest snapshot
    ganpipe eval --run-dir RUN --all --extractor mnist           # every snapshot not yet scored
    ganpipe eval --run-dir RUN --snapshot snapshot-000004000.json --metrics fid --num-gen 5000
    torchrun --nproc_per_node 2 -m pipeline eval --run-dir RUN --all   # generation split over 2 processes

For each snapshot: load the EMA generator (safetensors + JSON, no code executed, sha256 checked),
generate N images in batches from seeded latents (image i's latent depends only on the seed and
i, so the batch size and the number of processes do not change which images are scored; labels
i % num_classes for conditional models), quantise them to uint8 as a saved PNG would be, extract
features with clean-fid's clean resize, and score them against the reference statistics of the
run's data (`refstats.py`, computed on first use). With several processes each generates every
world_size-th batch and rank 0 gathers the features, scores and writes.

Outputs, all in RUN: `metrics.jsonl` (one line per snapshot and metric: the value with extractor
and its weights hash, resize, N generated, reference data/split/N/manifest hash, seed, snapshot
sha256, kimg, seconds), `best.json` (the lowest value per metric under the newest protocol),
TensorBoard scalars `Metrics/{metric}_{extractor}` in RUN/tb at step cur_nimg, and `metrics.png`
(each metric against kimg). Same seed, snapshot and extractor give the same score.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.config import ConfigError
from pipeline.data.manifest import MANIFEST, write_json_atomic
from pipeline.metrics.features import EXTRACTORS, INCEPTION_ENV, Extractor, get_extractor
from pipeline.metrics.fid import METRICS, parse_metrics
from pipeline.metrics.refstats import RefStats, default_device, reference_stats
from pipeline.training.snapshot import SnapshotError, list_snapshots, load_snapshot, read_snapshot_meta

METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.json"
PLOT_FILE = "metrics.png"
LATENT_CHUNK = 1000     # latents are drawn in seeded chunks of this many images
REQUIRED = {"name", "metric", "value", "snapshot", "snapshot_sha256", "cur_nimg", "kimg", "extractor",
            "extractor_sha256", "resize", "num_gen", "seed", "reference"}   # keys of a metrics.jsonl record


# ---------------------------------------------------------------------------------------------
# Processes: works without a process group (one process), or with one started by torchrun/accelerate.

def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group when launched with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(default_device(device))
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), dev
    return 0, 1, dev


def _broadcast(obj):
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn: Callable[[], object], rank: int):
    """`fn()` on rank 0 (None elsewhere). A user error on rank 0 is raised on every rank, instead
    of leaving the others blocked in the next collective."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (UserError, ConfigError, FileNotFoundError) as exc:
            error = str(exc)
    error = _broadcast(error)
    if error is not None:
        raise UserError(error)
    return result


def _gather(obj) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere."""
    if not torch.distributed.is_initialized():
        return [obj]
    rank = torch.distributed.get_rank()
    out = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


# ---------------------------------------------------------------------------------------------
# Generation.

@functools.lru_cache(maxsize=4)
def _latent_chunk(seed: int, chunk: int, z_dim: int) -> torch.Tensor:
    chunk_seed = int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint64)[0])
    return torch.randn(LATENT_CHUNK, z_dim, generator=torch.Generator().manual_seed(chunk_seed))


def latents(seed: int, start: int, count: int, z_dim: int) -> torch.Tensor:
    """Latents of images start..start+count-1: row i % CHUNK of chunk i // CHUNK, each chunk N(0, 1)
    from a torch.Generator seeded by (seed, chunk). Independent of batch size and process count."""
    rows = []
    for chunk in range(start // LATENT_CHUNK, (start + count - 1) // LATENT_CHUNK + 1):
        lo = max(start, chunk * LATENT_CHUNK) - chunk * LATENT_CHUNK
        hi = min(start + count, (chunk + 1) * LATENT_CHUNK) - chunk * LATENT_CHUNK
        rows.append(_latent_chunk(seed, chunk, z_dim)[lo:hi])
    return torch.cat(rows)      # a new tensor: the cached chunks are never handed out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """G's [-1, 1] output -> uint8 NCHW, rounding as the data's u / 127.5 - 1 inverts."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu().numpy()


def generate(G: torch.nn.Module, *, start: int, count: int, seed: int, device: torch.device) -> np.ndarray:
    """uint8 images start..start+count-1 of the seeded sequence (labels i % num_classes if conditional)."""
    z = latents(seed, start, count, G.z_dim).to(device)
    labels = None
    if G.num_classes:
        labels = (torch.arange(start, start + count) % G.num_classes).to(device)
    with torch.inference_mode():
        return to_uint8(G(z, labels))


def generated_features(G: torch.nn.Module, extractor: Extractor, *, num: int, batch_size: int, seed: int,
                       rank: int = 0, world: int = 1) -> np.ndarray | None:
    """Features of images 0..num-1; rank r does batches r, r+world, ...; the whole array on rank 0."""
    if getattr(G, "resolution", 0) == 0:
        raise UserError("this snapshot's generator makes flat vectors (resolution 0), not images: "
                        "FID/KID need images")
    mine = []
    for b in range(rank, math.ceil(num / batch_size), world):
        start = b * batch_size
        images = generate(G, start=start, count=min(batch_size, num - start), seed=seed, device=extractor.device)
        mine.append((b, extractor(images)))
    parts = _gather(mine)
    if parts is None:
        return None
    batches = sorted((b, f) for part in parts for b, f in part)
    return np.concatenate([f for _, f in batches])


# ---------------------------------------------------------------------------------------------
# Records: metrics.jsonl is the history and the state (what has been scored under which protocol).

def read_records(run_dir: str | Path) -> list[dict]:
    """Every complete line of RUN/metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and REQUIRED <= rec.keys():
            out.append(rec)
    return out


def append_records(run_dir: str | Path, records: list[dict]) -> None:
    """All lines of one snapshot in one write with O_APPEND: a crash leaves all of them or none."""
    path = Path(run_dir) / METRICS_FILE
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
    return (rec["metric"], rec["extractor"], rec["extractor_sha256"], rec["resize"], rec["num_gen"],
            rec["seed"], ref["split"], ref["num"], ref["manifest_sha256"])


def current_series(records: list[dict]) -> dict[str, list[dict]]:
    """Per metric name, the records under that name's newest protocol, one per snapshot, by kimg."""
    out: dict[str, list[dict]] = {}
    for name in dict.fromkeys(r["name"] for r in records):
        mine = [r for r in records if r["name"] == name]
        key = protocol_key(mine[-1])
        per_snapshot = {r["snapshot_sha256"]: r for r in mine if protocol_key(r) == key}
        out[name] = sorted(per_snapshot.values(), key=lambda r: r["cur_nimg"])
    return out


def write_best(run_dir: str | Path, records: list[dict]) -> dict:
    """RUN/best.json: per metric, the lowest score under its newest protocol (FID, KID: lower is better)."""
    best = {}
    for name, series in current_series(records).items():
        r = min(series, key=lambda r: (r["value"], r["cur_nimg"]))
        best[name] = {k: r[k] for k in ("value", "metric", "snapshot", "snapshot_sha256", "cur_nimg", "kimg",
                                        "extractor", "resize", "num_gen", "seed", "reference", "time")}
        best[name]["snapshots_scored"] = len(series)
    write_json_atomic(Path(run_dir) / BEST_FILE, best)
    return best


def plot_metrics(run_dir: str | Path, records: list[dict]) -> Path | None:
    """Redraw RUN/metrics.png: one panel per metric against kimg, the best point starred."""
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
        b = min(recs, key=lambda r: (r["value"], r["cur_nimg"]))
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
    path = Path(run_dir) / PLOT_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# The evaluator: one extractor and one reference, many snapshots (eval and watch share it).

class Evaluator:
    """Scores snapshots of one run under one protocol; all processes call `score`, rank 0 records."""

    def __init__(self, run_dir: str | Path, *, metrics: list[str], extractor: str, num_gen: int | None = None,
                 split: str = "train", seed: int = 0, batch_size: int = 250, device: str | None = None,
                 inception_weights: str | None = None, data: str | Path | None = None,
                 log: Callable[[str], None] = print):
        from pipeline.config import load_config

        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.yaml").is_file():
            raise UserError(f"{self.run_dir}: not a run directory (no config.yaml; `ganpipe train` writes it)")
        cfg = load_config(self.run_dir / "config.yaml")
        self.data_dir = Path(data or cfg.data.path).expanduser()
        if not (self.data_dir / MANIFEST).is_file():
            raise UserError(f"reference data {self.data_dir} (data.path of {self.run_dir / 'config.yaml'}) has no "
                            f"{MANIFEST}: reference statistics need a directory made by `ganpipe prepare`; "
                            "pass --data DIR")
        self.metrics = metrics
        self.split, self.seed, self.batch_size = split, seed, batch_size
        self.rank, self.world, self.device = init_distributed(device)
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.extractor = get_extractor(extractor, self.device, inception_weights)
        self.num_gen = num_gen or self.extractor.default_num_gen
        if self.num_gen < 2:
            raise UserError(f"--num-gen {self.num_gen}: FID/KID need at least 2 generated images")
        # Rank 0 alone needs the reference (it scores); the others only generate.
        self.ref: RefStats | None = _on_rank0(lambda: reference_stats(
            self.data_dir, split, self.extractor, batch_size=batch_size, log=self.log), self.rank)
        if self.ref is not None and min(self.ref.num, self.num_gen) <= self.extractor.dim:
            self.log(f"warning: {min(self.ref.num, self.num_gen)} samples for {self.extractor.dim}-d features: "
                     "the covariance is singular and FID is unreliable (use more images)")
        self._writer = None

    def protocol(self) -> dict:
        """The fields that make a score comparable; stored with every record."""
        assert self.ref is not None
        return {**self.extractor.protocol(), "num_gen": self.num_gen, "seed": self.seed,
                "reference": {"data": str(self.data_dir.resolve()), "split": self.split, "num": self.ref.num,
                              "manifest_sha256": self.ref.meta["manifest_sha256"]}}

    def _keys(self, sha: str) -> set[tuple]:
        proto = self.protocol()
        return {(sha, protocol_key({**proto, "metric": m})) for m in self.metrics}

    def pending(self) -> list[dict]:
        """Records (unchecked JSON) of complete snapshots not yet scored under this protocol, oldest first."""
        done = {(r["snapshot_sha256"], protocol_key(r)) for r in read_records(self.run_dir)}
        out = []
        for path in list_snapshots(self.run_dir / "snapshots"):
            try:
                meta = read_snapshot_meta(path, check_hash=False)
            except SnapshotError:
                continue                 # weights missing or record unreadable: not a complete snapshot
            if not self._keys(meta["sha256"]) <= done:
                out.append(meta)
        return out

    def score(self, snapshot: str | Path) -> list[dict]:
        """Score one snapshot (sha256 checked); records on rank 0, [] on other ranks."""
        t0 = time.perf_counter()
        G, meta = load_snapshot(snapshot, device=self.extractor.device)
        t1 = time.perf_counter()
        feats = generated_features(G, self.extractor, num=self.num_gen, batch_size=self.batch_size,
                                   seed=self.seed, rank=self.rank, world=self.world)
        gen_s = time.perf_counter() - t1
        if self.rank != 0:
            return []
        assert feats is not None and self.ref is not None and len(feats) == self.num_gen
        records = []
        for metric in self.metrics:
            t2 = time.perf_counter()
            value, extra = METRICS.get(metric)(feats, self.ref, self.seed)
            records.append({
                "name": f"{metric}_{self.extractor.name}", "metric": metric, "value": value,
                "snapshot": Path(meta["json_path"]).stem, "snapshot_sha256": meta["sha256"],
                "cur_nimg": meta["cur_nimg"], "kimg": meta["kimg"], **self.protocol(), **extra,
                "labels": "balanced (i % num_classes)" if G.num_classes else "none",
                "seconds": round(time.perf_counter() - t2 + gen_s + (t1 - t0), 3),
                "generate_featurize_s": round(gen_s, 3), "images_per_s": round(self.num_gen / max(gen_s, 1e-9), 1),
                "batch_size": self.batch_size, "world_size": self.world, "device": str(self.extractor.device),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        return records

    def record(self, records: list[dict]) -> None:
        """Append to metrics.jsonl, then refresh best.json, TensorBoard and metrics.png (rank 0)."""
        if self.rank != 0 or not records:
            return
        append_records(self.run_dir, records)
        everything = read_records(self.run_dir)
        write_best(self.run_dir, everything)
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"), filename_suffix=".eval")
        for r in records:
            self._writer.add_scalar(f"Metrics/{r['name']}", r["value"], global_step=r["cur_nimg"])
        self._writer.flush()
        plot_metrics(self.run_dir, everything)
        for r in records:
            ref = r["reference"]
            self.log(f"{r['snapshot']} kimg {r['kimg']:g}: {r['name']} {r['value']:.6g} "
                     f"({r['num_gen']} generated vs {ref['split']} {ref['num']}, {r['seconds']:.1f} s)")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------------------------------------
# CLI (shared with `ganpipe watch`).

def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, type=Path, help="run directory written by `ganpipe train`")
    p.add_argument("--metrics", default="fid,kid", help=f"comma-separated, from: {', '.join(METRICS.keys())}")
    p.add_argument("--extractor", default="inception", choices=EXTRACTORS.keys(),
                   help="feature network (default inception, the published standard; mnist works offline)")
    p.add_argument("--num-gen", type=int, default=None,
                   help="images generated per snapshot (default: 50000 inception, 10000 mnist)")
    p.add_argument("--split", default="train", help="reference split of the run's data (default train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents and of KID's subsets")
    p.add_argument("--batch-size", type=int, default=250, help="images per generation/feature batch")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--inception-weights", default=None,
                   help=f"path of inception-2015-12-05.pt (default ${INCEPTION_ENV}, else clean-fid's /tmp path)")
    p.add_argument("--data", type=Path, default=None, help="reference data dir (default: data.path of the run)")


def evaluator_from_args(args: argparse.Namespace, log: Callable[[str], None] = print) -> Evaluator:
    return Evaluator(args.run_dir, metrics=parse_metrics(args.metrics), extractor=args.extractor,
                     num_gen=args.num_gen, split=args.split, seed=args.seed, batch_size=args.batch_size,
                     device=args.device, inception_weights=args.inception_weights, data=args.data, log=log)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_eval_arguments(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--snapshot", default=None,
                       help="snapshot to score (.json or .safetensors; a bare name is looked up in RUN/snapshots)")
    which.add_argument("--all", action="store_true", help="every complete snapshot not yet scored under this protocol")
    p.add_argument("--force", action="store_true", help="with --all: score already scored snapshots again")


def _resolve_snapshot(run_dir: Path, name: str) -> Path:
    for path in (Path(name), run_dir / "snapshots" / name, run_dir / "snapshots" / f"{name}.json"):
        if path.is_file():
            return path
    raise UserError(f"snapshot {name} not found (looked in . and {run_dir / 'snapshots'})")


def _select(ev: Evaluator, args: argparse.Namespace) -> list[str]:
    """Snapshot JSON paths to score, in order (decided on rank 0)."""
    if args.snapshot:
        return [str(_resolve_snapshot(args.run_dir, args.snapshot))]
    if args.all and not args.force:
        pending = [m["json_path"] for m in ev.pending()]
        if not pending:
            ev.log("every snapshot is already scored under this protocol (use --force to score again)")
        return pending
    found = [str(p) for p in list_snapshots(args.run_dir / "snapshots")]
    if not found:
        raise UserError(f"no snapshots in {args.run_dir / 'snapshots'} yet (training writes them "
                        "periodically; `ganpipe watch` waits for them)")
    return found if args.all else found[-1:]


def run(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise UserError(f"run directory {args.run_dir} does not exist")
    ev = evaluator_from_args(args)
    try:
        targets = _broadcast(_on_rank0(lambda: _select(ev, args), ev.rank))
        for path in targets:
            try:
                records = ev.score(path)
            except SnapshotError as exc:
                raise UserError(str(exc)) from None
            ev.record(records)
    finally:
        ev.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
