"""Small parts of the trainer checked against their definitions: EMA, DiffAugment, intervals, stats."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.training.augment import diff_augment, parse_policy
from pipeline.training.ema import EMA
from pipeline.training.loop import crossed
from pipeline.training.stats import Stats


def test_ema_half_life_is_counted_in_images_and_buffers_are_copied():
    G = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(G, halflife_kimg=1.0, rampup=0.0)
    start = ema.model[0].weight.clone()
    with torch.no_grad():
        G[0].weight.add_(1.0)
        G[1].running_mean.fill_(3.0)
    # 1000 images in 10 steps of 100 (or 4 steps of 250): half of the gap is closed either way.
    for batch in (100, 250):
        ema = EMA(G, 1.0, 0.0)
        ema.model[0].weight.copy_(start)
        for _ in range(1000 // batch):
            ema.update(G, cur_nimg=10_000, batch=batch)
        gap = (G[0].weight - ema.model[0].weight) / (G[0].weight - start)
        assert torch.allclose(gap, torch.full_like(gap, 0.5), atol=1e-6)
    assert torch.equal(ema.model[1].running_mean, torch.full((2,), 3.0))
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    # ramp-up: early in training the half-life is rampup x images seen
    ramped = EMA(G, 10.0, rampup=0.05)
    assert ramped.beta(cur_nimg=2000, batch=100) == pytest.approx(0.5 ** (100 / 100))
    assert ramped.beta(cur_nimg=10**7, batch=100) == pytest.approx(0.5 ** (100 / 10_000))


def test_diff_augment_keeps_shape_and_passes_gradients():
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    y = diff_augment(x * 2 - 1, parse_policy("color,translation,cutout"))
    assert y.shape == x.shape and not torch.allclose(y, x * 2 - 1)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # cutout zeroes exactly half the side squared per sample (away from the borders)
    torch.manual_seed(0)
    ones = torch.ones(64, 1, 16, 16)
    zeroed = (diff_augment(ones, ["cutout"]) == 0).flatten(1).sum(1).float()
    assert zeroed.max() == 64 and zeroed.min() >= 16
    # translation moves content without scaling it: a one-pixel image stays one pixel (or leaves)
    dot = torch.zeros(32, 1, 16, 16)
    dot[:, :, 8, 8] = 1
    assert set(diff_augment(dot, ["translation"]).flatten(1).sum(1).tolist()) <= {0.0, 1.0}
    with pytest.raises(ConfigError, match="augment.diffaugment: unknown op 'flip'"):
        parse_policy("color,flip")


def test_intervals_fire_on_absolute_multiples():
    assert crossed(990, 1010, 1.0) and not crossed(1000, 1500, 1.0) and crossed(1999, 2000, 1.0)
    assert not crossed(0, 10**6, 0.0)
    fired = [n for n in range(64, 5000, 64) if crossed(n - 64, n, 0.5)]
    assert fired == [512, 1024, 1536, 2048, 2560, 3008, 3520, 4032, 4544]


def test_stats_means_leave_out_non_finite_reports():
    s = Stats(torch.device("cpu"))
    for v in (1.0, 3.0, float("nan"), float("inf")):
        s.report("Loss/D/main", torch.tensor(v))
    s.report("Grad/G/norm", 2.0)
    assert s.reduce() == {"Grad/G/norm": 2.0, "Loss/D/main": 2.0}
    s.report("Only/nan", float("nan"))
    assert math.isnan(s.reduce()["Only/nan"]) and s.reduce() == {}
