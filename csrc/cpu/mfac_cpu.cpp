// CPU passes over the M-FAC gradient buffer: G x fused with the ring-buffer write
// (mfac_dots) and alpha x + beta G^T c (mfac_combine).  See lowrank_ops/mfac.h.
//
// Both passes are memory-bound streams over G (2 flops per element read): their floor
// is n_rows * dim * sizeof(storage) bytes each.  Tasks split the columns, never the
// rows: a task walks its column range in chunks of kChunk columns, and for each chunk
// visits every row.  The chunk of x (or of the output accumulators) stays in L1/L2 while
// the rows' chunks are streamed from memory once, so x is read once per pass instead of
// once per row (which would double the traffic for fp32 storage at k = 1).
//
// Accuracy: every sum runs in fp64 (lowrank_ops/mfac.h says why): the stored values and
// x are widened exactly, their products are exact in fp64 for fp32/bf16/fp16 data, and
// each chunk's dot product runs over 2 * N independent fp64 partial sums (N = 4 or 8
// lanes); chunk sums are accumulated per task and the tasks' partials summed in task
// order at the end (deterministic whichever thread ran a task, for a given N).  The
// combine rounds its fp64 result to the output type once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "lowrank_ops/cpu_features.h"
#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/mfac.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/simd.h"

