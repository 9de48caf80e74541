// CPU backward of lattice::jagged_embedding_pool for the weights, two ways, both exact with
// duplicate indices and multithreaded without atomics:
//
//   jagged_embedding_pool_backward_sparse   -> (unique sorted global rows, their summed gradients)
//   jagged_embedding_pool_backward_fused_   -> SGD / row-wise Adagrad applied in place, no gradient
//                                              tensor at all (FBGEMM's fused TBE backward)
//
// plus sparse_rows_optimizer_step_, the same update from already-reduced rows.
//
// Both backward ops share one plan: (1) one parallel pass over the bags writes, for every index
// position, the key global_row and a payload (the grad_output row it reads, or its position when
// per-sample weights scale it), range-checks the index and histograms the first radix digit;
// (2) a parallel LSD radix sort of the pairs by row, as few passes as the largest row needs;
// (3) segment starts of equal rows; (4) a parallel pass over segments that sums each row's gradient in
// fp32 registers and either writes it out or updates the row (and its state) in place. Rows of a
// segment belong to one thread only, so no atomics; the stable sort fixes the summation order, so
// results are deterministic. All scratch lives in a cached workspace reused across steps.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "lattice/cpu/pool_common.h"
#include "lattice/cpu/radix_sort.h"
#include "lattice/cpu/row_simd.h"
#include "lattice/cpu/row_update.h"
#include "lattice/cpu/workspace.h"

namespace lattice {
namespace cpu {
namespace {

std::mutex g_workspace_mutex;
Workspace g_workspace;

enum Slot : size_t { kKeys, kVals, kKeysTmp, kValsTmp, kHist, kSegs, kRowOfPos, kInvLen, kRanges, kCounts };

// Index positions sorted by global row, cut into segments of equal rows.
struct SortedRows {
  const uint32_t* keys = nullptr;  // [n] global row of each sorted position
  const uint32_t* vals = nullptr;  // [n] grad_output row (b*T + t), or the index position if weighted
  const uint32_t* segs = nullptr;  // [U + 1] segment starts into keys/vals
  const uint32_t* grow_of_pos = nullptr;  // [N] grad_output row of each position (weighted only)
  const double* inv_len = nullptr;        // [B*T] by grad_output row: 1/len for mean pooling, else 1
  int64_t n = 0;
  int64_t U = 0;
};

template <typename index_t>
SortedRows sort_rows(Workspace& ws, const PoolGeometry& g, const index_t* indices, const index_t* offsets,
                     bool weighted, bool mean, int nthreads) {
  TORCH_CHECK(g.rows_total <= (int64_t{1} << 32), "jagged_embedding_pool backward supports up to 2^32 rows, got ",
              g.rows_total);
  SortedRows out;
  const int64_t n = g.used;
  out.n = n;
  uint64_t max_key = 0;
  for (int64_t t = 0; t < g.T; ++t) {
    if (g.row_count[t] > 0) max_key = std::max<uint64_t>(max_key, g.row_start[t] + g.row_count[t] - 1);
  }
  const RadixPlan plan = RadixPlan::for_max_key(max_key);
  const int64_t R = plan.buckets();
  const int P = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 8192 + 1)));

