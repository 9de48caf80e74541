"""Loads the compiled extension, which registers the ``torch.ops.lattice`` schemas and kernels."""
import importlib

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
