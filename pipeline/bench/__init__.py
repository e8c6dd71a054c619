"""`ganpipe bench NAME`: measurements printed as JSON, with the hardware and the command.

    ganpipe bench loader          # streaming loader vs a plain in-memory DataLoader
    ganpipe bench networks        # params, FLOPs and fwd+bwd throughput of every network

Each benchmark module provides `add_arguments(parser)` and `run(args) -> dict`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

# name -> (module, help). Imported lazily so one benchmark's imports never slow another.
BENCHMARKS = {
    "loader": ("pipeline.bench.loader", "streaming shard loader vs a plain in-memory DataLoader"),
    "networks": ("pipeline.bench.networks", "params, FLOPs and fwd+bwd images/s of every network"),
    "train": ("pipeline.bench.train", "full trainer vs a bare PyTorch loop; 1x2 vs 2x1 processes x threads"),
    "eval": ("pipeline.bench.eval", "snapshot scoring throughput vs clean-fid's own compute_fid"),
}


def hardware() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    chosen = next((a for a in sys.argv[2:] if a in BENCHMARKS), None)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    result = importlib.import_module(BENCHMARKS[args.bench][0]).run(args)
    report = {"benchmark": args.bench, "command": "ganpipe " + " ".join(sys.argv[1:]),
              "hardware": hardware(), **result}
    print(json.dumps(report, indent=2))
    return 0
