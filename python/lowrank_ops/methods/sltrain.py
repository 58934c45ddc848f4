"""SLTrain: replace a model's ``nn.Linear`` layers by sparse-plus-low-rank layers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Union

import torch

from ..nn.sparse_lowrank import SparseLowRankLinear
from ._layers import build_replacements, count_parameters, linear_sites, replace_everywhere, resolve_rank

__all__ = ["convert", "ConversionReport", "count_parameters"]


@dataclass
class ConversionReport:
    """What :func:`convert` replaced and the parameter counts before and after."""

    replaced: List[str] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    @property
    def ratio(self) -> float:
        """``parameters_after / parameters_before``."""
        return self.parameters_after / self.parameters_before if self.parameters_before else 1.0

    def __str__(self) -> str:
        return (
            f"SLTrain: replaced {len(self.replaced)} linear layer(s); trainable parameters "
            f"{self.parameters_before:,} -> {self.parameters_after:,} ({100 * self.ratio:.1f}%)"
        )


def convert(
    model: torch.nn.Module,
    rank: Union[int, float],
    density: float,
    target_modules: Optional[Union[str, Iterable[str]]] = None,
    *,
    init: str = "random",
    alpha: float = 8.0,
    strategy: str = "auto",
    generator: Optional[torch.Generator] = None,
) -> ConversionReport:
    """Replaces the matching ``nn.Linear`` layers of ``model`` in place by SLTrain layers.

    Parameters
    ----------
    model : nn.Module
    rank : int or float
        The rank of every replaced layer; a float in ``(0, 1)`` is a fraction of
        ``min(in, out)`` (rounded, at least 1).
    density : float
        Density of the sparse part.
    target_modules : str or list of str, optional
        Glob patterns matched against the full module name and its last component
        (``"q_proj"``, ``"layers.*.mlp.*"``); default: every ``nn.Linear``.
    init : {"random", "svd"}
        ``"random"``: SLTrain's initialization for pretraining from scratch;
        ``"svd"``: :meth:`SparseLowRankLinear.from_linear` (keeps the current function
        as closely as the rank and density allow).
    alpha, strategy, generator
        Passed to :class:`SparseLowRankLinear`.

    Returns
    -------
    ConversionReport
        The replaced module names and the trainable parameter counts before and after.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module; got {type(model).__name__}")
    if init not in ("random", "svd"):
        raise ValueError(f"convert: init must be 'random' or 'svd'; got {init!r}")
    if isinstance(model, torch.nn.Linear):  # no parent to replace it in: it would be kept, silently
        raise TypeError("convert: model is itself an nn.Linear, which cannot be replaced in place; use "
                        "SparseLowRankLinear.from_linear(linear, rank, density) (or SparseLowRankLinear(...)) instead")
    if init == "svd" and not alpha > 0:  # the SVD split divides by the scale alpha / rank
        raise ValueError(f"convert: init='svd' needs alpha > 0 (B A = U diag(s / scale) V^T); got alpha={alpha!r}")
    report = ConversionReport(parameters_before=count_parameters(model))
    # Each plain nn.Linear once, under all its names (a shared layer stays shared); ranks
    # resolved and layers built first, so that a bad one leaves the model untouched.
    sites = [(linear, names, resolve_rank(rank, linear, names[0], "convert"))
             for linear, names in linear_sites("convert", model, target_modules, reads_weights=init == "svd")]
    def build(linear, names, layer_rank):
        if init == "svd":
            return SparseLowRankLinear.from_linear(linear, layer_rank, density, scale=alpha / layer_rank,
                                                   strategy=strategy, generator=generator)
        return SparseLowRankLinear(
            linear.in_features, linear.out_features, layer_rank, density, linear.bias is not None,
            alpha=alpha, strategy=strategy, generator=generator,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )

    for (_, names, _), layer in zip(sites, build_replacements("convert", sites, build)):
        replace_everywhere(model, names, layer)
        report.replaced.extend(names)
    report.parameters_after = count_parameters(model)
    return report
