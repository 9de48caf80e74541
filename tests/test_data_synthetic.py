"""The planted synthetic world: determinism, structure, truth columns, known noise."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lattice.data import ParquetBatchDataset, Schema, SyntheticConfig, SyntheticDomain, SyntheticWorld
from lattice.metrics import binary_auc



def tiny(seed: int = 0, **kw) -> SyntheticConfig:
    base = dict(
        seed=seed, num_users=600, num_items=400,
        domains=[SyntheticDomain("feed", 6000, shift=0.3, absent_features=["query_cluster"]),
                 SyntheticDomain("search", 3000, absent_features=["item_tags"]),
                 SyntheticDomain("video", 2000, tasks=["click", "like"], absent_features=["query_cluster", "price"]),
                 SyntheticDomain("shop", 400, absent_features=["query_cluster"], delay_scale=2.0)],
        row_group_size=1024,
    )
    base.update(kw)
    return SyntheticConfig(**base)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "w"
    SyntheticWorld(tiny()).write(str(out))
    return str(out)


def _domain(world_dir, name) -> pa.Table:
    return pq.read_table(os.path.join(world_dir, name))


def test_deterministic_and_seeded():
    a = pa.concat_tables(SyntheticWorld(tiny()).domain_tables("shop"))
    b = pa.concat_tables(SyntheticWorld(tiny()).domain_tables("shop"))
    c = pa.concat_tables(SyntheticWorld(tiny(seed=1)).domain_tables("shop"))
    assert a.equals(b)
    assert not a.column("click").equals(c.column("click"))
    assert tiny().fingerprint() == tiny().fingerprint() != tiny(seed=1).fingerprint()
    assert tiny().fingerprint() != tiny(drift=0.0).fingerprint()


def test_written_world_matches_its_schema(world_dir):
    world = SyntheticWorld(tiny())
    schema = Schema.from_yaml(os.path.join(world_dir, "schema.yaml"))
    assert schema.to_dict() == world.schema().to_dict()
    manifest = json.load(open(os.path.join(world_dir, "world.json")))
    assert manifest["rows"] == {"feed": 6000, "search": 3000, "video": 2000, "shop": 400}
    assert set(manifest["feature_roles"]["noise"]) == {"noise_s0", "noise_s1", "noise_d0", "noise_d1"}
    video = _domain(world_dir, "video")
    assert "query_cluster" not in video.column_names and "price" not in video.column_names
    assert "conversion" not in video.column_names and "p_conversion" not in video.column_names
    assert "item_tags" not in _domain(world_dir, "search").column_names
    # the whole world streams through the reader with its schema; absent features are masked
    ds = ParquetBatchDataset(world.sources(world_dir), schema, batch_size=4096, shuffle=True)
    ids, seen = [], 0
    for batch in ds.iter_shard(0, 0, 1, 0, 1):
        ids.append(batch.example_id.numpy())
        seen += batch.batch_size
        video_rows = batch.domain == 2
        conv = schema.task_names.index("conversion")
        assert not batch.label_mask[video_rows, conv].any() and batch.label_mask[~video_rows, conv].all()
        q = [f.name for f in schema.sparse_features].index("query_cluster")
        assert batch.sparse_mask[:, q].eq(batch.domain == 1).all()
        assert batch.true_probs is not None
    assert seen == 11400 and len(np.unique(np.concatenate(ids))) == 11400


def test_truth_is_calibrated_and_informative(world_dir):
    feed = _domain(world_dir, "feed")
    for task in ("click", "like", "conversion"):
        y = feed[task].to_numpy().astype(float)
        p = feed["p_" + task].to_numpy()
        assert abs(p.mean() - y.mean()) < 0.02, task
        assert binary_auc(p, y) > 0.75, task
    click = feed["click"].to_numpy()
    # tasks are nested: like and conversion only after a click
    assert (feed["conversion"].to_numpy() <= click).all() and (feed["like"].to_numpy() <= click).all()
    assert (feed["p_conversion"].to_numpy() <= feed["p_click"].to_numpy() + 1e-6).all()


def test_delays_sequences_and_noise(world_dir):
    shop = _domain(world_dir, "shop")
    conv = shop["conversion"].to_numpy()
    delay = shop["conversion_delay"]
    assert delay.null_count == int((conv == 0).sum())
    d = delay.to_numpy(zero_copy_only=False)[conv == 1]
    assert (d >= 0).all() and (d <= 7 * 86400).all()
    feed = _domain(world_dir, "feed")
    items = feed["hist_items"].combine_chunks()
    clusters = feed["hist_clusters"].combine_chunks()
    ts = feed["hist_ts"].combine_chunks()
    lens = np.diff(items.offsets.to_numpy())
    assert lens.max() <= 32 and lens.mean() > 4
    assert np.array_equal(np.diff(ts.offsets.to_numpy()), lens)
    world = SyntheticWorld(tiny())
    item_cluster = world.params()["item_cluster"]
    assert np.array_equal(item_cluster[items.values.to_numpy()], clusters.values.to_numpy())
    # oldest first, all before the impression
    tv = ts.values.to_numpy()
    row = np.repeat(np.arange(len(lens)), lens)
    assert (tv < feed["timestamp"].to_numpy()[row]).all()
    inner = np.diff(tv)[(row[1:] == row[:-1])]
    assert (inner >= 0).all()
    # noise is noise; an informative feature is not
    click = feed["click"].to_numpy()
    for name in ("noise_d0", "noise_d1"):
        assert abs(binary_auc(feed[name].to_numpy(), click) - 0.5) < 0.04, name
    assert binary_auc(-feed["position"].to_numpy(), click) > 0.55


def test_domains_share_user_structure(world_dir):
    """The same users behave alike across domains (shared factors), so one domain informs another."""
    feed, search = _domain(world_dir, "feed"), _domain(world_dir, "search")

    def per_user(t):
        u = t["user_id"].to_numpy()
        p = t["p_click"].to_numpy()
        return np.bincount(u, weights=p, minlength=600) / np.maximum(np.bincount(u, minlength=600), 1), \
            np.bincount(u, minlength=600)

    a, na = per_user(feed)
    b, nb = per_user(search)
    both = (na >= 5) & (nb >= 3)
    assert both.sum() > 50
    assert np.corrcoef(a[both], b[both])[0, 1] > 0.3


def test_config_validation():
    with pytest.raises(ValueError, match="parent"):
        SyntheticConfig(tasks=[dict(name="conversion", parent="click")])
    with pytest.raises(ValueError, match="unknown task"):
        SyntheticConfig(domains=[dict(name="d", rows=10, tasks=["nope"])])
    with pytest.raises(ValueError, match="absent_features"):
        SyntheticWorld(SyntheticConfig(domains=[dict(name="d", rows=10, absent_features=["nope"])])).schema()


def test_user_activity_enters_the_logit_through_its_coefficient():
    """``user_activity`` is informative in the answer key, so a task with ``activity`` != 0 must depend
    on it (heavy users click more), and one with ``activity`` = 0 must not."""
    def click_auc(activity: float) -> float:
        tasks = [dict(name="click", base_rate=0.2, activity=activity)]
        domains = [SyntheticDomain("feed", 6000, absent_features=["query_cluster"])]
        feed = pa.concat_tables(SyntheticWorld(tiny(tasks=tasks, domains=domains)).domain_tables("feed"))
        ua = feed["user_activity"].to_numpy(zero_copy_only=False)
        keep = ~np.isnan(ua)
        p_click = feed["p_click"].to_numpy()[keep]
        return binary_auc(ua[keep], (p_click > np.median(p_click)).astype(float))

    assert click_auc(1.5) > 0.65
    assert abs(click_auc(0.0) - 0.5) < 0.05


def test_rate_drift_default_leaves_the_world_and_moves_base_rates():
    import hashlib

    # default 0: the same rows as a world built without the field, and the fingerprint it had before the
    # field existed (the config without ``rate_drift``)
    base = tiny()
    assert base.rate_drift == 0.0
    same = pa.concat_tables(SyntheticWorld(tiny(rate_drift=0.0)).domain_tables("feed"))
    assert same.equals(pa.concat_tables(SyntheticWorld(base).domain_tables("feed")))
    old = base.to_dict()
    del old["rate_drift"], old["activity_daily_sd"], old["user_spread"], old["item_spread"]
    blob = json.dumps({"v": 1, "config": old}, sort_keys=True, default=str)
    assert base.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert tiny(rate_drift=1.0).fingerprint() != base.fingerprint()
    # rate_drift > 0: each binary task's rate moves over the span in its planted direction
    world = SyntheticWorld(tiny(rate_drift=2.0))
    direction = world.params()["rate_direction"]
    assert set(np.unique(direction)) <= {-1.0, 1.0}
    ti = [t.name for t in world.config.tasks].index("click")
    feed = pa.concat_tables(world.domain_tables("feed"))
    ts = feed.column("timestamp").to_numpy()
    first, last = ts <= np.quantile(ts, 0.25), ts >= np.quantile(ts, 0.75)
    p_click = feed.column("p_click").to_numpy()
    base_p = pa.concat_tables(SyntheticWorld(base).domain_tables("feed")).column("p_click").to_numpy()
    moved = (p_click[last].mean() - p_click[first].mean()) - (base_p[last].mean() - base_p[first].mean())
    assert np.sign(moved) == direction[0, ti] and abs(moved) > 0.03
    # the observed labels follow, and the mean rate stays near the target (intercepts calibrated over the span)
    y = feed.column("click").to_numpy().astype(float)
    assert np.sign(y[last].mean() - y[first].mean()) == direction[0, ti]
    assert abs(y.mean() - world.config.tasks[ti].base_rate) < 0.03


def test_spreads_default_leaves_the_world_and_set_how_individual_the_factors_are():
    """user_spread / item_spread at their defaults: the same rows and cache key as before the fields existed.
    Smaller: each user's and item's factors sit closer to their cluster's centre (the same draws, scaled)."""
    base = tiny()
    same = pa.concat_tables(SyntheticWorld(tiny(user_spread=0.7, item_spread=0.6)).domain_tables("shop"))
    assert same.equals(pa.concat_tables(SyntheticWorld(base).domain_tables("shop")))
    assert tiny(user_spread=0.3).fingerprint() != base.fingerprint()
    assert tiny(item_spread=0.3).fingerprint() != base.fingerprint()
    p0 = SyntheticWorld(base).params()
    p1 = SyntheticWorld(tiny(user_spread=0.35, item_spread=0.15)).params()
    assert np.allclose(p0["centers"], p1["centers"])
    # the user's own draw, recovered from the two worlds, leaves exactly 0.7 x one cluster centre
    own = (p0["u"] - p1["u"]) / (0.7 - 0.35)
    home = (p0["u"] - 0.7 * own) / 0.7
    distance = np.abs(home[:, None, :] - p0["centers"][None, :, :]).max(-1).min(-1)
    assert distance.max() < 1e-9
    item_dev0 = p0["v"] - p0["centers"][p0["item_cluster"]]
    item_dev1 = p1["v"] - p1["centers"][p1["item_cluster"]]
    assert np.allclose(item_dev1, item_dev0 * (0.15 / 0.6))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="user_spread"):
            tiny(user_spread=bad)
        with pytest.raises(ValueError, match="item_spread"):
            tiny(item_spread=bad)


