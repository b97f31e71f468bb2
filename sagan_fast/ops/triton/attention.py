"""Memory-efficient SAGAN attention in Triton: out = softmax(scale * q k^T) v, forward and backward.

q (B, N, E), k (B, Nk, E), v (B, Nk, Ev) -> out (B, N, Ev); E != Ev (SAGAN: E = C/8, Ev = C or C/2).

Forward (flash-style): each program owns BLOCK_M query rows and one BLOCK_DV slice of the value
channels, streams the keys in blocks with an online softmax (exp2, fp32 statistics and
accumulator; fp64 for fp64) and writes its output slice plus one base-2 logsumexp per row. No
B x N x Nk tensor exists, forward or backward. When Ev needs several slices, each slice recomputes
q k^T: that costs E / BLOCK_DV of the p v work (E = 32 against 256 in SAGAN), cheaper than holding
a B x N x Ev accumulator. On a GPU 16-bit inputs default to 128 query rows and 8 warps: each warp
group owns 64 rows of every product (64-row tiles made both groups repeat q k^T).

Backward (recompute from the logsumexp, delta = rowsum(dO * O) first). The key-block kernels work
key-major (s^T = k q^T, so p^T and ds^T come out of one product in the layout the next product
takes, no transposed register tiles), and each program owns one key block:
- 16-bit inputs whose padded Ev fits one tile (<= 256): one kernel sums dv = p^T dO and
  dk = ds^T q (ds = p * (dO v^T - delta)) in one pass over the queries, and adds ds k to dq with
  fp32 atomics (relaxed; 16-bit dq goes through an fp32 buffer). Per key block and query block it
  computes q k^T, p^T dO, v dO^T, ds^T q, ds k: 3E + 2Ev multiply-adds per (query, key) pair
  against the forward's E + Ev, so fwd + bwd = 896 / 288 = 3.1x the forward at E=32, Ev=256
  (flash-attention's 3.5x is for E = Ev);
- otherwise (or when timing on the GPU finds it faster): dv per (key block, value slice), and dk
  (+ the same atomic dq) per key block with v dO^T reduced over Ev in chunks, so any Ev fits.
- With ``torch.use_deterministic_algorithms(True)`` dq has no atomics: a query-major kernel per
  query block sums ds k itself (recomputing q k^T and dO v^T: fwd + bwd = 4.1x the forward), so
  gradients are bitwise reproducible. That kernel reads its dO rows once, not once per key block,
  when Ev fits one tile.

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
(card, shape, layout, dtype) among a few candidates (``_CANDIDATES``), timed with
triton.testing.do_bench, and so is the backward path (fused or split);
SAGAN_FAST_TRITON_AUTOTUNE=0 keeps the first candidate. Under DDP, call
:func:`broadcast_tuning` once after the first step so every rank runs rank 0's choices.
``bench/kernel_resources.py`` compiles every candidate for sm_90 and reports its registers,
spills and shared memory. Under the interpreter one small fixed setting.

Registered as ``torch.ops.sagan_fast_triton.attention_fwd`` / ``attention_bwd`` (custom_op +
register_fake + register_autograd), so torch.compile traces it as one opaque op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Callable

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
def _key_major_p(k, q_base, offs_m, mask_m, offs_e, mask_e, mask_n, stride_qn, stride_qe, LSE_B,
                 qk_scale_log2, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """(q^T (BLOCK_E, BLOCK_M), p^T (BLOCK_N, BLOCK_M)) for one query block: p^T = exp2(k q^T - lse)
    with p = 0 on padded keys and rows (+inf lse on padded rows)."""
    q_t = tl.load(q_base + offs_e[:, None] * stride_qe + offs_m[None, :] * stride_qn,
                  mask=mask_e[:, None] & mask_m[None, :], other=0.0)
    lse2 = tl.load(LSE_B + offs_m, mask=mask_m, other=float("inf"))
    s_t = tl.dot(k, q_t, input_precision=INPUT_PRECISION, out_dtype=ACC) * qk_scale_log2
    p_t = tl.math.exp2(s_t - lse2[None, :])
    return q_t, tl.where(mask_n[:, None], p_t, 0.0)


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
    q_base = Q + off_b * stride_qb
    do_base = DO + off_b * stride_dob + offs_dv[None, :] * stride_doe
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        _, p_t = _key_major_p(k, q_base, offs_m, mask_m, offs_e, mask_e, mask_n, stride_qn, stride_qe,
                              LSE + off_b * N, qk_scale_log2, INPUT_PRECISION, ACC)
        do = tl.load(do_base + offs_m[:, None] * stride_don, mask=mask_m[:, None] & mask_dv[None, :],
                     other=0.0)
        acc += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION, out_dtype=ACC)
    tl.store(DV + off_b * stride_dvb + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dve,
             acc.to(DV.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])


@triton.jit
def _atomic_dq(ds_t, k, DQ_B, offs_m, mask_m, offs_e, mask_e, stride_dqn, stride_dqe, scale,
               INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dq[rows] += scale * ds k, relaxed fp32 (fp64) atomics: the key blocks' order is not fixed."""
    dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=INPUT_PRECISION, out_dtype=ACC) * scale
    tl.atomic_add(DQ_B + offs_m[:, None] * stride_dqn + offs_e[None, :] * stride_dqe, dq,
                  mask=mask_m[:, None] & mask_e[None, :], sem="relaxed")


