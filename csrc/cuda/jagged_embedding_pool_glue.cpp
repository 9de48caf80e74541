// Torch glue of the CUDA jagged embedding pooling op: host-side shape/dtype/device validation, workspace from
// the caching allocator, the current stream, and registration for the CUDA dispatch key. Index and offset
// validation runs on the device (see jagged_embedding_pool.h); its one read-back becomes a TORCH_CHECK naming
// the table, position and value. Compiled only in CUDA builds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "jagged_embedding_pool.h"
#include "lattice/checks.h"

namespace lattice {
namespace {

namespace pool = ::lattice::cuda::pool;

pool::ScalarType scalar_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return pool::ScalarType::kFloat;
    case at::kHalf: return pool::ScalarType::kHalf;
    case at::kBFloat16: return pool::ScalarType::kBFloat16;
    case at::kDouble: return pool::ScalarType::kDouble;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  }
  return pool::ScalarType::kFloat;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the other inputs are on ", device);
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

at::Tensor workspace(size_t bytes, const at::Device& device) {
  return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
}

// fp64 for fp64 tensors, fp32 otherwise: the kernels' accumulation type.
at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The jagged input (tables, indices, offsets, per-sample weights), validated on the host as far as shapes and
// dtypes go; contiguous copies are kept alive here. `acc` is the accumulation dtype (of the weights, or of the
// gradient for the sparse backward); per_sample_weights are converted to it.
struct Jagged {
  at::Tensor table_row_offsets, indices, offsets, per_sample_weights;
  pool::Problem p;
};

Jagged make_jagged(const at::Tensor& table_row_offsets, const at::Tensor& indices, const at::Tensor& offsets,
                   int64_t pooling, const std::optional<at::Tensor>& per_sample_weights, at::ScalarType acc,
                   const at::Device& device, const char* op) {
  TORCH_CHECK(pooling == 0 || pooling == 1, op, ": pooling must be 0 (sum) or 1 (mean), got ", pooling);
  check_cuda(table_row_offsets, "table_row_offsets", device);
  check_cuda(indices, "indices", device);
  check_cuda(offsets, "offsets", device);
  TORCH_CHECK(table_row_offsets.scalar_type() == at::kLong, "table_row_offsets must be int64, got ",
              table_row_offsets.scalar_type());
  int64_t T = 0;
  if (table_row_offsets.dim() == 1) {
    TORCH_CHECK(table_row_offsets.numel() >= 2, "table_row_offsets must have T+1 >= 2 entries, got ",
                table_row_offsets.numel());
    T = table_row_offsets.numel() - 1;
  } else {
    TORCH_CHECK(table_row_offsets.dim() == 2 && table_row_offsets.size(1) == 2 && table_row_offsets.size(0) >= 1,
                "table_row_offsets must be [T+1] (packed tables) or [T, 2] (row range per table), got shape ",
                table_row_offsets.sizes());
    T = table_row_offsets.size(0);
  }
  TORCH_CHECK(indices.dim() == 1, "indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(offsets.dim() == 1, "offsets must be 1-D, got shape ", offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == indices.scalar_type(), "offsets must have the dtype of indices (",
              indices.scalar_type(), "), got ", offsets.scalar_type());
  TORCH_CHECK(offsets.numel() >= 1 && (offsets.numel() - 1) % T == 0, "offsets must have T*B+1 entries for T = ", T,
              " tables, got ", offsets.numel());
  Jagged j;
  j.table_row_offsets = table_row_offsets.contiguous();
  j.indices = indices.contiguous();
  j.offsets = offsets.contiguous();
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    const at::Tensor& psw = *per_sample_weights;
    TORCH_CHECK(pooling == 0, op, ": per_sample_weights are only supported with sum pooling (pooling=0)");
    check_cuda(psw, "per_sample_weights", device);
    TORCH_CHECK(psw.dim() == 1 && psw.numel() == indices.numel(), "per_sample_weights must have shape [",
                indices.numel(), "] like indices, got ", psw.sizes());
    TORCH_CHECK(at::isFloatingType(psw.scalar_type()), "per_sample_weights must be floating point, got ",
                psw.scalar_type());
    j.per_sample_weights = psw.to(acc).contiguous();
  }
  j.p.table_row_offsets = reinterpret_cast<const long long*>(j.table_row_offsets.data_ptr<int64_t>());
  j.p.table_row_stride = table_row_offsets.dim() == 1 ? 1 : 2;
  j.p.acc_type = acc == at::kDouble ? pool::ScalarType::kDouble : pool::ScalarType::kFloat;
  j.p.num_tables = static_cast<int>(T);
  j.p.indices = j.indices.data_ptr();
  j.p.offsets = j.offsets.data_ptr();
  j.p.index_type = indices.scalar_type() == at::kInt ? pool::IndexType::kInt32 : pool::IndexType::kInt64;
  j.p.num_indices = indices.numel();
  j.p.batch_size = (offsets.numel() - 1) / T;
  j.p.per_sample_weights = j.per_sample_weights.defined() ? j.per_sample_weights.data_ptr() : nullptr;
  j.p.pooling = static_cast<int>(pooling);
  return j;
}

void set_weights(pool::Problem& p, const at::Tensor& weights) {
  TORCH_CHECK(weights.dim() == 2, "weights must be 2-D [rows_total, D], got shape ", weights.sizes());
  TORCH_CHECK(weights.size(1) <= 1 || weights.stride(1) == 1, "weights rows must be contiguous (stride(1) == 1), got strides ",
              weights.strides());
  TORCH_CHECK(weights.size(0) <= 1 || weights.stride(0) >= weights.size(1), "weights rows must not overlap, got strides ",
              weights.strides());
  p.weights = weights.data_ptr();
  p.weights_type = scalar_type(weights, "weights");
  p.rows_total = weights.size(0);
  p.dim = static_cast<int>(weights.size(1));
  p.ld = weights.size(0) <= 1 ? weights.size(1) : weights.stride(0);
}

void check_grad_output(const at::Tensor& grad_output, const pool::Problem& p, int64_t dim, const at::Device& device) {
  check_cuda(grad_output, "grad_output", device);
  scalar_type(grad_output, "grad_output");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == p.batch_size && grad_output.size(1) == p.num_tables &&
                  grad_output.size(2) == dim,
              "grad_output must have shape [B, T, D] = [", p.batch_size, ", ", p.num_tables, ", ", dim, "], got ",
              grad_output.sizes());
}

