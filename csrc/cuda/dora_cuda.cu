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
    A partial = 0;  // this lane's share of ||W_o||^2 + B_o . C_o
    for (int64_t i = lane; i < p.in_features; i += kWarp) {
      const A v = to_acc(row[i * p.weight_stride_i]);
      partial += v * v;
    }
    for (int64_t k = lane; k < r; k += kWarp) partial += lora_B[o * r + k] * coef[o * r + k];
    const A total = warp_sum(partial);
    if (lane == 0) out[o] = sqrt(total < A(0) ? A(0) : total);  // NaN stays NaN, as on the CPU
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
