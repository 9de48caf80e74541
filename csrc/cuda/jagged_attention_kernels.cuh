// Kernel bodies of the jagged (varlen) multi-head attention op: plain CUDA, no torch headers, so the
// same code compiles under nvcc and under the CPU execution emulator (csrc/testing/cuda_emu/).
//
// Layout: q [Nq, H, Dh] with q_offsets [B+1]; k, v [Nk, H, Dh] with kv_offsets [B+1] (int64); sample b
// has n = q_offsets[b+1] - q_offsets[b] queries and m = kv_offsets[b+1] - kv_offsets[b] keys. With
// `causal`, query i (0-based within its sample) sees keys j <= i + (m - n): the mask is aligned
// bottom-right, so the last query sees every key. A query that sees no key (m == 0, or causal with
// i + m - n < 0) outputs zeros and lse = -inf (log of an empty sum), as the CPU kernel and the reference do.
//
// Every kernel runs kThreads = 128 threads (4 warps) per block and reads its work item from a host-built
// tile table `tiles` [num_tiles, 2] = (sample, first row of the tile); blockIdx.x picks the tile and
// blockIdx.y the head, so skewed lengths cost no idle blocks. Scores are computed in base 2: q (or k) is
// pre-multiplied by scale * log2(e) when it is staged into shared memory, so softmax uses exp2f.
//
// Forward (attention_fwd_kernel): one block per (sample, query tile of kWarps * kRows queries, head).
// The query tile sits in shared memory; key/value tiles of 32 keys stream through shared memory. In the
// score phase lane j of each warp owns key j of the tile and computes the scores of the warp's kRows
// queries (float4 loads: the key row per lane, the query rows as broadcasts); the row maximum is a warp
// shuffle reduction; the probabilities go through shared memory to the P.V phase, where lane l owns
// output columns l, l + 32, ... of the warp's rows. The running row sum stays a per-lane partial
// (every lane rescales by the same factor) and is reduced once at the end.
//
// Backward: (1) attention_bwd_delta_kernel: delta = rowsum(dO * O) per (query, head);
// (2) attention_bwd_dkdv_kernel: one block per (sample, key tile, head) accumulates dK and dV for its
// keys in registers while query tiles of 32 stream through shared memory (lane i owns query i in the
// score phase); (3) attention_bwd_dq_kernel: one block per (sample, query tile, head), the mirror of the
// forward, accumulates dQ while key tiles stream. Recomputing the scores in both (2) and (3) costs two
// extra QK^T / dO V^T products but needs no atomics: every gradient element is written by exactly one
// thread, in a fixed summation order, so the backward is deterministic (bitwise reproducible).
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lattice/cuda/device.cuh"

