// Flash-style SAGAN attention, forward and backward. See sagan_fast_kernels.h for the API.
//
// Forward (grid: query tiles x Ev chunks x batch), two passes over the key tiles so that the
// output accumulator needs no rescaling and stays in registers (WMMA fragments cannot be scaled
// per row: their element layout is opaque):
//   pass 1: S = Q K^T, running max m and sum l per row -> lse = m + log l;
//   pass 2: S = Q K^T again, P = exp(scale S - lse), O += P V (registers across key tiles).
// Pass 1 costs E / (E + Ev) of the work again (11% at E=32, Ev=256); the Ev chunk is a grid
// dimension so O stays small for Ev up to 512, S recomputed once per chunk.
//
// Backward by recomputation from lse, in three kernels that each own their output tile:
//   delta = rowsum(dO * O);  P = exp(scale S - lse);  dP = dO V^T;  dS = scale P (dP - delta)
//   dq kernel (query tiles): dQ = sum over key tiles of dS K
//   dk kernel (key tiles):   dK = sum over query tiles of dS^T Q
//   dv kernel (key tiles x Ev chunks): dV = sum over query tiles of P^T dO
// dQ, dK, dV and the dP of a tile pair (summed over Ev chunks) are register accumulators; S, P,
// dP and dS go through shared memory for the elementwise steps. No atomics: deterministic.
//
// The tiles a kernel streams (K, V in the forward; the moving side in the backward) are double
// buffered: the next tiles' loads are issued (cp.async for whole 16-byte aligned unit-stride rows,
// plain loads otherwise) before the current ones are used.
//
// Tiles live in shared memory, zero-padded to multiples of 16 (E to Epad, Ev chunks to 16), with
// out-of-range keys masked to probability 0. Products of tiles: WMMA 16x16x16 on tensor cores for
// fp16/bf16 (fp32 accumulation), plain loops for fp32/fp64 (CUDA cores, no TF32).
#include <cuda_pipeline.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace sagan_fast {
namespace kernels {
namespace {

using detail::ceil_div;
using detail::TypeOps;
template <typename T>
using Acc_t = typename TypeOps<T>::Acc;

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Tiles {
  static constexpr bool kTensorCores = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
  static constexpr int BM = kTensorCores ? 64 : 32;     // query rows per tile
  static constexpr int BN = kTensorCores ? 64 : 32;     // key rows per tile
  static constexpr int kEvChunkForward = std::is_same<T, double>::value ? 64 : 128;
  static constexpr int kEvChunkBackward = std::is_same<T, double>::value ? 32 : 64;
  // Row padding of shared tiles: WMMA needs 16-byte multiples (8 halves, 4 floats); the scalar
  // path pads by one element so that column walks do not hit one bank.
  static constexpr int kPad = kTensorCores ? 8 : 1;
  static constexpr int kPadAcc = kTensorCores ? 4 : 1;
};

__host__ __device__ inline int round16(int64_t x) { return int((x + 15) / 16 * 16); }

// ------------------------------------------------------------------------------------------------
// Shared-memory carving: every buffer starts 128-byte aligned (WMMA wants 32, cp.async 16).
// ------------------------------------------------------------------------------------------------
struct SmemCarver {
  unsigned char* base;
  size_t offset = 0;
  template <typename U>
  __device__ U* take(size_t count) {
    offset = (offset + 127) / 128 * 128;
    U* p = reinterpret_cast<U*>(base + offset);
    offset += count * sizeof(U);
    return p;
  }
};
// The same arithmetic on the host, to size the dynamic shared memory.
struct SmemSizer {
  size_t offset = 0;
  template <typename U>
  void take(size_t count) {
    offset = (offset + 127) / 128 * 128;
    offset += count * sizeof(U);
  }
};

// ------------------------------------------------------------------------------------------------
// Products of shared tiles. A_ROW: A(i, k) = A[i * lda + k], else A[k * lda + i]; B_ROW:
// B(k, j) = B[k * ldb + j], else B[j * ldb + k]. M, N, K multiples of 16 (4 on the scalar path).
// ------------------------------------------------------------------------------------------------

// C[M x N] = A[M x K] * B[K x N] into shared memory (a tile result the elementwise steps read).
// Callers sync before and after.
template <typename T, bool A_ROW, bool B_ROW>
__device__ void block_gemm(Acc_t<T>* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K) {
  if constexpr (Tiles<T>::kTensorCores) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    using ALayout = typename std::conditional<A_ROW, wmma::row_major, wmma::col_major>::type;
    using BLayout = typename std::conditional<B_ROW, wmma::row_major, wmma::col_major>::type;
    const int warp = threadIdx.x >> 5;
    const int tiles_n = N / 16;
    for (int t = warp; t < (M / 16) * tiles_n; t += kWarps) {
      const int i0 = (t / tiles_n) * 16, j0 = (t % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.0f);
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
        wmma::load_matrix_sync(a, A_ROW ? A + i0 * lda + k0 : A + k0 * lda + i0, lda);
        wmma::load_matrix_sync(b, B_ROW ? B + k0 * ldb + j0 : B + j0 * ldb + k0, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + i0 * ldc + j0, c, ldc, wmma::mem_row_major);
    }
#else
    __trap();  // bf16/fp16 tensor-core tiles need sm_80+; the host refuses older devices
#endif
  } else {
    // Each thread owns a 1 x 4 strip of C (adjacent columns): A(i, k) is loaded once per 4 FMAs.
    using Acc = Acc_t<T>;
    const int strips = M * (N / 4);
    for (int s = threadIdx.x; s < strips; s += kThreads) {
      const int i = s / (N / 4), j = (s % (N / 4)) * 4;
      Acc acc[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
      for (int k = 0; k < K; ++k) {
        const Acc a = TypeOps<T>::to_acc(A_ROW ? A[i * lda + k] : A[k * lda + i]);
#pragma unroll
        for (int x = 0; x < 4; ++x)
          acc[x] += a * TypeOps<T>::to_acc(B_ROW ? B[k * ldb + j + x] : B[(j + x) * ldb + k]);
      }
#pragma unroll
      for (int x = 0; x < 4; ++x) C[i * ldc + j + x] = acc[x];
    }
  }
}

// A block's M x (up to N_MAX) accumulator held in registers across many products (the block's
// output tile): each warp keeps the WMMA fragments of its 16 x 16 tiles, or each thread its 1 x 4
// strips on the scalar path. Only the first `cols` columns (a multiple of 16, fixed for the life
// of the accumulator) are used, spread over all warps / threads. Fragment and strip indices are
// compile-time (loops fully unrolled with a runtime bound), so nothing goes to local memory.
template <typename T, int M, int N_MAX>
struct RegisterTile {
  using Acc = Acc_t<T>;
  static constexpr bool kTC = Tiles<T>::kTensorCores;
  static constexpr int kPerWarp = (M / 16) * (N_MAX / 16) / kWarps;      // fragments per warp (TC)
  static constexpr int kPerThread = M * (N_MAX / 4) / kThreads;          // strips per thread (scalar)
  static_assert(!kTC || (M / 16) * (N_MAX / 16) % kWarps == 0, "tiles must split evenly over the warps");
  static_assert(kTC || M * (N_MAX / 4) % kThreads == 0, "strips must split evenly over the threads");
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using Frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
#else
  struct Frag {};
#endif
  struct Empty {};
  typename std::conditional<kTC, Frag, Empty>::type frag[kTC ? kPerWarp : 1];
  Acc strip[kTC ? 1 : kPerThread][4];
  int cols;

