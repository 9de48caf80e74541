"""lattice.benchmark.planted (benchmarks/quality_ceiling.py): the planted terms its per-term ablations remove (the
generator's own, through :func:`draw`) rebuild the generator's logit."""
from __future__ import annotations

import numpy as np
import pytest

from lattice.benchmark.planted import draw
from lattice.data.synthetic import SyntheticConfig, SyntheticDomain, SyntheticTask, SyntheticWorld


def _world(drift: float) -> SyntheticWorld:
    tasks = [
        SyntheticTask("click", base_rate=0.2, seq=0.6, repeat=0.9, position=0.3, hour=0.7, query=1.1,
                      activity=0.5, user_bias=0.8, popularity=0.9, device=0.6),
        SyntheticTask("like", parent="click", base_rate=0.3, seq=1.2, repeat=0.0, brand=1.3, price=-0.7,
                      user_bias=0.4, popularity=0.2),
    ]
    domains = [
        SyntheticDomain("feed", 400, absent_features=["query_cluster"]),
        SyntheticDomain("search", 400, absent_features=["price"]),
    ]
    return SyntheticWorld(SyntheticConfig(
        seed=3, num_users=200, num_items=120, domains=domains, tasks=tasks, drift=drift, activity_daily_sd=0.3))


@pytest.mark.parametrize("drift", [0.0, 0.4])
def test_planted_terms_rebuild_the_generators_logit(drift):
    world = _world(drift)
    for di, domain in enumerate(world.config.domains):
        users, items, recs, _, _, extra = draw(world, di, 500, 0.0, 1.0, 5)
        terms = extra["terms"]
        assert set(terms) == {"user_bias", "popularity", "seq", "repeat", "brand", "position", "hour", "device",
                              "activity", "price", "query"}
        absent = "query" if "query_cluster" in domain.absent_features else "price"
        assert not terms[absent].any(), f"{domain.name}: {absent} is not in its files, so not in its truth"
        for task, offset, _ in recs:
            rest = offset - sum(getattr(task, name) * value for name, value in terms.items())
            # what is left is the domain's intercept for the task: one value on every row
            np.testing.assert_allclose(rest, rest[0], atol=1e-9, err_msg=f"{domain.name}/{task.name}")
            assert np.ptp(offset) > 0.5
