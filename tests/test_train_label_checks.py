"""ConditionalLabelCheck (training) and EvalConditionalLabelCheck (validation, test): a task_parents child
labelled only on its parent's positives is refused, naming both tasks; joint labels and domains without the
child pass; contradicting training rows are reported."""
import warnings

import pytest
import torch

from _models import make_schema, random_batch
from lattice.models import LatticeNetwork
from lattice.train.module import LatticeModule
from lattice.train.label_checks import ConditionalLabelCheck, ConditionalLabelError, EvalConditionalLabelCheck

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = [("conversion", "click", 1, 0)]


def _labels(n, seed, conditional=False, child_absent=False, contradictions=0):
    g = torch.Generator().manual_seed(seed)
    click = (torch.rand(n, generator=g) < 0.2).float()
    conversion = click * (torch.rand(n, generator=g) < 0.5).float()
    conversion[:contradictions] = 1.0
    click[:contradictions] = 0.0
    labels = torch.stack([click, conversion], 1)
    mask = torch.ones(n, 2, dtype=torch.bool)
    if conditional:
        mask[:, 1] = click > 0.5
    if child_absent:
        mask[:, 1] = False
    return labels * mask, mask


def _check(min_rows=64):
    return ConditionalLabelCheck(PAIRS, reduce=lambda t: t, min_rows=min_rows)


def test_joint_labels_close_the_check_after_the_first_batch():
    check = _check()
    check.update(*_labels(200, 0))
    assert check.open == [False]
    for seed in range(1, 4):
        check.update(*_labels(200, seed, conditional=True))  # never examined again
    messages = []
    check.warn_contradictions(messages.append)
    assert messages == []


def test_conditional_labels_are_refused_once_enough_rows_are_seen():
    check = _check(min_rows=64)
    labels, mask = _labels(200, 0, conditional=True)
    both = int(mask[:, 1].sum())
    assert 0 < both < 64
    check.update(labels, mask)  # too few rows with both labels to conclude
    assert check.open == [True]
    with pytest.raises(ConditionalLabelError, match="'conversion' looks labelled only where 'click' is positive"):
        for seed in range(1, 10):
            check.update(*_labels(200, seed, conditional=True))


def test_a_domain_without_the_child_task_is_not_evidence():
    check = _check(min_rows=16)
    for seed in range(5):
        check.update(*_labels(100, seed, child_absent=True))
    assert check.open == [True]
    check.update(*_labels(100, 9))
    assert check.open == [False]


def test_contradicting_rows_are_counted_and_reported_per_epoch():
    check = _check()
    check.update(*_labels(300, 0, contradictions=3))
    check.update(*_labels(300, 1, contradictions=2))
    messages = []
    check.warn_contradictions(messages.append)
    assert len(messages) == 1 and messages[0].startswith("task_parents: 5 of ")
    assert "'conversion' training labels this epoch have a negative 'click'" in messages[0]
    check.warn_contradictions(messages.append)  # reset after reporting
    assert len(messages) == 1


def test_lattice_module_runs_the_check_in_training_steps():
    schema = make_schema()
    network = LatticeNetwork(schema, dim=8, num_layers=1, task_parents={"conversion": "click"})
    module = LatticeModule(network)
    assert module.label_check is not None and module.label_check.pairs == [("conversion", "click", 1, 0)]
    module.label_check.min_rows = 8
    batch = random_batch(schema, 64)
    click, conv = 0, 1
    batch.labels[:, click] = (torch.arange(64) % 3 == 0).float()
    batch.label_mask[:, [click, conv]] = True
    batch.label_mask[:, conv] = batch.labels[:, click] > 0.5  # labelled on clicks only
    batch.labels = batch.labels * batch.label_mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        with pytest.raises(ConditionalLabelError, match="drop 'conversion' from task_parents"):
            module.training_step(batch, 0)
    assert LatticeModule(LatticeNetwork(schema, dim=8, num_layers=1)).label_check is None


def _eval_check(min_rows=64, reduce=lambda t: t):
    return EvalConditionalLabelCheck(PAIRS, reduce=reduce, min_rows=min_rows)


def test_eval_check_decides_once_per_epoch_on_all_its_rows():
    check = _eval_check(min_rows=64)
    for seed in range(6):
        check.update(*_labels(200, seed, conditional=True))  # never raises mid-epoch
    with pytest.raises(ConditionalLabelError, match=r"in all \d+ test rows with both labels present 'click' is always"):
        check.finish("test")
    check.finish("test")  # the counts were reset: an empty epoch decides nothing


def test_eval_check_passes_joint_labels_small_epochs_and_absent_children():
    check = _eval_check(min_rows=64)
    for seed in range(3):
        check.update(*_labels(200, seed))
        check.update(*_labels(200, seed, child_absent=True))
    check.finish("validation")
    labels, mask = _labels(100, 7, conditional=True)
    assert 0 < int(mask[:, 1].sum()) < 64
    check.update(labels, mask)
    check.finish("validation")  # too few rows to conclude


def test_eval_check_sums_ranks_with_different_batch_counts():
    """A rank that saw no batch at all still takes part in the reduction and raises with the others."""
    busy = _eval_check(min_rows=64)
    for seed in range(4):
        busy.update(*_labels(200, seed, conditional=True))
    busy_counts = busy._counts.clone()
    idle = _eval_check(min_rows=64, reduce=lambda t: t + busy_counts.to(t.dtype))
    with pytest.raises(ConditionalLabelError, match="validation rows"):
        idle.finish("validation")
    # and one conditional rank cannot outvote another rank's negative parents
    joint = _eval_check(min_rows=64)
    joint.update(*_labels(200, 9))
    joint_counts = joint._counts.clone()
    mixed = _eval_check(min_rows=64, reduce=lambda t: t + joint_counts.to(t.dtype))
    for seed in range(4):
        mixed.update(*_labels(200, seed, conditional=True))
    mixed.finish("validation")


def test_lattice_module_refuses_conditional_labels_in_validation_and_test():
    schema = make_schema()
    module = LatticeModule(LatticeNetwork(schema, dim=8, num_layers=1, task_parents={"conversion": "click"}))
    module.eval_label_check.min_rows = 8
    batch = random_batch(schema, 64)
    click, conv = 0, 1
    batch.labels[:, click] = (torch.arange(64) % 3 == 0).float()
    batch.label_mask[:, [click, conv]] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        with torch.no_grad():
            module.validation_step(batch, 0)  # joint labels: the epoch passes
            module.on_validation_epoch_end()
            batch.label_mask[:, conv] = batch.labels[:, click] > 0.5  # labelled on clicks only
            batch.labels = batch.labels * batch.label_mask
            module.test_step(batch, 0)
            with pytest.raises(ConditionalLabelError, match="in all 22 test rows"):
                module.on_test_epoch_end()
    assert LatticeModule(LatticeNetwork(schema, dim=8, num_layers=1)).eval_label_check is None
