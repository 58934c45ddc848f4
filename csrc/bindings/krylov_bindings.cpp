// lowrank_ops._C: Krylov solver kernels (single-vector SpMV, fused Gram-Schmidt pass, block
// updates, a whole Arnoldi cycle).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "backends.h"
#include "registry.h"
#include "lowrank_ops/krylov.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

KrylovSpmvParams spmv_params(std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t x,
                             std::uintptr_t y, int64_t n_rows, int64_t n_cols, int64_t nnz, int dtype,
                             int index_type) {
  KrylovSpmvParams p;
  p.row_ptr = reinterpret_cast<const void*>(row_ptr);
  p.col_idx = reinterpret_cast<const void*>(col_idx);
  p.values = reinterpret_cast<const void*>(values);
  p.x = reinterpret_cast<const void*>(x);
  p.y = reinterpret_cast<void*>(y);
  p.n_rows = n_rows;
  p.n_cols = n_cols;
  p.nnz = nnz;
  p.dtype = static_cast<DType>(dtype);
  p.index_type = static_cast<IndexType>(index_type);
  return p;
}

KrylovCgsParams cgs_params(std::uintptr_t basis, std::uintptr_t w, std::uintptr_t h, std::uintptr_t norms,
                           std::uintptr_t workspace, int64_t rows, int64_t n, int64_t q_stride, int64_t n_chunks,
                           int mode, int dtype) {
  KrylovCgsParams p;
  p.basis = reinterpret_cast<const void*>(basis);
  p.w = reinterpret_cast<void*>(w);
  p.h = reinterpret_cast<void*>(h);
  p.norms = reinterpret_cast<void*>(norms);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.rows = rows;
  p.n = n;
  p.q_stride = q_stride;
  p.n_chunks = n_chunks;
  p.mode = mode;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

KrylovBlockParams block_params(std::uintptr_t basis, std::uintptr_t other, std::uintptr_t coef, std::uintptr_t out,
                               std::uintptr_t workspace, int64_t rows, int64_t cols, int64_t n, int64_t q_stride,
                               int64_t other_stride, int64_t n_chunks, int mode, bool accumulate, int dtype) {
  KrylovBlockParams p;
  p.basis = reinterpret_cast<const void*>(basis);
  p.other = reinterpret_cast<void*>(other);
  p.coef = reinterpret_cast<const void*>(coef);
  p.out = reinterpret_cast<void*>(out);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.rows = rows;
  p.cols = cols;
  p.n = n;
  p.q_stride = q_stride;
  p.other_stride = other_stride;
  p.n_chunks = n_chunks;
  p.mode = mode;
  p.accumulate = accumulate;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

KrylovArnoldiParams arnoldi_params(std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values,
                                   std::uintptr_t basis, std::uintptr_t r, std::uintptr_t hessenberg,
                                   std::uintptr_t rotated, std::uintptr_t g, std::uintptr_t givens,
                                   std::uintptr_t history, std::uintptr_t workspace, int64_t n, int64_t nnz,
                                   int64_t q_stride,
                                   int64_t kc, int64_t steps, int64_t n_chunks, double beta, double target,
                                   double bnorm, int dtype, int index_type) {
  KrylovArnoldiParams p;
  p.row_ptr = reinterpret_cast<const void*>(row_ptr);
  p.col_idx = reinterpret_cast<const void*>(col_idx);
  p.values = reinterpret_cast<const void*>(values);
  p.basis = reinterpret_cast<void*>(basis);
  p.r = reinterpret_cast<const void*>(r);
  p.hessenberg = reinterpret_cast<double*>(hessenberg);
  p.rotated = reinterpret_cast<double*>(rotated);
  p.g = reinterpret_cast<double*>(g);
  p.givens = reinterpret_cast<double*>(givens);
  p.history = reinterpret_cast<double*>(history);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.n = n;
  p.nnz = nnz;
  p.q_stride = q_stride;
  p.kc = kc;
  p.steps = steps;
  p.n_chunks = n_chunks;
  p.beta = beta;
  p.target = target;
  p.bnorm = bnorm;
  p.dtype = static_cast<DType>(dtype);
  p.index_type = static_cast<IndexType>(index_type);
  return p;
}

KrylovCgParams cg_params(std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values,
                         std::uintptr_t inverse_diagonal, std::uintptr_t x, std::uintptr_t r, std::uintptr_t p_,
                         std::uintptr_t q, std::uintptr_t z, std::uintptr_t history, std::uintptr_t workspace, int64_t n,
                         int64_t nnz, int64_t steps, int64_t n_chunks, double target, double bnorm, int dtype,
                         int index_type) {
  KrylovCgParams p;
  p.row_ptr = reinterpret_cast<const void*>(row_ptr);
  p.col_idx = reinterpret_cast<const void*>(col_idx);
  p.values = reinterpret_cast<const void*>(values);
  p.inverse_diagonal = reinterpret_cast<const void*>(inverse_diagonal);
  p.x = reinterpret_cast<void*>(x);
  p.r = reinterpret_cast<void*>(r);
  p.p = reinterpret_cast<void*>(p_);
  p.q = reinterpret_cast<void*>(q);
  p.z = reinterpret_cast<void*>(z);
  p.history = reinterpret_cast<double*>(history);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.n = n;
  p.nnz = nnz;
  p.steps = steps;
  p.n_chunks = n_chunks;
  p.target = target;
  p.bnorm = bnorm;
  p.dtype = static_cast<DType>(dtype);
  p.index_type = static_cast<IndexType>(index_type);
  return p;
}

}  // namespace

LOWRANK_OPS_BINDINGS(krylov) {
  const char* spmv_doc =
      "y[r] = sum_k values[k] * x[col_idx[k]] over the CSR row r (one vector).\n"
      "See csrc/include/lowrank_ops/krylov.h for the layout contract.";
  const char* cgs_doc =
      "One classical Gram-Schmidt pass (mode 0: h = Q w; w -= Q^T h), or its dots (1) or update (2) alone.\n"
      "See csrc/include/lowrank_ops/krylov.h for the layout contract.";
  const char* block_doc =
      "mode 0: out = Q W^T (gram); mode 1: Y (+)= coef^T Q (combine), one sweep over the basis Q.\n"
      "See csrc/include/lowrank_ops/krylov.h for the layout contract.";
  bindings::def_cpu_cuda(
      m, "krylov_spmv", spmv_doc,
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t x, std::uintptr_t y,
         int64_t n_rows, int64_t n_cols, int64_t nnz, int dtype, int index_type, int num_threads) {
        const KrylovSpmvParams p =
            spmv_params(row_ptr, col_idx, values, x, y, n_rows, n_cols, nnz, dtype, index_type);
        py::gil_scoped_release release;
        krylov_spmv_cpu(p, num_threads);
      },
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t x, std::uintptr_t y,
         int64_t n_rows, int64_t n_cols, int64_t nnz, int dtype, int index_type, int device,
         std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const KrylovSpmvParams p =
            spmv_params(row_ptr, col_idx, values, x, y, n_rows, n_cols, nnz, dtype, index_type);
        py::gil_scoped_release release;
        krylov_spmv_cuda(p, device, stream);
#else
        bindings::no_cuda("krylov_spmv");
#endif
      },
      "row_ptr"_a, "col_idx"_a, "values"_a, "x"_a, "y"_a, "n_rows"_a, "n_cols"_a, "nnz"_a, "dtype"_a,
      "index_type"_a);
  // cgs_pass and block: the CPU entry takes n_chunks before mode (the CUDA one has no
  // chunks), so each back end keeps its own keyword list.
  m.def(
      "krylov_cgs_pass_cpu",
      [](std::uintptr_t basis, std::uintptr_t w, std::uintptr_t h, std::uintptr_t norms, std::uintptr_t workspace,
         int64_t rows, int64_t n, int64_t q_stride, int64_t n_chunks, int mode, int dtype, int num_threads) {
        const KrylovCgsParams p = cgs_params(basis, w, h, norms, workspace, rows, n, q_stride, n_chunks, mode, dtype);
        py::gil_scoped_release release;
        krylov_cgs_pass_cpu(p, num_threads);
      },
      cgs_doc, py::kw_only(), "basis"_a, "w"_a, "h"_a, "norms"_a, "workspace"_a, "rows"_a, "n"_a, "q_stride"_a,
      "n_chunks"_a, "mode"_a, "dtype"_a, "num_threads"_a);
  m.def(
      "krylov_cgs_pass_cuda",
      [](std::uintptr_t basis, std::uintptr_t w, std::uintptr_t h, std::uintptr_t norms, std::uintptr_t workspace,
         int64_t rows, int64_t n, int64_t q_stride, int mode, int dtype, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const KrylovCgsParams p = cgs_params(basis, w, h, norms, workspace, rows, n, q_stride, 1, mode, dtype);
        py::gil_scoped_release release;
        krylov_cgs_pass_cuda(p, device, stream);
#else
        bindings::no_cuda("krylov_cgs_pass");
#endif
      },
      cgs_doc, py::kw_only(), "basis"_a, "w"_a, "h"_a, "norms"_a, "workspace"_a, "rows"_a, "n"_a, "q_stride"_a,
      "mode"_a, "dtype"_a, "device"_a, "stream"_a);
  m.def(
      "krylov_block_cpu",
      [](std::uintptr_t basis, std::uintptr_t other, std::uintptr_t coef, std::uintptr_t out, std::uintptr_t workspace,
         int64_t rows, int64_t cols, int64_t n, int64_t q_stride, int64_t other_stride, int64_t n_chunks, int mode,
         bool accumulate, int dtype, int num_threads) {
        const KrylovBlockParams p = block_params(basis, other, coef, out, workspace, rows, cols, n, q_stride,
                                                 other_stride, n_chunks, mode, accumulate, dtype);
        py::gil_scoped_release release;
        krylov_block_cpu(p, num_threads);
      },
      block_doc, py::kw_only(), "basis"_a, "other"_a, "coef"_a, "out"_a, "workspace"_a, "rows"_a, "cols"_a, "n"_a,
      "q_stride"_a, "other_stride"_a, "n_chunks"_a, "mode"_a, "accumulate"_a, "dtype"_a, "num_threads"_a);
  m.def(
      "krylov_block_cuda",
      [](std::uintptr_t basis, std::uintptr_t other, std::uintptr_t coef, std::uintptr_t out, std::uintptr_t workspace,
         int64_t rows, int64_t cols, int64_t n, int64_t q_stride, int64_t other_stride, int mode, bool accumulate,
         int dtype, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const KrylovBlockParams p = block_params(basis, other, coef, out, workspace, rows, cols, n, q_stride,
                                                 other_stride, 1, mode, accumulate, dtype);
        py::gil_scoped_release release;
        krylov_block_cuda(p, device, stream);
#else
        bindings::no_cuda("krylov_block");
#endif
      },
      block_doc, py::kw_only(), "basis"_a, "other"_a, "coef"_a, "out"_a, "workspace"_a, "rows"_a, "cols"_a, "n"_a,
      "q_stride"_a, "other_stride"_a, "mode"_a, "accumulate"_a, "dtype"_a, "device"_a, "stream"_a);
  m.def(
      "krylov_arnoldi_cpu",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t basis, std::uintptr_t r,
         std::uintptr_t hessenberg, std::uintptr_t rotated, std::uintptr_t g, std::uintptr_t givens,
         std::uintptr_t history, std::uintptr_t workspace, int64_t n, int64_t nnz, int64_t q_stride, int64_t kc,
         int64_t steps, int64_t n_chunks, double beta, double target, double bnorm, int dtype, int index_type,
         int num_threads) {
        const KrylovArnoldiParams p =
            arnoldi_params(row_ptr, col_idx, values, basis, r, hessenberg, rotated, g, givens, history, workspace,
                           n, nnz, q_stride, kc, steps, n_chunks, beta, target, bnorm, dtype, index_type);
        KrylovArnoldiResult result;
        {
          py::gil_scoped_release release;
          result = krylov_arnoldi_cpu(p, num_threads);
        }
        return py::make_tuple(result.steps, result.breakdown);
      },
      "One Arnoldi cycle of GMRES / GCRO-DR on a CSR operator; returns (steps taken, breakdown).\n"
      "See csrc/include/lowrank_ops/krylov.h for the layout contract.",
      py::kw_only(), "row_ptr"_a, "col_idx"_a, "values"_a, "basis"_a, "r"_a, "hessenberg"_a, "rotated"_a, "g"_a,
      "givens"_a, "history"_a, "workspace"_a, "n"_a, "nnz"_a, "q_stride"_a, "kc"_a, "steps"_a, "n_chunks"_a, "beta"_a,
      "target"_a, "bnorm"_a, "dtype"_a, "index_type"_a, "num_threads"_a);
  m.def(
      "krylov_cg_cpu",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t inverse_diagonal,
         std::uintptr_t x, std::uintptr_t r, std::uintptr_t p, std::uintptr_t q, std::uintptr_t z,
         std::uintptr_t history, std::uintptr_t workspace, int64_t n, int64_t nnz, int64_t steps, int64_t n_chunks,
         double target, double bnorm, int dtype, int index_type, int num_threads, std::uintptr_t deflation,
         std::uintptr_t deflation_product, int64_t deflation_rows, std::uintptr_t record, int64_t record_rows,
         std::uintptr_t alphas, std::uintptr_t betas, std::uintptr_t rho, bool resume, double reproject_below) {
        KrylovCgParams params = cg_params(row_ptr, col_idx, values, inverse_diagonal, x, r, p, q, z, history,
                                          workspace, n, nnz, steps, n_chunks, target, bnorm, dtype, index_type);
        params.deflation = reinterpret_cast<const void*>(deflation);
        params.deflation_product = reinterpret_cast<const void*>(deflation_product);
        params.deflation_rows = deflation_rows;
        params.record = reinterpret_cast<void*>(record);
        params.record_rows = record_rows;
        params.alphas = reinterpret_cast<double*>(alphas);
        params.betas = reinterpret_cast<double*>(betas);
        params.rho = reinterpret_cast<double*>(rho);
        params.resume = resume;
        params.reproject_below = reproject_below;
        KrylovCgResult result;
        {
          py::gil_scoped_release release;
          result = krylov_cg_cpu(params, num_threads);
        }
        return py::make_tuple(result.steps, result.status);
      },
      "Up to `steps` (Jacobi-preconditioned, optionally deflated and Lanczos-recording) CG iterations on a CSR\n"
      "operator; returns (steps taken, status: 0 converged, 1 steps exhausted, 2 breakdown).  See\n"
      "csrc/include/lowrank_ops/krylov.h for the layout contract.",
      py::kw_only(), "row_ptr"_a, "col_idx"_a, "values"_a, "inverse_diagonal"_a, "x"_a, "r"_a, "p"_a, "q"_a, "z"_a,
      "history"_a, "workspace"_a, "n"_a, "nnz"_a, "steps"_a, "n_chunks"_a, "target"_a, "bnorm"_a, "dtype"_a,
      "index_type"_a, "num_threads"_a, "deflation"_a = 0, "deflation_product"_a = 0, "deflation_rows"_a = 0,
      "record"_a = 0, "record_rows"_a = 0, "alphas"_a = 0, "betas"_a = 0, "rho"_a = 0, "resume"_a = false,
      "reproject_below"_a = 0.0);
  m.def("krylov_arnoldi_workspace", &krylov_arnoldi_workspace,
        "Workspace elements (storage type) krylov_arnoldi_cpu needs.", py::kw_only(), "kc"_a, "steps"_a, "n_chunks"_a);
}

}  // namespace lowrank_ops
