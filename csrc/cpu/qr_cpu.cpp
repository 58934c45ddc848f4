// CPU kernels of CholeskyQR's tall-skinny steps (contract: lowrank_ops/qr.h).
//
// Gram G = Y^T Y.  The rows are cut into chunks of kGramChunkRows (a fixed cut, so the
// result does not depend on the thread count); each task computes the upper triangle of
// its chunk's Y_c^T Y_c into a slot of its own, and the slots are added in chunk order
// (a blocked sum: its rounding error grows with the chunk length, not with rows).
// * Column-major Y: register tiles of 4 x 4 entries of G, each the dot product of two
//   columns over the chunk: per vector of rows, 8 loads for 16 multiply-adds into lane
//   partial sums, reduced once per tile (wide_lane_sums).
// * Row-major Y: the chunk is first copied into a buffer whose rows are padded with
//   zeros to whole vectors (so no load runs past a row, or past the matrix), then tiles
//   of 4 rows x 4 vectors of G sum outer products over the rows: per row, 4 vector loads
//   and 4 broadcasts for 16 multiply-adds.
//
// Solve Q = Y R^-1 with lanes = rows: a block of kSolveVecs vectors of rows (64 fp32 or
// 32 fp64 rows) is held column by column in a buffer T [cols][kSolveVecs] in L1 (the
// columns of a column-major Y are loaded directly, a row-major Y is transposed into
// it); the substitution runs on 4 columns at once (per earlier column k: kSolveVecs
// loads of q_k and 4 broadcasts of R_kj for 4 kSolveVecs multiply-adds), in place, and
// T is stored into Q's layout: straight into a column-major Q, transposed into a
// row-major one.  A block reads all its rows of Y before it writes Q's, so Q may
// overwrite Y (cholesky_qr2's later passes, and rsvd's temporary blocks: no new buffer,
// whose first touch costs about as much as the solve on the VMs measured).
//
// Roofline, fp32, rows m, cols n: the Gram m n^2 flops (the upper half of the 2 m n^2
// of a GEMM), the solve m n^2; Y read once (4 m n bytes), Q written once.  At 4096 x 74
// that is 22 MFLOP and 1.2 MB each: compute-bound, 0.12 ms at the ~180 GFLOP/s of
// the 2-core machines' SGEMM.  Measured on the 2-core AMD EPYC (bench/results/
// cpu-amd-epyc-2core/qr-full): Gram 0.19-0.22 ms (55-65 % of that floor; MKL's SGEMM
// 0.35), solve 0.23-0.25 ms (~50 %; MKL's STRSM 0.42-0.49).  Their losses: the Gram's
// lane reductions and the row-major pack, the solve's divisions (one per element, as
// xTRSM) and the transposition of a row-major Y.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "lowrank_ops/check.h"
#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/dtype.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/qr.h"
#include "lowrank_ops/simd.h"

