"""``lattice.ops.jagged_attention``: varlen (jagged) multi-head attention, flash-style.

One op serves every direction of an interleaved layer: summary tokens attending to each sample's
sequence (dense queries: ``q_offsets = n * arange(B + 1)``), the sequence attending to itself
(``causal=True``), and sequence tokens attending to the summary tokens. The kernels never form a padded
score tensor. See ``csrc/cpu/jagged_attention.cpp`` for the algorithm.
"""
import functools
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lattice.ops._backend import use_reference
from lattice.ops.reference.attention import jagged_attention_reference

__all__ = ["jagged_attention", "jagged_attention_output", "attention_backend"]


def jagged_attention(
    q: Tensor,
    q_offsets: Tensor,
    k: Tensor,
    v: Tensor,
    kv_offsets: Tensor,
    scale: Optional[float] = None,
    causal: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Multi-head attention in which sample b's queries attend only to sample b's keys.

    Args:
        q: ``[Nq, H, Dh]`` queries; sample b owns rows ``q_offsets[b]:q_offsets[b+1]``.
        q_offsets: ``[B+1]`` offsets (int64; int32 is converted).
        k, v: ``[Nk, H, Dh]`` keys and values (q's dtype), split by ``kv_offsets [B+1]``.
        scale: score multiplier, default ``Dh ** -0.5``.
        causal: query i of a sample with n queries and m keys attends keys ``j <= i + (m - n)``, i.e.
            the last query is aligned with the last key (self-attention over a sequence).

    Returns:
        ``(out [Nq, H, Dh], lse [Nq, H])``: the attention output in q's dtype and the float32
        log-sum-exp of the scaled scores (not differentiable). A query that sees no key (an empty
        sequence) gets ``out = 0`` and ``lse = -inf``, with zero gradients and no NaN.

    float32, float64, bfloat16 and float16 inputs are supported; half types accumulate in float32.
    Honours the kernel/reference switch (:func:`lattice.ops.set_backend`).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q_offsets.dtype == torch.int32:
        q_offsets = q_offsets.long()
    if kv_offsets.dtype == torch.int32:
        kv_offsets = kv_offsets.long()
    if use_reference():
        return jagged_attention_reference(q, q_offsets, k, v, kv_offsets, scale, causal)
    return torch.ops.lattice.jagged_attention(q, q_offsets, k, v, kv_offsets, float(scale), bool(causal))


@torch.library.register_fake("lattice::jagged_attention")
def _jagged_attention_fake(q, q_offsets, k, v, kv_offsets, scale, causal):
    torch._check(q.dim() == 3, lambda: f"q must be 3-D, got shape {tuple(q.shape)}")
    torch._check(k.shape == v.shape, lambda: f"k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[0], q.shape[1]), dtype=torch.float32
    )


@torch.library.register_fake("lattice::jagged_attention_backward")
def _jagged_attention_backward_fake(grad_out, q, q_offsets, k, v, kv_offsets, out, lse, scale, causal):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, q_offsets, k, v, kv_offsets, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, q_offsets, k, v, kv_offsets, out, lse)
    ctx.scale = scale
    ctx.causal = causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, q_offsets, k, v, kv_offsets, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = torch.ops.lattice.jagged_attention_backward(
        grad_out, q, q_offsets, k, v, kv_offsets, out, lse, ctx.scale, ctx.causal
    )
    return grad_q, None, grad_k, grad_v, None, None, None


torch.library.register_autograd("lattice::jagged_attention", _backward, setup_context=_setup_context)


# ---- backend dispatch -----------------------------------------------------------------------------------------
# jagged_attention_output() routes each call to our kernel, torch's varlen_attn (FlashAttention over cumulative
# offsets, bf16/fp16, CUDA) or F.scaled_dot_product_attention on padded tensors, from the dtype, head dim, causal
# flag and the batch's mean query length. Autograd follows the path the forward took (each path is
# differentiable on its own). LATTICE_ATTENTION_BACKEND=lattice|varlen|sdpa forces one.
#
# The CUDA table comes from the only GPU figures measured so far: NVIDIA H200, torch 2.11.0+cu130,
# 2026-12-04, benchmarks/bench_attention_cuda.py --batch 2048 --heads 2 --dims 64 (docs/cuda.md). The FMA-tile
# kernel ran at 0.9x padded SDPA on the fp32 summary case (a few queries against long sequences, where padding
# wastes the most) and at 0.05-0.5x elsewhere, so CUDA calls take varlen_attn (bf16/fp16) or padded SDPA except
# the fp32 summary case. The tensor-core tiles are not measured yet: benchmarks/gpu_check.sh (step `bench`)
# measures them; revise this table from its JSON.
BACKEND_ENV = "LATTICE_ATTENTION_BACKEND"
BACKENDS = ("lattice", "varlen", "sdpa")
SUMMARY_MAX_MEAN_QUERIES = 8  # the kernels' small query tile: a few summary tokens per sample
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def _on_cuda(t: Tensor) -> bool:
    """The device check of the routing (a function, so tests can fake a GPU on the CPU)."""
    return t.is_cuda


def varlen_attention_fn():
    """torch.nn.attention.varlen.varlen_attn, or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def varlen_causal_matches(device: str) -> bool:
    """Whether varlen_attn's causal mask (window (-1, 0)) aligns the last query with the last key, as ours does.

    Probed once per device: one query against two keys with equal scores sees both keys bottom-right aligned
    (output 0.5) but only the first top-left aligned (output 0). Causal calls never go to varlen_attn where
    this is False."""
    fn = varlen_attention_fn()
    if fn is None:
        return False
    dev = torch.device(device)
    q = torch.zeros(1, 1, 8, device=dev, dtype=torch.bfloat16)
    k = torch.zeros(2, 1, 8, device=dev, dtype=torch.bfloat16)
    v = torch.stack([torch.zeros(1, 8), torch.ones(1, 8)]).to(dev, torch.bfloat16)
    cu_q = torch.tensor([0, 1], device=dev, dtype=torch.int32)
    cu_k = torch.tensor([0, 2], device=dev, dtype=torch.int32)
    out = fn(q, k, v, cu_q, cu_k, 1, 2, window_size=(-1, 0))
    return abs(float(out.float().mean()) - 0.5) < 1e-2


def attention_backend(q: Tensor, q_offsets: Tensor, causal: bool = False) -> str:
    """The backend :func:`jagged_attention_output` uses for these inputs: ``"lattice"``, ``"varlen"`` or ``"sdpa"``.

    ``LATTICE_ATTENTION_BACKEND`` forces one. Otherwise: on the CPU always ``"lattice"`` (nothing changes there);
    on CUDA the measured table above."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced
    if not _on_cuda(q) or q.dtype == torch.float64:
        return "lattice"
    batch = max(q_offsets.numel() - 1, 1)
    summary = q.shape[0] <= SUMMARY_MAX_MEAN_QUERIES * batch
    if q.dtype == torch.float32 and summary:
        return "lattice"
    head_dim = q.shape[-1]
    if (
        q.dtype in _VARLEN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 256
        and varlen_attention_fn() is not None
        and (not causal or varlen_causal_matches(str(q.device)))
    ):
        return "varlen"
    return "sdpa"


def _row_samples(offsets: Tensor, rows: int) -> Tuple[Tensor, Tensor]:
    """(sample, position within the sample) of each of ``rows`` rows split by ``offsets [B+1]``; no host sync."""
    lengths = offsets[1:] - offsets[:-1]
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths,
                                     output_size=rows)
    return sample, torch.arange(rows, device=offsets.device) - offsets[sample]