namespace lattice {
namespace cuda {
namespace attention {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
// Three resident blocks per SM: the large variants' shared memory (~42 KiB) allows about that many
// anyway, and it caps registers at 170 per thread, which every variant fits without spills (with no
// minimum named, ptxas squeezed some variants to 96 registers and spilled).
constexpr int kMinBlocksPerSm = 3;
constexpr int kKeyTile = 32;    // keys per shared-memory tile in the forward and dq kernels
constexpr int kQueryTile = 32;  // queries per shared-memory tile in the dk/dv kernel
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// lse of a query that sees no key: log(0), what logsumexp over an empty set gives. The backward never
// reads it (invisible pairs are skipped explicitly, not through exp(s - lse)), so it cannot make NaN.
constexpr float kEmptyLse = -INFINITY;

// ---- small helpers ---------------------------------------------------------------------------------

__device__ __forceinline__ float load_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

__device__ __forceinline__ void store_float(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_float(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Head dims are padded to a multiple of 4 in shared memory (float4 loads; pad columns are zero).
__host__ __device__ __forceinline__ int padded_head_dim(int head_dim) { return (head_dim + 3) & ~3; }

// Stages `kRows` rows of one head into a [kRows, ld] fp32 shared tile: row r comes from
// src + r * row_stride (r < valid_rows), columns [0, head_dim) are multiplied by `mul`, columns
// [head_dim, dp) and rows >= valid_rows are zero. All threads of the block take part.
template <int kRows, typename T>
__device__ __forceinline__ void stage_rows(float* dst, int ld, const T* __restrict__ src, int64_t row_stride,
                                           int valid_rows, int head_dim, int dp, float mul) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int r = warp; r < kRows; r += kWarps) {
    float* row = dst + r * ld;
    if (r < valid_rows) {
      const T* s = src + r * row_stride;
      for (int d = lane; d < dp; d += kWarpSize) row[d] = d < head_dim ? load_float(s + d) * mul : 0.f;
    } else {
      for (int d = lane; d < dp; d += kWarpSize) row[d] = 0.f;
    }
  }
}

// Shared memory (in floats) of each kernel, as a function of the padded head dim; the launchers size
// the dynamic shared memory with these, and the kernels carve it in the same order.
__host__ __device__ constexpr int fwd_smem_floats(int block_q, int dp) {
  return block_q * dp              // q tile (pre-scaled)
         + kKeyTile * (dp + 4)     // k tile, rows padded for conflict-free per-lane float4 loads
         + kKeyTile * dp           // v tile
         + block_q * kKeyTile;     // probabilities
}
__host__ __device__ constexpr int dkdv_smem_floats(int block_k, int dp) {
  return 2 * block_k * dp              // k (pre-scaled) and v tiles of the block's keys
         + 2 * kQueryTile * (dp + 4)   // q and dO tiles
         + 2 * block_k * kQueryTile;   // P and dS
}
__host__ __device__ constexpr int dq_smem_floats(int block_q, int dp) {
  return 2 * block_q * dp              // q (pre-scaled) and dO tiles
         + 2 * kKeyTile * (dp + 4)     // k and v tiles
         + block_q * kKeyTile;         // dS
}

// Keys [0, kv_end) visible to queries [q_first, q_first + rows) of a sample with n queries, m keys.
__host__ __device__ __forceinline__ int64_t visible_keys_end(int64_t q_first, int64_t rows, int64_t n, int64_t m,
                                                             bool causal) {
  if (!causal) return m;
  const int64_t end = q_first + rows + (m - n);
  return end < 0 ? 0 : (end > m ? m : end);
}

// First query (of n) that sees key k_first of a sample with m keys; queries before it see none of
// the keys >= k_first.
__host__ __device__ __forceinline__ int64_t first_seeing_query(int64_t k_first, int64_t n, int64_t m, bool causal) {
  if (!causal) return 0;
  const int64_t first = k_first - (m - n);
  return first < 0 ? 0 : (first > n ? n : first);
}

// ---- forward ---------------------------------------------------------------------------------------

// out [Nq, H, Dh] (T), lse [Nq, H] fp32. kHeadDimMax (a multiple of 32) bounds head_dim; each warp
// owns kRows query rows of the block's tile of kWarps * kRows.
template <typename T, int kHeadDimMax, int kRows>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const int64_t* __restrict__ q_offsets, const int64_t* __restrict__ kv_offsets,
                         const int* __restrict__ tiles, int heads, int head_dim, float scale, bool causal,
                         T* __restrict__ out, float* __restrict__ lse) {
  constexpr int kBlockQ = kWarps * kRows;
  constexpr int kChunks = kHeadDimMax / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int h = blockIdx.y;
  const int b = tiles[2 * blockIdx.x];
  const int q_first = tiles[2 * blockIdx.x + 1];
  const int64_t q_begin = q_offsets[b];
  const int n = static_cast<int>(q_offsets[b + 1] - q_begin);
  const int64_t kv_begin = kv_offsets[b];
  const int m = static_cast<int>(kv_offsets[b + 1] - kv_begin);
  const int valid_q = imin(kBlockQ, n - q_first);
  const int kv_end = static_cast<int>(visible_keys_end(q_first, valid_q, n, m, causal));
  const int dp = padded_head_dim(head_dim);
  const int ldk = dp + 4;
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t head_offset = static_cast<int64_t>(h) * head_dim;

  float* q_s = dynamic_shared<float>();
  float* k_s = q_s + kBlockQ * dp;
  float* v_s = k_s + kKeyTile * ldk;
  float* p_s = v_s + kKeyTile * dp;

  const float scale_log2 = scale * kLog2e;
  stage_rows<kBlockQ>(q_s, dp, q + (q_begin + q_first) * row_stride + head_offset, row_stride, valid_q, head_dim,
                      dp, scale_log2);

  const bool warp_active = warp * kRows < valid_q;
  // Keys [0, warp_kv_end) are visible to some row of this warp (causal: fewer than the block's): the warp
  // skips later key tiles, which would only add zeros.
  const int warp_kv_end =
      warp_active ? static_cast<int>(visible_keys_end(q_first + warp * kRows, imin(kRows, valid_q - warp * kRows), n,
                                                      m, causal))
                  : 0;
  const int causal_shift = m - n;
  float acc[kRows][kChunks];
  float row_max[kRows];  // running max of the base-2 scores, identical in every lane
  float row_sum[kRows];  // running sum of exp2(score - row_max), a per-lane partial
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) acc[r][c] = 0.f;
  }

