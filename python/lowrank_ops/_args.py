"""Type checks of public arguments: a clear TypeError naming the argument instead of an
AttributeError from deep inside an op."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch


def require_tensors(op: str, **named) -> None:
    """Raises TypeError for the first of ``named`` (name=value) that is not a tensor."""
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor; got {type(value).__name__}")


def is_integer(value) -> bool:
    """Whether ``value`` is a Python or NumPy integer (bools excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def require_int(op: str, name: str, value, minimum: int = 1) -> int:
    """``value`` as an int: a Python or NumPy integer (not a bool) ``>= minimum``; a
    ValueError naming the argument and its value otherwise."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{op}: {name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


#: The scalar types accepted where a number is expected: Python's and NumPy's (a
#: ``np.float32`` from a config or a NumPy computation), never a bool.
REAL_TYPES = (int, float, np.integer, np.floating)


def is_real_number(value) -> bool:
    """Whether ``value`` is a Python or NumPy real scalar (bools excluded)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, REAL_TYPES)


def require_finite_number(op: str, name: str, value) -> float:
    """``value`` as a float: a finite Python or NumPy number (TypeError / ValueError otherwise)."""
    if not is_real_number(value):
        raise TypeError(f"{op}: {name} must be a number; got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # not math.isfinite: torch.compile traces comparisons, not it
        raise ValueError(f"{op}: {name} must be finite; got {value}")
    return float(value)


def require_number(op: str, name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high)`` (``(low, high)`` with ``low_open``);
    a ValueError naming the setting otherwise (NaN, inf and non-numbers included)."""
    ok = (is_real_number(value) and -math.inf < value < math.inf
          and (value > low if low_open else value >= low) and value < high)
    if not ok:
        if high < math.inf:
            wanted = f"in {'(' if low_open else '['}{low:g}, {high:g})"
        else:
            wanted = f"{'>' if low_open else '>='} {low:g} and finite"
        raise ValueError(f"{op}: {name} must be {wanted}; got {value!r}")
    return float(value)



def require_state(op: str, state, owner: str, required, optional=()) -> None:
    """A ``load_state_dict`` argument: a dict holding ``required`` keys (TypeError / ValueError
    naming what is wrong and the keys ``owner.state_dict()`` gives), checked before anything
    is loaded (an empty dict raised KeyError, after earlier keys had been taken)."""
    if not isinstance(state, dict):
        raise TypeError(f"{op}: state must be a dict from {owner}.state_dict(); got {type(state).__name__}")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"{op}: state lacks {missing}; expected {owner}.state_dict()'s keys "
                         f"{list(required) + list(optional)}, got {sorted(map(str, state))}")


def require_generator_state(op: str, name: str, state):
    """``state`` when it is None or a ``torch.Generator.get_state()`` tensor (uint8); a TypeError
    naming it otherwise (a resumed run's sketches or samples follow from it)."""
    if state is not None and not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8):
        raise TypeError(f"{op}: {name} must be a torch.uint8 tensor (Generator.get_state()) or None; got "
                        f"{type(state).__name__}")
    return state


def generator_state(generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """``generator.get_state()``, or None without a generator (what the state dicts keep)."""
    return None if generator is None else generator.get_state()


def restore_generator(generator: Optional[torch.Generator], state: Optional[torch.Tensor]) -> None:
    """Sets ``generator``'s state from a checked :func:`require_generator_state` value; nothing
    when either is None (a state saved without a generator, or an object without one).  The
    state goes back to the CPU first: ``torch.load(map_location="cuda")`` moves it."""
    if generator is not None and state is not None:
        generator.set_state(state.cpu())


def require_fits_in_memory(op: str, name: str, count: int, bytes_each: float, what: str, hint: str = "") -> None:
    """MemoryError naming ``name`` when ``count`` items of ``bytes_each`` bytes exceed this
    machine's physical memory: a typo-sized count (num=10**12) otherwise filled memory
    for hours, or (with memory overcommit) was killed while filling."""
    needed = count * bytes_each
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise MemoryError(f"{op}: {name} = {count} {what} need {needed / 2**30:.3g} GiB, more than this machine's "
                          f"{available / 2**30:.3g} GiB{hint}")


def require_values(op: str, what: str, tensor: torch.Tensor) -> None:
    """ValueError when ``tensor`` is on the meta device: ``op`` reads its values (an SVD of a
    weight), which a model built on meta (low-memory loading) does not have yet; torch's own
    error there, "Tensor.item() cannot be called on meta tensors", names nothing."""
    if tensor.is_meta:
        raise ValueError(f"{op}: {what} is on the meta device and has no values, which {op} reads; load the "
                         "weights first (model.to_empty(device=...), then load_state_dict)")


def require_generator_type(op: str, name: str, generator) -> None:
    """TypeError naming ``name`` unless ``generator`` is None or a ``torch.Generator`` (an int
    seed failed later with "'int' object has no attribute 'device'")."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: {name} must be a torch.Generator or None; got {type(generator).__name__}")


def require_generator(op: str, name: str, generator, device: torch.device, what: str = "the weights") -> None:
    """Checks that ``generator`` is None or a ``torch.Generator`` of ``device``'s type (a
    generator is device-specific: torch's samplers reject a CPU generator for CUDA tensors,
    deep inside the first call that draws).  TypeError / ValueError naming the argument."""
    require_generator_type(op, name, generator)
    if generator is None:
        return
    device = torch.device(device)
    if generator.device.type != device.type and device.type != "meta":  # (meta draws take a CPU generator)
        raise ValueError(f"{op}: {name} is a {generator.device.type} generator; expected a {device.type} generator "
                         f"for {what} on {device} (e.g. torch.Generator(device={str(device)!r}))")
