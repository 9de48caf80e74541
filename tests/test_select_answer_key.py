"""lattice.select.answer_key: a filter's importance summary checked against known informative / noise roles."""
import numpy as np

from lattice.select.answer_key import analyse_ranking, matrix

FEATURES = ["a", "b", "noise_0"]
TASKS = ["click", "like"]
ROLES = {"informative": ["a", "b"], "noise": ["noise_0"]}
INFORMS = {"a": ["click", "like"], "b": ["like"]}


def _summary(mean, se=None):
    return {"features": FEATURES, "tasks": TASKS, "delta_logloss_mean": mean, "selection_scores": mean,
            "delta_logloss_se": se, "fronts": [["a"], ["b"], ["noise_0"]]}


def test_noise_below_every_informative_feature_passes():
    rep = analyse_ranking(_summary([[3.0, 2.0], [0.5, 1.0], [0.1, 0.2]]), ROLES, INFORMS)
    assert rep["ranking_pass"] and rep["ranking_pass_every_task"] and rep["noise_fronts_after_informative"]
    assert rep["order_by_task"]["click"] == ["a", "b", "noise_0"]
    assert rep["noise"]["noise_0"]["rank_by_task"] == {"click": 3, "like": 3}
    assert rep["margin_by_task"]["like"] == 1.0 - 0.2


def test_violations_only_count_on_informed_tasks_and_unresolvable_pairs_are_set_apart():
    # b sits below the noise on click (which it does not inform) and on like (which it does)
    mean = [[3.0, 2.0], [0.0, 0.1], [0.1, 0.2]]
    rep = analyse_ranking(_summary(mean, se=[[0.1, 0.1], [0.1, 0.1], [0.1, 0.1]]), ROLES, INFORMS,
                          oracle={"b": {"like": 0.05}})
    assert [(v["feature"], v["task"]) for v in rep["violations"]] == [("b", "like")]
    assert len(rep["violations_any_task"]) == 2 and not rep["ranking_pass"]
    # the oracle itself would rise 0.05 < 2 standard errors: beyond the evaluation set's resolution
    assert rep["unresolvable"] == [{"feature": "b", "task": "like", "oracle_rise": 0.05, "se": 0.1}]
    assert rep["violations_resolvable"] == [] and rep["ranking_pass_resolvable"]


def test_matrix_reads_none_as_nan():
    assert np.isnan(matrix([[1.0, None]])[0, 1])