namespace lowrank_ops {
namespace {

constexpr int64_t kTile = 4;              // entries of G (per side), columns of Q solved together
constexpr int64_t kGramVecs = 4;          // row-major Gram: vectors of G's columns per tile
// Rows per Gram task: long enough that a tile's reduction is rare next to its sums (at 256
// rows the 4096 x 74 fp32 Gram took 0.24-0.35 ms, at 1024 0.20-0.24 on the 2-core AMD EPYC).
constexpr int64_t kGramChunkRows = 1024;
constexpr int64_t kSolveVecs = 4;         // vectors of rows per solve block
constexpr int64_t kSerialWork = 1 << 17;  // multiply-adds (~15 us) below which one thread is faster

template <class A>
constexpr int64_t kLanes = kWideLanes<A>;

template <class A>
LOWRANK_INLINE WideVec<A> load(const A* p) {
  return *reinterpret_cast<const WideUnaligned<A>*>(p);
}
template <class A>
LOWRANK_INLINE void store(A* p, WideVec<A> v) {
  *reinterpret_cast<WideUnaligned<A>*>(p) = v;
}

// out[i] = sum of the lanes of acc[i], i < 16.
template <class A>
LOWRANK_INLINE void lane_sums16(const WideVec<A>* acc, A* out) {
  for (int64_t i = 0; i < 16; i += kLanes<A>) {
    const WideVec<A> sums = wide_lane_sums<A>(acc + i);
    std::memcpy(out + i, &sums, sizeof sums);
  }
}

// Scratch of `count` elements for the calling thread.  Up to kKeptScratchBytes it is a
// per-thread buffer kept between calls (a fresh buffer's first touch costs page faults,
// as much as a 4096 x 74 pass on the VMs measured); larger requests (very wide blocks)
// get `local`, the caller's own, freed after the call, so no thread keeps tens of MB.
constexpr size_t kKeptScratchBytes = size_t(4) << 20;
template <class A>
A* thread_scratch(std::vector<A>& local, size_t count) {
  thread_local std::vector<A> kept;
  if (count * sizeof(A) > kKeptScratchBytes) {
    local.resize(count);
    return local.data();
  }
  if (kept.size() < count) kept.resize(count);
  return kept.data();
}

int threads_for(int64_t multiply_adds, int num_threads) {
  return multiply_adds < kSerialWork ? 1 : std::max(num_threads, 1);
}

// ---------------------------------------------------------------------------- Gram
// Tiles (a-tile <= b-tile) of Y_c^T Y_c for rows [i0, i1) of a column-major block
// (column j at y + j * ld) into out [cols][cols].
template <class A>
LOWRANK_CPU_CLONES void gram_chunk_colmajor(const A* y, int64_t ld, int64_t cols, int64_t i0, int64_t i1, A* out) {
  constexpr int64_t L = kLanes<A>;
  const int64_t i_vec = i0 + (i1 - i0) / L * L;
  for (int64_t a0 = 0; a0 < cols; a0 += kTile) {
    const A* ca[kTile];
    for (int64_t s = 0; s < kTile; ++s) ca[s] = y + std::min(a0 + s, cols - 1) * ld;  // past the end: a repeat, discarded
    for (int64_t b0 = a0; b0 < cols; b0 += kTile) {
      const A* cb[kTile];
      for (int64_t t = 0; t < kTile; ++t) cb[t] = y + std::min(b0 + t, cols - 1) * ld;
      WideVec<A> acc[kTile * kTile] = {};
      for (int64_t i = i0; i < i_vec; i += L) {
        WideVec<A> va[kTile], vb[kTile];
        for (int s = 0; s < kTile; ++s) va[s] = load(ca[s] + i);
        for (int t = 0; t < kTile; ++t) vb[t] = load(cb[t] + i);
        for (int s = 0; s < kTile; ++s)
          for (int t = 0; t < kTile; ++t) acc[kTile * s + t] += va[s] * vb[t];
      }
      A sums[kTile * kTile];
      lane_sums16<A>(acc, sums);
      for (int64_t s = 0; s < std::min(kTile, cols - a0); ++s)
        for (int64_t t = 0; t < std::min(kTile, cols - b0); ++t) {
          A value = sums[kTile * s + t];
          for (int64_t i = i_vec; i < i1; ++i) value += ca[s][i] * cb[t][i];
          out[(a0 + s) * cols + b0 + t] = value;
        }
    }
  }
}

// acc[s][v] += sum over the rows of pack of row[a0 + s] * row[(v0 + v) L : ...].
template <class A, int kV>
LOWRANK_INLINE void gram_rows_tile(const A* pack, int64_t npad, int64_t n_rows, int64_t a0, int64_t v0,
                                   WideVec<A> (&acc)[kTile][kGramVecs]) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const A* row = pack + r * npad;
    WideVec<A> w[kV];
    for (int v = 0; v < kV; ++v) w[v] = load(row + (v0 + v) * kLanes<A>);
    for (int s = 0; s < kTile; ++s) {
      const A d = row[a0 + s];
      for (int v = 0; v < kV; ++v) acc[s][v] += d * w[v];
    }
  }
}

