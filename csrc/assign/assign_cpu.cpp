// Max-IoU assignment on CPU: two passes over the (G, N) overlaps of each image, never stored.
//
// Pass 1 (only with match_low_quality) finds each ground truth's best overlap over the valid boxes
// and the first box reaching it; pass 2 gives every box its max overlap, first best ground truth
// and, per threshold set, its label. Both run the arithmetic of assign_common.h, which the CUDA
// kernels share, so this is also what the GPU computes. Parallel over (image, ground truth) and
// (image, box); every output element is written by exactly one iteration (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "assign/assign_common.h"
#include "assign/assign_host.h"

namespace htc_fast {
namespace assign {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> max_iou_assign_cpu(
    const at::Tensor& boxes, const at::Tensor& gt_boxes, const c10::optional<at::Tensor>& gt_labels,
    const c10::optional<at::Tensor>& valid, const c10::optional<at::Tensor>& gt_valid,
    at::ArrayRef<double> thresholds, bool match_low_quality, bool gt_max_assign_all) {
  const Args a = check_assign_args(boxes, gt_boxes, gt_labels, valid, gt_valid, thresholds);
  const Outputs out = allocate_outputs(a);
  const at::Tensor gt_max = at::empty({a.batch, a.num_gts}, a.gt_boxes.options());
  const at::Tensor gt_first = at::empty({a.batch, a.num_gts}, a.gt_boxes.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(a.gt_boxes.scalar_type(), "max_iou_assign", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(a, out, gt_max, gt_first, thresholds, match_low_quality,
                                                       gt_max_assign_all);
    if (match_low_quality) {
      scalar_t* best = gt_max.data_ptr<scalar_t>();
      int64_t* first = gt_first.data_ptr<int64_t>();
      at::parallel_for(0, a.batch * a.num_gts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          best[i] = scalar_t(-1), first[i] = 0;
          gt_best_over(p, i / a.num_gts, i % a.num_gts, 0, a.num_boxes, 1, best[i], first[i]);
        }
      });
    }
    at::parallel_for(0, a.batch * a.num_boxes, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) assign_and_write(p, i / a.num_boxes, i % a.num_boxes);
    });
  });
  return {out.gt_inds, out.max_overlaps, out.labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CPU, m) {
  m.impl("max_iou_assign", &max_iou_assign_cpu);
}

}  // namespace assign
}  // namespace htc_fast
