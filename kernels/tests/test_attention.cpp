// The attention kernels against a float64 CPU computation on the same (dtype-rounded) inputs:
// forward output and logsumexp, and the three gradients; odd sizes, E != Ev, Nk != N, a
// transposed (feature-major) layout. Skips (77) without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "test_util.h"

namespace K = sagan_fast::kernels;
using test::DType;

namespace {

struct Case {
  int64_t B, N, Nk, E, Ev;
  double scale;
  bool transposed;  // q, k, v stored (B, features, tokens) and read through strides
};

// Element (b, i, e) of a (B, rows, cols) tensor stored row-major or transposed.
struct Layout {
  int64_t rows, cols;
  bool transposed;
  int64_t sb() const { return rows * cols; }
  int64_t sr() const { return transposed ? 1 : cols; }
  int64_t sc() const { return transposed ? rows : 1; }
  int64_t at(int64_t b, int64_t i, int64_t e) const { return b * sb() + i * sr() + e * sc(); }
};

bool run_case(const Case& c, DType dt, std::mt19937_64& rng) {
  const Layout lq{c.N, c.E, c.transposed}, lk{c.Nk, c.E, c.transposed}, lv{c.Nk, c.Ev, c.transposed};
  const Layout lo{c.N, c.Ev, false};
  auto q = test::rounded(test::randn(c.B * c.N * c.E, rng), dt);
  auto k = test::rounded(test::randn(c.B * c.Nk * c.E, rng), dt);
  auto v = test::rounded(test::randn(c.B * c.Nk * c.Ev, rng), dt);
  auto dout = test::rounded(test::randn(c.B * c.N * c.Ev, rng), dt);

  // CPU reference in float64.
  std::vector<double> out(c.B * c.N * c.Ev, 0.0), lse(c.B * c.N), dq(q.size(), 0.0), dk(k.size(), 0.0),
      dv(v.size(), 0.0);
  std::vector<double> p(c.Nk), dp(c.Nk);
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t i = 0; i < c.N; ++i) {
      double mx = -INFINITY;
      for (int64_t j = 0; j < c.Nk; ++j) {
        double s = 0;
        for (int64_t e = 0; e < c.E; ++e) s += q[lq.at(b, i, e)] * k[lk.at(b, j, e)];
        p[j] = s * c.scale;
        mx = std::max(mx, p[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < c.Nk; ++j) sum += std::exp(p[j] - mx);
      lse[b * c.N + i] = mx + std::log(sum);
      for (int64_t j = 0; j < c.Nk; ++j) p[j] = std::exp(p[j] - lse[b * c.N + i]);
      double delta = 0;
      for (int64_t e = 0; e < c.Ev; ++e) {
        double o = 0;
        for (int64_t j = 0; j < c.Nk; ++j) o += p[j] * v[lv.at(b, j, e)];
        out[lo.at(b, i, e)] = o;
        delta += o * dout[lo.at(b, i, e)];
      }
      for (int64_t j = 0; j < c.Nk; ++j) {
        dp[j] = 0;
        for (int64_t e = 0; e < c.Ev; ++e) {
          dp[j] += dout[lo.at(b, i, e)] * v[lv.at(b, j, e)];
          dv[lv.at(b, j, e)] += p[j] * dout[lo.at(b, i, e)];
        }
        const double ds = c.scale * p[j] * (dp[j] - delta);
        for (int64_t e = 0; e < c.E; ++e) {
          dq[lq.at(b, i, e)] += ds * k[lk.at(b, j, e)];
          dk[lk.at(b, j, e)] += ds * q[lq.at(b, i, e)];
        }
      }
    }
  }

  const size_t acc = dt == DType::kFloat64 ? 8 : 4;
  test::DeviceBuffer d_q(test::encode(q, dt)), d_k(test::encode(k, dt)), d_v(test::encode(v, dt)),
      d_dout(test::encode(dout, dt));
  test::DeviceBuffer d_out(out.size() * test::dtype_size(dt)), d_lse(lse.size() * acc);
  test::DeviceBuffer d_dq(q.size() * test::dtype_size(dt)), d_dk(k.size() * test::dtype_size(dt)),
      d_dv(v.size() * test::dtype_size(dt));
  const K::AttentionProblem prob{dt, c.B, c.N, c.Nk, c.E, c.Ev, c.scale};
  auto in = [](const test::DeviceBuffer& d, const Layout& l) { return K::Strided3{d.ptr, l.sb(), l.sr(), l.sc()}; };
  auto mut = [](test::DeviceBuffer& d, const Layout& l) { return K::MutableStrided3{d.ptr, l.sb(), l.sr(), l.sc()}; };
  TEST_CUDA(K::sagan_attention_forward(prob, in(d_q, lq), in(d_k, lk), in(d_v, lv), mut(d_out, lo), d_lse.ptr, nullptr));
  const size_t ws_bytes = K::sagan_attention_backward_workspace_bytes(prob);
  test::DeviceBuffer d_ws(ws_bytes);
  TEST_CUDA(K::sagan_attention_backward(prob, in(d_q, lq), in(d_k, lk), in(d_v, lv), in(d_out, lo), in(d_dout, lo),
                                        d_lse.ptr, mut(d_dq, lq), mut(d_dk, lk), mut(d_dv, lv), d_ws.ptr, ws_bytes,
                                        nullptr));
  TEST_CUDA(cudaDeviceSynchronize());

  char name[160];
  std::snprintf(name, sizeof name, "%s B%lld N%lld Nk%lld E%lld Ev%lld%s", test::dtype_name(dt), (long long)c.B,
                (long long)c.N, (long long)c.Nk, (long long)c.E, (long long)c.Ev, c.transposed ? " transposed" : "");
  const double tol = test::tolerance(dt);
  bool ok = true;
  const std::string base(name);
  ok &= test::check_close((base + " out").c_str(), test::decode(d_out.download(), dt), out, tol);
  ok &= test::check_close((base + " lse").c_str(), test::decode(d_lse.download(), acc == 8 ? DType::kFloat64 : DType::kFloat32),
                          lse, dt == DType::kFloat64 ? tol : 1e-5);
  ok &= test::check_close((base + " dq").c_str(), test::decode(d_dq.download(), dt), dq, tol);
  ok &= test::check_close((base + " dk").c_str(), test::decode(d_dk.download(), dt), dk, tol);
  ok &= test::check_close((base + " dv").c_str(), test::decode(d_dv.download(), dt), dv, tol);
  return ok;
}

}  // namespace