  uint32_t* k0 = ws.get<uint32_t>(kKeys, n);
  uint32_t* v0 = ws.get<uint32_t>(kVals, n);
  uint32_t* k1 = ws.get<uint32_t>(kKeysTmp, n);
  uint32_t* v1 = ws.get<uint32_t>(kValsTmp, n);
  int64_t* hist = ws.get<int64_t>(kHist, radix_hist_entries(plan, P));
  uint32_t* grow_of_pos = weighted ? ws.get<uint32_t>(kRowOfPos, n) : nullptr;
  double* inv_len = ws.get<double>(kInvLen, g.nbags);
  int64_t* ranges = ws.get<int64_t>(kRanges, 2 * (P + 1));  // bag ranges, then position ranges
  int64_t* counts = ws.get<int64_t>(kCounts, P + 1);
  uint32_t* segs = nullptr;  // allocated once n is known to be sorted (same size as n + 1)
  segs = ws.get<uint32_t>(kSegs, n + 1);
  std::atomic<bool> bad{false};
  bool in_tmp = false;

#pragma omp parallel num_threads(P)
  {
    const int nt = omp_get_num_threads();
    const int tid = omp_get_thread_num();
    int64_t* bag_range = ranges;
    int64_t* pos_range = ranges + (P + 1);
#pragma omp single
    {
      for (int k = 0; k <= nt; ++k) {
        bag_range[k] = g.chunk_begin(offsets, k, nt);
        pos_range[k] = static_cast<int64_t>(offsets[bag_range[k]]);
      }
    }
    // (1) keys, payloads, range check, first-digit histogram.
    int64_t* my_hist = hist + static_cast<int64_t>(tid) * R;
    const uint32_t mask0 = static_cast<uint32_t>(R - 1);
    const bool hist0 = plan.passes > 0;
    if (hist0) std::fill(my_hist, my_hist + R, int64_t{0});
    bool ok = true;
    {
      const int64_t lo = bag_range[tid];
      const int64_t hi = bag_range[tid + 1];
      int64_t t = lo / std::max<int64_t>(g.B, 1);
      int64_t b = lo - t * g.B;
      for (int64_t bag = lo; bag < hi; ++bag) {
        const int64_t begin = offsets[bag];
        const int64_t end = offsets[bag + 1];
        const uint32_t grow = static_cast<uint32_t>(b * g.T + t);
        inv_len[grow] = mean && end > begin ? 1.0 / static_cast<double>(end - begin) : 1.0;
        const uint64_t nrows = static_cast<uint64_t>(g.row_count[t]);
        const uint32_t base = static_cast<uint32_t>(g.row_start[t]);
        for (int64_t j = begin; j < end; ++j) {
          const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
          uint32_t key = base;
          if (C10_UNLIKELY(idx >= nrows)) {
            ok = false;
          } else {
            key = base + static_cast<uint32_t>(idx);
          }
          k0[j] = key;
          if (weighted) {
            v0[j] = static_cast<uint32_t>(j);
            grow_of_pos[j] = grow;
          } else {
            v0[j] = grow;
          }
          if (hist0) ++my_hist[key & mask0];
        }
        if (++b == g.B) {
          b = 0;
          ++t;
        }
      }
    }
    if (!ok) bad.store(true, std::memory_order_relaxed);
#pragma omp barrier
    if (!bad.load(std::memory_order_relaxed)) {
      // (2) sort by row.
      const bool odd = radix_sort_pairs_in_team(plan, k0, v0, k1, v1, hist, pos_range, nt, tid, true);
      const uint32_t* sk = odd ? k1 : k0;
      // (3) segment starts.
      const int64_t lo = pos_range[tid];
      const int64_t hi = pos_range[tid + 1];
      int64_t cnt = 0;
      for (int64_t i = lo; i < hi; ++i) cnt += (i == 0 || sk[i] != sk[i - 1]) ? 1 : 0;
      counts[tid] = cnt;
#pragma omp barrier
      int64_t base = 0;
      for (int k = 0; k < tid; ++k) base += counts[k];
      for (int64_t i = lo; i < hi; ++i) {
        if (i == 0 || sk[i] != sk[i - 1]) segs[base++] = static_cast<uint32_t>(i);
      }
      if (tid == nt - 1) {
        in_tmp = odd;
        counts[P] = base;  // U
        segs[base] = static_cast<uint32_t>(n);
      }
    }
  }
  if (bad.load()) report_bad_index<index_t>(g, indices, offsets);
  out.keys = in_tmp ? k1 : k0;
  out.vals = in_tmp ? v1 : v0;
  out.segs = segs;
  out.U = n == 0 ? 0 : counts[P];
  out.grow_of_pos = grow_of_pos;
  out.inv_len = inv_len;
  return out;
}

// What to do with each reduced row.
template <typename W, typename G>
struct RowSink {
  // sparse: write rows / row_grads; fused: update weights (+ state) in place.
  bool fused = false;
  int64_t* rows = nullptr;
  G* row_grads = nullptr;
  W* weights = nullptr;
  float* state = nullptr;
  OptimizerParams opt{};
};

