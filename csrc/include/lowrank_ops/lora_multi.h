// Multi-adapter LoRA kernels (ALGORITHMS.md section 2, multi-adapter paragraph).
//
// Rows of the row operands are grouped into segments: rows [offsets[s], offsets[s+1])
// form segment s and use adapter ids[s] (-1: no adapter).  Adapter a has rank
// ranks[a] <= r_max and scale scales[a]; its factors live in stacks
// A [n_adapters, r_max, in] and B [n_adapters, out, r_max], of which only the first
// ranks[a] ranks are read.  Two kernels serve the forward and the backward:
//
//   segment_matmul   out[n, c] (+)= scale_a * sum_j in[n, j] * W(a, j, c),  a = adapter of row n
//       shrink  (rank_on_c): c < ranks[a] (the rank columns), j over the features;
//       expand  (rank on j): j < ranks[a], c over the features, accumulating into out.
//       forward  h = x A^T (shrink, W(a,j,c) = A[a,c,j]);  y += s h B^T (expand, W = B[a,c,j])
//       backward g = s dy B (shrink, W(a,j,c) = B[a,j,c]); dx += g A (expand, W = A[a,j,c])
//   segment_outer    out(a, k, j) = scale_a * sum_{rows n of the segments of a} left[n, k] * right[n, j],
//       k < ranks[a]:  dA = g^T x per adapter, dB^T = s h^T dy per adapter.
//
// Layouts: in/left/right/out rows are strided (stride_n) with unit column stride; W and
// the outer product's output use three arbitrary strides (adapter, j or k, c or j), so
// the same kernel reads A, B or their transposes in place.  Entries the kernels do not
// own (columns c >= rank of a shrink, rows of segments with id -1, ranks k >= ranks[a]
// of an outer product) are left untouched, and the outer product of an adapter in no
// segment may be left untouched (CPU) or written as zeros (CUDA): the caller zero-fills
// such outputs.  Accumulation in acc_t<dtype> (fp32; fp64 for fp64); scales
// are float64 and multiply the fp32 accumulator once.
//
// CPU entry points validate offsets, ids and ranks (throw std::invalid_argument) before
// reading anything.  CUDA kernels cannot throw on device data, so they are memory-safe
// on any contents instead: offsets are clamped to [0, n_rows], segments whose id is out
// of range are skipped and ranks are clamped to [0, r_max].  Kernels never allocate
// device memory and never synchronize; CUDA kernels run on the caller's stream.
#pragma once

#include <cstdint>

#include "lowrank_ops/dtype.h"

namespace lowrank_ops {

// Segment routing shared by both kernels (all int64, contiguous).
struct SegmentRouting {
  const int64_t* offsets = nullptr;  // [n_segments + 1]
  const int64_t* ids = nullptr;      // [n_segments], -1 or an adapter in [0, n_adapters)
  const int64_t* ranks = nullptr;    // [n_adapters], each in [0, r_max]
  const double* scales = nullptr;    // [n_adapters], or nullptr for 1
  int64_t n_rows = 0, n_segments = 0, n_adapters = 0, r_max = 0;
};

struct SegmentMatmulParams {
  SegmentRouting routing;
  const void* in = nullptr;  // [n_rows, J], element (n, j) at n * in_stride_n + j
  const void* w = nullptr;   // element (a, j, c) at a * w_stride_a + j * w_stride_j + c * w_stride_c
  void* out = nullptr;       // [n_rows, C], element (n, c) at n * out_stride_n + c
  int64_t J = 0, C = 0;
  int64_t in_stride_n = 0, out_stride_n = 0;
  int64_t w_stride_a = 0, w_stride_j = 0, w_stride_c = 0;
  bool rank_on_c = true;    // true: shrink (c < rank, out overwritten); false: expand (j < rank)
  bool accumulate = false;  // out += result instead of out = result
  DType dtype = DType::float32;
};

struct SegmentOuterParams {
  SegmentRouting routing;
  const void* left = nullptr;   // [n_rows, r_max], element (n, k) at n * left_stride_n + k
  const void* right = nullptr;  // [n_rows, J], element (n, j) at n * right_stride_n + j
  void* out = nullptr;          // element (a, k, j) at a * out_stride_a + k * out_stride_k + j * out_stride_j
  int64_t J = 0;
  int64_t left_stride_n = 0, right_stride_n = 0;
  int64_t out_stride_a = 0, out_stride_k = 0, out_stride_j = 0;
  DType dtype = DType::float32;
};

// Checks shared by both back ends (defined in csrc/cpu/lora_multi_cpu.cpp); each throws
// std::invalid_argument naming the argument, the expected and the actual value.
// The routing's sizes only (no pointer is read).
void check_segment_sizes(const SegmentRouting& routing, const char* op);
// Sizes and routing contents (host memory only).  The CPU kernels call it first; on
// CUDA the Python op checks the contents.
void check_segment_routing(const SegmentRouting& routing, const char* op);
// The routing's sizes, then the operands' (J, C and the rank dimension against r_max).
void check_segment_matmul_sizes(const SegmentMatmulParams& p);
void check_segment_outer_sizes(const SegmentOuterParams& p);

// CPU (csrc/cpu/lora_multi_cpu.cpp): multi-threaded over num_threads threads.
void segment_matmul_cpu(const SegmentMatmulParams& p, int num_threads);
void segment_outer_cpu(const SegmentOuterParams& p, int num_threads);

// CUDA (csrc/cuda/lora_multi_cuda.cu): asynchronous on `stream` (a cudaStream_t) of `device`.
void segment_matmul_cuda(const SegmentMatmulParams& p, int device, std::uintptr_t stream);
void segment_outer_cuda(const SegmentOuterParams& p, int device, std::uintptr_t stream);

}  // namespace lowrank_ops
