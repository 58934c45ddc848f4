"""LoRA-GGPO (Chang, Guo, Chang and Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA
Fine-Tuning via Gradient-Guided Perturbation Optimization", arXiv:2502.14538v1): train LoRA
adapters at randomly perturbed weights whose noise is scaled by gradient and weight norms,
which steers training toward flat minima.

What is perturbed: like Flat-LoRA (Li et al., ICML 2025), which the paper builds on, the
noise goes on the equivalent full weight ``W' = W + s B A`` of each adapted layer (``W
[out, in]`` frozen, ``A [r, in]``, ``B [out, r]``, ``s`` the adapter's scaling), not on A
and B, so it reaches directions outside the adapter's rank-r space.  Since the layer
computes ``(W + eps) x + s B A x``, perturbing ``W'`` is perturbing the frozen base
weight.  The exact formula implemented, per row ``i`` (an output neuron):

    eps[i, j] = sigma * sqrt((alpha * ||G'_i||^2 + beta * ||W'_i||^2) / n) * z[i, j],
    z[i, j] ~ N(0, 1) i.i.d.,   n = in_features,

with ``W'_i`` the row of the effective weight and ``G'_i`` the row of the full-weight
gradient as the adapter sees it: ``G' = s (dL/dB A + B dL/dA)``, the first-order change
of ``W'`` per unit step of (A, B) along their gradients (the full gradient ``dL/dW'`` is
never materialized by LoRA training; G' is its image through the adapter).  Rows with
larger gradients (sharper directions) and larger weights get more noise; ``sigma`` sets
the overall scale (Flat-LoRA's ``sigma / sqrt(n) * ||W'_i||`` is the case alpha = 0,
beta = 1), and the ``1 / n`` keeps the perturbation of a row's output
``sum_j eps[i, j] x_j`` independent of the width.  Our reading of the paper's
"gradient and weight norms" mix is this variance mixture (variances of the two sources
add); ``alpha`` and ``beta`` are its weights.  Gradient norms are typically orders of
magnitude below weight norms: ``alpha`` has to be chosen on that scale.

Both norms come without forming any ``[out, in]`` product: ``||W'_i||`` is
:func:`lowrank_ops.ops.dora_row_norm`, and ``||G'_i||^2 = s^2 c_i M c_i^T`` with
``c_i = [dB_i, B_i]`` and ``M`` the ``2r x 2r`` Gram matrix of ``[A; dA]``.

The step (:meth:`GGPO.step`, SAM-like with a closure):

1. ``gradient_source="current"`` (default, two passes as SAM): gradients at ``W'``; then
   perturb with their norms; gradients at ``W' + eps``; restore; base optimizer step.
2. ``gradient_source="previous"`` (one pass): perturb with the gradient norms kept from
   the previous step (none on the first: the weight term alone), gradients at
   ``W' + eps``, keep their norms (``out`` numbers per layer), restore, step.

Memory: one ``[out, in]`` buffer per adapted layer (in W's dtype), allocated on the first
perturbation and reused.  The perturbed weight is built in it and swapped in; the original
tensor is kept and swapped back by :meth:`GGPO.restore`, so restoring is exact to the bit
(subtracting regenerated noise, Flat-LoRA's way, is not).
"""
from __future__ import annotations

import abc
from typing import Callable, Dict, List, Optional

import torch

from .._args import (generator_state, is_integer, require_generator_state, require_generator_type, require_number,
                     restore_generator)
from ..nn.lora import LoRALinear
from ..ops.dora import dora_row_norm

__all__ = ["GGPO"]

_SOURCES = ("current", "previous")


class _Adapter(abc.ABC):
    """One adapted layer: its frozen weight Parameter and how to read A, B and s.

    The module is an attribute and :meth:`factors` a method (not a closure over the module):
    ``copy.deepcopy`` of a model together with its GGPO maps both to the copy's, and pickle
    can save them (a local function can be neither remapped nor pickled)."""

    def __init__(self, name: str, module: torch.nn.Module, weight: torch.nn.Parameter):
        self.name, self.module, self.weight = name, module, weight
        self.buffer: Optional[torch.Tensor] = None  # the perturbed weight (while perturbed) or the spare
        self.original: Optional[torch.Tensor] = None  # W's own tensor while perturbed
        self.grad_sq_norm: Optional[torch.Tensor] = None  # [out], "previous" mode

    @abc.abstractmethod
    def factors(self) -> tuple:
        """``(A, B, ranks, s)``: the factors, the slice of their active ranks, the scaling."""


