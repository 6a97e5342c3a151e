// Mask paste on CPU: dense binary masks, per-box crops, and COCO RLE encoding of the crops.
//
// Paste: parallel over boxes. For each box, its (Mh, Mw) mask is converted to float32 into a
// thread-local buffer padded with one cell of zeros (taps need no bounds checks), the taps of every
// column and row of the box's window are computed once (the coordinate math is separable:
// mask_paste_common.h), and, for dense output, the mask rows are interpolated along x at every
// window column once (Box::build), so a pixel costs two loads, two products, a sum and a compare,
// vectorisable along the row. Dense (N, H, W) bool: every byte is written exactly once, the zeros
// outside the window in the same pass (no separate zero fill of the output). Crops are column-major
// (the order COCO RLE runs in), so they are filled column by column, interpolating each pixel from
// the padded mask in the same operation order. Scratch: O(Mh * Mw + Mh * window width) per thread.
// Deterministic.
//
// RLE: pycocotools' format. Counts are run lengths over the whole image in column-major order,
// starting with a run of zeros; a mask is zero outside its window, so the runs before, between and
// after the window's columns are closed forms and only the crop is scanned. Compression is
// pycocotools' rleToString: each count (minus the count two back, from the fourth on) in
// little-endian groups of 5 bits, 0x20 marking "more follows", offset by 48 ('0').
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "mask_paste/mask_paste_common.h"
#include "mask_paste/mask_paste_host.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace htc_fast {
namespace mask_paste {
namespace {

// Per-thread scratch of one box: its padded float32 mask, the taps of its window's columns and
// rows, and its mask rows interpolated along x (see `Box::build`).
struct Box {
  std::vector<float> pad, hx;
  std::vector<Tap> cols, rows;
  int64_t ps = 0, r_lo = 0, r_hi = -1;  // hx holds padded mask rows [r_lo, r_hi]

