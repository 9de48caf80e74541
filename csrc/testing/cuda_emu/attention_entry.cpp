// Emulated entry points of the CUDA jagged attention (tests/cuda_emu/test_emu_attention.py): host tensors in,
// the tile planner and launchers of csrc/cuda/jagged_attention.cu run exactly as the torch glue runs them,
// results copied back. dtype codes are lattice::cuda::AttentionDtype (0 fp32, 1 fp16, 2 bf16, 3 fp64).
#include "cuda/jagged_attention.cu"
#include "emu_entry.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace {

using lattice::cuda::AttentionDtype;
using lattice::cuda::AttentionTilePlan;
using lattice_emu::DeviceBuffer;

size_t element_bytes(AttentionDtype dtype) {
  switch (dtype) {
    case AttentionDtype::kFloat32: return 4;
    case AttentionDtype::kFloat16:
    case AttentionDtype::kBFloat16: return 2;
    case AttentionDtype::kFloat64: return 8;
  }
  throw std::invalid_argument("bad dtype code");
}

// Accumulation type of the generic path: double for float64, float otherwise.
size_t acc_bytes(AttentionDtype dtype) { return dtype == AttentionDtype::kFloat64 ? 8 : 4; }
bool acc_is_output(AttentionDtype dtype) {
  return dtype == AttentionDtype::kFloat32 || dtype == AttentionDtype::kFloat64;
}

// mode: 0 = the planner's choice (as the glue), > 0 = force that block size, -1 = the generic path.
AttentionTilePlan query_plan(const int64_t* qo, const int64_t* ko, int64_t batch, int head_dim, bool causal, int mode,
                             bool dq, bool tensor_cores) {
  if (mode > 0) return lattice::cuda::plan_detail::make_tiles(qo, ko, batch, mode, causal, true, nullptr);
  return dq ? lattice::cuda::plan_attention_backward_dq(qo, ko, batch, head_dim, causal, tensor_cores)
            : lattice::cuda::plan_attention_forward(qo, ko, batch, head_dim, causal, tensor_cores);
}

DeviceBuffer tiles_buffer(const AttentionTilePlan& plan, const char* label) {
  return DeviceBuffer(plan.tiles.data(), plan.tiles.size() * sizeof(int32_t), label);
}

}  // namespace

// Writes the tile table of one planner into tiles_out (capacity 2 * max_tiles int32) and (num_tiles, block)
// into info. kind: 0 forward, 1 dq, 2 dk/dv; min_tiles as in plan_attention_forward; tensor_cores: plan for the
// tensor-core tiles.
LATTICE_EMU_EXPORT int emu_attention_plan(const int64_t* q_offsets, const int64_t* kv_offsets, long long batch,
                                          long long head_dim, int causal, long long kind, long long min_tiles,
                                          int tensor_cores,
                                          int32_t* tiles_out, long long max_tiles, int64_t* info, char* err,
                                          size_t err_len) {
  return lattice_emu::guarded_call(err, err_len, [&] {
    const int dh = static_cast<int>(head_dim);
    AttentionTilePlan plan;
    if (kind == 0) {
      plan = lattice::cuda::plan_attention_forward(q_offsets, kv_offsets, batch, dh, causal != 0, tensor_cores != 0,
                                                   min_tiles);
    } else if (kind == 1) {
      plan = lattice::cuda::plan_attention_backward_dq(q_offsets, kv_offsets, batch, dh, causal != 0,
                                                       tensor_cores != 0, min_tiles);
    } else {
      plan = lattice::cuda::plan_attention_backward_dkdv(q_offsets, kv_offsets, batch, dh, causal != 0,
                                                         tensor_cores != 0);
    }
    if (plan.num_tiles() > max_tiles) throw std::runtime_error("emu_attention_plan: tiles_out too small");
    std::copy(plan.tiles.begin(), plan.tiles.end(), tiles_out);
    info[0] = plan.num_tiles();
    info[1] = plan.block;
  });
}

