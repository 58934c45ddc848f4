"""One-shot Optimal Brain Surgeon pruning with the M-FAC inverse Fisher (M-FAC paper,
static algorithm; WoodFisher's multi-weight rule).

From ``m`` gradients ``G [m, d]`` and damping ``lambda``, the empirical Fisher is
``F = lambda I + G^T G / m``, either over all ``d`` parameters (``block_size=None``) or
block-diagonal over consecutive blocks of ``block_size`` parameters (the paper's
memory-saving approximation: each block has its own ``m x m`` Woodbury system).

* saliency of weight j:  ``rho_j = w_j^2 / (2 [F^-1]_jj)``, the increase of the local
  quadratic model when w_j alone is removed with the optimal compensation;
* pruning set S: the ``round(sparsity * d)`` smallest saliencies (global over d);
* weight update (independence approximation, as WoodFisher and the M-FAC code):
  ``delta w = -F^-1 v`` with ``v_j = w_j / [F^-1]_jj`` for j in S and 0 elsewhere,
  then ``w_S = 0``.  One IHVP (per block) for the whole set.

The full-``d`` path runs on :class:`~lowrank_ops.second_order.MFACInverse` (the fused
passes); the blocked path batches the blocks' ``m x m`` systems with torch (batched
GEMMs and Cholesky dominate there), a bounded number of blocks at a time.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from .._args import is_integer, is_real_number, require_tensors
from .._dtypes import accumulate_dtype
from .._finite import all_finite
from ..second_order.mfac import MFACInverse

__all__ = ["obs_scores", "obs_prune", "collect_gradients"]

_BLOCK_GROUP_BYTES = 64 << 20  # float64 working set of one group of blocks


def _check(weights: torch.Tensor, grads: torch.Tensor, damp: float, block_size: Optional[int], op: str) -> None:
    require_tensors(op, weights=weights, grads=grads)
    for name, tensor in (("weights", weights), ("grads", grads)):
        # (Integer weights were pruned and updated in integers: 1 of 12 kept at sparsity 0.5.)
        if tensor.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; expected a floating dtype")
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"{op}: grads has shape {tuple(grads.shape)}; expected (m, d) with m >= 1")
    if weights.dim() != 1 or weights.numel() != grads.shape[1]:
        raise ValueError(f"{op}: weights has shape {tuple(weights.shape)} and grads {tuple(grads.shape)}; expected "
                         f"weights (d,) and grads (m, d) with the same d (obs_prune: d is the parameters' total size)")
    if not (is_real_number(damp) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"{op}: damp must be a finite number > 0; got {damp}")
    if block_size is not None and (not is_integer(block_size) or block_size < 1):
        raise ValueError(f"{op}: block_size must be None or an integer >= 1; got {block_size}")
    if not all_finite(grads):
        raise ValueError(f"{op}: grads has non-finite entries (inf or nan)")
    if not all_finite(weights):  # (a NaN weight scored NaN, which the sort ranked most salient: always kept)
        raise ValueError(f"{op}: weights has non-finite entries (inf or nan)")


class _BlockFisher:
    """Block-diagonal ``F`` over blocks of ``block_size`` consecutive parameters."""

    def __init__(self, grads: torch.Tensor, damp: float, block_size: int):
        self.grads, self.damp, self.block_size = grads, damp, block_size
        m, d = grads.shape
        self.n_blocks = -(-d // block_size)
        per_block = 8 * (m * m + 2 * m * block_size)
        self.group = max(1, _BLOCK_GROUP_BYTES // per_block)

    def _groups(self):
        m, d = self.grads.shape
        B = self.block_size
        for b0 in range(0, self.n_blocks, self.group):
            b1 = min(self.n_blocks, b0 + self.group)
            c0, c1 = b0 * B, min(d, b1 * B)
            block = self.grads.new_zeros((m, (b1 - b0) * B), dtype=torch.float64)
            block[:, : c1 - c0] = self.grads[:, c0:c1]
            Gb = block.view(m, b1 - b0, B).transpose(0, 1)  # [blocks, m, B]
            K = Gb @ Gb.transpose(1, 2)
            K.diagonal(dim1=1, dim2=2).add_(m * self.damp)
            yield c0, c1, Gb, torch.linalg.cholesky(K)

    def diag(self) -> torch.Tensor:
        out = self.grads.new_empty(self.grads.shape[1], dtype=torch.float64)
        for c0, c1, Gb, L in self._groups():
            Q = torch.linalg.solve_triangular(L, Gb, upper=False)
            out[c0:c1] = ((1.0 - Q.square().sum(1)) / self.damp).reshape(-1)[: c1 - c0]
        return out

    def ihvp(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(v, dtype=torch.float64)
        for c0, c1, Gb, L in self._groups():
            vb = v.new_zeros(Gb.shape[0] * self.block_size, dtype=torch.float64)
            vb[: c1 - c0] = v[c0:c1]
            vb = vb.view(Gb.shape[0], self.block_size, 1)
            coef = torch.cholesky_solve(Gb @ vb, L)
            out[c0:c1] = ((vb - Gb.transpose(1, 2) @ coef) / self.damp).reshape(-1)[: c1 - c0]
        return out


def _fisher(grads: torch.Tensor, damp: float, block_size: Optional[int]):
    if block_size is None or block_size >= grads.shape[1]:
        return MFACInverse.from_gradients(grads, damp)
    return _BlockFisher(grads, damp, int(block_size))


def obs_scores(weights: torch.Tensor, grads: torch.Tensor, damp: float, *,
               block_size: Optional[int] = None) -> torch.Tensor:
    """OBS saliencies ``w_j^2 / (2 [F^-1]_jj)`` with ``F = damp I + G^T G / m``.

    Parameters
    ----------
    weights : Tensor[d]
        The flattened weights (in the order of the gradients' columns).
    grads : Tensor[m, d]
        ``m`` gradients (per-sample or per-batch), float32 or float64.
    damp : float
        Fisher damping ``lambda > 0``.
    block_size : int, optional
        ``None``: one Fisher over all ``d`` parameters.  Else block-diagonal over blocks
        of ``block_size`` consecutive parameters (memory ``O(m^2 d / block_size)``).

    Returns
    -------
    Tensor[d]
        float64 for float64 gradients, else float32.
    """
    _check(weights, grads, damp, block_size, "obs_scores")
    diag = _fisher(grads, damp, block_size).diag()
    out_dtype = accumulate_dtype(grads.dtype)
    return (weights.to(torch.float64).square() / (2.0 * diag.to(torch.float64))).to(out_dtype)


def obs_prune(params: Sequence[torch.Tensor], grads: torch.Tensor, damp: float, sparsity: float, *,
              block_size: Optional[int] = None, update_weights: bool = True) -> List[torch.Tensor]:
    """Prunes ``params`` in place to ``sparsity`` with OBS saliencies and weight updates.

    Parameters
    ----------
    params : sequence of Tensor
        The parameters to prune, in the order their gradients are flattened in ``grads``
        (as :func:`collect_gradients` does).  Modified in place (under ``no_grad``).
    grads : Tensor[m, d]
        Gradients with ``d = sum(p.numel())``.
    damp : float
        Fisher damping ``lambda > 0``.
    sparsity : float
        Fraction of the ``d`` weights set to zero, in ``[0, 1]`` (lowest global saliency first).
    block_size : int, optional
        As in :func:`obs_scores`.
    update_weights : bool
        Apply the OBS compensation ``-F^-1 v`` to the remaining weights (default), or
        only zero the pruned ones.

    Returns
    -------
    list of Tensor
        Boolean masks shaped like ``params`` (True = kept).
    """
    params = list(params)
    if not params:
        raise ValueError("obs_prune: params is empty; expected the tensors whose entries grads' columns follow")
    if isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1 and not sparsity.is_complex():
        sparsity = float(sparsity)  # a 0-d tensor (a schedule's) is a number
    if not is_real_number(sparsity) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"obs_prune: sparsity must be a number in [0, 1]; got {sparsity!r}")
    for index, p in enumerate(params):
        if isinstance(p, torch.Tensor) and not p.is_floating_point():
            raise TypeError(f"obs_prune: params[{index}] has dtype {p.dtype}; expected a floating dtype")
    with torch.no_grad():
        weights = torch.cat([p.reshape(-1) for p in params]).to(grads.dtype)
        _check(weights, grads, damp, block_size, "obs_prune")
        fisher = _fisher(grads, damp, block_size)
        diag = fisher.diag().to(torch.float64)
        # The weights at their own precision (float64 holds any of them exactly), not as cast
        # to the gradients' dtype: with update_weights=False the kept ones come back unchanged
        # (float64 weights with float32 gradients were all rounded to float32).
        w64 = torch.cat([p.reshape(-1).to(torch.float64) for p in params])
        scores = w64.square() / (2.0 * diag)
        n_prune = int(round(sparsity * weights.numel()))
        pruned = torch.zeros_like(weights, dtype=torch.bool)
        pruned[torch.argsort(scores)[:n_prune]] = True
        new = w64.clone()
        if update_weights and n_prune > 0:
            v = torch.where(pruned, w64 / diag, torch.zeros_like(w64))
            new -= fisher.ihvp(v).to(torch.float64)
        new[pruned] = 0.0
        masks, offset = [], 0
        for p in params:
            n = p.numel()
            p.copy_(new[offset:offset + n].view_as(p).to(p.dtype))
            masks.append(~pruned[offset:offset + n].view_as(p))
            offset += n
    return masks


def collect_gradients(params: Sequence[torch.Tensor], loss_fn: Callable[..., torch.Tensor],
                      batches: Iterable) -> torch.Tensor:
    """One flattened gradient per batch: ``G [m, d]`` (float32, or float64 for float64 params).

    ``loss_fn(batch)`` returns a scalar loss; the gradients of ``params`` are taken with
    ``torch.autograd.grad`` (``.grad`` fields are left untouched).  Parameters the loss
    does not reach get zeros.

    Parameters
    ----------
    params : sequence of Tensor
        The parameters (at least one, all requiring grad, on one device); their
        gradients are flattened and concatenated in this order.
    loss_fn : callable
        ``loss_fn(batch) -> Tensor[]``, a scalar loss differentiable in ``params``.
    batches : iterable
        The batches, one gradient each (consumed once).

    Returns
    -------
    Tensor[m, d]
        ``m`` = number of batches, ``d`` = total number of elements of ``params``; float64
        when the first parameter is float64, else float32; on the parameters' device.

    Raises
    ------
    ValueError
        ``params`` or ``batches`` is empty.
    """
    params = list(params)
    if not params:
        raise ValueError("collect_gradients: params is empty; expected the tensors to differentiate with respect to")
    dtype = accumulate_dtype(params[0].dtype)
    rows = []
    for batch in batches:
        loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for g, p in zip(grads, params)
        ]))
    if not rows:
        raise ValueError("collect_gradients: batches is empty; expected at least one batch")
    return torch.stack(rows)