  for (int k0 = 0; k0 < kv_end; k0 += kKeyTile) {
    const int valid_k = imin(kKeyTile, kv_end - k0);
    __syncthreads();  // the previous tile's K, V and P are consumed (and, first time, q_s is visible)
    const int64_t kv_row0 = (kv_begin + k0) * row_stride + head_offset;
    stage_rows<kKeyTile>(k_s, ldk, k + kv_row0, row_stride, valid_k, head_dim, dp, 1.f);
    stage_rows<kKeyTile>(v_s, dp, v + kv_row0, row_stride, valid_k, head_dim, dp, 1.f);
    __syncthreads();

    if (k0 < warp_kv_end) {
      // Scores: lane j <-> key k0 + j.
      float s[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = 0.f;
      const float* k_row = k_s + lane * ldk;
      const float* q_rows = q_s + warp * kRows * dp;
      for (int d = 0; d < dp; d += 4) {
        const float4 kk = load4(k_row + d);
#pragma unroll
        for (int r = 0; r < kRows; ++r) s[r] = dot4(load4(q_rows + r * dp + d), kk, s[r]);
      }
      const int key = k0 + lane;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int qi = q_first + warp * kRows + r;
        const bool visible = key < kv_end && (!causal || key <= qi + causal_shift);
        const float score = visible ? s[r] : -INFINITY;
        const float new_max = fmaxf(row_max[r], warp_max(score));
        const float base = new_max == -INFINITY ? 0.f : new_max;  // all masked so far: avoid inf - inf
        const float alpha = exp2f(row_max[r] - base);
        const float p = exp2f(score - base);
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * alpha + p;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) acc[r][c] *= alpha;
        p_s[(warp * kRows + r) * kKeyTile + lane] = p;
      }
    }
    __syncthreads();  // P visible to the whole warp