  __device__ explicit RegisterTile(int cols_) : cols(cols_) { zero(); }

  __device__ void zero() {
    if constexpr (kTC) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#pragma unroll
      for (int f = 0; f < kPerWarp; ++f) nvcuda::wmma::fill_fragment(frag[f], 0.0f);
#endif
    } else {
#pragma unroll
      for (int s = 0; s < kPerThread; ++s)
#pragma unroll
        for (int x = 0; x < 4; ++x) strip[s][x] = Acc(0);
    }
  }

  // this += A[M x K] * B[K x cols] from shared memory. Callers sync before (tiles loaded).
  template <bool A_ROW, bool B_ROW>
  __device__ void mma(const T* A, int lda, const T* B, int ldb, int K) {
    if constexpr (kTC) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
      using namespace nvcuda;
      using ALayout = typename std::conditional<A_ROW, wmma::row_major, wmma::col_major>::type;
      using BLayout = typename std::conditional<B_ROW, wmma::row_major, wmma::col_major>::type;
      const int warp = threadIdx.x >> 5, tiles_n = cols / 16, tiles = (M / 16) * tiles_n;
#pragma unroll
      for (int f = 0; f < kPerWarp; ++f) {
        const int t = warp + f * kWarps;
        if (t < tiles) {
          const int i0 = (t / tiles_n) * 16, j0 = (t % tiles_n) * 16;
          for (int k0 = 0; k0 < K; k0 += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
            wmma::load_matrix_sync(a, A_ROW ? A + i0 * lda + k0 : A + k0 * lda + i0, lda);
            wmma::load_matrix_sync(b, B_ROW ? B + k0 * ldb + j0 : B + j0 * ldb + k0, ldb);
            wmma::mma_sync(frag[f], a, b, frag[f]);
          }
        }
      }
#endif
    } else {
      const int per_row = cols / 4, strips = M * per_row;
#pragma unroll
      for (int s = 0; s < kPerThread; ++s) {
        const int idx = int(threadIdx.x) + s * kThreads;
        if (idx < strips) {
          const int i = idx / per_row, j = (idx % per_row) * 4;
          for (int k = 0; k < K; ++k) {
            const Acc a = TypeOps<T>::to_acc(A_ROW ? A[i * lda + k] : A[k * lda + i]);
#pragma unroll
            for (int x = 0; x < 4; ++x)
              strip[s][x] += a * TypeOps<T>::to_acc(B_ROW ? B[k * ldb + j + x] : B[(j + x) * ldb + k]);
          }
        }
      }
    }
  }