namespace lowrank_ops {
namespace {

constexpr int64_t kChunk = 16384;         // columns per chunk: 64 KB of fp32 x, in L2
constexpr int64_t kAlign = 16;            // column-range boundaries: one 64-byte line of fp32
constexpr int64_t kSerialWork = 1 << 17;  // elements of G below which threads cost more than they save
// Fewest columns per thread (threads used to start at kChunk columns).  The fp32 dots
// pass at m = 32 rows on 2 cores, one thread -> two: dim 5000 8.7 -> 7.9 us, 10000
// 15 -> 10.5 us, 15000 29.5 -> 13 us (the buffer then fits the two cores' L2 together).
constexpr int64_t kMinTaskColumns = 2048;

// fp64 SIMD vectors through GCC/Clang vector extensions (simd.h): N = 4 lanes (32 bytes:
// one ymm register under the AVX2 / AVX-512 clones, two xmm registers on the baseline)
// in the cloned kernels, N = 8 (one zmm register) in the AVX-512 ones, chosen at run time
// (use_avx512).  Storage types with a vector load widen N elements exactly to fp64:
// float (one vcvtps2pd from memory), double, and bf16 (vpmovzxwd, a 16-bit shift,
// vcvtps2pd); fp16 takes the scalar path.  The widening loads are written element by
// element: the vectorizer then emits those single instructions in each kernel, where
// __builtin_convertvector from 4 floats came out as two 2-lane conversions and an insert.
// Written out because the auto-vectorizer handles the multi-row loops below poorly
// (measured 2x slower than this in cache).  Against the former fp32 sums: the same lanes
// per FMA on AVX-512 (8 fp64 lanes in a zmm against 8 fp32 in a ymm) plus one conversion
// per 8 elements of G; the passes stay memory-bound for fp32 storage (the measurement
// is in this branch's commit message).
template <int N>
using VecD = std::conditional_t<N == 4, Vec<double>, WideVec<double>>;

template <class T>
constexpr bool kWidens = std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, BFloat16Host>;

template <int N, class T, size_t... I>
LOWRANK_INLINE VecD<N> widen(const T* p, std::index_sequence<I...>) {
  return VecD<N>{static_cast<double>(to_acc(p[I]))...};
}
template <int N, class T>
LOWRANK_INLINE VecD<N> widen(const T* p) {
  return widen<N>(p, std::make_index_sequence<N>{});
}

// Unaligned moves through memcpy (simd.h: an aligned() typedef reached through a template
// parameter loses its alignment, and the aligned moves would fault).
template <int N>
LOWRANK_INLINE VecD<N> load_acc(const double* p) {
  VecD<N> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <int N>
LOWRANK_INLINE void store_acc(double* p, VecD<N> v) {
  __builtin_memcpy(p, &v, sizeof v);
}

template <int N>
LOWRANK_INLINE double horizontal_sum(VecD<N> v) {
  double sum = v[0];
  for (int lane = 1; lane < N; ++lane) sum += v[lane];
  return sum;
}

inline bool use_avx512() {
  static const bool avx512 = detect_cpu_features().avx512f;
  return avx512;
}

// Software prefetch of a buffer row kPrefetchBytes ahead of the loads: the hardware
// streamers stop at every 4 KB page and the kernels interleave several row streams, so
// without it each page starts with demand misses.  Measured on 2 Sapphire Rapids cores
// (m = 256, d = 1e5, buffer in L3), against torch's MKL GEMV in the same run: G x went
// from 0.83x to 1.04x its speed.  Harmless past the end (prefetches never fault).
constexpr int kPrefetchBytes = 2048;

template <class T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, 0, 3);
}

// out[r] = sum_c a[r][c] * b[c] over n elements in fp64, for kRows rows at once: each
// load of b feeds kRows multiply-adds, and 2 * kRows independent vector accumulators
// hide the FMA latency.  Every row is summed over 2 * N fp64 partial sums.  X: the type
// of b (the compute type: float or double).
template <class T, class X, int kRows, int N>
LOWRANK_INLINE void dot_rows_body(const T* const* a, const X* b, int64_t n, double* out) {
  int64_t c = 0;
  double tail[kRows] = {};
  if constexpr (kWidens<T>) {
    VecD<N> acc0[kRows] = {}, acc1[kRows] = {};
    for (; c + 2 * N <= n; c += 2 * N) {
      const VecD<N> b0 = widen<N>(b + c), b1 = widen<N>(b + c + N);
#pragma GCC unroll 8  // the accumulators stay in registers only when the rows are unrolled
      for (int r = 0; r < kRows; ++r) {
        prefetch_ahead(a[r] + c);
        acc0[r] += widen<N>(a[r] + c) * b0;
        acc1[r] += widen<N>(a[r] + c + N) * b1;
      }
    }
    for (int r = 0; r < kRows; ++r) tail[r] = horizontal_sum<N>(acc0[r] + acc1[r]);
  }
  for (; c < n; ++c)
    for (int r = 0; r < kRows; ++r) tail[r] += static_cast<double>(to_acc(a[r][c])) * static_cast<double>(b[c]);
  for (int r = 0; r < kRows; ++r) out[r] = tail[r];
}

// acc[c] += sum_r w[r] * a[r][c] over n elements in fp64, kRows rows per load and store of acc.
template <class T, int kRows, int N>
LOWRANK_INLINE void axpy_rows_body(const double* w, const T* const* a, double* acc, int64_t n) {
  int64_t c = 0;
  if constexpr (kWidens<T>) {
    for (; c + N <= n; c += N) {
      VecD<N> sum = load_acc<N>(acc + c);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        prefetch_ahead(a[r] + c);
        sum += w[r] * widen<N>(a[r] + c);
      }
      store_acc<N>(acc + c, sum);
    }
  }
  for (; c < n; ++c) {
    double sum = acc[c];
    for (int r = 0; r < kRows; ++r) sum += w[r] * static_cast<double>(to_acc(a[r][c]));
    acc[c] = sum;
  }
}

template <class T, class X, int kRows>
LOWRANK_CPU_CLONES void dot_rows_cloned(const T* const* a, const X* b, int64_t n, double* out) {
  dot_rows_body<T, X, kRows, 4>(a, b, n, out);
}
template <class T, class X, int kRows>
LOWRANK_AVX512 void dot_rows_avx512(const T* const* a, const X* b, int64_t n, double* out) {
  dot_rows_body<T, X, kRows, 8>(a, b, n, out);
}
template <class T, int kRows>
LOWRANK_CPU_CLONES void axpy_rows_cloned(const double* w, const T* const* a, double* acc, int64_t n) {
  axpy_rows_body<T, kRows, 4>(w, a, acc, n);
}
template <class T, int kRows>
LOWRANK_AVX512 void axpy_rows_avx512(const double* w, const T* const* a, double* acc, int64_t n) {
  axpy_rows_body<T, kRows, 8>(w, a, acc, n);
}

