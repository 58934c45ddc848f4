// CPU kernels for multi-adapter LoRA: segment_matmul (gathered shrink / expand) and
// segment_outer (per-adapter weight gradients).  Contract: lowrank_ops/lora_multi.h.
//
// Two register micro-kernels, written once over the SIMD width (64-byte vectors where
// the CPU has AVX-512, 32-byte ones elsewhere; chosen at run time, since a 4 x 2 tile of
// 64-byte accumulators would spill on AVX2's 16 registers):
// * broadcast form (tile_fma): a tile of R output rows x V vectors of output columns
//   accumulates sum_t a_q[t] * b[t, cols] in registers (broadcast a, vector b).  R x V is
//   4 x 2, or 8 x 1 when the output has at most one vector of columns (a rank of 16 or
//   less), so short rank rows do not waste half the multiply-adds on padding.
//     segment_matmul: a = the input rows, b = the adapter's weight, read in place when its
//       rows are unit-stride along c (dx += g A, g = s dy B), else from a copy packed
//       once per (adapter, column block) per call, the scale folded in (y += s h B^T).
//     segment_outer: t = row n of the adapter's segments, a and b a column and a row of
//       `left` / `right` (or, for dB, whose ranks are the output's unit-stride dimension,
//       of `right` / `left` once a block has a vector of ranks, so that every store is a
//       vector store); rows of every segment of the adapter are summed in the same
//       registers, in segment order, so the result is deterministic and no atomics are needed.
//   b is loaded in whole vectors wherever its rows hold that many readable columns (lanes
//   past the output's columns are computed and never stored), element by element otherwise.
// * dot form (dot_tile): 4 (AVX-512; 2 otherwise) input rows x 4 weight rows of
//   length-J dot products, lane partial sums reduced once at the end.  Used where W's
//   rows are unit-stride along j: always for h = x A^T (no packing, and any rank in
//   steps of 4), and for adapters with fewer than kPackMinRows rows (decode), where
//   packing would cost more than the products.
//
// Threads: the packing runs first (tasks: adapter x column block), then the products
// (tasks: segment x row chunk x column block, about 4 per thread; adapter x rank block x
// column block for segment_outer).  Work below kSerialWork multiply-adds runs on the caller.
//
// Roofline (fp32, N rows, in/out features, rank r per row): shrink 2 N r in flops,
// expand 2 N r out; compulsory bytes 4 (N in + N r + n_used r in) for the shrink,
// 4 (2 N out + N r + n_used r out) for the expand (y read and written).  At r <= 64
// both are memory-bound on a GPU and compute-bound (about r/2 flops per byte of x) on
// this CPU.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "lowrank_ops/cpu_features.h"
#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/lora_multi.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/simd.h"

