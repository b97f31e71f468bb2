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
Reductions run in float32 (float64 for float64 weights) whatever the weight's dtype. The
finalize kernel writes each sigma straight to its place in the caller's order, so a call with
several dtype groups needs no scatter (and no index tensor from host memory).

Normalize: forward ``W / sigma`` with sigma = u . W v recomputed from the very weight being
normalized (never a stored sigma, which after a write the optimizer did not make belongs to another
weight): a partial-sum launch over W, then the scale launch, which sums the partials itself (no
sync), stores sigma for the backward and writes W_sn in the requested output dtype (the autocast
dtype: a bf16 W_sn written straight from fp32 W, so autocast has nothing left to cast). Backward,
with u, v constant, ``dW = (G - <G, W_sn> u v^T) / sigma`` with <G, W_sn> = <G, W> / sigma: a
partial-sum launch over G and W (the fp32 master weight, not the rounded W_sn, so the projection
term keeps fp32 accuracy) and one fused elementwise launch writing dW in the weight's dtype. The
model-level ``normalize_multi`` does the same for many weights in two launches forward and two
backward.

Memory access (what ptxas sees; ``bench/kernel_resources.py``): the multi-tensor kernels take
their pointers from int64 tables and their sizes from int32 tables, which carry no alignment, so
the host records per weight whether its storage (and u, v, and its slice of the shared output) is
16-byte aligned with a row length C and size that are multiples of 8 elements; each program
branches once on that flag, and the aligned branch states it with ``tl.multiple_of`` (16-byte
vector loads), the other reads element by element. Workspaces are padded to multiples of 8
elements so their loads are always aligned. dim-0 weights (A = 1, every SAGAN weight) with
C >= 32 are read in (32 x 64) tiles of the (B, C) matrix, row index = u index, column = v index:
no integer division at all; other dims use flat blocks that divide each index by B*C and C.

Launch tables are built once per list of (weight, u, v) and kept on the device, cached on what
they hold (addresses, shapes, dtypes, dims): a weight moved to new storage (``module.to()``,
``load_state_dict(assign=True)``, ``.data = ...``) has another address, hence another plan; an
in-place write (``copy_``, an optimizer step) keeps the address and the plan, which stays right.
The backward's gradient addresses are new tensors each time: their table (one int64 per weight)
is cached on those addresses too (a training loop usually sees the same few), and built on a miss
from pinned memory (``non_blocking``). During CUDA-graph capture nothing is copied from the host:
a plan must exist from an eager run, and a gradient table not cached then falls back to the
per-weight backward kernels, which take the gradients as arguments.

Ops are registered as ``sagan_fast_triton::sn_power_iteration_`` and ``sagan_fast_triton::sn_normalize``
(+ fake and autograd) so torch.compile traces them as opaque nodes.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import reference
from .._backend import accumulation_dtype as _acc_dtype

__all__ = ["power_iteration_", "normalize", "normalize_backward", "normalize_multi"]

# Work per program in the power iteration (elements of W). Big enough to amortize the per-program
# vector norms, small enough that SAGAN-128's largest weights spread over many SMs.
_ELEMS_PER_PROGRAM = 1 << 17
_BLOCK_R = 16    # rows of W per tile
_BLOCK_K = 128   # columns of W per tile (the contiguous direction for dim 0)
_BLOCK_N = 1024  # vector chunk for the norms of t, s (16384 rows in SAGAN-128 G's first linear)
_BLOCK_EW = 1024  # elements per step of the flat reductions
_MAX_PARTIALS = 512  # programs of a weight's reduction; every later program sums them all
_TILE_R, _TILE_C = 32, 64   # the (rows, columns) tile of dim-0 weights in normalize
_BLOCK_MULTI = 2048  # elements per program of the flat elementwise kernels (= one tile)
# 16-byte vector loads need 16-byte aligned bases and sizes / offsets in whole vectors: 8
# elements covers every dtype (4 fp32, 8 fp16 / bf16, 2 fp64 per vector).
_ALIGN_BYTES, _ALIGN_ELEMS = 16, 8

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}

# Table layouts, shared by the host code that fills the tables and the kernels that read them
# (tl.constexpr globals: Triton folds them into the kernels).
# Power iteration, per weight: int32 `meta` columns and int64 `ptrs` columns.
(_M_B, _M_C, _M_K, _M_NCS, _M_NRS, _M_TOFF, _M_SOFF, _M_KCHUNK, _M_RCHUNK, _M_BPAD, _M_KPAD, _M_PATH,
 _M_SIGOUT) = (tl.constexpr(i) for i in range(13))
_META_COLS = tl.constexpr(13)
_P_W, _P_U, _P_V = (tl.constexpr(i) for i in range(3))
# _M_PATH: how a weight's matrix-vector products index it: A > 1 (any dim: each column split into
# (a, c) by a division), A == 1 (dim 0: the column is the offset in the row), A == 1 and aligned.
_PATH_GENERAL, _PATH_DIM0, _PATH_DIM0_ALIGNED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_PTR_COLS = tl.constexpr(3)
# Work items (program -> (weight, start row or column, split)) of both matrix-vector launches.
_ITEM_COLS = tl.constexpr(3)
# Model-level normalize, per weight: int32 `meta` columns, int64 `ptrs` columns. Work items:
# reductions (weight, partial index, first row tile, first column tile), elementwise blocks
# (weight, start), backward (weight, row tile, column tile) or (weight, start, 0).
(_N_NUMEL, _N_B, _N_C, _N_NPARTS, _N_PARTOFF, _N_CHUNK, _N_TILED, _N_HINTS, _N_RBP, _N_CTP, _N_NRB,
 _N_NCT) = (tl.constexpr(i) for i in range(12))
_NMETA_COLS = tl.constexpr(12)
_NP_W, _NP_U, _NP_V, _NP_OUTOFF = (tl.constexpr(i) for i in range(4))
_NPTR_COLS = tl.constexpr(4)
_RED_COLS, _BLK_COLS, _BWD_COLS = tl.constexpr(4), tl.constexpr(2), tl.constexpr(3)
# _N_HINTS bits: the flat view is aligned (W, its output slice, sizes); the tiled view too (+ u, v, C).
_FLAT_OK, _TILE_OK = tl.constexpr(1), tl.constexpr(2)


# ------------------------------------------------------------------------------------------------
# Alignment hints
# ------------------------------------------------------------------------------------------------
# tl.multiple_of marks the operation that defines a value, so a hint on a value defined before a
# runtime branch would hold in every branch. The aligned branches therefore build their own
# values (a fresh cast of the table's address, a fresh load of a size) and hint those.

@triton.jit
def _aligned_ptr(addr, DTYPE: tl.constexpr):
    """``addr`` (an int64 from a table) as a pointer the compiler may read 16 bytes at a time."""
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _aligned_slice(base_ptr, offset_ptr):
    """``base_ptr`` plus the int64 offset stored at ``offset_ptr``, known 16-byte aligned."""
    return tl.multiple_of(base_ptr + tl.load(offset_ptr), 16)


@triton.jit
def _load_multiple_of_8(ptr):
    """A size from a table, known to be a whole number of 8-element vectors."""
    return tl.multiple_of(tl.load(ptr), 8)


# ------------------------------------------------------------------------------------------------
# Kernels: power iteration
# ------------------------------------------------------------------------------------------------

@triton.jit
def _sum_splits(part_ptr, base, n_splits, stride, idx, mask, ACC: tl.constexpr):
    """sum over s < n_splits of part[base + s * stride + idx]: a vector from its partial sums."""
    total = tl.zeros(idx.shape, ACC)
    for sp in range(0, n_splits):
        total += tl.load(part_ptr + base + sp * stride + idx, mask=mask, other=0.0)
    return total


@triton.jit
def _inv_norm(part_ptr, base, n_splits, n_pad, eps, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """1 / max(|x|, eps) for the vector x stored as n_splits partial sums of padded length n_pad
    (the padding holds zeros)."""
    ss = tl.zeros([BLOCK], ACC)
    for start in range(0, n_pad, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = _sum_splits(part_ptr, base, n_splits, n_pad, idx, idx < n_pad, ACC)
        ss += x * x
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(ss, axis=0)), eps)


