"""The training loop: one function that reads top to bottom.

    status = training_loop(cfg, Path("runs/mnist"))

Per G step: `n_critic` D steps (each a global batch of `data.batch_size` real images, split over
processes and accumulated micro-batches), each running the D phases that are due (D main, D's lazy
penalty), then the G phases that are due (G main, G's lazy penalty such as path length), then the
EMA update; at tick, snapshot and checkpoint boundaries (absolute multiples of their kimg, so a
resumed run stops at the same images as an uninterrupted one) the maintenance work. The phases
themselves are data (`phases.py`).

Accelerate owns devices, the process group and DDP (`broadcast_buffers=False`: D runs several
forwards before one backward, and BatchNorm buffers stay per rank). Mixed precision is ours:
`torch.autocast` plus one GradScaler per optimizer for fp16, because Accelerate shares one scaler
between G and D (accelerate #174) and the penalty recipe needs D's scaler explicitly.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from pipeline import dist, generate
from pipeline.training import schedules, trackers
from pipeline.config import Config, config_hash, to_dict
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.errors import ConfigError, DataError
from pipeline.io import write_json_atomic
from pipeline.networks import build_networks
from pipeline.training.checkpoint import load_checkpoint, load_newest_checkpoint, save_checkpoint
from pipeline.training.ema import EMA, PowerEMA
from pipeline.training.phases import (MicroBatch, NonFiniteGuard, Phases, accumulate, autocast_for, build_phases,
                                      first_layers, step, unwrap)
from pipeline.training.snapshot import prune_snapshots, save_snapshot
from pipeline.training.stats import Stats, StatsWriter

EXIT_PREEMPTED = 3          # checkpoint written after SIGTERM/SIGUSR1/Ctrl-C: requeue and run again to resume
PREEMPTED = "PREEMPTED"     # RUN/PREEMPTED: written with that checkpoint, removed when the run starts again
STOP = "STOP"               # RUN/STOP (`ganpipe watch --stop-on-alert`, or by hand): checkpoint at the next tick, exit 0
# Skipped-sample counters of the loader, logged as Data/skipped_<kind>.
BAD_KINDS = ("undecodable", "wrong_shape", "missing_label", "bad_label", "truncated", "read_error")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    cur_nimg: int = 0               # real images shown to D so far
    d_steps: int = 0
    g_steps: int = 0


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype. `auto` follows `accelerate launch --mixed_precision` (or a launch/*.yaml) when
    one is given, else bf16 on GPUs that support it and fp32 on CPU."""
    if name == "auto":
        launcher = dist.launch_env().mixed_precision
        if launcher in ("bf16", "fp16"):
            return {"bf16": torch.bfloat16, "fp16": torch.float16}[launcher]
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that is not known."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def crossed(prev_nimg: int, cur_nimg: int, every_kimg: float) -> bool:
    """Whether an absolute multiple of `every_kimg` lies in (prev_nimg, cur_nimg]."""
    if every_kimg <= 0:
        return False
    every = every_kimg * 1000
    return math.floor(cur_nimg / every) > math.floor(prev_nimg / every)


def start_processes(threads: int, peer_timeout_s: float, log_with: list[str] | None = None) -> Accelerator:
    """The Accelerator (with the trackers `log_with`, trackers.py), and torch threads so that all local
    processes together fill the cores."""
    # broadcast_buffers=False is what we mean (BatchNorm statistics stay per rank, no in-place
    # broadcast between D's forwards); torch calls it deprecated in favour of an option that would
    # still sync buffers at init. mixed_precision="no": autocast and scalers are ours.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", log_with=log_with or None,
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                                       dist.process_group_timeout(peer_timeout_s)])
    local = dist.launch_env().local_world_size if acc.num_processes > 1 else 1
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
    return acc


