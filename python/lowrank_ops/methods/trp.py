"""Trained Rank Pruning (TRP; Xu et al., "Trained Rank Pruning for Efficient Deep Neural
Networks", 2019): low-rank structure imposed during training instead of after it.

TRP alternates ordinary training steps with two SVD-based operations on each targeted
2-D weight ``W [out, in]``:

* a nuclear-norm regularizer ``lambda ||W||_*`` optimized by stochastic subgradient
  descent: its subgradient ``lambda U V^T`` (``W = U diag(s) V^T``, the thin SVD) is added
  to ``W.grad`` after the backward pass and before the optimizer step
  (:func:`add_nuclear_subgradient_`);
* every ``period`` steps, an energy-based truncation: ``W <- U_k diag(s_k) V_k^T`` with the
  smallest ``k`` keeping the fraction ``energy`` of ``||W||_F^2`` (:func:`truncate_`).  The
  weight stays a dense ``[out, in]`` matrix of rank ``k``, so the network keeps its full
  capacity and training continues in the full space (the paper's point: the next steps may
  raise the rank again, the regularizer and the next truncation push it back down).

After training the weights are close to low rank, and :func:`compress` replaces them by
rank-``k`` factors (:func:`lowrank_ops.methods.lowrank_compress.compress`) with little
loss, without fine-tuning.  :class:`TRPScheduler` ties both operations to a training loop.

Only 2-D weights are handled; the paper's convolutions (reshaped to 2-D by channel or
spatial decomposition) are left to the caller.

Example
-------
>>> scheduler = trp.TRPScheduler(model, lam=1e-4, energy=0.99, period=20, optimizer=optimizer)
>>> for x, y in data:
...     loss_fn(model(x), y).backward()
...     scheduler.step()                       # + lambda U V^T
...     optimizer.step(); optimizer.zero_grad()  # every 20 steps truncation after the update
>>> print(trp.compress(model, energy=0.99))    # factorized layers, CompressionReport
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Dict, List, Optional, Tuple, Union

import torch

from .._args import (generator_state, is_integer, is_real_number, require_generator, require_generator_state,
                     require_int, require_number, require_state, require_values, restore_generator)
from .._finite import all_finite
from .._thin_svd import thin_svd
from ..linalg.rsvd import rsvd
from . import lowrank_compress
from ._layers import matches

__all__ = ["nuclear_subgradient", "add_nuclear_subgradient_", "truncate_", "TRPScheduler", "compress"]

Targets = Union[torch.Tensor, torch.nn.Module, Iterable]


def _compute_dtype(W: torch.Tensor) -> torch.dtype:
    """The SVDs run in float32, or float64 for float64 weights (half types have no LAPACK
    SVD, and rounding singular vectors to 8-11 bits would destroy their orthogonality)."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def nuclear_subgradient(W: torch.Tensor, *, rank: Optional[int] = None, n_iter: Union[int, str] = "auto",
                        generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A subgradient of the nuclear norm at ``W``: ``(U V^T [m, n], ||W||_* [])``.

    Parameters
    ----------
    W : Tensor[m, n]
        Floating point, finite; computed in float32 (float64 for float64 ``W``), returned
        in that dtype.
    rank : int, optional
        None (default): the thin SVD (``U [m, p]``, ``V [n, p]``, ``p = min(m, n)``), the
        exact subgradient.  An int ``k`` in ``[1, min(m, n)]``: the top-``k`` triplets from
        :func:`lowrank_ops.linalg.rsvd` (``U_k V_k^T``, and the top-``k`` partial sum of the
        singular values as the norm): the part of the subgradient that acts on the leading
        subspace, cheaper for large weights (the regularizer then shrinks only the top ``k``
        singular values, each by the same step as the exact subgradient would).
    n_iter, generator
        rsvd's power iterations and random source (only with ``rank``); the generator must
        be one of W's device (``torch.Generator(device=W.device)``; ValueError otherwise).

    Notes
    -----
    The nuclear norm's subdifferential at ``W = U_r S_r V_r^T`` (rank ``r``) is ``U_r V_r^T
    + Z`` with ``Z`` orthogonal to both singular subspaces and ``||Z||_2 <= 1``.  The thin
    SVD's ``U V^T`` includes the columns of zero singular values, which form such a ``Z``
    (spectral norm 1): a valid subgradient also for rank-deficient ``W``, as the TRP
    reference computes it.
    """
    op = "nuclear_subgradient"
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{op}: W must be a tensor; got {type(W).__name__}")
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{op}: W has shape {tuple(W.shape)} and dtype {W.dtype}; expected a 2-D floating-point "
                         "matrix [m, n]")
    if rank is not None:
        rank = require_int(op, "rank", rank)
        if rank > min(W.shape):
            raise ValueError(f"{op}: rank must be in [1, min(m, n)] = [1, {min(W.shape)}]; got {rank}")
    require_generator(op, "generator", generator, W.device, "W")
    A = W.detach().to(_compute_dtype(W))
    if not all_finite(A):
        raise ValueError(f"{op}: W holds NaN or infinite values")
    if A.numel() == 0:
        return A.clone(), A.new_zeros(())
    if rank is None:
        U, S, Vh = thin_svd(A)
    else:
        U, S, Vh = rsvd(A, rank, n_iter=n_iter, generator=generator, check_finite=False)
    return U @ Vh, S.sum()


def _resolve_params(op: str, name: str, targets: Targets) -> List[torch.Tensor]:
    """The 2-D trainable tensors named by ``targets``: a tensor; a module (the weights of
    its ``nn.Linear`` submodules, itself included); or an iterable of those.  Each tensor
    once; tensors with ``requires_grad=False`` are skipped (frozen weights are not trained,
    so there is nothing to regularize)."""
    found: List[torch.Tensor] = []
    seen = set()

    def add(tensor: torch.Tensor, where: str) -> None:
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise ValueError(f"{op}: {where} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; expected a 2-D "
                             "floating-point weight [out, in]")
        if tensor.requires_grad and id(tensor) not in seen:
            seen.add(id(tensor))
            found.append(tensor)

    def visit(item, where: str) -> None:
        if isinstance(item, torch.Tensor):
            add(item, where)
        elif isinstance(item, torch.nn.Module):
            for sub_name, module in item.named_modules():
                if isinstance(module, torch.nn.Linear):
                    add(module.weight, f"the weight of {sub_name or type(item).__name__}")
        else:
            raise TypeError(f"{op}: {where} must be a tensor or an nn.Module; got {type(item).__name__}")

    if isinstance(targets, (torch.Tensor, torch.nn.Module)):
        visit(targets, name)
    elif isinstance(targets, Iterable):
        for i, item in enumerate(targets):
            visit(item, f"{name}[{i}]")
    else:
        raise TypeError(f"{op}: {name} must be a tensor, an nn.Module or an iterable of them; "
                        f"got {type(targets).__name__}")
    return found


@torch.no_grad()
def add_nuclear_subgradient_(modules_or_params: Targets, weight: float, *, rank: Optional[int] = None,
                             n_iter: Union[int, str] = "auto", generator: Optional[torch.Generator] = None) -> float:
    """Adds ``weight * U V^T`` (:func:`nuclear_subgradient`) to the ``.grad`` of each target:
    one stochastic subgradient step's worth of the regularizer ``weight * sum ||W||_*``.

    Call it after ``loss.backward()`` and before ``optimizer.step()``.

    Parameters
    ----------
    modules_or_params : Tensor, nn.Module or iterable of them
        A 2-D weight (a ValueError names any other shape), a module (the weights of every
        ``nn.Linear`` in it), or an iterable of those.  Tensors with
        ``requires_grad=False`` are skipped.
    weight : float
        ``lambda >= 0``; 0 returns at once (no SVD).
    rank, n_iter, generator
        As :func:`nuclear_subgradient` (``rank`` is capped at each weight's
        ``min(out, in)``; the generator must be of the weights' device, checked before any
        gradient changes).

    Returns
    -------
    float
        The regularizer's value ``weight * sum ||W||_*`` before the step (the top-``rank``
        partial sums with ``rank``), e.g. to log it with the loss.

    Notes
    -----
    A weight whose ``.grad`` is None (unused in the forward) gets ``grad = weight U V^T``:
    the gradient of the regularized loss.  The addition is in the grad's dtype (one
    rounding of the float32/float64 subgradient).
    """
    op = "add_nuclear_subgradient_"
    lam = require_number(op, "weight", weight, 0.0)
    params = _resolve_params(op, "modules_or_params", modules_or_params)
    if rank is not None:
        rank = require_int(op, "rank", rank)
    for W in params:  # before any gradient changes
        require_generator(op, "generator", generator, W.device)
    if lam == 0.0:
        return 0.0
    # Every weight before any gradient changes (a NaN in the second left the first changed):
    # one host read for all of them.
    finite = torch.stack([torch.isfinite(W.detach()).all().to(params[0].device) for W in params]) if params else None
    if finite is not None and not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        raise ValueError(f"{op}: weight {index} (shape {tuple(params[index].shape)}) holds NaN or infinite values; "
                         "no gradient was changed")
    norms = []
    for W in params:
        k = None if rank is None else min(rank, min(W.shape))
        G, norm = nuclear_subgradient(W, rank=k, n_iter=n_iter, generator=generator)
        norms.append(norm)
        if W.grad is None:
            W.grad = (lam * G).to(W.dtype)
        else:
            W.grad.add_(G.to(W.grad.dtype), alpha=lam)
    # The norms are read once at the end (one host read per weight, after all the work is
    # queued), not after each weight's SVD: a CUDA stream keeps going between the weights.
    return lam * sum(float(norm) for norm in norms)


def _truncation_targets(op: str, model: torch.nn.Module, target_modules) -> Dict[str, torch.nn.Module]:
    """Module name -> module whose 2-D ``weight`` is truncated: every ``nn.Linear`` by
    default; with ``target_modules`` (fnmatch patterns), every matching module with a
    ``weight`` parameter, which must then be 2-D."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    patterns = None if target_modules is None else list(target_modules)
    targets: Dict[str, torch.nn.Module] = {}
    seen = set()
    for name, module in model.named_modules():
        if patterns is None:
            if not isinstance(module, torch.nn.Linear):
                continue
        elif not (matches(name, patterns) and isinstance(getattr(module, "weight", None), torch.Tensor)):
            continue
        weight = module.weight
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"{op}: target_modules={patterns} matches {name} ({type(module).__name__}), whose weight "
                             f"has shape {tuple(weight.shape)} and dtype {weight.dtype}; expected a 2-D floating-point "
                             "weight [out, in]")
        if id(weight) not in seen:
            seen.add(id(weight))
            targets[name or type(model).__name__] = module
    if patterns is not None and not targets:
        raise ValueError(f"{op}: no module with a weight matches target_modules={patterns}")
    return targets


