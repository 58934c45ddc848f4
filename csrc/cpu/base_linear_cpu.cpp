// CPU kernels of the small-batch base products (contract: lowrank_ops/base_linear.h).
//
// Forward y = x W^T + b: dot products along the rows of W.  A tile of 4 rows of W x 4
// rows of x keeps 16 vector accumulators (lane partial sums) in registers; per vector
// step it loads 4 vectors of W and 4 of x for 16 multiply-adds, so each element of W
// fetched from memory serves every row of x from L1.  W is walked in chunks of
// kChunk columns, short enough that the chunk of x (rows x kChunk) also stays in L1;
// the 16 lane sums of a tile are reduced at once (wide_lane_sums) when its rows are
// done.  Tasks are blocks of W's rows.
//
// Optionally (weight_sumsq) the squared row norms of W come from the same pass: each
// chunk of a tile's 4 rows of W is squared into 4 more accumulators while it is in L1
// (the DoRA row norm needs ||W_o||^2 next to W A^T).
//
// Grad input dx = dy W: axpy form along the rows of W.  A tile of 4 rows of dx x 4
// vectors (64 columns) accumulates sum_o dy[n, o] W[o, k0:k0+64] over a chunk of
// kGradRowChunk rows of W, then adds the chunk's sum into dx: every W vector serves 4
// rows from registers and the other row tiles from L1, and the sum over `out` is
// blocked (chunk sums added), which keeps its rounding error at BLAS's level (one long
// running sum per element measured 5x BLAS's error at out = 4096).  Tasks are column
// ranges of dx (each thread owns its columns: no reduction between threads); the next
// 64 columns of each row are prefetched while the first row tile runs (the chunk's 128
// rows are 128 interleaved streams, more than the hardware prefetcher follows).
//
// Roofline, float32, N rows (N <= 64): 2 N in out flops and 4 in out bytes of W (x, y
// and dx are N / out or N / in of that).  Measured on the 2-core AVX-512 Xeon (quiet,
// 2 threads, N = 16, bench/results/cpu-intel-xeon-2core/base_linear-full), ours / MKL ms:
//   forward   4096 x 4096 2.78 / 5.09,  11008 x 4096 8.69 / 15.4,  4096 x 11008 8.87 / 14.3
//   grad in   4096 x 4096 2.88 / 3.44,  11008 x 4096 8.79 / 12.0,  4096 x 11008 11.4 / 12.1
// Floors there: W read once at the measured read bandwidth (41 GB/s for 64 MB resident
// in L3, 22 GB/s for 172 MB) = 1.5 / 7.8 / 7.8 ms; the flops at the measured GEMM peak
// (~300 GFLOP/s) = 1.8 / 4.8 / 4.8 ms.  So the forward runs at 65-90 % of the larger
// floor, the grad input at 62-89 %.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lowrank_ops/check.h"
#include "lowrank_ops/base_linear.h"
#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/dtype.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/simd.h"

