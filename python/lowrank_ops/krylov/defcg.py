"""Deflated (recycling) conjugate gradients for sequences of SPD systems.

Deflated CG as in Saad, Yeung, Erhel and Guyomarc'h, "A deflated version of the
conjugate gradient algorithm" (SIAM J. Sci. Comput., 2000), with the deflation space
updated from the Ritz vectors of each solve's Lanczos process, recorded as in eigCG
(Stathopoulos and Orginos, SIAM J. Sci. Comput., 2010).  The space ``W`` (``k``
vectors, ``A``-orthonormal: ``W^T A W = I``, with ``AW = A W`` for the current matrix) is
carried between :meth:`DeflatedCG.solve` calls:

* start: ``x0 += W W^T r0``, ``r0 -= AW W^T r0``, so that ``W^T r0 = 0``;
* every step: ``p = z + beta p - W (AW^T z)`` (``z = M^{-1} r``): the search directions stay
  ``A``-conjugate to ``W`` and the residuals orthogonal to it, so CG iterates on the
  deflated operator ``A_d = A - AW AW^T`` (``k`` fused dots and one fused update per step);
* during the solve, CG's coefficients give the Lanczos matrix of ``(A_d, M)`` for free:
  with ``v_j = z_j / sqrt(r_j^T z_j)``, ``V^T M V = I`` and ``V^T A_d V = T``, tridiagonal with
  ``T_jj = 1 / alpha_j + beta_{j-1} / alpha_{j-1}`` and ``T_{j-1,j} = -sqrt(beta_{j-1}) / alpha_{j-1}``.
  The ``v_j`` are kept in an ``m``-row buffer; when it is full it is restarted to the ``k``
  smallest Ritz vectors of ``T`` and the ``k`` of its leading ``m - 1`` block (eigCG's
  restart, which keeps the next vector's coupling known), so the Ritz vectors improve
  over the whole solve at ``2 k`` vector combinations per ``m - 2 k`` steps;
* after the solve, the new ``W`` is the ``k`` Ritz vectors of smallest Ritz value of the
  pencil ``(A, M)`` over ``span(W, R)``, ``R`` the solve's ``k`` smallest Ritz vectors
  (Rayleigh-Ritz: the smallest eigenvalues are the ones that slow CG down).  Its
  matrices need no product with ``A``: ``R^T A R = Theta + (AW^T R)^T (W^T A W)^{-1} AW^T R``;
* the next solve computes ``AW = A W`` (``k`` products) and ``A``-orthonormalizes ``W``
  (two Gram passes, as :func:`~lowrank_ops.krylov.recycle.refresh`).

Preconditioning is CG's (:func:`~lowrank_ops.krylov.cg`): ``z = M^{-1} r`` with ``M^{-1}``
diagonal (``'jacobi'`` or a tensor); the Ritz update needs ``M`` itself for ``R``'s and
``W``'s ``M``-Gram matrices, so a callable ``M`` is refused when ``k > 0``.  With ``k = 0``
the iteration is plain (preconditioned) CG, step for step.

Cost per step over CG: ``2 k`` vector passes (the fused dots with ``AW`` and the update
with ``W``), one stored vector, and per restart three ``m x m`` eigenproblems and a
``[m -> 2 k]`` combination.  Measured on Darcy 64 x 64 (20 systems, tol 1e-8, k = 10,
SKR order, quiet 2-core Xeon, median of 3): 4928 products in 0.60 s (the Python loop:
1.43 s), against CG's 7155 in 0.16 s and GCRO-DR(40, 10)'s 6531 in 0.87 s.  Fewer
products pay only where a product costs more than the ``2 k`` vector passes and the
restarts (a 5-point stencil costs about two passes: there CG is the fastest).

On the CPU with a CSR matrix and no or a diagonal preconditioner, the iterations run in
C++ (the op ``krylov_defcg_``, cg's loop with the deflation and the record fused in): one
call per ``m - 2 k`` steps, between restarts of the record, instead of ~15 Python, torch
and kernel calls per step.  Elsewhere (CUDA, operators that are not CSR matrices) the
same steps run from the fused kernels (``dots``, ``subtract``) in cg's step-by-step loop
(:func:`~lowrank_ops.krylov._cg_loop.python_loop`), with one host read per step (on CUDA
one wait for the device; two on the steps below ``sqrt(eps) ||b||``, which restore ``W^T r
= 0``; the Lanczos record's restarts read their small matrices).  The
Ritz updates use ``gram`` and ``combine_rows`` everywhere, and the small dense
eigenproblems (at most ``m x m``) lowrank_ops' Jacobi SVD (see :func:`_eigh` for why not
LAPACK).
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .._finite import all_finite
from ..ops.svd import CPU_MAX_JACOBI_SIZE, _jacobi_svd_cpu, default_max_sweeps, default_tol
from ..ops import krylov as _ops
from ..ops._library import eager_or_op
from ._cg_loop import Couplings, project, python_loop
from ._common import (Preconditioner, Progress, Stagnation, System, check_positive_int, conclude, fits, setup_system,
                      steps_per_call)
from ._kernels import combine_rows, gram
from .info import SolveInfo

__all__ = ["DeflatedCG"]

_NATIVE_STATUS = ("converged", "maxiter", "breakdown")  # krylov_defcg's status codes
_JACOBI_SWEEPS = default_max_sweeps(torch.float64)


def _JACOBI_TOL(size: int) -> float:
    return default_tol(size, size, torch.float64)
# cg's module (the package's attribute "cg" is the function): its NATIVE switch is ours too.
_cg_module = sys.modules[__package__ + ".cg"]

_GRAM_TOLERANCE = 1e-14  # relative A-norm^2 below which a direction counts as dependent (or not positive)


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2


def _eigh(matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and orthonormal eigenvectors of a small symmetric matrix.

    Through lowrank_ops' own Jacobi SVD (the kernel of :func:`~lowrank_ops.linalg.batched_svd`,
    C++, sizes up to 96 in float64) of the matrix shifted to positive semidefinite by its
    Gershgorin bound: there the singular vectors are the eigenvectors, in descending
    eigenvalue order, and the eigenvalues returned are the Rayleigh quotients of the
    unshifted matrix (absolute error ``eps ||matrix||``, as LAPACK's).  Not numpy's LAPACK:
    in a process whose torch ops have run, OpenBLAS's threads compete with torch's
    OpenMP team, and on the 2-core machine ``np.linalg.eigh`` of a 40 x 40 matrix took
    48 ms (0.15 ms alone), ``eig`` 0.3-0.45 ms and ``qr`` 0.2 ms, against 0.1-0.2 ms here
    (the restarts of the Lanczos record made 2/3 of a deflated solve's time; measured on
    Darcy 32 x 32, loaded machine).  Falls back to ``np.linalg.eig`` (and a QR of its
    vectors) if Jacobi does not converge or the size exceeds the kernel's.
    """
    matrix = _symmetric(matrix)
    size = matrix.shape[0]
    if 0 < size <= CPU_MAX_JACOBI_SIZE[torch.float64]:
        shifted = matrix + float(np.abs(matrix).sum(axis=1).max()) * np.eye(size)
        # The kernel's op impl directly (batched_svd's checks and reshapes cost more than
        # its 0.1 ms of arithmetic at m = 40, and this runs three times per restart).
        _, _, Vh, _, converged, _ = _jacobi_svd_cpu(torch.from_numpy(shifted)[None], _JACOBI_TOL(size),
                                                    _JACOBI_SWEEPS, True)
        if bool(converged[0]):
            Q = Vh[0].T.numpy()
            return np.einsum("ij,ij->j", Q, matrix @ Q), Q
    values, vectors = np.linalg.eig(matrix)
    order = np.argsort(-values.real, kind="stable")
    # A complex pair (rounding on a near-repeated eigenvalue) contributes the real and
    # imaginary parts of its vector, which span the same plane; the QR (columns in
    # descending order) makes the vectors of a near-repeated eigenvalue orthonormal.
    columns = np.where(values.imag[order] < 0, vectors.imag[:, order], vectors.real[:, order])
    Q = np.linalg.qr(columns)[0]
    return np.einsum("ij,ij->j", Q, matrix @ Q), Q


