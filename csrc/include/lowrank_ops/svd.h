// Batched exact SVD of small matrices by one-sided Jacobi (Hestenes), ALGORITHMS.md section 4.
//
// For every matrix X = A[b] ([rows, cols], rows >= cols; the caller passes a wide
// matrix as its transpose, through the strides) the kernels rotate pairs of columns
// of W = X until every pair is orthogonal to the tolerance, accumulating the rotations
// in V:  W = X V with orthogonal columns.  Then
//   sigma_k = ||w_k||,  u_k = w_k / sigma_k   (X = U diag(sigma) V^T),
// sorted by sigma descending (ties keep column order), signs normalized, and columns
// of U with sigma = 0 completed to an orthonormal set.
//
// Algorithm (both back ends):
//   * X is copied into a workspace in the accumulation type acc_t<dtype> (fp32 for
//     fp32/fp16/bf16, fp64 for fp64) and scaled by a power of two so that its largest
//     entry lies in [0.5, 1): squared column norms then never overflow, and scaling is
//     exact (sigma is scaled back at the end).
//   * A sweep visits every pair (i, j), i < j, once, in rounds of disjoint pairs (the
//     round-robin "circle" order of round_robin_pair below on CUDA, a cache-blocked
//     variant of it on CPU).  Pair (i, j) is rotated when
//         |w_i . w_j| > tol * ||w_i|| * ||w_j||
//     with the rotation of Rutishauser (jacobi_rotation below), which zeroes w_i . w_j.
//     Columns whose squared norm is below the smallest normal number (after scaling:
//     below 1e-19 * max|X| in fp32) count as zero and are never rotated.  The test is
//     evaluated squared (jacobi_off2 > tol^2), without square roots.
//   * CPU, from 40 columns on (csrc/cpu/svd_cpu.cpp, kPreconditionMinCols): the sweeps
//     run on R^T of a column-pivoted Householder QR, X P = Q R (Drmac & Veselic 2008:
//     fewer sweeps), with the rotations accumulated onto Q; then X = (Q V1) S (P U1)^T,
//     U1 the normalized final columns of R^T.  The tolerance, the report and the output
//     conventions below are the same.
//   * CPU, one matrix per task, up to 64 columns (kThresholdMaxCols): sweeps 1 to 3 rotate
//     only pairs above max(tol, 10^-k) in sweep k (threshold Jacobi: fewer rotations).
//   * A sweep in which no pair exceeds tol (so without any rotation) proves convergence.  Each matrix reports the sweeps
//     it used (the final, rotation-free sweep included), whether it converged within
//     max_sweeps, and the largest |w_i . w_j| / (||w_i|| ||w_j||) measured in its last
//     sweep (<= tol when converged).  A non-finite sigma (from non-finite input, or a
//     singular value beyond the dtype's range, e.g. a float32 8 x 8 of 3e38) is reported
//     as not converged.
//   * Sign normalization: the largest-magnitude entry (the first one on ties) of every
//     column of the *output* U is made positive, and the matching column of V flipped
//     with it.  Because a wide matrix arrives transposed, its output U is the kernel's
//     V: sign_from_v selects which side the rule reads.
//   * Zero columns (sigma = 0): u_k is completed deterministically, from the unit
//     vector e_q whose component outside the span of the previous columns of U is
//     largest, orthogonalized twice (Gram-Schmidt) and normalized; U stays orthonormal
//     for rank-deficient and zero matrices, and no NaN is produced.  (On the
//     QR-preconditioned CPU path the kernel's V is the normalized side, completed the
//     same way; its U = Q V1 is orthonormal by construction.)
//   * Each matrix's result depends only on that matrix, the shape and the dtype: not on
//     the rest of the batch, nor on the number of threads (bit for bit).  CPU and CUDA
//     visit pairs in different orders and round differently.
//
// Layouts (strides in elements; any strides, including transposed views):
//   a       [batch, rows, cols]  element (b, r, c) at a[b * a_stride_b + r * a_stride_r + c * a_stride_c]
//   u       [batch, rows, cols]  acc_t<dtype>, or nullptr (singular values only)
//   s       [batch, cols]        acc_t<dtype>, descending
//   v       [batch, cols, cols]  acc_t<dtype>, or nullptr; X = U diag(s) V^T
//   sweeps  [batch] int32, converged [batch] uint8 (0/1, torch.bool), off_diagonal [batch] acc_t<dtype>; contiguous
// u and v are both given or both nullptr.  Every output is fully overwritten.
#pragma once

