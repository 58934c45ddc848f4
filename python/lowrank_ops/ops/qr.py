"""CholeskyQR's steps as ops, on hand-written CPU kernels (csrc/cpu/qr_cpu.cpp).

* ``tall_gram(Y) -> G``: ``G = Y^T Y``.
* ``tall_solve_upper(Y, R) -> Q``: ``Q = Y R^-1`` (``Q R = Y``) for an upper-triangular R,
  by forward substitution along each row (BLAS xTRSM's arithmetic), Q column-major;
  ``tall_solve_upper_(Y, R)`` writes Q into Y, in Y's layout.
* ``tall_cholesky(G, rows, shift) -> R``: a pass's factor, with its shift and fallback.
* ``tall_scale_(Y) -> scale``: the exact power-of-two scaling, in place.
* ``cholesky_qr_(Y, shift, plain_passes) -> R``: all of it, Y becoming Q, in one call.

:func:`lowrank_ops.linalg.cholesky_qr2` and rsvd's orthonormalizations run
``cholesky_qr_`` on the CPU (float32 blocks' first pass in float64), on blocks such as
rsvd's 4096 x 74 bases (rank 64): there
MKL's GEMM and TRSM run far below their rates on large matrices (74 columns are a short
dimension for their blocking), the layout copies around them and the first touch of
fresh temporaries cost as much again, and torch's dozen small ops per Cholesky factor
cost ten times the factorization.  The kernels take row- or column-major blocks.
Measured against torch on the 2-core AMD EPYC (bench/bench_qr.py,
bench/results/cpu-amd-epyc-2core/qr-full; float32, 4096 x 74): Gram 0.18 against 0.33-0.36
ms, solve 0.22-0.25 against 0.39-0.48 ms, the whole cholesky_qr2 1.3-2.0x
``torch.linalg.qr``.  CUDA: torch's ops (cuBLAS, cuSOLVER) with the same output layouts.
"""
from __future__ import annotations

import torch

from .._args import is_integer
from .._dtypes import float_code
from .._extension import extension
from ._layout import require_apart
from ._library import LIBRARY, checked_impl, eager_or_op, register_fake, values_readable

__all__ = ["cholesky_qr_", "tall_cholesky", "tall_gram", "tall_scale_", "tall_solve_upper", "tall_solve_upper_"]

LIBRARY.define("tall_gram(Tensor Y) -> Tensor")
LIBRARY.define("tall_solve_upper(Tensor Y, Tensor R) -> Tensor")
LIBRARY.define("tall_solve_upper_(Tensor(a!) Y, Tensor R) -> ()")
LIBRARY.define("tall_cholesky(Tensor gram, int rows, bool shift) -> Tensor")
LIBRARY.define("tall_scale_(Tensor(a!) Y) -> Tensor")
LIBRARY.define("cholesky_qr_(Tensor(a!) Y, bool shift, int plain_passes) -> Tensor")


def _blocks(Y: torch.Tensor) -> torch.Tensor:
    """Y as ``[batch, m, n]`` with a unit row or column stride (a copy only when Y has neither,
    or batch dimensions that do not merge)."""
    Y3 = Y.reshape(Y.shape[:-2].numel(), *Y.shape[-2:])
    if Y3.stride(-1) != 1 and Y3.stride(-2) != 1:
        Y3 = Y3.contiguous()
    return Y3


def _tall_gram_cpu(Y: torch.Tensor) -> torch.Tensor:
    m, n = Y.shape[-2:]
    Y3 = _blocks(Y)
    gram = Y.new_empty(Y3.shape[0], n, n)
    extension().tall_gram_cpu(
        y=Y3.data_ptr(), gram=gram.data_ptr(), batch=Y3.shape[0], rows=m, cols=n, y_batch_stride=Y3.stride(0),
        y_row_stride=Y3.stride(1), y_col_stride=Y3.stride(2), dtype=float_code(Y.dtype, "tall_gram", "Y"),
        num_threads=torch.get_num_threads(),
    )
    return gram.reshape(*Y.shape[:-2], n, n)


