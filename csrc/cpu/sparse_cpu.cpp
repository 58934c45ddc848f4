// CPU kernels for fixed-support sparse matrices: CSR SpMM / SpMV and SDDMM.
//
// Layout strategy.  The dense operand arrives as [batch, n_cols] with arbitrary
// strides.  For each tile of kTile batch rows we pack the tile transposed into a
// thread-local [n_cols, kTile] buffer in the accumulation type, so that every stored
// entry (r, c, v) of the sparse matrix becomes one contiguous kTile-wide
// multiply-add: acc[0:kTile] += v * packed[c, 0:kTile].  The packed tile
// (n_cols * kTile * 4 bytes, 350 KB for n_cols = 5461) stays in L2, so the gathers
// driven by the column indices hit cache instead of memory.
//
// Roofline (fp32, batch N, nnz entries, n_rows x n_cols):
//   SpMM  : 2 * N * nnz flops; compulsory bytes 4 * (N * (n_cols + n_rows) + 2 * nnz).
//           At density 3% the kernel is compute/L2-bound: ~1 vector FMA per entry per tile.
//   SDDMM : 2 * N * nnz flops; compulsory bytes 4 * (N * (n_cols + n_rows) + 2 * nnz).
// The hot loops are compiled for several ISAs (target_clones) and picked at load time.
//
// Threads: rows are split into blocks of about equal work (nnz + rows), so skewed
// patterns (one long row) do not leave a thread idle; tiles x row blocks are the tasks.

// gather16 returns a 64-byte vector; it is inlined into its AVX-512 caller, never called across the ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "lowrank_ops/clamp.h"
#include "lowrank_ops/cpu_features.h"
#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/simd.h"
#include "lowrank_ops/sparse.h"

