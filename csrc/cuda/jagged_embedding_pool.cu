// Launchers of the CUDA jagged embedding pooling kernels: dtype / index-type / vector-width dispatch, workspace
// carving, the backward sort pipeline, and the single status read-back per call. See jagged_embedding_pool.h.
#include "jagged_embedding_pool.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "jagged_embedding_pool_int8_kernels.cuh"
#include "jagged_embedding_pool_kernels.cuh"
#include "lattice/cuda/launch.cuh"

namespace lattice {
namespace cuda {
namespace pool {
namespace {

constexpr long long kMaxBlocks = 1 << 16;  // grid-stride kernels never need more

long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }
int blocks_for(long long work_items, long long per_block) {
  return static_cast<int>(std::max<long long>(1, std::min(ceil_div(work_items, per_block), kMaxBlocks)));
}

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

// A persistent grid for the grid-stride forward: at most as many blocks as the GPU holds at once, so short
// bags are not paid for with block launches and per-block tails (B = 2048, T = 26 is 53k bags).
int persistent_blocks(long long work_items, long long per_block) {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return std::max(1, std::min(blocks_for(work_items, per_block), sms * kForwardBlocksPerSm));
}

template <typename F>
void dispatch_scalar(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::kFloat: f(static_cast<float*>(nullptr)); return;
    case ScalarType::kHalf: f(static_cast<__half*>(nullptr)); return;
    case ScalarType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); return;
    case ScalarType::kDouble: f(static_cast<double*>(nullptr)); return;
  }
  throw std::invalid_argument("lattice pooling: unknown scalar type");
}

template <typename F>
void dispatch_index(IndexType t, F&& f) {
  if (t == IndexType::kInt32) {
    f(static_cast<int*>(nullptr));
  } else {
    f(static_cast<long long*>(nullptr));
  }
}

// grad_t is either the weights' type or their accumulation type.
template <typename scalar_t, typename F>
void dispatch_grad(ScalarType weights_type, ScalarType grad_type, F&& f) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (grad_type == weights_type) {
    f(static_cast<scalar_t*>(nullptr));
  } else if (grad_type == (std::is_same<acc_t, double>::value ? ScalarType::kDouble : ScalarType::kFloat)) {
    f(static_cast<acc_t*>(nullptr));
  } else {
    throw std::invalid_argument("lattice pooling: the gradient must have the weights' dtype or their accumulation type");
  }
}

template <typename A>
void require_acc(const Problem& p) {
  const ScalarType want = std::is_same<A, double>::value ? ScalarType::kDouble : ScalarType::kFloat;
  if (p.acc_type != want) throw std::invalid_argument("lattice pooling: Problem::acc_type does not match the dtypes");
}

// VEC in {8, 4, 2, 1}: the widest that divides dim and every row stride and keeps every pointer aligned to
// min(16, VEC * element size); at most 16 bytes of the first type per load.
struct Ptr {
  const void* p;
  int elem_bytes;
};
int pick_vec(int dim, long long ld, std::initializer_list<Ptr> ptrs) {
  const int first_bytes = ptrs.begin()->elem_bytes;
  for (int vec : {8, 4, 2}) {
    if (vec * first_bytes > 16 || dim % vec != 0 || ld % vec != 0) continue;
    bool ok = true;
    for (const Ptr& q : ptrs) {
      const uintptr_t align = static_cast<uintptr_t>(std::min(16, vec * q.elem_bytes));
      if (reinterpret_cast<uintptr_t>(q.p) % align != 0) ok = false;
    }
    if (ok) return vec;
  }
  return 1;
}

template <typename F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 8: f(std::integral_constant<int, 8>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    default: f(std::integral_constant<int, 1>{}); return;
  }
}

// Lanes per bag / row: enough to cover dim with VEC columns each, a power of two <= 32.
int group_size_for(int dim, int vec) {
  const int lanes = std::max(1, (dim + vec - 1) / vec);
  int g = 1;
  while (g < lanes && g < 32) g *= 2;
  return g;
}

