"""Fixed-support sparse matmul ops: ``y = x S^T`` and its backward, SpMV.

Layers:

* ``torch.ops.lowrank_ops.csr_spmm`` / ``csr_sddmm``: the kernels, declared once with
  ``torch.library`` (CPU impl, CUDA impl, fake impl).  They validate what the C++ relies
  on (ranks, lengths, dtypes, devices); index *contents* are validated once, when a
  :class:`~lowrank_ops.sparse.FixedSupport` is built, and the kernels stay memory-safe
  on any contents (out-of-range entries are skipped).
* ``_FixedSparseMatmul``: the autograd Function (SpMM forward; transposed SpMM and SDDMM
  backward).
* :func:`fixed_sparse_matmul`, :func:`spmv`: the public, validated entry points.

CPU implementation: hand-written C++ (csrc/cpu/sparse_cpu.cpp).  Against torch's own
CSR matmul (MKL) it is faster forward and backward at the SLTrain shapes; see
bench/bench_sparse.py and bench/results/ for the measured ratios.
CUDA implementation: csrc/cuda/sparse_cuda.cu; for batches of 8 rows or more the dense
operand is transposed first so that every stored entry reads one coalesced row.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._autocast import autocast_off_backward
from .._csr import check_index_dtypes, check_row_ptr_shape
from .._dtypes import accumulate_dtype, float_code, index_code
from .._extension import cuda_extension, extension
from .._first_order import first_order_only
from ..sparse import FixedSupport
from ._layout import flatten_rows
from ._library import LIBRARY, composed_path, current_stream, eager_or_op, register_fake

__all__ = ["fixed_sparse_matmul", "spmv"]

# Below this many rows of the dense operand, the CUDA kernels read it in place
# (lanes over nnz); from here on, transposing it first pays off (csrc/cuda/sparse_cuda.cu).
_CUDA_TRANSPOSE_MIN_BATCH = 8

LIBRARY.define(
    "csr_spmm(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? row_order, Tensor dense, int n_rows, "
    "Tensor? addend=None) -> Tensor"
)
LIBRARY.define("csr_sddmm(Tensor row_ptr, Tensor col_idx, Tensor? row_order, Tensor left, Tensor dense) -> Tensor")


# ---------------------------------------------------------------------------- argument checks
def _check_pattern(op: str, row_ptr, col_idx, row_order, n_rows: int) -> None:
    """``row_ptr`` ``[n_rows + 1]``, ``col_idx`` 1-D and ``row_order`` ``[n_rows]`` (or None), one
    index dtype (int32 or int64)."""
    check_row_ptr_shape(op, row_ptr, n_rows)
    if col_idx.dim() != 1:
        raise ValueError(f"{op}: col_idx has shape {tuple(col_idx.shape)}; expected 1-D (nnz,)")
    check_index_dtypes(op, row_ptr, col_idx=col_idx, row_order=row_order)
    if row_order is not None and (row_order.dim() != 1 or row_order.numel() != n_rows):
        raise ValueError(f"{op}: row_order has shape {tuple(row_order.shape)}; expected ({n_rows},)")


def _check_same_device(op: str, reference: torch.Tensor, **tensors) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}; expected {reference.device} (the device of the dense input)")


def _check_spmm_args(row_ptr, col_idx, values, row_order, dense, n_rows, addend=None) -> None:
    op = "csr_spmm"
    if n_rows < 0:
        raise ValueError(f"{op}: n_rows must be >= 0; got {n_rows}")
    nnz = col_idx.numel()
    _check_pattern(op, row_ptr, col_idx, row_order, n_rows)
    if dense.dim() != 2:
        raise ValueError(f"{op}: dense has shape {tuple(dense.shape)}; expected 2-D (batch, n_cols)")
    float_code(dense.dtype, op, "dense")
    if values.dtype != dense.dtype:
        raise TypeError(f"{op}: values has dtype {values.dtype}; expected the dtype of dense, {dense.dtype}")
    if values.dim() != 1 or values.numel() != nnz:
        raise ValueError(f"{op}: values has shape {tuple(values.shape)}; expected (nnz,) = ({nnz},)")
    if addend is not None:
        if tuple(addend.shape) != (dense.shape[0], n_rows):
            raise ValueError(f"{op}: addend has shape {tuple(addend.shape)}; expected (batch, n_rows) = "
                             f"({dense.shape[0]}, {n_rows})")
        if addend.dtype != accumulate_dtype(dense.dtype):
            raise TypeError(f"{op}: addend has dtype {addend.dtype}; expected {accumulate_dtype(dense.dtype)} "
                            f"(the accumulation dtype of {dense.dtype})")
    _check_same_device(op, dense, row_ptr=row_ptr, col_idx=col_idx, values=values, row_order=row_order,
                       addend=addend)


def _check_sddmm_args(row_ptr, col_idx, row_order, left, dense) -> None:
    op = "csr_sddmm"
    if left.dim() != 2 or dense.dim() != 2 or left.shape[0] != dense.shape[0]:
        raise ValueError(
            f"{op}: left has shape {tuple(left.shape)} and dense {tuple(dense.shape)}; "
            "expected 2-D (batch, n_rows) and (batch, n_cols) with the same batch"
        )
    n_rows = left.shape[1]
    _check_pattern(op, row_ptr, col_idx, row_order, n_rows)
    float_code(dense.dtype, op, "dense")
    if left.dtype != dense.dtype:
        raise TypeError(f"{op}: left has dtype {left.dtype}; expected the dtype of dense, {dense.dtype}")
    _check_same_device(op, dense, row_ptr=row_ptr, col_idx=col_idx, row_order=row_order, left=left)


def _address(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


# ---------------------------------------------------------------------------- csr_spmm
def _addend_args(addend: Optional[torch.Tensor]) -> dict:
    if addend is None:
        return {}
    return dict(addend=addend.data_ptr(), addend_stride_b=addend.stride(0), addend_stride_r=addend.stride(1))


def _csr_spmm_cpu(row_ptr, col_idx, values, row_order, dense, n_rows, addend=None):
    _check_spmm_args(row_ptr, col_idx, values, row_order, dense, n_rows, addend)
    return _csr_spmm_cpu_unchecked(row_ptr, col_idx, values, dense, n_rows, addend)


def _csr_spmm_cpu_unchecked(row_ptr, col_idx, values, dense, n_rows, addend=None):
    """The CPU kernel call of csr_spmm, arguments already checked."""
    row_ptr, col_idx, values = row_ptr.contiguous(), col_idx.contiguous(), values.contiguous()
    batch, n_cols = dense.shape
    out = dense.new_empty((batch, n_rows))
    extension().csr_spmm_cpu(
        row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(), values=values.data_ptr(),
        dense=dense.data_ptr(), out=out.data_ptr(),
        n_rows=n_rows, n_cols=n_cols, nnz=col_idx.numel(), batch=batch,
        dense_stride_b=dense.stride(0), dense_stride_c=dense.stride(1),
        out_stride_b=out.stride(0), out_stride_r=out.stride(1),
        dtype=float_code(dense.dtype, "csr_spmm", "dense"), index_type=index_code(row_ptr.dtype, "csr_spmm", "row_ptr"),
        num_threads=torch.get_num_threads(), **_addend_args(addend),
    )
    return out


def _csr_spmm_cuda(row_ptr, col_idx, values, row_order, dense, n_rows, addend=None):
    module = cuda_extension("csr_spmm")
    _check_spmm_args(row_ptr, col_idx, values, row_order, dense, n_rows, addend)
    row_ptr, col_idx, values, row_order = (_contiguous(t) for t in (row_ptr, col_idx, values, row_order))
    batch, n_cols = dense.shape
    transposed = batch >= _CUDA_TRANSPOSE_MIN_BATCH
    if transposed:
        # Column-major views: element (b, c) at c * batch + b, so rows of S's columns are contiguous.
        if dense.stride(0) != 1:
            dense = dense.t().contiguous().t()
        out = dense.new_zeros((n_rows, batch)).t()
    else:
        out = dense.new_zeros((batch, n_rows))  # zeros: rows an invalid row_order skips stay defined
    module.csr_spmm_cuda(
        row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(), values=values.data_ptr(),
        row_order=_address(row_order), dense=dense.data_ptr(), out=out.data_ptr(),
        n_rows=n_rows, n_cols=n_cols, nnz=col_idx.numel(), batch=batch,
        dense_stride_b=dense.stride(0), dense_stride_c=dense.stride(1),
        out_stride_b=out.stride(0), out_stride_r=out.stride(1),
        dtype=float_code(dense.dtype, "csr_spmm", "dense"), index_type=index_code(row_ptr.dtype, "csr_spmm", "row_ptr"),
        device=dense.device.index, stream=current_stream(dense), **_addend_args(addend),
    )
    return out.contiguous()


def _csr_spmm_fake(row_ptr, col_idx, values, row_order, dense, n_rows, addend=None):
    torch._check(dense.dim() == 2, lambda: f"csr_spmm: dense must be 2-D; got {dense.dim()}-D")
    torch._check(values.dtype == dense.dtype, lambda: "csr_spmm: values and dense must share a dtype")
    return dense.new_empty((dense.shape[0], n_rows))


# ---------------------------------------------------------------------------- csr_sddmm
def _csr_sddmm_cpu(row_ptr, col_idx, row_order, left, dense):
    _check_sddmm_args(row_ptr, col_idx, row_order, left, dense)
    row_ptr, col_idx = row_ptr.contiguous(), col_idx.contiguous()
    out = dense.new_empty((col_idx.numel(),))
    extension().csr_sddmm_cpu(
        row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(), left=left.data_ptr(), dense=dense.data_ptr(),
        out=out.data_ptr(), n_rows=left.shape[1], n_cols=dense.shape[1], nnz=col_idx.numel(), batch=dense.shape[0],
        left_stride_b=left.stride(0), left_stride_r=left.stride(1),
        dense_stride_b=dense.stride(0), dense_stride_c=dense.stride(1),
        dtype=float_code(dense.dtype, "csr_sddmm", "dense"), index_type=index_code(row_ptr.dtype, "csr_sddmm", "row_ptr"),
        num_threads=torch.get_num_threads(),
    )
    return out


def _csr_sddmm_cuda(row_ptr, col_idx, row_order, left, dense):
    module = cuda_extension("csr_sddmm")
    _check_sddmm_args(row_ptr, col_idx, row_order, left, dense)
    row_ptr, col_idx, row_order = (_contiguous(t) for t in (row_ptr, col_idx, row_order))
    if dense.shape[0] >= _CUDA_TRANSPOSE_MIN_BATCH:
        if left.stride(0) != 1:
            left = left.t().contiguous().t()
        if dense.stride(0) != 1:
            dense = dense.t().contiguous().t()
    # Zeros: entries outside every row's range (an invalid row_ptr) are 0, as on the CPU
    # (the kernel writes only the rows' ranges: they were left uninitialized).
    out = dense.new_zeros((col_idx.numel(),))
    module.csr_sddmm_cuda(
        row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(), row_order=_address(row_order), left=left.data_ptr(),
        dense=dense.data_ptr(), out=out.data_ptr(), n_rows=left.shape[1], n_cols=dense.shape[1],
        nnz=col_idx.numel(), batch=dense.shape[0],
        left_stride_b=left.stride(0), left_stride_r=left.stride(1),
        dense_stride_b=dense.stride(0), dense_stride_c=dense.stride(1),
        dtype=float_code(dense.dtype, "csr_sddmm", "dense"), index_type=index_code(row_ptr.dtype, "csr_sddmm", "row_ptr"),
        device=dense.device.index, stream=current_stream(dense),
    )
    return out


def _csr_sddmm_fake(row_ptr, col_idx, row_order, left, dense):
    torch._check(left.dim() == 2 and dense.dim() == 2, lambda: "csr_sddmm: left and dense must be 2-D")
    return dense.new_empty((col_idx.shape[0],))


LIBRARY.impl("csr_spmm", _csr_spmm_cpu, "CPU")
LIBRARY.impl("csr_spmm", _csr_spmm_cuda, "CUDA")
register_fake("csr_spmm", _csr_spmm_fake)
LIBRARY.impl("csr_sddmm", _csr_sddmm_cpu, "CPU")
LIBRARY.impl("csr_sddmm", _csr_sddmm_cuda, "CUDA")
register_fake("csr_sddmm", _csr_sddmm_fake)


# ---------------------------------------------------------------------------- autograd
def _csr_spmm_cpu_for_support(row_ptr, col_idx, values, row_order, dense, n_rows):
    """csr_spmm's CPU kernel call for :func:`_matmul`, whose arguments were validated against
    a FixedSupport (its pattern checked when it was built): only the two facts the C++ loop
    bounds rely on are checked again, in case the support's buffers were replaced; the full
    check cost ~10 us of a 95 us SpMV at 2048 x 5461, density 0.03."""
    if row_ptr.numel() != n_rows + 1 or row_ptr.dtype != col_idx.dtype:
        _check_spmm_args(row_ptr, col_idx, values, row_order, dense, n_rows)
    return _csr_spmm_cpu_unchecked(row_ptr, col_idx, values, dense, n_rows)


def _spmm_op(device: torch.device):
    """csr_spmm for ``device``, called by _matmul's paths after validation: the registered op
    under torch.compile, else the kernel call directly (eager_or_op; the dispatcher was ~40 us
    of a 180 us SpMV at 2048 x 5461, density 0.03, where the kernel takes 66 us)."""
    return eager_or_op("csr_spmm", _csr_spmm_cpu_for_support if device.type == "cpu" else _csr_spmm_cuda)


class _FixedSparseMatmul(torch.autograd.Function):
    """y = x S^T; x is [batch, in_features], S given by values and the support's index tensors.

    The support's tensors are passed one by one (not the module) so that torch.compile
    traces the Function without a graph break.
    """

    @staticmethod
    def forward(ctx, x, values, row_ptr, col_idx, row_order, col_ptr, row_idx, csc_to_csr, col_order, n_rows, n_cols):
        ctx.n_cols = n_cols
        ctx.save_for_backward(
            x if ctx.needs_input_grad[1] else None,
            values if ctx.needs_input_grad[0] else None,
            row_ptr, col_idx, row_order, col_ptr, row_idx, csc_to_csr, col_order,
        )
        return _spmm_op(x.device)(row_ptr, col_idx, values, row_order, x, n_rows)

    @staticmethod
    @first_order_only
    @autocast_off_backward
    def backward(ctx, grad_y):
        x, values, row_ptr, col_idx, row_order, col_ptr, row_idx, csc_to_csr, col_order = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            # dx = dy S: the CSR of S^T is S's CSC.  Gathering the values into CSC order
            # once (O(nnz)) beats an indirection per entry and batch tile in the kernel.
            values_csc = values.index_select(0, csc_to_csr)
            grad_x = torch.ops.lowrank_ops.csr_spmm(col_ptr, row_idx, values_csc, col_order, grad_y, ctx.n_cols)
        if ctx.needs_input_grad[1]:  # dv = (dy^T x) at the support only
            grad_values = torch.ops.lowrank_ops.csr_sddmm(row_ptr, col_idx, row_order, grad_y, x)
        return (grad_x, grad_values) + (None,) * 9


# ---------------------------------------------------------------------------- public API
def _validate(op: str, x: torch.Tensor, values: torch.Tensor, support: FixedSupport, x_name: str = "x") -> dict:
    """Checks a call's arguments (``x`` named ``x_name`` in messages: ``v`` for :func:`spmv`);
    returns the support's pattern buffers by name (:meth:`FixedSupport.pattern`, read once per call)."""
    if not isinstance(support, FixedSupport):
        raise TypeError(f"{op}: support must be a lowrank_ops.sparse.FixedSupport; got {type(support).__name__}")
    support._require_pattern(op)
    for name, tensor in ((x_name, x), ("values", values)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor; got {type(tensor).__name__}")
        float_code(tensor.dtype, op, name)
    pattern = support.pattern()
    in_features, nnz, device = support.in_features, pattern["col_idx"].numel(), x.device
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{op}: {x_name} has shape {tuple(x.shape)}; expected (..., in_features) = (..., {in_features})"
        )
    if values.dim() != 1 or values.numel() != nnz:
        raise ValueError(f"{op}: values has shape {tuple(values.shape)}; expected (nnz,) = ({nnz},)")
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: values has dtype {values.dtype}; expected the dtype of {x_name}, {x.dtype}")
    if values.device != device:
        raise ValueError(f"{op}: values is on {values.device}; expected the device of {x_name}, {device}")
    if pattern["col_idx"].device != device:
        raise ValueError(f"{op}: support is on {support.device}; expected the device of {x_name}, {device} "
                         f"(use support.to({x_name}.device))")
    return pattern


