"""examples/cpp_predict: the C++ runner, built with CMake against the installed torch, loads liblattice_ops.so
and a lattice AOTInductor package and scores a batch saved by Python; its probabilities equal Python's
Predictor's on the same Parquet rows. Skipped only when no C++ compiler or no CMake is found."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from _models import SMALL_NETWORK_ARGS
from lattice.data.synthetic import SyntheticConfig, SyntheticWorld
from lattice.models import LatticeNetwork
from lattice.ops import library_path
from lattice.serve.export import export_package
from lattice.serve.predictor import Predictor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp_predict"
WORLD = {"num_users": 40, "num_items": 30, "seed": 5, "domains": [{"name": "feed", "rows": 80}]}
ROWS = 37

pytestmark = pytest.mark.slow


def _tools():
    cmake = shutil.which("cmake")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    missing = [what for what, found in (("CMake", cmake), ("a C++ compiler (c++, g++, clang++ or $CXX)", cxx))
               if not found]
    if missing:
        pytest.skip(f"building examples/cpp_predict needs {' and '.join(missing)}, not found on PATH")
    return cmake, cxx


def _save_batch_main():
    """examples/cpp_predict/save_batch.py's command line, run in this process."""
    spec = importlib.util.spec_from_file_location("cpp_predict_save_batch", EXAMPLE / "save_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """The built cpp_predict executable (its CMake build directory under pytest's tmp)."""
    cmake, cxx = _tools()
    build = tmp_path_factory.mktemp("cpp_predict_build")
    configure = [cmake, "-S", str(EXAMPLE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DCMAKE_CXX_COMPILER={cxx}"]
    for cmd in (configure, [cmake, "--build", str(build), "-j", "2"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return build / "cpp_predict"


def test_cpp_runner_scores_like_the_python_predictor(runner, tmp_path):
    world = SyntheticWorld(SyntheticConfig.from_dict(WORLD))
    world.write(str(tmp_path / "world"), overwrite=True)
    rows = sorted((tmp_path / "world").rglob("*.parquet"))[0]
    torch.manual_seed(0)
    # concat: AOTInductor miscompiles the MaskNet merge of parallel sequence features (docs/serving.md)
    net = LatticeNetwork(world.schema(), **{**SMALL_NETWORK_ARGS[LatticeNetwork], "num_layers": 1},
                         sequence_merge="concat")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    package, manifest = export_package(net.eval(), tmp_path / "model.pt2", log=None)

    expected = Predictor.from_package(package).predict(pq.read_table(rows).slice(0, ROWS))
    _save_batch_main()([str(package), str(rows), str(tmp_path / "batch.pt"), "--rows", str(ROWS)])
    res = subprocess.run([str(runner), library_path(), str(package), str(tmp_path / "batch.pt"),
                          str(tmp_path / "probs.pt")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"cpp_predict failed ({res.returncode}):\n{res.stderr[-3000:]}"
    assert "liblattice_ops: " in res.stderr

    got = torch.load(tmp_path / "probs.pt")
    want = torch.from_numpy(np.stack([expected.column(t).to_numpy() for t in manifest.task_names], axis=1))
    assert got.shape == (ROWS, len(manifest.task_names))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    printed = torch.tensor([[float(x) for x in line.split()] for line in res.stdout.splitlines()])
    torch.testing.assert_close(printed, got, rtol=0, atol=1e-7)


def test_cpp_runner_reports_a_missing_op_library(runner, tmp_path):
    res = subprocess.run([str(runner), str(tmp_path / "nope.so"), "model.pt2", "batch.pt"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and "cpp_predict: error: cannot load" in res.stderr and "nope.so" in res.stderr
