// HTC_HD marks arithmetic shared by the C++ (CPU) and CUDA kernels: compiled for both, so the CPU
// tests exercise the exact code the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HTC_HD __host__ __device__ __forceinline__
#else
#define HTC_HD inline
#endif
