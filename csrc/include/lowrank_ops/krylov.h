// Kernels of the Krylov solvers (ALGORITHMS.md section 7): single-vector CSR SpMV, one
// fused classical Gram-Schmidt pass over an Arnoldi basis, the block updates of the
// recycled space, and (CPU) a whole Arnoldi cycle in one call.
//
// Why own kernels: a restarted GMRES on a 4096..16384-unknown PDE system spends its
// time in these two operations, each a few microseconds of work, called thousands of
// times.  The foundation's csr_spmm is tiled for batches of vectors (5x slower than a
// plain row loop for one vector), and torch.mv / addmv go through MKL's OpenMP, whose
// spin-waiting costs milliseconds per call when the cores are shared.  Both kernels
// here run on lowrank_ops' own pool (parallel.h) and split the work only when it is
// large enough to pay for the hand-off.
//
// krylov_spmv:  y[r] = sum_{k in row r} values[k] * x[col_idx[k]]
//   row_ptr [n_rows + 1], col_idx [nnz] (int32 or int64), values [nnz], x [n_cols], y [n_rows];
//   all contiguous, float32 or float64 (accumulated in the same type: fp64 for fp64).
//   Memory-safe on any indices: row ranges are clamped to [0, nnz] and entries with a
//   column outside [0, n_cols) are skipped (the Python CSRMatrix checks both once, with
//   clear errors).  col_idx, values and x may be null when nnz = 0 (a zero matrix).
//
// krylov_cgs_pass:  one classical Gram-Schmidt pass of w against the rows of a basis Q,
//   or either half of it (mode):
//   Q [rows, n] with row stride q_stride (elements; rows contiguous), w [n] contiguous,
//   mode 0 (full pass): h = Q w (from w before the update), then w -= Q^T h;
//   mode 1 (dots):      h = Q w; w unchanged;
//   mode 2 (update):    w -= Q^T h with h given (w += Q^T c is mode 2 with h = -c);
//   norms [2] out (float64 for both dtypes): ||w||^2 before (modes 0, 1) and after (modes 0,
//   2) the update, accumulated in double (a float32 w of norm beyond ~1.8e19 or below ~1e-19
//   has no float32 square).
//   CPU: the n entries are split into n_chunks contiguous chunks (one task each);
//   workspace holds n_chunks * rows + rows acc values (partial sums, then -h).  Partial sums are
//   reduced in chunk order, so the result depends on n_chunks, not on thread timing.
//   CUDA: workspace is unused (may be null); h and norms are produced by block
//   reductions and atomics on the caller's stream (norms' order of summation varies).
//
// krylov_block:  the recycled-subspace updates of GCRO-DR, which touch every basis row
//   for each of k vectors, done in one sweep over the basis instead of k:
//   mode 0 (gram):    out[r * cols + c] = sum_e Q[r, e] W[c, e]      out [rows, cols] acc type, row-major
//   mode 1 (combine): Y[c, e] (+)= sum_r coef[r * cols + c] Q[r, e]   coef [rows, cols] (storage type), Y [cols, n]
//   Q [rows, n] row stride q_stride; W / Y [cols, n] row stride other_stride; accumulate: add to Y (mode 1)
//   instead of overwriting it.  CPU: chunks of the n entries, one task each; gram partial
//   sums in workspace [n_chunks * rows * cols] (acc type), reduced in chunk order.  CUDA:
//   gram is one block per (r, c), combine one thread per entry e.
//
// krylov_arnoldi (CPU only):  a whole restart cycle of (projected) Arnoldi for GMRES /
//   GCRO-DR on a CSR operator, in one call instead of ~10 Python/torch calls per step.
//   Step j: w = A v_j (SpMV into basis row kc + j + 1); one classical Gram-Schmidt pass of
//   w against basis rows [0, kc + j + 1) (the recycled C and V_0..V_j: the projection
//   (I - C C^T) and the Arnoldi orthogonalization in one pass), repeated when it cancelled
//   more than 90% of ||w|| (selective CGS2); h_{j+1,j} = ||w||; v_{j+1} = w / h_{j+1,j}
//   unless ||w|| <= 1e-14 ||A v_j|| (breakdown: the Krylov space is invariant, the cycle
//   stops with the exact minimizer); Givens rotations of the Hessenberg column; stop
//   when |g_{j+1}| <= target.  The arithmetic is that of krylov_spmv and krylov_cgs_pass
//   (same functions), so the cycle reproduces the Python loop over those kernels.
//   row_ptr / col_idx / values: CSR [n, n] with nnz entries (as krylov_spmv); basis [kc + steps + 1, n]
//   (at least that many rows: the caller checks), row stride q_stride, rows [0, kc) hold C
//   on entry, rows kc.. receive V (after a breakdown, row kc + j + 1 holds the unnormalized
//   remainder); r [n]: the starting residual (orthogonal to C, not inside the basis),
//   beta = ||r|| > 0.  Single-threaded when n_chunks = 1 (no pool hand-offs at all).
//   Outputs (float64, row-major, caller-zeroed): hessenberg [kc + steps + 1, steps]
//   (rows [0, kc): B = C^T A V, rows kc..: the unrotated Hbar), rotated [steps, steps]
//   (the upper-triangular Givens factor R), g [steps + 1] (rotated beta e1), givens
//   [2, steps] (cosines, sines), history [steps] (|g_{j+1}| / bnorm after each step).
//   workspace: krylov_arnoldi_workspace(kc, steps, n_chunks) elements of the storage type.  The n entries are split into n_chunks chunks (one task each), reduced in chunk
//   order (deterministic for a given n_chunks).  Returns the steps taken and breakdown.
//
// krylov_cg (CPU only):  up to `steps` iterations of conjugate gradients, unpreconditioned
//   or with a diagonal (Jacobi) preconditioner, on a CSR operator in one call: the
//   Python loop costs ~10 torch and kernel calls per iteration, several times the
//   iteration's own work at n ~ 1e3..1e5 (a 5-point stencil).  From x and r = b - A x
//   (both updated in place): z = d * r (d = inverse_diagonal; z = r when it is null),
//   p = z, rho = r . z; then per step: q = A p and p . q (one pass over the rows);
//   breakdown unless p . q > 0 and rho > 0 (finite); alpha = rho / p . q; x += alpha p,
//   r -= alpha q, z = d * r, ||r||^2 and r . z (one pass); history[j] = ||r|| / bnorm;
//   stop when ||r|| <= target (status 0) or ||r|| is not finite (status 2); else
//   p = z + (r . z / rho) p (one pass).  Status 1: `steps` iterations without either.
//   row_ptr / col_idx / values: CSR [n, n] with nnz entries (as krylov_spmv); x, r, p, q [n]
//   contiguous, the values' dtype (p, q: workspace; p holds the last direction on return);
//   inverse_diagonal, z [n] or both null; history [steps] float64 out.  Sums in the storage
//   type.  The n entries are split into n_chunks chunks (one task each); partial sums in
//   workspace [2 * n_chunks], reduced in chunk order (deterministic for a given n_chunks).
#pragma once