def gram_full_precision(Y: torch.Tensor) -> torch.Tensor:
    """``Y^T Y`` in Y's precision even where float32 matmuls may run in TF32
    (``torch.set_float32_matmul_precision("high")`` or ``"medium"``: CUDA tensor cores with
    a 10-bit mantissa, or bfloat16 passes): CholeskyQR's Q is then orthonormal only to the
    Gram matrix's ~1e-3, so the product runs in float64 there (cheap on A100 / H100 / H200;
    1/32-1/64 rate on consumer GPUs)."""
    if Y.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        wide = Y.double()
        return (wide.mT @ wide).float()
    return Y.mT @ Y


def _tall_gram_cuda(Y: torch.Tensor) -> torch.Tensor:
    # Mirrored from the upper triangle: cuBLAS promises no bitwise symmetry (split-K, tiles).
    gram = gram_full_precision(Y).triu()
    return gram + gram.triu(1).mT


def _tall_gram_fake(Y: torch.Tensor) -> torch.Tensor:
    n = Y.shape[-1]
    return Y.new_empty(*Y.shape[:-2], n, n)


def _run_solve(Y3: torch.Tensor, R: torch.Tensor, Q3: torch.Tensor) -> None:
    """The kernel on ``[batch, m, n]`` views (Q3 may be Y3: in place)."""
    batch, m, n = Y3.shape
    R3 = R.reshape(batch, n, n)
    extension().tall_solve_upper_cpu(
        y=Y3.data_ptr(), r=R3.data_ptr(), q=Q3.data_ptr(), batch=batch, rows=m, cols=n,
        y_batch_stride=Y3.stride(0), y_row_stride=Y3.stride(1), y_col_stride=Y3.stride(2),
        r_batch_stride=R3.stride(0), r_row_stride=R3.stride(1), r_col_stride=R3.stride(2),
        q_batch_stride=Q3.stride(0), q_row_stride=Q3.stride(1), q_col_stride=Q3.stride(2),
        dtype=float_code(Y3.dtype, "tall_solve_upper", "Y"), num_threads=torch.get_num_threads(),
    )


