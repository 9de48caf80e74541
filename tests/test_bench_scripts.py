"""Every benchmark runs as a script from any folder (``python benchmarks/bench_x.py``): its imports of the
library and of ``benchmarks._common`` resolve, and its command line parses (``--help``)."""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                 if os.path.basename(p).startswith(("bench_", "quality_ceiling")))


# One interpreter runs every script's ``--help`` as ``python benchmarks/<script>`` would (the script's folder first
# on sys.path, run as __main__): importing torch and lattice once instead of once per script.
_DRIVER = """
import contextlib, io, json, os, runpy, sys
folder, scripts, results = sys.argv[1], sys.argv[2:], {}
for script in scripts:
    path = os.path.join(folder, script)
    sys.argv, sys.path[0], out = [path, "--help"], folder, io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    except BaseException as error:  # noqa: BLE001 - reported per script
        code, out = repr(error), io.StringIO(repr(error))
    results[script] = [code, out.getvalue()[:2000]]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory):
    proc = subprocess.run([sys.executable, "-c", _DRIVER, os.path.join(ROOT, "benchmarks"), *SCRIPTS],
                          cwd=str(tmp_path_factory.mktemp("bench_help")), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script, help_runs):
    code, out = help_runs[script]
    assert code == 0, out
    assert "usage:" in out


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
