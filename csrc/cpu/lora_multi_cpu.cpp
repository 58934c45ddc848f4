// CPU kernels for multi-adapter LoRA: segment_matmul (gathered shrink / expand) and
// segment_outer (per-adapter weight gradients).  Contract: lowrank_ops/lora_multi.h.
//
// One register micro-kernel serves both: a tile of 4 output rows x 2 SIMD vectors of
// output columns accumulates sum_t a_q[t] * b[t, 0:2V] in registers (broadcast a,
// vector b): 8 FMAs per 2 vector loads and 4 scalar loads.
//   segment_matmul: a = the input rows (t = j), b = the adapter's weight block packed
//     once per task into a [J_eff, width] buffer in the accumulation type, the scale
//     folded in.  Packing makes every layout (A, B, A^T, B^T read in place) a
//     unit-stride stream and costs one read of the block, amortized over the task's rows.
//   segment_outer:  a = a column of `left` (t = row n), b = the row n of `right`; rows
//     of every segment of the adapter are summed in the same registers, in segment
//     order, so the result is deterministic and no atomics are needed.
// The hot loop is compiled for several ISAs (target_clones) and picked at load time.
//
// Threads: tasks are (segment, row chunk, column block) for segment_matmul and
// (adapter, rank block, column block) for segment_outer, sized so that there are
// about 4 tasks per thread.  Work below kSerialWork multiply-adds runs on the caller.
//
// Roofline (fp32, N rows, in/out features, rank r per row): shrink 2 N r in flops,
// expand 2 N r out; compulsory bytes 4 (N in + N r + n_used r in) for the shrink,
// 4 (2 N out + N r + n_used r out) for the expand (y read and written).  At r <= 64
// both are memory-bound on a GPU and compute-bound (about r/2 flops per byte of x) on
// this CPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "lowrank_ops/lora_multi.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/simd.h"

#define LOWRANK_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))

