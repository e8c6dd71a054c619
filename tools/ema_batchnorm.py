"""The EMA generator's BatchNorm statistics side by side, from one run (issue 23, item 2).

    python tools/ema_batchnorm.py runs/mnist_rpgan --out runs/ema-bn      # the newest checkpoint
    for v in copied averaged standing; do
        ganpipe eval --run-dir runs/ema-bn/$v --all --extractor mnist --num-gen 5000; done

From the run's newest checkpoint (G, G_ema) it writes three run directories, each holding one
snapshot of the same EMA weights with other BatchNorm statistics:

- `copied`: the raw G's running statistics, what ganpipe did before (and what a plain weight EMA
  that copies buffers does): statistics that belong to other weights;
- `averaged`: the EMA's own averaged statistics (the trainer's snapshot now);
- `standing`: statistics recomputed from 16 batches of the EMA G's own samples (BigGAN's standing
  statistics, `ema.standing_stats: 16`).

Each directory copies the run's config.yaml, so `ganpipe eval` scores it under the run's protocol.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory with a checkpoint of a BatchNorm generator")
    parser.add_argument("--out", type=Path, required=True, help="where the three run directories go")
    parser.add_argument("--batches", type=int, default=16, help="standing statistics: batches of G's samples")
    args = parser.parse_args(argv)
    import torch

    from pipeline.catalog import load_config
    from pipeline.config import ModelConfig, build_dataclass
    from pipeline.rundir import RunDir
    from pipeline.training.checkpoint import list_checkpoints
    from pipeline.training.ema import batchnorms, standing_stats
    from pipeline.training.snapshot import SnapshotInfo, build_generator, list_snapshots, read_snapshot_meta, save_snapshot

    run = RunDir(args.run)
    ckpt = list_checkpoints(args.run)[-1]
    state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    meta = next(m for m in map(read_snapshot_meta, list_snapshots(run.snapshots)) if m["cur_nimg"] == state["cur_nimg"])
    G_ema = build_generator(meta)
    G_ema.load_state_dict(state["G_ema"])
    G_ema.eval()
    if not batchnorms(G_ema):
        print(f"{args.run}: its generator has no BatchNorm: nothing to compare", file=sys.stderr)
        return 2
    copied = copy.deepcopy(G_ema)
    raw = {k: v for k, v in state["G"].items() if "running_" in k or "num_batches_tracked" in k}
    missing, _ = copied.load_state_dict(raw, strict=False)
    assert not any("running_" in k for k in missing), missing
    batch = load_config(run.config).data.batch_size
    variants = {"copied": copied, "averaged": G_ema,
                "standing": standing_stats(G_ema, args.batches, batch, seed=0, device=torch.device("cpu"))}
    info = SnapshotInfo(model=build_dataclass(ModelConfig, meta["model"], "model"), resolution=meta["resolution"],
                        channels=meta["channels"], num_classes=meta["num_classes"],
                        extra={k: meta[k] for k in ("config_hash", "data_path") if k in meta})
    for name, G in variants.items():
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run.config, out / run.config.name)
        path = save_snapshot(G, out / run.snapshots.name, cur_nimg=state["cur_nimg"], info=info)
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
