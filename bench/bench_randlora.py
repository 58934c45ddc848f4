"""Benchmarks of RandLoRA's layer (:class:`lowrank_ops.nn.RandLoRALinear`, ALGORITHMS.md section 8).

Layer: ``y = x W^T + b + x dW^T`` with a frozen ``W [out, in]`` and RandLoRA's full-rank
``dW = s sum_b B_b diag(lambda_b) A diag(gamma_b)`` (n = ceil(min(in, out) / r) frozen
random bases of rank r, trained ``lambda [n, r]`` and ``gamma [n, min(in, out)]``).
Timed as ``randlora.fwd`` (no autograd) and ``randlora.fwd+bwd`` (forward plus the
gradients of x, lambda and gamma; W, b and the bases frozen, as in training).
Implementations on the same bases and diagonals:

* ``ours``: :class:`lowrank_ops.nn.RandLoRALinear`: the stacked bases through
  :func:`lowrank_ops.ops.lora_linear` with lambda as its gate, dW never formed;
* ``peft``: PEFT's RandLoRA layer (``peft.tuners.randlora.layer.Linear``) around an
  ``nn.Linear`` with the same W and b, its bases and diagonals set to ours (PEFT's row
  pairing mapped as in tests/test_randlora.py): base output plus two ``F.linear`` on the
  stacked bases, its scaled A formed by its own autograd Function;
* ``dense``: the naive composition: form ``dW`` from the diagonals (autograd through it)
  and apply ``F.linear(x, W + dW, b)``.

Sizes: (out, in) = (1024, 1024) at N = 128 and 1024, (2048, 2048) at N = 128, r = 32
(PEFT's default: 32 and 64 bases), float32 CPU (and CUDA when usable).

Roofline (the same for every impl), with R = n r stacked directions: forward
``2 N in out + 2 N R (in + out)`` flops; forward+backward adds ``2 N in out`` (dx through W)
and ``2 N R (2 m + M)`` for the adapter (``h = dy B~`` or its mirror on the large side,
``d A~`` and the adapter's dx on the small side; m = min, M = max); dW is never
needed.  The dense composition instead does ``2 R in out`` to form dW, so it does less
work once N exceeds about ``in out / (in + out)`` (512 at 1024 x 1024): the N = 1024 case
shows that crossover.  Bytes: x, W, the bases, y (and dy, dx).

Memory (``ours MB`` / ``peer MB``): peak memory of one call beyond its inputs
(:func:`_harness.peak_memory_mb`).  The fwd+bwd cases' note gives what each impl keeps
from the forward for the backward (:func:`saved_for_backward_mb`): training holds that for
every adapted layer at once, so it, not the one-call peak, is what grows with depth.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple, Tuple

import pytest
import torch

from lowrank_ops.nn import RandLoRALinear

from _harness import DEVICES, Case, grid_cases, measure, params, rel_error, require_device, timed_pass

FAMILY = "randlora"
SEED = 0
_IMPLS = ("ours", "peft", "dense")

# (out_features, in_features, r, N)
_PROBLEMS = {device: [(1024, 1024, 32, 128), (1024, 1024, 32, 1024), (2048, 2048, 32, 128)] for device in DEVICES}
_DTYPES = {"float32": _IMPLS}


def _label(problem) -> str:
    out_features, in_features, rank, n = problem
    return f"{out_features}x{in_features} r={rank} N={n}"


class Inputs(NamedTuple):
    layer: RandLoRALinear  # ours, holding W, b, the bases and the (random) diagonals
    x: torch.Tensor
    dy: torch.Tensor


@functools.lru_cache(maxsize=1)
def _inputs(problem: tuple, dtype: torch.dtype, device: str) -> Inputs:
    out_features, in_features, rank, n = problem
    generator = torch.Generator().manual_seed(SEED)
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        base.bias.copy_(torch.randn(out_features, generator=generator))
    layer = RandLoRALinear(base, rank, seed=SEED).to(device=device, dtype=dtype)
    with torch.no_grad():  # O(1) adapter output: lambda ~ N(0, 1), gamma ~ N(0, 1) / (s sqrt(n))
        layer.randlora_lambda.copy_(torch.randn(layer.randlora_lambda.shape, generator=generator))
        gamma = torch.randn(layer.randlora_gamma.shape, generator=generator) / (layer.scaling * layer.num_bases**0.5)
        layer.randlora_gamma.copy_(gamma)
    x = torch.randn(n, in_features, generator=generator).to(device=device, dtype=dtype)
    dy = torch.randn(n, out_features, generator=generator).to(device=device, dtype=dtype)
    return Inputs(layer, x, dy)


@functools.lru_cache(maxsize=2)
def _reference(problem: tuple, dtype: torch.dtype, device: str, backward: bool):
    """float64 ``(y,)`` or ``(y, dx, d lambda, d gamma)`` from dW formed term by term."""
    inp = _inputs(problem, dtype, device)
    layer = inp.layer
    x, lam, gamma = (t.detach().double().requires_grad_(backward)
                     for t in (inp.x, layer.randlora_lambda, layer.randlora_gamma))
    A, B = layer.randlora_A.double(), layer.randlora_B.double()
    scaled = (gamma[:, None, :] * A).reshape(-1, A.shape[1])
    delta = (B * lam.reshape(-1)) @ scaled  # [M, m]
    if layer.in_features > layer.out_features:
        delta = delta.T
    y = x @ (layer.base_layer.weight.double() + layer.scaling * delta).T + layer.base_layer.bias.double()
    if not backward:
        return (y.detach(),)
    return (y.detach(), *torch.autograd.grad(y, (x, lam, gamma), inp.dy.double()))


def _peft_layer(layer: RandLoRALinear):
    """PEFT's RandLoRA layer holding the same W, b, bases and diagonals as ``layer``."""
    from peft import RandLoraConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.randlora.layer import Linear as PeftRandLoraLinear

    weight = layer.base_layer.weight
    base = torch.nn.Linear(layer.in_features, layer.out_features, device=weight.device, dtype=weight.dtype)
    base.load_state_dict(layer.base_layer.state_dict())
    n, r = layer.num_bases, layer.r
    large = layer.randlora_B.shape[0]
    # Ours pairs row b r + k of A~ with column b r + k of B~; PEFT pairs row k n + b with
    # column k n + b of its flattened [M, n, r] B: its column k n + b holds our column b r + k.
    inverse = torch.empty(n * r, dtype=torch.long)
    inverse[torch.tensor([k * n + b for b in range(n) for k in range(r)])] = torch.arange(n * r)
    B = layer.randlora_B[:, inverse.to(weight.device)].reshape(large, n, r).contiguous()
    A = layer.randlora_A[:, None, :].contiguous()
    config = RandLoraConfig(r=r, randlora_alpha=layer.randlora_alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftRandLoraLinear(base, BufferDict({"default": A}), BufferDict({"default": B}), "default", config, r=r)
    lam, gamma = peft.randlora_lambda["default"], peft.randlora_gamma["default"]
    with torch.no_grad():
        lam.copy_(layer.randlora_lambda.T)
        gamma.copy_(layer.randlora_gamma)
    base.requires_grad_(False)
    return peft, lam, gamma


def _dense_forward(layer: RandLoRALinear, lam: torch.Tensor, gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The naive composition: dW formed from the diagonals, then one linear."""
    A, B = layer.randlora_A, layer.randlora_B
    scaled = (gamma[:, None, :] * A).reshape(-1, A.shape[1])
    delta = (B * lam.reshape(-1)) @ scaled
    if layer.in_features > layer.out_features:
        delta = delta.T
    return torch.nn.functional.linear(x, layer.base_layer.weight + layer.scaling * delta, layer.base_layer.bias)


def _build(case: Case, inp: Inputs, backward: bool) -> Callable[[], Callable]:
    def build():
        x = inp.x.detach().clone().requires_grad_(backward)
        layer = inp.layer
        if case.impl == "peft":
            peft, lam, gamma = _peft_layer(layer)
            lam.requires_grad_(backward)
            gamma.requires_grad_(backward)
            run = timed_pass(lambda: peft(x), (x, lam, gamma), inp.dy, backward)

            def forward_peft():
                y, *grads = run()
                if grads:
                    grads[1] = grads[1].T  # PEFT's lambda is [r, n]
                return (y, *grads)
            return forward_peft
        lam = layer.randlora_lambda.detach().clone().requires_grad_(backward)
        gamma = layer.randlora_gamma.detach().clone().requires_grad_(backward)
        if case.impl == "dense":
            return timed_pass(lambda: _dense_forward(layer, lam, gamma, x), (x, lam, gamma), inp.dy, backward)
        ours = RandLoRALinear(torch.nn.Linear(layer.in_features, layer.out_features, device=x.device, dtype=x.dtype),
                              layer.r, seed=int(layer.randlora_seed))
        ours.load_state_dict(layer.state_dict())
        ours.randlora_lambda, ours.randlora_gamma = torch.nn.Parameter(lam), torch.nn.Parameter(gamma)
        return timed_pass(lambda: ours(x), (x, ours.randlora_lambda, ours.randlora_gamma), inp.dy, backward)

    return build


def roofline(problem: tuple, element: int, backward: bool) -> Tuple[float, float]:
    """``(flops, bytes)`` of one call (the module docstring's counts)."""
    out_features, in_features, rank, n = problem
    small, large = min(in_features, out_features), max(in_features, out_features)
    stacked = math.ceil(small / rank) * rank
    flops = 2.0 * n * in_features * out_features + 2.0 * n * stacked * (in_features + out_features)
    moved = element * (n * (in_features + out_features) + out_features * (in_features + 1) + stacked * (large + small))
    if backward:
        flops += 2.0 * n * in_features * out_features + 2.0 * n * stacked * (2 * small + large)
        moved += element * (n * (in_features + out_features) + stacked * (rank + small))
    return flops, moved


def saved_for_backward_mb(forward: Callable[[], torch.Tensor], existing) -> float:
    """MB (10^6 bytes) of the tensors the autograd graph of ``forward()`` keeps for the
    backward, counting each storage once and not those of ``existing`` (inputs, parameters,
    buffers: alive anyway).  Between a layer's forward and its backward this is what the
    layer adds to training memory; in a model it is held for every layer at once."""
    known = {t.untyped_storage().data_ptr() for t in existing}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values()) / 1e6


def _saved_note(case: Case, inp: Inputs) -> str:
    """``extra_info["note"]`` of a fwd+bwd case: what the impl keeps from forward to backward."""
    layer = inp.layer
    x = inp.x.detach().clone().requires_grad_()
    if case.impl == "peft":
        peft, lam, gamma = _peft_layer(layer)
        lam.requires_grad_()
        gamma.requires_grad_()
        modules = [peft]
        forward = lambda: peft(x)  # noqa: E731
    elif case.impl == "dense":
        lam, gamma = (t.detach().clone().requires_grad_() for t in (layer.randlora_lambda, layer.randlora_gamma))
        modules = [layer]
        forward = lambda: _dense_forward(layer, lam, gamma, x)  # noqa: E731
    else:
        modules = [layer]
        forward = lambda: layer(x)  # noqa: E731
    existing = [x, *(t for module in modules for t in (*module.parameters(), *module.buffers()))]
    return f"saved for backward {saved_for_backward_mb(forward, existing):.1f} MB"


def _run(benchmark, case: Case, backward: bool) -> None:
    require_device(case.device)
    if case.impl == "peft":
        pytest.importorskip("peft.tuners.randlora")
    inp = _inputs(case.problem, case.torch_dtype, case.device)
    full = _reference(case.problem, case.torch_dtype, case.device, backward)
    flops, moved = roofline(case.problem, inp.x.element_size(), backward)

    def check(result) -> float:
        if backward:
            benchmark.extra_info["note"] = _saved_note(case, inp)
        return rel_error(result, full)

    measure(benchmark, case, _build(case, inp, backward), check, flops=flops, bytes=moved, peak_memory=True)


@pytest.mark.parametrize("case", params(grid_cases(FAMILY, "randlora.fwd", _PROBLEMS, _DTYPES, _label)))
def test_randlora_fwd(benchmark, case: Case):
    _run(benchmark, case, backward=False)


@pytest.mark.parametrize("case", params(grid_cases(FAMILY, "randlora.fwd+bwd", _PROBLEMS, _DTYPES, _label)))
def test_randlora_fwd_bwd(benchmark, case: Case):
    _run(benchmark, case, backward=True)
