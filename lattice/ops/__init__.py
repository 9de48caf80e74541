"""Custom operators (``torch.ops.lattice.*``): Python front ends with autograd and fake kernels.

- :func:`jagged_embedding_pool` — fused pooling over many tables packed in one weight tensor.
- :func:`jagged_attention` — varlen (jagged) multi-head attention, flash-style.
- :func:`jagged_embedding_pool_int8` — the pooling over int8 row-wise quantized tables (inference), with
  :func:`quantize_rows_int8` / :func:`dequantize_rows_int8`.

:mod:`lattice.ops.reference` holds a pure-torch reference for each. :func:`library_path` is the C++-only op
library (``liblattice_ops.so``) for serving without Python.
"""
from lattice.ops import _library  # noqa: F401  (loads lattice._C)
from lattice.ops._backend import get_backend, set_backend, use_backend
from lattice.ops._library import has_cuda_kernels, library_path  # noqa: F401
from lattice.ops._memory import empty_huge_pages  # noqa: F401
from lattice.ops import pooling, pooling_int8, attention, reference  # noqa: F401
from lattice.ops.pooling import *  # noqa: F401,F403
from lattice.ops.attention import *  # noqa: F401,F403
from lattice.ops.pooling_int8 import *  # noqa: F401,F403
