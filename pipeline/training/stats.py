"""Report anywhere, reduce once per tick: `stats.report("Loss/D/main", loss)`.

Values are summed locally (detached, no host sync per call); at the tick boundary `reduce()`
averages every name across calls and across ranks in one collective, and `write()` sends the row to
`RUN/stats.jsonl` and TensorBoard on rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


class Stats:
    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def report(self, name: str, value) -> None:
        v = value.detach().float().mean() if torch.is_tensor(value) else torch.tensor(float(value))
        v = v.to(self.device)
        if name in self.sums:
            self.sums[name] += v
            self.counts[name] += 1
        else:
            self.sums[name] = v.clone()
            self.counts[name] = 1

    def reduce(self) -> dict[str, float]:
        """Means over this tick's reports, averaged over ranks; clears the accumulators."""
        names = sorted(self.sums)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, names)
            names = sorted(set().union(*everyone))
        zero = torch.zeros((), device=self.device)
        local = torch.stack([self.sums.get(n, zero) / max(self.counts.get(n, 1), 1) for n in names]) \
            if names else torch.zeros(0, device=self.device)
        present = torch.tensor([1.0 if n in self.sums else 0.0 for n in names], device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and names:
            packed = torch.cat([local, present])
            dist.all_reduce(packed)
            local, present = packed[:len(names)], packed[len(names):]
        means = (local / present.clamp(min=1)).tolist()
        self.sums.clear()
        self.counts.clear()
        return dict(zip(names, means))


class StatsWriter:
    """Rank 0's sink: one JSON line per tick in RUN/stats.jsonl plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "stats.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, row: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in row.items():
            if isinstance(value, (int, float)) and "/" in name:
                self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def image(self, name: str, grid: torch.Tensor, step: int) -> None:
        if self.enabled:
            self.tb.add_image(name, grid, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
