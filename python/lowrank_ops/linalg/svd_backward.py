"""Backward of a thin SVD ``A = U diag(S) Vh`` given gradients of the returned factors.

Shared by every SVD the library returns (``rsvd``, ``batched_svd``), so they all
differentiate the same way.  Real inputs; leading batch dimensions broadcast.

With ``F[i, j] = 1 / (s_j^2 - s_i^2)`` (0 on the diagonal), ``V = Vh^T``:

    gA = U [diag(gS) + (F o (U^T gU - gU^T U)) S + S (F o (V^T gV - gV^T V))] Vh
         + (I - U U^T) gU S^-1 Vh + U S^-1 gV^T (I - V V^T)

(Townsend, "Differentiating the singular value decomposition", 2016).  It is exact
when A has rank at most k (the returned factors then describe A exactly); for a
truncated SVD of a matrix of higher rank it is the gradient of the rank-k factors with
the discarded subspace held fixed.

Stability: when only ``S`` receives a gradient the result is ``U diag(gS) Vh``, with no
division at all, so repeated or zero singular values never give NaN there.  Through U
or V, repeated singular values make the problem ill-posed (F is infinite); pairs closer
than ``eps * s_max^2`` are treated as degenerate (F = 0, the usual gauge choice), and
``S^-1`` is a pseudo-inverse (0 for singular values below ``eps * s_max``).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["thin_svd_backward"]


def _spectral_terms(S: torch.Tensor, size: int):
    """``(S^-1, F)`` shared by the thin SVD's backward and jvp: ``1 / s_i`` with singular
    values below ``eps size s_max`` dropped (0), and ``F_ij = 1 / (s_j^2 - s_i^2)`` with
    degenerate pairs (gaps below ``eps size s_max^2``) and the diagonal 0."""
    eps = torch.finfo(S.dtype).eps * size
    s_max = S.amax(-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
    S_inv = torch.where(S > eps * s_max, 1.0 / S.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(S))
    squares = S * S
    gaps = squares.unsqueeze(-2) - squares.unsqueeze(-1)  # [..., i, j] = s_j^2 - s_i^2
    degenerate = gaps.abs() <= eps * (s_max * s_max).unsqueeze(-1)
    F = torch.where(degenerate, torch.zeros_like(gaps), 1.0 / torch.where(degenerate, torch.ones_like(gaps), gaps))
    return S_inv, F


def thin_svd_backward(
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    grad_U: Optional[torch.Tensor],
    grad_S: Optional[torch.Tensor],
    grad_Vh: Optional[torch.Tensor],
) -> torch.Tensor:
    """Gradient with respect to ``A [..., m, n]`` of a loss of ``U [..., m, k]``,
    ``S [..., k]`` and ``Vh [..., k, n]``; None gradients count as zero."""
    grad_A = U.new_zeros(U.shape[:-2] + (U.shape[-2], Vh.shape[-1]))
    if grad_S is not None:
        grad_A = grad_A + (U * grad_S.unsqueeze(-2)) @ Vh
    if grad_U is None and grad_Vh is None:
        return grad_A

    S_inv, F = _spectral_terms(S, max(U.shape[-2], Vh.shape[-1]))

    V = Vh.transpose(-2, -1)
    inner = torch.zeros_like(F)
    if grad_U is not None:
        UtgU = U.transpose(-2, -1) @ grad_U
        inner = inner + (F * (UtgU - UtgU.transpose(-2, -1))) * S.unsqueeze(-2)
        # Component of grad_U outside span(U) (zero when U is square).
        outside = grad_U - U @ UtgU
        grad_A = grad_A + (outside * S_inv.unsqueeze(-2)) @ Vh
    if grad_Vh is not None:
        grad_V = grad_Vh.transpose(-2, -1)
        VtgV = V.transpose(-2, -1) @ grad_V
        inner = inner + S.unsqueeze(-1) * (F * (VtgV - VtgV.transpose(-2, -1)))
        outside = grad_V - V @ VtgV
        grad_A = grad_A + (U * S_inv.unsqueeze(-2)) @ outside.transpose(-2, -1)
    return grad_A + U @ inner @ Vh


def thin_svd_jvp(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, dA: torch.Tensor):
    """Tangents ``(dU, dS, dVh)`` of the thin SVD ``A = U diag(S) Vh`` along ``dA [..., m, n]``:
    the forward-mode twin of :func:`thin_svd_backward` (the same gaps, degenerate pairs and
    small singular values dropped), with ``dP = U^T dA V``::

        dS  = diag(dP)
        dU  = U (F o (dP S + S dP^T)) + (dA V - U dP) S^-1
        dV  = V (F o (S dP + dP^T S)) + (dA^T U - V dP^T) S^-1,   F_ij = 1 / (s_j^2 - s_i^2)
    """
    S_inv, F = _spectral_terms(S, max(U.shape[-2], Vh.shape[-1]))
    V = Vh.transpose(-2, -1)
    dAV = dA @ V
    dAtU = dA.transpose(-2, -1) @ U
    dP = U.transpose(-2, -1) @ dAV
    dS = dP.diagonal(dim1=-2, dim2=-1)
    row, col = S.unsqueeze(-1), S.unsqueeze(-2)  # s_i, s_j
    dU = U @ (F * (dP * col + row * dP.transpose(-2, -1))) + (dAV - U @ dP) * S_inv.unsqueeze(-2)
    dV = V @ (F * (row * dP + dP.transpose(-2, -1) * col)) + (dAtU - V @ dP.transpose(-2, -1)) * S_inv.unsqueeze(-2)
    return dU, dS, dV.transpose(-2, -1)