def fixed_sparse_matmul(x: torch.Tensor, values: torch.Tensor, support: FixedSupport) -> torch.Tensor:
    """``y = x S^T`` for a sparse ``S`` with a fixed support; differentiable in ``x`` and ``values``.

    Parameters
    ----------
    x : Tensor[..., in_features]
        float32, float64, float16 or bfloat16; any strides (read in place on CPU).
    values : Tensor[nnz]
        The entries of S in the support's CSR order; same dtype and device as ``x``.
    support : FixedSupport
        Pattern of the ``[out_features, in_features]`` matrix S, on ``x``'s device.

    Returns
    -------
    Tensor[..., out_features]
        Same dtype as ``x``; accumulated in float32 (float64 for float64 inputs).

    Notes
    -----
    Backward: ``dx = dy S`` (SpMM over the CSC map) and ``dvalues = (dy^T x)`` at the
    support only (SDDMM); no dense ``[out, in]`` matrix is ever formed.  Cost:
    ``2 * batch * nnz`` flops per pass.
    """
    return _matmul("fixed_sparse_matmul", x, values, support)


def _matmul(op: str, x: torch.Tensor, values: torch.Tensor, support: FixedSupport, x_name: str = "x") -> torch.Tensor:
    pattern = _validate(op, x, values, support, x_name)
    if composed_path():  # torch.func sees through torch ops only: the dense form, composed
        return x @ support.to_dense(values).T
    batch_shape, out_features = x.shape[:-1], support.out_features
    x2 = flatten_rows(x)
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
        y = _FixedSparseMatmul.apply(
            x2, values, pattern["row_ptr"], pattern["col_idx"], pattern["row_order"],
            pattern["col_ptr"], pattern["row_idx"], pattern["csc_to_csr"], pattern["col_order"],
            out_features, support.in_features,
        )
    else:  # nothing to differentiate: no autograd Function, no saved tensors
        y = _spmm_op(x.device)(pattern["row_ptr"], pattern["col_idx"], values, pattern["row_order"], x2, out_features)
    return y.reshape(*batch_shape, out_features)


def spmv(support: FixedSupport, values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sparse matrix-vector product ``S v`` (differentiable in ``values`` and ``v``).

    Parameters
    ----------
    support : FixedSupport
        Pattern of the ``[out_features, in_features]`` matrix S.
    values : Tensor[nnz]
        Entries of S in CSR order.
    v : Tensor[in_features] or Tensor[k, in_features]
        One vector, or ``k`` vectors stacked as rows (each multiplied independently).

    Returns
    -------
    Tensor[out_features] or Tensor[k, out_features]
    """
    if isinstance(v, torch.Tensor) and v.dim() not in (1, 2):
        raise ValueError(f"spmv: v has shape {tuple(v.shape)}; expected (in_features,) or (k, in_features)")
    return _matmul("spmv", v, values, support, "v")
