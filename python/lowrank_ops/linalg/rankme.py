"""Effective rank (RankMe; Garrido et al., 2023) from singular values only."""
from __future__ import annotations

import torch

from .._args import require_number

__all__ = ["effective_rank"]


def effective_rank(Z: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps``.

    Parameters
    ----------
    Z : Tensor[..., N, d]
        Embeddings (rows = samples); leading dimensions are a batch.  Half types are
        computed in float32.
    eps : float
        RankMe's smoothing constant; keeps the log finite for zero singular values.

    Returns
    -------
    Tensor[...]
        Between 1 and ``min(N, d)`` (up to eps); 1 for a zero matrix (all mass on
        eps).  Differentiable through the singular values (``torch.linalg.svdvals``,
        whose gradient ``U V^T`` has no division by singular-value gaps).
    """
    if not isinstance(Z, torch.Tensor) or Z.dim() < 2:
        raise ValueError(f"effective_rank: Z must be a tensor [..., N, d]; got {getattr(Z, 'shape', type(Z).__name__)}")
    if not Z.dtype.is_floating_point:
        raise TypeError(f"effective_rank: Z has dtype {Z.dtype}; expected a floating dtype")
    eps = require_number("effective_rank", "eps", eps, 0.0, low_open=True)  # keeps log p finite
    work = Z.float() if Z.dtype in (torch.float16, torch.bfloat16) else Z
    sigma = torch.linalg.svdvals(work)
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp_min(torch.finfo(work.dtype).tiny) + eps
    return torch.exp(-(p * p.log()).sum(-1))