namespace lowrank_ops {
namespace {

constexpr int64_t kTile = 16;       // batch rows per SpMM tile (one 64-byte line of fp32)
constexpr int64_t kSddmmTile = 32;  // batch rows per SDDMM tile (amortizes the horizontal sum)
constexpr int64_t kSmallBatch = 4;  // below this, tiles would be mostly padding: gather directly
constexpr int64_t kSerialWork = 1 << 16;  // multiply-adds below which threads cost more than they save

// Splits [0, n_rows) into at most n_blocks contiguous ranges of about equal cost,
// cost(row) = 1 + its nnz.  Returns n_blocks' + 1 boundaries.  Each boundary is a binary
// search over row_ptr (a linear scan was ~1 us of a 40 us SpMV at 2048 rows); on a
// corrupt (non-monotone) row_ptr the search still lands in range and the boundaries are
// kept non-decreasing, so the blocks always partition [0, n_rows).
template <class I>
std::vector<int64_t> balanced_row_blocks(const I* row_ptr, int64_t n_rows, int64_t nnz, int64_t n_blocks) {
  std::vector<int64_t> bounds{0};
  n_blocks = std::max<int64_t>(1, std::min(n_blocks, n_rows));
  const int64_t total = nnz + n_rows;
  for (int64_t block = 1; block < n_blocks; ++block) {
    // The first r whose rows [0, r) cost at least block / n_blocks of the total.
    int64_t lo = bounds.back(), hi = n_rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if ((clamped(row_ptr[mid], nnz) + mid) * n_blocks >= block * total) hi = mid;
      else lo = mid + 1;
    }
    if (lo > bounds.back() && lo < n_rows) bounds.push_back(lo);
  }
  bounds.push_back(n_rows);
  return bounds;
}

// packed[c * width + j] = dense[(b0 + j), c] for j < nb, 0 for nb <= j < width.
// Blocked over columns so the destination lines of one block (kColumnBlock * width
// elements) stay in L1 while the nb source rows are streamed through.
template <class T, class A>
void pack_transposed(const T* dense, int64_t stride_b, int64_t stride_c, int64_t b0, int64_t nb,
                     int64_t n_cols, int64_t width, A* packed) {
  constexpr int64_t kColumnBlock = 64;
  if (nb < width) std::fill(packed, packed + n_cols * width, A(0));
  for (int64_t c0 = 0; c0 < n_cols; c0 += kColumnBlock) {
    const int64_t c1 = std::min(n_cols, c0 + kColumnBlock);
    for (int64_t j = 0; j < nb; ++j) {
      const T* row = dense + (b0 + j) * stride_b;
      for (int64_t c = c0; c < c1; ++c) packed[c * width + j] = to_acc(row[c * stride_c]);
    }
  }
}

// SIMD vectors: lowrank_ops/simd.h.
template <class A>
constexpr int kLanes = static_cast<int>(32 / sizeof(A));

template <class A>
inline Vec<A> load_vec(const A* p) {
  return *reinterpret_cast<const typename VecTraits<A>::unaligned*>(p);
}

// Entry k of a CSR row as (value, packed row pointer); entries out of range become
// 0 * packed[0], so the hot loop has no data-dependent branches.
template <class T, class I>
inline void load_entry(const I* col_idx, const T* values, int64_t n_cols, int64_t k, const acc_t<T>* packed,
                       acc_t<T>& v, const acc_t<T>*& x) {
  const uint64_t c = static_cast<uint64_t>(col_idx[k]);
  const bool ok = c < static_cast<uint64_t>(n_cols);
  v = ok ? to_acc(values[k]) : acc_t<T>(0);
  x = packed + (ok ? c : 0) * kTile;
}

// acc_out[r - r_begin][0:kTile] = sum over row r of v * packed[c][0:kTile], rows [r_begin, r_end).
// Four entries in flight with separate accumulators: a single accumulator would be
// bound by FMA latency (each multiply-add waiting for the previous one).
template <class T, class I>
LOWRANK_CPU_CLONES void spmm_rows_tile(const I* row_ptr, const I* col_idx, const T* values,
                                       int64_t nnz, int64_t n_cols, int64_t r_begin, int64_t r_end,
                                       const acc_t<T>* packed, acc_t<T>* acc_out) {
  using A = acc_t<T>;
  constexpr int kVecs = static_cast<int>(kTile) / kLanes<A>;
  for (int64_t r = r_begin; r < r_end; ++r) {
    Vec<A> acc0[kVecs] = {}, acc1[kVecs] = {}, acc2[kVecs] = {}, acc3[kVecs] = {};
    const int64_t k_begin = clamped(row_ptr[r], nnz), k_end = clamped(row_ptr[r + 1], nnz);
    int64_t k = k_begin;
    for (; k + 4 <= k_end; k += 4) {
      A v0, v1, v2, v3;
      const A *x0, *x1, *x2, *x3;
      load_entry<T, I>(col_idx, values, n_cols, k, packed, v0, x0);
      load_entry<T, I>(col_idx, values, n_cols, k + 1, packed, v1, x1);
      load_entry<T, I>(col_idx, values, n_cols, k + 2, packed, v2, x2);
      load_entry<T, I>(col_idx, values, n_cols, k + 3, packed, v3, x3);
      for (int q = 0; q < kVecs; ++q) {
        acc0[q] += v0 * load_vec(x0 + q * kLanes<A>);
        acc1[q] += v1 * load_vec(x1 + q * kLanes<A>);
        acc2[q] += v2 * load_vec(x2 + q * kLanes<A>);
        acc3[q] += v3 * load_vec(x3 + q * kLanes<A>);
      }
    }
    for (; k < k_end; ++k) {
      A v;
      const A* x;
      load_entry<T, I>(col_idx, values, n_cols, k, packed, v, x);
      for (int q = 0; q < kVecs; ++q) acc0[q] += v * load_vec(x + q * kLanes<A>);
    }
    A* dst = acc_out + (r - r_begin) * kTile;
    for (int q = 0; q < kVecs; ++q) {
      const Vec<A> sum = (acc0[q] + acc1[q]) + (acc2[q] + acc3[q]);
      for (int lane = 0; lane < kLanes<A>; ++lane) dst[q * kLanes<A> + lane] = sum[lane];
    }
  }
}

// sum_k values[k] * x[col_idx[k] * stride] over [k_begin, k_end), the SpMV inner loop.
// kWays partial sums: independent multiply-add chains (one running sum is bound by FMA
// latency) and a smaller rounding error.  kUnitStride: x contiguous, so the address is
// x + c (a runtime stride costs an integer multiply per entry: measured 1.7x slower).
template <bool kUnitStride, class T, class I>
LOWRANK_CPU_CLONES acc_t<T> gathered_dot(const I* col_idx, const T* values, const T* x, int64_t stride,
                                         int64_t n_cols, int64_t k_begin, int64_t k_end) {
  using A = acc_t<T>;
  constexpr int kWays = 16;
  A partial[kWays] = {};
  auto add = [&](int s, int64_t k) {
    const uint64_t c = static_cast<uint64_t>(col_idx[k]);
    if (c < static_cast<uint64_t>(n_cols)) partial[s] += to_acc(values[k]) * to_acc(x[kUnitStride ? c : c * stride]);
  };
  int64_t k = k_begin;
  for (; k + kWays <= k_end; k += kWays)
    for (int s = 0; s < kWays; ++s) add(s, k + s);
  for (int s = 0; k < k_end; ++k, ++s) add(s, k);
  A sum[4];
  for (int s = 0; s < 4; ++s) sum[s] = (partial[s] + partial[s + 4]) + (partial[s + 8] + partial[s + 12]);
  return (sum[0] + sum[2]) + (sum[1] + sum[3]);
}

#if defined(__x86_64__)
// GCC 12's avx512fintrin.h passes an undefined vector as the masked-off source of
// _mm512_reduce_add_ps and _mm512_insertf64x4; once they are inlined into the row loop
// below, -Wmaybe-uninitialized reports it (a false positive: those lanes are overwritten).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 16 entries' x values (out-of-range columns masked off: 0, never read) for int32 or
// int64 column indices; the same lanes either way, so both index types give the same sums.
__attribute__((target("avx512f"))) inline __m512 gather16(const int32_t* col_idx, const float* x, int64_t n_cols,
                                                           __mmask16 active) {
  const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(n_cols, INT32_MAX)));
  const __m512i index = _mm512_maskz_loadu_epi32(active, col_idx);
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), _mm512_mask_cmplt_epu32_mask(active, index, limit), index, x, 4);
}
__attribute__((target("avx512f"))) inline __m512 gather16(const int64_t* col_idx, const float* x, int64_t n_cols,
                                                           __mmask16 active) {
  const __m512i limit = _mm512_set1_epi64(n_cols);
  __m256 halves[2];
  for (int h = 0; h < 2; ++h) {
    const __mmask8 part = static_cast<__mmask8>(active >> (8 * h));
    const __m512i index = _mm512_maskz_loadu_epi64(part, col_idx + 8 * h);
    halves[h] = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), _mm512_mask_cmplt_epu64_mask(part, index, limit),
                                         index, x, 4);
  }
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(halves[0])),
                                             _mm256_castps_pd(halves[1]), 1));
}

