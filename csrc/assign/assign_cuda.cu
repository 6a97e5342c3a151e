// Max-IoU assignment on CUDA: the two passes of assign_cpu.cpp, one kernel each, running the
// arithmetic of assign_common.h (the code the CPU tests exercise), so both devices give the same bits.
//
// Pass 1, gt_best_kernel (only with match_low_quality): one 256-thread block per (image, ground
// truth) row, blocks striding over the B * G rows (a 1-D grid: no 65535 limit). Each thread runs
// gt_best_over on the boxes n = threadIdx.x, + 256, ...; the block merges the 256 partial
// (best, first) pairs with `replaces` (warp shuffles, then one warp over the 8 warp results).
// `replaces` orders pairs totally (value, NaN largest, then lower index), so any merge tree gives
// torch.max's first index: no atomics, deterministic. Results go to (B, G) scratch tensors.
// Pass 2, assign_kernel: one thread per (image, box), a grid-stride loop with 64-bit indices; each
// runs assign_and_write over its image's G ground truths (warp-uniform addresses: broadcasts);
// the threshold sets go to the kernel as a compile-time count, at most 4 per launch (see below).
// The (G, N) overlaps are never stored: each pass recomputes them (a dozen flops) instead of
// writing and reading B * G * N values. Traffic: pass 2 reads each box once (per launch) and writes
// (1 + 2 S) values per box; pass 1 reads an image's N boxes once per ground truth, from L2 after
// the first (16 N bytes: 3.2 MB for 200k fp32 anchors). No host sync: every size is known on the host.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "assign/assign_common.h"
#include "assign/assign_host.h"
#include "common/cuda_helpers.cuh"

namespace htc_fast {
namespace assign {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = kThreadsPerBlock / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxRowBlocks = int64_t(1) << 20;

// (best, first) := the pair that `replaces` ranks first, of itself and lane + offset's.
template <typename T>
__device__ __forceinline__ void merge_down(T& best, int64_t& first, int offset) {
  const T v = __shfl_down_sync(kFullMask, best, offset);
  const int64_t i = __shfl_down_sync(kFullMask, first, offset);
  if (replaces(v, i, best, first)) best = v, first = i;
}

// gt_max / gt_first (B, G): each row's best overlap over its image's valid boxes, first box reaching it.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock) gt_best_kernel(const Problem<T> p, T* __restrict__ gt_max,
                                                                   int64_t* __restrict__ gt_first) {
  __shared__ T warp_best[kWarps];
  __shared__ int64_t warp_first[kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t rows = p.batch * p.num_gts;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform per block: __syncthreads is safe
    T best = T(-1);
    int64_t first = 0;
    gt_best_over(p, r / p.num_gts, r % p.num_gts, threadIdx.x, p.num_boxes, blockDim.x, best, first);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) merge_down(best, first, offset);
    if (lane == 0) warp_best[warp] = best, warp_first[warp] = first;
    __syncthreads();
    if (warp == 0) {
      // Lanes past kWarps hold (-1, 0), which never replaces a real partial.
      best = lane < kWarps ? warp_best[lane] : T(-1);
      first = lane < kWarps ? warp_first[lane] : 0;
      for (int offset = kWarps / 2; offset > 0; offset /= 2) merge_down(best, first, offset);
      if (lane == 0) gt_max[r] = best, gt_first[r] = first;
    }
    __syncthreads();  // the next row rewrites warp_best
  }
}

// kSets == p.th.count (launch_assign dispatches on it): constant trip counts over the threshold
// sets let ptxas unroll them, keeping the per-set arrays of assign_and_write in registers (with a
// runtime count they sit in local memory: a 128-byte stack frame).
template <typename T, int kSets>
__global__ void __launch_bounds__(kThreadsPerBlock) assign_kernel(Problem<T> p) {
  p.th.count = kSets;
  HTC_CUDA_KERNEL_LOOP(i, p.batch * p.num_boxes) assign_and_write(p, i / p.num_boxes, i % p.num_boxes);
}

