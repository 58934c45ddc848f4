"""Conjugate gradients step by step from the kernel ops: the loop of :func:`~lowrank_ops.krylov.cg`
and :class:`~lowrank_ops.krylov.DeflatedCG` where their C++ loops (``krylov_cg_``,
``krylov_defcg_``: a CSR matrix on the CPU) do not apply: on CUDA, and for operators that
are not CSR matrices or callable preconditioners on any device.  Plain CG is the
deflated iteration without a deflation space and without a Lanczos record.

One host read per step (:func:`read`; on CUDA each read waits for the device, ~10-20 us,
more than a step's arithmetic on a small system; two on DeflatedCG's steps that restore
``W^T r = 0``, below ``sqrt(eps) ||b||``): the residual is updated with the step
length ``alpha = r^T z / p^T A p`` computed on the device, then the host reads ``p^T A p``,
``||r||`` and ``r^T z`` of the new residual together, checks the curvature, and only then
updates ``x`` (with ``alpha`` in float64, as before).  A step that breaks down
(``p^T A p <= 0`` or not finite: ``A`` not positive definite, or non-finite values)
leaves ``x`` as it was; its residual, meaningless, is dropped (``M`` has been applied to
it: the only work done for that step besides the product).  The dots are the kernels'
(:func:`~lowrank_ops.krylov._kernels.dots`, accumulated in the vectors' dtype), the
host's arithmetic on them float64.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ._common import Progress, Stagnation, System
from ._kernels import combine, dots, subtract, subtract_without_norm

__all__ = ["python_loop", "read", "project", "Couplings"]


def read(*scalars: torch.Tensor) -> List[float]:
    """The entries of the 1-D device tensors ``scalars`` as Python floats, in one host read
    (on CUDA: one wait for the device)."""
    return torch.cat(scalars).tolist()


def project(W: torch.Tensor, AW: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> float:
    """``x += W W^T r``, ``r -= AW W^T r`` (the best correction from span(W): ``W^T r = 0``); returns ``||r||``."""
    coefficients = dots(W, r)
    combine(W, coefficients, out=x)
    return subtract(AW, r, coefficients)


class Couplings:
    """The Lanczos matrix ``T``'s entries from CG's coefficients (:mod:`~lowrank_ops.krylov.defcg`'s
    docstring): the diagonal ``1 / alpha_j + beta_{j-1} / alpha_{j-1}`` and the coupling
    ``-sqrt(beta_{j-1}) / alpha_{j-1}``."""

    def __init__(self):
        self.ratio = self.coupling = 0.0  # beta_{j-1} / alpha_{j-1} and -sqrt(beta_{j-1}) / alpha_{j-1}

    def entries(self, alpha: float) -> Optional[Tuple[float, float]]:
        """Step j's ``(diagonal, coupling)``, or None when not finite (the record stops: no LAPACK call on inf)."""
        diagonal = 1.0 / alpha + self.ratio if alpha > 0.0 else math.inf
        return (diagonal, self.coupling) if math.isfinite(diagonal) and math.isfinite(self.coupling) else None

    def advance(self, alpha: float, beta: float) -> None:
        """After step j: the ratio and coupling step j + 1 needs (NaN, which stops the record, when M is not SPD)."""
        if beta >= 0.0 and alpha > 0.0:
            self.ratio, self.coupling = beta / alpha, -math.sqrt(beta) / alpha
        else:
            self.ratio = self.coupling = math.nan


def _norm(r: torch.Tensor) -> torch.Tensor:
    """``||r||`` (``[1]``, on the device)."""
    return torch.linalg.vector_norm(r, dim=0, keepdim=True)