def _tall_solve_upper_cpu(Y: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    m, n = Y.shape[-2:]
    Y3 = _blocks(Y)
    Qt = Y.new_empty(Y3.shape[0], n, m)
    _run_solve(Y3, R, Qt.mT)
    return Qt.reshape(*Y.shape[:-2], n, m).mT


def _tall_solve_upper_cuda(Y: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    # Q^T = R^-T Y^T: cuBLAS's solve, then Q^T made contiguous (Q column-major, as on the CPU).
    return torch.linalg.solve_triangular(R.mT, Y.mT, upper=False).contiguous().mT


def _tall_solve_upper_fake(Y: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    m, n = Y.shape[-2:]
    return Y.new_empty(*Y.shape[:-2], n, m).mT


def _tall_solve_upper_inplace_cpu(Y: torch.Tensor, R: torch.Tensor) -> None:
    try:
        Y3 = Y.view(Y.shape[:-2].numel(), *Y.shape[-2:])
    except RuntimeError:  # batch dimensions that do not merge: no [batch, m, n] view of Y
        Y3 = None
    if Y3 is not None and (Y3.stride(-1) == 1 or Y3.stride(-2) == 1):
        _run_solve(Y3, R, Y3)
    else:
        Y.copy_(_tall_solve_upper_cpu(Y, R))


def _tall_solve_upper_inplace_cuda(Y: torch.Tensor, R: torch.Tensor) -> None:
    Y.copy_(torch.linalg.solve_triangular(R, Y, upper=True, left=False))


def _tall_solve_upper_inplace_fake(Y: torch.Tensor, R: torch.Tensor) -> None:
    return None


def shifted_cholesky(gram: torch.Tensor, rows: int, shift: bool) -> torch.Tensor:
    """The factor of a CholeskyQR pass in torch's ops (differentiable; the CUDA impl of
    ``tall_cholesky``, whose CPU kernel follows the same arithmetic: see qr.h).

    Upper-triangular R with ``R^T R = G + sigma I``: the shifted pass's
    ``sigma = 11 (m n + n (n + 1)) u trace(G) + 2 tiny``; the plain pass's ``sigma = tiny``,
    or ``n u trace(G) + tiny`` where that factorization breaks down.
    """
    n = gram.shape[-1]
    unit = torch.finfo(gram.dtype).eps / 2
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    norm2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]  # ||Y||_F^2 >= ||Y||_2^2
    tiny = torch.finfo(gram.dtype).tiny
    if shift:
        gram = gram + (11 * (rows * n + n * (n + 1)) * unit * norm2 + tiny) * eye
    # cholesky_ex: no exception, so no host synchronization to read the info code.
    # Where the Gram matrix is numerically singular (a rank-deficient block, whose
    # rounding makes it indefinite), use a factorization with a roundoff-sized shift
    # instead, so the result stays finite; both are n x n, cheap next to the Gram.
    # upper=True: potrf reads G's upper triangle, as the CPU kernel (the lower one, which
    # the default reads, need not be filled: a Gram matrix from syrk holds one triangle).
    R, info = torch.linalg.cholesky_ex(gram + tiny * eye, upper=True)
    if not shift:
        R_safe, _ = torch.linalg.cholesky_ex(gram + (n * unit * norm2 + tiny) * eye, upper=True)
        R = torch.where((info == 0)[..., None, None], R, R_safe)
    return R


def _tall_cholesky_cpu(gram: torch.Tensor, rows: int, shift: bool) -> torch.Tensor:
    n = gram.shape[-1]
    G3 = gram.reshape(gram.shape[:-2].numel(), n, n).contiguous()
    R = torch.empty_like(G3)
    extension().tall_cholesky_cpu(gram=G3.data_ptr(), r=R.data_ptr(), batch=G3.shape[0], n=n, rows=rows, shift=shift,
                                  dtype=float_code(gram.dtype, "tall_cholesky", "gram"),
                                  num_threads=torch.get_num_threads())
    return R.reshape(gram.shape)


def _tall_cholesky_cuda(gram: torch.Tensor, rows: int, shift: bool) -> torch.Tensor:
    return shifted_cholesky(gram, rows, shift).contiguous()


def _tall_cholesky_fake(gram: torch.Tensor, rows: int, shift: bool) -> torch.Tensor:
    return gram.new_empty(gram.shape)


def power_of_two_scale(Y: torch.Tensor) -> torch.Tensor:
    """``2^(e - 1)`` per matrix ``[..., 1, 1]``, ``e`` the binary exponent of ``max |Y|`` (1 for
    zeros, NaN for a block with a NaN or inf), in torch's ops (the CUDA impl of ``tall_scale_``).

    ``Y`` divided by it has its largest entry in ``[1, 2)``, exactly (a power of two), so
    ``Y^T Y`` can neither overflow nor lose ``Y``'s largest entries to underflow.  Formed
    as ``max |Y| / (2 mantissa)``: a correctly rounded quotient whose exact value is
    representable, so no ``pow`` (not exact on every device) and no float32 overflow at
    ``2^128``.  ``max |Y|`` as ``max(max Y, -min Y)``: no ``|Y|`` temporary.
    """
    if Y.numel() == 0:
        return Y.new_ones(*Y.shape[:-2], 1, 1)
    largest = torch.maximum(Y.amax(dim=(-2, -1), keepdim=True), -Y.amin(dim=(-2, -1), keepdim=True))
    mantissa, _ = torch.frexp(largest)
    return torch.where(largest > 0, largest / (2 * mantissa), torch.ones_like(largest))


def _tall_scale_cpu(Y: torch.Tensor) -> torch.Tensor:
    Y3 = Y.view(Y.shape[:-2].numel(), *Y.shape[-2:])
    scale = Y.new_empty(Y3.shape[0])
    extension().tall_scale_cpu(
        y=Y3.data_ptr(), scale=scale.data_ptr(), batch=Y3.shape[0], rows=Y3.shape[1], cols=Y3.shape[2],
        y_batch_stride=Y3.stride(0), y_row_stride=Y3.stride(1), y_col_stride=Y3.stride(2),
        dtype=float_code(Y.dtype, "tall_scale_", "Y"), num_threads=torch.get_num_threads(),
    )
    return scale.reshape(*Y.shape[:-2], 1, 1)


def _tall_scale_cuda(Y: torch.Tensor) -> torch.Tensor:
    scale = power_of_two_scale(Y)
    Y.div_(scale)
    return scale


def _tall_scale_fake(Y: torch.Tensor) -> torch.Tensor:
    return Y.new_empty(*Y.shape[:-2], 1, 1)


def cholesky_qr_torch(Y: torch.Tensor, shift: bool, plain_passes: int):
    """``(Q, R)``: CholeskyQR in torch's ops, Y unchanged (differentiable; the CUDA impl of
    ``cholesky_qr_``, whose CPU kernel runs the same steps: see qr.h)."""
    scale = power_of_two_scale(Y)
    Y = Y / scale
    R_total = None
    for shifted in (True,) * shift + (False,) * plain_passes:
        R = shifted_cholesky(gram_full_precision(Y), Y.shape[-2], shifted)
        Y = torch.linalg.solve_triangular(R, Y, upper=True, left=False)
        R_total = R if R_total is None else R @ R_total
    return Y, R_total * scale


def _cholesky_qr_cpu(Y: torch.Tensor, shift: bool, plain_passes: int) -> torch.Tensor:
    n = Y.shape[-1]
    Y3 = Y.view(Y.shape[:-2].numel(), *Y.shape[-2:])
    R = Y.new_empty(Y3.shape[0], n, n)
    extension().cholesky_qr_cpu(
        y=Y3.data_ptr(), r=R.data_ptr(), batch=Y3.shape[0], rows=Y3.shape[1], cols=n, y_batch_stride=Y3.stride(0),
        y_row_stride=Y3.stride(1), y_col_stride=Y3.stride(2), shift=shift, plain_passes=plain_passes,
        dtype=float_code(Y.dtype, "cholesky_qr_", "Y"), num_threads=torch.get_num_threads(),
    )
    return R.reshape(*Y.shape[:-2], n, n)


def _cholesky_qr_cuda(Y: torch.Tensor, shift: bool, plain_passes: int) -> torch.Tensor:
    Q, R = cholesky_qr_torch(Y, shift, plain_passes)
    Y.copy_(Q)
    return R.contiguous()


def _cholesky_qr_fake(Y: torch.Tensor, shift: bool, plain_passes: int) -> torch.Tensor:
    n = Y.shape[-1]
    return Y.new_empty(*Y.shape[:-2], n, n)


def _check_block(op: str, name: str, Y: torch.Tensor) -> None:
    if not isinstance(Y, torch.Tensor) or Y.dim() < 2:
        raise ValueError(f"{op}: {name} must be a tensor [..., m, n]; got {getattr(Y, 'shape', type(Y).__name__)}")
    if Y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} has dtype {Y.dtype}; expected float32 or float64")
    if Y.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} is on {Y.device}; expected a CPU or CUDA tensor")


