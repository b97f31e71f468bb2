"""SAGAN attention op with backend dispatch (see :mod:`sagan_fast.ops._backend`).

``sagan_attention(q, k, v, scale=1.0)``: q (B, N, E), k (B, Nk, E), v (B, Nk, Ev) -> (B, N, Ev),
softmax over the keys, no 1/sqrt(E) unless ``scale`` says so. E != Ev is allowed (SAGAN: E = C/8,
Ev = C or C/2). Each backend module (``reference_backend``, ``triton.attention``, ``cuda``; see
:func:`sagan_fast.ops.backend_modules.backend_module`) provides ``sagan_attention(q, k, v, scale)``,
differentiable in q, k and v.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from .backend_modules import backend_module

OP_ATTENTION = "sagan_attention"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Clear errors before any launch: ranks, matching sizes, dtypes and devices."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sagan_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 3:
            raise ValueError(f"sagan_attention: {name} must be 3-D (batch, tokens, features), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"sagan_attention: {name} has dtype {t.dtype}; supported: "
                            f"{', '.join(map(str, SUPPORTED_DTYPES))}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"sagan_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"sagan_attention: q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    B, N, E = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"sagan_attention: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != E:
        raise ValueError(f"sagan_attention: q and k must share the feature size E, got q (…, {E}) and "
                         f"k (…, {k.shape[2]})")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"sagan_attention: k and v must have the same number of keys, got "
                         f"k {k.shape[1]} and v {v.shape[1]}")
    if min(B, N, E, k.shape[1], v.shape[2]) == 0:
        raise ValueError(f"sagan_attention: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")


def sagan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
                    backend: str | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v over keys; (B, N, E), (B, Nk, E), (B, Nk, Ev) -> (B, N, Ev)."""
    check_attention_inputs(q, k, v)   # the one generic check; each backend checks only its own limits
    name = resolve_backend(backend, q, k, v, op=OP_ATTENTION)
    return backend_module(name, "attention").sagan_attention(q, k, v, float(scale))
