"""StyleGAN2 completed: path length and orthogonal regularisation (G-side penalties), the lazy G
phase, style mixing, truncation, the residual D block's order and the paper256 / ADA configs.

The formulas are checked against closed forms: a linear "synthesis" img = sum_l w_l B_l has
J_l^T y = B_l y whatever w, so the path lengths, the penalty and its gradient w.r.t. B are known;
orthogonal regularisation is checked on matrices whose Gram matrices are written down by hand.
"""

from __future__ import annotations

import argparse
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.catalog import from_dict, load_config
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, UserError
from pipeline.generate import draw, images
from pipeline.losses import Orthogonal, PathLength
from pipeline.networks import build_networks, stylegan2
from pipeline.training import schedules
from pipeline.training.phases import MicroBatch, NonFiniteGuard, accumulate, autocast_for, build_phases, step

from conftest import REPO

CPU = torch.device("cpu")
NO_REPORT = lambda name, value: None     # noqa: E731


def tiny_cfg(penalties=(), penalty="none", interval=1, **model):
    single = [] if penalty == "none" else [{"name": penalty, "weight": 1.0, "interval": interval}]
    return from_dict({"model": {"name": "stylegan2", "g_width": 1 / 32, "d_width": 1 / 32, "w_dim": 8,
                                "mapping_layers": 2, **model},
                      "loss": {"penalties": single + list(penalties)}})


def tiny(style_mixing: float = 0.9, classes: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="stylegan2", g_width=1 / 32, d_width=1 / 32, w_dim=8, mapping_layers=2,
                      style_mixing=style_mixing, conditional=bool(classes))
    G, D = build_networks(cfg, resolution=32, channels=3, num_classes=classes)
    with torch.no_grad():
        for layer in G.synthesis.convs:
            layer.noise_strength.fill_(0.5)         # else the noise inputs do nothing (they start at 0)
    return G, D


# ----------------------------------------------------------------------------------------------
# Path length regularisation.

class LinearSynthesis(nn.Module):
    """ws = scale * z broadcast to every layer (scale = 1, a "mapping" parameter, so ws is in the
    graph as a real G's is); img = sum_l ws[:, l] @ B[l] + bias, as (N, C, H, W)."""

    num_ws, shape = 3, (2, 4, 4)

    def __init__(self, w_dim: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.B = nn.Parameter(torch.randn(self.num_ws, w_dim, math.prod(self.shape), generator=g))
        self.bias = nn.Parameter(torch.randn(math.prod(self.shape), generator=g))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, z, labels=None, *, return_ws=False):
        ws = (self.scale * z)[:, None].expand(-1, self.num_ws, -1)
        img = (torch.einsum("nlw,lwp->np", ws, self.B) + self.bias).view(-1, *self.shape)
        return (img, ws) if return_ws else img


@pytest.mark.parametrize("interval", [1, 4])
def test_path_length_matches_the_closed_form_of_a_linear_synthesis(interval):
    G = LinearSynthesis()
    z = torch.randn(6, 5)
    pl = PathLength(weight=2.0, interval=interval)
    torch.manual_seed(11)
    loss, stats = pl(G, z)
    loss.backward()
    # By hand: half the batch (batch shrink 2), y = randn / sqrt(H W) drawn from the global RNG after
    # the forward, length_i = sqrt(mean_l ||B_l y_i||^2), a = 0 + 0.01 (mean length - 0).
    torch.manual_seed(11)
    y = (torch.randn(3, *G.shape) / math.sqrt(16)).flatten(1)        # (n, P)
    B = G.B.detach()
    jty = torch.einsum("lwp,np->nlw", B, y)                          # J_l^T y_i = B_l y_i
    lengths = jty.square().sum(2).mean(1).sqrt()
    a = 0.01 * lengths.mean()
    value = (lengths - a).square().mean()
    assert stats["PL/length"].item() == pytest.approx(lengths.mean().item(), rel=1e-5)
    assert stats["PL/mean"].item() == pytest.approx(a.item(), rel=1e-5) and pl.pl_mean.item() == pytest.approx(a.item())
    assert stats["Loss/G/pl"].item() == pytest.approx(value.item(), rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * interval * value.item(), rel=1e-5)
    # d value / d B_l = mean_i 2 (L_i - a) (B_l y_i) y_i^T / (num_ws L_i), a held fixed.
    coef = 2 * (lengths - a) / (G.num_ws * lengths) / len(lengths)
    want = 2.0 * interval * torch.einsum("n,nlw,np->lwp", coef, jty, y)
    torch.testing.assert_close(G.B.grad, want, rtol=1e-4, atol=1e-6)
    # The bias does not reach J^T y; 0 * img still gives it a (zero) gradient, as DDP needs.
    assert G.bias.grad is not None and G.bias.grad.abs().max() == 0


