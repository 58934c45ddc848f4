"""Helpers shared by the method modules that replace a model's ``nn.Linear`` layers
(SLTrain's and SST's convert, low-rank compression, WeLore, SoRA's pruning): parameter
counts, name patterns, the layers to replace under all their names, per-layer ranks."""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from .._args import require_values

__all__ = ["build_replacements", "count_parameters", "linear_sites", "linear_targets", "matches", "replace_everywhere",
           "resolve_rank"]


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


def matches(name: str, patterns: Union[None, str, Sequence[str]]) -> bool:
    """Whether the module ``name`` (or its last component) matches one of the fnmatch
    ``patterns`` (a string is one pattern); every name when ``patterns`` is None."""
    if patterns is None:
        return True
    if isinstance(patterns, str):  # one pattern, not its characters ("10" matched "0" and "1")
        patterns = [patterns]
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def linear_targets(op: str, model: torch.nn.Module, target_modules, refuse_tied: bool = True
                   ) -> Dict[str, torch.nn.Linear]:
    """Name -> module of every plain ``nn.Linear`` of ``model`` whose name matches the fnmatch
    ``target_modules`` (a pattern or a sequence; None: all), each module once under its
    first name (:func:`linear_sites`, ``refuse_tied`` as there); a ValueError when patterns
    are given and nothing matches."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module; got {type(model).__name__}")
    return {names[0]: linear for linear, names in linear_sites(op, model, target_modules, refuse_tied)}


def linear_sites(op: str, model: torch.nn.Module, patterns: Union[None, str, Sequence[str]],
                 refuse_tied: bool = True, reads_weights: bool = True) -> List[Tuple[torch.nn.Linear, List[str]]]:
    """Every plain ``nn.Linear`` of ``model`` whose name matches ``patterns`` (None: all),
    once, with every name it is registered under (a module shared by two parents must be
    replaced under both, or the tie breaks); a ValueError when patterns are given and
    nothing matches, and (``refuse_tied``: for callers that replace the layers) when a
    layer's weight or bias is also another module's Parameter.  Plain: ``type(module) is
    nn.Linear``, since a subclass (MultiheadAttention's ``out_proj``) is read by its parent
    through ``.weight``, which a replacement lacks.  ``reads_weights``: the caller reads the
    weights' values, so a weight on the meta device is refused (:func:`require_values`)."""
    if patterns is not None:  # a string is one pattern; any other iterable is read once
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    sites: Dict[int, Tuple[torch.nn.Linear, List[str]]] = {}
    holders: Dict[int, List[Tuple[int, str]]] = {}  # parameter -> (module, name) of every module holding it
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is torch.nn.Linear and matches(name, patterns):
            sites.setdefault(id(module), (module, []))[1].append(name)
        for attribute, parameter in module._parameters.items():
            if parameter is not None:
                holders.setdefault(id(parameter), []).append((id(module), f"{name}.{attribute}" if name else attribute))
    if patterns is not None and not sites:
        raise ValueError(f"{op}: no nn.Linear module matches target_modules={patterns}")
    for linear, names in sites.values() if reads_weights else ():
        require_values(op, f"the weight of {names[0]}", linear.weight)
    for linear, names in sites.values() if refuse_tied else ():  # a replacement would silently untie them
        for attribute in ("weight", "bias"):
            others = [other for module, other in holders.get(id(linear._parameters.get(attribute)), [])
                      if module != id(linear)]
            if others:
                raise ValueError(f"{op}: {names[0]}.{attribute} is tied to {others[0]} (the same Parameter); "
                                 f"replacing {names[0]} would untie them: exclude it with target_modules, or "
                                 f"untie them first")
    return list(sites.values())


def build_replacements(op: str, sites: Sequence[tuple], build: Callable[..., torch.nn.Module]
                       ) -> List[torch.nn.Module]:
    """``build(*site)`` for every site (``(linear, names, ...)``), all before the caller
    registers any, so that a layer that fails leaves the model untouched; its ValueError
    or TypeError is raised again naming the layer."""
    layers = []
    for site in sites:
        try:
            layers.append(build(*site))
        except (ValueError, TypeError) as error:
            raise type(error)(f"{op}: layer {site[1][0]}: {error}") from error
    return layers


def replace_everywhere(model: torch.nn.Module, names: Sequence[str], layer: torch.nn.Module) -> None:
    """Register ``layer`` under every one of ``names`` (module paths in ``model``)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def resolve_rank(rank: Union[int, float], linear: torch.nn.Linear, name: str, op: str) -> int:
    """``rank`` for ``linear``: an int in ``[1, min(in, out)]``, or a fraction in ``(0, 1)``
    of ``min(in, out)`` (rounded, at least 1); ``op`` names the caller in the error."""
    smallest = min(linear.in_features, linear.out_features)
    if isinstance(rank, np.floating):  # a NumPy fraction is a fraction too
        rank = float(rank)
    what = f"layer {name!r}" if name else "the layer"
    if isinstance(rank, float):  # a fraction (1.0 meant rank 1, not the whole of min(in, out))
        if not 0.0 < rank < 1.0:
            raise ValueError(f"{op}: rank for {what} is a float, so a fraction of min(in, out) in "
                             f"(0, 1); got {rank} (pass an int for a rank in [1, {smallest}])")
        return max(1, round(rank * smallest))
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= int(rank) <= smallest:
        raise ValueError(f"{op}: rank for {what} must be in [1, {smallest}] or a fraction in (0, 1); "
                         f"got {rank}")
    return int(rank)
