// NMS on CPU: plain, batched (exact per-segment semantics) and batched with a fixed-size output,
// one template.
//
// Boxes are sorted by score, then stably by segment (nms_host.h), and copied into structure-of-
// arrays in the accumulation type. Each segment runs torchvision's greedy chain independently
// (at::parallel_for over segments): box i, if not yet removed, is kept and marks every later box
// of its segment that it overlaps by more than the threshold. The inner loop is branch-free
// (removed[j] |= overlaps) so the compiler vectorises it; boxes of other segments are never
// compared, so the cost is sum(kept_s * n_s) rather than kept * N for the offset trick.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "nms/nms_common.h"
#include "nms/nms_host.h"

namespace htc_fast {
namespace nms {
namespace {

template <typename T>
void greedy_segment(const T* x1, const T* y1, const T* x2, const T* y2, const T* area, int64_t begin,
                    int64_t end, T threshold, uint8_t* removed, uint8_t* kept) {
  for (int64_t i = begin; i < end; ++i) {
    if (removed[i]) continue;
    kept[i] = 1;
    const Box<T> a{x1[i], y1[i], x2[i], y2[i]};
    const T area_a = area[i];
    for (int64_t j = i + 1; j < end; ++j)
      removed[j] |= static_cast<uint8_t>(suppresses(a, area_a, Box<T>{x1[j], y1[j], x2[j], y2[j]}, area[j], threshold));
  }
}

// max_group > 0: only the max_group best-scored boxes of each segment take part (segment_of).
at::Tensor nms_cpu_impl(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                        const at::Tensor* idxs, double iou_threshold, int64_t max_group = 0) {
  check_nms_args(op, boxes, scores, idxs);
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  at::Tensor by_score, by_segment;
  std::tie(by_score, by_segment) = segment_order(scores, idxs);

  // Segments over the sorted order, each cut to max_group rows (the rule the CUDA kernels follow).
  const at::Tensor keys_t = sorted_keys(idxs, by_segment);
  const int64_t* keys = keys_t.defined() ? keys_t.data_ptr<int64_t>() : nullptr;
  std::vector<Segment> segments;
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || (keys != nullptr && keys[i] != keys[i - 1]))
      segments.push_back(segment_of(keys, n, i, max_group > 0 ? max_group : n));
  const int64_t num_segments = static_cast<int64_t>(segments.size());

  at::Tensor kept_sorted = at::zeros({n}, boxes.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // (4, n) in the accumulation type: structure of arrays, in segment order.
    const at::Tensor soa = boxes.index_select(0, by_segment).to(c10::CppTypeToScalarType<acc_t>::value).t().contiguous();
    const acc_t* x1 = soa.data_ptr<acc_t>();
    const acc_t *y1 = x1 + n, *x2 = x1 + 2 * n, *y2 = x1 + 3 * n;
    std::vector<acc_t> area(n);
    for (int64_t i = 0; i < n; ++i) area[i] = box_area(Box<acc_t>{x1[i], y1[i], x2[i], y2[i]});
    std::vector<uint8_t> removed(n, 0);
    uint8_t* kept = kept_sorted.data_ptr<uint8_t>();
    const acc_t threshold = threshold_as<acc_t>(iou_threshold);
    at::parallel_for(0, num_segments, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s)
        greedy_segment(x1, y1, x2, y2, area.data(), segments[s].begin, segments[s].end, threshold,
                       removed.data(), kept);
    });
  });
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kBool));
  keep.index_put_({by_segment}, kept_sorted.to(at::kBool));
  return kept_in_score_order(by_score, keep);
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  return nms_cpu_impl("htc_fast::nms", boxes, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                           double iou_threshold) {
  return nms_cpu_impl("htc_fast::batched_nms", boxes, scores, &idxs, iou_threshold);
}

// The batched result cut to max_output and padded with -1, and min(kept, max_output).
std::tuple<at::Tensor, at::Tensor> batched_nms_padded_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                                                          const at::Tensor& idxs, double iou_threshold,
                                                          int64_t max_output, int64_t max_group_size) {
  const char* op = "htc_fast::batched_nms_padded";
  check_padded_args(op, max_output, max_group_size);
  const at::Tensor kept = nms_cpu_impl(op, boxes, scores, &idxs, iou_threshold, max_group_size);
  const int64_t count = std::min(kept.size(0), max_output);
  at::Tensor keep = at::full({max_output}, -1, kept.options());
  keep.narrow(0, 0, count).copy_(kept.narrow(0, 0, count));
  return {keep, at::scalar_tensor(count, kept.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
  m.impl("batched_nms_padded", &batched_nms_padded_cpu);
}

}  // namespace nms
}  // namespace htc_fast