template <class T, class X, int kRows>
inline void dot_rows(bool avx512, const T* const* a, const X* b, int64_t n, double* out) {
  if (avx512) {
    dot_rows_avx512<T, X, kRows>(a, b, n, out);
  } else {
    dot_rows_cloned<T, X, kRows>(a, b, n, out);
  }
}
template <class T, int kRows>
inline void axpy_rows(bool avx512, const double* w, const T* const* a, double* acc, int64_t n) {
  if (avx512) {
    axpy_rows_avx512<T, kRows>(w, a, acc, n);
  } else {
    axpy_rows_cloned<T, kRows>(w, a, acc, n);
  }
}

constexpr int kRowGroup = 4;  // rows per dot_rows / axpy_rows call

// Splits [0, dim) into n_tasks ranges whose boundaries are multiples of kAlign.
inline int64_t range_begin(int64_t task, int64_t n_tasks, int64_t dim) {
  const int64_t units = (dim + kAlign - 1) / kAlign;
  return std::min(dim, (units * task / n_tasks) * kAlign);
}

inline int threads_for(int64_t elements, int num_threads, int64_t dim) {
  if (elements < kSerialWork) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, dim / kMinTaskColumns)));
}

// Column ranges per pass: up to kTasksPerThread per thread (at least kChunk columns
// each), claimed dynamically.  The buffer is streamed once per pass, so no range gains
// from staying on one core; what matters is that a thread kept off its core (by another
// process, or torch's OpenMP team spinning after its last op) delays the pass by one
// small range at most, the others taking the rest (parallel.h).
constexpr int64_t kTasksPerThread = 4;

inline int64_t tasks_for(int threads, int64_t dim) {
  if (threads <= 1) return 1;
  return std::max<int64_t>(threads, std::min<int64_t>(kTasksPerThread * threads, dim / kChunk));
}

template <class T>
void dots_typed(const MfacDotsParams& p, int num_threads) {
  using A = acc_t<T>;
  T* grads = static_cast<T*>(p.grads);
  const A* x = static_cast<const A*>(p.x);
  const int threads = threads_for(p.n_rows * p.dim * p.k, num_threads, p.dim);
  const int64_t n_tasks = tasks_for(threads, p.dim);
  const int64_t width = p.k * p.n_rows;
  const bool avx512 = use_avx512();
  std::vector<double> partial(static_cast<size_t>(n_tasks * width), 0.0);
  parallel_for(n_tasks, threads, [&](int64_t task) {
    const int64_t begin = range_begin(task, n_tasks, p.dim), end = range_begin(task + 1, n_tasks, p.dim);
    double* acc = partial.data() + task * width;
    // Storage exactly representing x (fp32, fp64) needs no rounded copy of x[0].
    constexpr bool kExact = std::is_same_v<T, A>;
    std::vector<A> rounded(p.write_slot >= 0 && !kExact ? static_cast<size_t>(kChunk) : 0);
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t n = std::min(kChunk, end - c0);
      if (p.write_slot >= 0) {
        // The ring-buffer write, fused into the pass: the new row is written while its
        // chunk of x is in cache, and read back rounded for the dots of x[0].
        T* row = grads + p.write_slot * p.grads_ld + c0;
        if constexpr (kExact) {
          // memmove: x[0] may be that very row (re-adding a stored gradient).
          if (static_cast<const void*>(row) != static_cast<const void*>(x + c0)) std::memmove(row, x + c0, n * sizeof(T));
        } else {
          for (int64_t c = 0; c < n; ++c) {
            row[c] = from_acc<T>(x[c0 + c]);
            rounded[static_cast<size_t>(c)] = to_acc(row[c]);
          }
        }
      }
      // Row groups outer, vectors inner: a group's chunks are read from memory once and
      // reused from L1 for every vector.
      for (int64_t i = 0; i < p.n_rows; i += kRowGroup) {
        const int64_t group = std::min<int64_t>(kRowGroup, p.n_rows - i);
        const T* rows[kRowGroup];
        for (int64_t r = 0; r < group; ++r) rows[r] = grads + (i + r) * p.grads_ld + c0;
        for (int64_t j = 0; j < p.k; ++j) {
          const A* xj = (j == 0 && p.write_slot >= 0 && !kExact) ? rounded.data() : x + j * p.x_ld + c0;
          double sums[kRowGroup];
          if (group == kRowGroup) {
            dot_rows<T, A, kRowGroup>(avx512, rows, xj, n, sums);
          } else {
            for (int64_t r = 0; r < group; ++r) dot_rows<T, A, 1>(avx512, rows + r, xj, n, sums + r);
          }
          for (int64_t r = 0; r < group; ++r) acc[j * p.n_rows + i + r] += sums[r];
        }
      }
    }
  });
  for (int64_t e = 0; e < width; ++e) {
    double sum = 0;
    for (int64_t t = 0; t < n_tasks; ++t) sum += partial[static_cast<size_t>(t * width + e)];
    if (p.wide) {
      static_cast<double*>(p.out)[e] = sum;
    } else {
      static_cast<A*>(p.out)[e] = static_cast<A>(sum);
    }
  }
}

