"""Training recipes side by side under one protocol: which config trains the better generator
for the same images shown to D, on the bundled MNIST.

    ganpipe bench recipes                                  # mnist_dcgan vs mnist_rpgan, 200 kimg each
    ganpipe bench recipes --configs configs/mnist_dcgan.yaml configs/mnist_rpgan.yaml --kimg 40

Each config trains through the real `ganpipe train` (the same data, seed and kimg, every
intermediate snapshot kept), then `ganpipe eval --all` scores every snapshot with the project's
MNIST extractor: FID_mnist of `--num-gen` generated images (seed 0) against the 4,000 training
digits, the demo's protocol. The held-out 1,000 real digits scored the same way give the floor a
perfect generator would reach. Printed per config: FID at each snapshot, the best, wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.data.prepare import prepare
from pipeline.rundir import RunDir


def _run(args: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ganpipe {' '.join(args[:1])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def run(args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-recipes-") as tmp:
        data = Path(tmp) / "mnist"
        prepare("mnist", data, holdout=1000, workers=2, progress=False)
        for config in args.configs:
            run_dir = Path(tmp) / Path(config).stem
            every = args.kimg / args.snapshots
            t0 = time.perf_counter()
            _run(["train", "--config", config, "--run-dir", str(run_dir), f"data.path={data}",
                  f"train.total_kimg={args.kimg}", f"train.snapshot_kimg={every}", f"train.checkpoint_kimg={args.kimg}",
                  f"train.tick_kimg={every}", "log.progress=false", f"train.threads={args.threads}"], args.threads)
            train_s = time.perf_counter() - t0
            _run(["eval", "--run-dir", str(run_dir), "--all", "--extractor", "mnist", "--metrics", "fid",
                  "--num-gen", str(args.num_gen)], args.threads)
            records = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
            curve = {r["kimg"]: round(r["value"], 3) for r in records}
            results[Path(config).stem] = {"fid_mnist_by_kimg": curve, "best_fid_mnist": min(curve.values()),
                                          "final_fid_mnist": curve[max(curve)], "train_s": round(train_s, 1)}
    return {"kimg": args.kimg, "protocol": f"FID_mnist, {args.num_gen} generated (seed 0) vs the 4,000 training "
                                           "digits, EMA snapshots", "recipes": results}
