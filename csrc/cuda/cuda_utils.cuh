// Device helpers shared by the CUDA kernels: error checks, half-type conversions,
// warp reductions.  Included only by .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "lowrank_ops/check.h"
#include "lowrank_ops/dtype.h"

// Throws std::runtime_error (RuntimeError in Python) naming the failed call.
#define LOWRANK_CUDA_CHECK(expr)                                                                  \
  do {                                                                                            \
    const cudaError_t lowrank_status_ = (expr);                                                   \
    if (lowrank_status_ != cudaSuccess)                                                           \
      throw std::runtime_error(::lowrank_ops::detail::concat(#expr, " failed: ",                  \
                                                             cudaGetErrorString(lowrank_status_), \
                                                             " (", __FILE__, ":", __LINE__, ")")); \
  } while (0)

// After every launch: configuration errors surface here, asynchronously-detected
// faults at the caller's next synchronizing call.
#define LOWRANK_CUDA_LAUNCH_CHECK() LOWRANK_CUDA_CHECK(cudaGetLastError())

namespace lowrank_ops {
namespace cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Makes `device` current for the lifetime of the guard (every entry point holds one), and
// then restores the thread's previous CUDA context, or none.  cudaSetDevice makes the
// device's primary context current in the driver's per-thread state, which torch's runtime
// reads too: a bare cudaSetDevice left torch.cuda.current_device() (and every allocation
// on "cuda") on the GPU of the last op's tensors.  The context is saved and restored
// through the driver entry points (cuCtxGetCurrent / cuCtxSetCurrent), so no context is
// created on a GPU the caller never used.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  void* previous_context_ = nullptr;  // a CUcontext; null: none was current
  bool restore_ = false;
};

// Grid size for a grid-stride loop over n_items items with items_per_block per block.
inline unsigned grid_for(int64_t n_items, int64_t items_per_block) {
  const int64_t blocks = (n_items + items_per_block - 1) / items_per_block;
  const int64_t max_blocks = int64_t(1) << 20;  // plenty to fill any GPU; the loop covers the rest
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

}  // namespace cuda
}  // namespace lowrank_ops
