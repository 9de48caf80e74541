"""The CUDA jagged attention on a real GPU (skipped without one; run by benchmarks/gpu_check.sh): forward and
gradients against the reference and the CPU kernel, every dtype and both kernel paths (tiled, generic),
gradcheck in float64, opcheck, validation errors, determinism, empty samples. The same kernels run without a
GPU in tests/cuda_emu/test_emu_attention.py."""
import itertools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from lattice.ops import _library  # noqa: E402
from lattice.ops.reference import jagged_attention_reference  # noqa: E402

if not _library.has_cuda_kernels():
    pytest.skip("lattice._C was built without the CUDA kernels", allow_module_level=True)

OP = torch.ops.lattice.jagged_attention
OP_BWD = torch.ops.lattice.jagged_attention_backward
DEV = torch.device("cuda")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def _offsets(lengths, device=DEV):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64, device=device)


def _inputs(lq, lk, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(n, heads, head_dim, generator=g, dtype=torch.float64).to(dtype).to(DEV)
                   for n in (sum(lq), sum(lk), sum(lk), sum(lq)))
    return q, _offsets(lq), k, v, _offsets(lk), go


def _reference(q, qo, k, v, ko, scale, causal, go):
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    out, lse = jagged_attention_reference(q64, qo.cpu(), k64, v64, ko.cpu(), scale, causal)
    grads = torch.autograd.grad(out, (q64, k64, v64), go.double().cpu(), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (q64, k64, v64))]
    return out.detach(), lse, grads


def _close(name, got, want, tol):
    got = got.double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.numel():
        err = (got - want).abs().max().item()
        bound = tol * max(1.0, want.abs().max().item())
        assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def _check(lq, lk, heads, head_dim, causal, dtype, seed=0):
    q, qo, k, v, ko, go = _inputs(lq, lk, heads, head_dim, dtype, seed)
    scale = head_dim ** -0.5
    out, lse = OP(q, qo, k, v, ko, scale, causal)
    ref_out, ref_lse, ref_grads = _reference(q, qo, k, v, ko, scale, causal, go)
    _close("out", out, ref_out, TOL[dtype])
    lse = lse.cpu()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    _close("lse", lse[~empty], ref_lse[~empty].double(), max(TOL[dtype], 2e-6))
    grads = OP_BWD(go, q, qo, k, v, ko, out, lse.to(DEV), scale, causal)
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        _close(name, got, want, 2 * TOL[dtype])


def _random_lengths(seed, batch, max_len):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g).tolist()
    lengths[0] = 0
    return lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [16, 32, 37, 64, 100, 128, 160])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_jagged_matches_reference(dtype, head_dim, causal):
    lk = _random_lengths(head_dim, 24, 150)
    _check(lk, lk, 2, head_dim, causal, dtype)  # self-attention (the large tiles)
    _check([8] * 24, lk, 2, head_dim, causal, dtype, seed=1)  # summary tokens -> sequence (small tiles)
    _check(_random_lengths(head_dim + 1, 24, 40), lk, 3, head_dim, causal, dtype, seed=2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_cpu_kernel(causal):
    lq = _random_lengths(3, 16, 90)
    lk = _random_lengths(4, 16, 90)
    q, qo, k, v, ko, go = _inputs(lq, lk, 2, 48, torch.float32, seed=5)
    out, lse = OP(q, qo, k, v, ko, 0.3, causal)
    out_cpu, lse_cpu = OP(q.cpu(), qo.cpu(), k.cpu(), v.cpu(), ko.cpu(), 0.3, causal)
    torch.testing.assert_close(out.cpu(), out_cpu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), lse_cpu, atol=1e-5, rtol=1e-5)
    grads = OP_BWD(go, q, qo, k, v, ko, out, lse, 0.3, causal)
    grads_cpu = OP_BWD(go.cpu(), q.cpu(), qo.cpu(), k.cpu(), v.cpu(), ko.cpu(), out_cpu, lse_cpu, 0.3, causal)
    for got, want in zip(grads, grads_cpu):
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_float64(causal):
    from lattice.ops import jagged_attention

    q, qo, k, v, ko, _ = _inputs([3, 0, 4, 2], [5, 2, 0, 3], 2, 6, torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: jagged_attention(q, qo, k, v, ko, 0.4, causal)[0], (q, k, v))


def test_opcheck():
    q, qo, k, v, ko, go = _inputs([3, 0, 9], [4, 6, 2], 2, 32, torch.float32)
    torch.library.opcheck(OP, (q, qo, k, v, ko, 0.25, True))
    out, lse = OP(q, qo, k, v, ko, 0.25, True)
    torch.library.opcheck(OP_BWD, (go, q, qo, k, v, ko, out, lse, 0.25, True))


def test_backward_is_deterministic():
    lk = _random_lengths(7, 32, 200)
    q, qo, k, v, ko, go = _inputs(lk, lk, 4, 64, torch.float32)
    out, lse = OP(q, qo, k, v, ko, 0.125, True)
    first = OP_BWD(go, q, qo, k, v, ko, out, lse, 0.125, True)
    for _ in range(3):
        again = OP_BWD(go, q, qo, k, v, ko, out, lse, 0.125, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_empty_samples_and_empty_batch():
    _check([0, 4, 3], [5, 0, 6], 2, 8, True, torch.float32)
    _check([0, 0], [0, 5], 1, 8, False, torch.float32)
    q, qo, k, v, ko, go = _inputs([], [], 2, 8, torch.float32)
    out, lse = OP(q, qo, k, v, ko, 1.0, False)
    assert out.shape == (0, 2, 8) and lse.shape == (0, 2)


def test_cpu_offsets_accepted():
    q, qo, k, v, ko, _ = _inputs([3, 5], [4, 6], 2, 16, torch.float32)
    a = OP(q, qo, k, v, ko, 0.25, False)
    b = OP(q, qo.cpu(), k, v, ko.cpu(), 0.25, False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(qo=torch.tensor([0, 4, 3, 8], device=DEV)), "q_offsets must be non-decreasing"),
        (lambda a: a.update(qo=torch.tensor([1, 3, 8], device=DEV)), r"q_offsets\[0\] must be 0"),
        (lambda a: a.update(ko=torch.tensor([0, 4, 99], device=DEV)), "kv_offsets"),
        (lambda a: a.update(ko=torch.tensor([0, 4, 6, 10], device=DEV)), "same number of samples"),
        (lambda a: a.update(qo=a["qo"].int()), "q_offsets must be int64"),
        (lambda a: a.update(k=a["k"].half()), "k must have q's dtype"),
        (lambda a: a.update(v=a["v"][:, :1]), "same shape"),
        (lambda a: a.update(k=a["k"][:, :1], v=a["v"][:, :1]), "number of heads"),
        (lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]), "head dim"),
        (lambda a: a.update(scale=float("nan")), "scale must be finite"),
        (lambda a: a.update(q=a["q"].int()), "q must be float32"),
    ],
)
def test_bad_inputs_are_rejected(mutate, match):
    q, qo, k, v, ko, _ = _inputs([3, 5], [4, 6], 2, 16, torch.float32)
    args = dict(q=q, qo=qo, k=k, v=v, ko=ko, scale=0.25)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        OP(args["q"], args["qo"], args["k"], args["v"], args["ko"], args["scale"], False)