def tall_gram(Y: torch.Tensor) -> torch.Tensor:
    """``Y^T Y`` of a batch of (tall) blocks, not differentiable.

    Parameters
    ----------
    Y : Tensor[..., m, n]
        float32 or float64, any strides (a copy when neither the row nor the column stride is 1).

    Returns
    -------
    Tensor[..., n, n]
        Contiguous, exactly symmetric; zeros for ``m = 0``.
    """
    _check_block("tall_gram", "Y", Y)
    return eager_or_op("tall_gram", _tall_gram_cpu if Y.device.type == "cpu" else _tall_gram_cuda)(Y.detach())


def _check_solve_args(op: str, Y: torch.Tensor, R: torch.Tensor) -> None:
    _check_block(op, "Y", Y)
    _check_block(op, "R", R)
    n = Y.shape[-1]
    if tuple(R.shape) != (*Y.shape[:-2], n, n):
        raise ValueError(f"{op}: R has shape {tuple(R.shape)}; expected (..., n, n) = {(*Y.shape[:-2], n, n)}")
    if R.dtype != Y.dtype or R.device != Y.device:
        raise ValueError(f"{op}: R is {R.dtype} on {R.device}; expected Y's {Y.dtype} on {Y.device}")


def _check_solve_inplace_args(Y: torch.Tensor, R: torch.Tensor) -> None:
    _check_solve_args("tall_solve_upper_", Y, R)
    if Y.requires_grad and torch.is_grad_enabled():
        raise ValueError("tall_solve_upper_: Y requires grad; an in-place solve would discard its history")
    _check_no_shared_elements("tall_solve_upper_", Y)
    if values_readable(Y):  # real storage (not while tracing, not fake or meta tensors)
        # The kernel reads R while it overwrites Y: an R inside Y (Y's top block, CholeskyQR's
        # triangle left in place) gave wrong Q silently (21.8 off at 300 x 32).
        require_apart("tall_solve_upper_", "Y", Y, R=R)


