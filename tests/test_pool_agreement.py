"""lattice.benchmark.pool_agreement, the check the pooling benchmarks run before timing: it passes on lattice's kernels
(fp32 and bf16), leaves the table as it was, and reports a planted disagreement instead of passing it."""
import pytest
import torch

import lattice  # noqa: F401  (registers torch.ops.lattice)


def _module():
    from lattice.benchmark import pool_agreement

    return pool_agreement


def _workload(dtype, T=4, R=3000, D=24, B=64, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (T * B,), generator=g)  # empty bags included
    offsets = torch.zeros(T * B + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    indices = torch.randint(0, R, (int(offsets[-1]),), generator=g)
    tro = torch.arange(T + 1, dtype=torch.int64) * R
    table = torch.repeat_interleave(torch.arange(T * B), lengths) // B
    weights = (torch.randn(T * R, D, generator=g) * 0.01).to(dtype)
    grad = torch.randn(B, T, D, generator=g).to(dtype)
    return weights, tro, indices, offsets, indices + tro[table], grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agrees_on_lattice_kernels_and_restores_the_table(dtype):
    pa = _module()
    weights, tro, indices, offsets, global_indices, grad = _workload(dtype)
    before = weights.clone()
    report = pa.check_pooling_agreement(weights, tro, indices, offsets, global_indices, grad)
    assert report["ok"], pa.describe(report)
    assert report["forward"] <= report["tolerance"] and report["fused_step"] <= report["tolerance"]
    assert not report["untouched_rows_moved"]
    assert torch.equal(weights, before)
    assert "ok" in pa.describe(report)


def test_reports_a_disagreement():
    pa = _module()
    weights, tro, indices, offsets, global_indices, grad = _workload(torch.float32)
    before = weights.clone()
    wrong = global_indices.clone()
    wrong[3] = (wrong[3] + 1) % weights.shape[0]  # torch's side now gathers one other row
    report = pa.check_pooling_agreement(weights, tro, indices, offsets, wrong, grad)
    assert not report["ok"]
    assert report["forward"] > report["tolerance"] and report["backward_rows_differ"]
    assert "MISMATCH" in pa.describe(report)
    assert torch.equal(weights, before)  # rows either side touched are put back
