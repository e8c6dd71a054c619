"""Where ganpipe follows the papers and the authors' code to the detail (issue 23): each test here
fails when the departure it names is put back.

    python -m pytest tests/test_papers.py -x -q
"""

from __future__ import annotations

import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.catalog import from_dict, load_config
from pipeline.config import Config, ConfigError, ModelConfig
from pipeline.losses import Orthogonal
from pipeline.networks import build_networks
from pipeline.training import schedules
from pipeline.training.ada import AdaptiveAugment
from pipeline.training.ema import EMA, PowerEMA, standing_stats
from pipeline.training.phases import MicroBatch, NonFiniteGuard, accumulate, autocast_for, build_phases

CPU = torch.device("cpu")
NO_REPORT = lambda name, value: None  # noqa: E731


def tiny_cfg(*overrides: str) -> Config:
    """A tiny dcgan config for 28 px grey images (built in memory, no data needed)."""
    return from_dict({}, ["model.g_width=0.125", "model.d_width=0.125", "data.batch_size=8", *overrides])


def tiny_networks(cfg: Config):
    torch.manual_seed(0)
    return build_networks(cfg.model, resolution=28, channels=1, num_classes=0)


# ------------------------------------------------------------------------------------------------
# 1. ADA's x-flip: a fair coin behind the gate p, so the flip rate is p/2.

@pytest.mark.parametrize("p", [1.0, 0.5])
def test_ada_xflip_flips_at_half_the_rate_p(p):
    torch.manual_seed(0)
    x = torch.randn(4000, 1, 8, 8)
    y = AdaptiveAugment(groups="xflip", p=p)(x)
    flipped = (y != x).flatten(1).any(1)
    assert torch.equal(y[flipped], x[flipped].flip(3))         # what changed was mirrored
    # binomial(4000, p/2): sd <= 0.008 of the rate; a rate of p would be 0.25 or 0.5 away
    assert flipped.float().mean().item() == pytest.approx(p / 2, abs=0.04)


# ------------------------------------------------------------------------------------------------
# 2. The EMA of a BatchNorm G: averaged statistics, standing statistics at snapshot time.

def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


def test_ema_averages_batchnorm_statistics_and_copies_the_other_buffers():
    G = bn_net()
    ema = EMA(G, halflife_kimg=1.0, rampup=0.0)
    with torch.no_grad():
        G[1].running_mean.fill_(4.0)
        G[1].running_var.fill_(5.0)
        G[1].num_batches_tracked.fill_(7)
    assert ema.update(G, cur_nimg=10_000, batch=1000) == pytest.approx(0.5)    # one half-life
    bn = ema.model[1]
    torch.testing.assert_close(bn.running_mean, torch.full((3,), 2.0))          # 0 halfway to 4
    torch.testing.assert_close(bn.running_var, torch.full((3,), 3.0))           # 1 halfway to 5
    assert bn.num_batches_tracked.item() == 7                                   # a count: copied
    # A skipped G step moves neither the weights nor the statistics.
    ema.update(G, cur_nimg=10_000, batch=1000, taken=torch.tensor(False))
    torch.testing.assert_close(bn.running_mean, torch.full((3,), 2.0))
    ema.update(G, cur_nimg=10_000, batch=1000, taken=torch.tensor(True))
    torch.testing.assert_close(bn.running_mean, torch.full((3,), 3.0))
    # The post-hoc profiles average them with their own profile (t = 1 copies, t = 2 mixes).
    profiles = PowerEMA(G, stds=[0.1])
    profiles.update(G, t=1)
    torch.testing.assert_close(profiles.models[0][1].running_mean, torch.full((3,), 4.0))
    with torch.no_grad():
        G[1].running_mean.fill_(0.0)
    profiles.update(G, t=2)
    beta = 0.5 ** (profiles.gammas[0] + 1)
    torch.testing.assert_close(profiles.models[0][1].running_mean, torch.full((3,), 4.0 * beta))


def before_bn(state: dict, i: int, name: str) -> torch.Tensor:
    """The i-th BatchNorm's buffer `name` in a state dict (in module order)."""
    return [v for k, v in state.items() if k.endswith(name)][i]


