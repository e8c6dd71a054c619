"""Feature extractors for FID/KID, precision/recall, density/coverage and the Inception Score,
served by name from one registry.

    ext = get_extractor("mnist", device="cpu")        # or "inception", "vgg16", "dinov2-b14", "dinov2-l14"
    feats = ext(images_uint8_nchw)                    # (N, ext.dim) float32 numpy
    feats, logits = ext.extract(images, logits=True)  # torch on ext.device; logits for the IS

- `inception`: clean-fid's torchscript Inception-V3 (`InceptionV3W`, 2048-d pool features, the
  network behind published FIDs), loaded from a local file, never downloaded (clean-fid would
  fetch it into the world-writable /tmp without a checksum). Path: `--weights PATH` (alias
  `--inception-weights`), else the `GANPIPE_INCEPTION_WEIGHTS` environment variable, else
  `$XDG_CACHE_HOME/ganpipe/` (default `~/.cache/ganpipe/`), never /tmp. Its 1008-class logits (the TF graph's `softmax/logits/MatMul`: pool features times the output
  layer's weights, no bias, as the original Inception Score code and StyleGAN2-ADA take them)
  serve the Inception Score.
- `mnist`: the project's own 64-d digit embedding (`mnist_net.py`), weights committed, so
  FID-style evaluation is real on machines without network; its 10 digit logits give an
  "MNIST Inception Score".
- `dinov2-b14`, `dinov2-l14`: DINOv2 ViT-B/14 and ViT-L/14 (timm's architecture), the CLS token
  after the final norm (768-d, 1024-d), as Stein et al. 2023 (FD_DINOv2) use them: images resized
  to 224 x 224 by PIL bicubic on uint8 (torchvision's `Resize` on a PIL image), then ImageNet
  mean/std. Weights: Meta's `dinov2_vit{b,l}14_pretrain.pth`, from `--weights PATH`, else
  `$GANPIPE_DINOV2_WEIGHTS`, else torch hub's checkpoint folder; nothing is downloaded. The
  518-px position embeddings are resampled to 16 x 16 as DINOv2 itself does at run time
  (bicubic, scale factor (16 + 0.1) / 37, no antialias).
- `vgg16`: torchvision's VGG16 architecture, the 4096-d output of fc2 after its ReLU: the features
  of precision/recall (Kynkäänniemi et al. 2019, StyleGAN2-ADA's `pr50k3`) and density/coverage
  (Naeem et al. 2020), and the default extractor of those metrics (`scores.py`). After the ReLU:
  the reference network of pr50k3 (NVIDIA's `vgg16.pt`, ported from Kynkäänniemi et al.'s TF
  graph) returns fc2 after its ReLU as its features, as ports that reproduce it do (genforce's
  `PerceptualModel` 'feature', torch-fidelity's `fc2_relu`, its default for precision/recall).
  Input: uint8 images resized to 224 x 224 by TF1's bilinear resize (`tf-bilinear`: no
  half-pixel centres, no antialias; `tf_bilinear_resize`), because that is what the reference
  network does inside its graph (as does the Inception file: StyleGAN2-ADA's affine-grid resize),
  then /255 and ImageNet mean/std, torchvision's normalisation for these weights. Weights:
  torchvision's `vgg16-397923af.pth` from `--weights PATH` (a file, or a directory holding it),
  else `$GANPIPE_VGG16_WEIGHTS`, else torch hub's checkpoint folder (where torchvision leaves
  it); nothing is downloaded. They are torchvision's ImageNet weights, not NVIDIA's `vgg16.pt`
  (Oxford's weights in TorchScript, with code), so values are close to, not equal to, published
  pr50k3 figures; the weights hash in every record keeps the two apart.

clean-fid extractors (inception, mnist) follow clean-fid's protocol: uint8 images (grey is
repeated to RGB, as clean-fid's `convert('RGB')` does) go through clean-fid's "clean" resize
(PIL bicubic on each float32 channel, no re-quantisation) to the network's input side, and the
network receives float (B, 3, S, S) in [0, 255], the `custom_feat_extractor` contract. So the
same `ext.net` can be handed to `cleanfid.fid.compute_fid(custom_feat_extractor=...)` and gives
the same numbers. A `weights` directory serves several extractors: each takes its own file name
from it.

Every weights file is checked against its published sha256 (`PUBLISHED_SHA256`; for torchvision's
VGG16 file only the 8-digit prefix torchvision publishes in its name, `PUBLISHED_SHA256_PREFIX`)
before it is loaded, and a file that differs is refused with both hashes in the message: a score is only as
true as its feature network, and a stand-in network (a 2.5 kB TorchScript file returning constant
features scores every snapshot FID 0) must not be able to write the record. The Inception file is
TorchScript, so it is hashed and loaded from the same bytes in memory.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.io import sha256_bytes, sha256_file
from pipeline.registry import Registry

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")   # the file clean-fid 0.1.35 downloads (downloads_helper.py)
INCEPTION_ENV = "GANPIPE_INCEPTION_WEIGHTS"

# The sha256 of each extractor's weights file as published (95,607,719 bytes for Inception;
# Meta's files of 346,378,731 and 1,217,586,395 bytes for DINOv2 B/14 and L/14); the mnist one is
# the file committed in pipeline/metrics/weights/ (tools/train_mnist_extractor.py writes a new one
# that must be entered here). timm's `model.safetensors` copies of DINOv2 are not listed: their
# hashes are not established here, so they are refused like any other file.
PUBLISHED_SHA256: dict[str, tuple[str, ...]] = {
    "inception": ("f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4",),
    "mnist": ("a2b35b7be3aa371f355388c51949665e1039fb33f6eb8a4947263d0e9312490c",),
    "dinov2-b14": ("0b8b82f85de91b424aded121c7e1dcc2b7bc6d0adeea651bf73a13307fad8c73",),
    "dinov2-l14": ("d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428",),
}

# torchvision publishes no full hash of its weights files: by its convention the 8 hex digits in
# the file name are the start of the file's sha256 (torch.hub's check_hash compares just those).
# So a vgg16 file is checked against that prefix alone: 32 bits, enough to refuse a truncated
# download or another file by accident, not a forgery made to match. The file's full sha256 goes
# into every record (`extractor_sha256`), as for the other extractors.
PUBLISHED_SHA256_PREFIX: dict[str, tuple[str, ...]] = {
    "vgg16": ("397923af",),
}

# name -> build(device, weights=None) -> Extractor
EXTRACTORS = Registry("feature extractor")
CLASSIFIERS = ("inception", "mnist")    # extractors whose networks have class logits (Inception Score)


@dataclass
class Extractor:
    """A feature network plus the protocol facts every score must carry."""
    name: str
    net: nn.Module              # float (B, 3, size, size) in [0, 255] on `device` -> (B, dim)
    dim: int                    # feature length
    size: int                   # square input side in pixels after the clean resize
    weights: str                # weights file the network was loaded from
    weights_sha256: str
    device: torch.device
    default_num_gen: int        # generated images per score when the user gives none
    # Class logits from the features (for the Inception Score); None: the network has no classes.
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    num_classes: int = 0
    resize_kind: str = "clean"  # one of RESIZES: how images reach size x size

    @property
    def resize(self) -> str:
        """Protocol tag of the extractor's own resize (`resize_tag`)."""
        return self.resize_tag()

    def resize_tag(self, kind: str | None = None) -> str:
        """Protocol tag of a resize to size x size: `clean{size}` (clean-fid's 'clean' mode: PIL
        bicubic on float), `pil-bicubic{size}` (uint8 PIL bicubic, torchvision's Resize on a PIL
        image) or `tf-bilinear{size}` (TF1's resize_bilinear, `tf_bilinear_resize`)."""
        kind = kind or self.resize_kind
        return f"{'pil-bicubic' if kind == 'pil' else kind}{self.size}"

    def protocol(self) -> dict:
        return {"extractor": self.name, "extractor_sha256": self.weights_sha256, "feature_dim": self.dim,
                "resize": self.resize}

    def resizer(self) -> Callable[[np.ndarray], np.ndarray]:
        """clean-fid's own resize function for this input side (HWC RGB -> HWC float32)."""
        from cleanfid.resize import make_resizer

        return make_resizer("PIL", False, "bicubic", (self.size, self.size))

    def prepare(self, images: np.ndarray, resize: str | None = None) -> torch.Tensor:
        """uint8 (B, 1|3, H, W) -> float (B, 3, size, size) in [0, 255] by `resize` (default the
        extractor's own); "clean" exactly as clean-fid does it."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (B, 1|3, H, W), got shape {images.shape}")
        kind = resize or self.resize_kind
        if kind not in RESIZES:
            raise ValueError(f"unknown resize {kind!r}; choose from {', '.join(RESIZES)}")
        if images.shape[1] == 1:
            images = np.repeat(images, 3, axis=1)
        if kind == "pil":
            return _pil_bicubic(images, self.size)
        if kind == "tf-bilinear":
            return tf_bilinear_resize(torch.from_numpy(images).to(self.device, torch.float32), self.size)
        if images.shape[2:] == (self.size, self.size):
            # PIL returns an unchanged copy for a same-size resize (checked in the tests), so skip it:
            # it costs ~0.3 ms per image, more than the mnist network itself.
            return torch.from_numpy(images.astype(np.float32))
        fn = self.resizer()
        out = np.stack([fn(img.transpose(1, 2, 0)) for img in images])
        return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())

    @torch.no_grad()
    def extract(self, images: np.ndarray, logits: bool = False, resize: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, C, H, W) numpy -> (float32 (B, dim) features, (B, num_classes) logits or None),
        on `device`, from one pass of the network over the images resized by `resize` (default: its own)."""
        feats = self.net(self.prepare(images, resize).to(self.device)).float()
        if not logits:
            return feats, None
        if self.head is None:
            raise ValueError(f"the {self.name} extractor has no class logits")
        return feats, self.head(feats).float()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, C, H, W) numpy -> float32 (B, dim) numpy features."""
        return self.extract(images)[0].cpu().numpy()


RESIZES = ("clean", "pil", "tf-bilinear")     # Extractor.resize_kind / prepare(resize=...)


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """float (B, C, H, W) -> (B, C, size, size) as TF1's `tf.image.resize_bilinear` (align_corners
    False), the resize inside the reference metric networks (the Inception file's graph, which
    StyleGAN2-ADA reproduces with a shifted affine grid, and the VGG16 of pr50k3): output pixel i
    reads input position i * in / out, with no half-pixel centres, no antialiasing, and its upper
    neighbour clamped at the border. A same-size resize returns the input."""
    def axis(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, device=x.device, dtype=torch.float64) * (n / size)
        lo = pos.floor().long().clamp_(max=n - 1)
        return lo, (lo + 1).clamp_(max=n - 1), (pos - lo).to(x.dtype)

    top, bottom, dy = axis(x.shape[2])
    left, right, dx = axis(x.shape[3])
    rows = torch.lerp(x[:, :, top], x[:, :, bottom], dy[:, None])
    return torch.lerp(rows[..., left], rows[..., right], dx)


def _pil_bicubic(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 255]: PIL bicubic on each uint8 RGB image,
    the result quantised to uint8 again, as torchvision's Resize does it on PIL images."""
    from PIL import Image

    out = np.stack([np.asarray(Image.fromarray(img.transpose(1, 2, 0)).resize((size, size), Image.BICUBIC))
                    for img in images])
    return torch.from_numpy(out.transpose(0, 3, 1, 2).astype(np.float32))


