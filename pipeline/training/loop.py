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

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from pipeline import dist, generate
from pipeline.training import schedules, trackers
from pipeline.catalog import check
from pipeline.config import Config, config_hash, config_yaml, to_dict
from pipeline.data.loader import ShardSet, StreamLoader
from pipeline.errors import ConfigError, DataError, UserError, printable
from pipeline.io import write_text_atomic
from pipeline.networks import build_networks
from pipeline.rundir import RunDir, TrainerLock
from pipeline.training.checkpoint import load_checkpoint, load_newest_checkpoint, save_checkpoint
from pipeline.training.ema import EMA, PowerEMA
from pipeline.training.phases import (MicroBatch, NonFiniteGuard, accumulate, autocast_for, build_phases, first_layers,
                                      step, unwrap)
from pipeline.training.snapshot import SnapshotInfo, prune_snapshots, save_snapshot
from pipeline.training.state import TrainState
from pipeline.training.stats import Stats, StatsWriter

EXIT_PREEMPTED = 3          # checkpoint written after SIGTERM/SIGUSR1/Ctrl-C: requeue and run again to resume
# Skipped-sample counters of the loader, logged as Data/skipped_<kind>.
BAD_KINDS = ("undecodable", "wrong_shape", "missing_label", "bad_label", "truncated", "read_error")


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


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: its affinity mask (Slurm's --cpus-per-task, taskset),
    capped by a cgroup CPU quota (containers, Kubernetes limits); never os.cpu_count(), which counts
    the whole node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in ((cgroup / "cpu.max", None),
                                    (cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            quota, period = fields[0], (fields[1] if period_file is None else period_file.read_text().strip())
            if quota not in ("max", "-1"):
                cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
            break
        except (OSError, ValueError, IndexError):
            continue
    return max(1, cpus)


def start_processes(threads: int, peer_timeout_s: float, log_with: list[str] | None = None) -> Accelerator:
    """The Accelerator (with the trackers `log_with`, trackers.py), and torch threads so that all local
    processes together fill the CPUs this process may use (`usable_cpus`)."""
    # broadcast_buffers=False is what we mean (BatchNorm statistics stay per rank, no in-place
    # broadcast between D's forwards); torch calls it deprecated in favour of an option that would
    # still sync buffers at init. mixed_precision="no": autocast and scalers are ours.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no", log_with=log_with or None,
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                                       dist.process_group_timeout(peer_timeout_s)])
    local = dist.launch_env().local_world_size if acc.num_processes > 1 else 1
    torch.set_num_threads(threads or max(1, usable_cpus() // local))
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
    """(images per process per forward, micro-batches per step) for a global batch that
    `catalog.check` has found divisible."""
    per_proc = per_process or batch // world
    return per_proc, batch // (per_proc * world)


@dataclass
class Session:
    """This process's place in the run: the Accelerator, its device, precision, batch split and
    the sums its reports go to (reduced over every rank at each tick)."""
    acc: Accelerator
    dtype: torch.dtype | None       # autocast dtype (None: fp32)
    per_proc: int                   # images per process per forward
    accum: int                      # micro-batches per optimizer step
    stats: Stats

    rank = property(lambda self: self.acc.process_index)
    world = property(lambda self: self.acc.num_processes)
    device = property(lambda self: self.acc.device)
    main = property(lambda self: self.acc.is_main_process)

    def log(self, msg: str) -> None:
        """A line on rank 0's stdout, above the progress bar when there is one."""
        if self.main:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def autocast(self):
        return autocast_for(self.device, self.dtype)()


def start_session(cfg: Config) -> Session:
    """Check what depends on the number of processes (before any work), start them (with the
    trackers beside TensorBoard) and split the global batch into processes x micro-batches x
    per-process batch."""
    check(cfg, world_size=dist.launch_env().world_size)
    acc = start_processes(cfg.train.threads, cfg.train.peer_timeout_s, trackers.chosen(cfg))
    per_proc, accum = split_batch(cfg.data.batch_size, cfg.train.batch_per_process, acc.num_processes)
    device_flags(acc.device, cfg.speed)
    return Session(acc, resolve_precision(cfg.speed.mixed_precision, acc.device), per_proc, accum, Stats(acc.device))


def build_state(cfg: Config, session: Session, shards: ShardSet) -> TrainState:
    """Networks (the same init on every rank), EMA and its profiles, DDP, phases and the guard."""
    torch.manual_seed(cfg.seed)
    G, D = build_networks(cfg.model, resolution=shards.resolution, channels=shards.channels,
                          num_classes=shards.num_classes)
    if cfg.speed.channels_last and shards.resolution:
        # NHWC weights: every convolution then runs (and hands on) channels-last activations.
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    for p in first_layers(D, cfg.train.freeze_d_layers):
        p.requires_grad_(False)             # FreezeD: before DDP, which reduces only trainable ones
    ema = EMA(G, cfg.ema.halflife_kimg, cfg.ema.rampup)
    ema.model.to(session.device)
    posthoc = PowerEMA(G, cfg.ema.posthoc_std).to(session.device) if cfg.ema.posthoc_std else None
    G, D = session.acc.prepare(G, D)
    phases = build_phases(cfg, G=G, D=D, device=session.device, dtype=session.dtype, report=session.stats.report)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, lambda: str(state.good_checkpoint or "none yet"),
                           lambda: state.progress.cur_nimg / 1000)
    state = TrainState(G, D, ema, phases, guard, posthoc=posthoc)
    return state


def resume(run: RunDir, state: TrainState, session: Session, seed: int) -> tuple[dict | None, Path | None]:
    """Restore the newest complete checkpoint of the run, if any: (loader state, its path). The RNG
    and loader streams come back exactly when the process count is the same."""
    torch.manual_seed(seed * 1000 + session.rank)
    if (found := load_newest_checkpoint(run.path, session.rank, session.log)) is None:
        return None, None
    path, shared, mine = found
    state.load_state_dict(shared)
    loader_state = None
    if mine is not None and shared["world_size"] == session.world:
        loader_state = state.load_rank_state_dict(mine, session.device)
    else:
        session.log(f"resume: checkpoint was written by {shared['world_size']} processes, this run has "
                    f"{session.world}: RNG and data streams start afresh (training state is exact)")
        torch.manual_seed(seed * 1000 + session.rank + state.progress.cur_nimg)
    session.log(f"resumed from {path} at kimg {state.progress.cur_nimg / 1000:.3f}")
    return loader_state, path


def initialise_from(source: str, state: TrainState, log) -> None:
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
        found = load_newest_checkpoint(path, 0, log) if RunDir(path).has_checkpoints() else (
            (path, *load_checkpoint(path, 0)) if (path / "state.pt").is_file() else None)
        if found is None:
            raise ConfigError(f"train.init_from: {path} is no snapshot record, checkpoint or run directory with "
                              "checkpoints")
        weights = {k: found[1][k] for k in ("G", "D", "G_ema")}
    try:
        state.load_weights(weights)
    except RuntimeError as exc:
        raise ConfigError(f"train.init_from: the weights in {path} do not fit this model "
                          f"({str(exc).splitlines()[0][:160]}); use the same model.* settings") from None
    log(f"initialised {', '.join(weights)} from {path}")


def open_loader(cfg: Config, session: Session, state: TrainState, loader_state: dict | None) -> StreamLoader:
    """The data stream, restored exactly when possible; otherwise a fresh one, seeded away from the
    run's start when the run has images behind it. Batches arrive on the session's device, through
    page-locked memory when `speed.pin_memory` says so."""
    fresh = loader_state is None and state.progress.cur_nimg > 0
    loader = StreamLoader.from_config(cfg.data, batch_size=session.per_proc, rank=session.rank,
                                      seed=cfg.seed + (state.progress.cur_nimg if fresh else 0),
                                      world_size=session.world, device=session.device,
                                      require_labels=cfg.model.conditional, pin_memory=cfg.speed.pin_memory)
    if loader_state is not None:
        try:
            loader.load_state_dict(loader_state)
        except DataError as exc:
            session.log(f"resume: {exc}")
    return loader


def d_steps(cfg: Config, session: Session, state: TrainState, loader: StreamLoader) -> tuple[list, dict]:
    """D's side of one G step: n_critic steps, each one global batch of real images and the fakes
    G makes for them. Returns the last step's micro-batches and the scheduled values."""
    progress, G, batch = state.progress, state.G, cfg.data.batch_size
    for _ in range(cfg.train.n_critic):
        scheduled = schedules.apply(cfg, state.phases, state.ema, progress.cur_nimg)
        micro_batches = []
        for _ in range(session.accum):
            real, labels = loader.next()
            labels = labels if cfg.model.conditional else None
            z = torch.randn(session.per_proc, unwrap(G).z_dim, device=session.device)
            # train.reuse_fakes: G's graph is kept for its own step; D sees the fakes detached.
            with torch.set_grad_enabled(cfg.train.reuse_fakes), session.autocast():
                fake = G(z, labels)
            micro_batches.append(MicroBatch(z=z, labels=labels, real=real, fake=fake.detach(),
                                            kept=fake if cfg.train.reuse_fakes else None))
        for phase in state.phases.due("D", progress.d_steps):
            accumulate(phase, micro_batches, session.autocast)
            step(phase, state.guard, session.stats.report)
        progress.d_steps += 1
        progress.cur_nimg += batch
        if state.phases.ada is not None:
            state.phases.ada.update(progress.d_steps, batch)
    return micro_batches, scheduled


def g_step(session: Session, state: TrainState, d_batches: list, images: int,
           classes: generate.LabelDistribution | None = None) -> None:
    """G's side: fresh latents with labels drawn from `classes` (`gen_labels`; default uniform), or
    the last D step's reals and labels for a relativistic loss (or that step's own fakes,
    train.reuse_fakes); the EMA follows G after all of the step's G phases (path length too, as
    StyleGAN2-ADA), and only when G's main step was taken (`images`: real images since the last G step)."""
    G, phases, progress = unwrap(state.G), state.phases, state.progress
    if classes is None and G.num_classes:
        classes = generate.LabelDistribution("uniform", G.num_classes)
    micro_batches = []
    for d in d_batches:
        if d.kept is not None:
            micro_batches.append(MicroBatch(z=d.z, labels=d.labels, real=d.real, kept=d.kept))
            continue
        # From the device RNG, which checkpoints keep: a resumed run draws the same labels.
        labels = classes.draw(session.per_proc, session.device) if G.num_classes else None
        z = torch.randn(session.per_proc, G.z_dim, device=session.device)
        micro_batches.append(MicroBatch(z=z, labels=d.labels, real=d.real) if phases.pairs_reals
                             else MicroBatch(z=z, labels=labels))
    taken = {}
    for phase in phases.due("G", progress.g_steps):
        accumulate(phase, micro_batches, session.autocast)
        taken[phase.name] = step(phase, state.guard, session.stats.report)
    state.ema.update(G, progress.cur_nimg, images, taken=taken["G"])     # no move if G's step was skipped
    if state.posthoc is not None:   # t counts G steps; a skipped step averages in the unchanged G
        state.posthoc.update(G, progress.g_steps + 1)
    progress.g_steps += 1


def gen_labels(cfg: Config, shards: ShardSet) -> generate.LabelDistribution | None:
    """The classes G's own steps draw (`train.gen_labels`) for a conditional model, else None; a
    UserError, before anything is written, when `data` finds no class counts to draw from."""
    if not cfg.model.conditional or not shards.num_classes:
        return None
    if cfg.train.gen_labels == "uniform":
        return generate.LabelDistribution("uniform", shards.num_classes)
    if shards.data_dir is None:
        raise UserError(f"train.gen_labels=data draws G's classes from the class counts in a prepared directory's "
                        f"manifest; data.path {printable(cfg.data.path)} is a URL pattern without one: set "
                        "train.gen_labels=uniform, or index the shards with `ganpipe index-shards PATTERN --out DIR`")
    return generate.data_labels(shards.data_dir, cfg.data.split, shards.num_classes)


class Upkeep:
    """The work at tick, snapshot and checkpoint boundaries: stats rows, status lines, grids,
    snapshots and checkpoints. Rank 0 writes; every rank joins the collectives."""

    def __init__(self, cfg: Config, run: RunDir, session: Session, state: TrainState, loader: StreamLoader,
                 shards: ShardSet):
        self.cfg, self.run, self.session, self.state, self.loader, self.shards = cfg, run, session, state, loader, shards
        self.writer = StatsWriter(run.path, enabled=session.main, resume_nimg=state.progress.cur_nimg,
                                  sink=trackers.Sink.for_training(session.acc, cfg, run.path, session.log))
        self.bar = None
        if session.main and cfg.log.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.total_kimg, initial=state.progress.cur_nimg / 1000, unit="kimg",
                            dynamic_ncols=True, disable=None,
                            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}]")
        self.since, self.start_time = (state.progress.cur_nimg, time.time()), time.time()
        self.ticks = 0                      # ticks in this process: sync_debug checks the steps after the first
        self.startup_s = process_age_s()    # `ganpipe train` to the first step: imports, set-up, resume
        self.last_checkpoint: Path | None = state.good_checkpoint
        self.labels = gen_labels(cfg, shards)   # what snapshots record, for eval to draw alike

    def advance(self, images: int) -> None:
        """Move the bar, never past its end (the last step may end beyond train.total_kimg)."""
        if self.bar is not None:
            self.bar.update(min(images / 1000, self.bar.total - self.bar.n))

    def tick(self, scheduled: dict) -> None:
        """One stats row (means over every rank since the last tick), the status line and a grid."""
        state, session, progress = self.state, self.session, self.state.progress
        ada = state.phases.ada
        row = {**self.tick_row(), **scheduled, **(ada.stats() if ada is not None else {}),
               **({"Timing/startup_s": self.startup_s} if self.startup_s is not None else {})}
        self.writer.write(row, progress.cur_nimg)
        if session.main:
            session.log(status_line(row))
            png = self.run.grid(progress.cur_nimg)
            grid = generate.save_grid(generate.images(state.ema.model, seed=self.cfg.seed, start=0,
                                                      count=self.cfg.log.grid_size, device=session.device), png,
                                      compress_level=1)
            if grid is not None:
                self.writer.image("Samples/fakes", png, progress.cur_nimg)
        self.since, self.ticks = (progress.cur_nimg, time.time()), self.ticks + 1

    def tick_row(self) -> dict:
        """One row of stats.jsonl: this tick's means over all ranks, counters, rates and memory."""
        state, device, progress = self.state, self.session.device, self.state.progress
        now, (tick_nimg, tick_time) = time.time(), self.since
        row = {"kimg": round(progress.cur_nimg / 1000, 3), "cur_nimg": progress.cur_nimg,
               "world_size": self.session.world, "d_steps": progress.d_steps, "g_steps": progress.g_steps,
               **self.session.stats.reduce()}
        bad = self.loader.bad_counts()
        kinds = sorted(BAD_KINDS)
        counts = dist.all_reduce_sum(torch.tensor([float(bad.get(k, 0)) for k in kinds], device=device))
        row.update({f"Data/skipped_{k}": int(v) for k, v in zip(kinds, counts.tolist())})
        images = progress.cur_nimg - tick_nimg
        g, d = state.phases.named("G"), state.phases.named("D")
        row.update({
            "LR/G": g.optimizer.param_groups[0]["lr"], "LR/D": d.optimizer.param_groups[0]["lr"],
            "Steps/skipped_nonfinite": state.guard.skipped,
            "Timing/sec_per_kimg": (now - tick_time) / max(images / 1000, 1e-9),
            "Timing/images_per_s": images / max(now - tick_time, 1e-9),
            "Timing/total_s": now - self.start_time,
            "Mem/cpu_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        })
        if device.type == "cuda":
            row["Mem/gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if d.scaler.is_enabled():
            row.update({"AMP/scale_G": g.scaler.get_scale(), "AMP/scale_D": d.scaler.get_scale()})
        return row

    def snapshot(self) -> None:
        """The EMA G (and its variants) for eval and sampling; then prune old scored ones. Rank 0 only."""
        cfg, state, shards = self.cfg, self.state, self.shards
        G = state.networks["G"]
        variants = {**({"raw": (G, {})} if cfg.train.snapshot_raw else {}),
                    **(state.posthoc.variants() if state.posthoc is not None else {})}
        info = SnapshotInfo(cfg.model, shards.resolution, shards.channels, G.num_classes,
                            {"config_hash": config_hash(cfg), "data_path": cfg.data.path,
                             **({"labels": self.labels.record()} if self.labels is not None else {})})
        from pipeline.training.ema import standing_stats      # BatchNorm statistics of G's own samples (ema.standing_stats)

        G_ema = standing_stats(state.ema.model, cfg.ema.standing_stats, self.session.per_proc, cfg.seed,
                               self.session.device)
        save_snapshot(G_ema, self.run.snapshots, cur_nimg=state.progress.cur_nimg, info=info, variants=variants)
        prune_snapshots(self.run.path, cfg.train.keep_snapshots, self.session.log)

    def checkpoint(self) -> None:
        """A full checkpoint (collective); remembered as good when every weight is finite."""
        state, session = self.state, self.session
        dist.check_ranks_identical(state.networks, session.device)
        finite = state.finite()
        self.last_checkpoint = save_checkpoint(
            self.run.path, state.progress.cur_nimg, keep=self.cfg.train.keep_checkpoints,
            per_rank=state.rank_state_dict(self.loader, session.device),
            shared=lambda: state.state_dict(session.world, to_dict(self.cfg), finite))
        if finite:
            state.good_checkpoint = self.last_checkpoint

    def close(self, failed: bool) -> None:
        """Close the progress bar and the sink (`failed`: training ended in an error, and the tracker
        runs are marked so)."""
        if self.bar is not None:
            self.bar.close()
        self.writer.close(failed)


def status_line(row: dict) -> str:
    return (f"kimg {row['kimg']:.2f}  D {row.get('Loss/D/main', float('nan')):.3f}  "
            f"G {row.get('Loss/G/main', float('nan')):.3f}  D(real) {row.get('D/real', 0):+.2f}  "
            f"D(fake) {row.get('D/fake', 0):+.2f}  {row['Timing/sec_per_kimg']:.1f} s/kimg  "
            f"{row['Timing/images_per_s']:.0f} img/s  skipped {row['Steps/skipped_nonfinite']}"
            + (f"  ADA p {row['Augment/p']:.3f}" if "Augment/p" in row else ""))


def training_loop(cfg: Config, run_dir: Path, dry_run: bool = False) -> int:
    """Train `cfg` in `run_dir` (resuming from its newest checkpoint); with `dry_run`, build
    everything, read one batch and stop, writing nothing. Returns the exit status."""
    run = RunDir(run_dir)
    # Start the processes; build networks, EMA, phases; resume (or initialise); open the data stream.
    session = start_session(cfg)
    shards = ShardSet.resolve(cfg.data.path, cfg.data.split, cfg.data.resolution, cfg.data.channels,
                              cfg.data.num_classes)
    state = build_state(cfg, session, shards)
    classes = gen_labels(cfg, shards)
    loader_state, state.good_checkpoint = resume(run, state, session, cfg.seed)
    if state.good_checkpoint is None and cfg.train.init_from:
        initialise_from(cfg.train.init_from, state, session.log)
    loader = open_loader(cfg, session, state, loader_state)
    if dry_run:
        real, _ = loader.next()
        session.log(f"dry run: {cfg.model.name} G {state.networks['G'].num_params():,} / D "
                    f"{state.networks['D'].num_params():,} params, one batch {tuple(real.shape)} read; nothing written")
        return 0

    # Claim and record the run: only now that it really starts (a failed start leaves RUN as it was).
    total_nimg, progress = int(cfg.train.total_kimg * 1000), state.progress
    run.path.mkdir(parents=True, exist_ok=True)
    lock, upkeep = claim(run, session), None
    try:
        if session.main:
            record_config(cfg, run)
            run.clear_start_markers(total_nimg, progress.cur_nimg)
            if progress.cur_nimg == 0:
                write_reals(run, shards, cfg.log.grid_size)
            if run.stop_request():
                session.log(f"{run.stop} exists: training stops at the first tick (remove the file to train on)")
        upkeep = Upkeep(cfg, run, session, state, loader, shards)
        session.log(f"training {cfg.model.name} G {state.networks['G'].num_params():,} / D "
                    f"{state.networks['D'].num_params():,} params on {session.world} x {session.device.type} (batch "
                    f"{cfg.data.batch_size} = {session.world} x {session.accum} x {session.per_proc}, precision "
                    f"{session.dtype or 'fp32'}, {torch.get_num_threads()} threads and {loader.num_workers} loader "
                    f"workers per process) to {cfg.train.total_kimg} kimg")
        if upkeep.startup_s is not None:
            session.log(f"first step {upkeep.startup_s:.1f} s after the process started")

        with dist.Preemption() as preemption, dist.peer_failures("training", cfg.train.peer_timeout_s):
            while progress.cur_nimg < total_nimg:
                prev_nimg = progress.cur_nimg
                # Train: D steps, then a G step, with no host synchronisation (speed.sync_debug checks it).
                with no_host_sync(session.device, cfg.speed.sync_debug and upkeep.ticks > 0):
                    d_batches, scheduled = d_steps(cfg, session, state, loader)
                    g_step(session, state, d_batches, progress.cur_nimg - prev_nimg, classes)
                upkeep.advance(progress.cur_nimg - prev_nimg)

                # Decide what this step ends: the run, a signal (preemption) or RUN/STOP (read at ticks).
                finished = progress.cur_nimg >= total_nimg
                signalled = preemption.requested() and not finished
                tick = crossed(prev_nimg, progress.cur_nimg, cfg.train.tick_kimg) or finished or signalled
                stop_file = tick and not finished and not signalled and stop_requested(run, session.main)
                checkpoint = (crossed(prev_nimg, progress.cur_nimg, cfg.train.checkpoint_kimg) or finished
                              or signalled or bool(stop_file))

                # Maintenance at tick, snapshot and checkpoint boundaries.
                if tick or checkpoint:
                    state.guard.check()     # the one read of the skip counters: too many in a row stop the run
                if tick:
                    upkeep.tick(scheduled)
                if session.main and (crossed(prev_nimg, progress.cur_nimg, cfg.train.snapshot_kimg) or finished):
                    upkeep.snapshot()
                if checkpoint:
                    upkeep.checkpoint()

                # Leave on request or on a signal, with the checkpoint just written.
                if stop_file:
                    session.log(f"stopped on request ({stop_file}): checkpoint {upkeep.last_checkpoint} written at "
                                f"kimg {progress.cur_nimg / 1000:.3f}; exiting with status 0 (remove {run.stop} "
                                "and run the same command again to resume)")
                    return 0
                if signalled:
                    if session.main:    # launchers may not keep exit status 3: the marker tells the job script
                        run.mark_preempted(progress.cur_nimg, upkeep.last_checkpoint)
                    session.log(f"preempted: checkpoint {upkeep.last_checkpoint} written at kimg "
                                f"{progress.cur_nimg / 1000:.3f}; exiting with status {EXIT_PREEMPTED} (run the "
                                "same command again to resume)")
                    return EXIT_PREEMPTED
        if session.main:
            run.mark_finished(progress.cur_nimg, upkeep.last_checkpoint)
    finally:
        if upkeep is not None:
            upkeep.close(failed=sys.exc_info()[0] is not None)     # an error on its way out
        lock.release()

    session.log(f"done: {progress.cur_nimg / 1000:.3f} kimg in {time.time() - upkeep.start_time:.0f} s; "
                f"run directory {run}")
    session.acc.end_training()
    return 0


def stop_requested(run: RunDir, main: bool) -> str:
    """What RUN/STOP says, as rank 0 read it, on every rank; "" when there is none. A collective:
    every rank calls it at the same (tick) steps."""
    return dist.broadcast_object(run.stop_request() if main else "")


def claim(run: RunDir, session: Session) -> TrainerLock:
    """The run's trainer lock, taken by rank 0; a refusal (another live trainer) is raised on every rank."""
    lock, refused = TrainerLock(run), ""
    if session.main:
        try:
            lock.acquire()
        except UserError as exc:
            refused = str(exc)
    if refused := dist.broadcast_object(refused):
        raise UserError(refused)
    return lock


def write_reals(run: RunDir, shards: ShardSet, count: int) -> None:
    """RUN/reals.png: the data's first `count` images as the grid the fakes are set beside."""
    from pipeline.figures import real_images

    if shards.resolution:
        found, _ = real_images(shards, lambda f: len(f.get(0, [])) >= count)
        if found:
            generate.write_image(generate.grid_array(np.stack(found[0][:count])), run.reals)


def record_config(cfg: Config, run: RunDir) -> None:
    """RUN/config.yaml, written atomically (rank 0), after removing what a killed trainer left half-written."""
    run.remove_temporaries()
    write_text_atomic(run.config, config_yaml(cfg))


if __name__ == "__main__":
    sys.exit("run `ganpipe train --config FILE --run-dir RUN` instead")
