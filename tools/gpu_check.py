"""`make gpu-check`: the device suite, then the GPU benchmarks, within one wall-clock budget; one report.

    python tools/gpu_check.py                                  # on a CUDA machine: 480 s, report in runs/gpu-check-*
    python tools/gpu_check.py --budget-s 300 --out $OUT/gpu    # a shorter window, the report where it is wanted
    python tools/gpu_check.py --dry-run                        # the whole orchestration on the CPU, at toy size

1. The environment: device, driver, torch, CUDA, cuDNN and NCCL versions. Without a CUDA device
   (and without --dry-run) it says so in one line and exits 0, writing nothing.
2. The device suite, `GANPIPE_TEST_DEVICE=cuda python -m pytest tests/test_device.py -m device`,
   for at most `--suite-s` (default 60% of the budget). This file is also the pytest plugin
   (`-p gpu_check`) that appends each test's outcome to an events file as it ends, so a suite
   stopped at its limit still reports what it did, and names the tests it did not reach.
3. The benchmarks of `ganpipe bench train` (pipeline/bench/train.py): trainer against the bare
   PyTorch loop for `make bench-gpu`'s cases (DCGAN-32, the SNGAN ResNet, StyleGAN2 at 256 px) and
   R3GAN at CIFAR-10 size under bf16 (the GPU's default precision), then the loader (4.), then a
   few speed levers against their defaults on the ResNet in bf16, then the cases under fp16 and
   fp32. A unit runs only when its
   estimate fits the time left (a first guess per case, then 1.2x what that case took); one still
   running at the deadline is stopped. What did not run is listed with the reason.
4. The loader, after the first precision's cases: the shard loader's img/s with 1, 2, 4, ... worker
   processes up to the CPUs, at 64 and 256 px on generated data, decoding every sample
   (`pipeline.bench.loader.worker_scaling`), beside the img/s the GPU consumes in the benchmarks at
   that resolution or the nearest below; one verdict per resolution says whether the loader keeps
   up, and with how many workers. It runs within the same budget, skipped when it does not fit.
5. `report.json` and `report.md` in `--out`, named on the last line. Exit status 1 when a test
   failed or a benchmark broke, 0 otherwise (skips for the budget included), 2 without CUDA.

`--dry-run` runs the same steps on the CPU (GANPIPE_TEST_DEVICE=cpu): three device tests, one toy
benchmark (the R3GAN case at 1/32 width, batch 16, on 256 images) and the loader on a few images, so
that the budget, the skips and the report are exercised where there is no GPU (tests/test_device.py
runs it). docs/gpu.md tells how to read the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SUITE = "tests/test_device.py"
EVENTS_ENV = "GANPIPE_GPU_CHECK_EVENTS"
NEEDED = ("accelerate", "webdataset", "cleanfid", "safetensors", "yaml", "scipy", "tensorboard", "pytest")
OPTIONAL = ("onnx", "onnxruntime")          # only the ONNX export test needs them

# Benchmarks: kimg per trainer run (its steady window is the second half), a first guess of one
# unit's seconds on one H200 (bare loop, trainer start and run), and of preparing its data.
CASES = ("stylegan2-256", "r3gan32", "dcgan32", "resnet32")
KIMG = {"dcgan32": 4, "resnet32": 4, "r3gan32": 8, "stylegan2-256": 2, "toy": 0.128}
GUESS_S = {"dcgan32": 35, "resnet32": 45, "r3gan32": 60, "stylegan2-256": 120, "toy": 20}
PREPARE_GUESS_S = {"rgb32": 10, "rgb64": 10, "rgb256": 30, "toy32": 3, "toy64": 2, "toy256": 2}
# Speed levers measured against the default, one at a time, on the ResNet in bf16 (a D without
# BatchNorm, so D's joint forward applies); the levers that are off until measured come first.
LEVER_CASE = ("resnet32", "bf16")
LEVERS = ("speed.cudnn_benchmark=true", "speed.pin_memory=true", "speed.compile=inductor", "speed.tf32=true",
          "speed.channels_last=false", "speed.joint_d_forward=false", "optim.adam_impl=foreach")
# The loader: img/s per worker count at these sides, on generated data (bench train's DATASETS,
# or 4,096 images at a side that has none), `LOADER_S` seconds of batches per count after its
# start-up (a first guess of which per count is LOADER_START_S, 256 px's buffers filling).
LOADER = "loader"
LOADER_PX = (64, 256)
LOADER_S, LOADER_BATCH = 3.0, 64
LOADER_START_S = {64: 2, 256: 5}
# --dry-run: three device tests and a toy case on the CPU.
DRY_RUN_TESTS = "mlp-32px-uncond-fp32 or ada-blit or metrics_on_the_same_features"
TOY = {"config": "configs/cifar10_r3gan.yaml", "data": "toy32",     # r3gan32's case at 1/32 width, batch 16
       "overrides": ["model.conditional=false", "augment.ada_groups=", "model.g_width=0.03125", "model.d_width=0.03125",
                     "data.batch_size=16", "data.num_workers=0"]}
TOY_DATA = {"toy32": (256, 32)}
TOY_LOADER = {"seconds": 0.3, "batch_size": 16}     # --dry-run's loader: on 64 images (32 from 256 px on)
MIN_SUITE_S = 15            # below this the suite is not started: pytest and torch take seconds to import

# What each speed lever's default rests on (the figures are in docs/benchmarks.md).
LEVER_NOTES = {
    "speed.mixed_precision": "auto: bf16 on a GPU that has it, fp32 on CPU; not measured on a GPU",
    "speed.channels_last": "on: measured on CPU only",
    "speed.joint_d_forward": "on: measured on CPU only",
    "speed.compile": "off: slower on CPU; not measured on a GPU (a lever unit runs inductor)",
    "speed.cudnn_benchmark": "off until measured (StyleGAN2-ADA's default is on): a lever unit runs it on",
    "speed.pin_memory": "off until measured: a lever unit runs it on (page-locked batches, asynchronous copies)",
    "speed.tf32": "off: full fp32 precision, as StyleGAN2-ADA",
    "speed.sync_debug": "off: a check, not a speed lever",
    "optim.adam_impl": "fused: skips non-finite steps without a host read; measured on CPU only",
    "data.num_workers": "-1 (auto): 2 per process with a GPU, 0 on CPU; the loader section measures 1, 2, 4, ...",
}


# ------------------------------------------------------------------------------------------------
# The budget.

class OutOfBudget(Exception):
    """A unit still running at the deadline was stopped."""


class Budget:
    """Seconds left of `total`, on `clock` (time.monotonic, or a fake one in the tests)."""

    def __init__(self, total: float, clock: Callable[[], float] = time.monotonic):
        self.total, self.clock = float(total), clock
        self.deadline = clock() + self.total

    def left(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def share(self, fraction: float) -> float:
        """`fraction` of the whole budget, at most what is left."""
        return min(self.left(), fraction * self.total)


def run_units(units: list, budget: Budget, measure: Callable, estimate: Callable) -> tuple[list, list]:
    """Run `measure(unit, deadline)` for each unit whose `estimate(unit)` (seconds) fits the time
    left, in order; a later, cheaper unit may still fit after one is skipped. A unit that raises
    OutOfBudget was stopped at the deadline. Returns (results, skipped with their reasons)."""
    results, skipped = [], []
    for unit in units:
        need, left = estimate(unit), budget.left()
        if need > left:
            skipped.append({"unit": unit, "reason": f"needs about {need:.0f} s, {left:.0f} s left"})
            continue
        try:
            results.append(measure(unit, budget.deadline))
        except OutOfBudget as exc:
            skipped.append({"unit": unit, "reason": f"stopped at the budget: {exc}"})
    return results, skipped


# ------------------------------------------------------------------------------------------------
# The pytest plugin (`-p gpu_check` with tools/ on the path): one JSON line per outcome.

def _event(record: dict) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def pytest_collection_finish(session) -> None:
    _event({"collected": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report) -> None:
    if report.when != "call" and report.outcome == "passed":
        return
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        message = report.longrepr[2].removeprefix("Skipped: ")
    elif report.outcome == "failed":
        crash = getattr(report.longrepr, "reprcrash", None)
        message = getattr(crash, "message", None) or str(report.longrepr)[-1000:]
    else:
        message = ""
    _event({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "duration_s": round(report.duration, 3), "message": message[:1500],
            "properties": dict(report.user_properties)})


def suite_results(events: Path, stopped: bool) -> tuple[list[dict], dict]:
    """Each collected test's outcome from the events file ("not run" for those without one)."""
    collected, outcomes = [], {}
    for line in events.read_text().splitlines() if events.is_file() else []:
        record = json.loads(line)
        if "collected" in record:
            collected = record["collected"]
            continue
        kept = outcomes.get(record["nodeid"])
        if kept is None or record["outcome"] != "passed":     # a failed teardown outranks a passed call
            outcomes[record["nodeid"]] = {**(kept or {}), **record,
                                          "duration_s": round((kept or {}).get("duration_s", 0) + record["duration_s"], 3)}
    tests = []
    for nodeid in collected or list(outcomes):
        found = outcomes.get(nodeid)
        if found is None:
            found = {"outcome": "not run", "message": "budget: the suite was stopped at its limit" if stopped else
                     "pytest ended before it"}
        tests.append({"test": nodeid.split("::", 1)[-1], **{k: v for k, v in found.items() if k not in ("nodeid", "when")}})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "not run")}
    return tests, counts


