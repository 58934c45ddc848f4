// CUDA passes over the M-FAC gradient buffer: G x fused with the ring-buffer write
// (mfac_dots) and alpha x + beta G^T c (mfac_combine).  See lowrank_ops/mfac.h.
//
// Both are memory-bound streams over G; the floor is n_rows * dim * sizeof(storage)
// bytes per pass, at the card's copy bandwidth.  No limit on n_rows (the official
// M-FAC kernels run one block of n_rows threads, hence n_rows <= 1024 and % 32 == 0).
//
// Every sum runs in double (lowrank_ops/mfac.h says why): 2 fp64 flops per element of
// G, 0.5 flop per byte of fp32 storage (1 for bf16), far under the fp64 rate of the
// data-center GPUs (A100: 9.7 TFLOP/s against 2 TB/s; H100: 34 against 3.35).  Cards with
// 1/64-rate fp64 (consumer parts) could become compute-bound, bf16 storage first.
//
// mfac_dots: a 2-D grid of (column segment, group of kRowsPerBlock rows).  Each thread
// strides over the segment's columns, keeping kRowsPerBlock x KV double partial sums in
// registers (KV <= kMaxVectors, the vectors of this launch, a template parameter: k = 1
// holds 16 accumulators, not 64, 97 registers on sm_90 without spills); a block
// reduction writes one double partial per (segment, vector, row) to the workspace and a
// second kernel sums the segments in a fixed order (deterministic, no atomics) and
// rounds once (to the acc type, or keeps double when wide).  x is re-read once per row group (1 / kRowsPerBlock of G's traffic at
// fp32 and k = 1, mostly from L2).  The block owning write_slot overwrites that row's
// segment before reading it, from the same loads of x[0].
//
// mfac_combine: one thread per column (grid-stride), coefficients staged through
// shared memory in tiles of kCoefTile rows; every row of G is read once, coalesced.
//
// Vectors are handled kMaxVectors at a time; larger k loops on the host side of this
// file (another pass over G per group of kMaxVectors).
//
// replace_factor_row: the O(n^2) update of the float64 Cholesky factor U of K after the
// window replaced gradient s (mfac_cholesky_replace_cpu's algorithm, see mfac.h), on one
// block of up to kReplaceThreads threads.  Its two sequential sweeps (the forward
// substitution over the rows above s, the rotations over the rows below) keep the
// row-by-row dependency with one __syncthreads per row; the O(n) work of a row is spread
// over the threads, thread t owning the columns j = t (mod blockDim).  The scalars of the
// next row (y[j+1], or the next pair of rotations) are computed by the owner of that row's
// column right after it updated it, and handed over in a double-buffered shared slot, so
// one barrier per row suffices.  The vectors (y, the update and downdate rows) live in
// shared memory when they fit (n <= kReplaceSmemDoubles / 2), else in the caller's work.
// Cost: about n barriers in sequence (s substitution steps, p = n - s - 1 rows, 3 more),
// at most ~6 n^2 flops (s^2 + 2 s p + 6 p^2) and one read and write of U's affected
// part: latency-bound on one SM, against potrf's n^3 / 3 flops.
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
constexpr int64_t kMaxGridY = 65535;

