"""Memory-efficient SAGAN attention in Triton: out = softmax(scale * q k^T) v, forward and backward.

q (B, N, E), k (B, Nk, E), v (B, Nk, Ev) -> out (B, N, Ev); E != Ev (SAGAN: E = C/8, Ev = C or C/2).

Forward (flash-style): each program owns BLOCK_M query rows and one BLOCK_DV slice of the value
channels, streams the keys in blocks with an online softmax (exp2, fp32 statistics and
accumulator; fp64 for fp64) and writes its output slice plus one base-2 logsumexp per row. No
B x N x Nk tensor exists, forward or backward. When Ev needs several slices, each slice recomputes q k^T: that costs E / BLOCK_DV
of the p v work (E = 32 against 256 in SAGAN), cheaper than holding a B x N x Ev accumulator.

Backward (recompute from the logsumexp, delta = rowsum(dO * O) first), no atomics:
- dk and dv: for 16-bit inputs whose padded Ev fits one tile (<= 256), one program per key block
  sums p^T dO and ds^T q (ds = p * (dO v^T - delta)) in one pass over the queries;
  otherwise (or when timing on the GPU finds it faster) two kernels: dv per (key block, value
  slice), dk per key block with dO v^T reduced over Ev in chunks, so any Ev fits;
- dq: one program per query block sums ds k, dO v^T reduced over Ev in chunks.

Strides are arbitrary (stride 0 and the channel-major view ``h.flatten(2).transpose(1, 2)`` of a
1x1-conv output are read in place). The output takes v's layout: channel-major values give a
channel-major output, so ``out.transpose(1, 2).reshape(B, Ev, H, W)`` is free. Gradients take the
same rule from their input (dense channel-major for channel-major views).

Precision: every dot accumulates in fp32. fp16 / bf16 inputs feed the tensor cores in their own
dtype (p and ds are rounded to it before their dots, as flash-attention does). fp32 inputs: a
choice, ``fp32_precision`` (Triton's ``input_precision`` of every dot):
- "ieee" (default): true fp32 products, no tensor cores; the one expected to stay within 2x of
  PyTorch's own (non-TF32) fp32 error, the project's rule (measured in the interpreter; the
  `gpu` tests check it on a card);
- "tf32x3": three TF32 tensor-core products (hi*hi + hi*lo + lo*hi), close to fp32 accuracy;
- "tf32": one TF32 product (10-bit mantissa inputs, ~1e-3 relative error), fastest.
None means "tf32" when ``torch.backends.cuda.matmul.allow_tf32`` is set, else the environment
variable SAGAN_FAST_TRITON_FP32_PRECISION, else "ieee". fp64 runs in fp64 (used by gradcheck).

Launch settings: on a GPU each kernel's block sizes / warps / stages are picked on first use per
(shape, dtype) among a few candidates, timed with triton.testing.do_bench (``_launch``;
SAGAN_FAST_TRITON_AUTOTUNE=0 keeps the defaults). Under the interpreter one small fixed setting.

Registered as ``torch.ops.sagan_fast_triton.attention_fwd`` / ``attention_bwd`` (custom_op +
register_fake + register_autograd), so torch.compile traces it as one opaque op.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .._backend import accumulation_dtype, triton_interpreter_enabled

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

MAX_E = 128
MAX_EV = 512
MAX_BATCH = 65535   # CUDA's limit on grid axes 1 and 2
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_ob, stride_on, stride_oe,
    N, NK, E, EV, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_dv = tl.program_id(1)
    # int64 batch offsets: B * N * Ev can pass 2**31 elements.
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_m = offs_m < N
    mask_e = offs_e < E
    mask_dv = offs_dv < EV

    q = tl.load(Q + off_b * stride_qb + offs_m[:, None] * stride_qn + offs_e[None, :] * stride_qe,
                mask=mask_m[:, None] & mask_e[None, :], other=0.0)
    k_base = K + off_b * stride_kb + offs_e[None, :] * stride_ke
    v_base = V + off_b * stride_vb + offs_dv[None, :] * stride_ve

    # Running max (log2 units), running sum, accumulator: the online softmax state.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NK
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC) * qk_scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # m_new is finite: every key block holds at least one valid key.
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION,
                                            out_dtype=ACC)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + off_b * stride_ob + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_oe
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])
    if pid_dv == 0:
        # Base-2 logsumexp of scale * q k^T: the backward exponentiates it with exp2 again, so
        # no ln 2 / log2 e round trip (rounded to fp32 by Triton) breaks the fp64 path's consistency.
        tl.store(LSE + off_b * N + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_on, stride_oe,
    stride_dob, stride_don, stride_doe,
    N, EV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
):
    """delta[b, i] = sum_c dO[b, i, c] * O[b, i, c] in fp32: the softmax backward's row term."""
    pid_m = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    delta = tl.zeros([BLOCK_M], dtype=ACC)
    for start_c in range(0, EV, BLOCK_DV):
        offs_c = start_c + tl.arange(0, BLOCK_DV)
        mask = mask_m[:, None] & (offs_c < EV)[None, :]
        o = tl.load(O + off_b * stride_ob + offs_m[:, None] * stride_on + offs_c[None, :] * stride_oe,
                    mask=mask, other=0.0).to(ACC)
        do = tl.load(DO + off_b * stride_dob + offs_m[:, None] * stride_don + offs_c[None, :] * stride_doe,
                     mask=mask, other=0.0).to(ACC)
        delta += tl.sum(o * do, 1)
    tl.store(DELTA + off_b * N + offs_m, delta, mask=mask_m)