TableRows tables_of(const Problem& p) { return TableRows{p.table_row_offsets, p.table_row_stride}; }

Status read_status(const Status* device_status, cudaStream_t stream) {
  Status s;
  check(cudaMemcpyAsync(&s, device_status, sizeof(Status), cudaMemcpyDeviceToHost, stream), "status copy");
  check(cudaStreamSynchronize(stream), "status synchronize");
  return s;
}

void launch_check(const Problem& p, Status* status, cudaStream_t stream) {
  launch(status_init_kernel, dim3(1), dim3(32), 0, stream, status);
  const long long num_bags = static_cast<long long>(p.num_tables) * p.batch_size;
  const long long work = std::max<long long>({num_bags * 32, num_bags + 1, static_cast<long long>(p.num_tables)});
  dispatch_index(p.index_type, [&](auto index_tag) {
    using index_t = std::remove_pointer_t<decltype(index_tag)>;
    const auto* indices = static_cast<const index_t*>(p.indices);
    const auto* offsets = static_cast<const index_t*>(p.offsets);
    launch(check_inputs_kernel<index_t>, dim3(blocks_for(work, kThreads)), dim3(kThreads), 0, stream, tables_of(p),
           indices, offsets, p.rows_total, p.num_indices, p.num_tables, num_bags, status);
    launch(check_finalize_kernel<index_t>, dim3(1), dim3(32), 0, stream, tables_of(p), indices, offsets,
           p.num_indices, p.num_tables, num_bags, status);
  });
}

// --- exclusive scan and radix sort -----------------------------------------------------------------------
long long scan_scratch_elems(long long n) {
  long long total = 0;
  for (long long tiles = ceil_div(n, kScanTile); tiles > 1; tiles = ceil_div(tiles, kScanTile)) total += tiles;
  return total + 1;
}

void exclusive_scan(int* data, long long n, int* scratch, cudaStream_t stream) {
  if (n <= 0) return;
  const long long tiles = ceil_div(n, kScanTile);
  if (tiles == 1) {
    launch(scan_tiles_kernel, dim3(1), dim3(kScanThreads), 0, stream, data, data, n, static_cast<int*>(nullptr));
    return;
  }
  int* sums = scratch;
  launch(scan_tiles_kernel, dim3(static_cast<unsigned>(tiles)), dim3(kScanThreads), 0, stream, data, data, n, sums);
  exclusive_scan(sums, tiles, scratch + tiles, stream);
  launch(scan_add_kernel, dim3(static_cast<unsigned>(tiles)), dim3(kScanThreads), 0, stream, data, n,
         static_cast<const int*>(sums));
}

int bit_width(long long v) {
  int bits = 0;
  while (v > 0) {
    ++bits;
    v >>= 1;
  }
  return bits;
}

// Sorts (keys, vals) by key bits [0, bits) in place (keys_alt / vals_alt are scratch of the same size).
void radix_sort(long long* keys, int* vals, long long* keys_alt, int* vals_alt, long long n, int bits, int* hist,
                int* scratch, cudaStream_t stream) {
  if (n <= 1) return;
  const long long tiles = ceil_div(n, kSortTile);
  bool in_alt = false;
  for (int shift = 0; shift < bits; shift += kRadixBits) {
    launch(radix_histogram_kernel, dim3(static_cast<unsigned>(tiles)), dim3(kSortThreads), 0, stream,
           static_cast<const long long*>(keys), n, shift, hist);
    exclusive_scan(hist, tiles * kRadix, scratch, stream);
    launch(radix_scatter_kernel, dim3(static_cast<unsigned>(tiles)), dim3(kSortThreads), 0, stream,
           static_cast<const long long*>(keys), static_cast<const int*>(vals), n, shift,
           static_cast<const int*>(hist), keys_alt, vals_alt);
    std::swap(keys, keys_alt);
    std::swap(vals, vals_alt);
    in_alt = !in_alt;
  }
  if (in_alt) {  // an odd number of passes: the result is in the caller's scratch buffers
    check(cudaMemcpyAsync(keys_alt, keys, sizeof(long long) * n, cudaMemcpyDeviceToDevice, stream), "sort copy");
    check(cudaMemcpyAsync(vals_alt, vals, sizeof(int) * n, cudaMemcpyDeviceToDevice, stream), "sort copy");
  }
}

