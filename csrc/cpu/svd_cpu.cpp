// CPU kernel of the batched one-sided Jacobi SVD (contract and algorithm: svd.h).
//
// Two layouts, chosen by the size of the matrices (jacobi_svd_cpu):
//
// * One matrix per task (larger matrices).  The task copies its matrix into a
//   thread-local workspace in the accumulation type, column-major with V stacked under
//   W: column c holds W[:, c] (padded with zeros to a whole number of 64-byte vectors)
//   followed by V[:, c], so one SIMD loop rotates both.  A sweep is a sequence of rounds
//   of disjoint pairs; per round: 1. the dot products of the round's pairs (SIMD over
//   rows), 2. the decisions for all pairs at once (round_decisions: a branch-free loop
//   that GCC vectorizes over pairs, divisions included), 3. a scalar pass that writes
//   the new column norms back and lists the pairs to rotate, 4. the rotations, 5. rare
//   norm recomputations.  From kPreconditionMinCols columns on, the swept matrix is not
//   X but R^T of a column-pivoted QR of X, with V starting as Q (pivoted_qr, form_q:
//   fewer sweeps; the left and right factors then swap roles, see jacobi_svd_one), or,
//   for tall X, as I with Q applied after the sweeps (apply_q).
// * kGroup matrices per task in the lanes of one SIMD vector (small matrices): every
//   per-pair quantity is a vector over the group, so the per-pair bookkeeping is paid
//   once per kGroup matrices (group_sweeps).
//
// Cost of one sweep (rows m, cols n, n(n-1)/2 pairs): 2m flops per dot product, plus
// 6(m + n) per rotated pair (rotation of the two columns of W and of V).  At 64 x 64 fp32
// the working set (W and V, 32 KB) stays in L1; larger matrices are swept in column
// blocks that fit L1 (make_schedule).  The rotations dominate and are bound by the
// stores (two columns of W and V rewritten per rotation).  The hot functions are
// compiled for several ISAs (target_clones); everything they call is inlined into them.

// Functions taking or returning 32- and 64-byte vectors (here and in svd.h's generic
// math) are all inlined into the cloned functions that call them, so no call ever
// crosses the ABI that -Wpsabi warns about.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/parallel.h"
#include "lowrank_ops/simd.h"
#include "lowrank_ops/svd.h"

namespace lowrank_ops {
namespace {

constexpr int64_t kVectorBytes = 64;
constexpr int64_t kRoundPad = 16;          // rounds are padded to whole vectors of the decision loop and wide_lane_sums
constexpr int64_t kSerialWork = 1 << 15;   // batch * rows * cols^2 below which one thread is faster
constexpr int64_t kBlockBytes = 32 << 10;  // columns (W and V) of two column blocks: fits L1 (32-48 KB)
// Largest working set of a group (kGroup matrices, W and V) for the matrices-in-lanes
// path.  Measured on a 2-core Xeon (AVX-512, 48 KB L1, 2 MB L2), one thread, ms per
// matrix, one-matrix path / lanes path, fp32 and fp64: 8x8 0.0043 / 0.0013 and
// 0.0058 / 0.0022; 16x16 0.0136 / 0.0063 and 0.0189 / 0.0123; 24x24 (36 KB)
// 0.0255 / 0.0197 and 0.0415 / 0.0411; 64x16 (40 KB) 0.0145 / 0.0124 and 0.0256 / 0.0252;
// 32x32 (64 KB) 0.0418 / 0.0409 and 0.0724 / 0.0840; 256x16 (139 KB) 0.035 / 0.040;
// 64x64 (256 KB) 0.222 / 0.286.  Beyond L1 the group's columns stream from L2, and its
// small column blocks cost it extra sweeps.
constexpr int64_t kGroupMaxBytes = 48 << 10;
// Smallest cols for which the one-matrix path sweeps R^T of a pivoted QR instead of X
// (see pivoted_qr).  Measured on the same Xeon, one thread, N(0, 1) square matrices, ms
// per matrix, X / R^T, fp32: 48 0.133 / 0.123, 64 0.204 / 0.198 (mean of 5), 80 0.454 /
// 0.408, 128 1.40 / 1.25; fp64: 32 0.0637 / 0.0635, 40 0.136 / 0.128, 64 0.450 / 0.416,
// 128 3.81 / 3.56.
constexpr int64_t kPreconditionMinCols = 40;
// Threshold sweeps (see jacobi_sweeps) on the one-matrix path up to this many columns.
// Measured on the same Xeon, N(0, 1) square matrices, one thread, us per matrix without /
// with, fp32: 32 44.2 / 42.8, 40 75.6 / 73.9, 48 125.1 / 118.8, 64 191.5 / 184.3 and
// 198.6 / 186.9; fp64: 32 66.0 / 62.0, 48 225.0 / 221.8, 64 400 / 387.  A batch of 512
// fp32 64 x 64 on 2 threads: 48.0-49.4 / 45.6-48.0 ms.  At 96 and 128 columns they
// cost sweeps (7.02 -> 7.26, 7.06 -> 7.83) and time.
constexpr int64_t kThresholdMaxCols = 64;
constexpr int kThresholdSweeps = 3;

// The kernels work on 64-byte vectors, simd.h's WideVec<A> (one zmm register in the
// AVX-512 clone, two ymm in the AVX2 clone, four xmm on the baseline); VecOf gives the
// narrower halves that tree_sum reduces through.
static_assert(sizeof(WideVec<float>) == kVectorBytes && sizeof(WideVec<double>) == kVectorBytes);
template <class A, int64_t kBytes>
struct VecOf {
  typedef A type __attribute__((vector_size(kBytes)));
};
template <class A>
constexpr int64_t kLanes = kVectorBytes / static_cast<int64_t>(sizeof(A));
// Integer of the size of A, to handle floats through their bit patterns.
template <class A>
using Bits = std::conditional_t<sizeof(A) == 8, int64_t, int32_t>;
template <class A>
constexpr int64_t padded_rows(int64_t rows) {
  return (rows + kLanes<A> - 1) / kLanes<A> * kLanes<A>;
}

// Pairwise (tree) sum of the lanes: log2(lanes) dependent additions instead of lanes - 1.
template <class A, int64_t kBytes>
LOWRANK_INLINE A tree_sum(const typename VecOf<A, kBytes>::type& v) {
  if constexpr (kBytes == 2 * static_cast<int64_t>(sizeof(A))) {
    return v[0] + v[1];
  } else {
    typename VecOf<A, kBytes / 2>::type low, high;
    std::memcpy(&low, &v, kBytes / 2);
    std::memcpy(&high, reinterpret_cast<const unsigned char*>(&v) + kBytes / 2, kBytes / 2);
    return tree_sum<A, kBytes / 2>(low + high);
  }
}

// x . y over n vectors as lane partial sums (kN when kN > 0: a compile-time trip
// count, fully unrolled); two accumulators so consecutive multiply-adds overlap.
template <int64_t kN, class A>
LOWRANK_INLINE WideVec<A> dot_lanes(const A* x, const A* y, int64_t n) {
  const int64_t n_vec = kN > 0 ? kN : n;
  const WideVec<A>* xv = reinterpret_cast<const WideVec<A>*>(x);
  const WideVec<A>* yv = reinterpret_cast<const WideVec<A>*>(y);
  WideVec<A> acc0 = {}, acc1 = {};
  int64_t q = 0;
  for (; q + 2 <= n_vec; q += 2) {
    acc0 += xv[q] * yv[q];
    acc1 += xv[q + 1] * yv[q + 1];
  }
  if (q < n_vec) acc0 += xv[q] * yv[q];
  return acc0 + acc1;
}

// x . y over n vectors (kN as for dot_lanes).
template <int64_t kN, class A>
LOWRANK_INLINE A dot(const A* x, const A* y, int64_t n) {
  return tree_sum<A, kVectorBytes>(dot_lanes<kN>(x, y, n));
}

// (x, y) <- (c x - s y, s x + c y) over n vectors (kN as for dot).
template <int64_t kN, class A>
LOWRANK_INLINE void rotate(A* x, A* y, int64_t n, A c, A s) {
  const int64_t n_vec = kN > 0 ? kN : n;
  WideVec<A>* xv = reinterpret_cast<WideVec<A>*>(x);
  WideVec<A>* yv = reinterpret_cast<WideVec<A>*>(y);
  for (int64_t q = 0; q < n_vec; ++q) {
    const WideVec<A> a = xv[q], b = yv[q];
    xv[q] = c * a - s * b;
    yv[q] = s * a + c * b;
  }
}

// Sweep order: rounds of disjoint pairs (i < j), the same for every matrix of a call.
// Columns are grouped into blocks of `block` columns, chosen so that the columns of
// two blocks fit in L1: a sweep first visits, block pair by block pair, the pairs
// across two blocks (round r pairs I[k] with J[(k + r) mod L]), then the pairs inside
// each block (round-robin order, two blocks side by side).  Every pair i < j is visited
// once per sweep, as in the plain round-robin order (a single block when all columns
// fit).  This order needs fewer sweeps than the plain one (N(0, 1) matrices, mean
// sweeps fp32 / fp64: 64 x 64 8.43 / 9.44 against 8.98 / 10.10; 128 x 128 fp32 9.69
// against 10.31) and than visiting the blocks' inner pairs first (8.70 / 10.10).
// Each round is padded to a multiple of kRoundPad with the pair (0, 0), whose dot
// product is set to 0 (never rotated, never written back).
struct Schedule {
  std::vector<uint16_t> first, second;  // padded rounds, back to back (cols <= kJacobiMaxCols < 2^16)
  std::vector<int64_t> round_begin;     // round r: pairs [round_begin[r], round_begin[r + 1]), padding included
  std::vector<int64_t> round_size;      // real pairs of round r (a prefix of the round)
  int64_t max_round = 0;                // most pairs in one padded round