template <class T>
void combine_typed(const MfacCombineParams& p, int num_threads) {
  using A = acc_t<T>;
  const T* grads = static_cast<const T*>(p.grads);
  const A* x = static_cast<const A*>(p.x);
  A* out = static_cast<A*>(p.out);
  const double alpha = p.alpha, beta = p.beta;
  // The coefficients in fp64 (a copy of k * n_rows values when given in the acc type).
  std::vector<double> widened;
  const double* coef = static_cast<const double*>(p.coef);
  if (!p.wide && !std::is_same_v<A, double>) {
    const A* given = static_cast<const A*>(p.coef);
    widened.assign(given, given + p.k * p.n_rows);
    coef = widened.data();
  }
  const bool avx512 = use_avx512();
  const int threads = threads_for(p.n_rows * p.dim * p.k, num_threads, p.dim);
  // Chunk width so that the k fp64 accumulator rows fit in L1 (32 KB).
  const int64_t chunk = std::max<int64_t>(kAlign, std::min<int64_t>(kChunk, (4096 / std::max<int64_t>(p.k, 1)) / kAlign * kAlign));
  const int64_t n_tasks = tasks_for(threads, p.dim);
  parallel_for(n_tasks, threads, [&](int64_t task) {
    const int64_t begin = range_begin(task, n_tasks, p.dim), end = range_begin(task + 1, n_tasks, p.dim);
    const int64_t width = std::min(chunk, end - begin);  // accumulator row length: no more than the range
    std::vector<double> acc(static_cast<size_t>(p.k * width));
    for (int64_t c0 = begin; c0 < end; c0 += chunk) {
      const int64_t n = std::min(chunk, end - c0);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t i = 0; i < p.n_rows; i += kRowGroup) {
        const int64_t group = std::min<int64_t>(kRowGroup, p.n_rows - i);
        const T* rows[kRowGroup];
        for (int64_t r = 0; r < group; ++r) rows[r] = grads + (i + r) * p.grads_ld + c0;
        for (int64_t j = 0; j < p.k; ++j) {
          const double* w = coef + j * p.n_rows + i;
          double* acc_j = acc.data() + j * width;
          if (group == kRowGroup) {
            axpy_rows<T, kRowGroup>(avx512, w, rows, acc_j, n);
          } else {
            for (int64_t r = 0; r < group; ++r) axpy_rows<T, 1>(avx512, w + r, rows + r, acc_j, n);
          }
        }
      }
      // alpha x + beta acc in fp64 (the cancellation of x - G^T c happens here), rounded once.
      for (int64_t j = 0; j < p.k; ++j) {
        A* y = out + j * p.out_ld + c0;
        const double* a = acc.data() + j * width;
        if (alpha == 0.0) {
          for (int64_t c = 0; c < n; ++c) y[c] = static_cast<A>(beta * a[c]);
        } else {
          const A* xj = x + j * p.x_ld + c0;
          for (int64_t c = 0; c < n; ++c) y[c] = static_cast<A>(alpha * static_cast<double>(xj[c]) + beta * a[c]);
        }
      }
    }
  });
}


}  // namespace

