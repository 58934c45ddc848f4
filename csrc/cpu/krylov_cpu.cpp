// CPU kernels of the Krylov solvers; see csrc/include/lowrank_ops/krylov.h for the contract.
#include "lowrank_ops/krylov.h"

// dot() works on 32-byte vectors: it is inlined into its callers, so no vector value
// crosses a function boundary (the ABI -Wpsabi warns about).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <type_traits>

#include "lowrank_ops/check.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/simd.h"

namespace lowrank_ops {

namespace {

// Below this many stored entries (or basis entries) per task a second thread costs more
// than it saves (hand-off ~10 us against ~1 ns per entry).
constexpr int64_t kMinWorkPerTask = 1 << 16;

bool is_real_float(DType dtype) { return dtype == DType::float32 || dtype == DType::float64; }

// sum_e x[e] y[e] over [0, n) with four independent SIMD accumulators.  A plain
// `sum += x[e] * y[e]` loop is one serial chain of additions that strict IEEE semantics
// keep scalar: it ran the Gram-Schmidt pass at ~5 GFLOP/s and made it the largest cost
// of an Arnoldi step (cProfile of GCRO-DR on Darcy 64 x 64).
template <class A>
inline __attribute__((always_inline)) A dot(const A* x, const A* y, int64_t n) {
  using U = typename VecTraits<A>::unaligned;
  constexpr int64_t kLanes = static_cast<int64_t>(sizeof(Vec<A>) / sizeof(A));
  Vec<A> s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t e = 0;
  for (; e + 4 * kLanes <= n; e += 4 * kLanes) {
    s0 += *reinterpret_cast<const U*>(x + e) * *reinterpret_cast<const U*>(y + e);
    s1 += *reinterpret_cast<const U*>(x + e + kLanes) * *reinterpret_cast<const U*>(y + e + kLanes);
    s2 += *reinterpret_cast<const U*>(x + e + 2 * kLanes) * *reinterpret_cast<const U*>(y + e + 2 * kLanes);
    s3 += *reinterpret_cast<const U*>(x + e + 3 * kLanes) * *reinterpret_cast<const U*>(y + e + 3 * kLanes);
  }
  for (; e + kLanes <= n; e += kLanes) s0 += *reinterpret_cast<const U*>(x + e) * *reinterpret_cast<const U*>(y + e);
  const Vec<A> total = (s0 + s1) + (s2 + s3);
  A sum = 0;
  for (int64_t lane = 0; lane < kLanes; ++lane) sum += total[lane];
  for (; e < n; ++e) sum += x[e] * y[e];
  return sum;
}

template <class F>
void dispatch_real(DType dtype, F&& f) {
  if (dtype == DType::float32) {
    f(Tag<float>{});
  } else {
    f(Tag<double>{});
  }
}

template <class T, class I>
void spmv_rows(const KrylovSpmvParams& p, int64_t begin, int64_t end) {
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const T* values = static_cast<const T*>(p.values);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t r = begin; r < end; ++r) {
    T sum = 0;
    for (int64_t k = static_cast<int64_t>(row_ptr[r]); k < static_cast<int64_t>(row_ptr[r + 1]); ++k) {
      const int64_t c = static_cast<int64_t>(col_idx[k]);
      if (c >= 0 && c < p.n_cols) sum += values[k] * x[c];
    }
    y[r] = sum;
  }
}

}  // namespace

void check_krylov_spmv_params(const KrylovSpmvParams& p) {
  LOWRANK_CHECK(p.n_rows >= 0 && p.n_cols >= 0, "krylov_spmv: sizes must be non-negative; got n_rows = ", p.n_rows,
                ", n_cols = ", p.n_cols);
  LOWRANK_CHECK(is_real_float(p.dtype), "krylov_spmv: dtype must be float32 or float64; got code ",
                static_cast<int>(p.dtype));
  LOWRANK_CHECK(p.n_rows == 0 || (p.row_ptr && p.col_idx && p.values && p.x && p.y),
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
      const int64_t nnz = static_cast<int64_t>(static_cast<const I*>(p.row_ptr)[p.n_rows]);
      const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(num_threads, nnz / kMinWorkPerTask));
      const int64_t rows_per_task = (p.n_rows + tasks - 1) / tasks;
      parallel_for(tasks, num_threads, [&](int64_t task) {
        const int64_t begin = task * rows_per_task;
        spmv_rows<T, I>(p, begin, std::min(p.n_rows, begin + rows_per_task));
      });
    });
  });
}

