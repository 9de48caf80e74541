"""jagged_embedding_pool backward: sparse row gradient, per-sample-weight gradient, fused SGD / row-wise
Adagrad, sparse_rows_optimizer_step_, autograd (sparse COO), gradcheck, opcheck."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lattice  # noqa: F401
from lattice.ops import jagged_embedding_pool, jagged_embedding_pool_fused, reference, sparse_rows_optimizer_step_
from _pooling_cases import make_case, pool_cases, tolerance

ops = torch.ops.lattice


def grad_like(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.B, case.T, case.weights.shape[1], generator=g, dtype=torch.float64).to(case.weights.dtype)


def bwd_args(case, grad):
    return (grad, case.table_row_offsets, case.indices, case.offsets, case.pooling, case.per_sample_weights)


# ---- sparse row gradient ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(pool_cases(dtypes=(torch.float32, torch.bfloat16, torch.float64), max_d=140))
def test_sparse_backward_matches_reference(case):
    grad = grad_like(case)
    rows, row_grads = ops.jagged_embedding_pool_backward_sparse(*bwd_args(case, grad))
    ref_rows, ref_grads = reference.jagged_embedding_pool_backward_sparse(*bwd_args(case, grad))
    assert rows.dtype == torch.int64 and row_grads.dtype == grad.dtype
    assert torch.equal(rows, ref_rows)  # sorted, unique, exactly the touched rows
    torch.testing.assert_close(row_grads, ref_grads, **tolerance(grad.dtype))


def test_sparse_backward_duplicates_exact():
    tro = torch.tensor([0, 4, 9])
    idx = torch.tensor([1, 1, 1, 3, 1, 2, 2])  # table 0: 1,1,1 | 3,1 ; table 1: 2,2 (B = 2)
    offs = torch.tensor([0, 3, 5, 7, 7])
    grad = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)
    rows, rg = ops.jagged_embedding_pool_backward_sparse(grad, tro, idx, offs, 0, None)
    assert rows.tolist() == [1, 3, 6]
    torch.testing.assert_close(rg[0], 3 * grad[0, 0] + grad[1, 0])
    torch.testing.assert_close(rg[1], grad[1, 0])
    torch.testing.assert_close(rg[2], 2 * grad[0, 1])


def test_sparse_backward_many_rows_multi_pass_sort():
    # 5M rows: 23-bit keys, three radix passes; enough positions for every thread.
    case = make_case(7, T=2, B=3000, D=2, rows=[3_000_000, 2_000_000], max_len=12, pooling=1)
    grad = grad_like(case)
    rows, rg = ops.jagged_embedding_pool_backward_sparse(*bwd_args(case, grad))
    ref_rows, ref_grads = reference.jagged_embedding_pool_backward_sparse(*bwd_args(case, grad))
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(rg, ref_grads)


def test_backward_global_sort_path_shared_ranges():
    # Overlapping [T, 2] row ranges: one global parallel radix sort (three 8-bit passes for 23-bit rows).
    g = torch.Generator().manual_seed(22)
    B = 4000
    tro = torch.tensor([[2_000_000, 5_000_000], [0, 3_000_000], [2_000_000, 5_000_000]])
    counts = (tro[:, 1] - tro[:, 0]).tolist()
    lengths = torch.randint(0, 10, (3 * B,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    idx = torch.cat([torch.randint(0, counts[i // B], (int(n),), generator=g) for i, n in enumerate(lengths)])
    idx[5] = idx[7] = 1234  # duplicates across bags
    grad = torch.randn(B, 3, 4, generator=g)
    for pooling in (0, 1):
        rows, rg = ops.jagged_embedding_pool_backward_sparse(grad, tro, idx, offsets, pooling, None)
        ref_rows, ref_rg = reference.jagged_embedding_pool_backward_sparse(grad, tro, idx, offsets, pooling, None)
        assert torch.equal(rows, ref_rows)
        torch.testing.assert_close(rg, ref_rg)


def test_backward_deterministic_across_thread_counts():
    case = make_case(8, T=3, B=2000, D=32, rows=[50, 5000, 70000], max_len=20)
    grad = grad_like(case).float()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            w = case.weights.clone()
            s = torch.zeros(w.shape[0])
            ops.jagged_embedding_pool_backward_fused_(w, s, *bwd_args(case, grad), 1, 0.05, 1e-8, 0.0)
            results.append((ops.jagged_embedding_pool_backward_sparse(*bwd_args(case, grad)), w, s))
    finally:
        torch.set_num_threads(threads)
    (r1, g1), w1, s1 = results[0]
    (r2, g2), w2, s2 = results[1]
    assert torch.equal(r1, r2) and torch.equal(g1, g2) and torch.equal(w1, w2) and torch.equal(s1, s2)


# ---- per-sample-weight gradient ----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(pool_cases(dtypes=(torch.float32, torch.float64, torch.float16)))
def test_per_sample_weight_grad_matches_reference(case):
    grad = grad_like(case)
    args = (grad, case.weights, case.table_row_offsets, case.indices, case.offsets)
    out = ops.jagged_embedding_pool_backward_per_sample_weights(*args)
    ref = reference.jagged_embedding_pool_backward_per_sample_weights(*args)
    assert out.shape == (case.indices.numel(),)
    torch.testing.assert_close(out, ref, **tolerance(case.weights.dtype if case.weights.dtype != torch.float16
                                                     else torch.bfloat16))


# ---- autograd ---------------------------------------------------------------------------------------
def test_autograd_sparse_coo_gradient_matches_embedding_bag():
    case = make_case(9, T=3, B=5, D=6, rows=[4, 9, 2], max_len=6, weighted=True)
    w = case.weights.clone().requires_grad_()
    psw = case.per_sample_weights.clone().requires_grad_()
    grad = grad_like(case)
    jagged_embedding_pool(w, case.table_row_offsets, case.indices, case.offsets, "sum", psw).backward(grad)
    assert w.grad.layout == torch.sparse_coo

    w2 = case.weights.clone().requires_grad_()
    psw2 = case.per_sample_weights.clone().requires_grad_()
    rows = case.global_rows()
    out = F.embedding_bag(rows, w2, case.offsets[:-1].long(), mode="sum", per_sample_weights=psw2[: rows.numel()])
    out.view(case.T, case.B, -1).transpose(0, 1).backward(grad)
    torch.testing.assert_close(w.grad.to_dense(), w2.grad)
    torch.testing.assert_close(psw.grad, psw2.grad)


@pytest.mark.parametrize("optim", ["sgd", "sparse_adam", "adagrad"])
def test_sparse_gradient_works_with_torch_sparse_optimizers(optim):
    case = make_case(10, T=2, B=4, D=8, rows=[10, 10], max_len=5, pooling=1)
    w = torch.nn.Parameter(case.weights.clone())
    dense = torch.nn.Parameter(case.weights.clone())
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "sparse_adam": lambda p: torch.optim.SparseAdam(p, lr=0.1),
            "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1)}[optim]
    opt_sparse, opt_dense = make([w]), make([dense])
    for step in range(3):
        for p, o, sparse in ((w, opt_sparse, True), (dense, opt_dense, False)):
            o.zero_grad()
            out = jagged_embedding_pool(p, case.table_row_offsets, case.indices, case.offsets, 1,
                                        sparse_grad=sparse)
            (out * grad_like(case, step)).sum().backward()
            if not sparse and optim == "sparse_adam":
                p.grad = p.grad.to_sparse()
            o.step()
    if optim == "adagrad":
        # Dense Adagrad also decays untouched rows' (zero) state; the touched rows agree.
        touched = torch.unique(case.global_rows())
        torch.testing.assert_close(w.detach()[touched], dense.detach()[touched])
    else:
        torch.testing.assert_close(w.detach(), dense.detach())


@pytest.mark.parametrize("pooling", [0, 1])
def test_gradcheck_float64(pooling):
    case = make_case(11, T=2, B=3, D=4, rows=[3, 5], max_len=4, pooling=pooling, weighted=pooling == 0,
                     dtype=torch.float64)
    w = case.weights.clone().requires_grad_()
    inputs = [w]
    if case.per_sample_weights is not None:
        inputs.append(case.per_sample_weights.clone().requires_grad_())

    def fn(w, psw=None):
        return jagged_embedding_pool(w, case.table_row_offsets, case.indices, case.offsets, pooling, psw,
                                     sparse_grad=False)

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def _opcheck_inputs():
    weighted = make_case(12, T=2, B=3, D=5, rows=[4, 6], max_len=4, weighted=True)
    weighted.weights.requires_grad_()
    weighted.per_sample_weights.requires_grad_()
    mean32 = make_case(13, T=3, B=2, D=17, rows=[4, 6, 5], max_len=4, pooling=1, index_dtype=torch.int32)
    mean32.weights.requires_grad_()
    shared = make_case(14, T=3, B=2, D=8, rows=[4, 6], max_len=4, shared=True)
    return [weighted, mean32, shared]


@pytest.mark.parametrize("i", range(3))
def test_opcheck_forward(i):
    case = _opcheck_inputs()[i]
    torch.library.opcheck(ops.jagged_embedding_pool.default, case.args)


@pytest.mark.parametrize("i", range(3))
def test_opcheck_backward_ops(i):
    case = _opcheck_inputs()[i]
    w = case.weights.detach()
    psw = None if case.per_sample_weights is None else case.per_sample_weights.detach()
    grad = grad_like(case)
    base = (case.table_row_offsets, case.indices, case.offsets)
    # Data-dependent output size: no dynamic-shape AOT test for this one.
    torch.library.opcheck(ops.jagged_embedding_pool_backward_sparse.default, (grad, *base, case.pooling, psw),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(ops.jagged_embedding_pool_backward_per_sample_weights.default, (grad, w, *base))
    for optimizer in (0, 1):
        torch.library.opcheck(
            ops.jagged_embedding_pool_backward_fused_.default,
            (w.clone(), torch.zeros(w.shape[0]), grad, *base, case.pooling, psw, optimizer, 0.1, 1e-8, 0.01),
        )
    rows = torch.tensor([0, 2, 3])
    torch.library.opcheck(
        ops.sparse_rows_optimizer_step_.default,
        (w.clone(), torch.zeros(w.shape[0]), rows, torch.randn(3, w.shape[1]), 1, 0.1, 1e-8, 0.0),
    )


# ---- fused optimizer ----------------------------------------------------------------------------------
def python_step(weights, state, case, grad, optimizer, lr, eps, wd):
    """The expected fused step, written out: dense autograd gradient, then the per-row update."""
    w = weights.detach().double().clone().requires_grad_()
    psw = None if case.per_sample_weights is None else case.per_sample_weights.double()
    rows = case.global_rows()
    mode = "sum" if case.pooling == 0 else "mean"
    out = F.embedding_bag(rows, w, case.offsets[:-1].long(), mode=mode,
                          per_sample_weights=None if psw is None else psw[: rows.numel()])
    out.view(case.T, case.B, weights.shape[1]).transpose(0, 1).backward(grad.double())
    new_w, new_s = weights.double().clone(), state.double().clone()
    for r in torch.unique(rows).tolist():
        g = w.grad[r] + wd * new_w[r]
        if optimizer == 0:
            new_w[r] -= lr * g
        else:
            new_s[r] += (g * g).mean()
            new_w[r] -= lr / (new_s[r].sqrt() + eps) * g
    return new_w, new_s


@settings(max_examples=40, deadline=None)
@given(case=pool_cases(max_d=140), optimizer=st.sampled_from([0, 1]), wd=st.sampled_from([0.0, 0.01]))
def test_fused_step_matches_python_step(case, optimizer, wd):
    grad = grad_like(case)
    w = case.weights.clone()
    state = torch.rand(w.shape[0])
    expect_w, expect_s = python_step(w, state, case, grad, optimizer, 0.1, 1e-6, wd)
    ops.jagged_embedding_pool_backward_fused_(w, state, *bwd_args(case, grad), optimizer, 0.1, 1e-6, wd)
    torch.testing.assert_close(w.double(), expect_w, atol=1e-5, rtol=1e-5)
    if optimizer == 1:
        torch.testing.assert_close(state.double(), expect_s, atol=1e-5, rtol=1e-5)
    # the reference fused step agrees too
    ref_w, ref_s = case.weights.clone(), torch.zeros(case.weights.shape[0])
    w2, s2 = ref_w.clone(), ref_s.clone()
    ops.jagged_embedding_pool_backward_fused_(w2, s2, *bwd_args(case, grad), optimizer, 0.1, 1e-6, wd)
    reference.jagged_embedding_pool_backward_fused_(ref_w, ref_s, *bwd_args(case, grad), optimizer, 0.1, 1e-6, wd)
    torch.testing.assert_close(w2, ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, ref_s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_step_half_storage(dtype):
    case = make_case(15, T=2, B=6, D=24, rows=[8, 9], max_len=6, dtype=dtype)
    grad = grad_like(case)
    w = case.weights.clone()
    state = torch.zeros(w.shape[0])
    expect_w, expect_s = python_step(w.float(), state, case, grad.float(), 1, 0.1, 1e-8, 0.0)
    ops.jagged_embedding_pool_backward_fused_(w, state, *bwd_args(case, grad), 1, 0.1, 1e-8, 0.0)
    assert w.dtype == dtype
    torch.testing.assert_close(w.double(), expect_w.to(dtype).double(), **tolerance(dtype))
    torch.testing.assert_close(state.double(), expect_s, atol=1e-3, rtol=1e-2)


def test_fused_autograd_function_updates_in_place_and_returns_psw_grad():
    case = make_case(16, T=2, B=4, D=8, rows=[6, 7], max_len=5, weighted=True)
    w = case.weights.clone()
    state = torch.zeros(w.shape[0])
    psw = case.per_sample_weights.clone().requires_grad_()
    grad = grad_like(case)
    expected_psw = ops.jagged_embedding_pool_backward_per_sample_weights(
        grad, w, case.table_row_offsets, case.indices, case.offsets)
    expect_w, expect_s = python_step(w, state, case, grad, 1, 0.05, 1e-8, 0.0)
    out = jagged_embedding_pool_fused(w, state, case.table_row_offsets, case.indices, case.offsets, "sum", psw,
                                      optimizer="rowwise_adagrad", learning_rate=0.05, eps=1e-8)
    assert out.requires_grad
    out.backward(grad)
    torch.testing.assert_close(psw.grad, expected_psw)  # computed from the weights before the update
    torch.testing.assert_close(w.double(), expect_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.double(), expect_s, atol=1e-6, rtol=1e-5)


def test_fused_reference_backend_matches_kernel():
    case = make_case(17, T=3, B=5, D=8, rows=[6, 7, 8], max_len=5, pooling=1)
    grad = grad_like(case)
    results = []
    for backend in ("kernel", "reference"):
        w, s = case.weights.clone(), torch.zeros(case.weights.shape[0])
        with lattice.ops.use_backend(backend):
            jagged_embedding_pool_fused(w, s, case.table_row_offsets, case.indices, case.offsets, "mean",
                                        learning_rate=0.1).backward(grad)
        results.append((w, s))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_fused_compiles_without_a_graph_break():
    case = make_case(18, T=2, B=4, D=8, rows=[6, 7], max_len=5)
    lin = torch.nn.Linear(8, 1)
    w, s = case.weights.clone(), torch.zeros(case.weights.shape[0])
    w_eager, s_eager = w.clone(), s.clone()

    def step(w, s):
        out = jagged_embedding_pool_fused(w, s, case.table_row_offsets, case.indices, case.offsets, "sum",
                                          learning_rate=0.1)
        return lin(out.relu()).sum()

    torch.compile(step, fullgraph=True)(w, s).backward()  # the update runs in the compiled backward
    step(w_eager, s_eager).backward()
    torch.testing.assert_close(w, w_eager)
    torch.testing.assert_close(s, s_eager)


def test_sparse_autograd_compiles():
    case = make_case(19, T=2, B=4, D=8, rows=[6, 7], max_len=5)
    w = case.weights.clone().requires_grad_()

    def f(w):
        return jagged_embedding_pool(w, case.table_row_offsets, case.indices, case.offsets, "sum").square().sum()

    torch.compile(f, fullgraph=True)(w).backward()
    w2 = case.weights.clone().requires_grad_()
    f(w2).backward()
    torch.testing.assert_close(w.grad.to_dense(), w2.grad.to_dense())


# ---- sparse_rows_optimizer_step_ -------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rows_step_matches_reference(optimizer, dtype):
    g = torch.Generator().manual_seed(20)
    w = torch.randn(50, 20, generator=g).to(dtype)
    s = torch.rand(50, generator=g)
    rows = torch.tensor([40, 3, 17, 0, 49])  # unique, unsorted
    rg = torch.randn(5, 20, generator=g)
    w_ref, s_ref = w.clone(), s.clone()
    sparse_rows_optimizer_step_(w, s, rows, rg, optimizer, 0.1, 1e-8, 0.01)
    with lattice.ops.use_backend("reference"):
        sparse_rows_optimizer_step_(w_ref, s_ref, rows, rg, optimizer, 0.1, 1e-8, 0.01)
    torch.testing.assert_close(w, w_ref, **tolerance(dtype if dtype != torch.float64 else torch.float32))
    torch.testing.assert_close(s, s_ref)


def test_fused_equals_sparse_then_rows_step():
    case = make_case(21, T=3, B=50, D=16, rows=[30, 40, 50], max_len=8, weighted=True)
    grad = grad_like(case)
    w1, s1 = case.weights.clone(), torch.rand(case.weights.shape[0])
    w2, s2 = w1.clone(), s1.clone()
    ops.jagged_embedding_pool_backward_fused_(w1, s1, *bwd_args(case, grad), 1, 0.1, 1e-8, 0.0)
    rows, rg = ops.jagged_embedding_pool_backward_sparse(*bwd_args(case, grad))
    ops.sparse_rows_optimizer_step_(w2, s2, rows, rg, 1, 0.1, 1e-8, 0.0)
    assert torch.equal(w1, w2) and torch.equal(s1, s2)
