"""Benchmarks of low-rank weight compression (ALGORITHMS.md section 8: LoRD / PELA).

Op ``compress``: replace one ``[out, in]`` linear layer by rank-k factors
(``Linear(in, k) -> Linear(k, out)``).  Each timed call starts from a fresh copy of the
layer (the copy is part of every impl's time):

* ``ours``: :func:`lowrank_ops.methods.lowrank_compress.compress` with ``rank=k`` (rsvd,
  default settings, plus its 16-probe error estimate for the report);
* ``full_svd``: what the compression papers' code does: ``torch.linalg.svd`` of W, truncated
  to k, the same two layers built from it;
* ``svd_lowrank``: ``torch.svd_lowrank(W, q=k + 10, niter=ours' iterations)``, the same
  factors as ours would be at matched passes.

The weight has the spectrum ``s_i = 1 / i`` (:func:`_harness.spectral_matrix`), so the error
column is the excess of ``||W - W_k||_F`` over the optimal rank-k error (0 is optimal).
Sizes: default 1024 x 1024 at k = 64; ``LOWRANK_OPS_BENCH_FULL=1``: 4096 x 4096 and
11008 x 4096 at k = 256 (the full SVD only at 4096 x 4096: ~8 s a call on 2 cores).
Flops: ``2 m n (k + 10) (2 q + 2)`` for ours' q power iterations (rsvd's count).
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.methods import lowrank_compress

from _harness import (DEVICES, FULL, Case, grid_cases, linear_with_weight, measure, params, require_device,
                      rsvd_auto_passes, spectral_matrix)

FAMILY = "lowrank_compress"
OVERSAMPLE = 10

# (out_features, in_features, k)
if FULL:
    _PROBLEMS = [(4096, 4096, 256), (11008, 4096, 256)]
    _FULL_SVD = {(4096, 4096, 256)}
else:
    _PROBLEMS = [(1024, 1024, 64)]
    _FULL_SVD = {(1024, 1024, 64)}


def _label(problem) -> str:
    out_features, in_features, k = problem
    return f"{out_features}x{in_features} k={k}"


def _cases():
    impls = {"float32": ("ours", "svd_lowrank")}
    cases = grid_cases(FAMILY, "compress", {d: _PROBLEMS for d in DEVICES}, impls, _label)
    return cases + grid_cases(FAMILY, "compress", {d: sorted(_FULL_SVD) for d in DEVICES}, {"float32": ("full_svd",)},
                              _label)


def _factored(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.nn.Sequential:
    """The two layers the papers' code builds from a truncated SVD."""
    k = S.shape[0]
    first = torch.nn.Linear(Vh.shape[1], k, bias=False, device=U.device)
    second = torch.nn.Linear(k, U.shape[0], bias=False, device=U.device)
    with torch.no_grad():
        first.weight.copy_(Vh)
        second.weight.copy_(U * S)
    return torch.nn.Sequential(first, second)


def _build(case: Case, weight: torch.Tensor, k: int, passes: int):
    """``build()`` returning the timed compression: ``fn() -> W_k [out, in]`` (the product of the two layers)."""

    def product(layers: torch.nn.Sequential) -> torch.Tensor:
        return layers[1].weight @ layers[0].weight

    def build():
        if case.impl == "ours":
            generator = torch.Generator(device=case.device)

            def run():
                model = torch.nn.Sequential(linear_with_weight(weight))
                lowrank_compress.compress(model, rank=k, generator=generator.manual_seed(0))
                return product(model[0])
            return run
        if case.impl == "full_svd":
            def run():
                model = torch.nn.Sequential(linear_with_weight(weight))
                U, S, Vh = torch.linalg.svd(model[0].weight.detach(), full_matrices=False)
                return product(_factored(U[:, :k], S[:k], Vh[:k]))
            return run

        def run():
            model = torch.nn.Sequential(linear_with_weight(weight))
            with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
                torch.manual_seed(0)  # svd_lowrank draws from the global generator
                U, S, V = torch.svd_lowrank(model[0].weight.detach(), q=k + OVERSAMPLE, niter=passes)
            return product(_factored(U[:, :k], S[:k], V[:, :k].T))
        return run

    return build


@pytest.mark.parametrize("case", params(_cases()))
def test_compress(benchmark, case: Case):
    require_device(case.device)
    out_features, in_features, k = case.problem
    weight, spectrum = spectral_matrix(0, out_features, in_features, case.device)
    passes = rsvd_auto_passes(out_features, in_features, k)
    optimal = spectrum[k:].square().sum().sqrt()

    def check(W_k) -> float:
        return float(torch.linalg.matrix_norm(weight.double() - W_k.detach().double()) / optimal - 1)

    l = k + OVERSAMPLE
    with torch.no_grad():
        measure(benchmark, case, _build(case, weight, k, passes), check,
                flops=2.0 * out_features * in_features * l * (2 * passes + 2),
                bytes=4.0 * out_features * in_features * (2 * passes + 2))
