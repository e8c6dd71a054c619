"""Each adversarial loss equals its paper's formula on hand-picked logits, and stays finite far out."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.catalog import from_dict
from pipeline.config import ConfigError, LossConfig
from pipeline.losses import LOSSES, build_loss, clip_weights

REAL = [2.0, -1.0, 0.5, 0.0]
FAKE = [-3.0, 0.0, 1.5, -0.25]


def sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# Written with sigmoid and log in plain Python, the way the papers state them; fine for these logits.
FORMULAS = {
    # Goodfellow et al. 2014, Eq. 1: D maximises log D(x) + log(1 - D(G(z))); G minimises log(1 - D(G(z))).
    "minimax": (lambda r, f: -mean(math.log(sigmoid(t)) for t in r) - mean(math.log(1 - sigmoid(t)) for t in f),
                lambda f, r: mean(math.log(1 - sigmoid(t)) for t in f)),
    # Same D; G minimises -log D(G(z)).
    "nonsaturating": (lambda r, f: -mean(math.log(sigmoid(t)) for t in r) - mean(math.log(1 - sigmoid(t)) for t in f),
                      lambda f, r: -mean(math.log(sigmoid(t)) for t in f)),
    # Lim & Ye 2017: D: E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]; G: -E[D(G(z))].
    "hinge": (lambda r, f: mean(max(0.0, 1 - t) for t in r) + mean(max(0.0, 1 + t) for t in f),
              lambda f, r: -mean(f)),
    # Arjovsky et al. 2017: critic maximises E[D(x)] - E[D(G(z))]; G: -E[D(G(z))].
    "wasserstein": (lambda r, f: mean(f) - mean(r), lambda f, r: -mean(f)),
    # Mao et al. 2017, 0-1 coding: D: 1/2 E[(D(x) - 1)^2] + 1/2 E[D(G(z))^2]; G: 1/2 E[(D(G(z)) - 1)^2].
    "lsgan": (lambda r, f: 0.5 * mean((t - 1) ** 2 for t in r) + 0.5 * mean(t ** 2 for t in f),
              lambda f, r: 0.5 * mean((t - 1) ** 2 for t in f)),
    # RpGAN (Jolicoeur-Martineau 2019; R3GAN Eq. 2), paired samples: D: -E[log sigmoid(D(x_i) - D(G(z_i)))];
    # G: -E[log sigmoid(D(G(z_i)) - D(x_i))].
    "rpgan": (lambda r, f: -mean(math.log(sigmoid(a - b)) for a, b in zip(r, f)),
              lambda f, r: -mean(math.log(sigmoid(b - a)) for a, b in zip(r, f))),
    # RaSGAN (Jolicoeur-Martineau 2019, Eqs. 9-10): D: -E_x[log sigmoid(D(x) - E D(G(z)))]
    #   - E_z[log(1 - sigmoid(D(G(z)) - E D(x)))]; G: the same with real and fake swapped.
    "rpgan-avg": (lambda r, f: -mean(math.log(sigmoid(t - mean(f))) for t in r)
                  - mean(math.log(1 - sigmoid(t - mean(r))) for t in f),
                  lambda f, r: -mean(math.log(sigmoid(t - mean(r))) for t in f)
                  - mean(math.log(1 - sigmoid(t - mean(f))) for t in r)),
}


def test_registry_serves_every_loss():
    assert LOSSES.keys() == sorted(FORMULAS)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_loss_equals_its_formula(name):
    loss = build_loss(LossConfig(name=name))
    d_formula, g_formula = FORMULAS[name]
    real, fake = torch.tensor(REAL, dtype=torch.float64), torch.tensor(FAKE, dtype=torch.float64)
    assert loss.d_loss(real, fake).item() == pytest.approx(d_formula(REAL, FAKE), rel=1e-12)
    assert loss.g_loss(fake, real).item() == pytest.approx(g_formula(FAKE, REAL), rel=1e-12)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_loss_is_finite_with_gradients_at_extreme_logits(name):
    loss = build_loss(LossConfig(name=name))
    real = torch.tensor([-200.0, 200.0], requires_grad=True)
    fake = torch.tensor([200.0, -200.0], requires_grad=True)
    total = loss.d_loss(real, fake) + loss.g_loss(fake, real)
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()


def test_logistic_losses_grow_linearly_where_sigmoid_then_log_would_overflow():
    # -log sigmoid(-200) = 200 (to 1e-87); sigmoid-then-log gives log(0) = -inf in fp32.
    real, fake = torch.tensor([-200.0]), torch.tensor([200.0])
    assert build_loss(LossConfig(name="nonsaturating")).d_loss(real, fake).item() == pytest.approx(400.0)
    assert build_loss(LossConfig(name="nonsaturating")).g_loss(torch.tensor([-200.0])).item() == pytest.approx(200.0)
    assert build_loss(LossConfig(name="minimax")).g_loss(fake).item() == pytest.approx(-200.0)
    # The saturating G loss really saturates: its gradient vanishes where D rejects the fakes.
    rejected = torch.tensor([-20.0], requires_grad=True)
    build_loss(LossConfig(name="minimax")).g_loss(rejected).backward()
    assert abs(rejected.grad.item()) < 1e-8
    rejected.grad = None
    build_loss(LossConfig(name="nonsaturating")).g_loss(rejected).backward()
    assert rejected.grad.item() == pytest.approx(-1.0, abs=1e-6)


def test_loss_names_come_from_config_and_errors_name_the_key():
    assert from_dict({"loss": {"name": "hinge"}}).loss.name == "hinge"
    with pytest.raises(ConfigError, match=r"loss\.name.*hinge.*lsgan.*minimax.*nonsaturating.*rpgan.*wasserstein"):
        from_dict({"loss": {"name": "vanilla"}})
    with pytest.raises(ConfigError, match=r"loss\.penalties\[0\]\.name.*r1.*r2.*wgan-gp"):
        from_dict({}, ["loss.penalties=[{name: gp}]"])


def test_weight_clipping_only_with_wasserstein():
    with pytest.raises(ConfigError, match="loss.clip"):
        from_dict({"loss": {"name": "hinge", "clip": 0.01}})
    assert build_loss(from_dict({"loss": {"name": "wasserstein", "clip": 0.01}}).loss).name == "wasserstein"


def test_clip_weights_clamps_every_parameter_and_zero_is_off():
    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1))
    with torch.no_grad():
        for p in D.parameters():
            p.mul_(10)
    before = [p.clone() for p in D.parameters()]
    clip_weights(D, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, D.parameters()))
    clip_weights(D, 0.01)
    for old, new in zip(before, D.parameters()):
        assert new.abs().max() <= 0.01
        assert torch.equal(new, old.clamp(-0.01, 0.01))
