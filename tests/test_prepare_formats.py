"""Data as users have it: `ganpipe prepare` storing JPEG sources as they are, choosing the stored
format, non-square and RGBA/grey/16-bit images, labels files, local Hugging Face datasets, and
`ganpipe index-shards` for webdataset shards written elsewhere. Every result goes through `verify` and
the loader, the readers training uses."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.data.index import index_dir
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.data.manifest import read_manifest
from pipeline.data.prepare import prepare
from pipeline.data.shards import decode_image, iter_tar_samples
from pipeline.data.sources import SourceOptions
from pipeline.data.verify import verify_dir
from pipeline.errors import DataError, SourceError, UserError


def photo(i: int, h: int = 24, w: int = 24) -> np.ndarray:
    """A photo-like RGB image: smooth colour gradients, a blob and sensor-like noise."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(0, 6, 3)
    img = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y) + a)], -1) * 80 + 128
    cy, cx = rng.uniform(0.2, 0.8, 2)
    img += 60 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) * 40)[..., None]
    return (img + rng.normal(0, 4, img.shape)).round().clip(0, 255).astype(np.uint8)


def save(arr: np.ndarray, path, fmt: str = "JPEG", **kw) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}), **kw)
    return path.read_bytes()


def entries(data_dir, split: str = "train") -> list[tuple[str, bytes]]:
    """(extension, bytes) of every image entry of a split, in shard order."""
    out = []
    for shard in read_manifest(data_dir)["splits"][split]["shards"]:
        for _, files in iter_tar_samples(open(data_dir / shard["name"], "rb")):
            ext = next(e for e in ("png", "jpg", "jpeg", "webp") if e in files)
            out.append((ext, files[ext]))
    return out


def shard_bytes(data_dir) -> int:
    return sum(s["bytes"] for split in read_manifest(data_dir)["splits"].values() for s in split["shards"])


def batch(data_dir, n: int, **kw):
    ld = StreamLoader(ShardSet.resolve(str(data_dir)), batch_size=n, seed=0, rank=0, world_size=1, num_workers=0,
                      shuffle_buffer=0, **kw)
    return ld.next()


def test_keep_stores_jpeg_sources_byte_for_byte_and_is_smaller_than_png(tmp_path):
    # 48 pixels: big enough that the tar's 512-byte blocks do not hide the difference.
    sources = {hashlib.sha256(save(photo(i, 48, 48), tmp_path / "photos" / f"{i:03d}.jpg")).hexdigest()
               for i in range(30)}
    assert main(["prepare", "--source", f"folder:{tmp_path / 'photos'}", "--out", str(tmp_path / "keep"),
                 "--resolution", "48", "--workers", "1", "--no-progress"]) == 0          # keep is the default
    prepare(f"folder:{tmp_path / 'photos'}", tmp_path / "png", resolution=48, image_format="png", progress=False)
    keep = entries(tmp_path / "keep")
    assert {ext for ext, _ in keep} == {"jpg"} and {hashlib.sha256(b).hexdigest() for _, b in keep} == sources
    m = read_manifest(tmp_path / "keep")
    assert (m["image_format"], m["image_formats"], m["encoding"]["format"]) == ("jpg", {"jpg": 30}, "keep")
    assert m["splits"]["train"]["image_formats"] == {"jpg": 30}
    assert {ext for ext, _ in entries(tmp_path / "png")} == {"png"}
    # The stored images; the shards also hold each sample's tar headers and its `json` source record.
    assert sum(len(b) for _, b in keep) < 0.6 * sum(len(b) for _, b in entries(tmp_path / "png"))
    assert shard_bytes(tmp_path / "keep") < 0.7 * shard_bytes(tmp_path / "png")
    for d in ("keep", "png"):
        assert verify_dir(tmp_path / d, progress=False)[0] == []
    # The loader reads the kept JPEG as its decoder reads the source file.
    x, _ = batch(tmp_path / "keep", 30)
    want = sorted(decode_image(b, 3, 48).tobytes() for _, b in keep)
    assert sorted(((x + 1) * 127.5).round().to(torch.uint8).numpy()[i].tobytes() for i in range(30)) == want


