"""Benchmarks of the Hutchinson Hessian trace (HAWQ-V2's per-layer sensitivity).

Op ``hessian_trace``: the trace of the Hessian of a cross-entropy loss over all the
parameters of a small model, per parameter block, from a FIXED number of Rademacher
probes (``PROBES``; ``n_probes = max_probes``, so every impl does the same work and the
times compare).  One call evaluates the loss and its first gradient (with graph) once,
then one Hessian-vector product per probe by double backward.

Implementations:

* ``ours``: :func:`lowrank_ops.second_order.hessian_trace`, one probe per backward pass
  (the default ``batch_probes=1``); per-block traces and standard errors in the same pass;
* ``ours_batch8``: the same with ``batch_probes=8`` (vmapped double backward,
  ``is_grads_batched=True``): the batching the module docstring measured;
* ``pyhessian_loop``: a REIMPLEMENTATION of PyHessian's ``hessian.trace()`` loop (Yao
  et al. 2020; pyhessian is not installed here, ``pip show pyhessian`` finds nothing):
  per-parameter ``randint`` probes mapped to +-1, ``torch.autograd.grad(grads, params,
  grad_outputs=v, retain_graph=True)``, ``v . Hv`` summed per block and read to the host
  every probe, the running mean compared with the previous one (tolerance 0 here, so it
  runs all ``PROBES``).  It returns the total only, as PyHessian's ``trace`` does
  (HAWQ-V2 gets per-layer traces from such loops per layer).

Problems (float32; ``N`` samples, cross-entropy over 10 classes):

* ``mlp 16-32-10``: 874 parameters: the exact trace from ``torch.func.hessian`` (float64);
* ``mlp 64-256-256-10``: 85k parameters; ``conv 3-8-8 8x8``: two 3x3 convolutions
  (tanh) and a linear head on 8 x 8 images, 6k parameters: the reference is a
  float64 run of ours with ``REF_PROBES`` probes (standard error about
  ``sqrt(PROBES / REF_PROBES)`` = 1/8 of a 32-probe run's).

Error column: ``|estimate - reference| / |reference|`` of the total.  At 32 probes it is
the estimator's statistical error (a few percent), the same in expectation for every
impl; it says they estimate the same quantity, not which is more accurate.  In fact all
three draw the same probes from the same seed (ours one length-d vector per probe, the
loop one tensor per parameter, in the same order: the same generator stream), so their
estimates agree to rounding and the column shows the same number three times.  No flops or
bytes: the figure of merit is the time per call.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Callable, List, Tuple

import numpy as np
import pytest
import torch
from torch.func import functional_call, hessian

from lowrank_ops.second_order import hessian_trace

from _harness import Case, grid_cases, measure, params, require_device

FAMILY = "hessian_trace"
SEED = 0
PROBES = 32
REF_PROBES = 2048

_PROBLEMS = {
    "cpu": [("mlp", (16, 32, 10), 128), ("mlp", (64, 256, 256, 10), 256), ("conv", (3, 8, 8), 32)],
    "cuda": [("mlp", (16, 32, 10), 128), ("mlp", (256, 1024, 1024, 10), 1024), ("conv", (3, 32, 32), 256)],
}
_IMPLS = {"float32": ("ours", "ours_batch8", "pyhessian_loop")}


def _label(problem) -> str:
    kind, widths, n = problem
    if kind == "mlp":
        return f"mlp {'-'.join(map(str, widths))} N={n}"
    return f"conv {'-'.join(map(str, widths))} 8x8 N={n}"


def _cases(op: str) -> List[Case]:
    return grid_cases(FAMILY, op, _PROBLEMS, _IMPLS, _label)


def _model(kind: str, widths: Tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(SEED)
    if kind == "mlp":
        layers: List[torch.nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers[:-1])
    c0, c1, c2 = widths
    return torch.nn.Sequential(
        torch.nn.Conv2d(c0, c1, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(c2 * 64, 10))


class _Problem:
    """Model, data and the reference trace (float64) of one problem on one device."""

    def __init__(self, problem, device: str):
        kind, widths, n = problem
        generator = torch.Generator().manual_seed(SEED)
        shape = (n, widths[0]) if kind == "mlp" else (n, widths[0], 8, 8)
        self.x = torch.randn(*shape, generator=generator).to(device)
        self.y = torch.randint(0, 10, (n,), generator=generator).to(device)
        self.model = _model(kind, widths).to(device)
        self.reference = self._reference()

    def loss_fn(self, model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: torch.nn.functional.cross_entropy(model(x), self.y)

    def _reference(self) -> float:
        model64, x64 = _double(self.model), self.x.double()
        named = list(model64.named_parameters())
        dim = sum(p.numel() for _, p in named)
        if dim <= 2000:  # exact: dim Hessian-vector products
            sizes = [p.numel() for _, p in named]

            def loss(flat):
                chunks = torch.split(flat, sizes)
                values = {name: c.view(p.shape) for (name, p), c in zip(named, chunks)}
                return torch.nn.functional.cross_entropy(functional_call(model64, values, (x64,)), self.y)

            flat = torch.cat([p.detach().reshape(-1) for _, p in named])
            return float(hessian(loss)(flat).trace())
        result = hessian_trace(self.loss_fn(model64, x64), named, n_probes=REF_PROBES, max_probes=REF_PROBES,
                               generator=torch.Generator().manual_seed(SEED + 1), batch_probes=8)
        return result.total


def _double(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double()


@functools.lru_cache(maxsize=1)
def _problem(problem, device: str) -> _Problem:
    return _Problem(problem, device)


def _pyhessian_trace(loss_fn, params: List[torch.Tensor], max_iter: int, tol: float, generator) -> float:
    """PyHessian's trace loop, reimplemented (see the module docstring): one probe per
    double backward, the running mean tested against the previous one every probe."""
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    trace_vhv: List[float] = []
    trace = 0.0
    for _ in range(max_iter):
        v = [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        trace_vhv.append(sum(float((a * b).sum()) for a, b in zip(hv, v)))
        if abs(np.mean(trace_vhv) - trace) / (abs(trace) + 1e-6) < tol:
            break
        trace = float(np.mean(trace_vhv))
    return float(np.mean(trace_vhv))


@pytest.mark.parametrize("case", params(_cases("hessian_trace")))
def test_hessian_trace(benchmark, case: Case):
    require_device(case.device)
    problem = _problem(case.problem, case.device)
    loss_fn = problem.loss_fn(problem.model, problem.x)
    named = list(problem.model.named_parameters())

    def build():
        if case.impl == "pyhessian_loop":
            tensors = [p for _, p in named]

            def run():
                return _pyhessian_trace(loss_fn, tensors, PROBES, 0.0, torch.Generator(case.device).manual_seed(SEED))
            return run
        batch = 8 if case.impl == "ours_batch8" else 1

        def run():
            return hessian_trace(loss_fn, named, n_probes=PROBES, max_probes=PROBES, batch_probes=batch,
                                 generator=torch.Generator(case.device).manual_seed(SEED)).total
        return run

    def check(total: float) -> float:
        benchmark.extra_info["note"] = f"reference trace {problem.reference:.6g}"
        return abs(total - problem.reference) / max(abs(problem.reference), math.ulp(1.0))

    measure(benchmark, case, build, check, flops=0.0, bytes=0.0)