void check_mfac_dots_params(const MfacDotsParams& p) {
  LOWRANK_CHECK(p.n_rows >= 0 && p.dim >= 0 && p.k >= 0, "mfac_dots: sizes must be non-negative; got n_rows=",
                p.n_rows, ", dim=", p.dim, ", k=", p.k);
  LOWRANK_CHECK(p.write_slot >= -1 && p.write_slot < std::max<int64_t>(p.n_rows, 0),
                "mfac_dots: write_slot must be -1 or in [0, n_rows) = [0, ", p.n_rows, "); got ", p.write_slot);
  LOWRANK_CHECK(p.write_slot < 0 || p.k >= 1, "mfac_dots: write_slot needs k >= 1 vectors; got k=", p.k);
  LOWRANK_CHECK(p.grads_ld >= p.dim && p.x_ld >= p.dim, "mfac_dots: row strides must be >= dim=", p.dim,
                "; got grads_ld=", p.grads_ld, ", x_ld=", p.x_ld);
  LOWRANK_CHECK(p.n_rows * p.dim == 0 || p.grads != nullptr, "mfac_dots: grads must not be null");
  LOWRANK_CHECK(p.k * p.dim == 0 || p.x != nullptr, "mfac_dots: x must not be null");
  LOWRANK_CHECK(p.k * p.n_rows == 0 || p.out != nullptr, "mfac_dots: out must not be null");
}

void check_mfac_combine_params(const MfacCombineParams& p) {
  LOWRANK_CHECK(p.n_rows >= 0 && p.dim >= 0 && p.k >= 0, "mfac_combine: sizes must be non-negative; got n_rows=",
                p.n_rows, ", dim=", p.dim, ", k=", p.k);
  LOWRANK_CHECK(p.grads_ld >= p.dim && p.out_ld >= p.dim && (p.alpha == 0.0 || p.x_ld >= p.dim),
                "mfac_combine: row strides must be >= dim=", p.dim, "; got grads_ld=", p.grads_ld,
                ", x_ld=", p.x_ld, ", out_ld=", p.out_ld);
  LOWRANK_CHECK(p.n_rows * p.dim == 0 || p.grads != nullptr, "mfac_combine: grads must not be null");
  LOWRANK_CHECK(p.k * p.n_rows == 0 || p.coef != nullptr, "mfac_combine: coef must not be null");
  LOWRANK_CHECK(p.alpha == 0.0 || p.k * p.dim == 0 || p.x != nullptr,
                "mfac_combine: x must not be null when alpha != 0");
  LOWRANK_CHECK(p.k * p.dim == 0 || p.out != nullptr, "mfac_combine: out must not be null");
}

void mfac_dots_cpu(const MfacDotsParams& p, int num_threads) {
  check_mfac_dots_params(p);
  if (p.k == 0 || p.n_rows == 0) return;
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    dots_typed<typename decltype(tag)::type>(p, std::max(num_threads, 1));
  });
}

void mfac_combine_cpu(const MfacCombineParams& p, int num_threads) {
  check_mfac_combine_params(p);
  if (p.k == 0 || p.dim == 0) return;
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    combine_typed<typename decltype(tag)::type>(p, std::max(num_threads, 1));
  });
}