def _check_energy(op: str, energy) -> float:
    if not is_real_number(energy) or not 0.0 < energy <= 1.0:
        raise ValueError(f"{op}: energy must be a number in (0, 1]; got {energy!r}")
    return float(energy)


@torch.no_grad()
def truncate_(model: torch.nn.Module, energy: float = 0.99, *, target_modules=None, n_iter: Union[int, str] = "auto",
              generator: Optional[torch.Generator] = None) -> Dict[str, int]:
    """Projects each targeted weight in place onto its rank-``k`` truncated SVD, ``k`` the
    smallest rank keeping the fraction ``energy`` of ``||W||_F^2`` (TRP's periodic
    truncation; the weight stays dense).

    Parameters
    ----------
    model : nn.Module
    energy : float
        In ``(0, 1]``: per weight, the smallest ``k`` with ``sum_{i <= k} s_i^2 >= energy
        ||W||_F^2`` (1 keeps the numerical rank: energies within the spectrum's rounding
        count as reached).
    target_modules : str or list of str, optional
        fnmatch patterns against the full module name and its last component; matching
        modules with a ``weight`` must have a 2-D one (ValueError otherwise).  Default:
        every ``nn.Linear``.  Frozen weights are truncated too (they are targeted by name).
    n_iter, generator
        rsvd's power iterations and random source (same state, same result); the generator
        must be of the weights' device (ValueError before any change otherwise).

    Returns
    -------
    Dict[str, int]
        Module name -> the rank ``k`` the weight now has (each shared weight once).

    Notes
    -----
    The rank search is :mod:`~lowrank_ops.methods.lowrank_compress`'s: rsvd at ranks 32,
    64, 128, ... until its singular values capture the energy, the exact thin SVD once the
    rank would pass half the smaller dimension.  rsvd's values never exceed the exact
    ones, so its ``k`` is at least the exact smallest one (equal on decaying spectra) and
    the projection always keeps the energy.  The truncated weight is written in place
    (``weight.copy_``, one rounding into the weight's dtype), so optimizers keep their
    references and states.  A weight with NaN or infinite entries raises ValueError before
    any weight is changed.
    """
    op = "truncate_"
    energy = _check_energy(op, energy)
    targets = _truncation_targets(op, model, target_modules)
    for name, module in targets.items():
        require_values(op, f"the weight of {name}", module.weight)  # (a scheduler may be built on meta)
        if not all_finite(module.weight):
            raise ValueError(f"{op}: the weight of {name} holds NaN or infinite values")
        # Now, not where rsvd first draws: weights truncated before that would stay changed.
        require_generator(op, "generator", generator, module.weight.device, f"the weight of {name}")
    ranks: Dict[str, int] = {}
    for name, module in targets.items():
        weight = module.weight
        if weight.numel() == 0:
            ranks[name] = 0
            continue
        W = weight.detach().to(_compute_dtype(weight))
        if not bool(W.any()):
            ranks[name] = 0
            continue
        # k_max = min(shape): every rank is allowed, so the search always returns factors.
        U, S, Vh, _, _ = lowrank_compress._energy_factors(W, energy, min(W.shape), n_iter, generator)
        weight.copy_((U * S) @ Vh)
        ranks[name] = S.shape[0]
    return ranks