// Forward. q [total_q, heads, head_dim], k, v [total_k, heads, head_dim] in `dtype`; offsets int64 [batch+1];
// out like q, lse fp32 [total_q, heads]. Returns the block used in *block_used (-1: generic path). allow_tf32:
// fp32 large tiles on tensor cores (bf16/fp16 always use them).
LATTICE_EMU_EXPORT int emu_attention_forward(const void* q, const void* k, const void* v, const int64_t* q_offsets,
                                             const int64_t* kv_offsets, long long batch, long long total_q,
                                             long long total_k, long long heads, long long head_dim, long long dtype_code,
                                             double scale, int causal, long long mode, int allow_tf32, void* out,
                                             float* lse,
                                             int64_t* block_used, char* err, size_t err_len) {
  return lattice_emu::guarded_call(err, err_len, [&] {
    const AttentionDtype dtype = static_cast<AttentionDtype>(dtype_code);
    const size_t es = element_bytes(dtype);
    const size_t q_bytes = total_q * heads * head_dim * es, kv_bytes = total_k * heads * head_dim * es;
    DeviceBuffer dq(q, q_bytes, "q"), dk(k, kv_bytes, "k"), dv(v, kv_bytes, "v");
    DeviceBuffer dqo(q_offsets, (batch + 1) * sizeof(int64_t), "q_offsets");
    DeviceBuffer dko(kv_offsets, (batch + 1) * sizeof(int64_t), "kv_offsets");
    DeviceBuffer dout(q_bytes, "out"), dlse(total_q * heads * sizeof(float), "lse");
    const int H = static_cast<int>(heads), Dh = static_cast<int>(head_dim);
    if (mode < 0 || lattice::cuda::attention_uses_generic(dtype, Dh)) {
      DeviceBuffer acc;
      if (!acc_is_output(dtype)) acc = DeviceBuffer(total_q * heads * head_dim * acc_bytes(dtype), "acc");
      lattice::cuda::jagged_attention_forward_generic(dtype, dq.get(), dk.get(), dv.get(), dqo.get<int64_t>(),
                                                      dko.get<int64_t>(), batch, total_q, H, Dh, scale, causal != 0,
                                                      acc_is_output(dtype) ? dout.get() : acc.get(), dout.get(),
                                                      dlse.get<float>(), nullptr);
      *block_used = -1;
    } else {
      const bool tc = lattice::cuda::attention_uses_tensor_cores(dtype, allow_tf32 != 0);
      const AttentionTilePlan plan = query_plan(q_offsets, kv_offsets, batch, Dh, causal != 0, static_cast<int>(mode),
                                                false, tc);
      DeviceBuffer tiles = tiles_buffer(plan, "tiles");
      lattice::cuda::jagged_attention_forward(dtype, dq.get(), dk.get(), dv.get(), dqo.get<int64_t>(),
                                              dko.get<int64_t>(), tiles.get<int32_t>(), plan.num_tiles(), plan.block,
                                              H, Dh, static_cast<float>(scale), causal != 0, tc, dout.get(),
                                              dlse.get<float>(), nullptr);
      *block_used = plan.block;
    }
    dout.to_host(out);
    dlse.to_host(lse);
  });
}

