"""The run directory's markers: what they say is what happened (pipeline.rundir)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO
from pipeline.rundir import RunDir, attempt


def state(run, **env) -> str:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "pipeline.rundir", "state", str(run)], env=full,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_state_words_for_job_scripts(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    assert state(tmp_path) == "none"
    run.stop.write_text("by hand\n")
    assert state(tmp_path) == "stopped" and run.stop_request() == "by hand"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert attempt() == "slurm:7.2"
    run.mark_preempted(64, tmp_path / "ckpt")
    assert json.loads(run.preempted.read_text())["attempt"] == "slurm:7.2"
    # Only the attempt that wrote the marker requeues on it; outside Slurm any marker counts.
    assert state(tmp_path, SLURM_JOB_ID="7", SLURM_RESTART_COUNT="2") == "preempted"
    assert state(tmp_path, SLURM_JOB_ID="7", SLURM_RESTART_COUNT="3") == "stopped"
    assert state(tmp_path) == "preempted"
    run.mark_finished(128, None)
    assert state(tmp_path, SLURM_JOB_ID="7", SLURM_RESTART_COUNT="3") == "finished"


def test_a_run_with_images_to_go_clears_a_stale_finished_marker(tmp_path):
    run = RunDir(tmp_path)
    run.mark_finished(1000, None)
    run.preempted.write_text("{}")
    run.clear_start_markers(total_nimg=1000, cur_nimg=1000)      # nothing left to train: still finished
    assert run.is_finished() and not run.preempted.exists()
    run.clear_start_markers(total_nimg=2000, cur_nimg=1000)      # extended: not finished any more
    assert not run.is_finished()


def test_an_extended_run_is_not_finished_until_it_reaches_its_new_end(tmp_path, mnist_dir):
    from test_train import train

    run = tmp_path / "run"
    train(run, mnist_dir, "train.total_kimg=0.032", "train.tick_kimg=0.032")
    assert RunDir(run).is_finished()
    # Extended, and stopped at its first tick (RUN/STOP): the old end marker must be gone.
    RunDir(run).stop.write_text("pause\n")
    out = train(run, mnist_dir, "train.total_kimg=0.096", "train.tick_kimg=0.032")
    assert "stopped on request" in out.stdout
    assert not RunDir(run).is_finished()
    assert state(run) == "stopped"
    RunDir(run).stop.unlink()
    train(run, mnist_dir, "train.total_kimg=0.096", "train.tick_kimg=0.032")
    assert json.loads(RunDir(run).finished.read_text())["cur_nimg"] == 96


def test_a_failed_start_records_nothing(tmp_path, mnist_dir):
    """A start that fails before training (a typo in data.path) writes no config.yaml, so the
    corrected command starts the run instead of being refused as "a different config"."""
    from test_train import train

    run = tmp_path / "run"
    bad = train(run, mnist_dir, f"data.path={mnist_dir}-typo", check=False)
    assert bad.returncode == 2 and not RunDir(run).config.exists()
    train(run, mnist_dir, "train.total_kimg=0.032", "train.tick_kimg=0.032")
    assert RunDir(run).config.is_file() and RunDir(run).is_finished()


def test_dry_run_builds_reads_one_batch_and_writes_nothing(tmp_path, mnist_dir):
    from test_train import train

    run = tmp_path / "run"
    out = train(run, mnist_dir, "--dry-run")
    assert "dry run:" in out.stdout and "one batch (16, 1, 28, 28) read" in out.stdout
    assert not run.exists()
