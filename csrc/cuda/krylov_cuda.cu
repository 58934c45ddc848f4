// CUDA kernels of the Krylov solvers; see csrc/include/lowrank_ops/krylov.h for the contract.
//
// krylov_spmv: one thread per row.  The PDE matrices have about 5 entries per row, so
// the foundation's warp-per-row SpMV (sparse_cuda.cu) would leave 27 of 32 lanes idle.
// krylov_cgs_pass: one block per basis row for the dots (plus one for ||w||^2), then a
// grid-stride update w -= Q^T h with a block reduction and one atomic per block for
// the new ||w||^2 (squared norms in double for both dtypes).
#include <cstdint>
#include <limits>

#include "cuda_utils.cuh"
#include "lowrank_ops/clamp.h"
#include "lowrank_ops/krylov.h"

namespace lowrank_ops {
namespace {

using namespace cuda;

constexpr int kThreads = 256;

template <class A>
__device__ A block_reduce(A value) {
  __shared__ A partial[kThreads / kWarp];
  value = warp_sum(value);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  A total = 0;
  if (warp == 0) {
    total = lane < kThreads / kWarp ? partial[lane] : A(0);
    total = warp_sum(total);
  }
  __syncthreads();  // partial may be reused by a following call
  return total;     // valid in thread 0
}

template <class T, class I>
__global__ void spmv_kernel(KrylovSpmvParams p) {
  const I* row_ptr = static_cast<const I*>(p.row_ptr);
  const I* col_idx = static_cast<const I*>(p.col_idx);
  const T* values = static_cast<const T*>(p.values);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < p.n_rows;
       r += int64_t(gridDim.x) * blockDim.x) {
    T sum = 0;
    const int64_t k_end = clamped(row_ptr[r + 1], p.nnz);  // k_end < k_begin: an empty row
    for (int64_t k = clamped(row_ptr[r], p.nnz); k < k_end; ++k) {
      const int64_t c = static_cast<int64_t>(col_idx[k]);
      if (c >= 0 && c < p.n_cols) sum += values[k] * x[c];
    }
    y[r] = sum;
  }
}

// Block i < rows: h[i] = Q[i] . w; block rows: norms[0] = w . w, in double (krylov.h).
template <class T>
__global__ void cgs_dots_kernel(KrylovCgsParams p) {
  using A = acc_t<T>;
  const T* w = static_cast<const T*>(p.w);
  const int64_t i = blockIdx.x;
  if (i == p.rows) {  // the whole block takes this branch: its reductions stay uniform
    double sum = 0;
    for (int64_t e = threadIdx.x; e < p.n; e += blockDim.x) {
      const double value = static_cast<double>(w[e]);
      sum += value * value;
    }
    sum = block_reduce(sum);
    if (threadIdx.x == 0) static_cast<double*>(p.norms)[0] = sum;
    return;
  }
  const T* q = static_cast<const T*>(p.basis) + i * p.q_stride;
  A sum = 0;
  for (int64_t e = threadIdx.x; e < p.n; e += blockDim.x) sum += static_cast<A>(q[e]) * static_cast<A>(w[e]);
  sum = block_reduce(sum);
  if (threadIdx.x == 0) static_cast<T*>(p.h)[i] = static_cast<T>(sum);
}

// w -= Q^T h; norms[1] += ||w||^2 over the block's entries, in double (norms[1] zeroed beforehand).
template <class T>
__global__ void cgs_update_kernel(KrylovCgsParams p) {
  const T* Q = static_cast<const T*>(p.basis);
  const T* h = static_cast<const T*>(p.h);
  T* w = static_cast<T*>(p.w);
  double sum = 0;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < p.n; e += int64_t(gridDim.x) * blockDim.x) {
    T value = w[e];
    for (int64_t i = 0; i < p.rows; ++i) value -= h[i] * Q[i * p.q_stride + e];
    w[e] = value;
    sum += static_cast<double>(value) * static_cast<double>(value);
  }
  sum = block_reduce(sum);
  if (threadIdx.x == 0) atomicAdd(static_cast<double*>(p.norms) + 1, sum);
}

