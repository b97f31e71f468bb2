"""Train the built-in digits classifier and write the weights file shipped in the package.

    python -m sagan_fast.metrics.train_digits_classifier    # rewrites metrics/digits_classifier.pt
    python -m sagan_fast.metrics.train_digits_classifier --out /tmp/d.pt --epochs 5

Deterministic: seeded init, data order and augmentation, one CPU thread, deterministic algorithms;
the same torch on the same CPU writes the same weights. Trains on 80% of scikit-learn's digits
(stratified, seeded; the other 20% are held out and their accuracy is recorded in the file) as the
SAGAN sees them: upsampled to 32 and 64 px, then resized to the classifier's 16 px, with small random
shifts, rotations, scalings and contrast changes so that a generated digit is judged by its shape.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .digits import (CLASSIFIER_RESOLUTION, HELDOUT_FRACTION, N_CLASSES, SPLIT_SEED, WEIGHTS_FORMAT,
                     WEIGHTS_PATH, DigitsClassifier, heldout_split, real_digits, to_classifier_input)

SOURCE_RESOLUTIONS = (32, 64)
MIXUP_ALPHA = 0.4


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation (+-10 deg), scale (0.9-1.1), shift (+-1 px of 16) and contrast (0.8-1.0)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(b, generator=g)
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (2.0 / CLASSIFIER_RESOLUTION)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    rows = [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Background is -1: pad by sampling a shifted copy (zeros padding would pad with mid-grey).
    out = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    contrast = 0.8 + 0.2 * torch.rand(b, 1, 1, 1, generator=g)
    return ((out + 1.0) * contrast - 1.0).clamp(-1.0, 1.0)


def mixup(x: torch.Tensor, target: torch.Tensor, g: torch.Generator, alpha: float = MIXUP_ALPHA
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each image with another of the batch and its one-hot target by the same weight (mixup,
    Zhang et al. 2018): the classifier learns that a half-3-half-8 is not a confident 3, which is
    what a generator's morph between two digits looks like."""
    # Beta draws from the global generator (seeded by train_classifier); it takes no generator.
    lam = torch.distributions.Beta(alpha, alpha).sample((x.shape[0],)) if alpha > 0 else torch.ones(len(x))
    lam = torch.maximum(lam, 1 - lam)  # the first image dominates
    perm = torch.randperm(x.shape[0], generator=g)
    mixed = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm]
    return mixed, lam.view(-1, 1) * target + (1 - lam.view(-1, 1)) * target[perm]


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).double().mean().item()


def train_classifier(epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                     log=print) -> tuple[DigitsClassifier, dict]:
    """Train from scratch; returns the model (eval mode) and the info stored in the weights file."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on any machine
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        images = {r: real_digits(r)[0] for r in SOURCE_RESOLUTIONS}
        labels = real_digits(SOURCE_RESOLUTIONS[0])[1]
        train_idx, held_idx = heldout_split(labels)
        # Every source resolution, resized to 16 px: (n_res, N, 1, 16, 16).
        inputs = torch.stack([to_classifier_input(images[r]) for r in SOURCE_RESOLUTIONS])
        x_train, y_train = inputs[:, train_idx], labels[train_idx]
        model = DigitsClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(train_idx) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(train_idx), generator=g)
            res = torch.randint(len(SOURCE_RESOLUTIONS), (len(train_idx),), generator=g)
            total = 0.0
            for b in range(steps_per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                x = augment(x_train[res[idx], idx], g)
                target = F.one_hot(y_train[idx], N_CLASSES).float()
                x, target = mixup(x, target, g)
                loss = F.cross_entropy(model(x), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            if log and (epoch + 1) % 5 == 0:
                log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(train_idx):.4f}")
        model.eval()
        held = {f"heldout_accuracy_{r}px": accuracy(model, inputs[i, held_idx], labels[held_idx])
                for i, r in enumerate(SOURCE_RESOLUTIONS)}
        info = {"heldout_accuracy": min(held.values()), **held, "n_train": len(train_idx),
                "n_heldout": len(held_idx), "heldout_fraction": HELDOUT_FRACTION, "split_seed": SPLIT_SEED,
                "seed": seed, "epochs": epochs, "resolution": CLASSIFIER_RESOLUTION,
                "train_seconds": round(time.perf_counter() - start, 1), "torch": str(torch.__version__)}
        return model, info
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def save_weights(model: DigitsClassifier, info: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"format": WEIGHTS_FORMAT, "state_dict": state, "info": info}, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(WEIGHTS_PATH), help="Weights file to write.")
    parser.add_argument("--epochs", type=int, default=30, help="Passes over the training split.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of init, data order and augmentation.")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    model, info = train_classifier(epochs=args.epochs, seed=args.seed)
    save_weights(model, info, args.out)
    print(f"held-out accuracy {info['heldout_accuracy']:.4f} ({info['n_heldout']} digits), "
          f"{info['train_seconds']} s; wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