def test_standing_stats_recompute_batchnorm_statistics_from_gs_own_samples():
    cfg = tiny_cfg()
    G, _ = tiny_networks(cfg)
    model = EMA(G, 1.0).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    net = standing_stats(model, batches=3, batch=16, seed=0, device=CPU)
    assert net is not model and not net.training
    assert torch.equal(torch.get_rng_state(), rng)                         # the global RNG is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # the EMA itself too
    # What each BatchNorm saw, replayed: the same three batches of latents, BatchNorms in training mode.
    replay = copy.deepcopy(model).eval()
    seen: dict[int, list[torch.Tensor]] = {}
    for i, m in enumerate(x for x in replay.modules() if isinstance(x, nn.BatchNorm2d)):
        m.train()
        m.register_forward_hook(lambda mod, inp, out, i=i: seen.setdefault(i, []).append(inp[0].detach()))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            replay(torch.randn(16, replay.z_dim, generator=gen))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(seen) > 0
    for i, bn in enumerate(bns):
        batches = seen[i]
        mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)     # an equal average of 3 batches
        var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
        assert bn.momentum == 0.1 and not torch.allclose(bn.running_mean, before_bn(before, i, "running_mean"))
    # The same seed gives the same statistics; no BatchNorm or 0 batches: the model itself.
    again = standing_stats(model, batches=3, batch=16, seed=0, device=CPU)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in again.state_dict().items())
    assert standing_stats(model, batches=0, batch=16, seed=0, device=CPU) is model
    no_bn = nn.Linear(2, 2)
    assert standing_stats(no_bn, batches=3, batch=16, seed=0, device=CPU) is no_bn


def test_snapshots_hold_standing_statistics_when_asked(tmp_path, mnist_dir):
    from safetensors.torch import load_file

    from pipeline.training.checkpoint import list_checkpoints
    from pipeline.training.loop import training_loop

    def run(name: str, *extra: str) -> tuple[dict, dict]:
        cfg = load_config("configs/mnist_dcgan.yaml", [
            f"data.path={mnist_dir}", "data.batch_size=16", "data.num_workers=0", "model.g_width=0.125",
            "model.d_width=0.125", "train.total_kimg=0.064", "train.tick_kimg=1000", "train.snapshot_kimg=0",
            "train.checkpoint_kimg=0", "log.progress=false", "log.grid_size=4", "train.threads=1",
            "ema.halflife_kimg=0.5", *extra])
        assert training_loop(cfg, tmp_path / name) == 0
        snap = load_file(next((tmp_path / name / "snapshots").glob("*.safetensors")))
        return snap, torch.load(list_checkpoints(tmp_path / name)[-1] / "state.pt", weights_only=True)["G_ema"]

    plain, ema = run("plain")
    assert all(torch.equal(v, ema[k]) for k, v in plain.items())           # the EMA's own statistics
    standing, ema2 = run("standing", "ema.standing_stats=2")
    assert all(torch.equal(v, ema2[k]) for k, v in ema.items())            # training is unchanged
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(standing[k], plain[k]) for k in plain if k not in stats
                         and not k.endswith("num_batches_tracked"))      # only the statistics differ
    assert all(not torch.equal(standing[k], plain[k]) for k in stats)
    G, _ = build_networks(ModelConfig(name="dcgan", g_width=0.125, d_width=0.125), resolution=28, channels=1,
                          num_classes=0)
    G.load_state_dict(ema)
    expected = standing_stats(G.eval(), batches=2, batch=16, seed=0, device=CPU).state_dict()
    assert all(torch.allclose(standing[k], expected[k], rtol=1e-4, atol=1e-5) for k in stats)