#include <math.h>

#include <cstdint>

#include "lowrank_ops/dtype.h"
#include "lowrank_ops/host_device.h"

namespace lowrank_ops {

// Largest number of columns (after the transpose: min(m, n)) the kernels accept.  The
// Python op delegates much smaller sizes already (above 256) to torch.linalg.svd; this
// bound only keeps the CUDA kernel's per-column shared arrays small.
constexpr int64_t kJacobiMaxCols = 1024;

struct JacobiSvdParams {
  const void* a = nullptr;        // [batch, rows, cols] strided, dtype
  void* u = nullptr;              // [batch, rows, cols] strided, acc_t<dtype>, or nullptr
  void* s = nullptr;              // [batch, cols] strided, acc_t<dtype>
  void* v = nullptr;              // [batch, cols, cols] strided, acc_t<dtype>, or nullptr
  int32_t* sweeps = nullptr;      // [batch]
  uint8_t* converged = nullptr;   // [batch]
  void* off_diagonal = nullptr;   // [batch], acc_t<dtype>
  void* workspace = nullptr;      // CUDA only: jacobi_svd_cuda_workspace_bytes(...) bytes, or nullptr when that is 0
  int64_t workspace_bytes = 0;
  int64_t batch = 0, rows = 0, cols = 0;
  int64_t a_stride_b = 0, a_stride_r = 0, a_stride_c = 0;
  int64_t u_stride_b = 0, u_stride_r = 0, u_stride_c = 0;
  int64_t s_stride_b = 0, s_stride_k = 0;
  int64_t v_stride_b = 0, v_stride_r = 0, v_stride_c = 0;
  DType dtype = DType::float32;
  double tol = 0.0;        // relative orthogonality tolerance, >= 0
  int max_sweeps = 0;      // >= 1
  bool sign_from_v = false;  // normalize signs on V's columns (the output U of a transposed problem)
};

// Shape and argument sanity shared by both back ends (throws std::invalid_argument).
void check_jacobi_svd_params(const JacobiSvdParams& p);

// CPU (csrc/cpu/svd_cpu.cpp): matrices in parallel over num_threads threads, one matrix
// per task.  Throws std::invalid_argument naming A[b] when a matrix holds inf or NaN.
void jacobi_svd_cpu(const JacobiSvdParams& p, int num_threads);

// CUDA (csrc/cuda/svd_cuda.cu): one thread block per matrix, asynchronous on `stream`
// (a cudaStream_t) of `device`; never allocates, never synchronizes.  The matrix and V
// live in shared memory when they fit, else in `workspace`, whose size the caller gets
// from jacobi_svd_cuda_workspace_bytes (same arguments, 0 when shared memory suffices).
// Non-finite input is not detected here (the Python op checks it first); the kernel
// still terminates and reports such matrices as not converged.
int64_t jacobi_svd_cuda_workspace_bytes(int64_t batch, int64_t rows, int64_t cols, DType dtype, bool compute_uv,
                                        int device);
void jacobi_svd_cuda(const JacobiSvdParams& p, int device, std::uintptr_t stream);

// ---------------------------------------------------------------------------- shared math
// Used by both back ends (host and device), so CPU and CUDA rotate identically.

// Players of pair k (0 <= k < n_even / 2) in round `round` (0 <= round < n_even - 1) of
// the circle method over n_even (even) players: player 0 stays, the others rotate.
// Every pair i < j appears in exactly one round; the pairs of a round are disjoint.
// With an odd number of columns, n_even = cols + 1 and pairs with j == cols are skipped.
LOWRANK_HOST_DEVICE inline void round_robin_pair(int64_t n_even, int64_t round, int64_t k, int64_t& i, int64_t& j) {
  const int64_t pos_a = k, pos_b = n_even - 1 - k;
  const int64_t a = pos_a == 0 ? 0 : 1 + (pos_a - 1 + round) % (n_even - 1);
  const int64_t b = pos_b == 0 ? 0 : 1 + (pos_b - 1 + round) % (n_even - 1);
  i = a < b ? a : b;
  j = a < b ? b : a;
}

LOWRANK_HOST_DEVICE inline float jacobi_sqrt(float x) { return sqrtf(x); }
LOWRANK_HOST_DEVICE inline double jacobi_sqrt(double x) { return sqrt(x); }

// Smallest normal number: squared column norms below it count as zero.
template <class S>
LOWRANK_HOST_DEVICE constexpr S jacobi_tiny() {
  return sizeof(S) == 8 ? S(2.2250738585072014e-308) : S(1.17549435e-38f);
}

// The two functions below are generic in the value type A, with S its scalar type:
// A = S = float or double (CUDA, and the CPU's one-matrix-per-task path), or A a GCC
// vector of S (the CPU's matrices-in-SIMD-lanes path).  They are branch-free (selects
// only), so that loops over pairs vectorize too.

// Squared relative off-diagonal (w_i . w_j)^2 / (||w_i||^2 ||w_j||^2), computed as
// (gamma / alpha) (gamma / beta) (no square root, no overflow or spurious underflow of
// alpha beta); 0 when either column counts as zero.  Pairs with off2 > tol^2 rotate.
template <class A, class S = A>
LOWRANK_HOST_DEVICE inline A jacobi_off2(A norm2_i, A norm2_j, A dot) {
  const A off2 = (dot / norm2_i) * (dot / norm2_j);
  return (norm2_i >= jacobi_tiny<S>()) & (norm2_j >= jacobi_tiny<S>()) ? off2 : S(0);
}

// Rotation [c s; -s c], s = c t, that makes w_i' = c w_i - s w_j and
// w_j' = s w_i + c w_j orthogonal, given alpha = ||w_i||^2, beta = ||w_j||^2 and
// gamma = w_i . w_j != 0 (Rutishauser's formulas, Golub & Van Loan 8.5.2):
// zeta = (beta - alpha) / (2 gamma), t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)), the
// smaller of the two angles (|t| <= 1); then ||w_i'||^2 = alpha - t gamma and
// ||w_j'||^2 = beta + t gamma.  With u = min(|zeta|, 1 / |zeta|) (one division),
//   |t| = 1 / (u + sqrt(1 + u^2))        for |zeta| <= 1,
//   |t| = u / (1 + sqrt(1 + u^2))        for |zeta| >  1   (no overflow for huge zeta),
// so every square root has its argument in [1, 2]: rsqrt_1_2(y) must return 1 / sqrt(y)
// there (to a few ulps), which lets the CPU use a polynomial + Newton version that
// vectorizes.
// c is formed as 1 - d, d = t^2 / (sqrt(1 + t^2) (1 + sqrt(1 + t^2))) = 1 - c, not as
// rsqrt(1 + t^2): rounding 1 + t^2 drops most of t^2 for small t (all of it below
// sqrt(eps / 2)), so that c came out biased by up to an ulp and c^2 + s^2 != 1 by as
// much, at every rotation; d only needs relative accuracy, and 1 - d is rounded once.
// The drift of the column norms through the ~n rotations per column per sweep was the
// kernel's largest error: float32, 96 x 96 (spectra 1/i and exp(-i/8), 16 matrices),
// singular values 7.5e-6 -> 7.2e-7 relative to sigma_1, orthogonality of U 1.5e-5 ->
// 1.9e-6; 64 x 64 4.2e-6 -> 6.0e-7 and 8.6e-6 -> 1.8e-6; 16 x 16 (the lanes path)
// 6.7e-7 -> 3.8e-7 (LAPACK's float32 SVD: 1.2e-7), for one more division per pair.
template <class A, class S = A, class Rsqrt12>
LOWRANK_HOST_DEVICE inline void jacobi_rotation(A alpha, A beta, A gamma, A& t, A& c, Rsqrt12 rsqrt_1_2) {
  const A diff = beta - alpha, twice = S(2) * gamma;
  const A p = diff < S(0) ? -diff : diff, q = twice < S(0) ? -twice : twice;  // |zeta| = p / q
  const auto moderate = p <= q;
  const A u = (moderate ? p : q) / (moderate ? q : p);
  const A y = S(1) + u * u;
  const A root = y * rsqrt_1_2(y);  // sqrt(1 + u^2)
  const A abs_t = (moderate ? S(1) : u) / ((moderate ? u : S(1)) + root);
  t = ((diff < S(0)) != (gamma < S(0))) ? -abs_t : abs_t;  // sign(zeta)
  const A t2 = t * t, y2 = S(1) + t2, inverse_root = rsqrt_1_2(y2);
  c = S(1) - t2 * inverse_root / (S(1) + y2 * inverse_root);
}

}  // namespace lowrank_ops