  void add(int64_t i, int64_t j) {
    first.push_back(static_cast<uint16_t>(i));
    second.push_back(static_cast<uint16_t>(j));
  }
  void end_round() {
    const int64_t begin = round_begin.back(), size = static_cast<int64_t>(first.size()) - begin;
    if (size == 0) return;
    while ((static_cast<int64_t>(first.size()) - begin) % kRoundPad != 0) add(0, 0);
    round_size.push_back(size);
    round_begin.push_back(static_cast<int64_t>(first.size()));
    max_round = std::max(max_round, round_begin.back() - begin);
  }
};

Schedule make_schedule(int64_t cols, int64_t block) {
  Schedule schedule;
  schedule.round_begin.push_back(0);
  block = std::max<int64_t>(1, std::min(block, cols));
  const int64_t n_blocks = cols == 0 ? 0 : (cols + block - 1) / block;
  auto block_size = [&](int64_t index) { return std::min(block, cols - index * block); };
  for (int64_t bi = 0; bi < n_blocks; ++bi) {
    for (int64_t bj = bi + 1; bj < n_blocks; ++bj) {
      const int64_t size_i = block_size(bi), size_j = block_size(bj), span = std::max(size_i, size_j);
      for (int64_t round = 0; round < span; ++round) {
        for (int64_t k = 0; k < size_i; ++k) {
          const int64_t other = (k + round) % span;
          if (other < size_j) schedule.add(bi * block + k, bj * block + other);
        }
        schedule.end_round();
      }
    }
  }
  // Pairs inside blocks: two blocks at a time (together they fit L1, as for the pairs
  // across two blocks), their rounds merged: fewer, longer rounds, each round's latency
  // paid once for both (disjoint columns: the same arithmetic as one block after the other).
  for (int64_t index = 0; index < n_blocks; index += 2) {
    const int64_t last = std::min(index + 2, n_blocks);
    int64_t n_rounds = 0;
    for (int64_t b = index; b < last; ++b) n_rounds = std::max(n_rounds, block_size(b) + (block_size(b) & 1) - 1);
    for (int64_t round = 0; round < n_rounds; ++round) {
      for (int64_t b = index; b < last; ++b) {
        const int64_t base = b * block, size = block_size(b), n_even = size + (size & 1);
        if (round + 1 >= n_even) continue;
        for (int64_t k = 0; k < n_even / 2; ++k) {
          int64_t i, j;
          round_robin_pair(n_even, round, k, i, j);
          if (j < size) schedule.add(base + i, base + j);  // j == size: the dummy of an odd count
        }
      }
      schedule.end_round();
    }
  }
  return schedule;
}

template <class A>
struct SweepResult {
  int sweeps = 0;
  bool converged = false;
  A off = 0;
};

// Per-round scratch, max_round entries each (see round_decisions for the meaning).
template <class A>
struct RoundScratch {
  A *dot, *off2, *action, *c, *s, *norm2_i, *norm2_j;
  WideVec<A>* dot_lanes;  // the dot products' lane partial sums, summed kLanes pairs at a time
  int32_t* rotated;   // indices (into the round) of the pairs to rotate
};

// 1 / sqrt(y) for y in [1, 2] (jacobi_rotation's only square roots) with a few ulps of
// error: a quadratic fit (relative error 3.2e-3) and Newton steps, each squaring the
// error (2 steps reach 3.5e-10 for fp32, 3 reach 1.8e-19 for fp64; then rounding: at
// most 1.1 (fp32) and 2 (fp64) ulps, mean bias under 0.12 ulp).  Only multiply-adds,
// so it vectorizes (the library sqrt does not: it may set errno).  A function object,
// not a function, so that it is inlined at any optimization level.
template <class A, class S>
struct Rsqrt12 {
  LOWRANK_INLINE A operator()(A y) const {
    A x = (S(0.14768453094336823) * y + S(-0.7304976213908064)) * y + S(1.5796210966933513);
    for (int step = 0; step < (sizeof(S) == 8 ? 3 : 2); ++step) x = x * (S(1.5) - S(0.5) * y * x * x);
    return x;
  }
};

// Decisions for one (padded) round, branch-free so the loop vectorizes over pairs.
// For pair k = (i, j): off2[k], the squared relative off-diagonal; action[k] = 0 (keep),
// 1 (rotate) or 2 (rotate, then recompute the two norms: an updated norm cancelled
// below a quarter of its old value); c[k], s[k], the rotation (1, 0 when kept); and the
// columns' new squared norms alpha - t gamma, beta + t gamma (the old ones when kept),
// written over the old ones norm2_i[k] = alpha, norm2_j[k] = beta (copied there by the
// dot product loop: contiguous loads instead of two gathers per vector of pairs,
// measured 6 % faster at 64 x 64 fp32).
// A function of its own, called once per round, with every array a restrict parameter:
// inlined into the sweep loop, or written with explicit vectors, it is slower (GCC 12
// then neither vectorizes nor gathers well).
template <class A>
LOWRANK_CPU_CLONES void round_decisions(int64_t n_pairs, A tol2, const A* __restrict dot, A* __restrict off2,
                                        A* __restrict action, A* __restrict c_out, A* __restrict s_out,
                                        A* __restrict norm2_i, A* __restrict norm2_j) {
  for (int64_t k = 0; k < n_pairs; ++k) {
    const A alpha = norm2_i[k], beta = norm2_j[k], gamma = dot[k];
    const A o2 = jacobi_off2(alpha, beta, gamma);
    A t, c;
    jacobi_rotation(alpha, beta, gamma, t, c, Rsqrt12<A, A>{});
    const bool rotate = o2 > tol2;
    const A alpha_new = alpha - t * gamma, beta_new = beta + t * gamma;
    const bool cancel = (alpha_new < A(0.25) * alpha) | (beta_new < A(0.25) * beta);
    off2[k] = o2;
    const A rotated = rotate ? A(1) : A(0), cancelled = cancel ? A(1) : A(0);  // no nested select: it
    action[k] = rotated + rotated * cancelled;                                  // would block vectorization
    c_out[k] = rotate ? c : A(1);
    s_out[k] = rotate ? c * t : A(0);
    norm2_i[k] = rotate ? alpha_new : alpha;
    norm2_j[k] = rotate ? beta_new : beta;
  }
}

// max(values[0, n)) for values >= 0 (padding entries are 0), through their bit
// patterns, which order non-negative floats as integers: an integer max reduction
// vectorizes, a floating-point one (NaN semantics) does not, and a scalar one is a
// chain of dependent max operations.
template <class A>
LOWRANK_INLINE A round_max(const A* values, int64_t n) {
  Bits<A> best = 0;
  for (int64_t k = 0; k < n; ++k) {
    Bits<A> bits;
    std::memcpy(&bits, values + k, sizeof bits);
    best = std::max(best, bits);
  }
  A out;
  std::memcpy(&out, &best, sizeof out);
  return out;
}

// The Jacobi sweeps on the stacked columns [W; V] (cols columns of ld_w + ld_v
// elements, 64-byte aligned; ld_v = 0 without V).  Squared norms of the W columns are
// updated as alpha - t gamma and beta + t gamma after each rotation, recomputed when
// the update cancels (an O(eps) absolute error would be large relative to the new
// norm), and all recomputed at the start of every sweep, so the convergence test of the
// final sweep uses exact norms; on exit norm2 holds the exact squared norms.
// Measured alternatives that were not faster at 64 x 64 fp32: rotations with the cosine
// factored out into column scales (two multiply-adds per element pair instead of four:
// the rotations are then bound by the stores, and the scale bookkeeping costs as much
// as it saves); deferring the V part of each round's rotations behind the next round's
// decisions; sweeping two matrices together (their 64 KB no longer fit L1); quads
// (stop 23, on the Zen 4: columns paired into units, the four cross pairs of two units
// decided on their 4 x 4 Gram matrix, updated two-sidedly, then applied in one pass with
// the four columns in registers, in factored form: half the loads and stores per
// rotation, but 1.5 dot products per pair): 5 % faster at 64 x 64 fp32, 14 % slower at
// 64 x 64 fp64 and 20 % at 48 x 48 fp32 (a quad rotates all four pairs when one needs it);
// columns sorted by norm at every sweep (de Rijk): more sweeps (64 x 64 fp32 7.05 -> 7.46);
// W pair by pair but V's rotations applied afterwards per quad in factored form (the V
// loop alone 2.9 against 4.8 ns per pair): the quads' unit ordering by itself made the
// sweeps 15 % slower at 64 x 64 fp32 for the same rotations (8284 against 8287 per
// matrix), the whole 25 % slower.
// Threshold sweeps (as in Rutishauser's Jacobi eigenvalue routine): sweeps k = 1 ..
// threshold_sweeps rotate only the pairs whose relative off-diagonal exceeds
// max(tol, 10^-k).  Early rotations of pairs that are already nearly orthogonal are
// undone by later ones anyway; skipping them saves 13 % of the rotations at 64 x 64
// (N(0, 1), fp32; a numpy model) for about the same number of sweeps.  Only a
// sweep in which no pair exceeds tol itself proves convergence, so the result and the
// report keep their meaning; a sweep that rotates nothing ends the thresholds.  Longer
// schedules (stop 23, 64 x 64 fp32, rotations per pair / mean sweeps): 10^-1 .. 10^-3
// 4.11 / 7.05; 0.1, 0.03, 0.003, 3e-4, 3e-5 3.80 / 7.14; 0.1, 0.03, 0.01, 0.003, 0.001
// 3.48 / 8.04: the skipped rotations come back as extra sweeps, no faster measured.
// kW, kAll > 0: the column lengths in vectors (W, and W and V) known at compile time.
template <class A, int64_t kW, int64_t kAll>
LOWRANK_CPU_CLONES SweepResult<A> jacobi_sweeps(A* x, int64_t ld_w, int64_t ld_v, int64_t cols, A* norm2,
                                                const Schedule& schedule, RoundScratch<A> s, A tol2, int max_sweeps,
                                                int threshold_sweeps) {
  const int64_t ld = ld_w + ld_v, w_vec = ld_w / kLanes<A>, all_vec = ld / kLanes<A>;
  const int64_t n_rounds = static_cast<int64_t>(schedule.round_size.size());
  auto refresh = [&](int64_t col) { norm2[col] = dot<kW>(x + col * ld, x + col * ld, w_vec); };
  SweepResult<A> result;
  A threshold = 1;
  for (int sweep = 1; sweep <= max_sweeps; ++sweep) {
    for (int64_t col = 0; col < cols; ++col) refresh(col);
    threshold = sweep <= threshold_sweeps ? threshold * A(0.1) : A(0);
    const A sweep_tol2 = std::max(tol2, threshold * threshold);
    result.sweeps = sweep;
    A off2 = 0;
    int64_t rotations = 0;
    for (int64_t round = 0; round < n_rounds; ++round) {
      const int64_t begin = schedule.round_begin[round], n_padded = schedule.round_begin[round + 1] - begin;
      const int64_t n_pairs = schedule.round_size[round];
      const uint16_t* pi = schedule.first.data() + begin;
      const uint16_t* pj = schedule.second.data() + begin;
      for (int64_t k = 0; k < n_pairs; ++k) {
        s.dot_lanes[k] = dot_lanes<kW>(x + pi[k] * ld, x + pj[k] * ld, w_vec);
        s.norm2_i[k] = norm2[pi[k]];
        s.norm2_j[k] = norm2[pj[k]];
      }
      for (int64_t k = n_pairs; k < n_padded; ++k) {  // padding: pair (0, 0), dot 0, never rotated
        s.dot_lanes[k] = WideVec<A>{};
        s.norm2_i[k] = s.norm2_j[k] = norm2[0];
      }
      for (int64_t k = 0; k < n_padded; k += kLanes<A>) {  // n_padded: a multiple of kRoundPad >= kLanes
        const WideVec<A> sums = wide_lane_sums<A>(s.dot_lanes + k);  // lane i: tree_sum of pair i's lanes
        std::memcpy(s.dot + k, &sums, sizeof sums);
      }
      round_decisions(n_padded, sweep_tol2, s.dot, s.off2, s.action, s.c, s.s, s.norm2_i, s.norm2_j);
      off2 = std::max(off2, round_max(s.off2, n_padded));
      int64_t n_rot = 0;
      bool any_refresh = false;
      for (int64_t k = 0; k < n_pairs; ++k) {
        norm2[pi[k]] = s.norm2_i[k];
        norm2[pj[k]] = s.norm2_j[k];
        s.rotated[n_rot] = static_cast<int32_t>(k);
        n_rot += s.action[k] != A(0) ? 1 : 0;
        any_refresh |= s.action[k] == A(2);
      }
      for (int64_t q = 0; q < n_rot; ++q) {
        const int64_t k = s.rotated[q];
        rotate<kAll>(x + pi[k] * ld, x + pj[k] * ld, all_vec, s.c[k], s.s[k]);
      }
      if (any_refresh) {
        for (int64_t q = 0; q < n_rot; ++q) {
          const int64_t k = s.rotated[q];
          if (s.action[k] != A(2)) continue;
          refresh(pi[k]);
          refresh(pj[k]);
        }
      }
      rotations += n_rot;
    }
    result.off = std::sqrt(off2);
    if (rotations == 0) {
      if (off2 <= tol2) {
        result.converged = true;
        break;
      }
      threshold_sweeps = 0;
    }
  }
  for (int64_t col = 0; col < cols; ++col) refresh(col);
  return result;
}

// Bump allocator over a byte buffer, every block 64-byte aligned.  The caller sizes it;
// take() checks, so a sizing mistake throws instead of overflowing.  Workspaces up to
// kKeptArenaBytes come from a thread-local buffer kept between matrices and calls (a
// fresh buffer's first touch costs page faults, per matrix); larger ones (tall matrices,
// whose sweeps cost far more than the faults) from the Arena's own buffer, freed with it,
// so no thread keeps the workspace of the largest matrix it ever saw (one float32
// 200000 x 150 call left 702 MB held in the OpenMP team's threads).
constexpr int64_t kKeptArenaBytes = int64_t(4) << 20;

class Arena {
 public:
  Arena(const Arena&) = delete;  // take()'s pointers point into its buffer
  Arena& operator=(const Arena&) = delete;

