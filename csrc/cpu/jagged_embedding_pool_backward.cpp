// CPU backward of lattice::jagged_embedding_pool for the weights, two ways, both exact with
// duplicate indices and multithreaded without atomics:
//
//   jagged_embedding_pool_backward_sparse   -> (unique sorted global rows, their summed gradients)
//   jagged_embedding_pool_backward_fused_   -> SGD / row-wise Adagrad applied in place, no gradient
//                                              tensor at all (FBGEMM's fused TBE backward)
//
// plus sparse_rows_optimizer_step_, the same update from already-reduced rows.
//
// Both backward ops share one plan: (1) one parallel pass over the bags packs, for every index
// position, (global row << 32 | payload) where the payload is the grad_output row it reads (or its
// position when per-sample weights scale it), range-checks the index and histograms the first radix
// digit; (2) a parallel, stable LSD radix sort of the items by row, as few passes as the largest row
// needs; (3) the sorted items are cut into chunks that start on a row boundary, and threads take chunks
// dynamically, summing each row's gradient in fp32 registers and either writing it out or updating
// the row (and its state) in place. A row belongs to one chunk, so no atomics; the stable sort fixes
// the summation order, so results do not depend on the thread count. Sorted order also turns the
// weight read-modify-writes into an ascending, prefetch-friendly sweep. All scratch lives in a cached
// workspace reused across steps.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "lattice/cpu/huge_pages.h"
#include "lattice/cpu/pool_common.h"
#include "lattice/cpu/radix_sort.h"
#include "lattice/cpu/row_simd.h"
#include "lattice/cpu/row_update.h"
#include "lattice/cpu/workspace.h"
#include "lattice/cpu/register.h"

#ifdef LATTICE_POOL_PROFILE  // phase times (thread CPU time) to stderr, for tuning
#include <time.h>
#include <cstdio>
#define PROF_NOW(v) timespec v##_ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &v##_ts); const double v = v##_ts.tv_sec * 1e3 + v##_ts.tv_nsec * 1e-6
#define PROF_PRINT(...) std::fprintf(stderr, __VA_ARGS__)
#else
#define PROF_NOW(v)
#define PROF_PRINT(...)
#endif

