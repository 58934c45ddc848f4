// CUDA passes over the M-FAC gradient buffer: G x fused with the ring-buffer write
// (mfac_dots) and alpha x + beta G^T c (mfac_combine).  See lowrank_ops/mfac.h.
//
// Both are memory-bound streams over G; the floor is n_rows * dim * sizeof(storage)
// bytes per pass, at the card's copy bandwidth.  No limit on n_rows (the official
// M-FAC kernels run one block of n_rows threads, hence n_rows <= 1024 and % 32 == 0).
//
// mfac_dots: a 2-D grid of (column segment, group of kRowsPerBlock rows).  Each thread
// strides over the segment's columns, keeping kRowsPerBlock x kMaxVectors partial sums
// in registers; a block reduction writes one partial per (segment, vector, row) to the
// workspace and a second kernel sums the segments in a fixed order (deterministic, no
// atomics).  x is re-read once per row group (1 / kRowsPerBlock of G's traffic at
// fp32 and k = 1, mostly from L2).  The block owning write_slot overwrites that row's
// segment before reading it, from the same loads of x[0].
//
// mfac_combine: one thread per column (grid-stride), coefficients staged through
// shared memory in tiles of kCoefTile rows; every row of G is read once, coalesced.
//
// Vectors are handled kMaxVectors at a time; larger k loops on the host side of this
// file (another pass over G per group of kMaxVectors).
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_utils.cuh"
#include "lowrank_ops/mfac.h"

namespace lowrank_ops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 16;
constexpr int kMaxVectors = 4;
constexpr int kCoefTile = 256;
constexpr int64_t kTargetBlocks = 2048;  // enough blocks to fill any current GPU several times over

template <class T>
__global__ void __launch_bounds__(kThreads)
    dots_partial(MfacDotsParams p, int64_t k_begin, int64_t k_count, int64_t segment_len, acc_t<T>* partial) {
  using A = acc_t<T>;
  __shared__ A reduce[kThreads / kWarp][kRowsPerBlock * kMaxVectors];
  T* grads = static_cast<T*>(p.grads);
  const A* x = static_cast<const A*>(p.x) + k_begin * p.x_ld;
  const int64_t segment = blockIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
  const int64_t rows = min(static_cast<int64_t>(kRowsPerBlock), p.n_rows - row0);
  const int64_t c_begin = segment * segment_len;
  const int64_t c_end = min(p.dim, c_begin + segment_len);
  const bool writes = p.write_slot >= row0 && p.write_slot < row0 + rows && k_begin == 0;
  const bool rounds_x0 = p.write_slot >= 0 && k_begin == 0;
  A acc[kRowsPerBlock][kMaxVectors] = {};
  for (int64_t c = c_begin + threadIdx.x; c < c_end; c += kThreads) {
    A xv[kMaxVectors];
#pragma unroll
    for (int j = 0; j < kMaxVectors; ++j) xv[j] = j < k_count ? x[j * p.x_ld + c] : A(0);
    if (rounds_x0) {
      const T stored = from_acc<T>(xv[0]);
      if (writes) grads[p.write_slot * p.grads_ld + c] = stored;
      xv[0] = to_acc(stored);
    }
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) {
      if (r < rows) {
        const A g = to_acc(grads[(row0 + r) * p.grads_ld + c]);
#pragma unroll
        for (int j = 0; j < kMaxVectors; ++j) acc[r][j] += g * xv[j];
      }
    }
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int r = 0; r < kRowsPerBlock; ++r) {
#pragma unroll
    for (int j = 0; j < kMaxVectors; ++j) {
      const A s = warp_sum(acc[r][j]);
      if (lane == 0) reduce[warp][r * kMaxVectors + j] = s;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kRowsPerBlock * kMaxVectors; e += kThreads) {
    const int r = e / kMaxVectors, j = e % kMaxVectors;
    if (r >= rows || j >= k_count) continue;
    A s = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) s += reduce[w][e];
    partial[(segment * k_count + j) * p.n_rows + row0 + r] = s;
  }
}

