"""The training loop: one function that reads top to bottom.

    status = training_loop(cfg, Path("runs/mnist"))

Per G step: `n_critic` D steps (each a global batch of `data.batch_size` real images, split over
processes and accumulated micro-batches, with the lazy penalty when due), then one G step, then the
EMA update; at tick, snapshot and checkpoint boundaries (absolute multiples of their kimg, so a
resumed run stops at the same images as an uninterrupted one) the maintenance work.

Accelerate owns devices, the process group and DDP (`broadcast_buffers=False`: D runs several
forwards before one backward, and BatchNorm buffers stay per rank). Mixed precision is ours:
`torch.autocast` plus one GradScaler per optimizer for fp16, because Accelerate shares one scaler
between G and D (accelerate #174) and the penalty recipe needs D's scaler explicitly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from pipeline.config import Config, ConfigError, config_hash, to_dict
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.errors import DataError, TrainingError
from pipeline.losses import build_loss, build_penalty, clip_weights
from pipeline.networks import build_networks
from pipeline.training.augment import diff_augment, parse_policy
from pipeline.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from pipeline.training.ema import EMA
from pipeline.training.snapshot import save_snapshot
from pipeline.training.stats import Stats, StatsWriter

EXIT_PREEMPTED = 3          # checkpoint written after SIGTERM/SIGUSR1: requeue and run again to resume
# Skipped-sample counters of the loader, logged as Data/skipped_<kind>.
BAD_KINDS = ("undecodable", "wrong_shape", "missing_label", "bad_label", "truncated", "read_error")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype. `auto` follows `accelerate launch --mixed_precision` (or a launch/*.yaml) when
    one is given, else bf16 on GPUs that support it and fp32 on CPU."""
    if name == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher in ("bf16", "fp16"):
            return {"bf16": torch.bfloat16, "fp16": torch.float16}[launcher]
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).float() if grads else torch.zeros(())


def crossed(prev_nimg: int, cur_nimg: int, every_kimg: float) -> bool:
    """Whether an absolute multiple of `every_kimg` lies in (prev_nimg, cur_nimg]."""
    if every_kimg <= 0:
        return False
    every = every_kimg * 1000
    return math.floor(cur_nimg / every) > math.floor(prev_nimg / every)


def _digest(module: torch.nn.Module) -> torch.Tensor:
    """Per-tensor (sum, sum of squares) in float64: equal across ranks iff DDP kept them in sync."""
    return torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                        for p in module.parameters()])


def check_ranks_identical(named_modules: dict[str, torch.nn.Module], device: torch.device) -> None:
    """Raise if any rank holds different parameters (sum and sum of squares per tensor, exact)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for name, module in named_modules.items():
        local = _digest(module).to(device)
        everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, local)
        for r, other in enumerate(everyone):
            if not torch.equal(other, everyone[0]):
                raise TrainingError(f"{name} parameters differ between rank 0 and rank {r}: DDP lost sync")


class Preemption:
    """SIGTERM/SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def any_rank(self, device: torch.device) -> bool:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1.0 if self.flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())
        return self.flag


