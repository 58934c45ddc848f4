"""Thin callers of the Krylov kernels in ``lowrank_ops._C`` (csrc/cpu/krylov_cpu.cpp, csrc/cuda/krylov_cuda.cu).

No validation happens here (except in :func:`arnoldi`, one call per restart cycle): the callers (:class:`~lowrank_ops.krylov.CSRMatrix`, the
solvers) own tensors whose shapes, dtypes and devices they checked once.

Why kernels instead of ``torch.mv`` / ``torch.dot``: these are called thousands of times
per solve at a few microseconds of work each, and torch's CPU BLAS (MKL) runs them on
its OpenMP team, whose hand-offs cost 0.5-5 ms per call when the cores are shared
(measured on the 2-core machine: ``torch.dot`` of 16384 doubles 524 us, numpy's 2.4
us).  The kernels here split work over lowrank_ops' own pool only when there is enough
of it (``_WORK_PER_TASK``).  Every vector operation of length n in the solvers' loops
goes through these three functions or through torch's native elementwise ops.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import numpy as np
import torch

from .._dtypes import FLOAT_CODES, INDEX_CODES
from .._extension import cuda_extension, extension

__all__ = ["spmv", "row_norms", "gram_schmidt", "dots", "subtract", "combine", "gram", "combine_rows", "arnoldi", "ArnoldiOutput"]

# Split a CPU kernel over threads only from this much work per task (entries touched):
# below it the hand-offs cost more than the loop.  Measured on the shared 2-core machine,
# one Arnoldi cycle (30 steps, 10 recycled vectors) of Darcy 128 x 128 (n = 16384, 0.8M
# basis entries): 295 us per step on one thread against 303 on two (min of 20), and a
# median of 388 against 1343 us while another process kept a core busy; at 64 x 64,
# 49 against 820 us.  So the kernels stay on one thread up to ~1M entries per task.
_WORK_PER_TASK = 1 << 20
_FULL, _DOTS, _UPDATE = 0, 1, 2


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def spmv(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
         n_cols: int) -> torch.Tensor:
    """``out = A x`` for a CSR matrix (contiguous tensors on one device, validated by the caller)."""
    common = dict(row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(), values=values.data_ptr(), x=x.data_ptr(),
                  y=out.data_ptr(), n_rows=out.numel(), n_cols=n_cols, nnz=col_idx.numel(),
                  dtype=FLOAT_CODES[values.dtype], index_type=INDEX_CODES[row_ptr.dtype])
    if values.is_cuda:
        cuda_extension("krylov spmv").krylov_spmv_cuda(**common, device=values.device.index, stream=_stream(values))
    else:
        extension().krylov_spmv_cpu(**common, num_threads=torch.get_num_threads())
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


_BUFFERS: Dict[tuple, torch.Tensor] = {}


def _buffer(device: torch.device, dtype: torch.dtype, size: int) -> torch.Tensor:
    """A reusable scratch tensor of at least ``size`` entries (norms and partial sums of a pass).

    Reused rather than allocated per call: the passes take microseconds.  The results
    are read back (``tolist``) before the next pass starts, so one buffer per device and
    dtype is enough (CUDA: work is ordered on one stream, and ``tolist`` synchronizes).
    """
    key = (device, dtype)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(max(size, 1024), dtype=dtype, device=device)
        _BUFFERS[key] = buffer
    return buffer


def _pass(mode: int, basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor):
    """One kernel call over ``basis`` ``[rows, n]`` (rows contiguous); returns the two squared norms."""
    rows, n = basis.shape
    accumulate = torch.float64 if basis.dtype == torch.float64 else torch.float32
    common = dict(basis=basis.data_ptr(), w=w.data_ptr(), h=h.data_ptr(), rows=rows, n=n,
                  q_stride=basis.stride(0) if rows > 1 else n, mode=mode, dtype=FLOAT_CODES[w.dtype])
    if w.is_cuda:
        norms = _buffer(w.device, accumulate, 2)[:2]
        cuda_extension("krylov Gram-Schmidt").krylov_cgs_pass_cuda(
            **common, norms=norms.data_ptr(), workspace=0, device=w.device.index, stream=_stream(w))
    else:
        n_chunks = max(1, min(torch.get_num_threads(), (rows + 1) * n // _WORK_PER_TASK))
        scratch = _buffer(w.device, accumulate, 2 + n_chunks * (rows + 1) + rows)
        norms = scratch[:2]
        extension().krylov_cgs_pass_cpu(**common, norms=norms.data_ptr(), workspace=scratch[2:].data_ptr(),
                                        n_chunks=n_chunks, num_threads=torch.get_num_threads())
    return norms.tolist()


def gram_schmidt(basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor):
    """``h = Q w; w -= Q^T h`` with ``Q = basis``; returns ``(||w|| before, ||w|| after)``."""
    before, after = _pass(_FULL, basis, w, h)  # math.sqrt, as the C++ cycle (x ** 0.5 is pow: 1 ulp off)
    return math.sqrt(max(before, 0.0)), math.sqrt(max(after, 0.0))


def dots(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Q w`` (``[rows]``) for ``Q = basis`` ``[rows, n]``."""
    h = torch.empty(basis.shape[0], dtype=w.dtype, device=w.device)
    _pass(_DOTS, basis, w, h)
    return h


