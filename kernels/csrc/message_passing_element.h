// One output element, and one thread's grid-stride loop, of mean-field message passing, shared by the CUDA kernel (message_passing_cuda.cu) and its
// CPU emulation (message_passing_cuda_emulation.cpp), so that the kernel's index arithmetic is tested on machines
// without a GPU:
//   out[i] = sum_k kernel[b|0,k,y,x] * q[b,l,y+dy_k,x+dx_k]   (zero outside the image), i = ((b*L + l)*H + y)*W + x
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define BOXMASK_HOST_DEVICE __host__ __device__
#else
#define BOXMASK_HOST_DEVICE
#endif

namespace boxmask {

constexpr int kMaxOffsets = 64;

// The offsets travel by value as a kernel parameter (constant bank, broadcast to the warp).
struct Offsets {
  int dy[kMaxOffsets];
  int dx[kMaxOffsets];
};

template <typename scalar_t>
BOXMASK_HOST_DEVICE inline scalar_t message_passing_element(const scalar_t* __restrict__ q,
                                                            const scalar_t* __restrict__ kernel, int64_t i,
                                                            int64_t L, int64_t H, int64_t W, int K,
                                                            const Offsets& offs, bool kernel_broadcast) {
  const int64_t plane = H * W;
  const int64_t x = i % W;
  const int64_t y = (i / W) % H;
  const int64_t bl = i / plane;  // b * L + l
  const int64_t b = bl / L;
  const scalar_t* kern = kernel + (kernel_broadcast ? 0 : b) * K * plane + y * W + x;
  const scalar_t* qp = q + bl * plane;
  scalar_t acc = 0;
  for (int k = 0; k < K; ++k) {
    const int64_t yy = y + offs.dy[k];
    const int64_t xx = x + offs.dx[k];
    if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
      acc += kern[k * plane] * qp[yy * W + xx];
    }
  }
  return acc;
}

// The work of one CUDA thread (a grid-stride loop): elements first, first + stride, ... below total.
template <typename scalar_t>
BOXMASK_HOST_DEVICE inline void message_passing_thread(const scalar_t* __restrict__ q,
                                                       const scalar_t* __restrict__ kernel,
                                                       scalar_t* __restrict__ out, int64_t first, int64_t stride,
                                                       int64_t total, int64_t L, int64_t H, int64_t W, int K,
                                                       const Offsets& offs, bool kernel_broadcast) {
  for (int64_t i = first; i < total; i += stride) {
    out[i] = message_passing_element(q, kernel, i, L, H, W, K, offs, kernel_broadcast);
  }
}

}  // namespace boxmask