  explicit Arena(int64_t bytes) {
    thread_local std::vector<unsigned char> kept;
    const auto size = static_cast<size_t>(bytes + kVectorBytes);
    unsigned char* data;
    if (bytes + kVectorBytes > kKeptArenaBytes) {
      own_.reset(new unsigned char[size]);  // uninitialized: no memset per matrix
      data = own_.get();
    } else {
      if (kept.size() < size) kept.resize(size);
      data = kept.data();
    }
    const auto base = reinterpret_cast<std::uintptr_t>(data);
    next_ = reinterpret_cast<unsigned char*>((base + kVectorBytes - 1) / kVectorBytes * kVectorBytes);
    end_ = next_ + bytes;
  }

  template <class X>
  X* take(int64_t count) {
    const int64_t bytes = round_up(count * static_cast<int64_t>(sizeof(X)));
    if (bytes > end_ - next_) throw std::logic_error("batched_svd: internal error: CPU workspace too small");
    X* out = reinterpret_cast<X*>(next_);
    next_ += bytes;
    return out;
  }

  static int64_t round_up(int64_t bytes) { return (bytes + kVectorBytes - 1) / kVectorBytes * kVectorBytes; }

 private:
  std::unique_ptr<unsigned char[]> own_;
  unsigned char* next_;
  unsigned char* end_;
};

// Columns perm[0, n_valid) of U (the first `rows` entries of the columns of x, stride
// ld) are orthonormal; fills the columns perm[n_valid, cols) so that all of them are.
// Column perm[pos] starts from the unit vector e_q with the largest component outside
// the span of the columns before it (1 - sum_t u_t[q]^2 is that component's squared
// norm; they sum to rows - pos >= 1 over q, so the largest is >= 1 / rows),
// orthogonalized twice by modified Gram-Schmidt and normalized.
template <class A>
void complete_basis(A* x, int64_t ld, int64_t rows, int64_t cols, const int64_t* perm, int64_t n_valid) {
  for (int64_t pos = n_valid; pos < cols; ++pos) {
    A* u = x + perm[pos] * ld;
    int64_t best_q = 0;
    A best = -std::numeric_limits<A>::infinity();
    for (int64_t q = 0; q < rows; ++q) {
      A residual = 1;
      for (int64_t t = 0; t < pos; ++t) residual -= x[perm[t] * ld + q] * x[perm[t] * ld + q];
      if (residual > best) {
        best = residual;
        best_q = q;
      }
    }
    std::fill(u, u + rows, A(0));
    u[best_q] = 1;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t t = 0; t < pos; ++t) {
        const A* basis = x + perm[t] * ld;
        A coef = 0;
        for (int64_t r = 0; r < rows; ++r) coef += basis[r] * u[r];
        for (int64_t r = 0; r < rows; ++r) u[r] -= coef * basis[r];
      }
    }
    A norm2 = 0;
    for (int64_t r = 0; r < rows; ++r) norm2 += u[r] * u[r];
    const A inv = A(1) / std::sqrt(norm2);
    for (int64_t r = 0; r < rows; ++r) u[r] *= inv;
  }
}

