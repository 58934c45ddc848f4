// CUDA kernels for multi-adapter LoRA: segment_matmul (gathered shrink / expand, the
// SGMV of punica / S-LoRA) and segment_outer (per-adapter weight gradients).
// Contract: lowrank_ops/lora_multi.h.
//
// segment_matmul: one thread block per (32-row tile, 64-column tile) of the output,
// grid-stride.  A row tile may span several segments (decode batches: one row per
// segment); the block finds the first segment of its tile by binary search on the
// offsets and walks the segments that overlap the tile, running a shared-memory tiled
// product (32-deep K steps, 2 x 4 outputs per thread) over the rows of each.  Any
// (in, out, r): no shape tables, no grid-dimension limit (1-D grid-stride), 64-bit
// indices.  W tiles are loaded along whichever of W's strides is unit, so A, B and
// their transposes are all read coalesced in place.
//
// segment_outer: one block per (adapter, 32-rank tile, 64-column tile); it walks the
// segments of its adapter in order and sums 32-row chunks in registers: deterministic,
// no atomics.
//
// Roofline: both kernels do 2 N r F flops (F = in or out) on about
// 4 (N F + N r + n_used r F) bytes (fp32; y is read and written by the expand): about
// r / 2 flops per byte, memory-bound on an H100 for r <= 64 (its fp32 ridge point is
// about 20 flops per byte).  bench/bench_lora_multi.py reports GB/s from this floor.
#include <cuda_runtime.h>

#include "cuda_utils.cuh"
#include "lowrank_ops/clamp.h"
#include "lowrank_ops/lora_multi.h"

