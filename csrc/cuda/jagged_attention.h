// Host-side interface of the CUDA jagged attention kernels (no torch headers): the tile planner that
// turns per-sample lengths into the work lists the kernels consume, and the launchers (raw pointers +
// stream) implemented in jagged_attention.cu. Used by the torch glue and by the emulator tests.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include <cuda_runtime.h>

namespace lattice {
namespace cuda {

enum class AttentionDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Largest head dim of the tiled kernels (register accumulators are sized at compile time).
constexpr int kAttentionMaxHeadDim = 128;

// The tiled kernels take fp32/fp16/bf16 with head_dim <= kAttentionMaxHeadDim; everything else (float64,
// larger head dims) goes through the generic thread-per-row kernels (the *_generic launchers).
inline bool attention_uses_generic(AttentionDtype dtype, int head_dim) {
  return dtype == AttentionDtype::kFloat64 || head_dim > kAttentionMaxHeadDim;
}

// Whether the large tiles run on tensor cores (jagged_attention_tc_kernels.cuh): always for bf16/fp16
// (fp32 accumulation), for fp32 only as tf32 when the caller allows it (torch's allow_tf32 for matmuls:
// tf32 keeps 10 mantissa bits). Needs compute capability 8.0 or newer: the glue passes
// allow_tensor_cores = false below that.
inline bool attention_uses_tensor_cores(AttentionDtype dtype, bool allow_tf32, bool allow_tensor_cores = true) {
  if (!allow_tensor_cores) return false;
  return dtype == AttentionDtype::kFloat16 || dtype == AttentionDtype::kBFloat16 ||
         (dtype == AttentionDtype::kFloat32 && allow_tf32);
}

// Rows per block of each kernel for a head dim: the compiled variants (see jagged_attention.cu). The
// forward and dq kernels come in a small FMA variant (8 queries: a few summary tokens per sample) and a
// large one: on tensor cores 64 queries (dK/dV: 64 keys) for every head dim; on FMA tiles smaller for head
// dim 128 to stay within 48 KiB of shared memory.
struct AttentionBlockSizes {
  int forward_small, forward_large, dq_small, dq_large, dkdv;
};

inline int attention_head_dim_class(int head_dim) { return head_dim <= 32 ? 32 : (head_dim <= 64 ? 64 : 128); }

inline AttentionBlockSizes attention_block_sizes(int head_dim, bool tensor_cores = false) {
  if (tensor_cores) return AttentionBlockSizes{8, 64, 8, 64, 64};
  return attention_head_dim_class(head_dim) == 128 ? AttentionBlockSizes{8, 16, 8, 8, 8}
                                                   : AttentionBlockSizes{8, 64, 8, 32, 32};
}

// A work list: `tiles` holds (sample, first row) pairs, one per block, heaviest first (so the long
// samples start early and short ones fill the tail); `block` rows per tile.
struct AttentionTilePlan {
  int block = 0;
  std::vector<int32_t> tiles;
  int64_t num_tiles() const { return static_cast<int64_t>(tiles.size() / 2); }
};

namespace plan_detail {

// Tiles of `block` rows over every sample's rows (queries when `over_queries`, else keys), each with its
// work estimate: the number of (row, visible partner) pairs of the padded tile, plus a fixed per-tile
// overhead worth one 32-wide partner tile. Samples with no partners still get tiles (their rows must be
// written: zeros).
inline AttentionTilePlan make_tiles(const int64_t* q_offsets, const int64_t* kv_offsets, int64_t batch, int block,
                                    bool causal, bool over_queries, double* cost) {
  std::vector<int32_t> tiles;
  std::vector<int64_t> work;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = q_offsets[b + 1] - q_offsets[b];
    const int64_t m = kv_offsets[b + 1] - kv_offsets[b];
    const int64_t rows = over_queries ? n : m;
    for (int64_t first = 0; first < rows; first += block) {
      const int64_t count = std::min<int64_t>(block, rows - first);
      int64_t partners;
      if (over_queries) {
        partners = causal ? std::min(m, std::max<int64_t>(0, first + count + m - n)) : m;
      } else {
        partners = causal ? n - std::min(n, std::max<int64_t>(0, first - (m - n))) : n;
      }
      tiles.push_back(static_cast<int32_t>(b));
      tiles.push_back(static_cast<int32_t>(first));
      work.push_back(static_cast<int64_t>(block) * (partners + 32));
    }
  }
  std::vector<int64_t> order(work.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return work[a] > work[c]; });
  AttentionTilePlan plan;
  plan.block = block;
  plan.tiles.resize(tiles.size());
  double total = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    plan.tiles[2 * i] = tiles[2 * order[i]];
    plan.tiles[2 * i + 1] = tiles[2 * order[i] + 1];
    total += static_cast<double>(work[order[i]]);
  }
  if (cost != nullptr) *cost = total;
  return plan;
}

// Picks the large query tile unless its padding costs more than kLargeTileAdvantage times the small
// tile's work (a large tile reuses each staged K/V tile for 8x more queries, so it stays the faster
// choice while its padded work is moderately larger), or unless it would leave the GPU underfilled:
// fewer than `min_tiles` tiles while the small tile makes more. (Untuned estimates;
// benchmarks/gpu_check.sh is where to tune them on a GPU.)
constexpr double kLargeTileAdvantage = 1.5;

