// CPU emulation of the CUDA message-passing kernel: every (block, thread) of a launch runs, one after the other,
// the same per-thread code as the device (message_passing_element.h), so the tests check the kernel's index
// arithmetic and grid-stride coverage on machines without a GPU. A testing aid, not a backend: it is slow.
#include <torch/extension.h>

#include <cstdint>
#include <limits>

#include "message_passing_element.h"

namespace {

// q (B,L,H,W), kernel (B|1,K,H,W), offsets (K,2) int64; the launch is blocks x threads (as on the device).
torch::Tensor message_passing_emulated(const torch::Tensor& q, const torch::Tensor& kernel,
                                       const torch::Tensor& offsets, int64_t blocks, int64_t threads) {
  TORCH_CHECK(q.device().is_cpu() && kernel.device().is_cpu(), "cuda emulation: tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 4 && kernel.dim() == 4 && q.scalar_type() == kernel.scalar_type(),
              "cuda emulation: q and kernel must be 4-D of one dtype");
  TORCH_CHECK(q.is_contiguous() && kernel.is_contiguous(), "cuda emulation: tensors must be contiguous");
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(1) == 2 && offsets.scalar_type() == torch::kInt64,
              "cuda emulation: offsets must be (K,2) int64");
  const int K = static_cast<int>(offsets.size(0));
  TORCH_CHECK(K <= boxmask::kMaxOffsets, "cuda emulation: too many offsets");
  TORCH_CHECK(blocks >= 1 && threads >= 1, "cuda emulation: need blocks, threads >= 1");
  boxmask::Offsets offs{};
  const auto op = offsets.contiguous();
  for (int k = 0; k < K; ++k) {
    offs.dy[k] = static_cast<int>(op[k][0].item<int64_t>());
    offs.dx[k] = static_cast<int>(op[k][1].item<int64_t>());
  }
  // NaN marks elements no thread wrote.
  auto out = torch::full_like(q, std::numeric_limits<double>::quiet_NaN());
  const int64_t total = q.numel();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "message_passing_emulated", [&] {
    for (int64_t block = 0; block < blocks; ++block) {
      for (int64_t thread = 0; thread < threads; ++thread) {
        boxmask::message_passing_thread<scalar_t>(q.data_ptr<scalar_t>(), kernel.data_ptr<scalar_t>(),
                                                  out.data_ptr<scalar_t>(), block * threads + thread,
                                                  blocks * threads, total, q.size(1), q.size(2), q.size(3), K,
                                                  offs, kernel.size(0) == 1);
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("message_passing_emulated", &message_passing_emulated,
        "The CUDA message-passing kernel's per-thread code run on the CPU for every thread of a launch",
        pybind11::arg("q"), pybind11::arg("kernel"), pybind11::arg("offsets"), pybind11::arg("blocks"),
        pybind11::arg("threads"));
}
