"""JaggedTensor / KeyedJaggedTensor: round trips against a per-row Python model, and every validation error."""
import dataclasses
import importlib.util

import pytest
import torch
import torch.fx.experimental._config  # noqa: F401  (backed_size_oblivious)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice.sparse import (
    JaggedTensor,
    KeyedJaggedTensor,
    from_torchrec,
    jt_is_equal,
    kjt_is_equal,
    to_torchrec,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- a per-row Python model: {key: [[ids of sample 0], [ids of sample 1], ...]} -------------------
@st.composite
def kjt_models(draw, max_keys=4, max_stride=5, max_len=4):
    n_keys = draw(st.integers(0, max_keys))
    stride = draw(st.integers(0, max_stride))
    keys = [f"f{i}" for i in draw(st.permutations(range(max_keys)))[:n_keys]]
    rows = {
        k: [draw(st.lists(st.integers(0, 99), max_size=max_len)) for _ in range(stride)] for k in keys
    }
    weighted = draw(st.booleans())
    lengths_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    use_offsets = draw(st.booleans())
    return keys, stride, rows, weighted, lengths_dtype, use_offsets


def build(model):
    keys, stride, rows, weighted, lengths_dtype, use_offsets = model
    flat = [x for k in keys for r in rows[k] for x in r]
    lengths = torch.tensor([len(r) for k in keys for r in rows[k]], dtype=lengths_dtype)
    values = torch.tensor(flat, dtype=torch.int64)
    weights = values.to(torch.float32) / 10 if weighted else None
    if use_offsets:
        offsets = torch.tensor([0] + torch.cumsum(lengths.long(), 0).tolist(), dtype=lengths_dtype)
        return KeyedJaggedTensor(keys, values, weights=weights, offsets=offsets, stride=stride)
    return KeyedJaggedTensor(keys, values, weights=weights, lengths=lengths, stride=stride)


def as_rows(kjt):
    return {k: [t.tolist() for t in jt.to_dense()] for k, jt in kjt.to_dict().items()}


def check_weights(kjt):
    if kjt.weights_or_none() is not None:
        assert torch.equal(kjt.weights(), kjt.values().to(torch.float32) / 10)


# ---- layout and round trips -----------------------------------------------------------------------
@SETTINGS
@given(kjt_models())
def test_lengths_offsets_round_trip(model):
    keys, stride, rows, _, lengths_dtype, _ = model
    kjt = build(model)
    expect_lengths = [len(r) for k in keys for r in rows[k]]
    assert kjt.stride() == stride
    assert kjt.lengths().tolist() == expect_lengths
    assert kjt.offsets().tolist() == [0] + torch.tensor(expect_lengths, dtype=torch.int64).cumsum(0).tolist()
    assert kjt.lengths().dtype == lengths_dtype and kjt.offsets().dtype == lengths_dtype
    # key-major layout: values of key i, sample b at offsets[i*B+b] : offsets[i*B+b+1]
    for i, k in enumerate(keys):
        for b in range(stride):
            o = kjt.offsets()
            assert kjt.values()[o[i * stride + b] : o[i * stride + b + 1]].tolist() == rows[k][b]
    assert kjt.length_per_key() == [sum(len(r) for r in rows[k]) for k in keys]
    opk = kjt.offset_per_key()
    assert opk[0] == 0 and opk[-1] == kjt.values().numel() and len(opk) == len(keys) + 1
    assert kjt.index_per_key() == {k: i for i, k in enumerate(keys)}


@SETTINGS
@given(kjt_models())
def test_to_dict_and_getitem(model):
    keys, stride, rows, weighted, lengths_dtype, _ = model
    kjt = build(model)
    assert as_rows(kjt) == rows
    for k in keys:
        jt = kjt[k]
        assert jt.num_rows() == stride
        assert [t.tolist() for t in jt.to_dense()] == rows[k]
        assert jt.offsets().tolist() == [0] + torch.tensor([len(r) for r in rows[k]], dtype=torch.int64).cumsum(0).tolist()
        assert jt.lengths().dtype == lengths_dtype
        if weighted:
            assert [w.tolist() for w in jt.to_dense_weights()] == [
                (torch.tensor(r, dtype=torch.float32) / 10).tolist() for r in rows[k]
            ]
        else:
            assert jt.weights_or_none() is None and jt.to_dense_weights() is None


