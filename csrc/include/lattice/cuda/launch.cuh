// The one place kernel-launch syntax lives. Launchers in csrc/cuda/*.cu call
//   lattice::cuda::launch(kernel, grid, block, shared_bytes, stream, args...);
// Under nvcc this is a real <<<>>> launch followed by a launch-error check. Under the CPU execution
// emulator (LATTICE_CUDA_EMULATION, see csrc/testing/), the emulator provides a `launch` with the same
// signature that runs the kernel body on host threads, so the .cu kernel code stays the single source.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>

#ifndef LATTICE_CUDA_EMULATION
#include <cuda_runtime.h>

namespace lattice {
namespace cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lattice CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

template <typename... KernelArgs, typename... Args>
inline void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t stream, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // nothing to do (e.g. an empty batch)
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace cuda
}  // namespace lattice
#endif  // LATTICE_CUDA_EMULATION