    if (k0 < warp_kv_end) {
      // acc += P V: lane l <-> columns l + 32 c.
      const int kv_count = (valid_k + 3) & ~3;
      for (int j = 0; j < kv_count; j += 4) {
        float vv[4][kChunks];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            const int d = c * kWarpSize + lane;
            vv[jj][c] = d < dp ? v_s[(j + jj) * dp + d] : 0.f;
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float4 p4 = load4(p_s + (warp * kRows + r) * kKeyTile + j);
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            float a = acc[r][c];
            a = fmaf(p4.x, vv[0][c], a);
            a = fmaf(p4.y, vv[1][c], a);
            a = fmaf(p4.z, vv[2][c], a);
            acc[r][c] = fmaf(p4.w, vv[3][c], a);
          }
        }
      }
    }
  }

  if (!warp_active) return;  // no barrier follows
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float total = warp_sum(row_sum[r]);
    const int qi = q_first + warp * kRows + r;
    if (qi >= n) continue;  // warp-uniform
    const int64_t row = q_begin + qi;
    const float inv = total > 0.f ? 1.f / total : 0.f;
    T* o = out + row * row_stride + head_offset;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = c * kWarpSize + lane;
      if (d < head_dim) store_float(o + d, acc[r][c] * inv);
    }
    if (lane == 0) {
      lse[row * heads + h] = total > 0.f ? (row_max[r] + log2f(total)) * kLn2 : kEmptyLse;
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------------

// delta[row] = sum_d dO[row, d] * O[row, d] over rows = Nq * H; one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_bwd_delta_kernel(const T* __restrict__ out, const T* __restrict__ grad_out, int64_t rows,
                               int head_dim, float* __restrict__ delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warp; the kernel has no barrier
  const T* o = out + row * head_dim;
  const T* g = grad_out + row * head_dim;
  float sum = 0.f;
  for (int d = lane; d < head_dim; d += kWarpSize) sum = fmaf(load_float(o + d), load_float(g + d), sum);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// dK, dV for one (sample, key tile of kWarps * kRows keys, head); each warp owns kRows keys and keeps
// their dK, dV rows in registers (lane l <-> columns l + 32 c) while query tiles stream through.
template <typename T, int kHeadDimMax, int kRows>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_bwd_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const float* __restrict__ lse,
                              const float* __restrict__ delta, const int64_t* __restrict__ q_offsets,
                              const int64_t* __restrict__ kv_offsets, const int* __restrict__ tiles, int heads,
                              int head_dim, float scale, bool causal, T* __restrict__ grad_k,
                              T* __restrict__ grad_v) {
  constexpr int kBlockK = kWarps * kRows;
  constexpr int kChunks = kHeadDimMax / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int h = blockIdx.y;
  const int b = tiles[2 * blockIdx.x];
  const int k_first = tiles[2 * blockIdx.x + 1];
  const int64_t q_begin = q_offsets[b];
  const int n = static_cast<int>(q_offsets[b + 1] - q_begin);
  const int64_t kv_begin = kv_offsets[b];
  const int m = static_cast<int>(kv_offsets[b + 1] - kv_begin);
  const int valid_k = imin(kBlockK, m - k_first);
  const int q_lo = static_cast<int>(first_seeing_query(k_first, n, m, causal));
  const int dp = padded_head_dim(head_dim);
  const int ldq = dp + 4;
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t head_offset = static_cast<int64_t>(h) * head_dim;
  const float scale_log2 = scale * kLog2e;

  float* k_s = dynamic_shared<float>();
  float* v_s = k_s + kBlockK * dp;
  float* q_s = v_s + kBlockK * dp;
  float* do_s = q_s + kQueryTile * ldq;
  float* p_s = do_s + kQueryTile * ldq;
  float* ds_s = p_s + kBlockK * kQueryTile;

  const int64_t kv_row0 = (kv_begin + k_first) * row_stride + head_offset;
  stage_rows<kBlockK>(k_s, dp, k + kv_row0, row_stride, valid_k, head_dim, dp, scale_log2);
  stage_rows<kBlockK>(v_s, dp, v + kv_row0, row_stride, valid_k, head_dim, dp, 1.f);

  const bool warp_active = warp * kRows < valid_k;
  // Queries before warp_q_lo see none of this warp's keys (causal): the warp skips tiles made only of them.
  const int warp_q_lo = warp_active ? static_cast<int>(first_seeing_query(k_first + warp * kRows, n, m, causal)) : n;
  const int causal_shift = m - n;
  float dk[kRows][kChunks];
  float dv[kRows][kChunks];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) dk[r][c] = dv[r][c] = 0.f;
  }

  for (int i0 = q_lo; i0 < n; i0 += kQueryTile) {
    const int valid_q = imin(kQueryTile, n - i0);
    __syncthreads();  // the previous query tile (and P, dS) consumed; first time: k_s, v_s visible
    const int64_t q_row0 = (q_begin + i0) * row_stride + head_offset;
    stage_rows<kQueryTile>(q_s, ldq, q + q_row0, row_stride, valid_q, head_dim, dp, 1.f);
    stage_rows<kQueryTile>(do_s, ldq, grad_out + q_row0, row_stride, valid_q, head_dim, dp, 1.f);
    // Lane i <-> query i0 + i in the score phase.
    const int qi = i0 + lane;
    float lse2 = 0.f, dlt = 0.f;
    if (lane < valid_q) {
      lse2 = __ldg(lse + (q_begin + qi) * heads + h) * kLog2e;
      dlt = __ldg(delta + (q_begin + qi) * heads + h);
    }
    __syncthreads();

    if (i0 + valid_q > warp_q_lo) {
      float s[kRows], dpv[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = dpv[r] = 0.f;
      const float* q_row = q_s + lane * ldq;
      const float* do_row = do_s + lane * ldq;
      const float* k_rows = k_s + warp * kRows * dp;
      const float* v_rows = v_s + warp * kRows * dp;
      for (int d = 0; d < dp; d += 4) {
        const float4 qq = load4(q_row + d);
        const float4 gg = load4(do_row + d);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          s[r] = dot4(qq, load4(k_rows + r * dp + d), s[r]);
          dpv[r] = dot4(gg, load4(v_rows + r * dp + d), dpv[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int key = k_first + warp * kRows + r;
        const bool visible = lane < valid_q && key < m && (!causal || key <= qi + causal_shift);
        const float p = visible ? exp2f(s[r] - lse2) : 0.f;
        p_s[(warp * kRows + r) * kQueryTile + lane] = p;
        ds_s[(warp * kRows + r) * kQueryTile + lane] = p * (dpv[r] - dlt);
      }
    }
    __syncthreads();

    if (i0 + valid_q > warp_q_lo) {
      // dV += P^T dO, dK += dS^T Q (scale applied at the end): lane l <-> columns l + 32 c.
      const int q_count = (valid_q + 3) & ~3;
      for (int i = 0; i < q_count; i += 4) {
        float qq[4][kChunks], gg[4][kChunks];
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            const int d = c * kWarpSize + lane;
            qq[ii][c] = d < dp ? q_s[(i + ii) * ldq + d] : 0.f;
            gg[ii][c] = d < dp ? do_s[(i + ii) * ldq + d] : 0.f;
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float4 p4 = load4(p_s + (warp * kRows + r) * kQueryTile + i);
          const float4 s4 = load4(ds_s + (warp * kRows + r) * kQueryTile + i);
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            float a = dv[r][c];
            a = fmaf(p4.x, gg[0][c], a);
            a = fmaf(p4.y, gg[1][c], a);
            a = fmaf(p4.z, gg[2][c], a);
            dv[r][c] = fmaf(p4.w, gg[3][c], a);
            float e = dk[r][c];
            e = fmaf(s4.x, qq[0][c], e);
            e = fmaf(s4.y, qq[1][c], e);
            e = fmaf(s4.z, qq[2][c], e);
            dk[r][c] = fmaf(s4.w, qq[3][c], e);
          }
        }
      }
    }
  }

  if (!warp_active) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int key = k_first + warp * kRows + r;
    if (key >= m) continue;  // warp-uniform
    const int64_t offset = (kv_begin + key) * row_stride + head_offset;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = c * kWarpSize + lane;
      if (d < head_dim) {
        store_float(grad_k + offset + d, dk[r][c] * scale);
        store_float(grad_v + offset + d, dv[r][c]);
      }
    }
  }
}

