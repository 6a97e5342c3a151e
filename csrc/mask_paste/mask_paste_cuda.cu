// Mask paste on CUDA: dense binary masks, per-box crops (for COCO RLE), and the paste windows.
//
// One thread per pixel of a tile of a box's window. Grid: y = box (launched in chunks of 65535
// boxes, the limit of that axis), x = a capped number of blocks per box (paste_blocks_per_box:
// enough blocks in all to fill the GPU a few times over, never more than the image has tiles);
// each block loops over the tiles of its own box's window, which it computes on the device, so no
// host sync is needed to learn the windows and no blocks are launched for empty image area.
// Each thread computes its pixel's row and column taps (mask_paste_common.h, the code the
// CPU runs) and reads the four mask cells with bounds checks (zero padding), in float32 whatever
// the mask dtype. Dense (N, H, W) bool is zero-filled first and only window pixels are written;
// tiles are 8 rows x 32 columns, threadIdx.x along x (coalesced stores). Crops are column-major,
// so there threadIdx.x runs along y. Deterministic: every pixel is written once.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_helpers.cuh"
#include "mask_paste/mask_paste_common.h"
#include "mask_paste/mask_paste_host.h"

namespace htc_fast {
namespace mask_paste {
namespace {

constexpr int kTileMajor = 32;  // threads along the contiguous axis of the output
constexpr int kTileMinor = 8;
constexpr int64_t kMaxBoxesPerLaunch = 65535;

struct MaskView {
  int64_t mh, mw, s_n, s_h, s_w;
};

// kCrops = false: windows == nullptr, each thread recomputes its box's window (cheap, no buffer).
// kCrops = true: windows/offsets give each crop; a window or offset that does not fit skips the box.
// At least kPasteBlocksPerSM resident blocks: ptxas keeps the loop within 40 registers.
constexpr int kPasteBlocksPerSM = 6;

template <typename scalar_t, bool kCrops>
__global__ void __launch_bounds__(kTileMajor * kTileMinor, kPasteBlocksPerSM) paste_kernel(const scalar_t* __restrict__ probs, MaskView mv,
                             const float* __restrict__ boxes, const int64_t* __restrict__ windows,
                             const int64_t* __restrict__ offsets, int64_t total, int64_t height,
                             int64_t width, float thr, int64_t k0, bool* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.y) + k0;
  const float* box = boxes + 4 * k;
  Window win;
  int64_t base = 0;
  if (kCrops) {
    const int64_t* w = windows + 4 * k;
    win = Window{w[0], w[1], w[2], w[3]};
    base = offsets[k];
    const bool fits = win.x0 >= 0 && win.y0 >= 0 && win.x1 >= win.x0 && win.y1 >= win.y0 &&
                      win.x1 <= width && win.y1 <= height && base >= 0 &&
                      base + win.width() * win.height() <= offsets[k + 1] && offsets[k + 1] <= total;
    if (!fits) return;
  } else {
    win = paste_window(box, mv.mh, mv.mw, height, width);
  }
  // Tiles (ty, tx) of the window; the tile's major axis is x for dense output, y for crops.
  const int64_t tile_w = kCrops ? kTileMinor : kTileMajor, tile_h = kCrops ? kTileMajor : kTileMinor;
  const int64_t tiles_x = (win.width() + tile_w - 1) / tile_w;
  const int64_t tiles = tiles_x * ((win.height() + tile_h - 1) / tile_h);
  const BoxGeom g = box_geom(box);
  const scalar_t* m = probs + k * mv.s_n;
  const auto at = [&](int32_t i, int32_t j) -> float {
    // Padded cell (i, j) is mask cell (i - 1, j - 1); outside the mask it is a zero.
    const int64_t r = static_cast<int64_t>(i) - 1, c = static_cast<int64_t>(j) - 1;
    return (r >= 0 && r < mv.mh && c >= 0 && c < mv.mw) ? static_cast<float>(m[r * mv.s_h + c * mv.s_w])
                                                        : 0.0f;
  };
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t ty = t / tiles_x, tx = t - ty * tiles_x;
    const int64_t x = win.x0 + tx * tile_w + (kCrops ? threadIdx.y : threadIdx.x);
    const int64_t y = win.y0 + ty * tile_h + (kCrops ? threadIdx.x : threadIdx.y);
    if (x >= win.x1 || y >= win.y1) continue;
    const float value =
        g.valid ? bilinear(at, axis_tap(y, g.y0, g.h, mv.mh), axis_tap(x, g.x0, g.w, mv.mw)) : 0.0f;
    const int64_t idx = kCrops ? base + (x - win.x0) * win.height() + (y - win.y0)
                               : (k * height + y) * width + x;
    out[idx] = value >= thr;
  }
}

// Blocks per box (grid x): about kBlocksPerSM blocks per SM over all `boxes` of a launch, at
// least one per box, and no more than the `tiles` of a window as large as the image.
constexpr int64_t kBlocksPerSM = 32;

unsigned int paste_blocks_per_box(int64_t boxes, int64_t tiles) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;  // cached, no sync
  const int64_t want = (kBlocksPerSM * sms + boxes - 1) / boxes;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(want, tiles)));
}

