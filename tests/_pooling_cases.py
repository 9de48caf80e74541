"""Random jagged_embedding_pool inputs shared by the pooling tests (hypothesis strategy + builders)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st


@dataclass
class PoolCase:
    weights: torch.Tensor
    table_row_offsets: torch.Tensor
    indices: torch.Tensor
    offsets: torch.Tensor
    pooling: int
    per_sample_weights: Optional[torch.Tensor]
    T: int
    B: int

    @property
    def args(self):
        return (self.weights, self.table_row_offsets, self.indices, self.offsets, self.pooling,
                self.per_sample_weights)

    def global_rows(self) -> torch.Tensor:
        """Global row of every used index position (for F.embedding_bag)."""
        tro = self.table_row_offsets
        start = tro[:, 0] if tro.dim() == 2 else tro[:-1]
        lengths = self.offsets[1:].long() - self.offsets[:-1].long()
        table = torch.repeat_interleave(torch.arange(self.T * self.B), lengths) // max(self.B, 1)
        used = int(self.offsets[-1])
        return start[table] + self.indices[:used].long()


def make_case(
    seed: int,
    T: int,
    B: int,
    D: int,
    rows: list[int],
    max_len: int,
    index_dtype=torch.int64,
    pooling: int = 0,
    weighted: bool = False,
    dtype=torch.float32,
    shared: bool = False,
    trailing: int = 0,
) -> PoolCase:
    """T tables (or, with `shared`, T features over len(rows) tables as [T, 2] row ranges)."""
    g = torch.Generator().manual_seed(seed)
    bounds = [0]
    for r in rows:
        bounds.append(bounds[-1] + r)
    rows_total = bounds[-1]
    if shared:
        which = torch.randint(0, len(rows), (T,), generator=g).tolist()
        tro = torch.tensor([[bounds[k], bounds[k + 1]] for k in which], dtype=torch.int64)
        table_rows = [rows[k] for k in which]
    else:
        assert len(rows) == T
        tro = torch.tensor(bounds, dtype=torch.int64)
        table_rows = rows
    lengths = torch.randint(0, max_len + 1, (T * B,), generator=g)
    offsets = torch.zeros(T * B + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    parts = []
    for bag in range(T * B):
        n = int(lengths[bag])
        parts.append(torch.randint(0, table_rows[bag // B], (n,), generator=g))
    parts.append(torch.randint(0, max(min(table_rows), 1), (trailing,), generator=g))
    indices = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    weights = torch.randn(rows_total, D, generator=g, dtype=torch.float64).to(dtype)
    psw = torch.rand(indices.numel(), generator=g, dtype=torch.float64).to(
        torch.float64 if dtype == torch.float64 else torch.float32) if weighted else None
    return PoolCase(weights, tro, indices.to(index_dtype), offsets.to(index_dtype), pooling, psw, T, B)


@st.composite
def pool_cases(draw, dtypes=(torch.float32,), allow_weighted=True, max_d=40):
    T = draw(st.integers(1, 4))
    B = draw(st.integers(0, 5))
    D = draw(st.sampled_from([1, 3, 8, 16, 17, max_d]))
    shared = draw(st.booleans())
    n_tables = draw(st.integers(1, 3)) if shared else T
    rows = draw(st.lists(st.integers(1, 12), min_size=n_tables, max_size=n_tables))
    pooling = draw(st.sampled_from([0, 1]))
    weighted = allow_weighted and pooling == 0 and draw(st.booleans())
    return make_case(
        seed=draw(st.integers(0, 2**31 - 1)),
        T=T, B=B, D=D, rows=rows,
        max_len=draw(st.integers(0, 8)),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        pooling=pooling,
        weighted=weighted,
        dtype=draw(st.sampled_from(list(dtypes))),
        shared=shared,
        trailing=draw(st.sampled_from([0, 0, 3])),
    )


def tolerance(dtype):
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=1e-5, rtol=1e-5),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
    }[dtype]
