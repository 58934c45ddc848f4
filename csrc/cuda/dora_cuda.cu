// CUDA kernel of the DoRA row norms (see lowrank_ops/dora.h for the identity and layouts).
//
// One warp per row of W, rows handed out by a grid-stride loop: the lanes stream the row
// (coalesced when stride_i == 1) for ||W_o||^2, then split the r ranks of the low-rank
// terms; two warp reductions.  Memory-bound on the pass over W (out * in * sizeof(T)
// bytes, e.g. 32 MB for 4096 x 4096 bf16: ~10 us at an H100's ~3 TB/s).
#include <cuda_runtime.h>

#include "cuda_utils.cuh"
#include "lowrank_ops/dora.h"

namespace lowrank_ops {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarp;

// NaN if either is NaN, else the larger (fmax would drop a NaN).
template <class A>
__device__ __forceinline__ A max_keeping_nan(A x, A y) {
  return x != x ? x : (y != y ? y : (x > y ? x : y));
}

// Whether W_o and B_o are exactly zero, by the whole warp (the CPU twin zero_row):
// tells a zero row (norm 0) from one whose squares underflowed.  Warp-uniform.
template <class T>
__device__ bool zero_row(const DoraNormParams& p, int64_t o, int lane) {
  using A = acc_t<T>;
  const T* row = static_cast<const T*>(p.weight) + o * p.weight_stride_o;
  const A* b = static_cast<const A*>(p.lora_B) + o * p.rank;
  bool nonzero = false;
  for (int64_t k = lane; k < p.rank; k += kWarp) nonzero |= b[k] != A(0);
  for (int64_t i = lane; i < p.in_features; i += kWarp) nonzero |= to_acc(row[i * p.weight_stride_i]) != A(0);
  return !__any_sync(0xffffffffu, nonzero);
}

// ||W_o + s B_o A|| from the dense row, by the whole warp (the CPU twin direct_row_norm in
// csrc/cpu/dora_cpu.cpp): its largest |entry|, then the sum of the entries divided by it
// squared.  NaN entries give NaN, infinite ones inf, a zero row 0.
template <class T>
__device__ acc_t<T> direct_row_norm(const DoraNormParams& p, int64_t o, int lane) {
  using A = acc_t<T>;
  const T* row = static_cast<const T*>(p.weight) + o * p.weight_stride_o;
  const A* b = static_cast<const A*>(p.lora_B) + o * p.rank;
  const A* a = static_cast<const A*>(p.lora_A);
  const A scale = static_cast<A>(p.scale);
  auto entry = [&](int64_t i) {  // W_oi + sum_k (s b_k) a_ki, scaled and summed as the CPU twin
    A value = to_acc(row[i * p.weight_stride_i]);
    for (int64_t k = 0; k < p.rank; ++k) value += (scale * b[k]) * a[k * p.in_features + i];  // coalesced over lanes
    return value;
  };
  A largest = 0;
  for (int64_t i = lane; i < p.in_features; i += kWarp) largest = max_keeping_nan(largest, fabs(entry(i)));
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    largest = max_keeping_nan(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
  if (largest != largest || largest == A(0) || isinf(largest)) return largest;  // warp-uniform
  A sum = 0;
  for (int64_t i = lane; i < p.in_features; i += kWarp) {
    const A scaled = entry(i) / largest;
    sum += scaled * scaled;
  }
  return largest * sqrt(warp_sum(sum));
}

template <class T>
__global__ void __launch_bounds__(kThreads) dora_row_norm_kernel(DoraNormParams p) {
  using A = acc_t<T>;
  const T* weight = static_cast<const T*>(p.weight);
  const A* coef = static_cast<const A*>(p.coef);
  const A* lora_B = static_cast<const A*>(p.lora_B);
  A* out = static_cast<A*>(p.out);
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t r = p.rank;
  for (int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; o < p.out_features;
       o += warps) {
    const T* row = weight + o * p.weight_stride_o;
    A partial = 0;  // this lane's share of ||W_o||^2
    for (int64_t i = lane; i < p.in_features; i += kWarp) {
      const A v = to_acc(row[i * p.weight_stride_i]);
      partial += v * v;
    }
    A low_rank = 0;  // its share of B_o . C_o
    for (int64_t k = lane; k < r; k += kWarp) low_rank += lora_B[o * r + k] * coef[o * r + k];
    const A squares = warp_sum(partial);  // every lane holds the sums: the branch below is warp-uniform
    const A total = squares + warp_sum(low_rank);
    if (dora_identity_unreliable(squares, total)) {
      const A norm = zero_row<T>(p, o, lane) ? A(0) : direct_row_norm<T>(p, o, lane);
      if (lane == 0) out[o] = norm;
    } else if (lane == 0) {
      out[o] = sqrt(total < A(0) ? A(0) : total);
    }
  }
}

}  // namespace
}  // namespace cuda

void dora_row_norm_cuda(const DoraNormParams& p, int device, std::uintptr_t stream) {
  check_dora_norm_params(p);
  if (p.out_features == 0) return;
  const cuda::DeviceGuard device_guard(device);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  const unsigned grid = cuda::grid_for(p.out_features, cuda::kWarpsPerBlock);
  dispatch_dtype<__half, __nv_bfloat16>(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    cuda::dora_row_norm_kernel<T><<<grid, cuda::kThreads, 0, cuda_stream>>>(p);
    LOWRANK_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace lowrank_ops
