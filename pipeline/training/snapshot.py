"""Snapshots: the EMA generator's weights (safetensors) plus a JSON record, for eval and sampling.

    RUN/snapshots/snapshot-000012345.safetensors   weights of the unwrapped EMA G (no `module.`)
    RUN/snapshots/snapshot-000012345.json          what is needed to rebuild G, and the sha256

A conditional G's record also says how its training drew G's classes (`labels`: {"kind": "uniform"},
or {"kind": "data", "weights": [per-class counts], "source": ...}, train.gen_labels), so that
`ganpipe eval` draws its generated classes from the same distribution.

Variants beside them, each with its own file and sha256 in the record's `variants`:

    RUN/snapshots/snapshot-000012345-raw.safetensors         the raw G (train.snapshot_raw)
    RUN/snapshots/snapshot-000012345-phema-0.05.safetensors  power-function EMA profiles
                                                             (ema.posthoc_std, ema.PowerEMA)

The number is `cur_nimg` (images seen). Both files are written atomically and the JSON last, so a
snapshot is complete exactly when its JSON exists and the weights match its sha256; readers (the
watcher) never see half a snapshot. A write that fails before the JSON is in place takes back the
weights files it wrote (nothing lists or prunes weights without a record), unless a record of that
name was already there (its files were replaced by the same generator's). A full disk or a
read-only directory is a one-line TrainingError naming the file (the earlier snapshots and
checkpoints stay). Loading executes no code: safetensors plus a JSON config. A record that
cannot be what it says (a field of the wrong type, a model its weights do not fit, a safetensors
header that lies) is a SnapshotError naming the file, never another exception: the watcher
reports it and goes on.

    G, meta = load_snapshot("RUN/snapshots/snapshot-000012345.json")
    G, meta = load_snapshot("RUN/snapshots/snapshot-000012345.json", weights="raw")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save

from pipeline.config import ModelConfig, build_dataclass
from pipeline.errors import SnapshotError, TrainingError
from pipeline.io import atomic_path, sha256_bytes, sha256_file, write_json_atomic
from pipeline.rundir import RunDir

FORMAT = "ganpipe-snapshot"
FORMAT_VERSION = 1


def snapshot_name(cur_nimg: int) -> str:
    return f"snapshot-{cur_nimg:09d}"


# What writes each variant, said in the error when a snapshot lacks it.
VARIANT_HINTS = {"raw": "train with train.snapshot_raw=true (it may be switched on when resuming; the snapshots "
                        "after that keep it), or use --generator ema",
                 "phema": "train with ema.posthoc_std (e.g. [0.05,0.1]) from the start of the run"}


def _write_weights(G: torch.nn.Module, path: Path) -> str:
    state = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    data = save(state, metadata={"format": FORMAT})
    with atomic_path(path) as tmp:
        _write(data, tmp)
    return sha256_bytes(data)


def _write(data: bytes, path: Path) -> None:
    """Through a Python file, so that a full disk or a read-only directory is an OSError naming the
    file and the reason (safetensors' own writer raises a bare SafetensorError)."""
    with open(path, "wb") as f:
        f.write(data)


@dataclass
class SnapshotInfo:
    """What a snapshot's record says about its generator besides the weights."""
    model: ModelConfig              # the config it is rebuilt from
    resolution: int
    channels: int
    num_classes: int
    extra: dict = field(default_factory=dict)   # more record fields (config hash, data path, post-hoc EMA)


def save_snapshot(G: torch.nn.Module, where: str | Path, *, cur_nimg: int, info: SnapshotInfo,
                  variants: dict[str, tuple[torch.nn.Module, dict]] | None = None) -> Path:
    """Write the weights, each variant's (name -> (module, fields for its record)), then the JSON
    (all atomically); returns the JSON path. `where` is a directory (the record is then
    snapshot-{cur_nimg:09d}.json in it) or the record's own .json path."""
    where = Path(where)
    directory, name = (where.parent, where.stem) if where.suffix == ".json" else (where, snapshot_name(cur_nimg))
    existed = (directory / f"{name}.json").exists()
    try:
        try:
            return _save(G, directory, name, cur_nimg, info, variants)
        except BaseException:
            if not existed:
                for file in (_weights_file(directory, name), *(_weights_file(directory, name, key)
                                                                for key in variants or {})):
                    file.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise TrainingError(f"snapshot {directory / name} not written: {exc.strerror or exc} ({exc.filename}); "
                            f"the earlier snapshots in {directory} and the checkpoints are kept; free the space "
                            "(or fix the permissions) and run the same command again to resume") from None


def _weights_file(directory: Path, name: str, variant: str | None = None) -> Path:
    return directory / (f"{name}.safetensors" if variant is None else f"{name}-{variant}.safetensors")


def _save(G: torch.nn.Module, directory: Path, name: str, cur_nimg: int, info: SnapshotInfo,
          variants: dict[str, tuple[torch.nn.Module, dict]] | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    weights = _weights_file(directory, name)
    sha = _write_weights(G, weights)
    written = {}
    for key, (module, fields) in (variants or {}).items():
        file = _weights_file(directory, name, key)
        written[key] = {"weights": file.name, "sha256": _write_weights(module, file), **fields}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cur_nimg": int(cur_nimg),
        "kimg": cur_nimg / 1000.0,
        "weights": weights.name,
        "sha256": sha,
        "model": dataclasses.asdict(info.model),
        "resolution": info.resolution,
        "channels": info.channels,
        "num_classes": info.num_classes,
        "z_dim": int(getattr(G, "z_dim")),
        **info.extra,
    }
    if written:
        meta["variants"] = written
    path = directory / f"{name}.json"
    write_json_atomic(path, meta)
    return path


def read_snapshot_meta(path: str | Path, check_hash: bool = True) -> dict:
    """The JSON record of a snapshot (given its .json or .safetensors path), checked for completeness."""
    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise SnapshotError(f"{path}: no snapshot record; a snapshot is complete only when its JSON exists")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path}: unreadable snapshot record ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} record")
    missing = sorted({"weights", "sha256", "model", "resolution", "channels", "num_classes", "cur_nimg"} - meta.keys())
    if missing:
        raise SnapshotError(f"{path}: record lacks {', '.join(missing)}")
    if problem := _field_problem(meta):
        raise SnapshotError(f"{path}: {problem}")
    name = meta.get("weights")
    variants = meta.get("variants", {})
    if not isinstance(variants, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                                 for v in variants.values()):
        raise SnapshotError(f"{path}: unreadable variants in the record")
    # The weights sit beside their record: a bare file name, never a path into another run.
    for file in (name, *(v.get("weights") for v in variants.values())):
        if not _bare(file):
            raise SnapshotError(f"{path}: weights {file!r} is not a file name beside the record")
    weights = path.parent / name
    if not weights.is_file():
        raise SnapshotError(f"{path}: weights file {weights.name} is missing")
    if check_hash and sha256_file(weights) != meta["sha256"]:
        raise SnapshotError(f"{weights}: sha256 does not match its record (truncated or modified)")
    meta["json_path"] = str(path)
    meta["weights_path"] = str(weights)
    return meta


