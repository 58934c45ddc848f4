"""Differentiable ops (torch tensors in, torch tensors out), one module per op family."""
from .sparse import fixed_sparse_matmul, spmv
from .sparse_lowrank import sparse_lowrank_linear
from .svd import batched_svd

__all__ = ["fixed_sparse_matmul", "spmv", "sparse_lowrank_linear", "batched_svd"]
from .lora_multi import lora_linear_multi
__all__ += ["lora_linear_multi"]
