"""Log-domain Sinkhorn (Cuturi, NeurIPS 2013), batched with per-problem convergence."""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .._args import is_real_number, require_int
from ._problem import Problem, _is_number
from .result import OTResult, make_result

__all__ = ["sinkhorn", "SinkhornState"]


#: The marginal tolerance of ``tol=None``, per dtype: float64 1e-9 (POT's stopThr);
#: float32 1e-5, because float32 iterations level off at a marginal error of 2e-7 to
#: 9e-7 (measured: n = m = 10 to 4000 points, reg 0.1 and 0.01, 3000 iterations), so a
#: 1e-9 goal was never met there: every float32 solve ran to max_iter and reported
#: converged = False.
DEFAULT_TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _check_tol(op: str, tol, dtype: torch.dtype, name: str = "tol") -> float:
    """``tol`` (the argument ``name``), or the dtype's default (DEFAULT_TOL) for None."""
    if tol is None:
        return DEFAULT_TOL[dtype]
    if not _is_number(tol) or not (0 <= tol < float("inf")):
        raise ValueError(f"{op}: {name} must be None or a finite number >= 0; got {tol!r}")
    return float(tol)


#: Epsilon scaling: the stages' regs grow by this factor from the target reg up to the
#: cost spread, and the stages before the last stop at a marginal error of _STAGE_TOL
#: (only a start for the next stage: the last stage meets tol).
_EPS_FACTOR = 4.0
_STAGE_TOL = 1e-2
#: At most this many stages: the factor grows where the cost spread over reg would need
#: more (4^64 = 3.4e38).  A spread of 1e300 (one huge finite cost) made ~500 stages of up
#: to max_iter steps each (SNS: 96,386 iterations, 115 s on an 8 x 6 problem), and a factor
#: of 1.000000001 a Python list of 4.6e9 regs (the process killed for memory).
_MAX_STAGES = 64


def reg_schedule(op: str, problem: Problem, epsilon_scaling) -> List[float]:
    """The regs of the stages, decreasing to ``problem.reg``: ``reg * factor^k`` for
    ``k = K, ..., 0`` with the first at most the cost spread (where the plan is nearly
    uniform and a few Sinkhorn steps converge).  ``epsilon_scaling``: False (one stage),
    True (factor 4) or a factor > 1, raised where more than :data:`_MAX_STAGES` stages
    would be needed."""
    if epsilon_scaling is False:
        return [problem.reg]
    factor = _EPS_FACTOR if epsilon_scaling is True else epsilon_scaling
    if not is_real_number(factor) or not 1 < factor < math.inf:
        raise ValueError(f"{op}: epsilon_scaling must be True, False or a factor > 1; got {epsilon_scaling!r}")
    spread = problem.cost_spread()
    if not spread > problem.reg:
        return [problem.reg]
    ratio = math.log(spread) - math.log(problem.reg)  # (spread / reg may overflow: 1e300 / 1e-9)
    if ratio > _MAX_STAGES * math.log(factor):
        factor = math.exp(ratio / _MAX_STAGES)
    log_factor = math.log(factor)
    stages = min(int(math.floor(ratio / log_factor)), _MAX_STAGES)

    def stage_reg(k: int) -> float:  # reg factor^k, through logs where factor^k alone would overflow
        return problem.reg * factor**k if k * log_factor < 700.0 else math.exp(math.log(problem.reg) + k * log_factor)

    return [stage_reg(k) for k in range(stages, -1, -1)]


