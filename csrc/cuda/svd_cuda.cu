// CUDA kernel of the batched one-sided Jacobi SVD (contract and algorithm: svd.h).
//
// One thread block per matrix (a grid-stride loop over the batch), 32 to 256 threads
// (one warp per column pair of a round, at most 8 warps).  The matrix W [cols][rows]
// and V [cols][cols], column-major in the accumulation type, live in dynamic shared
// memory when they fit (64 x 64 fp32: 32 KB), else in a global workspace slice per
// block that the Python op allocates (jacobi_svd_cuda_workspace_bytes).  Each round of
// the round-robin order holds cols/2 disjoint pairs; warps rotate them in parallel
// (lanes over rows: dot product, rotation, the two new squared norms by shuffles),
// and a __syncthreads() separates rounds.  Every branch that contains a shuffle or a
// __syncthreads() depends only on values that are uniform over the warp or the block
// (shared memory, or shuffle results broadcast from lane 0).
//
// Per sweep and matrix: n(n-1)/2 pairs, each 2m flops (dot) plus, when rotated,
// 10m + 6n flops; n - 1 block-wide barriers.  Small matrices are latency-bound (one
// block per matrix, barriers per round), which is why the batch must be large to fill
// the GPU; this kernel favours simplicity (and checkability without a GPU) over speed.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_utils.cuh"
#include "lowrank_ops/clamp.h"
#include "lowrank_ops/svd.h"

namespace lowrank_ops {
namespace cuda {
namespace {

constexpr int kMaxWarps = 8;
constexpr int kMaxThreads = kMaxWarps * kWarp;
constexpr int64_t kMaxGrid = int64_t(1) << 16;              // blocks; the grid-stride loop covers the rest
constexpr int64_t kMaxWorkspaceBytes = int64_t(256) << 20;  // global workspace cap (bounds the grid)
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float abs_of(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_of(double x) { return fabs(x); }
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float frexp_of(float x, int* e) { return frexpf(x, e); }
__device__ __forceinline__ double frexp_of(double x, int* e) { return frexp(x, e); }
__device__ __forceinline__ float ldexp_of(float x, int e) { return ldexpf(x, e); }
__device__ __forceinline__ double ldexp_of(double x, int e) { return ldexp(x, e); }

template <class A>
__device__ __forceinline__ bool is_finite(A x) {
  return abs_of(x) <= (sizeof(A) == 8 ? A(1.7976931348623157e308) : A(3.402823466e38f));
}

// Dynamic shared memory starts with the per-column state: norm2 [cols], sigma [cols]
// and reduction scratch [kWarp] (acc type), then perm [cols, padded to even], reduction
// indices [kWarp] (64-bit) and flags [kWarp] (int).  The matrices follow when they fit.
__host__ __device__ inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ inline int64_t state_acc_bytes(int64_t cols, int64_t acc_size) {
  return align16((2 * cols + kWarp) * acc_size);
}
__host__ __device__ inline int64_t small_shared_bytes(int64_t cols, int64_t acc_size) {
  return state_acc_bytes(cols, acc_size) + align16((cols + (cols & 1)) * 4 + kWarp * 8 + kWarp * 4);
}

struct LaunchPlan {
  bool in_shared = true;
  int threads = kWarp;
  unsigned grid = 1;
  int64_t shared_bytes = 0;
  int64_t workspace_bytes = 0;
  int max_shared = 0;  // the device's opt-in limit per block
};

LaunchPlan make_plan(int64_t batch, int64_t rows, int64_t cols, DType dtype, bool compute_uv, int device) {
  const int64_t acc_size = dtype == DType::float64 ? 8 : 4;
  const int64_t small = small_shared_bytes(cols, acc_size);
  const int64_t matrix_bytes = (rows * cols + (compute_uv ? cols * cols : 0)) * acc_size;
  int max_shared = 0;
  LOWRANK_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  LOWRANK_CHECK(small <= max_shared, "batched_svd: cols = ", cols, " needs ", small,
                " bytes of shared memory for per-column state; the device allows ", max_shared);
  LaunchPlan plan;
  plan.max_shared = max_shared;
  const int64_t warps = std::min<int64_t>(std::max<int64_t>((cols + 1) / 2, 1), kMaxWarps);
  plan.threads = static_cast<int>(warps * kWarp);
  const int64_t blocks = std::max<int64_t>(1, std::min(batch, kMaxGrid));
  if (small + matrix_bytes <= max_shared) {
    plan.in_shared = true;
    plan.shared_bytes = small + matrix_bytes;
    plan.grid = static_cast<unsigned>(blocks);
  } else {
    plan.in_shared = false;
    plan.shared_bytes = small;
    const int64_t fit = std::max<int64_t>(1, kMaxWorkspaceBytes / std::max<int64_t>(matrix_bytes, 1));
    plan.grid = static_cast<unsigned>(std::min(blocks, fit));
    plan.workspace_bytes = static_cast<int64_t>(plan.grid) * matrix_bytes;
  }
  return plan;
}

// ---------------------------------------------------------------------------- block reductions
// Every thread of the block must call these (they contain __syncthreads()); all
// threads get the result.  `red` / `red_idx` are kWarp-entry shared scratch arrays.
template <class A>
__device__ A block_max(A x, A* red) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = max_of(x, __shfl_xor_sync(kFullMask, x, offset));
  __syncthreads();  // earlier readers of red are done
  if (threadIdx.x % kWarp == 0) red[threadIdx.x / kWarp] = x;
  __syncthreads();
  A result = red[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) result = max_of(result, red[w]);
  return result;
}

template <class A>
__device__ A block_sum(A x, A* red) {
  x = warp_sum(x);
  __syncthreads();
  if (threadIdx.x % kWarp == 0) red[threadIdx.x / kWarp] = x;
  __syncthreads();
  A result = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) result += red[w];
  return result;
}

// Largest value, smallest index among equal values; identical in every lane.
template <class A>
__device__ __forceinline__ void warp_argmax(A& value, long long& index) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const A other = __shfl_xor_sync(kFullMask, value, offset);
    const long long other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (other > value || (other == value && other_index < index)) {
      value = other;
      index = other_index;
    }
  }
}

