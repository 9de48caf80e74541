"""lattice.ops.jagged_attention on the CPU: forward (out, lse) and gradients against the pure-torch reference
(hypothesis over shapes, lengths 0..300, dense and jagged queries, causal on/off), float64 gradcheck, opcheck,
bf16/fp16, padded scaled_dot_product_attention with a mask, empty samples, multi-tile sequences, thread
counts, the kernel/reference switch."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lattice  # noqa: F401  (registers torch.ops.lattice)
from lattice.ops import jagged_attention, use_backend
from lattice.ops.reference import jagged_attention_reference
from lattice.ops.reference.attention import pad_jagged

OP = torch.ops.lattice.jagged_attention
OP_BWD = torch.ops.lattice.jagged_attention_backward
# Max abs error allowed against the float64 reference, relative to max(1, |reference|).
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def offsets_of(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def make_inputs(q_lengths, kv_lengths, heads, head_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = sum(q_lengths), sum(kv_lengths)
    q, k, v, go = (
        torch.randn(n, heads, head_dim, generator=g, dtype=torch.float64).to(dtype) for n in (nq, nk, nk, nq)
    )
    return q, offsets_of(q_lengths), k, v, offsets_of(kv_lengths), go


def reference_float64(q, qo, k, v, ko, scale, causal, go):
    """Reference out, lse and (dq, dk, dv) in float64 from the (rounded) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = jagged_attention_reference(q64, qo, k64, v64, ko, scale, causal)
    grads = torch.autograd.grad(out, (q64, k64, v64), go.double(), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (q64, k64, v64))]
    return out.detach(), lse, grads


def assert_close(name, got, want, tol):
    got = got.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.numel():
        err = (got - want.double()).abs().max().item()
        bound = tol * max(1.0, want.abs().max().item())
        assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def check_against_reference(q_lengths, kv_lengths, heads, head_dim, causal, dtype=torch.float32, seed=0):
    q, qo, k, v, ko, go = make_inputs(q_lengths, kv_lengths, heads, head_dim, dtype, seed)
    scale = head_dim**-0.5
    out, lse = OP(q, qo, k, v, ko, scale, causal)
    ref_out, ref_lse, ref_grads = reference_float64(q, qo, k, v, ko, scale, causal, go)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    tol = TOL[dtype]
    assert_close("out", out, ref_out, tol)
    # lse: same -inf pattern (queries without a visible key), close elsewhere.
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert_close("lse", lse[~empty], ref_lse[~empty], max(tol, 1e-5))
    grads = OP_BWD(go, q, qo, k, v, ko, out, lse, scale, causal)
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(name, got, want, tol)


