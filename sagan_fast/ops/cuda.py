"""The ``cuda`` backend: the compiled extension ``sagan_fast._C`` (CUDA kernels from ``kernels/`` for
CUDA tensors, its C++ implementation for CPU tensors).

The extension defines the operators ``torch.ops.sagan_fast.ext_*`` (schemas in ``csrc/ops_cpu.cpp``);
this module adds what is simplest in Python: their autograd formulas and fake (meta) kernels, so
``torch.compile`` traces them, and the three functions :mod:`sagan_fast.ops.spectral_norm` and
:mod:`sagan_fast.ops.attention` dispatch to:

- ``power_iteration_(weights, us, vs, dims, n_power_iterations, eps) -> sigmas``
- ``normalize(weight, u, v, dim) -> weight / (u . W v)`` (differentiable in weight)
- ``sagan_attention(q, k, v, scale) -> out`` (differentiable in q, k, v)

Importing this module needs the built extension (``pip install -e . --no-build-isolation``).
"""

from __future__ import annotations

from typing import Sequence

import torch

try:
    import sagan_fast._C as _C  # noqa: F401  (loading it registers torch.ops.sagan_fast.ext_*)
except ImportError as exc:  # pragma: no cover - the dispatcher checks availability first
    raise ImportError("sagan_fast.ops.cuda needs the compiled extension sagan_fast._C; build it with "
                      "`pip install -e . --no-build-isolation`") from exc

from . import reference
from ._backend import accumulation_dtype as _acc_dtype

_ops = torch.ops.sagan_fast


# --------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) for torch.compile / FakeTensor tracing
# --------------------------------------------------------------------------------------------

@torch.library.register_fake("sagan_fast::ext_spectral_norm_power_iteration_")
def _power_iteration_fake(weights, us, vs, dims, n_power_iterations, eps):
    device = weights[0].device if len(weights) else torch.device("cpu")
    return torch.empty(len(weights), dtype=_acc_dtype(*(w.dtype for w in weights)), device=device)


@torch.library.register_fake("sagan_fast::ext_spectral_norm_normalize")
def _normalize_fake(weight, u, v, sigma, dim):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


@torch.library.register_fake("sagan_fast::ext_spectral_norm_normalize_backward")
def _normalize_backward_fake(grad, weight, u, v, sigma, dim):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


@torch.library.register_fake("sagan_fast::ext_sagan_attention_forward")
def _attention_forward_fake(q, k, v, scale):
    B, N, _ = q.shape
    out = torch.empty((B, N, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, N), dtype=_acc_dtype(q.dtype), device=q.device)
    return out, lse


@torch.library.register_fake("sagan_fast::ext_sagan_attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


# --------------------------------------------------------------------------------------------
# Autograd: the backward ops are themselves extension ops (kernels on CUDA, C++ on CPU)
# --------------------------------------------------------------------------------------------

def _normalize_setup_context(ctx, inputs, output):
    weight, u, v, sigma, dim = inputs
    # Saved (not cloned): autograd's version check turns an in-place u/v/sigma update between
    # forward and backward into a clear error instead of a wrong gradient.
    ctx.save_for_backward(weight, u, v, sigma)
    ctx.dim = dim


def _normalize_backward(ctx, grad):
    weight, u, v, sigma = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate again
        return reference.spectral_norm_normalize_grad(grad, weight, u, v, ctx.dim), None, None, None, None
    grad_weight = _ops.ext_spectral_norm_normalize_backward(grad.contiguous(), weight, u, v, sigma, ctx.dim)
    return grad_weight, None, None, None, None


torch.library.register_autograd("sagan_fast::ext_spectral_norm_normalize", _normalize_backward,
                                setup_context=_normalize_setup_context)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _attention_backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward; sagan_attention never hands it to users.
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    grad_q, grad_k, grad_v = _ops.ext_sagan_attention_backward(grad_out, q, k, v, out, lse, ctx.scale)
    return grad_q, grad_k, grad_v, None


torch.library.register_autograd("sagan_fast::ext_sagan_attention_forward", _attention_backward,
                                setup_context=_attention_setup_context)


# --------------------------------------------------------------------------------------------
# The backend interface used by sagan_fast.ops.spectral_norm and sagan_fast.ops.attention
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def power_iteration_(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                     dims: Sequence[int], n_power_iterations: int, eps: float) -> torch.Tensor:
    """One extension call (one multi-tensor launch sequence on CUDA) per weight dtype; returns sigmas in
    the order given, float32 (float64 for float64 weights). u and v are updated in place."""
    weights, us, vs, dims = list(weights), list(us), list(vs), [int(d) for d in dims]
    groups: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(w.dtype, []).append(i)
    out_dtype = _acc_dtype(*groups)
    # Mixed dtypes: each group's sigmas are put back in order by one stack of device views (no
    # index tensor from host memory, so this is capture-safe too).
    ordered: list[torch.Tensor | None] = [None] * len(weights)
    for dtype, idx in groups.items():
        # The kernels want u, v contiguous and of the weight's dtype; anything else runs on a copy
        # that is written back (rare: buffers are created that way by sagan_fast.nn).
        work_us = [_as_work_vector(us[i], dtype) for i in idx]
        work_vs = [_as_work_vector(vs[i], dtype) for i in idx]
        group_sigmas = _ops.ext_spectral_norm_power_iteration_([weights[i].detach() for i in idx], work_us,
                                                                work_vs, [dims[i] for i in idx],
                                                                int(n_power_iterations), float(eps))
        for j, i in enumerate(idx):
            if work_us[j] is not us[i]:
                us[i].copy_(work_us[j])
            if work_vs[j] is not vs[i]:
                vs[i].copy_(work_vs[j])
        if len(groups) == 1:  # the usual case: one dtype, no reordering
            return group_sigmas
        for sigma, i in zip(group_sigmas.to(out_dtype).unbind(), idx):
            ordered[i] = sigma
    return torch.stack(ordered)


def _as_work_vector(vec: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if vec.dtype == dtype and vec.is_contiguous():
        return vec
    return vec.to(dtype).contiguous()


def normalize(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """weight / (u . W v); backward ``dW = (G - <G, W_sn> u v^T) / sigma`` with u, v, sigma constant.

    sigma is computed here, from this very weight (the reference formula in the accumulation
    dtype), and handed to the extension op, whose signature takes it.
    """
    u, v = u.detach(), v.detach()
    if u.dtype != weight.dtype:
        u = u.to(weight.dtype)
    if v.dtype != weight.dtype:
        v = v.to(weight.dtype)
    with torch.no_grad():
        acc = _acc_dtype(weight.dtype)
        mat = reference.weight_to_matrix(weight.detach(), dim).to(acc)
        sigma = reference.spectral_norm_sigma(mat, u.to(acc), v.to(acc))
    return _ops.ext_spectral_norm_normalize(weight, u, v, sigma, int(dim))


def sagan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v; any strides; (B, N, E), (B, Nk, E), (B, Nk, Ev) -> (B, N, Ev)."""
    out, _ = _ops.ext_sagan_attention_forward(q, k, v, float(scale))
    return out
