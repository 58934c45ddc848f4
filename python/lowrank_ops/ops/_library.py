"""The one ``torch.library`` namespace that every op family defines its ops in."""
from typing import Callable

import torch

NAMESPACE = "lowrank_ops"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def current_stream(tensor: torch.Tensor) -> int:
    """The raw ``cudaStream_t`` (as an int) that kernels for ``tensor`` must launch on."""
    return torch.cuda.current_stream(tensor.device).cuda_stream


def eager_or_op(name: str, impl: Callable) -> Callable:
    """The op ``torch.ops.lowrank_ops.<name>`` while torch.compile traces (its fake impl is
    what the compiler sees, and a raw pointer cannot be taken from a fake tensor), else
    ``impl``, its implementation, called directly: eager calls skip the dispatcher (5-40 us
    a call: ~5 of lora_linear's 35 us at 16 x 64 x 64, ~40 of a 180 us SpMV)."""
    return getattr(torch.ops.lowrank_ops, name) if torch.compiler.is_compiling() else impl