  // C[M x cols] = this, into shared memory (to be read by all threads after a sync).
  __device__ void store(Acc* C, int ldc) const {
    if constexpr (kTC) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
      const int warp = threadIdx.x >> 5, tiles_n = cols / 16, tiles = (M / 16) * tiles_n;
#pragma unroll
      for (int f = 0; f < kPerWarp; ++f) {
        const int t = warp + f * kWarps;
        if (t < tiles)
          nvcuda::wmma::store_matrix_sync(C + (t / tiles_n) * 16 * ldc + (t % tiles_n) * 16, frag[f], ldc,
                                          nvcuda::wmma::mem_row_major);
      }
#endif
    } else {
      const int per_row = cols / 4, strips = M * per_row;
#pragma unroll
      for (int s = 0; s < kPerThread; ++s) {
        const int idx = int(threadIdx.x) + s * kThreads;
        if (idx < strips) {
          const int i = idx / per_row, j = (idx % per_row) * 4;
#pragma unroll
          for (int x = 0; x < 4; ++x) C[i * ldc + j + x] = strip[s][x];
        }
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Global <-> shared tiles
// ------------------------------------------------------------------------------------------------

// Load rows [0, rows) x cols [0, cols) of a strided tensor into a shared tile (ld), zero outside
// [0, valid_rows) x [0, valid_cols). Whole unit-stride 16-byte aligned rows (the usual 16-bit
// case with E and the Ev chunk multiples of 8) go by cp.async, 16 bytes a copy, and land when the
// caller waits for them (__pipeline_wait_prior, then __syncthreads); other layouts are read by
// plain loads, walking the unit-stride dimension fastest so global reads coalesce.
template <typename T>
__device__ void load_tile(T* dst, int ld, const T* src, int64_t stride_row, int64_t stride_col, int rows, int cols,
                          int valid_rows, int valid_cols) {
  constexpr int kVec = 16 / int(sizeof(T));
  if (stride_col == 1 && valid_cols == cols && cols % kVec == 0 && ld % kVec == 0 && stride_row % kVec == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    const int vecs_per_row = cols / kVec;
    for (int idx = threadIdx.x; idx < rows * vecs_per_row; idx += kThreads) {
      const int i = idx / vecs_per_row, j = (idx % vecs_per_row) * kVec;
      if (i < valid_rows)
        __pipeline_memcpy_async(dst + i * ld + j, src + i * stride_row + j, 16);
      else  // zero bits are 0.0 in every dtype
        *reinterpret_cast<uint4*>(dst + i * ld + j) = make_uint4(0u, 0u, 0u, 0u);
    }
    return;
  }
  const T zero = TypeOps<T>::from_acc(Acc_t<T>(0));
  const bool rows_fastest = stride_row == 1 && stride_col != 1;
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int i = rows_fastest ? idx % rows : idx / cols;
    const int j = rows_fastest ? idx / rows : idx % cols;
    dst[i * ld + j] = (i < valid_rows && j < valid_cols) ? src[i * stride_row + j * stride_col] : zero;
  }
}

template <typename T>
__device__ void store_tile(T* dst, int64_t stride_row, int64_t stride_col, const Acc_t<T>* srcacc, int ld,
                           int valid_rows, int valid_cols) {
  const bool rows_fastest = stride_row == 1 && stride_col != 1;
  for (int idx = threadIdx.x; idx < valid_rows * valid_cols; idx += kThreads) {
    const int i = rows_fastest ? idx % valid_rows : idx / valid_cols;
    const int j = rows_fastest ? idx / valid_rows : idx % valid_cols;
    dst[i * stride_row + j * stride_col] = TypeOps<T>::from_acc(srcacc[i * ld + j]);
  }
}

// Double buffering: stage s + 1's loads are issued (and committed as one cp.async group) before
// stage s is used; waiting for all but the newest group then completes stage s.
__device__ inline void stage_issued() { __pipeline_commit(); }
__device__ inline void stage_ready(bool next_issued) {
  if (next_issued)
    __pipeline_wait_prior(1);
  else
    __pipeline_wait_prior(0);
  __syncthreads();  // every thread's copies (and plain stores) of this stage are visible
}

struct Geometry {  // computed on the host, passed by value
  int64_t B, N, Nk, E, Ev;
  int Epad;
  int ev_chunk;
  double scale;
};

template <typename T>
struct View {
  const T* data;
  int64_t sb, sr, sc;
  __device__ const T* batch(int64_t b) const { return data + b * sb; }
};
template <typename T>
struct MutView {
  T* data;
  int64_t sb, sr, sc;
};

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename T>
size_t forward_smem_bytes(int Epad, int ev_chunk) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  SmemSizer s;
  s.take<T>(size_t(C::BM) * (Epad + C::kPad));                 // Q
  for (int buf = 0; buf < 2; ++buf) s.take<T>(size_t(C::BN) * (Epad + C::kPad));      // K x 2
  s.take<T>(2 * size_t(C::BN) * (ev_chunk + C::kPad));    // V x 2 (the O staging at the end)
  s.take<Acc>(size_t(C::BM) * (C::BN + C::kPadAcc));           // S
  s.take<T>(size_t(C::BM) * (C::BN + C::kPad));                // P
  s.take<Acc>(3 * size_t(C::BM));                               // m, l, lse
  return s.offset;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(Geometry g, View<T> q, View<T> k, View<T> v,
                                                                     MutView<T> out, Acc_t<T>* lse) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  constexpr int kChunk = C::kEvChunkForward;
  SAGAN_DYNAMIC_SMEM(smem_raw);
  const int64_t b = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.x) * C::BM;
  const int64_t ev0 = int64_t(blockIdx.y) * kChunk;
  const int ev_valid = int(min(int64_t(kChunk), g.Ev - ev0));
  const int ev_pad = round16(ev_valid);
  const int q_valid = int(min(int64_t(C::BM), g.N - q0));
  const int ldq = g.Epad + C::kPad, ldv = kChunk + C::kPad, lds = C::BN + C::kPadAcc, ldp = C::BN + C::kPad,
            ldo = kChunk + C::kPadAcc;