@SETTINGS
@given(kjt_models(), st.integers(0, 5), st.sampled_from([0, -1]))
def test_padded_dense_round_trip(model, desired, pad):
    keys, stride, rows, weighted, _, _ = model
    kjt = build(model)
    for k in keys:
        jt = kjt[k]
        dense = jt.to_padded_dense(padding_value=pad)
        longest = max([len(r) for r in rows[k]], default=0)
        assert dense.shape == (stride, longest)
        for b, r in enumerate(rows[k]):
            assert dense[b].tolist() == r + [pad] * (longest - len(r))
        back = JaggedTensor.from_padded_dense(dense, jt.lengths(), jt.to_padded_dense_weights())
        assert jt_is_equal(back, JaggedTensor(jt.values(), lengths=jt.lengths(), weights=jt.weights_or_none()))
        # truncation / extra padding to a fixed length keeps each row's first entries
        fixed = jt.to_padded_dense(desired_length=desired, padding_value=pad)
        assert fixed.shape == (stride, desired)
        for b, r in enumerate(rows[k]):
            assert fixed[b].tolist() == (r + [pad] * desired)[:desired]
        if weighted:
            fw = jt.to_padded_dense_weights(desired_length=desired)
            for b, r in enumerate(rows[k]):
                assert fw[b].tolist() == ((torch.tensor(r, dtype=torch.float32) / 10).tolist() + [0.0] * desired)[:desired]


def test_jagged_tensor_2d_values_and_from_dense():
    rows = [torch.randn(2, 3), torch.randn(0, 3), torch.randn(4, 3)]
    w = [torch.rand(2), torch.rand(0), torch.rand(4)]
    jt = JaggedTensor.from_dense(rows, w)
    assert jt.lengths().tolist() == [2, 0, 4] and jt.values().shape == (6, 3)
    assert all(torch.equal(a, b) for a, b in zip(jt.to_dense(), rows))
    dense = jt.to_padded_dense(padding_value=-1.0)
    assert dense.shape == (3, 4, 3)
    assert torch.equal(dense[0, :2], rows[0]) and (dense[1] == -1).all() and (dense[0, 2:] == -1).all()
    back = JaggedTensor.from_padded_dense(dense, jt.lengths(), jt.to_padded_dense_weights())
    assert jt_is_equal(back, jt)
    assert jt_is_equal(JaggedTensor.from_dense_lengths(dense, jt.lengths()), JaggedTensor(jt.values(), lengths=jt.lengths()))


@SETTINGS
@given(kjt_models(), st.data())
def test_permute_and_inverse(model, data):
    keys, stride, rows, _, _, _ = model
    kjt = build(model)
    perm = data.draw(st.permutations(range(len(keys))))
    p = kjt.permute(perm)
    assert p.keys() == [keys[i] for i in perm] and p.stride() == stride
    assert as_rows(p) == {keys[i]: rows[keys[i]] for i in perm}
    check_weights(p)
    inverse = [0] * len(perm)
    for j, i in enumerate(perm):
        inverse[i] = j
    assert kjt_is_equal(p.permute(inverse), kjt)
    # subsets with repeats (TorchRec allows both)
    if keys:
        sub = data.draw(st.lists(st.integers(0, len(keys) - 1), max_size=6))
        s = kjt.permute(sub, indices_tensor=torch.tensor(sub, dtype=torch.int64))
        assert s.keys() == [keys[i] for i in sub]
        assert s.length_per_key() == [kjt.length_per_key()[i] for i in sub]
        for j, i in enumerate(sub):
            assert [t.tolist() for t in s._jt(j).to_dense()] == rows[keys[i]]
        check_weights(s)


@SETTINGS
@given(kjt_models(), st.data())
def test_split_then_concat(model, data):
    keys, stride, rows, _, _, _ = model
    kjt = build(model)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(keys)), max_size=3)))
    bounds = [0] + cuts + [len(keys)]
    segments = [b - a for a, b in zip(bounds, bounds[1:])]
    parts = kjt.split(segments)
    assert [len(p.keys()) for p in parts] == segments
    for part, a, b in zip(parts, bounds, bounds[1:]):
        assert part.keys() == keys[a:b] and part.stride() == stride
        assert as_rows(part) == {k: rows[k] for k in keys[a:b]}
        assert part.offsets()[0] == 0 and part.offset_per_key()[0] == 0
        check_weights(part)
    assert kjt_is_equal(KeyedJaggedTensor.concat(parts), kjt)


