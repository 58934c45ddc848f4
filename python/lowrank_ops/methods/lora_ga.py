"""LoRA-GA (Wang, Yu and Li, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
NeurIPS 2024, arXiv:2407.05000): LoRA adapters initialized from the singular vectors of an
estimated full-weight gradient, so the adapter's first step approximates full fine-tuning's.

The math (weight ``W0 [out, in]``, adapter ``W0 + s B A`` with ``A [r, in]``, ``B [out, r]``,
``s`` the layer's ``scaling``):

1. ``G = mean_batches dL/dW0`` (:func:`estimate_gradients`), and its top ``2r`` singular
   triplets ``G ~ U diag(S) V^T`` (:func:`lowrank_ops.linalg.rsvd`).
2. With ``I`` and ``J`` two disjoint sets of r indices among the first 2r, the paper's
   Algorithm 1 (and the reference code's default direction ``"ArB2r"``) takes

       A = c V[:, I]^T,   B = c U[:, J],   I = 1..r,  J = r+1..2r.

3. The base weight absorbs the adapter so the layer's function is unchanged:
   ``W0 <- W0 - s B A`` (float32 accumulation, rounded once into W0's dtype; plus the
   previous adapter ``s B_old A_old`` when it was not zero).

Why it works (Sec. 3.2 of the paper): the adapter's gradients are ``dL/dA = s B^T G`` and
``dL/dB = s G A^T`` (G is the gradient at the effective weight, which is still ``W0``), so
one SGD step of rate ``lr`` changes the effective weight by

    s (dB A + B dA) * (-lr) = -lr s^2 c^2 (G V_I V_I^T + U_J U_J^T G)
                            = -lr s^2 c^2 sum_{k in I u J} S_k u_k v_k^T  (+ O(lr^2)),

``-lr s^2 c^2`` times the best rank-2r approximation of G: the direction of full
fine-tuning's step ``-lr G`` as closely as any rank-2r update can be.  With the default
init (A random, B = 0) the step is ``-lr s^2 G A^T A``, G projected onto a random
r-dimensional row space.

The scale ``c`` (``scale_mode``; the reference code's names):

* ``"stable"`` (the paper's Sec. 3.3, default): ``c = out^(1/4) / sqrt(gamma)``
  (``stable_gamma``, default 16), which keeps the output's scale independent of the
  width under Adam;
* ``"unit"``: ``c = 1`` (A and B orthonormal);
* ``"gd"``: ``c = 1 / s``, so the first SGD step is ``-lr G_2r`` exactly as full
  fine-tuning's projected step;
* ``"weight_s"`` (the reference's ``"weightS"``): ``c`` the mean of ``sqrt(S_i(W0) / s)``
  over W0's top r singular values (from another rsvd, of W0), PiSSA's adapter magnitude.

The ``direction`` ``"A2rBr"`` swaps the halves (``A`` from ``V[:, r:2r]``, ``B`` from
``U[:, :r]``); by the formula above the first step is the same rank-2r projection either
way; later steps differ.

This follows the paper and the authors' code (Outsider565/LoRA-GA): orthonormal singular
vectors times ``c`` in both factors.  PEFT's port (``LoraLayer.lora_ga_init``, PEFT 0.21)
differs: it multiplies ``B`` by ``diag(S[J])`` and applies the "stable" factor
``out^(1/4) / sqrt(gamma)`` to ``B`` alone, so its first step is ``G_I + c U_J diag(S_J)^2
V_J^T``-like rather than the rank-2r projection above.

Example
-------
``model``, ``batches`` and ``loss_fn`` stand for yours (a toy model and random batches here):

>>> import torch
>>> from lowrank_ops.methods import lora_ga
>>> from lowrank_ops.nn import LoRALinear
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
>>> batches = [(torch.randn(16, 64), torch.randint(0, 32, (16,))) for _ in range(8)]
>>> loss_fn = torch.nn.functional.cross_entropy
>>> grads = lora_ga.estimate_gradients(model, lambda m, b: loss_fn(m(b[0]), b[1]), batches)
>>> g = torch.Generator().manual_seed(0)
>>> for name in grads:                                           # wrap the layers afterwards
...     layer = LoRALinear(model.get_submodule(name), r=8, lora_alpha=16)
...     lora_ga.lora_ga_init_(layer, grads[name], generator=g)   # base weight absorbs s B A
...     model.set_submodule(name, layer)

Why not ``LoRALinear(init_lora_weights="lora_ga")``: the init needs a gradient of the
whole model's loss on data, which a layer's constructor cannot compute (nor should it hold
the model and the data); PEFT's own integration passes the gradient out of band as well.
The layer keeps its ``init_lora_weights`` attribute, so :meth:`LoRALinear.reset_parameters`
re-initializes it that way, not with LoRA-GA.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .._args import require_int, require_number
from .._finite import all_finite
from ..linalg import rsvd
from ..linalg.rsvd import check_n_iter
from ..nn._init import generator_on
from ..nn.lora import LoRALinear
from ..ops.lora import lora_unmerge
from ._layers import matches

__all__ = ["estimate_gradients", "lora_ga_init_"]

_SCALE_MODES = ("stable", "unit", "gd", "weight_s")
_DIRECTIONS = ("ArB2r", "A2rBr")


def estimate_gradients(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                       batches: Iterable, target_modules: Optional[Sequence[str]] = None
                       ) -> Dict[str, torch.Tensor]:
    """The full-weight gradients of ``model``'s ``nn.Linear`` layers averaged over ``batches``.

    Parameters
    ----------
    model : nn.Module
        Used as it is (train or eval mode is the caller's choice: dropout stays on in
        training mode).  Call it before wrapping the layers in adapters.
    loss_fn : callable ``(model, batch) -> Tensor``
        A scalar (one-element) loss of one batch.
    batches : iterable
        Each item is passed to ``loss_fn``; at least one.
    target_modules : sequence of str, optional
        fnmatch patterns of module names (full name or last component); None: every
        ``nn.Linear``.

    Returns
    -------
    dict name -> Tensor[out, in]
        ``(1 / n) sum_b dL_b / dW`` per targeted layer's weight, accumulated in float32
        (float64 for float64 weights), on the weight's device.

    Notes
    -----
    Gradients come from ``torch.autograd.grad``: no ``.grad`` field is written, no
    optimizer state exists, the targeted weights get ``requires_grad`` only while the
    loss is evaluated (restored afterwards, also on error).  Memory: one float32 sum per
    targeted layer (``4 out in`` bytes each; 6.5 GB for all linear layers of a 1.6B-
    parameter model) plus, during each backward, that batch's gradients in the weights'
    dtype.  The paper's layer-by-layer variant, which trades backward passes for memory,
    is not implemented.

    Raises
    ------
    ValueError
        No ``nn.Linear`` matches ``target_modules``; ``batches`` is empty; a loss that is
        not a one-element tensor.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and matches(name, target_modules)]
    if not targets:
        raise ValueError(f"estimate_gradients: no nn.Linear of the model matches target_modules={target_modules!r}")
    weights = [module.weight for _, module in targets]
    sums = [torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
            for w in weights]
    saved = [w.requires_grad for w in weights]
    count = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"estimate_gradients: loss_fn must return a one-element tensor; got {shape}")
            grads = torch.autograd.grad(loss.reshape(()), weights, allow_unused=True)
            for total, grad in zip(sums, grads):
                if grad is not None:  # a layer the loss does not reach has a zero gradient
                    total.add_(grad)
            count += 1
    finally:
        for w, flag in zip(weights, saved):
            w.requires_grad_(flag)
    if count == 0:
        raise ValueError("estimate_gradients: batches is empty; need at least one batch")
    return {name: total.div_(count) for (name, _), total in zip(targets, sums)}