# ---------------------------------------------------------------------------------------------------------
# Property tests against the reference
# ---------------------------------------------------------------------------------------------------------
lengths = st.one_of(st.integers(0, 12), st.integers(0, 300))


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 4))
    kv_lengths = draw(st.lists(lengths, min_size=batch, max_size=batch))
    mode = draw(st.sampled_from(["self", "dense", "jagged"]))
    if mode == "self":
        q_lengths = kv_lengths
    elif mode == "dense":
        n = draw(st.integers(1, 20))
        q_lengths = [n] * batch
    else:
        q_lengths = draw(st.lists(lengths, min_size=batch, max_size=batch))
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([1, 5, 16, 24, 32, 40, 64, 80]))
    causal = draw(st.booleans())
    return q_lengths, kv_lengths, heads, head_dim, causal


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.integers(0, 2**16))
def test_matches_reference_fp32(problem, seed):
    check_against_reference(*problem, seed=seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_other_dtypes(dtype, causal):
    check_against_reference([5, 0, 70, 40], [9, 3, 70, 0], 2, 40, causal, dtype)
    check_against_reference([8, 8, 8], [0, 130, 270], 3, 32, causal, dtype, seed=1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "q_lengths,kv_lengths",
    [
        ([600, 3], [600, 700]),  # several key tiles (online softmax), several query chunks
        ([40, 300], [513, 257]),  # tile edges
        ([257, 31, 33], [255, 1, 32]),
    ],
)
def test_long_sequences(q_lengths, kv_lengths, causal):
    check_against_reference(q_lengths, kv_lengths, 2, 48, causal)


@pytest.mark.parametrize("head_dim", [1, 7, 15, 16, 17, 33, 64, 100, 128])
def test_head_dims(head_dim):
    check_against_reference([3, 40], [17, 40], 2, head_dim, True)
    check_against_reference([8, 8], [0, 50], 3, head_dim, False)


def test_scale_is_applied():
    q, qo, k, v, ko, _ = make_inputs([7, 9], [11, 5], 2, 16)
    for scale in (0.05, 1.0, 3.0):
        out, lse = OP(q, qo, k, v, ko, scale, False)
        ref_out, ref_lse = jagged_attention_reference(q, qo, k, v, ko, scale, False)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_front_end_defaults_and_int32_offsets():
    q, qo, k, v, ko, _ = make_inputs([4, 6], [10, 2], 2, 16)
    out, lse = jagged_attention(q, qo.int(), k, v, ko.int())
    ref_out, ref_lse = jagged_attention_reference(q, qo, k, v, ko, 16**-0.5, False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_backend_switch_uses_reference(monkeypatch):
    q, qo, k, v, ko, _ = make_inputs([4, 6], [10, 2], 2, 16)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return jagged_attention_reference(*args, **kwargs)

    monkeypatch.setattr(lattice.ops.attention, "jagged_attention_reference", spy)
    with use_backend("reference"):
        out_ref, _ = jagged_attention(q, qo, k, v, ko)
    assert len(calls) == 1
    out_kernel, _ = jagged_attention(q, qo, k, v, ko)
    assert len(calls) == 1
    torch.testing.assert_close(out_kernel, out_ref, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    q, qo, k, v, ko, go = make_inputs([5, 9], [12, 7], 3, 16)
    # Same values through strided views: [H, N, Dh] storage transposed to [N, H, Dh].
    qs, ks, vs = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
    assert not qs.is_contiguous()
    out, lse = OP(qs, qo, ks, vs, ko, 0.25, True)
    want_out, want_lse = OP(q, qo, k, v, ko, 0.25, True)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    gos = go.transpose(0, 1).contiguous().transpose(0, 1)
    got = OP_BWD(gos, qs, qo, ks, vs, ko, out, lse, 0.25, True)
    want = OP_BWD(go, q, qo, k, v, ko, want_out, want_lse, 0.25, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_deterministic_across_thread_counts():
    q, qo, k, v, ko, go = make_inputs([3, 250, 0, 40, 8], [30, 250, 9, 0, 100], 2, 32)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, lse = OP(q, qo, k, v, ko, 0.2, True)
            results.append((out, lse, *OP_BWD(go, q, qo, k, v, ko, out, lse, 0.2, True)))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_splits_long_samples_over_threads(causal):
    """With more threads than (sample, head) pairs, the backward splits a sample's keys over several work
    items and reduces their partial grad_q; the result must not depend on that."""
    previous = torch.get_num_threads()
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            check_against_reference([900, 5], [1100, 7], 1, 24, causal, seed=threads)
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------
# Empty samples: zeros, lse = -inf, no NaN anywhere, zero gradients
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_samples_no_nan(dtype, causal):
    # Sample 0: queries but no keys; sample 1: keys but no queries; sample 2: nothing; sample 3: normal;
    # sample 4 (causal): more queries than keys, so the first queries see nothing.
    q_lengths, kv_lengths = [4, 0, 0, 6, 9], [0, 5, 0, 6, 3]
    q, qo, k, v, ko, go = make_inputs(q_lengths, kv_lengths, 2, 16, dtype)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = jagged_attention(q, qo, k, v, ko, causal=causal)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert torch.isneginf(lse[:4]).all()
    assert not torch.isnan(lse).any()
    if causal:
        assert torch.isneginf(lse[10:16]).all() and torch.isfinite(lse[16:]).all()
        assert torch.equal(out[10:16], torch.zeros_like(out[10:16]))
    out.backward(go)
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:4], torch.zeros_like(q.grad[:4]))
    assert torch.equal(k.grad[:5], torch.zeros_like(k.grad[:5]))  # sample 1's keys: nobody attends
    assert torch.equal(v.grad[:5], torch.zeros_like(v.grad[:5]))


def test_all_empty_and_zero_samples():
    for q_lengths, kv_lengths in (([0, 0], [0, 0]), ([], []), ([3], [0]), ([0], [4])):
        q, qo, k, v, ko, go = make_inputs(q_lengths, kv_lengths, 2, 8)
        for causal in (False, True):
            out, lse = OP(q, qo, k, v, ko, 0.5, causal)
            assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
            assert torch.isneginf(lse).all()
            gq, gk, gv = OP_BWD(go, q, qo, k, v, ko, out, lse, 0.5, causal)
            assert torch.equal(gq, torch.zeros_like(q))
            assert torch.equal(gk, torch.zeros_like(k)) and torch.equal(gv, torch.zeros_like(v))


def test_large_scores_stay_finite():
    q, qo, k, v, ko, go = make_inputs([5, 30], [40, 30], 2, 16)
    check = lambda s: OP(q * s, qo, k * s, v, ko, 1.0, True)  # noqa: E731
    out, lse = check(30.0)  # scores in the thousands: the online softmax must not overflow
    ref_out, ref_lse = jagged_attention_reference((q * 30).double(), qo, (k * 30).double(), v.double(), ko, 1.0, True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------
# gradcheck (float64) and opcheck
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_lengths,kv_lengths", [([3, 0, 5], [4, 2, 5]), ([2, 2, 2], [0, 6, 1])])
def test_gradcheck_float64(q_lengths, kv_lengths, causal):
    q, qo, k, v, ko, _ = make_inputs(q_lengths, kv_lengths, 2, 5, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return jagged_attention(q, qo, k, v, ko, 0.7, causal)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def opcheck_cases():
    yield make_inputs([3, 0, 17], [5, 4, 17], 2, 16), 0.25, True
    yield make_inputs([8, 8], [0, 40], 3, 7), 1.0, False
    yield make_inputs([2, 33], [3, 33], 1, 32, torch.bfloat16), 0.2, True


@pytest.mark.parametrize("case", list(opcheck_cases()), ids=["causal", "dense", "bf16"])
def test_opcheck(case):
    (q, qo, k, v, ko, go), scale, causal = case
    if q.dtype == torch.float32:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(OP, (q, qo, k, v, ko, scale, causal))
    out, lse = OP(q.detach(), qo, k.detach(), v.detach(), ko, scale, causal)
    torch.library.opcheck(OP_BWD, (go, q.detach(), qo, k.detach(), v.detach(), ko, out, lse, scale, causal))


def test_lse_is_not_differentiable():
    q, qo, k, v, ko, _ = make_inputs([3, 4], [5, 4], 2, 8)
    q.requires_grad_()
    out, lse = jagged_attention(q, qo, k, v, ko)
    assert out.requires_grad and not lse.requires_grad


# ---------------------------------------------------------------------------------------------------------
# Against scaled_dot_product_attention on padded inputs with a mask (forward and gradients)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dense_queries", [False, True])
def test_matches_padded_sdpa(causal, dense_queries):
    kv_lengths = [1, 37, 120, 64, 9]  # every query sees at least one key, so SDPA has no all-masked rows
    q_lengths = [8] * 5 if dense_queries and not causal else kv_lengths
    if dense_queries and causal:
        q_lengths = [min(8, m) for m in kv_lengths]
    heads, head_dim = 3, 32
    q, qo, k, v, ko, go = make_inputs(q_lengths, kv_lengths, heads, head_dim)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, _ = jagged_attention(q, qo, k, v, ko, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), go)

    qp, q_valid = pad_jagged(q, qo)
    kp, k_valid = pad_jagged(k, ko)
    vp, _ = pad_jagged(v, ko)
    lq, lk = qp.shape[1], kp.shape[1]
    mask = k_valid[:, None, None, :].expand(len(kv_lengths), 1, lq, lk)
    if causal:
        shift = (ko.diff() - qo.diff())[:, None, None, None]
        mask = mask & (torch.arange(lk)[None, None, None, :] <= torch.arange(lq)[None, None, :, None] + shift)
    # Padded query rows attend to key 0 so SDPA stays finite there; their output is discarded.
    mask = mask | (~q_valid[:, None, :, None] & (torch.arange(lk) == 0)[None, None, None, :])
    sdpa = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask)
    sdpa_out = sdpa.transpose(1, 2)[q_valid]
    torch.testing.assert_close(out, sdpa_out, rtol=1e-5, atol=2e-5)
    sdpa_grads = torch.autograd.grad(sdpa_out, (q, k, v), go)
    for a, b in zip(grads, sdpa_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------
# Validation: every bad input gets an error naming the argument and the value
# ---------------------------------------------------------------------------------------------------------
def good():
    q, qo, k, v, ko, _ = make_inputs([2, 3], [4, 1], 2, 8)
    return dict(q=q, q_offsets=qo, k=k, v=v, kv_offsets=ko, scale=0.5, causal=False)


def call(**overrides):
    args = good()
    args.update(overrides)
    return OP(args["q"], args["q_offsets"], args["k"], args["v"], args["kv_offsets"], args["scale"], args["causal"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(q=torch.randn(5, 16)), r"q must be 3-D, got shape \[5, 16\]"),
        (dict(k=torch.randn(5, 2)), r"k must be 3-D"),
        (dict(v=torch.randn(5, 2, 8, 1)), r"v must be 3-D"),
        (dict(q=torch.randn(5, 2, 8).int()), r"q must be float32, float64, bfloat16 or float16, got Int"),
        (dict(k=torch.randn(5, 2, 8).double()), r"k must have q's dtype Float, got Double"),
        (dict(v=torch.randn(5, 2, 8).half()), r"v must have q's dtype Float, got Half"),
        (dict(v=torch.randn(6, 2, 8)), r"k and v must have the same shape, got k \[5, 2, 8\] and v \[6, 2, 8\]"),
        (dict(k=torch.randn(5, 3, 8), v=torch.randn(5, 3, 8)), r"k must have q's number of heads 2, got 3"),
        (dict(k=torch.randn(5, 2, 4), v=torch.randn(5, 2, 4)), r"k must have q's head dim 8, got 4"),
        (dict(q=torch.randn(5, 2, 0), k=torch.randn(5, 2, 0), v=torch.randn(5, 2, 0)), r"head dim >= 1"),
        (dict(scale=float("nan")), r"scale must be finite, got nan"),
        (dict(q_offsets=torch.tensor([0, 2, 5], dtype=torch.int32)), r"q_offsets must be int64, got Int"),
        (dict(kv_offsets=torch.tensor([0.0, 4.0, 5.0])), r"kv_offsets must be int64, got Float"),
        (dict(q_offsets=torch.tensor([[0, 2, 5]])), r"q_offsets must be 1-D"),
        (dict(q_offsets=torch.tensor([], dtype=torch.int64)), r"q_offsets must have B\+1 >= 1 entries"),
        (dict(q_offsets=torch.tensor([1, 2, 5])), r"q_offsets\[0\] must be 0, got 1"),
        (dict(q_offsets=torch.tensor([0, 4, 3, 5])), r"q_offsets must be non-decreasing: sample 1 has q_offsets\[1\] = 4 > q_offsets\[2\] = 3"),
        (dict(kv_offsets=torch.tensor([0, 4, 9])), r"kv_offsets\[-1\] = 9 overruns k \(5 entries\)"),
        (dict(q_offsets=torch.tensor([0, 2, 4])), r"q_offsets\[-1\] must equal the number of rows of q \(5\), got 4"),
        (dict(kv_offsets=torch.tensor([0, 5])), r"q_offsets and kv_offsets must describe the same number of samples: q_offsets has 2 samples \(3 entries\), kv_offsets has 1 \(2 entries\)"),
    ],
)
def test_bad_inputs(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        call(**overrides)


def test_bad_backward_inputs():
    args = good()
    q, qo, k, v, ko = args["q"], args["q_offsets"], args["k"], args["v"], args["kv_offsets"]
    out, lse = OP(q, qo, k, v, ko, 0.5, False)
    go = torch.randn_like(out)
    with pytest.raises(RuntimeError, match=r"grad_out must have q's shape \[5, 2, 8\], got \[5, 2, 7\]"):
        OP_BWD(go[..., :7], q, qo, k, v, ko, out, lse, 0.5, False)
    with pytest.raises(RuntimeError, match=r"out must have q's shape"):
        OP_BWD(go, q, qo, k, v, ko, out[:4], lse, 0.5, False)
    with pytest.raises(RuntimeError, match=r"grad_out must have q's dtype Float, got Double"):
        OP_BWD(go.double(), q, qo, k, v, ko, out, lse, 0.5, False)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[5, 2\], got \[5, 3\]"):
        OP_BWD(go, q, qo, k, v, ko, out, torch.zeros(5, 3), 0.5, False)
    with pytest.raises(RuntimeError, match=r"lse must be float32, got Double"):
        OP_BWD(go, q, qo, k, v, ko, out, lse.double(), 0.5, False)
    with pytest.raises(RuntimeError, match=r"kv_offsets\[0\] must be 0"):
        OP_BWD(go, q, qo, k, v, torch.tensor([1, 4, 5]), out, lse, 0.5, False)


def test_torch_compile_fullgraph():
    q, qo, k, v, ko, go = make_inputs([4, 6], [5, 7], 2, 16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, lse = jagged_attention(q, qo, k, v, ko, causal=True)
        return (out * go).sum() + lse.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
