"""GCRO-DR(m, k): restarted GMRES with a recycled subspace kept between solves.

Parks, de Sturler, Mackey, Johnson and Maiti, "Recycling Krylov subspaces for
sequences of linear systems" (SIAM J. Sci. Comput., 2006).  Each cycle runs ``m - k``
Arnoldi steps on ``(I - C C^T) A`` and minimizes the residual over ``span(U, V)``;
after each cycle the recycled pair ``(U, C)`` becomes the ``k`` harmonic Ritz vectors of
smallest harmonic Ritz value (:func:`~lowrank_ops.krylov.recycle.harmonic_ritz`).  The
pair survives the call: the next :meth:`GCRODR.solve` starts from it, recomputing
``C = A U`` when the matrix (or preconditioner) changed.  With ``k = 0`` every cycle is
a GMRES(m) cycle, which is how :func:`~lowrank_ops.krylov.gmres` is implemented.

Minimization over ``span(U, V)``: with ``r`` orthogonal to ``C`` the least-squares
right-hand side is ``[0; beta e1]`` and the ``U`` block of ``G = [[D, B], [0, Hbar]]``
is diagonal, so the optimal ``U`` coefficients are ``-D^{-1} B y`` and ``y`` solves the
GMRES problem ``min ||beta e1 - Hbar y||``; the update is ``x += V y - U (B y)``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from ._arnoldi import arnoldi_cycle
from ._kernels import combine, dots, subtract
from ._common import Preconditioner, Progress, System, check_positive_int, conclude, fits, setup_system
from .info import SolveInfo
from .recycle import harmonic_ritz, refresh

__all__ = ["GCRODR"]

#: A restart cycle counts as progress when it cuts the residual by more than this fraction.
_STAGNATION = 1e-12


class GCRODR:
    """Recycling GMRES solver, GCRO-DR(m, k), that keeps its subspace between solves.

    Parameters
    ----------
    m : int
        Search space per cycle (recycled plus new Krylov directions), ``m > k``.  A
        system of size n uses at most ``min(m, n)`` (a longer cycle adds nothing: the
        Krylov space is full, as in scipy's gmres).
    k : int
        Recycled harmonic Ritz vectors (0: plain restarted GMRES(m)); at most
        ``min(m, n) - 1`` for a system of size n.
    M : None, 'jacobi', Tensor[n] or callable, optional
        Right preconditioner: ``'jacobi'`` (``M^{-1} = diag(A)^{-1}``, recomputed for each
        matrix), the diagonal of ``M^{-1}``, or a callable ``y -> M^{-1} y``.
    maxiter : int, optional
        Iteration budget per solve (Arnoldi steps over all cycles); default ``10 n``.

    Attributes
    ----------
    U, C : Tensor[k', n] or None
        The recycled pair after the last solve (rows; ``A M^{-1} U^T = C^T``).
    """

    def __init__(self, m: int = 40, k: int = 10, *, M: Preconditioner = None, maxiter: Optional[int] = None):
        self.m = check_positive_int("GCRODR", "m", m)
        self.k = check_positive_int("GCRODR", "k", k, minimum=0)
        if self.k >= self.m:
            raise ValueError(f"GCRODR: k must be smaller than m; got m = {self.m}, k = {self.k}")
        self.maxiter = None if maxiter is None else check_positive_int("GCRODR", "maxiter", maxiter)
        self.M = M
        self._basis: Optional[torch.Tensor] = None
        self.reset()

    def __getstate__(self) -> dict:
        """Pickling (torch.save, copy): the recycled space without the key of the system it was
        computed for (weak references to its matrix, which pickle refuses): the next solve then
        recomputes the products it pairs with, as for a changed matrix.  The workspace is not kept."""
        return dict(self.__dict__, _key=None, _basis=None)

    def reset(self) -> None:
        """Forget the recycled subspace."""
        self.U: Optional[torch.Tensor] = None
        self.C: Optional[torch.Tensor] = None
        self._key: Optional[tuple] = None

    def solve(self, A, b, x0=None, tol: Optional[float] = None, *, atol: float = 0.0,
              callback: Optional[Callable[[float], object]] = None) -> Tuple[torch.Tensor, SolveInfo]:
        """Solve ``A x = b`` to ``||b - A x|| <= max(tol ||b||, atol)``, recycling from earlier solves.

        Parameters
        ----------
        A : CSRMatrix, torch sparse or dense matrix, scipy.sparse matrix or callable
            Square ``[n, n]`` (see :func:`~lowrank_ops.krylov.operators.as_operator`).
        b : Tensor[n] or array
            Right-hand side (finite).  Vectors are float64 on the CPU unless ``b`` (or
            ``A``) is a float32 or CUDA tensor.
        x0 : Tensor[n], optional
            Initial guess (default zero).
        tol : float, optional
            Relative residual tolerance (> 0), as scipy's ``rtol``; default (None) 1e-8
            in float64, 1e-5 in float32.
        atol : float
            Absolute residual tolerance (finite, >= 0; default 0): the solve stops once
            ``||b - A x|| <= max(tol ||b||, atol)``, as scipy's ``rtol`` / ``atol``.
        callback : callable, optional
            ``callback(residual)`` once per Arnoldi step with its relative residual norm
            (a float), as scipy's ``callback_type="pr_norm"``: exactly the values of
            ``info.residuals[1:]``, in order (the Givens estimate inside a cycle; a cycle's
            last step the true residual recomputed at the restart, after its projection
            onto the refreshed recycled space when ``k > 0``).  The calls for a cycle are
            made when the cycle has finished (its steps run in one C++ call on the CPU
            with a matrix), before the next one starts.  Exceptions propagate; the
            recycled space is then left as it was before the solve.

        Returns
        -------
        x : Tensor[n]
        info : SolveInfo
            ``converged`` reports whether the final true residual meets ``max(tol ||b||, atol)``.
        """
        system = setup_system("GCRODR.solve", A, b, x0, tol, self.M, atol, callback)
        if self.U is not None and not fits(system, self.U):
            self.reset()  # a system of another size or kind: nothing to recycle
        return self._solve(system)

    # ------------------------------------------------------------------ engine
    def _solve(self, system: System) -> Tuple[torch.Tensor, SolveInfo]:
        n, bnorm = system.A.n, system.bnorm
        if bnorm == 0.0:
            return torch.zeros_like(system.b), SolveInfo(True, 0, 0, [0.0], 0.0, "zero_rhs")
        maxiter = self.maxiter if self.maxiter is not None else 10 * n
        m, k = self._sizes(n)
        target = system.target
        U, C = self.U, self.C
        if U is not None and (C is None or system.key != self._key):
            C, U = refresh(system.apply, U)
        basis = self._workspace(n, m, system.b)
        x = system.x0
        r = system.residual(x)
        rnorm = float(torch.linalg.vector_norm(r))
        history = [rnorm / bnorm]
        progress = Progress(system.callback, history)
        iterations = cycles = 0
        status = "maxiter"
        r_is_true = True
        while True:
            if not math.isfinite(rnorm):  # A or M returned NaN or inf: nothing sound to iterate on
                status = "breakdown"
                break
            kc = 0 if U is None else U.shape[0]
            if kc:  # x += U C^T r, r -= C C^T r: the best correction from the recycled space
                coefficients = dots(C, r)
                x += system.unprecondition(combine(U, coefficients))
                rnorm = subtract(C, r, coefficients)
                history[-1] = rnorm / bnorm
                r_is_true = False
            if rnorm <= target:
                if r_is_true:
                    status = "converged"
                    break
                r, rnorm, r_is_true = self._true_residual(system, x)
                history[-1] = rnorm / bnorm
                if rnorm <= target:
                    status = "converged"
                    break
            if iterations >= maxiter:
                break
            for row in range(kc):  # row by row: one [kc, n] copy would go through OpenMP
                basis[row].copy_(C[row])
            steps = min(m - kc, maxiter - iterations)
            progress.report()  # the previous cycle's entries are final now
            cycle = arnoldi_cycle(system, basis, kc, r, rnorm, steps, target, history, bnorm)
            iterations += cycle.steps
            cycles += 1
            before = (x.clone(), r, rnorm, r_is_true)  # undone if the cycle makes things worse
            if cycle.steps:  # 0 only when the first product was not finite (cycle.finite False)
                y = torch.from_numpy(cycle.y).to(device=x.device, dtype=x.dtype)
                correction = combine(basis[kc: kc + cycle.steps], y)
                if kc:
                    subtract(U, correction, torch.from_numpy(cycle.b @ cycle.y).to(device=x.device, dtype=x.dtype))
                x += system.unprecondition(correction)
            previous = rnorm
            r, rnorm, r_is_true = self._true_residual(system, x)
            no_progress = rnorm > target and rnorm >= (1.0 - _STAGNATION) * previous
            # GMRES minimizes the residual over the cycle's space, so no progress means rounding:
            # on an operator singular on that space, a back substitution through a ~0 pivot
            # added a null-space component of norm 1e28 to x (the residual unchanged), or took
            # it from 0.15 to 1, or 2e13.  Such a cycle is undone, with the recycled space kept.
            # `previous` is the true residual, or (after the projection onto C) an estimate of
            # it: then only a blow-up counts, as a true improvement may still read as none.
            if math.isfinite(rnorm) and (no_progress if before[3] else rnorm > 2.0 * previous + target):
                x, r, rnorm, r_is_true = before
                if not r_is_true:
                    r, rnorm, r_is_true = self._true_residual(system, x)
                if cycle.steps:
                    history[-1] = rnorm / bnorm
                status = "stagnation" if cycle.finite else "breakdown"
                break
            if k and cycle.finite:
                U, C = harmonic_ritz(basis[: kc + cycle.steps + 1], kc, U if kc else basis[:0], cycle, k)
            if cycle.steps:  # (a cycle without steps has no entry: the last one is reported already)
                history[-1] = rnorm / bnorm
            if not cycle.finite:
                status = "breakdown"
                break
            if no_progress:
                status = "stagnation"
                break
        if not r_is_true:
            r, rnorm, r_is_true = self._true_residual(system, x)
        progress.report()
        self.U, self.C, self._key = U, C, system.key
        converged, status = conclude(status, rnorm, target)
        return system.solution(x), SolveInfo(converged, iterations, system.matvecs, history, rnorm / bnorm, status,
                                             cycles)

    def _sizes(self, n: int) -> Tuple[int, int]:
        """``(m, k)`` for a system of size ``n``: at most n directions per cycle, so a
        typo-sized ``m`` (2**40 asked for a 44 TB basis) costs no more than ``m = n``."""
        k = min(self.k, max(n - 1, 0))
        return min(self.m, max(n, k + 1)), k

    def _workspace(self, n: int, m: int, like: torch.Tensor) -> torch.Tensor:
        """The ``[m + 1, n]`` basis buffer, kept between solves of one size, dtype and device.

        A fresh 1.3 MB (Darcy 64 x 64) to 5.4 MB (128 x 128) buffer per solve costs its page
        faults every time; the recycled U and C never live in it (they are separate tensors).
        """
        basis = self._basis
        if (basis is None or basis.shape != (m + 1, n) or basis.dtype != like.dtype
                or basis.device != like.device):
            basis = self._basis = torch.empty(m + 1, n, dtype=like.dtype, device=like.device)
        return basis

    @staticmethod
    def _true_residual(system: System, x: torch.Tensor):
        r = system.residual(x)
        return r, float(torch.linalg.vector_norm(r)), True
