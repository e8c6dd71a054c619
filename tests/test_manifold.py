"""Precision/recall and density/coverage (pipeline/metrics/manifold.py) against brute force and
their known properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from pipeline.metrics import manifold
from pipeline.metrics.manifold import density_coverage, kth_neighbour_radii, manifold_scores, precision_recall


def brute_force(real: np.ndarray, fake: np.ndarray, pr_k: int = 3, dc_k: int = 5) -> dict:
    """The papers' definitions, point by point, with scipy's exact Euclidean distances."""
    d_rr, d_ff, d_fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)

    def kth(d: np.ndarray, k: int) -> np.ndarray:      # k-th nearest *other* point of every row
        return np.array([sorted(np.delete(row, i))[k - 1] for i, row in enumerate(d)])

    r_pr, r_dc, f_pr = kth(d_rr, pr_k), kth(d_rr, dc_k), kth(d_ff, pr_k)
    M, N = len(fake), len(real)
    precision = sum(any(d_fr[j, i] <= r_pr[i] for i in range(N)) for j in range(M)) / M
    recall = sum(any(d_fr[j, i] <= f_pr[j] for j in range(M)) for i in range(N)) / N
    density = sum(d_fr[j, i] < r_dc[i] for j in range(M) for i in range(N)) / (dc_k * M)
    coverage = sum(min(d_fr[:, i]) < r_dc[i] for i in range(N)) / N
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.4, 1.3), (1.5, 0.5)])
def test_scores_equal_the_brute_force_definitions(shift, scale):
    rng = np.random.default_rng(int(10 * shift))
    real = rng.normal(size=(120, 6))
    fake = rng.normal(shift, scale, size=(90, 6))
    want = brute_force(real, fake)
    got = manifold_scores(real, fake, pr_k=3, dc_k=5)
    assert got == pytest.approx(want, abs=1e-12)
    # Blocks of a few rows (the bounded-memory path) change nothing.
    assert manifold_scores(real, fake, chunk_elements=37) == got
    assert precision_recall(real, fake, k=3) == (got["precision"], got["recall"])
    assert density_coverage(real, fake, k=5) == (got["density"], got["coverage"])
    # Another k is another score, still the definition.
    assert manifold_scores(real, fake, pr_k=1, dc_k=2) == pytest.approx(brute_force(real, fake, 1, 2), abs=1e-12)


def test_real_radii_are_computed_once_per_reference():
    rng = np.random.default_rng(3)
    real, fake1, fake2 = rng.normal(size=(80, 4)), rng.normal(size=(60, 4)), rng.normal(1, 1, size=(60, 4))
    cache: dict = {}
    first = manifold_scores(real, fake1, real_radii=cache)
    assert sorted(cache) == [3, 5]
    cache[5] = cache[5] * 0          # a planted value proves the second call reads the cache
    second = manifold_scores(real, fake2, real_radii=cache)
    assert first == manifold_scores(real, fake1)
    assert second["precision"] == manifold_scores(real, fake2)["precision"] and second["coverage"] == 0.0


def test_radii_exclude_the_point_itself_and_count_duplicates():
    x = torch.tensor([[0.0], [1.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    r = kth_neighbour_radii(x, (1, 2), chunk_elements=3)     # squared distances, 2 rows per block
    assert r[1].tolist() == [1.0, 0.0, 0.0, 4.0, 16.0]        # a duplicate is a neighbour at distance 0
    assert r[2].tolist() == [1.0, 1.0, 1.0, 4.0, 36.0]
    with pytest.raises(ValueError, match="need more than 5"):
        kth_neighbour_radii(x, (5,))


def test_identical_sets_score_one_and_far_sets_zero():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    same = manifold_scores(real, real.copy())
    assert same["precision"] == 1 and same["recall"] == 1 and same["coverage"] == 1
    # Every ball holds its centre and its k-1 strictly nearer neighbours: N k hits over k N. Only
    # the k-th neighbour on the ball's edge can go either way with rounding, hence the tolerance.
    assert same["density"] == pytest.approx(1.0, abs=0.02)
    far = manifold_scores(real, rng.normal(50, 1, size=(200, 16)))
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_collapsed_generator_is_precise_but_covers_little():
    """Fakes that all sit near a few real points: high precision and density per fake, low recall
    and coverage (what P/R and D/C are for, and what FID alone cannot tell apart)."""
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 8))
    modes = real[:4]
    fake = np.repeat(modes, 50, axis=0) + rng.normal(scale=0.01, size=(200, 8))
    s = manifold_scores(real, fake)
    assert s["precision"] == 1.0 and s["density"] > 0.19
    assert s["recall"] <= 0.02 and s["coverage"] < 0.15      # 4 modes: ~4 of 400 reals, ~10 balls each
    assert s == pytest.approx(brute_force(real, fake), abs=1e-12)
    good = manifold_scores(real, rng.normal(size=(200, 8)))
    assert good["recall"] > 0.6 and good["coverage"] > 0.8


def test_blocks_bound_the_distance_matrix_in_memory():
    """10k x 10k in float64 would be 800 MB; a block holds at most `chunk_elements` distances."""
    x = torch.zeros(10_000, 2, dtype=torch.float64)
    sizes = [d2.numel() for _, d2 in manifold._blocks(x[:1000], x, chunk_elements=2 ** 16)]
    assert max(sizes) <= 2 ** 16 and sum(sizes) == 1000 * 10_000
    assert manifold.CHUNK_ELEMENTS * 8 <= 64 * 2 ** 20