namespace lowrank_ops {
namespace {

constexpr int64_t kSerialWork = 1 << 19;  // multiply-adds (~50 us) below which waking threads costs more than it saves
constexpr int64_t kPackElems = 1 << 16;   // packed weight block: 256 KB of fp32, L2-resident
constexpr int64_t kTileRows = 4;
constexpr int64_t kPackBlock = 32;        // weight rows per step of the packing transpose
constexpr int64_t kPackMinRows = 16;      // tasks with fewer rows use dot products instead of packing
constexpr int64_t kOuterColumns = 256;    // segment_outer column block per task
constexpr int64_t kOuterRanks = 16;       // segment_outer rank block per task

// SIMD vectors: lowrank_ops/simd.h.
template <class A>
constexpr int64_t kLanes = static_cast<int64_t>(32 / sizeof(A));
template <class A>
constexpr int64_t kTileCols = 2 * kLanes<A>;

// kLanes elements from p (storage type T) widened to the accumulation type.
template <class A, class T>
inline Vec<A> load_vec(const T* p) {
  if constexpr (std::is_same_v<A, T>) {
    return *reinterpret_cast<const typename VecTraits<A>::unaligned*>(p);
  } else {
    Vec<A> v;
    for (int64_t l = 0; l < kLanes<A>; ++l) v[l] = to_acc(p[l]);
    return v;
  }
}

template <class A, class T>
inline Vec<A> load_partial(const T* p, int64_t valid) {
  Vec<A> v = {};
  for (int64_t l = 0; l < valid && l < kLanes<A>; ++l) v[l] = to_acc(p[l]);
  return v;
}

template <class A>
struct Tile {
  Vec<A> v[kTileRows][2];
};

// dst[0:count] (+)= scale * row, count <= 2 * kLanes; whole vectors when T is the
// accumulation type and the row is full, scalars otherwise.
template <class A, class T>
inline void store_row(T* dst, const Vec<A>* row, A scale, int64_t count, bool accumulate) {
  constexpr int64_t L = kLanes<A>;
  if constexpr (std::is_same_v<A, T>) {
    if (count == 2 * L) {
      using U = typename VecTraits<A>::unaligned;
      U* d = reinterpret_cast<U*>(dst);
      d[0] = accumulate ? d[0] + scale * row[0] : scale * row[0];
      d[1] = accumulate ? d[1] + scale * row[1] : scale * row[1];
      return;
    }
  }
  for (int64_t l = 0; l < count; ++l) {
    const A value = scale * row[l / L][l % L];
    dst[l] = from_acc<T>(accumulate ? to_acc(dst[l]) + value : value);
  }
}

// tile.v[q][:] += sum_{t < count} a[q][t * a_step] * b[t * b_step + (0 .. 2 * kLanes))
// Only the first b_valid columns of b are read (the rest count as 0).
template <class A, class TA, class TB>
LOWRANK_CPU_CLONES void tile_fma(Tile<A>& tile, const TA* const* a, int64_t a_step, const TB* b, int64_t b_step,
                                 int64_t count, int64_t b_valid) {
  constexpr int64_t L = kLanes<A>;
  Tile<A> acc = tile;  // a local copy stays in registers (the reference could alias b)
  const TA *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  if (b_valid >= 2 * L) {
    for (int64_t t = 0; t < count; ++t) {
      const TB* row = b + t * b_step;
      const Vec<A> b0 = load_vec<A>(row), b1 = load_vec<A>(row + L);
      const int64_t at = t * a_step;
      const A s0 = to_acc(a0[at]), s1 = to_acc(a1[at]), s2 = to_acc(a2[at]), s3 = to_acc(a3[at]);
      acc.v[0][0] += s0 * b0; acc.v[0][1] += s0 * b1;
      acc.v[1][0] += s1 * b0; acc.v[1][1] += s1 * b1;
      acc.v[2][0] += s2 * b0; acc.v[2][1] += s2 * b1;
      acc.v[3][0] += s3 * b0; acc.v[3][1] += s3 * b1;
    }
  } else {
    for (int64_t t = 0; t < count; ++t) {
      const TB* row = b + t * b_step;
      const Vec<A> b0 = load_partial<A>(row, b_valid), b1 = load_partial<A>(row + L, b_valid - L);
      const int64_t at = t * a_step;
      const A s[4] = {to_acc(a0[at]), to_acc(a1[at]), to_acc(a2[at]), to_acc(a3[at])};
      for (int64_t q = 0; q < kTileRows; ++q) {
        acc.v[q][0] += s[q] * b0;
        acc.v[q][1] += s[q] * b1;
      }
    }
  }
  tile = acc;
}

template <class A>
inline A horizontal_sum(Vec<A> v) {
  A sum = 0;
  for (int64_t l = 0; l < kLanes<A>; ++l) sum += v[l];
  return sum;
}

// result[q] = sum_{j < count} x[j] * w[q][j] for q < 4: four dot products of unit-stride
// rows sharing x, for the few-row segments where packing the weight would cost more
// than the products.
template <class A, class T>
LOWRANK_CPU_CLONES void dot4(const T* x, const T* const* w, int64_t count, A* result) {
  constexpr int64_t L = kLanes<A>;
  Vec<A> acc[4] = {};
  int64_t j = 0;
  for (; j + L <= count; j += L) {
    const Vec<A> xv = load_vec<A>(x + j);
    for (int q = 0; q < 4; ++q) acc[q] += xv * load_vec<A>(w[q] + j);
  }
  A tail[4] = {};
  for (; j < count; ++j)
    for (int q = 0; q < 4; ++q) tail[q] += to_acc(x[j]) * to_acc(w[q][j]);
  for (int q = 0; q < 4; ++q) result[q] = horizontal_sum<A>(acc[q]) + tail[q];
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ----------------------------------------------------------------------------- segment_matmul
struct MatmulTask {
  int64_t segment, r0, r1, c0, c1;
};

template <class T>
void segment_matmul_typed(const SegmentMatmulParams& p, int num_threads) {
  using A = acc_t<T>;
  constexpr int64_t TC = kTileCols<A>;
  const SegmentRouting& rt = p.routing;
  // Effective (J, C) of segment s: the rank truncates C (shrink) or J (expand).
  auto effective = [&](int64_t s, int64_t& j_eff, int64_t& c_eff) {
    const int64_t id = rt.ids[s];
    const int64_t rank = id < 0 ? 0 : rt.ranks[id];
    j_eff = p.rank_on_c ? p.J : rank;
    c_eff = p.rank_on_c ? rank : p.C;
    return id >= 0 && rank > 0 && j_eff > 0 && c_eff > 0 && rt.offsets[s + 1] > rt.offsets[s];
  };
  int64_t work = 0;
  for (int64_t s = 0; s < rt.n_segments; ++s) {
    int64_t j_eff, c_eff;
    if (effective(s, j_eff, c_eff)) work += (rt.offsets[s + 1] - rt.offsets[s]) * j_eff * c_eff;
  }
  const int threads = work < kSerialWork ? 1 : std::max(num_threads, 1);
  std::vector<MatmulTask> tasks;
  for (int64_t s = 0; s < rt.n_segments; ++s) {
    int64_t j_eff, c_eff;
    if (!effective(s, j_eff, c_eff)) continue;
    const int64_t cap = std::max(TC, kPackElems / j_eff / TC * TC);
    const int64_t width = std::min(round_up(c_eff, TC), cap);
    const int64_t n_col_blocks = ceil_div(c_eff, width);
    const int64_t rows = rt.offsets[s + 1] - rt.offsets[s];
    // Enough row chunks for ~4 tasks per thread, but never below 16 rows (each task packs its block).
    const int64_t want_chunks = std::max<int64_t>(1, ceil_div(4 * threads, n_col_blocks));
    const int64_t chunk = round_up(std::max<int64_t>(16, ceil_div(rows, want_chunks)), kTileRows);
    for (int64_t r0 = rt.offsets[s]; r0 < rt.offsets[s + 1]; r0 += chunk)
      for (int64_t c0 = 0; c0 < c_eff; c0 += width)
        tasks.push_back({s, r0, std::min(r0 + chunk, rt.offsets[s + 1]), c0, std::min(c0 + width, c_eff)});
  }
  const T* in = static_cast<const T*>(p.in);
  const T* w_all = static_cast<const T*>(p.w);
  T* out = static_cast<T*>(p.out);
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t i) {
    const MatmulTask& task = tasks[i];
    int64_t j_eff, c_eff;
    effective(task.segment, j_eff, c_eff);
    const int64_t id = rt.ids[task.segment];
    const A scale = static_cast<A>(rt.scales ? rt.scales[id] : 1.0);
    const int64_t n_cols = task.c1 - task.c0;
    const T* w = w_all + id * p.w_stride_a + task.c0 * p.w_stride_c;
    auto row_pointers = [&](int64_t n0, int64_t n_here, const T** rows) {
      for (int64_t q = 0; q < kTileRows; ++q) rows[q] = in + (n0 + std::min(q, n_here - 1)) * p.in_stride_n;
    };
    if (p.w_stride_c == 1) {
      // W's rows are unit-stride along c already: stream them in place.
      for (int64_t n0 = task.r0; n0 < task.r1; n0 += kTileRows) {
        const int64_t n_here = std::min(kTileRows, task.r1 - n0);
        const T* rows[kTileRows];
        row_pointers(n0, n_here, rows);
        for (int64_t cc = 0; cc < n_cols; cc += TC) {
          const int64_t c_here = std::min(TC, n_cols - cc);
          Tile<A> tile{};
          tile_fma<A, T, T>(tile, rows, 1, w + cc, p.w_stride_j, j_eff, c_here);
          for (int64_t q = 0; q < n_here; ++q)
            store_row<A, T>(out + (n0 + q) * p.out_stride_n + task.c0 + cc, tile.v[q], scale, c_here, p.accumulate);
        }
      }
      return;
    }
    if (p.w_stride_j == 1 && task.r1 - task.r0 < kPackMinRows) {
      // Few rows: dot products along j, reading W in place.
      for (int64_t n = task.r0; n < task.r1; ++n) {
        T* dst = out + n * p.out_stride_n + task.c0;
        for (int64_t c0 = 0; c0 < n_cols; c0 += 4) {
          const T* w_rows[4];
          for (int64_t q = 0; q < 4; ++q) w_rows[q] = w + std::min(c0 + q, n_cols - 1) * p.w_stride_c;
          A result[4];
          dot4<A, T>(in + n * p.in_stride_n, w_rows, j_eff, result);
          for (int64_t q = 0; q < 4 && c0 + q < n_cols; ++q) {
            const A value = scale * result[q];
            dst[c0 + q] = from_acc<T>(p.accumulate ? to_acc(dst[c0 + q]) + value : value);
          }
        }
      }
      return;
    }
    const int64_t width = round_up(n_cols, TC);
    thread_local std::vector<A> packed;
    packed.assign(static_cast<size_t>(j_eff * width), A(0));
    // packed[j, c - c0] = scale * W(id, j, c)
    if (p.w_stride_j == 1) {
      // A blocked transpose: kPackBlock source rows (c) stay in L1 and in the TLB while
      // j runs along them, and every write is contiguous.
      for (int64_t c0 = 0; c0 < n_cols; c0 += kPackBlock) {
        const int64_t c1 = std::min(n_cols, c0 + kPackBlock);
        for (int64_t j = 0; j < j_eff; ++j)
          for (int64_t c = c0; c < c1; ++c) packed[j * width + c] = scale * to_acc(w[j + c * p.w_stride_c]);
      }
    } else {
      for (int64_t j = 0; j < j_eff; ++j)
        for (int64_t c = 0; c < n_cols; ++c)
          packed[j * width + c] = scale * to_acc(w[j * p.w_stride_j + c * p.w_stride_c]);
    }
    for (int64_t n0 = task.r0; n0 < task.r1; n0 += kTileRows) {
      const int64_t n_here = std::min(kTileRows, task.r1 - n0);
      const T* rows[kTileRows];
      row_pointers(n0, n_here, rows);
      for (int64_t cc = 0; cc < n_cols; cc += TC) {
        Tile<A> tile{};
        tile_fma<A, T, A>(tile, rows, 1, packed.data() + cc, width, j_eff, TC);
        const int64_t c_here = std::min(TC, n_cols - cc);
        for (int64_t q = 0; q < n_here; ++q)
          store_row<A, T>(out + (n0 + q) * p.out_stride_n + task.c0 + cc, tile.v[q], A(1), c_here, p.accumulate);
      }
    }
  });
}

// ----------------------------------------------------------------------------- segment_outer
struct OuterTask {
  int64_t adapter, k0, k1, j0, j1;
};

template <class T>
void segment_outer_typed(const SegmentOuterParams& p, int num_threads) {
  using A = acc_t<T>;
  constexpr int64_t TC = kTileCols<A>;
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
  const T* left = static_cast<const T*>(p.left);
  const T* right = static_cast<const T*>(p.right);
  T* out = static_cast<T*>(p.out);
  parallel_for(static_cast<int64_t>(tasks.size()), threads, [&](int64_t i) {
    const OuterTask& task = tasks[i];
    const int64_t a = task.adapter;
    const A scale = static_cast<A>(rt.scales ? rt.scales[a] : 1.0);
    for (int64_t k0 = task.k0; k0 < task.k1; k0 += kTileRows) {
      const int64_t k_here = std::min(kTileRows, task.k1 - k0);
      for (int64_t j0 = task.j0; j0 < task.j1; j0 += TC) {
        const int64_t j_here = std::min(TC, task.j1 - j0);
        Tile<A> tile{};
        for (int64_t o = first[a]; o < first[a + 1]; ++o) {
          const int64_t n0 = rt.offsets[order[o]], n1 = rt.offsets[order[o] + 1];
          if (n1 == n0) continue;
          const T* columns[kTileRows];
          for (int64_t q = 0; q < kTileRows; ++q) columns[q] = left + n0 * p.left_stride_n + k0 + std::min(q, k_here - 1);
          tile_fma<A, T, T>(tile, columns, p.left_stride_n, right + n0 * p.right_stride_n + j0, p.right_stride_n,
                            n1 - n0, j_here);
        }
        for (int64_t q = 0; q < k_here; ++q) {
          T* dst = out + a * p.out_stride_a + (k0 + q) * p.out_stride_k + j0 * p.out_stride_j;
          if (p.out_stride_j == 1) {
            store_row<A, T>(dst, tile.v[q], scale, j_here, false);
          } else {
            for (int64_t l = 0; l < j_here; ++l)
              dst[l * p.out_stride_j] = from_acc<T>(scale * tile.v[q][l / kLanes<A>][l % kLanes<A>]);
          }
        }
      }
    }
  });
}

}  // namespace

