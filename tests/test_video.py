"""`ganpipe video`: the files are decoded back; frame counts, sizes, and keyframes that are the very
images `ganpipe sample` writes (exactly in a GIF of a grey G, within H.264's error in an MP4)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import _cli_in_process, cli
from pipeline.generate import ImageRef, images, to_uint8
from pipeline.training.snapshot import SnapshotInfo, load_snapshot, save_snapshot
from pipeline.video import Walk, frames, slerp
from test_generate import CLASSES, read_png, tiny

RES = 28


def snapshot(tmp_path: Path, name: str, classes: int = 0, channels: int = 3) -> Path:
    G, cfg = tiny(name, classes, channels, RES)
    return save_snapshot(G, tmp_path / f"{name}-{channels}-{classes}", cur_nimg=1000,
                         info=SnapshotInfo(cfg, RES, channels, classes))


def ganpipe(*args: str, check: bool = True):
    """The real command line, in this process (as conftest's `cli` runs sample and eval)."""
    return _cli_in_process(args, check)


def read_gif(path: Path) -> list[np.ndarray]:
    with Image.open(path) as im:
        assert im.format == "GIF"
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
    return out


def read_mp4(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        return [f.to_ndarray(format="rgb24").transpose(2, 0, 1) for f in container.decode(video=0)]


def cell(frame: np.ndarray, i: int, cols: int, side: int = RES) -> np.ndarray:
    """Cell i of a grid frame (row-major, 2-pixel gaps), as `generate.grid_array` lays it out."""
    r, c = divmod(i, cols)
    y, x = 2 + r * (side + 2), 2 + c * (side + 2)
    return frame[:, y:y + side, x:x + side]


def test_gif_keyframes_are_the_sampled_images_exactly(tmp_path):
    # A grey stylegan2 (noise inputs, walks in w): at most 256 colours a frame, so the GIF is exact.
    snap = snapshot(tmp_path, "stylegan2", channels=1)
    gif = tmp_path / "walk.gif"
    out = ganpipe("video", "--snapshot", str(snap), "--seeds", "4:0-7", "--grid", "2x1", "--frames-per-key", "3",
                  "--out", str(gif), "--device", "cpu")
    assert "wrote 12 frames" in out.stdout and "space w" in out.stdout
    ganpipe("sample", "--snapshot", str(snap), "--seed", "4", "--num", "8", "--out", str(tmp_path / "pngs"))
    sampled = [read_png(tmp_path / "pngs" / f"{i:06d}.png") for i in range(8)]
    got = read_gif(gif)
    assert len(got) == 4 * 3 and got[0].shape == (3, 2 + RES + 2, 2 + 2 * (RES + 2))
    for k in range(4):                                  # keyframe k of cell c is listed image k * 2 + c
        for c in range(2):
            assert np.array_equal(cell(got[3 * k], c, 2), np.repeat(sampled[2 * k + c], 3, 0)), (k, c)
    # The frames between are neither keyframe, and the loop walks back from the last to the first.
    for j in (1, 2, 10, 11):
        assert not any(np.array_equal(got[j], got[3 * k]) for k in range(4)), j
    start = cell(got[0], 0, 2).astype(int)
    away = [np.abs(cell(got[j], 0, 2) - start).mean() for j in (1, 2, 3)]
    assert 0 < away[0] < away[1] < away[2]                          # a walk away from keyframe 0


def test_mp4_decodes_to_the_frames_with_keyframes_within_codec_error(tmp_path):
    # Grey, so H.264's 4:2:0 chroma (a quarter of the colour resolution, which a tiny untrained G's
    # pixel noise does not survive) loses nothing; crf 0 keeps luma lossless: only RGB <-> YUV rounding.
    snap = snapshot(tmp_path, "stylegan2", CLASSES, channels=1)
    G, _ = load_snapshot(snap)
    keys = [to_uint8(images(G, seed=s, count=1, psi=0.7))[0].astype(int) for s in range(6)]  # sample --seed s --psi 0.7
    for crf, tolerance in ((0, 1), (18, 8)):
        mp4 = tmp_path / f"walk-{crf}.mp4"
        ganpipe("video", "--snapshot", str(snap), "--seeds", "0-5", "--grid", "3x1", "--frames-per-key", "4",
                "--no-loop", "--psi", "0.7", "--crf", str(crf), "--out", str(mp4), "--device", "cpu")
        got = read_mp4(mp4)
        # No loop: (2 - 1) * 4 + 1 frames; the 2 + 3 * 30 = 92 by 32 grid has even sides as it is.
        assert len(got) == 5 and got[0].shape == (3, 2 + RES + 2, 2 + 3 * (RES + 2))
        for k, frame in ((0, got[0]), (1, got[-1])):
            for c in range(3):
                diff = np.abs(cell(frame, c, 3).astype(int) - keys[3 * k + c])
                other = np.abs(cell(frame, c, 3).astype(int) - keys[(3 * k + c + 1) % 6]).mean()
                assert (diff.max() if crf == 0 else diff.mean()) <= tolerance and other > 3 * diff.mean(), \
                    (crf, k, c, diff.mean(), diff.max(), other)


def test_mp4_of_colour_frames_with_odd_sides(tmp_path):
    from pipeline.video import write_mp4

    y, x = np.mgrid[0:45, 0:31]
    frames_in = [np.stack([x * 8, y * 5, np.full_like(x, 40 * i)]).astype(np.uint8) for i in range(6)]
    assert write_mp4(iter(frames_in), tmp_path / "odd.mp4", fps=12.5) == 6
    got = read_mp4(tmp_path / "odd.mp4")
    assert len(got) == 6 and got[0].shape == (3, 46, 32)        # the last row and column repeated
    for want, frame in zip(frames_in, got):
        assert np.abs(frame[:, :45, :31].astype(int) - want).mean() < 3.5
        assert np.abs(frame[:, 45].astype(int) - frame[:, 44]).mean() < 4
        assert np.abs(frame[:, :, 31].astype(int) - frame[:, :, 30]).mean() < 4
    import av

    with av.open(str(tmp_path / "odd.mp4")) as container:
        assert container.streams.video[0].average_rate == 12.5


def test_class_sweep_and_loop_frame_counts(tmp_path):
    # dcgan walks in z; a sweep holds one image per cell and walks through the classes given.
    snap = snapshot(tmp_path, "dcgan", CLASSES, channels=1)
    gif = tmp_path / "sweep.gif"
    ganpipe("video", "--snapshot", str(snap), "--seeds", "7,9:3", "--grid", "1x2", "--classes", "all",
            "--frames-per-key", "2", "--out", str(gif), "--device", "cpu")
    got = read_gif(gif)
    assert len(got) == CLASSES * 2 and got[0].shape == (3, 2 + 2 * (RES + 2), 2 + RES + 2)
    G, _ = load_snapshot(snap)
    for k in range(CLASSES):
        for c, (seed, index) in enumerate(((7, 0), (9, 3))):     # `sample --seed 7 --label k`, `--seed 9 --start 3`
            want = to_uint8(images(G, seed=seed, start=index, count=1, label=k))[0]
            assert np.array_equal(cell(got[2 * k], c, 1), np.repeat(want, 3, 0)), (k, c)
    # Between two classes of a z-walking G the frame blends the two classes' images.
    a, b = cell(got[0], 0, 1).astype(int), cell(got[2], 0, 1).astype(int)
    mid = cell(got[1], 0, 1).astype(int)
    assert np.abs(mid - (a + b) / 2).max() <= 1.5


def test_frames_match_the_walk_and_its_interpolation(tmp_path):
    G, _ = tiny("stylegan2", CLASSES, 3, RES)
    keys = [[ImageRef(1), ImageRef(2, 5), ImageRef(3, 0, 2)]]
    walk = Walk(keys, cols=1, frames_per_key=4, loop=True, space="w")
    got = list(frames(G, walk, "cpu", batch=5))
    assert len(got) == walk.num_frames == 12 and walk.keyframe_numbers() == [0, 4, 8]
    for n, ref in zip(walk.keyframe_numbers(), keys[0]):
        want = to_uint8(images(G, seed=ref.seed, start=ref.index, count=1, label=ref.label))[0]
        assert np.array_equal(got[n], want)                 # one cell: the image, no border (as sample's grid)
    # The batch of the interpolated images changes nothing that matters (rounding at most).
    again = list(frames(G, walk, "cpu", batch=64))
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(got, again)) <= 1
    # z and w walks share the keyframes and differ between them.
    zwalk = list(frames(G, Walk(keys, 1, 4, True, "z"), "cpu"))
    assert all(np.array_equal(zwalk[n], got[n]) for n in walk.keyframe_numbers())
    assert not np.array_equal(zwalk[2], got[2])


def test_slerp_keeps_the_ends_and_the_norm():
    torch.manual_seed(0)
    a, b = torch.randn(3, 512), torch.randn(3, 512)
    assert torch.equal(slerp(a, b, torch.zeros(3)), a)
    assert torch.allclose(slerp(a, b, torch.ones(3)), b, atol=1e-5)
    mid = slerp(a, b, torch.full((3,), 0.5))
    # Two independent Gaussian latents are near-orthogonal: slerp keeps their norm, lerp loses ~30%.
    assert torch.allclose(mid.norm(dim=1), (a.norm(dim=1) + b.norm(dim=1)) / 2, rtol=0.05)
    assert (((a + b) / 2).norm(dim=1) < 0.8 * a.norm(dim=1)).all()
    assert torch.allclose(slerp(a, a.clone(), torch.full((3,), 0.3)), a)        # zero angle: no NaN
    maps = torch.randn(2, 1, 7, 7), torch.randn(2, 1, 7, 7)                     # noise maps: any shape
    assert slerp(*maps, torch.tensor([0.0, 1.0])).shape == (2, 1, 7, 7)


def test_video_explains_bad_input(tmp_path, monkeypatch):
    snap = snapshot(tmp_path, "dcgan", CLASSES, channels=1)
    uncond = snapshot(tmp_path, "mlp", channels=1)
    for args, message in (
            (["--seeds", "0-4", "--grid", "2x1", "--out", "v.gif"], "--seeds lists 5 images for 2 cells"),
            (["--seeds", "0", "--out", "v.gif"], "at least 2 (2 keyframes per cell)"),
            (["--seeds", "0-3", "--out", "v.avi"], "a video is one of .mp4, .gif"),
            (["--seeds", "0-3", "--space", "w", "--out", "v.gif"], "--space w: the dcgan generator has no w"),
            (["--seeds", "0-3", "--grid", "2by2", "--out", "v.gif"], "--grid '2by2': COLSxROWS"),
            (["--seeds", "1-a", "--out", "v.gif"], "is not SEED, SEED-SEED"),
            (["--seeds", "0,1", "--grid", "2x1", "--classes", "0", "--out", "v.gif"], "at least 2 classes"),
            (["--seeds", "0-2", "--grid", "2x1", "--classes", "all", "--out", "v.gif"], "a sweep shows one image per cell"),
            (["--seeds", "0-3", "--label", "9", "--out", "v.gif"], "--label 9 outside 0..3"),
            (["--seeds", "0-3", "--crf", "60", "--out", "v.mp4"], "--crf 60"),
    ):
        out = ganpipe("video", "--snapshot", str(snap), *args[:-1], str(tmp_path / args[-1]), check=False)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    out = ganpipe("video", "--snapshot", str(uncond), "--seeds", "0,1", "--classes", "all",
                  "--out", str(tmp_path / "v.gif"), check=False)
    assert out.returncode == 2 and "unconditional" in out.stderr
    # Without PyAV an MP4 is refused in one line naming the extra, before anything is generated.
    monkeypatch.setitem(sys.modules, "av", None)
    out = ganpipe("video", "--snapshot", str(snap), "--out", str(tmp_path / "v.mp4"), check=False)
    assert out.returncode == 2 and out.stderr.strip().endswith("pip install 'ganpipe[video]'")
    assert len(out.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.gif")) and not list(tmp_path.glob("*.mp4"))


def test_the_console_command_writes_a_video(tmp_path):
    snap = snapshot(tmp_path, "dcgan", channels=3)
    cli("video", "--snapshot", str(snap), "--seeds", "0,1", "--frames-per-key", "2", "--out", str(tmp_path / "v.mp4"))
    assert len(read_mp4(tmp_path / "v.mp4")) == 4
