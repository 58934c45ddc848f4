// lowrank_ops._C: M-FAC passes over the gradient buffer (mfac_dots, mfac_combine, and both with
// the float64 solve between them: mfac_apply) and the Cholesky factor of K (factor, rank update).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "lowrank_ops/mfac.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

MfacDotsParams dots_params(std::uintptr_t grads, std::uintptr_t x, std::uintptr_t out, int64_t n_rows, int64_t dim,
                           int64_t k, int64_t grads_ld, int64_t x_ld, int64_t write_slot, int dtype, bool wide) {
  MfacDotsParams p;
  p.grads = reinterpret_cast<void*>(grads);
  p.x = reinterpret_cast<const void*>(x);
  p.out = reinterpret_cast<void*>(out);
  p.n_rows = n_rows;
  p.dim = dim;
  p.k = k;
  p.grads_ld = grads_ld;
  p.x_ld = x_ld;
  p.write_slot = write_slot;
  p.dtype = static_cast<DType>(dtype);
  p.wide = wide;
  return p;
}

MfacCombineParams combine_params(std::uintptr_t grads, std::uintptr_t coef, std::uintptr_t x, std::uintptr_t out,
                                 int64_t n_rows, int64_t dim, int64_t k, int64_t grads_ld, int64_t x_ld,
                                 int64_t out_ld, double alpha, double beta, int dtype, bool wide) {
  MfacCombineParams p;
  p.grads = reinterpret_cast<const void*>(grads);
  p.coef = reinterpret_cast<const void*>(coef);
  p.x = reinterpret_cast<const void*>(x);
  p.out = reinterpret_cast<void*>(out);
  p.n_rows = n_rows;
  p.dim = dim;
  p.k = k;
  p.grads_ld = grads_ld;
  p.x_ld = x_ld;
  p.out_ld = out_ld;
  p.alpha = alpha;
  p.beta = beta;
  p.dtype = static_cast<DType>(dtype);
  p.wide = wide;
  return p;
}

}  // namespace

