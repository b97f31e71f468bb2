// Multi-tensor fused spectral norm: power iteration + sigma for many weights in a few launches,
// and the normalization W / sigma with its fused backward. See sagan_fast_kernels.h for the API.
//
// Power iteration, per iteration, for all layers of one launch group together:
//   rows kernel:     y = W v                   (a warp per row; v from the buffer or from vcur)
//   cols kernel:     part[chunk] = W[chunk rows]^T y  (a thread per column, kRowChunk rows each)
//   finalize kernel: t = sum_chunks(part) / max(|y|, eps); v = t / max(|t|, eps);
//                    u = y / max(|y|, eps); sigma = |t|^2 / max(|t|, eps)   (a block per layer)
// Using t = W^T y / |y| (instead of W^T u) lets the cols kernel run without the norm of y.
// Normalize backward: a partial-sum launch, then the fused apply (2-D and division-free for dim 0).
// Every sum has a fixed order (no atomics): equal inputs give bitwise equal u, v on every rank.
#include <algorithm>
#include <vector>

#include "common.cuh"

namespace sagan_fast {
namespace kernels {
namespace {

using detail::ceil_div;
using detail::TypeOps;
template <typename T>
using Acc_t = typename TypeOps<T>::Acc;

constexpr int kRowsThreads = 256;            // 8 warps: 8 rows per block
constexpr int kRowsPerBlock = kRowsThreads / 32;
constexpr int kColsThreads = 256;            // one column per thread
constexpr int kRowChunk = 64;                // rows summed by one thread of the cols kernel
constexpr int kFinalizeThreads = 512;
constexpr int kElementwiseThreads = 256;
constexpr int kMaxReduceBlocks = 1024;       // normalize backward: partial sums, reduced in fixed order

template <typename Acc>
struct LayerArgs {
  const void* weight;
  void* u;
  void* v;
  int64_t A, R, Bi, C;
  int64_t stride_a, stride_r, stride_b;
  int64_t row_chunks;  // ceil(R / kRowChunk)
  Acc* y;              // (R,)
  Acc* part;           // (row_chunks, C)
  Acc* vcur;           // (C,) the current v in acc precision
};

// Passed by value as a kernel parameter (< 4 KiB): no host-to-device copy per call.
template <typename Acc>
struct GroupArgs {
  int num_layers;
  int layer_offset;  // index of layers[0] among all layers of the call (for sigmas)
  int rows_block_start[kMaxLayersPerLaunch + 1];  // prefix sums of blocks per layer
  int cols_block_start[kMaxLayersPerLaunch + 1];
  LayerArgs<Acc> layers[kMaxLayersPerLaunch];
};
static_assert(sizeof(GroupArgs<double>) <= 4000, "kernel parameters must stay under 4 KiB");

__device__ __forceinline__ int find_layer(const int* block_start, int num_layers, int block) {
  int layer = 0;
  while (layer + 1 < num_layers && block >= block_start[layer + 1]) ++layer;
  return layer;
}

template <typename T>
__global__ void __launch_bounds__(kRowsThreads) sn_rows_kernel(GroupArgs<typename TypeOps<T>::Acc> g,
                                                                bool v_from_buffer) {
  using Acc = typename TypeOps<T>::Acc;
  const int layer = find_layer(g.rows_block_start, g.num_layers, blockIdx.x);
  const LayerArgs<Acc>& L = g.layers[layer];
  const int64_t row = int64_t(blockIdx.x - g.rows_block_start[layer]) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= L.R) return;  // whole warps exit together: no block-level sync below
  const T* w = static_cast<const T*>(L.weight) + row * L.stride_r;
  const T* v_buf = static_cast<const T*>(L.v);
  Acc acc = 0;
  if (L.Bi >= 32) {  // e.g. dim 0: one contiguous run per a
    for (int64_t a = 0; a < L.A; ++a) {
      for (int64_t b = lane; b < L.Bi; b += 32) {
        const int64_t c = a * L.Bi + b;
        const Acc vc = v_from_buffer ? TypeOps<T>::to_acc(v_buf[c]) : L.vcur[c];
        acc += TypeOps<T>::to_acc(w[a * L.stride_a + b * L.stride_b]) * vc;
      }
    }
  } else {  // short runs (transposed convs, dim 1): spread the flat column index over the lanes
    for (int64_t c = lane; c < L.C; c += 32) {
      const int64_t a = c / L.Bi, b = c - a * L.Bi;
      const Acc vc = v_from_buffer ? TypeOps<T>::to_acc(v_buf[c]) : L.vcur[c];
      acc += TypeOps<T>::to_acc(w[a * L.stride_a + b * L.stride_b]) * vc;
    }
  }
  acc = detail::warp_sum(acc);
  if (lane == 0) L.y[row] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kColsThreads) sn_cols_kernel(GroupArgs<typename TypeOps<T>::Acc> g) {
  using Acc = typename TypeOps<T>::Acc;
  __shared__ Acc y_chunk[kRowChunk];
  const int layer = find_layer(g.cols_block_start, g.num_layers, blockIdx.x);
  const LayerArgs<Acc>& L = g.layers[layer];
  const int64_t local = blockIdx.x - g.cols_block_start[layer];
  const int64_t chunk = local % L.row_chunks;
  const int64_t col = (local / L.row_chunks) * kColsThreads + threadIdx.x;
  const int64_t r0 = chunk * kRowChunk;
  const int rows = L.R - r0 < kRowChunk ? int(L.R - r0) : kRowChunk;
  for (int i = threadIdx.x; i < rows; i += blockDim.x) y_chunk[i] = L.y[r0 + i];
  __syncthreads();
  if (col >= L.C) return;
  const int64_t a = col / L.Bi, b = col - a * L.Bi;
  const T* w = static_cast<const T*>(L.weight) + a * L.stride_a + b * L.stride_b + r0 * L.stride_r;
  Acc acc = 0;
  for (int i = 0; i < rows; ++i) acc += TypeOps<T>::to_acc(w[i * L.stride_r]) * y_chunk[i];
  L.part[chunk * L.C + col] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads) sn_finalize_kernel(GroupArgs<typename TypeOps<T>::Acc> g,
                                                                       double eps, bool last, Acc_t<T>* sigmas) {
  using Acc = typename TypeOps<T>::Acc;
  __shared__ Acc scratch[33];
  const LayerArgs<Acc>& L = g.layers[blockIdx.x];
  const Acc floor_eps = Acc(eps);

  Acc yy = 0;
  for (int64_t r = threadIdx.x; r < L.R; r += blockDim.x) yy += L.y[r] * L.y[r];
  const Acc inv_y = Acc(1) / max(detail::acc_sqrt(detail::block_sum(yy, scratch)), floor_eps);

  Acc tt = 0;
  for (int64_t c = threadIdx.x; c < L.C; c += blockDim.x) {
    Acc t = 0;
    for (int64_t k = 0; k < L.row_chunks; ++k) t += L.part[k * L.C + c];
    t *= inv_y;
    L.vcur[c] = t;  // t for now; each thread rescales the same columns below, no sync needed
    tt += t * t;
  }
  const Acc norm_t = detail::acc_sqrt(detail::block_sum(tt, scratch));
  const Acc denom_t = max(norm_t, floor_eps);
  T* v_out = static_cast<T*>(L.v);
  for (int64_t c = threadIdx.x; c < L.C; c += blockDim.x) {
    const Acc vc = L.vcur[c] / denom_t;
    L.vcur[c] = vc;
    if (last) v_out[c] = TypeOps<T>::from_acc(vc);
  }
  if (last) {
    T* u_out = static_cast<T*>(L.u);
    for (int64_t r = threadIdx.x; r < L.R; r += blockDim.x) u_out[r] = TypeOps<T>::from_acc(L.y[r] * inv_y);
    // sigma = u . W v' = (W^T u) . v' = |t|^2 / max(|t|, eps)
    if (threadIdx.x == 0) sigmas[g.layer_offset + blockIdx.x] = norm_t * norm_t / denom_t;
  }
}

template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) sn_divide_kernel(const T* __restrict__ w, int64_t n,
                                                                        const Acc_t<T>* __restrict__ sigma,
                                                                        T* __restrict__ out) {
  const Acc_t<T> s = *sigma;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = TypeOps<T>::from_acc(TypeOps<T>::to_acc(w[i]) / s);
}

// partial[block] = sum over the block's grid-stride share of grad * weight
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) sn_dot_partial_kernel(const T* __restrict__ grad,
                                                                             const T* __restrict__ w, int64_t n,
                                                                             Acc_t<T>* __restrict__ partial) {
  using Acc = Acc_t<T>;
  __shared__ Acc scratch[33];
  Acc acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc += TypeOps<T>::to_acc(grad[i]) * TypeOps<T>::to_acc(w[i]);
  acc = detail::block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// <grad, W_sn> = sum of the partials / sigma; every block sums the partials itself, in the same
// order, so all see the same value without another launch.
template <typename Acc>
__device__ Acc inner_product(const Acc* __restrict__ partial, int num_partials, Acc s, Acc* scratch) {
  Acc acc = 0;
  for (int i = threadIdx.x; i < num_partials; i += blockDim.x) acc += partial[i];
  return detail::block_sum(acc, scratch) / s;
}

// grad_w = (grad - (<grad, w> / sigma) u v^T) / sigma over the flat index of a contiguous
// (A, R, Bi) weight: 4 int64 div/mod per element, for dims > 0 (A > 1; transposed convs).
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) sn_backward_apply_kernel(
    const T* __restrict__ grad, const T* __restrict__ u, const T* __restrict__ v, int64_t R, int64_t Bi, int64_t n,
    const Acc_t<T>* __restrict__ sigma, const Acc_t<T>* __restrict__ partial, int num_partials,
    T* __restrict__ grad_w) {
  using Acc = Acc_t<T>;
  __shared__ Acc scratch[33];
  const Acc s = *sigma;
  const Acc inner = inner_product(partial, num_partials, s, scratch);  // <grad, W_sn>
  const Acc inv_s = Acc(1) / s;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    // contiguous (A, R, Bi): i = (a * R + r) * Bi + b, matrix column c = a * Bi + b
    const int64_t b = i % Bi, ar = i / Bi, r = ar % R, a = ar / R;
    const Acc uv = TypeOps<T>::to_acc(u[r]) * TypeOps<T>::to_acc(v[a * Bi + b]);
    grad_w[i] = TypeOps<T>::from_acc((TypeOps<T>::to_acc(grad[i]) - inner * uv) * inv_s);
  }
}