template <class T, int KV>
__global__ void __launch_bounds__(kThreads)
    dots_partial(MfacDotsParams p, int64_t k_begin, int64_t segment_len, int64_t group_begin, double* partial) {
  using A = acc_t<T>;
  __shared__ double reduce[kThreads / kWarp][kRowsPerBlock * KV];
  T* grads = static_cast<T*>(p.grads);
  const A* x = static_cast<const A*>(p.x) + k_begin * p.x_ld;
  const int64_t segment = blockIdx.x;
  const int64_t row0 = (group_begin + blockIdx.y) * kRowsPerBlock;
  const int64_t rows = min(static_cast<int64_t>(kRowsPerBlock), p.n_rows - row0);
  const int64_t c_begin = segment * segment_len;
  const int64_t c_end = min(p.dim, c_begin + segment_len);
  const bool writes = p.write_slot >= row0 && p.write_slot < row0 + rows && k_begin == 0;
  const bool rounds_x0 = p.write_slot >= 0 && k_begin == 0;
  double acc[kRowsPerBlock][KV] = {};
  for (int64_t c = c_begin + threadIdx.x; c < c_end; c += kThreads) {
    double xv[KV];
#pragma unroll
    for (int j = 0; j < KV; ++j) xv[j] = x[j * p.x_ld + c];
    if (rounds_x0) {
      const T stored = from_acc<T>(static_cast<A>(xv[0]));
      if (writes) grads[p.write_slot * p.grads_ld + c] = stored;
      xv[0] = to_acc(stored);
    }
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) {
      if (r < rows) {
        const double g = to_acc(grads[(row0 + r) * p.grads_ld + c]);
#pragma unroll
        for (int j = 0; j < KV; ++j) acc[r][j] = fma(g, xv[j], acc[r][j]);
      }
    }
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int r = 0; r < kRowsPerBlock; ++r) {
#pragma unroll
    for (int j = 0; j < KV; ++j) {
      const double s = warp_sum(acc[r][j]);
      if (lane == 0) reduce[warp][r * KV + j] = s;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kRowsPerBlock * KV; e += kThreads) {
    const int r = e / KV, j = e % KV;
    if (r >= rows) continue;
    double s = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) s += reduce[w][e];
    partial[(segment * KV + j) * p.n_rows + row0 + r] = s;
  }
}

// out[(k_begin + j) * n_rows + i] = sum over segments of partial[(segment, j, i)], in
// double, stored as O (double when wide, else the acc type: rounded once).
template <class O>
__global__ void dots_reduce(const double* partial, int64_t segments, int64_t k_begin, int64_t k_count, int64_t n_rows,
                            O* out) {
  const int64_t n = k_count * n_rows;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0;
    for (int64_t seg = 0; seg < segments; ++seg) s += partial[seg * n + e];
    out[k_begin * n_rows + e] = static_cast<O>(s);
  }
}

// C: the coefficients' type (double when wide, else the acc type); sums in double.
template <class T, class C>
__global__ void __launch_bounds__(kThreads) combine(MfacCombineParams p, int64_t k_begin, int64_t k_count) {
  using A = acc_t<T>;
  __shared__ double coef_tile[kMaxVectors][kCoefTile];
  const T* grads = static_cast<const T*>(p.grads);
  const C* coef = static_cast<const C*>(p.coef) + k_begin * p.n_rows;
  const A* x = static_cast<const A*>(p.x);
  A* out = static_cast<A*>(p.out);
  const double alpha = p.alpha, beta = p.beta;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // Every thread of the block runs the same number of iterations (the loop bound is
  // rounded up to the block), so the __syncthreads() below are reached by all.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < p.dim; base += stride) {
    const int64_t c = base + threadIdx.x;
    const bool active = c < p.dim;
    double acc[kMaxVectors] = {};
    for (int64_t i0 = 0; i0 < p.n_rows; i0 += kCoefTile) {
      const int64_t tile = min(static_cast<int64_t>(kCoefTile), p.n_rows - i0);
      __syncthreads();
      for (int e = threadIdx.x; e < kMaxVectors * kCoefTile; e += kThreads) {
        const int j = e / kCoefTile, i = e % kCoefTile;
        coef_tile[j][i] = (j < k_count && i < tile) ? static_cast<double>(coef[j * p.n_rows + i0 + i]) : 0.0;
      }
      __syncthreads();
      if (active) {
        for (int64_t i = 0; i < tile; ++i) {
          const double g = to_acc(grads[(i0 + i) * p.grads_ld + c]);
#pragma unroll
          for (int j = 0; j < kMaxVectors; ++j) acc[j] = fma(coef_tile[j][i], g, acc[j]);
        }
      }
    }
    if (active) {
      for (int64_t j = 0; j < k_count; ++j) {
        const int64_t row = k_begin + j;
        const double base_value = alpha == 0.0 ? 0.0 : alpha * static_cast<double>(x[row * p.x_ld + c]);
        out[row * p.out_ld + c] = static_cast<A>(base_value + beta * acc[j]);  // the one rounding
      }
    }
  }
}

