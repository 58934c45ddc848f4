"""Shared base of the adapters that train only a per-rank diagonal of a frozen factorization.

``y = base(x) + ((x A^T) * g) B^T`` with frozen buffers ``lora_A [r, in]`` and
``lora_B [out, r]`` and a trainable per-rank factor ``g [r]`` (the layer decides how ``g``
is formed from its parameters).  This is exactly :func:`lowrank_ops.ops.lora_linear`'s
gated path (SoRA's gate) with scale 1: the forward and backward are the fused op's, which
computes gradients only for what requires grad (here ``g``, and x), so the frozen factors
cost neither a gradient GEMM nor optimizer state.
"""
from __future__ import annotations

import abc
from typing import Optional

import torch

from .._args import is_integer
from .._finite import all_finite
from ..ops.lora import lora_linear
from ._adapter_base import MergeableAdapter, adapter_dtype, checkpoint_unmerged
from ._plain import plain_linear, through_base

__all__ = ["DiagonalAdapterLinear", "check_base_and_rank"]


def check_base_and_rank(where: str, base_layer, r, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Validates ``base_layer`` (an nn.Linear with a finite weight; a meta weight has no values
    to check), ``r`` (an int in ``[1, min(in, out)]``) and ``dtype`` (None, the weight's or
    float32); returns the adapter dtype."""
    if not isinstance(base_layer, torch.nn.Linear):
        raise TypeError(f"{where}: base_layer must be a torch.nn.Linear; got {type(base_layer).__name__}")
    limit = min(base_layer.in_features, base_layer.out_features)
    if not is_integer(r) or not 1 <= r <= limit:
        raise ValueError(f"{where}: r must be an int in [1, min(in_features, out_features)] = [1, {limit}]; "
                         f"got {r!r}")
    weight = base_layer.weight
    dtype = adapter_dtype(where, weight, dtype)
    if not weight.is_meta and not all_finite(weight):  # the factorization would fail or spread NaN (meta: no values)
        raise ValueError(f"{where}: the base weight holds {int((~torch.isfinite(weight)).sum())} non-finite "
                         f"entries; its factorization needs a finite weight")
    return dtype


class DiagonalAdapterLinear(MergeableAdapter):
    """``base(x) + ((x A^T) * g) B^T`` around a frozen ``nn.Linear``; subclasses set the
    buffers ``lora_A [r, in]``, ``lora_B [out, r]`` and define :meth:`_gate` (``g [r]``, a
    differentiable function of their trainable parameters)."""

    def _setup(self, base_layer: torch.nn.Linear, r: int) -> None:
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = r
        self.scaling = 1.0
        self.merged = False
        checkpoint_unmerged(self)  # the saved form is always the unmerged one

    @abc.abstractmethod
    def _gate(self) -> torch.Tensor:
        """``g [r]``, the per-rank factor, in the buffers' dtype (each subclass forms it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer plus the adapter (or, after :meth:`merge`, the merged base layer).

        Parameters
        ----------
        x : Tensor[..., in_features]
            In the base weight's dtype (float32, float64, float16 or bfloat16) and on its
            device.

        Returns
        -------
        Tensor[..., out_features]
            ``base(x) + ((x A^T) * g) B^T`` (:func:`lowrank_ops.ops.lora_linear` with
            ``gate=g``), in x's dtype; differentiable in x and the trainable parameters.
        """
        if self.merged:
            return self.base_layer(x)
        if not plain_linear(self.base_layer):  # hooks, a subclass's forward: call it (nn/_plain.py)
            return through_base(self.base_layer, x, self.lora_A, self.lora_B, gate=self._gate())
        return lora_linear(x, self.base_layer.weight, self.lora_A, self.lora_B, self.base_layer.bias,
                           gate=self._gate())

    def _merge_factors(self):
        return self.lora_A, self.lora_B, self._gate()
