"""Build htc_fast and its compiled extension htc_fast._C.

What gets built (decided once, printed, never guessed silently):
  * C++ CPU kernels from csrc/**/*.cpp -- always, unless HTC_FAST_SKIP_EXTENSION=1.
  * CUDA kernels from csrc/**/*.cu -- when torch is a CUDA build and a toolkit is found
    (a GPU is not needed), or always when FORCE_CUDA=1 (then a missing toolkit is an error).

Environment knobs:
  HTC_FAST_SKIP_EXTENSION=1  pure-Python install; ops use the reference backend
  FORCE_CUDA=1 / FORCE_CUDA=0  compile (or skip) the CUDA sources regardless of what is detected
  TORCH_CUDA_ARCH_LIST       archs to compile for (default "8.0;9.0+PTX": SASS for A100 and H100,
                             plus PTX of the newest so newer GPUs JIT-compile it)
  NVCC_FLAGS                 extra nvcc flags, appended
  MAX_JOBS                   parallel compile jobs (ninja); 2 is right on a 2-core machine
  CUDA_HOME                  the toolkit root (the folder holding bin/nvcc, include/cuda.h)

Why CUDA_HOME is found here rather than left to torch: torch derives it from the first `nvcc` on
PATH, and on some machines that is a wrapper script in /usr/local/bin whose parent is not a
toolkit. And some headers that torch's CUDA headers include (cusparse.h, cublas_v2.h) ship only in
the `nvidia-*` pip wheels installed with torch, so their include folders go on the include path.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[htc_fast setup] {msg}", file=sys.stderr, flush=True)


def _env_flag(name):
    """Tri-state environment flag: True, False or None (unset)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit root, or None. Resolves symlinks and wrapper scripts around nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script: `exec /usr/local/cuda-X/bin/nvcc "$@"`
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            for token in head.split():
                if token.strip("'\"").endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token.strip("'\""))))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if path and _is_toolkit(os.path.realpath(path)):
            return os.path.realpath(path)
    return None


def nvidia_wheel_include_dirs():
    """Include folders of the nvidia-* pip wheels installed beside torch (cusparse.h etc.)."""
    dirs = []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        if os.path.isdir(base):
            dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return list(dict.fromkeys(dirs))


# Archs compiled when TORCH_CUDA_ARCH_LIST is unset. "+PTX" embeds the newest arch's PTX too, so
# the build also runs (JIT-compiled once by the driver) on GPUs newer than H100.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def nvcc_flags():
    """The project's own nvcc flags (torch adds its common ones, the archs and -std).
    scripts/check_cuda_resources.py compiles with these too, so what it checks is what ships."""
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + os.environ.get("NVCC_FLAGS", "").split()


def extension_modules():
    if _env_flag("HTC_FAST_SKIP_EXTENSION"):
        _log("HTC_FAST_SKIP_EXTENSION=1: not building htc_fast._C (ops use the reference backend)")
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    force = _env_flag("FORCE_CUDA")
    torch_has_cuda = torch.version.cuda is not None
    if force is True:
        if not cuda_home:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the "
                               "folder holding bin/nvcc and include/cuda_runtime.h")
        if not torch_has_cuda:
            raise RuntimeError(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        with_cuda = True
    elif force is False:
        with_cuda = False
    else:
        with_cuda = bool(cuda_home) and torch_has_cuda

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    # torch adds the -std it was built with (C++20 for 2.14). No FMA contraction: NMS decisions
    # must match a reference computed without it, bit for bit (csrc/common/hd_math.h).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        include_dirs += nvidia_wheel_include_dirs()
        define_macros.append(("HTC_FAST_WITH_CUDA", None))
        extra["nvcc"] = nvcc_flags()
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    if torch.utils.cpp_extension.IS_WINDOWS is False:
        cxx_flags.append("-fopenmp")
        extra_link = ["-fopenmp"]
    else:
        extra_link = []

    _log(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    _log(f"CUDA toolkit: {cuda_home or 'not found'}; FORCE_CUDA={os.environ.get('FORCE_CUDA', '')!r}")
    _log(f"building htc_fast._C with {'CPU + CUDA' if with_cuda else 'CPU only'} kernels"
         + (f" for archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""))
    _log(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}; sources: {len(sources)}")

    ext = ext_cls(
        name="htc_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=extra_link,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# setuptools (pip's build backend included) runs this file as __main__; the guard lets
# scripts/check_cuda_resources.py import the helpers above without starting a build.
if __name__ == "__main__":
    ext_modules, cmdclass = extension_modules()
    setup(
        # Every package under htc_fast/, plus the Triton kernels shipped as htc_fast.kernels.
        packages=find_packages(include=["htc_fast", "htc_fast.*"]) + ["htc_fast.kernels"],
        package_dir={"htc_fast.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
