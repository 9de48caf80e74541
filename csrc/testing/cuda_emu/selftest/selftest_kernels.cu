// Kernels that exercise the emulator itself (tests/cuda_emu/test_emu_selftest.py): barriers, shared memory
// per block, warp collectives' lane semantics, mask checks, out-of-bounds detection, and a planted race.
// Emulation-only test code: the entry points below use the emulator's allocator.
#include "lattice/cuda/device.cuh"
#include "lattice/cuda/launch.cuh"

#include "../emu_entry.h"

namespace selftest {

// Barrier + dynamic shared memory: every thread reads two other threads' writes.
__global__ void barrier_kernel(const int* in, int* out, int mode) {
  int* s = lattice::cuda::dynamic_shared<int>();
  const int n = static_cast<int>(blockDim.x);
  const int t = static_cast<int>(threadIdx.x);
  const int base = static_cast<int>(blockIdx.x) * n;
  s[t] = in[base + t];
  if (mode == 0) __syncthreads();  // mode 1: the planted race, this barrier is missing
  out[base + t] = s[(t + 1) % n] + 10 * s[n - 1 - t];
}

// Tree reduction in shared memory; mode 1 drops the barrier inside the loop (a classic race).
__global__ void reduce_kernel(const float* in, float* out, int mode) {
  __shared__ float s[256];
  const int t = static_cast<int>(threadIdx.x);
  s[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int stride = static_cast<int>(blockDim.x) / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    if (mode == 0) __syncthreads();
  }
  if (mode != 0) __syncthreads();
  if (t == 0) out[blockIdx.x] = s[0];
}

// Static and dynamic shared memory are per block: each block sees only its own values, and dynamic shared
// memory starts poisoned (0xff bytes) in every block, not with the previous block's contents.
__global__ void shared_isolation_kernel(int* out, int* first_read) {
  __shared__ int tile[64];
  int* dyn = lattice::cuda::dynamic_shared<int>();
  const int t = static_cast<int>(threadIdx.x);
  first_read[blockIdx.x * blockDim.x + t] = dyn[t];
  __syncthreads();
  tile[t] = static_cast<int>(blockIdx.x) * 1000 + t;
  dyn[t] = static_cast<int>(blockIdx.x) * 1000 + 2 * t;
  __syncthreads();
  const int o = (t + 3) % static_cast<int>(blockDim.x);
  out[blockIdx.x * blockDim.x + t] = tile[o] + dyn[o] * 100000;
}

// __syncthreads_count / _and / _or and 2-D/3-D thread indexing.
__global__ void barrier_reduce_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  const int c = __syncthreads_count(t % 3 == 0);
  const int a = __syncthreads_and(t >= 0);
  const int o = __syncthreads_or(t == 5);
  const int z = __syncthreads_and(t != 7);
  out[t * 5 + 0] = c;
  out[t * 5 + 1] = a;
  out[t * 5 + 2] = o;
  out[t * 5 + 3] = z;
  out[t * 5 + 4] = static_cast<int>(threadIdx.x * 100 + threadIdx.y * 10 + threadIdx.z);
}

constexpr int kCollectiveResults = 25;

// Every warp collective with a few argument patterns; results[thread][k]. The Python test recomputes each
// from the CUDA/PTX definitions.
__global__ void collectives_kernel(const int* in, unsigned* results) {
  const int t = static_cast<int>(threadIdx.x);
  const unsigned lane = lattice::cuda::lane_id();
  const int v = in[t];
  unsigned* r = results + t * kCollectiveResults;
  const unsigned full = 0xffffffffu;
  r[0] = static_cast<unsigned>(__shfl_sync(full, v, 5));
  r[1] = static_cast<unsigned>(__shfl_sync(full, v, static_cast<int>(lane) + 3, 8));
  r[2] = static_cast<unsigned>(__shfl_sync(full, v, -1, 16));
  r[3] = static_cast<unsigned>(__shfl_up_sync(full, v, 3));
  r[4] = static_cast<unsigned>(__shfl_up_sync(full, v, 2, 8));
  r[5] = static_cast<unsigned>(__shfl_down_sync(full, v, 5));
  r[6] = static_cast<unsigned>(__shfl_down_sync(full, v, 3, 4));
  r[7] = static_cast<unsigned>(__shfl_xor_sync(full, v, 1));
  r[8] = static_cast<unsigned>(__shfl_xor_sync(full, v, 6, 8));
  r[9] = static_cast<unsigned>(__shfl_xor_sync(full, v, 16, 16));  // PTX: lanes of the upper segment read down
  r[10] = __ballot_sync(full, v & 1);
  r[11] = static_cast<unsigned>(__any_sync(full, v == 7));
  r[12] = static_cast<unsigned>(__all_sync(full, v >= 0));
  r[13] = __match_any_sync(full, v % 4);
  int pred = -1;
  r[14] = __match_all_sync(full, v % 4, &pred);
  r[15] = static_cast<unsigned>(pred);
  r[16] = __reduce_add_sync(full, static_cast<unsigned>(v));
  r[17] = static_cast<unsigned>(__reduce_min_sync(full, v - 10));
  r[18] = __reduce_max_sync(full, static_cast<unsigned>(v));
  r[19] = __reduce_or_sync(full, static_cast<unsigned>(v));
  // Sub-warp groups of 8 lanes with their own masks, as a group-per-bag kernel uses them.
  const unsigned group = 0xffu << (lane & ~7u);
  r[20] = static_cast<unsigned>(__shfl_sync(group, v, 2, 8));
  r[21] = __ballot_sync(group, v & 2);
  float f = static_cast<float>(v);
  for (int o = 4; o > 0; o /= 2) f += __shfl_xor_sync(group, f, o, 8);
  r[22] = static_cast<unsigned>(f);
  // Only even lanes take part.
  if ((lane & 1u) == 0) {
    r[23] = __ballot_sync(0x55555555u, v > 10);
  } else {
    r[23] = 0xdeadbeefu;
  }
  r[24] = static_cast<unsigned>(__shfl_down_sync(full, v, 33u));  // delta is taken mod 32

}

