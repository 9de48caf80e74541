"""lattice.serve: the flat inference module equals each network's own serving output, and its exported
program (torch.export, dynamic batch and jagged lengths) equals the eager module within 1e-5 for every network
class, an ESMM network and a distillation student, at batch 1, 7 and 513 with empty bags, empty sequences and
absent features. (The AOTInductor package is tested in test_serve_package.py.)"""
import dataclasses
import functools

import pytest
import torch

from _models import SMALL_NETWORK_ARGS, make_schema, random_batch
from lattice.distill import DistillationModule, TeacherTokenNetwork
from lattice.models import LatticeNetwork, LogisticRegression, SharedBottom
from lattice.serve.export import export_program
from lattice.serve.inference import InferenceModule
from lattice.serve.inputs import flat_inputs, random_inputs
from lattice.serve.tables import ServingEmbeddingBagCollection, table_bytes
from lattice.sparse import KeyedJaggedTensor

SMALL = {**SMALL_NETWORK_ARGS, LogisticRegression: dict(dim=8)}


def _perturb(model):
    """Move every weight off its initial value (heads start near zero: differences would hide)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _network(cls, schema, **extra):
    torch.manual_seed(0)
    return _perturb(cls(schema, **{**SMALL[cls], **extra}))


def _student(schema, teacher_token=False):
    torch.manual_seed(0)
    if teacher_token:
        network = TeacherTokenNetwork(schema, "lattice.models.LatticeNetwork", SMALL[LatticeNetwork])
        module = DistillationModule(network, teacher_embedding_dim=12, adapter=True)
    else:
        # the shipped student's shape (configs/student.yaml): a SharedBottom with history-match tokens
        network = SharedBottom(schema, **SMALL[SharedBottom], history_match=True)
        module = DistillationModule(network, distillation="aux_head", adapter=True, aux_input="head_hidden",
                                    aux_hidden_dims=[])
    return _perturb(module)


def _models():
    schema = make_schema()
    yield from ((cls.__name__, lambda cls=cls: _network(cls, schema)) for cls in SMALL)
    yield "LatticeNetwork_esmm_wide", lambda: _network(LatticeNetwork, schema, task_parents={"conversion": "click"},
                                                       wide=True, wide_dim=4)
    yield "student", lambda: _student(schema)
    yield "student_ktap", lambda: _student(schema, teacher_token=True)


MODELS = dict(_models())


@functools.lru_cache(maxsize=None)
def _exported(name):
    """``(model, inference_module, exported_program)``, exported once per test session."""
    model = MODELS[name]()
    return (model, *export_program(model))


def _expected(model, batch):
    """The model's own serving output on a Batch: sigmoid of the serving logits for binary tasks."""
    with torch.no_grad():
        if isinstance(model, DistillationModule):
            logits = model.serving_model()(batch)
        else:
            logits = model(batch).logits
    binary = torch.tensor([t.kind == "binary" for t in batch_schema(model).tasks])
    return torch.where(binary, torch.sigmoid(logits), logits)


