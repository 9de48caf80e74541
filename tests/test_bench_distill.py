"""The distillation benchmark's own parts (lattice.benchmark.distill): the AUC of the logged teacher outputs, NE, its
world; and benchmarks/bench_distill.py's argument checks (the cross-fit itself is lattice.distill.crossfit's,
tests/test_distill_crossfit.py). No model is trained here."""
import numpy as np
import pytest

from lattice.benchmark import distill as study

from _distill import folded_teacher_outputs
from _reference_metrics import pairwise_auc


@pytest.fixture(scope="module")
def bench():
    from benchmarks import bench_distill

    return bench_distill


def test_logged_auc_joins_by_example_id(tmp_path):
    data = folded_teacher_outputs(tmp_path)
    click, score, conv = data["click"], data["score"], data["conv"]
    got = study.logged_auc(data["folds"], data["student"], ["click", "conversion"])
    assert got["click"] == pytest.approx(pairwise_auc(score.astype(np.float32), click), abs=1e-12)
    keep = np.isfinite(conv)
    assert got["conversion"] == pytest.approx(pairwise_auc(-score.astype(np.float32)[keep], conv[keep]), abs=1e-12)
    assert got["click"] > 0.6  # the score carries the label


def test_world_config_carries_rate_drift():
    assert study.world_config(True, 0, 0.6).rate_drift == 0.0
    assert study.world_config(True, 0, 0.6, study.RATE_DRIFT).rate_drift == study.RATE_DRIFT > 0


def test_normalized_entropy():
    rng = np.random.default_rng(1)
    n = 300
    y = (rng.random(n) < 0.2).astype(float)
    z = rng.normal(-1.5, 1.0, n) + y
    logloss = np.mean(-(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z)))))
    r = y.mean()
    assert study.normalized_entropy(z, y) == pytest.approx(logloss / -(r * np.log(r) + (1 - r) * np.log(1 - r)))
    # the base rate itself scores NE 1; nan labels are skipped
    assert study.normalized_entropy(np.full(n, np.log(r / (1 - r))), y) == pytest.approx(1.0)
    assert study.normalized_entropy(np.append(z, 5.0), np.append(y, np.nan)) == pytest.approx(study.normalized_entropy(z, y))


@pytest.mark.parametrize("argv", [["--variants", "labels,nope"], ["--variants", ","], ["--aux-hidden-dims", "16,x"],
                                  ["--aux-hidden-dims", "0"], ["--adapter-half-life-days", "-1"], ["--distill-weights", "3,x"]])
def test_bad_arguments_are_refused_before_any_work(bench, argv, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    err = capsys.readouterr().err
    assert argv[0] in err


def test_student_network_option_builds_the_shipped_students_class():
    """``--student-network SharedBottom`` (docs/distillation.md): the study's student is that class at the study's
    width, and the auxiliary head can share its serving heads' hidden layer (the study's default aux_input)."""
    from lattice.data.synthetic import SyntheticWorld
    from lattice.distill import DistillationModule
    from lattice.models import SharedBottom

    schema = SyntheticWorld(study.world_config(True, 0, 0.6)).schema()
    network = study.network(schema, "SharedBottom", "student", True)
    assert type(network) is SharedBottom and network.dim == 8
    module = DistillationModule(network, distillation="aux_head", aux_input="head_hidden", aux_hidden_dims=[])
    assert module.serving_model().network is network and module.aux_head is not None