# ------------------------------------------------------------------------------------------------
# The steps.

def environment(device: str) -> dict:
    import torch

    from pipeline.bench import hardware

    host = hardware()
    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu": host["cpu"], "cores": host["cores"], "host": platform.node(), "packages": package_versions()}
    if device == "cpu":
        return env
    props = torch.cuda.get_device_properties(0)
    env.update({"device": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
                "devices": torch.cuda.device_count(), "cudnn": torch.backends.cudnn.version(),
                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "bf16": torch.cuda.is_bf16_supported()})
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm",
                              "--format=csv,noheader", "--id=0"], capture_output=True, text=True, timeout=30)
        driver, power, clock = (x.strip() for x in smi.stdout.strip().split(","))
        env.update({"driver": driver, "power_limit": power, "max_sm_clock": clock})
    except (OSError, ValueError, subprocess.SubprocessError):
        env["driver"] = None
    return env


def package_versions() -> dict[str, str | None]:
    """Versions of what the suite leans on besides torch (scipy must be < 1.18 for clean-fid 0.1.35)."""
    from importlib import metadata

    out = {}
    for name in ("accelerate", "webdataset", "clean-fid", "scipy", "numpy", "onnxruntime", "torchvision"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def speed_levers(units: list[dict]) -> list[dict]:
    """Each lever's default, what it rests on, and its measured effect when a lever unit ran."""
    from pipeline.config import Config

    cfg = Config()
    base = next((u for u in units if (u.get("case"), u.get("precision")) == LEVER_CASE and not u.get("levers")
                 and "images_per_s" in u), None)
    out = []
    for key, note in LEVER_NOTES.items():
        section, name = key.split(".")
        entry = {"key": key, "default": getattr(getattr(cfg, section), name), "rests_on": note}
        for u in units:
            if base and any(lever.split("=")[0] == key for lever in u.get("levers", [])) and "images_per_s" in u:
                entry.setdefault("measured", []).append({"set": u["levers"], "images_per_s": u["images_per_s"],
                                                         "vs_default": round(u["images_per_s"] / base["images_per_s"], 3)})
        out.append(entry)
    return out


def run_suite(args: argparse.Namespace, budget: Budget, out: Path, device: str) -> dict:
    limit = budget.share(args.suite_share) if args.suite_s is None else min(args.suite_s, budget.left())
    command = [sys.executable, "-m", "pytest", SUITE, "-m", "device", "-p", "gpu_check", "-p", "no:cacheprovider",
               "-q", "--timeout", "300", *(["-k", args.tests_k] if args.tests_k else [])]
    entry = {"command": f"GANPIPE_TEST_DEVICE={device} " + shlex.join(["python", *command[1:]]), "limit_s": round(limit, 1),
             "log": "device-tests.log"}
    if limit < MIN_SUITE_S:
        return {**entry, "skipped": f"budget: {limit:.0f} s for the suite, which needs at least {MIN_SUITE_S} s to start",
                "tests": [], "counts": {}}
    print(f"gpu-check: device suite on {device}, {limit:.0f} s at most (log: {out / entry['log']})", flush=True)
    events = out / "device-tests.events.jsonl"
    env = {**os.environ, "GANPIPE_TEST_DEVICE": device, EVENTS_ENV: str(events), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "tools"), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.monotonic()
    with open(out / entry["log"], "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stopped = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    tests, counts = suite_results(events, stopped)
    entry.update({"wall_s": round(time.monotonic() - t0, 1), "pytest_exit": proc.returncode, "counts": counts,
                  "tests": tests})
    if stopped:
        entry["stopped"] = f"budget: stopped after {limit:.0f} s"
    elif proc.returncode not in (0, 1, 5):
        entry["error"] = f"pytest exited {proc.returncode} (see {entry['log']})"
    print(f"gpu-check: suite {', '.join(f'{v} {k}' for k, v in counts.items())} in {entry['wall_s']:.0f} s"
          + (" (stopped at its limit)" if stopped else ""), flush=True)
    return entry


def bench_units(args: argparse.Namespace) -> list[tuple]:
    """(case, precision, levers) in the order they run; (LOADER, side, ()) for the loader's, after
    the first precision's cases (the GPU's default precision, whose img/s it is compared with)."""
    loader = [(LOADER, px, ()) for px in args.loader_px]
    if args.dry_run:
        return [("toy", "fp32", ()), *loader]
    first, *rest = args.precision
    units = [(case, first, ()) for case in args.cases] + loader
    # The levers before the other precisions: they decide defaults, and the first H200 window
    # (2026-12-04, 420 s) spent its benchmark time on the first precision and skipped them all.
    if args.levers and LEVER_CASE[0] in args.cases and LEVER_CASE[1] in args.precision:
        units += [(*LEVER_CASE, (lever,)) for lever in LEVERS]
    units += [(case, precision, ()) for precision in rest for case in args.cases]
    return units


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_data(px: int, dry_run: bool) -> str:
    """The key of the generated data set the loader is measured on at side `px`."""
    return f"toy{px}" if dry_run else f"rgb{px}"


def data_sizes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(images, side) of every data set a unit may prepare."""
    from pipeline.bench import train as bench_train

    loader = {loader_data(px, args.dry_run): ((64 if px < 256 else 32) if args.dry_run else (4096 if px <= 64 else 1024), px)
              for px in args.loader_px}
    return {**loader, **bench_train.DATASETS, **TOY_DATA}


def run_benchmarks(args: argparse.Namespace, budget: Budget, work: Path) -> dict:
    from pipeline.bench import train as bench_train

    took: dict[str, float] = {}
    prepared: dict[str, Path] = {}
    workers = bench_loader_counts(args)

    def case_of(name: str) -> dict:
        return TOY if name == "toy" else bench_train.CASES[name]

    def data_of(unit: tuple) -> str:
        return loader_data(unit[1], args.dry_run) if unit[0] == LOADER else case_of(unit[0])["data"]

    def estimate(unit: tuple) -> float:
        name, data = unit[0], data_of(unit)
        if name == LOADER:
            seconds = TOY_LOADER["seconds"] if args.dry_run else LOADER_S
            need = len(workers) * (seconds + LOADER_START_S.get(unit[1], LOADER_START_S[256]))
        else:
            need = 1.2 * took[name] if name in took else GUESS_S[name]
        return need + (0 if data in prepared else PREPARE_GUESS_S.get(data, 30))

    def prepare(key: str) -> Path:
        if key not in prepared:
            prepared[key] = bench_train.prepare_dataset(work, key, workers=min(8, os.cpu_count() or 1),
                                                        sizes=data_sizes(args))
        return prepared[key]

    def measure(unit: tuple, deadline: float) -> dict:
        if unit[0] == LOADER:
            return measure_loader(unit[1], prepare(data_of(unit)), workers, args.dry_run, deadline)
        name, precision, levers = unit
        case = case_of(name)
        key = case["data"]
        prepare(key)
        ns = argparse.Namespace(repeats=1, kimg=args.kimg or KIMG[name], skip_multiprocess=True, set=list(levers),
                                sync_debug=args.bench_sync_debug, deadline=deadline)
        label = f"{name} {precision}{' ' + ' '.join(levers) if levers else ''}"
        runs = work / f"unit-{len(list(work.glob('unit-*')))}"     # its own run directories: never a resume
        runs.mkdir()
        t0 = time.monotonic()
        try:
            entry = bench_train.measure_case(name, case, prepared[key], runs, ns, precision)
        except subprocess.TimeoutExpired:
            raise OutOfBudget(f"{label} after {time.monotonic() - t0:.0f} s") from None
        except Exception as exc:        # a broken unit is reported; the next one still runs
            print(f"gpu-check: {label}: {type(exc).__name__}: {str(exc)[-300:]}", flush=True)
            return {"case": name, "precision": precision, "levers": list(levers),
                    "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
        finally:
            bench_train.free_device_memory()
        if not levers:
            took[name] = time.monotonic() - t0
        result = unit_summary(name, precision, levers, entry, time.monotonic() - t0, ns.kimg)
        print(f"gpu-check: {label}: {result['s_per_kimg']} s/kimg, {result['images_per_s']} img/s, "
              f"{result['trainer_over_bare']}x the bare loop", flush=True)
        return result

    units = bench_units(args)
    results, skipped = run_units(units, budget, measure, estimate)
    for s in skipped:
        name, what, levers = s["unit"]
        print(f"gpu-check: skipped {name} {what}{' px' if name == LOADER else ''} {' '.join(levers)}: {s['reason']}",
              flush=True)
    loader = {"workers": workers, "resolutions": [r for r in results if r.get("loader")],
              "skipped": [{"resolution": s["unit"][1], "reason": s["reason"]} for s in skipped if s["unit"][0] == LOADER]}
    skipped = [{"case": s["unit"][0], "precision": s["unit"][1], "levers": list(s["unit"][2]), "reason": s["reason"]}
               for s in skipped if s["unit"][0] != LOADER]
    return {"units": [r for r in results if not r.get("loader")], "skipped": skipped, "loader": loader}


def bench_loader_counts(args: argparse.Namespace) -> list[int]:
    from pipeline.bench.loader import worker_counts

    return worker_counts(min(usable_cpus(), 2) if args.dry_run else usable_cpus())


def measure_loader(px: int, data: Path, workers: list[int], dry_run: bool, deadline: float) -> dict:
    """The loader's img/s per worker count on `data`, batches delivered to the GPU when there is one."""
    from pipeline.bench import loader as bench_loader
    from pipeline.bench import train as bench_train

    device = bench_train.bench_device()
    opts = TOY_LOADER if dry_run else {"seconds": LOADER_S, "batch_size": LOADER_BATCH}
    t0 = time.monotonic()
    try:
        entry = bench_loader.worker_scaling(data, workers, device=device if device.type == "cuda" else None,
                                            deadline=deadline, **opts)
    except Exception as exc:        # reported; the next unit still runs
        print(f"gpu-check: loader on {data.name}: {type(exc).__name__}: {str(exc)[-300:]}", flush=True)
        return {"loader": True, "data": data.name, "resolution": px, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
    entry = {"loader": True, "data": data.name, **entry, "wall_s": round(time.monotonic() - t0, 1)}
    rates = ", ".join(f"{w['workers']}: {w['images_per_s']:.0f}" for w in entry["workers"])
    print(f"gpu-check: loader at {entry['resolution']} px, img/s by workers {rates}"
          + (f" ({entry['stopped']})" if entry.get("stopped") else ""), flush=True)
    return entry


def case_resolution(name: str) -> int:
    """The side of the images a benchmark case trains on."""
    from pipeline.bench import train as bench_train

    key = TOY["data"] if name == "toy" else bench_train.CASES[name]["data"]
    return {**bench_train.DATASETS, **TOY_DATA}.get(key, (0, 28))[1]


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n != 1 else ''}"


def loader_verdicts(loader: dict, units: list[dict]) -> list[dict]:
    """Per measured side: the img/s the GPU consumes there (the fastest of the trainer and the bare
    loop over the benchmarks at that side, or the nearest side below it: an upper bound, as a
    larger network is slower), the fewest workers whose loader keeps up, and one line saying so."""
    from pipeline.data.loader import AUTO_WORKERS_GPU

    ran = [u for u in units if "images_per_s" in u]
    out = [{"resolution": s["resolution"], "verdict": f"{s['resolution']} px: loader not measured, skipped: {s['reason']}"}
           for s in loader["skipped"]]
    for entry in loader["resolutions"]:
        px = entry.get("resolution")
        measured = entry.get("workers") or []
        sides = [case_resolution(u["case"]) for u in ran if case_resolution(u["case"]) <= (px or 0)]
        if "error" in entry or not measured:
            out.append({"resolution": px, "verdict": f"{px} px: loader not measured ({entry.get('error', 'no count ran')})"})
            continue
        if not sides:
            out.append({"resolution": px, "verdict": f"{px} px: no benchmark at or below {px} px ran: nothing to "
                        "compare the loader with"})
            continue
        at = max(sides)
        rates = [(max(u["images_per_s"], u["bare_images_per_s"]), u) for u in ran if case_resolution(u["case"]) == at]
        demand, unit = max(rates, key=lambda r: r[0])
        source = (f"{unit['case']} {unit['precision']}{' ' + ' '.join(unit['levers']) if unit['levers'] else ''}, "
                  + ("bare loop" if unit["bare_images_per_s"] >= unit["images_per_s"] else "trainer")
                  + (f", at {at} px: an upper bound" if at < px else ""))
        enough = next((w for w in measured if w["images_per_s"] >= demand), None)
        best = max(measured, key=lambda w: w["images_per_s"])
        verdict = {"resolution": px, "gpu_images_per_s": demand, "gpu_source": source,
                   "keeps_up_with_workers": enough["workers"] if enough else None}
        if enough:
            line = (f"{px} px: loader keeps up with {_workers(enough['workers'])} ({enough['images_per_s']:.0f} img/s "
                    f"against the {demand:.0f} img/s consumed in {source})")
            if enough["workers"] > AUTO_WORKERS_GPU:
                line += f"; data.num_workers=-1 gives {AUTO_WORKERS_GPU} per GPU process: set {enough['workers']}"
        else:
            line = (f"{px} px: loader is the bottleneck: {best['images_per_s']:.0f} img/s of {demand:.0f} "
                    f"(its best, with {_workers(best['workers'])}; consumed in {source})")
        out.append({**verdict, "verdict": line})
    return sorted(out, key=lambda v: v["resolution"] or 0)


def unit_summary(name: str, precision: str, levers: tuple, entry: dict, wall_s: float, kimg: float) -> dict:
    bare, full = entry["bare_pytorch_loop"], entry["trainer_1proc_2threads"]
    out = {"case": name, "precision": precision, "levers": list(levers), "kimg": kimg, "batch": entry["batch"],
           "s_per_kimg": full["s_per_kimg"], "images_per_s": full["images_per_s"],
           "bare_s_per_kimg": bare["s_per_kimg"], "bare_images_per_s": bare["images_per_s"],
           "trainer_over_bare": entry["trainer_over_bare"], "startup_s": full["startup_s"],
           "gpu_utilisation_percent": full.get("gpu_utilisation_percent"), "gpu_peak_gb": full.get("gpu_peak_gb"),
           "bare_gpu_peak_gb": bare.get("gpu_peak_gb"), "params": bare.get("params"), "wall_s": round(wall_s, 1)}
    if "published" in entry:
        out["published"] = entry["published"]
        out["over_published"] = round(full["s_per_kimg"] / entry["published"]["s_per_kimg"], 3)
    if "sync_debug" in entry:
        out["sync_debug"] = entry["sync_debug"]
    return out


# ------------------------------------------------------------------------------------------------
# The report.

def markdown(report: dict) -> str:
    env, suite, bench = report["environment"], report["device_suite"], report["benchmarks"]
    lines = [f"# ganpipe gpu-check: {env['device']}, {report['started'][:10]}", "",
             f"`{report['command']}`: budget {report['budget_s']:.0f} s, took {report['wall_s']:.0f} s"
             + (" (dry run on the CPU, toy size: the figures mean nothing)" if report["dry_run"] else "") + ".", "",
             "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "## Device suite", "", f"`{suite['command']}`", ""]
    if suite.get("skipped"):
        lines += [f"Not run, skipped: {suite['skipped']}.", ""]
    else:
        counts = ", ".join(f"{v} {k}" for k, v in suite["counts"].items())
        lines += [f"{counts} in {suite['wall_s']:.0f} s" + (f"; {suite['stopped']}" if suite.get("stopped") else "")
                  + (f"; {suite['error']}" if suite.get("error") else "") + f". Log: `{suite['log']}`.", "",
                  "| test | outcome | s | note |", "|---|---|---|---|"]
        for t in suite["tests"]:
            note = t.get("message") or ""
            if t.get("properties"):
                note = (note + " " + json.dumps(t["properties"])).strip()
            note = note.replace("|", "\\|").replace("\n", " ")[:400]
            lines.append(f"| {t['test']} | {t['outcome']} | {t.get('duration_s', '')} | {note} |")
    lines += ["", "## Benchmarks", "", "Trainer (`ganpipe train` in a subprocess, its steady window) against the bare "
              "PyTorch loop of the same networks, batch, loss and penalties (pipeline/bench/train.py).", "",
              "| case | precision | set | s/kimg | img/s | bare img/s | trainer / bare | GPU util. % median, steady window (whole run) "
              "| peak GiB trainer / bare | vs published |", "|---|---|---|---|---|---|---|---|---|---|"]
    for u in bench["units"]:
        if "error" in u:
            lines.append(f"| {u['case']} | {u['precision']} | {' '.join(u['levers'])} | error: "
                         f"{u['error'][:200].replace('|', '/')} | | | | | | |")
            continue
        g = u.get("gpu_utilisation_percent") or {}
        util = (f"{g['steady_median']} ({g['median']})" if "steady_median" in g else g.get("median", ""))
        published = (f"{u['over_published']}x of {u['published']['s_per_kimg']} s/kimg" if "published" in u else "")
        peak = f"{u['gpu_peak_gb']} / {u['bare_gpu_peak_gb']}" if u.get("gpu_peak_gb") is not None else ""
        lines.append(f"| {u['case']} | {u['precision']} | {' '.join(u['levers'])} | {u['s_per_kimg']} | "
                     f"{u['images_per_s']} | {u['bare_images_per_s']} | {u['trainer_over_bare']} | {util} | "
                     f"{peak} | {published} |")
    if bench["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {s['case']} {s['precision']} {' '.join(s['levers'])}: {s['reason']}"
                                         for s in bench["skipped"]]
    lines += loader_markdown(report["loader"])
    lines += ["", "## Speed levers", "", "| key | default | rests on | measured: img/s set, vs the default |",
              "|---|---|---|---|"]
    for lever in report["speed_levers"]:
        measured = "; ".join(f"{' '.join(m['set'])}: {m['images_per_s']}, {m['vs_default']}x"
                             for m in lever.get("measured", []))
        lines.append(f"| {lever['key']} | {lever['default']} | {lever['rests_on']} | {measured} |")
    return "\n".join(lines) + "\n"


def loader_markdown(loader: dict) -> list[str]:
    lines = ["", "## Loader", "", "The shard loader's img/s by worker processes, decoding every sample (no cache), batches "
             "delivered to the device (pipeline/bench/loader.py `worker_scaling`), against the img/s the GPU consumes "
             "in the benchmarks above.", ""]
    lines += [f"- {v['verdict']}" for v in loader.get("verdicts", [])] + [""]
    if loader["resolutions"]:
        lines += ["| side px | workers | img/s | first batch s |", "|---|---|---|---|"]
        for entry in loader["resolutions"]:
            if "error" in entry:
                lines.append(f"| {entry['resolution']} | | error: {entry['error'][:200].replace('|', '/')} | |")
            for w in entry.get("workers", []):
                lines.append(f"| {entry['resolution']} | {w['workers']} | {w['images_per_s']} | {w['first_batch_s']} |")
            if entry.get("stopped"):
                lines.append(f"| {entry['resolution']} | {entry['stopped']} | | |")
    if loader["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {s['resolution']} px: {s['reason']}" for s in loader["skipped"]]
    return lines


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))


# ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock seconds for everything (default 480)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default runs/gpu-check-YYYYmmdd-HHMMSS); must not exist or be empty")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU at toy size: three device tests and one toy benchmark, the same budget and report")
    p.add_argument("--suite-s", type=float, default=None, help="seconds for the device suite at most "
                   "(default: --suite-share of the budget)")
    p.add_argument("--suite-share", type=float, default=0.6, help="share of the budget the suite may take (default 0.6)")
    p.add_argument("--tests-k", default=None, help="pytest -k expression choosing device tests (default: all; "
                   f"--dry-run: {DRY_RUN_TESTS!r})")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="benchmark cases (default: all)")
    p.add_argument("--precision", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"],
                   help="precisions to benchmark, in this order (default bf16 fp16 fp32)")
    p.add_argument("--kimg", type=float, default=None, help=f"kimg per trainer run (default per case: {KIMG})")
    p.add_argument("--no-levers", dest="levers", action="store_false", help="skip the speed-lever units")
    p.add_argument("--loader-px", nargs="*", type=int, default=list(LOADER_PX), metavar="PIXELS",
                   help="image sides the loader is measured at (default 64 256; none: no loader section)")
    p.add_argument("--bench-sync-debug", action="store_true",
                   help="also run each benchmark's trainer under speed.sync_debug (the suite checks it already)")
    args = p.parse_args(argv)
    if args.dry_run and args.tests_k is None:
        args.tests_k = DRY_RUN_TESTS
    return args


