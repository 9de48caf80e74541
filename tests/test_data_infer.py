"""Schema inference without traps: id columns are features too, id lists become sequences on the shared
table, every decision has a reason, and the inferred schema reads its data."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from lattice.commands import run_command
from lattice.data import DataError, ParquetBatchDataset, Schema, infer_schema
from lattice.data.infer import infer_with_reasons

from _data_utils import REPO, write_parquet

USERS, ITEMS = 1000, 400


def _lists(rng, lengths, high, low=0):
    offs = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offs, pa.array(rng.integers(low, high, int(lengths.sum())).astype(np.int64)))


def user_table(n: int = 600, seed: int = 0, **extra) -> pa.Table:
    """A log as a user brings it: ids, an item history with timestamps, tags, a city, a price with NaN,
    three labels and a conversion delay."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 31, n)
    lens[:5] = 0
    offs = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    hist = pa.ListArray.from_arrays(offs, pa.array(rng.integers(0, ITEMS, int(lens.sum()))))
    hist_ts = pa.ListArray.from_arrays(offs, pa.array(np.sort(rng.integers(0, 10**6, int(lens.sum())))))
    price = rng.normal(size=n)
    price[[3, 50]] = np.nan
    click = rng.integers(0, 2, n)
    like = np.where(click == 1, rng.integers(0, 2, n), 0)
    cols = {
        "example_id": np.arange(n, dtype=np.int64),
        "user_id": rng.integers(0, USERS, n),
        "item_id": rng.integers(0, ITEMS, n),
        "timestamp": rng.integers(0, 10**6, n),
        "hist_items": hist,
        "hist_ts": hist_ts,
        "item_tags": _lists(rng, rng.integers(1, 4, n), 40),
        "city": pa.array([f"c{i}" for i in rng.integers(0, 20, n)]),
        "price": price,
        "age": pa.array(rng.integers(18, 80, n).astype(np.float32), mask=rng.random(n) < 0.2),
        "click": pa.array(click, type=pa.int8()),
        "like": pa.array(like, type=pa.int8()),
        "watch_time": rng.exponential(size=n),
        "click_delay": pa.array(rng.exponential(100.0, n), mask=click == 0),
        "p_click": rng.random(n),
    }
    cols.update(extra)
    return pa.table(cols)


@pytest.fixture
def data(tmp_path):
    return write_parquet(user_table(), str(tmp_path / "log" / "part-0.parquet"), 128)


def test_ids_are_features_and_the_history_a_sequence_on_the_item_table(data):
    inf = infer_with_reasons(data, tasks=["click", "like", "watch_time"])
    s = inf.schema
    assert s.user_id_column == "user_id" and s.item_id_column == "item_id"
    assert s.feature("user_id").kind == "sparse" and s.feature("user_id").num_embeddings == USERS
    assert s.feature("item_id").kind == "sparse" and s.feature("item_id").num_embeddings == ITEMS
    hist = s.feature("hist_items")
    assert (hist.kind, hist.shared_table, hist.timestamps_column) == ("sequence", "item_id", "hist_ts")
    assert hist.num_embeddings == ITEMS and hist.table == s.feature("item_id").table
    # max_length: the 99th percentile of the row lengths
    lengths = pa.compute.list_value_length(user_table()["hist_items"]).to_numpy()
    assert hist.max_length == int(np.quantile(lengths, 0.99, method="inverted_cdf"))
    assert "name matches 'item_id'" in inf.reasons["hist_items"] and "p99" in inf.reasons["hist_items"]
    # the traps: no truth, no delay, no timestamps as features
    assert not {"p_click", "click_delay", "hist_ts", "timestamp", "example_id"} & set(s.feature_names)
    assert "delay of task 'click'" in inf.reasons["click_delay"]
    assert [t.kind for t in s.tasks] == ["binary", "binary", "regression"]
    # item_tags names the item but its ids do not span the item range: its own pooled bag
    tags = s.feature("item_tags")
    assert (tags.kind, tags.shared_table, tags.num_embeddings, tags.pooling) == ("sparse", None, 40, "mean")
    assert "max id 39 vs its 399" in inf.reasons["item_tags"]
    # strings are hashed; NaN in a dense column is read as absent
    assert s.feature("city").oov == "hash"
    assert s.feature("price").nan == "missing" and "NaN in 2 rows" in inf.reasons["price"]
    assert s.feature("age").nan is None and "20" in inf.reasons["age"]  # ~20% null
    assert set(inf.reasons) == set(user_table().column_names)


