"""SoRA (Ding et al., 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models"):
the gates' proximal step during training and the pruning of the zero-gated ranks after it.

A gated :class:`~lowrank_ops.nn.LoRALinear` (``use_gate=True``) computes
``base(x) + s ((x A^T) * g) B^T`` with a gate ``g [r]``.  SoRA minimizes
``L + lambda ||g||_1`` by proximal gradient: after each optimizer step on the gates,

    g <- sign(g) * max(|g| - lr * lambda, 0)        (the soft threshold, lr the step's rate)

which sets gates exactly to zero; a zero gate switches its rank off, and
:func:`prune_gated_ranks` then removes those ranks, leaving a smaller plain LoRA that
computes the same function.

Example
-------
>>> gates = sora.gate_parameters(model)                     # every lora_gate [r]
>>> gate_ids = {id(g) for g in gates}
>>> rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
>>> optimizer = torch.optim.AdamW(rest, lr=8e-4, weight_decay=0.1)
>>> gate_optimizer = sora.SparseAdamW(gates, lr=8e-4, sparse_lambda=0.5)
>>> for x, y in data:
...     loss_fn(model(x), y).backward()
...     optimizer.step(); gate_optimizer.step()              # AdamW, then the soft threshold
...     optimizer.zero_grad(); gate_optimizer.zero_grad()
>>> print(sora.prune_gated_ranks(model))                    # plain LoRALinear layers, same outputs
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .._args import is_integer, require_fits_in_memory, require_number
from .._finite import all_finite
from ..nn.lora import LoRALinear
from ..optim._checks import add_checked_group, check_lr, current_lr
from ._layers import count_parameters

__all__ = ["gate_parameters", "proximal_step_", "SparseAdamW", "lambda_schedule", "pruned_layer",
           "prune_gated_ranks", "PruneReport"]

_SPACINGS = ("linear", "log_linear", "exp_linear")


def gate_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Every ``lora_gate [r]`` of the gated :class:`~lowrank_ops.nn.LoRALinear` layers in
    ``model`` (module order, each shared gate once), e.g. for their own optimizer."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gate_parameters: model must be a torch.nn.Module; got {type(model).__name__}")
    gates, seen = [], set()
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.lora_gate is not None and id(module.lora_gate) not in seen:
            seen.add(id(module.lora_gate))
            gates.append(module.lora_gate)
    return gates


def _gate_list(op: str, name: str, gates: Union[torch.Tensor, Iterable[torch.Tensor]]) -> List[torch.Tensor]:
    """``gates`` (the argument ``name``) as a list, each a 1-D floating-point tensor (a
    TypeError / ValueError naming the entry otherwise: a matrix here is almost always
    ``model.parameters()`` passed by mistake)."""
    if isinstance(gates, torch.Tensor):
        gates = [gates]
    elif isinstance(gates, Iterable):
        gates = list(gates)
    else:
        raise TypeError(f"{op}: {name} must be a tensor or an iterable of tensors; got {type(gates).__name__}")
    for i, gate in enumerate(gates):
        if not isinstance(gate, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor; got {type(gate).__name__}")
        if gate.dim() != 1 or not gate.is_floating_point():
            raise ValueError(f"{op}: {name}[{i}] has shape {tuple(gate.shape)} and dtype {gate.dtype}; expected a "
                             f"SoRA gate: a 1-D floating-point tensor [r] (see gate_parameters(model))")
    return gates


def _by_device_and_dtype(tensors: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(buckets.values())


def _soft_threshold_(gates: List[torch.Tensor], threshold: float) -> None:
    """``g <- sign(g) max(|g| - threshold, 0)`` in place, evaluated in float64 and rounded
    once to each gate's dtype (the gates are r numbers per layer: the float64 work is free,
    and the result is the exact formula rounded).  One concatenation per device and dtype
    instead of a few kernels per layer; no host synchronization; NaN stays NaN."""
    for bucket in _by_device_and_dtype(gates):
        flat = torch.cat(bucket).to(torch.float64)
        shrunk = flat.abs().sub_(threshold).clamp_min_(0.0).mul_(flat.sign())
        torch._foreach_copy_(bucket, list(shrunk.split([gate.numel() for gate in bucket])))


@torch.no_grad()
def proximal_step_(gates: Union[torch.Tensor, Iterable[torch.Tensor]], lr: float, sparse_lambda: float) -> int:
    """SoRA's proximal step on the gates, in place: ``g <- sign(g) max(|g| - lr * lambda, 0)``.

    Parameters
    ----------
    gates : Tensor[r] or iterable of Tensor[r_i]
        The gates (:func:`gate_parameters`), any floating dtype and device; each is
        updated in place (under ``no_grad``), the result being the float64 formula rounded
        once to the gate's dtype: entries with ``|g| <= lr * lambda`` become exactly 0,
        the others keep their sign.
    lr : float
        The learning rate of the gradient step just taken (``>= 0``, finite).
    sparse_lambda : float
        The L1 weight ``lambda`` (``>= 0``, finite); ``lr * lambda = 0`` leaves the gates as they are.

    Returns
    -------
    int
        The number of zero gate entries after the step (one host read per device and dtype).
    """
    op = "proximal_step_"
    gates = _gate_list(op, "gates", gates)
    threshold = require_number(op, "lr", lr, 0.0) * require_number(op, "sparse_lambda", sparse_lambda, 0.0)
    _soft_threshold_(gates, threshold)
    return sum(int((torch.cat(bucket) == 0).sum()) for bucket in _by_device_and_dtype(gates))


class SparseAdamW(torch.optim.AdamW):
    """AdamW followed by SoRA's soft threshold: the optimizer of the gates.

    Each step is ``torch.optim.AdamW``'s step, then, for every parameter it updated (those
    with a gradient), :func:`proximal_step_` with the group's current ``lr`` and
    ``sparse_lambda``.  As SoRA's official code, the gates get their own optimizer
    (``SparseAdamW`` there too; not torch's ``SparseAdam``, which is about sparse
    gradients) while the other adapter parameters keep theirs.

    Parameters
    ----------
    params : iterable of Tensor or dict
        The gates (:func:`gate_parameters`): 1-D floating-point tensors; groups may set
        every option below, ``sparse_lambda`` included.
    lr, betas, eps, weight_decay, amsgrad, foreach
        As ``torch.optim.AdamW``; ``lr`` a number or a one-element tensor (the threshold
        is ``lr * sparse_lambda``, with the lr's value at the step).  Defaults as the official code's ``transformers.AdamW``:
        ``eps = 1e-6`` and no weight decay (the L1 term is the gates' regularizer).  No
        ``fused``: with a GradScaler, fused AdamW skips an overflowing step inside the
        kernel, and the threshold would still shrink the gates.
    sparse_lambda : float
        The L1 weight ``lambda`` (the paper's xi), ``>= 0``; required.

    Notes
    -----
    * The threshold is ``lr * lambda`` with the step's ``lr`` (an LR scheduler shrinks it
      too), as the paper's update and the official ``sparse_optimizer_multiply_lr.py``;
      the official ``run_glue.py`` uses a variant thresholding with ``lambda`` alone,
      which is this with ``sparse_lambda = xi / lr`` at constant lr.  The official
      thresholding also zeroes ``|g|`` in ``(xi, 2 xi)`` (it subtracts, then zeroes what
      is below ``xi``); this is the exact soft threshold.
    * The official trainer also adds ``lambda_1 * mean |g|`` to the loss; add it to
      yours if wanted, it is an ordinary differentiable term.
    * The settings are checked in a step pre-hook (a bad ``lr`` or ``sparse_lambda``
      raises before AdamW's step changes anything), the threshold runs as a step post-hook
      (both also on a pickled or deep-copied optimizer),
      so step hooks and profiling run once per step, not again in an overriding ``step``
      calling AdamW's; ``state_dict`` / ``load_state_dict`` are AdamW's, with ``sparse_lambda`` kept
      in the param groups.  Change ``group["sparse_lambda"]`` between steps to schedule
      it (see :func:`lambda_schedule`); a bad value raises at the next step, before it.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, amsgrad: bool = False, *, sparse_lambda: float,
                 foreach: Optional[bool] = None):
        # AdamW's __init__ adds the groups before the defaults know sparse_lambda.
        self._initial_sparse_lambda = require_number("SparseAdamW", "sparse_lambda", sparse_lambda, 0.0)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach)
        self.defaults["sparse_lambda"] = self._initial_sparse_lambda
        self._register_hooks()

    def _register_hooks(self) -> None:
        # The settings are checked before AdamW's step (a NaN lr would otherwise reach the
        # parameters before the threshold could refuse it), the threshold applied after.
        self._check_hook = self.register_step_pre_hook(_check_before_step)
        self._threshold_hook = self.register_step_post_hook(_threshold_after_step)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # An optimizer pickles (and deep-copies) without its hooks, and load_state_dict
        # comes through here as well: register the threshold once per object.
        if "_threshold_hook" not in self.__dict__:
            self._register_hooks()

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, then the checks of ``lr``, ``sparse_lambda`` and the gates."""
        if isinstance(param_group, dict) and "sparse_lambda" not in self.defaults:
            param_group.setdefault("sparse_lambda", self._initial_sparse_lambda)
        add_checked_group(self, super().add_param_group, param_group, _check_group)


def _check_settings(group: Dict[str, Any]) -> float:
    """Checks the group's lr and sparse_lambda; returns the lr's value now."""
    group["lr"] = check_lr("SparseAdamW", group["lr"])
    group["sparse_lambda"] = require_number("SparseAdamW", "sparse_lambda", group["sparse_lambda"], 0.0)
    return current_lr("SparseAdamW", group)


def _check_group(group: Dict[str, Any]) -> None:
    _check_settings(group)
    _gate_list("SparseAdamW", "params", group["params"])


def _check_before_step(optimizer: SparseAdamW, args, kwargs) -> None:
    for group in optimizer.param_groups:
        _check_settings(group)  # catches a schedule that wrote a bad value


@torch.no_grad()
def _threshold_after_step(optimizer: SparseAdamW, args, kwargs) -> None:
    for group in optimizer.param_groups:
        lr = current_lr("SparseAdamW", group)
        updated = [p for p in group["params"] if p.grad is not None]  # AdamW skips the others too
        threshold = lr * group["sparse_lambda"]
        if updated and threshold > 0:
            _soft_threshold_(updated, threshold)


def lambda_schedule(start: float, stop: float, num: int, spacing: str = "linear") -> List[float]:
    """The ``sparse_lambda`` values of SoRA's sparsifying scheduler (the paper's Algorithm 1,
    the official ``step_lambda``): train, then raise lambda to the next value, train again,
    and so on, recording how sparsity and quality trade off.

    Parameters
    ----------
    start, stop : float
        The first and last value (``>= 0``; ``> 0`` for ``"exp_linear"``).
    num : int
        The number of values (``>= 1``).
    spacing : {"linear", "log_linear", "exp_linear"}
        The official code's three: evenly spaced; ``log`` of evenly spaced ``exp(value)``
        (nearly linear for small values); evenly spaced logarithms (geometric).

    Returns
    -------
    list of float
        ``num`` values from ``start`` to ``stop``; set them with
        ``for group in optimizer.param_groups: group["sparse_lambda"] = value``.
    """
    op = "lambda_schedule"
    start = require_number(op, "start", start, 0.0, low_open=spacing == "exp_linear")
    stop = require_number(op, "stop", stop, 0.0, low_open=spacing == "exp_linear")
    if not is_integer(num) or num < 1:
        raise ValueError(f"{op}: num must be an int >= 1; got {num!r}")
    num = int(num)
    if spacing not in _SPACINGS:
        raise ValueError(f"{op}: spacing must be one of {_SPACINGS}; got {spacing!r}")
    if spacing == "log_linear" and max(start, stop) > 700.0:  # exp would overflow float64
        raise ValueError(f"{op}: spacing 'log_linear' needs start and stop <= 700; got {start} and {stop}")
    forward, inverse = {"linear": (float, np.asarray), "log_linear": (math.exp, np.log),
                        "exp_linear": (math.log, np.exp)}[spacing]
    a, b = forward(start), forward(stop)
    # A list of Python floats: about 32 bytes each (the float and its pointer), numpy's temporaries aside.
    require_fits_in_memory(op, "num", num, 32, "values")
    values = inverse(a + (b - a) * (np.arange(1, num - 1, dtype=np.float64) / (num - 1))).tolist()
    return [start] + values + [stop] if num > 1 else [start]  # the ends exact, as numpy's linspace


@dataclass
class PruneReport:
    """What :func:`prune_gated_ranks` did.

    ``ranks`` maps each gated layer's name to ``(r before, r after)``; an ``r after`` of 0
    means the layer was replaced by its base ``nn.Linear``.  The parameter counts are of
    all the model's parameters (frozen ones included, each shared one once).
    """

    ranks: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0

    def __str__(self) -> str:
        before = sum(r for r, _ in self.ranks.values())
        after = sum(r for _, r in self.ranks.values())
        emptied = sum(1 for _, r in self.ranks.values() if r == 0)
        return (f"SoRA: pruned {len(self.ranks)} gated layer(s), total rank {before} -> {after} ({emptied} replaced by "
                f"their base layer); parameters {self.parameters_before:,} -> {self.parameters_after:,}")


def _check_prunable(op: str, where: str, layer: LoRALinear) -> None:
    if layer.lora_gate is None:
        raise ValueError(f"{op}: {where} has no gate (use_gate=False); expected a gated LoRALinear")
    if layer.merged:
        raise RuntimeError(f"{op}: {where} is merged into its base weight; unmerge() first")
    if not all_finite(layer.lora_gate):
        bad = int((~torch.isfinite(layer.lora_gate)).sum())
        raise ValueError(f"{op}: the gate of {where} holds {bad} non-finite entries")


@torch.no_grad()
def _prune(layer: LoRALinear, tol: float) -> torch.nn.Module:
    k = layer.r if layer.active_rank is None else layer.active_rank  # DyLoRA: ranks past k are unused
    gate = layer.lora_gate[:k]
    keep = torch.nonzero(gate.abs() > tol).flatten()  # one host read per layer, after training
    rank = keep.numel()
    if rank == 0:
        return layer.base_layer
    scaling = layer.scaling
    lora_alpha = scaling * (math.sqrt(rank) if layer.use_rslora else rank)  # consistent with r' ...
    # ... and a throwaway generator, so that building the layer leaves torch's global RNG alone.
    pruned = LoRALinear(layer.base_layer, rank, lora_alpha, lora_dropout=layer.lora_dropout,
                        use_rslora=layer.use_rslora, dtype=layer.lora_A.dtype, generator=torch.Generator())
    pruned.scaling = scaling  # exactly the old one, not lora_alpha / r' recomputed
    accumulate = torch.promote_types(layer.lora_B.dtype, torch.float32)
    pruned.lora_A.copy_(layer.lora_A[keep])
    pruned.lora_B.copy_(layer.lora_B[:, keep].to(accumulate) * gate[keep].to(accumulate))  # one rounding
    pruned.lora_A.requires_grad_(layer.lora_A.requires_grad)
    pruned.lora_B.requires_grad_(layer.lora_B.requires_grad)
    # Built with the default init (PiSSA / OLoRA would split the base weight again); keep
    # the original setting for reset_parameters.
    pruned.init_lora_weights, pruned._init_iterations = layer.init_lora_weights, layer._init_iterations
    pruned.train(layer.training)
    return pruned


def pruned_layer(layer: LoRALinear, tol: float = 0.0) -> torch.nn.Module:
    """The plain-LoRA replacement of one gated layer (``layer`` itself is left unchanged).

    Parameters
    ----------
    layer : LoRALinear
        Gated (``use_gate=True``), not merged, with a finite gate.  With ``active_rank``
        (DyLoRA) set to ``k``, only the first ``k`` ranks are candidates: the others do
        not take part in the layer's output.
    tol : float
        Ranks with ``|g| > tol`` are kept (``>= 0``; the default 0 keeps every rank the
        proximal step has not zeroed, so the output is unchanged up to rounding).

    Returns
    -------
    LoRALinear or nn.Linear
        A new ``LoRALinear(use_gate=False)`` around the same ``base_layer`` object with the
        kept ranks ``r'`` (in their order): ``lora_A[keep] [r', in]``,
        ``lora_B[:, keep] * g[keep] [out, r']`` (gate folded in, rounded once, in the
        adapter dtype), the same ``scaling`` (``lora_alpha`` set to match it at ``r'``),
        dropout, rsLoRA flag, ``init_lora_weights`` and train/eval mode, and
        ``active_rank = None``.  When no rank is kept (``r' = 0``), the layer is exactly its
        base layer, and that ``nn.Linear`` (frozen) is returned instead of a zero-rank LoRA.
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"pruned_layer: layer must be a LoRALinear; got {type(layer).__name__}")
    tol = require_number("pruned_layer", "tol", tol, 0.0)
    _check_prunable("pruned_layer", "layer", layer)
    return _prune(layer, tol)


def prune_gated_ranks(model: torch.nn.Module, tol: float = 0.0) -> PruneReport:
    """Replaces, in place, every gated LoRALinear of ``model`` by :func:`pruned_layer`'s result.

    Every layer is checked before any is replaced (RuntimeError for a merged one,
    ValueError for a non-finite gate).  The replacements are new modules with new
    parameters: build the optimizer (and re-register any hooks) after pruning.  A layer
    shared under several names is pruned once and replaced under all of them.

    Parameters
    ----------
    model : nn.Module
        Containing gated layers (a model that is itself a gated LoRALinear cannot be
        replaced in place: use :func:`pruned_layer`).
    tol : float
        As in :func:`pruned_layer`.

    Returns
    -------
    PruneReport
        Per layer name ``(r, r')`` and the model's parameter counts before and after.
    """
    op = "prune_gated_ranks"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module; got {type(model).__name__}")
    tol = require_number(op, "tol", tol, 0.0)
    if isinstance(model, LoRALinear) and model.lora_gate is not None:
        raise ValueError(f"{op}: model is itself a gated LoRALinear, which cannot be replaced in place; "
                         f"use pruned_layer(model, tol), which returns its replacement")
    sites = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
             if isinstance(module, LoRALinear) and module.lora_gate is not None]
    for name, layer in sites:
        _check_prunable(op, f"module {name!r}", layer)
    report = PruneReport(parameters_before=count_parameters(model, trainable_only=False))
    replacements: Dict[int, torch.nn.Module] = {}
    for name, layer in sites:
        if id(layer) not in replacements:
            replacements[id(layer)] = _prune(layer, tol)
        replacement = replacements[id(layer)]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
        report.ranks[name] = (layer.r, replacement.r if isinstance(replacement, LoRALinear) else 0)
    report.parameters_after = count_parameters(model, trainable_only=False)
    return report
