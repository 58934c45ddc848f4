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
