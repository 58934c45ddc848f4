"""Benchmarks of the MKOR optimizer (:class:`lowrank_ops.optim.MKOR`, ALGORITHMS.md section 8).

One ``nn.Linear(in, out)`` with a bias (float32), a fixed gradient ``[G | g_b]`` and fixed
mean vectors ``a = [x_bar, 1]`` (``[in + 1]``) and ``g`` (``[out]``) standing in for what
the hooks capture (set on the layer before each timed step, so no forward or backward
pass is timed).  Ops:

* ``mkor.step``: one optimizer step: the two factor updates, the preconditioning
  ``L_g^-1 [G | g_b] L_a^-1``, the rescaling to the gradient's norm and the SGD-momentum
  update of ``W`` and ``b``;
* ``mkor.factors``: the two factor updates alone (what the rank-1 updates replace).

Implementations (same layer, gradient and mean vectors; every step also runs the
paper's stabilizer test, the largest entry of each inverse):

* ``ours``: :class:`~lowrank_ops.optim.MKOR` (``beta = 0.95``, momentum 0.9): per factor one
  GEMV and one symmetric rank-1 update of the kept inverse, ``O(d^2)``;
* ``kfac_cholesky``: a KFAC-style step on the same EMA factors: ``L <- beta L + (1 - beta)
  v v^T`` kept explicitly (one rank-1 update), then both factors inverted every step by
  ``torch.linalg.cholesky`` + ``torch.cholesky_inverse`` (``~d^3`` flops each), then the
  same preconditioning, rescaling and SGD-momentum update;
* ``kfac_inv``: the same with ``torch.linalg.inv`` (LU, ``~2 d^3``);
* ``sgd_momentum`` (``mkor.step`` only): ``torch.optim.SGD(momentum=0.9)`` on the plain
  gradient: the first-order baseline, i.e. the overhead of preconditioning at all.

Error column: each case starts from ``L = I``, so after the first call the factors are
``beta I + (1 - beta) v v^T``; ``mkor.factors``: the largest relative error (Frobenius)
of the two inverses against ``torch.linalg.inv`` of that factor in float64; ``mkor.step``:
the relative error of the first step's weight and bias change against the float64 step
from those inverses (``sgd_momentum``: against ``lr [G | g_b]``, its own formula).

Roofline (per case, the same for every impl): ``mkor.factors``: flops ``4 (d_a^2 + d_g^2)``
(GEMV and rank-1 update, ``d_a = in + 1``, ``d_g = out``), bytes ``12 (d_a^2 + d_g^2)``
(float32: the GEMV reads each inverse, the update reads and writes it); ``mkor.step``:
flops add the preconditioning GEMMs ``2 out d_a (out + d_a)``, bytes add one read of the
gradient and of the weight and a read and write of weight and momentum buffer
(``20 out d_a``).  The KFAC peers do ``~(d_a^3 + d_g^3)`` more flops that these figures do
not count; ``sgd_momentum`` does none of the preconditioning (its GFLOP/s are not
meaningful; its time is the overhead baseline).
"""
from __future__ import annotations

import functools
import warnings
from typing import List, Tuple

import pytest
import torch
from torch import nn

from lowrank_ops.optim import MKOR
from lowrank_ops.optim.mkor import ShermanMorrisonInverse

from _harness import FULL, Case, grid_cases, measure, params, require_device

FAMILY = "mkor"
SEED = 0
LR, MOMENTUM, BETA = 1e-3, 0.9, 0.95

# (out, in) per device.
if FULL:
    _PROBLEMS = {"cpu": [(1024, 1024), (4096, 1024), (2048, 2048)], "cuda": [(1024, 1024), (4096, 1024), (4096, 4096)]}
else:
    _PROBLEMS = {"cpu": [(1024, 1024), (4096, 1024)], "cuda": [(1024, 1024), (4096, 1024)]}
_STEP_IMPLS = {"float32": ("ours", "kfac_cholesky", "kfac_inv", "sgd_momentum")}
_FACTOR_IMPLS = {"float32": ("ours", "kfac_cholesky", "kfac_inv")}


