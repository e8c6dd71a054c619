"""Every network from its config name, at every resolution it supports, conditional and not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.catalog import from_dict
from pipeline.config import ConfigError, ModelConfig
from pipeline.networks import (NETWORKS, biggan, build_networks, dcgan, mlp, param_count, r3gan, resnet,
                               stylegan2)

RESOLUTIONS = {"mlp": (0, 28, 32, 48), "dcgan": dcgan.RESOLUTIONS, "resnet": resnet.RESOLUTIONS,
               "stylegan2": stylegan2.RESOLUTIONS, "r3gan": r3gan.RESOLUTIONS, "biggan": biggan.RESOLUTIONS}
CASES = [(name, res, classes) for name in NETWORKS.keys() for res in RESOLUTIONS[name] for classes in (0, 4)]


def tiny(name: str, conditional: bool = False, **kw) -> ModelConfig:
    return ModelConfig(name=name, g_width=1 / 32, d_width=1 / 32, w_dim=16, mapping_layers=2,
                       conditional=conditional, **kw)


def build(name, resolution, classes=0, channels=3, conditional=None, **kw):
    cfg = tiny(name, bool(classes) if conditional is None else conditional, **kw)
    return build_networks(cfg, resolution=resolution, channels=channels, num_classes=classes)


def test_registry_serves_every_family():
    assert NETWORKS.keys() == ["biggan", "dcgan", "mlp", "r3gan", "resnet", "stylegan2"]
    assert from_dict({"model": {"name": "stylegan2"}}).model.name == "stylegan2"
    with pytest.raises(ConfigError, match=r"model\.name.*biggan, dcgan, mlp, r3gan, resnet, stylegan2"):
        from_dict({}, ["model.name=biggan-deep"])


@pytest.mark.parametrize("name, resolution, classes", CASES)
def test_forward_backward(name, resolution, classes):
    torch.manual_seed(0)
    channels = 2 if resolution == 0 else 3
    G, D = build(name, resolution, classes, channels)
    assert G.z_dim > 0 and (G.num_classes, G.resolution, G.channels) == (classes, resolution, channels)
    n = 2
    z = torch.randn(n, G.z_dim)
    labels = torch.arange(n) % classes if classes else None
    x = G(z, labels)
    shape = (n, channels) if resolution == 0 else (n, channels, resolution, resolution)
    assert x.shape == shape
    logits = D(x, labels)
    assert logits.shape == (n,) and logits.dtype == torch.float32
    logits.sum().backward()
    for net in (G, D):
        missing = [k for k, p in net.named_parameters() if p.grad is None]
        assert not missing, missing
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        assert net.num_params() == param_count(net) == sum(p.numel() for p in net.parameters()) > 0
    G.eval()
    with torch.no_grad():
        out = G(torch.randn(16, G.z_dim) * 3, torch.arange(16) % classes if classes else None)
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("name, resolution, classes", [c for c in CASES if c[1] <= 64])
def test_forward_under_bf16_and_fp16_autocast(name, resolution, classes):
    """Every family at each resolution up to 64 runs under both autocast dtypes with finite
    results (128 and 256 px add only more of the same blocks and cost most of the time; the
    penalties' agreement with fp32 is in test_penalties.py)."""
    torch.manual_seed(0)
    channels = 2 if resolution == 0 else 3
    G, D = build(name, resolution, classes, channels)
    z = torch.randn(2, G.z_dim)
    labels = torch.arange(2) % classes if classes else None
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            x = G(z, labels)
            logits = D(x, labels)
        assert torch.isfinite(x.float()).all() and torch.isfinite(logits.float()).all(), dtype
        logits.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None), dtype


