"""Builds ``lattice._C``: the C++ (OpenMP) kernels always, the CUDA kernels when torch has CUDA and nvcc
is present (or ``LATTICE_FORCE_CUDA=1``).

The extension is compiled against the torch that is already installed; never let pip's build isolation
fetch another one (``pip install --no-build-isolation -e .``).

Environment knobs:
  LATTICE_MARCH       -march value for the CPU kernels (default ``native``: a source build targets the
                      machine it runs on, AVX-512 where present); ``x86-64-v3`` for a portable AVX2 build.
  LATTICE_FORCE_CUDA  1 to build the CUDA sources even when torch reports no GPU; 0 never to build them.
  LATTICE_DEBUG       1 for -O0 -g.
  LATTICE_SANITIZE    ``address`` for an AddressSanitizer build of the CPU kernels (-O0 -g; run it with libasan
                      and libstdc++ preloaded, as .ci/asan.sh does).
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as err:  # pragma: no cover - exercised only on a machine without torch
    raise SystemExit(
        "lattice-rec compiles its kernels against the installed torch, and none was found.\n"
        "Install torch first (e.g. `pip install torch==2.13.0`), then `pip install --no-build-isolation -e .`."
    ) from err

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _want_cuda():
    force = os.environ.get("LATTICE_FORCE_CUDA", "")
    if force in ("0", "1"):
        return force == "1"
    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def _cxx_runtime_link_args():
    """The shared libstdc++ this process (torch) runs with, as a link input, on Linux.

    A toolchain whose only libstdc++ is the static archive (the GPU machine's gcc under /opt/gcc) would otherwise
    copy parts of libstdc++ into lattice._C. That second copy has its own std::locale ids, and the first number
    streamed into an error message (any TORCH_CHECK naming a value) crashes the process or vanishes from the
    message. Named before the driver's own -lstdc++, the shared library defines every C++ runtime symbol, so
    nothing is taken from an archive.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libstdc++.so"):
                    return [fields[-1]]
    except OSError:  # not Linux
        pass
    return []


def build_extension():
    debug = os.environ.get("LATTICE_DEBUG", "0") == "1"
    march = os.environ.get("LATTICE_MARCH", "native")
    sanitize = os.environ.get("LATTICE_SANITIZE", "")
    if sanitize not in ("", "address"):
        raise SystemExit(f"LATTICE_SANITIZE must be 'address' or unset, got {sanitize!r}")
    # A sanitized build is a debug build too: at -O0 it builds in a third of -O1's time here, and ASan reports
    # point at the exact source line.
    opt = ["-O0", "-g"] if debug or sanitize else ["-O3"]
    sanitize_flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] if sanitize else []
    cxx_flags = opt + sanitize_flags + ["-std=c++17", "-fopenmp", f"-march={march}", "-fno-math-errno"]
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    # cpp_extension adds no OpenMP flag: compile AND link with it, so the kernels run multithreaded.
    # libgomp's SONAME matches the copy torch ships, so one OpenMP runtime is loaded, not two.
    link_args = ["-fopenmp"] + _cxx_runtime_link_args() + ([f"-fsanitize={sanitize}"] if sanitize else [])
    if _want_cuda():
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        nvcc_flags = opt + ["-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v", "-lineinfo"]
        return CUDAExtension(
            "lattice._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("LATTICE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_args,
        )
    return CppExtension(
        "lattice._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_args,
    )


setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
