"""The `ganpipe` command (also `python -m pipeline`): every command's arguments, and nothing else.

    ganpipe prepare --source mnist --out data/mnist --holdout 1000
    ganpipe train --config configs/mnist_dcgan.yaml --run-dir runs/mnist
    ganpipe bench loader

`COMMANDS` maps each name to its help, its arguments and the function that runs it: only the
chosen command's parser is built, and its module is imported only when it runs, so `ganpipe
--help` stays fast. Known errors become one clear line: exit status 2 for bad input, 1 when
training cannot go on. Maintainer scripts are not commands: they live in tools/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from pipeline.errors import DataError, TrainingError, UserError


def prepare_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.data.sources import SOURCES

    p.add_argument("--source", required=True,
                   help=f"one of: {', '.join(SOURCES.keys())}; folder/npz/cifar10/hf take :PATH "
                        "(e.g. folder:~/images, npz:data.npz, cifar10:~/cifar-10-batches-py, hf:~/saved_dataset)")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist, or be empty)")
    p.add_argument("--resolution", type=int, default=None,
                   help="square side in pixels (default: the source's native size; required for folders)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 = grey, 3 = RGB (default: the source's own)")
    p.add_argument("--holdout", type=int, default=0,
                   help="images held out into the 'test' split (default 0: train only)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-off shuffle and holdout choice")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="encoding processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Choices as in pipeline.data.prepare (not imported here: it loads webdataset, hence torch).
    p.add_argument("--format", default="keep", choices=("keep", "png", "jpg", "webp"),
                   help="stored encoding: keep (default) = a PNG/JPEG/WebP file's own bytes when it needs no "
                        "resize, crop or mode change, else lossless PNG; png; jpg or webp at --quality")
    p.add_argument("--quality", type=int, default=None, help="1..100 for --format jpg/webp (default 95; webp 100 = lossless)")
    p.add_argument("--crop", default="center", choices=("center", "pad"),
                   help="non-square images: center = centred square crop (default), pad = letterbox onto --background")
    p.add_argument("--background", default="white", choices=("white", "black"),
                   help="what transparent pixels are composited onto, and --crop pad's borders (default white)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="folder: class labels from a StyleGAN dataset.json or a CSV of file,class "
                        "(default: PATH/dataset.json if present, else one subfolder per class)")
    p.add_argument("--image-column", default=None, help="hf: column with the images (default: the Image column)")
    p.add_argument("--label-column", default=None, help="hf: column with the classes (default: 'label' if present)")
    p.add_argument("--min-size", type=int, default=0, metavar="PX",
                   help="skip source images with a side under PX pixels (recorded in the manifest; default 0: keep "
                        "all, and name those upscaled more than 4x)")


def verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", type=Path, help="a directory written by `ganpipe prepare`")
    p.add_argument("--quiet", action="store_true", help="print only problems and the final line")


def index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="DIR_OR_PATTERN",
                   help="a directory of webdataset shards (*.tar, *.tar.gz), or a brace pattern of local shards "
                        "such as '/data/train-{000000..000099}.tar' (quote it)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory the manifest is written to (default: the directory indexed; needed for a pattern); "
                        "shards outside it are listed by absolute path")
    p.add_argument("--split", default="train",
                   help="split of the shards whose name does not start with test-/val-/validation- (default train)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def export_arguments(p: argparse.ArgumentParser) -> None:
    _snapshot_arguments(p)
    # pipeline.export.FORMATS (not imported here: it loads torch)
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"),
                   help="onnx (needs the export extra: onnx, onnxruntime) or torchscript")
    p.add_argument("--out", required=True, type=Path, help="file to write (e.g. G.onnx, G.pt); replaced atomically")


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file from configs/ (optional when resuming RUN)")
    p.add_argument("--run-dir", required=True, type=Path, help="run directory; resumed when it has checkpoints")
    p.add_argument("--dry-run", action="store_true",
                   help="build the networks, phases and data loader, read one batch, write nothing, exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the same as log.progress=false)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_kimg=50 loss.name=hinge")


def config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file from configs/ (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=32")


def sample_arguments(p: argparse.ArgumentParser) -> None:
    _snapshot_arguments(p)
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--out", required=True, type=Path, help="an image file (.png, .jpg, .webp) for a grid, or a directory")
    p.add_argument("--seed", type=int, default=0, help="seed: image i depends only on (seed, i)")
    p.add_argument("--start", type=int, default=0, help="index of the first image of the seeded sequence")
    _label_argument(p)
    p.add_argument("--batch", type=int, default=256,
                   help="images generated per group; G runs on 16-image micro-batches; does not change the images")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    _generator_argument(p)
    _truncation_arguments(p)


def _snapshot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", default=None,
                   help="a snapshot's .json (or .safetensors) from RUN/snapshots; with --run: best, latest or a "
                        "snapshot's name (default latest)")
    p.add_argument("--run", default=None, type=Path, help="a run directory: take the snapshot from it")


def _label_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", default=None, metavar="CLASS",
                   help="class of every image (conditional snapshots): its name, as `ganpipe prepare` kept it in "
                        "the manifest of the snapshot's data, or its index")


def _snapshot_image_arguments(p: argparse.ArgumentParser) -> None:
    """What every command that draws a snapshot's images takes besides its own options."""
    _snapshot_arguments(p)
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    _generator_argument(p)
    _truncation_arguments(p)


