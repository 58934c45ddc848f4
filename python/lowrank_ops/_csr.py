"""The checks of a CSR pattern shared by the Python layer (clear errors before a kernel runs),
and the quiet construction of torch CSR tensors.

Two kinds of check: the arguments of the raw CSR ops (:func:`check_row_ptr_shape`,
:func:`check_index_dtypes`: what the C++ entry points rely on, checked on every call), and
a pattern's contents (:func:`check_row_ptr`, :func:`check_col_idx`,
:func:`check_index_range`: a pass over the data, done once when a pattern is built).  The
kernels are memory-safe on any contents (row ranges clamped to ``[0, nnz]``, columns out
of range skipped or rejected), so the content checks are about telling the user what is
wrong instead of computing with a malformed pattern.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Tuple

import torch

from ._dtypes import index_code

__all__ = [
    "check_row_ptr_shape", "check_index_dtypes", "require_integer", "check_row_ptr", "check_col_idx", "check_index_range",
    "quiet_sparse_csr_beta", "check_sparse_invariants",
]


def check_row_ptr_shape(where: str, row_ptr: torch.Tensor, n_rows: int) -> None:
    """Raises ValueError unless ``row_ptr`` has shape ``(n_rows + 1,)``."""
    if row_ptr.dim() != 1 or row_ptr.numel() != n_rows + 1:
        raise ValueError(f"{where}: row_ptr has shape {tuple(row_ptr.shape)}; expected (n_rows + 1,) = ({n_rows + 1},)")


def check_index_dtypes(where: str, row_ptr: torch.Tensor, **indices: Optional[torch.Tensor]) -> None:
    """Raises TypeError unless ``row_ptr`` is int32 or int64 and every tensor of ``indices``
    (name=tensor; None skipped) has its dtype: the kernels read every index array with one
    index type."""
    index_code(row_ptr.dtype, where, "row_ptr")
    for name, tensor in indices.items():
        if tensor is not None and tensor.dtype != row_ptr.dtype:
            raise TypeError(f"{where}: {name} has dtype {tensor.dtype}; expected the dtype of row_ptr, {row_ptr.dtype}")


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def require_integer(where: str, **indices: torch.Tensor) -> None:
    """Raises TypeError unless every index tensor (name=tensor) has an integer dtype: a float
    (or bool) index would otherwise be truncated silently by the conversion to int32/int64."""
    for name, tensor in indices.items():
        if tensor.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"{where}: {name} has dtype {tensor.dtype}; expected an integer dtype (int32 or int64)")


def check_row_ptr(where: str, row_ptr: torch.Tensor, nnz: int, name: str = "row_ptr") -> None:
    """Raises ValueError unless the non-empty 1-D ``row_ptr`` starts at 0, never decreases and ends at ``nnz``.

    ``name`` is the argument's name in the messages (e.g. ``"support.row_ptr"`` for a buffer).
    """
    first, last = int(row_ptr[0]), int(row_ptr[-1])
    if first != 0 or last != nnz:
        raise ValueError(f"{where}: {name} must start at 0 and end at nnz = {nnz}; got {first} ... {last}")
    decreasing = row_ptr[1:] < row_ptr[:-1]  # compared, not subtracted: no int64 overflow
    if bool(decreasing.any()):
        row = int(torch.nonzero(decreasing)[0])
        raise ValueError(f"{where}: {name} must be non-decreasing; {name}[{row + 1}] = {int(row_ptr[row + 1])} < "
                         f"{name}[{row}] = {int(row_ptr[row])}")


def _out_of_range(index: torch.Tensor, extent: int) -> Optional[Tuple[int, int]]:
    """``(min, max)`` of the integer tensor ``index`` when an entry lies outside ``[0, extent)``, else None."""
    if index.numel() == 0:
        return None
    low, high = (int(v) for v in torch.aminmax(index))
    return (low, high) if low < 0 or high >= extent else None


def check_col_idx(where: str, col_idx: torch.Tensor, n_cols: int) -> None:
    """Raises ValueError unless every entry of ``col_idx`` lies in ``[0, n_cols)``; the message
    gives the observed range ``[min, max]`` (CSRMatrix's and the OT ops' wording)."""
    bad = _out_of_range(col_idx, n_cols)
    if bad is not None:
        raise ValueError(f"{where}: col_idx must lie in [0, n_cols) = [0, {n_cols}); got [{bad[0]}, {bad[1]}]")


def check_index_range(where: str, index: torch.Tensor, extent: int, name: str) -> None:
    """Raises ValueError unless every entry of the integer tensor ``index`` (any shape) lies in
    ``[0, extent)``; the message names the offending extreme (the minimum when negative, else
    the maximum), FixedSupport's wording for its coordinates and buffers."""
    bad = _out_of_range(index, extent)
    if bad is not None:
        low, high = bad
        raise ValueError(f"{where}: {name} must lie in [0, {extent}); got {low if low < 0 else high}")