def missing_packages(names: tuple[str, ...]) -> list[str]:
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    import torch

    if missing := missing_packages(NEEDED):
        print(f"gpu-check: missing Python packages {', '.join(missing)}: `make test`'s set-up installs them (offline: "
              "carry them as wheels, docs/gpu.md)", file=sys.stderr)
        return 2
    import scipy

    if tuple(int(x) for x in scipy.__version__.split(".")[:2]) >= (1, 18):
        # The H200 image of 2026-12 has scipy 1.18.1: every FID would stop in clean-fid's sqrtm(disp=...).
        print(f"gpu-check: scipy {scipy.__version__} is too new for clean-fid 0.1.35 (sqrtm's `disp` is gone in "
              "1.18): install scipy<1.18 (offline: carry its wheel, docs/gpu.md)", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        # Not a failure: the same command runs everywhere, and a machine without a GPU has nothing to check.
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): nothing "
              "to check here; `--dry-run` runs the orchestration on the CPU at toy size", file=sys.stderr)
        return 0
    device = "cpu" if args.dry_run else "cuda"
    out = args.out or REPO / "runs" / f"gpu-check-{started:%Y%m%d-%H%M%S}"
    if out.exists() and any(out.iterdir()):
        print(f"gpu-check: {out} exists and is not empty: give another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    report = {"tool": "tools/gpu_check.py", "command": "python tools/gpu_check.py " + " ".join(argv or sys.argv[1:]),
              "started": started.isoformat(timespec="seconds"), "budget_s": args.budget_s, "dry_run": args.dry_run,
              "environment": {**environment(device), "missing_optional": missing_packages(OPTIONAL)}}
    print(f"gpu-check: {report['environment']['device']}, torch {torch.__version__}, budget {args.budget_s:.0f} s",
          flush=True)
    report["device_suite"] = run_suite(args, budget, out, device)
    with tempfile.TemporaryDirectory(prefix="ganpipe-gpu-check-") as work:
        report["benchmarks"] = run_benchmarks(args, budget, Path(work))
    report["loader"] = report["benchmarks"].pop("loader")
    report["loader"]["verdicts"] = loader_verdicts(report["loader"], report["benchmarks"]["units"])
    for verdict in report["loader"]["verdicts"]:
        print(f"gpu-check: {verdict['verdict']}", flush=True)
    report["speed_levers"] = speed_levers(report["benchmarks"]["units"])
    report["wall_s"] = round(time.monotonic() - t0, 1)
    suite = report["device_suite"]
    failed = suite.get("counts", {}).get("failed", 0) or "error" in suite
    broken = any("error" in u for u in report["benchmarks"]["units"] + report["loader"]["resolutions"])
    report["exit_status"] = 1 if failed or broken else 0
    write_report(report, out)
    print(f"gpu-check: report in {out} (report.json, report.md)")
    return report["exit_status"]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))       # pipeline, when run from a checkout without the package installed
    raise SystemExit(main())
