"""Schedules over kimg: their shapes, what they set, and that a scheduled run resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.catalog import from_dict
from pipeline.config import ScheduleConfig
from pipeline.networks import build_networks
from pipeline.training import schedules
from pipeline.training.ema import EMA
from pipeline.training.phases import build_phases
from test_train import assert_same_state, final_state, rows, train


def test_shapes_follow_their_formulas():
    f = schedules.factor
    assert f(ScheduleConfig(), 123, 1000) == 1.0
    lin = ScheduleConfig(kind="linear", end=0.0)
    assert [f(lin, n, 1000) for n in (0, 250, 1000, 5000)] == [1.0, 0.75, 0.0, 0.0]
    cos = ScheduleConfig(kind="cosine", end=0.25)
    assert f(cos, 500, 1000) == pytest.approx(0.25 + 0.75 * (1 + math.cos(math.pi / 2)) / 2)
    assert f(cos, 0, 1000) == 1.0 and f(cos, 1000, 1000) == pytest.approx(0.25)
    warm = ScheduleConfig(kind="linear", end=0.5, warmup_kimg=0.1, length_kimg=0.4)
    assert f(warm, 50, 10_000) == pytest.approx(0.5)          # half-way up the warm-up
    assert f(warm, 300, 10_000) == pytest.approx(0.75)        # half-way from 1 to 0.5 after it
    assert f(warm, 9000, 10_000) == pytest.approx(0.5)
    # `start`: the multiple at the start, so a ramp up from 0 is written as it is said.
    up = ScheduleConfig(kind="cosine", start=0.0, end=1.0)
    assert [f(up, n, 1000) for n in (0, 1000, 2000)] == [0.0, 1.0, 1.0]
    assert f(up, 500, 1000) == pytest.approx(0.5)
    assert f(ScheduleConfig(kind="linear", start=2.0, end=0.5), 500, 1000) == pytest.approx(1.25)
    assert f(ScheduleConfig(start=0.5), 700, 1000) == 0.5                  # constant: `start` throughout
    assert f(ScheduleConfig(kind="linear", start=0.5, warmup_kimg=0.1), 50, 10_000) == pytest.approx(0.25)


@pytest.mark.parametrize("path", ["cifar10_r3gan", "ffhq64_r3gan", "imagenet32_r3gan"])
def test_r3gan_ramps_from_zero_give_the_values_of_the_old_one_millionth_form(path):
    """The R3GAN configs wrote "0 -> X" as X / 1e6 with end 1e6 before schedules had `start`: the
    EMA half-life and ADA's p they give now are the old ones up to that 1e-6 floor."""
    from conftest import REPO
    from pipeline.catalog import load_config

    cfg = load_config(REPO / "configs" / f"{path}.yaml")
    total = int(cfg.train.total_kimg * 1000)
    pairs = [(cfg.ema.halflife_kimg, cfg.ema.schedule), (cfg.augment.ada_p, cfg.augment.ada_p_schedule)]
    for value, new in pairs:
        assert (new.kind, new.start, new.end) == ("cosine", 0.0, 1.0)
        old = ScheduleConfig(kind="cosine", end=1e6, length_kimg=new.length_kimg)
        length = int(new.length_kimg * 1000)
        for nimg in (0, 1, length // 7, length // 2, length - 1, length, total):
            then, now = value / 1e6 * schedules.factor(old, nimg, total), value * schedules.factor(new, nimg, total)
            assert abs(now - then) <= 1e-6 * value * (1 + 1e-9), (nimg, now, then)
        assert value * schedules.factor(new, 0, total) == 0.0 and value * schedules.factor(new, total, total) == value


def test_a_zero_ema_half_life_and_a_zero_ada_p_are_valid():
    """What the ramps start from: an EMA half-life of 0 copies G; ADA at p = 0 leaves images alone."""
    from pipeline.training.ada import AdaptiveAugment

    G, _ = build_networks(from_dict({"model": {"name": "mlp", "g_width": 0.125}}).model, resolution=8, channels=1,
                          num_classes=0)
    ema = EMA(G, 0.0, rampup=0.0)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    assert ema.update(G, cur_nimg=64, batch=64) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), G.parameters()))
    ada = AdaptiveAugment(groups="blit,geom,color", p=0.55, adaptive=False)
    ada.set_p(0.0)
    x = torch.rand(4, 3, 8, 8)
    assert ada.p == 0.0 and ada(x) is x


def test_apply_sets_learning_rates_betas_penalty_weights_and_the_ema():
    cfg = from_dict({"model": {"name": "mlp", "g_width": 0.125, "d_width": 0.125},
                     "loss": {"name": "rpgan", "penalties": [
                         {"name": "r1", "weight": 0.1, "interval": 4, "schedule": {"kind": "linear", "end": 0.5}},
                         {"name": "r2", "weight": 0.1}]},
                     "train": {"total_kimg": 10},
                     "optim": {"lr_schedule": {"kind": "linear", "end": 0.0},
                               "beta2_schedule": {"kind": "linear", "end": 1.1}, "d_betas": [0.0, 0.9]},
                     "ema": {"schedule": {"kind": "linear", "end": 3.0}, "halflife_kimg": 1.0}})
    G, D = build_networks(cfg.model, resolution=8, channels=1, num_classes=0)
    phases = build_phases(cfg, G=G, D=D, device=torch.device("cpu"), dtype=None, report=lambda n, v: None)
    ema = EMA(G, 1.0)
    out = schedules.apply(cfg, phases, ema, 5000)
    ratio = phases.named("D").ratio
    assert ratio == pytest.approx(0.8)
    group = phases.named("D").optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(cfg.optim.d_lr * 0.5 * ratio)
    assert group["betas"][1] == pytest.approx((0.9 * 1.05) ** ratio)
    assert phases.named("G").optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.g_lr * 0.5)
    weights = {p.name: p.weight for p, _, _ in phases.penalties}
    assert weights == pytest.approx({"r1": 0.075, "r2": 0.1})
    assert ema.halflife_kimg == pytest.approx(2.0)
    assert out["Schedule/weight_r1"] == pytest.approx(0.075) and out["Schedule/lr_G"] == pytest.approx(1e-4)


