"""The `ganpipe` command (also `python -m pipeline`): parses, validates, then hands over.

    ganpipe prepare --source mnist --out data/mnist --holdout 1000
    ganpipe verify data/mnist
    ganpipe bench loader

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args)`;
this file only wires them together and turns known errors into one clear line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.config import ConfigError
from pipeline.errors import DataError, TrainingError, UserError

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "prepare": ("pipeline.data.prepare", "turn an image collection into webdataset shards + manifest"),
    "verify": ("pipeline.data.verify", "re-hash and decode every shard of a prepared directory"),
    "train": ("pipeline.training.command", "train a GAN (resumes RUN automatically); see configs/"),
    "sample": ("pipeline.training.sample", "write images or a grid from a snapshot"),
    "refstats": ("pipeline.metrics.refstats", "compute and cache reference feature statistics of a data split"),
    "eval": ("pipeline.metrics.evaluate", "score snapshots of a run (FID/KID) and record the protocol"),
    "watch": ("pipeline.metrics.watch", "score each new snapshot of a run once, until training finishes"),
    "config": ("pipeline.config", "print the resolved config of a YAML file plus key=value overrides"),
    "bench": ("pipeline.bench", "run a benchmark and print its measurements as JSON"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (start-up stays fast)."""
    parser = argparse.ArgumentParser(prog="ganpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        status = importlib.import_module(args._module).run(args)
    except (UserError, ConfigError, DataError, FileNotFoundError, FileExistsError) as exc:
        print(f"ganpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"ganpipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    raise SystemExit(main())
