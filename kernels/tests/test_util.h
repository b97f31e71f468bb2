// Helpers for the C++ kernel tests: GPU presence (skip with 77 when absent), random data, host
// 16-bit conversions, device buffers and error reports.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "sagan_fast_kernels.h"

namespace test {

using sagan_fast::kernels::DType;

constexpr int kSkip = 77;  // CMake SKIP_RETURN_CODE

inline bool have_gpu() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

inline int skip_without_gpu(const char* name) {
  std::printf("SKIPPED %s: no CUDA device\n", name);
  return kSkip;
}

#define TEST_CUDA(call)                                                                          \
  do {                                                                                           \
    cudaError_t err_ = (call);                                                                   \
    if (err_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

inline size_t dtype_size(DType t) {
  return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2;
}
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
    case DType::kFloat32: return "fp32";
    case DType::kFloat64: return "fp64";
  }
  return "?";
}

// Host values in double <-> raw bytes of the dtype (16-bit conversions round to nearest).
inline std::vector<unsigned char> encode(const std::vector<double>& x, DType t) {
  std::vector<unsigned char> out(x.size() * dtype_size(t));
  for (size_t i = 0; i < x.size(); ++i) {
    switch (t) {
      case DType::kFloat16: reinterpret_cast<__half*>(out.data())[i] = __double2half(x[i]); break;
      case DType::kBFloat16: reinterpret_cast<__nv_bfloat16*>(out.data())[i] = __double2bfloat16(x[i]); break;
      case DType::kFloat32: reinterpret_cast<float*>(out.data())[i] = float(x[i]); break;
      case DType::kFloat64: reinterpret_cast<double*>(out.data())[i] = x[i]; break;
    }
  }
  return out;
}
inline std::vector<double> decode(const std::vector<unsigned char>& b, DType t) {
  std::vector<double> out(b.size() / dtype_size(t));
  for (size_t i = 0; i < out.size(); ++i) {
    switch (t) {
      case DType::kFloat16: out[i] = __half2float(reinterpret_cast<const __half*>(b.data())[i]); break;
      case DType::kBFloat16: out[i] = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(b.data())[i]); break;
      case DType::kFloat32: out[i] = reinterpret_cast<const float*>(b.data())[i]; break;
      case DType::kFloat64: out[i] = reinterpret_cast<const double*>(b.data())[i]; break;
    }
  }
  return out;
}
// The values a tensor of this dtype actually holds (inputs rounded as the kernel sees them).
inline std::vector<double> rounded(const std::vector<double>& x, DType t) { return decode(encode(x, t), t); }

inline std::vector<double> randn(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<double> dist;
  std::vector<double> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) { TEST_CUDA(cudaMalloc(&ptr, n ? n : 1)); }
  DeviceBuffer(const std::vector<unsigned char>& host) : DeviceBuffer(host.size()) {
    TEST_CUDA(cudaMemcpy(ptr, host.data(), host.size(), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  std::vector<unsigned char> download() const {
    std::vector<unsigned char> host(bytes);
    TEST_CUDA(cudaMemcpy(host.data(), ptr, bytes, cudaMemcpyDeviceToHost));
    return host;
  }
};

// Tolerance for comparing against a float64 CPU computation on the dtype-rounded inputs: rounding
// of the result to the dtype plus accumulation in fp32 (fp16/bf16/fp32) or fp64, relative to the
// largest magnitude of the expected values.
inline double tolerance(DType t) {
  switch (t) {
    case DType::kFloat16: return 4e-3;   // fp16 eps 9.8e-4; P and dS are rounded to fp16 before the products
    case DType::kBFloat16: return 3e-2;  // bf16 eps 7.8e-3; idem
    case DType::kFloat32: return 1e-4;   // fp32 sums of up to ~1e3 terms
    case DType::kFloat64: return 1e-10;
  }
  return 0;
}

// Max |got - want| / max(1, max |want|); prints the worst index when above tol. Returns pass.
inline bool check_close(const char* what, const std::vector<double>& got, const std::vector<double>& want, double tol) {
  if (got.size() != want.size()) {
    std::printf("FAIL %s: size %zu != %zu\n", what, got.size(), want.size());
    return false;
  }
  double scale = 1.0, worst = 0.0;
  size_t worst_i = 0;
  for (double w : want) scale = std::fmax(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= worst)) {  // NaN counts as worst
      worst = std::isnan(err) ? INFINITY : err;
      worst_i = i;
    }
  }
  const bool ok = worst / scale <= tol;
  std::printf("%s %s: max err %.3g (relative to %.3g: %.3g, tol %.3g)", ok ? "ok  " : "FAIL", what, worst, scale,
              worst / scale, tol);
  if (!ok) std::printf(" worst at %zu: got %.8g want %.8g", worst_i, got[worst_i], want[worst_i]);
  std::printf("\n");
  return ok;
}

}  // namespace test
