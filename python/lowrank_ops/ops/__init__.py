"""Differentiable ops (torch tensors in, torch tensors out), one module per op family."""
from .sparse import fixed_sparse_matmul, spmv

__all__ = ["fixed_sparse_matmul", "spmv"]
