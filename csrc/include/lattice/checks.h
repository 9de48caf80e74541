// Input validation shared by the CPU kernels (and the CUDA glue, after copying offsets to host or
// through a device-side check). Every failure names the argument and the offending value.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "lattice/int8_rows.h"

namespace lattice {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
              " must be int32 or int64, got ", t.scalar_type());
}

// An int8 row-wise quantized table (lattice/int8_rows.h) of `embedding_dim` columns: uint8 [rows, row_bytes].
// Shape and device are checked by the caller.
inline void check_int8_rows(const at::Tensor& weights, int64_t embedding_dim) {
  TORCH_CHECK(embedding_dim >= 1, "embedding_dim must be >= 1, got ", embedding_dim);
  TORCH_CHECK(weights.scalar_type() == at::kByte,
              "weights must be uint8 (rows quantized by lattice.ops.quantize_rows_int8), got ", weights.scalar_type());
  const int64_t want = int8_rows::row_bytes(embedding_dim);
  TORCH_CHECK(weights.size(1) == want, "weights must have ", want, " bytes per row for embedding_dim=", embedding_dim,
              " (", embedding_dim, " uint8 codes padded to a multiple of ", int8_rows::kAlign,
              ", then fp32 scale and bias), got ", weights.size(1));
}

// CSR offsets on the CPU: 1-D, `expected_size` entries (if >= 0), starting at 0, non-decreasing, and
// ending at or before `total` (the number of values they index). `what` names a segment in messages
// (e.g. "bag" or "sample").
template <typename index_t>
void check_offsets_cpu(const at::Tensor& offsets, const char* name, int64_t expected_size, int64_t total,
                       const char* values_name, const char* what) {
  check_dim(offsets, 1, name);
  if (expected_size >= 0) {
    TORCH_CHECK(offsets.numel() == expected_size, name, " must have ", expected_size, " entries, got ",
                offsets.numel());
  }
  TORCH_CHECK(offsets.numel() >= 1, name, " must have at least one entry");
  const at::Tensor contiguous = offsets.contiguous();
  const index_t* o = contiguous.data_ptr<index_t>();
  const int64_t n = contiguous.numel();
  TORCH_CHECK(o[0] == 0, name, "[0] must be 0, got ", static_cast<int64_t>(o[0]));
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(o[i] >= o[i - 1], name, " must be non-decreasing: ", what, " ", i - 1, " has ", name, "[", i - 1,
                "] = ", static_cast<int64_t>(o[i - 1]), " > ", name, "[", i, "] = ", static_cast<int64_t>(o[i]));
  }
  TORCH_CHECK(o[n - 1] <= total, name, "[-1] = ", static_cast<int64_t>(o[n - 1]), " overruns ", values_name,
              " (", total, " entries)");
}

}  // namespace lattice
