"""One pass over a snapshot's generated images: every extractor once, every statistic from it.

    stats = generated_statistics(G, extractors, num=50_000, batch_size=256, seed=0,
                                 moments=True, classes=True, keep=10_000)
    stats = generated_statistics(G, [inception, vgg16], ..., moments={"inception"}, classes={"inception"},
                                 keep={"vgg16": 50_000}, is_resize="tf-bilinear")   # per extractor
    stats["inception"].mean(), .cov()        # FID: running float64 sums, never all features at once
    stats["inception"].class_sums            # Inception Score: per-split sums of p(y|x) and p log p
    stats["inception"].sample                # features of images 0..keep-1 (KID, precision/recall, ...)

Images are generated once per batch and each extractor sees them once. Each batch yields a
float64 packet per extractor: [count, sum x, sum x x^T, per IS split: count, sum_y p log p,
sum p(y|x)]. With P processes, rank r makes batches r, r + P, ...; after every round the packets
are gathered (`dist.all_gather`) and added in batch order, so the sums are the same bits whatever
the number of processes, and no process ever holds more than one round of packets. The kept
sample (the first `keep` images, i.i.d. like every other image of the seeded sequence) is
gathered on rank 0 at the end. What each extractor keeps can differ (`moments`, `classes` and
`keep` per extractor name), so a 4096-d VGG16 that serves precision/recall alone never builds a
4096 x 4096 outer product. The Inception Score's logits come from the same pass, unless
`is_resize` asks for another resize than the extractor's own: then from a second pass of the
network over the same images, resized that way.
"""

from __future__ import annotations

import math
from typing import Collection

import numpy as np
import torch

from pipeline import dist, generate

IS_SPLITS = 10          # Salimans et al. 2016: the score's mean and std over 10 splits


