// Launchers of the jagged attention kernels: raw device pointers + stream in, dtype / head-dim / tile
// dispatch to the compiled kernel variants. Launch syntax lives in lattice::cuda::launch only.
#include <stdexcept>
#include <string>

#include "jagged_attention.h"
#include "jagged_attention_kernels.cuh"
#include "jagged_attention_tc_kernels.cuh"
#include "lattice/cuda/launch.cuh"

namespace lattice {
namespace cuda {
namespace {

using attention::dkdv_smem_floats;
using attention::dq_smem_floats;
using attention::fwd_smem_floats;
using attention::kThreads;

// Every variant's shared memory must fit the 48 KiB a kernel gets without an opt-in attribute.
constexpr int kMaxSharedBytes = 48 * 1024;
static_assert(fwd_smem_floats(64, 64) * 4 <= kMaxSharedBytes, "forward, head dim 64, 64 queries");
static_assert(fwd_smem_floats(64, 32) * 4 <= kMaxSharedBytes, "forward, head dim 32, 64 queries");
static_assert(fwd_smem_floats(16, 128) * 4 <= kMaxSharedBytes, "forward, head dim 128, 16 queries");
static_assert(dq_smem_floats(32, 64) * 4 <= kMaxSharedBytes, "dq, head dim 64, 32 queries");
static_assert(dq_smem_floats(8, 128) * 4 <= kMaxSharedBytes, "dq, head dim 128, 8 queries");
static_assert(dkdv_smem_floats(32, 64) * 4 <= kMaxSharedBytes, "dk/dv, head dim 64, 32 keys");
static_assert(dkdv_smem_floats(8, 128) * 4 <= kMaxSharedBytes, "dk/dv, head dim 128, 8 keys");

[[noreturn]] void unsupported(const char* what, int value) {
  throw std::invalid_argument(std::string("jagged_attention CUDA launcher: unsupported ") + what + " " +
                              std::to_string(value));
}

dim3 tile_grid(int64_t num_tiles, int heads) {
  return dim3(static_cast<unsigned>(num_tiles), static_cast<unsigned>(heads), 1);
}

template <typename T, int kHeadDimMax, int kRows>
void forward_variant(const T* q, const T* k, const T* v, const int64_t* q_offsets, const int64_t* kv_offsets,
                     const int32_t* tiles, int64_t num_tiles, int heads, int head_dim, float scale, bool causal,
                     T* out, float* lse, cudaStream_t stream) {
  const size_t smem = sizeof(float) * fwd_smem_floats(attention::kWarps * kRows, attention::padded_head_dim(head_dim));
  launch(attention::attention_fwd_kernel<T, kHeadDimMax, kRows>, tile_grid(num_tiles, heads), dim3(kThreads), smem,
         stream, q, k, v, q_offsets, kv_offsets, tiles, heads, head_dim, scale, causal, out, lse);
}

// Dynamic shared memory above the 48 KiB default needs the kernel's opt-in (set at every launch: it is a
// per-device attribute and costs microseconds).
template <typename Kernel>
void allow_shared_bytes(Kernel* kernel, size_t bytes) {
  if (bytes > static_cast<size_t>(kMaxSharedBytes)) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
          "jagged_attention: cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

template <typename T, int kHeadDimMax>
void forward_tc(const T* q, const T* k, const T* v, const int64_t* q_offsets, const int64_t* kv_offsets,
                const int32_t* tiles, int64_t num_tiles, int heads, int head_dim, float scale, bool causal, T* out,
                float* lse, cudaStream_t stream) {
  const size_t smem = attention::tc_fwd_smem_bytes<T>(attention::round16(head_dim));
  auto* kernel = attention::attention_fwd_tc_kernel<T, kHeadDimMax>;
  allow_shared_bytes(kernel, smem);
  launch(kernel, tile_grid(num_tiles, heads), dim3(kThreads), smem, stream, q, k, v, q_offsets, kv_offsets, tiles,
         heads, head_dim, scale, causal, out, lse);
}

template <typename T, int kHeadDimMax>
void forward_head_dim(int block_q, bool tensor_cores, const T* q, const T* k, const T* v, const int64_t* q_offsets,
                      const int64_t* kv_offsets, const int32_t* tiles, int64_t num_tiles, int heads, int head_dim,
                      float scale, bool causal, T* out, float* lse, cudaStream_t stream) {
  const AttentionBlockSizes sizes = attention_block_sizes(kHeadDimMax, tensor_cores);
  if (tensor_cores && block_q == sizes.forward_large) {
    forward_tc<T, kHeadDimMax>(q, k, v, q_offsets, kv_offsets, tiles, num_tiles, heads, head_dim, scale, causal, out,
                               lse, stream);
  } else if (block_q == sizes.forward_small) {
    forward_variant<T, kHeadDimMax, 2>(q, k, v, q_offsets, kv_offsets, tiles, num_tiles, heads, head_dim, scale,
                                       causal, out, lse, stream);
  } else if (block_q == sizes.forward_large) {
    constexpr int kLargeRows = kHeadDimMax == 128 ? 4 : 16;
    forward_variant<T, kHeadDimMax, kLargeRows>(q, k, v, q_offsets, kv_offsets, tiles, num_tiles, heads, head_dim,
                                                scale, causal, out, lse, stream);
  } else {
    unsupported("forward query tile", block_q);
  }
}

template <typename T>
void forward_typed(int block_q, bool tensor_cores, const void* q, const void* k, const void* v, const int64_t* q_offsets,
                   const int64_t* kv_offsets, const int32_t* tiles, int64_t num_tiles, int heads, int head_dim,
                   float scale, bool causal, void* out, float* lse, cudaStream_t stream) {
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  const T* vt = static_cast<const T*>(v);
  T* ot = static_cast<T*>(out);
  switch (attention_head_dim_class(head_dim)) {
    case 32:
      return forward_head_dim<T, 32>(block_q, tensor_cores, qt, kt, vt, q_offsets, kv_offsets, tiles, num_tiles, heads, head_dim,
                                     scale, causal, ot, lse, stream);
    case 64:
      return forward_head_dim<T, 64>(block_q, tensor_cores, qt, kt, vt, q_offsets, kv_offsets, tiles, num_tiles, heads, head_dim,
                                     scale, causal, ot, lse, stream);
    default:
      return forward_head_dim<T, 128>(block_q, tensor_cores, qt, kt, vt, q_offsets, kv_offsets, tiles, num_tiles, heads,
                                      head_dim, scale, causal, ot, lse, stream);
  }
}

template <typename T, int kHeadDimMax, int kRows>
void dq_variant(const T* grad_out, const T* q, const T* k, const T* v, const float* lse, const float* delta,
                const int64_t* q_offsets, const int64_t* kv_offsets, const int32_t* tiles, int64_t num_tiles,
                int heads, int head_dim, float scale, bool causal, T* grad_q, cudaStream_t stream) {
  const size_t smem = sizeof(float) * dq_smem_floats(attention::kWarps * kRows, attention::padded_head_dim(head_dim));
  launch(attention::attention_bwd_dq_kernel<T, kHeadDimMax, kRows>, tile_grid(num_tiles, heads), dim3(kThreads),
         smem, stream, grad_out, q, k, v, lse, delta, q_offsets, kv_offsets, tiles, heads, head_dim, scale, causal,
         grad_q);
}

template <typename T, int kHeadDimMax, int kRows>
void dkdv_variant(const T* grad_out, const T* q, const T* k, const T* v, const float* lse, const float* delta,
                  const int64_t* q_offsets, const int64_t* kv_offsets, const int32_t* tiles, int64_t num_tiles,
                  int heads, int head_dim, float scale, bool causal, T* grad_k, T* grad_v, cudaStream_t stream) {
  const size_t smem =
      sizeof(float) * dkdv_smem_floats(attention::kWarps * kRows, attention::padded_head_dim(head_dim));
  launch(attention::attention_bwd_dkdv_kernel<T, kHeadDimMax, kRows>, tile_grid(num_tiles, heads), dim3(kThreads),
         smem, stream, grad_out, q, k, v, lse, delta, q_offsets, kv_offsets, tiles, heads, head_dim, scale, causal,
         grad_k, grad_v);
}

template <typename T, int kHeadDimMax>
void backward_tc(const T* grad_out, const T* q, const T* k, const T* v, const float* lse, const float* delta,
                 const int64_t* q_offsets, const int64_t* kv_offsets, const int32_t* dkdv_tiles, int64_t num_dkdv_tiles,
                 const int32_t* dq_tiles, int64_t num_dq_tiles, bool dq_on_tensor_cores, int heads, int head_dim,
                 float scale, bool causal, T* grad_q, T* grad_k, T* grad_v, cudaStream_t stream) {
  const int dp16 = attention::round16(head_dim);
  const size_t dkdv_smem = attention::tc_dkdv_smem_bytes<T>(dp16);
  auto* dkdv = attention::attention_bwd_dkdv_tc_kernel<T, kHeadDimMax>;
  allow_shared_bytes(dkdv, dkdv_smem);
  launch(dkdv, tile_grid(num_dkdv_tiles, heads), dim3(kThreads), dkdv_smem, stream, grad_out, q, k, v, lse, delta,
         q_offsets, kv_offsets, dkdv_tiles, heads, head_dim, scale, causal, grad_k, grad_v);
  if (!dq_on_tensor_cores) return;
  const size_t dq_smem = attention::tc_dq_smem_bytes<T>(dp16);
  auto* dq = attention::attention_bwd_dq_tc_kernel<T, kHeadDimMax>;
  allow_shared_bytes(dq, dq_smem);
  launch(dq, tile_grid(num_dq_tiles, heads), dim3(kThreads), dq_smem, stream, grad_out, q, k, v, lse, delta,
         q_offsets, kv_offsets, dq_tiles, heads, head_dim, scale, causal, grad_q);
}

template <typename T, int kHeadDimMax>
void backward_head_dim(bool tensor_cores, const T* grad_out, const T* q, const T* k, const T* v, const float* lse, const float* delta,
                       const int64_t* q_offsets, const int64_t* kv_offsets, const int32_t* dq_tiles,
                       int64_t num_dq_tiles, int block_q, const int32_t* dkdv_tiles, int64_t num_dkdv_tiles,
                       int block_k, int heads, int head_dim, float scale, bool causal, T* grad_q, T* grad_k,
                       T* grad_v, cudaStream_t stream) {
  const AttentionBlockSizes sizes = attention_block_sizes(kHeadDimMax, tensor_cores);
  constexpr int kLargeDqRows = kHeadDimMax == 128 ? 2 : 8;
  constexpr int kDkdvRows = kHeadDimMax == 128 ? 2 : 8;
  if (block_k != sizes.dkdv) unsupported("dk/dv key tile", block_k);
  if (block_q != sizes.dq_small && block_q != sizes.dq_large) unsupported("dq query tile", block_q);
  if (tensor_cores) {
    // dK/dV and the large dQ tile on tensor cores; the small dQ tile (summary queries) on FMA tiles.
    backward_tc<T, kHeadDimMax>(grad_out, q, k, v, lse, delta, q_offsets, kv_offsets, dkdv_tiles, num_dkdv_tiles,
                                dq_tiles, num_dq_tiles, block_q == sizes.dq_large, heads, head_dim, scale, causal,
                                grad_q, grad_k, grad_v, stream);
    if (block_q == sizes.dq_small) {
      dq_variant<T, kHeadDimMax, 2>(grad_out, q, k, v, lse, delta, q_offsets, kv_offsets, dq_tiles, num_dq_tiles,
                                    heads, head_dim, scale, causal, grad_q, stream);
    }
    return;
  }
  dkdv_variant<T, kHeadDimMax, kDkdvRows>(grad_out, q, k, v, lse, delta, q_offsets, kv_offsets, dkdv_tiles,
                                          num_dkdv_tiles, heads, head_dim, scale, causal, grad_k, grad_v, stream);
  if (block_q == sizes.dq_small) {
    dq_variant<T, kHeadDimMax, 2>(grad_out, q, k, v, lse, delta, q_offsets, kv_offsets, dq_tiles, num_dq_tiles,
                                  heads, head_dim, scale, causal, grad_q, stream);
  } else if (block_q == sizes.dq_large) {
    dq_variant<T, kHeadDimMax, kLargeDqRows>(grad_out, q, k, v, lse, delta, q_offsets, kv_offsets, dq_tiles,
                                             num_dq_tiles, heads, head_dim, scale, causal, grad_q, stream);
  } else {
    unsupported("dq query tile", block_q);
  }
}

template <typename T>
void backward_typed(bool tensor_cores, const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                    const float* lse, const int64_t* q_offsets, const int64_t* kv_offsets, int64_t total_q,
                    const int32_t* dq_tiles, int64_t num_dq_tiles, int block_q, const int32_t* dkdv_tiles,
                    int64_t num_dkdv_tiles, int block_k, int heads, int head_dim, float scale, bool causal,
                    float* delta, void* grad_q, void* grad_k, void* grad_v, cudaStream_t stream) {
  const T* g = static_cast<const T*>(grad_out);
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  const T* vt = static_cast<const T*>(v);
  const int64_t rows = total_q * heads;
  const int64_t delta_blocks = (rows + attention::kWarps - 1) / attention::kWarps;
  launch(attention::attention_bwd_delta_kernel<T>, dim3(static_cast<unsigned>(delta_blocks)), dim3(kThreads), 0,
         stream, static_cast<const T*>(out), g, rows, head_dim, delta);
  T* gq = static_cast<T*>(grad_q);
  T* gk = static_cast<T*>(grad_k);
  T* gv = static_cast<T*>(grad_v);
  switch (attention_head_dim_class(head_dim)) {
    case 32:
      return backward_head_dim<T, 32>(tensor_cores, g, qt, kt, vt, lse, delta, q_offsets, kv_offsets, dq_tiles, num_dq_tiles,
                                      block_q, dkdv_tiles, num_dkdv_tiles, block_k, heads, head_dim, scale, causal,
                                      gq, gk, gv, stream);
    case 64:
      return backward_head_dim<T, 64>(tensor_cores, g, qt, kt, vt, lse, delta, q_offsets, kv_offsets, dq_tiles, num_dq_tiles,
                                      block_q, dkdv_tiles, num_dkdv_tiles, block_k, heads, head_dim, scale, causal,
                                      gq, gk, gv, stream);
    default:
      return backward_head_dim<T, 128>(tensor_cores, g, qt, kt, vt, lse, delta, q_offsets, kv_offsets, dq_tiles, num_dq_tiles,
                                       block_q, dkdv_tiles, num_dkdv_tiles, block_k, heads, head_dim, scale, causal,
                                       gq, gk, gv, stream);
  }
}

// ---- generic path ----

dim3 row_grid(int64_t items) {
  return dim3(static_cast<unsigned>((items + kThreads - 1) / kThreads));
}

template <typename T, typename Acc>
void forward_generic_typed(const void* q, const void* k, const void* v, const int64_t* q_offsets,
                           const int64_t* kv_offsets, int64_t batch, int64_t total_q, int heads, int head_dim,
                           double scale, bool causal, void* acc, void* out, float* lse, cudaStream_t stream) {
  launch(attention::attention_generic_fwd_kernel<T, Acc>, row_grid(total_q * heads), dim3(kThreads), 0, stream,
         static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), q_offsets, kv_offsets,
         static_cast<int>(batch), total_q, heads, head_dim, static_cast<Acc>(scale), causal, static_cast<Acc*>(acc),
         static_cast<T*>(out), lse);
}

template <typename T, typename Acc>
void backward_generic_typed(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                            const int64_t* q_offsets, const int64_t* kv_offsets, int64_t batch, int64_t total_q,
                            int64_t total_k, int heads, int head_dim, double scale, bool causal, void* row_lse,
                            void* delta, void* acc_q, void* acc_k, void* acc_v, void* grad_q, void* grad_k,
                            void* grad_v, cudaStream_t stream) {
  const T* g = static_cast<const T*>(grad_out);
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  const T* vt = static_cast<const T*>(v);
  Acc* lse_acc = static_cast<Acc*>(row_lse);
  Acc* delta_acc = static_cast<Acc*>(delta);
  const int b = static_cast<int>(batch);
  const Acc sc = static_cast<Acc>(scale);
  launch(attention::attention_generic_bwd_prep_kernel<T, Acc>, row_grid(total_q * heads), dim3(kThreads), 0, stream,
         g, qt, kt, static_cast<const T*>(out), q_offsets, kv_offsets, b, total_q, heads, head_dim, sc, causal,
         lse_acc, delta_acc);
  launch(attention::attention_generic_bwd_dq_kernel<T, Acc>, row_grid(total_q * heads), dim3(kThreads), 0, stream, g,
         qt, kt, vt, static_cast<const Acc*>(lse_acc), static_cast<const Acc*>(delta_acc), q_offsets, kv_offsets, b,
         total_q, heads, head_dim, sc, causal, static_cast<Acc*>(acc_q), static_cast<T*>(grad_q));
  launch(attention::attention_generic_bwd_dkdv_kernel<T, Acc>, row_grid(total_k * heads), dim3(kThreads), 0, stream,
         g, qt, kt, vt, static_cast<const Acc*>(lse_acc), static_cast<const Acc*>(delta_acc), q_offsets, kv_offsets,
         b, total_k, heads, head_dim, sc, causal, static_cast<Acc*>(acc_k), static_cast<Acc*>(acc_v),
         static_cast<T*>(grad_k), static_cast<T*>(grad_v));
}

void check_sizes(int heads, int head_dim) {
  if (head_dim < 1 || head_dim > kAttentionMaxHeadDim) unsupported("head_dim", head_dim);
  if (heads < 1 || heads > 65535) unsupported("heads", heads);
}

}  // namespace

void check_batch(int64_t batch) {
  if (batch < 1 || batch > 0x7fffffff) unsupported("batch", static_cast<int>(batch));
}

void jagged_attention_forward(AttentionDtype dtype, const void* q, const void* k, const void* v,
                              const int64_t* q_offsets, const int64_t* kv_offsets, const int32_t* tiles,
                              int64_t num_tiles, int block_q, int heads, int head_dim, float scale, bool causal,
                              bool tensor_cores, void* out, float* lse, cudaStream_t stream) {
  check_sizes(heads, head_dim);
  if (num_tiles == 0) return;
  switch (dtype) {
    case AttentionDtype::kFloat32:
      return forward_typed<float>(block_q, tensor_cores, q, k, v, q_offsets, kv_offsets, tiles, num_tiles, heads, head_dim, scale,
                                  causal, out, lse, stream);
    case AttentionDtype::kFloat16:
      return forward_typed<__half>(block_q, tensor_cores, q, k, v, q_offsets, kv_offsets, tiles, num_tiles, heads, head_dim,
                                   scale, causal, out, lse, stream);
    case AttentionDtype::kBFloat16:
      return forward_typed<__nv_bfloat16>(block_q, tensor_cores, q, k, v, q_offsets, kv_offsets, tiles, num_tiles, heads,
                                          head_dim, scale, causal, out, lse, stream);
    case AttentionDtype::kFloat64:
      break;
  }
  unsupported("dtype", static_cast<int>(dtype));
}

void jagged_attention_backward(AttentionDtype dtype, const void* grad_out, const void* q, const void* k,
                               const void* v, const void* out, const float* lse, const int64_t* q_offsets,
                               const int64_t* kv_offsets, int64_t total_q, const int32_t* dq_tiles,
                               int64_t num_dq_tiles, int block_q, const int32_t* dkdv_tiles, int64_t num_dkdv_tiles,
                               int block_k, int heads, int head_dim, float scale, bool causal, bool tensor_cores,
                               float* delta, void* grad_q, void* grad_k, void* grad_v, cudaStream_t stream) {
  check_sizes(heads, head_dim);
  if (total_q == 0 && num_dkdv_tiles == 0) return;
  switch (dtype) {
    case AttentionDtype::kFloat32:
      return backward_typed<float>(tensor_cores, grad_out, q, k, v, out, lse, q_offsets, kv_offsets, total_q, dq_tiles,
                                   num_dq_tiles, block_q, dkdv_tiles, num_dkdv_tiles, block_k, heads, head_dim, scale,
                                   causal, delta, grad_q, grad_k, grad_v, stream);
    case AttentionDtype::kFloat16:
      return backward_typed<__half>(tensor_cores, grad_out, q, k, v, out, lse, q_offsets, kv_offsets, total_q, dq_tiles,
                                    num_dq_tiles, block_q, dkdv_tiles, num_dkdv_tiles, block_k, heads, head_dim,
                                    scale, causal, delta, grad_q, grad_k, grad_v, stream);
    case AttentionDtype::kBFloat16:
      return backward_typed<__nv_bfloat16>(tensor_cores, grad_out, q, k, v, out, lse, q_offsets, kv_offsets, total_q, dq_tiles,
                                           num_dq_tiles, block_q, dkdv_tiles, num_dkdv_tiles, block_k, heads,
                                           head_dim, scale, causal, delta, grad_q, grad_k, grad_v, stream);
    case AttentionDtype::kFloat64:
      break;
  }
  unsupported("dtype", static_cast<int>(dtype));
}

void jagged_attention_forward_generic(AttentionDtype dtype, const void* q, const void* k, const void* v,
                                      const int64_t* q_offsets, const int64_t* kv_offsets, int64_t batch,
                                      int64_t total_q, int heads, int head_dim, double scale, bool causal, void* acc,
                                      void* out, float* lse, cudaStream_t stream) {
  if (heads < 1 || head_dim < 1) unsupported(heads < 1 ? "heads" : "head_dim", heads < 1 ? heads : head_dim);
  if (total_q == 0) return;
  check_batch(batch);
  switch (dtype) {
    case AttentionDtype::kFloat32:
      return forward_generic_typed<float, float>(q, k, v, q_offsets, kv_offsets, batch, total_q, heads, head_dim,
                                                 scale, causal, acc, out, lse, stream);
    case AttentionDtype::kFloat16:
      return forward_generic_typed<__half, float>(q, k, v, q_offsets, kv_offsets, batch, total_q, heads, head_dim,
                                                  scale, causal, acc, out, lse, stream);
    case AttentionDtype::kBFloat16:
      return forward_generic_typed<__nv_bfloat16, float>(q, k, v, q_offsets, kv_offsets, batch, total_q, heads,
                                                         head_dim, scale, causal, acc, out, lse, stream);
    case AttentionDtype::kFloat64:
      return forward_generic_typed<double, double>(q, k, v, q_offsets, kv_offsets, batch, total_q, heads, head_dim,
                                                   scale, causal, acc, out, lse, stream);
  }
  unsupported("dtype", static_cast<int>(dtype));
}

void jagged_attention_backward_generic(AttentionDtype dtype, const void* grad_out, const void* q, const void* k,
                                       const void* v, const void* out, const int64_t* q_offsets,
                                       const int64_t* kv_offsets, int64_t batch, int64_t total_q, int64_t total_k,
                                       int heads, int head_dim, double scale, bool causal, void* row_lse, void* delta,
                                       void* acc_q, void* acc_k, void* acc_v, void* grad_q, void* grad_k,
                                       void* grad_v, cudaStream_t stream) {
  if (heads < 1 || head_dim < 1) unsupported(heads < 1 ? "heads" : "head_dim", heads < 1 ? heads : head_dim);
  if (total_q == 0 && total_k == 0) return;
  check_batch(batch);
  switch (dtype) {
    case AttentionDtype::kFloat32:
      return backward_generic_typed<float, float>(grad_out, q, k, v, out, q_offsets, kv_offsets, batch, total_q,
                                                  total_k, heads, head_dim, scale, causal, row_lse, delta, acc_q,
                                                  acc_k, acc_v, grad_q, grad_k, grad_v, stream);
    case AttentionDtype::kFloat16:
      return backward_generic_typed<__half, float>(grad_out, q, k, v, out, q_offsets, kv_offsets, batch, total_q,
                                                   total_k, heads, head_dim, scale, causal, row_lse, delta, acc_q,
                                                   acc_k, acc_v, grad_q, grad_k, grad_v, stream);
    case AttentionDtype::kBFloat16:
      return backward_generic_typed<__nv_bfloat16, float>(grad_out, q, k, v, out, q_offsets, kv_offsets, batch,
                                                          total_q, total_k, heads, head_dim, scale, causal, row_lse,
                                                          delta, acc_q, acc_k, acc_v, grad_q, grad_k, grad_v, stream);
    case AttentionDtype::kFloat64:
      return backward_generic_typed<double, double>(grad_out, q, k, v, out, q_offsets, kv_offsets, batch, total_q,
                                                    total_k, heads, head_dim, scale, causal, row_lse, delta, acc_q,
                                                    acc_k, acc_v, grad_q, grad_k, grad_v, stream);
  }
  unsupported("dtype", static_cast<int>(dtype));
}

}  // namespace cuda
}  // namespace lattice
