"""The one way to turn (generator, seed, index range, labels) into images: `ganpipe sample`, the
trainer's tick grid and `ganpipe eval` all call `images()` here, and one grid writer serves them.

    ganpipe sample --snapshot RUN/snapshots/snapshot-000200000.json --num 64 --out grid.png
    ganpipe sample --snapshot ... --num 1000 --start 5000 --out samples/ --label 3 --seed 1
    ganpipe sample --snapshot ... --num 64 --psi 0.7 --cutoff 8 --out truncated.png
    ganpipe sample --snapshot ... --num 64 --generator raw --out raw.png      # the raw G (train.snapshot_raw)
    ganpipe sample --snapshot ... --num 16 --label cat --out cats.png         # a class by name or index

    x = images(G, seed=0, start=0, count=64)           # float32 (64, C, H, W) in [-1, 1], on the CPU
    grid = save_grid(x, RUN / "samples" / "fakes-000004000.png")
    u8 = to_uint8(x)                                   # what a saved PNG holds; what eval scores
    refs = parse_image_list("3,7,9:0-3")               # images by (seed, index): seed 3 and 7's image 0, seed 9's 0..3
    x = images_of(G, refs)                             # the very images `ganpipe sample` writes for them
    z, noise, labels = inputs_of(G, refs)              # and the inputs they are made from (video, figures)

The convention: image i of seed S is made from a `torch.Generator` seeded by (S, i) alone (mixed
by numpy's SeedSequence), which draws the latent z (z_dim normals) and then, for networks with
noise inputs (stylegan2), every per-pixel noise map, on the CPU. Labels are i % num_classes for
conditional networks unless one class is fixed or a class distribution is given (`classes`, a
`LabelDistribution`: eval's `--labels data` draws image i's class from the training data's class
weights at a number that depends on (S, i) alone); `ganpipe sample`, the trainer's grids and the
figures keep i % num_classes, so a grid shows every class alike. So image i depends only on
(S, i, label): not on `--batch`, not on `--start`, not on the number of processes, not on what
was generated before in the same process and not on torch's global RNG (which is left untouched).

Bit-identical, not just the same image: on the CPU, matmul and conv kernels give bitwise different
rows for different batch sizes (by up to about 1e-5; `tests/test_generate.py` checks the images do
not depend on the batch). So G always runs on the
same index-aligned micro-batches of `MICRO_BATCH` images, [0, 16), [16, 32), ..., each computed
from exactly the same inputs whatever range was asked for (the images of a micro-batch outside
the range are computed and dropped); `batch` only groups how many images are drawn and moved to
the device at once. This holds for one device type, library build and thread count: a GPU gives
other bits than a CPU. Changing `MICRO_BATCH` or how inputs are drawn changes images, hence
`SEEDING`, which ganpipe eval records as part of the protocol.

Truncation (`psi`, `cutoff`): psi = 1 leaves the images bit for bit as without it. Otherwise a
generator that truncates in w (stylegan2, `G.truncation == "w"`) moves the ws of its first
`cutoff` layers (all when None) to w_avg + psi (w - w_avg); a generator with a `truncate_z(z, psi)`
method (a per-row, deterministic map, e.g. BigGAN's truncation trick) gets its latents passed
through it; any other generator refuses psi != 1 naming its family. Truncation acts per image, so
the properties above hold for every psi; eval records psi and cutoff as part of the protocol.

Class names (`--label cat`) come from the manifest of the data the snapshot was trained on (its
record's `data_path`, as `ganpipe prepare` wrote it); any other integer is a class index, so a
name wins where classes are named by numbers (`--label 1` of classes "1", "10", "2" is class 0).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.io import atomic_path

MICRO_BATCH = 16           # images per G forward, aligned to multiples of it (see the docstring)
SEEDING = "seed-index-v1"  # name of this convention, recorded with every score


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image `index` of `seed` (SeedSequence mixes them: no two pairs collide
    in practice, and neighbouring seeds give unrelated streams)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed ({seed}) and image index ({index}) must be >= 0")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def draw(G: torch.nn.Module, seed: int, start: int, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CPU inputs of images start..start+count-1: z (count, z_dim) and one (count, *shape) tensor per
    entry of `G.noise_shapes()` (an empty list for networks without noise inputs)."""
    return _draw(G.z_dim, G.noise_shapes(), seed, start, count)