template <typename W, typename G>
void reduce_segments(const SortedRows& s, const PoolGeometry& g, const G* go, const acc_t<W>* psw,
                     const RowSink<W, G>& sink, int nthreads) {
  using A = acc_t<W>;
  const int64_t D = g.D;
  const int64_t U = s.U;
  if (U == 0) return;
  const bool weighted = psw != nullptr;
  const int64_t chunks = std::min<int64_t>(U, static_cast<int64_t>(nthreads) * 32);
  const int64_t gbytes = D * static_cast<int64_t>(sizeof(G));
  const int64_t wbytes = D * static_cast<int64_t>(sizeof(W));
  constexpr int64_t kPfElems = 8;  // grad_output rows prefetched ahead
  constexpr int64_t kPfRows = 4;   // weight rows (for write) prefetched ahead
  const bool avx512 = use_avx512() && std::is_same_v<A, float> && D <= kBlock && D > 0;
  auto grow_of = [&](uint32_t v) -> int64_t { return weighted ? s.grow_of_pos[v] : v; };
  auto scale_of = [&](uint32_t v) -> A { return weighted ? psw[v] : static_cast<A>(s.inv_len[v]); };
  auto prefetch_ahead = [&](int64_t seg, int64_t e) {
    if (e + kPfElems < s.n) prefetch_bytes(go + grow_of(s.vals[e + kPfElems]) * D, gbytes);
    if (sink.fused && seg + kPfRows < U) {
      const int64_t row = s.keys[s.segs[seg + kPfRows]];
      prefetch_bytes<true>(sink.weights + row * D, wbytes);
      if (sink.state) __builtin_prefetch(sink.state + row, 1, 3);
    }
  };

#pragma omp parallel num_threads(nthreads)
  {
    std::vector<A> acc(avx512 ? 0 : D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t s_lo = U * c / chunks;
      const int64_t s_hi = U * (c + 1) / chunks;
#if LATTICE_HAVE_AVX512
      if constexpr (std::is_same_v<A, float>) {
        if (avx512) {
          const __mmask16 tail = tail_mask(D);
          dispatch_nv(static_cast<int>((D + 15) / 16), [&](auto nv_tag) {
            constexpr int NV = decltype(nv_tag)::value;
            for (int64_t seg = s_lo; seg < s_hi; ++seg) {
              const int64_t e0 = s.segs[seg];
              const int64_t e1 = s.segs[seg + 1];
              Vecs<NV, W> a;
              a.zero();
              for (int64_t e = e0; e < e1; ++e) {
                prefetch_ahead(seg, e);
                const uint32_t v = s.vals[e];
                const G* gr = go + grow_of(v) * D;
                const A sc = scale_of(v);
                if (sc == A(1)) {
                  a.add(gr, tail);
                } else {
                  a.fmadd(_mm512_set1_ps(sc), gr, tail);
                }
              }
              const int64_t row = s.keys[e0];
              if (sink.fused) {
                update_row_avx512<NV>(sink.weights + row * D, a, D, tail, sink.opt,
                                      sink.state ? sink.state + row : nullptr);
              } else {
                sink.rows[seg] = row;
                a.store(sink.row_grads + seg * D, tail);
              }
            }
          });
          continue;
        }
      }
#endif
      for (int64_t seg = s_lo; seg < s_hi; ++seg) {
        const int64_t e0 = s.segs[seg];
        const int64_t e1 = s.segs[seg + 1];
        A* a = acc.data();
        for (int64_t c2 = 0; c2 < D; ++c2) a[c2] = A(0);
        for (int64_t e = e0; e < e1; ++e) {
          prefetch_ahead(seg, e);
          const uint32_t v = s.vals[e];
          const G* gr = go + grow_of(v) * D;
          const A sc = scale_of(v);
#pragma omp simd
          for (int64_t c2 = 0; c2 < D; ++c2) a[c2] += sc * to_acc<A>(gr[c2]);
        }
        const int64_t row = s.keys[e0];
        if (sink.fused) {
          update_row_generic<W, A>(sink.weights + row * D, a, D, sink.opt, sink.state ? sink.state + row : nullptr);
        } else {
          sink.rows[seg] = row;
          G* dst = sink.row_grads + seg * D;
#pragma omp simd
          for (int64_t c2 = 0; c2 < D; ++c2) dst[c2] = from_acc<G>(a[c2]);
        }
      }
    }
  }
}

