"""Shared fixtures: tiny prepared datasets and a helper to run the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores: one torch thread per test process keeps parallel work from oversubscribing.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# The device suite (tests/test_device.py): its tests carry the marker `device` and run on the device
# named here, `cuda` on a GPU machine (`make gpu-check` sets it) or `cpu` to run the same bodies on
# this machine; unset, each of them skips with one line saying so, and CPU CI is unchanged.
DEVICE_ENV = "GANPIPE_TEST_DEVICE"


def device_under_test() -> tuple[torch.device | None, str]:
    """(the device the suite runs on, "") or (None, the one-line reason its tests skip)."""
    asked = os.environ.get(DEVICE_ENV, "")
    if not asked:
        return None, f"device suite: set {DEVICE_ENV}=cuda on a GPU machine (or =cpu) to run it"
    if asked == "cuda" and not torch.cuda.is_available():
        return None, f"{DEVICE_ENV}=cuda, but torch {torch.__version__} sees no CUDA device"
    return torch.device(asked), ""


def pytest_configure(config):
    config.addinivalue_line("markers", f"device: a test of the device suite; runs on ${DEVICE_ENV} (cuda or cpu), "
                                       "else skips saying so")
    asked = os.environ.get(DEVICE_ENV, "")
    if asked not in ("", "cuda", "cpu"):
        raise pytest.UsageError(f"{DEVICE_ENV}={asked!r}: choose cuda or cpu (or leave it unset)")
    if asked == "cuda":
        # cuBLAS is deterministic only with a fixed workspace, read when its first handle is made:
        # the resume tests ask torch for deterministic algorithms.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    device, reason = device_under_test()
    if device is None:
        for item in items:
            if item.get_closest_marker("device") is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the device suite (the tests that use it are marked `device`)."""
    found, reason = device_under_test()
    if found is None:
        pytest.skip(reason)
    return found


# Commands that hold no signal handlers, loops or process groups of their own: run in this process
# by `cli` (through the same `pipeline.cli.main` as the `ganpipe` entry point), which spares each
# call the 2-3 s of a fresh interpreter importing torch. train and watch always get a subprocess.
IN_PROCESS = {"eval", "sample", "verify", "prepare", "config", "compare", "refstats"}


def cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600,
        faults: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` and return the completed process (stdout+stderr text).
    `faults` runs it through tests/faults.py, which injects them (e.g. "nan-d-steps=2,5").
    Commands in IN_PROCESS without env or faults run in this process, with the same result."""
    if args and args[0] in IN_PROCESS and env is None and not faults:
        return _cli_in_process(args, check)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    entry = [str(REPO / "tests" / "faults.py"), *faults, "--"] if faults else ["-m", "pipeline"]
    proc = subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ganpipe {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def _cli_in_process(args: tuple[str, ...], check: bool) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from pipeline import cli as ganpipe

    out, err = io.StringIO(), io.StringIO()
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = ganpipe.main(list(args))
            except SystemExit as exc:           # argparse's usage errors and --help, as the entry point exits
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    proc = subprocess.CompletedProcess(["ganpipe", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"ganpipe {' '.join(args)} exited {code}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def make_npz(path: Path, n: int, res: int, channels: int = 3, classes: int = 4, seed: int = 0) -> Path:
    """Random uint8 images with labels; each image's first pixel row encodes its index (for tracing)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, res, res, channels), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(n) % classes)
    return path


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """The bundled MNIST, prepared once per session through the real CLI."""
    out = tmp_path_factory.mktemp("mnist") / "data"
    cli("prepare", "--source", "mnist", "--out", str(out), "--holdout", "1000", "--no-progress")
    return out


@pytest.fixture
def small_dir(tmp_path) -> Path:
    """80 random 8x8 RGB images in 8 shards of 10, 4 classes (fresh per test: tests may corrupt it)."""
    from pipeline.data.prepare import prepare

    npz = make_npz(tmp_path / "src.npz", 80, 8)
    out = tmp_path / "small"
    prepare(f"npz:{npz}", out, shard_size=10, workers=1, progress=False)
    return out
