"""Training data: scikit-learn's digits (built in) or an image folder, and a resumable sharded sampler.

Datasets return ``(image, label, skipped)``: image (C, R, R) float32 in [-1, 1], label an int
(0 for a folder), skipped how many unreadable files were passed over to produce this item (summed
per batch and logged by the loop, so the count survives DataLoader worker processes). Random flips
are not done here but on the batch in the loop, from the seeded global generator, so augmentation
is part of the RNG state a checkpoint restores.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class DataError(ValueError):
    """The data source is missing, empty or entirely unreadable."""


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 64) pixel values 0..16 and (1797,) labels of scikit-learn's digits (no download).

    Reads the CSV that ships inside scikit-learn (what ``sklearn.datasets.load_digits`` reads)
    without importing scikit-learn, whose import (scipy included) takes seconds; falls back to
    ``load_digits`` if the file is not where it is expected.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("--data digits needs scikit-learn (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int64)


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), bilinearly upsampled, in memory."""

    n_classes = 10
    channels = 1

    def __init__(self, resolution: int) -> None:
        pixels, labels = load_digits_arrays()
        images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        # Bilinear keeps strokes smooth; align_corners=False keeps the digit centred.
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.images = (images * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.images[index], int(self.labels[index]), 0


def find_images(root: str | os.PathLike) -> list[Path]:
    """All jpg/png/webp files under ``root`` (recursive, sorted so every rank sees one order)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"--data {str(root)!r}: no such folder (use 'digits' for the built-in dataset)")
    if not root.is_dir():
        raise DataError(f"--data {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"--data {str(root)!r}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images "
                        "found (searched recursively)")
    return files


class ImageFolderDataset(Dataset):
    """Every image under a folder: RGB, centre square crop, resized to ``resolution``, in [-1, 1].

    An unreadable file is skipped (the next file is used) and counted in the item's ``skipped``;
    a warning names it once per process.
    """

    n_classes = 0
    channels = 3

    def __init__(self, root: str | os.PathLike, resolution: int) -> None:
        self.files = find_images(root)
        self.resolution = resolution
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        x = data.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float()
        return x.div_(127.5).sub_(1.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        for skipped in range(len(self.files)):
            i = (index + skipped) % len(self.files)
            try:
                return self.load(i), 0, skipped
            except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for truncated/corrupt files
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"skipping unreadable image {self.files[i]}: {err}", stacklevel=2)
        raise DataError(f"none of the {len(self.files)} images under the data folder could be read")


def build_dataset(data: str, resolution: int) -> Dataset:
    """'digits' or a folder path (see :class:`DigitsDataset`, :class:`ImageFolderDataset`)."""
    if data == "digits":
        return DigitsDataset(resolution)
    return ImageFolderDataset(data, resolution)


@dataclass
class SamplerPosition:
    """Where the data stream is: epoch and batches already taken from it (saved in checkpoints)."""

    epoch: int = 0
    batch: int = 0


class ShardedBatchSampler(Sampler[list[int]]):
    """DistributedSampler's split (a seeded shuffle per epoch, padded to equal shards, rank::world)
    yielding whole batches, restartable from any (epoch, batch) position, for exact resumption.

    Incomplete last batches are dropped so every rank runs the same number of equal-size steps.
    Iterating yields one epoch from the current position; :meth:`advance` moves the position.
    """

    def __init__(self, n_items: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.n_items, self.batch_size = n_items, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.per_rank = math.ceil(n_items / world_size)
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"{n_items} images give {self.per_rank} per process: fewer than one batch of "
                            f"{batch_size} (lower --batch-size or use fewer processes)")
        self.position = SamplerPosition()

    def _epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n_items, generator=g).tolist()
        else:
            order = list(range(self.n_items))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]  # pad by wrapping, as DistributedSampler
        return order[self.rank:total:self.world_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position.batch

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._epoch_indices(self.position.epoch)
        for b in range(self.position.batch, self.batches_per_epoch):
            yield indices[b * self.batch_size:(b + 1) * self.batch_size]

    def advance(self) -> None:
        """Record that one more batch was consumed (call once per batch the loop uses)."""
        self.position.batch += 1
        if self.position.batch >= self.batches_per_epoch:
            self.position = SamplerPosition(self.position.epoch + 1, 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = SamplerPosition(int(state["epoch"]), int(state["batch"]))


def infinite_batches(loader: torch.utils.data.DataLoader, sampler: ShardedBatchSampler
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches forever, epoch after epoch, advancing ``sampler``'s position as each is consumed."""
    while True:
        for batch in loader:
            sampler.advance()
            yield batch


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (draws from the global generator)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)
