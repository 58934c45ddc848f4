"""Benchmarks of Sparse Spectral Training's layer (:class:`lowrank_ops.nn.SpectralLinear`,
ALGORITHMS.md section 8).

Op ``step.fwd+bwd``: one training step's forward and backward of a layer ``W = U diag(s)
Vh`` (``U [out, K]``, ``s [K]``, ``Vh [K, in]``) on ``N`` input rows, with the gradients of
``U`` and ``Vh`` restricted to ``r`` sampled singular vector pairs (all of ``s``, ``x`` and
the bias get theirs).  Implementations on the same inputs and sample:

* ``ours``: :func:`lowrank_ops.nn.spectral.spectral_linear` (two thin GEMMs forward; the
  backward computes only the sampled columns' weight gradients);
* ``composed``: the authors' approach with torch ops: ``((x Vh^T) * s) U^T + b`` through
  autograd, then the unsampled gradients zeroed by a mask (every column's gradient is
  computed, then discarded);
* ``dense``: ``F.linear(x, (U * s) @ Vh, b)`` through autograd (the dense weight formed
  every step), then the same mask.

Error column: the output and every gradient against the float64 composition (masked),
each relative to its own maximum.  Sizes: ``N = 2048`` rows, 1024 x 1024, ``K = 1024``
(full rank, as SST), ``r = 64`` (6 % of the vectors, the paper's 8.3 % order);
``LOWRANK_OPS_BENCH_FULL=1`` adds 4096 x 4096 at ``r = 256``.
Flops (ours' work): forward ``2 N K (in + out)``, backward ``2 N K (in + out) + 2 N r (in +
out)`` plus the elementwise terms.
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank_ops.nn.spectral import spectral_linear

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, rel_error, require_device

FAMILY = "sst"
SEED = 0

# (N, in, out, K, r)
_PROBLEMS = [(2048, 1024, 1024, 1024, 64)] + ([(2048, 4096, 4096, 4096, 256)] if FULL else [])


def _label(problem) -> str:
    N, in_features, out_features, K, r = problem
    return f"N={N} {out_features}x{in_features} K={K} r={r}"


def _cases():
    return grid_cases(FAMILY, "step.fwd+bwd", {d: _PROBLEMS for d in DEVICES},
                      {"float32": ("ours", "composed", "dense")}, _label)


@functools.lru_cache(maxsize=1)
def _inputs(problem, device: str):
    N, in_features, out_features, K, r = problem
    g = torch.Generator().manual_seed(SEED)
    U = torch.linalg.qr(torch.randn(out_features, K, generator=g)).Q
    Vh = torch.linalg.qr(torch.randn(in_features, K, generator=g)).Q.T.contiguous()
    s = torch.rand(K, generator=g) + 0.1
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(N, in_features, generator=g)
    grad_y = torch.randn(N, out_features, generator=g)
    index = torch.multinomial(s.double(), r, replacement=False, generator=g).sort().values
    tensors = [t.to(device) for t in (x, U, s, Vh, bias, grad_y, index)]
    mask = torch.zeros(K, device=device)
    mask[tensors[-1]] = 1
    return tensors, mask


def _composed(x, U, s, Vh, bias, index):
    return ((x @ Vh.T) * s) @ U.T + bias


def _dense(x, U, s, Vh, bias, index):
    return torch.nn.functional.linear(x, (U * s) @ Vh, bias)


@pytest.mark.parametrize("case", params(_cases()))
def test_step(benchmark, case: Case):
    require_device(case.device)
    (x, U, s, Vh, bias, grad_y, index), mask = _inputs(case.problem, case.device)
    leaves = [t.clone().requires_grad_() for t in (x, U, s, Vh, bias)]
    doubles = [t.double().requires_grad_() for t in (x, U, s, Vh, bias)]
    y_ref = _composed(*doubles, index)
    grads = torch.autograd.grad(y_ref, doubles, grad_y.double())
    mask64 = mask.double()
    reference = (y_ref.detach(), grads[0], grads[1] * mask64, grads[2], grads[3] * mask64[:, None], grads[4])

    def build():
        if case.impl == "ours":
            def run():
                y = spectral_linear(*leaves, index=index)
                return (y,) + torch.autograd.grad(y, leaves, grad_y)
            return run
        forward = _composed if case.impl == "composed" else _dense

        def run():
            y = forward(*leaves, index)
            gx, gU, gs, gVh, gb = torch.autograd.grad(y, leaves, grad_y)
            return y, gx, gU * mask, gs, gVh * mask[:, None], gb
        return run

    N, in_features, out_features, K, r = case.problem
    flops = 4.0 * N * K * (in_features + out_features) + 2.0 * N * r * (in_features + out_features)
    bytes_ = 4.0 * (2 * K * (in_features + out_features) + 2 * N * (in_features + out_features))
    measure(benchmark, case, build, lambda out: rel_error(out, reference), flops=flops, bytes=bytes_)
