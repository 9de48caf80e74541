"""Small hand-built ``lattice.batch.Batch`` objects for the lattice.select tests (not a test module itself)."""
from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import Tensor

from lattice.batch import Batch
from lattice.sparse import KeyedJaggedTensor


def kjt_from_lists(keys: List[str], lists_per_key: List[List[List[int]]]) -> KeyedJaggedTensor:
    """``lists_per_key[k][b]`` = the id list of key k for sample b."""
    lengths = [len(x) for per in lists_per_key for x in per]
    values = [v for per in lists_per_key for x in per for v in x]
    B = len(lists_per_key[0]) if lists_per_key else 0
    return KeyedJaggedTensor(
        keys, torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths, dtype=torch.int64),
        stride=B,
    )


def toy_world(n: int = 3000, batch_size: int = 500, seed: int = 0, n_domains: int = 2):
    """A world where task 0 depends only on dense ``d0`` and task 1 only on sparse ``s0``.

    Features: dense d0 (signal for task 0), d1 (noise; value = global row index, for tracking);
    sparse s0 (signal for task 1: ids in [0, 20), label prob from the mean of a fixed weight per id),
    s1 (noise; row r holds ids [10 r, 10 r + 1, ...] so a list tells which row it came from; empty and
    masked off in some rows); sequence q0 (noise; ids like s1, timestamps = id + 7).
    Returns ``(batches, id_weight)``.
    """
    g = np.random.default_rng(seed)
    id_weight = torch.from_numpy(g.normal(0, 2.0, size=20))
    batches = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        rows = np.arange(start, start + b)
        d0 = g.normal(size=b)
        d1 = rows.astype(np.float64)
        dense = torch.tensor(np.stack([d0, d1], 1), dtype=torch.float32)
        dense_mask = torch.ones(b, 2, dtype=torch.bool)
        dense_mask[:, 1] = torch.from_numpy(g.random(b) < 0.8)
        dense[:, 1] = torch.where(dense_mask[:, 1], dense[:, 1], torch.zeros(()))
        s0 = [list(g.integers(0, 20, size=g.integers(1, 4))) for _ in range(b)]
        s1_present = g.random(b) < 0.7
        s1 = [[10 * r + j for j in range(int(g.integers(1, 4)))] if p else [] for r, p in zip(rows, s1_present)]
        q0 = [[10 * r + j for j in range(int(g.integers(0, 5)))] for r in rows]
        sparse = kjt_from_lists(["s0", "s1"], [s0, s1])
        sparse_mask = torch.ones(b, 2, dtype=torch.bool)
        sparse_mask[:, 1] = torch.from_numpy(s1_present)
        seq = kjt_from_lists(["q0"], [q0])
        ts = KeyedJaggedTensor(["q0"], seq.values() + 7, lengths=seq.lengths(), stride=b)
        domain = torch.from_numpy(rows % n_domains).to(torch.int64)
        p0 = torch.sigmoid(3.0 * torch.from_numpy(d0))
        p1 = torch.sigmoid(torch.stack([id_weight[torch.tensor(x)].mean() for x in s0]))
        labels = torch.stack([torch.bernoulli(p0, generator=torch.Generator().manual_seed(seed + start)),
                              torch.bernoulli(p1, generator=torch.Generator().manual_seed(seed + start + 1))], 1).float()
        label_mask = torch.ones(b, 2, dtype=torch.bool)
        label_mask[::7, 1] = False  # some rows have no task-1 label
        labels = torch.where(label_mask, labels, torch.zeros(()))
        batches.append(Batch(
            dense=dense, dense_mask=dense_mask, sparse=sparse, sparse_mask=sparse_mask, sequences=seq,
            sequence_timestamps=ts, domain=domain, labels=labels, label_mask=label_mask,
            label_window=torch.full((b, 2), -1, dtype=torch.int64),
            example_id=torch.from_numpy(rows).to(torch.int64), user_id=torch.zeros(b, dtype=torch.int64),
            item_id=torch.zeros(b, dtype=torch.int64),
        ))
    return batches, id_weight


class ToyModel:
    """logit_0 = 3 d0, logit_1 = mean_w(s0): uses d0 and s0 only (the true generating model)."""

    def __init__(self, id_weight: Tensor):
        self.id_weight = id_weight
        self.calls = 0
        self.seen: List = []
        self.record = False

    def __call__(self, batch) -> Tensor:
        self.calls += 1
        if self.record:
            self.seen.append(batch)
        jt = batch.sparse["s0"]
        w = self.id_weight[jt.values()]
        seg = torch.repeat_interleave(torch.arange(jt.lengths().numel()), jt.lengths())
        sums = torch.zeros(jt.lengths().numel(), dtype=w.dtype).index_add_(0, seg, w)
        l1 = sums / jt.lengths().clamp_min(1)
        l0 = 3.0 * batch.dense[:, 0].to(torch.float64)
        return torch.stack([l0, l1], 1)
