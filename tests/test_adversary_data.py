"""Data someone else made (downloaded, copied, unpacked) is hostile input: the record must never lie
about it, and no byte of it may exhaust the process, crash a command or draw on the terminal.
Issue 27, data side: shards checked against their manifest by training and reference statistics,
bounded samples, bounded manifest numbers, corrupt tar headers, escaped names. Every crafted input
is made here, small and seeded.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, make_npz
from pipeline.data import shards as shards_module
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.data.manifest import MANIFEST, read_manifest, write_manifest
from pipeline.data.prepare import prepare
from pipeline.data.shards import encode_png, read_samples
from pipeline.data.verify import verify_dir
from pipeline.errors import DataError, TruncatedTar
from pipeline.io import sha256_file
from PIL import Image


def _png(seed: int, side: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels))


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A GNU tar of (name, data); names may hold control characters and undecodable bytes
    (as surrogates), written as raw bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _samples(n: int, prefix: str = "s") -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in ((f"{prefix}{i:04d}.png", _png(i)), (f"{prefix}{i:04d}.cls", b"1"))]


def _vouch_for(shard: Path, num_samples: int | None = None) -> None:
    """Make the manifest list `shard` as it is now: only then are its samples read at all."""
    m = read_manifest(shard.parent)
    for split in m["splits"].values():
        for entry in split["shards"]:
            if entry["name"] == shard.name:
                entry.update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
                if num_samples is not None:
                    entry["num_samples"] = num_samples
        split["num_samples"] = sum(e["num_samples"] for e in split["shards"])
    write_manifest(shard.parent, m)


def _other_cls(shard: Path) -> None:
    """Change one label digit of a prepared shard in place: same size, valid samples, other bytes."""
    data = bytearray(shard.read_bytes())
    at = data.index(b".cls\0")                      # first .cls member's header; its data follows it
    header = (at // 512) * 512
    body = header + 512
    data[body] = ord("3") if data[body] != ord("3") else ord("2")
    shard.write_bytes(bytes(data))


def _loader(path: Path, **kw) -> StreamLoader:
    opts = dict(batch_size=10, seed=0, rank=0, world_size=1, num_workers=0, shuffle_buffer=0)
    return StreamLoader(ShardSet.resolve(str(path)), **{**opts, **kw})


# ---------------------------------------------------------------------------------------------
# 5. Training and reference statistics read what the manifest lists, or stop and say so.

@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_changed_under_its_manifest_stops_the_loader_before_any_of_its_samples(small_dir, workers):
    changed = small_dir / "train-000003.tar"
    _other_cls(changed)                              # same size: only the hash can tell
    ld = _loader(small_dir, num_workers=workers)
    used = set()
    with pytest.raises(DataError) as err:
        for _ in range(16):                          # two epochs of 80 samples: every shard is read
            ld.next()
            used |= {s for s, _ in ld.last_refs.tolist()}
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert f"shard {changed} has sha256 " in message and str(small_dir / MANIFEST) in message
    assert "restore it" in message and "index-shards" in message
    assert 3 not in used                             # not one sample of it was trained on


def test_a_shard_of_another_size_is_refused_when_the_loader_is_built(small_dir, tmp_path):
    other = tmp_path / "other"
    prepare(f"npz:{make_npz(tmp_path / 'o.npz', 80, 8, seed=1)}", other, shard_size=10, workers=1, progress=False)
    for shard in small_dir.glob("train-*.tar"):      # every shard replaced by other images
        shard.write_bytes((other / shard.name).read_bytes() + bytes(512))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"shard .*train-000000\.tar has \d+ bytes where .*manifest\.json lists "
                                        r"\d+: .*restore it, or re-run `ganpipe prepare` / `ganpipe index-shards`"):
        ShardSet.resolve(str(small_dir))
    assert time.perf_counter() - t0 < 1.0            # a stat per shard, no hashing


def test_a_resumed_stream_refuses_a_shard_changed_since_the_checkpoint(small_dir):
    ld = _loader(small_dir, shuffle_buffer=20)
    ld.next()
    state = ld.state_dict()
    buffered = int(state["streams"][0]["buffer"][0][0])
    _other_cls(Path(ld.shards.urls[buffered]))
    resumed = _loader(small_dir, shuffle_buffer=20)
    resumed.load_state_dict(state)
    with pytest.raises(DataError, match=rf"train-{buffered:06d}\.tar has sha256 .*changed after it was indexed"):
        resumed.next()


def test_reference_statistics_are_computed_only_from_the_manifests_shards(tmp_path):
    from pipeline.metrics.features import get_extractor
    from pipeline.metrics.refstats import cache_name, reference_stats

    data, other = tmp_path / "data", tmp_path / "other"
    for out, seed in ((data, 0), (other, 1)):
        prepare(f"npz:{make_npz(tmp_path / f'{seed}.npz', 64, 28, channels=1, classes=10, seed=seed)}", out,
                shard_size=32, workers=1, progress=False)
    ext = get_extractor("mnist")
    original = {p.name: p.read_bytes() for p in data.glob("train-*.tar")}
    for name in original:                            # other images under the same manifest
        (data / name).write_bytes((other / name).read_bytes())
    with pytest.raises(DataError, match=r"train-000000\.tar has (sha256|\d+ bytes) .*changed after it was indexed"):
        reference_stats(data, "train", ext, log=lambda m: None)
    assert not (data / "refstats").exists() or not list((data / "refstats").iterdir())   # nothing cached
    for name, raw in original.items():
        (data / name).write_bytes(raw)
    stats = reference_stats(data, "train", ext, log=lambda m: None)
    assert stats.num == 64 and stats.meta["split_sha256"][:12] in stats.path.name
    # The key is the shards' hashes: the other images, indexed as such, are another cache entry.
    key = cache_name(data, "train", ext)
    for name in original:
        (data / name).write_bytes((other / name).read_bytes())
        _vouch_for(data / name)
    assert cache_name(data, "train", ext) != key
    assert not np.allclose(reference_stats(data, "train", ext, log=lambda m: None).mu, stats.mu)


# ---------------------------------------------------------------------------------------------
# 11. One sample may not hold any number of members or bytes.

def test_a_sample_of_many_or_large_members_is_bad_and_never_held_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_module, "MAX_SAMPLE_BYTES", 4 << 20, raising=False)
    many = [(f"many.x{i}", b"1") for i in range(100)]                  # > 64 members
    large = [(f"large.x{i}", bytes(1 << 20)) for i in range(40)]        # 40 MiB of zeros, > 4 MiB
    members = (_samples(1, "a") + [("many.png", _png(1))] + many + [("large.png", _png(2))] + large
               + _samples(1, "z"))
    for gz in (False, True):
        data = _tar(members)
        data = gzip.compress(data, mtime=0) if gz else data
        tracemalloc.start()
        try:
            got = [(key, bad.kind if bad else None, str(bad) if bad else "")
                   for _, key, _, _, bad in read_samples(io.BytesIO(data), "bomb.tar", channels=3, resolution=8,
                                                         num_classes=0, require_label=False)]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [(k, kind) for k, kind, _ in got] == [("a0000", None), ("many", "oversized"), ("large", "oversized"),
                                                     ("z0000", None)], got
        assert "more than 64 members" in got[1][2] and "more than 4 MiB" in got[2][2]
        assert peak < 8 << 20, f"held {peak >> 20} MiB while deciding (gzip={gz})"
    assert len(gzip.compress(_tar(members), mtime=0)) < 200_000         # what a download would weigh


def test_index_shards_and_verify_report_an_oversized_sample(tmp_path, small_dir):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    bomb = _samples(3) + [("many.png", _png(1))] + [(f"many.x{i}", b"1") for i in range(100)]
    (shard_dir / "train-000000.tar.gz").write_bytes(gzip.compress(_tar(bomb), mtime=0))
    out = cli("index-shards", str(shard_dir), "--quiet", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "key many: sample has more than 64 members" in out.stderr and not (shard_dir / MANIFEST).exists()
    # A manifest that vouches for it: verify names it, the loader skips it and counts it.
    target = small_dir / "train-000000.tar"
    target.write_bytes(_tar(_samples(9) + [("many.png", _png(1))] + [(f"many.x{i}", b"1") for i in range(100)]))
    _vouch_for(target)
    problems, _ = verify_dir(small_dir, progress=False)
    assert problems == ["train-000000.tar key many: sample has more than 64 members"]
    ld = _loader(small_dir, batch_size=79, max_bad_fraction=0.2)
    ld.next()
    ld.next()                                        # counts are committed when a shard pass ends
    assert set(ld.bad_counts()) == {"oversized"}


# ---------------------------------------------------------------------------------------------
# 12. A manifest's numbers are bounded before anything is sized by them.

@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["splits"]["train"]["shards"][0].update(num_samples=10**11), r"lists 100000000000 samples, more than"),
    (lambda m: m["splits"]["train"].update(num_samples=81), r"split 'train' lists 81 samples, its shards 80"),
    (lambda m: m.update(resolution=10**9), r"'resolution' is 1000000000, expected an integer from 1 to 8192"),
    (lambda m: m.update(num_classes=10**12), r"'num_classes' is 1000000000000"),
    (lambda m: m["splits"]["train"]["shards"][0].update(bytes=10**30), r"'bytes' \(at most 2\*\*50\)"),
])
def test_manifest_numbers_are_bounded(small_dir, edit, problem):
    m = json.loads((small_dir / MANIFEST).read_text())
    edit(m)
    if m["splits"]["train"]["shards"][0]["num_samples"] > 10:
        m["splits"]["train"]["num_samples"] = sum(s["num_samples"] for s in m["splits"]["train"]["shards"])
    (small_dir / MANIFEST).write_text(json.dumps(m))
    t0 = time.perf_counter()
    for read in (read_manifest, ShardSet.resolve, lambda d: verify_dir(d, progress=False)):
        with pytest.raises(DataError, match=problem) as err:
            read(small_dir if read is not ShardSet.resolve else str(small_dir))
        assert "\n" not in str(err.value) and "ganpipe prepare" in str(err.value)
    assert time.perf_counter() - t0 < 1.0


def test_a_manifest_count_the_shard_can_hold_is_checked_without_listing_it(small_dir):
    # 60 000 samples fit in a 30 KiB gzip shard by the bound; the loader counts what is missing
    # (arithmetic, no list of them) and stops on the shard, as with any truncated shard.
    shard = small_dir / "train-000000.tar"
    _vouch_for(shard, num_samples=shard.stat().st_size * 1032 // 512)
    with pytest.raises(DataError, match=r"train-000000\.tar: \d{5} of \d{5} samples bad .*'truncated'"):
        for _ in range(20):
            _loader(small_dir, batch_size=79).next()


# ---------------------------------------------------------------------------------------------
# 13. A corrupt tar header is a corrupt shard: reported and counted, never a traceback or silence.

def _negative_size_tar(n: int, damaged_member: int) -> bytes:
    data = bytearray(_tar(_samples(n)))
    pos = 0
    for _ in range(damaged_member):                  # walk to the damaged member's header
        size = int(data[pos + 124:pos + 136].split(b"\0")[0] or b"0", 8)
        pos += 512 + (size + 511) // 512 * 512
    data[pos + 124:pos + 136] = b"-1000".ljust(11, b"\0") + b"\0"
    data[pos + 148:pos + 156] = b" " * 8
    data[pos + 148:pos + 156] = b"%06o\0 " % sum(data[pos:pos + 512])
    return bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_a_negative_tar_size_is_a_corrupt_shard(tmp_path, small_dir, gz):
    raw = _negative_size_tar(10, damaged_member=8)   # the header of sample 4's png
    raw = gzip.compress(raw, mtime=0) if gz else raw
    keys = []
    with pytest.raises(TruncatedTar, match="not a number"):
        for _, key, _, _, bad in read_samples(io.BytesIO(raw), "neg.tar", channels=3, resolution=8, num_classes=0,
                                              require_label=False):
            keys.append(key)
    assert keys == ["s0000", "s0001", "s0002"]       # s0003 may have had more members: dropped
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    (shard_dir / "train-000000.tar").write_bytes(raw)
    out = cli("index-shards", str(shard_dir), "--quiet", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "train-000000.tar: unreadable after 3 samples (TruncatedTar" in out.stderr
    target = small_dir / "train-000000.tar"
    target.write_bytes(raw)
    _vouch_for(target)
    out = cli("verify", str(small_dir), "--quiet", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "PROBLEM train-000000.tar: unreadable tar after 3 samples" in out.stdout
    assert "PROBLEM train-000000.tar: 3 samples, manifest says 10" in out.stdout
    ld = _loader(small_dir, batch_size=73, max_bad_fraction=0.75)
    for _ in range(2):
        ld.next()
    counts = ld.bad_counts()
    assert set(counts) == {"read_error", "truncated"} and counts["truncated"] == 7 * counts["read_error"]


# ---------------------------------------------------------------------------------------------
# 14. Names from the data are printed escaped.

FAKE_LINE = "\r\x1b[2KOK, 8 shards, 80 samples verified\x1b[8m"


def test_untrusted_names_reach_the_terminal_escaped(tmp_path, small_dir):
    target = small_dir / "train-000000.tar"
    evil = [(f"x{FAKE_LINE}.png", b"not a png"), ("y\udcff\udcfe.png", b"not a png either")]
    target.write_bytes(_tar(_samples(8) + evil))
    _vouch_for(target)
    # verify, with stdout encoded strictly as UTF-8: a subprocess, as the user runs it.
    out = cli("verify", str(small_dir), "--quiet", env={"PYTHONIOENCODING": "utf-8"}, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "\x1b" not in out.stdout and "\r" not in out.stdout
    assert "PROBLEM train-000000.tar key x\\r\\x1b[2KOK, 8 shards, 80 samples verified\\x1b[8m: undecodable" \
        in out.stdout
    assert "PROBLEM train-000000.tar key y\\xff\\xfe: undecodable" in out.stdout
    assert out.stdout.splitlines()[-1].startswith(f"{small_dir}: 2 problem(s)")
    # index-shards lists them the same way.
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    (shard_dir / "train-000000.tar").write_bytes(target.read_bytes())
    out = cli("index-shards", str(shard_dir), "--quiet", env={"PYTHONIOENCODING": "utf-8"}, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "\x1b" not in out.stderr
    assert "key y\\xff\\xfe: undecodable" in out.stderr and "key x\\r\\x1b[2KOK" in out.stderr
    # The loader's messages: a shard file whose name draws.
    shard = shard_dir / f"evil{FAKE_LINE}.tar"
    shard.write_bytes(_tar(evil))
    with pytest.raises(DataError) as err:
        StreamLoader(ShardSet.resolve(str(shard), resolution=8, channels=3), batch_size=2, rank=0, world_size=1,
                     num_workers=0, shuffle_buffer=0, max_bad_fraction=1.0).next()
    assert "\x1b" not in str(err.value) and "evil\\r\\x1b[2KOK" in str(err.value)
    # prepare: an unreadable image of a folder, by its name.
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "fine.png")
    (folder / f"bad{FAKE_LINE}.png").write_bytes(b"not an image")
    out = cli("prepare", "--source", f"folder:{folder}", "--out", str(tmp_path / "prepared"), "--resolution", "8",
              "--workers", "1", "--no-progress")
    assert "\x1b" not in out.stdout and "skipped unreadable image" in out.stdout and "bad\\r\\x1b[2KOK" in out.stdout
