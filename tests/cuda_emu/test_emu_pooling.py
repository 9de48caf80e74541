"""The CUDA pooling kernels (csrc/cuda/jagged_embedding_pool*) executed by the CPU emulator: forward, sparse and
fused (SGD / row-wise Adagrad) backward, per-sample-weight gradient and the sparse-rows optimizer step, compared
with a pure-torch reference on small random inputs (empty bags, duplicate indices, vector-width and tile edges,
every dtype), under several thread schedules; plus the device-side validation messages."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emu_harness as h

pytestmark = pytest.mark.skipif(not h.compiler_available(), reason="no C++ compiler for the emulated build")

WTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ITYPE = {torch.int32: 0, torch.int64: 1}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture(scope="module")
def lib():
    lib = h.load("pool", [h.EMU_DIR / "pool_entry.cpp"])
    lib.configure()
    yield lib
    lib.configure()


# ---------------------------------------------------------------------------------------------------------
# Inputs and a pure-torch reference (float64). TODO: switch to lattice.ops.reference once it has landed.
# ---------------------------------------------------------------------------------------------------------
class Case:
    def __init__(self, T=3, B=4, D=8, rows=(5, 7, 3), max_len=5, dtype=torch.float32, itype=torch.int64,
                 psw=False, pooling=0, ld=None, seed=0, trailing=0, lengths=None, ranges=None):
        g = torch.Generator().manual_seed(seed)
        self.T, self.B, self.D, self.dtype, self.itype, self.pooling = T, B, D, dtype, itype, pooling
        self.ld = ld or D
        if ranges is None:  # packed tables: table_row_offsets [T+1]
            self.tro = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int64)
            self.tro_stride = 1
            starts = self.tro[:-1]
            self.rows_total = int(self.tro[-1])
        else:  # row range per table, [T, 2]: tables may share rows
            self.tro = torch.tensor(ranges, dtype=torch.int64).view(T, 2)
            self.tro_stride = 2
            starts = self.tro[:, 0]
            rows = (self.tro[:, 1] - self.tro[:, 0]).tolist()
            self.rows_total = int(self.tro.max()) + 2  # a few rows no table names
        if lengths is None:
            lengths = torch.randint(0, max_len + 1, (T * B,), generator=g)
            lengths[0] = 0  # always at least one empty bag
        self.lengths = torch.as_tensor(lengths, dtype=torch.int64)
        self.offsets = torch.zeros(T * B + 1, dtype=torch.int64)
        self.offsets[1:] = self.lengths.cumsum(0)
        n_used = int(self.offsets[-1])
        table_of_pos = torch.repeat_interleave(torch.arange(T), self.lengths.view(T, B).sum(1))
        rows_per_table = torch.tensor(rows)
        local = (torch.rand(n_used, generator=g) * rows_per_table[table_of_pos]).long()
        self.N = n_used + trailing  # trailing indices are not in any bag
        self.indices = torch.cat([local, torch.zeros(trailing, dtype=torch.int64)]).to(itype)
        self.offsets = self.offsets.to(itype)
        full = torch.randn(self.rows_total, self.ld, generator=g)
        self.weights = full.to(dtype).contiguous()
        self.psw = (torch.rand(self.N, generator=g) + 0.5).to(acc_dtype(dtype)) if psw else None
        self.grad_output = torch.randn(B, T, D, generator=g).to(dtype)
        self.bag_of_pos = torch.repeat_interleave(torch.arange(T * B), self.lengths)
        self.global_rows = starts[self.bag_of_pos // B] + self.indices[:n_used].long()

    def args(self):
        return (self.tro, self.tro_stride, self.T, self.indices, self.offsets, ITYPE[self.itype], self.N, self.B,
                self.psw, self.pooling)

    def scale(self):
        n_used = self.bag_of_pos.numel()
        if self.psw is not None:
            return self.psw[:n_used].double()
        if self.pooling == 1:
            return 1.0 / self.lengths[self.bag_of_pos].double()
        return torch.ones(n_used, dtype=torch.float64)

    def ref_forward(self):
        w = self.weights.double()[:, : self.D]
        contrib = w[self.global_rows] * self.scale()[:, None]
        out = torch.zeros(self.T * self.B, self.D, dtype=torch.float64).index_add_(0, self.bag_of_pos, contrib)
        return out.view(self.T, self.B, self.D).transpose(0, 1)

    def ref_row_grads(self, grad_output=None):
        go = (self.grad_output if grad_output is None else grad_output).double()
        bags = self.bag_of_pos
        per_pos = go[bags % self.B, bags // self.B] * self.scale()[:, None]
        rows, inverse = torch.unique(self.global_rows, sorted=True, return_inverse=True)
        grads = torch.zeros(rows.numel(), self.D, dtype=torch.float64).index_add_(0, inverse, per_pos)
        return rows, grads

    def ref_psw_grad(self):
        go = self.grad_output.double()
        bags = self.bag_of_pos
        w = self.weights.double()[:, : self.D]
        dots = (go[bags % self.B, bags // self.B] * w[self.global_rows]).sum(1)
        return torch.cat([dots, torch.zeros(self.N - dots.numel(), dtype=torch.float64)])


def ref_step(weights, state, rows, grads, optimizer, lr, eps, wd, D):
    w = weights.double().clone()
    st = state.double().clone() if state is not None else None
    g = grads.double() + wd * w[rows, :D]
    if optimizer == 0:
        w[rows, :D] -= lr * g
    else:
        st[rows] += (g * g).mean(1)
        w[rows, :D] -= lr * g / (st[rows].sqrt() + eps)[:, None]
    return w, st


# ---------------------------------------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------------------------------------
def run_forward(lib, c: Case):
    out = torch.empty(c.B, c.T, c.D, dtype=c.dtype)
    lib.call("emu_pool_forward", c.weights, WTYPE[c.dtype], c.rows_total, c.D, c.ld, *c.args(), out)
    return out


def run_sparse(lib, c: Case, grad_output=None):
    go = c.grad_output if grad_output is None else grad_output
    if c.psw is not None and c.psw.dtype != acc_dtype(go.dtype):
        raise ValueError("per_sample_weights must be in the gradient's accumulation dtype here")
    rows = torch.empty(max(c.N, 1), dtype=torch.int64)
    grads = torch.empty(max(c.N, 1), c.D, dtype=go.dtype)
    u = torch.zeros(1, dtype=torch.int64)
    lib.call("emu_pool_backward_sparse", go, WTYPE[go.dtype], *c.args(), c.rows_total, c.D, rows, grads, u)
    n = int(u)
    return rows[:n], grads[:n]


def run_fused(lib, c: Case, optimizer, lr=0.1, eps=1e-3, wd=0.0, grad_output=None, state=None):
    go = c.grad_output if grad_output is None else grad_output
    w = c.weights.clone()
    st = (torch.rand(c.rows_total) if state is None else state.clone()) if optimizer == 1 else None
    lib.call("emu_pool_backward_fused", w, WTYPE[c.dtype], c.rows_total, c.D, c.ld, st, go, WTYPE[go.dtype],
             *c.args(), optimizer, float(lr), float(eps), float(wd))
    return w, st


def run_psw(lib, c: Case):
    out = torch.empty(c.N, dtype=acc_dtype(c.dtype))  # the accumulation dtype, as the CPU op returns it
    lib.call("emu_pool_backward_psw", c.grad_output, WTYPE[c.dtype], c.weights, WTYPE[c.dtype], c.rows_total, c.D,
             c.ld, c.tro, c.tro_stride, c.T, c.indices, c.offsets, ITYPE[c.itype], c.N, c.B, out)
    return out


def close(got, ref, dtype):
    torch.testing.assert_close(got.double(), ref.double(), **TOL[dtype])


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------
FORWARD_CASES = [
    # (D, dtype, itype, psw, pooling, ld): VEC 1/2/4/8, sub-warp groups of 1..32 lanes, multi-pass D > G*VEC.
    (1, torch.float32, torch.int64, False, 0, None),
    (3, torch.float32, torch.int32, True, 0, None),
    (4, torch.float32, torch.int64, False, 1, None),
    (16, torch.float32, torch.int32, False, 0, None),
    (64, torch.float32, torch.int64, True, 0, None),
    (136, torch.float32, torch.int64, False, 1, None),  # 34 float4 columns: two passes of a 32-lane group
    (8, torch.float32, torch.int64, False, 0, 10),      # row stride 10: VEC falls back to 2
    (8, torch.float16, torch.int64, True, 0, None),
    (24, torch.bfloat16, torch.int32, False, 1, None),
    (256, torch.bfloat16, torch.int64, False, 0, None),  # 8-wide bf16 loads, full warp
    (6, torch.float16, torch.int32, False, 0, None),
]


@pytest.mark.parametrize("D, dtype, itype, psw, pooling, ld", FORWARD_CASES)
def test_forward_matches_reference(lib, D, dtype, itype, psw, pooling, ld):
    c = Case(D=D, dtype=dtype, itype=itype, psw=psw, pooling=pooling, ld=ld, seed=D, trailing=2)
    ref = c.ref_forward()
    h.assert_schedule_independent(lib, lambda: run_forward(lib, c), lambda out, cfg: close(out, ref, dtype),
                                  runs=h.DEFAULT_RUNS[:2])


def test_forward_many_bags_multiwarp_schedules(lib):
    # 2 tables x 40 samples, D=32 fp32 (8-lane groups, 32 bags per 256-thread block), all four schedules.
    c = Case(T=2, B=40, D=32, rows=(50, 9), max_len=12, seed=7)
    ref = c.ref_forward()
    h.assert_schedule_independent(lib, lambda: run_forward(lib, c), lambda out, cfg: close(out, ref, c.dtype))


def test_forward_persistent_grid_strides_over_more_bags_than_blocks(lib):
    # D=128 fp32: 32-lane groups, 8 bags per block; the emulator's 4 SMs cap the persistent grid at 32 blocks
    # (256 bags), so the 300 bags wrap around the grid; bags of 0..9 rows cover partial 4-row gather steps.
    c = Case(T=3, B=100, D=128, rows=(40, 7, 300), max_len=9, seed=11, psw=True)
    ref = c.ref_forward()
    h.assert_schedule_independent(lib, lambda: run_forward(lib, c), lambda out, cfg: close(out, ref, c.dtype),
                                  runs=h.DEFAULT_RUNS[:2])


def test_forward_all_empty_and_zero_indices(lib):
    c = Case(T=2, B=3, D=4, lengths=[0] * 6)
    out = run_forward(lib, c)
    assert c.N == 0 and torch.equal(out, torch.zeros(3, 2, 4))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 3), B=st.integers(0, 6), D=st.sampled_from([1, 2, 5, 8, 20, 40]),
       rows=st.lists(st.integers(1, 9), min_size=3, max_size=3), max_len=st.integers(0, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), itype=st.sampled_from([torch.int32, torch.int64]),
       mode=st.sampled_from(["sum", "mean", "psw"]), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_and_sparse_backward_property(lib, T, B, D, rows, max_len, dtype, itype, mode, shared, seed):
    # shared: table_row_offsets [T, 2] with every table starting at row 0 (all features share one table).
    ranges = [[0, r] for r in rows[:T]] if shared else None
    c = Case(T=T, B=B, D=D, rows=rows[:T], max_len=max_len, dtype=dtype, itype=itype, psw=mode == "psw",
             pooling=1 if mode == "mean" else 0, seed=seed, ranges=ranges,
             lengths=[] if B == 0 else None)
    close(run_forward(lib, c), c.ref_forward(), dtype)
    ref_rows, ref_grads = c.ref_row_grads()
    got_rows, got_grads = run_sparse(lib, c)
    assert torch.equal(got_rows, ref_rows)
    close(got_grads, ref_grads, dtype)


@pytest.mark.parametrize("psw, pooling", [(False, 0), (True, 0), (False, 1)])
def test_shared_tables_row_range_layout(lib, psw, pooling):
    # table_row_offsets [T, 2]: tables 0 and 2 name the same rows (features sharing a table), table 1 a
    # sub-range; forward, sparse and fused backward sum the shared rows' gradients across tables.
    c = Case(T=3, B=5, D=12, ranges=[[0, 6], [4, 9], [0, 6]], psw=psw, pooling=pooling, seed=13, max_len=6)
    close(run_forward(lib, c), c.ref_forward(), c.dtype)
    rows, grads = c.ref_row_grads()
    got_rows, got_grads = run_sparse(lib, c)
    assert torch.equal(got_rows, rows)
    close(got_grads, grads, c.dtype)
    state0 = torch.rand(c.rows_total)
    ref_w, ref_state = ref_step(c.weights, state0, rows, grads, 1, 0.1, 1e-3, 0.0, c.D)
    w, st = run_fused(lib, c, 1, state=state0)
    close(w, ref_w, c.dtype)
    torch.testing.assert_close(st.double(), ref_state, rtol=1e-5, atol=1e-6)


def test_float64_accumulates_in_float64(lib):
    # fp64 weights (gradcheck's dtype) keep fp64 accumulation, per-sample weights and psw gradients.
    c = Case(D=6, dtype=torch.float64, psw=True, seed=17, trailing=1)
    close(run_forward(lib, c), c.ref_forward(), torch.float64)
    rows, grads = c.ref_row_grads()
    got_rows, got_grads = run_sparse(lib, c)
    assert torch.equal(got_rows, rows) and got_grads.dtype == torch.float64
    close(got_grads, grads, torch.float64)
    got_psw = run_psw(lib, c)
    assert got_psw.dtype == torch.float64
    close(got_psw, c.ref_psw_grad(), torch.float64)
    # lr / eps / weight_decay are fp32 in the op (as on the CPU): use exactly representable values.
    ref_w, _ = ref_step(c.weights, None, rows, grads, 0, 0.125, 0.0, 0.0, c.D)
    w, _ = run_fused(lib, c, 0, lr=0.125)
    close(w, ref_w, torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Backward: sparse rows
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "D, dtype, itype, psw, pooling",
    [(4, torch.float32, torch.int64, False, 0), (5, torch.float32, torch.int32, True, 0),
     (32, torch.float32, torch.int64, False, 1), (16, torch.bfloat16, torch.int32, False, 0),
     (8, torch.float16, torch.int64, True, 0)],
)
def test_backward_sparse_matches_reference(lib, D, dtype, itype, psw, pooling):
    c = Case(D=D, dtype=dtype, itype=itype, psw=psw, pooling=pooling, seed=11 + D, trailing=1, max_len=8)
    ref_rows, ref_grads = c.ref_row_grads()

    def check(res, cfg):
        rows, grads = res
        assert torch.equal(rows, ref_rows)
        close(grads, ref_grads, dtype)

    h.assert_schedule_independent(lib, lambda: run_sparse(lib, c), check, runs=h.DEFAULT_RUNS[:2])


def test_backward_sparse_sort_crosses_tiles(lib):
    # > 2048 positions: several radix-sort and scan tiles; 2 tables with 700 and 100 rows -> 10-bit keys, 2
    # passes; many duplicates.
    lengths = torch.full((2 * 60,), 22)
    lengths[::7] = 0
    c = Case(T=2, B=60, D=4, rows=(700, 100), lengths=lengths, seed=5)
    assert c.N > 2048
    ref_rows, ref_grads = c.ref_row_grads()
    rows, grads = run_sparse(lib, c)
    assert torch.equal(rows, ref_rows)
    close(grads, ref_grads, torch.float32)


def test_backward_sparse_fp32_grad_for_half_weights(lib):
    c = Case(D=8, dtype=torch.float16, seed=3)
    go = torch.randn(c.B, c.T, c.D, dtype=torch.float32)
    ref_rows, ref_grads = c.ref_row_grads(go)
    rows, grads = run_sparse(lib, c, grad_output=go)
    assert grads.dtype == torch.float32 and torch.equal(rows, ref_rows)
    close(grads, ref_grads, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Backward fused with the optimizer
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "optimizer, D, dtype, psw, pooling, wd",
    [(0, 4, torch.float32, False, 0, 0.0), (1, 4, torch.float32, False, 0, 0.0),
     (1, 136, torch.float32, True, 0, 0.01),  # multi-pass Adagrad (gradient recomputed per pass)
     (1, 12, torch.float32, False, 1, 0.0), (0, 12, torch.float32, True, 0, 0.05),
     (1, 16, torch.bfloat16, False, 0, 0.0), (0, 8, torch.float16, False, 1, 0.0)],
)
def test_backward_fused_matches_reference(lib, optimizer, D, dtype, psw, pooling, wd):
    c = Case(D=D, dtype=dtype, psw=psw, pooling=pooling, seed=21 + D + optimizer, max_len=7, trailing=1)
    rows, grads = c.ref_row_grads()
    state0 = torch.rand(c.rows_total)
    ref_w, ref_state = ref_step(c.weights, state0 if optimizer == 1 else None, rows, grads, optimizer, 0.1, 1e-3,
                                wd, D)

    def check(res, cfg):
        w, st = res
        close(w, ref_w.to(dtype), dtype)
        if optimizer == 1:
            torch.testing.assert_close(st.double(), ref_state, rtol=1e-5, atol=1e-6)

    h.assert_schedule_independent(lib, lambda: run_fused(lib, c, optimizer, wd=wd, state=state0), check,
                                  runs=h.DEFAULT_RUNS[:2])


def test_backward_fused_duplicates_across_tables_full_warp(lib):
    # D=128 fp32: 32-lane groups; tiny tables so almost every row repeats within and across bags.
    c = Case(T=2, B=6, D=128, rows=(2, 3), max_len=9, seed=4)
    rows, grads = c.ref_row_grads()
    state0 = torch.rand(c.rows_total)
    ref_w, ref_state = ref_step(c.weights, state0, rows, grads, 1, 0.05, 1e-4, 0.0, c.D)

    def check(res, cfg):
        close(res[0], ref_w, torch.float32)
        torch.testing.assert_close(res[1].double(), ref_state, rtol=1e-5, atol=1e-6)

    h.assert_schedule_independent(lib, lambda: run_fused(lib, c, 1, lr=0.05, eps=1e-4, state=state0), check)


# ---------------------------------------------------------------------------------------------------------
# per_sample_weights gradient and the sparse-rows optimizer step
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D, dtype, itype", [(3, torch.float32, torch.int64), (64, torch.float32, torch.int32),
                                             (16, torch.bfloat16, torch.int64)])
def test_backward_per_sample_weights(lib, D, dtype, itype):
    c = Case(D=D, dtype=dtype, itype=itype, psw=True, seed=31 + D, trailing=3)
    ref = c.ref_psw_grad()
    h.assert_schedule_independent(lib, lambda: run_psw(lib, c), lambda out, cfg: close(out, ref, dtype),
                                  runs=h.DEFAULT_RUNS[:2])


@pytest.mark.parametrize("optimizer, dtype, wd", [(0, torch.float32, 0.0), (1, torch.float32, 0.02),
                                                  (1, torch.bfloat16, 0.0)])
def test_sparse_rows_optimizer_step(lib, optimizer, dtype, wd):
    g = torch.Generator().manual_seed(optimizer)
    rows_total, D = 40, 12
    w = torch.randn(rows_total, D, generator=g).to(dtype)
    state = torch.rand(rows_total, generator=g)
    rows = torch.randperm(rows_total, generator=g)[:9]  # unique, unsorted
    grads = torch.randn(9, D, generator=g).to(dtype)
    ref_w, ref_state = ref_step(w, state, rows, grads, optimizer, 0.2, 1e-3, wd, D)
    w_out, st_out = w.clone(), state.clone()
    lib.call("emu_sparse_rows_step", w_out, WTYPE[dtype], rows_total, D, D, st_out if optimizer else None, rows, 9,
             grads, WTYPE[dtype], optimizer, 0.2, 1e-3, wd)
    close(w_out, ref_w.to(dtype), dtype)
    if optimizer == 1:
        torch.testing.assert_close(st_out.double(), ref_state, rtol=1e-5, atol=1e-6)


def test_fused_equals_sparse_then_rows_step(lib):
    # The fused backward is the sparse backward followed by the sparse-rows step.
    c = Case(T=3, B=5, D=16, seed=9, max_len=6)
    state0 = torch.rand(c.rows_total)
    w_fused, st_fused = run_fused(lib, c, 1, lr=0.3, eps=1e-2, state=state0)
    rows, grads = run_sparse(lib, c)
    w2, st2 = c.weights.clone(), state0.clone()
    lib.call("emu_sparse_rows_step", w2, 0, c.rows_total, c.D, c.D, st2, rows.contiguous(), rows.numel(),
             grads.contiguous(), 0, 1, 0.3, 1e-2, 0.0)
    torch.testing.assert_close(w_fused, w2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st_fused, st2, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Device-side validation: first bad position, table and value; in-place ops leave memory untouched
# ---------------------------------------------------------------------------------------------------------
def _bad(c: Case, what):
    if what == "index_range":
        c.indices[3] = 99
    elif what == "index_negative":
        c.indices[2] = -4
    elif what == "offsets_decreasing":
        c.offsets[4] = int(c.offsets[5]) + 1
    elif what == "offsets_start":
        c.offsets[0] = 1
    elif what == "offsets_overrun":
        c.offsets[-1] = c.N + 5
    elif what == "tro_overrun":
        c.tro[-1] = c.rows_total + 1
    elif what == "tro_decreasing":
        c.tro[1:3] = torch.tensor([int(c.tro[2]), int(c.tro[1])])
    return c


def _bag_of(c, pos):
    return int(torch.searchsorted(c.offsets.long(), torch.tensor(pos), right=True) - 1)


@pytest.mark.parametrize("what", ["index_range", "index_negative", "offsets_decreasing", "offsets_start",
                                  "offsets_overrun", "tro_overrun", "tro_decreasing"])
@pytest.mark.parametrize("op", ["forward", "sparse", "fused", "psw"])
def test_invalid_inputs_are_reported(lib, what, op):
    c = Case(T=3, B=4, D=4, lengths=[2, 1, 0, 3, 2, 2, 1, 0, 1, 2, 3, 1], rows=(5, 7, 3), seed=1)
    _bad(c, what)
    b3, b2 = _bag_of(c, 3), _bag_of(c, 2)
    expected = {
        "index_range": rf"indices\[3\] = 99 is out of range for table {b3 // c.B} with \d+ rows \(sample {b3 % c.B}\)",
        "index_negative": rf"indices\[2\] = -4 is negative \(table {b2 // c.B}, sample {b2 % c.B}\)",
        "offsets_decreasing": r"offsets must be non-decreasing: bag 4 has offsets\[4\] = \d+ > offsets\[5\] = \d+",
        "offsets_start": r"offsets\[0\] must be 0, got 1",
        "offsets_overrun": rf"offsets\[-1\] = {c.N + 5} overruns indices \({c.N} entries\)",
        "tro_overrun": rf"table_row_offsets: table 2 spans rows \[12, 16\), which is not a valid range of weights' "
                       rf"{c.rows_total} rows",
        "tro_decreasing": r"table_row_offsets: table 1 spans rows \[12, 5\), which is not a valid range",
    }[what]
    if op == "sparse" and what == "tro_overrun":
        pytest.skip("the sparse op has no weights: the tables themselves bound the rows")
    with pytest.raises(h.EmuError, match=expected):
        if op == "forward":
            run_forward(lib, c)
        elif op == "sparse":
            run_sparse(lib, c)
        elif op == "psw":
            run_psw(lib, c)
        else:
            run_fused(lib, c, 1)


def test_invalid_input_leaves_weights_and_state_untouched(lib):
    c = _bad(Case(T=3, B=4, D=4, seed=2, max_len=4), "index_range")
    w = c.weights.clone()
    st = torch.rand(c.rows_total)
    st0 = st.clone()
    with pytest.raises(h.EmuError, match="out of range"):
        lib.call("emu_pool_backward_fused", w, 0, c.rows_total, c.D, c.D, st, c.grad_output, 0, *c.args(), 1, 0.1,
                 1e-3, 0.0)
    assert torch.equal(w, c.weights) and torch.equal(st, st0)


@pytest.mark.parametrize("rows, message", [([3, 45, 7], r"rows\[1\] = 45 is out of range for weights with 40 rows"),
                                           ([3, 9, 7, 9, 3], r"rows must be unique: rows\[3\] = 9 appears twice")])
def test_sparse_rows_step_rejects_bad_rows(lib, rows, message):
    w = torch.randn(40, 4)
    w0 = w.clone()
    r = torch.tensor(rows, dtype=torch.int64)
    grads = torch.randn(len(rows), 4)
    with pytest.raises(h.EmuError, match=message):
        lib.call("emu_sparse_rows_step", w, 0, 40, 4, 4, None, r, len(rows), grads, 0, 0, 0.1, 0.0, 0.0)
    assert torch.equal(w, w0)
