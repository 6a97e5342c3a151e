// RoIAlign on CUDA: forward and backward, single map and FPN multi-level, one template each.
//
// Forward: one thread per output element (k, c, py, px), grid-stride loop, 64-bit indices. The
// thread plans its RoI (level, batch, grid: roi_align_common.h, the same code the CPU runs), then
// visits only the in-map samples of its bin. For NCHW maps consecutive threads take consecutive
// px (nearby reads); for channels-last maps they take consecutive channels (coalesced reads).
// Accumulation in at::opmath_type (fp32 for half/bf16). Output contiguous (K, C, out_h, out_w).
// Backward: one thread per grad element, atomicAdd into fp32 (fp64) buffers: not deterministic
// (the CPU backward is), so it raises under torch.use_deterministic_algorithms(True) as
// torchvision's does; the buffers are cast to the gradient dtype at the end.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_helpers.cuh"
#include "roi_align/roi_align_host.h"

namespace htc_fast {
namespace roi_align {
namespace {

// Calls f(offsets[4], weights[4]) for every in-map sample of bin (py, px) of a planned RoI.
template <typename acc_t, typename data_t, typename F>
__device__ __forceinline__ void for_each_sample(const RoiPlan<acc_t>& plan, const Level<data_t, acc_t>& lv,
                                                int64_t py, int64_t px, F&& f) {
  const RoiGrid<acc_t>& g = plan.grid;
  const SampleRange ry = sample_range(g.start_h, g.bin_h, py, g.grid_h, lv.height);
  const SampleRange rx = sample_range(g.start_w, g.bin_w, px, g.grid_w, lv.width);
  for (int64_t iy = ry.begin; iy < ry.end; ++iy) {
    const AxisTap<acc_t> ty = axis_tap(sample_coord(g.start_h, g.bin_h, py, iy, g.grid_h), lv.height);
    if (!ty.valid) continue;
    for (int64_t ix = rx.begin; ix < rx.end; ++ix) {
      const AxisTap<acc_t> tx = axis_tap(sample_coord(g.start_w, g.bin_w, px, ix, g.grid_w), lv.width);
      if (!tx.valid) continue;
      const int64_t o[4] = {ty.lo * lv.stride_h + tx.lo * lv.stride_w, ty.lo * lv.stride_h + tx.hi * lv.stride_w,
                            ty.hi * lv.stride_h + tx.lo * lv.stride_w, ty.hi * lv.stride_h + tx.hi * lv.stride_w};
      const acc_t w[4] = {ty.w_lo * tx.w_lo, ty.w_lo * tx.w_hi, ty.w_hi * tx.w_lo, ty.w_hi * tx.w_hi};
      f(o, w);
    }
  }
}

template <typename scalar_t, bool kChannelsLast>
__global__ void roi_align_forward_kernel(const Levels<const scalar_t, at::opmath_type<scalar_t>> levels,
                                         const at::opmath_type<scalar_t>* __restrict__ rois,
                                         int64_t channels, int64_t ph, int64_t pw,
                                         int64_t sampling_ratio, bool aligned,
                                         scalar_t* __restrict__ out, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  HTC_CUDA_KERNEL_LOOP(idx, total) {
    int64_t k, c, py, px, t;
    if (kChannelsLast) {
      c = idx % channels; t = idx / channels;
      px = t % pw; t /= pw;
      py = t % ph; k = t / ph;
    } else {
      px = idx % pw; t = idx / pw;
      py = t % ph; t /= ph;
      c = t % channels; k = t / channels;
    }
    const RoiPlan<acc_t> plan = plan_roi(rois + 5 * k, levels, ph, pw, sampling_ratio, aligned);
    acc_t sum = 0;
    if (plan.active) {
      const auto& lv = levels.level[plan.level];
      const scalar_t* p = lv.data + plan.batch * lv.stride_n + c * lv.stride_c;
      for_each_sample(plan, lv, py, px, [&](const int64_t* o, const acc_t* w) {
        sum += w[0] * acc_t(p[o[0]]) + w[1] * acc_t(p[o[1]]) + w[2] * acc_t(p[o[2]]) + w[3] * acc_t(p[o[3]]);
      });
      sum /= plan.grid.count;
    }
    out[((k * channels + c) * ph + py) * pw + px] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t>
__global__ void roi_align_backward_kernel(const Levels<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> grads,
                                          const at::opmath_type<scalar_t>* __restrict__ rois,
                                          const scalar_t* __restrict__ grad_out, int64_t channels,
                                          int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned,
                                          int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  HTC_CUDA_KERNEL_LOOP(idx, total) {
    const int64_t px = idx % pw, py = (idx / pw) % ph, c = (idx / (pw * ph)) % channels;
    const int64_t k = idx / (pw * ph * channels);
    const RoiPlan<acc_t> plan = plan_roi(rois + 5 * k, grads, ph, pw, sampling_ratio, aligned);
    if (!plan.active) continue;
    const auto& lv = grads.level[plan.level];
    acc_t* plane = lv.data + plan.batch * lv.stride_n + c * lv.stride_c;
    const acc_t g = static_cast<acc_t>(grad_out[idx]);
    const acc_t count = plan.grid.count;
    for_each_sample(plan, lv, py, px, [&](const int64_t* o, const acc_t* w) {
      for (int i = 0; i < 4; ++i) gpuAtomicAdd(plane + o[i], g * w[i] / count);
    });
  }
}

at::Tensor forward_cuda(const char* op, at::TensorList features, const at::Tensor& rois_in,
                        at::ArrayRef<double> scales, int64_t ph, int64_t pw, int64_t sampling_ratio,
                        bool aligned, bool map_levels, double finest_scale) {
  check_forward_args(op, features, rois_in, scales, ph, pw);
  const c10::cuda::CUDAGuard guard(features[0].device());
  const at::Tensor rois = rois_in.contiguous();
  const int64_t channels = features[0].size(1);
  at::Tensor out = at::empty({rois.size(0), channels, ph, pw}, features[0].options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const std::vector<at::Tensor> maps(features.begin(), features.end());
  // One layout per launch: channels-last only if every map is (then channels are the fast axis).
  bool channels_last = true;
  for (const auto& m : maps) channels_last = channels_last && m.stride(1) < m.stride(3);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(), "roi_align", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto levels = make_levels<const scalar_t, acc_t>(maps, scales, map_levels, finest_scale);
    auto kernel = channels_last ? roi_align_forward_kernel<scalar_t, true>
                                : roi_align_forward_kernel<scalar_t, false>;
    // htc:max-regs roi_align_forward_kernel 72 fp64=104: 256-thread blocks, 3 per SM (37.5 %
    // occupancy; 2 for fp64, not a speed path). The loop is gather-bound; 72 is what the RoI plan
    // and two sample ranges cost without spilling.
    kernel<<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
        levels, rois.data_ptr<acc_t>(), channels, ph, pw, sampling_ratio, aligned,
        out.data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> backward_cuda(const char* op, const at::Tensor& grad_in, const at::Tensor& rois_in,
                                      at::ArrayRef<double> scales, int64_t ph, int64_t pw,
                                      at::IntArrayRef heights, at::IntArrayRef widths, int64_t batch_size,
                                      int64_t channels, int64_t sampling_ratio, bool aligned,
                                      bool map_levels, double finest_scale) {
  check_backward_args(op, grad_in, rois_in, ph, pw, channels);
  TORCH_CHECK(heights.size() == scales.size() && widths.size() == scales.size(), op,
              ": one height and width per level expected");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  // Atomic accumulation: summation order varies run to run.
  at::globalContext().alertNotDeterministic(op);
  const at::Tensor grad = grad_in.contiguous(), rois = rois_in.contiguous();
  std::vector<at::Tensor> bufs = grad_buffers(grad, heights, widths, batch_size, channels);
  const int64_t total = grad.numel();
  if (total == 0) return cast_grads(bufs, grad.scalar_type());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto levels = make_levels<acc_t, acc_t>(bufs, scales, map_levels, finest_scale);
    // htc:max-regs roi_align_backward_kernel 72 fp64=104: as the forward (3 blocks of 256 per
    // SM, 2 for fp64); the atomics, not occupancy, bound it.
    roi_align_backward_kernel<scalar_t><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
        levels, rois.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), channels, ph, pw, sampling_ratio,
        aligned, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return cast_grads(bufs, grad.scalar_type());
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                  bool aligned) {
  return forward_cuda("htc_fast::roi_align", {input}, rois, {spatial_scale}, pooled_height, pooled_width,
                      sampling_ratio, aligned, /*map_levels=*/false, 0.0);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                   int64_t channels, int64_t height, int64_t width,
                                   int64_t sampling_ratio, bool aligned) {
  return backward_cuda("htc_fast::roi_align_backward", grad, rois, {spatial_scale}, pooled_height,
                       pooled_width, {height}, {width}, batch_size, channels, sampling_ratio, aligned,
                       /*map_levels=*/false, 0.0)[0];
}

at::Tensor multilevel_roi_align_forward_cuda(at::TensorList features, const at::Tensor& rois,
                                             at::ArrayRef<double> spatial_scales, int64_t pooled_height,
                                             int64_t pooled_width, int64_t sampling_ratio, bool aligned,
                                             double finest_scale) {
  return forward_cuda("htc_fast::multilevel_roi_align", features, rois, spatial_scales, pooled_height,
                      pooled_width, sampling_ratio, aligned, /*map_levels=*/true, finest_scale);
}

std::vector<at::Tensor> multilevel_roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, at::ArrayRef<double> spatial_scales,
    int64_t pooled_height, int64_t pooled_width, at::IntArrayRef heights, at::IntArrayRef widths,
    int64_t batch_size, int64_t channels, int64_t sampling_ratio, bool aligned, double finest_scale) {
  return backward_cuda("htc_fast::multilevel_roi_align_backward", grad, rois, spatial_scales,
                       pooled_height, pooled_width, heights, widths, batch_size, channels,
                       sampling_ratio, aligned, /*map_levels=*/true, finest_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CUDA, m) {
  m.impl("roi_align", &roi_align_forward_cuda);
  m.impl("roi_align_backward", &roi_align_backward_cuda);
  m.impl("multilevel_roi_align", &multilevel_roi_align_forward_cuda);
  m.impl("multilevel_roi_align_backward", &multilevel_roi_align_backward_cuda);
}

}  // namespace roi_align
}  // namespace htc_fast
