"""A tiny network and batches for the distillation tests.

``TinyNetwork`` follows the lattice network contract (``processor(batch) -> features`` with ``.tokens``,
``encode(features, batch) -> (head_input, representation)``, ``heads(x, label_window, domain)`` with
``.logits``/``.train_logits``, ``forward(batch)`` returning ``.logits``, ``.train_logits``,
``.representation``) without needing the models package, and accepts ``extra_tokens`` (room for the KTAP
teacher token). Batches are :class:`lattice.batch.Batch`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lattice.batch import Batch
from lattice.data.schema import DomainSpec, FeatureSpec, Schema, TaskSpec
from lattice.sparse import KeyedJaggedTensor

NUM_DENSE = 4


def tiny_schema(num_domains: int = 2, regression: bool = False, domain_tasks: dict | None = None) -> Schema:
    """Dense features only; tasks ``click``, ``conv`` (and ``value``, a regression task)."""
    tasks = [TaskSpec(name="click", kind="binary"), TaskSpec(name="conv", kind="binary", weight=0.5)]
    if regression:
        tasks.append(TaskSpec(name="value", kind="regression"))
    domains = [DomainSpec(name=f"dom{d}", tasks=(domain_tasks or {}).get(d)) for d in range(num_domains)]
    features = [FeatureSpec(name=f"d{i}", kind="dense") for i in range(NUM_DENSE)]
    return Schema(features=features, tasks=tasks, domains=domains)


@dataclass
class Features:
    tokens: Tensor
    sequence: Any = None


@dataclass
class HeadOut:
    logits: Tensor
    train_logits: Tensor


@dataclass
class Output:
    logits: Tensor
    train_logits: Tensor
    representation: Optional[Tensor] = None
    window_logits: dict = field(default_factory=dict)
    head_input: Optional[Tensor] = None
    head_hidden: Optional[Tensor] = None


class TinyProcessor(nn.Module):
    def __init__(self, num_dense: int, num_domains: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(num_dense, dim) * 0.3)
        self.domain = nn.Embedding(num_domains, dim)
        self.num_tokens = num_dense + 1

    def forward(self, batch) -> Features:
        tokens = batch.dense.unsqueeze(-1) * self.weight
        return Features(torch.cat([tokens, self.domain(batch.domain).unsqueeze(1)], dim=1))


class TinyHeads(nn.Module):
    def __init__(self, in_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.linear = nn.Linear(in_dim, num_tasks)

    def forward(self, x, label_window=None, domain=None) -> HeadOut:
        logits = self.linear(x)
        return HeadOut(logits, logits)


class TinyNetwork(nn.Module):
    """processor -> flatten -> MLP -> representation -> per-task linear heads."""

    def __init__(self, schema, dim: int = 8, hidden: int = 16, extra_tokens: int = 0) -> None:
        super().__init__()
        self.schema = schema
        self.dim = dim
        num_dense = len(schema.dense_features) if hasattr(schema, "dense_features") else NUM_DENSE
        self.processor = TinyProcessor(num_dense, max(1, len(schema.domains)), dim)
        self.processor.num_tokens += extra_tokens
        self.trunk = nn.Sequential(nn.Linear(self.processor.num_tokens * dim, hidden), nn.SiLU())
        self.heads = TinyHeads(hidden, len(schema.tasks))

    def encode(self, features, batch):
        rep = self.trunk(features.tokens.flatten(1))
        return rep, rep

    def forward(self, batch, extra_tokens=None) -> Output:
        features = self.processor(batch)
        if extra_tokens is not None:
            features = Features(torch.cat([features.tokens, extra_tokens.to(features.tokens.dtype)], dim=1))
        head_input, rep = self.encode(features, batch)
        out = self.heads(head_input, batch.label_window, batch.domain)
        return Output(out.logits, out.train_logits, rep, head_input=head_input)


def _empty_kjt(batch_size: int) -> KeyedJaggedTensor:
    return KeyedJaggedTensor([], torch.zeros(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long), stride=batch_size)


def planted_rows(n: int, num_tasks: int = 2, num_domains: int = 2, seed: int = 0, users: int = 50) -> dict[str, Tensor]:
    """A planted dataset: labels drawn from a logistic function of the dense features."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, NUM_DENSE, generator=gen)
    w = torch.randn(NUM_DENSE, num_tasks, generator=gen)
    logits = dense @ w
    probs = torch.sigmoid(logits)
    labels = (torch.rand(n, num_tasks, generator=gen) < probs).float()
    return {
        "dense": dense,
        "labels": labels,
        "true_probs": probs,
        "true_logits": logits,
        "domain": torch.randint(0, num_domains, (n,), generator=gen),
        "user_id": torch.randint(0, users, (n,), generator=gen),
        "example_id": torch.arange(n, dtype=torch.long),
    }


