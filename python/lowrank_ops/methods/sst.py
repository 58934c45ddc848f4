"""Sparse Spectral Training (SST; Zhao et al., 2024): convert a model's ``nn.Linear`` layers
to :class:`lowrank_ops.nn.SpectralLinear` (``W = U diag(s) Vh``) and drive the per-step
sampling of singular vectors and the periodic re-SVD.

Every step all singular values ``s`` are trained, and only ``r`` singular vector pairs
per layer, drawn multinomially with probability proportional to ``|s_i|``
(:meth:`~lowrank_ops.nn.SpectralLinear.resample_`); every ``resvd_every`` steps the
factors are replaced by the SVD of the current weight (re-orthogonalization).  See
:mod:`lowrank_ops.nn.spectral` for the layer, its cost and our reading of the abstract.

Example
-------
>>> layers = sst.convert(model, sample_rank=16, generator=g)    # name -> SpectralLinear
>>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
>>> scheduler = sst.SSTScheduler(model, resvd_every=100, optimizer=optimizer, generator=g)
>>> for x, y in data:
...     loss_fn(model(x), y).backward()
...     optimizer.step(); optimizer.zero_grad()
...     scheduler.step()              # new sample; every 100 steps re-SVD (and fresh optimizer states)
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import numpy as np
import torch

from .._args import generator_state, require_generator_state, require_int, require_state, restore_generator
from ..nn.spectral import SpectralLinear
from ._layers import build_replacements, linear_sites, replace_everywhere

__all__ = ["convert", "spectral_layers", "SSTScheduler"]


def convert(model: torch.nn.Module, rank: Optional[int] = None, sample_rank: Union[int, float, None] = None, *,
            target_modules: Optional[Union[str, Iterable[str]]] = None,
            generator: Optional[torch.Generator] = None) -> Dict[str, SpectralLinear]:
    """Replaces the matching ``nn.Linear`` layers of ``model`` in place by
    :meth:`SpectralLinear.from_linear` (the same weight in SVD form; exactly the same
    function when ``rank`` is None).

    Parameters
    ----------
    model : nn.Module
        Not itself an ``nn.Linear``.
    rank : int, optional
        ``K`` per layer, capped at ``min(in, out)``; default full rank.
    sample_rank : int or float, optional
        ``r`` per layer: an int (capped at ``K``), or a float in ``(0, 1]`` as a fraction
        of ``K`` (rounded, at least 1); default ``K`` (no sampling).
    target_modules : str or list of str, optional
        fnmatch patterns (full name or last component); default every module whose type is
        exactly ``nn.Linear``.
    generator : torch.Generator, optional
        Draws every layer's first sample.

    Returns
    -------
    Dict[str, SpectralLinear]
        Module name -> its new layer (each shared layer once).
    """
    op = "convert"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(model, torch.nn.Linear):
        raise TypeError(f"{op}: model is itself an nn.Linear, which cannot be replaced in place; wrap it "
                        "(e.g. nn.Sequential(linear)) and convert that")
    if rank is not None:
        rank = require_int(op, "rank", rank)
    if isinstance(sample_rank, np.floating):  # a NumPy fraction is a fraction too
        sample_rank = float(sample_rank)
    if isinstance(sample_rank, float):
        if not 0.0 < sample_rank <= 1.0:
            raise ValueError(f"{op}: sample_rank must be an int >= 1 or a fraction in (0, 1]; got {sample_rank}")
    elif sample_rank is not None:
        sample_rank = require_int(op, "sample_rank", sample_rank)
    def build(linear, names):
        K = min(linear.in_features, linear.out_features, rank or linear.in_features)
        if sample_rank is None:
            r = K
        elif isinstance(sample_rank, float):
            r = max(1, round(sample_rank * K))
        else:
            r = min(sample_rank, K)
        return SpectralLinear.from_linear(linear, K, r, generator=generator).requires_grad_(linear.weight.requires_grad)

    # Every layer built before any is registered: a bad one leaves the model untouched.
    sites = linear_sites(op, model, target_modules)
    converted: Dict[str, SpectralLinear] = {}
    for (_, names), layer in zip(sites, build_replacements(op, sites, build)):
        replace_everywhere(model, names, layer)
        converted[names[0]] = layer
    return converted


def spectral_layers(model: torch.nn.Module) -> Dict[str, SpectralLinear]:
    """Every :class:`SpectralLinear` in ``model`` (module name -> layer, each once)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SpectralLinear)}


class SSTScheduler:
    """SST's training-loop driver: call :meth:`step` after ``optimizer.step()``.

    Each call draws a new sample of singular vector pairs in every
    :class:`SpectralLinear` of ``model`` (for the next step); every ``resvd_every``-th call
    first re-orthogonalizes every layer by an SVD of its current weight, and, when an
    ``optimizer`` is given, clears its states of the layers' ``U``, ``s`` and ``Vh`` (their
    moments refer to the old basis; Adam-type optimizers restart those entries' moments,
    as a fresh optimizer would).

    Parameters
    ----------
    model : nn.Module
        Holding at least one :class:`SpectralLinear` (see :func:`convert`).
    resvd_every : int
        Re-SVD period in steps, ``>= 1``.
    optimizer : torch.optim.Optimizer, optional
    generator : torch.Generator, optional
        Random source of the samples: same state, same sequence of samples.

    Notes
    -----
    With a stateful optimizer (momentum, Adam), an unsampled vector's gradient is zero but
    its update is not: the optimizer's running moments keep moving it for a while.  Plain
    SGD updates exactly the sampled vectors.
    """

    def __init__(self, model: torch.nn.Module, resvd_every: int, *, optimizer: Optional[torch.optim.Optimizer] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        op = "SSTScheduler"
        self.layers = spectral_layers(model)
        if not self.layers:
            raise ValueError(f"{op}: model holds no SpectralLinear layer; convert it first (sst.convert(model, ...))")
        self.resvd_every = require_int(op, "resvd_every", resvd_every)
        self.optimizer = optimizer
        self.generator = generator
        self.steps = 0

    def step(self) -> bool:
        """Advances one step; returns True when this step re-orthogonalized the layers."""
        self.steps += 1
        resvd = self.steps % self.resvd_every == 0
        for layer in self.layers.values():
            if resvd:
                layer.resvd_()
                if self.optimizer is not None:
                    for p in (layer.U, layer.s, layer.Vh):
                        self.optimizer.state.pop(p, None)
            layer.resample_(self.generator)
        return resvd

    def state_dict(self) -> dict:
        """The step count and the generator's state: a resumed run draws the samples of the
        uninterrupted one (without it, U was 0.68 off after 4 more steps)."""
        return {"steps": self.steps,
                "generator_state": generator_state(self.generator)}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (checked first: a wrong state changes nothing)."""
        op = "SSTScheduler.load_state_dict"
        require_state(op, state, "SSTScheduler", ("steps",), ("generator_state",))
        steps = require_int(op, "state['steps']", state["steps"], 0)
        # (absent in states saved before it was kept)
        restore_generator(self.generator, require_generator_state(op, "state['generator_state']",
                                                                  state.get("generator_state")))
        self.steps = steps
