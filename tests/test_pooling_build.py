"""The compiled kernels are built and linked with OpenMP (cpp_extension adds no -fopenmp by itself)."""
import shutil
import subprocess
import sys

import pytest

import lattice._C


def _needed(path: str) -> list[str]:
    for tool, args in (("readelf", ["-d"]), ("objdump", ["-p"])):
        exe = shutil.which(tool)
        if exe:
            out = subprocess.run([exe, *args, path], capture_output=True, text=True, check=True).stdout
            return [line.split("[")[1].split("]")[0] if "[" in line else line.split()[-1]
                    for line in out.splitlines() if "NEEDED" in line]
    pytest.skip("neither readelf nor objdump is installed")


def test_extension_links_the_openmp_runtime():
    needed = _needed(lattice._C.__file__)
    assert any(lib.startswith("libgomp") or lib.startswith("libiomp") or lib.startswith("libomp") for lib in needed), (
        f"{lattice._C.__file__} does not link an OpenMP runtime; NEEDED = {needed}"
    )


# Functions every static copy of libstdc++ brings along, which an extension must take from the shared library
# torch uses: a second copy has its own std::locale ids, and streaming a number (any TORCH_CHECK message with
# a value in it) then crashes the process.
_CXX_RUNTIME_SYMBOLS = ("_ZNSo9_M_insertIlEERSoT_", "_ZNSt6locale7classicEv", "_ZNSt8ios_base4InitC1Ev")


def test_extension_takes_the_cxx_runtime_from_the_shared_library():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not installed")
    out = subprocess.run([nm, "--defined-only", lattice._C.__file__], capture_output=True, text=True).stdout
    defined = {line.split()[-1] for line in out.splitlines() if line.strip()}
    copied = [s for s in _CXX_RUNTIME_SYMBOLS if s in defined]
    assert not copied, (
        f"{lattice._C.__file__} carries its own copy of libstdc++ (defines {copied}); link it against the shared "
        "libstdc++.so (setup.py's link flags)"
    )
    assert "libstdc++.so.6" in _needed(lattice._C.__file__)


def test_an_error_message_with_numbers_is_raised_not_crashed():
    """The symptom of a second libstdc++: the first validation error that streams an integer segfaults. In a
    child process, so that a crash is reported as this test's failure."""
    code = (
        "import torch, lattice\n"
        "try:\n"
        "    torch.ops.lattice.jagged_embedding_pool(torch.zeros(4, 2), torch.tensor([0, 4]),\n"
        "        torch.zeros(3, dtype=torch.int64), torch.tensor([0, 3, 2]), 0, None)\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit status {run.returncode}: {run.stderr[-2000:]}"
    # A second libstdc++ may also just drop the numbers (the stream fails instead of crashing).
    assert "offsets[1] = 3 > offsets[2] = 2" in run.stdout, run.stdout