LOWRANK_OPS_BINDINGS(mfac) {
  const char* dots_doc =
      "out[j, i] = sum_c grads[i, c] * x[j, c]; with write_slot >= 0, grads[write_slot] = x[0] first.\n"
      "See csrc/include/lowrank_ops/mfac.h for the layout contract.";
  const char* combine_doc =
      "out[j, c] = alpha * x[j, c] + beta * sum_i coef[j, i] * grads[i, c].\n"
      "See csrc/include/lowrank_ops/mfac.h for the layout contract.";
  m.def(
      "mfac_dots_cpu",
      [](std::uintptr_t grads, std::uintptr_t x, std::uintptr_t out, int64_t n_rows, int64_t dim, int64_t k,
         int64_t grads_ld, int64_t x_ld, int64_t write_slot, int dtype, bool wide, int num_threads) {
        const MfacDotsParams p = dots_params(grads, x, out, n_rows, dim, k, grads_ld, x_ld, write_slot, dtype, wide);
        py::gil_scoped_release release;
        mfac_dots_cpu(p, num_threads);
      },
      dots_doc, py::kw_only(), "grads"_a, "x"_a, "out"_a, "n_rows"_a, "dim"_a, "k"_a, "grads_ld"_a, "x_ld"_a,
      "write_slot"_a, "dtype"_a, "wide"_a, "num_threads"_a);
  m.def(
      "mfac_dots_cuda_segments",
      [](int64_t n_rows, int64_t dim, int64_t k) -> int64_t {
#ifdef LOWRANK_OPS_WITH_CUDA
        return mfac_dots_cuda_segments(n_rows, dim, k);
#else
        bindings::no_cuda("mfac_dots");
#endif
      },
      "Column segments of the CUDA mfac_dots pass (workspace = segments * k * n_rows accumulators).",
      py::kw_only(), "n_rows"_a, "dim"_a, "k"_a);
  m.def(
      "mfac_dots_cuda",
      [](std::uintptr_t grads, std::uintptr_t x, std::uintptr_t out, std::uintptr_t workspace, int64_t workspace_elems,
         int64_t n_rows, int64_t dim, int64_t k, int64_t grads_ld, int64_t x_ld, int64_t write_slot, int dtype,
         bool wide, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const MfacDotsParams p = dots_params(grads, x, out, n_rows, dim, k, grads_ld, x_ld, write_slot, dtype, wide);
        py::gil_scoped_release release;
        mfac_dots_cuda(p, reinterpret_cast<void*>(workspace), workspace_elems, device, stream);
#else
        bindings::no_cuda("mfac_dots");
#endif
      },
      dots_doc, py::kw_only(), "grads"_a, "x"_a, "out"_a, "workspace"_a, "workspace_elems"_a, "n_rows"_a, "dim"_a,
      "k"_a, "grads_ld"_a, "x_ld"_a, "write_slot"_a, "dtype"_a, "wide"_a, "device"_a, "stream"_a);
  m.def(
      "mfac_combine_cpu",
      [](std::uintptr_t grads, std::uintptr_t coef, std::uintptr_t x, std::uintptr_t out, int64_t n_rows, int64_t dim,
         int64_t k, int64_t grads_ld, int64_t x_ld, int64_t out_ld, double alpha, double beta, int dtype, bool wide,
         int num_threads) {
        const MfacCombineParams p =
            combine_params(grads, coef, x, out, n_rows, dim, k, grads_ld, x_ld, out_ld, alpha, beta, dtype, wide);
        py::gil_scoped_release release;
        mfac_combine_cpu(p, num_threads);
      },
      combine_doc, py::kw_only(), "grads"_a, "coef"_a, "x"_a, "out"_a, "n_rows"_a, "dim"_a, "k"_a, "grads_ld"_a,
      "x_ld"_a, "out_ld"_a, "alpha"_a, "beta"_a, "dtype"_a, "wide"_a, "num_threads"_a);
  m.def(
      "mfac_combine_cuda",
      [](std::uintptr_t grads, std::uintptr_t coef, std::uintptr_t x, std::uintptr_t out, int64_t n_rows, int64_t dim,
         int64_t k, int64_t grads_ld, int64_t x_ld, int64_t out_ld, double alpha, double beta, int dtype, bool wide,
         int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const MfacCombineParams p =
            combine_params(grads, coef, x, out, n_rows, dim, k, grads_ld, x_ld, out_ld, alpha, beta, dtype, wide);
        py::gil_scoped_release release;
        mfac_combine_cuda(p, device, stream);
#else
        bindings::no_cuda("mfac_combine");
#endif
      },
      combine_doc, py::kw_only(), "grads"_a, "coef"_a, "x"_a, "out"_a, "n_rows"_a, "dim"_a, "k"_a, "grads_ld"_a,
      "x_ld"_a, "out_ld"_a, "alpha"_a, "beta"_a, "dtype"_a, "wide"_a, "device"_a, "stream"_a);
  m.def(
      "mfac_apply_cpu",
      [](std::uintptr_t grads, std::uintptr_t x, std::uintptr_t out, std::uintptr_t U, int64_t u_ld,
         std::uintptr_t products, int64_t n_rows, int64_t dim, int64_t k, int64_t grads_ld, int64_t x_ld,
         int64_t out_ld, double alpha, double beta, int dtype, int num_threads) {
        const MfacCombineParams p =
            combine_params(grads, 0, x, out, n_rows, dim, k, grads_ld, x_ld, out_ld, alpha, beta, dtype, true);
        py::gil_scoped_release release;
        mfac_apply_cpu(p, reinterpret_cast<const double*>(U), u_ld, reinterpret_cast<const void*>(products),
                       num_threads);
      },
      "out = alpha * x + beta * coef G_n with coef = (U^T U)^-1 products (float64 solve), products (float64) = G_n x\n"
      "when 0; dots, solve and combine in one call.  See csrc/include/lowrank_ops/mfac.h.",
      py::kw_only(), "grads"_a, "x"_a, "out"_a, "U"_a, "u_ld"_a, "products"_a, "n_rows"_a, "dim"_a, "k"_a,
      "grads_ld"_a, "x_ld"_a, "out_ld"_a, "alpha"_a, "beta"_a, "dtype"_a, "num_threads"_a);
  m.def(
      "mfac_cholesky_factor_cpu",
      [](std::uintptr_t A, int64_t a_ld, int64_t n) -> int64_t {
        py::gil_scoped_release release;
        return mfac_cholesky_factor_cpu(reinterpret_cast<double*>(A), a_ld, n);
      },
      "In-place upper Cholesky factor of A [n, n] (float64); returns 0 or the 1-based failing column.",
      py::kw_only(), "A"_a, "a_ld"_a, "n"_a);
  m.def(
      "mfac_cholesky_replace_cpu",
      [](std::uintptr_t U, int64_t u_ld, int64_t n, int64_t s, std::uintptr_t row, std::uintptr_t work) -> bool {
        py::gil_scoped_release release;
        return mfac_cholesky_replace_cpu(reinterpret_cast<double*>(U), u_ld, n, s, reinterpret_cast<const double*>(row),
                                         reinterpret_cast<double*>(work));
      },
      "O(n^2) update of the upper Cholesky factor U (float64, in place) after row/column s of K became row [n];\n"
      "False when K' is not numerically positive definite (U is then invalid: refactor).",
      py::kw_only(), "U"_a, "u_ld"_a, "n"_a, "s"_a, "row"_a, "work"_a);
  m.def(
      "mfac_cholesky_replace_cuda",
      [](std::uintptr_t U, int64_t u_ld, int64_t n, int64_t s, std::uintptr_t row, std::uintptr_t work,
         std::uintptr_t ok, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        py::gil_scoped_release release;
        mfac_cholesky_replace_cuda(reinterpret_cast<double*>(U), u_ld, n, s, reinterpret_cast<const double*>(row),
                                   reinterpret_cast<double*>(work), reinterpret_cast<int*>(ok), device, stream);
#else
        bindings::no_cuda("mfac_cholesky_replace");
#endif
      },
      "CUDA twin of mfac_cholesky_replace_cpu on device pointers (work: 2 n float64); writes 1 (updated) or 0\n"
      "(K' not numerically positive definite: refactor) to the device int `ok`, asynchronously on `stream`.",
      py::kw_only(), "U"_a, "u_ld"_a, "n"_a, "s"_a, "row"_a, "work"_a, "ok"_a, "device"_a, "stream"_a);
}

}  // namespace lowrank_ops
