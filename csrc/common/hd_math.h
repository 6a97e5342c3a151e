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

}  // namespace hd
}  // namespace htc_fast
