"""The trainer's phases: a global batch split into micro-batches gives the update of one batch.

Every phase of the real `build_phases` (D main with an every-step penalty, D's lazy penalty on its
own step, G main) is accumulated once over the whole batch and once over micro-batches, from the
same weights and the same images. Tolerances: gradients within atol 1e-6 (float32 summation
order); parameters after the Adam step within atol 1e-6, i.e. 0.5% of one step of lr 2e-4 (Adam
divides by sqrt(v), so a near-zero gradient moves its weight by up to lr whatever its size, and
its summation error shows there; a gradient that is zero in truth is compared as a gradient only). The MLP GAN is used because it has no batch statistics: with
BatchNorm in G each micro-batch sees its own statistics, as under any gradient accumulation.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.catalog import from_dict
from pipeline.networks import build_networks
from pipeline.training.phases import MicroBatch, NonFiniteGuard, accumulate, autocast_for, build_phases, step

CPU = torch.device("cpu")


def setup(penalty: str, interval: int, model: str = "mlp", penalties=(), **loss):
    single = [] if penalty == "none" else [{"name": penalty, "weight": 1.0, "interval": interval}]
    cfg = from_dict({"model": {"name": model, "g_width": 0.125, "d_width": 0.125},
                     "loss": {"penalties": single + list(penalties), **loss}})
    torch.manual_seed(0)
    G, D = build_networks(cfg.model, resolution=8, channels=1, num_classes=0)
    gen = torch.Generator().manual_seed(1)
    batch = 8
    z = torch.randn(batch, G.z_dim, generator=gen)
    real = torch.rand(batch, 1, 8, 8, generator=gen) * 2 - 1
    with torch.no_grad():
        fake = G(z, None)
    return cfg, G, D, z, real, fake


def split(t: torch.Tensor | None, parts: int) -> list:
    return [None] * parts if t is None else list(t.chunk(parts))


def assert_same_update(whole_grads, split_grads, whole_params, split_params) -> None:
    """Gradients within atol 1e-6; weights after the step within 1e-6 wherever the gradient is not
    zero in truth. Adam's first step moves a weight by lr x g / (|g| + eps): a gradient that is 0
    (rpgan's loss cancels D's output bias between real and fake) but comes out 1e-8 from float
    summation moves its weight by up to lr / 2, so there only the gradient is compared."""
    for a, b in zip(whole_grads, split_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for g, a, b in zip(whole_grads, whole_params, split_params):
        real = g.abs() > 1e-6
        torch.testing.assert_close(b[real], a[real], rtol=0, atol=1e-6)


def run_phase(cfg, G, D, name: str, z, real, fake, parts: int):
    G, D = copy.deepcopy(G), copy.deepcopy(D)
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=lambda name, value: None)
    phase = phases.named(name)
    mbs = [MicroBatch(z=a, labels=None, real=b, fake=c)
           for a, b, c in zip(split(z, parts), split(real, parts), split(fake, parts))]
    torch.manual_seed(5)            # wgan-gp draws its interpolation weights from the global RNG
    accumulate(phase, mbs, autocast_for(CPU, None))
    grads = [p.grad.clone() for p in phase.params]
    step(phase, NonFiniteGuard(10, lambda: "none", lambda: 0.0), lambda name, value: None)
    return grads, [p.detach().clone() for p in phase.params]


@pytest.mark.parametrize("penalty,interval,name", [
    ("r1", 1, "D"), ("r2", 1, "D"), ("none", 1, "D"), ("wgan-gp", 1, "D"),
    ("r1", 4, "Dreg"), ("r2", 2, "Dreg"), ("wgan-gp", 2, "Dreg"), ("none", 1, "G"),
])
@pytest.mark.parametrize("parts", [2, 4])
def test_micro_batches_give_the_update_of_one_batch(penalty, interval, name, parts):
    cfg, G, D, z, real, fake = setup(penalty, interval)
    whole_grads, whole_params = run_phase(cfg, G, D, name, z, real, fake, 1)
    split_grads, split_params = run_phase(cfg, G, D, name, z, real, fake, parts)
    assert any(g.abs().max() > 0 for g in whole_grads)
    assert_same_update(whole_grads, split_grads, whole_params, split_params)


def test_phase_list_is_data_and_a_lazy_penalty_is_its_own_entry():
    cfg, G, D, *_ = setup("r1", 4)
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=lambda name, value: None)
    assert [(p.name, p.side, p.interval, len(p.terms)) for p in phases] == [
        ("D", "D", 1, 1), ("Dreg", "D", 4, 1), ("G", "G", 1, 1)]
    assert [p.name for p in phases.due("D", 0)] == ["D", "Dreg"]
    assert [p.name for p in phases.due("D", 1)] == ["D"]
    # StyleGAN2's lazy adjustment: lr x 4/5, betas ** (4/5)
    assert phases.named("D").optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.d_lr * 0.8)
    every = build_phases(setup("r1", 1)[0], G=G, D=D, device=CPU, dtype=None, report=lambda name, value: None)
    assert [(p.name, len(p.terms)) for p in every] == [("D", 2), ("G", 1)]


def test_a_phase_computes_no_gradients_for_the_network_it_does_not_train():
    cfg, G, D, z, real, fake = setup("r1", 1)
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=lambda name, value: None)
    accumulate(phases.named("G"), [MicroBatch(z=z, labels=None)], autocast_for(CPU, None))
    assert all(p.grad is None for p in D.parameters()) and any(p.grad is not None for p in G.parameters())
    assert all(p.requires_grad for p in D.parameters())        # unfrozen again afterwards


R3 = [{"name": "r1", "weight": 0.5}, {"name": "r2", "weight": 0.5}]


@pytest.mark.parametrize("loss,penalties,name", [
    ("rpgan", R3, "D"), ("rpgan", R3, "G"),
    ("rpgan", [{"name": "r1", "weight": 0.5, "interval": 4}, {"name": "r2", "weight": 0.5, "interval": 4}], "Dreg"),
    ("hinge", [{"name": "r1", "weight": 1.0, "interval": 2}, {"name": "r2", "weight": 1.0, "interval": 8}], "Dreg8"),
])
def test_several_penalties_and_the_relativistic_loss_accumulate_like_one_batch(loss, penalties, name):
    """rpgan pairs sample i's real with its fake, so it splits exactly; rpgan-avg does not (its
    means are over the micro-batch, as over a process's batch under DDP)."""
    cfg, G, D, z, real, fake = setup("none", 1, name=loss, penalties=penalties)
    whole_grads, whole_params = run_phase(cfg, G, D, name, z, real, fake, 1)
    split_grads, split_params = run_phase(cfg, G, D, name, z, real, fake, 4)
    assert_same_update(whole_grads, split_grads, whole_params, split_params)


