"""Every benchmark runs as a script from any folder (``python benchmarks/bench_x.py``): its imports of the
library and of ``benchmarks._common`` resolve, and its command line parses (``--help``)."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                 if os.path.basename(p).startswith(("bench_", "quality_ceiling")))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def _private_names(path):
    """Private names a benchmark reaches for: ``lattice`` modules or names starting with ``_`` that it imports,
    and ``obj._name`` attributes of anything but itself (``self``) or torch."""
    import ast

    tree = ast.parse(open(path).read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lattice":
            parts = node.module.split(".") + [a.name for a in node.names]
            found += [p for p in parts if p.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names
                      if a.name.split(".")[0] == "lattice" and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if not (isinstance(base, ast.Name) and base.id in ("self", "torch")):  # its own, or torch's
                found.append(node.attr)
    return found


@pytest.mark.parametrize("script", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))))
def test_benchmarks_use_only_public_library_names(script):
    assert _private_names(os.path.join(ROOT, "benchmarks", script)) == []