// ---------------------------------------------------------------- factor rank update
constexpr int kReplaceThreads = 1024;
// Shared-memory budget for the vectors: 45 KB, under the 48 KB a launch gets without
// opting in, next to the few hundred bytes of static shared memory below.
constexpr int64_t kReplaceSmemDoubles = 5760;

// The two rotations of one row of the trailing block (update with the old row s, then
// downdate with the new one), as mfac_cholesky_replace_cpu forms them.
struct RowRotations {
  double cu, su, iu;  // update: cosine, sine (both over the old diagonal), 1 / cosine
  double cd, sd, id;  // downdate (hyperbolic)
  int ok;             // 0: the downdate's pivot was not positive and finite (K' not positive definite or not finite)
};

// Forms the rotations of a row from its diagonal and its entries of the two vectors;
// diag becomes the row's new diagonal.  The very formulas of the CPU sweep.
__device__ __forceinline__ RowRotations row_rotations(double& diag, double up, double down, int64_t n) {
  RowRotations r{0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0};
  double norm = hypot(diag, up);
  r.cu = norm / diag;
  r.su = up / diag;
  r.iu = diag / norm;
  diag = norm;
  const double d2 = (diag - down) * (diag + down);
  if (!mfac_valid_pivot(d2, diag * diag, n)) return r;
  norm = sqrt(d2);
  r.cd = norm / diag;
  r.sd = down / diag;
  r.id = diag / norm;
  diag = norm;
  r.ok = 1;
  return r;
}

// One entry a of a row and the matching entries of the two vectors, through both rotations.
__device__ __forceinline__ void rotate(double& a, double& up, double& down, const RowRotations& r) {
  double rotated = (a + r.su * up) * r.iu;
  up = r.cu * up - r.su * rotated;
  a = rotated;
  rotated = (a - r.sd * down) * r.id;
  down = r.cd * down - r.sd * rotated;
  a = rotated;
}

// The first index >= lo that thread t owns (index % threads == t).
__device__ __forceinline__ int64_t first_owned(int64_t lo, int64_t t, int64_t threads) {
  return lo <= t ? t : t + (lo - t + threads - 1) / threads * threads;
}

