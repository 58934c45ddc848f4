// CPU kernels of the Krylov solvers; see csrc/include/lowrank_ops/krylov.h for the contract.
//
// Roofline.  SpMV: 2 nnz flops, 12 nnz + 16 n bytes (fp64, int32 indices).  A Gram-Schmidt
// pass over `rows` basis vectors: 4 rows n flops, 2 rows n elements read (the dots, then
// the update), so 0.25 flop/byte: bandwidth-bound, from L2 while the basis fits (41 x
// 4096 doubles = 1.3 MB at Darcy 64 x 64) and from L3 beyond.  The hot loops therefore
// read each basis row once per half-pass and touch w once per group of four rows
// (multi-dot / multi-axpy below) instead of once per row.
//
// The hot loops live in functions compiled for several ISAs (target_clones: baseline
// SSE2, AVX2+FMA, AVX-512) and picked at load time; lambdas handed to parallel_for are
// not cloned, so they only call the cloned functions.

// The vector helpers below take and return 32-byte vectors; they are always inlined into
// their cloned callers, so no vector value crosses a function boundary (-Wpsabi).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "lowrank_ops/check.h"
#include "lowrank_ops/clamp.h"
#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/krylov.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/simd.h"

namespace lowrank_ops {

namespace {

// Below this many stored entries (or basis entries) per task a second thread costs more
// than it saves (hand-off ~10 us against ~1 ns per entry).
constexpr int64_t kMinWorkPerTask = 1 << 16;
// Rows handled together by the multi-dot / multi-axpy: w (or y) is loaded and stored once
// per group, and 4 rows x 2 vectors = 8 independent accumulators hide the FMA latency.
constexpr int kGroup = 4;
// Entries per block of the block kernels (gram, combine): 41 basis rows x 512 doubles = 164 KB
// stay in L2 while every column of the other operand passes over them.
constexpr int64_t kBlock = 512;
// Arnoldi: a second Gram-Schmidt pass when ||w|| fell below this fraction of ||A v_j||
// (see python/lowrank_ops/krylov/_arnoldi.py), and the breakdown threshold.
constexpr double kReorthogonalize = 0.1;
constexpr double kBreakdown = 1e-14;

bool is_real_float(DType dtype) { return dtype == DType::float32 || dtype == DType::float64; }

template <class T>
constexpr int64_t kLanes = static_cast<int64_t>(sizeof(Vec<T>) / sizeof(T));

template <class T>
LOWRANK_INLINE Vec<T> load(const T* p) {
  return *reinterpret_cast<const typename VecTraits<T>::unaligned*>(p);
}

template <class T>
LOWRANK_INLINE void store(T* p, Vec<T> v) {
  *reinterpret_cast<typename VecTraits<T>::unaligned*>(p) = v;
}

template <class T>
LOWRANK_INLINE T horizontal_sum(Vec<T> v) {
  T sum = 0;
  for (int64_t lane = 0; lane < kLanes<T>; ++lane) sum += v[lane];
  return sum;
}

// out[r] = sum_e q[r][e] w[e] over [0, n) for R rows at once (w read once).
template <int R, class T>
LOWRANK_INLINE void dot_group(const T* const* q, const T* w, int64_t n, T* out) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> s0[R], s1[R];
  for (int r = 0; r < R; ++r) s0[r] = s1[r] = Vec<T>{};
  int64_t e = 0;
  for (; e + 2 * L <= n; e += 2 * L) {
    const Vec<T> w0 = load(w + e), w1 = load(w + e + L);
    for (int r = 0; r < R; ++r) {
      s0[r] += load(q[r] + e) * w0;
      s1[r] += load(q[r] + e + L) * w1;
    }
  }
  for (; e + L <= n; e += L) {
    const Vec<T> w0 = load(w + e);
    for (int r = 0; r < R; ++r) s0[r] += load(q[r] + e) * w0;
  }
  for (int r = 0; r < R; ++r) {
    T sum = horizontal_sum<T>(s0[r] + s1[r]);
    for (int64_t t = e; t < n; ++t) sum += q[r][t] * w[t];
    out[r] = sum;
  }
}

// y[e] += sum_r c[r] q[r][e] over [0, n) for R rows at once (y loaded and stored once).
template <int R, class T>
LOWRANK_INLINE void axpy_group(const T* const* q, const T* c, T* y, int64_t n) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> cv[R];
  for (int r = 0; r < R; ++r) cv[r] = Vec<T>{} + c[r];
  int64_t e = 0;
  for (; e + L <= n; e += L) {
    Vec<T> acc = load(y + e);
    for (int r = 0; r < R; ++r) acc += cv[r] * load(q[r] + e);
    store(y + e, acc);
  }
  for (; e < n; ++e) {
    T acc = y[e];
    for (int r = 0; r < R; ++r) acc += c[r] * q[r][e];
    y[e] = acc;
  }
}

