"""Run the real `ganpipe` CLI with faults injected from outside the production code.

    python tests/faults.py nan-d-steps=2,5 -- train --config ... --run-dir ...

`nan-d-steps=K,...`: D's main loss becomes NaN at the given D steps (counted from 0; with one
micro-batch per step, the k-th call of the loss's `d_loss` is D step k). The patch wraps
`pipeline.losses.build_loss` before the trainer imports it; nothing in `pipeline/` knows of it.
`enospc-checkpoint=N`: the N-th checkpoint file write (from 1) stops half-way with "No space left
on device", as on a full disk, and so does every later one.
`slow-checkpoint=SECONDS`: every checkpoint file write first sleeps that long.
`slow-generate=SECONDS`: every call of `pipeline.generate.images` first sleeps that long (an
evaluation that is busy when a signal comes).
"""

from __future__ import annotations

import itertools
import sys


def inject_nan_d_steps(steps: set[int]) -> None:
    import pipeline.losses as losses

    build = losses.build_loss

    def build_loss(loss_cfg):
        loss = build(loss_cfg)
        d_loss, calls = loss.d_loss, itertools.count()

        def poisoned(real_logits, fake_logits):
            value = d_loss(real_logits, fake_logits)
            return value * float("nan") if next(calls) in steps else value

        loss.d_loss = poisoned
        return loss

    losses.build_loss = build_loss


def enospc_checkpoint(n: int) -> None:
    import errno
    import os

    import pipeline.training.checkpoint as checkpoint

    write, calls = checkpoint._write, itertools.count(1)

    def full(obj, path):
        if next(calls) < n:
            return write(obj, path)
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)          # what fitted before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    checkpoint._write = full


def slow_checkpoint(seconds: float) -> None:
    import time

    import pipeline.training.checkpoint as checkpoint

    write = checkpoint._write

    def slow(obj, path):
        time.sleep(seconds)
        return write(obj, path)

    checkpoint._write = slow


def slow_generate(seconds: float) -> None:
    import time

    import pipeline.generate as generate

    images = generate.images

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return images(*args, **kwargs)

    generate.images = slow


def main(argv: list[str]) -> int:
    split = argv.index("--")
    for fault in argv[:split]:
        name, _, value = fault.partition("=")
        if name == "nan-d-steps":
            inject_nan_d_steps({int(v) for v in value.split(",")})
        elif name == "enospc-checkpoint":
            enospc_checkpoint(int(value))
        elif name == "slow-checkpoint":
            slow_checkpoint(float(value))
        elif name == "slow-generate":
            slow_generate(float(value))
        else:
            raise SystemExit(f"unknown fault {fault!r}")
    from pipeline.cli import main as cli_main

    return cli_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
