"""lattice.serve.Predictor on a small planted world (eager runner; the package runner is in
test_serve_package.py): the three input forms agree with each other and with the network scoring the data
layer's own batch; batching and threads change nothing; an extra, missing or mistyped column or an
out-of-range id raises the data layer's DataError naming the column."""
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lattice.data.builder import BatchBuilder, ChunkContext
from lattice.data.errors import DataError
from lattice.data.synthetic import SyntheticConfig, SyntheticWorld
from lattice.models import LatticeNetwork
from lattice.serve.predictor import Predictor

WORLD = {"num_users": 60, "num_items": 40, "seed": 3,
         "domains": [{"name": "feed", "rows": 300}, {"name": "shop", "rows": 120, "absent_features": ["price"]}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    w = SyntheticWorld(SyntheticConfig.from_dict(WORLD))
    w.write(str(out), overwrite=True)
    files = sorted(out.rglob("*.parquet"))
    assert len(files) >= 2
    return w.schema(), files


@pytest.fixture(scope="module")
def network(world):
    schema, _ = world
    torch.manual_seed(0)
    net = LatticeNetwork(schema, dim=8, num_layers=1, num_heads=2, fm_tokens=2, lcb_tokens=2, representation_dim=16,
                         head_hidden_dims=[8], history_match=True, task_parents={"like": "click"})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def _domain_of(file):
    return pq.read_schema(file).metadata[b"lattice.domain"].decode()


def _table(files):
    """Every file's rows with an explicit domain column (the files name their domain in metadata only)."""
    tables = []
    for f in files:
        t = pq.read_table(f)
        tables.append(t.append_column("domain", pa.array([_domain_of(f)] * t.num_rows)).replace_schema_metadata())
    return pa.concat_tables(tables, promote_options="default")


def test_input_forms_agree_with_the_network_on_the_data_layers_batch(world, network):
    schema, files = world
    predictor = Predictor.from_model(network, batch_size=64)
    table = pq.read_table(files[0])
    got = predictor.predict(table)
    assert got.column_names == ["example_id", *schema.task_names] and got.num_rows == table.num_rows
    assert got.column("example_id").to_pylist() == table.column("example_id").to_pylist()
    # the reference: the data layer's batch of the same rows straight through the network
    builder = BatchBuilder(schema, zipper="oracle")
    batch = builder.build(builder.prepare(table, ChunkContext(file="ref", domain=_domain_of(files[0]))))
    with torch.no_grad():
        expected = torch.sigmoid(network(batch).logits).numpy()
    probs = np.stack([got.column(t).to_numpy() for t in schema.task_names], 1)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    from_path = predictor.predict(str(files[0]))
    from_rows = predictor.predict(table.to_pylist(), domain=_domain_of(files[0]))
    for other in (from_path, from_rows):
        np.testing.assert_allclose(np.stack([other.column(t).to_numpy() for t in schema.task_names], 1), probs,
                                   rtol=0, atol=1e-6)
    # labels, delays and p_<task> columns are ignored: the same scores without them
    bare = table.drop_columns([c for c in table.column_names if c in ("click", "like", "conversion",
                                                                       "conversion_delay", "p_click", "p_like",
                                                                       "p_conversion", "timestamp")])
    np.testing.assert_allclose(np.stack([predictor.predict(bare).column(t).to_numpy() for t in schema.task_names], 1),
                               probs, rtol=0, atol=1e-6)


def test_batch_size_and_threads_change_nothing(world, network):
    schema, files = world
    table = _table(files).slice(0, 200)
    whole = Predictor.from_model(network, batch_size=4096).predict(table)
    shared = Predictor.from_model(network, batch_size=7)
    _assert_same(shared.predict(table), whole)
    slices = [table.slice(i * 50, 50) for i in range(table.num_rows // 50)]
    results = [None] * len(slices)

    def work(i):
        results[i] = shared.predict(slices[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(slices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_same(pa.concat_tables(results), whole.slice(0, 50 * len(slices)))


def _assert_same(got, expected):
    """Same ids and columns; scores equal up to float summation order (batch shapes differ)."""
    assert got.column_names == expected.column_names
    assert got.column("example_id").to_pylist() == expected.column("example_id").to_pylist()
    for name in got.column_names[1:]:
        np.testing.assert_allclose(got.column(name).to_numpy(), expected.column(name).to_numpy(), rtol=0, atol=1e-6)


def test_empty_input_gives_an_empty_table(world, network):
    schema, files = world
    got = Predictor.from_model(network).predict(pq.read_table(files[0]).slice(0, 0))
    assert got.num_rows == 0 and got.column_names == ["example_id", *schema.task_names]


def test_bad_columns_raise_data_errors_naming_the_column(world, network):
    schema, files = world
    predictor = Predictor.from_model(network)
    table = pq.read_table(files[0]).slice(0, 20)
    with pytest.raises(DataError, match="'devcie'.*not in the model's schema"):
        predictor.predict(table.append_column("devcie", pa.array(np.zeros(20, np.int64))))
    with pytest.raises(DataError, match="column 'device'.*missing column for sparse feature 'device'"):
        predictor.predict(table.drop_columns(["device"]))
    with pytest.raises(DataError, match="column 'hour'.*dense feature 'hour' must be numeric"):
        predictor.predict(table.set_column(table.column_names.index("hour"), "hour",
                                           pa.array([str(i) for i in range(20)])))
    ids = table.column("device").to_numpy().copy()
    ids[5] = 99
    with pytest.raises(DataError, match="column 'device'.*row 5"):
        predictor.predict(table.set_column(table.column_names.index("device"), "device", pa.array(ids)))
    rows = _table(files).slice(0, 20).to_pylist()
    rows[3]["domain"] = "nowhere"
    with pytest.raises(DataError, match="domain 'nowhere' is not in the schema"):
        predictor.predict(rows)
    with pytest.raises(TypeError, match=r"rows\[1\] is a list"):
        predictor.predict([rows[0], [1, 2]])
    with pytest.raises(TypeError, match="rows must be"):
        predictor.predict(42)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predictor.predict(str(files[0]) + ".missing")


def test_int8_tables_score_near_fp32(world, network):
    """``Predictor.from_model(..., quantization="int8")`` scores with the tables ``lattice export --quantize int8``
    packages: the same rows, scores within the quantization's reach of fp32 (perturbed weights: steps ~5e-3)."""
    schema, files = world
    table = pq.read_table(files[0])
    fp32 = Predictor.from_model(network).predict(table)
    int8 = Predictor.from_model(network, quantization="int8", batch_size=50).predict(table)
    assert int8.column("example_id").to_pylist() == fp32.column("example_id").to_pylist()
    diff = max(float(np.abs(int8.column(t).to_numpy() - fp32.column(t).to_numpy()).max()) for t in schema.task_names)
    assert 0 < diff <= 2e-2
    with pytest.raises(ValueError, match="built with quantization='none'"):
        Predictor.from_model(Predictor.from_model(network).runner, quantization="int8")
