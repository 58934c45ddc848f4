"""One restart cycle of (projected) Arnoldi with Givens rotations: the engine of GMRES and GCRO-DR.

Orthogonalization is classical Gram-Schmidt against the whole basis at once (one fused
kernel pass computes the coefficients, updates the vector and returns its norms before
and after, reading the basis twice instead of ``2 j`` BLAS-1 sweeps), repeated when the first pass
cancelled more than 90% of the vector's norm (the Daniel-Gragg-Kaufman-Stewart test
with threshold 0.1 instead of the textbook 1/sqrt(2)): one pass loses orthogonality of
about ``eps / (||w_after|| / ||w_before||)``, so the basis stays orthogonal to ~1e-14,
enough for GMRES and the harmonic Ritz problem, while the second pass (as many basis
reads again) runs only on strong cancellation.  On the Darcy 64 x 64 sequence the
threshold 1/sqrt(2) reorthogonalized almost every step, for the same iteration counts
and 1.3-1.5x the time.

For GCRO-DR the recycled space's ``C`` (orthonormal, ``A U = C``) sits in the first
``kc`` rows of the same buffer, so the projection ``(I - C C^T)`` and the Arnoldi
orthogonalization are one pass: the first ``kc`` coefficients are the column of
``B = C^T A V``, the rest the column of the Hessenberg matrix.

On the CPU with a CSR operator (the matrix, or the matrix with a Jacobi scaling folded
in) the whole cycle is one C++ call (:func:`~lowrank_ops.krylov._kernels.arnoldi`), with
the same kernels and the same arithmetic as the loop here, which serves callables and CUDA.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List

import numpy as np
import torch

from ._kernels import arnoldi, gram_schmidt

__all__ = ["Cycle", "arnoldi_cycle"]

#: Use the fused C++ cycle where it applies (tests switch it off to compare with the loop).
NATIVE = True

_REORTHOGONALIZE = 0.1  # a second pass when ||w|| fell below this fraction of ||A v_j||
_BREAKDOWN = 1e-14  # h_{j+1,j} below this fraction of ||A v_j||: the Krylov space is invariant


@dataclasses.dataclass
class Cycle:
    """What one cycle produced (small float64 numpy arrays).

    steps : int
        Arnoldi steps taken, ``j``.
    y : ndarray[j]
        Minimizer of ``|| beta e1 - Hbar y ||``.
    hbar : ndarray[j + 1, j]
        The (unrotated) Hessenberg matrix.
    b : ndarray[kc, j]
        ``C^T A V_j`` (empty when ``kc = 0``).
    breakdown : bool
        The Krylov space became invariant (``h_{j+1,j}`` numerically zero).
    finite : bool
        False when step ``j + 1`` met a non-finite ``A v`` (the operator or preconditioner
        returned NaN or inf, or the product overflowed): the cycle stopped after the ``j``
        finite steps, and nothing above comes from the failed one.
    """

    steps: int
    y: np.ndarray
    hbar: np.ndarray
    b: np.ndarray
    breakdown: bool
    finite: bool = True


def arnoldi_cycle(system, basis: torch.Tensor, kc: int, r: torch.Tensor, beta: float, steps: int,
                  target: float, history: List[float], bnorm: float) -> Cycle:
    """Run up to ``steps`` Arnoldi steps on ``(I - C C^T) A`` from ``v1 = r / beta``.

    Parameters
    ----------
    system : System
        The preconditioned operator: ``system.apply`` (``v -> A v``, counting products),
        and ``system.csr``, its CSR matrix when it is one (None for callables).
    basis : Tensor[kc + steps + 1, n]
        Workspace: rows ``[:kc]`` hold ``C`` on entry; rows ``kc:`` receive ``V``.
    kc : int
        Number of recycled vectors (0 for plain GMRES).
    r, beta
        Starting residual (orthogonal to ``C``) and its norm (> 0).
    steps : int
        Maximum number of Arnoldi steps (>= 1).
    target : float
        Stop once the residual estimate ``|g_{j+1}|`` is at most this.
    history : list of float
        Receives the relative residual estimate after each step.
    bnorm : float
        ``||b||``, to make the estimates relative.
    """
    if NATIVE and system.csr is not None and not basis.is_cuda:
        out = arnoldi(system.csr, basis, kc, r.contiguous(), beta, steps, target, bnorm)
        system.matvecs += out.steps
        j = out.steps
        # A non-finite product makes that step's norms non-finite, which the kernel takes for a
        # breakdown: it can only be the last step.  g[j - 1] was rotated by it, but the solution
        # of the first j - 1 steps reads g[:j - 1] only.
        finite = bool(np.isfinite(out.hessenberg[: kc + j + 1, j - 1]).all()) if j else True
        if not finite:
            j -= 1
        history.extend(out.history[:j].tolist())
        hbar = out.hessenberg[kc: kc + j + 1, :j]
        y = _least_squares(out.rotated[:j, :j], out.g[: j + 1], hbar, beta)
        return Cycle(j, y, hbar, out.hessenberg[:kc, :j], out.breakdown and finite, finite)
    return _python_cycle(system.apply, basis, kc, r, beta, steps, target, history, bnorm)


def _python_cycle(apply, basis: torch.Tensor, kc: int, r: torch.Tensor, beta: float, steps: int, target: float,
                  history: List[float], bnorm: float) -> Cycle:
    """:func:`arnoldi_cycle` step by step: one SpMV (or callable) and one or two kernel passes per step."""
    V = basis[kc:]
    torch.div(r, beta, out=V[0])
    hfull = np.zeros((kc + steps + 1, steps))  # [B; Hbar], unrotated
    R = np.zeros((steps, steps))  # the triangular factor of the Givens QR of Hbar
    cosines: List[float] = []
    sines: List[float] = []
    g = [beta]
    breakdown = False
    finite = True
    j = 0
    while j < steps:
        w = apply(V[j])
        rows = kc + j + 1
        h = torch.empty(rows, dtype=w.dtype, device=w.device)
        norm_in, norm_out = gram_schmidt(basis[:rows], w, h)
        if not (math.isfinite(norm_in) and math.isfinite(norm_out)):  # NaN or inf in A v_j: stop before it
            finite = False
            break
        if norm_out < _REORTHOGONALIZE * norm_in:
            correction = torch.empty_like(h)
            _, norm_out = gram_schmidt(basis[:rows], w, correction)
            h += correction
        column = h.tolist()
        hfull[: kc + j + 1, j] = column
        hfull[kc + j + 1, j] = norm_out
        breakdown = not norm_out > _BREAKDOWN * norm_in
        if not breakdown:
            torch.div(w, norm_out, out=V[j + 1])
        # Givens: apply the previous rotations to the new Hessenberg column, then zero h_{j+1,j}.
        hcol = column[kc:]
        for i in range(j):
            a, b = hcol[i], hcol[i + 1]
            hcol[i], hcol[i + 1] = cosines[i] * a + sines[i] * b, -sines[i] * a + cosines[i] * b
        a, b = hcol[j], norm_out
        radius = float(np.hypot(a, b))  # libm's hypot, as the C++ cycle (CPython's math.hypot rounds differently)
        c, s = (1.0, 0.0) if radius == 0.0 else (a / radius, b / radius)
        cosines.append(c)
        sines.append(s)
        hcol[j] = radius
        R[: j + 1, j] = hcol[: j + 1]
        g.append(-s * g[j])
        g[j] = c * g[j]
        j += 1
        history.append(abs(g[j]) / bnorm)
        if breakdown or abs(g[j]) <= target:
            break
    hbar = hfull[kc: kc + j + 1, :j]
    return Cycle(j, _least_squares(R[:j, :j], np.array(g), hbar, beta), hbar, hfull[:kc, :j], breakdown, finite)


def _least_squares(R: np.ndarray, g: np.ndarray, hbar: np.ndarray, beta: float) -> np.ndarray:
    """``argmin_y || beta e1 - Hbar y ||`` from the Givens factor ``R`` ``[j, j]``; lstsq when it is singular.

    The triangular factor is singular only when the cycle broke down on a singular
    operator; the least-squares fallback then returns the minimum-norm minimizer
    instead of an infinite one.  (numpy: see recycle.py on small LAPACK calls.)
    """
    j = R.shape[0]
    diagonal = np.abs(np.diag(R))
    if j and diagonal.min() > 1e-14 * diagonal.max():
        y = np.zeros(j)
        for row in range(j - 1, -1, -1):  # back substitution (j <= m: a few hundred flops)
            y[row] = (g[row] - R[row, row + 1:] @ y[row + 1:]) / R[row, row]
        return y
    rhs = np.zeros(hbar.shape[0])
    rhs[0] = beta
    return np.linalg.lstsq(hbar, rhs, rcond=None)[0]