@triton.jit
def _matvec_rows(w_ptr, v_ptr, s_part_ptr, s_off, n_rsplit, k_pad, eps, rows, row_mask, B, C, K,
                 k_start, k_chunk, ACC: tl.constexpr, V_FROM_S: tl.constexpr, DIM0: tl.constexpr,
                 HINTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over one column chunk of W[rows, k] v[k]. DIM0: A == 1, so the column is the offset in
    the row (K == C); else the (a, c) split of each column. HINTS: w_ptr, v_ptr and C come hinted."""
    if HINTS:
        k_end = tl.multiple_of(tl.minimum(k_start + k_chunk, C), 8)
    else:
        k_end = tl.minimum(k_start + k_chunk, K)
    if V_FROM_S:
        v_scale = _inv_norm(s_part_ptr, s_off, n_rsplit, k_pad, eps, ACC, BLOCK_N)
    row_offs = rows.to(tl.int64) * C
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    for k in range(k_start, k_end, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_mask = cols < k_end
        if DIM0:
            col_offs = cols
        else:
            a = cols.to(tl.int64) // C
            col_offs = a * B * C + (cols - a * C)
        if V_FROM_S:
            vec = _sum_splits(s_part_ptr, s_off, n_rsplit, k_pad, cols, col_mask, ACC) * v_scale
        else:
            vec = tl.load(v_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + row_offs[:, None] + col_offs[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(ACC) * vec[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _matvec_kernel(items_ptr, ptrs_ptr, meta_ptr, t_part_ptr, s_part_ptr, eps_ptr,
                   W_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, ACC: tl.constexpr,
                   V_FROM_S: tl.constexpr, GENERAL: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial t = W v over rows [r0, r0 + BLOCK_R) and one column chunk; v from its buffer or,
    after the first iteration, v = s / max(|s|, eps) from the workspace. GENERAL: some weight of
    the group has A > 1 (without it the division path is not compiled)."""
    pid = tl.program_id(0)
    eps = tl.load(eps_ptr)
    wid = tl.load(items_ptr + pid * _ITEM_COLS)
    r0 = tl.multiple_of(tl.load(items_ptr + pid * _ITEM_COLS + 1), BLOCK_R)
    split = tl.load(items_ptr + pid * _ITEM_COLS + 2)
    meta = meta_ptr + wid * _META_COLS
    B = tl.load(meta + _M_B)
    K = tl.load(meta + _M_K)
    n_rsplit = tl.load(meta + _M_NRS)
    # Workspace offsets, strides and chunks are whole vectors for every weight (the host pads them).
    t_off = tl.multiple_of(tl.load(meta + _M_TOFF), 8)
    s_off = tl.multiple_of(tl.load(meta + _M_SOFF), 8)
    b_pad = tl.multiple_of(tl.load(meta + _M_BPAD), 8)
    k_pad = tl.multiple_of(tl.load(meta + _M_KPAD), 8)
    k_chunk = tl.multiple_of(tl.load(meta + _M_KCHUNK), BLOCK_K)
    w_addr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_W)
    v_addr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_V)

    rows = r0 + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    k_start = split * k_chunk
    path = tl.load(meta + _M_PATH)
    if path == _PATH_DIM0_ALIGNED:
        t = _matvec_rows(_aligned_ptr(w_addr, W_DTYPE), _aligned_ptr(v_addr, V_DTYPE), s_part_ptr, s_off,
                         n_rsplit, k_pad, eps, rows, row_mask, B, _load_multiple_of_8(meta + _M_C), K,
                         k_start, k_chunk, ACC, V_FROM_S, True, True, BLOCK_R, BLOCK_K, BLOCK_N)
    else:
        w_ptr, v_ptr = w_addr.to(tl.pointer_type(W_DTYPE)), v_addr.to(tl.pointer_type(V_DTYPE))
        C = tl.load(meta + _M_C)
        if GENERAL:
            if path == _PATH_DIM0:
                t = _matvec_rows(w_ptr, v_ptr, s_part_ptr, s_off, n_rsplit, k_pad, eps, rows, row_mask, B, C,
                                 K, k_start, k_chunk, ACC, V_FROM_S, True, False, BLOCK_R, BLOCK_K, BLOCK_N)
            else:
                t = _matvec_rows(w_ptr, v_ptr, s_part_ptr, s_off, n_rsplit, k_pad, eps, rows, row_mask, B, C,
                                 K, k_start, k_chunk, ACC, V_FROM_S, False, False, BLOCK_R, BLOCK_K, BLOCK_N)
        else:
            t = _matvec_rows(w_ptr, v_ptr, s_part_ptr, s_off, n_rsplit, k_pad, eps, rows, row_mask, B, C, K,
                             k_start, k_chunk, ACC, V_FROM_S, True, False, BLOCK_R, BLOCK_K, BLOCK_N)
    # Rows in [B, b_pad) get the zeros of their masked loads: the padding reads as zeros later.
    tl.store(t_part_ptr + t_off + split * b_pad + rows, t, mask=rows < b_pad)


