"""`ganpipe bench networks`: size, FLOPs and training throughput of every network on this machine.

    ganpipe bench networks                                   # every network at 32 pixels
    ganpipe bench networks --networks dcgan resnet --resolutions 32 64 --batch 32 --iters 5

Per network and resolution: parameters of G and D; forward FLOPs per image as
torch.utils.flop_counter counts them (matrix multiplies and convolutions, 2 FLOPs per
multiply-add; elementwise ops are not counted); images/s of one training-like step (G forward,
D forward, backward through both); and the GFLOP/s that step achieves, also as a fraction of a
large fp32 matrix multiply timed in the same run (a practical peak for this CPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.networks import build_networks




def matmul_gflops(n: int, reps: int = 10) -> float:
    """Best-of-`reps` GFLOP/s of an n x n fp32 matrix multiply."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def _step(G, D, z, labels) -> None:
    G.zero_grad(set_to_none=True)
    D.zero_grad(set_to_none=True)
    D(G(z, labels), labels).sum().backward()


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(name: str, resolution: int, args: argparse.Namespace) -> dict:
    cfg = ModelConfig(name=name, g_width=args.width, d_width=args.width, conditional=args.classes > 0)
    row: dict = {"network": name, "resolution": resolution}
    try:
        G, D = build_networks(cfg, resolution=resolution, channels=args.channels, num_classes=args.classes)
    except ConfigError as exc:
        return {**row, "skipped": str(exc)}

    def inputs(n: int):
        labels = torch.arange(n) % args.classes if args.classes else None
        return torch.randn(n, G.z_dim), labels

    # FLOPs scale with the batch; count on 2 images (BatchNorm needs more than one) and halve.
    # Counted with autograd on: FlopCounterMode's module hooks fail under no_grad.
    z, labels = inputs(2)
    g_flops = _flops(lambda: G(z, labels)) / 2
    x = G(z, labels).detach()
    d_flops = _flops(lambda: D(x, labels)) / 2
    step_flops = _flops(lambda: _step(G, D, z, labels)) / 2

    z, labels = inputs(args.batch)
    # Warm up until two steps take about as long (oneDNN builds its kernels over the first few).
    previous = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        _step(G, D, z, labels)
        took = time.perf_counter() - start
        if took > 0.8 * previous:
            break
        previous = took
    start = time.perf_counter()
    for _ in range(args.iters):
        _step(G, D, z, labels)
    seconds = time.perf_counter() - start
    images_per_s = args.batch * args.iters / seconds
    return {**row,
            "g_params": G.num_params(), "d_params": D.num_params(),
            "g_forward_gflop_per_image": round(g_flops / 1e9, 4),
            "d_forward_gflop_per_image": round(d_flops / 1e9, 4),
            "step_gflop_per_image": round(step_flops / 1e9, 4),
            "images_per_s": round(images_per_s, 2),
            "achieved_gflop_per_s": round(step_flops * images_per_s / 1e9, 2)}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    before = matmul_gflops(args.matmul_size)
    rows = [measure(name, resolution, args) for name in args.networks for resolution in args.resolutions]
    # Timed before and after the networks; the better figure is the reference (less disturbed by
    # whatever else ran on the machine meanwhile).
    peak = max(before, matmul_gflops(args.matmul_size))
    for row in rows:
        if "achieved_gflop_per_s" in row:
            row["fraction_of_matmul"] = round(row["achieved_gflop_per_s"] / peak, 3)
    return {"settings": {"batch": args.batch, "iters": args.iters, "width": args.width,
                         "channels": args.channels, "classes": args.classes,
                         "step": "G forward + D forward + backward through both, fp32"},
            "matmul": {"size": args.matmul_size, "gflop_per_s": round(peak, 2)},
            "networks": rows}
