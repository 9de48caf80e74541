"""jagged_embedding_pool_int8 (int8 row-wise quantized tables, inference) on the CPU: the kernel against the
dequantized reference, the quantizer's layout and error bound, the fake kernel, and bad input reported exactly as
the float op reports it."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lattice  # noqa: F401
from lattice.ops import (
    dequantize_rows_int8,
    int8_row_bytes,
    jagged_embedding_pool,
    jagged_embedding_pool_int8,
    quantize_rows_int8,
    reference,
    use_backend,
)
from lattice.ops.int8_rows import int8_code_bytes, int8_row_qparams
from _pooling_cases import make_case, pool_cases

op = torch.ops.lattice.jagged_embedding_pool_int8
TOL = dict(atol=2e-5, rtol=1e-5)  # fp32 sums of the same terms in another order


def int8_args(case):
    """The case's arguments for the int8 op: its table quantized, plus embedding_dim."""
    q = quantize_rows_int8(case.weights)
    return (q, case.table_row_offsets, case.indices, case.offsets, case.pooling, case.per_sample_weights,
            case.weights.shape[1])


def expected(args):
    return reference.jagged_embedding_pool_int8(*args)


# ---- the kernel against the dequantized reference ---------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(pool_cases(dtypes=(torch.float32, torch.bfloat16), max_d=150))
def test_matches_dequantized_reference(case):
    """Empty bags, per-sample weights, mean, int32/int64 indices, [T+1] and [T, 2] tables, indices past the
    last bag, D up to 150 (past the register-held width, 128)."""
    args = int8_args(case)
    out = op(*args)
    assert out.dtype == torch.float32 and out.shape == (case.B, case.T, case.weights.shape[1])
    torch.testing.assert_close(out, expected(args), **TOL)


@pytest.mark.parametrize("D", [1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 127, 128, 129, 200, 257])
@pytest.mark.parametrize("weighted", [False, True])
def test_every_tail_width(D, weighted):
    case = make_case(D, T=2, B=5, D=D, rows=[9, 11], max_len=7, weighted=weighted, pooling=0)
    args = int8_args(case)
    torch.testing.assert_close(op(*args), expected(args), **TOL)


def test_within_quantization_error_of_the_float_op():
    """|int8 - fp32| <= sum over the bag of |w_j| * scale_j / 2 (each value is within half a step)."""
    case = make_case(5, T=3, B=16, D=32, rows=[40, 50, 60], max_len=10, weighted=True)
    q, tro, idx, offs, pooling, psw, D = int8_args(case)
    scale, _ = int8_row_qparams(q, D)
    bound = reference.jagged_embedding_pool(
        (scale[:, None] / 2).expand(-1, D).contiguous(), tro, idx, offs, 0, psw.abs())
    diff = (op(q, tro, idx, offs, 0, psw, D) - jagged_embedding_pool(case.weights, tro, idx, offs, 0, psw)).abs()
    assert bool((diff <= bound * (1 + 1e-4) + 1e-6).all())


def test_empty_bags_pool_to_zero_and_empty_batch():
    case = make_case(2, T=3, B=4, D=16, rows=[4, 4, 4], max_len=0, pooling=1)
    assert torch.equal(op(*int8_args(case)), torch.zeros(4, 3, 16))
    empty = make_case(2, T=2, B=0, D=8, rows=[3, 3], max_len=3)
    assert op(*int8_args(empty)).shape == (0, 2, 8)


def test_duplicates_and_mean():
    w = torch.randn(6, 5)
    q = quantize_rows_int8(w)
    deq = dequantize_rows_int8(q, 5)
    out = op(q, torch.tensor([0, 6]), torch.tensor([2, 2, 4]), torch.tensor([0, 3]), 1, None, 5)
    torch.testing.assert_close(out[0, 0], (2 * deq[2] + deq[4]) / 3, **TOL)