// One matrix in the per-matrix layout: columns [W; V] of ld = ld_w + ld_v elements
// (ld_v = 0 without V), W padded with zeros to ld_w rows, V = I.
template <class A>
struct MatrixBuffer {
  A* x;
  int64_t ld_w, ld_v, ld;
  A* norm2;  // [cols] squared norms of the final W columns
  A* sigma;  // [cols]
  int64_t* perm;  // [cols]

  // W rows padded to ld_w, V rows to ld_v (0: no V).
  static MatrixBuffer take_padded(Arena& arena, int64_t ld_w, int64_t ld_v, int64_t cols) {
    MatrixBuffer m;
    m.ld_w = ld_w;
    m.ld_v = ld_v;
    m.ld = ld_w + ld_v;
    m.x = arena.take<A>(cols * m.ld);
    m.norm2 = arena.take<A>(cols);
    m.sigma = arena.take<A>(cols);
    m.perm = arena.take<int64_t>(cols);
    return m;
  }
  static int64_t bytes_padded(int64_t ld, int64_t cols) {
    return Arena::round_up(cols * ld * static_cast<int64_t>(sizeof(A))) +
           2 * Arena::round_up(cols * static_cast<int64_t>(sizeof(A))) + Arena::round_up(cols * 8);
  }
  static MatrixBuffer take(Arena& arena, int64_t rows, int64_t cols, bool compute_uv) {
    return take_padded(arena, padded_rows<A>(rows), compute_uv ? padded_rows<A>(cols) : 0, cols);
  }
  static int64_t bytes(int64_t rows, int64_t cols, bool compute_uv) {
    return bytes_padded(padded_rows<A>(rows) + (compute_uv ? padded_rows<A>(cols) : 0), cols);
  }
};

// Bit pattern of |x|: non-negative floats order like their bit patterns as integers,
// which lets the max-|x| and argmax loops below run as integer loops (vectorizable, or
// branch-free) instead of floating-point ones (NaN semantics block both).
template <class A>
LOWRANK_INLINE Bits<A> abs_bits(A x) {
  Bits<A> bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits & std::numeric_limits<Bits<A>>::max();
}
template <class A>
constexpr Bits<A> kInfinityBits = sizeof(A) == 8 ? Bits<A>(0x7ff0000000000000LL) : Bits<A>(0x7f800000);

// Copies A[b] (rows x cols) to dst[r * dst_r + c * dst_c] in the accumulation type and
// scales it exactly by a power of two so that max |X| lies in [0.5, 1); returns the
// exponent to scale the singular values back.  Throws naming A[b] when it holds inf or
// NaN.  Every loop runs along the smaller stride of the array it reads or writes.
template <class T, class A>
int load_scaled(const JacobiSvdParams& p, int64_t b, A* dst, int64_t dst_r, int64_t dst_c) {
  const int64_t rows = p.rows, cols = p.cols;
  const T* a = static_cast<const T*>(p.a) + b * p.a_stride_b;
  const bool input_rows = std::abs(p.a_stride_c) <= std::abs(p.a_stride_r);  // rows outer
  Bits<A> largest = 0;
  auto copy = [&](int64_t r, int64_t c) {
    const A value = to_acc(a[r * p.a_stride_r + c * p.a_stride_c]);
    dst[r * dst_r + c * dst_c] = value;
    largest = std::max(largest, abs_bits(value));
  };
  if (input_rows) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) copy(r, c);
  } else {
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < rows; ++r) copy(r, c);
  }
  if (largest >= kInfinityBits<A>) {  // inf or NaN somewhere: find the first one for the message
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < rows; ++r)
        if (abs_bits(dst[r * dst_r + c * dst_c]) >= kInfinityBits<A>)
          throw std::invalid_argument(detail::concat("batched_svd: A[", b, "] has a non-finite entry (",
                                                     dst[r * dst_r + c * dst_c], ") at (", r, ", ", c,
                                                     ") of the (transposed if wide) matrix; expected finite values"));
  }
  A amax;
  std::memcpy(&amax, &largest, sizeof amax);
  int exponent = 0;
  std::frexp(amax, &exponent);
  if (amax > 0 && exponent != 0) {
    const bool one_factor = std::abs(exponent) < std::numeric_limits<A>::max_exponent - 2;
    const A factor = std::ldexp(A(1), -exponent);
    const bool dst_rows = dst_c <= dst_r;  // the destination's contiguous direction
    const int64_t outer = dst_rows ? rows : cols, inner = dst_rows ? cols : rows;
    const int64_t outer_stride = dst_rows ? dst_r : dst_c, inner_stride = dst_rows ? dst_c : dst_r;
    for (int64_t o = 0; o < outer; ++o) {
      A* line = dst + o * outer_stride;
      if (one_factor) {
        for (int64_t i = 0; i < inner; ++i) line[i * inner_stride] *= factor;
      } else {
        for (int64_t i = 0; i < inner; ++i) line[i * inner_stride] = std::ldexp(line[i * inner_stride], -exponent);
      }
    }
  }
  return exponent;
}

// load_scaled into the columns of m, zero padding, V = I.
template <class T, class A>
int load_matrix(const JacobiSvdParams& p, int64_t b, const MatrixBuffer<A>& m) {
  const int exponent = load_scaled<T>(p, b, m.x, 1, m.ld);
  for (int64_t c = 0; c < p.cols; ++c) {
    A* column = m.x + c * m.ld;
    std::fill(column + p.rows, column + m.ld, A(0));
    if (m.ld_v > 0) column[m.ld_w + c] = 1;
  }
  return exponent;
}