@SETTINGS
@given(kjt_models(), st.data())
def test_select_samples_matches_per_row_reference(model, data):
    keys, stride, rows, _, _, _ = model
    kjt = build(model)
    idx = data.draw(st.lists(st.integers(0, max(stride - 1, 0)), max_size=7)) if stride else []
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    out = kjt.select_samples(torch.tensor(idx, dtype=dtype))
    assert out.keys() == keys and out.stride() == len(idx)
    assert as_rows(out) == {k: [rows[k][b] for b in idx] for k in keys}
    check_weights(out)
    for k in keys:
        jt_out = kjt[k].select_samples(torch.tensor(idx, dtype=dtype))
        assert [t.tolist() for t in jt_out.to_dense()] == [rows[k][b] for b in idx]


def test_select_samples_out_of_range():
    kjt = KeyedJaggedTensor(["a"], torch.arange(3), lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"indices\[1\] = 2 is outside \[0, 2\)"):
        kjt.select_samples(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"indices\[0\] = -1"):
        kjt["a"].select_samples(torch.tensor([-1]))
    with pytest.raises(TypeError, match="indices must be a 1-D int32/int64"):
        kjt.select_samples(torch.tensor([0.0]))


def test_from_sync_constructors_and_jt_dict():
    lengths = torch.tensor([2, 0, 1, 1])
    a = KeyedJaggedTensor.from_lengths_sync(["x", "y"], torch.arange(4), lengths)
    assert a._length_per_key == [2, 2] and a._offset_per_key == [0, 2, 4]
    b = KeyedJaggedTensor.from_offsets_sync(["x", "y"], torch.arange(4), torch.tensor([0, 2, 2, 3, 4]))
    assert kjt_is_equal(a, b)
    c = KeyedJaggedTensor.from_jt_dict(a.to_dict())
    assert kjt_is_equal(a, c)
    with pytest.raises(ValueError, match="different numbers of rows"):
        KeyedJaggedTensor.from_jt_dict({"x": a["x"], "z": JaggedTensor(torch.arange(1), lengths=torch.tensor([1]))})


def test_empty():
    e = KeyedJaggedTensor.empty(is_weighted=True)
    assert e.keys() == [] and e.stride() == 0 and e.values().numel() == 0
    assert e.weights().numel() == 0 and e.offsets().tolist() == [0] and e.length_per_key() == []
    assert e.to_dict() == {}
    jt = JaggedTensor.empty(lengths_dtype=torch.int32)
    assert jt.num_rows() == 0 and jt.offsets().tolist() == [0] and jt.offsets().dtype == torch.int32
    assert jt.to_padded_dense().shape == (0, 0)
    # keys but zero samples
    z = KeyedJaggedTensor(["a", "b"], torch.empty(0, dtype=torch.int64), lengths=torch.empty(0, dtype=torch.int64))
    assert z.stride() == 0 and z.length_per_key() == [0, 0] and z["b"].to_padded_dense().shape == (0, 0)


def test_to_dataclass_and_pytree():
    @dataclasses.dataclass
    class MiniBatch:
        sparse: KeyedJaggedTensor

        def to(self, device, non_blocking=False):
            return MiniBatch(self.sparse.to(device, non_blocking=non_blocking))

    kjt = KeyedJaggedTensor(["a", "b"], torch.arange(3), weights=torch.rand(3), lengths=torch.tensor([1, 0, 2, 0]))
    moved = MiniBatch(kjt).to("cpu", non_blocking=True).sparse
    assert kjt_is_equal(moved, kjt) and moved.device() == torch.device("cpu")
    assert kjt_is_equal(kjt.cpu(), kjt) and jt_is_equal(kjt["b"].to(torch.device("cpu")), kjt["b"])
    leaves, spec = torch.utils._pytree.tree_flatten(kjt)
    assert kjt_is_equal(torch.utils._pytree.tree_unflatten(leaves, spec), kjt)
    jt = kjt["a"]
    leaves, spec = torch.utils._pytree.tree_flatten(jt)
    assert jt_is_equal(torch.utils._pytree.tree_unflatten(leaves, spec), jt)
    assert "KeyedJaggedTensor(keys=['a', 'b'], stride=2" in repr(kjt) and "JaggedTensor(" in repr(jt)
    big = KeyedJaggedTensor(["a"], torch.arange(100), lengths=torch.tensor([100]))
    assert "shape=[100]" in repr(big)


