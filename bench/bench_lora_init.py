"""Benchmarks of PiSSA adapter initialization (ALGORITHMS.md section 8: "PiSSA-style init").

Op ``pissa_init``: wrap a ``[out, in]`` linear layer in a rank-r LoRA adapter whose
``s B A`` is the layer's top-r SVD part, the base weight becoming the residual.  Each timed
call starts from a fresh copy of the layer (the copy is part of every impl's time):

* ``ours``: :class:`lowrank_ops.nn.LoRALinear` with ``init_lora_weights="pissa_niter_2"``
  (:func:`lowrank_ops.linalg.rsvd`: 2 power iterations, oversampling 10), and
  ``ours_niter4`` with 4;
* ``peft_niter4``, ``peft_niter16``: PEFT's LoRA layer with ``init_lora_weights=
  "pissa_niter_K"`` (``torch.svd_lowrank(W, q=r, niter=K)``: no oversampling, so it needs
  many more iterations for the same accuracy: 16 is the first of 4, 8, 16 within our
  2-iteration error at 1024 x 1024);
* ``peft_exact``: PEFT's ``init_lora_weights="pissa"`` (``torch.linalg.svd``), only where
  it takes seconds, not minutes.

The weight has the spectrum ``s_i = 1 / i`` (:func:`_harness.spectral_matrix`), so the
error column is the excess error of the split: ``||W - s B A||_F / optimal - 1`` with the
optimal rank-r error known exactly (0 is optimal).  Sizes: default 1024 x 1024 at r = 16;
``LOWRANK_OPS_BENCH_FULL=1``: 4096 x 4096 and the up-projection 11008 x 4096 at r = 16
and 64.  Flops: the ``2 m n (r + 10)`` of each of ours' 2 (n_iter + 1) products with W.
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.nn import LoRALinear

from _harness import (DEVICES, FULL, Case, grid_cases, linear_with_weight, measure, params, require_device,
                      spectral_matrix)

FAMILY = "lora_init"
N_ITER = 2  # ours' power iterations
OVERSAMPLE = 10
_INIT = {"ours": "pissa_niter_2", "ours_niter4": "pissa_niter_4", "peft_niter4": "pissa_niter_4",
         "peft_niter16": "pissa_niter_16", "peft_exact": "pissa"}

# (out_features, in_features, r)
if FULL:
    _PROBLEMS = [(4096, 4096, 16), (4096, 4096, 64), (11008, 4096, 16), (11008, 4096, 64)]
    _EXACT = {(4096, 4096, 16)}  # torch.linalg.svd: ~10 s a call on 2 cores
else:
    _PROBLEMS = [(1024, 1024, 16)]
    _EXACT = {(1024, 1024, 16)}


def _label(problem) -> str:
    out_features, in_features, r = problem
    return f"{out_features}x{in_features} r={r}"


def _cases():
    impls = {"float32": ("ours", "ours_niter4", "peft_niter4", "peft_niter16")}
    cases = grid_cases(FAMILY, "pissa_init", {d: _PROBLEMS for d in DEVICES}, impls, _label)
    exact = grid_cases(FAMILY, "pissa_init", {d: sorted(_EXACT) for d in DEVICES}, {"float32": ("peft_exact",)},
                       _label)
    return cases + exact


def _build(case: Case, weight: torch.Tensor, r: int):
    """``build()`` returning the timed init: ``fn() -> (W_residual, s B A)``."""

    def build():
        name = _INIT[case.impl]
        if case.impl.startswith("ours"):
            generator = torch.Generator(device=case.device).manual_seed(0)

            def init():
                layer = LoRALinear(linear_with_weight(weight), r, 2 * r, init_lora_weights=name, generator=generator)
                return layer.base_layer.weight, layer.scaling * layer.lora_B @ layer.lora_A

            return init
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=name)

        def init():
            # torch.svd_lowrank draws from the global generator: a fixed seed per call, as ours.
            with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
                torch.manual_seed(0)
                layer = peft.tuners.lora.Linear(linear_with_weight(weight), "default", config=config, r=r,
                                                lora_alpha=2 * r)
            product = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            return layer.base_layer.weight, product

        return init

    return build


@pytest.mark.parametrize("case", params(_cases()))
def test_pissa_init(benchmark, case: Case):
    require_device(case.device)
    out_features, in_features, r = case.problem
    weight, spectrum = spectral_matrix(0, out_features, in_features, case.device)
    optimal = spectrum[r:].square().sum().sqrt()

    def check(result) -> float:
        residual, product = result
        # The split itself: W - s B A, in float64 (the rounded residual adds only eps ||W||).
        return float(torch.linalg.matrix_norm(weight.double() - product.detach().double()) / optimal - 1)

    flops = 2 * (N_ITER + 1) * 2.0 * out_features * in_features * (r + OVERSAMPLE)
    moved = 4.0 * out_features * in_features * (2 * (N_ITER + 1) + 2)  # W per product, plus copy and residual
    with torch.no_grad():
        measure(benchmark, case, _build(case, weight, r), check, flops=flops, bytes=moved)