// From converged columns (m.norm2 exact) to the outputs of matrix b: singular values,
// their order, U (normalized, completed), signs, V, the report.  With right_from_w
// (the QR-preconditioned path), the V part holds sigma_c times the right singular
// vectors and the W part the left ones, already orthonormal: the V part is the one
// normalized and completed.
template <class A>
void finish_matrix(const JacobiSvdParams& p, int64_t b, const MatrixBuffer<A>& m, const SweepResult<A>& result,
                   int exponent, bool right_from_w = false) {
  const int64_t rows = p.rows, cols = p.cols;
  A* x = m.x;
  A* sigma = m.sigma;
  int64_t* perm = m.perm;
  const A tiny = jacobi_tiny<A>();
  bool finite = true;
  for (int64_t c = 0; c < cols; ++c) {  // finite once scaled back (a finite A's sigma may overflow A's range)
    // A NaN norm (non-finite input reaching the kernel) stays NaN: reported below, not zero.
    sigma[c] = m.norm2[c] >= tiny ? std::sqrt(m.norm2[c]) : (std::isnan(m.norm2[c]) ? m.norm2[c] : A(0));
    finite = finite && std::isfinite(std::ldexp(sigma[c], exponent));
  }
  std::iota(perm, perm + cols, int64_t(0));
  // Descending, ties in column order (a strict total order, so std::sort is
  // deterministic and needs no buffer); NaN (impossible after the finiteness check, but
  // never undefined behaviour in a sort) sorts last.
  std::sort(perm, perm + cols, [&](int64_t i, int64_t j) {
    const A si = std::isnan(sigma[i]) ? A(-1) : sigma[i], sj = std::isnan(sigma[j]) ? A(-1) : sigma[j];
    return si > sj || (si == sj && i < j);
  });

  if (p.u != nullptr) {
    // The side scaled by sigma: normalized, then its zero columns completed.
    const int64_t scaled = right_from_w ? m.ld_w : 0, scaled_len = right_from_w ? cols : rows;
    int64_t n_valid = 0;
    for (; n_valid < cols && sigma[perm[n_valid]] > 0; ++n_valid) {
      A* u = x + perm[n_valid] * m.ld + scaled;
      const A inv = A(1) / sigma[perm[n_valid]];
      for (int64_t r = 0; r < scaled_len; ++r) u[r] *= inv;
    }
    complete_basis(x + scaled, m.ld, scaled_len, cols, perm, n_valid);
    // Sign rule on the output U: the W part, or the V part for a transposed problem.
    const int64_t side = p.sign_from_v ? m.ld_w : 0, side_len = p.sign_from_v ? cols : rows;
    for (int64_t c = 0; c < cols; ++c) {
      A* column = x + c * m.ld;
      // The first entry of largest magnitude: the largest |x| as an integer max (it
      // vectorizes), then a search for it.
      Bits<A> best = 0;
      for (int64_t r = 0; r < side_len; ++r) best = std::max(best, abs_bits(column[side + r]));
      int64_t arg = 0;
      while (abs_bits(column[side + arg]) != best) ++arg;
      if (!(column[side + arg] < 0)) continue;
      for (int64_t r = 0; r < rows; ++r) column[r] = -column[r];
      for (int64_t r = 0; r < cols; ++r) column[m.ld_w + r] = -column[m.ld_w + r];
    }
    // Write along the output's smaller stride.
    auto write = [&](A* out, int64_t stride_r, int64_t stride_c, int64_t offset, int64_t n) {
      if (std::abs(stride_c) <= std::abs(stride_r)) {
        for (int64_t r = 0; r < n; ++r)
          for (int64_t pos = 0; pos < cols; ++pos) out[r * stride_r + pos * stride_c] = x[perm[pos] * m.ld + offset + r];
      } else {
        for (int64_t pos = 0; pos < cols; ++pos)
          for (int64_t r = 0; r < n; ++r) out[r * stride_r + pos * stride_c] = x[perm[pos] * m.ld + offset + r];
      }
    };
    write(static_cast<A*>(p.u) + b * p.u_stride_b, p.u_stride_r, p.u_stride_c, 0, rows);
    write(static_cast<A*>(p.v) + b * p.v_stride_b, p.v_stride_r, p.v_stride_c, m.ld_w, cols);
  }

  A* s_out = static_cast<A*>(p.s) + b * p.s_stride_b;
  for (int64_t pos = 0; pos < cols; ++pos) s_out[pos * p.s_stride_k] = std::ldexp(sigma[perm[pos]], exponent);
  p.sweeps[b] = result.sweeps;
  p.converged[b] = result.converged && finite ? 1 : 0;
  static_cast<A*>(p.off_diagonal)[b] = result.off;
}

// ---------------------------------------------------------------------------- QR preconditioning
// Jacobi on R^T of a column-pivoted QR of X (Drmac & Veselic 2008): X P = Q R, then the
// sweeps orthogonalize the columns of W = R^T (cols x cols), R^T V1 = U1 Sigma, and
//   X = (Q V1) Sigma (P U1)^T:  left vectors Q V1, right vectors P U1.
// The pivoted R is graded (|R_jj| decreasing, rows dominated by their diagonal), so R^T's
// columns start closer to orthogonal: fewer sweeps (N(0, 1) matrices, mean sweeps on
// R^T against X: fp32 64 x 64 7.0 / 8.3, 128 x 128 7.1 / 9.8; fp64 64 x 64 8.0 / 9.4)
// for O(rows cols^2) extra flops (the QR and forming Q).  Any pivot order gives a valid factorization; the pivots
// only steer the sweep count, so the partial column norms are downdated cheaply and
// recomputed only when the downdate cancels.

// Both work on row-major copies (row r at x[r * ldc], ldc = cols padded to whole
// vectors): a reflector then updates the rows as whole vectors over columns, w^T =
// v^T X and X -= tau v w^T, two multiply-adds per element and no horizontal sums
// (measured at 64 x 64 fp32: the QR about 14 us and Q 6 us per matrix, a tenth of the
// solve; with column dot products and updates, Q alone took 14 us).

// w^T = tau v[j:rows)^T x[j:rows, :] and x[j:rows, :] -= v w^T over the column vectors
// [q, q + K), w zero in the columns < keep_from (outside the trailing matrix); K
// accumulators in registers.
template <int K, class A>
LOWRANK_INLINE void reflect_block(A* __restrict x, int64_t ldc, int64_t j, int64_t rows, int64_t q,
                                  const A* __restrict v, A tau, int64_t keep_from) {
  WideVec<A> w[K] = {}, w_odd[K] = {};  // two rows per step: 2K independent multiply-add chains
  int64_t r = j;
  for (; r + 2 <= rows; r += 2) {
    const WideVec<A>* row = reinterpret_cast<const WideVec<A>*>(x + r * ldc) + q;
    const WideVec<A>* next = reinterpret_cast<const WideVec<A>*>(x + (r + 1) * ldc) + q;
    const A vr = v[r], vn = v[r + 1];
    for (int k = 0; k < K; ++k) {
      w[k] += vr * row[k];
      w_odd[k] += vn * next[k];
    }
  }
  if (r < rows) {
    const WideVec<A>* row = reinterpret_cast<const WideVec<A>*>(x + r * ldc) + q;
    for (int k = 0; k < K; ++k) w[k] += v[r] * row[k];
  }
  for (int k = 0; k < K; ++k) {
    w[k] = (w[k] + w_odd[k]) * tau;
    for (int64_t lane = 0; lane < kLanes<A>; ++lane)
      if ((q + k) * kLanes<A> + lane < keep_from) w[k][lane] = 0;
  }
  for (int64_t r = j; r < rows; ++r) {
    WideVec<A>* row = reinterpret_cast<WideVec<A>*>(x + r * ldc) + q;
    const A vr = v[r];
    for (int k = 0; k < K; ++k) row[k] -= vr * w[k];
  }
}

// H_j applied to the columns [keep_from, ldc) of x (rows [j, rows)), four column
// vectors at a time.
template <class A>
LOWRANK_INLINE void reflect_rows(A* x, int64_t ldc, int64_t j, int64_t rows, const A* v, A tau, int64_t keep_from) {
  const int64_t nc_vec = ldc / kLanes<A>;
  int64_t q = keep_from / kLanes<A>;
  for (; q + 4 <= nc_vec; q += 4) reflect_block<4>(x, ldc, j, rows, q, v, tau, keep_from);
  if (nc_vec - q == 3) reflect_block<3>(x, ldc, j, rows, q, v, tau, keep_from);
  if (nc_vec - q == 2) reflect_block<2>(x, ldc, j, rows, q, v, tau, keep_from);
  if (nc_vec - q == 1) reflect_block<1>(x, ldc, j, rows, q, v, tau, keep_from);
}

// Sum of x[r * ldc]^2 over r in [begin, end): four partial sums, so that the additions
// overlap instead of waiting for each other.
template <class A>
LOWRANK_INLINE A column_norm2(const A* x, int64_t ldc, int64_t begin, int64_t end) {
  A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) {
    s0 += x[r * ldc] * x[r * ldc];
    s1 += x[(r + 1) * ldc] * x[(r + 1) * ldc];
    s2 += x[(r + 2) * ldc] * x[(r + 2) * ldc];
    s3 += x[(r + 3) * ldc] * x[(r + 3) * ldc];
  }
  for (; r < end; ++r) s0 += x[r * ldc] * x[r * ldc];
  return (s0 + s1) + (s2 + s3);
}

// Largest column magnitude below which pivoted_qr rescales a column before its
// reflector: sqrt(min normal) / eps, so that squares of entries down to eps times the
// column's largest stay normal.
template <class A>
constexpr A kReflectorRescaleBelow =
    sizeof(A) == 8 ? A(1.4916681462400413e-154 / 2.220446049250313e-16) : A(1.0842022e-19f / 1.1920929e-7f);