def user_cache_dir() -> Path:
    """ganpipe's folder in this user's cache: $XDG_CACHE_HOME/ganpipe, default ~/.cache/ganpipe."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ganpipe"


def check_weights(name: str, path: Path, sha256: str, fetch: str) -> str:
    """`sha256` (of the file at `path`) when it is one published for extractor `name` (or, for a
    file whose publisher gives only a prefix, begins with it); else a UserError with both hashes
    and `fetch` (where to get the right file)."""
    published = PUBLISHED_SHA256.get(name, ())
    prefixes = PUBLISHED_SHA256_PREFIX.get(name, ())
    if sha256 in published or any(sha256.startswith(p) for p in prefixes):
        return sha256
    from pipeline.errors import UserError

    why = "(an interrupted download, or another file: a score is only as true as its feature network)"
    if published:
        raise UserError(f"weights file {path} cannot be loaded: its sha256 {sha256} is not the published "
                        f"{' or '.join(published)} of the {name} extractor {why}; {fetch}")
    raise UserError(f"weights file {path} cannot be loaded: its sha256 {sha256} does not begin with "
                    f"{' or '.join(prefixes)}, the prefix published in the name of the {name} extractor's file "
                    f"{why}; {fetch}")


def get_extractor(name: str, device: str | torch.device = "cpu", weights: str | Path | None = None) -> Extractor:
    """Build the extractor registered as `name` (a ConfigError lists the names if unknown)."""
    return EXTRACTORS.get(name)(device=torch.device(device), weights=weights)


def parse_extractors(text: str) -> list[str]:
    """'inception,dinov2-l14' -> ['inception', 'dinov2-l14'], each checked against EXTRACTORS."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        from pipeline.errors import ConfigError

        raise ConfigError(f"--extractor is empty; choose from {', '.join(EXTRACTORS.keys())}")
    for name in names:
        EXTRACTORS.get(name)
    return names