@pytest.mark.parametrize("name", NETWORKS.keys())
def test_conditional_output_changes_with_the_label(name):
    torch.manual_seed(0)
    resolution = 0 if name == "mlp" else 32
    G, D = build(name, resolution, classes=4)
    G.eval()
    z = torch.randn(4, G.z_dim)

    def generate(labels):
        torch.manual_seed(1)    # the same noise inputs for stylegan2
        with torch.no_grad():
            return G(z, labels)

    a, b = generate(torch.zeros(4, dtype=torch.long)), generate(torch.ones(4, dtype=torch.long))
    assert torch.equal(a, generate(torch.zeros(4, dtype=torch.long)))
    # Deterministic (above), so any difference is the label's doing; at init resnet's classes differ
    # only by its conditional BN gains' small spread.
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    x = torch.rand_like(a) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(D(x, torch.zeros(4, dtype=torch.long)), D(x, torch.ones(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="pass labels"):
        G(z)


@pytest.mark.parametrize("name", NETWORKS.keys())
def test_unconditional_networks_ignore_labels(name):
    torch.manual_seed(0)
    G, D = build(name, 0 if name == "mlp" else 32)
    G.eval()
    z = torch.randn(2, G.z_dim)
    torch.manual_seed(1)
    a = G(z)
    torch.manual_seed(1)
    b = G(z, torch.tensor([0, 1]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name, resolution, message", [
    ("dcgan", 48, "dcgan does not support resolution 48; supported resolutions: 28, 32, 64, 128, 256"),
    ("resnet", 0, "resnet does not support flat"),
    ("stylegan2", 16, "stylegan2 does not support resolution 16; supported resolutions: 28, 32, 64"),
])
def test_unsupported_resolution_names_the_allowed_ones(name, resolution, message):
    with pytest.raises(ConfigError, match=message):
        build(name, resolution)


def test_unsupported_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="model.conditional.*at least 2 classes.*has 0"):
        build("dcgan", 32, classes=0, conditional=True)
    with pytest.raises(ConfigError, match="model.spectral_norm: stylegan2"):
        build("stylegan2", 32, spectral_norm=True)


def _sn_layers(D) -> int:
    return sum(1 for m in D.modules() if hasattr(m, "parametrizations"))


def test_spectral_norm_defaults_and_switch():
    assert _sn_layers(build("dcgan", 32)[1]) == 0
    assert _sn_layers(build("dcgan", 32, spectral_norm=True)[1]) == 4     # 3 strided convs + output
    assert _sn_layers(build("mlp", 32, spectral_norm=True)[1]) == 4
    _, D = build("resnet", 32, classes=4)
    assert _sn_layers(D) == sum(1 for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear,
                                                                       torch.nn.Embedding)))
    assert _sn_layers(build("resnet", 32, spectral_norm=False)[1]) == 0


def test_published_parameter_counts():
    # DCGAN at 64 pixels, nz=100, ngf=64 (the PyTorch example's G: 3,576,704 parameters).
    G, _ = dcgan.build(ModelConfig(name="dcgan"), resolution=64, channels=3, num_classes=0)
    assert G.num_params() == 3_576_704
    # The classic MLP: 100 -> 256 -> 512 -> 1024 -> 784 and back to 1.
    G, D = mlp.build(ModelConfig(name="mlp"), resolution=28, channels=1, num_classes=0)
    assert G.num_params() == (100 * 256 + 256) + (256 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)
    assert D.num_params() == (784 * 1024 + 1024) + (1024 * 512 + 512) + (512 * 256 + 256) + (256 + 1)


def test_stylegan2_matches_the_published_config_f_size(monkeypatch):
    # StyleGAN2 config F at 1024 pixels (channel base 32768) has 30,370,060 G and 29,012,513 D
    # parameters in the paper's official release; an independent implementation of the same
    # architecture must land on the same counts.
    monkeypatch.setattr(stylegan2, "CHANNEL_BASE", 32768)
    with torch.device("meta"):
        G = stylegan2.Generator(resolution=1024, channels=3)
        D = stylegan2.Discriminator(resolution=1024, channels=3)
    assert (G.num_params(), D.num_params(), G.num_ws) == (30_370_060, 29_012_513, 18)


def test_modulated_conv_equals_per_sample_weights():
    # Eq. 1 and 3 of the StyleGAN2 paper, applied literally with one weight tensor per sample.
    torch.manual_seed(0)
    conv = stylegan2.ModulatedConv2d(5, 7, 3, w_dim=6)
    with torch.no_grad():
        conv.affine.bias.normal_()
    x, w = torch.randn(2, 5, 8, 8), torch.randn(2, 6)
    out = conv(x, w)
    styles = conv.affine(w)
    for i in range(2):
        wi = conv.weight * conv.weight_gain * styles[i][None, :, None, None]          # Eq. 1
        wi = wi / (wi.square().sum((1, 2, 3), keepdim=True) + 1e-8).sqrt()           # Eq. 3
        assert torch.allclose(out[i:i + 1], F.conv2d(x[i:i + 1], wi, padding=1), atol=1e-5)


def test_minibatch_stddev_feature():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    y = stylegan2.minibatch_stddev(x, group=4)
    assert y.shape == (8, 4, 4, 4) and torch.equal(y[:, :3], x)
    # Sample 1 is grouped with samples 3, 5, 7 (sample k*2 + m is in group m).
    group = x[[1, 3, 5, 7]]
    expected = (group.var(0, unbiased=False) + 1e-8).sqrt().mean()
    assert torch.allclose(y[1, 3], expected.expand(4, 4), atol=1e-6)
    assert torch.allclose(y[7, 3], expected.expand(4, 4), atol=1e-6)
    # A batch of 6 falls back to groups of 2, a batch of 1 to a group of 1.
    assert stylegan2.minibatch_stddev(torch.randn(6, 2, 4, 4), group=4).shape == (6, 3, 4, 4)
    assert torch.all(stylegan2.minibatch_stddev(torch.randn(1, 2, 4, 4), group=4)[:, 2] < 1e-3)


