"""The metrics `--metrics` chooses from, each computed from one pass's statistics (stats.py).

    ganpipe eval --run-dir RUN --metrics fid,kid,pr,dc,is

| --metrics | records                | from                                                     | default extractor | better |
|-----------|------------------------|----------------------------------------------------------|-------------------|--------|
| fid       | fid                    | running float64 mean/cov of all N generated vs the split | inception         | lower  |
| kid       | kid                    | clean-fid's KID on the samples (100 subsets of <= 1000)  | inception         | lower  |
| pr        | precision, recall      | k = 3 nearest-neighbour balls (Kynkäänniemi et al. 2019) | vgg16             | higher |
| dc        | density, coverage      | k = 5 nearest-neighbour balls (Naeem et al. 2020)        | vgg16             | higher |
| is        | is (and is_std)        | class logits, 10 splits (Salimans et al. 2016)           | inception         | higher |

`fid` with a DINOv2 extractor is FD_DINOv2 (Stein et al. 2023). Without `--extractor`, each metric
runs on the network its paper defines it on (`Metric.extractor`, `extractor_plan`): precision/recall
and density/coverage on VGG16 fc2 features, the others on Inception; a named `--extractor` serves
every metric. The samples (KID, P/R, D/C): a seeded sample of R real images, R = `--num-real`
(default `refstats.SAMPLE_MAX`, 10,000 as Naeem et al.; `all`: the whole split), and the features
of generated images 0..min(N, R)-1 (with `all`: all N), so both sides are equal in size as in both
papers unless the data is smaller. Each metric names the protocol fields that make its
scores comparable (k, sample sizes, KID subsets, the IS's splits and resize); they go into every record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.metrics.fid import KID_SUBSET_SIZE, KID_SUBSETS, frechet_distance, kernel_distance
from pipeline.metrics.manifold import manifold_scores
from pipeline.metrics.stats import IS_SPLITS, FeatureStats
from pipeline.registry import Registry

SAMPLE_GEN = 10_000     # generated features kept for KID and the k-NN metrics by default (= refstats.SAMPLE_MAX)
PR_K = 3                # Kynkäänniemi et al. 2019
DC_K = 5                # Naeem et al. 2020


@dataclass(frozen=True)
class Setup:
    """What a metric's protocol depends on, known before any image is generated."""
    num_gen: int
    sample_gen: int         # generated features kept
    sample_ref: int         # real features in the reference sample
    seed: int
    device: object = None   # where the k-NN distances are computed
    is_resize: str = ""     # protocol tag of the Inception Score's resize ("": the extractor's own)


@dataclass(frozen=True)
class Metric:
    records: tuple[str, ...]                           # the `metric` of each record it writes
    protocol: Callable[[Setup], dict]                  # fields that make its scores comparable
    compute: Callable[[FeatureStats, object, Setup], dict[str, tuple[float, dict]]]   # name -> (value, extra)
    moments: bool = False                              # needs the running mean/covariance
    sample: bool = False                               # needs the kept feature sample
    classes: bool = False                              # needs class logits (Inception Score)
    extractor: str = "inception"                       # its feature network when --extractor names none


METRICS = Registry("metric")


def _samples(setup: Setup) -> dict:
    # num_real: the real images compared against, beside num_gen; it equals sample_ref (which the
    # protocol key holds, also for records written before num_real was).
    return {"sample_gen": setup.sample_gen, "sample_ref": setup.sample_ref, "num_real": setup.sample_ref}


METRICS.register("fid")(Metric(
    records=("fid",), protocol=lambda s: {}, moments=True,
    compute=lambda g, ref, s: {"fid": (frechet_distance(g.mean(), g.cov(), ref.mu, ref.sigma), {})}))


def _kid_protocol(s: Setup) -> dict:
    return {"kid_subsets": KID_SUBSETS, "kid_subset_size": int(min(KID_SUBSET_SIZE, s.sample_gen, s.sample_ref)),
            **_samples(s)}


METRICS.register("kid")(Metric(
    records=("kid",), protocol=_kid_protocol, sample=True,
    compute=lambda g, ref, s: {"kid": (kernel_distance(ref.feats, g.sample, seed=s.seed, device=s.device), {})}))  # clean-fid's order


def _manifold(pr_k: int | None, dc_k: int | None):
    def compute(g: FeatureStats, ref, s: Setup) -> dict:
        out = manifold_scores(ref.feats, g.sample, pr_k=pr_k, dc_k=dc_k, device=s.device, real_radii=ref.knn_radii)
        return {name: (value, {}) for name, value in out.items()}
    return compute


# Both papers define their metrics on VGG16 fc2 features (features.py, vgg16).
METRICS.register("pr")(Metric(
    records=("precision", "recall"), protocol=lambda s: {"k": PR_K, **_samples(s)}, sample=True,
    compute=_manifold(PR_K, None), extractor="vgg16"))
METRICS.register("dc")(Metric(
    records=("density", "coverage"), protocol=lambda s: {"k": DC_K, **_samples(s)}, sample=True,
    compute=_manifold(None, DC_K), extractor="vgg16"))


def _inception_score(g: FeatureStats, ref, s: Setup) -> dict:
    mean, std = g.class_sums.score()
    return {"is": (mean, {"is_std": std, "num_classes": g.class_sums.num_classes})}


def _is_protocol(s: Setup) -> dict:
    # The IS record's `resize` is the resize its logits were computed on (--is-resize), which the
    # protocol key holds: a clean-resized IS and a TF-bilinear one are two series.
    return {"splits": IS_SPLITS, **({"resize": s.is_resize} if s.is_resize else {})}


METRICS.register("is")(Metric(
    records=("is",), protocol=_is_protocol, classes=True, compute=_inception_score))

# --is-resize: how the Inception Score's images reach the network's side. "clean" is clean-fid's
# (the extractor's own resize, shared with FID); "tf-bilinear" is the resize inside the original
# Inception Score graph (Salimans et al.'s TF ResizeBilinear) and StyleGAN2-ADA's Inception file,
# the one published IS figures were computed with.
IS_RESIZES = ("clean", "tf-bilinear")


def inception_score(probs, splits: int = IS_SPLITS) -> tuple[float, float]:
    """The formula on an (N, C) array of p(y|x), as Salimans et al.'s code computes it: per split
    [i N / splits, (i + 1) N / splits), exp(mean_x KL(p(y|x) || mean p(y))); (mean, std) over splits."""
    import numpy as np

    probs = np.asarray(probs, np.float64)
    scores = []
    for i in range(splits):
        part = probs[i * len(probs) // splits:(i + 1) * len(probs) // splits]
        py = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def extractor_plan(metrics: list[str], named: list[str] | None) -> dict[str, list[str]]:
    """{metric: the extractors it is computed on}: every one of `named` (--extractor), or when
    none is named each metric's own (`Metric.extractor`: vgg16 for pr and dc, inception otherwise)."""
    return {m: list(named) if named else [METRICS.get(m).extractor] for m in metrics}


def parse_metrics(text: str) -> list[str]:
    """'fid,kid' -> ['fid', 'kid'], each checked against METRICS (ConfigError names the choices)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        from pipeline.errors import ConfigError

        raise ConfigError(f"--metrics is empty; choose from {', '.join(METRICS.keys())}")
    for name in names:
        METRICS.get(name)
    return list(dict.fromkeys(names))


def record_metrics() -> list[str]:
    """Every `metric` a record can carry (what --best-metric chooses from)."""
    return sorted({r for name in METRICS.keys() for r in METRICS.get(name).records})