  // Interpolating the mask rows along x once per window column leaves two loads, two products and
  // a sum per pixel (`lerp` of two hx rows), in the same operation order as `bilinear`.
  template <typename scalar_t>
  void build(const scalar_t* mask, int64_t mh, int64_t mw, const float* box, const Window& win,
             bool dense_rows) {
    const BoxGeom g = box_geom(box);
    ps = mw + 2;
    pad.assign((mh + 2) * ps, 0.0f);
    for (int64_t i = 0; i < mh; ++i)
      for (int64_t j = 0; j < mw; ++j) pad[(i + 1) * ps + j + 1] = static_cast<float>(mask[i * mw + j]);
    cols.resize(win.width());
    rows.resize(win.height());
    for (int64_t x = win.x0; x < win.x1; ++x)
      cols[x - win.x0] = g.valid ? axis_tap(x, g.x0, g.w, mw) : Tap{0, 0.0f, 0.0f};
    r_lo = mh + 1;
    r_hi = -1;
    for (int64_t y = win.y0; y < win.y1; ++y) {
      const Tap t = g.valid ? axis_tap(y, g.y0, g.h, mh) : Tap{0, 0.0f, 0.0f};
      rows[y - win.y0] = t;
      if (t.w_lo != 0.0f || t.w_hi != 0.0f) {
        r_lo = std::min<int64_t>(r_lo, t.i);
        r_hi = std::max<int64_t>(r_hi, t.i + 1);
      }
    }
    if (!dense_rows || r_hi < r_lo) return;
    const int64_t cw = win.width();
    hx.resize((r_hi - r_lo + 1) * cw);
    for (int64_t r = r_lo; r <= r_hi; ++r) {
      const float* p = pad.data() + r * ps;
      float* h = hx.data() + (r - r_lo) * cw;
      for (int64_t j = 0; j < cw; ++j) h[j] = lerp(p[cols[j].i], p[cols[j].i + 1], cols[j]);
    }
  }
};

// Image k of the dense output, every pixel written once: zeros outside the window.
template <typename scalar_t>
void paste_dense(const scalar_t* mask, int64_t mh, int64_t mw, const float* box, int64_t height,
                 int64_t width, float thr, bool* out, Box& b) {
  const Window win = paste_window(box, mh, mw, height, width);
  if (win.width() == 0) {
    std::fill(out, out + height * width, false);
    return;
  }
  b.build(mask, mh, mw, box, win, /*dense_rows=*/true);
  const int64_t cw = win.width();
  std::fill(out, out + win.y0 * width, false);
  std::fill(out + win.y1 * width, out + height * width, false);
  for (int64_t y = win.y0; y < win.y1; ++y) {
    bool* o = out + y * width;
    std::fill(o, o + win.x0, false);
    std::fill(o + win.x1, o + width, false);
    const Tap ty = b.rows[y - win.y0];
    o += win.x0;
    if (ty.w_lo == 0.0f && ty.w_hi == 0.0f) {  // outside the support
      std::fill(o, o + cw, false);
      continue;
    }
    const float* h0 = b.hx.data() + (ty.i - b.r_lo) * cw;
    const float* h1 = h0 + cw;
    for (int64_t j = 0; j < cw; ++j) o[j] = lerp(h0[j], h1[j], ty) >= thr;
  }
}

// Box k's crop, column-major (x outer, y inner), at `out`.
template <typename scalar_t>
void paste_crop(const scalar_t* mask, int64_t mh, int64_t mw, const float* box, const Window& win,
                float thr, bool* out, Box& b) {
  b.build(mask, mh, mw, box, win, /*dense_rows=*/false);
  const int64_t ch = win.height();
  float hcol[2];
  for (int64_t j = 0; j < win.width(); ++j, out += ch) {
    const Tap tx = b.cols[j];
    for (int64_t y = 0; y < ch; ++y) {
      const Tap ty = b.rows[y];
      if (ty.w_lo == 0.0f && ty.w_hi == 0.0f) {
        out[y] = false;
        continue;
      }
      const float* p = b.pad.data() + ty.i * b.ps;
      hcol[0] = lerp(p[tx.i], p[tx.i + 1], tx);
      hcol[1] = lerp(p[b.ps + tx.i], p[b.ps + tx.i + 1], tx);
      out[y] = lerp(hcol[0], hcol[1], ty) >= thr;
    }
  }
}

// A large output is fresh mmap'd memory, and faulting it in 4 KiB pages dominated the dense paste:
// 120-220 ms of the 100 x 1333 x 800 case (26k page faults, 2 shared cores). Asking for transparent
// huge pages (honoured in Linux's default "madvise" mode) measured 50-60 ms for the same first
// touch. A hint on untouched memory we own; ignored where unsupported.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < (int64_t(32) << 20)) return;  // smaller blocks may come from the heap: leave them
  const uintptr_t p = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

at::Tensor paste_masks_cpu(const at::Tensor& mask_probs, const at::Tensor& boxes_in, int64_t height,
                           int64_t width, double threshold) {
  const char* op = "htc_fast::paste_masks";
  check_paste_args(op, mask_probs, boxes_in, height, width, threshold);
  const int64_t n = boxes_in.size(0), mh = mask_probs.size(1), mw = mask_probs.size(2);
  at::Tensor out = at::empty({n, height, width}, boxes_in.options().dtype(at::kBool));
  if (n == 0) return out;
  advise_huge_pages(out.data_ptr(), out.numel());
  const at::Tensor probs = mask_probs.contiguous(), boxes = boxes_in.contiguous();
  const float thr = static_cast<float>(threshold);  // as the reference compares a float32 tensor
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "paste_masks", [&] {
    const scalar_t* pr = probs.data_ptr<scalar_t>();
    const float* bx = boxes.data_ptr<float>();
    bool* o = out.data_ptr<bool>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      Box b;
      for (int64_t k = begin; k < end; ++k)
        paste_dense(pr + k * mh * mw, mh, mw, bx + 4 * k, height, width, thr, o + k * height * width, b);
    });
  });
  return out;
}

