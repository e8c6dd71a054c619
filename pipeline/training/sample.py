"""`ganpipe sample --snapshot FILE --num N --out PATH`: images from a snapshot's EMA generator.

    ganpipe sample --snapshot runs/mnist/snapshots/snapshot-000200000.json --num 64 --out grid.png
    ganpipe sample --snapshot ... --num 1000 --out samples/ --label 3

An output ending in .png gets one grid; otherwise PATH is a directory of numbered PNGs. Class-
conditional snapshots cycle through the classes unless --label fixes one. Same seed, same images.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from pipeline.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", required=True, type=Path, help="snapshot .json (or .safetensors) from RUN/snapshots")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--out", required=True, type=Path, help="a .png file for a grid, or a directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent codes")
    p.add_argument("--label", type=int, default=None, help="class for every image (conditional snapshots)")
    p.add_argument("--batch", type=int, default=256, help="images per forward")


@torch.no_grad()
def generate(G, num: int, seed: int, label: int | None = None, batch: int = 256, device="cpu") -> torch.Tensor:
    """`num` images in [-1, 1] from seeded latents; labels balanced (i % classes) unless fixed."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num, G.z_dim, generator=gen)
    labels = None
    if G.num_classes:
        labels = torch.full((num,), label) if label is not None else torch.arange(num) % G.num_classes
    elif label is not None:
        raise UserError("--label given but the snapshot is unconditional")
    out = []
    for i in range(0, num, batch):
        c = None if labels is None else labels[i:i + batch].to(device)
        out.append(G(z[i:i + batch].to(device), c).float().cpu())
    return torch.cat(out)


def run(args: argparse.Namespace) -> int:
    from torchvision.utils import make_grid, save_image

    from pipeline.training.snapshot import SnapshotError, load_snapshot

    try:
        G, meta = load_snapshot(args.snapshot)
    except SnapshotError as exc:
        raise UserError(str(exc)) from None
    if args.label is not None and G.num_classes and not 0 <= args.label < G.num_classes:
        raise UserError(f"--label {args.label} outside 0..{G.num_classes - 1}")
    images = generate(G, args.num, args.seed, args.label, args.batch)
    if args.out.suffix.lower() == ".png":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        grid = make_grid(images, nrow=int(math.sqrt(args.num) + 0.5), normalize=True, value_range=(-1, 1))
        save_image(grid, args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            save_image(img, args.out / f"{i:06d}.png", normalize=True, value_range=(-1, 1))
    print(f"wrote {args.num} images from {args.snapshot} (kimg {meta['kimg']:.1f}) to {args.out}")
    return 0