// --- workspace ---------------------------------------------------------------------------------------------
struct SortWorkspace {
  Status* status = nullptr;
  long long* keys = nullptr;
  long long* keys_alt = nullptr;
  int* vals = nullptr;
  int* vals_alt = nullptr;
  int* bag_of = nullptr;
  void* scale = nullptr;  // [n] in the accumulation type
  int* seg_index = nullptr;
  int* seg_start = nullptr;
  int* hist = nullptr;
  int* scratch = nullptr;
  size_t bytes = 0;
};

// Carves the workspace (base may be null to compute the size).
SortWorkspace carve(void* base, long long n) {
  SortWorkspace w;
  char* p = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* r = p ? p + off : nullptr;
    off += align_up(std::max<size_t>(bytes, 1));
    return r;
  };
  const long long tiles = std::max<long long>(1, ceil_div(n, kSortTile));
  const long long scan_len = std::max<long long>(n, tiles * kRadix);
  w.status = reinterpret_cast<Status*>(take(sizeof(Status)));
  w.keys = reinterpret_cast<long long*>(take(sizeof(long long) * n));
  w.keys_alt = reinterpret_cast<long long*>(take(sizeof(long long) * n));
  w.vals = reinterpret_cast<int*>(take(sizeof(int) * n));
  w.vals_alt = reinterpret_cast<int*>(take(sizeof(int) * n));
  w.bag_of = reinterpret_cast<int*>(take(sizeof(int) * n));
  w.scale = take(sizeof(double) * n);
  w.seg_index = reinterpret_cast<int*>(take(sizeof(int) * n));
  w.seg_start = reinterpret_cast<int*>(take(sizeof(int) * (n + 1)));
  w.hist = reinterpret_cast<int*>(take(sizeof(int) * tiles * kRadix));
  w.scratch = reinterpret_cast<int*>(take(sizeof(int) * scan_scratch_elems(scan_len)));
  w.bytes = off;
  return w;
}

// Sorts positions by row and finds the unique rows' segments; w.keys / w.vals then hold the sorted pairs.
void sort_positions(const Problem& p, const SortWorkspace& w, cudaStream_t stream) {
  const long long n = p.num_indices;
  if (n == 0) return;
  const long long sentinel = p.rows_total;
  launch(fill_keys_kernel, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, stream, w.keys, w.vals, n, sentinel);
  const long long num_bags = static_cast<long long>(p.num_tables) * p.batch_size;
  dispatch_index(p.index_type, [&](auto index_tag) {
    using index_t = std::remove_pointer_t<decltype(index_tag)>;
    auto run = [&](auto scale_tag) {
      using scale_t = std::remove_pointer_t<decltype(scale_tag)>;
      launch(bag_keys_kernel<index_t, scale_t>, dim3(blocks_for(num_bags * 32, kThreads)), dim3(kThreads), 0, stream,
             tables_of(p), static_cast<const index_t*>(p.indices), static_cast<const index_t*>(p.offsets),
             static_cast<const scale_t*>(p.per_sample_weights), p.rows_total, n, p.num_tables, p.batch_size,
             p.pooling, w.keys, w.bag_of, static_cast<scale_t*>(w.scale));
    };
    if (p.acc_type == ScalarType::kDouble) {
      run(static_cast<double*>(nullptr));
    } else {
      run(static_cast<float*>(nullptr));
    }
  });
  radix_sort(w.keys, w.vals, w.keys_alt, w.vals_alt, n, bit_width(sentinel), w.hist, w.scratch, stream);
  launch(segment_heads_kernel, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, stream,
         static_cast<const long long*>(w.keys), n, sentinel, w.seg_index);
  exclusive_scan(w.seg_index, n, w.scratch, stream);
  launch(segment_starts_kernel, dim3(blocks_for(n, kThreads)), dim3(kThreads), 0, stream,
         static_cast<const long long*>(w.keys), n, sentinel, static_cast<const int*>(w.seg_index), w.seg_start,
         w.status);
}

