"""Whether a module may be read instead of called: the fused paths (``LoRALinear``, the
PEFT backend) take a base layer's weight and bias and hand them to one kernel, which is
right only when the module's forward is exactly its class's, on plain tensors."""
from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..ops.lora import adapter_term, add_adapter, composed_dropout

__all__ = ["PLAIN_TENSORS", "plain_module", "no_global_hooks", "plain_linear", "through_base"]

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


def through_base(base_layer: torch.nn.Module, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scale: float = 1.0, gate: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``base_layer(x) + scale ((dropout(x) A^T) * g) B^T`` in torch ops, with the base layer
    called: the adapters' forward for a base the fused ops may not read (:func:`plain_linear`
    false: reading W and b skipped its hooks or forward, 0.64 off with a hook zeroing the
    base output).  The adapter term as :func:`~lowrank_ops.ops.lora.lora_linear`'s composed
    path computes it (the same dropout mask for the same default-generator state)."""
    return add_adapter(base_layer(x), adapter_term(composed_dropout(x, dropout_p, None), lora_A, lora_B, gate, scale))
