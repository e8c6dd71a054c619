"""Latent walks as video: `ganpipe video` writes MP4 (H.264 through PyAV, the `video` extra) or GIF.

    ganpipe video --snapshot S --seeds 0-7 --out walk.mp4                 # one walk through 8 images
    ganpipe video --snapshot S --seeds 0-31 --grid 4x2 --out walks.mp4    # 8 walks of 4 keyframes each
    ganpipe video --snapshot S --seeds 0:0-15 --grid 2x2 --out walk.gif   # images 0..15 of seed 0
    ganpipe video --snapshot S --seeds 3,5 --grid 2x1 --classes all --out sweep.mp4   # each cell sweeps the classes
    ganpipe video --snapshot S --seeds 0-7 --psi 0.7 --no-loop --frames-per-key 60 --out walk.mp4

    walk = Walk(keys=[[ImageRef(0), ImageRef(1), ImageRef(2)]], cols=1)
    count = write_video(frames(G, walk, "cpu"), "walk.gif", fps=30)

Keyframes. `--seeds` lists images as `ganpipe sample` numbers them (`generate.parse_image_list`:
seed S's image 0, or `S:I`, image I of seed S); with C cells (`--grid COLSxROWS`), keyframe k of
cell c is listed image k * C + c, so the first frame is the grid of the first C images. Every
keyframe is, bit for bit, the image `ganpipe sample` writes for its seed, index, class and psi:
it is made by `generate.images_of`. With `--classes`, each cell holds one listed image and its
keyframes are that image in each class given (`sample --label`).

Between keyframes. `--space w` (the default for a G that truncates in w, stylegan2) lerps the ws
of the two keyframes, after truncation, so psi acts on every frame; `--space z` (every other G)
slerps their latents, after a `truncate_z` G's truncation, which keeps a Gaussian latent's typical
norm where a lerp would shrink it. Per-pixel noise maps (stylegan2) are slerped too: they stay
unit-variance Gaussians, and each keyframe keeps its own. A class is part of w and moves with it;
in z a class is an entry of a table with nothing between two entries, so the frames between
keyframes of two classes blend the two classes' images of the slerped latent.

Frames. `--frames-per-key F` frames lead from one keyframe to the next. A loop (the default) walks
from the last keyframe back to the first, so K keyframes give K * F frames and the video repeats
without a jump; `--no-loop` gives (K - 1) * F + 1 frames and ends on the last keyframe.

Files. `.mp4`: H.264 (libx264, yuv420p, `--crf`; PyAV's wheels ship their own FFmpeg); a frame
with an odd side gets its last row or column twice (4:2:0 needs even sides). `.gif` (Pillow): a
frame of at most 256 colours keeps them exactly (a grey G's frames always do); others are
quantised to 256 colours (median cut, Floyd-Steinberg dithering). GIF stores frame times in
hundredths of a second, and Pillow merges identical consecutive frames into one longer frame.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.generate import ImageRef, grid_array, images_of, inputs_of, to_uint8, truncation
from pipeline.io import atomic_path

SPACES = ("z", "w")


@dataclass
class Walk:
    """What a video shows: cells of keyframes and the way from one keyframe to the next."""
    keys: list[list[ImageRef]]      # [cell][keyframe]; every cell has the same number (at least 2)
    cols: int = 1                   # cells per row of the frame grid
    frames_per_key: int = 30        # frames from one keyframe to the next
    loop: bool = True               # walk from the last keyframe back to the first
    space: str = "z"                # "z": slerp the latents; "w": lerp the ws (a G that truncates in w)
    psi: float = 1.0                # truncation, as `ganpipe sample --psi`
    cutoff: int | None = None       # truncation cutoff, as `ganpipe sample --cutoff`

    @property
    def num_keys(self) -> int:
        return len(self.keys[0])

    @property
    def num_frames(self) -> int:
        f, k = self.frames_per_key, self.num_keys
        return k * f if self.loop else (k - 1) * f + 1

    def keyframe_numbers(self) -> list[int]:
        """The frame number of each keyframe, in keyframe order."""
        return [k * self.frames_per_key for k in range(self.num_keys)]


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Row-wise spherical interpolation between a and b ((N, ...)) at t ((N,), 0 gives a, 1 gives
    b): sin((1-t) W) / sin W a + sin(t W) / sin W b, W the angle between the rows (Shoemake 1985;
    White 2016 for GAN latents). Rows at a near-zero angle are lerped."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    near = sin < 1e-6
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(near, t, torch.sin(t * omega) / safe)
    shape = (-1,) + (1,) * (a.dim() - 1)
    return wa.view(shape) * a + wb.view(shape) * b


@torch.no_grad()
def frames(G: torch.nn.Module, walk: Walk, device: str | torch.device, batch: int = 64) -> Iterator[np.ndarray]:
    """The frames of `walk`, in order: uint8 (3, H, W) grids (`generate.grid_array`, `walk.cols`
    cells per row). `batch`: interpolated images per G forward; changes no keyframe."""
    cells, num_keys, f = len(walk.keys), walk.num_keys, walk.frames_per_key
    if num_keys < 2 or any(len(cell) != num_keys for cell in walk.keys):
        raise UserError(f"a walk needs the same number of keyframes in every cell, at least 2 "
                        f"(got {[len(cell) for cell in walk.keys]})")
    if walk.space not in SPACES:
        raise UserError(f"space {walk.space!r}: one of {', '.join(SPACES)}")
    truncate_z, trunc = truncation(G, walk.psi, walk.cutoff)
    if walk.space == "w" and not _styled(G):
        raise UserError(f"--space w: the {_family(G)} generator has no w (stylegan2 has); use --space z")
    device = torch.device(device)
    was_training = G.training
    G.eval()
    try:
        refs = [ref for cell in walk.keys for ref in cell]          # cell-major: keyframe k of cell c at c * K + k
        keyframes = to_uint8(images_of(G, refs, device=device, psi=walk.psi, cutoff=walk.cutoff))
        keyframes = torch.from_numpy(keyframes).view(cells, num_keys, *keyframes.shape[1:])
        z, noise, labels = inputs_of(G, refs)
        z, noise = truncate_z(z).to(device), [n.to(device) for n in noise]
        labels = None if labels is None else labels.to(device)
        ws = G.map(z, labels, **trunc) if walk.space == "w" else None
        between = _Between(G, z, noise, labels, ws, trunc)
        for a in range(num_keys if walk.loop else num_keys - 1):
            b = (a + 1) % num_keys
            yield grid_array(keyframes[:, a], walk.cols)
            # The F - 1 frames after keyframe a: every cell at each t, in G forwards of `batch` images.
            t = torch.arange(1, f, device=device).repeat_interleave(cells) / f
            ia = torch.arange(cells, device=device).repeat(f - 1) * num_keys + a
            ib = ia - a + b
            out = np.concatenate([between(ia[i:i + batch], ib[i:i + batch], t[i:i + batch])
                             for i in range(0, len(t), batch)]) if len(t) else None
            for j in range(f - 1):
                yield grid_array(out[j * cells:(j + 1) * cells], walk.cols)
        if not walk.loop:
            yield grid_array(keyframes[:, -1], walk.cols)
    finally:
        if was_training:
            G.train()


class _Between:
    """Images between keyframes ia and ib (rows of the keyframe inputs) at fractions t."""

    def __init__(self, G, z, noise, labels, ws, trunc):
        self.G, self.z, self.noise, self.labels, self.ws, self.trunc = G, z, noise, labels, ws, trunc

    def __call__(self, ia: torch.Tensor, ib: torch.Tensor, t: torch.Tensor) -> np.ndarray:
        G = self.G
        noise = [slerp(n[ia], n[ib], t) for n in self.noise]
        if self.ws is not None:
            ws = self.ws[ia].lerp(self.ws[ib], t[:, None, None].to(self.ws.dtype))
            x = G.synthesis(ws, noise=noise).clamp(-1, 1)
        else:
            z = slerp(self.z[ia], self.z[ib], t)
            la = None if self.labels is None else self.labels[ia]
            x = G(z, la, noise=noise, **self.trunc)
            if la is not None and not torch.equal(la, self.labels[ib]):
                xb = G(z, self.labels[ib], noise=noise, **self.trunc)
                x = x.lerp(xb, t.view(-1, *(1,) * (x.dim() - 1)).to(x.dtype))
        return to_uint8(x.float())


def _styled(G: torch.nn.Module) -> bool:
    return getattr(G, "truncation", None) == "w" and callable(getattr(G, "map", None)) \
        and callable(getattr(G, "synthesis", None))


def _family(G: torch.nn.Module) -> str:
    return type(G).__module__.rsplit(".", 1)[-1]


# -- files ---------------------------------------------------------------------------------------

def _even(frame: np.ndarray) -> np.ndarray:
    """A (3, H, W) frame with its last row / column repeated once on an odd side: a black one
    would bleed into the last pixels through the shared chroma."""
    _, h, w = frame.shape
    return np.pad(frame, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge") if h % 2 or w % 2 else frame


def write_mp4(frames: Iterable[np.ndarray], path: Path, fps: float, crf: int = 18) -> int:
    """H.264 MP4 of uint8 (3, H, W) frames, atomically; returns the number of frames."""
    from pipeline.extras import require

    av = require("av", "video", "ganpipe video --out *.mp4")
    count, stream = 0, None
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            for frame in frames:
                hwc = np.ascontiguousarray(_even(frame).transpose(1, 2, 0))
                if stream is None:
                    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                    stream.width, stream.height, stream.pix_fmt = hwc.shape[1], hwc.shape[0], "yuv420p"
                    stream.options = {"crf": str(crf)}
                container.mux(stream.encode(av.VideoFrame.from_ndarray(hwc, format="rgb24")))
                count += 1
            if stream is not None:
                container.mux(stream.encode())          # flush the encoder's delayed frames
    return count


def _gif_frame(frame: np.ndarray):
    """A palette image of a (3, H, W) frame: its own colours when there are at most 256."""
    from PIL import Image

    hwc = np.ascontiguousarray(frame.transpose(1, 2, 0))
    packed = (hwc[..., 0].astype(np.uint32) << 16) | (hwc[..., 1].astype(np.uint32) << 8) | hwc[..., 2]
    colours, index = np.unique(packed, return_inverse=True)
    if len(colours) > 256:
        return Image.fromarray(hwc).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    img = Image.fromarray(index.reshape(packed.shape).astype(np.uint8), mode="P")
    rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], 1).astype(np.uint8)
    img.putpalette(rgb.tobytes())
    return img


def write_gif(frames: Iterable[np.ndarray], path: Path, fps: float, crf: int = 18) -> int:
    """Looping GIF of uint8 (3, H, W) frames, atomically; returns the number of frames given
    (`crf` is MP4's and unused)."""
    pictures = [_gif_frame(frame) for frame in frames]
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                         duration=max(10, round(1000 / fps)), loop=0, optimize=False)
    return len(pictures)


