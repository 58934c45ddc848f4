"""Hessian trace per parameter block by Hutchinson's estimator (HAWQ-V2's layer sensitivity).

For a scalar loss ``L(w)`` over parameters ``w = (w_1, ..., w_B)`` (one block per tensor)
with Hessian ``H`` and diagonal blocks ``H_jj``, and a Rademacher probe ``v`` (entries
``+-1`` with probability 1/2 each, ``E[v v^T] = I``)::

    E[v^T H v]            = tr(H)
    E[v_j^T (H v)_j]      = tr(H_jj)                     (per block)
    Var[v^T H v]          = 2 (||H||_F^2 - sum_i H_ii^2)  (Hutchinson 1990)

so a diagonal ``H`` is estimated exactly by every probe, and the per-block samples add up
to the total sample probe by probe.  ``H v`` comes from double backward: the gradient
``g = dL/dw`` is taken once with ``create_graph=True``, then every probe costs one
backward pass through that graph, ``d(g . v)/dw = H v`` (reverse-over-reverse, as
PyHessian computes it; the loss and its first gradient are evaluated once per call).

Stopping (PyHessian's ``hessian.trace(maxIter=100, tol=1e-3)``): after each probe ``k >=
max(n_probes, 2)``, stop when the running mean of the total changed by less than ``tol``
relative, ``|m_k - m_{k-1}| < tol (|m_{k-1}| + 1e-6)``; at ``max_probes`` the result has
``converged=False``.  That test looks at one probe's effect on the mean (``(x_k -
m_{k-1}) / k``), so it can pass by luck with a noisy estimate; the standard errors
(sample standard deviation over ``sqrt(k)``) are the honest uncertainty and are
returned with every estimate.

Batching (``batch_probes``): ``torch.autograd.grad(..., is_grads_batched=True)`` runs the
backward pass for several probes at once (vmapped).  Probes are drawn in the same order
from ``generator`` whatever the batch size, and the stopping test is applied probe by
probe (a batch's probes after the stopping point are dropped), so the result does not
depend on ``batch_probes`` (up to rounding), only the speed does.  Measured on this
2-core CPU (torch 2.13, float32, 32 probes per call including the loss and first
gradient, one torch thread, best of 10 interleaved calls on the shared machine), batch
1 / 4 / 8 against a reimplementation of PyHessian's one-probe loop:

====================================  ======  ======  ======  ========
model (parameters)                    b = 1   b = 4   b = 8   PyHessian
====================================  ======  ======  ======  ========
MLP 16-32-10, 128 samples (874)       16.7    9.9     6.6     16.9 ms
MLP 64-256-256-10, 256 samples (85k)  122     151     141     122 ms
conv 3-8-8 8x8 + linear, 32 (6k)      81      66      59      79 ms
====================================  ======  ======  ======  ========

Batching pays where a probe's backward is dominated by per-op overhead (small layers:
2.5x at 874 parameters) and costs up to 1.2x where the per-probe matmuls are already
large enough to run well (the vmapped ones are slower there), so the default stays 1
(on par with PyHessian's loop), and ``batch_probes=8`` is the setting for small models.
``torch.func`` (``vmap`` of ``jvp(grad(L))``, forward-over-reverse) was measured too and
not chosen: it needs the loss as a function of the parameters (``functional_call`` on a
module, not the closure this API takes) and re-runs the forward and first backward for
every batch: 3.9 ms per probe one at a time, 0.74 ms at 32 per batch (an MLP
32-64-64-10, 7k parameters, where the autograd loop took 1.1 ms and its batches of 4 to
32 0.5 to 0.8 ms), 11.4 / 5.8 ms at 102k parameters (autograd 4.9 ms one at a time).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch

from .._args import require_generator_type, require_int, require_number
from ..ops._library import composite

__all__ = ["hessian_trace", "HessianTraceResult"]

# PyHessian's absolute floor in the relative-change test (a zero trace converges).
_TEST_FLOOR = 1e-6


class HessianTraceResult(NamedTuple):
    """Result of :func:`hessian_trace` (all estimates float64 Python numbers).

    Attributes
    ----------
    traces : dict of str to float
        Estimate of ``tr(H_jj)`` per parameter block, keyed by the parameter's name (the
        given name, or its position ``"0"``, ``"1"``, ... for bare tensors), in input order.
    std_errors : dict of str to float
        Their standard errors, sample standard deviation / ``sqrt(probes)`` (``inf`` after
        one probe: unknown).
    total : float
        Estimate of ``tr(H)`` over all the blocks (the sum of ``traces``).
    total_std_error : float
        Its standard error (from the per-probe totals).
    per_parameter_average : dict of str to float
        ``trace / numel`` per block, HAWQ-V2's sensitivity (0 for an empty tensor).
    probes : int
        Probes averaged.
    converged : bool
        Whether the stopping test passed at or before ``max_probes``.
    samples : Tensor[probes, blocks]
        float64 on the CPU: ``v_j^T (H v)_j`` of each probe and block.
    """

    traces: Dict[str, float]
    std_errors: Dict[str, float]
    total: float
    total_std_error: float
    per_parameter_average: Dict[str, float]
    probes: int
    converged: bool
    samples: torch.Tensor


ParamsArg = Iterable[Union[torch.Tensor, Tuple[str, torch.Tensor]]]


def _named(params: ParamsArg) -> Tuple[List[str], List[torch.Tensor]]:
    op = "hessian_trace"
    if isinstance(params, torch.Tensor):  # iterating would yield its rows
        params = [params]
    names, tensors = [], []
    for i, item in enumerate(params):
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            name, tensor = item
        else:
            name, tensor = str(i), item
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: params[{i}] must be a tensor or a (name, tensor) pair; got {type(item).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{op}: params[{i}] ({name!r}) has dtype {tensor.dtype}; expected a floating-point tensor")
        if not tensor.requires_grad:
            raise ValueError(f"{op}: params[{i}] ({name!r}) does not require grad; expected requires_grad=True")
        if any(tensor is seen for seen in tensors):
            raise ValueError(f"{op}: params[{i}] ({name!r}) repeats an earlier tensor; its block would count twice")
        if name in names:
            raise ValueError(f"{op}: params[{i}] repeats the name {name!r}")
        names.append(name)
        tensors.append(tensor)
    if not tensors:
        raise ValueError(f"{op}: params is empty; expected at least one tensor")
    return names, tensors


def _first_gradient(loss_fn: Callable[[], torch.Tensor], tensors: List[torch.Tensor]):
    """``dL/dw`` with its graph; None for a block the loss does not reach."""
    op = "hessian_trace"
    with torch.enable_grad():
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{op}: loss_fn() must return a tensor; got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{op}: loss_fn() must return a scalar loss; got shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise TypeError(f"{op}: loss_fn() returned dtype {loss.dtype}; expected a floating-point scalar")
        if not loss.requires_grad:
            raise ValueError(f"{op}: loss_fn() returned a loss that does not require grad "
                             "(computed under torch.no_grad(), or not from params)")
        if not math.isfinite(float(loss.detach())):
            raise ValueError(f"{op}: loss_fn() returned a non-finite loss ({float(loss.detach())})")
        return torch.autograd.grad(loss.reshape(()), tensors, create_graph=True, allow_unused=True)


def _signs(bits: torch.Tensor, tensors: List[torch.Tensor], active: List[int], offsets: List[int],
           sizes: List[int]) -> List[torch.Tensor]:
    """The +-1 probes ``[b, *shape]`` of the ``active`` blocks from ``bits [b, d]`` (0/1).

    Converted once per (device, dtype) and cut into views: per-block conversions cost
    three small ops per block and probe, a measurable share of a tiny model's HVP.
    """
    b = bits.shape[0]
    converted: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}
    out = []
    for j in active:
        t = tensors[j]
        key = (t.device, t.dtype)
        if key not in converted:
            converted[key] = bits.to(device=t.device, dtype=t.dtype).mul_(2).sub_(1)
        out.append(converted[key][:, offsets[j]:offsets[j] + sizes[j]].reshape(b, *t.shape))
    return out


# The whole call inside composite(): the library's own layers compose torch ops, whose
# gradients are differentiable again (their fused backward is first-order only), in the
# forward and in every backward (where activation checkpointing recomputes the forward).
@composite()
def hessian_trace(loss_fn: Callable[[], torch.Tensor], params: ParamsArg, *, n_probes: int = 8,
                  max_probes: int = 100, tol: float = 1e-3, generator: Optional[torch.Generator] = None,
                  batch_probes: int = 1) -> HessianTraceResult:
    """Hutchinson estimate of the Hessian trace of ``loss_fn()``, per parameter block.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn() -> Tensor[]``, the scalar loss, twice differentiable in ``params``
        (the caller closes over model and data); called once.
    params : iterable of Tensor or of (str, Tensor)
        The blocks, e.g. ``model.named_parameters()`` or ``model.parameters()``: floating
        tensors requiring grad, each at most once.  A block the loss does not reach, or
        reaches linearly, gets trace 0.
    n_probes : int
        Probes before the first stopping test (>= 1).  ``n_probes = max_probes`` gives a
        fixed probe count.
    max_probes : int
        At most this many probes (>= n_probes); PyHessian's ``maxIter``.
    tol : float
        Relative change of the running mean of the total below which to stop (> 0);
        PyHessian's default 1e-3.
    generator : torch.Generator, optional
        Source of the Rademacher probes (drawn on its device, one length-``d`` vector per
        probe, blocks in input order): the same seed gives the same result.  Default:
        torch's global generator of the first parameter's device.
    batch_probes : int
        Probes per backward pass (>= 1; vmapped, see the module notes); the result does
        not depend on it.

    Returns
    -------
    HessianTraceResult
        Per-block traces, standard errors, the total, ``trace / numel`` per block, the
        probes used, ``converged`` and the per-probe samples.

    Raises
    ------
    ValueError
        Bad arguments (named); a loss that is not a finite scalar requiring grad; a
        non-finite Hessian-vector product.
    """
    op = "hessian_trace"
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable (returning the scalar loss); got {type(loss_fn).__name__}")
    n_probes = require_int(op, "n_probes", n_probes)
    max_probes = require_int(op, "max_probes", max_probes)
    if max_probes < n_probes:
        raise ValueError(f"{op}: max_probes must be >= n_probes = {n_probes}; got {max_probes}")
    tol = require_number(op, "tol", tol, 0.0, low_open=True)
    batch_probes = require_int(op, "batch_probes", batch_probes)
    require_generator_type(op, "generator", generator)
    names, tensors = _named(params)

    grads = _first_gradient(loss_fn, tensors)
    # Blocks whose gradient has a graph: H's other rows (and, by symmetry, columns) are zero.
    active = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
    sizes = [t.numel() for t in tensors]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    dim = sum(sizes)
    draw_device = generator.device if generator is not None else tensors[0].device
    outputs = [grads[j] for j in active]
    inputs = [tensors[j] for j in active]

    chunks: List[torch.Tensor] = []  # per batch: [b, blocks] float64
    count, total_sum = 0, 0.0
    previous_mean = 0.0
    stop, converged = False, False
    first_test = max(n_probes, 2)
    while count < max_probes and not stop:
        b = min(batch_probes, max_probes - count)
        bits = torch.randint(0, 2, (b, dim), generator=generator, device=draw_device, dtype=torch.int8)
        samples = torch.zeros(b, len(tensors), dtype=torch.float64)
        if active:
            signs = _signs(bits, tensors, active, offsets, sizes)
            if b == 1:
                hv = torch.autograd.grad(outputs, inputs, grad_outputs=[v[0] for v in signs],
                                         retain_graph=True, allow_unused=True)
            else:
                hv = torch.autograd.grad(outputs, inputs, grad_outputs=signs, retain_graph=True,
                                         allow_unused=True, is_grads_batched=True)
            reached = [i for i, h in enumerate(hv) if h is not None]
            if reached:
                # v is +-1: the products are exact, summed in float64.  One host copy per batch.
                dots = torch.stack([(signs[i] * hv[i]).reshape(b, -1).sum(1, dtype=torch.float64)
                                    for i in reached], 1).cpu()
                if len(reached) == len(tensors):
                    samples = dots
                else:
                    samples[:, [active[i] for i in reached]] = dots
        # The stopping test probe by probe, so that batching does not change the result.
        totals = samples.sum(1).tolist()
        if not all(map(math.isfinite, totals)):  # a non-finite block sample makes its total so
            bad = count + 1 + next(i for i, x in enumerate(totals) if not math.isfinite(x))
            raise ValueError(f"{op}: the Hessian-vector product of probe {bad} has non-finite entries "
                             "(the loss's second derivatives overflow at these parameters)")
        used = b
        for i, x in enumerate(totals):
            k = count + i + 1
            total_sum += x
            mean = total_sum / k
            if k >= first_test and abs(mean - previous_mean) < tol * (abs(previous_mean) + _TEST_FLOOR):
                used, stop, converged = i + 1, True, True
                break
            previous_mean = mean
        chunks.append(samples[:used])
        count += used

    samples = torch.cat(chunks)
    per_block = samples.mean(0)
    totals = samples.sum(1)
    if count > 1:
        block_se = (samples.std(0) / math.sqrt(count)).tolist()
        total_se = float(totals.std()) / math.sqrt(count)
    else:
        block_se, total_se = [math.inf] * len(tensors), math.inf
    traces = dict(zip(names, per_block.tolist()))
    return HessianTraceResult(
        traces=traces,
        std_errors=dict(zip(names, block_se)),
        total=float(totals.mean()),
        total_std_error=total_se,
        per_parameter_average={name: (traces[name] / n if n else 0.0) for name, n in zip(names, sizes)},
        probes=count,
        converged=converged,
        samples=samples,
    )
