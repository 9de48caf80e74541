"""The plain-PyTorch MMoE of the compile study is the same network as lattice's MMoE (issue 28: like for like)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lattice.benchmark import plain_mmoe
from lattice.data import SyntheticConfig, SyntheticDomain, SyntheticWorld
from lattice.models import MMoE


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "w"
    config = SyntheticConfig(
        seed=0, num_users=200, num_items=100,
        domains=[SyntheticDomain("feed", 600, absent_features=["query_cluster"]),
                 SyntheticDomain("search", 300, absent_features=["item_tags"])],
    )
    SyntheticWorld(config).write(str(out))
    return str(out)


def _counts(model: torch.nn.Module, is_table) -> tuple[int, int]:
    tables = sum(p.numel() for n, p in model.named_parameters() if is_table(n))
    return tables, sum(p.numel() for p in model.parameters()) - tables


def test_plain_has_lattice_mmoe_shape(world_dir):
    world = plain_mmoe.World(world_dir)
    plain = plain_mmoe.PlainMMoE(world)
    lattice = MMoE(f"{world_dir}/schema.yaml", dim=32, history_match=True)
    assert plain.experts[0][0].in_features == lattice.experts.experts[0].in_dim
    assert plain.pairs == [(s, c) for s, c, _ in lattice.processor.match.pairs]
    plain_tables, plain_rest = _counts(plain, lambda n: n.startswith("tables."))
    lattice_tables, lattice_rest = _counts(lattice, lambda n: ".collections." in n)
    assert plain_tables == lattice_tables
    # lattice has one head per window of a windowed task, plain one per task (module docstring)
    extra_heads = sum(len(t.windows) - 1 for t in lattice.schema.tasks if t.windows)
    head = 64 * 64 + 64 + 64 + 1
    assert lattice_rest - plain_rest == extra_heads * head


def test_plain_history_match_counts_candidate_events(world_dir):
    world = plain_mmoe.World(world_dir)
    data = plain_mmoe.BatchDataset(world, np.arange(world.num_rows))
    batch = data[list(range(64))]
    plain = plain_mmoe.PlainMMoE(world)
    with torch.no_grad():
        plain.match_weight.zero_()
        plain.match_weight[:, 1, 0] = 1.0  # token channel 0 of pair p = log1p(matching events)
        match, mean = plain._history(batch)
    for p, (s, c) in enumerate(plain.pairs):
        values, offsets = (t.numpy() for t in batch["bags"][s])
        cand_values, cand_offsets = (t.numpy() for t in batch["bags"][c])
        expected = []
        for b in range(64):
            cand = set(cand_values[cand_offsets[b]:cand_offsets[b + 1]].tolist())
            expected.append(sum(v in cand for v in values[offsets[b]:offsets[b + 1]].tolist()))
        torch.testing.assert_close(match[:, p, 0], torch.log1p(torch.tensor(expected, dtype=torch.float32)))
    assert mean.shape == (64, 32) and bool(torch.isfinite(mean).all())


def test_plain_trains_and_reports_validation_logits(world_dir):
    out = plain_mmoe.train(world_dir, 64, 1, 2, 1)  # 90 validation rows
    assert out["rows"] == 128 and out["logits"].shape == (64, len(out["tasks"]))
    assert bool(torch.isfinite(out["logits"]).all())
