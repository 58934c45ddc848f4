// lowrank_ops._C: batched one-sided Jacobi SVD.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "registry.h"
#include "lowrank_ops/svd.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace lowrank_ops {
namespace {

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

}  // namespace

LOWRANK_OPS_BINDINGS(svd) {
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
        bindings::no_cuda("batched_svd");
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
        bindings::no_cuda("batched_svd");
#endif
      },
      jacobi_doc, py::kw_only(), "a"_a, "u"_a, "s"_a, "v"_a, "sweeps"_a, "converged"_a, "off_diagonal"_a,
      "workspace"_a, "workspace_bytes"_a, "batch"_a, "rows"_a, "cols"_a, "a_stride_b"_a, "a_stride_r"_a,
      "a_stride_c"_a, "u_stride_b"_a, "u_stride_r"_a, "u_stride_c"_a, "s_stride_b"_a, "s_stride_k"_a, "v_stride_b"_a,
      "v_stride_r"_a, "v_stride_c"_a, "dtype"_a, "tol"_a, "max_sweeps"_a, "sign_from_v"_a, "device"_a, "stream"_a);
}

}  // namespace lowrank_ops
