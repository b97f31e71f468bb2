// Input checks shared by the CPU and CUDA implementations (see ops.h).
#include "ops.h"

#include <c10/util/Exception.h>

namespace sagan_fast {

namespace {
bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}
}  // namespace

int64_t check_dim(const at::Tensor& weight, int64_t dim, const char* where) {
  TORCH_CHECK(weight.dim() >= 2, where, ": weight must have at least 2 dimensions, got shape ", weight.sizes());
  TORCH_CHECK(dim >= -weight.dim() && dim < weight.dim(), where, ": dim ", dim, " out of range for a weight of ",
              weight.dim(), " dimensions");
  return dim < 0 ? dim + weight.dim() : dim;
}

MatrixView matrix_view(const at::Tensor& weight, int64_t dim) {
  MatrixView m{1, weight.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) m.A *= weight.size(d);
  for (int64_t d = dim + 1; d < weight.dim(); ++d) m.Bi *= weight.size(d);
  return m;
}

void check_spectral_norm_vectors(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                 int64_t dim, const char* where) {
  TORCH_CHECK(is_supported_float(weight.scalar_type()), where,
              ": weight must be float16, bfloat16, float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.numel() > 0, where, ": weight of shape ", weight.sizes(), " is empty");
  const MatrixView m = matrix_view(weight, dim);
  TORCH_CHECK(u.dim() == 1 && u.size(0) == m.R, where, ": u must have shape (", m.R, ",) for a weight of shape ",
              weight.sizes(), " with dim=", dim, ", got ", u.sizes());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == m.A * m.Bi, where, ": v must have shape (", m.A * m.Bi,
              ",) for a weight of shape ", weight.sizes(), " with dim=", dim, ", got ", v.sizes());
  TORCH_CHECK(u.scalar_type() == weight.scalar_type() && v.scalar_type() == weight.scalar_type(), where,
              ": u and v must have the weight's dtype ", weight.scalar_type(), ", got ", u.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(u.device() == weight.device() && v.device() == weight.device(), where,
              ": weight, u and v must be on one device, got ", weight.device(), ", ", u.device(), ", ", v.device());
}

void check_power_iteration_inputs(at::TensorList weights, at::TensorList us, at::TensorList vs,
                                  at::IntArrayRef dims, int64_t n_power_iterations, double eps) {
  const char* where = "sagan_fast::ext_spectral_norm_power_iteration_";
  TORCH_CHECK(weights.size() == us.size() && us.size() == vs.size() && vs.size() == dims.size(), where, ": got ",
              weights.size(), " weights, ", us.size(), " u, ", vs.size(), " v and ", dims.size(), " dims");
  TORCH_CHECK(n_power_iterations >= 1, where, ": n_power_iterations must be positive, got ", n_power_iterations);
  TORCH_CHECK(eps >= 0.0, where, ": eps must be >= 0, got ", eps);
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t dim = check_dim(weights[i], dims[i], where);
    check_spectral_norm_vectors(weights[i], us[i], vs[i], dim, where);
    TORCH_CHECK(weights[i].device() == weights[0].device() && weights[i].scalar_type() == weights[0].scalar_type(),
                where, ": all weights must share one device and dtype; weight ", i, " is ",
                weights[i].scalar_type(), " on ", weights[i].device(), ", weight 0 is ", weights[0].scalar_type(),
                " on ", weights[0].device());
    TORCH_CHECK(us[i].is_contiguous() && vs[i].is_contiguous(), where, ": u and v must be contiguous (weight ", i,
                ")");
  }
}

void check_normalize_inputs(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                            const at::Tensor& sigma, int64_t dim, const char* where) {
  dim = check_dim(weight, dim, where);
  check_spectral_norm_vectors(weight, u, v, dim, where);
  TORCH_CHECK(sigma.numel() == 1, where, ": sigma must hold one value, got shape ", sigma.sizes());
  TORCH_CHECK(sigma.is_floating_point(), where, ": sigma must be floating point, got ", sigma.scalar_type());
  TORCH_CHECK(sigma.device() == weight.device(), where, ": sigma is on ", sigma.device(), " but the weight is on ",
              weight.device());
}

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const char* where = "sagan_fast::ext_sagan_attention";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, where,
              ": q, k, v must be 3-D (batch, tokens, features), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(is_supported_float(q.scalar_type()), where, ": dtype must be float16, bfloat16, float32 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), where,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), where, ": q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), where, ": batch sizes differ: q ", q.size(0), ", k ",
              k.size(0), ", v ", v.size(0));
  TORCH_CHECK(k.size(2) == q.size(2), where, ": q and k must share the feature size E, got ", q.size(2), " and ",
              k.size(2));
  TORCH_CHECK(v.size(1) == k.size(1), where, ": k and v must have the same number of keys, got ", k.size(1), " and ",
              v.size(1));
  TORCH_CHECK(q.numel() > 0 && k.numel() > 0 && v.numel() > 0, where, ": empty input: q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
}

void check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  const char* where = "sagan_fast::ext_sagan_attention_backward";
  check_attention_inputs(q, k, v);
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), v.size(2)};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape) && grad_out.sizes() == at::IntArrayRef(out_shape), where,
              ": out and grad_out must have shape ", at::IntArrayRef(out_shape), ", got ", out.sizes(), " and ",
              grad_out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && grad_out.scalar_type() == q.scalar_type(), where,
              ": out and grad_out must have q's dtype ", q.scalar_type(), ", got ", out.scalar_type(), " and ",
              grad_out.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1), where,
              ": lse must have shape (", q.size(0), ", ", q.size(1), "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc_dtype(q.scalar_type()), where, ": lse must be ",
              acc_dtype(q.scalar_type()), ", got ", lse.scalar_type());
  for (const at::Tensor* t : {&out, &grad_out, &lse}) {
    TORCH_CHECK(t->device() == q.device(), where, ": all inputs must be on ", q.device(), ", got one on ",
                t->device());
  }
}

}  // namespace sagan_fast