  SmemCarver sm{smem_raw};
  T* sQ = sm.take<T>(size_t(C::BM) * ldq);
  T* sK[2] = {sm.take<T>(size_t(C::BN) * ldq), sm.take<T>(size_t(C::BN) * ldq)};
  T* v_region = sm.take<T>(2 * size_t(C::BN) * ldv);
  T* sV[2] = {v_region, v_region + size_t(C::BN) * ldv};
  Acc* sS = sm.take<Acc>(size_t(C::BM) * lds);
  T* sP = sm.take<T>(size_t(C::BM) * ldp);
  Acc* sM = sm.take<Acc>(3 * size_t(C::BM));
  Acc* sL = sM + C::BM;
  Acc* sLse = sL + C::BM;
  // The output staging reuses the V buffers once the key loop is done.
  static_assert(2 * C::BN * (kChunk + C::kPad) * sizeof(T) >= C::BM * (kChunk + C::kPadAcc) * sizeof(Acc),
                "the O staging must fit in the two V buffers");
  Acc* sO = reinterpret_cast<Acc*>(v_region);

  // Stages 0..T-1: pass 1 (K tiles); T..2T-1: pass 2 (K and V tiles).
  const int tiles = int(ceil_div(g.Nk, C::BN));
  auto issue = [&](int stage) {
    const int64_t k0 = int64_t(stage % tiles) * C::BN;
    const int k_valid = int(min(int64_t(C::BN), g.Nk - k0));
    load_tile(sK[stage & 1], ldq, k.batch(b) + k0 * k.sr, k.sr, k.sc, C::BN, g.Epad, k_valid, int(g.E));
    if (stage >= tiles)
      load_tile(sV[stage & 1], ldv, v.batch(b) + k0 * v.sr + ev0 * v.sc, v.sr, v.sc, C::BN, ev_pad, k_valid,
                ev_valid);
    stage_issued();
  };
  load_tile(sQ, ldq, q.batch(b) + q0 * q.sr, q.sr, q.sc, C::BM, g.Epad, q_valid, int(g.E));
  for (int i = threadIdx.x; i < C::BM; i += kThreads) {
    sM[i] = -INFINITY;
    sL[i] = 0;
  }
  issue(0);  // Q rides in the same cp.async group as stage 0
  const Acc scale = Acc(g.scale);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  RegisterTile<T, C::BM, kChunk> o(ev_pad);

  for (int stage = 0; stage < 2 * tiles; ++stage) {
    const bool next = stage + 1 < 2 * tiles;
    if (next) issue(stage + 1);
    stage_ready(next);
    const int64_t k0 = int64_t(stage % tiles) * C::BN;
    const int k_valid = int(min(int64_t(C::BN), g.Nk - k0));
    block_gemm<T, true, false>(sS, lds, sQ, ldq, sK[stage & 1], ldq, C::BM, C::BN, g.Epad);  // S = Q K^T
    __syncthreads();
    if (stage < tiles) {
      // Pass 1: online max and sum, one warp per row. k_valid >= 1: every row gets a finite max.
      for (int i = warp; i < C::BM; i += kWarps) {
        Acc row_max = -INFINITY;
        for (int j = lane; j < k_valid; j += 32) row_max = max(row_max, sS[i * lds + j] * scale);
        row_max = detail::warp_max(row_max);
        const Acc m_new = max(sM[i], row_max);
        Acc row_sum = 0;
        for (int j = lane; j < k_valid; j += 32) row_sum += detail::acc_exp(sS[i * lds + j] * scale - m_new);
        row_sum = detail::warp_sum(row_sum);
        if (lane == 0) {
          sL[i] = sL[i] * detail::acc_exp(sM[i] - m_new) + row_sum;  // exp(-inf) = 0 on the first tile
          sM[i] = m_new;
          if (stage == tiles - 1) sLse[i] = m_new + detail::acc_log(sL[i]);
        }
      }
    } else {
      // Pass 2: the final probabilities, then O += P V in registers.
      for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += kThreads) {
        const int i = idx / C::BN, j = idx % C::BN;
        const Acc p = j < k_valid ? detail::acc_exp(sS[i * lds + j] * scale - sLse[i]) : Acc(0);
        sP[i * ldp + j] = TypeOps<T>::from_acc(p);
      }
      __syncthreads();
      o.template mma<true, true>(sP, ldp, sV[stage & 1], ldv, C::BN);
    }
    __syncthreads();  // this stage's buffers are free for stage + 2
  }
  o.store(sO, ldo);
  __syncthreads();
  store_tile(out.data + b * out.sb + q0 * out.sr + ev0 * out.sc, out.sr, out.sc, sO, ldo, q_valid, ev_valid);
  if (blockIdx.y == 0)
    for (int i = threadIdx.x; i < q_valid; i += kThreads) lse[b * g.N + q0 + i] = sLse[i];
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// delta[b, i] = sum_e dO[b, i, e] * O[b, i, e], one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(Geometry g, View<T> out, View<T> grad_out,
                                                                   Acc_t<T>* delta) {
  using Acc = Acc_t<T>;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= g.B * g.N) return;
  const int64_t b = row / g.N, i = row % g.N;
  const T* o = out.batch(b) + i * out.sr;
  const T* d = grad_out.batch(b) + i * grad_out.sr;
  Acc acc = 0;
  for (int64_t e = lane; e < g.Ev; e += 32) acc += TypeOps<T>::to_acc(o[e * out.sc]) * TypeOps<T>::to_acc(d[e * grad_out.sc]);
  acc = detail::warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

