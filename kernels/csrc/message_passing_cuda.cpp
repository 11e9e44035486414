// Python binding and argument checks for the CUDA message-passing kernel (message_passing_cuda.cu).
#include <torch/extension.h>

#include <vector>
#include "source_digest.h"

torch::Tensor message_passing_cuda(const torch::Tensor& q, const torch::Tensor& kernel,
                                   const std::vector<int>& offsets);

namespace {

torch::Tensor message_passing(const torch::Tensor& q, const torch::Tensor& kernel, const torch::Tensor& offsets) {
  TORCH_CHECK(q.is_cuda() && kernel.is_cuda() && q.device() == kernel.device(),
              "message_passing_cuda: q and kernel must be on one CUDA device");
  TORCH_CHECK(q.dim() == 4 && kernel.dim() == 4, "message_passing_cuda: q and kernel must be 4-D");
  TORCH_CHECK(q.scalar_type() == kernel.scalar_type(), "message_passing_cuda: q and kernel dtypes differ");
  TORCH_CHECK(q.is_contiguous() && kernel.is_contiguous(), "message_passing_cuda: tensors must be contiguous");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.dim() == 2 && offsets.size(1) == 2 &&
                  offsets.scalar_type() == torch::kInt64,
              "message_passing_cuda: offsets must be a (K,2) int64 CPU tensor");
  const int64_t K = offsets.size(0);
  TORCH_CHECK(kernel.size(0) == 1 || kernel.size(0) == q.size(0), "message_passing_cuda: kernel batch must be 1 or B");
  TORCH_CHECK(kernel.size(1) == K && kernel.size(2) == q.size(2) && kernel.size(3) == q.size(3),
              "message_passing_cuda: kernel shape does not match q and offsets");
  const auto offs = offsets.contiguous();
  const int64_t* op = offs.data_ptr<int64_t>();
  std::vector<int> flat(op, op + 2 * K);
  return message_passing_cuda(q, kernel, flat);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("source_digest") = BOXMASK_SOURCE_DIGEST_STRING;
  m.def("message_passing", &message_passing, "Mean-field message passing (CUDA, one thread per output pixel)",
        pybind11::arg("q"), pybind11::arg("kernel"), pybind11::arg("offsets"));
}