namespace lattice {
namespace cpu {
namespace {

std::mutex g_workspace_mutex;
Workspace g_workspace;

enum Slot : size_t { kItems, kItemsTmp, kHist, kRowOfPos, kInvLen, kRanges, kChunks, kCounts };

constexpr int64_t kChunksPerThread = 32;
constexpr int64_t kPrefetchGrad = 6;     // items ahead whose grad_output row is prefetched
constexpr int64_t kPrefetchWeight = 10;  // items ahead whose weight row (and state) is prefetched for write

inline uint32_t key_of(uint64_t item) { return static_cast<uint32_t>(item >> 32); }
inline uint32_t payload_of(uint64_t item) { return static_cast<uint32_t>(item); }

// Index positions sorted by global row, in chunks that start on a row boundary.
struct SortedRows {
  const uint64_t* items = nullptr;        // [n] (row << 32) | payload, sorted by row, stable
  const uint32_t* grow_of_pos = nullptr;  // [N] grad_output row (b*T + t) of each position (weighted)
  const double* inv_len = nullptr;        // [B*T] by grad_output row: 1/len (mean pooling)
  const int64_t* chunk_start = nullptr;   // [chunks + 1]
  int64_t n = 0;
  int64_t chunks = 0;
  bool weighted = false;
  bool mean = false;
};

// Items of one bag range: (global row << 32) | payload for every position, range-checked. Calls
// on_item(position, item) for each; returns false if an index was out of its table's range (it is
// kept as the table's first row; the caller reports the error).
template <typename index_t, typename F>
bool fill_items(const PoolGeometry& g, const index_t* indices, const index_t* offsets, int64_t bag_lo, int64_t bag_hi,
                bool weighted, bool mean, uint32_t* grow_of_pos, double* inv_len, F&& on_item) {
  bool ok = true;
  int64_t t = bag_lo / std::max<int64_t>(g.B, 1);
  int64_t b = bag_lo - t * g.B;
  int64_t begin = bag_lo < bag_hi ? static_cast<int64_t>(offsets[bag_lo]) : 0;
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t end = offsets[bag + 1];
    const uint32_t grow = static_cast<uint32_t>(b * g.T + t);
    if (mean) inv_len[grow] = end > begin ? 1.0 / static_cast<double>(end - begin) : 1.0;
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
      uint32_t payload = grow;
      if (weighted) {
        payload = static_cast<uint32_t>(j);
        grow_of_pos[j] = grow;
      }
      on_item(j, (static_cast<uint64_t>(key) << 32) | payload);
    }
    begin = end;
    if (++b == g.B) {
      b = 0;
      ++t;
    }
  }
  return ok;
}

// Fills and sorts the positions of table t on their own (its keys lie in [row_start, row_start +
// row_count)): an LSD radix sort by local row with digits of up to 11 bits whose histograms are all
// taken while filling; a table's run usually fits in L2, so the scatters stay in cache. The result
// ends in a. `hist` has room for 3 * 2048 counts.
template <typename index_t>
bool fill_and_sort_table(const PoolGeometry& g, int64_t t, const index_t* indices, const index_t* offsets,
                         bool weighted, bool mean, uint32_t* grow_of_pos, double* inv_len, uint64_t* a, uint64_t* b,
                         int64_t* hist) {
  const int64_t p0 = t == 0 ? 0 : g.pos_end[t - 1];
  const int64_t m = g.pos_end[t] - p0;
  const uint64_t count = static_cast<uint64_t>(g.row_count[t]);
  const uint32_t base = static_cast<uint32_t>(g.row_start[t]);
  int key_bits = 0;
  while (key_bits < 32 && count > 0 && ((count - 1) >> key_bits) != 0) ++key_bits;
  const int passes = m <= 32 ? 0 : (key_bits + 10) / 11;
  const int bits = passes > 0 ? (key_bits + passes - 1) / passes : 0;
  const int64_t R = int64_t{1} << bits;
  const uint32_t mask = static_cast<uint32_t>(R - 1);
  // Fill into the buffer from which `passes` scatters end in a.
  uint64_t* src = (passes & 1) ? b : a;
  uint64_t* dst = (passes & 1) ? a : b;
  std::fill(hist, hist + passes * R, int64_t{0});
  const bool ok = fill_items(g, indices, offsets, t * g.B, (t + 1) * g.B, weighted, mean, grow_of_pos, inv_len,
                             [&](int64_t j, uint64_t item) {
                               src[j] = item;
                               const uint32_t local = key_of(item) - base;
                               for (int pass = 0; pass < passes; ++pass) ++hist[pass * R + ((local >> (pass * bits)) & mask)];
                             });
  if (!ok || m <= 1) return ok;
  if (passes == 0) {  // tiny run (or a one-row table): insertion sort, stable
    uint64_t* x = a + p0;
    for (int64_t i = 1; i < m; ++i) {
      const uint64_t v = x[i];
      int64_t j = i;
      while (j > 0 && key_of(x[j - 1]) > key_of(v)) {
        x[j] = x[j - 1];
        --j;
      }
      x[j] = v;
    }
    return ok;
  }
  for (int pass = 0; pass < passes; ++pass) {
    int64_t* h = hist + pass * R;
    int64_t running = p0;
    for (int64_t k = 0; k < R; ++k) {
      const int64_t c = h[k];
      h[k] = running;
      running += c;
    }
    const int shift = pass * bits;
    for (int64_t i = p0; i < p0 + m; ++i) {
      const uint64_t v = src[i];
      dst[h[((key_of(v) - base) >> shift) & mask]++] = v;
    }
    std::swap(src, dst);
  }
  return ok;
}

template <typename index_t>
SortedRows sort_rows(Workspace& ws, const PoolGeometry& g, const index_t* indices, const index_t* offsets,
                     bool weighted, bool mean, int nthreads) {
  TORCH_CHECK(g.rows_total <= (int64_t{1} << 32), "jagged_embedding_pool backward supports up to 2^32 rows, got ",
              g.rows_total);
  SortedRows out;
  const int64_t n = g.used;
  out.n = n;
  out.weighted = weighted;
  out.mean = mean;
  uint64_t max_key = 0;
  int64_t largest_run = 0;
  for (int64_t t = 0; t < g.T; ++t) {
    if (g.row_count[t] > 0) max_key = std::max<uint64_t>(max_key, g.row_start[t] + g.row_count[t] - 1);
    largest_run = std::max<int64_t>(largest_run, g.pos_end[t] - (t == 0 ? 0 : g.pos_end[t - 1]));
  }
  const int P = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n / 16384 + 1)));
  // When tables own ascending, disjoint row ranges (always so for the packed [T+1] layout), positions
  // are already ordered by table, so each table is filled and sorted on its own, in cache. Otherwise
  // (shared row ranges), or when one table holds most positions (no parallelism across tables), one
  // global parallel sort.
  bool by_table = P == 1 || largest_run * P <= n;
  for (int64_t t = 1; t < g.T; ++t) {
    if (g.row_start[t] < g.row_start[t - 1] + g.row_count[t - 1]) by_table = false;
  }
  const RadixPlan plan = by_table ? RadixPlan() : RadixPlan::for_max_key(max_key);
  const int64_t R = plan.buckets();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(n, P * kChunksPerThread));
  out.chunks = chunks;

  uint64_t* a = ws.get<uint64_t>(kItems, n);
  uint64_t* b = ws.get<uint64_t>(kItemsTmp, n);
  int64_t* hist = ws.get<int64_t>(kHist, by_table ? P * 3 * 2048 : radix_hist_entries(plan, P));
  uint32_t* grow_of_pos = weighted ? ws.get<uint32_t>(kRowOfPos, n) : nullptr;
  double* inv_len = mean ? ws.get<double>(kInvLen, g.nbags) : nullptr;
  int64_t* ranges = ws.get<int64_t>(kRanges, 2 * (P + 1));  // bag ranges, then position ranges
  int64_t* chunk_start = ws.get<int64_t>(kChunks, chunks + 1);
  std::atomic<bool> bad{false};
  uint64_t* sorted = a;

