#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer: builds lattice._C with LATTICE_SANITIZE=address in a temporary copy of
# the working tree (the checkout's own build is left alone), then runs the kernel tests with libasan and
# libstdc++ preloaded (Python itself is not instrumented). Any heap/stack overflow or use-after-free in a kernel,
# its validation or its error path fails the run with ASan's report. The build uses -march=native like the normal
# one, so it checks the SIMD paths (AVX2, AVX-512) of the machine it runs on.
# Usage: .ci/asan.sh [pytest args...]   (default: the pooling and attention kernel tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CXX_CMD=${CXX:-g++}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Tracked and untracked-but-not-ignored files: what the checkout would build. Outside a git checkout, the
# sources and tests without build outputs.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$tmp/"
else
  tar --exclude='*.so' --exclude='__pycache__' -cf - setup.py pyproject.toml README.md lattice csrc tests configs |
    tar -xf - -C "$tmp/"
fi
cd "$tmp"
echo "== build (LATTICE_SANITIZE=address) in $tmp"
if ! LATTICE_SANITIZE=address LATTICE_FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PYTHON" setup.py -q build_ext --inplace >build.log 2>&1; then
  tail -n 40 build.log
  echo "asan: build failed"
  exit 1
fi

libasan=$("$CXX_CMD" -print-file-name=libasan.so)
[[ -f "$libasan" ]] || { echo "asan: libasan.so not found (gcc's sanitizer runtime)"; exit 2; }
# The libstdc++ torch runs with (the one setup.py links against): a toolchain may offer only its static archive.
libstdcxx=$("$PYTHON" -c 'import torch
print(next(line.split()[-1] for line in open("/proc/self/maps") if "/libstdc++.so" in line))')
# libstdc++ preloaded with libasan so ASan's __cxa_throw interceptor finds the real one (error paths throw).
preload="$libasan $libstdcxx"
# Self-check of the harness: an instrumented heap overflow, loaded the way the tests load lattice._C, must
# leave a report where the run below looks for them; otherwise a clean run would prove nothing.
printf '#include <cstdlib>\nextern "C" int lattice_asan_canary(int i) { int* p = (int*)malloc(4 * sizeof(int)); p[i] = 1; int r = p[0]; free(p); return r; }\n' >canary.cpp
"$CXX_CMD" -shared -fPIC -O1 -fsanitize=address canary.cpp -o canary.so
LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0:log_path="$tmp/canary_report" \
  "$PYTHON" -c "import ctypes; ctypes.CDLL('./canary.so').lattice_asan_canary(4)" >/dev/null 2>&1 || true
if ! grep -qs "heap-buffer-overflow" "$tmp"/canary_report.*; then
  echo "asan: the harness self-check saw no report for a planted heap overflow; ASan is not working here"
  exit 2
fi

tests=("$@")
if [[ ${#tests[@]} -eq 0 ]]; then
  tests=(tests/test_pooling_forward.py tests/test_pooling_backward.py tests/test_pooling_errors.py
         tests/test_pooling_row_exchange.py tests/test_attention_op.py tests/test_nn_embedding.py -k "not compile")
fi
echo "== tests under ASan: ${tests[*]}"
status=0
LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path="$tmp/asan" \
  "$PYTHON" -m pytest -q -x -p no:cacheprovider "${tests[@]}" || status=$?
shopt -s nullglob
reports=("$tmp"/asan.*)
if ((${#reports[@]})); then
  cat "${reports[@]}" | head -n 80
  echo "asan: AddressSanitizer reported an error (above)"
  exit 1
fi
if ((status)); then
  echo "asan: the tests failed (exit $status)"
  exit "$status"
fi
echo "asan: no errors"