void mfac_apply_cpu(const MfacCombineParams& p, const double* U, int64_t u_ld, const void* products, int num_threads) {
  // The passes and the solve check their own arguments; only the buffers' sizes are needed first.
  LOWRANK_CHECK(p.n_rows >= 0 && p.k >= 0, "mfac_apply: sizes must be non-negative; got n_rows=", p.n_rows, ", k=", p.k);
  const int64_t count = p.k * p.n_rows;
  std::vector<double> coef(static_cast<size_t>(count));  // G_n x, then the solve's coefficients, in fp64
  if (products == nullptr) {
    MfacDotsParams d;
    d.grads = const_cast<void*>(p.grads);  // read only: write_slot = -1
    d.x = p.x;
    d.out = coef.data();
    d.n_rows = p.n_rows;
    d.dim = p.dim;
    d.k = p.k;
    d.grads_ld = p.grads_ld;
    d.x_ld = p.x_ld;
    d.dtype = p.dtype;
    d.wide = true;
    mfac_dots_cpu(d, num_threads);
  } else {
    const double* given = static_cast<const double*>(products);
    std::copy(given, given + count, coef.begin());
  }
  mfac_cholesky_solve_cpu(U, u_ld, coef.data(), p.n_rows, p.n_rows, p.k);
  MfacCombineParams c = p;
  c.coef = coef.data();
  c.wide = true;
  mfac_combine_cpu(c, num_threads);
}

void mfac_cholesky_solve_cpu(const double* U, int64_t u_ld, double* B, int64_t b_ld, int64_t n, int64_t k) {
  LOWRANK_CHECK(n >= 0 && k >= 0, "mfac_cholesky_solve: sizes must be non-negative; got n = ", n, ", k = ", k);
  if (n == 0 || k == 0) return;
  LOWRANK_CHECK(U != nullptr && B != nullptr, "mfac_cholesky_solve: null pointer");
  LOWRANK_CHECK(u_ld >= n && b_ld >= n, "mfac_cholesky_solve: row strides must be >= n = ", n, "; got u_ld = ", u_ld,
                ", b_ld = ", b_ld);
  for (int64_t row = 0; row < k; ++row) {
    double* b = B + row * b_ld;
    // U^T y = b, column-oriented: row j of U is contiguous.
    for (int64_t j = 0; j < n; ++j) {
      const double* u = U + j * u_ld;
      const double yj = b[j] / u[j];
      b[j] = yj;
      for (int64_t i = j + 1; i < n; ++i) b[i] -= u[i] * yj;
    }
    // U x = y, as dot products with the rows of U.
    for (int64_t i = n - 1; i >= 0; --i) {
      const double* u = U + i * u_ld;
      double sum = b[i];
      for (int64_t j = i + 1; j < n; ++j) sum -= u[j] * b[j];
      b[i] = sum / u[i];
    }
  }
}

int64_t mfac_cholesky_factor_cpu(double* A, int64_t a_ld, int64_t n) {
  LOWRANK_CHECK(n >= 0, "mfac_cholesky_factor: n must be non-negative; got ", n);
  if (n == 0) return 0;
  LOWRANK_CHECK(A != nullptr, "mfac_cholesky_factor: null pointer");
  LOWRANK_CHECK(a_ld >= n, "mfac_cholesky_factor: a_ld must be >= n = ", n, "; got ", a_ld);
  // Right-looking, by rows of U: row k of U is row k of the updated trailing matrix over
  // its pivot; then every later row i takes away U[k, i] * U[k, i:] (contiguous axpys).
  for (int64_t k = 0; k < n; ++k) {
    double* uk = A + k * a_ld;
    double kk = uk[k];  // A's diagonal entry: the pivot plus the squares taken away (column k of U so far)
    for (int64_t j = 0; j < k; ++j) kk += A[j * a_ld + k] * A[j * a_ld + k];
    if (!mfac_valid_pivot(uk[k], kk, n)) return k + 1;
    const double pivot = std::sqrt(uk[k]);
    const double inv = 1.0 / pivot;
    uk[k] = pivot;
    for (int64_t j = k + 1; j < n; ++j) uk[j] *= inv;
    for (int64_t i = k + 1; i < n; ++i) {
      double* ai = A + i * a_ld;
      const double f = uk[i];
      for (int64_t j = i; j < n; ++j) ai[j] -= f * uk[j];
    }
  }
  for (int64_t i = 1; i < n; ++i) std::fill(A + i * a_ld, A + i * a_ld + i, 0.0);
  return 0;
}