# What an extractor was made for, where that is narrower than any image: (does the data fit, in words).
MADE_FOR = {"mnist": (lambda channels, resolution: channels == 1 and resolution <= 32,
                      "grey digits of at most 32 px (it was trained on MNIST)")}


def check_data(names: list[str], channels: int, resolution: int, where: str) -> None:
    """Refuse an extractor on data it was not made for: its scores would move without meaning."""
    from pipeline.errors import UserError

    for name in names:
        if name in MADE_FOR and not MADE_FOR[name][0](channels, resolution):
            raise UserError(
                f"--extractor {name} scores {MADE_FOR[name][1]}, but {where} holds {channels}-channel "
                f"{resolution} px images: its scores would mean nothing there. Use inception (the FID of the "
                f"literature; needs {INCEPTION_FILE}: --weights FILE or ${INCEPTION_ENV}), vgg16 (precision/recall "
                f"and density/coverage as their papers; needs {VGG16_FILE}: --weights FILE or ${VGG16_ENV}) or "
                f"dinov2-b14 / dinov2-l14 (need {', '.join(f for _, f, _ in DINOV2.values())}: --weights FILE or "
                f"${DINOV2_ENV}); with several, --weights DIR holding each file; nothing is downloaded "
                f"(docs/evaluation.md)")


