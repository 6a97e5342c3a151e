"""scripts/check_cuda_resources.py: its parsers on recorded ptxas / PTX text, and (when a CUDA
toolkit is installed) one real nvcc run on a tiny kernel that must be caught using a stack frame."""
import pytest

from scripts import check_cuda_resources as ccr

# Recorded from `nvcc -Xptxas -v` (nvcc 13.0) on csrc/nms/nms_cuda.cu, trimmed, plus one kernel
# with shared memory and spills edited in to exercise those fields.
PTXAS_LOG = """\
ptxas info    : 28 bytes gmem, 224 bytes cmem[4]
ptxas info    : Compiling entry function '_ZN8htc_fast3nms15nms_mask_kernelIfEEvPKT_' for 'sm_80'
ptxas info    : Function properties for _ZN8htc_fast3nms15nms_mask_kernelIfEEvPKT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 37 registers, used 0 barriers, 416 bytes cmem[0]
ptxas info    : Compile time = 23.865 ms
ptxas info    : Function properties for _ZN8htc_fast3nms6helperEv
    48 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_ZN8htc_fast3nms17nms_reduce_kernelEPKy' for 'sm_90'
ptxas info    : Function properties for _ZN8htc_fast3nms17nms_reduce_kernelEPKy
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem
ptxas info    : Compile time = 4.778 ms
"""


def test_parse_ptxas_reads_every_field_per_kernel_and_arch():
    mask, reduce = ccr.parse_ptxas(PTXAS_LOG)
    assert (mask.arch, mask.regs, mask.smem, mask.stack, mask.spill_stores, mask.spill_loads) == \
        ("sm_80", 37, 0, 0, 0, 0)  # the non-entry helper's 48-byte frame is not the kernel's
    assert (reduce.arch, reduce.regs, reduce.smem, reduce.stack, reduce.spill_stores,
            reduce.spill_loads) == ("sm_90", 255, 2048, 16, 8, 4)


def test_ceilings_and_kernel_names():
    source = """
    // htc:max-regs nms_mask_kernel 40 fp64=56: 6 blocks per SM
    // htc:max-regs nms_reduce_kernel 32
    """
    ceilings = ccr.parse_ceilings(source)
    assert ceilings == {"nms_mask_kernel": (40, 56), "nms_reduce_kernel": (32, 32)}
    assert ccr.kernel_name("_ZN8htc_fast3nms15nms_mask_kernelIfEEvPKT_", ceilings) == "nms_mask_kernel"
    assert ccr.kernel_name("_ZN8htc_fast3nms12other_kernelEv", ceilings) is None
    assert ccr.variant("void a::(anonymous namespace)::k<float, true>(float const*)") == "<float, true>"


HEADER = """\
template <typename T>
HTC_HD T sample_coord(T start, T bin, int64_t p) {
  return start + hd::mul_rn(static_cast<T>(p), bin);
}

template <typename T>
HTC_HD T other(T x) {
  return x * x + x;
}
"""

PTX = """\
\t.loc\t7 3 3
\tmul.rn.f32 \t%f3, %f1, %f2;
\tadd.f32 \t%f4, %f0, %f3;
\t.loc\t7 8 3
\tfma.rn.f32 \t%f9, %f1, %f1, %f1;
\t.loc\t7 3 3
\t.loc\t1 3 3
\tfma.rn.f32 \t%f5, %f1, %f2, %f0;
\t.file\t7 "/src/csrc/roi_align/roi_align_common.h"
\t.file\t1 "/src/csrc/roi_align/roi_align_cuda.cu"
"""


def test_fma_check_sees_only_the_helpers_lines():
    ranges = ccr.function_lines(HEADER, ["sample_coord"])
    assert ranges == {"sample_coord": (2, 4)}
    checked, bad = ccr.fusable_ops(PTX, "csrc/roi_align/roi_align_common.h", ranges)
    assert (checked, bad) == (2, [])  # line 8 (other) and file 1 are not the helper
    contracted = PTX.replace("mul.rn.f32", "mul.f32")  # a product ptxas may still fuse
    assert len(ccr.fusable_ops(contracted, "csrc/roi_align/roi_align_common.h", ranges)[1]) == 1
    fused = PTX.replace("\t.loc\t7 8 3", "\t.loc\t7 3 3")
    assert len(ccr.fusable_ops(fused, "csrc/roi_align/roi_align_common.h", ranges)[1]) == 1


def test_a_real_stack_frame_is_caught(tmp_path):
    nvcc = ccr.find_nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc) installed")
    source = tmp_path / "local_array.cu"
    source.write_text("""
    // htc:max-regs local_array_kernel 32
    __global__ void local_array_kernel(const int* idx, float* out) {
      float local[64];  // written and read at data-dependent indices: it must live in local memory
      for (int i = 0; i < 64; ++i) local[i] = out[i];
      local[idx[threadIdx.x] & 63] += 1.0f;
      out[threadIdx.x] = local[idx[threadIdx.x + 32] & 63];
    }
    """)
    rc, log, ptx = ccr.compile_one(nvcc, str(source), ["90"])
    assert rc == 0, log
    (kernel,) = ccr.parse_ptxas(log)
    assert kernel.arch == "sm_90" and kernel.stack > 0 and kernel.regs > 0
    assert ccr.kernel_name(kernel.mangled, ccr.parse_ceilings(source.read_text())) == "local_array_kernel"
    assert "90" in ptx and "local_array_kernel" in ptx["90"]