at::Tensor paste_mask_windows_cpu(const at::Tensor& boxes_in, int64_t mask_height,
                                  int64_t mask_width, int64_t height, int64_t width) {
  const char* op = "htc_fast::paste_mask_windows";
  check_float_tensor(boxes_in, op, "boxes", 2);
  TORCH_CHECK(boxes_in.size(1) == 4 && boxes_in.scalar_type() == at::kFloat, op,
              ": boxes must be float32 of shape (N, 4), got ", boxes_in.scalar_type(), " ",
              boxes_in.sizes());
  TORCH_CHECK(mask_height > 0 && mask_width > 0 && height > 0 && width > 0, op,
              ": mask and image sizes must be positive");
  const at::Tensor boxes = boxes_in.contiguous();
  const int64_t n = boxes.size(0);
  at::Tensor out = at::empty({n, 4}, boxes.options().dtype(at::kLong));
  const float* bx = boxes.data_ptr<float>();
  int64_t* w = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) {
    const Window win = paste_window(bx + 4 * k, mask_height, mask_width, height, width);
    w[4 * k] = win.x0;
    w[4 * k + 1] = win.y0;
    w[4 * k + 2] = win.x1;
    w[4 * k + 3] = win.y1;
  }
  return out;
}

// Checks on the host that every window lies in the image and its crop inside `total` elements.
void check_crops_fit(const char* op, const int64_t* win, const int64_t* off, int64_t n, int64_t total,
                     int64_t height, int64_t width) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t* w = win + 4 * k;
    TORCH_CHECK(w[0] >= 0 && w[1] >= 0 && w[2] >= w[0] && w[3] >= w[1] && w[2] <= width &&
                    w[3] <= height,
                op, ": windows[", k, "] = [", w[0], ", ", w[1], ", ", w[2], ", ", w[3],
                "] is not a window of the (", height, ", ", width, ") image");
    const int64_t area = (w[2] - w[0]) * (w[3] - w[1]);
    TORCH_CHECK(off[k] >= 0 && off[k] + area <= off[k + 1] && off[k + 1] <= total, op, ": crop ", k,
                " (", area, " pixels at offset ", off[k], ") does not fit before offsets[", k + 1,
                "] = ", off[k + 1], " within total = ", total);
  }
}

