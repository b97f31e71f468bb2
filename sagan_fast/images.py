"""Images as a run shows them: uint8 arrays, grids (one class per row for a conditional model),
PNG files written atomically. Used by sample grids during training, by ``python -m
sagan_fast.sample`` and by TensorBoard's image log."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as a PNG stores them."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) image, row by row, black gaps."""
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def grid_labels(n: int, n_classes: int) -> tuple[torch.Tensor | None, int]:
    """(labels, images per row) of an ``n``-image grid: a square grid for an unconditional model
    (labels None); for a conditional one, one class per row, in order (the last row may be short)."""
    if n_classes <= 0:
        return None, math.ceil(math.sqrt(n))
    per_row = math.ceil(n / n_classes)
    return torch.arange(n) // per_row, per_row


def save_image(image: np.ndarray, path: str | os.PathLike) -> Path:
    """(H, W, 1 or 3) uint8 -> a grey or RGB file (format from the suffix), written atomically: a
    viewer (or a killed run) never leaves half a file under the final name."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(tmp, format=_format(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _format(path: Path) -> str:
    from PIL import Image

    Image.init()
    fmt = Image.EXTENSION.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file suffix {path.suffix!r}")
    return fmt


__all__ = ["grid_labels", "image_grid", "save_image", "to_uint8"]
