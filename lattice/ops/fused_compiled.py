"""The fused-optimizer pooling as two opaque custom ops, so that ``torch.compile(fullgraph=True)`` captures it.

:func:`lattice.ops.jagged_embedding_pool_fused` in eager mode is an ``autograd.Function`` whose backward
updates the weights in place. Under ``torch.compile`` it routes here instead (one process; the data-parallel
row exchange stays an eager graph break):

- ``lattice::fused_pool_train(anchor, weights, state, ...) -> [B, T, D]`` pools like
  ``jagged_embedding_pool``; ``anchor`` is one module-level one-element CPU tensor that requires grad (a compiled
  region cannot create one), so the output joins the autograd graph although the weights do not require
  grad (as in eager);
- its registered backward calls ``lattice::fused_pool_train_step(grad, weights, state, ...) -> (anchor_grad [1],
  psw_grad)``, which applies the fused optimizer step to ``weights``/``state`` in place.

Why the update op declares no mutation: AOTAutograd functionalizes a declared mutation of a graph input
in the backward into clone + copy-back of the whole table (a 10M-row table per step). Hidden from it, the
update is an opaque call whose ``anchor_grad`` output is the backward graph's output for ``anchor``, so it
is never dead-code eliminated and runs exactly once per backward, after the forward that read the weights —
the same contract as eager. Nothing else in a compiled graph writes these tables.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lattice.ops import _library  # noqa: F401  (registers the schemas)
from lattice.ops.reference import pooling as _ref

__all__ = ["pool_fused_compiled"]

_ops = torch.ops.lattice

# Its gradient (a zero per backward) is discarded; only its requires_grad matters. One element, not none: inductor
# elides a zero-size output, and with it the update that produces it.
_ANCHOR = torch.zeros(1, requires_grad=True)


def _impl(reference: bool):
    return _ref if reference else _ops


def _num_tables(table_row_offsets: Tensor) -> int:
    return table_row_offsets.shape[0] if table_row_offsets.dim() == 2 else table_row_offsets.shape[0] - 1


@torch.library.custom_op("lattice::fused_pool_train", mutates_args=())
def _forward(anchor: Tensor, weights: Tensor, state: Tensor, table_row_offsets: Tensor, indices: Tensor,
             offsets: Tensor, pooling: int, per_sample_weights: Optional[Tensor], optimizer: int,
             learning_rate: float, eps: float, weight_decay: float, reference: bool) -> Tensor:
    return _impl(reference).jagged_embedding_pool(weights, table_row_offsets, indices, offsets, pooling,
                                                  per_sample_weights)


@_forward.register_fake
def _forward_fake(anchor, weights, state, table_row_offsets, indices, offsets, pooling, per_sample_weights,
                  optimizer, learning_rate, eps, weight_decay, reference):
    T = _num_tables(table_row_offsets)
    torch._check(T >= 1)
    return weights.new_empty(((offsets.shape[0] - 1) // T, T, weights.shape[1]))


@torch.library.custom_op("lattice::fused_pool_train_step", mutates_args=())
def _update(grad: Tensor, weights: Tensor, state: Tensor, table_row_offsets: Tensor, indices: Tensor,
            offsets: Tensor, pooling: int, per_sample_weights: Optional[Tensor], need_psw_grad: bool,
            optimizer: int, learning_rate: float, eps: float, weight_decay: float,
            reference: bool) -> tuple[Tensor, Tensor]:
    impl = _impl(reference)
    grad = grad.contiguous()
    if need_psw_grad:
        # before the update: the per-sample-weight gradient reads the weights the forward used
        grad_psw = impl.jagged_embedding_pool_backward_per_sample_weights(
            grad, weights, table_row_offsets, indices, offsets
        ).to(per_sample_weights.dtype)
    else:
        grad_psw = grad.new_empty(0)
    with torch.no_grad():
        impl.jagged_embedding_pool_backward_fused_(
            weights, state, grad, table_row_offsets, indices, offsets, pooling, per_sample_weights,
            optimizer, learning_rate, eps, weight_decay,
        )
    return torch.zeros(1), grad_psw


@_update.register_fake
def _update_fake(grad, weights, state, table_row_offsets, indices, offsets, pooling, per_sample_weights,
                 need_psw_grad, optimizer, learning_rate, eps, weight_decay, reference):
    psw_grad = indices.new_empty(indices.shape, dtype=per_sample_weights.dtype) if need_psw_grad else grad.new_empty(0)
    return torch.empty(1), psw_grad


def _setup_context(ctx, inputs, output):
    (anchor, weights, state, tro, indices, offsets, pooling, psw, optimizer, lr, eps, wd, reference) = inputs
    ctx.need_psw_grad = psw is not None and psw.requires_grad
    ctx.save_for_backward(weights, state, tro, indices, offsets, None if psw is None else psw.detach())
    ctx.hyper = (pooling, optimizer, lr, eps, wd, reference)


def _backward(ctx, grad):
    weights, state, tro, indices, offsets, psw = ctx.saved_tensors
    pooling, optimizer, lr, eps, wd, reference = ctx.hyper
    anchor_grad, grad_psw = _update(grad, weights, state, tro, indices, offsets, pooling, psw, ctx.need_psw_grad,
                                    optimizer, lr, eps, wd, reference)
    return (anchor_grad, None, None, None, None, None, None, grad_psw if ctx.need_psw_grad else None,
            None, None, None, None, None)


_forward.register_autograd(_backward, setup_context=_setup_context)


def pool_fused_compiled(weights: Tensor, optimizer_state: Tensor, table_row_offsets: Tensor, indices: Tensor,
                        offsets: Tensor, pooling: int, per_sample_weights: Optional[Tensor], optimizer: int,
                        learning_rate: float, eps: float, weight_decay: float, reference: bool) -> Tensor:
    """``[B, T, D]`` pooled; the backward applies the fused optimizer step in place (one process)."""
    return _forward(_ANCHOR, weights, optimizer_state, table_row_offsets, indices, offsets, pooling,
                    per_sample_weights, optimizer, learning_rate, eps, weight_decay, reference)