# The bounds of a record's numbers: what a generator can be built from without exhausting memory.
FIELD_RANGES = {"resolution": (0, 8192), "channels": (1, 4096), "num_classes": (0, 1_000_000), "cur_nimg": (0, 2**62)}


def _field_problem(meta: dict) -> str:
    """What is wrong with the types and ranges of a record's fields ("" when nothing)."""
    sha = meta["sha256"]
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        return f"sha256 {str(sha)[:80]!r} is not a sha256 (64 hex digits)"
    if not isinstance(meta["model"], dict):
        return f"model is {type(meta['model']).__name__}, not a mapping of model settings"
    for key, (lo, hi) in FIELD_RANGES.items():
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"{key} {str(value)[:80]!r} is not a whole number in [{lo}, {hi}]"
    if "kimg" in meta and (isinstance(meta["kimg"], bool) or not isinstance(meta["kimg"], (int, float))):
        return f"kimg {str(meta['kimg'])[:80]!r} is not a number"
    if "labels" in meta:
        return _labels_problem(meta["labels"], meta["num_classes"])
    return ""


def _labels_problem(labels, num_classes: int) -> str:
    """What is wrong with a record's `labels` (how training drew G's classes), "" when nothing."""
    if not isinstance(labels, dict) or labels.get("kind") not in ("uniform", "data") or not num_classes:
        return f"labels {str(labels)[:80]!r} is not {{kind: uniform}} or {{kind: data, weights: [...]}} of a conditional G"
    if labels["kind"] == "data":
        weights = labels.get("weights")
        if not (isinstance(weights, list) and len(weights) == num_classes
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                        for w in weights) and sum(weights) > 0):
            return f"labels.weights {str(weights)[:80]!r} are not {num_classes} class weights >= 0 with a positive sum"
        if not isinstance(labels.get("source", ""), str):
            return "labels.source is not text"
    return ""


