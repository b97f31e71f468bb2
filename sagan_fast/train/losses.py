"""Hinge loss for GANs (Lim & Ye 2017; SAGAN, BigGAN): D outputs raw logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_loss_d(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], computed in float32 (logits may be bf16 under autocast)."""
    return F.relu(1.0 - d_real.float()).mean() + F.relu(1.0 + d_fake.float()).mean()


def hinge_loss_g(d_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]."""
    return -d_fake.float().mean()
