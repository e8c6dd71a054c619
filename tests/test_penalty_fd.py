"""R1/R2 by finite differences (`approximate: true`): q = (D(x + sigma eps) - D(x)) / sigma, eps ~ N(0, I),
in place of ||grad_x D||^2, at the exact penalty's weight.

E[q^2] = ||grad_x D||^2 in the limit of small sigma (exactly, for every sigma, on a linear D), so a
batch of K copies of a few points gives the exact penalty within the sampling error of a mean of K
chi-square(1) variables: relative standard deviation sqrt(2 / K). The tolerances below are 4-6
such standard deviations (seeded, so each test is deterministic).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import cli
from pipeline.catalog import from_dict, load_config
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.losses import R1, R2, build_penalties, joint_penalty
from pipeline.networks import NETWORKS, build_networks
from pipeline.training.augment import diff_augment
from pipeline.training.phases import MicroBatch, build_phases


class LinearD(nn.Module):
    def __init__(self, w: torch.Tensor, b: float = 0.3):
        super().__init__()
        self.w, self.b = nn.Parameter(w.clone()), nn.Parameter(torch.tensor(b))

    def forward(self, x, labels=None):
        return x.flatten(1) @ self.w + self.b


class SmoothD(nn.Module):
    """A small MLP with smooth activations: its input gradient varies with x."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, 32), nn.Softplus(), nn.Linear(32, 1))

    def forward(self, x, labels=None):
        return self.net(x.flatten(1)).squeeze(1)


def _copies(k: int, n: int = 8, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g).repeat(k, 1), torch.randn(n, dim, generator=g).repeat(k, 1)


def test_on_a_linear_d_the_estimate_is_the_squared_weight_norm_and_scales_like_the_exact_one():
    torch.manual_seed(0)
    w = torch.tensor([0.3, -1.2, 0.5, 2.0, 0.1, -0.7])
    D = LinearD(w)
    real, fake = _copies(6000)                   # 48,000 draws: sqrt(2/K) = 0.65%
    for cls, sigma in ((R1, 0.01), (R2, 0.3)):   # any sigma: a linear D's difference is exact
        penalty = cls(weight=3.0, interval=4, approximate=True, sigma=sigma)
        loss, stats = penalty(D, real, fake)
        value = stats[f"Loss/D/{penalty.name}_approx"].item()
        assert value == pytest.approx(0.5 * w.square().sum().item(), rel=0.03)
        assert loss.item() == pytest.approx(3.0 * 4 * value, rel=1e-6)       # gamma/2 E q^2 x interval
        assert stats[f"Grad/D/{penalty.name}_approx_rms"].item() == pytest.approx(w.norm().item(), rel=0.02)
        assert not any(k in stats for k in (f"Loss/D/{penalty.name}", f"Grad/D/{penalty.name}_norm"))


def test_on_a_smooth_d_value_and_parameter_gradient_match_the_exact_penalty_for_small_sigma():
    torch.manual_seed(0)
    D = SmoothD()
    real, fake = _copies(4096)                   # 32,768 draws per penalty: sqrt(2/K) = 0.8%
    exact, exact_stats = joint_penalty([R1(1.0), R2(1.0)], D, real, fake)
    torch.manual_seed(1)
    approx, approx_stats = joint_penalty([R1(1.0, approximate=True), R2(1.0, approximate=True)], D, real, fake)
    for name in ("r1", "r2"):
        assert approx_stats[f"Loss/D/{name}_approx"].item() == pytest.approx(exact_stats[f"Loss/D/{name}"].item(),
                                                                              rel=0.04)
    params = [p for p in D.parameters()][:-1]    # D's output bias reaches neither (its gradient is 0 in both)
    g_exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact, params)])
    g_approx = torch.cat([g.flatten() for g in torch.autograd.grad(approx, params)])
    assert (g_approx - g_exact).norm() < 0.06 * g_exact.norm()
    # A step of the size of the points' spread is no derivative any more.
    torch.manual_seed(1)
    coarse = R1(1.0, approximate=True, sigma=1.0)(D, real, None)[1]["Loss/D/r1_approx"].item()
    assert abs(coarse / exact_stats["Loss/D/r1"].item() - 1) > 0.1


def test_both_forwards_see_the_same_augmentation():
    # Clean inputs through DiffAugment: the exact penalty differentiates through each sample's
    # augmentation; the finite difference must perturb through that same draw (with two different
    # draws, D(aug(x + sigma eps)) - D(aug'(x)) is a difference of two translated images / 0.01).
    torch.manual_seed(0)
    D = LinearD(torch.randn(64))
    x = torch.randn(4, 1, 8, 8).repeat(2048, 1, 1, 1)
    augment = lambda t: diff_augment(t, ["color", "translation", "cutout"])     # noqa: E731
    exact = R1(1.0)(D, x, None, augment=augment)[1]["Loss/D/r1"].item()
    approx = R1(1.0, approximate=True)(D, x, None, augment=augment)[1]["Loss/D/r1_approx"].item()
    assert approx == pytest.approx(exact, rel=0.06)