// The same for dim 0 (A == 1: every conv, linear and embedding weight of SAGAN): row r of the
// (R, Bi) matrix is contiguous, u[r] one value per row and the column index is v's index, so a
// 2-D grid (column blocks x rows) needs no division.
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) sn_backward_apply_rows_kernel(
    const T* __restrict__ grad, const T* __restrict__ u, const T* __restrict__ v, int64_t R, int64_t Bi,
    const Acc_t<T>* __restrict__ sigma, const Acc_t<T>* __restrict__ partial, int num_partials,
    T* __restrict__ grad_w) {
  using Acc = Acc_t<T>;
  __shared__ Acc scratch[33];
  const Acc s = *sigma;
  const Acc inner = inner_product(partial, num_partials, s, scratch);
  const Acc inv_s = Acc(1) / s;
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    const Acc inner_u = inner * TypeOps<T>::to_acc(u[r]);
    const T* g = grad + r * Bi;
    T* out = grad_w + r * Bi;
    for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < Bi; b += int64_t(gridDim.x) * blockDim.x)
      out[b] = TypeOps<T>::from_acc((TypeOps<T>::to_acc(g[b]) - inner_u * TypeOps<T>::to_acc(v[b])) * inv_s);
  }
}

int elementwise_blocks(int64_t n) {
  return int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kElementwiseThreads * 4), 65535)));
}