def make_batch(rows: dict[str, Tensor], index: Tensor | slice | None = None, label_mask: Tensor | None = None) -> Batch:
    """A Batch over ``rows`` (all of them, or ``rows[index]``)."""
    sel = {k: (v if index is None else v[index]) for k, v in rows.items()}
    B, T = sel["labels"].shape
    mask = torch.ones(B, T, dtype=torch.bool) if label_mask is None else label_mask
    return Batch(
        dense=sel["dense"].float(),
        dense_mask=torch.ones(B, NUM_DENSE, dtype=torch.bool),
        sparse=_empty_kjt(B),
        sparse_mask=torch.zeros(B, 0, dtype=torch.bool),
        sequences=_empty_kjt(B),
        sequence_timestamps=None,
        domain=sel["domain"].long(),
        labels=sel["labels"] * mask,
        label_mask=mask,
        label_window=torch.full((B, T), -1, dtype=torch.long),
        example_id=sel["example_id"].long(),
        user_id=sel["user_id"].long(),
        item_id=torch.zeros(B, dtype=torch.long),
        true_probs=sel.get("true_probs"),
        timestamp=sel.get("timestamp"),
    )


def batches(rows: dict[str, Tensor], batch_size: int) -> list:
    n = rows["labels"].shape[0]
    return [make_batch(rows, slice(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def collate_first(items):
    """DataLoader collate for a dataset whose items are ready batches."""
    assert len(items) == 1
    return items[0]


def folded_teacher_outputs(tmp_path) -> dict[str, Any]:
    """A student slice (``student/shop.parquet``: example_id, click, a half-null conversion) and a teacher's logged
    outputs for its 400 rows split over two fold folders in another row order (``fold0``, ``fold1``), as
    ``lattice.distill.crossfit`` writes them. Returns the paths and the planted arrays (``click``, ``score``,
    ``conv``); ``logit_click`` is ``score`` and ``logit_conversion`` is ``-score`` (float32)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n = 400
    ids = np.arange(n, dtype=np.int64) * 7
    click = (rng.random(n) < 0.3).astype(float)
    score = click + rng.normal(0, 1.0, n)
    conv = np.where(rng.random(n) < 0.5, np.nan, (rng.random(n) < 0.2).astype(float))
    student = tmp_path / "student"
    student.mkdir()
    pq.write_table(pa.table({"example_id": ids, "click": click,
                             "conversion": pa.array(conv, from_pandas=True)}), student / "shop.parquet")
    order = rng.permutation(n)
    folds = []
    for k, part in enumerate(np.array_split(order, 2)):
        folds.append(str(tmp_path / f"fold{k}"))
        os.mkdir(folds[-1])
        pq.write_table(pa.table({"example_id": ids[part], "logit_click": score[part].astype(np.float32),
                                 "logit_conversion": -score[part].astype(np.float32)}),
                       os.path.join(folds[-1], "predictions-rank0.parquet"))
    return {"student": str(student), "folds": folds, "click": click, "score": score, "conv": conv}