#include <cstdint>

#include "lowrank_ops/dtype.h"

namespace lowrank_ops {

struct KrylovSpmvParams {
  const void* row_ptr = nullptr;
  const void* col_idx = nullptr;
  const void* values = nullptr;
  const void* x = nullptr;
  void* y = nullptr;
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  int64_t nnz = 0;
  DType dtype = DType::float64;
  IndexType index_type = IndexType::int32;
};

struct KrylovCgsParams {
  const void* basis = nullptr;
  void* w = nullptr;
  void* h = nullptr;
  void* norms = nullptr;
  void* workspace = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  int64_t q_stride = 0;
  int64_t n_chunks = 1;
  int mode = 0;
  DType dtype = DType::float64;
};

struct KrylovBlockParams {
  const void* basis = nullptr;
  void* other = nullptr;
  const void* coef = nullptr;
  void* out = nullptr;
  void* workspace = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t n = 0;
  int64_t q_stride = 0;
  int64_t other_stride = 0;
  int64_t n_chunks = 1;
  int mode = 0;
  bool accumulate = false;
  DType dtype = DType::float64;
};

struct KrylovArnoldiParams {
  const void* row_ptr = nullptr;
  const void* col_idx = nullptr;
  const void* values = nullptr;
  void* basis = nullptr;
  const void* r = nullptr;
  double* hessenberg = nullptr;
  double* rotated = nullptr;
  double* g = nullptr;
  double* givens = nullptr;
  double* history = nullptr;
  void* workspace = nullptr;
  int64_t n = 0;
  int64_t nnz = 0;
  int64_t q_stride = 0;
  int64_t kc = 0;
  int64_t steps = 0;
  int64_t n_chunks = 1;
  double beta = 0;
  double target = 0;
  double bnorm = 1;
  DType dtype = DType::float64;
  IndexType index_type = IndexType::int32;
};

struct KrylovArnoldiResult {
  int64_t steps = 0;
  bool breakdown = false;
};

struct KrylovCgParams {
  const void* row_ptr = nullptr;
  const void* col_idx = nullptr;
  const void* values = nullptr;
  const void* inverse_diagonal = nullptr;
  void* x = nullptr;
  void* r = nullptr;
  void* p = nullptr;
  void* q = nullptr;
  void* z = nullptr;
  double* history = nullptr;
  void* workspace = nullptr;  // n_chunks * (2 + deflation_rows) elements
  int64_t n = 0;
  int64_t nnz = 0;
  int64_t steps = 0;
  int64_t n_chunks = 1;
  double target = 0;
  double bnorm = 1;
  DType dtype = DType::float64;
  IndexType index_type = IndexType::int32;
  // Deflated CG (Saad et al. 2000), all optional (null / 0: plain CG):
  // deflation W and deflation_product AW = A W, deflation_rows rows of n contiguous entries
  // each (W^T A W = I): every direction is made A-conjugate to W, p = z + beta p - W (AW^T z).
  const void* deflation = nullptr;
  const void* deflation_product = nullptr;
  int64_t deflation_rows = 0;
  // Steps whose ||r|| is below reproject_below (> 0; 0: never) then restore W^T r = 0:
  // x += W c, r -= AW c for c = W^T r, and z, r . z and AW^T z from the new r.  In exact
  // arithmetic W^T r stays 0; in finite precision it drifts to about u ||A|| ||x||, the
  // level of CG's attainable accuracy, and a tolerance below that made the deflated
  // iteration diverge (float32: 4e-7 -> 9e3 relative over 10^4 steps).
  double reproject_below = 0;
  // record (rows of n, contiguous): at steps j < record_rows, the Lanczos vector
  // z_j / sqrt(r_j . z_j) is written to row j before the step updates z (eigCG's record).
  void* record = nullptr;
  int64_t record_rows = 0;
  // alphas[j], betas[j] (optional, [steps] each): each step's alpha and beta = rho_new / rho.
  double* alphas = nullptr;
  double* betas = nullptr;
  // resume: p (and z) hold the current direction (and M^-1 r) and *rho = r . z, from an
  // earlier call; otherwise the loop starts from z = d r, p = z - W (AW^T z).  *rho (when
  // given) receives r . z of the final r on return, p the next direction unless the call
  // ended converged or on a breakdown.
  double* rho = nullptr;
  bool resume = false;
};

struct KrylovCgResult {
  int64_t steps = 0;
  int status = 1;  // 0: ||r|| <= target, 1: steps exhausted, 2: breakdown
};

// Workspace elements krylov_arnoldi_cpu needs (storage type).
inline int64_t krylov_arnoldi_workspace(int64_t kc, int64_t steps, int64_t n_chunks) {
  return (n_chunks + 3) * (kc + steps);
}

// Validation shared by both back ends (std::invalid_argument -> ValueError).
void check_krylov_spmv_params(const KrylovSpmvParams& p);
void check_krylov_cgs_params(const KrylovCgsParams& p, bool needs_workspace);
void check_krylov_block_params(const KrylovBlockParams& p, bool needs_workspace);

// CPU (csrc/cpu/krylov_cpu.cpp): synchronous, on up to num_threads threads.
void krylov_spmv_cpu(const KrylovSpmvParams& p, int num_threads);
void krylov_cgs_pass_cpu(const KrylovCgsParams& p, int num_threads);
void krylov_block_cpu(const KrylovBlockParams& p, int num_threads);
void check_krylov_arnoldi_params(const KrylovArnoldiParams& p);
KrylovArnoldiResult krylov_arnoldi_cpu(const KrylovArnoldiParams& p, int num_threads);
void check_krylov_cg_params(const KrylovCgParams& p);
KrylovCgResult krylov_cg_cpu(const KrylovCgParams& p, int num_threads);

// CUDA (csrc/cuda/krylov_cuda.cu): asynchronous on `stream` (a cudaStream_t) of `device`.
void krylov_spmv_cuda(const KrylovSpmvParams& p, int device, std::uintptr_t stream);
void krylov_cgs_pass_cuda(const KrylovCgsParams& p, int device, std::uintptr_t stream);
void krylov_block_cuda(const KrylovBlockParams& p, int device, std::uintptr_t stream);

}  // namespace lowrank_ops
