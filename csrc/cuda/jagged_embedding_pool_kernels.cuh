// CUDA kernel bodies of the fused jagged embedding pooling op (plain CUDA, no torch headers). Launched only by
// csrc/cuda/jagged_embedding_pool.cu; also compiled as host C++ by the CPU emulator (csrc/testing/cuda_emu).
//
// Layout (see csrc/ops.cpp): weights [rows_total, D] (row stride ld), table_row_offsets int64 either [T+1]
// (packed tables; table t = rows [tro[t], tro[t+1])) or [T, 2] (table t = rows [tro[t,0], tro[t,1]), for
// features sharing a table): both are read as start = tro[t*stride], end = tro[t*stride+1] with stride 1 or 2.
// indices [N] local to their table, key-major offsets [T*B+1] (bag = t*B + b), output [B, T, D].
//
// Work split: a "group" of G lanes (G a power of two <= 32, never straddling a warp) owns one bag (forward,
// per-sample-weight gradient) or one unique row (backward). Each lane owns VEC consecutive columns, so a row is
// read with 16-byte loads when D and the pointers allow; D > G*VEC takes several column passes. The group
// fetches G (index, weight) pairs with one coalesced load and broadcasts them with width-G shuffles whose mask
// names exactly the group's lanes. Accumulation is fp32 (fp64 for fp64 weights, used by gradcheck).
//
// Backward: (row, position) pairs are radix-sorted by row (stable LSD, 8-bit digits, a warp-level multisplit
// with __match_any_sync for the stable scatter), run-length segmented, and one group reduces each unique row's
// gradient in position order (deterministic), then writes it (sparse mode) or applies SGD / row-wise Adagrad in
// place (fused mode; each row has exactly one writer, so no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "jagged_embedding_pool.h"
#include "lattice/cuda/device.cuh"

namespace lattice {
namespace cuda {
namespace pool {

constexpr int kThreads = 256;         // block size of the row/bag kernels
constexpr int kForwardRowsInFlight = 4;  // rows a forward group gathers at once (memory-level parallelism)
constexpr int kForwardBlocksPerSm = 8;   // persistent forward grid: 8 blocks of 256 threads fill an SM's 2048
constexpr int kSortThreads = 256;     // block size of the radix sort kernels (8 warps)
constexpr int kSortItemsPerWarp = 256;  // 8 chunks of 32
constexpr int kSortTile = kSortThreads / 32 * kSortItemsPerWarp;  // 2048 keys per block
constexpr int kRadixBits = 8;
constexpr int kRadix = 1 << kRadixBits;
constexpr int kScanThreads = 256;
constexpr int kScanTile = kScanThreads * 8;  // elements per block of the scan


// ---------------------------------------------------------------------------------------------------------
// Element conversion and vector loads (VEC elements, split into <= 16-byte transactions)
// ---------------------------------------------------------------------------------------------------------
// Accumulation type: fp32, or fp64 for fp64 storage.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T x) { return static_cast<A>(to_float(x)); }
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) { return x; }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A x);
template <>
__device__ __forceinline__ float from_acc<float, float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ double from_acc<double, double>(double x) { return x; }
template <>
__device__ __forceinline__ float from_acc<float, double>(double x) { return static_cast<float>(x); }

template <int BYTES>
struct RawVec;
template <> struct RawVec<2> { using type = unsigned short; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };

// Loads VEC elements at p (aligned to min(16, VEC*sizeof(T)) bytes) and widens them to the accumulation type.
template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, A (&out)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  constexpr int kChunkBytes = kBytes < 16 ? kBytes : 16;
  constexpr int kPerChunk = kChunkBytes / static_cast<int>(sizeof(T));
  using Raw = typename RawVec<kChunkBytes>::type;
#pragma unroll
  for (int c = 0; c < VEC / kPerChunk; ++c) {
    union {
      Raw raw;
      T elems[kPerChunk];
    } u;
    u.raw = __ldg(reinterpret_cast<const Raw*>(p + c * kPerChunk));
#pragma unroll
    for (int k = 0; k < kPerChunk; ++k) out[c * kPerChunk + k] = to_acc<A>(u.elems[k]);
  }
}

