"""Loads the compiled extension, which registers the ``torch.ops.lattice`` schemas and kernels."""
import importlib
import os

import torch  # noqa: F401  (loads libtorch, which lattice._C links against)

try:
    _C = importlib.import_module("lattice._C")
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "lattice's compiled kernels (lattice._C) are missing or were built against another torch. "
        "Rebuild them against the installed torch: `pip install --no-build-isolation -e .` "
        "(or `python setup.py build_ext --inplace`)."
    ) from err


def has_cuda_kernels() -> bool:
    """True when the extension was built with the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("lattice::jagged_embedding_pool", "CUDA")


def library_path() -> str:
    """Path of ``liblattice_ops.so``: the op schemas and CPU kernels as a plain shared library, for C++
    processes without Python (``dlopen`` it, after libtorch, before loading an AOTInductor package that calls
    lattice's ops; see examples/cpp_predict). It picks AVX-512, AVX2 or generic kernels for the host when loaded
    (``LATTICE_CPU_ISA`` asks for one). Never load it into a Python process that has imported lattice: the
    schemas would be registered twice."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib", "liblattice_ops.so")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"lattice's C++ op library {path!r} was not built: rebuild with `pip install --no-build-isolation -e .` "
            "(or `python setup.py build_ext --inplace`) on Linux, without LATTICE_OPS_LIBRARY=0")
    return path
