"""MMoE in plain PyTorch over a lattice world's Parquet files: what a user writes without lattice.

The baseline of ``bench_train.py --study compile`` (issue 28). It reads the same files as ``lattice fit``
(``<world>/schema.yaml`` and ``<world>/<domain>/*.parquet``) with pyarrow, keeps every bag feature as CSR
arrays, and serves shuffled batches through a ``DataLoader`` whose sampler yields row-index lists.

The model is the same network as the study's :class:`lattice.models.MMoE` (``dim=32, history_match=True``,
the other arguments at their defaults), written with stock modules, so that the comparison measures the
library and not two networks of different size:

- a token per sparse feature: one ``nn.EmbeddingBag(mode="sum", sparse=True)`` per table (a shared table
  serves its sequence too; ``pooling: mean`` divides by the bag length), a learned missing token where the
  feature is absent in the row's domain;
- a token per dense feature, ``value * w_f + b_f`` on the raw value (lattice's ``standardize_dense`` is off),
  a learned missing token where the value is null;
- a learned domain token;
- the history: the sequence features are parallel attributes of the same events (one timestamps column), so
  per event their embeddings are fused by a MaskNet block (``LayerNorm(W_o (MLP(e) * e))`` over the
  concatenation ``e``) plus a learned recency position (256) and a log2 time-gap bucket (32); the mean of a
  sample's events is one more token;
- history match, per (sequence, sparse) pair on one table: whether, how often (``log1p``) and how recently
  (``1 / (1 + recency)``) the candidate id occurs in the history, an affine map of these to a token, and a
  learned vector added to every matching event;
- MMoE over the flattened tokens (4 experts of (128, 64), ReLU; a softmax gate per task) and a head MLP per
  task (64 hidden, SiLU);
- ``torch.optim.Adagrad`` on the sparse tables (lattice: the fused row-wise Adagrad) and ``AdamW`` on the rest.

Not replicated: lattice's conversion windows (lattice has one head per window of a windowed task, routed
by the sample's label window; this trains the final label with one head per task, two fewer 64-wide head
MLPs at mdmo), and bags of several candidate ids in history match (every candidate of the mdmo world is a
single id). Nothing here imports lattice: it lives in lattice.benchmark only so the benchmark scripts stay
short.
"""
from __future__ import annotations

import glob
import os
import time
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler


