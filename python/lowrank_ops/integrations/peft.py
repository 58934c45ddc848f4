"""Use lowrank_ops' fused LoRA / DoRA ops as the backend of PEFT's LoRA for ``nn.Linear``.

One call::

    from peft import LoraConfig, get_peft_model
    from lowrank_ops.integrations.peft import use_lowrank_ops

    config = use_lowrank_ops(LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(model, config)

How: PEFT's experimental custom-module mapping (``LoraConfig._register_custom_module``,
dispatched before PEFT's own layers) maps ``nn.Linear`` to :class:`LowrankLoraLinear`, a
subclass of ``peft.tuners.lora.Linear``.  Everything but the forward is PEFT's own code:
parameter names and layout (``lora_A.<adapter>.weight``, ``lora_B``, ``scaling``,
``lora_dropout``, ``lora_magnitude_vector``), initialization, merge/unmerge, adapter
management, saving.  So an adapter trained with this backend saves to the same files and
loads into plain PEFT (and vice versa).  PEFT does not save the mapping: call
:func:`use_lowrank_ops` on the config again before ``PeftModel.from_pretrained(...,
config=config)`` to keep the backend when loading.

The forward runs :func:`lowrank_ops.ops.lora_linear` (vanilla LoRA) or
:func:`lowrank_ops.ops.dora_linear` (``use_dora=True``) when the call is the common case:
one active adapter, not merged, adapters enabled, no ``adapter_names`` or variant
arguments, a plain ``nn.Linear`` base whose weight has x's dtype (under ``torch.autocast``
any dtype but float64: the ops cast x, the weight and the factors to the autocast dtype,
as autocast casts PEFT's ``F.linear`` calls), dropout an ``nn.Dropout`` or
``nn.Identity``, and no other LoRA variant.  The scalings may be the 0-d tensors of PEFT's
``prepare_model_for_compiled_hotswap`` (LoRA only; DoRA with tensor scalings runs PEFT's
forward).  Anything else (mixed batches, several active adapters, other variants,
quantized bases) goes to PEFT's own forward unchanged, so behaviour never differs, only
speed.  Differences in numerics: the adapter term is accumulated into the base output in
place (float32 accumulation, one rounding) and DoRA's row norm is floored at 1e-6 (PEFT
0.21.2 returns inf/NaN for zero-norm rows); the dropout masks come from a different
random stream than ``nn.Dropout``'s.

Tested with peft 0.21.2 and torch 2.13.0 (tests/test_peft_integration.py).
"""
from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora.variants import DoraLinearVariant

from .._autocast import autocast_dtype
from ..ops.dora import dora_linear
from ..ops.lora import lora_linear

__all__ = ["LowrankLoraLinear", "use_lowrank_ops"]


class LowrankLoraLinear(PeftLoraLinear):
    """PEFT's ``lora.Linear`` with the forward on lowrank_ops' fused ops (see the module docstring)."""

    def _fast_adapter(self, x: torch.Tensor, args, kwargs):
        """The active adapter's name when the fused path applies, else None."""
        if args or any(value is not None for value in kwargs.values()):
            return None
        if self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        base = self.get_base_layer()
        if type(base) is not torch.nn.Linear or self.lora_bias.get(name, False):
            return None
        if autocast_dtype(x) is None:
            if x.dtype != base.weight.dtype:
                return None
        elif torch.float64 in (x.dtype, base.weight.dtype):  # autocast does not cast float64: PEFT's error
            return None
        variant = self.lora_variant.get(name)
        if variant is not None and not isinstance(variant, DoraLinearVariant):
            return None
        # PEFT's compiled hotswap makes the scalings 0-d tensors: lora_linear reads them at
        # run time; dora_linear's row norm takes a number (reading it would sync and recompile).
        if variant is not None and isinstance(self.scaling[name], torch.Tensor):
            return None
        if not isinstance(self.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity)):
            return None
        # Adapters in the weight's dtype or float32 (what the fused ops take); others, e.g.
        # float64 adapters on a float32 model, run PEFT's own path.
        dtype = self.lora_A[name].weight.dtype
        if dtype not in (x.dtype, torch.float32) or self.lora_B[name].weight.dtype != dtype:
            return None
        if variant is not None and self.lora_magnitude_vector[name].weight.dtype != dtype:
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's LoRA (or DoRA) forward, on the fused ops when they apply.

        Parameters
        ----------
        x : Tensor[..., in_features]
            In the base weight's dtype (under ``torch.autocast``: any but float64).
        *args, **kwargs
            PEFT's extra forward arguments (e.g. ``adapter_names`` for mixed batches).

        Returns
        -------
        Tensor[..., out_features]
            In x's dtype (under autocast: the autocast dtype).  One active adapter, no
            extra arguments, an ``nn.Linear`` base without ``fan_in_fan_out`` or an
            adapter bias, unmerged, dropout or none, and adapters in the weight's dtype or
            float32: :func:`~lowrank_ops.ops.lora_linear` (or
            :func:`~lowrank_ops.ops.dora_linear` for DoRA with number scalings); anything
            else: PEFT's own forward, unchanged.
        """
        name = self._fast_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        if name in self.lora_variant:  # DoRA
            magnitude = self.lora_magnitude_vector[name].weight
            return dora_linear(x, base.weight, lora_A, lora_B, magnitude, base.bias, scale=self.scaling[name],
                               dropout_p=p)
        return lora_linear(x, base.weight, lora_A, lora_B, base.bias, scale=self.scaling[name], dropout_p=p)

    def __repr__(self) -> str:
        return "lowrank_ops." + super().__repr__()


def use_lowrank_ops(config: LoraConfig) -> LoraConfig:
    """Makes PEFT build :class:`LowrankLoraLinear` for every ``nn.Linear`` target of ``config``.

    Parameters
    ----------
    config : peft.LoraConfig
        Modified in place (its custom-module mapping) and returned.

    Returns
    -------
    peft.LoraConfig
        The same config, for chaining into ``get_peft_model``.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"use_lowrank_ops: config must be a peft.LoraConfig; got {type(config).__name__}")
    if config.fan_in_fan_out:
        raise ValueError("use_lowrank_ops: fan_in_fan_out=True targets transformers' Conv1D, not nn.Linear")
    config._register_custom_module({torch.nn.Linear: LowrankLoraLinear})
    return config
