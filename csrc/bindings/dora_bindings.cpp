// lowrank_ops._C: DoRA row norms by the low-rank identity (dora_row_norm).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "lowrank_ops/dora.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

DoraNormParams norm_params(std::uintptr_t weight, std::uintptr_t coef, std::uintptr_t lora_B, std::uintptr_t lora_A,
                           std::uintptr_t out, int64_t out_features, int64_t in_features, int64_t rank,
                           int64_t weight_stride_o, int64_t weight_stride_i, int dtype, double scale) {
  DoraNormParams p;
  p.weight = reinterpret_cast<const void*>(weight);
  p.coef = reinterpret_cast<const void*>(coef);
  p.lora_B = reinterpret_cast<const void*>(lora_B);
  p.lora_A = reinterpret_cast<const void*>(lora_A);
  p.out = reinterpret_cast<void*>(out);
  p.out_features = out_features;
  p.in_features = in_features;
  p.rank = rank;
  p.weight_stride_o = weight_stride_o;
  p.weight_stride_i = weight_stride_i;
  p.dtype = static_cast<DType>(dtype);
  p.scale = scale;
  return p;
}

}  // namespace

LOWRANK_OPS_BINDINGS(dora) {
  const char* doc =
      "out[o] = sqrt(||W_o||^2 + B_o . coef_o) = ||W_o + s B_o A|| for coef = 2 s W A^T + s^2 B A A^T\n"
      "(rows where that identity cancels or leaves the type's range: directly from W_o + s B_o A).\n"
      "See csrc/include/lowrank_ops/dora.h for the layout contract.";
  m.def(
      "dora_row_norm_cpu",
      [](std::uintptr_t weight, std::uintptr_t coef, std::uintptr_t lora_B, std::uintptr_t lora_A, std::uintptr_t out,
         int64_t out_features, int64_t in_features, int64_t rank, int64_t weight_stride_o, int64_t weight_stride_i,
         int dtype, double scale, int num_threads) {
        const DoraNormParams p = norm_params(weight, coef, lora_B, lora_A, out, out_features, in_features, rank,
                                             weight_stride_o, weight_stride_i, dtype, scale);
        py::gil_scoped_release release;
        dora_row_norm_cpu(p, num_threads);
      },
      doc, py::kw_only(), "weight"_a, "coef"_a, "lora_B"_a, "lora_A"_a, "out"_a, "out_features"_a, "in_features"_a,
      "rank"_a, "weight_stride_o"_a, "weight_stride_i"_a, "dtype"_a, "scale"_a, "num_threads"_a);
  m.def(
      "dora_row_norm_cuda",
      [](std::uintptr_t weight, std::uintptr_t coef, std::uintptr_t lora_B, std::uintptr_t lora_A, std::uintptr_t out,
         int64_t out_features, int64_t in_features, int64_t rank, int64_t weight_stride_o, int64_t weight_stride_i,
         int dtype, double scale, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const DoraNormParams p = norm_params(weight, coef, lora_B, lora_A, out, out_features, in_features, rank,
                                             weight_stride_o, weight_stride_i, dtype, scale);
        py::gil_scoped_release release;
        dora_row_norm_cuda(p, device, stream);
#else
        bindings::no_cuda("dora_row_norm");
#endif
      },
      doc, py::kw_only(), "weight"_a, "coef"_a, "lora_B"_a, "lora_A"_a, "out"_a, "out_features"_a, "in_features"_a,
      "rank"_a, "weight_stride_o"_a, "weight_stride_i"_a, "dtype"_a, "scale"_a, "device"_a, "stream"_a);
}

}  // namespace lowrank_ops