// Backward. grad_out, out like q; lse fp32 [total_q, heads]; grads like q, k, v. mode as in the forward, for
// the dq tiles (the dk/dv tiles always come from their planner).
LATTICE_EMU_EXPORT int emu_attention_backward(const void* grad_out, const void* q, const void* k, const void* v,
                                              const void* out, const float* lse, const int64_t* q_offsets,
                                              const int64_t* kv_offsets, long long batch, long long total_q,
                                              long long total_k, long long heads, long long head_dim,
                                              long long dtype_code, double scale, int causal, long long mode,
                                              int allow_tf32, void* grad_q, void* grad_k, void* grad_v, int64_t* block_used, char* err,
                                              size_t err_len) {
  return lattice_emu::guarded_call(err, err_len, [&] {
    const AttentionDtype dtype = static_cast<AttentionDtype>(dtype_code);
    const size_t es = element_bytes(dtype);
    const size_t q_bytes = total_q * heads * head_dim * es, kv_bytes = total_k * heads * head_dim * es;
    DeviceBuffer dgo(grad_out, q_bytes, "grad_out"), dq(q, q_bytes, "q"), dk(k, kv_bytes, "k"), dv(v, kv_bytes, "v");
    DeviceBuffer dout(out, q_bytes, "out"), dlse(lse, total_q * heads * sizeof(float), "lse");
    DeviceBuffer dqo(q_offsets, (batch + 1) * sizeof(int64_t), "q_offsets");
    DeviceBuffer dko(kv_offsets, (batch + 1) * sizeof(int64_t), "kv_offsets");
    DeviceBuffer dgq(q_bytes, "grad_q"), dgk(kv_bytes, "grad_k"), dgv(kv_bytes, "grad_v");
    const int H = static_cast<int>(heads), Dh = static_cast<int>(head_dim);
    if (mode < 0 || lattice::cuda::attention_uses_generic(dtype, Dh)) {
      const size_t ab = acc_bytes(dtype);
      DeviceBuffer acc_q, acc_k, acc_v;
      if (!acc_is_output(dtype)) {
        acc_q = DeviceBuffer(total_q * heads * head_dim * ab, "acc_q");
        acc_k = DeviceBuffer(total_k * heads * head_dim * ab, "acc_k");
        acc_v = DeviceBuffer(total_k * heads * head_dim * ab, "acc_v");
      }
      DeviceBuffer row_lse(total_q * heads * ab, "row_lse"), delta(total_q * heads * ab, "delta");
      const bool alias = acc_is_output(dtype);
      lattice::cuda::jagged_attention_backward_generic(
          dtype, dgo.get(), dq.get(), dk.get(), dv.get(), dout.get(), dqo.get<int64_t>(), dko.get<int64_t>(), batch,
          total_q, total_k, H, Dh, scale, causal != 0, row_lse.get(), delta.get(), alias ? dgq.get() : acc_q.get(),
          alias ? dgk.get() : acc_k.get(), alias ? dgv.get() : acc_v.get(), dgq.get(), dgk.get(), dgv.get(), nullptr);
      *block_used = -1;
    } else {
      const bool tc = lattice::cuda::attention_uses_tensor_cores(dtype, allow_tf32 != 0);
      const AttentionTilePlan dq_plan = query_plan(q_offsets, kv_offsets, batch, Dh, causal != 0,
                                                   static_cast<int>(mode), true, tc);
      const AttentionTilePlan dkdv_plan =
          lattice::cuda::plan_attention_backward_dkdv(q_offsets, kv_offsets, batch, Dh, causal != 0, tc);
      DeviceBuffer dq_tiles = tiles_buffer(dq_plan, "dq_tiles"), dkdv_tiles = tiles_buffer(dkdv_plan, "dkdv_tiles");
      DeviceBuffer delta(total_q * heads * sizeof(float), "delta");
      lattice::cuda::jagged_attention_backward(
          dtype, dgo.get(), dq.get(), dk.get(), dv.get(), dout.get(), dlse.get<float>(), dqo.get<int64_t>(),
          dko.get<int64_t>(), total_q, dq_tiles.get<int32_t>(), dq_plan.num_tiles(), dq_plan.block,
          dkdv_tiles.get<int32_t>(), dkdv_plan.num_tiles(), dkdv_plan.block, H, Dh, static_cast<float>(scale),
          causal != 0, tc, delta.get<float>(), dgq.get(), dgk.get(), dgv.get(), nullptr);
      *block_used = dq_plan.block;
    }
    dgq.to_host(grad_q);
    dgk.to_host(grad_k);
    dgv.to_host(grad_v);
  });
}
