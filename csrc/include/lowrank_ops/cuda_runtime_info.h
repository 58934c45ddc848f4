// Device queries used by lowrank_ops.info(); defined only in CUDA builds
// (csrc/cuda/runtime_cuda.cu).  They never throw: no driver means no devices.
#pragma once

#include <string>

namespace lowrank_ops {

int cuda_device_count();
std::string cuda_device_name(int device);  // "" when the query fails
int cuda_runtime_version();                // e.g. 13000
int cuda_driver_version();                 // 0 when no driver is installed

}  // namespace lowrank_ops