void check_problem(const Problem& p) {
  if (p.num_tables < 1) throw std::invalid_argument("lattice pooling: at least one table is required");
  if (p.num_indices >= (1ll << 31) - 1)
    throw std::invalid_argument("lattice pooling (CUDA): more than 2^31 - 2 indices in one call");
  if (static_cast<long long>(p.num_tables) * p.batch_size >= (1ll << 31) - 1)
    throw std::invalid_argument("lattice pooling (CUDA): more than 2^31 - 2 bags in one call");
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
size_t forward_workspace_bytes() { return align_up(sizeof(Status)); }

Status forward(const Problem& p, void* out, void* workspace, cudaStream_t stream) {
  check_problem(p);
  auto* status = static_cast<Status*>(workspace);
  launch_check(p, status, stream);
  const long long num_bags = static_cast<long long>(p.num_tables) * p.batch_size;
  if (p.dim > 0 && num_bags > 0) {
    dispatch_scalar(p.weights_type, [&](auto scalar_tag) {
      using scalar_t = std::remove_pointer_t<decltype(scalar_tag)>;
      require_acc<typename AccOf<scalar_t>::type>(p);
      const int vec = pick_vec(p.dim, p.ld, {{p.weights, static_cast<int>(sizeof(scalar_t))}, {out, static_cast<int>(sizeof(scalar_t))}});
      const int g = group_size_for(p.dim, vec);
      dispatch_index(p.index_type, [&](auto index_tag) {
        using index_t = std::remove_pointer_t<decltype(index_tag)>;
        dispatch_vec(vec, [&](auto vec_c) {
          constexpr int VEC = decltype(vec_c)::value;
          if constexpr (VEC * sizeof(scalar_t) <= 16) {
            launch(pool_forward_kernel<scalar_t, index_t, VEC>, dim3(persistent_blocks(num_bags, kThreads / g)),
                   dim3(kThreads), 0, stream, static_cast<const scalar_t*>(p.weights), p.ld, p.rows_total,
                   tables_of(p), static_cast<const index_t*>(p.indices), static_cast<const index_t*>(p.offsets),
                   static_cast<const typename AccOf<scalar_t>::type*>(p.per_sample_weights), p.num_indices,
                   p.num_tables, p.batch_size, p.dim, g, p.pooling, static_cast<scalar_t*>(out));
          }
        });
      });
    });
  }
  return read_status(status, stream);
}

Status forward_int8(const Problem& p, float* out, void* workspace, cudaStream_t stream) {
  check_problem(p);
  if (p.weights_type != ScalarType::kFloat || p.acc_type != ScalarType::kFloat)
    throw std::invalid_argument("lattice pooling int8: weights_type and acc_type must be kFloat");
  if (p.dim < 1 || p.ld != int8_rows::row_bytes(p.dim))
    throw std::invalid_argument("lattice pooling int8: ld must be int8_rows::row_bytes(dim)");
  if (reinterpret_cast<uintptr_t>(p.weights) % int8_rows::kAlign != 0)
    throw std::invalid_argument("lattice pooling int8: weights must be 8-byte aligned");
  auto* status = static_cast<Status*>(workspace);
  launch_check(p, status, stream);
  const long long num_bags = static_cast<long long>(p.num_tables) * p.batch_size;
  if (num_bags > 0) {
    const int g = group_size_for(p.dim, kInt8Vec);
    dispatch_index(p.index_type, [&](auto index_tag) {
      using index_t = std::remove_pointer_t<decltype(index_tag)>;
      launch(pool_forward_int8_kernel<index_t>, dim3(blocks_for(num_bags, kThreads / g)), dim3(kThreads), 0, stream,
             static_cast<const unsigned char*>(p.weights), p.ld, p.rows_total, tables_of(p),
             static_cast<const index_t*>(p.indices), static_cast<const index_t*>(p.offsets),
             static_cast<const float*>(p.per_sample_weights), p.num_indices, p.num_tables, p.batch_size, p.dim, g,
             p.pooling, out);
    });
  }
  return read_status(status, stream);
}

size_t backward_workspace_bytes(long long num_indices) { return carve(nullptr, num_indices).bytes; }

Status backward_sort(const Problem& p, void* workspace, cudaStream_t stream) {
  check_problem(p);
  const SortWorkspace w = carve(workspace, p.num_indices);
  launch_check(p, w.status, stream);
  sort_positions(p, w, stream);
  return read_status(w.status, stream);
}

void backward_sparse_write(const Problem& p, const void* grad_output, ScalarType grad_type, long long num_unique,
                           void* workspace, long long* rows, void* row_grads, cudaStream_t stream) {
  if (num_unique <= 0) return;
  const SortWorkspace w = carve(workspace, p.num_indices);
  dispatch_scalar(grad_type, [&](auto grad_tag) {
    using grad_t = std::remove_pointer_t<decltype(grad_tag)>;
    require_acc<typename AccOf<grad_t>::type>(p);
    const int vec = pick_vec(p.dim, p.dim, {{grad_output, static_cast<int>(sizeof(grad_t))}, {row_grads, static_cast<int>(sizeof(grad_t))}});
    const int g = group_size_for(p.dim, vec);
    dispatch_vec(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      if constexpr (VEC * sizeof(grad_t) <= 16) {
        launch(sparse_rows_kernel<grad_t, VEC>, dim3(blocks_for(num_unique, kThreads / g)), dim3(kThreads), 0,
               stream, static_cast<const long long*>(w.keys), static_cast<const int*>(w.vals),
               static_cast<const int*>(w.seg_start), static_cast<const int*>(w.bag_of),
               static_cast<const typename AccOf<grad_t>::type*>(w.scale), static_cast<const grad_t*>(grad_output),
               p.num_tables, p.batch_size, p.dim, num_unique, g, rows, static_cast<grad_t*>(row_grads));
      }
    });
  });
}

