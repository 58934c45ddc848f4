"""Benchmarks of the fused LoRA linear (ALGORITHMS.md section 2).

Op: ``y = x W^T + b + s (x A^T) B^T`` with a frozen ``W [out, in]``, ``A = lora_A [r, in]``,
``B = lora_B [out, r]``, x ``[N, in]``, ``s = alpha / r`` with alpha = 2 r.  Timed as
``lora_linear.fwd`` (no autograd) and ``lora_linear.fwd+bwd`` (forward plus the gradients
of x, A and B; W and b frozen, as in LoRA training).  Implementations on the same inputs:

* ``ours``: :func:`lowrank_ops.ops.lora_linear`;
* ``peft``: PEFT's LoRA layer ``peft.tuners.lora.Linear`` wrapping an ``nn.Linear`` with the
  same W and b, its ``lora_A`` / ``lora_B`` weights set to A and B (dropout 0);
* ``linear``: the plain frozen ``nn.Linear`` (no adapter): ``ours / linear`` is the
  adapter's overhead over the base matmul.  Its error column compares it with the base
  product only (it computes no adapter), so it is not comparable.

Sizes: quick default (CPU and CUDA): (out, in) = (1024, 1024), r = 16, N = 128 and 1024,
float32.  ``LOWRANK_OPS_BENCH_FULL=1``: LLaMA-like (4096, 4096) and (11008, 4096) (the
up-projection), r = 8, 16, 64, N = 16 and 512, plus N = 4096 (CPU: only 4096 x 4096 at
r = 16, so the 2-core run stays within minutes; CUDA: every shape and rank), float32 on
CPU, float32 and bfloat16 on CUDA.

Roofline (the same for every impl): forward ``2 N in out`` (base) ``+ 2 N r (in + out)``
flops; forward+backward ``4 N in out + 6 N r (in + out)`` (dW is not computed: W is frozen).
Bytes: x, W, A, B, b and y once; with backward also dy, dx, dA, dB and ``u [N, r]``.  On
CPU both are GEMM-bound (arithmetic intensity ~ N / 2 flops per byte for N << in).

Memory (``ours MB`` / ``peer MB`` columns): peak memory of one call beyond its inputs
(:func:`_harness.peak_memory_mb`): the output and, with backward, what autograd saved
and the gradients; what an adapter layer saves for backward is the training-memory
claim of the fused op (no ``[N, out]`` intermediate besides y; the ``[N, r]`` u only).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Tuple

import pytest
import torch

import lowrank_ops

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, rel_error, require_device, timed_pass

FAMILY = "lora"
SEED = 0
_IMPLS = ("ours", "peft", "linear")

# (out_features, in_features, r, N)
if FULL:
    _LLAMA = [(4096, 4096), (11008, 4096)]
    _PROBLEMS = {
        "cpu": [(o, i, r, n) for o, i in _LLAMA for r in (8, 16, 64) for n in (16, 512)] + [(4096, 4096, 16, 4096)],
        "cuda": [(o, i, r, n) for o, i in _LLAMA for r in (8, 16, 64) for n in (16, 512, 4096)],
    }
    _DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
else:
    _PROBLEMS = {device: [(1024, 1024, 16, 128), (1024, 1024, 16, 1024)] for device in ("cpu", "cuda")}
    _DTYPES = {"cpu": ("float32",), "cuda": ("float32",)}


def _label(problem) -> str:
    out_features, in_features, rank, n = problem
    return f"{out_features}x{in_features} r={rank} N={n}"


def _cases(op: str):
    """grid_cases per device, since the dtypes differ by device."""
    return [
        case
        for device in DEVICES
        for case in grid_cases(FAMILY, op, {d: _PROBLEMS[d] if d == device else [] for d in DEVICES},
                               {dtype: _IMPLS for dtype in _DTYPES[device]}, _label)
    ]


class Inputs(NamedTuple):
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    dy: torch.Tensor
    scale: float


@functools.lru_cache(maxsize=2)
def _inputs(problem: tuple, dtype: torch.dtype, device: str) -> Inputs:
    out_features, in_features, rank, n = problem
    generator = torch.Generator().manual_seed(SEED)
    # O(1) outputs for both parts: W, A ~ 1/sqrt(in), B ~ 1/(s sqrt(r)).
    scale = 2.0  # alpha = 2 r
    x = torch.randn(n, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.randn(out_features, generator=generator)
    lora_A = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    lora_B = torch.randn(out_features, rank, generator=generator) / (scale * rank**0.5)
    dy = torch.randn(n, out_features, generator=generator)
    tensors = (t.to(device=device, dtype=dtype) for t in (x, weight, bias, lora_A, lora_B, dy))
    return Inputs(*tensors, scale)


@functools.lru_cache(maxsize=2)
def _reference(problem: tuple, dtype: torch.dtype, device: str, backward: bool):
    """float64 ``(y,)`` or ``(y, dx, dA, dB)``, plus the base-only ``(x W^T + b[, dx])`` for ``linear``."""
    inp = _inputs(problem, dtype, device)
    x, weight, bias, lora_A, lora_B = (t.double().requires_grad_(backward) for t in inp[:5])
    base = x @ weight.T + bias
    y = base + inp.scale * (x @ lora_A.T) @ lora_B.T
    if not backward:
        return (y.detach(),), (base.detach(),)
    dy = inp.dy.double()
    full = (y.detach(), *torch.autograd.grad(y, (x, lora_A, lora_B), dy, retain_graph=True))
    return full, (base.detach(), torch.autograd.grad(base, x, dy)[0])


def _peft_layer(inp: Inputs):
    import peft

    out_features, in_features = inp.weight.shape
    rank = inp.lora_A.shape[0]
    base = torch.nn.Linear(in_features, out_features, device=inp.x.device, dtype=inp.x.dtype)
    config = peft.LoraConfig(r=rank, lora_alpha=inp.scale * rank, lora_dropout=0.0)
    layer = peft.tuners.lora.Linear(base, "default", config=config, r=rank, lora_alpha=inp.scale * rank)
    with torch.no_grad():
        base.weight.copy_(inp.weight)
        base.bias.copy_(inp.bias)
        layer.lora_A["default"].weight.copy_(inp.lora_A)
        layer.lora_B["default"].weight.copy_(inp.lora_B)
    base.requires_grad_(False)
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _linear(inp: Inputs):
    out_features, in_features = inp.weight.shape
    layer = torch.nn.Linear(in_features, out_features, device=inp.x.device, dtype=inp.x.dtype)
    with torch.no_grad():
        layer.weight.copy_(inp.weight)
        layer.bias.copy_(inp.bias)
    return layer.requires_grad_(False)


def _build(case: Case, inp: Inputs, backward: bool) -> Callable[[], Callable]:
    def build():
        x = inp.x.detach().clone().requires_grad_(backward)
        if case.impl == "linear":
            layer = _linear(inp)
            forward, leaves = (lambda: layer(x)), (x,)
        elif case.impl == "peft":
            layer, lora_A, lora_B = _peft_layer(inp)
            forward, leaves = (lambda: layer(x)), (x, lora_A, lora_B)
        else:
            lora_A, lora_B = (t.detach().clone().requires_grad_(backward) for t in (inp.lora_A, inp.lora_B))
            # Its own copy of the frozen weight, as each peer's layer holds one: at small N the
            # op streams W, and a long-lived tensor measured slower to stream than a fresh copy.
            weight, bias = inp.weight.clone(), inp.bias.clone()
            forward = lambda: lowrank_ops.ops.lora_linear(x, weight, lora_A, lora_B, bias, scale=inp.scale)
            leaves = (x, lora_A, lora_B)
        return timed_pass(forward, leaves, inp.dy, backward)

    return build


def _roofline(inp: Inputs, backward: bool) -> Tuple[float, float]:
    n, in_features = inp.x.shape
    out_features, rank = inp.lora_B.shape
    element = inp.x.element_size()
    low_rank = 2.0 * n * rank * (in_features + out_features)
    flops = 2.0 * n * in_features * out_features + low_rank
    moved = element * (n * (in_features + out_features) + out_features * (in_features + 1) + rank * (in_features + out_features))
    if backward:
        flops += 2.0 * n * in_features * out_features + 2 * low_rank
        moved += element * (n * (in_features + out_features) + rank * (in_features + out_features) + 2 * n * rank)
    return flops, moved


def _run(benchmark, case: Case, backward: bool) -> None:
    require_device(case.device)
    inp = _inputs(case.problem, case.torch_dtype, case.device)
    full, base = _reference(case.problem, case.torch_dtype, case.device, backward)

    def check(result) -> float:
        if case.impl == "linear":
            benchmark.extra_info["note"] = "error vs the base product x W^T + b (no adapter)"
            return rel_error(result, base)
        return rel_error(result, full)

    flops, moved = _roofline(inp, backward)
    measure(benchmark, case, _build(case, inp, backward), check, flops=flops, bytes=moved, peak_memory=True)


@pytest.mark.parametrize("case", params(_cases("lora_linear.fwd")))
def test_lora_linear_fwd(benchmark, case: Case):
    _run(benchmark, case, backward=False)


@pytest.mark.parametrize("case", params(_cases("lora_linear.fwd+bwd")))
def test_lora_linear_fwd_bwd(benchmark, case: Case):
    _run(benchmark, case, backward=True)
