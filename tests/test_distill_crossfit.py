"""lattice.distill.crossfit: out-of-fold teacher logging — the k-fold cross-fit over the student's rows (each fold
scored by a teacher that never trained on it) and the join of the logged outputs back to the rows. Data plumbing
on tiny Parquet files."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _distill import folded_teacher_outputs
from lattice.distill.crossfit import cross_fit_slices, fold_of, read_teacher_logits


def _ids(directory):
    return sorted(int(e) for f in sorted(os.listdir(directory))
                  for e in pq.read_table(os.path.join(directory, f))["example_id"].to_numpy())


def _write(directory, name, ids):
    os.makedirs(directory, exist_ok=True)
    pq.write_table(pa.table({"example_id": pa.array(ids, pa.int64()), "x": pa.array(np.arange(len(ids), dtype=float))}),
                   os.path.join(directory, f"{name}.parquet"))


def test_fold_of_is_deterministic_and_balanced():
    ids = (np.int64(3) << np.int64(36)) + np.arange(10000, dtype=np.int64)  # consecutive rows of one domain
    folds = fold_of(ids, 3)
    assert np.array_equal(folds, fold_of(ids.copy(), 3))
    assert set(folds.tolist()) == {0, 1, 2}
    counts = np.bincount(folds, minlength=3)
    assert counts.min() > 3000 and counts.max() < 3700, counts
    assert (fold_of(ids, 1) == 0).all()


@pytest.mark.parametrize("folds", [2, 3])
def test_cross_fit_each_fold_is_scored_by_a_teacher_that_never_saw_it(tmp_path, folds):
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
        parts = cross_fit_slices(str(slices), slice_name, "shop", folds)
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
    (part,) = cross_fit_slices(str(slices), "teacher", "shop", 1)
    assert part == {"train": str(slices / "teacher"), "score": str(slices / "student")}


def test_out_of_fold_logits_join_by_example_id(tmp_path):
    data = folded_teacher_outputs(tmp_path)
    student, click, score, conv = data["student"], data["click"], data["score"], data["conv"]
    got = read_teacher_logits(data["folds"], student, ["click", "conversion"], average=False)
    assert np.array_equal(got["logits"][:, 0], score.astype(np.float32).astype(np.float64))
    assert np.array_equal(got["logits"][:, 1], -score.astype(np.float32).astype(np.float64))
    assert np.array_equal(got["labels"][:, 0], click) and np.array_equal(np.isnan(got["labels"][:, 1]), np.isnan(conv))
    with pytest.raises(ValueError, match="lack 200 example_ids"):  # one fold's outputs alone miss half the rows
        read_teacher_logits(data["folds"][:1], student, ["click"], average=False)


def test_fold_averaged_logits(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    y = (rng.random(n) < 0.2).astype(float)
    z = rng.normal(-1.5, 1.0, n) + y
    ids = np.arange(n, dtype=np.int64) * 3
    rows = tmp_path / "test"
    rows.mkdir()
    pq.write_table(pa.table({"example_id": ids, "click": y}), rows / "shop.parquet")
    for k, shift in enumerate((0.0, 1.0)):  # two fold teachers, each scoring every row, in another order
        order = rng.permutation(n)
        (tmp_path / f"fold{k}").mkdir()
        pq.write_table(pa.table({"example_id": ids[order], "logit_click": (z[order] + shift).astype(np.float32),
                                 "logit_like": np.zeros(n, np.float32)}), tmp_path / f"fold{k}" / "p.parquet")
    got = read_teacher_logits([str(tmp_path / "fold0"), str(tmp_path / "fold1")], str(rows), ["click", "like"])
    assert np.allclose(got["logits"][:, 0], z + 0.5, atol=1e-5)
    assert np.array_equal(got["labels"][:, 0], y) and np.isnan(got["labels"][:, 1]).all()
    with pytest.raises(FileNotFoundError, match="no Parquet files"):
        read_teacher_logits([str(tmp_path / "absent")], str(rows), ["click"])
    with pytest.raises(ValueError, match="folds must be >= 1"):
        fold_of(ids, 0)


def test_log_teacher_outputs_scores_every_row_once(tmp_path):
    import torch

    from _distill import TinyNetwork
    from lattice.data.synthetic import SyntheticConfig, SyntheticDomain, SyntheticWorld
    from lattice.distill.crossfit import log_teacher_outputs
    from lattice.train.module import LatticeModule

    world = SyntheticWorld(SyntheticConfig(seed=2, num_users=60, num_items=40, domains=[SyntheticDomain("shop", 300)],
                                           max_sequence_length=4, mean_sequence_length=2.0))
    world.write(str(tmp_path / "world"))
    torch.manual_seed(0)
    teacher = LatticeModule(TinyNetwork(world.schema(), dim=4, hidden=8))
    out = log_teacher_outputs(teacher, world.schema(), str(tmp_path / "world" / "shop"), str(tmp_path / "logged"),
                              batch_size=128)
    got = read_teacher_logits([out], str(tmp_path / "world" / "shop"), world.schema().task_names)
    assert got["logits"].shape == (300, len(world.schema().task_names)) and np.isfinite(got["logits"]).all()
    logged = pq.read_table(os.path.join(out, os.listdir(out)[0]))
    assert logged.num_rows == 300 and len(set(logged["example_id"].to_pylist())) == 300