// Misuse of warp collectives: each mode must be reported.
__global__ void bad_mask_kernel(const int* in, int* out, int mode) {
  const int t = static_cast<int>(threadIdx.x);
  const unsigned lane = lattice::cuda::lane_id();
  int v = in[t];
  if (mode == 0) v = __shfl_sync(0x0000ffffu, v, 0);  // lanes 16-31 call with a mask that omits them
  if (mode == 1 && lane < 16) v = __shfl_sync(0xffffffffu, v, 0);  // lanes 16-31 never arrive
  if (mode == 2) {  // same mask, different collectives
    if (lane < 16) {
      v = __shfl_sync(0xffffffffu, v, 0);
    } else {
      v = static_cast<int>(__ballot_sync(0xffffffffu, v));
    }
  }
  if (mode == 7) v = __shfl_sync(lane < 16 ? 0xffffffffu : 0xffff0000u, v, static_cast<int>(lane & 16u));  // overlapping masks
  if (mode == 3) v = __shfl_sync(0xffffffffu, v, 0);  // launched with 48 threads: warp 1 has 16 lanes
  if (mode == 4 && lane < 16) v = __shfl_sync(0x0000ffffu, v, 20);  // reads lane 20, outside the mask
  if (mode == 5) {
    if (lane < 16) return;
    __syncwarp(0xffffffffu);  // names lanes that have exited
  }
  if (mode == 6) {
    if (t >= 16) return;  // threads exit before a barrier the others wait at
    __syncthreads();
  }
  out[t] = v;
}

__device__ int recurse(int depth, volatile char* sink) {
  char big[4096];
  for (int i = 0; i < 4096; ++i) big[i] = static_cast<char>(depth + i);
  sink[0] = big[depth % 4096];
  return depth > 1000000 ? 0 : recurse(depth + 1, sink) + big[64];
}

// Out-of-bounds accesses and other faults; each mode must be reported with the kernel and thread.
__global__ void fault_kernel(float* p, int n, int mode, int culprit) {
  const int t = static_cast<int>(threadIdx.x);
  __shared__ float tile[64];
  float* dyn = lattice::cuda::dynamic_shared<float>();
  tile[t % 64] = 0.0f;
  __syncthreads();
  if (t != culprit) return;
  volatile float sink = 0.0f;
  switch (mode) {
    case 0: sink = p[n]; break;             // read one element past the end
    case 1: p[n + 3] = 1.0f; break;          // write past the end
    case 2: sink = p[-1]; break;             // read before the start (caught exactly with align=start)
    case 3: sink = dyn[n]; break;            // dynamic shared memory, one past the end (n = its length)
    case 4: sink = tile[t + 64]; break;      // static __shared__ array index out of bounds
    case 5: p[n] = 2.0f; break;              // small overrun inside the alignment slack: canary check
    case 6: {                                // spin on a value no one writes: timeout
      volatile float* q = p;
      while (q[0] == 0.0f) {
      }
      break;
    }
    case 7: {
      volatile char s[1];
      recurse(0, s);
      break;
    }
    case 8: {
      volatile int zero = n - n;
      sink = static_cast<float>(t / zero);
      break;
    }
    default: break;
  }
  (void)sink;
}

// Integer-valued grid-wide atomics and vector types / half conversions.
__global__ void atomics_vectors_kernel(const float4* in4, float4* out4, int* counters, unsigned short* halves,
                                       unsigned short* bfloats, const float* values, int n) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (t < n) {
    float4 a = __ldg(&in4[t]);
    out4[t] = make_float4(a.w, a.z, a.y, a.x + 1.0f);
    atomicAdd(&counters[0], 1);
    atomicMax(&counters[1], t);
    atomicMin(&counters[2], -t);
    atomicOr(reinterpret_cast<unsigned*>(&counters[3]), 1u << (t % 32));
    atomicCAS(&counters[4], t, t + 1);  // counters[4] ends at the number of a successful chain
    const float v = values[t];
    halves[t] = __half_as_ushort(__float2half_rn(v));
    bfloats[t] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

}  // namespace selftest