// Sum of w[e]^2 over [0, n) in double: float32 squares overflow once |w| passes ~1.8e19
// and lose digits below ~1e-19 (subnormal), so GMRES on a float32 operator of such norms
// broke down or stalled; any float32's square is a normal double.  For float64 the
// arithmetic is dot_group<1>'s (the same bits as a dot of w with itself).
template <class T>
LOWRANK_INLINE double squared_norm(const T* w, int64_t n) {
  constexpr int64_t L = kLanes<double>;
  using D = Vec<double>;
  D s0 = D{}, s1 = D{};
  int64_t e = 0;
  if constexpr (std::is_same_v<T, float>) {
    typedef float Half __attribute__((vector_size(16), aligned(4)));  // 4 floats -> 4 doubles
    for (; e + 2 * L <= n; e += 2 * L) {
      const D a = __builtin_convertvector(*reinterpret_cast<const Half*>(w + e), D);
      const D b = __builtin_convertvector(*reinterpret_cast<const Half*>(w + e + L), D);
      s0 += a * a;
      s1 += b * b;
    }
  } else {
    for (; e + 2 * L <= n; e += 2 * L) {
      const D a = load(w + e), b = load(w + e + L);
      s0 += a * a;
      s1 += b * b;
    }
    for (; e + L <= n; e += L) {
      const D a = load(w + e);
      s0 += a * a;
    }
  }
  double sum = horizontal_sum<double>(s0 + s1);
  for (; e < n; ++e) sum += static_cast<double>(w[e]) * static_cast<double>(w[e]);
  return sum;
}

// out[i] = Q_i . w for i < rows over the entries [begin, end); returns w . w over them (double).
template <class T>
LOWRANK_CPU_CLONES double multi_dot(const T* Q, int64_t stride, int64_t rows, const T* w, int64_t begin,
                                    int64_t end, T* out) {
  const int64_t n = end - begin;
  const T* q[kGroup];
  int64_t i = 0;
  for (; i + kGroup <= rows; i += kGroup) {
    for (int r = 0; r < kGroup; ++r) q[r] = Q + (i + r) * stride + begin;
    dot_group<kGroup>(q, w + begin, n, out + i);
  }
  for (; i < rows; ++i) {
    q[0] = Q + i * stride + begin;
    dot_group<1>(q, w + begin, n, out + i);
  }
  return squared_norm(w + begin, n);
}

// y += sum_i c[i] Q_i over the entries [begin, end); returns y . y over them (double).  The rows
// go last to first, the reverse of multi_dot's order: when the basis outgrows L2 (5 MB at
// Darcy 128 x 128 against 2 MB per core), the rows the dots read last are still cached
// for the update, and the rows the update reads last are the first the next step's dots
// need.  Measured on one Arnoldi cycle at 128 x 128 (contended machine): median 462-466
// against 474-478 us per step; the SpMV's own 1.2 MB evicts much of the rest.
template <class T>
LOWRANK_CPU_CLONES double multi_axpy(const T* Q, int64_t stride, int64_t rows, const T* c, T* y, int64_t begin,
                                     int64_t end) {
  const int64_t n = end - begin;
  const T* q[kGroup];
  int64_t i = rows;
  for (; i >= kGroup; i -= kGroup) {
    for (int r = 0; r < kGroup; ++r) q[r] = Q + (i - kGroup + r) * stride + begin;
    axpy_group<kGroup>(q, c + i - kGroup, y + begin, n);
  }
  for (; i > 0; --i) {
    q[0] = Q + (i - 1) * stride + begin;
    axpy_group<1>(q, c + i - 1, y + begin, n);
  }
  return squared_norm(y + begin, n);
}

// sums[r * K + k] = q[r] . w[k] over [0, n): an R x K tile of products, each of the R + K
// vectors loaded once per SIMD step (4 x 3: 7 loads for 12 FMAs, against 5 for 4 with one
// column at a time).
template <int R, int K, class T>
LOWRANK_INLINE void dot_tile(const T* const* q, const T* const* w, int64_t n, T* sums) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> s[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) s[r][k] = Vec<T>{};
  int64_t e = 0;
  for (; e + L <= n; e += L) {
    Vec<T> wv[K];
    for (int k = 0; k < K; ++k) wv[k] = load(w[k] + e);
    for (int r = 0; r < R; ++r) {
      const Vec<T> qv = load(q[r] + e);
      for (int k = 0; k < K; ++k) s[r][k] += qv * wv[k];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) {
      T sum = horizontal_sum<T>(s[r][k]);
      for (int64_t t = e; t < n; ++t) sum += q[r][t] * w[k][t];
      sums[r * K + k] = sum;
    }
}

// y[k][e] += sum_r c[r * K + k] q[r][e] over [0, n): R rows into K outputs, each loaded once.
template <int R, int K, class T>
LOWRANK_INLINE void axpy_tile(const T* const* q, const T* c, T* const* y, int64_t n) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> cv[R][K];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) cv[r][k] = Vec<T>{} + c[r * K + k];
  int64_t e = 0;
  for (; e + L <= n; e += L) {
    Vec<T> acc[K];
    for (int k = 0; k < K; ++k) acc[k] = load(y[k] + e);
    for (int r = 0; r < R; ++r) {
      const Vec<T> qv = load(q[r] + e);
      for (int k = 0; k < K; ++k) acc[k] += cv[r][k] * qv;
    }
    for (int k = 0; k < K; ++k) store(y[k] + e, acc[k]);
  }
  for (; e < n; ++e)
    for (int k = 0; k < K; ++k) {
      T acc = y[k][e];
      for (int r = 0; r < R; ++r) acc += c[r * K + k] * q[r][e];
      y[k][e] = acc;
    }
}

// Tiles of the block kernels: kGroup rows of Q by up to kCols columns of the other operand.
constexpr int kCols = 3;

