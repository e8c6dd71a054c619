"""The metrics beyond FID/KID (precision/recall, density/coverage, Inception Score), the one-pass
statistics behind them, the DINOv2 and Inception-logits extractors, and `ganpipe compare`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, cli
from pipeline.errors import UserError
from pipeline.metrics.features import INCEPTION_FILE, get_extractor
from pipeline.metrics.fid import feature_stats, frechet_distance
from pipeline.metrics.manifold import manifold_scores
from pipeline.metrics.scores import inception_score
from pipeline.metrics.stats import ClassSums, FeatureStats, generated_statistics
from test_metrics import (make_run, mlp_generator, mnist_ext, mnist_ref,  # noqa: F401
                          one_digit_generator, records)

# KID (clean-fid's numpy, ~4 s a score here) is left to one call of its own.
ALL = ["--metrics", "fid,pr,dc,is", "--extractor", "mnist", "--num-gen", "600", "--batch-size", "200"]


def ganpipe(capsys, *args: str) -> tuple[int, str, str]:
    """`ganpipe ARGS` in this process (the CLI's own main: parsing, errors, exit status), for the
    calls around the subprocess ones: a fresh interpreter costs seconds here."""
    from pipeline.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------
# Inception Score: the formula, and the running sums the evaluator keeps

def test_inception_score_formula_on_hand_made_probabilities():
    C = 8
    # Confident and evenly spread over C classes: IS = C; all images alike: IS = 1; unsure: IS = 1.
    spread = np.eye(C)[np.arange(400) % C]
    assert inception_score(spread) == pytest.approx((C, 0.0), abs=1e-12)
    assert inception_score(np.tile(np.eye(C)[2], (400, 1))) == pytest.approx((1.0, 0.0))
    assert inception_score(np.full((400, C), 1 / C)) == pytest.approx((1.0, 0.0))
    # Confident on half the classes: IS = C / 2.
    half = np.eye(C)[np.arange(400) % (C // 2)]
    assert inception_score(half)[0] == pytest.approx(C / 2)
    # A general case against the definition written out: exp(E KL(p(y|x) || p(y))) per split.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(C, 0.3), size=1003)
    bounds = [i * 1003 // 10 for i in range(11)]    # the original code's slices: 100 or 101 images
    want = []
    for i in range(10):
        q = p[bounds[i]:bounds[i + 1]]
        want.append(np.exp(np.mean([np.sum(row * np.log(row / q.mean(0))) for row in q])))
    assert inception_score(p) == pytest.approx((np.mean(want), np.std(want)), rel=1e-12)

    # The evaluator's running sums (uneven batches, softmax of logits) give the same numbers.
    logits = torch.from_numpy(np.log(p))
    sums = ClassSums(C, 1003)
    for lo, hi in [(0, 7), (7, 300), (300, 301), (301, 1003)]:
        sums.add(sums.packet(lo, logits[lo:hi]))
    assert sums.count.tolist() == [b - a for a, b in zip(bounds, bounds[1:])]
    assert sums.score() == pytest.approx(inception_score(p), rel=1e-10)


def test_running_moments_equal_numpys_mean_and_covariance():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(700, 12)) * rng.uniform(0.1, 3, 12) + 40).astype(np.float32)   # a large mean
    st = FeatureStats(12, torch.device("cpu"), moments=True, class_sums=None)
    for lo in range(0, 700, 256):
        st.add(st.packet(lo, torch.from_numpy(x[lo:lo + 256]), None))
    assert st.count == 700
    np.testing.assert_allclose(st.mean(), x.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(st.cov(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# The one pass, checked against the plain per-metric computations

def test_one_pass_gives_what_each_metric_computes_alone(mnist_dir, mnist_ext, mnist_ref):
    from pipeline.metrics.evaluator import generated_features

    G = one_digit_generator(mnist_dir, digit=3)
    stats = generated_statistics(G, [mnist_ext], num=500, batch_size=160, seed=4, moments=True, classes=True,
                                 keep=300)["mnist"]
    feats = generated_features(G, mnist_ext, num=500, batch_size=160, seed=4)
    assert stats.count == 500 and np.array_equal(stats.sample, feats[:300])
    fid_alone = frechet_distance(*feature_stats(feats), mnist_ref.mu, mnist_ref.sigma)
    # feature_stats takes the mean in float32 as clean-fid does (relative error ~1e-7 per element),
    # the running sums in float64: the two FIDs agree to about 1e-7 (1.2e-7 on an Intel Xeon).
    assert frechet_distance(stats.mean(), stats.cov(), mnist_ref.mu, mnist_ref.sigma) == pytest.approx(
        fid_alone, rel=1e-6)
    with torch.no_grad():
        probs = torch.softmax(mnist_ext.net.logits(mnist_ext.prepare(_images(G, 500, 4))).double(), 1).numpy()
    assert stats.class_sums.score() == pytest.approx(inception_score(probs), rel=1e-6)
    # A one-digit generator: the IS of a collapsed model is near 1 (a good one nears 10).
    assert stats.class_sums.score()[0] < 1.5


def _images(G, num, seed):
    from pipeline import generate

    return generate.to_uint8(generate.images(G, seed=seed, start=0, count=num))


# ---------------------------------------------------------------------------------------------
# ganpipe eval --metrics ... end to end

def test_eval_records_every_metric_with_its_protocol(tmp_path, mnist_dir, mnist_ref, mnist_ext, capsys):
    from pipeline.metrics.evaluator import generated_features

    G1, G2 = mlp_generator(0), one_digit_generator(mnist_dir)
    run = make_run(tmp_path, mnist_dir, {1000: G1, 2000: G2})
    # The real CLI, as 2 gloo processes: 3 batches of 208 per snapshot, so the ranks' rounds are uneven.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipeline", "eval", "--run-dir", str(run), "--all", *ALL], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records(run)
    # One process scores the same bits: the running sums are added in batch order after every round.
    assert ganpipe(capsys, "eval", "--run-dir", str(run), "--all", "--force", *ALL)[0] == 0
    again = records(run)[len(recs):]
    assert [(r["name"], r["snapshot"], r["value"]) for r in again] == [(r["name"], r["snapshot"], r["value"])
                                                                        for r in recs]
    assert {r["world_size"] for r in recs} == {2} and {r["world_size"] for r in again} == {1}
    got = {(r["snapshot"], r["name"]): r for r in recs}
    names = ["fid_mnist", "precision_mnist", "recall_mnist", "density_mnist", "coverage_mnist", "is_mnist"]
    assert sorted(got) == sorted((s, n) for s in ("snapshot-000001000", "snapshot-000002000") for n in names)
    for (snap, name), r in got.items():
        assert r["num_gen"] == 600 and r["extractor"] == "mnist" and r["reference"]["num"] == 4000
        assert r["reference"]["sample_num"] == 4000 and r["extractors"] == ["mnist"]
    p = got[("snapshot-000002000", "precision_mnist")]
    assert (p["k"], p["sample_gen"], p["sample_ref"]) == (3, 600, 4000)
    assert got[("snapshot-000002000", "coverage_mnist")]["k"] == 5
    assert got[("snapshot-000002000", "is_mnist")]["splits"] == 10

    # Each value is what the metric's own function makes of the same images' features.
    feats = generated_features(G2, mnist_ext, num=600, batch_size=208, seed=0)
    alone = manifold_scores(mnist_ref.feats, feats)
    for m in ("precision", "recall", "density", "coverage"):
        assert got[("snapshot-000002000", f"{m}_mnist")]["value"] == pytest.approx(alone[m], abs=1e-12)
    fid = frechet_distance(*feature_stats(feats), mnist_ref.mu, mnist_ref.sigma)
    assert got[("snapshot-000002000", "fid_mnist")]["value"] == pytest.approx(fid, rel=1e-7)

    # The collapsed one-digit model: precise, yet low recall/coverage and IS; the untrained one is noise.
    one = {m: got[("snapshot-000002000", f"{m}_mnist")]["value"] for m in ("precision", "recall", "coverage", "is")}
    noise = {m: got[("snapshot-000001000", f"{m}_mnist")]["value"] for m in ("precision", "recall", "coverage", "is")}
    assert one["precision"] > 0.5 and one["recall"] < 0.05 and one["coverage"] < 0.1 and one["is"] < 1.5
    assert noise["precision"] < one["precision"]
    assert 0 < got[("snapshot-000002000", "is_mnist")]["is_std"] < 1

    # best.json ranks by FID and KID unless told; --best-metric picks others (higher is better there).
    best = json.loads((run / "best.json").read_text())
    assert set(best) == {"fid_mnist"}
    assert ganpipe(capsys, "eval", "--run-dir", str(run), "--snapshot", "snapshot-000002000", *ALL[2:],
                   "--metrics", "kid")[0] == 0
    kid = records(run)[-1]
    assert (kid["metric"], kid["kid_subset_size"], kid["sample_gen"], kid["sample_ref"]) == ("kid", 600, 600, 4000)
    assert set(json.loads((run / "best.json").read_text())) == {"fid_mnist", "kid_mnist"}
    n = len(records(run))
    assert ganpipe(capsys, "eval", "--run-dir", str(run), "--all", *ALL, "--best-metric", "fid,precision")[0] == 0
    assert len(records(run)) == n                               # nothing new to score: same protocol
    best = json.loads((run / "best.json").read_text())
    assert set(best) == {"fid_mnist", "precision_mnist"}
    precisions = {r["snapshot"]: r["value"] for r in recs if r["metric"] == "precision"}
    assert best["precision_mnist"]["snapshot"] == max(precisions, key=precisions.get)

    # The k-NN sample is part of the protocol: a larger N is scored anew, not mixed with these.
    code, out, _ = ganpipe(capsys, "eval", "--run-dir", str(run), "--all", "--metrics", "pr", "--extractor", "mnist",
                           "--num-gen", "400", "--batch-size", "200")
    assert code == 0 and "snapshot-000002000 kimg 2: precision_mnist" in out
    assert len(records(run)) == n + 4


def test_is_needs_class_logits_and_pr_enough_images(tmp_path, mnist_dir, capsys):
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator()})
    code, _, err = ganpipe(capsys, "eval", "--run-dir", str(run), "--metrics", "fid,is", "--extractor", "dinov2-b14",
                           "--num-gen", "100")
    assert code == 2 and "--metrics is needs class logits, which dinov2-b14 lacks" in err
    assert "--extractor inception" in err
    code, _, err = ganpipe(capsys, "eval", "--run-dir", str(run), "--metrics", "pr", "--extractor", "mnist",
                           "--num-gen", "4")
    assert code == 2 and "need more than 5 generated images" in err
    assert not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Extractors: Inception logits, DINOv2

def _inception_with_logits(directory):
    """A TorchScript stand-in with the real file's interface: `.layers` -> (B, 2048) pool features
    and `.output`, the 1008-class layer; forward(..., no_output_bias=True) -> softmax without bias."""

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.fc = nn.Linear(48, 2048)

        def forward(self, x):
            return torch.relu(self.fc(self.pool(x).flatten(1)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()
            self.output = nn.Linear(2048, 1008)

        def forward(self, x, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
            features = self.layers((x - 128) / 128)
            if return_features:
                return features
            if no_output_bias:
                logits = torch.nn.functional.linear(features, self.output.weight)
            else:
                logits = self.output(features)
            return torch.softmax(logits, 1)

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.output.weight.mul_(20)
        net.output.bias.fill_(3.0)                 # a bias our logits must leave out
    torch.jit.script(net).save(str(directory / INCEPTION_FILE))
    return directory / INCEPTION_FILE


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning",
                            "ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_inception_score_uses_the_files_1008_class_logits_without_bias(tmp_path, monkeypatch):
    from test_metrics import publish

    weights = _inception_with_logits(tmp_path / "w")
    publish(monkeypatch, "inception", weights)
    ext = get_extractor("inception", weights=weights)
    assert (ext.num_classes, ext.dim) == (1008, 2048)
    G = mlp_generator(2)
    images = _images(G, 20, 0)
    feats, logits = ext.extract(images, logits=True)
    with torch.no_grad():
        theirs = ext.net.base(ext.prepare(images), no_output_bias=True)   # the file's own softmax path
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), theirs.numpy(), rtol=1e-5, atol=1e-7)
    stats = generated_statistics(G, [ext], num=20, batch_size=16, seed=0, moments=False, classes=True,
                                 keep=0)["inception"]
    assert stats.class_sums.score() == pytest.approx(inception_score(theirs.double().numpy()), rel=1e-5)
    # The existing stand-in without an output layer (test_metrics) has no class logits.
    from stubs import inception_stub

    publish(monkeypatch, "inception", inception_stub(tmp_path / "bare" / INCEPTION_FILE))
    bare = get_extractor("inception", weights=tmp_path / "bare" / INCEPTION_FILE)
    assert bare.head is None and bare.num_classes == 0
    with pytest.raises(ValueError, match="no class logits"):
        bare.extract(images[:2], logits=True)


def _dinov2_reference(vit518: nn.Module, images: np.ndarray) -> torch.Tensor:
    """Stein et al.'s DINOv2 features written out independently: torchvision's Resize((224, 224),
    BICUBIC) on PIL images, ToTensor, Normalize(ImageNet), then the ViT as DINOv2 runs it, with
    its 37 x 37 position embeddings interpolated at run time (bicubic, scale (16 + 0.1) / 37)."""
    import math

    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(Image.fromarray(img[0] if len(img) == 1 else img.transpose(1, 2, 0)).convert("RGB"))
                     for img in images])
    with torch.no_grad():
        tokens = vit518.patch_embed.proj(x).flatten(2).transpose(1, 2)            # (B, 256, D)
        tokens = torch.cat([vit518.cls_token.expand(len(x), -1, -1), tokens], 1)
        pos = vit518.pos_embed
        n = pos.shape[1] - 1
        m = int(math.sqrt(n))
        patch = torch.nn.functional.interpolate(
            pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=((16 + 0.1) / m, (16 + 0.1) / m),
            mode="bicubic")
        pos = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, 256, -1)], 1)
        tokens = vit518.blocks(tokens + pos)
        return vit518.norm(tokens)[:, 0]


def test_dinov2_extractor_reproduces_stein_et_al_on_random_weights(tmp_path, monkeypatch):
    """ViT-B/14 with random weights saved in Meta's checkpoint format (518 px, mask_token): the
    extractor loads it with nothing downloaded and gives the CLS features of the published recipe."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0).eval()
    state = {k: v for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 768)                                      # as in Meta's file
    with torch.no_grad():
        # Random weights as trained ones would not be: rough position embeddings (the resampling rule
        # shows) and layer scales of 1 instead of timm's 1e-5 init (else the blocks barely act and
        # every image gives the same CLS token).
        state["pos_embed"] = torch.randn_like(state["pos_embed"])
        for k in state:
            if k.endswith(".gamma"):
                state[k] = torch.ones_like(state[k])
        vit.load_state_dict({k: v for k, v in state.items() if k != "mask_token"})
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(state, path)
    monkeypatch.setenv("GANPIPE_DINOV2_WEIGHTS", str(tmp_path))                   # a directory works
    with pytest.raises(UserError, match="is not the published 0b8b82f8"):
        get_extractor("dinov2-b14")                 # random weights are not Meta's file
    from test_metrics import publish

    publish(monkeypatch, "dinov2-b14", path)
    ext = get_extractor("dinov2-b14")
    assert (ext.dim, ext.size, ext.resize, ext.weights, ext.num_classes) == (768, 224, "pil-bicubic224",
                                                                               str(path), 0)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    ours = np.concatenate([ext(grey), ext(rgb)])
    theirs = torch.cat([_dinov2_reference(vit, grey), _dinov2_reference(vit, rgb)]).numpy()
    assert ours.shape == (2, 768)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)   # clean (float) resizing: off by 2e-3
    assert not np.allclose(ours[0], ours[1], atol=1e-3)


