// Fused soft mean-field on the CPU (C++/OpenMP): every sweep of `kernels.meanfield.meanfield_sweeps_reference`
// for one RoI in one pass, two labels [bg, fg], the dilated 8-neighbourhood of `neighbour_offsets(3, d)`.
//
// Maths (the reference's, rewritten for two labels): the softmax over [bg, fg] of msg_l - theta_l is a sigmoid of
// the logit difference
//     z = (msg_fg - theta_fg) - (msg_bg - theta_bg) = sum_k w_k s(nb_k) - (theta_fg - theta_bg),  s = q_fg - q_bg
// (a neighbour outside the image adds nothing), so the state is the plane s, and c = theta_bg - theta_fg (-inf
// where fg is forbidden) is computed once per RoI. Propagating s rather than q_fg alone keeps the rounding of z
// at the reference's level (2 q_fg - sum_k w_k would cancel two large terms). The last z of every pixel is kept
// too, and the marginals are sigmoid(+-z) at the end, accurate even where one of them is tiny.
//
// Schedule: the four colour classes ((y/d)%2, (x/d)%2) in the reference's order (0,0), (0,1), (1,0), (1,1).
// Pixels of class (cy, cx) have neighbours only in rows of parity 1 - cy (unchanged while phase cy runs) and, in
// their own row, in class (cy, 1 - cx). So a phase can go row by row: the six vertical terms of a row are
// accumulated once (contiguous, vectorised over the valid x-range of each offset), then class cx = 0 and then
// cx = 1 of that row add their two horizontal terms and update -- the same result as four full-map passes.
// One RoI (32 KB of labels, 128 KB of float32 kernel for 64x64) stays in L2 for all its sweeps; RoIs run in
// parallel. Convergence is per RoI: it stops after the first sweep in which no q_fg moved more than tol.
#include <torch/extension.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#include "source_digest.h"

