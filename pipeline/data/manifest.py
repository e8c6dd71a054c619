"""The shard directory's manifest and the sample format shared by prepare, verify and the loader.

A prepared directory holds `{split}-%06d.tar` shards (webdataset layout: `KEY.png`, `KEY.cls`)
and `manifest.json`, which is written last: a directory without it is not a dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
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


def _pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _codec():
    """The fastest decoder available: torchvision's libpng/libjpeg binding (about half PIL's cost
    on small images; deprecated since torchvision 0.29, which we pin), else PIL."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_image as tv_decode
    except ImportError:
        return _pil_decode

    def decode(data: bytes) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.UNCHANGED).numpy()
    return decode


_decode = None


def decode_image(data: bytes, channels: int, resolution: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 CHW array of exactly (channels, resolution, resolution)."""
    global _decode
    if _decode is None:
        _decode = _codec()
    try:
        arr = _decode(data)
    except Exception as exc:  # codec errors on broken data come in many types
        raise BadSample(f"undecodable image ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if arr.dtype != np.uint8:
        raise BadSample(f"image dtype {arr.dtype}, expected 8-bit", "wrong_shape")
    expected = (channels, resolution, resolution)
    if arr.shape != expected:
        raise BadSample(f"image shape {'x'.join(map(str, arr.shape))} (CxHxW), "
                        f"expected {'x'.join(map(str, expected))}", "wrong_shape")
    return arr


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


def _tar_members(stream, name: str):
    """(member name, bytes) of the regular files in a tar stream, read sequentially.

    A small reader of our own: the standard `tarfile` module parses every header field in Python
    and costs more than decoding a small PNG. This reads only what a shard needs (name, size,
    type), checks every header's checksum, and understands the PAX and GNU long-name records other
    writers emit. A short read or a bad checksum raises `TruncatedTar`.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) == 0:
            return                                   # no end-of-archive blocks: tolerate
        if len(header) < 512:
            raise TruncatedTar(f"{name}: truncated header")
        if header == _ZERO_BLOCK:
            return                                   # end of archive
        stored = header[148:156].split(b"\0", 1)[0].strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            raise TruncatedTar(f"{name}: bad tar header checksum (corrupt or not a tar)")
        size_field = header[124:136]
        size = (int.from_bytes(size_field[1:], "big") if size_field[0] & 0x80
                else int(size_field.split(b"\0", 1)[0].strip() or b"0", 8))
        kind = header[156:157]
        padded = (size + 511) & ~511
        data = stream.read(padded)
        if len(data) < padded:
            raise TruncatedTar(f"{name}: truncated data ({len(data)} of {padded} bytes)")
        data = data[:size]
        if kind == b"x":                             # PAX extended header for the next member
            for record in data.decode("utf-8", "replace").split("\n"):
                _, _, kv = record.partition(" ")
                if kv.startswith("path="):
                    long_name = kv[5:]
            continue
        if kind == b"L":                             # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind not in (b"0", b"\0", b"7"):          # directories, links, global headers: skip
            long_name = None
            continue
        if long_name is not None:
            member, long_name = long_name, None
        else:
            member = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and prefix:
                member = prefix.decode("utf-8", "replace") + "/" + member
        yield member, data


_ZERO_BLOCK = bytes(512)


class TruncatedTar(EOFError):
    """A tar stream that ends early or holds a corrupt header."""


def iter_tar_samples(fileobj, name: str = "tar"):
    """Yield (key, {ext: bytes}) from a tar stream, grouping consecutive members by key.

    Works on pipes (reads sequentially); the file object is closed at the end. A truncated or
    corrupt tar raises `TruncatedTar` after the last whole sample (a partial one is dropped).
    """
    key, files = None, {}
    with fileobj:
        for member, data in _tar_members(fileobj, name):
            base, _, ext = member.rsplit("/", 1)[-1].partition(".")
            if base != key:
                if key is not None:
                    yield key, files
                key, files = base, {}
            files[ext] = data
    if key is not None:
        yield key, files
