// Mean-field message passing on the CPU (C++/OpenMP):
//   out[b,l,y,x] = sum_k kernel[b|0,k,y,x] * q[b,l,y+dy_k,x+dx_k]   (zero outside the image)
//
// Work is split over (RoI, row) pairs. For one output row, every offset k touches one contiguous run of x
// whose valid range is computed once per (row, k); the innermost loop is then a branch-free fused multiply-add
// over three contiguous rows, which the compiler vectorises. The kernel row of offset k is reused for all L
// labels while it sits in L1, so each kernel value is read from memory once per call.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#include "source_digest.h"

namespace {

template <typename scalar_t>
void message_passing_rows(const scalar_t* __restrict__ q, const scalar_t* __restrict__ kernel,
                          scalar_t* __restrict__ out, const std::vector<int64_t>& dys,
                          const std::vector<int64_t>& dxs, int64_t B, int64_t L, int64_t H, int64_t W,
                          bool kernel_broadcast, int num_threads) {
  const int64_t K = static_cast<int64_t>(dys.size());
  const int64_t plane = H * W;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t y = 0; y < H; ++y) {
      const scalar_t* kern_b = kernel + (kernel_broadcast ? 0 : b) * K * plane;
      for (int64_t l = 0; l < L; ++l) {
        scalar_t* __restrict__ o = out + ((b * L + l) * H + y) * W;
        std::fill(o, o + W, scalar_t(0));
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t yy = y + dys[k];
        if (yy < 0 || yy >= H) continue;
        const int64_t dx = dxs[k];
        const int64_t x0 = std::max<int64_t>(0, -dx);
        const int64_t x1 = std::min<int64_t>(W, W - dx);
        if (x0 >= x1) continue;
        const scalar_t* __restrict__ kr = kern_b + k * plane + y * W;
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t* __restrict__ qr = q + ((b * L + l) * H + yy) * W + dx;
          scalar_t* __restrict__ o = out + ((b * L + l) * H + y) * W;
#pragma omp simd
          for (int64_t x = x0; x < x1; ++x) {
            o[x] += kr[x] * qr[x];
          }
        }
      }
    }
  }
}

torch::Tensor message_passing(const torch::Tensor& q, const torch::Tensor& kernel, const torch::Tensor& offsets,
                              int64_t num_threads) {
  TORCH_CHECK(q.device().is_cpu() && kernel.device().is_cpu(), "message_passing_cpu: tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 4 && kernel.dim() == 4, "message_passing_cpu: q and kernel must be 4-D");
  TORCH_CHECK(q.scalar_type() == kernel.scalar_type(), "message_passing_cpu: q and kernel dtypes differ");
  TORCH_CHECK(q.is_contiguous() && kernel.is_contiguous(), "message_passing_cpu: tensors must be contiguous");
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(1) == 2 && offsets.scalar_type() == torch::kInt64,
              "message_passing_cpu: offsets must be a (K,2) int64 tensor");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t K = offsets.size(0);
  TORCH_CHECK(kernel.size(0) == 1 || kernel.size(0) == B, "message_passing_cpu: kernel batch must be 1 or B");
  TORCH_CHECK(kernel.size(1) == K && kernel.size(2) == H && kernel.size(3) == W,
              "message_passing_cpu: kernel shape does not match q and offsets");

  const auto offs = offsets.contiguous();
  const int64_t* op = offs.data_ptr<int64_t>();
  std::vector<int64_t> dys(K), dxs(K);
  for (int64_t k = 0; k < K; ++k) {
    dys[k] = op[2 * k];
    dxs[k] = op[2 * k + 1];
  }
  auto out = torch::empty_like(q);
  if (out.numel() == 0) return out;
  const bool broadcast = kernel.size(0) == 1;
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "message_passing_cpu", [&] {
    message_passing_rows<scalar_t>(q.data_ptr<scalar_t>(), kernel.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                   dys, dxs, B, L, H, W, broadcast, threads);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("source_digest") = BOXMASK_SOURCE_DIGEST_STRING;
  m.def("message_passing", &message_passing, "Mean-field message passing (CPU, OpenMP)", pybind11::arg("q"),
        pybind11::arg("kernel"), pybind11::arg("offsets"), pybind11::arg("num_threads"));
}
