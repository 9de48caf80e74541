"""lattice.batch.Batch: its home below nn/models, and its pytree registration (torch.export/compile)."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from lattice.batch import Batch
from lattice.sparse import kjt_is_equal
from tests._models import make_schema, random_batch


def _batches_equal(a: Batch, b: Batch) -> bool:
    for name in Batch.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            if not (x is None and y is None):
                return False
        elif isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif not kjt_is_equal(x, y):
            return False
    return True


def test_batch_round_trips_through_pytree_with_none_fields():
    batch = random_batch(make_schema(), batch_size=6, seed=3)
    batch.timestamp = torch.arange(6)  # one optional field set, the rest None
    leaves, spec = pytree.tree_flatten(batch)
    assert spec.type is Batch and spec.num_children == len(Batch.__dataclass_fields__) - 4  # 4 fields None
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, Batch)
    assert back.teacher_logits is None and back.true_probs is None
    assert _batches_equal(batch, back)


def test_tree_map_reaches_every_tensor_of_a_batch():
    batch = random_batch(make_schema(), batch_size=5, seed=1)
    doubled = pytree.tree_map_only(torch.Tensor, lambda t: t * 2 if t.is_floating_point() else t, batch)
    assert torch.equal(doubled.dense, batch.dense * 2)
    assert torch.equal(doubled.domain, batch.domain)
    assert doubled.teacher_embedding is None


def test_batch_flattens_with_attribute_keys():
    batch = random_batch(make_schema(), batch_size=4, seed=0)
    children, _ = pytree.SUPPORTED_NODES[Batch].flatten_with_keys_fn(batch)
    names = [key.name for key, _ in children]
    assert sorted(names) == sorted(n for n in Batch.__dataclass_fields__ if getattr(batch, n) is not None)
    assert "teacher_logits" not in names and "dense" in names
    assert all(child is getattr(batch, key.name) for key, child in children)


def test_key_paths_reach_into_the_jagged_fields():
    batch = random_batch(make_schema(), batch_size=4, seed=0)
    paths = {pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(batch)[0]}
    assert {".dense", ".dense_mask", ".sparse.values", ".sequences.offsets", ".sequence_timestamps.lengths"} <= paths
    assert not any(p.startswith(".teacher_logits") for p in paths)


def test_torch_export_takes_a_batch():
    """Fields whose names prefix others (dense / dense_mask) and the KJT fields, through export and back."""
    batch = random_batch(make_schema(), batch_size=6, seed=0)
    batch.timestamp = torch.arange(6)

    class Score(torch.nn.Module):
        def forward(self, b: Batch) -> torch.Tensor:
            pooled = b.sparse.lengths().view(-1, 6).sum(0) + b.sequences.lengths().view(-1, 6).sum(0)
            return (b.dense * b.dense_mask).sum(1) + b.labels.sum(1) + pooled.float() + b.timestamp.float()

    program = torch.export.export(Score(), (batch,))
    torch.testing.assert_close(program.module()(batch), Score()(batch))


def test_torch_compile_takes_a_batch():
    batch = random_batch(make_schema(), batch_size=4, seed=2)

    def score(b: Batch) -> torch.Tensor:
        out = b.dense.sum(1) + b.labels.sum(1)
        if b.teacher_logits is not None:
            out = out + b.teacher_logits.sum(1)
        return out

    compiled = torch.compile(score, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(batch), score(batch))