// How far ahead of the gathers the index and value streams are prefetched, in entries
// (1 KB of float32 values): the gathers keep the hardware prefetcher from running far
// enough ahead on its own (measured 4096 x 11008, density 0.05, one thread: 767 us
// against 984 without, torch's MKL SpMV 877).  Prefetches past a row's end are hints into
// the next rows' entries (or past the arrays: prefetches never fault).
constexpr int64_t kPrefetchAhead = 256;

// The dot product with AVX-512 gathers, for float32 values and a contiguous x: 16
// entries per gather, two accumulators of 16 lanes.  Measured at 2048 x 5461, density
// 0.03, one thread: 154 us against 175 for the scalar loop and 195 for torch's CSR SpMV
// (MKL) in the same run.
template <class I>
__attribute__((target("avx512f"), always_inline)) inline float gathered_dot_avx512(
    const I* col_idx, const float* values, const float* x, int64_t n_cols, int64_t k_begin, int64_t k_end) {
  const __mmask16 all = 0xFFFF;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = k_begin;
  for (; k + 32 <= k_end; k += 32) {
    for (int64_t line = 0; line < 32 * static_cast<int64_t>(sizeof(I)); line += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(col_idx + k + kPrefetchAhead) + line);
    for (int64_t line = 0; line < 32 * static_cast<int64_t>(sizeof(float)); line += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(values + k + kPrefetchAhead) + line);
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + k), gather16(col_idx + k, x, n_cols, all), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(values + k + 16), gather16(col_idx + k + 16, x, n_cols, all), acc1);
  }
  for (; k < k_end; k += 16) {
    const __mmask16 tail = k_end - k >= 16 ? all : static_cast<__mmask16>((1u << (k_end - k)) - 1);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, values + k), gather16(col_idx + k, x, n_cols, tail), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

