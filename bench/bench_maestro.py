"""Benchmarks of Maestro's ordered low-rank layer (:class:`lowrank_ops.methods.maestro.OrderedLowRankLinear`,
ALGORITHMS.md section 8).

Op ``ordered_dropout.fwd+bwd``: one training step's forward and backward of a layer
``y = x V_b^T U_b^T + bias`` with ``U [out, r]``, ``V [r, in]`` at a sampled rank ``b``
(fixed per case so that every impl does the same work), x ``[N, in]``; gradients of x,
the factors and the bias.  Implementations on the same values:

* ``ours``: ``OrderedLowRankLinear(x, rank=b)`` (views ``V[:b]`` and ``U_t[:b]`` of the
  r-component parameters, no copy; gradients land in the full ``U_t`` and ``V``, zero past b);
* ``linear_pair``: ``nn.Linear(in, b, bias=False)`` then ``nn.Linear(b, out)`` holding
  copies of ``V[:b]`` and ``U[:, :b]``: the plain composition at exactly rank b (what a
  fixed-rank factorized layer costs; ``ours / linear_pair`` is the price of slicing);
* ``full_rank``: one ``nn.Linear(in, out)`` holding ``W = U_b V_b`` (the dense layer the
  factorization replaces; the same function).

Sizes: default (out, in) = (1024, 1024), r = 256, b = 256 and 64, N = 512, float32;
``LOWRANK_OPS_BENCH_FULL=1``: (4096, 4096), r = 1024, b = 1024 and 256, N = 2048.  Flops:
the factorized step's ``6 N b (in + out)`` (forward 2, backward 4), the same for every
impl (the dense one does ``6 N in out``, more when b < in out / (in + out)).  Bytes: x,
the rank-b factors, y once, and their gradients.  Error column: y and dx against the
float64 product (the dense impl's W rounds ``U_b V_b`` once more).
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.methods.maestro import OrderedLowRankLinear

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, rel_error, require_device, timed_pass

FAMILY = "maestro"

# (out_features, in_features, r, b, N)
_PROBLEMS = ([(4096, 4096, 1024, 1024, 2048), (4096, 4096, 1024, 256, 2048)] if FULL
             else [(1024, 1024, 256, 256, 512), (1024, 1024, 256, 64, 512)])


def _label(problem) -> str:
    out_features, in_features, r, b, n = problem
    return f"{out_features}x{in_features} r={r} b={b} N={n}"


def _cases():
    return grid_cases(FAMILY, "ordered_dropout.fwd+bwd", {d: _PROBLEMS for d in DEVICES},
                      {"float32": ("ours", "linear_pair", "full_rank")}, _label)


def _layer(problem, device) -> OrderedLowRankLinear:
    out_features, in_features, r, _, _ = problem
    return OrderedLowRankLinear(in_features, out_features, r, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("case", params(_cases()))
def test_maestro(benchmark, case: Case):
    require_device(case.device)
    out_features, in_features, r, b, n = case.problem
    layer = _layer(case.problem, case.device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, in_features, generator=generator).to(case.device).requires_grad_()
    grad_y = torch.randn(n, out_features, generator=generator).to(case.device)

    def build():
        if case.impl == "ours":
            return timed_pass(lambda: layer(x, rank=b), (x, layer.U_t, layer.V, layer.bias), grad_y, True)
        with torch.no_grad():
            U, V = layer.U[:, :b], layer.V[:b]
            if case.impl == "linear_pair":
                down = torch.nn.Linear(in_features, b, bias=False, device=case.device)
                up = torch.nn.Linear(b, out_features, device=case.device)
                down.weight.copy_(V)
                up.weight.copy_(U)
                up.bias.copy_(layer.bias)
                pair = torch.nn.Sequential(down, up)
                return timed_pass(lambda: pair(x), (x, down.weight, up.weight, up.bias), grad_y, True)
            dense = torch.nn.Linear(in_features, out_features, device=case.device)
            dense.weight.copy_(U @ V)
            dense.bias.copy_(layer.bias)
        return timed_pass(lambda: dense(x), (x, dense.weight, dense.bias), grad_y, True)

    def check(result) -> float:
        y, dx = result[0], result[1]
        U, V = layer.U[:, :b].detach().double(), layer.V[:b].detach().double()
        x64, g64 = x.detach().double(), grad_y.double()
        expected_y = (x64 @ V.T) @ U.T + layer.bias.detach().double()
        expected_dx = (g64 @ U) @ V
        return rel_error([y, dx], [expected_y, expected_dx])

    flops = 6.0 * n * b * (in_features + out_features)
    moved = 4.0 * (2 * n * in_features + 2 * n * out_features + 2 * 2 * b * (in_features + out_features))
    measure(benchmark, case, build, check, flops=flops, bytes=moved)