def test_pytree_keys_paths_and_treespec_serialization():
    kjt = KeyedJaggedTensor(["a", "b"], torch.arange(3), weights=torch.rand(3), lengths=torch.tensor([1, 0, 2, 0]))
    pytree = torch.utils._pytree
    paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(kjt)[0]]
    assert paths == [".values", ".weights", ".lengths", ".offsets"]
    assert [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(kjt["a"])[0]] == [
        ".values", ".lengths", ".offsets", ".weights"]
    unweighted = KeyedJaggedTensor(["a", "b"], torch.arange(3), lengths=torch.tensor([1, 0, 2, 0]))
    assert pytree.tree_leaves(unweighted["a"])[-1] is None  # no weights: a None leaf
    # The batch size is not in the spec (torch.export keeps specs static; the batch must stay dynamic).
    other = KeyedJaggedTensor(["a", "b"], torch.arange(5), lengths=torch.tensor([1, 0, 2, 0, 1, 1]))
    assert pytree.tree_structure(other) == pytree.tree_structure(unweighted)
    keys_differ = KeyedJaggedTensor(["a", "c"], torch.arange(3), lengths=torch.tensor([1, 0, 2, 0]))
    assert pytree.tree_structure(keys_differ) != pytree.tree_structure(unweighted)
    spec = pytree.tree_structure(kjt)
    assert pytree.treespec_loads(pytree.treespec_dumps(spec)) == spec
    rebuilt = pytree.tree_unflatten(pytree.tree_leaves(other), pytree.tree_structure(other))
    assert kjt_is_equal(rebuilt, other) and rebuilt.stride() == 3


def test_torch_export_takes_keyed_jagged_tensors_with_a_dynamic_batch():
    class PerKeyTotals(torch.nn.Module):
        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            B = kjt.stride()
            rows = torch.repeat_interleave(torch.arange(len(kjt.keys()) * B), kjt.lengths().long(),
                                           output_size=kjt.values().shape[0])
            sums = torch.zeros(len(kjt.keys()) * B).index_add_(0, rows, kjt.weights() * kjt.values().float())
            return torch.stack([sums[:B], sums[B:]], 1)  # [B, K]

    def make(B, seed):
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, 4, (2 * B,), generator=gen)
        n = int(lengths.sum())
        return KeyedJaggedTensor(["a", "b"], torch.randint(0, 9, (n,), generator=gen), weights=torch.rand(n, generator=gen),
                                 lengths=lengths)

    batch = torch.export.Dim("batch", min=1, max=1024)
    n = torch.export.Dim("n", min=0)
    example = make(6, 0)
    shapes = {"kjt": [{0: n}, {0: n}, {0: 2 * batch}, {0: 2 * batch + 1}]}
    # The stride is len(lengths) // K; without size-oblivious sizes export would guard that expression >= 2.
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(PerKeyTotals(), (example,), dynamic_shapes=shapes, strict=False)
    for B, seed in ((1, 1), (6, 2), (37, 3)):
        kjt = make(B, seed)
        torch.testing.assert_close(program.module()(kjt), PerKeyTotals()(kjt))


def test_pin_memory():
    kjt = KeyedJaggedTensor(["a"], torch.arange(3), weights=torch.rand(3), lengths=torch.tensor([1, 2]))
    accelerator = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    if not accelerator:
        with pytest.raises(RuntimeError):
            kjt.pin_memory()
        with pytest.raises(RuntimeError):
            kjt["a"].pin_memory()
        return
    pinned = kjt.pin_memory()
    assert pinned.values().is_pinned() and pinned.lengths().is_pinned() and pinned.weights().is_pinned()
    assert kjt_is_equal(pinned, kjt) and kjt["a"].pin_memory().values().is_pinned()


