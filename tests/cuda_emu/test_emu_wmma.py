"""Self-tests of the emulator's warp matrix API (csrc/testing/cuda_emu/wmma_emu.h): a tiled GEMM through
nvcuda::wmma for half, bf16 and tf32 inputs and every fragment layout must match a reference under several
schedules, and misuse (a divergent or partial mma_sync, a misaligned pointer, a bad ldm, code that assumes a
fragment's element layout, a read-back without __syncwarp) must be reported or must show."""
import pytest
import torch

import emu_harness as h

pytestmark = pytest.mark.skipif(not h.compiler_available(), reason="no C++ compiler for the emulated build")

SOURCES = [h.EMU_DIR / "selftest" / "wmma_selftest.cu"]
DTYPES = {"half": (0, torch.float16), "bf16": (1, torch.bfloat16), "tf32": (2, torch.float32)}
CORRECT, DIVERGENT, PARTIAL, MISALIGNED, BAD_LDM, ASSUMED_LAYOUT, UNSYNCED = range(7)


@pytest.fixture(scope="module")
def lib():
    lib = h.load("wmma_selftest", SOURCES)
    lib.configure()
    yield lib
    lib.configure()


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest (ties away) to 10 mantissa bits, as wmma::__float_to_tf32."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    u = ((u + 0x1000) & 0xFFFFE000).to(torch.int64)
    u = torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)
    return u.view(torch.float32)


def _gemm(lib, dtype, a_row, b_row, m=32, n=48, k=32, pad=8, store_col=False, mode=CORRECT, warps=2, seed=0):
    code, tdtype = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(tdtype)
    b = torch.randn(k, n, generator=g).to(tdtype)
    # Stored with padded leading dimensions (row-major, or the transpose for col_major fragments).
    sa = a if a_row else a.t()
    sb = b if b_row else b.t()
    lda, ldb = sa.shape[1] + pad, sb.shape[1] + pad
    pa = torch.zeros(sa.shape[0], lda, dtype=tdtype)
    pa[:, : sa.shape[1]] = sa
    pb = torch.zeros(sb.shape[0], ldb, dtype=tdtype)
    pb[:, : sb.shape[1]] = sb
    as_bits = (lambda t: t.view(torch.int16)) if tdtype != torch.float32 else (lambda t: t)
    c = torch.empty(m * n, dtype=torch.float32)

    def run():
        lib.call("selftest_wmma_gemm", code, int(a_row), int(b_row), as_bits(pa), as_bits(pb), c, m, n, k, lda, ldb,
                 int(store_col), mode, warps)
        out = c.view(n, m).t() if store_col else c.view(m, n)
        return out.clone()

    af, bf = a.float(), b.float()
    if dtype == "tf32":
        af, bf = _tf32(af), _tf32(bf)
    ref = (af.double() @ bf.double()).float()
    return run, ref


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("a_row, b_row, store_col", [(1, 1, 0), (1, 0, 1), (0, 1, 0), (0, 0, 1)])
def test_gemm_matches_reference_for_every_type_and_layout(lib, dtype, a_row, b_row, store_col):
    run, ref = _gemm(lib, dtype, a_row, b_row, store_col=store_col)
    h.assert_schedule_independent(
        lib, run, lambda got, cfg: torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5), runs=h.DEFAULT_RUNS[:2]
    )


def test_tf32_conversion_rounds_to_nearest(lib):
    # 1 + 0.75 ulp(tf32): wmma::__float_to_tf32 rounds it up to 1 + 2^-10 (truncation would give 1).
    a = torch.full((16, 8), 1 + 2**-11 + 2**-12)
    b = torch.zeros(8, 16)
    b[0] = 1.0
    c = torch.empty(256)
    lib.call("selftest_wmma_gemm", DTYPES["tf32"][0], 1, 1, a, b, c, 16, 16, 8, 8, 16, 0, CORRECT, 1)
    assert torch.equal(c, torch.full((256,), 1 + 2**-10))


@pytest.mark.parametrize(
    "mode, message",
    [
        (DIVERGENT, r"divergent wmma::mma_sync: lane 0 calls it at line \d+, lane 1 at line \d+"),
        (PARTIAL, r"__syncwarp \(mask 0xffffffff, width 32\) while lane 0 waits in wmma::mma_sync with the same mask"),
        (MISALIGNED, r"wmma::load_matrix_sync: pointer 0x[0-9a-f]+ is not 256-bit \(32-byte\) aligned"),
        (BAD_LDM, r"wmma::load_matrix_sync: ldm = 39 is not a multiple of 8 elements \(16 bytes\)"),
    ],
)
def test_misuse_is_reported(lib, mode, message):
    run, _ = _gemm(lib, "half", 1, 1, mode=mode)
    with pytest.raises(h.EmuError, match=message) as e:
        run()
    assert "wmma_selftest::gemm_kernel" in str(e.value)
    assert lib.live_allocations() == 0


@pytest.mark.parametrize("dtype", ["half", "tf32"])
def test_code_assuming_a_fragment_layout_gets_a_scrambled_result(lib, dtype):
    run, ref = _gemm(lib, dtype, 1, 1, mode=ASSUMED_LAYOUT)
    got = run()
    # Every value is there (the lanes hold a permutation of the tile), but not where the code assumed.
    torch.testing.assert_close(got.flatten().sort().values, ref.flatten().sort().values, rtol=1e-5, atol=1e-5)
    assert (got - ref).abs().max() > 0.1


def test_missing_syncwarp_after_store_shows_under_some_schedule(lib):
    run, ref = _gemm(lib, "half", 1, 1, m=16, n=16, k=16, mode=UNSYNCED, warps=1)
    results = h.run_all_schedules(lib, run)
    assert any(not torch.equal(r, results[0]) for r in results[1:])
