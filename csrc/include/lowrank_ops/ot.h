// Entropic optimal transport kernels: log-domain Sinkhorn and Sinkhorn-Newton-Sparse
// (ALGORITHMS.md section 5).
//
// Every kernel works on a batch of problems b < batch, each with `rows` x `cols` scaled
// log-plan entries
//     s_ij = (f_i + g_j - C_ij) / reg,        P_ij = exp(s_ij),
// and reduces over j (the columns) for every row i.  A column reduction is the same call
// with the roles swapped (rows <-> cols, f <-> g, x <-> y, and the cost matrix's row and
// column strides swapped): the Python op does that, the kernels only know rows.
//
// The cost C_ij comes from one of (OtCost):
//   matrix       C[b, i, j] at c[b * c_stride_b + i * c_stride_i + j * c_stride_j] (any strides)
//   sqeuclidean  sum_d (x[b, i, d] - y[b, j, d])^2          x, y contiguous [batch, rows|cols, dim]
//   l1           sum_d |x[b, i, d] - y[b, j, d]|
// so a point-cloud cost is computed inside the kernel and the rows x cols matrix is never
// stored.  f [batch, rows] and g [batch, cols] are contiguous, in the dtype of the inputs
// (float32 or float64; arithmetic in that precision).  `active` [batch] (uint8, or
// nullptr = all) marks the problems to process: the outputs of the others are written as
// zeros (ot_row_lse, ot_row_grad), left alone (counts, histograms) or never touched.
//
// Numerical contract: every exponential is of a value shifted by a running maximum
// (<= 0), so nothing overflows, in float32 at any reg; on the CPU (ot_exp) exp of values
// below the smallest normal's logarithm returns 0, where CUDA's exp in the log-sum-exp
// may return a subnormal (a difference below the smallest normal, in sums of terms up to
// 1).  The plan entries written out (ot_sparsify's values, ot_row_grad's weights) use
// ot_exp on both back ends: clamped at 88 / 709, flushed below the normals (so a +inf
// entry is written as exp(88) / exp(709)).  In the log-sum-exp a +inf log-plan entry (an
// overflow) gives NaN on both: the CPU through its max shift (inf - inf), CUDA by
// lse_add's explicit mapping.  No kernel allocates or synchronizes; CUDA kernels run
// asynchronously on the given stream.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#include "lowrank_ops/dtype.h"

#ifdef __CUDACC__
#define LOWRANK_OT_HD __host__ __device__ __forceinline__
#else
#define LOWRANK_OT_HD inline
#endif

