// CUDA kernels for fixed-support sparse matrices: CSR SpMM / SpMV and SDDMM.
//
// One warp per sparse row (rows handed out in row_order: longest first).  Two
// layouts of the dense operand, chosen by its strides:
//   lanes over batch  (dense_stride_b == 1, batch >= kLanesOverBatchMin): the caller
//       passes the dense operand transposed ([n_cols, batch] in memory), so each stored
//       entry (r, c, v) is one coalesced read of dense row c; the row's column indices
//       and values are loaded once per 32 entries and broadcast with shuffles.
//   lanes over nnz    (anything else, e.g. SpMV): lanes split the row's entries and
//       the partial sums are reduced with shuffles, once per batch row.
//
// Roofline (fp32, batch N): SpMM and SDDMM both do 2*N*nnz flops; the compulsory
// traffic is 4*(N*(n_rows + n_cols) + 2*nnz) bytes, but every entry gathers a
// 4*N-byte dense row, which the 50 MB L2 of an H100 serves for the shapes of
// ALGORITHMS.md section 1; the kernels are bound by L2 bandwidth, not DRAM.
//
// All kernels use grid-stride loops with 64-bit indices, never allocate and never
// synchronize; they run on the caller's stream.
#include <cuda_runtime.h>

#include "cuda_utils.cuh"
#include "lowrank_ops/clamp.h"
#include "lowrank_ops/sparse.h"

namespace lowrank_ops {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int kColsPerLane = 4;                         // batch entries per lane (lanes over batch)
constexpr int64_t kBatchPerWarp = kWarp * kColsPerLane;  // batch entries per warp item
constexpr int64_t kLanesOverBatchMin = 8;               // smaller batches use lanes over nnz
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % kWarp); }
__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t warp_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp; }

// Row handled by the i-th warp item, or -1 when row_order holds an invalid entry.
template <class I>
__device__ __forceinline__ int64_t row_at(const I* row_order, int64_t i, int64_t n_rows) {
  const int64_t r = row_order ? static_cast<int64_t>(row_order[i]) : i;
  return (r >= 0 && r < n_rows) ? r : -1;
}

// The addend of output (b, r), or 0 without one.
template <class A>
__device__ __forceinline__ A addend_at(const CsrSpmmParams& p, int64_t b, int64_t r) {
  return p.addend ? static_cast<const A*>(p.addend)[b * p.addend_stride_b + r * p.addend_stride_r] : A(0);
}