def test_compiled_accessors_have_no_graph_breaks():
    kjt = KeyedJaggedTensor(["a", "b"], torch.arange(5), lengths=torch.tensor([1, 2, 0, 2]), validate=False)

    @torch.compile(fullgraph=True, backend="eager")
    def f(k):
        return k.values().sum() + k.offsets()[-1] + k.lengths().view(len(k.keys()), k.stride()).sum(1)

    assert f(kjt).tolist() == [10 + 5 + 3, 10 + 5 + 2]


# ---- validation errors ----------------------------------------------------------------------------
V = torch.arange(5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(lengths=torch.tensor([1, -1, 2, 3])), ValueError, r"lengths\[1\] = -1 is negative \(key 'a', sample 1\)"),
        (dict(lengths=torch.tensor([1, 1, 2, 0])), ValueError, r"sum\(lengths\) = 4 does not match the number of values \(5\)"),
        (dict(lengths=torch.tensor([1, 1, 3])), ValueError, r"len\(lengths\) = 3 is not divisible by the number of keys \(2\)"),
        (dict(lengths=torch.tensor([1, 1, 3, 0]), stride=3), ValueError, r"does not equal number of keys \(2\) x stride \(3\)"),
        (dict(lengths=torch.tensor([1, 1, 3, 0]), stride=-2), ValueError, "stride must be >= 0"),
        (dict(lengths=torch.tensor([1.0, 1, 3, 0])), TypeError, "lengths must be int32 or int64, got torch.float32"),
        (dict(lengths=torch.tensor([[1, 1], [3, 0]])), ValueError, "lengths must be 1-D"),
        (dict(offsets=torch.tensor([1, 1, 2, 4, 5])), ValueError, r"offsets\[0\] must be 0, got 1"),
        (dict(offsets=torch.tensor([0, 3, 2, 4, 5])), ValueError, r"offsets decrease at position 2: offsets\[1\] = 3 > offsets\[2\] = 2 \(key 'a', sample 1\)"),
        (dict(offsets=torch.tensor([0, 1, 2, 4, 6])), ValueError, r"offsets\[-1\] = 6 does not match the number of values \(5\)"),
        (dict(offsets=torch.tensor([0, 1, 2, 4, 5], dtype=torch.int16)), TypeError, "offsets must be int32 or int64"),
        (dict(lengths=torch.tensor([1, 1, 2, 1]), offsets=torch.tensor([0, 1, 2, 3, 5])), ValueError, r"lengths and offsets disagree at key 'b', sample 0"),
        (dict(lengths=torch.tensor([1, 1, 2, 1]), offsets=torch.tensor([0, 1, 2, 5])), ValueError, r"len\(offsets\) must be len\(lengths\) \+ 1 = 5, got 4"),
        (dict(lengths=torch.tensor([1, 1, 2, 1]), weights=torch.rand(4)), ValueError, r"weights must have shape \[5\]"),
        (dict(lengths=torch.tensor([1, 1, 2, 1]), weights=torch.ones(5, dtype=torch.int64)), TypeError, "weights must be a floating-point"),
        (dict(), ValueError, "one of lengths or offsets is required"),
        (dict(lengths=torch.tensor([1, 1, 2, 1]), length_per_key=[2, 2]), ValueError, r"length_per_key = \[2, 2\] does not match"),
        (dict(lengths=torch.tensor([1, 1, 2, 1]), offset_per_key=[0, 2, 4]), ValueError, r"offset_per_key = \[0, 2, 4\] does not match"),
        (dict(lengths=torch.tensor([1, 1, 2, 1]), length_per_key=[2]), ValueError, "length_per_key must have 2 entries"),
    ],
)
def test_kjt_validation_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KeyedJaggedTensor(["a", "b"], V, **kwargs)


