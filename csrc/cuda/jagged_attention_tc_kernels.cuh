// Tensor-core (WMMA) variants of the jagged attention's large-tile kernels: the forward and the backward's
// dQ and dK/dV kernels, for bf16/fp16 inputs (fp32 accumulation) and fp32 inputs as tf32. Same work lists,
// semantics, online softmax (base 2, running max and sum per row) and causal skipping as the FMA kernels of
// jagged_attention_kernels.cuh, which keep the small query tile (a few summary tokens per sample), fp32
// without tf32, and the backward's dQ small tile.
//
// Every block has kWarps = 4 warps, each owning 16 rows (queries in the forward and dQ kernels, keys in the
// dK/dV kernel): the products are 16 x 16 x kK WMMA tiles (kK = 16 for bf16/fp16, 8 for tf32) of operands
// staged in shared memory in the input type, rows padded by 16 bytes; head dims are zero-padded to a multiple
// of 16. A fragment's element layout is opaque, so everything row-wise (masking, the softmax, the rescale of
// the output by the new row maximum, the conversion of the results) happens on fp32 tiles that a warp stores
// to its own shared scratch: lane l owns row l / 2 and half (l % 2) of its columns there. The forward keeps
// its output rows in registers in that ownership (rescaled each key tile, plus the tile's P.V product read
// back from the scratch); the backward keeps dQ, dK, dV in accumulator fragments (nothing to rescale) and
// writes them through the scratch at the end. Every gradient element is still the sum of one warp in a fixed
// order: deterministic, no atomics.
#pragma once

#include <mma.h>

#include "jagged_attention_kernels.cuh"

