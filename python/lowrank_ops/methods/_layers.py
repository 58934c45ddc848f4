"""Helpers shared by the method modules that replace a model's ``nn.Linear`` layers
(SLTrain's convert, low-rank compression, SoRA's pruning): parameter counts, name
patterns, per-layer ranks."""
from __future__ import annotations

import fnmatch
from typing import Optional, Sequence, Union

import torch

__all__ = ["count_parameters", "matches", "resolve_rank"]


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    """The number of parameter elements of ``model``.

    Parameters
    ----------
    model : nn.Module
    trainable_only : bool
        Count only the parameters with ``requires_grad`` (default); False: all of them.

    Returns
    -------
    int
        The sum of ``numel()`` over the counted parameters (each shared parameter once).
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    """Whether the module ``name`` (or its last component) matches one of the fnmatch
    ``patterns``; every name when ``patterns`` is None."""
    if patterns is None:
        return True
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def resolve_rank(rank: Union[int, float], linear: torch.nn.Linear, name: str, op: str) -> int:
    """``rank`` for ``linear``: an int in ``[1, min(in, out)]``, or a fraction in ``(0, 1)``
    of ``min(in, out)`` (rounded, at least 1); ``op`` names the caller in the error."""
    smallest = min(linear.in_features, linear.out_features)
    if isinstance(rank, float) and 0.0 < rank < 1.0:
        return max(1, round(rank * smallest))
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= int(rank) <= smallest:
        raise ValueError(f"{op}: rank for {name or 'model'} must be in [1, {smallest}] or a fraction in (0, 1); got {rank}")
    return int(rank)