// Block (r, c): out[r * cols + c] = Q[r] . W[c].
template <class T>
__global__ void block_gram_kernel(KrylovBlockParams p) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x / p.cols, c = blockIdx.x % p.cols;
  const T* q = static_cast<const T*>(p.basis) + r * p.q_stride;
  const T* w = static_cast<const T*>(p.other) + c * p.other_stride;
  A sum = 0;
  for (int64_t e = threadIdx.x; e < p.n; e += blockDim.x) sum += static_cast<A>(q[e]) * static_cast<A>(w[e]);
  sum = block_reduce(sum);
  if (threadIdx.x == 0) static_cast<A*>(p.out)[blockIdx.x] = sum;
}

// Thread per entry e: Y[c, e] (+)= sum_r coef[r, c] Q[r, e] for every c.
template <class T>
__global__ void block_combine_kernel(KrylovBlockParams p) {
  const T* Q = static_cast<const T*>(p.basis);
  const T* coef = static_cast<const T*>(p.coef);
  T* Y = static_cast<T*>(p.other);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < p.n; e += int64_t(gridDim.x) * blockDim.x) {
    for (int64_t c = 0; c < p.cols; ++c) {
      T value = p.accumulate ? Y[c * p.other_stride + e] : T(0);
      for (int64_t r = 0; r < p.rows; ++r) value += coef[r * p.cols + c] * Q[r * p.q_stride + e];
      Y[c * p.other_stride + e] = value;
    }
  }
}

}  // namespace

void krylov_block_cuda(const KrylovBlockParams& p, int device, std::uintptr_t stream) {
  check_krylov_block_params(p, false);
  if (p.cols == 0) return;
  const DeviceGuard device_guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (p.mode == 0) {
      if (p.rows == 0) return;
      if (p.n == 0) {
        LOWRANK_CUDA_CHECK(cudaMemsetAsync(p.out, 0, p.rows * p.cols * sizeof(A), s));
        return;
      }
      LOWRANK_CHECK(p.rows * p.cols <= std::numeric_limits<int32_t>::max(), "krylov_block: rows * cols = ",
                    p.rows * p.cols, " dot products; the CUDA kernel takes at most 2^31 - 1 (one block each)");
      block_gram_kernel<T><<<static_cast<unsigned>(p.rows * p.cols), kThreads, 0, s>>>(p);
    } else {
      if (p.n == 0) return;
      block_combine_kernel<T><<<grid_for(p.n, kThreads), kThreads, 0, s>>>(p);
    }
    LOWRANK_CUDA_LAUNCH_CHECK();
  });
}

void krylov_spmv_cuda(const KrylovSpmvParams& p, int device, std::uintptr_t stream) {
  check_krylov_spmv_params(p);
  if (p.n_rows == 0) return;
  const DeviceGuard device_guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_index(p.index_type, [&](auto index_tag) {
      using I = typename decltype(index_tag)::type;
      spmv_kernel<T, I><<<grid_for(p.n_rows, kThreads), kThreads, 0, s>>>(p);
      LOWRANK_CUDA_LAUNCH_CHECK();
    });
  });
}

void krylov_cgs_pass_cuda(const KrylovCgsParams& p, int device, std::uintptr_t stream) {
  check_krylov_cgs_params(p, false);
  const DeviceGuard device_guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    LOWRANK_CUDA_CHECK(cudaMemsetAsync(p.norms, 0, 2 * sizeof(double), s));
    if (p.mode != 2) {
      LOWRANK_CHECK(p.rows < std::numeric_limits<int32_t>::max(), "krylov_cgs_pass: rows = ", p.rows,
                    "; the CUDA dots take at most 2^31 - 2 basis rows (one block each, plus the norm's)");
      cgs_dots_kernel<T><<<static_cast<unsigned>(p.rows + 1), kThreads, 0, s>>>(p);
      LOWRANK_CUDA_LAUNCH_CHECK();
    }
    if (p.mode != 1 && p.n > 0) {
      cgs_update_kernel<T><<<grid_for(p.n, kThreads), kThreads, 0, s>>>(p);
      LOWRANK_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace lowrank_ops