// The gradient in a dtype the kernels take together with the weights: the weights' own, or their accumulation
// dtype (fp32; fp64 for fp64 weights).
at::Tensor grad_for(const at::Tensor& grad, const at::Tensor& weights) {
  if (grad.scalar_type() == weights.scalar_type() || grad.scalar_type() == acc_dtype(weights)) return grad.contiguous();
  return grad.to(acc_dtype(weights)).contiguous();
}

void check_status(const pool::Status& s, const char* op, const pool::Problem& p) {
  TORCH_CHECK(s.code == pool::kOk, op, ": ", pool::describe(s, p.batch_size, p.rows_total, p.num_indices));
}

pool::OptimizerArgs optimizer_args(const at::Tensor& weights, const at::Tensor& state, int64_t optimizer,
                                   double lr, double eps, double weight_decay, const char* op) {
  TORCH_CHECK(optimizer == 0 || optimizer == 1, op, ": optimizer must be 0 (SGD) or 1 (row-wise Adagrad), got ",
              optimizer);
  TORCH_CHECK(std::isfinite(lr), "learning_rate must be finite, got ", lr);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay must be finite and >= 0, got ",
              weight_decay);
  if (optimizer == 1) {
    TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0 for row-wise Adagrad, got ", eps);
    check_cuda(state, "optimizer_state", weights.device());
    TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 1 && state.numel() == weights.size(0) &&
                    state.is_contiguous(),
                "optimizer_state must be a contiguous float32 tensor of shape [", weights.size(0),
                "] for row-wise Adagrad, got ", state.scalar_type(), " ", state.sizes());
  }
  pool::OptimizerArgs opt;
  opt.optimizer = static_cast<int>(optimizer);
  opt.learning_rate = static_cast<float>(lr);
  opt.eps = static_cast<float>(eps);
  opt.weight_decay = static_cast<float>(weight_decay);
  return opt;
}

// ---------------------------------------------------------------------------------------------------------
at::Tensor pool_forward_cuda(const at::Tensor& weights, const at::Tensor& table_row_offsets, const at::Tensor& indices,
                             const at::Tensor& offsets, int64_t pooling,
                             const std::optional<at::Tensor>& per_sample_weights) {
  const char* op = "jagged_embedding_pool";
  check_cuda(weights, "weights", weights.device());
  c10::cuda::CUDAGuard guard(weights.device());
  Jagged j = make_jagged(table_row_offsets, indices, offsets, pooling, per_sample_weights, acc_dtype(weights),
                         weights.device(), op);
  set_weights(j.p, weights);
  at::Tensor out = at::empty({j.p.batch_size, j.p.num_tables, weights.size(1)}, weights.options());
  at::Tensor ws = workspace(pool::forward_workspace_bytes(), weights.device());
  const pool::Status s = pool::forward(j.p, out.data_ptr(), ws.data_ptr(), current_stream(weights.device()));
  check_status(s, op, j.p);
  return out;
}