class World:
    """A world's rows in memory: CSR ``(values, offsets)`` per bag feature (and per sequence feature its event
    times, parallel to the values), ``dense [R, F]`` (NaN = null), ``sparse_present [R, F_s]`` (the sparse
    feature is collected in the row's domain), ``labels [R, T]`` (NaN = unlabeled), ``domain [R]`` and
    ``timestamp [R]``."""

    def __init__(self, world_dir: str) -> None:
        with open(os.path.join(world_dir, "schema.yaml")) as f:
            schema = yaml.safe_load(f)
        feats = schema["features"]
        self.bags = [f for f in feats if f.get("kind", "sparse") in ("sparse", "sequence")]
        self.sparse = [f for f in self.bags if f.get("kind", "sparse") == "sparse"]
        self.sequences = [f for f in self.bags if f.get("kind") == "sequence"]
        self.dense_names = [f["name"] for f in feats if f.get("kind") == "dense"]
        self.tasks = [t["name"] for t in schema["tasks"]]
        self.domains = [d["name"] for d in schema["domains"]]
        tables = []
        for d, name in enumerate(self.domains):
            for path in sorted(glob.glob(os.path.join(world_dir, name, "*.parquet"))):
                t = pq.read_table(path)
                tables.append((d, t))
        rows = [t.num_rows for _, t in tables]
        self.num_rows = sum(rows)
        self.domain = torch.tensor(np.concatenate([np.full(n, d) for (d, _), n in zip(tables, rows)]))
        ts_col = schema.get("timestamp_column", "timestamp")
        self.timestamp = np.concatenate([t.column(ts_col).to_numpy() for _, t in tables])
        self.csr: Dict[str, tuple] = {}
        self.event_times: Dict[str, np.ndarray] = {}
        for f in self.bags:
            values, offsets = self._csr(tables, f.get("column", f["name"]), f.get("max_length"))
            self.csr[f["name"]] = (np.clip(values.astype(np.int64), 0, f["num_embeddings"] - 1), offsets)
            if f.get("kind") == "sequence":
                times, t_offsets = self._csr(tables, f["timestamps_column"], f.get("max_length"))
                if not np.array_equal(t_offsets, offsets):
                    raise ValueError(f"sequence {f['name']!r}: {f['timestamps_column']!r} is not parallel to it")
                self.event_times[f["name"]] = times.astype(np.int64)
        seq_offsets = [self.csr[f["name"]][1] for f in self.sequences]
        if len({f.get("timestamps_column") for f in self.sequences}) > 1 or any(
                not np.array_equal(o, seq_offsets[0]) for o in seq_offsets):
            raise ValueError("plain MMoE merges sequences as parallel attributes of the same events (one "
                             "timestamps_column, equal lengths), as lattice's masknet merge does")
        self.sparse_present = np.concatenate([
            np.tile([f.get("column", f["name"]) in t.column_names for f in self.sparse], (t.num_rows, 1))
            for _, t in tables])
        dense = np.full((self.num_rows, len(self.dense_names)), np.nan, dtype=np.float32)
        labels = np.full((self.num_rows, len(self.tasks)), np.nan, dtype=np.float32)
        start = 0
        for (_, t), n in zip(tables, rows):
            for j, name in enumerate(self.dense_names):
                if name in t.column_names:
                    col = t.column(name).cast(pa.float32())
                    dense[start:start + n, j] = pc.fill_null(col, np.nan).to_numpy(zero_copy_only=False)
            for j, name in enumerate(self.tasks):
                if name in t.column_names:
                    col = t.column(name).cast(pa.float32())
                    labels[start:start + n, j] = pc.fill_null(col, np.nan).to_numpy(zero_copy_only=False)
            start += n
        self.dense, self.labels = dense, labels

    @staticmethod
    def _csr(tables: list, column: str, cap) -> tuple[np.ndarray, np.ndarray]:
        """``(values, offsets)`` of one column over every domain's tables: a list column's lists (the last
        ``cap``, the most recent), a scalar column's non-null value; a column a domain lacks gives empty bags."""
        values, lengths = [], []
        for _, t in tables:
            if column not in t.column_names:
                lengths.append(np.zeros(t.num_rows, dtype=np.int64))
                continue
            col = t.column(column).combine_chunks()
            if pa.types.is_list(col.type):
                if cap:
                    col = pa.array([x[-cap:] if x is not None else [] for x in col.to_pylist()], col.type)
                values.append(pc.list_flatten(col).to_numpy(zero_copy_only=False))
                lengths.append(pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64))
            else:
                values.append(col.drop_null().to_numpy())
                lengths.append(col.is_valid().to_numpy(zero_copy_only=False).astype(np.int64))
        v = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
        return v, np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)

    def time_split(self, val_fraction: float = 0.1, test_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """``(train rows, val rows)``: the earliest rows train, the next ``val_fraction`` validate."""
        order = np.argsort(self.timestamp, kind="stable")
        n_train = int(round(len(order) * (1 - val_fraction - test_fraction)))
        n_val = int(round(len(order) * val_fraction))
        return order[:n_train], order[n_train:n_train + n_val]


class BatchDataset(Dataset):
    """``dataset[row_ids]`` -> one batch: per bag feature ``(values [N], offsets [B+1])``, ``event_times [N]``
    (the sequences' shared timestamps), ``sparse_present [B, F_s]``, ``dense [B, F]`` (NaN = null),
    ``labels [B, T]``, ``mask [B, T]``, ``domain [B]``."""

    def __init__(self, world: World, rows: np.ndarray) -> None:
        self.world, self.rows = world, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: List[int]) -> dict:
        rows = self.rows[np.asarray(index)]
        w = self.world
        bags, gathers = {}, {}
        for name, (values, offsets) in w.csr.items():
            starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
            out_offsets = np.concatenate([[0], np.cumsum(lengths)])
            gathers[name] = np.repeat(starts - out_offsets[:-1], lengths) + np.arange(out_offsets[-1])
            bags[name] = (torch.from_numpy(values[gathers[name]]), torch.from_numpy(out_offsets))
        first = w.sequences[0]["name"]
        labels = w.labels[rows]
        return {"bags": bags, "event_times": torch.from_numpy(w.event_times[first][gathers[first]]),
                "sparse_present": torch.from_numpy(w.sparse_present[rows]), "dense": torch.from_numpy(w.dense[rows]),
                "labels": torch.from_numpy(np.nan_to_num(labels)), "mask": torch.from_numpy(~np.isnan(labels)),
                "domain": w.domain[rows]}


