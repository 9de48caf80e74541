"""Fused jagged embedding pooling: ``torch.ops.lattice.jagged_embedding_pool`` and its backward ops.

Many tables packed in one weight tensor, pooled in one call::

    out = jagged_embedding_pool(weights, table_row_offsets, indices, offsets, "sum")   # [B, T, D]

- ``weights [rows_total, D]`` fp32 (bf16 / fp16 storage accumulate in fp32; float64 for gradcheck);
- ``table_row_offsets`` int64, ``[T+1]`` (tables packed back to back: table t owns rows
  ``[tro[t], tro[t+1])``) or ``[T, 2]`` (row range per table, so several "tables" — features — may
  share one embedding table's rows);
- ``indices [N]`` int32/int64 local to their table; ``offsets [T*B+1]`` key-major (bag ``t*B+b``),
  exactly a KeyedJaggedTensor's values/offsets; ``per_sample_weights [N]`` (sum pooling only).

Gradients for the weights come in two forms:

- through autograd (:func:`jagged_embedding_pool`): a **sparse COO** gradient (unique rows and their
  summed gradients), usable with ``torch.optim.SGD`` / ``SparseAdam`` / ``Adagrad``;
- fused (:func:`jagged_embedding_pool_fused`): the backward applies SGD or row-wise Adagrad to the
  weights in place and returns no weight gradient at all, as FBGEMM's TBE does — a 10M-row table
  never gets a gradient tensor.

Both honour the backend switch (``LATTICE_OPS=reference`` / :func:`lattice.ops.use_backend`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lattice.ops import _library  # noqa: F401  (registers the schemas)
from lattice.ops._backend import use_reference
from lattice.ops.fused_compiled import pool_fused_compiled
from lattice.ops.reference import pooling as _ref
from lattice.ops.row_exchange import allgather_sparse_rows, world_size_of

__all__ = [
    "SUM",
    "MEAN",
    "SGD",
    "ROWWISE_ADAGRAD",
    "pooling_mode",
    "optimizer_mode",
    "jagged_embedding_pool",
    "jagged_embedding_pool_fused",
    "sparse_rows_optimizer_step_",
]

SUM, MEAN = 0, 1
SGD, ROWWISE_ADAGRAD = 0, 1

_POOLING = {"sum": SUM, "mean": MEAN}
_OPTIMIZERS = {"sgd": SGD, "rowwise_adagrad": ROWWISE_ADAGRAD}

_ops = torch.ops.lattice


def pooling_mode(pooling: Union[int, str]) -> int:
    """``"sum"``/``"mean"`` (or 0/1) -> the op's int code."""
    if isinstance(pooling, str):
        if pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {sorted(_POOLING)}, got {pooling!r}")
        return _POOLING[pooling]
    return int(pooling)


def optimizer_mode(optimizer: Union[int, str]) -> int:
    """``"sgd"``/``"rowwise_adagrad"`` (or 0/1) -> the op's int code."""
    if isinstance(optimizer, str):
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
        return _OPTIMIZERS[optimizer]
    return int(optimizer)


def _num_tables(table_row_offsets: Tensor) -> int:
    return table_row_offsets.shape[0] if table_row_offsets.dim() == 2 else table_row_offsets.shape[0] - 1


def _match_offsets(indices: Tensor, offsets: Tensor) -> Tensor:
    # The op wants offsets in the indices' dtype; a KJT may carry int64 offsets over int32 values.
    return offsets if offsets.dtype == indices.dtype else offsets.to(indices.dtype)


# ---- fake (meta) kernels: shapes only, for torch.compile / export ---------------------------------
@torch.library.register_fake("lattice::jagged_embedding_pool")
def _pool_fake(weights, table_row_offsets, indices, offsets, pooling, per_sample_weights):
    T = _num_tables(table_row_offsets)
    torch._check(T >= 1)
    B = (offsets.shape[0] - 1) // T
    return weights.new_empty((B, T, weights.shape[1]))


@torch.library.register_fake("lattice::jagged_embedding_pool_backward_sparse")
def _backward_sparse_fake(grad_output, table_row_offsets, indices, offsets, pooling, per_sample_weights):
    U = torch.library.get_ctx().new_dynamic_size()
    rows = indices.new_empty((U,), dtype=torch.int64)
    return rows, grad_output.new_empty((U, grad_output.shape[2]))


@torch.library.register_fake("lattice::jagged_embedding_pool_backward_per_sample_weights")
def _backward_psw_fake(grad_output, weights, table_row_offsets, indices, offsets):
    dtype = torch.float64 if weights.dtype == torch.float64 else torch.float32
    return weights.new_empty((indices.shape[0],), dtype=dtype)


@torch.library.register_fake("lattice::jagged_embedding_pool_backward_fused_")
def _backward_fused_fake(weights, optimizer_state, grad_output, table_row_offsets, indices, offsets, pooling,
                         per_sample_weights, optimizer, learning_rate, eps, weight_decay):
    return None


