// CUDA kernels of the entropic OT family (contract: csrc/include/lowrank_ops/ot.h).
//
// Layouts:
//   * one warp per row (lanes stride over the columns): ot_row_lse for point costs and
//     row-contiguous matrices, ot_sparsify (ballot + popc keeps each row's entries in
//     column order), ot_row_grad, the CSR part of ot_hessian_matvec;
//   * lanes over rows (row_lse_lanes_over_rows): ot_row_lse when the matrix's rows are
//     the contiguous direction (a column reduction of a row-major C), so that a warp reads
//     32 consecutive entries; the columns are split over blockDim.y thread rows whose
//     partial (max, sum, weighted sum) are merged in shared memory;
//   * ot_log_histogram: a block-private histogram in shared memory, flushed with atomics.
// Log-sum-exp is accumulated online (running maximum m, sum of exp(s - m) rescaled when m
// grows), so nothing overflows.  Roofline: one read of C per pass (8 or 4 bytes per entry)
// and one exp: memory-bound on an H100 for matrix costs (3.35 TB/s: ~0.6 ms per pass at
// 10^4 x 10^4 float64), compute-bound on the exponential for point costs.
// Grid-stride loops, 64-bit indices, no allocation, no synchronization; caller's stream.
#include <cuda_runtime.h>

#include <math_constants.h>

#include <algorithm>

#include "cuda_utils.cuh"
#include "lowrank_ops/clamp.h"
#include "lowrank_ops/ot.h"

namespace lowrank_ops {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int kGradDims = 8;          // point dimensions accumulated per pass of ot_row_grad
constexpr int64_t kMaxBins = 4096;    // shared-memory histogram limit
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ double dexp(double v) { return exp(v); }
__device__ __forceinline__ float dexp(float v) { return expf(v); }
__device__ __forceinline__ double dlog(double v) { return log(v); }
__device__ __forceinline__ float dlog(float v) { return logf(v); }
template <class T>
__device__ __forceinline__ T neg_inf() {
  return sizeof(T) == 8 ? -CUDART_INF : -CUDART_INF_F;
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % kWarp); }
__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t warp_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp; }

__device__ __forceinline__ bool active(const OtSource& s, int64_t b) { return s.active == nullptr || s.active[b]; }

// Cost and log-plan entry of (b, i, j).
template <class T>
__device__ __forceinline__ T entry_cost(const OtSource& s, int64_t b, int64_t i, int64_t j) {
  if (s.cost == OtCost::matrix)
    return static_cast<const T*>(s.c)[b * s.c_stride_b + i * s.c_stride_i + j * s.c_stride_j];
  const T* x = static_cast<const T*>(s.x) + (b * s.rows + i) * s.dim;
  const T* y = static_cast<const T*>(s.y) + (b * s.cols + j) * s.dim;
  return ot_point_cost(s.cost, x, y, s.dim);
}

template <class T>
__device__ __forceinline__ T log_entry(const OtSource& s, int64_t b, int64_t i, int64_t j, T cost) {
  const T* f = static_cast<const T*>(s.f);
  const T* g = static_cast<const T*>(s.g);
  // Times 1 / reg, as the CPU's fill_block: a division rounds differently, and entries on a
  // threshold or bin edge were counted on one device and not on the other.
  return (f[b * s.rows + i] + g[b * s.cols + j] - cost) * (T(1) / static_cast<T>(s.reg));
}

// Online log-sum-exp state: sum = sum exp(s - m), wsum = sum cost exp(s - m).
template <class T>
struct Lse {
  T m, sum, wsum;
};