template <typename T>
size_t dq_dk_smem_bytes(int Epad, int ev_chunk) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  static_assert(C::BM == C::BN, "the dq and dk kernels share one layout");
  SmemSizer s;
  for (int buf = 0; buf < 3; ++buf) s.take<T>(size_t(C::BM) * (Epad + C::kPad));     // own Q or K, moving x 2
  s.take<T>(4 * size_t(C::BM) * (ev_chunk + C::kPad));  // V, dO chunks x 2 (the output staging at the end)
  s.take<Acc>(size_t(C::BM) * (C::BN + C::kPadAcc));  // S
  s.take<Acc>(size_t(C::BM) * (C::BN + C::kPadAcc));  // dP
  s.take<T>(size_t(C::BM) * (C::BN + C::kPad));       // dS
  s.take<Acc>(4 * size_t(C::BM));                      // lse, delta x 2
  return s.offset;
}

// __launch_bounds__(.., 2): two blocks per SM, what the shared memory allows anyway; with the
// thread count alone nvcc 13's ptxas held the fp32 dk kernel to 128 registers and spilled.
// kQueryTiles = true: the dq kernel (a block per query tile, loops over key tiles).
// kQueryTiles = false: the dk kernel (a block per key tile, loops over query tiles).
// Stages: (loop tile t, Ev chunk e), e fastest. A stage loads the moving side's tile when e = 0
// (K for dq; Q, lse, delta for dk) and the Ev chunk e of V and dO; with a single chunk the
// block's own one (dO for dq, V for dk) is loaded once.
template <typename T, bool kQueryTiles>
__global__ void __launch_bounds__(kThreads, 2) attention_dq_dk_kernel(Geometry g, View<T> q, View<T> k, View<T> v,
                                                                   View<T> grad_out, const Acc_t<T>* lse,
                                                                   const Acc_t<T>* delta, MutView<T> grad) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  SAGAN_DYNAMIC_SMEM(smem_raw);
  const int64_t b = blockIdx.z;
  const int ldq = g.Epad + C::kPad, ldv = g.ev_chunk + C::kPad, lds = C::BN + C::kPadAcc, ldp = C::BN + C::kPad,
            lda = g.Epad + C::kPadAcc;
  SmemCarver sm{smem_raw};
  T* sOwn = sm.take<T>(size_t(C::BM) * ldq);  // Q (dq) or K (dk) of the block's tile
  T* sMov[2] = {sm.take<T>(size_t(C::BM) * ldq), sm.take<T>(size_t(C::BM) * ldq)};
  T* chunk_region = sm.take<T>(4 * size_t(C::BM) * ldv);
  T* sV[2] = {chunk_region, chunk_region + size_t(C::BM) * ldv};
  T* sDO[2] = {chunk_region + 2 * size_t(C::BM) * ldv, chunk_region + 3 * size_t(C::BM) * ldv};
  Acc* sS = sm.take<Acc>(size_t(C::BM) * lds);
  Acc* sDP = sm.take<Acc>(size_t(C::BM) * lds);
  T* sDS = sm.take<T>(size_t(C::BM) * ldp);
  Acc* sStats = sm.take<Acc>(4 * size_t(C::BM));  // lse[2], delta[2] (per query-tile buffer)
  // The output staging reuses the chunk buffers once the loop is done.
  static_assert(4 * C::BM * (C::kEvChunkBackward + C::kPad) * sizeof(T) >=
                    C::BM * (kMaxHeadDim + C::kPadAcc) * sizeof(Acc),
                "the dQ / dK staging must fit in the chunk buffers");
  Acc* sOut = reinterpret_cast<Acc*>(chunk_region);

  const int64_t own0 = int64_t(blockIdx.x) * C::BM;  // first row of the tile this block owns
  const int64_t own_len = kQueryTiles ? g.N : g.Nk;
  const int64_t loop_len = kQueryTiles ? g.Nk : g.N;
  const int own_valid = int(min(int64_t(C::BM), own_len - own0));
  const int chunks = int(ceil_div(g.Ev, g.ev_chunk));
  const int tiles = int(ceil_div(loop_len, C::BM));

  auto load_stats = [&](Acc* dst, int64_t q0, int q_valid) {  // lse, delta of query rows (plain loads)
    for (int i = threadIdx.x; i < C::BM; i += kThreads) {
      dst[i] = i < q_valid ? lse[b * g.N + q0 + i] : Acc(0);
      dst[2 * C::BM + i] = i < q_valid ? delta[b * g.N + q0 + i] : Acc(0);
    }
  };
  auto issue = [&](int stage) {
    // Chunk buffers alternate per stage, moving-side tiles per loop tile (chunks may be even).
    const int t = stage / chunks, e = stage % chunks, buf = stage & 1;
    const int64_t t0 = int64_t(t) * C::BM, e0 = int64_t(e) * g.ev_chunk;
    const int t_valid = int(min(int64_t(C::BM), loop_len - t0));
    const int e_valid = int(min(int64_t(g.ev_chunk), g.Ev - e0)), e_pad = round16(e_valid);
    const int64_t q0 = kQueryTiles ? own0 : t0, k0 = kQueryTiles ? t0 : own0;
    const int q_valid = kQueryTiles ? own_valid : t_valid, k_valid = kQueryTiles ? t_valid : own_valid;
    if (e == 0) {
      if (kQueryTiles) {
        load_tile(sMov[t & 1], ldq, k.batch(b) + k0 * k.sr, k.sr, k.sc, C::BN, g.Epad, k_valid, int(g.E));
      } else {
        load_tile(sMov[t & 1], ldq, q.batch(b) + q0 * q.sr, q.sr, q.sc, C::BM, g.Epad, q_valid, int(g.E));
        load_stats(sStats + (t & 1) * C::BM, q0, q_valid);
      }
    }
    // The moving side's chunk every stage; the own side's chunk only if there are several.
    if (!kQueryTiles || chunks > 1 || stage == 0)
      load_tile(sDO[buf], ldv, grad_out.batch(b) + q0 * grad_out.sr + e0 * grad_out.sc, grad_out.sr, grad_out.sc,
                C::BM, e_pad, q_valid, e_valid);
    if (kQueryTiles || chunks > 1 || stage == 0)
      load_tile(sV[buf], ldv, v.batch(b) + k0 * v.sr + e0 * v.sc, v.sr, v.sc, C::BN, e_pad, k_valid, e_valid);
    stage_issued();
  };

  if (kQueryTiles) {
    load_tile(sOwn, ldq, q.batch(b) + own0 * q.sr, q.sr, q.sc, C::BM, g.Epad, own_valid, int(g.E));
    load_stats(sStats, own0, own_valid);
  } else {
    load_tile(sOwn, ldq, k.batch(b) + own0 * k.sr, k.sr, k.sc, C::BN, g.Epad, own_valid, int(g.E));
  }
  issue(0);
  const Acc scale = Acc(g.scale);
  RegisterTile<T, C::BM, int(kMaxHeadDim)> acc(g.Epad);  // dQ or dK of the block's tile
  RegisterTile<T, C::BM, C::BN> dp(C::BN);           // dO V^T of one tile pair, summed over Ev chunks

  for (int stage = 0; stage < tiles * chunks; ++stage) {
    const bool next = stage + 1 < tiles * chunks;
    if (next) issue(stage + 1);
    stage_ready(next);
    const int t = stage / chunks, e = stage % chunks;
    const int buf = stage & 1, own_buf = chunks > 1 ? buf : 0;
    const int64_t t0 = int64_t(t) * C::BM;
    const int t_valid = int(min(int64_t(C::BM), loop_len - t0));
    const int q_valid = kQueryTiles ? own_valid : t_valid, k_valid = kQueryTiles ? t_valid : own_valid;
    const int e_pad = round16(min(int64_t(g.ev_chunk), g.Ev - int64_t(e) * g.ev_chunk));
    const T* sQ = kQueryTiles ? sOwn : sMov[t & 1];
    const T* sK = kQueryTiles ? sMov[t & 1] : sOwn;
    const T* v_chunk = sV[kQueryTiles ? buf : own_buf];
    const T* do_chunk = sDO[kQueryTiles ? own_buf : buf];
    if (e == 0) dp.zero();
    dp.template mma<true, false>(do_chunk, ldv, v_chunk, ldv, e_pad);  // dP += dO V^T
    if (e == chunks - 1) {
      const Acc* sLse = sStats + (kQueryTiles ? 0 : (t & 1) * C::BM);
      const Acc* sDelta = sLse + 2 * C::BM;
      block_gemm<T, true, false>(sS, lds, sQ, ldq, sK, ldq, C::BM, C::BN, g.Epad);  // S = Q K^T
      dp.store(sDP, lds);
      __syncthreads();
      for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += kThreads) {
        const int i = idx / C::BN, j = idx % C::BN;
        Acc ds = 0;
        if (i < q_valid && j < k_valid) {
          const Acc p = detail::acc_exp(sS[i * lds + j] * scale - sLse[i]);
          ds = scale * p * (sDP[i * lds + j] - sDelta[i]);
        }
        sDS[i * ldp + j] = TypeOps<T>::from_acc(ds);
      }
      __syncthreads();
      if (kQueryTiles)
        acc.template mma<true, true>(sDS, ldp, sK, ldq, C::BN);   // dQ += dS K
      else
        acc.template mma<false, true>(sDS, ldp, sQ, ldq, C::BM);  // dK += dS^T Q
    }
    __syncthreads();  // this stage's buffers are free for stage + 2
  }
  acc.store(sOut, lda);
  __syncthreads();
  store_tile(grad.data + b * grad.sb + own0 * grad.sr, grad.sr, grad.sc, sOut, lda, own_valid, int(g.E));
}

