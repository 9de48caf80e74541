"""Agreement of lattice's pooling kernels with torch at a benchmark's own scale, checked before anything is timed:
timings of wrong results measure nothing, and the unit tests run far smaller tables than the benchmarks (where,
for instance, element offsets pass 2^31). Shared by benchmarks/bench_pooling.py (CPU) and bench_pooling_cuda.py (GPU).

Three checks, on the benchmark's own tensors (sum pooling):
- forward against one ``F.embedding_bag`` call over the concatenated table;
- the sparse backward (unique rows, summed row gradients) against ``F.embedding_bag(sparse=True)``'s coalesced
  gradient;
- one fused row-wise Adagrad step (fresh state) against the reference's step (``lattice.ops.reference``) from
  that gradient, on every touched row, plus a sample of untouched rows that must not move. The touched rows are
  restored afterwards, so the benchmark then times the table it built.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from lattice.ops.reference import pooling as pooling_reference

# Relative tolerance per storage dtype (errors are taken relative to max(1, the reference's largest magnitude)).
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def check_pooling_agreement(weights: torch.Tensor, table_row_offsets: torch.Tensor, indices: torch.Tensor,
                            offsets: torch.Tensor, global_indices: torch.Tensor, grad_output: torch.Tensor,
                            learning_rate: float = 0.01, eps: float = 1e-8, untouched_sample: int = 4096,
                            ) -> Dict[str, object]:
    """weights [rows_total, D]; table_row_offsets [T+1]; indices [N] (local to their table); offsets [T*B+1]
    key-major; global_indices [N] (= indices + their table's first row); grad_output [B, T, D].

    Returns {"forward", "backward", "fused_step": relative max errors, "tolerance", "ok"}. ``weights`` is left
    as it was (the step's rows are written back).
    """
    ops = torch.ops.lattice
    B, T, D = grad_output.shape
    tol = RTOL.get(weights.dtype, 1e-4)
    report: Dict[str, object] = {"tolerance": tol}

    with torch.no_grad():
        ours = ops.jagged_embedding_pool(weights, table_row_offsets, indices, offsets, 0, None)
        theirs = F.embedding_bag(global_indices, weights, offsets[:-1], mode="sum")
        report["forward"] = _rel_err(ours, theirs.view(T, B, D).transpose(0, 1))
    del ours, theirs

    leaf = weights.detach().requires_grad_(True)  # shares storage; the gradient is sparse, no dense copy
    out = F.embedding_bag(global_indices, leaf, offsets[:-1], mode="sum", sparse=True)
    out.view(T, B, D).transpose(0, 1).backward(grad_output)
    torch_grad = leaf.grad.coalesce()
    rows_ref, grads_ref = torch_grad.indices()[0], torch_grad.values()
    del leaf, out, torch_grad
    rows, row_grads = ops.jagged_embedding_pool_backward_sparse(grad_output, table_row_offsets, indices, offsets, 0,
                                                                None)
    if not torch.equal(rows.to(rows_ref.device), rows_ref):
        report["backward"] = float("inf")
        report["backward_rows_differ"] = True
    else:
        report["backward"] = _rel_err(row_grads, grads_ref)
    # Every row either side says the step touches, to put back afterwards.
    restore_rows = torch.unique(torch.cat([rows_ref, rows.to(rows_ref.device)]))
    del rows, row_grads

    with torch.no_grad():
        saved = weights[restore_rows].clone()
        # The expected step: the reference's row-wise Adagrad on a compact copy of the touched rows.
        expected = weights[rows_ref]
        touched_ids = torch.arange(rows_ref.numel(), device=weights.device)
        pooling_reference.sparse_rows_optimizer_step_(
            expected, torch.zeros(rows_ref.numel(), device=weights.device), touched_ids, grads_ref,
            pooling_reference.ROWWISE_ADAGRAD, learning_rate, eps, 0.0)
        is_touched = torch.zeros(weights.shape[0], dtype=torch.bool, device=weights.device)
        is_touched[rows_ref] = True
        untouched_rows = (~is_touched).nonzero().flatten()
        pick = torch.randperm(untouched_rows.numel(), device="cpu")[:untouched_sample].to(untouched_rows.device)
        untouched_rows = untouched_rows[pick]
        untouched = weights[untouched_rows].clone()
        state = torch.zeros(weights.shape[0], dtype=torch.float32, device=weights.device)
        ops.jagged_embedding_pool_backward_fused_(weights, state, grad_output, table_row_offsets, indices, offsets, 0,
                                                  None, pooling_reference.ROWWISE_ADAGRAD, learning_rate, eps, 0.0)
        step_err = _rel_err(weights[rows_ref], expected)
        moved = not torch.equal(weights[untouched_rows], untouched)
        weights[restore_rows] = saved  # the benchmark goes on with the table it built
    report["fused_step"] = float("inf") if moved else step_err
    report["untouched_rows_moved"] = moved
    del saved, expected, state, is_touched
    report["ok"] = all(report[k] <= tol for k in ("forward", "backward", "fused_step"))
    return report


def describe(report: Dict[str, object]) -> str:
    """One line for a benchmark's output."""
    verdict = "ok" if report["ok"] else "MISMATCH"
    extra = " (untouched rows moved)" if report.get("untouched_rows_moved") else ""
    extra += " (backward rows differ)" if report.get("backward_rows_differ") else ""
    return (f"agreement with torch: forward {report['forward']:.1e}, backward {report['backward']:.1e}, "
            f"fused row-wise Adagrad step {report['fused_step']:.1e} (tolerance {report['tolerance']:.0e}): "
            f"{verdict}{extra}")
