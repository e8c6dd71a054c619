"""Shard samples: reading tar shards, and the one decoder of a sample used by every reader.

    for index, key, image, label, bad in read_samples(open("data/mnist/train-000000.tar", "rb"),
                                                      "train-000000.tar", channels=1, resolution=28,
                                                      num_classes=10, require_label=False):
        ...                              # image uint8 CHW, or None with `bad` (a BadSample) saying why

A shard is a webdataset tar, plain or gzip-compressed (`.tar.gz`, detected by its magic bytes),
grouped into samples by webdataset's own rules (`sample_key`; tests/test_webdataset_rules.py runs
webdataset on the same tars and asserts the same samples): the members of one sample are
consecutive and share a key, the member path up to the first dot of its file name (`a/1.png`,
`a/1.seg.png` and `a/1.cls` are sample `a/1` with entries `png`, `seg.png`, `cls`; `b/1.png` is
another one), and the rest of the name, lower-cased, is the entry's extension. The image entry
may be PNG (what `ganpipe prepare` writes, via `encode_png`), JPEG or WebP; `cls` holds the class
index as text; `json`, where `ganpipe prepare` wrote it, says where the sample came from
(`sample_source`), and every other entry is ignored. The loader, `ganpipe verify` and whole-split
reading all go through `read_samples` and `decode_sample`, so they agree on which samples are
good, and name a bad one with `bad_sample`: its key and, where known, its source.

No byte sequence may crash or exhaust the process. The tar reader bounds what it holds (a
sample's members and bytes, a member, a name record: the MAX_* constants below), and a header it
cannot trust (bad checksum, a size that is not octal digits) ends the shard as `TruncatedTar`,
counted, never a silent end or a traceback. torchvision's libpng binding dies with SIGSEGV
on any libpng error raised while it reads the image rows (a flipped bit in the compressed data, a
wrong filter byte, too little data: 35% of the fuzz's damaged images), and every decoder allocates
what the header claims before it looks further. So each image is checked before it is decoded:
its header's size and channels against the expected shape (a 74-byte PNG claiming 100000x100000
is refused before anything is allocated) and, for PNG, every chunk's CRC, the chunk order and the
image stream (inflated no further than the header implies: exact length, checksum, row filters).
Then PNG is decoded with PIL, which raises on broken data where torchvision crashes, and JPEG and
WebP with torchvision, whose bindings for those raise too. `python tools/fuzz_shards.py 3000 0`
fuzzes every reader and measures the cost: the checks take 5-15 us per MNIST PNG, and the
shard reader needs about 1.4x the CPU per sample it needed with unchecked torchvision (the same as
torchvision after these checks; PIL's advantage is that it cannot crash). With `data.cache_mb`,
small datasets are decoded once per worker anyway.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import warnings
import zlib
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline.errors import BadSample, TruncatedTar, printable

# Extensions of the image entry, in the order looked for when a sample has more than one.
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")

# A tar member larger than this ends the shard (TruncatedTar): no image a shard can hold at
# data.resolution <= 8192 comes near it, and a gzip bomb must not be read into memory.
MAX_MEMBER_BYTES = 256 << 20
# One sample's members together: more bytes or more members than this make the sample bad
# (`OversizedSample`, counted as "oversized"), and the reader holds no more than this while it
# finds out: a member that would go over is skipped unread. A sample is an image, a class and
# perhaps a few more entries (a mask, a caption, JSON).
MAX_SAMPLE_BYTES = MAX_MEMBER_BYTES
MAX_SAMPLE_MEMBERS = 64
# A PAX or GNU long-name record above this is not a file name: a corrupt or hostile header.
MAX_NAME_RECORD_BYTES = 64 << 10


# ---------------------------------------------------------------------------------------------
# Encoding (prepare).

def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)   # lossless, deterministic bytes
    return buf.getvalue()


def encode_image(image: Image.Image, ext: str, quality: int = 95) -> bytes:
    """An L or RGB image as the entry `ext` of a sample: png (lossless), jpg or webp at `quality`
    (1..100; webp 100 is lossless WebP). Deterministic: the same pixels give the same bytes."""
    if ext == "png":
        return encode_png(image)
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, format="JPEG", quality=quality, optimize=True)
    elif ext == "webp":
        if image.mode != "RGB":
            raise ValueError(f"WebP stores RGB, not mode {image.mode}: use png or jpg for greyscale")
        image.save(buf, format="WEBP", quality=quality, lossless=quality == 100, method=4)
    else:
        raise ValueError(f"cannot encode an image entry as {ext!r} (png, jpg or webp)")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Header checks: the cheap part of a decode, done before any decoder allocates or reads rows.

def _bad(message: str) -> BadSample:
    return BadSample(f"undecodable image ({message})")


def _check_size(fmt: str, width: int, height: int, channels: int | None, expected_channels: int,
                resolution: int) -> None:
    """The header's claim against the expected shape (channels None: not known from the header)."""
    if (width, height) != (resolution, resolution) or channels not in (None, expected_channels):
        got = f"{channels if channels is not None else '?'}x{height}x{width}"
        raise BadSample(f"image shape {got} (CxHxW, {fmt} header), "
                        f"expected {expected_channels}x{resolution}x{resolution}", "wrong_shape")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> (samples per pixel in the file, channels decoded, allowed bit depths); the