void check_grad_output(const at::Tensor& grad_output, const PoolGeometry& g) {
  check_cpu(grad_output, "grad_output");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == g.B && grad_output.size(1) == g.T &&
                  grad_output.size(2) == g.D,
              "grad_output must have shape [B, T, D] = [", g.B, ", ", g.T, ", ", g.D, "], got ", grad_output.sizes());
  check_weights_dtype(grad_output, "grad_output");
}

std::tuple<at::Tensor, at::Tensor> jagged_embedding_pool_backward_sparse_cpu(
    const at::Tensor& grad_output, const at::Tensor& table_row_offsets, const at::Tensor& indices,
    const at::Tensor& offsets, int64_t pooling, const c10::optional<at::Tensor>& per_sample_weights) {
  check_pooling(pooling);
  TORCH_CHECK(grad_output.dim() == 3, "grad_output must be [B, T, D], got shape ", grad_output.sizes());
  // rows_total is not an argument here: any row a table names is valid, so bound it by the tables.
  int64_t rows_bound = 0;
  {
    TORCH_CHECK(table_row_offsets.scalar_type() == at::kLong, "table_row_offsets must be int64, got ",
                table_row_offsets.scalar_type());
    const at::Tensor tro = table_row_offsets.contiguous();
    const int64_t* tp = tro.data_ptr<int64_t>();
    for (int64_t i = 0; i < tro.numel(); ++i) rows_bound = std::max(rows_bound, tp[i]);
  }
  const PoolGeometry g = check_pool_geometry(table_row_offsets, indices, offsets, rows_bound, grad_output.size(2));
  check_grad_output(grad_output, g);
  check_per_sample_weights(per_sample_weights, g.N, pooling);
  const auto st = grad_output.scalar_type();
  const auto acc_dtype = st == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor off = offsets.contiguous();
  const at::Tensor psw =
      per_sample_weights.has_value() ? per_sample_weights->to(acc_dtype).contiguous() : at::Tensor();
  const int nthreads = pool_num_threads();
  WorkspaceLease ws(g_workspace_mutex, g_workspace);
  at::Tensor rows, row_grads;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "jagged_pool_backward_sparse_index", [&] {
    const SortedRows s =
        sort_rows<index_t>(*ws, g, idx.data_ptr<index_t>(), off.data_ptr<index_t>(), psw.defined(), pooling == 1,
                           nthreads);
    rows = at::empty({s.U}, idx.options().dtype(at::kLong));
    row_grads = at::empty({s.U, g.D}, go.options());
    if (s.U == 0 || g.D == 0) {
      if (g.D == 0) {
        // rows still need filling when D == 0.
        int64_t* r = rows.data_ptr<int64_t>();
        for (int64_t u = 0; u < s.U; ++u) r[u] = s.keys[s.segs[u]];
      }
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "jagged_pool_backward_sparse", [&] {
      using W = scalar_t;  // grad dtype doubles as the "storage" type
      RowSink<W, W> sink;
      sink.rows = rows.data_ptr<int64_t>();
      sink.row_grads = row_grads.data_ptr<W>();
      reduce_segments<W, W>(s, g, go.data_ptr<W>(), psw.defined() ? psw.data_ptr<acc_t<W>>() : nullptr, sink,
                            nthreads);
    });
  });
  return {rows, row_grads};
}

