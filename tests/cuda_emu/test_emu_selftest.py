"""Self-tests of the CUDA execution emulator (csrc/testing/cuda_emu): barriers, per-block shared memory, warp
collectives' exact lane semantics and mask checks, out-of-bounds and fault reporting, and a planted race that the
harness must catch."""
import pytest
import torch

import emu_harness as h

pytestmark = pytest.mark.skipif(not h.compiler_available(), reason="no C++ compiler for the emulated build")

SOURCES = [h.EMU_DIR / "selftest" / "selftest_kernels.cu"]


@pytest.fixture(scope="module")
def lib():
    lib = h.load("selftest", SOURCES)
    lib.configure()
    yield lib
    lib.configure()


# ---------------------------------------------------------------------------------------------------------
# Barriers and shared memory
# ---------------------------------------------------------------------------------------------------------
def _barrier(lib, mode, blocks=3, threads=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    inp = torch.randint(0, 1000, (blocks * threads,), dtype=torch.int32, generator=g)
    out = torch.empty_like(inp)
    lib.call("selftest_barrier", inp, out, blocks, threads, mode)
    x = inp.view(blocks, threads)
    return out.view(blocks, threads), x.roll(-1, 1) + 10 * x.flip(1)


@pytest.mark.parametrize("threads", [32, 64, 256])
def test_barrier_orders_writes_before_reads(lib, threads):
    def check(res, cfg):
        out, ref = res
        assert torch.equal(out, ref)

    h.assert_schedule_independent(lib, lambda: _barrier(lib, 0, threads=threads), check)


def test_barrier_reductions_and_3d_indexing(lib):
    bx, by, bz = 8, 4, 2
    out = torch.empty(bx * by * bz * 5, dtype=torch.int32)
    lib.call("selftest_barrier_reduce", out, bx, by, bz)
    out = out.view(-1, 5)
    n = bx * by * bz
    assert out[:, 0].eq(sum(1 for t in range(n) if t % 3 == 0)).all()
    assert out[:, 1].eq(1).all() and out[:, 2].eq(1).all() and out[:, 3].eq(0).all()
    expect = [x * 100 + y * 10 + z for z in range(bz) for y in range(by) for x in range(bx)]
    assert out[:, 4].tolist() == expect


def test_shared_memory_is_per_block_and_poisoned(lib):
    blocks, threads = 3, 64
    out = torch.empty(blocks * threads, dtype=torch.int32)
    first = torch.empty_like(out)
    for cfg in h.DEFAULT_RUNS:
        lib.configure(**cfg)
        lib.call("selftest_shared_isolation", out, first, blocks, threads)
        assert first.eq(-1).all(), "dynamic shared memory must start poisoned in every block"
        b = torch.arange(blocks).view(-1, 1)
        o = (torch.arange(threads) + 3) % threads
        ref = b * 1000 + o + (b * 1000 + 2 * o) * 100000
        assert torch.equal(out.view(blocks, threads), ref.to(torch.int32))
    lib.configure()


# ---------------------------------------------------------------------------------------------------------
# Warp collectives: results recomputed from the PTX definitions of shfl.sync / vote / match / redux
# ---------------------------------------------------------------------------------------------------------
def _shfl(vals, lane, mode, b, width):
    b &= 31  # PTX: bval = b[4:0]
    segmask = (32 - width) & 31
    clamp = 0 if mode == "up" else 31
    max_lane = (lane & segmask) | (clamp & ~segmask & 31)
    min_lane = lane & segmask
    if mode == "up":
        j, ok = lane - b, lane - b >= max_lane
    elif mode == "down":
        j, ok = lane + b, lane + b <= max_lane
    elif mode == "xor":
        j, ok = lane ^ b, (lane ^ b) <= max_lane
    else:
        j = min_lane | (b & ~segmask & 31)
        ok = j <= max_lane
    return vals[j] if ok else vals[lane]


def _u32(x):
    return x & 0xFFFFFFFF


def _expected_collectives(warp_vals):
    rows = []
    full_sum = sum(warp_vals)
    for lane, v in enumerate(warp_vals):
        r = [0] * 25
        r[0] = _shfl(warp_vals, lane, "idx", 5, 32)
        r[1] = _shfl(warp_vals, lane, "idx", lane + 3, 8)
        r[2] = _shfl(warp_vals, lane, "idx", -1, 16)
        r[3] = _shfl(warp_vals, lane, "up", 3, 32)
        r[4] = _shfl(warp_vals, lane, "up", 2, 8)
        r[5] = _shfl(warp_vals, lane, "down", 5, 32)
        r[6] = _shfl(warp_vals, lane, "down", 3, 4)
        r[7] = _shfl(warp_vals, lane, "xor", 1, 32)
        r[8] = _shfl(warp_vals, lane, "xor", 6, 8)
        r[9] = _shfl(warp_vals, lane, "xor", 16, 16)
        r[10] = sum(1 << k for k, x in enumerate(warp_vals) if x & 1)
        r[11] = int(any(x == 7 for x in warp_vals))
        r[12] = 1
        r[13] = sum(1 << k for k, x in enumerate(warp_vals) if x % 4 == v % 4)
        all_same = len({x % 4 for x in warp_vals}) == 1
        r[14] = 0xFFFFFFFF if all_same else 0
        r[15] = int(all_same)
        r[16] = _u32(full_sum)
        r[17] = _u32(min(x - 10 for x in warp_vals))
        r[18] = max(warp_vals)
        acc = 0
        for x in warp_vals:
            acc |= x
        r[19] = acc
        g0 = lane & ~7
        group = warp_vals[g0 : g0 + 8]
        r[20] = warp_vals[g0 | 2]
        r[21] = sum(1 << (g0 + k) for k, x in enumerate(group) if x & 2)
        r[22] = sum(group)
        if lane % 2 == 0:
            r[23] = sum(1 << k for k, x in enumerate(warp_vals) if k % 2 == 0 and x > 10)
        else:
            r[23] = 0xDEADBEEF
        r[24] = _shfl(warp_vals, lane, "down", 33, 32)
        rows.append([_u32(x) for x in r])
    return rows


@pytest.mark.parametrize("threads", [32, 64])
def test_warp_collectives_lane_semantics(lib, threads):
    g = torch.Generator().manual_seed(threads)
    inp = torch.randint(0, 20, (threads,), dtype=torch.int32, generator=g)
    res = torch.empty(threads * 25, dtype=torch.int32)
    expected = []
    for w in range(threads // 32):
        expected += _expected_collectives(inp[w * 32 : (w + 1) * 32].tolist())

    def run():
        lib.call("selftest_collectives", inp, res, threads)
        return [[_u32(x) for x in row] for row in res.view(threads, 25).tolist()]

    def check(got, cfg):
        for t in range(threads):
            assert got[t] == expected[t], f"thread {t}: {got[t]} != {expected[t]}"

    h.assert_schedule_independent(lib, run, check)


def test_match_all_when_all_equal(lib):
    inp = torch.full((32,), 8, dtype=torch.int32)
    res = torch.empty(32 * 25, dtype=torch.int32)
    lib.call("selftest_collectives", inp, res, 32)
    rows = res.view(32, 25)
    assert rows[:, 14].eq(-1).all() and rows[:, 15].eq(1).all()


@pytest.mark.parametrize(
    "mode, threads, message",
    [
        (0, 64, r"__shfl_sync called with mask 0x0000ffff, which does not name the calling lane 16"),
        (1, 64, r"deadlock: lanes 0-15 wait in __shfl_sync with mask 0xffffffff, but lanes 16-31 never arrive"),
        (2, 64, r"__ballot_sync \(mask 0xffffffff, width 32\) while lane 0 waits in __shfl_sync with the same mask"),
        (7, 64, r"deadlock: lanes 0-15 wait in __shfl_sync with mask 0xffffffff, but lanes 16-31 never arrive \(exited: 16-31"),
        (3, 48, r"names lanes 16-31, which do not exist \(block of 48 threads\)"),
        (4, 64, r"reads lane 20, which is not in the mask 0x0000ffff"),
        (5, 64, r"__syncwarp mask 0xffffffff names lanes 0-15, which have already exited"),
        (6, 64, r"__syncthreads\(\) reached by 16 of 64 threads; 48 exited"),
    ],
)
def test_warp_mask_and_barrier_misuse_is_reported(lib, mode, threads, message):
    with pytest.raises(h.EmuError, match=message) as e:
        lib.call("selftest_bad_mask", mode, threads)
    assert "selftest::bad_mask_kernel" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Out-of-bounds accesses and faults, reported with kernel and thread
# ---------------------------------------------------------------------------------------------------------
WHERE = r"kernel selftest::fault_kernel, block \(\d,0,0\), thread \(37,0,0\) \[warp 1 lane 5\]"


@pytest.mark.parametrize(
    "mode, n, align, message",
    [
        (0, 16, "end", WHERE + r": out-of-bounds read at 0x[0-9a-f]+: 0 bytes past the end of device buffer 'victim'"),
        (1, 16, "end", WHERE + r": out-of-bounds write at 0x[0-9a-f]+: 12 bytes past the end of device buffer 'victim'"),
        (2, 16, "start", WHERE + r": out-of-bounds read at 0x[0-9a-f]+: 4 bytes before the start of device buffer"),
        (3, 16, "end", WHERE + r": out-of-bounds read at 0x[0-9a-f]+: 0 bytes past the end of dynamic shared memory"),
        (4, 16, "end", WHERE + r": trap: out-of-bounds index into a fixed-size array"),
        (5, 3, "end", r"kernel selftest::fault_kernel wrote 0 bytes past the end of device buffer 'victim'"),
        (7, 16, "end", WHERE + r": out-of-bounds write at 0x[0-9a-f]+: the thread's stack guard page: stack overflow"),
        (8, 16, "end", WHERE + r": arithmetic exception"),
    ],
)
def test_faults_are_reported_with_kernel_and_thread(lib, mode, n, align, message):
    lib.configure(align=align)
    try:
        with pytest.raises(h.EmuError, match=message):
            lib.call("selftest_fault", mode, n, 64, 37, 16, 0)
        # The emulator recovers: the same library keeps working after a fault.
        out, ref = _barrier(lib, 0)
        assert torch.equal(out, ref)
        assert lib.live_allocations() == 0
    finally:
        lib.configure()


def test_spinning_kernel_times_out(lib):
    lib.configure(timeout_s=1.0)
    try:
        with pytest.raises(h.EmuError, match=WHERE + r": kernel ran for more than 1 s of CPU time"):
            lib.call("selftest_fault", 6, 16, 64, 37, 16, 0)
    finally:
        lib.configure()


def test_host_pointer_argument_is_rejected(lib):
    with pytest.raises(h.EmuError, match=r"pointer argument #0 .* is not device memory"):
        lib.call("selftest_fault", 0, 16, 64, 37, 16, 1)


# ---------------------------------------------------------------------------------------------------------
# Atomics, vector types, half conversions
# ---------------------------------------------------------------------------------------------------------
def test_atomics_vectors_and_half_conversions(lib):
    n = 100
    in4 = torch.arange(4 * n, dtype=torch.float32)
    out4 = torch.empty_like(in4)
    counters = torch.tensor([0, -1, 0, 0, 0], dtype=torch.int32)
    special = [0.0, -0.0, 1.0, 65504.0, 65520.0, 1e6, 6e-8, 2.9e-8, 1e-40, float("inf"), -float("inf"),
               1.0009765625, 1.00048828125, 1.00146484375, 3.0e38, -2.5, 1 + 2**-8, 1 + 3 * 2**-9]
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor(special), torch.randn(n - len(special), generator=g) * 100])
    halves = torch.empty(n, dtype=torch.int16)
    bfloats = torch.empty(n, dtype=torch.int16)
    lib.call("selftest_atomics_vectors", in4, out4, counters, halves, bfloats, values, n, 32)
    x = in4.view(n, 4)
    assert torch.equal(out4.view(n, 4), torch.stack([x[:, 3], x[:, 2], x[:, 1], x[:, 0] + 1], 1))
    assert counters.tolist() == [n, n - 1, -(n - 1), -1, n]
    assert torch.equal(halves, values.half().view(torch.int16))
    assert torch.equal(bfloats, values.bfloat16().view(torch.int16))
    nan = torch.tensor([float("nan")] * n)
    lib.call("selftest_atomics_vectors", in4, out4, counters, halves, bfloats, nan, n, 32)
    assert torch.isnan(halves.view(torch.float16)).all() and torch.isnan(bfloats.view(torch.bfloat16)).all()


