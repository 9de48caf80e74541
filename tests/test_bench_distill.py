"""benchmarks/bench_distill.py's out-of-sample teacher logging: the k-fold cross-fit over the student's
rows (each fold scored by a teacher that never trained on it) and the AUC of the logged outputs. Pure
data plumbing on tiny Parquet files: no model is trained here."""
import importlib.util
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _reference_metrics import pairwise_auc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distill", os.path.join(ROOT, "benchmarks", "bench_distill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ids(directory):
    return sorted(int(e) for f in sorted(os.listdir(directory))
                  for e in pq.read_table(os.path.join(directory, f))["example_id"].to_numpy())


def _write(directory, name, ids):
    os.makedirs(directory, exist_ok=True)
    pq.write_table(pa.table({"example_id": pa.array(ids, pa.int64()), "x": pa.array(np.arange(len(ids), dtype=float))}),
                   os.path.join(directory, f"{name}.parquet"))


def test_fold_of_is_deterministic_and_balanced(bench):
    ids = (np.int64(3) << np.int64(36)) + np.arange(10000, dtype=np.int64)  # consecutive rows of one domain
    folds = bench.fold_of(ids, 3)
    assert np.array_equal(folds, bench.fold_of(ids.copy(), 3))
    assert set(folds.tolist()) == {0, 1, 2}
    counts = np.bincount(folds, minlength=3)
    assert counts.min() > 3000 and counts.max() < 3700, counts
    assert (bench.fold_of(ids, 1) == 0).all()


@pytest.mark.parametrize("folds", [2, 3])
def test_cross_fit_each_fold_is_scored_by_a_teacher_that_never_saw_it(bench, tmp_path, folds):
    slices = tmp_path / "slices"
    shop_student = list(range(100, 160))           # the student's rows (its domain, before t_test)
    shop_teacher = shop_student + [500, 501]       # the teacher's slice may hold more of the domain
    feed = list(range(1000, 1040))
    _write(slices / "student", "shop", shop_student)
    _write(slices / "teacher", "shop", shop_teacher)
    _write(slices / "teacher", "feed", feed)
    # a stale slice holding only the student's early rows
    _write(slices / "stale", "shop", shop_student[:25])
    _write(slices / "stale", "feed", feed[:20])

    for slice_name, domain_rows, other in (("teacher", shop_teacher, feed), ("stale", shop_student[:25], feed[:20])):
        parts = bench.cross_fit_slices(str(slices), slice_name, "shop", folds)
        assert len(parts) == folds
        scored = []
        for part in parts:
            score = _ids(part["score"])
            train = _ids(part["train"])
            assert score and not set(score) & set(train)            # out-of-sample
            # everything else of the slice is kept: other domains whole, the student's other folds
            assert set(train) == (set(domain_rows) | set(other)) - set(score)
            scored += score
        assert sorted(scored) == shop_student                       # every student row scored exactly once

    # one fold: the old in-sample logging, on the slice itself
    (part,) = bench.cross_fit_slices(str(slices), "teacher", "shop", 1)
    assert part == {"train": str(slices / "teacher"), "score": str(slices / "student")}


def test_logged_auc_joins_by_example_id(bench, tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    ids = np.arange(n, dtype=np.int64) * 7
    click = (rng.random(n) < 0.3).astype(float)
    score = click + rng.normal(0, 1.0, n)
    conv = np.where(rng.random(n) < 0.5, np.nan, (rng.random(n) < 0.2).astype(float))
    student = tmp_path / "student"
    student.mkdir()
    pq.write_table(pa.table({"example_id": ids, "click": click,
                             "conversion": pa.array(conv, from_pandas=True)}), student / "shop.parquet")
    # teacher outputs split over two fold folders, in another row order
    order = rng.permutation(n)
    for k, part in enumerate(np.array_split(order, 2)):
        (tmp_path / f"fold{k}").mkdir()
        pq.write_table(pa.table({"example_id": ids[part], "logit_click": score[part].astype(np.float32),
                                 "logit_conversion": -score[part].astype(np.float32)}),
                       tmp_path / f"fold{k}" / "predictions-rank0.parquet")
    got = bench.logged_auc([str(tmp_path / "fold0"), str(tmp_path / "fold1")], str(student), ["click", "conversion"])

    assert got["click"] == pytest.approx(pairwise_auc(score.astype(np.float32), click), abs=1e-12)
    keep = np.isfinite(conv)
    assert got["conversion"] == pytest.approx(pairwise_auc(-score.astype(np.float32)[keep], conv[keep]), abs=1e-12)
    assert got["click"] > 0.6  # the score carries the label


def test_world_config_carries_rate_drift(bench):
    assert bench.world_config(True, 0, 0.6).rate_drift == 0.0
    assert bench.world_config(True, 0, 0.6, bench.RATE_DRIFT).rate_drift == bench.RATE_DRIFT > 0


def test_normalized_entropy_and_fold_averaged_logits(bench, tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    y = (rng.random(n) < 0.2).astype(float)
    z = rng.normal(-1.5, 1.0, n) + y
    logloss = np.mean(-(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z)))))
    r = y.mean()
    assert bench.normalized_entropy(z, y) == pytest.approx(logloss / -(r * np.log(r) + (1 - r) * np.log(1 - r)))
    # the base rate itself scores NE 1; nan labels are skipped
    assert bench.normalized_entropy(np.full(n, np.log(r / (1 - r))), y) == pytest.approx(1.0)
    assert bench.normalized_entropy(np.append(z, 5.0), np.append(y, np.nan)) == pytest.approx(bench.normalized_entropy(z, y))
    ids = np.arange(n, dtype=np.int64) * 3
    rows = tmp_path / "test"
    rows.mkdir()
    pq.write_table(pa.table({"example_id": ids, "click": y}), rows / "shop.parquet")
    for k, shift in enumerate((0.0, 1.0)):  # two fold teachers, rows in another order
        order = rng.permutation(n)
        (tmp_path / f"fold{k}").mkdir()
        pq.write_table(pa.table({"example_id": ids[order], "logit_click": (z[order] + shift).astype(np.float32),
                                 "logit_like": np.zeros(n, np.float32)}), tmp_path / f"fold{k}" / "p.parquet")
    got = bench.read_logits([str(tmp_path / "fold0"), str(tmp_path / "fold1")], str(rows), ["click", "like"])
    assert np.allclose(got["logits"][:, 0], z + 0.5, atol=1e-5)
    assert np.array_equal(got["labels"][:, 0], y) and np.isnan(got["labels"][:, 1]).all()


@pytest.mark.parametrize("argv", [["--variants", "labels,nope"], ["--variants", ","], ["--aux-hidden-dims", "16,x"],
                                  ["--aux-hidden-dims", "0"], ["--adapter-half-life-days", "-1"], ["--distill-weights", "3,x"]])
def test_bad_arguments_are_refused_before_any_work(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    err = capsys.readouterr().err
    assert argv[0] in err