Status backward_fused(const Problem& p, float* optimizer_state, const void* grad_output, ScalarType grad_type,
                      const OptimizerArgs& opt, void* workspace, cudaStream_t stream) {
  check_problem(p);
  if (opt.optimizer != kSGD && opt.optimizer != kRowwiseAdagrad)
    throw std::invalid_argument("lattice pooling: optimizer must be 0 (SGD) or 1 (row-wise Adagrad)");
  const SortWorkspace w = carve(workspace, p.num_indices);
  launch_check(p, w.status, stream);
  sort_positions(p, w, stream);
  if (p.num_indices > 0 && p.dim > 0) {
    dispatch_scalar(p.weights_type, [&](auto scalar_tag) {
      using scalar_t = std::remove_pointer_t<decltype(scalar_tag)>;
      require_acc<typename AccOf<scalar_t>::type>(p);
      dispatch_grad<scalar_t>(p.weights_type, grad_type, [&](auto grad_tag) {
        using grad_t = std::remove_pointer_t<decltype(grad_tag)>;
        const int vec = pick_vec(p.dim, p.ld, {{p.weights, static_cast<int>(sizeof(scalar_t))}, {grad_output, static_cast<int>(sizeof(grad_t))}});
        const int g = group_size_for(p.dim, vec);
        dispatch_vec(vec, [&](auto vec_c) {
          constexpr int VEC = decltype(vec_c)::value;
          if constexpr (VEC * sizeof(scalar_t) <= 16) {
            launch(fused_update_kernel<scalar_t, grad_t, VEC>, dim3(blocks_for(p.num_indices, kThreads / g)),
                   dim3(kThreads), 0, stream, static_cast<scalar_t*>(const_cast<void*>(p.weights)), p.ld,
                   optimizer_state, static_cast<const long long*>(w.keys), static_cast<const int*>(w.vals),
                   static_cast<const int*>(w.seg_start), static_cast<const int*>(w.bag_of),
                   static_cast<const typename AccOf<scalar_t>::type*>(w.scale),
                   static_cast<const grad_t*>(grad_output), p.num_tables, p.batch_size, p.dim, g, opt.optimizer,
                   opt.learning_rate, opt.eps, opt.weight_decay, static_cast<const Status*>(w.status));
          }
        });
      });
    });
  }
  return read_status(w.status, stream);
}

