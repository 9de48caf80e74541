"""jagged_embedding_pool forward: kernel vs F.embedding_bag and the pure-torch reference."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import lattice  # noqa: F401
from lattice.ops import jagged_embedding_pool, reference, use_backend
from _pooling_cases import make_case, pool_cases, tolerance

op = torch.ops.lattice.jagged_embedding_pool


def embedding_bag_expected(case):
    """F.embedding_bag over the packed table (global rows), reshaped to [B, T, D]."""
    rows = case.global_rows()
    bag_offsets = case.offsets[:-1].long()
    psw = None if case.per_sample_weights is None else case.per_sample_weights[: rows.numel()].float()
    out = F.embedding_bag(rows, case.weights.float(), bag_offsets, mode="sum" if case.pooling == 0 else "mean",
                          per_sample_weights=psw)
    return out.view(case.T, case.B, case.weights.shape[1]).transpose(0, 1)


@settings(max_examples=60, deadline=None)
@given(pool_cases())
def test_matches_embedding_bag_fp32(case):
    out = op(*case.args)
    assert out.shape == (case.B, case.T, case.weights.shape[1])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, embedding_bag_expected(case), atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(pool_cases(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64), max_d=150))
def test_matches_reference(case):
    out = op(*case.args)
    ref = reference.jagged_embedding_pool(*case.args)
    assert out.dtype == case.weights.dtype
    torch.testing.assert_close(out, ref, **tolerance(case.weights.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_storage_accumulates_in_fp32(dtype):
    # 40 rows of the same value: fp32 accumulation gives the exact bf16/fp16 rounding of the sum.
    case = make_case(1, T=2, B=3, D=33, rows=[5, 6], max_len=40, dtype=dtype)
    expected = embedding_bag_expected(case).to(dtype)
    torch.testing.assert_close(op(*case.args), expected, **tolerance(dtype))


def test_empty_bags_pool_to_zero():
    case = make_case(2, T=3, B=4, D=16, rows=[4, 4, 4], max_len=0, pooling=1)
    out = op(*case.args)
    assert torch.equal(out, torch.zeros(4, 3, 16))
    empty = make_case(2, T=2, B=0, D=8, rows=[3, 3], max_len=3)
    assert op(*empty.args).shape == (0, 2, 8)


def test_duplicates_sum():
    w = torch.randn(6, 5)
    tro = torch.tensor([0, 6])
    idx = torch.tensor([2, 2, 2, 4])
    offs = torch.tensor([0, 4])
    torch.testing.assert_close(op(w, tro, idx, offs, 0, None)[0, 0], 3 * w[2] + w[4])


def test_wide_rows_and_every_tail():
    for D in (1, 15, 16, 31, 127, 128, 129, 200, 257):
        case = make_case(D, T=2, B=3, D=D, rows=[7, 9], max_len=6)
        torch.testing.assert_close(op(*case.args), embedding_bag_expected(case), atol=1e-5, rtol=1e-5)


def test_shared_table_row_ranges():
    # Three features over two tables: [T, 2] row ranges name the same rows twice.
    w = torch.randn(10, 4)
    tro = torch.tensor([[0, 6], [6, 10], [0, 6]])
    idx = torch.tensor([5, 3, 1, 5])
    offs = torch.tensor([0, 1, 2, 4])  # B = 1
    out = op(w, tro, idx, offs, 0, None)
    torch.testing.assert_close(out[0], torch.stack([w[5], w[9], w[1] + w[5]]))


def test_thread_count_does_not_change_result():
    case = make_case(3, T=4, B=256, D=64, rows=[1000] * 4, max_len=30)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(*case.args)
        torch.set_num_threads(max(2, threads))
        two = op(*case.args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("setting", [
    {},  # the build's default prefetch (its own compile-time kernel)
    {"LATTICE_POOL_PF_LINES": "3", "LATTICE_POOL_PF_HINT": "3", "LATTICE_POOL_PREFETCH": "5"},
    {"LATTICE_POOL_PF_LINES": "1", "LATTICE_POOL_PF_HINT": "2"},
    {"LATTICE_POOL_PF_LINES": "0"},  # the whole row
    {"LATTICE_POOL_PF_LINES": "2", "LATTICE_POOL_PF_HINT": "3"},
    {"LATTICE_POOL_PREFETCH": "0"},
])
def test_prefetch_settings_do_not_change_the_result(monkeypatch, setting):
    """Each prefetch setting (read on every call) selects a compile-time or a run-time prefetch kernel; rows of
    1 to 9 cache lines, weighted and not, all give the same sums, up to the tables' last positions."""
    cases = [make_case(10 + D, T=3, B=40, D=D, rows=[50, 60, 70], max_len=12, weighted=D % 2 == 0)
             for D in (8, 16, 24, 64, 72, 128, 130)]
    want = [op(*c.args) for c in cases]
    for k, v in setting.items():
        monkeypatch.setenv(k, v)
    for c, w in zip(cases, want):
        assert torch.equal(op(*c.args), w)
        torch.testing.assert_close(w, embedding_bag_expected(c), atol=1e-5, rtol=1e-5)


