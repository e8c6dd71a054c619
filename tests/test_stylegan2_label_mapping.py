"""Conditional StyleGAN2 D maps the label through its own mapping network, as StyleGAN2-ADA's does:
one-hot -> FC embedding -> unit second moment -> 8 FC layers (leaky ReLU, lr multiplier 0.01) = cmap,
and the logit is (features . cmap) / sqrt(cmap_dim)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import SnapshotError
from pipeline.networks.stylegan2 import Discriminator, EqualLinear

CLASSES = 5


def _d(seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(resolution=32, channels=3, num_classes=CLASSES, width=0.125)


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def test_d_maps_labels_through_eight_layers_at_a_hundredth_of_the_learning_rate():
    D = _d()
    dim = D.out.weight.shape[0]                       # cmap_dim: D's maps at 4x4
    layers = list(D.mapping.net)
    assert len(layers) == 8 and all(isinstance(m, EqualLinear) for m in [D.mapping.embed, *layers])
    assert D.mapping.embed.weight.shape == (dim, CLASSES) and D.mapping.embed.lr_mul == 1.0
    # The runtime weight is the stored one x lr_mul / sqrt(fan_in): the first Adam step moves every
    # stored weight by lr, so the weights D uses move lr x 0.01 / sqrt(dim) in the mapping layers,
    # lr / sqrt(classes) in the embedding (lr 0.1: stored weights of about 100 round steps of 1e-3).
    x, y = _inputs()
    before = [(m.weight * m.weight_gain).detach().clone() for m in [D.mapping.embed, *layers]]
    opt = torch.optim.Adam(D.mapping.parameters(), lr=0.1)
    D(x, y).square().sum().backward()
    opt.step()
    after = [(m.weight * m.weight_gain).detach() for m in [D.mapping.embed, *layers]]
    moved = [(a - b).abs().max().item() for a, b in zip(after, before)]
    assert moved[0] == pytest.approx(0.1 / math.sqrt(CLASSES), rel=1e-3)
    for m in moved[1:]:
        assert m == pytest.approx(0.1 * 0.01 / math.sqrt(dim), rel=1e-3)
    # At init the runtime weights are N(0, 1/fan_in) either way.
    assert (layers[0].weight * layers[0].weight_gain).std().item() == pytest.approx(1 / math.sqrt(dim), rel=0.1)


def test_the_logit_is_the_projection_of_d_features_on_the_mapped_label():
    D = _d()
    x, y = _inputs()
    seen = {}
    D.out.register_forward_hook(lambda m, i, o: seen.__setitem__("features", o))
    logits = D(x, y)
    # The mapping written out from its stored weights: embed (gain 1/sqrt(C), lr_mul 1), 2nd-moment
    # normalisation, then FC layers with gain 0.01/sqrt(dim), bias x 0.01, leaky ReLU 0.2 x sqrt 2.
    h = F.one_hot(y, CLASSES).float() @ (D.mapping.embed.weight / math.sqrt(CLASSES)).t() + D.mapping.embed.bias
    h = h / h.square().mean(1, keepdim=True).add(1e-8).sqrt()
    for m in D.mapping.net:
        h = F.leaky_relu(h @ (m.weight * 0.01 / math.sqrt(h.shape[1])).t() + 0.01 * m.bias, 0.2) * math.sqrt(2)
    dim = h.shape[1]
    expected = (seen["features"] * h).sum(1) / math.sqrt(dim)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    # Another label, another logit for the same image.
    assert not torch.allclose(D(x, (y + 1) % CLASSES), logits)


def test_d_loss_trains_the_label_mapping():
    D = _d()
    x, y = _inputs()
    F.softplus(-D(x, y)).mean().backward()
    for name, p in D.mapping.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_d_with_the_plain_label_embedding_is_refused_by_name():
    D = _d()
    old = {k: v for k, v in D.state_dict().items() if not k.startswith("mapping.")}
    old["embed.weight"] = torch.randn(CLASSES, D.out.weight.shape[0])
    for strict in (True, False):
        with pytest.raises(SnapshotError, match=r"embed\.weight.*train\.init_from"):
            D.load_state_dict(old, strict=strict)
    D.load_state_dict(_d(seed=1).state_dict())          # its own layout loads
