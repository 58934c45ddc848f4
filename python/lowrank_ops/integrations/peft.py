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
forward).  PEFT's mixed batches (``adapter_names=[...]``, one name per sample,
``"__base__"`` for none) run :func:`lowrank_ops.ops.lora_linear_multi` when nothing needs
a gradient (PEFT's mixed batch is for inference), the named adapters are vanilla LoRA
with number scalings, all in x's dtype or all float32 (PEFT's default
``autocast_adapter_dtype=True`` on a half model), x and the weight as for one adapter
(autocast included), and dropout is off: one batched call instead of PEFT's
gather and two matmuls per adapter; the padded adapter stacks are cached, keyed by the
factors' version counters, so they are rebuilt only when an adapter changes or another set
of adapters is named.  Anything else (several active adapters, other variants, quantized
bases, mixed batches that need gradients) goes to PEFT's own forward unchanged, so
behaviour never differs, only speed.  Differences in numerics: the adapter term is
accumulated into the base output with float32 accumulation and one rounding (PEFT's mixed
batch rounds each adapter's term to the output dtype before adding it: two roundings)
and a zero DoRA row norm is replaced by 1e-6 (PEFT
0.21.2 returns inf/NaN for zero-norm rows); the dropout masks come from a different
random stream than ``nn.Dropout``'s.

Tested with peft 0.21.2 and torch 2.13.0 (tests/test_peft_integration.py).
"""
from __future__ import annotations

import warnings
from typing import Any, List, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.variants import DoraLinearVariant

from .._autocast import autocast_dtype
from .._optimizer_steps import optimizer_steps
from ..nn._plain import PLAIN_TENSORS, plain_linear, plain_module
from ..nn.lora_multi import route_rows
from ..ops._library import composed_path
from ..ops.dora import dora_linear
from ..ops.lora import lora_linear
from ..ops.lora_multi import lora_linear_multi

__all__ = ["LowrankLoraLinear", "use_lowrank_ops"]


class LowrankLoraLinear(PeftLoraLinear):
    """PEFT's ``lora.Linear`` with the forward on lowrank_ops' fused ops (see the module docstring)."""

    def __init__(self, base_layer, adapter_name: str, *args, **kwargs):
        # PEFT sets the shared config's fan_in_fan_out on meeting a Conv1D target and resets it
        # for nn.Linear ones in its own dispatch, which this class replaces: a Conv1D met
        # first left the Linear transposed (merges off by ~1, DoRA's output off by 0.19).
        config = kwargs.get("config", args[0] if args else None)  # PEFT >= 0.18 reads the flag from it
        if getattr(config, "fan_in_fan_out", False) or kwargs.get("fan_in_fan_out"):  # older PEFT passes it
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.")  # PEFT's own warning, which its dispatch gave
            if getattr(config, "fan_in_fan_out", False):
                config.fan_in_fan_out = False
            if kwargs.get("fan_in_fan_out"):
                kwargs["fan_in_fan_out"] = False
        super().__init__(base_layer, adapter_name, *args, **kwargs)

    def _fused_dtypes(self, x: torch.Tensor) -> bool:
        """Whether x and the base weight suit the fused ops: one dtype, or under
        torch.autocast any but float64 (autocast does not cast float64: PEFT's error)."""
        weight = self.get_base_layer().weight
        if autocast_dtype(x) is None:
            return x.dtype == weight.dtype
        return torch.float64 not in (x.dtype, weight.dtype)

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
        if not (self._plain_base() and self._plain_adapter(name)) or self.lora_bias.get(name, False):
            return None
        if not self._fused_dtypes(x):
            return None
        variant = self.lora_variant.get(name)
        if variant is not None and not isinstance(variant, DoraLinearVariant):
            return None
        # PEFT's compiled hotswap makes the scalings 0-d tensors: lora_linear reads them at
        # run time; dora_linear's row norm takes a number (reading it would sync and recompile).
        if variant is not None and isinstance(self.scaling[name], torch.Tensor):
            return None
        dropout = self.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p >= 1.0:
            return None  # the adapter term is zero: PEFT's path (the fused ops take p < 1)
        # Adapters in the weight's dtype or float32 (what the fused ops take); others, e.g.
        # float64 adapters on a float32 model, run PEFT's own path.
        dtype = self.lora_A[name].weight.dtype
        if dtype not in (x.dtype, torch.float32) or self.lora_B[name].weight.dtype != dtype:
            return None
        if variant is not None and self.lora_magnitude_vector[name].weight.dtype != dtype:
            return None
        return name

    def _plain_base(self) -> bool:
        """The base layer wrapped directly (in a PeftMixedModel it may be another adapter's
        layer, e.g. LoHa, whose forward the fused path would skip: 0.35 off), a plain
        ``nn.Linear`` (:func:`~lowrank_ops.nn._plain.plain_linear`)."""
        return plain_linear(self.base_layer)  # (not get_base_layer(): it descends through wrapping layers)

    def _plain_adapter(self, name: str) -> bool:
        """Whether the fused ops may read adapter ``name``'s tensors instead of calling its
        modules: ``lora_A``, ``lora_B`` plain ``nn.Linear`` modules, the dropout a plain
        ``nn.Dropout`` or ``nn.Identity``, DoRA's magnitude a plain ``DoraLinearLayer`` (their
        hooks or a QAT swap's forward were ignored: 0.8-5.4 off).  The base: :meth:`_plain_base`."""
        linear, dropout = torch.nn.Linear, (torch.nn.Dropout, torch.nn.Identity)
        if not (plain_module(self.lora_A[name], linear) and plain_module(self.lora_B[name], linear)
                and plain_module(self.lora_dropout[name], *dropout)):
            return False
        magnitudes = self.lora_magnitude_vector
        return name not in magnitudes or plain_module(magnitudes[name], DoraLinearLayer)

    def _fast_mixed_batch(self, x: torch.Tensor, args, kwargs) -> Optional[List[str]]:
        """The sorted adapters named by a mixed batch when lora_linear_multi applies, else None."""
        names = kwargs.get("adapter_names")
        if args or names is None or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
            return None
        if composed_path():  # torch.func or forward mode: the stacks are built without autograd (and cached)
            return None
        base = self.get_base_layer()
        if self.disable_adapters or self.merged or self.fan_in_fan_out or not self._fused_dtypes(x) or x.dim() < 2:
            return None
        used = sorted({name for name in names if name in self.lora_A})  # PEFT skips unknown names too
        if not used or not self._plain_base() or not all(self._plain_adapter(name) for name in used):
            return None
        # One stack holds every named adapter: all in x's dtype, or all float32 (PEFT's
        # default autocast_adapter_dtype=True on a half model); mixtures run PEFT's path.
        adapter_dtypes = {t.dtype for name in used for t in (self.lora_A[name].weight, self.lora_B[name].weight)}
        if len(adapter_dtypes) > 1 or not adapter_dtypes <= {x.dtype, torch.float32}:
            return None
        for name in used:
            dropout = self.lora_dropout[name]
            factors = (self.lora_A[name].weight, self.lora_B[name].weight)
            if (name in self.lora_variant or self.lora_bias.get(name, False)
                    or isinstance(self.scaling[name], torch.Tensor)
                    or (torch.is_grad_enabled() and any(t.requires_grad for t in factors))
                    or (isinstance(dropout, torch.nn.Dropout) and dropout.p != 0 and dropout.training)):
                return None
        if torch.is_grad_enabled() and (x.requires_grad or base.weight.requires_grad):
            return None
        return used

    def _adapter_stacks(self, used: List[str]):
        """``(A_stack, B_stack, ranks, scales)`` of the named adapters, rebuilt only when one changed."""
        factors = [(self.lora_A[name].weight, self.lora_B[name].weight) for name in used]
        key = tuple((name, A.data_ptr(), A._version, B.data_ptr(), B._version, A.dtype, A.device, self.scaling[name])
                    for name, (A, B) in zip(used, factors)) + (optimizer_steps(),)  # fused steps skip _version
        cached = getattr(self, "_lowrank_stacks", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        A0, B0 = factors[0]
        r_max = max(A.shape[0] for A, _ in factors)
        A_stack = A0.new_zeros(len(used), r_max, A0.shape[1])
        B_rank_major = B0.new_zeros(len(used), r_max, B0.shape[0])  # the layout MultiLoRALinear keeps
        with torch.no_grad():
            for a, (A, B) in enumerate(factors):
                A_stack[a, :A.shape[0]] = A
                B_rank_major[a, :B.shape[1]] = B.T
        # Routing constants stay on the host: lora_linear_multi checks them there and copies
        # them to the GPU with the segments, without waiting for the device.
        ranks = torch.tensor([A.shape[0] for A, _ in factors])
        scales = torch.tensor([float(self.scaling[name]) for name in used], dtype=torch.float64)
        stacks = (A_stack, B_rank_major.transpose(1, 2), ranks, scales)
        # The factors' storages are kept with the key (detached aliases, not the Parameters,
        # whose .data may be rebound: the old storage freed and its address reused, and the
        # key matched stale stacks, 0.17 off): while they live, no new factor can take their
        # memory, so equal data pointers and versions mean the same tensors.
        self._lowrank_stacks = (key, stacks, [(A.detach(), B.detach()) for A, B in factors])
        return stacks

    def _mixed_batch_forward_fused(self, x: torch.Tensor, names: List[str], used: List[str]) -> torch.Tensor:
        """PEFT's mixed batch through one :func:`~lowrank_ops.ops.lora_linear_multi` call."""
        A_stack, B_stack, ranks, scales = self._adapter_stacks(used)
        index = {name: a for a, name in enumerate(used)}
        rows_per_sample = x[0].numel() // x.shape[-1]
        sample_ids = torch.tensor([index.get(name, -1) for name in names], dtype=torch.int64)
        row_ids = sample_ids.repeat_interleave(rows_per_sample)  # grouped on the host (route_rows)
        base = self.get_base_layer()

        def run(rows, offsets, segment_ids):
            return lora_linear_multi(rows, base.weight, A_stack, B_stack, offsets, segment_ids, ranks=ranks,
                                     scales=scales, bias=base.bias)

        return route_rows(x.reshape(-1, x.shape[-1]), row_ids, run).reshape(*x.shape[:-1], base.out_features)

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
            :func:`~lowrank_ops.ops.dora_linear` for DoRA with number scalings); a mixed
            batch (``adapter_names``) with nothing to differentiate:
            :func:`~lowrank_ops.ops.lora_linear_multi`; anything else: PEFT's own forward,
            unchanged.
        """
        if kwargs.get("adapter_names") is not None:
            self._check_forward_args(x, *args, **kwargs)  # PEFT's own errors (lengths, merged, DoRA)
            used = self._fast_mixed_batch(x, args, kwargs)
            if used:
                return self._mixed_batch_forward_fused(x, kwargs["adapter_names"], used)
            return super().forward(x, *args, **kwargs)
        name = self._fast_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        if name in self.lora_variant:  # DoRA
            if not self.training:  # PEFT's DoRA asks the layer itself (its dropout may disagree)
                p = 0.0
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
    # (fan_in_fan_out=True is for transformers' Conv1D targets, which keep PEFT's layer; a
    # saved config may carry it from one: nn.Linear targets reset it, as PEFT does.)
    if getattr(config, "target_parameters", None):
        raise ValueError("use_lowrank_ops: target_parameters (PEFT's ParamWrapper on nn.Parameter targets) is not "
                         f"supported; got {config.target_parameters} (use target_modules, or plain PEFT)")
    config._register_custom_module({_ExactLinear: LowrankLoraLinear})
    return config


class _ExactLinearType(type):
    def __instancecheck__(cls, instance) -> bool:
        # A plain-tensor weight too: a torchao-quantized nn.Linear keeps its class and swaps
        # the weight for a tensor subclass, and must get PEFT's torchao layer (its merge
        # dequantizes and requantizes), which PEFT dispatches after the custom modules.
        return type(instance) is torch.nn.Linear and type(instance.weight) in PLAIN_TENSORS


class _ExactLinear(metaclass=_ExactLinearType):
    """The custom-module key: ``torch.nn.Linear`` itself, not its subclasses.  PEFT matches
    the keys with ``isinstance`` before its own dispatchers, and bitsandbytes' ``Linear8bitLt``
    / ``Linear4bit`` (QLoRA) subclass ``nn.Linear``: they got this layer instead of PEFT's
    bnb layers, and ``merge_and_unload`` then failed on the quantized weights."""