def test_activity_daily_sd_makes_activity_a_per_day_level():
    """Default 0: the world is unchanged. > 0: a user's level moves from day to day (one draw per user and
    day, shared by all their impressions that day), and the planted ``activity`` term follows it."""
    base = tiny()
    assert pa.concat_tables(SyntheticWorld(tiny(activity_daily_sd=0.0)).domain_tables("shop")).equals(
        pa.concat_tables(SyntheticWorld(base).domain_tables("shop")))
    assert tiny(activity_daily_sd=0.5).fingerprint() != base.fingerprint()
    world = SyntheticWorld(tiny(activity_daily_sd=0.5))
    users = np.repeat(np.arange(2000), 3)
    day0 = 1_700_000_000 + 86400 * 3
    ts = np.tile([day0 + 10, day0 + 80000, day0 + 86400 + 10], 2000)
    z = world._daily_normal(users, ts).reshape(2000, 3)
    assert np.array_equal(z[:, 0], z[:, 1])  # same user, same day
    assert abs(np.corrcoef(z[:, 0], z[:, 2])[0, 1]) < 0.1  # next day: a fresh draw
    assert abs(z[:, 0].mean()) < 0.1 and abs(z[:, 0].std() - 1.0) < 0.1
    # the observed level carries the day's deviation: within a user it now varies well beyond the 0.2 noise
    tasks = [dict(name="click", base_rate=0.2, activity=1.0)]
    domains = [SyntheticDomain("feed", 6000, absent_features=["query_cluster"])]
    spread = {}
    for sd in (0.0, 0.8):
        t = pa.concat_tables(SyntheticWorld(tiny(tasks=tasks, domains=domains, activity_daily_sd=sd)).domain_tables("feed"))
        ua = t["user_activity"].to_numpy(zero_copy_only=False)
        uid = t["user_id"].to_numpy()
        ok = ~np.isnan(ua)
        order = np.argsort(uid[ok], kind="stable")
        u, a = uid[ok][order], ua[ok][order]
        means = np.bincount(u, weights=a) / np.maximum(np.bincount(u), 1)
        spread[sd] = float(np.sqrt(np.mean((a - means[u]) ** 2)))
    assert spread[0.0] < 0.25 < 0.5 < spread[0.8]


def test_a_saved_config_with_a_synthetic_section_loads_back():
    """LightningCLI writes the resolved config (config.yaml) of every run; the planted world's default tasks and
    domains must be written as mappings that the same parser reads back (they were unserializable instances)."""
    import warnings
    from typing import Optional

    import yaml
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--synthetic", type=Optional[SyntheticConfig], default=None)
    config = parser.parse_args(['--synthetic={"num_users": 10, "domains": [{"name": "a", "rows": 5}]}'])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = parser.dump(config)
    saved = yaml.safe_load(text)["synthetic"]
    assert [t["name"] for t in saved["tasks"]] == ["click", "like", "conversion"]
    again = parser.instantiate_classes(parser.parse_string(text)).synthetic
    assert again.fingerprint() == SyntheticConfig(num_users=10, domains=[{"name": "a", "rows": 5}]).fingerprint()