# channels of a palette image depend on its transparency
_PNG_COLOUR = {0: (1, 1, (1, 2, 4, 8, 16)), 2: (3, 3, (8, 16)), 3: (1, None, (1, 2, 4, 8)),
               4: (2, 2, (8, 16)), 6: (4, 4, (8, 16))}
_CHUNK_HEAD, _CRC, _IHDR = struct.Struct(">I4s"), struct.Struct(">I"), struct.Struct(">IIBBBBB")
_PNG_FILTERS = bytes(range(5))
# Adam7 passes: (x0, y0, dx, dy).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_rows(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> list[tuple[int, int]]:
    """(rows, bytes per row without the filter byte) of each pass of the inflated image stream."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    out = []
    for x0, y0, dx, dy in passes:
        w, h = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if w and h:
            out.append((h, (w * bits_per_pixel + 7) // 8))
    return out


def _check_png(data: bytes, channels: int, resolution: int) -> None:
    """Raise BadSample unless `data` is a PNG of the expected size whose chunks and image stream
    are intact: every CRC (PIL checks none of the IDAT ones), IHDR first, consecutive IDATs, IEND
    last, and a deflate stream with a valid checksum holding exactly the rows the header implies
    (PIL stops reading once it has them, so a forged stream would otherwise decode to garbage)."""
    view = memoryview(data)                # CRCs and IDAT bodies without copies
    pos, n = 8, len(data)
    ihdr, idat, seen_plte, idat_done, has_trns = b"", [], False, False, False
    while True:
        if pos + 12 > n:
            raise _bad("PNG ends before its IEND chunk")
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        end = pos + 12 + length
        if end > n:
            raise _bad(f"PNG chunk {kind!r} of {length} bytes runs past the end of the data")
        if zlib.crc32(view[pos + 4:end - 4]) != _CRC.unpack_from(data, end - 4)[0]:
            raise _bad(f"PNG chunk {kind!r} fails its CRC check")
        if not (kind.isalpha() and kind.isascii()):
            raise _bad(f"PNG chunk type {kind!r} is not four letters")
        body, pos = view[pos + 8:end - 4], end
        if not ihdr:
            if kind != b"IHDR" or length != 13:
                raise _bad("PNG does not start with an IHDR chunk")
            ihdr = bytes(body)
        elif kind == b"IDAT":
            if idat_done:
                raise _bad("PNG has IDAT chunks that are not consecutive")
            idat.append(body)
        elif kind == b"IEND":
            break
        else:
            idat_done = bool(idat)
            if kind == b"PLTE":
                if seen_plte or idat or length == 0 or length % 3 or length > 768:
                    raise _bad("PNG has a misplaced or malformed PLTE chunk")
                seen_plte = True
            elif kind == b"tRNS":
                has_trns = True
            elif kind[0] < 0x61:               # an upper-case first letter marks a critical chunk
                raise _bad(f"PNG has an unexpected critical chunk {kind.decode()}")
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack(ihdr)
    if colour not in _PNG_COLOUR or depth not in _PNG_COLOUR[colour][2] or compression or filtering \
            or interlace > 1 or not width or not height:
        raise _bad(f"PNG header is invalid (bit depth {depth}, colour type {colour}, "
                   f"compression {compression}, filter {filtering}, interlace {interlace})")
    samples, decoded_channels, _ = _PNG_COLOUR[colour]
    _check_size("PNG", width, height, None if has_trns else decoded_channels, channels, resolution)
    if depth == 16:
        raise BadSample("image is 16-bit PNG, expected 8-bit", "wrong_shape")
    if not idat or (colour == 3 and not seen_plte):
        raise _bad("PNG has no image data" if not idat else "palette PNG without a PLTE chunk")
    # Inflate once, never past the size the header implies (a bomb stops there): the exact length,
    # the stream's checksum and every row's filter type (0..4).
    rows = _png_rows(width, height, samples * depth, bool(interlace))
    expected = sum(h * (1 + w) for h, w in rows)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(idat[0] if len(idat) == 1 else b"".join(idat), expected)
        if len(raw) == expected and not inflater.eof and inflater.decompress(inflater.unconsumed_tail, 1):
            raise _bad(f"PNG image data holds more than the {expected} bytes its header implies")
    except zlib.error as exc:
        raise _bad(f"PNG image data is corrupt: {exc}") from None
    if len(raw) < expected or not inflater.eof:
        raise _bad(f"PNG image data is truncated ({len(raw)} of the {expected} bytes its header implies)")
    if inflater.unused_data:
        raise _bad("PNG image data is followed by extra bytes")
    offset = 0
    for h, w in rows:
        if raw[offset:offset + h * (1 + w):1 + w].translate(None, _PNG_FILTERS):   # left: not 0..4
            raise _bad("PNG has an invalid row filter type")
        offset += h * (1 + w)

# SOF markers that carry the frame size: C0..CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _check_jpeg(data: bytes, channels: int, resolution: int) -> None:
    """Walk the JPEG markers up to the first scan; check the frame header's size and components."""
    pos, n = 2, len(data)
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            raise _bad("JPEG ends or breaks before its first scan")
        marker = data[pos + 1]
        if marker == 0xFF:                          # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):    # TEM, RSTn: no length
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            raise _bad("JPEG has no frame header before its end")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            raise _bad(f"JPEG segment 0x{marker:02X} of {length} bytes runs past the end of the data")
        if marker == 0xDA:
            raise _bad("JPEG scan before any frame header")
        if marker in _JPEG_SOF:
            if length < 8:
                raise _bad("JPEG frame header is truncated")
            precision, components = data[pos + 4], data[pos + 9]
            height, width = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            if length != 8 + 3 * components or components not in (1, 3, 4) or not width or not height:
                raise _bad(f"JPEG frame header is invalid ({components} components, {width}x{height})")
            _check_size("JPEG", width, height, components, channels, resolution)
            if precision != 8:
                raise BadSample(f"image is {precision}-bit JPEG, expected 8-bit", "wrong_shape")
            return
        pos += 2 + length