// Optional arguments: dtype names to run (fp16 bf16 fp32 fp64); default all.
bool selected(int argc, char** argv, DType dt) {
  bool any = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a(argv[i]);
    if (a == test::dtype_name(dt)) return true;
    any |= a == "fp16" || a == "bf16" || a == "fp32" || a == "fp64";
  }
  return !any;
}

int main(int argc, char** argv) {
  if (!test::have_gpu()) return test::skip_without_gpu("test_attention");
  std::mt19937_64 rng(1234);
  const Case cases[] = {
      {1, 37, 37, 5, 11, 1.0, false},     {3, 19, 45, 8, 13, 0.37, false}, {2, 130, 70, 32, 200, 1.0, false},
      {2, 97, 131, 59, 111, 0.125, true}, {1, 65, 64, 128, 512, 0.05, false}, {2, 64, 257, 16, 8, 1.0, true},
      {2, 40, 50, 16, 32, 1.0, false},  // E, Ev multiples of 8: the 16-byte load path (cp.async)
      // Ev = 128: two backward Ev chunks (an even count: the double buffers alternate per stage,
      // the moving tiles per loop tile), cp.async path and the transposed one.
      {1, 23, 70, 16, 128, 0.5, false}, {1, 23, 70, 16, 128, 0.5, true},
  };
  const DType dtypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16};
  int failures = 0;
  // "quick": the smallest cases only (for the CPU emulator, which is slow).
  bool quick = false;
  for (int i = 1; i < argc; ++i) quick |= std::string(argv[i]) == "quick";
  for (DType dt : dtypes)
    if (selected(argc, argv, dt))
      for (const Case& c : cases)
        if (!quick || c.N * c.Nk * c.Ev <= 64 * 257 * 13) failures += !run_case(c, dt, rng);
  std::printf("%s\n", failures ? "FAILED" : "PASSED");
  return failures ? 1 : 0;
}