def test_path_length_mean_is_a_running_mean():
    G = LinearSynthesis()
    pl = PathLength(weight=2.0, interval=4)
    expected = 0.0
    for k in range(3):
        torch.manual_seed(k)
        _, stats = pl(G, torch.randn(4, 5))
        expected += 0.01 * (stats["PL/length"].item() - expected)
        assert pl.pl_mean.item() == pytest.approx(expected, rel=1e-5)
    # A non-finite length (an fp16 overflow; the scaler skips that step) leaves the mean as it was.
    with torch.no_grad():
        G.B[0, 0, 0] = float("inf")
    assert not torch.isfinite(pl(G, torch.randn(4, 5))[0])
    assert pl.pl_mean.item() == pytest.approx(expected, rel=1e-5)
    state = pl.state_dict()
    other = PathLength()
    other.load_state_dict(state)
    assert other.pl_mean.item() == pytest.approx(expected, rel=1e-5)


def test_pl_needs_a_generator_with_per_layer_w():
    cfg = tiny_cfg([{"name": "pl", "weight": 2.0, "interval": 4}])
    cfg.model.name = "dcgan"
    G, D = build_networks(cfg.model, resolution=32, channels=3, num_classes=0)
    with pytest.raises(ConfigError, match="dcgan generator has none"):
        build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=NO_REPORT)


# ----------------------------------------------------------------------------------------------
# Orthogonal regularisation.

class Matrices(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.conv = nn.Conv2d(1, 2, 2)
        self.orthogonal = nn.Linear(2, 2, bias=False)
        self.embed = nn.Embedding(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]))    # rows' dot product 2
            self.conv.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]).view(2, 1, 2, 2))
            self.orthogonal.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))      # norms are free
            self.embed.weight.copy_(torch.ones(3, 2))                                  # excluded


def test_ortho_matches_the_hand_computed_value_and_gradient():
    net = Matrices()
    loss, stats = Orthogonal(weight=1e-2, interval=2)(net)
    # ||W W^T (.) (1 - I)||_F^2 = 2 (w0 . w1)^2: fc 2 * 2^2 = 8, conv (rows [1,0,0,1], [1,1,0,0]) 2 * 1^2 = 2.
    assert stats["Loss/G/ortho"].item() == pytest.approx(10.0)
    assert loss.item() == pytest.approx(1e-2 * 2 * 10.0 / 2)       # beta/2 (BigGAN's released code)
    loss.backward()
    # d/dW 1/2 * 2 (w0 . w1)^2 = 2 (w0 . w1) [w1; w0], times beta x interval.
    fc = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    torch.testing.assert_close(net.fc.weight.grad, 0.02 * 2 * 2 * fc.flip(0))
    torch.testing.assert_close(net.orthogonal.weight.grad, torch.zeros(2, 2))
    assert net.embed.weight.grad is None and net.fc.bias.grad is None


# ----------------------------------------------------------------------------------------------
# The phases: G-side penalties join G's step or get a lazy G step; G's Adam is adjusted.