// Rows a of Y_c^T Y_c, columns from a's vector on, for rows [i0, i1) of a row-major
// block (row i at y + i * ld), into out [cols][cols]; pack holds (i1 - i0) x npad.
template <class A>
LOWRANK_CPU_CLONES void gram_chunk_rowmajor(const A* y, int64_t ld, int64_t cols, int64_t i0, int64_t i1, A* pack,
                                            A* out) {
  constexpr int64_t L = kLanes<A>;
  const int64_t npad = (cols + L - 1) / L * L, n_vec = npad / L, n_rows = i1 - i0;
  for (int64_t r = 0; r < n_rows; ++r) {
    std::memcpy(pack + r * npad, y + (i0 + r) * ld, static_cast<size_t>(cols) * sizeof(A));
    std::fill(pack + r * npad + cols, pack + (r + 1) * npad, A(0));
  }
  // a0 + kTile - 1 < npad: a0 < cols is a multiple of kTile, and npad of L (a multiple of kTile).
  for (int64_t a0 = 0; a0 < cols; a0 += kTile) {
    for (int64_t v0 = a0 / L; v0 < n_vec; v0 += kGramVecs) {
      WideVec<A> acc[kTile][kGramVecs] = {};
      const int64_t n_v = std::min(kGramVecs, n_vec - v0);
      switch (n_v) {
        case 4: gram_rows_tile<A, 4>(pack, npad, n_rows, a0, v0, acc); break;
        case 3: gram_rows_tile<A, 3>(pack, npad, n_rows, a0, v0, acc); break;
        case 2: gram_rows_tile<A, 2>(pack, npad, n_rows, a0, v0, acc); break;
        default: gram_rows_tile<A, 1>(pack, npad, n_rows, a0, v0, acc); break;
      }
      for (int64_t s = 0; s < std::min(kTile, cols - a0); ++s)
        for (int64_t v = 0; v < n_v; ++v)
          for (int64_t l = 0; l < L; ++l) {
            const int64_t b = (v0 + v) * L + l;
            if (b < cols) out[(a0 + s) * cols + b] = acc[s][v][l];
          }
    }
  }
}

template <class A>
void gram_typed(const TallGramParams& p, int num_threads) {
  const A* y = static_cast<const A*>(p.y);
  A* gram = static_cast<A*>(p.gram);
  const int64_t n = p.cols, chunks = std::max<int64_t>(1, (p.rows + kGramChunkRows - 1) / kGramChunkRows);
  const int64_t n_tasks = p.batch * chunks, npad = (n + kLanes<A> - 1) / kLanes<A> * kLanes<A>;
  const bool colmajor = p.y_row_stride == 1;
  std::vector<A> partial(static_cast<size_t>(n_tasks * n * n));
  const int threads = threads_for(p.batch * p.rows * n * n / 2, num_threads);
  parallel_for(n_tasks, threads, [&](int64_t task) {
    const int64_t b = task / chunks, i0 = task % chunks * kGramChunkRows;
    const int64_t i1 = std::min(p.rows, i0 + kGramChunkRows);
    const A* block = y + b * p.y_batch_stride;
    A* out = partial.data() + task * n * n;
    if (colmajor) {
      gram_chunk_colmajor(block, p.y_col_stride, n, i0, i1, out);
    } else {
      std::vector<A> local;
      A* pack = thread_scratch(local, static_cast<size_t>(kGramChunkRows * npad));
      gram_chunk_rowmajor(block, p.y_row_stride, n, i0, i1, pack, out);
    }
  });
  parallel_for(p.batch, threads, [&](int64_t b) {
    const A* slots = partial.data() + b * chunks * n * n;
    A* g = gram + b * n * n;
    for (int64_t a = 0; a < n; ++a)
      for (int64_t c = a; c < n; ++c) {
        A sum = slots[a * n + c];
        for (int64_t chunk = 1; chunk < chunks; ++chunk) sum += slots[chunk * n * n + a * n + c];
        g[a * n + c] = g[c * n + a] = sum;
      }
  });
}

