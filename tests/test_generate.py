"""`pipeline.generate`: image i of a seed is the same bits whatever the batch, the range asked for,
the history of the process and torch's global RNG; `ganpipe sample` writes what `ganpipe eval` scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli
from pipeline.config import ModelConfig
from pipeline.generate import MICRO_BATCH, images, latents, save_grid
from pipeline.metrics.evaluator import generated_features
from pipeline.networks import build_networks
from pipeline.training.snapshot import SnapshotInfo, load_snapshot, save_snapshot

FAMILIES = ["mlp", "dcgan", "resnet", "stylegan2"]
CLASSES = 4


def tiny(name: str, classes: int = 0, channels: int = 3, resolution: int = 28):
    """A small G in eval mode (and its config); stylegan2's noise strengths are made nonzero,
    else its noise inputs would not act (they start at zero) and the noise tests would be empty."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, g_width=1 / 32, d_width=1 / 32, w_dim=16, mapping_layers=2,
                      conditional=bool(classes))
    G, _ = build_networks(cfg, resolution=resolution, channels=channels, num_classes=classes or CLASSES)
    if name == "stylegan2":
        with torch.no_grad():
            for layer in G.synthesis.convs:
                layer.noise_strength.fill_(0.5)
    return G.eval(), cfg


def read_png(path: Path) -> np.ndarray:
    a = np.array(Image.open(path))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


@pytest.mark.parametrize("classes", [0, CLASSES], ids=["uncond", "cond"])
@pytest.mark.parametrize("name", FAMILIES)
def test_image_i_is_the_same_bits_whatever_the_batch_and_the_history(name, classes):
    G, _ = tiny(name, classes)
    ref = images(G, seed=11, start=0, count=40, batch=40)
    assert ref.shape == (40, 3, 28, 28) and ref.dtype == torch.float32 and ref.device.type == "cpu"
    assert ref.abs().max() <= 1 and not torch.equal(ref[0], ref[1])     # distinct images, in range
    for batch in (1, 3, 7):
        assert torch.equal(images(G, seed=11, start=0, count=40, batch=batch), ref), f"batch {batch}"
    # Other work first: another seed, other indices, a plain forward that moves the global RNG.
    other = images(G, seed=12, start=3, count=9, batch=5)
    assert not torch.equal(other[:4], ref[3:7])
    torch.manual_seed(123)
    with torch.no_grad():
        G(torch.randn(5, G.z_dim), torch.arange(5) % CLASSES if classes else None)
    for start, count, batch in ((13, 1, 1), (5, 17, 3), (33, 7, 7), (0, 40, MICRO_BATCH), (17, 0, 3)):
        got = images(G, seed=11, start=start, count=count, batch=batch)
        assert torch.equal(got, ref[start:start + count]), (start, count, batch)
    # A G left in training mode is run in eval mode (BatchNorm running statistics) and left as it was.
    G.train()
    assert torch.equal(images(G, seed=11, start=2, count=5, batch=3), ref[2:7]) and G.training
    G.eval()
    if classes:
        fixed = images(G, seed=11, start=0, count=8, label=2, batch=3)
        assert torch.equal(fixed, images(G, seed=11, start=0, count=8, label=2, batch=8))
        assert not torch.equal(fixed[0], ref[0])          # image 0 is class 0 in the balanced order


