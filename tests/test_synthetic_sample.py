"""SyntheticWorld's public planted-world API: sample() draws fresh calibrated rows, feature_terms() names the
planted terms each feature carries."""
import numpy as np
import pytest

from lattice.data.synthetic import SyntheticConfig, SyntheticDomain, SyntheticWorld


def _world():
    return SyntheticWorld(SyntheticConfig(seed=4, num_users=120, num_items=90,
                                          domains=[SyntheticDomain("feed", 300), SyntheticDomain("shop", 200)]))


def test_sample_is_seeded_and_in_its_time_window():
    world = _world()
    a = world.sample("shop", 400, seed=1, start=0.25, end=0.5)
    b = world.sample("shop", 400, seed=1, start=0.25, end=0.5)
    assert np.array_equal(a["ts"], b["ts"]) and all(np.array_equal(a["z"][t], b["z"][t]) for t in a["z"])
    assert (np.diff(a["ts"]) >= 0).all() and a["tau"].min() >= 0.249 and a["tau"].max() <= 0.501
    other = world.sample("shop", 400, seed=1, start=0.25, end=0.5, stream=7)
    assert np.array_equal(other["ts"], a["ts"]) and not np.array_equal(other["cols"]["users"], a["cols"]["users"])
    assert set(a["z"]) == {t.name for t in world.config.tasks}
    # calibrated like the written rows: the click rate is near its planted base rate
    click = next(t for t in world.config.tasks if t.name == "click")
    rate = (1 / (1 + np.exp(-world.sample("feed", 4000)["z"]["click"]))).mean()
    assert abs(rate - click.base_rate) < 0.03
    with pytest.raises(ValueError, match="unknown domain 'video'"):
        world.sample("video", 10)


def test_feature_terms_cover_the_informative_features():
    world = _world()
    terms = world.feature_terms()
    assert set(terms) == set(world.feature_roles()["informative"])
    assert terms["hour"] == ["hour"] and terms["user_segment"] == []
    assert all(hasattr(world.config.tasks[0], term) for carried in terms.values() for term in carried)