@triton.jit
def _attn_bwd_dk_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DQ,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_dob, stride_don, stride_doe,
    stride_dkb, stride_dkn, stride_dke,
    stride_dqb, stride_dqn, stride_dqe,
    N, NK, E, EV, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    EV_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dk[cols] = scale * sum over query rows of ds^T q, ds = p * (dO v^T - delta), dO v^T reduced
    over Ev in BLOCK_DV chunks (v stays loaded when one chunk covers Ev); with ATOMIC_DQ also
    dq += scale * ds k."""
    pid_n = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_DV)
    mask_n = cols < NK
    mask_e = offs_e < E
    k = tl.load(K + off_b * stride_kb + cols[:, None] * stride_kn + offs_e[None, :] * stride_ke,
                mask=mask_n[:, None] & mask_e[None, :], other=0.0)
    v_base = V + off_b * stride_vb + cols[:, None] * stride_vn
    if BLOCK_DV >= EV_PAD:
        v = tl.load(v_base + offs_c[None, :] * stride_ve, mask=mask_n[:, None] & (offs_c < EV)[None, :],
                    other=0.0)
    q_base = Q + off_b * stride_qb
    do_base = DO + off_b * stride_dob
    acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q_t, p_t = _key_major_p(k, q_base, offs_m, mask_m, offs_e, mask_e, mask_n, stride_qn, stride_qe,
                                LSE + off_b * N, qk_scale_log2, INPUT_PRECISION, ACC)
        delta = tl.load(DELTA + off_b * N + offs_m, mask=mask_m, other=0.0)
        if BLOCK_DV >= EV_PAD:
            do_t = tl.load(do_base + offs_c[:, None] * stride_doe + offs_m[None, :] * stride_don,
                           mask=(offs_c < EV)[:, None] & mask_m[None, :], other=0.0)
            dp_t = tl.dot(v, do_t, input_precision=INPUT_PRECISION, out_dtype=ACC)
        else:
            dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
            for start_c in range(0, EV, BLOCK_DV):
                chunk = start_c + offs_c
                mask_c = chunk < EV
                v_c = tl.load(v_base + chunk[None, :] * stride_ve, mask=mask_n[:, None] & mask_c[None, :],
                              other=0.0)
                do_t = tl.load(do_base + chunk[:, None] * stride_doe + offs_m[None, :] * stride_don,
                               mask=mask_c[:, None] & mask_m[None, :], other=0.0)
                dp_t += tl.dot(v_c, do_t, input_precision=INPUT_PRECISION, out_dtype=ACC)
        ds_t = p_t * (dp_t - delta[None, :])
        acc += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=INPUT_PRECISION, out_dtype=ACC)
        if ATOMIC_DQ:
            _atomic_dq(ds_t, k, DQ + off_b * stride_dqb, offs_m, mask_m, offs_e, mask_e, stride_dqn,
                       stride_dqe, scale, INPUT_PRECISION, ACC)
    acc = acc * scale
    tl.store(DK + off_b * stride_dkb + cols[:, None] * stride_dkn + offs_e[None, :] * stride_dke,
             acc.to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_e[None, :])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kn, stride_ke,
    stride_vb, stride_vn, stride_ve,
    stride_dob, stride_don, stride_doe,
    stride_dkb, stride_dkn, stride_dke,
    stride_dvb, stride_dvn, stride_dve,
    stride_dqb, stride_dqn, stride_dqe,
    N, NK, E, EV, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """dk and dv of one key block in one pass over the queries, when Ev fits one BLOCK_DV tile:
    p and dO are computed / read once for both (the split dv + dk kernels do it twice); with
    ATOMIC_DQ also dq += scale * ds k."""
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
    q_base = Q + off_b * stride_qb
    do_base = DO + off_b * stride_dob + offs_c[None, :] * stride_doe
    acc_dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q_t, p_t = _key_major_p(k, q_base, offs_m, mask_m, offs_e, mask_e, mask_n, stride_qn, stride_qe,
                                LSE + off_b * N, qk_scale_log2, INPUT_PRECISION, ACC)
        do = tl.load(do_base + offs_m[:, None] * stride_don, mask=mask_m[:, None] & mask_c[None, :],
                     other=0.0)
        delta = tl.load(DELTA + off_b * N + offs_m, mask=mask_m, other=0.0)
        acc_dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION, out_dtype=ACC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC)
        ds_t = p_t * (dp_t - delta[None, :])
        acc_dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=INPUT_PRECISION, out_dtype=ACC)
        if ATOMIC_DQ:
            _atomic_dq(ds_t, k, DQ + off_b * stride_dqb, offs_m, mask_m, offs_e, mask_e, stride_dqn,
                       stride_dqe, scale, INPUT_PRECISION, ACC)
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
    EV_PAD: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dq[rows] = scale * sum over key blocks of ds k, no atomics (the deterministic path). dO of
    the rows is read once when one BLOCK_DV tile covers Ev, else in chunks per key block."""
    pid_m = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < N
    mask_e = offs_e < E
    q = tl.load(Q + off_b * stride_qb + offs_m[:, None] * stride_qn + offs_e[None, :] * stride_qe,
                mask=mask_m[:, None] & mask_e[None, :], other=0.0)
    lse2 = tl.load(LSE + off_b * N + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(DELTA + off_b * N + offs_m, mask=mask_m, other=0.0)
    do_base = DO + off_b * stride_dob + offs_m[:, None] * stride_don
    v_base = V + off_b * stride_vb
    if BLOCK_DV >= EV_PAD:
        do = tl.load(do_base + offs_c[None, :] * stride_doe, mask=mask_m[:, None] & (offs_c < EV)[None, :],
                     other=0.0)
    k_base = K + off_b * stride_kb + offs_e[None, :] * stride_ke
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < NK
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC) * qk_scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        if BLOCK_DV >= EV_PAD:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_c[None, :] * stride_ve,
                        mask=mask_n[:, None] & (offs_c < EV)[None, :], other=0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION, out_dtype=ACC)
        else:
            dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            for start_c in range(0, EV, BLOCK_DV):
                chunk = start_c + offs_c
                mask_c = chunk < EV
                do_c = tl.load(do_base + chunk[None, :] * stride_doe, mask=mask_m[:, None] & mask_c[None, :],
                               other=0.0)
                v_c = tl.load(v_base + cols[:, None] * stride_vn + chunk[None, :] * stride_ve,
                              mask=mask_n[:, None] & mask_c[None, :], other=0.0)
                dp += tl.dot(do_c, tl.trans(v_c), input_precision=INPUT_PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION, out_dtype=ACC)
    acc = acc * scale
    tl.store(DQ + off_b * stride_dqb + offs_m[:, None] * stride_dqn + offs_e[None, :] * stride_dqe,
             acc.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_e[None, :])