at::Tensor pool_forward_int8_cuda(const at::Tensor& weights, const at::Tensor& table_row_offsets,
                                  const at::Tensor& indices, const at::Tensor& offsets, int64_t pooling,
                                  const std::optional<at::Tensor>& per_sample_weights, int64_t embedding_dim) {
  const char* op = "jagged_embedding_pool_int8";
  check_cuda(weights, "weights", weights.device());
  c10::cuda::CUDAGuard guard(weights.device());
  TORCH_CHECK(weights.dim() == 2, "weights must be 2-D, got shape ", weights.sizes());
  check_int8_rows(weights, embedding_dim);
  Jagged j = make_jagged(table_row_offsets, indices, offsets, pooling, per_sample_weights, at::kFloat,
                         weights.device(), op);
  const at::Tensor w = weights.contiguous();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % int8_rows::kAlign == 0,
              "weights must start at an 8-byte aligned address (rows are read with 8-byte loads), got offset ",
              reinterpret_cast<uintptr_t>(w.data_ptr()) % int8_rows::kAlign);
  j.p.weights = w.data_ptr();
  j.p.weights_type = pool::ScalarType::kFloat;
  j.p.rows_total = w.size(0);
  j.p.dim = static_cast<int>(embedding_dim);
  j.p.ld = w.size(1);
  at::Tensor out = at::empty({j.p.batch_size, j.p.num_tables, embedding_dim}, weights.options().dtype(at::kFloat));
  at::Tensor ws = workspace(pool::forward_workspace_bytes(), weights.device());
  const pool::Status s =
      pool::forward_int8(j.p, out.data_ptr<float>(), ws.data_ptr(), current_stream(weights.device()));
  check_status(s, op, j.p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> pool_backward_sparse_cuda(const at::Tensor& grad_output,
                                                             const at::Tensor& table_row_offsets,
                                                             const at::Tensor& indices, const at::Tensor& offsets,
                                                             int64_t pooling,
                                                             const std::optional<at::Tensor>& per_sample_weights) {
  const char* op = "jagged_embedding_pool_backward_sparse";
  check_cuda(grad_output, "grad_output", grad_output.device());
  c10::cuda::CUDAGuard guard(grad_output.device());
  TORCH_CHECK(grad_output.dim() == 3, "grad_output must be 3-D [B, T, D], got shape ", grad_output.sizes());
  Jagged j = make_jagged(table_row_offsets, indices, offsets, pooling, per_sample_weights, acc_dtype(grad_output),
                         grad_output.device(), op);
  check_grad_output(grad_output, j.p, grad_output.size(2), grad_output.device());
  // No weights here: any row a table names is valid, so the tables bound the rows (as on the CPU).
  j.p.rows_total = std::max<int64_t>(0, j.table_row_offsets.max().item<int64_t>());
  j.p.dim = static_cast<int>(grad_output.size(2));
  j.p.ld = grad_output.size(2);
  const at::Tensor go = grad_output.contiguous();
  at::Tensor ws = workspace(pool::backward_workspace_bytes(j.p.num_indices), grad_output.device());
  const cudaStream_t stream = current_stream(grad_output.device());
  const pool::Status s = pool::backward_sort(j.p, ws.data_ptr(), stream);
  check_status(s, op, j.p);
  const int64_t u = s.num_segments;
  at::Tensor rows = at::empty({u}, grad_output.options().dtype(at::kLong));
  at::Tensor row_grads = at::empty({u, grad_output.size(2)}, grad_output.options());
  pool::backward_sparse_write(j.p, go.data_ptr(), scalar_type(go, "grad_output"), u, ws.data_ptr(),
                              reinterpret_cast<long long*>(rows.data_ptr<int64_t>()), row_grads.data_ptr(), stream);
  return {rows, row_grads};
}

at::Tensor pool_backward_psw_cuda(const at::Tensor& grad_output, const at::Tensor& weights,
                                  const at::Tensor& table_row_offsets, const at::Tensor& indices,
                                  const at::Tensor& offsets) {
  const char* op = "jagged_embedding_pool_backward_per_sample_weights";
  check_cuda(weights, "weights", weights.device());
  c10::cuda::CUDAGuard guard(weights.device());
  Jagged j = make_jagged(table_row_offsets, indices, offsets, 0, std::nullopt, acc_dtype(weights), weights.device(),
                         op);
  set_weights(j.p, weights);
  check_grad_output(grad_output, j.p, weights.size(1), weights.device());
  const at::Tensor go = grad_for(grad_output, weights);
  // In the accumulation dtype, like the CPU op (the Python front end casts it to per_sample_weights' dtype).
  at::Tensor grad = at::empty({j.p.num_indices}, weights.options().dtype(acc_dtype(weights)));
  at::Tensor ws = workspace(pool::forward_workspace_bytes(), weights.device());
  const pool::Status s = pool::backward_per_sample_weights(j.p, go.data_ptr(), scalar_type(go, "grad_output"),
                                                           grad.data_ptr(), ws.data_ptr(),
                                                           current_stream(weights.device()));
  check_status(s, op, j.p);
  return grad;
}

void pool_backward_fused_cuda(const at::Tensor& weights, const at::Tensor& optimizer_state,
                              const at::Tensor& grad_output, const at::Tensor& table_row_offsets,
                              const at::Tensor& indices, const at::Tensor& offsets,
                              int64_t pooling, const std::optional<at::Tensor>& per_sample_weights, int64_t optimizer,
                              double learning_rate, double eps, double weight_decay) {
  const char* op = "jagged_embedding_pool_backward_fused_";
  check_cuda(weights, "weights", weights.device());
  c10::cuda::CUDAGuard guard(weights.device());
  Jagged j = make_jagged(table_row_offsets, indices, offsets, pooling, per_sample_weights, acc_dtype(weights),
                         weights.device(), op);
  set_weights(j.p, weights);
  check_grad_output(grad_output, j.p, weights.size(1), weights.device());
  const pool::OptimizerArgs opt =
      optimizer_args(weights, optimizer_state, optimizer, learning_rate, eps, weight_decay, op);
  const at::Tensor go = grad_for(grad_output, weights);
  at::Tensor ws = workspace(pool::backward_workspace_bytes(j.p.num_indices), weights.device());
  const pool::Status s = pool::backward_fused(j.p, optimizer == 1 ? optimizer_state.data_ptr<float>() : nullptr,
                                              go.data_ptr(), scalar_type(go, "grad_output"), opt, ws.data_ptr(),
                                              current_stream(weights.device()));
  check_status(s, op, j.p);
}

void sparse_rows_step_cuda(const at::Tensor& weights, const at::Tensor& optimizer_state, const at::Tensor& rows,
                           const at::Tensor& row_grads, int64_t optimizer, double learning_rate, double eps,
                           double weight_decay) {
  const char* op = "sparse_rows_optimizer_step_";
  check_cuda(weights, "weights", weights.device());
  c10::cuda::CUDAGuard guard(weights.device());
  check_cuda(rows, "rows", weights.device());
  check_cuda(row_grads, "row_grads", weights.device());
  pool::Problem p;
  set_weights(p, weights);
  TORCH_CHECK(rows.dim() == 1, "rows must be 1-D, got shape ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, "rows must be int64 or int32, got ",
              rows.scalar_type());
  TORCH_CHECK(row_grads.dim() == 2 && row_grads.size(0) == rows.numel() && row_grads.size(1) == weights.size(1),
              "row_grads must have shape [", rows.numel(), ", ", weights.size(1), "], got ", row_grads.sizes());
  scalar_type(row_grads, "row_grads");
  const pool::OptimizerArgs opt =
      optimizer_args(weights, optimizer_state, optimizer, learning_rate, eps, weight_decay, op);
  const at::Tensor r = rows.to(at::kLong).contiguous();
  const at::Tensor g = grad_for(row_grads, weights);
  at::Tensor ws = workspace(pool::rows_step_workspace_bytes(r.numel()), weights.device());
  const pool::Status s = pool::sparse_rows_step(
      weights.data_ptr(), p.weights_type, p.rows_total, p.dim, p.ld,
      optimizer == 1 ? optimizer_state.data_ptr<float>() : nullptr,
      reinterpret_cast<const long long*>(r.data_ptr<int64_t>()), r.numel(), g.data_ptr(), scalar_type(g, "row_grads"),
      opt, ws.data_ptr(), current_stream(weights.device()));
  TORCH_CHECK(s.code == pool::kOk, op, ": ", pool::describe(s, 0, p.rows_total, r.numel()));
}

}  // namespace
}  // namespace lattice

TORCH_LIBRARY_IMPL(lattice, CUDA, m) {
  m.impl("jagged_embedding_pool", &lattice::pool_forward_cuda);
  m.impl("jagged_embedding_pool_int8", &lattice::pool_forward_int8_cuda);
  m.impl("jagged_embedding_pool_backward_sparse", &lattice::pool_backward_sparse_cuda);
  m.impl("jagged_embedding_pool_backward_per_sample_weights", &lattice::pool_backward_psw_cuda);
  m.impl("jagged_embedding_pool_backward_fused_", &lattice::pool_backward_fused_cuda);
  m.impl("sparse_rows_optimizer_step_", &lattice::sparse_rows_step_cuda);
}