def test_kjt_key_and_value_errors():
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        KeyedJaggedTensor(["a", "a"], V, lengths=torch.tensor([1, 1, 2, 1]))
    with pytest.raises(TypeError, match="keys must be strings"):
        KeyedJaggedTensor(["a", 3], V, lengths=torch.tensor([1, 1, 2, 1]))
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        KeyedJaggedTensor(["a"], [1, 2], lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match="values must have at least 1 dimension"):
        KeyedJaggedTensor(["a"], torch.tensor(3), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="lengths is empty but values has 5 rows"):
        KeyedJaggedTensor([], V, lengths=torch.empty(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="lengths is on meta but values is on cpu"):
        KeyedJaggedTensor(["a"], V, lengths=torch.empty(1, dtype=torch.int64, device="meta"))
    kjt = KeyedJaggedTensor(["a", "b"], V, lengths=torch.tensor([1, 1, 2, 1]))
    with pytest.raises(KeyError, match="no key 'c'"):
        kjt["c"]
    with pytest.raises(ValueError, match="segments"):
        kjt.split([1])
    with pytest.raises(ValueError, match="index 2 is outside"):
        kjt.permute([0, 2])
    with pytest.raises(ValueError, match="has no weights"):
        kjt.weights()
    with pytest.raises(ValueError, match="same stride"):
        KeyedJaggedTensor.concat([kjt, KeyedJaggedTensor(["c"], V, lengths=torch.tensor([5]))])
    with pytest.raises(ValueError, match="key 'a' appears in more than one input"):
        KeyedJaggedTensor.concat([kjt, kjt])
    with pytest.raises(ValueError, match="all weighted or all unweighted"):
        KeyedJaggedTensor.concat([kjt, KeyedJaggedTensor(["c"], V[:2], weights=torch.rand(2), lengths=torch.tensor([1, 1]))])
    with pytest.raises(ValueError, match="at least one"):
        KeyedJaggedTensor.concat([])
    # validate=False skips the data checks (hot paths)
    KeyedJaggedTensor(["a", "b"], V, lengths=torch.tensor([1, -1, 2, 3]), validate=False)


def test_jt_validation_errors():
    with pytest.raises(ValueError, match=r"lengths\[2\] = -3 is negative \(row 2\)"):
        JaggedTensor(V, lengths=torch.tensor([4, 4, -3]))
    with pytest.raises(ValueError, match=r"offsets must have at least one element"):
        JaggedTensor(V, offsets=torch.empty(0, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"weights must have shape \[5\]"):
        JaggedTensor(V, lengths=torch.tensor([5]), weights=torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"lengths\[1\] = 4 is outside \[0, 3\]"):
        JaggedTensor.from_padded_dense(torch.zeros(2, 3), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"values must be \[R, L, \*D\] with R = len\(lengths\) = 3"):
        JaggedTensor.from_padded_dense(torch.zeros(2, 3), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 3\)"):
        JaggedTensor.from_padded_dense(torch.zeros(2, 3), torch.tensor([1, 1]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="desired_length must be >= 0"):
        JaggedTensor(V, lengths=torch.tensor([5])).to_padded_dense(desired_length=-1)
    with pytest.raises(ValueError, match="got 1 weight tensors for 2 rows"):
        JaggedTensor.from_dense([V, V], [torch.rand(5)])
    with pytest.raises(ValueError, match="empty list"):
        JaggedTensor.from_dense([])


# ---- TorchRec interop -----------------------------------------------------------------------------
def _torchrec_loads():
    if importlib.util.find_spec("torchrec") is None:
        return False
    try:
        import torchrec.sparse.jagged_tensor  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_torchrec_loads(), reason="torchrec is importable here; this tests the missing path")
def test_torchrec_missing_gives_clear_import_error():
    kjt = KeyedJaggedTensor(["a"], V, lengths=torch.tensor([5]))
    with pytest.raises(ImportError, match="need TorchRec"):
        to_torchrec(kjt)
    with pytest.raises(ImportError, match="need TorchRec"):
        from_torchrec(object())


def test_offset_per_key_or_none_only_without_a_sync():
    values, lengths = torch.tensor([1, 2, 3]), torch.tensor([1, 0, 2, 0])
    assert KeyedJaggedTensor(["a", "b"], values, lengths=lengths).offset_per_key_or_none() is None
    given = KeyedJaggedTensor(["a", "b"], values, lengths=lengths, length_per_key=[1, 2])
    assert given.offset_per_key_or_none() == [0, 1, 3]
    assert KeyedJaggedTensor(["a", "b"], values, lengths=lengths).sync().offset_per_key_or_none() == [0, 1, 3]
