// lowrank_ops._C: the pybind11 module.  Pointers, sizes, strides, dtype codes, a
// device index and a stream come in as plain integers; no torch, no Python objects
// past this file.  The GIL is released around every kernel call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "lowrank_ops/sparse.h"
#include "lowrank_ops/svd.h"
#ifdef LOWRANK_OPS_WITH_CUDA
#include "lowrank_ops/cuda_runtime_info.h"
#endif

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

#ifndef LOWRANK_OPS_WITH_CUDA
[[noreturn]] void no_cuda(const char* op) {
  throw std::runtime_error(detail::concat(
      op, ": lowrank_ops was built without CUDA kernels; reinstall with nvcc on PATH "
          "(LOWRANK_OPS_CUDA=ON pip install --no-build-isolation .) to use CUDA tensors"));
}
#endif

CsrSpmmParams spmm_params(std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t row_order, std::uintptr_t dense, std::uintptr_t out,
                          int64_t n_rows, int64_t n_cols, int64_t nnz, int64_t batch, int64_t dense_stride_b,
                          int64_t dense_stride_c, int64_t out_stride_b, int64_t out_stride_r, int dtype,
                          int index_type) {
  CsrSpmmParams p;
  p.row_ptr = reinterpret_cast<const void*>(row_ptr);
  p.col_idx = reinterpret_cast<const void*>(col_idx);
  p.values = reinterpret_cast<const void*>(values);
  p.row_order = reinterpret_cast<const void*>(row_order);
  p.dense = reinterpret_cast<const void*>(dense);
  p.out = reinterpret_cast<void*>(out);
  p.n_rows = n_rows;
  p.n_cols = n_cols;
  p.nnz = nnz;
  p.batch = batch;
  p.dense_stride_b = dense_stride_b;
  p.dense_stride_c = dense_stride_c;
  p.out_stride_b = out_stride_b;
  p.out_stride_r = out_stride_r;
  p.dtype = static_cast<DType>(dtype);
  p.index_type = static_cast<IndexType>(index_type);
  return p;
}

CsrSddmmParams sddmm_params(std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t row_order,
                            std::uintptr_t left, std::uintptr_t dense, std::uintptr_t out, int64_t n_rows,
                            int64_t n_cols, int64_t nnz, int64_t batch, int64_t left_stride_b, int64_t left_stride_r,
                            int64_t dense_stride_b, int64_t dense_stride_c, int dtype, int index_type) {
  CsrSddmmParams p;
  p.row_ptr = reinterpret_cast<const void*>(row_ptr);
  p.col_idx = reinterpret_cast<const void*>(col_idx);
  p.row_order = reinterpret_cast<const void*>(row_order);
  p.left = reinterpret_cast<const void*>(left);
  p.dense = reinterpret_cast<const void*>(dense);
  p.out = reinterpret_cast<void*>(out);
  p.n_rows = n_rows;
  p.n_cols = n_cols;
  p.nnz = nnz;
  p.batch = batch;
  p.left_stride_b = left_stride_b;
  p.left_stride_r = left_stride_r;
  p.dense_stride_b = dense_stride_b;
  p.dense_stride_c = dense_stride_c;
  p.dtype = static_cast<DType>(dtype);
  p.index_type = static_cast<IndexType>(index_type);
  return p;
}

JacobiSvdParams jacobi_svd_params(std::uintptr_t a, std::uintptr_t u, std::uintptr_t s, std::uintptr_t v,
                                  std::uintptr_t sweeps, std::uintptr_t converged, std::uintptr_t off_diagonal,
                                  int64_t batch, int64_t rows, int64_t cols, int64_t a_stride_b, int64_t a_stride_r,
                                  int64_t a_stride_c, int64_t u_stride_b, int64_t u_stride_r, int64_t u_stride_c,
                                  int64_t s_stride_b, int64_t s_stride_k, int64_t v_stride_b, int64_t v_stride_r,
                                  int64_t v_stride_c, int dtype, double tol, int max_sweeps, bool sign_from_v) {
  JacobiSvdParams p;
  p.a = reinterpret_cast<const void*>(a);
  p.u = reinterpret_cast<void*>(u);
  p.s = reinterpret_cast<void*>(s);
  p.v = reinterpret_cast<void*>(v);
  p.sweeps = reinterpret_cast<int32_t*>(sweeps);
  p.converged = reinterpret_cast<uint8_t*>(converged);
  p.off_diagonal = reinterpret_cast<void*>(off_diagonal);
  p.batch = batch;
  p.rows = rows;
  p.cols = cols;
  p.a_stride_b = a_stride_b;
  p.a_stride_r = a_stride_r;
  p.a_stride_c = a_stride_c;
  p.u_stride_b = u_stride_b;
  p.u_stride_r = u_stride_r;
  p.u_stride_c = u_stride_c;
  p.s_stride_b = s_stride_b;
  p.s_stride_k = s_stride_k;
  p.v_stride_b = v_stride_b;
  p.v_stride_r = v_stride_r;
  p.v_stride_c = v_stride_c;
  p.dtype = static_cast<DType>(dtype);
  p.tol = tol;
  p.max_sweeps = max_sweeps;
  p.sign_from_v = sign_from_v;
  return p;
}

