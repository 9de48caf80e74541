"""The compiled kernels are built and linked with OpenMP (cpp_extension adds no -fopenmp by itself)."""
import shutil
import subprocess

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
