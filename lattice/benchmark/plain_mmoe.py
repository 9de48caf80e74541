"""MMoE in plain PyTorch over a lattice world's Parquet files: what a user writes without lattice.

The baseline of ``bench_train.py --study compile`` (issue 28). It reads the same files as ``lattice fit``
(``<world>/schema.yaml`` and ``<world>/<domain>/*.parquet``) with pyarrow, keeps every bag feature as CSR
arrays, and serves shuffled batches through a ``DataLoader`` whose sampler yields row-index lists. The model
is the MMoE of :class:`lattice.models.MMoE`'s shape (a token per feature, ``dim`` wide; ``num_experts``
experts of ``expert_dims``; a softmax gate and a linear head per task) built from stock modules: one
``nn.EmbeddingBag(mode="sum", sparse=True)`` per table (a shared table serves its sequence too; mean pooling
divides by the bag length), ``torch.optim.Adagrad`` on the sparse tables and ``AdamW`` on the rest.
Not replicated: lattice's candidate-in-history match, its running standardization of dense features (this
uses the training rows' mean and deviation) and the conversion windows (the final label only).

Nothing here imports lattice: it lives in lattice.benchmark only so the benchmark scripts stay short.
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
    """A world's rows in memory: CSR ``(values, offsets)`` per bag feature, ``dense [R, F]``, ``labels [R, T]``
    (NaN = unlabeled), ``domain [R]`` and ``timestamp [R]``."""

    def __init__(self, world_dir: str) -> None:
        with open(os.path.join(world_dir, "schema.yaml")) as f:
            schema = yaml.safe_load(f)
        feats = schema["features"]
        self.bags = [f for f in feats if f.get("kind", "sparse") in ("sparse", "sequence")]
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
        for f in self.bags:
            column = f.get("column", f["name"])
            values, lengths = [], []
            for _, t in tables:
                if column not in t.column_names:  # absent in this domain: empty bags
                    lengths.append(np.zeros(t.num_rows, dtype=np.int64))
                    continue
                col = t.column(column).combine_chunks()
                if pa.types.is_list(col.type):
                    cap = f.get("max_length")
                    if cap:  # the most recent events
                        col = pa.array([x[-cap:] if x is not None else [] for x in col.to_pylist()], col.type)
                    values.append(pc.list_flatten(col).to_numpy(zero_copy_only=False))
                    lengths.append(pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64))
                else:
                    valid = col.is_valid().to_numpy(zero_copy_only=False)
                    values.append(col.drop_null().to_numpy())
                    lengths.append(valid.astype(np.int64))
            v = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
            lens = np.concatenate(lengths)
            self.csr[f["name"]] = (np.clip(v.astype(np.int64), 0, f["num_embeddings"] - 1), np.concatenate(
                [[0], np.cumsum(lens)]).astype(np.int64))
        dense = np.zeros((self.num_rows, len(self.dense_names)), dtype=np.float32)
        labels = np.full((self.num_rows, len(self.tasks)), np.nan, dtype=np.float32)
        start = 0
        for (_, t), n in zip(tables, rows):
            for j, name in enumerate(self.dense_names):
                if name in t.column_names:
                    dense[start:start + n, j] = pc.fill_null(t.column(name), np.nan).to_numpy(zero_copy_only=False)
            for j, name in enumerate(self.tasks):
                if name in t.column_names:
                    col = t.column(name).cast(pa.float32())
                    labels[start:start + n, j] = pc.fill_null(col, np.nan).to_numpy(zero_copy_only=False)
            start += n
        self.dense, self.labels = dense, labels

    def time_split(self, val_fraction: float = 0.1, test_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """``(train rows, val rows)``: the earliest rows train, the next ``val_fraction`` validate."""
        order = np.argsort(self.timestamp, kind="stable")
        n_train = int(round(len(order) * (1 - val_fraction - test_fraction)))
        n_val = int(round(len(order) * val_fraction))
        return order[:n_train], order[n_train:n_train + n_val]


class BatchDataset(Dataset):
    """``dataset[row_ids]`` -> one batch: per bag feature ``(values [N], offsets [B+1])``, ``dense [B, F]``
    (standardized, missing = 0), ``labels [B, T]``, ``mask [B, T]``, ``domain [B]``."""

    def __init__(self, world: World, rows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        self.world, self.rows, self.mean, self.std = world, rows, mean, std

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: List[int]) -> dict:
        rows = self.rows[np.asarray(index)]
        w = self.world
        bags = {}
        for name, (values, offsets) in w.csr.items():
            starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
            out_offsets = np.concatenate([[0], np.cumsum(lengths)])
            gather = np.repeat(starts - out_offsets[:-1], lengths) + np.arange(out_offsets[-1])
            bags[name] = (torch.from_numpy(values[gather]), torch.from_numpy(out_offsets))
        dense = np.nan_to_num((w.dense[rows] - self.mean) / self.std)
        labels = w.labels[rows]
        return {"bags": bags, "dense": torch.from_numpy(dense), "labels": torch.from_numpy(np.nan_to_num(labels)),
                "mask": torch.from_numpy(~np.isnan(labels)), "domain": w.domain[rows]}


class PlainMMoE(nn.Module):
    """Embedding bags -> concatenated tokens + dense -> ``num_experts`` MLP experts -> a softmax gate and a
    linear head per task. ``forward(batch) -> logits [B, T]``."""

    def __init__(self, world: World, dim: int = 32, num_experts: int = 4, expert_dims=(128, 64)) -> None:
        super().__init__()
        tables = {}
        for f in world.bags:
            table = f.get("shared_table", f["name"])
            tables.setdefault(table, f["num_embeddings"])
        self.table_of = {f["name"]: f.get("shared_table", f["name"]) for f in world.bags}
        self.mean_pooled = {f["name"] for f in world.bags if f.get("kind") == "sequence" or f.get("pooling") == "mean"}
        self.tables = nn.ModuleDict({t: nn.EmbeddingBag(n, dim, mode="sum", sparse=True, include_last_offset=True) for t, n in tables.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.01)
        self.domain_emb = nn.Embedding(len(world.domains), dim)
        in_dim = dim * (len(world.bags) + 1) + len(world.dense_names)
        dims = [in_dim, *expert_dims]
        self.experts = nn.ModuleList(
            nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
            for _ in range(num_experts))
        self.num_tasks, self.num_experts = len(world.tasks), num_experts
        self.gates = nn.Linear(in_dim, self.num_tasks * num_experts)
        self.heads = nn.ModuleList(nn.Linear(expert_dims[-1], 1) for _ in range(self.num_tasks))

    def forward(self, batch: dict) -> torch.Tensor:
        tokens = []
        for name, (values, offsets) in batch["bags"].items():
            pooled = self.tables[self.table_of[name]](values, offsets)
            if name in self.mean_pooled:
                pooled = pooled / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(pooled.dtype)
            tokens.append(pooled)
        x = torch.cat([*tokens, self.domain_emb(batch["domain"]), batch["dense"]], dim=1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, e]
        gates = torch.softmax(self.gates(x).view(-1, self.num_tasks, self.num_experts), dim=-1)
        towers = torch.bmm(gates, experts)  # [B, T, e]
        return torch.cat([head(towers[:, t]) for t, head in enumerate(self.heads)], dim=1)


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
    mean = np.nanmean(world.dense[train_rows], axis=0)
    std = np.nan_to_num(np.nanstd(world.dense[train_rows], axis=0), nan=1.0) + 1e-5
    model = PlainMMoE(world)
    sparse = [p for t in model.tables.values() for p in t.parameters()]
    ids = {id(p) for p in sparse}
    optimizers = [torch.optim.Adagrad(sparse, lr=sparse_lr),
                  torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=dense_lr)]
    data = BatchDataset(world, train_rows, mean, std)
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
    val = BatchDataset(world, val_rows, mean, std)
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
