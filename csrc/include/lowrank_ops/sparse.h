// Fixed-support sparse kernels: CSR SpMM (and SpMV, its batch = 1 case) and SDDMM.
//
// The same two parameter structs serve every use in ALGORITHMS.md section 1:
//   forward   y  = x S^T   : csr_spmm over the CSR of S            (out = y,  dense = x)
//   backward  dx = dy S    : csr_spmm over the CSC of S, i.e. the CSR of S^T, with the
//                            values gathered into CSC order once   (out = dx, dense = dy)
//   backward  dv = SDDMM   : csr_sddmm over the CSR of S           (left = dy, dense = x)
//
// Dense operands are strided 2-D views: element (b, c) lives at
// ptr[b * stride_b + c * stride_c] (strides in elements), so transposed or sliced
// tensors are read in place.  Every pointer has the dtype / index type given in the
// struct.  Kernels never allocate device memory and never synchronize; CUDA kernels
// run on the caller's stream.
//
// Memory safety does not depend on the pattern being valid: row pointers are clamped
// to [0, nnz] and column indices outside [0, n_cols) are skipped.  Validation with clear errors happens once, when the pattern
// is built (python/lowrank_ops/sparse.py).
#pragma once

#include <cstdint>

#include "lowrank_ops/dtype.h"

namespace lowrank_ops {

// out[b, r] = addend[b, r] + sum_{k in [row_ptr[r], row_ptr[r+1])} values[k] * dense[b, col_idx[k]]
// for b < batch, r < n_rows.  Accumulation in acc_t<dtype> (fp32, or fp64 for fp64).
// The optional addend is in acc_t<dtype> too: a half-precision output is then rounded
// once, however its terms were computed (the SLTrain layer passes its low-rank part).
struct CsrSpmmParams {
  const void* row_ptr = nullptr;     // [n_rows + 1], index_type
  const void* col_idx = nullptr;     // [nnz], index_type
  const void* values = nullptr;      // [nnz], dtype
  const void* row_order = nullptr;   // [n_rows], index_type, or nullptr (see below)
  const void* dense = nullptr;       // [batch, n_cols] strided, dtype
  void* out = nullptr;               // [batch, n_rows] strided, dtype; fully overwritten
  const void* addend = nullptr;      // [batch, n_rows] strided, acc_t<dtype>, or nullptr (0)
  int64_t n_rows = 0, n_cols = 0, nnz = 0, batch = 0;
  int64_t dense_stride_b = 0, dense_stride_c = 0;
  int64_t out_stride_b = 0, out_stride_r = 0;
  int64_t addend_stride_b = 0, addend_stride_r = 0;
  DType dtype = DType::float32;
  IndexType index_type = IndexType::int32;
};

// out[k] = sum_{b < batch} left[b, row(k)] * dense[b, col_idx[k]]  for k < nnz,
// with row(k) the CSR row holding k.  Entries whose column is out of range get 0.
struct CsrSddmmParams {
  const void* row_ptr = nullptr;  // [n_rows + 1], index_type
  const void* col_idx = nullptr;  // [nnz], index_type
  const void* row_order = nullptr;  // [n_rows], index_type, or nullptr (see below)
  const void* left = nullptr;     // [batch, n_rows] strided, dtype
  const void* dense = nullptr;    // [batch, n_cols] strided, dtype
  void* out = nullptr;            // [nnz] contiguous, dtype; fully overwritten
  int64_t n_rows = 0, n_cols = 0, nnz = 0, batch = 0;
  int64_t left_stride_b = 0, left_stride_r = 0;
  int64_t dense_stride_b = 0, dense_stride_c = 0;
  DType dtype = DType::float32;
  IndexType index_type = IndexType::int32;
};

// row_order (optional) is a permutation of the rows, longest first.  The CUDA kernels
// hand rows to warps in that order (longest-processing-time-first scheduling), so a
// few long rows of a skewed pattern start early instead of forming a tail.  The CPU
// kernels balance by splitting rows into blocks of equal nnz and ignore it.
//
// Malformed patterns (the raw ops check shapes only; FixedSupport validates its pattern
// once): both back ends clamp every index, so nothing is read or written out of range.
// The CPU kernels bound each row's range by the running maximum of row_ptr and write
// every out entry.  On CUDA sddmm's output is zeroed first, so entries no row covers are
// 0 there too; where a decreasing row_ptr makes two rows' ranges overlap, the shared
// entries take one of those rows' values (which one is unspecified); and a row_order that
// is not a permutation leaves the rows it skips unwritten (spmm) or their entries 0
// (sddmm).  The raw ops do not check it (O(n) and a device sync per call: FixedSupport
// builds it once), so for spmm that is the caller's contract.

// Shape sanity shared by both back ends (throws std::invalid_argument).
void check_spmm_params(const CsrSpmmParams& p);
void check_sddmm_params(const CsrSddmmParams& p);

// CPU (csrc/cpu/sparse_cpu.cpp): multi-threaded over num_threads threads.
void csr_spmm_cpu(const CsrSpmmParams& p, int num_threads);
void csr_sddmm_cpu(const CsrSddmmParams& p, int num_threads);

// CUDA (csrc/cuda/sparse_cuda.cu): asynchronous on `stream` (a cudaStream_t) of `device`.
void csr_spmm_cuda(const CsrSpmmParams& p, int device, std::uintptr_t stream);
void csr_sddmm_cuda(const CsrSddmmParams& p, int device, std::uintptr_t stream);

}  // namespace lowrank_ops