def test_the_r3gan_recipe_with_schedules_resumes_exactly(tmp_path, mnist_dir):
    # length_kimg fixed: with 0 a schedule spans train.total_kimg, which the first leg shortens.
    recipe = ["loss.name=rpgan", "loss.penalties=[{name: r1, weight: 0.1}, {name: r2, weight: 0.1}]",
              "optim.lr_schedule={kind: cosine, end: 0.25, length_kimg: 0.256}",
              "optim.beta2_schedule={kind: linear, end: 1.01, length_kimg: 0.256}",
              "ema.schedule={kind: linear, end: 2.0, length_kimg: 0.256}", "train.checkpoint_kimg=0.128",
              "train.tick_kimg=0.064", "train.total_kimg=0.256"]
    train(tmp_path / "straight", mnist_dir, *recipe)
    train(tmp_path / "split", mnist_dir, *recipe, "train.total_kimg=0.128")
    out = train(tmp_path / "split", mnist_dir, *recipe)
    assert "resumed from" in out.stdout
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))
    last = rows(tmp_path / "straight")[-1]
    for key in ("Loss/D/r1", "Loss/D/r2", "Schedule/lr_G", "Schedule/weight_r2", "Schedule/ema_halflife_kimg"):
        assert key in last and last[key] == last[key], key
    assert last["Schedule/lr_G"] < 2e-4


def test_ada_in_training_logs_p_and_resumes_exactly(tmp_path, mnist_dir):
    # speed 0.05 kimg: p moves visibly within the run; interval 2 D steps.
    ada = ["augment.ada_groups=blit,geom,color", "augment.ada_target=0.6", "augment.ada_speed_kimg=0.05",
           "augment.ada_interval=2", "loss.penalties=[{name: r1, weight: 1, interval: 4}]",
           "train.checkpoint_kimg=0.128", "train.tick_kimg=0.064", "train.total_kimg=0.256"]
    train(tmp_path / "straight", mnist_dir, *ada)
    train(tmp_path / "split", mnist_dir, *ada, "train.total_kimg=0.128")
    train(tmp_path / "split", mnist_dir, *ada)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert_same_state(a, b)
    assert a["ada"]["p"] == b["ada"]["p"]
    ps = [r["Augment/p"] for r in rows(tmp_path / "straight")]
    assert any(p > 0 for p in ps) and all(0 <= p <= 1 for p in ps)
    assert all(-1 <= r["Augment/rt"] <= 1 for r in rows(tmp_path / "straight"))


def test_a_fixed_ada_p_follows_its_schedule_and_diffaugment_excludes_ada():
    from pipeline.errors import ConfigError
    from pipeline.training.phases import build_augment

    cfg = from_dict({"model": {"name": "mlp", "g_width": 0.125, "d_width": 0.125},
                     "train": {"total_kimg": 10},
                     "augment": {"ada_groups": "blit", "ada_target": 0.0, "ada_p": 0.4,
                                 "ada_p_schedule": {"kind": "linear", "end": 0.5}}})
    G, D = build_networks(cfg.model, resolution=8, channels=1, num_classes=0)
    phases = build_phases(cfg, G=G, D=D, device=torch.device("cpu"), dtype=None, report=lambda n, v: None)
    schedules.apply(cfg, phases, EMA(G, 1.0), 10_000)
    assert phases.ada.p == pytest.approx(0.2)
    phases.ada.update(4, 64)                                   # fixed: never adapts
    assert phases.ada.p == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="choose one augmentation"):
        from_dict({"augment": {"diffaugment": "color", "ada_groups": "blit"}})
    assert build_augment(from_dict({"augment": {"diffaugment": "color"}}).augment)[0] is None


def test_fine_tuning_starts_from_another_run_and_freezed_keeps_d_first_layers(tmp_path, mnist_dir):
    base = ["train.total_kimg=0.064", "train.tick_kimg=0.064"]
    train(tmp_path / "source", mnist_dir, *base)
    src = final_state(tmp_path / "source")
    out = train(tmp_path / "tuned", mnist_dir, *base, f"train.init_from={tmp_path / 'source'}",
                "train.freeze_d_layers=1").stdout
    assert f"initialised G, D, G_ema from {tmp_path / 'source'}" in out
    tuned = final_state(tmp_path / "tuned")
    assert tuned["config"]["train"]["init_from"] == str(tmp_path / "source")
    first = [k for k in src["D"] if k.startswith("features.0.")]
    assert first and all(torch.equal(tuned["D"][k], src["D"][k]) for k in first)          # frozen
    assert not torch.equal(tuned["D"]["out.weight"], src["D"]["out.weight"])              # trained
    # From a snapshot record: G and its EMA only.
    snap = sorted((tmp_path / "source" / "snapshots").glob("*.json"))[-1]
    out = train(tmp_path / "from_snapshot", mnist_dir, *base, f"train.init_from={snap}").stdout
    assert f"initialised G, G_ema from {snap}" in out
    bad = train(tmp_path / "bad", mnist_dir, *base, f"train.init_from={tmp_path}", check=False)
    assert bad.returncode == 2 and "train.init_from" in bad.stderr