Status backward_per_sample_weights(const Problem& p, const void* grad_output, ScalarType grad_type, void* grad_psw,
                                   void* workspace, cudaStream_t stream) {
  check_problem(p);
  auto* status = static_cast<Status*>(workspace);
  launch_check(p, status, stream);
  const long long num_bags = static_cast<long long>(p.num_tables) * p.batch_size;
  if (p.num_indices > 0) {
    const size_t acc_bytes = p.weights_type == ScalarType::kDouble ? 8 : 4;
    check(cudaMemsetAsync(grad_psw, 0, static_cast<size_t>(p.num_indices) * acc_bytes, stream),
          "grad_per_sample_weights memset");
  }
  if (p.num_indices > 0 && num_bags > 0) {
    dispatch_scalar(p.weights_type, [&](auto scalar_tag) {
      using scalar_t = std::remove_pointer_t<decltype(scalar_tag)>;
      dispatch_grad<scalar_t>(p.weights_type, grad_type, [&](auto grad_tag) {
        using grad_t = std::remove_pointer_t<decltype(grad_tag)>;
        const int vec = pick_vec(p.dim, p.ld, {{p.weights, static_cast<int>(sizeof(scalar_t))}, {grad_output, static_cast<int>(sizeof(grad_t))}});
        const int g = group_size_for(p.dim, vec);
        dispatch_index(p.index_type, [&](auto index_tag) {
          using index_t = std::remove_pointer_t<decltype(index_tag)>;
          dispatch_vec(vec, [&](auto vec_c) {
            constexpr int VEC = decltype(vec_c)::value;
            if constexpr (VEC * sizeof(scalar_t) <= 16) {
              launch(psw_grad_kernel<scalar_t, grad_t, index_t, VEC>, dim3(blocks_for(num_bags, kThreads / g)),
                     dim3(kThreads), 0, stream, static_cast<const grad_t*>(grad_output),
                     static_cast<const scalar_t*>(p.weights), p.ld, p.rows_total, tables_of(p),
                     static_cast<const index_t*>(p.indices), static_cast<const index_t*>(p.offsets), p.num_indices,
                     p.num_tables, p.batch_size, p.dim, g, static_cast<const Status*>(status),
                     static_cast<typename AccOf<scalar_t>::type*>(grad_psw));
            }
          });
        });
      });
    });
  }
  return read_status(status, stream);
}

size_t rows_step_workspace_bytes(long long num_rows) { return carve(nullptr, num_rows).bytes; }