// out[r * cols + c] += Q_r . W_c for the columns [c0, c0 + K) over [block, block + n).
template <int K, class T>
LOWRANK_INLINE void gram_columns(const T* Q, int64_t q_stride, int64_t rows, const T* W, int64_t w_stride,
                                 int64_t cols, int64_t c0, int64_t block, int64_t n, T* out) {
  const T* q[kGroup];
  const T* w[K];
  T sums[kGroup * K];
  for (int k = 0; k < K; ++k) w[k] = W + (c0 + k) * w_stride + block;
  int64_t r = 0;
  for (; r + kGroup <= rows; r += kGroup) {
    for (int t = 0; t < kGroup; ++t) q[t] = Q + (r + t) * q_stride + block;
    dot_tile<kGroup, K>(q, w, n, sums);
    for (int t = 0; t < kGroup; ++t)
      for (int k = 0; k < K; ++k) out[(r + t) * cols + c0 + k] += sums[t * K + k];
  }
  for (; r < rows; ++r) {
    q[0] = Q + r * q_stride + block;
    dot_tile<1, K>(q, w, n, sums);
    for (int k = 0; k < K; ++k) out[r * cols + c0 + k] += sums[k];
  }
}

// Y_c += sum_r coef[r * cols + c] Q_r for the columns [c0, c0 + K) over [block, block + n).
template <int K, class T>
LOWRANK_INLINE void combine_columns(const T* Q, int64_t q_stride, int64_t rows, const T* coef, T* Y,
                                    int64_t y_stride, int64_t cols, int64_t c0, int64_t block, int64_t n) {
  const T* q[kGroup];
  T* y[K];
  T c[kGroup * K];
  for (int k = 0; k < K; ++k) y[k] = Y + (c0 + k) * y_stride + block;
  int64_t r = 0;
  for (; r + kGroup <= rows; r += kGroup) {
    for (int t = 0; t < kGroup; ++t) {
      q[t] = Q + (r + t) * q_stride + block;
      for (int k = 0; k < K; ++k) c[t * K + k] = coef[(r + t) * cols + c0 + k];
    }
    axpy_tile<kGroup, K>(q, c, y, n);
  }
  for (; r < rows; ++r) {
    q[0] = Q + r * q_stride + block;
    for (int k = 0; k < K; ++k) c[k] = coef[r * cols + c0 + k];
    axpy_tile<1, K>(q, c, y, n);
  }
}

// out[r * cols + c] = Q_r . W_c over [begin, end).  Blocked over the entries: each block of
// the rows of Q and W (kBlock entries each) is loaded once from memory and reused from L1/L2
// by all cols x rows products; unblocked, the basis would be streamed once per column of W
// (10 passes over 5 MB at Darcy 128 x 128).
template <class T>
LOWRANK_CPU_CLONES void gram_chunk(const T* Q, int64_t q_stride, int64_t rows, const T* W, int64_t w_stride,
                                   int64_t cols, int64_t begin, int64_t end, T* out) {
  std::fill(out, out + rows * cols, T(0));
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t n = std::min(kBlock, end - block);
    int64_t c = 0;
    for (; c + kCols <= cols; c += kCols) gram_columns<kCols>(Q, q_stride, rows, W, w_stride, cols, c, block, n, out);
    if (cols - c == 2) gram_columns<2>(Q, q_stride, rows, W, w_stride, cols, c, block, n, out);
    if (cols - c == 1) gram_columns<1>(Q, q_stride, rows, W, w_stride, cols, c, block, n, out);
  }
}

// Y_c (+)= sum_r coef[r * cols + c] Q_r over [begin, end), blocked over the entries as gram_chunk.
template <class T>
LOWRANK_CPU_CLONES void combine_chunk(const T* Q, int64_t q_stride, int64_t rows, const T* coef, T* Y,
                                      int64_t y_stride, int64_t cols, bool accumulate, int64_t begin,
                                      int64_t end) {
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t n = std::min(kBlock, end - block);
    if (!accumulate)
      for (int64_t c = 0; c < cols; ++c) std::fill(Y + c * y_stride + block, Y + c * y_stride + block + n, T(0));
    int64_t c = 0;
    for (; c + kCols <= cols; c += kCols) combine_columns<kCols>(Q, q_stride, rows, coef, Y, y_stride, cols, c, block, n);
    if (cols - c == 2) combine_columns<2>(Q, q_stride, rows, coef, Y, y_stride, cols, c, block, n);
    if (cols - c == 1) combine_columns<1>(Q, q_stride, rows, coef, Y, y_stride, cols, c, block, n);
  }
}

template <class T, class I>
LOWRANK_CPU_CLONES void spmv_rows(const I* row_ptr, const I* col_idx, const T* values, const T* x, T* y,
                                  int64_t n_cols, int64_t nnz, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    T sum = 0;
    const int64_t k_begin = clamped(row_ptr[r], nnz), k_end = std::max(k_begin, clamped(row_ptr[r + 1], nnz));
    for (int64_t k = k_begin; k < k_end; ++k) {
      const int64_t c = static_cast<int64_t>(col_idx[k]);
      if (c >= 0 && c < n_cols) sum += values[k] * x[c];
    }
    y[r] = sum;
  }
}

