"""The CPU kernels under AddressSanitizer (.ci/asan.sh): an instrumented build of lattice._C in a temporary copy of
the tree runs the pooling and attention kernel tests, and any out-of-bounds access or use-after-free in a kernel,
its validation or its error path fails this test with ASan's report. The script first checks that a planted
overflow is reported, so a pass means the run was watched."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")


def _libasan():
    if shutil.which(CXX) is None:
        return None
    out = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.slow
@pytest.mark.skipif(_libasan() is None, reason="no AddressSanitizer runtime (libasan) for the C++ compiler")
def test_cpu_kernels_are_clean_under_address_sanitizer():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run([str(REPO / ".ci" / "asan.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert "asan: no errors" in proc.stdout
