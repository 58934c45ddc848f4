"""Type checks of public arguments: a clear TypeError naming the argument instead of an
AttributeError from deep inside an op."""
from __future__ import annotations

import math

import torch


def require_tensors(op: str, **named) -> None:
    """Raises TypeError for the first of ``named`` (name=value) that is not a tensor."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor; got {type(value).__name__}")


def require_finite_number(op: str, name: str, value) -> float:
    """``value`` as a float: a finite Python number (TypeError / ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python number; got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # not math.isfinite: torch.compile traces comparisons, not it
        raise ValueError(f"{op}: {name} must be finite; got {value}")
    return float(value)
