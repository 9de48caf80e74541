"""Random schemas and Batches for the nn/models tests (no data files, no reader).

``make_schema`` builds a small multi-domain schema (dense, sparse with a shared table, two sequences
with timestamps, a Zipper task); ``random_batch`` draws a Batch for it with empty sequences, empty bags,
absent features (per the domains' feature lists and at random) and masked labels;
``planted_batches`` draws a fixed tiny dataset whose labels depend on the features, for overfit tests.
"""
from __future__ import annotations

import math

import torch

from lattice.batch import Batch
from lattice.data.schema import DomainSpec, FeatureSpec, Schema, TaskSpec, WindowSpec
from lattice.models import DLRM, PLE, InterFormer, LatticeNetwork, MMoE, SharedBottom, Wukong
from lattice.sparse import KeyedJaggedTensor


def make_schema(
    num_domains: int = 3,
    num_dense: int = 3,
    num_sparse: int = 4,
    num_sequences: int = 2,
    rows: int = 50,
    zipper: bool = True,
    max_length: int = 12,
) -> Schema:
    features = [FeatureSpec(name=f"d{i}", kind="dense") for i in range(num_dense)]
    for i in range(num_sparse):
        # s0 = the target item; it shares the "item" table with the first sequence (clicked items).
        shared = "item" if i == 0 else None
        features.append(FeatureSpec(name=f"s{i}", kind="sparse", num_embeddings=rows + 7 * i, shared_table=shared))
    for i in range(num_sequences):
        shared = "item" if i == 0 else None
        features.append(
            FeatureSpec(
                name=f"q{i}", kind="sequence", num_embeddings=rows + 3 * i, shared_table=shared,
                max_length=max_length, timestamps_column=f"q{i}_ts",
            )
        )
    tasks = [TaskSpec(name="click", kind="binary")]
    if zipper:
        tasks.append(
            TaskSpec(
                name="conversion",
                kind="binary",
                delay_column="conversion_delay",
                windows=[
                    WindowSpec(name="1h", seconds=3600.0, probability=0.5),
                    WindowSpec(name="1d", seconds=86400.0, probability=0.3),
                    WindowSpec(name="7d", seconds=604800.0, probability=0.2),
                ],
            )
        )
    tasks.append(TaskSpec(name="watch_time", kind="regression", weight=0.5))
    names = [f.name for f in features]
    domains = []
    for d in range(num_domains):
        # domain 1 lacks the last dense and the last sparse feature (consolidated data).
        feats = [n for n in names if not (d == 1 and n in (f"d{num_dense - 1}", f"s{num_sparse - 1}"))]
        domains.append(DomainSpec(name=f"dom{d}", features=feats, tasks=None))
    return Schema(features=features, tasks=tasks, domains=domains)


def _kjt(keys, lengths_per_key, high_per_key, gen, device=None):
    values, lengths = [], []
    for lens, high in zip(lengths_per_key, high_per_key):
        lengths.append(lens)
        values.append(torch.randint(0, high, (int(lens.sum()),), generator=gen))
    lengths_t = torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.long)
    values_t = torch.cat(values) if values else torch.zeros(0, dtype=torch.long)
    return KeyedJaggedTensor(keys, values_t, lengths=lengths_t)


def _present(schema: Schema, domain: torch.Tensor, names: list[str]) -> torch.Tensor:
    table = torch.ones(max(1, len(schema.domains)), len(names), dtype=torch.bool)
    for d, spec in enumerate(schema.domains):
        if spec.features is not None:
            table[d] = torch.tensor([n in spec.features for n in names])
    return table[domain]


def random_batch(
    schema: Schema,
    batch_size: int = 8,
    seed: int = 0,
    empty_sequence_rate: float = 0.3,
    absent_rate: float = 0.2,
    max_length: int | None = None,
    all_domains: bool = True,
) -> Batch:
    """A random Batch for ``schema``. Row 0 has all sequences empty, row 1 all features absent."""
    gen = torch.Generator().manual_seed(seed)
    B = batch_size
    n_domains = max(1, len(schema.domains))
    domain = torch.randint(0, n_domains, (B,), generator=gen)
    if all_domains:
        domain[: min(B, n_domains)] = torch.arange(min(B, n_domains))
    dense_names = [f.name for f in schema.dense_features]
    sparse_names = [f.name for f in schema.sparse_features]
    dense = torch.randn(B, len(dense_names), generator=gen)
    dense_mask = _present(schema, domain, dense_names) & (torch.rand(B, len(dense_names), generator=gen) > absent_rate)
    sparse_mask = _present(schema, domain, sparse_names) & (
        torch.rand(B, len(sparse_names), generator=gen) > absent_rate
    )
    if B > 1:
        dense_mask[1] = False
        sparse_mask[1] = False
    dense = dense * dense_mask
    sparse_lengths = []
    for i in range(len(sparse_names)):
        lens = torch.randint(0, 4, (B,), generator=gen) * sparse_mask[:, i]
        sparse_lengths.append(lens)
    sparse = _kjt(sparse_names, sparse_lengths, [f.num_embeddings for f in schema.sparse_features], gen)
    seq_specs = schema.sequence_features
    seq_lengths = []
    for f in seq_specs:
        cap = max_length or f.max_length or 8
        lens = torch.randint(0, cap + 1, (B,), generator=gen)
        lens = lens * (torch.rand(B, generator=gen) > empty_sequence_rate)
        lens[0] = 0
        seq_lengths.append(lens)
    sequences = _kjt([f.name for f in seq_specs], seq_lengths, [f.num_embeddings for f in seq_specs], gen)
    ts_values = []
    for lens in seq_lengths:
        for n in lens.tolist():
            ts_values.append(torch.sort(torch.randint(0, 10**7, (n,), generator=gen)).values)
    ts = torch.cat(ts_values) if ts_values else torch.zeros(0, dtype=torch.long)
    timestamps = KeyedJaggedTensor(sequences.keys(), ts, lengths=sequences.lengths()) if seq_specs else None
    T = len(schema.tasks)
    labels = torch.zeros(B, T)
    label_window = torch.full((B, T), -1, dtype=torch.long)
    for t, task in enumerate(schema.tasks):
        if task.kind == "binary":
            labels[:, t] = (torch.rand(B, generator=gen) < 0.3).float()
        else:
            labels[:, t] = torch.randn(B, generator=gen)
        if task.windows:
            label_window[:, t] = torch.randint(0, len(task.windows), (B,), generator=gen)
    label_mask = torch.rand(B, T, generator=gen) > 0.2
    labels = labels * label_mask
    return Batch(
        dense=dense,
        dense_mask=dense_mask,
        sparse=sparse,
        sparse_mask=sparse_mask,
        sequences=sequences,
        sequence_timestamps=timestamps,
        domain=domain,
        labels=labels,
        label_mask=label_mask,
        label_window=label_window,
        example_id=torch.arange(B, dtype=torch.long),
        user_id=torch.randint(0, 1000, (B,), generator=gen),
        item_id=torch.randint(0, 1000, (B,), generator=gen),
        true_probs=None,
        teacher_logits=None,
        teacher_mask=None,
        teacher_embedding=None,
    )


