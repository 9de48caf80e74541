"""Sharded embedding tables: what each placement sends, how long a step takes and what each rank stores, and
the capacity they buy.

**Study 1 (placements).** At W = 2 and 4 gloo processes, the same tables under four plans: today's replicated
tables (:class:`~lattice.nn.EmbeddingBagCollection` with the row-gradient exchange), and
:class:`~lattice.nn.sharded.ShardedEmbeddingBagCollection` with every table table-wise (round robin over the
ranks), row-wise or column-wise over all ranks. One training step is a lookup of a fresh random batch per rank,
a backward and the fused row-wise Adagrad update. The four collections live side by side in the same processes
and run in interleaved rounds, so load from elsewhere on the machine slows them alike. Per plan:

- bytes sent per rank per step, counted at the ``torch.distributed`` calls (all-to-all: the splits sent to other
  ranks; all-gather: the input once per other rank; all-reduce: ``2 (W - 1) / W`` of the tensor, a ring's),
  beside the planner's estimate (:func:`lattice.train.planner.estimate_plan`);
- the median step time (of the slowest rank);
- table and optimizer bytes per rank (the largest), measured from the tensors, beside
  :func:`~lattice.nn.placement.shard_bytes`.

**Study 2 (capacity).** Tables totalling about 1.6x ``--memory-per-rank``: replicated, they fit on no rank
(the planner's error for an all-replicated plan, and the bytes a replica would need); planned by
:func:`~lattice.train.planner.plan_tables` for W = 2, they train: the loss of a planted regression falls and
every rank stays within the cap.

Prints tables and writes JSON (``--out``). ``--smoke`` runs a tiny version for the tests.

    python benchmarks/bench_sharding.py --out sharding.json
    python benchmarks/bench_sharding.py --smoke --out /tmp/sharding.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks._common import machine, print_table, write_json  # noqa: E402
from lattice.nn.embedding import EmbeddingBagCollection, EmbeddingTableConfig  # noqa: E402
from lattice.nn.placement import ShardingPlan, TablePlacement, shard_bytes  # noqa: E402
from lattice.nn.sharded import ShardedEmbeddingBagCollection  # noqa: E402
from lattice.sparse import KeyedJaggedTensor  # noqa: E402
from lattice.train.planner import (  # noqa: E402
    CostModel,
    PlanError,
    estimate_plan,
    format_bytes,
    parse_bytes,
    plan_tables,
)

KINDS = ("replicated", "table_wise", "row_wise", "column_wise")
OPTIMIZER = "rowwise_adagrad"


class TrafficCounter:
    """Counts the bytes this rank hands to other ranks through ``torch.distributed`` collectives while active
    (it wraps the module's functions, so it sees every caller that looks them up as ``dist.<name>``)."""

    def __init__(self) -> None:
        self.bytes = 0.0
        self.originals: Dict[str, Any] = {}

    def __enter__(self) -> "TrafficCounter":
        counter = self

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            W, me = dist.get_world_size(group), dist.get_rank(group)
            row = input[0].numel() * input.element_size() if input.dim() and input.shape[0] else 0
            if input_split_sizes:
                counter.bytes += row * (sum(input_split_sizes) - input_split_sizes[me])
            else:
                counter.bytes += input.numel() * input.element_size() * (W - 1) / W
            return counter.originals["all_to_all_single"](output, input, output_split_sizes, input_split_sizes,
                                                          group=group, **kw)

        def all_gather(tensor_list, tensor, group=None, **kw):
            counter.bytes += tensor.numel() * tensor.element_size() * (dist.get_world_size(group) - 1)
            return counter.originals["all_gather"](tensor_list, tensor, group=group, **kw)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, **kw):
            W = dist.get_world_size(group)
            counter.bytes += tensor.numel() * tensor.element_size() * 2 * (W - 1) / W
            return counter.originals["all_reduce"](tensor, op=op, group=group, **kw)

        for name, fn in (("all_to_all_single", all_to_all_single), ("all_gather", all_gather),
                         ("all_reduce", all_reduce)):
            self.originals[name] = getattr(dist, name)
            setattr(dist, name, fn)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


def make_tables(num_tables: int, rows: int, dim: int) -> List[EmbeddingTableConfig]:
    """``num_tables`` tables of ``rows`` x ``dim``, one feature each (``f0``, ``f1``, ...)."""
    return [EmbeddingTableConfig(f"t{i}", rows, dim, [f"f{i}"]) for i in range(num_tables)]


