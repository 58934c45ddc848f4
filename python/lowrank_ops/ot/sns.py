"""Sinkhorn-Newton-Sparse (Tang et al., ICLR 2024), batched.

Sinkhorn warm-up, then Newton steps on the concave dual
``F(f, g) = <a, f> + <b, g> - reg sum_ij P_ij``, whose negated Hessian is
``(1 / reg) K`` with ``K = [[diag(P 1), P], [P^T, diag(P^T 1)]]``.  Each Newton step:

1. keeps the ``ceil(rho n m)`` largest entries of P, or more: enough to leave at most
   ``drop_mass`` of the plan's mass out (threshold by a two-level histogram of ``log P``,
   no sort: :func:`select_threshold`), and gathers them as CSR; the diagonal blocks stay
   exact.  The count doubles for a problem after a rejected step, a step that did not
   lower the marginal error, or a full step that did not halve it (the sparsified
   Hessian is then too poor a model);
2. solves ``K_s d = reg grad F`` by Jacobi-preconditioned conjugate gradients, to the
   inexact-Newton relative tolerance ``min(0.5, sqrt(||grad||_1))`` by default (the
   sparsified K_s is positive definite: dropping off-diagonal entries of the PSD,
   weakly diagonally dominant K makes it strictly dominant; the null direction
   ``(1, -1)`` of the exact K, along which the plan does not change, is projected out
   of d);
3. backtracking line search (Armijo) on F, with the increase evaluated as
   ``alpha (<a, dx> + <b, dy>) - reg sum_i r_i expm1(lse'_i - lse_i)`` so that it keeps
   its relative precision near the optimum;
4. a problem whose step fails the line search takes a Sinkhorn step instead.

By default the solve runs through epsilon scaling (:func:`lowrank_ops.ot.sinkhorn.reg_schedule`):
from zeros at small reg, the first Newton steps are damped to steps of 1/100 and
alternate with Sinkhorn steps for dozens of iterations (points n = 1000, reg = 1e-2:
47 Newton steps, 108 iterations) while, warm-started from the next larger reg, Newton
takes full steps at once (14 Newton steps, 30 iterations in all stages).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .._args import is_real_number, require_int
from ..ops import ot as ot_ops
from ._problem import Problem
from .result import OTResult, make_result
from .sinkhorn import _STAGE_TOL, SinkhornState, _check_tol, reg_schedule

__all__ = ["sinkhorn_newton_sparse", "select_threshold"]

_N_BINS = 1024
_SLOW = 0.5  # a full Newton step must at least halve the marginal error, else keep more entries
_STAGE_WARMUP = 2  # Sinkhorn steps opening each epsilon-scaling stage after the first


def select_threshold(problem: Problem, f, g, row_lse, active, k, mass: float = 0.0) -> torch.Tensor:
    """Per problem, a threshold ``t`` on ``log P`` with at least ``k`` entries ``>= t``
    (and few more: ties within the last sub-bin of width ``W / 1024^2``).

    Two histogram passes over the entries: 1024 bins over ``[h - W, h)`` with
    ``h = max_i log(P 1)_i`` (an upper bound of every entry) and ``W`` = 64 (float64) or
    32 (float32), then 1024 bins of the coarse bin holding the k-th largest entry.  When
    fewer than k entries lie above ``h - W`` (they are below ``e^-W`` times the largest
    row mass: negligible in the Hessian) the threshold is ``h - W``.

    ``k`` is an int or a ``[B]`` int64 tensor (one count per problem).  ``mass`` > 0 also
    bounds the plan mass left below the threshold: the threshold is lowered (more entries
    kept) to the highest coarse bin edge below which the entries hold at most ``mass``
    (bounded by count x upper edge per bin, so the bound is safe, never optimistic).
    """
    width = 64.0 if problem.dtype == torch.float64 else 32.0
    hi = row_lse.max(-1).values
    lo = hi - width
    args = (problem.C, problem.x, problem.y, f, g, problem.reg, problem.code, active)
    k = torch.as_tensor(k, dtype=torch.int64, device=hi.device).reshape(-1, 1)

    def first_reaching(counts):
        # counts[t] from the top bin down; the first bin where the running total reaches k.
        total = counts.flip(-1).cumsum(-1)
        reach = total >= k
        return reach.any(-1), _N_BINS - 1 - reach.to(torch.int8).argmax(-1)

    coarse_counts = ot_ops.log_histogram(*args, lo, hi, _N_BINS)
    found, coarse = first_reaching(coarse_counts)
    bin_width = (hi - lo) / _N_BINS
    lo2 = lo + coarse.to(lo.dtype) * bin_width
    found2, fine = first_reaching(ot_ops.log_histogram(*args, lo2, lo2 + bin_width, _N_BINS))
    threshold = lo2 + fine.to(lo.dtype) * (bin_width / _N_BINS)
    # Rounding between the two levels can leave the fine level short of k: keep the coarse bin.
    threshold = torch.where(found2, threshold, lo2)
    threshold = torch.where(found, threshold, lo)
    if mass > 0:
        edges = lo[:, None] + bin_width[:, None] * torch.arange(1, _N_BINS + 1, device=lo.device, dtype=lo.dtype)
        # below[t]: bound of the mass in the bins under bin t (plus the < e^-W tail, ignored).
        below = torch.cumsum(coarse_counts.to(lo.dtype) * edges.exp(), -1) - coarse_counts.to(lo.dtype) * edges.exp()
        fits = below <= mass
        top_fit = _N_BINS - 1 - fits.flip(-1).to(torch.int8).argmax(-1)  # the highest bin t that fits
        by_mass = lo + top_fit.to(lo.dtype) * bin_width
        threshold = torch.minimum(threshold, by_mass)
    return threshold


def _dot(u, v):
    return (u * v).sum(-1)


def _pcg(matvec, rhs, diag, active, tol: float, max_iter: int):
    """Batched Jacobi-preconditioned CG for ``K d = rhs`` ([B, n + m]); problems stop
    individually at ``||residual|| <= tol ||rhs||``.  Returns (d, iterations [B])."""
    sol = torch.zeros_like(rhs)
    res = rhs.clone()
    inv_diag = 1.0 / diag.clamp_min(torch.finfo(diag.dtype).tiny)
    z = res * inv_diag
    direction = z.clone()
    rz = _dot(res, z)
    goal = tol * rhs.norm(dim=-1)
    running = active & (rhs.norm(dim=-1) > goal)
    iterations = torch.zeros(rhs.shape[0], dtype=torch.int64, device=rhs.device)
    for _ in range(max_iter):
        if not bool(running.any()):
            break
        product = matvec(direction, running)
        curvature = _dot(direction, product)
        # A non-positive curvature only arises from rounding at convergence: stop there.
        running = running & (curvature > 0)
        step = torch.where(running, rz / torch.where(running, curvature, torch.ones_like(curvature)),
                           torch.zeros_like(rz))
        sol = sol + step[:, None] * direction
        res = res - step[:, None] * product
        iterations += running.to(torch.int64)
        running = running & (res.norm(dim=-1) > goal)
        z = res * inv_diag
        rz_new = _dot(res, z)
        beta = torch.where(running, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        direction = z + beta[:, None] * direction
        rz = rz_new
    return sol, iterations


class _NewtonLog:
    def __init__(self) -> None:
        self.cg: List[torch.Tensor] = []
        self.steps: List[torch.Tensor] = []
        self.who: List[torch.Tensor] = []

    def add(self, cg, step, who) -> None:
        self.cg.append(cg)
        self.steps.append(step)
        self.who.append(who.clone())

    def per_problem(self, values: List[torch.Tensor], batch: int, like: torch.Tensor) -> List[torch.Tensor]:
        if not values:
            return [like.new_empty(0) for _ in range(batch)]
        stacked, who = torch.stack(values, 1), torch.stack(self.who, 1)
        return [stacked[i][who[i]] for i in range(batch)]


def _newton_step(problem: Problem, state: SinkhornState, col_lse, active, k, mass: float, cg_tol,
                 cg_max_iter: int, armijo: float, max_halvings: int):
    """One sparse Newton step on the active problems (``k`` [B] entries kept, ``cg_tol`` [B]
    relative CG tolerances); returns (accepted, cg iterations, step)."""
    p, f, g, row_lse = problem, state.f, state.g, state.row_lse
    n = p.n
    r, c = row_lse.exp(), col_lse.exp()
    grad = torch.cat([p.a - r, p.b - c], -1)
    threshold = select_threshold(p, f, g, row_lse, active, k, mass)
    row_ptr, col_idx, values = ot_ops.sparsify(p.C, p.x, p.y, f, g, p.reg, p.code, active, threshold)

    def matvec(v, _running):
        out_x, out_y = ot_ops.hessian_matvec_sparsified(row_ptr, col_idx, values, r, c, v[:, :n], v[:, n:])
        return torch.cat([out_x, out_y], -1)

    direction, cg_iterations = _pcg(matvec, p.reg * grad, torch.cat([r, c], -1), active, cg_tol, cg_max_iter)
    dx, dy = direction[:, :n], direction[:, n:]
    shift = (dx.sum(-1) - dy.sum(-1)) / (p.n + p.m)  # remove the (1, -1) component (plan unchanged)
    dx, dy = dx - shift[:, None], dy + shift[:, None]
    slope = _dot(grad[:, :n], dx) + _dot(grad[:, n:], dy)
    linear = _dot(p.a, dx) + _dot(p.b, dy)

    alpha = torch.ones_like(slope)
    pending = active & (slope > 0) & torch.isfinite(slope)
    accepted = torch.zeros_like(active)
    new_f, new_g, new_row = f, g, row_lse
    for _ in range(max_halvings):
        if not bool(pending.any()):
            break
        trial_f, trial_g = f + alpha[:, None] * dx, g + alpha[:, None] * dy
        # A step too small to change f or g (near the optimum, where the gain drops below
        # the rounding of the lse terms) would pass the test below with a gain of exactly
        # alpha * linear and stall the solve: it ends the halving, rejected, and the
        # problem takes a Sinkhorn step instead.
        pending &= (trial_f != f).any(-1) | (trial_g != g).any(-1)
        trial_row, _ = p.lse(trial_f, trial_g, pending)
        gain = alpha * linear - p.reg * (r * torch.expm1(trial_row - row_lse)).sum(-1)
        ok = pending & (gain >= armijo * alpha * slope)
        new_f = torch.where(ok[:, None], trial_f, new_f)
        new_g = torch.where(ok[:, None], trial_g, new_g)
        new_row = torch.where(ok[:, None], trial_row, new_row)
        accepted |= ok
        pending &= ~ok
        alpha = torch.where(pending, alpha * 0.5, alpha)
    state.f, state.g, state.row_lse = new_f, new_g, new_row
    return accepted, cg_iterations, torch.where(accepted, alpha, torch.zeros_like(alpha))


def _newton_phase(problem: Problem, state: SinkhornState, log: _NewtonLog, newton_steps, keep, entries: int,
                  drop_mass: float, cg_tol: Optional[float], cg_floor: float, cg_max_iter: int, armijo: float,
                  max_halvings: int, max_iter: int) -> None:
    """Newton steps (Sinkhorn steps after rejected or stalled ones) until every problem
    of ``state`` converged or ``max_iter`` steps; updates ``state``, ``log``,
    ``newton_steps`` and ``keep`` in place.  ``cg_tol`` None: the forcing term."""
    just_newton = full_step = torch.zeros_like(state.active)
    before_newton = state.last_error.clone()  # each problem's error before its last Newton step
    for step in range(max_iter + 1):
        if not bool(state.active.any()):
            break
        col_lse, _ = problem.lse(state.f, state.g, state.active, columns=True)
        stalled = slow = torch.zeros_like(just_newton)
        if bool(just_newton.any()):
            error = (state.row_lse.exp() - problem.a).abs().sum(-1) + (col_lse.exp() - problem.b).abs().sum(-1)
            state.record(error, just_newton)
            # A Newton step that did not lower the marginal error (an accepted step
            # whose line search ran into rounding, or a poor sparsified Hessian) is
            # followed by a Sinkhorn step, which always makes progress.
            stalled = just_newton & ~(error < before_newton)
            # A full step that cut the error by less than half: Newton's fast local
            # convergence is missing, the sparsified Hessian is too poor a model (a
            # linear rate of 0.82 over 60 steps on the bench's 28 x 28 images otherwise).
            slow = just_newton & (full_step & (error > _SLOW * before_newton))
        active = state.active.clone()
        if step == max_iter or not bool(active.any()):
            break
        newton = active & ~stalled
        before_newton = torch.where(newton, state.last_error, before_newton)
        accepted = torch.zeros_like(newton)
        if bool(newton.any()):
            # Inexact Newton by default: CG to a relative residual min(0.5, sqrt(||grad||_1))
            # (the Eisenstat-Walker forcing term: early steps, whose direction the sparsified
            # Hessian only approximates anyway, are cheap; superlinear near the optimum),
            # never below the floor where rounding stalls the residual.
            step_tol = cg_tol if cg_tol is not None else state.last_error.sqrt().clamp(max=0.5).clamp(min=cg_floor)
            accepted, cg_iterations, alpha = _newton_step(problem, state, col_lse, newton, keep, drop_mass,
                                                          step_tol, cg_max_iter, armijo, max_halvings)
            log.add(cg_iterations, alpha, newton)
            newton_steps += accepted.to(torch.int64)
            full_step = alpha == 1
        # A rejected, stalled or slow Newton step means the sparsified Hessian may be too
        # poor a model here (spread-out plans: L1 costs, large reg): keep twice the entries next time.
        keep.copy_(torch.where((newton & ~accepted) | stalled | slow, (2 * keep).clamp(max=entries), keep))
        rejected = active & ~accepted
        if bool(rejected.any()):
            state.step(rejected)
        just_newton = accepted


def sinkhorn_newton_sparse(
    a: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    C: Optional[torch.Tensor] = None,
    reg: float = 1e-2,
    *,
    x: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    cost: str = "sqeuclidean",
    warmup: int = 20,
    rho: Optional[float] = None,
    cg_tol: Optional[float] = None,
    cg_max_iter: int = 1000,
    tol: Optional[float] = None,
    max_iter: int = 200,
    init=None,
    drop_mass: float = 1e-2,
    armijo: float = 1e-4,
    max_halvings: int = 40,
    epsilon_scaling=None,
) -> OTResult:
    """Entropic optimal transport by Sinkhorn-Newton-Sparse.

    Same problem, inputs and result as :func:`lowrank_ops.ot.sinkhorn`; after ``warmup``
    Sinkhorn iterations, Newton steps with the Hessian sparsified to the largest plan
    entries (module docstring), by default through a sequence of decreasing regs
    (``epsilon_scaling``).

    Parameters
    ----------
    a, b, C, reg, x, y, cost, tol, init
        As in :func:`lowrank_ops.ot.sinkhorn` (``init``: warm start, then still ``warmup``
        Sinkhorn iterations unless the start is within ``tol``).
    warmup : int
        Sinkhorn iterations before the first Newton step (>= 1; later epsilon-scaling
        stages open with ``min(warmup, 2)``).  Fewer are run when the error reaches the
        stage's tolerance.
    rho : float, optional
        Least fraction of the plan entries kept in the Hessian, in (0, 1]; default
        ``10 / min(n, m)`` (about ten entries per row).  The paper's ``lambda = 2 / n``
        converges only linearly on its own random assignment problem here (n = 500,
        eta = 1200: 33 Newton steps at a rate of about 0.66, against 6 steps with
        ``5 / n`` or ``10 / n``), and fails on 2-D point clouds at ``reg = 1e-3`` of the
        cost scale, where ``10 / n`` converges in 14.
    drop_mass : float
        In [0, 1): keep at least the entries holding all but this much of the plan's mass
        (bounded from the histogram, so a few more are kept); 0 keeps ``rho`` alone.
        The default 1e-2 adapts the count to spread-out plans (L1 costs, large reg).
    cg_tol, cg_max_iter : float, int
        Conjugate-gradient stopping rule: relative residual (default: the forcing term
        ``min(0.5, sqrt(||grad||_1))``, floored at 1e-8 in float64 and 1e-4 in float32,
        where rounding stalls the residual near 1e-6; a number: that tolerance at every
        step), iteration limit per step.  Truncated CG still gives an ascent direction (every CG iterate from 0
        has a positive inner product with the gradient).
    max_iter : int
        Limit on the Newton steps per epsilon-scaling stage (a rejected step, replaced by
        a Sinkhorn step, counts).
    armijo, max_halvings : float, int
        Backtracking line search: accept a step ``alpha d`` when the dual rises by at
        least ``armijo alpha <grad, d>`` (``armijo`` in [0, 0.5)), halving ``alpha``
        from 1 at most ``max_halvings`` times before the step is rejected.
    epsilon_scaling : bool, float or None
        As in :func:`lowrank_ops.ot.sinkhorn` (True: factor 4); None (default): on
        unless ``init`` is given (a warm start is assumed close already).  With it,
        ``iterations``, ``history``, ``cg_iterations`` and ``step_sizes`` cover all
        stages, and a batch follows its largest cost spread (so batched and one-by-one
        solves may take different iteration counts; each meets ``tol``).

    Returns
    -------
    OTResult
        As for Sinkhorn, with ``iterations`` = Sinkhorn + Newton steps, ``newton_steps``,
        and per-problem ``cg_iterations`` and ``step_sizes`` (0 for a rejected step).

    Notes
    -----
    The sparsified matrix is only an approximation of the Hessian: with too few entries
    (non-unique or spread-out plans, e.g. L1 costs; the paper uses ``rho = 15 / n``
    there) Newton converges only linearly or steps get rejected; the kept count then
    grows (module docstring).  Progress is visible in ``step_sizes`` and ``converged``.
    Measured on the bench's cases (bench/results/cpu-intel-xeon-2core/ot-sns-defaults/):
    the former defaults (top ``10 / n``, fixed CG tolerance, no scaling) took 72 Newton
    steps on 28 x 28 images (sqeuclidean), 151 on points n = 1000 at reg 1e-2, and did
    not converge on L1 images or at reg 1e-3; these converge in 14 to 32.
    """
    op = "sinkhorn_newton_sparse"
    problem = Problem(op, a, b, C, x, y, cost, reg)
    tol = _check_tol(op, tol, problem.dtype)
    warmup = require_int(op, "warmup", warmup)
    max_iter = require_int(op, "max_iter", max_iter, 0)
    cg_max_iter = require_int(op, "cg_max_iter", cg_max_iter)
    max_halvings = require_int(op, "max_halvings", max_halvings)
    cg_floor = 1e-8 if problem.dtype == torch.float64 else 1e-4
    forcing = cg_tol is None
    cg_tol = _check_tol(op, cg_floor if cg_tol is None else cg_tol, problem.dtype, "cg_tol")
    for name, value, upper in (("drop_mass", drop_mass, 1.0), ("armijo", armijo, 0.5)):
        if not is_real_number(value) or not 0 <= value < upper:
            raise ValueError(f"{op}: {name} must be a number in [0, {upper:g}); got {value!r}")
    size = max(min(problem.n, problem.m), 1)
    rho = min(1.0, 10.0 / size) if rho is None else rho
    if not is_real_number(rho) or not 0 < rho <= 1:
        raise ValueError(f"{op}: rho must be a number in (0, 1]; got {rho!r}")
    entries = problem.n * problem.m

    base_keep = max(1, min(entries, math.ceil(rho * entries)))
    if epsilon_scaling is None:  # on from zeros; a warm start is assumed close already
        epsilon_scaling = init is None
    regs = reg_schedule(op, problem, epsilon_scaling)

    with torch.no_grad():  # the iterations are not differentiated: the value's backward is analytic
        log = _NewtonLog()
        state = None
        newton_steps = None
        for i, stage_reg in enumerate(regs):
            stage = problem.with_reg(stage_reg)
            stage_tol = tol if i == len(regs) - 1 else max(tol, _STAGE_TOL)
            if state is None:
                state = SinkhornState(stage, stage_tol, init, op)
                state.run(warmup)
                newton_steps = torch.zeros_like(state.iterations)
            else:
                # Warm-started from the previous stage: close, a short warm-up suffices
                # (measured with 2, the bench's cases).
                state.restart(stage, stage_tol)
                state.run(min(warmup, _STAGE_WARMUP))
            keep = torch.full_like(newton_steps, base_keep)
            _newton_phase(stage, state, log, newton_steps, keep, entries, drop_mass, cg_tol if not forcing else None,
                          cg_floor, cg_max_iter, armijo, max_halvings, max_iter)
    like = state.f.new_empty(0)
    return make_result(
        problem, state.f, state.g, state.converged, state.iterations, state.history(),
        newton_steps=newton_steps,
        cg_iterations=log.per_problem(log.cg, problem.batch, like.to(torch.int64)),
        step_sizes=log.per_problem(log.steps, problem.batch, like),
    )
