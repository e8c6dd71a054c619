"""`ganpipe watch`: each snapshot scored once across restarts, damaged ones ignored, clean exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import REPO, cli
from test_metrics import (add_snapshot, make_run, mlp_generator, mnist_ext, mnist_ref,  # noqa: F401
                          one_digit_generator, records)

W = ["--extractor", "mnist", "--num-gen", "500", "--metrics", "fid", "--batch-size", "250"]


def test_watch_scores_each_snapshot_once_across_a_restart(tmp_path, mnist_dir, mnist_ref):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator(0), 2000: mlp_generator(1)})
    out = cli("watch", "--run-dir", str(run), "--once", *W)
    assert [r["snapshot"] for r in records(run)] == ["snapshot-000001000", "snapshot-000002000"]
    assert "--once: scored 2 snapshot(s)" in out.stdout

    # While it was down: one more snapshot, one whose weights were cut short after its record was
    # written, one still being written (weights without a record yet), then the end marker.
    add_snapshot(run, 3000, one_digit_generator(mnist_dir))
    bad = add_snapshot(run, 4000, mlp_generator(2)).with_suffix(".safetensors")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    add_snapshot(run, 5000, mlp_generator(3))
    (run / "snapshots" / "snapshot-000005000.json").unlink()
    (run / "FINISHED").write_text(json.dumps({"cur_nimg": 5000}))
    out = cli("watch", "--run-dir", str(run), "--interval", "0.2", *W)
    assert [r["snapshot"] for r in records(run)] == ["snapshot-000001000", "snapshot-000002000",
                                                    "snapshot-000003000"]
    assert "ignoring snapshot-000004000.json" in out.stdout and "sha256 does not match" in out.stdout
    assert "training finished: scored 1 snapshot(s) in this session, ignored 1 bad one(s)" in out.stdout

    # A third start finds nothing new and exits at once (the run is finished).
    out = cli("watch", "--run-dir", str(run), "--interval", "0.2", *W)
    assert "scored 0 snapshot(s)" in out.stdout and len(records(run)) == 3
    fids = {r["snapshot"]: r["value"] for r in records(run)}
    best = json.loads((run / "best.json").read_text())["fid_mnist"]
    assert best["snapshots_scored"] == 3 and best["snapshot"] == min(fids, key=fids.get)


class Lines:
    """Collects a subprocess's output lines in a thread, so the test can wait for one."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in self.lines):
                return
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r} in:\n{''.join(self.lines)}")


def test_watch_polls_is_alone_and_stops_on_sigterm(tmp_path, mnist_dir, mnist_ref):
    run = make_run(tmp_path, mnist_dir, {})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "watch", "--run-dir", str(run), "--interval", "0.3",
                             *W], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = Lines(proc)
        out.wait_for("watching")
        second = cli("watch", "--run-dir", str(run), *W, check=False)
        assert second.returncode == 2 and "another `ganpipe watch` is scoring" in second.stderr
        assert f"held by pid {proc.pid}" in second.stderr

        add_snapshot(run, 1000, mlp_generator())          # appears while it polls
        out.wait_for("snapshot-000001000 kimg 1: fid_mnist")
        assert len(records(run)) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out.thread.join(timeout=5)
        assert any("SIGTERM: stopping" in line for line in out.lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_abandons_a_snapshot_which_a_restart_scores(tmp_path, mnist_dir, mnist_ref):
    """The restart scores under the same protocol as the abandoned attempt: had the abandoned
    snapshot been recorded (or remembered as bad), the restart would not score it again."""
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator()})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # tests/faults.py makes every generation call sleep first: the signal lands inside the scoring.
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "faults.py"), "slow-generate=60", "--",
                             "watch", "--run-dir", str(run), "--once", *W],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = Lines(proc)
        out.wait_for("watching")
        time.sleep(1.0)                                   # inside the (slowed) generation
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 10
        out.thread.join(timeout=5)
        assert any("abandoned snapshot-000001000.json" in line for line in out.lines), "".join(out.lines)
        assert records(run) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cli("watch", "--run-dir", str(run), "--once", *W)
    assert [r["snapshot"] for r in records(run)] == ["snapshot-000001000"]
