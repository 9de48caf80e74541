"""The CUDA jagged attention kernels (csrc/cuda/jagged_attention*.{cuh,cu}) run through the CPU execution
emulator and compared with the pure-torch reference: forward (out, lse) and backward (dq, dk, dv), tiled
kernels and the generic thread-per-row path, fp32 / bf16 / fp16 / fp64, causal on and off, dense and jagged
queries, empty samples, lengths at tile edges +-1, under several thread schedules."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import emu_harness as h

try:  # the project's reference (pad, mask, softmax); the test's own per-sample reference is checked against it
    from lattice.ops.reference import jagged_attention_reference as project_reference
except ImportError:  # lattice._C not built, or the reference not there yet
    project_reference = None

pytestmark = pytest.mark.skipif(not h.compiler_available(), reason="no C++ compiler for the emulated build")

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# Tolerances against the float64 reference (inputs rounded to the dtype first); fp16/bf16 outputs and
# gradients are rounded once more on the way out.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
TOL_TF32 = 4e-3  # fp32 inputs on tensor cores: tf32 products (10 mantissa bits), fp32 accumulation
# Planner's choice (0), generic path (-1), or a forced query-tile size.
PLANNED, GENERIC = 0, -1


@pytest.fixture(scope="module")
def lib():
    lib = h.load("attention", [h.EMU_DIR / "attention_entry.cpp"])
    lib.configure()
    yield lib
    lib.configure()


def _offsets(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def _inputs(lq, lk, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = sum(lq), sum(lk)
    q, k, v, go = (torch.randn(n, heads, head_dim, generator=g, dtype=torch.float64).to(dtype)
                   for n in (nq, nk, nk, nq))
    return q, _offsets(lq), k, v, _offsets(lk), go


def reference(q, q_offsets, k, v, kv_offsets, scale, causal, grad_out):
    """float64 attention per sample and head with an explicit mask; returns out, lse, (dq, dk, dv). Where
    lattice.ops.reference is importable, its forward must agree (same semantics, lse = -inf included)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse, grads = _per_sample_reference(q, q_offsets, k, v, kv_offsets, scale, causal, grad_out)
    if project_reference is not None:
        p_out, p_lse = project_reference(q.detach(), q_offsets, k.detach(), v.detach(), kv_offsets, scale, causal)
        torch.testing.assert_close(p_out, out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(p_lse.double(), lse.float().double(), rtol=1e-6, atol=1e-6)
    return out, lse, grads


def _per_sample_reference(q, q_offsets, k, v, kv_offsets, scale, causal, grad_out):
    outs, lses = [], []
    for b in range(q_offsets.numel() - 1):
        q0, q1, k0, k1 = int(q_offsets[b]), int(q_offsets[b + 1]), int(kv_offsets[b]), int(kv_offsets[b + 1])
        n, m = q1 - q0, k1 - k0
        s = torch.einsum("ihd,jhd->hij", q[q0:q1], k[k0:k1]) * scale
        visible = torch.ones(n, m, dtype=torch.bool)
        if causal:
            visible = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
        has_key = visible.any(-1)  # [n]
        s = s.masked_fill(~visible, float("-inf")).masked_fill(~has_key[None, :, None], 0.0)
        lse = torch.logsumexp(s, -1)  # [H, n]
        p = torch.exp(s - lse[..., None]) * has_key[None, :, None]
        outs.append(torch.einsum("hij,jhd->ihd", p, v[k0:k1]))
        lses.append(lse.masked_fill(~has_key[None, :], float("-inf")).transpose(0, 1))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses) if lses else q.new_zeros(q.shape[:2])
    grads = torch.autograd.grad(out, (q, k, v), grad_out.double(), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (q, k, v))]
    return out.detach(), lse.detach(), grads


def emu_forward(lib, q, q_offsets, k, v, kv_offsets, scale, causal, mode=PLANNED, tf32=False):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32)
    block = torch.zeros(1, dtype=torch.int64)
    lib.call("emu_attention_forward", q, k, v, q_offsets, kv_offsets, q_offsets.numel() - 1, q.shape[0], k.shape[0],
             q.shape[1], q.shape[2], DTYPES[q.dtype], float(scale), bool(causal), mode, bool(tf32), out, lse, block)
    return out, lse, int(block)


