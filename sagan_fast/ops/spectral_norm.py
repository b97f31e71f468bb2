"""Spectral norm ops with backend dispatch (see :mod:`sagan_fast.ops._backend`).

Two ops, split where the math splits:

- :func:`spectral_norm_power_iteration_` updates u and v of *many* weights at once (no autograd;
  it runs once per weight update) and returns each sigma = u . W v, as float32.
- :func:`spectral_norm_normalize` is ``W / (u . W v)`` for one weight, differentiable in W with u
  and v constant: ``dW = (G - <G, W_sn> u v^T) / sigma``. Every backend computes sigma from the very
  weight it normalizes, so a weight written behind the power iteration's back (``.data``, C++) is
  still divided by its own u . W v, identically on every backend. ``out_dtype`` writes W_sn in
  another floating dtype (the autocast dtype for fp32 master weights: the gradient still goes to
  the weight, in its dtype); the triton backend writes it directly, the others cast. A backward
  that is itself differentiated (``create_graph=True``) runs as plain differentiable ops on every
  backend (:func:`sagan_fast.ops.reference.spectral_norm_normalize_grad`); an ordinary one runs
  the backend's kernels.

Each backend module (``reference_backend``, ``triton.spectral_norm``, ``cuda``; see
:func:`sagan_fast.ops.backend_modules.backend_module`) provides
``power_iteration_(weights, us, vs, dims, n_power_iterations, eps)`` and
``normalize(weight, u, v, dim)`` with these exact semantics.

All of it runs with autocast off: u . W v and the power iteration are reductions of the weight in
its own precision (float32 accumulation at least), not matrix products autocast would run in
bf16 / fp16.

Complex weights (torch's spectral norm supports them: sigma = u^H W v) run on the reference
backend whatever backend is asked for; the kernels are real-valued.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from . import reference
from ._backend import accumulation_dtype, requested_backend, resolve_backend
from .backend_modules import backend_module

OP_POWER_ITERATION = "spectral_norm_power_iteration"
OP_NORMALIZE = "spectral_norm_normalize"


def _matrix_shape(weight: torch.Tensor, dim: int) -> tuple[int, int]:
    rows = weight.shape[dim]
    return rows, weight.numel() // max(rows, 1)


def _is_float_or_complex(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def check_spectral_norm_inputs(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int,
                               where: str) -> int:
    """Clear errors before any launch; returns dim normalized to [0, ndim)."""
    if not isinstance(weight, torch.Tensor) or not _is_float_or_complex(weight):
        raise TypeError(f"{where}: weight must be a floating-point or complex tensor, got "
                        f"{type(weight).__name__}"
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
        if not _is_float_or_complex(vec) or vec.is_complex() != weight.is_complex():
            kind = "complex" if weight.is_complex() else "floating point"
            raise TypeError(f"{where}: {name} must be {kind} like the weight ({weight.dtype}), got "
                            f"{vec.dtype}")
    return dim


_AUTOCAST_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` when it is enabled there, else None."""
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _no_autocast(device_type: str):
    """Autocast off for our reductions (the reference and cuda backends use torch.mv, which
    autocast would run in bf16 / fp16)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _check_out_dtype(weight: torch.Tensor, out_dtype: torch.dtype | None, where: str) -> torch.dtype | None:
    """None when the output keeps the weight's dtype; a clear error for what cannot be written."""
    if out_dtype is None or out_dtype == weight.dtype:
        return None
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point or weight.is_complex():
        raise TypeError(f"{where}: out_dtype must be a floating dtype for a real floating weight, got "
                        f"{out_dtype} for a {weight.dtype} weight")
    return out_dtype


def _resolve(backend: str | None, tensors, op: str) -> str:
    """The backend that runs ``op``: complex tensors always go to the reference (the kernels are
    real-valued), after the requested backend name itself was validated."""
    if any(t.is_complex() for t in tensors):
        requested_backend(backend)  # an unknown name is still an error
        return "reference"
    return resolve_backend(backend, *tensors, op=op)


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
    name = _resolve(backend, [*weights, *us, *vs], OP_POWER_ITERATION)
    module = backend_module(name, "spectral_norm")
    with _no_autocast(weights[0].device.type):
        return module.power_iteration_(weights, us, vs, dims, n_power_iterations, eps)


