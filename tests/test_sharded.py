"""ShardedEmbeddingBagCollection (issue 27): TW, RW, CW, replicated and mixed plans over gloo equal one process
on the same global batch; DCP checkpoints reshard 2 -> 1 and 2 -> 4; bad ids and a dying rank.

The multi-process cases run in tests/sharded_worker.py (one spawn of W ranks per world size, every case inside it);
the in-process tests below cover what needs no process group."""
from __future__ import annotations

import pytest
import torch
from _workers import run_worker

from lattice.nn.embedding import EmbeddingBagCollection, EmbeddingTableConfig, deferred_tables
from lattice.nn.placement import ShardingPlan, TablePlacement
from lattice.nn.sharded import ShardedEmbeddingBagCollection
from lattice.sparse import KeyedJaggedTensor

TABLES = [EmbeddingTableConfig("ta", 37, 8, ["fa", "fb"]), EmbeddingTableConfig("tb", 50, 4, ["fc"], pooling="mean")]


def one_rank_plan(kinds) -> ShardingPlan:
    return ShardingPlan(1, {t.name: TablePlacement(k, t.num_embeddings, t.embedding_dim, [] if k == "replicated" else [0])
                            for t, k in zip(TABLES, kinds)})


def features(B: int = 6, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys, rows = ["fc", "fa", "fb"], {"fa": 37, "fb": 37, "fc": 50}
    lengths = torch.randint(0, 4, (3 * B,), generator=g)
    values = torch.cat([torch.randint(0, rows[k], (int(lengths[i * B : (i + 1) * B].sum()),), generator=g)
                        for i, k in enumerate(keys)])
    return KeyedJaggedTensor(keys, values, lengths=lengths)


@pytest.mark.parametrize("kinds", [("row_wise", "column_wise"), ("table_wise", "replicated")])
def test_one_rank_forward_dict_and_fused_step_match_the_collection(kinds):
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad", lr=0.2)
    sharded = ShardedEmbeddingBagCollection.from_collection(ref, one_rank_plan(kinds))
    for step in range(2):
        want, got = ref.forward_dict(features(seed=step)), sharded.forward_dict(features(seed=step))
        assert list(got) == ref.feature_names
        loss = lambda out: sum((v * (i + 1)).sum() for i, v in enumerate(out.values()))  # noqa: E731
        loss(want).backward()
        loss(got).backward()
        for f in want:
            torch.testing.assert_close(got[f], want[f].detach(), atol=2e-6, rtol=0)
    for t in TABLES:
        kind = sharded.plan.tables[t.name].kind
        mine = sharded.replicated if kind == "replicated" else None
        weight = mine.embedding_weight(t.name) if mine else sharded.shard_weight(t.name)
        state = mine.optimizer_state_of(t.name) if mine else sharded.shard_optimizer_state(t.name)
        torch.testing.assert_close(weight, ref.embedding_weight(t.name), atol=2e-6, rtol=0)
        torch.testing.assert_close(state, ref.optimizer_state_of(t.name), atol=2e-6, rtol=0)


def test_initialization_does_not_depend_on_the_plan():
    a = ShardedEmbeddingBagCollection(TABLES, one_rank_plan(("table_wise", "replicated")), init_seed=3)
    b = ShardedEmbeddingBagCollection(TABLES, one_rank_plan(("column_wise", "row_wise")), init_seed=3)
    assert torch.equal(a.shard_weight("ta"), b.shard_weight("ta"))
    assert torch.equal(a.replicated.embedding_weight("tb"), b.shard_weight("tb"))
    c = ShardedEmbeddingBagCollection(TABLES, one_rank_plan(("column_wise", "row_wise")), init_seed=4)
    assert not torch.equal(b.shard_weight("ta"), c.shard_weight("ta"))


def test_a_deferred_collection_shards_into_the_values_of_the_whole_one():
    torch.manual_seed(5)
    whole = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad", lr=0.2)
    drawn_after_whole = torch.rand(4)
    torch.manual_seed(5)
    with deferred_tables():
        deferred = EmbeddingBagCollection(TABLES, fused_optimizer="rowwise_adagrad", lr=0.2, device="cpu")
    assert torch.equal(torch.rand(4), drawn_after_whole)  # layers built after the tables draw the same values
    assert all(w.is_meta for w in deferred.weights.values())
    assert all(s.is_meta for s in deferred.optimizer_state.buffers())
    for kinds in (("row_wise", "column_wise"), ("table_wise", "replicated")):
        sharded = ShardedEmbeddingBagCollection.from_collection(deferred, one_rank_plan(kinds))
        assert sharded.lr == 0.2 and sharded.fused_optimizer == "rowwise_adagrad"
        for t, kind in zip(TABLES, kinds):
            mine = sharded.replicated.embedding_weight(t.name) if kind == "replicated" else sharded.shard_weight(t.name)
            assert mine.device.type == "cpu"
            assert torch.equal(mine, whole.embedding_weight(t.name)), (kinds, t.name)


def _cli_model(*overrides):
    import os

    from lattice.cli import run_lightning

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return run_lightning(["--config", os.path.join(configs, "mdmo.yaml"), *overrides], run=False).model


def test_the_cli_builds_tables_deferred_under_sharding_only():
    import os

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    model = _cli_model("--config", os.path.join(configs, "sharded.yaml"))
    assert model.sharding is not None
    collections = [m for m in model.network.modules() if isinstance(m, EmbeddingBagCollection)]
    assert collections and all(w.is_meta for c in collections for w in c.weights.values())
    plain = _cli_model()
    assert not any(w.is_meta for m in plain.network.modules() if isinstance(m, EmbeddingBagCollection)
                   for w in m.weights.values())


def test_distillation_module_shards_its_network_and_counts_eval_steps(tmp_path):
    import yaml
    from _models import make_schema, random_batch

    from lattice.distill import DistillationModule
    from lattice.models import LatticeNetwork
    from lattice.train.planner import network_tables
    from lattice.train.sharding import shard_network

    schema = make_schema()
    network = LatticeNetwork(schema, dim=16, num_layers=1)
    tables, _ = network_tables(network)
    plan = ShardingPlan(1, {t.name: TablePlacement("row_wise", t.num_embeddings, t.embedding_dim, [0]) for t in tables})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan.to_dict()))
    module = DistillationModule(network, sharding={"plan": str(path)}, distillation="none")
    assert module.hparams["sharding"] == {"plan": str(path)}
    module.sharding_plan = shard_network(module, module.sharding, None)
    assert {p.kind for p in module.sharding_plan.tables.values()} == {"row_wise"}
    assert not any(isinstance(m, EmbeddingBagCollection) for m in module.network.modules())
    module.eval()
    with torch.no_grad():
        module._eval_step(random_batch(schema, 8), module.val_metrics, "val")
    assert module._sharded_eval_steps == 1