def save_grid(G: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None, path: Path,
              writer: StatsWriter, step: int) -> None:
    """Fixed-z sample grid from the EMA generator (RNG forked: training randomness is untouched)."""
    from torchvision.utils import make_grid, save_image

    with torch.no_grad(), torch.random.fork_rng(devices=[z.device] if z.device.type == "cuda" else []):
        torch.manual_seed(0)
        images = torch.cat([G(z[i:i + 64], None if labels is None else labels[i:i + 64]).float()
                            for i in range(0, len(z), 64)])
    if images.dim() != 4:
        return
    grid = make_grid(images.cpu(), nrow=int(math.sqrt(len(images)) + 0.5), normalize=True, value_range=(-1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    writer.image("Samples/fakes", grid, step)


def training_loop(cfg: Config, run_dir: Path) -> int:
    t_cfg = cfg.train
    # Set up devices and processes; threads so that all local processes together fill the cores.
    # broadcast_buffers=False is what we mean (BatchNorm statistics stay per rank, no in-place
    # broadcast between D's forwards); torch calls it deprecated in favour of an option that
    # would still sync buffers at init.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    # mixed_precision="no": autocast and scalers are ours (see the module docstring).
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(t_cfg.threads or max(1, (os.cpu_count() or 1) // local_procs))
    main = acc.is_main_process
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)

    # Split the global batch into processes x accumulation x per-process batch.
    batch = cfg.data.batch_size
    per_proc = t_cfg.batch_per_process or batch // world
    if per_proc < 1 or batch % (per_proc * world):
        raise ConfigError(f"data.batch_size={batch} is not a multiple of train.batch_per_process={per_proc} x "
                          f"{world} processes; pick a global batch divisible by both")
    accum = batch // (per_proc * world)
    dtype = resolve_precision(t_cfg.mixed_precision, device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)  # noqa: E731

    # Build data, networks (same init on every rank), optimizers, losses.
    shards = ShardSet.resolve(cfg.data.path, cfg.data.split, cfg.data.resolution, cfg.data.channels)
    conditional = cfg.model.conditional
    torch.manual_seed(cfg.seed)
    G, D = build_networks(cfg.model, resolution=shards.resolution, channels=shards.channels,
                          num_classes=shards.num_classes)
    ema = EMA(G, t_cfg.ema_halflife_kimg, t_cfg.ema_rampup)
    ema.model.to(device)
    G, D = acc.prepare(G, D)
    G_, D_ = acc.unwrap_model(G), acc.unwrap_model(D)
    loss_fn, penalty = build_loss(cfg.loss), build_penalty(cfg.loss)
    lazy = penalty is not None and penalty.interval > 1
    # StyleGAN2 (Appendix B): a penalty step every k D steps adds 1 step per k; Adam's lr and betas
    # are scaled by k / (k + 1) so that D's effective optimisation speed is unchanged.
    ratio = penalty.interval / (penalty.interval + 1) if lazy and t_cfg.lazy_adjust else 1.0
    opt_G = torch.optim.Adam(G_.parameters(), lr=t_cfg.g_lr, betas=tuple(t_cfg.g_betas))
    opt_D = torch.optim.Adam(D_.parameters(), lr=t_cfg.d_lr * ratio,
                             betas=tuple(b ** ratio for b in t_cfg.d_betas))
    scaler_G = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    scaler_D = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    policy = parse_policy(t_cfg.augment)
    augment = (lambda x: diff_augment(x, policy)) if policy else (lambda x: x)
    num_classes = G_.num_classes
    gen = torch.Generator().manual_seed(cfg.seed)
    grid_z = torch.randn(t_cfg.grid_size, G_.z_dim, generator=gen).to(device)
    grid_c = (torch.arange(t_cfg.grid_size) % num_classes).to(device) if num_classes else None

    # Resume from the newest complete checkpoint of this run, if any.
    cur_nimg, d_steps, g_steps, skipped = 0, 0, 0, 0
    consecutive: dict[str, int] = {}             # optimizer name -> steps skipped in a row
    loader_state, last_ckpt = None, None
    torch.manual_seed(cfg.seed * 1000 + rank)
    if ckpts := list_checkpoints(run_dir):
        last_ckpt = ckpts[-1]
        state, mine = load_checkpoint(last_ckpt, rank)
        G_.load_state_dict(state["G"])
        D_.load_state_dict(state["D"])
        ema.load_state_dict(state["G_ema"])
        opt_G.load_state_dict(state["opt_G"])
        opt_D.load_state_dict(state["opt_D"])
        scaler_G.load_state_dict(state["scaler_G"])
        scaler_D.load_state_dict(state["scaler_D"])
        cur_nimg, d_steps, g_steps, skipped = (state[k] for k in ("cur_nimg", "d_steps", "g_steps", "skipped"))
        if mine is not None and state["world_size"] == world:
            torch.set_rng_state(mine["torch_cpu"])
            if device.type == "cuda" and "torch_cuda" in mine:
                torch.cuda.set_rng_state(mine["torch_cuda"], device)
            loader_state = mine["loader"]
        else:
            log(f"resume: checkpoint was written by {state['world_size']} processes, this run has {world}: "
                "RNG and data streams start afresh (training state is exact)")
            torch.manual_seed(cfg.seed * 1000 + rank + cur_nimg)
        log(f"resumed from {last_ckpt} at kimg {cur_nimg / 1000:.3f}")
    # Streams restored exactly when possible; otherwise fresh ones, seeded away from the run's start.
    loader_seed = cfg.seed if loader_state is not None or cur_nimg == 0 else cfg.seed + cur_nimg
    loader = StreamLoader(shards, batch_size=per_proc, seed=loader_seed,
                          rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                          shuffle_buffer=cfg.data.shuffle_buffer, hflip=cfg.data.hflip,
                          require_labels=conditional, max_bad_fraction=cfg.data.max_bad_fraction,
                          cache_mb=cfg.data.cache_mb, device=device)
    if loader_state is not None:
        try:
            loader.load_state_dict(loader_state)
        except DataError as exc:
            log(f"resume: {exc}")

    run_dir.mkdir(parents=True, exist_ok=True)
    writer = StatsWriter(run_dir, enabled=main)
    stats = Stats(device)
    preempt = Preemption()
    total_nimg = int(t_cfg.total_kimg * 1000)
    inject = set(t_cfg.inject_nan_steps)
    log(f"training {cfg.model.name} G {G_.num_params():,} / D {D_.num_params():,} params on {world} x {device.type} "
        f"(batch {batch} = {world} x {accum} x {per_proc}, precision {dtype or 'fp32'}) to {t_cfg.total_kimg} kimg")
    progress = None
    if main and t_cfg.progress:
        from tqdm import tqdm
        progress = tqdm(total=t_cfg.total_kimg, initial=cur_nimg / 1000, unit="kimg", dynamic_ncols=True, disable=None,
                        bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}]")
    tick_nimg, tick_time, start_time = cur_nimg, time.time(), time.time()

    def sample_fakes(labels):
        z = torch.randn(labels.shape[0] if labels is not None else per_proc, G_.z_dim, device=device)
        return z, labels

    def penalty_loss(real, fake, labels):
        pen, pen_stats = penalty(D, real, fake, labels, scaler=scaler_D)
        for name, value in pen_stats.items():
            stats.report(name, value)
        return pen

    def step(opt, scaler, params, name) -> bool:
        """Unscale, measure, and step unless the gradients are not finite (then skip and count)."""
        nonlocal skipped
        scaler.unscale_(opt)
        norm = grad_norm(params)
        stats.report(f"Grad/{name}/norm", norm)
        ok = bool(torch.isfinite(norm))
        if ok or scaler.is_enabled():
            scaler.step(opt)        # an enabled scaler skips non-finite steps itself and lowers its scale
        scaler.update()
        skipped += 0 if ok else 1
        consecutive[name] = 0 if ok else consecutive.get(name, 0) + 1
        if consecutive[name] >= t_cfg.max_nonfinite_steps:
            raise TrainingError(f"{consecutive[name]} consecutive {name} steps with non-finite gradients at kimg "
                                f"{cur_nimg / 1000:.3f}; last good checkpoint: {last_ckpt or 'none yet'}. "
                                "Lower the learning rates, use train.mixed_precision=fp32 or bf16, or check the data")
        return ok

    while cur_nimg < total_nimg:
        prev_nimg = cur_nimg
        # D phase: n_critic steps, each one global batch of real images.
        for _ in range(t_cfg.n_critic):
            opt_D.zero_grad(set_to_none=True)
            with_penalty = penalty is not None and not lazy       # every-step penalty joins the main loss
            micro_batches = []
            for micro in range(accum):
                real, labels = loader.next()
                labels = labels if conditional else None
                z, fake_labels = sample_fakes(labels)
                with torch.no_grad(), autocast():
                    fake = G(z, fake_labels)
                micro_batches.append((real, fake, labels))
                sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(D)
                with sync:
                    with autocast():
                        real_aug, fake_aug = augment(real), augment(fake)
                        real_logits, fake_logits = D(real_aug, labels).float(), D(fake_aug, fake_labels).float()
                        loss = loss_fn.d_loss(real_logits, fake_logits)
                        if d_steps in inject:
                            loss = loss * float("nan")
                        total = loss + (penalty_loss(real_aug, fake_aug, labels) if with_penalty else 0)
                    scaler_D.scale(total / accum).backward()
                stats.report("Loss/D/main", loss)
                stats.report("D/real", real_logits.mean())
                stats.report("D/fake", fake_logits.mean())
            if step(opt_D, scaler_D, D_.parameters(), "D"):
                clip_weights(D_, cfg.loss.clip)

            # Lazy penalty: its own D step every `interval` D steps, on the same batch, loss x interval.
            if lazy and penalty.due(d_steps):
                opt_D.zero_grad(set_to_none=True)
                for micro, (real, fake, labels) in enumerate(micro_batches):
                    sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(D)
                    with sync:
                        with autocast():
                            total = penalty_loss(augment(real), augment(fake), labels)
                        scaler_D.scale(total / accum).backward()
                step(opt_D, scaler_D, D_.parameters(), "Dreg")
            d_steps += 1
            cur_nimg += batch

        # G phase: one step; D's gradients from it are discarded (and not all-reduced).
        opt_G.zero_grad(set_to_none=True)
        for micro in range(accum):
            labels = torch.randint(num_classes, (per_proc,), device=device) if num_classes else None
            z, _ = sample_fakes(labels)
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(G)
            with sync, acc.no_sync(D):
                with autocast():
                    g_loss = loss_fn.g_loss(D(augment(G(z, labels)), labels).float())
                scaler_G.scale(g_loss / accum).backward()
            stats.report("Loss/G/main", g_loss)
        g_ok = step(opt_G, scaler_G, G_.parameters(), "G")
        opt_D.zero_grad(set_to_none=True)
        if g_ok:
            ema.update(G_, cur_nimg, cur_nimg - prev_nimg)     # images since the last G step: n_critic x batch
        g_steps += 1
        if progress is not None:
            progress.update((cur_nimg - prev_nimg) / 1000)

        # Maintenance at tick, snapshot and checkpoint boundaries, and on preemption.
        done = cur_nimg >= total_nimg
        stop = preempt.any_rank(device)
        if crossed(prev_nimg, cur_nimg, t_cfg.tick_kimg) or done or stop:
            now = time.time()
            row = {"kimg": round(cur_nimg / 1000, 3), "cur_nimg": cur_nimg, "world_size": world,
                   "d_steps": d_steps, "g_steps": g_steps, **stats.reduce()}
            bad = loader.bad_counts()
            bad_tensor = torch.tensor([float(bad.get(k, 0)) for k in sorted(BAD_KINDS)], device=device)
            if world > 1:
                dist.all_reduce(bad_tensor)
            row.update({f"Data/skipped_{k}": int(v) for k, v in zip(sorted(BAD_KINDS), bad_tensor.tolist())})
            row.update({
                "LR/G": opt_G.param_groups[0]["lr"], "LR/D": opt_D.param_groups[0]["lr"],
                "Steps/skipped_nonfinite": skipped,
                "Timing/sec_per_kimg": (now - tick_time) / max((cur_nimg - tick_nimg) / 1000, 1e-9),
                "Timing/images_per_s": (cur_nimg - tick_nimg) / max(now - tick_time, 1e-9),
                "Timing/total_s": now - start_time,
                "Mem/cpu_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            })
            if device.type == "cuda":
                row["Mem/gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if scaler_D.is_enabled():
                row.update({"AMP/scale_G": scaler_G.get_scale(), "AMP/scale_D": scaler_D.get_scale()})
            writer.write(row, cur_nimg)
            line = (f"kimg {row['kimg']:.2f}  D {row.get('Loss/D/main', float('nan')):.3f}  "
                    f"G {row.get('Loss/G/main', float('nan')):.3f}  D(real) {row.get('D/real', 0):+.2f}  "
                    f"D(fake) {row.get('D/fake', 0):+.2f}  {row['Timing/sec_per_kimg']:.1f} s/kimg  "
                    f"{row['Timing/images_per_s']:.0f} img/s  skipped {skipped}")
            if main:
                progress.write(line) if progress is not None else log(line)
                save_grid(ema.model, grid_z, grid_c, run_dir / "samples" / f"fakes-{cur_nimg:09d}.png", writer, cur_nimg)
            tick_nimg, tick_time = cur_nimg, time.time()
        if main and (crossed(prev_nimg, cur_nimg, t_cfg.snapshot_kimg) or done):
            save_snapshot(ema.model, run_dir / "snapshots", cur_nimg=cur_nimg, model_cfg=cfg.model,
                          resolution=shards.resolution, channels=shards.channels, num_classes=num_classes,
                          extra={"config_hash": config_hash(cfg), "data_path": cfg.data.path})
        if crossed(prev_nimg, cur_nimg, t_cfg.checkpoint_kimg) or done or stop:
            check_ranks_identical({"G": G_, "D": D_}, device)
            per_rank = {"torch_cpu": torch.get_rng_state(), "loader": loader.state_dict(),
                        "param_digest": {n: _digest(m) for n, m in (("G", G_), ("D", D_))}}
            if device.type == "cuda":
                per_rank["torch_cuda"] = torch.cuda.get_rng_state(device)
            last_ckpt = save_checkpoint(
                run_dir, cur_nimg, rank=rank, world_size=world, per_rank=per_rank, barrier=acc.wait_for_everyone,
                keep=t_cfg.keep_checkpoints, shared=lambda: {
                    "G": G_.state_dict(), "D": D_.state_dict(), "G_ema": ema.state_dict(),
                    "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                    "scaler_G": scaler_G.state_dict(), "scaler_D": scaler_D.state_dict(),
                    "cur_nimg": cur_nimg, "d_steps": d_steps, "g_steps": g_steps, "skipped": skipped,
                    "world_size": world, "config": to_dict(cfg)})
        if stop and not done:
            log(f"preempted: checkpoint {last_ckpt} written at kimg {cur_nimg / 1000:.3f}; "
                f"exiting with status {EXIT_PREEMPTED} (run the same command again to resume)")
            writer.close()
            return EXIT_PREEMPTED

    if progress is not None:
        progress.close()
    if main:
        (run_dir / "FINISHED").write_text(json.dumps({"cur_nimg": cur_nimg, "kimg": cur_nimg / 1000,
                                                      "checkpoint": str(last_ckpt)}) + "\n")
    writer.close()
    log(f"done: {cur_nimg / 1000:.3f} kimg in {time.time() - start_time:.0f} s; run directory {run_dir}")
    acc.end_training()
    return 0



if __name__ == "__main__":
    sys.exit("run `ganpipe train --config FILE --run-dir RUN` instead")
