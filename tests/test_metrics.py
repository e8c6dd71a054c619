"""Evaluation maths and pieces: Fréchet distance, KID, clean resize, extractors, reference statistics.

Also holds the helpers the eval and watch tests share (tiny `mlp` generators saved as real
snapshots in a run directory whose data is the session's prepared MNIST).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import cli
from stubs import inception_stub
from pipeline.config import Config, DataConfig, ModelConfig, dump_config
from pipeline.generate import images, latents, to_uint8
from pipeline.metrics.evaluator import generated_features
from pipeline.errors import UserError
from pipeline.metrics.features import INCEPTION_FILE, INCEPTION_URL, get_extractor
from pipeline.metrics.fid import feature_stats, frechet_distance, kernel_distance
from pipeline.data.splits import read_split
from pipeline.metrics.refstats import (cache_name, compute_refstats, reference_stats)
from pipeline.networks import build_networks
from pipeline.training.snapshot import SnapshotInfo, load_snapshot, save_snapshot

MODEL = ModelConfig(name="mlp", g_width=0.25)     # hidden 64-128-256: fast to run


# ---------------------------------------------------------------------------------------------
# Shared helpers (imported by test_eval.py and test_watch.py).

def mlp_generator(seed: int = 0, num_classes: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(name="mlp", g_width=0.25, conditional=bool(num_classes))
    G, _ = build_networks(cfg, resolution=28, channels=1, num_classes=num_classes or 10)
    return G.eval()


def one_digit_generator(mnist_dir: Path, digit: int = 1, seed: int = 0) -> nn.Module:
    """An mlp G that draws one real '1' with a little z-dependent jitter: a collapsed generator."""
    G = mlp_generator(seed)
    images, labels = read_split(mnist_dir, "train")
    target = images[labels == digit][0, 0].astype(np.float32) / 127.5 - 1
    last = G.net[-2]
    with torch.no_grad():
        last.weight.mul_(0.05)
        last.bias.copy_(torch.from_numpy(np.arctanh(np.clip(target, -0.98, 0.98))).flatten())
    return G


def make_run(root: Path, mnist_dir: Path, generators: dict[int, nn.Module]) -> Path:
    """A run directory as the trainer leaves it: config.yaml plus snapshots at the given cur_nimg."""
    run = root / "run"
    run.mkdir()
    dump_config(Config(data=DataConfig(path=str(mnist_dir)), model=MODEL), run / "config.yaml")
    for nimg, G in generators.items():
        add_snapshot(run, nimg, G)
    return run


def add_snapshot(run: Path, nimg: int, G: nn.Module) -> Path:
    return save_snapshot(G, run / "snapshots", cur_nimg=nimg, info=SnapshotInfo(MODEL, 28, 1, 10))


def records(run: Path) -> list[dict]:
    """The score lines of RUN/metrics.jsonl (not the lines with a `kind`: alerts, marks, the main protocol)."""
    path = run / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in lines if "kind" not in r]


@pytest.fixture(scope="session")
def mnist_ext():
    return get_extractor("mnist")


@pytest.fixture(scope="session")
def mnist_ref(mnist_dir, mnist_ext):
    """Reference stats of the train split, cached beside the session data (eval subprocesses reuse them)."""
    return reference_stats(mnist_dir, "train", mnist_ext, log=lambda m: None)


# ---------------------------------------------------------------------------------------------
# Fréchet distance and KID

def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_equals_the_closed_form():
    rng = np.random.default_rng(0)
    d = 8
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(expected, rel=1e-9)
    # General covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed by eigendecomposition.
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    r1 = _sqrtm_psd(c1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * _sqrtm_psd(r1 @ c2 @ r1))
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-8)
    # From samples: the estimate converges to the closed form of the true Gaussians.
    x = rng.multivariate_normal(mu1, c1, size=40_000)
    y = rng.multivariate_normal(mu2, c2, size=40_000)
    m_x, c_x = feature_stats(x)
    m_y, c_y = feature_stats(y)
    assert c_x.dtype == np.float64 and np.allclose(c_x, np.cov(x, rowvar=False))
    assert frechet_distance(m_x, c_x, m_y, c_y) == pytest.approx(expected, rel=0.03)


def test_kid_is_seeded_and_leaves_the_global_rng_alone():
    from cleanfid.fid import kernel_distance as cleanfid_kid

    rng = np.random.default_rng(1)
    # More vectors than the subset size, so the subsets really are random draws (small: KID is slow).
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    shifted = rng.normal(loc=0.5, size=(300, 16))
    kw = dict(num_subsets=20, max_subset_size=200)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    k1 = kernel_distance(a, shifted, seed=0, **kw)
    assert np.array_equal(np.random.get_state()[1], before)
    assert kernel_distance(a, shifted, seed=0, **kw) == k1 and kernel_distance(a, shifted, seed=1, **kw) != k1
    same = kernel_distance(a, b, seed=0, **kw)
    assert abs(same) < 0.1 * k1 and k1 > 0
    # It is clean-fid's number on clean-fid's subsets: to float32 rounding of clean-fid's own
    # float32 loop, and closer still to the same formula in float64.
    np.random.seed(0)
    theirs32 = cleanfid_kid(a.astype(np.float32), shifted.astype(np.float32), **kw)
    np.random.seed(0)
    theirs64 = cleanfid_kid(a, shifted, **kw)
    assert k1 == pytest.approx(theirs32, rel=1e-5) and k1 == pytest.approx(theirs64, rel=1e-5)
    np.random.seed(1)
    assert kernel_distance(a, shifted, seed=1, **kw) == pytest.approx(cleanfid_kid(a, shifted, **kw), rel=1e-5)
    # m - 1 in the within-set term: the diagonal really is left out (a wrong formula moves it by far more).
    x, y = a[:20], shifted[:20]
    kxx, kyy, kxy = ((u @ v.T / 16 + 1) ** 3 for u, v in ((y, y), (x, x), (y, x)))
    by_hand = ((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / 19 - 2 * kxy.sum() / 20) / 20
    assert kernel_distance(x, y, seed=0, num_subsets=1, max_subset_size=20) == pytest.approx(by_hand, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Extractors and the clean resize

def test_prepare_is_cleanfids_clean_resize(tmp_path, mnist_ext):
    """Our uint8 -> network input path gives exactly what clean-fid makes of the same PNG files."""
    from cleanfid.resize import make_resizer
    from cleanfid.utils import ResizeDataset

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (3, 3, 20, 20), dtype=np.uint8)
    files = []
    for i, img in enumerate([*grey, *rgb]):
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(files[-1])
    ds = ResizeDataset([str(f) for f in files], mode="clean")
    ds.fn_resize = make_resizer("PIL", False, "bicubic", (28, 28))
    theirs = torch.stack([ds[i] for i in range(len(files))])
    ours = torch.cat([mnist_ext.prepare(grey), mnist_ext.prepare(rgb)])   # 28 -> 28 skips PIL, 20 -> 28 uses it
    assert ours.shape == (6, 3, 28, 28) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_mnist_extractor_is_a_real_digit_classifier(mnist_dir, mnist_ext):
    from pipeline.metrics.mnist_net import load_mnist_net

    net, meta = load_mnist_net(mnist_ext.weights)
    images, labels = read_split(mnist_dir, "test")      # the holdout it never trained on
    with torch.no_grad():
        acc = (net.logits(torch.from_numpy(images).float()).argmax(1).numpy() == labels).mean()
    assert acc > 0.97 and abs(acc - float(meta["test_accuracy"])) < 0.005
    assert Path(mnist_ext.weights).stat().st_size < 400_000 and mnist_ext.dim == 64
    feats = mnist_ext(images[:500])
    assert feats.shape == (500, 64) and np.linalg.matrix_rank(np.cov(feats, rowvar=False)) == 64


def publish(monkeypatch, name: str, weights: Path) -> None:
    """Let a stand-in weights file pass as extractor `name`'s published one (it is checked by sha256)."""
    from pipeline.io import sha256_file
    from pipeline.metrics import features

    monkeypatch.setitem(features.PUBLISHED_SHA256, name, (sha256_file(weights),))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning",
                            "ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_inception_extractor_gives_cleanfids_features(tmp_path, monkeypatch):
    """Wherever the weights file is, our features equal clean-fid's own folder pipeline with its
    InceptionV3W on the same file (a stand-in network here: the real one cannot be downloaded)."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    weights = inception_stub(tmp_path / "w" / INCEPTION_FILE)
    monkeypatch.setenv("GANPIPE_INCEPTION_WEIGHTS", str(tmp_path / "w"))   # a directory works too
    with pytest.raises(UserError, match="is not the published f58cb9b6"):
        get_extractor("inception")                  # a stand-in is not the published file
    publish(monkeypatch, "inception", weights)
    ext = get_extractor("inception")
    assert (ext.dim, ext.size, ext.resize, ext.weights) == (2048, 299, "clean299", str(weights))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    (tmp_path / "png").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[0]).save(tmp_path / "png" / f"{i}.png")
    theirs = get_folder_features(str(tmp_path / "png"), InceptionV3W(str(tmp_path / "w"), download=False),
                                 num_workers=0, batch_size=5, device=torch.device("cpu"), mode="clean",
                                 verbose=False)
    ours = ext(images)
    assert ours.shape == (5, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_missing_or_broken_inception_weights_explain_the_fix(tmp_path, mnist_dir, mnist_ref):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator()})
    missing = tmp_path / "nowhere" / INCEPTION_FILE
    out = cli("eval", "--run-dir", str(run), "--num-gen", "100", check=False,
              env={"GANPIPE_INCEPTION_WEIGHTS": str(missing)})
    assert out.returncode == 2, out.stderr
    msg = out.stderr.strip()
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg
    assert f"Inception weights file {missing} not found" in msg and INCEPTION_URL in msg
    assert "--inception-weights" in msg and "GANPIPE_INCEPTION_WEIGHTS" in msg and "--extractor mnist" in msg
    assert not (run / "metrics.jsonl").exists()
    # A cut-short download is named as such.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / INCEPTION_FILE).write_bytes(b"PK\x03\x04 truncated")
    from pipeline.cli import UserError

    with pytest.raises(UserError, match="cannot be loaded.*interrupted download"):
        get_extractor("inception", weights=bad / INCEPTION_FILE)


# ---------------------------------------------------------------------------------------------
# Reference statistics and the FID's sense

def test_refstats_are_cached_beside_the_data_and_keyed(tmp_path, mnist_dir, mnist_ext, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(mnist_dir, data, ignore=shutil.ignore_patterns("refstats"))
    out = cli("refstats", str(data), "--split", "test", "--extractor", "mnist")
    info = json.loads(out.stdout)
    path = Path(info["path"])
    # Keyed by the split's shards as the manifest lists them (each checked against its file).
    shards = json.loads((data / "manifest.json").read_text())["splits"]["test"]["shards"]
    identity = {"resolution": 28, "channels": 1, "shards": [[s["name"], s["bytes"], s["sha256"], s["num_samples"]]
                                                            for s in shards]}
    sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    assert path == data / "refstats" / f"test-mnist-clean28-{sha[:12]}.npz"
    assert (info["num"], info["split"], info["extractor"], info["feature_dim"]) == (1000, "test", "mnist", 64)
    stamp = path.stat().st_mtime_ns
    stats = reference_stats(data, "test", mnist_ext, log=lambda m: None)       # a cache hit
    assert path.stat().st_mtime_ns == stamp and stats.path == path and stats.num == 1000
    fresh = compute_refstats(data, "test", mnist_ext)
    np.testing.assert_allclose(stats.mu, fresh.mu, rtol=1e-12)
    assert stats.sigma.shape == (64, 64) and stats.feats.shape == (1000, 64)
    # Other shards (here the same images gzip-compressed, as a re-index would list them) get their
    # own key; an unwritable place falls back.
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["splits"]["test"]["shards"]:
        f = data / shard["name"]
        f.write_bytes(gzip.compress(f.read_bytes(), mtime=0))
        shard.update(bytes=f.stat().st_size, sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    (data / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(data / "refstats")
    (data / "refstats").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    moved = reference_stats(data, "test", mnist_ext, log=lambda m: None)
    assert moved.path.parent == tmp_path / "cache" / "ganpipe" / "refstats"
    assert moved.path.name == cache_name(data, "test", mnist_ext) != path.name
    # Other extractor weights make the cached file stale.
    mnist_ext2 = get_extractor("mnist")
    mnist_ext2.weights_sha256 = "0" * 64
    notes = []
    reference_stats(data, "test", mnist_ext2, log=notes.append)
    assert any("other mnist weights" in n for n in notes)


def test_fid_ranks_real_far_below_noise_and_one_digit(mnist_dir, mnist_ext, mnist_ref):
    test_images, _ = read_split(mnist_dir, "test")
    mu, sigma = feature_stats(mnist_ext(test_images))
    fid_real = frechet_distance(mu, sigma, mnist_ref.mu, mnist_ref.sigma)
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1, 28, 28), dtype=np.uint8)
    fid_noise = frechet_distance(*feature_stats(mnist_ext(noise)), mnist_ref.mu, mnist_ref.sigma)
    scores = {}
    for name, G in {"untrained": mlp_generator(), "one_digit": one_digit_generator(mnist_dir)}.items():
        feats = generated_features(G, mnist_ext, num=1000, batch_size=250, seed=0)
        scores[name] = frechet_distance(*feature_stats(feats), mnist_ref.mu, mnist_ref.sigma)
    print(f"FID vs train: real test {fid_real:.3f}, uniform noise {fid_noise:.1f}, "
          f"untrained G {scores['untrained']:.1f}, one-digit G {scores['one_digit']:.1f}")
    assert fid_real < 0.02 * fid_noise
    assert fid_real < 0.02 * scores["untrained"]
    assert fid_real < 0.1 * scores["one_digit"]


# ---------------------------------------------------------------------------------------------
# Generation

def test_latents_and_labels_do_not_depend_on_batching(tmp_path):
    whole = latents(7, 0, 2500, 16)
    parts = torch.cat([latents(7, 0, 700, 16), latents(7, 700, 1100, 16), latents(7, 1800, 700, 16)])
    assert torch.equal(whole, parts) and not torch.equal(whole, latents(8, 0, 2500, 16))
    assert abs(whole.mean().item()) < 0.05 and abs(whole.std().item() - 1) < 0.05
    # Conditional snapshots: labels i % num_classes, balanced over any N divisible by the classes.
    G = mlp_generator(num_classes=10)
    snap = save_snapshot(G, tmp_path, cur_nimg=5, info=SnapshotInfo(ModelConfig(name="mlp", g_width=0.25, conditional=True), 28, 1, 10))
    G2, meta = load_snapshot(snap)
    assert meta["model"]["conditional"] and G2.num_classes == 10
    got = to_uint8(images(G2, start=30, count=20, seed=3, device=torch.device("cpu")))
    with torch.no_grad():
        want = G(latents(3, 30, 20, G.z_dim), torch.arange(30, 50) % 10)
    assert got.dtype == np.uint8 and got.shape == (20, 1, 28, 28)
    assert np.array_equal(got, (want * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy())


def test_metrics_jsonl_survives_a_torn_last_line(tmp_path):
    """A crash mid-append leaves a partial line: readers skip it and the next append starts afresh."""
    from pipeline.metrics.records import append_records, read_records

    rec = {"name": "fid_mnist", "metric": "fid", "value": 1.5, "snapshot": "s", "snapshot_sha256": "ab",
           "cur_nimg": 1, "kimg": 0.001, "extractor": "mnist", "extractor_sha256": "cd", "resize": "clean28",
           "num_gen": 10, "seed": 0, "reference": {"split": "train", "num": 5, "manifest_sha256": "ef"}}
    append_records(tmp_path, [rec])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"name": "fid_mnist", "val')
    assert read_records(tmp_path) == [rec]
    append_records(tmp_path, [{**rec, "value": 2.5}, {**rec, "metric": "kid", "name": "kid_mnist"}])
    assert [r["value"] for r in read_records(tmp_path)] == [1.5, 2.5, 1.5]


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")   # in clean-fid's call
def test_fid_equals_cleanfids_compute_fid_on_the_same_images(mnist_dir):
    """`ganpipe bench eval` at small size: our shard/snapshot pipeline and clean-fid's own
    compute_fid (PNG folder + replayed generator, same extractor) give the same FID."""
    import argparse

    from pipeline.bench import eval as bench_eval

    args = argparse.Namespace(num_gen=500, extractor="mnist", inception_weights=None, model="mlp",
                              data=mnist_dir, split="test", batch_size=250, device="cpu", cleanfid_workers=0,
                              metric_sets=["fid", "fid,kid,pr,dc,is"])
    out = bench_eval.run(args)
    assert out["num_gen"] == 500 and out["reference"]["num"] == 1000
    assert out["ours"]["fid"] > 1 and out["cleanfid_compute_fid"]["fid"] == out["ours"]["fid"]   # same bits
    assert out["ratio_cleanfid_time_to_ours"] > 0
    costs = out["metric_costs"]
    assert set(costs["seconds"]) == {"fid", "fid,kid,pr,dc,is"} and costs["over_fid_alone"]["fid"] == 1.0
    assert all(t > 0 for t in costs["seconds"].values())
