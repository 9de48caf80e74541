"""The quality benchmark's study on the planted world of configs/mdmo.yaml: does one consolidated LatticeNetwork beat
per-domain models, the multi-task baselines and InterFormer, and how close does it get to the oracle?

The world (4 domains, ``shop`` the data-poor one; click, like and a Zipper conversion task) is the
``data.synthetic`` section of configs/mdmo.yaml, generated into the cache like ``lattice fit`` does, and
split by time like ``lattice fit --config configs/mdmo.yaml`` (the data module's ``split: time``: the
oldest 80 % of the time span trains, the next 10 % validates, the last 10 % tests). Every model is
built by the ``lattice`` CLI parser from mdmo.yaml stacked with its own config, then trained with
:class:`~lattice.train.module.LatticeModule` on :class:`~lattice.data.LatticeDataModule` batches by a
Lightning ``Trainer``, for the same number of epochs:

- ``lr``: :class:`~lattice.models.LogisticRegression` (configs/logistic_regression.yaml), all domains:
  each task's logit is linear in the one-hot ids, the length-normalized history ids, the dense values and
  the domain, with per-domain weights. The reference of the "LR -> oracle gap".
- ``per_domain`` (a): one model per domain, trained only on that domain's rows: the same network as
  (d) — mdmo.yaml's LatticeNetwork, so the same FLOPs per sample — but one copy per domain (or the
  network of ``--per-domain-config``). A small domain gets a smaller batch (``--per-domain-min-steps``
  steps per epoch at least, batch >= 64), so it is not starved of optimizer steps.
- ``shared_bottom``, ``mmoe``, ``ple`` (b): configs/shared_bottom.yaml, mmoe.yaml, ple.yaml, all domains.
- ``interformer`` (c): configs/interformer.yaml, all domains.
- ``lattice`` (d): mdmo.yaml's LatticeNetwork, all domains.

Every model keeps its epoch with the lowest validation loss (the same rule for all; a per-domain model
validates on its own domain), then is evaluated on the test rows: AUC and LogLoss per (domain, task),
beside the oracle AUC of the planted truth ``p_<task>`` on the same rows. A domain with fewer than
``--eval-rows`` test rows (the data-poor one: its 10 % is a few hundred rows, too few to tell models
apart) is tested on more rows of the same time range drawn from the same planted world (the world
regenerated with more rows for that domain: same users, items, domain maps and truth; none of them is
trained on). FLOPs per sample are the networks' analytic counts (``flops_per_sample()``, as in
bench_models.py), at the longest sequences and at the test rows' mean length. ``--network-arg NAME=VALUE``
gives every selected model whose network accepts ``NAME`` the same setting (for example
``standardize_dense=true wide=true``), so an option is compared on all models at once, never on one alone.
Each model's JSON entry also records its network's resolved init arguments (``network_init_args``): stacking
a config that changes ``class_path`` keeps the base config's init arguments the new class accepts, and that
record is where such a carried-over setting shows.

Training seeds move a model's mean AUC by a few thousandths, as much as the models differ. ``--seed 0 1 2
3`` trains every model once per seed: the tables and the targets then use each metric's mean over the seeds,
and the report adds each model's per-seed mean AUC with its standard error, lattice's paired per-seed
difference to every rival, and on how many seeds each target passes on its own.

Targets (printed as pass/fail, never asserted):
1. (d) has the best mean AUC over all (domain, task) pairs of every model;
2. on the data-poor domain (fewest rows), (d)'s mean AUC beats (a)'s by at least ``--margin``;
3. (d) closes at least 80 % of the gap between LR and the oracle: (mean AUC(d) - mean AUC(LR)) /
   (mean oracle AUC - mean AUC(LR)) over all (domain, task) pairs >= ``--gap-target``.

benchmarks/bench_quality.py is its command line; the options below are its parsed arguments.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.parquet as pq
import torch

from lattice.benchmark.common import best_checkpoint, best_epoch, fmt, machine, mean, print_table, trainer
from lattice.benchmark.models import mean_tokens
from lattice.data import LatticeDataModule
from lattice.data.cache import ensure_world
from lattice.data.sources import DataSource
from lattice.data.splits import write_slices
from lattice.data.synthetic import SyntheticConfig
from lattice.dotted import import_dotted, init_arguments
from lattice.train.loading import load_from_config, parse_config

#: key -> (group, description, config stacked onto mdmo.yaml (None: mdmo.yaml's own network), per domain)
MODELS: Dict[str, Tuple[str, str, Optional[str], bool]] = {
    "lr": ("LR", "LogisticRegression, all domains", "logistic_regression.yaml", False),
    "per_domain": ("a", "one LatticeNetwork per domain", None, True),
    "shared_bottom": ("b", "SharedBottom, all domains", "shared_bottom.yaml", False),
    "mmoe": ("b", "MMoE, all domains", "mmoe.yaml", False),
    "ple": ("b", "PLE, all domains", "ple.yaml", False),
    "interformer": ("c", "InterFormer, all domains", "interformer.yaml", False),
    "lattice": ("d", "LatticeNetwork, all domains", None, False),
}

#: the --quick world: a tiny version of mdmo.yaml's (same domains, tasks and absent features)
QUICK_ROWS = {"feed": 3000, "search": 1500, "video": 1000, "shop": 400}


# ---- building models and data through the lattice CLI ------------------------------------------------
def build(args, extra_config: Optional[str], overrides: List[str]):
    """``(LatticeModule, LatticeDataModule, config)`` exactly as ``lattice fit --config mdmo.yaml
    [--config extra]`` would build them (seeded by the config's ``seed_everything``)."""
    configs = [os.path.join(args.config_dir, c) for c in (args.config, extra_config) if c]
    given = ["--trainer.logger=false", f"--trainer.default_root_dir={os.path.join(args.work, 'cli')}"]
    if args.run_seed is not None:  # the seed being run (main sets it for each of --seed)
        given.append(f"--seed_everything={args.run_seed}")
    if args.cache_dir:
        given.append(f"--data.cache_dir={args.cache_dir}")
    module, dm = load_from_config(configs, overrides=given + overrides)
    return module, dm, parse_config(configs, given + overrides)


def network_class(args, extra_config: Optional[str]) -> type:
    """The network class a model's stacked configs select (the last ``model.network.class_path``)."""
    import yaml

    path = None
    for name in [args.config] + ([extra_config] if extra_config else []):
        with open(os.path.join(args.config_dir, name)) as f:
            network = ((yaml.safe_load(f) or {}).get("model") or {}).get("network") or {}
        path = network.get("class_path", path)
    if path is None:
        raise ValueError(f"{args.config} (stacked with {extra_config}) selects no model.network.class_path")
    return import_dotted(path, "model.network.class_path")


def network_overrides(args, extra_config: Optional[str]) -> Tuple[List[str], Dict[str, str]]:
    """The ``--network-arg`` settings this model's network accepts (the same help for every model that
    can take it), as CLI overrides, and as a dict for the report."""
    accepted = init_arguments(network_class(args, extra_config))
    given = {k: v for k, v in args.network_arg if accepted is None or k in accepted}
    return [f"--model.network.init_args.{k}={v}" for k, v in given.items()], given


def resolved_init_args(config) -> Dict[str, Any]:
    """The network's init arguments after every stacked config and override, as the CLI resolved them. Stacking
    a config that changes ``class_path`` keeps the earlier init arguments the new class also accepts, so this is
    where a setting carried over from the base config shows up."""
    import jsonargparse

    args = config.model.init_args.network.init_args
    args = jsonargparse.namespace_to_dict(args) if isinstance(args, jsonargparse.Namespace) else dict(args)
    args.pop("schema", None)  # linked from the data module, not a setting
    return args


def quick_overrides(base: SyntheticConfig) -> List[str]:
    domains = []
    for d in base.domains:
        d = copy.deepcopy(d)
        d.rows = QUICK_ROWS.get(d.name, max(200, d.rows // 40))
        domains.append(dataclasses.asdict(d))
    return [
        "--data.synthetic.num_users=400", "--data.synthetic.num_items=300", "--data.synthetic.row_group_size=1024",
        "--data.synthetic.max_sequence_length=16", "--data.synthetic.mean_sequence_length=6",
        f"--data.synthetic.domains={json.dumps(domains)}", "--data.batch_size=256",
    ]


# ---- slices -------------------------------------------------------------------------------------------
def prepare_data(args, dm: LatticeDataModule) -> Dict[str, Any]:
    """Generates the world, cuts it by the data module's time split, and writes per-domain train/val
    slices (for the per-domain models) and the test slices every model is evaluated on."""
    dm.prepare_data()
    filters = dm.split_filters()
    world_dir = dm.data_dir
    schema = dm.schema
    config = dm.world.config
    slices = os.path.join(args.work, "slices")
    names = [d.name for d in config.domains]
    tables = {n: pq.read_table(os.path.join(world_dir, n)) for n in names}
    rows: Dict[str, Dict[str, int]] = {n: {} for n in names}
    for n in names:
        for split in ("train", "val", "test"):
            rows[n][split] = write_slices({n: tables[n]}, schema, slices, {split: ([n], filters[split])})[split]
    # A domain with too few test rows: more rows of the same planted world in the same time range.
    test_fraction = dm.test_fraction
    big = copy.deepcopy(config)
    enlarged = {}
    for d in big.domains:
        if rows[d.name]["test"] < args.eval_rows:
            d.rows = max(d.rows, int(math.ceil(1.15 * args.eval_rows / test_fraction)))
            enlarged[d.name] = d.rows
    if enlarged:
        big_dir = ensure_world(big, args.cache_dir)
        for name in enlarged:
            rows[name]["test_original"] = rows[name]["test"]
            rows[name]["test"] = write_slices({name: pq.read_table(os.path.join(big_dir, name))}, schema, slices,
                                              {"test": ([name], filters["test"])})["test"]
    cut = filters["val"]
    return {"world_dir": world_dir, "slices": slices, "rows": rows, "enlarged_eval_world_rows": enlarged,
            "time_cutoffs": {"val": cut.lo, "test": cut.hi}}


def slice_sources(data: Dict[str, Any], split: str, domains: List[str]) -> List[DataSource]:
    return [DataSource(os.path.join(data["slices"], split, f"{d}.parquet"), domain=d, format="parquet")
            for d in domains]


# ---- training and evaluation --------------------------------------------------------------------------
def fit_and_test(module, train_dm: LatticeDataModule, test_dm: LatticeDataModule, config, epochs: int,
                 directory: str) -> Dict[str, Any]:
    """Trains ``epochs`` epochs, then tests the epoch with the lowest ``val/loss`` (``ckpt_path="best"``)."""
    shutil.rmtree(directory, ignore_errors=True)
    best = best_checkpoint(directory)
    run = trainer(epochs, [best], accelerator=config.trainer.accelerator or "cpu")
    t0 = time.perf_counter()
    run.fit(module, datamodule=train_dm)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run.test(module, datamodule=test_dm, ckpt_path="best", verbose=False)
    test_s = time.perf_counter() - t0
    out = {"results": dict(module.eval_results["test"]), "train_s": train_s, "test_s": test_s,
           "best_epoch": best_epoch(best), "best_val_loss": float(best.best_model_score)}
    shutil.rmtree(directory, ignore_errors=True)
    return out


def data_module(like: LatticeDataModule, train, val, test, batch_size: int) -> LatticeDataModule:
    return LatticeDataModule(
        sources=train, val_paths=val, test_paths=test, schema=like.schema, split="none",
        batch_size=batch_size, eval_batch_size=max(like.eval_batch_size, 4096), shuffle=like.shuffle,
        shuffle_buffer=like.shuffle_buffer, seed=like.seed, zipper_seed=like.zipper_seed,
    )


def per_domain_batch(rows: int, batch_size: int, min_steps: int) -> int:
    """The largest power of two <= ``batch_size`` giving at least ``min_steps`` steps per epoch (>= 64)."""
    b = batch_size
    while b > 64 and rows / b < min_steps:
        b //= 2
    return b


def network_cost(network, test_dm: LatticeDataModule) -> Dict[str, Any]:
    batch = next(iter(test_dm.test_dataloader()))
    network.eval()
    mean_len = mean_tokens(network, batch)
    return {
        "network": type(network).__name__,
        "params": network.num_parameters(),
        "dense_params": network.num_parameters(include_embeddings=False),
        "mflops_per_sample": network.flops_per_sample() / 1e6,
        "mflops_per_sample_mean_len": network.flops_per_sample(sequence_length=mean_len) / 1e6,
        "mean_sequence_tokens": mean_len,
    }


def pairs_of(schema, rows: Dict[str, Dict[str, int]]) -> List[Tuple[str, str]]:
    """The (domain, binary task) pairs the benchmark reports: tasks labelled in the domain."""
    binary = [t.name for t in schema.tasks if t.kind == "binary"]
    out = []
    for d in schema.domains:
        tasks = d.tasks or binary
        out += [(d.name, t) for t in binary if t in tasks]
    return out


def run_model(key: str, args, base_dm, data, overrides, epochs) -> Dict[str, Any]:
    group, description, extra, per_domain = MODELS[key]
    domains = base_dm.schema.domain_names
    test_all = slice_sources(data, "test", domains)
    extra_args, given = network_overrides(args, args.per_domain_config if per_domain else extra)
    overrides = overrides + extra_args
    if given:
        print(f"  network args: {given}", flush=True)
    if not per_domain:
        module, dm, config = build(args, extra, overrides)
        test_dm = data_module(dm, test_all, test_all, test_all, dm.batch_size)
        run = fit_and_test(module, dm, test_dm, config, epochs, os.path.join(args.work, "ckpt", key))
        cost = network_cost(module.network, test_dm)
        return {"group": group, "description": description, "config": extra or args.config, "network_args": given,
                "network_init_args": resolved_init_args(config), **cost,
                "train_s": run["train_s"], "test_s": run["test_s"], "best_epoch": run["best_epoch"],
                "batch_size": dm.batch_size, "results": run["results"]}
    results: Dict[str, float] = {}
    runs = {}
    train_s = test_s = 0.0
    cost = None
    for d in domains:
        module, dm, config = build(args, args.per_domain_config, overrides)
        rows = data["rows"][d]["train"]
        bs = per_domain_batch(rows, dm.batch_size, args.per_domain_min_steps)
        src = lambda split: slice_sources(data, split, [d])  # noqa: E731
        train_dm = data_module(dm, src("train"), src("val"), src("test"), bs)
        test_dm = data_module(dm, src("test"), src("test"), src("test"), bs)
        print(f"  per-domain model for {d!r}: {rows} training rows, batch {bs}", flush=True)
        run = fit_and_test(module, train_dm, test_dm, config, epochs, os.path.join(args.work, "ckpt", f"{key}-{d}"))
        results.update({k: v for k, v in run["results"].items() if k.startswith(f"{d}/")})
        train_s += run["train_s"]
        test_s += run["test_s"]
        runs[d] = {"batch_size": bs, "best_epoch": run["best_epoch"], "train_s": run["train_s"]}
        cost = cost or network_cost(module.network, test_dm)
    return {"group": group, "description": description, "config": args.per_domain_config or args.config,
            "network_args": given, "network_init_args": resolved_init_args(config), **cost,
            "train_s": train_s, "test_s": test_s, "best_epoch": {d: r["best_epoch"] for d, r in runs.items()},
            "batch_size": {d: r["batch_size"] for d, r in runs.items()}, "per_domain_runs": runs, "results": results}


# ---- report -------------------------------------------------------------------------------------------
def summarize(models: Dict[str, Dict[str, Any]], pairs, poor: str, args) -> Dict[str, Any]:
    oracle = {}
    for d, t in pairs:
        for m in models.values():
            v = m["results"].get(f"{d}/{t}/oracle_auc")
            if v is not None:
                oracle[f"{d}/{t}"] = v
                break
    for m in models.values():
        m["metrics"] = {f"{d}/{t}": {"auc": m["results"].get(f"{d}/{t}/auc", float("nan")),
                                     "logloss": m["results"].get(f"{d}/{t}/logloss", float("nan")),
                                     "count": m["results"].get(f"{d}/{t}/count", float("nan"))}
                        for d, t in pairs}
        m["mean_auc"] = mean(v["auc"] for v in m["metrics"].values())
        m["mean_logloss"] = mean(v["logloss"] for v in m["metrics"].values())
        m["poor_domain_mean_auc"] = mean(v["auc"] for k, v in m["metrics"].items() if k.startswith(poor + "/"))
    mean_oracle = mean(oracle.values())
    for m in models.values():
        m["gap_closed_vs_lr"] = None
    targets: Dict[str, Any] = {}
    lat = models.get("lattice")
    if lat is not None:
        others = {k: m["mean_auc"] for k, m in models.items() if k != "lattice"}
        best_other = max(others, key=others.get) if others else None
        targets["1_best_mean_auc"] = {
            "lattice_mean_auc": lat["mean_auc"], "best_other": best_other,
            "best_other_mean_auc": others.get(best_other) if best_other else None,
            "pass": bool(others) and all(lat["mean_auc"] > v for v in others.values()),
        }
        if "per_domain" in models:
            diff = lat["poor_domain_mean_auc"] - models["per_domain"]["poor_domain_mean_auc"]
            targets["2_poor_domain_beats_per_domain"] = {
                "domain": poor, "lattice": lat["poor_domain_mean_auc"],
                "per_domain": models["per_domain"]["poor_domain_mean_auc"], "difference": diff,
                "margin": args.margin, "pass": bool(diff >= args.margin),
            }
        if "lr" in models:
            lr = models["lr"]["mean_auc"]
            for m in models.values():
                m["gap_closed_vs_lr"] = (m["mean_auc"] - lr) / (mean_oracle - lr) if mean_oracle > lr else float("nan")
            closed = lat["gap_closed_vs_lr"]
            targets["3_closes_lr_oracle_gap"] = {
                "lr_mean_auc": lr, "oracle_mean_auc": mean_oracle, "lattice_mean_auc": lat["mean_auc"],
                "gap_closed": closed, "target": args.gap_target,
                "pass": bool(math.isfinite(closed) and closed >= args.gap_target),
            }
    return {"oracle": oracle, "oracle_mean_auc": mean_oracle, "targets": targets}


def best_epochs(best) -> str:
    if isinstance(best, list):  # one per seed
        return "/".join(best_epochs(b) for b in best)
    return ",".join(str(v) for v in best.values()) if isinstance(best, dict) else str(best)


# ---- several seeds ------------------------------------------------------------------------------------
def mean_and_se(values: List[float]) -> Tuple[float, float]:
    """Mean and its standard error (``nan`` for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, statistics.stdev(values, m) / math.sqrt(len(values))


def average_over_seeds(runs: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """One model dict per model whose ``results`` are each metric's mean over the seeds' runs (so every mean
    AUC and target computed from them is the mean over seeds); times and best epochs are kept per seed."""
    models = {}
    for key, first in runs[0].items():
        per_seed = [run[key] for run in runs]
        results = {k: mean(r["results"].get(k) for r in per_seed) for k in first["results"]}
        models[key] = {**{k: v for k, v in first.items() if k not in ("results", "metrics")},
                       "train_s": sum(r["train_s"] for r in per_seed), "test_s": sum(r["test_s"] for r in per_seed),
                       "best_epoch": [r["best_epoch"] for r in per_seed], "results": results}
    return models


def seed_statistics(seeds: List[Any], runs: List[Dict[str, Dict[str, Any]]],
                    summaries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per model: each seed's mean AUC, their mean and standard error; per rival of ``lattice``: the paired
    per-seed difference of mean AUC (lattice minus rival), its mean and standard error; per target: which
    seeds pass it on their own."""
    stats: Dict[str, Any] = {"seeds": list(seeds), "mean_auc": {}, "lattice_minus": {}, "targets_per_seed": {}}
    for key in runs[0]:
        values = [run[key]["mean_auc"] for run in runs]
        m, se = mean_and_se(values)
        stats["mean_auc"][key] = {"per_seed": values, "mean": m, "se": se}
    if "lattice" in runs[0]:
        for key in runs[0]:
            if key == "lattice":
                continue
            diffs = [run["lattice"]["mean_auc"] - run[key]["mean_auc"] for run in runs]
            m, se = mean_and_se(diffs)
            stats["lattice_minus"][key] = {"per_seed": diffs, "mean": m, "se": se}
    for name in summaries[0]["targets"]:
        stats["targets_per_seed"][name] = [s["targets"][name]["pass"] for s in summaries]
    return stats


def report(models, pairs, summary, poor: str) -> None:
    keys = list(models)
    oracle = summary["oracle"]
    print("\nTest AUC per (domain, task)  [oracle = AUC of the planted truth p_<task> on the same rows]")
    print_table(["domain", "task"] + keys + ["oracle"],
                [[d, t] + [fmt(models[k]["metrics"][f"{d}/{t}"]["auc"]) for k in keys] + [fmt(oracle.get(f"{d}/{t}"))]
                 for d, t in pairs])
    print("\nTest LogLoss per (domain, task)")
    print_table(["domain", "task"] + keys,
                [[d, t] + [fmt(models[k]["metrics"][f"{d}/{t}"]["logloss"]) for k in keys] for d, t in pairs])
    print("\nSummary (mean over the (domain, task) pairs above; FLOPs = analytic forward FLOPs per sample)")
    lines = []
    for k, m in models.items():
        lines.append([k, m["group"], m["network"], f"{m['params']:,}", f"{m['dense_params']:,}",
                      fmt(m["mflops_per_sample"], 3), fmt(m["mflops_per_sample_mean_len"], 3),
                      fmt(m["mean_auc"]), fmt(m["mean_logloss"]), fmt(m["poor_domain_mean_auc"]),
                      fmt(m["gap_closed_vs_lr"], 3), f"{m['train_s']:.0f}", best_epochs(m["best_epoch"])])
    lines.append(["oracle", "-", "-", "-", "-", "-", "-", fmt(summary["oracle_mean_auc"]), "-",
                  fmt(mean(v for k, v in oracle.items() if k.startswith(poor + "/"))), "1.000", "-", "-"])
    print_table(["model", "grp", "network", "params", "dense", "MFLOP@max", "MFLOP@mean", "mean AUC", "mean LL",
                 f"{poor} AUC", "LR gap", "train s", "best epoch"], lines)
    t = summary["targets"]
    print("\nTargets")
    if "1_best_mean_auc" in t:
        x = t["1_best_mean_auc"]
        print(f"  (1) lattice has the best mean AUC: {fmt(x['lattice_mean_auc'])} vs best other "
              f"{x['best_other']} {fmt(x['best_other_mean_auc'])} -> {'PASS' if x['pass'] else 'FAIL'}")
    if "2_poor_domain_beats_per_domain" in t:
        x = t["2_poor_domain_beats_per_domain"]
        print(f"  (2) data-poor domain {x['domain']!r}: lattice {fmt(x['lattice'])} vs per-domain {fmt(x['per_domain'])} "
              f"({x['difference']:+.4f}; margin {x['margin']}) -> {'PASS' if x['pass'] else 'FAIL'}")
    if "3_closes_lr_oracle_gap" in t:
        x = t["3_closes_lr_oracle_gap"]
        print(f"  (3) LR -> oracle gap closed: ({fmt(x['lattice_mean_auc'])} - {fmt(x['lr_mean_auc'])}) / "
              f"({fmt(x['oracle_mean_auc'])} - {fmt(x['lr_mean_auc'])}) = {fmt(x['gap_closed'], 3)} "
              f"(target {x['target']}) -> {'PASS' if x['pass'] else 'FAIL'}")
    if not t:
        print("  (need the lattice model, plus per_domain and lr, to evaluate them)")


def report_seeds(stats: Dict[str, Any]) -> None:
    n = len(stats["seeds"])
    print(f"\nAcross the {n} seeds {stats['seeds']}: mean AUC per seed, mean +- standard error")
    print_table(["model"] + [f"seed {s}" for s in stats["seeds"]] + ["mean", "se"],
                [[k] + [fmt(v) for v in x["per_seed"]] + [fmt(x["mean"]), fmt(x["se"])]
                 for k, x in stats["mean_auc"].items()])
    if stats["lattice_minus"]:
        print("\nlattice minus each rival, paired by seed (mean AUC)")
        print_table(["rival"] + [f"seed {s}" for s in stats["seeds"]] + ["mean", "se", "lattice ahead"],
                    [[k] + [f"{v:+.4f}" for v in x["per_seed"]] + [f"{x['mean']:+.4f}", fmt(x["se"]),
                                                                     f"{sum(v > 0 for v in x['per_seed'])}/{n}"]
                     for k, x in stats["lattice_minus"].items()])
    for name, passes in stats["targets_per_seed"].items():
        print(f"  target {name}: passes on {sum(passes)} of {n} seeds on its own")


def run(args, t_start: float) -> Dict[str, Any]:
    """The whole study for the options ``args`` (bench_quality.py's parsed arguments, with ``work`` a scratch
    folder): every model of ``args.models`` per seed, the tables printed, the report returned."""
    seeds = args.seed or [None]
    args.run_seed = seeds[0]
    # the world and the data module of the base config (the --quick world: a tiny one of the same shape)
    _, base_dm, base_cfg = build(args, None, [])
    overrides = quick_overrides(base_dm.world.config) if args.quick else []
    if overrides:
        _, base_dm, base_cfg = build(args, None, overrides)
    epochs = args.epochs or (1 if args.quick else int(base_cfg.trainer.max_epochs or 1))
    data = prepare_data(args, base_dm)
    schema = base_dm.schema
    pairs = pairs_of(schema, data["rows"])
    world_rows = {d.name: d.rows for d in base_dm.world.config.domains}
    poor = min(world_rows, key=world_rows.get)
    print(f"world: {world_rows} rows ({sum(world_rows.values())}), data-poor domain {poor!r}; split by time: "
          f"{ {d: (r['train'], r['val'], r['test']) for d, r in data['rows'].items()} } (train, val, test) rows"
          + (f"; test rows of {sorted(data['enlarged_eval_world_rows'])} from the enlarged world"
             if data["enlarged_eval_world_rows"] else "")
          + f"; {epochs} epoch(s), {torch.get_num_threads()} thread(s)"
          + (f"; seeds {seeds}" if len(seeds) > 1 else ""), flush=True)

    runs: List[Dict[str, Dict[str, Any]]] = []
    summaries: List[Dict[str, Any]] = []
    for seed in seeds:
        args.run_seed = seed
        models: Dict[str, Dict[str, Any]] = {}
        for key in args.models:
            print(f"training {key} ({MODELS[key][1]})" + (f", seed {seed}" if len(seeds) > 1 else "") + " ...",
                  flush=True)
            models[key] = run_model(key, args, base_dm, data, overrides, epochs)
            res = models[key]["results"]
            print(f"  done in {models[key]['train_s']:.0f} s (test {models[key]['test_s']:.0f} s): mean test AUC "
                  f"{fmt(mean(res.get(f'{d}/{t}/auc') for d, t in pairs))}, {poor} "
                  f"{fmt(mean(res.get(f'{d}/{t}/auc') for d, t in pairs if d == poor))}, "
                  f"{models[key]['mflops_per_sample_mean_len']:.3f} MFLOP/sample at the mean length, best epoch "
                  f"{best_epochs(models[key]['best_epoch'])}", flush=True)
        runs.append(models)
        summaries.append(summarize(models, pairs, poor, args))

    seed_stats = None
    if len(seeds) == 1:
        models, summary = runs[0], summaries[0]
    else:
        seed_stats = seed_statistics(seeds, runs, summaries)
        models = average_over_seeds(runs)
        summary = summarize(models, pairs, poor, args)
        print(f"\nEvery figure below is the mean over seeds {seeds}; train s is the total over them.")
    report(models, pairs, summary, poor)
    if seed_stats is not None:
        report_seeds(seed_stats)
    total = time.perf_counter() - t_start
    print(f"\ntotal wall time {total:.0f} s")
    result = {
        "benchmark": "bench_quality",
        "quick": args.quick,
        "args": {k: v for k, v in vars(args).items() if k != "work"},
        "machine": machine(),
        "epochs": epochs,
        "world": {"rows": world_rows, "data_poor_domain": poor, "split_rows": data["rows"],
                  "enlarged_eval_world_rows": data["enlarged_eval_world_rows"], "time_cutoffs": data["time_cutoffs"],
                  "config": dataclasses.asdict(base_dm.world.config)},
        "pairs": [f"{d}/{t}" for d, t in pairs],
        "oracle": summary["oracle"],
        "oracle_mean_auc": summary["oracle_mean_auc"],
        "models": {k: {kk: vv for kk, vv in m.items() if kk != "results"} for k, m in models.items()},
        "targets": summary["targets"],
        "seeds": seeds,
        "seed_statistics": seed_stats,
        "per_seed": None if seed_stats is None else [
            {"seed": seed, "targets": s["targets"],
             "models": {k: {kk: vv for kk, vv in m.items() if kk not in ("results", "network_init_args")}
                        for k, m in run.items()}}
            for seed, run, s in zip(seeds, runs, summaries)],
        "total_wall_s": total,
    }
    return result