template <class A>
__device__ long long block_argmax(A value, long long index, A* red, long long* red_idx) {
  warp_argmax(value, index);
  __syncthreads();
  if (threadIdx.x % kWarp == 0) {
    red[threadIdx.x / kWarp] = value;
    red_idx[threadIdx.x / kWarp] = index;
  }
  __syncthreads();
  A best = red[0];
  long long best_index = red_idx[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) {
    if (red[w] > best || (red[w] == best && red_idx[w] < best_index)) {
      best = red[w];
      best_index = red_idx[w];
    }
  }
  return best_index;
}

// NaN-free sort key (NaN sorts last); sigma >= 0 otherwise.
template <class A>
__device__ __forceinline__ A sort_key(A x) {
  return x != x ? A(-1) : x;
}

// ---------------------------------------------------------------------------- the kernel
template <class T>
__global__ void __launch_bounds__(kMaxThreads) jacobi_svd_kernel(JacobiSvdParams p, bool in_shared) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int64_t rows = p.rows, cols = p.cols;
  const bool compute_uv = p.u != nullptr;
  const int lane = static_cast<int>(threadIdx.x % kWarp), warp = static_cast<int>(threadIdx.x / kWarp);
  const int n_warps = static_cast<int>(blockDim.x / kWarp);
  const A tiny = jacobi_tiny<A>();
  const A tol2 = static_cast<A>(p.tol * p.tol);

  A* norm2 = reinterpret_cast<A*>(shared_raw);
  A* sigma = norm2 + cols;
  A* red = sigma + cols;
  int* perm = reinterpret_cast<int*>(shared_raw + state_acc_bytes(cols, sizeof(A)));
  long long* red_idx = reinterpret_cast<long long*>(perm + cols + (cols & 1));  // 8-byte aligned
  int* flags = reinterpret_cast<int*>(red_idx + kWarp);
  const int64_t per_matrix = rows * cols + (compute_uv ? cols * cols : 0);
  A* w = in_shared ? reinterpret_cast<A*>(shared_raw + small_shared_bytes(cols, sizeof(A)))
                   : static_cast<A*>(p.workspace) + static_cast<int64_t>(blockIdx.x) * per_matrix;
  A* v = compute_uv ? w + rows * cols : nullptr;
  const int64_t n_elem = rows * cols;
  const int64_t n_even = cols + (cols & 1);

  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    // ---- copy in (column-major), max |X|, exact power-of-two scaling
    const T* a = static_cast<const T*>(p.a) + b * p.a_stride_b;
    const bool rows_fast = (p.a_stride_r < 0 ? -p.a_stride_r : p.a_stride_r) <=
                           (p.a_stride_c < 0 ? -p.a_stride_c : p.a_stride_c);
    A local = 0;
    for (int64_t e = threadIdx.x; e < n_elem; e += blockDim.x) {
      const int64_t r = rows_fast ? e % rows : e / cols, c = rows_fast ? e / rows : e % cols;
      const A x = to_acc(a[r * p.a_stride_r + c * p.a_stride_c]);
      w[c * rows + r] = x;
      local = max_of(local, abs_of(x));
    }
    const A amax = block_max(local, red);
    int exponent = 0;
    if (amax > A(0) && is_finite(amax)) frexp_of(amax, &exponent);
    if (exponent != 0) {
      const bool one_factor = (exponent < 0 ? -exponent : exponent) < 120;
      const A factor = ldexp_of(A(1), -exponent);
      for (int64_t e = threadIdx.x; e < n_elem; e += blockDim.x) w[e] = one_factor ? w[e] * factor : ldexp_of(w[e], -exponent);
    }
    if (compute_uv)
      for (int64_t e = threadIdx.x; e < cols * cols; e += blockDim.x) v[e] = (e % cols == e / cols) ? A(1) : A(0);
    __syncthreads();
    for (int64_t c = warp; c < cols; c += n_warps) {
      const A* x = w + c * rows;
      A sum = 0;
      for (int64_t r = lane; r < rows; r += kWarp) sum += x[r] * x[r];
      sum = warp_sum(sum);
      if (lane == 0) norm2[c] = sum;
    }
    __syncthreads();

    // ---- sweeps
    int sweeps = 0;
    bool converged = false;
    A off = 0;
    for (int sweep = 1; sweep <= p.max_sweeps; ++sweep) {
      sweeps = sweep;
      A warp_off2 = 0;
      int warp_rotated = 0;
      for (int64_t round = 0; round + 1 < n_even; ++round) {
        for (int64_t k = warp; k < n_even / 2; k += n_warps) {
          int64_t i, j;
          round_robin_pair(n_even, round, k, i, j);
          if (j >= cols) continue;  // dummy column of an odd count (warp-uniform)
          A* wi = w + i * rows;
          A* wj = w + j * rows;
          A g = 0;
          for (int64_t r = lane; r < rows; r += kWarp) g += wi[r] * wj[r];
          g = __shfl_sync(kFullMask, warp_sum(g), 0);  // bitwise identical in every lane
          const A alpha = norm2[i], beta = norm2[j];
          const A off2 = jacobi_off2(alpha, beta, g);
          warp_off2 = max_of(warp_off2, off2);
          if (!(off2 > tol2)) continue;  // warp-uniform
          warp_rotated = 1;
          A t, c;
          jacobi_rotation(alpha, beta, g, t, c, [](A y) { return A(1) / jacobi_sqrt(y); });
          const A s = c * t;
          A ni = 0, nj = 0;
          for (int64_t r = lane; r < rows; r += kWarp) {
            const A x = wi[r], y = wj[r];
            const A x2 = c * x - s * y, y2 = s * x + c * y;
            wi[r] = x2;
            wj[r] = y2;
            ni += x2 * x2;
            nj += y2 * y2;
          }
          ni = warp_sum(ni);
          nj = warp_sum(nj);
          if (lane == 0) {
            norm2[i] = ni;
            norm2[j] = nj;
          }
          if (compute_uv) {
            A* vi = v + i * cols;
            A* vj = v + j * cols;
            for (int64_t r = lane; r < cols; r += kWarp) {
              const A x = vi[r], y = vj[r];
              vi[r] = c * x - s * y;
              vj[r] = s * x + c * y;
            }
          }
        }
        __syncthreads();  // the next round reads columns and norms this one wrote
      }
      if (lane == 0) {
        red[warp] = warp_off2;
        flags[warp] = warp_rotated;
      }
      __syncthreads();
      A sweep_off2 = 0;
      int any_rotated = 0;
      for (int q = 0; q < n_warps; ++q) {
        sweep_off2 = max_of(sweep_off2, red[q]);
        any_rotated |= flags[q];
      }
      __syncthreads();  // all reads of red / flags done before their next use
      off = jacobi_sqrt(sweep_off2);
      if (!any_rotated) {  // block-uniform
        converged = true;
        break;
      }
    }

    // ---- singular values and their order (rank of each column; a permutation)
    // A NaN norm (non-finite input; the Python op refuses it first) stays NaN: sorted last
    // and reported as not converged below, not taken for a zero column.
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
      sigma[c] = norm2[c] >= tiny ? jacobi_sqrt(norm2[c]) : (norm2[c] != norm2[c] ? norm2[c] : A(0));
    __syncthreads();
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const A key = sort_key(sigma[c]);
      int rank = 0;
      for (int64_t q = 0; q < cols; ++q) {
        const A other = sort_key(sigma[q]);
        rank += (other > key || (other == key && q < c)) ? 1 : 0;
      }
      perm[rank] = static_cast<int>(c);
    }
    __syncthreads();

    if (compute_uv) {
      for (int64_t e = threadIdx.x; e < n_elem; e += blockDim.x) {
        const A sc = sigma[e / rows];
        if (sc > A(0)) w[e] /= sc;
      }
      int64_t n_valid = 0;
      for (int64_t c = 0; c < cols; ++c) n_valid += sigma[c] > A(0) ? 1 : 0;
      __syncthreads();
      // Zero columns (sorted last): complete U to an orthonormal set (see svd.h).
      for (int64_t pos = n_valid; pos < cols; ++pos) {
        A best = A(-2);
        long long best_q = 0;
        for (int64_t q = threadIdx.x; q < rows; q += blockDim.x) {
          A residual = 1;
          for (int64_t t = 0; t < pos; ++t) {
            const A x = w[static_cast<int64_t>(perm[t]) * rows + q];
            residual -= x * x;
          }
          if (residual > best) {
            best = residual;
            best_q = q;
          }
        }
        const long long q_star = block_argmax(best, best_q, red, red_idx);
        A* u = w + static_cast<int64_t>(perm[pos]) * rows;
        for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) u[r] = r == q_star ? A(1) : A(0);
        __syncthreads();
        for (int pass = 0; pass < 2; ++pass) {
          for (int64_t t = warp; t < pos; t += n_warps) {  // classical Gram-Schmidt coefficients, in norm2 (free now)
            const A* basis = w + static_cast<int64_t>(perm[t]) * rows;
            A coef = 0;
            for (int64_t r = lane; r < rows; r += kWarp) coef += basis[r] * u[r];
            coef = warp_sum(coef);
            if (lane == 0) norm2[t] = coef;
          }
          __syncthreads();
          for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
            A x = u[r];
            for (int64_t t = 0; t < pos; ++t) x -= norm2[t] * w[static_cast<int64_t>(perm[t]) * rows + r];
            u[r] = x;
          }
          __syncthreads();
        }
        A part = 0;
        for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) part += u[r] * u[r];
        const A inv = A(1) / jacobi_sqrt(block_sum(part, red));
        for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) u[r] *= inv;
        __syncthreads();
      }
      // Signs: the largest-magnitude entry of each output U column positive.
      for (int64_t c = warp; c < cols; c += n_warps) {
        const A* x = p.sign_from_v ? v + c * cols : w + c * rows;
        const int64_t len = p.sign_from_v ? cols : rows;
        A best = A(-1);
        long long arg = 0;
        for (int64_t r = lane; r < len; r += kWarp) {
          if (abs_of(x[r]) > best) {
            best = abs_of(x[r]);
            arg = r;
          }
        }
        warp_argmax(best, arg);
        const bool flip = x[arg] < A(0);
        __syncwarp();  // every lane has read x[arg] before any lane negates it
        if (flip) {
          for (int64_t r = lane; r < rows; r += kWarp) w[c * rows + r] = -w[c * rows + r];
          for (int64_t r = lane; r < cols; r += kWarp) v[c * cols + r] = -v[c * cols + r];
        }
      }
      __syncthreads();
      A* u_out = static_cast<A*>(p.u) + b * p.u_stride_b;
      const bool u_rows_fast = (p.u_stride_r < 0 ? -p.u_stride_r : p.u_stride_r) <=
                               (p.u_stride_c < 0 ? -p.u_stride_c : p.u_stride_c);
      for (int64_t e = threadIdx.x; e < n_elem; e += blockDim.x) {
        const int64_t r = u_rows_fast ? e % rows : e / cols, pos = u_rows_fast ? e / rows : e % cols;
        const int64_t src = clamped(perm[pos], cols - 1);
        u_out[r * p.u_stride_r + pos * p.u_stride_c] = w[src * rows + r];
      }
      A* v_out = static_cast<A*>(p.v) + b * p.v_stride_b;
      const bool v_rows_fast = (p.v_stride_r < 0 ? -p.v_stride_r : p.v_stride_r) <=
                               (p.v_stride_c < 0 ? -p.v_stride_c : p.v_stride_c);
      for (int64_t e = threadIdx.x; e < cols * cols; e += blockDim.x) {
        const int64_t r = v_rows_fast ? e % cols : e / cols, pos = v_rows_fast ? e / cols : e % cols;
        const int64_t src = clamped(perm[pos], cols - 1);
        v_out[r * p.v_stride_r + pos * p.v_stride_c] = v[src * cols + r];
      }
    }

    A* s_out = static_cast<A*>(p.s) + b * p.s_stride_b;
    for (int64_t pos = threadIdx.x; pos < cols; pos += blockDim.x) {
      const int64_t src = clamped(perm[pos], cols - 1);
      s_out[pos * p.s_stride_k] = ldexp_of(sigma[src], exponent);
    }
    if (threadIdx.x == 0) {
      bool finite = true;
      // Finite once scaled back: a finite A's sigma may overflow A's range.
      for (int64_t c = 0; c < cols; ++c) finite = finite && is_finite(ldexp_of(sigma[c], exponent));
      p.sweeps[b] = sweeps;
      p.converged[b] = converged && finite ? 1 : 0;
      static_cast<A*>(p.off_diagonal)[b] = off;
    }
    __syncthreads();  // shared memory is reused by the block's next matrix
  }
}

}  // namespace
}  // namespace cuda