def test_opting_out_of_id_features(data):
    s = infer_schema(data, tasks=["click"], id_features=False)
    assert "user_id" not in s.feature_names and "item_id" not in s.feature_names
    assert s.user_id_column == "user_id" and s.item_id_column == "item_id"
    hist = s.feature("hist_items")  # still a sequence, on a table named after the id column
    assert (hist.kind, hist.shared_table, hist.num_embeddings) == ("sequence", "item_id", ITEMS)


def test_a_list_matched_by_id_range_and_the_table_grows_to_hold_both(tmp_path):
    rng = np.random.default_rng(1)
    n = 400
    # 'recent' shares no word with an id column but spans the item range; 'clicked_items' holds ids beyond
    # item_id's largest: the shared table grows to hold both
    extra = {"clicked_items": _lists(rng, rng.integers(2, 6, n), ITEMS + 50),
             "recent": _lists(rng, rng.integers(2, 6, n), ITEMS)}
    path = write_parquet(user_table(n, **extra), str(tmp_path / "d" / "p.parquet"), 100)
    inf = infer_with_reasons(path, tasks=["click"])
    s = inf.schema
    assert s.feature("recent").shared_table == "item_id" and "span the range of 'item_id'" in inf.reasons["recent"]
    assert s.feature("recent").timestamps_column is None
    size = int(pa.compute.max(pa.compute.list_flatten(extra["clicked_items"])).as_py()) + 1
    assert size > ITEMS
    for name in ("item_id", "hist_items", "recent", "clicked_items"):
        assert s.feature(name).num_embeddings == size, name
    # and the grown schema reads the data (every id in range of its shared table)
    assert _read_rows(path, s) == n


def test_ambiguous_ranges_one_id_per_row_and_mismatched_timestamps_stay_bags(tmp_path):
    rng = np.random.default_rng(2)
    n = 300
    table = user_table(n, seed=2).drop_columns(["hist_items", "hist_ts"])
    one = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(rng.integers(0, ITEMS, n)))
    lens = rng.integers(2, 6, n)
    table = (table.set_column(table.column_names.index("user_id"), "user_id", pa.array(rng.integers(0, ITEMS, n)))
             .append_column("seen", _lists(rng, lens, ITEMS))
             .append_column("single_item", one)
             .append_column("hist_pages", _lists(rng, lens, 30))
             .append_column("hist_pages_ts", _lists(rng, lens + 1, 10**6)))
    path = write_parquet(table, str(tmp_path / "d" / "p.parquet"), 100)
    inf = infer_with_reasons(path, tasks=["click"])
    s = inf.schema
    # users and items have the same id range here: a list matched by range alone is ambiguous
    assert s.feature("seen").kind == "sparse" and s.feature("seen").shared_table is None
    assert "ambiguous" in inf.reasons["seen"]
    assert s.feature("single_item").kind == "sparse" and "one id per row" in inf.reasons["single_item"]
    # a timestamp list whose lengths differ from the list's is not its timestamps
    assert s.feature("hist_pages").kind == "sparse" and s.feature("hist_pages").timestamps_column is None
    assert "not used" in inf.reasons["hist_pages_ts"]
    assert _read_rows(path, s) == n