namespace lowrank_ops {
namespace cuda {
namespace {

constexpr int kTileM = 32;  // rows (segment_matmul) or ranks (segment_outer) per tile
constexpr int kTileN = 64;  // columns per tile
constexpr int kTileK = 32;  // reduction depth per shared-memory step
constexpr int kThreads = 256;
constexpr int kRowsPerThread = kTileM / (kThreads / 16);  // 2
constexpr int kColsPerThread = kTileN / 16;               // 4

__device__ __forceinline__ int64_t clamp_offset(const int64_t* offsets, int64_t s, int64_t n_rows) {
  return clamped(offsets[s], n_rows);
}

// Rank of adapter `id`, clamped to [0, r_max]; 0 for ids out of range (skipped segments).
__device__ __forceinline__ int64_t rank_of(const SegmentRouting& rt, int64_t id) {
  if (id < 0 || id >= rt.n_adapters) return 0;
  return clamped(rt.ranks[id], rt.r_max);
}

template <class T>
__global__ void __launch_bounds__(kThreads) segment_matmul_kernel(SegmentMatmulParams p, int64_t n_col_tiles) {
  using A = acc_t<T>;
  __shared__ A s_in[kTileM][kTileK + 1];
  __shared__ A s_w[kTileK][kTileN + 1];
  const SegmentRouting& rt = p.routing;
  const T* in = static_cast<const T*>(p.in);
  const T* w_all = static_cast<const T*>(p.w);
  T* out = static_cast<T*>(p.out);
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const int64_t n_items = (rt.n_rows + kTileM - 1) / kTileM * n_col_tiles;
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t m0 = item / n_col_tiles * kTileM, c0 = item % n_col_tiles * kTileN;
    const int64_t m_end = m0 + kTileM < rt.n_rows ? m0 + kTileM : rt.n_rows;
    // First segment whose end lies beyond m0.
    int64_t lo_s = 0, hi_s = rt.n_segments;
    while (lo_s < hi_s) {
      const int64_t mid = (lo_s + hi_s) / 2;
      if (clamp_offset(rt.offsets, mid + 1, rt.n_rows) <= m0) lo_s = mid + 1; else hi_s = mid;
    }
    for (int64_t s = lo_s; s < rt.n_segments; ++s) {
      const int64_t seg_lo = clamp_offset(rt.offsets, s, rt.n_rows), seg_hi = clamp_offset(rt.offsets, s + 1, rt.n_rows);
      if (seg_lo >= m_end) break;
      const int64_t lo = seg_lo > m0 ? seg_lo : m0, hi = seg_hi < m_end ? seg_hi : m_end;
      const int64_t id = rt.ids[s];
      const int64_t rank = rank_of(rt, id);
      const int64_t j_eff = p.rank_on_c ? p.J : rank, c_eff = p.rank_on_c ? (rank < p.C ? rank : p.C) : p.C;
      if (lo >= hi || rank == 0 || c0 >= c_eff) continue;  // block-uniform
      const T* w = w_all + id * p.w_stride_a;
      A acc[kRowsPerThread][kColsPerThread] = {};
      for (int64_t j0 = 0; j0 < j_eff; j0 += kTileK) {
        for (int e = tid; e < kTileM * kTileK; e += kThreads) {  // input tile, coalesced along j
          const int64_t n = m0 + e / kTileK, j = j0 + e % kTileK;
          s_in[e / kTileK][e % kTileK] = (n >= lo && n < hi && j < j_eff) ? to_acc(in[n * p.in_stride_n + j]) : A(0);
        }
        const bool j_unit = p.w_stride_j == 1;
        for (int e = tid; e < kTileK * kTileN; e += kThreads) {  // weight tile, coalesced along the unit stride
          const int t = j_unit ? e % kTileK : e / kTileN, c = j_unit ? e / kTileK : e % kTileN;
          const int64_t j = j0 + t, col = c0 + c;
          s_w[t][c] = (j < j_eff && col < c_eff) ? to_acc(w[j * p.w_stride_j + col * p.w_stride_c]) : A(0);
        }
        __syncthreads();
#pragma unroll 8
        for (int t = 0; t < kTileK; ++t) {
          A a[kRowsPerThread], b[kColsPerThread];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) a[i] = s_in[ty * kRowsPerThread + i][t];
#pragma unroll
          for (int q = 0; q < kColsPerThread; ++q) b[q] = s_w[t][tx + 16 * q];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
            for (int q = 0; q < kColsPerThread; ++q) acc[i][q] += a[i] * b[q];
        }
        __syncthreads();
      }
      const A scale = static_cast<A>(rt.scales ? rt.scales[id] : 1.0);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int64_t n = m0 + ty * kRowsPerThread + i;
        if (n < lo || n >= hi) continue;
#pragma unroll
        for (int q = 0; q < kColsPerThread; ++q) {
          const int64_t col = c0 + tx + 16 * q;
          if (col >= c_eff) continue;
          T* dst = out + n * p.out_stride_n + col;
          const A value = scale * acc[i][q];
          *dst = from_acc<T>(p.accumulate ? to_acc(*dst) + value : value);
        }
      }
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) segment_outer_kernel(SegmentOuterParams p, int64_t n_rank_tiles,
                                                                 int64_t n_col_tiles) {
  using A = acc_t<T>;
  __shared__ A s_left[kTileK][kTileM + 1];   // [row chunk][rank]
  __shared__ A s_right[kTileK][kTileN + 1];  // [row chunk][column]
  const SegmentRouting& rt = p.routing;
  const T* left = static_cast<const T*>(p.left);
  const T* right = static_cast<const T*>(p.right);
  T* out = static_cast<T*>(p.out);
  const int tid = static_cast<int>(threadIdx.x), tx = tid % 16, ty = tid / 16;
  const int64_t n_items = rt.n_adapters * n_rank_tiles * n_col_tiles;
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t a = item / (n_rank_tiles * n_col_tiles);
    const int64_t k0 = item / n_col_tiles % n_rank_tiles * kTileM, j0 = item % n_col_tiles * kTileN;
    const int64_t rank = rank_of(rt, a);
    if (k0 >= rank) continue;  // block-uniform
    A acc[kRowsPerThread][kColsPerThread] = {};
    for (int64_t s = 0; s < rt.n_segments; ++s) {
      if (rt.ids[s] != a) continue;
      const int64_t n_lo = clamp_offset(rt.offsets, s, rt.n_rows), n_hi = clamp_offset(rt.offsets, s + 1, rt.n_rows);
      for (int64_t n0 = n_lo; n0 < n_hi; n0 += kTileK) {
        for (int e = tid; e < kTileK * kTileM; e += kThreads) {  // coalesced along k
          const int t = e / kTileM, k = e % kTileM;
          const int64_t n = n0 + t;
          s_left[t][k] = (n < n_hi && k0 + k < rank) ? to_acc(left[n * p.left_stride_n + k0 + k]) : A(0);
        }
        for (int e = tid; e < kTileK * kTileN; e += kThreads) {  // coalesced along j
          const int t = e / kTileN, j = e % kTileN;
          const int64_t n = n0 + t;
          s_right[t][j] = (n < n_hi && j0 + j < p.J) ? to_acc(right[n * p.right_stride_n + j0 + j]) : A(0);
        }
        __syncthreads();
#pragma unroll 8
        for (int t = 0; t < kTileK; ++t) {
          A l[kRowsPerThread], r[kColsPerThread];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) l[i] = s_left[t][ty * kRowsPerThread + i];
#pragma unroll
          for (int q = 0; q < kColsPerThread; ++q) r[q] = s_right[t][tx + 16 * q];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
            for (int q = 0; q < kColsPerThread; ++q) acc[i][q] += l[i] * r[q];
        }
        __syncthreads();
      }
    }
    const A scale = static_cast<A>(rt.scales ? rt.scales[a] : 1.0);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t k = k0 + ty * kRowsPerThread + i;
      if (k >= rank) continue;
#pragma unroll
      for (int q = 0; q < kColsPerThread; ++q) {
        const int64_t j = j0 + tx + 16 * q;
        if (j < p.J) out[a * p.out_stride_a + k * p.out_stride_k + j * p.out_stride_j] = from_acc<T>(scale * acc[i][q]);
      }
    }
  }
}

}  // namespace
}  // namespace cuda

void segment_matmul_cuda(const SegmentMatmulParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_segment_matmul_sizes(p);  // the routing's contents are in device memory: checked by the Python op
  if (p.routing.n_rows == 0 || p.routing.n_segments == 0 || p.C == 0) return;
  const DeviceGuard device_guard(device);
  const int64_t n_col_tiles = (p.C + kTileN - 1) / kTileN;
  const int64_t n_items = (p.routing.n_rows + kTileM - 1) / kTileM * n_col_tiles;
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    segment_matmul_kernel<T><<<grid_for(n_items, 1), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        p, n_col_tiles);
  });
  LOWRANK_CUDA_LAUNCH_CHECK();
}

void segment_outer_cuda(const SegmentOuterParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_segment_outer_sizes(p);
  if (p.routing.n_adapters == 0 || p.routing.r_max == 0 || p.J == 0) return;
  const DeviceGuard device_guard(device);
  const int64_t n_rank_tiles = (p.routing.r_max + kTileM - 1) / kTileM;
  const int64_t n_col_tiles = (p.J + kTileN - 1) / kTileN;
  const int64_t n_items = p.routing.n_adapters * n_rank_tiles * n_col_tiles;
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    segment_outer_kernel<T><<<grid_for(n_items, 1), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        p, n_rank_tiles, n_col_tiles);
  });
  LOWRANK_CUDA_LAUNCH_CHECK();
}

}  // namespace lowrank_ops