def tall_solve_upper(Y: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``Q = Y R^-1`` for upper-triangular ``R``, not differentiable.

    Parameters
    ----------
    Y : Tensor[..., m, n]
        float32 or float64, any strides.
    R : Tensor[..., n, n]
        Y's batch shape, dtype and device, any strides; only its upper triangle is read.
        Its diagonal must be nonzero (a zero gives inf or NaN, as
        ``torch.linalg.solve_triangular``).

    Returns
    -------
    Tensor[..., m, n]
        Column-major (the transposed view of a contiguous ``[..., n, m]``).
    """
    _check_solve_args("tall_solve_upper", Y, R)
    impl = _tall_solve_upper_cpu if Y.device.type == "cpu" else _tall_solve_upper_cuda
    return eager_or_op("tall_solve_upper", impl)(Y.detach(), R.detach())


def tall_solve_upper_(Y: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """:func:`tall_solve_upper` into Y itself, in Y's layout; returns Y.

    No new ``[..., m, n]`` buffer where Y has a unit row or column stride and batch
    dimensions that merge (else the result of :func:`tall_solve_upper` is copied in).
    """
    _check_solve_inplace_args(Y, R)
    impl = _tall_solve_upper_inplace_cpu if Y.device.type == "cpu" else _tall_solve_upper_inplace_cuda
    eager_or_op("tall_solve_upper_", impl)(Y, R.detach())
    return Y


def tall_cholesky(gram: torch.Tensor, rows: int, shift: bool) -> torch.Tensor:
    """The factor R of a CholeskyQR pass from its Gram matrix, not differentiable (see
    :func:`shifted_cholesky` for the shifts; the CPU kernel is one call where torch's
    composition is a dozen small ops).

    Parameters
    ----------
    gram : Tensor[..., n, n]
        ``Y^T Y`` of a block with ``rows`` rows; float32 or float64; the upper triangle is read.
    rows : int
        m, the block's rows (the shifted pass's shift grows with it).
    shift : bool
        The shifted pass (True) or a plain one.

    Returns
    -------
    Tensor[..., n, n]
        Upper triangular, zeros below the diagonal, contiguous; NaN where no factorization
        succeeds (a non-finite ``gram``).
    """
    _check_cholesky_args(gram, rows, shift)
    impl = _tall_cholesky_cpu if gram.device.type == "cpu" else _tall_cholesky_cuda
    return eager_or_op("tall_cholesky", impl)(gram.detach(), int(rows), bool(shift))


def _check_cholesky_args(gram: torch.Tensor, rows: int, shift: bool) -> None:
    _check_block("tall_cholesky", "gram", gram)
    if gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"tall_cholesky: gram has shape {tuple(gram.shape)}; expected (..., n, n)")
    if not is_integer(rows) or rows < 0:
        raise ValueError(f"tall_cholesky: rows must be an int >= 0; got {rows!r}")


def _strides_apart(Y: torch.Tensor) -> bool:
    """A sufficient test that no two elements of Y share memory: with the dimensions of
    more than one element sorted by stride, each stride exceeds the span of the smaller
    ones (a column slice of a wider matrix passes; an as_strided view whose rows overlap,
    which torch's test calls "too hard", fails)."""
    span = 1
    for size, stride in sorted(((size, abs(stride)) for size, stride in zip(Y.shape, Y.stride()) if size > 1),
                               key=lambda pair: pair[1]):
        if stride < span:
            return False
        span += stride * (size - 1)
    return True


def _check_no_shared_elements(op: str, Y: torch.Tensor) -> None:
    """In-place ops write every element: a Y whose elements share memory (an expand's
    batch stride 0) would have parallel tasks write one block while others read it."""
    # (Traced code skips it: the registered op runs it when the graph executes.)
    if torch.compiler.is_compiling():
        return
    overlap = torch._debug_has_internal_overlap(Y)  # 0 no, 1 yes, 2 "too hard" (any strided view)
    if overlap == 1 or (overlap == 2 and not _strides_apart(Y)):
        raise ValueError(f"{op}: Y has strides {Y.stride()} for shape {tuple(Y.shape)}: elements share memory (an "
                         "expand?); an in-place op needs a block of its own (clone it)")


def _check_dense_inplace(op: str, Y: torch.Tensor) -> None:
    _check_block(op, "Y", Y)
    if Y.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: Y requires grad; an in-place {op.rstrip('_')} would discard its history")
    if not (Y.is_contiguous() or Y.transpose(-2, -1).is_contiguous()):
        raise ValueError(f"{op}: Y has strides {Y.stride()}; expected a contiguous block or the transpose of one")


# Passes beyond the third change nothing (CholeskyQR2 is orthogonal to working precision
# after its second plain pass); the cap turns a typo (2**40) into an error, not a hang.
_MAX_PLAIN_PASSES = 16


def _check_cholesky_qr_args(Y: torch.Tensor, shift: bool, plain_passes: int) -> None:
    _check_dense_inplace("cholesky_qr_", Y)
    if not is_integer(plain_passes) or not (0 if shift else 1) <= plain_passes <= _MAX_PLAIN_PASSES:
        raise ValueError(f"cholesky_qr_: plain_passes must be an int in [{0 if shift else 1}, {_MAX_PLAIN_PASSES}] "
                         f"with shift={shift}; got {plain_passes!r}")


def tall_scale_(Y: torch.Tensor) -> torch.Tensor:
    """Divides each matrix of Y in place by :func:`power_of_two_scale` of it (exact) and
    returns those scales ``[..., 1, 1]``: the first step of CholeskyQR, in one CPU call.

    Parameters
    ----------
    Y : Tensor[..., m, n]
        float32 or float64, a unit row or column stride and batch dimensions that merge
        (a dense block: no element shared, as an ``expand``'s would be); not requiring grad.
    """
    _check_dense_inplace("tall_scale_", Y)
    return eager_or_op("tall_scale_", _tall_scale_cpu if Y.device.type == "cpu" else _tall_scale_cuda)(Y)


def cholesky_qr_(Y: torch.Tensor, shift: bool = True, plain_passes: int = 2) -> torch.Tensor:
    """CholeskyQR of Y in place, every pass in Y's dtype: Y becomes Q; returns R ``[..., n,
    n]`` with ``Y_in = Q R``.  (:func:`lowrank_ops.linalg.cholesky_qr2` runs these passes
    too, but a float32 block's shifted pass as a plain float64 one: in float32 the shift
    is about ``||Y||^2`` on blocks of a few hundred thousand entries, see linalg/qr.py.)

    One CPU call for the scaling and every pass (:func:`tall_scale_`, then per pass
    :func:`tall_gram`, :func:`tall_cholesky` and :func:`tall_solve_upper_`, the same kernels
    and so the same Q): on small blocks the ops' Python wrappers cost more than their
    kernels (1024 x 42 float32: ~50 us of kernels per pass).

    Parameters
    ----------
    Y : Tensor[..., m, n]
        As :func:`tall_scale_`: a dense block, not requiring grad.
    shift : bool
        A shifted first pass.
    plain_passes : int
        Plain passes after it (at least one pass in all).
    """
    _check_cholesky_qr_args(Y, shift, plain_passes)
    impl = _cholesky_qr_cpu if Y.device.type == "cpu" else _cholesky_qr_cuda
    return eager_or_op("cholesky_qr_", impl)(Y, bool(shift), int(plain_passes))


# The registered ops check their arguments (checked_impl).
for _name, _check, _cpu, _cuda, _fake in [
    ("tall_gram", lambda Y: _check_block("tall_gram", "Y", Y), _tall_gram_cpu, _tall_gram_cuda, _tall_gram_fake),
    ("tall_solve_upper", lambda Y, R: _check_solve_args("tall_solve_upper", Y, R), _tall_solve_upper_cpu,
     _tall_solve_upper_cuda, _tall_solve_upper_fake),
    ("tall_solve_upper_", _check_solve_inplace_args, _tall_solve_upper_inplace_cpu, _tall_solve_upper_inplace_cuda,
     _tall_solve_upper_inplace_fake),
    ("tall_cholesky", _check_cholesky_args, _tall_cholesky_cpu, _tall_cholesky_cuda, _tall_cholesky_fake),
    ("tall_scale_", lambda Y: _check_dense_inplace("tall_scale_", Y), _tall_scale_cpu, _tall_scale_cuda,
     _tall_scale_fake),
    ("cholesky_qr_", _check_cholesky_qr_args, _cholesky_qr_cpu, _cholesky_qr_cuda, _cholesky_qr_fake),
]:
    LIBRARY.impl(_name, checked_impl(_check, _cpu), "CPU")
    LIBRARY.impl(_name, checked_impl(_check, _cuda), "CUDA")
    register_fake(_name, _fake)