// ---------------------------------------------------------------------------- solve
// Rows [i0, i0 + kSolveVecs L) of Q (fewer at the end), through t [cols][kSolveVecs]: all
// of the block's rows of Y are read before any of Q is written, so q may be y.
template <class A>
LOWRANK_CPU_CLONES void solve_block(const TallSolveParams& p, const A* y, const A* r, A* q, int64_t i0,
                                    WideVec<A>* t) {
  constexpr int64_t L = kLanes<A>, V = kSolveVecs, W = kSolveVecs * kLanes<A>;
  const int64_t n = p.cols, here = std::min(W, p.rows - i0);
  A* t_elems = reinterpret_cast<A*>(t);  // column j's rows at t_elems + j W
  if (p.y_row_stride == 1 && here == W) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t v = 0; v < V; ++v) t[j * V + v] = load(y + j * p.y_col_stride + i0 + v * L);
  } else {
    std::fill(t_elems, t_elems + n * W, A(0));
    for (int64_t i = 0; i < here; ++i) {
      const A* row = y + (i0 + i) * p.y_row_stride;
      for (int64_t j = 0; j < n; ++j) t_elems[j * W + i] = row[j * p.y_col_stride];
    }
  }
  auto R = [&](int64_t k, int64_t j) { return r[k * p.r_row_stride + j * p.r_col_stride]; };
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    int64_t cols[kTile];
    for (int64_t s = 0; s < kTile; ++s) cols[s] = std::min(j0 + s, n - 1);  // past the end: a repeat, discarded
    WideVec<A> acc[kTile][V];
    for (int s = 0; s < kTile; ++s)
      for (int v = 0; v < V; ++v) acc[s][v] = t[cols[s] * V + v];
    for (int64_t k = 0; k < j0; ++k) {
      WideVec<A> q[V];
      for (int v = 0; v < V; ++v) q[v] = t[k * V + v];
      for (int s = 0; s < kTile; ++s) {
        const A coef = R(k, cols[s]);
        for (int v = 0; v < V; ++v) acc[s][v] -= q[v] * coef;
      }
    }
    for (int64_t s = 0; s < std::min(kTile, n - j0); ++s) {
      for (int64_t u = 0; u < s; ++u) {
        const A coef = R(j0 + u, j0 + s);
        for (int v = 0; v < V; ++v) acc[s][v] -= acc[u][v] * coef;
      }
      const A diagonal = R(j0 + s, j0 + s);
      for (int v = 0; v < V; ++v) {
        acc[s][v] /= diagonal;
        t[(j0 + s) * V + v] = acc[s][v];
      }
    }
  }
  if (p.q_row_stride == 1 && here == W) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t v = 0; v < V; ++v) store(q + j * p.q_col_stride + i0 + v * L, t[j * V + v]);
  } else {
    for (int64_t i = 0; i < here; ++i) {
      A* row = q + (i0 + i) * p.q_row_stride;
      for (int64_t j = 0; j < n; ++j) row[j * p.q_col_stride] = t_elems[j * W + i];
    }
  }
}

template <class A>
void solve_typed(const TallSolveParams& p, int num_threads) {
  constexpr int64_t W = kSolveVecs * kLanes<A>;
  const int64_t blocks = (p.rows + W - 1) / W;
  const int threads = threads_for(p.batch * p.rows * p.cols * p.cols / 2, num_threads);
  parallel_for(p.batch * blocks, threads, [&](int64_t task) {
    const int64_t b = task / blocks, i0 = task % blocks * W;
    // std::vector does not align its elements to 64 bytes (vector_size types are not
    // "over-aligned" to its allocator): one spare vector, and the start rounded up.
    std::vector<A> local;
    A* buffer = thread_scratch(local, static_cast<size_t>((p.cols + 1) * W));
    const auto start = (reinterpret_cast<std::uintptr_t>(buffer) + 63) / 64 * 64;
    solve_block(p, static_cast<const A*>(p.y) + b * p.y_batch_stride, static_cast<const A*>(p.r) + b * p.r_batch_stride,
                static_cast<A*>(p.q) + b * p.q_batch_stride, i0, reinterpret_cast<WideVec<A>*>(start));
  });
}

// ---------------------------------------------------------------------------- Cholesky
template <class A>
LOWRANK_INLINE bool valid_pivot(A x) {
  return x > A(0) && x <= std::numeric_limits<A>::max();  // false for NaN and inf
}

// R (row-major n x n) = the upper Cholesky factor of G + sigma I, right-looking by rows
// of R: row k over its pivot, then every later row i takes away R[k, i] R[k, i:]
// (contiguous multiply-adds).  False where a pivot is not positive and finite.
template <class A>
LOWRANK_CPU_CLONES bool shifted_cholesky(const A* g, A* r, int64_t n, A sigma) {
  for (int64_t i = 0; i < n; ++i) {
    std::fill(r + i * n, r + i * n + i, A(0));
    std::copy(g + i * n + i, g + (i + 1) * n, r + i * n + i);
    r[i * n + i] += sigma;
  }
  for (int64_t k = 0; k < n; ++k) {
    A* rk = r + k * n;
    if (!valid_pivot(rk[k])) return false;
    const A pivot = std::sqrt(rk[k]);
    rk[k] = pivot;
    for (int64_t j = k + 1; j < n; ++j) rk[j] /= pivot;
    for (int64_t i = k + 1; i < n; ++i) {
      A* ri = r + i * n;
      const A f = rk[i];
      for (int64_t j = i; j < n; ++j) ri[j] -= f * rk[j];
    }
  }
  return true;
}

