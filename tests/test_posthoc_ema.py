"""Post-hoc EMA (EDM2) and the raw G: the profile maths against direct computation, the profiles
and raw weights in snapshots and checkpoints, and `ganpipe posthoc-ema` / `eval --generator raw` /
`eval --posthoc-std` on a tiny run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import integrate

from pipeline.training.ema import MAX_STD, PowerEMA, gamma_for, sigma_rel
from pipeline.training.posthoc_ema import profile_dot, solve_weights
from pipeline.training.snapshot import list_snapshots, load_snapshot
from test_metrics import make_run, mlp_generator, mnist_ext, mnist_ref, records  # noqa: F401
from test_train import final_state, train

def ganpipe(capsys, *args: str, status: int = 0) -> tuple[str, str]:
    """`ganpipe ARGS` in this process: the real CLI code without a new interpreter's start-up
    (seconds each on two busy cores; the trainer runs in subprocesses): (stdout, stderr)."""
    from pipeline.cli import main

    capsys.readouterr()
    assert main(list(args)) == status, capsys.readouterr()
    return capsys.readouterr()


# 4 ticks of 32 images (2 G steps each), a snapshot at each, checkpoints at 64 and 128.
PHEMA = ["train.snapshot_raw=true", "ema.posthoc_std=[0.05,0.1]", "train.total_kimg=0.128",
         "train.tick_kimg=0.032", "train.snapshot_kimg=0.032", "train.checkpoint_kimg=0.064"]


@pytest.fixture(scope="session")
def phema_run(tmp_path_factory, mnist_dir):
    """A tiny run with EMA profiles and raw G in every snapshot (read-only: copy it to write).
    Trained once per session: test_watch_alerts imports this fixture, which pytest then sets up
    once per module, so the second set-up finds the finished run."""
    run = tmp_path_factory.getbasetemp() / "phema" / "run"
    if not (run / "FINISHED").is_file():
        shutil.rmtree(run, ignore_errors=True)
        train(run, mnist_dir, *PHEMA)
    return run


# ---------------------------------------------------------------------------------------------
# The maths, against direct computation

def test_relative_std_and_exponent_are_those_of_edm2():
    # EDM2 sec. 3.2: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert gamma_for(0.05) == pytest.approx(16.97, abs=0.005) and gamma_for(0.10) == pytest.approx(6.94, abs=0.005)
    for gamma in (0.0, 0.5, 3.0, 16.97, 200.0):
        # sigma_rel is the standard deviation of the density (gamma+1) x^gamma on [0, 1], integrated here.
        mean = integrate.quad(lambda x: x * (gamma + 1) * x ** gamma, 0, 1)[0]
        var = integrate.quad(lambda x: (x - mean) ** 2 * (gamma + 1) * x ** gamma, 0, 1)[0]
        assert sigma_rel(gamma) == pytest.approx(np.sqrt(var), rel=1e-7)
        if gamma > 0:
            assert gamma_for(sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)
    for bad in (0.0, MAX_STD, 0.3, -0.1):
        with pytest.raises(ValueError):
            gamma_for(bad)


def test_profile_inner_products_are_the_integrals():
    rng = np.random.default_rng(0)
    for _ in range(6):
        t_a, t_b = rng.uniform(0.1, 3, 2)
        g_a, g_b = rng.uniform(0, 20, 2)
        p = lambda tau, t, g: (g + 1) * tau ** g / t ** (g + 1)          # noqa: E731
        direct = integrate.quad(lambda tau: p(tau, t_a, g_a) * p(tau, t_b, g_b), 0, min(t_a, t_b), epsabs=0,
                                epsrel=1e-11)[0]
        assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(direct, rel=1e-8)
        assert profile_dot(t_b, g_b, t_a, g_a) == pytest.approx(direct, rel=1e-8)


def direct_power_ema(theta: np.ndarray, std: float) -> np.ndarray:
    """The power-function EMA of a sequence theta[0..T-1] (one row per step) with relative length
    `std` after its last step, by the recursion of EDM2: beta_t = (1 - 1/t)^(gamma+1)."""
    gamma, avg = gamma_for(std), np.zeros(theta.shape[1])
    for t, value in enumerate(theta, start=1):
        beta = (1 - 1 / t) ** (gamma + 1)
        avg = beta * avg + (1 - beta) * value
    return avg


def test_rebuild_from_stored_profiles_equals_the_direct_power_ema():
    """Scalar 'weights' of three shapes go through the trainer's PowerEMA; snapshots every 150 steps
    keep both profiles; the least-squares rebuild at other lengths must match the EMA computed
    directly with that length, well within how much the lengths differ."""
    T, every = 3000, 150
    s = np.arange(1, T + 1) / T
    rng = np.random.default_rng(1)
    theta = np.stack([np.sin(3 * np.pi * s) + 0.2 * rng.standard_normal(T), s ** 3, np.exp(-4 * s)], axis=1)
    G = torch.nn.Linear(3, 1, bias=False).double()
    profiles = PowerEMA(G, [0.05, 0.10])
    stored = []                                       # (t, gamma, values)
    for t in range(1, T + 1):
        with torch.no_grad():
            G.weight.copy_(torch.from_numpy(theta[t - 1])[None])
        profiles.update(G, t)
        if t % every == 0:
            stored += [(t, g, m.weight.detach().numpy()[0].copy()) for g, m in zip(profiles.gammas, profiles.models)]
    ts, gammas, values = (np.array([x[i] for x in stored]) for i in range(3))
    # The trainer's profiles are the direct power EMAs.
    for k, std in enumerate((0.05, 0.10)):
        assert np.allclose(values[-2 + k], direct_power_ema(theta, std), atol=1e-12)
    spread = np.abs(direct_power_ema(theta, 0.05) - direct_power_ema(theta, 0.2))
    assert spread.min() > 0.02
    for std in (0.05, 0.065, 0.08, 0.13, 0.15):
        x, error = solve_weights(ts, gammas, T, gamma_for(std))
        rebuilt, direct = x @ values, direct_power_ema(theta, std)
        assert np.all(np.abs(rebuilt - direct) < 0.02 * spread), (std, rebuilt, direct)
        assert error < 0.02 and abs(x.sum() - 1) < 0.01
    # A stored profile is in the basis: rebuilt exactly, with zero fit error.
    x, error = solve_weights(ts, gammas, T, gamma_for(0.05))
    assert np.allclose(x @ values, values[-2], atol=1e-9) and error < 1e-6
    # An earlier time: only the snapshots up to it.
    upto = ts <= 1500
    x, _ = solve_weights(ts[upto], gammas[upto], 1500, gamma_for(0.08))
    assert np.all(np.abs(x @ values[upto] - direct_power_ema(theta[:1500], 0.08)) < 0.02 * spread)


# ---------------------------------------------------------------------------------------------
# The trainer's snapshots and checkpoints

def test_snapshots_keep_the_raw_g_and_the_profiles(phema_run):
    snaps = list_snapshots(phema_run / "snapshots")
    assert [p.stem for p in snaps] == [f"snapshot-{n:09d}" for n in (32, 64, 96, 128)]
    for path in snaps:
        meta = json.loads(path.read_text())
        assert set(meta["variants"]) == {"raw", "phema-0.05", "phema-0.1"}
        steps = meta["cur_nimg"] // 16                            # G steps so far (batch 16, n_critic 1)
        for name, std in (("phema-0.05", 0.05), ("phema-0.1", 0.1)):
            v = meta["variants"][name]
            assert (v["std"], v["t"]) == (std, steps) and v["gamma"] == pytest.approx(gamma_for(std))
    state = final_state(phema_run)
    assert state["posthoc_ema"]["stds"] == [0.05, 0.1] and state["posthoc_ema"]["t"] == 8
    last = snaps[-1]
    raw, _ = load_snapshot(last, weights="raw")
    ema, _ = load_snapshot(last)
    p05, meta = load_snapshot(last, weights="phema-0.05")
    assert meta["generator"] == "phema-0.05"
    for G, expected in ((raw, state["G"]), (ema, state["G_ema"]), (p05, state["posthoc_ema"]["models"][0])):
        assert all(torch.equal(v, expected[k]) for k, v in G.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(raw.parameters(), ema.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(p05.parameters(), ema.parameters()))


# ---------------------------------------------------------------------------------------------
# The commands

def test_posthoc_ema_command_writes_a_snapshot_eval_and_sample_accept(phema_run, tmp_path, capsys):
    run = phema_run
    # A stored length at the newest snapshot: its rebuild is that profile itself.
    out, _ = ganpipe(capsys, "posthoc-ema", "--run-dir", str(run), "--std", "0.05", "--out", str(tmp_path / "p05.json"))
    assert "from 8 profiles of 4 snapshot(s)" in out
    rebuilt, meta = load_snapshot(tmp_path / "p05.json")
    stored, _ = load_snapshot(run / "snapshots" / "snapshot-000000128.json", weights="phema-0.05")
    for a, b in zip(rebuilt.parameters(), stored.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert meta["posthoc_ema"]["relative_error"] < 1e-6

    # Another length at kimg 0.1: the snapshots up to 96 images, weights as recorded.
    ganpipe(capsys, "posthoc-ema", "--run-dir", str(run), "--std", "0.08", "--at-kimg", "0.1", "--out",
            str(tmp_path / "p08.json"))
    G, meta = load_snapshot(tmp_path / "p08.json")
    info = meta["posthoc_ema"]
    assert (info["std"], info["snapshot"], meta["cur_nimg"]) == (0.08, "snapshot-000000096", 96)
    assert [(s["snapshot"], s["variant"]) for s in info["sources"]] == [
        (f"snapshot-{n:09d}", v) for n in (32, 64, 96) for v in ("phema-0.05", "phema-0.1")]
    files = {s["variant"]: s for s in info["sources"]}
    assert len(files) == 2
    expected = {}
    for s in info["sources"]:
        state = load_file(str(run / "snapshots" / f"{s['snapshot']}-{s['variant']}.safetensors"))
        for k, _ in G.named_parameters():
            expected[k] = expected.get(k, 0) + s["weight"] * state[k].double()
    for k, v in G.named_parameters():
        assert torch.allclose(v.double(), expected[k], atol=1e-6), k
    out, _ = ganpipe(capsys, "sample", "--snapshot", str(tmp_path / "p08.json"), "--num", "4", "--out",
                     str(tmp_path / "g.png"))
    assert "wrote 4 images" in out and (tmp_path / "g.png").stat().st_size > 100

    # One-line errors: a length outside the power profiles' range; no profiles before that kimg.
    _, err = ganpipe(capsys, "posthoc-ema", "--run-dir", str(run), "--std", "0.3", "--out", str(tmp_path / "x.json"),
                     status=2)
    assert "relative EMA length must lie in (0, 0.2887)" in err
    _, err = ganpipe(capsys, "posthoc-ema", "--run-dir", str(run), "--std", "0.1", "--at-kimg", "0.01", "--out",
                     str(tmp_path / "x.json"), status=2)
    assert "no snapshot with power-function EMA profiles at or before kimg 0.01" in err


EVAL = ["--extractor", "mnist", "--num-gen", "200", "--batch-size", "100", "--metrics", "fid"]


def test_eval_scores_raw_and_posthoc_generators_as_their_own_series(phema_run, tmp_path, mnist_dir, mnist_ref,
                                                                     capsys):
    run = tmp_path / "run"
    shutil.copytree(phema_run, run)
    ganpipe(capsys, "eval", "--run-dir", str(run), *EVAL)                       # the newest, EMA G
    ganpipe(capsys, "eval", "--run-dir", str(run), "--generator", "raw", "--all", *EVAL)
    ema, *raw = records(run)
    assert (ema["name"], ema["weights"], ema["snapshot"]) == ("fid_mnist", "ema", "snapshot-000000128")
    # Raw scores are another protocol: --all scored every snapshot's raw G, the newest one included.
    assert [(r["name"], r["weights"], r["snapshot"]) for r in raw] == [
        ("fid_mnist_raw", "raw", f"snapshot-{n:09d}") for n in (32, 64, 96, 128)]
    assert raw[-1]["value"] != ema["value"]
    best = json.loads((run / "best.json").read_text())
    assert best["fid_mnist"]["weights"] == "ema" and best["fid_mnist_raw"]["weights"] == "raw"
    assert best["fid_mnist_raw"]["value"] == min(r["value"] for r in raw) and best["fid_mnist"]["snapshots_scored"] == 1

    out, _ = ganpipe(capsys, "eval", "--run-dir", str(run), "--posthoc-std", "0.05,0.08", *EVAL)
    assert len(records(run)) == 5                     # the kimg history is left alone
    sweep = records(run / "posthoc")
    assert [(r["weights"], r["posthoc_std"], r["snapshot"]) for r in sweep] == [
        ("posthoc", 0.05, "posthoc-000000128-std0.05"), ("posthoc", 0.08, "posthoc-000000128-std0.08")]
    assert "rebuilt sigma_rel 0.08 at kimg 0.128 from 8 profiles" in out
    # A rebuild scored by name is recorded with the sweep, not in the kimg history; same file, same score.
    ganpipe(capsys, "eval", "--run-dir", str(run), "--snapshot", str(run / "posthoc" / "posthoc-000000128-std0.05.json"),
            *EVAL)
    assert len(records(run)) == 5 and records(run / "posthoc")[-1]["value"] == sweep[0]["value"]
    png = (run / "posthoc" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_raw_weights_asked_of_a_snapshot_without_them_name_the_option(tmp_path, mnist_dir, mnist_ref, capsys):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator()})
    for flag in ("--generator", "--weights"):          # `--weights raw` means the same
        _, err = ganpipe(capsys, "eval", "--run-dir", str(run), *EVAL, flag, "raw", status=2)
        assert len(err.strip().splitlines()) == 1, err
        assert "snapshot-000001000.json has no raw generator weights" in err and "train.snapshot_raw=true" in err
    assert records(run) == []
