"""The Lattice Filter benchmark's study on the planted world: does feature selection find the planted noise, and does
a model retrained on the kept features lose nothing?

Everything goes through lattice's own command line, exactly as a user would run it:

1. ``lattice fit --config configs/mdmo.yaml`` trains the full-feature model (the config's world, model,
   seed and epochs; the benchmark only adds an override for output folders), then ``lattice test`` on
   its last checkpoint gives the test-split metrics.
2. ``lattice filter --config configs/mdmo.yaml --ckpt_path last.ckpt --budget N`` computes per-task
   permutation importance on the validation split and peels Pareto fronts down to ``N`` = the number of
   informative features of the planted world (:meth:`SyntheticWorld.feature_roles`).
3. ``lattice fit`` again, same config, seed and epochs, with one change: ``data.schema`` points at the
   ``kept_features.yaml`` the filter wrote (its output is used as is, so the path "filter -> data config"
   is exercised for real); then ``lattice test``.

Reported (and written to JSON):

- the importance ranking (features by front, then mean LogLoss rise), where every planted noise feature
  landed (front, rank, per-task rank);
- **ranking target**: on every task, every informative feature that informs the task (enters its planted
  logit, or its parent task's; see :func:`planted_informs`) has a higher mean importance than every
  noise feature; the same checked over *every* informative feature and task is reported beside it;
- **budget target**: with budget = informative count the kept set is exactly the informative features;
- **AUC target**: mean test AUC (over tasks, all domains) of the filtered model is at most 0.002 below
  the full model's (``--seeds K`` averages both over K training seeds).

Beside the targets, a diagnostic of what the evaluation set can resolve: :func:`oracle_rise` computes,
from the planted world itself, the LogLoss rise the Bayes-optimal model would show if a feature's planted
context term (device, hour, position, query, price, brand, repeat) were removed; a (feature, task) pair
whose oracle rise is under two of the filter's standard errors cannot stand out from the noise features
on that evaluation set whatever the model, and the ranking check is repeated without those pairs. And a
diagnostic of what the model learned: :func:`reengagement_probe` measures how much the full model's logits
move when the one piece of information only ``hist_items`` holds (the target item is in the history) is
removed, against the planted coefficient.

benchmarks/bench_filter.py is its command line; ``args`` below are its parsed arguments.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import yaml

from lattice.benchmark.common import fmt, print_table
from lattice.cli import main as lattice_main
from lattice.cli import run_lightning
from lattice.data.planted import oracle_rise, planted_informs
from lattice.data.synthetic import SyntheticConfig, SyntheticWorld
from lattice.select.answer_key import analyse_ranking, matrix
from lattice.train.loading import load_from_config


# ---- configs -------------------------------------------------------------------------------------------
def quick_config() -> Dict[str, Any]:
    """A small planted world and LatticeNetwork for the smoke run and the test (about a minute): the
    mdmo world's features, tasks and windows on 8000 rows, with few ids (every user, item and noise id
    seen many times, so little to memorize), higher base rates and strong row-level context effects
    (hour, device, position, query, repeat) so that their importance stands well clear of the
    evaluation set's standard error."""
    windows = [{"name": "90min", "seconds": 5400, "probability": 0.2}, {"name": "1d", "seconds": 86400, "probability": 0.3},
               {"name": "7d", "seconds": 604800, "probability": 0.5}]
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 3, "num_sanity_val_steps": 0},
        "model": {
            "network": {"class_path": "lattice.models.LatticeNetwork",
                        "init_args": {"dim": 8, "num_layers": 1, "num_heads": 1, "fm_tokens": 4, "lcb_tokens": 4,
                                      "fm_hidden_dims": [16], "representation_dim": 16, "head_hidden_dims": [16],
                                      "history_match": True}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            "sparse_optimizer": "rowwise_adagrad",
            "sparse_lr": 0.3,
            "group_auc": False,
        },
        "data": {
            "batch_size": 256,
            "eval_batch_size": 4096,
            "split": "time",
            "val_fraction": 0.25,
            "test_fraction": 0.15,
            "synthetic": {
                "seed": 1, "num_users": 200, "num_items": 100, "num_clusters": 6, "noise_cardinality": 20,
                "max_sequence_length": 8, "mean_sequence_length": 4.0, "row_group_size": 2048,
                "domains": [
                    {"name": "feed", "rows": 5000, "shift": 0.3, "absent_features": ["query_cluster"]},
                    {"name": "search", "rows": 3000, "shift": 0.5, "absent_features": ["item_tags"]},
                ],
                "tasks": [
                    {"name": "click", "base_rate": 0.3, "position": 0.4, "hour": 1.5, "query": 2.0, "repeat": 1.5,
                     "device": 1.0, "activity": 1.0},
                    {"name": "like", "parent": "click", "base_rate": 0.4, "brand": 1.5, "user_bias": 0.5,
                     "popularity": 0.3, "seq": 0.8, "repeat": 1.5, "device": 1.0},
                    {"name": "conversion", "parent": "click", "base_rate": 0.3, "price": -1.5, "user_bias": 0.4,
                     "popularity": 0.5, "seq": 0.5, "repeat": 1.5, "device": 1.0, "windows": windows},
                ],
            },
        },
    }