int64_t jacobi_svd_cuda_workspace_bytes(int64_t batch, int64_t rows, int64_t cols, DType dtype, bool compute_uv,
                                        int device) {
  LOWRANK_CHECK(batch >= 0 && cols >= 0 && rows >= cols && cols <= kJacobiMaxCols,
                "batched_svd: expected batch >= 0 and ", kJacobiMaxCols, " >= cols >= 0 with rows >= cols; got batch = ",
                batch, ", rows = ", rows, ", cols = ", cols);
  if (batch == 0) return 0;
  const cuda::DeviceGuard device_guard(device);
  return cuda::make_plan(batch, rows, cols, dtype, compute_uv, device).workspace_bytes;
}

void jacobi_svd_cuda(const JacobiSvdParams& p, int device, std::uintptr_t stream) {
  using namespace cuda;
  check_jacobi_svd_params(p);
  if (p.batch == 0) return;
  const DeviceGuard device_guard(device);
  const LaunchPlan plan = make_plan(p.batch, p.rows, p.cols, p.dtype, p.u != nullptr, device);
  LOWRANK_CHECK(plan.workspace_bytes == 0 || (p.workspace != nullptr && p.workspace_bytes >= plan.workspace_bytes),
                "batched_svd: the workspace has ", p.workspace_bytes, " bytes; expected at least ",
                plan.workspace_bytes, " (jacobi_svd_cuda_workspace_bytes)");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // The device's limit, not this call's need: the attribute is per device and kernel, and
    // a thread setting a smaller need between another thread's set and launch made that
    // launch fail; every call setting the same value cannot.
    LOWRANK_CUDA_CHECK(cudaFuncSetAttribute(jacobi_svd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            plan.max_shared));
    jacobi_svd_kernel<T><<<plan.grid, plan.threads, static_cast<size_t>(plan.shared_bytes), s>>>(p, plan.in_shared);
    LOWRANK_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace lowrank_ops
