"""Run the real `ganpipe` CLI with faults injected from outside the production code.

    python tests/faults.py nan-d-steps=2,5 -- train --config ... --run-dir ...

`nan-d-steps=K,...`: D's main loss becomes NaN at the given D steps (counted from 0; with one
micro-batch per step, the k-th call of the loss's `d_loss` is D step k). The patch wraps
`pipeline.losses.build_loss` before the trainer imports it; nothing in `pipeline/` knows of it.
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


def main(argv: list[str]) -> int:
    split = argv.index("--")
    for fault in argv[:split]:
        name, _, value = fault.partition("=")
        if name == "nan-d-steps":
            inject_nan_d_steps({int(v) for v in value.split(",")})
        else:
            raise SystemExit(f"unknown fault {fault!r}")
    from pipeline.cli import main as cli_main

    return cli_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