void check_segment_routing(const SegmentRouting& rt, const char* op) {
  LOWRANK_CHECK(rt.n_rows >= 0 && rt.n_segments >= 0 && rt.n_adapters >= 0 && rt.r_max >= 0, op,
                ": sizes must be >= 0; got n_rows = ", rt.n_rows, ", n_segments = ", rt.n_segments,
                ", n_adapters = ", rt.n_adapters, ", r_max = ", rt.r_max);
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

void segment_matmul_cpu(const SegmentMatmulParams& p, int num_threads) {
  check_segment_routing(p.routing, "segment_matmul");
  LOWRANK_CHECK(p.J >= 0 && p.C >= 0, "segment_matmul: J and C must be >= 0; got ", p.J, ", ", p.C);
  LOWRANK_CHECK(p.rank_on_c ? p.C >= p.routing.r_max : p.J >= p.routing.r_max, "segment_matmul: the rank dimension (",
                p.rank_on_c ? "C = " : "J = ", p.rank_on_c ? p.C : p.J, ") must be >= r_max = ", p.routing.r_max);
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    segment_matmul_typed<typename decltype(tag)::type>(p, num_threads);
  });
}

void segment_outer_cpu(const SegmentOuterParams& p, int num_threads) {
  check_segment_routing(p.routing, "segment_outer");
  LOWRANK_CHECK(p.J >= 0, "segment_outer: J must be >= 0; got ", p.J);
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    segment_outer_typed<typename decltype(tag)::type>(p, num_threads);
  });
}

}  // namespace lowrank_ops
