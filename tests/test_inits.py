"""Published initialisations and width tables: DCGAN's N(0, 0.02), SNGAN's Xavier (gain sqrt 2 inside
residual blocks), BigGAN's 64-pixel widths for the resnet family. Each check measures the spread of
the weights, which PyTorch's default init (uniform, std 1/sqrt(3 fan_in)) would fail."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.networks import dcgan, resnet


def _weight(module: nn.Module) -> torch.Tensor:
    """The raw weight (under spectral norm: the parameter it normalises)."""
    if hasattr(module, "parametrizations"):
        return module.parametrizations.weight.original.detach()
    return module.weight.detach()


def _pytorch_defaults(*nets: nn.Module) -> list[nn.Module]:
    """Copies of `nets` re-initialised by PyTorch's own `reset_parameters` (what the tests must reject)."""
    copies = [copy.deepcopy(n) for n in nets]
    for net in copies:
        for m in net.modules():
            if hasattr(m, "reset_parameters") and not hasattr(m, "parametrizations"):
                m.reset_parameters()
    return copies


def _radford_layers(*nets: nn.Module) -> tuple[list[bool], bool]:
    """Per conv layer: weight mean ~0 and std within 10% of 0.02 with zero bias; and whether the
    BatchNorm gains are N(1, 0.02) with zero biases."""
    convs = [m for n in nets for m in n.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    ok = [abs(_weight(m).mean().item()) < 0.002 and abs(_weight(m).std().item() / 0.02 - 1) < 0.1
          and (m.bias is None or not m.bias.any()) for m in convs]
    bns = [m for n in nets for m in n.modules() if isinstance(m, nn.BatchNorm2d)]
    gains = torch.cat([m.weight.detach() for m in bns])
    bn_ok = (abs(gains.mean().item() - 1) < 0.003 and abs(gains.std().item() / 0.02 - 1) < 0.15
             and not torch.cat([m.bias.detach() for m in bns]).any())
    return ok, bn_ok


def test_dcgan_init_is_radfords():
    torch.manual_seed(0)
    G, D = dcgan.build(ModelConfig(name="dcgan", spectral_norm=True), resolution=64, channels=3, num_classes=0)
    convs, bn = _radford_layers(G, D)
    assert len(convs) == 5 + 5 and all(convs) and bn
    assert sum(1 for m in G.modules() if isinstance(m, nn.BatchNorm2d)) == 4
    # The same checks reject PyTorch's defaults (uniform, std 1/sqrt(3 fan_in); BN gains all 1).
    G0, D0 = dcgan.build(ModelConfig(name="dcgan"), resolution=64, channels=3, num_classes=0)
    convs, bn = _radford_layers(*_pytorch_defaults(G0, D0))
    assert sum(convs) <= 2 and not bn
    # Initialised before spectral norm wrapped the layers: its u and v (15 power iterations) fit the
    # final weights, so the normalised weights have spectral norm ~1 from the first step (with u and v
    # left from PyTorch's init they came out at 46 to 440 here).
    D.eval()
    for m in D.modules():
        if isinstance(m, nn.Conv2d):
            sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
            assert sigma == pytest.approx(1.0, abs=0.1)


def _xavier_std(weight: torch.Tensor, gain: float) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def _sngan_layers(G: nn.Module, D: nn.Module) -> list[bool]:
    """Per layer: Xavier-uniform with SNGAN's gain (sqrt 2 for a block's 3x3 convs, 1 elsewhere):
    inside the uniform bound, std within 10%, zero bias."""
    expected: list[tuple[nn.Module, float]] = []
    for block in [*G.blocks, *D.blocks]:
        expected += [(block.conv1, math.sqrt(2)), (block.conv2, math.sqrt(2))]
        if block.shortcut is not None:
            expected.append((block.shortcut, 1.0))
    expected += [(G.linear, 1.0), (G.to_image, 1.0), (D.out, 1.0), (D.embed, 1.0)]
    ok = []
    for m, gain in expected:
        w, std = _weight(m), _xavier_std(_weight(m), gain)
        ok.append(w.abs().max().item() <= std * math.sqrt(3) + 1e-6 and abs(w.std().item() / std - 1) < 0.1
                  and (getattr(m, "bias", None) is None or not m.bias.any()))
    return ok


def test_sngan_init_is_xavier_with_residual_gain():
    torch.manual_seed(0)
    cfg = ModelConfig(name="resnet", conditional=True, g_width=0.5, d_width=0.5)
    G, D = resnet.build(cfg, resolution=32, channels=3, num_classes=10)
    ok = _sngan_layers(G, D)
    assert len(ok) == 3 * 3 + 4 * 2 + 2 + 4 and all(ok)
    # The same checks reject PyTorch's defaults.
    cfg.spectral_norm = False
    G0, D0 = resnet.build(cfg, resolution=32, channels=3, num_classes=10)
    assert sum(_sngan_layers(*_pytorch_defaults(G0, D0))) <= 2
    # Per-class BN gains N(1, 0.02), biases 0 (Mimicry's cGAN-PD).
    gains = torch.cat([b.bn1.gain.weight.detach().flatten() for b in G.blocks])
    assert gains.mean().item() == pytest.approx(1.0, abs=0.003)
    assert gains.std().item() == pytest.approx(0.02, rel=0.1)


def test_resnet_widths_follow_biggans_tables():
    # BigGAN-PyTorch's G_arch/D_arch in units of ch: 64 px G 16,16,8,4,2 (blocks 16->16, 16->8, 8->4,
    # 4->2), D 1,2,4,8,16; 128 px G 16,16,8,4,2,1, D 1,2,4,8,16,16. 32 px stays SNGAN's (256 / 128).
    with torch.device("meta"):
        nets = {r: resnet.build(ModelConfig(name="resnet", spectral_norm=False), resolution=r, channels=3,
                                num_classes=0) for r in (32, 64, 128)}
    ch = resnet.BASE
    tables = [(64, (16, 16, 8, 4, 2), (1, 2, 4, 8, 16)), (128, (16, 16, 8, 4, 2, 1), (1, 2, 4, 8, 16, 16))]
    for r, g, d in tables:
        G, D = nets[r]
        assert [G.linear.out_features // 16] + [b.conv1.out_channels for b in G.blocks] == [ch * m for m in g]
        assert [b.conv1.out_channels for b in D.blocks] == [ch * m for m in d]
    G, D = nets[32]
    assert {b.conv1.out_channels for b in G.blocks} == {256}
    assert {b.conv1.out_channels for b in D.blocks} == {128}