// Householder QR with column pivoting of x (row-major, rows x cols, stride ldc, padding
// columns zero).  On exit the upper triangle of x holds R (zeros below it), h[j * rows
// + r] the reflector v_j (zero above row j, 1 at row j; H_j = I - tau_j v_j v_j^T,
// Q = H_0 ... H_(cols-1)), perm[j] the column of X at position j of X P.
template <class A>
LOWRANK_CPU_CLONES void pivoted_qr(A* x, int64_t ldc, int64_t rows, int64_t cols, A* h, A* tau, A* norm2,
                                   A* norm2_ref, int64_t* perm) {
  for (int64_t c = 0; c < cols; ++c) {
    norm2[c] = 0;
    perm[c] = c;
  }
  for (int64_t r = 0; r < rows; ++r)  // vectorizes over c
    for (int64_t c = 0; c < cols; ++c) norm2[c] += x[r * ldc + c] * x[r * ldc + c];
  std::copy(norm2, norm2 + cols, norm2_ref);
  for (int64_t j = 0; j < cols; ++j) {
    // The first column of largest partial norm (norms >= 0: compared as integers, a
    // vectorizable max, then a search).
    const A largest = round_max(norm2 + j, cols - j);
    int64_t pivot = j;
    while (pivot + 1 < cols && norm2[pivot] != largest) ++pivot;
    if (pivot != j) {
      for (int64_t r = 0; r < rows; ++r) std::swap(x[r * ldc + j], x[r * ldc + pivot]);
      std::swap(norm2[j], norm2[pivot]);
      std::swap(norm2_ref[j], norm2_ref[pivot]);
      std::swap(perm[j], perm[pivot]);
    }
    A* v = h + j * rows;
    std::fill(v, v + rows, A(0));
    v[j] = 1;
    // A column whose entries are all below sqrt(min normal) / eps (exactly structured
    // inputs: the trailing columns of a rank-deficient X shrink geometrically) is scaled
    // by a power of two first, as LAPACK's xLARFG does: its squares would underflow, and
    // beta and tau computed from subnormals leave H_j far from orthogonal.
    // The partial norm tells when the column cannot need it (its largest entry is at least
    // its norm / sqrt(rows); the factor 16 covers the downdate's error), which saves the
    // scan in the common case.
    int exponent = 0;
    if (norm2[j] < A(16) * static_cast<A>(rows) * kReflectorRescaleBelow<A> * kReflectorRescaleBelow<A>) {
      Bits<A> amax_bits = 0;
      for (int64_t r = j; r < rows; ++r) amax_bits = std::max(amax_bits, abs_bits(x[r * ldc + j]));
      A amax;
      std::memcpy(&amax, &amax_bits, sizeof amax);
      if (amax < kReflectorRescaleBelow<A>) std::frexp(amax, &exponent);
    }
    // x * 2^-exponent, exact (ldexp: 2^-exponent itself may overflow for a subnormal amax).
    auto scaled = [&](int64_t r) { return exponent == 0 ? x[r * ldc + j] : std::ldexp(x[r * ldc + j], -exponent); };
    A below = 0;  // squared norm of the (scaled) column j below row j
    if (exponent == 0) {
      below = column_norm2(x + j, ldc, j + 1, rows);
    } else {
      for (int64_t r = j + 1; r < rows; ++r) below += scaled(r) * scaled(r);
    }
    const A alpha = scaled(j);
    if (below == 0) {
      tau[j] = 0;  // already triangular in this column: H_j = I
      continue;
    }
    const A beta = -std::copysign(std::sqrt(alpha * alpha + below), alpha);
    tau[j] = (beta - alpha) / beta;
    const A inv = A(1) / (alpha - beta);
    for (int64_t r = j + 1; r < rows; ++r) {
      v[r] = scaled(r) * inv;
      x[r * ldc + j] = 0;
    }
    x[j * ldc + j] = std::ldexp(beta, exponent);
    reflect_rows(x, ldc, j, rows, v, tau[j], j + 1);
    // Partial norms of rows (j, rows): downdated, and recomputed once one has fallen
    // below sqrt(eps) of its value at its last recomputation (LAPACK's xGEQP3 rule: the
    // downdate's absolute error would then be large relative to it).
    const A recompute = std::sqrt(std::numeric_limits<A>::epsilon());
    for (int64_t c = j + 1; c < cols; ++c) {
      norm2[c] = std::max(A(0), norm2[c] - x[j * ldc + c] * x[j * ldc + c]);
      if (norm2[c] <= recompute * norm2_ref[c]) {
        norm2[c] = norm2_ref[c] = column_norm2(x + c, ldc, j + 1, rows);
      }
    }
  }
}

// The first cols columns of Q into y (row-major, rows x ldc): Q e_c = H_0 ... H_c e_c
// (H_j e_c = e_c for j > c), the reflectors applied last to first; columns c < j are
// still e_c, zero in rows >= j, when H_j is applied, so whole rows may be updated.
template <class A>
LOWRANK_CPU_CLONES void form_q(const A* h, const A* tau, int64_t rows, int64_t cols, A* y, int64_t ldc) {
  std::fill(y, y + rows * ldc, A(0));
  for (int64_t c = 0; c < cols; ++c) y[c * ldc + c] = 1;
  for (int64_t j = cols - 1; j >= 0; --j)
    if (tau[j] != 0) reflect_rows(y, ldc, j, rows, h + j * rows, tau[j], j);
}

// Q Y into y, for y (row-major, rows x ldc) holding Y = [V1; 0] (V1 cols x cols): the
// reflectors applied last to first to every column.  Forms the left singular vectors
// Q V1 after the sweeps when V1 was swept instead of Q (see jacobi_svd_one).
template <class A>
LOWRANK_CPU_CLONES void apply_q(const A* h, const A* tau, int64_t rows, int64_t cols, A* y, int64_t ldc) {
  for (int64_t j = cols - 1; j >= 0; --j)
    if (tau[j] != 0) reflect_rows(y, ldc, j, rows, h + j * rows, tau[j], 0);
}

// ---------------------------------------------------------------------------- one matrix per task
// Whether the preconditioned path sweeps V1 (V = I, cols rows) and forms Q V1 after the
// sweeps, rather than sweeping Q V1 (rows rows) directly: when X has more padded rows
// than R^T (see jacobi_svd_one).
template <class A>
bool defers_q(int64_t rows, int64_t cols) {
  return padded_rows<A>(rows) > padded_rows<A>(cols);
}

// Columns (rows, cols) of the Jacobi problem of the one-matrix path: X itself, or R^T
// (cols x cols) when preconditioned.
template <class A>
SweepResult<A> run_sweeps(const JacobiSvdParams& p, const MatrixBuffer<A>& m, int64_t cols, const Schedule& schedule,
                          RoundScratch<A> scratch) {
  // Column lengths of 64 and 128 fp32 rows, 32 and 64 fp64 (4 and 8 vectors), with V:
  // unrolled column loops, measured 8 % faster at 64 x 64 fp32.
  const int64_t w_vec = m.ld_w / kLanes<A>, all_vec = m.ld / kLanes<A>;
  const A tol2 = static_cast<A>(p.tol * p.tol);
  const int thresholds = cols <= kThresholdMaxCols ? kThresholdSweeps : 0;
  if (w_vec == 4 && all_vec == 8)
    return jacobi_sweeps<A, 4, 8>(m.x, m.ld_w, m.ld_v, cols, m.norm2, schedule, scratch, tol2, p.max_sweeps, thresholds);
  if (w_vec == 8 && all_vec == 16)
    return jacobi_sweeps<A, 8, 16>(m.x, m.ld_w, m.ld_v, cols, m.norm2, schedule, scratch, tol2, p.max_sweeps,
                                   thresholds);
  return jacobi_sweeps<A, 0, 0>(m.x, m.ld_w, m.ld_v, cols, m.norm2, schedule, scratch, tol2, p.max_sweeps, thresholds);
}

