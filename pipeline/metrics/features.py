"""Feature extractors for FID/KID, served by name from one registry.

    ext = get_extractor("mnist", device="cpu")        # or "inception"
    feats = ext(images_uint8_nchw)                    # (N, ext.dim) float32 numpy

Every extractor follows clean-fid's protocol: uint8 images (grey is repeated to RGB, as clean-fid's
`convert('RGB')` does) go through clean-fid's "clean" resize (PIL bicubic on each float32
channel, no re-quantisation) to the network's input side, and the network receives float
(B, 3, S, S) in [0, 255], the `custom_feat_extractor` contract. So the same `ext.net` can be
handed to `cleanfid.fid.compute_fid(custom_feat_extractor=...)` and gives the same numbers.

- `inception`: clean-fid's torchscript Inception-V3 (`InceptionV3W`, 2048-d pool features, the
  network behind published FIDs), loaded from a local file, never downloaded (clean-fid would
  fetch it into /tmp without a checksum). Path: `--inception-weights PATH`, else the
  `GANPIPE_INCEPTION_WEIGHTS` environment variable, else clean-fid's own location.
- `mnist`: the project's own 64-d digit embedding (`mnist_net.py`), weights committed, so
  FID-style evaluation is real on machines without network.
"""

from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.io import sha256_file
from pipeline.registry import Registry

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")   # the file clean-fid 0.1.35 downloads (downloads_helper.py)
INCEPTION_ENV = "GANPIPE_INCEPTION_WEIGHTS"

# name -> build(device, weights=None) -> Extractor
EXTRACTORS = Registry("feature extractor")


@dataclass
class Extractor:
    """A feature network plus the protocol facts every score must carry."""
    name: str
    net: nn.Module              # float (B, 3, size, size) in [0, 255] on `device` -> (B, dim)
    dim: int                    # feature length
    size: int                   # square input side in pixels after the clean resize
    weights: str                # weights file the network was loaded from
    weights_sha256: str
    device: torch.device
    default_num_gen: int        # generated images per score when the user gives none

    @property
    def resize(self) -> str:
        """Protocol tag of the resize: clean-fid 'clean' mode (PIL bicubic, float) to size x size."""
        return f"clean{self.size}"

    def protocol(self) -> dict:
        return {"extractor": self.name, "extractor_sha256": self.weights_sha256, "feature_dim": self.dim,
                "resize": self.resize}

    def resizer(self) -> Callable[[np.ndarray], np.ndarray]:
        """clean-fid's own resize function for this input side (HWC RGB -> HWC float32)."""
        from cleanfid.resize import make_resizer

        return make_resizer("PIL", False, "bicubic", (self.size, self.size))

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, 1|3, H, W) -> float (B, 3, size, size) in [0, 255], exactly as clean-fid does it."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (B, 1|3, H, W), got shape {images.shape}")
        if images.shape[1] == 1:
            images = np.repeat(images, 3, axis=1)
        if images.shape[2:] == (self.size, self.size):
            # PIL returns an unchanged copy for a same-size resize (checked in the tests), so skip it:
            # it costs ~0.3 ms per image, more than the mnist network itself.
            return torch.from_numpy(images.astype(np.float32))
        fn = self.resizer()
        out = np.stack([fn(img.transpose(1, 2, 0)) for img in images])
        return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) numpy -> float32 (B, dim) numpy features."""
        batch = self.prepare(images).to(self.device)
        return self.net(batch).float().cpu().numpy()


def get_extractor(name: str, device: str | torch.device = "cpu", weights: str | Path | None = None) -> Extractor:
    """Build the extractor registered as `name` (a ConfigError lists the names if unknown)."""
    return EXTRACTORS.get(name)(device=torch.device(device), weights=weights)


# ---------------------------------------------------------------------------------------------
# inception

def default_inception_path() -> Path:
    """Where clean-fid itself keeps the file (features.py: './' on Windows, else /tmp)."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def inception_path(weights: str | Path | None = None) -> Path:
    """The weights file to use: the argument, else $GANPIPE_INCEPTION_WEIGHTS, else clean-fid's path."""
    chosen = weights or os.environ.get(INCEPTION_ENV) or default_inception_path()
    path = Path(chosen).expanduser()
    return path / INCEPTION_FILE if path.is_dir() else path


def _missing_inception(path: Path) -> str:
    return (f"Inception weights file {path} not found; the inception extractor needs {INCEPTION_FILE} "
            f"(the file clean-fid downloads): on a machine with network run "
            f"`curl -L -o {INCEPTION_FILE} {INCEPTION_URL}`, copy it to {path} (or anywhere, and point "
            f"--inception-weights or ${INCEPTION_ENV} at it); nothing is downloaded at run time. "
            f"For MNIST-like data `--extractor mnist` works offline")


@EXTRACTORS.register("inception")
def build_inception(device: torch.device, weights: str | Path | None = None) -> Extractor:
    from pipeline.errors import UserError

    path = inception_path(weights)
    if not path.is_file():
        raise UserError(_missing_inception(path))
    if path.name != INCEPTION_FILE:
        # InceptionV3W takes a directory and appends the fixed file name.
        raise UserError(f"Inception weights file {path}: clean-fid loads it by its original name; rename it "
                        f"or link it as {path.parent / INCEPTION_FILE}")
    from cleanfid.inception_torchscript import InceptionV3W

    try:
        with warnings.catch_warnings():   # torch 2.x deprecates torch.jit.load, which clean-fid uses
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
            net = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    except RuntimeError as exc:   # a truncated download: "PytorchStreamReader failed reading zip archive"
        raise UserError(f"Inception weights file {path} cannot be loaded ({str(exc).splitlines()[0][:160]}); "
                        f"it is probably an interrupted download: fetch it again from {INCEPTION_URL}") from None
    net = net.to(device).eval().requires_grad_(False)
    return Extractor("inception", net, 2048, 299, str(path), sha256_file(path), device, 50_000)


# ---------------------------------------------------------------------------------------------
# mnist

@EXTRACTORS.register("mnist")
def build_mnist(device: torch.device, weights: str | Path | None = None) -> Extractor:
    from pipeline.errors import UserError
    from pipeline.metrics.mnist_net import FEATURE_DIM, INPUT_SIZE, WEIGHTS, load_mnist_net

    path = Path(weights or WEIGHTS)
    if not path.is_file():
        raise UserError(f"mnist extractor weights {path} not found; they ship with ganpipe "
                        f"(pipeline/metrics/weights/); rebuild them with `python -m "
                        f"pipeline.metrics.train_mnist_extractor --out {path}`")
    net, _ = load_mnist_net(path)
    return Extractor("mnist", net.to(device), FEATURE_DIM, INPUT_SIZE, str(path), sha256_file(path),
                     device, 10_000)
