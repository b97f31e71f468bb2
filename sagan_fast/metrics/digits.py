"""The built-in digits judge: a small CNN trained on scikit-learn's digits, shipped in the package.

It gives the digits scores a meaning without any download: features for a digits-FID/KID, and class
probabilities for class coverage, the confidently recognized fraction and (conditional models) the
accuracy of samples against the labels they were drawn for.

Input: images in [-1, 1] of any size and 1 or 3 channels (3 are averaged to grey). They are resized
to :data:`CLASSIFIER_RESOLUTION` px (bilinear with antialiasing) -- what the CNN was trained at --
so a 32, 64 or 128 px generator is judged by the same network. 16 px keeps every detail of the 8x8
source digits while a blurred, speckled or broken stroke still changes the features.

The weights file is written by ``python -m sagan_fast.metrics.train_digits_classifier`` (seeded,
deterministic, seconds on a CPU) and holds the state dict plus what the scores need to know about
it (resolution, the held-out split and its accuracy).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..inference import first_line

CLASSIFIER_RESOLUTION = 16
N_CLASSES = 10
FEATURE_DIM = 128
WEIGHTS_FORMAT = 1
WEIGHTS_PATH = Path(__file__).with_name("digits_classifier.pt")
# Held-out split of the 1,797 real digits: the classifier never trains on these; the per-sample
# reference values (coverage, confident fraction) are measured on them.
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


class DigitsClassifier(nn.Module):
    """(B, 1, 16, 16) in [-1, 1] -> 10 logits; :meth:`features` gives the 128-d layer before them.

    Three conv/ReLU stages (16, 32, 64 channels; 16 -> 8 -> 4 px) and two linear layers: ~0.8 M
    multiply-adds per image, so thousands of samples are judged in well under a second on a CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(FEATURE_DIM, N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.fc2(self.dropout(f))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [-1, 1], C 1 or 3, any H = W -> (B, 1, 16, 16) float32 in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise ValueError(f"digits classifier: expected square (B, 1 or 3, H, H) images, "
                         f"got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != CLASSIFIER_RESOLUTION:
        # antialias: a 128 px input is averaged over its pixels, not point-sampled (aliasing would
        # turn thin strokes into broken ones).
        x = F.interpolate(x, size=(CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION), mode="bilinear",
                          align_corners=False, antialias=x.shape[-1] > CLASSIFIER_RESOLUTION)
    return x.clamp(-1.0, 1.0)


def heldout_split(labels: torch.Tensor, fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), stratified by class, seeded: the same split every time."""
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for k in range(N_CLASSES):
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = round(len(idx) * fraction)
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def real_digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 real digits exactly as training sees them at ``resolution`` px, and their labels."""
    from ..train.data import DigitsDataset

    data = DigitsDataset(resolution)
    return data.images, data.labels


def load_weights_file(path: str | Path) -> dict:
    """The weights file as saved by the training script, checked; one clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits classifier weights {str(path)!r} do not exist (write them with "
                                "python -m sagan_fast.metrics.train_digits_classifier)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not ours
        raise ValueError(f"{str(path)!r} is not a readable digits classifier weights file "
                         f"({first_line(err)})") from None
    if not isinstance(saved, dict) or saved.get("format") != WEIGHTS_FORMAT or "state_dict" not in saved:
        raise ValueError(f"{str(path)!r} is not a sagan_fast digits classifier weights file "
                         f"(format {WEIGHTS_FORMAT})")
    return saved


def load_digits_classifier(path: str | Path | None = None,
                           device: str | torch.device = "cpu") -> DigitsClassifier:
    """The shipped classifier (or the file at ``path``), in eval mode, on ``device``.

    The attribute ``info`` holds what the training script recorded (held-out accuracy, split, ...).
    """
    saved = _cached_weights(str(Path(path) if path is not None else WEIGHTS_PATH))
    with torch.random.fork_rng(devices=[]):  # the random init, overwritten below, must not move the
        model = DigitsClassifier()           # caller's RNG (a training run that evaluates)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"digits classifier weights {str(path or WEIGHTS_PATH)!r} do not fit "
                         f"DigitsClassifier: {first_line(err)}") from None
    model.info = dict(saved.get("info", {}))
    return model.to(device).eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def _cached_weights(path: str) -> dict:
    # Read once per process: an evaluator built every N steps must not re-read the file.
    return load_weights_file(path)


@torch.no_grad()
def classify(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 1000
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 128) float64, logits (N, 10) float64) of ``images`` (any size), on the CPU."""
    device = next(model.parameters()).device
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = to_classifier_input(images[start:start + batch_size].to(device))
        f, lg = model.features_and_logits(x)
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    if not feats:
        empty = torch.zeros(0, FEATURE_DIM, dtype=torch.float64)
        return empty, torch.zeros(0, N_CLASSES, dtype=torch.float64)
    return torch.cat(feats), torch.cat(logits)


class DigitsFeatures:
    """The digits judge as a feature extractor: images (any size) -> (128-d features, 10 logits)."""

    name = "digits"
    judges_classes = True  # its classes are the digits: coverage, confident fraction, accuracy

    def __init__(self, device: str | torch.device = "cpu", weights_path: str | Path | None = None,
                 batch_size: int = 1000) -> None:
        self.model = load_digits_classifier(weights_path, device)
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return classify(self.model, images, self.batch_size)
