// Emulated entry points for the CUDA pooling launchers (tests/cuda_emu/test_emu_pooling.py). Each copies host
// inputs into guarded device buffers, runs the same launcher code as the GPU build, and copies results back.
// Integer arguments are long long and real ones double, so ctypes can pass them without declared signatures.
#include "cuda/jagged_embedding_pool.cu"

#include "emu_entry.h"

using lattice::cuda::pool::IndexType;
using lattice::cuda::pool::OptimizerArgs;
using lattice::cuda::pool::Problem;
using lattice::cuda::pool::ScalarType;
using lattice::cuda::pool::Status;
using lattice_emu::DeviceBuffer;
using lattice_emu::guarded_call;

namespace {

size_t scalar_bytes(long long t) { return t == 3 ? 8 : t == 0 ? 4 : 2; }
// Accumulation type of a scalar type code: 3 (fp64) for fp64, else 0 (fp32).
long long acc_of(long long t) { return t == 3 ? 3 : 0; }
size_t index_bytes(long long t) { return t == 0 ? 4 : 8; }

// Device copies of one jagged batch and its tables. tro_stride: 1 for table_row_offsets [T+1], 2 for [T, 2].
// per_sample_weights come in the accumulation type acc (0 fp32, 3 fp64).
struct Batch {
  DeviceBuffer tro, indices, offsets, psw;
  Problem p;

  Batch(const long long* tro_h, long long tro_stride, long long T, const void* idx_h, const void* off_h,
        long long itype, long long N, long long B, const void* psw_h, long long acc, long long pooling,
        long long rows_total, long long dim, long long ld)
      : tro(tro_h, sizeof(long long) * (tro_stride == 2 ? 2 * T : T + 1), "table_row_offsets"),
        indices(idx_h, index_bytes(itype) * N, "indices"),
        offsets(off_h, index_bytes(itype) * (T * B + 1), "offsets") {
    if (psw_h) psw = DeviceBuffer(psw_h, scalar_bytes(acc) * N, "per_sample_weights");
    p.table_row_offsets = tro.get<const long long>();
    p.table_row_stride = static_cast<int>(tro_stride);
    p.acc_type = static_cast<ScalarType>(acc);
    p.num_tables = static_cast<int>(T);
    p.indices = indices.get();
    p.offsets = offsets.get();
    p.index_type = itype == 0 ? IndexType::kInt32 : IndexType::kInt64;
    p.num_indices = N;
    p.batch_size = B;
    p.per_sample_weights = psw_h ? psw.get() : nullptr;
    p.pooling = static_cast<int>(pooling);
    p.rows_total = rows_total;
    p.dim = static_cast<int>(dim);
    p.ld = ld;
  }
};

void throw_if_bad(const Status& s, const char* op, const Problem& p) {
  if (s.code != lattice::cuda::pool::kOk) {
    throw std::runtime_error(std::string(op) + ": " +
                             lattice::cuda::pool::describe(s, p.batch_size, p.rows_total, p.num_indices));
  }
}

}  // namespace

LATTICE_EMU_EXPORT int emu_pool_forward(const void* w, long long wtype, long long rows_total, long long dim,
                                        long long ld, const long long* tro, long long tro_stride, long long T, const void* idx,
                                        const void* off, long long itype, long long N, long long B, const void* psw,
                                        long long pooling, void* out, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    Batch batch(tro, tro_stride, T, idx, off, itype, N, B, psw, acc_of(wtype), pooling, rows_total, dim, ld);
    DeviceBuffer dw(w, scalar_bytes(wtype) * rows_total * ld, "weights");
    DeviceBuffer dout(scalar_bytes(wtype) * B * T * dim, "output");
    DeviceBuffer ws(lattice::cuda::pool::forward_workspace_bytes(), "workspace");
    batch.p.weights = dw.get();
    batch.p.weights_type = static_cast<ScalarType>(wtype);
    const Status s = lattice::cuda::pool::forward(batch.p, dout.get(), ws.get(), nullptr);
    throw_if_bad(s, "jagged_embedding_pool", batch.p);
    dout.to_host(out);
  });
}

