"""Every sample of one manifest split, once, in manifest order: the input of reference statistics
and of the MNIST feature net, where a skipped sample would silently change the result.

    for images, labels in iter_split("data/mnist", "test", batch_size=250):   # uint8 NCHW, int64
        ...
    images, labels = read_split("data/mnist", "test")                        # a small split at once

Unlike the training loader (which skips and counts bad samples), a bad sample or a truncated shard
here is an error naming the shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data.manifest import read_manifest, shard_path
from pipeline.data.shards import bad_sample, read_samples
from pipeline.errors import TruncatedTar, UserError, printable


def iter_split(data_dir: str | Path, split: str, batch_size: int = 250
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images (B, C, H, W), int64 labels (B,)) batches of every sample of `split`."""
    data_dir = Path(data_dir)
    m = read_manifest(data_dir)
    where = printable(str(data_dir))
    if split not in m["splits"]:
        raise UserError(f"{where}: no split '{printable(split)}' in the manifest (has: "
                        f"{printable(', '.join(m['splits']))}); choose --split, or re-prepare with --holdout N "
                        "for a test split")
    shape = dict(channels=m["channels"], resolution=m["resolution"], num_classes=m["num_classes"])
    images, labels = [], []
    for shard in m["splits"][split]["shards"]:
        path = shard_path(data_dir, shard)
        try:
            for _, key, image, label, bad in read_samples(open(path, "rb"), str(path), **shape,
                                                          require_label=False):
                if bad is not None:
                    raise UserError(f"{printable(str(path))} {bad_sample(key, bad)}; split "
                                    f"'{printable(split)}' is read whole (every sample counts): run "
                                    f"`ganpipe verify {where}` and re-prepare the data")
                images.append(image)
                labels.append(label)
                if len(images) == batch_size:
                    yield np.stack(images), np.asarray(labels, dtype=np.int64)
                    images, labels = [], []
        except (TruncatedTar, OSError) as exc:
            # TruncatedTar names the shard printably already; an OSError's file name is raw
            cause = exc if isinstance(exc, TruncatedTar) else printable(str(exc))
            raise UserError(f"{printable(str(path))}: {cause}; split '{printable(split)}' is read "
                            f"whole (every sample counts): run `ganpipe verify {where}` and re-prepare the data") from None
    if images:
        yield np.stack(images), np.asarray(labels, dtype=np.int64)


def read_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of a (small) split in memory."""
    parts = list(iter_split(data_dir, split, batch_size=1000))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
