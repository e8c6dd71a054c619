"""Our shard reader groups tar members into samples exactly as webdataset does: both run on the
same crafted and random tars, and their samples are compared. Where webdataset raises (a repeated
extension, an entry named like a sample field), ours keeps the samples webdataset keeps with a
skipping handler and counts the rest."""

from __future__ import annotations

import gzip
import io
import itertools
import random
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from pipeline.data.shards import encode_png, is_metadata, iter_tar_samples, read_samples, sample_key


def write_tar(path, members, fmt=tarfile.PAX_FORMAT):
    """members: (name, bytes) regular files, or (name, "dir") / (name, "symlink")."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif data == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.png"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def theirs(path, **kw) -> list[tuple[str, dict[str, bytes]]]:
    """webdataset's own samples of one shard: (key, {extension: bytes})."""
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, **kw)
    return [(s["__key__"], {k: v for k, v in s.items() if k not in ("__key__", "__url__", "__local_path__")})
            for s in ds]


def ours(path) -> list[tuple[str, dict[str, bytes]]]:
    return list(iter_tar_samples(open(path, "rb"), str(path)))


def test_sample_key_is_webdatasets_split_on_every_short_name():
    # Every name of up to 7 characters over an alphabet with dots, slashes and upper case: 21,844
    # names, among them every corner (leading, trailing and double dots and slashes).
    names = ["".join(p) for n in range(1, 8) for p in itertools.product("a./A", repeat=n)]
    differ = [(n, sample_key(n), base_plus_ext(n)) for n in names
              if (sample_key(n) or (None, None)) != base_plus_ext(n)]
    assert differ == [] and len(names) == 21844
    assert sample_key("d/x.seg.png") == ("d/x", "seg.png") and sample_key("d.v2/x.png") == ("d.v2/x", "png")
    assert sample_key("d/.png") == ("d/", "png") and sample_key("d.v2/.png") is None
    assert sample_key("README") is None and sample_key("dir/") is None


PNG = encode_png(Image.fromarray(np.full((8, 8, 3), 7, np.uint8)))