class TRPScheduler:
    """TRP's training-loop driver: ``step()`` after ``backward()``, before ``optimizer.step()``.

    Each call adds the nuclear subgradient ``lam U V^T`` to the targeted weights' gradients
    (:func:`add_nuclear_subgradient_`, skipped when ``lam == 0``); every ``period``-th call
    then truncates the weights (:func:`truncate_`).  The paper's truncation step is
    ``W_{t+1} = T(W_t) - alpha grad f(T(W_t))`` (the authors' code truncates before the
    forward pass): given the ``optimizer``, the truncation runs right after that step's
    update (a post-step hook), so the next forward pass and its gradient see the truncated
    weights.  Without it, it runs in ``step()`` on the weights before the update, whose
    gradient was taken at the untruncated point: ``T(W_t) - alpha grad f(W_t)`` (the two
    differ by ``alpha (grad f(W_t) - grad f(T(W_t)))``: small when the truncation removes
    little energy, which is what ``energy`` near 1 asks).

    Parameters
    ----------
    model : nn.Module
    lam : float
        Nuclear-norm weight ``>= 0``.
    energy : float
        Truncation energy in ``(0, 1]``.
    period : int
        Truncate every ``period >= 1`` steps.
    target_modules : str or list of str, optional
        As :func:`truncate_` (default every ``nn.Linear``); the regularizer acts on the same
        weights (the trainable ones).
    rank : int, optional
        Top-``rank`` rsvd subgradient instead of the thin SVD (see :func:`nuclear_subgradient`).
    n_iter, generator
        rsvd's settings (truncation search and ``rank``); the generator must be of the
        weights' device (checked here).
    optimizer : torch.optim.Optimizer, optional
        The optimizer that updates the weights: truncations then run after its ``step()``
        (the paper's order, above), and :meth:`step` returns None (the ranks are in
        :attr:`ranks` once the update has run).  Under ``torch.amp.GradScaler`` a skipped
        step defers the truncation to the next step that runs.

    Attributes
    ----------
    steps : int
        Calls of :meth:`step` so far.
    ranks : Dict[str, int]
        The ranks of the last truncation (empty before the first).
    """

    def __init__(self, model: torch.nn.Module, lam: float, energy: float, period: int, *, target_modules=None,
                 rank: Optional[int] = None, n_iter: Union[int, str] = "auto",
                 generator: Optional[torch.Generator] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        op = "TRPScheduler"
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{op}: optimizer must be a torch.optim.Optimizer or None; got {type(optimizer).__name__}")
        self.lam = require_number(op, "lam", lam, 0.0)
        self.energy = _check_energy(op, energy)
        self.period = require_int(op, "period", period)
        self.rank = None if rank is None else require_int(op, "rank", rank)
        self._targets = _truncation_targets(op, model, target_modules)
        for name, module in self._targets.items():
            require_generator(op, "generator", generator, module.weight.device, f"the weight of {name}")
        self.model = model
        self.target_modules = target_modules
        self.n_iter = n_iter
        self.generator = generator
        self.steps = 0
        self.ranks: Dict[str, int] = {}
        self._truncation_due = False
        #: The optimizer's post-step hook (a ``RemovableHandle``; ``hook.remove()`` detaches
        #: this scheduler from the optimizer), or None without an optimizer.
        self.hook = None if optimizer is None else optimizer.register_step_post_hook(self._after_optimizer_step)
        self._after_update = optimizer is not None

    def step(self) -> Optional[Dict[str, int]]:
        """One training step's TRP work; returns the new ranks on truncation steps, else None
        (always None with an ``optimizer``: the truncation follows its update)."""
        if self.lam > 0:
            add_nuclear_subgradient_([m.weight for m in self._targets.values()], self.lam, rank=self.rank,
                                     n_iter=self.n_iter, generator=self.generator)
        self.steps += 1
        if self.steps % self.period:
            return None
        if self._after_update:
            self._truncation_due = True
            return None
        return self._truncate()

    def _truncate(self) -> Dict[str, int]:
        self.ranks = truncate_(self.model, self.energy, target_modules=self.target_modules, n_iter=self.n_iter,
                               generator=self.generator)
        return self.ranks

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._truncation_due:
            self._truncation_due = False
            self._truncate()

    def state_dict(self) -> dict:
        """Steps, ranks, a truncation still due (with an ``optimizer``: after a step that
        ``GradScaler`` skipped) and the generator's state: a resumed run draws the sketches
        of the uninterrupted one (without it a resume at step 3 of 8 ended 2.5e-2 off)."""
        return {"steps": self.steps, "ranks": dict(self.ranks), "truncation_due": self._truncation_due,
                "generator_state": generator_state(self.generator)}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s steps, ranks and generator state (checked first, so a
        wrong or corrupted state changes nothing)."""
        op = "TRPScheduler.load_state_dict"
        require_state(op, state, "TRPScheduler", ("steps", "ranks"), ("generator_state", "truncation_due"))
        steps = require_int(op, "state['steps']", state["steps"], 0)
        ranks = state["ranks"]
        if not isinstance(ranks, dict) or not all(isinstance(k, str) and is_integer(v) for k, v in ranks.items()):
            raise TypeError(f"{op}: state['ranks'] must be a dict of layer name -> rank (int); got {ranks!r}")
        due = state.get("truncation_due", False)
        if not isinstance(due, bool):
            raise TypeError(f"{op}: state['truncation_due'] must be a bool; got {type(due).__name__}")
        restore_generator(self.generator, require_generator_state(op, "state['generator_state']",
                                                                  state.get("generator_state")))
        self.steps, self.ranks = steps, {name: int(rank) for name, rank in ranks.items()}
        self._truncation_due = due and self._after_update  # (without an optimizer, step() truncates itself)


def compress(model: torch.nn.Module, energy: float = 0.99, *, target_modules=None, min_saving: float = 0.0,
             n_iter: Union[int, str] = "auto",
             generator: Optional[torch.Generator] = None) -> lowrank_compress.CompressionReport:
    """After TRP training: each targeted ``nn.Linear`` replaced by rank-``k`` factors at the
    truncation's energy rule, ``lowrank_compress.compress(model, energy=energy, ...)`` (see
    there for the layers built, ``min_saving`` and the report)."""
    return lowrank_compress.compress(model, energy=_check_energy("compress", energy), target_modules=target_modules,
                                     min_saving=min_saving, n_iter=n_iter, generator=generator)