// blockDim.x is a multiple of kWarp (the warp reduction) and at most kReplaceThreads.
__global__ void __launch_bounds__(kReplaceThreads)
    replace_factor_row(double* U, int64_t u_ld, int64_t n, int64_t s, const double* row, double* work,
                       bool vectors_in_shared, int* ok) {
  extern __shared__ double shared_vectors[];
  __shared__ RowRotations rotations[2];  // double-buffered: row k's and row k + 1's
  __shared__ double y_next[2];           // double-buffered: y[j] for step j
  __shared__ double warp_sums[kReplaceThreads / kWarp];
  __shared__ double new_diag;
  const int64_t t = threadIdx.x, threads = blockDim.x;
  const int64_t p = n - s - 1;  // size of the trailing block
  double* y = vectors_in_shared ? shared_vectors : work;  // [s]
  double* up = y + s;                                     // [p]: the old row s (added back)
  double* down = up + p;                                  // [p]: the new one (taken out)

  // 1. y = U11^-T row[:s]: step j subtracts U[j, i] y[j] from the y[i], i > j; the owner
  //    of i = j + 1 then divides it by U[i, i] and hands it to step j + 1.
  for (int64_t i = t; i < s; i += threads) {
    double v = row[i];
    if (i == 0) {
      v /= U[0];
      y_next[0] = v;
    }
    y[i] = v;
  }
  __syncthreads();
  for (int64_t j = 0; j + 1 < s; ++j) {
    const double yj = y_next[j & 1];
    const double* uj = U + j * u_ld;
    for (int64_t i = first_owned(j + 1, t, threads); i < s; i += threads) {
      double v = y[i] - uj[i] * yj;
      if (i == j + 1) {
        v /= U[i * u_ld + i];
        y_next[(j + 1) & 1] = v;
      }
      y[i] = v;
    }
    __syncthreads();
  }

  // 2. The new diagonal sqrt(row[s] - |y|^2) (a block reduction: the order of the sum
  //    differs from the CPU's, by rounding only).
  double partial = 0.0;
  for (int64_t i = t; i < s; i += threads) partial += y[i] * y[i];
  partial = warp_sum(partial);
  if (t % kWarp == 0) warp_sums[t / kWarp] = partial;
  __syncthreads();
  if (t == 0) {
    double sum = 0.0;
    for (int64_t w = 0; w < threads / kWarp; ++w) sum += warp_sums[w];
    const double d2 = row[s] - sum;
    new_diag = mfac_valid_pivot(d2, row[s], n) ? sqrt(d2) : 0.0;  // as the CPU's check
  }
  __syncthreads();
  const double diag = new_diag;
  if (!(diag > 0.0)) {  // read by every thread after the barrier: a uniform exit
    if (t == 0) *ok = 0;
    return;
  }

  // 3. Row s: the new column above the diagonal, the diagonal, and right of it
  //    (row[s+1:] - U13^T y) / diag; the old right part is kept as the update vector.
  for (int64_t i = t; i < s; i += threads) U[i * u_ld + s] = y[i];
  if (t == 0) U[s * u_ld + s] = diag;
  for (int64_t i = t; i < p; i += threads) {
    const int64_t c = s + 1 + i;
    double v = row[c];
    for (int64_t j = 0; j < s; ++j) v -= U[j * u_ld + c] * y[j];
    v /= diag;
    up[i] = U[s * u_ld + c];
    U[s * u_ld + c] = v;
    down[i] = v;
  }
  if (p == 0) {
    if (t == 0) *ok = 1;
    return;
  }
  // Row 0 of the trailing block: its column 0 is thread 0's (which also wrote up[0], down[0]).
  if (t == 0) {
    double* d0 = U + (s + 1) * u_ld + s + 1;
    double d = *d0;
    rotations[0] = row_rotations(d, up[0], down[0], n);
    *d0 = d;
  }
  __syncthreads();

  // 4. Trailing block U33^T U33 + up up^T - down down^T, row k at a time: every entry
  //    right of the diagonal through row k's two rotations; the owner of column k + 1
  //    then forms row k + 1's rotations from its diagonal and the updated vectors.
  for (int64_t k = 0; k < p; ++k) {
    const RowRotations r = rotations[k & 1];
    if (!r.ok) {  // every thread reads the same slot after the barrier: a uniform exit
      if (t == 0) *ok = 0;
      return;
    }
    double* uk = U + (s + 1 + k) * u_ld + s + 1;
    for (int64_t j = first_owned(k + 1, t, threads); j < p; j += threads) {
      const bool leads = j == k + 1;  // this thread forms row k + 1's rotations
      double* dj = U + (s + 1 + j) * u_ld + s + 1 + j;
      // Row k + 1's diagonal, loaded with row k's entry (after the stores below the
      // compiler would have to assume they alias): one memory latency per row, not two.
      double d = leads ? *dj : 0.0;
      double a = uk[j], vu = up[j], vd = down[j];
      rotate(a, vu, vd, r);
      uk[j] = a;
      up[j] = vu;
      down[j] = vd;
      if (leads) {
        rotations[j & 1] = row_rotations(d, vu, vd, n);
        *dj = d;
      }
    }
    __syncthreads();
  }
  if (t == 0) *ok = 1;
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
                "mfac_dots: workspace holds ", workspace_elems, " double accumulators; expected at least ",
                segments * group * p.n_rows);
  const DeviceGuard device_guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t len = segment_length(p.n_rows, p.dim);
    const int64_t groups = (p.n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
    for (int64_t k0 = 0; k0 < p.k; k0 += kMaxVectors) {
      const int64_t count = std::min<int64_t>(kMaxVectors, p.k - k0);
      double* partial = static_cast<double*>(workspace);
      for (int64_t g0 = 0; g0 < groups; g0 += kMaxGridY) {  // grid.y is limited to 65535
        const dim3 grid(static_cast<unsigned>(segments), static_cast<unsigned>(std::min(kMaxGridY, groups - g0)));
        switch (count) {
          case 1: dots_partial<T, 1><<<grid, kThreads, 0, s>>>(p, k0, len, g0, partial); break;
          case 2: dots_partial<T, 2><<<grid, kThreads, 0, s>>>(p, k0, len, g0, partial); break;
          case 3: dots_partial<T, 3><<<grid, kThreads, 0, s>>>(p, k0, len, g0, partial); break;
          default: dots_partial<T, kMaxVectors><<<grid, kThreads, 0, s>>>(p, k0, len, g0, partial); break;
        }
        LOWRANK_CUDA_LAUNCH_CHECK();
      }
      const unsigned blocks = grid_for(count * p.n_rows, kThreads);
      if (p.wide) {
        dots_reduce<double><<<blocks, kThreads, 0, s>>>(partial, segments, k0, count, p.n_rows,
                                                        static_cast<double*>(p.out));
      } else {
        dots_reduce<A><<<blocks, kThreads, 0, s>>>(partial, segments, k0, count, p.n_rows, static_cast<A*>(p.out));
      }
      LOWRANK_CUDA_LAUNCH_CHECK();
    }
  });
}