def _check_webp(data: bytes, channels: int, resolution: int) -> None:
    """RIFF size, then the canvas size from the VP8, VP8L or VP8X header."""
    n = len(data)
    if n < 30 or data[8:12] != b"WEBP":
        raise _bad("WebP header is truncated")
    if 8 + int.from_bytes(data[4:8], "little") > n:
        raise _bad("WebP data is shorter than its RIFF header says")
    kind, body = data[12:16], data[20:]
    if kind == b"VP8 ":
        if body[0] & 1 or body[3:6] != b"\x9d\x01\x2a":
            raise _bad("WebP VP8 frame is not a key frame")
        width, height = int.from_bytes(body[6:8], "little") & 0x3FFF, int.from_bytes(body[8:10], "little") & 0x3FFF
        alpha = False
    elif kind == b"VP8L":
        bits = int.from_bytes(body[1:5], "little")
        if body[0] != 0x2F or bits >> 29:
            raise _bad("WebP VP8L header is invalid")
        width, height, alpha = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)
    elif kind == b"VP8X":
        flags = body[0]
        if flags & 0x02:
            raise _bad("animated WebP")
        width, height = int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
        alpha = bool(flags & 0x10)
    else:
        raise _bad(f"WebP chunk {kind!r} is not VP8, VP8L or VP8X")
    _check_size("WebP", width, height, 4 if alpha else 3, channels, resolution)