template <class T>
void jacobi_svd_one(const JacobiSvdParams& p, const Schedule& schedule, int64_t b, bool precondition) {
  using A = acc_t<T>;
  const bool uv = p.u != nullptr;
  const int64_t rows = p.rows, cols = p.cols;
  const int64_t max_round = std::max<int64_t>(schedule.max_round, 1), acc = static_cast<int64_t>(sizeof(A));
  const int64_t ld_w = padded_rows<A>(rows);
  const int64_t qr_bytes = precondition ? MatrixBuffer<A>::bytes_padded(padded_rows<A>(cols) + (uv ? ld_w : 0), cols) +
                                              Arena::round_up(rows * padded_rows<A>(cols) * acc) +
                                              Arena::round_up(cols * rows * acc) + 3 * Arena::round_up(cols * acc) +
                                              Arena::round_up(cols * 8)
                                        : 0;
  Arena arena(MatrixBuffer<A>::bytes(rows, cols, uv) + 7 * Arena::round_up(max_round * acc) +
              max_round * kVectorBytes + Arena::round_up(max_round * 4) + qr_bytes);
  const MatrixBuffer<A> m = MatrixBuffer<A>::take(arena, rows, cols, uv);
  RoundScratch<A> scratch;
  for (A** array : {&scratch.dot, &scratch.off2, &scratch.action, &scratch.c, &scratch.s, &scratch.norm2_i,
                    &scratch.norm2_j})
    *array = arena.take<A>(max_round);
  scratch.dot_lanes = arena.take<WideVec<A>>(max_round);
  scratch.rotated = arena.take<int32_t>(max_round);

  if (!precondition) {
    const int exponent = load_matrix<T>(p, b, m);
    finish_matrix(p, b, m, run_sweeps(p, m, cols, schedule, scratch), exponent);
    return;
  }
  // [W; V] = [R^T; Q]: the rotations accumulate Q V1, the left singular vectors, directly.
  // For tall X (more padded rows than R^T has) V starts as I instead: the rotations then
  // touch cols rather than rows entries of V, and Q V1 is formed once after the sweeps
  // (apply_q: 2 rows cols^2 multiply-adds, the price of a few dozen rotations).
  const int64_t ldc = padded_rows<A>(cols);
  const bool defer_q = uv && defers_q<A>(rows, cols);
  const MatrixBuffer<A> r = MatrixBuffer<A>::take_padded(arena, ldc, uv ? (defer_q ? ldc : ld_w) : 0, cols);
  A* xr = arena.take<A>(rows * ldc);  // X, then Q, row-major
  A* h = arena.take<A>(cols * rows);
  A* tau = arena.take<A>(cols);
  A* norm2 = arena.take<A>(cols);
  A* norm2_ref = arena.take<A>(cols);
  int64_t* qr_perm = arena.take<int64_t>(cols);
  const int exponent = load_scaled<T>(p, b, xr, ldc, 1);
  for (int64_t r = 0; r < rows; ++r) std::fill(xr + r * ldc + cols, xr + (r + 1) * ldc, A(0));
  pivoted_qr(xr, ldc, rows, cols, h, tau, norm2, norm2_ref, qr_perm);
  for (int64_t c = 0; c < cols; ++c) {  // column c of R^T: row c of R (zero left of the diagonal)
    A* col = r.x + c * r.ld;
    std::copy(xr + c * ldc, xr + c * ldc + cols, col);
    std::fill(col + cols, col + r.ld_w, A(0));
  }
  if (defer_q) {
    for (int64_t c = 0; c < cols; ++c) {
      A* col = r.x + c * r.ld + r.ld_w;
      std::fill(col, col + r.ld_v, A(0));
      col[c] = 1;
    }
  } else if (uv) {
    form_q(h, tau, rows, cols, xr, ldc);
    for (int64_t c = 0; c < cols; ++c) {
      A* col = r.x + c * r.ld + r.ld_w;
      for (int64_t q = 0; q < rows; ++q) col[q] = xr[q * ldc + c];
      std::fill(col + rows, col + r.ld_v, A(0));
    }
  }
  const SweepResult<A> result = run_sweeps(p, r, cols, schedule, scratch);
  if (!uv) {
    finish_matrix(p, b, r, result, exponent);
    return;
  }
  if (defer_q) {  // xr = Q [V1; 0], row-major
    std::fill(xr, xr + rows * ldc, A(0));
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t q = 0; q < cols; ++q) xr[q * ldc + c] = r.x[c * r.ld + r.ld_w + q];
    apply_q(h, tau, rows, cols, xr, ldc);
  }
  for (int64_t c = 0; c < cols; ++c) {
    A* out = m.x + c * m.ld;
    const A* w = r.x + c * r.ld;
    if (defer_q) {  // left: (Q V1)[:, c]
      for (int64_t q = 0; q < rows; ++q) out[q] = xr[q * ldc + c];
      std::fill(out + rows, out + m.ld_w, A(0));
    } else {
      std::copy(w + r.ld_w, w + r.ld, out);
    }
    for (int64_t q = 0; q < cols; ++q) out[m.ld_w + qr_perm[q]] = w[q];  // right, times sigma_c: P W[:, c]
    m.norm2[c] = r.norm2[c];
  }
  finish_matrix(p, b, m, result, exponent, /*right_from_w=*/true);
}

// ---------------------------------------------------------------------------- matrices in SIMD lanes
// kGroup matrices per task, one per lane of a 32-byte vector (8 fp32, 4 fp64): element
// (r, c) of the group's matrix g is lane g of x[c * ld + r], columns again [W; V]
// (ld = rows + cols, no padding).  Every per-pair quantity (dot product, decision,
// rotation coefficients) is then a vector over the group, so the per-pair bookkeeping
// of the one-matrix path (horizontal sums, scalar decisions, loop control) is paid once
// per kGroup matrices, and the rotations are long SIMD loops over ld rows.  Each lane
// follows exactly the arithmetic of its own matrix (masked updates), so a matrix's
// result does not depend on the other matrices of its group.  The group sweeps until
// every lane has had a rotation-free sweep (or max_sweeps); converged lanes are left
// unchanged by later sweeps.
constexpr int64_t kLaneBytes = 32;
template <class A>
using Lanes = typename VecOf<A, kLaneBytes>::type;
template <class A>
constexpr int64_t kGroup = kLaneBytes / static_cast<int64_t>(sizeof(A));

template <class A>
LOWRANK_INLINE Lanes<A> lanes_dot(const Lanes<A>* x, const Lanes<A>* y, int64_t n) {
  Lanes<A> acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    acc0 += x[r] * y[r];
    acc1 += x[r + 1] * y[r + 1];
    acc2 += x[r + 2] * y[r + 2];
    acc3 += x[r + 3] * y[r + 3];
  }
  for (; r < n; ++r) acc0 += x[r] * y[r];
  return (acc0 + acc1) + (acc2 + acc3);
}

template <class A>
LOWRANK_INLINE bool any_lane(const Lanes<A>& flags) {
  bool any = false;
  for (int64_t lane = 0; lane < kGroup<A>; ++lane) any |= flags[lane] != A(0);
  return any;
}

// Per-round scratch of the group path, max_round entries each.
template <class A>
struct GroupScratch {
  Lanes<A>*dot, *c, *s, *refresh;  // refresh: 1 in the lanes whose two norms need recomputing
  uint8_t *rotate, *any_refresh;    // per pair: some lane rotates / refreshes
};