def planted_batches(schema: Schema, num_batches: int = 4, batch_size: int = 64, seed: int = 0) -> list[Batch]:
    """A fixed tiny dataset with learnable labels: binary tasks follow a hidden score of the sparse ids,
    the first dense value, the domain and whether the target item (s0) occurs in the first sequence;
    regression tasks follow the same score. Windowed tasks: a conversion under a shorter window is rarer.
    """
    gen = torch.Generator().manual_seed(seed + 1000)
    hidden = {f.name: torch.randn(f.num_embeddings, generator=gen) for f in schema.sparse_features}
    domain_shift = torch.randn(max(1, len(schema.domains)), generator=gen)
    out = []
    for i in range(num_batches):
        b = random_batch(schema, batch_size, seed=seed + i, absent_rate=0.1, empty_sequence_rate=0.2)
        score = domain_shift[b.domain].clone()
        for f in schema.sparse_features:
            jt = b.sparse[f.name]
            pooled = torch.zeros(batch_size).index_add_(
                0, torch.repeat_interleave(torch.arange(batch_size), jt.lengths()), hidden[f.name][jt.values()]
            )
            score += pooled
        if schema.dense_features:
            score += 2.0 * b.dense[:, 0]
        if schema.sequence_features and schema.sparse_features:
            seq = b.sequences[schema.sequence_features[0].name]
            target = b.sparse[schema.sparse_features[0].name]
            first_target = torch.full((batch_size,), -1, dtype=torch.long)
            has = target.lengths() > 0
            first_target[has] = target.values()[target.offsets()[:-1][has]]
            rows = torch.repeat_interleave(torch.arange(batch_size), seq.lengths())
            hit = torch.zeros(batch_size).index_add_(0, rows, (seq.values() == first_target[rows]).float())
            score += 2.0 * (hit > 0).float()
        labels = torch.zeros_like(b.labels)
        for t, task in enumerate(schema.tasks):
            if task.kind == "binary":
                shift = 0.0
                if task.windows:
                    shift = -1.0 + 0.5 * b.label_window[:, t].clamp(min=0).float()
                labels[:, t] = (score + shift > 0).float()
            else:
                labels[:, t] = score / 3.0
        b.labels = labels * b.label_mask
        out.append(b)
    return out


def label_entropy(batches: list[Batch], schema: Schema) -> float:
    """Mean per-task loss of the best constant predictor (base-rate entropy / label variance)."""
    labels = torch.cat([b.labels for b in batches])
    mask = torch.cat([b.label_mask for b in batches])
    total = 0.0
    for t, task in enumerate(schema.tasks):
        y = labels[mask[:, t], t]
        if task.kind == "binary":
            p = float(y.mean()).__float__()
            p = min(max(p, 1e-6), 1 - 1e-6)
            total += -(p * math.log(p) + (1 - p) * math.log(1 - p))
        else:
            total += float(y.var(unbiased=False))
    return total / len(schema.tasks)


# Small constructor arguments of every deep network class (tests that build each one).
SMALL_NETWORK_ARGS = {
    LatticeNetwork: dict(dim=16, num_layers=2, fm_tokens=4, lcb_tokens=4, fm_hidden_dims=[32], representation_dim=32,
                         head_hidden_dims=[16]),
    InterFormer: dict(dim=16, num_layers=2, dot_tokens=4, dcn_tokens=4, summary_hidden_dims=[32],
                      representation_dim=32, head_hidden_dims=[16]),
    SharedBottom: dict(dim=8, bottom_dims=[32, 16], head_hidden_dims=[16]),
    MMoE: dict(dim=8, num_experts=3, expert_dims=[32, 16], head_hidden_dims=[16]),
    PLE: dict(dim=8, num_levels=2, shared_experts=2, task_experts=1, expert_dims=[32, 16], head_hidden_dims=[16]),
    DLRM: dict(dim=8, bottom_dims=[16], top_dims=[32, 16], head_hidden_dims=[16]),
    Wukong: dict(dim=16, num_layers=2, fm_tokens=4, lcb_tokens=4, fm_hidden_dims=[32], top_dims=[32],
                 head_hidden_dims=[16]),
}
