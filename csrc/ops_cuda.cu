// CUDA implementations of the sagan_fast._C operators: argument checks (shared with the CPU
// versions, see ops.h), then the framework-free kernels of kernels/ on torch's current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"
#include "sagan_fast_kernels.h"

namespace sagan_fast {
namespace {

namespace K = ::sagan_fast::kernels;

K::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return K::DType::kFloat16;
    case at::kBFloat16: return K::DType::kBFloat16;
    case at::kFloat: return K::DType::kFloat32;
    case at::kDouble: return K::DType::kFloat64;
    default: TORCH_CHECK(false, "sagan_fast: unsupported dtype ", t);
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "sagan_fast: ", what, " failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidConfiguration ? " (needs more shared memory per block than this GPU has)" : "",
              err == cudaErrorInvalidDevice ? " (fp16/bf16 tensor-core kernels need compute capability 8.0+)" : "");
}

void check_cuda(const at::Tensor& t, const char* name, const char* where) {
  TORCH_CHECK(t.is_cuda(), where, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

K::Strided3 strided(const at::Tensor& t) {
  return K::Strided3{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}
K::MutableStrided3 mutable_strided(at::Tensor& t) {
  return K::MutableStrided3{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

at::Tensor power_iteration_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
                                int64_t n_power_iterations, double eps) {
  const char* where = "sagan_fast::ext_spectral_norm_power_iteration_";
  check_power_iteration_inputs(weights, us, vs, dims, n_power_iterations, eps);
  if (weights.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  check_cuda(weights[0], "weights", where);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const at::ScalarType acc = acc_dtype(weights[0].scalar_type());
  std::vector<K::SpectralNormLayer> layers;
  std::vector<at::Tensor> keep_alive;  // contiguous copies of non-viewable weights
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t dim = check_dim(weights[i], dims[i], where);
    const MatrixView m = matrix_view(weights[i], dim);
    // The kernels read an (A, R, Bi) strided view; other layouts (e.g. channels_last) are read
    // from a contiguous copy (the weight is only read here).
    const at::Tensor w3 = (weights[i].is_contiguous() ? weights[i] : weights[i].contiguous()).view({m.A, m.R, m.Bi});
    keep_alive.push_back(w3);
    layers.push_back(K::SpectralNormLayer{w3.data_ptr(), us[i].data_ptr(), vs[i].data_ptr(), m.A, m.R, m.Bi,
                                          w3.stride(0), w3.stride(1), w3.stride(2)});
  }
  const K::DType dtype = kernel_dtype(weights[0].scalar_type());
  const size_t ws_bytes = K::spectral_norm_workspace_bytes(dtype, layers.data(), int(layers.size()));
  at::Tensor workspace = at::empty({int64_t(ws_bytes)}, weights[0].options().dtype(at::kByte));
  at::Tensor sigmas = at::empty({int64_t(weights.size())}, weights[0].options().dtype(acc));
  check_launch(K::spectral_norm_power_iteration(dtype, layers.data(), int(layers.size()), int(n_power_iterations), eps,
                                                sigmas.data_ptr(), workspace.data_ptr(), ws_bytes,
                                                c10::cuda::getCurrentCUDAStream().stream()),
               "spectral norm power iteration");
  return sigmas;
}

at::Tensor normalize_cuda(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
                          int64_t dim) {
  const char* where = "sagan_fast::ext_spectral_norm_normalize";
  check_normalize_inputs(weight, u, v, sigma, dim, where);
  check_cuda(weight, "weight", where);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor s = sigma.reshape({}).to(acc_dtype(weight.scalar_type())).contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  check_launch(K::spectral_norm_normalize_forward(kernel_dtype(w.scalar_type()), w.data_ptr(), w.numel(),
                                                  s.data_ptr(), out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "spectral norm normalize");
  return out;
}

at::Tensor normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                   const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const char* where = "sagan_fast::ext_spectral_norm_normalize_backward";
  check_normalize_inputs(weight, u, v, sigma, dim, where);
  TORCH_CHECK(grad.sizes() == weight.sizes(), where, ": grad must have the weight's shape ", weight.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type() && grad.device() == weight.device(), where,
              ": grad must match the weight's dtype and device");
  check_cuda(weight, "weight", where);
  const c10::cuda::CUDAGuard guard(weight.device());
  const MatrixView m = matrix_view(weight, check_dim(weight, dim, where));
  const at::Tensor g = grad.contiguous(), w = weight.contiguous(), uc = u.contiguous(), vc = v.contiguous();
  const at::Tensor s = sigma.reshape({}).to(acc_dtype(weight.scalar_type())).contiguous();
  const K::DType dtype = kernel_dtype(w.scalar_type());
  const size_t ws_bytes = K::spectral_norm_normalize_backward_workspace_bytes(dtype, w.numel());
  at::Tensor workspace = at::empty({int64_t(ws_bytes)}, w.options().dtype(at::kByte));
  at::Tensor grad_w = at::empty_like(w, at::MemoryFormat::Contiguous);
  check_launch(K::spectral_norm_normalize_backward(dtype, g.data_ptr(), w.data_ptr(), uc.data_ptr(), vc.data_ptr(),
                                                   s.data_ptr(), m.A, m.R, m.Bi, grad_w.data_ptr(),
                                                   workspace.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream().stream()),
               "spectral norm normalize backward");
  return grad_w;
}

K::AttentionProblem attention_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const char* where = "sagan_fast::ext_sagan_attention";
  TORCH_CHECK(q.size(2) <= K::kMaxHeadDim, where, ": the CUDA kernels support q/k feature sizes E up to ",
              K::kMaxHeadDim, ", got ", q.size(2));
  TORCH_CHECK(q.size(0) <= 65535, where, ": the CUDA kernels support batch sizes up to 65535, got ", q.size(0));
  return K::AttentionProblem{kernel_dtype(q.scalar_type()), q.size(0), q.size(1), k.size(1), q.size(2), v.size(2),
                             scale};
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale) {
  check_attention_inputs(q, k, v);
  check_cuda(q, "q", "sagan_fast::ext_sagan_attention_forward");
  const c10::cuda::CUDAGuard guard(q.device());
  const K::AttentionProblem p = attention_problem(q, k, v, scale);
  at::Tensor out = at::empty({p.B, p.N, p.Ev}, q.options());
  at::Tensor lse = at::empty({p.B, p.N}, q.options().dtype(acc_dtype(q.scalar_type())));
  check_launch(K::sagan_attention_forward(p, strided(q), strided(k), strided(v), mutable_strided(out), lse.data_ptr(),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "sagan attention forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(const at::Tensor& grad_out,
                                                                       const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& out,
                                                                       const at::Tensor& lse, double scale) {
  check_attention_backward_inputs(grad_out, q, k, v, out, lse);
  check_cuda(q, "q", "sagan_fast::ext_sagan_attention_backward");
  const c10::cuda::CUDAGuard guard(q.device());
  const K::AttentionProblem p = attention_problem(q, k, v, scale);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options()), grad_k = at::empty(k.sizes(), k.options()),
             grad_v = at::empty(v.sizes(), v.options());
  const size_t ws_bytes = K::sagan_attention_backward_workspace_bytes(p);
  at::Tensor workspace = at::empty({int64_t(ws_bytes)}, q.options().dtype(at::kByte));
  check_launch(K::sagan_attention_backward(p, strided(q), strided(k), strided(v), strided(out), strided(grad_out),
                                           lse_c.data_ptr(), mutable_strided(grad_q), mutable_strided(grad_k),
                                           mutable_strided(grad_v), workspace.data_ptr(), ws_bytes,
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "sagan attention backward");
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(sagan_fast, CUDA, m) {
  m.impl("ext_spectral_norm_power_iteration_", &power_iteration_cuda);
  m.impl("ext_spectral_norm_normalize", &normalize_cuda);
  m.impl("ext_spectral_norm_normalize_backward", &normalize_backward_cuda);
  m.impl("ext_sagan_attention_forward", &attention_forward_cuda);
  m.impl("ext_sagan_attention_backward", &attention_backward_cuda);
}

}  // namespace sagan_fast
