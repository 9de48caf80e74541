"""lattice.nn.EmbeddingBagCollection: packing, shared tables, key order, fused optimizers, state_dict."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import lattice  # noqa: F401
from lattice.nn import EmbeddingBagCollection, EmbeddingTableConfig
from lattice.nn.embedding import NormalInit, UniformInit
from lattice.ops import use_backend
from lattice.sparse import KeyedJaggedTensor


def make_kjt(keys, num_rows, B=6, max_len=5, seed=0, weighted=False, values_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(keys) * B,), generator=g)
    values = torch.cat([torch.randint(0, num_rows[k // B], (int(n),), generator=g)
                        for k, n in enumerate(lengths.tolist())] + [torch.zeros(0, dtype=torch.int64)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values.to(values_dtype), lengths, weights=weights)


def expected_pooled(ebc, kjt, weighted=False):
    """Per feature F.embedding_bag on the module's own table views: {feature: [B, D]}."""
    out = {}
    for f in ebc.feature_names:
        table = ebc._table_of_feature[f]
        jt = kjt[f]
        psw = jt.weights() if weighted else None
        out[f] = F.embedding_bag(jt.values().long(), ebc.embedding_weight(table.name).float(),
                                 jt.offsets()[:-1].long(), mode=table.pooling, per_sample_weights=psw)
    return out


TABLES = [
    EmbeddingTableConfig("user", 50, 8, ["user_id", "friend_id"]),  # shared by two features
    EmbeddingTableConfig("item", 30, 8, ["item_id"], pooling="mean"),
    EmbeddingTableConfig("cat", 7, 8, ["category"], init=NormalInit(std=0.1)),
]
ROWS = {"user_id": 50, "friend_id": 50, "item_id": 30, "category": 7}


def kjt_for(keys, **kw):
    return make_kjt(keys, [ROWS[k] for k in keys], **kw)


def test_forward_matches_embedding_bag_any_key_order():
    ebc = EmbeddingBagCollection(TABLES)
    assert ebc.feature_names == ["user_id", "friend_id", "item_id", "category"]
    for keys in (ebc.feature_names, ["category", "item_id", "friend_id", "user_id"],
                 ["item_id", "extra", "user_id", "category", "friend_id"]):
        rows = dict(ROWS, extra=3)
        kjt = make_kjt(keys, [rows[k] for k in keys], seed=len(keys))
        out = ebc(kjt)
        assert out.shape == (6, 4, 8)
        exp = expected_pooled(ebc, kjt)
        for i, f in enumerate(ebc.feature_names):
            torch.testing.assert_close(out[:, i], exp[f], atol=1e-6, rtol=1e-5)


def test_shared_table_shares_rows():
    ebc = EmbeddingBagCollection([EmbeddingTableConfig("t", 5, 4, ["a", "b"])])
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([3, 3]), torch.tensor([1, 1]))
    out = ebc(kjt)
    torch.testing.assert_close(out[0, 0], out[0, 1])
    assert ebc.weights["d4_sum"].shape == (5, 4)  # stored once


def test_int32_values_and_missing_feature():
    ebc = EmbeddingBagCollection(TABLES)
    kjt = kjt_for(ebc.feature_names, values_dtype=torch.int32)
    exp = expected_pooled(ebc, kjt)
    torch.testing.assert_close(ebc(kjt)[:, 2], exp["item_id"])
    with pytest.raises(KeyError, match="lacks features"):
        ebc(kjt_for(["user_id", "item_id"]))


def test_mixed_dims_forward_dict():
    tables = [EmbeddingTableConfig("a", 10, 4), EmbeddingTableConfig("b", 12, 16, ["b1", "b2"]),
              EmbeddingTableConfig("c", 9, 4, pooling="mean")]
    ebc = EmbeddingBagCollection(tables)
    kjt = make_kjt(["b2", "c", "a", "b1"], [12, 9, 10, 12])
    with pytest.raises(ValueError, match="use forward_dict"):
        ebc(kjt)
    out = ebc.forward_dict(kjt)
    assert list(out) == ["a", "b1", "b2", "c"]
    exp = expected_pooled(ebc, kjt)
    for f in out:
        torch.testing.assert_close(out[f], exp[f], atol=1e-6, rtol=1e-5)


