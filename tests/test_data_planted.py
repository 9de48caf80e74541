"""lattice.data.planted: the planted world's answer key for feature selection."""
import math

from lattice.data.planted import ORACLE_TERMS, oracle_rise, planted_informs
from lattice.data.synthetic import SyntheticConfig, SyntheticDomain, SyntheticTask


def test_planted_informs_follows_the_world():
    informs = planted_informs(SyntheticConfig())
    tasks = ["click", "like", "conversion"]
    assert informs["user"] == tasks and informs["position"] == tasks  # a click driver drives its children
    assert informs["item_brand"] == ["like"] and informs["price"] == ["conversion"]
    assert informs["user_segment"] == [] and "noise_s0" not in informs
    assert planted_informs(SyntheticConfig(), through_parent=False)["position"] == ["click"]
    cfg = SyntheticConfig(domains=[SyntheticDomain("feed", 100)],
                          tasks=[SyntheticTask("click", hour=0.0, position=0.0, query=0.0)])
    assert planted_informs(cfg)["hour"] == []


def test_oracle_rise_is_zero_without_the_term_and_positive_with_it():
    tasks = [SyntheticTask("click", base_rate=0.3, hour=1.5, position=0.0, query=0.0, device=0.0)]
    cfg = SyntheticConfig(num_users=100, num_items=60, domains=[SyntheticDomain("feed", 3000)], tasks=tasks)
    rise = oracle_rise(cfg, rows=3000)
    assert set(rise) == set(ORACLE_TERMS)
    assert rise["hour"]["click"] > 1e-3
    assert rise["position"]["click"] == rise["device"]["click"] == rise["query_cluster"]["click"] == 0.0
    cfg.domains[0].absent_features = ["hour"]  # no domain has the feature: nothing to average
    assert math.isnan(oracle_rise(cfg, rows=1000)["hour"]["click"])