class _LoRALinearAdapter(_Adapter):
    def __init__(self, name: str, module: LoRALinear):
        if module.use_dora or module.lora_gate is not None:
            raise ValueError(f"GGPO: module {name or 'model'} is a LoRALinear with use_dora={module.use_dora}, "
                             f"use_gate={module.lora_gate is not None}; expected a plain LoRA adapter (both False)")
        super().__init__(name, module, module.base_layer.weight)

    def factors(self) -> tuple:
        module = self.module
        if module.merged:
            raise RuntimeError(f"GGPO: module {self.name or 'model'} is merged; expected an unmerged adapter")
        k = module.r if module.active_rank is None else module.active_rank
        return module.lora_A, module.lora_B, slice(0, k), module.scaling


class _PeftAdapter(_Adapter):
    def __init__(self, name: str, module: torch.nn.Module):
        super().__init__(name, module, module.get_base_layer().weight)

    def factors(self) -> tuple:
        module, name = self.module, self.name
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) != 1 or getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            raise RuntimeError(f"GGPO: PEFT module {name} has active adapters {active}, merged="
                               f"{getattr(module, 'merged', False)}; expected one active, unmerged LoRA adapter")
        adapter = active[0]
        if module.use_dora.get(adapter, False):
            raise RuntimeError(f"GGPO: PEFT module {name} adapter {adapter!r} uses DoRA; expected plain LoRA")
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        return A, B, slice(0, A.shape[0]), float(module.scaling[adapter])


