"""Figures of a snapshot (`ganpipe figure style-mix|classes`) and of a prepared dataset (`ganpipe preview`).

    ganpipe figure style-mix --snapshot S --rows 0-5 --cols 6-11 --styles coarse --out mix-coarse.png
    ganpipe figure classes --snapshot S --num 8 --out classes.png          # one row per class, named
    ganpipe figure classes --snapshot S --classes cat,dog --num 16 --psi 0.7 --out pets.png
    ganpipe preview data/mnist --num 64 --out reals.png                     # the split's first 64 images
    ganpipe preview data/mnist --per-class 8 --out reals-by-class.png       # one row per class, named

Style mixing (StyleGAN, Karras et al. 2019, Sec. 3.1 and Fig. 3; StyleGAN2 keeps the figure): the
top row holds the column images and the left column the row images, each the image `ganpipe
sample` writes for it (`--rows`/`--cols` list images as `--seeds` does: `generate.parse_image_list`).
Cell (r, c) is row image r with the ws of `--styles` taken from column image c, drawn with row
image r's noise maps. w j drives the synthesis block j // 2 (the tRGB of block b shares w 2b + 1
with block b + 1's first conv), so the paper's groups are ranges of w indices whatever the
resolution: `coarse` ws 0-3 (4-8 px blocks in the paper's 1024 px G: pose, face shape), `middle`
4-7 (16-32 px: features, hair style), `fine` 8 on (64 px on: colours, micro-structure). A small G
has fewer: a 32 px stylegan2 has 8 ws and no fine styles. `--styles 0-1,6` picks ws by index.

Class grids write one row per class, labelled with the class names `ganpipe prepare` kept in the
manifest (for a snapshot: the manifest of the data it was trained on, `generate.class_names`; the
class index where the names cannot be found). Row c of `figure classes` is what `ganpipe sample
--label c --seed S --start I --num N` writes. `preview` reads the shards with the project's reader
(`data.shards.read_samples`, each shard checked against its manifest hash as training does) and
shows images in shard order, which `prepare` shuffled once: the first images are a fair sample.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.generate import (ImageRef, grid_array, images, images_of, inputs_of, resolve_classes, resolve_label,
                               to_uint8, truncation, write_image)

# The paper's style groups, as ranges of w indices (end None: to the last w).
STYLES = {"coarse": (0, 4), "middle": (4, 8), "fine": (8, None)}
MAX_ROWS = 100          # rows of a class grid drawn without --classes


def style_layers(spec: str, num_ws: int) -> list[int]:
    """The w indices `--styles` names: a group of STYLES, or indices and ranges (`0-3,6`)."""
    spans = {name: (lo, min(hi or num_ws, num_ws) - 1) for name, (lo, hi) in STYLES.items()}
    groups = ", ".join(f"{name} {lo}-{hi}" if lo <= hi else f"no {name}" for name, (lo, hi) in spans.items())
    if spec in STYLES:
        lo, hi = STYLES[spec]
        layers = list(range(lo, min(hi or num_ws, num_ws)))
    else:
        layers = []
        for item in spec.split(","):
            m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", item)
            if not m:
                raise UserError(f"--styles {spec!r}: one of {', '.join(STYLES)}, or w indices such as 0-3,6")
            layers += range(int(m[1]), int(m[2] or m[1]) + 1)
    if not layers or max(layers) >= num_ws:
        raise UserError(f"--styles {spec}: this generator has {num_ws} ws (0..{num_ws - 1}; {groups})")
    return sorted(set(layers))


@torch.no_grad()
def style_mix(G: torch.nn.Module, rows: list[ImageRef], cols: list[ImageRef], styles: str = "coarse", *,
              device: str | torch.device = "cpu", psi: float = 1.0, cutoff: int | None = None) -> np.ndarray:
    """The style-mixing figure as one uint8 (3, H, W) grid of (rows + 1) x (cols + 1) cells; the
    ws `styles` names (`style_layers`) come from the columns."""
    if getattr(G, "truncation", None) != "w" or not callable(getattr(G, "synthesis", None)):
        family = type(G).__module__.rsplit(".", 1)[-1]
        raise UserError(f"style mixing needs a generator with a w per layer (stylegan2); this one is {family}")
    layers = style_layers(styles, G.num_ws)
    truncate_z, trunc = truncation(G, psi, cutoff)
    refs = rows + cols
    exact = to_uint8(images_of(G, refs, device=device, psi=psi, cutoff=cutoff))
    z, noise, labels = inputs_of(G, refs)
    z, noise = truncate_z(z).to(device), [n.to(device) for n in noise]
    ws = G.map(z, None if labels is None else labels.to(device), **trunc)
    r, c = torch.meshgrid(torch.arange(len(rows)), torch.arange(len(cols)), indexing="ij")
    r, c = r.flatten().to(device), c.flatten().to(device) + len(rows)
    mixed = ws[r].clone()
    mixed[:, layers] = ws[c][:, layers]
    cells = [G.synthesis(mixed[i:i + 16], noise=[n[r[i:i + 16]] for n in noise]).clamp(-1, 1)
             for i in range(0, len(r), 16)]
    mixed_u8 = to_uint8(torch.cat(cells).float().cpu()).reshape(len(rows), len(cols), *exact.shape[1:])
    blank = np.zeros_like(exact[0])
    figure = [blank, *exact[len(rows):]]
    for i in range(len(rows)):
        figure += [exact[i], *mixed_u8[i]]
    return grid_array(np.stack(figure), len(cols) + 1)


def labelled_rows(rows: list[tuple[str, np.ndarray]], cols: int) -> np.ndarray:
    """One uint8 (3, H, W) figure: row r shows rows[r]'s uint8 (n, C, h, w) images (at most `cols`,
    black where it has fewer), laid out by `grid_array`, with its name written to its left."""
    from PIL import Image, ImageDraw, ImageFont

    shape = next(imgs.shape[1:] for _, imgs in rows if len(imgs))
    blank = np.zeros(shape, np.uint8)
    cells = [img for _, imgs in rows for img in [*imgs[:cols], *[blank] * (cols - len(imgs[:cols]))]]
    grid = grid_array(np.stack(cells), cols)
    side = shape[-2]
    try:
        font = ImageFont.load_default(size=max(10, min(side // 2, 32)))
    except TypeError:           # Pillow before 10.1: one bitmap size
        font = ImageFont.load_default()
    names = [name if len(name) <= 24 else name[:23] + "..." for name, _ in rows]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(probe.textlength(n, font=font) for n in names)
    column = Image.new("RGB", (int(width) + 12, grid.shape[1]))
    draw = ImageDraw.Draw(column)
    for r, name in enumerate(names):
        draw.text((6, 2 + r * (side + 2) + side / 2), name, fill=(255, 255, 255), font=font, anchor="lm")
    return np.concatenate([np.asarray(column).transpose(2, 0, 1), grid], axis=2)


# -- commands ------------------------------------------------------------------------------------

def figure_command(args: argparse.Namespace) -> int:
    """`ganpipe figure style-mix|classes`: one PNG (or .jpg/.webp) figure from a snapshot."""
    from pipeline.generate import class_names, load_generator, parse_image_list

    G, meta, device = load_generator(args)
    truncation(G, args.psi, args.cutoff)        # refuse a psi this G cannot apply before generating
    label = resolve_label(getattr(args, "label", None), G, meta)
    if args.figure == "style-mix":
        rows = parse_image_list(args.rows, "--rows", label)
        cols = parse_image_list(args.cols, "--cols", label)
        if len(rows) * len(cols) > 10_000:
            raise UserError(f"--rows and --cols: {len(rows)} x {len(cols)} cells; at most 10000")
        figure = style_mix(G, rows, cols, args.styles, device=device, psi=args.psi, cutoff=args.cutoff)
        what = f"style mixing, {len(rows)} rows x {len(cols)} columns, {args.styles} styles from the columns"
    else:
        if not G.num_classes:
            raise UserError(f"figure classes: {args.snapshot} is unconditional (no classes)")
        if args.num < 1 or args.seed < 0 or args.start < 0:
            raise UserError("--num must be at least 1, --seed and --start at least 0")
        if args.classes is None and G.num_classes > MAX_ROWS:
            raise UserError(f"the generator has {G.num_classes} classes; choose at most {MAX_ROWS} rows with "
                            "--classes (e.g. 0-99)")
        classes = resolve_classes(args.classes or "all", G, meta)
        names, why = class_names(meta, G.num_classes)
        if names is None:
            print(f"ganpipe figure: rows named by class index: {why}")
        rows = [((names[c] if names else str(c)),
                 to_uint8(images(G, seed=args.seed, start=args.start, count=args.num, label=c, device=device,
                                 batch=args.batch, psi=args.psi, cutoff=args.cutoff)))
                for c in classes]
        figure = labelled_rows(rows, args.num)
        what = f"{len(classes)} classes x {args.num} images (seed {args.seed}, indices from {args.start})"
    write_image(figure, args.out)
    print(f"wrote {args.out} ({what}) from {args.snapshot} ({meta['generator']} G, kimg {meta['kimg']:.1f})")
    return 0


def real_images(shards, full: Callable[[dict], bool], by_class: bool = False) -> tuple[dict[int, list[np.ndarray]], int]:
    """The real images of `shards` in their order, grouped by class (`by_class`) or all under 0,
    until `full(found)`: (class -> uint8 images, bad samples skipped). Read with the loader's own
    reader, each shard checked against its manifest entry."""
    from pipeline.data.shards import read_samples

    shape = dict(channels=shards.channels, resolution=shards.resolution, num_classes=shards.num_classes)
    found: dict[int, list[np.ndarray]] = {}
    bad = 0
    for shard in range(len(shards.urls)):
        if full(found):
            break
        samples = read_samples(shards.open(shard), Path(shards.urls[shard]).name, **shape, require_label=by_class)
        with contextlib.closing(samples):
            for _, _, image, label, problem in samples:
                if problem is not None:
                    bad += 1
                    continue
                found.setdefault(label if by_class else 0, []).append(image)
                if full(found):
                    break
    return found, bad


def preview_command(args: argparse.Namespace) -> int:
    """`ganpipe preview DATA`: a grid of a prepared split's real images, or one named row per class."""
    from pipeline.data.loader import ShardSet
    from pipeline.data.manifest import read_manifest

    m = read_manifest(args.data)
    if args.split not in m["splits"]:
        raise UserError(f"--split {args.split}: {args.data} has {', '.join(m['splits'])}")
    per_class = args.per_class
    if per_class is not None and (per_class < 1 or not m["num_classes"]):
        raise UserError(f"--per-class {per_class}: " + ("must be at least 1" if m["num_classes"] else
                        f"{args.data} is unlabelled (no classes); use --num"))
    if args.num < 1:
        raise UserError(f"--num {args.num}: must be at least 1")
    shards = ShardSet.resolve(str(args.data), args.split)
    shown = range(min(m["num_classes"], MAX_ROWS))  # the classes of a --per-class figure

    def full(found: dict[int, list]) -> bool:
        if per_class is None:
            return len(found.get(0, [])) >= args.num
        return all(len(found.get(c, [])) >= per_class for c in shown)

    found, bad = real_images(shards, full, by_class=per_class is not None)
    skipped = f"; {bad} bad sample(s) skipped (ganpipe verify {args.data} lists them)" if bad else ""
    if not found:
        raise UserError(f"{args.data}: split {args.split} has no readable image{skipped}")
    if per_class is None:
        got = found[0][:args.num]
        write_image(grid_array(np.stack(got)), args.out)
        what = f"the first {len(got)} images of split {args.split!r}"
    else:
        names = m.get("classes")
        if not isinstance(names, list) or len(names) != m["num_classes"]:
            names = [str(c) for c in range(m["num_classes"])]
        rows = [(str(names[c]), np.stack(found[c][:per_class]) if c in found else np.zeros((0,)))
                for c in shown]
        write_image(labelled_rows(rows, per_class), args.out)
        what = f"{len(rows)} classes x up to {per_class} images of split {args.split!r}"
    print(f"wrote {args.out} ({what}) of {args.data}{skipped}")
    return 0