def get_extractors(names: list[str], device: str | torch.device = "cpu", weights: str | Path | None = None
                   ) -> list[Extractor]:
    """Several extractors at once; `weights` must then be a directory (each takes its own file from it)."""
    if len(names) > 1 and weights and not Path(weights).expanduser().is_dir():
        from pipeline.errors import UserError

        raise UserError(f"--weights {weights} names one file, but {len(names)} extractors "
                        f"({', '.join(names)}) need weights: name a directory holding each one's file "
                        f"(e.g. {INCEPTION_FILE}, {VGG16_FILE}, {DINOV2['dinov2-l14'][1]})")
    return [get_extractor(name, device, weights) for name in names]


# ---------------------------------------------------------------------------------------------
# inception

def default_inception_path() -> Path:
    """In this user's cache (not clean-fid's /tmp, where any user can put a file of that name)."""
    return user_cache_dir() / INCEPTION_FILE


def inception_path(weights: str | Path | None = None) -> Path:
    """The weights file to use: the argument, else $GANPIPE_INCEPTION_WEIGHTS, else the user's cache."""
    chosen = weights or os.environ.get(INCEPTION_ENV) or default_inception_path()
    path = Path(chosen).expanduser()
    return path / INCEPTION_FILE if path.is_dir() else path


def _missing_inception(path: Path) -> str:
    return (f"Inception weights file {path} not found; the inception extractor needs {INCEPTION_FILE} "
            f"(the file clean-fid downloads): on a machine with network run "
            f"`curl -L -o {INCEPTION_FILE} {INCEPTION_URL}`, copy it to {path} (or anywhere, and point "
            f"--weights (alias --inception-weights) or ${INCEPTION_ENV} at it); nothing is downloaded at run time. "
            f"For MNIST-like data `--extractor mnist` works offline")


