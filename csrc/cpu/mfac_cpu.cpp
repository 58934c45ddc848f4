// CPU passes over the M-FAC gradient buffer: G x fused with the ring-buffer write
// (mfac_dots) and alpha x + beta G^T c (mfac_combine).  See lowrank_ops/mfac.h.
//
// Both passes are memory-bound streams over G (2 flops per element read): their floor
// is n_rows * dim * sizeof(storage) bytes each.  Threads split the columns, never the
// rows: a thread walks its column range in chunks of kChunk columns, and for each chunk
// visits every row.  The chunk of x (or of the output accumulators) stays in L1 while
// the rows' chunks are streamed from memory once, so x is read once per pass instead of
// once per row (which would double the traffic for fp32 storage at k = 1).
//
// Accuracy: each chunk's dot product runs over kWays independent partial sums; chunk
// sums are accumulated per thread and the threads' partials summed at the end, so the
// rounding error grows with kChunk / kWays + dim / kChunk + threads, not with dim.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "lowrank_ops/mfac.h"
#include "lowrank_ops/parallel.h"

#define LOWRANK_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))

namespace lowrank_ops {
namespace {

constexpr int64_t kChunk = 2048;          // columns per chunk: 8 KB of fp32 x, in L1
constexpr int kWays = 16;                 // independent partial sums (one 64-byte line of fp32)
constexpr int64_t kSerialWork = 1 << 17;  // elements of G below which threads cost more than they save

// sum_c a[c] * b[c] over n elements.  The kWays-wide accumulator array is elementwise
// arithmetic the compiler turns into SIMD registers (a scalar running sum would be
// bound by FMA latency and could not be vectorized without reassociation).
template <class T>
LOWRANK_CPU_CLONES acc_t<T> dot(const T* a, const acc_t<T>* b, int64_t n) {
  using A = acc_t<T>;
  A partial[kWays] = {};
  int64_t c = 0;
  for (; c + kWays <= n; c += kWays)
    for (int s = 0; s < kWays; ++s) partial[s] += to_acc(a[c + s]) * b[c + s];
  for (int s = 0; c < n; ++c, ++s) partial[s] += to_acc(a[c]) * b[c];
  for (int width = kWays / 2; width > 0; width /= 2)
    for (int s = 0; s < width; ++s) partial[s] += partial[s + width];
  return partial[0];
}

// acc[c] += w * a[c] over n elements.
template <class T>
LOWRANK_CPU_CLONES void axpy(acc_t<T> w, const T* a, acc_t<T>* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += w * to_acc(a[c]);
}

// Splits [0, dim) into n_tasks ranges whose boundaries are multiples of kWays.
inline int64_t range_begin(int64_t task, int64_t n_tasks, int64_t dim) {
  const int64_t units = (dim + kWays - 1) / kWays;
  return std::min(dim, (units * task / n_tasks) * kWays);
}

inline int threads_for(int64_t elements, int num_threads, int64_t dim) {
  if (elements < kSerialWork) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, dim / kChunk + 1)));
}

template <class T>
void dots_typed(const MfacDotsParams& p, int num_threads) {
  using A = acc_t<T>;
  T* grads = static_cast<T*>(p.grads);
  const A* x = static_cast<const A*>(p.x);
  A* out = static_cast<A*>(p.out);
  const int threads = threads_for(p.n_rows * p.dim * p.k, num_threads, p.dim);
  const int64_t n_tasks = threads;
  const int64_t width = p.k * p.n_rows;
  std::vector<A> partial(static_cast<size_t>(n_tasks * width), A(0));
  parallel_for(n_tasks, threads, [&](int64_t task) {
    const int64_t begin = range_begin(task, n_tasks, p.dim), end = range_begin(task + 1, n_tasks, p.dim);
    A* acc = partial.data() + task * width;
    std::vector<A> rounded(p.write_slot >= 0 ? static_cast<size_t>(kChunk) : 0);
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t n = std::min(kChunk, end - c0);
      if (p.write_slot >= 0) {
        // The ring-buffer write, fused into the pass: the new row is written while its
        // chunk of x is in cache, and read back rounded for the dots of x[0].
        T* row = grads + p.write_slot * p.grads_ld + c0;
        for (int64_t c = 0; c < n; ++c) {
          row[c] = from_acc<T>(x[c0 + c]);
          rounded[static_cast<size_t>(c)] = to_acc(row[c]);
        }
      }
      for (int64_t i = 0; i < p.n_rows; ++i) {
        const T* row = grads + i * p.grads_ld + c0;
        for (int64_t j = 0; j < p.k; ++j) {
          const A* xj = (j == 0 && p.write_slot >= 0) ? rounded.data() : x + j * p.x_ld + c0;
          acc[j * p.n_rows + i] += dot(row, xj, n);
        }
      }
    }
  });
  for (int64_t e = 0; e < width; ++e) {
    A sum = 0;
    for (int64_t t = 0; t < n_tasks; ++t) sum += partial[static_cast<size_t>(t * width + e)];
    out[e] = sum;
  }
}

template <class T>
void combine_typed(const MfacCombineParams& p, int num_threads) {
  using A = acc_t<T>;
  const T* grads = static_cast<const T*>(p.grads);
  const A* coef = static_cast<const A*>(p.coef);
  const A* x = static_cast<const A*>(p.x);
  A* out = static_cast<A*>(p.out);
  const A alpha = static_cast<A>(p.alpha), beta = static_cast<A>(p.beta);
  const int threads = threads_for(p.n_rows * p.dim * p.k, num_threads, p.dim);
  // Chunk width so that the k accumulator rows fit in L1 (32 KB of fp32).
  const int64_t chunk = std::max<int64_t>(kWays, std::min<int64_t>(kChunk, (8192 / std::max<int64_t>(p.k, 1)) / kWays * kWays));
  parallel_for(threads, threads, [&](int64_t task) {
    const int64_t begin = range_begin(task, threads, p.dim), end = range_begin(task + 1, threads, p.dim);
    std::vector<A> acc(static_cast<size_t>(p.k * chunk));
    for (int64_t c0 = begin; c0 < end; c0 += chunk) {
      const int64_t n = std::min(chunk, end - c0);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t i = 0; i < p.n_rows; ++i) {
        const T* row = grads + i * p.grads_ld + c0;
        for (int64_t j = 0; j < p.k; ++j) axpy(coef[j * p.n_rows + i], row, acc.data() + j * chunk, n);
      }
      for (int64_t j = 0; j < p.k; ++j) {
        A* y = out + j * p.out_ld + c0;
        const A* a = acc.data() + j * chunk;
        if (alpha == A(0)) {
          for (int64_t c = 0; c < n; ++c) y[c] = beta * a[c];
        } else {
          const A* xj = x + j * p.x_ld + c0;
          for (int64_t c = 0; c < n; ++c) y[c] = alpha * xj[c] + beta * a[c];
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

}  // namespace lowrank_ops