namespace lowrank_ops {

enum class OtCost : int { matrix = 0, sqeuclidean = 1, l1 = 2 };

// Where the entries s_ij of one batch of problems come from (shared by every kernel).
struct OtSource {
  OtCost cost = OtCost::matrix;
  const void* c = nullptr;  // matrix cost, strided
  int64_t c_stride_b = 0, c_stride_i = 0, c_stride_j = 0;
  const void* x = nullptr;  // [batch, rows, dim] contiguous (point costs)
  const void* y = nullptr;  // [batch, cols, dim] contiguous
  int64_t dim = 0;
  const void* f = nullptr;  // [batch, rows] contiguous
  const void* g = nullptr;  // [batch, cols] contiguous
  const uint8_t* active = nullptr;  // [batch] or nullptr
  int64_t batch = 0, rows = 0, cols = 0;
  double reg = 1.0;
  DType dtype = DType::float64;  // float32 or float64 only
};

// ot_row_lse: for every active problem and row i
//   lse[b, i]       = log sum_j exp(s_ij)                      (log of the row marginal of P)
//   mean_cost[b, i] = sum_j C_ij exp(s_ij) / sum_j exp(s_ij)   (only when mean_cost != nullptr)
// so the row's share of the transport cost <C, P> is exp(lse) * mean_cost.
// lse, mean_cost: [batch, rows] contiguous, same dtype as f.  One pass over the entries
// (running maximum, rescaled per block of columns).
struct OtRowLseParams {
  OtSource src;
  void* lse = nullptr;
  void* mean_cost = nullptr;
};

// ot_log_histogram: counts[b, k] += #{j, i : lo_b + k w_b <= s_ij < lo_b + (k + 1) w_b}
// with w_b = (hi_b - lo_b) / n_bins; entries >= hi_b go to the last bin, entries < lo_b
// are not counted (for hi_b <= lo_b, a degenerate range, see ot_histogram_bin; never out
// of bounds).  lo, hi: [batch] (dtype of f); counts: [batch, n_bins] int64, which
// the caller zeroes.  Used to find the threshold of the largest k entries of P without
// sorting (two levels: a coarse histogram, then one of the coarse bin that holds the
// k-th largest entry).
struct OtHistogramParams {
  OtSource src;
  const void* lo = nullptr;
  const void* hi = nullptr;
  int64_t n_bins = 0;
  int64_t* counts = nullptr;
};

// ot_sparsify: the entries with s_ij >= threshold[b] (threshold: [batch], dtype of f).
//   counting (col_idx == nullptr): row_counts[b * rows + i] = #{j : s_ij >= threshold_b}
//   filling: for row r = b * rows + i, in column order, col_idx[row_ptr[r] + k] = j and
//            values[row_ptr[r] + k] = exp(s_ij) for the k-th kept entry of the row.
// row_ptr [batch * rows + 1] int64 is the exclusive prefix sum of the counts; inactive
// problems must have zero counts.  col_idx and values hold nnz entries.  Filling never
// writes outside [0, nnz): the CPU kernel checks row_ptr (0 <= row_ptr[r] <= row_ptr[r + 1]
// <= nnz) before writing anything, the CUDA kernel clamps each row's range to [0, nnz].
struct OtSparsifyParams {
  OtSource src;
  const void* threshold = nullptr;
  int64_t* row_counts = nullptr;
  const int64_t* row_ptr = nullptr;
  int64_t* col_idx = nullptr;
  void* values = nullptr;
  int64_t nnz = 0;
};

// ot_hessian_matvec: the SNS Newton matrix (the negated dual Hessian times reg) applied
// to v = (vx, vy):
//   out_x = r * vx + P_s vy,     out_y = c * vy + P_s^T vx
// with P_s the kept entries (CSR over batch * rows rows: row_ptr [batch * rows + 1],
// col_idx [nnz], values [nnz], columns in [0, cols)), r [batch, rows], c [batch, cols]
// the exact marginals of P.  All contiguous, dtype of values.  out_* fully overwritten.
// On CUDA the P_s^T part adds with atomics (summation order not deterministic).
// Memory-safe on any indices: row ranges are clamped to [0, nnz]; a column outside
// [0, cols) is an error on the CPU and skipped on CUDA (the Python op checks both).
struct OtHessianParams {
  const int64_t* row_ptr = nullptr;
  const int64_t* col_idx = nullptr;
  const void* values = nullptr;
  const void* r = nullptr;
  const void* c = nullptr;
  const void* vx = nullptr;
  const void* vy = nullptr;
  void* out_x = nullptr;
  void* out_y = nullptr;
  int64_t batch = 0, rows = 0, cols = 0, nnz = 0;
  DType dtype = DType::float64;
};

// ot_row_grad (point costs only): grad[b, i, :] = sum_j exp(s_ij - lse[b, i]) dC(x_i, y_j)/dx_i,
// the gradient of the row's cost share per unit mass (the caller multiplies by the row
// marginal).  lse [batch, rows] from ot_row_lse; grad [batch, rows, dim] contiguous.
struct OtRowGradParams {
  OtSource src;
  const void* lse = nullptr;
  void* grad = nullptr;
};

// Validation shared by both back ends (throws std::invalid_argument naming the
// argument, the expected and the actual value); defined in csrc/cpu/ot_cpu.cpp.
void check_ot_source(const OtSource& s, const char* op);
void check_ot_sparsify_params(const OtSparsifyParams& p);  // check_ot_source, then nnz
void check_ot_row_grad_params(const OtRowGradParams& p);   // check_ot_source, then a point cost
void check_ot_hessian_params(const OtHessianParams& p);

void ot_row_lse_cpu(const OtRowLseParams& p, int num_threads);
void ot_log_histogram_cpu(const OtHistogramParams& p, int num_threads);
void ot_sparsify_cpu(const OtSparsifyParams& p, int num_threads);
void ot_hessian_matvec_cpu(const OtHessianParams& p, int num_threads);
void ot_row_grad_cpu(const OtRowGradParams& p, int num_threads);

void ot_row_lse_cuda(const OtRowLseParams& p, int device, std::uintptr_t stream);
void ot_log_histogram_cuda(const OtHistogramParams& p, int device, std::uintptr_t stream);
void ot_sparsify_cuda(const OtSparsifyParams& p, int device, std::uintptr_t stream);
void ot_hessian_matvec_cuda(const OtHessianParams& p, int device, std::uintptr_t stream);
void ot_row_grad_cuda(const OtRowGradParams& p, int device, std::uintptr_t stream);

// ---------------------------------------------------------------------------- shared math

// Cost between point x (dim values) and point y.
template <class T>
LOWRANK_OT_HD T ot_point_cost(OtCost cost, const T* x, const T* y, int64_t dim) {
  T acc = T(0);
  if (cost == OtCost::sqeuclidean) {
    for (int64_t d = 0; d < dim; ++d) {
      const T diff = x[d] - y[d];
      acc += diff * diff;
    }
  } else {
    for (int64_t d = 0; d < dim; ++d) acc += fabs(x[d] - y[d]);
  }
  return acc;
}

// d cost(x, y) / d x_d.
template <class T>
LOWRANK_OT_HD T ot_point_cost_grad(OtCost cost, T xd, T yd) {
  const T diff = xd - yd;
  if (cost == OtCost::sqeuclidean) return T(2) * diff;
  return diff > T(0) ? T(1) : (diff < T(0) ? T(-1) : T(0));
}

// ot_log_histogram's bin of an entry s >= lo at pos = (s - lo) n_bins / (hi - lo): bin
// floor(pos), entries at or past hi in the last bin.  A pos that is negative or not a
// number (hi <= lo, e.g. hi == lo from rounding, or an infinite lo or hi) goes to bin 0:
// converting NaN or a negative value to a bin would index outside [0, n_bins).
template <class T>
LOWRANK_OT_HD int64_t ot_histogram_bin(T pos, int64_t n_bins) {
  if (pos >= static_cast<T>(n_bins)) return n_bins - 1;
  return pos >= T(0) ? static_cast<int64_t>(pos) : 0;
}

// exp(x), branch-free so that loops over it
// vectorize on the CPU: x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial
// (degree 13 for float64: truncation 4e-18; degree 7 for float32: 3e-9), 2^k from the
// exponent bits.  Results below the smallest normal number are flushed to 0; arguments
// above 709 (float64) / 88 (float32) are clamped there (the kernels only exponentiate
// values shifted by a maximum, or log-plan entries of a converging solver).
LOWRANK_OT_HD double ot_exp(double x) {
  const double magic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double log2e = 1.4426950408889634, ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  const double xc = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
  const double t = xc * log2e + magic;
  const double k = t - magic;
  const double r = (xc - k * ln2_hi) - k * ln2_lo;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t bits;
  memcpy(&bits, &t, sizeof bits);
  bits = (bits - int64_t(0x4338000000000000)  + 1023) << 52;  // (k + 1023) << 52
  double scale;
  memcpy(&scale, &bits, sizeof scale);
  return x < -708.0 ? 0.0 : p * scale;
}

LOWRANK_OT_HD float ot_exp(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float log2e = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-06f;
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = xc * log2e + magic;
  const float k = t - magic;
  const float r = (xc - k * ln2_hi) - k * ln2_lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  memcpy(&bits, &t, sizeof bits);
  bits = (bits - int32_t(0x4B400000) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

}  // namespace lowrank_ops