# ------------------------------------------------------------------------------------------------
# Launch settings
# ------------------------------------------------------------------------------------------------

# Launch candidates per kernel and dtype family on a GPU: (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps,
# num_stages), the first one the default. BLOCK_M counts query rows, BLOCK_N keys; for dk / dq
# BLOCK_DV is the chunk of the dO v^T reduction (a chunk >= the padded Ev keeps v / dO loaded),
# for dkdv it is always the padded Ev; BLOCK_DV is clamped to the padded Ev. Untimed guesses (no
# GPU when they were written), kept only if ptxas reports no register spill for sm_90 with the
# JIT's launch specialization (bench/kernel_resources.py) under both Triton versions we run: 3.8
# (CI) and 3.6 (the GPU machine; its ptxas 12.8 spills where 3.8's does not: the IEEE fp32 fwd
# tile with 2 stages, 36 B; fp32 dk 32 x 64, 16 B; bf16 dkdv 32 x 64 with 4 warps, 24-32 B). The
# set checked under both: every candidate at DESIGN.md's anchor shape in bf16 and IEEE fp32, both
# layouts, and the defaults of fp16, TF32, fp64 and of the 64x64 shape (``--ci``; the fp32 dk
# candidate also at every dot precision and both shapes). tests/test_kernel_resources.py holds
# it on CI's Triton. (Fused dk + dv tiles of 64 or 128 query rows spilled up to ~1 KB once dq
# moved in, so the fused kernel takes 16 or 32 query rows per step.) The key-block kernels put
# keys on the rows of every product: 128 keys with 8 warps, 64 with 4 (a warp group owns 64 rows
# of a wgmma).
_CANDIDATES = {
    "16bit": {
        "fwd": [(128, 64, 256, 8, 2), (128, 64, 128, 8, 2), (64, 64, 256, 8, 2), (64, 64, 128, 4, 3),
                (128, 32, 128, 4, 3), (64, 32, 64, 4, 3)],
        "dkdv": [(32, 128, 0, 8, 2), (16, 128, 0, 8, 2), (32, 128, 0, 8, 3), (16, 64, 0, 4, 2)],
        "dv": [(64, 128, 256, 8, 2), (64, 128, 128, 8, 2), (64, 64, 128, 4, 2), (32, 128, 256, 8, 2),
               (128, 128, 128, 8, 2)],
        "dk": [(64, 128, 256, 8, 2), (64, 128, 64, 8, 2), (64, 64, 64, 4, 2), (32, 128, 32, 8, 2)],
        "dq": [(128, 64, 256, 8, 2), (64, 64, 256, 4, 2), (128, 64, 64, 8, 2), (128, 32, 32, 8, 2),
               (64, 64, 64, 4, 3)],
    },
    # One list for the three dot precisions: tf32x3's three products per dot need the smallest
    # tiles, IEEE fp32 (FMA dots) the next.
    "fp32": {
        "fwd": [(64, 32, 128, 8, 3), (128, 32, 64, 8, 2), (64, 32, 64, 4, 2), (32, 32, 64, 4, 2)],
        "dv": [(64, 32, 128, 8, 2), (32, 64, 128, 8, 2), (64, 64, 128, 8, 2), (64, 64, 64, 4, 2)],
        "dk": [(16, 64, 16, 4, 2)],
        "dq": [(64, 32, 32, 4, 2), (64, 32, 16, 4, 2), (64, 64, 16, 4, 2)],
    },
    "fp64": {
        "fwd": [(32, 32, 64, 4, 1)],
        "dv": [(32, 32, 64, 4, 1)],
        "dk": [(32, 32, 32, 4, 1)],
        "dq": [(32, 32, 32, 4, 1)],
    },
}
# Fixed settings of the delta kernel (one streaming pass over O and dO) on a GPU.
_DELTA_GPU = dict(BLOCK_M=64, BLOCK_DV=64, num_warps=4, num_stages=2)
# Under the interpreter: 32-wide tiles, so the odd test shapes span several blocks and Ev = 40
# spans two value slices (and dO v^T two chunks).
_INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DV=32, num_warps=4, num_stages=1)