def override(work: str, name: str, epochs: Optional[int], seed: Optional[int], cache_dir: Optional[str],
             schema: Optional[str] = None) -> Dict[str, Any]:
    """What the benchmark changes in the config for run ``name``: output folders (under ``work``), no
    progress bar, the last checkpoint kept; optionally epochs, seed, the data cache and the schema."""
    root = os.path.join(work, name)
    doc: Dict[str, Any] = {
        "trainer": {
            "default_root_dir": root,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": os.path.join(root, "checkpoints"), "save_last": True}}],
        },
        "metrics_table": {"output_dir": root, "print_table": False},
    }
    if epochs is not None:
        doc["trainer"]["max_epochs"] = int(epochs)
    if seed is not None:
        doc["seed_everything"] = int(seed)
    data: Dict[str, Any] = {}
    if cache_dir is not None:
        data["cache_dir"] = cache_dir
    if schema is not None:
        data["schema"] = schema  # the filter's kept_features.yaml, as written
    if data:
        doc["data"] = data
    return doc


def write_yaml(path: str, doc: Dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    return path


# ---- runs through the CLI ------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(enabled: bool):
    """Hide what the commands print unless ``--verbose``; the commands see no stray ``sys.argv`` (the
    benchmark's own options are not theirs)."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        if not enabled:
            yield
            return
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        sys.argv = argv


def fit_and_test(configs: List[str], quiet: bool) -> Dict[str, Any]:
    """``lattice fit`` then ``lattice test`` on the last checkpoint; returns the test metrics and the
    features the trained network was built with."""
    args = [a for c in configs for a in ("--config", c)]
    t0 = time.perf_counter()
    with _quiet(quiet):
        cli = run_lightning(["fit", *args])
    fit_s = time.perf_counter() - t0
    ckpt = os.path.join(cli.trainer.default_root_dir, "checkpoints", "last.ckpt")
    if not os.path.exists(ckpt):
        raise RuntimeError(f"lattice fit wrote no last checkpoint at {ckpt}")
    features = list(cli.model.network.schema.feature_names)
    epochs = int(cli.trainer.current_epoch)
    with _quiet(quiet):
        cli = run_lightning(["test", *args, "--ckpt_path", ckpt])
    return {"ckpt": ckpt, "test": dict(cli.model.eval_results["test"]), "features": features, "fit_s": fit_s,
            "epochs": epochs, "parameters": int(sum(p.numel() for p in cli.model.network.parameters()))}


def run_filter_command(configs: List[str], ckpt: str, budget: int, out_dir: str, args) -> Dict[str, Any]:
    argv = ["filter", *[a for c in configs for a in ("--config", c)], "--ckpt_path", ckpt, "--budget", str(budget),
            "--out_dir", out_dir, "--repeats", str(args.repeats), "--seed", str(args.filter_seed),
            "--compare_weighted_sum", "true", "--plot", "false" if args.no_plot else "true"]
    if args.max_rows is not None:
        argv += ["--max_rows", str(args.max_rows)]
    t0 = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), _quiet(False):
        lattice_main(argv)
    seconds = time.perf_counter() - t0
    with open(os.path.join(out_dir, "importance.json")) as fh:
        summary = json.load(fh)
    with open(os.path.join(out_dir, "kept_features.yaml")) as fh:
        kept_doc = yaml.safe_load(fh)
    return {"argv": ["lattice", *argv], "summary": summary, "kept_doc": kept_doc, "printed": buf.getvalue(),
            "seconds": seconds, "kept_yaml": os.path.join(out_dir, "kept_features.yaml")}


def reengagement_probe(configs: List[str], ckpt: str, max_rows: int = 50000, seed: int = 0) -> Dict[str, Any]:
    """Did the trained model learn ``hist_items``' own planted term, re-engagement (``repeat``: the target
    item is in the user's history)? On the validation rows where it is, swap only the matching history
    item(s) for history items drawn from other rows and report the mean drop of each task's logit.
    Everything else ``hist_items`` carries (the clusters of the history, for the ``seq`` term) is also in
    ``hist_clusters``, so re-engagement is the information only ``hist_items`` holds: a model whose
    logits hardly move here leaves ``hist_items`` nothing of its own for permutation importance to find,
    whatever the evaluation set. (Compare with the planted coefficients, ``planted``: z-units of the
    task's own logit, a child task's probability also moving with its parent's.)"""
    import dataclasses

    from lattice.select.importance import gather_eval_set, replace_key
    from lattice.sparse import JaggedTensor

    with _quiet(True):
        module, dm = load_from_config(configs, ckpt)
    module.eval()
    dm.setup("validate")
    ev = gather_eval_set(dm.val_dataloader(), max_rows=max_rows)
    tasks = list(dm.schema.task_names)
    gen = torch.Generator().manual_seed(seed)
    drops, rows, seen = [], 0, 0
    with torch.no_grad():
        for chunk in ev.chunks:
            seen += int(chunk.domain.shape[0])
            seq = chunk.sequences
            if seq is None or "hist_items" not in seq.keys() or "item" not in chunk.sparse.keys():
                continue
            hist, item = seq["hist_items"], chunk.sparse["item"]
            if not bool((item.lengths() == 1).all()):
                continue
            vals, offs = hist.values(), hist.offsets()
            row = torch.repeat_interleave(torch.arange(offs.numel() - 1), offs.diff())
            hit = vals == item.values()[row]
            rep = torch.zeros(offs.numel() - 1, dtype=torch.bool)
            rep[row[hit]] = True
            if not bool(rep.any()) or bool(hit.all()):
                continue
            donors = vals[~hit]
            swapped = vals.clone()
            swapped[hit] = donors[torch.randint(0, donors.numel(), (int(hit.sum()),), generator=gen)]
            alt = dataclasses.replace(chunk, sequences=replace_key(seq, seq.keys().index("hist_items"),
                                                                   JaggedTensor(swapped, offsets=offs)))
            drops.append((module(chunk).logits[rep] - module(alt).logits[rep]).to(torch.float64))
            rows += int(rep.sum())
    mean = torch.cat(drops).mean(0).tolist() if drops else [float("nan")] * len(tasks)
    return {"rows": rows, "of_rows": seen, "logit_drop": dict(zip(tasks, mean))}


# ---- analysis ------------------------------------------------------------------------------------------
def mean_auc(test: Dict[str, float], tasks: List[str]) -> Dict[str, float]:
    """Mean over tasks of the all-domain test AUC (the target), and the mean over (domain, task) cells."""
    per_task = {t: test.get(f"{t}/auc", float("nan")) for t in tasks}
    cells = [v for k, v in test.items() if k.endswith("/auc") and k.count("/") == 2 and math.isfinite(v)]
    vals = [v for v in per_task.values() if math.isfinite(v)]
    return {"per_task": per_task, "mean": float(np.mean(vals)) if vals else float("nan"),
            "mean_cells": float(np.mean(cells)) if cells else float("nan"),
            "oracle": {t: test.get(f"{t}/oracle_auc", float("nan")) for t in tasks}}


def print_report(rep: Dict[str, Any]) -> None:
    r = rep["ranking"]
    summ = rep["filter"]["summary"]
    tasks = summ["tasks"]
    feats = summ["features"]
    mean = dict(zip(feats, matrix(summ["delta_logloss_mean"])))
    std = dict(zip(feats, matrix(summ["delta_logloss_std"])))
    se = dict(zip(feats, matrix(summ["delta_logloss_se"]))) if summ.get("delta_logloss_se") else None
    score = dict(zip(feats, matrix(summ["selection_scores"]))) if summ.get("selection_scores") else None
    front_of = {f: j for j, front in enumerate(summ.get("fronts", [])) for f in front}
    kept = set(rep["kept"])
    roles = rep["roles"]
    print(f"\nimportance ranking: LogLoss rise x1e3 per task, mean ± std over {summ['repeats']} repeats "
          f"[standard error over the {summ['rows']} validation rows]; '~' = within the significance band "
          f"(scored 0 for selection); by front, then mean. 'oracle rise': what the Bayes-optimal model "
          f"would show per task (see oracle_rise):")
    oracle = r.get("oracle_rise") or {}
    head = ["#", "feature", "role", "front", "kept"] + tasks + ["informs (planted)", "oracle rise x1e3"]
    lines = []
    for i, f in enumerate(r["overall_order"], 1):
        cells = []
        for k in range(len(tasks)):
            m = mean[f][k]
            if not math.isfinite(m):
                cells.append("nan")
                continue
            c = f"{1e3 * m:+.3f}±{1e3 * std[f][k]:.3f}"
            if se is not None:
                c += f" [{1e3 * se[f][k]:.3f}]"
            if score is not None and score[f][k] == 0.0 and m != 0.0:
                c += "~"
            cells.append(c)
        role = "NOISE" if f in roles["noise"] else "inf"
        lines.append([str(i), f, role, str(front_of.get(f, "-")), "yes" if f in kept else "-", *cells,
                      "-" if f in roles["noise"] else (",".join(rep["informs"].get(f, [])) or "- (proxy only)"),
                      "/".join(f"{1e3 * oracle[f][t]:.2f}" for t in tasks) if f in oracle else "-"])
    print_table(head, lines)
    print("\nplanted noise features (rank by task among the selection scores):")
    for n, w in r["noise"].items():
        ranks = ", ".join(f"{t} {w['rank_by_task'][t]}/{len(feats)}" for t in tasks)
        print(f"  {n:<10} front {w['front']}, rank: {ranks}; kept: {'yes' if n in kept else 'no'}")
    print("  margin (lowest informing feature - highest noise, selection scores x1e3): "
          + ", ".join(f"{t} {1e3 * m:+.3f}" for t, m in r["margin_by_task"].items()))
    print(f"\nkept ({len(rep['kept'])}, budget {rep['budget']}): {rep['kept']}")
    if rep.get("kept_weighted_sum") is not None:
        print(f"weighted-sum selection, same budget: {rep['kept_weighted_sum']}")
    print(f"filtered model was built with {len(rep['filtered']['features'])} features "
          f"(data.schema = {rep['filter']['kept_yaml']})")
    print("\ntest AUC (all domains)        " + "  ".join(f"{t:>10}" for t in tasks) + "    mean  mean(cells)")
    for name in ("full", "filtered"):
        a = rep[name]["auc"]
        print(f"  {name:<28}" + "  ".join(f"{fmt(a['per_task'][t]):>10}" for t in tasks)
              + f"  {fmt(a['mean'])}  {fmt(a['mean_cells'])}")
    o = rep["full"]["auc"]["oracle"]
    print(f"  {'oracle':<28}" + "  ".join(f"{fmt(o[t]):>10}" for t in tasks))
    t = rep["targets"]
    print(f"\ndelta mean AUC (filtered - full): {t['delta_mean_auc']:+.4f} "
          f"(mean over (domain, task) cells: {t['delta_mean_auc_cells']:+.4f}; {rep['seeds']} seed(s), "
          f"{rep['epochs']} epoch(s){' (overridden)' if rep['epochs_overridden'] else ''})")

    def pf(ok):
        return "PASS" if ok else "FAIL"

    print(f"target: noise below every informative feature on the tasks it informs: {pf(t['ranking'])} "
          f"({len(r['violations'])} violation(s)); [on every task: {pf(r['ranking_pass_every_task'])}; "
          f"by raw means: {pf(r['ranking_pass_raw_mean'])}; counting only the task's own logit (not its parent's): "
          f"{pf(r['ranking_pass_own_logit'])}; every noise front after every informative front: "
          f"{pf(r['noise_fronts_after_informative'])}]")
    if r.get("ranking_pass_resolvable") is not None:
        un = ", ".join(f"{u['feature']}/{u['task']} ({1e3 * u['oracle_rise']:.2f} vs se {1e3 * u['se']:.2f})"
                       for u in r["unresolvable"]) or "none"
        print(f"  pairs beyond this evaluation set's resolution (oracle rise < 2 standard errors, x1e3): {un}")
        print(f"  the same target over the resolvable pairs: {pf(r['ranking_pass_resolvable'])} "
              f"({len(r['violations_resolvable'])} violation(s))")
    for v in r["violations_any_task"][:16]:
        print(f"    {v['feature']} on {v['task']}: {1e3 * v['importance']:+.3f} <= top noise {1e3 * v['top_noise']:+.3f}"
              f"{'' if v['informs'] else '  (not planted in this task)'}")
    print(f"target: budget {rep['budget']} keeps every informative feature: {pf(t['keeps_all_informative'])}"
          + (f" (missing {t['missing_informative']}, kept noise {t['kept_noise']})" if not t["keeps_all_informative"] else ""))
    print(f"target: mean AUC loss <= {rep['auc_tolerance']}: {pf(t['auc_within_tolerance'])}")
    pr = rep.get("reengagement")
    if pr is not None:
        planted = pr.get("planted", {})
        print(f"\nre-engagement probe (hist_items' own planted term; see reengagement_probe): on the {pr['rows']} of "
              f"{pr['of_rows']} validation rows whose target item is in hist_items, swapping the matching history "
              f"item(s) out lowers the full model's logits by "
              + ", ".join(f"{t} {v:+.3f}" + (f" (planted {planted[t]:+.2f})" if t in planted else "")
                          for t, v in pr["logit_drop"].items()))


def analyse(report: Dict[str, Any], wcfg: SyntheticConfig) -> Dict[str, Any]:
    """Fills ``report["ranking"]`` and ``report["targets"]`` from the filter's summary and the AUCs."""
    roles, kept = report["roles"], report["kept"]
    report["informs"] = planted_informs(wcfg)
    if report.get("reengagement") is not None:
        report["reengagement"]["planted"] = {t.name: t.repeat for t in wcfg.tasks if t.kind == "binary"}
    report["ranking"] = ranking = analyse_ranking(
        report["filter"]["summary"], roles, report["informs"], planted_informs(wcfg, through_parent=False),
        oracle_rise(wcfg))
    missing = [f for f in roles["informative"] if f not in kept]
    delta = report["filtered"]["auc"]["mean"] - report["full"]["auc"]["mean"]
    report["targets"] = {
        "ranking": ranking["ranking_pass"],
        "ranking_every_task": ranking["ranking_pass_every_task"],
        "ranking_resolvable": ranking["ranking_pass_resolvable"],
        "keeps_all_informative": not missing,
        "missing_informative": missing,
        "kept_noise": [f for f in kept if f in roles["noise"]],
        "delta_mean_auc": delta,
        "delta_mean_auc_cells": report["filtered"]["auc"]["mean_cells"] - report["full"]["auc"]["mean_cells"],
        "auc_within_tolerance": bool(delta >= -report["auc_tolerance"]),
    }
    return report


def reanalyse(path: str, out: Optional[str], root: str) -> Dict[str, Any]:
    """Recompute the analysis of a saved run (no training), print it, rewrite the JSON (to ``out``); ``root``:
    the folder the run's config path is relative to."""
    with open(path) as fh:
        report = json.load(fh)
    cfg = report["config"]
    if isinstance(cfg, str):
        with open(os.path.join(root, cfg)) as fh:
            cfg = yaml.safe_load(fh)
    wcfg = SyntheticConfig.from_dict((cfg.get("data") or {}).get("synthetic") or {})
    if report.get("reengagement") is None:  # a run from before the probe: run it if the checkpoint is still there
        argv = report["filter"]["argv"]
        configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
        ckpt = argv[argv.index("--ckpt_path") + 1]
        if all(os.path.exists(x) for x in [*configs, ckpt]):
            report["reengagement"] = reengagement_probe(configs, ckpt)
    analyse(report, wcfg)
    print_report(report)
    with open(out or path, "w") as fh:
        json.dump(report, fh, indent=1, default=float)
    print(f"wrote {out or path}")
    return report


def run(args, work: str, root: str) -> Dict[str, Any]:
    """The whole study for ``args`` (bench_filter.py's parsed arguments) in the scratch folder ``work``: fit,
    filter, probe, refit on the kept features (per seed), analyse and print; the report. ``root``: the folder
    the report names the config relative to."""
    if args.quick:
        base = write_yaml(os.path.join(work, "quick.yaml"), quick_config())
    else:
        base = os.path.abspath(args.config)
    with open(base) as fh:
        base_doc = yaml.safe_load(fh)
    wcfg = SyntheticConfig.from_dict((base_doc.get("data") or {}).get("synthetic") or {})
    roles = SyntheticWorld(wcfg).feature_roles()
    informs = planted_informs(wcfg)
    budget = len(roles["informative"])
    seed0 = int(base_doc.get("seed_everything", 0) or 0)
    epochs = args.epochs if args.epochs is not None else int((base_doc.get("trainer") or {}).get("max_epochs", 1))
    print(f"config {os.path.relpath(base, root) if not args.quick else 'quick (small world and model)'}: "
          f"world {sum(d.rows for d in wcfg.domains)} rows, {len(wcfg.domains)} domains; "
          f"{len(roles['informative'])} informative + {len(roles['noise'])} noise features; "
          f"{epochs} epoch(s){' (overridden)' if args.epochs is not None else ''}; budget {budget}", flush=True)

    seeds = [seed0 + s for s in range(args.seeds)]
    full_runs, filtered_runs = [], []
    print(f"lattice fit (full features, seed {seeds[0]}) ...", flush=True)
    ov = write_yaml(os.path.join(work, "full-0.yaml"), override(work, "full-0", args.epochs, seeds[0], args.cache_dir))
    full_runs.append(fit_and_test([base, ov], quiet=not args.verbose))
    full_cfgs = [base, ov]

    print(f"lattice filter --budget {budget} ...", flush=True)
    filt = run_filter_command(full_cfgs, full_runs[0]["ckpt"], budget, os.path.join(work, "filter"), args)
    if args.verbose:
        print(filt["printed"])
    kept = list(filt["kept_doc"]["features"])
    print("re-engagement probe of the full model ...", flush=True)
    probe = reengagement_probe(full_cfgs, full_runs[0]["ckpt"])
    kept_ws = next((s["kept"] for s in filt["summary"]["selections"] if s["method"] != "pareto"), None)

    for s, seed in enumerate(seeds):
        if s > 0:
            print(f"lattice fit (full features, seed {seed}) ...", flush=True)
            ov = write_yaml(os.path.join(work, f"full-{s}.yaml"),
                            override(work, f"full-{s}", args.epochs, seed, args.cache_dir))
            full_runs.append(fit_and_test([base, ov], quiet=not args.verbose))
        print(f"lattice fit (kept features, data.schema = kept_features.yaml, seed {seed}) ...", flush=True)
        ov = write_yaml(os.path.join(work, f"filtered-{s}.yaml"),
                        override(work, f"filtered-{s}", args.epochs, seed, args.cache_dir, schema=filt["kept_yaml"]))
        filtered_runs.append(fit_and_test([base, ov], quiet=not args.verbose))
        if sorted(filtered_runs[-1]["features"]) != sorted(kept):
            raise RuntimeError(f"the retrained model's features {filtered_runs[-1]['features']} are not the "
                               f"filter's kept set {kept}")

    tasks = [t.name for t in wcfg.tasks if t.kind == "binary"]

    def summarize(runs):
        aucs = [mean_auc(r["test"], tasks) for r in runs]
        agg = {
            "per_task": {t: float(np.mean([a["per_task"][t] for a in aucs])) for t in tasks},
            "mean": float(np.mean([a["mean"] for a in aucs])),
            "mean_cells": float(np.mean([a["mean_cells"] for a in aucs])),
            "oracle": aucs[0]["oracle"],
            "per_seed_mean": [a["mean"] for a in aucs],
        }
        return {"auc": agg, "features": runs[0]["features"], "fit_s": [r["fit_s"] for r in runs],
                "epochs": [r["epochs"] for r in runs], "parameters": runs[0]["parameters"],
                "test": [r["test"] for r in runs]}

    full, filtered = summarize(full_runs), summarize(filtered_runs)
    report = {
        "benchmark": "bench_filter",
        "quick": args.quick,
        "config": base_doc if args.quick else os.path.relpath(base, root),
        "args": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "note": "shared machine: timings are indicative only"},
        "world": {"rows": {d.name: d.rows for d in wcfg.domains}, "fingerprint": wcfg.fingerprint()},
        "epochs": epochs,
        "epochs_overridden": args.epochs is not None,
        "seeds": len(seeds),
        "roles": roles,
        "informs": informs,
        "budget": budget,
        "filter": {"argv": filt["argv"], "seconds": filt["seconds"], "summary": filt["summary"],
                   "kept_yaml": filt["kept_yaml"], "selection": filt["kept_doc"].get("selection")},
        "kept": kept,
        "kept_weighted_sum": kept_ws,
        "reengagement": probe,
        "full": full,
        "filtered": filtered,
        "auc_tolerance": args.auc_tolerance,
    }
    analyse(report, wcfg)
    print_report(report)
    return report
