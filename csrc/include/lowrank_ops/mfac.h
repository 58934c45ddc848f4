// M-FAC passes over the gradient buffer (ALGORITHMS.md section 6).
//
// The buffer G is [capacity, dim] row-major in a storage dtype (fp32, fp64, fp16 or
// bf16); only its first n_rows rows take part.  Vectors x and outputs of the combine are
// in the compute type acc_t<storage> (fp32, or fp64 for fp64 storage); every sum runs in
// fp64 whatever the storage (bf16 storage halves the bytes read).
//
//   mfac_dots    : out[j, i] = sum_c G[i, c] * x[j, c]          (G x, the first pass)
//                  optionally fused with the ring-buffer write: row write_slot is first
//                  overwritten with x[0] rounded to the storage dtype, and the dots of
//                  x[0] use that rounded value, so that the new Gram row G round(g)
//                  matches the stored buffer exactly.  One read of G (plus one row written).
//   mfac_combine : out[j, c] = alpha * x[j, c] + beta * sum_i coef[j, i] * G[i, c]
//                  (x - G^T c, the second pass).  One read of G.
//
// Why fp64 sums (and the wide dots and coefficients): for x in the span of the
// gradients, F^-1 x = (x - G^T c) / lambda cancels; the rounding of the dots, of c and of
// the sum G^T c is amplified by about ||G||^2 / (n lambda) (1e3-1e5 at M-FAC's damping
// 1e-5..1e-7 for gradients 0.01 randn(4096)).  fp32 data times fp32 data is exact in fp64,
// so with fp64 sums, dots and coefficients the only fp32 rounding left is the output's,
// once.  The passes stay memory-bound (the fp32 -> fp64 widening and fp64 FMAs fit under
// the bytes; bench/bench_mfac.py).
//
// Memory floor of one optimizer step (update + IHVP of the same gradient): these two
// passes, 2 * n_rows * dim * sizeof(storage) bytes; everything else is O(dim + n_rows^2).
//
// Layout: x and out are [k, dim] with row stride ld (elements), unit column stride;
// coef is [k, n_rows] contiguous.  Kernels never allocate device memory and never
// synchronize; CUDA kernels run on the caller's stream.
#pragma once

#include <cstdint>

#include "lowrank_ops/dtype.h"
#include "lowrank_ops/host_device.h"

