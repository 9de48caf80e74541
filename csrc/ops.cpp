// Every lattice op schema, in one place. Kernels register implementations per dispatch key in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA); the Python side (lattice/ops/) adds autograd and
// fake (meta) kernels.
#include <torch/library.h>

// No Python here: this file is also part of liblattice_ops.so (C++ serving); lattice._C's module init is in
// csrc/python_module.cpp.
TORCH_LIBRARY(lattice, m) {
  // ---- fused jagged embedding pooling -------------------------------------------------------
  // weights [rows_total, D]; table_row_offsets [T+1] int64; indices [N] int32|int64, local to their
  // table; offsets [T*B+1] key-major (bag t*B+b), same dtype as indices; pooling 0=sum 1=mean;
  // per_sample_weights [N] (sum only). Returns [B, T, D] in the weights' dtype.
  m.def(
      "jagged_embedding_pool(Tensor weights, Tensor table_row_offsets, Tensor indices, Tensor offsets, "
      "int pooling, Tensor? per_sample_weights) -> Tensor");
  // Sparse row gradient: (rows [U] int64 global row ids, sorted and unique; row_grads [U, D] in
  // grad_output's dtype).
  m.def(
      "jagged_embedding_pool_backward_sparse(Tensor grad_output, Tensor table_row_offsets, Tensor indices, "
      "Tensor offsets, int pooling, Tensor? per_sample_weights) -> (Tensor rows, Tensor row_grads)");
  // Gradient of per_sample_weights [N]: <grad_output[b, t], weights[row of i]> (sum pooling only).
  m.def(
      "jagged_embedding_pool_backward_per_sample_weights(Tensor grad_output, Tensor weights, "
      "Tensor table_row_offsets, Tensor indices, Tensor offsets) -> Tensor");
  // Backward fused with an in-place optimizer step; no gradient tensor is materialized.
  // optimizer 0 = SGD, 1 = row-wise Adagrad (optimizer_state [rows_total] fp32: running sum of the
  // row's mean squared gradient). For SGD optimizer_state is ignored (pass an empty tensor).
  m.def(
      "jagged_embedding_pool_backward_fused_(Tensor(a!) weights, Tensor(b!) optimizer_state, "
      "Tensor grad_output, Tensor table_row_offsets, Tensor indices, Tensor offsets, int pooling, "
      "Tensor? per_sample_weights, int optimizer, float learning_rate, float eps, float weight_decay) -> ()");
  // The same optimizer step from already-reduced row gradients (rows unique): used after the rows and
  // their gradients have been exchanged across ranks.
  m.def(
      "sparse_rows_optimizer_step_(Tensor(a!) weights, Tensor(b!) optimizer_state, Tensor rows, "
      "Tensor row_grads, int optimizer, float learning_rate, float eps, float weight_decay) -> ()");

  // Inference over int8 row-wise quantized tables (csrc/include/lattice/int8_rows.h): weights uint8
  // [rows_total, row_bytes(embedding_dim)], each row's codes followed by its fp32 scale and bias; the other
  // arguments as jagged_embedding_pool's. Accumulates in fp32; returns [B, T, embedding_dim] float32. Forward only.
  m.def(
      "jagged_embedding_pool_int8(Tensor weights, Tensor table_row_offsets, Tensor indices, Tensor offsets, "
      "int pooling, Tensor? per_sample_weights, int embedding_dim) -> Tensor");

  // Asks for transparent huge pages over the 2 MB-aligned part of a contiguous CPU tensor's memory (Linux
  // madvise(MADV_HUGEPAGE); advice only, the values are untouched). True when advice was given. Use it before
  // the memory's first touch: pages already mapped stay as they are.
  m.def("advise_huge_pages(Tensor self) -> bool");

  // ---- jagged (interleaved) cross-attention -------------------------------------------------
  // q [Nq, H, Dh] + q_offsets [B+1]; k, v [Nk, H, Dh] + kv_offsets [B+1] (int64). causal aligns the
  // last query with the last key. Returns out [Nq, H, Dh] (q's dtype) and lse [Nq, H] fp32.
  m.def(
      "jagged_attention(Tensor q, Tensor q_offsets, Tensor k, Tensor v, Tensor kv_offsets, float scale, "
      "bool causal) -> (Tensor out, Tensor lse)");
  m.def(
      "jagged_attention_backward(Tensor grad_out, Tensor q, Tensor q_offsets, Tensor k, Tensor v, "
      "Tensor kv_offsets, Tensor out, Tensor lse, float scale, bool causal) -> (Tensor grad_q, Tensor grad_k, "
      "Tensor grad_v)");
}