def test_a_lazy_g_penalty_is_a_g_phase_every_k_g_steps_with_adams_adjustment():
    cfg = tiny_cfg([{"name": "pl", "weight": 2.0, "interval": 4}], penalty="r1", interval=16)
    G, D = tiny()
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=NO_REPORT)
    assert [(p.name, p.side, p.interval, len(p.terms)) for p in phases] == [
        ("D", "D", 1, 1), ("Dreg", "D", 16, 1), ("G", "G", 1, 1), ("Greg", "G", 4, 1)]
    assert [k for k in range(10) if "Greg" in [p.name for p in phases.due("G", k)]] == [0, 4, 8]
    assert [p.name for p in phases.due("G", 1)] == ["G"] and [p.name for p in phases.due("D", 4)] == ["D"]
    g, d = phases.named("G").optimizer.param_groups[0], phases.named("D").optimizer.param_groups[0]
    t = cfg.train
    assert g["lr"] == pytest.approx(cfg.optim.g_lr * 4 / 5) and d["lr"] == pytest.approx(cfg.optim.d_lr * 16 / 17)
    assert g["betas"] == pytest.approx(tuple(b ** 0.8 for b in cfg.optim.g_betas))
    assert phases.named("Greg").optimizer is phases.named("G").optimizer
    # The schedules keep the adjustment and schedule a G penalty's weight like any other.
    cfg.loss.penalties[1].schedule.kind, cfg.loss.penalties[1].schedule.end = "linear", 0.0     # pl's
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=NO_REPORT)
    from pipeline.training.ema import EMA
    ema = EMA(G, 10)
    out = schedules.apply(cfg, phases, ema, int(t.total_kimg * 1000 / 2))
    assert phases.named("G").optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.g_lr * 0.8)
    assert out["Schedule/weight_pl"] == pytest.approx(1.0) and phases.penalties[1][0].weight == pytest.approx(1.0)
    # Every-step G penalties join G's main phase; without lazy G penalties G's Adam is untouched.
    every = build_phases(tiny_cfg([{"name": "ortho", "weight": 1e-4}]), G=G, D=D, device=CPU, dtype=None,
                         report=NO_REPORT)
    assert [(p.name, len(p.terms)) for p in every] == [("D", 1), ("G", 2)]
    assert every.named("G").optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.g_lr)


def test_the_greg_step_trains_every_g_parameter_and_no_d_parameter():
    cfg = tiny_cfg([{"name": "pl", "weight": 2.0, "interval": 4}])
    G, D = tiny()
    seen = {}
    phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=lambda n, v: seen.setdefault(n, v))
    greg = phases.named("Greg")
    before = [p.detach().clone() for p in G.parameters()]
    accumulate(greg, [MicroBatch(z=torch.randn(4, G.z_dim), labels=None)] * 2, autocast_for(CPU, None))
    assert [n for n, p in G.named_parameters() if p.grad is None] == []
    assert all(p.grad is None for p in D.parameters())
    assert step(greg, NonFiniteGuard(10, lambda: "none", lambda: 0.0), NO_REPORT)
    assert any(not torch.equal(a, b) for a, b in zip(before, G.parameters()))
    assert {"Loss/G/pl", "PL/mean", "PL/length"} <= seen.keys()