def device_flags(device: torch.device, speed) -> dict:
    """cuDNN autotuning and TF32 as `speed.cudnn_benchmark` / `speed.tf32` say, on a GPU only (a
    CPU run leaves torch's flags alone); returns what was set."""
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = bool(speed.cudnn_benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(speed.tf32)
    return {"cudnn_benchmark": bool(speed.cudnn_benchmark), "tf32": bool(speed.tf32)}


@contextlib.contextmanager
def no_host_sync(device: torch.device, enabled: bool):
    """`speed.sync_debug` on a GPU: inside, any operation that waits for the device (`.item()`,
    `bool(tensor)`, a blocking copy to the host) raises, naming its line (torch's sync debug mode);
    on a CPU, or when off, nothing. The loop enters it for the steps between ticks. On a CPU the same
    property is tested by counting host reads (tests/test_host_sync.py)."""
    if not enabled or device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def split_batch(batch: int, per_process: int, world: int) -> tuple[int, int]:
    """(images per process per forward, micro-batches per step) for a global batch."""
    per_proc = per_process or batch // world
    if per_proc < 1 or batch % (per_proc * world):
        raise ConfigError(f"data.batch_size={batch} is not a multiple of train.batch_per_process={per_proc} x "
                          f"{world} processes; pick a global batch divisible by both")
    return per_proc, batch // (per_proc * world)


def training_state(G, D, ema: EMA, phases: Phases, progress: Progress, guard: NonFiniteGuard, world: int,
                   cfg: Config, weights_finite: bool, posthoc: PowerEMA | None = None) -> dict:
    """What rank 0 writes into a checkpoint (the same on every rank)."""
    d, g = phases.named("D"), phases.named("G")
    return {"G": unwrap(G).state_dict(), "D": unwrap(D).state_dict(), "G_ema": ema.state_dict(),
            "opt_G": g.optimizer.state_dict(), "opt_D": d.optimizer.state_dict(),
            "scaler_G": g.scaler.state_dict(), "scaler_D": d.scaler.state_dict(),
            "cur_nimg": progress.cur_nimg, "d_steps": progress.d_steps, "g_steps": progress.g_steps,
            "skipped": guard.skipped, "world_size": world, "config": to_dict(cfg), "finite": weights_finite,
            "ada": phases.ada.state_dict() if phases.ada is not None else {},
            "penalties": phases.penalty_state(),
            "posthoc_ema": posthoc.state_dict() if posthoc is not None else {}}


def snapshot_variants(G, posthoc: PowerEMA | None, raw: bool) -> dict:
    """What a snapshot keeps beside the EMA G: the raw G (train.snapshot_raw) and the EMA profiles."""
    return {**({"raw": (unwrap(G), {})} if raw else {}), **(posthoc.variants() if posthoc is not None else {})}


def stop_requested(run_dir: Path, main: bool) -> str:
    """What RUN/STOP says (its first line, or its path when empty), as rank 0 read it, on every
    rank; "" when there is none. A collective: every rank calls it at the same (tick) steps."""
    reason = ""
    if main and (path := run_dir / STOP).is_file():
        try:
            reason = next(iter(path.read_text(errors="replace").strip().splitlines()), "")[:300] or str(path)
        except OSError:
            reason = str(path)       # removed between the check and the read, or unreadable: still a request
    return dist.broadcast_object(reason)


def finite(G, D) -> bool:
    """Whether every weight of G and D is finite: only such a checkpoint is a good one to go back to."""
    return all(bool(torch.isfinite(p).all()) for net in (G, D) for p in unwrap(net).parameters())


def rank_state(G, D, loader: StreamLoader, device: torch.device) -> dict:
    """What each rank writes: its RNG states, its loader position and a digest of its replicas."""
    state = {"torch_cpu": torch.get_rng_state(), "loader": loader.state_dict(),
             "param_digest": {"G": dist.param_digest(unwrap(G)), "D": dist.param_digest(unwrap(D))}}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def resume(run_dir: Path, G, D, ema: EMA, phases: Phases, guard: NonFiniteGuard, *, rank: int, world: int,
           device: torch.device, seed: int, log, posthoc: PowerEMA | None = None
           ) -> tuple[Progress, dict | None, Path | None]:
    """Restore the newest complete checkpoint of the run, if any: (progress, loader state, path).
    The RNG and loader streams come back exactly when the process count is the same."""
    torch.manual_seed(seed * 1000 + rank)
    if (found := load_newest_checkpoint(run_dir, rank, log)) is None:
        return Progress(), None, None
    path, state, mine = found
    unwrap(G).load_state_dict(state["G"])
    unwrap(D).load_state_dict(state["D"])
    ema.load_state_dict(state["G_ema"])
    if posthoc is not None:
        posthoc.load_state_dict(state["posthoc_ema"])      # the profiles go on as if never stopped
    for phase, key in ((phases.named("G"), "G"), (phases.named("D"), "D")):
        phase.optimizer.load_state_dict(state[f"opt_{key}"])
        phase.scaler.load_state_dict(state[f"scaler_{key}"])
    if phases.ada is not None and state.get("ada"):
        phases.ada.load_state_dict(state["ada"])
    phases.load_penalty_state(state.get("penalties", {}))       # pl's running mean
    progress = Progress(state["cur_nimg"], state["d_steps"], state["g_steps"])
    guard.skipped = state["skipped"]
    loader_state = None
    if mine is not None and state["world_size"] == world:
        torch.set_rng_state(mine["torch_cpu"])
        if device.type == "cuda" and "torch_cuda" in mine:
            torch.cuda.set_rng_state(mine["torch_cuda"], device)
        loader_state = mine["loader"]
    else:
        log(f"resume: checkpoint was written by {state['world_size']} processes, this run has {world}: "
            "RNG and data streams start afresh (training state is exact)")
        torch.manual_seed(seed * 1000 + rank + progress.cur_nimg)
    log(f"resumed from {path} at kimg {progress.cur_nimg / 1000:.3f}")
    return progress, loader_state, path


def initialise_from(source: str, G, D, ema: EMA, log) -> None:
    """A new run's weights from another run (`train.init_from`): a checkpoint directory or a run
    directory (G, D and G_ema of its newest checkpoint), or a snapshot record (G and G_ema only).
    Optimizers, counters and data streams start afresh; the recorded config names the source."""
    path = Path(source).expanduser()
    if path.suffix in (".json", ".safetensors"):
        from safetensors.torch import load_file

        from pipeline.training.snapshot import read_snapshot_meta
        weights = {"G": load_file(read_snapshot_meta(path)["weights_path"])}
        weights["G_ema"] = weights["G"]
    else:
        found = load_newest_checkpoint(path, 0, log) if (path / "checkpoints").is_dir() else (
            (path, *load_checkpoint(path, 0)) if (path / "state.pt").is_file() else None)
        if found is None:
            raise ConfigError(f"train.init_from: {path} is no snapshot record, checkpoint or run directory with "
                              "checkpoints")
        weights = {k: found[1][k] for k in ("G", "D", "G_ema")}
    try:
        unwrap(G).load_state_dict(weights["G"])
        ema.load_state_dict(weights["G_ema"])
        if "D" in weights:
            unwrap(D).load_state_dict(weights["D"])
    except RuntimeError as exc:
        raise ConfigError(f"train.init_from: the weights in {path} do not fit this model "
                          f"({str(exc).splitlines()[0][:160]}); use the same model.* settings") from None
    log(f"initialised {', '.join(weights)} from {path}")


def tick_row(stats: Stats, loader: StreamLoader, phases: Phases, progress: Progress, guard: NonFiniteGuard,
             world: int, device: torch.device, since: tuple[int, float], start_time: float) -> dict:
    """One row of stats.jsonl: this tick's means over all ranks, counters, rates and memory."""
    now, (tick_nimg, tick_time) = time.time(), since
    row = {"kimg": round(progress.cur_nimg / 1000, 3), "cur_nimg": progress.cur_nimg, "world_size": world,
           "d_steps": progress.d_steps, "g_steps": progress.g_steps, **stats.reduce()}
    bad = loader.bad_counts()
    bad_tensor = dist.all_reduce_sum(torch.tensor([float(bad.get(k, 0)) for k in sorted(BAD_KINDS)], device=device))
    row.update({f"Data/skipped_{k}": int(v) for k, v in zip(sorted(BAD_KINDS), bad_tensor.tolist())})
    images = progress.cur_nimg - tick_nimg
    row.update({
        "LR/G": phases.named("G").optimizer.param_groups[0]["lr"],
        "LR/D": phases.named("D").optimizer.param_groups[0]["lr"],
        "Steps/skipped_nonfinite": guard.skipped,
        "Timing/sec_per_kimg": (now - tick_time) / max(images / 1000, 1e-9),
        "Timing/images_per_s": images / max(now - tick_time, 1e-9),
        "Timing/total_s": now - start_time,
        "Mem/cpu_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    })
    if device.type == "cuda":
        row["Mem/gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if phases.named("D").scaler.is_enabled():
        row.update({"AMP/scale_G": phases.named("G").scaler.get_scale(),
                    "AMP/scale_D": phases.named("D").scaler.get_scale()})
    return row


def status_line(row: dict) -> str:
    return (f"kimg {row['kimg']:.2f}  D {row.get('Loss/D/main', float('nan')):.3f}  "
            f"G {row.get('Loss/G/main', float('nan')):.3f}  D(real) {row.get('D/real', 0):+.2f}  "
            f"D(fake) {row.get('D/fake', 0):+.2f}  {row['Timing/sec_per_kimg']:.1f} s/kimg  "
            f"{row['Timing/images_per_s']:.0f} img/s  skipped {row['Steps/skipped_nonfinite']}")


def training_loop(cfg: Config, run_dir: Path) -> int:
    t_cfg = cfg.train
    # Start the processes and split the global batch into processes x micro-batches x per-process batch.
    external = trackers.chosen(cfg)         # W&B, MLflow beside our TensorBoard: checked before any work
    acc = start_processes(t_cfg.threads, t_cfg.peer_timeout_s, external)
    rank, world, device, main = acc.process_index, acc.num_processes, acc.device, acc.is_main_process
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    batch = cfg.data.batch_size
    per_proc, accum = split_batch(batch, t_cfg.batch_per_process, world)
    if t_cfg.reuse_fakes and (t_cfg.n_critic != 1 or accum != 1):
        raise ConfigError(f"train.reuse_fakes needs train.n_critic=1 and one micro-batch per step (here n_critic "
                          f"{t_cfg.n_critic}, {accum} micro-batches of {per_proc}); set train.reuse_fakes=false")
    dtype = resolve_precision(cfg.speed.mixed_precision, device)
    device_flags(device, cfg.speed)
    autocast = autocast_for(device, dtype)

    # Build networks (same init on every rank), EMA, phases; resume; then the data stream.
    shards = ShardSet.resolve(cfg.data.path, cfg.data.split, cfg.data.resolution, cfg.data.channels,
                              cfg.data.num_classes)
    conditional = cfg.model.conditional
    torch.manual_seed(cfg.seed)
    G, D = build_networks(cfg.model, resolution=shards.resolution, channels=shards.channels,
                          num_classes=shards.num_classes)
    if cfg.speed.channels_last and shards.resolution:
        # NHWC weights: every convolution then runs (and hands on) channels-last activations.
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    for p in first_layers(D, t_cfg.freeze_d_layers):
        p.requires_grad_(False)             # FreezeD: before DDP, which reduces only trainable ones
    ema = EMA(G, cfg.ema.halflife_kimg, cfg.ema.rampup)
    ema.model.to(device)
    posthoc = PowerEMA(G, cfg.ema.posthoc_std).to(device) if cfg.ema.posthoc_std else None
    G, D = acc.prepare(G, D)
    z_dim, num_classes = unwrap(G).z_dim, unwrap(G).num_classes
    stats = Stats(device)
    phases = build_phases(cfg, G=G, D=D, device=device, dtype=dtype, report=stats.report)
    good = {"checkpoint": None}                 # newest checkpoint whose weights are finite
    guard = NonFiniteGuard(t_cfg.max_nonfinite_steps, lambda: str(good["checkpoint"] or "none yet"),
                           lambda: progress.cur_nimg / 1000)
    progress, loader_state, last_ckpt = resume(run_dir, G, D, ema, phases, guard, rank=rank, world=world,
                                               device=device, seed=cfg.seed, log=log, posthoc=posthoc)
    good["checkpoint"] = last_ckpt
    if last_ckpt is None and t_cfg.init_from:
        initialise_from(t_cfg.init_from, G, D, ema, log)
    # Streams restored exactly when possible; otherwise fresh ones, seeded away from the run's start.
    fresh = loader_state is None and progress.cur_nimg > 0
    loader = StreamLoader.from_config(cfg.data, batch_size=per_proc, seed=cfg.seed + (progress.cur_nimg if fresh else 0),
                                      rank=rank, world_size=world, device=device, require_labels=conditional)
    if loader_state is not None:
        try:
            loader.load_state_dict(loader_state)
        except DataError as exc:
            log(f"resume: {exc}")

    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (run_dir / PREEMPTED).unlink(missing_ok=True)
        if (run_dir / STOP).is_file():
            log(f"{run_dir / STOP} exists: training stops at the first tick (remove the file to train on)")
    writer = StatsWriter(run_dir, enabled=main, resume_nimg=progress.cur_nimg,
                         tensorboard="tensorboard" in cfg.log.trackers,
                         trackers=trackers.open_training(acc, cfg, run_dir, external, log))
    total_nimg = int(t_cfg.total_kimg * 1000)
    log(f"training {cfg.model.name} G {unwrap(G).num_params():,} / D {unwrap(D).num_params():,} params on {world} x "
        f"{device.type} (batch {batch} = {world} x {accum} x {per_proc}, precision {dtype or 'fp32'}, "
        f"{loader.num_workers} loader workers per process) to {t_cfg.total_kimg} kimg")
    progress_bar = None
    if main and cfg.log.progress:
        from tqdm import tqdm
        progress_bar = tqdm(total=t_cfg.total_kimg, initial=progress.cur_nimg / 1000, unit="kimg", dynamic_ncols=True,
                            disable=None, bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}]")
    since, start_time = (progress.cur_nimg, time.time()), time.time()
    ticks_here = 0                      # ticks in this process: sync_debug checks the steps after the first
    startup_s = process_age_s()         # `ganpipe train` to the first step: imports, set-up, resume
    if startup_s is not None:
        log(f"first step {startup_s:.1f} s after the process started")

    with dist.Preemption() as preemption, dist.peer_failures("training", t_cfg.peer_timeout_s):
        while progress.cur_nimg < total_nimg:
            prev_nimg = progress.cur_nimg
            # Train: D steps, then G steps, with no host synchronisation (speed.sync_debug checks it).
            with no_host_sync(device, cfg.speed.sync_debug and ticks_here > 0):
                # D side: n_critic steps, each one global batch of real images and the fakes G makes for it.
                for _ in range(t_cfg.n_critic):
                    scheduled = schedules.apply(cfg, phases, ema, progress.cur_nimg)
                    micro_batches = []
                    for _ in range(accum):
                        real, labels = loader.next()
                        labels = labels if conditional else None
                        z = torch.randn(per_proc, z_dim, device=device)
                        # train.reuse_fakes: G's graph is kept for its own step; D sees the fakes detached.
                        with torch.set_grad_enabled(t_cfg.reuse_fakes), autocast():
                            fake = G(z, labels)
                        micro_batches.append(MicroBatch(z=z, labels=labels, real=real, fake=fake.detach(),
                                                        kept=fake if t_cfg.reuse_fakes else None))
                    for phase in phases.due("D", progress.d_steps):
                        accumulate(phase, micro_batches, autocast)
                        step(phase, guard, stats.report)
                    progress.d_steps += 1
                    progress.cur_nimg += batch
                    if phases.ada is not None:
                        phases.ada.update(progress.d_steps, batch)

                # G side: fresh latents, with drawn labels, or with the last D step's reals and their labels
                # for a relativistic loss (or that step's own fakes, train.reuse_fakes); the EMA follows G
                # after a real G step only.
                d_batches, micro_batches = micro_batches, []
                for d in d_batches:
                    if d.kept is not None:
                        micro_batches.append(MicroBatch(z=d.z, labels=d.labels, real=d.real, kept=d.kept))
                        continue
                    labels = torch.randint(num_classes, (per_proc,), device=device) if num_classes else None
                    z = torch.randn(per_proc, z_dim, device=device)
                    micro_batches.append(MicroBatch(z=z, labels=d.labels, real=d.real) if phases.pairs_reals
                                         else MicroBatch(z=z, labels=labels))
                for phase in phases.due("G", progress.g_steps):
                    accumulate(phase, micro_batches, autocast)
                    taken = step(phase, guard, stats.report)
                    if phase.name == "G":   # images since the last G step: n_critic x batch; no move if skipped
                        ema.update(unwrap(G), progress.cur_nimg, progress.cur_nimg - prev_nimg, taken=taken)
                        if posthoc is not None:     # t counts G steps; a skipped step averages in the unchanged G
                            posthoc.update(unwrap(G), progress.g_steps + 1)
                progress.g_steps += 1
                if progress_bar is not None:
                    progress_bar.update((progress.cur_nimg - prev_nimg) / 1000)

            # Maintenance at tick, snapshot and checkpoint boundaries, and on preemption.
            done = progress.cur_nimg >= total_nimg
            stop = preemption.requested()
            tick = crossed(prev_nimg, progress.cur_nimg, t_cfg.tick_kimg) or done or stop
            # RUN/STOP ends the run like preemption; read at ticks only, by rank 0, and broadcast.
            halt = tick and not done and not stop and stop_requested(run_dir, main)
            checkpoint = crossed(prev_nimg, progress.cur_nimg, t_cfg.checkpoint_kimg) or done or stop or halt
            if tick or checkpoint:
                guard.check()       # the one read of the skip counters: too many in a row stop the run
            if tick:
                row = {**tick_row(stats, loader, phases, progress, guard, world, device, since, start_time),
                       **scheduled, **(phases.ada.stats() if phases.ada is not None else {}),
                       **({"Timing/startup_s": startup_s} if startup_s is not None else {})}
                writer.write(row, progress.cur_nimg)
                if main:
                    progress_bar.write(status_line(row)) if progress_bar is not None else log(status_line(row))
                    png = run_dir / "samples" / f"fakes-{progress.cur_nimg:09d}.png"
                    grid = generate.save_grid(generate.images(ema.model, seed=cfg.seed, start=0,
                                                              count=cfg.log.grid_size, device=device), png,
                                              compress_level=1)
                    if grid is not None:
                        writer.image("Samples/fakes", png, progress.cur_nimg)
                since, ticks_here = (progress.cur_nimg, time.time()), ticks_here + 1
            if main and (crossed(prev_nimg, progress.cur_nimg, t_cfg.snapshot_kimg) or done):
                save_snapshot(ema.model, run_dir / "snapshots", cur_nimg=progress.cur_nimg, model_cfg=cfg.model,
                              resolution=shards.resolution, channels=shards.channels, num_classes=num_classes,
                              extra={"config_hash": config_hash(cfg), "data_path": cfg.data.path},
                              variants=snapshot_variants(G, posthoc, t_cfg.snapshot_raw))
                prune_snapshots(run_dir, t_cfg.keep_snapshots, log)
            if checkpoint:
                dist.check_ranks_identical({"G": unwrap(G), "D": unwrap(D)}, device)
                ok = finite(G, D)
                last_ckpt = save_checkpoint(
                    run_dir, progress.cur_nimg, rank=rank, world_size=world, keep=t_cfg.keep_checkpoints,
                    per_rank=rank_state(G, D, loader, device),
                    shared=lambda: training_state(G, D, ema, phases, progress, guard, world, cfg, ok, posthoc))
                good["checkpoint"] = last_ckpt if ok else good["checkpoint"]
            if halt:
                log(f"stopped on request ({halt}): checkpoint {last_ckpt} written at kimg "
                    f"{progress.cur_nimg / 1000:.3f}; exiting with status 0 (remove {run_dir / STOP} and run the "
                    "same command again to resume)")
                writer.close()
                return 0
            if stop and not done:
                if main:    # launchers may not keep exit status 3: the marker says it to the job script
                    write_json_atomic(run_dir / PREEMPTED, {"cur_nimg": progress.cur_nimg, "checkpoint": str(last_ckpt)})
                log(f"preempted: checkpoint {last_ckpt} written at kimg {progress.cur_nimg / 1000:.3f}; "
                    f"exiting with status {EXIT_PREEMPTED} (run the same command again to resume)")
                writer.close()
                return EXIT_PREEMPTED

    if progress_bar is not None:
        progress_bar.close()
    if main:
        write_json_atomic(run_dir / "FINISHED", {"cur_nimg": progress.cur_nimg, "kimg": progress.cur_nimg / 1000,
                                                 "checkpoint": str(last_ckpt)})
    writer.close()
    log(f"done: {progress.cur_nimg / 1000:.3f} kimg in {time.time() - start_time:.0f} s; run directory {run_dir}")
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit("run `ganpipe train --config FILE --run-dir RUN` instead")
