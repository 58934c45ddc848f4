"""Benchmarks of the small-batch base products (python/lowrank_ops/ops/base_linear.py).

Ops, on a frozen ``W [out, in]`` (float32, CPU):

* ``base_linear``: ``y = x W^T + b``, x ``[N, in]``;
* ``base_linear_grad_input``: ``dx = dy W``, dy ``[N, out]``.

Impls: ``ours`` (:func:`~lowrank_ops.ops.base_linear.base_linear` and
``base_linear_grad_input``: the small-batch kernels for N in ``SMALL_BATCH_ROWS`` and
weights of at least ``SMALL_BATCH_MIN_WEIGHT`` elements, BLAS elsewhere), ``torch`` (``torch.addmm`` / ``dy @ W``: MKL, what PEFT's and nn.Linear's
layers run) and ``kernel`` (the small-batch kernel called directly at every N it takes:
the evidence for where ``SMALL_BATCH_ROWS`` ends).  CPU only: on CUDA ours is cuBLAS.

Sizes: quick default 2048 x 2048 (the smallest square weight the kernels take) at
N = 1, 4, 16, 32, 64 (and 128 for the grad input, whose kernel takes up to 256 rows).
``LOWRANK_OPS_BENCH_FULL=1``: the LLaMA shapes 4096 x 4096, 11008 x 4096 and 4096 x 11008
at N = 1, 2, 4, 8, 16, 32, 48, 64 (and 128, 256 for the grad input).

Roofline: ``2 N in out`` flops; bytes: W once (``4 in out``) plus x and y (or dy and dx).
At N <= 64 and in, out >= 1024 the W term dominates: the floor is W read once at the
machine's read bandwidth, or the flops at its GEMM peak, whichever is larger.
"""
from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch

from lowrank_ops.ops import base_linear as base

from _harness import FULL, Case, grid_cases, measure, params, rel_error, require_device

FAMILY = "base_linear"
SEED = 0
_IMPLS = ("ours", "torch", "kernel")

if FULL:
    _SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
    _PROBLEMS = [(o, i, n) for o, i in _SHAPES for n in (1, 2, 4, 8, 16, 32, 48, 64)]
    _GRAD_PROBLEMS = _PROBLEMS + [(o, i, n) for o, i in _SHAPES for n in (128, 256)]
else:
    _PROBLEMS = [(2048, 2048, n) for n in (1, 4, 16, 32, 64)]
    _GRAD_PROBLEMS = _PROBLEMS + [(2048, 2048, 128)]


def _label(problem) -> str:
    out_features, in_features, n = problem
    return f"{out_features}x{in_features} N={n}"


def _cases(op: str):
    problems = _GRAD_PROBLEMS if op == "base_linear_grad_input" else _PROBLEMS
    return grid_cases(FAMILY, op, {"cpu": problems, "cuda": []}, {"float32": _IMPLS}, _label)


@functools.lru_cache(maxsize=1)
def _inputs(problem: tuple):
    out_features, in_features, n = problem
    generator = torch.Generator().manual_seed(SEED)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    return (torch.randn(n, in_features, generator=generator), weight, torch.randn(out_features, generator=generator),
            torch.randn(n, out_features, generator=generator))


_FORWARD = {"ours": base.base_linear, "torch": torch.addmm, "kernel": base.small_batch_kernel}
_GRAD_INPUT = {"ours": base.base_linear_grad_input, "torch": torch.mm, "kernel": base.small_batch_grad_input_kernel}


def _run(benchmark, case: Case, grad_input: bool) -> None:
    require_device(case.device)
    x, weight, bias, grad_y = _inputs(case.problem)
    out_features, in_features, n = case.problem
    if grad_input:
        fn = _GRAD_INPUT[case.impl]
        call: Callable = lambda: fn(grad_y, weight)
        reference = grad_y.double() @ weight.double()
        moved = 4.0 * (in_features * out_features + n * (in_features + out_features))
    else:
        fn = _FORWARD[case.impl]
        call = (lambda: fn(bias, x, weight.T)) if case.impl == "torch" else (lambda: fn(x, weight, bias))
        reference = x.double() @ weight.double().T + bias.double()
        moved = 4.0 * (in_features * out_features + n * (in_features + out_features) + out_features)
    measure(benchmark, case, lambda: call, lambda result: rel_error([result], [reference]),
            flops=2.0 * n * in_features * out_features, bytes=moved)


@pytest.mark.parametrize("case", params(_cases("base_linear")))
def test_base_linear(benchmark, case: Case):
    _run(benchmark, case, grad_input=False)


@pytest.mark.parametrize("case", params(_cases("base_linear_grad_input")))
def test_base_linear_grad_input(benchmark, case: Case):
    _run(benchmark, case, grad_input=True)
