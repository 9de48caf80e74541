"""Domain consolidation: union schema, absence masks, the merged Parquet dataset."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from lattice.data import DataError, DataSource, ParquetBatchDataset, Schema, consolidate, union_schema
from lattice.data.commands import consolidate as consolidate_command, parse_inputs

from _data_utils import simple_schema, simple_table, write_parquet


@pytest.fixture
def per_domain(tmp_path):
    """Two per-domain datasets: 'b' lacks the tags/y features and the dwell label."""
    full = simple_table(400, seed=11)
    a = full.filter(pc.equal(full["domain"], "a")).drop_columns(["domain"])
    b = full.filter(pc.equal(full["domain"], "b")).drop_columns(["domain", "tags", "y", "dwell"])
    pa_ = write_parquet(a, str(tmp_path / "in" / "a" / "part.parquet"), 50)
    pb = write_parquet(b, str(tmp_path / "in" / "b" / "part.parquet"), 50)
    return full, [DataSource(os.path.dirname(pa_), domain="a"), DataSource(os.path.dirname(pb), domain="b")]


def test_union_schema_marks_absent_features_and_tasks(per_domain):
    _, sources = per_domain
    schema = union_schema(sources, tasks=["click", "dwell"])
    assert schema.domain_names == ["a", "b"]
    b = schema.domains[1]
    assert set(b.features) == set(schema.feature_names) - {"tags", "y"}
    assert b.tasks == ["click"]
    assert schema.domains[0].features is None and schema.domains[0].tasks is None
    assert schema.task("dwell").kind == "regression" and schema.task("click").kind == "binary"
    # with a given schema, only domain presence is derived from the columns
    given = union_schema(sources, simple_schema(domains=[dict(name="a"), dict(name="b")]))
    assert given.domains[1].features == ["u", "x", "hist"] and given.domains[1].tasks == ["click"]


def test_consolidate_writes_one_dataset_with_masks(per_domain, tmp_path):
    full, sources = per_domain
    schema = union_schema(sources, simple_schema(domains=[dict(name="a"), dict(name="b")]))
    out = tmp_path / "merged"
    result = consolidate(sources, str(out), schema, row_group_size=64)
    assert result["rows"] == 400 and sum(result["rows_per_domain"].values()) == 400
    merged = pq.ParquetFile(result["files"][0])
    assert all(merged.metadata.row_group(i).num_rows == 64 for i in range(merged.metadata.num_row_groups - 1))
    table = pq.read_table(str(out))
    assert table.num_rows == 400 and "domain" in table.column_names
    b_rows = table.filter(pc.equal(table["domain"], "b"))
    assert b_rows["tags"].null_count == b_rows.num_rows and b_rows["dwell"].null_count == b_rows.num_rows
    assert os.path.exists(out / "_schema.yaml")
    # reading the merged dataset (schema embedded in the files) equals reading the per-domain sources lazily
    merged_ds = ParquetBatchDataset(str(out), Schema.from_yaml(str(out / "_schema.yaml")), batch_size=1000)
    lazy_ds = ParquetBatchDataset(sources, schema, batch_size=1000)
    (m,) = list(merged_ds.iter_shard(0, 0, 1, 0, 1))
    (z,) = list(lazy_ds.iter_shard(0, 0, 1, 0, 1))
    om, oz = np.argsort(m.example_id.numpy()), np.argsort(z.example_id.numpy())
    for name in ("dense", "dense_mask", "sparse_mask", "labels", "label_mask", "domain", "example_id"):
        assert torch.equal(getattr(m, name)[om], getattr(z, name)[oz]), name
    assert torch.equal(m.sparse["tags"].lengths()[om], z.sparse["tags"].lengths()[oz])
    # absent stays absent: domain b's tags/y are masked, its dwell label is masked
    in_b = m.domain == 1
    assert not m.sparse_mask[in_b, 1].any() and not m.dense_mask[in_b, 1].any() and not m.label_mask[in_b, 1].any()
    assert m.dense_mask[~in_b, 1].all()


def test_consolidate_validates_before_writing(per_domain, tmp_path):
    full, sources = per_domain
    bad = full.filter(pc.equal(full["domain"], "a")).drop_columns(["domain"])
    x = bad["x"].to_numpy(zero_copy_only=False).copy()
    x[3] = np.inf
    bad = bad.set_column(bad.column_names.index("x"), "x", pa.array(x))
    write_parquet(bad, str(tmp_path / "bad" / "a" / "p.parquet"), 50)
    out = tmp_path / "merged_bad"
    with pytest.raises(DataError, match="non-finite"):
        consolidate([DataSource(str(tmp_path / "bad" / "a"), domain="a"), sources[1]], str(out),
                    union_schema(sources, simple_schema(domains=[dict(name="a"), dict(name="b")])))
    assert not out.exists()


def test_consolidate_command(per_domain, tmp_path):
    _, sources = per_domain
    inputs = [f"{s.domain}={s.path}" for s in sources]
    assert [s.domain for s in parse_inputs(inputs)] == ["a", "b"]
    result = consolidate_command(inputs, str(tmp_path / "cmd"), tasks=["click", "dwell"], row_group_size=128)
    assert result["rows"] == 400
    with pytest.raises(FileExistsError):
        consolidate_command(inputs, str(tmp_path / "cmd"), tasks=["click", "dwell"])
