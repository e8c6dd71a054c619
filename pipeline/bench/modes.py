"""StackedMNIST mode coverage: configs side by side, modes covered out of 1,000 and KL to uniform.

    ganpipe bench modes --configs configs/stackedmnist_dcgan.yaml configs/stackedmnist_rpgan.yaml --kimg 200
    ganpipe bench modes --configs configs/stackedmnist_dcgan.yaml configs/stackedmnist_dcgan.yaml@loss.name=hinge

A config may carry overrides after `@` (comma-separated KEY=VALUE), so other losses run on the
same network in the same benchmark; its result is keyed by the whole entry.

Prepares `stackedmnist:N` (three bundled MNIST digits per image, one per colour channel), trains
each config through the real `ganpipe train` for `--kimg` (same data and seed), then generates
`--num-gen` images (seed 0, EMA snapshot) and classifies each channel with the project's MNIST
classifier (`pipeline.metrics.modes`). The same count on real StackedMNIST images gives what a
perfect generator reaches with that many samples (about 0.02 nats of KL come from sampling
alone at 25,600 samples).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
import tempfile

import numpy as np
import torch

from pipeline.bench.recipes import _run
from pipeline.data.prepare import prepare
from pipeline.data.sources import parse_source
from pipeline.metrics.mnist_net import load_mnist_net
from pipeline.metrics.modes import NUM_MODES, classify_channels, mode_counts, summary
from pipeline.training.snapshot import list_snapshots, load_snapshot
from pipeline.rundir import RunDir


def real_counts(num: int, net: torch.nn.Module) -> tuple[np.ndarray, float]:
    """Mode histogram of `num` real StackedMNIST images, and how often the classified mode is the
    true one (the classifier's own error, which a generator's figures include too)."""
    items = parse_source(f"stackedmnist:{num}").items
    images = torch.from_numpy(np.stack([payload for _, payload, _ in items])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        modes = torch.cat([classify_channels(images[lo:lo + 1024] / 127.5 - 1, net)
                           for lo in range(0, num, 1024)]).numpy()
    labels = np.array([label for _, _, label in items])
    return np.bincount(modes, minlength=NUM_MODES), float((modes == labels).mean())


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    net = load_mnist_net()[0]
    counts, accuracy = real_counts(args.num_gen, net)
    results = {"real_stackedmnist": {**summary(counts), "classifier_mode_accuracy": round(accuracy, 4)}}
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-modes-") as tmp:
        data = Path(tmp) / "stackedmnist"
        prepare(f"stackedmnist:{args.data_size}", data, holdout=0, workers=2, progress=False)
        for i, entry in enumerate(args.configs):
            config, _, extra = entry.partition("@")
            overrides = [kv for kv in extra.split(",") if kv]
            run_dir = Path(tmp) / f"{i}-{Path(config).stem}"
            t0 = time.perf_counter()
            _run(["train", "--config", config, "--run-dir", str(run_dir), f"data.path={data}",
                  f"train.total_kimg={args.kimg}", f"train.snapshot_kimg={args.kimg}",
                  f"train.checkpoint_kimg={args.kimg}", f"train.tick_kimg={args.kimg / 4}",
                  "log.progress=false", f"train.threads={args.threads}", *args.set, *overrides], args.threads)
            train_s = time.perf_counter() - t0
            G, _ = load_snapshot(list_snapshots(RunDir(run_dir).snapshots)[-1])
            results[Path(config).stem + (f"@{extra}" if extra else "")] = {**summary(mode_counts(G, num=args.num_gen, seed=0, net=net)),
                                          "train_s": round(train_s, 1)}
    return {"kimg": args.kimg, "data": f"stackedmnist:{args.data_size}",
            "protocol": f"{args.num_gen} generated images (seed 0, EMA G), each channel classified by the "
                        "project's MNIST classifier; KL(p || uniform over 1,000 modes) in nats",
            "results": results}