def study_plan(kind: str, tables: List[EmbeddingTableConfig], world: int) -> ShardingPlan:
    """Every table ``kind``: TW round robin over the ranks, RW and CW over all ranks."""
    every = list(range(world))

    def place(i: int, t: EmbeddingTableConfig) -> TablePlacement:
        ranks = {"replicated": [], "table_wise": [i % world]}.get(kind, every)
        return TablePlacement(kind, t.num_embeddings, t.embedding_dim, ranks)

    return ShardingPlan(world, {t.name: place(i, t) for i, t in enumerate(tables)})


def random_batch(tables: List[EmbeddingTableConfig], batch: int, pooling: int, gen: torch.Generator) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor of ``batch`` samples: each feature a bag of 0..2*pooling ids, uniform over its table
    (mean ``pooling`` ids per sample)."""
    lengths = torch.randint(0, 2 * pooling + 1, (len(tables) * batch,), generator=gen)
    per_key = lengths.view(len(tables), batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, t.num_embeddings, (n,), generator=gen) for t, n in zip(tables, per_key)])
    return KeyedJaggedTensor([t.feature_names[0] for t in tables], values, lengths=lengths)


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tables and fused optimizer state a collection holds on this rank (persistent state)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def build(kind: str, tables, world: int, group, lr: float) -> torch.nn.Module:
    if kind == "replicated":  # today's layout: a full replica, rows exchanged in the fused backward
        module = EmbeddingBagCollection(tables, fused_optimizer=OPTIMIZER, lr=lr)
        module.set_process_group(group)
        return module
    return ShardedEmbeddingBagCollection(tables, study_plan(kind, tables, world), group, fused_optimizer=OPTIMIZER,
                                         lr=lr)


def _worker(rank: int, world: int, cfg: Dict[str, Any], capacity_plan, directory: str) -> None:
    """One rank: study 1 at this world size, then study 2's training when ``capacity_plan`` is given."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store-{world}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        group = dist.new_group(list(range(world)))
        placements(rank, world, cfg, group, directory)
        if capacity_plan is not None:
            capacity(rank, world, cfg, ShardingPlan.from_dict(capacity_plan), group, directory)
    finally:
        dist.destroy_process_group()


def placements(rank: int, world: int, cfg: Dict[str, Any], group, directory: str) -> None:
    """Study 1 on this rank: the four collections in interleaved rounds; writes its figures to ``directory``."""
    tables = make_tables(cfg["tables"], cfg["rows"], cfg["dim"])
    modules = {kind: build(kind, tables, world, group, 0.05) for kind in KINDS}
    gen = torch.Generator().manual_seed(1000 + rank)
    times: Dict[str, List[float]] = {k: [] for k in KINDS}
    sent: Dict[str, List[float]] = {k: [] for k in KINDS}

    def step(kind: str) -> None:
        kjt = random_batch(tables, cfg["batch"], cfg["pooling"], gen)
        with TrafficCounter() as counter:
            dist.barrier(group)
            start = time.perf_counter()
            modules[kind](kjt).sum().backward()
            elapsed = time.perf_counter() - start
        times[kind].append(elapsed)
        sent[kind].append(counter.bytes)

    for kind in KINDS:  # warm-up, not counted
        step(kind)
        times[kind].clear()
        sent[kind].clear()
    for _ in range(cfg["rounds"]):
        for kind in KINDS:
            for _ in range(cfg["steps"]):
                step(kind)
    result = {kind: {"seconds": times[kind], "sent": sent[kind], "storage_bytes": storage_bytes(modules[kind])}
              for kind in KINDS}
    with open(os.path.join(directory, f"placements-{world}-{rank}.json"), "w") as fh:
        json.dump(result, fh)


