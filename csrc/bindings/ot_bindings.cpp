// lowrank_ops._C: entropic optimal transport kernels (Sinkhorn, Sinkhorn-Newton-Sparse).
// Every kernel that reads log-plan entries takes the same source arguments (OtSource in
// csrc/include/lowrank_ops/ot.h); `device` and `stream` only for the CUDA variants.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "backends.h"
#include "registry.h"
#include "lowrank_ops/ot.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

// The source arguments, as one Python dict: cost, c, c_stride_b, c_stride_i, c_stride_j,
// x, y, dim, f, g, active, batch, rows, cols, reg, dtype (pointers as integers, 0 = none).
OtSource source(const py::dict& d) {
  OtSource s;
  s.cost = static_cast<OtCost>(d["cost"].cast<int>());
  s.c = reinterpret_cast<const void*>(d["c"].cast<std::uintptr_t>());
  s.c_stride_b = d["c_stride_b"].cast<int64_t>();
  s.c_stride_i = d["c_stride_i"].cast<int64_t>();
  s.c_stride_j = d["c_stride_j"].cast<int64_t>();
  s.x = reinterpret_cast<const void*>(d["x"].cast<std::uintptr_t>());
  s.y = reinterpret_cast<const void*>(d["y"].cast<std::uintptr_t>());
  s.dim = d["dim"].cast<int64_t>();
  s.f = reinterpret_cast<const void*>(d["f"].cast<std::uintptr_t>());
  s.g = reinterpret_cast<const void*>(d["g"].cast<std::uintptr_t>());
  s.active = reinterpret_cast<const uint8_t*>(d["active"].cast<std::uintptr_t>());
  s.batch = d["batch"].cast<int64_t>();
  s.rows = d["rows"].cast<int64_t>();
  s.cols = d["cols"].cast<int64_t>();
  s.reg = d["reg"].cast<double>();
  s.dtype = static_cast<DType>(d["dtype"].cast<int>());
  return s;
}

template <class T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

OtHessianParams hessian_params(std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t r,
                               std::uintptr_t c, std::uintptr_t vx, std::uintptr_t vy, std::uintptr_t out_x,
                               std::uintptr_t out_y, int64_t batch, int64_t rows, int64_t cols, int64_t nnz,
                               int dtype) {
  OtHessianParams p;
  p.row_ptr = ptr<const int64_t>(row_ptr);
  p.col_idx = ptr<const int64_t>(col_idx);
  p.values = ptr<const void>(values);
  p.r = ptr<const void>(r);
  p.c = ptr<const void>(c);
  p.vx = ptr<const void>(vx);
  p.vy = ptr<const void>(vy);
  p.out_x = ptr<void>(out_x);
  p.out_y = ptr<void>(out_y);
  p.batch = batch;
  p.rows = rows;
  p.cols = cols;
  p.nnz = nnz;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

OtRowLseParams row_lse_params(const py::dict& src, std::uintptr_t lse, std::uintptr_t mean_cost) {
  OtRowLseParams p;
  p.src = source(src);
  p.lse = ptr<void>(lse);
  p.mean_cost = ptr<void>(mean_cost);
  return p;
}

OtHistogramParams histogram_params(const py::dict& src, std::uintptr_t lo, std::uintptr_t hi, int64_t n_bins,
                                   std::uintptr_t counts) {
  OtHistogramParams p;
  p.src = source(src);
  p.lo = ptr<const void>(lo);
  p.hi = ptr<const void>(hi);
  p.n_bins = n_bins;
  p.counts = ptr<int64_t>(counts);
  return p;
}

OtSparsifyParams sparsify_params(const py::dict& src, std::uintptr_t threshold, std::uintptr_t row_counts,
                                 std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values,
                                 int64_t nnz) {
  OtSparsifyParams p;
  p.src = source(src);
  p.threshold = ptr<const void>(threshold);
  p.row_counts = ptr<int64_t>(row_counts);
  p.row_ptr = ptr<const int64_t>(row_ptr);
  p.col_idx = ptr<int64_t>(col_idx);
  p.values = ptr<void>(values);
  p.nnz = nnz;
  return p;
}

OtRowGradParams row_grad_params(const py::dict& src, std::uintptr_t lse, std::uintptr_t grad) {
  OtRowGradParams p;
  p.src = source(src);
  p.lse = ptr<const void>(lse);
  p.grad = ptr<void>(grad);
  return p;
}

}  // namespace

