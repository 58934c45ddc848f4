"""Pure-torch references of every op, float64-capable; the oracles of the tests and the
accuracy baseline of the benchmarks.  Slow and simple on purpose: dense matrices,
plain matmuls, no custom kernels.
"""
from __future__ import annotations

import torch

__all__ = ["fixed_sparse_matmul", "csr_spmm", "csr_sddmm", "csr_rows"]


def csr_rows(row_ptr: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Row index of every entry of a CSR pattern, ``[nnz]`` int64."""
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(n_rows, device=row_ptr.device), counts)


def _dense_from_csr(row_ptr, col_idx, values, n_rows: int, n_cols: int) -> torch.Tensor:
    dense = values.new_zeros((n_rows, n_cols))
    dense.index_put_((csr_rows(row_ptr, n_rows), col_idx.to(torch.int64)), values, accumulate=True)
    return dense


def fixed_sparse_matmul(x: torch.Tensor, values: torch.Tensor, support) -> torch.Tensor:
    """``x @ S^T`` with S densified: x ``[..., in]``, values ``[nnz]`` -> ``[..., out]``."""
    return x @ support.to_dense(values).T


def csr_spmm(row_ptr, col_idx, values, dense, n_rows: int) -> torch.Tensor:
    """Reference of ``torch.ops.lowrank_ops.csr_spmm``: ``dense @ S^T``, S ``[n_rows, dense.shape[1]]``."""
    return dense @ _dense_from_csr(row_ptr, col_idx, values, n_rows, dense.shape[1]).T


def csr_sddmm(row_ptr, col_idx, left, dense) -> torch.Tensor:
    """Reference of ``torch.ops.lowrank_ops.csr_sddmm``: ``(left^T dense)`` at the pattern, ``[nnz]``."""
    full = left.T @ dense
    return full[csr_rows(row_ptr, left.shape[1]), col_idx.to(torch.int64)]


# ---- LoRA family ----
__all__ += ["lora_linear", "lora_merge", "dora_row_norm", "dora_linear"]


def lora_linear(x, weight, lora_A, lora_B, bias=None, gate=None, *, scale=1.0, rank=None, keep=None, dropout_p=0.0):
    """``x W^T + b + scale ((D(x) A^T) g) B^T`` on the first ``rank`` ranks; ``D(x) = x keep / (1 - p)``."""
    k = lora_A.shape[0] if rank is None else rank
    adapter_input = x if keep is None else x * keep / (1 - dropout_p)
    shrunk = adapter_input @ lora_A[:k].T
    if gate is not None:
        shrunk = shrunk * gate[:k]
    y = x @ weight.T + scale * (shrunk @ lora_B[:, :k].T)
    return y if bias is None else y + bias


def lora_merge(weight, lora_A, lora_B, scale=1.0, gate=None, *, rank=None):
    """``W + scale B[:, :k] diag(g[:k]) A[:k]``."""
    k = lora_A.shape[0] if rank is None else rank
    lora_B = lora_B[:, :k] if gate is None else lora_B[:, :k] * gate[:k]
    return weight + scale * (lora_B @ lora_A[:k])


def dora_row_norm(weight, lora_A, lora_B, scale=1.0):
    """``||W_o + scale B_o A||`` through the dense ``[out, in]`` matrix."""
    return torch.linalg.vector_norm(weight + scale * (lora_B @ lora_A), dim=1)


def dora_linear(x, weight, lora_A, lora_B, magnitude, bias=None, *, scale=1.0, keep=None, dropout_p=0.0, eps=1e-6):
    """PEFT's DoRA with the norm detached: ``x W^T + b + (m / n - 1) D(x) W^T + (m / n) s D(x) (B A)^T``."""
    norm = dora_row_norm(weight, lora_A, lora_B, scale).detach().clamp_min(eps)
    adapter_input = x if keep is None else x * keep / (1 - dropout_p)
    factor = magnitude / norm
    y = x @ weight.T + (factor - 1) * (adapter_input @ weight.T) + factor * scale * ((adapter_input @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias
