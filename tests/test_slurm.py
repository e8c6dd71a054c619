"""slurm/train.sbatch and slurm/eval.sbatch on a real 2-node Slurm cluster started on localhost.

Skipped, with the reason, when the Slurm daemons are not installed (`.ci/run` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from conftest import REPO
from slurm_cluster import SlurmCluster, missing_binaries

pytestmark = pytest.mark.skipif(bool(missing_binaries()),
                                reason=f"Slurm not installed (missing {', '.join(missing_binaries())}); "
                                       "install slurmctld slurmd slurm-client munge")

# Loader workers on (the default users run): Slurm signals them too.
TINY = ["model.g_width=0.125", "model.d_width=0.125", "data.batch_size=16", "data.num_workers=1",
        "data.shuffle_buffer=100", "log.progress=false", "log.grid_size=16", "ema.halflife_kimg=0.1"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


def submit(cluster, script: str, env: dict, *args: str, nodes: int = 2) -> str:
    full = {**cluster.env, "GANPIPE_VENV": str(REPO / ".venv"), "GPUS_PER_NODE": "1", "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo", "MASTER_PORT": str(_port()), "RDZV_STAGGER_S": "3", **env}
    import subprocess
    proc = subprocess.run(["sbatch", "-N", str(nodes), "--chdir", str(REPO), "-o", str(cluster.root / "job-%j.out"),
                           script, *args], capture_output=True, text=True, env=full, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[-1]


def wait_state(cluster, job: str, states: set[str], timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    info = {}
    while time.time() < deadline:
        info = cluster.job(job)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} not in {states} after {timeout}s: {info.get('JobState')}\n"
                         f"{job_output(cluster, job)}\n{cluster.logs()[-3000:]}")


def job_output(cluster, job: str) -> str:
    f = cluster.root / f"job-{job}.out"
    return f.read_text() if f.is_file() else ""


def test_train_sbatch_runs_two_ranks_over_two_nodes_then_eval_sbatch_scores(cluster, tmp_path, mnist_dir):
    run = tmp_path / "run"
    job = submit(cluster, "slurm/train.sbatch", {"CONFIG": "configs/mnist_dcgan.yaml", "RUN_DIR": str(run)},
                 f"data.path={mnist_dir}", *TINY, "train.total_kimg=0.128", "train.tick_kimg=0.064")
    info = wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    out = job_output(cluster, job)
    assert info["JobState"] == "COMPLETED", out
    assert "2 nodes x 1" in out and "training finished" in out
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    assert rows and all(r["world_size"] == 2 for r in rows) and rows[-1]["kimg"] == 0.128
    assert (run / "FINISHED").is_file()

    # The periodic evaluation job: scores both snapshots once, then exits since training finished.
    job = submit(cluster, "slurm/eval.sbatch", {"RUN_DIR": str(run), "EVAL_INTERVAL": "2"},
                 "--extractor", "mnist", "--num-gen", "500", "--metrics", "fid", nodes=1)
    info = wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert info["JobState"] == "COMPLETED", job_output(cluster, job)
    records = [r for x in (run / "metrics.jsonl").read_text().splitlines() if "kind" not in (r := json.loads(x))]
    assert sorted(r["kimg"] for r in records) == [0.128]    # snapshot_kimg default: only the final one
    assert all(r["metric"] == "fid" and r["value"] > 0 for r in records)
    assert (run / "best.json").is_file()


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path, mnist_dir):
    run = tmp_path / "run"
    job = submit(cluster, "slurm/train.sbatch", {"CONFIG": "configs/mnist_dcgan.yaml", "RUN_DIR": str(run)},
                 f"data.path={mnist_dir}", *TINY, "train.total_kimg=0.8", "train.tick_kimg=0.032",
                 "train.checkpoint_kimg=10")
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "stats.jsonl").is_file():
        time.sleep(0.5)
    assert (run / "stats.jsonl").is_file(), job_output(cluster, job)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    # The job requeues itself; nudge the scheduler so the test need not wait for the requeue delay,
    # but only after the old job's credentials expired (cred_expire=10): a requeued job started
    # earlier is killed as "non-startable: Job credential revoked".
    deadline, pending_since = time.time() + 200, None
    while time.time() < deadline:
        info = cluster.job(job)
        if int(info.get("Restarts", 0)) >= 1 and info.get("JobState") == "PENDING":
            pending_since = pending_since or time.time()
            if time.time() - pending_since > 12:
                cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
        if int(info.get("Restarts", 0)) >= 1 and info.get("JobState") in ("COMPLETED", "FAILED"):
            break
        time.sleep(1)
    info = wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"})
    out = job_output(cluster, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, out
    assert "preempted with a checkpoint" in out and "requeueing job" in out
    assert "resumed from" in out and "training finished" in out
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    assert rows[-1]["kimg"] >= 0.8 and all(r["world_size"] == 2 for r in rows)


def test_one_process_job_and_a_stale_preemption_marker_never_requeues_a_failure(cluster, tmp_path, mnist_dir):
    # The most common first job: one node, one process (accelerate refuses --multi_gpu below two).
    run = tmp_path / "run"
    job = submit(cluster, "slurm/train.sbatch", {"CONFIG": "configs/mnist_dcgan.yaml", "RUN_DIR": str(run),
                                                 "GPUS_PER_NODE": "1"},
                 f"data.path={mnist_dir}", *TINY, "train.total_kimg=0.032", "train.tick_kimg=0.032", nodes=1)
    info = wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    out = job_output(cluster, job)
    assert info["JobState"] == "COMPLETED" and "training finished" in out, out
    assert [json.loads(x)["world_size"] for x in (run / "stats.jsonl").read_text().splitlines()] == [1]

    # A PREEMPTED marker an earlier attempt left, and a start that fails (the data moved): the job
    # fails once with the trainer's status instead of requeueing itself again and again.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "PREEMPTED").write_text(json.dumps({"cur_nimg": 32, "checkpoint": "x", "attempt": "slurm:1.0"}))
    job = submit(cluster, "slurm/train.sbatch", {"CONFIG": "configs/mnist_dcgan.yaml", "RUN_DIR": str(stale)},
                 f"data.path={tmp_path / 'moved'}", *TINY, nodes=1)
    info = wait_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    out = job_output(cluster, job)
    assert info["JobState"] == "FAILED" and int(info.get("Restarts", 0)) == 0, out
    assert "training failed with status" in out and "requeueing" not in out
