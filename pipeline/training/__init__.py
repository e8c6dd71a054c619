"""Training: the loop, EMA, checkpoints and snapshots, per-tick statistics."""
