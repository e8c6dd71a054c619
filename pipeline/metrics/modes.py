"""Mode coverage on StackedMNIST (Metz et al. 2017; VEEGAN, PacGAN and R3GAN report it).

    counts = mode_counts(G, num=25_600, seed=0)      # histogram over the 1,000 modes
    summary(counts)  # {"modes": 997, "kl_to_uniform": 0.08, ...}

Every generated RGB image is split into its three channels; the project's MNIST classifier
(`pipeline.metrics.mnist_net`, the `mnist` extractor's network) reads each channel as a digit,
and the mode is 100 x red + 10 x green + blue. The KL divergence is KL(p || uniform) of the
empirical mode histogram p: sum_m p_m log(1000 p_m), 0 for a perfectly even histogram, log 1000
(6.9) for a single mode. It splits exactly into the three channels' own KLs (each channel's digit
frequencies against uniform over 10: `channel_kl`) plus the dependence between the channels (their
total correlation, `dependence_kl`), so a summary says whether a generator's excess comes from
favouring some digits or from coupling the channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline import generate
from pipeline.metrics.mnist_net import load_mnist_net

NUM_MODES = 1000


def classify_channels(images: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
    """(N, 3, 28, 28) images in [-1, 1] -> (N,) mode indices 0..999."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (28, 28):
        raise ValueError(f"StackedMNIST images are (N, 3, 28, 28); got {tuple(images.shape)}")
    pixels = (images.float().clamp(-1, 1) + 1) * 127.5                   # the classifier reads 0..255
    digits = torch.stack([net.logits(pixels[:, c:c + 1]).argmax(1) for c in range(3)], 1)
    return digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2]


def mode_counts(G: torch.nn.Module, *, num: int, seed: int = 0, batch: int = 512,
                net: torch.nn.Module | None = None) -> np.ndarray:
    """Histogram (1,000 counts) of the modes of images 0..num-1 of `seed` (`pipeline.generate`)."""
    net = net if net is not None else load_mnist_net()[0]
    counts = np.zeros(NUM_MODES, dtype=np.int64)
    for start in range(0, num, batch):
        x = generate.images(G, seed=seed, start=start, count=min(batch, num - start))
        with torch.no_grad():
            modes = classify_channels(x, net)
        counts += np.bincount(modes.numpy(), minlength=NUM_MODES)
    return counts


def kl_to_uniform(counts: np.ndarray) -> float:
    """KL(p || uniform over len(counts)) of the histogram, in nats."""
    p = counts / counts.sum()
    nz = p[p > 0]
    return float((nz * np.log(nz * len(counts))).sum())


def summary(counts: np.ndarray) -> dict:
    kl = kl_to_uniform(counts)
    cube = counts.reshape(10, 10, 10)                       # [red, green, blue] digit
    channel = [kl_to_uniform(cube.sum(axis=tuple(a for a in range(3) if a != c))) for c in range(3)]
    return {"modes": int((counts > 0).sum()), "of": len(counts), "kl_to_uniform": round(kl, 4),
            "channel_kl": [round(k, 4) for k in channel], "dependence_kl": round(kl - sum(channel), 4),
            "samples": int(counts.sum()), "max_share": round(float(counts.max() / counts.sum()), 5),
            "kl_of_one_mode": round(math.log(len(counts)), 4)}
