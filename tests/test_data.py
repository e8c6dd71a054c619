"""Shards: prepare, verify and the streaming loader, run for real on tiny data."""

from __future__ import annotations

import filecmp
import io
import json
import os
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, make_npz
from pipeline.data.loader import DataError, ShardSet, StreamLoader, epoch_assignment
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.data.shards import decode_image, decode_sample, iter_tar_samples
from pipeline.errors import BadSample, TruncatedTar
from pipeline.io import sha256_file
from pipeline.data.prepare import prepare


def loader(path, **kw) -> StreamLoader:
    opts = dict(batch_size=5, seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=0)
    opts.update(kw)
    return StreamLoader(ShardSet.resolve(str(path)), **opts)


# ---------------------------------------------------------------------------------------------
# prepare and verify

def test_prepare_verify_round_trip(mnist_dir):
    m = read_manifest(mnist_dir)
    assert (m["source"], m["resolution"], m["channels"], m["num_classes"]) == ("mnist", 28, 1, 10)
    assert m["splits"]["train"]["num_samples"] == 4000 and m["splits"]["test"]["num_samples"] == 1000
    for split in m["splits"].values():
        assert sum(s["num_samples"] for s in split["shards"]) == split["num_samples"]
        for s in split["shards"]:
            assert (mnist_dir / s["name"]).stat().st_size == s["bytes"] and len(s["sha256"]) == 64
    out = cli("verify", str(mnist_dir), "--quiet")
    assert "OK, 5 shards, 5000 samples verified" in out.stdout
    # Every sample decodes to the stated shape with a label; classes are balanced-ish after the shuffle.
    key, files = next(iter_tar_samples(open(mnist_dir / "train-000000.tar", "rb")))
    assert decode_image(files["png"], 1, 28).shape == (1, 28, 28) and 0 <= int(files["cls"]) < 10
    assert min(m["splits"]["train"]["class_counts"]) > 300


def test_two_prepares_are_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cli("prepare", "--source", "digits", "--out", str(a), "--holdout", "97", "--shard-size", "500",
        "--resolution", "16", "--no-progress")
    cli("prepare", "--source", "digits", "--out", str(b), "--holdout", "97", "--shard-size", "500",
        "--resolution", "16", "--no-progress", "--workers", "1")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "manifest.json" in names and len(names) == 6
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)
    m = read_manifest(a)
    assert m["resolution"] == 16 and m["splits"]["test"]["num_samples"] == 97


def test_verify_catches_a_flipped_byte(small_dir):
    assert cli("verify", str(small_dir), "--quiet").returncode == 0
    shard = small_dir / "train-000003.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01                       # inside the first sample's PNG payload
    shard.write_bytes(bytes(data))
    out = cli("verify", str(small_dir), "--quiet", check=False)
    assert out.returncode == 1
    assert "train-000003.tar: sha256" in out.stdout
    assert out.stdout.count("PROBLEM") >= 1 and "train-000002.tar" not in out.stdout


def test_prepare_refuses_to_overwrite_and_explains_bad_sources(tmp_path, small_dir):
    out = cli("prepare", "--source", "digits", "--out", str(small_dir), check=False)
    assert out.returncode == 2 and "never overwritten" in out.stderr
    out = cli("prepare", "--source", f"folder:{tmp_path / 'nope'}", "--out", str(tmp_path / "o"), check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr and "folder:PATH" in out.stderr
    (tmp_path / "empty").mkdir()
    out = cli("prepare", "--source", f"folder:{tmp_path / 'empty'}", "--out", str(tmp_path / "o"), check=False)
    assert out.returncode == 2 and "no images found" in out.stderr
    out = cli("prepare", "--source", "imagenet", "--out", str(tmp_path / "o"), check=False)
    assert out.returncode == 2 and "mnist" in out.stderr and "folder" in out.stderr
    assert not (tmp_path / "o").exists()


def test_folder_source_skips_unreadable_images(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 4)):
        (root / cls).mkdir(parents=True)
        for i in range(n):   # non-square sizes: resized and centre-cropped
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    out = cli("prepare", "--source", f"folder:{root}", "--out", str(tmp_path / "o"), "--resolution", "16",
              "--no-progress")
    assert "skipped unreadable image dog/broken.jpg" in out.stdout
    m = read_manifest(tmp_path / "o")
    assert m["classes"] == ["cat", "dog"] and m["splits"]["train"]["num_samples"] == 7
    assert m["skipped"]["count"] == 1 and m["skipped"]["files"][0]["path"] == "dog/broken.jpg"
    assert m["splits"]["train"]["class_counts"] == [3, 4]
    assert cli("verify", str(tmp_path / "o"), "--quiet").returncode == 0
    # Missing resolution for a folder is a clear error.
    out = cli("prepare", "--source", f"folder:{root}", "--out", str(tmp_path / "o2"), check=False)
    assert out.returncode == 2 and "--resolution" in out.stderr