def test_the_batchnorm_side_by_side_tool_writes_three_statistics_for_the_same_weights(tmp_path, mnist_dir):
    """tools/ema_batchnorm.py (docs/benchmarks.md's before/after): the same EMA weights with the raw
    G's statistics (the old behaviour), the EMA's averaged ones, and standing ones; each a snapshot
    that `ganpipe eval` reads."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from conftest import REPO
    from pipeline.training.checkpoint import list_checkpoints
    from pipeline.training.loop import training_loop

    cfg = load_config("configs/mnist_dcgan.yaml", [
        f"data.path={mnist_dir}", "data.batch_size=16", "data.num_workers=0", "model.g_width=0.125",
        "model.d_width=0.125", "train.total_kimg=0.064", "train.tick_kimg=1000", "train.snapshot_kimg=0",
        "train.checkpoint_kimg=0", "log.progress=false", "log.grid_size=4", "train.threads=1", "ema.halflife_kimg=0.5"])
    assert training_loop(cfg, tmp_path / "run") == 0
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "ema_batchnorm.py"), str(tmp_path / "run"), "--out",
                           str(tmp_path / "bn"), "--batches", "2"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(list_checkpoints(tmp_path / "run")[-1] / "state.pt", weights_only=True)
    snaps = {v: load_file(next((tmp_path / "bn" / v / "snapshots").glob("*.safetensors")))
             for v in ("copied", "averaged", "standing")}
    stats = [k for k in state["G"] if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in state["G"] if k not in stats and not k.endswith("num_batches_tracked")]
    for v, snap in snaps.items():
        assert all(torch.equal(snap[k], state["G_ema"][k]) for k in weights), v       # the EMA weights, always
    assert all(torch.equal(snaps["copied"][k], state["G"][k]) for k in stats)
    assert all(torch.equal(snaps["averaged"][k], state["G_ema"][k]) for k in stats)
    assert any(not torch.equal(snaps["standing"][k], state["G_ema"][k]) for k in stats)
    assert (tmp_path / "bn" / "copied" / "config.yaml").is_file()


# ------------------------------------------------------------------------------------------------
# 3. Orthogonal regularisation at the strength of BigGAN's released code.

def test_ortho_gradient_is_biggan_pytorchs_two_beta():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Conv2d(3, 6, 3))
    beta = 1e-4
    loss, _ = Orthogonal(weight=beta, interval=1)(net)
    loss.backward()
    for layer in (net[0], net[1]):
        w = layer.weight.detach().flatten(1)
        off = (w @ w.t()) * (1 - torch.eye(w.shape[0]))
        expected = 2 * beta * (off @ w)                   # BigGAN-PyTorch's utils.ortho
        torch.testing.assert_close(layer.weight.grad.flatten(1), expected, rtol=1e-5, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# 4. DCGAN's discriminator normalisation.

def test_dcgan_d_has_batchnorm_in_every_layer_but_the_first_when_asked():
    _, D = tiny_networks(tiny_cfg("model.d_norm=batch"))
    convs = [m for m in D.features if isinstance(m, nn.Conv2d)]
    order = [type(m).__name__ for m in D.features]
    assert order == ["Conv2d", "LeakyReLU"] + ["Conv2d", "BatchNorm2d", "LeakyReLU"] * (len(convs) - 1)
    assert convs[0].bias is not None and all(c.bias is None for c in convs[1:])   # BN's shift is the bias
    assert D.mixes_batch                      # so D's step runs reals and fakes in separate forwards
    _, plain = tiny_networks(tiny_cfg())
    assert not plain.mixes_batch and not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


@pytest.mark.parametrize("penalty", ["r1", "r2", "wgan-gp"])
def test_a_batchnorm_d_refuses_per_sample_penalties_naming_both_keys(penalty):
    with pytest.raises(ConfigError) as err:
        tiny_cfg("model.d_norm=batch", f"loss.penalties=[{{name: {penalty}}}]")
    assert "model.d_norm" in str(err.value) and "loss.penalties" in str(err.value) and penalty in str(err.value)
    tiny_cfg("model.d_norm=batch", "loss.penalties=[{name: ortho, weight: 1.0e-4}]")    # G's own: fine
    with pytest.raises(ConfigError, match="model.d_norm.*dcgan"):
        from_dict({}, ["model.name=resnet", "model.d_norm=batch"])


def test_dcgan_d_head_reads_the_whole_map_nonlinearly_and_keeps_samples_apart():
    _, paper = tiny_networks(tiny_cfg())
    assert paper.head is None and isinstance(paper.out, nn.Conv2d)        # the paper's linear read-out
    _, D = tiny_networks(tiny_cfg("model.d_head=16"))
    flat, linear, act = D.head
    assert isinstance(linear, nn.Linear) and linear.out_features == 16 and isinstance(act, nn.LeakyReLU)
    assert linear.in_features == paper.out.in_channels * paper.out.kernel_size[0] ** 2  # the whole last map
    x = torch.randn(6, 1, 28, 28)
    out = D(x)
    assert out.shape == (6,) and not D.mixes_batch
    torch.testing.assert_close(D(x[:2]), out[:2])          # one sample's logit is its own: R1 and R2 stay per-sample
    # A conditional D projects the label onto the head's units.
    torch.manual_seed(0)
    _, C = build_networks(tiny_cfg("model.d_head=16", "model.conditional=true").model, resolution=28, channels=1,
                          num_classes=10)
    assert C.embed.embedding_dim == 16
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    h = C.head(C.features(x))
    torch.testing.assert_close(C(x, labels), C.out(h).flatten() + (C.embed(labels) * h).sum(1))
    with pytest.raises(ConfigError, match="model.d_head.*dcgan"):
        from_dict({}, ["model.name=resnet", "model.d_head=16"])


def test_the_dcgan_paper_configs_use_the_papers_d():
    for name in ("cifar10_dcgan", "stackedmnist_dcgan"):
        assert load_config(f"configs/{name}.yaml").model.d_norm == "batch", name
    for name in ("mnist_dcgan", "mnist_rpgan", "stackedmnist_rpgan", "cifar10_wgan_gp"):
        assert load_config(f"configs/{name}.yaml").model.d_norm == "none", name
    assert Config().model.d_norm == "none" and Config().model.d_head == 0


# ------------------------------------------------------------------------------------------------
# 5. R3GAN's class embeddings, as the authors' code initialises them.

def test_r3gan_class_embeddings_start_at_the_authors_scale():
    torch.manual_seed(0)
    classes = 100
    G, D = build_networks(ModelConfig(name="r3gan", conditional=True, g_width=0.25, d_width=0.25),
                          resolution=28, channels=1, num_classes=classes)
    e = D.embed.weight.shape[1]
    assert G.embed.weight.std().item() == pytest.approx(1 / math.sqrt(classes), rel=0.05)        # N(0, 1/C)
    assert D.embed.weight.std().item() == pytest.approx(1 / math.sqrt(e * classes), rel=0.05)    # N(0, 1/(E C))


# ------------------------------------------------------------------------------------------------
# 8. The original WGAN: RMSProp, weight clipping, its config.

def test_rmsprop_is_built_scheduled_and_checked():
    cfg = tiny_cfg("optim.name=rmsprop", "optim.g_lr=5e-5", "optim.d_lr=1e-4", "loss.name=wasserstein",
                   "loss.clip=0.01", "optim.lr_schedule={kind: linear, end: 0}")
    G, D = tiny_networks(cfg)
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=NO_REPORT)
    opt_G, opt_D = phases.named("G").optimizer, phases.named("D").optimizer
    assert isinstance(opt_G, torch.optim.RMSprop) and isinstance(opt_D, torch.optim.RMSprop)
    group = opt_D.param_groups[0]
    assert group["lr"] == 1e-4 and group["alpha"] == 0.99 and group["momentum"] == 0 and group["foreach"]
    assert opt_G.param_groups[0]["lr"] == 5e-5
    out = schedules.apply(cfg, phases, EMA(G, 1.0), int(cfg.train.total_kimg * 1000 / 2))
    assert group["lr"] == pytest.approx(0.5e-4) and "betas" not in group
    assert out["Schedule/lr_D"] == pytest.approx(0.5e-4) and not any("beta2" in k for k in out)
    for_loop = build_phases(tiny_cfg("optim.name=rmsprop", "optim.adam_impl=for-loop"), G=G, D=D, device=CPU,
                            dtype=None, report=NO_REPORT)
    assert for_loop.named("D").optimizer.param_groups[0]["foreach"] is False
    with pytest.raises(ConfigError, match="optim.beta2_schedule.*rmsprop"):
        tiny_cfg("optim.name=rmsprop", "optim.beta2_schedule={kind: cosine, end: 0.5}")
    assert isinstance(build_phases(tiny_cfg(), G=G, D=D, device=CPU, dtype=None,
                                   report=NO_REPORT).named("D").optimizer, torch.optim.Adam)


def test_the_wgan_clip_config_has_the_papers_settings():
    cfg = load_config("configs/mnist_wgan_clip.yaml")
    assert (cfg.loss.name, cfg.loss.clip, cfg.loss.penalties) == ("wasserstein", 0.01, [])
    assert (cfg.optim.name, cfg.optim.g_lr, cfg.optim.d_lr) == ("rmsprop", 5e-5, 5e-5)
    assert (cfg.train.n_critic, cfg.data.batch_size, cfg.model.d_norm) == (5, 64, "batch")
    for name in ("cifar10_wgan_gp",):
        assert load_config(f"configs/{name}.yaml").optim.name == "adam"


def test_a_wgan_clip_run_resumes_exactly_with_rmsprops_state(tmp_path, mnist_dir):
    from pipeline.training.checkpoint import list_checkpoints
    from pipeline.training.loop import training_loop

    def run(name: str, kimg: float) -> dict:
        cfg = load_config("configs/mnist_wgan_clip.yaml", [
            f"data.path={mnist_dir}", "data.batch_size=16", "data.num_workers=0", "model.g_width=0.125",
            "model.d_width=0.125", f"train.total_kimg={kimg}", "train.tick_kimg=1000", "train.snapshot_kimg=0",
            "train.checkpoint_kimg=0.16", "log.progress=false", "log.grid_size=4", "train.threads=1"])
        assert training_loop(cfg, tmp_path / name) == 0
        return torch.load(list_checkpoints(tmp_path / name)[-1] / "state.pt", weights_only=True)

    straight = run("straight", 0.32)
    run("split", 0.16)
    split = run("split", 0.32)
    assert straight["cur_nimg"] == split["cur_nimg"] == 320 and straight["g_steps"] == 4
    for key in ("G", "D", "G_ema"):
        assert all(torch.equal(v, split[key][k]) for k, v in straight[key].items()), key
    for key in ("opt_G", "opt_D"):
        states = straight[key]["state"]
        assert states and all("square_avg" in s for s in states.values())      # RMSProp's own state
        for pid, s in states.items():
            assert all(torch.equal(v, split[key]["state"][pid][n]) for n, v in s.items()), (key, pid)
    assert max(v.abs().max().item() for k, v in straight["D"].items() if "running" not in k
               and "num_batches" not in k) <= 0.01                             # clipped, BatchNorm's too


# ------------------------------------------------------------------------------------------------
# 11. ADA counts the lazy R1 step's real logits; the EMA moves after all of G's phases.

@pytest.mark.parametrize("interval, d_count, dreg_count", [(4, 8, 8), (1, 8, None)])
def test_adas_rt_counts_the_real_logits_of_a_lazy_r1_step(interval, d_count, dreg_count):
    cfg = tiny_cfg("augment.ada_groups=xflip", "augment.ada_target=0.6",
                   f"loss.penalties=[{{name: r1, weight: 1, interval: {interval}}}, {{name: r2, weight: 1, "
                   f"interval: {interval}}}]")
    G, D = tiny_networks(cfg)
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=NO_REPORT)
    ada = phases.ada
    torch.manual_seed(1)
    mb = MicroBatch(z=torch.randn(8, G.z_dim), labels=None, real=torch.rand(8, 1, 28, 28) * 2 - 1,
                    fake=torch.rand(8, 1, 28, 28) * 2 - 1)
    accumulate(phases.named("D"), [mb], autocast_for(CPU, None))
    assert ada._acc[1].item() == d_count                  # D's main step: its reals, once
    if dreg_count is not None:
        accumulate(phases.named("Dreg"), [mb], autocast_for(CPU, None))
        assert ada._acc[1].item() == d_count + dreg_count  # R1's reals too (not R2's fakes)


def test_the_ema_follows_g_after_its_lazy_regularisation_step():
    from pipeline.training.loop import g_step
    from pipeline.training.state import TrainState
    from pipeline.training.stats import Stats

    cfg = tiny_cfg("loss.penalties=[{name: ortho, weight: 1.0, interval: 2}]")
    G, D = tiny_networks(cfg)
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=NO_REPORT)
    assert [p.name for p in phases.due("G", 0)] == ["G", "Greg"]
    ema = EMA(G, halflife_kimg=0.0)                       # half-life 0: the EMA is G after the update
    state = TrainState(G, D, ema, phases, NonFiniteGuard(10, lambda: "", lambda: 0.0))
    session = SimpleNamespace(per_proc=8, device=CPU, stats=Stats(CPU), autocast=contextlib.nullcontext)
    g_step(session, state, [MicroBatch(z=torch.randn(8, G.z_dim), labels=None)], images=8)
    assert state.progress.g_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), G.parameters()))