namespace lattice {
namespace cuda {
namespace attention {

namespace wm = nvcuda::wmma;

// bf16 and tf32 WMMA need sm_80: compiled for an older architecture (a TORCH_CUDA_ARCH_LIST that names one) the
// kernels are empty traps; the glue never launches them there (attention_uses_tensor_cores).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LATTICE_ATTENTION_TC_UNSUPPORTED 1
#endif

constexpr int kTcRows = 16;                  // rows per warp (the WMMA tile's M)
constexpr int kTcBlock = kWarps * kTcRows;   // rows per block: 64
constexpr int kTcKeyTile = 32;               // keys per K/V tile of the forward and dQ kernels
constexpr int kTcQueryTile = 16;             // queries per Q/dO tile of the dK/dV kernel
constexpr int kScoreLd = kTcKeyTile + 4;     // fp32 scratch rows: 32 scores (or 16 output columns) + pad

// The WMMA fragment type of an input dtype and its K step; fp32 goes through tf32.
template <typename T>
struct TcInput {
  using frag = T;
  static constexpr int k = 16;
};
template <>
struct TcInput<float> {
#ifdef LATTICE_ATTENTION_TC_UNSUPPORTED
  using frag = float;  // no tf32 below sm_80; never instantiated there
#else
  using frag = wm::precision::tf32;
#endif
  static constexpr int k = 8;
};

// Shared-memory row length (elements) of a staged operand: the head dim padded to 16, plus 16 bytes, which
// keeps every fragment pointer 32-byte aligned and ldm a multiple of 16 bytes.
template <typename T>
__host__ __device__ constexpr int tc_ld(int dp16) {
  return dp16 + 16 / static_cast<int>(sizeof(T));
}
template <typename T>
__host__ __device__ constexpr int tc_p_ld() {  // rows of P / dS in the input type (32 keys or 16 queries)
  return kTcKeyTile + 16 / static_cast<int>(sizeof(T));
}
__host__ __device__ constexpr int round16(int x) { return (x + 15) & ~15; }
__host__ __device__ constexpr int round_up_bytes(int x) { return (x + 127) & ~127; }

// Dynamic shared memory of each kernel, in bytes (128-byte multiples, so every region starts 32-byte aligned).
template <typename T>
__host__ __device__ constexpr int tc_fwd_smem_bytes(int dp16) {
  return round_up_bytes(kTcBlock * tc_ld<T>(dp16) * static_cast<int>(sizeof(T))) +       // q tile
         round_up_bytes(2 * kTcKeyTile * tc_ld<T>(dp16) * static_cast<int>(sizeof(T))) +  // k, v tiles
         round_up_bytes(kWarps * kTcRows * kScoreLd * 4) +                              // fp32 scratch
         round_up_bytes(kWarps * kTcRows * tc_p_ld<T>() * static_cast<int>(sizeof(T)));  // P
}
template <typename T>
__host__ __device__ constexpr int tc_dq_smem_bytes(int dp16) {
  return round_up_bytes(2 * kTcBlock * tc_ld<T>(dp16) * static_cast<int>(sizeof(T))) +    // q, dO tiles
         round_up_bytes(2 * kTcKeyTile * tc_ld<T>(dp16) * static_cast<int>(sizeof(T))) +  // k, v tiles
         round_up_bytes(2 * kWarps * kTcRows * kScoreLd * 4) +                          // S, dP scratch
         round_up_bytes(kWarps * kTcRows * tc_p_ld<T>() * static_cast<int>(sizeof(T)));  // dS
}
template <typename T>
__host__ __device__ constexpr int tc_dkdv_smem_bytes(int dp16) {
  return round_up_bytes(2 * kTcBlock * tc_ld<T>(dp16) * static_cast<int>(sizeof(T))) +      // k, v of the block
         round_up_bytes(2 * kTcQueryTile * tc_ld<T>(dp16) * static_cast<int>(sizeof(T))) +  // q, dO tiles
         round_up_bytes(2 * kWarps * kTcRows * kScoreLd * 4) +                            // S^T, dP^T scratch
         round_up_bytes(2 * kWarps * kTcRows * tc_p_ld<T>() * static_cast<int>(sizeof(T))) +  // P^T, dS^T
         round_up_bytes(2 * kTcQueryTile * 4);                                            // lse, delta
}

template <typename T>
__device__ __forceinline__ T to_input(float x);
template <>
__device__ __forceinline__ float to_input<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half to_input<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_input<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float input_to_float(float x) { return x; }
__device__ __forceinline__ float input_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float input_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Copies `kRows` rows of one head into a [kRows, ld] shared tile in the input type; columns
// [head_dim, dp16) and rows >= valid_rows are zero. All threads of the block take part.
template <int kRows, typename T>
__device__ __forceinline__ void stage_tc_rows(T* dst, int ld, const T* __restrict__ src, int64_t row_stride,
                                              int valid_rows, int head_dim, int dp16) {
  const T zero = to_input<T>(0.f);
  for (int i = threadIdx.x; i < kRows * dp16; i += kThreads) {
    const int r = i / dp16, d = i % dp16;
    dst[r * ld + d] = r < valid_rows && d < head_dim ? src[r * row_stride + d] : zero;
  }
}

// fp32 operands (T = float) are rounded to tf32 once loaded, as the WMMA API requires.
template <typename T, typename Frag>
__device__ __forceinline__ void round_tf32(Frag& f) {
#ifndef LATTICE_ATTENTION_TC_UNSUPPORTED
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = wm::__float_to_tf32(f.x[i]);
  }
#endif
}

// C [16, 16] (+)= A [16, kDepth] B [kDepth, 16] over `depth` (a multiple of the K step): A row-major at `a`
// (ld lda); B row-major at `b` (ld ldb) or, with kBColMajor, B^T row-major (i.e. B column-major).
template <typename T, bool kBColMajor>
__device__ __forceinline__ void mma_tile(wm::fragment<wm::accumulator, 16, 16, TcInput<T>::k, float>& c, const T* a,
                                         int lda, const T* b, int ldb, int depth) {
  constexpr int kK = TcInput<T>::k;
  using F = typename TcInput<T>::frag;
  using LB = typename std::conditional<kBColMajor, wm::col_major, wm::row_major>::type;
  for (int kk = 0; kk < depth; kk += kK) {
    wm::fragment<wm::matrix_a, 16, 16, kK, F, wm::row_major> fa;
    wm::fragment<wm::matrix_b, 16, 16, kK, F, LB> fb;
    wm::load_matrix_sync(fa, a + kk, lda);
    wm::load_matrix_sync(fb, kBColMajor ? b + kk : b + kk * ldb, ldb);
    round_tf32<T>(fa);
    round_tf32<T>(fb);
    wm::mma_sync(c, fa, fb, c);
  }
}

template <typename T>
using TcAcc = wm::fragment<wm::accumulator, 16, 16, TcInput<T>::k, float>;

// Scratch [16, cols] fp32 (ld kScoreLd) := A [16, depth] B^T where B^T is [cols, depth] row-major; cols is a
// multiple of 16.
template <typename T>
__device__ __forceinline__ void scores_to_scratch(float* scratch, const T* a, int lda, const T* bt, int ldb, int cols,
                                                  int depth) {
  for (int n0 = 0; n0 < cols; n0 += 16) {
    TcAcc<T> s;
    wm::fill_fragment(s, 0.f);
    mma_tile<T, true>(s, a, lda, bt + n0 * ldb, ldb, depth);
    wm::store_matrix_sync(scratch + n0, s, kScoreLd, wm::mem_row_major);
  }
}

// Writes a warp's [16, dp16] result held in accumulator fragments (times `mul`) to rows row0.. of a [N, H, Dh]
// tensor (rows >= valid_rows and columns >= head_dim are dropped), through the warp's fp32 scratch.
template <typename T, int kChunks>
__device__ __forceinline__ void write_fragments(TcAcc<T> (&acc)[kChunks], float mul, float* scratch, T* __restrict__ dst,
                                                int64_t row_stride, int valid_rows, int head_dim, int dp16, int lane) {
  const int row = lane >> 1, half = lane & 1;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (c * 16 >= dp16) break;  // warp-uniform
#pragma unroll
    for (int i = 0; i < acc[c].num_elements; ++i) acc[c].x[i] *= mul;
    wm::store_matrix_sync(scratch, acc[c], kScoreLd, wm::mem_row_major);
    __syncwarp();
    if (row < valid_rows) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int d = c * 16 + half * 8 + e;
        if (d < head_dim) store_float(dst + row * row_stride + d, scratch[row * kScoreLd + half * 8 + e]);
      }
    }
    __syncwarp();  // the scratch is read before the next chunk overwrites it
  }
}