// One output of the SpMV path off the AVX-512 gathers: the scalar loop.
template <class T, class I>
acc_t<T> row_dot(const I* col_idx, const T* values, const T* x, int64_t stride, int64_t n_cols, int64_t k_begin,
                 int64_t k_end) {
  if (stride == 1) return gathered_dot<true>(col_idx, values, x, stride, n_cols, k_begin, k_end);
  return gathered_dot<false>(col_idx, values, x, stride, n_cols, k_begin, k_end);
}

// The addend of output (b, r), or 0 without one.
template <class A>
inline A addend_at(const CsrSpmmParams& p, int64_t b, int64_t r) {
  return p.addend ? static_cast<const A*>(p.addend)[b * p.addend_stride_b + r * p.addend_stride_r] : A(0);
}

#if defined(__x86_64__)
// Rows [r_begin, r_end) of the SpMV path with the AVX-512 gathers (float32, contiguous
// dense rows): one call per row block, the dot product inlined, so the per-row cost is
// the horizontal sum and the store (a call per row was ~20 % of the kernel at 2048 x
// 5461, density 0.03: about 160 entries per row).  The parameters are copied to locals
// first: read through `p` they were reloaded after every store to `out` (which may alias
// them, as far as the compiler knows), 5 % of the kernel at that shape.
template <class I>
__attribute__((target("avx512f"))) void spmv_rows_avx512(const CsrSpmmParams& p, int64_t r_begin, int64_t r_end) {
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const float* values = static_cast<const float*>(p.values);
  const float* dense = static_cast<const float*>(p.dense);
  const float* addend = static_cast<const float*>(p.addend);
  float* out = static_cast<float*>(p.out);
  const int64_t nnz = p.nnz, n_cols = p.n_cols, batch = p.batch, dense_stride_b = p.dense_stride_b;
  const int64_t out_stride_b = p.out_stride_b, out_stride_r = p.out_stride_r;
  const int64_t addend_stride_b = p.addend_stride_b, addend_stride_r = p.addend_stride_r;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t k_begin = clamped(row_ptr[r], nnz), k_end = std::max(k_begin, clamped(row_ptr[r + 1], nnz));
    for (int64_t b = 0; b < batch; ++b) {
      float acc = gathered_dot_avx512(col_idx, values, dense + b * dense_stride_b, n_cols, k_begin, k_end);
      if (addend != nullptr) acc = addend[b * addend_stride_b + r * addend_stride_r] + acc;
      out[b * out_stride_b + r * out_stride_r] = acc;
    }
  }
}
#pragma GCC diagnostic pop
#endif