void krylov_cgs_pass_cpu(const KrylovCgsParams& p, int num_threads) {
  check_krylov_cgs_params(p, true);
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    static_assert(std::is_same_v<A, T>, "Krylov kernels are float32/float64: accumulation in the element type");
    const T* Q = static_cast<const T*>(p.basis);
    T* w = static_cast<T*>(p.w);
    T* h = static_cast<T*>(p.h);
    A* partial = static_cast<A*>(p.workspace);  // [n_chunks][rows + 1]: dots, then ||w||^2
    A* norms = static_cast<A*>(p.norms);
    const int64_t rows = p.rows, n = p.n, width = rows + 1;
    const int64_t chunk = (n + p.n_chunks - 1) / p.n_chunks;
    const int threads = static_cast<int>(std::min<int64_t>(num_threads, p.n_chunks));
    A before = 0, after = 0;
    // Pass 1: partial dots of every basis row with the chunk of w, and of w with itself.
    if (p.mode != 2) {
    parallel_for(p.n_chunks, threads, [&](int64_t task) {
      const int64_t begin = task * chunk, end = std::min(n, begin + chunk);
      A* out = partial + task * width;
      for (int64_t i = 0; i < rows; ++i) out[i] = dot(Q + i * p.q_stride + begin, w + begin, end - begin);
      out[rows] = dot(w + begin, w + begin, end - begin);
    });
    for (int64_t i = 0; i < rows; ++i) {
      A sum = 0;
      for (int64_t task = 0; task < p.n_chunks; ++task) sum += partial[task * width + i];
      h[i] = static_cast<T>(sum);
    }
    for (int64_t task = 0; task < p.n_chunks; ++task) before += partial[task * width + rows];
    }
    // Pass 2: w -= Q^T h over the same chunks (rows of Q streamed in order), and ||w||^2.
    if (p.mode != 1) {
    parallel_for(p.n_chunks, threads, [&](int64_t task) {
      const int64_t begin = task * chunk, end = std::min(n, begin + chunk);
      for (int64_t i = 0; i < rows; ++i) {
        const T* q = Q + i * p.q_stride;
        const T coefficient = h[i];
        for (int64_t e = begin; e < end; ++e) w[e] -= coefficient * q[e];
      }
      partial[task * width] = dot(w + begin, w + begin, end - begin);
    });
    for (int64_t task = 0; task < p.n_chunks; ++task) after += partial[task * width];
    }
    norms[0] = before;
    norms[1] = after;
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
    const int threads = static_cast<int>(std::min<int64_t>(num_threads, p.n_chunks));
    if (p.mode == 0) {
      A* out = static_cast<A*>(p.out);
      if (rows == 0 || cols == 0) return;
      const T* W = static_cast<const T*>(p.other);
      A* partial = static_cast<A*>(p.workspace);  // [n_chunks][rows * cols]
      parallel_for(p.n_chunks, threads, [&](int64_t task) {
        const int64_t begin = task * chunk, end = std::min(n, begin + chunk);
        A* sums = partial + task * rows * cols;
        for (int64_t r = 0; r < rows; ++r) {
          const T* q = Q + r * p.q_stride;
          for (int64_t c = 0; c < cols; ++c) sums[r * cols + c] = dot(q + begin, W + c * p.other_stride + begin, end - begin);
        }
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
      const int64_t begin = task * chunk, end = std::min(n, begin + chunk);
      for (int64_t c = 0; c < cols; ++c) {
        T* y = Y + c * p.other_stride;
        if (!p.accumulate)
          for (int64_t e = begin; e < end; ++e) y[e] = T(0);
        for (int64_t r = 0; r < rows; ++r) {
          const T* q = Q + r * p.q_stride;
          const T a = coef[r * cols + c];
          for (int64_t e = begin; e < end; ++e) y[e] += a * q[e];
        }
      }
    });
  });
}

}  // namespace lowrank_ops
