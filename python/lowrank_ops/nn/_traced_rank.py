"""An ``active_rank`` attribute that ``torch.compile`` reads as a dynamic size.

Dynamo treats an int attribute of an ``nn.Module`` as a constant: every new value of a
layer's ``active_rank`` (IncreLoRA adds ranks, Maestro and DyLoRA pick them per step)
recompiled the model, and ``fullgraph=True`` failed outright at the ninth
("FailOnRecompileLimitHit"), ``dynamic=True`` or not.  A plain tensor attribute's sizes,
unlike a buffer's, become symbolic after a change, so the rank is also kept as the size of
an empty ``[rank, 0]`` tensor, which the forward reads while compiling: Dynamo specializes
the sizes 0 and 1, so ranks 0, 1, r (a guard of the ops) and None get their own graphs,
every other rank shares one.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._args import is_integer

__all__ = ["ActiveRank", "TracedRank"]


class TracedRank:
    """Descriptor for an ``Optional[int]`` rank attribute: ``module.<name>`` is the value as
    set (checked where it is used, as a plain attribute); :meth:`traced` gives it as a
    symbolic size under ``torch.compile``."""

    def __set_name__(self, owner, name: str) -> None:
        self.value_name, self.carrier_name = f"_{name}", f"_{name}_carrier"

    def __get__(self, module, owner=None):
        if module is None:
            return self
        return module.__dict__.get(self.value_name)

    def __set__(self, module, value) -> None:
        module.__dict__[self.value_name] = value
        # Only a plausible size gets a carrier; other values reach the users' checks as they are
        # (2**64 would fail in torch.empty, here, instead of as a named ValueError at use).
        usable = is_integer(value) and 0 <= value < 2**31
        module.__dict__[self.carrier_name] = torch.empty(int(value), 0) if usable else None

    def traced(self, module) -> Optional[int]:
        """The value, or (while compiling) the carrier's size: an int or a SymInt."""
        carrier = module.__dict__.get(self.carrier_name)
        if carrier is not None and torch.compiler.is_compiling():
            return carrier.shape[0]
        return module.__dict__.get(self.value_name)


class ActiveRank:
    """Mixin (before ``torch.nn.Module`` in the bases) giving a module an ``active_rank``
    :class:`TracedRank` that unpickles from before it was one (a plain attribute then)."""

    active_rank = TracedRank()

    def __setstate__(self, state: dict) -> None:
        legacy = "active_rank" in state
        value = state.pop("active_rank", None)
        super().__setstate__(state)
        if legacy:
            self.active_rank = value
