"""Score a generator against real data, every N training steps or once from the command line.

    evaluator = Evaluator.for_data("digits", resolution=32, n_samples=1000)   # real side: once
    scores = evaluator(G)              # {"digits/fid": ..., "digits/coverage": ..., ...}: floats
    evaluator.reference                # the same keys: the real data scored against itself
    print(format_scores(scores, evaluator.reference))

Each extractor (the built-in digits judge, Inception with a local weights file) extracts the real
images' features once, at construction. A call draws ``n_samples`` images from G with a fixed seed
(the same z every call, so successive scores of a run differ by the model only), extracts their
features once and computes every score from them. The global RNG is never touched: a training run
that evaluates stays bit-identical to one that does not.

Scores (``<extractor>/<score>``; lower is better for fid and kid, higher for the rest):

- ``fid``, ``kid``: Frechet and kernel distance of the fakes' features to all real images' (KID:
  ``kid_subsets`` random subsets, 10 by default here, 100 in ``python -m sagan_fast.evaluate``).
- ``is``: Inception Score from the extractor's logits (digits: at most 10).
- digits only: ``coverage`` (entropy of the predicted-digit histogram / log 10: 1 = all ten digits
  equally often), ``confident`` (fraction recognized with >= 90% probability), and for a
  class-conditional G ``accuracy`` (fraction recognized as the digit they were drawn for).

Reference values (``evaluator.reference``), so that a number means something on its own: fid and kid
of one half of the real images against the other half (seeded split); the per-sample scores of the
real digits the judge never trained on (its held-out 20%); elsewhere of all real images.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import nn

from . import scores as S
from .digits import N_CLASSES, DigitsFeatures, heldout_split, real_digits
from .inception import InceptionFeatures


class FeatureExtractor(Protocol):
    name: str
    judges_classes: bool

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class _Judge:
    """One extractor with its real side: cached real features, FID/KID metrics, reference values."""

    def __init__(self, extractor: FeatureExtractor, real_images: torch.Tensor,
                 real_labels: torch.Tensor | None, reference_indices: torch.Tensor | None, seed: int,
                 kid_subsets: int) -> None:
        self.extractor, self.seed, self.kid_subsets = extractor, seed, kid_subsets
        self.real_features, self.real_logits = extractor(real_images)
        self.fid = S.FrechetDistance(self.real_features)
        self.kid = S.KernelDistance(self.real_features, subsets=kid_subsets, seed=seed)
        self.reference = self._reference(real_labels, reference_indices)

    def _reference(self, labels: torch.Tensor | None, indices: torch.Tensor | None) -> dict[str, float]:
        n = len(self.real_features)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        half_a, half_b = self.real_features[perm[:n // 2]], self.real_features[perm[n // 2:]]
        ref = {"fid": S.frechet_distance(half_b, half_a),
               "kid": S.kernel_distance(half_b, half_a, subsets=self.kid_subsets, seed=self.seed)[0]}
        if self.real_logits is not None:
            idx = indices if indices is not None else torch.arange(n)
            ref.update(self._class_scores(self.real_logits[idx], None if labels is None else labels[idx]))
        return ref

    def _class_scores(self, logits: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        out = {"is": S.inception_score(logits, seed=self.seed)[0]}
        if self.extractor.judges_classes:
            out["coverage"] = S.class_coverage(logits)
            out["confident"] = S.confident_fraction(logits)
            if labels is not None:
                out["accuracy"] = S.class_accuracy(logits, labels)
        return out

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        feats, logits = self.extractor(images)
        out = {"fid": self.fid(feats), "kid": self.kid(feats)[0]}
        if logits is not None:
            out.update(self._class_scores(logits, labels))
        return out


class Evaluator:
    """Scores of generators (or image sets) against one fixed set of real images.

    Build it once (the real side is extracted then), call it with a generator whenever needed;
    ``reference`` holds the real data's own values under the same keys. ``labels_are_classes``:
    a conditional G's labels are the judge's classes (digits), so ``accuracy`` is scored.
    """

    def __init__(self, real_images: torch.Tensor, extractors: Sequence[FeatureExtractor], *,
                 real_labels: torch.Tensor | None = None, reference_indices: torch.Tensor | None = None,
                 n_samples: int = 1000, batch_size: int = 250, seed: int = 0,
                 labels_are_classes: bool = False, kid_subsets: int = S.EVALUATOR_KID_SUBSETS) -> None:
        if not extractors:
            raise ValueError("an Evaluator needs at least one feature extractor")
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 (FID needs a covariance), got {n_samples}")
        if real_images.ndim != 4 or len(real_images) < 4:
            raise ValueError(f"real images must be (N >= 4, C, H, W), got {tuple(real_images.shape)}")
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed
        self.labels_are_classes = labels_are_classes
        self.resolution, self.channels = real_images.shape[-1], real_images.shape[1]
        self.n_real = len(real_images)
        labels = real_labels if labels_are_classes else None
        self.judges = [_Judge(e, real_images, labels, reference_indices, seed, kid_subsets)
                       for e in extractors]
        self.reference = {f"{j.extractor.name}/{k}": v for j in self.judges for k, v in j.reference.items()}

    @property
    def fid_key(self) -> str:
        """The FID to rank checkpoints by: the first extractor's (the digits judge's for digits)."""
        return f"{self.judges[0].extractor.name}/fid"

    @classmethod
    def for_data(cls, data: str = "digits", resolution: int = 32, *,
                 inception_weights: str | Path | None = None,
                 device: str | torch.device = "cpu", n_samples: int = 1000, max_real: int = 10000,
                 seed: int = 0, digits_weights: str | Path | None = None,
                 kid_subsets: int = S.EVALUATOR_KID_SUBSETS) -> "Evaluator":
        """The evaluator of a training run's data: ``'digits'`` (the digits judge, plus Inception when
        ``inception_weights`` is given) or an image folder (Inception; ``max_real`` images, a seeded
        random subset, at ``resolution`` px as training sees them)."""
        # Inception first: a missing or foreign weights file is reported before any other work.
        inception = InceptionFeatures(inception_weights, device) if inception_weights is not None else None
        if data == "digits":
            images, labels = real_digits(resolution)
            held = heldout_split(labels)[1]
            extractors: list = [DigitsFeatures(device, digits_weights)] + ([inception] if inception else [])
            return cls(images, extractors, real_labels=labels, reference_indices=held, n_samples=n_samples,
                       seed=seed, labels_are_classes=True, kid_subsets=kid_subsets)
        if inception is None:
            raise ValueError(f"data {data!r}: scoring an image folder needs Inception weights "
                             "(--inception-weights PATH); the built-in judge knows only the digits")
        images = real_folder_images(data, resolution, max_real, seed)
        return cls(images, [inception], n_samples=n_samples, seed=seed, kid_subsets=kid_subsets)

    def __call__(self, G: nn.Module, n_samples: int | None = None) -> dict[str, float]:
        """Scores of ``G`` (eval mode for the call; its mode is restored) on ``n_samples`` fakes.
        ``G`` is the plain module (e.g. the EMA copy), not a DDP wrapper: it needs ``z_dim`` and
        ``n_classes``."""
        from ..inference import balanced_labels, generate, sample_z

        n = n_samples or self.n_samples
        if n < 2:
            raise ValueError(f"n_samples must be >= 2, got {n}")
        if G.n_classes > 0:
            # Shuffled once, seeded: any batch of them holds every class.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            y = balanced_labels(n, G.n_classes)[order]
        else:
            y = None
        images = generate(G, sample_z(G, n, seed=self.seed), y, batch_size=self.batch_size)
        return self.score_images(images, y if self.labels_are_classes and G.n_classes == N_CLASSES else None)

    def score_images(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """Scores of an image set in [-1, 1]; ``labels``: the classes they were drawn for, if any."""
        if images.ndim != 4 or images.shape[1] != self.channels or len(images) < 2:
            raise ValueError(f"images must be (N >= 2, {self.channels}, H, W) like the real ones "
                             f"({self.channels} channels), got {tuple(images.shape)}")
        out = {}
        for judge in self.judges:
            out.update({f"{judge.extractor.name}/{k}": v for k, v in judge.score(images, labels).items()})
        return out


def real_folder_images(root: str, resolution: int, max_images: int, seed: int = 0) -> torch.Tensor:
    """Up to ``max_images`` images of a folder (seeded random subset), as training reads them."""
    from ..train.data import ImageFolderDataset

    data = ImageFolderDataset(root, resolution)
    for path, why in data.unreadable_folders:
        warnings.warn(f"skipping folder {path}: cannot be listed ({why}); its images are not scored against",
                      stacklevel=2)
    n = min(max_images, len(data))
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return torch.stack([data[int(i)][0] for i in pick])


NAMES = {"fid": "FID", "kid": "KID", "is": "IS", "coverage": "coverage", "confident": "confident",
         "accuracy": "accuracy"}


def format_scores(scores: dict[str, float], reference: dict[str, float] | None = None) -> str:
    """One line: ``digits FID 3.21 (real 0.85), KID ... | inception FID ...``."""
    groups: dict[str, list[str]] = {}
    for key, value in scores.items():
        extractor, name = key.split("/", 1)
        text = f"{NAMES.get(name, name)} {_fmt(name, value)}"
        if reference and key in reference:
            text += f" (real {_fmt(name, reference[key])})"
        groups.setdefault(extractor, []).append(text)
    return " | ".join(f"{g} " + ", ".join(parts) for g, parts in groups.items())


def _fmt(name: str, value: float) -> str:
    if name == "kid":
        return f"{value:.4f}"
    return f"{value:.3f}" if name in ("coverage", "confident", "accuracy") else f"{value:.2f}"
