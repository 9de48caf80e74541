"""``LatticeModule(compile=...)``: option checking, training steps that match eager with the fused embedding
optimizer inside the compiled graph, checkpoints interchangeable between compile on and off, and no
recompiles for new batch sizes and sequence lengths.

Compiled with ``aot_eager`` (Dynamo capture + AOTAutograd + the ops' fake kernels): the capture under test is
the same as inductor's, minutes faster on 2 busy cores.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from _models import make_schema, random_batch
from lattice.models import LatticeNetwork
from lattice.train import LatticeModule
from lattice.train.compile import compile_network, compile_options, mark_batch_dynamic

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = dict(dim=16, num_layers=1, num_heads=2, fm_tokens=4, lcb_tokens=4, fm_hidden_dims=[16], representation_dim=16,
            head_hidden_dims=[16])
AOT = {"backend": "aot_eager", "fullgraph": True}


def _module(compile, seed=0):
    torch.manual_seed(seed)
    module = LatticeModule(LatticeNetwork(make_schema(), **SIZE), compile=compile, sparse_lr=0.1)
    module.setup("fit")
    return module


def _train(module, batches):
    """Steps of loss -> backward -> dense AdamW (the fused row-wise Adagrad runs inside backward)."""
    optimizer = module.configure_optimizers()
    losses = []
    for batch in batches:
        loss, _ = module._loss(module(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("bad, message", [
    ("yes", "compile must be true, false or a dict"),
    ({"backend": "inductor", "fullgrph": True}, r"unknown torch.compile option\(s\) \['fullgrph'\]"),
    ({"mode": "max-autotune", "options": {}}, "either 'mode' or 'options'"),
])
def test_bad_compile_option_names_the_argument(bad, message):
    with pytest.raises(ValueError, match=message):
        compile_options(bad)
    with pytest.raises(ValueError, match=message):
        LatticeModule(LatticeNetwork(make_schema(), **SIZE), compile=bad)


def test_compile_options_pass_through():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"backend": "aot_eager", "dynamic": True}) == {"backend": "aot_eager", "dynamic": True}


def test_compiled_training_matches_eager_with_fused_optimizer_and_keeps_state_dict_keys():
    torch._dynamo.reset()
    schema = make_schema()
    batches = [random_batch(schema, b, seed=s) for s, b in enumerate([12, 9, 16])]
    eager, compiled = _module(False), _module(AOT)
    assert compiled.network._compiled_call_impl is not None and eager.network._compiled_call_impl is None
    assert list(eager.state_dict()) == list(compiled.state_dict())
    torch.testing.assert_close(_train(compiled, batches), _train(eager, batches), rtol=1e-4, atol=1e-5)
    # the fused row-wise Adagrad ran once per backward in the compiled graph: same tables, same state
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    touched = [n for n in eager.state_dict() if "optimizer_state" in n]
    assert touched and all(bool(compiled.state_dict()[n].abs().sum() > 0) for n in touched)


@pytest.mark.parametrize("save_compiled", [True, False], ids=["compiled_to_eager", "eager_to_compiled"])
def test_checkpoint_moves_between_compile_on_and_off(tmp_path, save_compiled):
    torch._dynamo.reset()
    schema = make_schema()
    source = _module(AOT if save_compiled else False, seed=1)
    _train(source, [random_batch(schema, 10, seed=5)])
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)

    target = _module(False if save_compiled else AOT, seed=2)
    target.load_state_dict(torch.load(path, weights_only=True), strict=True)
    source.eval(), target.eval()
    batch = random_batch(schema, 7, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(target(batch).logits, source(batch).logits, rtol=1e-4, atol=1e-5)


def test_new_batch_sizes_and_sequence_lengths_do_not_recompile():
    torch._dynamo.reset()
    schema = make_schema()
    torch.manual_seed(0)
    network = LatticeNetwork(schema, **SIZE)
    counter = CompileCounterWithBackend("aot_eager")
    network.compile(backend=counter, fullgraph=True)
    # random_batch draws new jagged lengths (empty bags and sequences included) for every seed
    sizes = [12, 12, 20, 7, 33, 16, 5, 24]
    for seed, size in enumerate(sizes):
        batch = random_batch(schema, size, seed=seed)
        mark_batch_dynamic(batch)
        network(batch).train_logits.sum().backward()
        if seed == 1:
            warm = counter.frame_count
    assert warm <= 2
    assert counter.frame_count - warm <= 2, f"{counter.frame_count - warm} recompiles over {sizes[2:]}"


def test_loader_batches_with_host_sizes_compile_one_graph():
    """The data loader's KeyedJaggedTensors carry their batch size and per-key value counts as Python ints;
    compile_network keeps Dynamo from specializing on them, so a new batch's counts and the epoch's short last
    batch reuse the first graph (each recompile costs minutes of inductor compile)."""
    torch._dynamo.reset()
    schema = make_schema()
    torch.manual_seed(0)
    network = LatticeNetwork(schema, **SIZE)
    counter = CompileCounterWithBackend("aot_eager")
    compile_network(network, {"backend": counter, "fullgraph": True})
    for seed, size in enumerate([16, 16, 9, 16]):
        batch = random_batch(schema, size, seed=seed)
        for kjt in (batch.sparse, batch.sequences, batch.sequence_timestamps):
            if kjt is not None:
                kjt.sync()  # as the loader hands them over: length_per_key / offset_per_key cached
        mark_batch_dynamic(batch)
        network(batch).train_logits.sum().backward()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs over 4 batches"


def test_distillation_module_takes_the_compile_option():
    from lattice.distill import DistillationModule

    module = DistillationModule(LatticeNetwork(make_schema(), **SIZE), compile={"backend": "aot_eager"})
    assert module.network._compiled_call_impl is None  # applied at setup, by the Trainer
    module.setup("fit")
    assert module.network._compiled_call_impl is not None
    assert module.hparams.compile == {"backend": "aot_eager"}
