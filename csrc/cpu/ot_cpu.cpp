// CPU kernels of the entropic OT family (contract: csrc/include/lowrank_ops/ot.h).
//
// Every kernel walks tiles of kTileRows rows x kTileCols columns: the tile's log-plan
// entries s_ij are computed once into a stack buffer (cost from the matrix or from the
// points), then reduced with branch-free loops that vectorize (ot_exp is a polynomial).
// The hot loops are compiled for several ISAs (target_clones on the typed entry points;
// everything below them is inlined).
//
// Roofline (one pass over the entries, float64): matrix cost reads 8 bytes and does one
// exp (~25 flops) per entry; point costs read nothing per entry (x and y stay in cache)
// and do 3 dim + 25 flops.  Measured on the shared 2-core Xeon, one thread, 500 x 500
// float64 (ot_row_lse): 3.5 ns per entry for rows, 4.7 for columns (strided reads):
// bound by the exponential's arithmetic, not by memory (8 bytes per 3.5 ns is 2.3 GB/s).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "lowrank_ops/clamp.h"
#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/ot.h"
#include "lowrank_ops/parallel.h"

namespace lowrank_ops {

void check_ot_source(const OtSource& s, const char* op) {
  LOWRANK_CHECK(s.batch >= 0 && s.rows >= 0 && s.cols >= 0, op, ": sizes must be >= 0; got batch=", s.batch,
                " rows=", s.rows, " cols=", s.cols);
  LOWRANK_CHECK(s.dtype == DType::float32 || s.dtype == DType::float64, op,
                ": dtype must be float32 or float64; got code ", static_cast<int>(s.dtype));
  LOWRANK_CHECK(s.reg > 0 && std::isfinite(s.reg), op, ": reg must be finite and > 0; got ", s.reg);
  const int64_t n = s.batch * s.rows * s.cols;
  if (n == 0) return;
  LOWRANK_CHECK(s.f != nullptr && s.g != nullptr, op, ": potentials f and g must be given");
  if (s.cost == OtCost::matrix) {
    LOWRANK_CHECK(s.c != nullptr, op, ": cost matrix must be given for cost code 0");
  } else {
    LOWRANK_CHECK(s.cost == OtCost::sqeuclidean || s.cost == OtCost::l1, op, ": cost code must be 0, 1 or 2; got ",
                  static_cast<int>(s.cost));
    LOWRANK_CHECK(s.x != nullptr && s.y != nullptr && s.dim >= 1, op,
                  ": point costs need x, y and dim >= 1; got dim=", s.dim);
  }
}

void check_ot_sparsify_params(const OtSparsifyParams& p) {
  check_ot_source(p.src, "ot_sparsify");
  LOWRANK_CHECK(p.nnz >= 0, "ot_sparsify: nnz must be >= 0; got ", p.nnz);
}

void check_ot_row_grad_params(const OtRowGradParams& p) {
  check_ot_source(p.src, "ot_row_grad");
  LOWRANK_CHECK(p.src.cost != OtCost::matrix, "ot_row_grad: needs a point cost (code 1 or 2); got cost code ",
                static_cast<int>(p.src.cost));
}

void check_ot_hessian_params(const OtHessianParams& p) {
  LOWRANK_CHECK(p.batch >= 0 && p.rows >= 0 && p.cols >= 0, "ot_hessian_matvec: sizes must be >= 0; got batch=",
                p.batch, " rows=", p.rows, " cols=", p.cols);
  LOWRANK_CHECK(p.dtype == DType::float32 || p.dtype == DType::float64,
                "ot_hessian_matvec: dtype must be float32 or float64; got code ", static_cast<int>(p.dtype));
  LOWRANK_CHECK(p.nnz >= 0, "ot_hessian_matvec: nnz must be >= 0; got ", p.nnz);
}

namespace {

constexpr int64_t kTileRows = 8;
constexpr int64_t kTileCols = 256;
constexpr int64_t kSerialEntries = 1 << 16;  // below this many entries one thread is faster

int threads_for(int64_t entries, int num_threads) { return entries < kSerialEntries ? 1 : num_threads; }

bool is_active(const OtSource& s, int64_t b) { return s.active == nullptr || s.active[b] != 0; }

// Log-plan entries (and costs) of rows [i0, i0 + nr) x columns [j0, j0 + nj) of problem b.
template <class T>
LOWRANK_INLINE void fill_block(const OtSource& s, int64_t b, int64_t i0, int64_t nr, int64_t j0, int64_t nj,
                               T (*sbuf)[kTileCols], T (*cbuf)[kTileCols]) {
  const T* f = static_cast<const T*>(s.f) + b * s.rows;
  const T* g = static_cast<const T*>(s.g) + b * s.cols + j0;
  const T inv_reg = T(1) / static_cast<T>(s.reg);
  for (int64_t r = 0; r < nr; ++r) {
    T* cr = cbuf[r];
    if (s.cost == OtCost::matrix) {
      const T* c = static_cast<const T*>(s.c) + b * s.c_stride_b + (i0 + r) * s.c_stride_i + j0 * s.c_stride_j;
      if (s.c_stride_j == 1) {
        for (int64_t jj = 0; jj < nj; ++jj) cr[jj] = c[jj];
      } else {
        for (int64_t jj = 0; jj < nj; ++jj) cr[jj] = c[jj * s.c_stride_j];
      }
    } else {
      const T* x = static_cast<const T*>(s.x) + (b * s.rows + i0 + r) * s.dim;
      const T* y = static_cast<const T*>(s.y) + (b * s.cols + j0) * s.dim;
      for (int64_t jj = 0; jj < nj; ++jj) cr[jj] = ot_point_cost(s.cost, x, y + jj * s.dim, s.dim);
    }
    const T fi = f[i0 + r];
    T* sr = sbuf[r];
    for (int64_t jj = 0; jj < nj; ++jj) sr[jj] = (fi + g[jj] - cr[jj]) * inv_reg;
  }
}

// Reductions in kLanes independent partial results: without -ffast-math the compiler
// may not reorder a floating-point reduction, but it vectorizes these lane arrays.
constexpr int64_t kLanes = 8;

template <class T>
LOWRANK_INLINE T block_max(const T* v, int64_t n) {
  T lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = v[j + l] > lane[l] ? v[j + l] : lane[l];
  }
  for (; j < n; ++j) lane[0] = v[j] > lane[0] ? v[j] : lane[0];
  T out = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) out = lane[l] > out ? lane[l] : out;
  return out;
}