template <class T>
__device__ __forceinline__ void lse_add(Lse<T>& a, T v, T cost) {
  // exp(-inf) adds nothing; skipped, because while a.m is still -inf the update below
  // would compute exp(-inf - (-inf)) = NaN (an infinite cost, or (f + g - C) / reg
  // overflowing).  NaN still propagates.
  if (v == neg_inf<T>()) return;
  if (v == -neg_inf<T>()) v = v - v;  // +inf (an overflowed entry): NaN, as the CPU's max shift (inf - inf) gives
  if (v > a.m) {
    const T r = dexp(a.m - v);  // 0 when a.m = -inf
    a.sum = a.sum * r + T(1);
    a.wsum = a.wsum * r + cost;
    a.m = v;
  } else {
    const T e = dexp(v - a.m);
    a.sum += e;
    a.wsum += e * cost;
  }
}

template <class T>
__device__ __forceinline__ Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  const T m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<T>()) return a;
  const T ra = dexp(a.m - m), rb = dexp(b.m - m);
  return Lse<T>{m, a.sum * ra + b.sum * rb, a.wsum * ra + b.wsum * rb};
}

template <class T>
__device__ __forceinline__ Lse<T> warp_merge(Lse<T> a) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Lse<T> o{__shfl_xor_sync(kFullMask, a.m, offset), __shfl_xor_sync(kFullMask, a.sum, offset),
             __shfl_xor_sync(kFullMask, a.wsum, offset)};
    a = lse_merge(a, o);
  }
  return a;
}

template <class T>
__device__ __forceinline__ void write_lse(const OtRowLseParams& p, int64_t row, Lse<T> a) {
  T* lse = static_cast<T*>(p.lse);
  // A row of marginal 0 (no columns, or every entry exp(-inf)): lse = -inf, no cost.
  // (NaN propagates.)
  lse[row] = a.sum == T(0) ? neg_inf<T>() : a.m + dlog(a.sum);
  if (p.mean_cost) static_cast<T*>(p.mean_cost)[row] = a.sum == T(0) ? T(0) : a.wsum / a.sum;
}

// ---------------------------------------------------------------------------- ot_row_lse
template <class T>
__global__ void __launch_bounds__(kThreads) row_lse_warp(OtRowLseParams p) {
  const OtSource& s = p.src;
  const int lane = lane_id();
  for (int64_t row = global_warp(); row < s.batch * s.rows; row += warp_count()) {
    const int64_t b = row / s.rows, i = row % s.rows;
    if (!active(s, b)) {
      if (lane == 0) {
        static_cast<T*>(p.lse)[row] = T(0);
        if (p.mean_cost) static_cast<T*>(p.mean_cost)[row] = T(0);
      }
      continue;
    }
    Lse<T> acc{neg_inf<T>(), T(0), T(0)};
    for (int64_t j = lane; j < s.cols; j += kWarp) {
      const T cost = entry_cost<T>(s, b, i, j);
      lse_add(acc, log_entry(s, b, i, j, cost), cost);
    }
    acc = warp_merge(acc);
    if (lane == 0) write_lse(p, row, acc);
  }
}

// Block (32, kSplit): threadIdx.x over 32 consecutive rows, threadIdx.y over column slices.
constexpr int kSplit = 8;