// [begin, end) of chunk `task` when n entries are split into chunks of `chunk`.
struct Range {
  int64_t begin, end;
};
inline Range chunk_range(int64_t task, int64_t chunk, int64_t n) {
  const int64_t begin = std::min(n, task * chunk);
  return {begin, std::min(n, begin + chunk)};
}

// One Gram-Schmidt pass (mode 0, 1 or 2 of krylov_cgs_pass) of w against rows [0, rows) of
// Q, split into n_chunks chunks; `partial` holds n_chunks * rows + rows entries (partial
// sums, then -h).  `before` runs first inside each chunk's task of the dots (modes 0, 1):
// the SpMV producing that chunk of w in the Arnoldi cycle.  Returns ||w||^2 before and
// after (0 for the half not run), accumulated in double (see squared_norm).
template <class T, class Before>
void cgs_pass(const T* Q, int64_t stride, int64_t rows, T* w, T* h, int64_t n, int64_t n_chunks, int threads,
              int mode, T* partial, double norms[2], const Before& before) {
  const int64_t chunk = (n + n_chunks - 1) / n_chunks;
  std::vector<double> chunk_norms(static_cast<size_t>(n_chunks));
  norms[0] = norms[1] = 0;
  if (mode != 2) {
    parallel_for(n_chunks, threads, [&](int64_t task) {
      const Range range = chunk_range(task, chunk, n);
      before(range);
      chunk_norms[task] = multi_dot(Q, stride, rows, w, range.begin, range.end, partial + task * rows);
    });
    for (int64_t i = 0; i < rows; ++i) {
      T sum = 0;
      for (int64_t task = 0; task < n_chunks; ++task) sum += partial[task * rows + i];
      h[i] = sum;
    }
    for (int64_t task = 0; task < n_chunks; ++task) norms[0] += chunk_norms[task];
  }
  if (mode == 1) return;
  // The update adds -h: w -= Q^T h with the same rounding (negation is exact).
  T* negated = partial + n_chunks * rows;  // after the partial sums: rows entries
  for (int64_t i = 0; i < rows; ++i) negated[i] = -h[i];
  parallel_for(n_chunks, threads, [&](int64_t task) {
    const Range range = chunk_range(task, chunk, n);
    chunk_norms[task] = multi_axpy(Q, stride, rows, negated, w, range.begin, range.end);
  });
  for (int64_t task = 0; task < n_chunks; ++task) norms[1] += chunk_norms[task];
}

void no_op(Range) {}

int chunk_threads(int num_threads, int64_t n_chunks) {
  return static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), n_chunks));
}

}  // namespace

void check_krylov_spmv_params(const KrylovSpmvParams& p) {
  LOWRANK_CHECK(p.n_rows >= 0 && p.n_cols >= 0, "krylov_spmv: sizes must be non-negative; got n_rows = ", p.n_rows,
                ", n_cols = ", p.n_cols);
  LOWRANK_CHECK(is_real_float(p.dtype), "krylov_spmv: dtype must be float32 or float64; got code ",
                static_cast<int>(p.dtype));
  LOWRANK_CHECK(p.nnz >= 0, "krylov_spmv: nnz must be non-negative; got ", p.nnz);
  LOWRANK_CHECK(p.n_rows == 0 || (p.row_ptr && p.y && (p.nnz == 0 || (p.col_idx && p.values && p.x))),
                "krylov_spmv: null pointer for a non-empty matrix");
}

void check_krylov_cgs_params(const KrylovCgsParams& p, bool needs_workspace) {
  LOWRANK_CHECK(p.rows >= 0 && p.n >= 0, "krylov_cgs_pass: sizes must be non-negative; got rows = ", p.rows,
                ", n = ", p.n);
  LOWRANK_CHECK(p.rows <= 1 || p.q_stride >= p.n, "krylov_cgs_pass: q_stride must be >= n; got ", p.q_stride,
                " < ", p.n);
  LOWRANK_CHECK(p.mode >= 0 && p.mode <= 2, "krylov_cgs_pass: mode must be 0, 1 or 2; got ", p.mode);
  LOWRANK_CHECK(p.n_chunks >= 1, "krylov_cgs_pass: n_chunks must be >= 1; got ", p.n_chunks);
  LOWRANK_CHECK(is_real_float(p.dtype), "krylov_cgs_pass: dtype must be float32 or float64; got code ",
                static_cast<int>(p.dtype));
  LOWRANK_CHECK(p.w && p.norms && (p.rows == 0 || (p.basis && p.h)) && (!needs_workspace || p.workspace),
                "krylov_cgs_pass: null pointer");
}

void krylov_spmv_cpu(const KrylovSpmvParams& p, int num_threads) {
  check_krylov_spmv_params(p);
  if (p.n_rows == 0) return;
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_type, [&](auto index_tag) {
      using I = typename decltype(index_tag)::type;
      const I* row_ptr = static_cast<const I*>(p.row_ptr);
      const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(num_threads, p.nnz / kMinWorkPerTask));
      const int64_t rows_per_task = (p.n_rows + tasks - 1) / tasks;
      parallel_for(tasks, num_threads, [&](int64_t task) {
        const Range range = chunk_range(task, rows_per_task, p.n_rows);
        spmv_rows<T, I>(row_ptr, static_cast<const I*>(p.col_idx), static_cast<const T*>(p.values),
                        static_cast<const T*>(p.x), static_cast<T*>(p.y), p.n_cols, p.nnz, range.begin,
                        range.end);
      });
    });
  });
}