// Workspace per layer (acc elements): y (R) + part (row_chunks * C) + vcur (C), each rounded to 32.
int64_t layer_workspace_elems(const SpectralNormLayer& l) {
  const int64_t C = l.A * l.Bi;
  auto round32 = [](int64_t x) { return ceil_div(x, 32) * 32; };
  return round32(l.R) + round32(ceil_div(l.R, kRowChunk) * C) + round32(C);
}

bool layer_ok(const SpectralNormLayer& l) {
  return l.weight != nullptr && l.u != nullptr && l.v != nullptr && l.A >= 1 && l.R >= 1 && l.Bi >= 1;
}

template <typename T>
cudaError_t power_iteration_impl(const SpectralNormLayer* layers, int num_layers, int n_iter, double eps,
                                 void* sigmas, void* workspace, cudaStream_t stream) {
  using Acc = Acc_t<T>;
  Acc* ws = static_cast<Acc*>(workspace);
  for (int first = 0; first < num_layers; first += kMaxLayersPerLaunch) {
    GroupArgs<Acc> g{};
    g.num_layers = std::min(kMaxLayersPerLaunch, num_layers - first);
    g.layer_offset = first;
    g.rows_block_start[0] = g.cols_block_start[0] = 0;
    for (int i = 0; i < g.num_layers; ++i) {
      const SpectralNormLayer& l = layers[first + i];
      LayerArgs<Acc>& L = g.layers[i];
      L.weight = l.weight;
      L.u = l.u;
      L.v = l.v;
      L.A = l.A;
      L.R = l.R;
      L.Bi = l.Bi;
      L.C = l.A * l.Bi;
      L.stride_a = l.stride_a;
      L.stride_r = l.stride_r;
      L.stride_b = l.stride_b;
      L.row_chunks = ceil_div(l.R, kRowChunk);
      L.y = ws;
      L.part = L.y + ceil_div(l.R, 32) * 32;
      L.vcur = L.part + ceil_div(L.row_chunks * L.C, 32) * 32;
      ws += layer_workspace_elems(l);
      const int64_t rows_blocks = ceil_div(l.R, kRowsPerBlock);
      const int64_t cols_blocks = L.row_chunks * ceil_div(L.C, kColsThreads);
      if (g.rows_block_start[i] + rows_blocks > INT32_MAX / 2 || g.cols_block_start[i] + cols_blocks > INT32_MAX / 2)
        return cudaErrorInvalidValue;
      g.rows_block_start[i + 1] = g.rows_block_start[i] + int(rows_blocks);
      g.cols_block_start[i + 1] = g.cols_block_start[i] + int(cols_blocks);
    }
    Acc* group_sigmas = static_cast<Acc*>(sigmas);
    for (int it = 0; it < n_iter; ++it) {
      sn_rows_kernel<T><<<g.rows_block_start[g.num_layers], kRowsThreads, 0, stream>>>(g, it == 0);
      sn_cols_kernel<T><<<g.cols_block_start[g.num_layers], kColsThreads, 0, stream>>>(g);
      sn_finalize_kernel<T><<<g.num_layers, kFinalizeThreads, 0, stream>>>(g, eps, it == n_iter - 1, group_sigmas);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t normalize_backward_impl(const void* grad, const void* weight, const void* u, const void* v,
                                    const void* sigma, int64_t A, int64_t R, int64_t Bi, void* grad_weight,
                                    void* workspace, cudaStream_t stream) {
  using Acc = Acc_t<T>;
  const int64_t n = A * R * Bi;
  const int blocks = std::min(elementwise_blocks(n), kMaxReduceBlocks);
  Acc* partial = static_cast<Acc*>(workspace);
  sn_dot_partial_kernel<T><<<blocks, kElementwiseThreads, 0, stream>>>(static_cast<const T*>(grad),
                                                                        static_cast<const T*>(weight), n, partial);
  if (A == 1) {
    // As many blocks as the flat launch: column blocks of 4 elements a thread, rows grid-strided.
    const int64_t col_blocks = std::min<int64_t>(ceil_div(Bi, kElementwiseThreads * 4), 65535);
    const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>({ceil_div(elementwise_blocks(n), col_blocks), R,
                                                                         65535}));
    sn_backward_apply_rows_kernel<T><<<dim3(unsigned(col_blocks), unsigned(row_blocks)), kElementwiseThreads, 0,
                                       stream>>>(static_cast<const T*>(grad), static_cast<const T*>(u),
                                                 static_cast<const T*>(v), R, Bi, static_cast<const Acc*>(sigma),
                                                 partial, blocks, static_cast<T*>(grad_weight));
  } else {
    sn_backward_apply_kernel<T><<<elementwise_blocks(n), kElementwiseThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(u), static_cast<const T*>(v), R, Bi, n,
        static_cast<const Acc*>(sigma), partial, blocks, static_cast<T*>(grad_weight));
  }
  return cudaGetLastError();
}

template <template <typename> class F, typename... Args>
cudaError_t dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat16: return F<__half>::run(args...);
    case DType::kBFloat16: return F<__nv_bfloat16>::run(args...);
    case DType::kFloat32: return F<float>::run(args...);
    case DType::kFloat64: return F<double>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct PowerIteration {
  template <typename... Args>
  static cudaError_t run(Args... args) { return power_iteration_impl<T>(args...); }
};
template <typename T>
struct NormalizeForward {
  static cudaError_t run(const void* w, int64_t n, const void* sigma, void* out, cudaStream_t stream) {
    sn_divide_kernel<T><<<elementwise_blocks(n), kElementwiseThreads, 0, stream>>>(
        static_cast<const T*>(w), n, static_cast<const Acc_t<T>*>(sigma), static_cast<T*>(out));
    return cudaGetLastError();
  }
};
template <typename T>
struct NormalizeBackward {
  template <typename... Args>
  static cudaError_t run(Args... args) { return normalize_backward_impl<T>(args...); }
};

}  // namespace

