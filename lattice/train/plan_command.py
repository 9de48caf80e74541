"""``lattice plan``: place a config's embedding tables across ranks and print the plan.

::

    lattice plan --config configs/mdmo.yaml --world-size 4 --memory-per-rank 4GiB
    lattice plan --config configs/mdmo.yaml --world-size 2 --memory-per-rank 512MiB \\
        --override item=row_wise --out plan.yaml

The network is built on the meta device (no table is allocated, so a plan for tables larger than this host
is made here too), its tables are read from its embedding collections, the pooling factors are measured on the
first ``--num-batches`` training batches, and :func:`lattice.train.planner.plan_tables` places them. The plan
prints as a table with the cost model under it; ``--out`` writes it as YAML
(:meth:`lattice.nn.placement.ShardingPlan.to_dict`).
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

from lattice.train.planner import DEFAULT_TIME_LIMIT_S

__all__ = ["main", "parse_overrides", "plan_config"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lattice plan", exit_on_error=False,
                                description="Place a config's embedding tables across ranks (replicated, table-, "
                                            "row- or column-wise) under a memory budget per rank.")
    p.add_argument("--config", action="append", required=True,
                   help="training config(s), stacked like lattice fit's")
    p.add_argument("--world-size", type=int, required=True, help="ranks to plan for (devices x nodes)")
    p.add_argument("--memory-per-rank", required=True,
                   help="table and optimizer-state bytes a rank may hold: 4GiB, 512MB, 1000000")
    p.add_argument("--override", action="append", default=[], metavar="TABLE=KIND",
                   help="fix a table's placement kind: replicated, table_wise, row_wise or column_wise (repeatable)")
    p.add_argument("--overrides", metavar="YAML",
                   help="a YAML mapping table -> kind, or -> {kind, ranks, row_bounds, col_bounds}")
    p.add_argument("--out", help="write the plan to this YAML file")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                   help=f"seconds the search may take (default {DEFAULT_TIME_LIMIT_S:g})")
    p.add_argument("--num-batches", type=int, default=8,
                   help="training batches read to measure the pooling factors (default 8)")
    p.add_argument("--batch-size", type=int, help="samples per rank per step (default: the config's data.batch_size)")
    p.add_argument("--network-gbit-s", type=float, help="network bandwidth per rank, Gbit/s (default 100)")
    p.add_argument("--memory-gb-s", type=float, help="memory bandwidth, GB/s (default 100)")
    p.add_argument("--memory-weight", type=float,
                   help="weight of the fullest rank's memory share against step time (default 0.1)")
    return p


def parse_overrides(pairs: Sequence[str], path: Optional[str] = None) -> Dict[str, Any]:
    """``{table: kind or mapping}`` from a YAML file (``path``) and then ``TABLE=KIND`` pairs (which win)."""
    overrides: Dict[str, Any] = {}
    if path is not None:
        import yaml

        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--overrides {path}: expected a mapping table -> placement, got {type(loaded).__name__}")
        overrides.update({str(k): v for k, v in loaded.items()})
    for pair in pairs:
        table, sep, kind = pair.partition("=")
        if not sep or not table or not kind:
            raise ValueError(f"--override {pair!r}: expected TABLE=KIND, e.g. item=row_wise")
        overrides[table] = kind
    return overrides


def main(argv: Sequence[str]) -> None:
    """``lattice plan ...`` (``argv`` with or without the leading ``plan``)."""
    argv = list(argv)
    if argv and argv[0] == "plan":
        argv = argv[1:]
    args = _parser().parse_args(argv)

    from lattice.train.planner import format_plan, parse_bytes

    budget = parse_bytes(args.memory_per_rank, "--memory-per-rank")
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.num_batches < 1:
        raise ValueError(f"--num-batches must be >= 1, got {args.num_batches}")
    overrides = parse_overrides(args.override, args.overrides)
    constants = {k: v for k, v in (("network_gbit_s", args.network_gbit_s), ("memory_gb_s", args.memory_gb_s),
                                    ("memory_weight", args.memory_weight)) if v is not None}
    estimate = plan_config(args.config, args.world_size, budget, overrides=overrides, time_limit_s=args.time_limit,
                           num_batches=args.num_batches, batch_size=args.batch_size, **constants)
    print(format_plan(estimate))
    if args.out:
        import yaml

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(f"# lattice plan: {args.world_size} ranks, {args.memory_per_rank} per rank\n")
            yaml.safe_dump(estimate.plan.to_dict(), fh, sort_keys=False)
        print(f"wrote {args.out}")


def plan_config(configs: List[str], world_size: int, memory_per_rank, *, overrides=None,
                time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                num_batches: int = 8, batch_size: Optional[int] = None, **cost_constants):
    """The :class:`~lattice.train.planner.PlanEstimate` of a training config's tables: the network built on the
    meta device, pooling factors measured on ``num_batches`` training batches, the cost model's batch the config's
    ``data.batch_size`` unless ``batch_size`` is given."""
    import torch

    from lattice.train.loading import load_from_config
    from lattice.train.planner import CostModel, measure_pooling_factors, network_tables, plan_with_estimate

    with torch.device("meta"), warnings.catch_warnings():  # the tables' geometry without their memory
        warnings.filterwarnings("ignore", ".*args parameter is intended to run from within Python.*")
        module, datamodule = load_from_config(configs, seed=False)
    tables, dtypes = network_tables(module.network)
    if not tables:
        raise ValueError(f"the config(s) {configs} build a network with no embedding tables; there is nothing to plan")
    datamodule.prepare_data()
    datamodule.setup("fit")
    pooling = measure_pooling_factors(datamodule.train_dataloader(), num_batches)
    for t in tables:  # a feature the sample never showed (e.g. absent from every domain read) looks up nothing
        for f in t.feature_names:
            pooling.setdefault(f, 0.0)
    cost = CostModel(batch_size=batch_size or datamodule.batch_size, **cost_constants)
    optimizer = None if module.sparse_optimizer == "none" else module.sparse_optimizer
    return plan_with_estimate(tables, world_size, memory_per_rank, pooling, overrides=overrides, cost=cost,
                              time_limit_s=time_limit_s, optimizer=optimizer, dtype=dtypes,
                              sequence_features={f.name for f in datamodule.schema.sequence_features})
