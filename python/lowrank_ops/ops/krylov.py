"""Kernel ops of the Krylov solvers: single-vector CSR SpMV, classical Gram-Schmidt passes
over an Arnoldi basis, the block updates of a recycled space, and (CPU) a whole Arnoldi
cycle.

Ops (``torch.ops.lowrank_ops.*``; float32 or float64, every tensor on one device):

* ``krylov_spmv_(row_ptr, col_idx, values, x, out) -> ()``: ``out = A x`` for the CSR
  matrix ``A`` ``[out.numel(), x.numel()]`` (writes ``out``).
* ``krylov_cgs_pass_(basis, w, h) -> norms``: ``h = Q w``, then ``w -= Q^T h`` (writes
  ``h``, updates ``w``); ``norms`` ``[2]``: ``||w||^2`` before and after.
* ``krylov_cgs_dots(basis, w) -> h``: ``h = Q w`` alone.
* ``krylov_cgs_update_(basis, w, h) -> norms``: ``w -= Q^T h`` alone (updates ``w``);
  ``norms`` ``[2]``: ``0`` and ``||w||^2`` after.
* ``krylov_gram(basis, other) -> Tensor[rows, cols]``: ``Q W^T`` in one sweep.
* ``krylov_combine_rows_(basis, coef, out, accumulate) -> ()``: ``Y = C^T Q``, or
  ``Y += C^T Q`` with ``accumulate`` (writes ``out = Y``).
* ``krylov_arnoldi_(row_ptr, col_idx, values, basis, r, kc, steps, beta, target, bnorm,
  n_chunks) -> (hessenberg, rotated, g, history, info)``: one restart cycle of
  (projected) Arnoldi with Givens rotations (writes the basis rows it builds).  CPU only.
* ``krylov_cg_(row_ptr, col_idx, values, inverse_diagonal, x, r, steps, target, bnorm,
  n_chunks) -> (history, info)``: up to ``steps`` iterations of (Jacobi-)preconditioned
  conjugate gradients from ``x`` and its residual ``r`` (both updated in place).  CPU only.
* ``krylov_defcg_(row_ptr, col_idx, values, inverse_diagonal, x, r, p, z, rho, deflation,
  deflation_product, record, steps, target, bnorm, resume, n_chunks) -> (history, alphas,
  betas, info)``: the same loop, deflated by ``W`` (directions ``A``-conjugate to it), writing
  the Lanczos vectors of its first steps to ``record``, and resumable (the direction, ``z`` and
  ``r . z`` are state tensors).  CPU only.

``Q = basis`` ``[rows, n]`` and ``W`` / ``Y`` ``[cols, n]`` need contiguous rows (unit
column stride), not contiguous tensors: the solvers pass row ranges of one preallocated
basis.  Dots and Gram matrices are in the accumulation dtype (float64 for float64,
float32 for float32); the passes' squared norms are float64 for both, accumulated in
double (a float32 vector of norm beyond ~1.8e19 or below ~1e-19 has no float32 square:
GMRES on such float32 operators broke down or stalled); the three passes are modes 0, 1 and 2 of the one kernel
``krylov_cgs_pass``, and gram / combine modes 0 and 1 of ``krylov_block`` (contract:
csrc/include/lowrank_ops/krylov.h).

Implementations, all hand-written kernels (csrc/cpu/krylov_cpu.cpp,
csrc/cuda/krylov_cuda.cu), CPU and CUDA for every op but ``krylov_arnoldi_``.  Why not
``torch.mv`` / ``torch.dot``: a solve calls these thousands of times at a few
microseconds of work each, and torch's CPU BLAS (MKL) runs them on its OpenMP team,
whose hand-offs cost 0.5-5 ms per call when the cores are shared (measured on the
2-core machine: ``torch.dot`` of 16384 doubles 524 us, numpy's 2.4 us).  The CPU
kernels split work over lowrank_ops' own pool only from ``_WORK_PER_TASK`` entries per
task.

``krylov_arnoldi_``, ``krylov_cg_`` and ``krylov_defcg_`` have a CPU impl only: they run the solver's loop
(SpMV, the dots and vector updates, the breakdown and stopping tests) in C++ to save
the ~10 Python and torch calls per step (5-20 us each, as much as the arithmetic at
n = 4096).  On a GPU each step's decisions need the norms on the host anyway, so the
solvers run the same steps from the SpMV and Gram-Schmidt ops
(:mod:`lowrank_ops.krylov._arnoldi`, :func:`lowrank_ops.krylov.cg`,
:class:`lowrank_ops.krylov.DeflatedCG`), and no CUDA kernel
of the loops exists.

Eager callers and validation: each registered impl checks its arguments (shapes,
dtypes, devices, row layout, mutated arguments not overlapping read ones), then calls
the ``*_unchecked`` function of the same op.  The solvers
(:mod:`lowrank_ops.krylov._kernels`) own tensors they validated once and call the
``*_unchecked`` functions through :func:`~lowrank_ops.ops._library.eager_or_op`: no
dispatcher (5-40 us a call) and no per-call checks, while torch.compile sees the ops.
Index contents are not checked here (a :class:`~lowrank_ops.krylov.CSRMatrix` checks
them once); the kernels are memory-safe on any contents (row ranges clamped to
``[0, nnz]``, columns outside ``[0, n_cols)`` skipped).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._args import is_real_number, require_int, require_tensors
from .._csr import check_index_dtypes, check_row_ptr_shape
from .._dtypes import FLOAT_CODES, INDEX_CODES, accumulate_dtype
from .._extension import cuda_extension, extension
from ._layout import require_apart, require_rows_apart, row_stride, rows_view
from ._library import LIBRARY, current_stream, register_fake

__all__ = [
    "spmv_unchecked", "cgs_pass_unchecked", "cgs_dots_unchecked", "cgs_update_unchecked", "gram_unchecked",
    "combine_rows_unchecked", "arnoldi_unchecked", "arnoldi_cpu", "cg_unchecked", "cg_cpu", "defcg_unchecked",
    "defcg_cpu",
]

# Split a CPU kernel over threads only from this much work per task (entries touched):
# below it the hand-offs cost more than the loop.  Measured on the shared 2-core machine,
# one Arnoldi cycle (30 steps, 10 recycled vectors) of Darcy 128 x 128 (n = 16384, 0.8M
# basis entries): 295 us per step on one thread against 303 on two (min of 20), and a
# median of 388 against 1343 us while another process kept a core busy; at 64 x 64,
# 49 against 820 us.  So the kernels stay on one thread up to ~1M entries per task.
_WORK_PER_TASK = 1 << 20
_FULL, _DOTS, _UPDATE = 0, 1, 2  # krylov_cgs_pass modes

LIBRARY.define("krylov_spmv_(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor x, Tensor(a!) out) -> ()")
LIBRARY.define("krylov_cgs_pass_(Tensor basis, Tensor(a!) w, Tensor(b!) h) -> Tensor")
LIBRARY.define("krylov_cgs_dots(Tensor basis, Tensor w) -> Tensor")
LIBRARY.define("krylov_cgs_update_(Tensor basis, Tensor(a!) w, Tensor h) -> Tensor")
LIBRARY.define("krylov_gram(Tensor basis, Tensor other) -> Tensor")
LIBRARY.define("krylov_combine_rows_(Tensor basis, Tensor coef, Tensor(a!) out, bool accumulate) -> ()")
LIBRARY.define("krylov_arnoldi_(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor(a!) basis, Tensor r, int kc, "
               "int steps, float beta, float target, float bnorm, int? n_chunks=None) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
LIBRARY.define("krylov_cg_(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? inverse_diagonal, Tensor(a!) x, "
               "Tensor(b!) r, int steps, float target, float bnorm, int? n_chunks=None) -> (Tensor, Tensor)")
LIBRARY.define("krylov_defcg_(Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? inverse_diagonal, Tensor(a!) x, "
               "Tensor(b!) r, Tensor(c!) p, Tensor(d!) z, Tensor(e!) rho, Tensor deflation, Tensor deflation_product, "
               "Tensor(f!) record, int steps, float target, float bnorm, bool resume, int? n_chunks=None, "
               "float reproject_below=0.0) "
               "-> (Tensor, Tensor, Tensor, Tensor)")


# ---------------------------------------------------------------------------- kernel calls (no checks)
def spmv_unchecked(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, x: torch.Tensor,
                   out: torch.Tensor) -> None:
    """``krylov_spmv_`` for valid arguments: contiguous 1-D tensors on one device, ``row_ptr``
    ``[out.numel() + 1]`` and ``col_idx`` of one index dtype, ``values``, ``x``, ``out`` of one float dtype."""
    common = dict(row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(), values=values.data_ptr(), x=x.data_ptr(),
                  y=out.data_ptr(), n_rows=out.numel(), n_cols=x.numel(), nnz=col_idx.numel(),
                  dtype=FLOAT_CODES[values.dtype], index_type=INDEX_CODES[row_ptr.dtype])
    if values.is_cuda:
        cuda_extension("krylov_spmv_").krylov_spmv_cuda(**common, device=values.device.index,
                                                        stream=current_stream(values))
    else:
        extension().krylov_spmv_cpu(**common, num_threads=torch.get_num_threads())


def _cgs(mode: int, basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One ``krylov_cgs_pass`` kernel call; returns the squared norms ``[2]`` (float64)."""
    rows, n = basis.shape
    if n == 0:  # nothing to read (the kernels want a non-null w): Q w = 0, and w has no entries
        if mode != _UPDATE:
            h.zero_()
        return torch.zeros(2, dtype=torch.float64, device=w.device)
    common = dict(basis=basis.data_ptr(), w=w.data_ptr(), h=h.data_ptr(), rows=rows, n=n, q_stride=row_stride(basis),
                  mode=mode, dtype=FLOAT_CODES[w.dtype])
    if w.is_cuda:
        norms = torch.empty(2, dtype=torch.float64, device=w.device)
        cuda_extension("krylov_cgs_pass").krylov_cgs_pass_cuda(
            **common, norms=norms.data_ptr(), workspace=0, device=w.device.index, stream=current_stream(w))
        return norms
    threads = torch.get_num_threads()
    n_chunks = max(1, min(threads, (rows + 1) * n // _WORK_PER_TASK))
    # One allocation for the result (2 doubles) and the kernel's partial sums (a pass takes microseconds).
    workspace_bytes = (n_chunks + 1) * rows * w.element_size()
    scratch = torch.empty(2 + -(-workspace_bytes // 8), dtype=torch.float64)
    address = scratch.data_ptr()
    extension().krylov_cgs_pass_cpu(**common, norms=address, workspace=address + 16, n_chunks=n_chunks,
                                    num_threads=threads)
    return scratch[:2]


def cgs_pass_unchecked(basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``krylov_cgs_pass_`` for valid arguments: ``basis`` ``[rows, n]`` with contiguous rows, ``w``
    ``[n]`` and ``h`` ``[rows]`` contiguous, one float dtype and device, ``w`` outside ``basis``."""
    return _cgs(_FULL, basis, w, h)


def cgs_dots_unchecked(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``krylov_cgs_dots`` for valid arguments (as :func:`cgs_pass_unchecked`)."""
    h = torch.empty(basis.shape[0], dtype=w.dtype, device=w.device)
    _cgs(_DOTS, basis, w, h)
    return h


def cgs_update_unchecked(basis: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``krylov_cgs_update_`` for valid arguments (as :func:`cgs_pass_unchecked`)."""
    return _cgs(_UPDATE, basis, w, h)


def _block(op: str, basis: torch.Tensor, common: dict, cols: int, workspace_dtype: Optional[torch.dtype] = None):
    """``krylov_block`` on ``basis``'s device.  On the CPU the ``n`` entries are split in up
    to one chunk per thread (``_WORK_PER_TASK`` entries at least); the Gram mode
    (``workspace_dtype`` given) sums the chunks' partial ``[rows, cols]`` products in a
    workspace."""
    if basis.is_cuda:
        cuda_extension(op).krylov_block_cuda(**common, workspace=0, device=basis.device.index,
                                             stream=current_stream(basis))
        return
    rows, n = basis.shape
    threads = torch.get_num_threads()
    n_chunks = max(1, min(threads, (rows + cols) * n // _WORK_PER_TASK))
    workspace = None if workspace_dtype is None else torch.empty(n_chunks * rows * cols, dtype=workspace_dtype)
    extension().krylov_block_cpu(**common, workspace=0 if workspace is None else workspace.data_ptr(),
                                 n_chunks=n_chunks, num_threads=threads)


def gram_unchecked(basis: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``krylov_gram`` for valid arguments: ``basis`` ``[rows, n]`` and ``other`` ``[cols, n]`` with
    contiguous rows, one float dtype and device."""
    rows, n = basis.shape
    cols = other.shape[0]
    accumulate = accumulate_dtype(basis.dtype)
    out = torch.empty(rows, cols, dtype=accumulate, device=basis.device)
    if n == 0:
        return out.zero_()
    common = dict(basis=basis.data_ptr(), other=other.data_ptr(), coef=0, out=out.data_ptr(), rows=rows, cols=cols,
                  n=n, q_stride=row_stride(basis), other_stride=row_stride(other), mode=0, accumulate=False,
                  dtype=FLOAT_CODES[basis.dtype])
    _block("krylov_gram", basis, common, cols, workspace_dtype=accumulate)
    return out


def combine_rows_unchecked(basis: torch.Tensor, coef: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``krylov_combine_rows_`` for valid arguments: ``basis`` ``[rows, n]`` and ``out`` ``[cols, n]`` with
    contiguous rows, ``coef`` ``[rows, cols]`` contiguous, one float dtype and device, ``out`` apart from both."""
    rows, n = basis.shape
    cols = out.shape[0]
    common = dict(basis=basis.data_ptr(), other=out.data_ptr(), coef=coef.data_ptr(), out=0, rows=rows, cols=cols,
                  n=n, q_stride=row_stride(basis), other_stride=row_stride(out), mode=1, accumulate=accumulate,
                  dtype=FLOAT_CODES[basis.dtype])
    _block("krylov_combine_rows_", basis, common, cols)


# ---------------------------------------------------------------------------- argument checks
def _fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _check_float_tensor(op: str, name: str, tensor, dim: int) -> None:
    require_tensors(op, **{name: tensor})
    if tensor.dim() != dim:
        _fail(op, f"{name} must be a {dim}-D tensor; got {tuple(tensor.shape)}")
    if tensor.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; expected float32 or float64")


def _check_like(op: str, reference_name: str, reference: torch.Tensor, **tensors) -> None:
    """Every tensor has ``reference``'s dtype and device."""
    for name, tensor in tensors.items():
        if tensor.dtype != reference.dtype or tensor.device != reference.device:
            _fail(op, f"{name} has dtype {tensor.dtype} on {tensor.device}; expected {reference.dtype} on "
                      f"{reference.device} (as {reference_name})")


def _require_contiguous(op: str, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        _fail(op, f"{name} has strides {tensor.stride()}; expected a contiguous tensor (it is written in place)")


def _check_pattern(op: str, row_ptr, col_idx, values, n_rows: int) -> None:
    """``row_ptr`` ``[n_rows + 1]`` and ``col_idx`` ``[nnz]`` of one index dtype (int32 or int64),
    ``values`` ``[nnz]`` float32 or float64, all on one device."""
    require_tensors(op, row_ptr=row_ptr, col_idx=col_idx)
    for name, tensor in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if tensor.dim() != 1:
            _fail(op, f"{name} must be a 1-D tensor; got {tuple(tensor.shape)}")
    check_index_dtypes(op, row_ptr, col_idx=col_idx)
    check_row_ptr_shape(op, row_ptr, n_rows)
    _check_float_tensor(op, "values", values, 1)
    if values.numel() != col_idx.numel():
        _fail(op, f"values has shape {tuple(values.shape)}; expected (nnz,) = ({col_idx.numel()},) (as col_idx)")
    for name, tensor in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if tensor.device != values.device:
            _fail(op, f"{name} is on {tensor.device}; expected {values.device} (the device of values)")


def _check_basis_and_vector(op: str, basis, w, h=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``basis`` ``[rows, n]`` and ``w`` (and ``h``) of one float dtype and device; returns ``(basis, h)``
    with ``basis`` laid out for the kernels."""
    _check_float_tensor(op, "basis", basis, 2)
    _check_float_tensor(op, "w", w, 1)
    _check_like(op, "basis", basis, w=w)
    rows, n = basis.shape
    if w.shape != (n,):
        _fail(op, f"w has shape {tuple(w.shape)}; expected (n,) = ({n},) (basis is {tuple(basis.shape)})")
    if h is not None:
        _check_float_tensor(op, "h", h, 1)
        _check_like(op, "basis", basis, h=h)
        if h.shape != (rows,):
            _fail(op, f"h has shape {tuple(h.shape)}; expected (rows,) = ({rows},) (basis is {tuple(basis.shape)})")
    return rows_view(basis), h


# ---------------------------------------------------------------------------- registered impls
def _spmv(row_ptr, col_idx, values, x, out):
    op = "krylov_spmv_"
    _check_float_tensor(op, "x", x, 1)
    _check_float_tensor(op, "out", out, 1)
    _check_pattern(op, row_ptr, col_idx, values, out.numel())
    _check_like(op, "values", values, x=x, out=out)
    if x.numel() == 0 and col_idx.numel():
        _fail(op, f"x is empty, but the matrix has {col_idx.numel()} entries; expected x [n_cols] (entries in "
                  f"columns >= x's length are skipped)")
    _require_contiguous(op, "out", out)
    require_apart(op, "out", out, x=x, values=values)
    spmv_unchecked(row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(), x.contiguous(), out)


def _cgs_pass(basis, w, h):
    op = "krylov_cgs_pass_"
    basis, _ = _check_basis_and_vector(op, basis, w, h)
    _require_contiguous(op, "w", w)
    _require_contiguous(op, "h", h)
    require_apart(op, "w", w, basis=basis, h=h)
    require_apart(op, "h", h, basis=basis)
    return cgs_pass_unchecked(basis, w, h)


def _cgs_dots(basis, w):
    basis, _ = _check_basis_and_vector("krylov_cgs_dots", basis, w)
    return cgs_dots_unchecked(basis, w.contiguous())


def _cgs_update(basis, w, h):
    op = "krylov_cgs_update_"
    basis, h = _check_basis_and_vector(op, basis, w, h)
    _require_contiguous(op, "w", w)
    require_apart(op, "w", w, basis=basis, h=h)
    return cgs_update_unchecked(basis, w, h.contiguous())


def _gram(basis, other):
    op = "krylov_gram"
    _check_float_tensor(op, "basis", basis, 2)
    _check_float_tensor(op, "other", other, 2)
    _check_like(op, "basis", basis, other=other)
    if other.shape[1] != basis.shape[1]:
        _fail(op, f"other has shape {tuple(other.shape)}; expected (cols, n) = (cols, {basis.shape[1]}) "
                  f"(basis is {tuple(basis.shape)})")
    return gram_unchecked(rows_view(basis), rows_view(other))


def _combine_rows(basis, coef, out, accumulate):
    op = "krylov_combine_rows_"
    _check_float_tensor(op, "basis", basis, 2)
    _check_float_tensor(op, "coef", coef, 2)
    _check_float_tensor(op, "out", out, 2)
    _check_like(op, "basis", basis, coef=coef, out=out)
    rows, n = basis.shape
    cols = out.shape[0]
    if out.shape[1] != n:
        _fail(op, f"out has shape {tuple(out.shape)}; expected (cols, n) = (cols, {n}) (basis is {tuple(basis.shape)})")
    if coef.shape != (rows, cols):
        _fail(op, f"coef has shape {tuple(coef.shape)}; expected (rows, cols) = ({rows}, {cols})")
    require_rows_apart(op, "out", out)
    require_apart(op, "out", out, basis=basis, coef=coef)
    combine_rows_unchecked(rows_view(basis), coef.contiguous(), out, bool(accumulate))


def _spmv_fake(row_ptr, col_idx, values, x, out):
    return None


def _cgs_pass_fake(basis, w, h):
    return w.new_empty((2,), dtype=torch.float64)


def _cgs_dots_fake(basis, w):
    return w.new_empty((basis.shape[0],))


def _cgs_update_fake(basis, w, h):
    return w.new_empty((2,), dtype=torch.float64)


def _gram_fake(basis, other):
    return basis.new_empty((basis.shape[0], other.shape[0]), dtype=accumulate_dtype(basis.dtype))


def _combine_rows_fake(basis, coef, out, accumulate):
    return None


for _device in ("CPU", "CUDA"):
    LIBRARY.impl("krylov_spmv_", _spmv, _device)
    LIBRARY.impl("krylov_cgs_pass_", _cgs_pass, _device)
    LIBRARY.impl("krylov_cgs_dots", _cgs_dots, _device)
    LIBRARY.impl("krylov_cgs_update_", _cgs_update, _device)
    LIBRARY.impl("krylov_gram", _gram, _device)
    LIBRARY.impl("krylov_combine_rows_", _combine_rows, _device)
register_fake("krylov_spmv_", _spmv_fake)
register_fake("krylov_cgs_pass_", _cgs_pass_fake)
register_fake("krylov_cgs_dots", _cgs_dots_fake)
register_fake("krylov_cgs_update_", _cgs_update_fake)
register_fake("krylov_gram", _gram_fake)
register_fake("krylov_combine_rows_", _combine_rows_fake)


# ---------------------------------------------------------------------------- the fused Arnoldi cycle (CPU)
def _check_float(op: str, name: str, value, positive: bool) -> float:
    ok = is_real_number(value) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        _fail(op, f"{name} must be a {'positive' if positive else 'non-negative'} finite number; got {value!r}")
    return float(value)


def _cpu_square_pattern(op: str, row_ptr, col_idx, values, on_cuda: str) -> int:
    """``n`` of the non-empty square CSR operator ``[n, n]`` a CPU-only loop kernel takes (checked;
    ``on_cuda`` says what runs instead on a GPU)."""
    require_tensors(op, row_ptr=row_ptr)
    if row_ptr.dim() != 1 or row_ptr.numel() < 2:
        _fail(op, f"row_ptr has shape {tuple(row_ptr.shape)}; expected (n + 1,) with n >= 1 (a non-empty square matrix)")
    n = row_ptr.numel() - 1
    _check_pattern(op, row_ptr, col_idx, values, n)
    if values.device.type != "cpu":
        _fail(op, f"values is on {values.device}; expected cpu (a CPU kernel: on CUDA {on_cuda})")
    return n


def _check_n_chunks(op: str, n_chunks, n: int) -> Optional[int]:
    if n_chunks is None:
        return None
    n_chunks = require_int(op, "n_chunks", n_chunks, 1)
    if n_chunks > n:
        _fail(op, f"n_chunks must be in [1, n] = [1, {n}]; got {n_chunks}")
    return n_chunks


def arnoldi_cpu(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, basis: torch.Tensor,
                r: torch.Tensor, kc: int, steps: int, beta: float, target: float, bnorm: float,
                n_chunks: Optional[int] = None):
    """CPU impl of ``krylov_arnoldi_``: one Arnoldi cycle of GMRES / GCRO-DR on a CSR matrix, one kernel call.

    The C++ loop (``krylov_arnoldi_cpu``, csrc/cpu/krylov_cpu.cpp) does per step what
    :func:`lowrank_ops.krylov._arnoldi.arnoldi_cycle` does with ``krylov_spmv_`` and one
    or two ``krylov_cgs_pass_``: ``w = A v_j``, CGS against ``[C; V_0..V_j]`` (a second
    pass on strong cancellation), ``v_{j+1} = w / ||w||``, Givens rotations of the
    Hessenberg column, and a stop on ``|g_{j+1}| <= target`` or breakdown.

    Parameters
    ----------
    row_ptr, col_idx, values : Tensor[n + 1], Tensor[nnz], Tensor[nnz]
        The square CSR operator ``[n, n]`` (n >= 1) on the CPU: int32 or int64 indices of
        one dtype, float32 or float64 values.
    basis : Tensor[rows >= kc + steps + 1, n]
        The values' dtype, rows contiguous: rows ``[:kc]`` hold the orthonormal recycled
        ``C``; rows ``kc:kc + j + 1`` receive ``V`` (row ``kc + j + 1`` holds the
        unnormalized remainder after a breakdown).
    r : Tensor[n]
        Starting residual (orthogonal to ``C``), contiguous, the values' dtype, not in ``basis``.
    kc : int
        Recycled vectors (>= 0).
    steps : int
        Maximum number of steps (>= 1).
    beta : float
        ``||r||`` (> 0).
    target : float
        Stop once ``|g_{j+1}| <= target`` (>= 0).
    bnorm : float
        ``||b||`` (> 0), to make the history relative.
    n_chunks : int, optional
        Split the n entries into this many tasks, in ``[1, n]`` (default: by work, at most
        ``torch.get_num_threads()``); results depend on it at rounding level only.

    Returns
    -------
    hessenberg : Tensor[kc + steps + 1, steps] float64
        Columns ``[:j]``: ``B = C^T A V`` in rows ``[:kc]``, the unrotated ``Hbar`` below (0 elsewhere).
    rotated : Tensor[steps, steps] float64
        ``[:j, :j]``: the upper-triangular Givens factor ``R`` of ``Hbar``.
    g : Tensor[steps + 1] float64
        ``[:j + 1]``: ``beta e1`` rotated (``|g[j]|`` is the residual estimate).
    history : Tensor[steps] float64
        ``[:j]``: ``|g[i + 1]| / bnorm`` after each step.
    info : Tensor[2] int64
        ``(j, breakdown)``: the steps taken, and 1 when the Krylov space became invariant.

    Raises
    ------
    ValueError
        An argument of the wrong shape, dtype, device or layout, or out of range.
    """
    op = "krylov_arnoldi_"
    kc = require_int(op, "kc", kc, 0)
    steps = require_int(op, "steps", steps, 1)
    beta = _check_float(op, "beta", beta, positive=True)
    target = _check_float(op, "target", target, positive=False)
    bnorm = _check_float(op, "bnorm", bnorm, positive=True)
    n = _cpu_square_pattern(op, row_ptr, col_idx, values, "the solvers run the cycle step by step")
    _check_float_tensor(op, "basis", basis, 2)
    _check_float_tensor(op, "r", r, 1)
    _check_like(op, "values", values, basis=basis, r=r)
    if basis.shape[0] < kc + steps + 1 or basis.shape[1] != n:
        _fail(op, f"basis has shape {tuple(basis.shape)}; expected (>= kc + steps + 1, n) = (>= {kc + steps + 1}, {n})")
    require_rows_apart(op, "basis", basis)
    if r.untyped_storage().data_ptr() == basis.untyped_storage().data_ptr():
        _fail(op, "r must not share memory with basis (the cycle overwrites the basis rows)")
    require_apart(op, "basis", basis, row_ptr=row_ptr, col_idx=col_idx, values=values)  # the matrix is read throughout
    if r.shape != (n,) or not r.is_contiguous():
        _fail(op, f"r has shape {tuple(r.shape)} (contiguous: {r.is_contiguous()}); expected a contiguous ({n},)")
    n_chunks = _check_n_chunks(op, n_chunks, n)
    return arnoldi_unchecked(row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(), basis, r, kc, steps, beta,
                             target, bnorm, n_chunks)


def arnoldi_unchecked(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, basis: torch.Tensor,
                      r: torch.Tensor, kc: int, steps: int, beta: float, target: float, bnorm: float,
                      n_chunks: Optional[int] = None):
    """``krylov_arnoldi_`` for valid arguments (what :func:`arnoldi_cpu` checks; contiguous CSR arrays)."""
    n = basis.shape[1]
    threads = torch.get_num_threads()
    if n_chunks is None:
        n_chunks = max(1, min(threads, (kc + steps + 1) * n // _WORK_PER_TASK))
    hessenberg = torch.zeros(kc + steps + 1, steps, dtype=torch.float64)  # the kernel wants its outputs zeroed
    rotated = torch.zeros(steps, steps, dtype=torch.float64)
    g = torch.zeros(steps + 1, dtype=torch.float64)
    history = torch.zeros(steps, dtype=torch.float64)
    givens = torch.empty(2 * steps, dtype=torch.float64)
    info = torch.empty(2, dtype=torch.int64)
    info_entries = info.numpy()  # written after the kernel through numpy: torch calls run cache-cold after it
    ext = extension()
    workspace = torch.empty(ext.krylov_arnoldi_workspace(kc=kc, steps=steps, n_chunks=n_chunks), dtype=basis.dtype)
    taken, breakdown = ext.krylov_arnoldi_cpu(
        row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(), values=values.data_ptr(), basis=basis.data_ptr(),
        r=r.data_ptr(), hessenberg=hessenberg.data_ptr(), rotated=rotated.data_ptr(), g=g.data_ptr(),
        givens=givens.data_ptr(), history=history.data_ptr(), workspace=workspace.data_ptr(), n=n,
        nnz=col_idx.numel(), q_stride=basis.stride(0), kc=kc, steps=steps, n_chunks=n_chunks, beta=beta,
        target=target, bnorm=bnorm, dtype=FLOAT_CODES[basis.dtype], index_type=INDEX_CODES[row_ptr.dtype],
        num_threads=threads)
    info_entries[0], info_entries[1] = taken, breakdown
    return hessenberg, rotated, g, history, info


def _arnoldi_fake(row_ptr, col_idx, values, basis, r, kc, steps, beta, target, bnorm, n_chunks=None):
    def new(*shape, dtype=torch.float64):
        return basis.new_empty(shape, dtype=dtype)

    return new(kc + steps + 1, steps), new(steps, steps), new(steps + 1), new(steps), new(2, dtype=torch.int64)


LIBRARY.impl("krylov_arnoldi_", arnoldi_cpu, "CPU")
register_fake("krylov_arnoldi_", _arnoldi_fake)


# ---------------------------------------------------------------------------- conjugate gradients (CPU)
def cg_cpu(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
           inverse_diagonal: Optional[torch.Tensor], x: torch.Tensor, r: torch.Tensor, steps: int, target: float,
           bnorm: float, n_chunks: Optional[int] = None):
    """CPU impl of ``krylov_cg_``: up to ``steps`` CG iterations on a CSR matrix in one kernel call.

    The C++ loop (``krylov_cg_cpu``, csrc/cpu/krylov_cpu.cpp; contract in
    csrc/include/lowrank_ops/krylov.h) does per step what :func:`lowrank_ops.krylov.cg`
    does with ~10 torch and kernel calls: ``q = A p`` with ``p . q``; breakdown unless
    ``p . q > 0`` and ``r . z > 0``; the updates of x, r and ``z = d r`` with ``||r||^2`` and
    ``r . z``; the stopping test; the new direction.  It restarts from ``p = z = d r``.

    Parameters
    ----------
    row_ptr, col_idx, values : Tensor[n + 1], Tensor[nnz], Tensor[nnz]
        The square SPD CSR operator ``[n, n]`` (n >= 1) on the CPU: int32 or int64 indices
        of one dtype, float32 or float64 values.
    inverse_diagonal : Tensor[n] or None
        The diagonal of ``M^{-1}`` (values' dtype), or None for no preconditioner.
    x, r : Tensor[n]
        The iterate and its residual ``b - A x`` (values' dtype, contiguous, not sharing
        memory); updated in place.
    steps : int
        Maximum number of iterations (>= 1).
    target : float
        Stop once ``||r|| <= target`` (>= 0).
    bnorm : float
        ``||b||`` (> 0), to make the history relative.
    n_chunks : int, optional
        Split the n entries into this many tasks, in ``[1, n]`` (default: by work, at most
        ``torch.get_num_threads()``); results depend on it at rounding level only.

    Returns
    -------
    history : Tensor[steps] float64
        ``[:j]``: ``||r|| / bnorm`` after each of the j steps taken.
    info : Tensor[2] int64
        ``(j, status)``: status 0 when ``||r|| <= target``, 1 when the steps ran out, 2 on
        breakdown (``p . q <= 0`` or ``r . z <= 0``: not positive definite; or not finite).

    Raises
    ------
    ValueError
        An argument of the wrong shape, dtype, device or layout, or out of range.
    """
    op = "krylov_cg_"
    steps = require_int(op, "steps", steps, 1)
    target = _check_float(op, "target", target, positive=False)
    bnorm = _check_float(op, "bnorm", bnorm, positive=True)
    n = _cpu_square_pattern(op, row_ptr, col_idx, values, "cg runs step by step")
    vectors = {"x": x, "r": r} if inverse_diagonal is None else {"x": x, "r": r, "inverse_diagonal": inverse_diagonal}
    for name, tensor in vectors.items():
        _check_float_tensor(op, name, tensor, 1)
        _check_like(op, "values", values, **{name: tensor})
        if tensor.shape != (n,):
            _fail(op, f"{name} has shape {tuple(tensor.shape)}; expected (n,) = ({n},)")
    _require_contiguous(op, "x", x)
    _require_contiguous(op, "r", r)
    # x and r are written while everything is read (an inverse_diagonal sharing x's memory
    # changed under the kernel: a false breakdown).
    read = {"x": x, "r": r, "values": values}
    if inverse_diagonal is not None:
        read["inverse_diagonal"] = inverse_diagonal
    for name, tensor in (("x", x), ("r", r)):
        require_apart(op, name, tensor, **{key: value for key, value in read.items() if key != name})
    n_chunks = _check_n_chunks(op, n_chunks, n)
    diagonal = None if inverse_diagonal is None else inverse_diagonal.contiguous()
    return cg_unchecked(row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(), diagonal, x, r, steps, target,
                        bnorm, n_chunks)


def cg_unchecked(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                 inverse_diagonal: Optional[torch.Tensor], x: torch.Tensor, r: torch.Tensor, steps: int,
                 target: float, bnorm: float, n_chunks: Optional[int] = None):
    """``krylov_cg_`` for valid arguments (what :func:`cg_cpu` checks; contiguous tensors)."""
    n = x.numel()
    threads = torch.get_num_threads()
    if n_chunks is None:  # ~6 vectors and the matrix touched per step
        n_chunks = max(1, min(threads, (6 * n + col_idx.numel()) // _WORK_PER_TASK, n))
    p, q = torch.empty(n, dtype=x.dtype), torch.empty(n, dtype=x.dtype)
    z = None if inverse_diagonal is None else torch.empty(n, dtype=x.dtype)
    history = torch.zeros(steps, dtype=torch.float64)
    workspace = torch.empty(2 * n_chunks, dtype=x.dtype)
    info = _run_cg_loop(row_ptr, col_idx, values, inverse_diagonal, x, r, p, q, z, history, workspace, steps,
                        n_chunks, target, bnorm)
    return history, info


def _run_cg_loop(row_ptr, col_idx, values, inverse_diagonal, x, r, p, q, z, history, workspace, steps, n_chunks,
                 target, bnorm, **extended) -> torch.Tensor:
    """One ``krylov_cg_cpu`` call (plain CG, or deflated CG with ``extended``'s pointers and
    sizes); returns ``info`` = (steps taken, status) as an int64 tensor."""
    taken, status = extension().krylov_cg_cpu(
        row_ptr=row_ptr.data_ptr(), col_idx=col_idx.data_ptr(), values=values.data_ptr(),
        inverse_diagonal=0 if inverse_diagonal is None else inverse_diagonal.data_ptr(), x=x.data_ptr(),
        r=r.data_ptr(), p=p.data_ptr(), q=q.data_ptr(), z=0 if inverse_diagonal is None else z.data_ptr(),
        history=history.data_ptr(), workspace=workspace.data_ptr(), n=x.numel(), nnz=col_idx.numel(), steps=steps,
        n_chunks=n_chunks, target=target, bnorm=bnorm, dtype=FLOAT_CODES[x.dtype],
        index_type=INDEX_CODES[row_ptr.dtype], num_threads=torch.get_num_threads(), **extended)
    return torch.tensor([taken, status], dtype=torch.int64)


def _cg_fake(row_ptr, col_idx, values, inverse_diagonal, x, r, steps, target, bnorm, n_chunks=None):
    return x.new_empty((steps,), dtype=torch.float64), x.new_empty((2,), dtype=torch.int64)


LIBRARY.impl("krylov_cg_", cg_cpu, "CPU")
register_fake("krylov_cg_", _cg_fake)


# ---------------------------------------------------------------------------- the deflated CG loop (CPU)
def defcg_cpu(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
              inverse_diagonal: Optional[torch.Tensor], x: torch.Tensor, r: torch.Tensor, p: torch.Tensor,
              z: torch.Tensor, rho: torch.Tensor, deflation: torch.Tensor, deflation_product: torch.Tensor,
              record: torch.Tensor, steps: int, target: float, bnorm: float, resume: bool,
              n_chunks: Optional[int] = None, reproject_below: float = 0.0):
    """CPU impl of ``krylov_defcg_``: up to ``steps`` deflated CG iterations on a CSR matrix, one kernel call.

    :func:`cg_cpu`'s loop (the same C++ function, ``krylov_cg_cpu``) with what
    :class:`~lowrank_ops.krylov.DeflatedCG` adds per step: each direction is made
    ``A``-conjugate to the deflation space, ``p = z + beta p - W (AW^T z)`` (``kc`` dots fused
    into the update pass, ``kc`` axpys into the direction pass), and the first
    ``record.shape[0]`` steps write their Lanczos vectors ``z_j / sqrt(r_j . z_j)`` to
    ``record``'s rows; each step's ``alpha`` and ``beta`` come back, from which the caller
    builds the Lanczos matrix.  The state (``p``, ``z``, ``rho = r . z``) stays in the
    caller's tensors, so a call can resume where the previous one stopped (after the
    caller restarted its Lanczos record).

    Parameters
    ----------
    row_ptr, col_idx, values, inverse_diagonal
        As :func:`cg_cpu`.
    x, r : Tensor[n]
        The iterate and its residual, updated in place (contiguous, apart).
    p : Tensor[n]
        The search direction: read when ``resume``, written (contiguous).
    z : Tensor[n]
        ``M^{-1} r`` with a preconditioner (read when ``resume``, written); unused without one
        (``z`` is ``r`` then).
    rho : Tensor[1] float64
        ``r . z``: read when ``resume``; receives that of the final ``r``.
    deflation, deflation_product : Tensor[kc, n]
        ``W`` (``W^T A W = I``) and ``AW = A W`` as rows; ``kc = 0``: plain CG.
    record : Tensor[rows, n]
        Contiguous; row ``j < rows`` receives step ``j``'s Lanczos vector.
    steps, target, bnorm, n_chunks
        As :func:`cg_cpu`.
    resume : bool
        Continue from ``p``, ``z``, ``rho``; otherwise start from ``z = M^{-1} r``,
        ``p = z - W (AW^T z)``.
    reproject_below : float
        ``>= 0`` (default 0: never): steps that end with ``||r|| < reproject_below`` restore
        ``W^T r = 0`` (``x += W c``, ``r -= AW c``, ``c = W^T r``) before the next direction
        (``beta`` from the projected ``r``): the drift of ``W^T r`` is at the level of CG's
        attainable accuracy, where the deflated iteration otherwise diverges (krylov.h).

    Returns
    -------
    history, alphas, betas : Tensor[steps] float64
        ``[:j]``: each step's ``||r|| / bnorm``, ``alpha`` and ``beta``.
    info : Tensor[2] int64
        ``(j, status)``, as :func:`cg_cpu`.  ``p`` holds the next direction when status is 1.
    """
    op = "krylov_defcg_"
    steps = require_int(op, "steps", steps, 1)
    target = _check_float(op, "target", target, positive=False)
    bnorm = _check_float(op, "bnorm", bnorm, positive=True)
    reproject_below = _check_float(op, "reproject_below", reproject_below, positive=False)
    n = _cpu_square_pattern(op, row_ptr, col_idx, values, "DeflatedCG runs step by step")
    vectors = {"x": x, "r": r, "p": p, "z": z}
    if inverse_diagonal is not None:
        vectors["inverse_diagonal"] = inverse_diagonal
    for name, tensor in vectors.items():
        _check_float_tensor(op, name, tensor, 1)
        _check_like(op, "values", values, **{name: tensor})
        if tensor.shape != (n,):
            _fail(op, f"{name} has shape {tuple(tensor.shape)}; expected (n,) = ({n},)")
    for name, tensor in (("deflation", deflation), ("deflation_product", deflation_product), ("record", record)):
        _check_float_tensor(op, name, tensor, 2)
        _check_like(op, "values", values, **{name: tensor})
        if tensor.shape[1] != n:
            _fail(op, f"{name} has shape {tuple(tensor.shape)}; expected (rows, n) = (rows, {n})")
    _require_contiguous(op, "record", record)
    deflation, deflation_product = deflation.contiguous(), deflation_product.contiguous()  # read only
    if deflation_product.shape != deflation.shape:
        _fail(op, f"deflation_product has shape {tuple(deflation_product.shape)}; expected {tuple(deflation.shape)} "
                  "(as deflation)")
    require_tensors(op, rho=rho)
    if rho.shape != (1,) or rho.dtype != torch.float64 or rho.device.type != "cpu":
        _fail(op, f"rho has shape {tuple(rho.shape)}, dtype {rho.dtype} on {rho.device}; expected (1,) float64 on cpu")
    written = {"x": x, "r": r, "p": p, "z": z, "rho": rho, "record": record}  # (record: checked above)
    read = dict(written, values=values, deflation=deflation, deflation_product=deflation_product)
    if inverse_diagonal is not None:
        read["inverse_diagonal"] = inverse_diagonal
    for name, tensor in written.items():
        if name == "z" and inverse_diagonal is None:
            continue  # unused
        _require_contiguous(op, name, tensor)
        require_apart(op, name, tensor, **{k: v for k, v in read.items()
                                            if k != name and not (k == "z" and inverse_diagonal is None)})
    n_chunks = _check_n_chunks(op, n_chunks, n)
    diagonal = None if inverse_diagonal is None else inverse_diagonal.contiguous()
    return defcg_unchecked(row_ptr.contiguous(), col_idx.contiguous(), values.contiguous(), diagonal, x, r, p, z, rho,
                           deflation, deflation_product, record, steps, target, bnorm, bool(resume), n_chunks,
                           reproject_below)


def defcg_unchecked(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                    inverse_diagonal: Optional[torch.Tensor], x: torch.Tensor, r: torch.Tensor, p: torch.Tensor,
                    z: torch.Tensor, rho: torch.Tensor, deflation: torch.Tensor, deflation_product: torch.Tensor,
                    record: torch.Tensor, steps: int, target: float, bnorm: float, resume: bool,
                    n_chunks: Optional[int] = None, reproject_below: float = 0.0):
    """``krylov_defcg_`` for valid arguments (what :func:`defcg_cpu` checks; contiguous tensors)."""
    n, kc = x.numel(), deflation.shape[0]
    threads = torch.get_num_threads()
    if n_chunks is None:  # ~6 vectors, the matrix and 2 kc deflation rows touched per step
        n_chunks = max(1, min(threads, ((6 + 2 * kc) * n + col_idx.numel()) // _WORK_PER_TASK, n))
    q = torch.empty(n, dtype=x.dtype)
    history, alphas, betas = (torch.zeros(steps, dtype=torch.float64) for _ in range(3))
    workspace = torch.empty(n_chunks * (2 + kc), dtype=x.dtype)
    info = _run_cg_loop(
        row_ptr, col_idx, values, inverse_diagonal, x, r, p, q, z, history, workspace, steps, n_chunks, target, bnorm,
        deflation=deflation.data_ptr() if kc else 0, deflation_product=deflation_product.data_ptr() if kc else 0,
        deflation_rows=kc, record=record.data_ptr() if record.shape[0] else 0, record_rows=record.shape[0],
        alphas=alphas.data_ptr(), betas=betas.data_ptr(), rho=rho.data_ptr(), resume=resume,
        reproject_below=reproject_below)
    return history, alphas, betas, info


def _defcg_fake(row_ptr, col_idx, values, inverse_diagonal, x, r, p, z, rho, deflation, deflation_product, record,
                steps, target, bnorm, resume, n_chunks=None, reproject_below=0.0):
    history = x.new_empty((steps,), dtype=torch.float64)
    return history, torch.empty_like(history), torch.empty_like(history), x.new_empty((2,), dtype=torch.int64)


LIBRARY.impl("krylov_defcg_", defcg_cpu, "CPU")
register_fake("krylov_defcg_", _defcg_fake)
