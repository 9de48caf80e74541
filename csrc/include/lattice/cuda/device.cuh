// Device-side helpers shared by lattice's CUDA kernels; valid under nvcc and under the CPU emulator
// (csrc/testing/cuda_emu, LATTICE_CUDA_EMULATION).
#pragma once

#ifndef LATTICE_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

namespace lattice {
namespace cuda {

// The block's dynamic shared memory (the `shared_bytes` of launch()), 16-byte aligned. Use this instead of
// writing `extern __shared__ T name[];` in a kernel: the emulator cannot express that declaration, and its
// version of this buffer is guarded (an out-of-bounds access is reported) and poisoned for every block.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#ifdef LATTICE_CUDA_EMULATION
  return static_cast<T*>(::lattice_emu::dynamic_shared_base());
#else
  extern __shared__ __align__(16) unsigned char lattice_dynamic_shared_memory[];
  return reinterpret_cast<T*>(lattice_dynamic_shared_memory);
#endif
}

// Lane index within the warp (threads are numbered x-fastest, as the hardware does).
__device__ __forceinline__ unsigned lane_id() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u;
}

}  // namespace cuda
}  // namespace lattice
