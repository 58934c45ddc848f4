// Small-batch products with a frozen base weight (LoRA, DoRA, multi-adapter layers; CPU, float32):
//
//   forward      y  = x W^T + b      x [rows, in],  W [out, in], b [out], y [rows, out]
//   grad input   dx = dy W           dy [rows, out],                      dx [rows, in]
//
// for rows <= kSmallBatchMaxRows (kSmallBatchGradMaxRows).  At such batch sizes (decoding, small micro-batches,
// the N = 16 benchmark shapes) a BLAS GEMM is neither bound by its flops nor by the
// bytes of W: MKL's sgemm measured 5.0 ms for 16 x 4096 x 4096 on the 2-core AVX-512
// machine, where reading W once takes 1.5 ms and the flops 1.6 ms at that machine's
// measured peak.  These kernels stream W once, with every element of W used for all
// rows from registers (see base_linear_cpu.cpp for the tiles and the measured times).
//
// Layouts: every matrix row-major with unit column stride and the given row stride
// (ld), float32 (the forward's W also bfloat16).  The kernels never allocate and read
// nothing outside the given shapes.
#pragma once

#include <cstdint>

#include "lowrank_ops/dtype.h"

namespace lowrank_ops {

// Largest batch the small-batch kernels accept (the forward kernel's per-task
// accumulators live on the stack; the grad-input kernel keeps only its register tiles and
// still beats MKL's generic SGEMM at 96-384 rows on the 2-core AMD EPYC, 1.13-1.44x); the
// Python op uses them only up to its own measured crossover.
constexpr int64_t kSmallBatchMaxRows = 64;
constexpr int64_t kSmallBatchGradMaxRows = 256;

struct SmallBatchLinearParams {
  const float* x = nullptr;       // [rows, in], row stride x_ld
  const void* weight = nullptr;   // [out, in], row stride w_ld, of weight_dtype
  // float32, or bfloat16: widened exactly to float32 as it is read, so x W^T and the
  // squared norms are those of the float32 copy of W, at the bytes of bfloat16 (DoRA's
  // row norm of a bfloat16 W: W A^T rounded to bfloat16 cost 5e-3 relative norm errors).
  DType weight_dtype = DType::float32;
  const float* bias = nullptr;    // [out] or null
  float* y = nullptr;             // [rows, out], row stride y_ld
  float* weight_sumsq = nullptr;  // [out] or null: sum_i W[o, i]^2, from the same pass over W
  int64_t rows = 0, in_features = 0, out_features = 0;
  int64_t x_ld = 0, w_ld = 0, y_ld = 0;
};

struct SmallBatchGradInputParams {
  const float* grad_y = nullptr;  // [rows, out], row stride gy_ld
  const float* weight = nullptr;  // [out, in], row stride w_ld
  float* grad_x = nullptr;        // [rows, in], row stride gx_ld (written, not accumulated)
  int64_t rows = 0, in_features = 0, out_features = 0;
  int64_t gy_ld = 0, w_ld = 0, gx_ld = 0;
};

// y = x W^T + b (throws std::invalid_argument on bad sizes or pointers).
void small_batch_linear_cpu(const SmallBatchLinearParams& p, int num_threads);

// grad_x = grad_y W.
void small_batch_linear_grad_input_cpu(const SmallBatchGradInputParams& p, int num_threads);

}  // namespace lowrank_ops