#pragma omp parallel num_threads(P)
  {
    const int nt = omp_get_num_threads();
    const int tid = omp_get_thread_num();
    PROF_NOW(t_start);
    uint64_t* s = a;
    if (by_table) {
      int64_t* my_hist = hist + static_cast<int64_t>(tid) * 3 * 2048;
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < g.T; ++t) {
        if (!fill_and_sort_table(g, t, indices, offsets, weighted, mean, grow_of_pos, inv_len, a, b, my_hist)) {
          bad.store(true, std::memory_order_relaxed);
        }
      }
    } else {
      int64_t* bag_range = ranges;
      int64_t* pos_range = ranges + (P + 1);
#pragma omp single
      {
        for (int k = 0; k <= nt; ++k) {
          bag_range[k] = g.chunk_begin(offsets, k, nt);
          pos_range[k] = static_cast<int64_t>(offsets[bag_range[k]]);
        }
      }
      // Items, range check and first-digit histogram in one pass, then the global sort.
      int64_t* my_hist = hist + static_cast<int64_t>(tid) * R;
      const bool hist0 = plan.passes > 0;
      if (hist0) std::fill(my_hist, my_hist + R, int64_t{0});
      const uint32_t mask0 = static_cast<uint32_t>(R - 1);
      const bool ok = fill_items(g, indices, offsets, bag_range[tid], bag_range[tid + 1], weighted, mean, grow_of_pos,
                                 inv_len, [&](int64_t j, uint64_t item) {
                                   a[j] = item;
                                   if (hist0) ++my_hist[key_of(item) & mask0];
                                 });
      if (!ok) bad.store(true, std::memory_order_relaxed);
#pragma omp barrier
      if (!bad.load(std::memory_order_relaxed)) s = radix_sort_in_team(plan, a, b, hist, pos_range, nt, tid, true);
    }
    PROF_NOW(t_sorted);
