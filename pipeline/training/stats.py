"""Report anywhere, reduce once per tick: `stats.report("Loss/D/main", loss)`.

Values are summed locally (detached, no host sync per call); at the tick boundary `reduce()`
averages every name across calls and across ranks in one collective, and `write()` sends the row to
`RUN/stats.jsonl`, TensorBoard and the run's other trackers (W&B, MLflow: trackers.py) on rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import dist
from pipeline.io import write_text_atomic
from pipeline.rundir import RunDir


class Stats:
    """Sums and counts per name, kept on the device (no host sync per report). Non-finite values
    (an fp16 overflow step that the scaler skips) are left out of the means; the skipped steps are
    counted by the loop."""

    def __init__(self, device: torch.device):
        self.device = device
        self.acc: dict[str, torch.Tensor] = {}      # name -> tensor([sum, count])

    def report(self, name: str, value) -> None:
        v = value.detach().float().mean() if torch.is_tensor(value) else torch.tensor(float(value))
        v = v.to(self.device)
        finite = torch.isfinite(v)
        entry = torch.stack([torch.where(finite, v, torch.zeros_like(v)), finite.float()])
        if name in self.acc:
            self.acc[name] += entry
        else:
            self.acc[name] = entry

    def reduce(self) -> dict[str, float]:
        """Means over this tick's finite reports on all ranks (NaN if none); clears the sums."""
        names = sorted(set().union(*dist.all_gather_objects(sorted(self.acc))))
        if not names:
            return {}
        zero = torch.zeros(2, device=self.device)
        packed = dist.all_reduce_sum(torch.stack([self.acc.get(n, zero) for n in names]))
        sums, counts = packed[:, 0].tolist(), packed[:, 1].tolist()
        self.acc.clear()
        return {n: (s / c if c else float("nan")) for n, s, c in zip(names, sums, counts)}


class StatsWriter:
    """Rank 0's record of the ticks: one JSON line per tick in RUN/stats.jsonl, and the same row
    and each sample grid to the run's tracker sink (TensorBoard, W&B, MLflow: trackers.Sink)."""

    def __init__(self, run_dir: Path, enabled: bool, sink, resume_nimg: int = 0):
        self.enabled = enabled
        self.path = RunDir(run_dir).stats
        self.sink = sink
        if enabled and self.path.is_file():
            self._drop_rows_after(resume_nimg)

    def _drop_rows_after(self, nimg: int) -> None:
        """A run killed after its last checkpoint logged ticks that the resumed run logs again:
        keep only the rows up to the checkpoint (and drop a torn last line)."""
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("cur_nimg", 0) <= nimg:
                keep.append(line + "\n")
        write_text_atomic(self.path, "".join(keep))

    def write(self, row: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.sink.row(row, step)

    def image(self, name: str, png: Path, step: int) -> None:
        """A sample grid already written to `png`."""
        if self.enabled:
            self.sink.image(name, png, step)

    def close(self, failed: bool = False) -> None:
        self.sink.close(failed)
