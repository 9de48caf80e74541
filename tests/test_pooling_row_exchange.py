"""The fused optimizer's row exchange across data-parallel ranks (2 CPU processes over gloo): each rank's
update equals a single process's fused update on the concatenated global batch, replicas stay identical."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lattice.ops import jagged_embedding_pool_fused
from lattice.ops.row_exchange import allgather_sparse_rows, coalesce_rows

T, B, D = 3, 6, 8
ROWS = [20, 30, 25]


def _bags(seed: int, empty_rank: bool):
    """Key-major bags of one rank: lengths [T*B] (some empty), indices local to each table."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (T * B,), generator=g)
    if empty_rank:
        lengths.zero_()
    indices = torch.cat([torch.randint(0, ROWS[i // B], (int(n),), generator=g) for i, n in enumerate(lengths)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    grad = torch.randn(B, T, D, generator=g)
    return indices, offsets, grad


def _concat(parts):
    """Two ranks' key-major bags as one global batch of 2B samples (rank 0's samples first)."""
    idx, lens, grads = [], [], []
    for t in range(T):
        for indices, offsets, _ in parts:
            lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
            idx.append(indices[lo:hi])
            lens.append(offsets[t * B + 1:(t + 1) * B + 1] - offsets[t * B:(t + 1) * B])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(lens).cumsum(0)])
    grad = torch.cat([p[2] for p in parts], dim=0)
    return torch.cat(idx), offsets, grad


def _setup(optimizer: str):
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(sum(ROWS), D, generator=g)
    state = torch.rand(sum(ROWS), generator=g) if optimizer == "rowwise_adagrad" else torch.empty(0)
    tro = torch.tensor([0, *torch.tensor(ROWS).cumsum(0).tolist()])
    return weights, state, tro


def _rank(rank: int, world: int, init_file: str, out_dir: str, optimizer: str, pooling: str, empty_rank: bool):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        weights, state, tro = _setup(optimizer)
        indices, offsets, grad = _bags(10 + rank, empty_rank and rank == 1)
        group = dist.new_group([0, 1])
        for _ in range(2):  # two steps: the second reads the first's Adagrad state
            out = jagged_embedding_pool_fused(weights, state, tro, indices, offsets, pooling, optimizer=optimizer,
                                              learning_rate=0.1, eps=1e-8, weight_decay=0.01, process_group=group)
            out.backward(grad)
        torch.save({"weights": weights, "state": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer, pooling, empty_rank", [
    ("rowwise_adagrad", "sum", False), ("sgd", "mean", False), ("rowwise_adagrad", "mean", True),
])
def test_two_ranks_equal_one_process_on_the_global_batch(optimizer, pooling, empty_rank):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank, args=(2, init_file, tmp, optimizer, pooling, empty_rank), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert torch.equal(ranks[0]["state"], ranks[1]["state"])

    weights, state, tro = _setup(optimizer)
    parts = [_bags(10, False), _bags(11, empty_rank)]
    indices, offsets, grad = _concat(parts)
    for _ in range(2):
        out = jagged_embedding_pool_fused(weights, state, tro, indices, offsets, pooling, optimizer=optimizer,
                                          learning_rate=0.1, eps=1e-8, weight_decay=0.01, gradient_divisor=None)
        # The global loss is the mean of the ranks' losses: each rank's output gradient counts 1/2.
        out.backward(grad / 2)
    torch.testing.assert_close(ranks[0]["weights"], weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["state"], state, atol=1e-6, rtol=1e-5)


def test_coalesce_rows_sums_duplicates_in_sorted_order():
    rows = torch.tensor([7, 2, 7, 0, 2])
    grads = torch.arange(10.0).reshape(5, 2)
    unique, summed = coalesce_rows(rows, grads)
    assert unique.tolist() == [0, 2, 7]
    assert summed.tolist() == [[6.0, 7.0], [10.0, 12.0], [4.0, 6.0]]


def test_allgather_outside_a_process_group_is_the_identity():
    rows, grads = torch.tensor([3, 1]), torch.ones(2, 4)
    got_rows, got_grads = allgather_sparse_rows(rows, grads)
    assert got_rows is rows and got_grads is grads
    with pytest.raises(ValueError, match="rows must be \\[U\\]"):
        allgather_sparse_rows(rows, torch.ones(3, 4))


def test_gradient_divisor_is_checked():
    weights, state, tro = _setup("sgd")
    indices, offsets, _ = _bags(1, False)
    with pytest.raises(ValueError, match="gradient_divisor must be > 0"):
        jagged_embedding_pool_fused(weights, state, tro, indices, offsets, optimizer="sgd", gradient_divisor=0.0)
