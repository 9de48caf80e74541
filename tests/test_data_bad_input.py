"""Every kind of bad input is a clear DataError naming file, column and row group (and row)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lattice.data import DataError, DataSource, ParquetBatchDataset, Schema

from _data_utils import write_parquet

BAD_ROW = 25  # with 10-row row groups: row group 2


def schema(**kw) -> Schema:
    d = dict(
        features=[
            dict(name="ids", kind="sparse", num_embeddings=100),
            dict(name="x", kind="dense"),
            dict(name="hist", kind="sequence", num_embeddings=100, timestamps_column="hist_ts"),
        ],
        tasks=[dict(name="click"),
               dict(name="conv", delay_column="delay", windows=[dict(name="1h", seconds=3600, probability=0.5),
                                                                 dict(name="1d", seconds=86400, probability=0.5)])],
        domains=[dict(name="a"), dict(name="b")],
        user_id_column=None, item_id_column=None, timestamp_column=None,
    )
    d.update(kw)
    return Schema.from_dict(d)


def good_columns(n: int = 40) -> dict:
    return {
        "example_id": pa.array(np.arange(n, dtype=np.int64)),
        "domain": pa.array(["a", "b"] * (n // 2)),
        "ids": pa.array([[i % 100, (i * 7) % 100] for i in range(n)]),
        "x": pa.array(np.linspace(0, 1, n)),
        "hist": pa.array([[1, 2, 3][: i % 4] for i in range(n)]),
        "hist_ts": pa.array([[10, 20, 30][: i % 4] for i in range(n)]),
        "click": pa.array(np.arange(n) % 2, type=pa.int8()),
        "conv": pa.array((np.arange(n) % 4 == 0).astype(np.int8)),
        "delay": pa.array(np.where(np.arange(n) % 4 == 0, 100.0, np.nan), mask=np.arange(n) % 4 != 0),
    }


def with_bad(column: str, values) -> pa.Table:
    cols = good_columns()
    cols[column] = values
    return pa.table(cols)


def read_all(path, sch=None, **kw):
    ds = ParquetBatchDataset(path, sch or schema(), batch_size=16, **kw)
    return sum(b.batch_size for b in ds.iter_shard(0, 0, 1, 0, 1))


def expect(path, match, column=None, row_group=None, row=None, sch=None):
    with pytest.raises(DataError, match=match) as info:
        read_all(path, sch)
    err = info.value
    assert err.file is not None and os.path.basename(path) in str(err)
    if column is not None:
        assert err.column == column and f"column {column!r}" in str(err)
    if row_group is not None:
        assert err.row_group == row_group and f"row group {row_group}" in str(err)
    if row is not None:
        assert err.row == row and f"row {row}" in str(err)
    return err


@pytest.fixture
def put(tmp_path):
    def _put(table: pa.Table, name: str = "data.parquet", statistics: bool = True) -> str:
        path = str(tmp_path / name)
        pq.write_table(table, path, row_group_size=10, write_statistics=statistics)
        return path
    return _put


def test_good_data_reads(put):
    assert read_all(put(pa.table(good_columns()))) == 40


def test_missing_column_is_caught_before_reading(put):
    cols = good_columns()
    del cols["x"]
    expect(put(pa.table(cols)), "missing column", column="x")


def test_wrong_type(put):
    expect(put(with_bad("x", pa.array([str(i) for i in range(40)]))), "must be numeric", column="x")
    expect(put(with_bad("hist", pa.array(np.arange(40)))), "must be a list", column="hist")
    expect(put(with_bad("ids", pa.array(np.linspace(0, 1, 40)))), "integer, string or a list", column="ids")


def test_list_column_with_nulls(put):
    rows = [[1]] * 40
    rows[BAD_ROW] = None
    expect(put(with_bad("ids", pa.array(rows))), "null list", column="ids", row_group=2, row=BAD_ROW)
    rows = [[1, 2]] * 40
    rows[BAD_ROW] = [1, None]
    expect(put(with_bad("ids", pa.array(rows))), "null id inside a list", column="ids", row_group=2, row=BAD_ROW)


def test_null_list_allowed_where_the_domain_lacks_the_feature(put):
    sch = schema(domains=[dict(name="a"), dict(name="b", features=["x", "hist"])])
    rows = [[1]] * 40
    rows[BAD_ROW] = None  # row 25 is in domain b, which has no 'ids'
    assert read_all(put(with_bad("ids", pa.array(rows))), sch) == 40


def test_negative_and_out_of_range_ids(put):
    rows = [[1]] * 40
    rows[BAD_ROW] = [3, -3]
    # caught from the row-group statistics before any row is read ...
    expect(put(with_bad("ids", pa.array(rows))), r"must lie in \[0, 100\).*min -3", column="ids", row_group=2)
    # ... and row by row where the file has no statistics
    path = put(with_bad("ids", pa.array(rows)), "nostats.parquet", statistics=False)
    expect(path, "negative id -3", column="ids", row_group=2, row=BAD_ROW)
    rows[BAD_ROW] = [100]
    path = put(with_bad("ids", pa.array(rows)), "oob.parquet", statistics=False)
    expect(path, r"id 100 is out of range \[0, 100\)", column="ids", row_group=2, row=BAD_ROW)
    expect(put(with_bad("ids", pa.array(rows)), "oob_stats.parquet"), "max 100", column="ids", row_group=2)
    # with oov: hash the same ids are mixed into range instead
    sch = schema()
    sch.features[0].oov = "hash"
    ds = ParquetBatchDataset(path, Schema.from_dict(sch.to_dict()), batch_size=64)
    (batch,) = list(ds.iter_shard(0, 0, 1, 0, 1))
    v = batch.sparse["ids"].values()
    assert v.min() >= 0 and v.max() < 100


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_dense(put, bad):
    x = np.linspace(0, 1, 40)
    x[BAD_ROW] = bad
    expect(put(with_bad("x", pa.array(x))), "non-finite", column="x", row_group=2, row=BAD_ROW)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_label(put, bad):
    y = (np.arange(40) % 2).astype(np.float64)
    y[BAD_ROW] = bad
    expect(put(with_bad("click", pa.array(y)), statistics=False), "not finite", column="click", row_group=2,
           row=BAD_ROW)
    expect(put(with_bad("click", pa.array(y)), "stats.parquet"), "not finite|must be 0 or 1", column="click",
           row_group=2)


def test_binary_label_outside_0_1(put):
    y = (np.arange(40) % 2).astype(np.float64)
    y[BAD_ROW] = 2.0
    expect(put(with_bad("click", pa.array(y))), "must be 0 or 1.*max 2", column="click", row_group=2)
    expect(put(with_bad("click", pa.array(y)), "nostats.parquet", statistics=False), "not 0 or 1", column="click",
           row_group=2, row=BAD_ROW)
    y[BAD_ROW] = 0.5  # inside [0, 1]: only the row check can tell
    expect(put(with_bad("click", pa.array(y)), "half.parquet"), "not 0 or 1", column="click", row=BAD_ROW)


def test_null_label_is_masked_not_an_error(put):
    y = pa.array(np.arange(40) % 2, mask=np.arange(40) == BAD_ROW)
    assert read_all(put(with_bad("click", y))) == 40


def test_empty_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    expect(str(empty), "empty file")
    no_rows = tmp_path / "norows.parquet"
    pq.write_table(pa.table(good_columns()).slice(0, 0), str(no_rows))
    expect(str(no_rows), "empty file")
    csv = tmp_path / "empty.csv"
    csv.write_text("example_id,x\n")
    expect(str(csv), "empty file")


def test_truncated_and_corrupt_parquet(put, tmp_path):
    path = put(pa.table(good_columns()))
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    expect(str(truncated), "truncated or corrupt")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all" * 10)
    expect(str(garbage), "truncated or corrupt")
    # footer intact, data pages of the middle row groups overwritten
    corrupt = bytearray(data)
    md = pq.ParquetFile(path).metadata
    start = md.row_group(2).column(0).data_page_offset
    end = md.row_group(2).column(md.num_columns - 1).data_page_offset
    corrupt[start: end + 16] = b"\xff" * (end + 16 - start)
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(DataError) as info:
        read_all(str(bad))
    assert "corrupt.parquet" in str(info.value) and info.value.row_group == 2


def test_domain_not_in_schema(put, tmp_path):
    dom = ["a", "b"] * 20
    dom[BAD_ROW] = "zzz"
    expect(put(with_bad("domain", pa.array(dom))), "domain 'zzz' is not in the schema", column="domain",
           row_group=2, row=BAD_ROW)
    cols = good_columns()
    del cols["domain"]
    path = write_parquet(pa.table(cols), str(tmp_path / "c" / "d.parquet"), 10)
    with pytest.raises(DataError, match="domain 'c' is not in the schema"):
        read_all(DataSource(path, domain="c"))
    with pytest.raises(DataError, match="missing domain column"):
        read_all(path)


def test_sequence_timestamps_must_match(put):
    ts = [[10, 20, 30][: i % 4] for i in range(40)]
    ts[BAD_ROW] = [1, 2, 3, 4, 5]
    expect(put(with_bad("hist_ts", pa.array(ts))), "timestamps of sequence feature 'hist' have 5 entries",
           column="hist_ts", row_group=2, row=BAD_ROW)


def test_windowed_positive_needs_a_delay(put):
    delay = pa.array(np.where(np.arange(40) % 4 == 0, 100.0, 0.0), mask=(np.arange(40) % 4 != 0) | (np.arange(40) == 24))
    expect(put(with_bad("delay", delay)), "without a delay", column="delay", row_group=2, row=24)
    neg = pa.array(np.where(np.arange(40) == 24, -5.0, 100.0))
    expect(put(with_bad("delay", neg), "neg.parquet"), "must be finite and >= 0", column="delay", row=24)


def test_null_example_id(put):
    eid = pa.array(np.arange(40), mask=np.arange(40) == BAD_ROW)
    expect(put(with_bad("example_id", eid)), "null example_id", column="example_id", row_group=2, row=BAD_ROW)


def test_csv_parse_error_names_the_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("example_id,x\n1,0.5\n2,0.1,7\n")
    with pytest.raises(DataError, match="bad.csv.*cannot parse CSV"):
        read_all(str(path))


def test_validate_reads_everything_before_training(put):
    x = np.linspace(0, 1, 40)
    x[39] = np.nan
    ds = ParquetBatchDataset(put(with_bad("x", pa.array(x))), schema(), batch_size=8)
    with pytest.raises(DataError, match="row 39"):
        ds.validate()


def test_missing_path_and_glob(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_all(str(tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match="no files match"):
        read_all(str(tmp_path / "*.parquet"))
