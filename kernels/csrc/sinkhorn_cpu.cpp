// Sinkhorn scaling iterations on the CPU (C++/OpenMP): the inner loop of `kernels.sinkhorn.sinkhorn` for a batch
// of pairs, each pair on its own until it converges, runs out of iterations or needs its scalings absorbed.
//
// For a kernel K (n,m) (the absorbed K~ of the Python driver) and marginals a (n), b (m), starting from u = v = 1:
//     viol = ||u * (K v) - a||_1 + ||v * (K^T u) - b||_1;  stop when viol <= tol
//     v' = b / (K^T u);  u' = a / (K v')
// One pass over K per iteration: row i gives (K v')_i = K[i,:] . v', hence u'_i, and adds u'_i K[i,:] into the
// next K^T u' while the row is still in L1. (Two matrix-vector products would read K twice.)
// Pairs run in parallel (one pair per task), which is where a batch of correspondence problems has its work.
#include <torch/extension.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#include "source_digest.h"

namespace {

enum Status : int64_t {
  kConverged = 0,  // viol <= tol; u, v are the scalings that reached it
  kCapped = 1,     // max_iters iterations run; u, v are the last scalings
  kAbsorb = 2,     // the new scalings left the safe range but are finite and positive: u, v are the new ones
                   // (that iteration is counted); the driver absorbs them into its duals and rebuilds K
  kUnderflow = 3,  // a new scaling is 0, inf or NaN: u, v are the last safe ones (that iteration is not counted)
};

template <typename T>
struct Pair {
  const T* K;  // (n,m)
  const T* a;  // (n)
  const T* b;  // (m)
  T* u;        // (n) out
  T* v;        // (m) out
};

template <typename T>
inline bool safe(T x, T lo, T hi) {
  return x > lo && x < hi;  // false for NaN too
}

// Runs one pair; returns its status and writes its iterations and last violation.
template <typename T>
Status scale_pair(const Pair<T>& p, int64_t n, int64_t m, T tol, int64_t max_iters, T log_tau, T* scratch,
                  int64_t& iters, T& viol_out) {
  // scratch: k_v (n), u_new (n), kt_u (m), kt_new (m), v_new (m)
  T* k_v = scratch;
  T* u_new = k_v + n;
  T* kt_u = u_new + n;
  T* kt_new = kt_u + m;
  T* v_new = kt_new + m;
  const T lo = std::exp(-log_tau), hi = std::exp(log_tau);
  std::fill(p.u, p.u + n, T(1));
  std::fill(p.v, p.v + m, T(1));
  std::fill(kt_u, kt_u + m, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* __restrict__ row = p.K + i * m;
    T s = T(0);
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < m; ++j) {
      s += row[j];
      kt_u[j] += row[j];
    }
    k_v[i] = s;
  }
  iters = 0;
  while (true) {
    T viol = T(0);
    for (int64_t i = 0; i < n; ++i) viol += std::abs(p.u[i] * k_v[i] - p.a[i]);
#pragma omp simd reduction(+ : viol)
    for (int64_t j = 0; j < m; ++j) viol += std::abs(p.v[j] * kt_u[j] - p.b[j]);
    viol_out = viol;
    if (viol <= tol) return kConverged;
    if (iters >= max_iters) return kCapped;
    bool ok = true, finite = true;
    for (int64_t j = 0; j < m; ++j) {
      v_new[j] = p.b[j] / kt_u[j];
      ok = ok && safe(v_new[j], lo, hi);
      finite = finite && v_new[j] > T(0) && std::isfinite(v_new[j]);
    }
    std::fill(kt_new, kt_new + m, T(0));
    for (int64_t i = 0; i < n; ++i) {
      const T* __restrict__ row = p.K + i * m;
      T s = T(0);
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < m; ++j) s += row[j] * v_new[j];
      const T ui = p.a[i] / s;
      u_new[i] = ui;
      k_v[i] = s;
      ok = ok && safe(ui, lo, hi);
      finite = finite && ui > T(0) && std::isfinite(ui);
      T* __restrict__ acc = kt_new;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) acc[j] += ui * row[j];
    }
    if (!ok) {
      if (!finite) return kUnderflow;
      std::copy(u_new, u_new + n, p.u);
      std::copy(v_new, v_new + m, p.v);
      ++iters;
      return kAbsorb;
    }
    std::copy(u_new, u_new + n, p.u);
    std::copy(v_new, v_new + m, p.v);
    std::swap(kt_u, kt_new);
    ++iters;
  }
}

// One pair per task, dynamically scheduled (pairs need different numbers of iterations). Kept out of the
// AT_DISPATCH macro: pragmas inside a macro argument do not compile.
template <typename T>
void scale_batch(const T* K, const T* a, const T* b, const T* tol, const int64_t* max_iters, T* u, T* v, T* viol,
                 int64_t* iters, int64_t* status, int64_t B, int64_t n, int64_t m, T log_tau, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> scratch(2 * n + 3 * m);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < B; ++k) {
      const Pair<T> pair{K + k * n * m, a + k * n, b + k * m, u + k * n, v + k * m};
      status[k] = scale_pair<T>(pair, n, m, tol[k], max_iters[k], log_tau, scratch.data(), iters[k], viol[k]);
    }
  }
}

