"""Low-rank weight compression (LoRD / PELA / "unified low-rank compression" in
ALGORITHMS.md section 8): replace ``nn.Linear`` layers by two thinner ones holding a
truncated SVD of the weight, at a chosen rank or energy budget.

A layer ``y = x W^T + b`` with ``W [out, in]`` becomes
``nn.Sequential(nn.Linear(in, k, bias=False), nn.Linear(k, out, bias=b is not None))``
with weights ``Vh_k [k, in]`` (the top right singular vectors) and ``U_k S_k [out, k]``, so that
``y = (x Vh_k^T) (U_k S_k)^T + b = x W_k^T + b``: ``k (in + out)`` weight parameters
instead of ``in * out``.

Why ``Vh_k`` / ``U_k S_k`` rather than ``sqrt(S)`` on both sides: the first factor is an
orthonormal projection, so the intermediate ``h = x Vh_k^T`` never exceeds ``||x||``
(no overflow risk in float16/bfloat16 beyond the input's own) and the scale of ``W``
stays on the output side, where it was; storing ``U_k S_k`` rounds once, with no
square roots.  (A balanced ``sqrt(S)`` split mainly helps gradient-based fine-tuning of
both factors; rebalance after compression if you fine-tune.)

Example
-------
>>> from lowrank_ops.methods import lowrank_compress
>>> report = lowrank_compress.compress(model, energy=0.95, target_modules=["*_proj"],
...                                    min_saving=0.2, generator=torch.Generator().manual_seed(0))
>>> print(report)                    # per layer: rank, parameters, relative error; totals
>>> report.ratio                     # parameters after / before, whole model
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from .._args import is_real_number, require_generator
from .._finite import all_finite
from .._thin_svd import thin_svd
from ..linalg.rsvd import check_n_iter, rsvd
from ._layers import count_parameters, linear_sites, replace_everywhere, resolve_rank

__all__ = ["compress", "CompressionReport", "LayerCompression"]

_OP = "compress"
# Probes of rsvd's error estimate: p more columns in one of its products with W, nearly
# free; the estimate's relative spread is at most about sqrt(2 / p) / 2 = 0.18 for the
# norm, far less when the residual spreads over many singular values (every real weight).
_ERROR_PROBES = 16
_FIRST_SEARCH_RANK = 32


@dataclass
class LayerCompression:
    """One targeted layer: shapes, the rank chosen, parameter counts and the error.

    ``rank`` is None and ``skipped`` holds the reason when the layer was kept.  ``error``
    is ``||W - W_k||_F / ||W||_F`` of the stored factorization (computed in float32, or
    float64 for float64 weights): from the exact spectrum when a full SVD was computed
    (``error_is_estimate`` False), else rsvd's probe estimate (True).  None when skipped
    before any SVD.
    """

    in_features: int
    out_features: int
    rank: Optional[int]
    parameters_before: int
    parameters_after: int
    error: Optional[float] = None
    error_is_estimate: bool = False
    skipped: Optional[str] = None


@dataclass
class CompressionReport:
    """What :func:`compress` did: ``layers`` maps each targeted module name to its
    :class:`LayerCompression`; ``parameters_before`` / ``parameters_after`` count all of
    the model's parameters (each shared one once)."""

    layers: Dict[str, LayerCompression] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0

    @property
    def replaced(self) -> List[str]:
        return [name for name, layer in self.layers.items() if layer.skipped is None]

    @property
    def skipped(self) -> Dict[str, str]:
        return {name: layer.skipped for name, layer in self.layers.items() if layer.skipped is not None}

    @property
    def ratio(self) -> float:
        """``parameters_after / parameters_before`` of the whole model."""
        return self.parameters_after / self.parameters_before if self.parameters_before else 1.0

    def __str__(self) -> str:
        header = ("layer", "in", "out", "rank", "params before", "params after", "rel. error", "note")
        rows = [header]
        for name, layer in self.layers.items():
            if layer.error is None:
                error = "-"
            else:
                error = ("~" if layer.error_is_estimate else "") + f"{layer.error:.3e}"
            rows.append((name, str(layer.in_features), str(layer.out_features),
                         "-" if layer.rank is None else str(layer.rank), f"{layer.parameters_before:,}",
                         f"{layer.parameters_after:,}", error, layer.skipped or ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"low-rank compression: replaced {len(self.replaced)} of {len(self.layers)} layer(s); model "
                     f"parameters {self.parameters_before:,} -> {self.parameters_after:,} ({100 * self.ratio:.1f}%); "
                     "~ marks rsvd error estimates")
        return "\n".join(lines)


def compress(
    model: torch.nn.Module,
    *,
    rank: Union[int, float, None] = None,
    energy: Optional[float] = None,
    target_modules: Optional[Union[str, Iterable[str]]] = None,
    min_saving: float = 0.0,
    n_iter: Union[int, str] = "auto",
    generator: Optional[torch.Generator] = None,
) -> CompressionReport:
    """Replaces the matching ``nn.Linear`` layers of ``model`` in place by rank-``k`` factors.

    Each ``W [out, in]`` becomes ``Sequential(Linear(in, k, bias=False) holding Vh_k [k, in],
    Linear(k, out) holding U_k S_k [out, k] and the original bias)``.  The SVD runs in
    float32 (float64 for float64 weights) on the weight's device; the factors are stored
    in the weight's dtype and device, with its ``requires_grad``.

    Parameters
    ----------
    model : nn.Module
        Not itself an ``nn.Linear`` (it has no parent to be replaced in).
    rank : int or float, optional
        The rank of every replaced layer: an int in ``[1, min(in, out)]``, or a float in
        ``(0, 1)`` as a fraction of ``min(in, out)`` (rounded, at least 1).
    energy : float, optional
        In ``(0, 1]``: per layer, the smallest ``k`` with
        ``sum_{i <= k} s_i^2 >= energy * ||W||_F^2`` (``||W||_F`` exact, in float64).
        Exactly one of ``rank`` and ``energy``.
    target_modules : str or list of str, optional
        Glob patterns matched against the full module name and its last component; default:
        every module whose type is exactly ``nn.Linear`` (subclasses are left alone: e.g.
        ``MultiheadAttention`` reads its ``out_proj.weight`` directly).
    min_saving : float
        In ``[0, 1)``: a layer is replaced only when ``k (in + out) <= (1 - min_saving) in out``;
        otherwise it is kept and the report says why (so at 0, a factorization that would
        grow the layer is never stored).
    n_iter : int or "auto"
        rsvd's power iterations.
    generator : torch.Generator, optional
        rsvd's random source, a generator of the weights' device (ValueError otherwise,
        before any change): same state, same result.

    Returns
    -------
    CompressionReport

    Notes
    -----
    Rank search and the exact/estimate switch.  With ``rank=k``: rsvd at rank ``k`` when
    ``k <= min(in, out) / 2``, else the full ``torch.linalg.svd`` (a randomized sketch of
    more than half the dimension costs more than the exact SVD it approximates).  With
    ``energy``: rsvd at ranks 32, 64, 128, ... (capped by ``min_saving``'s largest useful
    rank) until its singular values capture the target, then truncated to the smallest
    ``k`` that does; once the rank would pass ``min(in, out) / 2``, the full SVD.  rsvd's
    values never exceed the exact ones, so its ``k`` is at least the exact smallest one
    (equal on decaying spectra) and the stored factors always capture the target energy.
    Energies within the spectrum's rounding (``2 eps s_1 sum_i s_i``, eps of the compute
    dtype) of the target count as reaching it, so that ``energy=1`` stops at the numerical
    rank.
    The error is exact (the tail of the full spectrum) on the SVD path and an estimate on
    the rsvd path: rsvd's probes estimate ``||W - U_r S_r Vh_r||_F`` and, truncating to
    ``k < r``, the discarded ``sum_{k < i <= r} S_i^2`` adds to its square (orthogonal parts).
    """
    rank, energy, patterns = _validate(model, rank, energy, target_modules, min_saving, n_iter)
    # All names of every target (a module registered twice is replaced everywhere, once).
    targets = linear_sites(_OP, model, patterns)
    # Resolve every rank first, so that a bad one leaves the model untouched.
    ranks = [None if rank is None else resolve_rank(rank, linear, names[0], _OP) for linear, names in targets]
    for linear, names in targets:
        if not all_finite(linear.weight):
            raise ValueError(f"{_OP}: the weight of {names[0]} holds NaN or infinite values")
        # Before any layer is replaced (rsvd would reject it at the first layer it draws for).
        require_generator(_OP, "generator", generator, linear.weight.device, f"the weight of {names[0]}")

    report = CompressionReport(parameters_before=count_parameters(model, trainable_only=False))
    for (linear, names), layer_rank in zip(targets, ranks):
        layer, replacement = _compress_layer(linear, layer_rank, energy, min_saving, n_iter, generator)
        report.layers[names[0]] = layer
        if replacement is not None:
            replace_everywhere(model, names, replacement)
    report.parameters_after = count_parameters(model, trainable_only=False)
    return report


def _validate(model, rank, energy, target_modules, min_saving, n_iter):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_OP}: model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(model, torch.nn.Linear):  # no parent to replace it in: it would be kept, silently
        raise TypeError(f"{_OP}: model is itself an nn.Linear, which cannot be replaced in place; wrap it "
                        "(e.g. nn.Sequential(linear)) and compress that")
    if (rank is None) == (energy is None):
        raise ValueError(f"{_OP}: give exactly one of rank and energy; got rank={rank!r}, energy={energy!r}")
    if rank is not None and (not is_real_number(rank)):
        raise TypeError(f"{_OP}: rank must be an int or a float in (0, 1); got {type(rank).__name__}")
    if energy is not None and (not is_real_number(energy)
                               or not 0.0 < energy <= 1.0):
        raise ValueError(f"{_OP}: energy must be a number in (0, 1]; got {energy!r}")
    if (not is_real_number(min_saving)
            or not 0.0 <= min_saving < 1.0):
        raise ValueError(f"{_OP}: min_saving must be a number in [0, 1); got {min_saving!r}")
    check_n_iter(_OP, "n_iter", n_iter)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    patterns = list(target_modules) if target_modules is not None else None
    return rank, None if energy is None else float(energy), patterns


