"""Benchmarks of NOLA's layer (:class:`lowrank_ops.nn.NOLALinear`, ALGORITHMS.md section 8).

Layer: ``y = x W^T + b + s (x A^T) B^T`` with a frozen ``W [out, in]``,
``A = sum_i alpha_i A_i`` (k_A frozen random ``[r, in]`` bases) and
``B = sum_j beta_j B_j`` (k_B frozen ``[out, r]`` bases); only alpha and beta train.
Timed as ``nola.fwd`` (no autograd) and ``nola.fwd+bwd`` (forward plus the gradients of x,
alpha and beta).  Implementations on the same bases and coefficients:

* ``ours``: :class:`lowrank_ops.nn.NOLALinear` (cached bases): one GEMV per factor, then
  the fused :func:`lowrank_ops.ops.lora_linear`;
* ``ours_uncached``: the same layer with ``cache_bases=False`` (the bases redrawn block by
  block in the forward and again in the backward): what the memory saving costs;
* ``authors``: the computation of NOLA's GPT-2 code (github.com/UCDvision/NOLA,
  ``model_nola.py``): ``einsum("b,boi->oi")`` over the bases for each factor, then the
  unfused ``base(x) + s (x A^T) B^T`` (two ``F.linear`` and an add), here on the cached
  bases (the authors' code redraws them from torch's global generator in every forward and
  backward, as ``ours_uncached`` does from a private one, so this peer is their arithmetic
  without their drawing cost);
* ``dense``: the naive composition: ``W + s B A`` formed, then one ``F.linear``.

Sizes: (out, in) = (1024, 1024) and (2048, 2048), N = 128, r = 8, k_A = k_B = 1024
(NOLA's GPT-2 settings use rank 8 and about a thousand bases per factor), float32 CPU
(and CUDA when usable).

Roofline (the same for every impl): forward ``2 N in out + 2 N r (in + out)`` flops plus
``2 r (k_A in + k_B out)`` for the two contractions, which read the bases
(``4 r (k_A in + k_B out)`` bytes: 64 MB at 1024 x 1024, the dominant traffic at small N);
forward+backward adds ``2 N in out + 4 N r (in + out)`` (dx, dA, dB) and the coefficients'
gradients (``2 r (k_A in + k_B out)``, a second read of the bases).  The dense composition
adds ``2 r in out`` to form ``B A``.

Memory (``ours MB`` / ``peer MB``): peak memory of one call beyond its inputs (the cached
bases are inputs: they exist before the call; ``ours_uncached`` holds none).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Tuple

import pytest
import torch

from lowrank_ops.nn import NOLALinear

from _harness import DEVICES, Case, grid_cases, measure, params, rel_error, require_device, timed_pass

FAMILY = "nola"
SEED = 0
_IMPLS = ("ours", "ours_uncached", "authors", "dense")

# (out_features, in_features, r, k (bases per factor), N)
_PROBLEMS = {device: [(1024, 1024, 8, 1024, 128), (2048, 2048, 8, 1024, 128)] for device in DEVICES}
_DTYPES = {"float32": _IMPLS}


def _label(problem) -> str:
    out_features, in_features, rank, k, n = problem
    return f"{out_features}x{in_features} r={rank} k={k} N={n}"


class Inputs(NamedTuple):
    layer: NOLALinear  # holding W, b, the cached bases and the (random) coefficients
    x: torch.Tensor
    dy: torch.Tensor


@functools.lru_cache(maxsize=1)
def _inputs(problem: tuple, dtype: torch.dtype, device: str) -> Inputs:
    out_features, in_features, rank, k, n = problem
    generator = torch.Generator().manual_seed(SEED)
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        base.bias.copy_(torch.randn(out_features, generator=generator))
    layer = NOLALinear(base, rank, k, k, seed=SEED).to(device=device, dtype=dtype)
    with torch.no_grad():  # beta ~ N(0, 1) / (s sqrt(k)): an O(1) adapter output
        layer.nola_beta.copy_(torch.randn(k, generator=generator) / (layer.scaling * k**0.5))
    x = torch.randn(n, in_features, generator=generator).to(device=device, dtype=dtype)
    dy = torch.randn(n, out_features, generator=generator).to(device=device, dtype=dtype)
    return Inputs(layer, x, dy)


@functools.lru_cache(maxsize=2)
def _reference(problem: tuple, dtype: torch.dtype, device: str, backward: bool):
    """float64 ``(y,)`` or ``(y, dx, d alpha, d beta)``."""
    inp = _inputs(problem, dtype, device)
    layer = inp.layer
    x, alpha, beta = (t.detach().double().requires_grad_(backward) for t in (inp.x, layer.nola_alpha, layer.nola_beta))
    A = torch.einsum("i,irc->rc", alpha, layer.nola_basis_A.double())
    B = torch.einsum("j,jor->or", beta, layer.nola_basis_B.double())
    y = x @ layer.base_layer.weight.double().T + layer.base_layer.bias.double() + layer.scaling * (x @ A.T) @ B.T
    if not backward:
        return (y.detach(),)
    return (y.detach(), *torch.autograd.grad(y, (x, alpha, beta), inp.dy.double()))


def _authors_forward(layer: NOLALinear, alpha, beta, x):
    """NOLA's GPT-2 code's structure: einsum contractions, then the unfused LoRA branch."""
    A = torch.einsum("b,boi->oi", alpha, layer.nola_basis_A)
    B = torch.einsum("b,boi->oi", beta, layer.nola_basis_B)
    base = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    return base + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * layer.scaling


def _dense_forward(layer: NOLALinear, alpha, beta, x):
    A = (alpha @ layer.nola_basis_A.reshape(alpha.shape[0], -1)).view(layer.r, -1)
    B = (beta @ layer.nola_basis_B.reshape(beta.shape[0], -1)).view(-1, layer.r)
    return torch.nn.functional.linear(x, layer.base_layer.weight + layer.scaling * (B @ A), layer.base_layer.bias)


def _build(case: Case, inp: Inputs, backward: bool) -> Callable[[], Callable]:
    def build():
        layer = inp.layer
        x = inp.x.detach().clone().requires_grad_(backward)
        alpha = layer.nola_alpha.detach().clone().requires_grad_(backward)
        beta = layer.nola_beta.detach().clone().requires_grad_(backward)
        if case.impl == "authors":
            forward = lambda: _authors_forward(layer, alpha, beta, x)  # noqa: E731
        elif case.impl == "dense":
            forward = lambda: _dense_forward(layer, alpha, beta, x)  # noqa: E731
        else:
            ours = NOLALinear(torch.nn.Linear(layer.in_features, layer.out_features, device=x.device, dtype=x.dtype),
                              layer.r, layer.num_basis_A, layer.num_basis_B, seed=int(layer.nola_seed),
                              cache_bases=case.impl == "ours")
            ours.load_state_dict(layer.state_dict())
            ours.nola_alpha, ours.nola_beta = torch.nn.Parameter(alpha), torch.nn.Parameter(beta)
            alpha, beta = ours.nola_alpha, ours.nola_beta
            forward = lambda: ours(x)  # noqa: E731
        return timed_pass(forward, (x, alpha, beta), inp.dy, backward)

    return build


def roofline(problem: tuple, element: int, backward: bool) -> Tuple[float, float]:
    """``(flops, bytes)`` of one call (the module docstring's counts)."""
    out_features, in_features, rank, k, n = problem
    bases = rank * k * (in_features + out_features)
    flops = 2.0 * n * in_features * out_features + 2.0 * n * rank * (in_features + out_features) + 2.0 * bases
    moved = element * (n * (in_features + out_features) + out_features * (in_features + 1) + bases + 2 * k)
    if backward:
        flops += 2.0 * n * in_features * out_features + 4.0 * n * rank * (in_features + out_features) + 2.0 * bases
        moved += element * (n * (in_features + out_features) + bases + 2 * k)
    return flops, moved


def _run(benchmark, case: Case, backward: bool) -> None:
    require_device(case.device)
    inp = _inputs(case.problem, case.torch_dtype, case.device)
    full = _reference(case.problem, case.torch_dtype, case.device, backward)
    flops, moved = roofline(case.problem, inp.x.element_size(), backward)
    measure(benchmark, case, _build(case, inp, backward), lambda result: rel_error(result, full), flops=flops,
            bytes=moved, peak_memory=True)


@pytest.mark.parametrize("case", params(grid_cases(FAMILY, "nola.fwd", _PROBLEMS, _DTYPES, _label)))
def test_nola_fwd(benchmark, case: Case):
    _run(benchmark, case, backward=False)


@pytest.mark.parametrize("case", params(grid_cases(FAMILY, "nola.fwd+bwd", _PROBLEMS, _DTYPES, _label)))
def test_nola_fwd_bwd(benchmark, case: Case):
    _run(benchmark, case, backward=True)