// dQ for one (sample, query tile of kWarps * kRows queries, head): the mirror of the forward, with the
// probabilities recomputed from lse. Queries that see no key get dQ = 0.
template <typename T, int kHeadDimMax, int kRows>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    attention_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                            const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                            const int64_t* __restrict__ q_offsets, const int64_t* __restrict__ kv_offsets,
                            const int* __restrict__ tiles, int heads, int head_dim, float scale, bool causal,
                            T* __restrict__ grad_q) {
  constexpr int kBlockQ = kWarps * kRows;
  constexpr int kChunks = kHeadDimMax / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int h = blockIdx.y;
  const int b = tiles[2 * blockIdx.x];
  const int q_first = tiles[2 * blockIdx.x + 1];
  const int64_t q_begin = q_offsets[b];
  const int n = static_cast<int>(q_offsets[b + 1] - q_begin);
  const int64_t kv_begin = kv_offsets[b];
  const int m = static_cast<int>(kv_offsets[b + 1] - kv_begin);
  const int valid_q = imin(kBlockQ, n - q_first);
  const int kv_end = static_cast<int>(visible_keys_end(q_first, valid_q, n, m, causal));
  const int dp = padded_head_dim(head_dim);
  const int ldk = dp + 4;
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t head_offset = static_cast<int64_t>(h) * head_dim;
  const float scale_log2 = scale * kLog2e;

  float* q_s = dynamic_shared<float>();
  float* do_s = q_s + kBlockQ * dp;
  float* k_s = do_s + kBlockQ * dp;
  float* v_s = k_s + kKeyTile * ldk;
  float* ds_s = v_s + kKeyTile * ldk;

  const int64_t q_row0 = (q_begin + q_first) * row_stride + head_offset;
  stage_rows<kBlockQ>(q_s, dp, q + q_row0, row_stride, valid_q, head_dim, dp, scale_log2);
  stage_rows<kBlockQ>(do_s, dp, grad_out + q_row0, row_stride, valid_q, head_dim, dp, 1.f);

  const bool warp_active = warp * kRows < valid_q;
  // Keys [0, warp_kv_end) are visible to some row of this warp (causal: fewer than the block's): the warp
  // skips later key tiles, which would only add zeros.
  const int warp_kv_end =
      warp_active ? static_cast<int>(visible_keys_end(q_first + warp * kRows, imin(kRows, valid_q - warp * kRows), n,
                                                      m, causal))
                  : 0;
  const int causal_shift = m - n;
  float acc[kRows][kChunks];
  float lse2[kRows], dlt[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int qi = q_first + warp * kRows + r;
    lse2[r] = 0.f;
    dlt[r] = 0.f;
    if (qi < n) {
      lse2[r] = __ldg(lse + (q_begin + qi) * heads + h) * kLog2e;
      dlt[r] = __ldg(delta + (q_begin + qi) * heads + h);
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) acc[r][c] = 0.f;
  }

  for (int k0 = 0; k0 < kv_end; k0 += kKeyTile) {
    const int valid_k = imin(kKeyTile, kv_end - k0);
    __syncthreads();
    const int64_t kv_row0 = (kv_begin + k0) * row_stride + head_offset;
    stage_rows<kKeyTile>(k_s, ldk, k + kv_row0, row_stride, valid_k, head_dim, dp, 1.f);
    stage_rows<kKeyTile>(v_s, ldk, v + kv_row0, row_stride, valid_k, head_dim, dp, 1.f);
    __syncthreads();

    if (k0 < warp_kv_end) {
      // Lane j <-> key k0 + j.
      float s[kRows], dpv[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = dpv[r] = 0.f;
      const float* k_row = k_s + lane * ldk;
      const float* v_row = v_s + lane * ldk;
      const float* q_rows = q_s + warp * kRows * dp;
      const float* do_rows = do_s + warp * kRows * dp;
      for (int d = 0; d < dp; d += 4) {
        const float4 kk = load4(k_row + d);
        const float4 vv = load4(v_row + d);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          s[r] = dot4(load4(q_rows + r * dp + d), kk, s[r]);
          dpv[r] = dot4(load4(do_rows + r * dp + d), vv, dpv[r]);
        }
      }
      const int key = k0 + lane;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int qi = q_first + warp * kRows + r;
        const bool visible = key < kv_end && qi < n && (!causal || key <= qi + causal_shift);
        const float p = visible ? exp2f(s[r] - lse2[r]) : 0.f;
        ds_s[(warp * kRows + r) * kKeyTile + lane] = p * (dpv[r] - dlt[r]);
      }
    }
    __syncthreads();

    if (k0 < warp_kv_end) {
      // acc += dS K: lane l <-> columns l + 32 c.
      const int kv_count = (valid_k + 3) & ~3;
      for (int j = 0; j < kv_count; j += 4) {
        float kk[4][kChunks];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            const int d = c * kWarpSize + lane;
            kk[jj][c] = d < dp ? k_s[(j + jj) * ldk + d] : 0.f;
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float4 s4 = load4(ds_s + (warp * kRows + r) * kKeyTile + j);
#pragma unroll
          for (int c = 0; c < kChunks; ++c) {
            float a = acc[r][c];
            a = fmaf(s4.x, kk[0][c], a);
            a = fmaf(s4.y, kk[1][c], a);
            a = fmaf(s4.z, kk[2][c], a);
            acc[r][c] = fmaf(s4.w, kk[3][c], a);
          }
        }
      }
    }
  }

  if (!warp_active) return;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int qi = q_first + warp * kRows + r;
    if (qi >= n) continue;  // warp-uniform
    T* g = grad_q + (q_begin + qi) * row_stride + head_offset;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = c * kWarpSize + lane;
      if (d < head_dim) store_float(g + d, acc[r][c] * scale);
    }
  }
}

