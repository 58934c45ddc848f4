"""Validation of the optimizers' per-group settings."""
from __future__ import annotations

from typing import Any, Callable, Dict, Union

import torch

from .._args import require_number


def add_checked_group(optimizer: torch.optim.Optimizer, add: Callable[[Dict[str, Any]], None],
                      param_group: Dict[str, Any], check: Callable[[Dict[str, Any]], None]) -> None:
    """``add(param_group)`` (torch's ``add_param_group``: missing settings from the
    defaults), then ``check`` on the new group, which is dropped again if it fails: a
    group added later is validated like the first."""
    add(param_group)
    try:
        check(optimizer.param_groups[-1])
    except (TypeError, ValueError):
        optimizer.param_groups.pop()
        raise


def require_real_params(op: str, group: Dict[str, Any]) -> None:
    """A TypeError for a complex parameter: the optimizers' arithmetic (squares, SVDs,
    M-FAC's dots) is real, and would drop or mistreat the imaginary part."""
    for index, param in enumerate(group["params"]):
        if param.is_complex():
            raise TypeError(f"{op}: complex parameters are not supported; parameter {index} of the group has dtype "
                            f"{param.dtype} (optimize its real and imaginary parts as separate real parameters)")


def check_lr(op: str, value, low_open: bool = False) -> Union[float, torch.Tensor]:
    """A group's ``lr`` as the group keeps it: a number, as a float, or a one-element real
    floating-point tensor, kept as given (torch's optimizers accept one, and torch's
    ``LRScheduler`` then fills it in place: a float copy would freeze the schedule).  Its
    value is checked now and again at every step (:func:`current_lr`).  ValueError naming
    ``lr`` otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise ValueError(f"{op}: lr must be a number or a one-element floating-point tensor; got a tensor of "
                             f"shape {tuple(value.shape)} and dtype {value.dtype}")
        _require_lr(op, value.item(), low_open)
        return value
    return _require_lr(op, value, low_open)


#: Learning rates at or beyond float32's largest value: the steps' scalars are float32
#: for float32 parameters (torch raised "value cannot be converted to type float without
#: overflow", naming nothing) and the updates inf.
_MAX_LR = float(torch.finfo(torch.float32).max)


def _require_lr(op: str, value, low_open: bool) -> float:
    lr = require_number(op, "lr", value, 0.0, low_open=low_open)
    if lr >= _MAX_LR:
        raise ValueError(f"{op}: lr must be below float32's largest value ({_MAX_LR:.4g}); got {value!r}")
    return lr


def current_lr(op: str, group: Dict[str, Any], low_open: bool = False) -> float:
    """The group's learning rate now, as a float, checked at every step: torch's LR
    schedulers write it (a float, or a tensor filled in place) after the constructor's
    check (a LambdaLR returning NaN made every parameter NaN, silently)."""
    lr = group["lr"]
    return _require_lr(op, lr.item() if isinstance(lr, torch.Tensor) else lr, low_open)
