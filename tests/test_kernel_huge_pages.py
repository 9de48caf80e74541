"""Kernel outputs of 32 MB and more ask for transparent huge pages before their first touch (Linux): glibc maps
such an output afresh on every call, and the kernel that fills it would take a page fault per 4 KB (55k for the
sparse backward of a 26 x 100k x 64 batch). Checked through the VmFlags of the mapping that holds each output:
"hg" is madvise(MADV_HUGEPAGE)."""
import os

import pytest
import torch

import lattice  # noqa: F401

SMAPS = "/proc/self/smaps"
if not os.path.exists(SMAPS):
    pytest.skip("needs Linux's /proc/self/smaps", allow_module_level=True)


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping of this process that contains `address`."""
    inside = False
    with open(SMAPS) as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    pytest.skip(f"no VmFlags for address {address:#x} in {SMAPS}")


def _middle(t: torch.Tensor) -> int:
    return t.data_ptr() + t.nbytes // 2


def test_large_outputs_are_advised_huge_pages():
    g = torch.Generator().manual_seed(0)
    T, B, D, rows = 4, 16384, 128, 30000
    weights = torch.randn(T * rows, D, generator=g)
    tro = torch.arange(T + 1) * rows
    offsets = torch.arange(T * B + 1) * 3
    indices = torch.randint(0, rows, (3 * T * B,), generator=g)
    out = torch.ops.lattice.jagged_embedding_pool(weights, tro, indices, offsets, 0, None)
    assert out.nbytes >= 32 << 20
    assert "hg" in _vm_flags(_middle(out)), "the forward's output was not advised huge pages"
    rows_out, row_grads = torch.ops.lattice.jagged_embedding_pool_backward_sparse(
        torch.randn(B, T, D, generator=g), tro, indices, offsets, 0, None)
    assert row_grads.nbytes >= 32 << 20
    assert "hg" in _vm_flags(_middle(row_grads)), "the sparse backward's row gradients were not advised huge pages"
    # advice only: the values are those of the reference
    torch.testing.assert_close(out[7, 2], weights[2 * rows + indices[3 * (2 * B + 7) + torch.arange(3)]].sum(0))


def test_large_attention_outputs_are_advised_huge_pages():
    g = torch.Generator().manual_seed(1)
    N, H, Dh = 131072, 2, 32  # 32 MB per tensor, in 2048 sequences of 64
    q, k, v = (torch.randn(N, H, Dh, generator=g) for _ in range(3))
    offsets = torch.arange(0, N + 1, 64)
    out, lse = torch.ops.lattice.jagged_attention(q, offsets, k, v, offsets, Dh ** -0.5, True)
    assert out.nbytes >= 32 << 20
    assert "hg" in _vm_flags(_middle(out))


def test_advise_huge_pages_op():
    big = torch.empty(6 << 20, dtype=torch.uint8)  # 6 MB holds at least two whole 2 MB pages
    assert torch.ops.lattice.advise_huge_pages(big) is True
    assert "hg" in _vm_flags(_middle(big))
    assert torch.ops.lattice.advise_huge_pages(torch.empty(1024)) is False  # no whole huge page in 4 KB
    assert torch.ops.lattice.advise_huge_pages(torch.empty(0)) is False
    with pytest.raises(RuntimeError, match="self must be contiguous"):
        torch.ops.lattice.advise_huge_pages(torch.empty(2048, 2048).t())


def test_embedding_tables_and_optimizer_state_are_advised_huge_pages():
    from lattice.nn import EmbeddingBagCollection, EmbeddingTableConfig
    from lattice.ops._memory import empty_huge_pages

    assert "hg" in _vm_flags(_middle(empty_huge_pages(4 << 20)))  # 16 MB
    small = empty_huge_pages(1024)  # below 8 MB: a plain torch.empty, values untouched by the advice
    assert small.shape == (1024,) and small.dtype == torch.float32
    ebc = EmbeddingBagCollection([EmbeddingTableConfig("t", 40000, 64, ["f"])], fused_optimizer="rowwise_adagrad")
    w = next(iter(ebc.weights.values()))
    assert w.nbytes >= 8 << 20
    assert "hg" in _vm_flags(_middle(w)), "the embedding table was not advised huge pages"
    assert float(w.abs().max()) > 0  # initialized after the advice


def test_tables_can_be_built_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from lattice.nn import EmbeddingBagCollection, EmbeddingTableConfig

    with FakeTensorMode():
        ebc = EmbeddingBagCollection([EmbeddingTableConfig("t", 40000, 64, ["f"])], fused_optimizer="rowwise_adagrad")
    assert isinstance(next(iter(ebc.weights.values())).data, FakeTensor)