#pragma omp barrier
    if (!bad.load(std::memory_order_relaxed)) {
      if (tid == 0) sorted = s;
      // Chunk starts on row boundaries.
#pragma omp for schedule(static)
      for (int64_t c = 0; c <= chunks; ++c) {
        int64_t i = n * c / chunks;
        while (i > 0 && i < n && key_of(s[i]) == key_of(s[i - 1])) ++i;
        chunk_start[c] = i;
      }
    }
    PROF_NOW(t_end);
    PROF_PRINT("[%d] fill+sort %.2f ms, chunks %.2f ms (%s)\n", tid, t_sorted - t_start, t_end - t_sorted,
               by_table ? "by table" : "global");
  }
  if (bad.load()) report_bad_index<index_t>(g, indices, offsets);
  out.items = sorted;
  out.grow_of_pos = grow_of_pos;
  out.inv_len = inv_len;
  out.chunk_start = chunk_start;
  return out;
}

// What to do with each reduced row: write it out (sparse) or update the weights in place (fused).
template <typename W, typename G>
struct RowSink {
  bool fused = false;
  int64_t* rows = nullptr;        // sparse: [U]
  G* row_grads = nullptr;         // sparse: [U, D]
  const int64_t* chunk_ord = nullptr;  // sparse: first output row of each chunk
  W* weights = nullptr;           // fused
  float* state = nullptr;         // fused, row-wise Adagrad
  OptimizerParams opt{};
};

#if LATTICE_HAVE_SIMD
// One chunk of sorted items, D <= 128: each row's gradient is summed in NV registers.
template <typename W, typename G, int NV, bool kWeighted>
void reduce_chunk_simd(const SortedRows& s, int64_t e_lo, int64_t e_hi, const G* go, const float* psw, int64_t D,
                         const RowSink<W, G>& sink, int64_t ord) {
  const uint64_t* items = s.items;
  const uint32_t* grow_of_pos = s.grow_of_pos;
  const double* inv_len = s.inv_len;
  const bool mean = s.mean;
  const int64_t n = s.n;
  const tail_t tail = tail_mask(D);
  const int64_t gbytes = D * static_cast<int64_t>(sizeof(G));
  const int64_t wbytes = D * static_cast<int64_t>(sizeof(W));
  constexpr int kGradLines = row_lines<NV, G>();
  constexpr int kWeightLines = row_lines<NV, W>();
  const bool fused = sink.fused;
  W* const weights = sink.weights;
  const bool grad_ragged = gbytes % 64 != 0 || reinterpret_cast<uintptr_t>(go) % 64 != 0;
  const bool weight_ragged = wbytes % 64 != 0 || reinterpret_cast<uintptr_t>(weights) % 64 != 0;
  float* const state = sink.state;
  const OptimizerParams opt = sink.opt;
  int64_t e = e_lo;
  while (e < e_hi) {
    const uint32_t row = key_of(items[e]);
    if (fused && e + kPrefetchWeight < n) {
      const uint32_t ahead = key_of(items[e + kPrefetchWeight]);
      prefetch_row_lines<kWeightLines, true>(weights + static_cast<int64_t>(ahead) * D, wbytes, weight_ragged);
      if (state) __builtin_prefetch(state + ahead, 1, 3);
    }
    Vecs<NV, W> acc;
    acc.zero();
    do {
      if (e + kPrefetchGrad < n) {
        const uint32_t pv = payload_of(items[e + kPrefetchGrad]);
        const int64_t pg = kWeighted ? grow_of_pos[pv] : pv;
        prefetch_row_lines<kGradLines>(go + pg * D, gbytes, grad_ragged);
      }
      const uint32_t v = payload_of(items[e]);
      if constexpr (kWeighted) {
        acc.fmadd(vset1(psw[v]), go + static_cast<int64_t>(grow_of_pos[v]) * D, tail);
      } else {
        if (mean) {
          acc.fmadd(vset1(static_cast<float>(inv_len[v])), go + static_cast<int64_t>(v) * D, tail);
        } else {
          acc.add(go + static_cast<int64_t>(v) * D, tail);
        }
      }
      ++e;
    } while (e < n && key_of(items[e]) == row);
    if (fused) {
      update_row_simd<NV>(weights + static_cast<int64_t>(row) * D, acc, D, tail, opt, state ? state + row : nullptr);
    } else {
      sink.rows[ord] = row;
      acc.store(sink.row_grads + ord * D, tail);
    }
    ++ord;
  }
}
#endif