void mfac_combine_cuda(const MfacCombineParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_mfac_combine_params(p);
  if (p.k == 0 || p.dim == 0) return;
  const DeviceGuard device_guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t k0 = 0; k0 < p.k; k0 += kMaxVectors) {
      const int64_t count = std::min<int64_t>(kMaxVectors, p.k - k0);
      if (p.wide) {
        combine<T, double><<<grid_for(p.dim, kThreads), kThreads, 0, s>>>(p, k0, count);
      } else {
        combine<T, acc_t<T>><<<grid_for(p.dim, kThreads), kThreads, 0, s>>>(p, k0, count);
      }
      LOWRANK_CUDA_LAUNCH_CHECK();
    }
  });
}

void mfac_cholesky_replace_cuda(double* U, int64_t u_ld, int64_t n, int64_t s, const double* row, double* work,
                                int* ok, int device, std::uintptr_t stream) {
  using namespace cuda;
  LOWRANK_CHECK(n >= 1 && s >= 0 && s < n, "mfac_cholesky_replace: need 0 <= s < n; got s = ", s, ", n = ", n);
  LOWRANK_CHECK(U != nullptr && row != nullptr && work != nullptr && ok != nullptr,
                "mfac_cholesky_replace: null pointer");
  LOWRANK_CHECK(u_ld >= n, "mfac_cholesky_replace: u_ld must be >= n = ", n, "; got ", u_ld);
  // The vectors: s entries of y, then 2 (n - s - 1) of the update and downdate rows.
  const int64_t vector_doubles = 2 * n - s - 2;
  const bool in_shared = vector_doubles <= kReplaceSmemDoubles;
  const size_t shared_bytes = in_shared ? static_cast<size_t>(vector_doubles) * sizeof(double) : 0;
  // Enough threads for the longer sweep (one column each up to kReplaceThreads), whole warps.
  const int64_t widest = std::max<int64_t>(1, std::max(s, n - s - 1));
  const int threads = static_cast<int>(std::min<int64_t>(kReplaceThreads, (widest + kWarp - 1) / kWarp * kWarp));
  const DeviceGuard device_guard(device);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  replace_factor_row<<<1, threads, shared_bytes, st>>>(U, u_ld, n, s, row, work, in_shared, ok);
  LOWRANK_CUDA_LAUNCH_CHECK();
}

}  // namespace lowrank_ops