template <class T>
__global__ void __launch_bounds__(kWarp * kSplit) row_lse_lanes_over_rows(OtRowLseParams p, int64_t row_groups) {
  const OtSource& s = p.src;
  __shared__ T shared_m[kSplit][kWarp], shared_sum[kSplit][kWarp], shared_wsum[kSplit][kWarp];
  for (int64_t group = blockIdx.x; group < s.batch * row_groups; group += gridDim.x) {
    const int64_t b = group / row_groups;
    const int64_t i = (group % row_groups) * kWarp + threadIdx.x;
    const bool live = active(s, b) && i < s.rows;
    Lse<T> acc{neg_inf<T>(), T(0), T(0)};
    if (live) {
      for (int64_t j = threadIdx.y; j < s.cols; j += kSplit) {
        const T cost = entry_cost<T>(s, b, i, j);
        lse_add(acc, log_entry(s, b, i, j, cost), cost);
      }
    }
    shared_m[threadIdx.y][threadIdx.x] = acc.m;
    shared_sum[threadIdx.y][threadIdx.x] = acc.sum;
    shared_wsum[threadIdx.y][threadIdx.x] = acc.wsum;
    __syncthreads();
    if (threadIdx.y == 0 && i < s.rows) {
      for (int k = 1; k < kSplit; ++k)
        acc = lse_merge(acc, Lse<T>{shared_m[k][threadIdx.x], shared_sum[k][threadIdx.x], shared_wsum[k][threadIdx.x]});
      const int64_t row = b * s.rows + i;
      if (live) {
        write_lse(p, row, acc);
      } else {
        static_cast<T*>(p.lse)[row] = T(0);
        if (p.mean_cost) static_cast<T*>(p.mean_cost)[row] = T(0);
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------- ot_log_histogram
template <class T>
__global__ void __launch_bounds__(kThreads) log_histogram(OtHistogramParams p, int64_t first_problem) {
  // 64-bit counts: one block's share of a problem can exceed 2^32 entries (point costs
  // need no memory per entry), as the CPU's int64 counts.
  extern __shared__ unsigned long long bins[];
  const OtSource& s = p.src;
  const int64_t b = first_problem + blockIdx.y;
  if (!active(s, b)) return;  // uniform over the block
  for (int64_t k = threadIdx.x; k < p.n_bins; k += blockDim.x) bins[k] = 0;
  __syncthreads();
  const T lo = static_cast<const T*>(p.lo)[b], hi = static_cast<const T*>(p.hi)[b];
  const T inv_width = static_cast<T>(p.n_bins) / (hi - lo);
  const int64_t entries = s.rows * s.cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < entries;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / s.cols, j = e % s.cols;
    const T v = log_entry(s, b, i, j, entry_cost<T>(s, b, i, j));
    if (!(v >= lo)) continue;
    const T pos = (v - lo) * inv_width;
    const int64_t k = ot_histogram_bin(pos, p.n_bins);
    atomicAdd(&bins[k], 1ull);
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < p.n_bins; k += blockDim.x) {
    if (bins[k])
      atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + b * p.n_bins + k), bins[k]);
  }
}

// ---------------------------------------------------------------------------- ot_sparsify
template <class T>
__global__ void __launch_bounds__(kThreads) sparsify(OtSparsifyParams p) {
  const OtSource& s = p.src;
  const int lane = lane_id();
  for (int64_t row = global_warp(); row < s.batch * s.rows; row += warp_count()) {
    const int64_t b = row / s.rows, i = row % s.rows;
    const T threshold = static_cast<const T*>(p.threshold)[b];
    if (p.col_idx == nullptr) {
      int64_t count = 0;
      if (active(s, b)) {
        for (int64_t j = lane; j < s.cols; j += kWarp)
          count += log_entry(s, b, i, j, entry_cost<T>(s, b, i, j)) >= threshold;
      }
      count = warp_sum(count);
      if (lane == 0) p.row_counts[row] = count;
      continue;
    }
    // Clamped: a malformed row_ptr never sends a write outside [0, nnz).
    const int64_t begin = clamped(p.row_ptr[row], p.nnz);
    const int64_t end = clamped(p.row_ptr[row + 1], p.nnz);  // end < begin: an empty row
    int64_t at = begin;
    for (int64_t j0 = 0; j0 < s.cols && at < end; j0 += kWarp) {
      const int64_t j = j0 + lane;
      T v = T(0);
      bool keep = false;
      if (j < s.cols) {
        v = log_entry(s, b, i, j, entry_cost<T>(s, b, i, j));
        keep = v >= threshold;
      }
      const unsigned ballot = __ballot_sync(kFullMask, keep);
      const int64_t slot = at + __popc(ballot & ((1u << lane) - 1u));
      if (keep && slot < end) {  // never past the row's range, even when it does not match the count
        p.col_idx[slot] = j;
        static_cast<T*>(p.values)[slot] = ot_exp(v);  // the CPU's exp: clamped at 88 / 709, flushed below normals
      }
      at += __popc(ballot);
    }
  }
}

// ---------------------------------------------------------------------------- ot_row_grad
template <class T>
__global__ void __launch_bounds__(kThreads) row_grad(OtRowGradParams p) {
  const OtSource& s = p.src;
  const int lane = lane_id();
  for (int64_t row = global_warp(); row < s.batch * s.rows; row += warp_count()) {
    const int64_t b = row / s.rows, i = row % s.rows;
    T* grad = static_cast<T*>(p.grad) + row * s.dim;
    if (!active(s, b)) {
      for (int64_t d = lane; d < s.dim; d += kWarp) grad[d] = T(0);
      continue;
    }
    const T lse = static_cast<const T*>(p.lse)[row];
    const T* x = static_cast<const T*>(s.x) + row * s.dim;
    for (int64_t d0 = 0; d0 < s.dim; d0 += kGradDims) {
      T acc[kGradDims] = {};
      for (int64_t j = lane; j < s.cols; j += kWarp) {
        const T w = ot_exp(log_entry(s, b, i, j, entry_cost<T>(s, b, i, j)) - lse);  // as the CPU
        const T* y = static_cast<const T*>(s.y) + (b * s.cols + j) * s.dim;
#pragma unroll
        for (int k = 0; k < kGradDims; ++k) {
          if (d0 + k < s.dim) acc[k] += w * ot_point_cost_grad(s.cost, x[d0 + k], y[d0 + k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kGradDims; ++k) {
        const T total = warp_sum(acc[k]);
        if (lane == 0 && d0 + k < s.dim) grad[d0 + k] = total;
      }
    }
  }
}

// ---------------------------------------------------------------------------- ot_hessian_matvec
template <class T>
__global__ void hessian_diagonal_y(OtHessianParams p) {
  const T* c = static_cast<const T*>(p.c);
  const T* vy = static_cast<const T*>(p.vy);
  T* oy = static_cast<T*>(p.out_y);
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < p.batch * p.cols;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x)
    oy[k] = c[k] * vy[k];
}

template <class T>
__global__ void __launch_bounds__(kThreads) hessian_rows(OtHessianParams p) {
  const T* values = static_cast<const T*>(p.values);
  const T* r = static_cast<const T*>(p.r);
  const T* vx = static_cast<const T*>(p.vx);
  const T* vy = static_cast<const T*>(p.vy);
  T* ox = static_cast<T*>(p.out_x);
  T* oy = static_cast<T*>(p.out_y);
  const int lane = lane_id();
  for (int64_t row = global_warp(); row < p.batch * p.rows; row += warp_count()) {
    const int64_t b = row / p.rows;
    const T x = vx[row];
    T acc = T(0);
    const int64_t begin = clamped(p.row_ptr[row], p.nnz);
    const int64_t end = clamped(p.row_ptr[row + 1], p.nnz);  // end < begin: an empty row
    for (int64_t k = begin + lane; k < end; k += kWarp) {
      const int64_t j = p.col_idx[k];
      if (j < 0 || j >= p.cols) continue;  // malformed index: skipped, never out of bounds
      acc += values[k] * vy[b * p.cols + j];
      atomicAdd(oy + b * p.cols + j, values[k] * x);
    }
    acc = warp_sum(acc);
    if (lane == 0) ox[row] = r[row] * x + acc;
  }
}

// The launches of one entry point: makes `device` current while it lives (DeviceGuard),
// launches on the caller's stream and checks every launch.
class Launcher {
 public:
  Launcher(int device, std::uintptr_t stream) : device_guard_(device), stream_(reinterpret_cast<cudaStream_t>(stream)) {}

  // kernel<<<grid, block, shared_bytes, stream>>>(args...), then the launch check.
  template <class... Params, class... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, const Args&... args) const {
    kernel<<<grid, block, shared_bytes, stream_>>>(args...);
    LOWRANK_CUDA_LAUNCH_CHECK();
  }

  // One warp per row (grid-stride over n_rows rows), kWarpsPerBlock warps per block.
  template <class P>
  void warp_per_row(void (*kernel)(P), int64_t n_rows, const P& p) const {
    (*this)(kernel, grid_for(n_rows, kWarpsPerBlock), kThreads, 0, p);
  }

 private:
  const DeviceGuard device_guard_;
  cudaStream_t stream_;
};

}  // namespace
}  // namespace cuda

