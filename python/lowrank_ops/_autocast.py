"""torch.autocast at the ops' entry points (the LoRA family: lora_linear, dora_linear, ...).

Under autocast, the aten ops inside an op's implementation change their output dtype (a
float32 ``x @ W.T`` returns bfloat16 under CPU autocast), so an op composed of them would
meet mixed dtypes (backward: "expected m1 and m2 to have the same dtype"), and a kernel
reading raw pointers would read a tensor in the wrong dtype.  :func:`autocast_entry`
handles it once, at the public entry point, the way autocast handles ``F.linear``: the
operand tensors are cast to the autocast dtype (float64 tensors and other devices' tensors
excepted, as torch's ``cached_cast``), and the op runs with autocast disabled, so its
implementation and its autograd Function see one dtype.  The casts are differentiable:
float32 parameters get float32 gradients.  :func:`autocast_off_backward` does the same for
the Functions' backward, which runs inside autocast when ``backward()`` is called in an
autocast region (on the CPU, in the caller's thread).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Optional

import torch

# torch >= 2.4 (the package's floor) takes the device type in both.
_is_enabled, _dtype = torch.is_autocast_enabled, torch.get_autocast_dtype

# The device types the ops run on (autocast knows no "meta", which fake-impl tests use).
_DEVICE_TYPES = ("cpu", "cuda")


def autocast_dtype(tensor) -> Optional[torch.dtype]:
    """The autocast dtype of ``tensor``'s device type while autocast is enabled there, else None."""
    if not isinstance(tensor, torch.Tensor):
        return None
    device_type = tensor.device.type
    if device_type not in _DEVICE_TYPES or not _is_enabled(device_type):
        return None
    return _dtype(device_type)


def _cast(value, dtype: torch.dtype, device_type: str):
    """``value`` in ``dtype`` if autocast would cast it for a matmul (a floating tensor on
    ``device_type``, not float64), else unchanged."""
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == device_type):
        return value.to(dtype)
    return value


def autocast_entry(*operands: str) -> Callable:
    """Decorator of an op's public entry point for torch.autocast.

    Under autocast on the device type of the first argument, the arguments named in
    ``operands`` (positional or keyword) are cast to the autocast dtype as ``F.linear``'s
    operands would be, and the op runs inside ``torch.autocast(device_type, enabled=False)``.
    Other arguments (scales, routing, index tensors) are passed unchanged.  With no
    ``operands`` (weight-only ops such as merging and row norms) nothing is cast: the op
    runs in its inputs' precision, with autocast disabled.  Without autocast the call is
    the op's own, plus one ``torch.is_autocast_enabled`` check.  Traceable by
    ``torch.compile(fullgraph=True)``.
    """
    def decorate(op: Callable) -> Callable:
        parameters = list(inspect.signature(op).parameters)
        positions = {name: parameters.index(name) for name in operands}

        @functools.wraps(op)
        def entry(*args, **kwargs):
            dtype = autocast_dtype(args[0]) if args else None
            if dtype is None:
                return op(*args, **kwargs)
            device_type = args[0].device.type
            args = list(args)
            for name, index in positions.items():
                if index < len(args):
                    args[index] = _cast(args[index], dtype, device_type)
                elif name in kwargs:
                    kwargs[name] = _cast(kwargs[name], dtype, device_type)
            with torch.autocast(device_type, enabled=False):
                return op(*args, **kwargs)

        return entry

    return decorate


def without_autocast(device: torch.device):
    """A context in which autocast is off for ``device``'s type; a no-op context when
    autocast is not enabled there (entering ``torch.autocast`` costs tens of microseconds,
    paid 15 times per rsvd call).

    For the factorizations (rsvd, range finder, CholeskyQR2, error estimates, effective
    rank): under an enclosing ``torch.autocast`` their products would run in bfloat16 or
    float16, which costs them their accuracy (Gram matrices square the condition number)
    and changes their output dtypes; they choose their own precision (``sketch_dtype``).
    """
    device_type = torch.device(device).type
    if device_type not in _DEVICE_TYPES or not _is_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_off_backward(backward: Callable) -> Callable:
    """Decorator of an autograd Function's ``backward(ctx, *grads)``: runs it with autocast
    disabled on the device type of the first gradient, as its forward ran (see
    :func:`autocast_entry`), so that ``backward()`` called inside an autocast region computes
    the same gradients as outside it."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        device_type = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), None)  # None: no grads
        if device_type not in _DEVICE_TYPES or not _is_enabled(device_type):
            return backward(ctx, *grads)
        with torch.autocast(device_type, enabled=False):
            return backward(ctx, *grads)

    return run