// ---- forward -----------------------------------------------------------------------------------------

template <typename T, int kHeadDimMax>
__global__ void __launch_bounds__(kThreads)
    attention_fwd_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const int64_t* __restrict__ q_offsets, const int64_t* __restrict__ kv_offsets,
                            const int* __restrict__ tiles, int heads, int head_dim, float scale, bool causal,
                            T* __restrict__ out, float* __restrict__ lse) {
#ifdef LATTICE_ATTENTION_TC_UNSUPPORTED
  __trap();
#else
  constexpr int kChunks = kHeadDimMax / 16;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int row = lane >> 1, half = lane & 1;  // scratch ownership: row, 16 of its 32 keys / 8 of 16 columns
  const int h = blockIdx.y;
  const int b = tiles[2 * blockIdx.x];
  const int q_first = tiles[2 * blockIdx.x + 1];
  const int64_t q_begin = q_offsets[b];
  const int n = static_cast<int>(q_offsets[b + 1] - q_begin);
  const int64_t kv_begin = kv_offsets[b];
  const int m = static_cast<int>(kv_offsets[b + 1] - kv_begin);
  const int valid_q = imin(kTcBlock, n - q_first);
  const int kv_end = static_cast<int>(visible_keys_end(q_first, valid_q, n, m, causal));
  const int dp16 = round16(head_dim);
  const int ld = tc_ld<T>(dp16);
  constexpr int ldp = tc_p_ld<T>();
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t head_offset = static_cast<int64_t>(h) * head_dim;

  unsigned char* smem = dynamic_shared<unsigned char>();
  T* q_s = reinterpret_cast<T*>(smem);
  smem += round_up_bytes(kTcBlock * ld * static_cast<int>(sizeof(T)));
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kTcKeyTile * ld;
  smem += round_up_bytes(2 * kTcKeyTile * ld * static_cast<int>(sizeof(T)));
  float* scratch = reinterpret_cast<float*>(smem) + warp * kTcRows * kScoreLd;
  smem += round_up_bytes(kWarps * kTcRows * kScoreLd * 4);
  T* p_w = reinterpret_cast<T*>(smem) + warp * kTcRows * ldp;

  stage_tc_rows<kTcBlock>(q_s, ld, q + (q_begin + q_first) * row_stride + head_offset, row_stride, valid_q, head_dim,
                          dp16);
  const T* q_w = q_s + warp * kTcRows * ld;

  const bool warp_active = warp * kTcRows < valid_q;
  const int warp_kv_end =
      warp_active ? static_cast<int>(visible_keys_end(q_first + warp * kTcRows,
                                                      imin(kTcRows, valid_q - warp * kTcRows), n, m, causal))
                  : 0;
  const int qi = q_first + warp * kTcRows + row;  // this lane's query
  const int last_key = causal ? qi + (m - n) : m - 1;
  const float scale_log2 = scale * kLog2e;
  float acc[kChunks][8];
  float row_max = -INFINITY;  // running max of the base-2 scores, the same in both lanes of the row
  float row_sum = 0.f;        // running sum of exp2(score - row_max) over this lane's keys
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[c][e] = 0.f;
  }

  for (int k0 = 0; k0 < kv_end; k0 += kTcKeyTile) {
    const int valid_k = imin(kTcKeyTile, kv_end - k0);
    __syncthreads();  // the previous K/V tile is consumed (first time: q_s is visible after the next barrier)
    const int64_t kv_row0 = (kv_begin + k0) * row_stride + head_offset;
    stage_tc_rows<kTcKeyTile>(k_s, ld, k + kv_row0, row_stride, valid_k, head_dim, dp16);
    stage_tc_rows<kTcKeyTile>(v_s, ld, v + kv_row0, row_stride, valid_k, head_dim, dp16);
    __syncthreads();
    if (k0 >= warp_kv_end) continue;  // warp-uniform: no key of this tile is visible to the warp's rows

    scores_to_scratch<T>(scratch, q_w, ld, k_s, ld, kTcKeyTile, dp16);
    __syncwarp();
    float s[16];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int key = k0 + half * 16 + j;
      const bool visible = key < kv_end && key <= last_key;
      s[j] = visible ? scratch[row * kScoreLd + half * 16 + j] * scale_log2 : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    const float new_max = fmaxf(row_max, fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1)));
    const float base = new_max == -INFINITY ? 0.f : new_max;  // all masked so far: avoid inf - inf
    const float alpha = exp2f(row_max - base);
    float tile_sum = 0.f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float p = exp2f(s[j] - base);
      tile_sum += p;
      p_w[row * ldp + half * 16 + j] = to_input<T>(p);
    }
    row_max = new_max;
    row_sum = row_sum * alpha + tile_sum;
    __syncwarp();  // P is complete and every lane has read its scores before the scratch is reused

    // acc = alpha * acc + P V, 16 output columns at a time through the scratch.
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (c * 16 >= dp16) break;  // warp-uniform
      TcAcc<T> pv;
      wm::fill_fragment(pv, 0.f);
      mma_tile<T, false>(pv, p_w, ldp, v_s + c * 16, ld, kTcKeyTile);
      wm::store_matrix_sync(scratch, pv, kScoreLd, wm::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[c][e] = fmaf(acc[c][e], alpha, scratch[row * kScoreLd + half * 8 + e]);
      __syncwarp();
    }
  }

  if (!warp_active) return;  // no barrier follows
  const float total = row_sum + __shfl_xor_sync(kFullMask, row_sum, 1);
  if (qi >= n) return;  // the warp's last rows of a partial tile; no collective follows
  const int64_t r = q_begin + qi;
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* o = out + r * row_stride + head_offset;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = c * 16 + half * 8 + e;
      if (d < head_dim) store_float(o + d, acc[c][e] * inv);
    }
  }
  if (half == 0) lse[r * heads + h] = total > 0.f ? (row_max + log2f(total)) * kLn2 : kEmptyLse;
