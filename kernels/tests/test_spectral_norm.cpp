// The spectral-norm kernels against a float64 CPU computation on the same (dtype-rounded) inputs:
// multi-tensor power iteration (u, v, sigma; dims 0 and 1; more layers than one launch holds),
// normalize forward and backward. Skips (77) without a GPU.
#include <cmath>
#include <cstdio>

#include "test_util.h"

namespace K = sagan_fast::kernels;
using test::DType;

namespace {

struct Weight {
  int64_t A, R, Bi;  // contiguous (A, R, Bi): matrix element (r, a*Bi + b)
};

double at(const std::vector<double>& w, const Weight& s, int64_t r, int64_t c) {
  const int64_t a = c / s.Bi, b = c % s.Bi;
  return w[(a * s.R + r) * s.Bi + b];
}

bool run(DType dt, int n_iter, std::mt19937_64& rng) {
  std::vector<Weight> shapes = {{1, 13, 7},  {1, 64, 27},  {5, 6, 9},   {1, 1, 300},
                                {1, 300, 1}, {16, 33, 1},  {1, 70, 130}, {1, 3, 2500}};
  while (shapes.size() < 30) shapes.push_back({1 + int64_t(shapes.size() % 3), 3 + int64_t(shapes.size()), 5});
  const double eps = 1e-12;
  const int L = int(shapes.size());
  std::vector<std::vector<double>> w(L), u(L), v(L);
  std::vector<test::DeviceBuffer*> dw, du, dv;
  std::vector<K::SpectralNormLayer> layers;
  for (int l = 0; l < L; ++l) {
    const Weight& s = shapes[l];
    w[l] = test::rounded(test::randn(s.A * s.R * s.Bi, rng), dt);
    u[l] = test::rounded(test::randn(s.R, rng), dt);
    v[l] = test::rounded(test::randn(s.A * s.Bi, rng), dt);
    dw.push_back(new test::DeviceBuffer(test::encode(w[l], dt)));
    du.push_back(new test::DeviceBuffer(test::encode(u[l], dt)));
    dv.push_back(new test::DeviceBuffer(test::encode(v[l], dt)));
    layers.push_back({dw[l]->ptr, du[l]->ptr, dv[l]->ptr, s.A, s.R, s.Bi, s.R * s.Bi, s.Bi, 1});
  }
  const size_t acc = dt == DType::kFloat64 ? 8 : 4;
  const DType acc_dt = acc == 8 ? DType::kFloat64 : DType::kFloat32;
  const size_t ws_bytes = K::spectral_norm_workspace_bytes(dt, layers.data(), L);
  test::DeviceBuffer ws(ws_bytes), sig(L * acc);
  TEST_CUDA(K::spectral_norm_power_iteration(dt, layers.data(), L, n_iter, eps, sig.ptr, ws.ptr, ws_bytes, nullptr));
  TEST_CUDA(cudaDeviceSynchronize());
  const auto sigmas = test::decode(sig.download(), acc_dt);

  // CPU: torch's order, u = normalize(W v), v = normalize(W^T u); sigma = u . W v.
  bool ok = true;
  const double tol = test::tolerance(dt);
  for (int l = 0; l < L; ++l) {
    const Weight& s = shapes[l];
    const int64_t C = s.A * s.Bi;
    std::vector<double> uu(s.R), vv = v[l];
    for (int it = 0; it < n_iter; ++it) {
      double nu = 0, nv = 0;
      for (int64_t r = 0; r < s.R; ++r) {
        uu[r] = 0;
        for (int64_t c = 0; c < C; ++c) uu[r] += at(w[l], s, r, c) * vv[c];
        nu += uu[r] * uu[r];
      }
      for (auto& x : uu) x /= std::fmax(std::sqrt(nu), eps);
      for (int64_t c = 0; c < C; ++c) {
        vv[c] = 0;
        for (int64_t r = 0; r < s.R; ++r) vv[c] += at(w[l], s, r, c) * uu[r];
        nv += vv[c] * vv[c];
      }
      for (auto& x : vv) x /= std::fmax(std::sqrt(nv), eps);
    }
    double sigma = 0;
    for (int64_t r = 0; r < s.R; ++r)
      for (int64_t c = 0; c < C; ++c) sigma += uu[r] * at(w[l], s, r, c) * vv[c];
    char name[96];
    std::snprintf(name, sizeof name, "%s iters=%d layer %d (%lld,%lld,%lld)", test::dtype_name(dt), n_iter, l,
                  (long long)s.A, (long long)s.R, (long long)s.Bi);
    const std::string base(name);
    ok &= test::check_close((base + " u").c_str(), test::decode(du[l]->download(), dt), uu, tol);
    ok &= test::check_close((base + " v").c_str(), test::decode(dv[l]->download(), dt), vv, tol);
    ok &= test::check_close((base + " sigma").c_str(), {sigmas[l]}, {sigma}, dt == DType::kFloat64 ? tol : 1e-5);
  }

  // normalize forward / backward with the sigmas just computed: layer 2 (A > 1, the flat
  // kernel), and dim-0 layers (A = 1, the division-free 2-D kernel): short rows, 70 rows of 130,
  // and rows of 2500 (several column blocks).
  for (const int l : {2, 1, 6, 7}) {
    const Weight& s = shapes[l];
    const int64_t n = s.A * s.R * s.Bi;
    const auto u_now = test::decode(du[l]->download(), dt), v_now = test::decode(dv[l]->download(), dt);
    const auto grad = test::rounded(test::randn(n, rng), dt);
    test::DeviceBuffer d_out(n * test::dtype_size(dt)), d_grad(test::encode(grad, dt)), d_gw(n * test::dtype_size(dt));
    test::DeviceBuffer sigma_one(acc);
    TEST_CUDA(cudaMemcpy(sigma_one.ptr, static_cast<char*>(sig.ptr) + l * acc, acc, cudaMemcpyDeviceToDevice));
    TEST_CUDA(K::spectral_norm_normalize_forward(dt, dw[l]->ptr, n, sigma_one.ptr, d_out.ptr, nullptr));
    const size_t bws = K::spectral_norm_normalize_backward_workspace_bytes(dt, n);
    test::DeviceBuffer d_bws(bws);
    TEST_CUDA(K::spectral_norm_normalize_backward(dt, d_grad.ptr, dw[l]->ptr, du[l]->ptr, dv[l]->ptr, sigma_one.ptr,
                                                  s.A, s.R, s.Bi, d_gw.ptr, d_bws.ptr, bws, nullptr));
    TEST_CUDA(cudaDeviceSynchronize());
    std::vector<double> w_sn(n), gw(n);
    double inner = 0;
    for (int64_t i = 0; i < n; ++i) {
      w_sn[i] = w[l][i] / sigmas[l];
      inner += grad[i] * w_sn[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = i % s.Bi, r = (i / s.Bi) % s.R, a = i / (s.Bi * s.R);
      gw[i] = (grad[i] - inner * u_now[r] * v_now[a * s.Bi + b]) / sigmas[l];
    }
    const std::string name = std::string(test::dtype_name(dt)) + " layer " + std::to_string(l) + " normalize";
    ok &= test::check_close((name + " forward").c_str(), test::decode(d_out.download(), dt), w_sn, tol);
    ok &= test::check_close((name + " backward").c_str(), test::decode(d_gw.download(), dt), gw, tol);
  }
  for (int i = 0; i < L; ++i) {
    delete dw[i];
    delete du[i];
    delete dv[i];
  }
  return ok;
}

}  // namespace

// Optional arguments: dtype names to run (fp16 bf16 fp32 fp64); default all.
bool selected(int argc, char** argv, DType dt) {
  if (argc < 2) return true;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == test::dtype_name(dt)) return true;
  return false;
}

int main(int argc, char** argv) {
  if (!test::have_gpu()) return test::skip_without_gpu("test_spectral_norm");
  std::mt19937_64 rng(42);
  int failures = 0;
  for (DType dt : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16})
    if (selected(argc, argv, dt))
      for (int n_iter : {1, 3}) failures += !run(dt, n_iter, rng);
  std::printf("%s\n", failures ? "FAILED" : "PASSED");
  return failures ? 1 : 0;
}