OptimizerParams check_optimizer(int64_t optimizer, double lr, double eps, double weight_decay,
                                const at::Tensor& weights, const at::Tensor& state) {
  TORCH_CHECK(optimizer == 0 || optimizer == 1, "optimizer must be 0 (SGD) or 1 (row-wise Adagrad), got ",
              optimizer);
  TORCH_CHECK(std::isfinite(lr), "learning_rate must be finite, got ", lr);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay must be finite and >= 0, got ",
              weight_decay);
  check_cpu(weights, "weights");
  check_dim(weights, 2, "weights");
  check_weights_dtype(weights, "weights");
  TORCH_CHECK(weights.is_contiguous(), "weights must be contiguous to be updated in place");
  if (optimizer == 1) {
    TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0 for row-wise Adagrad, got ", eps);
    check_cpu(state, "optimizer_state");
    TORCH_CHECK(state.scalar_type() == at::kFloat, "optimizer_state must be float32, got ", state.scalar_type());
    TORCH_CHECK(state.dim() == 1 && state.numel() == weights.size(0),
                "optimizer_state must be [rows_total] = [", weights.size(0), "] for row-wise Adagrad, got shape ",
                state.sizes());
    TORCH_CHECK(state.is_contiguous(), "optimizer_state must be contiguous to be updated in place");
  }
  return OptimizerParams{static_cast<Optimizer>(optimizer), static_cast<float>(lr), static_cast<float>(eps),
                         static_cast<float>(weight_decay)};
}

void jagged_embedding_pool_backward_fused_cpu(const at::Tensor& weights, const at::Tensor& optimizer_state,
                                              const at::Tensor& grad_output, const at::Tensor& table_row_offsets,
                                              const at::Tensor& indices, const at::Tensor& offsets, int64_t pooling,
                                              const c10::optional<at::Tensor>& per_sample_weights, int64_t optimizer,
                                              double learning_rate, double eps, double weight_decay) {
  const OptimizerParams opt = check_optimizer(optimizer, learning_rate, eps, weight_decay, weights, optimizer_state);
  check_pooling(pooling);
  const PoolGeometry g = check_pool_geometry(table_row_offsets, indices, offsets, weights.size(0), weights.size(1));
  check_grad_output(grad_output, g);
  check_per_sample_weights(per_sample_weights, g.N, pooling);
  if (g.used == 0 || g.D == 0) return;
  const auto acc_dtype = weights.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor go = grad_output.contiguous();
  if (go.scalar_type() != weights.scalar_type() && go.scalar_type() != acc_dtype) go = go.to(acc_dtype);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor off = offsets.contiguous();
  const at::Tensor psw =
      per_sample_weights.has_value() ? per_sample_weights->to(acc_dtype).contiguous() : at::Tensor();
  const int nthreads = pool_num_threads();
  WorkspaceLease ws(g_workspace_mutex, g_workspace);
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "jagged_pool_backward_fused_index", [&] {
    const SortedRows s =
        sort_rows<index_t>(*ws, g, idx.data_ptr<index_t>(), off.data_ptr<index_t>(), psw.defined(), pooling == 1,
                           nthreads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weights.scalar_type(), "jagged_pool_backward_fused",
                                    [&] {
                                      using W = scalar_t;
                                      using A = acc_t<W>;
                                      const A* pw = psw.defined() ? psw.data_ptr<A>() : nullptr;
                                      auto run = [&](auto* gp) {
                                        using G = std::remove_cv_t<std::remove_pointer_t<decltype(gp)>>;
                                        RowSink<W, G> sink;
                                        sink.fused = true;
                                        sink.weights = weights.data_ptr<W>();
                                        sink.state = opt.kind == Optimizer::kRowwiseAdagrad
                                                         ? optimizer_state.data_ptr<float>()
                                                         : nullptr;
                                        sink.opt = opt;
                                        reduce_segments<W, G>(s, g, gp, pw, sink, nthreads);
                                      };
                                      if (go.scalar_type() == weights.scalar_type()) {
                                        run(go.data_ptr<W>());
                                      } else {
                                        run(go.data_ptr<A>());
                                      }
                                    });
  });
}

