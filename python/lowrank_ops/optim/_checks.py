"""Validation of the optimizers' per-group settings."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch


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