def test_same_dim_different_pooling_keeps_feature_order():
    tables = [EmbeddingTableConfig("a", 10, 4, pooling="mean"), EmbeddingTableConfig("b", 12, 4),
              EmbeddingTableConfig("c", 9, 4, pooling="mean")]
    ebc = EmbeddingBagCollection(tables)
    kjt = make_kjt(["a", "b", "c"], [10, 12, 9])
    out = ebc(kjt)
    exp = expected_pooled(ebc, kjt)
    for i, f in enumerate(["a", "b", "c"]):
        torch.testing.assert_close(out[:, i], exp[f], atol=1e-6, rtol=1e-5)


def test_weighted():
    tables = [EmbeddingTableConfig("a", 10, 4), EmbeddingTableConfig("b", 12, 4)]
    ebc = EmbeddingBagCollection(tables, is_weighted=True)
    kjt = make_kjt(["a", "b"], [10, 12], weighted=True)
    exp = expected_pooled(ebc, kjt, weighted=True)
    torch.testing.assert_close(ebc(kjt)[:, 1], exp["b"], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="is_weighted needs sum pooling"):
        EmbeddingBagCollection([EmbeddingTableConfig("a", 10, 4, pooling="mean")], is_weighted=True)


def test_init_options():
    ebc = EmbeddingBagCollection([EmbeddingTableConfig("a", 10000, 4, init=UniformInit(bound=0.5)),
                                  EmbeddingTableConfig("b", 10000, 4, init=NormalInit(std=2.0))])
    a, b = ebc.embedding_weight("a"), ebc.embedding_weight("b")
    assert a.abs().max() <= 0.5 and a.abs().max() > 0.45
    assert 1.8 < b.std() < 2.2
    default = EmbeddingBagCollection([EmbeddingTableConfig("c", 100, 4)]).embedding_weight("c")
    assert default.abs().max() <= 0.1  # sqrt(1 / 100)


def test_config_validation():
    with pytest.raises(ValueError, match="pooling must be one of"):
        EmbeddingTableConfig("a", 10, 4, pooling="max")
    with pytest.raises(ValueError, match="served by two tables"):
        EmbeddingBagCollection([EmbeddingTableConfig("a", 10, 4, ["f"]), EmbeddingTableConfig("b", 10, 4, ["f"])])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        EmbeddingBagCollection(TABLES, fused_optimizer="adam")


def test_sparse_gradients_with_torch_optimizer():
    ebc = EmbeddingBagCollection(TABLES)
    kjt = kjt_for(ebc.feature_names)
    opt = torch.optim.SGD(ebc.parameters(), lr=0.5)
    before = {k: v.detach().clone() for k, v in ebc.weights.items()}
    ebc(kjt).square().sum().backward()
    assert all(p.grad.layout == torch.sparse_coo for p in ebc.parameters())
    expected = {k: before[k] - 0.5 * ebc.weights[k].grad.to_dense() for k in before}
    opt.step()
    for k in before:
        torch.testing.assert_close(ebc.weights[k].detach(), expected[k])