void krylov_cgs_pass_cpu(const KrylovCgsParams& p, int num_threads) {
  check_krylov_cgs_params(p, true);
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    static_assert(std::is_same_v<acc_t<T>, T>, "Krylov kernels are float32/float64: accumulation in the element type");
    cgs_pass<T>(static_cast<const T*>(p.basis), p.q_stride, p.rows, static_cast<T*>(p.w), static_cast<T*>(p.h), p.n,
                p.n_chunks, chunk_threads(num_threads, p.n_chunks), p.mode, static_cast<T*>(p.workspace),
                static_cast<double*>(p.norms), no_op);
  });
}

void check_krylov_block_params(const KrylovBlockParams& p, bool needs_workspace) {
  LOWRANK_CHECK(p.rows >= 0 && p.cols >= 0 && p.n >= 0, "krylov_block: sizes must be non-negative; got rows = ",
                p.rows, ", cols = ", p.cols, ", n = ", p.n);
  LOWRANK_CHECK(p.mode == 0 || p.mode == 1, "krylov_block: mode must be 0 (gram) or 1 (combine); got ", p.mode);
  LOWRANK_CHECK((p.rows <= 1 || p.q_stride >= p.n) && (p.cols <= 1 || p.other_stride >= p.n),
                "krylov_block: row strides must be >= n = ", p.n, "; got ", p.q_stride, " and ", p.other_stride);
  LOWRANK_CHECK(p.n_chunks >= 1, "krylov_block: n_chunks must be >= 1; got ", p.n_chunks);
  LOWRANK_CHECK(is_real_float(p.dtype), "krylov_block: dtype must be float32 or float64; got code ",
                static_cast<int>(p.dtype));
  const bool empty = p.rows == 0 || p.cols == 0 || p.n == 0;
  LOWRANK_CHECK(empty || (p.basis && p.other && (p.mode == 0 ? p.out != nullptr : p.coef != nullptr) &&
                          (!needs_workspace || p.mode == 1 || p.workspace)),
                "krylov_block: null pointer");
}

void krylov_block_cpu(const KrylovBlockParams& p, int num_threads) {
  check_krylov_block_params(p, true);
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const T* Q = static_cast<const T*>(p.basis);
    const int64_t rows = p.rows, cols = p.cols, n = p.n;
    const int64_t chunk = (n + p.n_chunks - 1) / p.n_chunks;
    const int threads = chunk_threads(num_threads, p.n_chunks);
    if (p.mode == 0) {
      A* out = static_cast<A*>(p.out);
      if (rows == 0 || cols == 0) return;
      const T* W = static_cast<const T*>(p.other);
      A* partial = static_cast<A*>(p.workspace);  // [n_chunks][rows * cols]
      parallel_for(p.n_chunks, threads, [&](int64_t task) {
        const Range range = chunk_range(task, chunk, n);
        gram_chunk(Q, p.q_stride, rows, W, p.other_stride, cols, range.begin, range.end, partial + task * rows * cols);
      });
      for (int64_t i = 0; i < rows * cols; ++i) {
        A sum = 0;
        for (int64_t task = 0; task < p.n_chunks; ++task) sum += partial[task * rows * cols + i];
        out[i] = sum;
      }
      return;
    }
    T* Y = static_cast<T*>(p.other);
    const T* coef = static_cast<const T*>(p.coef);
    parallel_for(p.n_chunks, threads, [&](int64_t task) {
      const Range range = chunk_range(task, chunk, n);
      combine_chunk(Q, p.q_stride, rows, coef, Y, p.other_stride, cols, p.accumulate, range.begin, range.end);
    });
  });
}

void check_krylov_arnoldi_params(const KrylovArnoldiParams& p) {
  LOWRANK_CHECK(p.n >= 1, "krylov_arnoldi: n must be >= 1; got ", p.n);
  LOWRANK_CHECK(p.kc >= 0 && p.steps >= 1, "krylov_arnoldi: need kc >= 0 and steps >= 1; got kc = ", p.kc,
                ", steps = ", p.steps);
  LOWRANK_CHECK(p.q_stride >= p.n, "krylov_arnoldi: q_stride must be >= n = ", p.n, "; got ", p.q_stride);
  LOWRANK_CHECK(p.n_chunks >= 1 && p.n_chunks <= p.n, "krylov_arnoldi: n_chunks must be in [1, n = ", p.n, "]; got ",
                p.n_chunks);
  LOWRANK_CHECK(is_real_float(p.dtype), "krylov_arnoldi: dtype must be float32 or float64; got code ",
                static_cast<int>(p.dtype));
  LOWRANK_CHECK(std::isfinite(p.beta) && p.beta > 0, "krylov_arnoldi: beta must be a positive finite number; got ",
                p.beta);
  LOWRANK_CHECK(std::isfinite(p.bnorm) && p.bnorm > 0, "krylov_arnoldi: bnorm must be a positive finite number; got ",
                p.bnorm);
  LOWRANK_CHECK(p.target >= 0, "krylov_arnoldi: target must be >= 0; got ", p.target);
  LOWRANK_CHECK(p.nnz >= 0, "krylov_arnoldi: nnz must be non-negative; got ", p.nnz);
  LOWRANK_CHECK(p.row_ptr && (p.nnz == 0 || (p.col_idx && p.values)) && p.basis && p.r && p.hessenberg &&
                    p.rotated && p.g && p.givens && p.history && p.workspace,
                "krylov_arnoldi: null pointer");
}

