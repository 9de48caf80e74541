"""The CUDA pooling kernels on a real GPU (skipped without one; benchmarks/gpu_check.sh runs them): forward, sparse
and fused backward, per-sample-weight gradient and the sparse-rows step against a pure-torch reference, plus the
device-side validation errors. The same kernels run on every CI machine through the emulator
(tests/cuda_emu/test_emu_pooling.py)."""
import pytest
import torch

try:
    from lattice.ops import _library

    HAVE_CUDA_KERNELS = torch.cuda.is_available() and _library.has_cuda_kernels()
except Exception:  # pragma: no cover - no extension built
    HAVE_CUDA_KERNELS = False

pytestmark = pytest.mark.skipif(not HAVE_CUDA_KERNELS, reason="needs a GPU and lattice built with CUDA")

ops = torch.ops.lattice
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def make(T=4, B=33, D=64, rows=(50, 7, 300, 1), max_len=12, dtype=torch.float32, itype=torch.int64, psw=False,
         seed=0):
    g = torch.Generator().manual_seed(seed)
    tro = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()])
    lengths = torch.randint(0, max_len + 1, (T * B,), generator=g)
    lengths[:: 5] = 0
    offsets = torch.zeros(T * B + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    bag = torch.repeat_interleave(torch.arange(T * B), lengths)
    local = (torch.rand(bag.numel(), generator=g) * torch.tensor(rows)[bag // B]).long()
    w = torch.randn(int(tro[-1]), D, generator=g).to(dtype)
    p = torch.rand(bag.numel(), generator=g) + 0.5 if psw else None
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    return dict(weights=cuda(w), tro=cuda(tro), indices=cuda(local.to(itype)), offsets=cuda(offsets.to(itype)),
                psw=cuda(p), bag=cuda(bag), rows=cuda(tro[bag // B] + local), T=T, B=B, D=D)


def ref_forward(c, pooling):
    w = c["weights"].double()
    scale = torch.ones_like(c["rows"], dtype=torch.float64)
    if c["psw"] is not None:
        scale = c["psw"].double()
    lengths = torch.bincount(c["bag"], minlength=c["T"] * c["B"]).double()
    if pooling == 1:
        scale = 1.0 / lengths[c["bag"]]
    out = torch.zeros(c["T"] * c["B"], c["D"], dtype=torch.float64, device="cuda")
    out.index_add_(0, c["bag"], w[c["rows"]] * scale[:, None])
    return out.view(c["T"], c["B"], c["D"]).transpose(0, 1), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling, psw", [(0, False), (1, False), (0, True)])
@pytest.mark.parametrize("D", [3, 64, 200])
def test_forward(dtype, itype, pooling, psw, D):
    c = make(D=D, dtype=dtype, itype=itype, psw=psw, seed=D)
    out = ops.jagged_embedding_pool(c["weights"], c["tro"], c["indices"], c["offsets"], pooling, c["psw"])
    ref, _ = ref_forward(c, pooling)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pooling, psw", [(0, False), (1, False), (0, True)])
def test_backward_sparse_and_fused(dtype, pooling, psw):
    c = make(D=32, dtype=dtype, psw=psw, seed=3)
    go = torch.randn(c["B"], c["T"], c["D"], device="cuda").to(dtype)
    _, scale = ref_forward(c, pooling)
    per_pos = go.double()[c["bag"] % c["B"], c["bag"] // c["B"]] * scale[:, None]
    ref_rows, inv = torch.unique(c["rows"], return_inverse=True)
    ref_grads = torch.zeros(ref_rows.numel(), c["D"], dtype=torch.float64, device="cuda").index_add_(0, inv, per_pos)
    rows, grads = ops.jagged_embedding_pool_backward_sparse(go, c["tro"], c["indices"], c["offsets"], pooling, c["psw"])
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(grads.double(), ref_grads, **TOL[dtype])
    for optimizer in (0, 1):
        w = c["weights"].clone()
        state = torch.rand(w.shape[0], device="cuda")
        ref_w, ref_state = w.double().clone(), state.double().clone()
        g = ref_grads + 0.01 * ref_w[ref_rows]
        if optimizer == 0:
            ref_w[ref_rows] -= 0.1 * g
        else:
            ref_state[ref_rows] += (g * g).mean(1)
            ref_w[ref_rows] -= 0.1 * g / (ref_state[ref_rows].sqrt() + 1e-3)[:, None]
        ops.jagged_embedding_pool_backward_fused_(w, state, go, c["tro"], c["indices"], c["offsets"], pooling,
                                                  c["psw"], optimizer, 0.1, 1e-3, 0.01)
        torch.testing.assert_close(w.double(), ref_w.to(dtype).double(), **TOL[dtype])
        if optimizer == 1:
            torch.testing.assert_close(state.double(), ref_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_per_sample_weights_grad(dtype):
    c = make(D=48, psw=True, seed=5, dtype=dtype)
    go = torch.randn(c["B"], c["T"], c["D"], device="cuda").to(dtype)
    got = ops.jagged_embedding_pool_backward_per_sample_weights(go, c["weights"], c["tro"], c["indices"], c["offsets"])
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # like the CPU op
    ref = (go.double()[c["bag"] % c["B"], c["bag"] // c["B"]] * c["weights"].double()[c["rows"]]).sum(1)
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])


def test_matches_cpu_op_with_shared_tables():
    # table_row_offsets [T, 2] (features sharing a table), compared with the CPU kernel of the same op.
    c = make(T=3, B=17, D=24, rows=(40, 40, 40), seed=8)
    tro = torch.tensor([[0, 40], [10, 50], [0, 40]], device="cuda")
    w = torch.randn(60, 24, device="cuda")
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    try:
        ref = ops.jagged_embedding_pool(w.cpu(), tro.cpu(), c["indices"].cpu(), c["offsets"].cpu(), 0, None)
    except NotImplementedError:
        pytest.skip("no CPU kernel registered")
    out = ops.jagged_embedding_pool(w, tro, c["indices"], c["offsets"], 0, None)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    rows, grads = ops.jagged_embedding_pool_backward_sparse(go, tro, c["indices"], c["offsets"], 0, None)
    ref_rows, ref_grads = ops.jagged_embedding_pool_backward_sparse(go.cpu(), tro.cpu(), c["indices"].cpu(),
                                                                    c["offsets"].cpu(), 0, cpu(None))
    assert torch.equal(rows.cpu(), ref_rows)
    torch.testing.assert_close(grads.cpu(), ref_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", [0, 1])
def test_gradcheck_and_opcheck_float64(pooling):
    import lattice.ops as lops

    fn = getattr(lops, "jagged_embedding_pool", None)
    if fn is None:
        pytest.skip("the pooling front end (lattice.ops.jagged_embedding_pool) is not available")
    c = make(T=2, B=3, D=4, rows=(5, 3), max_len=4, dtype=torch.float64, psw=pooling == 0, seed=2)
    inputs = [c["weights"].clone().requires_grad_(True)]
    if pooling == 0:
        inputs.append(c["psw"].double().clone().requires_grad_(True))

    def f(w, psw=None):
        return fn(w, c["tro"], c["indices"], c["offsets"], pooling, psw, sparse_grad=False)

    assert torch.autograd.gradcheck(f, tuple(inputs))
    psw = c["psw"].double() if pooling == 0 else None
    torch.library.opcheck(ops.jagged_embedding_pool.default,
                          (c["weights"], c["tro"], c["indices"], c["offsets"], pooling, psw))


def test_sparse_rows_step_and_errors():
    w = torch.randn(100, 16, device="cuda")
    state = torch.zeros(100, device="cuda")
    rows = torch.tensor([5, 1, 77], device="cuda")
    grads = torch.randn(3, 16, device="cuda")
    ref = w.clone()
    g = grads
    st = (g * g).mean(1)
    ref[rows] -= 0.5 * g / (st.sqrt() + 1e-8)[:, None]
    ops.sparse_rows_optimizer_step_(w, state, rows, grads, 1, 0.5, 1e-8, 0.0)
    torch.testing.assert_close(w, ref)
    with pytest.raises(RuntimeError, match=r"rows must be unique: rows\[2\] = 5 appears twice"):
        ops.sparse_rows_optimizer_step_(w, state, torch.tensor([5, 1, 5], device="cuda"), grads, 1, 0.5, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 100 is out of range for weights with 100 rows"):
        ops.sparse_rows_optimizer_step_(w, state, torch.tensor([5, 100, 7], device="cuda"), grads, 1, 0.5, 1e-8, 0.0)


def test_bad_index_is_reported_and_fused_step_leaves_weights():
    c = make(T=2, B=3, D=8, rows=(4, 6), seed=1)
    idx = c["indices"].clone()
    bad_pos = int(c["offsets"][3])  # first position of table 1
    if bad_pos < idx.numel():
        idx[bad_pos] = 6
        with pytest.raises(RuntimeError, match=rf"indices\[{bad_pos}\] = 6 is out of range for table 1 with 6 rows"):
            ops.jagged_embedding_pool(c["weights"], c["tro"], idx, c["offsets"], 0, None)
        w = c["weights"].clone()
        go = torch.randn(3, 2, 8, device="cuda")
        with pytest.raises(RuntimeError, match="out of range"):
            ops.jagged_embedding_pool_backward_fused_(w, torch.zeros(10, device="cuda"), go, c["tro"], idx,
                                                      c["offsets"], 0, None, 1, 0.1, 1e-3, 0.0)
        assert torch.equal(w, c["weights"])
    with pytest.raises(RuntimeError, match=r"offsets\[0\] must be 0, got 1"):
        off = c["offsets"].clone()
        off[0] = 1
        ops.jagged_embedding_pool(c["weights"], c["tro"], c["indices"], off, 0, None)
