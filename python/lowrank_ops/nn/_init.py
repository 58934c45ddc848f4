"""Parameter initialisation shared by the layers."""

from __future__ import annotations

import math
from typing import Optional

import torch


def fan_in_bound(fan_in: int) -> float:
    """``1 / sqrt(fan_in)``: the bound of ``kaiming_uniform_(a=sqrt(5))`` (nn.Linear's and
    PEFT's init of lora_A); 0 for no inputs, as torch's own init."""
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def uniform_(tensor: torch.Tensor, bound: float, generator: Optional[torch.Generator]) -> None:
    """Fill ``tensor`` with U(-bound, bound) in place, drawn from ``generator``.

    A generator of another device than the tensor's (a CPU generator seeding a CUDA layer)
    draws on its own device and the values are copied over: the same seed gives the same
    layer on every device.
    """
    if generator is None or generator.device.type == tensor.device.type:
        tensor.uniform_(-bound, bound, generator=generator)
    else:
        drawn = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
        tensor.copy_(drawn.uniform_(-bound, bound, generator=generator))
