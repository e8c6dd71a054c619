"""Post-hoc EMA: the EMA generator of any relative length, rebuilt after training from the
power-function EMA profiles the snapshots keep (`ema.posthoc_std`; Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), sec. 3 and App. C).

    ganpipe posthoc-ema --run-dir RUN --std 0.08 --out runs/mnist-phema/std0.08.json
    ganpipe posthoc-ema --run-dir RUN --std 0.15 --at-kimg 400 --out std0.15-at400.json
    ganpipe eval --run-dir RUN --posthoc-std 0.05,0.1,0.15 --extractor mnist     # rebuild, score, plot

A profile of exponent gamma taken after t G steps is the weighted average of G's weights with the
density p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t] (`ema.PowerEMA`; exact for the discrete
steps, G being constant within a step). Every stored profile i, of every snapshot up to the
chosen one, is such a density p_i; the wanted profile p_r has the target's gamma and the newest
used snapshot's t. We pick the weights x minimising the L2 distance between sum_i x_i p_i and
p_r: the normal equations A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_r>, where for two
densities (gamma_a, t_a) and (gamma_b, t_b) with t_a <= t_b

    <p_a, p_b> = int_0^t_a p_a p_b = (gamma_a+1)(gamma_b+1) / (gamma_a+gamma_b+1) * (t_a/t_b)^gamma_b / t_b.

Because the averages are linear in the weights, sum_i x_i theta_i is then the EMA of that
profile (parameters only; buffers such as BatchNorm statistics come from the newest profile, which
copies them). A is badly conditioned when profiles nearly coincide: the solve is a least-squares
one (numpy's SVD-based lstsq), and the relative L2 error of the fitted profile is recorded with
the result; it is small when snapshots are dense (EDM2 keeps one every ~2% of training).

The result is an ordinary snapshot (safetensors + JSON) that `ganpipe eval` and `ganpipe sample`
accept; its record has `posthoc_ema`: the std, gamma, the snapshot it stands for, the profiles
used with their weights and sha256, and the fit error.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.config import ModelConfig, build_dataclass
from pipeline.errors import SnapshotError, UserError
from pipeline.training.ema import MAX_STD, gamma_for
from pipeline.rundir import RunDir
from pipeline.training.snapshot import (SnapshotInfo, build_generator, list_snapshots, read_snapshot_meta, save_snapshot,
                                        variant_path)


def profile_dot(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> of power-function profiles (the closed form in the module doc); numpy broadcasting."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    t_max = np.where(a_first, t_b, t_a)
    g_of_max = np.where(a_first, g_b, g_a)          # the exponent of the longer profile
    ratio = np.where(a_first, t_a / t_b, t_b / t_a)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * ratio ** g_of_max / t_max


def solve_weights(t: np.ndarray, gamma: np.ndarray, t_r: float, gamma_r: float) -> tuple[np.ndarray, float]:
    """Weights x of the stored profiles (t_i, gamma_i) whose sum best matches the profile (t_r,
    gamma_r) in L2, and the relative L2 error of that match."""
    t, gamma = np.asarray(t, np.float64) / t_r, np.asarray(gamma, np.float64)   # times relative to t_r
    A = profile_dot(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    b = profile_dot(t, gamma, 1.0, gamma_r)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    c = float(profile_dot(1.0, gamma_r, 1.0, gamma_r))
    err2 = max(0.0, float(x @ A @ x - 2 * x @ b + c))
    return x, math.sqrt(err2 / c)


def profile_sources(run_dir: Path, at_kimg: float | None = None) -> tuple[dict, list[dict]]:
    """(record of the newest snapshot at or before `at_kimg` (default: the newest), the stored
    profiles of it and of every snapshot before it: snapshot, record, variant, t, gamma, std)."""
    metas = []
    for path in list_snapshots(RunDir(run_dir).snapshots):
        try:
            metas.append(read_snapshot_meta(path, check_hash=False))
        except SnapshotError:
            continue                          # incomplete (being written, or pruned half-way)
    if at_kimg is not None:
        metas = [m for m in metas if m["cur_nimg"] <= round(at_kimg * 1000)]
    metas = [m for m in metas if any("gamma" in v for v in m.get("variants", {}).values())]
    if not metas:
        where = f" at or before kimg {at_kimg:g}" if at_kimg is not None else ""
        raise UserError(f"{RunDir(run_dir).snapshots} has no snapshot with power-function EMA profiles{where}: "
                        "train with ema.posthoc_std (e.g. [0.05,0.1]) to keep them")
    sources = [{"snapshot": Path(m["json_path"]).stem, "meta": m, "variant": name, "t": int(v["t"]),
                "gamma": float(v["gamma"]), "std": float(v["std"])}
               for m in metas for name, v in sorted(m["variants"].items()) if "gamma" in v]
    return metas[-1], sources


def reconstruct(run_dir: str | Path, std: float, at_kimg: float | None = None
                ) -> tuple[torch.nn.Module, dict, dict]:
    """(G with the post-hoc EMA weights of relative length `std` at the newest snapshot up to
    `at_kimg`, that snapshot's record, the `posthoc_ema` record of how it was made)."""
    run_dir = Path(run_dir)
    if not 0 < std < MAX_STD:
        raise UserError(f"--std {std}: a relative EMA length must lie in (0, {MAX_STD:.4f}) (EDM2 uses 0.05-0.2)")
    base, sources = profile_sources(run_dir, at_kimg)
    t_r, gamma_r = sources[-1]["t"], gamma_for(std)
    x, error = solve_weights(np.array([s["t"] for s in sources]), np.array([s["gamma"] for s in sources]),
                             t_r, gamma_r)
    G = build_generator(base)
    params = {name for name, _ in G.named_parameters()}
    acc: dict[str, torch.Tensor] = {}
    last = None
    for source, weight in zip(sources, x):
        try:
            state = load_file(str(variant_path(source["meta"], source["variant"])), device="cpu")
        except SnapshotError as exc:
            raise SnapshotError(f"post-hoc EMA needs every profile it solves with: {exc}") from None
        for name in params:
            term = state[name].double() * float(weight)
            acc[name] = acc[name] + term if name in acc else term
        last = state
    assert last is not None
    state = {k: (acc[k].to(v.dtype) if k in params else v) for k, v in last.items()}
    G.load_state_dict(state)
    G.eval().requires_grad_(False)
    info = {"std": std, "gamma": gamma_r, "snapshot": Path(base["json_path"]).stem, "cur_nimg": base["cur_nimg"],
            "kimg": base["kimg"], "t": t_r, "relative_error": error, "weight_sum": float(x.sum()),
            "sources": [{"snapshot": s["snapshot"], "variant": s["variant"], "std": s["std"], "t": s["t"],
                         "sha256": s["meta"]["variants"][s["variant"]]["sha256"], "weight": float(w)}
                        for s, w in zip(sources, x)]}
    return G, base, info


def write_reconstruction(G: torch.nn.Module, base: dict, info: dict, out: Path) -> Path:
    """Write the rebuilt G as a snapshot `out` (a .json path; the weights go beside it)."""
    model_cfg = build_dataclass(ModelConfig, base["model"], "model")
    extra = {k: base[k] for k in ("config_hash", "data_path") if k in base}
    record = SnapshotInfo(model_cfg, base["resolution"], base["channels"], base["num_classes"],
                          {**extra, "posthoc_ema": info})
    return save_snapshot(G, out, cur_nimg=base["cur_nimg"], info=record)


def check_out(run_dir: Path, out: Path) -> None:
    if out.suffix != ".json":
        raise UserError(f"--out {out}: give the snapshot's .json path (its .safetensors goes beside it)")
    if out.resolve().parent == RunDir(run_dir).snapshots.resolve():
        raise UserError(f"--out {out}: not inside {RunDir(run_dir).snapshots}, which holds the trainer's snapshots "
                        "(the watcher would score it as one); write it elsewhere, e.g. RUN/posthoc/")


def posthoc_ema_command(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    if not RunDir(run_dir).snapshots.is_dir():
        raise UserError(f"{run_dir} has no snapshots directory (train first, or fix --run-dir)")
    check_out(run_dir, args.out)
    G, base, info = reconstruct(run_dir, args.std, args.at_kimg)
    path = write_reconstruction(G, base, info, args.out)
    used = len({s["snapshot"] for s in info["sources"]})
    print(f"post-hoc EMA sigma_rel {args.std:g} (gamma {info['gamma']:.3f}) at kimg {base['kimg']:g} from "
          f"{len(info['sources'])} profiles of {used} snapshot(s), relative fit error {info['relative_error']:.2e}: "
          f"wrote {path}")
    if info["relative_error"] > 0.05:
        print(f"warning: the stored profiles fit sigma_rel {args.std:g} only to {info['relative_error']:.1%}: "
              "more frequent snapshots (train.snapshot_kimg) or a std between the stored ones fit better")
    return 0


if __name__ == "__main__":
    raise SystemExit("run `ganpipe posthoc-ema --run-dir RUN --std 0.08 --out FILE.json` instead")