# Output suffix -> writer.
WRITERS: dict[str, Callable[..., int]] = {".mp4": write_mp4, ".gif": write_gif}


def write_video(frames: Iterable[np.ndarray], path: str | Path, fps: float, crf: int = 18) -> int:
    """Write frames as the file `path`'s suffix names (WRITERS); returns the number of frames."""
    path = Path(path)
    writer = WRITERS.get(path.suffix.lower())
    if writer is None:
        raise UserError(f"--out {path}: a video is one of {', '.join(WRITERS)} (by its suffix)")
    return writer(frames, path, fps, crf)


# -- the command ---------------------------------------------------------------------------------

def parse_grid(spec: str) -> tuple[int, int]:
    """'4x2' -> (4 columns, 2 rows)."""
    cols, sep, rows = spec.lower().partition("x")
    if not (sep and cols.isdigit() and rows.isdigit() and int(cols) > 0 and int(rows) > 0):
        raise UserError(f"--grid {spec!r}: COLSxROWS, e.g. 2x2")
    return int(cols), int(rows)


def plan(args: argparse.Namespace, G: torch.nn.Module, meta: dict) -> Walk:
    """The walk `ganpipe video`'s arguments ask for, checked."""
    from pipeline.generate import parse_image_list, resolve_classes, resolve_label

    cols, rows = parse_grid(args.grid)
    cells = cols * rows
    label = resolve_label(args.label, G, meta)
    refs = parse_image_list(args.seeds, "--seeds", label)
    if args.classes is not None:
        if label is not None:
            raise UserError("--classes sweeps the classes: leave --label out")
        classes = resolve_classes(args.classes, G, meta)
        if len(classes) < 2:
            raise UserError(f"--classes {args.classes}: a sweep needs at least 2 classes")
        if len(refs) != cells:
            raise UserError(f"--classes: --seeds lists {len(refs)} images for {cells} cells (--grid {args.grid}); "
                            "a sweep shows one image per cell")
        keys = [[ref._replace(label=c) for c in classes] for ref in refs]
    else:
        if len(refs) % cells or len(refs) // cells < 2:
            raise UserError(f"--seeds lists {len(refs)} images for {cells} cells (--grid {args.grid}): give a "
                            f"multiple of {cells}, at least {2 * cells} (2 keyframes per cell)")
        per = len(refs) // cells
        keys = [[refs[k * cells + c] for k in range(per)] for c in range(cells)]
    space = args.space if args.space != "auto" else ("w" if _styled(G) else "z")
    walk = Walk(keys, cols, args.frames_per_key, not args.no_loop, space, args.psi, args.cutoff)
    for flag, value, low in (("--frames-per-key", walk.frames_per_key, 1), ("--batch", args.batch, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise UserError(f"--fps {args.fps}: must be a positive number")
    if not 0 <= args.crf <= 51:
        raise UserError(f"--crf {args.crf}: H.264's quality scale is 0 (lossless luma) to 51 (worst)")
    return walk


def video_command(args: argparse.Namespace) -> int:
    """`ganpipe video`: check everything, then generate and write the frames one at a time."""
    from pipeline.generate import load_generator

    suffix = args.out.suffix.lower()
    if suffix not in WRITERS:
        raise UserError(f"--out {args.out}: a video is one of {', '.join(WRITERS)} (by its suffix)")
    if suffix == ".mp4":
        from pipeline.extras import require

        require("av", "video", "ganpipe video --out *.mp4")     # before minutes of generating
    G, meta, device = load_generator(args)
    walk = plan(args, G, meta)
    truncation(G, walk.psi, walk.cutoff)            # refuse a psi this G cannot apply before generating
    count = write_video(frames(G, walk, device, args.batch), args.out, args.fps, args.crf)
    sweep = " (a class sweep)" if args.classes is not None else ""
    print(f"wrote {count} frames ({walk.num_keys} keyframes in each of {len(walk.keys)} cells{sweep}, "
          f"space {walk.space}, {args.fps:g} fps, {count / args.fps:.1f} s) from {args.snapshot} to {args.out}")
    return 0
