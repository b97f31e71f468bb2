// sagan_fast CUDA kernels: the framework-free host API (raw pointers, sizes, element strides and a
// stream; no torch). Used by the PyTorch extension (csrc/ops_cuda.cu) and by the C++ tests in
// kernels/tests/. Every function checks its arguments and returns cudaErrorInvalidValue before any
// launch when they are out of range; otherwise the error of the launch itself.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace sagan_fast {
namespace kernels {

// Element type of every floating-point tensor argument. Accumulation, sigmas, logsumexp and the
// workspaces are float32 ("acc") for the first three and float64 for kFloat64.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

inline size_t acc_size(DType t) { return t == DType::kFloat64 ? 8 : 4; }

// ------------------------------------------------------------------------------------------------
// Spectral norm
// ------------------------------------------------------------------------------------------------

// One weight seen as a matrix (R, A*Bi) along its spectral-norm dim: element (r, a*Bi + b) is at
// weight[a * stride_a + r * stride_r + b * stride_b]. For a contiguous weight and dim d: R = size(d),
// A = product of the sizes before d, Bi = product of the sizes after d (torch's movedim + flatten).
struct SpectralNormLayer {
  const void* weight;
  void* u;  // (R,) contiguous, the weight's dtype; read as the start, written with the new u
  void* v;  // (A*Bi,) contiguous, the weight's dtype; idem
  int64_t A, R, Bi;
  int64_t stride_a, stride_r, stride_b;
};

// Bytes of workspace spectral_norm_power_iteration needs for these layers.
size_t spectral_norm_workspace_bytes(DType dtype, const SpectralNormLayer* layers, int num_layers);

// For every layer, n_power_iterations times: u = normalize(W v), v = normalize(W^T u), each norm
// floored at eps (torch's order); then sigma = u . W v, computed as |W^T u|^2 / max(|W^T u|, eps)
// (equal to it in exact arithmetic, and no third pass over W). Writes u, v and sigmas[i] (acc type).
// All layers together: 3 launches per iteration whatever the number of layers (up to
// kMaxLayersPerLaunch layers per launch; more are split into several). Deterministic (no atomics).
cudaError_t spectral_norm_power_iteration(DType dtype, const SpectralNormLayer* layers, int num_layers,
                                          int n_power_iterations, double eps, void* sigmas, void* workspace,
                                          size_t workspace_bytes, cudaStream_t stream);

// out = weight / sigma (sigma: one acc-type value on the device), both contiguous, numel elements.
cudaError_t spectral_norm_normalize_forward(DType dtype, const void* weight, int64_t numel, const void* sigma,
                                            void* out, cudaStream_t stream);

size_t spectral_norm_normalize_backward_workspace_bytes(DType dtype, int64_t numel);

// grad_weight = (grad - <grad, weight / sigma> u v^T) / sigma, with grad, weight and grad_weight
// contiguous of the weight's shape, viewed as (A, R, Bi) (see SpectralNormLayer); u (R,), v (A*Bi,)
// contiguous in the weight's dtype; sigma one acc-type value. 2 launches, deterministic.
cudaError_t spectral_norm_normalize_backward(DType dtype, const void* grad, const void* weight, const void* u,
                                             const void* v, const void* sigma, int64_t A, int64_t R, int64_t Bi,
                                             void* grad_weight, void* workspace, size_t workspace_bytes,
                                             cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// SAGAN attention: out[b, i] = sum_j softmax_j(scale * q[b, i] . k[b, j]) v[b, j]
// ------------------------------------------------------------------------------------------------

// A (B, rows, features) tensor with any element strides (transposed views included).
struct Strided3 {
  const void* data;
  int64_t stride_b, stride_row, stride_col;
};
struct MutableStrided3 {
  void* data;
  int64_t stride_b, stride_row, stride_col;
};

// q (B, N, E), k (B, Nk, E), v (B, Nk, Ev). Supported: E in 1..128 (kMaxHeadDim), any Ev >= 1, any
// N, Nk >= 1, B <= 65535. fp16/bf16 run on tensor cores (WMMA, fp32 accumulation, sm_80+); fp32 and
// fp64 on CUDA cores in their own precision (no TF32).
struct AttentionProblem {
  DType dtype;
  int64_t B, N, Nk, E, Ev;
  double scale;
};

constexpr int64_t kMaxHeadDim = 128;
constexpr int kMaxLayersPerLaunch = 24;

// Flash-style forward (two passes over the keys: statistics, then P V into register
// accumulators): never forms the (N, Nk) matrix. Writes out (B, N, Ev) and lse (B, N)
// contiguous, acc type: the natural-log logsumexp of each row of scale * q k^T (for the backward).
cudaError_t sagan_attention_forward(const AttentionProblem& p, Strided3 q, Strided3 k, Strided3 v,
                                    MutableStrided3 out, void* lse, cudaStream_t stream);

size_t sagan_attention_backward_workspace_bytes(const AttentionProblem& p);

// Dynamic shared memory per block of each attention kernel (opted in above 48 KiB at launch;
// cudaErrorInvalidConfiguration when the device has less). For reports and tests.
enum class AttentionKernel : int { kForward = 0, kDqDk = 1, kDv = 2 };
size_t sagan_attention_shared_bytes(const AttentionProblem& p, AttentionKernel which);

// Backward by recomputation from lse: delta = rowsum(dO * O), then dq, dk, dv by three kernels
// that each own their output tile (register accumulators, no atomics, deterministic).
cudaError_t sagan_attention_backward(const AttentionProblem& p, Strided3 q, Strided3 k, Strided3 v, Strided3 out,
                                     Strided3 grad_out, const void* lse, MutableStrided3 grad_q,
                                     MutableStrided3 grad_k, MutableStrided3 grad_v, void* workspace,
                                     size_t workspace_bytes, cudaStream_t stream);

}  // namespace kernels
}  // namespace sagan_fast
