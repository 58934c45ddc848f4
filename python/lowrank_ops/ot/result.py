"""The solvers' result object and the differentiable entropic OT value."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from .._args import is_integer
from .._autocast import autocast_off_backward
from .._csr import quiet_sparse_csr_beta
from .._first_order import second_order_refusal
from ..ops import ot as ot_ops
from ..ops._library import forward_mode_active, in_functorch_transform
from ._problem import Problem

__all__ = ["OTResult", "entropic_value"]


_SECOND_ORDER = ("OTResult.value: second derivatives are not implemented (its gradients are the envelope theorem's, "
                 "first order: P's dependence on C through the potentials is not in them)")
# The gradients are exact to first order only: create_graph=True and torch.func's nested
# transforms returned silently wrong Hessian-vector products (0.15 off at a scale of 0.17).
_SecondOrderRefused = second_order_refusal("_SecondOrderRefused", _SECOND_ORDER)


def _value_gradients(ctx, saved, needs) -> list:
    """``d value / d (C, x, y, a, b)`` per problem (``[B, ...]``, None where not needed),
    from the saved tensors (``ctx.saved_tensors``, read once by the caller: under
    non-reentrant checkpointing a second read raised): the envelope theorem's (see
    :class:`_EntropicValue`)."""
    C, x, y, a, b, f, g, row_lse, col_lse = saved
    grads = [None] * 5
    if needs[0]:
        grads[0] = torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - C) / ctx.reg)
    # (The point-cost gradients are not differentiable: no_grad keeps torch.func's grad
    # transforms, whose tensors track gradients here, off the op's autograd node.)
    if needs[1]:
        with torch.no_grad():
            row = ot_ops.row_grad(x, y, f, g, ctx.reg, ctx.code, row_lse)
        grads[1] = row_lse.exp().unsqueeze(-1) * row
    if needs[2]:
        with torch.no_grad():
            col = ot_ops.row_grad(x, y, f, g, ctx.reg, ctx.code, col_lse, columns=True)
        grads[2] = col_lse.exp().unsqueeze(-1) * col
    if needs[3]:
        grads[3] = f - f.mean(-1, keepdim=True)
    if needs[4]:
        grads[4] = g - g.mean(-1, keepdim=True)
    return grads


class _EntropicValue(torch.autograd.Function):
    """The optimal entropic value with its envelope-theorem gradients.

    ``value = min_P <C, P> + reg sum_ij P_ij (log P_ij - 1)`` over the plans with
    marginals (a, b) equals the dual optimum ``<a, f> + <b, g> - reg sum_ij P_ij``; the
    envelope theorem gives ``d value / d C = P``, ``d value / d a = f`` and
    ``d value / d b = g`` (centered: masses move on the simplex, where the potentials are
    defined up to a constant), and for point clouds ``d value / d x_i = sum_j P_ij
    dC(x_i, y_j)/dx_i`` (likewise for y).  Exact at the optimum; at a tolerance ``tol``
    on the marginals the gradients are off by O(tol).  Forward mode (``jvp``): the same
    gradients contracted with the tangents.  First order only (:class:`_SecondOrderRefused`).
    """

    @staticmethod
    def forward(value, C, x, y, a, b, problem, f, g, row_lse, col_lse):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        # (torch.func's style, so that torch.func.grad / vjp / jacrev / jvp differentiate a
        # solve as autograd does.)  The backward reads C, x and y from the saved tensors, not
        # from ``problem``: under a transform those are the transform's own wrappers.
        _, C, x, y, a, b, problem, f, g, row_lse, col_lse = inputs
        ctx.reg, ctx.code = problem.reg, problem.code
        ctx.save_for_backward(C, x, y, a, b, f, g, row_lse, col_lse)
        ctx.save_for_forward(C, x, y, a, b, f, g, row_lse, col_lse)

    @staticmethod
    @autocast_off_backward
    def backward(ctx, grad_value):
        saved = ctx.saved_tensors
        grads = _value_gradients(ctx, saved, ctx.needs_input_grad[1:6])
        sources = saved[:5]
        # The gradients' graph is being built (create_graph, torch.func), or their tangents
        # (forward over reverse): tie them to the refusal.
        refuse = torch.is_grad_enabled() or forward_mode_active()
        for i, grad in enumerate(grads):
            if grad is not None:
                grad = grad_value.reshape(-1, *([1] * (grad.dim() - 1))) * grad
                grads[i] = grad + _SecondOrderRefused.apply(sources[i]) if refuse else grad
        return (None, *grads, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, value_tangent, *tangents):
        inputs = tangents[:5]  # C, x, y, a, b
        saved = ctx.saved_tensors
        grads = _value_gradients(ctx, saved, [t is not None for t in inputs])
        out = torch.zeros_like(saved[5][:, 0])
        for grad, tangent, source in zip(grads, inputs, saved[:5]):
            if grad is not None:
                # + a refusal tied to the input: the tangent differentiated again (reverse
                # over forward, forward over forward) was a wrong second derivative.
                out = out + (grad * tangent).flatten(1).sum(-1) + _SecondOrderRefused.apply(source)
        return out


def entropic_value(problem: Problem, f, g, row_lse, col_lse) -> torch.Tensor:
    """``[B]`` dual value of (f, g), differentiable in C or (x, y), a and b (see _EntropicValue)."""
    with torch.no_grad():
        value = problem.dual(f, g, row_lse)
    inputs = (problem.C, problem.x, problem.y, problem.a, problem.b)
    reverse = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if not (reverse or in_functorch_transform() or forward_mode_active()):
        return value  # (a jvp's tangents do not make inputs require grad: they were lost here)
    return _EntropicValue.apply(value, *inputs, problem, f, g, row_lse, col_lse)


@dataclasses.dataclass
class OTResult:
    """Result of :func:`lowrank_ops.ot.sinkhorn` and :func:`lowrank_ops.ot.sinkhorn_newton_sparse`.

    Shapes: ``...`` is the batch shape of the inputs (empty for one problem).  The plan
    is ``P_ij = exp((f_i + g_j - C_ij) / reg)``.

    Attributes
    ----------
    f, g : Tensor[..., n], Tensor[..., m]
        Dual potentials (dtype of the cost).
    cost : Tensor[...]
        Transport cost ``<C, P>`` (not differentiable; see ``value``).
    value : Tensor[...]
        Entropic OT value ``<C, P> + reg sum P (log P - 1)`` = ``<a, f> + <b, g> - reg sum P``,
        differentiable (envelope theorem): d/dC = P, d/da = f, d/db = g (centered),
        d/dx and d/dy through the point cost.
    converged : Tensor[...] bool
        Whether ``||grad||_1 = ||P 1 - a||_1 + ||P^T 1 - b||_1 <= tol`` was reached.
    iterations : Tensor[...] int64
        Iterations used: Sinkhorn iterations (one row and one column update each),
        plus Newton steps for SNS.
    marginal_error : Tensor[...]
        Final ``||grad||_1``.
    history : list of Tensor
        Per problem (flattened batch order), the marginal error after every iteration.
    newton_steps : Tensor[...] int64 or None
        SNS: Newton steps taken (the rest of ``iterations`` were Sinkhorn steps).
    cg_iterations, step_sizes : list of Tensor or None
        SNS: per problem, the CG iterations and the line-search step of every Newton step
        (step 0 marks a rejected step, replaced by a Sinkhorn step).
    reg : float
    """

    f: torch.Tensor
    g: torch.Tensor
    cost: torch.Tensor
    value: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    marginal_error: torch.Tensor
    history: List[torch.Tensor]
    reg: float
    newton_steps: Optional[torch.Tensor] = None
    cg_iterations: Optional[List[torch.Tensor]] = None
    step_sizes: Optional[List[torch.Tensor]] = None
    _problem: Optional[Problem] = dataclasses.field(default=None, repr=False)

    def plan(self, top: Optional[int] = None):
        """The transport plan.

        Parameters
        ----------
        top : int, optional
            None: the dense plan ``[..., n, m]`` (materializes the cost for point clouds).
            Else: at least its ``top`` largest entries (per problem; ties at the
            selection threshold may add a few) as a ``torch.sparse_csr_tensor`` of shape
            ``[n, m]``, or a list of them for a batch; found by the selection kernels,
            without forming the dense plan.  Entries below ``e^-64`` (float32: ``e^-32``)
            times the largest row mass are never selected, so a plan with fewer entries
            above that gives fewer than ``top`` (at reg 0.01 on costs of 100, 12 of 20:
            the rest were below 1e-92).

        Returns
        -------
        Tensor or list of Tensor
            ``top=None``: the dense plan ``[..., n, m]``.  Else a sparse CSR tensor
            ``[n, m]`` for a single problem, a list of ``batch`` of them (the batch
            flattened) otherwise.  In the potentials' dtype (float32 or float64), on their
            device; not differentiable (computed under ``torch.no_grad``).
        """
        problem = self._problem
        f = self.f.reshape(problem.batch, problem.n)
        g = self.g.reshape(problem.batch, problem.m)
        if top is None:
            with torch.no_grad():
                plan = torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - problem.dense_cost()) / problem.reg)
            return plan.reshape(*problem.lead, problem.n, problem.m)
        if not is_integer(top) or top < 1:
            raise ValueError(f"plan: top must be a positive integer; got {top!r}")
        top = int(top)
        from .sns import select_threshold  # the selection shared with the SNS Hessian

        with torch.no_grad():
            row_lse, _ = problem.lse(f, g)
            threshold = select_threshold(problem, f, g, row_lse, None, min(top, problem.n * problem.m))
            row_ptr, col_idx, values = ot_ops.sparsify(problem.C, problem.x, problem.y, f, g, problem.reg,
                                                       problem.code, None, threshold)
        plans = []
        for bi in range(problem.batch):
            lo, hi = int(row_ptr[bi * problem.n]), int(row_ptr[(bi + 1) * problem.n])
            local_ptr = row_ptr[bi * problem.n:(bi + 1) * problem.n + 1] - lo
            with quiet_sparse_csr_beta():
                plans.append(torch.sparse_csr_tensor(local_ptr, col_idx[lo:hi], values[lo:hi],
                                                     size=(problem.n, problem.m), check_invariants=True))
        return plans[0] if problem.lead == () else plans


def make_result(problem: Problem, f, g, converged, iterations, history, **extra) -> OTResult:
    """Final marginals, cost and value of (f, g), reshaped to the user's batch shape."""
    with torch.no_grad():
        row_lse, mean_cost = problem.lse(f, g, with_cost=True)
        col_lse, _ = problem.lse(f, g, columns=True)
        error = (row_lse.exp() - problem.a).abs().sum(-1) + (col_lse.exp() - problem.b).abs().sum(-1)
        cost = (row_lse.exp() * mean_cost).sum(-1)
    value = entropic_value(problem, f, g, row_lse, col_lse)
    lead = problem.lead
    if not bool(torch.isfinite(error).all()):  # never hand back NaN silently
        converged = converged & torch.isfinite(error)
    return OTResult(
        f=f.reshape(*lead, problem.n), g=g.reshape(*lead, problem.m), cost=cost.reshape(lead),
        value=value.reshape(lead), converged=converged.reshape(lead), iterations=iterations.reshape(lead),
        marginal_error=error.reshape(lead), history=history, reg=problem.reg, _problem=problem,
        **{k: (v.reshape(lead) if isinstance(v, torch.Tensor) else v) for k, v in extra.items()},
    )