@torch.library.register_fake("lattice::sparse_rows_optimizer_step_")
def _rows_step_fake(weights, optimizer_state, rows, row_grads, optimizer, learning_rate, eps, weight_decay):
    return None


# ---- autograd of the kernel op: sparse weight gradient + per-sample-weight gradient ---------------
def _setup_context(ctx, inputs, output):
    weights, table_row_offsets, indices, offsets, pooling, per_sample_weights = inputs
    need_psw = per_sample_weights is not None and per_sample_weights.requires_grad
    ctx.save_for_backward(
        table_row_offsets, indices, offsets, per_sample_weights, weights if need_psw else None
    )
    ctx.pooling = pooling
    ctx.weights_shape = weights.shape
    ctx.weights_dtype = weights.dtype
    ctx.psw_dtype = None if per_sample_weights is None else per_sample_weights.dtype


def _backward(ctx, grad):
    table_row_offsets, indices, offsets, per_sample_weights, weights = ctx.saved_tensors
    grad = grad.contiguous()
    grad_weights = grad_psw = None
    if ctx.needs_input_grad[0]:
        rows, row_grads = _ops.jagged_embedding_pool_backward_sparse(
            grad, table_row_offsets, indices, offsets, ctx.pooling, per_sample_weights
        )
        grad_weights = torch.sparse_coo_tensor(
            rows.unsqueeze(0), row_grads.to(ctx.weights_dtype), ctx.weights_shape, is_coalesced=True,
            check_invariants=False,
        )
    if ctx.needs_input_grad[5]:
        grad_psw = _ops.jagged_embedding_pool_backward_per_sample_weights(
            grad, weights, table_row_offsets, indices, offsets
        ).to(ctx.psw_dtype)
    return grad_weights, None, None, None, None, grad_psw


