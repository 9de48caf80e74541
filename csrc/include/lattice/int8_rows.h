// The byte layout of an int8 row-wise quantized embedding row, shared by the CPU and CUDA kernels (plain C++, no
// torch headers). lattice/ops/int8_rows.py writes and reads the same layout; docs/serving.md says why this one.
//
//   [ D uint8 codes | zero padding to a multiple of 8 bytes | fp32 scale | fp32 bias ]
//
// value[c] = scale * code[c] + bias. Every row is a multiple of 8 bytes, so in a table whose base is 8-byte
// aligned the codes start 8-byte aligned (one 8-byte load per 8 columns) and the scale and bias are one aligned
// 8-byte pair; a 16-byte load of codes at a multiple of 16 never leaves the row.
#pragma once

namespace lattice {
namespace int8_rows {

constexpr long long kAlign = 8;  // bytes: codes padding and row size are multiples of this

// Bytes of codes (padded) in a row of `dim` columns; the scale sits right after them, then the bias.
constexpr long long code_bytes(long long dim) { return (dim + kAlign - 1) / kAlign * kAlign; }
// Bytes of one quantized row of `dim` columns.
constexpr long long row_bytes(long long dim) { return code_bytes(dim) + 2 * 4; }

}  // namespace int8_rows
}  // namespace lattice