_SEEDS_HELP = ("images as `ganpipe sample` numbers them, comma-separated: SEED (its image 0), SEED-SEED, "
               "SEED:INDEX or SEED:INDEX-INDEX (e.g. 0-7 or 3,5,9:2)")


def video_arguments(p: argparse.ArgumentParser) -> None:
    _snapshot_image_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="video file: .mp4 (H.264; the video extra) or .gif")
    p.add_argument("--seeds", default="0-7", help=f"keyframes: {_SEEDS_HELP}; keyframe k of cell c is image "
                                                  "k * cells + c (default 0-7)")
    p.add_argument("--grid", default="1x1", metavar="COLSxROWS",
                   help="cells of the frame, each its own walk (default 1x1)")
    p.add_argument("--classes", default=None, metavar="CLASSES",
                   help="a class sweep: each cell (one --seeds image per cell) walks through these classes: all, "
                        "or names, indices and ranges, comma-separated")
    _label_argument(p)
    p.add_argument("--frames-per-key", type=int, default=30, help="frames from one keyframe to the next (default 30)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second (default 30)")
    p.add_argument("--no-loop", action="store_true",
                   help="end on the last keyframe (default: walk back to the first, for a seamless loop)")
    p.add_argument("--space", default="auto", choices=("auto", "z", "w"),
                   help="interpolate w (lerp; stylegan2) or z (slerp); auto = w where G has one (default)")
    p.add_argument("--crf", type=int, default=18, help="MP4 quality: 0 (best) to 51 (default 18)")
    p.add_argument("--batch", type=int, default=64, help="frames' images per G forward (default 64)")


def figure_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    q = sub.add_parser("style-mix", help="StyleGAN's style mixing: row images with styles from column images",
                       description="Rows x columns of images; cell (r, c) is row image r with the --styles ws of "
                                   "column image c (stylegan2).")
    _snapshot_image_arguments(q)
    q.add_argument("--rows", default="0-4", help=f"row images: {_SEEDS_HELP} (default 0-4)")
    q.add_argument("--cols", default="5-9", help="column images, as --rows (default 5-9)")
    q.add_argument("--styles", default="coarse",
                   help="ws taken from the columns: coarse (0-3), middle (4-7), fine (8 on), or indices such as "
                        "0-1,6 (default coarse)")
    _label_argument(q)
    q.add_argument("--out", required=True, type=Path, help="image file (.png, .jpg, .webp)")
    q = sub.add_parser("classes", help="one row per class, labelled with the class names",
                       description="Row c: the images `ganpipe sample --label c --seed S --start I --num N` writes, "
                                   "labelled with the class's name from the manifest of the snapshot's data.")
    _snapshot_image_arguments(q)
    q.add_argument("--num", type=int, default=8, help="images per class (default 8)")
    q.add_argument("--seed", type=int, default=0, help="seed of every row (default 0)")
    q.add_argument("--start", type=int, default=0, help="index of each row's first image (default 0)")
    q.add_argument("--classes", default=None,
                   help="rows: names, indices and ranges, comma-separated (default: every class, up to 100)")
    q.add_argument("--batch", type=int, default=256, help="images generated per group (changes no image)")
    q.add_argument("--out", required=True, type=Path, help="image file (.png, .jpg, .webp)")


