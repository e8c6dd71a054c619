"""The shard directory's manifest and the sample format shared by prepare, verify and the loader.

A prepared directory holds `{split}-%06d.tar` shards (webdataset layout: `KEY.png`, `KEY.cls`)
and `manifest.json`, which is written last: a directory without it is not a dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
FORMAT = "ganpipe-shards"
FORMAT_VERSION = 1


class BadSample(ValueError):
    """A sample that cannot be used; `kind` is its counter name, the message says why."""

    def __init__(self, message: str, kind: str = "undecodable"):
        super().__init__(message)
        self.kind = kind


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write JSON via a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_manifest(data_dir: str | Path) -> dict:
    """Load and sanity-check DIR/manifest.json; errors say what to run."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a prepared data directory "
                                f"(create one with `ganpipe prepare --source ... --out {data_dir}`)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run `ganpipe prepare`") from None
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest (format={m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {m.get('format_version')} is not supported "
                         f"(this ganpipe reads version {FORMAT_VERSION}); re-run `ganpipe prepare`")
    return m


def manifest_hash(data_dir: str | Path) -> str:
    return sha256_file(Path(data_dir) / MANIFEST)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)   # lossless, deterministic bytes
    return buf.getvalue()


def decode_image(data: bytes, channels: int, resolution: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 CHW array of exactly (channels, resolution, resolution)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = np.asarray(img)
    except Exception as exc:  # PIL raises many types for broken data
        raise BadSample(f"undecodable image ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        raise BadSample(f"image dtype {arr.dtype}, expected 8-bit", "wrong_shape")
    expected = (resolution, resolution, channels)
    if arr.shape != expected:
        raise BadSample(f"image shape {arr.shape[2]}x{arr.shape[0]}x{arr.shape[1]} (CxHxW), "
                        f"expected {channels}x{resolution}x{resolution}", "wrong_shape")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_label(data: bytes | None, num_classes: int, required: bool) -> int:
    """`cls` bytes -> int label, -1 when absent and not required."""
    if data is None:
        if required:
            raise BadSample("missing label (.cls) but labels are required", "missing_label")
        return -1
    try:
        label = int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample(f"label {data[:20]!r} is not an integer", "bad_label") from None
    if num_classes and not 0 <= label < num_classes:
        raise BadSample(f"label {label} outside 0..{num_classes - 1}", "bad_label")
    return label


def iter_tar_samples(fileobj):
    """Yield (key, {ext: bytes}) from a tar stream, grouping consecutive members by key.

    Reads sequentially (mode "r|"), so it works on pipes; the file object is closed at the end.
    A truncated or corrupt tar raises tarfile.TarError/EOFError/OSError after the last whole sample.
    """
    key, files = None, {}
    with fileobj, tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            base, _, ext = name.partition(".")
            if base != key:
                if key is not None:
                    yield key, files
                key, files = base, {}
            files[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, files