def python_loop(system: System, x: torch.Tensor, r: torch.Tensor, rnorm: float, maxiter: int, progress: Progress,
                stagnation: Stagnation, *, W: Optional[torch.Tensor] = None, AW: Optional[torch.Tensor] = None,
                lanczos=None, reproject_below: float = 0.0) -> Tuple[int, str]:
    """(Deflated) CG from ``x`` with residual ``r`` (``||r|| = rnorm``), at most ``maxiter`` steps.

    ``W``, ``AW`` (``[k, n]``, ``W^T A W = I``, ``W^T r = 0``): the deflation space, or None
    (plain CG); steps that end with ``||r|| < reproject_below`` restore ``W^T r = 0`` as
    ``krylov_defcg_``'s (:func:`~lowrank_ops.ops.krylov.defcg_cpu`).  ``lanczos``:
    DeflatedCG's record of the Lanczos process (``stage`` and ``commit``), or None.  Stops
    when the recursive residual meets ``system.target`` and the recomputed true one confirms
    it, else restarts from the true residual (projected on ``W``; the record stops), or
    stops as ``"stagnation"`` when ``stagnation`` says so.  Updates ``x``, ``lanczos``,
    ``stagnation`` and ``progress.history`` (reporting each entry once final); returns
    ``(iterations, status)``.
    """
    bnorm, target, history = system.bnorm, system.target, progress.history
    recording = lanczos is not None
    couplings = Couplings()

    def conjugate(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # p -= W AW^T z: A-conjugate to W
        if W is not None:
            subtract_without_norm(W, p, dots(AW, z))
        return p

    z = system.unprecondition(r)
    p = conjugate(z, z.clone())
    rz_device = dots(r[None], z)
    rz, = read(rz_device)
    iterations, status = 0, "maxiter"
    while iterations < maxiter:
        if rnorm <= target:
            r = system.residual(x)  # confirm on the true residual
            rnorm, = read(_norm(r))
            if rnorm <= target:
                history[-1] = rnorm / bnorm
                status = "converged"
                break
            if stagnation.failed_confirmation(x, rnorm):
                history[-1] = rnorm / bnorm
                status = "stagnation"
                break
            if W is not None:
                rnorm = project(W, AW, x, r)
            history[-1] = rnorm / bnorm
            z = system.unprecondition(r)
            p = conjugate(z, z.clone())
            rz_device = dots(r[None], z)
            rz, = read(rz_device)
            recording = False  # the restarted iteration does not continue the recorded Lanczos process
        progress.report()
        q = system.A.apply(p)
        system.matvecs += 1
        if not 0.0 < rz < math.inf:  # M is not positive definite, or returned NaN / inf
            status = "breakdown"
            break
        curvature_device = dots(p[None], q)
        if recording:
            lanczos.stage(z, rz)  # this step's Lanczos vector, before z (r itself without M) is overwritten
        # r on the device's alpha, x once the host has checked it: a breakdown leaves x as it
        # was (r, then meaningless, is dropped).
        r.addcmul_(q, torch.div(rz_device, curvature_device), value=-1.0)
        z = system.unprecondition(r)
        rz_new_device = dots(r[None], z)
        curvature, rnorm, rz_new = read(curvature_device, _norm(r), rz_new_device)
        if not 0.0 < curvature < math.inf:  # A is not positive definite, or returned NaN / inf
            status = "breakdown"
            break
        alpha = rz / curvature
        x.add_(p, alpha=alpha)
        iterations += 1
        history.append(rnorm / bnorm)
        if W is not None and target < rnorm < reproject_below:  # x += W c, r -= AW c, c = W^T r
            coefficients = dots(W, r)
            subtract_without_norm(W, x, -coefficients)
            subtract_without_norm(AW, r, coefficients)
            z = system.unprecondition(r)
            rz_new_device = dots(r[None], z)
            rz_new, = read(rz_new_device)
        beta = rz_new / rz
        if recording:
            entries = couplings.entries(alpha)
            recording = entries is not None
            if recording:
                lanczos.commit(*entries)
                couplings.advance(alpha, beta)
        p = conjugate(z, p.mul_(beta).add_(z))
        rz, rz_device = rz_new, rz_new_device
    return iterations, status
