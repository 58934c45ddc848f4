// LOWRANK_HOST_DEVICE marks a helper that both the CPU and the CUDA kernels compile:
// nvcc needs the annotations, a plain C++ compiler must not see them.
#pragma once

#ifdef __CUDACC__
#define LOWRANK_HOST_DEVICE __host__ __device__
#else
#define LOWRANK_HOST_DEVICE
#endif
