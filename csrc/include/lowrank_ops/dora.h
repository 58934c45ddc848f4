// DoRA row norms by the low-rank identity (ALGORITHMS.md section 2):
//
//   ||W_o + s B_o A||^2 = ||W_o||^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T
//                       = ||W_o||^2 + B_o . C_o,      C = 2 s W A^T + s^2 B (A A^T)  [out, r],
//
// so the dense [out, in] product B A is never formed.  The small GEMMs that build C
// (W A^T: 2 out in r flops; A A^T and B (A A^T): O((in + out) r^2)) are done by the caller
// (BLAS / cuBLAS); the kernel fuses the rest: one streaming pass over W for ||W_o||^2, the
// r-term dot product B_o . C_o, and sqrt(max(., 0)) (rounding can make the sum slightly
// negative for rows whose norm is ~0).
//
// Layouts: weight [out, in] strided (element (o, i) at weight[o * stride_o + i * stride_i]),
// dtype `dtype`; coef [out, r], lora_B [out, r] and out [out] are contiguous in
// acc_t<dtype> (float32, or float64 for float64 weights).  Kernels never allocate and
// never synchronize; the CUDA kernel runs on the caller's stream.
#pragma once

#include <cstdint>

#include "lowrank_ops/dtype.h"

namespace lowrank_ops {

struct DoraNormParams {
  const void* weight = nullptr;  // [out, in] strided, dtype
  const void* coef = nullptr;    // [out, r], acc type: C = 2 s W A^T + s^2 B A A^T
  const void* lora_B = nullptr;  // [out, r], acc type
  void* out = nullptr;           // [out], acc type: the row norms
  int64_t out_features = 0, in_features = 0, rank = 0;
  int64_t weight_stride_o = 0, weight_stride_i = 0;
  DType dtype = DType::float32;  // of weight
};

// Shape sanity shared by both back ends (throws std::invalid_argument).
void check_dora_norm_params(const DoraNormParams& p);

// CPU (csrc/cpu/dora_cpu.cpp): multi-threaded over rows.
void dora_row_norm_cpu(const DoraNormParams& p, int num_threads);

// CUDA (csrc/cuda/dora_cuda.cu): one warp per row, asynchronous on `stream` of `device`.
void dora_row_norm_cuda(const DoraNormParams& p, int device, std::uintptr_t stream);

}  // namespace lowrank_ops