def test_npz_nchw_and_unlabelled_folder(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 255, (6, 3, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=imgs)
    m = prepare(f"npz:{tmp_path / 'a.npz'}", tmp_path / "o", workers=1, progress=False)
    assert (m["channels"], m["resolution"], m["num_classes"]) == (3, 12, 0)
    x, y = loader(tmp_path / "o", batch_size=6).next()
    assert (y == -1).all()
    # Lossless: the shards hold exactly the input pixels (as a set; order is shuffled).
    got = sorted(((x + 1) * 127.5).round().to(torch.uint8).numpy().reshape(6, -1).tolist())
    assert got == sorted(imgs.reshape(6, -1).tolist())


# ---------------------------------------------------------------------------------------------
# the streaming loader

def test_batches_have_the_contract_shape_and_range(mnist_dir):
    x, y = loader(mnist_dir, batch_size=16, shuffle_buffer=50).next()
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1


def stream_draws(path, world, workers, batches_per_stream, batch_size, seed=0):
    """Run every rank's loader; return {stream: [(shard, index), ...]} in the order drawn."""
    drawn = defaultdict(list)
    for rank in range(world):
        ld = loader(path, batch_size=batch_size, rank=rank, world_size=world, num_workers=workers, seed=seed)
        for _ in range(batches_per_stream * max(workers, 1)):
            ld.next_raw()
            drawn[ld.last_stream].extend(map(tuple, ld.last_refs.tolist()))
    return drawn


def test_two_ranks_two_workers_draw_disjoint_streams_covering_every_shard(small_dir):
    # 8 shards x 10 samples over 2 ranks x 2 workers: each stream reads 2 shards per epoch.
    drawn = stream_draws(small_dir, world=2, workers=2, batches_per_stream=4, batch_size=5)
    assert sorted(drawn) == [0, 1, 2, 3]
    shard_sets = [{s for s, _ in refs} for refs in drawn.values()]
    assert all(len(s) == 2 for s in shard_sets)
    assert set().union(*shard_sets) == set(range(8))                   # together: every shard
    assert sum(len(s) for s in shard_sets) == 8                        # pairwise disjoint
    every = [r for refs in drawn.values() for r in refs]
    assert len(every) == len(set(every)) == 80                         # every sample exactly once
    # The plan the streams followed is the documented one.
    for sid, refs in drawn.items():
        in_order = list(dict.fromkeys(shard for shard, _ in refs))
        assert in_order == [shard for shard, _, _ in epoch_assignment(8, 4, 0, 0, sid)]


def test_fewer_shards_than_streams_split_samples_without_overlap(tmp_path):
    make_npz(tmp_path / "s.npz", 20, 8)
    prepare(f"npz:{tmp_path / 's.npz'}", tmp_path / "d", shard_size=10, workers=1, progress=False)
    drawn = stream_draws(tmp_path / "d", world=2, workers=2, batches_per_stream=1, batch_size=5)
    every = [r for refs in drawn.values() for r in refs]
    assert len(every) == len(set(every)) == 20


def test_stream_is_deterministic_and_seed_dependent(small_dir):
    def first(seed):
        ld = loader(small_dir, batch_size=8, seed=seed, num_workers=2, shuffle_buffer=20, hflip=True)
        return [ld.next()[0] for _ in range(6)]
    a, b, c = first(3), first(3), first(4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_same_batches(small_dir, workers):
    ld = loader(small_dir, batch_size=7, seed=5, num_workers=workers, shuffle_buffer=25, hflip=True)
    for _ in range(9):                       # past the first epoch boundary of some streams
        ld.next()
    state = ld.state_dict()
    expected = [ld.next() for _ in range(12)]
    again = loader(small_dir, batch_size=7, seed=5, num_workers=workers, shuffle_buffer=25, hflip=True)
    again.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (again.next() for _ in range(12))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    wrong = loader(small_dir, batch_size=7, seed=5, num_workers=1)
    with pytest.raises(DataError, match="num_workers=2|num_workers=0"):
        wrong.load_state_dict(state)


def test_hflip_mirrors_some_samples_and_leaves_others(small_dir):
    ld = loader(small_dir, batch_size=40, hflip=True)
    x, _ = ld.next()
    refs = ld.last_refs
    plain = loader(small_dir, batch_size=80)
    originals = {}
    for _ in range(2):
        xb, _ = plain.next()
        for img, (s, i) in zip(xb, plain.last_refs.tolist()):
            originals[(s, i)] = img
    flipped = [torch.equal(img, originals[tuple(r)].flip(-1)) for img, r in zip(x, refs.tolist())]
    same = [torch.equal(img, originals[tuple(r)]) for img, r in zip(x, refs.tolist())]
    assert all(f or s for f, s in zip(flipped, same))
    assert 5 < sum(flipped) < 35


def _vouch_for(shard: Path) -> None:
    """Record a damaged shard's new size and hash in its manifest (its sample count stays): the
    loader refuses a shard that is not the manifest's, so its damaged samples are only read,
    skipped and counted when the manifest vouches for the damaged bytes."""
    m = read_manifest(shard.parent)
    entry = next(e for e in m["splits"]["train"]["shards"] if e["name"] == shard.name)
    entry.update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    write_manifest(shard.parent, m)


def _rewrite_sample(shard: Path, position: int, png: bytes | None = None, drop_label: bool = False):
    """Rewrite one sample of a shard in place (keeps the other samples byte-for-byte), recorded
    in the manifest."""
    samples = list(iter_tar_samples(open(shard, "rb")))
    key, files = samples[position]
    if png is not None:
        files["png"] = png
    if drop_label:
        files.pop("cls", None)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for k, fs in samples:
            for ext, data in sorted(fs.items()):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    _vouch_for(shard)


def test_truncated_tar_and_corrupt_png_are_skipped_and_counted(small_dir):
    _rewrite_sample(small_dir / "train-000001.tar", 4, png=b"\x89PNG\r\n\x1a\n broken")
    t = small_dir / "train-000005.tar"
    t.write_bytes(t.read_bytes()[:12000])   # cut mid-sample: half the shard is lost
    _vouch_for(t)
    ld = loader(small_dir, batch_size=9, max_bad_fraction=0.8, num_workers=2)
    seen = set()
    for _ in range(10):                      # 90 samples: more than one epoch of the 73 readable
        x, _ = ld.next()
        assert x.shape == (9, 3, 8, 8) and torch.isfinite(x).all()
        seen.update(map(tuple, ld.last_refs.tolist()))
    readable = 0
    with pytest.raises(TruncatedTar):
        for _ in iter_tar_samples(open(t, "rb")):
            readable += 1
    counts = ld.bad_counts()    # 90 draws > 73 readable: some shards were read twice
    assert counts["undecodable"] in (1, 2) and counts["read_error"] in (1, 2)
    assert 3 <= 10 - readable and counts["truncated"] == counts["read_error"] * (10 - readable)
    assert (1, 4) not in seen and all(s != 5 or i < readable for s, i in seen)
    # verify reports both, with shard and key
    out = cli("verify", str(small_dir), "--quiet", check=False)
    assert out.returncode == 1
    assert "train-000001.tar key train000000014: undecodable image" in out.stdout
    assert "train-000005.tar: unreadable tar" in out.stdout


def test_too_many_bad_samples_is_an_error_naming_the_shard(small_dir):
    t = small_dir / "train-000002.tar"
    t.write_bytes(t.read_bytes()[:3000])
    _vouch_for(t)
    ld = loader(small_dir, batch_size=10, max_bad_fraction=0.2)
    with pytest.raises(DataError, match=r"shard .*train-000002\.tar: \d+ of 10 samples bad.*max_bad_fraction"):
        for _ in range(20):
            ld.next()


def test_missing_label_is_bad_only_when_labels_are_required(small_dir):
    _rewrite_sample(small_dir / "train-000000.tar", 2, drop_label=True)
    relaxed = loader(small_dir, batch_size=80)
    _, y = relaxed.next()
    assert (y == -1).sum() == 1 and relaxed.bad_counts() == {}
    strict = loader(small_dir, batch_size=79, require_labels=True, max_bad_fraction=0.2)
    _, y = strict.next()
    assert (y >= 0).all() and strict.bad_counts() == {"missing_label": 1}


def test_url_patterns_and_pipe_urls(small_dir):
    pattern = f"pipe:cat {small_dir}/train-{{000000..000007}}.tar"
    shards = ShardSet.resolve(pattern, resolution=8, channels=3)
    assert len(shards.urls) == 8 and shards.urls[0] == f"pipe:cat {small_dir}/train-000000.tar"
    ld = StreamLoader(shards, batch_size=16, seed=0, rank=0, world_size=1, num_workers=1, shuffle_buffer=0)
    x, y = ld.next()
    direct = loader(small_dir, batch_size=16, num_workers=1)
    assert torch.equal(x, direct.next()[0])
    with pytest.raises(DataError, match="data.resolution"):
        ShardSet.resolve(f"{small_dir}/train-{{000000..000007}}.tar")
    with pytest.raises(DataError, match="do not exist"):
        ShardSet.resolve(f"{small_dir}/nope-{{000000..000001}}.tar", resolution=8, channels=3)
    with pytest.raises(DataError, match="not a prepared data directory.*ganpipe prepare"):
        ShardSet.resolve(str(small_dir.parent))


def test_url_patterns_take_the_number_of_classes_from_the_config(small_dir):
    from pipeline.config import DataConfig

    pattern = f"{small_dir}/train-{{000000..000007}}.tar"
    with pytest.raises(DataError, match="labels are required.*data.num_classes"):
        StreamLoader(ShardSet.resolve(pattern, resolution=8, channels=3), batch_size=8, rank=0, world_size=1,
                     require_labels=True)
    cfg = DataConfig(path=pattern, resolution=8, channels=3, num_classes=4, num_workers=0, shuffle_buffer=0)
    ld = StreamLoader.from_config(cfg, batch_size=80, seed=0, rank=0, world_size=1, require_labels=True)
    _, y = ld.next()
    assert ld.shards.num_classes == 4 and sorted(set(y.tolist())) == [0, 1, 2, 3] and ld.bad_counts() == {}
    # Labels outside data.num_classes are bad samples, as with a manifest's count.
    cfg.num_classes, cfg.max_bad_fraction = 2, 1.0
    ld = StreamLoader.from_config(cfg, batch_size=40, seed=0, rank=0, world_size=1, require_labels=True)
    for _ in range(3):
        _, y = ld.next()
        assert y.max() <= 1
    assert ld.bad_counts()["bad_label"] >= 20
    # For a prepared directory the manifest's count is used; a different one is an error naming the key.
    assert ShardSet.resolve(str(small_dir), num_classes=4).num_classes == 4
    with pytest.raises(DataError, match=r"data.num_classes=3 but .*manifest says 4"):
        ShardSet.resolve(str(small_dir), num_classes=3)


def test_gzip_shards_subdirectory_keys_and_duplicates(tmp_path, small_dir):
    import gzip

    from pipeline.data.shards import read_samples

    # A .tar.gz copy of every shard streams exactly like the original, from files and from pipes.
    gz = tmp_path / "gz"
    gz.mkdir()
    for i in range(8):
        (gz / f"train-{i:06d}.tar.gz").write_bytes(gzip.compress((small_dir / f"train-{i:06d}.tar").read_bytes()))
    plain = loader(small_dir, batch_size=80).next()
    for pattern in (f"{gz}/train-{{000000..000007}}.tar.gz", f"pipe:cat {gz}/train-{{000000..000007}}.tar.gz"):
        ld = StreamLoader(ShardSet.resolve(pattern, resolution=8, channels=3, num_classes=4), batch_size=80,
                          rank=0, world_size=1, num_workers=0, shuffle_buffer=0)
        x, y = ld.next()
        assert torch.equal(x, plain[0]) and torch.equal(y, plain[1]) and ld.bad_counts() == {}
    # Keys are webdataset's: the member path up to the first dot of the file name. `a/1` and `b/1`
    # are two samples; a key seen before in the shard is a counted duplicate, not a silent merge.
    png = _encode(_smooth(0), "PNG")
    members = [("a/1.png", png), ("a/1.cls", b"1"), ("b/1.PNG", png), ("b/1.cls", b"2"),
               ("c/2.png", png), ("a/1.png", png), ("a/1.cls", b"3"), ("2.png", png), ("2.png", png)]
    shard = tmp_path / "keys.tar"
    with tarfile.open(shard, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = [(key, label, bad.kind if bad else None) for _, key, _, label, bad in
           read_samples(open(shard, "rb"), "keys.tar", channels=3, resolution=8, num_classes=4, require_label=False)]
    assert got == [("a/1", 1, None), ("b/1", 2, None), ("c/2", -1, None), ("a/1", -1, "duplicate"),
                   ("2", -1, None), ("2", -1, "duplicate")]
    ld = StreamLoader(ShardSet.resolve(str(shard), resolution=8, channels=3, num_classes=4), batch_size=4,
                      rank=0, world_size=1, num_workers=0, shuffle_buffer=0, max_bad_fraction=0.5)
    ld.next()
    ld.next()
    assert ld.bad_counts() == {"duplicate": 2}


def test_an_epoch_without_usable_samples_says_why(tmp_path):
    np.savez(tmp_path / "big.npz", images=np.zeros((6, 16, 16, 3), np.uint8))
    prepare(f"npz:{tmp_path / 'big.npz'}", tmp_path / "d", workers=1, progress=False)
    (tmp_path / "text.tar").write_text("not a tar\n" * 100)
    for path, cause in ((tmp_path / "d" / "train-000000.tar", r"'wrong_shape': 6"),
                        (tmp_path / "text.tar", r"'read_error': 1.*last read error: TruncatedTar: .*text.tar")):
        ld = StreamLoader(ShardSet.resolve(str(path), resolution=8, channels=3), batch_size=2, rank=0,
                          world_size=1, num_workers=0, shuffle_buffer=0, max_bad_fraction=1.0)
        with pytest.raises(DataError, match=f"without one usable sample.*{cause}.*data.resolution"):
            ld.next()


def test_manifest_json_is_plain_and_complete(small_dir):
    m = json.loads((small_dir / "manifest.json").read_text())
    for key in ("format", "format_version", "source", "resolution", "channels", "classes", "splits"):
        assert key in m
    assert [s["name"] for s in m["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(8)]


def test_in_memory_cache_replays_passes_exactly(small_dir):
    _rewrite_sample(small_dir / "train-000001.tar", 4, png=b"not a png")
    t = small_dir / "train-000006.tar"
    t.write_bytes(t.read_bytes()[:12000])
    _vouch_for(t)
    runs = []
    for cache_mb in (0, 64):
        ld = loader(small_dir, batch_size=9, shuffle_buffer=20, hflip=True, max_bad_fraction=0.8,
                    cache_mb=cache_mb, num_workers=2)
        runs.append(([ld.next()[0] for _ in range(30)], ld.bad_counts()))   # about 3.5 epochs
    (plain, plain_counts), (cached, cached_counts) = runs
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert plain_counts == cached_counts and plain_counts["undecodable"] >= 2


def test_in_memory_cache_decodes_each_sample_once(small_dir, monkeypatch):
    # The cache is keyed by (shard, part, parts): later passes must not decode again (a sample's
    # own key once took that name, so every pass missed and the cache filled with dead entries).
    from pipeline.data import shards as shards_module
    decoded = Counter()
    real = shards_module.decode_image

    def counting(*args, **kwargs):
        decoded["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_module, "decode_image", counting)
    for cache_mb, expected in ((64, 80), (0, 280)):
        decoded.clear()
        ld = loader(small_dir, batch_size=8, shuffle_buffer=0, cache_mb=cache_mb)
        for _ in range(35):                 # 280 samples: 3.5 epochs of 80
            ld.next()
        assert decoded["n"] == expected, cache_mb


def test_in_memory_cache_holds_in_worker_processes(small_dir, monkeypatch, tmp_path):
    # Loader workers on (a GPU run's default): each worker keeps its own cache, so a sample is
    # decoded at most once per worker. Forked workers count into a file (one byte per decode).
    from pipeline.data import shards as shards_module
    real = shards_module.decode_image
    tally = tmp_path / "decodes"

    def counting(*args, **kwargs):
        with open(tally, "ab") as f:
            f.write(b".")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_module, "decode_image", counting)
    counts = {}
    for cache_mb in (64, 0):
        tally.write_bytes(b"")
        ld = loader(small_dir, batch_size=8, shuffle_buffer=0, cache_mb=cache_mb, num_workers=2)
        for _ in range(35):                 # 280 samples: 3.5 epochs of 80
            ld.next()
        ld.close()
        counts[cache_mb] = tally.stat().st_size
    assert counts[0] >= 280 and counts[64] <= 2 * 80, counts


def test_cifar10_source_reads_the_standard_batches_folder(tmp_path):
    import pickle

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    for name, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 4)]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)
    m = prepare(f"cifar10:{root}", tmp_path / "c10", workers=1, progress=False)
    assert (m["resolution"], m["channels"], m["classes"][3]) == (32, 3, "class3")
    assert m["splits"]["train"]["num_samples"] == 30 and m["splits"]["test"]["num_samples"] == 4
    out = cli("prepare", "--source", f"cifar10:{root}", "--out", str(tmp_path / "c2"), "--holdout", "5", check=False)
    assert out.returncode == 2 and "own test split" in out.stderr
    # Batches written by Python 2's numpy (the official files) name numpy.core: still admitted.
    batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4, 5, 6]}
    old_style = pickle.dumps(batch, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in old_style
    (root / "data_batch_1").write_bytes(old_style)
    m = prepare(f"cifar10:{root}", tmp_path / "c3", workers=1, progress=False)
    assert m["splits"]["train"]["num_samples"] == 30


def test_cifar10_source_refuses_a_pickle_that_runs_code(tmp_path):
    import pickle

    from pipeline.data.sources import parse_source
    from pipeline.errors import SourceError

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"], b"x": Payload()}, f)
    with pytest.raises(SourceError, match=r"batches.meta: refused to load (posix|os)\.system.*not from the official"):
        parse_source(f"cifar10:{root}")
    assert not (tmp_path / "pwned").exists()
    (root / "batches.meta").write_bytes(b"\x80\x04truncated")
    with pytest.raises(SourceError, match="batches.meta is not a readable CIFAR-10 batch"):
        parse_source(f"cifar10:{root}")


# ---------------------------------------------------------------------------------------------
# one decoder for every reader: loader, verify and whole-split reading

def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _smooth(i: int, res: int = 8) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it close to the original), different for every i."""
    y, x = np.mgrid[0:res, 0:res]
    return np.stack([(x * 16 + i * 7) % 256, (y * 16 + i * 11) % 256, np.full_like(x, i * 19 % 256)],
                    axis=-1).astype(np.uint8)


def _hand_made_dir(root: Path, samples: list[dict[str, bytes]], num_classes: int = 4) -> Path:
    """A prepared directory written by hand: one train shard of 8x8 RGB samples `s0000`, `s0001`, ..."""
    from pipeline.data.manifest import FORMAT, FORMAT_VERSION, write_manifest
    from pipeline.io import sha256_file

    root.mkdir()
    shard = root / "train-000000.tar"
    with tarfile.open(shard, mode="w") as tar:
        for i, files in enumerate(samples):
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    entry = {"name": shard.name, "num_samples": len(samples), "bytes": shard.stat().st_size,
             "sha256": sha256_file(shard)}
    write_manifest(root, {"format": FORMAT, "format_version": FORMAT_VERSION, "source": "test",
                          "resolution": 8, "channels": 3, "classes": [str(c) for c in range(num_classes)],
                          "num_classes": num_classes,
                          "splits": {"train": {"num_samples": len(samples), "shards": [entry]}}})
    return root


def _problem_keys(stdout: str) -> dict[str, str]:
    """{key: message} of verify's per-sample problems."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("PROBLEM train-000000.tar key "):
            key, _, msg = line.removeprefix("PROBLEM train-000000.tar key ").partition(": ")
            out[key] = msg
    return out


