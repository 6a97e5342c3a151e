// CUDA launch helpers shared by the .cu files.
#pragma once

#include <algorithm>
#include <cstdint>

namespace htc_fast {

constexpr int kThreadsPerBlock = 256;

// Blocks for a grid-stride loop over `total` items: enough to fill the GPU, never past the limit.
inline unsigned int blocks_for(int64_t total) {
  const int64_t blocks = (total + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

}  // namespace htc_fast

// for (int64_t i = first; i < n; i += stride): 64-bit indices, so K * C * H * W may pass 2^31.
#define HTC_CUDA_KERNEL_LOOP(i, n)                                                     \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