namespace lowrank_ops {
namespace {

constexpr int64_t kSerialWork = 1 << 19;  // multiply-adds (~50 us) below which waking threads costs more than it saves
constexpr int64_t kPackElems = 1 << 16;   // packed weight block: 256 KB of fp32, L2-resident
constexpr int64_t kPackBlock = 32;        // weight rows per step of the packing transpose
constexpr int64_t kPackMinRows = 16;      // adapters with fewer rows use dot products instead of packing
constexpr int64_t kDotWeights = 4;        // weight rows per dot tile
constexpr int64_t kOuterColumns = 256;    // segment_outer column block per task
constexpr int64_t kOuterRanks = 32;       // segment_outer rank block per task

// SIMD vectors of kBytes bytes of the accumulation type A (GCC/Clang vector extensions).
// Loads and stores go through memcpy (unaligned vector moves): GCC drops the aligned()
// attribute of simd.h's "unaligned" types when they are reached through a template
// parameter, and would emit aligned moves that fault on rows at arbitrary offsets.
template <class A, int kBytes>
struct Simd;
template <class A>
struct Simd<A, 32> {
  using V = Vec<A>;
  static constexpr int64_t L = 32 / static_cast<int64_t>(sizeof(A));
};
template <class A>
struct Simd<A, 64> {
  using V = WideVec<A>;
  static constexpr int64_t L = kWideLanes<A>;
};

template <class V, class A>
LOWRANK_INLINE V load_unaligned(const A* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <class V, class A>
LOWRANK_INLINE void store_unaligned(A* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

inline bool use_avx512() {
  static const bool avx512 = detect_cpu_features().avx512f;
  return avx512;
}

// Columns of the 4 x 2 broadcast tile: the column-block and packing granularity.
template <class A, int kBytes>
constexpr int64_t kTileCols = 2 * Simd<A, kBytes>::L;

// Zeroed accumulators, one element at a time: a `= {}` initializer of the whole array is
// compiled into a `rep stos` block clear whose start-up (~35 cycles) cost as much as the
// multiply-adds of a short (rank-long) tile.
template <class V, int kCount>
LOWRANK_INLINE void zero(V (&acc)[kCount]) {
  for (int i = 0; i < kCount; ++i) acc[i] = V{};
}

template <class V, int kRows, int kVecs>
LOWRANK_INLINE void zero(V (&acc)[kRows][kVecs]) {
  for (int q = 0; q < kRows; ++q) zero(acc[q]);
}

// L elements from p (storage type T) widened to A.
template <class A, int kBytes, class T>
LOWRANK_INLINE typename Simd<A, kBytes>::V load_vec(const T* p) {
  using S = Simd<A, kBytes>;
  if constexpr (std::is_same_v<A, T>) {
    return load_unaligned<typename S::V>(p);
  } else {
    typename S::V v;
    for (int64_t l = 0; l < S::L; ++l) v[l] = to_acc(p[l]);
    return v;
  }
}

// The first `valid` elements of p (the rest 0).
template <class A, int kBytes, class T>
LOWRANK_INLINE typename Simd<A, kBytes>::V load_partial(const T* p, int64_t valid) {
  typename Simd<A, kBytes>::V v = {};
  for (int64_t l = 0; l < valid && l < Simd<A, kBytes>::L; ++l) v[l] = to_acc(p[l]);
  return v;
}

// dst[0:count] (+)= scale * row[...], count <= kVecs * L; whole vectors when T is the
// accumulation type and the vector is full, scalars otherwise.
template <class A, int kBytes, int kVecs, class T>
LOWRANK_INLINE void store_row(T* dst, const typename Simd<A, kBytes>::V* row, A scale, int64_t count, bool accumulate) {
  using S = Simd<A, kBytes>;
  for (int v = 0; v < kVecs; ++v) {
    const int64_t c0 = v * S::L;
    if (c0 >= count) return;
    if constexpr (std::is_same_v<A, T>) {
      if (count - c0 >= S::L) {
        const typename S::V result = scale * row[v];
        store_unaligned(dst + c0, accumulate ? load_unaligned<typename S::V>(dst + c0) + result : result);
        continue;
      }
    }
    for (int64_t l = c0; l < std::min(count, c0 + S::L); ++l) {
      const A value = scale * row[v][l - c0];
      dst[l] = from_acc<T>(accumulate ? to_acc(dst[l]) + value : value);
    }
  }
}

// L elements of p when kWhole, else its first `valid` ones (the rest 0).
template <class A, int kBytes, bool kWhole, class T>
LOWRANK_INLINE typename Simd<A, kBytes>::V load_cols(const T* p, int64_t valid) {
  if constexpr (kWhole) return load_vec<A, kBytes>(p);
  else return load_partial<A, kBytes>(p, valid);
}

template <class A, int kBytes, int kRows, int kVecs, bool kWhole, class TA, class TB>
LOWRANK_INLINE void tile_fma_loop(typename Simd<A, kBytes>::V (&acc)[kRows][kVecs], const TA* const* a,
                                  int64_t a_step, const TB* b, int64_t b_step, int64_t count, int64_t b_readable) {
  using S = Simd<A, kBytes>;
  for (int64_t t = 0; t < count; ++t) {
    const TB* row = b + t * b_step;
    typename S::V bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = load_cols<A, kBytes, kWhole>(row + v * S::L, b_readable - v * S::L);
    for (int q = 0; q < kRows; ++q) {
      const A s = to_acc(a[q][t * a_step]);
      for (int v = 0; v < kVecs; ++v) acc[q][v] += s * bv[v];
    }
  }
}

// acc[q][v] += sum_{t < count} a[q][t * a_step] * b[t * b_step + v * L + (0 .. L)] for
// q < kRows, v < kVecs.  b_readable: how many columns of each b row may be read.  With
// whole tiles readable the loads are full vectors, whatever columns the caller keeps
// (lanes past them are computed and never stored); otherwise only b_readable columns are
// loaded, element by element (the rest count as 0).
template <class A, int kBytes, int kRows, int kVecs, class TA, class TB>
LOWRANK_INLINE void tile_fma(typename Simd<A, kBytes>::V (&acc)[kRows][kVecs], const TA* const* a, int64_t a_step,
                             const TB* b, int64_t b_step, int64_t count, int64_t b_readable) {
  if (b_readable >= kVecs * Simd<A, kBytes>::L)
    tile_fma_loop<A, kBytes, kRows, kVecs, true>(acc, a, a_step, b, b_step, count, b_readable);
  else
    tile_fma_loop<A, kBytes, kRows, kVecs, false>(acc, a, a_step, b, b_step, count, b_readable);
}

// acc[q * 4 + k] += x[q][j0 : j0 + L] * w[k][j0 : j0 + L] (lane partial sums); a whole
// vector when kWhole, else the first `valid` elements.
template <class A, int kBytes, int kRows, bool kWhole, class T>
LOWRANK_INLINE void dot_step(const T* const* x, const T* const* w, int64_t j0, int64_t valid,
                             typename Simd<A, kBytes>::V* acc) {
  typename Simd<A, kBytes>::V wv[kDotWeights];
  for (int k = 0; k < kDotWeights; ++k) wv[k] = load_cols<A, kBytes, kWhole>(w[k] + j0, valid);
  for (int q = 0; q < kRows; ++q) {
    const typename Simd<A, kBytes>::V xv = load_cols<A, kBytes, kWhole>(x[q] + j0, valid);
    for (int k = 0; k < kDotWeights; ++k) acc[q * kDotWeights + k] += xv * wv[k];
  }
}

// result[q][w] = sum_{j < count} x[q][j] * w[w][j]: kRows x 4 dot products of unit-stride
// rows, lane partial sums in registers, reduced once.
template <class A, int kBytes, int kRows, class T>
LOWRANK_INLINE void dot_tile(const T* const* x, const T* const* w, int64_t count, A (&result)[kRows][kDotWeights]) {
  using S = Simd<A, kBytes>;
  typename S::V acc[kRows * kDotWeights];
  zero(acc);
  int64_t j = 0;
  for (; j + S::L <= count; j += S::L) dot_step<A, kBytes, kRows, true>(x, w, j, S::L, acc);
  if (j < count) dot_step<A, kBytes, kRows, false>(x, w, j, count - j, acc);
  constexpr int kAcc = kRows * kDotWeights;
  if constexpr (kBytes == 64 && kAcc % S::L == 0) {
    // Groups of L accumulators reduced together (2 (L - 1) shuffles per group, simd.h).
    for (int g = 0; g < kAcc; g += S::L) {
      const WideVec<A> sums = wide_lane_sums<A>(reinterpret_cast<const WideVec<A>*>(acc + g));
      for (int i = 0; i < S::L; ++i) result[(g + i) / kDotWeights][(g + i) % kDotWeights] = sums[i];
    }
  } else {
    for (int i = 0; i < kAcc; ++i) {
      A sum = 0;
      for (int64_t l = 0; l < S::L; ++l) sum += acc[i][l];
      result[i / kDotWeights][i % kDotWeights] = sum;
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ----------------------------------------------------------------------------- segment_matmul
enum class WeightRead { kInPlace, kPacked, kDots };

// Per adapter: its effective sizes, how its weight is read, and where its packed blocks are.
struct AdapterPlan {
  int64_t j_eff = 0, c_eff = 0, rows = 0;
  int64_t width = 0;         // columns per block (a multiple of the tile's columns)
  int64_t pack_offset = -1;  // first element of block 0 in the pack buffer, -1: not packed
  WeightRead read = WeightRead::kInPlace;
};

struct MatmulTask {
  int64_t segment, r0, r1, c0, c1;
};

template <class T>
struct MatmulContext {
  const SegmentMatmulParams& p;
  const std::vector<AdapterPlan>& adapters;
  const acc_t<T>* packed;
};

// out[r0:r1, c0:c1] (+)= scale * in[r0:r1, :count] b[:count, :] with the broadcast tile:
// 8 rows x 1 vector when the block has at most one vector of columns, else 4 x 2.
// b_columns: the columns of every b row that may be read, from b's column 0.
template <class T, int kBytes, int kRows, int kVecs, class TB>
LOWRANK_INLINE void broadcast_tiles(const SegmentMatmulParams& p, const MatmulTask& task, const TB* b, int64_t b_step,
                                    int64_t count, acc_t<T> scale, int64_t b_columns) {
  using A = acc_t<T>;
  constexpr int64_t cols = kVecs * Simd<A, kBytes>::L;
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  const int64_t n_cols = task.c1 - task.c0;
  // Columns outer, rows inner: the [count, cols] slice of b stays in L1 for every row
  // tile (rows outer streamed the whole [count, width] block from L2 per row tile).
  for (int64_t cc = 0; cc < n_cols; cc += cols) {
    const int64_t c_here = std::min(cols, n_cols - cc);
    for (int64_t n0 = task.r0; n0 < task.r1; n0 += kRows) {
      const int64_t n_here = std::min<int64_t>(kRows, task.r1 - n0);
      const T* rows[kRows];
      for (int q = 0; q < kRows; ++q) rows[q] = in + (n0 + std::min<int64_t>(q, n_here - 1)) * p.in_stride_n;
      typename Simd<A, kBytes>::V acc[kRows][kVecs];
      zero(acc);
      tile_fma<A, kBytes, kRows, kVecs, T, TB>(acc, rows, 1, b + cc, b_step, count, b_columns - cc);
      for (int64_t q = 0; q < n_here; ++q)
        store_row<A, kBytes, kVecs, T>(out + (n0 + q) * p.out_stride_n + task.c0 + cc, acc[q], scale, c_here,
                                       p.accumulate);
    }
  }
}

template <class T, int kBytes, class TB>
LOWRANK_INLINE void broadcast_rows(const SegmentMatmulParams& p, const MatmulTask& task, const TB* b, int64_t b_step,
                                   int64_t count, acc_t<T> scale, int64_t b_columns) {
  if (task.c1 - task.c0 <= Simd<acc_t<T>, kBytes>::L)
    broadcast_tiles<T, kBytes, 8, 1, TB>(p, task, b, b_step, count, scale, b_columns);
  else
    broadcast_tiles<T, kBytes, 4, 2, TB>(p, task, b, b_step, count, scale, b_columns);
}

// The tasks of one (segment, row range, column block): out rows [r0, r1), columns [c0, c1).
template <class T, int kBytes>
LOWRANK_INLINE void matmul_task(const MatmulContext<T>& ctx, const MatmulTask& task) {
  using A = acc_t<T>;
  const SegmentMatmulParams& p = ctx.p;
  const SegmentRouting& rt = p.routing;
  const int64_t id = rt.ids[task.segment];
  const AdapterPlan& plan = ctx.adapters[id];
  const A scale = static_cast<A>(rt.scales ? rt.scales[id] : 1.0);
  const int64_t n_cols = task.c1 - task.c0;
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  const T* w = static_cast<const T*>(p.w) + id * p.w_stride_a + task.c0 * p.w_stride_c;

  if (plan.read == WeightRead::kDots) {
    constexpr int kRows = kBytes == 64 ? 4 : 2;
    for (int64_t n0 = task.r0; n0 < task.r1; n0 += kRows) {
      const int64_t n_here = std::min<int64_t>(kRows, task.r1 - n0);
      const T* x[kRows];
      for (int q = 0; q < kRows; ++q) x[q] = in + (n0 + std::min<int64_t>(q, n_here - 1)) * p.in_stride_n;
      for (int64_t c = 0; c < n_cols; c += kDotWeights) {
        const T* w_rows[kDotWeights];
        for (int k = 0; k < kDotWeights; ++k) w_rows[k] = w + std::min<int64_t>(c + k, n_cols - 1) * p.w_stride_c;
        A result[kRows][kDotWeights];
        dot_tile<A, kBytes, kRows, T>(x, w_rows, plan.j_eff, result);
        for (int64_t q = 0; q < n_here; ++q) {
          T* dst = out + (n0 + q) * p.out_stride_n + task.c0 + c;
          for (int64_t k = 0; k < kDotWeights && c + k < n_cols; ++k) {
            const A value = scale * result[q][k];
            dst[k] = from_acc<T>(p.accumulate ? to_acc(dst[k]) + value : value);
          }
        }
      }
    }
    return;
  }

  // Broadcast form: b is W in place (unit stride along c) or the packed block (scale folded in).
  if (plan.read == WeightRead::kPacked) {
    const A* block = ctx.packed + plan.pack_offset + (task.c0 / plan.width) * plan.j_eff * plan.width;
    broadcast_rows<T, kBytes, A>(p, task, block, plan.width, plan.j_eff, A(1), plan.width);
  } else {
    broadcast_rows<T, kBytes, T>(p, task, w, p.w_stride_j, plan.j_eff, scale, p.C - task.c0);  // W rows hold C columns
  }
}

template <class T>
LOWRANK_AVX512 void matmul_task_avx512(const MatmulContext<T>& ctx, const MatmulTask& task) {
  matmul_task<T, 64>(ctx, task);
}

template <class T>
LOWRANK_CPU_CLONES_DEFAULT_V3 void matmul_task_avx2(const MatmulContext<T>& ctx, const MatmulTask& task) {
  matmul_task<T, 32>(ctx, task);
}

// packed[j * width + c] = scale * W(a, j, c0 + c) for one column block, zero past the
// adapter's columns.  A blocked transpose when W is unit-stride along j: kPackBlock
// source rows (c) stay in L1 and in the TLB while j runs along them.
template <class T>
void pack_block(const SegmentMatmulParams& p, const AdapterPlan& plan, int64_t id, int64_t c0, acc_t<T>* packed) {
  using A = acc_t<T>;
  const A scale = static_cast<A>(p.routing.scales ? p.routing.scales[id] : 1.0);
  const T* w = static_cast<const T*>(p.w) + id * p.w_stride_a + c0 * p.w_stride_c;
  const int64_t n_cols = std::min(plan.width, plan.c_eff - c0), width = plan.width;
  for (int64_t j = 0; j < plan.j_eff; ++j) std::fill(packed + j * width + n_cols, packed + (j + 1) * width, A(0));
  if (p.w_stride_j == 1) {
    for (int64_t cb = 0; cb < n_cols; cb += kPackBlock) {
      const int64_t ce = std::min(n_cols, cb + kPackBlock);
      for (int64_t j = 0; j < plan.j_eff; ++j)
        for (int64_t c = cb; c < ce; ++c) packed[j * width + c] = scale * to_acc(w[j + c * p.w_stride_c]);
    }
  } else {
    for (int64_t j = 0; j < plan.j_eff; ++j)
      for (int64_t c = 0; c < n_cols; ++c) packed[j * width + c] = scale * to_acc(w[j * p.w_stride_j + c * p.w_stride_c]);
  }
}

template <class T, int kBytes>
void segment_matmul_typed(const SegmentMatmulParams& p, int num_threads) {
  using A = acc_t<T>;
  constexpr int64_t TC = kTileCols<A, kBytes>;
  const SegmentRouting& rt = p.routing;
  std::vector<AdapterPlan> adapters(static_cast<size_t>(rt.n_adapters));
  for (int64_t a = 0; a < rt.n_adapters; ++a) {
    AdapterPlan& plan = adapters[a];
    plan.j_eff = p.rank_on_c ? p.J : rt.ranks[a];  // the rank truncates C (shrink) or J (expand)
    plan.c_eff = p.rank_on_c ? rt.ranks[a] : p.C;
  }
  int64_t work = 0;
  auto active = [&](int64_t s) {
    const int64_t id = rt.ids[s];
    return id >= 0 && adapters[id].j_eff > 0 && adapters[id].c_eff > 0 && rt.offsets[s + 1] > rt.offsets[s];
  };
  for (int64_t s = 0; s < rt.n_segments; ++s) {
    if (!active(s)) continue;
    AdapterPlan& plan = adapters[rt.ids[s]];
    plan.rows += rt.offsets[s + 1] - rt.offsets[s];
    work += (rt.offsets[s + 1] - rt.offsets[s]) * plan.j_eff * plan.c_eff;
  }
  const int threads = work < kSerialWork ? 1 : std::max(num_threads, 1);

  // How each used adapter's weight is read, and its column blocks.
  struct PackJob {
    int64_t adapter, c0;
  };
  std::vector<PackJob> pack_jobs;
  int64_t pack_elems = 0;
  for (int64_t a = 0; a < rt.n_adapters; ++a) {
    AdapterPlan& plan = adapters[a];
    if (plan.rows == 0) continue;
    if (p.w_stride_j == 1 && (p.rank_on_c || plan.rows < kPackMinRows))
      plan.read = WeightRead::kDots;
    else if (p.w_stride_c == 1)
      plan.read = WeightRead::kInPlace;
    else
      plan.read = WeightRead::kPacked;
    const int64_t cap = std::max(TC, kPackElems / plan.j_eff / TC * TC);
    plan.width = std::min(round_up(plan.c_eff, TC), cap);
    if (plan.read != WeightRead::kPacked) continue;
    plan.pack_offset = pack_elems;
    for (int64_t c0 = 0; c0 < plan.c_eff; c0 += plan.width) {
      pack_jobs.push_back({a, c0});
      pack_elems += plan.j_eff * plan.width;
    }
  }

  std::vector<MatmulTask> tasks;
  for (int64_t s = 0; s < rt.n_segments; ++s) {
    if (!active(s)) continue;
    const AdapterPlan& plan = adapters[rt.ids[s]];
    const int64_t n_col_blocks = ceil_div(plan.c_eff, plan.width);
    const int64_t rows = rt.offsets[s + 1] - rt.offsets[s];
    // Enough row chunks for ~4 tasks per thread, but never below 16 rows.
    const int64_t want_chunks = std::max<int64_t>(1, ceil_div(4 * threads, n_col_blocks));
    const int64_t chunk = round_up(std::max<int64_t>(16, ceil_div(rows, want_chunks)), 8);
    for (int64_t r0 = rt.offsets[s]; r0 < rt.offsets[s + 1]; r0 += chunk)
      for (int64_t c0 = 0; c0 < plan.c_eff; c0 += plan.width)
        tasks.push_back({s, r0, std::min(r0 + chunk, rt.offsets[s + 1]), c0, std::min(c0 + plan.width, plan.c_eff)});
  }

  // Uninitialized: pack_block writes every element (a zero-filling vector cost 4 % of the expand).
  const std::unique_ptr<A[]> packed(pack_elems > 0 ? new A[static_cast<size_t>(pack_elems)] : nullptr);
  if (!pack_jobs.empty()) {
    parallel_for(static_cast<int64_t>(pack_jobs.size()), threads, [&](int64_t i) {
      const PackJob& job = pack_jobs[i];
      const AdapterPlan& plan = adapters[job.adapter];
      pack_block<T>(p, plan, job.adapter, job.c0, packed.get() + plan.pack_offset + job.c0 / plan.width * plan.j_eff * plan.width);
    });
  }
  const MatmulContext<T> ctx{p, adapters, packed.get()};
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t i) {
    if constexpr (kBytes == 64)
      matmul_task_avx512<T>(ctx, tasks[i]);
    else
      matmul_task_avx2<T>(ctx, tasks[i]);
  });
}

// ----------------------------------------------------------------------------- segment_outer
struct OuterTask {
  int64_t adapter, k0, k1, j0, j1;
};

struct OuterContext {
  const SegmentOuterParams& p;
  const std::vector<int64_t>& first;  // segments of adapter a: order[first[a] .. first[a + 1])
  const std::vector<int64_t>& order;
};

// One orientation of the outer-product tile.  Tile rows index `row_operand`'s columns
// (broadcast), vectors run along `vec_operand`'s columns; both operands are read at the
// rows of the adapter's segments.  The output element (row i, column c) of adapter a is
// at a * out_stride_a + i * out_row_stride + c * out_col_stride.
template <class T, int kBytes, int kRows, int kVecs>
LOWRANK_INLINE void outer_tiles(const OuterContext& ctx, int64_t a, const T* row_operand, int64_t row_stride_n,
                                int64_t r0, int64_t r1, const T* vec_operand, int64_t vec_stride_n,
                                int64_t vec_columns, int64_t c0, int64_t c1, int64_t out_row_stride,
                                int64_t out_col_stride) {
  using A = acc_t<T>;
  using S = Simd<A, kBytes>;
  constexpr int64_t cols = kVecs * S::L;
  const SegmentOuterParams& p = ctx.p;
  const SegmentRouting& rt = p.routing;
  T* out = static_cast<T*>(p.out) + a * p.out_stride_a;
  const A scale = static_cast<A>(rt.scales ? rt.scales[a] : 1.0);
  for (int64_t i0 = r0; i0 < r1; i0 += kRows) {
    const int64_t i_here = std::min<int64_t>(kRows, r1 - i0);
    for (int64_t cc = c0; cc < c1; cc += cols) {
      const int64_t c_here = std::min(cols, c1 - cc);
      typename S::V acc[kRows][kVecs];
      zero(acc);
      for (int64_t o = ctx.first[a]; o < ctx.first[a + 1]; ++o) {
        const int64_t n0 = rt.offsets[ctx.order[o]], n1 = rt.offsets[ctx.order[o] + 1];
        if (n1 == n0) continue;
        const T* columns[kRows];
        for (int q = 0; q < kRows; ++q) columns[q] = row_operand + n0 * row_stride_n + i0 + std::min<int64_t>(q, i_here - 1);
        tile_fma<A, kBytes, kRows, kVecs, T, T>(acc, columns, row_stride_n, vec_operand + n0 * vec_stride_n + cc,
                                                vec_stride_n, n1 - n0, vec_columns - cc);
      }
      for (int64_t q = 0; q < i_here; ++q) {
        T* dst = out + (i0 + q) * out_row_stride + cc * out_col_stride;
        if (out_col_stride == 1) {
          store_row<A, kBytes, kVecs, T>(dst, acc[q], scale, c_here, false);
        } else {
          for (int64_t l = 0; l < c_here; ++l) dst[l * out_col_stride] = from_acc<T>(scale * acc[q][l / S::L][l % S::L]);
        }
      }
    }
  }
}

// Ranks [k0, k1) x features [j0, j1) of adapter a.  The vectors run along the output's
// unit-stride dimension: the features for dA = g^T x ([a, k, j] output), the ranks for
// dB = s dy^T h ([a, j, k] output, k unit-stride), so every store is a vector store.
// The ranks take the vectors only for blocks of at least one vector of ranks whose rows
// of `left` (r_max columns) hold whole vectors from k0: a partial vector would be loaded
// element by element once per row (measured 5.8x slower than MKL at rank 8), and a
// mostly empty one wastes its lanes (1.3x slower than rank rows at rank 8).
template <class T, int kBytes>
LOWRANK_INLINE void outer_task(const OuterContext& ctx, const OuterTask& task) {
  const SegmentOuterParams& p = ctx.p;
  const T* left = static_cast<const T*>(p.left);
  const T* right = static_cast<const T*>(p.right);
  constexpr int64_t L = Simd<acc_t<T>, kBytes>::L;
  const int64_t ranks = task.k1 - task.k0, rank_columns = p.routing.r_max;
  if (p.out_stride_j != 1 && p.out_stride_k == 1 && ranks >= L && rank_columns - task.k0 >= round_up(ranks, L)) {
    if (ranks <= L)
      outer_tiles<T, kBytes, 8, 1>(ctx, task.adapter, right, p.right_stride_n, task.j0, task.j1, left, p.left_stride_n,
                                   rank_columns, task.k0, task.k1, p.out_stride_j, 1);
    else
      outer_tiles<T, kBytes, 4, 2>(ctx, task.adapter, right, p.right_stride_n, task.j0, task.j1, left, p.left_stride_n,
                                   rank_columns, task.k0, task.k1, p.out_stride_j, 1);
  } else {
    outer_tiles<T, kBytes, 4, 2>(ctx, task.adapter, left, p.left_stride_n, task.k0, task.k1, right, p.right_stride_n,
                                 p.J, task.j0, task.j1, p.out_stride_k, p.out_stride_j);
  }
}

template <class T>
LOWRANK_AVX512 void outer_task_avx512(const OuterContext& ctx, const OuterTask& task) {
  outer_task<T, 64>(ctx, task);
}

template <class T>
LOWRANK_CPU_CLONES_DEFAULT_V3 void outer_task_avx2(const OuterContext& ctx, const OuterTask& task) {
  outer_task<T, 32>(ctx, task);
}

template <class T, int kBytes>
void segment_outer_typed(const SegmentOuterParams& p, int num_threads) {
  const SegmentRouting& rt = p.routing;
  // Segments grouped by adapter (counting sort, stable: segment order within an adapter).
  std::vector<int64_t> first(static_cast<size_t>(rt.n_adapters + 1), 0), order(static_cast<size_t>(rt.n_segments));
  std::vector<int64_t> rows_of(static_cast<size_t>(rt.n_adapters), 0);
  for (int64_t s = 0; s < rt.n_segments; ++s) {
    if (rt.ids[s] < 0) continue;
    ++first[rt.ids[s] + 1];
    rows_of[rt.ids[s]] += rt.offsets[s + 1] - rt.offsets[s];
  }
  for (int64_t a = 0; a < rt.n_adapters; ++a) first[a + 1] += first[a];
  {
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t s = 0; s < rt.n_segments; ++s)
      if (rt.ids[s] >= 0) order[fill[rt.ids[s]]++] = s;
  }
  int64_t work = 0;
  for (int64_t a = 0; a < rt.n_adapters; ++a) work += rows_of[a] * rt.ranks[a] * p.J;
  const int threads = work < kSerialWork ? 1 : std::max(num_threads, 1);
  std::vector<OuterTask> tasks;
  for (int64_t a = 0; a < rt.n_adapters; ++a) {
    if (rows_of[a] == 0) continue;
    for (int64_t k0 = 0; k0 < rt.ranks[a]; k0 += kOuterRanks)
      for (int64_t j0 = 0; j0 < p.J; j0 += kOuterColumns)
        tasks.push_back({a, k0, std::min(k0 + kOuterRanks, rt.ranks[a]), j0, std::min(j0 + kOuterColumns, p.J)});
  }
  const OuterContext ctx{p, first, order};
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t i) {
    if constexpr (kBytes == 64)
      outer_task_avx512<T>(ctx, tasks[i]);
    else
      outer_task_avx2<T>(ctx, tasks[i]);
  });
}

}  // namespace

void check_segment_sizes(const SegmentRouting& rt, const char* op) {
  LOWRANK_CHECK(rt.n_rows >= 0 && rt.n_segments >= 0 && rt.n_adapters >= 0 && rt.r_max >= 0, op,
                ": sizes must be >= 0; got n_rows = ", rt.n_rows, ", n_segments = ", rt.n_segments,
                ", n_adapters = ", rt.n_adapters, ", r_max = ", rt.r_max);
}

void check_segment_routing(const SegmentRouting& rt, const char* op) {
  check_segment_sizes(rt, op);
  // Empty tensors may have null data pointers; only the entries that exist are read.
  LOWRANK_CHECK(rt.offsets != nullptr && (rt.ids != nullptr || rt.n_segments == 0) &&
                    (rt.ranks != nullptr || rt.n_adapters == 0),
                op, ": segment_offsets, adapter_ids and ranks must not be null");
  LOWRANK_CHECK(rt.offsets[0] == 0, op, ": segment_offsets[0] must be 0; got ", rt.offsets[0]);
  LOWRANK_CHECK(rt.offsets[rt.n_segments] == rt.n_rows, op, ": segment_offsets[-1] must equal the number of rows (",
                rt.n_rows, "); got ", rt.offsets[rt.n_segments]);
  for (int64_t s = 0; s < rt.n_segments; ++s) {
    LOWRANK_CHECK(rt.offsets[s] <= rt.offsets[s + 1], op, ": segment_offsets must be non-decreasing; got segment_offsets[",
                  s, "] = ", rt.offsets[s], " > segment_offsets[", s + 1, "] = ", rt.offsets[s + 1]);
    LOWRANK_CHECK(rt.ids[s] >= -1 && rt.ids[s] < rt.n_adapters, op, ": adapter_ids[", s, "] = ", rt.ids[s],
                  "; expected -1 (no adapter) or an adapter in [0, ", rt.n_adapters, ")");
  }
  for (int64_t a = 0; a < rt.n_adapters; ++a) {
    LOWRANK_CHECK(rt.ranks[a] >= 0 && rt.ranks[a] <= rt.r_max, op, ": ranks[", a, "] = ", rt.ranks[a],
                  "; expected 0 <= rank <= r_max = ", rt.r_max);
    LOWRANK_CHECK(rt.scales == nullptr || std::isfinite(rt.scales[a]), op, ": scales[", a, "] = ", rt.scales[a],
                  "; expected a finite number");
  }
}

void check_segment_matmul_sizes(const SegmentMatmulParams& p) {
  check_segment_sizes(p.routing, "segment_matmul");
  LOWRANK_CHECK(p.J >= 0 && p.C >= 0, "segment_matmul: J and C must be >= 0; got J = ", p.J, ", C = ", p.C);
  LOWRANK_CHECK(p.rank_on_c ? p.C >= p.routing.r_max : p.J >= p.routing.r_max, "segment_matmul: the rank dimension (",
                p.rank_on_c ? "C = " : "J = ", p.rank_on_c ? p.C : p.J, ") must be >= r_max = ", p.routing.r_max);
}

void check_segment_outer_sizes(const SegmentOuterParams& p) {
  check_segment_sizes(p.routing, "segment_outer");
  LOWRANK_CHECK(p.J >= 0, "segment_outer: J must be >= 0; got ", p.J);
}

void segment_matmul_cpu(const SegmentMatmulParams& p, int num_threads) {
  check_segment_routing(p.routing, "segment_matmul");
  check_segment_matmul_sizes(p);
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (use_avx512())
      segment_matmul_typed<T, 64>(p, num_threads);
    else
      segment_matmul_typed<T, 32>(p, num_threads);
  });
}

void segment_outer_cpu(const SegmentOuterParams& p, int num_threads) {
  check_segment_routing(p.routing, "segment_outer");
  check_segment_outer_sizes(p);
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (use_avx512())
      segment_outer_typed<T, 64>(p, num_threads);
    else
      segment_outer_typed<T, 32>(p, num_threads);
  });
}

}  // namespace lowrank_ops
