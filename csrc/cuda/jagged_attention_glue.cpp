// torch glue of the CUDA jagged attention: validation, allocation, the tile work lists, and the calls
// into the launchers (jagged_attention.cu). Compiled only in CUDA builds.
//
// Semantics and validation match the CPU kernel (csrc/cpu/jagged_attention.cpp): out = 0 and lse = -inf
// for a query that sees no key; offsets int64 [B+1], starting at 0, non-decreasing, ending exactly at
// the number of rows. The offsets are copied to the host (B+1 entries; one synchronization) because
// the grid is built there from per-sample lengths; they may also be passed on the CPU, which avoids
// the device-to-host copy.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>

#include <lattice/checks.h>

#include "jagged_attention.h"

namespace lattice {
namespace {

using cuda::AttentionDtype;
using cuda::AttentionTilePlan;

struct Problem {
  int64_t B, H, Dh, Nq, Nk;
  at::Tensor q_offsets_host, kv_offsets_host;  // contiguous int64 on the CPU
  at::Tensor q_offsets_dev, kv_offsets_dev;    // contiguous int64 on q's device
  AttentionDtype dtype;
  bool generic;  // float64, head_dim > 128 or more heads than a grid dimension holds
};

AttentionDtype attention_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return AttentionDtype::kFloat32;
    case at::kHalf: return AttentionDtype::kFloat16;
    case at::kBFloat16: return AttentionDtype::kBFloat16;
    case at::kDouble: return AttentionDtype::kFloat64;
    default: TORCH_CHECK(false, "q must be float32, float64, bfloat16 or float16, got ", t);
  }
}

// Validates one offsets tensor and returns its host copy.
at::Tensor checked_offsets(const at::Tensor& offsets, const char* name, const at::Tensor& q, int64_t total,
                           const char* values_name) {
  TORCH_CHECK(offsets.device().is_cpu() || offsets.device() == q.device(), name, " must be on q's device (", q.device(),
              ") or on the CPU, got ", offsets.device());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, name, " must be int64, got ", offsets.scalar_type());
  check_dim(offsets, 1, name);
  TORCH_CHECK(offsets.numel() >= 1, name, " must have B+1 >= 1 entries, got 0");
  at::Tensor host = offsets.to(at::kCPU).contiguous();
  check_offsets_cpu<int64_t>(host, name, -1, total, values_name, "sample");
  const int64_t* o = host.data_ptr<int64_t>();
  const int64_t last = o[host.numel() - 1];
  TORCH_CHECK(last == total, name, "[-1] must equal the number of rows of ", values_name, " (", total, "), got ", last);
  for (int64_t b = 0; b + 1 < host.numel(); ++b) {
    TORCH_CHECK(o[b + 1] - o[b] <= std::numeric_limits<int32_t>::max(), name, ": sample ", b, " has ",
                o[b + 1] - o[b], " rows; the CUDA kernels take at most 2^31 - 1 per sample");
  }
  return host;
}

Problem check_inputs(const at::Tensor& q, const at::Tensor& q_offsets, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& kv_offsets, double scale) {
  check_dim(q, 3, "q");
  check_dim(k, 3, "k");
  check_dim(v, 3, "v");
  TORCH_CHECK(q.is_cuda(), "jagged_attention (CUDA): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "jagged_attention (CUDA): k and v must be on q's device ",
              q.device(), ", got ", k.device(), " and ", v.device());
  const auto dt = q.scalar_type();
  const AttentionDtype dtype = attention_dtype(dt);
  TORCH_CHECK(k.scalar_type() == dt, "k must have q's dtype ", dt, ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dt, "v must have q's dtype ", dt, ", got ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(k.size(1) == q.size(1), "k must have q's number of heads ", q.size(1), ", got ", k.size(1), " (k shape ",
              k.sizes(), ")");
  TORCH_CHECK(k.size(2) == q.size(2), "k must have q's head dim ", q.size(2), ", got ", k.size(2), " (k shape ",
              k.sizes(), ")");
  TORCH_CHECK(q.size(2) >= 1, "q must have a head dim >= 1, got shape ", q.sizes());
  TORCH_CHECK(q.size(2) <= std::numeric_limits<int32_t>::max() && q.size(1) <= std::numeric_limits<int32_t>::max(),
              "q has too many heads or too large a head dim for the CUDA kernels: shape ", q.sizes());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  // The order of the CPU kernel's checks, so both devices report the same first error.
  at::Tensor qo = checked_offsets(q_offsets, "q_offsets", q, q.size(0), "q");
  at::Tensor ko = checked_offsets(kv_offsets, "kv_offsets", q, k.size(0), "k");
  TORCH_CHECK(q_offsets.numel() == kv_offsets.numel(),
              "q_offsets and kv_offsets must describe the same number of samples: q_offsets has ", q_offsets.numel() - 1,
              " samples (", q_offsets.numel(), " entries), kv_offsets has ", kv_offsets.numel() - 1, " (",
              kv_offsets.numel(), " entries)");
  TORCH_CHECK(qo.numel() - 1 <= std::numeric_limits<int32_t>::max(), "jagged_attention (CUDA): at most 2^31 - 1 samples, got ",
              qo.numel() - 1);
  auto on_device = [&](const at::Tensor& original, const at::Tensor& host) {
    return original.is_cuda() ? original.contiguous() : host.to(q.device(), /*non_blocking=*/false);
  };
  const int64_t H = q.size(1), Dh = q.size(2);
  const bool generic = cuda::attention_uses_generic(dtype, static_cast<int>(Dh)) || H > 65535;
  return Problem{qo.numel() - 1, H, Dh, q.size(0), k.size(0), qo, ko, on_device(q_offsets, qo),
                 on_device(kv_offsets, ko), dtype, generic};
}