// K[k,i,j] = exp((f[k,i] + g[k,j] - C[k,i,j]) / eps), rows in parallel. Kept out of AT_DISPATCH (pragmas).
template <typename T>
void absorbed_kernel(const T* C, const T* f, const T* g, T* K, int64_t B, int64_t n, int64_t m, T inv_eps,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < B * n; ++row) {
    const int64_t k = row / n;
    const T fi = f[row];
    const T* __restrict__ c = C + row * m;
    const T* __restrict__ gk = g + k * m;
    T* __restrict__ out = K + row * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) out[j] = vec_exp((fi + gk[j] - c[j]) * inv_eps);
  }
}

// cost (B,n,m), f (B,n), g (B,m) -> K~ (B,n,m): one pass, no temporaries.
torch::Tensor sinkhorn_kernel(const torch::Tensor& cost, const torch::Tensor& f, const torch::Tensor& g, double eps,
                              int64_t num_threads) {
  TORCH_CHECK(cost.device().is_cpu() && f.device().is_cpu() && g.device().is_cpu(),
              "sinkhorn_cpu: tensors must be on the CPU");
  TORCH_CHECK(cost.dim() == 3, "sinkhorn_cpu: cost must be (B,n,m)");
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  TORCH_CHECK(f.dim() == 2 && f.size(0) == B && f.size(1) == n, "sinkhorn_cpu: f must be (B,n)");
  TORCH_CHECK(g.dim() == 2 && g.size(0) == B && g.size(1) == m, "sinkhorn_cpu: g must be (B,m)");
  TORCH_CHECK(f.scalar_type() == cost.scalar_type() && g.scalar_type() == cost.scalar_type(),
              "sinkhorn_cpu: cost, f and g must share a dtype");
  TORCH_CHECK(cost.is_contiguous() && f.is_contiguous() && g.is_contiguous(), "sinkhorn_cpu: tensors must be contiguous");
  TORCH_CHECK(eps > 0, "sinkhorn_cpu: eps must be positive");
  auto K = torch::empty_like(cost);
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "sinkhorn_kernel", [&] {
    absorbed_kernel<scalar_t>(cost.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                              K.data_ptr<scalar_t>(), B, n, m, static_cast<scalar_t>(1.0 / eps), threads);
  });
  return K;
}

// kern (B,n,m), a (B,n), b (B,m), tol (B,), max_iters (B,) int64 ->
// (u (B,n), v (B,m), iters (B,) int64, viol (B,), status (B,) int64).
std::vector<torch::Tensor> sinkhorn_scale(const torch::Tensor& kern, const torch::Tensor& a, const torch::Tensor& b,
                                          const torch::Tensor& tol, const torch::Tensor& max_iters, double log_tau,
                                          int64_t num_threads) {
  TORCH_CHECK(kern.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu() && tol.device().is_cpu() &&
                  max_iters.device().is_cpu(),
              "sinkhorn_cpu: tensors must be on the CPU");
  TORCH_CHECK(kern.dim() == 3, "sinkhorn_cpu: kern must be (B,n,m)");
  const int64_t B = kern.size(0), n = kern.size(1), m = kern.size(2);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == B && a.size(1) == n, "sinkhorn_cpu: a must be (B,n)");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == B && b.size(1) == m, "sinkhorn_cpu: b must be (B,m)");
  TORCH_CHECK(tol.dim() == 1 && tol.size(0) == B, "sinkhorn_cpu: tol must be (B,)");
  TORCH_CHECK(max_iters.dim() == 1 && max_iters.size(0) == B && max_iters.scalar_type() == torch::kInt64,
              "sinkhorn_cpu: max_iters must be (B,) int64");
  TORCH_CHECK(a.scalar_type() == kern.scalar_type() && b.scalar_type() == kern.scalar_type() &&
                  tol.scalar_type() == kern.scalar_type(),
              "sinkhorn_cpu: kern, a, b and tol must share a dtype");
  TORCH_CHECK(kern.is_contiguous() && a.is_contiguous() && b.is_contiguous() && tol.is_contiguous() &&
                  max_iters.is_contiguous(),
              "sinkhorn_cpu: tensors must be contiguous");
  auto u = torch::empty_like(a);
  auto v = torch::empty_like(b);
  auto iters = torch::zeros({B}, torch::kInt64);
  auto viol = torch::empty_like(tol);
  auto status = torch::zeros({B}, torch::kInt64);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, B)));
  AT_DISPATCH_FLOATING_TYPES(kern.scalar_type(), "sinkhorn_cpu", [&] {
    scale_batch<scalar_t>(kern.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                          tol.data_ptr<scalar_t>(), max_iters.data_ptr<int64_t>(), u.data_ptr<scalar_t>(),
                          v.data_ptr<scalar_t>(), viol.data_ptr<scalar_t>(), iters.data_ptr<int64_t>(),
                          status.data_ptr<int64_t>(), B, n, m, static_cast<scalar_t>(log_tau), threads);
  });
  return {u, v, iters, viol, status};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("source_digest") = BOXMASK_SOURCE_DIGEST_STRING;
  m.def("sinkhorn_kernel", &sinkhorn_kernel, "exp((f_i + g_j - C_ij) / eps) (CPU, OpenMP)", pybind11::arg("cost"),
        pybind11::arg("f"), pybind11::arg("g"), pybind11::arg("eps"), pybind11::arg("num_threads"));
  m.def("sinkhorn_scale", &sinkhorn_scale, "Sinkhorn scaling iterations per pair (CPU, OpenMP)",
        pybind11::arg("kern"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("tol"),
        pybind11::arg("max_iters"), pybind11::arg("log_tau"), pybind11::arg("num_threads"));
}