// ---- generic path: any head dim, and float64 --------------------------------------------------------
// The tiled kernels above keep head_dim / 32 accumulators per lane in registers, so they stop at
// kAttentionMaxHeadDim, and they compute in fp32. These simple kernels cover the rest (float64, used
// by gradcheck, and head dims above 128): one thread per (row, head), exact two-pass softmax in the
// accumulation type Acc (double for float64, float otherwise), accumulators in a global workspace of
// Acc (the output itself when T == Acc). Slow but exact; the same semantics as the tiled kernels.

__device__ __forceinline__ double load_float(const double* p) { return __ldg(p); }
__device__ __forceinline__ void store_float(double* p, double x) { *p = x; }
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename Acc, typename T>
__device__ __forceinline__ Acc load_acc(const T* p) {
  return static_cast<Acc>(load_float(p));
}

// Largest b with offsets[b] <= row (offsets non-decreasing, offsets[0] = 0 <= row < offsets[batch]):
// the sample that owns `row` (empty samples share their offset with the next one and are skipped).
__device__ __forceinline__ int owning_sample(const int64_t* __restrict__ offsets, int batch, int64_t row) {
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename Acc, typename T>
__device__ __forceinline__ Acc dot_rows(const T* __restrict__ a, const T* __restrict__ b, int head_dim) {
  Acc sum = 0;
  for (int d = 0; d < head_dim; ++d) sum += load_acc<Acc>(a + d) * load_acc<Acc>(b + d);
  return sum;
}

// Log-sum-exp of the scaled scores of query row `row` (head h) over its visible keys [0, visible);
// -inf when visible == 0.
template <typename Acc, typename T>
__device__ __forceinline__ Acc generic_row_lse(const T* __restrict__ q_row, const T* __restrict__ k, int64_t kv_begin,
                                               int visible, int64_t row_stride, int head_dim, Acc scale) {
  if (visible == 0) return -INFINITY;
  Acc mx = -INFINITY;
  for (int j = 0; j < visible; ++j) {
    const Acc s = dot_rows<Acc>(q_row, k + (kv_begin + j) * row_stride, head_dim) * scale;
    mx = s > mx ? s : mx;
  }
  Acc sum = 0;
  for (int j = 0; j < visible; ++j) {
    sum += acc_exp(dot_rows<Acc>(q_row, k + (kv_begin + j) * row_stride, head_dim) * scale - mx);
  }
  return mx + acc_log(sum);
}

// Forward: thread per (query row, head). acc [Nq, H, Dh] workspace (may alias out when T == Acc).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    attention_generic_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 const int64_t* __restrict__ q_offsets, const int64_t* __restrict__ kv_offsets,
                                 int batch, int64_t total_q, int heads, int head_dim, Acc scale, bool causal, Acc* acc,
                                 T* out, float* __restrict__ lse) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= total_q * heads) return;
  const int64_t row = item / heads;
  const int h = static_cast<int>(item % heads);
  const int b = owning_sample(q_offsets, batch, row);
  const int64_t n = q_offsets[b + 1] - q_offsets[b];
  const int64_t m = kv_offsets[b + 1] - kv_offsets[b];
  const int64_t i = row - q_offsets[b];
  const int visible = static_cast<int>(visible_keys_end(i, 1, n, m, causal));
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t offset = row * row_stride + static_cast<int64_t>(h) * head_dim;
  const T* q_row = q + offset;
  const T* k_h = k + static_cast<int64_t>(h) * head_dim;
  const T* v_h = v + static_cast<int64_t>(h) * head_dim;
  const Acc row_lse = generic_row_lse<Acc>(q_row, k_h, kv_offsets[b], visible, row_stride, head_dim, scale);
  Acc* a = acc + offset;
  for (int d = 0; d < head_dim; ++d) a[d] = 0;
  for (int j = 0; j < visible; ++j) {
    const int64_t kv_row = (kv_offsets[b] + j) * row_stride;
    const Acc p = acc_exp(dot_rows<Acc>(q_row, k_h + kv_row, head_dim) * scale - row_lse);
    for (int d = 0; d < head_dim; ++d) a[d] += p * load_acc<Acc>(v_h + kv_row + d);
  }
  for (int d = 0; d < head_dim; ++d) store_float(out + offset + d, a[d]);
  lse[row * heads + h] = visible > 0 ? static_cast<float>(row_lse) : kEmptyLse;
}

