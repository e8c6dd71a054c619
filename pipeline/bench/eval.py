"""Snapshot scoring throughput next to clean-fid's own `compute_fid` on the same images and extractor.

    ganpipe bench eval [--num-gen 5000] [--extractor mnist] [--model dcgan] [--data DIR]

Set-up (untimed): the bundled MNIST prepared with `--holdout 1000` into a temporary directory
(or `--data DIR`), a freshly initialised generator of `--model` saved as a real snapshot and
loaded back, the reference split exported as PNG files (clean-fid reads folders).

Ours: reference statistics from the shards (`compute_refstats`), then `generated_features`
(seeded generation, uint8 quantisation, clean resize, features) and the Fréchet distance;
generation alone and featurisation alone are timed too. clean-fid: `compute_fid(gen=..., fdir2=
PNG folder, mode="clean", custom_feat_extractor=<the same network>, custom_fn_resize=<the same
clean resize>)`, where `gen` replays exactly our seeded images, so both score the same images
with the same extractor: the FIDs must agree, and the time ratio is the honest comparison.

Metric costs: `ganpipe eval --snapshot S --metrics M` on the same snapshot for M = fid alone, fid
plus each other metric, and all five; each call generates and featurises once and computes the
chosen metrics from that pass (reference statistics cached by an untimed first call). The
issue's target: the full set at most 1.5x the time of FID alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from pipeline.rundir import RunDir


class Replay:
    """A `gen` for clean-fid: ignores its z and returns our next seeded images, float [0, 255] RGB."""

    def __init__(self, G, seed: int, device):
        self.G, self.seed, self.device, self.next = G, seed, device, 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        from pipeline.generate import images, to_uint8

        # clean-fid asks for whole batches of --batch-size, which `run` rounds to whole micro-batches
        # as the evaluator does: no image is generated twice, so the timing stays fair.
        x = to_uint8(images(self.G, seed=self.seed, start=self.next, count=z.shape[0], device=self.device))
        self.next += z.shape[0]
        x = torch.from_numpy(x).float()
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def run(args: argparse.Namespace) -> dict:
    from PIL import Image
    from cleanfid import fid as cleanfid

    from pipeline.config import ModelConfig
    from pipeline.data.prepare import prepare
    from pipeline.data.splits import iter_split
    from pipeline.generate import images as generate_images, to_uint8
    from pipeline.metrics.evaluator import generated_features, generation_batch
    from pipeline.metrics.features import get_extractor
    from pipeline.metrics.fid import feature_stats, frechet_distance
    from pipeline.dist import default_device
    from pipeline.metrics.refstats import compute_refstats
    from pipeline.networks import build_networks
    from pipeline.training.snapshot import SnapshotInfo, load_snapshot, save_snapshot

    device = default_device(args.device)
    ext = get_extractor(args.extractor, device, args.inception_weights)
    # Whole micro-batches of pipeline.generate, as the evaluator uses them (250 -> 256); clean-fid
    # gets the same batches, so both featurise the same images in the same groups.
    n, bs, seed = args.num_gen, generation_batch(args.batch_size), 0
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-eval-") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "mnist"
            prepare("mnist", data, holdout=1000, workers=1, progress=False)
        from pipeline.data.manifest import read_manifest

        m = read_manifest(data)
        torch.manual_seed(0)
        G, _ = build_networks(ModelConfig(name=args.model), resolution=m["resolution"], channels=m["channels"],
                              num_classes=m["num_classes"])
        snap = save_snapshot(G, RunDir(tmp / "run").snapshots, cur_nimg=0,
                             info=SnapshotInfo(ModelConfig(name=args.model), m["resolution"], m["channels"],
                                               m["num_classes"]))
        G, _ = load_snapshot(snap, device=device)

        # Ours: reference statistics from shards, then generate + featurise + Fréchet distance.
        t0 = time.perf_counter()
        ref = compute_refstats(data, args.split, ext, batch_size=bs)
        refstats_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = generated_features(G, ext, num=n, batch_size=bs, seed=seed)
        mu, sigma = feature_stats(feats)
        ours_fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
        eval_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = [to_uint8(generate_images(G, seed=seed, start=s, count=min(bs, n - s), device=ext.device))
                  for s in range(0, n, bs)]
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for batch in images:
            ext(batch)
        feat_s = time.perf_counter() - t0

        # clean-fid on the same images (replayed) and the same reference images (as PNG files).
        t0 = time.perf_counter()
        png = tmp / "ref_png"
        png.mkdir()
        i = 0
        for batch, _ in iter_split(data, args.split, bs):
            for img in batch:
                Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(png / f"{i:06d}.png")
                i += 1
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cf_fid = float(cleanfid.compute_fid(
            gen=Replay(G, seed, ext.device), fdir2=str(png), mode="clean", custom_feat_extractor=ext.net,
            custom_fn_resize=ext.resizer(), num_gen=n, z_dim=G.z_dim, batch_size=bs, device=ext.device,
            num_workers=args.cleanfid_workers, verbose=False, use_dataparallel=False))
        cf_s = time.perf_counter() - t0

        costs = metric_costs(snap, data, args, n, bs)
    at_scale = metrics_at_scale(device) if getattr(args, "at_scale", False) else None

    ours_s = refstats_s + eval_s
    return {
        "metric_costs": costs, **({"at_scale": at_scale} if at_scale else {}),
        "extractor": ext.name, "resize": ext.resize, "feature_dim": ext.dim, "device": str(ext.device),
        "generator": {"model": args.model, "z_dim": G.z_dim, "resolution": G.resolution, "channels": G.channels},
        "num_gen": n, "reference": {"data": "bundled mnist" if args.data is None else str(args.data),
                                    "split": args.split, "num": ref.num},
        "batch_size": bs,
        "ours": {
            "refstats_s": round(refstats_s, 3), "refstats_images_per_s": round(ref.num / refstats_s, 1),
            "eval_s": round(eval_s, 3), "generated_and_featurised_images_per_s": round(n / eval_s, 1),
            "generate_only_images_per_s": round(n / gen_s, 1), "featurise_only_images_per_s": round(n / feat_s, 1),
            "total_s": round(ours_s, 3), "fid": ours_fid,
        },
        "cleanfid_compute_fid": {
            "seconds": round(cf_s, 3), "images_per_s": round((n + ref.num) / cf_s, 1), "fid": cf_fid,
            "num_workers": args.cleanfid_workers, "png_export_s_untimed": round(export_s, 3),
        },
        "ratio_cleanfid_time_to_ours": round(cf_s / ours_s, 3),
        "fid_abs_diff": abs(cf_fid - ours_fid),
    }


METRIC_SETS = ("fid", "fid,kid", "fid,pr", "fid,dc", "fid,is", "fid,kid,pr,dc,is")


def metric_costs(snapshot: Path, data: Path, args: argparse.Namespace, num: int, batch: int) -> dict:
    """Seconds of `ganpipe eval` per metric set on one snapshot, and each set over FID alone."""
    import contextlib
    import io

    from pipeline import cli

    from pipeline.catalog import from_dict
    from pipeline.config import dump_config

    run_dir = snapshot.parent.parent
    # A run directory as `ganpipe train` leaves it: eval reads the run's config.
    dump_config(from_dict({"data": {"path": str(data)}, "model": {"name": args.model}}), RunDir(run_dir).config)
    base = ["eval", "--run-dir", str(run_dir), "--snapshot", str(snapshot), "--data", str(data), "--split", args.split,
            "--extractor", args.extractor, "--num-gen", str(num), "--batch-size", str(batch)]
    if args.inception_weights:
        base += ["--weights", str(args.inception_weights)]

    def timed(metrics: str) -> float:
        RunDir(run_dir).metrics.unlink(missing_ok=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main([*base, "--metrics", metrics])
        if code:
            raise RuntimeError(f"ganpipe eval --metrics {metrics} failed with status {code}")
        return time.perf_counter() - t0

    timed("fid")                        # reference statistics and sample into the cache, untimed
    seconds = {m: round(timed(m), 3) for m in getattr(args, "metric_sets", None) or METRIC_SETS}
    return {"seconds": seconds, "over_fid_alone": {m: round(t / seconds["fid"], 3) for m, t in seconds.items()}}


def metrics_at_scale(device: torch.device, num_images: int = 50_000, sample: int = 10_000, batch: int = 16) -> dict:
    """The metric arithmetic at production sample sizes and the production networks' forward rates,
    each measured here, and the full set's cost over FID alone for `num_images` computed from them."""
    import numpy as np
    import torchvision

    from pipeline.extras import require
    from pipeline.metrics.fid import frechet_distance, kernel_distance
    from pipeline.metrics.manifold import manifold_scores

    timm = require("timm", "dinov2", "bench eval --at-scale (the ViT-B/14 forward)")

    def forward_rate(net: torch.nn.Module, size: int) -> float:
        x = torch.rand(batch, 3, size, size, device=device)
        with torch.no_grad():
            net(x[:2])
            t0 = time.perf_counter()
            net(x)
        return batch / (time.perf_counter() - t0)

    torch.manual_seed(0)
    nets = {"inception": (torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False), 299, 2048),
            "dinov2-b14": (timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0),
                           224, 768)}
    out = {"num_images": num_images, "sample_gen": sample, "sample_ref": sample, "forward_batch": batch,
           "note": "metric seconds and forward rates measured here; the ratio is computed from them"}
    for name, (net, size, dim) in nets.items():
        rate = forward_rate(net.to(device).eval(), size)
        rng = np.random.default_rng(0)
        real = rng.standard_normal((sample, dim)).astype(np.float32)
        fake = (rng.standard_normal((sample, dim)) * 1.1 + 0.05).astype(np.float32)
        seconds = {}
        t0 = time.perf_counter()
        mu_r, mu_f = real.mean(0, dtype=np.float64), fake.mean(0, dtype=np.float64)
        frechet_distance(mu_f, np.cov(fake, rowvar=False), mu_r, np.cov(real, rowvar=False))
        seconds["fid_distance"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        kernel_distance(real, fake, seed=0, device=device)
        seconds["kid"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifold_scores(real, fake, pr_k=3, dc_k=5, device=device)          # pr and dc share one pass
        seconds["pr_dc"] = time.perf_counter() - t0
        fid_alone = num_images / rate + seconds["fid_distance"]
        out[name] = {"feature_dim": dim, "input_px": size, "forward_images_per_s": round(rate, 2),
                     "metric_seconds": {k: round(v, 2) for k, v in seconds.items()},
                     "fid_alone_s": round(fid_alone, 1),
                     "full_set_over_fid_alone": round((fid_alone + seconds["kid"] + seconds["pr_dc"]) / fid_alone, 4)}
    return out
