"""`--run RUN` wherever a snapshot is asked for, `--snapshot best|latest|NAME` resolved in it, and
what to pass instead when a run or a checkpoint is given as a snapshot (issue 25, item 10)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import pipeline as ganpipe
from conftest import cli
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.metrics.records import append_records
from test_api import record, tiny_run


def grid(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_run_best_latest_and_name_resolve_to_the_same_images_as_the_paths(tmp_path):
    run = tmp_path / "run"
    paths = tiny_run(run)
    assert ganpipe.latest_snapshot(run) == paths[-1]
    append_records(run, [record(s, "fid", v) for s, v in zip(paths, (30.0, 12.5, 20.0))])
    assert ganpipe.best_snapshot(run) == paths[1]
    for which, expected in (("best", paths[1]), ("latest", paths[-1]), (paths[0].stem, paths[0]), (None, paths[-1])):
        args = ["--snapshot", which] if which else []
        cli("sample", "--run", str(run), *args, "--num", "4", "--out", str(tmp_path / "a.png"))
        cli("sample", "--snapshot", str(expected), "--num", "4", "--out", str(tmp_path / "b.png"))
        assert np.array_equal(grid(tmp_path / "a.png"), grid(tmp_path / "b.png")), which
    gen = ganpipe.load_generator(paths[0].stem, run_dir=run)
    assert np.array_equal(gen.sample_uint8(4, seed=0), ganpipe.load_generator(paths[0]).sample_uint8(4, seed=0))


def test_a_run_or_a_checkpoint_given_as_a_snapshot_says_what_to_pass(tmp_path):
    run = tmp_path / "run"
    tiny_run(run)
    out = cli("sample", "--snapshot", str(run), "--out", str(tmp_path / "g.png"), check=False)
    assert out.returncode == 2 and f"is a run directory, not a snapshot: pass --run {run}" in out.stderr
    ckpt = RunDir(run).checkpoints / "ckpt-000001000"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"")
    out = cli("export", "--snapshot", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "g.pt"),
              check=False)
    assert out.returncode == 2 and "is a training checkpoint" in out.stderr and f"--run {run}" in out.stderr
    out = cli("sample", "--run", str(run), "--snapshot", "snapshot-999", "--out", str(tmp_path / "g.png"), check=False)
    assert out.returncode == 2 and "snapshot snapshot-999 not found" in out.stderr
    with pytest.raises(UserError, match="no snapshots yet"):
        ganpipe.latest_snapshot(tmp_path / "empty")
