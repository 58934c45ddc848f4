"""Helpers shared by the method modules that replace a model's ``nn.Linear`` layers
(SLTrain's convert, low-rank compression, SoRA's pruning): parameter counts, name
patterns, per-layer ranks."""
from __future__ import annotations

import fnmatch
from typing import Dict, Optional, Sequence, Union

import torch

__all__ = ["count_parameters", "linear_targets", "matches", "resolve_rank"]


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


def linear_targets(op: str, model: torch.nn.Module, target_modules) -> Dict[str, torch.nn.Linear]:
    """Name -> module of every plain ``nn.Linear`` of ``model`` whose name matches the fnmatch
    ``target_modules`` (a pattern or a sequence; None: all), each module once under its
    first name; a ValueError when patterns are given and nothing matches."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module; got {type(model).__name__}")
    patterns = [target_modules] if isinstance(target_modules, str) else (
        None if target_modules is None else list(target_modules))
    found: Dict[str, torch.nn.Linear] = {}
    seen = set()
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and matches(name, patterns) and id(module) not in seen:
            seen.add(id(module))
            found[name] = module
    if patterns is not None and not found:
        raise ValueError(f"{op}: no nn.Linear module matches target_modules={patterns}")
    return found


def resolve_rank(rank: Union[int, float], linear: torch.nn.Linear, name: str, op: str) -> int:
    """``rank`` for ``linear``: an int in ``[1, min(in, out)]``, or a fraction in ``(0, 1)``
    of ``min(in, out)`` (rounded, at least 1); ``op`` names the caller in the error."""
    smallest = min(linear.in_features, linear.out_features)
    if isinstance(rank, float) and 0.0 < rank < 1.0:
        return max(1, round(rank * smallest))
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= int(rank) <= smallest:
        raise ValueError(f"{op}: rank for {name or 'model'} must be in [1, {smallest}] or a fraction in (0, 1); got {rank}")
    return int(rank)