def test_the_inferred_schema_reads_its_data_and_its_yaml_round_trips(data):
    inf = infer_with_reasons(data, tasks=["click", "like"])
    text = inf.to_yaml()
    assert Schema.from_yaml(text) == inf.schema
    for line in text.splitlines():
        if line.startswith("  - {name:") and not line.startswith("  - {name: default"):
            assert "  # " in line, line  # a reason on every feature and task line
    assert "#   p_click: planted truth of task 'click'" in text
    ds = ParquetBatchDataset(data, inf.schema, batch_size=256, shuffle=False)
    batches = list(ds.iter_shard(0, 0, 1, 0, 1))
    assert sum(b.batch_size for b in batches) == 600
    b = batches[0]
    assert b.sequences.keys() == ["hist_items"] and "user_id" in b.sparse.keys()
    assert b.sequence_timestamps is not None
    price = [f.name for f in inf.schema.dense_features].index("price")
    assert not b.dense_mask[3, price] and b.dense_mask[4, price]  # row 3's NaN: absent


def test_bad_arguments_name_what_is_wrong(data):
    with pytest.raises(DataError, match=r"label column\(s\) \['nope'\] not found"):
        infer_schema(data, tasks=["nope"])
    with pytest.raises(ValueError, match="length_quantile"):
        infer_schema(data, tasks=["click"], length_quantile=0)
    with pytest.raises(ValueError, match=r"regression_tasks \['like'\] are not among the tasks"):
        infer_schema(data, tasks=["click"], regression_tasks=["like"])


def _read_rows(path, schema) -> int:
    ds = ParquetBatchDataset(path, schema, batch_size=128, shuffle=False)
    return sum(b.batch_size for b in ds.iter_shard(0, 0, 1, 0, 1))


def test_lattice_data_infer_command(tmp_path, data):
    """``lattice data infer PATH --tasks click,like`` prints the commented YAML (and --out writes it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])

    def lattice(*args):
        return subprocess.run([sys.executable, "-m", "lattice.cli", "data", "infer", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    proc = lattice(data, "--tasks", "click,like", "--out", "schema.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Schema.from_yaml(proc.stdout) == infer_schema(data, tasks=["click", "like"])
    assert "# sequence on the table of 'item_id': name matches 'item_id'" in proc.stdout
    assert "#   click_delay: delay of task 'click'" in proc.stdout
    assert (tmp_path / "schema.yaml").read_text() == proc.stdout
    # the printed file is a schema a data config can name
    assert Schema.from_yaml(str(tmp_path / "schema.yaml")).feature("user_id").kind == "sparse"
    # DOMAIN=PATH, the id-feature opt-out and a list of tasks in YAML form
    proc = lattice(f"shop={data}", "--tasks", "[click, watch_time]", "--id_features", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = Schema.from_yaml(proc.stdout)
    assert s.domain_names == ["shop"] and s.task_names == ["click", "watch_time"]
    assert "user_id" not in s.feature_names and s.task("watch_time").kind == "regression"
    # a label that is not there: an error naming it, no schema
    with pytest.raises(DataError, match=r"\['nope'\] not found"):
        run_command(["data", "infer", data, "--tasks", "click,nope"])


def test_embedded_schema_and_a_domain_column_in_the_yaml(tmp_path):
    from lattice.data.commands import generate

    from _data_utils import simple_table

    world = generate({"num_users": 50, "num_items": 40, "domains": [{"name": "a", "rows": 200}]}, str(tmp_path / "w"))
    inf = infer_with_reasons(str(tmp_path / "w" / "a"))
    assert inf.embedded and inf.schema == Schema.from_yaml(str(tmp_path / "w" / "schema.yaml"))
    assert Schema.from_yaml(inf.to_yaml()) == inf.schema and "embedded" in inf.to_yaml()
    assert world["rows"] == {"a": 200}
    # naming the tasks infers column by column even from lattice's files
    assert not infer_with_reasons(str(tmp_path / "w" / "a"), tasks=["click"]).embedded
    # one file with a domain column: the domains come from its values
    path = write_parquet(simple_table(200, seed=5), str(tmp_path / "d" / "p.parquet"), 64)
    inf = infer_with_reasons(path, tasks=["click", "dwell"])
    assert inf.schema.domain_names == ["a", "b"] and "2 domain(s): a, b" in inf.reasons["domain"]
    assert Schema.from_yaml(inf.to_yaml()) == inf.schema
    assert "domain_column: domain  # 2 domain(s): a, b" in inf.to_yaml()
