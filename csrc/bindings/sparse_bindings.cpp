// lowrank_ops._C: fixed-support sparse kernels (csr_spmm, csr_sddmm).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "lowrank_ops/sparse.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

CsrSpmmParams spmm_params(std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values, std::uintptr_t row_order, std::uintptr_t dense, std::uintptr_t out,
                          int64_t n_rows, int64_t n_cols, int64_t nnz, int64_t batch, int64_t dense_stride_b,
                          int64_t dense_stride_c, int64_t out_stride_b, int64_t out_stride_r, int dtype,
                          int index_type, std::uintptr_t addend, int64_t addend_stride_b, int64_t addend_stride_r) {
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
  p.addend = reinterpret_cast<const void*>(addend);
  p.addend_stride_b = addend_stride_b;
  p.addend_stride_r = addend_stride_r;
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

}  // namespace

LOWRANK_OPS_BINDINGS(sparse) {
  const char* spmm_doc =
      "out[b, r] = sum_k values[k] * dense[b, col_idx[k]] over the CSR row r.\n"
      "See csrc/include/lowrank_ops/sparse.h for the layout contract.";
  m.def(
      "csr_spmm_cpu",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values,
         std::uintptr_t dense, std::uintptr_t out, int64_t n_rows, int64_t n_cols, int64_t nnz, int64_t batch,
         int64_t dense_stride_b, int64_t dense_stride_c, int64_t out_stride_b, int64_t out_stride_r, int dtype,
         int index_type, int num_threads, std::uintptr_t addend, int64_t addend_stride_b, int64_t addend_stride_r) {
        const CsrSpmmParams p = spmm_params(row_ptr, col_idx, values, 0, dense, out, n_rows, n_cols, nnz,
                                            batch, dense_stride_b, dense_stride_c, out_stride_b, out_stride_r, dtype,
                                            index_type, addend, addend_stride_b, addend_stride_r);
        py::gil_scoped_release release;
        csr_spmm_cpu(p, num_threads);
      },
      spmm_doc, py::kw_only(), "row_ptr"_a, "col_idx"_a, "values"_a, "dense"_a, "out"_a, "n_rows"_a,
      "n_cols"_a, "nnz"_a, "batch"_a, "dense_stride_b"_a, "dense_stride_c"_a, "out_stride_b"_a, "out_stride_r"_a,
      "dtype"_a, "index_type"_a, "num_threads"_a, "addend"_a = 0, "addend_stride_b"_a = 0,
      "addend_stride_r"_a = 0);
  m.def(
      "csr_spmm_cuda",
      [](std::uintptr_t row_ptr, std::uintptr_t col_idx, std::uintptr_t values,
         std::uintptr_t row_order, std::uintptr_t dense, std::uintptr_t out, int64_t n_rows, int64_t n_cols,
         int64_t nnz, int64_t batch, int64_t dense_stride_b, int64_t dense_stride_c, int64_t out_stride_b,
         int64_t out_stride_r, int dtype, int index_type, int device, std::uintptr_t stream, std::uintptr_t addend,
         int64_t addend_stride_b, int64_t addend_stride_r) {
#ifdef LOWRANK_OPS_WITH_CUDA
        const CsrSpmmParams p = spmm_params(row_ptr, col_idx, values, row_order, dense, out, n_rows,
                                            n_cols, nnz, batch, dense_stride_b, dense_stride_c, out_stride_b,
                                            out_stride_r, dtype, index_type, addend, addend_stride_b, addend_stride_r);
        py::gil_scoped_release release;
        csr_spmm_cuda(p, device, stream);
#else
        bindings::no_cuda("csr_spmm");
#endif
      },
      spmm_doc, py::kw_only(), "row_ptr"_a, "col_idx"_a, "values"_a, "row_order"_a, "dense"_a,
      "out"_a, "n_rows"_a, "n_cols"_a, "nnz"_a, "batch"_a, "dense_stride_b"_a, "dense_stride_c"_a, "out_stride_b"_a,
      "out_stride_r"_a, "dtype"_a, "index_type"_a, "device"_a, "stream"_a, "addend"_a = 0, "addend_stride_b"_a = 0,
      "addend_stride_r"_a = 0);

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
        bindings::no_cuda("csr_sddmm");
#endif
      },
      sddmm_doc, py::kw_only(), "row_ptr"_a, "col_idx"_a, "row_order"_a, "left"_a, "dense"_a, "out"_a, "n_rows"_a,
      "n_cols"_a, "nnz"_a, "batch"_a, "left_stride_b"_a, "left_stride_r"_a, "dense_stride_b"_a, "dense_stride_c"_a,
      "dtype"_a, "index_type"_a, "device"_a, "stream"_a);

}

}  // namespace lowrank_ops
