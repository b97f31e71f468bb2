"""What a run shows besides its losses: sample grids of the EMA generator (PNG), attention gammas,
spectral-norm sigma statistics."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn.spectral_norm import spectral_norm_sigmas
from .config import TrainConfig

SAMPLES_DIR = "samples"


def attention_gammas(prefix: str, model: nn.Module) -> dict[str, float]:
    """The scalar gamma of every self-attention layer (ours or a baseline: any module with one)."""
    return {f"gamma/{prefix}.{name}": float(m.gamma.detach()) for name, m in model.named_modules()
            if isinstance(getattr(m, "gamma", None), nn.Parameter) and m.gamma.ndim == 0}


def sigma_stats(prefix: str, model: nn.Module) -> dict[str, float]:
    """Min, mean and max of sigma = u . W v over the model's spectrally normalized weights."""
    s = spectral_norm_sigmas(model)
    if s.numel() == 0:
        return {}
    return {f"sn_sigma/{prefix}_min": s.min().item(), f"sn_sigma/{prefix}_mean": s.mean().item(),
            f"sn_sigma/{prefix}_max": s.max().item()}


def model_scalars(G: nn.Module, D: nn.Module) -> dict[str, float]:
    """The attention gammas and SN sigma statistics of both models (a few syncs: at log steps)."""
    out: dict[str, float] = {}
    for name, model in (("G", G), ("D", D)):
        out.update(attention_gammas(name, model))
        out.update(sigma_stats(name, model))
    return out


def fixed_noise(cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sample grid's noise: the same for every step of a run (its own generator); labels cycle
    through the classes of a conditional model."""
    g = torch.Generator().manual_seed(cfg.run.seed)
    z = torch.randn(cfg.run.n_samples, cfg.model.z_dim, generator=g).to(device)
    n_classes = cfg.model.n_classes
    y = (torch.arange(cfg.run.n_samples) % n_classes).to(device) if n_classes > 0 else None
    return z, y


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) uint8, black padding."""
    b, c, h, w = images.shape
    rows = math.ceil(b / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid.permute(1, 2, 0).to(torch.uint8).numpy()


def save_image_grid(images: torch.Tensor, path: Path) -> None:
    """PNG written atomically (a viewer never sees half a file)."""
    from PIL import Image

    arr = image_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])))
    img = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def save_samples(G: nn.Module, noise: tuple[torch.Tensor, torch.Tensor | None], out: str | os.PathLike,
                 step: int) -> Path:
    """The grid ``G`` (the EMA generator, in eval mode) makes from ``noise``, as samples/step_N.png."""
    path = Path(out) / SAMPLES_DIR / f"step_{step:08d}.png"
    save_image_grid(G(*noise), path)
    return path


def newest_samples(out: str | os.PathLike, up_to_step: int) -> Path | None:
    """The newest samples/step_N.png with N <= ``up_to_step`` (what a resumed run has shown so far)."""
    found = [(int(m.group(1)), p) for p in (Path(out) / SAMPLES_DIR).glob("step_*.png")
             if (m := re.fullmatch(r"step_(\d+)\.png", p.name)) and int(m.group(1)) <= up_to_step]
    return max(found)[1] if found else None