// Sweeps of a group (stacked columns x [cols][ld], W rows [0, ld_w)); fills one
// SweepResult per lane; on exit norm2 holds exact squared norms.  Lanes that keep a
// pair rotate it by (c, s) = (1, 0), which leaves it unchanged (up to the sign of zero
// entries), so a lane's values never depend on what the other lanes decide.
template <class A>
LOWRANK_CPU_CLONES void group_sweeps(Lanes<A>* x, int64_t ld_w, int64_t ld, int64_t cols, Lanes<A>* norm2,
                                     const Schedule& schedule, GroupScratch<A> s, A tol2, int max_sweeps,
                                     SweepResult<A>* results) {
  using L = Lanes<A>;
  const int64_t n_rounds = static_cast<int64_t>(schedule.round_size.size());
  auto refresh = [&](int64_t col, const L& mask) {  // recompute the norm where mask = 1
    const L* column = x + col * ld;
    norm2[col] = mask != A(0) ? lanes_dot<A>(column, column, ld_w) : norm2[col];
  };
  const L zero = {}, one = zero + A(1);
  L done = zero;  // 1 in the lanes that have converged
  for (int sweep = 1; sweep <= max_sweeps; ++sweep) {
    for (int64_t col = 0; col < cols; ++col) refresh(col, one);
    L off2 = zero, rotated = zero;
    for (int64_t round = 0; round < n_rounds; ++round) {
      const int64_t n_pairs = schedule.round_size[round];
      const uint16_t* pi = schedule.first.data() + schedule.round_begin[round];
      const uint16_t* pj = schedule.second.data() + schedule.round_begin[round];
      for (int64_t k = 0; k < n_pairs; ++k) s.dot[k] = lanes_dot<A>(x + pi[k] * ld, x + pj[k] * ld, ld_w);
      for (int64_t k = 0; k < n_pairs; ++k) {
        const int64_t i = pi[k], j = pj[k];
        const L alpha = norm2[i], beta = norm2[j], gamma = s.dot[k];
        const L o2 = jacobi_off2<L, A>(alpha, beta, gamma);
        L t, c;
        jacobi_rotation<L, A>(alpha, beta, gamma, t, c, Rsqrt12<L, A>{});
        const auto rotate = o2 > tol2;
        off2 = o2 > off2 ? o2 : off2;
        rotated = rotate ? one : rotated;
        const L alpha_new = alpha - t * gamma, beta_new = beta + t * gamma;
        const auto cancel = (alpha_new < A(0.25) * alpha) | (beta_new < A(0.25) * beta);
        s.c[k] = rotate ? c : one;
        s.s[k] = rotate ? c * t : zero;
        s.refresh[k] = rotate & cancel ? one : zero;
        norm2[i] = rotate ? alpha_new : alpha;
        norm2[j] = rotate ? beta_new : beta;
        const L rotate_flags = rotate ? one : zero;
        s.rotate[k] = any_lane<A>(rotate_flags);
        s.any_refresh[k] = any_lane<A>(s.refresh[k]);
      }
      for (int64_t k = 0; k < n_pairs; ++k) {
        if (!s.rotate[k]) continue;
        L* xi = x + pi[k] * ld;
        L* xj = x + pj[k] * ld;
        const L c = s.c[k], sn = s.s[k];
        for (int64_t r = 0; r < ld; ++r) {
          const L a = xi[r], b = xj[r];
          xi[r] = c * a - sn * b;
          xj[r] = sn * a + c * b;
        }
      }
      for (int64_t k = 0; k < n_pairs; ++k) {
        if (!s.any_refresh[k]) continue;
        refresh(pi[k], s.refresh[k]);
        refresh(pj[k], s.refresh[k]);
      }
    }
    bool all_done = true;
    for (int64_t lane = 0; lane < kGroup<A>; ++lane) {
      if (done[lane] != A(0)) continue;
      results[lane].sweeps = sweep;
      results[lane].off = std::sqrt(off2[lane]);
      results[lane].converged = rotated[lane] == A(0);
      all_done = all_done && results[lane].converged;
    }
    done = rotated == A(0) ? one : done;
    if (all_done) break;
  }
  for (int64_t col = 0; col < cols; ++col) refresh(col, one);
}

template <class T>
void jacobi_svd_group(const JacobiSvdParams& p, const Schedule& schedule, int64_t first) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  const int64_t rows = p.rows, cols = p.cols, ld_w = rows, ld = rows + (p.u != nullptr ? cols : 0);
  const int64_t max_round = std::max<int64_t>(schedule.max_round, 1), lane_bytes = kLaneBytes;
  Arena arena(MatrixBuffer<A>::bytes(rows, cols, p.u != nullptr) + Arena::round_up(cols * ld * lane_bytes) +
              Arena::round_up(cols * lane_bytes) + 4 * Arena::round_up(max_round * lane_bytes) +
              2 * Arena::round_up(max_round));
  const MatrixBuffer<A> m = MatrixBuffer<A>::take(arena, rows, cols, p.u != nullptr);
  L* x = arena.take<L>(cols * ld);
  L* norm2 = arena.take<L>(cols);
  GroupScratch<A> scratch;
  for (L** array : {&scratch.dot, &scratch.c, &scratch.s, &scratch.refresh}) *array = arena.take<L>(max_round);
  scratch.rotate = arena.take<uint8_t>(max_round);
  scratch.any_refresh = arena.take<uint8_t>(max_round);

  // Load each matrix through the one-matrix buffer and interleave it into its lane;
  // lanes past the end of the batch hold zero matrices (converged at once).
  const int64_t count = std::min<int64_t>(kGroup<A>, p.batch - first);
  int exponents[kGroup<A>] = {};
  std::fill(x, x + cols * ld, L{});
  for (int64_t lane = 0; lane < count; ++lane) {
    exponents[lane] = load_matrix<T>(p, first + lane, m);
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = 0; r < rows; ++r) x[c * ld + r][lane] = m.x[c * m.ld + r];
      for (int64_t r = rows; r < ld; ++r) x[c * ld + r][lane] = m.x[c * m.ld + m.ld_w + (r - rows)];
    }
  }

  SweepResult<A> results[kGroup<A>];
  group_sweeps<A>(x, ld_w, ld, cols, norm2, schedule, scratch, static_cast<A>(p.tol * p.tol), p.max_sweeps,
                  results);

  for (int64_t lane = 0; lane < count; ++lane) {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = 0; r < rows; ++r) m.x[c * m.ld + r] = x[c * ld + r][lane];
      for (int64_t r = rows; r < ld; ++r) m.x[c * m.ld + m.ld_w + (r - rows)] = x[c * ld + r][lane];
      m.norm2[c] = norm2[c][lane];
    }
    finish_matrix(p, first + lane, m, results[lane], exponents[lane]);
  }
}

}  // namespace

void check_jacobi_svd_params(const JacobiSvdParams& p) {
  LOWRANK_CHECK(p.batch >= 0, "batched_svd: batch must be >= 0; got ", p.batch);
  LOWRANK_CHECK(p.cols >= 0 && p.rows >= p.cols, "batched_svd: expected rows >= cols >= 0 (pass a wide matrix "
                "transposed); got rows = ", p.rows, ", cols = ", p.cols);
  LOWRANK_CHECK(p.cols <= kJacobiMaxCols, "batched_svd: cols = min(m, n) must be <= ", kJacobiMaxCols, "; got ", p.cols);
  LOWRANK_CHECK(p.tol >= 0 && std::isfinite(p.tol), "batched_svd: tol must be finite and >= 0; got ", p.tol);
  LOWRANK_CHECK(p.max_sweeps >= 1, "batched_svd: max_sweeps must be >= 1; got ", p.max_sweeps);
  LOWRANK_CHECK((p.u == nullptr) == (p.v == nullptr), "batched_svd: u and v must both be given or both be null");
  if (p.batch > 0 && p.cols > 0)
    LOWRANK_CHECK(p.a != nullptr && p.s != nullptr, "batched_svd: a and s must not be null");
  if (p.batch > 0)
    LOWRANK_CHECK(p.sweeps != nullptr && p.converged != nullptr && p.off_diagonal != nullptr,
                  "batched_svd: sweeps, converged and off_diagonal must not be null");
}

void jacobi_svd_cpu(const JacobiSvdParams& p, int num_threads) {
  check_jacobi_svd_params(p);
  if (p.batch == 0) return;
  const bool compute_uv = p.u != nullptr;
  const int64_t work = p.batch * std::max<int64_t>(p.rows, 1) * p.cols * p.cols;
  const int threads = work < kSerialWork ? 1 : num_threads;
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t lane_column = (p.rows + (compute_uv ? p.cols : 0)) * kLaneBytes;
    if (lane_column * p.cols <= kGroupMaxBytes) {
      const Schedule schedule = make_schedule(p.cols, std::max<int64_t>(2, kBlockBytes / (2 * lane_column)));
      const int64_t n_groups = (p.batch + kGroup<A> - 1) / kGroup<A>;
      parallel_for(n_groups, threads, [&](int64_t g) { jacobi_svd_group<T>(p, schedule, g * kGroup<A>); });
    } else {
      const bool precondition = p.cols >= kPreconditionMinCols;
      // Column of the swept problem: [X; V] ([rows + cols]), [R^T; Q V1] ([cols + rows]) or
      // [R^T; V1] ([cols + cols]).
      const int64_t w_rows = precondition ? p.cols : p.rows;
      const int64_t v_rows = precondition && !defers_q<A>(p.rows, p.cols) ? p.rows : p.cols;
      const int64_t column = (padded_rows<A>(w_rows) + (compute_uv ? padded_rows<A>(v_rows) : 0)) * sizeof(A);
      const Schedule schedule = make_schedule(p.cols, std::max<int64_t>(2, kBlockBytes / (2 * column)));
      parallel_for(p.batch, threads, [&](int64_t b) { jacobi_svd_one<T>(p, schedule, b, precondition); });
    }
  });
}

}  // namespace lowrank_ops