def test_pl_mean_is_restored_on_resume(tmp_path):
    """Through the trainer's own checkpoint: training_state -> save_checkpoint -> resume."""
    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.training.ema import EMA
    from pipeline.rundir import RunDir
    from pipeline.training.loop import resume
    from pipeline.training.state import Progress, TrainState

    cfg = tiny_cfg([{"name": "pl", "weight": 2.0, "interval": 4}])

    def build():
        G, D = tiny()
        phases = build_phases(cfg, G=G, D=D, device=CPU, dtype=None, report=NO_REPORT)
        return G, D, EMA(G, 10), phases, NonFiniteGuard(10, lambda: "none", lambda: 0.0)

    G, D, ema, phases, guard = build()
    z = torch.randn(4, G.z_dim)
    for k in range(3):
        accumulate(phases.named("Greg"), [MicroBatch(z=z, labels=None)], autocast_for(CPU, None))
        step(phases.named("Greg"), guard, NO_REPORT)
    pl = phases.penalties[0][0]
    assert pl.pl_mean.item() > 0
    state = TrainState(G, D, ema, phases, guard)
    state.progress = Progress(64, 3, 3)
    save_checkpoint(tmp_path, 64, keep=2,
                    per_rank={"torch_cpu": torch.get_rng_state(), "loader": {}},
                    shared=lambda: state.state_dict(1, {}, True))
    G2, D2, ema2, phases2, guard2 = build()
    assert phases2.penalties[0][0].pl_mean.item() == 0
    resumed = TrainState(G2, D2, ema2, phases2, guard2)
    session = SimpleNamespace(rank=0, world=1, device=CPU, log=lambda msg: None)
    _, path = resume(RunDir(tmp_path), resumed, session, seed=0)
    progress = resumed.progress
    assert path is not None and progress.g_steps == 3
    assert phases2.penalties[0][0].pl_mean.item() == pl.pl_mean.item()
    # The next penalty is the same as the uninterrupted run's.
    torch.manual_seed(5)
    a = pl(G, z)[0].item()
    torch.manual_seed(5)
    assert phases2.penalties[0][0](G2, z)[0].item() == a


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        G, _ = tiny()                       # the same G on both ranks
        ddp = nn.parallel.DistributedDataParallel(G)
        pl = PathLength(weight=2.0, interval=4)
        torch.manual_seed(100 + rank)       # different latents per rank
        local = []
        for _ in range(2):                  # DDP raises at the 2nd forward if a gradient was missing
            G.zero_grad(set_to_none=True)
            loss, stats = pl(ddp, torch.randn(4, G.z_dim))
            loss.backward()
            local.append(stats["PL/length"].item())
        grads = torch.cat([p.grad.flatten() for p in G.parameters()])
        torch.save({"pl_mean": pl.pl_mean.item(), "local": local, "grads": grads},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_pl_mean_is_averaged_over_processes_and_ddp_reduces_every_parameter(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children start with torch imported (spawn would import it twice more).
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["local"] != r1["local"]                       # the ranks saw different samples ...
    assert r0["pl_mean"] == r1["pl_mean"]                   # ... and hold the same running mean,
    expected = 0.0
    for a, b in zip(r0["local"], r1["local"]):
        expected += 0.01 * ((a + b) / 2 - expected)         # that of the mean over both
    assert r0["pl_mean"] == pytest.approx(expected, rel=1e-5)
    assert torch.equal(r0["grads"], r1["grads"]) and r0["grads"].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Style mixing and truncation.

def test_style_mixing_acts_in_training_mode_only():
    G, _ = tiny(style_mixing=1.0)
    z = torch.randn(64, G.z_dim)
    G.train()
    ws = G.map(z)
    # Layer 0 always keeps the first w, the last layer always takes the second (crossover in [1, num_ws)).
    assert not torch.isclose(ws[:, 0], ws[:, -1]).all(1).any()
    crossover = (~torch.isclose(ws, ws[:, :1]).all(2)).float().argmax(1)
    assert crossover.min() >= 1 and crossover.max() <= G.num_ws - 1 and len(crossover.unique()) > 3
    # With probability p per image.
    G.style_mixing = 0.5
    torch.manual_seed(3)
    ws = G.map(torch.randn(2000, G.z_dim))
    share = (~torch.isclose(ws[:, 0], ws[:, -1]).all(1)).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.05)
    # The second latent does not move the running mean of w.
    G.style_mixing = 1.0
    before = G.mapping.w_avg.clone()
    G.map(z)
    G.eval()
    want = before.lerp(G.mapping(z).mean(0), 1 - G.mapping.w_avg_beta)
    torch.testing.assert_close(G.mapping.w_avg, want)
    # Eval mode: one w for every layer, the same image as without style mixing.
    ws = G.map(z)
    assert torch.equal(ws, ws[:, :1].expand_as(ws))
    noise = draw(G, 0, 0, 4)[1]
    with torch.no_grad():
        a = G(z[:4], noise=noise)
        G.style_mixing = 0.0
        assert torch.equal(G(z[:4], noise=noise), a)
        G.style_mixing = 1.0
        G.train()
        assert not torch.allclose(G(z[:4], noise=noise).clamp(-1, 1), a)


def _averaged(G):
    G.train()
    with torch.no_grad():
        for _ in range(5):
            G(torch.randn(32, G.z_dim))             # training moves w_avg away from 0
    return G.eval()


def test_truncation_psi_0_gives_the_w_avg_image_and_psi_1_changes_nothing():
    G = _averaged(tiny()[0])
    assert G.mapping.w_avg.abs().sum() > 0
    plain = images(G, seed=2, count=20)
    assert torch.equal(images(G, seed=2, count=20, psi=1.0, cutoff=3), plain)
    zero = images(G, seed=2, count=20, psi=0.0)
    noise = draw(G, 2, 0, 16)[1]
    with torch.no_grad():
        avg = G.synthesis(G.mapping.w_avg.expand(16, G.num_ws, -1), noise=noise).clamp(-1, 1)
    torch.testing.assert_close(zero[:16], avg, rtol=0, atol=1e-6)
    assert not torch.allclose(zero, plain, atol=1e-3)
    # cutoff: the first k layers move to w_avg + psi (w - w_avg), the others keep w.
    z = torch.randn(5, G.z_dim)
    ws, cut = G.map(z), G.map(z, truncation_psi=0.5, truncation_cutoff=3)
    torch.testing.assert_close(cut[:, :3], G.mapping.w_avg + 0.5 * (ws[:, :3] - G.mapping.w_avg))
    assert torch.equal(cut[:, 3:], ws[:, 3:])
    assert not torch.equal(images(G, seed=2, count=8, psi=0.5, cutoff=3), images(G, seed=2, count=8, psi=0.5))
    # Truncated images keep the seed-index property: the same bits whatever the batch and range.
    ref = images(G, seed=2, count=20, psi=0.7, cutoff=4, batch=20)
    assert torch.equal(images(G, seed=2, start=3, count=9, psi=0.7, cutoff=4, batch=3), ref[3:12])
    with pytest.raises(UserError, match="has 8 w layers"):
        images(G, seed=0, count=1, psi=0.5, cutoff=9)


def test_truncation_elsewhere_is_refused_by_name_or_goes_through_truncate_z():
    torch.manual_seed(0)
    G, _ = build_networks(ModelConfig(name="dcgan", g_width=1 / 32), resolution=32, channels=3, num_classes=0)
    G.eval()
    with pytest.raises(UserError, match="dcgan generator has no truncation"):
        images(G, seed=0, count=2, psi=0.7)
    assert torch.equal(images(G, seed=0, count=2, psi=1.0), images(G, seed=0, count=2))
    # The hook a family with z truncation (BigGAN) offers: truncate_z(z, psi), applied per image.
    G.truncate_z = lambda z, psi: z.clamp(-psi, psi)
    got = images(G, seed=0, count=3, psi=0.5)
    with torch.no_grad():
        want = G(draw(G, 0, 0, 16)[0].clamp(-0.5, 0.5))[:3]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="leave --cutoff out"):
        images(G, seed=0, count=1, psi=0.5, cutoff=2)


