"""Maestro (Horvath et al., 2023, "Maestro: Uncovering Low-Rank Structures via Trainable
Decomposition"): low-rank layers ``W = U V`` trained with ordered dropout over the rank
dimension, and progressive shrinking of the trailing components.

:class:`OrderedLowRankLinear` computes ``y = x V_b^T U_b^T + bias`` with ``U [out, r]``,
``V [r, in]`` and ``U_b = U[:, :b]``, ``V_b = V[:b]`` (views, no copy; ``U`` is stored
transposed, so both are contiguous blocks of rows).  In training mode
each forward samples ``b`` uniformly from ``{min_rank, ..., r}`` (ordered dropout): the
first components take part in every step and the last ones only in some, which orders
the components by importance (for a linear map on isotropic data the optimum is the SVD,
component ``i`` the ``i``-th singular triple).  So the layer can be evaluated at any
rank without retraining, and trailing components whose contribution
``||u_i v_i^T||_F = ||u_i|| ||v_i||`` falls below a tolerance can be cut
(:meth:`OrderedLowRankLinear.shrink_`, :func:`shrink_`) during training, progressively
lowering the rank the model trains and runs at.

The forward is two ``F.linear`` calls on the rank-``b`` views, the same products as an
``nn.Linear(in, b)`` followed by an ``nn.Linear(b, out)`` (bench/bench_maestro.py measures
both and a full-rank ``nn.Linear``); there is no base weight, so
:func:`lowrank_ops.ops.lora_linear` (which adds ``x W^T``) does not apply.

Example
-------
``model``, ``data`` and ``loss_fn`` stand for yours (a toy model and random batches here):

>>> from collections import OrderedDict
>>> import torch
>>> from lowrank_ops.methods import maestro
>>> model = torch.nn.Sequential(OrderedDict(fc1=torch.nn.Linear(32, 64), act=torch.nn.ReLU(),
...                                         fc2=torch.nn.Linear(64, 10)))
>>> data = [(torch.randn(16, 32), torch.randint(0, 10, (16,))) for _ in range(1000)]
>>> loss_fn = torch.nn.functional.cross_entropy
>>> ranks = maestro.convert(model, rank=0.5, target_modules=["fc*"], generator=torch.Generator().manual_seed(0))
>>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)   # after convert: it must hold the new U, V
>>> for step, (x, y) in enumerate(data):
...     loss_fn(model(x), y).backward()          # each layer samples its own rank b
...     optimizer.step(); optimizer.zero_grad()
...     if step % 500 == 499:
...         shrunk = maestro.shrink_(model, tol=1e-3, optimizer=optimizer)   # {name: (r, r')}
>>> _ = model.eval()                              # full (current) rank; or set layer.active_rank
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._args import is_integer, require_int, require_number, require_values
from .._finite import all_finite
from ..nn._init import fan_in_bound, uniform_
from ..nn._traced_rank import ActiveRank
from ..ops.lora import refuse_replay
from ._layers import build_replacements, linear_sites, replace_everywhere, resolve_rank
from .lowrank_compress import _rank_factors

__all__ = ["OrderedLowRankLinear", "convert", "shrink_", "component_norms"]


class OrderedLowRankLinear(ActiveRank, torch.nn.Module):
    """``y = x V[:b]^T U[:, :b]^T + bias`` with ordered dropout over the rank ``b``.

    Parameters
    ----------
    in_features, out_features : int
        ``>= 1``.
    rank : int
        The number of components ``r``, ``>= 1``.
    bias : bool
    ordered_dropout : bool
        Sample ``b`` in training mode (default); False: train at ``active_rank`` (or ``r``).
    min_rank : int
        The smallest rank sampled, in ``[1, r]``.
    generator : torch.Generator, optional
        A CPU generator for the sampled ranks (and the initialization): the same seed
        gives the same sequence of ranks, and the same initial values, on every device
        (the ranks are drawn on the CPU, so sampling never waits for a GPU; the values
        are drawn on the CPU and copied to ``device``).  None: torch's global generators
        (the CPU one for the ranks, the device's for the initialization).
    device, dtype
        Of the parameters (default: torch's defaults).

    Attributes
    ----------
    U_t : Parameter[r, out_features]
        The up-projection stored rank-major (``U`` transposed), so that a rank prefix
        ``U_t[:b]`` is a contiguous block of rows, as ``V[:b]`` is (the GEMMs then read
        and write unit-stride blocks; an ``[out, r]`` layout gives ``U[:, :b]`` a leading
        dimension r > b).
    U : Tensor[out_features, r]
        ``U_t.T`` (a view; ``W = U V``).
    V : Parameter[r, in_features]
    bias : Parameter[out_features] or None
    active_rank : int or None
        The rank used in eval mode (None: all ``r``), and the largest sampled in training.
    last_rank : int or None
        The rank ``b`` of the most recent forward (None before the first).

    Notes
    -----
    Initialization as two ``nn.Linear`` layers (``V`` as ``Linear(in, r)``'s weight, ``U``
    as ``Linear(r, out)``'s, Kaiming-uniform with ``a = sqrt(5)``); :meth:`from_linear`
    factorizes a trained layer instead.  Sampling reads a CPU generator, so a compiled
    model should sample outside the graph (set ``active_rank`` per step, with
    ``ordered_dropout=False``).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 ordered_dropout: bool = True, min_rank: int = 1, generator: Optional[torch.Generator] = None,
                 device=None, dtype=None):
        super().__init__()
        op = "OrderedLowRankLinear"
        self.in_features = require_int(op, "in_features", in_features, 1)
        self.out_features = require_int(op, "out_features", out_features, 1)
        rank = require_int(op, "rank", rank, 1)
        self.min_rank = require_int(op, "min_rank", min_rank, 1)
        if self.min_rank > rank:
            raise ValueError(f"{op}: min_rank must be in [1, rank] = [1, {rank}]; got {self.min_rank}")
        if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
            raise TypeError(f"{op}: generator must be a CPU torch.Generator; got {generator!r}")
        self.ordered_dropout = bool(ordered_dropout)
        self.generator = generator
        factory = {"device": device, "dtype": dtype}
        self.U_t = torch.nn.Parameter(torch.empty(rank, out_features, **factory))
        self.V = torch.nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.active_rank: Optional[int] = None
        self.last_rank: Optional[int] = None
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_take_checkpoint_rank)

    @property
    def U(self) -> torch.Tensor:
        """``U [out, r] = U_t.T``, a view of the parameter (writes go through)."""
        return self.U_t.T

    @property
    def rank(self) -> int:
        """The current number of components ``r`` (lowered by :meth:`shrink_`)."""
        return self.V.shape[0]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``V``, ``U`` and the bias as ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` would
        draw them, from ``generator``."""
        uniform_(self.V, fan_in_bound(self.in_features), self.generator)
        uniform_(self.U_t, fan_in_bound(self.rank), self.generator)
        if self.bias is not None:
            uniform_(self.bias, fan_in_bound(self.rank), self.generator)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, rank: Union[int, float, None] = None, *, n_iter="auto",
                    ordered_dropout: bool = True, min_rank: int = 1,
                    generator: Optional[torch.Generator] = None) -> "OrderedLowRankLinear":
        """The ordered factorization of a trained ``nn.Linear``: its top-``rank`` SVD.

        Parameters
        ----------
        linear : nn.Linear
            Left unchanged; weight finite.
        rank : int or float, optional
            An int in ``[1, min(in, out)]``, or a fraction in ``(0, 1)`` of ``min(in, out)``;
            default ``min(in, out)`` (exact: ``U V = W`` up to rounding).
        n_iter : int or "auto"
            Power iterations of :func:`lowrank_ops.linalg.rsvd`, used when ``rank`` is at
            most half of ``min(in, out)``; larger ranks use the exact SVD (as
            :func:`lowrank_ops.methods.lowrank_compress.compress`).
        ordered_dropout, min_rank, generator
            As the constructor (the generator also seeds rsvd, through one draw: a
            generator on the weight's device seeded from it).

        Returns
        -------
        OrderedLowRankLinear
            ``U = U_k sqrt(S_k)``, ``V = sqrt(S_k) Vh_k`` (components by decreasing singular
            value; the balanced split gives both factors the same scale for training), the
            bias copied; the SVD in float32 (float64 for float64 weights), the factors in
            the weight's dtype and device, ``requires_grad`` and train/eval mode as the weight's
            and the layer's.
        """
        op = "OrderedLowRankLinear.from_linear"
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{op}: linear must be a torch.nn.Linear; got {type(linear).__name__}")
        rank = min(linear.in_features, linear.out_features) if rank is None else resolve_rank(rank, linear, "", op)
        weight = linear.weight.detach()
        require_values(op, "linear.weight", weight)
        if not all_finite(weight):
            raise ValueError(f"{op}: linear's weight holds {int((~torch.isfinite(weight)).sum())} non-finite entries")
        W = weight if weight.dtype == torch.float64 else weight.float()
        # rsvd draws its test matrix on W's device, which a CPU generator cannot drive for
        # a CUDA weight: it gets a generator on W's device seeded from one draw of
        # `generator`, taken on every device (and for the exact SVD too), so that the
        # generator is left in the same state, and samples the same ranks, on every device.
        sketch_generator = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            sketch_generator = torch.Generator(device=W.device).manual_seed(seed)
        U, S, Vh = _rank_factors(W, rank, n_iter, sketch_generator)[:3]
        root = S.sqrt()
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    ordered_dropout=ordered_dropout, min_rank=min_rank, generator=generator,
                    device=weight.device, dtype=weight.dtype)
        layer.U_t.copy_((U * root).T)
        layer.V.copy_(root[:, None] * Vh)
        layer.U_t.requires_grad_(linear.weight.requires_grad)
        layer.V.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer.train(linear.training)

    def _rank_for(self, rank: Optional[int]) -> int:
        op = "OrderedLowRankLinear.forward"
        top = ActiveRank.active_rank.traced(self)  # symbolic under torch.compile: no guard on its value
        top = self.rank if top is None else top
        if not 0 <= top <= self.rank:  # active_rank is a plain attribute: check it at use
            raise ValueError(f"{op}: active_rank must be in [0, r] = [0, {self.rank}]; got {self.active_rank}")
        if rank is not None:
            if not is_integer(rank) or not 0 <= rank <= self.rank:
                raise ValueError(f"{op}: rank must be an int in [0, r] = [0, {self.rank}]; got {rank!r}")
            return int(rank)
        if self.training and self.ordered_dropout and top > 0:
            refuse_replay(op, self.generator, "rank")  # a checkpoint's recomputation would sample another one
            low = min(self.min_rank, top)
            return int(torch.randint(low, top + 1, (), generator=self.generator))
        return top

    def forward(self, x: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
        """``x V[:b]^T U[:, :b]^T + bias``.

        Parameters
        ----------
        x : Tensor[..., in_features]
            The parameters' dtype and device.
        rank : int, optional
            Use exactly this ``b`` in ``[0, r]`` (no sampling).  Default: in training mode
            with ``ordered_dropout``, ``b`` uniform in ``{min_rank, ..., active_rank or r}``;
            otherwise ``active_rank`` (or ``r``).

        Returns
        -------
        Tensor[..., out_features]
            Differentiable in x, ``U_t``, ``V`` and the bias; the gradients of ``U_t[b:]`` and
            ``V[b:]`` are exactly zero.  The rank used is stored in :attr:`last_rank`.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"OrderedLowRankLinear.forward: x must be a tensor; got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"OrderedLowRankLinear.forward: x has shape {tuple(x.shape)}; expected "
                             f"(..., in_features) = (..., {self.in_features})")
        b = self._rank_for(rank)
        self.last_rank = b
        # At b = r the parameters themselves, not full-range slices: a slice's backward
        # allocates a zero gradient of the parameter's shape and copies into it (measured
        # single-threaded at 1024 x 1024, r = b = 256, N = 512: 1.17x the step's time).
        V, U_t = (self.V, self.U_t) if b == self.rank else (self.V[:b], self.U_t[:b])
        return F.linear(F.linear(x, V), U_t.T, self.bias)

    @torch.no_grad()
    def component_norms(self) -> torch.Tensor:
        """``||u_i|| ||v_i|| = ||u_i v_i^T||_F`` of every component, float64 ``[r]`` on the
        parameters' device."""
        return (torch.linalg.vector_norm(self.U_t, dim=1, dtype=torch.float64)
                * torch.linalg.vector_norm(self.V, dim=1, dtype=torch.float64))

    @torch.no_grad()
    def shrink_(self, tol: float, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Cuts the trailing components with ``||u_i|| ||v_i|| <= tol``.

        The new rank is ``r' = 1 +`` the last index whose norm exceeds ``tol`` (at least 1:
        a rank-0 layer would be a constant).  Components before it stay even when small
        (the order is the ordering dropout taught).  The output changes by at most
        ``||x|| * sum_{i >= r'} ||u_i|| ||v_i||`` per row (triangle inequality on
        ``sum_i u_i v_i^T``).

        Parameters
        ----------
        tol : float
            ``>= 0``, finite; an absolute bound on a component's Frobenius norm.
        optimizer : torch.optim.Optimizer, optional
            Updated to keep working: its parameter groups get the new ``U_t`` and ``V`` in
            place of the old ones, and their state tensors of the old shapes (Adam's
            averages, momentum) are cut the same way.  Without it, build a new optimizer
            after a shrink that changed the rank.

        Returns
        -------
        int
            The new rank ``r'``.

        Notes
        -----
        ``U_t`` and ``V`` become new ``Parameter`` objects holding contiguous copies of the
        kept rows (the old memory is freed; autograd fixes a leaf's shape, so a
        parameter cannot be resized in place), with ``requires_grad`` and the ``.grad``
        (cut) carried over.  Hooks registered on the old parameters are not.  ``active_rank``
        and ``min_rank`` are lowered to ``r'`` when above it.  A state dict saved afterwards
        loads into a layer of any rank (which takes ``r'``, see ``load_state_dict``).
        """
        tol = require_number("OrderedLowRankLinear.shrink_", "tol", tol, 0.0)
        norms = self.component_norms()
        if not all_finite(norms):
            raise ValueError(f"OrderedLowRankLinear.shrink_: {int((~torch.isfinite(norms)).sum())} component norms "
                             f"are not finite")
        above = torch.nonzero(norms > tol).flatten()
        keep = max(1, int(above[-1]) + 1 if above.numel() else 0)
        if keep == self.rank:
            return keep
        cut = (slice(None, keep),)
        for name in ("U_t", "V"):
            # New Parameter objects: autograd caches a leaf's shape, so resizing one in
            # place (``param.data = ...``) would break the next backward.
            old = getattr(self, name)
            new = torch.nn.Parameter(old.detach()[cut].clone(), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = old.grad[cut].clone()
            if optimizer is not None:
                _swap_in_optimizer(optimizer, old, new, cut)
            setattr(self, name, new)
        if self.active_rank is not None and self.active_rank > keep:
            self.active_rank = keep
        self.min_rank = min(self.min_rank, keep)
        return keep

    def extra_repr(self) -> str:
        extras = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"rank={self.rank}",
                  f"bias={self.bias is not None}"]
        if not self.ordered_dropout:
            extras.append("ordered_dropout=False")
        if self.min_rank != 1:
            extras.append(f"min_rank={self.min_rank}")
        return ", ".join(extras)


def _take_checkpoint_rank(module: OrderedLowRankLinear, state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:
    """A checkpoint saved after :meth:`~OrderedLowRankLinear.shrink_` (or from a layer of
    another rank) holds ``U_t [r', out]`` and ``V [r', in]``: the layer takes that rank before
    the copy (a freshly converted model refused a shrunk checkpoint with a size mismatch).
    The Parameter objects stay (their data is replaced), so an optimizer built before the
    load, the usual resume order, still holds them: new Parameters, as shrink_ makes, left
    it updating orphans while the layer never trained.  ``active_rank`` and ``min_rank`` are
    lowered to ``r'`` when above it.  Anything else is left to the usual shape checks."""
    U_t, V = state_dict.get(prefix + "U_t"), state_dict.get(prefix + "V")
    if not (isinstance(U_t, torch.Tensor) and isinstance(V, torch.Tensor) and U_t.dim() == 2 and V.dim() == 2):
        return
    rank = U_t.shape[0]
    if rank == module.rank or rank < 1 or V.shape != (rank, module.in_features) or U_t.shape[1] != module.out_features:
        return
    for name in ("U_t", "V"):
        parameter = getattr(module, name)
        parameter.data = parameter.new_empty(rank, parameter.shape[1])
        parameter.grad = None  # of the old shape: the next backward would broadcast into it
    if module.active_rank is not None and module.active_rank > rank:
        module.active_rank = rank
    module.min_rank = min(module.min_rank, rank)


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, old: torch.nn.Parameter, new: torch.nn.Parameter,
                       cut: tuple) -> None:
    """Puts ``new`` in place of ``old`` in ``optimizer``'s groups, with ``old``'s state cut."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {key: value[cut].clone() if isinstance(value, torch.Tensor)
                                and value.shape == old.shape else value for key, value in state.items()}


def convert(model: torch.nn.Module, rank: Union[int, float, None] = None, target_modules: Optional[Sequence[str]] = None,
            *, n_iter="auto", ordered_dropout: bool = True, min_rank: int = 1,
            generator: Optional[torch.Generator] = None) -> Dict[str, int]:
    """Replaces, in place, the matching ``nn.Linear`` layers of ``model`` by
    :meth:`OrderedLowRankLinear.from_linear` factorizations.

    Parameters
    ----------
    model : nn.Module
        Not itself an ``nn.Linear`` (use ``from_linear``).
    rank : int or float, optional
        Per layer, as ``from_linear`` (an int larger than a layer's ``min(in, out)`` raises).
    target_modules : str or sequence of str, optional
        fnmatch patterns of module names (or their last component); default every
        ``nn.Linear``; patterns that match nothing raise ValueError.
    n_iter, ordered_dropout, min_rank, generator
        As ``from_linear``.

    Returns
    -------
    dict of str to int
        The rank of each replaced layer, by name.  A layer shared under several names is
        factorized once; build the optimizer after converting.
    """
    op = "convert"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(model, torch.nn.Linear):
        raise ValueError(f"{op}: model is itself an nn.Linear, which cannot be replaced in place; "
                         f"use OrderedLowRankLinear.from_linear(model, rank)")
    # Each layer once under all its names; ranks resolved and layers built first, naming the
    # layer, so that a bad one leaves the model untouched (a no-match pattern raises, as the
    # other converters).
    sites = [(linear, names, None if rank is None else resolve_rank(rank, linear, names[0], op))
             for linear, names in linear_sites(op, model, target_modules)]
    layers = build_replacements(op, sites, lambda linear, names, layer_rank: OrderedLowRankLinear.from_linear(
        linear, layer_rank, n_iter=n_iter, ordered_dropout=ordered_dropout, min_rank=min_rank, generator=generator))
    ranks: Dict[str, int] = {}
    for (_, names, _), layer in zip(sites, layers):
        replace_everywhere(model, names, layer)
        ranks.update((name, layer.rank) for name in names)
    return ranks


def _layers(op: str, model: torch.nn.Module):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module; got {type(model).__name__}")
    seen, layers = set(), []
    for name, module in model.named_modules():
        if isinstance(module, OrderedLowRankLinear) and id(module) not in seen:
            seen.add(id(module))
            layers.append((name, module))
    return layers


def shrink_(model: torch.nn.Module, tol: float, optimizer: Optional[torch.optim.Optimizer] = None
            ) -> Dict[str, Tuple[int, int]]:
    """:meth:`OrderedLowRankLinear.shrink_` on every such layer of ``model`` (the model
    itself included), with the same ``tol`` and ``optimizer``.

    Returns
    -------
    dict of str to (int, int)
        Per layer name, ``(r, r')``.
    """
    tol = require_number("shrink_", "tol", tol, 0.0)
    report = {}
    for name, layer in _layers("shrink_", model):
        before = layer.rank
        report[name] = (before, layer.shrink_(tol, optimizer))
    return report


def component_norms(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """:meth:`OrderedLowRankLinear.component_norms` of every such layer of ``model``, by name
    (e.g. to choose ``tol``: the norms fall off past the rank the data support)."""
    return {name: layer.component_norms() for name, layer in _layers("component_norms", model)}
