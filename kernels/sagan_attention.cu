// Flash-style SAGAN attention, forward and backward. See sagan_fast_kernels.h for the API.
//
// Forward (grid: query tiles x Ev chunks x batch): for each key tile, S = Q K^T, online softmax
// (running max m and sum l per row), O = O * alpha + P V; at the end O / l and lse = m + log l.
// The Ev chunk is a grid dimension so the fp32 O accumulator of a block stays small for Ev up to
// 512; S is recomputed once per chunk (E << Ev in SAGAN, so that costs E/Ev of the P V work).
//
// Backward by recomputation from lse, in three kernels that each own their output tile:
//   delta = rowsum(dO * O);  P = exp(scale S - lse);  dP = dO V^T;  dS = scale P (dP - delta)
//   dq kernel (query tiles): dQ = sum over key tiles of dS K
//   dk kernel (key tiles):   dK = sum over query tiles of dS^T Q
//   dv kernel (key tiles x Ev chunks): dV = sum over query tiles of P^T dO
// No atomics, so results are deterministic.
//
// Tiles live in shared memory, zero-padded to multiples of 16 (E to Epad, Ev chunks to 16), with
// out-of-range keys masked to probability 0. Products of tiles: WMMA 16x16x16 on tensor cores for
// fp16/bf16 (fp32 accumulation), plain loops for fp32/fp64 (CUDA cores, no TF32).
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
// Shared-memory carving: every buffer starts 128-byte aligned (WMMA wants 32).
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
// Block-level products of shared tiles: C[M x N] (+)= A[M x K] * B[K x N], all multiples of 16.
// A_ROW: A(i, k) = A[i * lda + k], else A[k * lda + i]; B_ROW: B(k, j) = B[k * ldb + j], else
// B[j * ldb + k]. C is row-major in the accumulation type. Callers sync before and after.
// ------------------------------------------------------------------------------------------------
template <typename T, bool A_ROW, bool B_ROW>
__device__ void block_gemm(Acc_t<T>* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K,
                           bool accumulate) {
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
      if (accumulate)
        wmma::load_matrix_sync(c, C + i0 * ldc + j0, ldc, wmma::mem_row_major);
      else
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
      Acc acc[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) acc[x] = accumulate ? C[i * ldc + j + x] : Acc(0);
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

// Load rows [row0, row0 + rows) x cols [col0, col0 + cols) of one batch of a strided tensor into a
// shared tile (ld), zero outside [0, valid_rows) x [0, valid_cols) of the tile. Walks the
// unit-stride dimension fastest so global reads coalesce for row-major and transposed inputs.
template <typename T>
__device__ void load_tile(T* dst, int ld, const T* src, int64_t stride_row, int64_t stride_col, int rows, int cols,
                          int valid_rows, int valid_cols) {
  // Fast path: whole rows of unit-stride, 16-byte aligned data (the usual 16-bit case with E and
  // the Ev chunk multiples of 8): 16-byte loads and stores. Zero bits are 0.0 in every dtype.
  constexpr int kVec = 16 / int(sizeof(T));
  if (stride_col == 1 && valid_cols == cols && cols % kVec == 0 && ld % kVec == 0 && stride_row % kVec == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    const int vecs_per_row = cols / kVec;
    for (int idx = threadIdx.x; idx < rows * vecs_per_row; idx += kThreads) {
      const int i = idx / vecs_per_row, j = (idx % vecs_per_row) * kVec;
      uint4 bits = make_uint4(0u, 0u, 0u, 0u);
      if (i < valid_rows) bits = *reinterpret_cast<const uint4*>(src + i * stride_row + j);
      *reinterpret_cast<uint4*>(dst + i * ld + j) = bits;
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
  s.take<T>(size_t(C::BM) * (Epad + C::kPad));           // Q
  s.take<T>(size_t(C::BN) * (Epad + C::kPad));           // K
  s.take<T>(size_t(C::BN) * (ev_chunk + C::kPad));       // V chunk
  s.take<Acc>(size_t(C::BM) * (C::BN + C::kPadAcc));     // S
  s.take<T>(size_t(C::BM) * (C::BN + C::kPad));          // P
  s.take<Acc>(size_t(C::BM) * (ev_chunk + C::kPadAcc));  // O
  s.take<Acc>(3 * size_t(C::BM));                         // m, l, alpha
  return s.offset;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(Geometry g, View<T> q, View<T> k, View<T> v,
                                                                     MutView<T> out, Acc_t<T>* lse) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  SAGAN_DYNAMIC_SMEM(smem_raw);
  const int64_t b = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.x) * C::BM;
  const int64_t ev0 = int64_t(blockIdx.y) * g.ev_chunk;
  const int ev_valid = int(min(int64_t(g.ev_chunk), g.Ev - ev0));
  const int ev_pad = round16(ev_valid);
  const int q_valid = int(min(int64_t(C::BM), g.N - q0));
  const int ldq = g.Epad + C::kPad, ldv = g.ev_chunk + C::kPad, lds = C::BN + C::kPadAcc, ldp = C::BN + C::kPad,
            ldo = g.ev_chunk + C::kPadAcc;

  SmemCarver sm{smem_raw};
  T* sQ = sm.take<T>(size_t(C::BM) * ldq);
  T* sK = sm.take<T>(size_t(C::BN) * ldq);
  T* sV = sm.take<T>(size_t(C::BN) * ldv);
  Acc* sS = sm.take<Acc>(size_t(C::BM) * lds);
  T* sP = sm.take<T>(size_t(C::BM) * ldp);
  Acc* sO = sm.take<Acc>(size_t(C::BM) * ldo);
  Acc* sM = sm.take<Acc>(C::BM);
  Acc* sL = sM + C::BM;
  Acc* sAlpha = sL + C::BM;

  load_tile(sQ, ldq, q.batch(b) + q0 * q.sr, q.sr, q.sc, C::BM, g.Epad, q_valid, int(g.E));
  for (int idx = threadIdx.x; idx < C::BM * ev_pad; idx += kThreads) sO[(idx / ev_pad) * ldo + idx % ev_pad] = 0;
  for (int i = threadIdx.x; i < C::BM; i += kThreads) {
    sM[i] = -INFINITY;
    sL[i] = 0;
  }
  const Acc scale = Acc(g.scale);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  for (int64_t k0 = 0; k0 < g.Nk; k0 += C::BN) {
    const int k_valid = int(min(int64_t(C::BN), g.Nk - k0));
    __syncthreads();  // previous tile's readers of sK, sV, sP are done
    load_tile(sK, ldq, k.batch(b) + k0 * k.sr, k.sr, k.sc, C::BN, g.Epad, k_valid, int(g.E));
    load_tile(sV, ldv, v.batch(b) + k0 * v.sr + ev0 * v.sc, v.sr, v.sc, C::BN, ev_pad, k_valid, ev_valid);
    __syncthreads();
    block_gemm<T, true, false>(sS, lds, sQ, ldq, sK, ldq, C::BM, C::BN, g.Epad, false);  // S = Q K^T
    __syncthreads();
    // Online softmax, one warp per row. k_valid >= 1, so every row gets a finite new max.
    for (int i = warp; i < C::BM; i += kWarps) {
      Acc row_max = -INFINITY;
      for (int j = lane; j < k_valid; j += 32) row_max = max(row_max, sS[i * lds + j] * scale);
      row_max = detail::warp_max(row_max);
      const Acc m_old = sM[i];
      const Acc m_new = max(m_old, row_max);
      Acc row_sum = 0;
      for (int j = lane; j < C::BN; j += 32) {
        const Acc p = j < k_valid ? detail::acc_exp(sS[i * lds + j] * scale - m_new) : Acc(0);
        sP[i * ldp + j] = TypeOps<T>::from_acc(p);
        row_sum += p;
      }
      row_sum = detail::warp_sum(row_sum);
      if (lane == 0) {
        const Acc alpha = detail::acc_exp(m_old - m_new);  // exp(-inf) = 0 on the first tile
        sAlpha[i] = alpha;
        sL[i] = sL[i] * alpha + row_sum;
        sM[i] = m_new;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * ev_pad; idx += kThreads) sO[(idx / ev_pad) * ldo + idx % ev_pad] *= sAlpha[idx / ev_pad];
    __syncthreads();
    block_gemm<T, true, true>(sO, ldo, sP, ldp, sV, ldv, C::BM, ev_pad, C::BN, true);  // O += P V
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < C::BM * ev_pad; idx += kThreads) {
    const int i = idx / ev_pad;
    sO[i * ldo + idx % ev_pad] /= sL[i];
  }
  __syncthreads();
  store_tile(out.data + b * out.sb + q0 * out.sr + ev0 * out.sc, out.sr, out.sc, sO, ldo, q_valid, ev_valid);
  if (blockIdx.y == 0)
    for (int i = threadIdx.x; i < q_valid; i += kThreads) lse[b * g.N + q0 + i] = sM[i] + detail::acc_log(sL[i]);
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

// The part the dq and dk kernels share, for one (query tile, key tile) pair whose Q, K, lse and
// delta are in shared memory: S = Q K^T, dP = dO V^T over all Ev chunks, then
// dS = scale * P * (dP - delta) with P = exp(scale * S - lse), masked to 0 outside the valid
// rows/keys, stored in the input type for the next product.
// reload_v / reload_do: whether the V / dO chunks in shared memory are not already the right ones.
template <typename T>
__device__ void compute_ds(const Geometry& g, int64_t b, int64_t q0, int64_t k0, int q_valid, int k_valid,
                           const View<T>& v, const View<T>& grad_out, const T* sQ, const T* sK, T* sV, T* sDO,
                           Acc_t<T>* sS, Acc_t<T>* sDP, T* sDS, const Acc_t<T>* sLse, const Acc_t<T>* sDelta,
                           bool reload_v, bool reload_do) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  const int ldq = g.Epad + C::kPad, ldv = g.ev_chunk + C::kPad, lds = C::BN + C::kPadAcc, ldp = C::BN + C::kPad;
  block_gemm<T, true, false>(sS, lds, sQ, ldq, sK, ldq, C::BM, C::BN, g.Epad, false);  // S = Q K^T
  const bool one_chunk = g.Ev <= g.ev_chunk;
  for (int64_t e0 = 0; e0 < g.Ev; e0 += g.ev_chunk) {
    const int e_valid = int(min(int64_t(g.ev_chunk), g.Ev - e0));
    const int e_pad = round16(e_valid);
    if (!one_chunk || reload_v || reload_do) {
      __syncthreads();  // the previous chunk's product is done with sV, sDO
      if (!one_chunk || reload_v)
        load_tile(sV, ldv, v.batch(b) + k0 * v.sr + e0 * v.sc, v.sr, v.sc, C::BN, e_pad, k_valid, e_valid);
      if (!one_chunk || reload_do)
        load_tile(sDO, ldv, grad_out.batch(b) + q0 * grad_out.sr + e0 * grad_out.sc, grad_out.sr, grad_out.sc,
                  C::BM, e_pad, q_valid, e_valid);
      __syncthreads();
    }
    block_gemm<T, true, false>(sDP, lds, sDO, ldv, sV, ldv, C::BM, C::BN, e_pad, e0 > 0);  // dP (+)= dO V^T
  }
  __syncthreads();
  const Acc scale = Acc(g.scale);
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
}

template <typename T>
size_t dq_dk_smem_bytes(int Epad, int ev_chunk) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  static_assert(C::BM == C::BN, "the dq and dk kernels share one layout");
  SmemSizer s;
  s.take<T>(size_t(C::BM) * (Epad + C::kPad));       // Q
  s.take<T>(size_t(C::BN) * (Epad + C::kPad));       // K
  s.take<T>(size_t(C::BN) * (ev_chunk + C::kPad));   // V chunk
  s.take<T>(size_t(C::BM) * (ev_chunk + C::kPad));   // dO chunk
  s.take<Acc>(size_t(C::BM) * (C::BN + C::kPadAcc)); // S
  s.take<Acc>(size_t(C::BM) * (C::BN + C::kPadAcc)); // dP
  s.take<T>(size_t(C::BM) * (C::BN + C::kPad));      // dS
  s.take<Acc>(size_t(C::BM) * (Epad + C::kPadAcc));  // dQ or dK accumulator
  s.take<Acc>(2 * size_t(C::BM));                     // lse, delta
  return s.offset;
}

// kQueryTiles = true: the dq kernel (a block per query tile, loops over key tiles).
// kQueryTiles = false: the dk kernel (a block per key tile, loops over query tiles).
template <typename T, bool kQueryTiles>
__global__ void __launch_bounds__(kThreads) attention_dq_dk_kernel(Geometry g, View<T> q, View<T> k, View<T> v,
                                                                   View<T> grad_out, const Acc_t<T>* lse,
                                                                   const Acc_t<T>* delta, MutView<T> grad) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  SAGAN_DYNAMIC_SMEM(smem_raw);
  const int64_t b = blockIdx.z;
  const int ldq = g.Epad + C::kPad, ldv = g.ev_chunk + C::kPad, lds = C::BN + C::kPadAcc, ldp = C::BN + C::kPad,
            lda = g.Epad + C::kPadAcc;
  SmemCarver sm{smem_raw};
  T* sQ = sm.take<T>(size_t(C::BM) * ldq);
  T* sK = sm.take<T>(size_t(C::BN) * ldq);
  T* sV = sm.take<T>(size_t(C::BN) * ldv);
  T* sDO = sm.take<T>(size_t(C::BM) * ldv);
  Acc* sS = sm.take<Acc>(size_t(C::BM) * lds);
  Acc* sDP = sm.take<Acc>(size_t(C::BM) * lds);
  T* sDS = sm.take<T>(size_t(C::BM) * ldp);
  Acc* sAcc = sm.take<Acc>(size_t(C::BM) * lda);
  Acc* sLse = sm.take<Acc>(C::BM);
  Acc* sDelta = sLse + C::BM;

  const int64_t own0 = int64_t(blockIdx.x) * C::BM;  // first row of the tile this block owns
  const int64_t own_len = kQueryTiles ? g.N : g.Nk;
  const int64_t loop_len = kQueryTiles ? g.Nk : g.N;
  const int own_valid = int(min(int64_t(C::BM), own_len - own0));
  for (int idx = threadIdx.x; idx < C::BM * g.Epad; idx += kThreads) sAcc[(idx / g.Epad) * lda + idx % g.Epad] = 0;

  auto load_query_side = [&](int64_t q0, int q_valid) {
    load_tile(sQ, ldq, q.batch(b) + q0 * q.sr, q.sr, q.sc, C::BM, g.Epad, q_valid, int(g.E));
    for (int i = threadIdx.x; i < C::BM; i += kThreads) {
      sLse[i] = i < q_valid ? lse[b * g.N + q0 + i] : Acc(0);
      sDelta[i] = i < q_valid ? delta[b * g.N + q0 + i] : Acc(0);
    }
  };
  if (kQueryTiles)
    load_query_side(own0, own_valid);
  else
    load_tile(sK, ldq, k.batch(b) + own0 * k.sr, k.sr, k.sc, C::BN, g.Epad, own_valid, int(g.E));

  bool first = true;
  for (int64_t t0 = 0; t0 < loop_len; t0 += C::BM) {
    const int t_valid = int(min(int64_t(C::BM), loop_len - t0));
    __syncthreads();  // the previous step is done with the tiles about to be replaced
    if (kQueryTiles)
      load_tile(sK, ldq, k.batch(b) + t0 * k.sr, k.sr, k.sc, C::BN, g.Epad, t_valid, int(g.E));
    else
      load_query_side(t0, t_valid);
    __syncthreads();
    const int64_t q0 = kQueryTiles ? own0 : t0, k0 = kQueryTiles ? t0 : own0;
    const int q_valid = kQueryTiles ? own_valid : t_valid, k_valid = kQueryTiles ? t_valid : own_valid;
    // With a single Ev chunk, the tile that does not move stays loaded: dO for dq, V for dk.
    compute_ds<T>(g, b, q0, k0, q_valid, k_valid, v, grad_out, sQ, sK, sV, sDO, sS, sDP, sDS, sLse, sDelta,
                  /*reload_v=*/kQueryTiles || first, /*reload_do=*/!kQueryTiles || first);
    if (kQueryTiles)
      block_gemm<T, true, true>(sAcc, lda, sDS, ldp, sK, ldq, C::BM, g.Epad, C::BN, true);   // dQ += dS K
    else
      block_gemm<T, false, true>(sAcc, lda, sDS, ldp, sQ, ldq, C::BN, g.Epad, C::BM, true);  // dK += dS^T Q
    first = false;
  }
  __syncthreads();
  store_tile(grad.data + b * grad.sb + own0 * grad.sr, grad.sr, grad.sc, sAcc, lda, own_valid, int(g.E));
}

template <typename T>
size_t dv_smem_bytes(int Epad, int ev_chunk) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  SmemSizer s;
  s.take<T>(size_t(C::BM) * (Epad + C::kPad));         // Q
  s.take<T>(size_t(C::BN) * (Epad + C::kPad));         // K
  s.take<T>(size_t(C::BM) * (ev_chunk + C::kPad));     // dO chunk
  s.take<Acc>(size_t(C::BM) * (C::BN + C::kPadAcc));   // S
  s.take<T>(size_t(C::BM) * (C::BN + C::kPad));        // P
  s.take<Acc>(size_t(C::BN) * (ev_chunk + C::kPadAcc)); // dV accumulator
  s.take<Acc>(size_t(C::BM));                           // lse
  return s.offset;
}