def _capacity_only(rank: int, cfg: Dict[str, Any], capacity_plan, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store-capacity", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    try:
        capacity(rank, 2, cfg, ShardingPlan.from_dict(capacity_plan), dist.new_group([0, 1]), directory)
    finally:
        dist.destroy_process_group()


def placement_rows(world: int, cfg: Dict[str, Any], directory: str) -> List[Dict[str, Any]]:
    """Study 1's figures at ``world`` ranks from the ranks' files, beside the planner's."""
    per_rank = []
    for r in range(world):
        with open(os.path.join(directory, f"placements-{world}-{r}.json")) as fh:
            per_rank.append(json.load(fh))
    tables = make_tables(cfg["tables"], cfg["rows"], cfg["dim"])
    pooling = {t.feature_names[0]: float(cfg["pooling"]) for t in tables}
    cost = CostModel(batch_size=cfg["batch"])
    rows = []
    for kind in KINDS:
        plan = study_plan(kind, tables, world)
        est = estimate_plan(plan, tables, pooling, cost=cost, optimizer=OPTIMIZER)
        steps = len(per_rank[0][kind]["seconds"])
        slowest = [max(per_rank[r][kind]["seconds"][i] for r in range(world)) for i in range(steps)]
        sent = [statistics.median(per_rank[r][kind]["sent"]) for r in range(world)]
        stored = [per_rank[r][kind]["storage_bytes"] for r in range(world)]
        planned = [sum(shard_bytes(p, r, 4, OPTIMIZER) for p in plan.tables.values()) for r in range(world)]
        rows.append({"world": world, "kind": kind, "step_ms": 1e3 * statistics.median(slowest),
                     "sent_per_rank": sent, "sent_estimate": est.sent_per_rank,
                     "bytes_per_rank": stored, "bytes_planned": planned})
    return rows


def capacity(rank: int, world: int, cfg: Dict[str, Any], plan: ShardingPlan, group, directory: str) -> None:
    """Study 2 on this rank: train the planted regression on the sharded tables; writes losses and bytes."""
    tables = make_tables(cfg["cap_tables"], cfg["cap_rows"], cfg["dim"])
    module = ShardedEmbeddingBagCollection(tables, plan, group, fused_optimizer=OPTIMIZER, lr=cfg["lr"])
    gen = torch.Generator().manual_seed(2000 + rank)
    losses = []
    for _ in range(cfg["cap_steps"]):
        kjt = random_batch(tables, cfg["batch"], cfg["pooling"], gen)
        # planted target: every id carries a fixed value in [-1, 1); a sample's target per feature is the sum
        # of its ids' values, which the pooled embedding's first column can learn
        bag = torch.repeat_interleave(torch.arange(kjt.lengths().numel()), kjt.lengths())
        values = torch.sin(kjt.values().double() * 12.9898).float()
        target = torch.zeros(kjt.lengths().numel()).index_add_(0, bag, values).view(len(tables), -1).t()
        pooled = module(kjt)[..., 0]
        loss = torch.nn.functional.mse_loss(pooled, target)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        losses.append(float(total) / world)
    with open(os.path.join(directory, f"capacity-{rank}.json"), "w") as fh:
        json.dump({"losses": losses, "storage_bytes": module.storage_bytes()}, fh)


def capacity_plan(cfg: Dict[str, Any]):
    """Study 2's tables: the planner's error for them all replicated, and its plan for W = 2."""
    cap = cfg["memory_per_rank"]
    tables = make_tables(cfg["cap_tables"], cfg["cap_rows"], cfg["dim"])
    pooling = {t.feature_names[0]: float(cfg["pooling"]) for t in tables}
    total = sum(shard_bytes(TablePlacement("replicated", t.num_embeddings, t.embedding_dim), 0, 4, OPTIMIZER)
                for t in tables)
    try:
        plan_tables(tables, 2, cap, pooling, overrides={t.name: "replicated" for t in tables})
        replicated_error = None
    except PlanError as exc:
        replicated_error = str(exc)
    plan = plan_tables(tables, 2, cap, pooling, cost=CostModel(batch_size=cfg["batch"]), optimizer=OPTIMIZER)
    return plan, total, replicated_error


def capacity_report(cfg: Dict[str, Any], plan: ShardingPlan, total: int, replicated_error, directory: str):
    """Study 2's figures from the ranks' files."""
    cap = cfg["memory_per_rank"]
    ranks = []
    for r in range(2):
        with open(os.path.join(directory, f"capacity-{r}.json")) as fh:
            ranks.append(json.load(fh))
    losses = ranks[0]["losses"]
    k = max(1, len(losses) // 5)
    return {"memory_per_rank": cap, "tables_total_bytes": total, "ratio_to_cap": total / cap,
            "replicated_bytes_per_rank": total, "replicated_error": replicated_error,
            "plan": plan.to_dict(), "kinds": sorted({p.kind for p in plan.tables.values()}),
            "bytes_per_rank": [r["storage_bytes"] for r in ranks],
            "loss_first": statistics.mean(losses[:k]), "loss_last": statistics.mean(losses[-k:]), "losses": losses}


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="2,4", help="process counts of study 1 (default 2,4)")
    p.add_argument("--tables", type=int, default=8, help="tables in study 1")
    p.add_argument("--rows", type=int, default=100_000, help="rows per table in study 1")
    p.add_argument("--dim", type=int, default=64, help="embedding dim")
    p.add_argument("--batch", type=int, default=1024, help="samples per rank per step")
    p.add_argument("--pooling", type=int, default=4, help="mean ids per sample per feature")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=2, help="steps per plan per round")
    p.add_argument("--memory-per-rank", default="64MiB", help="the per-rank cap of study 2")
    p.add_argument("--cap-steps", type=int, default=60, help="training steps of study 2")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    p.add_argument("--out", default="bench_sharding.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.worlds, args.tables, args.rows, args.dim, args.batch = "2", 4, 2_000, 8, 64
        args.rounds, args.steps, args.memory_per_rank, args.cap_steps = 1, 1, "96KiB", 30
    cap = parse_bytes(args.memory_per_rank, "--memory-per-rank")
    row_bytes = args.dim * 4 + 4  # fp32 weights and one row-wise Adagrad value
    cap_tables = 4
    cfg = dict(tables=args.tables, rows=args.rows, dim=args.dim, batch=args.batch, pooling=args.pooling,
               rounds=args.rounds, steps=args.steps, memory_per_rank=cap, cap_tables=cap_tables,
               cap_rows=int(1.6 * cap / cap_tables / row_bytes), cap_steps=args.cap_steps, lr=0.1)
    worlds = [int(w) for w in args.worlds.split(",")]
    report: Dict[str, Any] = {"machine": machine(), "config": cfg, "placements": [], "capacity": None}
    plan, total, replicated_error = capacity_plan(cfg)
    with tempfile.TemporaryDirectory() as directory:
        if 2 not in worlds:
            worlds.append(0)  # study 2 alone, at W = 2
        for world in worlds:
            train = plan.to_dict() if world in (0, 2) else None
            if world:
                mp.spawn(_worker, args=(world, cfg, train, directory), nprocs=world, join=True)
                report["placements"] += placement_rows(world, cfg, directory)
            else:
                mp.spawn(_capacity_only, args=(cfg, train, directory), nprocs=2, join=True)
        print(f"study 1: {args.tables} tables of {args.rows} x {args.dim}, {args.batch} samples per rank, "
              f"{args.pooling} ids per sample per feature, row-wise Adagrad; medians of {args.rounds} x "
              f"{args.steps} steps")
        replicated = {r["world"]: r for r in report["placements"] if r["kind"] == "replicated"}
        lines = []
        for r in report["placements"]:
            base = replicated[r["world"]]
            lines.append([str(r["world"]), r["kind"], format_bytes(max(r["sent_per_rank"])),
                          format_bytes(max(r["sent_estimate"])), f"{r['step_ms']:.2f}",
                          f"{r['step_ms'] / base['step_ms']:.2f}", format_bytes(max(r["bytes_per_rank"])),
                          format_bytes(max(r["bytes_planned"]))])
        print_table(["W", "placement", "sent/rank/step", "(planner)", "step ms", "vs replicated",
                     "table bytes/rank", "(planned)"], lines)
        cap_report = capacity_report(cfg, plan, total, replicated_error, directory)
        report["capacity"] = cap_report
    print(f"\nstudy 2: {cap_tables} tables of {cfg['cap_rows']} x {args.dim} = "
          f"{format_bytes(cap_report['tables_total_bytes'])}, {cap_report['ratio_to_cap']:.2f}x the cap of "
          f"{format_bytes(cap)} per rank")
    print(f"  replicated: {format_bytes(cap_report['replicated_bytes_per_rank'])} on every rank: "
          f"{cap_report['replicated_error'] or 'fits (unexpected)'}")
    print(f"  sharded at W=2 ({', '.join(cap_report['kinds'])}): "
          f"{' | '.join(format_bytes(b) for b in cap_report['bytes_per_rank'])} per rank; loss "
          f"{cap_report['loss_first']:.4f} -> {cap_report['loss_last']:.4f} over {args.cap_steps} steps")
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
