"""BigGAN (`model.name=biggan`): shapes, the hierarchical latent, conditional BN, self-attention,
spectral norm in G and D, the paper's parameter count, bf16, R1's double backward, truncation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import REPO
from pipeline.catalog import load_config
from pipeline.config import ConfigError, ModelConfig
from pipeline.errors import UserError
from pipeline.networks import biggan, build_networks


def tiny(resolution: int, classes: int = 0, **kw):
    """G and D at 1/32 of the published widths (ch 2 or 3)."""
    cfg = ModelConfig(name="biggan", g_width=1 / 32, d_width=1 / 32, conditional=bool(classes), **kw)
    return build_networks(cfg, resolution=resolution, channels=3, num_classes=classes)


def _labels(n: int, classes: int) -> torch.Tensor | None:
    return torch.arange(n) % classes if classes else None


@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("classes", [0, 10])
def test_shapes_conditional_and_unconditional(resolution, classes):
    torch.manual_seed(0)
    G, D = tiny(resolution, classes)
    chunks = len(biggan.G_MULTS[resolution])          # the first linear + one per block
    assert G.z_dim == biggan.Z_DIM[resolution] and G.chunk * chunks == G.z_dim
    assert (G.shared is None) == (classes == 0) and (D.embed is None) == (classes == 0)
    z, y = torch.randn(2, G.z_dim), _labels(2, classes)
    x = G(z, y)
    assert x.shape == (2, 3, resolution, resolution) and x.abs().max() <= 1
    logits = D(x, y)
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_width_tables_are_biggans():
    # The paper's 128-pixel G (Table 4a): ch = 96, 16ch at 4x4 then 16, 8, 4, 2, 1 x ch; D (Table 4b)
    # from 1 x ch up to 16ch. At 32 pixels (BigGAN-PyTorch's arch[32]): 4ch everywhere, in G and D.
    with torch.device("meta"):
        G = biggan.Generator(resolution=128, channels=3, spectral_norm=False)
        D = biggan.Discriminator(resolution=128, channels=3, spectral_norm=False)
        G32 = biggan.Generator(resolution=32, channels=3, spectral_norm=False)
        D32 = biggan.Discriminator(resolution=32, channels=3, spectral_norm=False)
    assert [b.conv1.out_channels for b in G.blocks] == [1536, 768, 384, 192, 96]
    assert G.linear.out_features == 1536 * 4 * 4 and G.z_dim == 120 and G.chunk == 20
    assert [b.conv1.out_channels for b in D.blocks if hasattr(b, "conv1")] == [96, 192, 384, 768, 1536, 1536]
    assert [b.conv1.out_channels for b in G32.blocks] == [256, 256, 256]
    assert [b.conv1.out_channels for b in D32.blocks] == [256, 256, 256, 256]


def test_every_z_chunk_feeds_its_own_block():
    # Hierarchical latent: chunk 0 feeds the first linear layer, chunk k the BatchNorms of block k-1
    # only, so a change of chunk k leaves everything before block k-1 as it was and changes the rest.
    torch.manual_seed(0)
    G, _ = tiny(32, classes=10)
    G.eval()
    outputs: list[torch.Tensor] = []
    hooks = [G.linear.register_forward_hook(lambda m, i, o: outputs.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in G.blocks]
    z, y = torch.randn(2, G.z_dim), torch.tensor([3, 7])

    def run(z):
        outputs.clear()
        with torch.no_grad():
            image = G(z, y)
        return [o.clone() for o in outputs], image

    base, image = run(z)
    assert len(base) == 1 + len(G.blocks) == 4
    for k in range(G.z_dim // G.chunk):
        z2 = z.clone()
        z2[:, k * G.chunk:(k + 1) * G.chunk] += 1.0
        acts, image2 = run(z2)
        for i in range(k):          # stages before the one chunk k feeds
            assert torch.equal(acts[i], base[i]), (k, i)
        assert not torch.allclose(acts[k], base[k]), k
        assert (image2 - image).abs().mean() > 1e-4, k
    for h in hooks:
        h.remove()


def test_class_changes_the_output_and_unconditional_g_has_no_embedding():
    torch.manual_seed(0)
    G, D = tiny(32, classes=10)
    G.eval()
    z = torch.randn(4, G.z_dim)
    with torch.no_grad():
        a, b = G(z, torch.zeros(4, dtype=torch.long)), G(z, torch.full((4,), 5))
        assert torch.equal(a, G(z, torch.zeros(4, dtype=torch.long)))
        assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
        assert not torch.allclose(D(a, torch.zeros(4, dtype=torch.long)), D(a, torch.full((4,), 5)))
    G0, _ = tiny(32)
    assert not any(isinstance(m, torch.nn.Embedding) for m in G0.modules())
    # Without classes the BatchNorms are conditioned on the z chunk alone (chunk size inputs).
    assert G0.blocks[0].bn1.gain.in_features == G0.chunk
    assert G.blocks[0].bn1.gain.in_features == G.chunk + biggan.SHARED_DIM


def test_conditional_batchnorm_gain_starts_around_one():
    torch.manual_seed(0)
    cbn = biggan.ConditionalBatchNorm(64, cond_dim=148, spectral_norm=True)
    assert cbn.gain.bias is None and cbn.bias.bias is None          # BigGAN: no bias in these layers
    x = torch.randn(8, 64, 4, 4)
    plain = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert torch.allclose(cbn(x, torch.zeros(8, 148)), plain, atol=1e-5)   # c = 0: gain 1, bias 0
    cond = torch.cat([torch.randn(4096, 128) * 0.1, torch.randn(4096, 20)], 1)
    with torch.no_grad():
        gains = 1 + cbn.gain(cond)
    assert abs(gains.mean().item() - 1) < 0.02 and 0.01 < gains.std().item() < 1.0


def test_attention_starts_as_the_identity_and_sits_at_attention_res():
    torch.manual_seed(0)
    attn = biggan.SelfAttention(16, spectral_norm=True)
    x = torch.randn(2, 16, 8, 8)
    assert attn.gamma.item() == 0.0 and torch.equal(attn(x), x)
    with torch.no_grad():
        attn.gamma.fill_(1.0)
    assert not torch.allclose(attn(x), x)
    # The paper's placement at 128 pixels: after G's block that reaches 64x64 and D's first block.
    G, D = tiny(128)
    assert (G.attention_res, D.attention_res) == (64, 64) and G.attention_index == 3
    assert isinstance(D.blocks[1], biggan.SelfAttention)
    G, D = tiny(32, attention_res=16)
    assert (G.attention_res, D.attention_res, G.attention_index) == (16, 16, 1)     # blocks reach 8, 16, 32
    G, D = tiny(32, attention_res=0)
    assert G.attention is None and not any(isinstance(m, biggan.SelfAttention) for m in D.modules())
    # The block in G is used: with gamma 1 the image changes.
    G, _ = tiny(32, attention_res=16)
    G.eval()
    z = torch.randn(2, G.z_dim)
    with torch.no_grad():
        before = G(z)
        G.attention.gamma.fill_(1.0)
        assert not torch.allclose(G(z), before)


def _sn(module) -> bool:
    return hasattr(module, "parametrizations") and "weight" in module.parametrizations


def test_spectral_norm_on_every_layer_of_g_and_d():
    torch.manual_seed(0)
    G, D = tiny(32, classes=10, attention_res=16)
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    g_layers = [m for m in G.modules() if isinstance(m, layers)]
    # The linear layer, per block 3 convs and 4 BN linears, the attention's 4 convs, the output conv.
    assert len(g_layers) == 1 + 3 * (3 + 4) + 4 + 1
    assert all(_sn(m) for m in g_layers) and not _sn(G.shared)      # the shared embedding is not normalised
    d_layers = [m for m in D.modules() if isinstance(m, (*layers, torch.nn.Embedding))]
    assert d_layers and all(_sn(m) for m in d_layers)
    # Normalised for real: after a few training forwards (one power iteration each) sigma(W) = 1.
    G.train()
    for _ in range(10):
        G(torch.randn(4, G.z_dim), _labels(4, 10))
    w = G.blocks[1].conv1.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=0.05)
    G, D = tiny(32, classes=10, spectral_norm=False)
    assert not any(_sn(m) for m in [*G.modules(), *D.modules()])


def test_orthogonal_init():
    torch.manual_seed(0)
    G, D = tiny(32)
    w = G.blocks[0].conv1.parametrizations.weight.original.detach().flatten(1)    # (4ch, 9 * 4ch)
    assert torch.allclose(w @ w.t(), torch.eye(w.shape[0]), atol=1e-5)          # orthonormal rows
    w = D.out.parametrizations.weight.original.detach()
    assert w.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert all(m.bias is None or not m.bias.any() for m in G.modules() if isinstance(m, torch.nn.Conv2d))


def test_parameter_count_matches_the_paper(monkeypatch):
    # Brock et al. 2019, Table 1: ch 96 with shared embedding and hierarchical latents (skip-z) at
    # 128x128 ImageNet has 158.3M parameters (G and D together). The paper gives no count for its
    # CIFAR-10 model. Spectral norm adds no parameters (u, v are buffers) and the init none: both
    # checked at tiny width, then the full model is built without them (158M orthogonal inits and
    # power iterations would take minutes here).
    G, D = tiny(32, classes=10)
    G1, D1 = tiny(32, classes=10, spectral_norm=False)
    assert (G.num_params(), D.num_params()) == (G1.num_params(), D1.num_params())
    monkeypatch.setattr(biggan, "orthogonal", lambda module, gain=1.0: module)
    G2, D2 = tiny(32, classes=10, spectral_norm=False)
    assert (G2.num_params(), D2.num_params()) == (G1.num_params(), D1.num_params())
    G = biggan.Generator(resolution=128, channels=3, num_classes=1000, spectral_norm=False)
    D = biggan.Discriminator(resolution=128, channels=3, num_classes=1000, spectral_norm=False)
    total = G.num_params() + D.num_params()
    assert total == pytest.approx(158.3e6, rel=0.05)
    assert abs(total - 158.3e6) / 158.3e6 < 0.001          # in fact within 0.1%: 158.42M


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    G, D = tiny(32, classes=10, attention_res=16)
    G.eval(), D.eval()
    z, y = torch.randn(4, G.z_dim), _labels(4, 10)
    with torch.no_grad():
        x32, l32 = G(z, y), D(G(z, y), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x16 = G(z, y)
            l16 = D(x16, y)
    assert x16.dtype == torch.bfloat16
    assert torch.isfinite(x16.float()).all() and torch.isfinite(l16.float()).all()
    assert (x16.float() - x32).abs().max() < 0.1
    assert (l16.float() - l32).abs().max() < 0.1 * l32.abs().max() + 0.05


def test_r1_double_backward_through_d():
    # R1 = |grad_x D(x)|^2 needs the gradient of a gradient through spectral norm, self-attention
    # (softmax, max pooling) and the projection term. Checked against a central finite difference
    # of R1 along a random direction in D's parameters (float64, eval mode: u and v stay fixed).
    torch.manual_seed(0)
    _, D = tiny(32, classes=10, attention_res=16)
    D = D.double().eval()
    attention = [m for m in D.modules() if isinstance(m, biggan.SelfAttention)][0]
    with torch.no_grad():
        attention.gamma.fill_(0.5)          # let the attention block carry gradient
    x, y = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1, torch.tensor([1, 4, 9])

    def r1() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(xr, y).sum(), xr, create_graph=True)
        return grad.square().sum((1, 2, 3)).mean()

    params = list(D.parameters())
    r1().backward()
    # Only D's output bias cannot reach grad_x D (under DDP the penalty adds 0 * logits for it).
    assert [n for n, p in D.named_parameters() if p.grad is None] == ["out.bias"]
    params = [p for p in params if p.grad is not None]
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert attention.query.parametrizations.weight.original.grad.abs().sum() > 0
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps = 1e-7      # R1 jumps where a ReLU or max-pool switches: keep the step below those kinks

    def shift(step: float) -> None:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)

    values = []
    for sign in (1, -1):
        shift(sign * eps)
        values.append(r1().item())
        shift(-sign * eps)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_truncate_z_gives_the_truncated_normal():
    torch.manual_seed(0)
    z = torch.randn(200_000)
    t = 1.0
    zt = biggan.Generator.truncate_z(z, t)
    assert zt.abs().max() <= t and torch.equal(zt, biggan.Generator.truncate_z(z, t))   # a function of z
    assert (zt[torch.argsort(z)].diff() >= 0).all()                                         # monotone
    # The law of N(0, 1) truncated to [-1, 1]: std 0.5379, and no mass piled at the bounds (a clamp
    # would put 31.7% there).
    assert zt.std().item() == pytest.approx(0.5379, rel=0.01)
    assert (zt.abs() > 0.999 * t).float().mean() < 0.002
    phi = math.exp(-0.5) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert zt.std().item() ** 2 == pytest.approx(1 - 2 * phi / (2 * cdf - 1), rel=0.02)
    assert torch.equal(biggan.Generator.truncate_z(z, None), z)
    with pytest.raises(UserError, match=r"threshold \(--psi\) must be > 0"):
        biggan.Generator.truncate_z(z, 0.0)
    G, _ = tiny(32)
    G.eval()
    zz = torch.randn(2, G.z_dim) * 3
    with torch.no_grad():
        assert G(G.truncate_z(zz, 0.5)).shape == (2, 3, 32, 32)


def test_z_dim_must_split_into_equal_chunks():
    message = r"model\.z_dim.*6 equal chunks.*100 is not a multiple of 6: use 96 or 102"
    with pytest.raises(ConfigError, match=message):
        tiny(128, z_dim=100)
    G, _ = tiny(128, z_dim=60)
    assert G.chunk == 10
    with pytest.raises(ConfigError, match="biggan does not support resolution 28"):
        tiny(28)


def test_cifar10_config_is_the_papers_setup():
    cfg = load_config(REPO / "configs" / "cifar10_biggan.yaml")
    t = cfg.train
    m = cfg.model
    assert (m.name, m.conditional, m.attention_res, cfg.loss.name) == ("biggan", True, 0, "hinge")
    assert (cfg.data.batch_size, t.n_critic, cfg.optim.g_lr, cfg.optim.d_lr, cfg.optim.g_betas, cfg.optim.d_betas) == (
        50, 4, 2e-4, 2e-4, [0.0, 0.999], [0.0, 0.999])
    assert t.total_kimg == 125_000 * 4 * 50 / 1000
    per_g_step = 0.5 ** (t.n_critic * cfg.data.batch_size / (cfg.ema.halflife_kimg * 1000))
    assert per_g_step == pytest.approx(0.9999, abs=1e-7)
    assert [(p.name, p.weight) for p in cfg.loss.penalties] == [("ortho", 1e-4)]
    G, D = build_networks(cfg.model, resolution=32, channels=3, num_classes=10)
    assert (G.z_dim, G.chunk, G.attention, G.num_classes) == (128, 32, None, 10)
