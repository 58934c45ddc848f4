// Clamping of indices read from caller memory, shared by the CPU and CUDA kernels.
//
// Kernels stay memory-safe on malformed input (a corrupt CSR row_ptr, segment offsets,
// a permutation) by clamping every index that bounds a range or selects an element,
// rather than validating it on the hot path; the Python layer reports the bad input.
#pragma once

#include <cstdint>

#include "lowrank_ops/host_device.h"

namespace lowrank_ops {

// `value` (any integer type, e.g. an int32 or int64 row_ptr entry) widened to int64 and
// clamped to [0, hi].  A CSR row's entries are then [clamped(row_ptr[r], nnz),
// clamped(row_ptr[r + 1], nnz)), empty when the second is smaller.  For hi < 0 (an empty
// range) the result is 0 for negative values and hi otherwise.
template <class I>
LOWRANK_HOST_DEVICE inline int64_t clamped(I value, int64_t hi) {
  const int64_t v = static_cast<int64_t>(value);
  return v < 0 ? 0 : (v > hi ? hi : v);
}

}  // namespace lowrank_ops