def test_jpeg_samples_verify_load_and_read_like_png(tmp_path):
    from pipeline.data.splits import read_split

    exts = ["jpg", "jpeg", "png"] * 4
    originals = [_smooth(i) for i in range(len(exts))]
    samples = [{ext: _encode(img, "PNG" if ext == "png" else "JPEG"), "cls": str(i % 4).encode()}
               for i, (ext, img) in enumerate(zip(exts, originals))]
    data = _hand_made_dir(tmp_path / "jpeg", samples)
    out = cli("verify", str(data), "--quiet")
    assert "OK, 1 shards, 12 samples verified" in out.stdout
    ld = loader(data, batch_size=12)
    x, y = ld.next()
    assert [i for _, i in ld.last_refs.tolist()] == list(range(12)) and y.tolist() == [i % 4 for i in range(12)]
    got = ((x + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1)
    for ext, g, o in zip(exts, got, originals):
        err = np.abs(g - o.astype(np.float64)).mean()
        assert (err == 0) if ext == "png" else (err < 6), (ext, err)   # lossy JPEG stays close
    images, labels = read_split(data, "train")
    assert np.array_equal(images, ((x + 1) * 127.5).round().to(torch.uint8).numpy())
    assert labels.tolist() == y.tolist()


def test_verify_reports_a_corrupt_jpeg_by_shard_and_key(tmp_path):
    samples = [{"jpg": _encode(_smooth(i), "JPEG"), "cls": b"1"} for i in range(6)]
    samples[3]["jpg"] = samples[3]["jpg"][:40] + b"\x00" * 8      # header survives, the scan does not
    samples[4] = {"cls": b"2"}                                     # no image entry at all
    data = _hand_made_dir(tmp_path / "bad", samples)
    out = cli("verify", str(data), "--quiet", check=False)
    assert out.returncode == 1
    problems = _problem_keys(out.stdout)
    assert set(problems) == {"s0003", "s0004"}, out.stdout
    assert problems["s0003"].startswith("undecodable image")
    assert problems["s0004"].startswith("no image entry") and "has: cls" in problems["s0004"]


def test_loader_verify_and_split_reading_agree_on_bad_samples(tmp_path):
    from pipeline.data.splits import iter_split
    from pipeline.errors import UserError

    good = lambda i, ext="png": {ext: _encode(_smooth(i), "PNG" if ext == "png" else "JPEG"),  # noqa: E731
                                 "cls": str(i % 4).encode()}
    samples = [good(i, "png" if i % 2 else "jpg") for i in range(12)]
    samples[1]["png"] = b"\x89PNG\r\n\x1a\n broken"                             # undecodable
    samples[2]["jpg"] = _encode(np.zeros((16, 16, 3), np.uint8), "JPEG")         # wrong_shape
    samples[4]["cls"] = b"seven"                                                 # bad_label
    samples[6]["cls"] = b"9"                                                     # bad_label: 4 classes
    del samples[8]["jpg"]                                                        # undecodable: no image
    del samples[9]["cls"]                                                        # missing_label
    samples[10] = {"webp": _encode(_smooth(10), "WEBP"), "cls": b"2"}            # good, WebP
    data = _hand_made_dir(tmp_path / "mixed", samples)
    bad = {1, 2, 4, 6, 8, 9}

    problems = _problem_keys(cli("verify", str(data), "--quiet", check=False).stdout)
    assert set(problems) == {f"s{i:04d}" for i in bad}
    # The loader (labels required, as verify requires them for labelled data) keeps exactly the rest.
    ld = loader(data, batch_size=12 - len(bad), require_labels=True, max_bad_fraction=1.0)
    ld.next()
    assert sorted(i for _, i in ld.last_refs.tolist()) == sorted(set(range(12)) - bad)
    ld.next()                                # counts are committed when a shard pass ends
    assert ld.bad_counts() == {"undecodable": 2, "wrong_shape": 1, "bad_label": 2, "missing_label": 1}
    # Both say the same thing about each sample, because both ask decode_sample.
    for key, files in iter_tar_samples(open(data / "train-000000.tar", "rb")):
        try:
            decode_sample(files, channels=3, resolution=8, num_classes=4, require_label=True)
        except BadSample as exc:
            assert problems.pop(key) == str(exc)
    assert problems == {}
    # Whole-split reading refuses the first bad sample, naming the shard and the key.
    with pytest.raises(UserError, match=r"train-000000\.tar key s0001: undecodable image.*ganpipe verify"):
        list(iter_split(data, "train"))


def test_from_config_requires_labels_when_the_model_or_the_config_asks(small_dir):
    from pipeline.config import DataConfig

    _rewrite_sample(small_dir / "train-000000.tar", 2, drop_label=True)
    counts = {}
    for data_flag, model_flag in ((False, False), (True, False), (False, True)):
        cfg = DataConfig(path=str(small_dir), num_workers=0, shuffle_buffer=0, cache_mb=0,
                         max_bad_fraction=0.2, require_labels=data_flag)
        ld = StreamLoader.from_config(cfg, batch_size=79, seed=0, rank=0, world_size=1,
                                      require_labels=model_flag)
        _, y = ld.next()
        counts[data_flag, model_flag] = (ld.bad_counts(), int((y == -1).sum()))
    assert counts[False, False] == ({}, 1)
    assert counts[True, False] == counts[False, True] == ({"missing_label": 1}, 0)
    # An unlabelled dataset cannot feed a conditional model: said before the first batch.
    np.savez(small_dir.parent / "u.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    prepare(f"npz:{small_dir.parent / 'u.npz'}", small_dir.parent / "u", workers=1, progress=False)
    with pytest.raises(DataError, match="labels are required.*model.conditional=false"):
        StreamLoader.from_config(DataConfig(path=str(small_dir.parent / "u")), batch_size=4, seed=0,
                                 rank=0, world_size=1, require_labels=True)


def test_auto_loader_workers_follow_the_device():
    """data.num_workers=-1 (the default): no worker process on a CPU-only run, 2 with a GPU; an
    explicit count is kept as given."""
    from pipeline.data.loader import auto_workers

    assert auto_workers(-1, torch.device("cpu")) == 0 and auto_workers(-1, None) == 0
    assert auto_workers(-1, "cuda:0") == 2 and auto_workers(-1, torch.device("cuda", 1)) == 2
    assert auto_workers(3, "cpu") == 3 and auto_workers(0, "cuda") == 0