// Backward preprocessing: per (query row, head), lse recomputed in Acc (the stored lse is fp32) and
// delta = rowsum(dO * O).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    attention_generic_bwd_prep_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                                      const T* __restrict__ k, const T* __restrict__ out,
                                      const int64_t* __restrict__ q_offsets, const int64_t* __restrict__ kv_offsets,
                                      int batch, int64_t total_q, int heads, int head_dim, Acc scale, bool causal,
                                      Acc* __restrict__ row_lse, Acc* __restrict__ delta) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= total_q * heads) return;
  const int64_t row = item / heads;
  const int h = static_cast<int>(item % heads);
  const int b = owning_sample(q_offsets, batch, row);
  const int64_t n = q_offsets[b + 1] - q_offsets[b];
  const int64_t m = kv_offsets[b + 1] - kv_offsets[b];
  const int visible = static_cast<int>(visible_keys_end(row - q_offsets[b], 1, n, m, causal));
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t offset = row * row_stride + static_cast<int64_t>(h) * head_dim;
  row_lse[item] = generic_row_lse<Acc>(q + offset, k + static_cast<int64_t>(h) * head_dim, kv_offsets[b], visible,
                                       row_stride, head_dim, scale);
  delta[item] = dot_rows<Acc>(grad_out + offset, out + offset, head_dim);
}

