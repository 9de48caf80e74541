"""int8 row-wise tables in served models (``lattice export --quantize int8``): the exported program of an int8
inference module equals the eager int8 module within 1e-5 (batch 1, 7 and 513, empty bags and sequences, absent
features); its tables pool within the quantization bound of the fp32 tables, and its probabilities stay close to
fp32's; the manifest records the format; bad formats are refused naming the argument. The int8 AOTInductor
package is compiled end to end by test_serve_cli.py (``lattice export --quantize int8``, then
``lattice predict --package``), and per class behind LATTICE_TEST_AOTI_ALL=1 in test_serve_package.py."""
import functools

import pytest
import torch

from lattice.ops.int8_rows import int8_row_bytes, int8_row_qparams
from lattice.serve.export import export_program, manifest_of
from lattice.serve.inference import InferenceModule
from lattice.serve.inputs import random_inputs
from lattice.serve.package import read_package, write_side_files
from lattice.serve.tables import (Fp32TablePool, Int8TablePool, ServingEmbeddingBagCollection, quantize_tables,
                                  table_bytes)
from lattice.sparse import KeyedJaggedTensor
from test_serve_export import MODELS

# Probabilities of the int8 module against fp32, for test_serve_export's models (weights perturbed by 0.2 * N(0, 1),
# so a row spans about 1.5 and a quantization step is about 6e-3): measured up to 8e-3 at batch 513.
PROBABILITY_TOLERANCE = 2e-2


@functools.lru_cache(maxsize=None)
def _exported_int8(name):
    model = MODELS[name]()
    return (model, *export_program(model, "int8"))


def test_int8_exported_program_equals_the_eager_int8_module_and_stays_near_fp32():
    model, module, program = _exported_int8("LatticeNetwork")
    assert module.quantization == "int8"
    pools = [m for m in module.modules() if isinstance(m, (Fp32TablePool, Int8TablePool))]
    assert pools and all(isinstance(p, Int8TablePool) for p in pools)
    # the graph pools through the int8 op and holds no fp32 copy of a table
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "lattice.jagged_embedding_pool_int8.default" in targets
    assert "lattice.jagged_embedding_pool.default" not in targets
    fp32 = InferenceModule(model)
    exported = program.module()
    for B, seed in ((1, 0), (7, 1), (513, 2)):
        x = random_inputs(module.schema, B, seed=seed)
        assert B == 1 or ((x[3].diff() == 0).any() and (x[6].diff() == 0).any() and not x[4].all())
        with torch.no_grad():
            eager, got, reference = module(*x), exported(*x), fp32(*x)
        torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
        diff = float((eager - reference).abs().max())
        assert diff <= PROBABILITY_TOLERANCE, f"int8 probabilities differ from fp32 by {diff:.2e} at batch {B}"
        assert B == 1 or diff > 0  # the tables really are quantized


def test_int8_tables_pool_within_the_quantization_bound():
    """Every served collection of the int8 module pools each bag within ``len(bag) * max(scale) / 2`` of the
    fp32 collection (each value is at most half a step off), and stores ``int8_row_bytes(D)`` bytes a row."""
    model = MODELS["LatticeNetwork"]()
    fp32, int8 = InferenceModule(model), InferenceModule(model, quantization="int8")
    pairs = [(a, b) for a, b in zip(fp32.modules(), int8.modules()) if isinstance(a, ServingEmbeddingBagCollection)]
    assert pairs
    gen = torch.Generator().manual_seed(0)
    for a, b in pairs:
        for key, pool in b.pools.items():
            rows, dim = a.pools[key].weight.shape
            assert pool.qweight.dtype == torch.uint8 and pool.nbytes() == rows * int8_row_bytes(dim)
            assert table_bytes(b) < table_bytes(a)
        keys = a.feature_names
        B, max_bag = 33, 3
        lengths = torch.randint(0, max_bag + 1, (len(keys) * B,), generator=gen)
        highs = torch.tensor([a._table_of_feature[f].num_embeddings for f in keys]).repeat_interleave(B)
        values = (torch.rand(int(lengths.sum()), generator=gen) * highs.repeat_interleave(lengths)).long()
        kjt = KeyedJaggedTensor(keys, values, lengths=lengths)
        with torch.no_grad():
            want, got = a.forward_dict(kjt), b.forward_dict(kjt)
        half_step = max(float(int8_row_qparams(p.qweight, p.embedding_dim)[0].max()) for p in b.pools.values()) / 2
        for f in keys:
            diff = float((got[f] - want[f]).abs().max())
            assert diff <= max_bag * half_step + 1e-6, f"feature {f}: {diff:.2e} > {max_bag} * {half_step:.2e}"
        table = a.tables[0].name
        torch.testing.assert_close(b.embedding_weight(table), a.embedding_weight(table), rtol=0,
                                   atol=half_step + 1e-6)


def test_the_manifest_records_the_quantization(tmp_path):
    model = MODELS["DLRM"]()
    module = InferenceModule(model, quantization="int8")
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not compiled")  # read_package reads the side files only
    write_side_files(path, module.schema, manifest_of(module, "lattice.models.baselines.DLRM"))
    assert read_package(path)[1].quantization == "int8"


def test_bad_quantization_is_refused_naming_the_argument():
    model = MODELS["DLRM"]()
    with pytest.raises(ValueError, match=r"quantization must be one of \['none', 'int8'\], got 'fp16'"):
        InferenceModule(model, quantization="fp16")
    fp32 = InferenceModule(model)
    with pytest.raises(ValueError, match=r"quantization='int8', but the inference module given was built with "
                                         r"quantization='none'"):
        export_program(fp32, "int8")
    with pytest.raises(ValueError, match="no served embedding tables"):
        quantize_tables(torch.nn.Linear(2, 2), "int8")
    # the original model and a fp32 inference module are left as they were
    assert all(isinstance(p, Fp32TablePool) for p in fp32.modules() if isinstance(p, (Fp32TablePool, Int8TablePool)))
    assert not any(isinstance(m, ServingEmbeddingBagCollection) for m in model.modules())