// The tile tables of `plans`, concatenated, on `device`: through pinned memory, so the copy is
// asynchronous on the current stream.
at::Tensor tiles_on_device(std::initializer_list<const AttentionTilePlan*> plans, const at::Device& device) {
  int64_t total = 0;
  for (const AttentionTilePlan* p : plans) total += static_cast<int64_t>(p->tiles.size());
  at::Tensor host = at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int32_t* dst = host.data_ptr<int32_t>();
  for (const AttentionTilePlan* p : plans) {
    std::memcpy(dst, p->tiles.data(), p->tiles.size() * sizeof(int32_t));
    dst += p->tiles.size();
  }
  return host.to(device, /*non_blocking=*/true);
}

// Tiles per head below which the current GPU would be underfilled: two blocks per multiprocessor.
int64_t min_tiles_per_head(int64_t heads) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return (2 * static_cast<int64_t>(sms) + heads - 1) / heads;
}

// The large tiles run on tensor cores from compute capability 8.0 (bf16 WMMA, tf32); fp32 only where torch
// allows tf32 for matmuls (torch.backends.cuda.matmul.allow_tf32), as cuBLAS does.
bool use_tensor_cores(AttentionDtype dtype) {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return cuda::attention_uses_tensor_cores(dtype, at::globalContext().allowTF32CuBLAS(), major >= 8);
}

void check_grid(const AttentionTilePlan& plan, const char* what) {
  TORCH_CHECK(plan.num_tiles() <= std::numeric_limits<int32_t>::max(), "jagged_attention (CUDA): ", plan.num_tiles(),
              " ", what, " tiles exceed the grid limit");
}

