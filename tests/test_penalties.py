"""Gradient penalties: analytic values, lazy scaling, AMP (bf16, fp16 + GradScaler) and DDP.

On a linear D(x) = w.x + b the input gradient is w for every x, so WGAN-GP is lambda (||w|| - 1)^2
and R1/R2 are gamma/2 ||w||^2, whatever the points; their gradients with respect to w are known too.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.catalog import from_dict
from pipeline.config import LossConfig, ModelConfig, PenaltyConfig
from pipeline.losses import PENALTIES, R1, R2, WGANGP, build_penalties
from pipeline.networks import NETWORKS, build_networks


class LinearD(nn.Module):
    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x, labels=None):
        return x.flatten(1) @ self.w + self.b


W = torch.tensor([0.3, -1.2, 0.5, 2.0, 0.1, -0.7])     # ||w|| = 2.5468...


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)


def test_registry_and_config_serve_every_penalty():
    assert PENALTIES.keys() == ["ortho", "pl", "r1", "r2", "wgan-gp"]
    assert {k: PENALTIES.get(k).side for k in PENALTIES.keys()} == {
        "ortho": "G", "pl": "G", "r1": "D", "r2": "D", "wgan-gp": "D"}
    assert build_penalties(LossConfig()) == []
    (p,) = build_penalties(LossConfig(penalties=[PenaltyConfig(name="r1", weight=0.5, interval=16)]))
    assert isinstance(p, R1) and (p.weight, p.interval) == (0.5, 16)


@pytest.mark.parametrize("interval", [1, 4])
def test_wgan_gp_on_a_linear_critic_is_analytic(interval):
    D = LinearD(W, 0.3)
    real, fake = _batch()
    loss, stats = WGANGP(weight=10.0, interval=interval)(D, real, fake)
    norm = W.norm().item()
    assert stats["Grad/D/wgan-gp_norm"].item() == pytest.approx(norm, rel=1e-6)
    assert stats["Loss/D/wgan-gp"].item() == pytest.approx((norm - 1) ** 2, rel=1e-6)
    assert loss.item() == pytest.approx(10.0 * interval * (norm - 1) ** 2, rel=1e-6)
    loss.backward()
    # d/dw lambda k (||w|| - 1)^2 = 2 lambda k (||w|| - 1) w / ||w||; b does not reach the gradient.
    assert torch.allclose(D.w.grad, 2 * 10.0 * interval * (norm - 1) * W / norm, rtol=1e-5)
    assert D.b.grad is not None and D.b.grad.item() == 0.0


@pytest.mark.parametrize("cls, uses", [(R1, "real"), (R2, "fake")])
def test_r1_r2_on_a_linear_critic_are_analytic(cls, uses):
    D = LinearD(W, -0.4)
    real, fake = _batch()
    penalty = cls(weight=3.0, interval=2)
    loss, stats = penalty(D, real, fake)
    sq = W.square().sum().item()
    assert stats[f"Loss/D/{penalty.name}"].item() == pytest.approx(0.5 * sq, rel=1e-6)
    assert loss.item() == pytest.approx(3.0 / 2 * sq * 2, rel=1e-6)    # gamma/2 ||w||^2 x interval
    loss.backward()
    assert torch.allclose(D.w.grad, 3.0 * 2 * W, rtol=1e-5)           # d/dw gamma/2 k ||w||^2
    # R1 needs only real points and R2 only fake ones.
    other = {"real": (real, None), "fake": (None, fake)}[uses]
    assert penalty(D, *other)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_wgan_gp_points_lie_on_segments_between_real_and_fake():
    torch.manual_seed(0)
    real, fake = torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    real = torch.where((real - fake).abs() < 0.05, fake + 0.05, real)    # no near-zero divisor below
    x = WGANGP().points(real, fake)
    # x = eps real + (1 - eps) fake with one eps in [0, 1] per sample.
    eps = ((x - fake) / (real - fake)).flatten(1)
    assert torch.allclose(eps, eps[:, :1].expand_as(eps), atol=1e-4)
    assert eps.min() >= -1e-5 and eps.max() <= 1 + 1e-5 and eps[:, 0].std() > 0.1


def test_lazy_interval_schedules_and_scales():
    from pipeline.training.phases import build_phases

    def due(interval: int, steps: int) -> list[int]:
        """The D steps at which the penalty runs (in D's main phase when interval 1, else in Dreg)."""
        cfg = from_dict({"model": {"name": "mlp", "g_width": 0.125, "d_width": 0.125},
                         "loss": {"penalties": [{"name": "r1", "weight": 1.0, "interval": interval}]}})
        G, D = build_networks(cfg.model, resolution=0, channels=6, num_classes=0)
        phases = build_phases(cfg, G=G, D=D, device=torch.device("cpu"), dtype=None, report=lambda n, v: None)
        return [k for k in range(steps) if sum(len(p.terms) for p in phases.due("D", k)) == 2]

    assert due(4, 10) == [0, 4, 8]
    assert due(1, 3) == [0, 1, 2]
    penalty = R1(weight=1.0, interval=4)
    D = LinearD(W, 0.0)
    real, _ = _batch()
    assert penalty(D, real, None)[0].item() == pytest.approx(4 * R1(weight=1.0)(D, real, None)[0].item())


def _tiny(name: str, num_classes: int = 0):
    cfg = ModelConfig(name=name, g_width=1 / 16, d_width=1 / 16, w_dim=16, mapping_layers=2,
                      conditional=bool(num_classes))
    return build_networks(cfg, resolution=0 if name == "mlp" else 32, channels=3 if name != "mlp" else 8,
                          num_classes=num_classes)


@pytest.mark.parametrize("name", NETWORKS.keys())
@pytest.mark.parametrize("penalty_name", ["wgan-gp", "r1", "r2"])
def test_every_d_parameter_gets_a_gradient(name, penalty_name):
    torch.manual_seed(0)
    G, D = _tiny(name, num_classes=3)
    labels = torch.tensor([0, 1, 2, 1])
    fake = G(torch.randn(4, G.z_dim), labels).detach()
    real = torch.rand_like(fake) * 2 - 1
    penalty = PENALTIES.get(penalty_name)()
    params = dict(D.named_parameters())
    # The penalty alone leaves some parameters out of the graph (the output bias at least) ...
    raw = torch.autograd.grad(_raw_penalty(penalty, D, real, fake, labels), list(params.values()),
                              allow_unused=True)
    # (r3gan's D has no bias after its last layer: every parameter is in the penalty's graph)
    assert any(g is None for g in raw) or name == "r3gan"
    # ... and the 0 * logits term puts every one of them back, as DDP requires.
    loss, _ = penalty(D, real, fake, labels)
    loss.backward()
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing


def _raw_penalty(penalty, D, real, fake, labels):
    x = penalty.points(real, fake).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(D(x, labels).sum(), x, create_graph=True)
    return penalty.per_sample(g.flatten(1).square().sum(1)).mean()


# ----------------------------------------------------------------------------------------------
# Mixed precision. Tolerances: bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%) and the
# error of a few layers compounds, so bf16 must agree with fp32 to 5%; fp16 keeps 11 bits, 2%.

def _amp_case(name: str):
    torch.manual_seed(1)
    G, D = _tiny(name)
    D.eval()    # one fixed spectral-norm estimate, so repeated calls see the same D
    with torch.no_grad():
        fake = G(torch.randn(8, G.z_dim))
    real = torch.rand_like(fake) * 2 - 1
    return D, real, fake


def _penalty_value(penalty, D, real, fake, dtype=None, scaler=None):
    torch.manual_seed(2)    # the same interpolation points for every precision
    if dtype is None:
        return penalty(D, real, fake, scaler=scaler)
    with torch.autocast("cpu", dtype=dtype):
        return penalty(D, real, fake, scaler=scaler)


@pytest.mark.parametrize("name", NETWORKS.keys())
@pytest.mark.parametrize("penalty_cls", [WGANGP, R1])
def test_bf16_autocast_agrees_with_fp32(name, penalty_cls):
    D, real, fake = _amp_case(name)
    penalty = penalty_cls(weight=10.0)
    ref, ref_stats = _penalty_value(penalty, D, real, fake)
    low, low_stats = _penalty_value(penalty, D, real, fake, torch.bfloat16)
    assert low.dtype == torch.float32                           # the norm is computed in fp32
    key = f"Grad/D/{penalty.name}_norm"
    assert low_stats[key].item() == pytest.approx(ref_stats[key].item(), rel=0.05)
    assert low.item() == pytest.approx(ref.item(), rel=0.05, abs=1e-3)


@pytest.mark.parametrize("name", NETWORKS.keys())
def test_fp16_gradscaler_recipe_agrees_with_fp32(name):
    D, real, fake = _amp_case(name)
    penalty = R1(weight=10.0)
    ref, ref_stats = _penalty_value(penalty, D, real, fake)
    # Without autocast, scaling by 2^16 then dividing is exact: the unscale is right to the bit.
    big = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    same, _ = _penalty_value(penalty, D, real, fake, scaler=big)
    assert same.item() == pytest.approx(ref.item(), rel=1e-6)
    # fp16 autocast with the scaler at a value it backs off to.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    half, half_stats = _penalty_value(penalty, D, real, fake, torch.float16, scaler)
    assert torch.isfinite(half)
    assert half_stats["Grad/D/r1_norm"].item() == pytest.approx(ref_stats["Grad/D/r1_norm"].item(), rel=0.02)
    # 3% for the value: the SNGAN-initialised resnet D (Xavier, gain sqrt 2) compounds fp16's
    # rounding over its eight convolutions to 2.6% here.
    assert half.item() == pytest.approx(ref.item(), rel=0.03)


def test_fp16_scaling_rescues_gradients_that_underflow():
    # A critic whose output is scaled by 1e-7: its input gradients (about 3e-9 per pixel) lie below
    # fp16's smallest subnormal (6e-8) and vanish without loss scaling; 2^12 brings them back.
    torch.manual_seed(0)
    critic = _Critic(nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1)),
                     gain=1e-7)
    real = torch.randn(4, 3, 4, 4)
    ref = R1()(critic, real, None)[1]["Grad/D/r1_norm"].item()
    with torch.autocast("cpu", dtype=torch.float16):
        plain = R1()(critic, real, None)[1]["Grad/D/r1_norm"].item()
        scaled = R1()(critic, real, None, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert plain < 0.5 * ref
    assert scaled[1]["Grad/D/r1_norm"].item() == pytest.approx(ref, rel=0.02)


class _Critic(nn.Module):
    def __init__(self, net, gain):
        super().__init__()
        self.net, self.gain = net, gain

    def forward(self, x, labels=None):
        return self.net(x).squeeze(1) * self.gain


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    # At the default initial scale 2^16 the scaled output gradient overflows fp16 (max 65504): the
    # penalty is non-finite, so scaler.step skips D's update and update() backs the scale off, after
    # which the same step goes through.
    D, real, fake = _amp_case("dcgan")
    D.train()
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = [p.detach().clone() for p in D.parameters()]
    for attempt in range(10):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _ = R1(weight=10.0)(D, real, fake, scaler=scaler)
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if attempt == 0:
            assert not torch.isfinite(loss)
            assert all(torch.equal(a, b) for a, b in zip(before, D.parameters()))
            assert scaler.get_scale() == scale / 2
        if torch.isfinite(loss):
            break
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, D.parameters()))


