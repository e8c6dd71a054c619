"""The new user's trial end to end (issue 25): a folder of JPEGs in three class folders with damaged
files among them, prepared and verified, trained in two processes with loader workers, stopped with
Ctrl-C to the whole process group, resumed, watched, scored, sampled by class name, a latent walk,
exported; every step through the real CLI."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
from PIL import Image

from conftest import cli
from pipeline.rundir import RunDir
from test_train_faults import finish, start, wait_for_ticks

CLASSES = ("cats", "dogs", "owls")


def photo_folder(root) -> None:
    """30 smooth JPEGs per class, and what a real folder holds besides: a truncated JPEG, an empty
    file, text named .jpg, a 1x1 PNG, a CMYK JPEG, a 16-bit PNG and an RGBA PNG."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] / 40.0
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(30):
            a, b = rng.uniform(0.5, 3.0, 2)
            base = np.sin(a * xx * (c + 1) + b * yy) * 0.5 + 0.5
            rgb = np.stack([base, base[::-1], np.full_like(base, c / 2)], -1)
            Image.fromarray((rgb * 255).astype(np.uint8)).save(root / name / f"{i:03d}.jpg", quality=90)
    good = (root / "cats" / "000.jpg").read_bytes()
    (root / "cats" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "notes.jpg").write_text("not an image")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "owls" / "tiny.png")
    Image.new("CMYK", (32, 32), (0, 128, 255, 0)).save(root / "owls" / "cmyk.jpg")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(root / "owls" / "deep.png")
    Image.new("RGBA", (32, 32), (10, 200, 10, 128)).save(root / "cats" / "alpha.png")


def test_the_trial_flow(tmp_path):
    photos, data, run = tmp_path / "photos", tmp_path / "data", tmp_path / "run"
    photo_folder(photos)
    out = cli("prepare", "--source", f"folder:{photos}", "--out", str(data), "--resolution", "28", "--channels", "1",
              "--workers", "1", "--no-progress")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES) and manifest["num_classes"] == 3
    assert manifest["splits"]["train"]["num_samples"] >= 90          # the readable ones, damaged ones skipped
    assert "notes.jpg" in out.stdout + out.stderr + json.dumps(manifest)
    cli("verify", str(data), "--quiet")

    # Two processes with loader workers; Ctrl-C reaches the launcher and both ranks.
    long = ["train.total_kimg=3.2", "train.tick_kimg=0.032", "train.checkpoint_kimg=10", "train.snapshot_kimg=0.064",
            "model.conditional=true"]
    proc = start(run, data, *long, procs=2, port=29549)
    wait_for_ticks(proc, run)
    os.killpg(proc.pid, signal.SIGINT)
    _, out = finish(proc)
    assert RunDir(run).preempted.is_file() and out.count("interrupted: finishing this step") == 1, out[-3000:]
    stopped = json.loads(RunDir(run).preempted.read_text())["cur_nimg"]

    # Resumed (one process now) to a short end past the stop, wherever Ctrl-C found the run (a fast
    # machine gets further between the second tick and the signal); the markers say what happened.
    end = 64 * (stopped // 64 + 2)
    out = cli("train", "--run-dir", str(run), f"data.path={data}", f"train.total_kimg={end / 1000}",
              "data.num_workers=2", "log.progress=false", "train.threads=1")
    assert "resumed from" in out.stdout and RunDir(run).is_finished() and not RunDir(run).preempted.exists()
    assert 64 <= stopped < end and RunDir(run).reals.is_file()

    # Watched and scored once each; the best by name; images by class name, a walk, an export.
    cli("watch", "--run-dir", str(run), "--once", "--extractor", "mnist", "--num-gen", "300", "--metrics", "fid",
        "--batch-size", "150")
    scored = [json.loads(x) for x in RunDir(run).metrics.read_text().splitlines()]
    assert sorted(r["kimg"] for r in scored if "kind" not in r) == [k / 1000 for k in range(64, end + 1, 64)]
    best = json.loads(RunDir(run).best.read_text())["fid_mnist"]["snapshot"]
    cli("sample", "--run", str(run), "--snapshot", "best", "--label", "owls", "--num", "9",
        "--out", str(tmp_path / "owls.jpg"))
    with Image.open(tmp_path / "owls.jpg") as img:
        assert img.format == "JPEG" and img.size == (2 + 3 * 30, 2 + 3 * 30)
    cli("video", "--run", str(run), "--seeds", "0-7", "--grid", "2x2", "--frames-per-key", "3",
        "--out", str(tmp_path / "walk.gif"))
    with Image.open(tmp_path / "walk.gif") as gif:
        assert gif.n_frames == 2 * 3 and gif.size[0] > 2 * 28               # 2 keyframes a cell, looped
    cli("export", "--run", str(run), "--snapshot", best, "--format", "torchscript", "--out", str(tmp_path / "G.pt"))
    assert (tmp_path / "G.pt").stat().st_size > 1000
