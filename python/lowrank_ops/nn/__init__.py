"""``torch.nn`` modules built on lowrank_ops' ops."""
from .sparse_lowrank import SparseLowRankLinear

__all__ = ["SparseLowRankLinear"]
from .lora import LoRALinear
__all__ += ["LoRALinear"]
from .multi_lora import MultiLoRALinear
__all__ += ["MultiLoRALinear"]