// dQ: thread per (query row, head). acc [Nq, H, Dh] workspace (may alias grad_q when T == Acc).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    attention_generic_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const Acc* __restrict__ row_lse,
                                    const Acc* __restrict__ delta, const int64_t* __restrict__ q_offsets,
                                    const int64_t* __restrict__ kv_offsets, int batch, int64_t total_q, int heads,
                                    int head_dim, Acc scale, bool causal, Acc* acc, T* grad_q) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= total_q * heads) return;
  const int64_t row = item / heads;
  const int h = static_cast<int>(item % heads);
  const int b = owning_sample(q_offsets, batch, row);
  const int64_t n = q_offsets[b + 1] - q_offsets[b];
  const int64_t m = kv_offsets[b + 1] - kv_offsets[b];
  const int visible = static_cast<int>(visible_keys_end(row - q_offsets[b], 1, n, m, causal));
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t offset = row * row_stride + static_cast<int64_t>(h) * head_dim;
  const T* k_h = k + static_cast<int64_t>(h) * head_dim;
  const T* v_h = v + static_cast<int64_t>(h) * head_dim;
  Acc* a = acc + offset;
  for (int d = 0; d < head_dim; ++d) a[d] = 0;
  for (int j = 0; j < visible; ++j) {
    const int64_t kv_row = (kv_offsets[b] + j) * row_stride;
    const Acc p = acc_exp(dot_rows<Acc>(q + offset, k_h + kv_row, head_dim) * scale - row_lse[item]);
    const Acc ds = p * (dot_rows<Acc>(grad_out + offset, v_h + kv_row, head_dim) - delta[item]) * scale;
    for (int d = 0; d < head_dim; ++d) a[d] += ds * load_acc<Acc>(k_h + kv_row + d);
  }
  for (int d = 0; d < head_dim; ++d) store_float(grad_q + offset + d, a[d]);
}

// dK, dV: thread per (key row, head). acc_k, acc_v [Nk, H, Dh] workspaces (may alias grad_k, grad_v).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    attention_generic_bwd_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                                      const T* __restrict__ k, const T* __restrict__ v,
                                      const Acc* __restrict__ row_lse, const Acc* __restrict__ delta,
                                      const int64_t* __restrict__ q_offsets, const int64_t* __restrict__ kv_offsets,
                                      int batch, int64_t total_k, int heads, int head_dim, Acc scale, bool causal,
                                      Acc* acc_k, Acc* acc_v, T* grad_k, T* grad_v) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= total_k * heads) return;
  const int64_t key_row = item / heads;
  const int h = static_cast<int>(item % heads);
  const int b = owning_sample(kv_offsets, batch, key_row);
  const int64_t n = q_offsets[b + 1] - q_offsets[b];
  const int64_t m = kv_offsets[b + 1] - kv_offsets[b];
  const int64_t first = first_seeing_query(key_row - kv_offsets[b], n, m, causal);
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t offset = key_row * row_stride + static_cast<int64_t>(h) * head_dim;
  Acc* ak = acc_k + offset;
  Acc* av = acc_v + offset;
  for (int d = 0; d < head_dim; ++d) ak[d] = av[d] = 0;
  for (int64_t i = first; i < n; ++i) {
    const int64_t q_item = (q_offsets[b] + i) * heads + h;
    const int64_t q_off = q_item * head_dim;
    const Acc p = acc_exp(dot_rows<Acc>(q + q_off, k + offset, head_dim) * scale - row_lse[q_item]);
    const Acc ds = p * (dot_rows<Acc>(grad_out + q_off, v + offset, head_dim) - delta[q_item]) * scale;
    for (int d = 0; d < head_dim; ++d) {
      av[d] += p * load_acc<Acc>(grad_out + q_off + d);
      ak[d] += ds * load_acc<Acc>(q + q_off + d);
    }
  }
  for (int d = 0; d < head_dim; ++d) {
    store_float(grad_k + offset + d, ak[d]);
    store_float(grad_v + offset + d, av[d]);
  }
}

}  // namespace attention
}  // namespace cuda
}  // namespace lattice