at::Tensor paste_mask_crops_cpu(const at::Tensor& mask_probs, const at::Tensor& boxes_in,
                                const at::Tensor& windows_in, const at::Tensor& offsets_in,
                                int64_t total, int64_t height, int64_t width, double threshold) {
  const char* op = "htc_fast::paste_mask_crops";
  check_paste_args(op, mask_probs, boxes_in, height, width, threshold);
  check_crop_args(op, boxes_in, windows_in, offsets_in, total);
  const int64_t n = boxes_in.size(0), mh = mask_probs.size(1), mw = mask_probs.size(2);
  at::Tensor out = at::empty({total}, boxes_in.options().dtype(at::kBool));
  if (n == 0) return out;
  const at::Tensor probs = mask_probs.contiguous(), boxes = boxes_in.contiguous();
  const at::Tensor windows = windows_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t* win = windows.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_crops_fit(op, win, off, n, total, height, width);
  const float thr = static_cast<float>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "paste_mask_crops", [&] {
    const scalar_t* pr = probs.data_ptr<scalar_t>();
    const float* bx = boxes.data_ptr<float>();
    bool* o = out.data_ptr<bool>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      Box b;
      for (int64_t k = begin; k < end; ++k) {
        const int64_t* w = win + 4 * k;
        paste_crop(pr + k * mh * mw, mh, mw, bx + 4 * k, Window{w[0], w[1], w[2], w[3]}, thr,
                   o + off[k], b);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------ COCO RLE

// Run lengths in column-major order, merged as they come.
struct Runs {
  std::vector<int64_t> counts;
  bool value = false;  // the value of the open run (the first run is zeros)
  int64_t open = 0;

  void add(bool v, int64_t len) {
    if (len == 0) return;
    if (v != value) {
      counts.push_back(open);
      value = v;
      open = 0;
    }
    open += len;
  }
  void finish() { counts.push_back(open); }
};

void rle_string(const std::vector<int64_t>& cnts, std::string& s) {
  for (size_t i = 0; i < cnts.size(); ++i) {
    int64_t x = cnts[i];
    if (i > 2) x -= cnts[i - 2];
    bool more = true;
    while (more) {
      int64_t c = x & 0x1f;
      x >>= 5;  // arithmetic shift (C++20): a negative delta ends in a run of ones
      more = (c & 0x10) ? x != -1 : x != 0;
      if (more) c |= 0x20;
      s.push_back(static_cast<char>(c + 48));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> mask_rle_encode_cpu(const at::Tensor& crops_in,
                                                       const at::Tensor& windows_in,
                                                       const at::Tensor& offsets_in, int64_t height,
                                                       int64_t width) {
  const char* op = "htc_fast::mask_rle_encode";
  TORCH_CHECK(crops_in.dim() == 1 && crops_in.scalar_type() == at::kBool, op,
              ": crops must be a 1-D bool tensor, got ", crops_in.scalar_type(), " ", crops_in.sizes());
  TORCH_CHECK(height > 0 && width > 0, op, ": image size must be positive, got (", height, ", ",
              width, ")");
  TORCH_CHECK(windows_in.dim() == 2 && windows_in.size(1) == 4, op,
              ": windows must have shape (N, 4), got ", windows_in.sizes());
  const int64_t n = windows_in.size(0);
  TORCH_CHECK(windows_in.scalar_type() == at::kLong && offsets_in.scalar_type() == at::kLong &&
                  offsets_in.dim() == 1 && offsets_in.size(0) == n + 1,
              op, ": windows and offsets must be int64, offsets of shape (", n + 1, ")");
  const at::Tensor crops = crops_in.contiguous(), windows = windows_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t* win = windows.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_crops_fit(op, win, off, n, crops.numel(), height, width);
  const bool* c = crops.data_ptr<bool>();
  std::vector<std::string> strings(n);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t *w = win + 4 * k, x0 = w[0], y0 = w[1], x1 = w[2], y1 = w[3];
      Runs runs;
      if (x1 > x0 && y1 > y0) {
        runs.add(false, x0 * height);
        const bool* col = c + off[k];
        for (int64_t x = x0; x < x1; ++x, col += y1 - y0) {
          runs.add(false, y0);
          int64_t y = 0;
          while (y < y1 - y0) {  // runs within the column
            const bool v = col[y];
            int64_t e = y + 1;
            while (e < y1 - y0 && col[e] == v) ++e;
            runs.add(v, e - y);
            y = e;
          }
          runs.add(false, height - y1);
        }
        runs.add(false, (width - x1) * height);
      } else {
        runs.add(false, height * width);
      }
      runs.finish();
      rle_string(runs.counts, strings[k]);
    }
  });
  at::Tensor char_offsets = at::empty({n + 1}, offsets.options());
  int64_t* co = char_offsets.data_ptr<int64_t>();
  co[0] = 0;
  for (int64_t k = 0; k < n; ++k) co[k + 1] = co[k] + static_cast<int64_t>(strings[k].size());
  at::Tensor chars = at::empty({co[n]}, offsets.options().dtype(at::kByte));
  uint8_t* ch = chars.data_ptr<uint8_t>();
  for (int64_t k = 0; k < n; ++k) std::copy(strings[k].begin(), strings[k].end(), ch + co[k]);
  return {chars, char_offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CPU, m) {
  m.impl("paste_masks", &paste_masks_cpu);
  m.impl("paste_mask_windows", &paste_mask_windows_cpu);
  m.impl("paste_mask_crops", &paste_mask_crops_cpu);
  m.impl("mask_rle_encode", &mask_rle_encode_cpu);
}

}  // namespace mask_paste
}  // namespace htc_fast