// rows_out [N] and grads_out [N, dim] are upper bounds; *num_unique receives U.
LATTICE_EMU_EXPORT int emu_pool_backward_sparse(const void* grad_output, long long gtype, const long long* tro,
                                                long long tro_stride, long long T, const void* idx, const void* off, long long itype,
                                                long long N, long long B, const void* psw, long long pooling,
                                                long long rows_total, long long dim, long long* rows_out,
                                                void* grads_out, long long* num_unique, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    Batch batch(tro, tro_stride, T, idx, off, itype, N, B, psw, acc_of(gtype), pooling, rows_total, dim, dim);
    DeviceBuffer dgo(grad_output, scalar_bytes(gtype) * B * T * dim, "grad_output");
    DeviceBuffer ws(lattice::cuda::pool::backward_workspace_bytes(N), "workspace");
    const Status s = lattice::cuda::pool::backward_sort(batch.p, ws.get(), nullptr);
    throw_if_bad(s, "jagged_embedding_pool_backward_sparse", batch.p);
    const long long u = s.num_segments;
    DeviceBuffer drows(sizeof(long long) * u, "rows"), dgrads(scalar_bytes(gtype) * u * dim, "row_grads");
    lattice::cuda::pool::backward_sparse_write(batch.p, dgo.get(), static_cast<ScalarType>(gtype), u, ws.get(),
                                               drows.get<long long>(), dgrads.get(), nullptr);
    drows.to_host(rows_out);
    dgrads.to_host(grads_out);
    *num_unique = u;
  });
}

LATTICE_EMU_EXPORT int emu_pool_backward_fused(void* w, long long wtype, long long rows_total, long long dim,
                                               long long ld, float* state, const void* grad_output, long long gtype,
                                               const long long* tro, long long tro_stride, long long T, const void* idx, const void* off,
                                               long long itype, long long N, long long B, const void* psw,
                                               long long pooling, long long optimizer, double lr, double eps,
                                               double weight_decay, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    Batch batch(tro, tro_stride, T, idx, off, itype, N, B, psw, acc_of(wtype), pooling, rows_total, dim, ld);
    DeviceBuffer dw(w, scalar_bytes(wtype) * rows_total * ld, "weights");
    DeviceBuffer dstate;
    if (optimizer == 1) dstate = DeviceBuffer(state, sizeof(float) * rows_total, "optimizer_state");
    DeviceBuffer dgo(grad_output, scalar_bytes(gtype) * B * T * dim, "grad_output");
    DeviceBuffer ws(lattice::cuda::pool::backward_workspace_bytes(N), "workspace");
    batch.p.weights = dw.get();
    batch.p.weights_type = static_cast<ScalarType>(wtype);
    OptimizerArgs opt;
    opt.optimizer = static_cast<int>(optimizer);
    opt.learning_rate = static_cast<float>(lr);
    opt.eps = static_cast<float>(eps);
    opt.weight_decay = static_cast<float>(weight_decay);
    const Status s = lattice::cuda::pool::backward_fused(batch.p, dstate.get<float>(), dgo.get(),
                                                         static_cast<ScalarType>(gtype), opt, ws.get(), nullptr);
    // Copy back even on failure: the test checks that invalid input left everything untouched.
    dw.to_host(w);
    if (optimizer == 1) dstate.to_host(state);
    throw_if_bad(s, "jagged_embedding_pool_backward_fused_", batch.p);
  });
}

