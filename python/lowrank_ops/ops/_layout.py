"""The one memory layout the row-streaming kernels (M-FAC passes, Krylov blocks) read
``[rows, n]`` tensors in: unit column stride, and rows that do not overlap, row ``i`` at
``i * row_stride(tensor)``."""
from __future__ import annotations

from typing import Tuple

import torch


def rows_apart(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` ``[rows, n]`` has that layout (an expanded tensor, row stride 0, has not)."""
    rows, n = tensor.shape
    return (n <= 1 or tensor.stride(1) == 1) and (rows <= 1 or tensor.stride(0) >= n)


def rows_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` when it has the layout (or is not 2-D), else a contiguous copy: for arguments only read."""
    return tensor if tensor.dim() != 2 or rows_apart(tensor) else tensor.contiguous()


def require_rows_apart(op: str, name: str, tensor: torch.Tensor) -> None:
    """For arguments written in place, which cannot be copied: ValueError unless they have the layout."""
    if not rows_apart(tensor):
        raise ValueError(f"{op}: {name} has strides {tensor.stride()}; expected unit column stride and rows that do "
                         "not overlap (it is written in place)")


def row_stride(tensor: torch.Tensor) -> int:
    """The distance between rows in elements (``n`` when there is at most one row)."""
    return tensor.stride(0) if tensor.shape[0] > 1 else tensor.shape[1]


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., n]`` as ``[rows, n]`` (a view where possible).  ``reshape(-1, n)``: torch.export
    keeps the row count symbolic (``x.shape[:-1].numel()`` turned a dynamic batch into a
    constant under non-strict export); with ``n = 0`` the -1 is ambiguous and the count is
    spelled out."""
    return x.reshape(-1, x.shape[-1]) if x.shape[-1] != 0 else x.reshape(x.shape[:-1].numel(), 0)


def _byte_span(tensor: torch.Tensor) -> Tuple[int, int]:
    """``[first, last)`` byte addresses a non-empty tensor's elements can occupy."""
    low = high = 0
    for size, stride in zip(tensor.shape, tensor.stride()):
        reach = (size - 1) * stride
        low, high = (low + reach, high) if stride < 0 else (low, high + reach)
    start = tensor.data_ptr()
    return start + low * tensor.element_size(), start + (high + 1) * tensor.element_size()


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two non-empty tensors may share bytes: the same storage and intersecting
    byte spans (views of disjoint parts of one flat buffer, as flat-parameter trainers
    hold weights and adapters, are apart)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a_start, a_end), (b_start, b_end) = _byte_span(a), _byte_span(b)
    return a_start < b_end and b_start < a_end


def require_apart(op: str, written: str, tensor: torch.Tensor, **read: torch.Tensor) -> None:
    """ValueError when the written ``tensor`` may share bytes with one of the tensors ``read``
    (:func:`may_overlap`: a kernel reading those while writing it would read what it wrote)."""
    if tensor.numel() == 0:
        return
    for name, other in read.items():
        if other is not None and other.numel() and may_overlap(tensor, other):
            raise ValueError(f"{op}: {written} must not share memory with {name} (it is written while {name} is read)")
