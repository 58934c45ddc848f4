"""Benchmarks of Trained Rank Pruning's truncation (:func:`lowrank_ops.methods.trp.truncate_`,
ALGORITHMS.md section 8).

Op ``truncate``: project ``L`` dense ``[n, n]`` weights in place onto their rank-``k``
truncated SVDs, ``k`` the smallest rank keeping the energy fraction ``e`` (TRP's periodic
step).  Each timed call starts from fresh copies of the weights (the copy is in every
impl's time):

* ``ours``: ``trp.truncate_(model, e, generator=...)``: rsvd at ranks 32, 64, ... until
  the energy is captured (the exact thin SVD past half the dimension);
* ``torch_svd``: what the TRP reference does per layer: ``torch.linalg.svd`` of W, the
  cumulative energy, ``W <- U_k S_k Vh_k``.

The weights have the spectrum ``s_i = 1 / i`` (:func:`_harness.spectral_matrix`), where
``e = 0.99`` needs ``k = 57`` at ``n = 1024``: the regime after some TRP training (the paper's
point is that the weights become low rank).  The error column is the worst layer's excess
of ``||W - W_trunc||_F`` over the optimal rank-``k`` error ``||W - W_k||_F`` (0 is optimal;
both impls pick ``k = 57``).
Sizes: default ``L = 8`` layers of 1024 x 1024; ``LOWRANK_OPS_BENCH_FULL=1``: also 4 of 4096 x 4096.
Flops: ``L * 2 n^2 l (2 q + 2)`` summed over the search's rsvd ranks ``l`` (32 and 64 plus
oversampling 10, ``q`` = 7 and 7 power iterations), the work ours does, for both impls.
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.methods import trp

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, require_device, rsvd_auto_passes, spectral_matrix

FAMILY = "trp"
ENERGY = 0.99

# (layers, n)
_PROBLEMS = [(8, 1024)] + ([(4, 4096)] if FULL else [])


def _label(problem) -> str:
    layers, n = problem
    return f"{layers}x{n}x{n} e={ENERGY}"


def _cases():
    return grid_cases(FAMILY, "truncate", {d: _PROBLEMS for d in DEVICES}, {"float32": ("ours", "torch_svd")}, _label)


def _energy_rank(spectrum: torch.Tensor, energy: float) -> int:
    captured = spectrum.square().cumsum(0)
    return int((captured < energy * captured[-1]).sum()) + 1


def _model(weights: torch.Tensor) -> torch.nn.Sequential:
    layers = []
    for W in weights:
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
        with torch.no_grad():
            layer.weight.copy_(W)
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def _torch_truncate_(model: torch.nn.Module, energy: float) -> None:
    with torch.no_grad():
        for layer in model:
            U, S, Vh = torch.linalg.svd(layer.weight, full_matrices=False)
            captured = S.double().square().cumsum(0)
            k = int((captured < energy * captured[-1]).sum()) + 1
            layer.weight.copy_((U[:, :k] * S[:k]) @ Vh[:k])


@pytest.mark.parametrize("case", params(_cases()))
def test_truncate(benchmark, case: Case):
    require_device(case.device)
    layers, n = case.problem
    weights, spectrum = spectral_matrix(layers, n, n, case.device)
    k = _energy_rank(spectrum, ENERGY)
    optimal = spectrum[k:].square().sum().sqrt().item()
    def build():
        if case.impl == "ours":
            generator = torch.Generator(device=case.device)

            def run():
                model = _model(weights)
                trp.truncate_(model, ENERGY, generator=generator.manual_seed(0))
                return model
            return run

        def run():
            model = _model(weights)
            _torch_truncate_(model, ENERGY)
            return model
        return run

    def check(model) -> float:
        worst = 0.0
        for layer, W in zip(model, weights):
            error = torch.linalg.matrix_norm(W.double() - layer.weight.detach().double()).item()
            worst = max(worst, error / optimal - 1)
        return worst

    q = rsvd_auto_passes(n, n, 32)
    flops = layers * sum(2.0 * n * n * (r + 10) * (2 * q + 2) for r in (32, 64))
    measure(benchmark, case, build, check, flops=flops, bytes=4.0 * layers * n * n * 2 * (2 * q + 2))