def test_forwards_run_in_fp32_whatever_the_autocast():
    # A bf16 logit difference over sigma = 0.01 is rounding noise: the penalty's forwards run with
    # autocast off, so under bf16 it is the fp32 value to the last bit (same eps draws).
    torch.manual_seed(0)
    _, D = build_networks(ModelConfig(name="dcgan", g_width=0.125, d_width=0.125), resolution=32, channels=3,
                          num_classes=0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    penalty = R1(1.0, approximate=True)
    torch.manual_seed(5)
    plain = penalty(D, x, None)[0]
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = penalty(D, x, None)[0]
    assert under_bf16.dtype == torch.float32 and torch.equal(plain, under_bf16)


@pytest.mark.parametrize("name", NETWORKS.keys())
def test_every_d_parameter_is_in_the_graph_without_a_zero_times_logits_term(name):
    # DDP's reducer waits for a gradient of every parameter; the difference of two forwards uses
    # them all (the exact penalty needs 0 * logits for that), and no parameter's gradient is NaN.
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, g_width=1 / 16, d_width=1 / 16, w_dim=16, mapping_layers=2, conditional=True)
    G, D = build_networks(cfg, resolution=0 if name == "mlp" else 32, channels=8 if name == "mlp" else 3,
                          num_classes=3)
    labels = torch.tensor([0, 1, 2, 1])
    fake = G(torch.randn(4, G.z_dim), labels).detach()
    real = torch.rand_like(fake) * 2 - 1
    loss, _ = joint_penalty([R1(1.0, approximate=True), R2(1.0, approximate=True)], D, real, fake, labels)
    params = dict(D.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    assert [n for n, g in zip(params, grads) if g is None or not torch.isfinite(g).all()] == []


def test_a_lazy_approximate_penalty_gets_its_own_d_step_scaled_by_its_interval():
    cfg = from_dict({"model": {"name": "mlp", "g_width": 0.125, "d_width": 0.125},
                     "loss": {"name": "rpgan", "penalties": [{"name": "r1", "weight": 0.5, "approximate": True},
                                                             {"name": "r2", "weight": 0.5, "interval": 4,
                                                              "approximate": True, "sigma": 0.02}]}})
    (r1, r2) = build_penalties(cfg.loss)
    assert (r1.approximate, r1.sigma, r2.interval, r2.sigma) == (True, 0.01, 4, 0.02)
    torch.manual_seed(0)
    G, D = build_networks(cfg.model, resolution=0, channels=6, num_classes=0)
    seen = {}
    phases = build_phases(cfg, G=G, D=D, device=torch.device("cpu"), dtype=None, report=seen.__setitem__)
    assert [p.name for p in phases] == ["D", "Dreg", "G"] and len(phases.named("D").terms) == 2
    mb = MicroBatch(z=torch.randn(8, G.z_dim), labels=None, real=torch.randn(8, 6), fake=torch.randn(8, 6))
    loss = phases.named("Dreg").terms[0](mb)
    assert set(seen) == {"Loss/D/r2_approx", "Grad/D/r2_approx_rms"}
    assert loss.item() == pytest.approx(0.5 * 4 * seen["Loss/D/r2_approx"].item(), rel=1e-6)
    phases.named("D").terms[1](mb)
    assert "Loss/D/r1_approx" in seen and "Loss/D/r1" not in seen


@pytest.mark.parametrize("entry, model", [("{name: wgan-gp, weight: 10, approximate: true}", "dcgan"),
                                          ("{name: pl, weight: 2, interval: 4, approximate: true}", "stylegan2"),
                                          ("{name: ortho, weight: 0.0001, approximate: true}", "biggan")])
def test_approximate_is_refused_where_it_has_no_meaning(entry, model):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.name={model}", f"loss.penalties=[{{name: r1, weight: 1}}, {entry}]"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("loss.penalties[1].approximate:")
    with pytest.raises(ConfigError, match=r"^loss\.penalties\[0\]\.sigma=0\.1 .*approximate: true"):
        load_config(None, ["loss.penalties=[{name: r1, weight: 1, sigma: 0.1}]"])
    with pytest.raises(ConfigError, match=r"^loss\.penalties\[0\]\.sigma: 0\.0 is below the minimum"):
        load_config(None, ["loss.penalties=[{name: r1, weight: 1, approximate: true, sigma: 0}]"])


def test_ganpipe_train_runs_approximate_r1_and_r2(tmp_path, mnist_dir):
    # The demo's recipe shape on the tiny DCGAN: R1 every step, R2 lazy (its own Dreg step), both
    # approximate, through DiffAugment with clean inputs.
    run = tmp_path / "run"
    cli("train", "--config", "configs/mnist_rpgan.yaml", "--run-dir", str(run), f"data.path={mnist_dir}",
        "model.g_width=0.125", "model.d_width=0.125", "data.batch_size=16", "data.num_workers=0",
        "data.shuffle_buffer=100", "log.progress=false", "train.threads=1", "log.grid_size=16",
        "loss.penalties=[{name: r1, weight: 0.1, approximate: true}, "
        "{name: r2, weight: 0.1, interval: 2, approximate: true, sigma: 0.02}]",
        "augment.diffaugment=translation", "train.total_kimg=0.128", "train.tick_kimg=0.064",
        "train.snapshot_kimg=0", "train.checkpoint_kimg=0")
    import json
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for key in ("Loss/D/r1_approx", "Loss/D/r2_approx", "Grad/D/r1_approx_rms", "Grad/D/r2_approx_rms",
                    "Grad/Dreg/norm"):
            assert key in row and math.isfinite(row[key]), key
        assert "Loss/D/r1" not in row and row["Steps/skipped_nonfinite"] == 0