KrylovArnoldiResult krylov_arnoldi_cpu(const KrylovArnoldiParams& p, int num_threads) {
  const PreferOwnPool own_pool;  // several tiny regions per step, no torch op in between (parallel.h)
  check_krylov_arnoldi_params(p);
  KrylovArnoldiResult result;
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_type, [&](auto index_tag) {
      using I = typename decltype(index_tag)::type;
      const I* row_ptr = static_cast<const I*>(p.row_ptr);
      const I* col_idx = static_cast<const I*>(p.col_idx);
      const T* values = static_cast<const T*>(p.values);
      T* basis = static_cast<T*>(p.basis);
      const int64_t n = p.n, kc = p.kc, steps = p.steps, stride = p.q_stride, ld = p.steps;
      const int threads = chunk_threads(num_threads, p.n_chunks);
      // At most kc + steps rows: the pass needs (n_chunks + 1) * (kc + steps) entries.
      T* partial = static_cast<T*>(p.workspace);
      T* h = partial + (p.n_chunks + 1) * (kc + steps);  // kc + steps
      T* correction = h + kc + steps;                                // kc + steps
      double* cosines = p.givens;
      double* sines = p.givens + steps;
      double* g = p.g;
      const T* r = static_cast<const T*>(p.r);
      const T beta = static_cast<T>(p.beta);
      T* v0 = basis + kc * stride;
      for (int64_t e = 0; e < n; ++e) v0[e] = r[e] / beta;
      g[0] = p.beta;
      int64_t j = 0;
      bool breakdown = false;
      while (j < steps) {
        const T* v = basis + (kc + j) * stride;
        T* w = basis + (kc + j + 1) * stride;
        const int64_t rows = kc + j + 1;
        double norms[2];
        cgs_pass<T>(basis, stride, rows, w, h, n, p.n_chunks, threads, 0, partial, norms, [&](Range range) {
          spmv_rows<T, I>(row_ptr, col_idx, values, v, w, n, p.nnz, range.begin, range.end);
        });
        const double norm_in = std::sqrt(std::max(norms[0], 0.0));
        double norm_out = std::sqrt(std::max(norms[1], 0.0));
        if (norm_out < kReorthogonalize * norm_in) {
          cgs_pass<T>(basis, stride, rows, w, correction, n, p.n_chunks, threads, 0, partial, norms, no_op);
          norm_out = std::sqrt(std::max(norms[1], 0.0));
          for (int64_t i = 0; i < rows; ++i) h[i] += correction[i];
        }
        for (int64_t i = 0; i < rows; ++i) p.hessenberg[i * ld + j] = static_cast<double>(h[i]);
        p.hessenberg[rows * ld + j] = norm_out;
        breakdown = !(norm_out > kBreakdown * norm_in);
        if (!breakdown) {
          const T scale = static_cast<T>(norm_out);
          for (int64_t e = 0; e < n; ++e) w[e] = w[e] / scale;
        }
        // Givens: the previous rotations on the new column of Hbar, then zero h_{j+1,j}.
        double* column = p.rotated + j;  // R[i, j] = column[i * ld]
        for (int64_t i = 0; i <= j; ++i) column[i * ld] = static_cast<double>(h[kc + i]);
        for (int64_t i = 0; i < j; ++i) {
          const double a = column[i * ld], b = column[(i + 1) * ld];
          column[i * ld] = cosines[i] * a + sines[i] * b;
          column[(i + 1) * ld] = -sines[i] * a + cosines[i] * b;
        }
        const double a = column[j * ld], radius = std::hypot(a, norm_out);
        cosines[j] = radius == 0.0 ? 1.0 : a / radius;
        sines[j] = radius == 0.0 ? 0.0 : norm_out / radius;
        column[j * ld] = radius;
        g[j + 1] = -sines[j] * g[j];
        g[j] = cosines[j] * g[j];
        ++j;
        p.history[j - 1] = std::abs(g[j]) / p.bnorm;
        if (breakdown || std::abs(g[j]) <= p.target) break;
      }
      result.steps = j;
      result.breakdown = breakdown;
    });
  });
  return result;
}

namespace {

// CG's update pass over [begin, end): x += alpha p, r -= alpha q, z = d r (when d is given),
// sums[0] = r . r and sums[1] = r . z (r . r again without d) of the new r.
template <class T>
LOWRANK_CPU_CLONES void cg_update_chunk(T alpha, const T* p, const T* q, const T* d, T* x, T* r, T* z,
                                        int64_t begin, int64_t end, T* sums) {
  constexpr int64_t L = kLanes<T>;
  const Vec<T> a = Vec<T>{} + alpha;
  Vec<T> rr = Vec<T>{}, rz = Vec<T>{};
  int64_t e = begin;
  for (; e + L <= end; e += L) {
    const Vec<T> re = load(r + e) - a * load(q + e);
    store(x + e, load(x + e) + a * load(p + e));
    store(r + e, re);
    rr += re * re;
    if (d) {
      const Vec<T> ze = load(d + e) * re;
      store(z + e, ze);
      rz += re * ze;
    }
  }
  T rr_sum = horizontal_sum<T>(rr), rz_sum = horizontal_sum<T>(rz);
  for (; e < end; ++e) {
    const T re = r[e] - alpha * q[e];
    x[e] += alpha * p[e];
    r[e] = re;
    rr_sum += re * re;
    if (d) {
      z[e] = d[e] * re;
      rz_sum += re * z[e];
    }
  }
  sums[0] = rr_sum;
  sums[1] = d ? rz_sum : rr_sum;
}

// p = z + beta p over [begin, end).
template <class T>
LOWRANK_CPU_CLONES void cg_direction_chunk(T beta, const T* z, T* p, int64_t begin, int64_t end) {
  constexpr int64_t L = kLanes<T>;
  const Vec<T> b = Vec<T>{} + beta;
  int64_t e = begin;
  for (; e + L <= end; e += L) store(p + e, load(z + e) + b * load(p + e));
  for (; e < end; ++e) p[e] = z[e] + beta * p[e];
}

}  // namespace