class SinkhornState:
    """Potentials, per-problem activity and bookkeeping of a batched solve.

    Invariant after :meth:`step`: the column marginals of (f, g) are exact up to rounding
    (g was just updated) and ``row_lse`` holds the row log marginals, so the gradient norm
    is ``||exp(row_lse) - a||_1`` plus that rounding, which is checked where the row
    error meets ``tol``.
    """

    def __init__(self, problem: Problem, tol: float, init=None, op: str = "sinkhorn") -> None:
        self.problem = problem
        self.tol = tol
        self.f, self.g = problem.initial_potentials(op, init)
        self.active = torch.ones(problem.batch, dtype=torch.bool, device=problem.device)
        self.converged = torch.zeros_like(self.active)
        self.iterations = torch.zeros(problem.batch, dtype=torch.int64, device=problem.device)
        self.errors: List[torch.Tensor] = []  # [B] per recorded iteration (NaN-free; inactive entries unused)
        self.recorded: List[torch.Tensor] = []  # [B] bool: which problems the entry belongs to
        self.row_lse: Optional[torch.Tensor] = None
        self.last_error = torch.full((problem.batch,), math.inf, dtype=problem.dtype, device=problem.device)
        if init is not None:
            self._check_start()

    def _check_start(self) -> None:
        """Warm start: a problem whose start already meets ``tol`` stops with 0 iterations;
        the others begin with the f update (both given potentials are used: starting
        with the g update, as from zeros, would discard g0)."""
        p = self.problem
        self.row_lse, _ = p.lse(self.f, self.g)
        col_lse, _ = p.lse(self.f, self.g, columns=True)
        error = (self.row_lse.exp() - p.a).abs().sum(-1) + (col_lse.exp() - p.b).abs().sum(-1)
        self.last_error = error
        done = error <= self.tol
        self.converged |= done
        # An overflowing error (potentials from another reg) is not a failure: the log-domain
        # updates start from finite row_lse and repair it.
        self.active &= ~done

    def restart(self, problem: Problem, tol: float) -> None:
        """Continue from the current potentials on ``problem`` (the next reg of epsilon
        scaling; every problem active again), keeping the iteration counts and history."""
        self.problem, self.tol = problem, tol
        # Balance the free constant (f + c, g - c: the same plan) between f and g.  Each
        # stage's Sinkhorn steps shift it by about reg log n, and |f| + |g| sets the
        # rounding of (f + g - C) / reg: float32 at reg = 1e-4 stalled at a marginal
        # error of 1e-3 with |f| near 10 (u |f| / reg = 1e-2 relative in P).
        shift = (self.f.mean(-1, keepdim=True) - self.g.mean(-1, keepdim=True)) / 2
        self.f, self.g = self.f - shift, self.g + shift
        self.active = torch.ones_like(self.active)
        self.converged = torch.zeros_like(self.converged)
        self._check_start()

    def record(self, error: torch.Tensor, who: torch.Tensor) -> None:
        self.errors.append(error)
        self.recorded.append(who)
        self.last_error = torch.where(who, error, self.last_error)
        self.iterations += who.to(torch.int64)
        newly = who & (error <= self.tol)
        self.converged |= newly
        # A non-finite error can only come from non-finite potentials: stop that problem
        # (reported as not converged) instead of iterating on NaN.
        self.active &= ~newly & torch.isfinite(error)

    def step(self, mask: Optional[torch.Tensor] = None) -> None:
        """One Sinkhorn iteration (row update, then column update) on the active problems
        (or on ``mask``, a subset of them)."""
        p = self.problem
        active = self.active if mask is None else mask
        if self.row_lse is not None:  # f's update uses the row marginals of the last step
            self.f = torch.where(active[:, None], self.f + p.reg * (p.log_a - self.row_lse), self.f)
        col_lse, _ = p.lse(self.f, self.g, active, columns=True)
        self.g = torch.where(active[:, None], self.g + p.reg * (p.log_b - col_lse), self.g)
        row_lse, _ = p.lse(self.f, self.g, active)
        self.row_lse = torch.where(active[:, None], row_lse, self.row_lse) if self.row_lse is not None else row_lse
        error = (self.row_lse.exp() - p.a).abs().sum(-1)
        # The column marginals are exact only up to rounding, which in float32 with large
        # |g| / reg is ~1e-5 (the row error alone passed tol while the result's
        # marginal_error was up to 2x tol): a problem whose row error passes is stopped on
        # its full error, at the price of one more column pass then.
        candidates = active & (error <= self.tol)
        if bool(candidates.any()):
            col_lse, _ = p.lse(self.f, self.g, candidates, columns=True)
            error = torch.where(candidates, error + (col_lse.exp() - p.b).abs().sum(-1), error)
        self.record(error, active.clone())

    def run(self, max_steps: int) -> None:
        for _ in range(max_steps):
            if not bool(self.active.any()):
                return
            self.step()

    def history(self) -> List[torch.Tensor]:
        if not self.errors:
            return [self.f.new_empty(0) for _ in range(self.problem.batch)]
        errors, who = torch.stack(self.errors, 1), torch.stack(self.recorded, 1)
        return [errors[i][who[i]] for i in range(self.problem.batch)]