// A block per (key tile, Ev chunk): dV = sum over query tiles of P^T dO.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_dv_kernel(Geometry g, View<T> q, View<T> k, View<T> grad_out,
                                                                const Acc_t<T>* lse, MutView<T> grad_v) {
  using C = Tiles<T>;
  using Acc = Acc_t<T>;
  SAGAN_DYNAMIC_SMEM(smem_raw);
  const int64_t b = blockIdx.z;
  const int64_t k0 = int64_t(blockIdx.x) * C::BN;
  const int64_t e0 = int64_t(blockIdx.y) * g.ev_chunk;
  const int k_valid = int(min(int64_t(C::BN), g.Nk - k0));
  const int e_valid = int(min(int64_t(g.ev_chunk), g.Ev - e0));
  const int e_pad = round16(e_valid);
  const int ldq = g.Epad + C::kPad, ldv = g.ev_chunk + C::kPad, lds = C::BN + C::kPadAcc, ldp = C::BN + C::kPad,
            lda = g.ev_chunk + C::kPadAcc;
  SmemCarver sm{smem_raw};
  T* sQ = sm.take<T>(size_t(C::BM) * ldq);
  T* sK = sm.take<T>(size_t(C::BN) * ldq);
  T* sDO = sm.take<T>(size_t(C::BM) * ldv);
  Acc* sS = sm.take<Acc>(size_t(C::BM) * lds);
  T* sP = sm.take<T>(size_t(C::BM) * ldp);
  Acc* sAcc = sm.take<Acc>(size_t(C::BN) * lda);
  Acc* sLse = sm.take<Acc>(C::BM);

  load_tile(sK, ldq, k.batch(b) + k0 * k.sr, k.sr, k.sc, C::BN, g.Epad, k_valid, int(g.E));
  for (int idx = threadIdx.x; idx < C::BN * e_pad; idx += kThreads) sAcc[(idx / e_pad) * lda + idx % e_pad] = 0;
  const Acc scale = Acc(g.scale);
  for (int64_t q0 = 0; q0 < g.N; q0 += C::BM) {
    const int q_valid = int(min(int64_t(C::BM), g.N - q0));
    __syncthreads();
    load_tile(sQ, ldq, q.batch(b) + q0 * q.sr, q.sr, q.sc, C::BM, g.Epad, q_valid, int(g.E));
    load_tile(sDO, ldv, grad_out.batch(b) + q0 * grad_out.sr + e0 * grad_out.sc, grad_out.sr, grad_out.sc, C::BM,
              e_pad, q_valid, e_valid);
    for (int i = threadIdx.x; i < C::BM; i += kThreads) sLse[i] = i < q_valid ? lse[b * g.N + q0 + i] : Acc(0);
    __syncthreads();
    block_gemm<T, true, false>(sS, lds, sQ, ldq, sK, ldq, C::BM, C::BN, g.Epad, false);  // S = Q K^T
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += kThreads) {
      const int i = idx / C::BN, j = idx % C::BN;
      const Acc p = (i < q_valid && j < k_valid) ? detail::acc_exp(sS[i * lds + j] * scale - sLse[i]) : Acc(0);
      sP[i * ldp + j] = TypeOps<T>::from_acc(p);
    }
    __syncthreads();
    block_gemm<T, false, true>(sAcc, lda, sP, ldp, sDO, ldv, C::BN, e_pad, C::BM, true);  // dV += P^T dO
  }
  __syncthreads();
  store_tile(grad_v.data + b * grad_v.sb + k0 * grad_v.sr + e0 * grad_v.sc, grad_v.sr, grad_v.sc, sAcc, lda, k_valid,
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