template <typename T>
size_t dv_smem_bytes(int Epad, int ev_chunk) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  SmemSizer s;
  for (int buf = 0; buf < 2; ++buf) s.take<T>(size_t(C::BM) * (Epad + C::kPad));       // Q x 2
  s.take<T>(size_t(C::BN) * (Epad + C::kPad));                                          // K
  for (int buf = 0; buf < 2; ++buf) s.take<T>(size_t(C::BM) * (ev_chunk + C::kPad));   // dO chunk x 2
  s.take<Acc>(size_t(C::BM) * (C::BN + C::kPadAcc));   // S (the dV staging at the end, with P)
  s.take<T>(size_t(C::BM) * (C::BN + C::kPad));        // P
  s.take<Acc>(2 * size_t(C::BM));                       // lse x 2
  s.take<Acc>(size_t(C::BN) * (ev_chunk + C::kPadAcc)); // dV staging
  return s.offset;
}

// A block per (key tile, Ev chunk): dV = sum over query tiles of P^T dO.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_dv_kernel(Geometry g, View<T> q, View<T> k, View<T> grad_out,
                                                                const Acc_t<T>* lse, MutView<T> grad_v) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  constexpr int kChunk = C::kEvChunkBackward;
  SAGAN_DYNAMIC_SMEM(smem_raw);
  const int64_t b = blockIdx.z;
  const int64_t k0 = int64_t(blockIdx.x) * C::BN;
  const int64_t e0 = int64_t(blockIdx.y) * kChunk;
  const int k_valid = int(min(int64_t(C::BN), g.Nk - k0));
  const int e_valid = int(min(int64_t(kChunk), g.Ev - e0));
  const int e_pad = round16(e_valid);
  const int ldq = g.Epad + C::kPad, ldv = kChunk + C::kPad, lds = C::BN + C::kPadAcc, ldp = C::BN + C::kPad,
            lda = kChunk + C::kPadAcc;
  SmemCarver sm{smem_raw};
  T* sQ[2] = {sm.take<T>(size_t(C::BM) * ldq), sm.take<T>(size_t(C::BM) * ldq)};
  T* sK = sm.take<T>(size_t(C::BN) * ldq);
  T* sDO[2] = {sm.take<T>(size_t(C::BM) * ldv), sm.take<T>(size_t(C::BM) * ldv)};
  Acc* sS = sm.take<Acc>(size_t(C::BM) * lds);
  T* sP = sm.take<T>(size_t(C::BM) * ldp);
  Acc* sLse = sm.take<Acc>(2 * size_t(C::BM));
  Acc* sOut = sm.take<Acc>(size_t(C::BN) * lda);

  const int tiles = int(ceil_div(g.N, C::BM));
  auto issue = [&](int t) {
    const int64_t q0 = int64_t(t) * C::BM;
    const int q_valid = int(min(int64_t(C::BM), g.N - q0));
    load_tile(sQ[t & 1], ldq, q.batch(b) + q0 * q.sr, q.sr, q.sc, C::BM, g.Epad, q_valid, int(g.E));
    load_tile(sDO[t & 1], ldv, grad_out.batch(b) + q0 * grad_out.sr + e0 * grad_out.sc, grad_out.sr, grad_out.sc,
              C::BM, e_pad, q_valid, e_valid);
    for (int i = threadIdx.x; i < C::BM; i += kThreads)
      sLse[(t & 1) * C::BM + i] = i < q_valid ? lse[b * g.N + q0 + i] : Acc(0);
    stage_issued();
  };
  load_tile(sK, ldq, k.batch(b) + k0 * k.sr, k.sr, k.sc, C::BN, g.Epad, k_valid, int(g.E));
  issue(0);
  const Acc scale = Acc(g.scale);
  RegisterTile<T, C::BN, kChunk> acc(e_pad);
  for (int t = 0; t < tiles; ++t) {
    const bool next = t + 1 < tiles;
    if (next) issue(t + 1);
    stage_ready(next);
    const int q_valid = int(min(int64_t(C::BM), g.N - int64_t(t) * C::BM));
    const Acc* lse_t = sLse + (t & 1) * C::BM;
    block_gemm<T, true, false>(sS, lds, sQ[t & 1], ldq, sK, ldq, C::BM, C::BN, g.Epad);  // S = Q K^T
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += kThreads) {
      const int i = idx / C::BN, j = idx % C::BN;
      const Acc p = (i < q_valid && j < k_valid) ? detail::acc_exp(sS[i * lds + j] * scale - lse_t[i]) : Acc(0);
      sP[i * ldp + j] = TypeOps<T>::from_acc(p);
    }
    __syncthreads();
    acc.template mma<false, true>(sP, ldp, sDO[t & 1], ldv, C::BM);  // dV += P^T dO
    __syncthreads();  // this stage's buffers are free for stage + 2
  }
  acc.store(sOut, lda);
  __syncthreads();
  store_tile(grad_v.data + b * grad_v.sb + k0 * grad_v.sr + e0 * grad_v.sc, grad_v.sr, grad_v.sc, sOut, lda, k_valid,
             e_valid);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
