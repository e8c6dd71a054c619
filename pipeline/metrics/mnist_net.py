"""The `mnist` feature extractor's network: a small digit classifier whose 64-d embedding serves
as FID features, and the loading of its committed weights.

Inception weights cannot be downloaded on offline machines, so the project trains its own
backbone for MNIST-like data (1 or 3 channels, 28x28 after clean-fid's resize): three 3x3 conv
blocks (16, 32, 64 maps, ReLU, 2x2 max-pool) -> a 64-d linear embedding -> 10 logits. The
embedding *before* its ReLU, scaled to unit variance per dimension on the training digits, is
the feature: no dead units, so the 64x64 covariance is full rank from a few hundred samples.
61k parameters, 240 KB of float32 weights, committed as
`pipeline/metrics/weights/mnist_features.safetensors` (its metadata holds the test accuracy and
how it was trained). tools/train_mnist_extractor.py reproduces them:

    python tools/train_mnist_extractor.py --out pipeline/metrics/weights/mnist_features.safetensors

    net, meta = load_mnist_net()        # eval mode, no grad; meta: the file's training record
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FEATURE_DIM = 64
INPUT_SIZE = 28
WEIGHTS = Path(__file__).resolve().parent / "weights" / "mnist_features.safetensors"


class MnistFeatureNet(nn.Module):
    """float (B, 1 or 3, 28, 28) in [0, 255] -> (B, 64) features; `logits()` for training."""

    def __init__(self):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten())  # 28->14->7->3
        self.embed = nn.Linear(64 * 3 * 3, FEATURE_DIM)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(FEATURE_DIM, 10))
        # Set after training so that real digits' features have unit variance per dimension on
        # average: FID and KID then land in familiar ranges instead of thousands.
        self.register_buffer("feature_scale", torch.ones(()))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        # Same input contract as clean-fid's custom_feat_extractor: pixels in [0, 255], RGB or grey.
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        x = (x / 255.0 - 0.1307) / 0.3081        # the usual MNIST normalisation
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) * self.feature_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(x))


def load_mnist_net(path: str | Path = WEIGHTS) -> tuple[MnistFeatureNet, dict]:
    """The trained network (eval mode, no grad) and the metadata stored with its weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    net = MnistFeatureNet()
    net.load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return net.eval().requires_grad_(False), meta