torch.library.register_autograd("lattice::jagged_embedding_pool", _backward, setup_context=_setup_context)


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward turns a sparse gradient dense (``sparse_grad=False``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.layout != torch.strided else grad


def jagged_embedding_pool(
    weights: Tensor,
    table_row_offsets: Tensor,
    indices: Tensor,
    offsets: Tensor,
    pooling: Union[int, str] = SUM,
    per_sample_weights: Optional[Tensor] = None,
    *,
    sparse_grad: bool = True,
) -> Tensor:
    """Pool every bag of every table in one call; returns ``[B, T, D]`` in the weights' dtype.

    ``out[b, t] = sum_j psw[j] * weights[tro_start[t] + indices[j]]`` over the bag ``t*B+b``
    (``j`` in ``offsets[t*B+b] : offsets[t*B+b+1]``), divided by the bag length for ``"mean"``;
    empty bags give zeros. Differentiable in ``weights`` (a sparse COO gradient, or a dense one with
    ``sparse_grad=False``) and ``per_sample_weights``.
    """
    mode = pooling_mode(pooling)
    offsets = _match_offsets(indices, offsets)
    if use_reference():
        # The reference's gradient is dense already.
        return _ref.jagged_embedding_pool(weights, table_row_offsets, indices, offsets, mode, per_sample_weights)
    if not sparse_grad and weights.requires_grad:
        weights = _DenseGrad.apply(weights)
    return _ops.jagged_embedding_pool(weights, table_row_offsets, indices, offsets, mode, per_sample_weights)


# ---- fused backward + optimizer --------------------------------------------------------------------
class _FusedPool(torch.autograd.Function):
    """Forward pools; backward updates ``weights`` (and ``state``) in place and returns no gradient
    for them. The first input is a dummy that requires grad, so the output joins the autograd graph
    even though the weights themselves do not require grad (FBGEMM's TBE does the same)."""

    @staticmethod
    def forward(ctx, dummy, weights, state, table_row_offsets, indices, offsets, pooling, per_sample_weights,
                optimizer, learning_rate, eps, weight_decay, reference, process_group, gradient_divisor):
        impl = _ref if reference else _ops
        out = impl.jagged_embedding_pool(weights, table_row_offsets, indices, offsets, pooling, per_sample_weights)
        # Plain attributes, not save_for_backward: the weights are updated in place by design.
        ctx.args = (weights, state, table_row_offsets, indices, offsets, pooling, per_sample_weights)
        ctx.hyper = (optimizer, learning_rate, eps, weight_decay)
        ctx.reference = reference
        ctx.exchange = (process_group, gradient_divisor)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        weights, state, table_row_offsets, indices, offsets, pooling, per_sample_weights = ctx.args
        impl = _ref if ctx.reference else _ops
        grad = grad.contiguous()
        grad_psw = None
        if ctx.needs_input_grad[7]:
            # Before the update: the per-sample-weight gradient reads the weights the forward used.
            grad_psw = impl.jagged_embedding_pool_backward_per_sample_weights(
                grad, weights, table_row_offsets, indices, offsets
            ).to(per_sample_weights.dtype)
        psw = None if per_sample_weights is None else per_sample_weights.detach()
        process_group, divisor = ctx.exchange
        with torch.no_grad():
            if process_group is None or world_size_of(process_group) == 1:
                impl.jagged_embedding_pool_backward_fused_(
                    weights, state, grad, table_row_offsets, indices, offsets, pooling, psw, *ctx.hyper,
                )
            else:
                rows, row_grads = impl.jagged_embedding_pool_backward_sparse(
                    grad, table_row_offsets, indices, offsets, pooling, psw
                )
                rows, row_grads = allgather_sparse_rows(rows, row_grads, process_group)
                if divisor != 1.0:
                    row_grads = row_grads / divisor
                impl.sparse_rows_optimizer_step_(weights, state, rows, row_grads, *ctx.hyper)
        ctx.args = ctx.exchange = None
        return (None, None, None, None, None, None, None, grad_psw, None, None, None, None, None, None, None)


def jagged_embedding_pool_fused(
    weights: Tensor,
    optimizer_state: Tensor,
    table_row_offsets: Tensor,
    indices: Tensor,
    offsets: Tensor,
    pooling: Union[int, str] = SUM,
    per_sample_weights: Optional[Tensor] = None,
    *,
    optimizer: Union[int, str] = ROWWISE_ADAGRAD,
    learning_rate: float = 0.01,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
    gradient_divisor: Optional[float] = None,
) -> Tensor:
    """:func:`jagged_embedding_pool` whose backward is a fused in-place optimizer step.

    ``optimizer_state [rows_total]`` fp32 holds row-wise Adagrad's running mean squared gradient (pass
    an empty tensor for SGD). Outside grad mode this is the plain forward. The update happens when
    autograd runs this op's backward; ``weights`` must not require grad. Under ``torch.compile`` it is
    captured as the opaque ops of :mod:`lattice.ops.fused_compiled` (no graph break) when
    ``process_group`` is ``None``; with a process group it stays an eager graph break.

    Data parallel: with ``process_group`` spanning several ranks that each hold a replica of the
    weights, the backward all-gathers every rank's unique rows and summed gradients, divides them by
    ``gradient_divisor`` (default: the group's size, the averaging DDP applies to dense gradients) and
    applies the update of the global batch on every rank (see :mod:`lattice.ops.row_exchange`).
    """
    if torch.compiler.is_compiling() and process_group is None and torch.is_grad_enabled():
        if weights.requires_grad:
            raise ValueError("jagged_embedding_pool_fused updates weights in its backward; they must not require grad")
        return pool_fused_compiled(
            weights, optimizer_state, table_row_offsets, indices, _match_offsets(indices, offsets),
            pooling_mode(pooling), per_sample_weights, optimizer_mode(optimizer), float(learning_rate), float(eps),
            float(weight_decay), use_reference(),
        )
    return _jagged_embedding_pool_fused_eager(
        weights, optimizer_state, table_row_offsets, indices, offsets, pooling, per_sample_weights, optimizer,
        learning_rate, eps, weight_decay, process_group, gradient_divisor,
    )


@torch.compiler.disable
def _jagged_embedding_pool_fused_eager(weights, optimizer_state, table_row_offsets, indices, offsets, pooling,
                                       per_sample_weights, optimizer, learning_rate, eps, weight_decay,
                                       process_group, gradient_divisor) -> Tensor:
    mode = pooling_mode(pooling)
    opt = optimizer_mode(optimizer)
    offsets = _match_offsets(indices, offsets)
    reference = use_reference()
    if not torch.is_grad_enabled():
        impl = _ref if reference else _ops
        return impl.jagged_embedding_pool(weights, table_row_offsets, indices, offsets, mode, per_sample_weights)
    if weights.requires_grad:
        raise ValueError("jagged_embedding_pool_fused updates weights in its backward; they must not require grad")
    if gradient_divisor is None:
        gradient_divisor = float(world_size_of(process_group)) if process_group is not None else 1.0
    if not gradient_divisor > 0:
        raise ValueError(f"jagged_embedding_pool_fused: gradient_divisor must be > 0, got {gradient_divisor}")
    dummy = torch.empty(0, device=weights.device, requires_grad=True)
    return _FusedPool.apply(
        dummy, weights, optimizer_state, table_row_offsets, indices, offsets, mode, per_sample_weights, opt,
        float(learning_rate), float(eps), float(weight_decay), reference, process_group, float(gradient_divisor),
    )


def sparse_rows_optimizer_step_(
    weights: Tensor,
    optimizer_state: Tensor,
    rows: Tensor,
    row_grads: Tensor,
    optimizer: Union[int, str] = ROWWISE_ADAGRAD,
    learning_rate: float = 0.01,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """The fused optimizer's update from already-reduced gradients of unique ``rows [U]``
    (``row_grads [U, D]``), in place; e.g. after rows were exchanged across ranks."""
    impl = _ref if use_reference() else _ops
    with torch.no_grad():
        impl.sparse_rows_optimizer_step_(
            weights, optimizer_state, rows, row_grads, optimizer_mode(optimizer), float(learning_rate), float(eps),
            float(weight_decay),
        )