#endif
}

// ---- backward: dQ ------------------------------------------------------------------------------------

template <typename T, int kHeadDimMax>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_dq_tc_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                               const int64_t* __restrict__ q_offsets, const int64_t* __restrict__ kv_offsets,
                               const int* __restrict__ tiles, int heads, int head_dim, float scale, bool causal,
                               T* __restrict__ grad_q) {
#ifdef LATTICE_ATTENTION_TC_UNSUPPORTED
  __trap();
#else
  constexpr int kChunks = kHeadDimMax / 16;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int row = lane >> 1, half = lane & 1;
  const int h = blockIdx.y;
  const int b = tiles[2 * blockIdx.x];
  const int q_first = tiles[2 * blockIdx.x + 1];
  const int64_t q_begin = q_offsets[b];
  const int n = static_cast<int>(q_offsets[b + 1] - q_begin);
  const int64_t kv_begin = kv_offsets[b];
  const int m = static_cast<int>(kv_offsets[b + 1] - kv_begin);
  const int valid_q = imin(kTcBlock, n - q_first);
  const int kv_end = static_cast<int>(visible_keys_end(q_first, valid_q, n, m, causal));
  const int dp16 = round16(head_dim);
  const int ld = tc_ld<T>(dp16);
  constexpr int ldp = tc_p_ld<T>();
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t head_offset = static_cast<int64_t>(h) * head_dim;

  unsigned char* smem = dynamic_shared<unsigned char>();
  T* q_s = reinterpret_cast<T*>(smem);
  T* do_s = q_s + kTcBlock * ld;
  smem += round_up_bytes(2 * kTcBlock * ld * static_cast<int>(sizeof(T)));
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kTcKeyTile * ld;
  smem += round_up_bytes(2 * kTcKeyTile * ld * static_cast<int>(sizeof(T)));
  float* s_w = reinterpret_cast<float*>(smem) + warp * 2 * kTcRows * kScoreLd;
  float* dp_w = s_w + kTcRows * kScoreLd;
  smem += round_up_bytes(2 * kWarps * kTcRows * kScoreLd * 4);
  T* ds_w = reinterpret_cast<T*>(smem) + warp * kTcRows * ldp;

  const int64_t q_row0 = (q_begin + q_first) * row_stride + head_offset;
  stage_tc_rows<kTcBlock>(q_s, ld, q + q_row0, row_stride, valid_q, head_dim, dp16);
  stage_tc_rows<kTcBlock>(do_s, ld, grad_out + q_row0, row_stride, valid_q, head_dim, dp16);
  const T* q_w = q_s + warp * kTcRows * ld;
  const T* do_w = do_s + warp * kTcRows * ld;

  const bool warp_active = warp * kTcRows < valid_q;
  const int warp_kv_end =
      warp_active ? static_cast<int>(visible_keys_end(q_first + warp * kTcRows,
                                                      imin(kTcRows, valid_q - warp * kTcRows), n, m, causal))
                  : 0;
  const int qi = q_first + warp * kTcRows + row;
  const int last_key = causal ? qi + (m - n) : m - 1;
  const float scale_log2 = scale * kLog2e;
  float lse2 = 0.f, dlt = 0.f;
  if (qi < n) {
    lse2 = __ldg(lse + (q_begin + qi) * heads + h) * kLog2e;
    dlt = __ldg(delta + (q_begin + qi) * heads + h);
  }
  TcAcc<T> dq[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (warp_active) wm::fill_fragment(dq[c], 0.f);  // warp-uniform
  }

  for (int k0 = 0; k0 < kv_end; k0 += kTcKeyTile) {
    const int valid_k = imin(kTcKeyTile, kv_end - k0);
    __syncthreads();
    const int64_t kv_row0 = (kv_begin + k0) * row_stride + head_offset;
    stage_tc_rows<kTcKeyTile>(k_s, ld, k + kv_row0, row_stride, valid_k, head_dim, dp16);
    stage_tc_rows<kTcKeyTile>(v_s, ld, v + kv_row0, row_stride, valid_k, head_dim, dp16);
    __syncthreads();
    if (k0 >= warp_kv_end) continue;  // warp-uniform

    scores_to_scratch<T>(s_w, q_w, ld, k_s, ld, kTcKeyTile, dp16);
    scores_to_scratch<T>(dp_w, do_w, ld, v_s, ld, kTcKeyTile, dp16);
    __syncwarp();
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col = half * 16 + j;
      const int key = k0 + col;
      const bool visible = qi < n && key < kv_end && key <= last_key;
      const float p = visible ? exp2f(s_w[row * kScoreLd + col] * scale_log2 - lse2) : 0.f;
      ds_w[row * ldp + col] = to_input<T>(p * (dp_w[row * kScoreLd + col] - dlt));
    }
    __syncwarp();
    // dQ += dS K.
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (c * 16 >= dp16) break;  // warp-uniform
      mma_tile<T, false>(dq[c], ds_w, ldp, k_s + c * 16, ld, kTcKeyTile);
    }
  }

  if (!warp_active) return;
  write_fragments<T, kChunks>(dq, scale, s_w, grad_q + (q_begin + q_first + warp * kTcRows) * row_stride + head_offset,
                              row_stride, imin(kTcRows, valid_q - warp * kTcRows), head_dim, dp16, lane);
