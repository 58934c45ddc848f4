"""Benchmarks of IncreLoRA's rank allocator (:class:`lowrank_ops.methods.increlora.IncreLoRAAllocator`,
ALGORITHMS.md section 8) against PEFT's AdaLoRA ``RankAllocator`` on a same-size model.

Model: ``L`` adapted ``[d, d]`` linear layers with ``r_max`` rank slots each (default
L = 8, d = 1024, r_max = 16, float32).  The gradients are set once (random, never zero);
the timed calls are the allocator's own work, which a training loop adds to every step:

* op ``update_and_allocate.step``: a step without allocation, i.e. the importance
  averages' update over every adapter entry (``|w g|``, two moving averages);
* op ``update_and_allocate.allocate``: a step that also allocates: ours adds one rank to
  the top-scoring module (reading the L module scores once); AdaLoRA masks its triplets
  to the step's budget (a ``kthvalue`` over all L r_max triplet scores), PEFT's
  ``update_and_allocate(model, step, force_mask=True)``.

Implementations:

* ``ours``: ``update_and_allocate(step)`` over ``LoRALinear(r=r_max)`` modules
  (``torch._foreach`` kernels over all ``A`` and ``B`` at once; the allocation op adds a
  rank per call with ``add_every = 1``, and the ranks are reset to ``init_rank`` whenever
  the budget is spent, a few Python assignments every ``L (r_max - 1)`` calls);
* ``peft_adalora``: ``RankAllocator.update_and_allocate`` of a PEFT AdaLoRA model with
  ``init_r = r_max`` (its ``lora_A``, ``lora_B`` and ``lora_E``: r_max more entries per
  layer, a negligible difference in size).

Error column: the first call's averages (from zero) against the float64 formulas
``Ibar = (1 - beta1) |w g|`` and ``U = (1 - beta2) |I - Ibar|``: the largest relative
error over all entries of both.  Flops: 8 per adapter entry (product, abs, two lerps,
subtraction, abs); bytes: w, g read, both averages read and written (float32).
"""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.methods.increlora import IncreLoRAAllocator
from lowrank_ops.nn import LoRALinear

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, rel_error, require_device

FAMILY = "increlora"
BETA1 = BETA2 = 0.85
INIT_RANK = 2

# (layers, d, r_max)
_PROBLEMS = [(8, 1024, 16), (32, 4096, 16)] if FULL else [(8, 1024, 16)]


def _label(problem) -> str:
    layers, d, r_max = problem
    return f"{layers}x({d}x{d}) r_max={r_max}"


def _cases(op: str):
    return grid_cases(FAMILY, op, {d: _PROBLEMS for d in DEVICES}, {"float32": ("ours", "peft_adalora")}, _label)


class _Layers(torch.nn.Module):
    def __init__(self, layers: int, d: int, device: str):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d, device=device) for _ in range(layers))


def _set_grads(params, generator):
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.device)


def _ours(problem, device, allocate: bool):
    """``(fn, params)``: one call of our allocator per ``fn()``, returning the averages."""
    layers, d, r_max = problem
    generator = torch.Generator().manual_seed(0)
    model = _Layers(layers, d, device)
    for i, linear in enumerate(model.layers):
        model.layers[i] = LoRALinear(linear, r_max, r_max, generator=generator)
        with torch.no_grad():
            model.layers[i].lora_B[:, :INIT_RANK] = torch.randn(d, INIT_RANK, generator=generator)
    allocator = IncreLoRAAllocator(model, layers * r_max, INIT_RANK, add_every=1 if allocate else 10**9,
                                   beta1=BETA1, beta2=BETA2, generator=generator)
    params = [p for layer in model.layers for p in (layer.lora_A, layer.lora_B)]
    _set_grads(params, generator)
    step = [0]

    def fn():
        if allocator.budget_spent:  # start the schedule over (see the module docstring)
            allocator.ranks = [INIT_RANK] * layers
            for layer in model.layers:
                layer.active_rank = INIT_RANK
        step[0] += 1
        allocator.update_and_allocate(step[0])
        return allocator._exp_avg_ipt, allocator._exp_avg_unc

    return fn, params


def _peft(problem, device, allocate: bool):
    from peft import AdaLoraConfig, get_peft_model

    layers, d, r_max = problem
    torch.manual_seed(0)
    config = AdaLoraConfig(init_r=r_max, target_r=r_max // 2, tinit=0, tfinal=0, deltaT=10**7, total_step=10**6,
                           beta1=BETA1, beta2=BETA2, target_modules=[str(i) for i in range(layers)])
    model = get_peft_model(torch.nn.Sequential(*_Layers(layers, d, device).layers), config)
    allocator = model.base_model.rankallocator
    allocator.reset_ipt()
    inner = model.base_model.model  # the allocator's names are relative to it
    names = [n for n, p in inner.named_parameters() if "lora_" in n]
    params = [p for n, p in inner.named_parameters() if "lora_" in n]
    _set_grads(params, torch.Generator().manual_seed(0))
    step = [0]

    def fn():
        if allocate:  # mid-schedule: a budget between init_r and target_r per layer
            allocator.update_and_allocate(inner, 10**6 // 2, force_mask=True)
        else:
            step[0] += 1
            allocator.update_and_allocate(inner, step[0])
        return [allocator.exp_avg_ipt[n] for n in names], [allocator.exp_avg_unc[n] for n in names]

    return fn, params


def _run(benchmark, case: Case, allocate: bool):
    require_device(case.device)
    layers, d, r_max = case.problem
    holder = {}

    def build():
        fn, params = (_ours if case.impl == "ours" else _peft)(case.problem, case.device, allocate)
        holder["params"] = params
        holder["weights"] = [p.detach().double() for p in params]  # before an allocation rewrites slots
        return fn

    def check(result) -> float:
        ema, unc = result
        expected_ema, expected_unc = [], []
        for p, w in zip(holder["params"], holder["weights"]):
            ipt = (w * p.grad.double()).abs()
            expected_ema.append((1 - BETA1) * ipt)
            expected_unc.append((1 - BETA2) * BETA1 * ipt)  # |I - (1 - beta1) I|
        return rel_error(list(ema) + list(unc), expected_ema + expected_unc)

    entries = layers * r_max * 2 * d
    measure(benchmark, case, build, check, flops=8.0 * entries, bytes=4.0 * 6 * entries)


@pytest.mark.parametrize("case", params(_cases("update_and_allocate.step")))
def test_increlora_step(benchmark, case: Case):
    _run(benchmark, case, allocate=False)


@pytest.mark.parametrize("case", params(_cases("update_and_allocate.allocate")))
def test_increlora_allocate(benchmark, case: Case):
    _run(benchmark, case, allocate=True)