using lattice_emu::DeviceBuffer;
using lattice_emu::guarded_call;

LATTICE_EMU_EXPORT int selftest_barrier(const int* in, int* out, int blocks, int threads, int mode, char* err,
                                        size_t err_len) {
  return guarded_call(err, err_len, [&] {
    const size_t n = static_cast<size_t>(blocks) * threads;
    DeviceBuffer din(in, n * sizeof(int), "in"), dout(n * sizeof(int), "out");
    lattice::cuda::launch(selftest::barrier_kernel, dim3(blocks), dim3(threads), threads * sizeof(int), nullptr,
                          din.get<int>(), dout.get<int>(), mode);
    dout.to_host(out);
  });
}

LATTICE_EMU_EXPORT int selftest_reduce(const float* in, float* out, int blocks, int threads, int mode, char* err,
                                       size_t err_len) {
  return guarded_call(err, err_len, [&] {
    DeviceBuffer din(in, sizeof(float) * blocks * threads, "in"), dout(sizeof(float) * blocks, "out");
    lattice::cuda::launch(selftest::reduce_kernel, dim3(blocks), dim3(threads), 0, nullptr, din.get<float>(),
                          dout.get<float>(), mode);
    dout.to_host(out);
  });
}

LATTICE_EMU_EXPORT int selftest_shared_isolation(int* out, int* first_read, int blocks, int threads, char* err,
                                                 size_t err_len) {
  return guarded_call(err, err_len, [&] {
    const size_t n = static_cast<size_t>(blocks) * threads;
    DeviceBuffer dout(n * sizeof(int), "out"), dfirst(n * sizeof(int), "first_read");
    lattice::cuda::launch(selftest::shared_isolation_kernel, dim3(blocks), dim3(threads), threads * sizeof(int),
                          nullptr, dout.get<int>(), dfirst.get<int>());
    dout.to_host(out);
    dfirst.to_host(first_read);
  });
}

LATTICE_EMU_EXPORT int selftest_barrier_reduce(int* out, int bx, int by, int bz, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    DeviceBuffer dout(sizeof(int) * 5 * bx * by * bz, "out");
    lattice::cuda::launch(selftest::barrier_reduce_kernel, dim3(1), dim3(bx, by, bz), 0, nullptr, dout.get<int>());
    dout.to_host(out);
  });
}

LATTICE_EMU_EXPORT int selftest_collectives(const int* in, unsigned* results, int threads, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    DeviceBuffer din(in, sizeof(int) * threads, "in");
    DeviceBuffer dres(sizeof(unsigned) * threads * selftest::kCollectiveResults, "results");
    lattice::cuda::launch(selftest::collectives_kernel, dim3(1), dim3(threads), 0, nullptr, din.get<int>(),
                          dres.get<unsigned>());
    dres.to_host(results);
  });
}

LATTICE_EMU_EXPORT int selftest_bad_mask(int mode, int threads, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    DeviceBuffer din(sizeof(int) * threads, "in"), dout(sizeof(int) * threads, "out");
    cudaMemset(din.get(), 0, din.bytes());
    lattice::cuda::launch(selftest::bad_mask_kernel, dim3(1), dim3(threads), 0, nullptr, din.get<int>(),
                          dout.get<int>(), mode);
  });
}

// pass_host_pointer: hands the kernel a host (stack) pointer instead of device memory.
LATTICE_EMU_EXPORT int selftest_fault(int mode, int n, int threads, int culprit, int shared_floats,
                                      int pass_host_pointer, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    DeviceBuffer buf(sizeof(float) * n, "victim");
    cudaMemset(buf.get(), 0, buf.bytes());
    float host[4] = {0, 0, 0, 0};
    float* p = pass_host_pointer ? host : buf.get<float>();
    lattice::cuda::launch(selftest::fault_kernel, dim3(2), dim3(threads), sizeof(float) * shared_floats, nullptr, p,
                          n, mode, culprit);
  });
}

LATTICE_EMU_EXPORT int selftest_atomics_vectors(const float* in4, float* out4, int* counters, unsigned short* halves,
                                                unsigned short* bfloats, const float* values, int n, int threads,
                                                char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    DeviceBuffer din(in4, sizeof(float4) * n, "in4"), dout(sizeof(float4) * n, "out4");
    DeviceBuffer dcnt(counters, sizeof(int) * 5, "counters");
    DeviceBuffer dh(sizeof(unsigned short) * n, "halves"), db(sizeof(unsigned short) * n, "bfloats");
    DeviceBuffer dv(values, sizeof(float) * n, "values");
    const int blocks = (n + threads - 1) / threads;
    lattice::cuda::launch(selftest::atomics_vectors_kernel, dim3(blocks), dim3(threads), 0, nullptr,
                          din.get<const float4>(), dout.get<float4>(), dcnt.get<int>(), dh.get<unsigned short>(),
                          db.get<unsigned short>(), dv.get<const float>(), n);
    dout.to_host(out4);
    dcnt.to_host(counters);
    dh.to_host(halves);
    db.to_host(bfloats);
  });
}