def preview_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, metavar="DATA", help="a directory written by `ganpipe prepare`")
    p.add_argument("--out", required=True, type=Path, help="image file (.png, .jpg, .webp)")
    p.add_argument("--split", default="train", help="split to show (default train)")
    p.add_argument("--num", type=int, default=64, help="images in the grid, first in shard order (default 64)")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="instead: one row of N images per class (up to 100 classes), labelled with the class names")


def _generator_argument(p: argparse.ArgumentParser) -> None:
    # Not --weights: eval's --weights names the extractor's weights file.
    p.add_argument("--generator", default="ema", choices=("ema", "raw"),
                   help="which G of the snapshot: ema (default, the EMA of G) or raw (the trained G itself, as "
                        "the CIFAR papers score it; snapshots keep it with train.snapshot_raw=true)")


def _truncation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--psi", type=float, default=1.0,
                   help="truncation psi: w = w_avg + psi (w - w_avg) (stylegan2; default 1 = none)")
    p.add_argument("--cutoff", type=int, default=None,
                   help="with --psi: truncate only the first CUTOFF w layers (default: all)")


def _extractor_arguments(p: argparse.ArgumentParser, several: bool = False) -> None:
    from pipeline.metrics.features import DINOV2_ENV, EXTRACTORS, INCEPTION_ENV, VGG16_ENV

    if several:     # eval/watch: one pass over the images feeds every extractor named
        p.add_argument("--extractor", default=None,
                       help=f"feature network(s) for every metric, comma-separated, from: {', '.join(EXTRACTORS.keys())} "
                            "(default: each metric's own as its paper: vgg16 for pr and dc, inception for fid, kid "
                            "and is; mnist works offline; dinov2-l14 gives FD_DINOv2)")
    else:
        p.add_argument("--extractor", default="inception", choices=EXTRACTORS.keys(),
                       help="feature network (default inception, the published standard; mnist works offline)")
    p.add_argument("--weights", "--inception-weights", dest="inception_weights", default=None, metavar="PATH",
                   help="weights file of the extractor, or a directory holding each extractor's file "
                        "(inception-2015-12-05.pt, vgg16-397923af.pth, dinov2_vitb14_pretrain.pth, "
                        f"dinov2_vitl14_pretrain.pth); default ${INCEPTION_ENV} / ${VGG16_ENV} / ${DINOV2_ENV}, else "
                        "~/.cache/ganpipe ($XDG_CACHE_HOME/ganpipe) / torch hub's "
                        "checkpoints folder; nothing is downloaded. `--weights raw` / `--weights ema` is "
                        "--generator raw / ema")
    p.add_argument("--batch-size", type=int, default=250,
                   help="images per generation/feature batch (generation rounds it up to a multiple of 16)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")