template <class A>
void cholesky_typed(const TallCholeskyParams& p, int num_threads) {
  const int64_t n = p.n;
  const A unit = std::numeric_limits<A>::epsilon() / 2, tiny = std::numeric_limits<A>::min();
  parallel_for(p.batch, threads_for(p.batch * n * n * n / 3, num_threads), [&](int64_t b) {
    const A* g = static_cast<const A*>(p.gram) + b * n * n;
    A* r = static_cast<A*>(p.r) + b * n * n;
    A trace = 0;
    for (int64_t i = 0; i < n; ++i) trace += g[i * n + i];
    // m n + n (n + 1) in floating point: an int64 product overflowed for huge rows (NaN R).
    const A size = static_cast<A>(p.rows) * static_cast<A>(n) + static_cast<A>(n) * static_cast<A>(n + 1);
    const A first = p.shift ? A(11) * size * unit * trace + tiny + tiny : tiny;
    if (shifted_cholesky(g, r, n, first)) return;
    if (!p.shift && shifted_cholesky(g, r, n, static_cast<A>(n) * unit * trace + tiny)) return;
    std::fill(r, r + n * n, std::numeric_limits<A>::quiet_NaN());
  });
}

// ---------------------------------------------------------------------------- scale
constexpr int64_t kScaleLines = 8;  // rows or columns of a block per scaling task

// max |y| over lines [first, last) of a block (its contiguous rows or columns), and
// whether an entry is not finite (x - x is NaN exactly for NaN and inf).
template <class A>
LOWRANK_CPU_CLONES A lines_max_abs(const A* y, int64_t first, int64_t last, int64_t length, int64_t line_stride,
                                   bool* finite) {
  constexpr int64_t L = kLanes<A>;
  WideVec<A> largest = {}, poison = {};
  A tail_largest = 0, tail_poison = 0;
  for (int64_t line = first; line < last; ++line) {
    const A* x = y + line * line_stride;
    int64_t i = 0;
    for (; i + L <= length; i += L) {
      const WideVec<A> v = load(x + i);
      const WideVec<A> a = v < 0 ? -v : v;
      largest = a > largest ? a : largest;
      poison += v - v;
    }
    for (; i < length; ++i) {
      tail_largest = std::max(tail_largest, std::fabs(x[i]));
      tail_poison += x[i] - x[i];
    }
  }
  A result = tail_largest, poisoned = tail_poison;
  for (int64_t l = 0; l < L; ++l) {
    result = std::max(result, largest[l]);
    poisoned += poison[l];
  }
  *finite = poisoned == A(0);
  return result;
}

template <class A>
LOWRANK_CPU_CLONES void lines_divide(A* y, int64_t first, int64_t last, int64_t length, int64_t line_stride,
                                     A divisor) {
  for (int64_t line = first; line < last; ++line) {
    A* x = y + line * line_stride;
    for (int64_t i = 0; i < length; ++i) x[i] /= divisor;
  }
}

template <class A>
void scale_typed(const TallScaleParams& p, int num_threads) {
  const bool colmajor = p.y_row_stride == 1;
  const int64_t lines = colmajor ? p.cols : p.rows, length = colmajor ? p.rows : p.cols;
  const int64_t line_stride = colmajor ? p.y_col_stride : p.y_row_stride;
  const int64_t chunks = std::max<int64_t>(1, (lines + kScaleLines - 1) / kScaleLines), n_tasks = p.batch * chunks;
  const int threads = threads_for(p.batch * p.rows * p.cols / 4, num_threads);
  A* scale = static_cast<A*>(p.scale);
  auto task_range = [&](int64_t task, A** block, int64_t* first, int64_t* last) {
    *block = static_cast<A*>(p.y) + task / chunks * p.y_batch_stride;
    *first = task % chunks * kScaleLines;
    *last = std::min(lines, *first + kScaleLines);
  };
  std::vector<A> partial(static_cast<size_t>(n_tasks));
  std::vector<char> finite(static_cast<size_t>(n_tasks));
  parallel_for(n_tasks, threads, [&](int64_t task) {
    A* block;
    int64_t first, last;
    task_range(task, &block, &first, &last);
    bool ok = true;
    partial[task] = lines_max_abs<A>(block, first, last, length, line_stride, &ok);
    finite[task] = ok;
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    A largest = 0;
    bool ok = true;
    for (int64_t c = 0; c < chunks; ++c) {
      largest = std::max(largest, partial[b * chunks + c]);
      ok = ok && finite[b * chunks + c];
    }
    scale[b] = 1;
    if (!ok) {
      scale[b] = std::numeric_limits<A>::quiet_NaN();  // NaN or inf in the block: NaN out, as the torch path
    } else if (largest > 0) {
      int exponent = 0;
      std::frexp(largest, &exponent);
      scale[b] = std::ldexp(A(1), exponent - 1);  // exact: 2^(e - 1) <= largest < 2^e
    }
  }
  parallel_for(n_tasks, threads, [&](int64_t task) {
    A* block;
    int64_t first, last;
    task_range(task, &block, &first, &last);
    const A divisor = scale[task / chunks];
    if (divisor != A(1)) lines_divide<A>(block, first, last, length, line_stride, divisor);
  });
}

// ---------------------------------------------------------------------------- whole CholeskyQR
// total = factor total for upper-triangular n x n matrices (row-major), via work.
template <class A>
void multiply_upper(const A* factor, A* total, A* work, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      A sum = 0;
      for (int64_t k = i; k <= j; ++k) sum += factor[i * n + k] * total[k * n + j];
      work[i * n + j] = sum;  // zero below the diagonal (empty sum)
    }
  std::copy(work, work + n * n, total);
}