@EXTRACTORS.register("inception")
def build_inception(device: torch.device, weights: str | Path | None = None) -> Extractor:
    from pipeline.errors import UserError

    path = inception_path(weights)
    if not path.is_file():
        raise UserError(_missing_inception(path))
    # Hashed and loaded from the same bytes: TorchScript is a program, and the file could change
    # between a check and a second read.
    data = path.read_bytes()
    sha = check_weights("inception", path, sha256_bytes(data), f"fetch {INCEPTION_FILE} again from {INCEPTION_URL}")
    from cleanfid.inception_torchscript import InceptionV3W

    try:
        with warnings.catch_warnings():   # torch 2.x deprecates torch.jit.load
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
            base = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except RuntimeError as exc:   # "PytorchStreamReader failed reading zip archive"
        raise UserError(f"Inception weights file {path} cannot be loaded ({str(exc).splitlines()[0][:160]}); "
                        f"fetch it again from {INCEPTION_URL}") from None
    # clean-fid's wrapper (its forward: the pool features) around that module; its own __init__
    # would load the file again by path.
    net = InceptionV3W.__new__(InceptionV3W)
    nn.Module.__init__(net)
    net.base, net.layers, net.resize_inside = base.eval(), base.layers, False
    net = net.to(device).eval().requires_grad_(False)
    head, classes = None, 0
    output = getattr(net.base, "output", None)     # the 1008-class layer of the TF graph
    if output is not None and hasattr(output, "weight"):
        weight = output.weight.detach().float()
        # No bias: the original Inception Score code multiplies the pool features by the weights
        # of softmax/logits/MatMul alone (StyleGAN2-ADA: `no_output_bias=True`).
        head, classes = (lambda feats: feats @ weight.T), int(weight.shape[0])
    return Extractor("inception", net, 2048, 299, str(path), sha, device, 50_000,
                     head=head, num_classes=classes)


# ---------------------------------------------------------------------------------------------
# mnist

@EXTRACTORS.register("mnist")
def build_mnist(device: torch.device, weights: str | Path | None = None) -> Extractor:
    from pipeline.errors import UserError
    from pipeline.metrics.mnist_net import FEATURE_DIM, INPUT_SIZE, WEIGHTS, load_mnist_net

    path = Path(weights or WEIGHTS).expanduser()
    if path.is_dir():                  # a directory of several extractors' weights
        path = path / WEIGHTS.name if (path / WEIGHTS.name).is_file() else WEIGHTS
    if not path.is_file():
        raise UserError(f"mnist extractor weights {path} not found; they ship with ganpipe "
                        f"(pipeline/metrics/weights/); rebuild them from a ganpipe checkout with "
                        f"`python tools/train_mnist_extractor.py --out {path}`")
    sha = check_weights("mnist", path, sha256_file(path), "use the file that ships with ganpipe "
                        f"(pipeline/metrics/weights/{WEIGHTS.name}), or drop --weights")
    net, _ = load_mnist_net(path)
    net = net.to(device)

    def head(feats: torch.Tensor) -> torch.Tensor:
        return net.head(feats / net.feature_scale)       # features are the scaled embedding

    return Extractor("mnist", net, FEATURE_DIM, INPUT_SIZE, str(path), sha,
                     device, 10_000, head=head, num_classes=10)


# ---------------------------------------------------------------------------------------------
# dinov2 (Stein et al. 2023, FD_DINOv2)

