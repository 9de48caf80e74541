// CUDA kernel body of lattice::jagged_embedding_pool_int8: the forward of jagged_embedding_pool over int8
// row-wise quantized tables (layout in lattice/int8_rows.h). Launched by csrc/cuda/jagged_embedding_pool.cu
// (forward_int8); also compiled as host C++ by the CPU emulator.
//
// The float forward's work split (jagged_embedding_pool_kernels.cuh): a group of G lanes owns one bag, each lane
// owns 8 consecutive columns, read as one 8-byte load of codes (rows are multiples of 8 bytes and the table is
// 8-byte aligned, so the load is aligned and never leaves the row's padded codes). The group fetches G (row,
// weight) pairs with one coalesced load and broadcasts them with width-G shuffles. Per row a lane loads the
// row's (scale, bias) pair (the same 8 bytes for the whole group: one broadcast transaction) and accumulates
// (w * scale) * code in fp32; the w * bias terms are summed once per lane and added at the end.
#pragma once

#include "jagged_embedding_pool_kernels.cuh"
#include "lattice/int8_rows.h"

namespace lattice {
namespace cuda {
namespace pool {

constexpr int kInt8Vec = 8;  // columns (bytes of codes) per lane and load

template <typename index_t>
__global__ void pool_forward_int8_kernel(const unsigned char* __restrict__ weights, long long row_bytes,
                                         long long rows_total, TableRows tables, const index_t* __restrict__ indices,
                                         const index_t* __restrict__ offsets,
                                         const float* __restrict__ per_sample_weights, long long num_indices, int T,
                                         long long B, int D, int group_size, int mean, float* __restrict__ out) {
  const Group g = Group::make(group_size);
  const long long code_bytes = int8_rows::code_bytes(D);
  const long long num_bags = static_cast<long long>(T) * B;
  for (long long bag = g.id; bag < num_bags; bag += g.stride()) {
    const int t = static_cast<int>(bag / B);
    const long long b = bag - static_cast<long long>(t) * B;
    long long start, end;
    clamp_range(offsets, bag, num_indices, start, end);
    const long long row_base = tables.start(t);
    const long long rows_t = tables.end(t) - row_base;
    const float inv = (mean && end > start) ? 1.0f / static_cast<float>(end - start) : 1.0f;
    float* out_row = out + (b * T + t) * static_cast<long long>(D);
    for (int c0 = 0; c0 < D; c0 += g.size * kInt8Vec) {
      const int c = c0 + g.lane * kInt8Vec;
      const bool active = c < D;
      float acc[kInt8Vec];
#pragma unroll
      for (int k = 0; k < kInt8Vec; ++k) acc[k] = 0.0f;
      float bias_sum = 0.0f;
      for (long long j0 = start; j0 < end; j0 += g.size) {
        long long my_row = -1;
        float my_w = 1.0f;
        if (j0 + g.lane < end) {
          const long long idx = static_cast<long long>(__ldg(&indices[j0 + g.lane]));
          const long long row = row_base + idx;
          if (idx >= 0 && idx < rows_t && row >= 0 && row < rows_total) my_row = row;
          if (per_sample_weights) my_w = __ldg(&per_sample_weights[j0 + g.lane]);
        }
        const int cnt = static_cast<int>(end - j0 < g.size ? end - j0 : g.size);
        for (int k = 0; k < cnt; ++k) {
          const long long row = __shfl_sync(g.mask, my_row, k, g.size);
          const float w = per_sample_weights ? __shfl_sync(g.mask, my_w, k, g.size) : 1.0f;
          if (active && row >= 0) {
            const unsigned char* r = weights + row * row_bytes;
            const float2 qp = __ldg(reinterpret_cast<const float2*>(r + code_bytes));
            const float s = w * qp.x;
            bias_sum += w * qp.y;
            union {
              uint2 raw;
              unsigned char codes[kInt8Vec];
            } u;
            u.raw = __ldg(reinterpret_cast<const uint2*>(r + c));
#pragma unroll
            for (int e = 0; e < kInt8Vec; ++e) acc[e] += s * static_cast<float>(u.codes[e]);
          }
        }
      }
      if (active) {
#pragma unroll
        for (int e = 0; e < kInt8Vec; ++e) {
          if (c + e < D) out_row[c + e] = (acc[e] + bias_sum) * inv;
        }
      }
    }
  }
}

}  // namespace pool
}  // namespace cuda
}  // namespace lattice