# ----------------------------------------------------------------------------------------------
# DDP: two gloo processes; the penalty-only backward must reduce every D parameter.

def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name in NETWORKS.keys():            # every family, conditional (projection D)
            torch.manual_seed(0)                # the same initial D on both ranks
            G, D = _tiny(name, num_classes=3)
            D.eval()        # spectral norm's power iteration frozen, so the reference forward sees the same D
            ddp = nn.parallel.DistributedDataParallel(D)
            penalty = R1(weight=10.0, interval=2)
            torch.manual_seed(100 + rank)       # different data per rank
            for _ in range(3):                  # DDP raises at the 2nd forward if a grad was missing
                labels = torch.randint(3, (4,))
                with torch.no_grad():
                    real = G(torch.randn(4, G.z_dim), labels).clamp(-1, 1)
                D.zero_grad(set_to_none=True)
                loss, _ = penalty(ddp, real, None, labels)
                loss.backward()
            reduced = torch.cat([p.grad.flatten() for p in D.parameters()])
            # The reference: this rank's own gradient of the same loss without DDP, averaged by hand.
            D.zero_grad(set_to_none=True)
            penalty(D, real, None, labels)[0].backward()
            local = torch.cat([p.grad.flatten() for p in D.parameters()])
            dist.all_reduce(local)
            results[name] = {"reduced": reduced, "manual": local / world}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_penalty_backward_under_ddp_reduces_every_parameter(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    assert set(ranks[0]) == set(NETWORKS.keys())
    for name in NETWORKS.keys():
        r0, r1 = ranks[0][name], ranks[1][name]
        assert torch.equal(r0["reduced"], r1["reduced"]), name        # every rank steps the same way
        assert torch.allclose(r0["reduced"], r0["manual"], rtol=1e-4, atol=1e-6), name
        assert r0["reduced"].abs().sum() > 0, name


@pytest.mark.parametrize("name, kinds", [("mlp", ("r1", "r2")), ("dcgan", ("r1", "r2", "wgan-gp")),
                                         ("r3gan", ("r1", "r2"))])
def test_joint_penalty_equals_the_sum_of_separate_ones(name, kinds):
    """R1 + R2 (+ WGAN-GP) from one forward on their points' concatenation (`joint_penalty`, what the
    trainer runs for a per-sample D) give the loss, the reported stats and D's gradients of calling
    each penalty and adding; conditional, through an augmentation, with lazy weights."""
    from pipeline.losses import joint_penalty

    torch.manual_seed(0)
    res = 0 if name == "mlp" else 32
    _, D = build_networks(ModelConfig(name=name, d_width=1 / 16, g_width=1 / 16, conditional=True),
                          resolution=res, channels=3, num_classes=3)
    assert not D.mixes_batch
    shape = (3,) if res == 0 else (3, res, res)
    real, fake, labels = torch.randn(4, *shape), torch.randn(4, *shape), torch.tensor([0, 2, 1, 2])
    penalties = [PENALTIES.get(k)(weight=0.5 + i, interval=1 + i) for i, k in enumerate(kinds)]
    flip = lambda x: x.flip(-1) * 0.9      # a differentiable augmentation

    def run(fn):
        torch.manual_seed(1)                # WGAN-GP's mixing weights: the same draws either way
        D.zero_grad()
        loss, stats = fn()
        loss.backward()
        return loss.detach(), stats, [p.grad.clone() for p in D.parameters()]

    def apart():
        out = [p(D, real, fake, labels, augment=flip) for p in penalties]
        return sum(o[0] for o in out), {k: v for o in out for k, v in o[1].items()}

    (l1, s1, g1), (l2, s2, g2) = run(apart), run(lambda: joint_penalty(penalties, D, real, fake, labels, augment=flip))
    assert torch.allclose(l1, l2, rtol=1e-5) and l1 > 0
    assert s1.keys() == s2.keys() == {f"{pre}{k}{post}" for k in kinds for pre, post in (("Loss/D/", ""), ("Grad/D/", "_norm"))}
    assert all(torch.allclose(s1[k], s2[k], rtol=1e-5) for k in s1)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g1, g2))