def _has_visible_key(q_offsets: Tensor, kv_offsets: Tensor, rows: int, causal: bool) -> Tensor:
    """[Nq] bool: whether each query sees at least one key (ours: query i of n sees keys j <= i + m - n)."""
    sample, pos = _row_samples(q_offsets, rows)
    n = (q_offsets[1:] - q_offsets[:-1])[sample]
    m = (kv_offsets[1:] - kv_offsets[:-1])[sample]
    return (m > 0) & (pos + m - n >= 0) if causal else m > 0


def _sdpa_attention(q, q_offsets, k, v, kv_offsets, scale, causal):
    """Padded ``F.scaled_dot_product_attention`` with a boolean mask; same semantics as the op's ``out``."""
    nq, heads, head_dim = q.shape
    batch = q_offsets.numel() - 1
    lq = q_offsets[1:] - q_offsets[:-1]
    lk = kv_offsets[1:] - kv_offsets[:-1]
    max_q, max_k = (int(x) for x in torch.stack([lq.max(), lk.max()]).tolist()) if batch else (0, 0)
    if nq == 0 or max_k == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())  # keeps the graph: zero gradients
    qs, qp = _row_samples(q_offsets, nq)
    ks, kp = _row_samples(kv_offsets, k.shape[0])

    def padded(x, s, p, length):
        out = x.new_zeros(batch, length, heads, head_dim)
        return out.index_put((s, p), x).transpose(1, 2)  # [B, H, L, Dh]

    i = torch.arange(max_q, device=q.device)[:, None]
    j = torch.arange(max_k, device=q.device)[None, :]
    mask = (j[None] < lk[:, None, None]).expand(batch, max_q, max_k)
    if causal:
        mask = mask & (j[None] <= i[None] + (lk - lq)[:, None, None])
    seen = mask.any(-1, keepdim=True)
    mask = mask | ~seen  # a row without keys attends anywhere (no NaN) and is zeroed below
    out = F.scaled_dot_product_attention(padded(q, qs, qp, max_q), padded(k, ks, kp, max_k),
                                         padded(v, ks, kp, max_k), attn_mask=mask[:, None], scale=scale)
    out = out.transpose(1, 2)[qs, qp]  # [Nq, H, Dh]
    return torch.where(seen[qs, qp, 0][:, None, None], out, out.new_zeros(()))