template <class T, class I>
__global__ void __launch_bounds__(kThreads) spmm_lanes_over_batch(CsrSpmmParams p, int64_t n_chunks) {
  using A = acc_t<T>;
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const I* row_order = static_cast<const I*>(p.row_order);
  const T* values = static_cast<const T*>(p.values);
  const T* dense = static_cast<const T*>(p.dense);
  T* out = static_cast<T*>(p.out);
  const int lane = lane_id();
  const int64_t n_items = p.n_rows * n_chunks;
  for (int64_t item = global_warp(); item < n_items; item += warp_count()) {
    const int64_t r = row_at(row_order, item / n_chunks, p.n_rows);
    if (r < 0) continue;
    const int64_t b0 = (item % n_chunks) * kBatchPerWarp;
    A acc[kColsPerLane] = {};
    const int64_t k_begin = clamped(row_ptr[r], p.nnz), k_end = clamped(row_ptr[r + 1], p.nnz);
    for (int64_t kb = k_begin; kb < k_end; kb += kWarp) {
      int64_t c = -1;
      A v = 0;
      const int64_t k = kb + lane;
      if (k < k_end) {
        const uint64_t col = static_cast<uint64_t>(col_idx[k]);
        if (col < static_cast<uint64_t>(p.n_cols)) {
          c = static_cast<int64_t>(col);
          v = to_acc(values[k]);
        }
      }
      const int n_here = static_cast<int>(k_end - kb < kWarp ? k_end - kb : kWarp);
      for (int e = 0; e < n_here; ++e) {
        const int64_t ce = __shfl_sync(kFullMask, c, e);
        const A ve = __shfl_sync(kFullMask, v, e);
        if (ce < 0) continue;  // warp-uniform
        const T* x = dense + ce * p.dense_stride_c;
#pragma unroll
        for (int i = 0; i < kColsPerLane; ++i) {
          const int64_t b = b0 + lane + i * kWarp;
          if (b < p.batch) acc[i] += ve * to_acc(x[b * p.dense_stride_b]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kColsPerLane; ++i) {
      const int64_t b = b0 + lane + i * kWarp;
      if (b < p.batch) out[b * p.out_stride_b + r * p.out_stride_r] = from_acc<T>(addend_at<A>(p, b, r) + acc[i]);
    }
  }
}

template <class T, class I>
__global__ void __launch_bounds__(kThreads) spmm_lanes_over_nnz(CsrSpmmParams p) {
  using A = acc_t<T>;
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const I* row_order = static_cast<const I*>(p.row_order);
  const T* values = static_cast<const T*>(p.values);
  const T* dense = static_cast<const T*>(p.dense);
  T* out = static_cast<T*>(p.out);
  const int lane = lane_id();
  for (int64_t item = global_warp(); item < p.n_rows; item += warp_count()) {
    const int64_t r = row_at(row_order, item, p.n_rows);
    if (r < 0) continue;
    const int64_t k_begin = clamped(row_ptr[r], p.nnz), k_end = clamped(row_ptr[r + 1], p.nnz);
    for (int64_t b = 0; b < p.batch; ++b) {
      const T* x = dense + b * p.dense_stride_b;
      A acc = 0;
      for (int64_t k = k_begin + lane; k < k_end; k += kWarp) {
        const uint64_t c = static_cast<uint64_t>(col_idx[k]);
        if (c < static_cast<uint64_t>(p.n_cols))
          acc += to_acc(values[k]) * to_acc(x[static_cast<int64_t>(c) * p.dense_stride_c]);
      }
      acc = warp_sum(acc);
      if (lane == 0) out[b * p.out_stride_b + r * p.out_stride_r] = from_acc<T>(addend_at<A>(p, b, r) + acc);
    }
  }
}

template <class T, class I>
__global__ void __launch_bounds__(kThreads) sddmm_lanes_over_batch(CsrSddmmParams p) {
  using A = acc_t<T>;
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const I* row_order = static_cast<const I*>(p.row_order);
  const T* left = static_cast<const T*>(p.left);
  const T* dense = static_cast<const T*>(p.dense);
  T* out = static_cast<T*>(p.out);
  const int lane = lane_id();
  for (int64_t item = global_warp(); item < p.n_rows; item += warp_count()) {
    const int64_t r = row_at(row_order, item, p.n_rows);
    if (r < 0) continue;
    const T* left_row = left + r * p.left_stride_r;
    const int64_t k_begin = clamped(row_ptr[r], p.nnz), k_end = clamped(row_ptr[r + 1], p.nnz);
    for (int64_t kb = k_begin; kb < k_end; kb += kWarp) {
      int64_t c = -1;
      if (kb + lane < k_end) {
        const uint64_t col = static_cast<uint64_t>(col_idx[kb + lane]);
        if (col < static_cast<uint64_t>(p.n_cols)) c = static_cast<int64_t>(col);
      }
      const int n_here = static_cast<int>(k_end - kb < kWarp ? k_end - kb : kWarp);
      A mine = 0;  // the dot product of entry kb + lane
      for (int e = 0; e < n_here; ++e) {
        const int64_t ce = __shfl_sync(kFullMask, c, e);
        if (ce < 0) continue;  // warp-uniform
        const T* x = dense + ce * p.dense_stride_c;
        A part = 0;
        for (int64_t b = lane; b < p.batch; b += kWarp)
          part += to_acc(left_row[b * p.left_stride_b]) * to_acc(x[b * p.dense_stride_b]);
        part = warp_sum(part);
        if (lane == e) mine = part;
      }
      if (kb + lane < k_end) out[kb + lane] = from_acc<T>(mine);
    }
  }
}

template <class T, class I>
__global__ void __launch_bounds__(kThreads) sddmm_lanes_over_nnz(CsrSddmmParams p) {
  using A = acc_t<T>;
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const I* row_order = static_cast<const I*>(p.row_order);
  const T* left = static_cast<const T*>(p.left);
  const T* dense = static_cast<const T*>(p.dense);
  T* out = static_cast<T*>(p.out);
  const int lane = lane_id();
  for (int64_t item = global_warp(); item < p.n_rows; item += warp_count()) {
    const int64_t r = row_at(row_order, item, p.n_rows);
    if (r < 0) continue;
    const int64_t k_begin = clamped(row_ptr[r], p.nnz), k_end = clamped(row_ptr[r + 1], p.nnz);
    for (int64_t k = k_begin + lane; k < k_end; k += kWarp) {
      const uint64_t c = static_cast<uint64_t>(col_idx[k]);
      A acc = 0;
      if (c < static_cast<uint64_t>(p.n_cols))
        for (int64_t b = 0; b < p.batch; ++b)
          acc += to_acc(left[b * p.left_stride_b + r * p.left_stride_r]) *
                 to_acc(dense[b * p.dense_stride_b + static_cast<int64_t>(c) * p.dense_stride_c]);
      out[k] = from_acc<T>(acc);
    }
  }
}

template <class F>
void dispatch_cuda(DType dtype, IndexType index_type, F&& f) {
  dispatch_dtype<__half, __nv_bfloat16>(dtype, [&](auto tag) {
    dispatch_index(index_type, [&](auto index_tag) { f(tag, index_tag); });
  });
}

}  // namespace
}  // namespace cuda

void csr_spmm_cuda(const CsrSpmmParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_spmm_params(p);
  if (p.batch == 0 || p.n_rows == 0) return;
  const DeviceGuard device_guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_cuda(p.dtype, p.index_type, [&](auto tag, auto index_tag) {
    using T = typename decltype(tag)::type;
    using I = typename decltype(index_tag)::type;
    if (p.dense_stride_b == 1 && p.batch >= kLanesOverBatchMin) {
      const int64_t n_chunks = (p.batch + kBatchPerWarp - 1) / kBatchPerWarp;
      const unsigned grid = grid_for(p.n_rows * n_chunks, kWarpsPerBlock);
      spmm_lanes_over_batch<T, I><<<grid, kThreads, 0, s>>>(p, n_chunks);
    } else {
      const unsigned grid = grid_for(p.n_rows, kWarpsPerBlock);
      spmm_lanes_over_nnz<T, I><<<grid, kThreads, 0, s>>>(p);
    }
    LOWRANK_CUDA_LAUNCH_CHECK();
  });
}

void csr_sddmm_cuda(const CsrSddmmParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_sddmm_params(p);
  if (p.nnz == 0) return;
  const DeviceGuard device_guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (p.batch == 0) {  // empty sum: every entry is 0 (all-zero bits in every dtype)
    LOWRANK_CUDA_CHECK(cudaMemsetAsync(p.out, 0, static_cast<size_t>(p.nnz * dtype_size(p.dtype)), s));
    return;
  }
  dispatch_cuda(p.dtype, p.index_type, [&](auto tag, auto index_tag) {
    using T = typename decltype(tag)::type;
    using I = typename decltype(index_tag)::type;
    const unsigned grid = grid_for(p.n_rows, kWarpsPerBlock);
    if (p.left_stride_b == 1 && p.dense_stride_b == 1 && p.batch >= kLanesOverBatchMin)
      sddmm_lanes_over_batch<T, I><<<grid, kThreads, 0, s>>>(p);
    else
      sddmm_lanes_over_nnz<T, I><<<grid, kThreads, 0, s>>>(p);
    LOWRANK_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace lowrank_ops