// Plain (non-__ldg) load, for memory this kernel also writes (the weights of the fused update).
template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_vec_rw(const T* p, A (&out)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  constexpr int kChunkBytes = kBytes < 16 ? kBytes : 16;
  constexpr int kPerChunk = kChunkBytes / static_cast<int>(sizeof(T));
  using Raw = typename RawVec<kChunkBytes>::type;
#pragma unroll
  for (int c = 0; c < VEC / kPerChunk; ++c) {
    union {
      Raw raw;
      T elems[kPerChunk];
    } u;
    u.raw = *reinterpret_cast<const Raw*>(p + c * kPerChunk);
#pragma unroll
    for (int k = 0; k < kPerChunk; ++k) out[c * kPerChunk + k] = to_acc<A>(u.elems[k]);
  }
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  constexpr int kChunkBytes = kBytes < 16 ? kBytes : 16;
  constexpr int kPerChunk = kChunkBytes / static_cast<int>(sizeof(T));
  using Raw = typename RawVec<kChunkBytes>::type;
#pragma unroll
  for (int c = 0; c < VEC / kPerChunk; ++c) {
    union {
      Raw raw;
      T elems[kPerChunk];
    } u;
#pragma unroll
    for (int k = 0; k < kPerChunk; ++k) u.elems[k] = from_acc<T, A>(in[c * kPerChunk + k]);
    *reinterpret_cast<Raw*>(p + c * kPerChunk) = u.raw;
  }
}

// A group of G lanes (power of two) inside a warp.
struct Group {
  int size;       // G
  int lane;       // lane within the group
  unsigned mask;  // the group's lanes within the warp
  long long id;   // global group index

  __device__ __forceinline__ static Group make(int g) {
    Group grp;
    const unsigned lane = threadIdx.x & 31u;
    grp.size = g;
    grp.lane = static_cast<int>(lane) & (g - 1);
    grp.mask = g == 32 ? 0xffffffffu : (((1u << g) - 1u) << (lane & ~static_cast<unsigned>(g - 1)));
    grp.id = static_cast<long long>(blockIdx.x) * (blockDim.x / g) + threadIdx.x / g;
    return grp;
  }
  __device__ __forceinline__ long long stride() const { return static_cast<long long>(gridDim.x) * (blockDim.x / size); }
  // Sum over the group's lanes (every lane gets the total).
  template <typename A>
  __device__ __forceinline__ A sum(A v) const {
    for (int o = size / 2; o > 0; o /= 2) v += __shfl_xor_sync(mask, v, o, size);
    return v;
  }
};

template <typename index_t>
__device__ __forceinline__ void clamp_range(const index_t* offsets, long long bag, long long n, long long& start,
                                            long long& end) {
  start = static_cast<long long>(offsets[bag]);
  end = static_cast<long long>(offsets[bag + 1]);
  start = start < 0 ? 0 : (start > n ? n : start);
  end = end < start ? start : (end > n ? n : end);
}

// Rows [start, end) of table t; stride 1 for the [T+1] layout, 2 for [T, 2].
struct TableRows {
  const long long* tro;
  int stride;
  __device__ __forceinline__ long long start(int t) const { return tro[static_cast<long long>(t) * stride]; }
  __device__ __forceinline__ long long end(int t) const { return tro[static_cast<long long>(t) * stride + 1]; }
};

// ---------------------------------------------------------------------------------------------------------
// Validation (all inputs, one pass; results are position-ordered so the report names the first bad entry)
// ---------------------------------------------------------------------------------------------------------
__global__ void status_init_kernel(Status* status) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    status->code = kOk;
    status->position = status->value = status->value2 = status->table = status->sample = -1;
    status->num_segments = 0;
    status->first_bad[0] = status->first_bad[1] = status->first_bad[2] = kNoError;
  }
}

// Checks every table's row range (0 <= start <= end <= rows_total), offsets as CSR offsets over the indices
// (threads 0..T*B), and each bag's indices against its table's row count (one warp per bag, grid-stride).
template <typename index_t>
__global__ void check_inputs_kernel(TableRows tables, const index_t* __restrict__ indices,
                                    const index_t* __restrict__ offsets, long long rows_total, long long num_indices,
                                    int T, long long num_bags, Status* status) {
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long nthreads = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long t = tid; t < T; t += nthreads) {
    const long long s = tables.start(static_cast<int>(t)), e = tables.end(static_cast<int>(t));
    if (s < 0 || s > e || e > rows_total) atomicMin(&status->first_bad[0], static_cast<unsigned long long>(t));
  }
  for (long long j = tid; j <= num_bags; j += nthreads) {
    const long long v = static_cast<long long>(offsets[j]);
    const bool bad = (j == 0 && v != 0) || (j > 0 && v < static_cast<long long>(offsets[j - 1])) ||
                     (j == num_bags && v > num_indices);
    if (bad) atomicMin(&status->first_bad[1], static_cast<unsigned long long>(j));
  }
  const long long B = T > 0 ? num_bags / T : 0;
  const unsigned lane = threadIdx.x & 31u;
  const long long warps = nthreads / 32;
  for (long long bag = tid / 32; bag < num_bags; bag += warps) {
    const int t = static_cast<int>(bag / B);
    long long start, end;
    clamp_range(offsets, bag, num_indices, start, end);
    const long long rows_t = tables.end(t) - tables.start(t);
    for (long long i = start + lane; i < end; i += 32) {
      const long long idx = static_cast<long long>(indices[i]);
      if (idx < 0 || idx >= rows_t) atomicMin(&status->first_bad[2], static_cast<unsigned long long>(i));
    }
  }
}

