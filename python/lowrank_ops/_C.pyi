"""Type stub of the compiled module (csrc/bindings/module.cpp).

Every kernel entry point takes addresses (``tensor.data_ptr()``), sizes, strides in
elements, dtype codes (``lowrank_ops._dtypes``) and, for CUDA, a device index and a
raw ``cudaStream_t``; all arguments are keyword-only.
"""

def build_info() -> dict: ...
def cuda_device_count() -> int: ...
def cuda_device_name(device: int) -> str: ...
def cuda_versions() -> tuple[int, int]: ...
def csr_spmm_cpu(
    *, row_ptr: int, col_idx: int, values: int, dense: int, out: int, n_rows: int, n_cols: int, nnz: int,
    batch: int, dense_stride_b: int, dense_stride_c: int, out_stride_b: int, out_stride_r: int, dtype: int,
    index_type: int, num_threads: int,
) -> None: ...
def csr_spmm_cuda(
    *, row_ptr: int, col_idx: int, values: int, row_order: int, dense: int, out: int, n_rows: int, n_cols: int,
    nnz: int, batch: int, dense_stride_b: int, dense_stride_c: int, out_stride_b: int, out_stride_r: int,
    dtype: int, index_type: int, device: int, stream: int,
) -> None: ...
def csr_sddmm_cpu(
    *, row_ptr: int, col_idx: int, left: int, dense: int, out: int, n_rows: int, n_cols: int, nnz: int, batch: int,
    left_stride_b: int, left_stride_r: int, dense_stride_b: int, dense_stride_c: int, dtype: int, index_type: int,
    num_threads: int,
) -> None: ...
def csr_sddmm_cuda(
    *, row_ptr: int, col_idx: int, row_order: int, left: int, dense: int, out: int, n_rows: int, n_cols: int,
    nnz: int, batch: int, left_stride_b: int, left_stride_r: int, dense_stride_b: int, dense_stride_c: int,
    dtype: int, index_type: int, device: int, stream: int,
) -> None: ...
def jacobi_svd_cpu(
    *, a: int, u: int, s: int, v: int, sweeps: int, converged: int, off_diagonal: int, batch: int, rows: int,
    cols: int, a_stride_b: int, a_stride_r: int, a_stride_c: int, u_stride_b: int, u_stride_r: int, u_stride_c: int,
    s_stride_b: int, s_stride_k: int, v_stride_b: int, v_stride_r: int, v_stride_c: int, dtype: int, tol: float,
    max_sweeps: int, sign_from_v: bool, num_threads: int,
) -> None: ...
def jacobi_svd_cuda_workspace_bytes(
    *, batch: int, rows: int, cols: int, dtype: int, compute_uv: bool, device: int,
) -> int: ...
def jacobi_svd_cuda(
    *, a: int, u: int, s: int, v: int, sweeps: int, converged: int, off_diagonal: int, workspace: int,
    workspace_bytes: int, batch: int, rows: int, cols: int, a_stride_b: int, a_stride_r: int, a_stride_c: int,
    u_stride_b: int, u_stride_r: int, u_stride_c: int, s_stride_b: int, s_stride_k: int, v_stride_b: int,
    v_stride_r: int, v_stride_c: int, dtype: int, tol: float, max_sweeps: int, sign_from_v: bool, device: int,
    stream: int,
) -> None: ...
def check_segment_routing_cpu(
    *, offsets: int, ids: int, ranks: int, scales: int, n_rows: int, n_segments: int, n_adapters: int, r_max: int,
    op: str,
) -> None: ...
def segment_matmul_cpu(
    *, offsets: int, ids: int, ranks: int, scales: int, in_: int, w: int, out: int, n_rows: int, n_segments: int,
    n_adapters: int, r_max: int, J: int, C: int, in_stride_n: int, out_stride_n: int, w_stride_a: int,
    w_stride_j: int, w_stride_c: int, rank_on_c: bool, accumulate: bool, dtype: int, num_threads: int = 1,
    device: int = 0, stream: int = 0,
) -> None: ...
def segment_matmul_cuda(
    *, offsets: int, ids: int, ranks: int, scales: int, in_: int, w: int, out: int, n_rows: int, n_segments: int,
    n_adapters: int, r_max: int, J: int, C: int, in_stride_n: int, out_stride_n: int, w_stride_a: int,
    w_stride_j: int, w_stride_c: int, rank_on_c: bool, accumulate: bool, dtype: int, num_threads: int = 1,
    device: int = 0, stream: int = 0,
) -> None: ...
def segment_outer_cpu(
    *, offsets: int, ids: int, ranks: int, scales: int, left: int, right: int, out: int, n_rows: int,
    n_segments: int, n_adapters: int, r_max: int, J: int, left_stride_n: int, right_stride_n: int,
    out_stride_a: int, out_stride_k: int, out_stride_j: int, dtype: int, num_threads: int = 1, device: int = 0,
    stream: int = 0,
) -> None: ...
def segment_outer_cuda(
    *, offsets: int, ids: int, ranks: int, scales: int, left: int, right: int, out: int, n_rows: int,
    n_segments: int, n_adapters: int, r_max: int, J: int, left_stride_n: int, right_stride_n: int,
    out_stride_a: int, out_stride_k: int, out_stride_j: int, dtype: int, num_threads: int = 1, device: int = 0,
    stream: int = 0,
) -> None: ...
