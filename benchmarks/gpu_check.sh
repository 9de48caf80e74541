#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build lattice with its CUDA kernels, run the CUDA tests (real GPU and
# emulated), the compile/resource report, and the CUDA kernel benchmarks; print their tables.
# Usage: benchmarks/gpu_check.sh [--quick]    (--quick: smoke-sized benchmarks)
# Needs a CUDA build of torch and nvcc (CUDA_HOME). Writes benchmarks/results/*_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=${1:-}
echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no GPU: install a CUDA build of torch')"

echo "== build (LATTICE_FORCE_CUDA=1)"
LATTICE_FORCE_CUDA=1 pip install --no-build-isolation -e . 2>&1 | tail -n 3
python -c "import sys; from lattice.ops import _library as l; sys.exit(0 if l.has_cuda_kernels() else 'built without CUDA kernels')"

echo "== ptxas resource report (sm_80, sm_90)"
.ci/check_cuda.sh || echo "(compile check failed; see above)"

echo "== CUDA tests (GPU)"
shopt -s nullglob
gpu_tests=(tests/test_*cuda*.py)
python -m pytest -q "${gpu_tests[@]}" tests/cuda_emu

echo "== CUDA kernel benchmarks"
args=()
[[ "$QUICK" == "--quick" ]] && args=(--smoke)
for b in benchmarks/bench_*_cuda.py; do
  echo "-- $b"
  python "$b" ${args[@]+"${args[@]}"}
done
