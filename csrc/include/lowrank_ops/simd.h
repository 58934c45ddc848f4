// SIMD vectors through GCC/Clang vector extensions, shared by the CPU kernels:
// * Vec<A>, 32 bytes: one ymm register under the AVX2/AVX-512 clones, two xmm on the baseline;
// * WideVec<A>, 64 bytes: one zmm register under the AVX-512 clones, two ymm under AVX2.
// The unaligned variants are for loads from buffers only aligned to the element.
// Functions taking or returning these types must be inlined into their (cloned)
// callers so that no call crosses the ABI that -Wpsabi warns about.
#pragma once

#include <cstdint>

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

template <class A>
struct WideVecTraits {
  typedef A type __attribute__((vector_size(64)));
  typedef A unaligned __attribute__((vector_size(64), aligned(sizeof(A))));
};
template <class A>
using WideVec = typename WideVecTraits<A>::type;
template <class A>
using WideUnaligned = typename WideVecTraits<A>::unaligned;
template <class A>
constexpr int64_t kWideLanes = 64 / static_cast<int64_t>(sizeof(A));

// The lane sums of kWideLanes<A> vectors at once: lane i of the result is the pairwise
// (tree) sum of the lanes of v[i], through log2(lanes) levels that each add two
// shuffles of two vectors: 2 (lanes - 1) shuffles and lanes - 1 additions in all,
// against lanes log2(lanes) of each for separate tree sums.  Level with half-width h:
// lanes [0, h) of every 2h-lane group come from the group's first half, [h, 2h) from
// its second, one vector of groups after the other.
template <class A>
inline __attribute__((always_inline)) WideVec<A> wide_lane_sums(const WideVec<A>* v) {
  if constexpr (kWideLanes<A> == 16) {
    WideVec<A> a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
      a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)
      b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
             __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)
      c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
             __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  } else {
    static_assert(kWideLanes<A> == 8, "wide_lane_sums: 64-byte vectors of float or double");
    WideVec<A> a[4], b[2];
    for (int i = 0; i < 4; ++i)
      a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
             __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; ++i)
      b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
             __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return __builtin_shufflevector(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
  }
}

}  // namespace lowrank_ops
