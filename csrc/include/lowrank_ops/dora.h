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
// The identity cancels where ||W_o + s B_o A|| is far below ||W_o|| (its terms' rounding
// errors, about u (||W_o||^2 + ||s B_o A||^2), relative to a small total: 0.87 relative
// error at ||W_o|| / ||W_o + s B_o A|| = 254 in float32), and its squares leave the
// range of the type (W of 1e-25 in float32 gave norms of 0, W of 1e20 inf).  Those rows
// (dora_identity_unreliable) are recomputed directly from the dense row W_o + s B_o A
// (r multiply-adds per entry), scaled by its largest entry; an exactly zero row (W_o and
// B_o zero, DoRA's zero rows) is found by a scan and gives 0 without it.
//
// Layouts: weight [out, in] strided (element (o, i) at weight[o * stride_o + i * stride_i]),
// dtype `dtype`; coef [out, r], lora_B [out, r] and out [out] are contiguous in
// acc_t<dtype> (float32, or float64 for float64 weights).  Kernels never allocate and
// never synchronize; the CUDA kernel runs on the caller's stream.
#pragma once

#include <cstdint>

#include "lowrank_ops/dtype.h"
#include "lowrank_ops/host_device.h"

namespace lowrank_ops {

struct DoraNormParams {
  const void* weight = nullptr;  // [out, in] strided, dtype
  const void* coef = nullptr;    // [out, r], acc type: C = 2 s W A^T + s^2 B A A^T
  const void* lora_B = nullptr;  // [out, r], acc type
  const void* lora_A = nullptr;  // [r, in], acc type, contiguous: for the rows recomputed directly
  void* out = nullptr;           // [out], acc type: the row norms
  int64_t out_features = 0, in_features = 0, rank = 0;
  int64_t weight_stride_o = 0, weight_stride_i = 0;
  DType dtype = DType::float32;  // of weight
  double scale = 1.0;            // s
};

// Whether the identity's total = ||W_o||^2 + B_o . C_o cannot be trusted for a row, so
// that the row is recomputed directly: a total below a quarter of the squares (rows
// that pass have a relative error of at most about 13 u: the terms' errors are u
// (||W_o||^2 + ||s B_o A||^2) and ||s B_o A|| <= ||W_o|| + ||W_o + s B_o A||), a total
// below min_normal / u (its terms lost precision to subnormals or underflowed), or near
// overflow, or NaN anywhere.  The kernels then check for an exactly zero row (W_o and B_o
// zero: norm 0) before recomputing; a zero W_o with a non-zero B_o passes (its total is
// ||s B_o A||^2, without cancellation).
template <class A>
LOWRANK_HOST_DEVICE inline bool dora_identity_unreliable(A squares, A total) {
  if constexpr (sizeof(A) == 8) {
    return !(total >= 0.25 * squares && total >= 0x1p-970 && total <= 0x1p1021);
  } else {
    return !(total >= 0.25f * squares && total >= 0x1p-103f && total <= 0x1p125f);
  }
}

// Shape sanity shared by both back ends (throws std::invalid_argument).
void check_dora_norm_params(const DoraNormParams& p);

// CPU (csrc/cpu/dora_cpu.cpp): multi-threaded over rows.
void dora_row_norm_cpu(const DoraNormParams& p, int num_threads);

// CUDA (csrc/cuda/dora_cuda.cu): one warp per row, asynchronous on `stream` of `device`.
void dora_row_norm_cuda(const DoraNormParams& p, int device, std::uintptr_t stream);

}  // namespace lowrank_ops
