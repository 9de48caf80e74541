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