DINOV2_ENV = "GANPIPE_DINOV2_WEIGHTS"
DINOV2_SIZE = 224                     # Stein et al. resize every image to 224 x 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# name -> (timm architecture, Meta's weights file, feature dim)
DINOV2 = {"dinov2-b14": ("vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth", 768),
          "dinov2-l14": ("vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth", 1024)}


def dinov2_url(name: str) -> str:
    file = DINOV2[name][1]
    return f"https://dl.fbaipublicfiles.com/dinov2/{file.split('_pretrain')[0]}/{file}"


def dinov2_path(name: str, weights: str | Path | None = None) -> Path:
    """The argument, else $GANPIPE_DINOV2_WEIGHTS, else torch hub's checkpoints folder (where
    `torch.hub.load('facebookresearch/dinov2', ...)` leaves the file); a directory gets the file name."""
    file = DINOV2[name][1]
    chosen = weights or os.environ.get(DINOV2_ENV) or Path(torch.hub.get_dir()) / "checkpoints" / file
    path = Path(chosen).expanduser()
    return path / file if path.is_dir() else path


class Dinov2Features(nn.Module):
    """float (B, 3, 224, 224) in [0, 255] -> (B, dim) CLS token after the final norm.
    /255 then ImageNet mean/std, the operations of torchvision's ToTensor + Normalize."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit((x / 255 - self.mean) / self.std)


def resample_dinov2_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D) exactly as DINOv2's `interpolate_pos_encoding`:
    bicubic with scale factor (grid + 0.1) / M, no antialias (timm's own resample antialiases)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    m = math.isqrt(patches.shape[1])
    if m * m != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patches is not square")
    if m == grid:
        return pos_embed
    dim = patches.shape[-1]
    scale = (grid + 0.1) / m
    out = torch.nn.functional.interpolate(patches.reshape(1, m, m, dim).permute(0, 3, 1, 2),
                                          scale_factor=(scale, scale), mode="bicubic", antialias=False)
    out = out.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls, out.to(pos_embed.dtype)], dim=1)


def _missing_dinov2(name: str, path: Path) -> str:
    file = DINOV2[name][1]
    return (f"DINOv2 weights file {path} not found; the {name} extractor needs {file}: on a machine with "
            f"network run `curl -L -o {file} {dinov2_url(name)}`, copy it to {path} (or anywhere, and point "
            f"--weights or ${DINOV2_ENV} at it, or at a directory holding it); nothing is downloaded at run time")


def _build_dinov2(name: str, device: torch.device, weights: str | Path | None) -> Extractor:
    from pipeline.errors import UserError

    arch, file, dim = DINOV2[name]
    path = dinov2_path(name, weights)
    if not path.is_file():
        raise UserError(_missing_dinov2(name, path))
    from pipeline.extras import require

    timm = require("timm", "dinov2", f"--extractor {name}")
    from timm.models.vision_transformer import checkpoint_filter_fn

    # torch.load(weights_only=True) runs no code: hashing the file, then reading it, is enough.
    sha = check_weights(name, path, sha256_file(path), f"fetch Meta's {file} again from {dinov2_url(name)}")

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:     # a truncated or foreign file: say which and what to do
        raise UserError(f"DINOv2 weights file {path} cannot be loaded ({str(exc).splitlines()[0][:160]}); "
                        f"fetch {file} again from {dinov2_url(name)}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    vit = timm.create_model(arch, pretrained=False, img_size=DINOV2_SIZE, num_classes=0)
    if "pos_embed" not in state:
        raise UserError(f"DINOv2 weights file {path} has no pos_embed: not a DINOv2 ViT checkpoint ({file})")
    state = dict(state)
    state["pos_embed"] = resample_dinov2_pos_embed(state["pos_embed"], DINOV2_SIZE // 14)
    try:
        vit.load_state_dict(checkpoint_filter_fn(state, vit), strict=True)
    except RuntimeError as exc:
        raise UserError(f"DINOv2 weights file {path} does not fit {arch} ({str(exc).splitlines()[0][:160]}); "
                        f"the {name} extractor needs {file}") from None
    net = Dinov2Features(vit).to(device).eval().requires_grad_(False)
    return Extractor(name, net, dim, DINOV2_SIZE, str(path), sha, device, 50_000,
                     resize_kind="pil")


@EXTRACTORS.register("dinov2-b14")
def build_dinov2_b14(device: torch.device, weights: str | Path | None = None) -> Extractor:
    return _build_dinov2("dinov2-b14", device, weights)


@EXTRACTORS.register("dinov2-l14")
def build_dinov2_l14(device: torch.device, weights: str | Path | None = None) -> Extractor:
    return _build_dinov2("dinov2-l14", device, weights)


# ---------------------------------------------------------------------------------------------
# vgg16 (precision/recall: Kynkäänniemi et al. 2019; density/coverage: Naeem et al. 2020)

VGG16_FILE = "vgg16-397923af.pth"          # torchvision's VGG16_Weights.IMAGENET1K_V1
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
VGG16_ENV = "GANPIPE_VGG16_WEIGHTS"
VGG16_SIZE = 224


def vgg16_path(weights: str | Path | None = None) -> Path:
    """The argument, else $GANPIPE_VGG16_WEIGHTS, else torch hub's checkpoints folder (where
    torchvision's `vgg16(weights="IMAGENET1K_V1")` leaves the file); a directory gets the file name."""
    chosen = weights or os.environ.get(VGG16_ENV) or Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    path = Path(chosen).expanduser()
    return path / VGG16_FILE if path.is_dir() else path


