"""Every network: shapes and dtypes, gradients to every parameter, per-domain untying, Zipper routing,
analytic FLOPs and parameter counts."""
import pytest
import torch

from _models import SMALL_NETWORK_ARGS, make_schema, random_batch
from lattice.models import InterFormer, LatticeModel, LatticeNetwork, MMoE, ModelOutput, Wukong
from lattice.nn.heads import MultiTaskHeads
from lattice.nn.linear import DomainLinear
from lattice.nn.wide import WidePath

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = SMALL_NETWORK_ARGS
NETWORKS = list(SMALL)
ids = [c.__name__ for c in NETWORKS]


def _values(grad):
    """The stored values of a gradient (embedding tables get sparse COO gradients)."""
    return grad.coalesce().values() if grad.is_sparse else grad


def build(cls, schema, **extra):
    torch.manual_seed(0)
    return cls(schema, **{**SMALL[cls], **extra})


def _full_coverage_batch(schema, batch_size=24, seed=0):
    batch = random_batch(schema, batch_size, seed=seed)
    for t, task in enumerate(schema.tasks):
        if task.windows:
            batch.label_window[:, t] = torch.arange(batch_size) % len(task.windows)
    return batch


@pytest.mark.parametrize("cls", NETWORKS, ids=ids)
@pytest.mark.parametrize("variant", ["full", "no_sequences", "single_domain"])
def test_forward_shapes_dtypes(cls, variant):
    if variant == "full":
        schema = make_schema()
    elif variant == "no_sequences":
        schema = make_schema(num_sequences=0, zipper=False)
    else:
        schema = make_schema(num_domains=1, num_dense=0)
    model = build(cls, schema)
    assert isinstance(model, LatticeModel)
    batch = random_batch(schema, 10)
    out = model(batch)
    T = len(schema.tasks)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (10, T) and out.logits.dtype == torch.float32
    assert out.train_logits.shape == (10, T)
    assert out.representation is not None and out.representation.shape[0] == 10
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.train_logits).all()
    assert set(out.window_logits) == {t.name for t in schema.tasks if t.windows}
    assert model.task_names == schema.task_names
    # an all-empty-sequence batch works too
    batch.sequences = type(batch.sequences)(
        batch.sequences.keys(), batch.sequences.values()[:0], lengths=torch.zeros_like(batch.sequences.lengths())
    )
    batch.sequence_timestamps = None
    assert torch.isfinite(model(batch).logits).all()


@pytest.mark.parametrize("cls", NETWORKS, ids=ids)
def test_gradient_reaches_every_parameter(cls):
    schema = make_schema()
    extra = {}
    if cls in (LatticeNetwork, InterFormer, Wukong):
        extra = dict(untied_layers=[0], untie_heads=True)
    model = build(cls, schema, **extra)
    batch = _full_coverage_batch(schema)
    out = model(batch)
    weights = torch.randn_like(out.train_logits)
    (out.train_logits * weights).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"{cls.__name__}: no gradient for {no_grad}"
    zero = [n for n, p in model.named_parameters() if _values(p.grad).abs().sum() == 0]
    assert not zero, f"{cls.__name__}: zero gradient for {zero}"
    assert all(torch.isfinite(_values(p.grad)).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [LatticeNetwork, InterFormer, Wukong], ids=["LatticeNetwork", "InterFormer", "Wukong"])
def test_per_domain_untying_routes_by_domain(cls):
    schema = make_schema()
    model = build(cls, schema, untied_layers=[0, 1], untie_heads=True).eval()
    batch = random_batch(schema, 12)
    with torch.no_grad():
        before = model(batch).logits
        changed = 0
        for m in model.modules():
            if isinstance(m, DomainLinear) and m.untied:
                m.weight[2].normal_()
                changed += 1
            if isinstance(m, MultiTaskHeads) and m.num_groups > 1:
                for w in m.weights:
                    w[2].normal_()
        assert changed > 0
        after = model(batch).logits
    other = batch.domain != 2
    assert other.any() and (~other).any()
    torch.testing.assert_close(after[other], before[other])
    assert not torch.allclose(after[~other], before[~other])


