"""Spectral norm in Triton: a multi-tensor power iteration and a fused W / sigma with its backward.

Every weight is seen as an (A, B, C) view of its contiguous storage with B the SN dim (A = product
of the sizes before ``dim``, C = product after), so the (B, K = A*C) matrix of torch's
``weight_to_matrix`` is ``M[b, a*C + c] = W[a, b, c]`` for any ``dim`` (dim 1: transposed convs).

Power iteration, all weights of a group in three launches whatever their number and shapes
(tables of pointers and sizes, as apex's multi_tensor_apply): with t = W v, s = W^T u,

1. ``_matvec_kernel``:   t = W v                      (one pass over W, split over row blocks
                                                       and column chunks, partial sums to a workspace)
2. ``_rmatvec_kernel``:  u = t / max(|t|, eps), s = W^T u (one pass; writes u)
3. ``_finalize_kernel``: v = s / max(|s|, eps), sigma = u . W v = s . v = |s|^2 / max(|s|, eps)

(n_power_iterations > 1 repeats 1-2, reading v from s.) Each program re-derives the norm it needs
from the small workspace, so there is no grid-wide sync and no atomics: results are deterministic.
Reductions run in float32 (float64 for float64 weights) whatever the weight's dtype.

Normalize: forward ``W / sigma`` with sigma = u . W v recomputed from the very weight being
normalized (never a stored sigma, which after a write the optimizer did not make belongs to another
weight): a partial-sum launch over W, then the scale launch, which sums the partials itself (no
sync) and stores sigma for the backward. Backward, with u, v constant,
``dW = (G - <G, W_sn> u v^T) / sigma`` with <G, W_sn> = <G, W> / sigma: a partial-sum launch and
one fused elementwise launch. The model-level ``normalize_multi`` does the same for many weights in
two launches forward and two backward.

Ops are registered as ``sagan_fast_triton::sn_power_iteration_`` and ``sagan_fast_triton::sn_normalize``
(+ fake and autograd) so torch.compile traces them as opaque nodes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._backend import accumulation_dtype as _acc_dtype

__all__ = ["power_iteration_", "normalize", "normalize_backward", "normalize_multi"]

# Work per program in the power iteration (elements of W). Big enough to amortize the per-program
# vector norms, small enough that SAGAN-128's largest weights spread over many SMs.
_ELEMS_PER_PROGRAM = 1 << 17
_BLOCK_R = 16    # rows of W per tile
_BLOCK_K = 128   # columns of W per tile (the contiguous direction for dim 0)
_BLOCK_N = 1024  # vector chunk for the norms of t, s (16384 rows in SAGAN-128 G's first linear)
_BLOCK_EW = 1024  # elements per program in the elementwise kernels
_MAX_PARTIALS = 512  # programs of the <G, W> reduction; every backward program sums them all

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}

# Table layouts, shared by the host code that fills the tables and the kernels that read them
# (tl.constexpr globals: Triton folds them into the kernels).
# Power iteration, per weight: int32 `meta` columns and int64 `ptrs` columns.
_M_B, _M_C, _M_K, _M_NCS, _M_NRS, _M_TOFF, _M_SOFF, _M_KCHUNK, _M_RCHUNK = (tl.constexpr(i) for i in range(9))
_META_COLS = tl.constexpr(9)
_P_W, _P_U, _P_V = (tl.constexpr(i) for i in range(3))
_PTR_COLS = tl.constexpr(3)
# Work items (program -> (weight, start row or column, split)) of both matrix-vector launches.
_ITEM_COLS = tl.constexpr(3)
# Model-level normalize, per weight: int32 `meta` columns, int64 `ptrs` columns, and the two
# columns of the per-backward gradient table; work items are (weight, start).
_N_NUMEL, _N_B, _N_C, _N_NPARTS, _N_PARTOFF, _N_CHUNK = (tl.constexpr(i) for i in range(6))
_NMETA_COLS = tl.constexpr(6)
_NP_W, _NP_U, _NP_V, _NP_OUTOFF = (tl.constexpr(i) for i in range(4))
_NPTR_COLS = tl.constexpr(4)
_G_GRAD, _G_DW = tl.constexpr(0), tl.constexpr(1)
_GRAD_COLS = tl.constexpr(2)
_NITEM_COLS = tl.constexpr(2)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _sum_splits(part_ptr, base, n_splits, stride, idx, mask, ACC: tl.constexpr):
    """sum over s < n_splits of part[base + s * stride + idx]: a vector from its partial sums."""
    total = tl.zeros(idx.shape, ACC)
    for sp in range(0, n_splits):
        total += tl.load(part_ptr + base + sp * stride + idx, mask=mask, other=0.0)
    return total


@triton.jit
def _inv_norm(part_ptr, base, n_splits, n, eps, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """1 / max(|x|, eps) for the vector x of length n stored as n_splits partial sums."""
    ss = tl.zeros([BLOCK], ACC)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = _sum_splits(part_ptr, base, n_splits, n, idx, idx < n, ACC)
        ss += x * x
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(ss, axis=0)), eps)


@triton.jit
def _matvec_kernel(items_ptr, ptrs_ptr, meta_ptr, t_part_ptr, s_part_ptr, eps_ptr,
                   W_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, ACC: tl.constexpr,
                   V_FROM_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Partial t = W v over rows [r0, r0 + BLOCK_R) and one column chunk; v from its buffer or,
    after the first iteration, v = s / max(|s|, eps) from the workspace."""
    pid = tl.program_id(0)
    eps = tl.load(eps_ptr)
    wid = tl.load(items_ptr + pid * _ITEM_COLS)
    r0 = tl.load(items_ptr + pid * _ITEM_COLS + 1)
    split = tl.load(items_ptr + pid * _ITEM_COLS + 2)
    meta = meta_ptr + wid * _META_COLS
    B = tl.load(meta + _M_B)
    C = tl.load(meta + _M_C).to(tl.int64)
    K = tl.load(meta + _M_K)
    n_rsplit = tl.load(meta + _M_NRS)
    t_off = tl.load(meta + _M_TOFF)
    s_off = tl.load(meta + _M_SOFF)
    k_chunk = tl.load(meta + _M_KCHUNK)
    w_ptr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_W).to(tl.pointer_type(W_DTYPE))
    v_ptr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_V).to(tl.pointer_type(V_DTYPE))

    if V_FROM_S:
        v_scale = _inv_norm(s_part_ptr, s_off, n_rsplit, K, eps, ACC, BLOCK_N)
    rows = r0 + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    row_offs = rows.to(tl.int64) * C
    k_start = split * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    for k in range(k_start, k_end, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        a = cols.to(tl.int64) // C
        col_offs = a * B * C + (cols - a * C)
        if V_FROM_S:
            vec = _sum_splits(s_part_ptr, s_off, n_rsplit, K, cols, col_mask, ACC) * v_scale
        else:
            vec = tl.load(v_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + row_offs[:, None] + col_offs[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(ACC) * vec[None, :]
    tl.store(t_part_ptr + t_off + split * B + rows, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def _rmatvec_kernel(items_ptr, ptrs_ptr, meta_ptr, t_part_ptr, s_part_ptr, eps_ptr,
                    W_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """u = t / max(|t|, eps) (written by the weight's first program); partial s = W^T u over
    columns [c0, c0 + BLOCK_K) and one row chunk."""
    pid = tl.program_id(0)
    eps = tl.load(eps_ptr)
    wid = tl.load(items_ptr + pid * _ITEM_COLS)
    c0 = tl.load(items_ptr + pid * _ITEM_COLS + 1)
    split = tl.load(items_ptr + pid * _ITEM_COLS + 2)
    meta = meta_ptr + wid * _META_COLS
    B = tl.load(meta + _M_B)
    C = tl.load(meta + _M_C).to(tl.int64)
    K = tl.load(meta + _M_K)
    n_csplit = tl.load(meta + _M_NCS)
    t_off = tl.load(meta + _M_TOFF)
    s_off = tl.load(meta + _M_SOFF)
    r_chunk = tl.load(meta + _M_RCHUNK)
    w_ptr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_W).to(tl.pointer_type(W_DTYPE))
    u_ptr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_U).to(tl.pointer_type(U_DTYPE))

    u_scale = _inv_norm(t_part_ptr, t_off, n_csplit, B, eps, ACC, BLOCK_N)
    if (c0 == 0) & (split == 0):
        for r in range(0, B, BLOCK_N):
            idx = r + tl.arange(0, BLOCK_N)
            m = idx < B
            t = _sum_splits(t_part_ptr, t_off, n_csplit, B, idx, m, ACC)
            tl.store(u_ptr + idx, (t * u_scale).to(U_DTYPE), mask=m)

    cols = c0 + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    a = cols.to(tl.int64) // C
    col_offs = a * B * C + (cols - a * C)
    r_start = split * r_chunk
    r_end = tl.minimum(r_start + r_chunk, B)
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    for r in range(r_start, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        row_mask = rows < r_end
        u = _sum_splits(t_part_ptr, t_off, n_csplit, B, rows, row_mask, ACC) * u_scale
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * C + col_offs[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(ACC) * u[:, None]
    tl.store(s_part_ptr + s_off + split * K + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit
def _finalize_kernel(ptrs_ptr, meta_ptr, s_part_ptr, sigma_ptr, eps_ptr,
                     V_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program per weight: v = s / max(|s|, eps); sigma = |s|^2 / max(|s|, eps) (= u . W v)."""
    wid = tl.program_id(0)
    eps = tl.load(eps_ptr)
    meta = meta_ptr + wid * _META_COLS
    K = tl.load(meta + _M_K)
    n_rsplit = tl.load(meta + _M_NRS)
    s_off = tl.load(meta + _M_SOFF)
    v_ptr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_V).to(tl.pointer_type(V_DTYPE))
    ss = tl.zeros([BLOCK], ACC)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        s = _sum_splits(s_part_ptr, s_off, n_rsplit, K, idx, idx < K, ACC)
        ss += s * s
    sq = tl.sum(ss, axis=0)
    denom = tl.maximum(tl.sqrt(sq), eps)
    for start in range(0, K, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = idx < K
        s = _sum_splits(s_part_ptr, s_off, n_rsplit, K, idx, m, ACC)
        tl.store(v_ptr + idx, (s / denom).to(V_DTYPE), mask=m)
    tl.store(sigma_ptr + wid, sq / denom)


@triton.jit
def _uwv_partials_kernel(w_ptr, u_ptr, v_ptr, part_ptr, numel, chunk, B, C,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
    """part[pid] = sum of W[a, b, c] u[b] v[a * C + c] over this program's chunk: partial sums of
    sigma = u . W v, from the very weight being normalized."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, numel)
    BC = B * C  # no methods on B, C: Triton passes an int argument equal to 1 as a constexpr
    acc = tl.zeros([BLOCK], ACC)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < end
        a = offs // BC
        rem = offs - a * BC
        b = rem // C
        c = rem - b * C
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(ACC)
        u = tl.load(u_ptr + b, mask=m, other=0.0).to(ACC)
        v = tl.load(v_ptr + a * C + c, mask=m, other=0.0).to(ACC)
        acc += w * u * v
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _scale_kernel(w_ptr, part_ptr, n_parts, out_ptr, sigma_ptr, numel, ACC: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """sigma = sum of the partial sums (every program, same order: one value); out = W / sigma;
    program 0 also stores sigma (saved for the backward). No sync."""
    p = tl.arange(0, BLOCK_P)
    sigma = tl.sum(tl.load(part_ptr + p, mask=p < n_parts, other=0.0), axis=0)
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(sigma_ptr, sigma)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, (w.to(ACC) / sigma).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dot_partials_kernel(g_ptr, w_ptr, part_ptr, numel, chunk, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """part[pid] = sum of G * W over this program's chunk (float32 / float64)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, numel)
    acc = tl.zeros([BLOCK], ACC)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < end
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(ACC)
        acc += g * w
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _normalize_backward_kernel(g_ptr, u_ptr, v_ptr, sigma_ptr, part_ptr, out_ptr, numel, n_parts,
                               B, C, ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """dW = (G - <G, W_sn> u v^T) / sigma with <G, W_sn> = sum(partials) / sigma, at (a, b, c)."""
    p = tl.arange(0, BLOCK_P)
    gw = tl.sum(tl.load(part_ptr + p, mask=p < n_parts, other=0.0), axis=0)
    sigma = tl.load(sigma_ptr).to(ACC)
    inner = gw / sigma
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    BC = B * C  # no methods on B, C: Triton passes an int argument equal to 1 as a constexpr
    a = offs // BC
    rem = offs - a * BC
    b = rem // C
    c = rem - b * C
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
    u = tl.load(u_ptr + b, mask=m, other=0.0).to(ACC)
    v = tl.load(v_ptr + a * C + c, mask=m, other=0.0).to(ACC)
    tl.store(out_ptr + offs, ((g - inner * u * v) / sigma).to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------
# Host side: tables, launches
# ------------------------------------------------------------------------------------------------

def _abc(shape: Sequence[int], dim: int) -> tuple[int, int, int]:
    A = 1
    for s in shape[:dim]:
        A *= s
    C = 1
    for s in shape[dim + 1:]:
        C *= s
    return A, shape[dim], C


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _table_row(n_cols, values: dict) -> list[int]:
    """One row of a launch table, each value in the column its layout constant names."""
    row = [0] * int(n_cols)
    for col, value in values.items():
        row[int(col)] = int(value)
    return row


class _Plan:
    """Device tables for one list of (weight, u, v, dim): built once, reused while pointers hold."""

    def __init__(self, weights, us, vs, dims, device):
        meta, ptrs, items_mv, items_rmv = [], [], [], []
        t_size = s_size = 0
        for i, (w, u, v, d) in enumerate(zip(weights, us, vs, dims)):
            A, B, C = _abc(w.shape, d)
            K = A * C
            # Column chunks for W v: each program covers ~_ELEMS_PER_PROGRAM elements.
            n_cs = max(1, min(_cdiv(_BLOCK_R * K, _ELEMS_PER_PROGRAM), _cdiv(K, _BLOCK_K)))
            k_chunk = _cdiv(_cdiv(K, n_cs), _BLOCK_K) * _BLOCK_K
            n_cs = _cdiv(K, k_chunk)
            # Row chunks for W^T u, likewise.
            n_rs = max(1, min(_cdiv(_BLOCK_K * B, _ELEMS_PER_PROGRAM), _cdiv(B, _BLOCK_R)))
            r_chunk = _cdiv(_cdiv(B, n_rs), _BLOCK_R) * _BLOCK_R
            n_rs = _cdiv(B, r_chunk)
            meta.append(_table_row(_META_COLS, {_M_B: B, _M_C: C, _M_K: K, _M_NCS: n_cs, _M_NRS: n_rs,
                                                _M_TOFF: t_size, _M_SOFF: s_size, _M_KCHUNK: k_chunk,
                                                _M_RCHUNK: r_chunk}))
            ptrs.append(_table_row(_PTR_COLS, {_P_W: w.data_ptr(), _P_U: u.data_ptr(), _P_V: v.data_ptr()}))
            items_mv += [[i, r0, sp] for r0 in range(0, B, _BLOCK_R) for sp in range(n_cs)]
            items_rmv += [[i, c0, sp] for c0 in range(0, K, _BLOCK_K) for sp in range(n_rs)]
            t_size += n_cs * B
            s_size += n_rs * K
        for rows in (meta, items_mv, items_rmv):
            if max(max(r) for r in rows) >= 2**31:
                raise ValueError("spectral norm (triton): a weight is too large for 32-bit tables")
        self.meta = torch.tensor(meta, dtype=torch.int32).to(device, non_blocking=True)
        self.ptrs = torch.tensor(ptrs, dtype=torch.int64).to(device, non_blocking=True)
        self.items_mv = torch.tensor(items_mv, dtype=torch.int32).to(device, non_blocking=True)
        self.items_rmv = torch.tensor(items_rmv, dtype=torch.int32).to(device, non_blocking=True)
        self.n_mv, self.n_rmv = len(items_mv), len(items_rmv)
        self.t_size, self.s_size = t_size, s_size


_PLANS: dict[tuple, _Plan] = {}
# eps on the device in the accumulation dtype: a Python float argument would reach the kernel as
# float32, which is not the float64 eps of float64 weights.
_EPS: dict[tuple, torch.Tensor] = {}


def _eps_tensor(eps: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (eps, dtype, str(device))
    t = _EPS.get(key)
    if t is None:
        _no_tables_while_capturing(device)
        t = _EPS[key] = torch.tensor(eps, dtype=dtype).to(device)
    return t


_MAX_PLANS = 64
# Plans whose tables a captured CUDA graph reads: never freed, whatever happens to the cache.
_CAPTURED_PLANS: list = []


def _keep_if_captured(plan, device: torch.device):
    if not getattr(plan, "captured", False) and _capturing(device):
        plan.captured = True
        _CAPTURED_PLANS.append(plan)
    return plan


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _no_tables_while_capturing(device: torch.device) -> None:
    # Tables go to the device by a copy from pageable host memory, which a CUDA graph cannot hold.
    if _capturing(device):
        raise RuntimeError(
            "spectral norm (triton): new launch tables are needed while a CUDA graph is being "
            "captured; run the same step once eagerly before capturing (the tables are cached on "
            "the tensors' addresses), and keep SN weights contiguous")


def _plan_for(weights, us, vs, dims) -> _Plan:
    key = tuple((w.data_ptr(), u.data_ptr(), v.data_ptr(), tuple(w.shape), d)
                for w, u, v, d in zip(weights, us, vs, dims)) + (str(weights[0].device),)
    plan = _PLANS.get(key)
    if plan is None:
        _no_tables_while_capturing(weights[0].device)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()  # pointers of freed tensors; rebuilding is cheap
        plan = _PLANS[key] = _Plan(weights, us, vs, dims, weights[0].device)
    return _keep_if_captured(plan, weights[0].device)


def _check_vectors(weights, us, vs) -> None:
    for w, u, v in zip(weights, us, vs):
        for name, x in (("u", u), ("v", v)):
            if x.stride(0) != 1 and x.numel() > 1:
                raise ValueError(f"spectral norm (triton): {name} must be contiguous to be updated in "
                                 f"place, got stride {x.stride()}")
            if x.dtype not in _TL_DTYPES:
                raise TypeError(f"spectral norm (triton): {name} has unsupported dtype {x.dtype}")
        if w.dtype not in _TL_DTYPES:
            raise TypeError(f"spectral norm (triton): weight has unsupported dtype {w.dtype}; "
                            f"supported: {', '.join(map(str, _TL_DTYPES))}")


def _power_iteration_group(weights, us, vs, dims, n_power_iterations, eps) -> torch.Tensor:
    """One (weight dtype, u dtype, v dtype) group: 2 * n_power_iterations + 1 launches."""
    device = weights[0].device
    acc = _acc_dtype(weights[0].dtype)
    plan = _plan_for(weights, us, vs, dims)
    t_part = torch.empty(plan.t_size, device=device, dtype=acc)
    s_part = torch.empty(plan.s_size, device=device, dtype=acc)
    sigmas = torch.empty(len(weights), device=device, dtype=acc)
    eps = _eps_tensor(eps, acc, device)
    w_t, u_t, v_t, acc_t = (_TL_DTYPES[weights[0].dtype], _TL_DTYPES[us[0].dtype],
                            _TL_DTYPES[vs[0].dtype], _TL_DTYPES[acc])
    for it in range(n_power_iterations):
        _matvec_kernel[(plan.n_mv,)](plan.items_mv, plan.ptrs, plan.meta, t_part, s_part, eps,
                                     W_DTYPE=w_t, V_DTYPE=v_t, ACC=acc_t, V_FROM_S=it > 0,
                                     BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N)
        _rmatvec_kernel[(plan.n_rmv,)](plan.items_rmv, plan.ptrs, plan.meta, t_part, s_part, eps,
                                       W_DTYPE=w_t, U_DTYPE=u_t, ACC=acc_t,
                                       BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N)
    _finalize_kernel[(len(weights),)](plan.ptrs, plan.meta, s_part, sigmas, eps,
                                      V_DTYPE=v_t, ACC=acc_t, BLOCK=_BLOCK_N)
    return sigmas


def _power_iteration_impl(weights, us, vs, dims, n_power_iterations, eps) -> torch.Tensor:
    _check_vectors(weights, us, vs)
    # Non-contiguous weights (channels_last convs) are read from a contiguous copy: correct, one
    # extra pass; the kernels index the (A, B, C) view of contiguous storage.
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    out_dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    groups: dict[tuple, list[int]] = {}
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):
        groups.setdefault((w.dtype, u.dtype, v.dtype), []).append(i)
    if len(groups) == 1:
        return _power_iteration_group(weights, us, vs, dims, n_power_iterations, eps).to(out_dtype)
    sigmas = torch.empty(len(weights), device=weights[0].device, dtype=out_dtype)
    for idx in groups.values():
        sigmas[idx] = _power_iteration_group([weights[i] for i in idx], [us[i] for i in idx],
                                             [vs[i] for i in idx], [dims[i] for i in idx],
                                             n_power_iterations, eps).to(out_dtype)
    return sigmas


@torch.library.custom_op("sagan_fast_triton::sn_power_iteration_", mutates_args=("us", "vs"))
def _power_iteration_op(weights: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor],
                        dims: list[int], n_power_iterations: int, eps: float) -> torch.Tensor:
    return _power_iteration_impl(weights, us, vs, dims, n_power_iterations, eps)


@_power_iteration_op.register_fake
def _(weights, us, vs, dims, n_power_iterations, eps):
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    return weights[0].new_empty(len(weights), dtype=dtype)


def power_iteration_(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                     vs: Sequence[torch.Tensor], dims: Sequence[int], n_power_iterations: int,
                     eps: float) -> torch.Tensor:
    """u, v of every weight updated in place (torch's order); returns sigmas (L,) = u . W v.

    Inputs are checked by :func:`sagan_fast.ops.spectral_norm.spectral_norm_power_iteration_`.
    """
    return _power_iteration_op(list(weights), list(us), list(vs), [int(d) for d in dims],
                               int(n_power_iterations), float(eps))


# --- normalize ----------------------------------------------------------------------------------

def _partials_layout(numel: int) -> tuple[int, int]:
    """(number of partial sums, elements per partial) of a reduction over a whole weight: at most
    _MAX_PARTIALS programs, each a whole number of _BLOCK_EW blocks."""
    n_parts = min(_cdiv(numel, _BLOCK_EW), _MAX_PARTIALS)
    chunk = _cdiv(_cdiv(numel, n_parts), _BLOCK_EW) * _BLOCK_EW
    return _cdiv(numel, chunk), chunk


def _normalize_forward_impl(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                            dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W / sigma, sigma) with sigma = u . W v of this weight: two launches."""
    w = weight.contiguous()
    numel = w.numel()
    acc = _acc_dtype(w.dtype)
    n_parts, chunk = _partials_layout(numel)
    partials = torch.empty(n_parts, device=w.device, dtype=acc)
    _, B, C = _abc(w.shape, dim)
    _uwv_partials_kernel[(n_parts,)](w, u.contiguous(), v.contiguous(), partials, numel, chunk, B, C,
                                     ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_EW)
    out = torch.empty_like(w)
    sigma = torch.empty((), device=w.device, dtype=acc)
    _scale_kernel[(_cdiv(numel, _BLOCK_EW),)](w, partials, n_parts, out, sigma, numel, ACC=_TL_DTYPES[acc],
                                              BLOCK=_BLOCK_EW, BLOCK_P=triton.next_power_of_2(_MAX_PARTIALS))
    return out, sigma


def _normalize_backward_impl(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor,
                             v: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor:
    g, w = grad.contiguous(), weight.contiguous()
    numel = w.numel()
    acc = _acc_dtype(w.dtype)
    n_parts, chunk = _partials_layout(numel)
    partials = torch.empty(n_parts, device=w.device, dtype=acc)
    _dot_partials_kernel[(n_parts,)](g, w, partials, numel, chunk, ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_EW)
    _, B, C = _abc(w.shape, dim)
    out = torch.empty_like(w)
    _normalize_backward_kernel[(_cdiv(numel, _BLOCK_EW),)](
        g, u.contiguous(), v.contiguous(), sigma, partials, out, numel, n_parts, B, C,
        ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_EW, BLOCK_P=triton.next_power_of_2(_MAX_PARTIALS))
    return out


@torch.library.custom_op("sagan_fast_triton::sn_normalize", mutates_args=())
def _normalize_op(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                  dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _normalize_forward_impl(weight, u, v, dim)


@_normalize_op.register_fake
def _(weight, u, v, dim):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((), dtype=_acc_dtype(weight.dtype)))


@torch.library.custom_op("sagan_fast_triton::sn_normalize_backward", mutates_args=())
def _normalize_backward_op(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                           sigma: torch.Tensor, dim: int) -> torch.Tensor:
    return _normalize_backward_impl(grad, weight, u, v, sigma, dim)


@_normalize_backward_op.register_fake
def _(grad, weight, u, v, sigma, dim):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _normalize_setup_context(ctx, inputs, output):
    weight, u, v, dim = inputs
    _, sigma = output
    ctx.mark_non_differentiable(sigma)
    ctx.save_for_backward(weight, u, v, sigma)
    ctx.dim = dim


def _normalize_backward(ctx, grad, _grad_sigma):
    weight, u, v, sigma = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_weight = _normalize_backward_op(grad, weight, u, v, sigma, ctx.dim)
    return grad_weight, None, None, None


_normalize_op.register_autograd(_normalize_backward, setup_context=_normalize_setup_context)


def _check_normalize(weight: torch.Tensor) -> None:
    if weight.dtype not in _TL_DTYPES:
        raise TypeError(f"spectral_norm_normalize (triton): unsupported weight dtype {weight.dtype}")


def normalize(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight / (u . W v)``, sigma computed from this weight (one partial-sum launch, then the
    scale); backward ``dW = (G - <G, W_sn> u v^T) / sigma`` with u, v constant (two launches).

    The result is contiguous. Inputs are checked by
    :func:`sagan_fast.ops.spectral_norm.spectral_norm_normalize`.
    """
    _check_normalize(weight)
    _check_vectors([weight], [u], [v])
    out, _ = _normalize_op(weight, u, v, int(dim))
    return out


def normalize_backward(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                       sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """The closed-form backward alone (for tests and benchmarks)."""
    sigma = sigma.reshape(()).to(_acc_dtype(weight.dtype))
    return _normalize_backward_op(grad, weight, u, v, sigma, int(dim))


# --- model-level normalize: every weight of a group in two launches, backward in two -----------

@triton.jit
def _uwv_partials_multi_kernel(items_ptr, ptrs_ptr, meta_ptr, part_ptr, W_DTYPE: tl.constexpr,
                               U_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, ACC: tl.constexpr,
                               BLOCK: tl.constexpr):
    """part[part_off + k] = sum of W[a, b, c] u[b] v[a * C + c] over chunk k of one weight."""
    pid = tl.program_id(0)
    wid = tl.load(items_ptr + pid * _NITEM_COLS)
    k = tl.load(items_ptr + pid * _NITEM_COLS + 1)
    w_ptr = tl.load(ptrs_ptr + wid * _NPTR_COLS + _NP_W).to(tl.pointer_type(W_DTYPE))
    u_ptr = tl.load(ptrs_ptr + wid * _NPTR_COLS + _NP_U).to(tl.pointer_type(U_DTYPE))
    v_ptr = tl.load(ptrs_ptr + wid * _NPTR_COLS + _NP_V).to(tl.pointer_type(V_DTYPE))
    meta = meta_ptr + wid * _NMETA_COLS
    numel = tl.load(meta + _N_NUMEL)
    B = tl.load(meta + _N_B)
    C = tl.load(meta + _N_C)
    part_off = tl.load(meta + _N_PARTOFF)
    chunk = tl.load(meta + _N_CHUNK)
    start = k * chunk
    end = tl.minimum(start + chunk, numel)
    BC = B * C
    acc = tl.zeros([BLOCK], ACC)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < end
        a = offs // BC
        rem = offs - a * BC
        b = rem // C
        c = rem - b * C
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(ACC)
        u = tl.load(u_ptr + b, mask=m, other=0.0).to(ACC)
        v = tl.load(v_ptr + a * C + c, mask=m, other=0.0).to(ACC)
        acc += w * u * v
    tl.store(part_ptr + part_off + k, tl.sum(acc, axis=0))


@triton.jit
def _scale_multi_kernel(items_ptr, ptrs_ptr, meta_ptr, part_ptr, sigma_ptr, out_ptr,
                        W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """out[out_off + i] = W[i] / sigma for one block of one weight (the outputs share one buffer),
    sigma = the sum of the weight's partials; its first program stores sigma[wid]."""
    pid = tl.program_id(0)
    wid = tl.load(items_ptr + pid * _NITEM_COLS)
    start = tl.load(items_ptr + pid * _NITEM_COLS + 1)
    w_ptr = tl.load(ptrs_ptr + wid * _NPTR_COLS + _NP_W).to(tl.pointer_type(W_DTYPE))
    out_off = tl.load(ptrs_ptr + wid * _NPTR_COLS + _NP_OUTOFF)
    meta = meta_ptr + wid * _NMETA_COLS
    numel = tl.load(meta + _N_NUMEL)
    n_parts = tl.load(meta + _N_NPARTS)
    part_off = tl.load(meta + _N_PARTOFF)
    p = tl.arange(0, BLOCK_P)
    sigma = tl.sum(tl.load(part_ptr + part_off + p, mask=p < n_parts, other=0.0), axis=0)
    if start == 0:
        tl.store(sigma_ptr + wid, sigma)
    offs = start + tl.arange(0, BLOCK)
    m = offs < numel
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + out_off + offs, (w.to(ACC) / sigma).to(W_DTYPE), mask=m)


@triton.jit
def _dot_partials_multi_kernel(items_ptr, ptrs_ptr, grad_ptrs_ptr, meta_ptr, part_ptr,
                               W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """part[part_off + k] = sum of G * W over chunk k of one weight."""
    pid = tl.program_id(0)
    wid = tl.load(items_ptr + pid * _NITEM_COLS)
    k = tl.load(items_ptr + pid * _NITEM_COLS + 1)
    w_ptr = tl.load(ptrs_ptr + wid * _NPTR_COLS + _NP_W).to(tl.pointer_type(W_DTYPE))
    g_ptr = tl.load(grad_ptrs_ptr + wid * _GRAD_COLS + _G_GRAD).to(tl.pointer_type(W_DTYPE))
    meta = meta_ptr + wid * _NMETA_COLS
    numel = tl.load(meta + _N_NUMEL)
    part_off = tl.load(meta + _N_PARTOFF)
    chunk = tl.load(meta + _N_CHUNK)
    start = k * chunk
    end = tl.minimum(start + chunk, numel)
    acc = tl.zeros([BLOCK], ACC)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < end
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
        acc += g * tl.load(w_ptr + offs, mask=m, other=0.0).to(ACC)
    tl.store(part_ptr + part_off + k, tl.sum(acc, axis=0))


@triton.jit
def _normalize_backward_multi_kernel(items_ptr, ptrs_ptr, grad_ptrs_ptr, meta_ptr, part_ptr, sigma_ptr,
                                     W_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
                                     ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """dW = (G - <G, W_sn> u v^T) / sigma for one block of one weight (sigma: the forward's)."""
    pid = tl.program_id(0)
    wid = tl.load(items_ptr + pid * _NITEM_COLS)
    start = tl.load(items_ptr + pid * _NITEM_COLS + 1)
    u_ptr = tl.load(ptrs_ptr + wid * _NPTR_COLS + _NP_U).to(tl.pointer_type(U_DTYPE))
    v_ptr = tl.load(ptrs_ptr + wid * _NPTR_COLS + _NP_V).to(tl.pointer_type(V_DTYPE))
    sigma = tl.load(sigma_ptr + wid).to(ACC)
    g_ptr = tl.load(grad_ptrs_ptr + wid * _GRAD_COLS + _G_GRAD).to(tl.pointer_type(W_DTYPE))
    dw_ptr = tl.load(grad_ptrs_ptr + wid * _GRAD_COLS + _G_DW).to(tl.pointer_type(W_DTYPE))
    meta = meta_ptr + wid * _NMETA_COLS
    numel = tl.load(meta + _N_NUMEL)
    B = tl.load(meta + _N_B)
    C = tl.load(meta + _N_C)
    n_parts = tl.load(meta + _N_NPARTS)
    part_off = tl.load(meta + _N_PARTOFF)
    p = tl.arange(0, BLOCK_P)
    inner = tl.sum(tl.load(part_ptr + part_off + p, mask=p < n_parts, other=0.0), axis=0) / sigma
    offs = start + tl.arange(0, BLOCK)
    m = offs < numel
    BC = B * C
    a = offs // BC
    rem = offs - a * BC
    b = rem // C
    c = rem - b * C
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
    u = tl.load(u_ptr + b, mask=m, other=0.0).to(ACC)
    v = tl.load(v_ptr + a * C + c, mask=m, other=0.0).to(ACC)
    tl.store(dw_ptr + offs, ((g - inner * u * v) / sigma).to(W_DTYPE), mask=m)


_BLOCK_MULTI = 2048


class _MultiPlan:
    """Static tables for normalizing one list of weights: built once while pointers hold."""

    def __init__(self, weights, us, vs, dims, device):
        ptrs, meta, items, items_dot = [], [], [], []
        out_off = part_off = 0
        for i, (w, u, v, d) in enumerate(zip(weights, us, vs, dims)):
            numel = w.numel()
            if numel >= 2**31 - _BLOCK_MULTI:
                raise ValueError("spectral norm (triton): a weight is too large for 32-bit indexing")
            _, B, C = _abc(w.shape, d)
            n_parts, chunk = _partials_layout(numel)
            ptrs.append(_table_row(_NPTR_COLS, {_NP_W: w.data_ptr(), _NP_U: u.data_ptr(), _NP_V: v.data_ptr(),
                                                _NP_OUTOFF: out_off}))
            meta.append(_table_row(_NMETA_COLS, {_N_NUMEL: numel, _N_B: B, _N_C: C, _N_NPARTS: n_parts,
                                                 _N_PARTOFF: part_off, _N_CHUNK: chunk}))
            items += [[i, start] for start in range(0, numel, _BLOCK_MULTI)]
            items_dot += [[i, k] for k in range(n_parts)]
            out_off += numel
            part_off += n_parts
        self.ptrs = torch.tensor(ptrs, dtype=torch.int64).to(device, non_blocking=True)
        self.meta = torch.tensor(meta, dtype=torch.int32).to(device, non_blocking=True)
        self.items = torch.tensor(items, dtype=torch.int32).to(device, non_blocking=True)
        self.items_dot = torch.tensor(items_dot, dtype=torch.int32).to(device, non_blocking=True)
        self.n_items, self.n_dot = len(items), len(items_dot)
        self.total, self.n_parts_total = out_off, part_off
        self.sizes = [w.numel() for w in weights]


def _multi_plan_for(weights, us, vs, dims) -> _MultiPlan:
    key = ("multi",) + tuple((w.data_ptr(), u.data_ptr(), v.data_ptr(), tuple(w.shape), d)
                             for w, u, v, d in zip(weights, us, vs, dims))
    plan = _PLANS.get(key)
    if plan is None:
        _no_tables_while_capturing(weights[0].device)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _MultiPlan(weights, us, vs, dims, weights[0].device)
    return _keep_if_captured(plan, weights[0].device)


class _NormalizeMulti(torch.autograd.Function):
    """W / (u . W v) for every weight of one group (same weight, u and v dtypes): a partial-sum
    launch and a scale launch; backward in two."""

    @staticmethod
    def forward(ctx, us, vs, dims, *weights):
        plan = _multi_plan_for(weights, us, vs, dims)
        device, w_dtype = weights[0].device, weights[0].dtype
        acc = _acc_dtype(w_dtype)
        w_t, acc_t = _TL_DTYPES[w_dtype], _TL_DTYPES[acc]
        partials = torch.empty(plan.n_parts_total, device=device, dtype=acc)
        _uwv_partials_multi_kernel[(plan.n_dot,)](plan.items_dot, plan.ptrs, plan.meta, partials,
                                                  W_DTYPE=w_t, U_DTYPE=_TL_DTYPES[us[0].dtype],
                                                  V_DTYPE=_TL_DTYPES[vs[0].dtype], ACC=acc_t, BLOCK=_BLOCK_EW)
        sigmas = torch.empty(len(weights), device=device, dtype=acc)
        flat = torch.empty(plan.total, device=device, dtype=w_dtype)
        _scale_multi_kernel[(plan.n_items,)](plan.items, plan.ptrs, plan.meta, partials, sigmas, flat,
                                             W_DTYPE=w_t, ACC=acc_t, BLOCK=_BLOCK_MULTI,
                                             BLOCK_P=triton.next_power_of_2(_MAX_PARTIALS))
        ctx.plan, ctx.dtypes = plan, (w_dtype, us[0].dtype, vs[0].dtype)
        ctx.dims = dims
        ctx.weights = weights  # parameters: alive anyway; u, v saved to catch in-place changes
        ctx.save_for_backward(sigmas, *us, *vs)
        ctx.set_materialize_grads(False)
        return tuple(o.view(w.shape) for o, w in zip(flat.split(plan.sizes), weights))

    @staticmethod
    def backward(ctx, *grads):
        plan = ctx.plan
        sigmas, *uv = ctx.saved_tensors  # raises if u or v changed in place since forward
        weights = ctx.weights
        n = len(weights)
        w_dtype, u_dtype, v_dtype = ctx.dtypes
        device = weights[0].device
        grads = [g.contiguous() if g is not None else None for g in grads]
        if _capturing(device):
            # The gradients' addresses are new, so their table would need a host copy, which a
            # CUDA graph cannot hold: per-weight backward instead (launches are cheap in a graph).
            us, vs = uv[:n], uv[n:]
            return (None, None, None, *[
                _normalize_backward_impl(g, w, u, v, sigmas[i], d) if g is not None else None
                for i, (g, w, u, v, d) in enumerate(zip(grads, weights, us, vs, ctx.dims))])
        d_weights = [torch.empty_like(w) if g is not None else None for w, g in zip(weights, grads)]
        # An output that got no gradient gives its weight none; its programs still run (the tables
        # are static), so they read and write a zero scratch tensor.
        table, scratch = [], []
        for w, g, dw in zip(weights, grads, d_weights):
            if g is None:
                g = dw = torch.zeros_like(w)
                scratch.append(g)
            table.append(_table_row(_GRAD_COLS, {_G_GRAD: g.data_ptr(), _G_DW: dw.data_ptr()}))
        grad_ptrs = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        acc = _acc_dtype(w_dtype)
        partials = torch.empty(plan.n_parts_total, device=device, dtype=acc)
        _dot_partials_multi_kernel[(plan.n_dot,)](plan.items_dot, plan.ptrs, grad_ptrs, plan.meta, partials,
                                                  W_DTYPE=_TL_DTYPES[w_dtype], ACC=_TL_DTYPES[acc],
                                                  BLOCK=_BLOCK_EW)
        _normalize_backward_multi_kernel[(plan.n_items,)](
            plan.items, plan.ptrs, grad_ptrs, plan.meta, partials, sigmas,
            W_DTYPE=_TL_DTYPES[w_dtype], U_DTYPE=_TL_DTYPES[u_dtype], V_DTYPE=_TL_DTYPES[v_dtype],
            ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_MULTI, BLOCK_P=triton.next_power_of_2(_MAX_PARTIALS))
        return (None, None, None, *d_weights)


def normalize_multi(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                    dims: Sequence[int]) -> list[torch.Tensor]:
    """``[W / (u . W v) for each weight]``, sigma from each very weight: two launches per dtype
    group forward, two backward.

    Eager autograd only (torch.compile uses the per-layer :func:`normalize`). Weights must be
    contiguous; the launch tables are cached on the weights', u's and v's addresses. The outputs
    are views of one buffer.
    """
    weights, us, vs, dims = list(weights), list(us), list(vs), [int(d) for d in dims]
    for w in weights:
        _check_normalize(w)
        if not w.is_contiguous():
            raise ValueError("normalize_multi (triton): weights must be contiguous; use normalize()")
    _check_vectors(weights, us, vs)
    out: list[torch.Tensor | None] = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):
        groups.setdefault((w.dtype, u.dtype, v.dtype), []).append(i)
    for idx in groups.values():
        res = _NormalizeMulti.apply([us[i] for i in idx], [vs[i] for i in idx], [dims[i] for i in idx],
                                    *[weights[i] for i in idx])
        for i, r in zip(idx, res):
            out[i] = r
    return out