def power_iteration_checked_(weights: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor],
                             dims: list[int], *, n_power_iterations: int, eps: float,
                             backend: str | None) -> torch.Tensor:
    """:func:`spectral_norm_power_iteration_` for inputs already checked with
    :func:`check_spectral_norm_inputs` (dims in [0, ndim)), all on one device with one weight dtype:
    the backend is resolved from the first weight. For the per-step update of ``sagan_fast.nn``,
    which checks each layer once and runs this after every optimizer step."""
    name = _resolve(backend, [weights[0]], OP_POWER_ITERATION)
    with _no_autocast(weights[0].device.type):
        module = backend_module(name, "spectral_norm")
        return module.power_iteration_(weights, us, vs, dims, n_power_iterations, eps)


def spectral_norm_normalize(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                            sigma: torch.Tensor | None = None, *, dim: int = 0,
                            backend: str | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight / (u . W v)``, sigma computed from this very weight; differentiable in weight with
    u, v constant (backward ``(G - <G, W_sn> u v^T) / sigma``).

    ``out_dtype``: the dtype of the result (default the weight's), e.g. the autocast dtype, so a
    convolution under autocast has nothing left to cast; the gradient reaches the weight in its
    own dtype. ``sigma`` is accepted for callers of the earlier signature and **not used**: every
    backend recomputes u . W v from ``weight`` (one extra pass over W), so no backend can divide a
    weight by a sigma that belongs to another weight, and all backends give the same W_sn for the
    same weight, u and v.
    """
    dim = check_spectral_norm_inputs(weight, u, v, dim, "spectral_norm_normalize")
    out_dtype = _check_out_dtype(weight, out_dtype, "spectral_norm_normalize")
    return _normalize_checked(weight, u, v, dim, out_dtype, _resolve(backend, [weight, u, v], OP_NORMALIZE))


def _normalize_checked(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int,
                       out_dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """:func:`spectral_norm_normalize` on inputs its public entry checked (``dim`` in [0, ndim),
    ``out_dtype`` from :func:`_check_out_dtype`) by the resolved backend ``name``."""
    module = backend_module(name, "spectral_norm")
    with _no_autocast(weight.device.type):
        if name == "triton":
            return module.normalize(weight, u, v, dim, out_dtype)
        out = module.normalize(weight, u, v, dim)
        return out if out_dtype is None else out.to(out_dtype)


def spectral_norm_normalize_multi(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                                  vs: Sequence[torch.Tensor], dims: Sequence[int], *,
                                  backend: str | None = None,
                                  out_dtypes: Sequence[torch.dtype | None] | None = None
                                  ) -> list[torch.Tensor]:
    """:func:`spectral_norm_normalize` for many weights: two launches (per dtype group) on triton,
    a loop elsewhere. ``out_dtypes``: one per weight (None: the weight's). Eager autograd
    (torch.compile: use the per-weight op)."""
    weights, us, vs, dims = list(weights), list(us), list(vs), list(dims)
    out_dtypes = [None] * len(weights) if out_dtypes is None else list(out_dtypes)
    if not (len(weights) == len(us) == len(vs) == len(dims) == len(out_dtypes)):
        raise ValueError(f"spectral_norm_normalize_multi: got {len(weights)} weights, {len(us)} u, "
                         f"{len(vs)} v, {len(dims)} dims and {len(out_dtypes)} output dtypes")
    if not weights:
        return []
    dims = [check_spectral_norm_inputs(w, u, v, d, "spectral_norm_normalize_multi")
            for w, u, v, d in zip(weights, us, vs, dims)]
    out_dtypes = [_check_out_dtype(w, o, "spectral_norm_normalize_multi")
                  for w, o in zip(weights, out_dtypes)]
    name = _resolve(backend, [*weights, *us, *vs], OP_NORMALIZE)
    if name == "triton" and all(w.is_contiguous() for w in weights):
        with _no_autocast(weights[0].device.type):
            return backend_module(name, "spectral_norm").normalize_multi(weights, us, vs, dims, out_dtypes)
    return [_normalize_checked(w, u, v, d, o, name)
            for w, u, v, d, o in zip(weights, us, vs, dims, out_dtypes)]


@torch.no_grad()
def spectral_norm_sigma(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """sigma = u . W v from stored u, v, as a scalar tensor in the accumulation dtype (float32;
    float64 for float64 weights; complex for complex weights)."""
    dim = check_spectral_norm_inputs(weight, u, v, dim, "spectral_norm_sigma")
    mat = reference.weight_to_matrix(weight, dim)
    dtype = accumulation_dtype(weight.dtype)
    with _no_autocast(weight.device.type):
        return reference.spectral_norm_sigma(mat.to(dtype), u.to(dtype), v.to(dtype))
