"""Whether a module may be read instead of called: the fused paths (``LoRALinear``, the
PEFT backend) take a base layer's weight and bias and hand them to one kernel, which is
right only when the module's forward is exactly its class's, on plain tensors."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["PLAIN_TENSORS", "plain_module", "no_global_hooks", "plain_linear"]

#: Parameter types a fused op may read (FakeTensor: export and compile tracing).  A torchao
#: quantized weight or a DTensor has its own ``F.linear``.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter, FakeTensor)


def plain_module(module: torch.nn.Module, *types: type) -> bool:
    """A module of exactly one of ``types`` (no subclass: a QAT or fake-quant swap's forward
    differs) that runs as its class's forward: no hooks of its own (spectral_norm's and the
    old weight_norm's pre-hooks recompute W; user hooks; accelerate's offload replaces
    ``forward``) and plain tensors for its parameters.  A few attribute reads: this runs for
    every adapted layer at every forward."""
    if (type(module) not in types or "forward" in module.__dict__ or module._forward_pre_hooks
            or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks):
        return False
    for tensor in module._parameters.values():
        if tensor is not None and type(tensor) not in PLAIN_TENSORS:
            return False
    return True


def no_global_hooks() -> bool:
    """No global module hooks (``register_module_forward_hook`` and kin), which a module's
    call would run."""
    hooks = torch.nn.modules.module
    return not (hooks._global_forward_pre_hooks or hooks._global_forward_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def plain_linear(base: torch.nn.Module) -> bool:
    """An ``nn.Linear`` whose call is exactly ``x W^T + b`` (:func:`plain_module`, no global hooks)."""
    return plain_module(base, torch.nn.Linear) and no_global_hooks()