def check_image_header(data: bytes, channels: int, resolution: int) -> None:
    """Raise BadSample unless `data` is PNG, JPEG or WebP whose header says (channels, resolution)."""
    if data.startswith(_PNG_SIGNATURE):
        _check_png(data, channels, resolution)
    elif data.startswith(b"\xff\xd8"):
        _check_jpeg(data, channels, resolution)
    elif data.startswith(b"RIFF"):
        _check_webp(data, channels, resolution)
    else:
        raise _bad(f"not PNG, JPEG or WebP: starts with {bytes(data[:8])!r}")


# ---------------------------------------------------------------------------------------------
# Decoding (every reader).

def _decode_png(data: bytes) -> np.ndarray:
    """PNG -> uint8 CHW with PIL, whose PNG decoder raises where torchvision's crashes."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        image.load()
        if image.mode == "1":
            image = image.convert("L")
        elif image.mode in ("P", "PA"):
            image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        arr = np.array(image)              # writable, unlike np.asarray's view of PIL's bytes
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _decode_torchvision(data: bytes) -> np.ndarray:
    """JPEG or WebP -> uint8 CHW with torchvision (about twice as fast as PIL on small images;
    these two bindings report broken data as exceptions: none crashed in the fuzz)."""
    # Imported here: importing torchvision costs about 2.5 s (its ops pull in torch's compiler
    # stack), which every `ganpipe` process would otherwise pay at start-up, PNG data or not.
    from torchvision.io import ImageReadMode, decode_image as _tv_decode_image

    # Its deprecation (since 0.29, which we pin) is not news to the user at every sample.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                mode=ImageReadMode.UNCHANGED).numpy()


def decode_image(data: bytes, channels: int, resolution: int) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 CHW array of exactly (channels, resolution, resolution)."""
    check_image_header(data, channels, resolution)
    try:
        arr = _decode_png(data) if data.startswith(_PNG_SIGNATURE) else _decode_torchvision(data)
    except Exception as exc:  # codec errors on broken data come in many types
        raise _bad(f"{type(exc).__name__}: {printable(str(exc).splitlines()[0][:120]) if str(exc) else ''}") from None
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


def decode_sample(files: dict[str, bytes], *, channels: int, resolution: int, num_classes: int,
                  require_label: bool) -> tuple[np.ndarray, int]:
    """One sample's {ext: bytes} -> (uint8 CHW image, label or -1); `BadSample` says what is wrong."""
    if isinstance(files, OversizedSample):
        raise BadSample(files.problem, "oversized")
    for ext in IMAGE_EXTS:
        if ext in files:
            break
    else:
        has = ", ".join(printable(e) for e in sorted(files)[:10]) + (", ..." if len(files) > 10 else "")
        raise BadSample(f"no image entry (.{', .'.join(IMAGE_EXTS)}); has: {has or 'nothing'}")
    image = decode_image(files[ext], channels, resolution)
    return image, decode_label(files.get("cls"), num_classes, require_label)


# ---------------------------------------------------------------------------------------------
# Reading tar shards.

_ZERO_BLOCK = bytes(512)