def _a_orthonormal_transform(products: np.ndarray) -> np.ndarray:
    """``S`` (``[size, kept]``) with ``S^T F S = I`` for ``F`` the (symmetrized) ``A``-Gram matrix ``products``.

    Directions of ``A``-norm^2 at or below ``_GRAM_TOLERANCE`` times the largest (dependent
    ones, or ones ``A`` does not curve upward: not positive definite) are dropped, all of
    them when no eigenvalue is positive.
    """
    values, vectors = _eigh(products)
    largest = values.max() if values.size else 0.0
    if not largest > 0.0:
        return vectors[:, :0]
    keep = values > _GRAM_TOLERANCE * largest
    return vectors[:, keep] / np.sqrt(values[keep])


def _a_orthonormalize(W: torch.Tensor, AW: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One Gram pass: ``(W S, AW S)`` (as rows) with ``(W S)^T A (W S) = I``."""
    if W.shape[0] == 0:
        return W, AW
    transform = _a_orthonormal_transform(gram(W, AW))
    return combine_rows(W, transform), combine_rows(AW, transform)


def _refresh(system: System, W: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W, AW)`` for a new operator: ``AW = A W`` (``kc`` products), then ``A``-orthonormalized twice."""
    if W.shape[0] == 0:
        return W, W
    system.matvecs += W.shape[0]
    matrix = system.A.matrix
    if W.dtype == torch.float32 and matrix is not None:
        # In float64, then rounded: W's rows have A-norm 1, so norms up to 1 / sqrt(lambda_min),
        # and a float32 product A w cancels down to lambda w with an error of about
        # eps ||A|| ||w||: 1 % at condition 1e4, and the deflated iteration diverged (a second
        # solve ended 33x worse than x0 = 0; float64 products: as plain CG).
        wide = matrix.to(dtype=torch.float64)
        AW = torch.stack([wide.matvec_unchecked(w) for w in W.to(torch.float64).contiguous()]).to(W.dtype)
    else:
        # (each product copied before the next call: a callable may return one buffer it reuses)
        AW = torch.stack([system.A.apply(w.contiguous()).clone() for w in W])
    if not all_finite(AW):  # A returned NaN or inf: nothing to deflate with (the solve reports the breakdown)
        return W[:0], AW[:0]
    for _ in range(2):
        W, AW = _a_orthonormalize(W, AW)
    return W, AW


class _Lanczos:
    """The eigCG record of one solve's Lanczos process: an ``[m, n]`` basis buffer and its ``T``.

    Rows ``[:size]`` of ``V`` are ``M``-orthonormal and ``T[:size, :size] = V A_d V^T``; after
    a restart the first ``2 k`` rows are Ritz vectors (``T`` diagonal there) and ``last``
    holds the previous Lanczos vector's coordinates in the current rows, the only ones the
    next vector couples to.
    """

    def __init__(self, buffer: torch.Tensor, k: int):
        self.V, self.k = buffer, k
        self.T = np.zeros((buffer.shape[0], buffer.shape[0]))
        self.size = 0
        self.last = np.zeros(0)
        self.spare: Optional[torch.Tensor] = None  # [n]: a staged vector while V is full

    def stage(self, z: torch.Tensor, rz: float) -> None:
        """Write ``v = z / sqrt(rz)`` where :meth:`commit` counts it: row ``size`` of ``V``, or a
        spare row when ``V`` is full (the restart that makes room waits for the commit: the
        step's entries, known only after it, may stop the record instead)."""
        if self.size < self.V.shape[0]:
            row = self.V[self.size]
        else:
            if self.spare is None:
                self.spare = torch.empty_like(self.V[0])
            row = self.spare
        torch.mul(z, 1.0 / math.sqrt(rz), out=row)

    def commit(self, diagonal: float, coupling: float) -> None:
        """Count the vector :meth:`stage` wrote with ``T``'s new diagonal entry and its coupling
        to the previous vector (restarting the record first when it is full)."""
        if self.size == self.V.shape[0]:
            self.restart()
            self.V[self.size].copy_(self.spare)
        self.append(diagonal, coupling)

    def append(self, diagonal: float, coupling: float) -> None:
        """Count row ``size`` of ``V`` (already written: by the C++ loop or :meth:`stage`) with ``T``'s new entries."""
        i = self.size
        self.T[:i, i] = self.T[i, :i] = coupling * self.last
        self.T[i, i] = diagonal
        self.last = np.zeros(i + 1)
        self.last[i] = 1.0
        self.size = i + 1

    def restart(self) -> None:
        m, k = self.size, self.k
        block = np.zeros((m, 2 * k))
        block[:, :k] = _eigh(self.T)[1][:, -k:]  # the k smallest Ritz vectors of T_m ...
        block[: m - 1, k:] = _eigh(self.T[: m - 1, : m - 1])[1][:, -k:]  # ... and of T_{m-1}
        Q, R = np.linalg.qr(block)
        diagonal = np.abs(np.diag(R))
        Q = Q[:, diagonal > 1e-12 * diagonal.max()]  # the two sets may share directions
        values, Z = _eigh(Q.T @ self.T @ Q)
        coordinates = Q @ Z
        kept = coordinates.shape[1]
        for row, vector in enumerate(combine_rows(self.V[:m], coordinates)):
            self.V[row].copy_(vector)  # row by row: one [kept, n] copy goes through OpenMP (19 ms at n = 4096, shared cores)
        self.T[:] = 0.0
        self.T[:kept, :kept] = np.diag(values)
        self.last = coordinates[m - 1]
        self.size = kept

    def ritz(self) -> Tuple[np.ndarray, torch.Tensor]:
        """``(theta, R)``: the ``k`` smallest Ritz values and vectors (rows) of ``(A_d, M)`` over the record."""
        values, vectors = _eigh(self.T[: self.size, : self.size])
        count = min(self.k, self.size)
        coordinates = vectors[:, ::-1][:, :count].copy()  # positive strides (a 1 x 1 reversed view counts as contiguous)
        return values[::-1][:count].copy(), combine_rows(self.V[: self.size], coordinates)


def _update(W: torch.Tensor, AW: torch.Tensor, theta: np.ndarray, R: torch.Tensor,
            inverse_diagonal: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """The ``k`` Ritz vectors of smallest Ritz value of ``(A, M)`` over ``span(W, R)`` (rows).

    ``F = Z^T A Z`` and ``G = Z^T M Z`` for ``Z = [W, R]``: ``W``'s blocks from ``AW`` and
    Gram products, ``R^T A R`` from the Lanczos values (module docstring).  With
    ``S^T F S = I`` (:func:`_a_orthonormal_transform`) the pencil becomes the standard
    ``S^T G S u = sigma u``, ``sigma = 1 / theta``: the largest ``sigma`` are wanted.
    """
    kc, count = W.shape[0], R.shape[0]
    if inverse_diagonal is None:
        def metric(V: torch.Tensor) -> torch.Tensor:
            return V
    else:
        def metric(V: torch.Tensor) -> torch.Tensor:  # M V, row by row (as the copy in _Lanczos._restart)
            return torch.stack([row / inverse_diagonal for row in V]) if V.shape[0] else V
    size = kc + count
    F, G = np.zeros((size, size)), np.zeros((size, size))
    F[kc:, kc:] = np.diag(theta)
    G[kc:, kc:] = gram(R, metric(R))
    if kc:
        products, coupling = _symmetric(gram(W, AW)), gram(AW, R)
        F[:kc, :kc], F[:kc, kc:], F[kc:, :kc] = products, coupling, coupling.T
        F[kc:, kc:] += coupling.T @ np.linalg.solve(products, coupling)  # A = A_d + AW (W^T A W)^{-1} AW^T
        G[:kc, :kc], G[:kc, kc:] = gram(W, metric(W)), gram(metric(W), R)
        G[kc:, :kc] = G[:kc, kc:].T
    if not (np.isfinite(F).all() and np.isfinite(G).all()):
        return W
    S = _a_orthonormal_transform(F)
    Y = S @ _eigh(S.T @ G @ S)[1][:, : min(k, S.shape[1])]
    W_new = combine_rows(R, Y[kc:])
    if kc:
        combine_rows(W, Y[:kc], out=W_new)
    return W_new


def _reproject_below(system: System) -> float:
    """``sqrt(eps) ||b||``: below it the CG steps restore ``W^T r = 0`` (``krylov_defcg_``'s
    ``reproject_below``).  ``W^T r`` drifts to about ``u ||A|| ||x||``, CG's attainable
    accuracy, and with a tolerance below that the deflated iteration diverged instead of
    levelling off: float32, ``pde.darcy(32)``, the second solve of a sequence at tol 3e-7
    went from 4e-7 to 9e3 relative over 10^4 steps (plain cg stagnates at 9e-6); projected,
    it stagnates at 1.2e-5.  Above the threshold the drift is far below ``||r||``, and the
    projection (three passes over ``W`` or ``AW`` per step) is skipped."""
    return math.sqrt(torch.finfo(system.b.dtype).eps) * system.bnorm


def _native_loop(system: System, x: torch.Tensor, r: torch.Tensor, rnorm: float, maxiter: int,
                 W: Optional[torch.Tensor], AW: Optional[torch.Tensor], lanczos: Optional[_Lanczos],
                 progress: Progress, stagnation: Stagnation) -> Tuple[int, str]:
    """The same iteration in C++ (``krylov_defcg_``), for a CSR matrix on the CPU with no or a
    diagonal preconditioner: one kernel call per ``m - size`` steps while the Lanczos record
    fills (the record restarts between calls, here), else until the recursive residual
    meets the target; restarted from the true residual when the recursive one met the
    target but the true one did not (or stopped as ``"stagnation"``, :class:`Stagnation`).
    Updates ``x``, ``lanczos``, ``stagnation`` and ``progress.history`` (reporting each
    call's entries once final); returns ``(iterations, status)``."""
    matrix, bnorm, target, history = system.A.matrix, system.bnorm, system.target, progress.history
    diagonal = None if system.inverse_diagonal is None else system.inverse_diagonal.contiguous()
    kernel = eager_or_op("krylov_defcg_", _ops.defcg_unchecked)
    reproject_below = _reproject_below(system)
    none = x.new_empty((0, x.numel()))
    W, AW = (none, none) if W is None else (W.contiguous(), AW.contiguous())
    p, z = torch.empty_like(x), torch.empty_like(x)
    rho = torch.zeros(1, dtype=torch.float64)
    r = r.contiguous()
    recording, resume = lanczos is not None, False
    couplings = Couplings()
    iterations = 0
    while True:
        progress.report()
        if not resume and rnorm <= target:  # r is the true residual here
            return iterations, "converged"
        if iterations >= maxiter:
            return iterations, "maxiter"
        steps = min(maxiter - iterations, steps_per_call(x.numel()))
        if recording:
            if lanczos.size == lanczos.V.shape[0]:
                lanczos.restart()
            record = lanczos.V[lanczos.size:]
            steps = min(steps, record.shape[0])
        else:
            record = none
        relative, alphas, betas, info = kernel(matrix.row_ptr, matrix.col_idx, matrix.values, diagonal, x, r, p, z,
                                               rho, W, AW, record, steps, target, bnorm, resume,
                                               reproject_below=reproject_below)
        taken, code = info.tolist()
        history.extend(relative[:taken].tolist())
        iterations += taken
        system.matvecs += taken
        if recording:
            for alpha, beta in zip(alphas[:taken].tolist(), betas[:taken].tolist()):
                entries = couplings.entries(alpha)
                recording = entries is not None
                if not recording:
                    break
                lanczos.append(*entries)
                couplings.advance(alpha, beta)
        status = _NATIVE_STATUS[code]
        if status == "breakdown":
            return iterations, status
        resume = status == "maxiter"  # the call's steps ran out: continue from its direction
        if resume:
            continue
        r.copy_(system.residual(x))  # the recursive residual met the target: confirm on the true one
        rnorm = float(torch.linalg.vector_norm(r))
        if rnorm > target:
            if stagnation.failed_confirmation(x, rnorm):
                history[-1] = rnorm / bnorm
                return iterations, "stagnation"
            if W.shape[0]:
                rnorm = project(W, AW, x, r)
            recording = False  # the restarted iteration does not continue the recorded Lanczos process
        history[-1] = rnorm / bnorm


class DeflatedCG:
    """Deflated conjugate gradients that carries its deflation space between SPD solves.

    Parameters
    ----------
    k : int
        Deflation vectors kept (0: plain CG); at most n for a system of size n.
    m : int, optional
        Rows of the Lanczos record (``> 2 k``; default ``max(min(8 k, 96), 4 k, 20)``):
        ``m - 2 k`` CG steps between its restarts; at most ``max(n, 2 k + 1)`` for a
        system of size n (a longer record adds nothing but memory: ``m = 10**6`` asked
        for a 7 TB ``T``).  Keep it at most 96: larger restart
        problems go to numpy's ``eig`` (:func:`_eigh`), which took 60-170 ms at m = 100-120
        on the shared 2-core machine (OpenBLAS threading).  Darcy 64 x 64, 20 systems,
        k = 10, quiet 2-core Xeon: m = 40 / 60 / 80 took 4918 / 4935 / 4928 products in
        0.73-0.74 / 0.62-0.65 / 0.59-0.62 s (fewer restarts, each three Jacobi
        eigenproblems of size up to m).
    M : None, 'jacobi' or Tensor[n], optional
        SPD preconditioner ``M^{-1}`` as in :func:`~lowrank_ops.krylov.cg`: ``'jacobi'``
        (``diag(A)^{-1}``, recomputed for each matrix) or the diagonal of ``M^{-1}``.  A
        callable is accepted only with ``k = 0``.
    maxiter : int, optional
        Iteration budget per solve; default ``10 n``.

    Attributes
    ----------
    W : Tensor[k', n] or None
        The deflation space after the last solve (rows, ``k' <= k``).
    AW : Tensor[k', n] or None
        ``W A`` for the last solve's matrix when ``W`` was not changed after it (``k = 0``,
        a breakdown), else None: the next solve computes it.
    """

    def __init__(self, k: int = 10, *, m: Optional[int] = None, M: Preconditioner = None,
                 maxiter: Optional[int] = None):
        self.k = check_positive_int("DeflatedCG", "k", k, minimum=0)
        self.m = max(min(8 * self.k, 96), 4 * self.k, 20) if m is None else check_positive_int("DeflatedCG", "m", m)
        if self.k and self.m <= 2 * self.k:
            raise ValueError(f"DeflatedCG: m must be larger than 2 k; got m = {self.m}, k = {self.k}")
        if self.k and callable(M) and not isinstance(M, torch.Tensor):
            raise TypeError("DeflatedCG: M must be None, 'jacobi' or a Tensor[n] (the diagonal of M^-1) when k > 0 "
                            f"(the Ritz update needs M itself, a callable gives only M^-1); got {type(M).__name__}")
        self.maxiter = None if maxiter is None else check_positive_int("DeflatedCG", "maxiter", maxiter)
        self.M = M
        self._buffer: Optional[torch.Tensor] = None
        self.reset()

    def __getstate__(self) -> dict:
        """Pickling (torch.save, copy): the recycled space without the key of the system it was
        computed for (weak references to its matrix, which pickle refuses): the next solve then
        recomputes the products it pairs with, as for a changed matrix.  The workspace is not kept."""
        return dict(self.__dict__, _key=None, _buffer=None)

    def reset(self) -> None:
        """Forget the deflation space."""
        self.W: Optional[torch.Tensor] = None
        self.AW: Optional[torch.Tensor] = None
        self._key: Optional[tuple] = None

    def solve(self, A, b, x0=None, tol: Optional[float] = None, *, atol: float = 0.0,
              callback: Optional[Callable[[float], object]] = None) -> Tuple[torch.Tensor, SolveInfo]:
        """Solve the SPD system ``A x = b`` to ``||b - A x|| <= max(tol ||b||, atol)``, deflating with earlier Ritz vectors.

        Parameters
        ----------
        A : CSRMatrix, torch sparse or dense matrix, scipy.sparse matrix or callable
            Symmetric positive definite ``[n, n]``.
        b : Tensor[n] or array
            Right-hand side (finite); float64 on the CPU unless ``b`` (or ``A``) is a
            float32 or CUDA tensor.
        x0 : Tensor[n], optional
            Initial guess (default zero).
        tol : float, optional
            Relative residual tolerance (> 0), as scipy's ``rtol``, confirmed on the
            recomputed true residual; default (None) 1e-8 in float64, 1e-5 in float32.
        atol : float
            Absolute residual tolerance (finite, >= 0; default 0): the solve stops once
            ``||b - A x|| <= max(tol ||b||, atol)``, as scipy's ``rtol`` / ``atol``.
        callback : callable, optional
            ``callback(residual)`` once per CG step with its relative residual norm (a
            float; scipy's ``callback_type="pr_norm"``): exactly the values of
            ``info.residuals[1:]``, in order, each once CG no longer revises it (a
            residual under the target is replaced by the recomputed true one): in the C++
            loop after each kernel call, for its steps; in the Python loop at the start of
            the next step.  Exceptions propagate; the deflation space is then left as it
            was before the solve.

        Returns
        -------
        x : Tensor[n]
        info : SolveInfo
            ``status="breakdown"`` when ``p^T A p <= 0`` or ``r^T M^{-1} r <= 0`` (A or M not
            positive definite) or A or M returned non-finite values; the deflation space is
            then kept as it was at the start of the solve.  ``"stagnation"`` as :func:`~lowrank_ops.krylov.cg`'s.
        """
        system = setup_system("DeflatedCG.solve", A, b, x0, tol, self.M, atol, callback)
        if self.W is not None and not fits(system, self.W):
            self.reset()  # a system of another size or kind: nothing to deflate with
        return self._solve(system)

    def _solve(self, system: System) -> Tuple[torch.Tensor, SolveInfo]:
        n, bnorm = system.A.n, system.bnorm
        if bnorm == 0.0:
            return torch.zeros_like(system.b), SolveInfo(True, 0, 0, [0.0], 0.0, "zero_rhs")
        maxiter = self.maxiter if self.maxiter is not None else 10 * n
        W, AW = self.W, self.AW
        if W is not None and (AW is None or system.key != self._key):
            W, AW = _refresh(system, W)
        kc = 0 if W is None else W.shape[0]
        k = min(self.k, n)
        lanczos = _Lanczos(self._workspace(n, min(self.m, max(n, 2 * k + 1)), system.b), k) if k else None
        x = system.x0.contiguous()  # the C++ loop updates it in place
        r = system.residual(x)
        rnorm = float(torch.linalg.vector_norm(r))
        history = [rnorm / bnorm]
        progress = Progress(system.callback, history)
        stagnation = Stagnation(x, rnorm)  # never return worse than the start
        if kc and math.isfinite(rnorm):
            rnorm = project(W, AW, x, r)
            history[-1] = rnorm / bnorm
        matrix = system.A.matrix
        if (_cg_module.NATIVE and matrix is not None and not x.is_cuda and matrix.dtype == x.dtype
                and (system.precondition is None or system.inverse_diagonal is not None)):
            iterations, status = _native_loop(system, x, r, rnorm, maxiter, W if kc else None, AW, lanczos, progress,
                                              stagnation)
        else:
            iterations, status = python_loop(system, x, r, rnorm, maxiter, progress, stagnation,
                                             W=W if kc else None, AW=AW, lanczos=lanczos,
                                             reproject_below=_reproject_below(system))
        progress.report()
        x, rnorm = stagnation.best_solution(x, float(torch.linalg.vector_norm(system.residual(x))))
        converged, status = conclude(status, rnorm, system.target)
        if lanczos is not None and lanczos.size and status != "breakdown":
            theta, R = lanczos.ritz()
            W, AW = _update(W if kc else R[:0], AW if kc else R[:0], theta, R, system.inverse_diagonal, k), None
        self.W, self.AW, self._key = W, AW, system.key
        return system.solution(x), SolveInfo(converged, iterations, system.matvecs, history, rnorm / bnorm, status)

    def _workspace(self, n: int, m: int, like: torch.Tensor) -> torch.Tensor:
        """The ``[m, n]`` Lanczos buffer (kept between solves of one size, dtype and device)."""
        buffer = self._buffer
        if buffer is None or buffer.shape != (m, n) or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffer = torch.empty(m, n, dtype=like.dtype, device=like.device)
        return buffer
