"""Dense features' ``nan: error|missing``: through the reader on Parquet with NaN, in both modes."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lattice.data import DataError, ParquetBatchDataset, Schema, SchemaError
from lattice.data.reference import reference_batch

from _data_utils import assert_batch_equal

N = 40
NAN_ROWS = (3, 25, 26)  # with 10-row row groups: the first bad one is row 3 in row group 0
NULL_ROW = 7


def _schema(x_nan=None, dense_nan=None) -> Schema:
    x = dict(name="x", kind="dense")
    if x_nan is not None:
        x["nan"] = x_nan
    d = dict(features=[x, dict(name="y", kind="dense"), dict(name="ids", kind="sparse", num_embeddings=10)],
             tasks=[dict(name="click")], user_id_column=None, item_id_column=None, timestamp_column=None,
             domain_column=None)
    if dense_nan is not None:
        d["dense_nan"] = dense_nan
    # through YAML, as a user writes it
    return Schema.from_yaml(Schema.from_dict(d).to_yaml())


def _write(tmp_path, x_type=pa.float64(), y_nan: bool = False) -> str:
    x = np.linspace(1.0, 2.0, N)
    x[list(NAN_ROWS)] = np.nan
    y = np.linspace(-1.0, 1.0, N)
    if y_nan:
        y[30] = np.nan
    mask = np.zeros(N, dtype=bool)
    mask[NULL_ROW] = True
    table = pa.table({
        "example_id": pa.array(np.arange(N, dtype=np.int64)),
        "x": pa.array(x, mask=mask).cast(x_type),
        "y": pa.array(y, type=pa.float32()),
        "ids": pa.array([[i % 10] for i in range(N)]),
        "click": pa.array(np.arange(N) % 2, type=pa.int8()),
    })
    path = str(tmp_path / "nan.parquet")
    pq.write_table(table, path, row_group_size=10)
    return path


def _read(path, schema):
    ds = ParquetBatchDataset(path, schema, batch_size=N, shuffle=False)
    (batch,) = list(ds.iter_shard(0, 0, 1, 0, 1))
    return batch


@pytest.mark.parametrize("x_type", [pa.float64(), pa.float32()])
def test_missing_reads_nan_as_absent(tmp_path, x_type):
    batch = _read(_write(tmp_path, x_type), _schema(x_nan="missing"))
    mask = batch.dense_mask[:, 0]
    absent = sorted(NAN_ROWS + (NULL_ROW,))
    assert torch.nonzero(~mask).flatten().tolist() == absent  # NaN rows masked like the null row
    assert torch.isfinite(batch.dense).all() and (batch.dense[~mask, 0] == 0).all()
    keep = [i for i in range(N) if i not in absent]
    expect = torch.tensor(np.linspace(1.0, 2.0, N)[keep], dtype=torch.float32)
    assert torch.equal(batch.dense[keep, 0], expect)
    assert batch.dense_mask[:, 1].all()  # the other dense feature is untouched
    # the row-by-row reference agrees
    schema = _schema(x_nan="missing")
    assert_batch_equal(batch, reference_batch(pq.read_table(_write(tmp_path, x_type)), schema), check_truth=False)


def test_error_is_the_default_and_names_file_column_row(tmp_path):
    path = _write(tmp_path)
    for schema in (_schema(), _schema(x_nan="error"), _schema(x_nan="error", dense_nan="missing")):
        with pytest.raises(DataError, match="non-finite value nan") as info:
            _read(path, schema)
        err = info.value
        assert os.path.basename(path) in str(err)
        assert (err.column, err.row_group, err.row) == ("x", 0, NAN_ROWS[0])
        assert "column 'x'" in str(err) and f"row {NAN_ROWS[0]}" in str(err)


def test_schema_wide_default_and_per_feature_override(tmp_path):
    path = _write(tmp_path, y_nan=True)
    # schema-wide missing: both features take NaN as absent
    batch = _read(path, _schema(dense_nan="missing"))
    assert not batch.dense_mask[30, 1] and batch.dense_mask[29, 1]
    # x missing by its own setting, y still errors under the default
    with pytest.raises(DataError, match="non-finite") as info:
        _read(path, _schema(x_nan="missing"))
    assert (info.value.column, info.value.row) == ("y", 30)


def test_infinity_is_an_error_even_when_nan_is_missing(tmp_path):
    x = np.linspace(0, 1, N)
    x[12] = np.inf
    table = pa.table({"example_id": pa.array(np.arange(N, dtype=np.int64)), "x": x, "y": np.zeros(N),
                      "ids": pa.array([[1]] * N), "click": pa.array(np.zeros(N, dtype=np.int8))})
    path = str(tmp_path / "inf.parquet")
    pq.write_table(table, path, row_group_size=10)
    with pytest.raises(DataError, match="non-finite value inf") as info:
        _read(path, _schema(dense_nan="missing"))
    assert (info.value.column, info.value.row_group, info.value.row) == ("x", 1, 12)


def test_nan_option_in_yaml_and_its_errors():
    s = _schema(x_nan="missing", dense_nan="missing")
    assert s.feature("x").nan == "missing" and s.dense_nan == "missing"
    assert s.nan_policy("x") == s.nan_policy("y") == "missing"
    assert "nan: missing" in s.to_yaml() and "dense_nan: missing" in s.to_yaml()
    # at the defaults nothing is written, so existing schemas keep their fingerprints
    plain = _schema()
    assert "nan" not in plain.to_yaml() and plain.nan_policy("x") == "error"
    assert Schema.from_yaml(s.to_yaml()) == s and s != plain
    with pytest.raises(SchemaError, match="feature 'x': nan must be error or missing"):
        _schema(x_nan="zero")
    with pytest.raises(SchemaError, match="dense_nan must be error or missing"):
        _schema(dense_nan="drop")
    with pytest.raises(SchemaError, match="feature 'ids': nan is only for dense"):
        Schema.from_dict(dict(features=[dict(name="ids", kind="sparse", num_embeddings=3, nan="missing")],
                              tasks=[dict(name="click")]))
