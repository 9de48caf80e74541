"""Lattice Filter writers (YAML, CSV, JSON, table, plot) and run_filter end to end on the toy model."""
import builtins
import csv
import json

import numpy as np
import pytest
import yaml

from lattice.data.errors import SchemaError
from lattice.data.schema import Schema
from lattice.select.commands import run_filter
from lattice.select.importance import ImportanceResult
from lattice.select.pareto import pareto_select, weighted_sum_select
from lattice.select.report import (
    format_importance_table,
    plot_importance,
    write_importance_csv,
    write_kept_yaml,
    write_summary_json,
)

from _select_batches import ToyModel, toy_world

SCHEMA = {
    "example_id_column": "example_id",
    "domain_column": "domain",
    "user_id_column": "user_id",
    "item_id_column": "item_id",
    "timestamp_column": "timestamp",
    "features": [
        {"name": "d0", "kind": "dense"},
        {"name": "d1", "kind": "dense"},
        {"name": "s0", "kind": "sparse", "num_embeddings": 20},
        {"name": "s1", "kind": "sparse", "num_embeddings": 40000},
        {"name": "q0", "kind": "sequence", "num_embeddings": 40000, "timestamps_column": "q0_ts"},
    ],
    "tasks": [{"name": "t0"}, {"name": "t1"}],
    "domains": [{"name": "a", "features": ["d0", "s1", "q0"]}, {"name": "b"}],
}


def _result() -> ImportanceResult:
    rng = np.random.default_rng(0)
    ll = np.abs(rng.normal(size=(3, 5, 2))) * np.array([1, 0, 1, 0, 0.01])[None, :, None]
    auc = ll / 2
    auc[:, 4, 1] = np.nan  # a task where AUC is undefined for one feature
    return ImportanceResult(
        features=["d0", "d1", "s0", "s1", "q0"], kinds=["dense", "dense", "sparse", "sparse", "sequence"],
        tasks=["t0", "t1"], baseline_logloss=np.array([0.5, 0.6]), baseline_auc=np.array([0.8, 0.7]),
        delta_logloss=ll, delta_auc=auc, num_rows=1000, seed=0,
    )


def test_schema_restrict():
    schema = Schema.from_dict(SCHEMA)
    kept = schema.restrict(["s0", "d0", "q0"])
    assert kept.feature_names == ["d0", "s0", "q0"]  # schema order
    assert kept.domains[0].features == ["d0", "q0"] and kept.domains[1].features is None
    assert kept.tasks == schema.tasks and schema.feature_names[1] == "d1"  # the input is untouched
    assert kept.feature("q0") == schema.feature("q0")
    with pytest.raises(SchemaError, match=r"kept feature\(s\) \['nope'\] are not in the schema"):
        schema.restrict(["nope", "d0"])


def test_kept_yaml(tmp_path):
    res = _result()
    sel = pareto_select(res.matrix(), 2, names=res.features)
    path = tmp_path / "out" / "kept.yaml"
    doc = write_kept_yaml(path, sel, result=res, schema=Schema.from_dict(SCHEMA))
    text = path.read_text()
    assert text.startswith("# Lattice Filter: kept 2 of 5 features")
    loaded = yaml.safe_load(text)
    assert loaded == doc
    assert loaded["features"] == ["d0", "s0"]
    assert loaded["selection"]["method"] == "pareto" and loaded["selection"]["fronts"] == {"d0": 0, "s0": 0}
    assert [f["name"] for f in loaded["schema"]["features"]] == ["d0", "s0"]
    # a data config can point at the file: the schema is found under schema:
    assert Schema.from_yaml(str(path)) == Schema.from_dict(SCHEMA).restrict(["d0", "s0"])
    write_kept_yaml(tmp_path / "k2.yaml", sel, result=res)
    no_schema = yaml.safe_load((tmp_path / "k2.yaml").read_text())
    assert no_schema["features"] == ["d0", "s0"] and "schema" not in no_schema