def _missing_vgg16(path: Path) -> str:
    return (f"VGG16 weights file {path} not found; the vgg16 extractor (the features of precision/recall and "
            f"density/coverage unless --extractor names another) needs torchvision's {VGG16_FILE}: on a machine "
            f"with network run `curl -L -o {VGG16_FILE} {VGG16_URL}`, copy it to {path} (or anywhere, and point "
            f"--weights or ${VGG16_ENV} at it, or at a directory holding it); nothing is downloaded at run time")


class Vgg16Features(nn.Module):
    """float (B, 3, 224, 224) in [0, 255] -> (B, 4096): torchvision's VGG16 up to fc2 and its ReLU
    (`classifier[:5]`: fc1, ReLU, Dropout, fc2, ReLU; dropout is off in eval mode). /255 then
    ImageNet mean/std, the normalisation torchvision's weights were trained with."""

    def __init__(self, vgg: nn.Module):
        super().__init__()
        self.features, self.avgpool, self.fc2 = vgg.features, vgg.avgpool, vgg.classifier[:5]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features((x / 255 - self.mean) / self.std)
        return self.fc2(torch.flatten(self.avgpool(x), 1))


@EXTRACTORS.register("vgg16")
def build_vgg16(device: torch.device, weights: str | Path | None = None) -> Extractor:
    from pipeline.errors import UserError

    path = vgg16_path(weights)
    if not path.is_file():
        raise UserError(_missing_vgg16(path))
    # torch.load(weights_only=True) runs no code: hashing the file, then reading it, is enough.
    sha = check_weights("vgg16", path, sha256_file(path), f"fetch {VGG16_FILE} again from {VGG16_URL}")
    import torchvision

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # No random initialisation: every parameter is overwritten by the file's.
        vgg = torchvision.models.vgg16(weights=None, init_weights=False)
        vgg.load_state_dict(state, strict=True)
    except Exception as exc:     # a truncated file, or another network's weights: say which and what to do
        raise UserError(f"VGG16 weights file {path} cannot be loaded into torchvision's vgg16 "
                        f"({str(exc).splitlines()[0][:160]}); fetch {VGG16_FILE} again from {VGG16_URL}") from None
    net = Vgg16Features(vgg).to(device).eval().requires_grad_(False)
    # 50k generated: StyleGAN2-ADA's pr50k3.
    return Extractor("vgg16", net, 4096, VGG16_SIZE, str(path), sha, device, 50_000, resize_kind="tf-bilinear")
