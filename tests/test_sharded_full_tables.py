"""``load_full_tables``: a sharded tables folder read back, on one process without a process group, into whole
unsharded tables (the path ``lattice export`` takes); bad folders and models are named. The 2-rank folder with
row- and column-wise pieces is covered end to end by test_sharded_export.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lattice.nn.embedding import EmbeddingBagCollection, EmbeddingTableConfig
from lattice.nn.placement import ShardingPlan, TablePlacement
from lattice.nn.sharded import ShardedEmbeddingBagCollection
from lattice.train.sharded_checkpoint import load_full_tables, save_sharded_tables

TABLES = [EmbeddingTableConfig("ta", 37, 8, ["fa", "fb"]), EmbeddingTableConfig("tb", 50, 8, ["fc"])]


class _Net(nn.Module):
    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.tower = nn.Module()
        self.tower.embeddings = embeddings


def _saved(tmp_path, optimizer="rowwise_adagrad"):
    plan = ShardingPlan(1, {"ta": TablePlacement("table_wise", 37, 8, [0]), "tb": TablePlacement("replicated", 50, 8)})
    sharded = ShardedEmbeddingBagCollection(TABLES, plan, fused_optimizer=optimizer, init_seed=3)
    weights = {t.name: torch.randn(t.num_embeddings, 8) for t in TABLES}
    states = {t.name: torch.rand(t.num_embeddings) for t in TABLES}
    sharded.load_full_tables(weights, states)
    save_sharded_tables(_Net(sharded), str(tmp_path / "tables"))
    return weights, states


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
def test_a_folder_loads_into_whole_tables(tmp_path, optimizer):
    weights, states = _saved(tmp_path, optimizer)
    full = EmbeddingBagCollection(TABLES, fused_optimizer=optimizer)
    load_full_tables(_Net(full), str(tmp_path / "tables"))
    for t in TABLES:
        torch.testing.assert_close(full.embedding_weight(t.name), weights[t.name], rtol=0, atol=0)
        if optimizer == "rowwise_adagrad":
            torch.testing.assert_close(full.optimizer_state_of(t.name), states[t.name], rtol=0, atol=0)


def test_bad_folders_and_models_are_named(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ValueError, match=r"the tables folder .*nope.* does not exist"):
        load_full_tables(_Net(EmbeddingBagCollection(TABLES, fused_optimizer="sgd")), str(tmp_path / "nope"))
    other = _Net(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"holds the tables of 'tower.embeddings', which is not an embedding"):
        load_full_tables(other, str(tmp_path / "tables"))
    wider = [EmbeddingTableConfig("ta", 37, 16, ["fa", "fb"]), TABLES[1]]
    with pytest.raises(ValueError, match=r"'tower.embeddings.ta.weight' has shape \(37, 8\) there"):
        load_full_tables(_Net(EmbeddingBagCollection(wider, fused_optimizer="sgd")), str(tmp_path / "tables"))