template <class T, class I>
void spmm_cpu_typed(const CsrSpmmParams& p, int num_threads) {
  using A = acc_t<T>;
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const T* values = static_cast<const T*>(p.values);
  const T* dense = static_cast<const T*>(p.dense);
  T* out = static_cast<T*>(p.out);
  const int64_t work = p.batch * (p.nnz + p.n_rows);
  const int threads = work < kSerialWork ? 1 : num_threads;

  if (p.batch < kSmallBatch) {
    // SpMV-like: each output is one gathered dot product.  One row block per thread,
    // always the same block for the same thread, so repeated products (solver
    // iterations) find their slice of the pattern in that core's cache.
    const auto bounds = balanced_row_blocks(row_ptr, p.n_rows, p.nnz, threads);
    static const bool avx512 = detect_cpu_features().avx512f;
    parallel_for(static_cast<int64_t>(bounds.size()) - 1, threads, [&](int64_t block) {
#if defined(__x86_64__)
      if constexpr (std::is_same_v<T, float>) {
        if (avx512 && p.dense_stride_c == 1) return spmv_rows_avx512<I>(p, bounds[block], bounds[block + 1]);
      }
#endif
      for (int64_t r = bounds[block]; r < bounds[block + 1]; ++r) {
        const int64_t k_begin = clamped(row_ptr[r], p.nnz), k_end = std::max(k_begin, clamped(row_ptr[r + 1], p.nnz));
        for (int64_t b = 0; b < p.batch; ++b) {
          const A acc = row_dot(col_idx, values, dense + b * p.dense_stride_b, p.dense_stride_c, p.n_cols,
                                k_begin, k_end);
          out[b * p.out_stride_b + r * p.out_stride_r] = from_acc<T>(addend_at<A>(p, b, r) + acc);
        }
      }
    });
    return;
  }

  const int64_t n_tiles = (p.batch + kTile - 1) / kTile;
  // Enough row blocks that tiles x blocks keeps every thread busy; each task re-packs
  // its tile, so do not split rows further than needed.
  const int64_t want_blocks = (4 * threads + n_tiles - 1) / n_tiles;
  const auto bounds = balanced_row_blocks(row_ptr, p.n_rows, p.nnz, want_blocks);
  const int64_t n_blocks = static_cast<int64_t>(bounds.size()) - 1;
  constexpr int64_t kRowChunk = 256;  // rows per write-back chunk (bounds the accumulator buffer)
  parallel_for(n_tiles * n_blocks, threads, [&](int64_t task) {
    const int64_t tile = task / n_blocks, block = task % n_blocks;
    const int64_t b0 = tile * kTile, nb = std::min(kTile, p.batch - b0);
    thread_local std::vector<A> packed, acc;
    packed.resize(static_cast<size_t>(std::max<int64_t>(p.n_cols, 1) * kTile));
    acc.resize(static_cast<size_t>(kRowChunk * kTile));
    pack_transposed(dense, p.dense_stride_b, p.dense_stride_c, b0, nb, p.n_cols, kTile, packed.data());
    for (int64_t r0 = bounds[block]; r0 < bounds[block + 1]; r0 += kRowChunk) {
      const int64_t r1 = std::min(r0 + kRowChunk, bounds[block + 1]);
      spmm_rows_tile<T, I>(row_ptr, col_idx, values, p.nnz, p.n_cols, r0, r1, packed.data(), acc.data());
      // Write back row-major in batch so each output row is touched contiguously in r.
      for (int64_t j = 0; j < nb; ++j) {
        T* y = out + (b0 + j) * p.out_stride_b;
        for (int64_t r = r0; r < r1; ++r)
          y[r * p.out_stride_r] = from_acc<T>(addend_at<A>(p, b0 + j, r) + acc[(r - r0) * kTile + j]);
      }
    }
  });
}

template <class A>
inline A horizontal_sum(Vec<A> v) {
  A sum = 0;
  for (int lane = 0; lane < kLanes<A>; ++lane) sum += v[lane];
  return sum;
}