// sum_j exp(s_j - shift) and sum_j c_j exp(s_j - shift).  An entry of weight 0 adds 0
// to the cost sum even when its cost is +inf (0 * inf would be NaN; the CUDA kernels
// skip such entries the same way): an infinite cost is a forbidden pair, of mass 0.
template <class T>
LOWRANK_INLINE void shifted_sums(const T* s, const T* c, int64_t n, T shift, T& sum, T& wsum) {
  T lane[kLanes] = {}, wlane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const T e = ot_exp(s[j + l] - shift);
      lane[l] += e;
      wlane[l] += e == T(0) ? T(0) : e * c[j + l];
    }
  }
  for (; j < n; ++j) {
    const T e = ot_exp(s[j] - shift);
    lane[0] += e;
    wlane[0] += e == T(0) ? T(0) : e * c[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += lane[l];
    wsum += wlane[l];
  }
}

// ---------------------------------------------------------------------------- row log-sum-exp
template <class T>
LOWRANK_INLINE void row_lse_tile(const OtRowLseParams& p, int64_t b, int64_t i0) {
  const OtSource& s = p.src;
  const int64_t nr = std::min(kTileRows, s.rows - i0);
  T sbuf[kTileRows][kTileCols], cbuf[kTileRows][kTileCols];
  T m[kTileRows], sum[kTileRows], wsum[kTileRows];
  for (int64_t r = 0; r < nr; ++r) {
    m[r] = -std::numeric_limits<T>::infinity();
    sum[r] = T(0);
    wsum[r] = T(0);
  }
  for (int64_t j0 = 0; j0 < s.cols; j0 += kTileCols) {
    const int64_t nj = std::min(kTileCols, s.cols - j0);
    fill_block<T>(s, b, i0, nr, j0, nj, sbuf, cbuf);
    for (int64_t r = 0; r < nr; ++r) {
      const T* sr = sbuf[r];
      const T* cr = cbuf[r];
      const T new_max = std::max(m[r], block_max(sr, nj));
      // Nothing but exp(-inf) = 0 so far (entries that overflowed to -inf): skipped, as
      // shifting by -inf would give exp(-inf - (-inf)) = NaN.
      if (new_max == -std::numeric_limits<T>::infinity()) continue;
      const T rescale = m[r] == -std::numeric_limits<T>::infinity() ? T(0) : ot_exp(m[r] - new_max);
      T acc = T(0), wacc = T(0);
      shifted_sums(sr, cr, nj, new_max, acc, wacc);
      sum[r] = sum[r] * rescale + acc;
      wsum[r] = wsum[r] * rescale + wacc;
      m[r] = new_max;
    }
  }
  T* lse = static_cast<T*>(p.lse) + b * s.rows + i0;
  T* mean_cost = p.mean_cost ? static_cast<T*>(p.mean_cost) + b * s.rows + i0 : nullptr;
  for (int64_t r = 0; r < nr; ++r) {
    // A row of marginal 0 (no columns, or every entry exp(-inf)): lse = -inf, no cost.
    // (NaN propagates.)
    lse[r] = sum[r] == 0 ? -std::numeric_limits<T>::infinity() : m[r] + std::log(sum[r]);
    if (mean_cost) mean_cost[r] = sum[r] == 0 ? T(0) : wsum[r] / sum[r];
  }
}

