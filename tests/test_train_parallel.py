"""DDP and FSDP2 on CPU (2 processes, gloo) against a single process on the same global batches.

Tolerances: one epoch (8 steps) of float32 training; the 2-process runs sum each gradient in a different
order (per rank, then across ranks), so weights may differ from the single process by float32 rounding:
``atol = 2e-5``. Across ranks everything is bitwise identical. Metrics are computed over every rank's
validation rows, and the real Parquet reader gives every validation row to exactly one rank.
"""
from __future__ import annotations

import os

import pytest
import torch

from _workers import load, run_worker
from lattice.metrics import binary_auc

pytestmark = pytest.mark.slow
ATOL = 2e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    out = str(tmp_path_factory.mktemp("out"))
    run_worker("parallel_worker.py", "single", cache, out)  # also generates the world into the cache
    results = {"single": [load(os.path.join(out, "single-rank0.pt"))]}
    for mode in ("ddp", "fsdp"):
        run_worker("parallel_worker.py", mode, cache, out)
        results[mode] = [load(os.path.join(out, f"{mode}-rank{r}.pt")) for r in range(2)]
    return results


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_on_the_same_global_batch(runs, mode):
    single = runs["single"][0]
    for rank in runs[mode]:
        assert rank["world_size"] == 2 and rank["steps"] == single["steps"] > 0
        assert rank["state"].keys() == single["state"].keys()
        for name, want in single["state"].items():
            got = rank["state"][name]
            if want.is_floating_point():
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{mode} {name}: {m}")
            else:
                assert torch.equal(got, want), name
    # The training moved the embeddings (so the comparison above is not trivially of initial weights).
    assert any("weights" in n and (single["state"][n] != 0).any() for n in single["state"])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_replicas_are_identical_across_ranks(runs, mode):
    rank0, rank1 = runs[mode]
    tables = [n for n in rank0["state"] if ".weights." in n or ".optimizer_state." in n]
    assert tables, "no fused embedding tables in the model"
    for name in rank0["state"]:
        assert torch.equal(rank0["state"][name], rank1["state"][name]), f"{mode}: {name} differs across ranks"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_reader_and_metrics_cover_every_rank_exactly_once(runs, mode):
    single = runs["single"][0]
    rank0, rank1 = runs[mode]
    ids0, ids1 = set(rank0["val_ids"].tolist()), set(rank1["val_ids"].tolist())
    assert ids0 and ids1 and not ids0 & ids1, "a validation row was read by both ranks"
    assert len(ids0) == rank0["val_ids"].numel() and len(ids1) == rank1["val_ids"].numel()
    assert ids0 | ids1 == set(single["val_ids"].tolist()), "validation rows lost or invented across ranks"
    # The synced AUC is the AUC over both ranks' rows (not a mean of per-rank AUCs).
    logits = torch.cat([rank0["val_logits"], rank1["val_logits"]])
    labels = torch.cat([rank0["val_labels"], rank1["val_labels"]])
    masks = torch.cat([rank0["val_masks"], rank1["val_masks"]])
    for t, task in enumerate(["click", "like"]):
        m = masks[:, t]
        pooled = binary_auc(logits[m, t], labels[m, t])
        assert rank0["val"][f"{task}/auc"] == rank1["val"][f"{task}/auc"]
        assert rank0["val"][f"{task}/auc"] == pytest.approx(pooled, abs=1e-9)
        assert rank0["val"][f"{task}/count"] == int(m.sum())