# ---------------------------------------------------------------------------------------------------------
# The planted race: a missing __syncthreads() must make the harness's check fail
# ---------------------------------------------------------------------------------------------------------
def _reduce(lib, mode, blocks=4, threads=256):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 10, (blocks * threads,), generator=g).float()
    out = torch.empty(blocks)
    lib.call("selftest_reduce", x, out, blocks, threads, mode)
    return out, x.view(blocks, threads).sum(1)


def _exact(res, cfg):
    out, ref = res
    assert torch.equal(out, ref), f"{out.tolist()} != {ref.tolist()}"


def test_planted_race_missing_barrier_in_reduction_is_caught(lib):
    h.assert_schedule_independent(lib, lambda: _reduce(lib, 0), _exact)  # the correct kernel passes
    with pytest.raises(AssertionError, match="under schedule"):
        h.assert_schedule_independent(lib, lambda: _reduce(lib, 1), _exact)


def test_planted_race_missing_barrier_after_store_is_caught(lib):
    h.assert_schedule_independent(lib, lambda: _barrier(lib, 0), _exact)
    with pytest.raises(AssertionError, match="under schedule"):
        h.assert_schedule_independent(lib, lambda: _barrier(lib, 1), _exact)


def test_planted_race_changes_results_between_schedules(lib):
    # Without any reference: a racy kernel gives schedule-dependent results, a correct one does not.
    racy = h.run_all_schedules(lib, lambda: _reduce(lib, 1)[0].clone())
    fine = h.run_all_schedules(lib, lambda: _reduce(lib, 0)[0].clone())
    assert any(not torch.equal(racy[0], r) for r in racy[1:])
    assert all(torch.equal(fine[0], r) for r in fine[1:])


def test_stats_count_threads_and_switches(lib):
    before = lib.stats()
    _barrier(lib, 0, blocks=2, threads=64)
    after = lib.stats()
    assert after["launches"] - before["launches"] == 1
    assert after["blocks"] - before["blocks"] == 2
    assert after["threads"] - before["threads"] == 128
    assert after["switches"] - before["switches"] >= 2 * 128 * 2