// The cloned entry points: one per element type, overloaded on Tag<T> so that the
// callers pick one through dispatch_real (GCC clones functions, not templates).
LOWRANK_CPU_CLONES void row_lse_tile_cloned(Tag<double>, const OtRowLseParams& p, int64_t b, int64_t i0) {
  row_lse_tile<double>(p, b, i0);
}
LOWRANK_CPU_CLONES void row_lse_tile_cloned(Tag<float>, const OtRowLseParams& p, int64_t b, int64_t i0) {
  row_lse_tile<float>(p, b, i0);
}

// ---------------------------------------------------------------------------- histogram
template <class T>
LOWRANK_INLINE void histogram_rows(const OtHistogramParams& p, int64_t b, int64_t row_begin, int64_t row_end,
                                   int64_t* counts) {
  const OtSource& s = p.src;
  const T lo = static_cast<const T*>(p.lo)[b], hi = static_cast<const T*>(p.hi)[b];
  const T inv_width = static_cast<T>(p.n_bins) / (hi - lo);
  T sbuf[kTileRows][kTileCols], cbuf[kTileRows][kTileCols];
  for (int64_t i0 = row_begin; i0 < row_end; i0 += kTileRows) {
    const int64_t nr = std::min(kTileRows, row_end - i0);
    for (int64_t j0 = 0; j0 < s.cols; j0 += kTileCols) {
      const int64_t nj = std::min(kTileCols, s.cols - j0);
      fill_block<T>(s, b, i0, nr, j0, nj, sbuf, cbuf);
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t jj = 0; jj < nj; ++jj) {
          const T v = sbuf[r][jj];
          if (!(v >= lo)) continue;
          const T pos = (v - lo) * inv_width;
          const int64_t k = ot_histogram_bin(pos, p.n_bins);
          ++counts[k];
        }
      }
    }
  }
}

