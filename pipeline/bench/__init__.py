"""`ganpipe bench NAME`: measurements printed as JSON, with the hardware and the command.

    ganpipe bench loader          # streaming loader vs a plain in-memory DataLoader
    ganpipe bench networks        # params, FLOPs and fwd+bwd throughput of every network

Each benchmark module provides `run(args) -> dict`; its arguments are defined in `pipeline.cli`
(`BENCHMARKS`), so `cli.main(["bench", "loader", ...])` works from Python as from the shell.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform


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


def bench_command(args: argparse.Namespace) -> int:
    result = importlib.import_module(args._bench_module).run(args)
    report = {"benchmark": args.bench, "command": "ganpipe " + " ".join(getattr(args, "_argv", [])),
              "hardware": hardware(), **result}
    print(json.dumps(report, indent=2))
    return 0
