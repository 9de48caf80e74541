"""Allocation of large embedding tables on transparent huge pages (Linux).

Random row gathers over a multi-GB table miss the TLB on nearly every row with 4 KB pages; asking the
kernel for 2 MB pages (``madvise(MADV_HUGEPAGE)``, honoured when THP is ``always`` or ``madvise``)
before the memory is first touched makes pooling and the fused update faster (``benchmarks/bench_pooling.py``
measures it). The advice is the kernels' own (``torch.ops.lattice.advise_huge_pages``, which their large
outputs get too); elsewhere this is a plain ``torch.empty``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from lattice.ops import _library  # noqa: F401  (registers torch.ops.lattice)

__all__ = ["empty_huge_pages"]

# Tables are allocated once, so huge pages pay off from a few pages up (the kernels' workspaces use the same
# threshold, kHugeMinBytes in csrc/include/lattice/cpu/huge_pages.h).
_MIN_BYTES = 8 << 20


@torch.library.register_fake("lattice::advise_huge_pages")
def _advise_huge_pages_fake(self: torch.Tensor) -> bool:
    return False  # a fake tensor has no memory to advise (modules built under FakeTensorMode)


def empty_huge_pages(
    *size: int, dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None
) -> torch.Tensor:
    """``torch.empty(*size)``; a CPU tensor of 8 MB or more additionally asks for transparent huge pages (before
    first touch, so the pages are huge from the start). Initialize it afterwards as usual."""
    t = torch.empty(*size, dtype=dtype, device=device)
    if t.device.type == "cpu" and t.numel() * t.element_size() >= _MIN_BYTES:
        torch.ops.lattice.advise_huge_pages(t)
    return t