def _family(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    return "fp64" if dtype == torch.float64 else "fp32"


def _padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def fused_dkdv_fits(Ev: int, dtype: torch.dtype, interpreted: bool = False) -> bool:
    """Whether the one-pass dk + dv kernel applies: 16-bit inputs whose padded Ev fits one tile
    (<= 256) on a GPU; under the interpreter, any dtype whose Ev fits its 32-wide tile (so the
    tests run both kernels). fp32 / fp64 use the split kernels on a GPU: with fp32 operands the
    fused tile spilled ~80 KB per thread at Ev = 256 (ptxas -v, sm_90)."""
    if interpreted:
        return _padded(Ev) <= _INTERPRETER["BLOCK_DV"]
    return dtype in (torch.float16, torch.bfloat16) and _padded(Ev) <= 256


def _candidate_configs(kind: str, E: int, Ev: int, dtype: torch.dtype) -> list[dict]:
    """Launch settings to try for one kernel on a GPU, the default first, no duplicates."""
    full_ev = _padded(Ev)
    configs: list[dict] = []
    for bm, bn, bdv, warps, stages in _CANDIDATES[_family(dtype)][kind]:
        c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=full_ev if kind == "dkdv" else min(bdv, full_ev),
                 num_warps=warps, num_stages=stages)
        if c not in configs:
            configs.append(c)
    return configs


def autotune_enabled() -> bool:
    """SAGAN_FAST_TRITON_AUTOTUNE=0 keeps the default launch settings (no timing on first use)."""
    return os.environ.get("SAGAN_FAST_TRITON_AUTOTUNE", "1") not in ("0", "")


# Tuned settings per tuning key, their times (ms), and the backward path per path key.
_TUNED: dict[tuple, dict] = {}
_TUNED_MS: dict[tuple, float] = {}
_PATHS: dict[tuple, str] = {}


