"""Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020)
from two feature sets, by k-nearest-neighbour balls, in torch.

    scores = manifold_scores(real, fake, pr_k=3, dc_k=5)   # {"precision", "recall", "density", "coverage"}
    p, r = precision_recall(real, fake, k=3)
    d, c = density_coverage(real, fake, k=5)

With r_k(x) the distance from x to its k-th nearest neighbour in its own set (itself excluded):

- precision = share of fakes f inside some real ball:  exists r with d(f, r) <= r_k(r)
- recall    = share of reals r inside some fake ball:  exists f with d(r, f) <= r_k(f)
- density   = 1/(k M) * sum over fakes of the number of real balls holding f (d(f, r) < r_k(r))
- coverage  = share of reals whose own ball holds some fake:  min_f d(r, f) < r_k(r)

(`<=` for precision/recall as in Kynkäänniemi's code, `<` for density/coverage as in Naeem's.)
Distances are squared Euclidean in float64 (|x|^2 + |y|^2 - 2 x.y: float32 loses the small
differences of 2048-d features with norms of ~20), computed a block of rows at a time, so a
10k x 10k comparison holds one block (`CHUNK_ELEMENTS` float64 values, 64 MiB) plus the features,
never the full matrix. Runs on the features' device (a GPU if the features are there).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

CHUNK_ELEMENTS = 2 ** 23        # float64 values of one block of the distance matrix (64 MiB)


def _as_f64(x, device: torch.device | None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    return t.to(device or t.device, torch.float64)


def _blocks(x: torch.Tensor, y: torch.Tensor, chunk_elements: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(row offset, squared distances of a block of rows of x to every row of y), float64."""
    yy = y.square().sum(1)
    rows = max(1, chunk_elements // max(1, len(y)))
    for lo in range(0, len(x), rows):
        xb = x[lo:lo + rows]
        d2 = xb.square().sum(1, keepdim=True) + yy[None, :] - 2 * (xb @ y.T)
        yield lo, d2.clamp_(min=0)


def kth_neighbour_radii(x: torch.Tensor, ks: tuple[int, ...], chunk_elements: int = CHUNK_ELEMENTS
                        ) -> dict[int, torch.Tensor]:
    """Per k, the squared distance of every row of x to its k-th nearest other row (float64)."""
    kmax = max(ks)
    if len(x) <= kmax:
        raise ValueError(f"k-th neighbour radii with k = {kmax} need more than {kmax} feature vectors, got {len(x)}")
    out = torch.empty(len(x), kmax, dtype=torch.float64, device=x.device)
    for lo, d2 in _blocks(x, x, chunk_elements):
        rows = torch.arange(len(d2), device=x.device)
        d2[rows, rows + lo] = float("inf")              # a point is not its own neighbour
        out[lo:lo + len(d2)] = d2.topk(kmax, dim=1, largest=False).values
    return {k: out[:, k - 1].clone() for k in ks}


def manifold_scores(real, fake, *, pr_k: int | None = 3, dc_k: int | None = 5, device: torch.device | None = None,
                    chunk_elements: int = CHUNK_ELEMENTS, real_radii: dict | None = None) -> dict[str, float]:
    """Precision and recall with `pr_k`, density and coverage with `dc_k` (None: skip the pair),
    all from one pass over the fake-real distances. `real_radii`: a dict kept by the caller
    between calls with the same real features; the real k-NN radii are computed once into it."""
    real, fake = _as_f64(real, device), _as_f64(fake, device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features are {real.shape[1]}-d, fake ones {fake.shape[1]}-d")
    ks = tuple(k for k in (pr_k, dc_k) if k is not None)
    if not ks:
        return {}
    real_r = real_radii if real_radii is not None else {}
    missing = tuple(k for k in ks if k not in real_r or real_r[k].device != real.device)
    if missing:
        real_r.update(kth_neighbour_radii(real, missing, chunk_elements))
    fake_r = kth_neighbour_radii(fake, (pr_k,), chunk_elements)[pr_k] if pr_k is not None else None
    n_real = len(real)
    in_real_ball = torch.zeros(len(fake), dtype=torch.bool, device=real.device)       # precision
    real_in_fake_ball = torch.zeros(n_real, dtype=torch.bool, device=real.device)     # recall
    balls_holding = torch.zeros(len(fake), dtype=torch.float64, device=real.device)  # density
    nearest_fake = torch.full((n_real,), float("inf"), dtype=torch.float64, device=real.device)  # coverage
    for lo, d2 in _blocks(fake, real, chunk_elements):     # rows: a block of fakes; columns: every real
        hi = lo + len(d2)
        if pr_k is not None:
            in_real_ball[lo:hi] = (d2 <= real_r[pr_k][None, :]).any(1)
            real_in_fake_ball |= (d2 <= fake_r[lo:hi, None]).any(0)
        if dc_k is not None:
            balls_holding[lo:hi] = (d2 < real_r[dc_k][None, :]).sum(1, dtype=torch.float64)
            nearest_fake = torch.minimum(nearest_fake, d2.min(0).values)
    out = {}
    if pr_k is not None:
        out["precision"] = in_real_ball.double().mean().item()
        out["recall"] = real_in_fake_ball.double().mean().item()
    if dc_k is not None:
        out["density"] = (balls_holding.sum() / (dc_k * len(fake))).item()
        out["coverage"] = (nearest_fake < real_r[dc_k]).double().mean().item()
    return out


def precision_recall(real, fake, k: int = 3, **kw) -> tuple[float, float]:
    s = manifold_scores(real, fake, pr_k=k, dc_k=None, **kw)
    return s["precision"], s["recall"]


def density_coverage(real, fake, k: int = 5, **kw) -> tuple[float, float]:
    s = manifold_scores(real, fake, pr_k=None, dc_k=k, **kw)
    return s["density"], s["coverage"]