template <typename Kernel>
cudaError_t prepare_smem(Kernel kernel, size_t bytes) {
  int device = 0, max_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (bytes > size_t(max_optin)) return cudaErrorInvalidConfiguration;
  if (bytes > 48 * 1024) return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  return cudaSuccess;
}

bool problem_ok(const AttentionProblem& p) {
  return p.B >= 1 && p.B <= 65535 && p.N >= 1 && p.Nk >= 1 && p.E >= 1 && p.E <= kMaxHeadDim && p.Ev >= 1 &&
         p.N <= (int64_t(1) << 40) && p.Nk <= (int64_t(1) << 40);
}

template <typename T>
Geometry geometry(const AttentionProblem& p, int ev_chunk) {
  return Geometry{p.B, p.N, p.Nk, p.E, p.Ev, round16(p.E), ev_chunk, p.scale};
}

template <typename T>
View<T> view(Strided3 s) { return View<T>{static_cast<const T*>(s.data), s.stride_b, s.stride_row, s.stride_col}; }
template <typename T>
MutView<T> mut_view(MutableStrided3 s) { return MutView<T>{static_cast<T*>(s.data), s.stride_b, s.stride_row, s.stride_col}; }

bool tensor_core_device_ok() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

template <typename T>
cudaError_t forward_impl(const AttentionProblem& p, Strided3 q, Strided3 k, Strided3 v, MutableStrided3 out, void* lse,
                         cudaStream_t stream) {
  using C = Tiles<T>;
  if (C::kTensorCores && !tensor_core_device_ok()) return cudaErrorInvalidDevice;
  const Geometry g = geometry<T>(p, C::kEvChunkForward);
  const size_t smem = forward_smem_bytes<T>(g.Epad, g.ev_chunk);
  cudaError_t err = prepare_smem(attention_forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(ceil_div(p.N, C::BM)), unsigned(ceil_div(p.Ev, g.ev_chunk)), unsigned(p.B));
  attention_forward_kernel<T><<<grid, kThreads, smem, stream>>>(g, view<T>(q), view<T>(k), view<T>(v), mut_view<T>(out),
                                                               static_cast<Acc_t<T>*>(lse));
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const AttentionProblem& p, Strided3 q, Strided3 k, Strided3 v, Strided3 out,
                          Strided3 grad_out, const void* lse, MutableStrided3 grad_q, MutableStrided3 grad_k,
                          MutableStrided3 grad_v, void* workspace, cudaStream_t stream) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  if (C::kTensorCores && !tensor_core_device_ok()) return cudaErrorInvalidDevice;
  const Geometry g = geometry<T>(p, C::kEvChunkBackward);
  Acc* delta = static_cast<Acc*>(workspace);
  const Acc* lse_acc = static_cast<const Acc*>(lse);

  attention_delta_kernel<T><<<unsigned(ceil_div(p.B * p.N, kWarps)), kThreads, 0, stream>>>(g, view<T>(out),
                                                                                             view<T>(grad_out), delta);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const size_t smem_qk = dq_dk_smem_bytes<T>(g.Epad, g.ev_chunk);
  if ((err = prepare_smem(attention_dq_dk_kernel<T, true>, smem_qk)) != cudaSuccess) return err;
  if ((err = prepare_smem(attention_dq_dk_kernel<T, false>, smem_qk)) != cudaSuccess) return err;
  attention_dq_dk_kernel<T, true><<<dim3(unsigned(ceil_div(p.N, C::BM)), 1, unsigned(p.B)), kThreads, smem_qk, stream>>>(
      g, view<T>(q), view<T>(k), view<T>(v), view<T>(grad_out), lse_acc, delta, mut_view<T>(grad_q));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  attention_dq_dk_kernel<T, false><<<dim3(unsigned(ceil_div(p.Nk, C::BN)), 1, unsigned(p.B)), kThreads, smem_qk, stream>>>(
      g, view<T>(q), view<T>(k), view<T>(v), view<T>(grad_out), lse_acc, delta, mut_view<T>(grad_k));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const size_t smem_v = dv_smem_bytes<T>(g.Epad, g.ev_chunk);
  if ((err = prepare_smem(attention_dv_kernel<T>, smem_v)) != cudaSuccess) return err;
  const dim3 grid_v(unsigned(ceil_div(p.Nk, C::BN)), unsigned(ceil_div(p.Ev, g.ev_chunk)), unsigned(p.B));
  attention_dv_kernel<T><<<grid_v, kThreads, smem_v, stream>>>(g, view<T>(q), view<T>(k), view<T>(grad_out), lse_acc,
                                                               mut_view<T>(grad_v));
  return cudaGetLastError();
}

}  // namespace

