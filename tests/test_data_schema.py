"""Schema: YAML round trip, validation, presence, inference; the generate command."""
from __future__ import annotations

import os

import pyarrow as pa
import pytest

from lattice.data import DataSource, Schema, SchemaError, SyntheticConfig, TaskSpec, infer_schema
from lattice.data.commands import format_summary, generate, load_synthetic_config

from _data_utils import simple_schema, simple_table, write_parquet


def test_yaml_round_trip(tmp_path):
    schema = simple_schema()
    text = schema.to_yaml(str(tmp_path / "s.yaml"))
    assert Schema.from_yaml(str(tmp_path / "s.yaml")).to_dict() == schema.to_dict()
    assert Schema.from_yaml(text).to_dict() == schema.to_dict()
    # inside a data config, as the CLI writes it
    (tmp_path / "data.yaml").write_text("class_path: lattice.data.LatticeDataModule\ninit_args:\n  schema:\n" +
                                        "".join("    " + line + "\n" for line in text.splitlines()))
    assert Schema.from_yaml(str(tmp_path / "data.yaml")).to_dict() == schema.to_dict()
    assert schema.fingerprint() == Schema.from_dict(schema.to_dict()).fingerprint()


def test_views_and_presence():
    s = simple_schema()
    assert [f.name for f in s.dense_features] == ["x", "y"]
    assert [f.name for f in s.sparse_features] == ["u", "tags"]
    assert [f.name for f in s.sequence_features] == ["hist"]
    assert s.task_names == ["click", "dwell"] and s.domain_names == ["a", "b"]
    assert s.feature_presence("sparse").tolist() == [[True, True], [True, False]]
    assert s.feature_presence("dense").tolist() == [[True, True], [True, False]]
    assert s.task_presence().tolist() == [[True, True], [True, False]]
    assert s.feature("hist").table == "hist" and s.domain_index("b") == 1
    assert Schema(features=[], tasks=[TaskSpec("y")]).domain_names == ["default"]
    # YAML numbers are names
    assert Schema.from_dict(dict(features=[dict(name=101, kind="dense")], tasks=[dict(name="y")],
                                 domain_column=301, domains=[1, 2])).domain_names == ["1", "2"]


@pytest.mark.parametrize("bad, match", [
    (dict(features=[dict(name="a", kind="dense"), dict(name="a", kind="dense")]), "duplicate feature"),
    (dict(features=[dict(name="a", kind="blob")]), "kind must be"),
    (dict(features=[dict(name="a", kind="sparse")]), "num_embeddings"),
    (dict(features=[dict(name="a", kind="dense", num_embeddings=3)]), "only for sparse"),
    (dict(features=[dict(name="a", kind="sparse", num_embeddings=3, oov="drop")]), "oov must be"),
    (dict(features=[dict(name="a", kind="sparse", num_embeddings=3, colour="red")]), "unknown key"),
    (dict(tasks=[]), "at least one task"),
    (dict(tasks=[dict(name="c", windows=[dict(name="w", seconds=1, probability=1.0)])]), "delay_column"),
    (dict(tasks=[dict(name="c", delay_column="d", windows=[dict(name="a", seconds=10, probability=0.5),
                                                           dict(name="b", seconds=20, probability=0.4)])]),
     "sum to 1"),
    (dict(tasks=[dict(name="c", delay_column="d", windows=[dict(name="a", seconds=20, probability=0.5),
                                                           dict(name="b", seconds=10, probability=0.5)])]),
     "shortest first"),
    (dict(domains=[dict(name="a", features=["nope"])]), "unknown feature"),
    (dict(features=[dict(name="a", kind="sparse", num_embeddings=3),
                    dict(name="b", kind="sparse", num_embeddings=4, shared_table="a")]), "share table"),
    (dict(features=[dict(name="click", kind="dense")]), "both"),
])
def test_validation_errors(bad, match):
    d = dict(features=[], tasks=[dict(name="click")])
    d.update(bad)
    with pytest.raises(SchemaError, match=match):
        Schema.from_dict(d)


def test_inference_from_parquet(tmp_path):
    table = simple_table(200, seed=5)
    write_parquet(table, str(tmp_path / "d" / "p.parquet"), 64)
    s = infer_schema(str(tmp_path / "d"), tasks=["click", "dwell"])
    kinds = {f.name: f.kind for f in s.features}
    assert kinds == {"user_id": "sparse", "item_id": "sparse", "u": "sparse", "tags": "sparse", "x": "dense",
                     "y": "dense", "hist": "sequence"}
    assert s.user_id_column == "user_id" and s.feature("user_id").source == "user_id"
    assert s.feature("hist").timestamps_column == "hist_ts"
    assert s.feature("tags").num_embeddings == int(pa.compute.max(pa.compute.list_flatten(table["tags"])).as_py()) + 1
    assert s.task("click").kind == "binary" and s.task("dwell").kind == "regression"
    assert s.domain_names == ["a", "b"] and s.example_id_column == "example_id"


def test_generate_command(tmp_path):
    cfg = {"synthetic": {"num_users": 100, "num_items": 80,
                         "domains": [{"name": "a", "rows": 500}, {"name": "b", "rows": 100}]}}
    path = tmp_path / "fit.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"data": {"class_path": "lattice.data.LatticeDataModule", "init_args": cfg}}))
    loaded = load_synthetic_config(str(path))
    assert isinstance(loaded, SyntheticConfig) and loaded.num_users == 100
    result = generate(str(path), str(tmp_path / "out"))
    assert result["rows"] == {"a": 500, "b": 100}
    assert os.path.exists(tmp_path / "out" / "a" / "part-00000.parquet")
    # files carry the schema: inference reads it back exactly
    s = infer_schema([DataSource(str(tmp_path / "out" / "a"), domain="a")])
    assert s.to_dict() == Schema.from_yaml(str(tmp_path / "out" / "schema.yaml")).to_dict()
    assert "oracle AUC" in format_summary(result)
    with pytest.raises(FileExistsError):
        generate(str(path), str(tmp_path / "out"))
