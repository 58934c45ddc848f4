// Device queries for lowrank_ops.info(), through our statically linked runtime, and the
// device guard of every CUDA entry point (cuda_utils.cuh).
#include <cuda_runtime.h>

#include <string>

#include "cuda_utils.cuh"
#include "lowrank_ops/cuda_runtime_info.h"

namespace lowrank_ops {
namespace cuda {
namespace {

// The driver's context calls, looked up once through the runtime (no link against libcuda);
// null where the driver does not provide them.
using ContextGetter = int (*)(void** context);  // CUresult cuCtxGetCurrent(CUcontext*)
using ContextSetter = int (*)(void* context);   // CUresult cuCtxSetCurrent(CUcontext)

struct ContextCalls {
  ContextGetter get = nullptr;
  ContextSetter set = nullptr;
};

// The lookup by toolkit: ByVersion from CUDA 12.5 (the versionless call is deprecated in
// 13), the versionless one with a status from 12.0, without one from 11.3; before that
// none (the guard then sets the device without restoring, as before it existed).
void* driver_entry_point(const char* symbol) {
  void* function = nullptr;
#if CUDART_VERSION >= 12050
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const bool ok = cudaGetDriverEntryPointByVersion(symbol, &function, 12000, cudaEnableDefault, &found) ==
                      cudaSuccess && found == cudaDriverEntryPointSuccess;
#elif CUDART_VERSION >= 12000
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const bool ok = cudaGetDriverEntryPoint(symbol, &function, cudaEnableDefault, &found) == cudaSuccess &&
                  found == cudaDriverEntryPointSuccess;
#elif CUDART_VERSION >= 11030
  const bool ok = cudaGetDriverEntryPoint(symbol, &function, cudaEnableDefault) == cudaSuccess;
#else
  const bool ok = false;
#endif
  if (!ok || function == nullptr) {
    cudaGetLastError();
    return nullptr;
  }
  return function;
}

const ContextCalls& context_calls() {
  static const ContextCalls calls{reinterpret_cast<ContextGetter>(driver_entry_point("cuCtxGetCurrent")),
                                  reinterpret_cast<ContextSetter>(driver_entry_point("cuCtxSetCurrent"))};
  return calls;
}

}  // namespace

DeviceGuard::DeviceGuard(int device) {
  int current = -1;
  const cudaError_t status = cudaGetDevice(&current);
  if (status == cudaErrorInsufficientDriver) {
    // The runtime is linked statically (cmake/LowrankCUDA.cmake): a build with a newer
    // toolkit than the driver supports fails here, while torch (its own runtime) works.
    int driver = 0;
    cudaDriverGetVersion(&driver);
    cudaGetLastError();
    throw std::runtime_error(detail::concat(
        "lowrank_ops' CUDA kernels were built with the CUDA ", CUDART_VERSION / 1000, ".", CUDART_VERSION % 1000 / 10,
        " runtime, newer than this driver supports (CUDA ", driver / 1000, ".", driver % 1000 / 10,
        "): update the driver, or rebuild lowrank_ops with a CUDA toolkit the driver supports (e.g. torch's, "
        "torch.version.cuda)"));
  }
  LOWRANK_CUDA_CHECK(status);
  if (current == device) return;
  const ContextCalls& calls = context_calls();
  restore_ = calls.get != nullptr && calls.set != nullptr && calls.get(&previous_context_) == 0;
  LOWRANK_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  if (restore_) context_calls().set(previous_context_);  // (a destructor does not throw)
}

}  // namespace cuda

int cuda_device_count() {
  int count = 0;
  // No driver or no device is not an error here: it means "no usable GPU".
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

std::string cuda_device_name(int device) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return std::string();
  }
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
}

int cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

int cuda_driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return version;
}

}  // namespace lowrank_ops