def test_thread_count_does_not_change_result():
    case = make_case(3, T=4, B=256, D=64, rows=[1000] * 4, max_len=30)
    args = int8_args(case)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(*args)
        torch.set_num_threads(max(2, threads))
        two = op(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("setting", [
    {"LATTICE_POOL_PF_LINES": "3", "LATTICE_POOL_PF_HINT": "3", "LATTICE_POOL_PREFETCH": "5"},
    {"LATTICE_POOL_PF_LINES": "1"},
    {"LATTICE_POOL_PREFETCH": "0"},
])
def test_prefetch_settings_do_not_change_the_result(monkeypatch, setting):
    cases = [make_case(20 + D, T=3, B=30, D=D, rows=[50, 60, 70], max_len=12, weighted=D % 2 == 0)
             for D in (8, 64, 130)]
    want = [op(*int8_args(c)) for c in cases]
    for k, v in setting.items():
        monkeypatch.setenv(k, v)
    for c, w in zip(cases, want):
        assert torch.equal(op(*int8_args(c)), w)


def test_generic_isa_path_matches():
    """The portable kernel (LATTICE_CPU_ISA=generic), in a subprocess: every tail, sum/mean/weighted."""
    script = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch, lattice
from lattice.ops import quantize_rows_int8, reference
from _pooling_cases import make_case
op = torch.ops.lattice.jagged_embedding_pool_int8
for i, (D, pooling, weighted, itype) in enumerate([(1, 0, True, torch.int32), (16, 1, False, torch.int64),
                                                   (37, 0, False, torch.int32), (64, 0, True, torch.int64),
                                                   (150, 1, False, torch.int64)]):
    c = make_case(i, T=3, B=4, D=D, rows=[6, 7, 8], max_len=5, pooling=pooling, weighted=weighted,
                  index_dtype=itype, trailing=2)
    args = (quantize_rows_int8(c.weights), c.table_row_offsets, c.indices, c.offsets, pooling,
            c.per_sample_weights, D)
    torch.testing.assert_close(op(*args), reference.jagged_embedding_pool_int8(*args), atol=2e-5, rtol=1e-5)
print("generic ok")
"""
    env = dict(os.environ, LATTICE_CPU_ISA="generic")
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", script, here], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generic ok" in res.stdout


# ---- opcheck, fake kernel, front end, backend switch ---------------------------------------------------------
@pytest.mark.parametrize("itype, pooling, weighted", [(torch.int64, 0, False), (torch.int32, 0, True),
                                                      (torch.int64, 1, False)])
def test_opcheck(itype, pooling, weighted):
    case = make_case(7, T=2, B=3, D=12, rows=[5, 6], max_len=4, index_dtype=itype, pooling=pooling,
                     weighted=weighted)
    torch.library.opcheck(op, int8_args(case))


def test_fake_kernel_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = make_case(8, T=3, B=5, D=20, rows=[5, 6, 7], max_len=4)
    args = int8_args(case)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = op(*fake)
    assert out.shape == (5, 3, 20) and out.dtype == torch.float32


def test_compiles_fullgraph():
    case = make_case(9, T=2, B=4, D=16, rows=[5, 6], max_len=4, weighted=True)
    q, tro, idx, offs, _, psw, D = int8_args(case)

    def f(q, tro, idx, offs, psw):
        return jagged_embedding_pool_int8(q, tro, idx, offs, "sum", psw, embedding_dim=D) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, tro, idx, offs, psw), f(q, tro, idx, offs, psw))


def test_front_end_names_mixed_offsets_and_backend_switch(monkeypatch):
    import lattice.ops.pooling_int8 as front

    case = make_case(10, T=2, B=3, D=8, rows=[5, 5], max_len=4, index_dtype=torch.int32, pooling=1)
    q = quantize_rows_int8(case.weights)
    out = jagged_embedding_pool_int8(q, case.table_row_offsets, case.indices, case.offsets.long(), "mean",
                                     embedding_dim=8)
    torch.testing.assert_close(out, op(*int8_args(case)))
    calls = []
    real = front._ref.jagged_embedding_pool_int8
    monkeypatch.setattr(front._ref, "jagged_embedding_pool_int8", lambda *a: calls.append(1) or real(*a))
    with use_backend("reference"):
        ref_out = jagged_embedding_pool_int8(q, case.table_row_offsets, case.indices, case.offsets, "mean",
                                             embedding_dim=8)
    assert calls, "the reference backend was not used"
    torch.testing.assert_close(ref_out, out, **TOL)
    with pytest.raises(ValueError, match="pooling must be one of"):
        jagged_embedding_pool_int8(q, case.table_row_offsets, case.indices, case.offsets, "max", embedding_dim=8)


def test_forward_only_rejects_per_sample_weights_that_require_grad():
    case = make_case(11, T=2, B=3, D=8, rows=[5, 5], max_len=4, weighted=True)
    q, tro, idx, offs, _, psw, D = int8_args(case)
    with pytest.raises(ValueError, match="forward only .* per_sample_weights must not require grad"):
        jagged_embedding_pool_int8(q, tro, idx, offs, "sum", psw.requires_grad_(), embedding_dim=D)
    with torch.no_grad():
        jagged_embedding_pool_int8(q, tro, idx, offs, "sum", psw, embedding_dim=D)


# ---- quantizer ------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), D=st.integers(1, 70), log_scale=st.floats(-6, 4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_round_trip_error_is_at_most_half_a_step(rows, D, log_scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, D, generator=g) * 10 ** log_scale + torch.randn(rows, 1, generator=g)).to(dtype)
    w[0] = w[0, 0]  # a constant row: scale 0, exact
    q = quantize_rows_int8(w)
    assert q.dtype == torch.uint8 and q.shape == (rows, int8_row_bytes(D))
    deq = dequantize_rows_int8(q, D)
    scale, bias = int8_row_qparams(q, D)
    x = w.float()
    err = (deq - x).abs().amax(1)
    # half a step, plus the fp32 rounding of scale * code + bias
    slack = 4 * torch.finfo(torch.float32).eps * x.abs().amax(1)
    assert bool((err <= scale / 2 + slack).all()), (err - scale / 2).max()
    assert scale[0] == 0 and torch.equal(deq[0], x[0])
    torch.testing.assert_close(bias, x.amin(1))
    assert not q[:, D:int8_code_bytes(D)].any(), "padding bytes must be zero"


def test_table_bytes_at_d64_are_under_029_of_fp32():
    w = torch.randn(1000, 64)
    q = quantize_rows_int8(w)
    ratio = q.nbytes / w.nbytes
    assert ratio == 72 / 256 and ratio <= 0.29


def test_rows_are_multiples_of_eight_bytes():
    for D in range(1, 300):
        assert int8_row_bytes(D) % 8 == 0 and int8_code_bytes(D) >= D and int8_code_bytes(D) - D < 8


def test_quantizer_bad_input():
    with pytest.raises(ValueError, match=r"weights must be a 2-D tensor \[rows, embedding_dim\], got \(4,\)"):
        quantize_rows_int8(torch.randn(4))
    with pytest.raises(ValueError, match="weights must be floating point, got torch.int64"):
        quantize_rows_int8(torch.zeros(3, 4, dtype=torch.long))
    w = torch.randn(5, 4)
    w[3, 1] = float("nan")
    with pytest.raises(ValueError, match="weights row 3 has a non-finite value"):
        quantize_rows_int8(w)
    q = quantize_rows_int8(torch.randn(5, 4))
    with pytest.raises(ValueError, match="weights must have 24 bytes per row for embedding_dim=12, got 16"):
        dequantize_rows_int8(q, 12)
    with pytest.raises(ValueError, match="weights must be a uint8 tensor"):
        dequantize_rows_int8(q.float(), 4)


# ---- bad input: the int8 op reports shared arguments exactly as the float op ---------------------------------
def good(index_dtype=torch.int64):
    w = torch.randn(9, 4)
    tro = torch.tensor([0, 4, 9])  # table 0: 4 rows, table 1: 5 rows
    idx = torch.tensor([0, 3, 1, 4, 2], dtype=index_dtype)
    offs = torch.tensor([0, 2, 3, 3, 5], dtype=index_dtype)  # T=2, B=2
    return dict(tro=tro, idx=idx, offs=offs, pooling=0, psw=None), w


def _set(i, v):
    def f(a):
        a["idx"] = a["idx"].clone()
        a["idx"][i] = v
    return f


def _set_off(i, v):
    def f(a):
        a["offs"] = a["offs"].clone()
        a["offs"][i] = v
    return f


BAD = {
    "index_out_of_range": _set(2, 4),
    "index_out_of_range_last_table": _set(4, 5),
    "index_negative": _set(3, -2),
    "offsets_start": _set_off(0, 1),
    "offsets_decreasing": _set_off(2, 1),
    "offsets_overrun": _set_off(-1, 6),
    "offsets_size": lambda a: a.update(offs=a["offs"][:4]),
    "offsets_dtype": lambda a: a.update(offs=a["offs"].int()),
    "indices_dtype": lambda a: a.update(idx=a["idx"].float(), offs=a["offs"].float()),
    "indices_2d": lambda a: a.update(idx=a["idx"].view(5, 1)),
    "offsets_2d": lambda a: a.update(offs=a["offs"].view(5, 1)),
    "tro_dtype": lambda a: a.update(tro=a["tro"].int()),
    "tro_shape": lambda a: a.update(tro=torch.zeros(2, 3, dtype=torch.long)),
    "tro_one_entry": lambda a: a.update(tro=a["tro"][:1]),
    "tro_overrun": lambda a: a.update(tro=torch.tensor([0, 4, 10])),
    "tro_reversed_range": lambda a: a.update(tro=torch.tensor([[5, 4], [4, 9]])),
    "tro_negative": lambda a: a.update(tro=torch.tensor([-1, 4, 9])),
    "pooling_value": lambda a: a.update(pooling=2),
    "psw_with_mean": lambda a: a.update(pooling=1, psw=torch.ones(5)),
    "psw_size": lambda a: a.update(psw=torch.ones(4)),
    "psw_dtype": lambda a: a.update(psw=torch.ones(5, dtype=torch.long)),
}


def _message(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_input_messages_match_the_float_op(what):
    a, w = good()
    BAD[what](a)
    q = quantize_rows_int8(w)
    want = _message(lambda: torch.ops.lattice.jagged_embedding_pool(w, a["tro"], a["idx"], a["offs"], a["pooling"],
                                                                    a["psw"]))
    got = _message(lambda: op(q, a["tro"], a["idx"], a["offs"], a["pooling"], a["psw"], 4))
    assert got == want


def test_bad_index_at_scale_is_flagged_in_the_parallel_pass():
    q = quantize_rows_int8(torch.randn(1000, 16))
    idx = torch.randint(0, 500, (1_000_000,))
    idx[777_777] = 500
    offs = torch.arange(0, 1_000_001, 100)
    with pytest.raises(RuntimeError, match=r"indices\[777777\] = 500 is out of range for table 1 with 500 rows"):
        op(q, torch.tensor([0, 500, 1000]), idx, offs, 0, None, 16)


def test_int8_specific_bad_input():
    a, w = good()
    q = quantize_rows_int8(w)
    args = (a["tro"], a["idx"], a["offs"], 0, None)
    with pytest.raises(RuntimeError, match=r"weights must be uint8 \(rows quantized by lattice.ops.quantize_rows_int8\), got Float"):
        op(w, *args, 4)
    with pytest.raises(RuntimeError, match=r"weights must have 24 bytes per row for embedding_dim=9 \(9 uint8 codes "
                                           r"padded to a multiple of 8, then fp32 scale and bias\), got 16"):
        op(q, *args, 9)
    with pytest.raises(RuntimeError, match="embedding_dim must be >= 1, got 0"):
        op(q, *args, 0)
    with pytest.raises(RuntimeError, match=r"weights must be 2-D, got shape \[144\]"):
        op(q.flatten(), *args, 4)
    with use_backend("reference"), pytest.raises(RuntimeError, match=r"indices\[2\] = 4 is out of range for table 0"):
        bad = a["idx"].clone()
        bad[2] = 4
        jagged_embedding_pool_int8(q, a["tro"], bad, a["offs"], embedding_dim=4)