// Portable version (any D, float64 in float64); `acc` holds D values.
template <typename W, typename G>
void reduce_chunk_generic(const SortedRows& s, int64_t e_lo, int64_t e_hi, const G* go, const acc_t<W>* psw,
                          int64_t D, const RowSink<W, G>& sink, int64_t ord, acc_t<W>* acc) {
  using A = acc_t<W>;
  const uint64_t* items = s.items;
  int64_t e = e_lo;
  while (e < e_hi) {
    const uint32_t row = key_of(items[e]);
    if (sink.fused && e + kPrefetchWeight < s.n) {
      prefetch_bytes<true>(sink.weights + static_cast<int64_t>(key_of(items[e + kPrefetchWeight])) * D,
                           D * static_cast<int64_t>(sizeof(W)));
    }
    for (int64_t c = 0; c < D; ++c) acc[c] = A(0);
    do {
      const uint32_t v = payload_of(items[e]);
      const int64_t grow = s.weighted ? s.grow_of_pos[v] : v;
      const A sc = s.weighted ? psw[v] : (s.mean ? static_cast<A>(s.inv_len[v]) : A(1));
      const G* gr = go + grow * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) acc[c] += sc * to_acc<A>(gr[c]);
      ++e;
    } while (e < s.n && key_of(items[e]) == row);
    if (sink.fused) {
      update_row_generic<W, A>(sink.weights + static_cast<int64_t>(row) * D, acc, D, sink.opt,
                               sink.state ? sink.state + row : nullptr);
    } else {
      sink.rows[ord] = row;
      G* dst = sink.row_grads + ord * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) dst[c] = from_acc<G>(acc[c]);
    }
    ++ord;
  }
}

template <typename W, typename G>
void reduce_rows(const SortedRows& s, int64_t D, const G* go, const acc_t<W>* psw, const RowSink<W, G>& sink,
                 int nthreads) {
  using A = acc_t<W>;
  if (s.n == 0 || D == 0) return;
  const int64_t chunks = s.chunks;
  const int64_t* cs = s.chunk_start;
  auto ord_of = [&](int64_t c) -> int64_t { return sink.chunk_ord ? sink.chunk_ord[c] : 0; };
#if LATTICE_HAVE_SIMD
  if constexpr (std::is_same_v<A, float>) {
    if (use_simd() && D <= kBlock) {
      dispatch_nv(num_vecs(D), [&](auto nv_tag) {
        constexpr int NV = decltype(nv_tag)::value;
        auto run = [&](auto weighted_tag) {
          constexpr bool kW = decltype(weighted_tag)::value;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
          for (int64_t c = 0; c < chunks; ++c) {
            if (cs[c] < cs[c + 1]) reduce_chunk_simd<W, G, NV, kW>(s, cs[c], cs[c + 1], go, psw, D, sink, ord_of(c));
          }
        };
        if (s.weighted) {
          run(std::true_type());
        } else {
          run(std::false_type());
        }
      });
      return;
    }
  }
#endif
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<A> acc(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      if (cs[c] < cs[c + 1]) reduce_chunk_generic<W, G>(s, cs[c], cs[c + 1], go, psw, D, sink, ord_of(c), acc.data());
    }
  }
}