def sinkhorn(
    a: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    C: Optional[torch.Tensor] = None,
    reg: float = 1e-2,
    *,
    x: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
    cost: str = "sqeuclidean",
    tol: Optional[float] = None,
    max_iter: int = 10_000,
    init=None,
    epsilon_scaling=False,
) -> OTResult:
    """Entropic optimal transport by log-domain Sinkhorn iterations.

    Solves ``min_P <C, P> + reg sum P (log P - 1)`` subject to ``P 1 = a``, ``P^T 1 = b``
    by alternating exact maximization of the dual in f and g, every update a fused
    log-sum-exp kernel (never exponentiating unshifted values: no overflow or NaN at
    small reg, in float32 or float64).

    Parameters
    ----------
    a, b : Tensor[..., n], Tensor[..., m] or None
        Masses: positive, each summing to 1 within ``sqrt(eps)`` of the coarser of their
        and the cost's dtypes (None: uniform).  Cast to the cost's dtype and renormalized
        (values only; gradients pass unchanged).
    C : Tensor[..., n, m], optional
        Cost matrices, float32 or float64, finite, any strides.
    reg : float
        Entropic regularization (> 0); ``eta = 1 / reg`` in the SNS paper.
    x, y : Tensor[..., n, d], Tensor[..., m, d], optional
        Point clouds instead of C (float32 or float64); the cost is computed inside the
        kernels and the ``n x m`` matrix is never stored.
    cost : {"sqeuclidean", "l1"}
        The ground cost between point clouds: ``||x_i - y_j||^2`` or ``||x_i - y_j||_1``.
        Used only with ``x`` and ``y``.
    tol : float, optional
        Stop a problem when ``||P 1 - a||_1 + ||P^T 1 - b||_1 <= tol`` (the column
        marginals are exact after each iteration up to rounding, which is added in once
        the row error meets tol).  Default (None): 1e-9 in float64,
        1e-5 in float32, whose rounding levels the error off near 1e-6
        (:data:`DEFAULT_TOL`); higher where costs are ~1e3 reg (about 2e-5 for
        unit-variance clouds at reg 0.01, with epsilon scaling): use float64 there.
    max_iter : int
        Iteration limit per problem.
    init : (Tensor[..., n], Tensor[..., m]) or OTResult, optional
        Warm start: initial potentials ``(f0, g0)`` in the convention of ``OTResult.f`` /
        ``.g`` (``P_ij = exp((f0_i + g0_j - C_ij) / reg)``), of the batch shape of the
        problem or unbatched ``(n,)`` / ``(m,)`` (shared by every problem), in the dtype
        and on the device of the cost; or a previous ``OTResult`` (its ``f``, ``g``).
        E.g. the result of a related problem (a training step earlier) or of a larger
        ``reg`` (epsilon scaling).  A start already within ``tol`` returns after 0
        iterations.  Default: zeros.
    epsilon_scaling : bool or float
        Solve a sequence of problems with reg decreasing by a factor (True: 4; or the
        given factor > 1) from the spread of the cost down to ``reg``, each warm-started
        from the previous one and solved to a marginal error of 1e-2 (the last to
        ``tol``): at small reg the plain iterations from zeros are slow to leave the
        start.  ``iterations`` and ``history`` cover all stages; ``max_iter`` applies per
        stage.  In a batch the stages follow the largest cost spread of the batch.

    Returns
    -------
    OTResult
        Potentials, ``cost = <C, P>``, differentiable ``value``, per-problem
        ``converged`` / ``iterations`` / ``history``; non-convergence is reported there,
        never raised or hidden.

    Notes
    -----
    The ``...`` batch dimension holds independent problems solved together; a problem
    stops updating once converged (per-problem masks), so batched and one-by-one solves
    agree.  Every iteration synchronizes with the device twice (whether any problem is
    still active, and whether any passed the row test and needs its column error).
    """
    op = "sinkhorn"
    problem = Problem(op, a, b, C, x, y, cost, reg)
    tol, max_iter = _check_tol(op, tol, problem.dtype), require_int(op, "max_iter", max_iter)
    with torch.no_grad():  # the iterations are not differentiated: the value's backward is analytic
        regs = reg_schedule(op, problem, epsilon_scaling)
        state = None
        for i, stage_reg in enumerate(regs):
            stage = problem.with_reg(stage_reg)
            stage_tol = tol if i == len(regs) - 1 else max(tol, _STAGE_TOL)
            if state is None:
                state = SinkhornState(stage, stage_tol, init, op)
            else:
                state.restart(stage, stage_tol)
            state.run(max_iter)
    return make_result(problem, state.f, state.g, state.converged, state.iterations, state.history())