def test_missing_dinov2_weights_say_where_to_get_them(tmp_path, mnist_dir, capsys):
    missing = tmp_path / "none" / "dinov2_vitl14_pretrain.pth"
    code, _, err = ganpipe(capsys, "refstats", str(mnist_dir), "--extractor", "dinov2-l14", "--weights", str(missing))
    msg = err.strip()
    assert code == 2 and len(msg.splitlines()) == 1
    assert f"DINOv2 weights file {missing} not found" in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in msg
    assert "GANPIPE_DINOV2_WEIGHTS" in msg and "--weights" in msg
    # Several extractors need a directory of weights, not one file.
    run = make_run(tmp_path, mnist_dir, {1000: mlp_generator()})
    code, _, err = ganpipe(capsys, "eval", "--run-dir", str(run), "--extractor", "mnist,dinov2-b14",
                           "--weights", str(missing))
    assert code == 2 and "name a directory holding each one's file" in err


# ---------------------------------------------------------------------------------------------
# ganpipe compare

def test_compare_plots_runs_and_refuses_to_mix_protocols(tmp_path, mnist_dir, mnist_ref, capsys):
    for d in ("a", "b", "b2"):
        (tmp_path / d).mkdir()
    a = make_run(tmp_path / "a", mnist_dir, {1000: mlp_generator(0), 2000: one_digit_generator(mnist_dir)})
    b = make_run(tmp_path / "b", mnist_dir, {1000: mlp_generator(1), 3000: one_digit_generator(mnist_dir, 7)})
    args = ["--metrics", "fid,pr", "--extractor", "mnist", "--num-gen", "300", "--batch-size", "160"]
    for run in (a, b):
        assert ganpipe(capsys, "eval", "--run-dir", str(run), "--all", *args)[0] == 0
    png = tmp_path / "cmp.png"
    out = cli("compare", str(a), str(b), "--metric", "fid,recall", "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    lines = out.stdout.splitlines()
    assert lines[0].startswith("fid_mnist (lowest is best): 300 generated (seed 0) vs train (4000 images)")
    for run in (a, b):
        fids = {r["snapshot"]: r for r in records(run) if r["metric"] == "fid"}
        best = min(fids.values(), key=lambda r: r["value"])
        row = next(line for line in lines if line.startswith(str(run) + " "))
        assert row.split() == [str(run), best["snapshot"], f"{best['kimg']:g}", f"{best['value']:.6g}", "2"]
    assert any(line.startswith("recall_mnist (highest is best)") and "k 3" in line for line in lines)
    labelled = cli("compare", str(a), str(b), "--label", "baseline", "--label", "rpgan", "--out", str(png))
    assert [line.split()[0] for line in labelled.stdout.splitlines()[2:4]] == ["baseline", "rpgan"], labelled.stdout
    bad = cli("compare", str(a), str(b), "--label", "one", "--out", str(png), check=False)
    assert bad.returncode == 2 and "--label given 1 times for 2 runs" in bad.stderr

    # b scored anew under another protocol (N = 200) only: nothing in common with a.
    b2 = make_run(tmp_path / "b2", mnist_dir, {1000: mlp_generator(1)})
    assert ganpipe(capsys, "eval", "--run-dir", str(b2), "--all", *args[:4], "--num-gen", "200")[0] == 0
    code, _, err = ganpipe(capsys, "compare", str(a), str(b2), "--metric", "fid", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "different protocols (num_gen 300 vs 200" in err
    assert not (tmp_path / "x.png").exists()
    code, _, err = ganpipe(capsys, "compare", str(a), str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err


def _fid_record(kimg: int, value: float, *, split: str = "train", labels: str = "none",
                weights: list[int] | None = None) -> dict:
    rec = {"name": "fid_mnist", "metric": "fid", "value": value, "snapshot": f"snapshot-{kimg * 1000:09d}",
           "snapshot_sha256": f"sha-{kimg}", "cur_nimg": kimg * 1000, "kimg": kimg, "extractor": "mnist",
           "extractor_sha256": "e", "resize": "clean28", "num_gen": 5000, "seed": 0, "seeding": "seed-index-v1",
           "psi": 1.0, "cutoff": None, "weights": "ema", "labels": labels,
           "reference": {"data": "d", "split": split, "num": 4000 if split == "train" else 1000,
                         "manifest_sha256": "m"}}
    return {**rec, "label_weights": weights} if weights is not None else rec


def test_compare_puts_unconditional_and_conditional_runs_side_by_side(tmp_path):
    """An unconditional G made no choice of classes: its scores compare with a conditional G's,
    whichever classes that one drew; two conditional runs must have drawn alike. A one-off score
    under another protocol (a test-split eval) does not take the run's main one's place."""
    from pipeline import generate
    from pipeline.metrics.compare import comparable_series
    from pipeline.metrics.records import append_records, protocol_key, record_main_protocol

    data = dict(labels="data (drawn per image from the class weights of split 'train')", weights=[3, 1])
    runs = {"uncond": [_fid_record(20, 2.0), _fid_record(40, 1.5)],
            "cond": [_fid_record(20, 1.0, **data), _fid_record(40, 0.4, **data)],
            "uniform": [_fid_record(20, 1.1, labels=generate.BALANCED), _fid_record(40, 0.5, labels=generate.BALANCED)]}
    for name, recs in runs.items():
        (tmp_path / name).mkdir()
        append_records(tmp_path / name, recs)
        record_main_protocol(tmp_path / name, {"fid_mnist": protocol_key(recs[-1])}, {}, by="eval --all")
    append_records(tmp_path / "cond", [_fid_record(40, 0.6, split="test", **data)])   # newest, not the main
    u, c, k = (tmp_path / n for n in runs)
    for order in ([u, c], [c, u], [u, k], [k, u]):
        name, series = comparable_series(order, "fid")
        assert name == "fid_mnist"
        for run in order:
            assert [r["value"] for r in series[run]] == [r["value"] for r in runs[run.name]]
    for order in ([c, k], [u, c, k]):
        with pytest.raises(UserError, match=r"different protocols \(labels data .* vs None\)"):
            comparable_series(order, "fid")


def test_compare_gives_each_of_many_runs_its_own_colour(tmp_path, monkeypatch):
    """Past matplotlib's 10-colour cycle (11 runs in docs/demo-candidates.png), tab20: no two lines share a colour."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from pipeline.metrics import compare

    drawn = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), original(self, *a, **k))[1])
    monkeypatch.setattr(compare, "describe", lambda rec: "the protocol")
    series = {tmp_path / f"run{i}": [{"metric": "fid", "kimg": k, "cur_nimg": k * 1000, "value": 10.0 - k / 10 + i}
                                     for k in (20, 40)] for i in range(12)}
    compare.plot([("fid", series)], tmp_path / "many.png")
    (ax,) = drawn[0].axes
    colours = [tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
               for line in ax.get_lines() if line.get_linestyle() != "None"]
    assert len(colours) == 12 and len(set(colours)) == 12