class PlainMMoE(nn.Module):
    """The study's lattice MMoE in stock modules (see the module docstring). ``forward(batch) -> logits [B, T]``."""

    def __init__(self, world: World, dim: int = 32, num_experts: int = 4, expert_dims=(128, 64),
                 head_hidden: int = 64, max_positions: int = 256, time_buckets: int = 32) -> None:
        super().__init__()
        tables = {}
        for f in world.bags:
            tables[f.get("shared_table", f["name"])] = max(tables.get(f.get("shared_table", f["name"]), 0),
                                                           f["num_embeddings"])
        self.table_of = {f["name"]: f.get("shared_table", f["name"]) for f in world.bags}
        self.sparse_names = [f["name"] for f in world.sparse]
        self.mean_pooled = {f["name"] for f in world.sparse if f.get("pooling") == "mean"}
        self.seq_names = [f["name"] for f in world.sequences]
        self.tables = nn.ModuleDict({t: nn.EmbeddingBag(n, dim, mode="sum", sparse=True, include_last_offset=True)
                                     for t, n in tables.items()})
        for table in self.tables.values():
            nn.init.uniform_(table.weight, -table.weight.shape[0] ** -0.5, table.weight.shape[0] ** -0.5)
        self.sparse_missing = nn.Parameter(torch.randn(len(self.sparse_names), dim) * 0.02)
        n_dense = len(world.dense_names)
        self.dense_weight = nn.Parameter(torch.randn(n_dense, dim) / dim ** 0.5)
        self.dense_bias = nn.Parameter(torch.zeros(n_dense, dim))
        self.dense_missing = nn.Parameter(torch.randn(n_dense, dim) * 0.02)
        self.domain_emb = nn.Embedding(len(world.domains), dim)
        k = len(self.seq_names)
        self.mask_mlp = nn.Sequential(nn.Linear(k * dim, k * dim), nn.ReLU(), nn.Linear(k * dim, k * dim))
        self.mask_out = nn.Linear(k * dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(dim)
        self.positions = nn.Embedding(max_positions, dim)
        self.time = nn.Embedding(time_buckets, dim)
        # history match: a (sequence, sparse) pair per sequence on the table of a sparse feature
        self.pairs = [(s["name"], c["name"]) for s in world.sequences for c in world.sparse
                      if self.table_of[s["name"]] == self.table_of[c["name"]]]
        P = len(self.pairs)
        self.match_weight = nn.Parameter(torch.randn(P, 3, dim) * 3 ** -0.5)
        self.match_bias = nn.Parameter(torch.zeros(P, dim))
        self.event_vector = nn.Parameter(torch.randn(P, dim) * 0.02)
        for emb in (self.domain_emb, self.positions, self.time):
            nn.init.normal_(emb.weight, std=0.02)
        num_tokens = len(self.sparse_names) + n_dense + 1 + P + 1
        in_dim = dim * num_tokens
        dims = [in_dim, *expert_dims]
        self.experts = nn.ModuleList(
            nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
            for _ in range(num_experts))
        self.num_tasks, self.num_experts = len(world.tasks), num_experts
        self.gates = nn.Linear(in_dim, self.num_tasks * num_experts)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(expert_dims[-1], head_hidden), nn.SiLU(),
                                                 nn.Linear(head_hidden, 1)) for _ in range(self.num_tasks))

    def forward(self, batch: dict) -> torch.Tensor:
        bags = batch["bags"]
        sparse = []
        for name in self.sparse_names:
            values, offsets = bags[name]
            pooled = self.tables[self.table_of[name]](values, offsets)
            if name in self.mean_pooled:
                pooled = pooled / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(pooled.dtype)
            sparse.append(pooled)
        sparse = torch.where(batch["sparse_present"].unsqueeze(-1), torch.stack(sparse, 1), self.sparse_missing)
        dense = batch["dense"]
        present = ~torch.isnan(dense)
        dense = torch.where(present.unsqueeze(-1),
                            torch.nan_to_num(dense).unsqueeze(-1) * self.dense_weight + self.dense_bias,
                            self.dense_missing)
        domain = self.domain_emb(batch["domain"]).unsqueeze(1)
        match, seq_mean = self._history(batch)
        x = torch.cat([sparse, dense, domain, match, seq_mean.unsqueeze(1)], dim=1).flatten(1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, e]
        gates = torch.softmax(self.gates(x).view(-1, self.num_tasks, self.num_experts), dim=-1)
        towers = torch.bmm(gates, experts)  # [B, T, e]
        return torch.cat([head(towers[:, t]) for t, head in enumerate(self.heads)], dim=1)

    def _history(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """History-match tokens ``[B, P, d]`` and the mean of every sample's merged events ``[B, d]``."""
        bags = batch["bags"]
        offsets = bags[self.seq_names[0]][1]
        B = offsets.shape[0] - 1
        lengths = offsets[1:] - offsets[:-1]
        n = int(offsets[-1])
        row = torch.repeat_interleave(torch.arange(B), lengths, output_size=n)  # sample of every event
        recency = (offsets[1:][row] - 1 - torch.arange(n)).float()  # 0 = the most recent event
        tokens, event_bias = [], 0.0
        for p, (s, c) in enumerate(self.pairs):
            cand_values, cand_offsets = bags[c]
            cand = torch.full((B,), -1, dtype=cand_values.dtype)
            has = cand_offsets[1:] > cand_offsets[:-1]
            cand[has] = cand_values  # every candidate is one id (or none)
            hit = bags[s][0] == cand[row]
            count = torch.zeros(B).index_add_(0, row, hit.float())
            latest = torch.full((B,), float("inf")).scatter_reduce(
                0, row, torch.where(hit, recency, torch.full_like(recency, float("inf"))), reduce="amin")
            closeness = torch.where(count > 0, 1.0 / (1.0 + latest.clamp(max=1e9)), torch.zeros_like(latest))
            stats = torch.stack([(count > 0).float(), torch.log1p(count), closeness], dim=-1)  # [B, 3]
            tokens.append(stats @ self.match_weight[p] + self.match_bias[p])
            event_bias = event_bias + hit.float().unsqueeze(1) * self.event_vector[p]
        e = torch.cat([F.embedding(bags[s][0], self.tables[self.table_of[s]].weight, sparse=True)
                       for s in self.seq_names], dim=1)  # [n, K * d]
        events = self.mask_norm(self.mask_out(self.mask_mlp(e) * e)) + event_bias
        times = batch["event_times"]
        latest_time = torch.full((B,), torch.iinfo(torch.int64).min).scatter_reduce(0, row, times, reduce="amax")
        gap = (latest_time[row] - times).clamp(min=0).float()
        bucket = torch.floor(torch.log2(gap + 1.0)).long().clamp(max=self.time.num_embeddings - 1)
        events = events + self.time(bucket) + self.positions(recency.long().clamp(max=self.positions.num_embeddings - 1))
        mean = torch.zeros(B, events.shape[1]).index_add_(0, row, events) / lengths.clamp(min=1).unsqueeze(1)
        return torch.stack(tokens, dim=1), mean


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask
    return (per.sum(0) / mask.sum(0).clamp(min=1)).sum()


def train(world_dir: str, batch_size: int, warmup: int, steps: int, val_batches: int, seed: int = 0,
          sparse_lr: float = 0.05, dense_lr: float = 0.002) -> dict:
    """Trains ``warmup + steps`` steps, then predicts ``val_batches`` validation batches.

    Returns ``seconds`` (wall), ``cpu_seconds`` (this process) and ``rows`` of the ``steps`` after warm-up (data
    loading included) and the
    validation ``logits [N, T]``, ``labels``, ``mask`` and ``domain [N]``."""
    torch.manual_seed(seed)
    world = World(world_dir)
    train_rows, val_rows = world.time_split()
    model = PlainMMoE(world)
    sparse = [p for t in model.tables.values() for p in t.parameters()]
    ids = {id(p) for p in sparse}
    optimizers = [torch.optim.Adagrad(sparse, lr=sparse_lr),
                  torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=dense_lr)]
    data = BatchDataset(world, train_rows)
    loader = DataLoader(data, batch_size=None, sampler=BatchSampler(RandomSampler(data), batch_size, drop_last=False))
    step, rows, t0, t1, cpu0, cpu1 = 0, 0, None, None, None, None
    while t1 is None:
        for batch in loader:
            loss = masked_bce(model(batch), batch["labels"], batch["mask"].float())
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            step += 1
            if step == warmup:
                t0, cpu0 = time.perf_counter(), time.process_time()
            elif step > warmup:
                rows += batch["labels"].shape[0]
                if step == warmup + steps:
                    t1, cpu1 = time.perf_counter(), time.process_time()
                    break
    model.eval()
    val = BatchDataset(world, val_rows)
    outs = {"logits": [], "labels": [], "mask": [], "domain": []}
    with torch.no_grad():
        for i, batch in enumerate(DataLoader(val, batch_size=None,
                                             sampler=BatchSampler(SequentialSampler(val), batch_size, False))):
            if i == val_batches:
                break
            outs["logits"].append(model(batch))
            for k in ("labels", "mask", "domain"):
                outs[k].append(batch[k])
    return {"seconds": t1 - t0, "cpu_seconds": cpu1 - cpu0, "rows": rows, "steps": steps, **{k: torch.cat(v) for k, v in outs.items()},
            "domains": world.domains, "tasks": world.tasks}