def test_sample_and_eval_take_psi_and_eval_records_it_as_protocol(tmp_path, monkeypatch):
    from pipeline.cli import build_parser, main
    from pipeline.metrics import commands, evaluator
    from pipeline.metrics.records import protocol_key
    from pipeline.training.snapshot import SnapshotInfo, save_snapshot

    G = _averaged(tiny()[0])
    snap = save_snapshot(G, tmp_path / "snapshots", cur_nimg=1000, info=SnapshotInfo(tiny_cfg().model, 32, 3, 0))
    # The real command line, in this process (a subprocess would cost a torch import).
    assert main(["sample", "--snapshot", str(snap), "--num", "4", "--psi", "0.7", "--cutoff", "8",
                 "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 0
    assert main(["sample", "--snapshot", str(snap), "--psi", "0.7", "--cutoff", "9",
                 "--out", str(tmp_path / "bad.png")]) == 2 and not (tmp_path / "bad.png").exists()
    from pipeline.generate import save_grid
    from test_generate import read_png
    save_grid(images(G, seed=0, count=4, psi=0.7, cutoff=8), tmp_path / "mine.png")
    assert (read_png(tmp_path / "grid.png") == read_png(tmp_path / "mine.png")).all()

    args = build_parser(["eval"]).parse_args(["eval", "--run-dir", str(tmp_path), "--psi", "0.5", "--cutoff", "4"])
    seen = {}
    monkeypatch.setattr(commands, "Evaluator", lambda run_dir, **kw: seen.update(kw))
    commands.evaluator_from_args(args)
    assert (seen["psi"], seen["cutoff"]) == (0.5, 4)
    # The protocol carries psi and cutoff (an Evaluator without its reference set-up).
    ev = object.__new__(evaluator.Evaluator)
    ev.extractor = argparse.Namespace(name="x", protocol=lambda: {"extractor": "x", "extractor_sha256": "s",
                                                                  "resize": "r"})
    ev.extractors = [ev.extractor]
    ev.num_gen, ev.seed, ev.split, ev.data_dir, ev.psi, ev.cutoff = 10, 0, "train", tmp_path, 0.5, 4
    ev.ref = argparse.Namespace(num=10, sample_num=10, meta={"manifest_sha256": "m"})
    ev.refs = {"x": ev.ref}
    rec = {**ev.protocol(), "metric": "fid"}
    assert (rec["psi"], rec["cutoff"]) == (0.5, 4)
    untruncated = {**rec, "psi": 1.0, "cutoff": None}
    old = {k: v for k, v in untruncated.items() if k not in ("psi", "cutoff")}
    assert protocol_key(rec) != protocol_key(untruncated) == protocol_key(old)
    assert protocol_key({**rec, "cutoff": None}) != protocol_key(rec)


# ----------------------------------------------------------------------------------------------
# The residual D block: conv 3x3, then conv 3x3 on the full-resolution grid, then down.

def test_d_block_runs_its_second_conv_at_full_resolution_then_downsamples():
    torch.manual_seed(0)
    block = stylegan2.DBlock(4, 6)
    x = torch.randn(2, 4, 16, 16)
    sizes = []
    block.conv1.register_forward_hook(lambda m, inp, out: sizes.append((inp[0].shape[-1], out.shape[-1])))
    out = block(x)
    assert out.shape == (2, 6, 8, 8) and sizes == [(16, 8)]
    # By hand: h = conv0(x); conv1's 3x3 at full resolution, blur + keep every second pixel, bias, lrelu.
    w = block.conv1.weight * block.conv1.weight_gain
    h = F.conv2d(block.conv0(x), w, padding=1)
    h = F.leaky_relu(stylegan2.downsample(h) + block.conv1.bias[:, None, None], 0.2) * math.sqrt(2)
    ref = (block.skip(stylegan2.downsample(x)) + h) * math.sqrt(0.5)
    inner = (slice(None), slice(None), slice(1, 7), slice(1, 7))   # zero padding differs at the border only
    torch.testing.assert_close(out[inner], ref[inner], rtol=1e-5, atol=1e-5)
    # The old order, conv1 after the downsampling (a 3x3 conv on the half-resolution grid), differs.
    old = block.conv1.down
    block.conv1.down = False
    before = (block.skip(stylegan2.downsample(x)) + block.conv1(stylegan2.downsample(block.conv0(x)))) * math.sqrt(0.5)
    block.conv1.down = old
    assert not torch.allclose(before[inner], ref[inner], atol=1e-2)


# ----------------------------------------------------------------------------------------------
# Configs.

def test_ffhq256_config_is_paper256():
    cfg = load_config(REPO / "configs" / "ffhq256_stylegan2.yaml")
    m, loss, t = cfg.model, cfg.loss, cfg.train
    assert (m.g_width, m.d_width, m.mapping_layers, m.mbstd_group, m.style_mixing) == (1.0, 1.0, 8, 8, 0.9)
    assert (cfg.data.batch_size, cfg.optim.g_lr, cfg.optim.d_lr, cfg.optim.g_betas, cfg.optim.d_betas) == (64, 0.0025, 0.0025, [0.0, 0.99], [0.0, 0.99])
    assert [(p.name, p.weight, p.interval) for p in loss.penalties] == [("r1", 1.0, 16), ("pl", 2.0, 4)]
    assert (cfg.ema.halflife_kimg, cfg.ema.rampup, t.total_kimg, cfg.augment.ada_groups) == (20, 0.0, 25000, "")
    # paper256's fmaps 0.5 = channel base 16384 = this family at width 1: 64 maps at 256 px.
    assert stylegan2.CHANNEL_BASE == 16384 and stylegan2.CHANNEL_BASE // 256 == 64


def test_ada_small_config():
    cfg = load_config(REPO / "configs" / "stylegan2_ada_small.yaml")
    assert (cfg.augment.ada_groups, cfg.augment.ada_target, cfg.augment.ada_interval, cfg.augment.ada_speed_kimg) == ("blit,geom,color", 0.6, 4, 500)
    r1, pl = cfg.loss.penalties
    assert (r1.name, r1.interval) == ("r1", 16) and r1.weight == pytest.approx(0.0002 * 128 ** 2 / cfg.data.batch_size)
    assert (pl.name, pl.weight, pl.interval) == ("pl", 2.0, 4)
    assert cfg.model.style_mixing == 0.9 and cfg.loss.penalty_inputs == "clean"