def test_keep_reencodes_what_changes_and_modes_are_explicit(tmp_path):
    root = tmp_path / "mixed"
    save(photo(0, 16, 16), root / "a_fits.jpg")
    save(photo(1, 16, 40), root / "b_wide.jpg")                       # resized and cropped -> png
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8, :, :3], rgba[:8, :, 3] = (200, 0, 0), 255                 # top: opaque red; bottom: transparent
    save(rgba, root / "c_rgba.png", "PNG")
    save(np.full((16, 16), 77, np.uint8), root / "d_grey.png", "PNG")
    save(np.full((16, 16), 32896, np.uint16), root / "e_16bit.png", "PNG")   # 32896 / 257 = 128
    save(photo(2, 16, 16), root / "f_fits.png", "PNG")                 # an RGB PNG that fits: kept as it is
    out = {}
    for background in ("white", "black"):
        out[background] = tmp_path / background
        prepare(f"folder:{root}", out[background], resolution=16, background=background, progress=False)
        assert verify_dir(out[background], progress=False)[0] == []
    m = read_manifest(out["white"])
    assert m["image_format"] == "mixed" and m["image_formats"] == {"jpg": 1, "png": 5}
    kept = dict(entries(out["white"]))
    assert kept["jpg"] == (root / "a_fits.jpg").read_bytes()
    stored = {e[1] for e in entries(out["white"])}
    assert (root / "f_fits.png").read_bytes() in stored and (root / "c_rgba.png").read_bytes() not in stored

    def pixels(d):
        return [decode_image(b, 3, 16) for _, b in entries(d)]

    white, black = pixels(out["white"]), pixels(out["black"])
    red = [i for i, p in enumerate(white) if tuple(p[:, 0, 0]) == (200, 0, 0)]
    assert len(red) == 1                                              # the RGBA image, opaque half kept
    assert tuple(white[red[0]][:, 15, 0]) == (255, 255, 255) and tuple(black[red[0]][:, 15, 0]) == (0, 0, 0)
    flat = sorted(int(p[0, 0, 0]) for p in white if (p == p[0, 0, 0]).all())
    assert flat == [77, 128]                                          # grey replicated; 16-bit scaled, not clipped
    # Greyscale output: RGB sources become luma, grey ones stay as they are.
    prepare(f"folder:{root}", tmp_path / "grey", resolution=16, channels=1, progress=False)
    assert verify_dir(tmp_path / "grey", progress=False)[0] == []
    assert read_manifest(tmp_path / "grey")["channels"] == 1
    assert (root / "d_grey.png").read_bytes() in {b for _, b in entries(tmp_path / "grey")}