LOWRANK_CPU_CLONES void histogram_rows_cloned(Tag<double>, const OtHistogramParams& p, int64_t b, int64_t r0,
                                             int64_t r1, int64_t* counts) {
  histogram_rows<double>(p, b, r0, r1, counts);
}
LOWRANK_CPU_CLONES void histogram_rows_cloned(Tag<float>, const OtHistogramParams& p, int64_t b, int64_t r0,
                                             int64_t r1, int64_t* counts) {
  histogram_rows<float>(p, b, r0, r1, counts);
}

// ---------------------------------------------------------------------------- sparsify
template <class T>
LOWRANK_INLINE void sparsify_tile(const OtSparsifyParams& p, int64_t b, int64_t i0) {
  const OtSource& s = p.src;
  const int64_t nr = std::min(kTileRows, s.rows - i0);
  const T threshold = static_cast<const T*>(p.threshold)[b];
  T sbuf[kTileRows][kTileCols], cbuf[kTileRows][kTileCols];
  int64_t kept[kTileRows] = {};
  for (int64_t j0 = 0; j0 < s.cols; j0 += kTileCols) {
    const int64_t nj = std::min(kTileCols, s.cols - j0);
    fill_block<T>(s, b, i0, nr, j0, nj, sbuf, cbuf);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t row = b * s.rows + i0 + r;
      if (p.col_idx == nullptr) {
        int64_t count = 0;
        for (int64_t jj = 0; jj < nj; ++jj) count += sbuf[r][jj] >= threshold;
        kept[r] += count;
        continue;
      }
      const int64_t begin = p.row_ptr[row], end = p.row_ptr[row + 1];
      T* values = static_cast<T*>(p.values);
      for (int64_t jj = 0; jj < nj; ++jj) {
        if (!(sbuf[r][jj] >= threshold)) continue;
        const int64_t at = begin + kept[r]++;
        // The counts came from the same arithmetic, so this holds; with row_ptr checked
        // (ot_sparsify_cpu), it keeps a row that does not match its count inside its range.
        LOWRANK_CHECK(at < end, "ot_sparsify: row_ptr does not match the counts of row ", row);
        p.col_idx[at] = j0 + jj;
        values[at] = ot_exp(sbuf[r][jj]);
      }
    }
  }
  if (p.col_idx == nullptr) {
    for (int64_t r = 0; r < nr; ++r) p.row_counts[b * s.rows + i0 + r] = kept[r];
    return;
  }
  // A row_ptr that promises a row more entries than pass the threshold would leave the
  // rest of its range unwritten (uninitialized memory handed back).
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = b * s.rows + i0 + r;
    LOWRANK_CHECK(p.row_ptr[row] + kept[r] == p.row_ptr[row + 1], "ot_sparsify: row_ptr gives row ", row, " ",
                  p.row_ptr[row + 1] - p.row_ptr[row], " entries; ", kept[r], " pass the threshold");
  }
}

LOWRANK_CPU_CLONES void sparsify_tile_cloned(Tag<double>, const OtSparsifyParams& p, int64_t b, int64_t i0) {
  sparsify_tile<double>(p, b, i0);
}
LOWRANK_CPU_CLONES void sparsify_tile_cloned(Tag<float>, const OtSparsifyParams& p, int64_t b, int64_t i0) {
  sparsify_tile<float>(p, b, i0);
}