#endif
}

// ---- backward: dK, dV --------------------------------------------------------------------------------

template <typename T, int kHeadDimMax>
__global__ void __launch_bounds__(kThreads)
    attention_bwd_dkdv_tc_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const float* __restrict__ lse,
                                 const float* __restrict__ delta, const int64_t* __restrict__ q_offsets,
                                 const int64_t* __restrict__ kv_offsets, const int* __restrict__ tiles, int heads,
                                 int head_dim, float scale, bool causal, T* __restrict__ grad_k,
                                 T* __restrict__ grad_v) {
#ifdef LATTICE_ATTENTION_TC_UNSUPPORTED
  __trap();
#else
  constexpr int kChunks = kHeadDimMax / 16;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int row = lane >> 1, half = lane & 1;  // row: this lane's key; half: 8 of the tile's 16 queries
  const int h = blockIdx.y;
  const int b = tiles[2 * blockIdx.x];
  const int k_first = tiles[2 * blockIdx.x + 1];
  const int64_t q_begin = q_offsets[b];
  const int n = static_cast<int>(q_offsets[b + 1] - q_begin);
  const int64_t kv_begin = kv_offsets[b];
  const int m = static_cast<int>(kv_offsets[b + 1] - kv_begin);
  const int valid_k = imin(kTcBlock, m - k_first);
  const int q_lo = static_cast<int>(first_seeing_query(k_first, n, m, causal));
  const int dp16 = round16(head_dim);
  const int ld = tc_ld<T>(dp16);
  constexpr int ldp = tc_p_ld<T>();
  const int64_t row_stride = static_cast<int64_t>(heads) * head_dim;
  const int64_t head_offset = static_cast<int64_t>(h) * head_dim;

  unsigned char* smem = dynamic_shared<unsigned char>();
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kTcBlock * ld;
  smem += round_up_bytes(2 * kTcBlock * ld * static_cast<int>(sizeof(T)));
  T* q_s = reinterpret_cast<T*>(smem);
  T* do_s = q_s + kTcQueryTile * ld;
  smem += round_up_bytes(2 * kTcQueryTile * ld * static_cast<int>(sizeof(T)));
  float* st_w = reinterpret_cast<float*>(smem) + warp * 2 * kTcRows * kScoreLd;
  float* dpt_w = st_w + kTcRows * kScoreLd;
  smem += round_up_bytes(2 * kWarps * kTcRows * kScoreLd * 4);
  T* pt_w = reinterpret_cast<T*>(smem) + warp * 2 * kTcRows * ldp;
  T* dst_w = pt_w + kTcRows * ldp;
  smem += round_up_bytes(2 * kWarps * kTcRows * ldp * static_cast<int>(sizeof(T)));
  float* lse_s = reinterpret_cast<float*>(smem);
  float* delta_s = lse_s + kTcQueryTile;

  const int64_t kv_row0 = (kv_begin + k_first) * row_stride + head_offset;
  stage_tc_rows<kTcBlock>(k_s, ld, k + kv_row0, row_stride, valid_k, head_dim, dp16);
  stage_tc_rows<kTcBlock>(v_s, ld, v + kv_row0, row_stride, valid_k, head_dim, dp16);
  const T* k_w = k_s + warp * kTcRows * ld;
  const T* v_w = v_s + warp * kTcRows * ld;

  const bool warp_active = warp * kTcRows < valid_k;
  // Queries before warp_q_lo see none of this warp's keys (causal): the warp skips tiles made only of them.
  const int warp_q_lo = warp_active ? static_cast<int>(first_seeing_query(k_first + warp * kTcRows, n, m, causal)) : n;
  const int kj = k_first + warp * kTcRows + row;  // this lane's key
  const int causal_shift = m - n;
  const float scale_log2 = scale * kLog2e;
  TcAcc<T> dk[kChunks], dv[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (warp_active) {  // warp-uniform
      wm::fill_fragment(dk[c], 0.f);
      wm::fill_fragment(dv[c], 0.f);
    }
  }

  for (int i0 = q_lo; i0 < n; i0 += kTcQueryTile) {
    const int valid_q = imin(kTcQueryTile, n - i0);
    __syncthreads();  // the previous query tile is consumed (first time: k_s, v_s visible after the next one)
    const int64_t q_row0 = (q_begin + i0) * row_stride + head_offset;
    stage_tc_rows<kTcQueryTile>(q_s, ld, q + q_row0, row_stride, valid_q, head_dim, dp16);
    stage_tc_rows<kTcQueryTile>(do_s, ld, grad_out + q_row0, row_stride, valid_q, head_dim, dp16);
    if (threadIdx.x < kTcQueryTile) {
      const int i = static_cast<int>(threadIdx.x);
      lse_s[i] = i < valid_q ? __ldg(lse + (q_begin + i0 + i) * heads + h) * kLog2e : 0.f;
      delta_s[i] = i < valid_q ? __ldg(delta + (q_begin + i0 + i) * heads + h) : 0.f;
    }
    __syncthreads();
    if (i0 + valid_q <= warp_q_lo) continue;  // warp-uniform

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the tile's 16 queries.
    scores_to_scratch<T>(st_w, k_w, ld, q_s, ld, kTcQueryTile, dp16);
    scores_to_scratch<T>(dpt_w, v_w, ld, do_s, ld, kTcQueryTile, dp16);
    __syncwarp();
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = half * 8 + j;
      const int qi = i0 + col;
      const bool visible = col < valid_q && kj < m && (!causal || kj <= qi + causal_shift);
      const float p = visible ? exp2f(st_w[row * kScoreLd + col] * scale_log2 - lse_s[col]) : 0.f;
      pt_w[row * ldp + col] = to_input<T>(p);
      dst_w[row * ldp + col] = to_input<T>(p * (dpt_w[row * kScoreLd + col] - delta_s[col]));
    }
    __syncwarp();
    // dV += P^T dO, dK += dS^T Q.
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (c * 16 >= dp16) break;  // warp-uniform
      mma_tile<T, false>(dv[c], pt_w, ldp, do_s + c * 16, ld, kTcQueryTile);
      mma_tile<T, false>(dk[c], dst_w, ldp, q_s + c * 16, ld, kTcQueryTile);
    }
  }

  if (!warp_active) return;
  const int valid_rows = imin(kTcRows, valid_k - warp * kTcRows);
  const int64_t out0 = (kv_begin + k_first + warp * kTcRows) * row_stride + head_offset;
  write_fragments<T, kChunks>(dk, scale, st_w, grad_k + out0, row_stride, valid_rows, head_dim, dp16, lane);
  write_fragments<T, kChunks>(dv, 1.f, st_w, grad_v + out0, row_stride, valid_rows, head_dim, dp16, lane);
#endif
}

}  // namespace attention
}  // namespace cuda
}  // namespace lattice