def _compress_layer(linear: torch.nn.Linear, rank: Optional[int], energy: Optional[float], min_saving: float,
                    n_iter, generator) -> Tuple[LayerCompression, Optional[torch.nn.Module]]:
    out_features, in_features = linear.weight.shape
    bias = 0 if linear.bias is None else linear.bias.numel()
    before = in_features * out_features + bias
    # The largest rank that still saves min_saving of the weight's parameters.
    k_max = math.floor((1.0 - min_saving) * in_features * out_features / (in_features + out_features))
    layer = LayerCompression(in_features, out_features, None, before, before)
    if rank is not None and rank > k_max:
        layer.skipped = f"rank {rank} saves less than min_saving={min_saving:g} (ranks <= {k_max} do)"
        return layer, None
    if k_max < 1:
        layer.skipped = f"no rank saves min_saving={min_saving:g}"
        return layer, None

    weight = linear.weight.detach()
    W = weight if weight.dtype == torch.float64 else weight.float()
    if rank is not None:
        factors = _rank_factors(W, rank, n_iter, generator)
    else:
        factors = _energy_factors(W, energy, k_max, n_iter, generator)
        if isinstance(factors, str):
            layer.skipped = factors
            return layer, None
    U, S, Vh, layer.error, layer.error_is_estimate = factors
    k = S.shape[-1]
    layer.rank, layer.parameters_after = k, k * (in_features + out_features) + bias
    return layer, _factored(linear, U * S, Vh)


