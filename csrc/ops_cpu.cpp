// Operator schemas of sagan_fast._C and their CPU implementations.
//
// The CPU versions are plain ATen, written to follow the CUDA kernels' math step by step (same
// accumulation dtype, same sigma formula, same recomputation in the attention backward), so the
// schemas, the dispatch and the Python autograd glue are exercised and tested on machines with no GPU.
#include <torch/library.h>

#include "ops.h"

namespace sagan_fast {

namespace {

at::Tensor as_matrix(const at::Tensor& weight, int64_t dim) {
  return weight.movedim(dim, 0).reshape({weight.size(dim), -1});
}

// Inverse of as_matrix for a (R, rest) matrix and the weight's shape.
at::Tensor matrix_to_weight(const at::Tensor& mat, const at::Tensor& weight, int64_t dim) {
  std::vector<int64_t> moved{weight.size(dim)};
  for (int64_t d = 0; d < weight.dim(); ++d)
    if (d != dim) moved.push_back(weight.size(d));
  return mat.reshape(moved).movedim(0, dim);
}

at::ScalarType sigmas_dtype(at::TensorList weights) {
  return weights.empty() ? at::kFloat : acc_dtype(weights[0].scalar_type());
}

at::Tensor power_iteration_cpu(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
                               int64_t n_power_iterations, double eps) {
  check_power_iteration_inputs(weights, us, vs, dims, n_power_iterations, eps);
  const at::ScalarType acc = sigmas_dtype(weights);
  at::Tensor sigmas = at::empty({static_cast<int64_t>(weights.size())}, at::TensorOptions().dtype(acc));
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t dim = check_dim(weights[i], dims[i], "sagan_fast::ext_spectral_norm_power_iteration_");
    const at::Tensor mat = as_matrix(weights[i], dim).to(acc);
    at::Tensor u = us[i].to(acc), v = vs[i].to(acc), t_norm;
    for (int64_t it = 0; it < n_power_iterations; ++it) {
      const at::Tensor y = at::mv(mat, v);
      u = y / y.norm().clamp_min(eps);
      const at::Tensor t = at::mv(mat.t(), u);
      t_norm = t.norm();
      v = t / t_norm.clamp_min(eps);
    }
    // sigma = u . W v = (W^T u) . v = |t|^2 / max(|t|, eps): no third pass over W (the kernels' trick).
    sigmas[i].copy_(t_norm * t_norm / t_norm.clamp_min(eps));
    us[i].copy_(u);
    vs[i].copy_(v);
  }
  return sigmas;
}

at::Tensor normalize_cpu(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
                         int64_t dim) {
  check_normalize_inputs(weight, u, v, sigma, dim, "sagan_fast::ext_spectral_norm_normalize");
  const at::ScalarType acc = acc_dtype(weight.scalar_type());
  return (weight.to(acc) / sigma.reshape({}).to(acc)).to(weight.scalar_type()).contiguous();
}

at::Tensor normalize_backward_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                  const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const char* where = "sagan_fast::ext_spectral_norm_normalize_backward";
  check_normalize_inputs(weight, u, v, sigma, dim, where);
  TORCH_CHECK(grad.sizes() == weight.sizes(), where, ": grad must have the weight's shape ", weight.sizes(), ", got ",
              grad.sizes());
  dim = check_dim(weight, dim, where);
  const at::ScalarType acc = acc_dtype(weight.scalar_type());
  const at::Tensor g = grad.to(acc), s = sigma.reshape({}).to(acc);
  // <G, W_sn> = <G, W> / sigma: W is what autograd keeps anyway, W_sn would be an extra copy.
  const at::Tensor inner = (g * weight.to(acc)).sum() / s;
  const at::Tensor uvT = matrix_to_weight(at::outer(u.to(acc), v.to(acc)), weight, dim);
  return ((g - inner * uvT) / s).to(weight.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         double scale) {
  check_attention_inputs(q, k, v);
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  const at::Tensor scores = at::bmm(q.to(acc), k.to(acc).transpose(1, 2)) * scale;
  const at::Tensor lse = at::logsumexp(scores, -1);
  const at::Tensor p = at::exp(scores - lse.unsqueeze(-1));
  return {at::bmm(p, v.to(acc)).to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const at::Tensor& out, const at::Tensor& lse,
                                                                      double scale) {
  check_attention_backward_inputs(grad_out, q, k, v, out, lse);
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  const at::Tensor qa = q.to(acc), ka = k.to(acc), va = v.to(acc), go = grad_out.to(acc);
  // Recompute P from the stored logsumexp, as the kernels do; delta = rowsum(dO * O) with the stored O.
  const at::Tensor p = at::exp(at::bmm(qa, ka.transpose(1, 2)) * scale - lse.unsqueeze(-1));
  const at::Tensor delta = (go * out.to(acc)).sum(-1, /*keepdim=*/true);
  const at::Tensor dp = at::bmm(go, va.transpose(1, 2));
  const at::Tensor ds = p * (dp - delta) * scale;
  const at::ScalarType t = q.scalar_type();
  return {at::bmm(ds, ka).to(t), at::bmm(ds.transpose(1, 2), qa).to(t), at::bmm(p.transpose(1, 2), go).to(t)};
}

}  // namespace

TORCH_LIBRARY(sagan_fast, m) {
  // Names start with "ext_": the namespace is shared with the ops the Triton backend registers.
  m.def("ext_spectral_norm_power_iteration_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int[] dims, "
        "int n_power_iterations, float eps) -> Tensor");
  m.def("ext_spectral_norm_normalize(Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim) -> Tensor");
  m.def("ext_spectral_norm_normalize_backward(Tensor grad, Tensor weight, Tensor u, Tensor v, Tensor sigma, "
        "int dim) -> Tensor");
  m.def("ext_sagan_attention_forward(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def("ext_sagan_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(sagan_fast, CPU, m) {
  m.impl("ext_spectral_norm_power_iteration_", &power_iteration_cpu);
  m.impl("ext_spectral_norm_normalize", &normalize_cpu);
  m.impl("ext_spectral_norm_normalize_backward", &normalize_backward_cpu);
  m.impl("ext_sagan_attention_forward", &attention_forward_cpu);
  m.impl("ext_sagan_attention_backward", &attention_backward_cpu);
}

}  // namespace sagan_fast