template <typename W, typename G>
void rows_step(const at::Tensor& weights, const at::Tensor& optimizer_state, const int64_t* rp, int64_t U,
               const at::Tensor& row_grads, const OptimizerParams& opt) {
  using A = acc_t<W>;
  const int64_t D = weights.size(1);
  W* w = weights.data_ptr<W>();
  float* state = opt.kind == Optimizer::kRowwiseAdagrad ? optimizer_state.data_ptr<float>() : nullptr;
  const G* gp = row_grads.data_ptr<G>();
  const bool avx512 = use_avx512() && std::is_same_v<A, float> && D <= kBlock;
  const int nthreads = pool_num_threads();
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<A> acc(D);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < U; ++i) {
      if (i + 4 < U) prefetch_bytes<true>(w + rp[i + 4] * D, D * static_cast<int64_t>(sizeof(W)));
      W* wr = w + rp[i] * D;
      float* st = state ? state + rp[i] : nullptr;
      const G* g = gp + i * D;
#if LATTICE_HAVE_AVX512
      if constexpr (std::is_same_v<A, float>) {
        if (avx512) {
          const __mmask16 tail = tail_mask(D);
          dispatch_nv(static_cast<int>((D + 15) / 16), [&](auto nv_tag) {
            constexpr int NV = decltype(nv_tag)::value;
            Vecs<NV, W> a;
            a.load(g, tail);
            update_row_avx512<NV>(wr, a, D, tail, opt, st);
          });
          continue;
        }
      }
#endif
      for (int64_t c = 0; c < D; ++c) acc[c] = to_acc<A>(g[c]);
      update_row_generic<W, A>(wr, acc.data(), D, opt, st);
    }
  }
}

void sparse_rows_optimizer_step_cpu(const at::Tensor& weights, const at::Tensor& optimizer_state,
                                    const at::Tensor& rows, const at::Tensor& row_grads, int64_t optimizer,
                                    double learning_rate, double eps, double weight_decay) {
  const OptimizerParams opt = check_optimizer(optimizer, learning_rate, eps, weight_decay, weights, optimizer_state);
  check_cpu(rows, "rows");
  check_cpu(row_grads, "row_grads");
  check_dim(rows, 1, "rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt, "rows must be int64 or int32, got ",
              rows.scalar_type());
  const int64_t U = rows.numel();
  const int64_t D = weights.size(1);
  const int64_t rows_total = weights.size(0);
  TORCH_CHECK(row_grads.dim() == 2 && row_grads.size(0) == U && row_grads.size(1) == D,
              "row_grads must have shape [U, D] = [", U, ", ", D, "], got ", row_grads.sizes());
  check_weights_dtype(row_grads, "row_grads");
  if (U == 0 || D == 0) return;
  const at::Tensor r = rows.to(at::kLong).contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  // Rows must be in range and unique (each row is updated by one thread, once).
  bool sorted_unique = true;
  for (int64_t i = 0; i < U; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < rows_total, "rows[", i, "] = ", rp[i], " is out of range for weights with ",
                rows_total, " rows");
    if (i > 0 && rp[i] <= rp[i - 1]) sorted_unique = false;
  }
  if (!sorted_unique) {
    std::vector<uint64_t> seen((rows_total + 63) / 64, 0);
    for (int64_t i = 0; i < U; ++i) {
      const uint64_t bit = uint64_t{1} << (rp[i] & 63);
      TORCH_CHECK(!(seen[rp[i] >> 6] & bit), "rows must be unique: rows[", i, "] = ", rp[i], " appears twice");
      seen[rp[i] >> 6] |= bit;
    }
  }
  const auto acc_dtype = weights.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gr = row_grads.contiguous();
  if (gr.scalar_type() != weights.scalar_type() && gr.scalar_type() != acc_dtype) gr = gr.to(acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weights.scalar_type(), "sparse_rows_optimizer_step", [&] {
    using W = scalar_t;
    using A = acc_t<W>;
    if (gr.scalar_type() == weights.scalar_type()) {
      rows_step<W, W>(weights, optimizer_state, rp, U, gr, opt);
    } else {
      rows_step<W, A>(weights, optimizer_state, rp, U, gr, opt);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace lattice

TORCH_LIBRARY_IMPL(lattice, CPU, m) {
  m.impl("jagged_embedding_pool_backward_sparse", &lattice::cpu::jagged_embedding_pool_backward_sparse_cpu);
  m.impl("jagged_embedding_pool_backward_fused_", &lattice::cpu::jagged_embedding_pool_backward_fused_cpu);
  m.impl("sparse_rows_optimizer_step_", &lattice::cpu::sparse_rows_optimizer_step_cpu);
}
