"""Full trainer throughput vs a bare PyTorch loop of the same networks, batch, loss and penalty.

    ganpipe bench train [--kimg 12] [--repeats 3] [--skip-multiprocess]

Cases: DCGAN at 32x32 RGB (batch 64, non-saturating + R1 every 4 D steps), the MLP GAN on the
bundled MNIST (batch 64, non-saturating), and `dcgan64-example`: the CIFAR DCGAN config at 64x64 on
4,096 RGB images against a loop written the way PyTorch's own DCGAN example is (examples/dcgan:
BatchNorm in D, sigmoid + BCE, one fake batch per iteration reused for G's step (the config's
`train.reuse_fakes: true` does the same), Adam 2e-4 (0.5,
0.999), N(0, 0.02) init; in-memory batches here, where the example reads files); on request
`rpgan-mnist` and `rpgan-mnist-approx`, the demo recipe with exact and with finite-difference
(`approximate`) R1 + R2. The trainer runs as `ganpipe train` in a subprocess
(shard loader at its default, which on a CPU-only run is no worker process: `--set
data.num_workers=1` measures one; EMA, per-tick stats, sample grids, snapshots, checkpoint all on);
its rate is images shown to D per second of wall time between two ticks, so start-up is excluded
and everything else is included: from the middle tick to the last (steady state, the loader's
decoded-sample cache warm after the first 5 kimg epoch) and from the first tick to the last. The bare loop runs in this process on in-memory
tensors, over as many images as the trainer's steady-state window (half its run): D step (two
forwards, loss, lazy R1 on its own step, Adam), G step (Adam), nothing else. Both use 2 torch
threads in one process. Each case runs `--repeats` rounds of (bare loop, trainer) back to back, so
that a ratio compares runs seconds apart on a machine whose speed drifts by a third between runs;
the headline figures are medians over the rounds, and every round is in `runs`. Then the trainer again as 2 processes x 1 thread
(`accelerate launch --multi_gpu --num_processes 2`, gloo) against 1 process x 2 threads, with what
one gloo all-reduce of G's and of D's gradients costs between those processes
(`gloo_all_reduce`: milliseconds per G step, and as a share of the 1 x 2 step time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.loader import smooth_rgb
from pipeline.catalog import load_config
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.data.manifest import MANIFEST
from pipeline.data.prepare import prepare
from pipeline.losses import build_loss, build_penalties
from pipeline.networks import build_networks
from pipeline.rundir import RunDir

CASES = {
    # The bare loop draws fresh latents for G's step, so the trainer does too here (the config
    # reuses D's fakes, as the DCGAN example below does).
    "dcgan32": {"config": "configs/cifar10_dcgan.yaml", "data": "rgb32",
                "overrides": ["loss.penalties=[{name: r1, weight: 0.1, interval: 4}]", "train.reuse_fakes=false",
                              "model.d_norm=none"]},      # R1 needs a per-sample D
    "mlp-mnist": {"config": "configs/mnist_mlp.yaml", "data": "mnist", "overrides": []},
    "dcgan64-example": {"config": "configs/cifar10_dcgan.yaml", "data": "rgb64", "overrides": ["data.hflip=false"],
                        "bare": "example"},
    # For a GPU (`--cases resnet32 r3gan32 stylegan2-256`): the SNGAN ResNet (hinge, 5 D steps per G step,
    # no learning-rate schedule in either loop) and StyleGAN2 at 256 px with its lazy R1 but without
    # path length (the bare loop has no G regulariser), beside the published 12.53 s/kimg.
    "resnet32": {"config": "configs/cifar10_sngan_hinge.yaml", "data": "rgb32",
                 "overrides": ["optim.lr_schedule={kind: constant}"]},
    # R3GAN at CIFAR-10 size (`make gpu-check`): config E's networks and batch 512, RpGAN + R1 + R2
    # every step; unconditional and without ADA, as the bare loop has neither (ADA's p starts at 0
    # in the config anyway).
    "r3gan32": {"config": "configs/cifar10_r3gan.yaml", "data": "rgb32",
                "overrides": ["model.conditional=false", "augment.ada_groups="]},
    "stylegan2-256": {"config": "configs/ffhq256_stylegan2.yaml", "data": "rgb256",
                      "overrides": ["loss.penalties=[{name: r1, weight: 1.0, interval: 16}]", "data.num_workers=-1"],
                      "published": {"s_per_kimg": 12.53, "what": "StyleGAN2 at 256 px on one A100, with path length "
                                    "(the figure issue 15 cites); stylegan2-ada-pytorch's README: 21.6-24.2 s/kimg "
                                    "on one V100"}},
    # The demo recipe (configs/mnist_rpgan.yaml: class-conditional, RpGAN + R1 + R2, gamma 1.0, lazy
    # every 4 D steps) with its exact penalties and with the finite-difference ones (`approximate`,
    # no double backward), trainer and bare loop alike: `--cases rpgan-mnist rpgan-mnist-approx`.
    "rpgan-mnist": {"config": "configs/mnist_rpgan.yaml", "data": "mnist", "overrides": []},
    "rpgan-mnist-approx": {"config": "configs/mnist_rpgan.yaml", "data": "mnist", "overrides": [
        "loss.penalties=[{name: r1, weight: 1.0, interval: 4, schedule: {kind: cosine, end: 0.1}, approximate: true}, "
        "{name: r2, weight: 1.0, interval: 4, schedule: {kind: cosine, end: 0.1}, approximate: true}]"]},
}
CPU_CASES = ["dcgan32", "mlp-mnist", "dcgan64-example"]    # the default: what a CPU measures in minutes
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DATASETS = {"rgb32": (5000, 32), "rgb64": (4096, 64), "rgb256": (1024, 256)}   # images, side


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def example_networks(nz: int = 100, nc: int = 3, ngf: int = 64, ndf: int = 64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The 64x64 G and D of PyTorch's DCGAN example (examples/dcgan/main.py), rebuilt here."""
    from torch import nn

    def up(c_in, c_out, stride=2, pad=1):
        return [nn.ConvTranspose2d(c_in, c_out, 4, stride, pad, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]

    def down(c_in, c_out, bn=True):
        return [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), *([nn.BatchNorm2d(c_out)] if bn else []),
                nn.LeakyReLU(0.2, inplace=True)]

    G = nn.Sequential(*up(nz, ngf * 8, 1, 0), *up(ngf * 8, ngf * 4), *up(ngf * 4, ngf * 2), *up(ngf * 2, ngf),
                      nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    D = nn.Sequential(*down(nc, ndf, bn=False), *down(ndf, ndf * 2), *down(ndf * 2, ndf * 4), *down(ndf * 4, ndf * 8),
                      nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())
    for m in (*G.modules(), *D.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return G, D


def example_rate(data: Path, kimg: float, threads: int, batch: int = 64) -> dict:
    """PyTorch's DCGAN example loop on in-memory batches of the same images (fp32, as the example)."""
    torch.set_num_threads(threads)
    shards = ShardSet.resolve(str(data))
    raw = StreamLoader(shards, batch_size=4096, seed=0, rank=0, world_size=1, shuffle_buffer=0).next_raw()
    dev = bench_device()
    reals = torch.from_numpy(raw["images"]).to(dev).float().div_(127.5).sub_(1)
    torch.manual_seed(0)
    G, D = (net.to(dev) for net in example_networks())
    bce = torch.nn.BCELoss()
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def one_step() -> None:
        real = reals[torch.randint(len(reals), (batch,), device=dev)]
        D.zero_grad()
        out = D(real).view(-1)
        err_real = bce(out, torch.ones_like(out))
        err_real.backward()
        fake = G(torch.randn(batch, 100, 1, 1, device=dev))
        out = D(fake.detach()).view(-1)
        err_fake = bce(out, torch.zeros_like(out))
        err_fake.backward()
        opt_D.step()
        G.zero_grad()
        out = D(fake).view(-1)
        bce(out, torch.ones_like(out)).backward()
        opt_G.step()

    for _ in range(3):
        one_step()
    steps = max(1, int(kimg / 2 * 1000 / batch))     # the trainer's steady-state window: half its run
    synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(dev)
    return {"images_per_s": round(steps * batch / (time.perf_counter() - t0), 1), "threads": threads, "steps": steps,
            "loop": "PyTorch DCGAN example (BatchNorm D, BCE, fake reused for G)"}




def trainer_rate(config: str, data: Path, run: Path, overrides: list[str], kimg: float, procs: int,
                 threads: int, precision: str = "fp32", timeout_s: float | None = None) -> dict:
    tick = kimg / 8
    args = ["train", "--config", config, "--run-dir", str(run), f"data.path={data}",
            f"train.total_kimg={kimg}", f"train.tick_kimg={tick}", f"train.snapshot_kimg={kimg / 2}",
            f"train.checkpoint_kimg={kimg}", "log.progress=false", f"train.threads={threads}",
            f"speed.mixed_precision={precision}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    if procs == 1:
        cmd = [sys.executable, "-m", "pipeline", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29561", "-m", "pipeline", *args]
    t0 = time.perf_counter()
    with GpuUtilisation(RunDir(run).stats) as util:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in RunDir(run).stats.read_text().splitlines()]

    def rate(first: dict, last: dict) -> float:
        return (last["cur_nimg"] - first["cur_nimg"]) / (last["Timing/total_s"] - first["Timing/total_s"])
    # Steady state: from the middle tick on, when the loader's decoded-sample cache is warm (each
    # 5,000-image dataset is one epoch = 5 kimg); the whole window includes the first-epoch decoding.
    return {"processes": procs, "threads_per_process": threads,
            "images_per_s": round(rate(rows[len(rows) // 2], rows[-1]), 1),
            "images_per_s_from_first_tick": round(rate(rows[0], rows[-1]), 1),
            "wall_s_including_startup": round(wall, 1), "kimg": kimg,
            # process start to the first step (the trainer's own measurement, rank 0)
            "startup_s": round(rows[0].get("Timing/startup_s", float("nan")), 2),
            # process start to the first step, plus the exit after the last: the wall time the loop did not see
            "startup_and_exit_s": round(wall - rows[-1]["Timing/total_s"], 1),
            "s_per_kimg": round(1000 / rate(rows[len(rows) // 2], rows[-1]), 2),
            **({"gpu_utilisation_percent": util.summary(steady_from=len(rows) // 2 + 1, rows=len(rows))}
               if util.samples else {}),
            **({"gpu_peak_gb": round(max(r["Mem/gpu_peak_gb"] for r in rows), 3)} if "Mem/gpu_peak_gb" in rows[-1] else {})}


class GpuUtilisation:
    """`nvidia-smi`'s utilisation.gpu of device 0, sampled every 0.5 s in a thread while the block
    runs; nothing where there is no nvidia-smi. Each sample notes how many rows the run's
    stats.jsonl had then, so that `summary()` can keep the steady window's samples: a trainer's
    start-up, its first ticks and its exit left the median of a whole run at 0 on the first H200
    run (a 2-kimg run is mostly start and end)."""

    def __init__(self, stats: Path | None = None, period_s: float = 0.5):
        import shutil
        import threading

        self.tool, self.stats, self.period_s = shutil.which("nvidia-smi"), stats, period_s
        self.samples: list[int] = []
        self.rows_then: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True) if self.tool else None

    def rows_written(self) -> int:
        try:
            return self.stats.read_bytes().count(b"\n") if self.stats is not None else 0
        except OSError:
            return 0

    def sample(self) -> None:
        while not self.stop.wait(self.period_s):
            out = subprocess.run([self.tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "--id=0"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip().isdigit():
                self.rows_then.append(self.rows_written())
                self.samples.append(int(out.stdout.strip()))

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def summary(self, steady_from: int | None = None, rows: int | None = None) -> dict:
        """Median and mean of every sample, and of those taken while the stats file held at least
        `steady_from` and fewer than `rows` rows (between the middle tick and the last: the window
        bench train's img/s comes from)."""
        out = {"median": float(np.median(self.samples)), "mean": round(float(np.mean(self.samples)), 1),
               "samples": len(self.samples)}
        if steady_from is not None and rows is not None:
            steady = [u for u, n in zip(self.samples, self.rows_then) if steady_from <= n < rows]
            if steady:
                out.update({"steady_median": float(np.median(steady)), "steady_mean": round(float(np.mean(steady)), 1),
                            "steady_samples": len(steady)})
        return out


def allreduce_ms(sizes: dict[str, int], procs: int = 2) -> dict:
    """Milliseconds per gloo all-reduce of each network's gradients (float32, `numel` each) between
    `procs` processes of one thread, started as the trainer's are (pipeline/bench/allreduce.py)."""
    with tempfile.TemporaryDirectory(prefix="ganpipe-allreduce-") as tmp:
        out = Path(tmp) / "allreduce.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29562", "-m", "pipeline.bench.allreduce", str(out),
               *(str(n) for n in sizes.values())]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"all-reduce measurement failed:\n{proc.stderr[-2000:]}")
        ms = json.loads(out.read_text())
    per_net = {name: {"numel": n, "mib": round(n * 4 / 2**20, 2), "ms": ms[str(n)]} for name, n in sizes.items()}
    return {**per_net, "ms_per_G_step": round(sum(v["ms"] for v in per_net.values()), 3)}


def bare_rate(config: str, data: Path, overrides: list[str], kimg: float, threads: int,
              precision: str = "fp32") -> dict:
    """The same networks, batch, loss, penalty and D steps per G step as a plain loop over
    in-memory tensors on the device, under autocast for bf16 and fp16 (with a GradScaler per
    optimizer for fp16, the PyTorch AMP recipe). Penalties every D step join D's loss (one
    backward, as the trainer does); lazy ones get their own step. A relativistic loss pairs G's
    fakes with D's logits of a real batch, taken without gradient, as the trainer does."""
    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    dev, dtype = bench_device(), DTYPES[precision]
    shards = ShardSet.resolve(str(data))
    raw = StreamLoader(shards, batch_size=min(2048, sum(n or 0 for n in shards.num_samples) or 2048), seed=0, rank=0, world_size=1,
                       shuffle_buffer=0).next_raw()
    reals = torch.from_numpy(raw["images"]).to(dev).float().div_(127.5).sub_(1)
    # A conditional config (the demo's): G and D take the real batch's labels, as the trainer's
    # default train.gen_labels=data draws them in the data's proportions.
    num_classes = shards.num_classes if cfg.model.conditional else 0
    classes = torch.from_numpy(raw["labels"]).to(dev) if num_classes else None
    torch.manual_seed(0)
    G, D = build_networks(cfg.model, resolution=shards.resolution, channels=shards.channels, num_classes=num_classes)
    G, D = G.to(dev), D.to(dev)
    loss_fn = build_loss(cfg.loss)
    penalties = [p for p in build_penalties(cfg.loss) if p.side == "D"]    # the bare loop has no G regulariser
    every_step = [p for p in penalties if p.interval == 1]
    lazy = [p for p in penalties if p.interval > 1]
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.optim.g_lr, betas=tuple(cfg.optim.g_betas))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.optim.d_lr, betas=tuple(cfg.optim.d_betas))
    scale_G, scale_D = (torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16) for _ in range(2))
    b = cfg.data.batch_size
    d_steps = [0]

    def autocast():
        return torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def update(opt, scaler, loss) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def draw() -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.randint(len(reals), (b,), device=dev)
        return reals[index], (classes[index] if classes is not None else None)

    def one_step() -> None:
        for _ in range(cfg.train.n_critic):
            real, labels = draw()
            with torch.no_grad(), autocast():
                fake = G(torch.randn(b, G.z_dim, device=dev), labels)
            with autocast():
                loss = loss_fn.d_loss(D(real, labels).float(), D(fake, labels).float())
                for penalty in every_step:
                    loss = loss + penalty(D, real, fake, labels, scaler=scale_D)[0]
            update(opt_D, scale_D, loss)
            for penalty in lazy:
                if d_steps[0] % penalty.interval == 0:
                    with autocast():
                        pen, _ = penalty(D, real, fake, labels, scaler=scale_D)
                    update(opt_D, scale_D, pen)
            d_steps[0] += 1
        real, labels = draw()
        with autocast():
            real_logits = None
            if loss_fn.relativistic:
                with torch.no_grad():
                    real_logits = D(real, labels).float()
            g_loss = loss_fn.g_loss(D(G(torch.randn(b, G.z_dim, device=dev), labels), labels).float(), real_logits)
        update(opt_G, scale_G, g_loss)

    for _ in range(3):
        one_step()
    steps = max(1, int(kimg / 2 * 1000 / (b * cfg.train.n_critic)))   # the trainer's steady-state window: half its run
    synchronize(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(dev)
    rate = steps * b * cfg.train.n_critic / (time.perf_counter() - t0)
    return {"images_per_s": round(rate, 1), "s_per_kimg": round(1000 / rate, 2), "threads": threads,
            "steps": steps, "precision": precision, "device": dev.type,
            "params": {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters())},
            **({"gpu_peak_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)} if dev.type == "cuda" else {})}


def prepare_dataset(root: Path, key: str, workers: int = 2, sizes: dict[str, tuple[int, int]] = DATASETS) -> Path:
    """The prepared data of `key` (a DATASETS key, or "mnist") under `root`, made if missing."""
    out = root / key
    if (out / MANIFEST).is_file():
        return out
    if key == "mnist":
        prepare("mnist", out, shard_size=500, workers=workers, progress=False)
        return out
    n, res = sizes[key]
    np.savez(root / f"{key}.npz", images=smooth_rgb(n, res), labels=np.zeros(n, dtype=np.int64))
    prepare(f"npz:{root / f'{key}.npz'}", out, shard_size=512 if res < 256 else 128, workers=workers, progress=False)
    return out


def run(args: argparse.Namespace) -> dict:
    results = {}
    precisions = getattr(args, "precision", None) or ["fp32"]
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-train-") as tmp:
        tmp = Path(tmp)
        data = {key: prepare_dataset(tmp, key) for key in dict.fromkeys(CASES[name]["data"] for name in args.cases)}
        for name in args.cases:
            for precision in precisions:
                key = name if precision == "fp32" else f"{name}-{precision}"
                results[key] = measure_case(name, CASES[name], data[CASES[name]["data"]], tmp, args, precision)
    return {"device": bench_device().type, "repeats": args.repeats, "trainer_overrides": args.set, "cases": results}


def sync_debug_run(config: str, data: Path, run: Path, overrides: list[str], kimg: float, precision: str,
                   timeout_s: float | None = None) -> dict:
    """The trainer once more with `speed.sync_debug=true`: on a GPU every step after the first tick
    runs under torch's sync debug mode "error", so the run finishes only if no step waits for the
    device; the error names the line that did. On a CPU the option does nothing (`checked` false)."""
    try:
        trainer_rate(config, data, run, [*overrides, "speed.sync_debug=true"], kimg, procs=1, threads=2,
                     precision=precision, timeout_s=timeout_s)
        return {"checked": bench_device().type == "cuda", "passed": True}
    except RuntimeError as exc:
        return {"checked": True, "passed": False, "error": str(exc)[-1500:]}


def median(values: list[float]) -> float:
    return float(np.median(values))


def free_device_memory() -> None:
    """Hand the bare loop's GPU memory back to the driver. torch's caching allocator keeps freed
    blocks reserved for this process, and `make gpu-check` saw the R3GAN trainer that followed run
    out of the H200's 140 GiB beside them."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_case(name: str, case: dict, data: Path, tmp: Path, args: argparse.Namespace,
                 precision: str = "fp32") -> dict:
    """`args.repeats` rounds of (bare loop, trainer 1 x 2[, trainer 2 x 1]) back to back, so that
    each ratio compares runs a few seconds apart on this noisy machine; medians over the rounds,
    every round kept in `runs`. With `args.deadline` (a time.monotonic() value, `make gpu-check`'s
    budget) a trainer still running then is stopped: subprocess.TimeoutExpired."""
    overrides = [*case["overrides"], *args.set]
    deadline = getattr(args, "deadline", None)

    def left() -> float | None:
        return None if deadline is None else max(1.0, deadline - time.monotonic())
    bares, fulls, multis = [], [], []
    for r in range(args.repeats):
        if case.get("bare") == "example":
            bares.append(example_rate(data, args.kimg, threads=2))
        else:
            bares.append(bare_rate(case["config"], data, case["overrides"], args.kimg, threads=2, precision=precision))
        free_device_memory()        # the trainer is another process: it cannot use what this one's cache holds
        fulls.append(trainer_rate(case["config"], data, tmp / f"run-{name}-{precision}-1x2-{r}", overrides,
                                  args.kimg, procs=1, threads=2, precision=precision, timeout_s=left()))
        if not args.skip_multiprocess:
            multis.append(trainer_rate(case["config"], data, tmp / f"run-{name}-{precision}-2x1-{r}", overrides,
                                       args.kimg, procs=2, threads=1, precision=precision))

    def summary(runs: list[dict]) -> dict:
        out = {**runs[-1], "images_per_s": round(median([x["images_per_s"] for x in runs]), 1),
               "runs": [x["images_per_s"] for x in runs]}
        if "images_per_s_from_first_tick" in runs[-1]:
            out["images_per_s_from_first_tick"] = round(median([x["images_per_s_from_first_tick"] for x in runs]), 1)
            out["from_first_tick_runs"] = [x["images_per_s_from_first_tick"] for x in runs]
        return out

    ratios = [round(f["images_per_s"] / b["images_per_s"], 3) for f, b in zip(fulls, bares)]
    bare, full = summary(bares), summary(fulls)
    entry = {"batch": load_config(case["config"], overrides).data.batch_size, "precision": precision,
             "bare_pytorch_loop": bare, "trainer_1proc_2threads": full,
             "trainer_over_bare": round(median(ratios), 3), "trainer_over_bare_runs": ratios,
             "overhead_percent": round(100 * (1 - median(ratios)), 1)}
    if "published" in case:
        entry["published"] = case["published"]
    if getattr(args, "sync_debug", False):
        entry["sync_debug"] = sync_debug_run(case["config"], data, tmp / f"run-{name}-{precision}-sync", overrides,
                                             args.kimg, precision, timeout_s=left())
    if multis:
        multi_ratios = [round(m["images_per_s"] / f["images_per_s"], 3) for m, f in zip(multis, fulls)]
        entry["trainer_2procs_1thread"] = summary(multis)
        entry["2x1_over_1x2"], entry["2x1_over_1x2_runs"] = round(median(multi_ratios), 3), multi_ratios
        if "params" in bare:
            # D's and G's gradients cross the wire once per G step (n_critic 1).
            gloo = allreduce_ms(bare["params"])
            entry["gloo_all_reduce"] = {**gloo, "share_of_1x2_step": round(
                gloo["ms_per_G_step"] / (1000 * 64 / full["images_per_s"]), 3)}
    return entry