LATTICE_EMU_EXPORT int emu_pool_backward_psw(const void* grad_output, long long gtype, const void* w, long long wtype,
                                             long long rows_total, long long dim, long long ld, const long long* tro,
                                             long long tro_stride, long long T, const void* idx, const void* off, long long itype,
                                             long long N, long long B, void* grad_psw, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    Batch batch(tro, tro_stride, T, idx, off, itype, N, B, nullptr, acc_of(wtype), 0, rows_total, dim, ld);
    DeviceBuffer dw(w, scalar_bytes(wtype) * rows_total * ld, "weights");
    DeviceBuffer dgo(grad_output, scalar_bytes(gtype) * B * T * dim, "grad_output");
    DeviceBuffer dout(scalar_bytes(acc_of(wtype)) * N, "grad_per_sample_weights");
    DeviceBuffer ws(lattice::cuda::pool::forward_workspace_bytes(), "workspace");
    batch.p.weights = dw.get();
    batch.p.weights_type = static_cast<ScalarType>(wtype);
    const Status s = lattice::cuda::pool::backward_per_sample_weights(batch.p, dgo.get(), static_cast<ScalarType>(gtype),
                                                                      dout.get(), ws.get(), nullptr);
    throw_if_bad(s, "jagged_embedding_pool_backward_per_sample_weights", batch.p);
    dout.to_host(grad_psw);
  });
}

LATTICE_EMU_EXPORT int emu_sparse_rows_step(void* w, long long wtype, long long rows_total, long long dim, long long ld,
                                            float* state, const long long* rows, long long num_rows,
                                            const void* row_grads, long long gtype, long long optimizer, double lr,
                                            double eps, double weight_decay, char* err, size_t err_len) {
  return guarded_call(err, err_len, [&] {
    DeviceBuffer dw(w, scalar_bytes(wtype) * rows_total * ld, "weights");
    DeviceBuffer dstate;
    if (optimizer == 1) dstate = DeviceBuffer(state, sizeof(float) * rows_total, "optimizer_state");
    DeviceBuffer drows(rows, sizeof(long long) * num_rows, "rows");
    DeviceBuffer dgrads(row_grads, scalar_bytes(gtype) * num_rows * dim, "row_grads");
    DeviceBuffer ws(lattice::cuda::pool::rows_step_workspace_bytes(num_rows), "workspace");
    OptimizerArgs opt;
    opt.optimizer = static_cast<int>(optimizer);
    opt.learning_rate = static_cast<float>(lr);
    opt.eps = static_cast<float>(eps);
    opt.weight_decay = static_cast<float>(weight_decay);
    const Status s = lattice::cuda::pool::sparse_rows_step(
        dw.get(), static_cast<ScalarType>(wtype), rows_total, static_cast<int>(dim), ld, dstate.get<float>(),
        drows.get<const long long>(), num_rows, dgrads.get(), static_cast<ScalarType>(gtype), opt, ws.get(), nullptr);
    dw.to_host(w);
    if (optimizer == 1) dstate.to_host(state);
    if (s.code != lattice::cuda::pool::kOk) {
      throw std::runtime_error("sparse_rows_optimizer_step_: " +
                               lattice::cuda::pool::describe(s, 0, rows_total, num_rows));
    }
  });
}

// int8 row-wise quantized tables: w uint8 [rows_total, row_bytes], out float32 [B, T, dim]; psw fp32 or null.
LATTICE_EMU_EXPORT int emu_pool_forward_int8(const void* w, long long rows_total, long long dim, long long row_bytes,
                                             const long long* tro, long long tro_stride, long long T, const void* idx,
                                             const void* off, long long itype, long long N, long long B,
                                             const void* psw, long long pooling, float* out, char* err,
                                             size_t err_len) {
  return guarded_call(err, err_len, [&] {
    Batch batch(tro, tro_stride, T, idx, off, itype, N, B, psw, 0, pooling, rows_total, dim, row_bytes);
    DeviceBuffer dw(w, static_cast<size_t>(rows_total * row_bytes), "weights");
    DeviceBuffer dout(sizeof(float) * B * T * dim, "output");
    DeviceBuffer ws(lattice::cuda::pool::forward_workspace_bytes(), "workspace");
    batch.p.weights = dw.get();
    batch.p.weights_type = ScalarType::kFloat;
    const Status s = lattice::cuda::pool::forward_int8(batch.p, dout.get<float>(), ws.get(), nullptr);
    throw_if_bad(s, "jagged_embedding_pool_int8", batch.p);
    dout.to_host(out);
  });
}