// One thread: turns the first bad positions into a report (code, position, values, table, sample). Table ranges
// take precedence over offsets, offsets over indices.
template <typename index_t>
__global__ void check_finalize_kernel(TableRows tables, const index_t* __restrict__ indices,
                                      const index_t* __restrict__ offsets, long long num_indices, int T,
                                      long long num_bags, Status* status) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  if (status->first_bad[0] != kNoError) {
    const int t = static_cast<int>(status->first_bad[0]);
    status->code = kTableRange;
    status->table = t;
    status->value = tables.start(t);
    status->value2 = tables.end(t);
    return;
  }
  if (status->first_bad[1] != kNoError) {
    const long long j = static_cast<long long>(status->first_bad[1]);
    const long long v = static_cast<long long>(offsets[j]);
    status->position = j;
    status->value = v;
    status->value2 = j > 0 ? static_cast<long long>(offsets[j - 1]) : 0;
    status->code = (j == 0 && v != 0) ? kOffsetsStart
                   : (j > 0 && v < status->value2) ? kOffsetsDecreasing
                                                    : kOffsetsOverrun;
    return;
  }
  if (status->first_bad[2] != kNoError) {
    const long long i = static_cast<long long>(status->first_bad[2]);
    // The bag holding position i: the last j with offsets[j] <= i (offsets are valid here).
    long long lo = 0, hi = num_bags - 1;
    while (lo < hi) {
      const long long mid = (lo + hi + 1) / 2;
      if (static_cast<long long>(offsets[mid]) <= i) lo = mid; else hi = mid - 1;
    }
    const long long B = num_bags / T;
    const int t = static_cast<int>(lo / B);
    const long long v = static_cast<long long>(indices[i]);
    status->position = i;
    status->value = v;
    status->table = t;
    status->sample = lo - static_cast<long long>(t) * B;
    status->value2 = tables.end(t) - tables.start(t);
    status->code = v < 0 ? kIndexNegative : kIndexOutOfRange;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t, int VEC>
__global__ void pool_forward_kernel(const scalar_t* __restrict__ weights, long long ld, long long rows_total,
                                    TableRows tables, const index_t* __restrict__ indices,
                                    const index_t* __restrict__ offsets,
                                    const typename AccOf<scalar_t>::type* __restrict__ per_sample_weights,
                                    long long num_indices, int T, long long B, int D, int group_size, int mean,
                                    scalar_t* __restrict__ out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Group g = Group::make(group_size);
  const long long num_bags = static_cast<long long>(T) * B;
  for (long long bag = g.id; bag < num_bags; bag += g.stride()) {
    const int t = static_cast<int>(bag / B);
    const long long b = bag - static_cast<long long>(t) * B;
    long long start, end;
    clamp_range(offsets, bag, num_indices, start, end);
    const long long row_base = tables.start(t);
    const long long rows_t = tables.end(t) - row_base;
    const acc_t scale = (mean && end > start) ? acc_t(1) / static_cast<acc_t>(end - start) : acc_t(1);
    scalar_t* out_row = out + (b * T + t) * static_cast<long long>(D);
    for (int c0 = 0; c0 < D; c0 += g.size * VEC) {
      const int c = c0 + g.lane * VEC;
      const bool active = c < D;
      acc_t acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
      for (long long j0 = start; j0 < end; j0 += g.size) {
        // One coalesced load of up to G (row, weight) pairs, then broadcast them one by one.
        long long my_row = -1;
        acc_t my_w = acc_t(1);
        if (j0 + g.lane < end) {
          const long long idx = static_cast<long long>(__ldg(&indices[j0 + g.lane]));
          const long long row = row_base + idx;
          if (idx >= 0 && idx < rows_t && row >= 0 && row < rows_total) my_row = row;
          if (per_sample_weights) my_w = __ldg(&per_sample_weights[j0 + g.lane]);
        }
        const int cnt = static_cast<int>(end - j0 < g.size ? end - j0 : g.size);
        // kForwardRowsInFlight rows per step: their loads are all issued before any is summed, so a lane keeps
        // several independent 16-byte gathers in flight (a short bag is otherwise one latency per row). The sum
        // stays in position order, so results are bitwise those of a row-at-a-time loop.
        for (int k0 = 0; k0 < cnt; k0 += kForwardRowsInFlight) {
          long long rows[kForwardRowsInFlight];
          acc_t ws[kForwardRowsInFlight];
#pragma unroll
          for (int u = 0; u < kForwardRowsInFlight; ++u) {
            const int k = k0 + u < cnt ? k0 + u : 0;  // every lane of the group takes part in each shuffle
            const long long row = __shfl_sync(g.mask, my_row, k, g.size);
            ws[u] = per_sample_weights ? __shfl_sync(g.mask, my_w, k, g.size) : acc_t(1);
            rows[u] = k0 + u < cnt ? row : -1;
          }
          acc_t v[kForwardRowsInFlight][VEC];
#pragma unroll
          for (int u = 0; u < kForwardRowsInFlight; ++u) {
            if (active && rows[u] >= 0) load_vec<scalar_t, VEC>(weights + rows[u] * ld + c, v[u]);
          }
#pragma unroll
          for (int u = 0; u < kForwardRowsInFlight; ++u) {
            if (active && rows[u] >= 0) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[e] += ws[u] * v[u][e];
            }
          }
        }
      }
      if (active) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] *= scale;
        store_vec<scalar_t, VEC>(out_row + c, acc);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Gradient of per_sample_weights: grad[i] = <grad_output[b, t], weights[row(i)]> (sum pooling), written in the
// accumulation type (fp32, fp64 for fp64 weights).
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t, typename index_t, int VEC>
__global__ void psw_grad_kernel(const grad_t* __restrict__ grad_output, const scalar_t* __restrict__ weights,
                                long long ld, long long rows_total, TableRows tables,
                                const index_t* __restrict__ indices, const index_t* __restrict__ offsets,
                                long long num_indices, int T, long long B, int D, int group_size,
                                const Status* __restrict__ status,
                                typename AccOf<scalar_t>::type* __restrict__ grad_psw) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (status->code != kOk) return;
  const Group g = Group::make(group_size);
  const long long num_bags = static_cast<long long>(T) * B;
  for (long long bag = g.id; bag < num_bags; bag += g.stride()) {
    const int t = static_cast<int>(bag / B);
    const long long b = bag - static_cast<long long>(t) * B;
    long long start, end;
    clamp_range(offsets, bag, num_indices, start, end);
    const long long row_base = tables.start(t);
    const long long rows_t = tables.end(t) - row_base;
    const grad_t* go = grad_output + (b * T + t) * static_cast<long long>(D);
    for (long long i = start; i < end; ++i) {
      const long long idx = static_cast<long long>(__ldg(&indices[i]));
      const bool valid = idx >= 0 && idx < rows_t && row_base + idx < rows_total;
      acc_t dot = acc_t(0);
      if (valid) {
        const scalar_t* wrow = weights + (row_base + idx) * ld;
        for (int c = g.lane * VEC; c < D; c += g.size * VEC) {
          acc_t w[VEC], gv[VEC];
          load_vec<scalar_t, VEC>(wrow + c, w);
          load_vec<grad_t, VEC>(go + c, gv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot += w[e] * gv[e];
        }
      }
      dot = g.sum(dot);
      if (g.lane == 0) grad_psw[i] = dot;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward step 1: (row, position) pairs and per-position bag and scale. Positions outside every bag get the
// sentinel key rows_total, which sorts after all real rows.
// ---------------------------------------------------------------------------------------------------------
__global__ void fill_keys_kernel(long long* __restrict__ keys, int* __restrict__ vals, long long n,
                                 long long sentinel) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    keys[i] = sentinel;
    vals[i] = static_cast<int>(i);
  }
}

// scale_t: the accumulation type of the gradient's reduction (per_sample_weights come in that type).
template <typename index_t, typename scale_t>
__global__ void bag_keys_kernel(TableRows tables, const index_t* __restrict__ indices,
                                const index_t* __restrict__ offsets, const scale_t* __restrict__ per_sample_weights,
                                long long rows_total, long long num_indices, int T, long long B, int mean,
                                long long* __restrict__ keys, int* __restrict__ bag_of, scale_t* __restrict__ scale) {
  const unsigned lane = threadIdx.x & 31u;
  const long long warps = static_cast<long long>(gridDim.x) * blockDim.x / 32;
  const long long num_bags = static_cast<long long>(T) * B;
  for (long long bag = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; bag < num_bags;
       bag += warps) {
    const int t = static_cast<int>(bag / B);
    long long start, end;
    clamp_range(offsets, bag, num_indices, start, end);
    const long long row_base = tables.start(t);
    const long long rows_t = tables.end(t) - row_base;
    const scale_t s = (mean && end > start) ? scale_t(1) / static_cast<scale_t>(end - start) : scale_t(1);
    for (long long i = start + lane; i < end; i += 32) {
      const long long idx = static_cast<long long>(indices[i]);
      const long long row = row_base + idx;
      keys[i] = (idx >= 0 && idx < rows_t && row >= 0 && row < rows_total) ? row : rows_total;
      bag_of[i] = static_cast<int>(bag);
      scale[i] = per_sample_weights ? per_sample_weights[i] : s;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Exclusive scan of int arrays (3 phases: per-tile scan + tile totals, scan of totals, add tile offsets)
// ---------------------------------------------------------------------------------------------------------
// Inclusive block-wide scan of one value per thread; returns it and the block total through *total.
__device__ __forceinline__ int block_inclusive_scan(int v, int* warp_sums, int* total) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x / 32u;
  for (int o = 1; o < 32; o *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, v, o);
    if (static_cast<int>(lane) >= o) v += n;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = static_cast<int>(blockDim.x / 32u);
    int s = static_cast<int>(lane) < nwarps ? warp_sums[lane] : 0;
    for (int o = 1; o < 32; o *= 2) {
      const int n = __shfl_up_sync(0xffffffffu, s, o);
      if (static_cast<int>(lane) >= o) s += n;
    }
    if (static_cast<int>(lane) < nwarps) warp_sums[lane] = s;
    if (static_cast<int>(lane) == nwarps - 1) *total = s;
  }
  __syncthreads();
  if (warp > 0) v += warp_sums[warp - 1];
  return v;
}

// out[i] = sum(in[tile_start .. i)), tile_sums[tile] = the tile's total. in and out may alias.
__global__ void scan_tiles_kernel(const int* in, int* out, long long n,
                                                                   int* __restrict__ tile_sums) {
  __shared__ int warp_sums[kScanThreads / 32];
  __shared__ int total;
  const long long base = static_cast<long long>(blockIdx.x) * kScanTile;
  int carry = 0;
  for (int c = 0; c < kScanTile; c += kScanThreads) {
    const long long i = base + c + threadIdx.x;
    const int v = i < n ? in[i] : 0;
    const int incl = block_inclusive_scan(v, warp_sums, &total);
    if (i < n) out[i] = carry + incl - v;
    carry += total;
    __syncthreads();  // everyone has read `total` and warp_sums before the next chunk overwrites them
  }
  if (threadIdx.x == 0 && tile_sums) tile_sums[blockIdx.x] = carry;
}

__global__ void scan_add_kernel(int* data, long long n, const int* __restrict__ tile_offsets) {
  const int add = tile_offsets[blockIdx.x];
  const long long base = static_cast<long long>(blockIdx.x) * kScanTile;
  for (int c = threadIdx.x; c < kScanTile; c += kScanThreads) {
    const long long i = base + c;
    if (i < n) data[i] += add;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Radix sort of (key, value) pairs by the key's bits [shift, shift+8): histogram, scan, stable scatter
// ---------------------------------------------------------------------------------------------------------
// hist[digit * num_tiles + tile] = number of keys with that digit in the tile.
__global__ void radix_histogram_kernel(const long long* __restrict__ keys, long long n,
                                                                        int shift, int* __restrict__ hist) {
  __shared__ int counts[kRadix];
  for (int d = threadIdx.x; d < kRadix; d += kSortThreads) counts[d] = 0;
  __syncthreads();
  const long long base = static_cast<long long>(blockIdx.x) * kSortTile;
  for (int c = threadIdx.x; c < kSortTile; c += kSortThreads) {
    const long long i = base + c;
    if (i < n) atomicAdd(&counts[(keys[i] >> shift) & (kRadix - 1)], 1);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < kRadix; d += kSortThreads) hist[static_cast<long long>(d) * gridDim.x + blockIdx.x] = counts[d];
}

// Stable scatter: offsets[digit * num_tiles + tile] is the exclusive scan of the histogram. Warp w of a block
// handles keys [tile + 256w, tile + 256(w+1)) in chunks of 32, ranking equal digits with __match_any_sync.
__global__ void radix_scatter_kernel(
    const long long* __restrict__ keys_in, const int* __restrict__ vals_in, long long n, int shift,
    const int* __restrict__ offsets, long long* __restrict__ keys_out, int* __restrict__ vals_out) {
  constexpr int kWarps = kSortThreads / 32;
  __shared__ int warp_offsets[kWarps][kRadix];
  const unsigned lane = threadIdx.x & 31u;
  const int warp = static_cast<int>(threadIdx.x / 32u);
  const unsigned lanemask_lt = (1u << lane) - 1u;
  for (int d = threadIdx.x; d < kWarps * kRadix; d += kSortThreads) warp_offsets[d / kRadix][d % kRadix] = 0;
  __syncthreads();
  const long long warp_base = static_cast<long long>(blockIdx.x) * kSortTile + static_cast<long long>(warp) * kSortItemsPerWarp;
  // Phase 1: per-warp digit counts.
  for (int c = 0; c < kSortItemsPerWarp; c += 32) {
    const long long i = warp_base + c + lane;
    const int digit = i < n ? static_cast<int>((keys_in[i] >> shift) & (kRadix - 1)) : kRadix;
    const unsigned peers = __match_any_sync(0xffffffffu, digit);
    if (digit < kRadix && (peers & lanemask_lt) == 0) warp_offsets[warp][digit] += __popc(peers);
    __syncwarp();  // the next chunk's leader for this digit may be another lane
  }
  __syncthreads();
  // Phase 2: per-warp starting positions = the tile's global offset + counts of earlier warps.
  for (int d = threadIdx.x; d < kRadix; d += kSortThreads) {
    int running = offsets[static_cast<long long>(d) * gridDim.x + blockIdx.x];
    for (int w = 0; w < kWarps; ++w) {
      const int cnt = warp_offsets[w][d];
      warp_offsets[w][d] = running;
      running += cnt;
    }
  }
  __syncthreads();
  // Phase 3: scatter in order.
  for (int c = 0; c < kSortItemsPerWarp; c += 32) {
    const long long i = warp_base + c + lane;
    long long key = 0;
    int val = 0;
    int digit = kRadix;
    if (i < n) {
      key = keys_in[i];
      val = vals_in[i];
      digit = static_cast<int>((key >> shift) & (kRadix - 1));
    }
    const unsigned peers = __match_any_sync(0xffffffffu, digit);
    int pos = 0;
    if (digit < kRadix) pos = warp_offsets[warp][digit] + __popc(peers & lanemask_lt);
    __syncwarp();  // all lanes read the digit's offset before its leader advances it
    if (digit < kRadix) {
      keys_out[pos] = key;
      vals_out[pos] = val;
      if ((peers & lanemask_lt) == 0) warp_offsets[warp][digit] += __popc(peers);
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Segments of equal sorted keys (sentinel keys excluded)
// ---------------------------------------------------------------------------------------------------------
__global__ void segment_heads_kernel(const long long* __restrict__ keys, long long n,
                                                                 long long sentinel, int* __restrict__ heads) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long k = keys[i];
    heads[i] = (k != sentinel && (i == 0 || keys[i - 1] != k)) ? 1 : 0;
  }
}

// seg_index = exclusive scan of the heads. Writes seg_start[s] for every segment, seg_start[U] = the number of
// non-sentinel keys, and status->num_segments = U.
__global__ void segment_starts_kernel(const long long* __restrict__ keys, long long n,
                                                                  long long sentinel, const int* __restrict__ seg_index,
                                                                  int* __restrict__ seg_start, Status* status) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long k = keys[i];
    if (k == sentinel) continue;
    const bool head = i == 0 || keys[i - 1] != k;
    if (head) seg_start[seg_index[i]] = static_cast<int>(i);
    if (i == n - 1 || keys[i + 1] == sentinel) {
      const int u = seg_index[i] + (head ? 1 : 0);
      seg_start[u] = static_cast<int>(i + 1);
      status->num_segments = u;
    }
  }
}

// Reduces segment s's gradient for this lane's VEC columns starting at c, in the accumulation type A.
template <typename grad_t, int VEC, typename A>
__device__ __forceinline__ void segment_gradient(const Group& g, const int* __restrict__ sorted_pos,
                                                 const int* __restrict__ bag_of, const A* __restrict__ scale,
                                                 const grad_t* __restrict__ grad_output, int T, long long B, int D,
                                                 int start, int end, int c, bool active, A (&acc)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = A(0);
  for (int j0 = start; j0 < end; j0 += g.size) {
    long long my_off = 0;
    A my_s = A(0);
    if (j0 + g.lane < end) {
      const int p = __ldg(&sorted_pos[j0 + g.lane]);
      const long long bag = __ldg(&bag_of[p]);
      const int t = static_cast<int>(bag / B);
      const long long b = bag - static_cast<long long>(t) * B;
      my_off = (b * T + t) * static_cast<long long>(D);
      my_s = __ldg(&scale[p]);
    }
    const int cnt = end - j0 < g.size ? end - j0 : g.size;
    for (int k = 0; k < cnt; ++k) {
      const long long off = __shfl_sync(g.mask, my_off, k, g.size);
      const A s = __shfl_sync(g.mask, my_s, k, g.size);
      if (active) {
        A v[VEC];
        load_vec<grad_t, VEC>(grad_output + off + c, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += s * v[e];
      }
    }
  }
}

// Sparse mode: rows[s] and row_grads[s, :] for s < U (U known on the host).
template <typename grad_t, int VEC>
__global__ void sparse_rows_kernel(const long long* __restrict__ sorted_keys, const int* __restrict__ sorted_pos,
                                   const int* __restrict__ seg_start, const int* __restrict__ bag_of,
                                   const typename AccOf<grad_t>::type* __restrict__ scale,
                                   const grad_t* __restrict__ grad_output, int T, long long B, int D,
                                   long long num_segments, int group_size, long long* __restrict__ rows,
                                   grad_t* __restrict__ row_grads) {
  using acc_t = typename AccOf<grad_t>::type;
  const Group g = Group::make(group_size);
  for (long long s = g.id; s < num_segments; s += g.stride()) {
    const int start = seg_start[s], end = seg_start[s + 1];
    if (g.lane == 0) rows[s] = sorted_keys[start];
    for (int c0 = 0; c0 < D; c0 += g.size * VEC) {
      const int c = c0 + g.lane * VEC;
      const bool active = c < D;
      acc_t acc[VEC];
      segment_gradient<grad_t, VEC>(g, sorted_pos, bag_of, scale, grad_output, T, B, D, start, end, c, active, acc);
      if (active) store_vec<grad_t, VEC>(row_grads + s * D + c, acc);
    }
  }
}

enum Optimizer : int { kSGD = 0, kRowwiseAdagrad = 1 };

// Row-wise Adagrad's state update, done by the group's lane 0 and broadcast: state[row] += mean(g'^2) (the
// state is fp32 whatever the weights); returns lr / (sqrt(state) + eps).
template <typename A>
__device__ __forceinline__ A adagrad_multiplier(const Group& g, float* state, long long row, A sum_sq, int D,
                                                float lr, float eps) {
  A mult = A(0);
  if (g.lane == 0) {
    const A s = static_cast<A>(state[row]) + sum_sq / static_cast<A>(D);
    state[row] = static_cast<float>(s);
    mult = static_cast<A>(lr) / (sqrt(static_cast<A>(state[row])) + static_cast<A>(eps));
  }
  return __shfl_sync(g.mask, mult, 0, g.size);
}

// Fused mode: applies SGD / row-wise Adagrad to every unique row (grid-stride over segments; U read on the
// device). Adagrad needs the whole row's mean g'^2 first: for D <= G*VEC the gradient stays in registers,
// otherwise it is recomputed in a second pass over the columns.
template <typename scalar_t, typename grad_t, int VEC>
__global__ void fused_update_kernel(scalar_t* __restrict__ weights, long long ld, float* __restrict__ state,
                                    const long long* __restrict__ sorted_keys, const int* __restrict__ sorted_pos,
                                    const int* __restrict__ seg_start, const int* __restrict__ bag_of,
                                    const typename AccOf<scalar_t>::type* __restrict__ scale,
                                    const grad_t* __restrict__ grad_output, int T, long long B, int D,
                                    int group_size, int optimizer, float lr, float eps, float weight_decay,
                                    const Status* __restrict__ status) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (status->code != kOk) return;
  const long long num_segments = status->num_segments;
  const Group g = Group::make(group_size);
  const bool one_pass = D <= g.size * VEC;
  const acc_t wd = static_cast<acc_t>(weight_decay);
  for (long long s = g.id; s < num_segments; s += g.stride()) {
    const int start = seg_start[s], end = seg_start[s + 1];
    const long long row = sorted_keys[start];
    scalar_t* wrow = weights + row * ld;
    acc_t multiplier = static_cast<acc_t>(lr);
    acc_t acc[VEC];
    if (optimizer == kRowwiseAdagrad) {
      acc_t sq = acc_t(0);
      for (int c0 = 0; c0 < D; c0 += g.size * VEC) {
        const int c = c0 + g.lane * VEC;
        const bool active = c < D;
        segment_gradient<grad_t, VEC>(g, sorted_pos, bag_of, scale, grad_output, T, B, D, start, end, c, active, acc);
        if (active) {
          acc_t w[VEC];
          load_vec_rw<scalar_t, VEC>(wrow + c, w);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc_t gd = acc[e] + wd * w[e];
            sq += gd * gd;
          }
        }
      }
      multiplier = adagrad_multiplier(g, state, row, g.sum(sq), D, lr, eps);
    }
    for (int c0 = 0; c0 < D; c0 += g.size * VEC) {
      const int c = c0 + g.lane * VEC;
      const bool active = c < D;
      if (!(one_pass && optimizer == kRowwiseAdagrad)) {
        segment_gradient<grad_t, VEC>(g, sorted_pos, bag_of, scale, grad_output, T, B, D, start, end, c, active, acc);
      }
      if (active) {
        acc_t w[VEC];
        load_vec_rw<scalar_t, VEC>(wrow + c, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) w[e] -= multiplier * (acc[e] + wd * w[e]);
        store_vec<scalar_t, VEC>(wrow + c, w);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// sparse_rows_optimizer_step_: validation of rows (range, then duplicates after a sort) and the update
// ---------------------------------------------------------------------------------------------------------
__global__ void rows_keys_kernel(const long long* __restrict__ rows, long long n,
                                                             long long rows_total, long long* __restrict__ keys,
                                                             int* __restrict__ vals, Status* status) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = rows[i];
    const bool ok = r >= 0 && r < rows_total;
    if (!ok) atomicMin(&status->first_bad[1], static_cast<unsigned long long>(i));
    keys[i] = ok ? r : rows_total;
    vals[i] = static_cast<int>(i);
  }
}

// After sorting (stable, positions ascending within equal rows): every entry equal to its predecessor is a
// repeat; the first bad position is the smallest such position (the CPU op's "appears twice" entry).
__global__ void rows_duplicates_kernel(const long long* __restrict__ sorted_keys, const int* __restrict__ sorted_pos,
                                       long long n, long long sentinel, Status* status) {
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x + 1; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    if (sorted_keys[i] != sentinel && sorted_keys[i] == sorted_keys[i - 1]) {
      atomicMin(&status->first_bad[2], static_cast<unsigned long long>(sorted_pos[i]));
    }
  }
}

__global__ void rows_finalize_kernel(const long long* __restrict__ rows, Status* status) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  if (status->first_bad[1] != kNoError) {
    const long long i = static_cast<long long>(status->first_bad[1]);
    status->code = kRowOutOfRange;
    status->position = i;
    status->value = rows[i];
  } else if (status->first_bad[2] != kNoError) {
    const long long i = static_cast<long long>(status->first_bad[2]);
    status->code = kRowDuplicate;
    status->position = i;
    status->value = rows[i];
  }
}

template <typename scalar_t, typename grad_t, int VEC>
__global__ void rows_update_kernel(scalar_t* __restrict__ weights, long long ld, float* __restrict__ state,
                                   const long long* __restrict__ rows, const grad_t* __restrict__ row_grads,
                                   long long num_rows, int D, int group_size, int optimizer, float lr, float eps,
                                   float weight_decay, const Status* __restrict__ status) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (status->code != kOk) return;
  const Group g = Group::make(group_size);
  const acc_t wd = static_cast<acc_t>(weight_decay);
  for (long long s = g.id; s < num_rows; s += g.stride()) {
    const long long row = rows[s];
    scalar_t* wrow = weights + row * ld;
    const grad_t* grow = row_grads + s * D;
    acc_t multiplier = static_cast<acc_t>(lr);
    if (optimizer == kRowwiseAdagrad) {
      acc_t sq = acc_t(0);
      for (int c = g.lane * VEC; c < D; c += g.size * VEC) {
        acc_t gv[VEC], w[VEC];
        load_vec<grad_t, VEC>(grow + c, gv);
        load_vec_rw<scalar_t, VEC>(wrow + c, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t gd = gv[e] + wd * w[e];
          sq += gd * gd;
        }
      }
      multiplier = adagrad_multiplier(g, state, row, g.sum(sq), D, lr, eps);
    }
    for (int c = g.lane * VEC; c < D; c += g.size * VEC) {
      acc_t gv[VEC], w[VEC];
      load_vec<grad_t, VEC>(grow + c, gv);
      load_vec_rw<scalar_t, VEC>(wrow + c, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) w[e] -= multiplier * (gv[e] + wd * w[e]);
      store_vec<scalar_t, VEC>(wrow + c, w);
    }
  }
}

}  // namespace pool
}  // namespace cuda
}  // namespace lattice