// Sets per pass-2 launch. ptxas unrolls up to 7 (8 sets: a stack frame again); 4 keeps the
// variants few. More sets run as several launches over slices of the sets, each recomputing the
// overlaps and writing max_overlaps again with the same bits (the usual 1 to 3 sets: one launch).
constexpr int kSetsPerLaunch = 4;

template <typename T, int kSets = 1>
void launch_assign_sets(const Problem<T>& p, int64_t items, cudaStream_t stream) {
  if constexpr (kSets < kSetsPerLaunch) {
    if (p.th.count != kSets) return launch_assign_sets<T, kSets + 1>(p, items, stream);
  }
  // htc:max-regs assign_kernel 48 fp64=64: 256-thread blocks, 5 per SM at 48 (62 % occupancy;
  // 4 (50 %) for fp64): a loop over G of broadcast ground-truth loads, an overlap and S compares.
  assign_kernel<T, kSets><<<blocks_for(items), kThreadsPerBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass 2 over items = B * N boxes, the threshold sets in slices of kSetsPerLaunch.
template <typename T>
void launch_assign(const Problem<T>& p, int64_t items, cudaStream_t stream) {
  for (int64_t s0 = 0; s0 < p.th.count; s0 += kSetsPerLaunch) {
    Problem<T> slice = p;
    slice.th.count = std::min<int64_t>(kSetsPerLaunch, p.th.count - s0);
    for (int64_t s = 0; s < slice.th.count; ++s) slice.th.set[s] = p.th.set[s0 + s];
    slice.out_inds += s0 * items;  // (S, B, N): set s's plane starts at s * items
    slice.out_labels += s0 * items;
    launch_assign_sets(slice, items, stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> max_iou_assign_cuda(
    const at::Tensor& boxes, const at::Tensor& gt_boxes, const c10::optional<at::Tensor>& gt_labels,
    const c10::optional<at::Tensor>& valid, const c10::optional<at::Tensor>& gt_valid,
    at::ArrayRef<double> thresholds, bool match_low_quality, bool gt_max_assign_all) {
  const Args a = check_assign_args(boxes, gt_boxes, gt_labels, valid, gt_valid, thresholds);
  const c10::cuda::CUDAGuard guard(a.gt_boxes.device());
  const Outputs out = allocate_outputs(a);
  // Pass 1's scratch; read by pass 2 only when pass 1 ran (match_low_quality).
  const at::Tensor gt_max = at::empty({a.batch, a.num_gts}, a.gt_boxes.options());
  const at::Tensor gt_first = at::empty({a.batch, a.num_gts}, a.gt_boxes.options().dtype(at::kLong));
  const int64_t rows = a.batch * a.num_gts, items = a.batch * a.num_boxes;
  if (items == 0) return {out.gt_inds, out.max_overlaps, out.labels};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.gt_boxes.scalar_type(), "max_iou_assign", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(a, out, gt_max, gt_first, thresholds, match_low_quality,
                                                       gt_max_assign_all);
    if (match_low_quality && rows > 0) {
      // htc:max-regs gt_best_kernel 40 fp64=48: 256-thread blocks, 6 per SM at 40 (75 %
      // occupancy; 5 at 48): a loop of box loads and an overlap, latency bound, so warps count.
      gt_best_kernel<scalar_t><<<static_cast<unsigned int>(std::min(rows, kMaxRowBlocks)), kThreadsPerBlock, 0,
                                 stream>>>(p, gt_max.data_ptr<scalar_t>(), gt_first.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_assign(p, items, stream);
  });
  return {out.gt_inds, out.max_overlaps, out.labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CUDA, m) {
  m.impl("max_iou_assign", &max_iou_assign_cuda);
}

}  // namespace assign
}  // namespace htc_fast
