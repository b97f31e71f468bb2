// Shared declarations of the sagan_fast._C operators: input checks used by the CPU and the CUDA
// implementations, so both reject bad input with the same message before any work or launch.
#pragma once

#include <ATen/ATen.h>

namespace sagan_fast {

// The (A, R, Bi) view of a weight for spectral norm along `dim`: R = size(dim), A = product of
// the sizes before dim, Bi = product of the sizes after. Its matrix (R, A*Bi) is torch's
// weight.movedim(dim, 0).flatten(1), i.e. M[r, a*Bi + b] = W3[a, r, b].
struct MatrixView {
  int64_t A, R, Bi;
};

int64_t check_dim(const at::Tensor& weight, int64_t dim, const char* where);
MatrixView matrix_view(const at::Tensor& weight, int64_t dim);
void check_spectral_norm_vectors(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                 int64_t dim, const char* where);
void check_power_iteration_inputs(at::TensorList weights, at::TensorList us, at::TensorList vs,
                                  at::IntArrayRef dims, int64_t n_power_iterations, double eps);
void check_normalize_inputs(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                            const at::Tensor& sigma, int64_t dim, const char* where);
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
void check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse);

// Accumulation dtype: float32 for 16-bit and 32-bit inputs, float64 for float64.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace sagan_fast