template <class A>
void cholesky_qr_typed(const CholeskyQrParams& p, int num_threads) {
  const int64_t n = p.cols, nn = n * n;
  std::vector<A> scale(static_cast<size_t>(p.batch)), gram(static_cast<size_t>(p.batch * nn)),
      factor(static_cast<size_t>(p.batch * nn)), work(static_cast<size_t>(nn));
  A* total = static_cast<A*>(p.r);
  TallScaleParams sp;
  copy_tall_block(sp, p);
  sp.scale = scale.data();
  scale_typed<A>(sp, num_threads);
  TallGramParams gp;
  copy_tall_block(gp, p);
  gp.gram = gram.data();
  TallCholeskyParams cp;
  cp.gram = gram.data();
  cp.batch = p.batch;
  cp.n = n;
  cp.rows = p.rows;
  cp.dtype = p.dtype;
  TallSolveParams qp;
  copy_tall_block(qp, p);
  qp.q = p.y;  // in place
  qp.q_batch_stride = p.y_batch_stride;
  qp.q_row_stride = p.y_row_stride;
  qp.q_col_stride = p.y_col_stride;
  qp.r_batch_stride = nn;
  qp.r_row_stride = n;
  qp.r_col_stride = 1;
  qp.dtype = p.dtype;
  const int64_t passes = (p.shift ? 1 : 0) + p.plain_passes;
  for (int64_t pass = 0; pass < passes; ++pass) {
    A* r = pass == 0 ? total : factor.data();
    cp.shift = p.shift && pass == 0;
    cp.r = r;
    qp.r = r;
    gram_typed<A>(gp, num_threads);
    cholesky_typed<A>(cp, num_threads);
    solve_typed<A>(qp, num_threads);
    if (pass > 0)
      for (int64_t b = 0; b < p.batch; ++b) multiply_upper(factor.data() + b * nn, total + b * nn, work.data(), n);
  }
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t e = 0; e < nn; ++e) total[b * nn + e] *= scale[static_cast<size_t>(b)];
}

// ---------------------------------------------------------------------------- checks
void check_block(const char* op, int64_t batch, int64_t rows, int64_t cols, const void* y, int64_t row_stride,
                 int64_t col_stride, DType dtype) {
  LOWRANK_CHECK(batch >= 0 && rows >= 0 && cols >= 0, op, ": sizes must be non-negative; got batch=", batch,
                ", rows=", rows, ", cols=", cols);
  LOWRANK_CHECK(dtype == DType::float32 || dtype == DType::float64, op, ": dtype must be float32 or float64; got code ",
                static_cast<int>(dtype));
  LOWRANK_CHECK(batch * rows * cols == 0 || y != nullptr, op, ": y must not be null for a ", batch, " x ", rows, " x ",
                cols, " batch");
  LOWRANK_CHECK(batch * rows * cols == 0 || row_stride == 1 || col_stride == 1, op, ": y must have a unit row or column stride; got strides (",
                row_stride, ", ", col_stride, ")");
}