def _bare(name) -> bool:
    return isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..") and "\\" not in name


def variant_path(meta: dict, variant: str) -> Path:
    """The checked weights file of a snapshot's variant ("raw", "phema-0.05"), or a SnapshotError
    naming the snapshot and the training option that writes the variant."""
    json_path = Path(meta["json_path"])
    entry = meta.get("variants", {}).get(variant)
    if entry is None:
        hint = VARIANT_HINTS.get(variant.split("-")[0], "choose one it has")
        kept = ", ".join(meta.get("variants", {})) or "none"
        raise SnapshotError(f"{json_path} has no {variant} generator weights (variants: {kept}); {hint}")
    file = json_path.parent / entry["weights"]
    if not file.is_file():
        raise SnapshotError(f"{json_path}: {variant} weights file {file.name} is missing")
    if sha256_file(file) != entry["sha256"]:
        raise SnapshotError(f"{file}: sha256 does not match its record (truncated or modified)")
    return file


def build_generator(meta: dict) -> torch.nn.Module:
    """An untrained G of the architecture a snapshot record describes (a SnapshotError naming the
    record when it describes none: an unknown model, a bad setting)."""
    from pipeline.networks import build_networks

    try:
        model_cfg = build_dataclass(ModelConfig, meta["model"], "model")
        G, _ = build_networks(model_cfg, resolution=meta["resolution"], channels=meta["channels"],
                              num_classes=meta["num_classes"])
    except Exception as exc:  # noqa: BLE001 - the record is untrusted: any failure to build is its fault
        raise SnapshotError(f"{meta.get('json_path', 'snapshot record')}: no generator can be built from it "
                            f"({_first_line(exc)})") from None
    return G


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else 'no message'}"


def load_snapshot(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema"
                  ) -> tuple[torch.nn.Module, dict]:
    """Rebuild a snapshot's generator, in eval mode with gradients off: the EMA G (`weights="ema"`)
    or a variant ("raw", "phema-0.05"); meta["generator"] says which, meta["weights_path"] its file."""
    meta = read_snapshot_meta(path, check_hash=weights == "ema")
    if weights != "ema":
        meta["weights_path"] = str(variant_path(meta, weights))
    meta["generator"] = weights
    G = build_generator(meta)
    try:
        G.load_state_dict(load_file(meta["weights_path"], device="cpu"))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, a missing or misshapen tensor, ...
        raise SnapshotError(f"{meta['weights_path']}: the weights do not load into the model its record "
                            f"describes ({_first_line(exc)})") from None
    G.to(device).eval().requires_grad_(False)
    return G, meta


def list_snapshots(directory: str | Path) -> list[Path]:
    """JSON records of the snapshots in `directory`, oldest first (complete ones have a JSON)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("snapshot-*.json"))


def prune_snapshots(run_dir: Path, keep: int, log: Callable[[str], None]) -> list[Path]:
    """Delete old snapshots beyond the newest `keep` (0 = keep all), but never one that the run's
    main series has not scored (a score under the main protocol that `ganpipe watch` or the first
    `eval --all` recorded, metrics/records.py: a one-off eval under another protocol protects
    nothing; with no main protocol nothing is pruned) nor a best one (derived from metrics.jsonl,
    and whatever best.json names). The record goes first: a reader never sees weights without
    their JSON being complete, and a half-pruned snapshot is simply incomplete."""
    from pipeline.metrics.records import protected_snapshots

    if keep <= 0:
        return []
    snaps = list_snapshots(RunDir(run_dir).snapshots)
    scored, best = protected_snapshots(run_dir)
    removed = []
    for record in snaps[:-keep]:
        try:
            meta = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("sha256") not in scored or record.stem in best:
            continue
        record.unlink(missing_ok=True)
        variants = meta.get("variants") if isinstance(meta.get("variants"), dict) else {}
        for weights in (meta.get("weights"), *(v.get("weights") for v in variants.values() if isinstance(v, dict))):
            if _bare(weights):
                (record.parent / weights).unlink(missing_ok=True)
        removed.append(record)
    if removed:
        log(f"pruned {len(removed)} scored snapshot(s) beyond the newest {keep} (train.keep_snapshots)")
    return removed