def test_csv_json_table(tmp_path):
    res = _result()
    sel = pareto_select(res.matrix(), 2, names=res.features)
    ws = weighted_sum_select(res.matrix(), 2, names=res.features)
    write_importance_csv(tmp_path / "imp.csv", res, [sel, ws])
    rows = list(csv.DictReader(open(tmp_path / "imp.csv")))
    assert [r["feature"] for r in rows] == res.features
    assert rows[0]["kept_pareto"] == "1" and rows[1]["kept_pareto"] == "0"
    assert float(rows[2]["t1/dlogloss_mean"]) == pytest.approx(res.delta_logloss_mean[2, 1])
    assert float(rows[2]["t0/dauc_std"]) == pytest.approx(res.delta_auc_std[2, 0])
    assert rows[4]["t1/dauc_mean"] == "nan"
    doc = write_summary_json(tmp_path / "imp.json", res, [sel, ws])
    loaded = json.load(open(tmp_path / "imp.json"))
    assert loaded == json.loads(json.dumps(doc))
    assert loaded["selections"][0]["kept"] == ["d0", "s0"] and loaded["delta_auc_mean"][4][1] is None
    assert loaded["fronts"][0] == ["d0", "s0"]
    table = format_importance_table(res, sel, compare=ws)
    lines = table.splitlines()
    assert "t0" in lines[1] and "kept(weighted_sum)" in lines[1]
    assert lines[3].split()[0] in ("d0", "s0") and lines[4].split()[0] in ("d0", "s0")
    assert "±" in table and "baseline" in table and "kept 2 of 5" in table
    assert "nan" in format_importance_table(res, sel, metric="auc")
    assert len(format_importance_table(res, sel, max_rows=2).splitlines()) == 3 + 2 + 1 + 2


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    res = _result()
    sel = pareto_select(res.matrix(), 2, names=res.features)
    ws = weighted_sum_select(res.matrix(), 2, names=res.features)
    out = plot_importance(tmp_path / "p" / "imp.png", res, sel, "t0", "t1", compare=ws)
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    res = _result()
    sel = pareto_select(res.matrix(), 2, names=res.features)
    with pytest.raises(ImportError, match=r"pip install lattice-rec\[plot\]"):
        plot_importance(tmp_path / "x.png", res, sel, "t0", "t1")
    batches, w = toy_world(n=200, batch_size=100)
    with pytest.raises(ImportError, match=r"lattice-rec\[plot\]"):  # before any model call
        run_filter(ToyModel(w), batches, budget=2, out_dir=str(tmp_path), plot=True)


def test_run_filter_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    batches, w = toy_world(n=2000, batch_size=500, seed=1)
    out = run_filter(
        ToyModel(w), batches, budget=2, out_dir=str(tmp_path / "f"), repeats=2, seed=0,
        compare_weighted_sum=True, dense_names=["d0", "d1"], task_names=["t0", "t1"],
    )
    assert sorted(out.kept) == ["d0", "s0"]
    assert sorted(out.weighted_sum.names) == ["d0", "s0"]
    for key in ("kept_yaml", "kept_yaml_weighted_sum", "csv", "json", "table", "plot"):
        assert (tmp_path / "f").joinpath(out.files[key].split("/")[-1]).exists()
    assert yaml.safe_load(open(out.files["kept_yaml"]))["features"] == ["d0", "s0"]
    printed = capsys.readouterr().out
    assert "Permutation importance" in printed and "only Pareto keeps" in printed
    # the unused features are the last front(s) and were not kept
    ranks = dict(zip(out.importance.features, out.selection.rank.tolist()))
    assert ranks["d0"] == ranks["s0"] == 0 and min(ranks["d1"], ranks["s1"], ranks["q0"]) >= 1
    with pytest.raises(KeyError):
        run_filter(ToyModel(w), batches, budget=2, out_dir=str(tmp_path / "g"), plot_tasks=["t0", "zz"],
                   dense_names=["d0", "d1"], task_names=["t0", "t1"], repeats=1, print_table=False)


def test_run_filter_with_schema(tmp_path):
    schema = Schema.from_dict(SCHEMA)
    batches, w = toy_world(n=1000, batch_size=500, seed=2)
    out = run_filter(ToyModel(w), batches, budget=3, schema=schema, out_dir=str(tmp_path), repeats=2,
                     plot=False, print_table=False)
    assert out.importance.features == ["d0", "d1", "s0", "s1", "q0"] and out.importance.tasks == ["t0", "t1"]
    assert {"d0", "s0"} <= set(out.kept) and len(out.kept) == 3
    kept = Schema.from_yaml(out.files["kept_yaml"])  # what a data config would load
    assert kept.feature_names == [n for n in schema.feature_names if n in out.kept]
    assert kept.task_names == ["t0", "t1"]