inline AttentionTilePlan plan_query_tiles(const int64_t* q_offsets, const int64_t* kv_offsets, int64_t batch,
                                          bool causal, int small_block, int large_block, int64_t min_tiles) {
  double small_cost = 0, large_cost = 0;
  AttentionTilePlan small = make_tiles(q_offsets, kv_offsets, batch, small_block, causal, true, &small_cost);
  if (large_block == small_block) return small;
  AttentionTilePlan large = make_tiles(q_offsets, kv_offsets, batch, large_block, causal, true, &large_cost);
  if (large.num_tiles() < min_tiles && small.num_tiles() > large.num_tiles()) return small;
  return large_cost <= kLargeTileAdvantage * small_cost ? large : small;
}

}  // namespace plan_detail

// Host copies of q_offsets / kv_offsets [batch + 1] (validated) -> the forward's query tiles. min_tiles:
// the number of tiles (blocks per head) below which the GPU would be underfilled, e.g.
// 2 * multiprocessors / heads; 0 ignores occupancy.
// tensor_cores: attention_uses_tensor_cores() of the call.
inline AttentionTilePlan plan_attention_forward(const int64_t* q_offsets, const int64_t* kv_offsets, int64_t batch,
                                                int head_dim, bool causal, bool tensor_cores, int64_t min_tiles = 0) {
  const AttentionBlockSizes sizes = attention_block_sizes(head_dim, tensor_cores);
  return plan_detail::plan_query_tiles(q_offsets, kv_offsets, batch, causal, sizes.forward_small, sizes.forward_large,
                                       min_tiles);
}

// The backward's dQ query tiles.
inline AttentionTilePlan plan_attention_backward_dq(const int64_t* q_offsets, const int64_t* kv_offsets,
                                                    int64_t batch, int head_dim, bool causal, bool tensor_cores,
                                                    int64_t min_tiles = 0) {
  const AttentionBlockSizes sizes = attention_block_sizes(head_dim, tensor_cores);
  return plan_detail::plan_query_tiles(q_offsets, kv_offsets, batch, causal, sizes.dq_small, sizes.dq_large,
                                       min_tiles);
}

// The backward's dK/dV key tiles.
inline AttentionTilePlan plan_attention_backward_dkdv(const int64_t* q_offsets, const int64_t* kv_offsets,
                                                      int64_t batch, int head_dim, bool causal,
                                                      bool tensor_cores) {
  return plan_detail::make_tiles(q_offsets, kv_offsets, batch, attention_block_sizes(head_dim, tensor_cores).dkdv,
                                 causal, false, nullptr);
}

// ---- launchers (jagged_attention.cu) ---------------------------------------------------------------
// Pointers are device pointers; q, k, v, out, grad_* are contiguous [N, heads, head_dim] in `dtype`;
// offsets int64 [B+1]; lse, delta fp32 [Nq, heads]; tiles int32 [num_tiles, 2] from the planners above
// (with the plan's block, planned with the same tensor_cores flag). 1 <= head_dim <= kAttentionMaxHeadDim, 1 <= heads <= 65535.

// out, lse: every row of every sample is written (rows past q_offsets[B] are left alone).
void jagged_attention_forward(AttentionDtype dtype, const void* q, const void* k, const void* v,
                              const int64_t* q_offsets, const int64_t* kv_offsets, const int32_t* tiles,
                              int64_t num_tiles, int block_q, int heads, int head_dim, float scale, bool causal,
                              bool tensor_cores, void* out, float* lse, cudaStream_t stream);

// grad_q, grad_k, grad_v: every row of every sample is written. `delta` is an fp32 workspace of
// total_q * heads entries (total_q = rows of q, grad_out and out).
void jagged_attention_backward(AttentionDtype dtype, const void* grad_out, const void* q, const void* k,
                               const void* v, const void* out, const float* lse, const int64_t* q_offsets,
                               const int64_t* kv_offsets, int64_t total_q, const int32_t* dq_tiles,
                               int64_t num_dq_tiles, int block_q, const int32_t* dkdv_tiles, int64_t num_dkdv_tiles,
                               int block_k, int heads, int head_dim, float scale, bool causal, bool tensor_cores,
                               float* delta, void* grad_q, void* grad_k, void* grad_v, cudaStream_t stream);

// Generic path. Workspaces are of the accumulation type (double for kFloat64, float otherwise):
// acc / acc_q [total_q, heads, head_dim], acc_k, acc_v [total_k, heads, head_dim], row_lse and delta
// [total_q, heads]. When the dtype is the accumulation type (float32, float64) acc* may be the output
// tensors themselves. Offsets as above; every row of every sample is written.
void jagged_attention_forward_generic(AttentionDtype dtype, const void* q, const void* k, const void* v,
                                      const int64_t* q_offsets, const int64_t* kv_offsets, int64_t batch,
                                      int64_t total_q, int heads, int head_dim, double scale, bool causal, void* acc,
                                      void* out, float* lse, cudaStream_t stream);

void jagged_attention_backward_generic(AttentionDtype dtype, const void* grad_out, const void* q, const void* k,
                                       const void* v, const void* out, const int64_t* q_offsets,
                                       const int64_t* kv_offsets, int64_t batch, int64_t total_q, int64_t total_k,
                                       int heads, int head_dim, double scale, bool causal, void* row_lse, void* delta,
                                       void* acc_q, void* acc_k, void* acc_v, void* grad_q, void* grad_k,
                                       void* grad_v, cudaStream_t stream);

}  // namespace cuda
}  // namespace lattice
