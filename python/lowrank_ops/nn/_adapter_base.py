"""What the adapters around a frozen ``nn.Linear`` share: the adapter dtype rule and the
merge of an update ``s B diag(g) A`` into the base weight (SVFit, LoLDU, NOLA, RandLoRA)."""
from __future__ import annotations

import abc
from typing import Optional, Tuple

import torch

from ..ops.lora import lora_merge, lora_unmerge

__all__ = ["MergeableAdapter", "adapter_dtype", "checkpoint_unmerged"]


def adapter_dtype(where: str, weight: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The adapter's dtype: ``dtype`` if it is the base weight's or float32 (None: the
    weight's), else a TypeError (what :func:`lowrank_ops.ops.lora_linear` accepts)."""
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in (weight.dtype, torch.float32):
        raise TypeError(f"{where}: dtype is {dtype}; expected the base weight's ({weight.dtype}) or float32")
    return dtype


class MergeableAdapter(torch.nn.Module, abc.ABC):
    """A frozen ``base_layer`` plus the update ``s B diag(g) A``; subclasses set
    ``base_layer``, ``scaling`` and ``merged`` and define :meth:`_merge_factors`."""

    base_layer: torch.nn.Linear
    scaling: float
    merged: bool

    @abc.abstractmethod
    def _merge_factors(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(A [k, in], B [out, k], g [k] or None)`` of the update (called without grad)."""

    def delta_weight(self) -> torch.Tensor:
        """``s B diag(g) A`` ``[out, in]``, the adapter's weight update, in float32 (float64
        for float64 factors); not differentiable.  Forms the full matrix (merging, tests)."""
        with torch.no_grad():
            A, B, gate = self._merge_factors()
            accumulate = torch.promote_types(A.dtype, torch.float32)
            B = B.to(accumulate) if gate is None else B.to(accumulate) * gate.to(accumulate)
            return (B @ A.to(accumulate)).mul_(self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the update into the base weight in place, ``W <- W + s B diag(g) A``
        (:func:`lowrank_ops.ops.lora_merge`: float32 accumulation, one rounding)."""
        if self.merged:
            return
        A, B, gate = self._merge_factors()
        lora_merge(self.base_layer.weight, A, B, self.scaling, gate=gate, inplace=True)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Inverse of :meth:`merge` (exact up to the rounding of the merged weight)."""
        if not self.merged:
            return
        A, B, gate = self._merge_factors()
        lora_unmerge(self.base_layer.weight, A, B, self.scaling, gate=gate, inplace=True)
        self.merged = False

    @torch.no_grad()
    def _unmerged_weight(self) -> torch.Tensor:
        """A copy of the merged base weight with the update taken out (as :meth:`unmerge`)."""
        weight = self.base_layer.weight.detach().clone()
        A, B, gate = self._merge_factors()
        return lora_unmerge(weight, A, B, self.scaling, gate=gate, inplace=True)


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_unmerged(module: torch.nn.Module) -> None:
    """Makes ``module``'s checkpoints independent of its merged state: ``state_dict()``
    holds the unmerged base weight, and ``load_state_dict()`` into a merged module unmerges
    first (with its current factors) and merges again with the loaded ones.  Without it a
    checkpoint saved while merged, loaded into a fresh module, adds the update twice.
    ``module`` provides ``merged``, ``merge()``, ``unmerge()`` and ``_unmerged_weight()``;
    call from its ``__init__``.  The hooks are module-level functions: they pickle and
    deep-copy with the module."""
    module._remerge_after_load = False
    module.register_state_dict_post_hook(_save_unmerged)
    module.register_load_state_dict_pre_hook(_unmerge_before_load)
    module.register_load_state_dict_post_hook(_remerge_after_load)


def _save_unmerged(module, state_dict, prefix: str, local_metadata) -> None:
    if module.merged:
        state_dict[prefix + "base_layer.weight"] = module._unmerged_weight()


def _unmerge_before_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    if module.merged:
        module.unmerge()
        module._remerge_after_load = True
        # The re-merge writes into the loaded weight in place; with load_state_dict(...,
        # assign=True) that is the caller's tensor (which then held W + the update, and
        # added the update twice wherever it was loaded again): merge into a copy.
        key = prefix + "base_layer.weight"
        if isinstance(state_dict.get(key), torch.Tensor):
            state_dict[key] = state_dict[key].clone()


def _remerge_after_load(module, incompatible_keys) -> None:
    if module._remerge_after_load:
        module._remerge_after_load = False
        module.merge()