LOWRANK_OPS_BINDINGS(ot) {
  bindings::def_cpu_cuda(
      m, "ot_row_lse",
      "Row log-sum-exp of (f_i + g_j - C_ij) / reg (and the P-weighted mean cost); see lowrank_ops/ot.h.",
      [](const py::dict& src, std::uintptr_t lse, std::uintptr_t mean_cost, int num_threads) {
        const OtRowLseParams p = row_lse_params(src, lse, mean_cost);
        py::gil_scoped_release release;
        ot_row_lse_cpu(p, num_threads);
      },
      [](const py::dict& src, std::uintptr_t lse, std::uintptr_t mean_cost, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const OtRowLseParams p = row_lse_params(src, lse, mean_cost);
        py::gil_scoped_release release;
        ot_row_lse_cuda(p, device, stream);
#else
        bindings::no_cuda("ot_row_lse");
#endif
      },
      "src"_a, "lse"_a, "mean_cost"_a);

  bindings::def_cpu_cuda(
      m, "ot_log_histogram", "Histogram of the log-plan entries over [lo, hi) per problem; see lowrank_ops/ot.h.",
      [](const py::dict& src, std::uintptr_t lo, std::uintptr_t hi, int64_t n_bins, std::uintptr_t counts,
         int num_threads) {
        const OtHistogramParams p = histogram_params(src, lo, hi, n_bins, counts);
        py::gil_scoped_release release;
        ot_log_histogram_cpu(p, num_threads);
      },
      [](const py::dict& src, std::uintptr_t lo, std::uintptr_t hi, int64_t n_bins, std::uintptr_t counts,
         int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const OtHistogramParams p = histogram_params(src, lo, hi, n_bins, counts);
        py::gil_scoped_release release;
        ot_log_histogram_cuda(p, device, stream);
#else
        bindings::no_cuda("ot_log_histogram");
#endif
      },
      "src"_a, "lo"_a, "hi"_a, "n_bins"_a, "counts"_a);

  bindings::def_cpu_cuda(
      m, "ot_sparsify",
      "Count (col_idx = 0) or gather (CSR) the plan entries with log value >= threshold; see lowrank_ops/ot.h.",
      [](const py::dict& src, std::uintptr_t threshold, std::uintptr_t row_counts, std::uintptr_t row_ptr,
         std::uintptr_t col_idx, std::uintptr_t values, int64_t nnz, int num_threads) {
        const OtSparsifyParams p = sparsify_params(src, threshold, row_counts, row_ptr, col_idx, values, nnz);
        py::gil_scoped_release release;
        ot_sparsify_cpu(p, num_threads);
      },
      [](const py::dict& src, std::uintptr_t threshold, std::uintptr_t row_counts, std::uintptr_t row_ptr,
         std::uintptr_t col_idx, std::uintptr_t values, int64_t nnz, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const OtSparsifyParams p = sparsify_params(src, threshold, row_counts, row_ptr, col_idx, values, nnz);
        py::gil_scoped_release release;
        ot_sparsify_cuda(p, device, stream);
#else
        bindings::no_cuda("ot_sparsify");
#endif
      },
      "src"_a, "threshold"_a, "row_counts"_a, "row_ptr"_a, "col_idx"_a, "values"_a, "nnz"_a);

  bindings::def_cpu_cuda(
      m, "ot_row_grad", "Plan-weighted gradient of a point cost with respect to the row points; see lowrank_ops/ot.h.",
      [](const py::dict& src, std::uintptr_t lse, std::uintptr_t grad, int num_threads) {
        const OtRowGradParams p = row_grad_params(src, lse, grad);
        py::gil_scoped_release release;
        ot_row_grad_cpu(p, num_threads);
      },
      [](const py::dict& src, std::uintptr_t lse, std::uintptr_t grad, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const OtRowGradParams p = row_grad_params(src, lse, grad);
        py::gil_scoped_release release;
        ot_row_grad_cuda(p, device, stream);
#else
        bindings::no_cuda("ot_row_grad");
#endif
      },
      "src"_a, "lse"_a, "grad"_a);

  bindings::def_cpu_cuda(
      m, "ot_hessian_matvec",
      "SNS Newton matrix times (vx, vy): (r vx + P_s vy, c vy + P_s^T vx); see lowrank_ops/ot.h.",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t r, std::uintptr_t c,
         std::uintptr_t vx, std::uintptr_t vy, std::uintptr_t out_x, std::uintptr_t out_y, int64_t batch,
         int64_t rows, int64_t cols, int64_t nnz, int dtype, int num_threads) {
        const OtHessianParams p =
            hessian_params(row_ptr, col_idx, values, r, c, vx, vy, out_x, out_y, batch, rows, cols, nnz, dtype);
        py::gil_scoped_release release;
        ot_hessian_matvec_cpu(p, num_threads);
      },
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t r, std::uintptr_t c,
         std::uintptr_t vx, std::uintptr_t vy, std::uintptr_t out_x, std::uintptr_t out_y, int64_t batch,
         int64_t rows, int64_t cols, int64_t nnz, int dtype, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const OtHessianParams p =
            hessian_params(row_ptr, col_idx, values, r, c, vx, vy, out_x, out_y, batch, rows, cols, nnz, dtype);
        py::gil_scoped_release release;
        ot_hessian_matvec_cuda(p, device, stream);
#else
        bindings::no_cuda("ot_hessian_matvec");
#endif
      },
      "row_ptr"_a, "col_idx"_a, "values"_a, "r"_a, "c"_a, "vx"_a, "vy"_a, "out_x"_a, "out_y"_a, "batch"_a, "rows"_a,
      "cols"_a, "nnz"_a, "dtype"_a);
}

}  // namespace lowrank_ops
