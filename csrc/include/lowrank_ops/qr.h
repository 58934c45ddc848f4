// Kernels of CholeskyQR on tall-skinny blocks (ALGORITHMS.md section 4; the Python
// driver is lowrank_ops.linalg.cholesky_qr2): for a batch of blocks Y [rows, cols]
// (rows >> cols, e.g. the 4096 x 74 bases of a randomized SVD),
//
//   tall_gram:        G = Y^T Y                 [cols, cols], both triangles written;
//   tall_solve_upper: Q = Y R^-1  (Q R = Y)     R [cols, cols] upper triangular,
//
// the two O(rows cols^2) steps of a CholeskyQR pass; below them the pass's O(cols^3)
// factor (tall_cholesky), the exact scaling that precedes the passes (tall_scale) and the
// whole algorithm in one call (cholesky_qr).  Q is the row-wise forward substitution
// q_j = (y_j - sum_{k<j} q_k R_kj) / R_jj, in that order of k: the arithmetic of BLAS's
// xTRSM (side right, upper, no transpose), and its backward stability.
//
// Layouts (elements, not bytes): Y's element (b, i, j) is at
// y[b * y_batch_stride + i * y_row_stride + j * y_col_stride] with y_row_stride == 1
// (column-major blocks) or y_col_stride == 1 (row-major); R's element (b, k, j) at
// r[b * r_batch_stride + k * r_row_stride + j * r_col_stride] (any strides: the
// transposed view of a Cholesky factor L is read in place); G is [batch, cols, cols]
// contiguous; Q is strided as Y is (a unit row or column stride), and may be Y itself:
// the solve can run in place.
// dtype float32 or float64 (both Y, R, G and Q).  Results do not depend on the number
// of threads.  CPU only: on CUDA the ops are torch's (cuBLAS, cuSOLVER).
#pragma once

#include <cstdint>

#include "lowrank_ops/dtype.h"

namespace lowrank_ops {

struct TallGramParams {
  const void* y = nullptr;
  void* gram = nullptr;  // [batch, cols, cols]
  int64_t batch = 0, rows = 0, cols = 0;
  int64_t y_batch_stride = 0, y_row_stride = 0, y_col_stride = 0;
  DType dtype = DType::float32;
};

struct TallSolveParams {
  const void* y = nullptr;
  const void* r = nullptr;  // upper triangle read; its diagonal must be nonzero
  void* q = nullptr;        // may be y (in place)
  int64_t batch = 0, rows = 0, cols = 0;
  int64_t y_batch_stride = 0, y_row_stride = 0, y_col_stride = 0;
  int64_t r_batch_stride = 0, r_row_stride = 0, r_col_stride = 0;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_col_stride = 0;
  DType dtype = DType::float32;
};

// The Cholesky factor of a pass: upper R [batch, n, n] (zeros below the diagonal) with
// R^T R = G + sigma I, G [batch, n, n] contiguous (its upper triangle read), sigma from
// t = trace(G) (= ||Y||_F^2), u = eps / 2, m the block's rows:
//   shifted pass: sigma = 11 (m n + n (n + 1)) u t + 2 tiny (shifted CholeskyQR);
//   plain pass:   sigma = tiny, and where that factorization breaks down (a numerically
//                 singular G) sigma = n u t + tiny instead;
// R is NaN where no factorization succeeds (a non-finite G).  The arithmetic of
// lowrank_ops.linalg.qr._cholesky_factor (torch's ops), as one call: at n = 74 those
// dozen small ops cost ten times the factorization.
struct TallCholeskyParams {
  const void* gram = nullptr;
  void* r = nullptr;  // [batch, n, n]
  int64_t batch = 0, n = 0, rows = 0;
  bool shift = false;
  DType dtype = DType::float32;
};

// The first step of CholeskyQR: per block, s = 2^(e - 1) with e the binary exponent of
// max |Y| (s = 1 for a zero block), written to scale [batch], and Y /= s in place, an exact
// power-of-two scaling (Y^T Y can then neither overflow nor underflow).  A NaN or inf in a
// block gives s = NaN (and a NaN block).  Y strided as in TallGramParams.
struct TallScaleParams {
  void* y = nullptr;
  void* scale = nullptr;  // [batch]
  int64_t batch = 0, rows = 0, cols = 0;
  int64_t y_batch_stride = 0, y_row_stride = 0, y_col_stride = 0;
  DType dtype = DType::float32;
};

// A whole CholeskyQR in place: Y scaled (TallScaleParams), then the passes (a shifted one
// if `shift`, then `plain_passes` plain ones), each a Gram matrix, its factor
// (TallCholeskyParams) and the solve into Y; Y ends as Q, r [batch, cols, cols]
// (contiguous) receives R with Y_in = Q R (the passes' factors multiplied, times the
// scale).  One call for what the ops above do in 3 per pass plus the scaling: on small
// blocks (1024 x 42) their Python wrappers cost more than the kernels.
struct CholeskyQrParams {
  void* y = nullptr;
  void* r = nullptr;  // [batch, cols, cols]
  int64_t batch = 0, rows = 0, cols = 0;
  int64_t y_batch_stride = 0, y_row_stride = 0, y_col_stride = 0;
  bool shift = true;
  int64_t plain_passes = 1;
  DType dtype = DType::float32;
};

// Copies the block description the params above share (y, batch, rows, cols, Y's
// strides, dtype) from one params struct to another.
template <class To, class From>
void copy_tall_block(To& to, const From& from) {
  to.y = from.y;
  to.batch = from.batch;
  to.rows = from.rows;
  to.cols = from.cols;
  to.y_batch_stride = from.y_batch_stride;
  to.y_row_stride = from.y_row_stride;
  to.y_col_stride = from.y_col_stride;
  to.dtype = from.dtype;
}

// CPU (csrc/cpu/qr_cpu.cpp), multi-threaded over row chunks and the batch.
void tall_gram_cpu(const TallGramParams& p, int num_threads);
void tall_solve_upper_cpu(const TallSolveParams& p, int num_threads);
void tall_cholesky_cpu(const TallCholeskyParams& p, int num_threads);
void tall_scale_cpu(const TallScaleParams& p, int num_threads);
void cholesky_qr_cpu(const CholeskyQrParams& p, int num_threads);

}  // namespace lowrank_ops