def reference_fused_step(ebc, kjt, grad, lr, eps, wd, optimizer):
    """A copy of the module stepped by a dense autograd gradient and the update written in Python."""
    ref = copy.deepcopy(ebc)
    ref.fused_optimizer = None
    for p in ref.weights.values():
        p.requires_grad_(True)
    (ref(kjt) * grad).sum().backward()
    with torch.no_grad():
        for key, p in ref.weights.items():
            g = p.grad.to_dense()
            touched = g.abs().sum(1) > 0
            gg = g + wd * p
            if optimizer == "sgd":
                p[touched] -= lr * gg[touched]
            else:
                state = getattr(ref.optimizer_state, key)
                state[touched] += (gg[touched] ** 2).mean(1)
                p[touched] -= (lr / (state[touched].sqrt() + eps)).unsqueeze(1) * gg[touched]
    return ref


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_fused_step_matches_python(optimizer):
    ebc = EmbeddingBagCollection(TABLES, fused_optimizer=optimizer, lr=0.1, eps=1e-6, weight_decay=0.01)
    assert not any(p.requires_grad for p in ebc.parameters())
    for step in range(3):
        kjt = kjt_for(ebc.feature_names, seed=step)
        grad = torch.randn(6, 4, 8)
        ref = reference_fused_step(ebc, kjt, grad, 0.1, 1e-6, 0.01, optimizer)
        (ebc(kjt) * grad).sum().backward()
        for key in ref.weights:
            torch.testing.assert_close(ebc.weights[key], ref.weights[key].detach(), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(getattr(ebc.optimizer_state, key), getattr(ref.optimizer_state, key))


def test_fused_eval_mode_does_not_update():
    ebc = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad").eval()
    before = copy.deepcopy(ebc.state_dict())
    out = ebc(kjt_for(ebc.feature_names))
    assert not out.requires_grad
    for k, v in ebc.state_dict().items():
        assert torch.equal(v, before[k])


def test_bf16_storage():
    ebc = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad", dtype=torch.bfloat16)
    kjt = kjt_for(ebc.feature_names)
    out = ebc(kjt)
    assert out.dtype == torch.bfloat16
    exp = expected_pooled(ebc, kjt)
    torch.testing.assert_close(out[:, 0].float(), exp["user_id"], atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert ebc.optimizer_state.d8_sum.abs().sum() > 0


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad", lr=0.05)
    batches = [kjt_for(ebc.feature_names, seed=s) for s in range(4)]
    for kjt in batches[:2]:
        ebc(kjt).square().sum().backward()
    assert "optimizer_state.d8_sum" in ebc.state_dict()
    buf = io.BytesIO()
    torch.save(ebc.state_dict(), buf)
    buf.seek(0)
    resumed = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad", lr=0.05)
    resumed.load_state_dict(torch.load(buf))
    for k, v in ebc.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k])
    for kjt in batches[2:]:
        ebc(kjt).square().sum().backward()
        resumed(kjt).square().sum().backward()
    for k, v in ebc.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_reference_backend_same_outputs_and_updates():
    kjt = kjt_for(["user_id", "friend_id", "item_id", "category"])
    a = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad")
    b = copy.deepcopy(a)
    out_a = a(kjt)
    with use_backend("reference"):
        out_b = b(kjt)
        torch.testing.assert_close(out_a, out_b)
        out_b.square().sum().backward()
    out_a.square().sum().backward()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k])


def test_compiled_module_with_fused_optimizer():
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad", lr=0.05)
    eager = copy.deepcopy(ebc)
    head = torch.nn.Linear(8, 1)

    def step(m, kjt):
        return head(m(kjt)).square().mean()

    compiled = torch.compile(step)
    for s in range(2):
        kjt = kjt_for(ebc.feature_names, seed=s)
        compiled(ebc, kjt).backward()
        step(eager, kjt).backward()
    for k, v in ebc.state_dict().items():
        torch.testing.assert_close(v, eager.state_dict()[k])


def test_set_learning_rate():
    ebc = EmbeddingBagCollection(TABLES, fused_optimizer="sgd", lr=0.1)
    ebc.set_learning_rate(0.0)
    before = copy.deepcopy(ebc.state_dict())
    ebc(kjt_for(ebc.feature_names)).sum().backward()
    for k, v in ebc.state_dict().items():
        assert torch.equal(v, before[k])
