"""Thin callers of the Krylov kernel ops (:mod:`lowrank_ops.ops.krylov`) for the solvers.

Each function (but :func:`row_norms`, numpy on the CPU, and :func:`combine`, a
:func:`subtract` with negated coefficients) calls one op through
:func:`~lowrank_ops.ops._library.eager_or_op`: in
eager mode the op's unchecked kernel call directly (no dispatcher, no per-call checks:
these run thousands of times per solve at a few microseconds each; the op module's
docstring says why they are kernels at all), under torch.compile the op itself.  No
validation happens here: the callers (:class:`~lowrank_ops.krylov.CSRMatrix`, the
solvers) own tensors whose shapes, dtypes and devices they checked once.  Every vector
operation of length n in the solvers' loops goes through these functions or through
torch's native elementwise ops.

Scalars the solvers need on the host (norms, Gram matrices, the cycle's small arrays)
come back from the ops as tensors and are read here: one host read per call, as the
solvers' control flow needs them.  The step-by-step CG loop keeps its scalars on the
device instead (:func:`dots`, :func:`subtract_without_norm`) and reads them once per step
(:mod:`~lowrank_ops.krylov._cg_loop`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from ..ops import krylov as _ops
from ..ops._library import eager_or_op

__all__ = ["spmv", "row_norms", "gram_schmidt", "dots", "subtract", "subtract_without_norm", "combine", "gram",
           "combine_rows", "arnoldi", "ArnoldiOutput"]


def spmv(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
         out: torch.Tensor) -> torch.Tensor:
    """``out = A x`` for a CSR matrix ``[out.numel(), x.numel()]`` (contiguous tensors on one device,
    validated by the caller); returns ``out``."""
    eager_or_op("krylov_spmv_", _ops.spmv_unchecked)(row_ptr, col_idx, values, x, out)
    return out


def row_norms(rows: torch.Tensor) -> np.ndarray:
    """Euclidean norms of the rows of ``[k, n]`` (float64 numpy ``[k]``).

    CPU: numpy on the tensor's memory.  ``torch.linalg.vector_norm(rows, dim=1)`` splits a
    10 x 4096 reduction over torch's OpenMP team: 2.1 ms per call on the shared 2-core
    machine, against ~20 us here.
    """
    if rows.is_cuda:
        return torch.linalg.vector_norm(rows, dim=1).to("cpu", torch.float64).numpy()
    values = rows.detach().numpy()
    return np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float64))


def gram_schmidt(basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor):
    """``h = Q w; w -= Q^T h`` with ``Q = basis``; returns ``(||w|| before, ||w|| after)``."""
    before, after = eager_or_op("krylov_cgs_pass_", _ops.cgs_pass_unchecked)(basis, w, h).tolist()
    # math.sqrt, as the C++ cycle (x ** 0.5 is pow: 1 ulp off)
    return math.sqrt(max(before, 0.0)), math.sqrt(max(after, 0.0))


def dots(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Q w`` (``[rows]``) for ``Q = basis`` ``[rows, n]``."""
    return eager_or_op("krylov_cgs_dots", _ops.cgs_dots_unchecked)(basis, w)