def emu_backward(lib, grad_out, q, q_offsets, k, v, kv_offsets, out, lse, scale, causal, mode=PLANNED,
                 with_block=False, tf32=False):
    gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    block = torch.zeros(1, dtype=torch.int64)
    lib.call("emu_attention_backward", grad_out, q, k, v, out, lse, q_offsets, kv_offsets, q_offsets.numel() - 1,
             q.shape[0], k.shape[0], q.shape[1], q.shape[2], DTYPES[q.dtype], float(scale), bool(causal), mode, bool(tf32),
             gq, gk, gv, block)
    return (gq, gk, gv, int(block)) if with_block else (gq, gk, gv)


def _close(name, got, want, tol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values {got[~torch.isfinite(got)][:5]}"
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def check_case(lib, lq, lk, heads, head_dim, causal, dtype=torch.float32, mode=PLANNED, seed=0, expect_block=None,
               dq_mode=None, tf32=False):
    """Forward and backward through the emulator vs the reference. `mode` picks the forward's query tile
    (planner, generic path or a forced size), `dq_mode` the backward's (default: the same); `tf32` lets fp32
    take the tensor-core tiles (bf16/fp16 always do)."""
    q, qo, k, v, ko, go = _inputs(lq, lk, heads, head_dim, dtype, seed)
    scale = head_dim ** -0.5
    dq_mode = mode if dq_mode is None else dq_mode
    out, lse, block = emu_forward(lib, q, qo, k, v, ko, scale, causal, mode, tf32)
    if expect_block is not None:
        assert block == expect_block
    ref_out, ref_lse, ref_grads = reference(q, qo, k, v, ko, scale, causal, go)
    tol = TOL_TF32 if tf32 and dtype == torch.float32 else TOL[dtype]
    _close("out", out, ref_out, tol)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all(), "lse must be -inf exactly where no key is seen"
    _close("lse", lse[~empty], ref_lse[~empty], max(tol, 2e-6))
    *grads, dq_block = emu_backward(lib, go, q, qo, k, v, ko, out, lse, scale, causal, dq_mode, with_block=True,
                                    tf32=tf32)
    if dq_mode != PLANNED:
        assert dq_block == dq_mode
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        _close(name, got, want, 2 * tol)
    return out, lse, grads


# (lq, lk, heads, head_dim): every list is per sample.
CASES = {
    "empty_samples": ([3, 0, 5, 0, 2], [4, 2, 0, 0, 9], 2, 16),
    "key_tile_edges": ([5, 9, 2, 7], [31, 32, 33, 65], 1, 32),
    "query_tile_edges_small": ([7, 8, 9, 1], [12, 40, 3, 9], 2, 24),
    "dense_summary_queries": ([8] * 6, [0, 1, 31, 32, 33, 70], 2, 64),
    "self_attention": ([0, 1, 17, 40], [0, 1, 17, 40], 1, 64),
    "queries_exceed_keys": ([20, 3, 17], [0, 50, 16], 1, 37),
    "head_dim_128": ([9, 4], [33, 5], 1, 128),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(lib, case, causal):
    lq, lk, heads, head_dim = CASES[case]
    check_case(lib, lq, lk, heads, head_dim, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference_half_types(lib, dtype, causal):
    check_case(lib, [7, 0, 33], [40, 3, 33], 2, 40, causal, dtype=dtype, seed=1)


@pytest.mark.parametrize(
    "lq,lk,head_dim,block,dq_block",
    [
        # Large tiles (forward: 16 rows per warp; dq: 8), lengths at their edges +-1.
        ([63, 64, 65, 0], [64, 64, 66, 5], 32, 64, 32),
        ([31, 32, 33], [70, 1, 33], 64, 64, 32),
        # Head dims 65..128: forward tile 16 (4 rows per warp), dq tile 8.
        ([15, 16, 17], [20, 33, 17], 100, 16, 8),
        # Small tiles (2 rows per warp) on long query streams.
        ([31, 33], [31, 40], 64, 8, 8),
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forced_tile_sizes(lib, lq, lk, head_dim, block, dq_block, causal):
    check_case(lib, lq, lk, 1, head_dim, causal, mode=block, expect_block=block, dq_mode=dq_block)


# Tensor-core tiles (64 rows per block, 16 per warp; dK/dV: 64 keys against 16-query tiles): bf16 / fp16, and
# fp32 as tf32; lengths at the 16- and 64-row edges +-1; head dims padded to 16.
TC_CASES = {
    "tile_edges": ([63, 64, 65, 0], [64, 15, 66, 5], 32),
    "keys_at_16": ([17, 1, 33], [16, 17, 31], 64),
    "head_dim_100": ([15, 16, 40], [20, 33, 17], 100),
    "head_dim_128": ([20, 3], [9, 40], 128),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "tf32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(TC_CASES))
def test_tensor_core_tiles(lib, case, causal, dtype):
    lq, lk, head_dim = TC_CASES[case]
    check_case(lib, lq, lk, 2 if head_dim <= 32 else 1, head_dim, causal, dtype=dtype, mode=64, expect_block=64,
               tf32=True, seed=len(case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "tf32"])
def test_tensor_core_backward_with_small_dq_tile(lib, dtype):
    """Summary queries: the forward and dQ take the small FMA tile, dK/dV the tensor-core one."""
    check_case(lib, [8, 8, 3], [70, 0, 33], 2, 40, True, dtype=dtype, tf32=True, expect_block=8, dq_mode=8)


def test_allow_tf32_moves_fp32_onto_tensor_cores(lib):
    q, qo, k, v, ko, go = _inputs([40, 9], [50, 20], 1, 32, torch.float32, seed=2)
    ref_out, _, _ = reference(q, qo, k, v, ko, 0.3, False, go)
    fma, _, _ = emu_forward(lib, q, qo, k, v, ko, 0.3, False, 64, tf32=False)
    tc, _, _ = emu_forward(lib, q, qo, k, v, ko, 0.3, False, 64, tf32=True)
    _close("fp32", fma, ref_out, TOL[torch.float32])
    _close("tf32", tc, ref_out, TOL_TF32)
    assert (tc.double() - ref_out).abs().max() > 10 * (fma.double() - ref_out).abs().max()  # tf32 rounding shows


def test_tensor_core_tiles_schedule_independent_and_deterministic(lib):
    lq, lk = [40, 17, 0], [33, 50, 7]
    q, qo, k, v, ko, go = _inputs(lq, lk, 1, 48, torch.bfloat16, seed=5)

    def run():
        out, lse, block = emu_forward(lib, q, qo, k, v, ko, 0.2, True, 64)
        assert block == 64
        return (out, lse, *emu_backward(lib, go, q, qo, k, v, ko, out, lse, 0.2, True, 64))

    results = h.run_all_schedules(lib, run)
    for cfg, other in zip(h.DEFAULT_RUNS[1:], results[1:]):
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), f"results differ under schedule {cfg}"


@pytest.mark.parametrize(
    "dtype,head_dim,mode",
    [
        (torch.float64, 5, PLANNED),  # float64 always takes the generic path
        (torch.float64, 33, PLANNED),
        (torch.float32, 130, PLANNED),  # head dims above 128 do too
        (torch.bfloat16, 20, GENERIC),
        (torch.float32, 20, GENERIC),
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_generic_path(lib, dtype, head_dim, mode, causal):
    check_case(lib, [3, 0, 5, 9], [4, 2, 0, 7], 2, head_dim, causal, dtype=dtype, mode=mode, expect_block=-1)


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(0, 45), st.integers(0, 70)), min_size=1, max_size=5),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([1, 3, 8, 31, 33, 64, 65, 127]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(lib, lengths, heads, head_dim, causal, dtype, seed):
    lq, lk = map(list, zip(*lengths))
    check_case(lib, lq, lk, heads, head_dim, causal, dtype=dtype, seed=seed)


def test_empty_samples_give_zeros_and_no_nan(lib):
    out, lse, (gq, gk, gv) = check_case(lib, [4, 3, 0], [0, 5, 6], 2, 8, True)
    assert out[:4].eq(0).all() and torch.isneginf(lse[:4]).all()
    assert gq[:4].eq(0).all()
    assert gk[5:].eq(0).all() and gv[5:].eq(0).all()  # sample 2 has keys but no queries


def test_all_empty_batch(lib):
    check_case(lib, [0, 0], [0, 5], 1, 8, False)
    check_case(lib, [2, 3], [0, 0], 3, 8, True)


def test_schedule_independent_and_deterministic(lib):
    """Every schedule (in order, reversed, random interleavings; guard pages on either side of the buffers)
    gives the same, correct result bit for bit: no race, and the backward has no order-dependent sums."""
    lq, lk = [9, 33, 0, 40], [40, 31, 7, 40]
    q, qo, k, v, ko, go = _inputs(lq, lk, 2, 32, torch.float32, seed=3)
    scale = 0.2

    def run():
        out, lse, _ = emu_forward(lib, q, qo, k, v, ko, scale, True)
        return (out, lse, *emu_backward(lib, go, q, qo, k, v, ko, out, lse, scale, True))

    results = h.run_all_schedules(lib, run)
    ref_out, ref_lse, ref_grads = reference(q, qo, k, v, ko, scale, True, go)
    _close("out", results[0][0], ref_out, TOL[torch.float32])
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), results[0][2:], ref_grads):
        _close(name, got, want, 2 * TOL[torch.float32])
    for cfg, other in zip(h.DEFAULT_RUNS[1:], results[1:]):
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), f"results differ under schedule {cfg}"


# ---------------------------------------------------------------------------------------------------------
# The tile planner (the host side of the skew-aware grid)
# ---------------------------------------------------------------------------------------------------------
def _plan(lib, lq, lk, head_dim, causal, kind, min_tiles=0, tensor_cores=False):
    qo, ko = _offsets(lq), _offsets(lk)
    rows = lq if kind != 2 else lk
    tiles = torch.empty(2 * (sum(rows) + 1), dtype=torch.int32)
    info = torch.zeros(2, dtype=torch.int64)
    lib.call("emu_attention_plan", qo, ko, len(lq), head_dim, bool(causal), kind, min_tiles, bool(tensor_cores), tiles,
             sum(rows) + 1, info)
    return tiles[: 2 * int(info[0])].view(-1, 2).tolist(), int(info[1])


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["forward", "dq", "dkdv"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_planner_covers_every_row_once(lib, kind, causal):
    g = torch.Generator().manual_seed(kind)
    lq = torch.randint(0, 150, (40,), generator=g).tolist()
    lk = torch.randint(0, 150, (40,), generator=g).tolist()
    lq[3], lk[5] = 0, 0
    tiles, block = _plan(lib, lq, lk, 64, causal, kind)
    rows = lq if kind != 2 else lk
    covered = [0] * sum(rows)
    starts = _offsets(rows).tolist()
    for b, first in tiles:
        assert 0 <= first < rows[b] and first % block == 0
        for r in range(first, min(first + block, rows[b])):
            covered[starts[b] + r] += 1
    assert covered == [1] * sum(rows)


def test_planner_picks_tile_size_by_shape(lib):
    # A few summary tokens per sample: the small query tile.
    assert _plan(lib, [8] * 32, [100] * 32, 64, False, 0)[1] == 8
    # Long query streams: the large one.
    assert _plan(lib, [256] * 4, [256] * 4, 64, True, 0)[1] == 64
    assert _plan(lib, [256] * 4, [256] * 4, 128, True, 0)[1] == 16
    # Too few large tiles to fill the GPU (one long sample): the small tile, which makes 8x more blocks.
    assert _plan(lib, [1024], [1024], 64, False, 0, min_tiles=216)[1] == 8
    assert _plan(lib, [1024], [1024], 64, False, 1, min_tiles=216)[1] == 8
    assert _plan(lib, [1024], [1024], 64, False, 1, min_tiles=0)[1] == 32
    # Tensor-core tiles: 64 rows for every head dim, the small tile still for summary queries.
    assert _plan(lib, [256] * 4, [256] * 4, 128, True, 0, tensor_cores=True)[1] == 64
    assert _plan(lib, [256] * 4, [256] * 4, 128, True, 1, tensor_cores=True)[1] == 64
    assert _plan(lib, [256] * 4, [256] * 4, 128, True, 2, tensor_cores=True)[1] == 64
    assert _plan(lib, [8] * 32, [100] * 32, 64, False, 0, tensor_cores=True)[1] == 8
    # Heaviest tiles first: the long sample's tiles lead.
    tiles, _ = _plan(lib, [8, 8, 8], [1, 300, 2], 32, False, 0)
    assert tiles[0][0] == 1
