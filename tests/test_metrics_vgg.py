"""VGG16 fc2 features for precision/recall and density/coverage, the real sample's size, and the
Inception Score's resize.

The real `vgg16-397923af.pth` cannot be downloaded here: a randomly initialised torchvision vgg16
state_dict stands in for it (built once per module), and the published-hash table is pointed at its
sha256 prefix where a test needs it to load. The Inception file is a small TorchScript stand-in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import cli, make_npz
from stubs import inception_stub
from pipeline.errors import UserError
from pipeline.io import sha256_file
from pipeline.metrics import features
from pipeline.metrics.compare import comparable_series
from pipeline.metrics.features import (INCEPTION_FILE, VGG16_FILE, VGG16_URL, check_data, get_extractor,
                                       tf_bilinear_resize, vgg16_path)
from pipeline.metrics.records import protocol_key
from pipeline.metrics.scores import extractor_plan
from test_metrics import make_run, mlp_generator, records

JIT_WARNINGS = ("ignore:`torch.jit.script` is deprecated:FutureWarning",
                "ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def vgg_state() -> dict:
    """torchvision's vgg16 state_dict with seeded random weights (He-normal, so fc2 is neither dead
    nor huge): the stand-in for the real weights."""
    import torchvision

    vgg = torchvision.models.vgg16(weights=None, init_weights=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vgg.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.01, generator=gen)
            else:
                p.normal_(0, (2 / p[0].numel()) ** 0.5, generator=gen)
    return vgg.state_dict()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory, vgg_state) -> Path:
    """The stand-in saved under the published file's name."""
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILE
    torch.save(vgg_state, path)
    return path


def publish_vgg(monkeypatch, path: Path) -> str:
    """Let the stand-in pass torchvision's check: the published prefix becomes its own. Its sha256."""
    sha = sha256_file(path)
    monkeypatch.setitem(features.PUBLISHED_SHA256_PREFIX, "vgg16", (sha[:8],))
    return sha


@pytest.fixture(scope="module")
def vgg_ext(vgg_file):
    with pytest.MonkeyPatch.context() as mp:
        publish_vgg(mp, vgg_file)
        return get_extractor("vgg16", weights=vgg_file)