Status sparse_rows_step(void* weights, ScalarType weights_type, long long rows_total, int dim, long long ld,
                        float* optimizer_state, const long long* rows, long long num_rows, const void* row_grads,
                        ScalarType grad_type, const OptimizerArgs& opt, void* workspace, cudaStream_t stream) {
  if (opt.optimizer != kSGD && opt.optimizer != kRowwiseAdagrad)
    throw std::invalid_argument("lattice pooling: optimizer must be 0 (SGD) or 1 (row-wise Adagrad)");
  if (num_rows >= (1ll << 31) - 1) throw std::invalid_argument("lattice pooling (CUDA): too many rows in one step");
  const SortWorkspace w = carve(workspace, num_rows);
  launch(status_init_kernel, dim3(1), dim3(32), 0, stream, w.status);
  if (num_rows > 0) {
    launch(rows_keys_kernel, dim3(blocks_for(num_rows, kThreads)), dim3(kThreads), 0, stream, rows, num_rows,
           rows_total, w.keys, w.vals, w.status);
    radix_sort(w.keys, w.vals, w.keys_alt, w.vals_alt, num_rows, bit_width(rows_total), w.hist, w.scratch, stream);
    launch(rows_duplicates_kernel, dim3(blocks_for(num_rows, kThreads)), dim3(kThreads), 0, stream,
           static_cast<const long long*>(w.keys), static_cast<const int*>(w.vals), num_rows, rows_total, w.status);
    launch(rows_finalize_kernel, dim3(1), dim3(32), 0, stream, rows, w.status);
    if (dim > 0) {
      dispatch_scalar(weights_type, [&](auto scalar_tag) {
        using scalar_t = std::remove_pointer_t<decltype(scalar_tag)>;
        dispatch_grad<scalar_t>(weights_type, grad_type, [&](auto grad_tag) {
          using grad_t = std::remove_pointer_t<decltype(grad_tag)>;
          const int vec = pick_vec(dim, ld, {{weights, static_cast<int>(sizeof(scalar_t))}, {row_grads, static_cast<int>(sizeof(grad_t))}});
          const int g = group_size_for(dim, vec);
          dispatch_vec(vec, [&](auto vec_c) {
            constexpr int VEC = decltype(vec_c)::value;
            if constexpr (VEC * sizeof(scalar_t) <= 16) {
              launch(rows_update_kernel<scalar_t, grad_t, VEC>, dim3(blocks_for(num_rows, kThreads / g)),
                     dim3(kThreads), 0, stream, static_cast<scalar_t*>(weights), ld, optimizer_state, rows,
                     static_cast<const grad_t*>(row_grads), num_rows, dim, g, opt.optimizer, opt.learning_rate,
                     opt.eps, opt.weight_decay, static_cast<const Status*>(w.status));
            }
          });
        });
      });
    }
  }
  return read_status(w.status, stream);
}

std::string describe(const Status& s, long long batch_size, long long rows_total, long long num_indices) {
  // The texts match the CPU op's (csrc/cpu), so an error reads the same on either device.
  const std::string pos = std::to_string(s.position), val = std::to_string(s.value), v2 = std::to_string(s.value2);
  (void)batch_size;
  switch (s.code) {
    case kOk: return "";
    case kTableRange:
      return "table_row_offsets: table " + std::to_string(s.table) + " spans rows [" + val + ", " + v2 +
             "), which is not a valid range of weights' " + std::to_string(rows_total) + " rows";
    case kOffsetsStart: return "offsets[0] must be 0, got " + val;
    case kOffsetsDecreasing:
      return "offsets must be non-decreasing: bag " + std::to_string(s.position - 1) + " has offsets[" +
             std::to_string(s.position - 1) + "] = " + v2 + " > offsets[" + pos + "] = " + val;
    case kOffsetsOverrun:
      return "offsets[-1] = " + val + " overruns indices (" + std::to_string(num_indices) + " entries)";
    case kIndexNegative:
      return "indices[" + pos + "] = " + val + " is negative (table " + std::to_string(s.table) + ", sample " +
             std::to_string(s.sample) + ")";
    case kIndexOutOfRange:
      return "indices[" + pos + "] = " + val + " is out of range for table " + std::to_string(s.table) + " with " +
             v2 + " rows (sample " + std::to_string(s.sample) + ")";
    case kRowOutOfRange:
      return "rows[" + pos + "] = " + val + " is out of range for weights with " + std::to_string(rows_total) +
             " rows";
    case kRowDuplicate: return "rows must be unique: rows[" + pos + "] = " + val + " appears twice";
    default: return "invalid input (status code " + std::to_string(s.code) + ")";
  }
}

}  // namespace pool
}  // namespace cuda
}  // namespace lattice
