"""What gloo's all-reduce costs for gradients of given sizes, in the processes `bench train` starts.

    accelerate launch --multi_gpu --num_processes 2 -m pipeline.bench.allreduce OUT.json NUMEL [NUMEL ...]

Each process starts the process group as the trainer does (`dist.init_process_group`), then times
20 all-reduces of a float32 tensor of each size (after 3 untimed ones); rank 0 writes
{numel: milliseconds per all-reduce} to OUT.json. One thread per process, as in the 2 x 1 runs.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from pipeline import dist
from pipeline.io import write_json_atomic


def measure(sizes: list[int], reps: int = 20) -> dict[str, float]:
    out = {}
    for numel in sizes:
        x = torch.randn(numel)
        for _ in range(3):
            dist.all_reduce_sum(x)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce_sum(x)
        out[str(numel)] = round((time.perf_counter() - t0) / reps * 1000, 3)
    return out


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    dist.init_process_group(torch.device("cpu"))
    result = measure([int(n) for n in argv[1:]])
    if dist.is_main():
        write_json_atomic(argv[0], result)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
