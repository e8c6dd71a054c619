"""Pieces shared by the network families: parameter counts, resolution plans, conditioning."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.errors import ConfigError


def param_count(module: nn.Module) -> int:
    """Trainable numbers in `module` (spectral norm's u/v vectors are buffers, so not counted)."""
    return sum(p.numel() for p in module.parameters())


class Network(nn.Module):
    """Base of every G and D: attributes the trainer reads, and `num_params()`."""

    z_dim: int = 0
    num_classes: int = 0        # 0 = unconditional
    resolution: int = 0         # image side in pixels; 0 = flat vectors of `channels` numbers
    channels: int = 0

    def __init__(self, *, resolution: int = 0, channels: int = 0, num_classes: int = 0, z_dim: int = 0,
                 family: str | None = None, resolutions: tuple[int, ...] = ()):
        """Record the shape the trainer reads; a `family` with fixed `resolutions` checks it first."""
        super().__init__()
        if family is not None:
            check_resolution(family, resolution, resolutions)
        self.z_dim, self.num_classes, self.resolution, self.channels = z_dim, num_classes, resolution, channels

    def num_params(self) -> int:
        return param_count(self)

    @property
    def mixes_batch(self) -> bool:
        """Whether one sample's output depends on the others in its batch (BatchNorm in training
        mode, minibatch stddev): then D(cat([a, b])) is not cat([D(a), D(b)]), and the trainer
        keeps reals and fakes in separate forwards (`speed.joint_d_forward`)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def noise_shapes(self) -> list[tuple[int, ...]]:
        """Shapes (without the batch dimension) of the per-image noise inputs a G takes as
        `G(z, labels, noise=[...])`, in order; [] for networks without noise inputs, which accept
        `noise=` and ignore it so that `pipeline.generate` calls every G the same way."""
        return []

    def _check_labels(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Labels for a conditional network; an unconditional one ignores them (data may be labelled)."""
        if not self.num_classes:
            return None
        if labels is None:
            raise ValueError(f"{type(self).__module__}.{type(self).__name__} is class-conditional "
                             f"({self.num_classes} classes): pass labels")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        return labels.long()

    def _latent_with_label(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """z, with the label's learned embedding `self.embed` concatenated for a conditional G
        (Mirza & Osindero 2014), as the mlp and dcgan generators take it."""
        labels = self._check_labels(z, labels)
        return z if labels is None else torch.cat([z, self.embed(labels).to(z.dtype)], 1)


def sn(module: nn.Module, enabled: bool) -> nn.Module:
    """torch's own spectral norm (Miyato et al. 2018), one power iteration per training forward."""
    return spectral_norm(module) if enabled else module


def check_resolution(family: str, resolution: int, allowed: tuple[int, ...]) -> None:
    if resolution not in allowed:
        what = "flat (vector) data" if resolution == 0 else f"resolution {resolution}"
        raise ConfigError(f"model.name: {family} does not support {what}; supported resolutions: "
                          f"{', '.join(map(str, allowed))} (prepare the data at one of these sizes, "
                          f"or choose another model.name)")


def resolution_plan(resolution: int) -> tuple[int, int]:
    """(start side, number of 2x steps): 28 = 7·2², so MNIST needs no padding; others start at 4."""
    start = 7 if resolution % 7 == 0 else 4
    steps = round(math.log2(resolution / start))
    assert start * 2 ** steps == resolution, resolution
    return start, steps


def scaled(width: int, multiplier: float) -> int:
    """A published layer width times the config's width multiplier, at least 1."""
    return max(1, round(width * multiplier))


def projection(h: torch.Tensor, embed: nn.Module, labels: torch.Tensor | None) -> torch.Tensor | float:
    """Projection discriminator term <embed(y), h> (Miyato & Koyama 2018); 0 if unconditional.

    Used by every family's D: it conditions D through a label embedding without widening its input,
    and the gradient penalties stay per-sample.
    """
    if labels is None:
        return 0.0
    return (embed(labels) * h).sum(1)


@functools.lru_cache(maxsize=None)
def separable_filter(taps: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (k, k) 2-D filter of 1-D `taps`, normalised to sum 1 (computed in float32), made once per
    device and dtype: building it from a Python list in every forward copied host memory to the GPU
    each time, a host synchronisation in every step (`make gpu-check` found it under sync debug
    mode). Made outside inference mode, so a kernel first built while sampling still trains."""
    with torch.inference_mode(False):
        k = torch.tensor(taps, dtype=torch.float32, device=device)
        k = k[:, None] * k[None, :]
        return (k / k.sum()).to(dtype)
