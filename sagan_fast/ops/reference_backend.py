"""The ``reference`` backend: :mod:`sagan_fast.ops.reference` (plain PyTorch, the ground truth)
behind the interface every backend module offers
(see :func:`sagan_fast.ops.backend_modules.backend_module`).

Any device, any floating dtype; autograd differentiates it, so its gradients are the reference too.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import reference
from ._backend import accumulation_dtype


def sagan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return reference.sagan_attention(q, k, v, scale=scale)


@torch.no_grad()
def power_iteration_(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                     dims: Sequence[int], n_power_iterations: int, eps: float) -> torch.Tensor:
    """u, v updated in place, one weight at a time; sigmas (L,) in the accumulation dtype."""
    sigmas = []
    for w, u, v, d in zip(weights, us, vs, dims):
        mat = reference.weight_to_matrix(w, d)
        new_u, new_v = reference.spectral_norm_power_iteration(mat, u, v, n_power_iterations, eps)
        u.copy_(new_u)
        v.copy_(new_v)
        sigmas.append(reference.spectral_norm_sigma(mat, u, v).to(accumulation_dtype(w.dtype)))
    return torch.stack(sigmas)


def normalize(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """W / (u . W v), sigma from this weight, differentiated by autograd (u, v constants): torch's
    own formula (``torch.vdot(u, torch.mv(W, v))``, so complex weights work as in torch)."""
    mat = reference.weight_to_matrix(weight, dim)
    u, v = u.detach().to(weight.dtype), v.detach().to(weight.dtype)
    return weight / reference.spectral_norm_sigma(mat, u, v)