@dataclasses.dataclass
class Launch:
    """One kernel launch of a plan: what the GPU tuner times and bench/kernel_resources.py compiles.

    ``kind`` names the candidate list (fwd, dkdv, dv, dk, dq) or "delta" (fixed settings);
    ``constexprs`` are the compile-time arguments that do not depend on the candidate; ``zero``
    the buffers the kernel accumulates into (atomics), zeroed again after timing runs.
    """
    kind: str
    kernel: Any
    grid: Callable[[dict], tuple]
    args: tuple
    constexprs: dict
    key: tuple | None
    dims: tuple          # (B, N, Nk, E, Ev)
    dtype: torch.dtype
    zero: tuple = ()

    def candidates(self) -> list[dict]:
        if self.kind == "delta":
            return [dict(_DELTA_GPU, BLOCK_DV=min(_DELTA_GPU["BLOCK_DV"], _padded(self.dims[4])))]
        return _candidate_configs(self.kind, self.dims[3], self.dims[4], self.dtype)

    def interpreter_config(self) -> dict:
        c = dict(_INTERPRETER)
        if self.kind == "dkdv":
            c["BLOCK_DV"] = _padded(self.dims[4])
        if self.kind == "delta":
            c = {k: c[k] for k in ("BLOCK_M", "BLOCK_DV", "num_warps", "num_stages")}
        return c

    def label(self, config: dict) -> str:
        blocks = " ".join(f"{k.split('_')[1]}{config[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_DV")
                          if k in config)
        return f"{self.kind} {blocks} w{config['num_warps']} s{config['num_stages']}"

    def variant_suffix(self) -> str:
        return " +atomic dq" if self.constexprs.get("ATOMIC_DQ") else ""

    def run(self, config: dict) -> None:
        self.kernel[self.grid(config)](*self.args, **self.constexprs, **config)


def _run(launch: Launch, interpreted: bool) -> None:
    """Launch with the fastest candidate for its key, timed on first use on a GPU.

    A candidate that does not fit the card (registers, shared memory) is skipped; if all fail,
    the default runs and raises its error. Timing runs of an accumulating kernel are undone by
    zeroing its buffers before the real launch.
    """
    if interpreted:
        launch.run(launch.interpreter_config())
        return
    config = _TUNED.get(launch.key) if launch.key is not None else None
    if config is None:
        candidates = launch.candidates()
        config = candidates[0]
        if launch.key is not None and autotune_enabled() and len(candidates) > 1:
            from triton.testing import do_bench
            best = None
            for c in candidates:
                try:
                    ms = do_bench(lambda: launch.run(c), warmup=5, rep=20)
                except Exception:  # noqa: BLE001 (out of resources / does not compile: not a candidate)
                    continue
                if best is None or ms < best[0]:
                    best = (ms, c)
            if best is not None:
                _TUNED_MS[launch.key], config = best
            for t in launch.zero:
                t.zero_()
        if launch.key is not None:
            _TUNED[launch.key] = config
    launch.run(config)


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


def _channel_major(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(2) != 1 and t.shape[2] > 1


def _empty_in_layout_of(like: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype | None = None,
                        zeros: bool = False) -> torch.Tensor:
    """A dense (B, T, C) tensor, channel-major ((B, C, T) transposed) when ``like`` is one.

    ``like`` may be a non-dense view (a channel slice of a fused q/k/v projection): only the
    order of its token and channel strides matters, so the 1x1-conv side gets (B, C, T) back.
    """
    B, T, C = shape
    make = torch.zeros if zeros else torch.empty
    kw = dict(dtype=dtype or like.dtype, device=like.device)
    if _channel_major(like):
        return make((B, C, T), **kw).transpose(1, 2)
    return make((B, T, C), **kw)


def _empty_out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, N, Ev) in v's layout, so ``out.transpose(1, 2).reshape(B, Ev, H, W)`` is free."""
    return _empty_in_layout_of(v, (q.shape[0], q.shape[1], v.shape[2]))


def _empty_grads(q, k, v):
    return tuple(_empty_in_layout_of(t, tuple(t.shape)) for t in (q, k, v))


def _grid_device(t: torch.Tensor):
    """Launch on the tensors' CUDA device (not the current one)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _interpreted(t: torch.Tensor) -> bool:
    """CPU tensors run in the interpreter (check_backend_limits refused them otherwise): small fixed tiles."""
    return t.device.type == "cpu"


@functools.lru_cache(maxsize=None)
def _card(device_type: str, index: int | None) -> str:
    if device_type != "cuda":
        return device_type
    return torch.cuda.get_device_name(index)


def _tuning_key(kind: str, q, k, v, fp32_precision: str, *extra) -> tuple:
    """What a tuned setting depends on: the card (its name, so ranks of a DDP job share keys),
    dtype, dot precision, sizes and which of q, k, v are channel-major (other specializations)."""
    layout = "".join("c" if _channel_major(t) else "r" for t in (q, k, v))
    return (kind, _card(q.device.type, q.device.index), q.dtype, fp32_precision, q.shape[1], k.shape[1],
            q.shape[2], v.shape[2], layout, *extra)


def forward_plan(q, k, v, scale: float, fp32_precision: str):
    """(out, lse, [the forward launch]): out in v's layout, lse the base-2 logsumexp (B, N)."""
    B, N, E = q.shape
    Nk, Ev = k.shape[1], v.shape[2]
    out = _empty_out(q, v)
    lse = torch.empty((B, N), dtype=accumulation_dtype(q.dtype), device=q.device)

    def grid(c):
        return (triton.cdiv(N, c["BLOCK_M"]), triton.cdiv(Ev, c["BLOCK_DV"]), B)
    launch = Launch("fwd", _attn_fwd_kernel, grid,
                    (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                     N, Nk, E, Ev, float(scale) * LOG2E),
                    dict(BLOCK_E=_padded(E), INPUT_PRECISION=_input_precision(q.dtype, fp32_precision),
                         ACC=_acc(q.dtype)),
                    _tuning_key("fwd", q, k, v, fp32_precision), (B, N, Nk, E, Ev), q.dtype)
    return out, lse, [launch]


