"""MinHash accuracy, streaming portfolio statistics and the grouping, on a small Parquet world."""
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lattice.data.schema import Schema
from lattice.select.commands import run_partition
from lattice.select.partition import (
    DelayHistogram,
    MinHash,
    agglomerate,
    group_schema,
    hash_ids,
    jaccard_matrix,
    partition_portfolios,
    scan_portfolios,
)


# --------------------------------------------------------------------------------------------------
# hashing and MinHash
# --------------------------------------------------------------------------------------------------
def test_hash_ids_kinds():
    a = hash_ids(pa.array([5, 6, None, 5], pa.int32()))
    b = hash_ids(np.array([5, 6, 5], dtype=np.int64))
    assert a.dtype == np.uint64 and np.array_equal(a, b)  # by value, nulls dropped
    s = hash_ids(pa.array(["u1", "u22", None, "u1", ""]))
    assert s.size == 4 and s[0] == s[2] and len(set(s.tolist())) == 3
    ls = hash_ids(pa.array(["u1", "u22"], pa.large_string()))
    assert np.array_equal(ls, s[:2])
    sliced = hash_ids(pa.array(["x", "u1", "u22"]).slice(1))
    assert np.array_equal(sliced, s[:2])
    d = hash_ids(pa.array(["u1", "u22", "u1"]).dictionary_encode())
    assert np.array_equal(d, s[[0, 1, 0]])
    assert np.array_equal(hash_ids(pa.chunked_array([[1, 2], [3]])), hash_ids(np.array([1, 2, 3])))
    with pytest.raises(TypeError):
        hash_ids(pa.array([1.5, 2.5]))


def _exact_jaccard(a, b) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b)


@pytest.mark.parametrize("num_perm", [128, 256])
def test_minhash_jaccard_within_stated_error(num_perm):
    rng = np.random.default_rng(0)
    worst = 0.0
    for target in (0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0):
        for trial in range(3):
            n = int(rng.integers(2000, 6000))
            inter = int(round(2 * n * target / (1 + target)))
            base = int(rng.integers(0, 10**9))
            a = np.arange(base, base + n)                      # consecutive ids: the adversarial case
            b = np.arange(base + n - inter, base + 2 * n - inter)
            j = _exact_jaccard(a, b)
            sa, sb = MinHash(num_perm, seed=trial), MinHash(num_perm, seed=trial)
            sa.update(a)
            sb.update(b)
            est = sa.jaccard(sb)
            bound = 4 * math.sqrt(j * (1 - j) / num_perm) + 1 / num_perm
            assert abs(est - j) <= bound, (target, trial, est, j, bound)
            worst = max(worst, abs(est - j) / max(bound, 1e-12))
    assert worst > 0  # not trivially exact


def test_minhash_error_matches_binomial_model():
    """Across seeds the estimate's z-scores look standard normal (mean ~0, std ~1)."""
    k = 128
    a, b = np.arange(0, 3000), np.arange(1500, 4500)  # J = 1500 / 4500 = 1/3
    j = 1 / 3
    z = []
    for seed in range(40):
        sa, sb = MinHash(k, seed=seed).update(a), MinHash(k, seed=seed).update(b)
        z.append((sa.jaccard(sb) - j) / math.sqrt(j * (1 - j) / k))
    z = np.array(z)
    assert abs(z.mean()) < 0.6 and 0.6 < z.std() < 1.4