def _num_real(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of images, or 'all'") from None


def _num_real_argument(p: argparse.ArgumentParser) -> None:
    from pipeline.metrics.refstats import SAMPLE_MAX

    p.add_argument("--num-real", type=_num_real, default=SAMPLE_MAX, metavar="N|all",
                   help=f"real images in the seeded reference sample of KID, precision/recall and density/coverage "
                        f"(default {SAMPLE_MAX}, as Naeem et al.; all: the whole split, as StyleGAN2-ADA's pr50k3); "
                        "the generated sample is the first min(--num-gen, N)")


def refstats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", type=Path, help="prepared data directory (has manifest.json)")
    p.add_argument("--split", default="train", help="manifest split to describe (default train)")
    _num_real_argument(p)
    _extractor_arguments(p)
    p.add_argument("--force", action="store_true", help="recompute even if cached")


def _scoring_arguments(p: argparse.ArgumentParser) -> None:
    """What `eval` and `watch` share: the run, the protocol and the extractor."""
    from pipeline.metrics.scores import IS_RESIZES, METRICS, record_metrics

    p.add_argument("--run-dir", required=True, type=Path, help="run directory written by `ganpipe train`")
    p.add_argument("--metrics", default="fid,kid",
                   help=f"comma-separated, from: {', '.join(METRICS.keys())} (pr: precision and recall, "
                        "dc: density and coverage, is: Inception Score; default fid,kid)")
    p.add_argument("--best-metric", default=None,
                   help=f"metric(s) best.json ranks snapshots by, comma-separated, from: {', '.join(record_metrics())} "
                        "(default fid,kid)")
    p.add_argument("--num-gen", type=int, default=None,
                   help="images generated per snapshot (default: 50000 inception and vgg16, 10000 mnist)")
    _num_real_argument(p)
    p.add_argument("--is-resize", default="clean", choices=IS_RESIZES,
                   help="how the Inception Score's images reach 299 px: clean (clean-fid's, as FID; default) or "
                        "tf-bilinear (the original IS code's and StyleGAN2-ADA's, that of published IS figures)")
    p.add_argument("--split", default="train", help="reference split of the run's data (default train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images and of KID's subsets")
    p.add_argument("--data", type=Path, default=None, help="reference data dir (default: data.path of the run)")
    _generator_argument(p)              # part of the protocol, like truncation: recorded with every score
    p.add_argument("--labels", default=None, choices=("data", "uniform"),
                   help="classes of a conditional G's images: data (drawn from the class distribution the run "
                        "trained with) or uniform (image i gets class i %% num_classes); default: the run's "
                        "train.gen_labels")
    _truncation_arguments(p)
    _extractor_arguments(p, several=True)


def eval_arguments(p: argparse.ArgumentParser) -> None:
    _scoring_arguments(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--snapshot", default=None,
                       help="snapshot to score: best, latest, a name in RUN/snapshots, or a .json/.safetensors path")
    which.add_argument("--all", action="store_true", help="every complete snapshot not yet scored under this protocol")
    p.add_argument("--force", action="store_true", help="with --all: score already scored snapshots again")
    p.add_argument("--main", action="store_true",
                   help="with --all: make this protocol the run's main one (best.json, metrics.png and "
                        "train.keep_snapshots follow it; without --main the first watch or --all sets it)")
    which.add_argument("--posthoc-std", default=None, metavar="STDS",
                       help="comma-separated relative EMA lengths (e.g. 0.05,0.1,0.15): rebuild each from the "
                            "snapshots' EMA profiles (ema.posthoc_std), score it; RUN/posthoc/ gets the "
                            "snapshots, metrics.jsonl and metrics.png (metric against EMA length)")
    p.add_argument("--at-kimg", type=float, default=None,
                   help="with --posthoc-std: rebuild at the newest snapshot at or before this kimg (default: newest)")


def watch_arguments(p: argparse.ArgumentParser) -> None:
    _scoring_arguments(p)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    p.add_argument("--once", action="store_true", help="score what is pending, then exit (no polling)")
    p.add_argument("--alert-metrics", default="fid,kid",
                   help="metrics whose divergence raises an alert, comma-separated (default fid,kid; '' = none)")
    p.add_argument("--alert-worse-by", type=float, default=0.25,
                   help="alert when a metric is worse than its best by more than this fraction of the best "
                        "(default 0.25) for --alert-patience snapshots in a row")
    p.add_argument("--alert-patience", type=int, default=3, help="snapshots in a row (default 3)")
    p.add_argument("--alert-min-recall", type=float, default=None,
                   help="alert when recall (when scored: --metrics pr) stays below this for --alert-patience "
                        "snapshots (mode collapse; default off)")
    p.add_argument("--alert-min-coverage", type=float, default=None,
                   help="the same for coverage (--metrics dc; default off)")
    p.add_argument("--stop-on-alert", action="store_true",
                   help="on an alert write RUN/STOP: the trainer checkpoints and exits at its next tick; "
                        "the watcher scores what is pending and exits")


def posthoc_ema_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, type=Path, help="run trained with ema.posthoc_std")
    p.add_argument("--std", required=True, type=float,
                   help="relative EMA length sigma_rel to rebuild (EDM2: 0.05-0.2; below 0.2887)")
    p.add_argument("--at-kimg", type=float, default=None,
                   help="rebuild at the newest snapshot at or before this kimg, from it and the ones before "
                        "(default: the newest snapshot)")
    p.add_argument("--out", required=True, type=Path,
                   help="snapshot .json to write (weights beside it); not inside RUN/snapshots")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories with metrics.jsonl")
    p.add_argument("--metric", default="fid",
                   help="metric(s) to compare, comma-separated: fid, kid, precision, recall, density, coverage, "
                        "is, or a full name such as fid_inception (default fid)")
    p.add_argument("--extractor", default=None, help="only this extractor's scores (when runs hold several)")
    p.add_argument("--out", type=Path, default=Path("compare.png"), help="figure to write (default compare.png)")
    p.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="what to call each run in the table and legend, once per run in order "
                        "(default: its path)")