def subtract(basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """``w -= Q^T h`` in place; returns ``||w||`` after."""
    after = eager_or_op("krylov_cgs_update_", _ops.cgs_update_unchecked)(basis, w, h.contiguous()).tolist()[1]
    return math.sqrt(max(after, 0.0))


def subtract_without_norm(basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> None:
    """``w -= Q^T h`` in place, as :func:`subtract` but without reading ``||w||`` (no host read)."""
    eager_or_op("krylov_cgs_update_", _ops.cgs_update_unchecked)(basis, w, h.contiguous())


def combine(basis: torch.Tensor, coefficients, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out + Q^T c`` (``[n]``, in place when ``out`` is given): rows of ``basis`` combined with ``c``."""
    if out is None:
        out = torch.zeros(basis.shape[1], dtype=basis.dtype, device=basis.device)
    coefficients = torch.as_tensor(coefficients)
    if basis.shape[0]:
        subtract(basis, out, -coefficients.to(device=basis.device, dtype=basis.dtype))
    return out


def gram(basis: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """``Q W^T`` (``[rows, cols]`` float64 numpy) in one sweep over ``basis`` ``[rows, n]`` and ``other`` ``[cols, n]``."""
    out = eager_or_op("krylov_gram", _ops.gram_unchecked)(basis, other)
    return out.to("cpu", torch.float64).numpy()


def combine_rows(basis: torch.Tensor, coefficients: np.ndarray, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out (+)= C^T Q``: ``cols`` combinations of the rows of ``basis`` at once, ``[cols, n]``.

    ``coefficients`` is ``[rows, cols]``; with ``out`` given the result is added to it.
    """
    accumulate = out is not None
    if out is None:
        out = torch.empty(coefficients.shape[1], basis.shape[1], dtype=basis.dtype, device=basis.device)
    coef = torch.from_numpy(np.ascontiguousarray(coefficients)).to(device=basis.device, dtype=basis.dtype)
    eager_or_op("krylov_combine_rows_", _ops.combine_rows_unchecked)(basis, coef, out, accumulate)
    return out


@dataclasses.dataclass
class ArnoldiOutput:
    """What :func:`arnoldi` returns (float64 numpy arrays, sized for the ``steps`` requested).

    steps : int
        Arnoldi steps taken, ``j``.
    breakdown : bool
        The Krylov space became invariant at step ``j``.
    hessenberg : ndarray[kc + steps + 1, steps]
        Columns ``[:j]``: ``B = C^T A V`` in rows ``[:kc]``, the unrotated ``Hbar`` below.
    rotated : ndarray[steps, steps]
        ``[:j, :j]``: the upper-triangular Givens factor ``R`` of ``Hbar``.
    g : ndarray[steps + 1]
        ``[:j + 1]``: ``beta e1`` rotated (``|g[j]|`` is the residual estimate).
    history : ndarray[steps]
        ``[:j]``: ``|g[i + 1]| / bnorm`` after each step.
    """

    steps: int
    breakdown: bool
    hessenberg: np.ndarray
    rotated: np.ndarray
    g: np.ndarray
    history: np.ndarray


def arnoldi(matrix, basis: torch.Tensor, kc: int, r: torch.Tensor, beta: float, steps: int, target: float,
            bnorm: float, n_chunks: Optional[int] = None) -> ArnoldiOutput:
    """One Arnoldi cycle of GMRES / GCRO-DR on a CPU CSR matrix, in one kernel call (the op
    ``krylov_arnoldi_``, :func:`lowrank_ops.ops.krylov.arnoldi_cpu`).

    Unchecked like the other functions here (the op's checks, run cache-cold after the
    previous cycle, cost ~15 us of a ~1 ms cycle at n = 4096): the solvers' basis, residual
    and scalars are valid by construction; call ``torch.ops.lowrank_ops.krylov_arnoldi_``
    for checked arguments.

    Parameters
    ----------
    matrix : CSRMatrix
        The (preconditioned) operator, square ``[n, n]`` with ``n >= 1``, on the CPU.
    basis, kc, r, beta, steps, target, bnorm, n_chunks
        As :func:`~lowrank_ops.ops.krylov.arnoldi_cpu`.

    Raises
    ------
    TypeError
        ``matrix`` is not a :class:`~lowrank_ops.krylov.CSRMatrix`.
    """
    from .operators import CSRMatrix  # operators imports this module

    if not isinstance(matrix, CSRMatrix):
        raise TypeError(f"arnoldi: matrix must be a CSRMatrix; got {type(matrix).__name__}")
    hessenberg, rotated, g, history, info = eager_or_op("krylov_arnoldi_", _ops.arnoldi_unchecked)(
        matrix.row_ptr, matrix.col_idx, matrix.values, basis, r, kc, steps, beta, target, bnorm, n_chunks)
    taken, breakdown = info.tolist()
    return ArnoldiOutput(taken, bool(breakdown), hessenberg.numpy(), rotated.numpy(), g.numpy(), history.numpy())