def test_minhash_merge_streaming_and_strings():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50_000, size=20_000)
    whole = MinHash(64, seed=3).update(ids)
    parts = [MinHash(64, seed=3).update(chunk) for chunk in np.array_split(ids, 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert np.array_equal(merged.mins, whole.mins)  # merge == sketch of the union, exactly
    inplace = MinHash(64, seed=3)
    for chunk in np.array_split(ids, 5):
        inplace.update(chunk)  # streaming updates == one update
    assert np.array_equal(inplace.mins, whole.mins)
    n_true = np.unique(ids).size
    assert abs(whole.cardinality() - n_true) / n_true < 0.35
    s1 = MinHash(128).update(pa.array([f"user{i}" for i in range(0, 2000)]))
    s2 = MinHash(128).update(pa.array([f"user{i}" for i in range(1000, 3000)]))
    assert abs(s1.jaccard(s2) - 1000 / 3000) < 4 * math.sqrt((1 / 3) * (2 / 3) / 128) + 1 / 128
    with pytest.raises(ValueError):
        whole.merge(MinHash(64, seed=4))
    with pytest.raises(ValueError):
        whole.jaccard(MinHash(32, seed=3))
    empty = MinHash(64, seed=3)
    assert empty.is_empty and empty.jaccard(whole) == 0.0 and empty.jaccard(MinHash(64, seed=3)) == 1.0
    jm = jaccard_matrix([whole, merged, empty])
    assert jm[0, 1] == 1.0 and jm[0, 2] == 0.0 and jm[2, 2] == 1.0
    again = MinHash.from_state_dict(whole.state_dict())
    assert np.array_equal(again.mins, whole.mins) and again.jaccard(whole) == 1.0


def test_minhash_bounded_chunks_agree():
    ids = np.arange(10_000)
    a = MinHash(32, chunk_elements=32 * 7).update(ids)  # 7 ids per chunk
    b = MinHash(32).update(ids)
    assert np.array_equal(a.mins, b.mins)


def test_delay_histogram():
    h = DelayHistogram()
    d = np.concatenate([np.zeros(10), np.full(80, 3600.0), np.full(10, 7 * 86400.0)])
    h.update(d)
    h.update(np.array([np.nan]))
    assert h.count == 100
    assert h.quantile(0.05) == 0.0
    assert abs(math.log10(h.quantile(0.5)) - math.log10(3600)) < 0.05
    assert abs(math.log10(h.quantile(0.95)) - math.log10(7 * 86400)) < 0.05
    assert math.isnan(DelayHistogram().quantile(0.5))
    other = DelayHistogram().update(np.full(100, 10.0))
    h.merge_(other)
    assert h.count == 200 and abs(h.mean - (80 * 3600 + 10 * 7 * 86400 + 1000) / 200) < 1e-6


# --------------------------------------------------------------------------------------------------
# a planted Parquet world: A and B share users and items, C and D share others, none across
# --------------------------------------------------------------------------------------------------
def _write_domain(path, rng, users, items, n, conv_delay_s, with_conv=True, string_ids=False):
    u = rng.choice(users, size=n)
    i = rng.choice(items, size=n)
    click = (rng.random(n) < 0.1).astype(np.float64)
    cols = {
        "example_id": pa.array(np.arange(n)),
        "user_id": pa.array([f"u{x}" for x in u]) if string_ids else pa.array(u),
        "item_id": pa.array(i),
        "click": pa.array(click),
    }
    if with_conv:
        conv = np.where(click > 0, (rng.random(n) < 0.3).astype(np.float64), 0.0)
        conv_mask = rng.random(n) < 0.9  # some rows unlabelled (null)
        delay = np.where(conv > 0, rng.lognormal(math.log(conv_delay_s), 0.3, size=n), np.nan)
        cols["conversion"] = pa.array(conv, mask=~conv_mask)
        cols["conversion_delay"] = pa.array(delay, mask=np.isnan(delay))
    pq.write_table(pa.table(cols), path, row_group_size=700)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("partition_world")
    rng = np.random.default_rng(0)
    pool_ab, pool_cd = np.arange(0, 800), np.arange(10_000, 10_800)
    items_ab, items_cd = np.arange(0, 300), np.arange(5_000, 5_300)
    paths = {}
    for name, users, items, delay, string_ids in (
        ("A", pool_ab, items_ab, 86400.0, False),
        ("B", pool_ab, items_ab, 80000.0, False),
        ("C", pool_cd, items_cd, 86400.0, False),
        ("D", pool_cd, items_cd, 90000.0, False),
    ):
        p = d / f"{name}.parquet"
        _write_domain(p, rng, users, items, 3000, delay, string_ids=string_ids)
        paths[name] = str(p)
    return d, paths


TASKS = {"click": "click", "conversion": "conversion"}
DELAYS = {"conversion": "conversion_delay"}


def test_scan_statistics(world):
    _, paths = world
    st = scan_portfolios(paths, tasks=TASKS, delay_columns=DELAYS, num_perm=128, batch_size=1000)
    assert st.domains == ["A", "B", "C", "D"]
    assert all(st.rows[d] == 3000 for d in st.domains)
    ju = st.user_jaccard()
    assert ju[0, 1] > 0.8 and ju[2, 3] > 0.8
    assert ju[0, 2] < 0.05 and ju[1, 3] < 0.05
    for d in st.domains:
        table = pq.read_table(paths[d])
        click = table["click"].to_numpy()
        assert st.labelled[(d, "click")] == 3000
        assert math.isclose(st.base_rate(d, "click"), click.mean())
        conv = table["conversion"]
        assert st.labelled[(d, "conversion")] == len(conv) - conv.null_count
        assert st.delay_quantile(d, "click") == 0.0  # no delay column: immediate
        assert 40_000 < st.delay_quantile(d, "conversion") < 200_000
    assert sorted(st.portfolios()) == sorted((d, t) for d in "ABCD" for t in TASKS)


def test_partition_groups_shared_users(world):
    _, paths = world
    st = scan_portfolios(paths, tasks=TASKS, delay_columns=DELAYS, num_perm=128)
    part = partition_portfolios(st, budget=2)
    groups = [sorted({d for d, _ in g}) for g in part.groups]
    assert sorted(groups) == [["A", "B"], ["C", "D"]]
    assert sum(len(g) for g in part.groups) == 8
    # with room for more models, domains that share nothing are never put together
    for budget in (3, 4, 8):
        part = partition_portfolios(st, budget=budget)
        assert len(part.groups) <= budget
        for g in part.groups:
            doms = {d for d, _ in g}
            assert doms <= {"A", "B"} or doms <= {"C", "D"}
    # budget 4 at the default threshold: clicks and delayed conversions get their own models
    part = partition_portfolios(st, budget=4)
    assert len(part.groups) == 4
    for g in part.groups:
        assert len({t for _, t in g}) == 1
    # budget 1: everything in one model
    assert len(partition_portfolios(st, budget=1).groups) == 1


def test_consolidated_dataset_and_run_partition(world, tmp_path):
    d, paths = world
    # one consolidated file with a string domain column
    tables = []
    for name, p in paths.items():
        t = pq.read_table(p)
        tables.append(t.append_column("domain", pa.array([name] * t.num_rows)))
    cons = tmp_path / "consolidated.parquet"
    pq.write_table(pa.concat_tables(tables), cons, row_group_size=1000)
    schema = {
        "example_id_column": "example_id", "domain_column": "domain", "user_id_column": "user_id",
        "item_id_column": "item_id", "timestamp_column": None,
        "features": [{"name": "f", "kind": "dense"}],
        "tasks": [{"name": "click"},
                  {"name": "conversion", "delay_column": "conversion_delay",
                   "windows": [{"name": "1d", "seconds": 86400, "probability": 0.5},
                               {"name": "7d", "seconds": 604800, "probability": 0.5}]}],
        "domains": [{"name": n} for n in "ABCD"],
    }
    out = tmp_path / "plan" / "partition.yaml"
    res = run_partition(str(cons), budget=2, out=str(out), schema=schema, num_perm=128, print_table=False)
    groups = [sorted({p["domain"] for p in m["portfolios"]}) for m in res.document["models"]]
    assert sorted(groups) == [["A", "B"], ["C", "D"]]
    doc = yaml.safe_load(out.read_text())
    assert doc["num_models"] == 2 and doc["budget"] == 2
    m0 = doc["models"][0]
    assert m0["data"]["paths"] == [str(cons)]
    assert {dd["name"] for dd in m0["data"]["schema"]["domains"]} == set(m0["domains"])
    assert all(dd["tasks"] == ["click", "conversion"] for dd in m0["data"]["schema"]["domains"])
    assert doc["stats"]["user_jaccard"]["A"]["B"] > 0.8 and doc["stats"]["user_jaccard"]["A"]["C"] < 0.05
    assert len(doc["stats"]["portfolios"]) == 8
    for name in ("model_0", "model_1"):
        sch = yaml.safe_load(open(res.files[name]))
        assert sch["tasks"][1]["delay_column"] == "conversion_delay"
        assert len(Schema.from_dict(sch).domains) == 2
    assert "model_0" in res.table and "Jaccard" in res.table

    # per-domain sources give the same grouping and per-domain paths
    res2 = run_partition(paths, budget=2, out=str(tmp_path / "p2.yaml"), tasks=TASKS, delay_columns=DELAYS,
                         num_perm=128, print_table=False)
    m = res2.document["models"][0]
    assert m["data"]["domain_paths"] == {dd: paths[dd] for dd in m["domains"]}


def test_missing_label_column_means_absent_task(tmp_path):
    rng = np.random.default_rng(3)
    _write_domain(tmp_path / "x.parquet", rng, np.arange(100), np.arange(50), 500, 3600.0)
    _write_domain(tmp_path / "y.parquet", rng, np.arange(100), np.arange(50), 500, 3600.0, with_conv=False,
                  string_ids=True)
    st = scan_portfolios({"x": tmp_path / "x.parquet", "y": tmp_path / "y.parquet"}, tasks=TASKS,
                         delay_columns=DELAYS, num_perm=64)
    assert ("y", "conversion") not in st.portfolios() and ("y", "click") in st.portfolios()
    assert st.user_jaccard()[0, 1] < 0.1  # ints vs strings "u<n>" are different ids
    with pytest.raises(KeyError, match="user_id"):
        scan_portfolios({"x": tmp_path / "x.parquet"}, tasks=TASKS, user_id_column="uid")
    with pytest.raises(FileNotFoundError):
        scan_portfolios({"x": tmp_path / "nope.parquet"}, tasks=TASKS)
    with pytest.raises(ValueError):
        scan_portfolios(tmp_path / "x.parquet", tasks=TASKS, domain_column=None)


def test_agglomerate():
    s = np.array([
        [1.0, 0.9, 0.1, 0.0],
        [0.9, 1.0, 0.2, 0.0],
        [0.1, 0.2, 1.0, 0.7],
        [0.0, 0.0, 0.7, 1.0],
    ])
    assert agglomerate(s, budget=4) == [[0, 1], [2, 3]]  # merges above the threshold anyway
    assert agglomerate(s, budget=4, merge_threshold=0.8) == [[0, 1], [2], [3]]
    assert agglomerate(s, budget=4, merge_threshold=1.1) == [[0], [1], [2], [3]]
    assert agglomerate(s, budget=1) == [[0, 1, 2, 3]]
    assert agglomerate(np.zeros((0, 0)), budget=2) == []
    with pytest.raises(ValueError):
        agglomerate(s, budget=0)


def test_lattice_partition_command(world, tmp_path, capsys):
    """The console command: ``lattice partition --data DOMAIN=PATH ... --budget 2`` parses its options
    (lists, mappings) and writes the same grouping as the function."""
    from lattice.cli import main

    _, paths = world
    out = tmp_path / "plan.yaml"
    main(["partition", "--data", yaml.safe_dump([f"{d}={p}" for d, p in paths.items()], default_flow_style=True),
          "--budget", "2", "--out", str(out), "--tasks", '{"click": "click", "conversion": "conversion"}',
          "--delay_columns", '{"conversion": "conversion_delay"}', "--num_perm", "64"])
    doc = yaml.safe_load(out.read_text())
    assert doc["num_models"] == 2
    groups = sorted(sorted({p["domain"] for p in m["portfolios"]}) for m in doc["models"])
    assert groups == [["A", "B"], ["C", "D"]]
    assert doc["models"][0]["data"]["domain_paths"] == {d: paths[d] for d in doc["models"][0]["domains"]}
    assert "Lattice partition: 8 portfolios -> 2 model(s)" in capsys.readouterr().out


def test_group_schema_keeps_the_group_s_domains_tasks_and_features():
    schema = Schema(
        features=[{"name": "f0", "kind": "dense"}, {"name": "f1", "kind": "dense"}, {"name": "f2", "kind": "dense"}],
        tasks=[{"name": "click"}, {"name": "like"}, {"name": "buy"}],
        domains=[{"name": "feed", "features": ["f0"]}, {"name": "shop", "features": ["f0", "f2"]}, {"name": "ads"}],
    )
    one = group_schema(schema, ["shop", "feed"], {"shop": ["buy", "click"], "feed": ["click"]})
    assert one.domain_names == ["shop", "feed"] and one.task_names == ["click", "buy"]
    assert [d.tasks for d in one.domains] == [["click", "buy"], ["click"]]
    assert one.feature_names == ["f0", "f2"]  # the union of the kept domains' lists
    # a domain that lists no features keeps them all
    assert group_schema(schema, ["feed", "ads"], {"feed": ["like"], "ads": ["like"]}).feature_names == ["f0", "f1", "f2"]


def test_lattice_partition_command_end_to_end(world, tmp_path):
    """``lattice partition`` as the README runs it, in a subprocess, with a schema YAML."""
    _, paths = world
    schema = Schema(
        features=[{"name": "f", "kind": "dense"}],
        tasks=[{"name": "click"},
               {"name": "conversion", "delay_column": "conversion_delay",
                "windows": [{"name": "1d", "seconds": 86400, "probability": 0.5},
                            {"name": "7d", "seconds": 604800, "probability": 0.5}]}],
        domains=list(paths), domain_column=None, timestamp_column=None,
    )
    schema.to_yaml(tmp_path / "schema.yaml")
    data = "[" + ",".join(f"{d}={p}" for d, p in paths.items()) + "]"
    proc = subprocess.run(
        [sys.executable, "-m", "lattice.cli", "partition", "--data", data, "--budget", "2", "--schema", "schema.yaml",
         "--num_perm", "128", "--out", "plan/partition.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ, LATTICE_CACHE=str(tmp_path)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model_0" in proc.stdout and "Jaccard" in proc.stdout
    doc = yaml.safe_load((tmp_path / "plan" / "partition.yaml").read_text())
    assert sorted(sorted(m["domains"]) for m in doc["models"]) == [["A", "B"], ["C", "D"]]
    for m in doc["models"]:
        model_schema = Schema.from_yaml(str(tmp_path / "plan" / f"partition.{m['name']}.schema.yaml"))
        assert model_schema.domain_names == m["domains"] and model_schema.task_names == ["click", "conversion"]
        assert model_schema == Schema.from_dict(m["data"]["schema"])
