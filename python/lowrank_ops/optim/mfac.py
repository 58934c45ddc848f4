"""M-FAC optimizer (Frantar, Kurtic, Alistarh, 2021): SGD preconditioned by the inverse
empirical Fisher of a sliding window of gradients.

Per parameter group and step, with ``g`` the group's gradients flattened into one
vector (``+ weight_decay * w``)::

    F^-1 g  = inverse.update_ihvp(g)        # window <- g, then (lambda I + G^T G / n)^-1 g
    buf     = momentum * buf + (1 - momentum) * F^-1 g   # when momentum > 0; buf starts at 0
    w      -= lr * (buf or F^-1 g)

The momentum is official M-FAC's exponential average (its ``optim.py``), not torch SGD's
heavy ball (``buf = momentum * buf + F^-1 g``, whose steps are ``1 / (1 - momentum)``
larger: 10x at 0.9), so M-FAC recipes' ``lr`` and ``momentum`` carry over.

With ``sparse=True`` (official M-FAC's ``sparse``) the weights that are exactly zero at
the group's first step stay zero: ``g`` is restricted to the other weights (the window
holds ``nnz`` entries per gradient, not ``d``) and the step is scattered back to them.
Fine-tuning after OBS pruning (:mod:`lowrank_ops.methods.mfac_pruning`) then keeps the
model sparse, where a dense step would re-grow every pruned weight.

Each group has its own :class:`~lowrank_ops.second_order.MFACInverse` (its own window,
``ngrads`` and ``damp``), so groups never mix curvature.  One step reads the window
twice (the fused write + ``G g`` pass and the ``G^T c`` pass).  No global torch flag is
touched: the ``m x m`` solves run in float64 instead of relying on TF32 being off.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch

from .._args import require_int, require_number
from .._dtypes import accumulate_dtype
from .._finite import all_finite
from ..second_order.mfac import MFACInverse, check_storage_dtype
from ._checks import add_checked_group, check_lr, current_lr, require_real_params

__all__ = ["MFAC"]


class MFAC(torch.optim.Optimizer):
    """M-FAC: ``w -= lr * F^-1 g`` over a window of the last ``ngrads`` gradients.

    Parameters
    ----------
    params : iterable of Tensor or dict
        Parameters or parameter groups (each group may set every option below).
    lr : float
        Learning rate (> 0).
    ngrads : int
        Window size ``m`` (>= 1, any value).
    damp : float
        Fisher damping ``lambda`` (> 0).  Directions outside the window's span are scaled by
        ``1 / lambda``: ``lr / damp`` is the effective SGD step there.
    momentum : float
        Momentum on the preconditioned step, in ``[0, 1)``: official M-FAC's exponential
        average ``buf = momentum buf + (1 - momentum) F^-1 g`` from ``buf = 0`` (not torch
        SGD's heavy ball, whose steps are ``1 / (1 - momentum)`` larger).
    weight_decay : float
        L2 penalty added to the gradient before preconditioning (as the official code).
    storage_dtype : torch.dtype, optional
        Dtype of the gradient window: float32 (default for float32 parameters), bfloat16 or
        float16 (half the memory; sums in float64 as for float32).  float64 parameters use float64 throughout.
    sparse : bool
        Keep the weights that are exactly zero at the group's first step at zero (their
        gradients are left out of the window and their step is 0), as official M-FAC's
        ``sparse=True``: for fine-tuning a pruned model.  Default False.

    Notes
    -----
    ``state_dict()`` holds, per group, the window (gradients, Gram matrix, count), the
    momentum buffer and, with ``sparse``, the mask of the kept weights; ``load_state_dict``
    restores them on the parameters' device.  Parameters without a gradient (``grad`` None,
    e.g. frozen) contribute zeros to the flattened gradient, get no weight decay, and are
    left unchanged, as torch's optimizers leave them (the window's earlier gradients would
    otherwise move them).  Gradients must be dense.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, ngrads: int = 1024, damp: float = 1e-5,
                 momentum: float = 0.0, weight_decay: float = 0.0, *, storage_dtype: Optional[torch.dtype] = None,
                 sparse: bool = False):
        defaults = dict(lr=lr, ngrads=ngrads, damp=damp, momentum=momentum, weight_decay=weight_decay,
                        storage_dtype=storage_dtype, sparse=sparse)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, then the checks of every setting."""
        add_checked_group(self, super().add_param_group, param_group, _check_group)

    def _inverse(self, group: Dict[str, Any]) -> MFACInverse:
        state = self.state[group["params"][0]]
        if "inverse" not in state:
            first = group["params"][0]
            dtype = accumulate_dtype(first.dtype)
            dim = sum(p.numel() for p in group["params"])
            if group["sparse"]:
                mask = torch.cat([p.reshape(-1) != 0 for p in group["params"]])
                dim = int(mask.sum())
                if dim == 0:
                    raise ValueError("MFAC: sparse=True, but every weight of the group is zero; nothing to train")
                state["mask"] = mask
            state["inverse"] = MFACInverse(dim, group["ngrads"], group["damp"], dtype=dtype,
                                           storage_dtype=group["storage_dtype"], device=first.device)
        inverse = state["inverse"]
        # ngrads, storage_dtype and sparse shape the window, built at the group's first step:
        # a later change was ignored silently.  damp may change (a schedule).
        settings = {"ngrads": (group["ngrads"], inverse.ngrads), "sparse": (group["sparse"], "mask" in state),
                    "storage_dtype": (check_storage_dtype("MFAC", inverse.dtype, group["storage_dtype"]),
                                      inverse.storage_dtype)}
        for name, (wanted, built) in settings.items():
            if wanted != built:
                raise ValueError(f"MFAC: the group's {name} changed to {group[name]!r}, but its window was built with "
                                 f"{name}={built!r} at the group's first step; {name} cannot change after it (start "
                                 "a new optimizer, or put the parameters in a new group)")
        inverse.damp = group["damp"]  # a schedule may change it
        return inverse

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One M-FAC step per parameter group; ``closure`` re-evaluates the loss (with grad)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lrs = [current_lr("MFAC", group, low_open=True) for group in self.param_groups]  # before any state changes
        # Every group's gradient first, checked before any group changes: a non-finite one in
        # the second group raised after the first had stepped (half a step, for a caller who
        # catches the error and skips the batch).
        work = []
        for number, (group, lr) in enumerate(zip(self.param_groups, lrs)):
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            inverse = self._inverse(group)
            for index, p in enumerate(params):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(f"MFAC: parameter {index} of the group has a {p.grad.layout} gradient; "
                                       f"M-FAC needs dense gradients (e.g. nn.Embedding(sparse=False))")
            g = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(inverse.dtype) for p in params
            ])
            if group["weight_decay"] != 0:  # on the parameters with a gradient only
                g.add_(torch.cat([(p if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(inverse.dtype)
                                  for p in params]), alpha=group["weight_decay"])
            mask = self.state[params[0]].get("mask")
            if mask is not None:
                g = g[mask]
            if not all_finite(g):
                raise ValueError(f"MFAC: the gradient of parameter group {number} has NaN or infinite entries; no "
                                 "group was updated (skip the batch, or unscale a GradScaler's gradients first)")
            work.append((group, lr, inverse, g, mask))
        for group, lr, inverse, g, mask in work:
            params = group["params"]
            direction = inverse.update_ihvp(g)
            keep = None
            if any(p.grad is None for p in params):
                # F^-1 g reaches them through the window's earlier gradients: as torch's
                # optimizers, a parameter without a gradient is left alone (no step, and its
                # momentum neither grows nor decays).
                keep = torch.cat([torch.full((p.numel(),), p.grad is not None, device=g.device) for p in params])
                keep = keep if mask is None else keep[mask]
                direction = direction * keep.to(direction.dtype)
            if group["momentum"] > 0:
                momentum = group["momentum"]
                state = self.state[params[0]]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(direction)
                if keep is None:
                    buf.mul_(momentum).add_(direction, alpha=1.0 - momentum)
                else:  # (direction is 0 where keep is False: those entries keep their buf)
                    # (factors of buf's dtype: torch.where of two numbers is float32, 0.9 rounded)
                    buf.mul_(torch.where(keep, buf.new_tensor(momentum), buf.new_tensor(1.0)))
                    buf.add_(direction, alpha=1.0 - momentum)
                direction = buf
            if mask is not None:
                direction = direction.new_zeros(mask.shape).masked_scatter_(mask, direction)
            offset = 0
            for p in params:
                n = p.numel()
                if p.grad is not None:
                    p.add_(direction[offset:offset + n].view_as(p).to(p.dtype), alpha=-lr)
                offset += n
        return loss

    def state_dict(self) -> Dict[str, Any]:
        state_dict = super().state_dict()
        # The packed state shares its per-parameter dicts with self.state: copy before replacing.
        state_dict["state"] = {
            index: {key: (value.state_dict() if isinstance(value, MFACInverse) else value) for key, value in entry.items()}
            for index, entry in state_dict["state"].items()
        }
        for entry in state_dict["state"].values():
            if "momentum_buffer" in entry:  # (its absence marks the heavy-ball sums of older checkpoints)
                entry["momentum_average"] = True
        return state_dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # The window keeps its own dtypes (bf16 buffer, float64 Gram), the mask is bool and
        # the momentum buffer is in the window's compute dtype (float32 for half
        # parameters): take them out before the base class casts state to the parameter's
        # dtype (a bfloat16 buffer after a resume changed the trajectory).
        kept = ("inverse", "mask", "momentum_buffer", "momentum_average")
        own = {index: {key: entry[key] for key in kept if key in entry} for index, entry in state_dict["state"].items()}
        stripped = dict(state_dict)
        stripped["state"] = {
            index: {key: value for key, value in entry.items() if key not in kept}
            for index, entry in state_dict["state"].items()
        }
        params = [p for group in self.param_groups for p in group["params"]]
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] == [len(g["params"]) for g in self.param_groups]:
            _check_saved_windows(own, self.param_groups, saved_groups)  # (else the base class names the groups)
        super().load_state_dict(stripped)
        for group in self.param_groups:  # saved before a setting existed (sparse): this optimizer's default
            for name, default in self.defaults.items():
                group.setdefault(name, default)
        momentum_of = {p: group["momentum"] for group in self.param_groups for p in group["params"]}
        for index, entry in own.items():
            param = params[index]
            if "mask" in entry:
                self.state[param]["mask"] = entry["mask"].to(device=param.device, dtype=torch.bool)
            if "momentum_buffer" in entry:
                buffer = entry["momentum_buffer"].to(param.device, copy=True)
                if not entry.get("momentum_average", False):
                    # Saved before the momentum became M-FAC's average: a heavy-ball sum, about
                    # 1 / (1 - m) times the average it converges to.
                    buffer.mul_(1.0 - momentum_of[param])
                self.state[param]["momentum_buffer"] = buffer
            if "inverse" in entry:
                self.state[param]["inverse"] = MFACInverse.from_state_dict(entry["inverse"], device=param.device)


def _check_saved_windows(own: Dict[Any, Dict[str, Any]], groups, saved_groups) -> None:
    """A saved window (and mask) must fit its group's parameters: another model's state
    loaded silently and failed at the step (a raw IndexError of the mask with sparse=True)."""
    for group, saved in zip(groups, saved_groups):
        first = saved["params"][0] if saved["params"] else None
        entry = own.get(first, {})
        if "inverse" not in entry:
            continue
        size = sum(p.numel() for p in group["params"])
        mask = entry.get("mask")
        dim = entry["inverse"].get("dim")
        wanted = int(mask.sum()) if isinstance(mask, torch.Tensor) else size
        if (isinstance(mask, torch.Tensor) and mask.numel() != size) or (dim is not None and int(dim) != wanted):
            raise ValueError(f"MFAC.load_state_dict: the saved window of state {first} holds gradients of {dim} "
                             f"entries{'' if mask is None else f' (a mask of {mask.numel()})'}; this group's "
                             f"{len(group['params'])} parameters have {size} (the state of another model?)")


def _check_group(group: Dict[str, Any]) -> None:
    group["lr"] = check_lr("MFAC", group["lr"], low_open=True)
    group["damp"] = require_number("MFAC", "damp", group["damp"], 0.0, low_open=True)
    group["momentum"] = require_number("MFAC", "momentum", group["momentum"], 0.0, 1.0)
    group["weight_decay"] = require_number("MFAC", "weight_decay", group["weight_decay"], 0.0)
    if not isinstance(group["sparse"], bool):
        raise TypeError(f"MFAC: sparse must be a bool; got {type(group['sparse']).__name__}")
    ngrads = group["ngrads"]
    group["ngrads"] = require_int("MFAC", "ngrads", ngrads)
    require_real_params("MFAC", group)
    if group["params"]:  # the window's dtypes, checked now rather than at the first step
        check_storage_dtype("MFAC", accumulate_dtype(group["params"][0].dtype), group["storage_dtype"])