def subtract(basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """``w -= Q^T h`` in place; returns ``||w||`` after."""
    return math.sqrt(max(_pass(_UPDATE, basis, w, h.contiguous())[1], 0.0))


def combine(basis: torch.Tensor, coefficients, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out + Q^T c`` (``[n]``, in place when ``out`` is given): rows of ``basis`` combined with ``c``."""
    if out is None:
        out = torch.zeros(basis.shape[1], dtype=basis.dtype, device=basis.device)
    coefficients = torch.as_tensor(coefficients)
    if basis.shape[0]:
        subtract(basis, out, -coefficients.to(device=basis.device, dtype=basis.dtype))
    return out


def _row_stride(tensor: torch.Tensor) -> int:
    return tensor.stride(0) if tensor.shape[0] > 1 else tensor.shape[1]


def gram(basis: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """``Q W^T`` (``[rows, cols]`` float64 numpy) in one sweep over ``basis`` ``[rows, n]`` and ``other`` ``[cols, n]``."""
    rows, n = basis.shape
    cols = other.shape[0]
    accumulate = torch.float64 if basis.dtype == torch.float64 else torch.float32
    out = torch.empty(rows * cols, dtype=accumulate, device=basis.device)
    common = dict(basis=basis.data_ptr(), other=other.data_ptr(), coef=0, out=out.data_ptr(), rows=rows, cols=cols,
                  n=n, q_stride=_row_stride(basis), other_stride=_row_stride(other), mode=0, accumulate=False,
                  dtype=FLOAT_CODES[basis.dtype])
    if basis.is_cuda:
        cuda_extension("krylov block").krylov_block_cuda(**common, workspace=0, device=basis.device.index,
                                                         stream=_stream(basis))
    else:
        n_chunks = max(1, min(torch.get_num_threads(), (rows + cols) * n // _WORK_PER_TASK))
        workspace = _buffer(basis.device, accumulate, n_chunks * rows * cols)
        extension().krylov_block_cpu(**common, workspace=workspace.data_ptr(), n_chunks=n_chunks,
                                     num_threads=torch.get_num_threads())
    return out.reshape(rows, cols).to("cpu", torch.float64).numpy()


def combine_rows(basis: torch.Tensor, coefficients: np.ndarray, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out (+)= C^T Q``: ``cols`` combinations of the rows of ``basis`` at once, ``[cols, n]``.

    ``coefficients`` is ``[rows, cols]``; with ``out`` given the result is added to it.
    """
    rows, n = basis.shape
    cols = coefficients.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.empty(cols, n, dtype=basis.dtype, device=basis.device)
    coef = torch.from_numpy(np.ascontiguousarray(coefficients)).to(device=basis.device, dtype=basis.dtype)
    common = dict(basis=basis.data_ptr(), other=out.data_ptr(), coef=coef.data_ptr(), out=0, rows=rows, cols=cols,
                  n=n, q_stride=_row_stride(basis), other_stride=_row_stride(out), mode=1, accumulate=accumulate,
                  dtype=FLOAT_CODES[basis.dtype])
    if basis.is_cuda:
        cuda_extension("krylov block").krylov_block_cuda(**common, workspace=0, device=basis.device.index,
                                                         stream=_stream(basis))
    else:
        n_chunks = max(1, min(torch.get_num_threads(), (rows + cols) * n // _WORK_PER_TASK))
        extension().krylov_block_cpu(**common, workspace=0, n_chunks=n_chunks, num_threads=torch.get_num_threads())
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


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"arnoldi: {name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_float(name: str, value, positive: bool) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"arnoldi: {name} must be a {'positive' if positive else 'non-negative'} finite number; got {value!r}")
    return float(value)


def arnoldi(matrix, basis: torch.Tensor, kc: int, r: torch.Tensor, beta: float, steps: int, target: float,
            bnorm: float, n_chunks: Optional[int] = None) -> ArnoldiOutput:
    """One Arnoldi cycle of GMRES / GCRO-DR on a CPU CSR matrix, in one kernel call.

    The C++ loop (``krylov_arnoldi_cpu``, csrc/cpu/krylov_cpu.cpp) does per step what
    :func:`lowrank_ops.krylov._arnoldi.arnoldi_cycle` does with one SpMV and one or two
    Gram-Schmidt kernel calls: ``w = A v_j``, CGS against ``[C; V_0..V_j]`` (a second pass
    on strong cancellation), ``v_{j+1} = w / ||w||``, Givens rotations of the Hessenberg
    column, and a stop on ``|g_{j+1}| <= target`` or breakdown.  It saves the ~10 Python
    and torch calls per step (5-20 us each), which cost as much as the arithmetic at
    n = 4096.

    Parameters
    ----------
    matrix : CSRMatrix
        The (preconditioned) operator, square ``[n, n]``, on the CPU.
    basis : Tensor[rows >= kc + steps + 1, n]
        Same dtype as ``matrix``, rows contiguous: rows ``[:kc]`` hold the orthonormal
        recycled ``C``; rows ``kc:kc + j + 1`` receive ``V`` (row ``kc + j + 1`` holds the
        unnormalized remainder after a breakdown).
    kc : int
        Recycled vectors (>= 0).
    r : Tensor[n]
        Starting residual (orthogonal to ``C``), contiguous, the matrix's dtype.
    beta : float
        ``||r||`` (> 0).
    steps : int
        Maximum number of steps (>= 1).
    target : float
        Stop once ``|g_{j+1}| <= target`` (>= 0).
    bnorm : float
        ``||b||`` (> 0), to make the history relative.
    n_chunks : int, optional
        Split the n entries into this many tasks (default: by work, at most
        ``torch.get_num_threads()``); results depend on it at rounding level only.

    Raises
    ------
    ValueError
        An argument of the wrong shape, dtype, device or layout, or out of range.
    """
    from .operators import CSRMatrix  # operators imports this module

    if not isinstance(matrix, CSRMatrix):
        raise TypeError(f"arnoldi: matrix must be a CSRMatrix; got {type(matrix).__name__}")
    n = matrix.shape[0]
    if matrix.shape[1] != n or n == 0:
        raise ValueError(f"arnoldi: matrix has shape {matrix.shape}; expected a non-empty square matrix (n, n)")
    if matrix.device.type != "cpu":
        raise ValueError(f"arnoldi: matrix is on {matrix.device}; the fused cycle runs on the CPU")
    kc = _check_int("kc", kc, 0)
    steps = _check_int("steps", steps, 1)
    beta = _check_float("beta", beta, positive=True)
    target = _check_float("target", target, positive=False)
    bnorm = _check_float("bnorm", bnorm, positive=True)
    for name, tensor, dim in (("basis", basis, 2), ("r", r, 1)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != dim:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"arnoldi: {name} must be a {dim}-D tensor; got {got}")
        if tensor.dtype != matrix.dtype or tensor.device != matrix.device:
            raise ValueError(f"arnoldi: {name} has dtype {tensor.dtype} on {tensor.device}; expected the matrix's "
                             f"{matrix.dtype} on {matrix.device}")
    if basis.shape[0] < kc + steps + 1 or basis.shape[1] != n:
        raise ValueError(f"arnoldi: basis has shape {tuple(basis.shape)}; expected (>= kc + steps + 1, n) = "
                         f"(>= {kc + steps + 1}, {n})")
    if basis.stride(1) != 1 or basis.stride(0) < n:
        raise ValueError(f"arnoldi: basis must have contiguous rows; got strides {basis.stride()}")
    if r.untyped_storage().data_ptr() == basis.untyped_storage().data_ptr():
        raise ValueError("arnoldi: r must not share memory with basis (the cycle overwrites the basis rows)")
    if r.shape != (n,) or not r.is_contiguous():
        raise ValueError(f"arnoldi: r has shape {tuple(r.shape)} (contiguous: {r.is_contiguous()}); "
                         f"expected a contiguous ({n},)")
    threads = torch.get_num_threads()
    if n_chunks is None:
        n_chunks = max(1, min(threads, (kc + steps + 1) * n // _WORK_PER_TASK))
    n_chunks = _check_int("n_chunks", n_chunks, 1)
    if n_chunks > n:
        raise ValueError(f"arnoldi: n_chunks must be in [1, n] = [1, {n}]; got {n_chunks}")
    hessenberg = np.zeros((kc + steps + 1, steps))
    rotated = np.zeros((steps, steps))
    g = np.zeros(steps + 1)
    givens = np.empty(2 * steps)
    history = np.zeros(steps)
    ext = extension()
    workspace = _buffer(basis.device, basis.dtype, ext.krylov_arnoldi_workspace(kc=kc, steps=steps, n_chunks=n_chunks))
    taken, breakdown = ext.krylov_arnoldi_cpu(
        row_ptr=matrix.row_ptr.data_ptr(), col_idx=matrix.col_idx.data_ptr(), values=matrix.values.data_ptr(),
        basis=basis.data_ptr(), r=r.data_ptr(), hessenberg=hessenberg.ctypes.data, rotated=rotated.ctypes.data,
        g=g.ctypes.data, givens=givens.ctypes.data, history=history.ctypes.data, workspace=workspace.data_ptr(),
        n=n, nnz=matrix.nnz, q_stride=basis.stride(0), kc=kc, steps=steps, n_chunks=n_chunks, beta=beta, target=target,
        bnorm=bnorm, dtype=FLOAT_CODES[basis.dtype], index_type=INDEX_CODES[matrix.row_ptr.dtype], num_threads=threads)
    return ArnoldiOutput(taken, breakdown, hessenberg, rotated, g, history)
