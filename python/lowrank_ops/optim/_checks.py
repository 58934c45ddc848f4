"""Validation of the optimizers' per-group settings."""
from __future__ import annotations

import math


def check_number(where: str, name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high)`` (``(low, high)`` with ``low_open``);
    a clear ValueError naming the setting otherwise (NaN and inf included)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value < high)
    if not ok:
        if high < math.inf:
            wanted = f"in {'(' if low_open else '['}{low:g}, {high:g})"
        else:
            wanted = f"{'>' if low_open else '>='} {low:g} and finite"
        raise ValueError(f"{where}: {name} must be {wanted}; got {value!r}")
    return float(value)