void ot_row_lse_cuda(const OtRowLseParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_ot_source(p.src, "ot_row_lse");
  const OtSource& s = p.src;
  if (s.batch * s.rows == 0) return;
  const Launcher launch(device, stream);
  dispatch_real(s.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (s.cost == OtCost::matrix && (s.c_stride_i == 1 || s.c_stride_i == -1) && s.c_stride_j != 1) {
      const int64_t groups = (s.rows + kWarp - 1) / kWarp;
      launch(row_lse_lanes_over_rows<T>, grid_for(s.batch * groups, 1), dim3(kWarp, kSplit), 0, p, groups);
    } else {
      launch.warp_per_row(row_lse_warp<T>, s.batch * s.rows, p);
    }
  });
}

void ot_log_histogram_cuda(const OtHistogramParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_ot_source(p.src, "ot_log_histogram");
  LOWRANK_CHECK(p.n_bins >= 1 && p.n_bins <= kMaxBins, "ot_log_histogram: n_bins must be in [1, ", kMaxBins,
                "] on CUDA; got ", p.n_bins);
  const OtSource& s = p.src;
  if (s.batch * s.rows * s.cols == 0) return;
  const Launcher launch(device, stream);
  dispatch_real(s.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Enough blocks per problem to fill the GPU, few enough that the flushes stay cheap.
    const unsigned per_problem = std::min<unsigned>(grid_for(s.rows * s.cols, kThreads * 16), 1024u);
    // The problems are gridDim.y, at most 65535 per launch (the CPU takes any batch).
    constexpr int64_t kMaxGridY = 65535;
    for (int64_t first = 0; first < s.batch; first += kMaxGridY) {
      const auto problems = static_cast<unsigned>(std::min(kMaxGridY, s.batch - first));
      launch(log_histogram<T>, dim3(per_problem, problems), kThreads,
             static_cast<size_t>(p.n_bins) * sizeof(unsigned long long), p, first);
    }
  });
}

void ot_sparsify_cuda(const OtSparsifyParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_ot_sparsify_params(p);
  const OtSource& s = p.src;
  if (s.batch * s.rows == 0) return;
  const Launcher launch(device, stream);
  dispatch_real(s.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch.warp_per_row(sparsify<T>, s.batch * s.rows, p);
  });
}

void ot_row_grad_cuda(const OtRowGradParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_ot_row_grad_params(p);
  const OtSource& s = p.src;
  if (s.batch * s.rows == 0) return;
  const Launcher launch(device, stream);
  dispatch_real(s.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch.warp_per_row(row_grad<T>, s.batch * s.rows, p);
  });
}

void ot_hessian_matvec_cuda(const OtHessianParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_ot_hessian_params(p);
  if (p.batch * (p.rows + p.cols) == 0) return;
  const Launcher launch(device, stream);
  dispatch_real(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.batch * p.cols > 0) launch(hessian_diagonal_y<T>, grid_for(p.batch * p.cols, kThreads), kThreads, 0, p);
    if (p.batch * p.rows > 0) launch.warp_per_row(hessian_rows<T>, p.batch * p.rows, p);
  });
}

}  // namespace lowrank_ops