@triton.jit
def _dp_block(do_base, v_base, offs_m, mask_m, cols, mask_n, stride_don, stride_doe, stride_vn,
              stride_ve, EV, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dO[rows] v[cols]^T (BLOCK_M, BLOCK_N) in fp32, reduced over Ev in BLOCK_DV chunks."""
    dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for start_c in range(0, EV, BLOCK_DV):
        offs_c = start_c + tl.arange(0, BLOCK_DV)
        mask_c = offs_c < EV
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_c[None, :] * stride_doe,
                     mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_c[None, :] * stride_ve,
                    mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        dp += tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=ACC)
    return dp


@triton.jit
def _attn_bwd_dv_kernel(
    Q, K, DO, LSE, DV,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_dob, stride_don, stride_doe,
    stride_dvb, stride_dvn, stride_dve,
    N, NK, E, EV, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dv[cols, slice] = sum over query rows of p^T dO[:, slice]; p recomputed from the lse."""
    pid_n = tl.program_id(0)
    pid_dv = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_n = cols < NK
    mask_e = offs_e < E
    mask_dv = offs_dv < EV
    k = tl.load(K + off_b * stride_kb + cols[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                mask=mask_n[:, None] & mask_e[None, :], other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = tl.load(Q + off_b * stride_qb + offs_m[:, None] * stride_qn + offs_e[None, :] * stride_qe,
                    mask=mask_m[:, None] & mask_e[None, :], other=0.0)
        # +inf lse on padded rows makes their p exactly 0.
        lse2 = tl.load(LSE + off_b * N + offs_m, mask=mask_m, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC) * qk_scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        do = tl.load(DO + off_b * stride_dob + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_doe,
                     mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
        acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION, out_dtype=ACC)
    tl.store(DV + off_b * stride_dvb + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dve,
             acc.to(DV.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])


@triton.jit
def _attn_bwd_dk_kernel(
    Q, K, V, DO, LSE, DELTA, DK,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_dob, stride_don, stride_doe,
    stride_dkb, stride_dkn, stride_dke,
    N, NK, E, EV, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dk[cols] = scale * sum over query rows of ds^T q, ds = p * (dO v^T - delta)."""
    pid_n = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    mask_n = cols < NK
    mask_e = offs_e < E
    k = tl.load(K + off_b * stride_kb + cols[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                mask=mask_n[:, None] & mask_e[None, :], other=0.0)
    do_base = DO + off_b * stride_dob
    v_base = V + off_b * stride_vb
    acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = tl.load(Q + off_b * stride_qb + offs_m[:, None] * stride_qn + offs_e[None, :] * stride_qe,
                    mask=mask_m[:, None] & mask_e[None, :], other=0.0)
        lse2 = tl.load(LSE + off_b * N + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + off_b * N + offs_m, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC) * qk_scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = _dp_block(do_base, v_base, offs_m, mask_m, cols, mask_n, stride_don, stride_doe,
                       stride_vn, stride_ve, EV, BLOCK_M, BLOCK_N, BLOCK_DV, INPUT_PRECISION, ACC)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION, out_dtype=ACC)
    acc = acc * scale
    tl.store(DK + off_b * stride_dkb + cols[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             acc.to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_e[None, :])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_dob, stride_don, stride_doe,
    stride_dkb, stride_dkn, stride_dke,
    stride_dvb, stride_dvn, stride_dve,
    N, NK, E, EV, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dk and dv of one key block in one pass over the queries, when Ev fits one BLOCK_DV tile:
    p and dO are computed / read once for both (the split dv + dk kernels do it twice)."""
    pid_n = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_DV)
    mask_n = cols < NK
    mask_e = offs_e < E
    mask_c = offs_c < EV
    k = tl.load(K + off_b * stride_kb + cols[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                mask=mask_n[:, None] & mask_e[None, :], other=0.0)
    v = tl.load(V + off_b * stride_vb + cols[:, None] * stride_vn + offs_c[None, :] * stride_ve,
                mask=mask_n[:, None] & mask_c[None, :], other=0.0)
    acc_dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = tl.load(Q + off_b * stride_qb + offs_m[:, None] * stride_qn + offs_e[None, :] * stride_qe,
                    mask=mask_m[:, None] & mask_e[None, :], other=0.0)
        do = tl.load(DO + off_b * stride_dob + offs_m[:, None] * stride_don + offs_c[None, :] * stride_doe,
                     mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        # +inf lse on padded rows makes their p exactly 0.
        lse2 = tl.load(LSE + off_b * N + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + off_b * N + offs_m, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC) * qk_scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        acc_dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        acc_dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION, out_dtype=ACC)
    acc_dk = acc_dk * scale
    tl.store(DK + off_b * stride_dkb + cols[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             acc_dk.to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_e[None, :])
    tl.store(DV + off_b * stride_dvb + cols[:, None] * stride_dvn + offs_c[None, :] * stride_dve,
             acc_dv.to(DV.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_dob, stride_don, stride_doe,
    stride_dqb, stride_dqn, stride_dqe,
    N, NK, E, EV, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dq[rows] = scale * sum over key blocks of ds k."""
    pid_m = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < N
    mask_e = offs_e < E
    q = tl.load(Q + off_b * stride_qb + offs_m[:, None] * stride_qn + offs_e[None, :] * stride_qe,
                mask=mask_m[:, None] & mask_e[None, :], other=0.0)
    lse2 = tl.load(LSE + off_b * N + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(DELTA + off_b * N + offs_m, mask=mask_m, other=0.0)
    do_base = DO + off_b * stride_dob
    v_base = V + off_b * stride_vb
    k_base = K + off_b * stride_kb + offs_e[None, :] * stride_ke
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NK
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC) * qk_scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = _dp_block(do_base, v_base, offs_m, mask_m, cols, mask_n, stride_don, stride_doe,
                       stride_vn, stride_ve, EV, BLOCK_M, BLOCK_N, BLOCK_DV, INPUT_PRECISION, ACC)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION, out_dtype=ACC)
    acc = acc * scale
    tl.store(DQ + off_b * stride_dqb + offs_m[:, None] * stride_dqn + offs_e[None, :] * stride_dqe,
             acc.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_e[None, :])


# ------------------------------------------------------------------------------------------------
# Tile sizes
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tiles(E: int, Ev: int, dtype: torch.dtype, interpreted: bool) -> dict:
    """The default block sizes and launch settings (the first candidate the GPU tuner tries).

    Under the interpreter blocks are small (32) so that the odd test shapes span several blocks
    and Ev = 40 spans two value slices. On a GPU: 64-row blocks; the value slice is at most 128
    wide in fp32 (register pressure of the fp32 accumulator), 256 in 16-bit, 64 in fp64; dO v^T
    is reduced in 64-wide chunks (128-wide chunks spilled registers in the bf16 dk / dq kernels
    for sm_90, ptxas -v).
    """
    block_e = max(16, triton.next_power_of_2(E))
    if interpreted:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_E=block_e,
                    BLOCK_DV=min(32, max(16, triton.next_power_of_2(Ev))),
                    num_warps=4, num_stages=1, dv_chunk=32)
    wide = dtype in (torch.float16, torch.bfloat16)
    block_dv = min(256 if wide else 128, max(16, triton.next_power_of_2(Ev)))
    if dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_E=block_e, BLOCK_DV=min(block_dv, 64),
                    num_warps=4, num_stages=1, dv_chunk=min(block_dv, 64))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_E=block_e, BLOCK_DV=block_dv,
                num_warps=8 if block_dv >= 128 else 4, num_stages=2,
                dv_chunk=min(block_dv, 64))


# Launch candidates per kernel on a GPU: (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps, num_stages); for
# dk / dq BLOCK_DV is the chunk of the dO v^T reduction. Guesses to be ranked on the card, not
# timed here (no GPU when they were written), only checked to compile for sm_90 without register
# spills in bf16 at E=32, Ev=256 (ptxas -v); BLOCK_DV is clamped to the padded Ev.
_CANDIDATES = {
    "fwd": [(64, 64, 256, 8, 2), (128, 64, 128, 8, 2), (128, 64, 256, 8, 2), (64, 64, 128, 4, 3),
            (128, 32, 128, 4, 3), (64, 32, 64, 4, 3)],
    "dv": [(64, 64, 128, 4, 2), (64, 128, 128, 8, 2), (32, 64, 256, 8, 2), (64, 64, 256, 8, 2),
           (64, 128, 64, 4, 3)],
    "dk": [(64, 64, 32, 8, 2), (128, 64, 32, 8, 2), (64, 64, 64, 8, 3), (64, 64, 32, 4, 1)],
    "dq": [(64, 64, 32, 8, 2), (128, 64, 32, 8, 2), (128, 32, 32, 8, 2), (64, 64, 64, 8, 3)],
    # BLOCK_DV is always the whole padded Ev here (the kernel needs it in one tile).
    "dkdv": [(64, 64, 0, 8, 2), (32, 64, 0, 8, 2), (64, 64, 0, 8, 3), (32, 64, 0, 4, 2)],
}


def fused_dkdv_fits(Ev: int, dtype: torch.dtype) -> bool:
    """Whether the one-pass dk + dv kernel applies on a GPU: 16-bit inputs whose padded Ev is one
    default value slice (<= 256). fp32 / fp64 use the split kernels: with fp32 operands ptxas
    spilled kilobytes per thread for the fused one even at Ev = 128."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    return max(16, triton.next_power_of_2(Ev)) <= _tiles(16, Ev, dtype, False)["BLOCK_DV"]


def _candidate_configs(kind: str, E: int, Ev: int, dtype: torch.dtype) -> list[dict]:
    """Launch settings to try for one kernel, the default (``_tiles``) first, no duplicates."""
    t = _tiles(E, Ev, dtype, False)
    chunked = kind in ("dk", "dq")
    full_ev = max(16, triton.next_power_of_2(Ev))
    first = dict(BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"],
                 BLOCK_DV=t["dv_chunk"] if chunked else full_ev if kind == "dkdv" else t["BLOCK_DV"],
                 num_warps=t["num_warps"], num_stages=t["num_stages"])
    configs = [first]
    if dtype == torch.float64:
        return configs
    cap = min(256 if dtype in (torch.float16, torch.bfloat16) else 128, full_ev)
    four_bytes = dtype == torch.float32
    for bm, bn, bdv, warps, stages in _CANDIDATES[kind]:
        bdv = full_ev if kind == "dkdv" else min(bdv, cap)
        c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=bdv, num_warps=warps, num_stages=stages)
        # fp32 tiles twice the bytes: ptxas spilled kilobytes for the larger ones at 4 warps.
        if four_bytes and max(bm, bn) * c["BLOCK_DV"] > (8192 if warps == 8 else 4096):
            continue
        if c not in configs:
            configs.append(c)
    return configs


def autotune_enabled() -> bool:
    """SAGAN_FAST_TRITON_AUTOTUNE=0 keeps the default launch settings (no timing on first use)."""
    return os.environ.get("SAGAN_FAST_TRITON_AUTOTUNE", "1") not in ("0", "")


_TUNED: dict[tuple, dict] = {}


_TUNED_MS: dict[tuple, float] = {}


def _launch(kind: str, kernel, grid, args: tuple, kwargs: dict, key: tuple, interpreted: bool,
            E: int, Ev: int, dtype: torch.dtype) -> None:
    """Launch ``kernel`` with the fastest candidate for ``key``, timed on first use on a GPU.

    Every kernel here writes its outputs without accumulating, so timing runs are harmless. A
    candidate that does not fit the card (registers, shared memory) is skipped; if all fail, the
    default runs and raises its error.
    """
    if interpreted:
        t = _tiles(E, Ev, dtype, True)
        block_dv = (t["dv_chunk"] if kind in ("dk", "dq") else
                    max(16, triton.next_power_of_2(Ev)) if kind == "dkdv" else t["BLOCK_DV"])
        config = dict(BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"], BLOCK_DV=block_dv,
                      num_warps=t["num_warps"], num_stages=t["num_stages"])
    else:
        config = _TUNED.get(key)
        if config is None:
            candidates = _candidate_configs(kind, E, Ev, dtype)
            config = candidates[0]
            if autotune_enabled() and len(candidates) > 1:
                from triton.testing import do_bench
                best = None
                for c in candidates:
                    try:
                        ms = do_bench(lambda: kernel[grid(c)](*args, **kwargs, **c), warmup=5, rep=20)
                    except Exception:  # noqa: BLE001 (out of resources / does not compile: not a candidate)
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, c)
                if best is not None:
                    _TUNED_MS[key], config = best
            _TUNED[key] = config
    kernel[grid(config)](*args, **kwargs, **config)


def _acc(dtype: torch.dtype):
    """The Triton type of :func:`accumulation_dtype` (accumulators, logsumexp, delta)."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")


def resolve_fp32_precision(fp32_precision: str | None) -> str:
    """The fp32 dot precision to use (see the module docstring), checked."""
    if fp32_precision is None:
        if torch.backends.cuda.matmul.allow_tf32:
            return "tf32"
        fp32_precision = os.environ.get("SAGAN_FAST_TRITON_FP32_PRECISION", "ieee").strip().lower() or "ieee"
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"triton sagan_attention: fp32_precision {fp32_precision!r} not one of "
                         f"{FP32_PRECISIONS}")
    return fp32_precision


def _input_precision(dtype: torch.dtype, fp32_precision: str) -> str:
    # "ieee" for every non-fp32 dtype: the setting only changes fp32 dots.
    return fp32_precision if dtype == torch.float32 else "ieee"


# ------------------------------------------------------------------------------------------------
# Host wrappers
# ------------------------------------------------------------------------------------------------

def check_backend_limits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What this backend needs beyond the generic checks of the public entry
    (:func:`sagan_fast.ops.attention.check_attention_inputs`, run there once per call)."""
    dev = q.device
    if dev.type != "cuda" and not (dev.type == "cpu" and triton_interpreter_enabled()):
        raise ValueError(f"triton sagan_attention: tensors must be on a CUDA device (or on the CPU with "
                         f"TRITON_INTERPRET=1), got {dev}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"triton sagan_attention: dtype {q.dtype} not supported; use one of {_DTYPES}")
    if dev.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError("triton sagan_attention: bfloat16 is not supported under the Triton CPU "
                        "interpreter (its bf16 dots are wrong); use float16 or float32 there")
    E, Ev = q.shape[2], v.shape[2]
    if q.shape[0] > MAX_BATCH:
        raise ValueError(f"triton sagan_attention: batch {q.shape[0]} exceeds {MAX_BATCH} (the batch is a "
                         "CUDA grid axis); split the batch")
    if E > MAX_E:
        raise ValueError(f"triton sagan_attention: query/key dim E={E} exceeds the supported {MAX_E}")
    if Ev > MAX_EV:
        raise ValueError(f"triton sagan_attention: value dim Ev={Ev} exceeds the supported {MAX_EV}")


def _empty_in_layout_of(like: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A dense (B, T, C) tensor, channel-major ((B, C, T) transposed) when ``like`` is one.

    ``like`` may be a non-dense view (a channel slice of a fused q/k/v projection): only the
    order of its token and channel strides matters, so the 1x1-conv side gets (B, C, T) back.
    """
    B, T, C = shape
    if like.stride(1) == 1 and like.stride(2) != 1 and like.shape[2] > 1:
        return torch.empty((B, C, T), dtype=like.dtype, device=like.device).transpose(1, 2)
    return torch.empty((B, T, C), dtype=like.dtype, device=like.device)


def _empty_out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, N, Ev) in v's layout, so ``out.transpose(1, 2).reshape(B, Ev, H, W)`` is free."""
    return _empty_in_layout_of(v, (q.shape[0], q.shape[1], v.shape[2]))


def _empty_grads(q, k, v):
    return tuple(_empty_in_layout_of(t, tuple(t.shape)) for t in (q, k, v))


def _grid_device(t: torch.Tensor):
    """Launch on the tensors' CUDA device (not the current one)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# Per tuning key of the fused kernel: whether it beat the split dv + dk kernels when timed.
_FUSED_DKDV: dict[tuple, bool] = {}


def _use_fused_dkdv(q, k, v, fp32_precision: str, interpreted: bool) -> bool:
    Ev = v.shape[2]
    if interpreted:   # Ev within one 32-wide interpreter tile: the tests cover both kernels
        return max(16, triton.next_power_of_2(Ev)) <= _tiles(q.shape[2], Ev, q.dtype, True)["BLOCK_DV"]
    if not fused_dkdv_fits(Ev, q.dtype):
        return False
    return _FUSED_DKDV.get(_tuning_key("dkdv", q, k, v, fp32_precision), True)


def _interpreted(t: torch.Tensor) -> bool:
    """CPU tensors run in the interpreter (check_backend_limits refused them otherwise): small fixed tiles."""
    return t.device.type == "cpu"


def _tuning_key(kind: str, q, k, v, fp32_precision: str) -> tuple:
    return (kind, q.device.index, q.dtype, fp32_precision, q.shape[1], k.shape[1], q.shape[2], v.shape[2])


def _forward(q, k, v, scale: float, fp32_precision: str):
    B, N, E = q.shape
    Nk, Ev = k.shape[1], v.shape[2]
    out = _empty_out(q, v)
    lse = torch.empty((B, N), dtype=accumulation_dtype(q.dtype), device=q.device)
    interpreted = _interpreted(q)
    block_e = _tiles(E, Ev, q.dtype, interpreted)["BLOCK_E"]

    def grid(c):
        return (triton.cdiv(N, c["BLOCK_M"]), triton.cdiv(Ev, c["BLOCK_DV"]), B)
    with _grid_device(q):
        _launch("fwd", _attn_fwd_kernel, grid,
                (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                 N, Nk, E, Ev, float(scale) * LOG2E),
                dict(BLOCK_E=block_e, INPUT_PRECISION=_input_precision(q.dtype, fp32_precision),
                     ACC=_acc(q.dtype)),
                _tuning_key("fwd", q, k, v, fp32_precision), interpreted, E, Ev, q.dtype)
    return out, lse


def _backward(dout, q, k, v, out, lse, scale: float, fp32_precision: str):
    B, N, E = q.shape
    Nk, Ev = k.shape[1], v.shape[2]
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    interpreted = _interpreted(q)
    t = _tiles(E, Ev, q.dtype, interpreted)
    fixed = dict(BLOCK_E=t["BLOCK_E"], INPUT_PRECISION=_input_precision(q.dtype, fp32_precision),
                 ACC=_acc(q.dtype))
    qk_scale_log2 = float(scale) * LOG2E
    delta = torch.empty((B, N), dtype=accumulation_dtype(q.dtype), device=q.device)
    dq, dk, dv = _empty_grads(q, k, v)

    def key_blocks(c):
        return (triton.cdiv(Nk, c["BLOCK_N"]), B)

    def query_blocks(c):
        return (triton.cdiv(N, c["BLOCK_M"]), B)

    def key_blocks_and_slices(c):
        return (triton.cdiv(Nk, c["BLOCK_N"]), triton.cdiv(Ev, c["BLOCK_DV"]), B)
    tuning = dict(interpreted=interpreted, E=E, Ev=Ev, dtype=q.dtype)
    with _grid_device(q):
        # delta is one streaming pass over O and dO: fixed settings.
        _attn_bwd_delta_kernel[(triton.cdiv(N, t["BLOCK_M"]), B)](
            out, dout, delta, *out.stride(), *dout.stride(), N, Ev,
            BLOCK_M=t["BLOCK_M"], BLOCK_DV=t["dv_chunk"], ACC=_acc(q.dtype), num_warps=4)

        def fused():
            _launch("dkdv", _attn_bwd_dkdv_kernel, key_blocks,
                    (q, k, v, dout, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(),
                     *dout.stride(), *dk.stride(), *dv.stride(), N, Nk, E, Ev, qk_scale_log2, float(scale)),
                    fixed, _tuning_key("dkdv", q, k, v, fp32_precision), **tuning)

        def split():
            _launch("dv", _attn_bwd_dv_kernel, key_blocks_and_slices,
                    (q, k, dout, lse, dv, *q.stride(), *k.stride(), *dout.stride(), *dv.stride(),
                     N, Nk, E, Ev, qk_scale_log2), fixed,
                    _tuning_key("dv", q, k, v, fp32_precision), **tuning)
            _launch("dk", _attn_bwd_dk_kernel, key_blocks,
                    (q, k, v, dout, lse, delta, dk, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
                     *dk.stride(), N, Nk, E, Ev, qk_scale_log2, float(scale)), fixed,
                    _tuning_key("dk", q, k, v, fp32_precision), **tuning)

        if not _use_fused_dkdv(q, k, v, fp32_precision, interpreted):
            split()
        elif interpreted or not autotune_enabled() or _tuning_key("dkdv", q, k, v, fp32_precision) in _TUNED:
            fused()
        else:
            # First use of this shape: tune both ways (each writes correct dk, dv), keep the faster.
            split()
            keys = [_tuning_key(kind, q, k, v, fp32_precision) for kind in ("dkdv", "dv", "dk")]
            try:
                fused()
            except Exception:  # noqa: BLE001 (no fused setting fits this card: split's results stand)
                _TUNED.pop(keys[0], None)
                _FUSED_DKDV[keys[0]] = False
            else:
                if all(key in _TUNED_MS for key in keys):
                    _FUSED_DKDV[keys[0]] = _TUNED_MS[keys[0]] <= _TUNED_MS[keys[1]] + _TUNED_MS[keys[2]]
        _launch("dq", _attn_bwd_dq_kernel, query_blocks,
                (q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
                 *dq.stride(), N, Nk, E, Ev, qk_scale_log2, float(scale)), fixed,
                _tuning_key("dq", q, k, v, fp32_precision), **tuning)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# torch.library registration (namespace sagan_fast_triton; the C++ extension owns sagan_fast)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("sagan_fast_triton::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  fp32_precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, N, Ev) in v's layout, lse (B, N): base-2 logsumexp of scale * q k^T, fp32 (fp64 for fp64))."""
    return _forward(q, k, v, scale, fp32_precision)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, fp32_precision):
    return _empty_out(q, v), q.new_empty((q.shape[0], q.shape[1]), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("sagan_fast_triton::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, scale: float,
                  fp32_precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each dense, channel-major where its input is a channel-major view."""
    if dout.shape != out.shape:
        raise ValueError(f"triton sagan_attention backward: grad shape {tuple(dout.shape)} != output "
                         f"shape {tuple(out.shape)}")
    return _backward(dout, q, k, v, out, lse, scale, fp32_precision)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, scale, fp32_precision):
    return _empty_grads(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, fp32_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.fp32_precision = scale, fp32_precision
    ctx.mark_non_differentiable(lse)


def _attention_fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, ctx.fp32_precision)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_attention_fwd_backward, setup_context=_setup_context)


def sagan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0, *,
                    fp32_precision: str | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v over keys, (B, N, E), (B, Nk, E), (B, Nk, Ev) -> (B, N, Ev).

    Differentiable in q, k and v (not twice). ``fp32_precision`` ("ieee", "tf32x3", "tf32"; fp32
    inputs only): see the module docstring; None follows torch's allow_tf32 flag, then
    SAGAN_FAST_TRITON_FP32_PRECISION, else "ieee".
    """
    check_backend_limits(q, k, v)
    out, _ = attention_fwd(q, k, v, float(scale), resolve_fp32_precision(fp32_precision))
    return out


def sagan_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0, *,
                             fp32_precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) with lse the natural-log logsumexp per query row (B, N), not differentiable.

    What the forward stores for the backward (in base 2), for tests and debugging.
    """
    check_backend_limits(q, k, v)
    out, lse2 = attention_fwd(q, k, v, float(scale), resolve_fp32_precision(fp32_precision))
    return out, lse2 * LN2
