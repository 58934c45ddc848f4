"""Parameter initialisation shared by the layers."""

from __future__ import annotations

from typing import Optional

import torch


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