def test_stored_format_quality_and_crop(tmp_path):
    root = tmp_path / "src"
    for i in range(6):
        save(photo(i, 32, 32), root / f"{i}.png", "PNG")
    sizes = {}
    for fmt, quality in (("jpg", 95), ("jpg", 30), ("webp", 100)):
        d = tmp_path / f"{fmt}{quality}"
        prepare(f"folder:{root}", d, resolution=32, image_format=fmt, quality=quality, progress=False)
        assert {e for e, _ in entries(d)} == {fmt} and verify_dir(d, progress=False)[0] == []
        assert read_manifest(d)["encoding"] == {"format": fmt, "quality": quality, "crop": "center",
                                                "background": "white"}
        sizes[fmt, quality] = sum(len(b) for _, b in entries(d))    # tar pads to 10 KiB records
    assert sizes["jpg", 30] < sizes["jpg", 95]
    # WebP at quality 100 is lossless: the pixels of the sources, exactly.
    got = sorted(decode_image(b, 3, 32).tobytes() for _, b in entries(tmp_path / "webp100"))
    assert got == sorted(np.asarray(Image.open(root / f"{i}.png")).transpose(2, 0, 1).tobytes() for i in range(6))
    with pytest.raises(UserError, match="--quality 50.*jpg or webp only"):
        prepare(f"folder:{root}", tmp_path / "x", resolution=32, image_format="png", quality=50, progress=False)
    with pytest.raises(UserError, match="webp stores RGB only"):
        prepare(f"folder:{root}", tmp_path / "x", resolution=32, image_format="webp", channels=1, progress=False)
    # Non-square: center crops the middle, pad letterboxes the whole image onto the background.
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10], wide[:, 10:20], wide[:, 20:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    save(wide, tmp_path / "wide" / "w.png", "PNG")
    for crop in ("center", "pad"):
        prepare(f"folder:{tmp_path / 'wide'}", tmp_path / crop, resolution=12, crop=crop, background="black",
                progress=False)
    center = decode_image(entries(tmp_path / "center")[0][1], 3, 12)
    pad = decode_image(entries(tmp_path / "pad")[0][1], 3, 12)
    assert center[1].min() > 200 and center[0].max() < 30                 # only the green middle
    assert pad[:, 0].max() == 0 and pad[:, -1].max() == 0                 # black bars top and bottom
    assert pad[0, 6, 0] > 200 and pad[1, 6, 6] > 200 and pad[2, 6, 11] > 200   # red, green, blue all there


def test_labels_from_dataset_json_and_csv(tmp_path):
    # StyleGAN's layout: 00000/img00000000.png ... and dataset.json at the top, found by itself.
    root = tmp_path / "stylegan"
    names = [f"00000/img{i:08d}.png" for i in range(6)]
    for i, name in enumerate(names):
        save(photo(i, 8, 8), root / name, "PNG")
    (root / "dataset.json").write_text(json.dumps({"labels": [[n, i % 3] for i, n in enumerate(names)]}))
    m = prepare(f"folder:{root}", tmp_path / "a", resolution=8, progress=False)
    assert m["classes"] == ["0", "1", "2"] and m["splits"]["train"]["class_counts"] == [2, 2, 2]
    assert m["source_notes"]["labels_file"].endswith("dataset.json")
    x, y = batch(tmp_path / "a", 6, require_labels=True)
    by_pixels = {photo(i, 8, 8).transpose(2, 0, 1).tobytes(): i % 3 for i in range(6)}
    assert [by_pixels[img.tobytes()] for img in ((x + 1) * 127.5).round().to(torch.uint8).numpy()] == y.tolist()
    (root / "dataset.json").write_text(json.dumps({"labels": None}))
    assert prepare(f"folder:{root}", tmp_path / "b", resolution=8, progress=False)["num_classes"] == 0
    # A CSV with a header, bare file names and class names (numbered in sorted order), via the CLI.
    csv = tmp_path / "labels.csv"
    csv.write_text("file,class\n" + "".join(f"img{i:08d}.png,{['cat', 'dog'][i % 2]}\n" for i in range(6)))
    assert main(["prepare", "--source", f"folder:{root}", "--out", str(tmp_path / "c"), "--resolution", "8",
                 "--labels", str(csv), "--workers", "1", "--no-progress"]) == 0
    m = read_manifest(tmp_path / "c")
    assert m["classes"] == ["cat", "dog"] and m["splits"]["train"]["class_counts"] == [3, 3]
    assert verify_dir(tmp_path / "c", progress=False)[0] == []
    csv.write_text("".join(f"img{i:08d}.png,{i}\n" for i in range(5)))
    with pytest.raises(SourceError, match=r"1 of the 6 images .* have no label \(first: 00000/img00000005.png\)"):
        prepare(f"folder:{root}", tmp_path / "d", resolution=8, options=SourceOptions(labels=str(csv)))
    csv.write_text("".join(f"img{i:08d}.png,{i}\n" for i in range(6)) + "nope.png,1\n")
    with pytest.raises(SourceError, match="1 entries name no image.*'nope.png'"):
        prepare(f"folder:{root}", tmp_path / "d", resolution=8, options=SourceOptions(labels=str(csv)))
    with pytest.raises(SourceError, match="--labels applies to folder:PATH sources"):
        prepare("digits", tmp_path / "d", options=SourceOptions(labels=str(csv)))


def test_local_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    pngs = [save(photo(i, 8, 8), tmp_path / "png" / f"{i}.png", "PNG") for i in range(8)]
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["ant", "bee", "cow"]),
                                  "score": datasets.Value("float32")})
    ds = datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b in pngs],
                                     "fine": [i % 3 for i in range(8)], "score": [0.5] * 8}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert main(["prepare", "--source", f"hf:{tmp_path / 'saved'}", "--out", str(tmp_path / "a"),
                 "--resolution", "8", "--label-column", "fine", "--holdout", "2", "--workers", "1",
                 "--no-progress"]) == 0
    m = read_manifest(tmp_path / "a")
    assert m["classes"] == ["ant", "bee", "cow"] and m["source"] == "hf" and m["image_formats"] == {"png": 8}
    assert {b for _, b in entries(tmp_path / "a") + entries(tmp_path / "a", "test")} == set(pngs)   # kept as is
    assert verify_dir(tmp_path / "a", progress=False)[0] == []
    x, y = batch(tmp_path / "a", 6, require_labels=True)
    label_of = {decode_image(b, 3, 8).tobytes(): i % 3 for i, b in enumerate(pngs)}
    assert [label_of[img.tobytes()] for img in ((x + 1) * 127.5).round().to(torch.uint8).numpy()] == y.tolist()
    # A DatasetDict keeps its splits; parquet files (as on the Hub) read in place, split by file name.
    datasets.DatasetDict({"train": ds.select(range(6)), "test": ds.select(range(6, 8))}).save_to_disk(
        str(tmp_path / "dict"))
    m = prepare(f"hf:{tmp_path / 'dict'}", tmp_path / "b", resolution=8, progress=False,
                options=SourceOptions(label_column="fine"))
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 6, "test": 2}
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.select(range(5)).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(5, 8)).to_parquet(str(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    m = prepare(f"hf:{tmp_path / 'pq'}", tmp_path / "c", resolution=8, progress=False)
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 5, "test": 3} and m["num_classes"] == 0
    with pytest.raises(SourceError, match=r"no image column 'photo'; columns: img, fine, score"):
        prepare(f"hf:{tmp_path / 'saved'}", tmp_path / "d", resolution=8, options=SourceOptions(image_column="photo"))
    with pytest.raises(SourceError, match="label column 'score' holds"):
        prepare(f"hf:{tmp_path / 'saved'}", tmp_path / "d", resolution=8, options=SourceOptions(label_column="score"))


def test_index_makes_webdataset_shards_from_elsewhere_verifiable_and_loadable(tmp_path):
    from webdataset import TarWriter

    root = tmp_path / "shards"
    root.mkdir()
    images = {}
    for name, start, n in (("train-000000.tar", 0, 5), ("train-000001.tar", 5, 4), ("test-000000.tar", 9, 3)):
        with TarWriter(str(root / name)) as sink:                    # webdataset's own encoders
            for i in range(start, start + n):
                ext = "jpg" if i % 2 else "png"
                sink.write({"__key__": f"sample{i:04d}", ext: photo(i, 12, 12), "cls": i % 4})
                images[i] = ext
    assert main(["index-shards", str(root), "--quiet"]) == 0
    m = read_manifest(root)
    assert (m["resolution"], m["channels"], m["num_classes"]) == (12, 3, 4)
    assert {k: (v["num_samples"], len(v["shards"])) for k, v in m["splits"].items()} == {"train": (9, 2),
                                                                                        "test": (3, 1)}
    assert m["splits"]["train"]["class_counts"] == [3, 2, 2, 2] and m["image_formats"] == {"jpg": 6, "png": 6}
    problems, counts = verify_dir(root, progress=False)
    assert problems == [] and counts == {"shards": 3, "samples": 12}
    x, y = batch(root, 9, require_labels=True)
    assert x.shape == (9, 3, 12, 12) and sorted(y.tolist()) == sorted(i % 4 for i in range(9))
    with pytest.raises(UserError, match="exists already"):
        index_dir(root)
    # Shards that disagree get no manifest, and the error names the shard and the key.
    bad = tmp_path / "bad"
    bad.mkdir()
    with TarWriter(str(bad / "a-000000.tar")) as sink:
        sink.write({"__key__": "k0", "png": photo(0, 12, 12)})
        sink.write({"__key__": "k1", "png": photo(1, 16, 16)})
        sink.write({"__key__": "k2", "cls": 1})
    with pytest.raises(DataError, match=r"2 problem\(s\), no manifest.*a-000000.tar key k1: image shape .*16x16.*"
                                        r"a-000000.tar key k2: no image entry"):
        index_dir(bad, progress=False)
    assert not (bad / "manifest.json").exists()