def tf_resize_by_grid(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's resize_bilinear as StyleGAN2-ADA writes it: an affine grid shifted by half an input
    pixel minus half an output pixel, sampled bilinearly with border padding."""
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += 1 / x.shape[3] - 1 / size
    theta[1, 2] += 1 / x.shape[2] - 1 / size
    grid = F.affine_grid(theta.expand(len(x), 2, 3), [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def tiny_data(tmp_path: Path, n: int = 6) -> Path:
    """n random 28 px grey images in one train split: reference statistics in a few VGG16 passes."""
    from pipeline.data.prepare import prepare

    npz = make_npz(tmp_path / "src.npz", n, 28, channels=1)
    prepare(f"npz:{npz}", tmp_path / "data", shard_size=n, workers=1, progress=False)
    return tmp_path / "data"


# ---------------------------------------------------------------------------------------------
# The extractor

def test_vgg16_weights_are_checked_before_loading_and_named_when_missing(vgg_file, tmp_path, monkeypatch):
    # The stand-in's sha256 does not begin with torchvision's 397923af: refused, both named.
    with pytest.raises(UserError, match="does not begin with 397923af") as info:
        get_extractor("vgg16", weights=vgg_file)
    assert sha256_file(vgg_file) in str(info.value) and VGG16_URL in str(info.value)
    sha = publish_vgg(monkeypatch, vgg_file)
    # Another file is refused even under the right name (checked before torch.load sees it).
    other = tmp_path / "other" / VGG16_FILE
    other.parent.mkdir()
    other.write_bytes(b"PK\x03\x04 not vgg16")
    with pytest.raises(UserError, match=f"does not begin with {sha[:8]}"):
        get_extractor("vgg16", weights=other)
    # A missing file: one line naming the file expected, where to fetch it and how to pass it.
    missing = tmp_path / "nowhere" / VGG16_FILE
    with pytest.raises(UserError) as info:
        get_extractor("vgg16", weights=missing)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and f"VGG16 weights file {missing} not found" in msg
    assert VGG16_URL in msg and "--weights" in msg and "GANPIPE_VGG16_WEIGHTS" in msg
    # The default: $GANPIPE_VGG16_WEIGHTS (a directory gets the file name), else torch hub's folder.
    monkeypatch.setenv("GANPIPE_VGG16_WEIGHTS", str(vgg_file.parent))
    assert vgg16_path() == vgg_file
    monkeypatch.delenv("GANPIPE_VGG16_WEIGHTS")
    assert vgg16_path() == Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    # The mnist extractor's refusal of other data names vgg16 and how to give its file.
    with pytest.raises(UserError) as info:
        check_data(["mnist"], 3, 64, "DATA")
    assert "vgg16" in str(info.value) and VGG16_FILE in str(info.value) and "GANPIPE_VGG16_WEIGHTS" in str(info.value)


def test_tf_bilinear_resize_is_tf1s_resize_bilinear():
    x = torch.rand(2, 3, 28, 28, dtype=torch.float64) * 255
    for size in (224, 299, 17):
        torch.testing.assert_close(tf_bilinear_resize(x, size), tf_resize_by_grid(x, size), rtol=0, atol=1e-9)
    # Not torch's own bilinear (half-pixel centres), nor a no-op at the same size.
    assert not torch.allclose(tf_bilinear_resize(x, 224), F.interpolate(x, size=224, mode="bilinear"))
    assert torch.equal(tf_bilinear_resize(x, 28), x)


def test_vgg16_features_are_fc2_after_its_relu(vgg_file, vgg_state, vgg_ext):
    import torchvision

    assert (vgg_ext.dim, vgg_ext.size, vgg_ext.resize) == (4096, 224, "tf-bilinear224")
    assert vgg_ext.weights_sha256 == sha256_file(vgg_file) and len(vgg_ext.weights_sha256) == 64
    images = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    ours = vgg_ext(images)
    # By hand through torchvision's own modules, with the weights the file was written from.
    vgg = torchvision.models.vgg16(weights=None, init_weights=False)
    vgg.load_state_dict(vgg_state)
    vgg.eval()
    x = tf_resize_by_grid(torch.from_numpy(images).double().repeat(1, 3, 1, 1), 224).float()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x / 255 - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        flat = torch.flatten(vgg.avgpool(vgg.features(x)), 1)
        fc2 = vgg.classifier[3](torch.relu(vgg.classifier[0](flat)))
    assert vgg.classifier[3].out_features == 4096 and ours.shape == (2, 4096)
    assert (fc2 < 0).any() and (fc2 > 0).any()           # the ReLU matters here
    np.testing.assert_allclose(ours, torch.relu(fc2).numpy(), rtol=1e-3, atol=1e-4 * float(fc2.abs().max()))
    assert (ours[fc2.numpy() < 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# pr and dc on vgg16 by default, the sample sizes recorded

@pytest.mark.filterwarnings(*JIT_WARNINGS)
def test_pr_and_dc_default_to_vgg16_never_inception(vgg_file, tmp_path, monkeypatch):
    assert extractor_plan(["fid", "kid", "pr", "dc", "is"], None) == {
        "fid": ["inception"], "kid": ["inception"], "pr": ["vgg16"], "dc": ["vgg16"], "is": ["inception"]}
    assert extractor_plan(["fid", "pr"], ["inception"]) == {"fid": ["inception"], "pr": ["inception"]}
    run = make_run(tmp_path, tiny_data(tmp_path), {1000: mlp_generator()})
    weights = tmp_path / "weights"
    inception = inception_stub(weights / INCEPTION_FILE)
    monkeypatch.setitem(features.PUBLISHED_SHA256, "inception", (sha256_file(inception),))
    sha = publish_vgg(monkeypatch, vgg_file)
    args = ("eval", "--run-dir", str(run), "--num-gen", "6", "--batch-size", "16", "--weights", str(weights))

    # Inception is at hand, VGG16 is not: pr must say so, not fall back to Inception features.
    out = cli(*args, "--metrics", "pr", check=False)
    assert out.returncode == 2 and f"VGG16 weights file {weights / VGG16_FILE} not found" in out.stderr
    assert not (run / "metrics.jsonl").exists()

    # --extractor inception keeps pr on Inception features, recorded as such.
    cli(*args, "--metrics", "pr", "--extractor", "inception")
    by_inception = {r["name"]: r for r in records(run)}
    assert set(by_inception) == {"precision_inception", "recall_inception"}
    assert {r["extractor"] for r in by_inception.values()} == {"inception"}

    # With the file beside Inception's, pr and dc run on VGG16 fc2; both sample sizes are recorded.
    shutil.copy(vgg_file, weights / VGG16_FILE)
    cli(*args, "--metrics", "pr,dc", "--num-real", "6")
    mine = {r["name"]: r for r in records(run) if r["extractor"] == "vgg16"}
    assert set(mine) == {"precision_vgg16", "recall_vgg16", "density_vgg16", "coverage_vgg16"}
    for r in mine.values():
        assert (r["extractor_sha256"], r["resize"], r["feature_dim"]) == (sha, "tf-bilinear224", 4096)
        assert (r["num_gen"], r["num_real"], r["sample_gen"], r["sample_ref"]) == (6, 6, 6, 6)
    assert protocol_key(mine["precision_vgg16"]) != protocol_key(by_inception["precision_inception"])
    # The real sample's size keys its cached reference statistics.
    assert any(p.name.endswith("-real6.npz") for p in (tmp_path / "data" / "refstats").iterdir())

    # compare keeps other sample sizes apart: the same scores with 5 real images are another protocol.
    other = tmp_path / "other"
    (other / "snapshots").mkdir(parents=True)
    (other / "config.yaml").write_text((run / "config.yaml").read_text())
    moved = {**mine["precision_vgg16"], "sample_ref": 5, "num_real": 5, "sample_gen": 5}
    (other / "metrics.jsonl").write_text(json.dumps(moved) + "\n")
    with pytest.raises(UserError, match="sample_gen 6 vs 5, sample_ref 6 vs 5"):
        comparable_series([run, other], "precision_vgg16")


def test_num_real_sizes_the_real_sample_and_its_cache(tmp_path):
    from pipeline.cli import build_parser
    from pipeline.metrics.refstats import SAMPLE_MAX, cache_name, compute_refstats

    parse = build_parser(["eval"]).parse_args
    assert parse(["eval", "--run-dir", "R"]).num_real == SAMPLE_MAX
    assert parse(["eval", "--run-dir", "R", "--num-real", "all"]).num_real is None
    assert parse(["eval", "--run-dir", "R", "--num-real", "50000"]).num_real == 50_000
    data, ext = tiny_data(tmp_path, n=8), get_extractor("mnist")
    assert compute_refstats(data, "train", ext, sample_max=None).feats.shape == (8, ext.dim)
    small = compute_refstats(data, "train", ext, sample_max=5)
    assert small.sample_num == 5 and small.num == 8 and small.meta["sample_max"] == "5"
    names = {n: cache_name(data, "train", ext, n) for n in (SAMPLE_MAX, 5, None)}
    assert not names[SAMPLE_MAX].split("-")[-1].startswith("real")       # today's files keep their names
    assert names[5].endswith("-real5.npz") and names[None].endswith("-realall.npz")


# ---------------------------------------------------------------------------------------------
# The Inception Score's resize

class _InceptionWithLogits(nn.Module):
    """The real file's interface: `.layers` (pool features of (x - 128) / 128) and `.output`, its
    1008-class layer."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(192, 2048), nn.ReLU())
        self.output = nn.Linear(2048, 1008)

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.mark.filterwarnings(*JIT_WARNINGS)
def test_is_resize_is_a_choice_recorded_in_the_protocol(tmp_path, monkeypatch):
    weights = tmp_path / "w" / INCEPTION_FILE
    weights.parent.mkdir()
    torch.manual_seed(0)
    net = _InceptionWithLogits()
    with torch.no_grad():
        net.output.weight.mul_(30)
    torch.jit.script(net).save(str(weights))
    monkeypatch.setitem(features.PUBLISHED_SHA256, "inception", (sha256_file(weights),))

    ext = get_extractor("inception", weights=weights)
    images = np.random.default_rng(1).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    tf = ext.prepare(images, "tf-bilinear")
    x = torch.from_numpy(images).double().repeat(1, 3, 1, 1)
    torch.testing.assert_close(tf, tf_resize_by_grid(x, 299).float(), rtol=0, atol=1e-3)
    assert tf.shape == ext.prepare(images).shape and (tf - ext.prepare(images)).abs().max() > 1
    assert ext.resize_tag("tf-bilinear") == "tf-bilinear299" and ext.resize == "clean299"

    run = make_run(tmp_path, tiny_data(tmp_path), {1000: mlp_generator()})
    args = ("eval", "--run-dir", str(run), "--metrics", "is", "--num-gen", "20", "--weights", str(weights))
    cli(*args)                                           # no --extractor: the IS runs on Inception
    cli(*args, "--is-resize", "tf-bilinear")
    clean, tf_bilinear = records(run)
    assert (clean["name"], tf_bilinear["name"]) == ("is_inception", "is_inception")
    assert (clean["resize"], tf_bilinear["resize"]) == ("clean299", "tf-bilinear299")
    assert clean["value"] != pytest.approx(tf_bilinear["value"], rel=1e-6)
    assert protocol_key(clean) != protocol_key(tf_bilinear)
    # The logits of the tf-bilinear IS are those of the TF-resized images: its first split by hand.
    from pipeline import generate
    from pipeline.metrics.scores import inception_score
    from pipeline.training.snapshot import load_snapshot

    G, _ = load_snapshot(next((run / "snapshots").glob("*.json")))
    imgs = generate.to_uint8(generate.images(G, seed=0, start=0, count=20))
    with torch.no_grad():
        probs = torch.softmax(ext.head(ext.net(ext.prepare(imgs, "tf-bilinear"))).double(), 1).numpy()
    assert tf_bilinear["value"] == pytest.approx(inception_score(probs)[0], rel=1e-5)
