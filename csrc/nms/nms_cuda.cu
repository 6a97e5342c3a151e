// NMS on CUDA: plain and batched (exact per-segment semantics), one template per kernel.
//
// 1. Sort by score, then stably by segment (nms_host.h): each segment is contiguous, in score order.
// 2. nms_mask_kernel: one thread per (row i, 64-column word w of i's segment) sets bit b when box
//    i suppresses box (segment start + 64 w + b) further down the same segment. Words cover only
//    the row's own segment: the mask is N x ceil(longest segment / 64) words, not N x N / 64
//    (10 MB instead of 800 MB for 80 classes x 1000 boxes), and boxes of different segments are
//    never compared (the offset trick compares them, and is inexact in fp32).
// 3. nms_reduce_kernel: one warp per segment runs the greedy chain over its rows, keeping the
//    removed-bits of its segment in shared memory; segments run in parallel.
// 4. The kept flags go back to the original indices, read out in score order. Host syncs: the
//    output size, the longest segment, and (batched only) the number of segments.
// IoU in at::opmath_type, with torchvision's operations (nms_common.h): decisions agree exactly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

template <typename T>
__device__ __forceinline__ Box<T> load_box(const T* boxes, int64_t i) {
  return Box<T>{boxes[4 * i], boxes[4 * i + 1], boxes[4 * i + 2], boxes[4 * i + 3]};
}

// boxes: (n, 4) sorted into segments; seg_id: (n) segment of each row; starts/ends: (S) bounds.
template <typename T>
__global__ void nms_mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ seg_id,
                                const int64_t* __restrict__ starts, const int64_t* __restrict__ ends,
                                int64_t n, int64_t words, T threshold, Word* __restrict__ mask) {
  HTC_CUDA_KERNEL_LOOP(t, n * words) {
    const int64_t i = t / words, w = t % words;
    const int64_t s = seg_id[i];
    const int64_t col0 = starts[s] + w * kBits;
    const int64_t col1 = min(col0 + kBits, ends[s]);
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

// One warp (block of 32 threads) per segment; removed-bits in dynamic shared memory.
__global__ void nms_reduce_kernel(const Word* __restrict__ mask, const int64_t* __restrict__ starts,
                                  const int64_t* __restrict__ ends, int64_t words,
                                  uint8_t* __restrict__ kept) {
  extern __shared__ Word removed[];
  const int64_t s = blockIdx.x;
  const int64_t begin = starts[s], end = ends[s];
  const int64_t used = (end - begin + kBits - 1) / kBits;
  for (int64_t w = threadIdx.x; w < used; w += blockDim.x) removed[w] = 0;
  __syncwarp();
  for (int64_t i = begin; i < end; ++i) {
    const int64_t r = i - begin;
    if (removed[r / kBits] & (Word(1) << (r % kBits))) continue;  // same value in every lane
    if (threadIdx.x == 0) kept[i] = 1;
    const Word* row = mask + i * words;
    for (int64_t w = r / kBits + threadIdx.x; w < used; w += blockDim.x) removed[w] |= row[w];
    __syncwarp();
  }
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

  // Segment table: starts/ends (S), and each sorted row's segment id.
  at::Tensor seg_id, starts;
  if (idxs != nullptr) {
    const at::Tensor keys = idxs->index_select(0, by_segment);
    at::Tensor first = at::ones({n}, boxes.options().dtype(at::kBool));
    if (n > 1) first.slice(0, 1).copy_(keys.slice(0, 1) != keys.slice(0, 0, n - 1));
    seg_id = first.cumsum(0) - 1;
    starts = first.nonzero().squeeze(1);  // host sync: the number of segments
  } else {
    seg_id = at::zeros({n}, long_opts);
    starts = at::zeros({1}, long_opts);
  }
  const at::Tensor ends = at::cat({starts.slice(0, 1), at::full({1}, n, long_opts)});
  const int64_t longest = (ends - starts).max().item<int64_t>();  // host sync
  const int64_t words = (longest + kBits - 1) / kBits;
  TORCH_CHECK(words <= kMaxWords, op, ": one segment holds ", longest, " boxes; at most ",
              kMaxWords * kBits, " per segment (per class/level) are supported on CUDA");
  const int64_t num_segments = starts.size(0);

  at::Tensor kept_sorted = at::zeros({n}, boxes.options().dtype(at::kByte));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor sorted = boxes.index_select(0, by_segment).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    at::Tensor mask = at::empty({n, words}, boxes.options().dtype(at::kLong));
    const int64_t total = n * words;
    nms_mask_kernel<acc_t><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
        sorted.data_ptr<acc_t>(), seg_id.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        ends.data_ptr<int64_t>(), n, words, threshold_as<acc_t>(iou_threshold),
        reinterpret_cast<Word*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nms_reduce_kernel<<<num_segments, 32, words * sizeof(Word), stream>>>(
        reinterpret_cast<const Word*>(mask.data_ptr<int64_t>()), starts.data_ptr<int64_t>(),
        ends.data_ptr<int64_t>(), words, kept_sorted.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kBool));
  keep.index_put_({by_segment}, kept_sorted.to(at::kBool));
  return kept_in_score_order(by_score, keep);
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  return nms_cuda_impl("htc_fast::nms", boxes, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  return nms_cuda_impl("htc_fast::batched_nms", boxes, scores, &idxs, iou_threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
}

}  // namespace nms
}  // namespace htc_fast