def split_bounds(num: int, splits: int) -> np.ndarray:
    """Start index of every split of images 0..num-1 (and num): split s is [s*num//splits, (s+1)*num//splits),
    as the original Inception Score code slices its predictions."""
    return np.array([s * num // splits for s in range(splits + 1)])


class ClassSums:
    """Per split: image count, sum over images of sum_y p log p, and sum of p(y|x) (float64)."""

    def __init__(self, num_classes: int, num: int, splits: int = IS_SPLITS, device: torch.device | str = "cpu"):
        if num < splits:
            raise ValueError(f"the Inception Score's {splits} splits need at least {splits} images, got {num}")
        self.num_classes, self.num, self.splits = num_classes, num, splits
        self.bounds = torch.as_tensor(split_bounds(num, splits), device=device)
        self.count = torch.zeros(splits, dtype=torch.float64, device=device)
        self.neg_entropy = torch.zeros(splits, dtype=torch.float64, device=device)
        self.prob = torch.zeros(splits, num_classes, dtype=torch.float64, device=device)

    @property
    def size(self) -> int:
        return self.splits * (2 + self.num_classes)

    def packet(self, start: int, logits: torch.Tensor) -> torch.Tensor:
        """The flat float64 sums of images start..start+len(logits)-1."""
        p = torch.softmax(logits.double(), dim=1)
        index = torch.arange(start, start + len(p), device=p.device)
        split = torch.searchsorted(self.bounds.to(p.device), index, right=True) - 1
        count = torch.zeros(self.splits, dtype=torch.float64, device=p.device).index_add_(
            0, split, torch.ones(len(p), dtype=torch.float64, device=p.device))
        neg = torch.zeros_like(count).index_add_(0, split, torch.special.xlogy(p, p).sum(1))
        prob = torch.zeros(self.splits, self.num_classes, dtype=torch.float64, device=p.device).index_add_(0, split, p)
        return torch.cat([count, neg, prob.flatten()])

    def add(self, packet: torch.Tensor) -> None:
        s, c = self.splits, self.num_classes
        self.count += packet[:s]
        self.neg_entropy += packet[s:2 * s]
        self.prob += packet[2 * s:].view(s, c)

    def score(self) -> tuple[float, float]:
        """(mean, std) over the splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's mean:
        E_x KL = mean_x sum_y p log p - sum_y pbar log pbar."""
        if torch.any(self.count == 0):
            raise ValueError("an Inception Score split holds no image")
        pbar = self.prob / self.count[:, None]
        kl = self.neg_entropy / self.count - torch.special.xlogy(pbar, pbar).sum(1)
        scores = torch.exp(kl).cpu().numpy()
        return float(np.mean(scores)), float(np.std(scores))


class FeatureStats:
    """What one extractor leaves of the generated images: float64 running sums, IS sums, a sample."""

    def __init__(self, dim: int, device: torch.device, *, moments: bool, class_sums: ClassSums | None):
        self.dim, self.device = dim, device
        self.moments = moments
        self.count = 0
        self.sum = torch.zeros(dim if moments else 0, dtype=torch.float64, device=device)
        self.outer = torch.zeros((dim, dim) if moments else (0, 0), dtype=torch.float64, device=device)
        self.class_sums = class_sums
        self.sample: np.ndarray | None = None        # (keep, dim) float32 on rank 0

    @property
    def size(self) -> int:
        return 1 + self.sum.numel() + self.outer.numel() + (self.class_sums.size if self.class_sums else 0)

    def packet(self, start: int, feats: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        parts = [torch.tensor([len(feats)], dtype=torch.float64, device=self.device)]
        if self.moments:
            x = feats.to(self.device, torch.float64)
            parts += [x.sum(0), (x.T @ x).flatten()]
        if self.class_sums is not None:
            parts.append(self.class_sums.packet(start, logits.to(self.device)))
        return torch.cat(parts)

    def add(self, packet: torch.Tensor) -> None:
        d = self.sum.numel()
        self.count += int(packet[0].item())
        if self.moments:
            self.sum += packet[1:1 + d]
            self.outer += packet[1 + d:1 + d + d * d].view(d, d)
        if self.class_sums is not None:
            self.class_sums.add(packet[1 + d + d * d:])

    def mean(self) -> np.ndarray:
        return (self.sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1, as np.cov) from the running sums."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.sum / self.count
        return ((self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)).cpu().numpy()


def _for(value, name: str):
    """A per-extractor setting: the same for all (bool, int), or per name (a set or a dict)."""
    if isinstance(value, dict):
        return value.get(name, 0)
    if isinstance(value, (bool, int)):
        return value
    return name in value


def generated_statistics(G: torch.nn.Module, extractors: list, *, num: int, batch_size: int, seed: int,
                         moments: bool | Collection[str], classes: bool | Collection[str], keep: int | dict[str, int],
                         generate_kwargs: dict | None = None, is_resize: str | None = None
                         ) -> dict[str, FeatureStats]:
    """The statistics of images 0..num-1 of `seed` per extractor name; the sums on every rank, the
    kept sample on rank 0. `batch_size` must be a whole number of `generate.MICRO_BATCH`es (see
    `evaluator.generation_batch`); `classes`: IS sums for the extractors that have class logits,
    their images resized by `is_resize` (None: the extractor's own resize). `moments`, `classes`:
    for all extractors (bool) or those named; `keep`: for all (int) or per name."""
    if getattr(G, "resolution", 0) == 0:
        from pipeline.errors import UserError

        raise UserError("this snapshot's generator makes flat vectors (resolution 0), not images: "
                        "FID/KID need images")
    device = extractors[0].device
    stats = {ext.name: FeatureStats(ext.dim, ext.device, moments=bool(_for(moments, ext.name)),
                                    class_sums=ClassSums(ext.num_classes, num, device=ext.device)
                                    if _for(classes, ext.name) and ext.num_classes else None)
             for ext in extractors}
    keeps = {ext.name: int(_for(keep, ext.name)) for ext in extractors}
    rank, world = dist.rank(), dist.world_size()
    batches = math.ceil(num / batch_size)
    kept: dict[str, list] = {ext.name: [] for ext in extractors}
    for first in range(0, batches, world):
        b = first + rank
        packets = []
        if b < batches:
            start = b * batch_size
            count = min(batch_size, num - start)
            x = generate.images(G, seed=seed, start=start, count=count, device=device, batch=batch_size,
                                **(generate_kwargs or {}))
            images = generate.to_uint8(x)
            for ext in extractors:
                s, want = stats[ext.name], start < keeps[ext.name]
                if s.class_sums is not None and is_resize not in (None, ext.resize_kind):
                    logits = ext.extract(images, logits=True, resize=is_resize)[1]   # the IS's own pass
                    feats = ext.extract(images)[0] if s.moments or want else torch.empty(len(images), 0)
                else:
                    feats, logits = ext.extract(images, logits=s.class_sums is not None)
                packets.append(s.packet(start, feats, logits))
                if want:
                    kept[ext.name].append((start, feats[:keeps[ext.name] - start].float().cpu().numpy()))
        else:       # this rank has no batch in the last round: an empty packet keeps the gather aligned
            packets = [torch.zeros(s.size, dtype=torch.float64, device=s.device) for s in stats.values()]
        flat = torch.cat([p.to(device) for p in packets])
        for part in dist.all_gather(flat):       # rank order is batch order within a round
            if part[0].item() == 0:
                continue                          # the padding of a rank without a batch
            offset = 0
            for s in stats.values():
                s.add(part[offset:offset + s.size].to(s.device))
                offset += s.size
    if any(keeps.values()):
        gathered = dist.gather_objects(kept)
        if gathered is not None:
            for name, s in stats.items():
                if keeps[name]:
                    parts = sorted((start, f) for g in gathered for start, f in g[name])
                    s.sample = np.concatenate([f for _, f in parts])
    return stats
