"""configs/teacher.yaml and configs/student.yaml name only arguments that exist (the classes' ``__init__``
signatures), so a renamed argument fails here rather than in a user's run."""
import inspect
import os

import pytest
import yaml

from lattice.dotted import import_dotted, init_arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    with open(os.path.join(ROOT, "configs", name)) as f:
        return yaml.safe_load(f)


def _class(path):
    return import_dotted(path, "class_path")


def _check(section, where, default=None):
    """``section`` is ``{class_path, init_args}`` or, for the CLI's own model/data classes, the init
    arguments themselves (``default`` names the class then)."""
    if "class_path" in section:
        cls, args = _class(section["class_path"]), section.get("init_args") or {}
    else:
        cls, args = _class(default), section
    unknown = sorted(set(args) - (init_arguments(cls) or set(args)))
    assert not unknown, f"{where}: {cls.__name__} has no argument(s) {unknown}"
    return cls, args


@pytest.mark.parametrize("name", ["teacher.yaml", "student.yaml"])
def test_config_arguments_exist(name):
    config = _load(name)
    _check(config["data"], f"{name} data", "lattice.data.LatticeDataModule")
    for i, cb in enumerate((config.get("trainer") or {}).get("callbacks") or []):
        _check(cb, f"{name} trainer.callbacks[{i}]")
    _, model_args = _check(config["model"], f"{name} model", "lattice.train.module.LatticeModule")
    _check(model_args["optimizer"], f"{name} model.optimizer")
    _check(model_args["network"], f"{name} model.network")
    if "prediction_writer" in config:
        from lattice.train.writer import ParquetPredictionWriter

        unknown = set(config["prediction_writer"]) - set(inspect.signature(ParquetPredictionWriter).parameters)
        assert not unknown


def test_student_reads_the_teachers_logged_outputs():
    teacher, student = _load("teacher.yaml"), _load("student.yaml")
    assert student["data"]["teacher_paths"] == teacher["prediction_writer"]["output_dir"]
    assert teacher["prediction_writer"]["write_embedding"] is True
    assert student["model"]["class_path"] == "lattice.distill.DistillationModule"
    # same schema and split seed: domain indices line up, the teacher's validation rows stay unseen
    assert student["data"].get("schema") == teacher["data"].get("schema")
    assert student["data"].get("seed", 0) == teacher["data"].get("seed", 0)


def _build(section, schema):
    cls = _class(section["class_path"])
    return cls(schema, **(section.get("init_args") or {}))


def test_student_is_a_cheaper_network_than_the_teacher():
    """The shipped student exists to be served: over the planted world's schema it costs at most a fifth of the
    teacher's FLOPs per sample at full histories, and its trunk attends over no history event (a LatticeNetwork
    student spent most of its serving time in attention and served only about 2x the teacher's rows/s)."""
    from lattice.data.synthetic import SyntheticWorld

    schema = SyntheticWorld().schema()
    teacher = _build(_load("teacher.yaml")["model"]["network"], schema)
    student = _build(_load("student.yaml")["model"]["init_args"]["network"], schema)
    full = teacher.default_sequence_length()
    assert student.default_sequence_length() == full
    ratio = student.flops_per_sample(full) / teacher.flops_per_sample(full)
    assert ratio <= 0.2, ratio
    # the trunk's cost does not grow with the history (the mean-pooled token only), unlike the teacher's
    assert student.trunk_flops(full) == student.trunk_flops(1.0)
    assert teacher.trunk_flops(full) > teacher.trunk_flops(1.0)
    assert student.processor.match is not None  # the exact candidate-in-history signal attention would learn