def test_stylegan2_truncation_and_noise_modes():
    torch.manual_seed(0)
    G, _ = build("stylegan2", 32)
    G.train()
    with torch.no_grad():
        for _ in range(5):
            G(torch.randn(64, G.z_dim))                 # training updates the running mean of w
    assert G.mapping.w_avg.abs().sum() > 0
    G.eval()
    with torch.no_grad():
        z = torch.randn(4, G.z_dim)
        avg = G(z, truncation_psi=0.0, noise_mode="const")
        assert torch.allclose(avg, avg[:1].expand_as(avg), atol=1e-6)    # psi = 0: every z gives w_avg
        assert torch.equal(G(z, noise_mode="const"), G(z, noise_mode="const"))
        # The noise inputs act once their strengths are nonzero.
        for layer in G.synthesis.convs:
            layer.noise_strength.fill_(0.5)
        torch.manual_seed(1)
        a = G(z)
        assert not torch.equal(a, G(z))


def test_resolution_plan_and_width_scaling():
    from pipeline.networks.base import resolution_plan, scaled
    assert resolution_plan(28) == (7, 2) and resolution_plan(256) == (4, 6)
    assert scaled(64, 1 / 32) == 2 and scaled(64, 1e-3) == 1
    G, D = build("dcgan", 64)                   # widths 512..64 times 1/32
    assert G.z_dim == 100 and G.net[0].out_channels == 16 and D.features[0].out_channels == 2


def test_bench_counts_flops_and_reports_skips():
    from pipeline.bench import networks as bench
    from pipeline.cli import build_parser

    argv = ["bench", "networks", "--networks", "mlp", "dcgan", "--resolutions", "28", "48", "--batch", "2",
            "--iters", "1", "--width", "0.0625", "--matmul-size", "128"]
    args = build_parser(argv).parse_args(argv)
    result = bench.run(args)
    rows = {(r["network"], r["resolution"]): r for r in result["networks"]}
    assert set(rows) == {("mlp", 28), ("mlp", 48), ("dcgan", 28), ("dcgan", 48)}
    assert "supported resolutions: 28, 32, 64, 128, 256" in rows["dcgan", 48]["skipped"]
    # The MLP's forward is its four matrix multiplies: 2 FLOPs per multiply-add.
    widths = [100, 16, 32, 64, 784 * 3]
    macs = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    mlp28 = rows["mlp", 28]
    assert mlp28["g_forward_gflop_per_image"] == round(2 * macs / 1e9, 4)
    assert mlp28["images_per_s"] > 0 and 0 < mlp28["fraction_of_matmul"]
    assert result["matmul"]["gflop_per_s"] > 0


@pytest.mark.parametrize("name", NETWORKS.keys())
def test_mixes_batch_says_whether_a_joint_forward_is_two_forwards(name):
    """`speed.joint_d_forward` runs D once on cat(reals, fakes) where `D.mixes_batch` is False; that
    is only right if such a D gives each sample the logit it gets alone. Checked in training mode
    (spectral norm's weight computed once, as within one forward), conditional, for every family;
    and a D that says it mixes (stylegan2's minibatch stddev, any BatchNorm) really does."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    res = 0 if name == "mlp" else min(RESOLUTIONS[name])
    _, D = build(name, res, 4, channels=3)
    shape = (3,) if res == 0 else (3, res, res)
    a, b = torch.randn(4, *shape), torch.randn(4, *shape) * 2
    la, lb = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    with torch.no_grad(), parametrize.cached():
        joint = D(torch.cat([a, b]), torch.cat([la, lb]))
        apart = torch.cat([D(a, la), D(b, lb)])
    same = torch.allclose(joint, apart, rtol=1e-4, atol=1e-5)
    assert D.mixes_batch == (name == "stylegan2") and same == (not D.mixes_batch), (name, (joint - apart).abs().max())
    _, D0 = build(name, res, 4, channels=3, mbstd_group=0) if name == "stylegan2" else (None, None)
    if D0 is not None:
        assert not D0.mixes_batch       # without the stddev layer stylegan2's D is per-sample
    bn = mlp.Discriminator(resolution=0, channels=3)
    bn.add_module("extra", torch.nn.BatchNorm1d(3))
    assert bn.mixes_batch
