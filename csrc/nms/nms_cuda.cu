// NMS on CUDA: plain, batched (exact per-segment semantics) and batched with a fixed-size output.
//
// 1. Sort by score, then stably by segment (nms_host.h): each segment is contiguous, in score order.
// 2. segment_bounds_kernel: every sorted row finds its segment [begin, end) by binary search over
//    the sorted keys (segment_of, nms_common.h), cut to `group` rows: no scan, no segment count.
// 3. nms_mask_kernel: one thread per (row i, 64-column word w of i's segment) sets bit b when box
//    i suppresses box (segment begin + 64 w + b) further down the same segment. Words cover only
//    the row's own segment: the mask is N x ceil(group / 64) words, not N x N / 64 (10 MB instead
//    of 800 MB for 80 classes x 1000 boxes), and boxes of different segments are never compared
//    (the offset trick compares them, and is inexact in fp32).
// 4. nms_reduce_kernel: a fixed grid of warps; each warp takes the segments starting at its rows
//    and runs the greedy chain over them, the segment's removed-bits in shared memory.
// 5. Kept flags (by original index) are read out in score order: compacted into the fixed
//    (max_output,) buffer by compact_kernel (batched_nms_padded), or by masked_select.
// Host syncs: batched_nms_padded none; nms one (the output size); batched_nms two (the longest
// segment, which sizes the mask, and the output size).
// IoU in at::opmath_type, with torchvision's operations (nms_common.h): decisions agree exactly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/cuda_helpers.cuh"
#include "nms/nms_common.h"
#include "nms/nms_host.h"