// ---------------------------------------------------------------------------- row gradient
template <class T>
LOWRANK_INLINE void row_grad_tile(const OtRowGradParams& p, int64_t b, int64_t i0) {
  const OtSource& s = p.src;
  const int64_t nr = std::min(kTileRows, s.rows - i0);
  T sbuf[kTileRows][kTileCols], cbuf[kTileRows][kTileCols];
  const T* lse = static_cast<const T*>(p.lse) + b * s.rows + i0;
  T* grad = static_cast<T*>(p.grad) + (b * s.rows + i0) * s.dim;
  const T* x = static_cast<const T*>(s.x) + (b * s.rows + i0) * s.dim;
  const T* y = static_cast<const T*>(s.y) + b * s.cols * s.dim;
  std::fill(grad, grad + nr * s.dim, T(0));
  for (int64_t j0 = 0; j0 < s.cols; j0 += kTileCols) {
    const int64_t nj = std::min(kTileCols, s.cols - j0);
    fill_block<T>(s, b, i0, nr, j0, nj, sbuf, cbuf);
    for (int64_t r = 0; r < nr; ++r) {
      for (int64_t jj = 0; jj < nj; ++jj) {
        const T w = ot_exp(sbuf[r][jj] - lse[r]);
        const T* yj = y + (j0 + jj) * s.dim;
        for (int64_t d = 0; d < s.dim; ++d) grad[r * s.dim + d] += w * ot_point_cost_grad(s.cost, x[r * s.dim + d], yj[d]);
      }
    }
  }
}

LOWRANK_CPU_CLONES void row_grad_tile_cloned(Tag<double>, const OtRowGradParams& p, int64_t b, int64_t i0) {
  row_grad_tile<double>(p, b, i0);
}
LOWRANK_CPU_CLONES void row_grad_tile_cloned(Tag<float>, const OtRowGradParams& p, int64_t b, int64_t i0) {
  row_grad_tile<float>(p, b, i0);
}

// Runs tile(b, i0) over the row tiles of every problem; inactive problems get zero(b).
template <class Tile, class Zero>
void over_row_tiles(const OtSource& s, int num_threads, Tile tile, Zero zero) {
  const int64_t tiles = (s.rows + kTileRows - 1) / kTileRows;
  for (int64_t b = 0; b < s.batch; ++b) {
    if (!is_active(s, b)) zero(b);
  }
  parallel_for(s.batch * tiles, threads_for(s.batch * s.rows * s.cols, num_threads), [&](int64_t task) {
    const int64_t b = task / tiles;
    if (is_active(s, b)) tile(b, (task % tiles) * kTileRows);
  });
}

}  // namespace

void ot_row_lse_cpu(const OtRowLseParams& p, int num_threads) {
  check_ot_source(p.src, "ot_row_lse");
  const OtSource& s = p.src;
  const int64_t elem = dtype_size(s.dtype);
  auto zero = [&](int64_t b) {
    std::memset(static_cast<char*>(p.lse) + b * s.rows * elem, 0, s.rows * elem);
    if (p.mean_cost) std::memset(static_cast<char*>(p.mean_cost) + b * s.rows * elem, 0, s.rows * elem);
  };
  dispatch_real(s.dtype, [&](auto tag) {
    over_row_tiles(s, num_threads, [&](int64_t b, int64_t i0) { row_lse_tile_cloned(tag, p, b, i0); }, zero);
  });
}

void ot_log_histogram_cpu(const OtHistogramParams& p, int num_threads) {
  check_ot_source(p.src, "ot_log_histogram");
  LOWRANK_CHECK(p.n_bins >= 1, "ot_log_histogram: n_bins must be >= 1; got ", p.n_bins);
  const OtSource& s = p.src;
  const int threads = threads_for(s.batch * s.rows * s.cols, num_threads);
  // Each task counts a chunk of rows into its own histogram, merged under a lock.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads * 2, (s.rows + kTileRows - 1) / kTileRows));
  const int64_t chunk_rows = ((s.rows + chunks - 1) / chunks + kTileRows - 1) / kTileRows * kTileRows;
  std::mutex merge;
  parallel_for(s.batch * chunks, threads, [&](int64_t task) {
    const int64_t b = task / chunks, r0 = (task % chunks) * chunk_rows;
    const int64_t r1 = std::min(s.rows, r0 + chunk_rows);
    if (!is_active(s, b) || r0 >= r1) return;
    std::vector<int64_t> local(p.n_bins, 0);
    dispatch_real(s.dtype, [&](auto tag) { histogram_rows_cloned(tag, p, b, r0, r1, local.data()); });
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t k = 0; k < p.n_bins; ++k) p.counts[b * p.n_bins + k] += local[k];
  });
}

