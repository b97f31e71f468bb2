"""The scores, from features and logits already extracted: FID, KID and IS by torchmetrics, and the
class scores of the digits judge.

torchmetrics' FrechetInceptionDistance / KernelInceptionDistance / InceptionScore accept any
feature module; we hand them :class:`PrecomputedFeatures` (the identity) and the features we
extracted once, so one pass of the (expensive) network feeds every score, and the real side is
kept between calls (``reset_real_features=False``). KID and IS draw random subsets: they run
under a forked, seeded RNG, so a score is the same on every call and the caller's random stream
(a training run's, which its checkpoints restore) is not touched.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import nn

# A digit counts as recognized when the judge gives it >= 90%. Measured with the shipped classifier
# (tests/test_metrics.py checks the ordering): 90% of held-out real digits pass, 13% of 50/50 blends
# of two real digits (a morph), none of uniform or Gaussian noise.
CONFIDENCE_THRESHOLD = 0.9
# torch-fidelity's KID: 100 subsets of 1000 (the evaluate command's default). Every subset gives an
# unbiased estimate, so fewer only add variance: the Evaluator's default of 10 keeps a call during
# training cheap (~0.1 s instead of ~1 s for 1000 samples on a CPU core).
KID_SUBSETS = 100
EVALUATOR_KID_SUBSETS = 10
KID_SUBSET_SIZE = 1000
# One split: the class marginal from all samples. torch-fidelity's 10 splits assume 50,000 samples;
# splitting a few hundred would make IS depend on how many samples were drawn.
IS_SPLITS = 1


# The features are this process's own: never all-gather them. torchmetrics syncs across the default
# process group when one exists; a training run under torchrun scores on rank 0 alone, so the other
# ranks would never join that collective and rank 0 would wait for ever.
_LOCAL = dict(sync_on_compute=False, dist_sync_on_step=False)


class PrecomputedFeatures(nn.Module):
    """The identity, as the "feature extractor" of torchmetrics' metrics: they receive features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@contextlib.contextmanager
def _seeded(seed: int):
    """Fork the CPU generator (restored on exit) and seed it: torchmetrics draws subsets from it.
    Only the CPU one: torch.manual_seed would also reseed a training run's CUDA generators."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class FrechetDistance:
    """FID between a fixed real feature set (given once) and the fake features of each call."""

    def __init__(self, real_features: torch.Tensor) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        _check_features(real_features, "real")
        self.metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real_features.shape[1]),
                                               reset_real_features=False, **_LOCAL)
        self.metric.update(real_features.double().cpu(), real=True)

    def __call__(self, fake_features: torch.Tensor) -> float:
        _check_features(fake_features, "fake")
        self.metric.reset()
        self.metric.update(fake_features.double().cpu(), real=False)
        return float(self.metric.compute())


class KernelDistance:
    """KID (mean over random subsets, polynomial kernel: torchmetrics' defaults) against fixed reals."""

    def __init__(self, real_features: torch.Tensor, subsets: int = KID_SUBSETS,
                 subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> None:
        from torchmetrics.image.kid import KernelInceptionDistance

        _check_features(real_features, "real")
        self.real_features = real_features.double().cpu()
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self._metric_class = KernelInceptionDistance

    def __call__(self, fake_features: torch.Tensor) -> tuple[float, float]:
        _check_features(fake_features, "fake")
        size = min(self.subset_size, len(self.real_features), len(fake_features))
        with warnings.catch_warnings():  # "will save all extracted features": that is the point
            warnings.simplefilter("ignore", UserWarning)
            metric = self._metric_class(feature=PrecomputedFeatures(self.real_features.shape[1]),
                                        subsets=self.subsets, subset_size=size, **_LOCAL)
        metric.update(self.real_features, real=True)
        metric.update(fake_features.double().cpu(), real=False)
        with _seeded(self.seed):
            mean, std = metric.compute()
        return float(mean), float(std)


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FID of two feature sets (N, D) (torchmetrics' FrechetInceptionDistance on them)."""
    return FrechetDistance(real_features)(fake_features)


def kernel_distance(real_features: torch.Tensor, fake_features: torch.Tensor, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) of two feature sets; subsets capped at the smaller set's size."""
    return KernelDistance(real_features, subsets, subset_size, seed)(fake_features)


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = 0) -> tuple[float, float]:
    """IS (mean, std over splits; std NaN for one split) of class logits (N, K) (torchmetrics'
    InceptionScore on them): exp E[KL(p(y|x) || p(y))], at most K."""
    from torchmetrics.image.inception import InceptionScore

    _check_features(logits, "logits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=min(splits, len(logits)),
                                **_LOCAL)
    metric.update(logits.double().cpu())
    with _seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # std of a single split
        mean, std = metric.compute()
    return float(mean), float(std)


def class_coverage(logits: torch.Tensor) -> float:
    """Entropy of the predicted-class histogram / log(K): 1 when every class is predicted equally
    often, 0 when one class takes everything (mode collapse)."""
    k = logits.shape[1]
    counts = torch.bincount(logits.argmax(1), minlength=k).double()
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(k))


def confident_fraction(logits: torch.Tensor, threshold: float = CONFIDENCE_THRESHOLD) -> float:
    """Fraction of samples whose top class probability is >= ``threshold``."""
    return float((logits.softmax(1).max(1).values >= threshold).double().mean())


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples the judge assigns to the class they were drawn for."""
    return float((logits.argmax(1) == labels.to(logits.device)).double().mean())


def _check_features(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} features must be a (N >= 2, D) tensor, got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} features hold NaN or Inf")