namespace lowrank_ops {
namespace {

using Wide = WideVec<float>;
constexpr int64_t kLanes = kWideLanes<float>;  // 16
constexpr int64_t kTile = 4;                   // rows of W (forward) and of x / dx per register tile
constexpr int64_t kChunk = 256;                // forward: columns of W per step (4 rows x 1 KB of W in L1)
constexpr int64_t kGradVecs = 4;               // grad input: vectors of dx columns per tile (64 columns)
constexpr int64_t kGradRowChunk = 128;         // grad input: rows of W summed before adding into dx
constexpr int64_t kSerialWork = 1 << 18;       // multiply-adds (~30 us) below which one thread is faster

LOWRANK_INLINE Wide load(const float* p) { return *reinterpret_cast<const WideUnaligned<float>*>(p); }
LOWRANK_INLINE void store(float* p, Wide v) { *reinterpret_cast<WideUnaligned<float>*>(p) = v; }

int threads_for(int64_t multiply_adds, int num_threads) {
  return multiply_adds < kSerialWork ? 1 : std::max(num_threads, 1);
}

// ---------------------------------------------------------------------------- forward
// acc[4 j + i] += x[j, k0:k1] * w_i[k0:k1] (lane partial sums), j < kRows, i < 4.
template <int kRows>
LOWRANK_INLINE void forward_chunk(const float* const* w, const float* x, int64_t x_ld, int64_t k0, int64_t k1,
                                  Wide* acc) {
  Wide a[kRows * kTile];
  for (int t = 0; t < kRows * kTile; ++t) a[t] = acc[t];
  for (int64_t k = k0; k < k1; k += kLanes) {
    const Wide w0 = load(w[0] + k), w1 = load(w[1] + k), w2 = load(w[2] + k), w3 = load(w[3] + k);
    for (int j = 0; j < kRows; ++j) {
      const Wide xv = load(x + j * x_ld + k);
      a[kTile * j] += xv * w0;
      a[kTile * j + 1] += xv * w1;
      a[kTile * j + 2] += xv * w2;
      a[kTile * j + 3] += xv * w3;
    }
  }
  for (int t = 0; t < kRows * kTile; ++t) acc[t] = a[t];
}

// A chunk of 4 rows of W as float32: the rows themselves (float32), or their columns
// [k0, k1) widened into the tile's buffer (bfloat16: a 16-bit shift, which the
// vectorizer turns into vpmovzxwd + vpslld), so the products below run on float32 from
// L1 either way and each element of W is widened once per pass.
template <class WT>
LOWRANK_INLINE void weight_chunk(const WT* const* rows, int64_t k0, int64_t k1, float (*buffer)[kChunk],
                                 const float** chunk) {
  for (int64_t i = 0; i < kTile; ++i) {
    if constexpr (std::is_same_v<WT, float>) {
      chunk[i] = rows[i] + k0;
    } else {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(rows[i]) + k0;
      for (int64_t k = 0; k < k1 - k0; ++k) {
        const uint32_t u = static_cast<uint32_t>(bits[k]) << 16;
        std::memcpy(&buffer[i][k], &u, sizeof(float));
      }
      chunk[i] = buffer[i];
    }
  }
}

// Rows [o_begin, o_end) of y^T, in tiles of 4 rows of W (of type WT: float or BFloat16Host).
template <class WT>
LOWRANK_INLINE void forward_rows_typed(const SmallBatchLinearParams& p, int64_t o_begin, int64_t o_end) {
  const int64_t n_rows = p.rows, in = p.in_features, out = p.out_features;
  const int64_t k_vec = in / kLanes * kLanes;  // columns done with vectors; the rest is a scalar tail
  const int64_t n_tiles = (n_rows + kTile - 1) / kTile;
  const WT* weight = static_cast<const WT*>(p.weight);
  Wide acc[kSmallBatchMaxRows / kTile][kTile * kTile];
  alignas(64) float buffer[kTile][kChunk];  // bfloat16 W: the widened chunk
  for (int64_t o = o_begin; o < o_end; o += kTile) {
    const WT* w[kTile];
    for (int64_t i = 0; i < kTile; ++i) w[i] = weight + std::min(o + i, out - 1) * p.w_ld;  // past the end: a repeat, discarded
    for (int64_t t = 0; t < n_tiles; ++t)
      for (Wide& v : acc[t]) v = Wide{};
    Wide squares[kTile] = {};
    for (int64_t k0 = 0; k0 < k_vec; k0 += kChunk) {
      const int64_t k1 = std::min(k_vec, k0 + kChunk);
      const float* chunk[kTile];
      weight_chunk<WT>(w, k0, k1, buffer, chunk);
      if (p.weight_sumsq != nullptr)  // the chunk of W stays in L1 for the products below
        for (int64_t k = 0; k < k1 - k0; k += kLanes)
          for (int i = 0; i < kTile; ++i) {
            const Wide v = load(chunk[i] + k);
            squares[i] += v * v;
          }
      for (int64_t t = 0; t < n_tiles; ++t) {
        const float* x = p.x + t * kTile * p.x_ld + k0;
        switch (std::min(kTile, n_rows - t * kTile)) {
          case 4: forward_chunk<4>(chunk, x, p.x_ld, 0, k1 - k0, acc[t]); break;
          case 3: forward_chunk<3>(chunk, x, p.x_ld, 0, k1 - k0, acc[t]); break;
          case 2: forward_chunk<2>(chunk, x, p.x_ld, 0, k1 - k0, acc[t]); break;
          default: forward_chunk<1>(chunk, x, p.x_ld, 0, k1 - k0, acc[t]); break;
        }
      }
    }
    for (int64_t t = 0; t < n_tiles; ++t) {
      const Wide sums = wide_lane_sums<float>(acc[t]);  // lane 4 j + i: row t * 4 + j, output o + i
      for (int64_t j = 0; j < std::min(kTile, n_rows - t * kTile); ++j) {
        const int64_t n = t * kTile + j;
        const float* x = p.x + n * p.x_ld;
        for (int64_t i = 0; i < std::min(kTile, out - o); ++i) {
          float value = sums[kTile * j + i];
          for (int64_t k = k_vec; k < in; ++k) value += x[k] * to_acc(w[i][k]);
          if (p.bias != nullptr) value += p.bias[o + i];
          p.y[n * p.y_ld + o + i] = value;
        }
      }
    }
    if (p.weight_sumsq != nullptr) {
      for (int64_t i = 0; i < std::min(kTile, out - o); ++i) {
        float value = 0;
        for (int64_t l = 0; l < kLanes; ++l) value += squares[i][l];
        for (int64_t k = k_vec; k < in; ++k) value += to_acc(w[i][k]) * to_acc(w[i][k]);
        p.weight_sumsq[o + i] = value;
      }
    }
  }
}

LOWRANK_CPU_CLONES_DEFAULT_V4 void forward_rows(const SmallBatchLinearParams& p, int64_t o_begin, int64_t o_end) {
  if (p.weight_dtype == DType::bfloat16) {
    forward_rows_typed<BFloat16Host>(p, o_begin, o_end);
  } else {
    forward_rows_typed<float>(p, o_begin, o_end);
  }
}

// ---------------------------------------------------------------------------- grad input
// dx[j, k0 : k0 + 16 kVecs] (+)= sum_{o in [o0, o1)} dy[j, o] W[o, k0 : ...], j < kRows.
template <int kRows, int kVecs>
LOWRANK_INLINE void grad_tile(const SmallBatchGradInputParams& p, int64_t n0, int64_t o0, int64_t o1, int64_t k0,
                              bool first_chunk, bool prefetch) {
  Wide a[kRows][kVecs] = {};
  const float* dy = p.grad_y + n0 * p.gy_ld;
  for (int64_t o = o0; o < o1; ++o) {
    const float* row = p.weight + o * p.w_ld + k0;
    if (prefetch)  // the same row's next columns, for the next tile; a hint, never a fault
      for (int v = 0; v < kVecs; ++v) __builtin_prefetch(row + (kVecs + v) * kLanes);
    Wide w[kVecs];
    for (int v = 0; v < kVecs; ++v) w[v] = load(row + v * kLanes);
    for (int j = 0; j < kRows; ++j) {
      const float d = dy[j * p.gy_ld + o];
      for (int v = 0; v < kVecs; ++v) a[j][v] += d * w[v];
    }
  }
  for (int j = 0; j < kRows; ++j)
    for (int v = 0; v < kVecs; ++v) {
      float* target = p.grad_x + (n0 + j) * p.gx_ld + k0 + v * kLanes;
      store(target, first_chunk ? a[j][v] : load(target) + a[j][v]);
    }
}

template <int kVecs>
LOWRANK_INLINE void grad_tiles(const SmallBatchGradInputParams& p, int64_t o0, int64_t o1, int64_t k0) {
  for (int64_t n0 = 0; n0 < p.rows; n0 += kTile) {
    const bool first = o0 == 0, prefetch = n0 == 0;
    switch (std::min(kTile, p.rows - n0)) {
      case 4: grad_tile<4, kVecs>(p, n0, o0, o1, k0, first, prefetch); break;
      case 3: grad_tile<3, kVecs>(p, n0, o0, o1, k0, first, prefetch); break;
      case 2: grad_tile<2, kVecs>(p, n0, o0, o1, k0, first, prefetch); break;
      default: grad_tile<1, kVecs>(p, n0, o0, o1, k0, first, prefetch); break;
    }
  }
}

// Columns [k_begin, k_end) of dx (multiples of 16), all rows.
LOWRANK_CPU_CLONES_DEFAULT_V4 void grad_columns(const SmallBatchGradInputParams& p, int64_t k_begin, int64_t k_end) {
  constexpr int64_t kWidth = kGradVecs * kLanes;
  for (int64_t o0 = 0; o0 < p.out_features; o0 += kGradRowChunk) {
    const int64_t o1 = std::min(p.out_features, o0 + kGradRowChunk);
    int64_t k0 = k_begin;
    for (; k0 + kWidth <= k_end; k0 += kWidth) grad_tiles<kGradVecs>(p, o0, o1, k0);
    for (; k0 < k_end; k0 += kLanes) grad_tiles<1>(p, o0, o1, k0);
  }
}

// Columns [k_begin, in) that do not fill a vector: scalar, blocked over `out` as above.
void grad_tail_columns(const SmallBatchGradInputParams& p, int64_t k_begin) {
  for (int64_t n = 0; n < p.rows; ++n)
    for (int64_t k = k_begin; k < p.in_features; ++k) {
      float total = 0;
      for (int64_t o0 = 0; o0 < p.out_features; o0 += kGradRowChunk) {
        float chunk = 0;
        for (int64_t o = o0; o < std::min(p.out_features, o0 + kGradRowChunk); ++o)
          chunk += p.grad_y[n * p.gy_ld + o] * p.weight[o * p.w_ld + k];
        total += chunk;
      }
      p.grad_x[n * p.gx_ld + k] = total;
    }
}

void check_common(const char* op, int64_t rows, int64_t in, int64_t out, int64_t max_rows) {
  LOWRANK_CHECK(rows >= 0 && rows <= max_rows, op, ": rows must be in [0, ", max_rows, "]; got ", rows);
  LOWRANK_CHECK(in >= 0 && out >= 0, op, ": in_features and out_features must be >= 0; got ", in, " and ", out);
}

void check_matrix(const char* op, const char* name, const void* data, int64_t n_rows, int64_t n_cols, int64_t ld) {
  if (n_rows == 0 || n_cols == 0) return;
  LOWRANK_CHECK(data != nullptr, op, ": ", name, " must not be null for a ", n_rows, " x ", n_cols, " matrix");
  LOWRANK_CHECK(n_rows == 1 || ld >= n_cols, op, ": ", name, " row stride must be >= its ", n_cols,
                " columns; got ", ld);
}

}  // namespace

void small_batch_linear_cpu(const SmallBatchLinearParams& p, int num_threads) {
  const char* op = "small_batch_linear";
  check_common(op, p.rows, p.in_features, p.out_features, kSmallBatchMaxRows);
  check_matrix(op, "x", p.x, p.rows, p.in_features, p.x_ld);
  check_matrix(op, "weight", p.weight, p.out_features, p.in_features, p.w_ld);
  check_matrix(op, "y", p.y, p.rows, p.out_features, p.y_ld);
  LOWRANK_CHECK(p.weight_dtype == DType::float32 || p.weight_dtype == DType::bfloat16, op,
                ": weight dtype code must be 0 (float32) or 3 (bfloat16); got ", static_cast<int>(p.weight_dtype));
  if (p.out_features == 0 || (p.rows == 0 && p.weight_sumsq == nullptr)) return;
  const int threads = threads_for(std::max<int64_t>(p.rows, 1) * p.in_features * p.out_features, num_threads);
  const int64_t n_blocks = (p.out_features + kTile - 1) / kTile;
  const int64_t n_tasks = std::min<int64_t>(n_blocks, 8 * static_cast<int64_t>(threads));
  parallel_for(n_tasks, threads, [&](int64_t task) {
    const int64_t begin = n_blocks * task / n_tasks * kTile, end = std::min(p.out_features, n_blocks * (task + 1) / n_tasks * kTile);
    forward_rows(p, begin, end);
  });
}

void small_batch_linear_grad_input_cpu(const SmallBatchGradInputParams& p, int num_threads) {
  const char* op = "small_batch_linear_grad_input";
  check_common(op, p.rows, p.in_features, p.out_features, kSmallBatchGradMaxRows);
  check_matrix(op, "grad_y", p.grad_y, p.rows, p.out_features, p.gy_ld);
  check_matrix(op, "weight", p.weight, p.out_features, p.in_features, p.w_ld);
  check_matrix(op, "grad_x", p.grad_x, p.rows, p.in_features, p.gx_ld);
  if (p.rows == 0 || p.in_features == 0) return;
  if (p.out_features == 0) {  // an empty sum: the loops below would never write dx
    for (int64_t n = 0; n < p.rows; ++n) std::fill(p.grad_x + n * p.gx_ld, p.grad_x + n * p.gx_ld + p.in_features, 0.0f);
    return;
  }
  const int64_t k_vec = p.in_features / kLanes * kLanes;
  const int64_t n_vectors = k_vec / kLanes;
  const int threads = threads_for(p.rows * p.in_features * p.out_features, num_threads);
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(threads, n_vectors / kGradVecs));
  parallel_for(n_tasks, threads, [&](int64_t task) {
    const int64_t begin = n_vectors * task / n_tasks * kLanes, end = n_vectors * (task + 1) / n_tasks * kLanes;
    if (begin < end) grad_columns(p, begin, end);
    if (task == n_tasks - 1 && k_vec < p.in_features) grad_tail_columns(p, k_vec);
  });
}

}  // namespace lowrank_ops