def latents(seed: int, start: int, count: int, z_dim: int) -> torch.Tensor:
    """Latents of images start..start+count-1 of `seed`, (count, z_dim), as `images()` draws them."""
    return _draw(z_dim, [], seed, start, count)[0]


def _draw(z_dim: int, shapes: list[tuple[int, ...]], seed: int, start: int, count: int
          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    zs, noise = [], [[] for _ in shapes]
    for i in range(start, start + count):
        gen = torch.Generator().manual_seed(image_seed(seed, i))
        zs.append(torch.randn(z_dim, generator=gen))
        # The noise maps follow z from the same stream, so z is the same for every family.
        for maps, shape in zip(noise, shapes):
            maps.append(torch.randn(shape, generator=gen))
    if not count:
        return torch.empty(0, z_dim), [torch.empty(0, *shape) for shape in shapes]
    return torch.stack(zs), [torch.stack(m) for m in noise]


def labels_for(G: torch.nn.Module, start: int, count: int, label: int | None = None,
               classes: "LabelDistribution | None" = None, seed: int = 0) -> torch.Tensor | None:
    """Labels of images start..start+count-1 of `seed`: None if unconditional, else `label` for
    every image or, without one, those `classes` gives them (`LabelDistribution.of_images`), by
    default i % num_classes (balanced over any range of a multiple of the classes)."""
    if not G.num_classes:
        if label is not None:
            raise UserError(f"label {label} given but the generator is unconditional (no classes)")
        return None
    if label is None and classes is not None:
        if classes.num_classes != G.num_classes:
            raise UserError(f"{classes.kind} labels of {classes.num_classes} classes for a generator of "
                            f"{G.num_classes}")
        return classes.of_images(seed, start, count)
    if label is None:
        return torch.arange(start, start + count) % G.num_classes
    if not 0 <= label < G.num_classes:
        raise UserError(f"label {label} outside 0..{G.num_classes - 1} (the generator has {G.num_classes} classes)")
    return torch.full((count,), label, dtype=torch.long)


LABEL_CHOICES = ("data", "uniform")      # train.gen_labels and eval's --labels
BALANCED = "balanced (i % num_classes)"  # eval's `labels` protocol field for uniform labels by index
_LABEL_STREAM = 0x6C61626C               # mixed into the seed of eval's label draws: apart from z's streams
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment and finaliser multipliers
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def index_uniforms(seed: int, start: int, count: int) -> np.ndarray:
    """float64 numbers in [0, 1), one per image start..start+count-1 of `seed`, each a function of
    (seed, index) alone: SplitMix64 (a bijective mix of a 64-bit counter) keyed by the seed."""
    key = np.random.SeedSequence([seed, _LABEL_STREAM]).generate_state(1, np.uint64)[0]
    x = key + np.arange(start, start + count, dtype=np.uint64) * _GOLDEN     # wraps modulo 2**64
    x = (x ^ (x >> np.uint64(30))) * _MIX[0]
    x = (x ^ (x >> np.uint64(27))) * _MIX[1]
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@dataclass
class LabelDistribution:
    """How the classes of generated images are chosen (`train.gen_labels`, eval's `--labels`).

    `uniform`: every class alike: training draws them with torch.randint, eval gives image i the
    class i % num_classes. `data`: in proportion to `weights`, the training split's class counts
    (StyleGAN2-ADA draws its generated labels from the dataset's); a class of weight 0 is never
    drawn. Training draws them with the device RNG (checkpointed, so resume stays exact); eval
    gives image i of seed S the class at `index_uniforms(S, i)` on the weights' cumulative sum,
    so the class, like z, depends on (S, i) alone. `source` says where the weights come from."""
    kind: str
    num_classes: int
    weights: tuple[float, ...] = ()
    source: str = ""
    last: int = field(default=0, init=False, repr=False, compare=False)
    _cdf: dict = field(default_factory=dict, repr=False, compare=False)    # device -> cumulative weights

    def __post_init__(self):
        if self.kind not in LABEL_CHOICES:
            raise ValueError(f"labels {self.kind!r}: choose one of {', '.join(LABEL_CHOICES)}")
        if self.kind == "data" and (len(self.weights) != self.num_classes or not sum(self.weights) > 0
                                    or min(self.weights) < 0):
            raise ValueError(f"data labels need {self.num_classes} weights >= 0 with a positive sum, got "
                             f"{list(self.weights)[:20]}")
        self.weights = tuple(self.weights)
        # The last class of positive weight: where a draw rounded up to the top of the range lands.
        self.last = max((i for i, w in enumerate(self.weights) if w > 0), default=self.num_classes - 1)

    def draw(self, n: int, device: torch.device) -> torch.Tensor:
        """`n` training labels from the device's global RNG, without reading anything back."""
        if self.kind == "uniform":
            return torch.randint(self.num_classes, (n,), device=device)
        if device not in self._cdf:
            cdf = np.cumsum(np.asarray(self.weights, dtype=np.float64))
            self._cdf[device] = torch.as_tensor(cdf / cdf[-1], dtype=torch.float32).to(device)
        u = torch.rand(n, device=device)
        return torch.searchsorted(self._cdf[device], u, right=True).clamp_(max=self.last)

    def of_images(self, seed: int, start: int, count: int) -> torch.Tensor:
        """The classes of images start..start+count-1 of `seed` (long, on the CPU)."""
        if self.kind == "uniform":
            return torch.arange(start, start + count) % self.num_classes
        cdf = np.cumsum(np.asarray(self.weights, dtype=np.float64))
        found = np.searchsorted(cdf, index_uniforms(seed, start, count) * cdf[-1], side="right")
        return torch.from_numpy(np.minimum(found, self.last).astype(np.int64))

    def record(self) -> dict:
        """What a snapshot's record keeps (`labels`): the choice, and the weights and their source."""
        return {"kind": self.kind, **({"weights": list(self.weights), "source": self.source}
                                      if self.kind == "data" else {})}

    @classmethod
    def from_record(cls, record: dict, num_classes: int) -> "LabelDistribution":
        """The distribution a snapshot's `labels` record names (checked by `snapshot.read_snapshot_meta`)."""
        return cls(record["kind"], num_classes, tuple(record.get("weights", ())), record.get("source", ""))

    def protocol(self) -> dict:
        """The fields every eval record carries: `labels` in words (the draw and the weights' source),
        and `label_weights` for data labels (records.protocol_key keys on them)."""
        if self.kind == "uniform":
            return {"labels": BALANCED}
        return {"labels": f"data (drawn per image from the class weights of {self.source})",
                "label_weights": list(self.weights)}


def data_labels(data_dir: str | Path, split: str, num_classes: int, flag: str = "train.gen_labels"
                ) -> LabelDistribution:
    """`data` labels from the class_counts that `ganpipe prepare` (or `index-shards`) recorded for
    `split` in DATA_DIR/manifest.json (zeros for classes the split lacks); a UserError naming `flag`
    and the remedies when the counts are not there (a URL pattern, an old or unlabelled manifest)."""
    from pipeline.data.manifest import MANIFEST, read_manifest
    from pipeline.errors import DataError

    where = Path(str(data_dir)).expanduser()
    remedy = (f"re-prepare the data with `ganpipe prepare` (or `ganpipe index-shards`), which records them, "
              f"or set {flag}=uniform")
    if not (where / MANIFEST).is_file():
        raise UserError(f"{flag}=data draws generated classes from the training split's class counts, but {data_dir} "
                        f"has no {MANIFEST} to read them from; {remedy}")
    try:
        entry = read_manifest(where)["splits"].get(split)
    except DataError as exc:
        raise UserError(f"{flag}=data: {exc}") from None
    counts = entry.get("class_counts") if isinstance(entry, dict) else None
    if not (isinstance(counts, list) and len(counts) <= num_classes
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) and sum(counts) > 0):
        raise UserError(f"{flag}=data draws generated classes from the training split's class counts, but "
                        f"{where / MANIFEST} has no counts of {num_classes} classes for split {split!r} "
                        f"(class_counts {str(counts)[:80]}); {remedy}")
    return LabelDistribution("data", num_classes, tuple(counts) + (0,) * (num_classes - len(counts)),
                             f"split {split!r} of {where.resolve() / MANIFEST}")


