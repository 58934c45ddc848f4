// lowrank_ops._C: DoRA row norms by the low-rank identity (dora_row_norm).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "lowrank_ops/dora.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

DoraNormParams norm_params(std::uintptr_t weight, std::uintptr_t proj, std::uintptr_t gram, std::uintptr_t lora_B,
                           std::uintptr_t out, int64_t out_features, int64_t in_features, int64_t rank,
                           int64_t weight_stride_o, int64_t weight_stride_i, double scale, int dtype) {
  DoraNormParams p;
  p.weight = reinterpret_cast<const void*>(weight);
  p.proj = reinterpret_cast<const void*>(proj);
  p.gram = reinterpret_cast<const void*>(gram);
  p.lora_B = reinterpret_cast<const void*>(lora_B);
  p.out = reinterpret_cast<void*>(out);
  p.out_features = out_features;
  p.in_features = in_features;
  p.rank = rank;
  p.weight_stride_o = weight_stride_o;
  p.weight_stride_i = weight_stride_i;
  p.scale = scale;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

}  // namespace

LOWRANK_OPS_BINDINGS(dora) {
  const char* doc =
      "out[o] = ||W_o + scale * B_o A|| from ||W_o||^2, proj = W A^T and gram = A A^T.\n"
      "See csrc/include/lowrank_ops/dora.h for the layout contract.";
  m.def(
      "dora_row_norm_cpu",
      [](std::uintptr_t weight, std::uintptr_t proj, std::uintptr_t gram, std::uintptr_t lora_B, std::uintptr_t out,
         int64_t out_features, int64_t in_features, int64_t rank, int64_t weight_stride_o, int64_t weight_stride_i,
         double scale, int dtype, int num_threads) {
        const DoraNormParams p = norm_params(weight, proj, gram, lora_B, out, out_features, in_features, rank,
                                             weight_stride_o, weight_stride_i, scale, dtype);
        py::gil_scoped_release release;
        dora_row_norm_cpu(p, num_threads);
      },
      doc, py::kw_only(), "weight"_a, "proj"_a, "gram"_a, "lora_B"_a, "out"_a, "out_features"_a, "in_features"_a,
      "rank"_a, "weight_stride_o"_a, "weight_stride_i"_a, "scale"_a, "dtype"_a, "num_threads"_a);
  m.def(
      "dora_row_norm_cuda",
      [](std::uintptr_t weight, std::uintptr_t proj, std::uintptr_t gram, std::uintptr_t lora_B, std::uintptr_t out,
         int64_t out_features, int64_t in_features, int64_t rank, int64_t weight_stride_o, int64_t weight_stride_i,
         double scale, int dtype, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const DoraNormParams p = norm_params(weight, proj, gram, lora_B, out, out_features, in_features, rank,
                                             weight_stride_o, weight_stride_i, scale, dtype);
        py::gil_scoped_release release;
        dora_row_norm_cuda(p, device, stream);
#else
        bindings::no_cuda("dora_row_norm");
#endif
      },
      doc, py::kw_only(), "weight"_a, "proj"_a, "gram"_a, "lora_B"_a, "out"_a, "out_features"_a, "in_features"_a,
      "rank"_a, "weight_stride_o"_a, "weight_stride_i"_a, "scale"_a, "dtype"_a, "device"_a, "stream"_a);
}

}  // namespace lowrank_ops
