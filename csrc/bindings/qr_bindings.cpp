// lowrank_ops._C: CholeskyQR's kernels (tall_gram, tall_solve_upper, tall_cholesky, tall_scale, cholesky_qr; qr.h).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "lowrank_ops/qr.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

// Params P with its block description (qr.h's copy_tall_block fields) set from the arguments.
template <class P>
P block_params(std::uintptr_t y, int64_t batch, int64_t rows, int64_t cols, int64_t y_batch_stride,
               int64_t y_row_stride, int64_t y_col_stride, int dtype) {
  P p;
  p.y = reinterpret_cast<decltype(p.y)>(y);
  p.batch = batch;
  p.rows = rows;
  p.cols = cols;
  p.y_batch_stride = y_batch_stride;
  p.y_row_stride = y_row_stride;
  p.y_col_stride = y_col_stride;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

}  // namespace

LOWRANK_OPS_BINDINGS(qr) {
  m.def(
      "tall_gram_cpu",
      [](std::uintptr_t y, std::uintptr_t gram, int64_t batch, int64_t rows, int64_t cols, int64_t y_batch_stride,
         int64_t y_row_stride, int64_t y_col_stride, int dtype, int num_threads) {
        auto p = block_params<TallGramParams>(y, batch, rows, cols, y_batch_stride, y_row_stride, y_col_stride, dtype);
        p.gram = reinterpret_cast<void*>(gram);
        py::gil_scoped_release release;
        tall_gram_cpu(p, num_threads);
      },
      "G = Y^T Y for a batch of blocks Y [rows, cols] (unit row or column stride); G [batch, cols, cols] contiguous.",
      py::kw_only(), "y"_a, "gram"_a, "batch"_a, "rows"_a, "cols"_a, "y_batch_stride"_a, "y_row_stride"_a,
      "y_col_stride"_a, "dtype"_a, "num_threads"_a);
  m.def(
      "tall_solve_upper_cpu",
      [](std::uintptr_t y, std::uintptr_t r, std::uintptr_t q, int64_t batch, int64_t rows, int64_t cols,
         int64_t y_batch_stride, int64_t y_row_stride, int64_t y_col_stride, int64_t r_batch_stride,
         int64_t r_row_stride, int64_t r_col_stride, int64_t q_batch_stride, int64_t q_row_stride,
         int64_t q_col_stride, int dtype, int num_threads) {
        auto p = block_params<TallSolveParams>(y, batch, rows, cols, y_batch_stride, y_row_stride, y_col_stride, dtype);
        p.r = reinterpret_cast<const void*>(r);
        p.q = reinterpret_cast<void*>(q);
        p.r_batch_stride = r_batch_stride;
        p.r_row_stride = r_row_stride;
        p.r_col_stride = r_col_stride;
        p.q_batch_stride = q_batch_stride;
        p.q_row_stride = q_row_stride;
        p.q_col_stride = q_col_stride;
        py::gil_scoped_release release;
        tall_solve_upper_cpu(p, num_threads);
      },
      "Q = Y R^-1 (R upper triangular, any strides) for a batch of blocks Y [rows, cols]; Y and Q with a unit row "
      "or column stride, q may be y (in place).",
      py::kw_only(), "y"_a, "r"_a, "q"_a, "batch"_a, "rows"_a, "cols"_a, "y_batch_stride"_a, "y_row_stride"_a,
      "y_col_stride"_a, "r_batch_stride"_a, "r_row_stride"_a, "r_col_stride"_a, "q_batch_stride"_a, "q_row_stride"_a,
      "q_col_stride"_a, "dtype"_a, "num_threads"_a);
  m.def(
      "tall_cholesky_cpu",
      [](std::uintptr_t gram, std::uintptr_t r, int64_t batch, int64_t n, int64_t rows, bool shift, int dtype,
         int num_threads) {
        TallCholeskyParams p;
        p.gram = reinterpret_cast<const void*>(gram);
        p.r = reinterpret_cast<void*>(r);
        p.batch = batch;
        p.n = n;
        p.rows = rows;
        p.shift = shift;
        p.dtype = static_cast<DType>(dtype);
        py::gil_scoped_release release;
        tall_cholesky_cpu(p, num_threads);
      },
      "Upper R [batch, n, n] with R^T R = G + sigma I (a CholeskyQR pass's shifts, see qr.h); G contiguous.",
      py::kw_only(), "gram"_a, "r"_a, "batch"_a, "n"_a, "rows"_a, "shift"_a, "dtype"_a, "num_threads"_a);
  m.def(
      "tall_scale_cpu",
      [](std::uintptr_t y, std::uintptr_t scale, int64_t batch, int64_t rows, int64_t cols, int64_t y_batch_stride,
         int64_t y_row_stride, int64_t y_col_stride, int dtype, int num_threads) {
        auto p = block_params<TallScaleParams>(y, batch, rows, cols, y_batch_stride, y_row_stride, y_col_stride, dtype);
        p.scale = reinterpret_cast<void*>(scale);
        py::gil_scoped_release release;
        tall_scale_cpu(p, num_threads);
      },
      "Y /= s in place per block, s = 2^(e - 1) for e the binary exponent of max |Y| (1 for zeros), into scale [batch].",
      py::kw_only(), "y"_a, "scale"_a, "batch"_a, "rows"_a, "cols"_a, "y_batch_stride"_a, "y_row_stride"_a,
      "y_col_stride"_a, "dtype"_a, "num_threads"_a);
  m.def(
      "cholesky_qr_cpu",
      [](std::uintptr_t y, std::uintptr_t r, int64_t batch, int64_t rows, int64_t cols, int64_t y_batch_stride,
         int64_t y_row_stride, int64_t y_col_stride, bool shift, int64_t plain_passes, int dtype, int num_threads) {
        auto p = block_params<CholeskyQrParams>(y, batch, rows, cols, y_batch_stride, y_row_stride, y_col_stride, dtype);
        p.r = reinterpret_cast<void*>(r);
        p.shift = shift;
        p.plain_passes = plain_passes;
        py::gil_scoped_release release;
        cholesky_qr_cpu(p, num_threads);
      },
      "A whole CholeskyQR of Y in place (scaling, then the passes): Y becomes Q; r [batch, cols, cols] receives R.",
      py::kw_only(), "y"_a, "r"_a, "batch"_a, "rows"_a, "cols"_a, "y_batch_stride"_a, "y_row_stride"_a,
      "y_col_stride"_a, "shift"_a, "plain_passes"_a, "dtype"_a, "num_threads"_a);
}

}  // namespace lowrank_ops