// acc[k - k_base] += <left_packed[r], dense_packed[col(k)]> over one tile, rows [r_begin, r_end).
// Two entries in flight so their multiply-add chains overlap; the row's slice of
// `left` stays in registers.  Entries outside [k_base, k_limit) (possible only for a
// corrupt pattern) are skipped.
template <class I, class A>
LOWRANK_CPU_CLONES void sddmm_rows_tile(const I* row_ptr, const I* col_idx, int64_t nnz, int64_t n_cols,
                                        int64_t r_begin, int64_t r_end, int64_t k_base, int64_t k_limit,
                                        const A* left_packed, const A* dense_packed, A* acc) {
  constexpr int kVecs = static_cast<int>(kSddmmTile) / kLanes<A>;
  for (int64_t r = r_begin; r < r_end; ++r) {
    Vec<A> left[kVecs];
    for (int q = 0; q < kVecs; ++q) left[q] = load_vec(left_packed + (r - r_begin) * kSddmmTile + q * kLanes<A>);
    const int64_t k_begin = std::max(k_base, clamped(row_ptr[r], nnz));
    const int64_t k_end = std::min(k_limit, clamped(row_ptr[r + 1], nnz));
    int64_t k = k_begin;
    for (; k + 2 <= k_end; k += 2) {
      const uint64_t c0 = static_cast<uint64_t>(col_idx[k]), c1 = static_cast<uint64_t>(col_idx[k + 1]);
      // Out-of-range columns read row 0 and are multiplied by 0 (branch-free).
      const A w0 = c0 < static_cast<uint64_t>(n_cols) ? A(1) : A(0);
      const A w1 = c1 < static_cast<uint64_t>(n_cols) ? A(1) : A(0);
      const A* x0 = dense_packed + (w0 != A(0) ? c0 : 0) * kSddmmTile;
      const A* x1 = dense_packed + (w1 != A(0) ? c1 : 0) * kSddmmTile;
      Vec<A> s0 = left[0] * load_vec(x0), s1 = left[0] * load_vec(x1);
      for (int q = 1; q < kVecs; ++q) {
        s0 += left[q] * load_vec(x0 + q * kLanes<A>);
        s1 += left[q] * load_vec(x1 + q * kLanes<A>);
      }
      acc[k - k_base] += w0 * horizontal_sum<A>(s0);
      acc[k + 1 - k_base] += w1 * horizontal_sum<A>(s1);
    }
    for (; k < k_end; ++k) {
      const uint64_t c = static_cast<uint64_t>(col_idx[k]);
      if (c >= static_cast<uint64_t>(n_cols)) continue;
      const A* x = dense_packed + c * kSddmmTile;
      Vec<A> s = left[0] * load_vec(x);
      for (int q = 1; q < kVecs; ++q) s += left[q] * load_vec(x + q * kLanes<A>);
      acc[k - k_base] += horizontal_sum<A>(s);
    }
  }
}

