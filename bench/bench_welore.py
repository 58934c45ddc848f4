"""Benchmarks of WeLore's spectrum analysis (:func:`lowrank_ops.methods.welore.singular_spectra`,
ALGORITHMS.md section 8).

Op ``spectra``: the singular values of every ``nn.Linear`` weight of a model, the input of
WeLore's global threshold.  Implementations on the same model:

* ``ours``: ``welore.singular_spectra(model)``: same-shape weights stacked into one call,
  batched one-sided Jacobi (:func:`lowrank_ops.linalg.batched_svd`, values only) up to
  ``min(m, n) = 64``, LAPACK through the tall orientation (``_thin_svd.singular_values``)
  beyond;
* ``torch_svdvals``: what the WeLore code does, ``torch.linalg.svdvals(W)`` per weight.

Models (a transformer block's shapes, repeated per layer): ``tiny``: 24 blocks of d = 64
(64 x 64; 172 x 64; 64 x 172: the Jacobi path); ``small``: 12 blocks of d = 128
(q, k, v, o 128 x 128; up and gate 344 x 128; down 128 x 344); ``mid``: 4 blocks of d = 512
(512 x 512; 1376 x 512; 512 x 1376).  ``LOWRANK_OPS_BENCH_FULL=1`` adds 2 blocks of d = 1024.
Weights N(0, 1/d), fixed seed.  Error column: ``max |s - s_ref| / max s_ref`` over all
weights against float64 ``svdvals``.  Flops: ``sum 4 m n^2 - 4 n^3 / 3`` (Golub-Kahan
bidiagonalization, ``m >= n``), the same for both impls.
"""
from __future__ import annotations

import functools

import pytest
import torch

from lowrank_ops.methods import welore

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, require_device

FAMILY = "welore"
SEED = 0

# name -> (blocks, d, hidden)
_MODELS = {"tiny": (24, 64, 172), "small": (12, 128, 344), "mid": (4, 512, 1376)}
if FULL:
    _MODELS["large"] = (2, 1024, 2752)


def _label(problem) -> str:
    name, = problem
    blocks, d, hidden = _MODELS[name]
    return f"{name} {blocks} blocks d={d} h={hidden}"


def _cases():
    return grid_cases(FAMILY, "spectra", {d: [(name,) for name in _MODELS] for d in DEVICES},
                      {"float32": ("ours", "torch_svdvals")}, _label)


@functools.lru_cache(maxsize=1)
def _model(name: str, device: str) -> torch.nn.Module:
    blocks, d, hidden = _MODELS[name]
    g = torch.Generator().manual_seed(SEED)
    layers = []
    for _ in range(blocks):
        for fan_in, fan_out in [(d, d)] * 4 + [(d, hidden)] * 2 + [(hidden, d)]:
            layer = torch.nn.Linear(fan_in, fan_out, bias=False)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5)
            layers.append(layer)
    return torch.nn.Sequential(*layers).to(device)


@pytest.mark.parametrize("case", params(_cases()))
def test_spectra(benchmark, case: Case):
    require_device(case.device)
    model = _model(case.problem[0], case.device)
    weights = [layer.weight.detach() for layer in model]
    references = [torch.linalg.svdvals(W.double()) for W in weights]

    def build():
        if case.impl == "ours":
            return lambda: list(welore.singular_spectra(model).values())
        return lambda: [torch.linalg.svdvals(W) for W in weights]

    def check(values) -> float:
        return max(float((s.double().cpu() - ref.cpu()).abs().max() / ref.max()) for s, ref in zip(values, references))

    flops = 0.0
    for W in weights:
        m, n = max(W.shape), min(W.shape)
        flops += 4.0 * m * n * n - 4.0 * n**3 / 3
    with torch.no_grad():
        measure(benchmark, case, build, check, flops=flops, bytes=4.0 * sum(W.numel() for W in weights))
