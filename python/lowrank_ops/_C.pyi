"""Type stub of the compiled module (csrc/bindings/module.cpp).

Every kernel entry point takes addresses (``tensor.data_ptr()``), sizes, strides in
elements, dtype codes (``lowrank_ops._dtypes``) and, for CUDA, a device index and a
raw ``cudaStream_t``; the kernel entry points take keyword-only arguments.
"""

def build_info() -> dict: ...
def cpu_features() -> dict[str, bool]: ...  # avx2, avx512f, avx512_bf16, amx_bf16, genuine_intel
def cpu_threading() -> str: ...
def cuda_device_count() -> int: ...
def cuda_device_name(device: int) -> str: ...
def cuda_versions() -> tuple[int, int]: ...
def cholesky_qr_cpu(
    *, y: int, r: int, batch: int, rows: int, cols: int, y_batch_stride: int, y_row_stride: int, y_col_stride: int,
    shift: bool, plain_passes: int, dtype: int, num_threads: int,
) -> None: ...
def csr_spmm_cpu(
    *, row_ptr: int, col_idx: int, values: int, dense: int, out: int, n_rows: int, n_cols: int, nnz: int,
    batch: int, dense_stride_b: int, dense_stride_c: int, out_stride_b: int, out_stride_r: int, dtype: int,
    index_type: int, num_threads: int, addend: int = 0, addend_stride_b: int = 0, addend_stride_r: int = 0,
) -> None: ...
def csr_spmm_cuda(
    *, row_ptr: int, col_idx: int, values: int, row_order: int, dense: int, out: int, n_rows: int, n_cols: int,
    nnz: int, batch: int, dense_stride_b: int, dense_stride_c: int, out_stride_b: int, out_stride_r: int,
    dtype: int, index_type: int, device: int, stream: int, addend: int = 0, addend_stride_b: int = 0,
    addend_stride_r: int = 0,
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
def tall_cholesky_cpu(
    *, gram: int, r: int, batch: int, n: int, rows: int, shift: bool, dtype: int, num_threads: int,
) -> None: ...
def tall_gram_cpu(
    *, y: int, gram: int, batch: int, rows: int, cols: int, y_batch_stride: int, y_row_stride: int,
    y_col_stride: int, dtype: int, num_threads: int,
) -> None: ...
def tall_scale_cpu(
    *, y: int, scale: int, batch: int, rows: int, cols: int, y_batch_stride: int, y_row_stride: int,
    y_col_stride: int, dtype: int, num_threads: int,
) -> None: ...
def tall_solve_upper_cpu(
    *, y: int, r: int, q: int, batch: int, rows: int, cols: int, y_batch_stride: int, y_row_stride: int,
    y_col_stride: int, r_batch_stride: int, r_row_stride: int, r_col_stride: int, q_batch_stride: int,
    q_row_stride: int, q_col_stride: int, dtype: int, num_threads: int,
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
def krylov_spmv_cpu(
    *, row_ptr: int, col_idx: int, values: int, x: int, y: int, n_rows: int, n_cols: int, nnz: int, dtype: int,
    index_type: int, num_threads: int,
) -> None: ...
def krylov_spmv_cuda(
    *, row_ptr: int, col_idx: int, values: int, x: int, y: int, n_rows: int, n_cols: int, nnz: int, dtype: int,
    index_type: int, device: int, stream: int,
) -> None: ...
def krylov_cgs_pass_cpu(
    *, basis: int, w: int, h: int, norms: int, workspace: int, rows: int, n: int, q_stride: int, n_chunks: int,
    mode: int, dtype: int, num_threads: int,
) -> None: ...
def krylov_cgs_pass_cuda(
    *, basis: int, w: int, h: int, norms: int, workspace: int, rows: int, n: int, q_stride: int, mode: int,
    dtype: int, device: int, stream: int,
) -> None: ...
def krylov_arnoldi_cpu(
    *, row_ptr: int, col_idx: int, values: int, basis: int, r: int, hessenberg: int, rotated: int, g: int,
    givens: int, history: int, workspace: int, n: int, nnz: int, q_stride: int, kc: int, steps: int, n_chunks: int,
    beta: float, target: float, bnorm: float, dtype: int, index_type: int, num_threads: int,
) -> tuple[int, bool]: ...
def krylov_arnoldi_workspace(*, kc: int, steps: int, n_chunks: int) -> int: ...
def krylov_cg_cpu(
    *, row_ptr: int, col_idx: int, values: int, inverse_diagonal: int, x: int, r: int, p: int, q: int, z: int,
    history: int, workspace: int, n: int, nnz: int, steps: int, n_chunks: int, target: float, bnorm: float,
    dtype: int, index_type: int, num_threads: int, deflation: int = 0, deflation_product: int = 0,
    deflation_rows: int = 0, record: int = 0, record_rows: int = 0, alphas: int = 0, betas: int = 0, rho: int = 0,
    resume: bool = False, reproject_below: float = 0.0,
) -> tuple[int, int]: ...
def krylov_block_cpu(
    *, basis: int, other: int, coef: int, out: int, workspace: int, rows: int, cols: int, n: int, q_stride: int,
    other_stride: int, n_chunks: int, mode: int, accumulate: bool, dtype: int, num_threads: int,
) -> None: ...
def krylov_block_cuda(
    *, basis: int, other: int, coef: int, out: int, workspace: int, rows: int, cols: int, n: int, q_stride: int,
    other_stride: int, mode: int, accumulate: bool, dtype: int, device: int, stream: int,
) -> None: ...
# ---- optimal transport (csrc/include/lowrank_ops/ot.h); src: the OtSource dict built by ops/ot.py
def ot_row_lse_cpu(*, src: dict, lse: int, mean_cost: int, num_threads: int) -> None: ...
def ot_row_lse_cuda(*, src: dict, lse: int, mean_cost: int, device: int, stream: int) -> None: ...
def ot_log_histogram_cpu(*, src: dict, lo: int, hi: int, n_bins: int, counts: int, num_threads: int) -> None: ...
def ot_log_histogram_cuda(*, src: dict, lo: int, hi: int, n_bins: int, counts: int, device: int, stream: int) -> None: ...
def ot_sparsify_cpu(
    *, src: dict, threshold: int, row_counts: int, row_ptr: int, col_idx: int, values: int, nnz: int,
    num_threads: int,
) -> None: ...
def ot_sparsify_cuda(
    *, src: dict, threshold: int, row_counts: int, row_ptr: int, col_idx: int, values: int, nnz: int, device: int,
    stream: int,
) -> None: ...
def ot_row_grad_cpu(*, src: dict, lse: int, grad: int, num_threads: int) -> None: ...
def ot_row_grad_cuda(*, src: dict, lse: int, grad: int, device: int, stream: int) -> None: ...
def ot_hessian_matvec_cpu(
    *, row_ptr: int, col_idx: int, values: int, r: int, c: int, vx: int, vy: int, out_x: int, out_y: int, batch: int,
    rows: int, cols: int, nnz: int, dtype: int, num_threads: int,
) -> None: ...
def ot_hessian_matvec_cuda(
    *, row_ptr: int, col_idx: int, values: int, r: int, c: int, vx: int, vy: int, out_x: int, out_y: int, batch: int,
    rows: int, cols: int, nnz: int, dtype: int, device: int, stream: int,
) -> None: ...
def mfac_dots_cpu(
    *, grads: int, x: int, out: int, n_rows: int, dim: int, k: int, grads_ld: int, x_ld: int, write_slot: int,
    dtype: int, wide: bool, num_threads: int,
) -> None: ...
def mfac_dots_cuda_segments(*, n_rows: int, dim: int, k: int) -> int: ...
def mfac_dots_cuda(
    *, grads: int, x: int, out: int, workspace: int, workspace_elems: int, n_rows: int, dim: int, k: int,
    grads_ld: int, x_ld: int, write_slot: int, dtype: int, wide: bool, device: int, stream: int,
) -> None: ...
def mfac_combine_cpu(
    *, grads: int, coef: int, x: int, out: int, n_rows: int, dim: int, k: int, grads_ld: int, x_ld: int,
    out_ld: int, alpha: float, beta: float, dtype: int, wide: bool, num_threads: int,
) -> None: ...
def mfac_combine_cuda(
    *, grads: int, coef: int, x: int, out: int, n_rows: int, dim: int, k: int, grads_ld: int, x_ld: int,
    out_ld: int, alpha: float, beta: float, dtype: int, wide: bool, device: int, stream: int,
) -> None: ...
def dora_row_norm_cpu(
    *, weight: int, coef: int, lora_B: int, lora_A: int, out: int, out_features: int, in_features: int, rank: int,
    weight_stride_o: int, weight_stride_i: int, dtype: int, scale: float, num_threads: int,
) -> None: ...
def dora_row_norm_cuda(
    *, weight: int, coef: int, lora_B: int, lora_A: int, out: int, out_features: int, in_features: int, rank: int,
    weight_stride_o: int, weight_stride_i: int, dtype: int, scale: float, device: int, stream: int,
) -> None: ...
SMALL_BATCH_MAX_ROWS: int
SMALL_BATCH_GRAD_MAX_ROWS: int
def small_batch_linear_cpu(
    *, x: int, weight: int, bias: int, y: int, rows: int, in_features: int, out_features: int, x_ld: int,
    w_ld: int, y_ld: int, num_threads: int, weight_sumsq: int = 0, weight_dtype: int = 0,
) -> None: ...
def small_batch_linear_grad_input_cpu(
    *, grad_y: int, weight: int, grad_x: int, rows: int, in_features: int, out_features: int, gy_ld: int,
    w_ld: int, gx_ld: int, num_threads: int,
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
def mfac_apply_cpu(
    *, grads: int, x: int, out: int, U: int, u_ld: int, products: int, n_rows: int, dim: int, k: int, grads_ld: int,
    x_ld: int, out_ld: int, alpha: float, beta: float, dtype: int, num_threads: int,
) -> None: ...
def mfac_cholesky_factor_cpu(*, A: int, a_ld: int, n: int) -> int: ...
def mfac_cholesky_replace_cpu(*, U: int, u_ld: int, n: int, s: int, row: int, work: int) -> bool: ...
def mfac_cholesky_replace_cuda(
    *, U: int, u_ld: int, n: int, s: int, row: int, work: int, ok: int, device: int, stream: int,
) -> None: ...