@torch.no_grad()
def lora_ga_init_(layer: LoRALinear, gradient: torch.Tensor, *, direction: str = "ArB2r",
                  scale_mode: str = "stable", stable_gamma: float = 16.0, n_iter: int = 4,
                  oversample: Optional[int] = None, generator: Optional[torch.Generator] = None) -> None:
    """Initializes ``layer.lora_A``, ``layer.lora_B`` by LoRA-GA and subtracts ``s B A`` from
    the base weight (the module docstring has the math).

    Parameters
    ----------
    layer : LoRALinear
        Not merged, no ``active_rank``; its ``r`` must satisfy ``2 r <= min(in, out)``.
        The gate (SoRA) is kept and folded into the subtraction; an adapter that already
        holds a function (PiSSA / OLoRA / random inits, training) is folded into the base
        weight first; DoRA's magnitude is kept (the effective weight, hence its row norms,
        does not change), so the output is unchanged in every case.
    gradient : Tensor[out, in]
        The estimated gradient of the loss with respect to the base weight
        (:func:`estimate_gradients`); any floating dtype and device (moved to the weight's
        device, computed in float32, float64 for float64 weights).
    direction : {"ArB2r", "A2rBr"}
        ``"ArB2r"`` (the paper's Algorithm 1): ``A`` from the right singular vectors
        1..r, ``B`` from the left ones r+1..2r; ``"A2rBr"``: the other way round.
    scale_mode : {"stable", "unit", "gd", "weight_s"}
        The factor ``c`` of both A and B (module docstring).
    stable_gamma : float
        ``gamma > 0`` of ``"stable"``.
    n_iter, oversample : int
        Of the rsvd of rank 2r; ``oversample`` None: 2r (the reference code's sketch of
        ``4r`` columns, ``torch.svd_lowrank(q=4r, niter=4)``).
    generator : torch.Generator, optional
        Of rsvd's test matrix (any device; a generator of another device seeds one on the
        weight's): same generator state, same init.

    Raises
    ------
    TypeError
        ``layer`` not a LoRALinear, ``gradient`` not a floating tensor.
    ValueError
        ``2 r > min(in, out)``, a gradient of another shape or with non-finite entries,
        an unknown ``direction`` or ``scale_mode``, ``stable_gamma <= 0``, a
        ``"gd"``/``"weight_s"`` scale with ``scaling <= 0``, a layer with ``active_rank``.
    RuntimeError
        The layer is merged.
    """
    op = "lora_ga_init_"
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"{op}: layer must be a lowrank_ops.nn.LoRALinear; got {type(layer).__name__}")
    if not isinstance(gradient, torch.Tensor) or not gradient.is_floating_point():
        what = gradient.dtype if isinstance(gradient, torch.Tensor) else type(gradient).__name__
        raise TypeError(f"{op}: gradient must be a floating-point tensor; got {what}")
    if direction not in _DIRECTIONS:
        raise ValueError(f"{op}: direction must be one of {_DIRECTIONS}; got {direction!r}")
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"{op}: scale_mode must be one of {_SCALE_MODES}; got {scale_mode!r}")
    stable_gamma = require_number(op, "stable_gamma", stable_gamma, 0.0, low_open=True)
    check_n_iter(op, "n_iter", n_iter, auto=False)
    n_iter = int(n_iter)
    r, out_f, in_f = layer.r, layer.out_features, layer.in_features
    oversample = 2 * r if oversample is None else require_int(op, "oversample", oversample, minimum=0)
    if layer.merged:
        raise RuntimeError(f"{op}: the layer's adapter is merged into the base weight; unmerge() first")
    if layer.active_rank is not None:
        raise ValueError(f"{op}: the layer has active_rank = {layer.active_rank}; LoRA-GA initializes all r ranks, "
                         f"set active_rank = None first")
    if 2 * r > min(out_f, in_f):
        raise ValueError(f"{op}: LoRA-GA takes 2 r singular vectors of the gradient, so it needs the layer's "
                         f"r <= min(in_features, out_features) / 2 = {min(out_f, in_f) // 2}; got r = {r}")
    if tuple(gradient.shape) != (out_f, in_f):
        raise ValueError(f"{op}: gradient must have the base weight's shape ({out_f}, {in_f}); "
                         f"got {tuple(gradient.shape)}")
    if not all_finite(gradient):
        raise ValueError(f"{op}: gradient holds {int((~torch.isfinite(gradient)).sum())} non-finite entries")
    scaling = layer.scaling
    if scale_mode in ("gd", "weight_s") and not scaling > 0:
        raise ValueError(f"{op}: scale_mode={scale_mode!r} divides by the layer's scaling, which must be > 0; "
                         f"got {scaling}")

    weight = layer.base_layer.weight
    accumulate = torch.promote_types(weight.dtype, torch.float32)
    grad = gradient.detach().to(device=weight.device, dtype=accumulate)
    U, _, Vh = rsvd(grad, 2 * r, oversample=oversample, n_iter=n_iter, sketch_dtype=None,
                    generator=generator_on(generator, weight.device))
    first, second = slice(0, r), slice(r, 2 * r)
    rows_A, cols_B = (first, second) if direction == "ArB2r" else (second, first)
    A, B = Vh[rows_A], U[:, cols_B]

    if scale_mode == "stable":
        c = out_f ** 0.25 / math.sqrt(stable_gamma)
    elif scale_mode == "unit":
        c = 1.0
    elif scale_mode == "gd":
        c = 1.0 / scaling
    else:  # weight_s: PiSSA's magnitude sqrt(S_i(W0) / s), averaged over the top r
        S_w = rsvd(weight.to(accumulate), r, oversample=oversample, n_iter=n_iter, sketch_dtype=None,
                   generator=generator_on(generator, weight.device), compute_uv=False)
        c = float((S_w / scaling).sqrt().mean())
    gate = layer.lora_gate
    gated = (lambda b: b) if gate is None else (lambda b: b * gate.to(accumulate))
    # An adapter already holding a function (PiSSA / OLoRA / random-B inits, training) is
    # folded into the base weight first: W0 + s B_old diag(g) A_old (it was dropped, and the
    # output moved by 0.9-2.2 on a 32 -> 24 layer).
    previous = None
    if bool((layer.lora_B != 0).any()):
        previous = gated(layer.lora_B.to(accumulate)) @ layer.lora_A.to(accumulate)
    layer.lora_A.copy_(A * c)
    layer.lora_B.copy_(B * c)
    if previous is None:
        # The residual write: W0 - s B diag(g) A from the rounded adapter, float32 accumulation,
        # one rounding into W0's dtype (lora_unmerge is exactly that subtraction).
        lora_unmerge(weight, layer.lora_A, layer.lora_B, scaling, gate=gate, inplace=True)
    else:  # W0 + s (B_old g A_old - B g A), still one rounding
        update = previous - gated(layer.lora_B.to(accumulate)) @ layer.lora_A.to(accumulate)
        weight.copy_(torch.add(weight.to(accumulate), update, alpha=scaling))
    # DoRA's magnitude is kept: the effective weight W0 + s B g A, hence its row norms, is
    # the same as before (resetting m to them discarded a trained magnitude).
    layer._norm_cache = None