std::tuple<at::Tensor, at::Tensor> jagged_attention_cuda(const at::Tensor& q_in, const at::Tensor& q_offsets,
                                                          const at::Tensor& k_in, const at::Tensor& v_in,
                                                          const at::Tensor& kv_offsets, double scale, bool causal) {
  TORCH_CHECK(q_in.is_cuda(), "jagged_attention (CUDA): q must be a CUDA tensor, got ", q_in.device());
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const Problem pb = check_inputs(q_in, q_offsets, k_in, v_in, kv_offsets, scale);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({pb.Nq, pb.H}, q.options().dtype(at::kFloat));
  if (pb.Nq == 0 || pb.H == 0) return {out, lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* qo = pb.q_offsets_dev.data_ptr<int64_t>();
  const int64_t* ko = pb.kv_offsets_dev.data_ptr<int64_t>();
  const int H = static_cast<int>(pb.H), Dh = static_cast<int>(pb.Dh);

  if (pb.generic) {
    const bool acc_is_out = q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
    at::Tensor acc = acc_is_out ? out : at::empty(q.sizes(), q.options().dtype(at::kFloat));
    cuda::jagged_attention_forward_generic(pb.dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), qo, ko, pb.B, pb.Nq, H,
                                           Dh, scale, causal, acc.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                                           stream);
    return {out, lse};
  }
  const bool tensor_cores = use_tensor_cores(pb.dtype);
  const AttentionTilePlan plan =
      cuda::plan_attention_forward(pb.q_offsets_host.data_ptr<int64_t>(), pb.kv_offsets_host.data_ptr<int64_t>(), pb.B,
                                   Dh, causal, tensor_cores, min_tiles_per_head(pb.H));
  check_grid(plan, "query");
  const at::Tensor tiles = tiles_on_device({&plan}, q.device());
  cuda::jagged_attention_forward(pb.dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), qo, ko, tiles.data_ptr<int32_t>(),
                                 plan.num_tiles(), plan.block, H, Dh, static_cast<float>(scale), causal, tensor_cores,
                                 out.data_ptr(), lse.data_ptr<float>(), stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jagged_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& q_offsets, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& kv_offsets, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale, bool causal) {
  TORCH_CHECK(q_in.is_cuda(), "jagged_attention_backward (CUDA): q must be a CUDA tensor, got ", q_in.device());
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const Problem pb = check_inputs(q_in, q_offsets, k_in, v_in, kv_offsets, scale);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), "grad_out must have q's shape ", q_in.sizes(), ", got ",
              grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), "out must have q's shape ", q_in.sizes(), ", got ", out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type(), "grad_out must have q's dtype ", q_in.scalar_type(),
              ", got ", grad_out_in.scalar_type());
  TORCH_CHECK(out_in.scalar_type() == q_in.scalar_type(), "out must have q's dtype ", q_in.scalar_type(), ", got ",
              out_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == pb.Nq && lse_in.size(1) == pb.H, "lse must have shape [", pb.Nq,
              ", ", pb.H, "], got ", lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK(grad_out_in.device() == q_in.device() && out_in.device() == q_in.device() &&
                  lse_in.device() == q_in.device(),
              "jagged_attention_backward (CUDA): grad_out, out and lse must be on q's device ", q_in.device(), ", got ",
              grad_out_in.device(), ", ", out_in.device(), ", ", lse_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor go = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor gq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor gk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor gv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (pb.H == 0 || (pb.Nq == 0 && pb.Nk == 0)) return {gq, gk, gv};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* qo = pb.q_offsets_dev.data_ptr<int64_t>();
  const int64_t* ko = pb.kv_offsets_dev.data_ptr<int64_t>();
  const int H = static_cast<int>(pb.H), Dh = static_cast<int>(pb.Dh);

  if (pb.generic) {
    const bool acc_is_grad = q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble;
    const auto acc_options = q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    at::Tensor acc_q = acc_is_grad ? gq : at::empty(q.sizes(), acc_options);
    at::Tensor acc_k = acc_is_grad ? gk : at::empty(k.sizes(), acc_options);
    at::Tensor acc_v = acc_is_grad ? gv : at::empty(v.sizes(), acc_options);
    at::Tensor row_lse = at::empty({pb.Nq, pb.H}, acc_options);
    at::Tensor delta = at::empty({pb.Nq, pb.H}, acc_options);
    cuda::jagged_attention_backward_generic(pb.dtype, go.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                            out.data_ptr(), qo, ko, pb.B, pb.Nq, pb.Nk, H, Dh, scale, causal,
                                            row_lse.data_ptr(), delta.data_ptr(), acc_q.data_ptr(), acc_k.data_ptr(),
                                            acc_v.data_ptr(), gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), stream);
    return {gq, gk, gv};
  }
  const int64_t* qo_host = pb.q_offsets_host.data_ptr<int64_t>();
  const int64_t* ko_host = pb.kv_offsets_host.data_ptr<int64_t>();
  const bool tensor_cores = use_tensor_cores(pb.dtype);
  const AttentionTilePlan dq_plan =
      cuda::plan_attention_backward_dq(qo_host, ko_host, pb.B, Dh, causal, tensor_cores, min_tiles_per_head(pb.H));
  const AttentionTilePlan dkdv_plan =
      cuda::plan_attention_backward_dkdv(qo_host, ko_host, pb.B, Dh, causal, tensor_cores);
  check_grid(dq_plan, "query");
  check_grid(dkdv_plan, "key");
  const at::Tensor tiles = tiles_on_device({&dq_plan, &dkdv_plan}, q.device());
  const int32_t* dq_tiles = tiles.data_ptr<int32_t>();
  const int32_t* dkdv_tiles = dq_tiles + dq_plan.tiles.size();
  at::Tensor delta = at::empty({pb.Nq, pb.H}, q.options().dtype(at::kFloat));
  cuda::jagged_attention_backward(pb.dtype, go.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                  lse.data_ptr<float>(), qo, ko, pb.Nq, dq_tiles, dq_plan.num_tiles(), dq_plan.block,
                                  dkdv_tiles, dkdv_plan.num_tiles(), dkdv_plan.block, H, Dh, static_cast<float>(scale),
                                  causal, tensor_cores, delta.data_ptr<float>(), gq.data_ptr(), gk.data_ptr(),
                                  gv.data_ptr(), stream);
  return {gq, gk, gv};
}

}  // namespace
}  // namespace lattice

TORCH_LIBRARY_IMPL(lattice, CUDA, m) {
  m.impl("jagged_attention", &lattice::jagged_attention_cuda);
  m.impl("jagged_attention_backward", &lattice::jagged_attention_backward_cuda);
}
