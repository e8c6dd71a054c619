"""Generators and discriminators, served by config name from one registry.

    G, D = build_networks(cfg.model, resolution=32, channels=3, num_classes=10)
    images = G(z, labels)          # (N, C, H, W) in [-1, 1]; flat data: (N, C); see stylegan2 below
    logits = D(images, labels)     # (N,), no sigmoid

Every G has `z_dim`, `num_classes` (0 = unconditional), `resolution` (0 = flat vectors of
`channels` numbers, `mlp` only) and `channels`; G and D have `num_params()`. An unconditional
network ignores labels; a conditional one requires them. Every G also takes `G(z, labels,
noise=[...])` with the per-image noise maps of `G.noise_shapes()` (stylegan2; [] elsewhere, where
`noise` is ignored), so `pipeline.generate` can seed each image's noise itself. Families:

- `mlp`: fully connected GAN (Goodfellow et al. 2014), any resolution and flat data.
- `dcgan`: Radford et al. 2016, 28/32/64/128/256 pixels, optional spectral norm in D.
- `resnet`: SNGAN/BigGAN residual networks, spectral norm in D, conditional BN + projection D.
- `biggan`: Brock et al. 2019, 32/64/128/256 pixels: hierarchical z and a shared class embedding
  feeding linear conditional BN, self-attention at `model.attention_res`, spectral norm in G and
  D, orthogonal init; `G.truncate_z(z, threshold)` for the truncation trick.
- `stylegan2`: Karras et al. 2020, mapping network, modulated convs, skip G, residual D. Its G
  clamps to [-1, 1] in eval mode only; in training mode it returns the raw output, as the paper.
- `r3gan`: Huang et al. 2024 (R3GAN's backbone), residual blocks with grouped convs and fix-up
  initialisation, no normalisation; 28/32/64/128/256 pixels. Eval-mode clamp as stylegan2.

Class conditioning: G takes a label embedding (concatenated to z for mlp/dcgan/r3gan, conditional
BatchNorm for resnet, with the z chunks for biggan, into the mapping network for stylegan2);
every D is a projection discriminator (Miyato & Koyama 2018).
"""

from __future__ import annotations

from torch import nn

from pipeline.errors import ConfigError
from pipeline.networks import biggan, dcgan, mlp, r3gan, resnet, stylegan2
from pipeline.networks.base import param_count
from pipeline.registry import Registry

# name -> build(model_cfg, *, resolution, channels, num_classes) -> (G, D)
NETWORKS = Registry("network")
NETWORKS.register("mlp")(mlp.build)
NETWORKS.register("dcgan")(dcgan.build)
NETWORKS.register("resnet")(resnet.build)
NETWORKS.register("biggan")(biggan.build)
NETWORKS.register("stylegan2")(stylegan2.build)
NETWORKS.register("r3gan")(r3gan.build)


def build_networks(model_cfg, *, resolution: int, channels: int,
                   num_classes: int) -> tuple[nn.Module, nn.Module]:
    """G and D for `model_cfg` (a `ModelConfig`) and the data's shape and class count.

    `num_classes` is the data's class count; it is used only when `model_cfg.conditional` is set.
    """
    if model_cfg.conditional and num_classes < 2:
        raise ConfigError(f"model.conditional: a conditional model needs labelled data with at least "
                          f"2 classes, the data has {num_classes}; set model.conditional=false")
    if channels < 1:
        raise ConfigError(f"the data has {channels} channels; a network needs at least 1")
    build = NETWORKS.get(model_cfg.name)
    return build(model_cfg, resolution=resolution, channels=channels,
                 num_classes=num_classes if model_cfg.conditional else 0)


__all__ = ["NETWORKS", "build_networks", "param_count"]
