"""FID and KID from feature arrays, computed by clean-fid's own functions.

    mu, sigma = feature_stats(feats)                     # np.mean, np.cov as clean-fid does
    fid = frechet_distance(mu_g, sigma_g, mu_r, sigma_r)  # cleanfid.fid.frechet_distance
    kid = kernel_distance(feats_g, feats_r, seed=0)      # cleanfid.fid.kernel_distance, seeded

The evaluator's FID takes its generated mean and covariance from running float64 sums
(`stats.py`) instead of `feature_stats`; `scores.py` serves every metric by its `--metrics` name.
"""

from __future__ import annotations

import contextlib
import io
import warnings
import numpy as np

KID_SUBSETS = 100          # clean-fid's defaults for kernel_distance
KID_SUBSET_SIZE = 1000


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) exactly as clean-fid computes them: np.mean in the features' own dtype
    (float32 from a network), np.cov (always float64), rowvar=False. Same bits, same FID."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"feature statistics need at least 2 feature vectors, got shape {feats.shape}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), by clean-fid (its singular-product fallback included)."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    # clean-fid prints a note when it has to regularise a singular product (keep stdout for our
    # lines), and passes scipy's deprecated `disp` argument to sqrtm (a warning on every call).
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning)
        return float(cleanfid_frechet(mu1, sigma1, mu2, sigma2))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, *, seed: int, num_subsets: int = KID_SUBSETS,
                    max_subset_size: int = KID_SUBSET_SIZE) -> float:
    """KID (cubic polynomial kernel MMD over random subsets) by clean-fid, made deterministic.

    Costs about 10 s on this project's 2-core CPU with the defaults (100 subsets of 1000),
    whatever N is: clean-fid computes it with numpy on the CPU.

    clean-fid draws its subsets from numpy's global RNG; we seed it for the call and restore the
    previous state afterwards, so the score depends only on `seed` and nobody else's RNG moves.
    """
    from cleanfid.fid import kernel_distance as cleanfid_kid

    if min(len(feats1), len(feats2)) < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    state = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        # float32, as clean-fid's own pipeline hands it features (and twice as fast as float64).
        return float(cleanfid_kid(np.asarray(feats1, np.float32), np.asarray(feats2, np.float32),
                                  num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)