def _forward(q, k, v, scale: float, fp32_precision: str):
    out, lse, launches = forward_plan(q, k, v, scale, fp32_precision)
    with _grid_device(q):
        for launch in launches:
            _run(launch, _interpreted(q))
    return out, lse


def backward_paths(q, k, v, deterministic: bool | None = None) -> list[str]:
    """The backward paths a run may take for these inputs, the default first: "fused" (one dk + dv
    kernel) and / or "split" (dv and dk kernels), each with "+atomic-dq" or, when deterministic,
    "+dq-kernel". ``deterministic=None``: both dq variants (what bench/kernel_resources.py compiles)."""
    interpreted = _interpreted(q)
    kernels = (["fused"] if fused_dkdv_fits(v.shape[2], q.dtype, interpreted) else []) + ["split"]
    if interpreted and kernels[0] == "fused":
        kernels = ["fused"]
    modes = {None: ["atomic-dq", "dq-kernel"], False: ["atomic-dq"], True: ["dq-kernel"]}[deterministic]
    return [f"{kern}+{mode}" for kern in kernels for mode in modes]


@dataclasses.dataclass
class BackwardPlan:
    path: str
    grads: tuple            # (dq, dk, dv)
    launches: list
    dq_accumulator: torch.Tensor | None   # fp32 dq summed by atomics, copied into a 16-bit dq

    def finish(self) -> None:
        if self.dq_accumulator is not None:
            self.grads[0].copy_(self.dq_accumulator)


def backward_plan(dout, q, k, v, out, lse, scale: float, fp32_precision: str, path: str) -> BackwardPlan:
    """The launches of one backward path (see :func:`backward_paths`), with its outputs allocated."""
    B, N, E = q.shape
    Nk, Ev = k.shape[1], v.shape[2]
    kernels, mode = path.split("+")
    atomic = mode == "atomic-dq"
    acc_dtype = accumulation_dtype(q.dtype)
    qk_scale_log2 = float(scale) * LOG2E
    dims = (B, N, Nk, E, Ev)
    fixed = dict(BLOCK_E=_padded(E), INPUT_PRECISION=_input_precision(q.dtype, fp32_precision),
                 ACC=_acc(q.dtype))
    delta = torch.empty((B, N), dtype=acc_dtype, device=q.device)
    dq, dk, dv = _empty_grads(q, k, v)
    dq_acc = None
    if atomic:
        # The atomics add in the accumulation dtype: into dq itself when that is its dtype.
        dq = _empty_in_layout_of(q, tuple(q.shape), zeros=True) if acc_dtype == q.dtype else dq
        if acc_dtype != q.dtype:
            dq_acc = _empty_in_layout_of(q, tuple(q.shape), acc_dtype, zeros=True)
    dq_sum = dq if dq_acc is None else dq_acc

    def key(kind):
        dq_mode = "atomic-dq" if atomic and kind in ("dkdv", "dk") else ""
        return _tuning_key(kind, q, k, v, fp32_precision, dq_mode)

    def key_blocks(c):
        return (triton.cdiv(Nk, c["BLOCK_N"]), B)

    def query_blocks(c):
        return (triton.cdiv(N, c["BLOCK_M"]), B)

    def key_blocks_and_slices(c):
        return (triton.cdiv(Nk, c["BLOCK_N"]), triton.cdiv(Ev, c["BLOCK_DV"]), B)
    zero = (dq_sum,) if atomic else ()
    launches = [Launch("delta", _attn_bwd_delta_kernel, query_blocks,
                       (out, dout, delta, *out.stride(), *dout.stride(), N, Ev), dict(ACC=_acc(q.dtype)),
                       None, dims, q.dtype)]
    if kernels == "fused":
        launches.append(Launch(
            "dkdv", _attn_bwd_dkdv_kernel, key_blocks,
            (q, k, v, dout, lse, delta, dk, dv, dq_sum, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
             *dk.stride(), *dv.stride(), *dq_sum.stride(), N, Nk, E, Ev, qk_scale_log2, float(scale)),
            dict(fixed, ATOMIC_DQ=atomic), key("dkdv"), dims, q.dtype, zero))
    else:
        launches.append(Launch(
            "dv", _attn_bwd_dv_kernel, key_blocks_and_slices,
            (q, k, dout, lse, dv, *q.stride(), *k.stride(), *dout.stride(), *dv.stride(), N, Nk, E, Ev,
             qk_scale_log2), fixed, key("dv"), dims, q.dtype))
        launches.append(Launch(
            "dk", _attn_bwd_dk_kernel, key_blocks,
            (q, k, v, dout, lse, delta, dk, dq_sum, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
             *dk.stride(), *dq_sum.stride(), N, Nk, E, Ev, qk_scale_log2, float(scale)),
            dict(fixed, EV_PAD=_padded(Ev), ATOMIC_DQ=atomic), key("dk"), dims, q.dtype, zero))
    if not atomic:
        launches.append(Launch(
            "dq", _attn_bwd_dq_kernel, query_blocks,
            (q, k, v, dout, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
             *dq.stride(), N, Nk, E, Ev, qk_scale_log2, float(scale)),
            dict(fixed, EV_PAD=_padded(Ev)), key("dq"), dims, q.dtype))
    return BackwardPlan(path, (dq, dk, dv), launches, dq_acc)