# -- benchmarks ----------------------------------------------------------------------------------

def bench_loader_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, default=150, help="timed batches per measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--images", type=int, default=5000, help="images per dataset (default 5000; at least 500)")


def bench_networks_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.networks import NETWORKS

    p.add_argument("--networks", nargs="+", default=NETWORKS.keys(), choices=NETWORKS.keys(),
                   help="families to measure (default: all)")
    p.add_argument("--resolutions", nargs="+", type=int, default=[32], metavar="PIXELS",
                   help="image sides to measure (default: 32)")
    p.add_argument("--batch", type=int, default=8, help="images per timed step (default: 8)")
    p.add_argument("--iters", type=int, default=3, help="timed steps, after warm-up steps (default: 3)")
    p.add_argument("--width", type=float, default=1.0,
                   help="g_width and d_width multiplier (default: 1, the published widths)")
    p.add_argument("--channels", type=int, default=3, help="image channels (default: 3)")
    p.add_argument("--classes", type=int, default=0, help="classes for conditional networks (default: 0)")
    p.add_argument("--matmul-size", type=int, default=2048,
                   help="side of the square matmul that measures the CPU's GFLOP/s (default: 2048)")


def bench_train_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.bench.train import CASES, CPU_CASES

    p.add_argument("--kimg", type=float, default=12.0, help="kimg per trainer measurement")
    p.add_argument("--cases", nargs="+", default=list(CPU_CASES), choices=list(CASES),
                   help=f"default: {' '.join(CPU_CASES)}; {', '.join(c for c in CASES if c not in CPU_CASES)} "
                        "are for a GPU")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                   help="autocast dtypes to measure each case under, trainer and bare loop alike (default fp32)")
    p.add_argument("--sync-debug", action="store_true",
                   help="also run each trainer with speed.sync_debug=true (on a GPU: a host sync in a step fails it)")
    p.add_argument("--skip-multiprocess", action="store_true", help="skip the 2 processes x 1 thread runs")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of (bare loop, trainer) back to back; medians over them, each round reported (default 3)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="trainer config overrides for every case (e.g. speed.channels_last=true optim.adam_impl=foreach)")


def bench_eval_arguments(p: argparse.ArgumentParser) -> None:
    from pipeline.metrics.features import EXTRACTORS

    p.add_argument("--num-gen", type=int, default=5000, help="generated images scored")
    p.add_argument("--extractor", default="mnist", choices=EXTRACTORS.keys())
    p.add_argument("--inception-weights", default=None, help="for --extractor inception")
    p.add_argument("--model", default="dcgan", help="network family of the (untrained) generator")
    p.add_argument("--data", type=Path, default=None, help="prepared data dir (default: bundled MNIST)")
    p.add_argument("--split", default="train", help="reference split")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--cleanfid-workers", type=int, default=0, help="clean-fid's folder DataLoader workers")
    p.add_argument("--at-scale", action="store_true",
                   help="also time the metrics at 10k samples of 2048-d and 768-d features and the Inception and "
                        "ViT-B/14 forwards, for the full set's cost over FID alone at 50k images")


