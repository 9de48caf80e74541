"""lattice.ops.jagged_attention_output: the per-call backend dispatch (our kernel, varlen_attn, padded SDPA).

Routing is tested on the CPU with a faked device check; the padded-SDPA path runs on the CPU and must match the
kernel (out and gradients, empty samples, queries that see no key); the varlen path's plumbing (int32 cumulative
offsets, max lengths, the causal window, zeroed rows) is tested against a stand-in varlen_attn built on our op;
the causal-alignment probe keeps causal calls off a varlen_attn whose mask is aligned top-left."""
import itertools

import pytest
import torch

import lattice  # noqa: F401  (registers torch.ops.lattice)
from lattice.ops import attention as A
from lattice.ops import attention_backend, jagged_attention, jagged_attention_output


def _offsets(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def _inputs(lq, lk, heads, dh, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(n), heads, dh, generator=g).to(dtype) for n in (lq, lk, lk))
    return q, _offsets(lq), k, v, _offsets(lk)


def _bottom_right_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """A stand-in for torch's varlen_attn with FlashAttention's bottom-right causal window, built on our op."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    assert window_size in ((-1, -1), (-1, 0))
    out, _ = jagged_attention(q, cu_q.long(), k, v, cu_k.long(), scale, window_size == (-1, 0))
    return out


def _top_left_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """A varlen_attn whose causal mask aligns the first query with the first key (as SDPA's is_causal)."""
    n, m = q.shape[0], k.shape[0]
    s = torch.einsum("ihd,jhd->hij", q.float(), k.float()) * (scale or q.shape[-1] ** -0.5)
    if window_size == (-1, 0):
        s = s.masked_fill(torch.arange(m)[None, :] > torch.arange(n)[:, None], float("-inf"))
    return torch.einsum("hij,jhd->ihd", s.softmax(-1), v.float()).to(q.dtype)


@pytest.fixture
def fake_gpu(monkeypatch):
    """The routing believes it runs on CUDA, with a bottom-right varlen_attn."""
    monkeypatch.delenv(A.BACKEND_ENV, raising=False)
    monkeypatch.setattr(A, "_on_cuda", lambda t: True)
    monkeypatch.setattr(A, "varlen_attention_fn", lambda: _bottom_right_varlen)
    A.varlen_causal_matches.cache_clear()
    yield monkeypatch
    A.varlen_causal_matches.cache_clear()


def test_cpu_routes_to_our_kernel(monkeypatch):
    monkeypatch.delenv(A.BACKEND_ENV, raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, qo, *_ = _inputs([3, 50], [9, 50], 1, 8, dtype)
        assert attention_backend(q, qo, causal=True) == "lattice"


@pytest.mark.parametrize(
    "dtype, lq, causal, dh, expected",
    [
        (torch.float32, [8, 8, 8], False, 64, "lattice"),   # fp32 summary: ours
        (torch.float32, [8, 8, 8], True, 64, "lattice"),
        (torch.float32, [100, 3, 60], True, 64, "sdpa"),    # fp32 sequences: padded SDPA
        (torch.bfloat16, [8, 8, 8], False, 64, "varlen"),   # half types: varlen_attn
        (torch.float16, [100, 3, 60], True, 64, "varlen"),
        (torch.bfloat16, [100, 3, 60], False, 20, "sdpa"),  # head dim not a multiple of 8: SDPA
        (torch.float64, [100, 3, 60], False, 64, "lattice"),
    ],
)
def test_cuda_routing_table(fake_gpu, dtype, lq, causal, dh, expected):
    q, qo, *_ = _inputs(lq, [50] * len(lq), 1, dh, dtype)
    assert attention_backend(q, qo, causal) == expected


def test_causal_calls_avoid_a_top_left_varlen(fake_gpu):
    fake_gpu.setattr(A, "varlen_attention_fn", lambda: _top_left_varlen)
    q, qo, *_ = _inputs([100, 60], [50, 50], 1, 64, torch.bfloat16)
    assert not A.varlen_causal_matches("cpu")
    assert attention_backend(q, qo, causal=True) == "sdpa"
    assert attention_backend(q, qo, causal=False) == "varlen"


def test_no_varlen_in_this_torch_means_sdpa(fake_gpu):
    fake_gpu.setattr(A, "varlen_attention_fn", lambda: None)
    q, qo, *_ = _inputs([100, 60], [50, 50], 1, 64, torch.bfloat16)
    assert attention_backend(q, qo, causal=False) == "sdpa"


def test_environment_forces_a_backend(monkeypatch):
    q, qo, *_ = _inputs([3], [4], 1, 8)
    for name in A.BACKENDS:
        monkeypatch.setenv(A.BACKEND_ENV, name)
        assert attention_backend(q, qo) == name
    monkeypatch.setenv(A.BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match=r"LATTICE_ATTENTION_BACKEND='flash': expected one of lattice, varlen, sdpa"):
        attention_backend(q, qo)
    monkeypatch.setenv(A.BACKEND_ENV, "varlen")
    with pytest.raises(ValueError, match=r"varlen_attn takes float16 or bfloat16 inputs"):
        jagged_attention_output(*_inputs([3], [4], 1, 8))


CASES = [
    ([3, 0, 5, 7], [4, 2, 0, 9], False),
    ([3, 0, 5, 7], [4, 2, 0, 9], True),  # queries beyond their keys (causal) see none
    ([8, 8], [0, 30], False),
]


@pytest.mark.parametrize("lq, lk, causal", CASES)
@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_backends_match_our_kernel_with_gradients(fake_gpu, backend, lq, lk, causal):
    fake_gpu.setenv(A.BACKEND_ENV, backend)
    dtype = torch.float32 if backend == "sdpa" else torch.bfloat16
    q, qo, k, v, ko = _inputs(lq, lk, 2, 16, dtype, seed=len(lq))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = jagged_attention_output(leaves[0], qo, leaves[1], leaves[2], ko, 0.3, causal)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want, _ = jagged_attention(ref_leaves[0], qo, ref_leaves[1], ref_leaves[2], ko, 0.3, causal)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (got.float() * g.float()).sum().backward()
    (want.float() * g.float()).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for a, b in zip(leaves, ref_leaves):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=tol)


def test_sdpa_path_runs_on_the_cpu_for_an_all_empty_batch(monkeypatch):
    monkeypatch.setenv(A.BACKEND_ENV, "sdpa")
    q, qo, k, v, ko = _inputs([2, 3], [0, 0], 1, 8)
    q.requires_grad_()
    out = jagged_attention_output(q, qo, k, v, ko)
    assert out.eq(0).all()
    out.sum().backward()
    assert q.grad.eq(0).all()