__global__ void windows_kernel(const float* __restrict__ boxes, int64_t n, int64_t mh, int64_t mw,
                               int64_t height, int64_t width, int64_t* __restrict__ out) {
  HTC_CUDA_KERNEL_LOOP(k, n) {
    const Window w = paste_window(boxes + 4 * k, mh, mw, height, width);
    out[4 * k] = w.x0;
    out[4 * k + 1] = w.y0;
    out[4 * k + 2] = w.x1;
    out[4 * k + 3] = w.y1;
  }
}

template <bool kCrops>
void launch(const at::Tensor& probs, const at::Tensor& boxes, const int64_t* windows,
            const int64_t* offsets, int64_t total, int64_t height, int64_t width, double threshold,
            at::Tensor& out) {
  const int64_t n = boxes.size(0);
  const MaskView mv{probs.size(1), probs.size(2), probs.stride(0), probs.stride(1), probs.stride(2)};
  const int64_t tile_w = kCrops ? kTileMinor : kTileMajor, tile_h = kCrops ? kTileMajor : kTileMinor;
  const int64_t tiles = ((height + tile_h - 1) / tile_h) * ((width + tile_w - 1) / tile_w);
  TORCH_CHECK(tiles < (int64_t(1) << 31), "htc_fast::paste_masks: image (", height, ", ", width,
              ") is too large");
  const dim3 block(kTileMajor, kTileMinor);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float thr = static_cast<float>(threshold);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "paste_masks", [&] {
    for (int64_t k0 = 0; k0 < n; k0 += kMaxBoxesPerLaunch) {
      const int64_t count = std::min(kMaxBoxesPerLaunch, n - k0);
      const dim3 grid(paste_blocks_per_box(count, tiles), static_cast<unsigned int>(count));
      // htc:max-regs paste_kernel 40: 256-thread blocks, 6 per SM (75 % occupancy, held by
      // __launch_bounds__); each thread is a few loads and a store per tile, so latency hiding
      // needs the warps.
      paste_kernel<scalar_t, kCrops><<<grid, block, 0, stream>>>(
          probs.data_ptr<scalar_t>(), mv, boxes.data_ptr<float>(), windows, offsets, total, height,
          width, thr, k0, out.data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

at::Tensor paste_masks_cuda(const at::Tensor& mask_probs, const at::Tensor& boxes_in, int64_t height,
                            int64_t width, double threshold) {
  check_paste_args("htc_fast::paste_masks", mask_probs, boxes_in, height, width, threshold);
  const c10::cuda::CUDAGuard guard(boxes_in.device());
  at::Tensor out = at::zeros({boxes_in.size(0), height, width}, boxes_in.options().dtype(at::kBool));
  if (boxes_in.size(0) == 0) return out;
  const at::Tensor boxes = boxes_in.contiguous();
  launch<false>(mask_probs, boxes, nullptr, nullptr, 0, height, width, threshold, out);
  return out;
}

at::Tensor paste_mask_windows_cuda(const at::Tensor& boxes_in, int64_t mask_height, int64_t mask_width,
                                   int64_t height, int64_t width) {
  const char* op = "htc_fast::paste_mask_windows";
  check_float_tensor(boxes_in, op, "boxes", 2);
  TORCH_CHECK(boxes_in.size(1) == 4 && boxes_in.scalar_type() == at::kFloat, op,
              ": boxes must be float32 of shape (N, 4), got ", boxes_in.scalar_type(), " ",
              boxes_in.sizes());
  TORCH_CHECK(mask_height > 0 && mask_width > 0 && height > 0 && width > 0, op,
              ": mask and image sizes must be positive");
  const c10::cuda::CUDAGuard guard(boxes_in.device());
  const at::Tensor boxes = boxes_in.contiguous();
  const int64_t n = boxes.size(0);
  at::Tensor out = at::empty({n, 4}, boxes.options().dtype(at::kLong));
  if (n == 0) return out;
  // htc:max-regs windows_kernel 48: one thread per box, a few hundred threads in all: occupancy
  // is irrelevant, the ceiling only guards against spills creeping in.
  windows_kernel<<<blocks_for(n), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      boxes.data_ptr<float>(), n, mask_height, mask_width, height, width, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor paste_mask_crops_cuda(const at::Tensor& mask_probs, const at::Tensor& boxes_in,
                                 const at::Tensor& windows_in, const at::Tensor& offsets_in,
                                 int64_t total, int64_t height, int64_t width, double threshold) {
  const char* op = "htc_fast::paste_mask_crops";
  check_paste_args(op, mask_probs, boxes_in, height, width, threshold);
  check_crop_args(op, boxes_in, windows_in, offsets_in, total);
  const c10::cuda::CUDAGuard guard(boxes_in.device());
  // Zero-filled: a crop the kernel skips (it does not fit, see paste_kernel) reads as empty.
  at::Tensor out = at::zeros({total}, boxes_in.options().dtype(at::kBool));
  if (boxes_in.size(0) == 0 || total == 0) return out;
  const at::Tensor boxes = boxes_in.contiguous(), windows = windows_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  launch<true>(mask_probs, boxes, windows.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), total,
               height, width, threshold, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CUDA, m) {
  m.impl("paste_masks", &paste_masks_cuda);
  m.impl("paste_mask_windows", &paste_mask_windows_cuda);
  m.impl("paste_mask_crops", &paste_mask_crops_cuda);
}

}  // namespace mask_paste
}  // namespace htc_fast