def test_penalties_group_by_interval_and_the_lazy_adjustment_counts_every_extra_step():
    pens = [{"name": "r1", "weight": 1.0, "interval": 2}, {"name": "r2", "weight": 1.0, "interval": 8}]
    cfg, G, D, *_ = setup("wgan-gp", 1, penalties=pens)
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=lambda name, value: None)
    assert [(p.name, p.interval, len(p.terms)) for p in phases] == [
        ("D", 1, 2), ("Dreg2", 2, 1), ("Dreg8", 8, 1), ("G", 1, 1)]
    assert phases.named("D").ratio == pytest.approx(1 / (1 + 1 / 2 + 1 / 8))
    with pytest.raises(Exception, match="names a penalty twice"):
        build_phases(setup("r1", 1, penalties=[{"name": "r1"}])[0], G=G, D=D, device=CPU, dtype=None,
                     report=lambda name, value: None)


def test_a_clean_penalty_takes_the_gradient_through_the_augmentation():
    """penalty_inputs=clean: grad w.r.t. the un-augmented x of D(augment(x)). With augment(x) = 2x,
    R1 of the clean input is 4x R1 of the augmented one (the chain rule), for a linear D."""
    from pipeline.losses import R1

    D = torch.nn.Linear(3, 1, bias=False)
    x = torch.randn(5, 3)
    clean, _ = R1(1.0)(lambda t, y: D(t).squeeze(1), x, None, augment=lambda t: 2 * t)
    augmented, _ = R1(1.0)(lambda t, y: D(t).squeeze(1), 2 * x, None)
    torch.testing.assert_close(clean, 4 * augmented)