def _varlen_attention(q, q_offsets, k, v, kv_offsets, scale, causal):
    """torch's varlen_attn (FlashAttention on cumulative offsets), zeroing queries that see no key."""
    if q.dtype not in _VARLEN_DTYPES:
        raise ValueError(f"{BACKEND_ENV}=varlen: varlen_attn takes float16 or bfloat16 inputs, got {q.dtype}")
    fn = varlen_attention_fn()
    if fn is None or not _on_cuda(q):
        raise ValueError(f"{BACKEND_ENV}=varlen: varlen_attn needs a CUDA device and torch.nn.attention.varlen, "
                         f"got {q.device}")
    lengths = torch.stack([(q_offsets[1:] - q_offsets[:-1]).max(), (kv_offsets[1:] - kv_offsets[:-1]).max()])
    max_q, max_k = (int(x) for x in lengths.tolist())
    out = fn(q, k, v, q_offsets.to(torch.int32), kv_offsets.to(torch.int32), max_q, max_k, scale=scale,
             window_size=(-1, 0) if causal else (-1, -1))
    seen = _has_visible_key(q_offsets, kv_offsets, q.shape[0], causal)
    return torch.where(seen[:, None, None], out, out.new_zeros(()))


def jagged_attention_output(
    q: Tensor,
    q_offsets: Tensor,
    k: Tensor,
    v: Tensor,
    kv_offsets: Tensor,
    scale: Optional[float] = None,
    causal: bool = False,
) -> Tensor:
    """The ``out [Nq, H, Dh]`` of :func:`jagged_attention` (same arguments and semantics, no ``lse``), computed
    by the backend :func:`attention_backend` picks: our kernel, ``varlen_attn`` or padded SDPA. Differentiable;
    the backward runs on the forward's backend. A query that sees no key gets zeros (and zero gradients)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q_offsets = q_offsets.long()
    kv_offsets = kv_offsets.long()
    backend = attention_backend(q, q_offsets, causal)
    if backend == "sdpa":
        return _sdpa_attention(q, q_offsets.to(q.device), k, v, kv_offsets.to(q.device), float(scale), bool(causal))
    if backend == "varlen":
        return _varlen_attention(q, q_offsets.to(q.device), k, v, kv_offsets.to(q.device), float(scale),
                                 bool(causal))
    return jagged_attention(q, q_offsets, k, v, kv_offsets, scale, causal)[0]
