"""lattice.data.splits.write_slices: per-domain tables cut into slices on disk by row filters."""
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lattice.data.schema import Schema
from lattice.data.splits import RowFilter, time_split, write_slices


def _schema():
    return Schema.coerce({"features": [{"name": "x", "kind": "dense"}], "tasks": [{"name": "click"}],
                          "timestamp_column": "ts"})


def test_write_slices_keeps_each_domains_rows_in_order(tmp_path):
    tables = {"feed": pa.table({"example_id": np.arange(10), "ts": np.arange(10) * 10, "x": np.arange(10.0)}),
              "shop": pa.table({"example_id": np.arange(10, 14), "ts": np.array([5, 95, 15, 60]), "x": np.ones(4)})}
    filters = time_split(30, 70)
    rows = write_slices(tables, _schema(), str(tmp_path), {
        "train": (["feed", "shop"], filters["train"]), "test": (["shop"], filters["test"]),
        "late": (["feed"], RowFilter("time", 50, math.inf))})
    assert rows == {"train": 3 + 2, "test": 1, "late": 5}
    read = lambda s, d: pq.read_table(os.path.join(tmp_path, s, f"{d}.parquet"))  # noqa: E731
    assert read("train", "shop")["ts"].to_pylist() == [5, 15]  # file order kept
    assert read("test", "shop")["example_id"].to_pylist() == [11]
    assert read("late", "feed")["ts"].to_pylist() == [50, 60, 70, 80, 90]
    assert not os.path.exists(os.path.join(tmp_path, "test", "feed.parquet"))
    with pytest.raises(ValueError, match="'video'"):
        write_slices(tables, _schema(), str(tmp_path), {"x": (["video"], filters["train"])})
