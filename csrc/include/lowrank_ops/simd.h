// 32-byte SIMD vectors through GCC/Clang vector extensions, shared by the CPU kernels:
// one ymm register under the AVX2/AVX-512 clones, two xmm registers on the baseline.
// The unaligned variant is for loads from buffers only aligned to the element.
// Functions taking or returning these types must be inlined into their (cloned)
// callers so that no call crosses the ABI that -Wpsabi warns about.
#pragma once

namespace lowrank_ops {

template <class A>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4)));
};
template <>
struct VecTraits<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(8)));
};
template <class A>
using Vec = typename VecTraits<A>::type;

}  // namespace lowrank_ops