def _run_plan(plan: BackwardPlan, interpreted: bool) -> BackwardPlan:
    for launch in plan.launches:
        _run(launch, interpreted)
    plan.finish()
    return plan


def _backward(dout, q, k, v, out, lse, scale: float, fp32_precision: str):
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    interpreted = _interpreted(q)
    paths = backward_paths(q, k, v, deterministic=torch.are_deterministic_algorithms_enabled())
    with _grid_device(q):
        if interpreted:
            path = paths[0]
        else:
            path_key = _tuning_key("bwd-path", q, k, v, fp32_precision, paths[0].split("+")[1])
            path = _PATHS.get(path_key)
            if path is None:
                path = paths[0]
                if len(paths) > 1 and autotune_enabled():
                    # First use of this shape: run (and so tune) every path, keep the fastest total.
                    totals = {}
                    for p in paths:
                        try:
                            plan = _run_plan(backward_plan(dout, q, k, v, out, lse, scale, fp32_precision, p),
                                             interpreted)
                        except Exception:  # noqa: BLE001 (no setting of this path fits this card)
                            continue
                        totals[p] = sum(_TUNED_MS.get(x.key, math.inf) for x in plan.launches if x.key)
                    if totals:
                        path = min(totals, key=totals.get)
                _PATHS[path_key] = path
        plan = _run_plan(backward_plan(dout, q, k, v, out, lse, scale, fp32_precision, path), interpreted)
    return plan.grads


# ------------------------------------------------------------------------------------------------
# Tuning tables across processes (DDP: every rank runs rank 0's choices)
# ------------------------------------------------------------------------------------------------

def export_tuning() -> dict:
    """The tuned launch settings and backward paths of this process (picklable)."""
    return {"configs": [(key, dict(cfg)) for key, cfg in _TUNED.items()], "paths": list(_PATHS.items())}


def import_tuning(table: dict, *, replace: bool = True) -> int:
    """Use ``table`` (from :func:`export_tuning`, maybe of another process); ``replace`` drops this
    process's own choices first. Returns the number of entries now held."""
    if not isinstance(table, dict) or set(table) != {"configs", "paths"}:
        raise ValueError("import_tuning: expected the dict export_tuning() returns, with keys 'configs' "
                         "and 'paths'")
    if replace:
        _TUNED.clear()
        _TUNED_MS.clear()
        _PATHS.clear()
    _TUNED.update((tuple(key), dict(cfg)) for key, cfg in table["configs"])
    _PATHS.update((tuple(key), str(path)) for key, path in table["paths"])
    return len(_TUNED) + len(_PATHS)


