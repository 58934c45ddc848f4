"""Dtype and index-type codes shared with the C++ side (csrc/include/lowrank_ops/dtype.h)."""
from __future__ import annotations

import torch

FLOAT_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
INDEX_CODES = {torch.int32: 0, torch.int64: 1}

#: Whether ``torch.mm(a, b, out_dtype=torch.float32)`` exists: with half a, b one GEMM (on
#: the tensor cores) whose float32 accumulator is returned unrounded (CUDA; torch >= 2.8).
MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation (and M-FAC's compute) dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def float_code(dtype: torch.dtype, op: str, name: str) -> int:
    try:
        return FLOAT_CODES[dtype]
    except KeyError:
        raise TypeError(
            f"{op}: {name} has dtype {dtype}; expected one of float32, float64, float16, bfloat16"
        ) from None


def index_code(dtype: torch.dtype, op: str, name: str) -> int:
    try:
        return INDEX_CODES[dtype]
    except KeyError:
        raise TypeError(f"{op}: {name} has dtype {dtype}; expected int32 or int64") from None