class _Prefixed:
    """A stream that returns `head` first, then the rest of `stream` (a peek that works on pipes)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        head, self.head = self.head, b""
        if n is not None and 0 <= n <= len(head):
            self.head = head[n:]
            return head[:n]
        return head + self.stream.read(-1 if n is None or n < 0 else n - len(head))

    def close(self) -> None:
        self.stream.close()


def _octal(field: bytes, what: str, name: str) -> int:
    """A numeric header field: octal digits, NUL- or space-terminated (as tarfile reads it, less
    the signs and underscores Python's int() would also take)."""
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits.strip(b"01234567"):
        raise TruncatedTar(f"{printable(name)}: tar header {what} {bytes(field)!r} is not a number "
                           "(octal digits expected; corrupt or not a tar)")
    return int(digits or b"0", 8)


def _text(field: bytes) -> str:
    """A name field as Python's tarfile reads it: up to the first NUL, UTF-8, undecodable bytes
    kept as surrogates (two different names never become one)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(data: bytes, name: str) -> str | None:
    """The `path` record of a PAX extended header ("LENGTH key=value\n" records; a value may hold
    newlines, so records are cut by their length, not at newlines)."""
    path, pos, n = None, 0, len(data)
    while pos < n and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        end = pos + (int(digits) if digits.isdigit() else 0)
        if end <= space + 1 or end > n or data[end - 1] != 0x0A:
            raise TruncatedTar(f"{printable(name)}: malformed PAX header record at byte {pos} (corrupt tar)")
        keyword, _, value = data[space + 1:end - 1].partition(b"=")
        if keyword == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos = end
    return path


class _Member:
    """A regular file of a tar stream: its name and size; `read()` returns its bytes. A member the
    caller does not read is skipped in bounded chunks, never held whole."""

    __slots__ = ("name", "size", "_stream", "_shard", "_consumed")

    def __init__(self, name: str, size: int, stream, shard: str):
        self.name, self.size, self._stream, self._shard, self._consumed = name, size, stream, shard, False

    def read(self) -> bytes:
        self._consumed = True
        return _read_data(self._stream, self.size, self._shard)

    def skip(self) -> None:
        if self._consumed:
            return
        self._consumed = True
        left = (self.size + 511) & ~511
        while left:
            got = len(self._stream.read(min(left, 1 << 20)))
            if not got:
                raise TruncatedTar(f"{printable(self._shard)}: truncated data ({self.size} bytes announced)")
            left -= got


def _read_data(stream, size: int, shard: str) -> bytes:
    """The `size` bytes of a member and its padding to the next 512-byte block, from `stream`."""
    padded = (size + 511) & ~511
    data = stream.read(padded)
    if len(data) < padded:
        raise TruncatedTar(f"{printable(shard)}: truncated data ({len(data)} of {padded} bytes)")
    return data[:size]


def _tar_members(stream, name: str) -> Iterator[_Member]:
    """The regular files of a tar stream, read sequentially, as `_Member`s.

    A small reader of our own: the standard `tarfile` module parses every header field in Python
    and costs more than decoding a small PNG. This reads only what a shard needs (name, size,
    type), checks every header's checksum (unsigned, or signed as old Sun tars wrote it), and
    understands ustar name prefixes and the PAX and GNU long-name records other writers emit,
    giving the names `tarfile` (hence webdataset) gives. Where `tarfile` silently ends the archive
    at a damaged header, this raises: a short read, a bad header (a checksum that does not add
    up, a size that is not an octal number or is negative), a member over MAX_MEMBER_BYTES or a
    name record over MAX_NAME_RECORD_BYTES raises `TruncatedTar`, so lost samples are counted,
    not unnoticed. A member the caller did not `read()` is skipped when the next one is asked for.
    """
    long_name, shown = None, printable(name)
    while True:
        header = stream.read(512)
        if len(header) == 0:
            return                                   # no end-of-archive blocks: tolerate
        if len(header) < 512:
            raise TruncatedTar(f"{shown}: truncated header")
        if header == _ZERO_BLOCK:
            return                                   # end of archive
        checksum = _octal(header[148:156], "checksum", name)
        if checksum != sum(header[:148]) + 256 + sum(header[156:]) and \
                checksum != 256 + sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]):
            raise TruncatedTar(f"{shown}: bad tar header checksum (corrupt or not a tar)")
        size_field = header[124:136]
        if size_field[0] == 0xFF:                    # GNU base-256, negative
            raise TruncatedTar(f"{shown}: tar header size is negative (corrupt tar)")
        size = (int.from_bytes(size_field[1:], "big") if size_field[0] & 0x80
                else _octal(size_field, "size", name))
        if size > MAX_MEMBER_BYTES:
            raise TruncatedTar(f"{shown}: a member of {size} bytes, above the {MAX_MEMBER_BYTES >> 20} MiB "
                               "a shard entry may have (corrupt, or not an image shard)")
        kind = header[156:157]
        if kind in (b"x", b"L"):                     # PAX extended header / GNU long name of the next member
            if size > MAX_NAME_RECORD_BYTES:
                raise TruncatedTar(f"{shown}: a name record of {size} bytes (corrupt tar)")
            data = _read_data(stream, size, name)
            long_name = (_pax_path(data, name) or long_name) if kind == b"x" else _text(data)
            continue
        if kind not in (b"0", b"\0", b"7"):          # directories, links, global headers: skip
            long_name = None
            _Member("", size, stream, name).skip()
            continue
        if long_name is not None:
            member, long_name = long_name, None
        else:
            # tarfile joins a non-empty prefix field whatever the magic says; so do we
            member, prefix = _text(header[:100]), _text(header[345:500])
            if prefix:
                member = prefix + "/" + member
        entry = _Member(member, size, stream, name)
        yield entry
        if not entry._consumed:
            entry.skip()


class OversizedSample(dict):
    """The files of a sample with more members or bytes than a sample may have: empty (what was
    read is dropped, the rest never read), with `problem` saying which bound it broke."""

    def __init__(self, problem: str):
        super().__init__()
        self.problem = problem


def _open_tar_stream(fileobj, name: str):
    """`fileobj` itself, or a gzip reader over it when it starts with the gzip magic bytes."""
    head = fileobj.read(2)
    stream = _Prefixed(head, fileobj)
    if head != b"\x1f\x8b":
        return stream
    return gzip.GzipFile(fileobj=stream, mode="rb")


def sample_key(member: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member by webdataset's rule, or None when it belongs to no sample.

    The key is the path up to the first dot of the file name, the extension the rest (`d/x.seg.png`
    is key `d/x`, extension `seg.png`; dots in directory names do not count). A file name without a
    dot, or a path ending in `/`, belongs to no sample and is skipped. A file name that starts with a
    dot is webdataset's corner: the key is then the path up to and including the last slash, when
    the last directory name has no dot (`d/.png` is key `d/`), else nothing. The extension is
    lower-cased by the caller, the key never.
    """
    slash = member.rfind("/")
    dot = member.find(".", slash + 1)
    if dot < 0:
        return None
    if dot > slash + 1:
        return member[:dot], member[dot + 1:]
    if slash < 0 or "." in member[member.rfind("/", 0, slash) + 1:slash]:
        return None
    return member[:slash + 1], member[dot + 1:]


def is_metadata(member: str) -> bool:
    """webdataset skips these members: a top-level `__name__` file, anything under a top-level
    `__name__/` directory."""
    first, slash, _ = member.partition("/")
    return first.startswith("__") and first.endswith("__") and (not slash or len(first) >= 4)


# Names webdataset gives a sample's own fields: an entry with one of them as its extension makes
# webdataset raise ("duplicate file name"); skipping handlers drop that entry, and so do we.
RESERVED_EXTS = frozenset(("__key__", "__url__", "__local_path__"))


def iter_tar_samples(fileobj, name: str = "tar") -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) from a tar or tar.gz stream, grouping consecutive members by key.

    Keys, extensions and skipped members are webdataset's (`sample_key`, `is_metadata`,
    RESERVED_EXTS); a sample ends where the key changes, so a key that comes back later is a
    second sample (`read_samples` counts it as a duplicate). Where webdataset raises on a member
    whose extension the current sample already has, this starts a new sample with the same key
    (a counted duplicate again), so the good samples are those webdataset yields with a skipping
    handler. A sample with more than MAX_SAMPLE_MEMBERS members or MAX_SAMPLE_BYTES bytes comes
    out as an empty `OversizedSample` (every consecutive member with its key belongs to it);
    members skipped or past a bound are never held in memory. Works on pipes (reads
    sequentially); the file object is closed at the end (a pipe's exit status is checked then; a
    reader that stops early closes it quietly). A truncated or corrupt tar (or gzip stream) raises
    `TruncatedTar` after the last whole sample (a partial one is dropped).
    """
    key, files, members, held = None, {}, 0, 0
    try:
        stream = _open_tar_stream(fileobj, name)
        try:
            for member in _tar_members(stream, name):
                if is_metadata(member.name) or (split := sample_key(member.name)) is None:
                    continue
                base, ext = split[0], split[1].lower()
                oversized = isinstance(files, OversizedSample)
                if base != key or (ext in files and not oversized):
                    if key is not None:
                        yield key, files
                    key, files, members, held = base, {}, 0, 0
                elif oversized:
                    continue                         # the rest of a sample already over a bound
                members, held = members + 1, held + member.size
                if members > MAX_SAMPLE_MEMBERS or held > MAX_SAMPLE_BYTES:
                    files = OversizedSample(
                        f"sample has more than {MAX_SAMPLE_MEMBERS} members" if members > MAX_SAMPLE_MEMBERS else
                        f"sample holds more than {MAX_SAMPLE_BYTES >> 20} MiB")
                elif ext not in RESERVED_EXTS:
                    files[ext] = member.read()
            if isinstance(stream, gzip.GzipFile):
                # The gzip CRC is checked at the end of the stream, after the tar's end blocks:
                # read on (a little) so that damage it catches is not missed.
                for _ in range(16):
                    if not stream.read(1 << 16):
                        break
        except (zlib.error, EOFError, gzip.BadGzipFile) as exc:
            if isinstance(exc, TruncatedTar):
                raise
            raise TruncatedTar(f"{printable(name)}: corrupt or truncated gzip stream "
                               f"({type(exc).__name__}: {exc})") from None
    except GeneratorExit:
        # Stopped early: a pipe's command may now die of SIGPIPE or report a write error; no news.
        try:
            fileobj.close()
        except Exception:
            pass
        raise
    except BaseException:
        try:
            fileobj.close()
        except Exception:
            pass
        raise
    fileobj.close()
    if key is not None:
        yield key, files


# A `json` entry longer than this is not ganpipe's small source record: not parsed.
MAX_SOURCE_RECORD_BYTES = 64 << 10


def sample_source(files: dict[str, bytes]) -> str | None:
    """Where a sample came from, as `ganpipe prepare` records it in the sample's `json` entry
    (`{"source": "cats/001.jpg", ...}`: a path under a folder source, an index, an hf split/row),
    or None. Read for bad samples only: a good sample costs nothing."""
    data = files.get("json")
    if not data or len(data) > MAX_SOURCE_RECORD_BYTES:
        return None
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):        # not JSON (or not UTF-8), or nested too deep
        return None
    source = record.get("source") if isinstance(record, dict) else None
    return str(source) if isinstance(source, (str, int)) and not isinstance(source, bool) else None


def bad_sample(key: str, bad: BadSample) -> str:
    """'key K: what is wrong (source S)', printable: how messages name a bad sample that
    `read_samples` gave, with its source where the sample records one."""
    source = getattr(bad, "source", None)
    return f"key {printable(key)}: {bad}" + (f" (source {printable(source)})" if source else "")


def key_digest(key: str) -> bytes:
    """A short stand-in for a sample key in a set of the keys seen (they may be 64 KiB each)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def read_samples(fileobj, name: str, *, channels: int, resolution: int, num_classes: int,
                 require_label: bool, select: Callable[[int], bool] | None = None
                 ) -> Iterator[tuple[int, str, np.ndarray | None, int, BadSample | None]]:
    """(index, key, image, label, bad) of each sample of a shard, decoded with `decode_sample`.

    `index` counts every sample in file order; `select(index)` False skips one undecoded. A bad
    sample comes out with image None, label -1 and `bad` (kind "duplicate" for a key an earlier
    sample of the shard had: webdataset would merge or reorder them, so it is skipped, not kept
    twice), whose `source` attribute is the sample's `sample_source` (None when unknown). A
    truncated or corrupt tar raises `TruncatedTar` after the last whole sample.
    """
    seen: set[bytes] = set()        # digests: a shard of many long keys must not fill the memory
    for index, (key, files) in enumerate(iter_tar_samples(fileobj, name)):
        digest = key_digest(key)
        duplicate = digest in seen
        seen.add(digest)
        if select is not None and not select(index):
            continue
        try:
            if duplicate:
                raise BadSample("duplicate key: an earlier sample of this shard has the same key", "duplicate")
            image, label = decode_sample(files, channels=channels, resolution=resolution,
                                         num_classes=num_classes, require_label=require_label)
        except BadSample as exc:
            exc.source = sample_source(files)
            yield index, key, None, -1, exc
        else:
            yield index, key, image, label, None
