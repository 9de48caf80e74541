"""The CUDA int8 pooling kernel (csrc/cuda/jagged_embedding_pool_int8_kernels.cuh, launched by forward_int8 in
csrc/cuda/jagged_embedding_pool.cu) executed by the CPU emulator under several thread schedules, against the
dequantized pure-torch reference; and its device-side validation, whose messages must be the CPU op's."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emu_harness as h
import lattice  # noqa: F401
from lattice.ops import quantize_rows_int8, reference

pytestmark = pytest.mark.skipif(not h.compiler_available(), reason="no C++ compiler for the emulated build")

ITYPE = {torch.int32: 0, torch.int64: 1}
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lib():
    lib = h.load("pool", [h.EMU_DIR / "pool_entry.cpp"])
    lib.configure()
    yield lib
    lib.configure()


class Case:
    """T tables packed ([T+1]) or as row ranges ([T, 2]); random bag lengths (bag 0 always empty)."""

    def __init__(self, T=3, B=4, D=8, rows=(5, 7, 3), max_len=5, itype=torch.int64, psw=False, pooling=0,
                 seed=0, trailing=0, ranges=None, lengths=None):
        g = torch.Generator().manual_seed(seed)
        self.T, self.B, self.D, self.pooling = T, B, D, pooling
        if ranges is None:
            self.tro = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int64)
            self.tro_stride, rows_total = 1, int(self.tro[-1])
        else:
            self.tro = torch.tensor(ranges, dtype=torch.int64).view(T, 2)
            self.tro_stride, rows_total = 2, int(self.tro.max()) + 2
            rows = (self.tro[:, 1] - self.tro[:, 0]).tolist()
        if lengths is None:
            lengths = torch.randint(0, max_len + 1, (T * B,), generator=g)
            if T * B:
                lengths[0] = 0
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        offsets = torch.zeros(T * B + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        table_of_pos = torch.repeat_interleave(torch.arange(T), lengths.view(T, B).sum(1))
        local = (torch.rand(int(offsets[-1]), generator=g) * torch.tensor(rows)[table_of_pos]).long()
        self.N = local.numel() + trailing
        self.indices = torch.cat([local, torch.zeros(trailing, dtype=torch.int64)]).to(itype)
        self.offsets = offsets.to(itype)
        self.itype = itype
        self.weights = quantize_rows_int8(torch.randn(rows_total, D, generator=g) * 0.5)
        self.psw = (torch.rand(self.N, generator=g) + 0.5) if psw else None

    def op_args(self):
        return (self.weights, self.tro, self.indices, self.offsets, self.pooling, self.psw, self.D)

    def reference(self):
        return reference.jagged_embedding_pool_int8(*self.op_args())


def run(lib, c: Case):
    out = torch.empty(c.B, c.T, c.D, dtype=torch.float32)
    lib.call("emu_pool_forward_int8", c.weights, c.weights.shape[0], c.D, c.weights.shape[1], c.tro, c.tro_stride,
             c.T, c.indices, c.offsets, ITYPE[c.itype], c.N, c.B, c.psw, c.pooling, out)
    return out


CASES = [
    # (D, itype, psw, pooling): groups of 1..32 lanes of 8 columns; D=300: two column passes of a full warp.
    (1, torch.int64, False, 0),
    (5, torch.int32, True, 0),
    (8, torch.int64, False, 1),
    (20, torch.int32, False, 0),
    (64, torch.int64, True, 0),
    (100, torch.int64, False, 1),
    (300, torch.int32, True, 0),
]


@pytest.mark.parametrize("D, itype, psw, pooling", CASES)
def test_forward_matches_dequantized_reference(lib, D, itype, psw, pooling):
    c = Case(D=D, itype=itype, psw=psw, pooling=pooling, seed=D, trailing=2)
    ref = c.reference()
    h.assert_schedule_independent(lib, lambda: run(lib, c), lambda out, cfg: torch.testing.assert_close(out, ref, **TOL),
                                  runs=h.DEFAULT_RUNS[:2])


def test_many_bags_multiwarp_all_schedules(lib):
    # 2 tables x 40 samples, D=32: 4-lane groups, 64 bags per 256-thread block.
    c = Case(T=2, B=40, D=32, rows=(50, 9), max_len=12, seed=7, psw=True)
    ref = c.reference()
    h.assert_schedule_independent(lib, lambda: run(lib, c), lambda out, cfg: torch.testing.assert_close(out, ref, **TOL))


def test_empty_bags_and_empty_batch(lib):
    c = Case(T=2, B=3, D=4, lengths=[0] * 6)
    assert c.N == 0 and torch.equal(run(lib, c), torch.zeros(3, 2, 4))
    assert run(lib, Case(T=2, B=0, D=4, lengths=[])).shape == (0, 2, 4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 3), B=st.integers(0, 6), D=st.sampled_from([1, 3, 8, 9, 24, 40, 70]),
       rows=st.lists(st.integers(1, 9), min_size=3, max_size=3), max_len=st.integers(0, 9),
       itype=st.sampled_from([torch.int32, torch.int64]), mode=st.sampled_from(["sum", "mean", "psw"]),
       shared=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_property(lib, T, B, D, rows, max_len, itype, mode, shared, seed):
    ranges = [[0, r] for r in rows[:T]] if shared else None
    c = Case(T=T, B=B, D=D, rows=rows[:T], max_len=max_len, itype=itype, psw=mode == "psw",
             pooling=1 if mode == "mean" else 0, seed=seed, ranges=ranges, lengths=[] if B == 0 else None)
    torch.testing.assert_close(run(lib, c), c.reference(), **TOL)


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
        c.tro[-1] = c.weights.shape[0] + 1
    return c


@pytest.mark.parametrize("what", ["index_range", "index_negative", "offsets_decreasing", "offsets_start",
                                  "offsets_overrun", "tro_overrun"])
def test_validation_messages_are_the_cpu_ops(lib, what):
    c = _bad(Case(T=2, B=4, D=8, rows=(6, 6), max_len=4, seed=3, lengths=[2] * 8), what)
    with pytest.raises(RuntimeError) as cpu:
        torch.ops.lattice.jagged_embedding_pool_int8(*c.op_args())
    with pytest.raises(h.EmuError) as emu:
        run(lib, c)
    assert str(emu.value) == "jagged_embedding_pool_int8: " + str(cpu.value).splitlines()[0]
