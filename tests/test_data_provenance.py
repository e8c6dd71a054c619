"""Where a sample came from (issue 25): prepare says which images it upscaled, names the
degenerate ones once and can skip small ones (`--min-size`); every sample keeps its source in a
`json` entry, which readers ignore and `verify`, whole-split reading and the loader's errors
quote; names from the data reach messages escaped."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, read_manifest, write_manifest
from pipeline.data.shards import iter_tar_samples
from pipeline.data.splits import iter_split
from pipeline.errors import DataError, UserError
from pipeline.io import sha256_file

FAKE_LINE = "\r\x1b[2KOK, 1 shards, 7 samples verified\x1b[8m"


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two classes: five 40x50 images, a 10x12 one, a 1x1 one, and a file that is no image."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / "b" / "small.png")
    Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(root / "b" / "tiny.png")
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def prepare(folder: Path, out: Path, *extra: str):
    return cli("prepare", "--source", f"folder:{folder}", "--out", str(out), "--resolution", "32",
               "--workers", "1", "--no-progress", *extra)


def samples(data: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for shard in sorted(data.glob("*.tar")) for s in iter_tar_samples(open(shard, "rb"), shard.name)]


def rewrite(shard: Path, change) -> None:
    """Rewrite a shard's samples through `change(key, files)` and make the manifest list it as it is."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in iter_tar_samples(open(shard, "rb")):
            change(key, files)
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    m = read_manifest(shard.parent)
    for entry in m["splits"]["train"]["shards"]:
        if entry["name"] == shard.name:
            entry.update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    write_manifest(shard.parent, m)


def test_prepare_counts_upscaled_images_names_degenerate_ones_and_can_skip_them(tmp_path, folder):
    out = prepare(folder, tmp_path / "o").stdout
    # The 1x1 image is named once, with the option that skips it; the summary counts the upscaled.
    assert out.count("warning:") == 1 and "upscaled more than 4x to 32 px: b/tiny.png (1x1)" in out
    assert "--min-size 8" in out
    assert "upscaled 2 image(s) whose shorter side is under 32 px (1 more than 4x): b/small.png (12x10), " \
           "b/tiny.png (1x1)" in out
    m = read_manifest(tmp_path / "o")
    assert m["min_size"] == 0 and m["skipped"]["count"] == 1 and m["skipped"]["too_small"] == 0
    assert m["upscaled"] == {"count": 2, "files": [{"path": "b/small.png", "size": [12, 10]},
                                                   {"path": "b/tiny.png", "size": [1, 1]}],
                             "degenerate": {"count": 1, "files": [{"path": "b/tiny.png", "size": [1, 1]}]}}
    # Every sample names its source file and size; readers take no notice of the entry.
    records = {json.loads(files["json"])["source"]: json.loads(files["json"]) for _, files in samples(tmp_path / "o")}
    assert sorted(records) == ["a/0.png", "a/1.png", "a/2.png", "a/3.png", "a/4.png", "b/small.png", "b/tiny.png"]
    assert records["b/tiny.png"] == {"source": "b/tiny.png", "original_width": 1, "original_height": 1}
    assert "OK, 1 shards, 7 samples verified" in cli("verify", str(tmp_path / "o"), "--quiet").stdout
    x, y = StreamLoader(ShardSet.resolve(str(tmp_path / "o")), batch_size=7, rank=0, world_size=1,
                        num_workers=0, shuffle_buffer=0).next()
    assert x.shape == (7, 3, 32, 32) and sorted(y.tolist()) == [0] * 5 + [1] * 2
    # The same bytes again (the manifest keys reference statistics), with a pool of workers too.
    prepare(folder, tmp_path / "again", "--workers", "2")
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (tmp_path / "o" / "manifest.json").read_bytes()
    # --min-size skips the 1x1 image, says so, and records it.
    out = prepare(folder, tmp_path / "min", "--min-size", "8").stdout
    assert "warning:" not in out and "skipped 2 images (1 under --min-size 8, 1 unreadable" in out
    m = read_manifest(tmp_path / "min")
    assert m["min_size"] == 8 and m["skipped"]["too_small"] == 1 and m["splits"]["train"]["num_samples"] == 6
    assert {"path": "b/tiny.png", "error": "too small (1x1, under --min-size 8)"} in m["skipped"]["files"]
    assert m["upscaled"]["count"] == 1 and m["upscaled"]["degenerate"]["count"] == 0
    assert cli("prepare", "--source", f"folder:{folder}", "--out", str(tmp_path / "neg"), "--resolution", "32",
               "--min-size", "-1", check=False).returncode == 2


def test_a_bad_sample_is_named_by_its_source_in_verify_split_reading_and_the_loader(tmp_path, folder):
    data = tmp_path / "o"
    prepare(folder, data, "--min-size", "8")
    shard = data / "train-000000.tar"

    def break_small(key, files):
        if json.loads(files["json"])["source"] == "b/small.png":
            files["png"] = b"\x89PNG\r\n\x1a\n broken"
    rewrite(shard, break_small)
    out = cli("verify", str(data), "--quiet", check=False).stdout
    assert "undecodable image (PNG ends before its IEND chunk) (source b/small.png)" in out
    with pytest.raises(UserError, match=r"key train\d{9}: undecodable image .* \(source b/small\.png\); split"):
        list(iter_split(data, "train"))
    with pytest.raises(DataError, match=r"first bad sample: key train\d{9}: undecodable .* \(source b/small\.png\)"):
        ld = StreamLoader(ShardSet.resolve(str(data)), batch_size=2, rank=0, world_size=1, num_workers=0,
                          shuffle_buffer=0, max_bad_fraction=0.0)
        for _ in range(5):
            ld.next()


def test_names_in_split_reading_errors_are_escaped(tmp_path):
    """Keys, sources and split names come from the data: printed as `printable` writes them. A
    shard without `json` entries (made elsewhere, or by an older ganpipe) names the key only."""
    root = tmp_path / "d"
    root.mkdir()
    shard = root / "train-000000.tar"
    with tarfile.open(shard, mode="w") as tar:
        for name, data in ((f"x{FAKE_LINE}.png", b"not a png"),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_manifest(root, {"format": FORMAT, "format_version": FORMAT_VERSION, "source": "test", "resolution": 8,
                          "channels": 3, "classes": [], "num_classes": 0,
                          "splits": {"train": {"num_samples": 1, "shards": [
                              {"name": shard.name, "num_samples": 1, "bytes": shard.stat().st_size,
                               "sha256": sha256_file(shard)}]}}})
    with pytest.raises(UserError) as err:
        list(iter_split(root, "train"))
    msg = str(err.value)
    assert "\x1b" not in msg and "\r" not in msg and "(source" not in msg
    assert "key x\\r\\x1b[2KOK, 1 shards, 7 samples verified\\x1b[8m: undecodable" in msg
    with pytest.raises(UserError) as err:
        list(iter_split(root, f"test{FAKE_LINE}"))
    assert "\x1b" not in str(err.value) and "no split 'test\\r\\x1b[2KOK" in str(err.value)
    # A source that draws is escaped too.
    rewrite(shard, lambda key, files: files.update(json=json.dumps({"source": f"evil{FAKE_LINE}.png"}).encode()))
    with pytest.raises(UserError) as err:
        list(iter_split(root, "train"))
    assert "\x1b" not in str(err.value) and "(source evil\\r\\x1b[2KOK" in str(err.value)