def _label(problem: Tuple[int, int]) -> str:
    out_features, in_features = problem
    return f"{out_features}x{in_features}"


def _cases(op: str, impls) -> List[Case]:
    return grid_cases(FAMILY, op, _PROBLEMS, impls, _label)


class _Problem:
    """Weight, gradient and mean vectors of one layer shape (float32 on ``device``), and
    the float64 inverses of the first factors ``beta I + (1 - beta) v v^T``."""

    def __init__(self, out_features: int, in_features: int, device: str):
        generator = torch.Generator().manual_seed(SEED)
        self.weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(device)
        self.bias = torch.randn(out_features, generator=generator).to(device)
        self.grad_w = torch.randn(out_features, in_features, generator=generator).to(device)
        self.grad_b = torch.randn(out_features, generator=generator).to(device)
        self.x_bar = (torch.randn(in_features, generator=generator) * 0.5 + 0.5).to(device)  # a_bar without the 1
        self.g_sum = (torch.randn(out_features, generator=generator) * 0.1).to(device)
        a = torch.cat([self.x_bar, self.x_bar.new_ones(1)]).double().cpu()
        g = self.g_sum.double().cpu()
        self.a_inverse64 = torch.linalg.inv(_first_factor(a))
        self.g_inverse64 = torch.linalg.inv(_first_factor(g))

    @functools.cached_property
    def step64(self) -> torch.Tensor:
        """The float64 change ``[dW | db]`` of MKOR's first step (momentum buffer = direction)."""
        G = torch.cat([self.grad_w, self.grad_b[:, None]], 1).double().cpu()
        P = self.g_inverse64 @ G @ self.a_inverse64
        return LR * P * (G.norm() / P.norm())


def _first_factor(v: torch.Tensor) -> torch.Tensor:
    L = BETA * torch.eye(v.numel(), dtype=torch.float64)
    return L + (1 - BETA) * torch.outer(v, v)


@functools.lru_cache(maxsize=1)
def _problem(out_features: int, in_features: int, device: str) -> _Problem:
    return _Problem(out_features, in_features, device)


def _layer(problem: _Problem) -> nn.Linear:
    out_features, in_features = problem.weight.shape
    layer = nn.Linear(in_features, out_features, device=problem.weight.device)
    with torch.no_grad():
        layer.weight.copy_(problem.weight)
        layer.bias.copy_(problem.bias)
    layer.weight.grad = problem.grad_w.clone()
    layer.bias.grad = problem.grad_b.clone()
    return layer


class _Ours:
    def __init__(self, problem: _Problem):
        self.problem = problem
        self.layer = _layer(problem)
        self.optimizer = MKOR(self.layer, lr=LR, momentum=MOMENTUM, beta=BETA)
        self.optimizer.remove_hooks()  # the statistics are set directly (no forward/backward is timed)
        self.captured = self.optimizer._layers[0]

    def _capture(self) -> None:
        self.captured.a_sum, self.captured.a_rows, self.captured.g_sum = self.problem.x_bar, 1, self.problem.g_sum

    def step(self):
        self._capture()
        self.optimizer.step()
        return self.layer

    def factors(self):
        self._capture()
        self.optimizer._update_factors(self.captured)
        self.captured.reset_capture()
        state = self.optimizer.state[self.layer.weight]
        return state["a_inverse"], state["g_inverse"]  # check() forms s M (a copy; not timed)


