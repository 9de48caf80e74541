"""lattice: multi-domain, multi-objective recommendation on PyTorch Lightning.

Importing the package loads the compiled kernels (``lattice._C``) and registers the ``torch.ops.lattice``
operators; see :mod:`lattice.ops`.
"""
from lattice import ops  # noqa: F401  (registers torch.ops.lattice.*)

__version__ = "0.1.0"
