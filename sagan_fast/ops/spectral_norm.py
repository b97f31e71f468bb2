"""Spectral norm ops with backend dispatch (see :mod:`sagan_fast.ops._backend`).

Two ops, split where the math splits:

- :func:`spectral_norm_power_iteration_` updates u and v of *many* weights at once (no autograd;
  it runs once per weight update) and returns each sigma = u . W v, as float32.
- :func:`spectral_norm_normalize` is ``W / sigma`` for one weight, differentiable in W with u and v
  constant: ``dW = (G - <G, W_sn> u v^T) / sigma``.

Each backend module (``reference_backend``, ``triton.spectral_norm``, ``cuda``; see
:func:`sagan_fast.ops.backend_modules.backend_module`) provides
``power_iteration_(weights, us, vs, dims, n_power_iterations, eps)`` and
``normalize(weight, u, v, sigma, dim)`` with these exact semantics.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import reference
from ._backend import accumulation_dtype, resolve_backend
from .backend_modules import backend_module

OP_POWER_ITERATION = "spectral_norm_power_iteration"
OP_NORMALIZE = "spectral_norm_normalize"


def _matrix_shape(weight: torch.Tensor, dim: int) -> tuple[int, int]:
    rows = weight.shape[dim]
    return rows, weight.numel() // max(rows, 1)


def check_spectral_norm_inputs(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int,
                               where: str) -> int:
    """Clear errors before any launch; returns dim normalized to [0, ndim)."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{where}: weight must be a floating-point tensor, got {type(weight).__name__}"
                        + (f" of dtype {weight.dtype}" if isinstance(weight, torch.Tensor) else ""))
    if weight.ndim < 2:
        raise ValueError(f"{where}: weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
    if not -weight.ndim <= dim < weight.ndim:
        raise IndexError(f"{where}: dim {dim} out of range for a weight of {weight.ndim} dimensions")
    dim = dim % weight.ndim
    if weight.numel() == 0:
        raise ValueError(f"{where}: weight of shape {tuple(weight.shape)} is empty")
    rows, cols = _matrix_shape(weight, dim)
    for name, vec, n in (("u", u, rows), ("v", v, cols)):
        if not isinstance(vec, torch.Tensor) or vec.ndim != 1 or vec.numel() != n:
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"{where}: {name} must have shape ({n},) for a weight of shape "
                             f"{tuple(weight.shape)} with dim={dim}, got {shape}")
        if vec.device != weight.device:
            raise ValueError(f"{where}: {name} is on {vec.device} but the weight is on {weight.device}")
        if not vec.is_floating_point():
            raise TypeError(f"{where}: {name} must be floating point, got {vec.dtype}")
    return dim


@torch.no_grad()
def spectral_norm_power_iteration_(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                                   vs: Sequence[torch.Tensor], dims: Sequence[int], *,
                                   n_power_iterations: int = 1, eps: float = 1e-12,
                                   backend: str | None = None) -> torch.Tensor:
    """Power iteration on every weight at once; u and v updated in place; returns sigmas (L,) in float32
    (float64 for float64 weights).

    Order as torch: ``u = normalize(W v)``, ``v = normalize(W^T u)`` (``n_power_iterations`` times,
    ``eps`` a floor on the norms), then ``sigma = u . W v``.
    """
    weights, us, vs, dims = list(weights), list(us), list(vs), list(dims)
    if not (len(weights) == len(us) == len(vs) == len(dims)):
        raise ValueError(f"spectral_norm_power_iteration_: got {len(weights)} weights, {len(us)} u, "
                         f"{len(vs)} v and {len(dims)} dims")
    if n_power_iterations < 1:
        raise ValueError(f"n_power_iterations must be positive, got {n_power_iterations}")
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    dims = [check_spectral_norm_inputs(w, u, v, d, "spectral_norm_power_iteration_")
            for w, u, v, d in zip(weights, us, vs, dims)]
    name = resolve_backend(backend, *weights, *us, *vs, op=OP_POWER_ITERATION)
    module = backend_module(name, "spectral_norm")
    return module.power_iteration_(weights, us, vs, dims, n_power_iterations, eps)


def spectral_norm_normalize(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                            sigma: torch.Tensor, *, dim: int = 0, backend: str | None = None) -> torch.Tensor:
    """``weight / sigma``, differentiable in weight with u, v constant (sigma = u . W v).

    ``sigma`` must be u . W v for this very weight (from :func:`spectral_norm_power_iteration_` or
    :func:`spectral_norm_sigma`); the reference backend recomputes it with autograd instead.
    """
    dim = check_spectral_norm_inputs(weight, u, v, dim, "spectral_norm_normalize")
    name = resolve_backend(backend, weight, u, v, op=OP_NORMALIZE)
    return backend_module(name, "spectral_norm").normalize(weight, u, v, sigma, dim)


def spectral_norm_normalize_multi(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                                  vs: Sequence[torch.Tensor], sigmas: Sequence[torch.Tensor],
                                  dims: Sequence[int], *, backend: str | None = None) -> list[torch.Tensor]:
    """:func:`spectral_norm_normalize` for many weights: one launch (per dtype group) on triton,
    a loop elsewhere. Eager autograd (torch.compile: use the per-weight op).

    ``sigmas`` are one-element tensors kept in place between calls (the layers' sigma buffers).
    """
    weights, us, vs, sigmas, dims = list(weights), list(us), list(vs), list(sigmas), list(dims)
    if not (len(weights) == len(us) == len(vs) == len(sigmas) == len(dims)):
        raise ValueError(f"spectral_norm_normalize_multi: got {len(weights)} weights, {len(us)} u, "
                         f"{len(vs)} v, {len(sigmas)} sigmas and {len(dims)} dims")
    if not weights:
        return []
    dims = [check_spectral_norm_inputs(w, u, v, d, "spectral_norm_normalize_multi")
            for w, u, v, d in zip(weights, us, vs, dims)]
    name = resolve_backend(backend, *weights, *us, *vs, op=OP_NORMALIZE)
    if name == "triton" and all(w.is_contiguous() for w in weights):
        return backend_module(name, "spectral_norm").normalize_multi(weights, us, vs, sigmas, dims)
    return [spectral_norm_normalize(w, u, v, s, dim=d, backend=name)
            for w, u, v, s, d in zip(weights, us, vs, sigmas, dims)]


@torch.no_grad()
def spectral_norm_sigma(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """sigma = u . W v from stored u, v (eval mode), as a float32 scalar tensor."""
    dim = check_spectral_norm_inputs(weight, u, v, dim, "spectral_norm_sigma")
    mat = reference.weight_to_matrix(weight, dim)
    dtype = accumulation_dtype(weight.dtype)
    return reference.spectral_norm_sigma(mat.to(dtype), u.to(dtype), v.to(dtype))