namespace lowrank_ops {

struct MfacDotsParams {
  void* grads = nullptr;      // [>= n_rows, dim], row stride grads_ld, storage dtype (written only at write_slot)
  const void* x = nullptr;    // [k, dim], row stride x_ld, acc type
  void* out = nullptr;        // [k, n_rows] contiguous, acc type (fp64 if wide); fully overwritten
  int64_t n_rows = 0, dim = 0, k = 0;
  int64_t grads_ld = 0, x_ld = 0;
  int64_t write_slot = -1;    // -1: read only; else a row in [0, n_rows)
  bool wide = false;          // out in fp64 (the fp64 sums unrounded) instead of the acc type
  DType dtype = DType::float32;  // storage dtype of grads
};

struct MfacCombineParams {
  const void* grads = nullptr;  // [>= n_rows, dim], row stride grads_ld, storage dtype
  const void* coef = nullptr;   // [k, n_rows] contiguous, acc type (fp64 if wide)
  const void* x = nullptr;      // [k, dim], row stride x_ld, acc type (may be nullptr when alpha == 0)
  void* out = nullptr;          // [k, dim], row stride out_ld, acc type; fully overwritten
  int64_t n_rows = 0, dim = 0, k = 0;
  int64_t grads_ld = 0, x_ld = 0, out_ld = 0;
  double alpha = 1.0, beta = -1.0;
  DType dtype = DType::float32;
  bool wide = false;            // coef in fp64 instead of the acc type
};

// Shape sanity shared by both back ends (throws std::invalid_argument).
void check_mfac_dots_params(const MfacDotsParams& p);
void check_mfac_combine_params(const MfacCombineParams& p);

// CPU (csrc/cpu/mfac_cpu.cpp): threads split the columns; each thread streams its
// column range of every row once.
void mfac_dots_cpu(const MfacDotsParams& p, int num_threads);
void mfac_combine_cpu(const MfacCombineParams& p, int num_threads);

// Solves (U^T U) x = b in place for each of the k rows b of B [k, n] (row stride b_ld),
// with U [n, n] upper triangular, float64, row stride u_ld (the Cholesky factor of K,
// stored upper so that its columns in the lower view are contiguous rows here): the
// m x m step of an IHVP between the two passes.  Single-threaded on purpose: a threaded
// LAPACK call there leaves OpenMP workers spinning on the cores the next pass's threads
// need (measured: the following pass took 3.8 ms longer at m = 256, d = 1e5 on 2 cores).
// O(k n^2).
void mfac_cholesky_solve_cpu(const double* U, int64_t u_ld, double* B, int64_t b_ld, int64_t n, int64_t k);

// The whole application of K^-1 between the passes, in one call (CPU):
//   c = (U^T U)^-1 products  per vector (float64 solve; U the upper Cholesky factor of K,
//       [n_rows, n_rows], row stride u_ld),
//   out = alpha x + beta c G_n  (mfac_combine with the fp64 coefficients c, wide).
// products: [k, n_rows] contiguous, fp64 (the wide dots), or nullptr to compute them here
// as G_n x (mfac_dots on p's grads and x, wide: then p.x is required).  p.coef and p.wide
// are ignored.  The same arithmetic as mfac_dots, mfac_cholesky_solve_cpu and
// mfac_combine, in one call: no Python work and no tensor allocations between the passes
// (measured 440-485 against 568 us per ihvp, m = 32, d = 1e5, 2 cores).
void mfac_apply_cpu(const MfacCombineParams& p, const double* U, int64_t u_ld, const void* products, int num_threads);

// Whether d, a squared pivot of the factorization of an n x n K (or of its rank update),
// is usable: finite, and above n eps kk, the rounding of the subtraction that formed it
// from kk (K's diagonal entry, or the rotated row's old squared pivot).  At or below it d
// is rounding noise and K numerically singular (nearly parallel gradients, damping under
// the Gram matrix's resolution): a factor through such a pivot gave products of 1e284
// where 0.1 was right, and whether LAPACK's dpotrf fails on that K is rounding luck.
LOWRANK_HOST_DEVICE inline bool mfac_valid_pivot(double d, double kk, int64_t n) {
  return d > static_cast<double>(n) * 2.220446049250313e-16 * kk && d <= 1.7976931348623157e308;  // NaN: false
}

// Cholesky factorization in place: A [n, n] (float64, row stride a_ld; only its upper
// triangle is read) becomes U, upper triangular with U^T U = A, zeros below the
// diagonal.  Returns 0, or the 1-based column whose pivot failed mfac_valid_pivot (A not
// numerically positive definite, or with a non-finite entry).  O(n^3 / 3),
// single-threaded for the reason above: the CPU path refactors K with it for n <= a few
// hundred (where it takes milliseconds).
int64_t mfac_cholesky_factor_cpu(double* A, int64_t a_ld, int64_t n);

// Rank update of the factor after the window replaced one gradient: U^T U = K on entry;
// on success U^T U = K' where K' is K with row and column s replaced by row [n] (the new
// row of K, diagonal included).  O(n^2): a forward substitution for the new column s,
// then one sweep of the trailing block applying, per column, the rank-1 update with the
// old row s of U and the rank-1 downdate with the new one (LINPACK dchud/dchdd-style
// rotations; the update first, so every intermediate matrix stays positive definite).
// Returns false when the new diagonal or a downdate pivot fails mfac_valid_pivot (K'
// not numerically positive definite at working precision, or a non-finite row: an
// overflowed Gram row): U is then partly modified and the caller must refactor K' from
// scratch.  work: 2 n doubles.  Single-threaded.
bool mfac_cholesky_replace_cpu(double* U, int64_t u_ld, int64_t n, int64_t s, const double* row, double* work);

// CUDA twin of mfac_cholesky_replace_cpu (csrc/cuda/mfac_cuda.cu): the same contract,
// substitution and rotations (the two back ends agree to rounding), on one thread block
// in device memory.  U (row stride u_ld), row [n] and work (2 n doubles, used when the
// vectors do not fit in shared memory) are float64 device pointers; *ok (a device int)
// receives 1 on success and 0 when K' is not numerically positive definite or not finite
// (U is then invalid: refactor).  Runs on `stream` and does not synchronize: the caller
// reads *ok.
void mfac_cholesky_replace_cuda(double* U, int64_t u_ld, int64_t n, int64_t s, const double* row, double* work,
                                int* ok, int device, std::uintptr_t stream);

// CUDA (csrc/cuda/mfac_cuda.cu).  mfac_dots needs a workspace of
// mfac_dots_cuda_segments(n_rows, dim, k) * k * n_rows accumulators (partial sums per
// column segment, reduced in a second kernel: deterministic, no atomics).
int64_t mfac_dots_cuda_segments(int64_t n_rows, int64_t dim, int64_t k);
void mfac_dots_cuda(const MfacDotsParams& p, void* workspace, int64_t workspace_elems, int device,
                    std::uintptr_t stream);
void mfac_combine_cuda(const MfacCombineParams& p, int device, std::uintptr_t stream);

}  // namespace lowrank_ops
