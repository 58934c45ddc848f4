"""Deprecated name of :mod:`lowrank_ops.nn.lora_multi` (the family's stem at every layer:
``ops/lora_multi.py``, ``nn/lora_multi.py``, ``tests/test_lora_multi.py``).  Importing it
still works and warns once."""
import warnings

from .lora_multi import MultiLoRALinear, group_rows, restore_rows

__all__ = ["MultiLoRALinear", "group_rows", "restore_rows"]

warnings.warn("lowrank_ops.nn.multi_lora is deprecated; import from lowrank_ops.nn.lora_multi "
              "(or lowrank_ops.nn.MultiLoRALinear)", DeprecationWarning, stacklevel=2)