bool mfac_cholesky_replace_cpu(double* U, int64_t u_ld, int64_t n, int64_t s, const double* row, double* work) {
  LOWRANK_CHECK(n >= 1 && s >= 0 && s < n, "mfac_cholesky_replace: need 0 <= s < n; got s = ", s, ", n = ", n);
  LOWRANK_CHECK(U != nullptr && row != nullptr && work != nullptr, "mfac_cholesky_replace: null pointer");
  LOWRANK_CHECK(u_ld >= n, "mfac_cholesky_replace: u_ld must be >= n = ", n, "; got ", u_ld);
  const int64_t p = n - s - 1;  // size of the trailing block
  double* y = work;             // [s]: the new column s above the diagonal
  double* up = work + s;        // [p]: the old row s right of the diagonal (added back)
  double* down = up + p;        // [p]: the new one (taken out)
  // y = U11^-T row[:s] (forward substitution, column-oriented on the rows of U11).
  std::copy(row, row + s, y);
  for (int64_t j = 0; j < s; ++j) {
    const double* u = U + j * u_ld;
    y[j] /= u[j];
    for (int64_t i = j + 1; i < s; ++i) y[i] -= u[i] * y[j];
  }
  double diag = row[s];
  for (int64_t j = 0; j < s; ++j) diag -= y[j] * y[j];
  if (!mfac_valid_pivot(diag, row[s], n)) return false;
  diag = std::sqrt(diag);
  // New row s right of the diagonal: (row[s+1:] - U13^T y) / diag, accumulated over the rows of U13.
  std::copy(row + s + 1, row + n, down);
  for (int64_t j = 0; j < s; ++j) {
    const double* u = U + j * u_ld + s + 1;
    const double yj = y[j];
    for (int64_t i = 0; i < p; ++i) down[i] -= u[i] * yj;
  }
  for (int64_t i = 0; i < p; ++i) down[i] /= diag;
  double* urow = U + s * u_ld;
  std::copy(urow + s + 1, urow + n, up);
  for (int64_t j = 0; j < s; ++j) U[j * u_ld + s] = y[j];
  urow[s] = diag;
  std::copy(down, down + p, urow + s + 1);
  // Trailing block: U33^T U33 + up up^T - down down^T, one sweep of its rows, each row
  // receiving the update rotation and then the (hyperbolic) downdate rotation of its
  // column.  Doing the update first keeps every intermediate positive definite, so only
  // the final matrix's definiteness (K's) can fail the downdate.
  for (int64_t k = 0; k < p; ++k) {
    double* u = U + (s + 1 + k) * u_ld + s + 1;
    const int64_t rest = p - k - 1;
    {
      const double r = std::hypot(u[k], up[k]);
      const double c = r / u[k], sn = up[k] / u[k], inv_c = u[k] / r;
      u[k] = r;
      double* a = u + k + 1;
      double* v = up + k + 1;
      for (int64_t i = 0; i < rest; ++i) {
        const double ai = (a[i] + sn * v[i]) * inv_c;
        v[i] = c * v[i] - sn * ai;
        a[i] = ai;
      }
    }
    {
      const double d2 = (u[k] - down[k]) * (u[k] + down[k]);
      if (!mfac_valid_pivot(d2, u[k] * u[k], n)) return false;
      const double r = std::sqrt(d2);
      const double c = r / u[k], sn = down[k] / u[k], inv_c = u[k] / r;
      u[k] = r;
      double* a = u + k + 1;
      double* v = down + k + 1;
      for (int64_t i = 0; i < rest; ++i) {
        const double ai = (a[i] - sn * v[i]) * inv_c;
        v[i] = c * v[i] - sn * ai;
        a[i] = ai;
      }
    }
  }
  return true;
}

}  // namespace lowrank_ops