class ImageRef(NamedTuple):
    """One image of the convention: image `index` of `seed`, of class `label` (None: the convention's
    index % num_classes, or none for an unconditional G)."""
    seed: int
    index: int = 0
    label: int | None = None


_IMAGE_ITEM = re.compile(r"(\d+)(?:-(\d+))?(?::(\d+)(?:-(\d+))?)?")


def parse_image_list(spec: str, flag: str = "--seeds", label: int | None = None) -> list[ImageRef]:
    """`3,7`: image 0 of seeds 3 and 7 (what `ganpipe sample --seed 3 --num 1` writes); `0-5`: seeds
    0 to 5; `9:4`: image 4 of seed 9 (`--seed 9 --start 4`); `9:0-15`: its images 0 to 15. Items
    are comma-separated; ranges include both ends. `flag` names the option in errors."""
    refs: list[ImageRef] = []
    for item in spec.replace(" ", "").split(","):
        m = _IMAGE_ITEM.fullmatch(item)
        if not m:
            raise UserError(f"{flag} {spec!r}: {item!r} is not SEED, SEED-SEED, SEED:INDEX or SEED:INDEX-INDEX "
                            "(e.g. 0-7 or 3,5,9:2)")
        s0, s1, i0, i1 = m.groups()
        seeds = range(int(s0), int(s1 or s0) + 1)
        indices = range(int(i0 or 0), int(i1 or i0 or 0) + 1)
        if not seeds or not indices or (s1 and i1):
            raise UserError(f"{flag} {spec!r}: {item!r} is an empty or two-way range (a range of seeds, or of "
                            "the indices of one seed, from low to high)")
        refs += [ImageRef(seed, index, label) for seed in seeds for index in indices]
    if len(refs) > 100_000:
        raise UserError(f"{flag} {spec!r}: {len(refs)} images; at most 100000")
    return refs