cudaError_t sagan_attention_forward(const AttentionProblem& p, Strided3 q, Strided3 k, Strided3 v,
                                    MutableStrided3 out, void* lse, cudaStream_t stream) {
  if (!problem_ok(p) || !q.data || !k.data || !v.data || !out.data || !lse) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat16: return forward_impl<__half>(p, q, k, v, out, lse, stream);
    case DType::kBFloat16: return forward_impl<__nv_bfloat16>(p, q, k, v, out, lse, stream);
    case DType::kFloat32: return forward_impl<float>(p, q, k, v, out, lse, stream);
    case DType::kFloat64: return forward_impl<double>(p, q, k, v, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

size_t sagan_attention_backward_workspace_bytes(const AttentionProblem& p) {
  return size_t(p.B * p.N) * acc_size(p.dtype);  // delta
}

size_t sagan_attention_shared_bytes(const AttentionProblem& p, AttentionKernel which) {
  const int Epad = round16(p.E);
  auto pick = [&](auto tag) -> size_t {
    using T = decltype(tag);
    switch (which) {
      case AttentionKernel::kForward: return forward_smem_bytes<T>(Epad, Tiles<T>::kEvChunkForward);
      case AttentionKernel::kDqDk: return dq_dk_smem_bytes<T>(Epad, Tiles<T>::kEvChunkBackward);
      case AttentionKernel::kDv: return dv_smem_bytes<T>(Epad, Tiles<T>::kEvChunkBackward);
    }
    return 0;
  };
  switch (p.dtype) {
    case DType::kFloat16: return pick(__half{});
    case DType::kBFloat16: return pick(__nv_bfloat16{});
    case DType::kFloat32: return pick(float{});
    case DType::kFloat64: return pick(double{});
  }
  return 0;
}

cudaError_t sagan_attention_backward(const AttentionProblem& p, Strided3 q, Strided3 k, Strided3 v, Strided3 out,
                                     Strided3 grad_out, const void* lse, MutableStrided3 grad_q,
                                     MutableStrided3 grad_k, MutableStrided3 grad_v, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream) {
  if (!problem_ok(p) || !q.data || !k.data || !v.data || !out.data || !grad_out.data || !lse || !grad_q.data ||
      !grad_k.data || !grad_v.data || !workspace || workspace_bytes < sagan_attention_backward_workspace_bytes(p))
    return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat16:
      return backward_impl<__half>(p, q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, workspace, stream);
    case DType::kBFloat16:
      return backward_impl<__nv_bfloat16>(p, q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, workspace, stream);
    case DType::kFloat32:
      return backward_impl<float>(p, q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, workspace, stream);
    case DType::kFloat64:
      return backward_impl<double>(p, q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace sagan_fast