// A dimension of size 1 has no meaningful stride (torch reports any value there: a 1 x 1
// slice of a larger matrix is "contiguous" with strides (6, 3)), so it gets a unit one and
// the layout tests below see the other dimension's.
void unit_single_stride(int64_t rows, int64_t cols, int64_t& row_stride, int64_t& col_stride) {
  if (cols == 1) col_stride = 1;
  else if (rows == 1) row_stride = 1;
}

}  // namespace

void tall_gram_cpu(const TallGramParams& params, int num_threads) {
  TallGramParams p = params;
  unit_single_stride(p.rows, p.cols, p.y_row_stride, p.y_col_stride);
  check_block("tall_gram", p.batch, p.rows, p.cols, p.y, p.y_row_stride, p.y_col_stride, p.dtype);
  LOWRANK_CHECK(p.batch * p.cols == 0 || p.gram != nullptr, "tall_gram: gram must not be null");
  if (p.batch == 0 || p.cols == 0) return;
  dispatch_real(p.dtype, [&](auto tag) { gram_typed<typename decltype(tag)::type>(p, num_threads); });
}

void tall_solve_upper_cpu(const TallSolveParams& params, int num_threads) {
  TallSolveParams p = params;
  unit_single_stride(p.rows, p.cols, p.y_row_stride, p.y_col_stride);
  unit_single_stride(p.rows, p.cols, p.q_row_stride, p.q_col_stride);
  check_block("tall_solve_upper", p.batch, p.rows, p.cols, p.y, p.y_row_stride, p.y_col_stride, p.dtype);
  if (p.batch * p.rows * p.cols == 0) return;
  LOWRANK_CHECK(p.r != nullptr && p.q != nullptr, "tall_solve_upper: r and q must not be null");
  LOWRANK_CHECK(p.q_row_stride == 1 || p.q_col_stride == 1, "tall_solve_upper: q must have a unit row or column "
                "stride; got strides (", p.q_row_stride, ", ", p.q_col_stride, ")");
  dispatch_real(p.dtype, [&](auto tag) { solve_typed<typename decltype(tag)::type>(p, num_threads); });
}

void tall_scale_cpu(const TallScaleParams& params, int num_threads) {
  TallScaleParams p = params;
  unit_single_stride(p.rows, p.cols, p.y_row_stride, p.y_col_stride);
  check_block("tall_scale", p.batch, p.rows, p.cols, p.y, p.y_row_stride, p.y_col_stride, p.dtype);
  if (p.batch == 0) return;
  LOWRANK_CHECK(p.scale != nullptr, "tall_scale: scale must not be null");
  dispatch_real(p.dtype, [&](auto tag) { scale_typed<typename decltype(tag)::type>(p, num_threads); });
}

void cholesky_qr_cpu(const CholeskyQrParams& params, int num_threads) {
  CholeskyQrParams p = params;
  unit_single_stride(p.rows, p.cols, p.y_row_stride, p.y_col_stride);
  check_block("cholesky_qr", p.batch, p.rows, p.cols, p.y, p.y_row_stride, p.y_col_stride, p.dtype);
  LOWRANK_CHECK(p.plain_passes >= 0 && (p.shift || p.plain_passes >= 1), "cholesky_qr: need at least one pass; got "
                "shift=", p.shift, ", plain_passes=", p.plain_passes);
  if (p.batch * p.cols == 0) return;
  LOWRANK_CHECK(p.r != nullptr, "cholesky_qr: r must not be null");
  dispatch_real(p.dtype, [&](auto tag) { cholesky_qr_typed<typename decltype(tag)::type>(p, num_threads); });
}

void tall_cholesky_cpu(const TallCholeskyParams& p, int num_threads) {
  LOWRANK_CHECK(p.batch >= 0 && p.n >= 0 && p.rows >= 0, "tall_cholesky: sizes must be non-negative; got batch=",
                p.batch, ", n=", p.n, ", rows=", p.rows);
  LOWRANK_CHECK(p.dtype == DType::float32 || p.dtype == DType::float64,
                "tall_cholesky: dtype must be float32 or float64; got code ", static_cast<int>(p.dtype));
  if (p.batch * p.n == 0) return;
  LOWRANK_CHECK(p.gram != nullptr && p.r != nullptr, "tall_cholesky: gram and r must not be null");
  dispatch_real(p.dtype, [&](auto tag) { cholesky_typed<typename decltype(tag)::type>(p, num_threads); });
}

}  // namespace lowrank_ops
