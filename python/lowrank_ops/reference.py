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


# ---- multi-adapter LoRA ----
__all__ += ["lora_linear_multi"]


def lora_linear_multi(x, weight, A_stack, B_stack, segment_offsets, adapter_ids, *, ranks=None, scales=None,
                      bias=None) -> torch.Tensor:
    """Reference of :func:`lowrank_ops.ops.lora_linear_multi`: a loop of per-segment matmuls.

    Differentiable through plain autograd (the oracle of the gradient tests too).
    """
    n_adapters, r_max = A_stack.shape[:2]
    rows = x.reshape(-1, weight.shape[1])
    y = torch.nn.functional.linear(rows, weight, bias)
    offsets = [int(v) for v in segment_offsets]
    pieces = []
    for s, adapter in enumerate(int(v) for v in adapter_ids):
        y_s = y[offsets[s]:offsets[s + 1]]
        if adapter >= 0:
            rank = r_max if ranks is None else int(ranks[adapter])
            scale = 1.0 if scales is None else float(scales[adapter])
            x_s = rows[offsets[s]:offsets[s + 1]]
            y_s = y_s + scale * (x_s @ A_stack[adapter, :rank].T) @ B_stack[adapter, :, :rank].T
        pieces.append(y_s)
    y = torch.cat(pieces) if pieces else y
    return y.reshape(*x.shape[:-1], weight.shape[0])