@pytest.mark.parametrize("cls", [LatticeNetwork, MMoE], ids=["LatticeNetwork", "MMoE"])
def test_zipper_loss_reaches_only_assigned_window_head(cls):
    schema = make_schema()
    model = build(cls, schema)
    batch = random_batch(schema, 6)
    t = schema.task_names.index("conversion")
    batch.label_window[:, t] = 2
    batch.label_window[0, t] = 0
    out = model(batch)
    torch.testing.assert_close(out.train_logits[0, t], out.window_logits["conversion"][0, 0])
    torch.testing.assert_close(out.train_logits[1:, t], out.window_logits["conversion"][1:, 2])
    # serving = longest window (7d = index 2)
    torch.testing.assert_close(out.logits[:, t], out.window_logits["conversion"][:, 2])
    out.train_logits[0, t].backward()
    head_grad = model.heads.weights[-1].grad[0].abs().sum(dim=(1, 2))  # per head
    offset = int(model.heads.head_offset[t])
    assert head_grad[offset] > 0
    others = [h for h in range(model.heads.num_heads) if h != offset]
    assert torch.all(head_grad[others] == 0)


@pytest.mark.parametrize("cls", NETWORKS, ids=ids)
def test_flops_and_parameter_counts(cls):
    schema = make_schema()
    model = build(cls, schema)
    flops = model.flops_per_sample()
    assert flops > 0
    if model.processor.has_sequence and cls in (LatticeNetwork, InterFormer):
        assert model.flops_per_sample(sequence_length=64) > model.flops_per_sample(sequence_length=8)
    total = model.num_parameters()
    assert total == sum(p.numel() for p in model.parameters())
    assert 0 < model.num_parameters(include_embeddings=False) < total
    assert len(model.embedding_collections()) >= 1


def test_lattice_network_options():
    schema = make_schema()
    model = build(LatticeNetwork, schema, dot_tokens=2, dcn_tokens=2, causal=True, exchange=False, ecs=False,
                  num_layers=3, domain_groups=[0, 1, 1], untied_layers=[2])
    out = model(random_batch(schema, 7))
    assert out.logits.shape == (7, 3)
    with pytest.raises(ValueError, match="untied_layers"):
        build(LatticeNetwork, schema, untied_layers=[5])


@pytest.mark.parametrize("cls", NETWORKS, ids=ids)
def test_wide_path_adds_a_logistic_regression_to_every_head(cls):
    schema = make_schema()
    deep = build(cls, schema, untie_heads=True)
    model = build(cls, schema, untie_heads=True, wide=True, wide_dim=8)
    assert isinstance(model.wide, WidePath)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in deep.state_dict().items()), "the deep part starts the same"
    assert any(k.startswith("wide.") for k in state)
    batch = _full_coverage_batch(schema)
    out, ref, linear = model(batch), deep(batch), model.wide(batch)
    torch.testing.assert_close(out.logits, ref.logits + linear.logits)
    torch.testing.assert_close(out.train_logits, ref.train_logits + linear.train_logits)
    assert set(out.window_logits) == set(ref.window_logits) and out.window_logits
    for name, logits in out.window_logits.items():
        torch.testing.assert_close(logits, ref.window_logits[name] + linear.window_logits[name])
    torch.testing.assert_close(out.representation, ref.representation)
    assert model.flops_per_sample() == pytest.approx(deep.flops_per_sample() + model.wide.flops())
    assert len(model.embedding_collections()) > len(deep.embedding_collections())  # the fused optimizer finds its tables
    (out.train_logits * torch.randn_like(out.train_logits)).sum().backward()
    silent = [n for n, p in model.wide.named_parameters() if p.grad is None or _values(p.grad).abs().sum() == 0]
    assert not silent, f"no gradient for the wide path's {silent}"
    with pytest.raises(ValueError, match="wide_dim"):
        build(cls, schema, wide=True, wide_dim=0)


