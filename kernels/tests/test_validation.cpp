// Argument checks of the kernels' host API: bad sizes are refused with cudaErrorInvalidValue before
// any CUDA call, so this test runs (and must pass) on machines without a GPU too.
#include <cstdio>

#include "test_util.h"

namespace K = sagan_fast::kernels;

int main() {
  int failures = 0;
  auto expect_invalid = [&](const char* what, cudaError_t err) {
    const bool ok = err == cudaErrorInvalidValue;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    failures += !ok;
  };
  float dummy[4] = {};
  const K::Strided3 t{dummy, 0, 0, 0};
  const K::MutableStrided3 m{dummy, 0, 0, 0};
  K::AttentionProblem p{K::DType::kFloat32, 1, 4, 4, 8, 8, 1.0};

  p.E = K::kMaxHeadDim + 1;
  expect_invalid("attention forward refuses E > 128", K::sagan_attention_forward(p, t, t, t, m, dummy, nullptr));
  p.E = 8;
  p.B = 0;
  expect_invalid("attention forward refuses B = 0", K::sagan_attention_forward(p, t, t, t, m, dummy, nullptr));
  p.B = 70000;
  expect_invalid("attention forward refuses B > 65535", K::sagan_attention_forward(p, t, t, t, m, dummy, nullptr));
  p.B = 1;
  expect_invalid("attention forward refuses a null output",
                 K::sagan_attention_forward(p, t, t, t, K::MutableStrided3{nullptr, 0, 0, 0}, dummy, nullptr));
  expect_invalid("attention backward refuses a short workspace",
                 K::sagan_attention_backward(p, t, t, t, t, t, dummy, m, m, m, dummy, 4, nullptr));

  K::SpectralNormLayer layer{dummy, dummy, dummy, 1, 0, 4, 0, 4, 1};  // R = 0
  expect_invalid("power iteration refuses an empty layer",
                 K::spectral_norm_power_iteration(K::DType::kFloat32, &layer, 1, 1, 1e-12, dummy, dummy, 1 << 20, nullptr));
  layer.R = 2;
  expect_invalid("power iteration refuses n_power_iterations = 0",
                 K::spectral_norm_power_iteration(K::DType::kFloat32, &layer, 1, 0, 1e-12, dummy, dummy, 1 << 20, nullptr));
  expect_invalid("power iteration refuses a short workspace",
                 K::spectral_norm_power_iteration(K::DType::kFloat32, &layer, 1, 1, 1e-12, dummy, dummy, 4, nullptr));
  expect_invalid("normalize backward refuses A = 0",
                 K::spectral_norm_normalize_backward(K::DType::kFloat32, dummy, dummy, dummy, dummy, dummy, 0, 2, 2,
                                                     dummy, dummy, 1 << 20, nullptr));
  // Dynamic shared memory of every attention kernel fits a Hopper block (227 KiB) at the largest
  // supported E; printed at the DESIGN shape (E=32, Ev=256) for the record.
  for (K::DType dt : {K::DType::kFloat16, K::DType::kBFloat16, K::DType::kFloat32, K::DType::kFloat64}) {
    for (int64_t E : {int64_t(32), K::kMaxHeadDim}) {
      const K::AttentionProblem prob{dt, 64, 1024, 1024, E, 256, 1.0};
      for (K::AttentionKernel which : {K::AttentionKernel::kForward, K::AttentionKernel::kDqDk, K::AttentionKernel::kDv}) {
        const size_t bytes = K::sagan_attention_shared_bytes(prob, which);
        const bool fits = bytes > 0 && bytes <= 227 * 1024;
        if (E == 32 || !fits)
          std::printf("%s %s attention kernel %d, E=%lld: %zu bytes of shared memory\n", fits ? "ok  " : "FAIL",
                      test::dtype_name(dt), int(which), (long long)E, bytes);
        failures += !fits;
      }
    }
  }
  const bool ws_ok = K::spectral_norm_workspace_bytes(K::DType::kFloat64, &layer, 1) >= (2 + 4 + 4) * 8;
  std::printf("%s power iteration workspace covers y, partial sums and v\n", ws_ok ? "ok  " : "FAIL");
  failures += !ws_ok;
  std::printf("%s\n", failures ? "FAILED" : "PASSED");
  return failures ? 1 : 0;
}
