"""Stand-ins shared by tests: things the real ones cannot be here (the Inception weights file
cannot be downloaded on this machine).

    from stubs import inception_stub
    weights = inception_stub(tmp_path / "w" / INCEPTION_FILE)                   # seeded random features
    forged = inception_stub(tmp_path / INCEPTION_FILE, constant=True)          # every image the same
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class _PooledLayers(nn.Module):
    """(B, 3, H, W) -> (B, 2048): a 4x4 average pool and a linear layer, so features follow the image."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(48, 2048)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


class _ConstantLayers(nn.Module):
    """(B, ...) -> ones (B, 2048): every image has the same features, so every FID is 0."""

    def forward(self, x):
        return torch.ones(x.shape[0], 2048)


class _Inception(nn.Module):
    """The interface of the real TorchScript file (clean-fid's InceptionV3W calls `.layers`)."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def inception_stub(path: Path, *, constant: bool = False) -> Path:
    """Write a TorchScript stand-in for the Inception weights file at `path` (its parent made if
    needed); returns `path`. `constant`: the adversary's file, whose features never change. The
    other's weights are drawn after `torch.manual_seed(0)`, so the file is the same every time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if constant:
        layers: nn.Module = _ConstantLayers()
    else:
        torch.manual_seed(0)
        layers = _PooledLayers()
    torch.jit.script(_Inception(layers)).save(str(path))
    return path