@pytest.mark.parametrize("cls", NETWORKS, ids=ids)
def test_standardize_dense_reaches_the_deep_and_the_wide_processor(cls):
    schema = make_schema()
    model = build(cls, schema, standardize_dense=True, wide=True, wide_dim=4)
    batch = random_batch(schema, 16)
    model(batch)
    present = batch.dense_mask.sum(0)
    for processor in (model.processor, model.wide.processor):
        assert torch.equal(processor.dense.standardize.count, present.to(torch.int64))
    assert "processor.dense.standardize.mean" in model.state_dict()
    model.eval()
    before = model.processor.dense.standardize.count.clone()
    model(batch)
    assert torch.equal(model.processor.dense.standardize.count, before)
    assert build(cls, schema).processor.dense.standardize is None  # off by default


@pytest.mark.parametrize("cls", NETWORKS, ids=ids)
def test_bf16_autocast_forward_backward(cls):
    schema = make_schema()
    model = build(cls, schema)
    batch = random_batch(schema, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out.logits.shape == (8, len(schema.tasks))
    assert torch.isfinite(out.logits.float()).all()
    out.train_logits.float().sum().backward()
    assert all(p.grad is None or torch.isfinite(_values(p.grad)).all() for p in model.parameters())


@pytest.mark.parametrize("cls", NETWORKS, ids=ids)
def test_extra_tokens_reach_the_trunk_and_the_output_carries_the_head_input(cls):
    """num_extra_tokens: the trunk reads k more tokens, given to forward or by an extra_tokens override;
    the output carries what the heads read and their hidden activation."""
    schema = make_schema()
    batch = random_batch(schema, 6)
    plain = build(cls, schema)
    model = build(cls, schema, num_extra_tokens=2)
    assert model.num_tokens == plain.num_tokens + 2 == model.processor.num_tokens + 2
    tokens = torch.randn(6, 2, model.dim)
    out = model(batch, extra_tokens=tokens)
    moved = model(batch, extra_tokens=tokens + 1.0)
    assert not torch.allclose(out.logits, moved.logits), "the extra tokens reach the logits"
    assert out.head_input.shape[0] == 6 and out.head_input.shape[-1] == model.heads.in_dim
    torch.testing.assert_close(model.heads(out.head_input, batch.label_window, batch.domain).logits, out.logits)
    assert out.head_hidden.shape == (6, len(schema.tasks), 16)
    with pytest.raises(ValueError, match="num_extra_tokens=2 but got none"):
        model(batch)

    class WithTokens(cls):
        def extra_tokens(self, features, batch):
            return tokens

    torch.manual_seed(0)
    sub = WithTokens(schema, **SMALL[cls], num_extra_tokens=2)
    torch.testing.assert_close(sub(batch).logits, out.logits)


def test_wide_path_is_a_per_domain_logistic_regression():
    """WidePath and LogisticRegression(untie_heads=True) draw the same parameters and give the same logits."""
    from lattice.models import LogisticRegression

    schema = make_schema()
    batch = _full_coverage_batch(schema)
    torch.manual_seed(0)
    wide = WidePath(schema, dim=4)
    torch.manual_seed(0)
    lr = LogisticRegression(schema, dim=4, untie_heads=True)
    assert {k: v.shape for k, v in wide.state_dict().items()} == {k: v.shape for k, v in lr.state_dict().items()}
    assert all(torch.equal(v, lr.state_dict()[k]) for k, v in wide.state_dict().items())
    out, ref = wide(batch), lr(batch)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.train_logits, ref.train_logits)
    assert wide.flops() == pytest.approx(lr.flops_per_sample())
    with pytest.raises(ValueError, match="WidePath dim"):
        WidePath(schema, dim=0)