@pytest.mark.parametrize("name", FAMILIES)
def test_ganpipe_sample_writes_the_images_eval_scores(tmp_path, name):
    channels = 1 if name in ("mlp", "resnet") else 3
    G, cfg = tiny(name, CLASSES, channels)
    snap = save_snapshot(G, tmp_path / "snapshots", cur_nimg=1000, info=SnapshotInfo(cfg, 28, channels, CLASSES))
    out = tmp_path / "pngs"
    cli("sample", "--snapshot", str(snap), "--num", "11", "--start", "5", "--seed", "3", "--batch", "3",
        "--out", str(out), "--device", "cpu")
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5, 16)]
    sampled = np.stack([read_png(out / f"{i:06d}.png") for i in range(5, 16)])

    class Recorder:
        """An extractor that keeps the uint8 images the evaluator hands it."""
        device = torch.device("cpu")

        def __init__(self):
            self.seen: list[np.ndarray] = []

        def __call__(self, u8: np.ndarray) -> np.ndarray:
            self.seen.append(u8.copy())
            return np.zeros((len(u8), 2), np.float32)

    recorder = Recorder()
    G2, _ = load_snapshot(snap)
    assert generated_features(G2, recorder, num=20, batch_size=7, seed=3).shape == (20, 2)
    scored = np.concatenate(recorder.seen)
    assert scored.shape == (20, channels, 28, 28) and scored.dtype == np.uint8
    assert np.array_equal(sampled, scored[5:16])
    assert not np.array_equal(scored[5], scored[6])


def test_sample_grid_is_the_one_grid_writer(tmp_path):
    G, cfg = tiny("stylegan2", CLASSES)
    snap = save_snapshot(G, tmp_path / "snapshots", cur_nimg=1000, info=SnapshotInfo(cfg, 28, 3, CLASSES))
    cli("sample", "--snapshot", str(snap), "--num", "9", "--seed", "4", "--out", str(tmp_path / "grid.png"))
    G2, _ = load_snapshot(snap)
    grid = save_grid(images(G2, seed=4, count=9), tmp_path / "mine.png")
    theirs, mine = read_png(tmp_path / "grid.png"), read_png(tmp_path / "mine.png")
    assert theirs.shape == (3, 2 + 3 * 30, 2 + 3 * 30) and np.array_equal(theirs, mine)
    assert torch.equal((grid * 255).round().to(torch.uint8), torch.from_numpy(mine))
    assert save_grid(torch.zeros(4, 2), tmp_path / "flat.png") is None and not (tmp_path / "flat.png").exists()
    # An image suffix means a grid in that format, never a directory of that name.
    from PIL import Image

    for name, fmt in (("grid.jpg", "JPEG"), ("grid.JPEG", "JPEG"), ("grid.webp", "WEBP")):
        cli("sample", "--snapshot", str(snap), "--num", "9", "--seed", "4", "--out", str(tmp_path / name))
        assert (tmp_path / name).is_file()
        with Image.open(tmp_path / name) as img:
            assert img.format == fmt and img.size == (2 + 3 * 30, 2 + 3 * 30)
    with Image.open(tmp_path / "grid.webp") as img:                # lossless: the PNG grid exactly
        assert np.array_equal(np.asarray(img.convert("RGB")).transpose(2, 0, 1), theirs)


def test_sample_explains_bad_input(tmp_path):
    G, cfg = tiny("dcgan")
    snap = save_snapshot(G, tmp_path / "s", cur_nimg=1, info=SnapshotInfo(cfg, 28, 3, 0))
    out = cli("sample", "--snapshot", str(snap), "--label", "1", "--out", str(tmp_path / "g.png"), check=False)
    assert out.returncode == 2 and "--label 1 given but" in out.stderr and "unconditional" in out.stderr
    out = cli("sample", "--snapshot", str(snap), "--seed", "-1", "--out", str(tmp_path / "g.png"), check=False)
    assert out.returncode == 2 and "--seed -1: must be at least 0" in out.stderr


def test_stylegan2_images_do_not_depend_on_the_global_rng():
    G, _ = tiny("stylegan2")
    torch.manual_seed(0)
    a = images(G, seed=1, count=8)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    b = images(G, seed=1, count=8)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)            # and it is left untouched
    # Not vacuous: G's own noise (global RNG) changes the image, so images() must pass its own.
    z = latents(1, 0, 8, G.z_dim)
    with torch.no_grad():
        torch.manual_seed(0)
        r0 = G(z)
        torch.manual_seed(1)
        r1 = G(z)
    assert not torch.equal(r0, r1) and not torch.equal(r0, a)