void check_krylov_cg_params(const KrylovCgParams& p) {
  LOWRANK_CHECK(p.n >= 1, "krylov_cg: n must be >= 1; got ", p.n);
  LOWRANK_CHECK(p.steps >= 1, "krylov_cg: steps must be >= 1; got ", p.steps);
  LOWRANK_CHECK(p.n_chunks >= 1 && p.n_chunks <= p.n, "krylov_cg: n_chunks must be in [1, n = ", p.n, "]; got ",
                p.n_chunks);
  LOWRANK_CHECK(is_real_float(p.dtype), "krylov_cg: dtype must be float32 or float64; got code ",
                static_cast<int>(p.dtype));
  LOWRANK_CHECK(p.target >= 0, "krylov_cg: target must be >= 0; got ", p.target);
  LOWRANK_CHECK(std::isfinite(p.bnorm) && p.bnorm > 0, "krylov_cg: bnorm must be a positive finite number; got ",
                p.bnorm);
  LOWRANK_CHECK(p.nnz >= 0, "krylov_cg: nnz must be non-negative; got ", p.nnz);
  LOWRANK_CHECK((p.inverse_diagonal == nullptr) == (p.z == nullptr),
                "krylov_cg: inverse_diagonal and z must be both given or both null");
  LOWRANK_CHECK(p.row_ptr && (p.nnz == 0 || (p.col_idx && p.values)) && p.x && p.r && p.p && p.q && p.history &&
                    p.workspace,
                "krylov_cg: null pointer");
  LOWRANK_CHECK(p.deflation_rows >= 0, "krylov_cg: deflation_rows must be >= 0; got ", p.deflation_rows);
  LOWRANK_CHECK(p.deflation_rows == 0 || (p.deflation && p.deflation_product),
                "krylov_cg: deflation and deflation_product must be given when deflation_rows > 0");
  LOWRANK_CHECK(p.reproject_below >= 0, "krylov_cg: reproject_below must be >= 0; got ", p.reproject_below);
  LOWRANK_CHECK(p.record_rows >= 0, "krylov_cg: record_rows must be >= 0; got ", p.record_rows);
  LOWRANK_CHECK(p.record_rows == 0 || p.record, "krylov_cg: record must be given when record_rows > 0");
  LOWRANK_CHECK(!p.resume || p.rho, "krylov_cg: resume needs rho (r . z of the state it resumes)");
}

