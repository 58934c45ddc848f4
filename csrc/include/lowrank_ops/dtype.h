// Dtype and index-type codes shared with Python, and the dispatch helpers that turn a
// runtime code into a template argument (dispatch_dtype, dispatch_real, dispatch_index).
//
// Codes are part of the binding contract: python/lowrank_ops/_dtypes.py holds the
// same numbers.
#pragma once

#include <cstdint>
#include <cstring>

#include "lowrank_ops/check.h"

namespace lowrank_ops {

enum class DType : int { float32 = 0, float64 = 1, float16 = 2, bfloat16 = 3 };
enum class IndexType : int { int32 = 0, int64 = 1 };

inline int64_t dtype_size(DType dtype) {
  return dtype == DType::float64 ? 8 : dtype == DType::float32 ? 4 : 2;
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the storage type of `dtype`.  Half types are supplied by
// the caller because CPU and CUDA code use different ones.
template <class Half, class BFloat16, class F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::float32: return f(Tag<float>{});
    case DType::float64: return f(Tag<double>{});
    case DType::float16: return f(Tag<Half>{});
    case DType::bfloat16: return f(Tag<BFloat16>{});
  }
  throw std::invalid_argument(detail::concat("dtype code must be 0..3; got ", static_cast<int>(dtype)));
}

// Calls f(Tag<T>{}) with T = float or double, for the kernels that only take fp32 and
// fp64 (Krylov, OT).  Plain host code, the same template for the CPU and the CUDA back
// ends (neither has a half type to supply).  Callers check the dtype first, with their
// own op name in the message; the throw is the backstop for a code that slipped by.
template <class F>
decltype(auto) dispatch_real(DType dtype, F&& f) {
  switch (dtype) {
    case DType::float32: return f(Tag<float>{});
    case DType::float64: return f(Tag<double>{});
    default: break;
  }
  throw std::invalid_argument(
      detail::concat("dtype code must be 0 (float32) or 1 (float64); got ", static_cast<int>(dtype)));
}

template <class F>
decltype(auto) dispatch_index(IndexType index_type, F&& f) {
  switch (index_type) {
    case IndexType::int32: return f(Tag<int32_t>{});
    case IndexType::int64: return f(Tag<int64_t>{});
  }
  throw std::invalid_argument(
      detail::concat("index type code must be 0 (int32) or 1 (int64); got ", static_cast<int>(index_type)));
}

// Accumulation type: fp32 for every 32-bit-or-narrower type, fp64 for fp64.
template <class T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccumulateType<T>::type;

// Host-side 16-bit float types: bit containers with exact widening (to_acc) and
// round-to-nearest-even narrowing (from_acc).
struct Float16Host {
  uint16_t bits;
};
struct BFloat16Host {
  uint16_t bits;
};

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }

inline float to_acc(BFloat16Host v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_acc(Float16Host v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exponent = (v.bits >> 10) & 0x1fu;
  uint32_t mantissa = v.bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1f) {
    u = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    u = sign;
  } else {  // subnormal: renormalize
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    u = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Rounds an accumulator value to storage type T (round to nearest even).
template <class T>
T from_acc(acc_t<T> v);

template <>
inline float from_acc<float>(float v) { return v; }
template <>
inline double from_acc<double>(double v) { return v; }

template <>
inline BFloat16Host from_acc<BFloat16Host>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16Host{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16Host{static_cast<uint16_t>(u >> 16)};
}

template <>
inline Float16Host from_acc<Float16Host>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Float16Host{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (abs >= 0x477ff000u) return Float16Host{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs < 0x38800000u) {  // result is subnormal or zero
    if (abs < 0x33000000u) return Float16Host{sign};  // below half of the smallest subnormal
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);  // in [14, 24]
    uint32_t half_mantissa = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return Float16Host{static_cast<uint16_t>(sign | half_mantissa)};
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even at bit 13
  return Float16Host{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

}  // namespace lowrank_ops