// out[(k_begin + j) * n_rows + i] = sum over segments of partial[(segment, j, i)].
template <class A>
__global__ void dots_reduce(const A* partial, int64_t segments, int64_t k_begin, int64_t k_count, int64_t n_rows,
                            A* out) {
  const int64_t n = k_count * n_rows;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int64_t seg = 0; seg < segments; ++seg) s += partial[seg * n + e];
    out[k_begin * n_rows + e] = s;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) combine(MfacCombineParams p, int64_t k_begin, int64_t k_count) {
  using A = acc_t<T>;
  __shared__ A coef_tile[kMaxVectors][kCoefTile];
  const T* grads = static_cast<const T*>(p.grads);
  const A* coef = static_cast<const A*>(p.coef) + k_begin * p.n_rows;
  const A* x = static_cast<const A*>(p.x);
  A* out = static_cast<A*>(p.out);
  const A alpha = static_cast<A>(p.alpha), beta = static_cast<A>(p.beta);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // Every thread of the block runs the same number of iterations (the loop bound is
  // rounded up to the block), so the __syncthreads() below are reached by all.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < p.dim; base += stride) {
    const int64_t c = base + threadIdx.x;
    const bool active = c < p.dim;
    A acc[kMaxVectors] = {};
    for (int64_t i0 = 0; i0 < p.n_rows; i0 += kCoefTile) {
      const int64_t tile = min(static_cast<int64_t>(kCoefTile), p.n_rows - i0);
      __syncthreads();
      for (int e = threadIdx.x; e < kMaxVectors * kCoefTile; e += kThreads) {
        const int j = e / kCoefTile, i = e % kCoefTile;
        coef_tile[j][i] = (j < k_count && i < tile) ? coef[j * p.n_rows + i0 + i] : A(0);
      }
      __syncthreads();
      if (active) {
        for (int64_t i = 0; i < tile; ++i) {
          const A g = to_acc(grads[(i0 + i) * p.grads_ld + c]);
#pragma unroll
          for (int j = 0; j < kMaxVectors; ++j) acc[j] += coef_tile[j][i] * g;
        }
      }
    }
    if (active) {
      for (int64_t j = 0; j < k_count; ++j) {
        const int64_t row = k_begin + j;
        const A base_value = alpha == A(0) ? A(0) : alpha * x[row * p.x_ld + c];
        out[row * p.out_ld + c] = base_value + beta * acc[j];
      }
    }
  }
}

int64_t segment_length(int64_t n_rows, int64_t dim) {
  const int64_t row_groups = std::max<int64_t>(1, (n_rows + kRowsPerBlock - 1) / kRowsPerBlock);
  const int64_t want_segments = std::max<int64_t>(1, kTargetBlocks / row_groups);
  // At least 8 columns per thread, so the block reduction is amortized.
  const int64_t min_len = 8 * kThreads;
  return std::max(min_len, (dim + want_segments - 1) / want_segments);
}

}  // namespace
}  // namespace cuda

int64_t mfac_dots_cuda_segments(int64_t n_rows, int64_t dim, int64_t k) {
  const int64_t len = cuda::segment_length(n_rows, dim);
  return std::max<int64_t>(1, (dim + len - 1) / len);
}

void mfac_dots_cuda(const MfacDotsParams& p, void* workspace, int64_t workspace_elems, int device,
                    std::uintptr_t stream) {
  using namespace cuda;
  check_mfac_dots_params(p);
  if (p.k == 0 || p.n_rows == 0) return;
  const int64_t segments = mfac_dots_cuda_segments(p.n_rows, p.dim, p.k);
  const int64_t group = std::min<int64_t>(p.k, kMaxVectors);
  LOWRANK_CHECK(workspace != nullptr && workspace_elems >= segments * group * p.n_rows,
                "mfac_dots: workspace holds ", workspace_elems, " accumulators; expected at least ",
                segments * group * p.n_rows);
  set_device(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t len = segment_length(p.n_rows, p.dim);
    const dim3 grid(static_cast<unsigned>(segments), static_cast<unsigned>((p.n_rows + kRowsPerBlock - 1) / kRowsPerBlock));
    for (int64_t k0 = 0; k0 < p.k; k0 += kMaxVectors) {
      const int64_t count = std::min<int64_t>(kMaxVectors, p.k - k0);
      A* partial = static_cast<A*>(workspace);
      dots_partial<T><<<grid, kThreads, 0, s>>>(p, k0, count, len, partial);
      LOWRANK_CUDA_LAUNCH_CHECK();
      dots_reduce<A><<<grid_for(count * p.n_rows, kThreads), kThreads, 0, s>>>(partial, segments, k0, count,
                                                                             p.n_rows, static_cast<A*>(p.out));
      LOWRANK_CUDA_LAUNCH_CHECK();
    }
  });
}

void mfac_combine_cuda(const MfacCombineParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_mfac_combine_params(p);
  if (p.k == 0 || p.dim == 0) return;
  set_device(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t k0 = 0; k0 < p.k; k0 += kMaxVectors) {
      const int64_t count = std::min<int64_t>(kMaxVectors, p.k - k0);
      combine<T><<<grid_for(p.dim, kThreads), kThreads, 0, s>>>(p, k0, count);
      LOWRANK_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace lowrank_ops