size_t spectral_norm_workspace_bytes(DType dtype, const SpectralNormLayer* layers, int num_layers) {
  int64_t elems = 0;
  for (int i = 0; i < num_layers; ++i) elems += layer_workspace_elems(layers[i]);
  return size_t(elems) * acc_size(dtype);
}

cudaError_t spectral_norm_power_iteration(DType dtype, const SpectralNormLayer* layers, int num_layers,
                                          int n_power_iterations, double eps, void* sigmas, void* workspace,
                                          size_t workspace_bytes, cudaStream_t stream) {
  if (num_layers < 0 || n_power_iterations < 1 || !(eps >= 0.0) || (num_layers > 0 && (layers == nullptr ||
      sigmas == nullptr || workspace == nullptr)))
    return cudaErrorInvalidValue;
  if (num_layers == 0) return cudaSuccess;
  for (int i = 0; i < num_layers; ++i)
    if (!layer_ok(layers[i])) return cudaErrorInvalidValue;
  if (workspace_bytes < spectral_norm_workspace_bytes(dtype, layers, num_layers)) return cudaErrorInvalidValue;
  return dispatch<PowerIteration>(dtype, layers, num_layers, n_power_iterations, eps, sigmas, workspace, stream);
}

cudaError_t spectral_norm_normalize_forward(DType dtype, const void* weight, int64_t numel, const void* sigma,
                                            void* out, cudaStream_t stream) {
  if (numel < 0 || (numel > 0 && (weight == nullptr || sigma == nullptr || out == nullptr)))
    return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  return dispatch<NormalizeForward>(dtype, weight, numel, sigma, out, stream);
}

size_t spectral_norm_normalize_backward_workspace_bytes(DType dtype, int64_t numel) {
  (void)numel;
  return size_t(kMaxReduceBlocks) * acc_size(dtype);
}

cudaError_t spectral_norm_normalize_backward(DType dtype, const void* grad, const void* weight, const void* u,
                                             const void* v, const void* sigma, int64_t A, int64_t R, int64_t Bi,
                                             void* grad_weight, void* workspace, size_t workspace_bytes,
                                             cudaStream_t stream) {
  if (A < 1 || R < 1 || Bi < 1 || !grad || !weight || !u || !v || !sigma || !grad_weight || !workspace ||
      workspace_bytes < spectral_norm_normalize_backward_workspace_bytes(dtype, A * R * Bi))
    return cudaErrorInvalidValue;
  return dispatch<NormalizeBackward>(dtype, grad, weight, u, v, sigma, A, R, Bi, grad_weight, workspace, stream);
}

}  // namespace kernels
}  // namespace sagan_fast
