"""Restarted GMRES(m) with right preconditioning."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._common import Preconditioner, check_positive_int, setup_system
from .gcrodr import GCRODR
from .info import SolveInfo

__all__ = ["gmres"]


def gmres(A, b, *, x0=None, tol: Optional[float] = None, restart: int = 30, maxiter: Optional[int] = None,
          M: Preconditioner = None, atol: float = 0.0,
          callback: Optional[Callable[[float], object]] = None) -> Tuple[torch.Tensor, SolveInfo]:
    """Solve ``A x = b`` with restarted GMRES(``restart``).

    Arnoldi with classical Gram-Schmidt and selective reorthogonalization (BLAS-2),
    Givens rotations for the running residual, the residual recomputed from ``x`` at
    every restart.  It is GCRO-DR with no recycled vectors (:class:`GCRODR` ``(m, 0)``).
    On the CPU, with a matrix (or a matrix and ``M='jacobi'`` or a diagonal ``M``), each
    restart cycle runs as one C++ call; with a callable ``A`` or ``M``, or on CUDA, step by step.

    Parameters
    ----------
    A : CSRMatrix, torch sparse or dense matrix, scipy.sparse matrix or callable
        Square ``[n, n]``.
    b : Tensor[n] or array
        Right-hand side (finite).  float64 on the CPU unless ``b`` (or ``A``) is a
        float32 or CUDA tensor.
    x0 : Tensor[n], optional
        Initial guess (default zero).
    tol : float, optional
        Relative tolerance (> 0), as scipy's ``rtol``; default (None) 1e-8 in float64,
        1e-5 in float32 (:data:`~lowrank_ops.krylov._common.DEFAULT_TOL`): stop when
        ``||b - A x|| <= max(tol ||b||, atol)``.
    restart : int
        Krylov directions per cycle, ``m`` (at most n are used, as in scipy).
    maxiter : int, optional
        Iteration budget (Arnoldi steps over all cycles); default ``10 n``.
    M : None, 'jacobi', Tensor[n] or callable
        Right preconditioner (see :class:`GCRODR`).
    atol : float
        Absolute tolerance (finite, >= 0; default 0), as scipy's ``atol``.
    callback : callable, optional
        ``callback(residual)`` once per Arnoldi step with its relative residual norm (a
        float; scipy's ``callback_type="pr_norm"``): the values of ``info.residuals[1:]``,
        in order, each cycle's after the cycle (see :meth:`GCRODR.solve`).

    Returns
    -------
    x : Tensor[n]
    info : SolveInfo
    """
    restart = check_positive_int("gmres", "restart", restart)
    if maxiter is not None:
        check_positive_int("gmres", "maxiter", maxiter)
    system = setup_system("gmres", A, b, x0, tol, M, atol, callback)
    # GCRODR uses at most n directions per cycle, as scipy's gmres (restart=2**40 asked for a 44 TB basis).
    return GCRODR(restart, 0, M=M, maxiter=maxiter)._solve(system)
