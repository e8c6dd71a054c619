"""A snapshot whose write fails part way leaves nothing behind: no weights file without its
record (the trainer's snapshots with variants, and post-hoc EMA snapshots, which go through the
same writer). Failures are injected between the weights and the record."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import pipeline.training.snapshot as snapshot
from pipeline.config import ModelConfig
from pipeline.errors import TrainingError
from pipeline.networks import build_networks
from pipeline.training.posthoc_ema import write_reconstruction
from pipeline.training.snapshot import SnapshotInfo, load_snapshot, save_snapshot

MODEL = ModelConfig(name="mlp", g_width=0.25)


def tiny_g(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    G, _ = build_networks(MODEL, resolution=28, channels=1, num_classes=10)
    return G.eval()


def full_disk(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def save(G, directory: Path, nimg: int = 1000):
    variants = {"raw": (tiny_g(1), {}), "phema-0.05": (tiny_g(2), {"std": 0.05})}
    return save_snapshot(G, directory, cur_nimg=nimg, info=SnapshotInfo(MODEL, 28, 1, 10), variants=variants)


@pytest.mark.parametrize("fail_at", ["variant", "record", "interrupt"])
def test_a_snapshot_that_fails_before_its_record_leaves_no_weights(tmp_path, monkeypatch, fail_at):
    directory = tmp_path / "snapshots"
    if fail_at == "variant":               # the EMA weights are written, the second file fails
        write, calls = snapshot._write, []

        def second_fails(data, path):
            calls.append(path)
            if len(calls) == 2:
                raise full_disk(path)
            write(data, path)

        monkeypatch.setattr(snapshot, "_write", second_fails)
    else:                                   # every weights file is written, then the record fails
        def record_fails(path, meta):
            assert {"snapshot-000001000.safetensors", "snapshot-000001000-raw.safetensors"} <= set(files(directory))
            raise full_disk(path) if fail_at == "record" else KeyboardInterrupt()

        monkeypatch.setattr(snapshot, "write_json_atomic", record_fails)
    with pytest.raises(KeyboardInterrupt if fail_at == "interrupt" else TrainingError):
        save(tiny_g(), directory)
    assert files(directory) == []           # nor a temp file


def test_a_failed_rewrite_keeps_the_complete_snapshot_of_that_name(tmp_path, monkeypatch):
    """Rewriting a snapshot of the same name (a resumed run writes the same G again): the files
    written belong to the record that was there, which stays loadable."""
    directory = tmp_path / "snapshots"
    G = tiny_g()
    record = save(G, directory)
    before = files(directory)
    monkeypatch.setattr(snapshot, "write_json_atomic", lambda path, meta: (_ for _ in ()).throw(full_disk(path)))
    with pytest.raises(TrainingError):
        save(G, directory)
    assert files(directory) == before
    monkeypatch.undo()
    load_snapshot(record, weights="raw")


def test_a_posthoc_ema_snapshot_that_fails_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run" / "posthoc" / "posthoc-000001000-std0.08.json"
    base = {"model": {"name": "mlp", "g_width": 0.25}, "resolution": 28, "channels": 1, "num_classes": 10,
            "cur_nimg": 1000}
    monkeypatch.setattr(snapshot, "write_json_atomic", lambda path, meta: (_ for _ in ()).throw(full_disk(path)))
    with pytest.raises(TrainingError):
        write_reconstruction(tiny_g(), base, {"std": 0.08}, out)
    assert files(out.parent) == []
    monkeypatch.undo()
    assert write_reconstruction(tiny_g(), base, {"std": 0.08}, out) == out
    assert files(out.parent) == [out.name, "posthoc-000001000-std0.08.safetensors"]
