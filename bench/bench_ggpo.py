"""Benchmarks of the LoRA-GGPO training step (:class:`lowrank_ops.optim.GGPO`).

Op ``step``: one training step of a stack of ``L`` LoRA layers (:class:`LoRALinear`,
``d x d``, rank r, tanh between layers) on N tokens with an MSE loss, AdamW on the
adapters.  Implementations on the same model, data and starting weights:

* ``ours``: GGPO with ``gradient_source="current"`` (SAM-like: two forward/backward
  passes, noise scaled with the first pass's gradients);
* ``ours_previous``: GGPO with ``gradient_source="previous"`` (one pass, the previous
  step's gradient norms);
* ``adamw``: the plain step (one forward/backward, AdamW), the baseline the ratios are
  the overhead against;
* ``dense_norms``: the same two-pass step written the obvious way: ``W'`` and ``G' =
  s (dB A + B dA)`` formed as ``[d, d]`` matrices for their row norms, ``W`` cloned before
  adding the noise and copied back after (what GGPO's Gram-matrix norms and buffer swap
  avoid).

GFLOP/s count one forward and backward pass (``6 N d^2`` per layer) for every impl.

Error column: for ``ours`` and ``dense_norms``, the per-row noise standard deviation of the
first layer against the formula evaluated with dense float64 ``W'`` and ``G'``
(``max |std - std_ref| / max std_ref``); for the others 0 (nothing to compare).
``ours MB`` / ``peer MB``: peak memory of one step beyond what was live before it (GGPO's
one ``[d, d]`` buffer per layer is allocated on the first step, before the timing).
Sizes: default L = 4, d = 1024, r = 16, N = 512; ``LOWRANK_OPS_BENCH_FULL=1``: L = 4,
d = 4096, r = 16, N = 512.
"""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops.nn import LoRALinear
from lowrank_ops.optim import GGPO

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, require_device

FAMILY = "ggpo"
SIGMA, ALPHA, BETA = 0.05, 1.0, 1.0

# (layers L, width d, rank r, tokens N)
_PROBLEMS = [(4, 4096, 16, 512)] if FULL else [(4, 1024, 16, 512)]


def _cases():
    return grid_cases(FAMILY, "step", {d: _PROBLEMS for d in DEVICES},
                      {"float32": ("ours", "ours_previous", "adamw", "dense_norms")},
                      lambda p: f"L={p[0]} d={p[1]} r={p[2]} N={p[3]}")


class _Stack(torch.nn.Module):
    def __init__(self, layers: int, d: int, r: int, device: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        blocks = []
        for _ in range(layers):
            base = torch.nn.Linear(d, d)
            with torch.no_grad():
                base.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
            layer = LoRALinear(base, r=r, lora_alpha=2 * r, init_lora_weights=False, generator=g)
            blocks.append(layer)
        self.blocks = torch.nn.ModuleList(blocks).to(device)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def _dense_std(layer: LoRALinear) -> torch.Tensor:
    """The formula with dense float64 W' and G' (the error column's reference)."""
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    s = layer.scaling
    W_eff = layer.base_layer.weight.detach().double() + s * B @ A
    G_eff = s * (layer.lora_B.grad.double() @ A + B @ layer.lora_A.grad.double())
    return SIGMA * ((ALPHA * G_eff.square().sum(1) + BETA * W_eff.square().sum(1)) / A.shape[1]).sqrt()


class _DenseGGPO:
    """The two-pass step with dense norms and a cloned backup (the ``dense_norms`` peer)."""

    def __init__(self, model: _Stack, optimizer: torch.optim.Optimizer, generator: torch.Generator):
        self.model, self.optimizer, self.generator = model, optimizer, generator

    @torch.no_grad()
    def std(self, layer: LoRALinear) -> torch.Tensor:
        A, B, W, s = layer.lora_A, layer.lora_B, layer.base_layer.weight, layer.scaling
        W_eff = W + s * B @ A
        G_eff = s * (B.grad @ A + B @ A.grad)
        variance = ALPHA * G_eff.square().sum(1) + BETA * W_eff.square().sum(1)
        return SIGMA * (variance / W.shape[1]).sqrt()

    def step(self, closure):
        self.optimizer.zero_grad()
        closure()
        backups = []
        with torch.no_grad():
            for layer in self.model.blocks:
                W = layer.base_layer.weight
                backups.append(W.clone())
                noise = torch.empty_like(W).normal_(generator=self.generator)
                W.add_(noise * self.std(layer)[:, None])
        self.optimizer.zero_grad()
        closure()
        with torch.no_grad():
            for layer, backup in zip(self.model.blocks, backups):
                layer.base_layer.weight.copy_(backup)
        self.optimizer.step()


@pytest.mark.parametrize("case", params(_cases()))
def test_ggpo_step(benchmark, case: Case):
    require_device(case.device)
    layers, d, r, n = case.problem
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g).to(case.device)
    y = torch.randn(n, d, generator=g).to(case.device)
    model = _Stack(layers, d, r, case.device)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    noise = torch.Generator(device=case.device).manual_seed(2)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    found = {}

    def build():
        if case.impl in ("ours", "ours_previous"):
            source = "current" if case.impl == "ours" else "previous"
            opt = GGPO(model, optimizer, sigma=SIGMA, alpha=ALPHA, beta=BETA, gradient_source=source,
                       generator=noise)
            found["std"] = lambda: opt.noise_std(0)
            return lambda: opt.step(closure)
        if case.impl == "dense_norms":
            opt = _DenseGGPO(model, optimizer, noise)
            found["std"] = lambda: opt.std(model.blocks[0])
            return lambda: opt.step(closure)
        if case.impl == "adamw":
            def step():
                optimizer.zero_grad()
                closure()
                optimizer.step()
            return step
        raise ValueError(case.impl)

    def check(_) -> float:
        if "std" not in found or case.impl == "ours_previous":
            benchmark.extra_info["note"] = ("no noise" if case.impl == "adamw" else
                                            "norms kept from the step before: no reference")
            return 0.0
        # .grad holds the last pass's gradients (at the perturbed point): both the impl's
        # std and the reference read them.
        reference = _dense_std(model.blocks[0])
        return float((found["std"]().double() - reference).abs().max() / reference.abs().max())

    # The work of one training step (forward and backward, 6 N d^2 per layer), the same for
    # every impl: GFLOP/s then compare the impls' step times.
    measure(benchmark, case, build, check, flops=layers * 6.0 * n * d * d, bytes=layers * 4.0 * 3 * d * d,
            peak_memory=True)
