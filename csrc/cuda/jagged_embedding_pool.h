// Host launchers of the CUDA jagged embedding pooling kernels (csrc/cuda/jagged_embedding_pool.cu), plain C++
// (the torch glue includes this header; only the .cu includes the kernel bodies). They take
// raw device pointers, sizes and a stream; workspace comes from the caller (the torch glue allocates it from the
// caching allocator, the emulated tests from guarded memory). No torch headers here.
//
// Every entry point validates the jagged input on the device (table_row_offsets, offsets, indices; rows for
// the sparse-rows step), reads one small Status back (a single stream synchronization) and returns it; the
// caller turns a failure into an error with describe(). Kernels that modify memory in place check the device
// status first, so invalid input never changes weights or optimizer state.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace lattice {
namespace cuda {
namespace pool {

// Device-side validation result. Written by the check kernels, read back once by the host.
struct Status {
  long long code;          // a StatusCode
  long long position;      // index into the offending tensor
  long long value;         // the offending value
  long long value2;        // context (the previous offset, a table's end row or row count)
  long long table;         // table of the offending index or range
  long long sample;        // sample of the offending index
  long long num_segments;  // unique rows found by the backward sort
  unsigned long long first_bad[3];  // atomicMin slots: table_row_offsets, offsets (or rows), indices (or dups)
};

enum StatusCode : long long {
  kOk = 0,
  kTableRange = 1,
  kOffsetsStart = 4,
  kOffsetsDecreasing = 5,
  kOffsetsOverrun = 6,
  kIndexNegative = 7,
  kIndexOutOfRange = 8,
  kRowOutOfRange = 9,
  kRowDuplicate = 10,
};

constexpr unsigned long long kNoError = ~0ull;

enum class ScalarType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };
enum class IndexType : int { kInt32 = 0, kInt64 = 1 };

// The packed tables and one jagged batch.
struct Problem {
  const void* weights = nullptr;        // [rows_total, dim], row stride ld (elements)
  ScalarType weights_type = ScalarType::kFloat;
  long long rows_total = 0;
  int dim = 0;
  long long ld = 0;
  const long long* table_row_offsets = nullptr;  // [num_tables + 1] (packed) or [num_tables, 2] (row ranges)
  int table_row_stride = 1;                      // 1 for [T+1], 2 for [T, 2]
  int num_tables = 0;
  const void* indices = nullptr;         // [num_indices]
  const void* offsets = nullptr;         // [num_tables * batch_size + 1], same type as indices
  IndexType index_type = IndexType::kInt64;
  long long num_indices = 0;
  long long batch_size = 0;
  // Accumulation type (kFloat, or kDouble for fp64 weights - or fp64 gradients in the sparse backward, which
  // has no weights); per_sample_weights [num_indices] come in this type, or nullptr.
  ScalarType acc_type = ScalarType::kFloat;
  const void* per_sample_weights = nullptr;
  int pooling = 0;                       // 0 sum, 1 mean
};

// Optimizer step parameters (optimizer: 0 SGD, 1 row-wise Adagrad).
struct OptimizerArgs {
  int optimizer = 0;
  float learning_rate = 0.01f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
};

size_t forward_workspace_bytes();
// out: [batch_size, num_tables, dim] in weights_type.
Status forward(const Problem& p, void* out, void* workspace, cudaStream_t stream);

// The int8 row-wise quantized variant (lattice/int8_rows.h): p.weights uint8 [rows_total, ld] with ld =
// int8_rows::row_bytes(dim) bytes per row, 8-byte aligned; p.weights_type and p.acc_type must be kFloat
// (per_sample_weights fp32). out: [batch_size, num_tables, dim] float32. Workspace: forward_workspace_bytes().
Status forward_int8(const Problem& p, float* out, void* workspace, cudaStream_t stream);

size_t backward_workspace_bytes(long long num_indices);
// Validates, sorts (row, position) pairs by row and finds the unique rows; Status::num_segments is the number
// of unique rows U. Follow with backward_sparse_write() using the same workspace.
Status backward_sort(const Problem& p, void* workspace, cudaStream_t stream);
// rows [U] int64 (sorted, unique, global row ids) and row_grads [U, dim] in grad_type; grad_output [B, T, dim]
// contiguous in grad_type.
void backward_sparse_write(const Problem& p, const void* grad_output, ScalarType grad_type, long long num_unique,
                           void* workspace, long long* rows, void* row_grads, cudaStream_t stream);
// Validates, sorts, reduces and applies the optimizer to the weights in place (p.weights is written).
// grad_type must be weights_type or the accumulation type; state [rows_total] fp32 for row-wise Adagrad.
Status backward_fused(const Problem& p, float* optimizer_state, const void* grad_output, ScalarType grad_type,
                      const OptimizerArgs& opt, void* workspace, cudaStream_t stream);

// grad_psw [num_indices] in the accumulation type (fp64 for fp64 weights, else fp32); positions outside every
// bag get 0. grad_type: weights_type or the accumulation type.
Status backward_per_sample_weights(const Problem& p, const void* grad_output, ScalarType grad_type, void* grad_psw,
                                   void* workspace, cudaStream_t stream);

size_t rows_step_workspace_bytes(long long num_rows);
// The optimizer step from reduced row gradients: rows [num_rows] int64 (must be unique and in range),
// row_grads [num_rows, dim] in grad_type (weights_type or the accumulation type).
Status sparse_rows_step(void* weights, ScalarType weights_type, long long rows_total, int dim, long long ld,
                        float* optimizer_state, const long long* rows, long long num_rows, const void* row_grads,
                        ScalarType grad_type, const OptimizerArgs& opt, void* workspace, cudaStream_t stream);

// A message for a failed Status ("" when ok): names the tensor, position, value and table.
std::string describe(const Status& s, long long batch_size, long long rows_total, long long num_indices);

}  // namespace pool
}  // namespace cuda
}  // namespace lattice
