"""Benchmarks of LoRA-GA adapter initialization (ALGORITHMS.md section 8: "LoRA-GA init").

Op ``lora_ga_init``: wrap a ``[out, in]`` linear layer in a rank-r LoRA adapter
initialized from an estimated gradient ``G`` (the gradient estimate itself is not timed:
it is the model's backward passes, the same for every impl).  Each timed call starts from
a fresh copy of the layer (the copy is part of every impl's time):

* ``ours``: :func:`lowrank_ops.methods.lora_ga.lora_ga_init_` (``linalg.rsvd`` at rank
  2r, oversampling 2r, 4 power iterations, no low-precision sketch; the residual through
  ``lora_unmerge``);
* ``reference``: the authors' code's operations (Outsider565/LoRA-GA) in torch ops on the
  same layer: ``torch.svd_lowrank(G, q=4r, niter=4)``, ``A = c V[:, :r]^T``,
  ``B = c U[:, r:2r]``, ``W <- W - s B A`` in float32.

``G`` has the spectrum ``s_i = 1 / i`` (:func:`_harness.spectral_matrix`), so the error
column is the excess error of the first step's direction: ``||G - D / (s^2 c^2)||_F /
||G - G_2r||_F - 1`` with ``D = s^2 (G A^T A + B B^T G)`` (module docstring of
``lora_ga``) and the optimal rank-2r error known exactly (0 is optimal).  Sizes: default
1024 x 1024 at r = 16; ``LOWRANK_OPS_BENCH_FULL=1``: 4096 x 4096 at r = 16 and 64, and
11008 x 4096 at r = 16.  Flops: the ``2 m n 4r`` of each of the 2 (4 + 1) products with G.
"""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops.methods.lora_ga import lora_ga_init_
from lowrank_ops.nn import LoRALinear

from _harness import DEVICES, FULL, Case, grid_cases, linear_with_weight, measure, params, require_device, \
    spectral_matrix

FAMILY = "lora_ga"
N_ITER = 4
GAMMA = 16.0

# (out_features, in_features, r)
_PROBLEMS = [(4096, 4096, 16), (4096, 4096, 64), (11008, 4096, 16)] if FULL else [(1024, 1024, 16)]


def _label(problem) -> str:
    out_features, in_features, r = problem
    return f"{out_features}x{in_features} r={r}"


def _cases():
    return grid_cases(FAMILY, "lora_ga_init", {d: _PROBLEMS for d in DEVICES}, {"float32": ("ours", "reference")},
                      _label)


def _build(case: Case, weight: torch.Tensor, grad: torch.Tensor, r: int):
    """``build()`` returning the timed init: ``fn() -> (A, B, c)``."""
    c = weight.shape[0] ** 0.25 / math.sqrt(GAMMA)

    def build():
        if case.impl == "ours":
            generator = torch.Generator(device=case.device).manual_seed(0)

            def init():
                layer = LoRALinear(linear_with_weight(weight), r, 2 * r)
                lora_ga_init_(layer, grad, n_iter=N_ITER, generator=generator)
                return layer.lora_A, layer.lora_B, c

            return init

        def init():
            layer = LoRALinear(linear_with_weight(weight), r, 2 * r)
            # torch.svd_lowrank draws from the global generator: a fixed seed per call, as ours.
            with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
                torch.manual_seed(0)
                U, _, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=N_ITER)
            A, B = V[:, :r].T * c, U[:, r:2 * r] * c
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            layer.base_layer.weight.sub_(layer.scaling * (B @ A))
            return layer.lora_A, layer.lora_B, c

        return init

    return build


@pytest.mark.parametrize("case", params(_cases()))
def test_lora_ga_init(benchmark, case: Case):
    require_device(case.device)
    out_features, in_features, r = case.problem
    grad, spectrum = spectral_matrix(0, out_features, in_features, case.device)
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1)).to(case.device)
    weight /= math.sqrt(in_features)
    optimal = spectrum[2 * r:].square().sum().sqrt()

    def check(result) -> float:
        A, B, c = (t.detach().double() if isinstance(t, torch.Tensor) else t for t in result)
        G = grad.double()
        direction = (G @ A.T @ A + B @ (B.T @ G)) / (c * c)
        return float(torch.linalg.matrix_norm(G - direction) / optimal - 1)

    flops = 2 * (N_ITER + 1) * 2.0 * out_features * in_features * 4 * r
    moved = 4.0 * out_features * in_features * (2 * (N_ITER + 1) + 3)  # G per product; W copy, read, write
    with torch.no_grad():
        measure(benchmark, case, _build(case, weight, grad, r), check, flops=flops, bytes=moved)
