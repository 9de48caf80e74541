"""The attention benchmark's study: lattice's jagged attention kernel on CPU against padded
``scaled_dot_product_attention``.

Cases (issue 3; the same names as benchmarks/bench_attention_cuda.py):
  (a) ``summary``      8 summary queries per sample attending to a sequence of length uniform in [0, L]
                       (InterFormer's PMA/CLS direction);
  (b) ``self-causal``  causal self-attention over the same jagged sequences;
  (c) ``full``         every sequence at its maximum length L, causal self-attention (padding wastes nothing
                       here: the baseline's best case);
  and, on request (``--cases``), ``full-summary``: 8 queries over sequences all of length L.
For every B in ``--batch``, H in ``--heads``, Dh in ``--dims``: forward and forward+backward.

Baselines in the same run: ``F.scaled_dot_product_attention`` on padded ``[B, H, L, Dh]`` tensors with a
boolean mask (the padding is built beforehand and not timed: the most favourable setting for the baseline),
and the pure-torch reference (``lattice.ops.reference``, pad + mask + softmax; skipped where its padded
score tensors would exceed ``--reference-max-gb``). For ``full`` the table also shows SDPA with
``is_causal=True`` and no mask tensor (informational).

Prints medians (wall clock, or CPU time with ``--clock process``), ratios (baseline time / ours: > 1 means lattice is faster) and achieved GFLOP/s
counting only visible (query, key) pairs (4 * pairs * Dh * H for the forward; the backward does 2.5x that),
next to the machine's fp32 matmul GFLOP/s measured in the same run with the same threads. Writes JSON
(benchmarks/bench_attention.py). Never asserts on time.
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lattice.benchmark.timing import timeit, timeit_rounds
from lattice.ops import jagged_attention
from lattice.ops.reference import jagged_attention_reference
from lattice.ops.reference.attention import pad_jagged

__all__ = ["CASES", "Problem", "lengths_for", "offsets_of", "visible_pairs", "run"]

CASES = ("summary", "self-causal", "full", "full-summary")
SUMMARY_QUERIES = 8
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def matmul_gflops(size: int, repeat: int, clock=time.perf_counter) -> float:
    """fp32 GFLOP/s of a ``size`` x ``size`` matmul (the machine's compute reference)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = timeit(lambda: torch.mm(a, b), repeat, 2, clock)["median_s"]
    return 2 * size**3 / seconds / 1e9


def lengths_for(case: str, batch: int, max_len: int, g: torch.Generator):
    """(query lengths, key lengths, causal)."""
    seq = torch.randint(0, max_len + 1, (batch,), generator=g)
    full = torch.full((batch,), max_len, dtype=torch.int64)
    dense = torch.full((batch,), SUMMARY_QUERIES, dtype=torch.int64)
    if case == "summary":
        return dense, seq, False
    if case == "self-causal":
        return seq, seq, True
    if case == "full":
        return full, full, True
    if case == "full-summary":
        return dense, full, False
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return offsets


def visible_pairs(lq: torch.Tensor, lk: torch.Tensor, causal: bool) -> int:
    if not causal:
        return int((lq * lk).sum())
    # Query i of n sees min(m, max(0, i + m - n + 1)) keys.
    total = 0
    for n, m in zip(lq.tolist(), lk.tolist()):
        i = torch.arange(n)
        total += int((i + (m - n) + 1).clamp(0, m).sum())
    return total


class Problem:
    """Jagged inputs, their padded copies and the mask, for one (case, B, H, Dh)."""

    def __init__(self, case: str, batch: int, heads: int, head_dim: int, max_len: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lq, self.lk, self.causal = lengths_for(case, batch, max_len, g)
        self.qo, self.ko = offsets_of(self.lq), offsets_of(self.lk)
        nq, nk = int(self.qo[-1]), int(self.ko[-1])
        self.q = torch.randn(nq, heads, head_dim, generator=g).requires_grad_()
        self.k = torch.randn(nk, heads, head_dim, generator=g).requires_grad_()
        self.v = torch.randn(nk, heads, head_dim, generator=g).requires_grad_()
        self.grad_out = torch.randn(nq, heads, head_dim, generator=g)
        self.scale = head_dim**-0.5
        self.pairs = visible_pairs(self.lq, self.lk, self.causal)
        self.flops_fwd = 4.0 * self.pairs * head_dim * heads

        with torch.no_grad():
            qp, q_valid = pad_jagged(self.q, self.qo)
            kp, k_valid = pad_jagged(self.k, self.ko, max_len=max(int(self.lk.max()), 1))
            vp, _ = pad_jagged(self.v, self.ko, max_len=kp.shape[1])
        self.qp, self.kp, self.vp = (t.transpose(1, 2).contiguous().requires_grad_() for t in (qp, kp, vp))
        lq_max, lk_max = self.qp.shape[2], self.kp.shape[2]
        mask = k_valid[:, None, None, :].expand(batch, 1, lq_max, lk_max)
        if self.causal:
            shift = (self.lk - self.lq)[:, None, None, None]
            i = torch.arange(lq_max)[None, None, :, None]
            j = torch.arange(lk_max)[None, None, None, :]
            mask = mask & (j <= i + shift)
        self.mask = mask.contiguous()
        self.grad_out_padded = torch.randn(self.qp.shape, generator=g)
        self.padded_scores_gb = batch * heads * lq_max * lk_max * 4 / 1e9

    # --- the contenders -------------------------------------------------------------------------------
    def ours_fwd(self):
        with torch.no_grad():
            torch.ops.lattice.jagged_attention(self.q, self.qo, self.k, self.v, self.ko, self.scale, self.causal)

    def ours_fwd_bwd(self):
        out, _ = jagged_attention(self.q, self.qo, self.k, self.v, self.ko, self.scale, self.causal)
        torch.autograd.grad(out, (self.q, self.k, self.v), self.grad_out)

    def sdpa_fwd(self, is_causal=False):
        with torch.no_grad():
            self._sdpa(is_causal)

    def sdpa_fwd_bwd(self, is_causal=False):
        out = self._sdpa(is_causal)
        torch.autograd.grad(out, (self.qp, self.kp, self.vp), self.grad_out_padded)

    def _sdpa(self, is_causal):
        if is_causal:
            return F.scaled_dot_product_attention(self.qp, self.kp, self.vp, is_causal=True, scale=self.scale)
        return F.scaled_dot_product_attention(self.qp, self.kp, self.vp, attn_mask=self.mask, scale=self.scale)

    def reference_fwd(self):
        with torch.no_grad():
            jagged_attention_reference(self.q, self.qo, self.k, self.v, self.ko, self.scale, self.causal)

    def reference_fwd_bwd(self):
        out, _ = jagged_attention_reference(self.q, self.qo, self.k, self.v, self.ko, self.scale, self.causal)
        torch.autograd.grad(out, (self.q, self.k, self.v), self.grad_out)


def run(*, cases, batch, heads, dims, modes, max_len: int, repeat: int, warmup: int, threads: int,
        matmul_size: int, reference_max_gb: float, sdpa_is_causal: bool, clock: str = "wall") -> dict:
    """Every (case, B, H, Dh, mode) of the grid, printed as a table row as it is measured; the report
    (machine, settings, rows, per-case summary against the targets). ``clock``: ``wall`` or ``process``
    (CPU seconds of all threads)."""
    timer = CLOCKS[clock]
    torch.set_num_threads(threads)
    machine_gflops = matmul_gflops(matmul_size, repeat + 2, timer)
    print(
        f"threads={threads}  clock={clock}  fp32 matmul ({matmul_size}^2): {machine_gflops:.1f} GFLOP/s  "
        f"torch {torch.__version__}  {platform.processor() or platform.machine()}"
    )
    header = (
        f"{'case':<13}{'B':>6}{'H':>3}{'Dh':>4} {'mode':<8}{'ours ms':>10}{'sdpa ms':>10}{'ref ms':>10}"
        f"{'sdpa/ours':>10}{'ref/ours':>9}{'GFLOP/s':>9}{'%mm':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    seed = 0
    for case in cases:
        for B in batch:
            for H in heads:
                for head_dim in dims:
                    seed += 1
                    problem = Problem(case, B, H, head_dim, max_len, seed)
                    with_reference = problem.padded_scores_gb <= reference_max_gb
                    for mode in modes:
                        fwd_only = mode == "fwd"
                        flops = problem.flops_fwd * (1.0 if fwd_only else 3.5)
                        pair = timeit_rounds({"ours": problem.ours_fwd if fwd_only else problem.ours_fwd_bwd,
                                              "sdpa": problem.sdpa_fwd if fwd_only else problem.sdpa_fwd_bwd},
                                             repeat, warmup, timer)
                        ours, sdpa = pair["ours"]["median_s"], pair["sdpa"]["median_s"]
                        ref = None
                        if with_reference:
                            fn = problem.reference_fwd if fwd_only else problem.reference_fwd_bwd
                            ref = timeit(fn, max(1, min(repeat, 3)), min(warmup, 1), timer)["median_s"]
                        sdpa_causal = None
                        if case == "full" and sdpa_is_causal:
                            fn = (lambda: problem.sdpa_fwd(True)) if fwd_only else (lambda: problem.sdpa_fwd_bwd(True))
                            sdpa_causal = timeit(fn, repeat, warmup, timer)["median_s"]
                        gflops = flops / ours / 1e9
                        row = dict(
                            case=case, batch=B, heads=H, head_dim=head_dim, mode=mode,
                            causal=problem.causal, max_len=max_len, visible_pairs=problem.pairs,
                            flops=flops, ours_ms=ours * 1e3, sdpa_ms=sdpa * 1e3,
                            reference_ms=None if ref is None else ref * 1e3,
                            sdpa_is_causal_ms=None if sdpa_causal is None else sdpa_causal * 1e3,
                            speedup_vs_sdpa=sdpa / ours,
                            speedup_vs_reference=None if ref is None else ref / ours,
                            ours_gflops=gflops, sdpa_gflops=flops / sdpa / 1e9,
                            fraction_of_matmul=gflops / machine_gflops,
                        )
                        rows.append(row)
                        ref_ms = f"{ref * 1e3:10.1f}" if ref is not None else f"{'-':>10}"
                        ref_x = f"{ref / ours:9.2f}" if ref is not None else f"{'-':>9}"
                        extra = f"   (sdpa is_causal {sdpa_causal * 1e3:.1f} ms)" if sdpa_causal is not None else ""
                        print(
                            f"{case:<13}{B:>6}{H:>3}{head_dim:>4} {mode:<8}{ours * 1e3:10.1f}{sdpa * 1e3:10.1f}"
                            f"{ref_ms}{sdpa / ours:10.2f}{ref_x}{gflops:9.1f}{100 * gflops / machine_gflops:6.1f}{extra}",
                            flush=True,
                        )
                    del problem
                    gc.collect()

    targets = {"summary": 2.0, "self-causal": 2.0, "full": 0.9}
    summary = {}
    for case in cases:
        ratios = [r["speedup_vs_sdpa"] for r in rows if r["case"] == case and r["mode"] == "fwd+bwd"]
        if ratios:
            summary[case] = dict(
                fwd_bwd_speedup_vs_sdpa_min=min(ratios),
                fwd_bwd_speedup_vs_sdpa_median=statistics.median(ratios),
                target=targets.get(case),
                target_met_by_all=None if case not in targets else all(x >= targets[case] for x in ratios),
            )
    print()
    for case, s in summary.items():
        target = f"target >= {s['target']}x: {'met' if s['target_met_by_all'] else 'NOT met'} by every config" if s[
            "target"] else "no target"
        print(
            f"{case:<13} fwd+bwd vs padded SDPA: min {s['fwd_bwd_speedup_vs_sdpa_min']:.2f}x, "
            f"median {s['fwd_bwd_speedup_vs_sdpa_median']:.2f}x  ({target})"
        )
    return dict(
        benchmark="bench_attention",
        machine=dict(
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            threads=threads,
            clock=clock,
            torch=torch.__version__,
            fp32_matmul_gflops=machine_gflops,
            matmul_size=matmul_size,
        ),
        settings=dict(
            max_len=max_len, repeat=repeat, warmup=warmup, summary_queries=SUMMARY_QUERIES,
            flops_convention="forward 4*pairs*Dh*H (visible pairs only); fwd+bwd 3.5x forward",
            sdpa_inputs="padded [B, H, L, Dh] with a bool mask, padding not timed",
        ),
        rows=rows,
        summary=summary,
    )
