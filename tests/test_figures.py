"""`ganpipe figure style-mix|classes` and `ganpipe preview`: each figure is decoded back and its cells
compared with the images `ganpipe sample` writes, or with the samples the shard reader returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _cli_in_process
from pipeline.data.loader import ShardSet
from pipeline.data.shards import read_samples
from pipeline.figures import STYLES, style_layers
from pipeline.generate import images, inputs_of, ImageRef, to_uint8
from pipeline.training.snapshot import SnapshotInfo, load_snapshot, save_snapshot
from test_generate import CLASSES, read_png, tiny

RES = 28
NAMES = ["cat", "dog", "t-shirt", "10"]       # a name with a dash, and a number that is not its index


def ganpipe(*args: str, check: bool = True):
    return _cli_in_process(args, check)


def cell(figure: np.ndarray, r: int, c: int, side: int = RES, left: int = 0) -> np.ndarray:
    y, x = 2 + r * (side + 2), left + 2 + c * (side + 2)
    return figure[:, y:y + side, x:x + side]


@pytest.fixture
def named_data(tmp_path) -> Path:
    """40 random 8x8 RGB images of 4 named classes, prepared."""
    from pipeline.data.prepare import prepare

    rng = np.random.default_rng(0)
    npz = tmp_path / "named.npz"
    np.savez(npz, images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), labels=np.arange(40) % 4,
             classes=np.array(NAMES))
    prepare(f"npz:{npz}", tmp_path / "named", shard_size=10, workers=1, progress=False)
    return tmp_path / "named"


def snapshot(tmp_path: Path, name: str, classes: int = 0, channels: int = 3, data: Path | None = None) -> Path:
    G, cfg = tiny(name, classes, channels, RES)
    extra = {"data_path": str(data)} if data else {}
    return save_snapshot(G, tmp_path / f"{name}-{classes}", cur_nimg=1000,
                         info=SnapshotInfo(cfg, RES, channels, classes, extra))


def test_style_mix_figure(tmp_path):
    snap = snapshot(tmp_path, "stylegan2", CLASSES)
    out = tmp_path / "mix.png"
    ganpipe("figure", "style-mix", "--snapshot", str(snap), "--rows", "0-2", "--cols", "3,4:1,0",
            "--styles", "coarse", "--out", str(out), "--device", "cpu")
    fig = read_png(out)
    assert fig.shape == (3, 2 + 4 * (RES + 2), 2 + 4 * (RES + 2))
    G, _ = load_snapshot(snap)
    rows, cols = [ImageRef(s) for s in (0, 1, 2)], [ImageRef(3), ImageRef(4, 1), ImageRef(0)]
    exact = [to_uint8(images(G, seed=r.seed, start=r.index, count=1))[0] for r in rows + cols]
    assert not cell(fig, 0, 0).any()                                        # the corner is empty
    for c in range(3):                                                      # the top row: the column images
        assert np.array_equal(cell(fig, 0, c + 1), exact[3 + c]), c
    for r in range(3):                                                      # the left column: the row images
        assert np.array_equal(cell(fig, r + 1, 0), exact[r]), r
    # Cell (r, c): row r's ws with 0-3 from column c, row r's noise; column 0 (seed 0) mixed into row 0
    # (seed 0) is row 0's own image again.
    assert np.abs(cell(fig, 1, 3).astype(int) - exact[0]).max() <= 1
    z, noise, labels = inputs_of(G, rows + cols)
    with torch.no_grad():
        ws = G.map(z, labels)
        mixed = ws[1:2].clone()
        mixed[:, :4] = ws[4:5, :4]                                          # row 1, column 1 (seed 4 image 1)
        want = to_uint8(G.synthesis(mixed, noise=[n[1:2] for n in noise]).clamp(-1, 1))[0]
    assert np.abs(cell(fig, 2, 2).astype(int) - want).max() <= 1
    assert np.abs(cell(fig, 2, 2).astype(int) - exact[1]).mean() > 5        # the mix changed the row image
    # Other styles, other cells; the same rows and columns.
    ganpipe("figure", "style-mix", "--snapshot", str(snap), "--rows", "0-2", "--cols", "3,4:1,0",
            "--styles", "4-5", "--out", str(tmp_path / "fine.png"), "--device", "cpu")
    fine = read_png(tmp_path / "fine.png")
    assert np.array_equal(fine[:, :RES + 4], fig[:, :RES + 4]) and not np.array_equal(fine, fig)


def test_style_groups_are_the_papers_w_ranges():
    assert STYLES == {"coarse": (0, 4), "middle": (4, 8), "fine": (8, None)}
    assert style_layers("coarse", 18) == [0, 1, 2, 3] and style_layers("fine", 18) == list(range(8, 18))
    assert style_layers("middle", 6) == [4, 5] and style_layers("0-1,5", 6) == [0, 1, 5]
    with pytest.raises(Exception, match="6 ws .*middle 4-5, no fine"):
        style_layers("fine", 6)
    with pytest.raises(Exception, match="w indices such as"):
        style_layers("coarsest", 6)


def test_class_grid_rows_are_sample_label_images_with_the_class_names(tmp_path, named_data):
    snap = snapshot(tmp_path, "dcgan", CLASSES, data=named_data)
    out = tmp_path / "classes.png"
    ganpipe("figure", "classes", "--snapshot", str(snap), "--num", "5", "--seed", "2", "--start", "3",
            "--out", str(out), "--device", "cpu")
    fig = read_png(out)
    grid_w = 2 + 5 * (RES + 2)
    assert fig.shape[1] == 2 + CLASSES * (RES + 2) and fig.shape[2] > grid_w
    left = fig.shape[2] - grid_w                            # the names' column
    for k, name in enumerate(NAMES):
        by_name = tmp_path / f"{k}"
        ganpipe("sample", "--snapshot", str(snap), "--label", name, "--seed", "2", "--start", "3", "--num", "5",
                "--out", str(by_name))
        for i in range(5):
            assert np.array_equal(cell(fig, k, i, left=left), read_png(by_name / f"{3 + i:06d}.png")), (name, i)
        band = fig[:, 2 + k * (RES + 2):2 + k * (RES + 2) + RES, :left]
        assert band.max() > 200                             # a name is written beside each row
    # A chosen subset, in the order given; names, indices and ranges.
    ganpipe("figure", "classes", "--snapshot", str(snap), "--num", "2", "--classes", "10,0-1",
            "--out", str(tmp_path / "some.png"), "--device", "cpu")
    some = read_png(tmp_path / "some.png")
    assert some.shape[1] == 2 + 3 * (RES + 2)
    left = some.shape[2] - (2 + 2 * (RES + 2))
    G, _ = load_snapshot(snap)
    for row, k in enumerate((3, 0, 1)):
        assert np.array_equal(cell(some, row, 1, left=left), to_uint8(images(G, seed=0, start=1, count=1, label=k))[0])


def test_sample_label_by_name(tmp_path, named_data):
    snap = snapshot(tmp_path, "dcgan", CLASSES, data=named_data)
    for value, index in (("dog", 1), ("t-shirt", 2), ("10", 3), ("2", 2)):
        # A name wins over an index: "10" is the class named 10; "2" (no class of that name) is index 2.
        out = ganpipe("sample", "--snapshot", str(snap), "--label", value, "--num", "4",
                      "--out", str(tmp_path / f"{value}.png"))
        ganpipe("sample", "--snapshot", str(snap), "--label", str(index), "--num", "4",
                "--out", str(tmp_path / f"i{index}.png"))
        assert f"class {index} {NAMES[index]!r}" in out.stdout
        assert np.array_equal(read_png(tmp_path / f"{value}.png"), read_png(tmp_path / f"i{index}.png")), value
    out = ganpipe("sample", "--snapshot", str(snap), "--label", "dgo", "--out", str(tmp_path / "x.png"), check=False)
    assert out.returncode == 2 and "no class of that name; did you mean 'dog'?" in out.stderr
    # Without the data directory the names cannot be known: say why, and that an index works.
    nameless = snapshot(tmp_path / "elsewhere", "dcgan", CLASSES, data=tmp_path / "gone")
    out = ganpipe("sample", "--snapshot", str(nameless), "--label", "dog", "--out", str(tmp_path / "x.png"),
                  check=False)
    assert out.returncode == 2 and "class names are unknown" in out.stderr and "has no manifest.json" in out.stderr
    assert "give the class index, 0..3" in out.stderr
    assert ganpipe("sample", "--snapshot", str(nameless), "--label", "1", "--out", str(tmp_path / "y.png")).returncode == 0


def test_preview_shows_the_split_as_the_reader_returns_it(tmp_path, named_data):
    out = tmp_path / "reals.png"
    printed = ganpipe("preview", str(named_data), "--num", "12", "--out", str(out)).stdout
    assert "the first 12 images of split 'train'" in printed
    shards = ShardSet.resolve(str(named_data))
    reals = [(image, label) for i in range(len(shards.urls))
             for _, _, image, label, _ in read_samples(shards.open(i), f"shard {i}", channels=3, resolution=8,
                                                       num_classes=4, require_label=True)]
    fig = read_png(out)
    assert fig.shape == (3, 2 + 4 * 10, 2 + 3 * 10)             # round(sqrt(12)) = 3 images a row, 4 rows
    for i in range(12):
        assert np.array_equal(cell(fig, i // 3, i % 3, side=8), reals[i][0]), i
    # One row per class, named, in the order the reader meets them.
    ganpipe("preview", str(named_data), "--per-class", "3", "--out", str(tmp_path / "by-class.png"))
    fig = read_png(tmp_path / "by-class.png")
    left = fig.shape[2] - (2 + 3 * 10)
    assert fig.shape[1] == 2 + 4 * 10 and left > 0
    for k in range(4):
        mine = [image for image, label in reals if label == k][:3]
        for i in range(3):
            assert np.array_equal(cell(fig, k, i, side=8, left=left), mine[i]), (k, i)


def test_figures_explain_bad_input(tmp_path, small_dir):
    dcgan = snapshot(tmp_path, "dcgan", CLASSES)
    unconditional = snapshot(tmp_path, "stylegan2")
    cases = [
        (("figure", "style-mix", "--snapshot", str(dcgan)), "style mixing needs a generator with a w per layer"),
        (("figure", "style-mix", "--snapshot", str(unconditional), "--styles", "fine"), "no fine"),
        (("figure", "style-mix", "--snapshot", str(unconditional), "--rows", "x"), "is not SEED"),
        (("figure", "classes", "--snapshot", str(unconditional)), "unconditional"),
        (("figure", "classes", "--snapshot", str(dcgan), "--classes", "0,7"), "--classes 7 outside 0..3"),
        (("preview", str(tmp_path / "nothing")), "not a prepared data directory"),
        (("preview", str(small_dir), "--split", "test"), "--split test: "),
    ]
    for args, message in cases:
        out = ganpipe(*args, "--out", str(tmp_path / "f.png"), check=False)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    assert not (tmp_path / "f.png").exists()
    # Rows are named by index, and said so, when the names cannot be found.
    out = ganpipe("figure", "classes", "--snapshot", str(dcgan), "--num", "2", "--out", str(tmp_path / "g.png"))
    assert "rows named by class index: the snapshot's record names no data directory" in out.stdout