def _find_adapters(model: torch.nn.Module) -> List[_Adapter]:
    adapters, seen = [], {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            adapter = _LoRALinearAdapter(name, module)
        elif isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and hasattr(module, "get_base_layer"):
            if not isinstance(module.get_base_layer(), torch.nn.Linear):
                continue  # PEFT's embedding / conv LoRA layers: not a [out, in] linear weight
            adapter = _PeftAdapter(name, module)
        else:
            continue
        if id(adapter.weight) in seen:
            raise ValueError(f"GGPO: modules {seen[id(adapter.weight)]} and {name} share one base weight; expected "
                             f"each adapted layer to own its weight (it would be perturbed twice)")
        seen[id(adapter.weight)] = name
        adapters.append(adapter)
    return adapters


class GGPO:
    """LoRA-GGPO around a base optimizer (see the module docstring for the formula).

    Parameters
    ----------
    model : nn.Module
        Holds the adapters: :class:`lowrank_ops.nn.LoRALinear` layers (plain LoRA, any
        ``active_rank``) and/or PEFT LoRA ``Linear`` layers (``lora_A``/``lora_B``
        ModuleDicts, one active adapter).  A single LoRALinear works too.
    base_optimizer : torch.optim.Optimizer
        Steps the trainable parameters (typically the adapters) after each perturbed
        gradient.
    sigma : float
        Noise scale ``> 0`` (Flat-LoRA uses 0.05).
    alpha : float
        ``>= 0``: weight of the squared gradient row norms ``||G'_i||^2``.
    beta : float
        ``>= 0``: weight of the squared weight row norms ``||W'_i||^2``; ``alpha + beta > 0``.
    gradient_source : {"current", "previous"}
        Two passes per step (gradients at the unperturbed point scale the noise) or one
        (the previous step's gradients do).
    generator : torch.Generator, optional
        Draws the noise (on the weights' device); with a seeded generator the steps are
        reproducible bit for bit, also across a checkpoint (its state is part of
        :meth:`state_dict`).  None: torch's default generator.

    Notes
    -----
    Usage (the closure computes the loss and calls ``backward``; GGPO zeroes the
    gradients before every call)::

        opt = GGPO(model, torch.optim.AdamW(adapter_params, lr=1e-4), sigma=0.05,
                   alpha=1.0, beta=1.0, generator=torch.Generator().manual_seed(0))

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)

    or by hand: ``loss.backward(); opt.perturb(); opt.zero_grad(); loss_fn(...).backward();
    opt.restore(); opt.base_optimizer.step()``.  Do not save or step the model while it
    is perturbed (:attr:`perturbed`).
    """

    def __init__(self, model: torch.nn.Module, base_optimizer: torch.optim.Optimizer, *, sigma: float = 0.05,
                 alpha: float = 1.0, beta: float = 1.0, gradient_source: str = "current",
                 generator: Optional[torch.Generator] = None) -> None:
        op = "GGPO"
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{op}: model must be an nn.Module; got {type(model).__name__}")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"{op}: base_optimizer must be a torch.optim.Optimizer; got {type(base_optimizer).__name__}")
        self.sigma = require_number(op, "sigma", sigma, 0.0, low_open=True)
        self.alpha = require_number(op, "alpha", alpha, 0.0)
        self.beta = require_number(op, "beta", beta, 0.0)
        if self.alpha + self.beta == 0.0:
            raise ValueError(f"{op}: alpha + beta must be > 0; got alpha = {alpha!r}, beta = {beta!r} (no noise)")
        if gradient_source not in _SOURCES:
            raise ValueError(f"{op}: gradient_source must be one of {_SOURCES}; got {gradient_source!r}")
        require_generator_type(op, "generator", generator)
        self.gradient_source = gradient_source
        self.generator = generator
        self.base_optimizer = base_optimizer
        self._adapters = _find_adapters(model)
        if not self._adapters:
            raise ValueError(f"{op}: model has no LoRA adapters; expected LoRALinear or PEFT LoRA Linear modules")
        for adapter in self._adapters:
            if generator is not None and generator.device != adapter.weight.device:
                raise ValueError(f"{op}: generator is on {generator.device}; expected the device of {adapter.name}'s "
                                 f"weight, {adapter.weight.device}")
        self.perturbed = False

    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the noise scale
    @torch.no_grad()
    def noise_std(self, adapter_index: int) -> torch.Tensor:
        """The per-row standard deviations ``sigma sqrt((alpha ||G'_i||^2 + beta ||W'_i||^2) / n)``
        [out] that :meth:`perturb` would use now for adapter ``adapter_index`` (in the order
        the adapters were found), float32 (float64 for float64 weights).  ``G'`` comes from
        the adapters' current gradients (``"current"``; missing gradients count as zero) or
        from the norms kept at the previous step (``"previous"``; none yet: the weight term
        alone)."""
        count = len(self._adapters)
        if not is_integer(adapter_index) or not 0 <= adapter_index < count:  # (-1 picked the last one silently)
            raise IndexError(f"GGPO.noise_std: adapter_index must be an int in [0, {count}) (this GGPO found {count} "
                             f"adapters); got {adapter_index!r}")
        adapter = self._adapters[int(adapter_index)]
        grad_sq_norm = self._grad_sq_norm(adapter) if self.gradient_source == "current" else adapter.grad_sq_norm
        weight = adapter.weight if adapter.original is None else adapter.original
        A, B, ranks, scale = adapter.factors()
        # Squares (and the gradient term's fourth powers) in float64: in float32 they
        # overflowed for weights or gradients of 1e20 (inf / NaN noise written into W) and
        # underflowed to a zero noise at 1e-30; float64 holds every float32 value's fourth power.
        norm = dora_row_norm(weight, A.detach()[ranks], B.detach()[:, ranks], scale)
        variance = norm.to(torch.float64).square_().mul_(self.beta)
        if self.alpha and grad_sq_norm is not None:
            variance.add_(grad_sq_norm.to(torch.float64), alpha=self.alpha)
        return variance.div_(weight.shape[1]).sqrt_().mul_(self.sigma).to(norm.dtype)

    @staticmethod
    def _grad_sq_norm(adapter: _Adapter) -> Optional[torch.Tensor]:
        """``||G'_i||^2`` [out] (float64) with ``G' = s (dB A + B dA)``, through the 2r x 2r Gram
        of ``[A; dA]`` (no [out, in] product); None when neither factor has a gradient."""
        A, B, ranks, scale = adapter.factors()
        if A.grad is None and B.grad is None:
            return None
        dtype = torch.float64  # fourth powers of the entries: see noise_std
        A_, B_ = A.detach()[ranks].to(dtype), B.detach()[:, ranks].to(dtype)
        dA = torch.zeros_like(A_) if A.grad is None else A.grad[ranks].to(dtype)
        dB = torch.zeros_like(B_) if B.grad is None else B.grad[:, ranks].to(dtype)
        stacked = torch.cat([A_, dA])  # [2r, in]
        gram = stacked @ stacked.T
        coef = torch.cat([dB, B_], dim=1)  # [out, 2r]: G'_i = s coef_i stacked
        return ((coef @ gram) * coef).sum(1).clamp_min_(0.0).mul_(scale * scale)

    # ------------------------------------------------------------------ perturb / restore
    @torch.no_grad()
    def perturb(self) -> None:
        """Replaces each adapted layer's base weight ``W`` by ``W + eps`` (the formula in the
        module docstring), scaled with the current gradients (``gradient_source="current"``)
        or the ones kept from the previous step (``"previous"``)."""
        if self.perturbed:
            raise RuntimeError("GGPO.perturb: the weights are already perturbed; call restore() first")
        for index, adapter in enumerate(self._adapters):
            std = self.noise_std(index)
            weight = adapter.weight
            if adapter.buffer is None or adapter.buffer.shape != weight.shape or adapter.buffer.dtype != weight.dtype:
                adapter.buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
            noisy = adapter.buffer
            noisy.normal_(generator=self.generator)
            # W + z * std in one pass, written over z (drawing z is most of the cost:
            # ~3 ms per million normals on the 2-core CPU, bench/bench_ggpo.py).
            torch.addcmul(weight.detach(), noisy, std.to(weight.dtype)[:, None], out=noisy)
            adapter.original, adapter.buffer = weight.data, None
            weight.data = noisy
        self.perturbed = True

    @torch.no_grad()
    def restore(self) -> None:
        """Puts back each base weight's original tensor (bitwise: nothing is recomputed);
        the perturbed tensor becomes the buffer of the next :meth:`perturb`."""
        if not self.perturbed:
            raise RuntimeError("GGPO.restore: the weights are not perturbed; call perturb() first")
        for adapter in self._adapters:
            adapter.buffer = adapter.weight.data
            adapter.weight.data = adapter.original
            adapter.original = None
        self.perturbed = False

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One GGPO step (module docstring): returns the closure's loss at the unperturbed
        weights (``"current"``) or at the perturbed ones (``"previous"``, one pass)."""
        if closure is None or not callable(closure):
            raise TypeError("GGPO.step: closure must be a callable that computes the loss and calls backward")
        closure = torch.enable_grad()(closure)
        loss = None
        if self.gradient_source == "current":
            self.zero_grad()
            loss = closure()
        self.perturb()
        try:
            self.zero_grad()
            perturbed_loss = closure()
            if self.gradient_source == "previous":
                loss = perturbed_loss
                with torch.no_grad():
                    for adapter in self._adapters:
                        adapter.grad_sq_norm = self._grad_sq_norm(adapter)
        finally:
            self.restore()
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> Dict:
        """The base optimizer's state, the kept gradient norms (``"previous"`` mode) and the
        noise generator's state (so that a resumed run draws the same noise)."""
        return {"base_optimizer": self.base_optimizer.state_dict(),
                "grad_sq_norms": [a.grad_sq_norm for a in self._adapters],
                "generator_state": generator_state(self.generator)}

    def load_state_dict(self, state: Dict) -> None:
        """Restores :meth:`state_dict`; the saved generator state goes into this object's own
        generator (when both exist; a state dict saved without one is accepted)."""
        norms = state["grad_sq_norms"]
        saved_generator = require_generator_state("GGPO.load_state_dict", "state['generator_state']",
                                                  state.get("generator_state"))
        if len(norms) != len(self._adapters):
            raise ValueError(f"GGPO.load_state_dict: state has {len(norms)} adapters' norms; expected "
                             f"{len(self._adapters)}")
        self.base_optimizer.load_state_dict(state["base_optimizer"])
        for adapter, norm in zip(self._adapters, norms):
            adapter.grad_sq_norm = None if norm is None else norm.to(adapter.weight.device)
        restore_generator(self.generator, saved_generator)

    def __repr__(self) -> str:
        return (f"GGPO(sigma={self.sigma}, alpha={self.alpha}, beta={self.beta}, gradient_source="
                f"{self.gradient_source!r}, adapters={len(self._adapters)}, base_optimizer="
                f"{type(self.base_optimizer).__name__})")