def broadcast_tuning(src: int = 0, group=None) -> int:
    """Every rank takes rank ``src``'s tuned settings (torch.distributed.broadcast_object_list), so
    all ranks run the same kernels. A no-op without an initialized process group of 2+ ranks.
    Call it on every rank after a step has run the attention shapes (the first step tunes them),
    and again if new shapes appear. Returns the number of entries held afterwards."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return len(_TUNED) + len(_PATHS)
    payload = [export_tuning() if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src, group=group)
    if dist.get_rank() == src:
        return len(_TUNED) + len(_PATHS)
    return import_tuning(payload[0], replace=True)


# ------------------------------------------------------------------------------------------------
# FLOP and byte counts per launch (what bench/attention.py prints next to the times)
# ------------------------------------------------------------------------------------------------

def launch_costs(launch: Launch, config: dict | None = None) -> dict:
    """Dot FLOPs and global-memory bytes of one launch with ``config`` (default: the tuned or first
    candidate). ``bytes``: what its programs load and store (tiles re-read by several programs
    count each time: L2 serves most of them); ``atomic_bytes``: fp32 atomic adds (read-modify-write
    in L2). Useful work only: padding of E / Ev to tile sizes is not counted."""
    if config is None:
        config = _TUNED.get(launch.key) if launch.key is not None else None
        config = config or launch.candidates()[0]
    B, N, Nk, E, Ev = launch.dims
    s = torch.empty((), dtype=launch.dtype).element_size()
    a = torch.empty((), dtype=accumulation_dtype(launch.dtype)).element_size()
    bm, bn, bdv = config.get("BLOCK_M"), config.get("BLOCK_N"), config.get("BLOCK_DV")
    pairs = 2.0 * B * N * Nk   # 2 FLOPs per multiply-add, per (query, key) pair and unit of dim
    atomic = bool(launch.constexprs.get("ATOMIC_DQ"))
    atomic_bytes = float(B * math.ceil(Nk / bn) * N * E * a) if atomic else 0.0
    if launch.kind == "fwd":
        slices = math.ceil(Ev / bdv)
        flops = pairs * (E * slices + Ev)
        programs = B * math.ceil(N / bm) * slices
        nbytes = programs * (bm * E + Nk * (E + bdv)) * s + B * N * (Ev * s + a)
    elif launch.kind == "delta":
        flops = 2.0 * B * N * Ev
        nbytes = B * N * (2 * Ev * s + a)
    elif launch.kind == "dkdv":
        flops = pairs * (2 * E + 2 * Ev + (E if atomic else 0))
        programs = B * math.ceil(Nk / bn)
        nbytes = programs * (N * ((E + Ev) * s + 2 * a)) + B * Nk * 2 * (E + Ev) * s
    elif launch.kind == "dv":
        slices = math.ceil(Ev / bdv)
        flops = pairs * (E * slices + Ev)
        programs = B * math.ceil(Nk / bn) * slices
        nbytes = programs * (bn * E * s + N * ((E + bdv) * s + a)) + B * Nk * Ev * s
    elif launch.kind == "dk":
        flops = pairs * (2 * E + Ev + (E if atomic else 0))
        programs = B * math.ceil(Nk / bn)
        v_reads = 1 if bdv >= _padded(Ev) else math.ceil(N / bm)
        nbytes = programs * (bn * E * s + v_reads * bn * Ev * s + N * ((E + Ev) * s + 2 * a)) + B * Nk * E * s
    elif launch.kind == "dq":
        flops = pairs * (2 * E + Ev)
        programs = B * math.ceil(N / bm)
        do_reads = 1 if bdv >= _padded(Ev) else math.ceil(Nk / bn)
        per_program = bm * (E * s + 2 * a) + do_reads * bm * Ev * s + Nk * (E + Ev) * s
        nbytes = programs * per_program + B * N * E * s
    else:
        raise ValueError(f"launch_costs: unknown kind {launch.kind!r}")
    return dict(kernel=launch.kernel.__name__ + launch.variant_suffix(), config=launch.label(config),
                flops=flops, bytes=float(nbytes), atomic_bytes=atomic_bytes)


def plan_costs(q, k, v, *, backward_path: str | None = None, fp32_precision: str = "ieee") -> list[dict]:
    """launch_costs of the forward and of one backward path (default: the first of
    :func:`backward_paths` for the current determinism setting) for inputs shaped like q, k, v
    (any device, meta included), with the tuned or default settings. The 16-bit atomic path's
    fp32 -> dq copy is one more row ("dq copy")."""
    out, lse, fwd = forward_plan(q, k, v, 1.0, fp32_precision)
    path = backward_path or backward_paths(q, k, v, torch.are_deterministic_algorithms_enabled())[0]
    plan = backward_plan(torch.empty_like(out), q, k, v, out, lse, 1.0, fp32_precision, path)
    rows = [dict(launch_costs(x), phase="fwd") for x in fwd]
    rows += [dict(launch_costs(x), phase="bwd") for x in plan.launches]
    if plan.dq_accumulator is not None:
        B, N, E = q.shape
        rows.append(dict(kernel="dq copy (fp32 -> dq dtype)", config="torch copy_", flops=0.0,
                         bytes=float(B * N * E * (plan.dq_accumulator.element_size() + q.element_size())),
                         atomic_bytes=0.0, phase="bwd"))
    for r in rows:
        r["path"] = "forward" if r["phase"] == "fwd" else path
    return rows


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
    SAGAN_FAST_TRITON_FP32_PRECISION, else "ieee". Gradients are bitwise reproducible under
    ``torch.use_deterministic_algorithms(True)`` (dq without atomics).
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
