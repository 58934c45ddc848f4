// CPU kernel of the DoRA row norms (see lowrank_ops/dora.h for the identity and layouts).
//
// Roofline per call: the pass over W dominates: out * in elements read once
// (2 flops each), against 2 out r flops for B_o . C_o.  At 4096 x 4096 fp32 that is
// 64 MB read, so the kernel is memory-bound and its floor is out * in * sizeof(T) /
// bandwidth.  The GEMM W A^T in C (2 out in r flops, another pass over W) is the caller's.
// (For float32 with r = 4-32 on AVX-512 CPUs the op skips this kernel: the small-batch
// kernel of base_linear_cpu.cpp gives W A^T and ||W_o||^2 from one pass over W.)
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "lowrank_ops/cpu_isa.h"
#include "lowrank_ops/dora.h"
#include "lowrank_ops/parallel.h"

namespace lowrank_ops {
namespace {

constexpr int64_t kSerialElements = 1 << 16;  // below this many weight elements, threads cost more than they save

// sum_i row[i * stride]^2 in the accumulation type.  16 partial sums: independent
// multiply-add chains the compiler turns into SIMD lanes, and a smaller rounding error
// than one running sum.
template <class T>
LOWRANK_CPU_CLONES acc_t<T> row_sum_squares(const T* row, int64_t n, int64_t stride) {
  using A = acc_t<T>;
  constexpr int kWays = 16;
  A partial[kWays] = {};
  int64_t i = 0;
  if (stride == 1) {
    for (; i + kWays <= n; i += kWays) {
      for (int s = 0; s < kWays; ++s) {
        const A v = to_acc(row[i + s]);
        partial[s] += v * v;
      }
    }
  }
  for (int s = 0; i < n; ++i, s = (s + 1) % kWays) {
    const A v = to_acc(row[i * stride]);
    partial[s] += v * v;
  }
  for (int width = kWays / 2; width > 0; width /= 2)
    for (int s = 0; s < width; ++s) partial[s] += partial[s + width];
  return partial[0];
}

// Whether W_o and B_o are exactly zero (the norm is then exactly 0): only asked for the
// rows whose identity total is flagged, where it tells a zero row (DoRA's zero rows,
// 511 in Llama-3.1-8B's o_proj) from one whose squares underflowed.
template <class T>
bool zero_row(const DoraNormParams& p, int64_t o) {
  using A = acc_t<T>;
  const T* row = static_cast<const T*>(p.weight) + o * p.weight_stride_o;
  const A* b = static_cast<const A*>(p.lora_B) + o * p.rank;
  for (int64_t k = 0; k < p.rank; ++k)
    if (b[k] != A(0)) return false;
  for (int64_t i = 0; i < p.in_features; ++i)
    if (to_acc(row[i * p.weight_stride_i]) != A(0)) return false;
  return true;
}

// ||W_o + s B_o A|| from the dense row (r multiply-adds per entry; only for the rows the
// identity cannot be trusted with, see dora_identity_unreliable), formed kChunk entries
// at a time on the stack (rank-outer: A's rows read contiguously): the largest |entry|
// first, then the sum of the entries divided by it squared (a division, not a
// reciprocal, which would overflow for a subnormal largest entry), so no square
// overflows or underflows.  NaN entries give NaN, infinite ones inf.
template <class T>
acc_t<T> direct_row_norm(const DoraNormParams& p, int64_t o) {
  using A = acc_t<T>;
  constexpr int64_t kChunk = 256;
  const T* row = static_cast<const T*>(p.weight) + o * p.weight_stride_o;
  const A* b = static_cast<const A*>(p.lora_B) + o * p.rank;
  const A* a = static_cast<const A*>(p.lora_A);
  const A scale = static_cast<A>(p.scale);
  A dense[kChunk];
  auto form = [&](int64_t begin, int64_t count) {  // dense[0, count) = W_o + s B_o A over [begin, begin + count)
    for (int64_t i = 0; i < count; ++i) dense[i] = to_acc(row[(begin + i) * p.weight_stride_i]);
    for (int64_t k = 0; k < p.rank; ++k) {
      const A coefficient = scale * b[k];
      const A* a_row = a + k * p.in_features + begin;
      for (int64_t i = 0; i < count; ++i) dense[i] += coefficient * a_row[i];
    }
  };
  A largest = 0;
  for (int64_t begin = 0; begin < p.in_features; begin += kChunk) {
    const int64_t count = std::min(kChunk, p.in_features - begin);
    form(begin, count);
    for (int64_t i = 0; i < count; ++i) {
      const A magnitude = std::abs(dense[i]);
      if (!(magnitude <= largest)) {
        if (std::isnan(magnitude)) return magnitude;
        largest = magnitude;
      }
    }
  }
  if (largest == 0 || std::isinf(largest)) return largest;
  A sum = 0;
  for (int64_t begin = 0; begin < p.in_features; begin += kChunk) {
    const int64_t count = std::min(kChunk, p.in_features - begin);
    form(begin, count);
    for (int64_t i = 0; i < count; ++i) {
      const A scaled = dense[i] / largest;
      sum += scaled * scaled;
    }
  }
  return largest * std::sqrt(sum);
}

template <class T>
void dora_row_norm_typed(const DoraNormParams& p, int num_threads) {
  using A = acc_t<T>;
  const T* weight = static_cast<const T*>(p.weight);
  const A* coef = static_cast<const A*>(p.coef);
  const A* lora_B = static_cast<const A*>(p.lora_B);
  A* out = static_cast<A*>(p.out);
  const int64_t r = p.rank;
  const int threads = p.out_features * p.in_features < kSerialElements ? 1 : std::max(num_threads, 1);
  const int64_t n_blocks = std::min<int64_t>(p.out_features, 4 * static_cast<int64_t>(threads));
  parallel_for(n_blocks, threads, [&](int64_t block) {
    const int64_t begin = p.out_features * block / n_blocks, end = p.out_features * (block + 1) / n_blocks;
    for (int64_t o = begin; o < end; ++o) {
      const A squares = row_sum_squares(weight + o * p.weight_stride_o, p.in_features, p.weight_stride_i);
      A low_rank = 0;  // B_o . C_o
      for (int64_t k = 0; k < r; ++k) low_rank += lora_B[o * r + k] * coef[o * r + k];
      const A total = squares + low_rank;
      if (!dora_identity_unreliable(squares, total)) {
        out[o] = std::sqrt(std::max(total, A(0)));
      } else {
        out[o] = zero_row<T>(p, o) ? A(0) : direct_row_norm<T>(p, o);
      }
    }
  });
}

}  // namespace

void check_dora_norm_params(const DoraNormParams& p) {
  LOWRANK_CHECK(p.out_features >= 0 && p.in_features >= 0 && p.rank >= 0,
                "dora_row_norm: sizes must be non-negative; got out_features=", p.out_features,
                ", in_features=", p.in_features, ", rank=", p.rank);
  LOWRANK_CHECK(p.out_features == 0 || p.out != nullptr, "dora_row_norm: out must not be null");
  LOWRANK_CHECK(p.out_features * p.in_features == 0 || p.weight != nullptr, "dora_row_norm: weight must not be null");
  LOWRANK_CHECK(p.out_features * p.rank == 0 || (p.coef != nullptr && p.lora_B != nullptr && p.lora_A != nullptr),
                "dora_row_norm: coef, lora_B and lora_A must not be null when rank=", p.rank, " > 0");
}

void dora_row_norm_cpu(const DoraNormParams& p, int num_threads) {
  check_dora_norm_params(p);
  if (p.out_features == 0) return;
  dispatch_dtype<Float16Host, BFloat16Host>(p.dtype, [&](auto tag) {
    dora_row_norm_typed<typename decltype(tag)::type>(p, num_threads);
  });
}

}  // namespace lowrank_ops