def bench_recipes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=["configs/mnist_dcgan.yaml", "configs/mnist_rpgan.yaml"],
                   help="configs to compare (default: the demo DCGAN and the RpGAN + R1 + R2 recipe)")
    p.add_argument("--kimg", type=float, default=200.0,
                   help="kimg each config trains (default 200, the demo's length: its class-conditional G "
                        "scores near FID_mnist 20 until 40-80 kimg, then falls below the baseline)")
    p.add_argument("--snapshots", type=int, default=4, help="snapshots scored per run (default 4)")
    p.add_argument("--num-gen", type=int, default=5000, help="generated images per score (default 5000)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")


def bench_modes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+",
                   default=["configs/stackedmnist_dcgan.yaml", "configs/stackedmnist_rpgan.yaml"],
                   help="configs to compare (default: the DCGAN baseline and the RpGAN + R1 + R2 recipe)")
    p.add_argument("--kimg", type=float, default=200.0, help="kimg each config trains (default 200)")
    p.add_argument("--num-gen", type=int, default=25_600, help="generated images classified (default 25,600)")
    p.add_argument("--data-size", type=int, default=50_000, help="StackedMNIST training images (default 50,000)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every config (e.g. data.num_workers=1)")

# name -> (module, help, arguments). The module's `run(args)` returns a dict of measurements.
BENCHMARKS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "loader": ("pipeline.bench.loader", "streaming shard loader vs a plain in-memory DataLoader and webdataset",
               bench_loader_arguments),
    "networks": ("pipeline.bench.networks", "params, FLOPs and fwd+bwd images/s of every network",
                 bench_networks_arguments),
    "train": ("pipeline.bench.train", "full trainer vs a bare PyTorch loop; 1x2 vs 2x1 processes x threads",
              bench_train_arguments),
    "eval": ("pipeline.bench.eval", "snapshot scoring throughput vs clean-fid's own compute_fid",
             bench_eval_arguments),
    "recipes": ("pipeline.bench.recipes", "configs side by side: FID_mnist per snapshot for the same kimg",
                bench_recipes_arguments),
    "modes": ("pipeline.bench.modes", "StackedMNIST mode coverage (of 1,000) and KL to uniform, configs side by side",
              bench_modes_arguments),
}


def bench_arguments(p: argparse.ArgumentParser, argv: list[str]) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    chosen = next((a for a in argv if a in BENCHMARKS), None)
    for name, (module, help_text, arguments) in BENCHMARKS.items():
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.set_defaults(_bench_module=module)
        if name == chosen:
            arguments(q)


# -- what each command runs, imported only when it runs (so `ganpipe --help` imports no torch) -----

