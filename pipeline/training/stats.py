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
    """Rank 0's sink: one JSON line per tick in RUN/stats.jsonl plus TensorBoard scalars (unless
    `tensorboard` is off) plus the scalars and grids for `trackers` (trackers.RunTrackers)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_nimg: int = 0, tensorboard: bool = True,
                 trackers=None):
        self.enabled = enabled
        self.path = RunDir(run_dir).stats
        self.tb = None
        self.trackers = trackers
        if enabled and self.path.is_file():
            self._drop_rows_after(resume_nimg)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(RunDir(run_dir).tb))

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
        if self.tb is not None:
            for name, value in row.items():
                if isinstance(value, (int, float)) and "/" in name:
                    self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if self.trackers is not None:
            self.trackers.log(row, step)

    def image(self, name: str, png: Path, step: int) -> None:
        """A sample grid from its PNG file, into TensorBoard and the other trackers. TensorBoard
        gets the file's bytes as they are: `add_image` would decode nothing but encode the grid
        again (35 ms for 64 digits, 2.7 s for 64 images of 256 px on this project's CPU)."""
        if not self.enabled:
            return
        if self.tb is not None:
            from PIL import Image
            from tensorboard.compat.proto.summary_pb2 import Summary

            data = Path(png).read_bytes()
            with Image.open(png) as img:
                width, height, bands = img.width, img.height, len(img.getbands())
            image = Summary.Image(height=height, width=width, colorspace=bands, encoded_image_string=data)
            self.tb.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)
            self.tb.flush()
        if self.trackers is not None:
            self.trackers.image(name, png, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.trackers is not None:
            self.trackers.close()
