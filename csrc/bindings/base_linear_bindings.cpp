// lowrank_ops._C: small-batch products with a frozen base weight (CPU, float32, the forward's W also
// bfloat16; base_linear.h).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "lowrank_ops/base_linear.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {

LOWRANK_OPS_BINDINGS(base_linear) {
  m.attr("SMALL_BATCH_MAX_ROWS") = kSmallBatchMaxRows;
  m.attr("SMALL_BATCH_GRAD_MAX_ROWS") = kSmallBatchGradMaxRows;
  m.def(
      "small_batch_linear_cpu",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y, int64_t rows,
         int64_t in_features, int64_t out_features, int64_t x_ld, int64_t w_ld, int64_t y_ld, int num_threads,
         std::uintptr_t weight_sumsq, int weight_dtype) {
        SmallBatchLinearParams p;
        p.x = reinterpret_cast<const float*>(x);
        p.weight = reinterpret_cast<const void*>(weight);
        p.weight_dtype = static_cast<DType>(weight_dtype);
        p.bias = reinterpret_cast<const float*>(bias);
        p.y = reinterpret_cast<float*>(y);
        p.weight_sumsq = reinterpret_cast<float*>(weight_sumsq);
        p.rows = rows;
        p.in_features = in_features;
        p.out_features = out_features;
        p.x_ld = x_ld;
        p.w_ld = w_ld;
        p.y_ld = y_ld;
        py::gil_scoped_release release;
        small_batch_linear_cpu(p, num_threads);
      },
      "y = x W^T + b for rows <= SMALL_BATCH_MAX_ROWS (float32, row-major, unit column stride; bias 0 = none); "
      "weight_sumsq (0 = none): [out] squared row norms of W from the same pass; weight_dtype: 0 float32, "
      "3 bfloat16 (widened exactly to float32).",
      py::kw_only(), "x"_a, "weight"_a, "bias"_a, "y"_a, "rows"_a, "in_features"_a, "out_features"_a, "x_ld"_a,
      "w_ld"_a, "y_ld"_a, "num_threads"_a, "weight_sumsq"_a = 0, "weight_dtype"_a = 0);
  m.def(
      "small_batch_linear_grad_input_cpu",
      [](std::uintptr_t grad_y, std::uintptr_t weight, std::uintptr_t grad_x, int64_t rows, int64_t in_features,
         int64_t out_features, int64_t gy_ld, int64_t w_ld, int64_t gx_ld, int num_threads) {
        SmallBatchGradInputParams p;
        p.grad_y = reinterpret_cast<const float*>(grad_y);
        p.weight = reinterpret_cast<const float*>(weight);
        p.grad_x = reinterpret_cast<float*>(grad_x);
        p.rows = rows;
        p.in_features = in_features;
        p.out_features = out_features;
        p.gy_ld = gy_ld;
        p.w_ld = w_ld;
        p.gx_ld = gx_ld;
        py::gil_scoped_release release;
        small_batch_linear_grad_input_cpu(p, num_threads);
      },
      "grad_x = grad_y W for rows <= SMALL_BATCH_GRAD_MAX_ROWS (float32, row-major, unit column stride).",
      py::kw_only(), "grad_y"_a, "weight"_a, "grad_x"_a, "rows"_a, "in_features"_a, "out_features"_a, "gy_ld"_a,
      "w_ld"_a, "gx_ld"_a, "num_threads"_a);
}

}  // namespace lowrank_ops
