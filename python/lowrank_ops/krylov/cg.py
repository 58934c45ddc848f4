"""Preconditioned conjugate gradients for symmetric positive definite systems."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import Preconditioner, check_positive_int, conclude, setup_system
from ._kernels import dots
from .info import SolveInfo

__all__ = ["cg"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(dots(a.unsqueeze(0), b)[0])


def cg(A, b, *, x0=None, tol: float = 1e-8, maxiter: Optional[int] = None,
       M: Preconditioner = None) -> Tuple[torch.Tensor, SolveInfo]:
    """Solve an SPD system ``A x = b`` with (preconditioned) conjugate gradients.

    Parameters
    ----------
    A : CSRMatrix, torch sparse or dense matrix, scipy.sparse matrix or callable
        Symmetric positive definite ``[n, n]``.
    b : Tensor[n] or array
        Right-hand side (finite).
    x0 : Tensor[n], optional
        Initial guess (default zero).
    tol : float
        Stop when ``||b - A x|| <= tol ||b||`` (> 0); checked on the recursively
        updated residual, then confirmed on the recomputed one (CG continues if the two
        have drifted apart).
    maxiter : int, optional
        Iteration budget; default ``10 n``.
    M : None, 'jacobi', Tensor[n] or callable
        SPD preconditioner ``M^{-1}`` (a diagonal, ``'jacobi'`` or a callable).

    Returns
    -------
    x : Tensor[n]
    info : SolveInfo
        ``status="breakdown"`` when ``p^T A p <= 0`` (A is not positive definite) or A or M
        returned non-finite values.
    """
    if maxiter is not None:
        check_positive_int("cg", "maxiter", maxiter)
    system = setup_system("cg", A, b, x0, tol, M)
    bnorm = system.bnorm
    if bnorm == 0.0:
        return torch.zeros_like(system.b), SolveInfo(True, 0, 0, [0.0], 0.0, "zero_rhs")
    maxiter = maxiter if maxiter is not None else 10 * system.A.n
    target = float(tol) * bnorm
    x = system.x0
    r = system.residual(x)
    rnorm = float(torch.linalg.vector_norm(r))
    history = [rnorm / bnorm]
    z = system.unprecondition(r)
    p = z.clone()
    rz = _dot(r, z)
    iterations, status = 0, "maxiter"
    while iterations < maxiter:
        if rnorm <= target:
            r = system.residual(x)  # confirm on the true residual
            rnorm = float(torch.linalg.vector_norm(r))
            history[-1] = rnorm / bnorm
            if rnorm <= target:
                status = "converged"
                break
            z = system.unprecondition(r)
            p = z.clone()
            rz = _dot(r, z)
        q = system.A.apply(p)
        system.matvecs += 1
        curvature = _dot(p, q)
        if not curvature > 0.0 or rz <= 0.0:
            status = "breakdown"
            break
        alpha = rz / curvature
        x.add_(p, alpha=alpha)
        r.add_(q, alpha=-alpha)
        iterations += 1
        rnorm = float(torch.linalg.vector_norm(r))
        history.append(rnorm / bnorm)
        z = system.unprecondition(r)
        rz_new = _dot(r, z)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    rnorm = float(torch.linalg.vector_norm(system.residual(x)))
    converged, status = conclude(status, rnorm, target)
    return system.solution(x), SolveInfo(converged, iterations, system.matvecs, history, rnorm / bnorm, status)