py::dict build_info() {
  py::dict info;
  info["version"] = LOWRANK_OPS_VERSION;
#ifdef LOWRANK_OPS_WITH_CUDA
  info["cuda_compiled"] = true;
  info["cuda_archs"] = std::string(LOWRANK_OPS_CUDA_ARCHS);
  info["cuda_compiler_version"] = std::string(LOWRANK_OPS_CUDA_VERSION);
#else
  info["cuda_compiled"] = false;
  info["cuda_archs"] = std::string();
  info["cuda_compiler_version"] = std::string();
#endif
  return info;
}

}  // namespace
}  // namespace lowrank_ops

PYBIND11_MODULE(_C, m) {
  using namespace lowrank_ops;
  m.doc() = "lowrank_ops compiled kernels (torch-free: raw pointers, sizes, strides, streams)";

  m.def("build_info", &build_info, "Version, whether CUDA kernels were compiled, and for which architectures.");
  m.def(
      "cuda_device_count",
      []() {
#ifdef LOWRANK_OPS_WITH_CUDA
        return cuda_device_count();
#else
        return 0;
#endif
      },
      "Number of usable CUDA devices (0 without a CUDA build, driver or GPU).");
  m.def(
      "cuda_device_name",
      [](int device) {
#ifdef LOWRANK_OPS_WITH_CUDA
        return cuda_device_name(device);
#else
        return std::string();
#endif
      },
      "device"_a);
  m.def("cuda_versions", []() {
#ifdef LOWRANK_OPS_WITH_CUDA
    return py::make_tuple(cuda_runtime_version(), cuda_driver_version());
#else
    return py::make_tuple(0, 0);
#endif
  }, "(runtime, driver) CUDA versions as integers, e.g. (13000, 13000); zeros when absent.");

  const char* spmm_doc =
      "out[b, r] = sum_k values[k] * dense[b, col_idx[k]] over the CSR row r.\n"
      "See csrc/include/lowrank_ops/sparse.h for the layout contract.";
  m.def(
      "csr_spmm_cpu",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values,
         std::uintptr_t dense, std::uintptr_t out, int64_t n_rows, int64_t n_cols, int64_t nnz, int64_t batch,
         int64_t dense_stride_b, int64_t dense_stride_c, int64_t out_stride_b, int64_t out_stride_r, int dtype,
         int index_type, int num_threads) {
        const CsrSpmmParams p = spmm_params(row_ptr, col_idx, values, 0, dense, out, n_rows, n_cols, nnz,
                                            batch, dense_stride_b, dense_stride_c, out_stride_b, out_stride_r, dtype,
                                            index_type);
        py::gil_scoped_release release;
        csr_spmm_cpu(p, num_threads);
      },
      spmm_doc, py::kw_only(), "row_ptr"_a, "col_idx"_a, "values"_a, "dense"_a, "out"_a, "n_rows"_a,
      "n_cols"_a, "nnz"_a, "batch"_a, "dense_stride_b"_a, "dense_stride_c"_a, "out_stride_b"_a, "out_stride_r"_a,
      "dtype"_a, "index_type"_a, "num_threads"_a);
  m.def(
      "csr_spmm_cuda",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values,
         std::uintptr_t row_order, std::uintptr_t dense, std::uintptr_t out, int64_t n_rows, int64_t n_cols,
         int64_t nnz, int64_t batch, int64_t dense_stride_b, int64_t dense_stride_c, int64_t out_stride_b,
         int64_t out_stride_r, int dtype, int index_type, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const CsrSpmmParams p = spmm_params(row_ptr, col_idx, values, row_order, dense, out, n_rows,
                                            n_cols, nnz, batch, dense_stride_b, dense_stride_c, out_stride_b,
                                            out_stride_r, dtype, index_type);
        py::gil_scoped_release release;
        csr_spmm_cuda(p, device, stream);
#else
        no_cuda("csr_spmm");
#endif
      },
      spmm_doc, py::kw_only(), "row_ptr"_a, "col_idx"_a, "values"_a, "row_order"_a, "dense"_a,
      "out"_a, "n_rows"_a, "n_cols"_a, "nnz"_a, "batch"_a, "dense_stride_b"_a, "dense_stride_c"_a, "out_stride_b"_a,
      "out_stride_r"_a, "dtype"_a, "index_type"_a, "device"_a, "stream"_a);

  const char* sddmm_doc =
      "out[k] = sum_b left[b, row(k)] * dense[b, col_idx[k]] for every stored entry k.\n"
      "See csrc/include/lowrank_ops/sparse.h for the layout contract.";
  m.def(
      "csr_sddmm_cpu",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t left, std::uintptr_t dense, std::uintptr_t out,
         int64_t n_rows, int64_t n_cols, int64_t nnz, int64_t batch, int64_t left_stride_b, int64_t left_stride_r,
         int64_t dense_stride_b, int64_t dense_stride_c, int dtype, int index_type, int num_threads) {
        const CsrSddmmParams p = sddmm_params(row_ptr, col_idx, 0, left, dense, out, n_rows, n_cols, nnz, batch,
                                              left_stride_b, left_stride_r, dense_stride_b, dense_stride_c, dtype,
                                              index_type);
        py::gil_scoped_release release;
        csr_sddmm_cpu(p, num_threads);
      },
      sddmm_doc, py::kw_only(), "row_ptr"_a, "col_idx"_a, "left"_a, "dense"_a, "out"_a, "n_rows"_a, "n_cols"_a,
      "nnz"_a, "batch"_a, "left_stride_b"_a, "left_stride_r"_a, "dense_stride_b"_a, "dense_stride_c"_a, "dtype"_a,
      "index_type"_a, "num_threads"_a);
  m.def(
      "csr_sddmm_cuda",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t row_order, std::uintptr_t left,
         std::uintptr_t dense, std::uintptr_t out, int64_t n_rows, int64_t n_cols, int64_t nnz, int64_t batch,
         int64_t left_stride_b, int64_t left_stride_r, int64_t dense_stride_b, int64_t dense_stride_c, int dtype,
         int index_type, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const CsrSddmmParams p = sddmm_params(row_ptr, col_idx, row_order, left, dense, out, n_rows, n_cols, nnz,
                                              batch, left_stride_b, left_stride_r, dense_stride_b, dense_stride_c,
                                              dtype, index_type);
        py::gil_scoped_release release;
        csr_sddmm_cuda(p, device, stream);
#else
        no_cuda("csr_sddmm");
#endif
      },
      sddmm_doc, py::kw_only(), "row_ptr"_a, "col_idx"_a, "row_order"_a, "left"_a, "dense"_a, "out"_a, "n_rows"_a,
      "n_cols"_a, "nnz"_a, "batch"_a, "left_stride_b"_a, "left_stride_r"_a, "dense_stride_b"_a, "dense_stride_c"_a,
      "dtype"_a, "index_type"_a, "device"_a, "stream"_a);

  const char* jacobi_doc =
      "Batched SVD by one-sided Jacobi: A[b] [rows, cols] (rows >= cols) = U diag(S) V^T, S descending.\n"
      "See csrc/include/lowrank_ops/svd.h for the layout contract.";
  m.def(
      "jacobi_svd_cpu",
      [](std::uintptr_t a, std::uintptr_t u, std::uintptr_t s, std::uintptr_t v, std::uintptr_t sweeps,
         std::uintptr_t converged, std::uintptr_t off_diagonal, int64_t batch, int64_t rows, int64_t cols,
         int64_t a_stride_b, int64_t a_stride_r, int64_t a_stride_c, int64_t u_stride_b, int64_t u_stride_r,
         int64_t u_stride_c, int64_t s_stride_b, int64_t s_stride_k, int64_t v_stride_b, int64_t v_stride_r,
         int64_t v_stride_c, int dtype, double tol, int max_sweeps, bool sign_from_v, int num_threads) {
        const JacobiSvdParams p = jacobi_svd_params(a, u, s, v, sweeps, converged, off_diagonal, batch, rows, cols,
                                                    a_stride_b, a_stride_r, a_stride_c, u_stride_b, u_stride_r,
                                                    u_stride_c, s_stride_b, s_stride_k, v_stride_b, v_stride_r,
                                                    v_stride_c, dtype, tol, max_sweeps, sign_from_v);
        py::gil_scoped_release release;
        jacobi_svd_cpu(p, num_threads);
      },
      jacobi_doc, py::kw_only(), "a"_a, "u"_a, "s"_a, "v"_a, "sweeps"_a, "converged"_a, "off_diagonal"_a, "batch"_a,
      "rows"_a, "cols"_a, "a_stride_b"_a, "a_stride_r"_a, "a_stride_c"_a, "u_stride_b"_a, "u_stride_r"_a,
      "u_stride_c"_a, "s_stride_b"_a, "s_stride_k"_a, "v_stride_b"_a, "v_stride_r"_a, "v_stride_c"_a, "dtype"_a,
      "tol"_a, "max_sweeps"_a, "sign_from_v"_a, "num_threads"_a);
  m.def(
      "jacobi_svd_cuda_workspace_bytes",
      [](int64_t batch, int64_t rows, int64_t cols, int dtype, bool compute_uv, int device) -> int64_t {
#ifdef LOWRANK_OPS_WITH_CUDA
        return jacobi_svd_cuda_workspace_bytes(batch, rows, cols, static_cast<DType>(dtype), compute_uv, device);
#else
        no_cuda("batched_svd");
#endif
      },
      "Bytes of global workspace jacobi_svd_cuda needs (0 when the matrices fit in shared memory).", py::kw_only(),
      "batch"_a, "rows"_a, "cols"_a, "dtype"_a, "compute_uv"_a, "device"_a);
  m.def(
      "jacobi_svd_cuda",
      [](std::uintptr_t a, std::uintptr_t u, std::uintptr_t s, std::uintptr_t v, std::uintptr_t sweeps,
         std::uintptr_t converged, std::uintptr_t off_diagonal, std::uintptr_t workspace, int64_t workspace_bytes,
         int64_t batch, int64_t rows, int64_t cols, int64_t a_stride_b, int64_t a_stride_r, int64_t a_stride_c,
         int64_t u_stride_b, int64_t u_stride_r, int64_t u_stride_c, int64_t s_stride_b, int64_t s_stride_k,
         int64_t v_stride_b, int64_t v_stride_r, int64_t v_stride_c, int dtype, double tol, int max_sweeps,
         bool sign_from_v, int device, std::uintptr_t stream) {
#ifdef LOWRANK_OPS_WITH_CUDA
        JacobiSvdParams p = jacobi_svd_params(a, u, s, v, sweeps, converged, off_diagonal, batch, rows, cols,
                                              a_stride_b, a_stride_r, a_stride_c, u_stride_b, u_stride_r, u_stride_c,
                                              s_stride_b, s_stride_k, v_stride_b, v_stride_r, v_stride_c, dtype, tol,
                                              max_sweeps, sign_from_v);
        p.workspace = reinterpret_cast<void*>(workspace);
        p.workspace_bytes = workspace_bytes;
        py::gil_scoped_release release;
        jacobi_svd_cuda(p, device, stream);
#else
        no_cuda("batched_svd");
#endif
      },
      jacobi_doc, py::kw_only(), "a"_a, "u"_a, "s"_a, "v"_a, "sweeps"_a, "converged"_a, "off_diagonal"_a,
      "workspace"_a, "workspace_bytes"_a, "batch"_a, "rows"_a, "cols"_a, "a_stride_b"_a, "a_stride_r"_a,
      "a_stride_c"_a, "u_stride_b"_a, "u_stride_r"_a, "u_stride_c"_a, "s_stride_b"_a, "s_stride_k"_a, "v_stride_b"_a,
      "v_stride_r"_a, "v_stride_c"_a, "dtype"_a, "tol"_a, "max_sweeps"_a, "sign_from_v"_a, "device"_a, "stream"_a);
}
