"""What a run shows besides its losses: sample grids of the EMA generator (PNG), attention gammas,
spectral-norm sigma statistics."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..images import grid_labels, image_grid, save_image, to_uint8
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
    """The sample grid's noise: the same for every step of a run (its own generator); a conditional
    model's grid shows one class per row (see :func:`~sagan_fast.images.grid_labels`)."""
    g = torch.Generator().manual_seed(cfg.run.seed)
    z = torch.randn(cfg.run.n_samples, cfg.model.z_dim, generator=g).to(device)
    y, _ = grid_labels(cfg.run.n_samples, cfg.model.n_classes)
    return z, None if y is None else y.to(device)


@torch.no_grad()
def save_samples(G: nn.Module, noise: tuple[torch.Tensor, torch.Tensor | None], out: str | os.PathLike,
                 step: int) -> tuple[Path, np.ndarray]:
    """The grid ``G`` (the EMA generator, in eval mode) makes from ``noise``, written as
    samples/step_N.png; returns its path and the (H, W, C) uint8 grid."""
    z, y = noise
    grid = image_grid(to_uint8(G(z, y)), grid_labels(len(z), G.n_classes)[1])
    return save_image(grid, Path(out) / SAMPLES_DIR / f"step_{step:08d}.png"), grid


def newest_samples(out: str | os.PathLike, up_to_step: int) -> Path | None:
    """The newest samples/step_N.png with N <= ``up_to_step`` (what a resumed run has shown so far)."""
    found = [(int(m.group(1)), p) for p in (Path(out) / SAMPLES_DIR).glob("step_*.png")
             if (m := re.fullmatch(r"step_(\d+)\.png", p.name)) and int(m.group(1)) <= up_to_step]
    return max(found)[1] if found else None
