"""Worker for tests/test_sharded.py: W gloo processes (torch.multiprocessing.spawn) run every case of a mode
against a single-process :class:`EmbeddingBagCollection` on the same global batch, which each rank computes
itself; a mismatch raises, naming the case, and the spawn exits non-zero.

Usage: python tests/sharded_worker.py MODE[,MODE...] WORLD DIR (several modes run in order in one spawn)
  lookup:  forward, backward and two fused steps for TW, RW, CW, mixed and replicated plans (SGD and row-wise
           Adagrad; shared tables, a mean table, empty bags, per-sample weights, ids at shard boundaries,
           unequal batch sizes), storage bytes against the plan's figure, bad ids; at W=2 also a network built
           with deferred tables and sharded by shard_network (never a whole table on a rank, same values).
  save:    3 steps of a mixed plan at WORLD ranks, then a DCP checkpoint into DIR/ckpt.
  resume:  load DIR/ckpt under this WORLD's plan, 3 more steps; compared with 6 uninterrupted steps.
  die:     rank 1 exits before the lookup; rank 0 prints the peer-failure line and exits 3.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lattice.nn.embedding import EmbeddingBagCollection, EmbeddingTableConfig
from lattice.nn.placement import ShardingPlan, TablePlacement, shard_bytes
from lattice.nn.sharded import ShardedEmbeddingBagCollection
from lattice.sparse import KeyedJaggedTensor

TABLES = [
    EmbeddingTableConfig("ta", 37, 8, ["fa", "fb"]),  # a shared table
    EmbeddingTableConfig("tb", 50, 8, ["fc"], pooling="mean"),
    EmbeddingTableConfig("tc", 23, 8, ["fd"]),
    EmbeddingTableConfig("td", 64, 8, ["fe"]),
]
ROWS = {f: t.num_embeddings for t in TABLES for f in t.feature_names}
KEYS = ["fe", "fa", "fd", "fc", "fb"]  # not the collection's feature order


def place(kind: str, table: EmbeddingTableConfig, ranks) -> TablePlacement:
    return TablePlacement(kind, table.num_embeddings, table.embedding_dim, [] if kind == "replicated" else list(ranks))


def plans(world: int) -> dict:
    every = list(range(world))
    last = world - 1
    out = {
        "table_wise": {t.name: place("table_wise", t, [i % world]) for i, t in enumerate(TABLES)},
        "row_wise": {t.name: place("row_wise", t, every) for t in TABLES},
        "column_wise": {t.name: place("column_wise", t, every) for t in TABLES},
        "mixed": {"ta": place("row_wise", TABLES[0], every), "tb": place("column_wise", TABLES[1], [last, 0]),
                  "tc": place("table_wise", TABLES[2], [last]), "td": place("replicated", TABLES[3], [])},
    }
    return {name: ShardingPlan(world, tables) for name, tables in out.items()}


def batch(seed: int, sizes, weighted: bool, boundaries=()) -> list:
    """One KeyedJaggedTensor per rank (rank r has ``sizes[r]`` samples): random bags, some empty, with every id
    of ``boundaries`` (a shard's first and last rows) in rank 0's first bags."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, B in enumerate(sizes):
        lengths, values = [], []
        for k in KEYS:
            L = torch.randint(0, 4, (B,), generator=g)
            if B:
                L[-1] = 0  # an empty bag in every feature
            ids = torch.randint(0, ROWS[k], (int(L.sum()),), generator=g)
            if r == 0 and B and boundaries:
                extra = torch.tensor([b for b in boundaries if b < ROWS[k]], dtype=torch.int64)
                ids = torch.cat([extra, ids])
                L[0] += extra.numel()
            lengths.append(L)
            values.append(ids)
        values = torch.cat(values)
        weights = torch.rand(values.numel(), generator=g) + 0.5 if weighted else None
        out.append(KeyedJaggedTensor(KEYS, values, weights=weights, lengths=torch.cat(lengths)))
    return out


def concat(kjts) -> KeyedJaggedTensor:
    """The global batch: every rank's samples, in rank order."""
    B = [k.stride() for k in kjts]
    lengths, values, weights = [], [], []
    for key in KEYS:
        for k in kjts:
            jt = k[key]
            lengths.append(jt.lengths())
            values.append(jt.values())
            if jt.weights_or_none() is not None:
                weights.append(jt.weights())
    return KeyedJaggedTensor(KEYS, torch.cat(values), weights=torch.cat(weights) if weights else None,
                             lengths=torch.cat(lengths), stride=sum(B))


def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
    diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    if not diff <= atol:
        raise AssertionError(f"{name}: max |diff| {diff} > {atol}")


def check_tables(case: str, sharded: ShardedEmbeddingBagCollection, ref: EmbeddingBagCollection, rank: int) -> None:
    for t in TABLES:
        p = sharded.plan.tables[t.name]
        full_w, full_s = ref.embedding_weight(t.name), ref.optimizer_state_of(t.name)
        if p.kind == "replicated":
            check(f"{case} {t.name} weight", sharded.replicated.embedding_weight(t.name), full_w)
            if full_s.numel():
                check(f"{case} {t.name} state", sharded.replicated.optimizer_state_of(t.name), full_s)
            continue
        if not p.holds(rank):
            continue
        (r0, c0), (rows, cols) = p.shard_offsets(rank), p.shard_shape(rank)
        check(f"{case} {t.name} weight", sharded.shard_weight(t.name), full_w[r0 : r0 + rows, c0 : c0 + cols])
        if full_s.numel():
            check(f"{case} {t.name} state", sharded.shard_optimizer_state(t.name), full_s[r0 : r0 + rows])


def run_case(case: str, plan: ShardingPlan, rank: int, world: int, group, optimizer: str, weighted: bool,
             sizes, steps: int = 2, seed: int = 0):
    tables = TABLES
    torch.manual_seed(seed)  # every rank builds the same reference tables
    ref = EmbeddingBagCollection(tables, fused_optimizer=optimizer, lr=0.3, is_weighted=weighted)
    sharded = ShardedEmbeddingBagCollection.from_collection(ref, plan, group, gradient_divisor=1.0)
    bounds = sorted({b for p in plan.tables.values() for b in (p.row_bounds or [])} |
                    {b - 1 for p in plan.tables.values() for b in (p.row_bounds or []) if b > 0})
    for step in range(steps):
        per_rank = batch(seed * 100 + step, sizes, weighted, bounds)
        R = torch.randn(sum(sizes), 5, 8, generator=torch.Generator().manual_seed(seed * 100 + step + 7))
        want = ref(concat(per_rank))
        (want * R).sum().backward()
        start = sum(sizes[:rank])
        got = sharded(per_rank[rank])
        check(f"{case} step {step} forward", got, want[start : start + sizes[rank]].detach())
        (got * R[start : start + sizes[rank]]).sum().backward()
        check_tables(f"{case} step {step}", sharded, ref, rank)
    return sharded, ref


def lookup(rank: int, world: int, group) -> None:
    for name, plan in plans(world).items():
        for optimizer in ("rowwise_adagrad", "sgd") if world == 2 else ("rowwise_adagrad",):
            run_case(f"{name}/{optimizer}", plan, rank, world, group, optimizer, False, [5] * world)
    mixed = plans(world)["mixed"]
    sizes = [3 + 2 * r for r in range(world)]
    sharded, _ = run_case("mixed/unequal batches", mixed, rank, world, group, "rowwise_adagrad", False, sizes)
    # per-sample weights need sum pooling everywhere: tb pools by mean, so weight a copy of the tables without it
    global TABLES
    saved = TABLES
    TABLES = [t if t.name != "tb" else EmbeddingTableConfig("tb", 50, 8, ["fc"]) for t in saved]
    try:
        run_case("mixed/weighted", mixed, rank, world, group, "rowwise_adagrad", True, [4] * world)
        run_case("row_wise/weighted", plans(world)["row_wise"], rank, world, group, "sgd", True, [4] * world)
    finally:
        TABLES = saved

    # storage: exactly the plan's per-rank figure, and about 1/W of the table bytes for row-wise
    for name, plan in plans(world).items():
        collection = ShardedEmbeddingBagCollection(TABLES, plan, group)
        figure = sum(shard_bytes(plan.tables[t.name], rank, 4, "rowwise_adagrad") for t in TABLES)
        got = collection.storage_bytes()
        if abs(got - figure) > 0.05 * figure:
            raise AssertionError(f"{name}: rank {rank} stores {got} bytes, the plan says {figure}")
        if name == "row_wise":
            total = sum(t.num_embeddings * (t.embedding_dim * 4 + 4) for t in TABLES)
            if abs(got - total / world) > 0.1 * total / world:
                raise AssertionError(f"row_wise: rank {rank} stores {got} bytes, not about {total / world}")

    # evaluation: rank r ran r + 1 batches; finish_eval_epoch has every rank run as many lookups as the most
    from lattice.train.sharding import count_eval_step, finish_eval_epoch, start_eval_epoch

    class Evaluated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables, self.lookups = ShardedEmbeddingBagCollection(TABLES, plans(world)["mixed"], group), 0

        def forward(self, kjt):
            self.lookups += 1
            return self.tables(kjt)

    evaluated = Evaluated().eval()
    start_eval_epoch(evaluated, group, rank + 1)
    with torch.no_grad():
        for i in range(rank + 1):
            evaluated(batch(20 + i, [3] * world, False)[rank])
            count_eval_step(evaluated, batch(20 + i, [3] * world, False)[rank])
    finish_eval_epoch(evaluated)
    if evaluated.lookups != world:
        raise AssertionError(f"rank {rank} ran {evaluated.lookups} evaluation lookups, not {world}")

    # bad ids: the single-process op's message, before any collective (only rank 0 has the bad id, so a
    # collective would hang the other ranks until the timeout)
    kjts = batch(5, [4] * world, False)
    if rank == 0:
        bad = kjts[0]
        values = bad.values().clone()
        start = bad.offset_per_key()[KEYS.index("fc")]
        values[start] = 50
        bad = KeyedJaggedTensor(KEYS, values, lengths=bad.lengths())
        ref = EmbeddingBagCollection(TABLES, fused_optimizer="sgd")
        try:
            ref(bad)
        except RuntimeError as exc:
            want = str(exc).splitlines()[0]
        else:
            raise AssertionError("the single-process collection accepted an out-of-range id")
        try:
            sharded(bad)
        except RuntimeError as exc:
            if want not in str(exc):
                raise AssertionError(f"bad id: {exc!r}, expected {want!r}")
        else:
            raise AssertionError("the sharded collection accepted an out-of-range id")
    dist.barrier(group)


def steps_state(case: str, plan: ShardingPlan, rank: int, world: int, group, first: int, last: int,
                directory: str, load: bool):
    """Steps ``first..last-1`` over the global batches of 8 samples (split evenly), checked against a
    single-process reference that ran steps ``0..last-1``."""
    ref = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad", lr=0.3)
    sharded = ShardedEmbeddingBagCollection(TABLES, plan, group, fused_optimizer="rowwise_adagrad", lr=0.3,
                                            gradient_divisor=1.0)
    ref.load_state_dict({k: v for k, v in _reference_start(sharded, rank).items()}, strict=False)
    global_rows = 8
    n = global_rows // world

    def global_batch(step: int) -> KeyedJaggedTensor:  # the same global rows whatever the world size
        return batch(1000 + step, [global_rows], False)[0]

    for step in range(last):
        R = torch.randn(global_rows, 5, 8, generator=torch.Generator().manual_seed(step))
        (ref(global_batch(step)) * R).sum().backward()
    from lattice.train.sharded_checkpoint import load_sharded_tables, save_sharded_tables

    if load:
        load_sharded_tables(sharded, os.path.join(directory, "ckpt"))
    for step in range(first, last):
        R = torch.randn(global_rows, 5, 8, generator=torch.Generator().manual_seed(step))
        mine = global_batch(step).select_samples(torch.arange(rank * n, (rank + 1) * n))
        (sharded(mine) * R[rank * n : (rank + 1) * n]).sum().backward()
    check_tables(case, sharded, ref, rank)
    if not load:
        save_sharded_tables(sharded, os.path.join(directory, "ckpt"))


def _reference_start(sharded: ShardedEmbeddingBagCollection, rank: int) -> dict:
    """The reference's initial tables: the sharded collection's seeded init is the same under any plan, so a
    1-rank table-wise collection yields every table whole."""
    whole = ShardedEmbeddingBagCollection(TABLES, ShardingPlan(1, {t.name: place("table_wise", t, [0]) for t in TABLES}),
                                          None, fused_optimizer="rowwise_adagrad")
    ref = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad")
    with torch.no_grad():
        for t in TABLES:
            ref.embedding_weight(t.name).copy_(whole.shard_weight(t.name))
    return ref.state_dict()


def resume_plan(world: int) -> ShardingPlan:
    if world == 1:
        return ShardingPlan(1, {"ta": place("table_wise", TABLES[0], [0]), "tb": place("replicated", TABLES[1], []),
                                "tc": place("table_wise", TABLES[2], [0]), "td": place("column_wise", TABLES[3], [0])})
    every = list(range(world))
    return ShardingPlan(world, {"ta": place("column_wise", TABLES[0], every), "tb": place("row_wise", TABLES[1], every),
                                "tc": place("replicated", TABLES[2], []), "td": place("row_wise", TABLES[3], every[::-1])})


def deferred_network(rank: int, world: int, group, directory: str) -> None:
    """A LatticeNetwork built inside deferred_tables and sharded by shard_network (row- and column-wise over every
    rank): the only tensors as large as a whole table made on this rank are the sharded collections' packed
    shards, and the shards, the optimizer state and the dense layers equal those of the same network built
    whole, then sharded."""
    import yaml
    from _models import make_schema
    from torch.utils._python_dispatch import TorchDispatchMode

    from lattice.models import LatticeNetwork
    from lattice.nn.embedding import deferred_tables
    from lattice.train.module import LatticeModule
    from lattice.train.planner import network_tables
    from lattice.train.sharding import shard_network

    schema = make_schema(rows=9000)  # tables of about 9000 rows: more than two seeded init chunks of 4096
    with deferred_tables():
        tables, _ = network_tables(LatticeNetwork(schema, dim=16, num_layers=1))
    kinds = ["row_wise", "column_wise"]
    plan = ShardingPlan(world, {t.name: place(kinds[i % 2], t, range(world)) for i, t in enumerate(tables)})
    path = os.path.join(directory, f"plan-{rank}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(plan.to_dict(), fh)
    smallest = min(t.num_embeddings * t.embedding_dim for t in tables)

    class Allocations(TorchDispatchMode):
        large = []  # (op, shape) of every non-meta tensor with as many elements as the smallest whole table

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() >= smallest:
                    Allocations.large.append((str(func), tuple(t.shape)))
            return out

    def build(deferred: bool):
        torch.manual_seed(11)
        with Allocations() if deferred else torch.no_grad():
            with deferred_tables() if deferred else torch.no_grad():
                module = LatticeModule(LatticeNetwork(schema, dim=16, num_layers=1), sharding={"plan": path})
            shard_network(module, module.sharding, group)
        return module

    got, want = build(True), build(False)
    packed = {tuple(w.shape) for c in got.network.modules() if isinstance(c, ShardedEmbeddingBagCollection)
              for w in c.shard_weights.values()}
    other = [(op, shape) for op, shape in Allocations.large if shape not in packed]
    if other or not Allocations.large:
        raise AssertionError(f"rank {rank} made tensors as large as a whole table ({smallest} elements) while building "
                             f"and sharding deferred tables: {other or 'none, not even its packed shards'}")
    want_state = want.state_dict()
    for name, value in got.state_dict().items():
        if value.is_meta:
            raise AssertionError(f"{name} is still on the meta device after shard_network")
        if not torch.equal(value, want_state[name]):
            raise AssertionError(f"deferred build: {name} differs from the whole build's")


def run_mode(mode: str, rank: int, world: int, group, directory: str) -> None:
    if mode == "lookup":
        lookup(rank, world, group)
        if world == 2:
            deferred_network(rank, world, group, directory)
    elif mode == "save":
        steps_state("save W=%d" % world, plans(world)["mixed"], rank, world, group, 0, 3, directory, load=False)
    elif mode == "resume":
        steps_state("resume W=%d" % world, resume_plan(world), rank, world, group, 3, 6, directory, load=True)
    elif mode == "die":
        collection = ShardedEmbeddingBagCollection(TABLES, plans(world)["row_wise"], group)
        dist.barrier(group)
        if rank == 1:
            os._exit(1)
        try:
            collection(batch(0, [4] * world, False)[rank]).sum().backward()
            collection(batch(1, [4] * world, False)[rank]).sum().backward()
        except RuntimeError as exc:
            from types import SimpleNamespace

            from lattice.train.faults import PeerFailureReporter

            trainer = SimpleNamespace(world_size=world, global_rank=rank, global_step=0)
            PeerFailureReporter().on_exception(trainer, None, exc)
            os._exit(3)
        raise AssertionError("the lookup went on without rank 1")
    else:
        raise ValueError(f"unknown mode {mode!r}")


def main(rank: int, modes: str, world: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store-{modes}-{world}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    group = dist.new_group(list(range(world)))
    try:
        for mode in modes.split(","):
            run_mode(mode, rank, world, group, directory)
    finally:
        if modes != "die":
            dist.destroy_process_group()


if __name__ == "__main__":
    modes, world, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if modes != "die":
        mp.spawn(main, args=(modes, world, directory), nprocs=world, join=True)
    else:  # no join=True: it would terminate rank 0 as soon as rank 1 exits
        context = mp.start_processes(main, args=(modes, world, directory), nprocs=world, join=False)
        for process in context.processes:
            process.join(120)
        print("exit codes", [p.exitcode for p in context.processes])