@triton.jit
def _rmatvec_cols(w_ptr, t_part_ptr, t_off, n_csplit, b_pad, u_scale, cols, B, C, K, r_start, r_end,
                  r_end_pad, ACC: tl.constexpr, DIM0: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """sum over rows [r_start, r_end) of W[r, cols] u[r], u = t * u_scale from the workspace.
    DIM0 as in _matvec_rows (K == C; C hinted by the aligned caller)."""
    if DIM0:
        col_mask = cols < C
        col_offs = cols
    else:
        col_mask = cols < K
        a = cols.to(tl.int64) // C
        col_offs = a * B * C + (cols - a * C)
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    for r in range(r_start, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        row_mask = rows < r_end
        u = _sum_splits(t_part_ptr, t_off, n_csplit, b_pad, rows, rows < r_end_pad, ACC) * u_scale
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * C + col_offs[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(ACC) * u[:, None]
    return tl.sum(acc, axis=0)


@triton.jit
def _rmatvec_kernel(items_ptr, ptrs_ptr, meta_ptr, t_part_ptr, s_part_ptr, eps_ptr,
                    W_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, ACC: tl.constexpr,
                    GENERAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """u = t / max(|t|, eps) (written by the weight's first program); partial s = W^T u over
    columns [c0, c0 + BLOCK_K) and one row chunk (GENERAL as in _matvec_kernel)."""
    pid = tl.program_id(0)
    eps = tl.load(eps_ptr)
    wid = tl.load(items_ptr + pid * _ITEM_COLS)
    c0 = tl.multiple_of(tl.load(items_ptr + pid * _ITEM_COLS + 1), BLOCK_K)
    split = tl.load(items_ptr + pid * _ITEM_COLS + 2)
    meta = meta_ptr + wid * _META_COLS
    B = tl.load(meta + _M_B)
    K = tl.load(meta + _M_K)
    n_csplit = tl.load(meta + _M_NCS)
    t_off = tl.multiple_of(tl.load(meta + _M_TOFF), 8)
    s_off = tl.multiple_of(tl.load(meta + _M_SOFF), 8)
    b_pad = tl.multiple_of(tl.load(meta + _M_BPAD), 8)
    k_pad = tl.multiple_of(tl.load(meta + _M_KPAD), 8)
    r_chunk = tl.multiple_of(tl.load(meta + _M_RCHUNK), BLOCK_R)
    w_addr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_W)
    u_ptr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_U).to(tl.pointer_type(U_DTYPE))

    u_scale = _inv_norm(t_part_ptr, t_off, n_csplit, b_pad, eps, ACC, BLOCK_N)
    if (c0 == 0) & (split == 0):
        for r in range(0, b_pad, BLOCK_N):
            idx = r + tl.arange(0, BLOCK_N)
            t = _sum_splits(t_part_ptr, t_off, n_csplit, b_pad, idx, idx < b_pad, ACC)
            tl.store(u_ptr + idx, (t * u_scale).to(U_DTYPE), mask=idx < B)
    cols = c0 + tl.arange(0, BLOCK_K)
    r_start = split * r_chunk
    r_end = tl.minimum(r_start + r_chunk, B)
    r_end_pad = tl.minimum(r_start + r_chunk, b_pad)
    path = tl.load(meta + _M_PATH)
    if path == _PATH_DIM0_ALIGNED:
        s = _rmatvec_cols(_aligned_ptr(w_addr, W_DTYPE), t_part_ptr, t_off, n_csplit, b_pad, u_scale, cols, B,
                          _load_multiple_of_8(meta + _M_C), K, r_start, r_end, r_end_pad, ACC, True,
                          BLOCK_R, BLOCK_K)
    else:
        w_ptr = w_addr.to(tl.pointer_type(W_DTYPE))
        C = tl.load(meta + _M_C)
        if GENERAL:
            if path == _PATH_DIM0:
                s = _rmatvec_cols(w_ptr, t_part_ptr, t_off, n_csplit, b_pad, u_scale, cols, B, C, K, r_start,
                                  r_end, r_end_pad, ACC, True, BLOCK_R, BLOCK_K)
            else:
                s = _rmatvec_cols(w_ptr, t_part_ptr, t_off, n_csplit, b_pad, u_scale, cols, B, C, K, r_start,
                                  r_end, r_end_pad, ACC, False, BLOCK_R, BLOCK_K)
        else:
            s = _rmatvec_cols(w_ptr, t_part_ptr, t_off, n_csplit, b_pad, u_scale, cols, B, C, K, r_start,
                              r_end, r_end_pad, ACC, True, BLOCK_R, BLOCK_K)
    # Columns in [K, k_pad) hold zeros (masked loads): the padding of s reads as zeros later.
    tl.store(s_part_ptr + s_off + split * k_pad + cols, s, mask=cols < k_pad)


@triton.jit
def _finalize_kernel(ptrs_ptr, meta_ptr, s_part_ptr, sigma_ptr, eps_ptr,
                     V_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program per weight: v = s / max(|s|, eps); sigma = |s|^2 / max(|s|, eps) (= u . W v),
    stored at the weight's place in the caller's order, in sigma's dtype."""
    wid = tl.program_id(0)
    eps = tl.load(eps_ptr)
    meta = meta_ptr + wid * _META_COLS
    K = tl.load(meta + _M_K)
    n_rsplit = tl.load(meta + _M_NRS)
    s_off = tl.multiple_of(tl.load(meta + _M_SOFF), 8)
    k_pad = tl.multiple_of(tl.load(meta + _M_KPAD), 8)
    v_ptr = tl.load(ptrs_ptr + wid * _PTR_COLS + _P_V).to(tl.pointer_type(V_DTYPE))
    ss = tl.zeros([BLOCK], ACC)
    for start in range(0, k_pad, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        s = _sum_splits(s_part_ptr, s_off, n_rsplit, k_pad, idx, idx < k_pad, ACC)
        ss += s * s
    sq = tl.sum(ss, axis=0)
    denom = tl.maximum(tl.sqrt(sq), eps)
    for start in range(0, k_pad, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        s = _sum_splits(s_part_ptr, s_off, n_rsplit, k_pad, idx, idx < k_pad, ACC)
        tl.store(v_ptr + idx, (s / denom).to(V_DTYPE), mask=idx < K)
    tl.store(sigma_ptr + tl.load(meta + _M_SIGOUT), (sq / denom).to(sigma_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------
# Kernels: normalize (pieces shared by the per-weight and the multi-tensor kernels; the aligned
# callers hand them hinted pointers and sizes)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _uwv_tiles(w_ptr, u_ptr, v_ptr, B, C, rb0, rb1, cb0, cb1, ACC: tl.constexpr, TR: tl.constexpr,
               TC: tl.constexpr):
    """sum of W[b, c] u[b] v[c] over row tiles [rb0, rb1) x column tiles [cb0, cb1) of a dim-0
    weight (B, C): the row is the index of u, the column the index of v, no division."""
    total = tl.zeros([TR], ACC)
    for rb in range(rb0, rb1):
        rows = rb * TR + tl.arange(0, TR)
        row_mask = rows < B
        row_offs = rows.to(tl.int64) * C
        racc = tl.zeros([TR, TC], ACC)
        for cb in range(cb0, cb1):
            cols = cb * TC + tl.arange(0, TC)
            col_mask = cols < C
            v = tl.load(v_ptr + cols, mask=col_mask, other=0.0).to(ACC)
            w = tl.load(w_ptr + row_offs[:, None] + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            racc += w.to(ACC) * v[None, :]
        total += tl.sum(racc, axis=1) * tl.load(u_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    return tl.sum(total, axis=0)


@triton.jit
def _uwv_flat(w_ptr, u_ptr, v_ptr, start, end, B, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """sum of W[a, b, c] u[b] v[a * C + c] over flat elements [start, end): any dim (divisions)."""
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
    return tl.sum(acc, axis=0)


@triton.jit
def _scale_block(w_ptr, o_ptr, start, numel, sigma, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """o[i] = W[i] / sigma for one block (o in its own dtype)."""
    offs = start + tl.arange(0, BLOCK)
    m = offs < numel
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(o_ptr + offs, (w.to(ACC) / sigma).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dot_flat(g_ptr, w_ptr, start, chunk, numel, ACC: tl.constexpr, HINTS: tl.constexpr,
              BLOCK: tl.constexpr):
    """sum of G[i] * W[i] over flat elements [start, start + chunk) (numel hinted: HINTS)."""
    if HINTS:
        end = tl.multiple_of(tl.minimum(start + chunk, numel), 8)
    else:
        end = tl.minimum(start + chunk, numel)
    acc = tl.zeros([BLOCK], ACC)
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < end
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
        acc += g * tl.load(w_ptr + offs, mask=m, other=0.0).to(ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def _backward_tile(g_ptr, u_ptr, v_ptr, dw_ptr, rb, cb, B, C, inner, sigma, ACC: tl.constexpr,
                   TR: tl.constexpr, TC: tl.constexpr):
    """dW = (G - inner u v^T) / sigma on one (TR, TC) tile of a dim-0 weight: no index division."""
    rows = rb * TR + tl.arange(0, TR)
    cols = cb * TC + tl.arange(0, TC)
    row_mask = rows < B
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    v = tl.load(v_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    dw = (g - inner * u[:, None] * v[None, :]) / sigma
    tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_flat(g_ptr, u_ptr, v_ptr, dw_ptr, start, numel, B, C, inner, sigma, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    """dW = (G - inner u v^T) / sigma at flat elements [start, start + BLOCK): any dim (divisions)."""
    offs = start + tl.arange(0, BLOCK)
    m = offs < numel
    BC = B * C  # no methods on B, C: Triton passes an int argument equal to 1 as a constexpr
    a = offs // BC
    rem = offs - a * BC
    b = rem // C
    c = rem - b * C
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
    u = tl.load(u_ptr + b, mask=m, other=0.0).to(ACC)
    v = tl.load(v_ptr + a * C + c, mask=m, other=0.0).to(ACC)
    tl.store(dw_ptr + offs, ((g - inner * u * v) / sigma).to(dw_ptr.dtype.element_ty), mask=m)


# --- per-weight kernels (tensor arguments: the JIT's launch specialization states their alignment) -

@triton.jit
def _uwv_partials_kernel(w_ptr, u_ptr, v_ptr, part_ptr, numel, chunk, B, C, rbp, ctp, n_rb, n_ct,
                         ACC: tl.constexpr, BLOCK: tl.constexpr, TILED: tl.constexpr, TR: tl.constexpr,
                         TC: tl.constexpr):
    """Partial sums of sigma = u . W v from the very weight being normalized: TILED (dim 0), a
    (rbp x ctp)-tile rectangle per program of a 2-D grid; else a flat chunk per program."""
    if TILED:
        pr = tl.program_id(0)
        pc = tl.program_id(1)
        rb0 = pr * rbp
        cb0 = pc * ctp
        total = _uwv_tiles(w_ptr, u_ptr, v_ptr, B, C, rb0, tl.minimum(rb0 + rbp, n_rb), cb0,
                           tl.minimum(cb0 + ctp, n_ct), ACC, TR, TC)
        tl.store(part_ptr + pr * tl.num_programs(1) + pc, total)
    else:
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * chunk
        total = _uwv_flat(w_ptr, u_ptr, v_ptr, start, tl.minimum(start + chunk, numel), B, C, ACC, BLOCK)
        tl.store(part_ptr + pid, total)


@triton.jit
def _scale_kernel(w_ptr, part_ptr, n_parts, out_ptr, sigma_ptr, numel, ACC: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """sigma = sum of the partial sums (every program, same order: one value); out = W / sigma in
    out's dtype; program 0 also stores sigma (saved for the backward). No sync."""
    p = tl.arange(0, BLOCK_P)
    sigma = tl.sum(tl.load(part_ptr + p, mask=p < n_parts, other=0.0), axis=0)
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(sigma_ptr, sigma)
    _scale_block(w_ptr, out_ptr, pid.to(tl.int64) * BLOCK, numel, sigma, ACC, BLOCK)


@triton.jit
def _dot_partials_kernel(g_ptr, w_ptr, part_ptr, numel, chunk, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """part[pid] = sum of G * W over this program's chunk (float32 / float64)."""
    pid = tl.program_id(0)
    total = _dot_flat(g_ptr, w_ptr, pid.to(tl.int64) * chunk, chunk, numel, ACC, False, BLOCK)
    tl.store(part_ptr + pid, total)


@triton.jit
def _normalize_backward_kernel(g_ptr, u_ptr, v_ptr, sigma_ptr, part_ptr, dw_ptr, numel, n_parts, B, C,
                               ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                               TILED: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """dW = (G - <G, W_sn> u v^T) / sigma; <G, W_sn> = <G, W> / sigma, <G, W> the sum of the
    partials. TILED (dim 0): one tile per program of the (row tiles, column tiles) grid; else a
    flat block per program."""
    p = tl.arange(0, BLOCK_P)
    sigma = tl.load(sigma_ptr).to(ACC)
    inner = tl.sum(tl.load(part_ptr + p, mask=p < n_parts, other=0.0), axis=0) / sigma
    if TILED:
        _backward_tile(g_ptr, u_ptr, v_ptr, dw_ptr, tl.program_id(0), tl.program_id(1), B, C, inner, sigma,
                       ACC, TR, TC)
    else:
        _backward_flat(g_ptr, u_ptr, v_ptr, dw_ptr, tl.program_id(0).to(tl.int64) * BLOCK, numel, B, C,
                       inner, sigma, ACC, BLOCK)


# --- multi-tensor kernels (tables: alignment from the plan's flags, stated in the aligned branch) -

@triton.jit
def _uwv_tiled_item(items_ptr, pid, meta, w_addr, u_addr, v_addr, B, W_DTYPE: tl.constexpr,
                    U_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, ACC: tl.constexpr, TR: tl.constexpr,
                    TC: tl.constexpr):
    """One partial of a tiled weight: the rectangle of tiles its work item names."""
    rb0 = tl.load(items_ptr + pid * _RED_COLS + 2)
    cb0 = tl.load(items_ptr + pid * _RED_COLS + 3)
    rb1 = tl.minimum(rb0 + tl.load(meta + _N_RBP), tl.load(meta + _N_NRB))
    cb1 = tl.minimum(cb0 + tl.load(meta + _N_CTP), tl.load(meta + _N_NCT))
    if (tl.load(meta + _N_HINTS) & _TILE_OK) != 0:
        total = _uwv_tiles(_aligned_ptr(w_addr, W_DTYPE), _aligned_ptr(u_addr, U_DTYPE),
                           _aligned_ptr(v_addr, V_DTYPE), B, _load_multiple_of_8(meta + _N_C), rb0, rb1, cb0,
                           cb1, ACC, TR, TC)
    else:
        total = _uwv_tiles(w_addr.to(tl.pointer_type(W_DTYPE)), u_addr.to(tl.pointer_type(U_DTYPE)),
                           v_addr.to(tl.pointer_type(V_DTYPE)), B, tl.load(meta + _N_C), rb0, rb1, cb0, cb1,
                           ACC, TR, TC)
    return total


@triton.jit
def _uwv_partials_multi_kernel(items_ptr, ptrs_ptr, meta_ptr, part_ptr, W_DTYPE: tl.constexpr,
                               U_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, ACC: tl.constexpr,
                               FLAT: tl.constexpr, BLOCK: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """part[part_off + k] = sum of W[a, b, c] u[b] v[a * C + c] over partial k of one weight (a
    rectangle of tiles for tiled weights, a flat chunk otherwise; FLAT: the group has flat weights,
    without it their division path is not compiled)."""
    pid = tl.program_id(0)
    wid = tl.load(items_ptr + pid * _RED_COLS)
    k = tl.load(items_ptr + pid * _RED_COLS + 1)
    ptrs = ptrs_ptr + wid * _NPTR_COLS
    w_addr = tl.load(ptrs + _NP_W)
    u_addr = tl.load(ptrs + _NP_U)
    v_addr = tl.load(ptrs + _NP_V)
    meta = meta_ptr + wid * _NMETA_COLS
    B = tl.load(meta + _N_B)
    if FLAT:
        if tl.load(meta + _N_TILED) != 0:
            total = _uwv_tiled_item(items_ptr, pid, meta, w_addr, u_addr, v_addr, B, W_DTYPE, U_DTYPE,
                                    V_DTYPE, ACC, TR, TC)
        else:
            chunk = tl.load(meta + _N_CHUNK)
            start = k * chunk
            total = _uwv_flat(w_addr.to(tl.pointer_type(W_DTYPE)), u_addr.to(tl.pointer_type(U_DTYPE)),
                              v_addr.to(tl.pointer_type(V_DTYPE)), start,
                              tl.minimum(start + chunk, tl.load(meta + _N_NUMEL)), B, tl.load(meta + _N_C),
                              ACC, BLOCK)
    else:
        total = _uwv_tiled_item(items_ptr, pid, meta, w_addr, u_addr, v_addr, B, W_DTYPE, U_DTYPE, V_DTYPE,
                                ACC, TR, TC)
    tl.store(part_ptr + tl.load(meta + _N_PARTOFF) + k, total)


@triton.jit
def _scale_multi_kernel(items_ptr, ptrs_ptr, meta_ptr, part_ptr, sigma_ptr, out_ptr,
                        W_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """out[out_off + i] = W[i] / sigma for one block of one weight (the outputs share one buffer,
    in out's dtype), sigma = the sum of the weight's partials; its first program stores sigma[wid]."""
    pid = tl.program_id(0)
    wid = tl.load(items_ptr + pid * _BLK_COLS)
    start = tl.multiple_of(tl.load(items_ptr + pid * _BLK_COLS + 1), BLOCK)
    ptrs = ptrs_ptr + wid * _NPTR_COLS
    meta = meta_ptr + wid * _NMETA_COLS
    p = tl.arange(0, BLOCK_P)
    sigma = tl.sum(tl.load(part_ptr + tl.load(meta + _N_PARTOFF) + p, mask=p < tl.load(meta + _N_NPARTS),
                           other=0.0), axis=0)
    if start == 0:
        tl.store(sigma_ptr + wid, sigma)
    if (tl.load(meta + _N_HINTS) & _FLAT_OK) != 0:
        _scale_block(_aligned_ptr(tl.load(ptrs + _NP_W), W_DTYPE), _aligned_slice(out_ptr, ptrs + _NP_OUTOFF),
                     start, _load_multiple_of_8(meta + _N_NUMEL), sigma, ACC, BLOCK)
    else:
        _scale_block(tl.load(ptrs + _NP_W).to(tl.pointer_type(W_DTYPE)), out_ptr + tl.load(ptrs + _NP_OUTOFF),
                     start, tl.load(meta + _N_NUMEL), sigma, ACC, BLOCK)


@triton.jit
def _dot_partials_multi_kernel(items_ptr, ptrs_ptr, grad_ptrs_ptr, meta_ptr, part_ptr, W_DTYPE: tl.constexpr,
                               O_DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """part[part_off + k] = sum of G * W over flat chunk k of one weight; nothing for a weight
    whose output got no gradient (address 0 in the gradient table)."""
    pid = tl.program_id(0)
    wid = tl.load(items_ptr + pid * _RED_COLS)
    k = tl.load(items_ptr + pid * _RED_COLS + 1)
    g_addr = tl.load(grad_ptrs_ptr + wid)
    if g_addr != 0:
        ptrs = ptrs_ptr + wid * _NPTR_COLS
        meta = meta_ptr + wid * _NMETA_COLS
        chunk = tl.multiple_of(tl.load(meta + _N_CHUNK), BLOCK)
        start = k * chunk
        if ((tl.load(meta + _N_HINTS) & _FLAT_OK) != 0) & ((g_addr & 15) == 0):
            total = _dot_flat(_aligned_ptr(g_addr, O_DTYPE), _aligned_ptr(tl.load(ptrs + _NP_W), W_DTYPE),
                              start, chunk, _load_multiple_of_8(meta + _N_NUMEL), ACC, True, BLOCK)
        else:
            total = _dot_flat(g_addr.to(tl.pointer_type(O_DTYPE)),
                              tl.load(ptrs + _NP_W).to(tl.pointer_type(W_DTYPE)), start, chunk,
                              tl.load(meta + _N_NUMEL), ACC, False, BLOCK)
        tl.store(part_ptr + tl.load(meta + _N_PARTOFF) + k, total)


@triton.jit
def _backward_tiled_item(items_ptr, pid, ptrs, meta, g_addr, u_addr, v_addr, dw_ptr, rb, B, inner, sigma,
                         O_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
                         ACC: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """The backward of one tile of a tiled weight (hinted when it and its gradient are aligned)."""
    cb = tl.load(items_ptr + pid * _BWD_COLS + 2)
    if ((tl.load(meta + _N_HINTS) & _TILE_OK) != 0) & ((g_addr & 15) == 0):
        _backward_tile(_aligned_ptr(g_addr, O_DTYPE), _aligned_ptr(u_addr, U_DTYPE),
                       _aligned_ptr(v_addr, V_DTYPE), _aligned_slice(dw_ptr, ptrs + _NP_OUTOFF), rb, cb, B,
                       _load_multiple_of_8(meta + _N_C), inner, sigma, ACC, TR, TC)
    else:
        _backward_tile(g_addr.to(tl.pointer_type(O_DTYPE)), u_addr.to(tl.pointer_type(U_DTYPE)),
                       v_addr.to(tl.pointer_type(V_DTYPE)), dw_ptr + tl.load(ptrs + _NP_OUTOFF), rb, cb, B,
                       tl.load(meta + _N_C), inner, sigma, ACC, TR, TC)


@triton.jit
def _normalize_backward_multi_kernel(items_ptr, ptrs_ptr, grad_ptrs_ptr, meta_ptr, part_ptr, sigma_ptr,
                                     dw_ptr, O_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr,
                                     V_DTYPE: tl.constexpr, ACC: tl.constexpr, FLAT: tl.constexpr,
                                     BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, TR: tl.constexpr,
                                     TC: tl.constexpr):
    """dW = (G - <G, W_sn> u v^T) / sigma for one tile (tiled weights) or block of one weight,
    written to its slice of the shared dW buffer (sigma: the forward's; FLAT as in
    _uwv_partials_multi_kernel)."""
    pid = tl.program_id(0)
    wid = tl.load(items_ptr + pid * _BWD_COLS)
    g_addr = tl.load(grad_ptrs_ptr + wid)
    if g_addr != 0:
        ptrs = ptrs_ptr + wid * _NPTR_COLS
        u_addr = tl.load(ptrs + _NP_U)
        v_addr = tl.load(ptrs + _NP_V)
        sigma = tl.load(sigma_ptr + wid).to(ACC)
        meta = meta_ptr + wid * _NMETA_COLS
        B = tl.load(meta + _N_B)
        p = tl.arange(0, BLOCK_P)
        gw = tl.sum(tl.load(part_ptr + tl.load(meta + _N_PARTOFF) + p, mask=p < tl.load(meta + _N_NPARTS),
                            other=0.0), axis=0)
        inner = gw / sigma  # <G, W_sn>
        x = tl.load(items_ptr + pid * _BWD_COLS + 1)
        if FLAT:
            if tl.load(meta + _N_TILED) != 0:
                _backward_tiled_item(items_ptr, pid, ptrs, meta, g_addr, u_addr, v_addr, dw_ptr, x, B, inner,
                                     sigma, O_DTYPE, U_DTYPE, V_DTYPE, ACC, TR, TC)
            else:
                _backward_flat(g_addr.to(tl.pointer_type(O_DTYPE)), u_addr.to(tl.pointer_type(U_DTYPE)),
                               v_addr.to(tl.pointer_type(V_DTYPE)), dw_ptr + tl.load(ptrs + _NP_OUTOFF), x,
                               tl.load(meta + _N_NUMEL), B, tl.load(meta + _N_C), inner, sigma, ACC, BLOCK)
        else:
            _backward_tiled_item(items_ptr, pid, ptrs, meta, g_addr, u_addr, v_addr, dw_ptr, x, B, inner,
                                 sigma, O_DTYPE, U_DTYPE, V_DTYPE, ACC, TR, TC)


# ------------------------------------------------------------------------------------------------
# Host side: layouts, tables, launches
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


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % _ALIGN_BYTES == 0 for t in tensors)


def _tiled_multi(A: int, B: int, C: int) -> bool:
    """The division-free tiled path of the multi-tensor kernels: dim-0 weights (A == 1) whose rows
    fill half a tile or more, or small enough that empty lanes do not matter (SAGAN's 3-channel
    input convs: then no kernel of the group is compiled with divisions)."""
    return A == 1 and (C >= _TILE_C // 2 or B * C <= 1 << 16)


def _tiled_single(A: int, C: int) -> bool:
    """The tiled path of the per-weight kernels: dim-0 weights with C a multiple of 16, which the
    JIT's launch specialization sees (16-byte rows from an aligned base); other row lengths read
    the flat view, whose contiguous loads still vectorize (column tiles must fit a grid dimension)."""
    return A == 1 and C % 16 == 0 and C <= 65535 * _TILE_C


def _table_row(n_cols, values: dict) -> list[int]:
    """One row of a launch table, each value in the column its layout constant names."""
    row = [0] * int(n_cols)
    for col, value in values.items():
        row[int(col)] = int(value)
    return row


_UPLOADS = 0  # tables copied to a device so far (tests check when they happen)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _upload(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A launch table on ``device``: the only place host data goes to a device. From pinned memory
    on CUDA (the caching host allocator keeps the block until the copy is done), never while a
    CUDA graph is being captured."""
    global _UPLOADS
    if _capturing(device):
        raise RuntimeError(
            "spectral norm (triton): new launch tables are needed while a CUDA graph is being "
            "captured; run the same step once eagerly before capturing (the tables are cached on "
            "the tensors' addresses), and keep SN weights contiguous")
    _UPLOADS += 1
    table = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


class _Plan:
    """Power-iteration tables for one list of (weight, u, v, dim): built once, kept on the device,
    cached on everything they hold. ``sig_index``: where each weight's sigma goes in the output."""

    def __init__(self, weights, us, vs, dims, sig_index, device):
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
            # Workspace vectors padded to whole 16-byte vectors (zeros in the padding).
            b_pad, k_pad = _round_up(B, _ALIGN_ELEMS), _round_up(K, _ALIGN_ELEMS)
            path = (_PATH_GENERAL if A > 1 else _PATH_DIM0_ALIGNED
                    if C % _ALIGN_ELEMS == 0 and _aligned(w, u, v) else _PATH_DIM0)
            meta.append(_table_row(_META_COLS, {
                _M_B: B, _M_C: C, _M_K: K, _M_NCS: n_cs, _M_NRS: n_rs, _M_TOFF: t_size, _M_SOFF: s_size,
                _M_KCHUNK: k_chunk, _M_RCHUNK: r_chunk, _M_BPAD: b_pad, _M_KPAD: k_pad, _M_PATH: path,
                _M_SIGOUT: sig_index[i]}))
            ptrs.append(_table_row(_PTR_COLS, {_P_W: w.data_ptr(), _P_U: u.data_ptr(), _P_V: v.data_ptr()}))
            items_mv += [[i, r0, sp] for r0 in range(0, B, _BLOCK_R) for sp in range(n_cs)]
            items_rmv += [[i, c0, sp] for c0 in range(0, K, _BLOCK_K) for sp in range(n_rs)]
            t_size += n_cs * b_pad
            s_size += n_rs * k_pad
        for rows in (meta, items_mv, items_rmv):
            if max(max(r) for r in rows) >= 2**31:
                raise ValueError("spectral norm (triton): a weight is too large for 32-bit tables")
        self.paths = [r[int(_M_PATH)] for r in meta]
        self.general = any(p == _PATH_GENERAL for p in self.paths)
        self.meta = _upload(meta, torch.int32, device)
        self.ptrs = _upload(ptrs, torch.int64, device)
        self.items_mv = _upload(items_mv, torch.int32, device)
        self.items_rmv = _upload(items_rmv, torch.int32, device)
        self.n_mv, self.n_rmv = len(items_mv), len(items_rmv)
        self.t_size, self.s_size = t_size, s_size


_PLANS: dict[tuple, object] = {}
_MAX_PLANS = 64
# Plans (and gradient tables) a captured CUDA graph reads: never freed, whatever happens to the cache.
_CAPTURED_PLANS: list = []
# eps on the device in the accumulation dtype: a Python float argument would reach the kernel as
# float32, which is not the float64 eps of float64 weights.
_EPS: dict[tuple, torch.Tensor] = {}


def _eps_tensor(eps: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (eps, dtype, str(device))
    t = _EPS.get(key)
    if t is None:
        t = _EPS[key] = torch.full((), eps, dtype=dtype, device=device)  # a fill: no host copy
    return t


def _keep_if_captured(obj, device: torch.device):
    if not getattr(obj, "captured", False) and _capturing(device):
        obj.captured = True
        _CAPTURED_PLANS.append(obj)
    return obj


def _cached_plan(key: tuple, build, device: torch.device):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()  # pointers of freed tensors; rebuilding is cheap
        plan = _PLANS[key] = build()
    return _keep_if_captured(plan, device)


def _tensor_key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype


def _plan_for(weights, us, vs, dims, sig_index) -> _Plan:
    device = weights[0].device
    key = ("power_iteration", str(device)) + tuple(
        (*_tensor_key(w), *_tensor_key(u), *_tensor_key(v), tuple(w.shape), d, j)
        for w, u, v, d, j in zip(weights, us, vs, dims, sig_index))
    return _cached_plan(key, lambda: _Plan(weights, us, vs, dims, sig_index, device), device)


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


def _power_iteration_group(weights, us, vs, dims, sig_index, sigmas, n_power_iterations, eps) -> None:
    """One (weight dtype, u dtype, v dtype) group: 2 * n_power_iterations + 1 launches; each sigma
    lands in ``sigmas[sig_index[i]]``."""
    device = weights[0].device
    acc = _acc_dtype(weights[0].dtype)
    plan = _plan_for(weights, us, vs, dims, sig_index)
    t_part = torch.empty(plan.t_size, device=device, dtype=acc)
    s_part = torch.empty(plan.s_size, device=device, dtype=acc)
    eps = _eps_tensor(eps, acc, device)
    w_t, u_t, v_t, acc_t = (_TL_DTYPES[weights[0].dtype], _TL_DTYPES[us[0].dtype],
                            _TL_DTYPES[vs[0].dtype], _TL_DTYPES[acc])
    for it in range(n_power_iterations):
        _matvec_kernel[(plan.n_mv,)](plan.items_mv, plan.ptrs, plan.meta, t_part, s_part, eps,
                                     W_DTYPE=w_t, V_DTYPE=v_t, ACC=acc_t, V_FROM_S=it > 0,
                                     GENERAL=plan.general, BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K,
                                     BLOCK_N=_BLOCK_N)
        _rmatvec_kernel[(plan.n_rmv,)](plan.items_rmv, plan.ptrs, plan.meta, t_part, s_part, eps,
                                       W_DTYPE=w_t, U_DTYPE=u_t, ACC=acc_t, GENERAL=plan.general,
                                       BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N)
    _finalize_kernel[(len(weights),)](plan.ptrs, plan.meta, s_part, sigmas, eps,
                                      V_DTYPE=v_t, ACC=acc_t, BLOCK=_BLOCK_N)


def _power_iteration_impl(weights, us, vs, dims, n_power_iterations, eps) -> torch.Tensor:
    _check_vectors(weights, us, vs)
    # Non-contiguous weights (channels_last convs) are read from a contiguous copy: correct, one
    # extra pass; the kernels index the (A, B, C) view of contiguous storage.
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    out_dtype = _acc_dtype(*(w.dtype for w in weights))
    groups: dict[tuple, list[int]] = {}
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):
        groups.setdefault((w.dtype, u.dtype, v.dtype), []).append(i)
    # Every group's finalize writes its sigmas in place: no scatter, nothing from host memory
    # (capture-safe for mixed dtypes).
    sigmas = torch.empty(len(weights), device=weights[0].device, dtype=out_dtype)
    for idx in groups.values():
        _power_iteration_group([weights[i] for i in idx], [us[i] for i in idx], [vs[i] for i in idx],
                               [dims[i] for i in idx], idx, sigmas, n_power_iterations, eps)
    return sigmas


@torch.library.custom_op("sagan_fast_triton::sn_power_iteration_", mutates_args=("us", "vs"))
def _power_iteration_op(weights: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor],
                        dims: list[int], n_power_iterations: int, eps: float) -> torch.Tensor:
    return _power_iteration_impl(weights, us, vs, dims, n_power_iterations, eps)


@_power_iteration_op.register_fake
def _(weights, us, vs, dims, n_power_iterations, eps):
    return weights[0].new_empty(len(weights), dtype=_acc_dtype(*(w.dtype for w in weights)))


def power_iteration_(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor],
                     vs: Sequence[torch.Tensor], dims: Sequence[int], n_power_iterations: int,
                     eps: float) -> torch.Tensor:
    """u, v of every weight updated in place (torch's order); returns sigmas (L,) = u . W v.

    Inputs are checked by :func:`sagan_fast.ops.spectral_norm.spectral_norm_power_iteration_`.
    """
    return _power_iteration_op(list(weights), list(us), list(vs), [int(d) for d in dims],
                               int(n_power_iterations), float(eps))


# --- normalize, one weight --------------------------------------------------------------------

def _partials_layout(numel: int) -> tuple[int, int]:
    """(number of partial sums, elements per partial) of a flat reduction over a whole weight: at
    most _MAX_PARTIALS programs, each a whole number of _BLOCK_EW blocks."""
    n_parts = min(_cdiv(numel, _BLOCK_EW), _MAX_PARTIALS)
    chunk = _cdiv(_cdiv(numel, n_parts), _BLOCK_EW) * _BLOCK_EW
    return _cdiv(numel, chunk), chunk


def _tile_layout(B: int, C: int) -> tuple[int, int, int, int, int, int]:
    """(row tiles, column tiles, row tiles per partial, column tiles per partial, partial rows,
    partial columns): the tiled reduction of a (B, C) weight in at most _MAX_PARTIALS rectangles,
    split along the columns first when there are few row tiles (wide weights)."""
    n_rb, n_ct = _cdiv(B, _TILE_R), _cdiv(C, _TILE_C)
    pc = min(n_ct, max(1, _MAX_PARTIALS // n_rb))
    ctp = _cdiv(n_ct, pc)
    pc = _cdiv(n_ct, ctp)
    pr = min(n_rb, max(1, _MAX_PARTIALS // pc))
    rbp = _cdiv(n_rb, pr)
    pr = _cdiv(n_rb, rbp)
    return n_rb, n_ct, rbp, ctp, pr, pc


def _check_size(numel: int) -> None:
    if numel >= 2**31 - _BLOCK_MULTI:
        raise ValueError("spectral norm (triton): a weight is too large for 32-bit indexing")


def _normalize_forward_impl(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int,
                            out_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W / sigma in out_dtype, sigma) with sigma = u . W v of this weight: two launches."""
    w, u, v = weight.contiguous(), u.contiguous(), v.contiguous()
    numel = w.numel()
    acc = _acc_dtype(w.dtype)
    A, B, C = _abc(w.shape, dim)
    if _tiled_single(A, C):
        n_rb, n_ct, rbp, ctp, pr, pc = _tile_layout(B, C)
        partials = torch.empty(pr * pc, device=w.device, dtype=acc)
        _uwv_partials_kernel[(pr, pc)](w, u, v, partials, numel, 0, B, C, rbp, ctp, n_rb, n_ct,
                                       ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_EW, TILED=True, TR=_TILE_R,
                                       TC=_TILE_C)
    else:
        n_parts, chunk = _partials_layout(numel)
        partials = torch.empty(n_parts, device=w.device, dtype=acc)
        _uwv_partials_kernel[(n_parts,)](w, u, v, partials, numel, chunk, B, C, 0, 0, 0, 0,
                                         ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_EW, TILED=False, TR=_TILE_R,
                                         TC=_TILE_C)
    out = torch.empty(w.shape, device=w.device, dtype=out_dtype or w.dtype)
    sigma = torch.empty((), device=w.device, dtype=acc)
    _scale_kernel[(_cdiv(numel, _BLOCK_EW),)](w, partials, partials.numel(), out, sigma, numel,
                                              ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_EW,
                                              BLOCK_P=triton.next_power_of_2(_MAX_PARTIALS))
    return out, sigma


def _normalize_backward_impl(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                             sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """dW in the weight's dtype from G (in W_sn's dtype): two launches."""
    g, w, u, v = grad.contiguous(), weight.contiguous(), u.contiguous(), v.contiguous()
    numel = w.numel()
    acc = _acc_dtype(w.dtype)
    n_parts, chunk = _partials_layout(numel)
    partials = torch.empty(n_parts, device=w.device, dtype=acc)
    _dot_partials_kernel[(n_parts,)](g, w, partials, numel, chunk, ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_EW)
    A, B, C = _abc(w.shape, dim)
    dw = torch.empty(w.shape, device=w.device, dtype=w.dtype)
    tiled = _tiled_single(A, C)
    grid = (_cdiv(B, _TILE_R), _cdiv(C, _TILE_C)) if tiled else (_cdiv(numel, _BLOCK_MULTI),)
    _normalize_backward_kernel[grid](
        g, u, v, sigma, partials, dw, numel, n_parts, B, C, ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_MULTI,
        BLOCK_P=triton.next_power_of_2(_MAX_PARTIALS), TILED=tiled, TR=_TILE_R, TC=_TILE_C)
    return dw


@torch.library.custom_op("sagan_fast_triton::sn_normalize", mutates_args=())
def _normalize_op(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int,
                  out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _normalize_forward_impl(weight, u, v, dim, out_dtype)


@_normalize_op.register_fake
def _(weight, u, v, dim, out_dtype=None):
    return (torch.empty(weight.shape, dtype=out_dtype or weight.dtype, device=weight.device),
            weight.new_empty((), dtype=_acc_dtype(weight.dtype)))


@torch.library.custom_op("sagan_fast_triton::sn_normalize_backward", mutates_args=())
def _normalize_backward_op(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                           sigma: torch.Tensor, dim: int) -> torch.Tensor:
    return _normalize_backward_impl(grad, weight, u, v, sigma, dim)


@_normalize_backward_op.register_fake
def _(grad, weight, u, v, sigma, dim):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _normalize_setup_context(ctx, inputs, output):
    weight, u, v, dim, _ = inputs
    _, sigma = output
    ctx.mark_non_differentiable(sigma)
    # <G, W_sn> = <G, W> / sigma from the weight itself (full precision when W_sn is 16-bit).
    ctx.save_for_backward(weight, u, v, sigma)
    ctx.dim = dim


def _normalize_backward(ctx, grad, _grad_sigma):
    weight, u, v, sigma = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[0] and torch.is_grad_enabled():  # create_graph=True: differentiable ops
        grad_weight = reference.spectral_norm_normalize_grad(grad, weight, u, v, ctx.dim)
    elif ctx.needs_input_grad[0]:
        grad_weight = _normalize_backward_op(grad, weight, u, v, sigma, ctx.dim)
    return grad_weight, None, None, None, None


_normalize_op.register_autograd(_normalize_backward, setup_context=_normalize_setup_context)


def _check_normalize(weight: torch.Tensor, out_dtype: Optional[torch.dtype]) -> None:
    if weight.dtype not in _TL_DTYPES:
        raise TypeError(f"spectral_norm_normalize (triton): unsupported weight dtype {weight.dtype}")
    if out_dtype is not None and out_dtype not in _TL_DTYPES:
        raise TypeError(f"spectral_norm_normalize (triton): unsupported output dtype {out_dtype}")


def normalize(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int,
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``weight / (u . W v)``, sigma computed from this weight (one partial-sum launch, then the
    scale), written in ``out_dtype`` (default: the weight's); backward ``dW = (G - <G, W_sn> u v^T)
    / sigma`` with u, v constant (two launches), in the weight's dtype.

    The result is contiguous. Inputs are checked by
    :func:`sagan_fast.ops.spectral_norm.spectral_norm_normalize`.
    """
    _check_normalize(weight, out_dtype)
    _check_vectors([weight], [u], [v])
    out, _ = _normalize_op(weight, u, v, int(dim), None if out_dtype == weight.dtype else out_dtype)
    return out


def normalize_backward(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                       sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """The closed-form backward alone (for tests and benchmarks); G may be in another floating
    dtype than the weight (W_sn's), dW is in the weight's."""
    sigma = sigma.reshape(()).to(_acc_dtype(weight.dtype))
    return _normalize_backward_op(grad, weight, u, v, sigma, int(dim))


# --- model-level normalize: every weight of a group in two launches, backward in two -----------

class _MultiPlan:
    """Static tables for normalizing one list of weights, kept on the device: per weight its
    pointers, sizes, layout (tiled or flat) and alignment flags, and the work items of the
    reductions, the scale and the backward. Gradient tables are cached here on their addresses."""

    _MAX_GRAD_TABLES = 8

    def __init__(self, weights, us, vs, dims, device):
        ptrs, meta, items_red, items_blk, items_bwd = [], [], [], [], []
        out_off = part_off = 0
        self.tiled, self.hints, self.offsets = [], [], []
        for i, (w, u, v, d) in enumerate(zip(weights, us, vs, dims)):
            numel = w.numel()
            _check_size(numel)
            A, B, C = _abc(w.shape, d)
            tiled = _tiled_multi(A, B, C)
            flat_ok = _aligned(w) and numel % _ALIGN_ELEMS == 0  # its output slice starts aligned
            tile_ok = tiled and flat_ok and C % _ALIGN_ELEMS == 0 and _aligned(u, v)
            hints = int(flat_ok) * int(_FLAT_OK) | int(tile_ok) * int(_TILE_OK)
            row = {_N_NUMEL: numel, _N_B: B, _N_C: C, _N_TILED: tiled, _N_HINTS: hints, _N_PARTOFF: part_off}
            if tiled:
                n_rb, n_ct, rbp, ctp, pr, pc = _tile_layout(B, C)
                n_parts = pr * pc
                items_red += [[i, r * pc + c, r * rbp, c * ctp] for r in range(pr) for c in range(pc)]
                items_bwd += [[i, rb, cb] for rb in range(n_rb) for cb in range(n_ct)]
                row.update({_N_RBP: rbp, _N_CTP: ctp, _N_NRB: n_rb, _N_NCT: n_ct})
            else:
                n_parts, _ = _partials_layout(numel)
                items_red += [[i, k, 0, 0] for k in range(n_parts)]
                items_bwd += [[i, start, 0] for start in range(0, numel, _BLOCK_MULTI)]
            # Flat chunks of the same number of partials (G . W in the backward, and the
            # reduction of flat weights): whole _BLOCK_EW blocks, the last ones possibly empty.
            row.update({_N_NPARTS: n_parts, _N_CHUNK: _round_up(_cdiv(numel, n_parts), _BLOCK_EW)})
            meta.append(_table_row(_NMETA_COLS, row))
            ptrs.append(_table_row(_NPTR_COLS, {_NP_W: w.data_ptr(), _NP_U: u.data_ptr(), _NP_V: v.data_ptr(),
                                                _NP_OUTOFF: out_off}))
            items_blk += [[i, start] for start in range(0, numel, _BLOCK_MULTI)]
            self.tiled.append(tiled)
            self.hints.append(hints)
            self.offsets.append(out_off)
            # Every weight's slice of the shared output (and dW) buffer starts on a whole vector.
            out_off += _round_up(numel, _ALIGN_ELEMS)
            part_off += n_parts
        self.ptrs = _upload(ptrs, torch.int64, device)
        self.meta = _upload(meta, torch.int32, device)
        self.items_red = _upload(items_red, torch.int32, device)
        self.items_blk = _upload(items_blk, torch.int32, device)
        self.items_bwd = _upload(items_bwd, torch.int32, device)
        self.n_red, self.n_blk, self.n_bwd = len(items_red), len(items_blk), len(items_bwd)
        self.flat = not all(self.tiled)
        self.total, self.n_parts_total = out_off, part_off
        self.sizes = [w.numel() for w in weights]
        self.shapes = [tuple(w.shape) for w in weights]
        self.device = device
        self._grad_tables: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()

    def grad_table(self, grads: list) -> Optional[torch.Tensor]:
        """The device table of the gradients' addresses (0: no gradient), cached on them; None when
        it is not cached and a CUDA graph is being captured (no host copy is allowed then)."""
        key = tuple(0 if g is None else g.data_ptr() for g in grads)
        table = self._grad_tables.get(key)
        if table is not None:
            self._grad_tables.move_to_end(key)
        else:
            if _capturing(self.device):
                return None
            table = self._grad_tables[key] = _upload(list(key), torch.int64, self.device)
            if len(self._grad_tables) > self._MAX_GRAD_TABLES:
                self._grad_tables.popitem(last=False)
        if _capturing(self.device):  # the graph reads this table at every replay: keep it
            _CAPTURED_PLANS.append(table)
            _keep_if_captured(self, self.device)
        return table


    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each weight's slice of a shared buffer, in the weight's shape."""
        return [flat.narrow(0, off, n).view(shape)
                for off, n, shape in zip(self.offsets, self.sizes, self.shapes)]


def _multi_plan_for(weights, us, vs, dims) -> _MultiPlan:
    device = weights[0].device
    key = ("normalize", str(device)) + tuple(
        (*_tensor_key(w), *_tensor_key(u), *_tensor_key(v), tuple(w.shape), d)
        for w, u, v, d in zip(weights, us, vs, dims))
    return _cached_plan(key, lambda: _MultiPlan(weights, us, vs, dims, device), device)


class _NormalizeMulti(torch.autograd.Function):
    """W / (u . W v) for every weight of one group (same weight, u, v and output dtypes): a
    partial-sum launch and a scale launch; backward in two."""

    @staticmethod
    def forward(ctx, us, vs, dims, out_dtype, *weights):
        plan = _multi_plan_for(weights, us, vs, dims)
        device, w_dtype = weights[0].device, weights[0].dtype
        acc = _acc_dtype(w_dtype)
        w_t, acc_t = _TL_DTYPES[w_dtype], _TL_DTYPES[acc]
        partials = torch.empty(plan.n_parts_total, device=device, dtype=acc)
        _uwv_partials_multi_kernel[(plan.n_red,)](plan.items_red, plan.ptrs, plan.meta, partials,
                                                  W_DTYPE=w_t, U_DTYPE=_TL_DTYPES[us[0].dtype],
                                                  V_DTYPE=_TL_DTYPES[vs[0].dtype], ACC=acc_t, FLAT=plan.flat,
                                                  BLOCK=_BLOCK_EW, TR=_TILE_R, TC=_TILE_C)
        sigmas = torch.empty(len(weights), device=device, dtype=acc)
        flat = torch.empty(plan.total, device=device, dtype=out_dtype)
        _scale_multi_kernel[(plan.n_blk,)](plan.items_blk, plan.ptrs, plan.meta, partials, sigmas, flat,
                                           W_DTYPE=w_t, ACC=acc_t, BLOCK=_BLOCK_MULTI,
                                           BLOCK_P=triton.next_power_of_2(_MAX_PARTIALS))
        ctx.plan, ctx.dtypes, ctx.dims = plan, (w_dtype, us[0].dtype, vs[0].dtype, out_dtype), dims
        # Aliases of the storages the plan points at (alive through the backward even if a
        # parameter gets new storage in between); u, v saved to catch in-place changes.
        ctx.weights = [w.detach() for w in weights]
        ctx.inputs = weights  # for a differentiable backward (create_graph=True) only
        ctx.save_for_backward(sigmas, *us, *vs)
        ctx.set_materialize_grads(False)
        return tuple(plan.views(flat))

    @staticmethod
    def backward(ctx, *grads):
        plan = ctx.plan
        sigmas, *uv = ctx.saved_tensors  # raises if u or v changed in place since forward
        n = len(plan.sizes)
        w_dtype, u_dtype, v_dtype, out_dtype = ctx.dtypes
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate again
            us, vs = uv[:n], uv[n:]
            return (None, None, None, None, *[
                reference.spectral_norm_normalize_grad(g, w, u, v, d) if g is not None else None
                for g, w, u, v, d in zip(grads, ctx.inputs, us, vs, ctx.dims)])
        grads = [g.contiguous() if g is not None else None for g in grads]
        table = plan.grad_table(grads)
        if table is None:
            # Capturing a CUDA graph with gradients at addresses no table holds: per-weight
            # kernels, which take them as arguments (launches are cheap in a graph).
            us, vs = uv[:n], uv[n:]
            return (None, None, None, None, *[
                _normalize_backward_impl(g, w, u, v, sigmas[i], d) if g is not None else None
                for i, (g, w, u, v, d) in enumerate(zip(grads, ctx.weights, us, vs, ctx.dims))])
        acc = _acc_dtype(w_dtype)
        partials = torch.empty(plan.n_parts_total, device=plan.device, dtype=acc)
        o_t = _TL_DTYPES[out_dtype]
        _dot_partials_multi_kernel[(plan.n_red,)](plan.items_red, plan.ptrs, table, plan.meta, partials,
                                                  W_DTYPE=_TL_DTYPES[w_dtype], O_DTYPE=o_t,
                                                  ACC=_TL_DTYPES[acc], BLOCK=_BLOCK_EW)
        # dW of every weight in one buffer (offsets in the plan, no table); an output that got no
        # gradient gives its weight none (its programs skip).
        d_flat = torch.empty(plan.total, device=plan.device, dtype=w_dtype)
        _normalize_backward_multi_kernel[(plan.n_bwd,)](
            plan.items_bwd, plan.ptrs, table, plan.meta, partials, sigmas, d_flat,
            O_DTYPE=o_t, U_DTYPE=_TL_DTYPES[u_dtype], V_DTYPE=_TL_DTYPES[v_dtype], ACC=_TL_DTYPES[acc],
            FLAT=plan.flat, BLOCK=_BLOCK_MULTI, BLOCK_P=triton.next_power_of_2(_MAX_PARTIALS), TR=_TILE_R,
            TC=_TILE_C)
        return (None, None, None, None,
                *[d if g is not None else None for d, g in zip(plan.views(d_flat), grads)])


def normalize_multi(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                    dims: Sequence[int], out_dtypes: Sequence[Optional[torch.dtype]] | None = None
                    ) -> list[torch.Tensor]:
    """``[W / (u . W v) for each weight]``, sigma from each very weight: two launches per (weight,
    u, v, output) dtype group forward, two backward. ``out_dtypes``: each output's dtype (None:
    the weight's), e.g. the autocast dtype for fp32 master weights.

    Eager autograd only (torch.compile uses the per-layer :func:`normalize`). Weights must be
    contiguous; the launch tables are cached on the weights', u's and v's addresses. The outputs
    of a group are views of one buffer, and so are their weights' gradients.
    """
    weights, us, vs, dims = list(weights), list(us), list(vs), [int(d) for d in dims]
    out_dtypes = [None] * len(weights) if out_dtypes is None else list(out_dtypes)
    if len(out_dtypes) != len(weights):
        raise ValueError(f"normalize_multi (triton): {len(weights)} weights but {len(out_dtypes)} output "
                         "dtypes")
    for w, o in zip(weights, out_dtypes):
        _check_normalize(w, o)
        if not w.is_contiguous():
            raise ValueError("normalize_multi (triton): weights must be contiguous; use normalize()")
    _check_vectors(weights, us, vs)
    out: list[torch.Tensor | None] = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    for i, (w, u, v, o) in enumerate(zip(weights, us, vs, out_dtypes)):
        groups.setdefault((w.dtype, u.dtype, v.dtype, o or w.dtype), []).append(i)
    for (_, _, _, out_dtype), idx in groups.items():
        res = _NormalizeMulti.apply([us[i] for i in idx], [vs[i] for i in idx], [dims[i] for i in idx],
                                    out_dtype, *[weights[i] for i in idx])
        for i, r in zip(idx, res):
            out[i] = r
    return out