// Rows (segments) per chunk, and the first output row of each chunk; returns U.
int64_t count_rows(const SortedRows& s, int64_t* chunk_ord, int nthreads) {
  const int64_t chunks = s.chunks;
  const int64_t* cs = s.chunk_start;
  const uint64_t* items = s.items;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t cnt = 0;
    for (int64_t i = cs[c]; i < cs[c + 1]; ++i) cnt += (i == cs[c] || key_of(items[i]) != key_of(items[i - 1])) ? 1 : 0;
    chunk_ord[c] = cnt;
  }
  int64_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t cnt = chunk_ord[c];
    chunk_ord[c] = total;
    total += cnt;
  }
  return total;
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
    const SortedRows s = sort_rows<index_t>(*ws, g, idx.data_ptr<index_t>(), off.data_ptr<index_t>(), psw.defined(),
                                            pooling == 1, nthreads);
    int64_t* chunk_ord = ws->get<int64_t>(kCounts, s.chunks + 1);
    const int64_t U = s.n == 0 ? 0 : count_rows(s, chunk_ord, nthreads);
    rows = at::empty({U}, idx.options().dtype(at::kLong));
    row_grads = empty_output({U, g.D}, go.options());
    if (U == 0) return;
    if (g.D == 0) {
      int64_t* r = rows.data_ptr<int64_t>();
      int64_t u = 0;
      for (int64_t i = 0; i < s.n; ++i) {
        if (i == 0 || key_of(s.items[i]) != key_of(s.items[i - 1])) r[u++] = key_of(s.items[i]);
      }
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "jagged_pool_backward_sparse", [&] {
      using W = scalar_t;  // the gradient's dtype doubles as the "storage" type
      RowSink<W, W> sink;
      sink.rows = rows.data_ptr<int64_t>();
      sink.row_grads = row_grads.data_ptr<W>();
      sink.chunk_ord = chunk_ord;
      reduce_rows<W, W>(s, g.D, go.data_ptr<W>(), psw.defined() ? psw.data_ptr<acc_t<W>>() : nullptr, sink,
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
                                        PROF_NOW(t0);
                                        reduce_rows<W, G>(s, g.D, gp, pw, sink, nthreads);
                                        PROF_NOW(t1);
                                        PROF_PRINT("reduce+update %.2f ms\n", t1 - t0);
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
  const bool simd = use_simd() && std::is_same_v<A, float> && D <= kBlock;
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
#if LATTICE_HAVE_SIMD
      if constexpr (std::is_same_v<A, float>) {
        if (simd) {
          const tail_t tail = tail_mask(D);
          dispatch_nv(num_vecs(D), [&](auto nv_tag) {
            constexpr int NV = decltype(nv_tag)::value;
            Vecs<NV, W> a;
            a.load(g, tail);
            update_row_simd<NV>(wr, a, D, tail, opt, st);
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

LATTICE_REGISTER_CPU_KERNELS(jagged_embedding_pool_backward, m) {
  m.impl("jagged_embedding_pool_backward_sparse", &lattice::cpu::jagged_embedding_pool_backward_sparse_cpu);
  m.impl("jagged_embedding_pool_backward_fused_", &lattice::cpu::jagged_embedding_pool_backward_fused_cpu);
  m.impl("sparse_rows_optimizer_step_", &lattice::cpu::sparse_rows_optimizer_step_cpu);
}