def test_backend_switch_uses_reference(monkeypatch):
    import lattice.ops.pooling as front

    case = make_case(4, T=2, B=3, D=8, rows=[5, 5], max_len=4)
    calls = []
    real = front._ref.jagged_embedding_pool
    monkeypatch.setattr(front._ref, "jagged_embedding_pool", lambda *a: calls.append(1) or real(*a))
    with use_backend("reference"):
        out = jagged_embedding_pool(*case.args)
    assert calls, "the reference backend was not used"
    torch.testing.assert_close(out, op(*case.args))


def test_front_end_accepts_names_and_mixed_offset_dtype():
    case = make_case(5, T=2, B=3, D=8, rows=[5, 5], max_len=4, index_dtype=torch.int32, pooling=1)
    out = jagged_embedding_pool(case.weights, case.table_row_offsets, case.indices, case.offsets.long(), "mean")
    torch.testing.assert_close(out, op(*case.args))
    with pytest.raises(ValueError, match="pooling must be one of"):
        jagged_embedding_pool(case.weights, case.table_row_offsets, case.indices, case.offsets, "max")


def test_generic_isa_path_matches():
    """The portable (non-AVX-512) kernels, selected with LATTICE_CPU_ISA=generic, in a subprocess."""
    script = r"""
import torch, lattice
import sys
sys.path.insert(0, sys.argv[1])
from _pooling_cases import make_case
from lattice.ops import reference
op = torch.ops.lattice
for i, (D, dtype, pooling, weighted) in enumerate([(16, torch.float32, 0, True), (33, torch.bfloat16, 1, False),
                                                   (7, torch.float16, 0, False), (130, torch.float32, 1, False)]):
    c = make_case(i, T=3, B=4, D=D, rows=[6, 7, 8], max_len=5, pooling=pooling, weighted=weighted, dtype=dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(op.jagged_embedding_pool(*c.args), reference.jagged_embedding_pool(*c.args), **tol)
    g = torch.randn(c.B, c.T, D).to(dtype)
    r, rg = op.jagged_embedding_pool_backward_sparse(g, c.table_row_offsets, c.indices, c.offsets, pooling,
                                                     c.per_sample_weights)
    r2, rg2 = reference.jagged_embedding_pool_backward_sparse(g, c.table_row_offsets, c.indices, c.offsets, pooling,
                                                              c.per_sample_weights)
    assert torch.equal(r, r2)
    torch.testing.assert_close(rg, rg2, **tol)
    w1, w2 = c.weights.float().clone(), c.weights.float().clone()
    s1, s2 = torch.zeros(w1.shape[0]), torch.zeros(w1.shape[0])
    args = (g.float(), c.table_row_offsets, c.indices, c.offsets, pooling, c.per_sample_weights, 1, 0.1, 1e-8, 0.01)
    op.jagged_embedding_pool_backward_fused_(w1, s1, *args)
    reference.jagged_embedding_pool_backward_fused_(w2, s2, *args)
    torch.testing.assert_close(w1, w2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
print("generic ok")
"""
    env = dict(os.environ, LATTICE_CPU_ISA="generic")
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", script, here], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generic ok" in res.stdout
