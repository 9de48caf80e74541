"""The planted synthetic world: lattice's embedded default dataset, with a known answer.

A seeded world of users, items, domains and tasks whose true label probabilities are known, written
as per-domain Parquet datasets (with partly different columns) plus the union schema. Structure:

- **Shared latent factors.** Users and items have ``latent_dim`` factors. Items belong to interest
  clusters (their factors sit near the cluster's centre); users lean towards some clusters. The user ×
  item affinity drives every task in every domain, so data from one domain teaches the others.
- **Per-domain shifts.** Each domain applies its own linear map to the user factors (``shift``), its
  own device effects, base rates and conversion-delay scale; a data-poor domain (few rows) can borrow
  the shared structure from the rest (what consolidation gains).
- **Correlated tasks.** A task may have a parent (``like`` and ``conversion`` only after a ``click``):
  ``p_child = p_parent * sigmoid(z_child)``, and each task mixes the shared affinity through its own map.
- **Delayed conversions.** A windowed task gets a ``<task>_delay`` column (seconds, log-normal,
  clipped to the longest window) for Lattice Zipper.
- **Sequences from interests.** ``hist_items`` / ``hist_clusters`` (with ``hist_ts`` timestamps, oldest
  first) are drawn from the user's interest clusters; recent same-cluster history raises engagement.
- **Noise.** ``noise_s*`` (sparse) and ``noise_d*`` (dense) features are independent of everything:
  feature selection has a known answer (:meth:`SyntheticWorld.feature_roles`).
- **Per-domain feature sets.** ``absent_features`` / ``tasks`` per domain: those columns are simply not
  in that domain's files (consolidation marks them absent).
- **Drift over time** (``drift``): user factors and item popularity move across the time span, so a
  model trained on an earlier slice goes stale. ``rate_drift`` (default 0: none) also moves every binary
  task's base rate (seasonality, marketplace changes): its logit gains ``rate_drift * (tau - 0.5) *
  direction`` at time ``tau`` in ``[0, 1]`` of the span, ``direction`` a seeded sign (+1 or -1) per
  (domain, task); a model trained on an earlier slice is then miscalibrated on later traffic.
- **Truth.** Every row carries ``p_<task>`` (binary tasks): the Bayes-optimal prediction, never a feature.

Everything is vectorized numpy; a million rows take seconds. Output layout of :meth:`SyntheticWorld.write`::

    OUT/world.json            config, row counts, feature roles, oracle AUCs
    OUT/schema.yaml           the union schema
    OUT/<domain>/part-00000.parquet ...   one dataset per domain (no domain column; see sources())
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lattice.data.arrow import ragged_arange
from lattice.data.hashing import splitmix64, to_unit_interval
from lattice.data.infer import SCHEMA_METADATA_KEY
from lattice.data.schema import DomainSpec, FeatureSpec, Schema, TaskSpec, WindowSpec
from lattice.data.sources import DataSource
from lattice.metrics import binary_auc

__all__ = [
    "SyntheticDomain", "SyntheticTask", "SyntheticConfig", "SyntheticWorld",
    "GENERATOR_VERSION", "SCHEMA_METADATA_KEY",
]

GENERATOR_VERSION = 1
_CHUNK = 1 << 17  # rows generated at a time (fixed: part of the seeded stream)
_T0 = 1_700_000_000  # timestamps start here (seconds)
_KEY = np.int64(1) << np.int64(40)  # user-major sort key of timeline events: user * _KEY + seconds
_RECENCY = np.exp(-np.arange(4096) / 8.0)  # weight of the k-th most recent history event


@dataclass
class SyntheticDomain:
    """One domain of the planted world.

    Args:
        name: domain name.
        rows: impressions in this domain (a small number makes it data-poor).
        shift: how far this domain's map moves the shared user factors (0 = identical domains).
        tasks: the tasks labelled in this domain (``None``: all).
        absent_features: features this domain's files do not have.
        delay_scale: multiplies the conversion delays (slow vs fast domains).
    """

    name: str
    rows: int
    shift: float = 0.4
    tasks: Optional[List[str]] = None
    absent_features: List[str] = field(default_factory=list)
    delay_scale: float = 1.0


@dataclass
class SyntheticTask:
    """One planted task. ``z = intercept + affinity * <A_d u, P_t v> + user_bias * b_u + popularity * b_i
    + seq * recent-same-cluster-share + repeat * saw-this-item + position * (1 - pos) + price * log-price
    + brand * brand-effect + hour * sin(hour) + activity * log-activity + device/query effects``;
    ``p = sigmoid(z)`` (times the parent's ``p`` when there is a parent).

    Args:
        name, kind: task name and kind (a regression task's label is ``z`` plus noise, observed only
            where the parent is positive; it has no ``p_`` column).
        parent: task that must be positive first (``None``: every impression).
        base_rate: mean of ``sigmoid(z)`` (the rate given the parent) the intercepts are tuned to.
        windows: Lattice Zipper windows (the task then gets a ``<name>_delay`` column).
        delay_median, delay_sigma: log-normal delay (seconds) of a positive, before the domain's scale.
    """

    name: str
    kind: Literal["binary", "regression"] = "binary"
    parent: Optional[str] = None
    base_rate: float = 0.1
    windows: Optional[List[WindowSpec]] = None
    delay_median: float = 3 * 3600.0
    delay_sigma: float = 1.6
    affinity: float = 1.0
    user_bias: float = 1.0
    popularity: float = 1.0
    seq: float = 1.0
    repeat: float = 0.5
    position: float = 0.0
    price: float = 0.0
    brand: float = 0.0
    hour: float = 0.0
    device: float = 0.3
    query: float = 0.0
    activity: float = 0.0

    def __post_init__(self) -> None:
        if self.windows is not None:
            self.windows = [w if isinstance(w, WindowSpec) else WindowSpec(**dict(w)) for w in self.windows]


# The default factories give plain mappings (SyntheticConfig.__post_init__ builds the objects): a config parser that
# saves the resolved config (LightningCLI's config.yaml) can write mappings, not dataclass instances in a list.
def _default_domains() -> List[Dict[str, Any]]:
    return [dataclasses.asdict(d) for d in [
        SyntheticDomain("feed", 40000, shift=0.3, absent_features=["query_cluster"]),
        SyntheticDomain("search", 25000, shift=0.5, absent_features=["item_tags"]),
        SyntheticDomain("video", 15000, shift=0.5, tasks=["click", "like"], absent_features=["query_cluster", "price"]),
        SyntheticDomain("shop", 2000, shift=0.4, absent_features=["query_cluster"], delay_scale=2.0),
    ]]


def _default_tasks() -> List[Dict[str, Any]]:
    return [dataclasses.asdict(t) for t in [
        SyntheticTask("click", base_rate=0.15, position=0.15, hour=0.3, query=1.2, repeat=0.6, activity=0.3),
        SyntheticTask("like", parent="click", base_rate=0.25, brand=1.0, user_bias=0.5, popularity=0.3, seq=0.8),
        SyntheticTask(
            "conversion", parent="click", base_rate=0.12, price=-0.8, user_bias=0.4, popularity=0.5, seq=0.5,
            windows=[WindowSpec("90min", 5400, 0.2), WindowSpec("1d", 86400, 0.3), WindowSpec("7d", 604800, 0.5)],
        ),
    ]]


@dataclass
class SyntheticConfig:
    """Sizes and knobs of the planted world (every field is part of the cache key).

    Args:
        seed: the world's seed.
        num_users, num_items, num_clusters, latent_dim: world size.
        domains, tasks: see :class:`SyntheticDomain`, :class:`SyntheticTask` (default: 4 domains, one of
            them data-poor; click, like and a 3-window conversion).
        max_sequence_length: longest ``hist_items``/``hist_clusters`` history; mean_sequence_length its mean.
        num_noise_sparse, num_noise_dense: pure-noise features.
        noise_cardinality: ids per noise sparse feature.
        dense_missing_rate: share of nulls in ``user_activity`` and ``item_popularity`` (presence masks).
        days: time span of the impressions.
        drift: how much user factors and item popularity move over the span.
        rate_drift: how far (in logit) each binary task's base rate moves over the whole span, up or down
            by a seeded sign per (domain, task); centred on the middle of the span, so the intercepts'
            calibration (uniform over the span) keeps the mean rate on target. 0 (default): none, and
            the world (rows and fingerprint) is the one built without this field.
        activity_daily_sd: day-to-day variation of a user's activity level (standard deviation of its log,
            one draw per user and day): ``user_activity`` and the planted ``activity`` term then follow the
            user's level on the impression's day, which the user's id alone cannot tell. 0 (default): the
            level is the user's constant, and the world is the one built without this field.
        interest_mix: share of impressions whose item comes from the user's interest clusters.
        user_spread, item_spread: standard deviation of a user's (item's) own latent factors around its
            cluster's centre (users sit at ``0.7 x`` their home cluster's centre, items at their cluster's).
            Small spreads put the user x item affinity mostly at the (home cluster, item cluster) level,
            which a model can learn from many rows; large ones make it mostly individual, learnable only
            from each user's and item's own rows. The observable ``user_segment`` is the user's most liked
            cluster, the home cluster for most users only when ``user_spread`` is small (93 % at 0.1, 58 %
            at 0.7 in mdmo's world). The defaults (0.7, 0.6) leave the world as before.
        row_group_size: Parquet row group size.
    """

    seed: int = 0
    num_users: int = 3000
    num_items: int = 1500
    num_clusters: int = 16
    latent_dim: int = 8
    domains: List[SyntheticDomain] = field(default_factory=_default_domains)
    tasks: List[SyntheticTask] = field(default_factory=_default_tasks)
    max_sequence_length: int = 32
    mean_sequence_length: float = 12.0
    num_noise_sparse: int = 2
    num_noise_dense: int = 2
    noise_cardinality: int = 500
    dense_missing_rate: float = 0.02
    days: float = 30.0
    drift: float = 0.3
    rate_drift: float = 0.0
    activity_daily_sd: float = 0.0
    interest_mix: float = 0.6
    user_spread: float = 0.7
    item_spread: float = 0.6
    row_group_size: int = 16384

    def __post_init__(self) -> None:
        self.domains = [d if isinstance(d, SyntheticDomain) else SyntheticDomain(**dict(d)) for d in self.domains]
        self.tasks = [t if isinstance(t, SyntheticTask) else SyntheticTask(**dict(t)) for t in self.tasks]
        if not self.domains or not self.tasks:
            raise ValueError("a synthetic world needs at least one domain and one task")
        names = [t.name for t in self.tasks]
        for i, t in enumerate(self.tasks):
            if t.parent is not None and t.parent not in names[:i]:
                raise ValueError(f"task {t.name!r}: parent {t.parent!r} must be an earlier task")
        for d in self.domains:
            if d.rows < 0:
                raise ValueError(f"domain {d.name!r}: rows must be >= 0")
            for t in d.tasks or []:
                if t not in names:
                    raise ValueError(f"domain {d.name!r} lists unknown task {t!r}")
        for name in ("user_spread", "item_spread"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_sequence_length <= 0 or self.num_clusters <= 0 or self.num_users <= 0 or self.num_items <= 0:
            raise ValueError("sizes must be positive")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        config = self.to_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("rate_drift", "activity_daily_sd", "user_spread", "item_spread"):
            if config[name] == defaults[name]:  # fields added later: their defaults leave the cache key as before
                del config[name]
        for task in config["tasks"]:  # whole seconds key alike whether a config file wrote 5400 or 5400.0
            for window in task["windows"] or []:
                if float(window["seconds"]).is_integer():
                    window["seconds"] = int(window["seconds"])
        blob = json.dumps({"v": GENERATOR_VERSION, "config": config}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, obj: Dict[str, Any]) -> "SyntheticConfig":
        return obj if isinstance(obj, cls) else cls(**dict(obj))


#: The planted terms (SyntheticTask coefficient names) each feature carries into the logits. Features that only
#: proxy others (user_segment: the user's top interest cluster; item_tags: the item's cluster plus random tags)
#: carry none.
FEATURE_TERMS: Dict[str, Tuple[str, ...]] = {
    "user": ("affinity", "user_bias", "activity"),
    "item": ("affinity", "popularity", "brand", "price", "repeat", "seq"),
    "item_cluster": ("seq", "query"), "item_brand": ("brand",), "user_segment": (), "device": ("device",),
    "item_tags": (), "query_cluster": ("query",), "user_activity": ("activity",),
    "item_popularity": ("popularity",), "price": ("price",), "hour": ("hour",), "position": ("position",),
    "hist_items": ("repeat", "seq"), "hist_clusters": ("seq",),
}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class SyntheticWorld:
    """The planted world of a :class:`SyntheticConfig`: its schema, its rows and its truth."""

    def __init__(self, config: Optional[SyntheticConfig] = None) -> None:
        self.config = config if config is not None else SyntheticConfig()
        self._p: Optional[Dict[str, Any]] = None
        self._intercepts: Dict[Tuple[int, int], float] = {}

    # ---- structure --------------------------------------------------------------------------
    @property
    def sparse_names(self) -> List[str]:
        c = self.config
        return (["user", "item", "item_cluster", "item_brand", "user_segment", "device", "item_tags", "query_cluster"]
                + [f"noise_s{i}" for i in range(c.num_noise_sparse)])

    @property
    def dense_names(self) -> List[str]:
        c = self.config
        return (["user_activity", "item_popularity", "price", "hour", "position"]
                + [f"noise_d{i}" for i in range(c.num_noise_dense)])

    @property
    def sequence_names(self) -> List[str]:
        return ["hist_items", "hist_clusters"]

    def feature_roles(self) -> Dict[str, List[str]]:
        """``{"informative": [...], "noise": [...]}``: the feature-selection answer key."""
        names = self.sparse_names + self.dense_names + self.sequence_names
        noise = [n for n in names if n.startswith("noise_")]
        return {"informative": [n for n in names if n not in noise], "noise": noise}

    def feature_terms(self) -> Dict[str, List[str]]:
        """``feature -> planted terms`` (the :class:`SyntheticTask` coefficients' names) each informative feature
        carries into the logits; a feature that only proxies others (``user_segment``, ``item_tags``) carries none."""
        return {f: list(FEATURE_TERMS.get(f, ())) for f in self.feature_roles()["informative"]}

    def sample(self, domain: str, n: int, seed: int = 0, start: float = 0.0, end: float = 1.0,
               stream: int = 0x5A) -> Dict[str, Any]:
        """``n`` fresh rows of ``domain`` with times uniform in ``[start, end]`` of the span (fractions), drawn
        like the written rows (same users, items and calibrated intercepts) but from their own random stream.

        Returns ``{"ts" [n] int64 (sorted), "tau" [n] (fraction of the span), "z": task -> logit [n],
        "terms": planted term -> value [n] (each enters its task's logit as coefficient * value), "cols": the
        raw draws (users, items, ...), "rng": the generator the times came from, for drawing labels}``.
        ``seed`` and ``stream`` select the random streams.
        """
        c = self.config
        names = [d.name for d in c.domains]
        if domain not in names:
            raise ValueError(f"SyntheticWorld.sample: unknown domain {domain!r}; the world has {names}")
        di = names.index(domain)
        rng = np.random.default_rng([seed, di])
        ts = np.sort(_T0 + (start + (end - start) * rng.random(n)) * c.days * 86400.0).astype(np.int64)
        out = self._chunk(di, stream, n, ts, 0, self._calibrate(di))
        return {"ts": ts, "tau": (ts - _T0) / (c.days * 86400.0), "z": out["z"], "terms": out["terms"],
                "cols": out["cols"], "rng": rng}

    def _n_brands(self) -> int:
        return max(4, self.config.num_items // 20)

    def schema(self) -> Schema:
        """The union schema (no data needed)."""
        c = self.config
        C = c.num_clusters
        feats = [
            FeatureSpec("user", "sparse", num_embeddings=c.num_users, column="user_id"),
            FeatureSpec("item", "sparse", num_embeddings=c.num_items, column="item_id"),
            FeatureSpec("item_cluster", "sparse", num_embeddings=C),
            FeatureSpec("item_brand", "sparse", num_embeddings=self._n_brands()),
            FeatureSpec("user_segment", "sparse", num_embeddings=C),
            FeatureSpec("device", "sparse", num_embeddings=3),
            FeatureSpec("item_tags", "sparse", num_embeddings=4 * C, pooling="mean"),
            FeatureSpec("query_cluster", "sparse", num_embeddings=C),
        ]
        feats += [FeatureSpec(f"noise_s{i}", "sparse", num_embeddings=c.noise_cardinality)
                  for i in range(c.num_noise_sparse)]
        feats += [FeatureSpec(n, "dense") for n in self.dense_names]
        feats += [
            FeatureSpec("hist_items", "sequence", num_embeddings=c.num_items, shared_table="item",
                        max_length=c.max_sequence_length, timestamps_column="hist_ts"),
            FeatureSpec("hist_clusters", "sequence", num_embeddings=C, shared_table="item_cluster",
                        max_length=c.max_sequence_length, timestamps_column="hist_ts"),
        ]
        tasks = [
            TaskSpec(t.name, t.kind, windows=t.windows, delay_column=f"{t.name}_delay" if t.windows else None)
            for t in c.tasks
        ]
        all_feats = [f.name for f in feats]
        domains = []
        for d in c.domains:
            absent = set(d.absent_features)
            unknown = absent - set(all_feats)
            if unknown:
                raise ValueError(f"domain {d.name!r}: absent_features {sorted(unknown)} are not world features "
                                 f"({all_feats})")
            domains.append(DomainSpec(d.name, None if not absent else [f for f in all_feats if f not in absent],
                                      None if d.tasks is None else list(d.tasks)))
        return Schema(feats, tasks, domains, example_id_column="example_id", domain_column="domain",
                      user_id_column="user_id", item_id_column="item_id", timestamp_column="timestamp")

    # ---- parameters -------------------------------------------------------------------------
    def _schema(self) -> Schema:
        if getattr(self, "_schema_cache", None) is None:
            self._schema_cache = self.schema()
        return self._schema_cache

    def params(self) -> Dict[str, Any]:
        if self._p is not None:
            return self._p
        c = self.config
        rng = np.random.default_rng([c.seed, 0xA11CE])
        k, C, U, I = c.latent_dim, c.num_clusters, c.num_users, c.num_items
        centers = rng.normal(size=(C, k))
        home = rng.integers(C, size=U)
        u = c.user_spread * rng.normal(size=(U, k)) + 0.7 * centers[home]
        interest_logits = 1.2 * (u @ centers.T) / math.sqrt(k)
        interest = np.exp(interest_logits - interest_logits.max(1, keepdims=True))
        interest /= interest.sum(1, keepdims=True)
        activity = rng.lognormal(0.0, 0.8, size=U)
        user_bias = rng.normal(0.0, 0.4, size=U)
        user_drift = rng.normal(size=(U, k))
        # items, grouped by cluster
        sizes = rng.dirichlet(np.full(C, 2.0)) * I
        item_cluster = np.sort(np.minimum(np.searchsorted(np.cumsum(sizes), np.arange(I) + 0.5), C - 1))
        v = centers[item_cluster] + c.item_spread * rng.normal(size=(I, k))
        item_bias = rng.normal(0.0, 0.5, size=I)
        item_drift = rng.normal(size=I)
        pop = np.exp(item_bias + 0.7 * rng.normal(size=I))
        log_price = 3.0 + 0.4 * rng.normal(size=C)[item_cluster] + 0.5 * rng.normal(size=I)
        n_brands = self._n_brands()
        brand = rng.integers(n_brands, size=I)
        brand_effect = rng.normal(0.0, 0.5, size=n_brands)
        n_tags = 4 * C
        tag_count = rng.integers(1, 4, size=I)
        first_tag = item_cluster * 4 + rng.integers(4, size=I)
        other_tags = rng.integers(n_tags, size=(I, 2))
        # cumulative tables for sampling: user -> cluster, (cluster) -> item by popularity
        user_cdf = (np.cumsum(interest, 1) + np.arange(U)[:, None]).ravel()
        user_cdf[np.arange(1, U + 1) * C - 1] = np.arange(1, U + 1) - 1e-12
        cluster_pop = np.bincount(item_cluster, weights=pop, minlength=C)
        item_cdf = np.empty(I)
        starts = np.searchsorted(item_cluster, np.arange(C))
        ends = np.searchsorted(item_cluster, np.arange(C), side="right")
        for cl in range(C):  # C clusters, not rows
            s, e = starts[cl], ends[cl]
            if e > s:
                item_cdf[s:e] = cl + np.cumsum(pop[s:e]) / pop[s:e].sum()
                item_cdf[e - 1] = cl + 1 - 1e-12
        nonempty = ends > starts
        global_cluster_cdf = np.cumsum(np.where(nonempty, cluster_pop, 0))
        global_cluster_cdf /= global_cluster_cdf[-1]
        domains = []
        for di, d in enumerate(c.domains):
            drng = np.random.default_rng([c.seed, 0xD0, di])
            A = np.eye(k) + d.shift * drng.normal(size=(k, k)) / math.sqrt(k)
            domains.append({"A": A, "device": drng.normal(0.0, 1.0, size=3)})
        tasks = []
        for ti, t in enumerate(c.tasks):
            trng = np.random.default_rng([c.seed, 0x7A, ti])
            P = np.eye(k) + 0.5 * trng.normal(size=(k, k)) / math.sqrt(k)
            tasks.append({"P": P, "reg_noise": 0.5})
        # base-rate drift: a sign per (domain, task), from its own stream (the draws above are unchanged)
        rate_direction = np.where(
            np.random.default_rng([c.seed, 0x4A7E]).random((len(c.domains), len(c.tasks))) < 0.5, -1.0, 1.0)
        self._p = dict(
            rate_direction=rate_direction, centers=centers, u=u, interest=interest, activity=activity,
            user_cdf_act=np.cumsum(activity) / activity.sum(),
            user_bias=user_bias, user_drift=user_drift, segment=interest.argmax(1), v=v, item_cluster=item_cluster,
            item_bias=item_bias, item_drift=item_drift, pop=pop, log_price=log_price, brand=brand,
            brand_effect=brand_effect, tag_count=tag_count, first_tag=first_tag, other_tags=other_tags,
            user_cdf=user_cdf, item_cdf=item_cdf, cluster_nonempty=nonempty, global_cluster_cdf=global_cluster_cdf,
            domains=domains, tasks=tasks, mean_log_price=float(log_price.mean()),
        )
        return self._p

    def _events(self) -> Dict[str, np.ndarray]:
        """Every user's interaction timeline over ``[start - days, start + days)``, sorted by (user, time):
        items drawn from the user's interests. A row's history is the tail of its user's timeline."""
        p = self.params()
        if "events" in p:
            return p["events"]
        c = self.config
        rng = np.random.default_rng([c.seed, 0xE7])
        span = c.days * 86400.0
        # events before t are 1/2..1 of the timeline for t inside the span: aim the mean history there
        act = np.clip(p["activity"], 0.2, 3.0)
        # rows pick users by activity, so normalize by the activity-weighted mean
        lam = c.mean_sequence_length / 0.75 * act / ((act * p["activity"]).sum() / p["activity"].sum())
        counts = rng.poisson(lam).astype(np.int64)
        users = np.repeat(np.arange(c.num_users), counts)
        items = self._items_in(rng, self._interest_clusters(rng, users))
        t_min = _T0 - int(span)
        rel = (rng.random(len(users)) * 2 * span).astype(np.int64)
        order = np.lexsort((rel, users))
        users, items, rel = users[order], items[order], rel[order]
        off = np.zeros(c.num_users + 1, dtype=np.int64)
        np.cumsum(counts, out=off[1:])
        p["events"] = {
            "key": users * _KEY + rel, "off": off, "item": items.astype(np.int64),
            "cluster": p["item_cluster"][items].astype(np.int64), "ts": rel + t_min, "t_min": t_min,
        }
        return p["events"]

    # ---- sampling helpers -------------------------------------------------------------------
    def _interest_clusters(self, rng, users: np.ndarray) -> np.ndarray:
        p = self.params()
        C = self.config.num_clusters
        pos = np.searchsorted(p["user_cdf"], users + rng.random(len(users)), side="right")
        cl = np.minimum(pos - users * C, C - 1)
        # an empty cluster cannot provide items: fall back to the popularity-weighted cluster draw
        empty = ~p["cluster_nonempty"][cl]
        if empty.any():
            cl[empty] = self._popular_clusters(rng, int(empty.sum()))
        return cl

    def _popular_clusters(self, rng, n: int) -> np.ndarray:
        p = self.params()
        return np.minimum(np.searchsorted(p["global_cluster_cdf"], rng.random(n), side="right"),
                          self.config.num_clusters - 1)

    def _items_in(self, rng, clusters: np.ndarray) -> np.ndarray:
        p = self.params()
        item = np.searchsorted(p["item_cdf"], clusters + rng.random(len(clusters)), side="right")
        return np.minimum(item, self.config.num_items - 1)

    # ---- rows -------------------------------------------------------------------------------
    def _chunk(self, di: int, ci: int, n: int, ts_sorted: np.ndarray, row0: int, intercepts: Dict[int, float]
               ) -> Dict[str, Any]:
        """Generate ``n`` rows of domain ``di`` (chunk ``ci``); returns columns, logits and the planted terms
        (name -> per-row value of each term linear in its task's coefficient)."""
        c = self.config
        p = self.params()
        dom = c.domains[di]
        dp = p["domains"][di]
        rng = np.random.default_rng([c.seed, 0xC4, di, ci])
        k = c.latent_dim
        span = c.days * 86400.0
        ts = ts_sorted
        tau = (ts - _T0) / span
        users = np.minimum(np.searchsorted(p["user_cdf_act"], rng.random(n), side="right"), c.num_users - 1)
        from_interest = rng.random(n) < c.interest_mix
        clusters = np.where(from_interest, self._interest_clusters(rng, users), self._popular_clusters(rng, n))
        items = self._items_in(rng, clusters)
        item_cl = p["item_cluster"][items]
        # history: the user's own timeline (drawn from their interests), the latest events before
        # the impression, oldest first
        ev = self._events()
        before = np.searchsorted(ev["key"], users * _KEY + (ts - ev["t_min"]), side="left")
        L = np.minimum(before - ev["off"][users], c.max_sequence_length).astype(np.int64)
        rag = ragged_arange(L)
        tok = np.repeat(before - L, L) + rag
        tok_items, tok_cl, tok_ts = ev["item"][tok], ev["cluster"][tok], ev["ts"][tok]
        # sequence signals: recency-weighted share of same-cluster history, and re-engagement
        tok_row = np.repeat(np.arange(n), L)
        w = _RECENCY[L[tok_row] - 1 - rag]
        wsum = np.bincount(tok_row, weights=w, minlength=n)
        wsame = np.bincount(tok_row, weights=w * (tok_cl == item_cl[tok_row]), minlength=n)
        seq_share = np.where(L > 0, wsame / np.maximum(wsum, 1e-12), 0.0)
        repeat = (np.bincount(tok_row, weights=tok_items == items[tok_row], minlength=n) > 0).astype(np.float64)
        # context
        device = rng.integers(3, size=n)
        position = rng.integers(1, 11, size=n)
        hour = ((ts // 3600) % 24).astype(np.float64)
        query = np.where(rng.random(n) < 0.6, item_cl, rng.integers(c.num_clusters, size=n))
        # latent affinity, shifted by the domain, drifting over time
        u = p["u"][users] + c.drift * tau[:, None] * p["user_drift"][users]
        ud = u @ dp["A"].T
        v = p["v"][items]
        b_u = p["user_bias"][users]
        b_i = p["item_bias"][items] + c.drift * tau * p["item_drift"][items]
        log_price = p["log_price"][items]
        log_activity = np.log(p["activity"][users])  # heavy users engage more (mean 0: lognormal(0, .))
        if c.activity_daily_sd != 0.0:
            log_activity = log_activity + c.activity_daily_sd * self._daily_normal(users, ts)
        schema = self._schema()
        has = set(schema.domains[di].features or schema.feature_names)
        # every planted term that enters a task's logit as `coefficient * value` (the coefficient is the
        # SyntheticTask field of the same name); price and query are zero where the domain lacks the feature
        terms = dict(
            user_bias=b_u, popularity=b_i, seq=seq_share, repeat=repeat, position=1 - position,
            brand=p["brand_effect"][p["brand"][items]], hour=np.sin(2 * np.pi * hour / 24),
            device=dp["device"][device], activity=log_activity,
            price=log_price - p["mean_log_price"] if "price" in has else np.zeros(n),
            query=query == item_cl if "query_cluster" in has else np.zeros(n),
        )
        z: Dict[str, np.ndarray] = {}
        for ti, t in enumerate(c.tasks):
            tp = p["tasks"][ti]
            aff = (ud * (v @ tp["P"].T)).sum(1) / math.sqrt(k)
            zt = (t.affinity * aff + t.user_bias * terms["user_bias"] + t.popularity * terms["popularity"]
                  + t.seq * terms["seq"] + t.repeat * terms["repeat"] + t.position * terms["position"]
                  + t.brand * terms["brand"] + t.hour * terms["hour"] + t.device * terms["device"]
                  + t.activity * terms["activity"])
            if "price" in has:
                zt = zt + t.price * terms["price"]
            if "query_cluster" in has:
                zt = zt + t.query * terms["query"]
            z[t.name] = zt + intercepts.get(ti, 0.0)
            if c.rate_drift != 0.0 and t.kind == "binary":
                z[t.name] = z[t.name] + c.rate_drift * (tau - 0.5) * p["rate_direction"][di, ti]
        cols = dict(users=users, items=items, item_cl=item_cl, L=L, tok_items=tok_items, tok_cl=tok_cl,
                    log_activity=log_activity,
                    tok_ts=tok_ts, device=device, position=position, hour=hour, query=query, ts=ts,
                    log_price=log_price, rng=rng, row0=row0)
        return {"cols": cols, "z": z, "terms": terms}

    def _daily_normal(self, users: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """A standard normal per (user, day of ``ts``), the same wherever the pair occurs (hash-based, so it
        draws nothing from the row streams)."""
        day = ((np.asarray(ts, dtype=np.int64) - _T0) // 86400 + 1024).astype(np.uint64)
        key = (np.uint64(self.config.seed) << np.uint64(48)) ^ (users.astype(np.uint64) << np.uint64(16)) ^ day
        u1 = to_unit_interval(splitmix64(key))
        u2 = to_unit_interval(splitmix64(key ^ np.uint64(0x9E3779B97F4A7C15)))
        return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)

    def _calibrate(self, di: int) -> Dict[int, float]:
        """Intercepts so that mean sigmoid(z) hits each task's base rate (bisection on a sample)."""
        if (di, -1) in self._intercepts:
            return {ti: self._intercepts[(di, ti)] for ti in range(len(self.config.tasks))}
        c = self.config
        n = 8192
        rng = np.random.default_rng([c.seed, 0xCA1, di])
        ts = np.sort(_T0 + rng.random(n) * c.days * 86400.0).astype(np.int64)
        out = self._chunk(di, 0xCA1CA1, n, ts, 0, {})
        result = {}
        for ti, t in enumerate(c.tasks):
            if t.kind != "binary":
                result[ti] = 0.0
                continue
            zt = out["z"][t.name]
            lo, hi = -20.0, 20.0
            for _ in range(50):
                mid = (lo + hi) / 2
                if _sigmoid(zt + mid).mean() > t.base_rate:
                    hi = mid
                else:
                    lo = mid
            result[ti] = (lo + hi) / 2
        for ti, b in result.items():
            self._intercepts[(di, ti)] = b
        self._intercepts[(di, -1)] = 0.0
        return result

    def domain_tables(self, domain: str) -> Iterator[pa.Table]:
        """The rows of one domain as Arrow tables (sorted by time), chunk by chunk."""
        c = self.config
        di = [d.name for d in c.domains].index(domain)
        dom = c.domains[di]
        schema = self._schema()
        dspec = schema.domains[di]
        has_feat = set(dspec.features or schema.feature_names)
        has_task = set(dspec.tasks or schema.task_names)
        intercepts = self._calibrate(di)
        p = self.params()
        trng = np.random.default_rng([c.seed, 0x75, di])
        ts_all = np.sort(_T0 + trng.random(dom.rows) * c.days * 86400.0).astype(np.int64)
        for ci, row0 in enumerate(range(0, dom.rows, _CHUNK)):
            n = min(_CHUNK, dom.rows - row0)
            out = self._chunk(di, ci, n, ts_all[row0: row0 + n], row0, intercepts)
            yield self._to_table(di, out, n, has_feat, has_task)

    def _to_table(self, di, out, n, has_feat, has_task) -> pa.Table:
        c = self.config
        p = self.params()
        col = out["cols"]
        rng = col["rng"]
        users, items, L = col["users"], col["items"], col["L"]
        data: Dict[str, pa.Array] = {}
        data["example_id"] = pa.array((np.int64(di) << np.int64(36)) + col["row0"] + np.arange(n, dtype=np.int64))
        data["user_id"] = pa.array(users.astype(np.int64))
        data["item_id"] = pa.array(items.astype(np.int64))
        data["timestamp"] = pa.array(col["ts"].astype(np.int64))

        def scalar(name, values):
            if name in has_feat:
                data[name] = pa.array(np.asarray(values, dtype=np.int64))

        scalar("item_cluster", col["item_cl"])
        scalar("item_brand", p["brand"][items])
        scalar("user_segment", p["segment"][users])
        scalar("device", col["device"])
        if "item_tags" in has_feat:
            cnt = p["tag_count"][items]
            tags = np.stack([p["first_tag"][items], p["other_tags"][items, 0], p["other_tags"][items, 1]], 1)
            flat = tags[np.arange(3)[None, :] < cnt[:, None]]
            offs = np.concatenate([[0], np.cumsum(cnt)]).astype(np.int32)
            data["item_tags"] = pa.ListArray.from_arrays(pa.array(offs), pa.array(flat.astype(np.int64)))
        scalar("query_cluster", col["query"])
        for i in range(c.num_noise_sparse):
            scalar(f"noise_s{i}", rng.integers(c.noise_cardinality, size=n))

        def dense(name, values, missing=0.0):
            if name in has_feat:
                values = np.asarray(values, dtype=np.float32)
                mask = rng.random(n) < missing if missing > 0 else None
                data[name] = pa.array(values, type=pa.float32(), mask=mask)

        # the user's activity level on the impression's day, measured with noise
        dense("user_activity", col["log_activity"] + 0.2 * rng.normal(size=n), c.dense_missing_rate)
        dense("item_popularity", np.log(p["pop"][items]) + 0.2 * rng.normal(size=n), c.dense_missing_rate)
        dense("price", col["log_price"])
        dense("hour", col["hour"] / 24.0)
        dense("position", col["position"])
        for i in range(c.num_noise_dense):
            dense(f"noise_d{i}", rng.normal(size=n))
        offs = pa.array(np.concatenate([[0], np.cumsum(L)]).astype(np.int32))
        if "hist_items" in has_feat:
            data["hist_items"] = pa.ListArray.from_arrays(offs, pa.array(col["tok_items"].astype(np.int64)))
        if "hist_clusters" in has_feat:
            data["hist_clusters"] = pa.ListArray.from_arrays(offs, pa.array(col["tok_cl"].astype(np.int64)))
        if "hist_items" in has_feat or "hist_clusters" in has_feat:
            data["hist_ts"] = pa.ListArray.from_arrays(offs, pa.array(col["tok_ts"]))
        # labels
        probs: Dict[str, np.ndarray] = {}
        labels: Dict[str, np.ndarray] = {}
        dom = c.domains[di]
        for t in c.tasks:
            zt = out["z"][t.name]
            parent_p = probs.get(t.parent, 1.0) if t.parent else 1.0
            parent_y = labels.get(t.parent) if t.parent else None
            if t.kind == "binary":
                q = _sigmoid(zt)
                y = rng.random(n) < q
                if parent_y is not None:
                    y &= parent_y.astype(bool)
                probs[t.name] = parent_p * q
                labels[t.name] = y.astype(np.int8)
            else:
                y = zt + 0.5 * rng.normal(size=n)
                labels[t.name] = y
            if t.name not in has_task:
                continue
            if t.kind == "binary":
                data[t.name] = pa.array(labels[t.name], type=pa.int8())
                data["p_" + t.name] = pa.array(probs[t.name].astype(np.float32))
            else:
                observed = np.ones(n, bool) if parent_y is None else parent_y.astype(bool)
                data[t.name] = pa.array(y.astype(np.float32), mask=~observed)
            if t.windows:
                horizon = max(w.seconds for w in t.windows)
                med = t.delay_median * dom.delay_scale
                delay = np.minimum(np.exp(np.log(med) + t.delay_sigma * rng.normal(size=n)), horizon)
                pos = labels[t.name].astype(bool)
                data[f"{t.name}_delay"] = pa.array(np.round(delay).astype(np.float32), mask=~pos)
        return pa.table(data)

    # ---- output -----------------------------------------------------------------------------
    def write(self, out_dir: str, overwrite: bool = False) -> Dict[str, Any]:
        """Write every domain's Parquet dataset, ``schema.yaml`` and ``world.json`` to ``out_dir``
        (atomically: into a temporary folder, then renamed). Returns the manifest (``world.json``)."""
        out_dir = os.path.abspath(out_dir)
        if os.path.exists(os.path.join(out_dir, "world.json")) and not overwrite:
            raise FileExistsError(f"{out_dir} already holds a world (pass overwrite=True to replace it)")
        parent = os.path.dirname(out_dir) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".lattice-world-", dir=parent)
        started = time.time()
        try:
            schema = self.schema()
            schema_yaml = schema.to_yaml(os.path.join(tmp, "schema.yaml"))
            rows, oracle = {}, {}
            for d in self.config.domains:
                os.makedirs(os.path.join(tmp, d.name))
                path = os.path.join(tmp, d.name, "part-00000.parquet")
                writer = None
                truth: Dict[str, List[np.ndarray]] = {}
                for table in self.domain_tables(d.name):
                    if writer is None:
                        meta = dict(table.schema.metadata or {})
                        meta[SCHEMA_METADATA_KEY] = schema_yaml.encode()
                        meta[b"lattice.domain"] = d.name.encode()
                        writer = pq.ParquetWriter(path, table.schema.with_metadata(meta))
                    writer.write_table(table.replace_schema_metadata(writer.schema.metadata),
                                       row_group_size=self.config.row_group_size)
                    for t in self.config.tasks:
                        if "p_" + t.name in table.column_names:
                            truth.setdefault(t.name, []).append(np.stack([
                                table.column(t.name).to_numpy(zero_copy_only=False).astype(np.float64),
                                table.column("p_" + t.name).to_numpy(zero_copy_only=False)]))
                if writer is None:
                    raise ValueError(f"domain {d.name!r} has no rows")
                writer.close()
                rows[d.name] = d.rows
                oracle[d.name] = {}
                for name, parts in truth.items():
                    arr = np.concatenate(parts, axis=1)
                    oracle[d.name][name] = {"auc": binary_auc(arr[1], arr[0]), "rate": float(arr[0].mean())}
            manifest = {
                "generator_version": GENERATOR_VERSION,
                "fingerprint": self.config.fingerprint(),
                "config": self.config.to_dict(),
                "rows": rows,
                "domains": {d.name: os.path.join(d.name) for d in self.config.domains},
                "feature_roles": self.feature_roles(),
                "oracle": oracle,
                "seconds": round(time.time() - started, 3),
            }
            with open(os.path.join(tmp, "world.json"), "w") as fh:
                json.dump(manifest, fh, indent=2, default=str)
            if os.path.exists(out_dir):
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def sources(self, out_dir: str) -> List[DataSource]:
        """The per-domain datasets written by :meth:`write`, as reader sources."""
        return [DataSource(os.path.join(out_dir, d.name), domain=d.name, format="parquet") for d in self.config.domains]
