// Mean-field message passing on CUDA: one thread per output pixel (b, l, y, x).
//   out[b,l,y,x] = sum_k kernel[b|0,k,y,x] * q[b,l,y+dy_k,x+dx_k]   (zero outside the image)
// Consecutive threads take consecutive x, so the loads of kernel and q for one offset are coalesced.
// The offsets travel by value as a kernel parameter (constant bank, broadcast to the warp; no global symbol, so
// concurrent launches on different streams cannot race). The per-element maths is message_passing_element.h,
// which the CPU emulation (message_passing_cuda_emulation.cpp) shares so the tests check it without a GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>

#include "message_passing_element.h"

namespace {

using boxmask::kMaxOffsets;
using boxmask::Offsets;

template <typename scalar_t>
__global__ void message_passing_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ kernel,
                                       scalar_t* __restrict__ out, int64_t total, int64_t L, int64_t H,
                                       int64_t W, int K, Offsets offs, bool kernel_broadcast) {
  boxmask::message_passing_thread(q, kernel, out, blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,
                                  static_cast<int64_t>(gridDim.x) * blockDim.x, total, L, H, W, K, offs,
                                  kernel_broadcast);
}

}  // namespace

torch::Tensor message_passing_cuda(const torch::Tensor& q, const torch::Tensor& kernel,
                                   const std::vector<int>& offsets) {
  const int K = static_cast<int>(offsets.size() / 2);
  TORCH_CHECK(K <= kMaxOffsets, "message_passing_cuda: at most ", kMaxOffsets, " offsets, got ", K);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty_like(q);
  const int64_t total = q.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  Offsets offs{};
  for (int k = 0; k < K; ++k) {
    offs.dy[k] = offsets[2 * k];
    offs.dx[k] = offsets[2 * k + 1];
  }
  const int threads = 256;
  const int64_t blocks_needed = (total + threads - 1) / threads;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, 65535LL * 16));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "message_passing_cuda", [&] {
    message_passing_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        q.data_ptr<scalar_t>(), kernel.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), total, q.size(1),
        q.size(2), q.size(3), K, offs, kernel.size(0) == 1);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