KrylovCgResult krylov_cg_cpu(const KrylovCgParams& p, int num_threads) {
  const PreferOwnPool own_pool;  // three tiny regions per step, no torch op in between (parallel.h)
  check_krylov_cg_params(p);
  KrylovCgResult result;
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_type, [&](auto index_tag) {
      using I = typename decltype(index_tag)::type;
      const I* row_ptr = static_cast<const I*>(p.row_ptr);
      const I* col_idx = static_cast<const I*>(p.col_idx);
      const T* values = static_cast<const T*>(p.values);
      const T* d = static_cast<const T*>(p.inverse_diagonal);
      const T* W = static_cast<const T*>(p.deflation);
      const T* AW = static_cast<const T*>(p.deflation_product);
      T* record = static_cast<T*>(p.record);
      T* x = static_cast<T*>(p.x);
      T* r = static_cast<T*>(p.r);
      T* dir = static_cast<T*>(p.p);
      T* q = static_cast<T*>(p.q);
      T* z = d ? static_cast<T*>(p.z) : r;
      const int64_t n = p.n, chunk = (n + p.n_chunks - 1) / p.n_chunks, kc = p.deflation_rows;
      const int64_t width = 2 + kc;  // per task: two sums, then AW . z
      T* partial = static_cast<T*>(p.workspace);  // [n_chunks][width]
      std::vector<T> scratch(p.n_chunks * (kc + 1)), coefficients(kc);  // per task: multi_dot's kc + 1 sums
      const int threads = chunk_threads(num_threads, p.n_chunks);
      auto reduce = [&](int64_t slot) {  // chunk order: deterministic for a given n_chunks
        T sum = 0;
        for (int64_t task = 0; task < p.n_chunks; ++task) sum += partial[width * task + slot];
        return sum;
      };
      auto deflation_dots = [&](int64_t task, const Range& range) {  // AW_i . z over range, into partial
        if (kc == 0) return;
        T* sums = scratch.data() + task * (kc + 1);
        T* out = partial + width * task + 2;
        multi_dot(AW, n, kc, z, range.begin, range.end, sums);
        for (int64_t i = 0; i < kc; ++i) out[i] = sums[i];
      };
      auto reduce_coefficients = [&]() {  // -AW^T z, the weights of W in the next direction
        for (int64_t i = 0; i < kc; ++i) coefficients[i] = -reduce(2 + i);
      };
      T rho;
      if (p.resume) {
        rho = static_cast<T>(*p.rho);
      } else {  // z = d r, rho = r . z, then p = z - W (AW^T z)
        parallel_for(p.n_chunks, threads, [&](int64_t task) {
          const Range range = chunk_range(task, chunk, n);
          T sum = 0;
          for (int64_t e = range.begin; e < range.end; ++e) {
            if (d) z[e] = d[e] * r[e];
            dir[e] = z[e];
            sum += r[e] * z[e];
          }
          partial[width * task] = sum;
          deflation_dots(task, range);
        });
        rho = reduce(0);
        if (kc) {
          reduce_coefficients();
          parallel_for(p.n_chunks, threads, [&](int64_t task) {
            const Range range = chunk_range(task, chunk, n);
            multi_axpy(W, n, kc, coefficients.data(), dir, range.begin, range.end);
          });
        }
      }
      result.status = 1;
      int64_t j = 0;
      while (j < p.steps) {
        parallel_for(p.n_chunks, threads, [&](int64_t task) {  // q = A p, p . q
          const Range range = chunk_range(task, chunk, n);
          spmv_rows<T, I>(row_ptr, col_idx, values, dir, q, n, p.nnz, range.begin, range.end);
          T sums[2];
          multi_dot(dir, 0, 1, q, range.begin, range.end, sums);  // sums[0] = p . q (sums[1]: q . q, unused)
          partial[width * task] = sums[0];
        });
        const T curvature = reduce(0);
        if (!(curvature > 0) || !(rho > 0) || !std::isfinite(static_cast<double>(curvature))) {
          result.status = 2;  // A (or M) is not positive definite, or returned NaN / inf
          break;
        }
        const T alpha = rho / curvature;
        T* row = j < p.record_rows ? record + j * n : nullptr;
        const T row_scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(rho)));
        parallel_for(p.n_chunks, threads, [&](int64_t task) {
          const Range range = chunk_range(task, chunk, n);
          if (row) {  // the Lanczos vector of this step, before the update overwrites z
            for (int64_t e = range.begin; e < range.end; ++e) row[e] = z[e] * row_scale;
          }
          cg_update_chunk<T>(alpha, dir, q, d, x, r, z, range.begin, range.end, partial + width * task);
          deflation_dots(task, range);
        });
        const T rr = reduce(0), rho_new = reduce(1), rho_old = rho;
        T beta = rho_new / rho;
        if (p.alphas) p.alphas[j] = static_cast<double>(alpha);
        if (p.betas) p.betas[j] = static_cast<double>(beta);
        rho = rho_new;
        const double rnorm = std::sqrt(static_cast<double>(rr));
        p.history[j++] = rnorm / p.bnorm;
        if (!std::isfinite(rnorm)) {
          result.status = 2;
          break;
        }
        if (rnorm <= p.target) {
          result.status = 0;
          break;
        }
        if (kc && rnorm < p.reproject_below) {  // restore W^T r = 0 (krylov.h), then z, rho, AW^T z anew
          parallel_for(p.n_chunks, threads, [&](int64_t task) {
            const Range range = chunk_range(task, chunk, n);
            T* sums = scratch.data() + task * (kc + 1);
            multi_dot(W, n, kc, r, range.begin, range.end, sums);
            for (int64_t i = 0; i < kc; ++i) partial[width * task + 2 + i] = sums[i];
          });
          for (int64_t i = 0; i < kc; ++i) coefficients[i] = reduce(2 + i);
          parallel_for(p.n_chunks, threads, [&](int64_t task) {
            const Range range = chunk_range(task, chunk, n);
            multi_axpy(W, n, kc, coefficients.data(), x, range.begin, range.end);
          });
          for (int64_t i = 0; i < kc; ++i) coefficients[i] = -coefficients[i];
          parallel_for(p.n_chunks, threads, [&](int64_t task) {
            const Range range = chunk_range(task, chunk, n);
            multi_axpy(AW, n, kc, coefficients.data(), r, range.begin, range.end);
            T sum = 0;
            for (int64_t e = range.begin; e < range.end; ++e) {
              if (d) z[e] = d[e] * r[e];
              sum += r[e] * z[e];
            }
            partial[width * task] = sum;
            deflation_dots(task, range);
          });
          const T rho_projected = reduce(0);
          beta = rho_projected / rho_old;
          rho = rho_projected;
          if (p.betas) p.betas[j - 1] = static_cast<double>(beta);
        }
        if (kc) reduce_coefficients();
        parallel_for(p.n_chunks, threads, [&](int64_t task) {
          const Range range = chunk_range(task, chunk, n);
          cg_direction_chunk<T>(beta, z, dir, range.begin, range.end);
          if (kc) multi_axpy(W, n, kc, coefficients.data(), dir, range.begin, range.end);
        });
      }
      if (p.rho) *p.rho = static_cast<double>(rho);
      result.steps = j;
    });
  });
  return result;
}

}  // namespace lowrank_ops