def _prepare(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import prepare_command
    return prepare_command(args)


def _verify(args: argparse.Namespace) -> int:
    from pipeline.data.verify import verify_command
    return verify_command(args)


def _index_shards(args: argparse.Namespace) -> int:
    from pipeline.data.index import index_shards_command
    return index_shards_command(args)


def _train(args: argparse.Namespace) -> int:
    from pipeline.training.run_config import train_command
    return train_command(args)


def _sample(args: argparse.Namespace) -> int:
    from pipeline.generate import sample_command
    return sample_command(args)


def _video(args: argparse.Namespace) -> int:
    from pipeline.video import video_command
    return video_command(args)


def _figure(args: argparse.Namespace) -> int:
    from pipeline.figures import figure_command
    return figure_command(args)


def _preview(args: argparse.Namespace) -> int:
    from pipeline.figures import preview_command
    return preview_command(args)


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import export_command
    return export_command(args)


def _refstats(args: argparse.Namespace) -> int:
    from pipeline.metrics.refstats import refstats_command
    return refstats_command(args)


def _eval(args: argparse.Namespace) -> int:
    from pipeline.metrics.commands import eval_command
    return eval_command(args)


def _watch(args: argparse.Namespace) -> int:
    from pipeline.metrics.commands import watch_command
    return watch_command(args)


def _posthoc_ema(args: argparse.Namespace) -> int:
    from pipeline.training.posthoc_ema import posthoc_ema_command
    return posthoc_ema_command(args)


def _compare(args: argparse.Namespace) -> int:
    from pipeline.metrics.compare import compare_command
    return compare_command(args)


def _config(args: argparse.Namespace) -> int:
    from pipeline.catalog import config_command
    return config_command(args)


def _bench(args: argparse.Namespace) -> int:
    from pipeline.bench import bench_command
    return bench_command(args)


class Command(NamedTuple):
    help: str
    arguments: Callable[..., None]                          # adds the command's arguments to its parser
    run: Callable[[argparse.Namespace], int | None]         # does the work; returns the exit status


# One name per command, in the order `ganpipe --help` lists them.
COMMANDS: dict[str, Command] = {
    "prepare": Command("turn an image collection into webdataset shards + manifest", prepare_arguments, _prepare),
    "verify": Command("re-hash and decode every shard of a prepared directory", verify_arguments, _verify),
    "index-shards": Command("write the manifest for webdataset shards made elsewhere (then verify, train)",
                            index_arguments, _index_shards),
    "train": Command("train a GAN (resumes RUN automatically); see configs/", train_arguments, _train),
    "sample": Command("write images or a grid from a snapshot", sample_arguments, _sample),
    "video": Command("a latent walk (or class sweep) through given images of a snapshot, as MP4 or GIF",
                     video_arguments, _video),
    "figure": Command("a figure from a snapshot: style-mix (stylegan2), classes (one named row per class)",
                      figure_arguments, _figure),
    "preview": Command("a grid of a prepared dataset's real images (or one named row per class)", preview_arguments,
                       _preview),
    "export": Command("a snapshot's EMA generator as ONNX or TorchScript, checked against PyTorch",
                      export_arguments, _export),
    "refstats": Command("compute and cache reference feature statistics of a data split", refstats_arguments,
                        _refstats),
    "eval": Command("score snapshots of a run (FID, KID, P/R, D/C, IS) and record the protocol", eval_arguments,
                    _eval),
    "watch": Command("score each new snapshot of a run once, until training finishes", watch_arguments, _watch),
    "posthoc-ema": Command("rebuild the EMA generator of any relative length from the snapshots' EMA profiles (EDM2)",
                           posthoc_ema_arguments, _posthoc_ema),
    "compare": Command("plot several runs' scores against kimg; table of each run's best", compare_arguments,
                       _compare),
    "config": Command("print the resolved config of a YAML file plus key=value overrides", config_arguments, _config),
    "bench": Command("run a benchmark and print its measurements as JSON", bench_arguments, _bench),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The full parser; only the chosen command's arguments are built (start-up stays fast)."""
    parser = argparse.ArgumentParser(prog="ganpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            if name == "bench":
                command.arguments(p, argv[argv.index(name) + 1:])
            else:
                command.arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    # Overrides belong anywhere on the line: argparse takes a positional list only before the first
    # option that follows it, so `key=value` words it left over join the command's overrides.
    args, rest = parser.parse_known_args(argv)
    strays = [w for w in rest if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    args._argv = argv
    if hasattr(args, "run") and hasattr(args, "snapshot"):         # every command that reads one snapshot
        try:
            from pipeline.api import resolve_snapshot

            args.snapshot = resolve_snapshot(args.snapshot, args.run)
        except UserError as exc:
            print(f"ganpipe {args.command}: error: {exc}", file=sys.stderr)
            return 2
    # `--weights raw|ema` (the name users also reach for) chooses the generator when no such file exists.
    if hasattr(args, "generator") and getattr(args, "inception_weights", None) in ("raw", "ema") \
            and not Path(args.inception_weights).exists():
        args.generator, args.inception_weights = args.inception_weights, None
    try:
        status = COMMANDS[args.command].run(args)
    except (UserError, DataError, FileNotFoundError, FileExistsError) as exc:
        print(f"ganpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"ganpipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:      # a full disk, a read-only or unwritable directory: say which and why
        if exc.errno is None:
            raise
        print(f"ganpipe {args.command}: error: {exc.strerror}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    raise SystemExit(main())
