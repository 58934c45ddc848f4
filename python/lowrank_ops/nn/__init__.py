"""``torch.nn`` modules built on lowrank_ops' ops."""
from .sparse_lowrank import SparseLowRankLinear

__all__ = ["SparseLowRankLinear"]
from .multi_lora import MultiLoRALinear
__all__ += ["MultiLoRALinear"]
