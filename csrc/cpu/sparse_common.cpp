// Shape checks shared by the CPU and CUDA back ends of the sparse kernels.
#include "lowrank_ops/sparse.h"

namespace lowrank_ops {

void check_spmm_params(const CsrSpmmParams& p) {
  LOWRANK_CHECK(p.n_rows >= 0 && p.n_cols >= 0 && p.nnz >= 0 && p.batch >= 0,
                "csr_spmm: sizes must be non-negative; got n_rows=", p.n_rows, ", n_cols=", p.n_cols,
                ", nnz=", p.nnz, ", batch=", p.batch);
  LOWRANK_CHECK(p.row_ptr != nullptr, "csr_spmm: row_ptr must not be null");
  LOWRANK_CHECK(p.nnz == 0 || (p.col_idx != nullptr && p.values != nullptr),
                "csr_spmm: col_idx and values must not be null when nnz=", p.nnz, " > 0");
  LOWRANK_CHECK(p.batch * p.n_rows == 0 || p.out != nullptr, "csr_spmm: out must not be null");
  LOWRANK_CHECK(p.batch * p.n_cols == 0 || p.dense != nullptr, "csr_spmm: dense must not be null");
}

void check_sddmm_params(const CsrSddmmParams& p) {
  LOWRANK_CHECK(p.n_rows >= 0 && p.n_cols >= 0 && p.nnz >= 0 && p.batch >= 0,
                "csr_sddmm: sizes must be non-negative; got n_rows=", p.n_rows, ", n_cols=", p.n_cols,
                ", nnz=", p.nnz, ", batch=", p.batch);
  LOWRANK_CHECK(p.row_ptr != nullptr, "csr_sddmm: row_ptr must not be null");
  LOWRANK_CHECK(p.nnz == 0 || (p.col_idx != nullptr && p.out != nullptr),
                "csr_sddmm: col_idx and out must not be null when nnz=", p.nnz, " > 0");
  LOWRANK_CHECK(p.batch * p.n_rows == 0 || p.left != nullptr, "csr_sddmm: left must not be null");
  LOWRANK_CHECK(p.batch * p.n_cols == 0 || p.dense != nullptr, "csr_sddmm: dense must not be null");
}

}  // namespace lowrank_ops
