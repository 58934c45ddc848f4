"""Preconditioned conjugate gradients for symmetric positive definite systems."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..ops import krylov as _ops
from ..ops._library import eager_or_op
from ._cg_loop import python_loop
from ._common import (Preconditioner, Progress, Stagnation, System, check_positive_int, conclude, setup_system,
                      steps_per_call)
from .info import SolveInfo

__all__ = ["cg"]

#: Run the C++ loop (``krylov_cg_``) where it applies: a CSR matrix on the CPU, no or a
#: diagonal preconditioner.  Tests switch it off to compare with the Python loop.
NATIVE = True
_NATIVE_STATUS = ("converged", "maxiter", "breakdown")  # krylov_cg's status codes


def cg(A, b, *, x0=None, tol: Optional[float] = None, maxiter: Optional[int] = None,
       M: Preconditioner = None, atol: float = 0.0,
       callback: Optional[Callable[[float], object]] = None) -> Tuple[torch.Tensor, SolveInfo]:
    """Solve an SPD system ``A x = b`` with (preconditioned) conjugate gradients.

    Parameters
    ----------
    A : CSRMatrix, torch sparse or dense matrix, scipy.sparse matrix or callable
        Symmetric positive definite ``[n, n]``.
    b : Tensor[n] or array
        Right-hand side (finite).
    x0 : Tensor[n], optional
        Initial guess (default zero).
    tol : float, optional
        Relative tolerance (> 0), as scipy's ``rtol``; default (None) 1e-8 in float64,
        1e-5 in float32 (:data:`~lowrank_ops.krylov._common.DEFAULT_TOL`): stop when
        ``||b - A x|| <= max(tol ||b||, atol)``; checked on the recursively updated
        residual, then confirmed on the recomputed one (CG continues if the two have
        drifted apart).
    maxiter : int, optional
        Iteration budget; default ``10 n``.
    M : None, 'jacobi', Tensor[n] or callable
        SPD preconditioner ``M^{-1}`` (a diagonal, ``'jacobi'`` or a callable).
    atol : float
        Absolute tolerance (finite, >= 0; default 0), as scipy's ``atol``.
    callback : callable, optional
        ``callback(residual)`` once per iteration with its relative residual norm (a float;
        scipy's ``callback_type="pr_norm"``): exactly the values of ``info.residuals[1:]``,
        in order (the recursive residual, or the recomputed true one where CG confirmed
        convergence on it).  In the C++ loop the calls for the iterations of one kernel
        call are made after it returns (after the fact, each iteration's residual in
        order); in the Python loop at the start of the next iteration.  Exceptions
        propagate.

    Returns
    -------
    x : Tensor[n]
    info : SolveInfo
        ``status="breakdown"`` when ``p^T A p <= 0`` (A is not positive definite) or A or M
        returned non-finite values; ``"stagnation"`` when the true residual levelled off
        above the target (:class:`~lowrank_ops.krylov._common.Stagnation`: float32 at its
        attainable accuracy), ``x`` then being the iterate with the smallest confirmed
        true residual.

    Notes
    -----
    On the CPU, with a CSR matrix and no or a diagonal preconditioner, the iterations run
    in C++ (the op ``krylov_cg_``): one call until the recursive residual meets the
    tolerance, instead of ~10 torch and kernel calls per iteration.  Darcy, tol 1e-8,
    2-core Xeon (quiet), median of 7: 32 x 32 (178 iterations) 1.0 ms against 11 ms for the
    Python loop and 3.5-3.7 ms for ``scipy.sparse.linalg.cg``; 64 x 64 (350) 6.5 against
    17-30 and 13 ms; 128 x 128 (698) 53-54 against 155-157 and 129-130 ms.
    Elsewhere (CUDA, callable preconditioners or operators) the same steps run from the
    kernel ops (:func:`~lowrank_ops.krylov._cg_loop.python_loop`, DeflatedCG's loop without
    deflation), with one host read per iteration (on CUDA one wait for the device): the
    step length stays on the device and the scalars the loop tests are read together.
    """
    if maxiter is not None:
        check_positive_int("cg", "maxiter", maxiter)
    system = setup_system("cg", A, b, x0, tol, M, atol, callback)
    bnorm = system.bnorm
    if bnorm == 0.0:
        return torch.zeros_like(system.b), SolveInfo(True, 0, 0, [0.0], 0.0, "zero_rhs")
    maxiter = maxiter if maxiter is not None else 10 * system.A.n
    target = system.target
    x = system.x0.contiguous()  # the C++ loop updates it in place
    r = system.residual(x)
    rnorm = float(torch.linalg.vector_norm(r))
    history = [rnorm / bnorm]
    progress = Progress(system.callback, history)
    stagnation = Stagnation(x, rnorm)  # never return worse than the start
    matrix = system.A.matrix
    if (NATIVE and matrix is not None and not x.is_cuda and matrix.dtype == x.dtype
            and (system.precondition is None or system.inverse_diagonal is not None)):
        iterations, status = _native_loop(system, x, r, rnorm, maxiter, target, progress, stagnation)
    else:
        iterations, status = python_loop(system, x, r, rnorm, maxiter, progress, stagnation)
    progress.report()
    x, rnorm = stagnation.best_solution(x, float(torch.linalg.vector_norm(system.residual(x))))
    converged, status = conclude(status, rnorm, target)
    return system.solution(x), SolveInfo(converged, iterations, system.matvecs, history, rnorm / bnorm, status)


def _native_loop(system: System, x: torch.Tensor, r: torch.Tensor, rnorm: float, maxiter: int, target: float,
                 progress: Progress, stagnation: Stagnation) -> Tuple[int, str]:
    """CG in C++ (``krylov_cg_``), restarted from the true residual when the recursive one
    met the target but the true one did not (or stopped as ``"stagnation"``, :class:`Stagnation`).
    Updates ``x``, ``stagnation`` and ``progress.history`` (reporting each kernel call's
    entries once final); returns ``(iterations, status)``."""
    matrix, bnorm, history = system.A.matrix, system.bnorm, progress.history
    diagonal = None if system.inverse_diagonal is None else system.inverse_diagonal.contiguous()
    kernel = eager_or_op("krylov_cg_", _ops.cg_unchecked)
    iterations = 0
    while True:
        progress.report()
        if rnorm <= target:  # r is the true residual here
            return iterations, "converged"
        if iterations >= maxiter:
            return iterations, "maxiter"
        relative, info = kernel(matrix.row_ptr, matrix.col_idx, matrix.values, diagonal, x, r.contiguous(),
                                min(maxiter - iterations, steps_per_call(system.A.n)), target, bnorm)
        taken, code = info.tolist()
        history.extend(relative[:taken].tolist())
        iterations += taken
        system.matvecs += taken
        status = _NATIVE_STATUS[code]
        if status == "breakdown" or (status == "maxiter" and iterations >= maxiter):
            return iterations, status
        # Converged on the recursive residual: confirm on the true one; or the call's steps
        # ran out before maxiter: restart from the true residual.
        r = system.residual(x)
        rnorm = float(torch.linalg.vector_norm(r))
        history[-1] = rnorm / bnorm
        if status == "converged" and rnorm > target and stagnation.failed_confirmation(x, rnorm):
            return iterations, "stagnation"