class _KFAC:
    """The KFAC-style peer: explicit EMA factors, inverted every step."""

    def __init__(self, problem: _Problem, method: str):
        self.problem, self.method = problem, method
        self.layer = _layer(problem)
        out_features, in_features = problem.weight.shape
        device = problem.weight.device
        self.a = torch.cat([problem.x_bar, problem.x_bar.new_ones(1)])
        self.La = torch.eye(in_features + 1, device=device)
        self.Lg = torch.eye(out_features, device=device)
        self.buffer = None
        self.a_inverse = self.g_inverse = None

    def _invert(self, L: torch.Tensor) -> torch.Tensor:
        if self.method == "cholesky":
            factor, info = torch.linalg.cholesky_ex(L)
            if int(info) != 0:
                raise RuntimeError(f"cholesky failed (info {int(info)})")
            return torch.cholesky_inverse(factor)
        return torch.linalg.inv(L)

    def factors(self):
        for L, v in ((self.La, self.a), (self.Lg, self.problem.g_sum)):
            L.mul_(BETA).addr_(v, v, alpha=1 - BETA)
        self.a_inverse, self.g_inverse = self._invert(self.La), self._invert(self.Lg)
        # The stabilizer's test, as ours runs it.
        for inverse in (self.a_inverse, self.g_inverse):
            float(inverse.diagonal().max())
        return self.a_inverse, self.g_inverse

    def step(self):
        self.factors()
        weight, bias = self.layer.weight, self.layer.bias
        in_features = weight.shape[1]
        G = torch.cat([weight.grad, bias.grad[:, None]], 1)
        P = torch.mm(torch.mm(self.g_inverse, G), self.a_inverse)
        P.mul_(float(G.norm()) / float(P.norm()))
        if self.buffer is None:
            self.buffer = P.clone()
        else:
            self.buffer.mul_(MOMENTUM).add_(P)
        with torch.no_grad():
            weight.add_(self.buffer[:, :in_features], alpha=-LR)
            bias.add_(self.buffer[:, in_features], alpha=-LR)
        return self.layer


class _SGD:
    def __init__(self, problem: _Problem):
        self.layer = _layer(problem)
        self.optimizer = torch.optim.SGD(self.layer.parameters(), lr=LR, momentum=MOMENTUM)

    def step(self):
        self.optimizer.step()
        return self.layer


def _impl(case: Case, problem: _Problem):
    if case.impl == "ours":
        return _Ours(problem)
    if case.impl == "sgd_momentum":
        return _SGD(problem)
    return _KFAC(problem, case.impl[len("kfac_"):])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def _roofline(problem: Tuple[int, int], with_step: bool) -> Tuple[float, float]:
    out_features, in_features = problem
    d_a, d_g = in_features + 1, out_features
    flops, nbytes = 4.0 * (d_a**2 + d_g**2), 12.0 * (d_a**2 + d_g**2)
    if with_step:
        flops += 2.0 * out_features * d_a * (out_features + d_a)
        nbytes += 20.0 * out_features * d_a
    return flops, nbytes


@pytest.mark.parametrize("case", params(_cases("mkor.step", _STEP_IMPLS)))
def test_mkor_step(benchmark, case: Case):
    require_device(case.device)
    problem = _problem(*case.problem, case.device)

    def build():
        impl = _impl(case, problem)
        return impl.step

    def check(layer: nn.Linear) -> float:
        change = torch.cat([problem.weight - layer.weight.detach(), (problem.bias - layer.bias.detach())[:, None]], 1)
        if case.impl == "sgd_momentum":
            expected = LR * torch.cat([problem.grad_w, problem.grad_b[:, None]], 1)
        else:
            expected = problem.step64
        # The change is a difference of float32 weights: its rounding (~2^-24 |W| / |dW|)
        # is part of the figure; it is the same for every impl of the case.
        return _rel(change, expected)

    flops, nbytes = _roofline(case.problem, with_step=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measure(benchmark, case, build, check, flops=flops, bytes=nbytes)


@pytest.mark.parametrize("case", params(_cases("mkor.factors", _FACTOR_IMPLS)))
def test_mkor_factors(benchmark, case: Case):
    require_device(case.device)
    problem = _problem(*case.problem, case.device)

    def build():
        return _impl(case, problem).factors

    def check(inverses) -> float:
        a_inverse, g_inverse = (x.dense() if isinstance(x, ShermanMorrisonInverse) else x for x in inverses)
        return max(_rel(a_inverse, problem.a_inverse64), _rel(g_inverse, problem.g_inverse64))

    flops, nbytes = _roofline(case.problem, with_step=False)
    measure(benchmark, case, build, check, flops=flops, bytes=nbytes)