CRAFTED = [
    ("a.b.png", b"1"), ("a.b.cls", b"2"),                      # key a: extensions b.png, b.cls
    ("dir/x.seg.png", b"3"), ("dir/x.png", b"4"), ("dir/x.CLS", b"5"),   # upper-case extension
    ("dir.v2/y.png", b"6"),                                     # a dot in a directory name
    ("Upper.PNG", b"7"), ("upper.png", b"8"),                   # keys keep their case
    ("k.png", b"9"), ("README", b"10"), ("k.cls", b"11"),       # no dot: skipped, k goes on
    ("__meta__", b"12"), ("k.txt", b"13"),                      # top-level __meta__: skipped
    ("__index__/z.png", b"14"), ("sub/__k__.png", b"15"), ("__k__.png", b"16"), ("___", b"17"),
    (".hidden.png", b"18"), ("d/.png", b"19"), ("d.x/.png", b"20"), ("dir/", b"21"),
    ("r.png", b"22"), ("s.png", b"23"), ("r.cls", b"24"),       # r comes back: a second sample r
    ("somedir", "dir"), ("link.png", "symlink"), ("e.txt", b""),
    ("ünï/ç.png", b"25"), ("ünï/ç.cls", b"26"),                  # UTF-8 names
    ("deep/" * 18 + "n.png", b"27"), ("deep/" * 18 + "n.cls", b"28"),   # > 100 characters
    ("p" * 120 + "/q.png", b"29"),                              # ustar: only fits with the prefix field
]


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar", "pax.gz"])
def test_crafted_tars_group_exactly_like_webdataset(tmp_path, fmt):
    path = write_tar(tmp_path / "s.tar", CRAFTED, {"pax": tarfile.PAX_FORMAT, "pax.gz": tarfile.PAX_FORMAT,
                                                   "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt])
    if fmt.endswith(".gz"):
        (tmp_path / "s.tar.gz").write_bytes(gzip.compress(path.read_bytes()))
        path = tmp_path / "s.tar.gz"
    want = theirs(path)
    assert ours(path) == want
    assert [k for k, _ in want] == ["a", "dir/x", "dir.v2/y", "Upper", "upper", "k", "sub/__k__", "__k__", "d/",
                                    "r", "s", "r", "e", "ünï/ç", "deep/" * 18 + "n", "p" * 120 + "/q"]
    assert want[1][1] == {"seg.png": b"3", "png": b"4", "cls": b"5"} and want[5][1] == {"png": b"9", "cls": b"11",
                                                                                     "txt": b"13"}


def test_random_tars_group_exactly_like_webdataset(tmp_path):
    rng = random.Random(0)
    # Runs of one key with a few extensions, the keys drawn from names with every corner.
    keys = ["a", "b", "ab", "a/b", "a.b/c", "__x__/a", "_a_", "a/", "a/_", "./a", "a//b"]
    exts = ["png", "cls", "b.png", "a.b", "", "__", "_"]
    for t in range(4):
        members, used = [], set()
        while len(members) < 150:
            key = rng.choice(keys) + rng.choice(["", "a", "b", "/a", "__"])
            for ext in rng.sample(exts, rng.randint(1, 3)):
                name = key + "." + ext if rng.random() < 0.9 else key
                if name not in used:
                    used.add(name)
                    members.append((name, rng.randbytes(rng.randint(0, 700))))
        path = write_tar(tmp_path / f"r{t}.tar", members)
        want = theirs(path)
        assert ours(path) == want and len(want) > 50


def test_where_webdataset_raises_ours_keeps_its_skipping_handlers_samples(tmp_path):
    members = [("x.png", PNG), ("x.cls", b"1"), ("x.png", PNG), ("y.png", PNG), ("y.__key__", b"z"),
               ("y.cls", b"2")]
    path = write_tar(tmp_path / "dup.tar", members)
    with pytest.raises(ValueError, match="duplicate file name"):
        theirs(path)
    kept = theirs(path, handler=wds.ignore_and_continue)
    assert [(k, sorted(f)) for k, f in kept] == [("x", ["cls", "png"]), ("y", ["cls", "png"])]
    got = list(read_samples(open(path, "rb"), "dup.tar", channels=3, resolution=8, num_classes=4,
                            require_label=False))
    assert [(key, label, bad.kind if bad else None) for _, key, _, label, bad in got] == [
        ("x", 1, None), ("x", -1, "duplicate"), ("y", 2, None)]


def test_metadata_rule_is_webdatasets():
    assert is_metadata("__meta__") and is_metadata("___") and is_metadata("__") and is_metadata("__a__/x.png")
    assert not is_metadata("___/x.png") and not is_metadata("__k__.png") and not is_metadata("d/__k__")


def test_index_shards_indexes_a_pattern_into_another_directory(tmp_path):
    import shutil

    from pipeline.cli import main
    from pipeline.config import DataConfig
    from pipeline.data.index import index_shards
    from pipeline.data.loader import ShardSet, StreamLoader
    from pipeline.data.manifest import read_manifest
    from pipeline.data.verify import verify_dir
    from pipeline.errors import DataError, UserError

    root = tmp_path / "store" / "shards"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train-000000.tar", 5), ("train-000001.tar", 4), ("test-000000.tar", 3), ("other.tar", 2)):
        with wds.TarWriter(str(root / name)) as sink:               # webdataset's own writer
            for i in range(n):
                sink.write({"__key__": f"{name[:5]}{i:03d}", "png": rng.integers(0, 256, (8, 8, 3), np.uint8),
                            "cls": i % 3})
    pattern = f"{root}/train-{{000000..000001}}.tar::{root}/test-000000.tar"
    out = tmp_path / "manifests" / "mine"
    assert main(["index-shards", pattern, "--out", str(out), "--quiet"]) == 0
    m = read_manifest(out)
    assert {k: [s["path"] for s in v["shards"]] for k, v in m["splits"].items()} == {
        "train": [str(root / "train-000000.tar"), str(root / "train-000001.tar")],
        "test": [str(root / "test-000000.tar")]}                   # other.tar: not in the pattern
    assert (m["resolution"], m["channels"], m["num_classes"]) == (8, 3, 3)
    assert verify_dir(out, progress=False) == ([], {"shards": 3, "samples": 12})
    assert main(["verify", str(out), "--quiet"]) == 0
    # Training's loader reads the shards where the manifest says they are.
    cfg = DataConfig(path=str(out), num_workers=0, shuffle_buffer=0)
    x, y = StreamLoader.from_config(cfg, batch_size=9, seed=0, rank=0, world_size=1, require_labels=True).next()
    direct = StreamLoader(ShardSet.resolve(f"{root}/train-{{000000..000001}}.tar", resolution=8, channels=3,
                                           num_classes=3), batch_size=9, rank=0, world_size=1, num_workers=0,
                          shuffle_buffer=0).next()
    assert torch.equal(x, direct[0]) and torch.equal(y, direct[1])
    # verify reads the listed files themselves: a changed shard is found by name.
    data = bytearray((root / "test-000000.tar").read_bytes())
    data[-2000] ^= 1
    (root / "test-000000.tar").write_bytes(bytes(data))
    problems, _ = verify_dir(out, progress=False)
    assert problems and all(p.startswith("test-000000.tar: ") for p in problems), problems
    # Shards below --out are listed relative to it: the directory moves as a whole.
    assert main(["index-shards", f"{root}/train-{{000000..000001}}.tar", "--out", str(tmp_path / "store"),
                 "--quiet"]) == 0
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "store", moved)
    m = read_manifest(moved)
    assert [s["path"] for s in m["splits"]["train"]["shards"]] == ["shards/train-000000.tar", "shards/train-000001.tar"]
    assert verify_dir(moved, progress=False) == ([], {"shards": 2, "samples": 9})
    # A directory is indexed in place.
    assert main(["index-shards", str(moved / "shards"), "--quiet"]) == 0
    assert all("path" not in s for v in read_manifest(moved / "shards")["splits"].values() for s in v["shards"])
    with pytest.raises(UserError, match="is a pattern: give --out"):
        index_shards(f"{moved}/shards/train-{{000000..000001}}.tar")
    for source, message in ((f"pipe:cat {root}/x.tar", "reads local files"),
                            (f"{moved}/shards/train-{{000000..000002}}.tar", r"1 of 3 shards are not files .*000002")):
        with pytest.raises(UserError, match=message):
            index_shards(source, tmp_path / "o")
    # A manifest whose path does not end in the shard's name is refused.
    text = (out / "manifest.json").read_text().replace("/test-000000.tar", "/other.tar")
    (out / "manifest.json").write_text(text)
    with pytest.raises(DataError, match="does not end in its name"):
        read_manifest(out)