void ot_sparsify_cpu(const OtSparsifyParams& p, int num_threads) {
  check_ot_sparsify_params(p);
  const OtSource& s = p.src;
  if (p.col_idx != nullptr) {  // filling: every row's range inside [0, nnz) before the first write
    const int64_t rows = s.batch * s.rows;
    LOWRANK_CHECK(p.row_ptr != nullptr && (p.nnz == 0 || p.values != nullptr), "ot_sparsify: null pointer");
    for (int64_t r = 0; r < rows; ++r) {
      LOWRANK_CHECK(p.row_ptr[r] >= 0 && p.row_ptr[r] <= p.row_ptr[r + 1] && p.row_ptr[r + 1] <= p.nnz,
                    "ot_sparsify: row_ptr must be non-decreasing in [0, nnz = ", p.nnz, "]; got row_ptr[", r,
                    "] = ", p.row_ptr[r], ", row_ptr[", r + 1, "] = ", p.row_ptr[r + 1]);
    }
  }
  auto zero = [&](int64_t b) {
    if (p.col_idx == nullptr) std::fill(p.row_counts + b * s.rows, p.row_counts + (b + 1) * s.rows, int64_t(0));
  };
  dispatch_real(s.dtype, [&](auto tag) {
    over_row_tiles(s, num_threads, [&](int64_t b, int64_t i0) { sparsify_tile_cloned(tag, p, b, i0); }, zero);
  });
}

void ot_row_grad_cpu(const OtRowGradParams& p, int num_threads) {
  check_ot_row_grad_params(p);
  const OtSource& s = p.src;
  const int64_t elem = dtype_size(s.dtype);
  auto zero = [&](int64_t b) {
    std::memset(static_cast<char*>(p.grad) + b * s.rows * s.dim * elem, 0, s.rows * s.dim * elem);
  };
  dispatch_real(s.dtype, [&](auto tag) {
    over_row_tiles(s, num_threads, [&](int64_t b, int64_t i0) { row_grad_tile_cloned(tag, p, b, i0); }, zero);
  });
}

namespace {

template <class T>
void hessian_problem(const OtHessianParams& p, int64_t b) {
  const T* values = static_cast<const T*>(p.values);
  const T* r = static_cast<const T*>(p.r) + b * p.rows;
  const T* c = static_cast<const T*>(p.c) + b * p.cols;
  const T* vx = static_cast<const T*>(p.vx) + b * p.rows;
  const T* vy = static_cast<const T*>(p.vy) + b * p.cols;
  T* ox = static_cast<T*>(p.out_x) + b * p.rows;
  T* oy = static_cast<T*>(p.out_y) + b * p.cols;
  for (int64_t j = 0; j < p.cols; ++j) oy[j] = c[j] * vy[j];
  for (int64_t i = 0; i < p.rows; ++i) {
    const int64_t row = b * p.rows + i;
    T acc = r[i] * vx[i];
    const int64_t begin = clamped(p.row_ptr[row], p.nnz), end = std::max(begin, clamped(p.row_ptr[row + 1], p.nnz));
    for (int64_t k = begin; k < end; ++k) {
      const int64_t j = p.col_idx[k];
      LOWRANK_CHECK(j >= 0 && j < p.cols, "ot_hessian_matvec: col_idx[", k, "] = ", j, "; expected in [0, ",
                    p.cols, ")");
      acc += values[k] * vy[j];
      oy[j] += values[k] * vx[i];
    }
    ox[i] = acc;
  }
}

}  // namespace

void ot_hessian_matvec_cpu(const OtHessianParams& p, int num_threads) {
  check_ot_hessian_params(p);
  const int threads = p.nnz + p.batch * (p.rows + p.cols) < kSerialEntries ? 1 : num_threads;
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    parallel_for(p.batch, threads, [&](int64_t b) { hessian_problem<T>(p, b); });
  });
}

}  // namespace lowrank_ops