def _unit_scaled(W: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """``(W / c, c)`` for c the power of two with ``max |W| / c`` in [1, 2) (1 for a zero
    W): the division is exact, c is in range for every finite max (also 2^1023 in float64
    and 2^127 in float32), and the squared norms and errors of ``W / c`` neither overflow
    nor underflow in float64 (they did for float64 weights beyond 1e154 or below 1e-154)."""
    amax = float(W.abs().amax()) if W.numel() else 0.0
    if amax == 0.0:
        return W, 1.0
    c = math.ldexp(1.0, math.frexp(amax)[1] - 1)
    return W / c, c


def _rank_factors(W: torch.Tensor, k: int, n_iter, generator):
    """``(U [out, k], S [k], Vh [k, in], ||W - U S Vh||_F / ||W||_F, is_estimate)``
    (relative error 0 for a zero W)."""
    W, c = _unit_scaled(W)
    norm = torch.linalg.vector_norm(W, dtype=torch.float64).item()
    if k > min(W.shape) / 2:
        U, S, Vh = thin_svd(W)
        error, estimate = torch.linalg.vector_norm(S[k:], dtype=torch.float64).item(), False
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    else:
        U, S, Vh, error = rsvd(W, k, n_iter=n_iter, generator=generator, error_probes=_ERROR_PROBES,
                               check_finite=False)
        error, estimate = float(error), True
    return U, S * c, Vh, error / norm if norm > 0 else 0.0, estimate


def _energy_factors(W: torch.Tensor, energy: float, k_max: int, n_iter, generator):
    """As :func:`_rank_factors` at the smallest rank capturing ``energy``, or the reason
    (a str) when that rank exceeds ``k_max``."""
    W, c = _unit_scaled(W)
    norm_sq = torch.linalg.vector_norm(W, dtype=torch.float64).square().item()
    smallest = min(W.shape)
    eps = torch.finfo(W.dtype).eps
    r = min(_FIRST_SEARCH_RANK, k_max)
    while True:
        exact = r > smallest / 2
        if exact:
            U, S, Vh = thin_svd(W)
        else:
            U, S, Vh, error = rsvd(W, r, n_iter=n_iter, generator=generator, error_probes=_ERROR_PROBES,
                                   check_finite=False)
        s = S.double()
        captured = s.square().cumsum(0)
        # Each computed s_i is off by about eps s_1 (a backward-stable SVD, Weyl), so each
        # partial sum of s_i^2 by 2 eps s_1 sum_i s_i: energies that close count as reached.
        target = energy * norm_sq - 2.0 * eps * (s[0] * s.sum()).item()
        # The scalar overload: a CPU tensor of the target would be rejected for CUDA weights.
        k = int(torch.searchsorted(captured, target)) + 1
        if exact:
            k = min(k, smallest)
            if k > k_max:
                return f"energy {energy:g} needs rank {k}, which saves less than min_saving (ranks <= {k_max} do)"
            return U[:, :k], S[:k] * c, Vh[:k], _relative(s[k:].square().sum().item(), norm_sq), False
        if k <= r:
            # rsvd's residual is orthogonal to the dropped part U_(k:r) S_(k:r) Vh_(k:r).
            error_sq = float(error) ** 2 + s[k:].square().sum().item()
            return U[:, :k], S[:k] * c, Vh[:k], _relative(error_sq, norm_sq), True
        if r >= k_max:
            return f"energy {energy:g} needs rank > {k_max}, which saves less than min_saving (ranks <= {k_max} do)"
        r = min(2 * r, k_max)


def _relative(error_sq: float, norm_sq: float) -> float:
    """``sqrt(error_sq / norm_sq)`` (0 for a zero weight)."""
    return math.sqrt(max(error_sq, 0.0) / norm_sq) if norm_sq > 0 else 0.0


@torch.no_grad()
def _factored(linear: torch.nn.Linear, US: torch.Tensor, Vh: torch.Tensor) -> torch.nn.Sequential:
    """``Sequential(Linear(in, k) <- Vh, Linear(k, out) <- U S + bias)`` in the weight's dtype and device."""
    k = Vh.shape[0]
    weight = linear.weight
    options = dict(device=weight.device, dtype=weight.dtype)
    # skip_init: no default initialization, which would draw from torch's global RNG.
    down = torch.nn.utils.skip_init(torch.nn.Linear, linear.in_features, k, bias=False, **options)
    up = torch.nn.utils.skip_init(torch.nn.Linear, k, linear.out_features, bias=linear.bias is not None, **options)
    down.weight.copy_(Vh)
    up.weight.copy_(US)
    down.weight.requires_grad_(weight.requires_grad)
    up.weight.requires_grad_(weight.requires_grad)
    if linear.bias is not None:
        up.bias.copy_(linear.bias)
        up.bias.requires_grad_(linear.bias.requires_grad)
    return torch.nn.Sequential(down, up).train(linear.training)
