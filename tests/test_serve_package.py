"""Serving packages: AOTInductor compile, load and score for LatticeNetwork and a distillation student (equal to
the eager module within 1e-5, lattice's custom ops running inside the package), and the refusals of a package
built by another lattice or torch version or for another schema. Other network classes, and int8 packages per
class, compile behind ``slow`` and LATTICE_TEST_AOTI_ALL=1 (a compile takes minutes on 2 busy cores)."""
import os
import re

import pytest
import torch
import yaml

import lattice
from _models import make_schema
from lattice.serve.export import export_package, manifest_of, verify_package
from lattice.serve.inference import InferenceModule
from lattice.serve.inputs import random_inputs
from lattice.serve.package import PackageError, read_package, side_paths, write_side_files
from test_serve_export import MODELS, batch_schema


def _load_and_compare(model, tmp_path, quantization="none"):
    path, manifest = export_package(model, tmp_path / "model.pt2", log=None, quantization=quantization)
    schema_path, manifest_path = side_paths(path)
    assert schema_path.name == "model.schema.yaml" and manifest_path.name == "model.manifest.yaml"
    schema, manifest = read_package(path)
    assert schema == batch_schema(model) and manifest.lattice_version == lattice.__version__
    assert manifest.task_names == [t.name for t in schema.tasks] and manifest.quantization == quantization
    module = InferenceModule(model, quantization)
    runner = torch._inductor.aoti_load_package(str(path))
    for B, seed in ((1, 0), (7, 1), (513, 2)):
        x = random_inputs(schema, B, seed=seed, teacher_embedding_dim=module.teacher_embedding_dim)
        with torch.no_grad():
            expected = module(*x)
        got = runner(*x)
        got = got[0] if isinstance(got, (list, tuple)) else got
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    return manifest


def test_aoti_package_lattice_network(tmp_path):
    model = MODELS["LatticeNetwork"]()
    manifest = _load_and_compare(model, tmp_path)
    assert manifest.network_class == "lattice.models.lattice_network.LatticeNetwork"
    # export_package verifies the compiled package against the eager model: another model's scores are refused
    other = InferenceModule(model)
    with torch.no_grad():
        other.net.network.heads.biases[-1].add_(0.5)
    assert verify_package(tmp_path / "model.pt2", InferenceModule(model)) <= 1e-5
    with pytest.raises(PackageError, match=r"differs from the eager model by .* at batch 1"):
        verify_package(tmp_path / "model.pt2", other)


def test_aoti_package_student(tmp_path):
    manifest = _load_and_compare(MODELS["student"](), tmp_path)
    assert manifest.network_class == "lattice.models.baselines.SharedBottom"  # the shipped student's class


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATTICE_TEST_AOTI_ALL") != "1",
                    reason="an AOTInductor compile per class takes minutes; set LATTICE_TEST_AOTI_ALL=1")
@pytest.mark.parametrize("name", [n for n in MODELS if n not in ("LatticeNetwork", "student")])
def test_aoti_package_other_classes(name, tmp_path):
    _load_and_compare(MODELS[name](), tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LATTICE_TEST_AOTI_ALL") != "1",
                    reason="an AOTInductor compile per class takes minutes; set LATTICE_TEST_AOTI_ALL=1")
@pytest.mark.parametrize("name", ["LatticeNetwork", "student", "student_ktap"])
def test_aoti_package_int8(name, tmp_path):
    """int8 tables in the package (test_serve_cli.py compiles one in every run, through lattice export)."""
    _load_and_compare(MODELS[name](), tmp_path, quantization="int8")


@pytest.fixture()
def fake_package(tmp_path):
    """Side files of a real export (no compile: these checks read only the side files)."""
    model = MODELS["DLRM"]()
    module = InferenceModule(model)
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not compiled")
    write_side_files(path, module.schema, manifest_of(module, "lattice.models.baselines.DLRM"))
    return path, module.schema


def test_other_lattice_or_torch_version_is_refused_naming_both(fake_package):
    path, schema = fake_package
    assert read_package(path)[0] == schema
    _, manifest_path = side_paths(path)
    raw = yaml.safe_load(manifest_path.read_text())
    manifest_path.write_text(yaml.safe_dump({**raw, "lattice_version": "0.0.1"}))
    this = re.escape(lattice.__version__)
    with pytest.raises(PackageError, match=rf"exported with lattice 0\.0\.1, but this is lattice {this}"):
        read_package(path)
    manifest_path.write_text(yaml.safe_dump({**raw, "torch_version": "1.0.0"}))
    this = re.escape(str(torch.__version__))
    with pytest.raises(PackageError, match=rf"compiled with torch 1\.0\.0, but this is torch {this}"):
        read_package(path)


def test_other_schema_is_refused_naming_both(fake_package):
    path, schema = fake_package
    other = make_schema(num_sparse=3)
    with pytest.raises(PackageError, match=rf"for schema {schema.fingerprint()}, but the expected schema is "
                                           rf"{other.fingerprint()}: the package's features are"):
        read_package(path, expected_schema=other)
    schema_path, _ = side_paths(path)
    other.to_yaml(schema_path)  # the schema file swapped after export
    with pytest.raises(PackageError, match=rf"fingerprint {other.fingerprint()}\) is not the schema .* "
                                           rf"\(fingerprint {schema.fingerprint()}\)"):
        read_package(path)
    schema_path.unlink()
    with pytest.raises(PackageError, match="model.schema.yaml' not found"):
        read_package(path)
