"""Every CUDA source compiles with nvcc for sm_80 and sm_90 (and the torch glue type-checks), on machines without
a GPU: runs .ci/check_cuda.sh, which also prints each kernel's registers, shared memory and spills."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"


@pytest.mark.slow
@pytest.mark.skipif(not NVCC.exists() and shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_for_sm80_and_sm90():
    env = dict(os.environ)
    if not NVCC.exists():
        env["NVCC"] = shutil.which("nvcc")
    proc = subprocess.run([str(REPO / ".ci" / "check_cuda.sh")], cwd=REPO, env=env, capture_output=True, text=True)
    print(proc.stdout)  # the ptxas resource table, in the test log
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