template <class T, class I>
void sddmm_cpu_typed(const CsrSddmmParams& p, int num_threads) {
  using A = acc_t<T>;
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const T* left = static_cast<const T*>(p.left);
  const T* dense = static_cast<const T*>(p.dense);
  T* out = static_cast<T*>(p.out);
  const int64_t work = p.batch * p.nnz + p.n_rows;
  const int threads = work < kSerialWork ? 1 : num_threads;
  // Each block packs every dense tile, so use about two blocks per thread.
  const auto bounds = balanced_row_blocks(row_ptr, p.n_rows, p.nnz, 2 * threads);
  const int64_t n_blocks = static_cast<int64_t>(bounds.size()) - 1;
  // Each block's output range [k_bound[block], k_bound[block + 1]): a running maximum of the
  // clamped row pointers at the block bounds, so the ranges never overlap (with a row_ptr
  // that decreases somewhere, two blocks wrote the same entries from parallel tasks); for a
  // valid row_ptr these are its own values.
  std::vector<int64_t> k_bound(static_cast<size_t>(n_blocks) + 1);
  for (int64_t block = 0; block <= n_blocks; ++block) {  // bounds[block] <= n_rows: row_ptr has n_rows + 1 entries
    const int64_t k = clamped(row_ptr[bounds[block]], p.nnz);
    k_bound[block] = block == 0 ? k : std::max(k_bound[block - 1], k);
  }

  parallel_for(n_blocks, threads, [&](int64_t block) {
    const int64_t r_begin = bounds[block], r_end = bounds[block + 1];
    const int64_t k_begin = k_bound[block];
    const int64_t k_end = std::max(k_begin, k_bound[block + 1]);
    std::vector<A> acc(static_cast<size_t>(k_end - k_begin), A(0));
    if (p.batch < kSmallBatch) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t kb = std::max(k_begin, clamped(row_ptr[r], p.nnz));
        const int64_t ke = std::min(k_end, clamped(row_ptr[r + 1], p.nnz));
        for (int64_t k = kb; k < ke; ++k) {
          const uint64_t c = static_cast<uint64_t>(col_idx[k]);
          if (c >= static_cast<uint64_t>(p.n_cols)) continue;
          for (int64_t b = 0; b < p.batch; ++b)
            acc[k - k_begin] += to_acc(left[b * p.left_stride_b + r * p.left_stride_r]) *
                                to_acc(dense[b * p.dense_stride_b + c * p.dense_stride_c]);
        }
      }
    } else {
      std::vector<A> dense_packed(static_cast<size_t>(std::max<int64_t>(p.n_cols, 1) * kSddmmTile));
      std::vector<A> left_packed(static_cast<size_t>(std::max<int64_t>(r_end - r_begin, 1) * kSddmmTile));
      for (int64_t b0 = 0; b0 < p.batch; b0 += kSddmmTile) {
        const int64_t nb = std::min(kSddmmTile, p.batch - b0);
        pack_transposed(dense, p.dense_stride_b, p.dense_stride_c, b0, nb, p.n_cols, kSddmmTile,
                        dense_packed.data());
        pack_transposed(left + r_begin * p.left_stride_r, p.left_stride_b, p.left_stride_r, b0, nb,
                        r_end - r_begin, kSddmmTile, left_packed.data());
        sddmm_rows_tile<I, A>(row_ptr, col_idx, p.nnz, p.n_cols, r_begin, r_end, k_begin, k_end,
                              left_packed.data(), dense_packed.data(), acc.data());
      }
    }
    for (int64_t k = k_begin; k < k_end; ++k) out[k] = from_acc<T>(acc[k - k_begin]);
  });
  // Entries outside every block's range (invalid row pointers) are still written, as 0.
  const int64_t first = p.n_rows > 0 ? k_bound.front() : p.nnz;
  const int64_t last = p.n_rows > 0 ? std::max(first, k_bound.back()) : p.nnz;
  for (int64_t k = 0; k < first; ++k) out[k] = from_acc<T>(A(0));
  for (int64_t k = last; k < p.nnz; ++k) out[k] = from_acc<T>(A(0));
}

}  // namespace

void csr_spmm_cpu(const CsrSpmmParams& p, int num_threads) {
  check_spmm_params(p);
  if (p.batch == 0 || p.n_rows == 0) return;
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_type, [&](auto index_tag) {
      spmm_cpu_typed<T, typename decltype(index_tag)::type>(p, num_threads);
    });
  });
}

void csr_sddmm_cpu(const CsrSddmmParams& p, int num_threads) {
  check_sddmm_params(p);
  if (p.nnz == 0) return;
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_type, [&](auto index_tag) {
      sddmm_cpu_typed<T, typename decltype(index_tag)::type>(p, num_threads);
    });
  });
}

}  // namespace lowrank_ops