@contextlib.contextmanager
def quiet_sparse_csr_beta():
    """Silences torch's "Sparse CSR tensor support is in beta state" notice (printed on the
    first CSR construction of a process) around the library's own conversions."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)
        yield



def check_sparse_invariants(where: str, name: str, tensor: torch.Tensor) -> None:
    """ValueError naming ``name`` unless a 2-D torch sparse ``tensor`` (COO, CSR, CSC, BSR,
    BSC) is memory-safe for torch's kernels: indices in range, compressed indices starting
    at 0, non-decreasing and ending at nnz (any order within a row, duplicates allowed:
    torch's own validator also demands sorted, distinct columns, and on CUDA it fails by a
    device assert); nothing for a strided tensor.  torch builds sparse tensors without
    this check by default, and its own kernels then read and write out of bounds: a CSR
    matrix with crow_indices [0, 4000, 6] crashed ``A @ X`` (SIGSEGV), a COO index past
    the size crashed ``coalesce().to_sparse_csr()`` (glibc abort).  One pass over the
    indices (one host read on CUDA); not while compiling or for fake and meta tensors."""
    layout = tensor.layout
    if layout == torch.strided or tensor.is_meta or torch.compiler.is_compiling():
        return
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(tensor, FakeTensor):
        return
    if layout == torch.sparse_coo:
        try:  # (torch's COO check reads its bounds on the host: safe on CUDA too)
            torch._validate_sparse_coo_tensor_args(tensor._indices(), tensor._values(), tensor.shape)
        except RuntimeError as error:
            raise ValueError(f"{where}: {name} is not a valid {layout} tensor: {error}") from None
        return
    if tensor.dim() != 2:
        return  # (the callers refuse batched sparse matrices themselves)
    by_rows = layout in (torch.sparse_csr, torch.sparse_bsr)
    compressed, plain = ((tensor.crow_indices(), tensor.col_indices()) if by_rows
                         else (tensor.ccol_indices(), tensor.row_indices()))
    block = tuple(tensor.values().shape[1:3]) if layout in (torch.sparse_bsr, torch.sparse_bsc) else (1, 1)
    rows, cols = tensor.shape[0] // block[0], tensor.shape[1] // block[1]
    major, minor = (rows, cols) if by_rows else (cols, rows)
    nnz = plain.numel()
    problem = None
    if compressed.dim() != 1 or compressed.numel() != major + 1:
        problem = f"its compressed indices have shape {tuple(compressed.shape)}; expected ({major + 1},)"
    elif tensor.values().shape[0] != nnz:
        problem = f"it has {tensor.values().shape[0]} values for {nnz} plain indices"
    else:
        steps = compressed[1:] - compressed[:-1]
        low = plain.min() if nnz else compressed.new_zeros(())
        high = plain.max() if nnz else compressed.new_zeros(())
        first, last, smallest_step, low, high = torch.stack([
            compressed[0], compressed[-1], steps.min() if major else compressed.new_zeros(()), low, high]).tolist()
        if first != 0 or last != nnz:
            problem = f"its compressed indices run from {first} to {last}; expected 0 to nnz = {nnz}"
        elif smallest_step < 0:
            problem = "its compressed indices decrease"
        elif nnz and (low < 0 or high >= minor):
            problem = f"its plain indices span [{low}, {high}]; expected [0, {minor})"
    if problem is not None:
        raise ValueError(f"{where}: {name} is not a valid {layout} tensor: {problem}")