def batch_schema(model):
    return model.network.schema if isinstance(model, DistillationModule) else model.schema


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_program_equals_eager(name):
    model, module, program = _exported(name)
    assert not module.training and all(not p.requires_grad for p in module.parameters())
    # the flat interface scores a Batch as the network itself does (probabilities from the serving heads), to the
    # fp32 tolerance of the export contract (1e-5): the two paths round differently (InterFormer reaches 1.2e-6).
    schema = batch_schema(model)
    batch = random_batch(schema, 9, seed=1)
    if module.has_teacher_token:
        batch.teacher_embedding = torch.randn(9, 12)
        batch.teacher_mask = torch.arange(9) % 3 != 0
    with torch.no_grad():
        torch.testing.assert_close(module(*flat_inputs(batch, schema, module.teacher_embedding_dim)),
                                   _expected(model, batch),
                                   rtol=0, atol=1e-5)
    exported = program.module()
    for B, seed in ((1, 0), (7, 1), (513, 2)):
        x = random_inputs(schema, B, seed=seed, teacher_embedding_dim=module.teacher_embedding_dim)
        sparse_lengths = x[3].diff()
        assert B == 1 or ((sparse_lengths == 0).any() and (x[6].diff() == 0).any() and not x[4].all())
        with torch.no_grad():
            eager, got = module(*x), exported(*x)
        assert got.shape == (B, len(schema.tasks)) and torch.isfinite(got).all()
        torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_all_bags_and_sequences_empty_and_every_feature_absent():
    schema = make_schema()
    _, module, program = _exported("LatticeNetwork")
    x = list(random_inputs(schema, 5, seed=3))
    x[1] = torch.zeros_like(x[1])  # dense_mask
    x[4] = torch.zeros_like(x[4])  # sparse_mask
    x[2], x[3] = x[2][:0], torch.zeros_like(x[3])  # no sparse ids
    x[5], x[6], x[7] = x[5][:0], torch.zeros_like(x[6]), x[7][:0]  # no events
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*x), module(*x), rtol=0, atol=1e-5)


def test_inference_module_freezes_tables_and_leaves_the_model_alone():
    model = MODELS["student"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = InferenceModule(model)
    served = [m for m in module.modules() if isinstance(m, ServingEmbeddingBagCollection)]
    assert served and all(m.fused_optimizer is None for m in served)
    assert not any(hasattr(m, "optimizer_state") for m in served)
    trained = model.network.embedding_collections()
    assert table_bytes(module) == sum(w.numel() * 4 for c in trained for w in c.weights.values())
    module.train()
    assert not module.training  # a served model has no training mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="no optimizer"):
        served[0].set_fused_optimizer("sgd")


def test_inference_module_refuses_what_it_cannot_serve():
    with pytest.raises(TypeError, match="cannot serve a Linear"):
        InferenceModule(torch.nn.Linear(2, 2))


def test_parallel_sequence_features_export_with_equal_lengths():
    """Sequence features sharing a timestamps column are attributes of the same events (MaskNet merge): they
    come as one event list, values ``[Fq, N]`` and timestamps ``[N]``, with ``N`` dynamic (0 included)."""
    base = make_schema()
    features = [dataclasses.replace(f, timestamps_column="events_ts") if f.kind == "sequence" else f
                for f in base.features]
    schema = base.replace(features=features)
    torch.manual_seed(0)
    model = _perturb(LatticeNetwork(schema, **SMALL[LatticeNetwork]))
    assert model.processor.sequence.merge == "masknet"
    module, program = export_program(model)
    for B, seed in ((1, 0), (7, 1), (513, 2)):
        x = random_inputs(schema, B, seed=seed)
        assert x[5].shape == (2, x[7].shape[0])
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*x), module(*x), rtol=0, atol=1e-5)
    x = list(random_inputs(schema, 5, seed=3))
    x[5], x[6], x[7] = x[5][:, :0], torch.zeros_like(x[6]), x[7][:0]  # every sequence empty
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*x), module(*x), rtol=0, atol=1e-5)
    batch = random_batch(schema, 6, seed=4)  # equal lengths per row, as the data layer gives parallel features
    lengths = batch.sequences.lengths().view(2, 6)
    batch.sequences = KeyedJaggedTensor(batch.sequences.keys(), torch.cat([batch.sequences.values()[:int(
        lengths[0].sum())]] * 2), lengths=lengths[0].repeat(2))
    batch.sequence_timestamps = KeyedJaggedTensor(batch.sequences.keys(), torch.arange(
        int(lengths[0].sum())).repeat(2), lengths=lengths[0].repeat(2))
    x = flat_inputs(batch, schema)
    assert x[5].shape[0] == 2 and torch.equal(x[5][0], x[5][1])
    with torch.no_grad():
        torch.testing.assert_close(module(*x), _expected(model, batch), rtol=0, atol=1e-6)