def inputs_of(G: torch.nn.Module, refs: list[ImageRef]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """CPU inputs of the listed images, as `images()` draws them: z (N, z_dim) before truncation,
    G's noise maps (one (N, *shape) tensor per entry of `G.noise_shapes()`) and the labels (None
    for an unconditional G)."""
    if not refs:
        z, noise = draw(G, 0, 0, 0)
        return z, noise, (torch.empty(0, dtype=torch.long) if G.num_classes else None)
    drawn = [draw(G, ref.seed, ref.index, 1) for ref in refs]
    z = torch.cat([d[0] for d in drawn])
    noise = [torch.cat([d[1][k] for d in drawn]) for k in range(len(drawn[0][1]))]
    labels = [labels_for(G, ref.index, 1, ref.label) for ref in refs]
    return z, noise, (torch.cat(labels) if G.num_classes else None)


def images_of(G: torch.nn.Module, refs: list[ImageRef], **kw) -> torch.Tensor:
    """The listed images, bit for bit as `images()` (hence `ganpipe sample`) makes each of them:
    one `images()` call per run of refs in one micro-batch of one seed and class. `kw`: images()'s
    device, batch, psi, cutoff."""
    if not refs:
        return images(G, seed=0, count=0, **kw)
    groups: dict[tuple[int, int | None, int], list[int]] = {}
    for j, ref in enumerate(refs):
        groups.setdefault((ref.seed, ref.label, ref.index // MICRO_BATCH), []).append(j)
    out: list[torch.Tensor | None] = [None] * len(refs)
    for (seed, label, _), members in groups.items():
        lo = min(refs[j].index for j in members)
        hi = max(refs[j].index for j in members) + 1
        x = images(G, seed=seed, start=lo, count=hi - lo, label=label, **kw)
        for j in members:
            out[j] = x[refs[j].index - lo]
    return torch.stack(out)


def class_names(meta: dict, num_classes: int) -> tuple[list[str] | None, str]:
    """(the class names, "") of a snapshot's generator, read from the manifest of the data it was
    trained on (the record's `data_path`), or (None, why they cannot be known)."""
    from pipeline.data.manifest import MANIFEST, read_manifest
    from pipeline.errors import DataError

    where = meta.get("data_path")
    if not num_classes:
        return None, "the generator is unconditional"
    if not isinstance(where, str) or not where:
        return None, "the snapshot's record names no data directory"
    directory = Path(where).expanduser()
    if not (directory / MANIFEST).is_file():
        return None, f"the data it was trained on, {where!r}, has no {MANIFEST} here"
    try:
        names = read_manifest(directory).get("classes")
    except DataError as exc:
        return None, str(exc)
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        return None, f"{where}/{MANIFEST} does not name the generator's {num_classes} classes"
    return names, ""


def resolve_label(value: str | int | None, G: torch.nn.Module, meta: dict, flag: str = "--label") -> int | None:
    """The class index `value` names: a class name of the snapshot's data (see `class_names`), else
    an integer index. A name wins over an index: where classes are named "1", "10", "2", `1` is
    the class named "1". None stays None (the convention's classes)."""
    if value is None:
        return None
    text = str(value).strip()
    if not G.num_classes:
        raise UserError(f"{flag} {text} given but the generator is unconditional (no classes)")
    names, why = class_names(meta, G.num_classes)
    if names is not None and text in names:
        return names.index(text)
    if re.fullmatch(r"[+-]?\d+", text):
        if not 0 <= int(text) < G.num_classes:
            raise UserError(f"{flag} {text} outside 0..{G.num_classes - 1} (the generator has {G.num_classes} "
                            "classes)")
        return int(text)
    if names is None:
        raise UserError(f"{flag} {text!r}: class names are unknown ({why}); give the class index, "
                        f"0..{G.num_classes - 1}")
    import difflib

    close = difflib.get_close_matches(text, names, 1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
    raise UserError(f"{flag} {text!r}: no class of that name; {hint}classes: {shown}")


def resolve_classes(spec: str, G: torch.nn.Module, meta: dict, flag: str = "--classes") -> list[int]:
    """Class indices of a comma-separated list of class names, indices and index ranges (`0-9`), or
    `all`; names as `resolve_label` reads them (a class named `t-shirt` is a name, not a range)."""
    if not G.num_classes:
        raise UserError(f"{flag} {spec}: the generator is unconditional (no classes)")
    if spec.strip() == "all":
        return list(range(G.num_classes))
    names = class_names(meta, G.num_classes)[0] or []
    out: list[int] = []
    for item in (i.strip() for i in spec.split(",")):
        span = re.fullmatch(r"(\d+)-(\d+)", item)
        if span and item not in names:
            lo, hi = int(span[1]), int(span[2])
            if not lo <= hi < G.num_classes:
                raise UserError(f"{flag} {spec}: range {item} is not within 0..{G.num_classes - 1}")
            out += range(lo, hi + 1)
        else:
            out.append(resolve_label(item, G, meta, flag))
    return out


def truncation(G: torch.nn.Module, psi: float = 1.0, cutoff: int | None = None):
    """(z -> z, keyword arguments of G's forward) that apply truncation `psi` (and `cutoff`) to G,
    or a UserError saying why this G cannot. psi = 1 changes nothing, whatever the cutoff."""
    if not math.isfinite(psi):
        raise UserError(f"--psi {psi}: must be a finite number (1 = no truncation)")
    if cutoff is not None and cutoff < 1:
        raise UserError(f"--cutoff {cutoff}: must be at least 1 (the number of w layers truncated)")
    if psi == 1:
        return (lambda z: z), {}
    family = type(G).__module__.rsplit(".", 1)[-1]
    if getattr(G, "truncation", None) == "w":
        if cutoff is not None and cutoff > G.num_ws:
            raise UserError(f"--cutoff {cutoff}: this {family} generator has {G.num_ws} w layers")
        return (lambda z: z), {"truncation_psi": psi, "truncation_cutoff": cutoff}
    if callable(getattr(G, "truncate_z", None)):
        if cutoff is not None:
            raise UserError(f"--cutoff {cutoff}: the {family} generator truncates its latent z, which has no "
                            "layers; leave --cutoff out")
        return (lambda z: G.truncate_z(z, psi)), {}
    raise UserError(f"--psi {psi}: the {family} generator has no truncation trick (stylegan2 truncates w; "
                    "use --psi 1 for this one)")


@torch.no_grad()
def images(G: torch.nn.Module, *, seed: int, start: int = 0, count: int, label: int | None = None,
           device: str | torch.device | None = None, batch: int = 256, psi: float = 1.0,
           cutoff: int | None = None, classes: LabelDistribution | None = None) -> torch.Tensor:
    """Images start..start+count-1 of `seed`: float32 on the CPU, (count, C, H, W) (flat data:
    (count, C)), in [-1, 1]. G runs in eval mode (restored afterwards) on `device` (default: where
    its parameters are); `batch` images are drawn and moved per group (rounded up to a multiple of
    MICRO_BATCH) and changes nothing in the result. `psi`, `cutoff`: truncation (see `truncation`).
    `classes`: how the classes are chosen without a `label` (default i % num_classes; eval passes
    its `--labels` distribution)."""
    if start < 0 or count < 0 or batch < 1:
        raise ValueError(f"start ({start}) and count ({count}) must be >= 0 and batch ({batch}) >= 1")
    truncate_z, trunc = truncation(G, psi, cutoff)
    device = torch.device(device) if device is not None else next(G.parameters()).device
    group = math.ceil(batch / MICRO_BATCH) * MICRO_BATCH
    end = start + count
    first = start // MICRO_BATCH * MICRO_BATCH
    out = []
    was_training = G.training
    if was_training:
        G.eval()        # BatchNorm running statistics, stylegan2's clamp: per-image, no batch coupling
    try:
        for lo in range(first, end, group):
            hi = min(lo + group, math.ceil(end / MICRO_BATCH) * MICRO_BATCH)   # whole micro-batches
            z, noise = draw(G, seed, lo, hi - lo)
            z = truncate_z(z)
            labels = labels_for(G, lo, hi - lo, label, classes, seed)
            z, noise = z.to(device), [n.to(device) for n in noise]
            labels = None if labels is None else labels.to(device)
            parts = []
            for m in range(0, hi - lo, MICRO_BATCH):
                sl = slice(m, m + MICRO_BATCH)
                parts.append(G(z[sl], None if labels is None else labels[sl], noise=[n[sl] for n in noise], **trunc))
            x = torch.cat(parts).float().cpu()
            out.append(x[max(start, lo) - lo:min(end, hi) - lo])
    finally:
        if was_training:
            G.train()
    if not out:
        return torch.empty(0, *((G.channels,) if not G.resolution else (G.channels, G.resolution, G.resolution)))
    return torch.cat(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images -> uint8 numpy, rounding as the data's u / 127.5 - 1 inverts. Every PNG
    ganpipe writes and every image ganpipe eval scores goes through this."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu().numpy()


# What an image file name's suffix asks for: the format and its options.
IMAGE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                 ".webp": ("WEBP", {"lossless": True})}


def write_image(array: np.ndarray, path: str | Path, compress_level: int = 6) -> None:
    """Write a uint8 (C, H, W) array (C = 1 or 3) atomically, as PNG (zlib level `compress_level`;
    6 is PIL's default) or in the format its suffix names (IMAGE_FORMATS)."""
    from PIL import Image

    path = Path(path)
    img = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    fmt, options = IMAGE_FORMATS.get(path.suffix.lower(), IMAGE_FORMATS[".png"])
    if fmt == "PNG":
        options = {"compress_level": compress_level}
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **options)


def grid_array(u8: np.ndarray | torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """uint8 images (N, C, H, W) as one uint8 (3, H', W') grid (grey images repeated into RGB):
    `nrow` images per row (default round(sqrt(N))), 2-pixel black gaps, the last row filled with
    black. Every grid ganpipe writes (samples, videos, figures, previews) is laid out here."""
    from torchvision.utils import make_grid

    t = torch.as_tensor(u8)
    return make_grid(t, nrow=nrow or int(math.sqrt(len(t)) + 0.5), padding=2, pad_value=0).numpy()


def save_grid(x: torch.Tensor, path: str | Path, compress_level: int = 6, nrow: int | None = None
              ) -> torch.Tensor | None:
    """Write float images in [-1, 1] as one grid (`grid_array`; round(sqrt(N)) per row unless
    `nrow`), atomically, as PNG or the format `path`'s suffix names. Returns the grid as float
    (3, H, W) in [0, 1], or None (nothing written) for flat data, which has no image to show. The
    trainer's tick grids use zlib level 1: faster to write than the default 6, for a larger file."""
    if x.dim() != 4:
        return None
    grid = grid_array(to_uint8(x), nrow)
    write_image(grid, path, compress_level)
    return torch.from_numpy(grid).float() / 255


def save_pngs(x: torch.Tensor, directory: str | Path, start: int = 0) -> None:
    """Write float images in [-1, 1] as DIRECTORY/{index:06d}.png, numbered from `start`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8(x)):
        write_image(img, directory / f"{start + i:06d}.png")


def load_generator(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, torch.device]:
    """(G, its snapshot record, device) for a command that makes images from `args.snapshot`
    (`--generator`, `--device`); a UserError for a G of flat vectors, which makes no images."""
    from pipeline.dist import default_device
    from pipeline.training.snapshot import load_snapshot

    # cuda when there is one: sampling a snapshot needs no process group.
    device = default_device(args.device)
    which = getattr(args, "generator", "ema")      # the EMA G, or the raw G (train.snapshot_raw)
    G, meta = load_snapshot(args.snapshot, device=device, weights=which)
    if not G.resolution:
        raise UserError(f"{args.snapshot}: this generator makes flat vectors (resolution 0), not images; "
                        "there is nothing to write as an image")
    return G, meta, device


def sample_command(args: argparse.Namespace) -> int:
    """`ganpipe sample`: an output with an image suffix (.png, .jpg, .jpeg, .webp) gets one grid in
    that format; otherwise OUT is a directory of PNGs named by image index (START, START+1, ...)."""
    for flag, value, low in (("--num", args.num, 1), ("--seed", args.seed, 0), ("--start", args.start, 0),
                             ("--batch", args.batch, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    G, meta, device = load_generator(args)
    label = resolve_label(args.label, G, meta)
    psi, cutoff = getattr(args, "psi", 1.0), getattr(args, "cutoff", None)
    truncation(G, psi, cutoff)          # refuse a psi this G cannot apply before writing anything
    kw = dict(seed=args.seed, label=label, device=device, batch=args.batch, psi=psi, cutoff=cutoff)
    if args.out.suffix.lower() in IMAGE_FORMATS:
        save_grid(images(G, start=args.start, count=args.num, **kw), args.out)
    else:
        # A directory may take many images: one group at a time, on micro-batch boundaries so
        # that no micro-batch is computed twice.
        end, step = args.start + args.num, math.ceil(args.batch / MICRO_BATCH) * MICRO_BATCH
        for lo in range(args.start // MICRO_BATCH * MICRO_BATCH, end, step):
            first, last = max(lo, args.start), min(lo + step, end)
            save_pngs(images(G, start=first, count=last - first, **kw), args.out, start=first)
    trunc = f", psi {psi}" + (f" cutoff {cutoff}" if cutoff is not None else "") if psi != 1 else ""
    named = class_names(meta, G.num_classes)[0] if label is not None else None
    cls = "" if label is None else f", class {label}" + (f" {named[label]!r}" if named else "")
    print(f"wrote {args.num} images (seed {args.seed}, indices {args.start}..{args.start + args.num - 1}{cls}{trunc}) "
          f"from {args.snapshot} ({meta['generator']} G, kimg {meta['kimg']:.1f}) to {args.out}")
    return 0
