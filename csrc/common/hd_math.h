// Math functions with one name on host and device. On the host, std:: gives the float overloads
// (plain ::log2(float) would silently compute in double); in device code CUDA's own overloads apply.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace htc_fast {
namespace hd {

#if defined(__CUDA_ARCH__)
#define HTC_HD_MATH(name) \
  template <typename T>   \
  HTC_HD T name(T x) {    \
    return ::name(x);     \
  }
#else
#define HTC_HD_MATH(name) \
  template <typename T>   \
  HTC_HD T name(T x) {    \
    return std::name(x);  \
  }
#endif
HTC_HD_MATH(floor)
HTC_HD_MATH(ceil)
HTC_HD_MATH(sqrt)
HTC_HD_MATH(log2)
#undef HTC_HD_MATH

template <typename T>
HTC_HD bool isfinite(T x) {
  // x - x is 0 for finite x and NaN for inf/NaN; avoids relying on host/device isfinite overloads.
  return (x - x) == (x - x);
}

// A product that the compiler may not fuse with a neighbouring add into an FMA. Where a result
// must agree bit for bit with a reference computed without FMAs (NMS decisions at the threshold),
// nvcc's default contraction (-fmad=true) would round differently; __fmul_rn is never contracted.
// (Host code is compiled with -ffp-contract=off, setup.py.)
#if defined(__CUDA_ARCH__)
HTC_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
HTC_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#else
template <typename T>
HTC_HD T mul_rn(T a, T b) {
  return a * b;
}
#endif

}  // namespace hd
}  // namespace htc_fast
