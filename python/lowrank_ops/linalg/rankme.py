"""Effective rank (RankMe; Garrido et al., 2023) from singular values only."""
from __future__ import annotations

import torch

from .._args import require_number
from .._autocast import without_autocast
from .._finite import all_finite
from .._thin_svd import singular_values
from ..ops._library import values_readable

__all__ = ["effective_rank"]

# The Gram path is taken when the long side has at least this many times the short one's
# length: about break-even there (measured speed-ups in effective_rank's docstring).
_GRAM_ASPECT = 2


def _gram_singular_values(work: torch.Tensor) -> torch.Tensor:
    """Singular values of ``work [..., N, d]`` (descending) from the eigenvalues of its
    float64 Gram matrix over the short side (float32 entries: their products are exact in
    float64)."""
    wide = work.double()
    gram = wide.transpose(-2, -1) @ wide if work.shape[-2] >= work.shape[-1] else wide @ wide.transpose(-2, -1)
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1).to(work.dtype)


def effective_rank(Z: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps``.

    Parameters
    ----------
    Z : Tensor[..., N, d]
        Embeddings (rows = samples); leading dimensions are a batch.  Half types are
        computed in float32 (also inside ``torch.autocast``, turned off here).
    eps : float
        RankMe's smoothing constant; keeps the log finite for zero singular values.

    Returns
    -------
    Tensor[...]
        Between 1 and ``min(N, d)`` (up to eps); 1 for a zero matrix (all mass on
        eps) and for an empty one (N or d zero: no singular values, zero entropy).  Differentiable through the singular values (``torch.linalg.svdvals``,
        whose gradient ``U V^T`` has no division by singular-value gaps).

    Raises
    ------
    ValueError
        Z holds inf or NaN (checked first: one host read on CUDA), or eps <= 0.

    Notes
    -----
    Two ways to the singular values.  float32 and half inputs on the CPU whose long side
    is at least twice the short one, when no gradient is needed: ``sqrt(eigvalsh(G))`` of the
    float64 Gram matrix ``G`` over the short side (``Z^T Z [d, d]`` for ``N >= 2 d``),
    which costs ``N d^2`` multiply-adds and a ``d x d`` eigensolver instead of an SVD of
    ``Z``, and a float64 copy of ``Z``.  Squaring costs the small singular values their
    relative accuracy (absolute error about ``1e-8 sigma_1``), but they carry little of
    the entropy: measured against the float64 SVD on 2048 x 256 matrices
    (``sigma_i = 1/i``, ``i^-2``, ``exp(-i/8)``, rank 16, flat, a 1e-6 cliff after 32),
    the effective rank is within 6e-7 relative, where the float32 SVD it replaces is
    within 4e-6 (and eps = 1e-7 itself moves the rank-16 case by 2e-5).  Measured
    against ``torch.linalg.svdvals`` alone (2-core Xeon shared with other jobs, so
    noisy; same process, interleaved, medians): 25600 x 2048 3.1x (33 against 102 s),
    8192 x 512 8x (0.8 against 6.8 s, svdvals ranging 2-9 s), 2048 x 1024 (N = 2 d)
    1.06x.  Otherwise (float64 inputs, which the SVD keeps exact to rounding;
    near-square ``Z``; a gradient, whose path through ``sqrt`` would divide by zero
    singular values; CUDA, not measured): ``torch.linalg.svdvals``.
    """
    if not isinstance(Z, torch.Tensor) or Z.dim() < 2:
        raise ValueError(f"effective_rank: Z must be a tensor [..., N, d]; got {getattr(Z, 'shape', type(Z).__name__)}")
    if not Z.dtype.is_floating_point:
        raise TypeError(f"effective_rank: Z has dtype {Z.dtype}; expected a floating dtype")
    eps = require_number("effective_rank", "eps", eps, 0.0, low_open=True)  # keeps log p finite
    # Checked here, not left to the eigensolver or the SVD: on inf or NaN they raise
    # unrelated LinAlgErrors (eigh: "ill-conditioned"), or return NaN, depending on the path.
    if values_readable(Z) and not all_finite(Z):
        raise ValueError("effective_rank: Z has a non-finite entry (inf or nan); expected finite values")
    work = Z.float() if Z.dtype in (torch.float16, torch.bfloat16) else Z
    long_side, short_side = max(work.shape[-2:]), min(work.shape[-2:])
    if short_side == 0:  # exp(0); through Z's graph, so that backward gives Z its (empty) gradient
        return work.sum(dim=(-2, -1)) * 0 + 1
    gram = (work.dtype == torch.float32 and work.device.type == "cpu" and long_side >= _GRAM_ASPECT * short_side
            and not (work.requires_grad and torch.is_grad_enabled()))
    values = _gram_singular_values if gram else singular_values
    with without_autocast(work.device):
        sigma = values(work)
        if values_readable(sigma) and not bool(torch.isfinite(sigma).all()):
            # Finite entries whose singular values overflow the dtype (float32 near 1e37):
            # the rank is scale-invariant, so each matrix is scaled exactly by a power of two
            # (its largest entry into [0.5, 1)) and the values recomputed.
            exponent = torch.frexp(work.detach().abs().amax(dim=(-2, -1), keepdim=True)).exponent
            sigma = values(torch.ldexp(work, -exponent))
        # p = sigma / sum(sigma), through sigma / max(sigma): the sum of large finite values
        # would overflow (float32 entries near 1e36 summed to inf, every p to 0: a rank of 1).
        tiny = torch.finfo(work.dtype).tiny
        ratio = sigma / sigma.amax(-1, keepdim=True).clamp_min(tiny)
        p = ratio / ratio.sum(-1, keepdim=True).clamp_min(tiny) + eps
        return torch.exp(-(p * p.log()).sum(-1))