namespace htc_fast {
namespace nms {
namespace {

using Word = unsigned long long;
constexpr int kBits = 64;
// The reduction keeps a segment's removed-bits in shared memory: 48 KB of words.
constexpr int64_t kMaxWords = 48 * 1024 / sizeof(Word);
// Warps of the reduction grid: segments are many and short (classes x levels), or one long one.
constexpr int64_t kReduceBlocks = 2048;

template <typename T>
__device__ __forceinline__ Box<T> load_box(const T* boxes, int64_t i) {
  return Box<T>{boxes[4 * i], boxes[4 * i + 1], boxes[4 * i + 2], boxes[4 * i + 3]};
}

// keys: (n) sorted segment values, or nullptr for one segment. bounds: (2, n) begin / end.
__global__ void segment_bounds_kernel(const int64_t* __restrict__ keys, int64_t n, int64_t group,
                                      int64_t* __restrict__ bounds) {
  HTC_CUDA_KERNEL_LOOP(i, n) {
    const Segment seg = segment_of(keys, n, i, group);
    bounds[i] = seg.begin;
    bounds[n + i] = seg.end;
  }
}

// boxes: (n, 4) sorted into segments; begin/end: each row's segment (segment_bounds_kernel).
template <typename T>
__global__ void nms_mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ begin,
                                const int64_t* __restrict__ end, int64_t n, int64_t words,
                                T threshold, Word* __restrict__ mask) {
  HTC_CUDA_KERNEL_LOOP(t, n * words) {
    const int64_t i = t / words, w = t % words;
    const int64_t col0 = begin[i] + w * kBits;
    const int64_t col1 = min(col0 + kBits, end[i]);
    Word bits = 0;
    if (col1 > i + 1) {  // words wholly at or before row i stay 0: the chain never reads them
      const Box<T> a = load_box(boxes, i);
      const T area_a = box_area(a);
      for (int64_t j = max(col0, i + 1); j < col1; ++j) {
        const Box<T> b = load_box(boxes, j);
        if (suppresses(a, area_a, b, box_area(b), threshold)) bits |= Word(1) << (j - col0);
      }
    }
    mask[t] = bits;
  }
}

// Blocks of one warp; block b takes the segments that begin at rows b, b + gridDim.x, ... (the
// test is uniform across the warp), stepping past each segment it meets, so one block over one
// long segment reads its bounds once. keep[order[i]] = 1 for each kept sorted row i.
__global__ void nms_reduce_kernel(const Word* __restrict__ mask, const int64_t* __restrict__ begin,
                                  const int64_t* __restrict__ end, int64_t n, int64_t words,
                                  const int64_t* __restrict__ order, uint8_t* __restrict__ keep) {
  extern __shared__ Word removed[];
  for (int64_t s = blockIdx.x; s < n;) {
    const int64_t e = end[s];
    // No segment starts inside [s, e): the next candidate row of this block is at or after it.
    const int64_t next = max(e, s + 1);
    const int64_t step = (next - s + gridDim.x - 1) / gridDim.x * gridDim.x;
    if (begin[s] != s) {
      s += step;
      continue;
    }
    const int64_t used = (e - s + kBits - 1) / kBits;
    for (int64_t w = threadIdx.x; w < used; w += blockDim.x) removed[w] = 0;
    __syncwarp();
    for (int64_t i = s; i < e; ++i) {
      const int64_t r = i - s;
      // Every lane reads the word before any lane ORs into it below (no read/write race).
      const Word current = removed[r / kBits];
      __syncwarp();
      if (current & (Word(1) << (r % kBits))) continue;  // same value in every lane
      if (threadIdx.x == 0) keep[order[i]] = 1;
      const Word* row = mask + i * words;
      for (int64_t w = r / kBits + threadIdx.x; w < used; w += blockDim.x) removed[w] |= row[w];
      __syncwarp();
    }
    s += step;
  }
}

// rank: inclusive cumsum of keep_by_score. out[rank - 1] = by_score[j] for kept j within
// max_output; num_kept = min(kept, max_output).
__global__ void compact_kernel(const uint8_t* __restrict__ keep_by_score, const int64_t* __restrict__ rank,
                               const int64_t* __restrict__ by_score, int64_t n, int64_t max_output,
                               int64_t* __restrict__ out, int64_t* __restrict__ num_kept) {
  HTC_CUDA_KERNEL_LOOP(j, n) {
    const int64_t r = rank[j];
    if (keep_by_score[j] && r <= max_output) out[r - 1] = by_score[j];
    if (j == n - 1) *num_kept = r < max_output ? r : max_output;
  }
}

// (2, n) int64 [begin; end] of each sorted row's segment, cut to `group` rows.
at::Tensor segment_bounds(const at::Tensor& keys, int64_t n, int64_t group, const at::TensorOptions& long_opts,
                          cudaStream_t stream) {
  at::Tensor bounds = at::empty({2, n}, long_opts);
  // htc:max-regs segment_bounds_kernel 32: two binary searches; 100 % occupancy.
  segment_bounds_kernel<<<blocks_for(n), kThreadsPerBlock, 0, stream>>>(
      keys.defined() ? keys.data_ptr<int64_t>() : nullptr, n, group, bounds.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bounds;
}

// Kept flags (uint8, by original index) of the greedy chain of every segment in `bounds`.
at::Tensor greedy_keep(const char* op, const at::Tensor& boxes, const at::Tensor& by_segment,
                       const at::Tensor& bounds, int64_t group, int64_t num_segments_bound,
                       double iou_threshold, cudaStream_t stream) {
  const int64_t n = boxes.size(0);
  const int64_t words = (group + kBits - 1) / kBits;
  TORCH_CHECK(words <= kMaxWords, op, ": one segment holds ", group, " boxes; at most ",
              kMaxWords * kBits, " per segment (per class/level) are supported on CUDA");
  const int64_t* begin = bounds.data_ptr<int64_t>();
  const int64_t* end = begin + n;
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor sorted = boxes.index_select(0, by_segment).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    at::Tensor mask = at::empty({n, words}, boxes.options().dtype(at::kLong));
    // htc:max-regs nms_mask_kernel 40 fp64=56: 256-thread blocks, 6 per SM (75 % occupancy;
    // 4 for fp64): an all-pairs loop of loads and compares.
    nms_mask_kernel<acc_t><<<blocks_for(n * words), kThreadsPerBlock, 0, stream>>>(
        sorted.data_ptr<acc_t>(), begin, end, n, words, threshold_as<acc_t>(iou_threshold),
        reinterpret_cast<Word*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // htc:max-regs nms_reduce_kernel 32: one-warp blocks, at most 32 resident per SM whatever
    // the registers; a serial chain per segment, bound by latency, not occupancy.
    const auto blocks = static_cast<unsigned int>(std::min(num_segments_bound, kReduceBlocks));
    nms_reduce_kernel<<<blocks, 32, words * sizeof(Word), stream>>>(
        reinterpret_cast<const Word*>(mask.data_ptr<int64_t>()), begin, end, n, words,
        by_segment.data_ptr<int64_t>(), keep.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return keep;
}

at::Tensor nms_cuda_impl(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                         const at::Tensor* idxs, double iou_threshold) {
  check_nms_args(op, boxes, scores, idxs);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  const auto long_opts = boxes.options().dtype(at::kLong);
  if (n == 0) return at::empty({0}, long_opts);
  at::Tensor by_score, by_segment;
  std::tie(by_score, by_segment) = segment_order(scores, idxs);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor keys = sorted_keys(idxs, by_segment);
  const at::Tensor bounds = segment_bounds(keys, n, n, long_opts, stream);
  // The mask's width: the whole input for one segment, else the longest segment (host sync).
  const int64_t longest = idxs == nullptr ? n : (bounds[1] - bounds[0]).max().item<int64_t>();
  const at::Tensor keep = greedy_keep(op, boxes, by_segment, bounds, longest, idxs == nullptr ? 1 : n,
                                      iou_threshold, stream);
  return kept_in_score_order(by_score, keep.to(at::kBool));  // host sync: the output size
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  return nms_cuda_impl("htc_fast::nms", boxes, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  return nms_cuda_impl("htc_fast::batched_nms", boxes, scores, &idxs, iou_threshold);
}

// No host sync: every size is n, max_output or min(max_group_size, n), all known on the host.
std::tuple<at::Tensor, at::Tensor> batched_nms_padded_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                                                           const at::Tensor& idxs, double iou_threshold,
                                                           int64_t max_output, int64_t max_group_size) {
  const char* op = "htc_fast::batched_nms_padded";
  check_nms_args(op, boxes, scores, &idxs);
  check_padded_args(op, max_output, max_group_size);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  const auto long_opts = boxes.options().dtype(at::kLong);
  at::Tensor out = at::full({max_output}, -1, long_opts);
  at::Tensor num_kept = at::zeros({}, long_opts);
  if (n == 0 || max_output == 0) return {out, num_kept};
  at::Tensor by_score, by_segment;
  std::tie(by_score, by_segment) = segment_order(scores, &idxs);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t group = std::min(max_group_size, n);
  const at::Tensor bounds = segment_bounds(sorted_keys(&idxs, by_segment), n, group, long_opts, stream);
  const at::Tensor keep = greedy_keep(op, boxes, by_segment, bounds, group, n, iou_threshold, stream);
  const at::Tensor keep_by_score = keep.index_select(0, by_score);
  const at::Tensor rank = keep_by_score.cumsum(0, at::kLong);
  // htc:max-regs compact_kernel 32: one load, one store per row; 100 % occupancy.
  compact_kernel<<<blocks_for(n), kThreadsPerBlock, 0, stream>>>(
      keep_by_score.data_ptr<uint8_t>(), rank.data_ptr<int64_t>(), by_score.data_ptr<int64_t>(), n,
      max_output, out.data_ptr<int64_t>(), num_kept.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, num_kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
  m.impl("batched_nms_padded", &batched_nms_padded_cuda);
}

}  // namespace nms
}  // namespace htc_fast
