"""ADA: the augmentation pipeline and the controller of p.

    .venv/bin/python -m pytest tests/test_ada.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.training.ada import GROUPS, TRANSFORMS, AdaptiveAugment, parse_groups


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(n=8, c=3, size=16):
    return torch.rand(n, c, size, size) * 2 - 1


# Augmentation -----------------------------------------------------------------------------------

def test_p_zero_is_identity_without_work():
    x = images()
    state = torch.get_rng_state()
    assert AdaptiveAugment(p=0.0)(x) is x
    assert torch.equal(torch.get_rng_state(), state)          # no random draws either


@pytest.mark.parametrize("c", [1, 3])
def test_xflip_rot90_permute_pixels_of_each_image(c):
    x = images(16, c, 8)
    y = AdaptiveAugment(groups="xflip,rot90", p=1.0)(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    # A permutation of each image's pixels, the same one for every channel: compare sorted values.
    assert torch.equal(y.flatten(1).sort().values, x.flatten(1).sort().values)
    # Each output is one of the 8 flips/rotations of its input, exactly.
    for xi, yi in zip(x, y):
        variants = [torch.rot90(v, k, dims=(1, 2)) for v in (xi, xi.flip(2)) for k in range(4)]
        assert any(torch.equal(yi, v) for v in variants)


def test_blit_moves_whole_pixels_only():
    x = images(16, 3, 8)
    y = AdaptiveAugment(groups="blit", p=1.0)(x)
    assert not torch.equal(y, x)
    for xi, yi in zip(x, y):
        # Every output pixel (as an RGB triple) is some input pixel, bit for bit: no interpolation.
        src = xi.flatten(1).T
        dst = yi.flatten(1).T
        assert (dst[:, None, :] == src[None, :, :]).all(-1).any(1).all()


def test_xint_translation_is_a_shift_with_reflected_border():
    torch.manual_seed(3)
    x = images(32, 1, 16)
    y = AdaptiveAugment(groups="xint", p=1.0)(x)

    def source(shift):                 # where output pixel i comes from; the edge pixel is repeated
        i = torch.arange(16) - shift
        return torch.where(i < 0, -i - 1, torch.where(i > 15, 31 - i, i))

    shifted = 0
    for xi, yi in zip(x[:, 0], y[:, 0]):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(yi, xi[source(dy)][:, source(dx)])]
        assert found, "xint output is not an integer shift of its input with a mirrored border"
        shifted += found[0] != (0, 0)
    assert shifted > 16          # |t| <= 0.125 * 16 = 2 pixels; most images do move


def test_geometric_with_reflection_leaks_no_border():
    x = torch.full((16, 3, 16, 16), 0.7)
    y = AdaptiveAugment(groups="geom", p=1.0)(x)
    # Zero padding would pull in 0s at the corners after rotation/scaling; reflection keeps 0.7.
    assert torch.allclose(y, x, atol=1e-5)
    # And geom really warps a non-constant image.
    z = images(16, 3, 16)
    assert (AdaptiveAugment(groups="geom", p=1.0)(z) - z).abs().mean() > 0.05


def test_color_keeps_grey_grey_and_values_finite():
    grey = images(16, 1, 8).expand(16, 3, 8, 8).contiguous()
    y = AdaptiveAugment(groups="color", p=1.0)(grey)
    assert torch.isfinite(y).all()
    assert (y[:, 0] - y[:, 1]).abs().max() < 1e-5 and (y[:, 1] - y[:, 2]).abs().max() < 1e-5
    assert not torch.allclose(y, grey, atol=1e-3)             # brightness/contrast did act
    rgb = images(16, 3, 8)
    out = AdaptiveAugment(groups="hue,saturation", p=1.0)(rgb)
    assert torch.isfinite(out).all() and not torch.allclose(out, rgb, atol=1e-3)
    # Hue and saturation move colour around the grey axis: the per-pixel mean of RGB is kept.
    assert torch.allclose(out.mean(1), rgb.mean(1), atol=1e-5)


def test_color_on_one_channel_skips_hue_and_saturation():
    x = images(8, 1, 8)
    assert torch.allclose(AdaptiveAugment(groups="hue,saturation", p=1.0)(x), x, atol=1e-6)
    y = AdaptiveAugment(groups="lumaflip", p=1.0)(x)
    for xi, yi in zip(x, y):                                  # each image negated or kept
        assert torch.equal(yi, xi) or torch.allclose(yi, -xi, atol=1e-6)
    assert any(torch.allclose(yi, -xi, atol=1e-6) for xi, yi in zip(x, y))


def test_probability_is_per_image():
    x = images(200, 1, 8)
    y = AdaptiveAugment(groups="xflip", p=0.5)(x)
    flipped = sum(not torch.equal(a, b) for a, b in zip(x, y))
    assert 25 < flipped < 75                                  # binomial(200, p/2 = 0.25): mean 50, sd 6


@pytest.mark.parametrize("c", [1, 3])
def test_full_pipeline_shapes_dtypes_and_autocast(c):
    x = images(4, c, 8)
    ada = AdaptiveAugment(p=0.7)
    y = ada(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = ada(x)
        ybb = ada(x.bfloat16())
    assert yb.dtype == torch.float32 and ybb.dtype == torch.bfloat16
    assert torch.isfinite(yb).all() and torch.isfinite(ybb.float()).all()


def test_non_square_and_flat_inputs():
    with pytest.raises(ValueError, match="square"):
        AdaptiveAugment(groups="geom", p=0.5)(torch.zeros(2, 3, 8, 12))
    assert AdaptiveAugment(groups="color", p=0.5)(torch.zeros(2, 3, 8, 12)).shape == (2, 3, 8, 12)
    flat = torch.zeros(4, 2)
    assert AdaptiveAugment(p=0.5)(flat) is flat


def test_gradients_flow_and_a_penalty_takes_grad_through_it():
    x = images(4, 3, 8).requires_grad_(True)
    D = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    ada = AdaptiveAugment(p=1.0)
    logits = D(ada(x))
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    assert grad.abs().sum() > 0
    grad.square().sum().backward()                            # R1 through the augmentation
    weights = [D[0].weight, D[2].weight]                    # biases do not enter d logits / d x
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)


def test_gradcheck_with_fixed_draws():
    # Given its random draws the pipeline is affine in x; reseeding makes every call draw the same.
    x = images(2, 3, 8).double().requires_grad_(True)
    ada = AdaptiveAugment(p=0.8)

    def f(inp):
        torch.manual_seed(1)
        return ada(inp)

    assert f(x).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_randomness_comes_from_the_global_rng():
    x = images(4, 3, 8)
    ada = AdaptiveAugment(p=0.5)
    torch.manual_seed(7)
    a = ada(x)
    torch.manual_seed(7)
    assert torch.equal(ada(x), a)


# Controller ------------------------------------------------------------------------------------

def test_heuristic_moves_p_by_exactly_one_step_and_clamps():
    ada = AdaptiveAugment(p=0.5, target=0.6, speed_kimg=1.0, interval=4)
    step = 4 * 8 / 1000
    for d_step in range(1, 5):
        ada.observe(torch.full((8, 1), 3.0))
        ada.update(d_step, batch=8)
        assert ada.p == pytest.approx(0.5 if d_step < 4 else 0.5 + step, abs=1e-12)
    for d_step in range(5, 13):
        ada.observe(-torch.ones(8))
        ada.update(d_step, batch=8)
    assert ada.p == pytest.approx(0.5 + step - 2 * step, abs=1e-12)
    assert ada.stats()["Augment/rt"] == -1.0
    low = AdaptiveAugment(p=0.005, speed_kimg=1.0, interval=1)
    low.observe(-torch.ones(8))
    low.update(1, batch=8)
    assert low.p == 0.0
    high = AdaptiveAugment(p=0.995, speed_kimg=1.0, interval=1)
    high.observe(torch.ones(8))
    high.update(1, batch=8)
    assert high.p == 1.0


def test_rt_below_target_lowers_p_and_mixed_signs_average():
    ada = AdaptiveAugment(p=0.5, target=0.6, speed_kimg=1.0, interval=2)
    ada.observe(torch.tensor([1.0, 1.0, 1.0, -1.0]))          # rt = 0.5 over both steps
    ada.update(1, batch=4)
    ada.observe(torch.tensor([1.0, 1.0, 1.0, -1.0]))
    ada.update(2, batch=4)
    assert ada.stats()["Augment/rt"] == pytest.approx(0.5)
    assert ada.p == pytest.approx(0.5 - 2 * 4 / 1000)


def test_p_goes_from_0_to_1_in_speed_kimg():
    batch, interval, speed_kimg = 16, 4, 1.6
    ada = AdaptiveAugment(speed_kimg=speed_kimg, interval=interval)
    nimg, d_step = 0, 0
    while ada.p < 1.0:
        d_step += 1
        nimg += batch
        ada.observe(torch.ones(batch))
        ada.update(d_step, batch)
        assert d_step < 10_000
    assert nimg == speed_kimg * 1000                          # 1600 images = 100 D steps = 25 updates


def test_fixed_p_never_changes_on_update():
    ada = AdaptiveAugment(p=0.3, adaptive=False, interval=1)
    for d_step in range(1, 10):
        ada.observe(torch.ones(8))
        ada.update(d_step, batch=8)
    assert ada.p == 0.3 and math.isnan(ada.stats()["Augment/rt"])
    ada.set_p(0.8)
    assert ada.p == 0.8
    ada.set_p(1.5)
    assert ada.p == 1.0


def test_stats_names():
    ada = AdaptiveAugment()
    s = ada.stats()
    assert set(s) == {"Augment/p", "Augment/rt"} and s["Augment/p"] == 0.0 and math.isnan(s["Augment/rt"])


def test_state_dict_round_trip_through_torch_save(tmp_path):
    ada = AdaptiveAugment(speed_kimg=1.0, interval=2, target=0.2)   # rt = 1/3 > target: p rises
    for d_step in range(1, 4):                                # 3 steps: the third stays accumulated
        ada.observe(torch.tensor([2.0, -1.0, 3.0]))
        ada.update(d_step, batch=3)
    path = tmp_path / "ada.pt"
    torch.save({"ada": ada.state_dict()}, path)
    state = torch.load(path, weights_only=True)["ada"]
    other = AdaptiveAugment(speed_kimg=1.0, interval=2, target=0.2)
    other.load_state_dict(state)
    assert other.p == ada.p > 0 and other.stats() == ada.stats()
    assert torch.equal(other.state_dict()["acc"], torch.tensor([1.0, 3.0]))
    # The restored accumulator carries into the next update exactly as the original does.
    for a in (ada, other):
        a.observe(torch.tensor([-1.0, -1.0, -1.0]))
        a.update(4, batch=3)
    assert other.p == ada.p and other.stats()["Augment/rt"] == pytest.approx(-2 / 6)
    fresh = AdaptiveAugment()
    fresh2 = AdaptiveAugment()
    torch.save(fresh.state_dict(), path)
    fresh2.load_state_dict(torch.load(path, weights_only=True))
    assert fresh2.p == 0.0 and math.isnan(fresh2.stats()["Augment/rt"])


# Config ----------------------------------------------------------------------------------------

def test_parse_groups():
    assert parse_groups("blit, geom,color") == ["blit", "geom", "color"]
    assert parse_groups("xflip,rot90,xflip") == ["xflip", "rot90"]
    with pytest.raises(ConfigError, match="augment.ada_groups") as err:
        parse_groups("blit,cutout")
    assert "cutout" in str(err.value) and all(g in str(err.value) for g in GROUPS)
    with pytest.raises(ConfigError, match="augment.ada_groups"):
        parse_groups("")
    with pytest.raises(ConfigError, match="augment.ada_groups"):
        AdaptiveAugment(groups="noise")
    assert set(TRANSFORMS) >= {"xflip", "rot90", "xint", "scale", "rotate", "aniso", "xfrac",
                               "brightness", "contrast", "lumaflip", "hue", "saturation"}


# On a GPU -------------------------------------------------------------------------------------

def test_geom_is_twice_differentiable_without_torchs_grid_sampler_double_backward():
    """R1 through the augmentation (`penalty_inputs: clean`) differentiates grid_sample's backward.
    torch's CUDA kernel has no derivative for it (torch 2.11: `make gpu-check` failed R3GAN's
    training so); ours is exact (gradgradcheck in float64) and its graph holds none of torch's
    GridSampler2DBackwardBackward nodes, so it runs wherever the forward does."""
    import torch.nn.functional as F

    from pipeline.training.ada import grid_sample

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    theta = torch.eye(2, 3, dtype=torch.float64) + 0.2 * torch.randn(2, 2, 3, dtype=torch.float64, generator=gen)
    grid = F.affine_grid(theta, [2, 2, 6, 6], align_corners=False)
    assert torch.autograd.gradgradcheck(lambda a: grid_sample(a, grid), (x,))
    assert torch.equal(grid_sample(x, grid), F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                                                           align_corners=False))
    torch.manual_seed(1)
    ada = AdaptiveAugment(groups="geom", p=1.0, adaptive=False)
    real = images(4, 3, 8).double().requires_grad_(True)
    (grad,) = torch.autograd.grad(ada(real).square().sum(), real, create_graph=True)
    seen, stack = set(), [grad.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    names = {type(n).__name__ for n in seen}
    assert not any(n.startswith("GridSampler2DBackward") for n in names), names
    assert any("GridSample" in n for n in names), names        # the gradient did go through the warp


def test_adaptive_p_moves_on_the_tensors_device_and_is_read_only_when_asked(monkeypatch):
    """The update reads nothing from the device (no `.item()`, `.tolist()`, `float()` of a tensor:
    each a host synchronisation on a GPU, every `interval` D steps); p is read when `ada.p` or
    `stats()` asks. Once an update has run, every batch is augmented (p may be 0 on the device)."""
    ada = AdaptiveAugment(groups="xflip", p=0.0, target=0.6, speed_kimg=1.0, interval=2)
    x = images(8, 3, 8)
    assert ada(x) is x                      # p = 0 and no update yet: no work
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    for d_step in range(1, 5):
        ada.observe(-torch.ones(8))       # rt = -1 < target: p would fall, and stays clamped at 0
        ada.update(d_step, batch=8)
        y = ada(x)
    assert reads == []
    monkeypatch.undo()
    assert ada.p == 0.0 and torch.equal(y, x) and y is not x      # augmented, every gate closed
    assert ada.stats()["Augment/rt"] == -1.0
