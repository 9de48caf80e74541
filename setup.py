"""Builds two libraries from csrc/:

- ``lattice._C``, the Python extension: the C++ (OpenMP) kernels always, the CUDA kernels when torch has CUDA and
  nvcc is present (or ``LATTICE_FORCE_CUDA=1``), compiled for the build host (``LATTICE_MARCH``);
- ``lattice/lib/liblattice_ops.so``, the op library for C++ processes without Python (AOTInductor packages served
  from C++): the op schemas and the CPU kernels, no Python symbols. Serving hosts differ from the build host, so
  its kernels are compiled once per instruction set (AVX-512, AVX2, generic) and the host's widest is chosen
  when the library is loaded (csrc/cpu_isa.cpp). ``lattice.ops.library_path()`` gives its path.

The extension is compiled against the torch that is already installed; never let pip's build isolation
fetch another one (``pip install --no-build-isolation -e .``).

Environment knobs:
  LATTICE_MARCH       -march value for lattice._C's CPU kernels (default ``native``: a source build targets the
                      machine it runs on, AVX-512 where present); ``x86-64-v3`` for a portable AVX2 build.
                      liblattice_ops.so ignores it (it carries every variant).
  LATTICE_OPS_LIBRARY 0 not to build liblattice_ops.so (only C++ serving needs it; a LATTICE_SANITIZE build
                      never builds it).
  LATTICE_FORCE_CUDA  1 to build the CUDA sources even when torch reports no GPU; 0 never to build them.
  LATTICE_DEBUG       1 for -O0 -g.
  LATTICE_SANITIZE    ``address`` for an AddressSanitizer build of the CPU kernels (-O0 -g; run it with libasan
                      and libstdc++ preloaded, as .ci/asan.sh does).
"""
import glob
import os
import platform
import sys

from setuptools import Extension, setup

try:
    import torch
    from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths,
                                           library_paths)
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
    sources = ["csrc/python_module.cpp", "csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
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


OPS_LIBRARY = "lattice.lib.liblattice_ops"


def _isa_variants():
    """``(name, flags)`` of each instruction-set variant of liblattice_ops.so's CPU kernels, generic first (the
    link order csrc/cpu_isa.cpp relies on). The names and levels are csrc/cpu_isa.cpp's."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [("generic", [])]
    return [("generic", ["-march=x86-64", "-mtune=generic"]),
            ("avx2", ["-march=x86-64-v3", "-mtune=generic"]),
            ("avx512", ["-march=x86-64-v4", "-mtune=generic"])]


def ops_library():
    """liblattice_ops.so: ops.cpp and cpu_isa.cpp once, csrc/cpu/*.cpp once per :func:`_isa_variants` entry
    (built by :class:`BuildLattice`). Linked against libtorch only (no libtorch_python, no libpython), with
    ``--no-undefined`` so that a Python symbol, or any other unresolved one, fails the link instead of a
    loader at run time."""
    debug = os.environ.get("LATTICE_DEBUG", "0") == "1"
    # -g0: the three variants' debug info would triple the build time and size; LATTICE_DEBUG=1 keeps it.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    return Extension(
        OPS_LIBRARY,
        sources=["csrc/ops.cpp", "csrc/cpu_isa.cpp"] + _sources("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc", "include")] + include_paths(),
        library_dirs=library_paths(),
        libraries=["c10", "torch", "torch_cpu"],
        extra_compile_args=opt + ["-std=c++17", "-fopenmp", "-fno-math-errno"],
        extra_link_args=["-fopenmp", "-Wl,--no-undefined"] + _cxx_runtime_link_args(),
        language="c++",
    )


class BuildLattice(BuildExtension):
    """BuildExtension, plus liblattice_ops.so: a plain shared library named ``liblattice_ops.so`` (no Python
    ABI suffix) whose kernel sources are compiled once per instruction set."""

    def get_ext_filename(self, ext_name):  # called with the full dotted name and with its last part
        if ext_name in (OPS_LIBRARY, OPS_LIBRARY.rsplit(".", 1)[1]):
            return os.path.join(*ext_name.split(".")) + ".so"
        return super().get_ext_filename(ext_name)

    def copy_extensions_to_source(self):  # --inplace / editable installs: lattice/lib/ is not in git
        os.makedirs(os.path.join(HERE, *OPS_LIBRARY.split(".")[:-1]), exist_ok=True)
        super().copy_extensions_to_source()

    def build_extension(self, ext):
        if ext.name != OPS_LIBRARY:
            return super().build_extension(ext)
        common = [s for s in ext.sources if not s.startswith(os.path.join("csrc", "cpu") + os.sep)]
        kernels = [s for s in ext.sources if s not in common]
        cxx = [f for f in ext.extra_compile_args if not f.startswith("-DTORCH_EXTENSION_NAME")]
        compile_args = dict(include_dirs=ext.include_dirs, depends=ext.depends)
        # ops.cpp and cpu_isa.cpp at the baseline, then the generic variant: see _isa_variants.
        objects = self.compiler.compile(common, output_dir=os.path.join(self.build_temp, "ops_library", "common"),
                                        extra_postargs=cxx + _isa_variants()[0][1], **compile_args)
        for name, flags in _isa_variants():
            # `lattice` -> `lattice_<name>`: each variant's namespace, header inlines included (lattice/cpu/register.h)
            objects += self.compiler.compile(
                kernels, output_dir=os.path.join(self.build_temp, "ops_library", name),
                macros=[("LATTICE_CPU_VARIANT", name), ("lattice", f"lattice_{name}")],
                extra_postargs=cxx + flags, **compile_args)
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.compiler.link_shared_object(
            objects, out, libraries=ext.libraries, library_dirs=ext.library_dirs,
            extra_postargs=ext.extra_link_args, debug=self.debug, build_temp=self.build_temp, target_lang="c++")


def _want_ops_library():
    return (sys.platform.startswith("linux") and os.environ.get("LATTICE_OPS_LIBRARY", "1") != "0"
            and not os.environ.get("LATTICE_SANITIZE"))


setup(
    ext_modules=[build_extension()] + ([ops_library()] if _want_ops_library() else []),
    cmdclass={"build_ext": BuildLattice.with_options(use_ninja=True)},
)
