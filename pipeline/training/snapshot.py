"""Snapshots: the EMA generator's weights (safetensors) plus a JSON record, for eval and sampling.

    RUN/snapshots/snapshot-000012345.safetensors   weights of the unwrapped EMA G (no `module.`)
    RUN/snapshots/snapshot-000012345.json          what is needed to rebuild G, and the sha256

The number is `cur_nimg` (images seen). Both files are written atomically and the JSON last, so a
snapshot is complete exactly when its JSON exists and the weights match its sha256; readers (the
watcher) never see half a snapshot. Loading executes no code: safetensors plus a JSON config.

    G, meta = load_snapshot("RUN/snapshots/snapshot-000012345.json")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig, build_dataclass
from pipeline.errors import SnapshotError
from pipeline.io import atomic_path, sha256_file, write_json_atomic

FORMAT = "ganpipe-snapshot"
FORMAT_VERSION = 1


def snapshot_name(cur_nimg: int) -> str:
    return f"snapshot-{cur_nimg:09d}"


def save_snapshot(G: torch.nn.Module, directory: str | Path, *, cur_nimg: int, model_cfg: ModelConfig,
                  resolution: int, channels: int, num_classes: int, extra: dict | None = None) -> Path:
    """Write weights then JSON (both atomically); returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = snapshot_name(cur_nimg)
    weights = directory / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cur_nimg": int(cur_nimg),
        "kimg": cur_nimg / 1000.0,
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "model": dataclasses.asdict(model_cfg),
        "resolution": resolution,
        "channels": channels,
        "num_classes": num_classes,
        "z_dim": int(getattr(G, "z_dim")),
        **(extra or {}),
    }
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
    name = meta.get("weights")
    # The weights sit beside their record: a bare file name, never a path into another run.
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or "\\" in name:
        raise SnapshotError(f"{path}: weights {name!r} is not a file name beside the record")
    weights = path.parent / name
    if not weights.is_file():
        raise SnapshotError(f"{path}: weights file {weights.name} is missing")
    if check_hash and sha256_file(weights) != meta["sha256"]:
        raise SnapshotError(f"{weights}: sha256 does not match its record (truncated or modified)")
    meta["json_path"] = str(path)
    meta["weights_path"] = str(weights)
    return meta


def load_snapshot(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the EMA generator of a snapshot, in eval mode with gradients off."""
    from pipeline.networks import build_networks

    meta = read_snapshot_meta(path)
    model_cfg = build_dataclass(ModelConfig, meta["model"], "model")
    G, _ = build_networks(model_cfg, resolution=meta["resolution"], channels=meta["channels"],
                          num_classes=meta["num_classes"])
    G.load_state_dict(load_file(meta["weights_path"], device="cpu"))
    G.to(device).eval().requires_grad_(False)
    return G, meta


def list_snapshots(directory: str | Path) -> list[Path]:
    """JSON records of the snapshots in `directory`, oldest first (complete ones have a JSON)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("snapshot-*.json"))


def prune_snapshots(run_dir: Path, keep: int, log: Callable[[str], None]) -> list[Path]:
    """Delete old snapshots beyond the newest `keep` (0 = keep all), but never one that the
    evaluation has not scored yet (no metrics.jsonl record with its sha256) nor one named in
    best.json. The record goes first: a reader never sees weights without their JSON being
    complete, and a half-pruned snapshot is simply incomplete."""
    from pipeline.metrics.records import protected_snapshots

    if keep <= 0:
        return []
    snaps = list_snapshots(Path(run_dir) / "snapshots")
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
        weights = meta.get("weights")
        if isinstance(weights, str) and weights and Path(weights).name == weights:
            (record.parent / weights).unlink(missing_ok=True)
        removed.append(record)
    if removed:
        log(f"pruned {len(removed)} scored snapshot(s) beyond the newest {keep} (train.keep_snapshots)")
    return removed