namespace {

// (fg, bg) = (sigmoid(z), sigmoid(-z)), each without cancellation (the smaller one is t / (1 + t)).
template <typename T>
inline void sigmoid_pair(T z, T& fg, T& bg) {
  const T t = vec_exp(-std::abs(z));
  const T big = T(1) / (T(1) + t);
  const T small = t * big;
  fg = z >= T(0) ? big : small;
  bg = z >= T(0) ? small : big;
}

template <typename T>
struct Roi {
  const T* theta;           // (2,H,W) [bg, fg]
  const T* kernel;          // (8,H,W)
  const uint8_t* allowed;   // (H,W)
  T* q;                     // (2,H,W) output [bg, fg]
};

// Updates s for the pixels of colour class cx (x_class[x] == cx) of one row and returns its largest change;
// z_new receives z = v + w_left s(x - d) + w_right s(x + d) for every pixel of the row. s_pad is the row's s
// before the update with d zeros either side (a neighbour outside the image adds nothing), so the loop needs no
// bounds tests and never reads what it writes. Every pixel is computed (contiguous, vectorised) and only class cx
// keeps its s: for d = 1 the class is every other pixel. (GCC does not vectorise this loop if it also selects
// into the z plane, hence z_new.)
template <typename T>
T update_row_class(const T* __restrict__ v, const T* __restrict__ w_left, const T* __restrict__ w_right,
                   const T* __restrict__ s_pad, T* __restrict__ s_row, T* __restrict__ z_new,
                   const T* __restrict__ x_class, int64_t W, int64_t d, T cx) {
  T delta = T(0);
#pragma omp simd reduction(max : delta)
  for (int64_t x = 0; x < W; ++x) {
    const T z = v[x] + w_left[x] * s_pad[x] + w_right[x] * s_pad[x + 2 * d];
    T fg, bg;
    sigmoid_pair(z, fg, bg);
    const bool mine = x_class[x] == cx;
    const T old_s = s_pad[x + d];
    delta = std::max(delta, mine ? std::abs(fg - bg - old_s) : T(0));
    s_row[x] = mine ? fg - bg : old_s;
    z_new[x] = z;
  }
  return delta;
}

// Offsets in neighbour_offsets(3, d) order: 0-2 the row above, 3 left, 4 right, 5-7 the row below.
constexpr int kVertical[6] = {0, 1, 2, 5, 6, 7};

// Runs the sweeps of one RoI, writes its marginals to r.q and returns the number of sweeps run.
template <typename T>
int64_t solve_roi(const Roi<T>& r, int64_t H, int64_t W, int64_t d, int64_t iters, T tol, T* scratch) {
  const int64_t P = H * W;
  // scratch: the planes c, s, z (H*W each), then the rows v (W), s_pad (W + 2d), z_new (W), x_class (W).
  T* c = scratch;
  T* s = c + P;
  T* z = s + P;
  T* v = z + P;
  T* s_pad = v + W;
  T* z_new = s_pad + W + 2 * d;
  T* x_class = z_new + W;  // (x / d) % 2 as T, so that the class test vectorises alongside T
  std::fill(s_pad, s_pad + W + 2 * d, T(0));
  for (int64_t x = 0; x < W; ++x) x_class[x] = static_cast<T>((x / d) % 2);
  const int64_t dys[8] = {-d, -d, -d, 0, 0, d, d, d};
  const int64_t dxs[8] = {-d, 0, d, -d, d, -d, 0, d};
  T* q_bg = r.q;
  T* q_fg = r.q + P;
  for (int64_t i = 0; i < P; ++i) {
    // The initial state is the masked softmax of -theta, z = theta_bg - theta_fg.
    c[i] = r.allowed[i] ? r.theta[i] - r.theta[P + i] : -std::numeric_limits<T>::infinity();
    z[i] = c[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < P; ++i) {
    T fg, bg;
    sigmoid_pair(z[i], fg, bg);
    s[i] = fg - bg;
  }
  int64_t sweeps = iters;
  for (int64_t sweep = 0; sweep < iters; ++sweep) {
    T delta = T(0);
    for (int64_t cy = 0; cy < 2; ++cy) {
      for (int64_t y = 0; y < H; ++y) {
        if ((y / d) % 2 != cy) continue;
        // v = c + the six terms from the rows y - d and y + d, each over the x-range whose neighbour exists.
        std::copy(c + y * W, c + (y + 1) * W, v);
        for (int k : kVertical) {
          const int64_t yy = y + dys[k];
          if (yy < 0 || yy >= H) continue;
          const int64_t x0 = std::max<int64_t>(0, -dxs[k]), x1 = std::min<int64_t>(W, W - dxs[k]);
          const T* __restrict__ kr = r.kernel + k * P + y * W;
          const T* __restrict__ sr = s + yy * W + dxs[k];
#pragma omp simd
          for (int64_t x = x0; x < x1; ++x) v[x] += kr[x] * sr[x];
        }
        for (int64_t cx = 0; cx < 2; ++cx) {
          std::copy(s + y * W, s + (y + 1) * W, s_pad + d);
          delta = std::max(delta, update_row_class(v, r.kernel + 3 * P + y * W, r.kernel + 4 * P + y * W, s_pad,
                                                   s + y * W, z_new, x_class, W, d, T(cx)));
          T* z_row = z + y * W;
          for (int64_t xb = cx * d; xb < W; xb += 2 * d) {
            const int64_t xe = std::min<int64_t>(W, xb + d);
            for (int64_t x = xb; x < xe; ++x) z_row[x] = z_new[x];
          }
        }
      }
    }
    // q_fg moves by half as much as s = 2 q_fg - 1.
    if (delta / T(2) <= tol) {
      sweeps = sweep + 1;
      break;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < P; ++i) sigmoid_pair(z[i], q_fg[i], q_bg[i]);
  return sweeps;
}

// One RoI per task, dynamically scheduled (RoIs converge after different numbers of sweeps).
template <typename T>
void solve_batch(const T* theta, const T* kernel, bool kernel_broadcast, const uint8_t* allowed, T* q,
                 int64_t* sweeps, int64_t N, int64_t H, int64_t W, int64_t d, int64_t iters, T tol, int threads) {
  const int64_t P = H * W;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> scratch(3 * P + 4 * W + 2 * d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < N; ++b) {
      const Roi<T> roi{theta + b * 2 * P, kernel + (kernel_broadcast ? 0 : b) * 8 * P, allowed + b * P, q + b * 2 * P};
      sweeps[b] = solve_roi<T>(roi, H, W, d, iters, tol, scratch.data());
    }
  }
}

// theta (N,2,H,W), kernel (N|1,8,H,W), allowed (N,H,W) uint8 -> (q (N,2,H,W), sweeps (N,) int64).
std::vector<torch::Tensor> meanfield_sweeps(const torch::Tensor& theta, const torch::Tensor& kernel,
                                            const torch::Tensor& allowed, int64_t dilation, int64_t iters,
                                            double tol, int64_t num_threads) {
  TORCH_CHECK(theta.device().is_cpu() && kernel.device().is_cpu() && allowed.device().is_cpu(),
              "meanfield_cpu: tensors must be on the CPU");
  TORCH_CHECK(theta.dim() == 4 && theta.size(1) == 2, "meanfield_cpu: theta must be (N,2,H,W)");
  TORCH_CHECK(kernel.dim() == 4 && kernel.size(1) == 8, "meanfield_cpu: kernel must be (N|1,8,H,W)");
  TORCH_CHECK(allowed.dim() == 3 && allowed.scalar_type() == torch::kUInt8, "meanfield_cpu: allowed must be (N,H,W) uint8");
  TORCH_CHECK(theta.scalar_type() == kernel.scalar_type(), "meanfield_cpu: theta and kernel dtypes differ");
  TORCH_CHECK(theta.is_contiguous() && kernel.is_contiguous() && allowed.is_contiguous(),
              "meanfield_cpu: tensors must be contiguous");
  TORCH_CHECK(dilation >= 1 && iters >= 0, "meanfield_cpu: need dilation >= 1 and iters >= 0");
  const int64_t N = theta.size(0), H = theta.size(2), W = theta.size(3);
  TORCH_CHECK((kernel.size(0) == 1 || kernel.size(0) == N) && kernel.size(2) == H && kernel.size(3) == W,
              "meanfield_cpu: kernel shape does not fit theta");
  TORCH_CHECK(allowed.size(0) == N && allowed.size(1) == H && allowed.size(2) == W,
              "meanfield_cpu: allowed shape does not fit theta");
  auto q = torch::empty_like(theta);
  auto sweeps = torch::zeros({N}, torch::kInt64);
  if (q.numel() == 0) return {q, sweeps};
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, N)));
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "meanfield_cpu", [&] {
    solve_batch<scalar_t>(theta.data_ptr<scalar_t>(), kernel.data_ptr<scalar_t>(), kernel.size(0) == 1,
                          allowed.data_ptr<uint8_t>(), q.data_ptr<scalar_t>(), sweeps.data_ptr<int64_t>(), N, H, W,
                          dilation, iters, static_cast<scalar_t>(tol), threads);
  });
  return {q, sweeps};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("source_digest") = BOXMASK_SOURCE_DIGEST_STRING;
  m.def("meanfield_sweeps", &meanfield_sweeps, "Fused soft mean-field sweeps (CPU, OpenMP)", pybind11::arg("theta"),
        pybind11::arg("kernel"), pybind11::arg("allowed"), pybind11::arg("dilation"), pybind11::arg("iters"),
        pybind11::arg("tol"), pybind11::arg("num_threads"));
}
