"""R3GAN's backbone (`model.name=r3gan`): shapes, the fix-up initialisation, the resampling
filters, parameter counts against the authors' published sizes, R1/R2 through D, bf16 autocast.

    .venv/bin/pytest tests/test_r3gan.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, LossConfig, ModelConfig
from pipeline.losses import PENALTIES, build_loss
from pipeline.networks import build_networks, r3gan
from pipeline.networks.r3gan import ResidualBlock, downsample, upsample


def tiny(conditional: bool = False, width: float = 0.05, **kw) -> ModelConfig:
    return ModelConfig(name="r3gan", g_width=width, d_width=width, conditional=conditional, **kw)


def build(resolution: int = 32, classes: int = 0, channels: int = 3, **kw):
    return build_networks(tiny(classes > 0, **kw), resolution=resolution, channels=channels,
                          num_classes=classes)


def labels_for(n: int, classes: int):
    return torch.arange(n) % classes if classes else None


@pytest.mark.parametrize("resolution", r3gan.RESOLUTIONS)
@pytest.mark.parametrize("classes", (0, 4))
def test_shapes_at_every_resolution(resolution, classes):
    torch.manual_seed(0)
    channels = 1 if resolution == 28 else 3
    G, D = build(resolution, classes, channels)
    assert (G.z_dim, G.num_classes, G.resolution, G.channels) == (64, classes, resolution, channels)
    assert G.noise_shapes() == []
    z, y = torch.randn(3, G.z_dim), labels_for(3, classes)
    with torch.no_grad():
        x = G(z, y)
        assert x.shape == (3, channels, resolution, resolution)
        assert torch.equal(G(z, y, noise=[]), x)          # noise is accepted and ignored
        logits = D(x, y)
    assert logits.shape == (3,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # Training mode returns the raw output; eval mode clamps it to [-1, 1].
    G.eval()
    with torch.no_grad():
        big = G(z * 50, y)
    assert big.min() >= -1 and big.max() <= 1
    G.train()
    with torch.no_grad():
        assert G(z * 50, y).abs().max() > 1


def test_start_sides_and_widths_follow_the_paper():
    torch.manual_seed(0)
    cfg = ModelConfig(name="r3gan")
    with torch.device("meta"):
        G, D = build_networks(cfg, resolution=64, channels=3, num_classes=0)
        G28, _ = build_networks(cfg, resolution=28, channels=1, num_classes=0)
    assert G.basis.basis.shape == (768, 4, 4) and G28.basis.basis.shape == (768, 7, 7)
    # FFHQ-64: 768 maps at sides 4..32, 384 at 64; D mirrors G.
    g_widths = [s[-1].project.out_channels for s in G.stages]
    d_widths = [s[0].project.out_channels for s in D.stages]
    assert g_widths == [768, 768, 768, 768, 384] and d_widths == g_widths[::-1]
    assert sum(isinstance(m, ResidualBlock) for m in G.modules()) == 10
    block = G.stages[0][0]
    assert block.expand.out_channels == 1536 and block.conv.groups == 96      # groups of 16 maps


def test_flat_data_and_unsupported_resolutions_are_config_errors():
    with pytest.raises(ConfigError, match="r3gan does not support flat"):
        build(0)
    with pytest.raises(ConfigError, match="r3gan does not support resolution 48; supported resolutions: "
                                          "28, 32, 64, 128, 256"):
        build(48)
    with pytest.raises(ConfigError, match="model.spectral_norm: r3gan"):
        build(32, spectral_norm=True)


def test_residual_blocks_are_the_identity_at_init():
    torch.manual_seed(0)
    G, D = build(32, classes=4)
    blocks = [m for net in (G, D) for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 16                                # 2 per stage, 4 stages, G and D
    for block in blocks:
        x = torch.randn(2, block.expand.in_channels, 8, 8)
        assert torch.equal(block(x), x)
    # The zero last layer is what makes them so: any other start value changes the output.
    with torch.no_grad():
        blocks[0].project.weight.normal_()
    x = torch.randn(2, blocks[0].expand.in_channels, 8, 8)
    assert not torch.allclose(blocks[0](x), x)


def test_generator_at_init_is_its_basis_resampled_to_an_image():
    # With every block the identity, G is basis -> transitions -> to_image and nothing else.
    torch.manual_seed(0)
    G, _ = build(32, classes=4)
    z, y = torch.randn(2, G.z_dim), torch.tensor([1, 3])
    with torch.no_grad():
        h = G.basis(torch.cat([z, G.embed(y)], 1))
        for stage in G.stages:
            for layer in stage:
                if not isinstance(layer, ResidualBlock):
                    h = layer(h)
        assert torch.allclose(G(z, y), G.to_image(h), atol=1e-6)


def test_fixup_scaling_of_the_branch_layers():
    # He init for leaky ReLU(0.2) times L^(-1/4) (m = 3 layers per branch), L = blocks in the network.
    gain = math.sqrt(2 / 1.04)

    def stds(blocks_per_stage):
        torch.manual_seed(0)
        G, D = build(32, width=0.25, blocks_per_stage=blocks_per_stage)
        block = D.stages[0][0]
        assert not block.project.weight.any()
        return block.expand.weight.std().item(), block.conv.weight.std().item(), 4 * blocks_per_stage

    for blocks_per_stage in (2, 4):
        expand_std, conv_std, L = stds(blocks_per_stage)
        # 192 maps: expand has fan-in 192, the grouped conv 16 x 3 x 3.
        assert expand_std == pytest.approx(gain * L ** -0.25 / math.sqrt(192), rel=0.02)
        assert conv_std == pytest.approx(gain * L ** -0.25 / math.sqrt(16 * 9), rel=0.02)
    assert stds(4)[0] / stds(2)[0] == pytest.approx(2 ** -0.25, rel=0.02)


def test_resampling_on_hand_computed_examples():
    # Up, per axis: (a, b) -> (a, (3a + b)/4, (a + 3b)/4, b); separable in 2-D.
    x = torch.tensor([[0.0, 4.0], [8.0, 16.0]])[None, None]
    expected = torch.tensor([[0.0, 1.0, 3.0, 4.0],
                             [2.0, 3.25, 5.75, 7.0],
                             [6.0, 7.75, 11.25, 13.0],
                             [8.0, 10.0, 14.0, 16.0]])
    assert torch.allclose(upsample(x)[0, 0], expected)
    # Down: the [1, 3, 3, 1]/8 filter at stride 2. An interior impulse of 64 at (3, 4) lands on
    # outputs (1, 1), (1, 2), (2, 1), (2, 2) with weights 3/8 * 1/8, 3/8 * 3/8, 1/8 * 1/8, 1/8 * 3/8.
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 4] = 64.0
    expected = torch.zeros(4, 4)
    expected[1, 1], expected[1, 2], expected[2, 1], expected[2, 2] = 3.0, 9.0, 1.0, 3.0
    assert torch.allclose(downsample(x)[0, 0], expected)
    # At the border the edge pixel repeats: (p, q, r, s) -> ((4p + 3q + r)/8, (q + 3r + 4s)/8).
    row = torch.tensor([8.0, 16.0, 24.0, 40.0])
    x = row.view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    assert torch.allclose(downsample(x)[0, 0], torch.tensor([[13.0, 31.0]] * 2))
    # Channels are filtered separately, constants stay constant, and up is bilinear with
    # half-pixel centres.
    x = torch.randn(2, 5, 6, 6)
    assert torch.allclose(upsample(x), F.interpolate(x, scale_factor=2, mode="bilinear",
                                                     align_corners=False), atol=1e-6)
    assert torch.allclose(downsample(x)[:, 2:3], downsample(x[:, 2:3]))
    c = torch.full((1, 3, 8, 8), 0.7)
    assert torch.allclose(upsample(c), torch.full((1, 3, 16, 16), 0.7))
    assert torch.allclose(downsample(c), torch.full((1, 3, 4, 4), 0.7))


def _counts(resolution, classes, **kw) -> tuple[int, int]:
    with torch.device("meta"):
        G, D = build_networks(ModelConfig(name="r3gan", conditional=classes > 0, **kw),
                              resolution=resolution, channels=3, num_classes=classes)
    return G.num_params(), D.num_params()


def test_cifar10_parameter_counts():
    # The CIFAR-10 networks as the paper describes them (its Table 9 and the authors' CIFAR10 preset):
    # 4 stages of 768 maps, 2 blocks each, expansion 2, grouped 3x3 convs with 96 groups of 16,
    # 64-d z and 64-d class embedding in G, D's class embedding as wide as its last stage.
    block = 768 * 1536 + 1536 + 1536 * 16 * 9 + 1536 + 1536 * 768     # expand, grouped conv, project
    G = 10 * 64 + (64 + 64) * 768 + 768 * 4 * 4 + 8 * block + 768 * 3
    D = 3 * 768 + 8 * block + 768 * 4 * 4 + 768 * 768 + 10 * 768
    assert _counts(32, 10) == (G, D) == (20_781_952, 21_280_512)
    assert _counts(32, 0) == (G - 10 * 64 - 64 * 768, D - 768 * 768 - 10 * 768 + 768)


@pytest.mark.parametrize("resolution, classes, kw, published_bytes", [
    # brownvc/R3GAN-ImgNet-32x32 on Hugging Face: ImageNet-32x32.pkl, 2.37 GB.
    (32, 1000, dict(g_width=2.0, d_width=2.0, group_width=32), 2.37e9),
    # brownvc/R3GAN-FFHQ-256x256 on Hugging Face: network-snapshot-final.pkl, 645 MB.
    (256, 0, {}, 645e6),
])
def test_parameter_counts_match_the_authors_released_snapshots(resolution, classes, kw, published_bytes):
    # The authors' training snapshots hold G, D, the EMA of G and Adam's two moment buffers for G and
    # for D, all float32: 4 |G| + 3 |D| numbers of 4 bytes (the pickle's own overhead is negligible).
    # The file sizes are rounded to three digits, so 1% is a tight check of both counts together.
    g, d = _counts(resolution, classes, **kw)
    assert (4 * g + 3 * d) * 4 == pytest.approx(published_bytes, rel=0.01)


def test_r1_and_r2_double_backward_reach_every_parameter():
    # No normalisation layers, so the gradient penalties' double backward needs nothing special.
    torch.manual_seed(0)
    G, D = build(32, classes=4)
    with torch.no_grad():                   # leave the init, so every layer is on the input gradient's path
        for m in D.modules():
            if isinstance(m, ResidualBlock):
                m.project.weight.normal_(0, 0.05)
    z, y = torch.randn(4, G.z_dim), labels_for(4, 4)
    real, fake = torch.rand(4, 3, 32, 32) * 2 - 1, G(z, y).detach()
    loss = build_loss(LossConfig(name="rpgan"))
    total = loss.d_loss(D(real, y), D(fake, y))
    for name in ("r1", "r2"):
        penalty, stats = PENALTIES.get(name)(weight=1.0)(D, real, fake, y)
        assert stats[f"Loss/D/{name}"] > 0
        total = total + penalty
    total.backward()
    for name, p in D.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("embed"):     # only the labels in the batch reach their embeddings
            assert p.grad.abs().sum() > 0, name
    # G's step: RpGAN through D back to every G parameter but the blocks' zero branch inputs.
    D.zero_grad()
    loss.g_loss(D(G(z, y), y), D(real, y)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in G.parameters())
    assert G.stages[0][0].project.weight.grad.abs().sum() > 0


def test_bf16_autocast_forward_and_backward():
    torch.manual_seed(0)
    G, D = build(32, classes=4)
    z, y = torch.randn(4, G.z_dim), labels_for(4, 4)
    with torch.no_grad():
        ref = D(G(z, y), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = G(z, y)
        logits = D(x, y)
    assert x.dtype == torch.bfloat16 and x.shape == (4, 3, 32, 32)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits.float(), ref, atol=0.05 * ref.abs().max().item() + 1e-3)
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in G.parameters())