def test_explicit_noise_enters_as_the_random_draw_does():
    G, _ = tiny("stylegan2", resolution=28)
    assert G.noise_shapes() == [(1, 7, 7), (1, 14, 14), (1, 14, 14), (1, 28, 28), (1, 28, 28)]
    z = torch.randn(3, G.z_dim)
    with torch.no_grad():
        torch.manual_seed(7)
        want = G(z)                                         # noise_mode="random": global RNG, layer order
        torch.manual_seed(7)
        noise = [torch.randn(3, *shape) for shape in G.noise_shapes()]
        assert torch.equal(G(z, None, noise=noise), want)
        with pytest.raises(ValueError, match="noise_shapes"):
            G(z, noise=noise[:-1])
        with pytest.raises(ValueError, match="one or the other"):
            G(z, noise=noise, noise_mode="const")
    for name in ("mlp", "dcgan", "resnet"):                 # the same call everywhere; no noise inputs
        H, _ = tiny(name)
        with torch.no_grad():
            assert H.noise_shapes() == [] and torch.equal(H(z[:, :H.z_dim], None, noise=[]), H(z[:, :H.z_dim]))


def test_image_lists_name_images_as_sample_numbers_them():
    from pipeline.errors import UserError
    from pipeline.generate import ImageRef, parse_image_list

    assert parse_image_list("3, 7") == [ImageRef(3, 0), ImageRef(7, 0)]
    assert parse_image_list("0-2,9:4,5:1-3", label=2) == [
        ImageRef(0, 0, 2), ImageRef(1, 0, 2), ImageRef(2, 0, 2), ImageRef(9, 4, 2),
        ImageRef(5, 1, 2), ImageRef(5, 2, 2), ImageRef(5, 3, 2)]
    for bad in ("", "a", "3-1", "1-2:0-3", "-1", "2:", "0-200000"):
        with pytest.raises(UserError, match="--rows"):
            parse_image_list(bad, "--rows")


@pytest.mark.parametrize("name", ["dcgan", "stylegan2"])
def test_images_of_listed_refs_are_the_images_of_their_ranges(name):
    from pipeline.generate import ImageRef, images_of, inputs_of

    G, _ = tiny(name, CLASSES)
    refs = [ImageRef(5, 17), ImageRef(2, 0), ImageRef(5, 3), ImageRef(5, 16, 1), ImageRef(2, 0, 3), ImageRef(5, 40)]
    got = images_of(G, refs, batch=7)
    for ref, x in zip(refs, got):
        assert torch.equal(x, images(G, seed=ref.seed, start=ref.index, count=1, label=ref.label)[0]), ref
    assert images_of(G, []).shape == (0, 3, 28, 28)
    # The inputs are what images() draws: the same z (and noise maps) as draw(), labels as labels_for().
    z, noise, labels = inputs_of(G, refs)
    assert torch.equal(z[0], latents(5, 17, 1, G.z_dim)[0]) and torch.equal(z[1], latents(2, 0, 1, G.z_dim)[0])
    assert labels.tolist() == [17 % CLASSES, 0, 3 % CLASSES, 1, 3, 40 % CLASSES]
    assert [tuple(n.shape[1:]) for n in noise] == G.noise_shapes() and all(len(n) == len(refs) for n in noise)
    with torch.no_grad():       # one forward of the drawn inputs makes the images (to float rounding)
        assert torch.allclose(G(z, labels, noise=noise), got, atol=1e-4)


def test_save_grid_takes_a_row_length(tmp_path):
    x = images(tiny("dcgan")[0], seed=0, count=6)
    save_grid(x, tmp_path / "wide.png", nrow=6)
    save_grid(x, tmp_path / "square.png")
    assert read_png(tmp_path / "wide.png").shape == (3, 2 + 30, 2 + 6 * 30)
    assert read_png(tmp_path / "square.png").shape == (3, 2 + 3 * 30, 2 + 2 * 30)    # round(sqrt(6)) = 2 a row