def test_plan_mismatches_are_errors_naming_the_table():
    plan = one_rank_plan(("table_wise", "table_wise"))
    with pytest.raises(ValueError, match="world_size 2"):
        ShardedEmbeddingBagCollection(TABLES, ShardingPlan(2, plan.tables))
    with pytest.raises(ValueError, match="no placement for table 'tb'"):
        ShardedEmbeddingBagCollection(TABLES, ShardingPlan(1, {"ta": plan.tables["ta"]}))
    wrong = ShardingPlan(1, {"ta": plan.tables["ta"], "tb": TablePlacement("table_wise", 50, 8, [0])})
    with pytest.raises(ValueError, match=r"table 'tb' is 50x4, but its placement is for 50x8"):
        ShardedEmbeddingBagCollection(TABLES, wrong)
    with pytest.raises(ValueError, match="fused_optimizer"):
        ShardedEmbeddingBagCollection(TABLES, plan, fused_optimizer=None)


def test_out_of_range_id_has_the_single_process_message():
    kjt = features()
    values = kjt.values().clone()
    values[kjt.offset_per_key()[1] + 1] = 37  # the second id of fa
    bad = KeyedJaggedTensor(kjt.keys(), values, lengths=kjt.lengths())
    with pytest.raises(RuntimeError) as single:
        EmbeddingBagCollection(TABLES, fused_optimizer="sgd").forward_dict(bad)
    sharded = ShardedEmbeddingBagCollection(TABLES, one_rank_plan(("row_wise", "column_wise")), fused_optimizer="sgd")
    with pytest.raises(RuntimeError) as caught:
        sharded.forward_dict(bad)
    assert str(single.value).splitlines()[0] in str(caught.value)


def test_lookups_equal_one_process_and_checkpoints_reshard_two_to_one_and_four(tmp_path):
    """Two spawns (one per world size) run every case: at W=2 the lookups (forward, backward, fused steps), the
    deferred network and 3 steps saved; resumed at W=1 here; at W=4 the lookups and the resume."""
    run_worker("sharded_worker.py", "lookup,save", "2", str(tmp_path), timeout=300)
    from lattice.train.sharded_checkpoint import saved_plans

    plans = saved_plans(str(tmp_path / "ckpt"))
    assert plans[""].world_size == 2 and plans[""].tables["ta"].kind == "row_wise"
    import sharded_worker  # W=1 needs no process group: resumed here, without another process's start-up

    sharded_worker.steps_state("resume W=1", sharded_worker.resume_plan(1), 0, 1, None, 3, 6, str(tmp_path), load=True)
    run_worker("sharded_worker.py", "lookup,resume", "4", str(tmp_path), timeout=300)


def test_a_dying_rank_stops_the_others_with_the_peer_failure_line(tmp_path):
    proc = run_worker("sharded_worker.py", "die", "2", str(tmp_path), timeout=180)
    assert "exit codes [3, 1]" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "lattice: stopping (rank 0 of 2, global step 0): a collective with the other ranks failed" in proc.stderr


def test_sharding_option_errors_name_the_key_or_file(tmp_path):
    from lattice.train.sharding import ShardingConfig, _make_plan

    assert ShardingConfig.from_value(None) is None
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['memory'\]"):
        ShardingConfig.from_value({"plan": "auto", "memory": "1GiB"})
    with pytest.raises(ValueError, match="plan: auto needs memory_per_rank"):
        ShardingConfig.from_value({"plan": "auto"})
    with pytest.raises(ValueError, match="no plan file 'missing.yaml'"):
        ShardingConfig.from_value({"plan": "missing.yaml"})
    path = tmp_path / "plan.yaml"
    import yaml

    path.write_text(yaml.safe_dump(one_rank_plan(("row_wise", "table_wise")).to_dict()))
    config = ShardingConfig.from_value({"plan": str(path)})
    assert _make_plan(None, config, TABLES, {}, 1, None).tables["ta"].kind == "row_wise"
    with pytest.raises(ValueError, match=r"plan.yaml is for world_size 1, but this run has 2 ranks"):
        _make_plan(None, config, TABLES, {}, 2, None)
