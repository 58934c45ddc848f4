"""WeLore (Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly
Emerge from Low-Rank Gradients", 2024): data-agnostic, one-shot, non-uniform low-rank
compression, and fine-tuning of only the matrices that compress.

Per targeted ``nn.Linear`` weight ``W [out, in]`` with singular values ``s_1 >= s_2 >=
... >= s_n``, the normalized spectrum is the authors' min-max scaling ``(s_j - s_n) / (s_1 -
s_n)`` (in ``[0, 1]``, scale-free, so matrices of different layers compare; a flat
spectrum is all ones).  One global threshold ``tau`` chooses every rank,

    k = #{ j : (s_j - s_n) / (s_1 - s_n) >= tau },

so a matrix whose spectrum decays fast (a heavy tail of small singular values: the
low-rank structure WeLore observes in trained LLMs) gets a low rank and one with a flat
spectrum a high one.  ``tau`` is given, or found for a target parameter ratio of the
targeted weights (the smallest ``tau``, i.e. the highest ranks, that reach it).

A matrix whose rank-``k`` factors are smaller than itself (``k (in + out) < (1 -
min_saving) in out``) is a low-rank component (LRC): :func:`compress` replaces it by
``B A`` (``B = U_k S_k^(1/2) [out, k]``, ``A = S_k^(1/2) Vh_k [k, in]``, the balanced split
suited to training both factors) and, with ``freeze=True``, makes those factors the only
trainable parameters of the model.  The other matrices (N-LRCs) stay dense and frozen.

The normalization is the authors' code's (``adaptive_rank_pruning``: it prunes the values
below ``tau``), so their thresholds carry over (e.g. 0.175 for a 50 % rank reduction of
LLaMA-2 7B).  Two choices are ours: the search for ``tau`` from a parameter ratio, and the
LRC criterion above (the authors' code replaces every matrix whose rank falls by more than
``min_ratio``, default 0, even when its factors are larger than the matrix).

Example
-------
>>> report = welore.compress(model, ratio=0.5, target_modules=["*_proj"], generator=g)
>>> print(report)          # per layer: rank, LRC or not, parameters, relative error; threshold
>>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
"""
from __future__ import annotations

import fractions
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from .._args import is_real_number, require_generator
from .._finite import all_finite
from .._thin_svd import singular_values
from ..ops.svd import batched_svd, jacobi_size_limit
from . import lowrank_compress
from ._layers import count_parameters, linear_sites, linear_targets, replace_everywhere

__all__ = ["singular_spectra", "choose_ranks", "analyze", "compress", "WeLoreReport"]

# Same-shape weights are stacked into one batched SVD call of at most this many entries
# (a bounded extra copy: 64 MB in float32).
_MAX_STACK_ENTRIES = 1 << 24
# Values only: batched Jacobi up to this min(m, n), LAPACK's svdvals beyond.  Lower than
# batched_svd's own crossover (which is for U, S and V): LAPACK skips the vectors entirely,
# Jacobi still rotates every pair.  Measured (2-core Xeon, float32, 48 matrices, medians,
# Jacobi / LAPACK ms; shared machine): 1 thread 32^2 5.8 / 10.2, 64^2 31.7 / 33.4,
# 96^2 100 / 60, 128^2 163 / 62; 2 threads 32^2 1.1 / 12.0, 64^2 23 / 28, 96^2 44 / 46.
_JACOBI_VALUES_MAX = 64


@dataclass
class WeLoreReport(lowrank_compress.CompressionReport):
    """:class:`~lowrank_ops.methods.lowrank_compress.CompressionReport` (``layers`` holds
    each targeted layer's :class:`LayerCompression`: the LRCs with their rank, the N-LRCs
    with ``rank`` None and ``skipped`` saying why) plus WeLore's choices.

    Attributes
    ----------
    threshold : float
        The global ``tau`` on the normalized spectra.
    ranks : Dict[str, int]
        The threshold's rank for every targeted layer (LRC or not).
    errors : Dict[str, float]
        ``||W - W_k||_F / ||W||_F`` of the optimal rank-``k`` approximation (from the exact
        spectrum) for every targeted layer; an LRC's ``layers[name].error`` is that of its
        stored factors.
    spectra : Dict[str, Tensor]
        The normalized spectra ``(s - s_n) / (s_1 - s_n)`` (float64, descending).
    applied : bool
        Whether the model was changed (:func:`compress`) or only analyzed.
    trainable_after : int
        Trainable parameters of the model after :func:`compress` (with ``freeze``: the
        LRC factors), else the model's trainable count.
    """

    threshold: float = 1.0
    ranks: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)
    spectra: Dict[str, torch.Tensor] = field(default_factory=dict)
    applied: bool = False
    trainable_after: int = 0

    @property
    def low_rank_components(self) -> List[str]:
        """The LRCs' names (the layers replaced, or to be replaced, by ``B A``)."""
        return self.replaced

    def __str__(self) -> str:
        verb = "replaced" if self.applied else "would replace"
        return (super().__str__() + f"\nWeLore: threshold {self.threshold:.4g} on (s_j - s_n) / (s_1 - s_n); "
                f"{verb} "
                f"{len(self.replaced)} low-rank component(s); trainable parameters after: {self.trainable_after:,}")


def _targets(op: str, model: torch.nn.Module, target_modules, replacing: bool) -> Dict[str, torch.nn.Linear]:
    found = linear_targets(op, model, target_modules, refuse_tied=replacing)  # reading spectra unties nothing
    for name, linear in found.items():
        if not all_finite(linear.weight):
            raise ValueError(f"{op}: the weight of {name} holds NaN or infinite values")
    return found


def _stack_spectra(weights: List[torch.Tensor]) -> List[torch.Tensor]:
    """Singular values (float64, descending) of same-shape, same-dtype, same-device 2-D
    weights, computed in float32 (float64 for float64 weights), stacked into batched calls:
    :func:`lowrank_ops.linalg.batched_svd` (values only) up to ``min(m, n) = 64``
    (:data:`_JACOBI_VALUES_MAX`), :func:`~lowrank_ops._thin_svd.singular_values` (LAPACK,
    wide matrices through their transposes) beyond."""
    dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    m, n = weights[0].shape
    per_call = max(1, _MAX_STACK_ENTRIES // max(1, m * n))
    jacobi = min(m, n) <= min(_JACOBI_VALUES_MAX, jacobi_size_limit(dtype, weights[0].device))
    out: List[torch.Tensor] = []
    for start in range(0, len(weights), per_call):
        A = torch.stack([w.detach().to(dtype) for w in weights[start:start + per_call]])
        if jacobi:
            result = batched_svd(A, compute_uv=False)
            if not bool(result.converged.all()):  # reported, not hidden: LAPACK's values instead
                S = singular_values(A)
            else:
                S = result.S
        else:
            S = singular_values(A)
        out.extend(S.double().unbind(0))
    return out


@torch.no_grad()
def singular_spectra(model: torch.nn.Module, *, target_modules: Optional[Union[str, Iterable[str]]] = None
                     ) -> Dict[str, torch.Tensor]:
    """Singular values ``[min(out, in)]`` (float64, descending, on the weight's device) of
    every targeted ``nn.Linear`` weight (default: every module whose type is exactly ``nn.Linear``;
    fnmatch ``target_modules`` otherwise), same-shape weights in one batched call."""
    targets = _targets("singular_spectra", model, target_modules, replacing=False)
    groups: Dict[tuple, List[str]] = {}
    for name, linear in targets.items():
        w = linear.weight
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(name)
    spectra: Dict[str, torch.Tensor] = {}
    for names in groups.values():
        nonempty = [name for name in names if targets[name].weight.numel()]
        if nonempty:
            spectra.update(zip(nonempty, _stack_spectra([targets[name].weight for name in nonempty])))
        for name in names:  # empty weights: an empty spectrum on the weight's device, as the others
            spectra.setdefault(name, torch.zeros(0, dtype=torch.float64, device=targets[name].weight.device))
    return {name: spectra[name] for name in targets}


def _normalized(s: torch.Tensor) -> torch.Tensor:
    """``(s - s_n) / (s_1 - s_n)`` on the CPU (the authors' min-max scaling); all ones for a
    flat nonzero spectrum (their division by zero gave NaN), all zeros for a zero matrix."""
    s = s.detach().double().cpu()
    if not s.numel() or not s[0] > 0:
        return torch.zeros_like(s)
    spread = s[0] - s[-1]
    return (s - s[-1]) / spread if spread > 0 else torch.ones_like(s)


def _k_max(m: int, n: int, min_saving: float) -> int:
    """The largest ``k`` with ``k (m + n) < (1 - min_saving) m n``: strictly smaller factors.
    In exact rational arithmetic (min_saving's binary value): in floating point the bound's
    rounding gave k one too large at exact boundaries (0.9 * 5040 / 162 = 28.000000000000004)."""
    bound = (1 - fractions.Fraction(min_saving)) * m * n / (m + n)
    return max(0, math.ceil(bound) - 1)


def choose_ranks(spectra: Dict[str, torch.Tensor], shapes: Dict[str, Tuple[int, int]], *,
                 threshold: Optional[float] = None, ratio: Optional[float] = None,
                 min_saving: float = 0.0) -> Tuple[float, Dict[str, int]]:
    """WeLore's global threshold and the ranks it gives: ``(tau, {name: k})``.

    Parameters
    ----------
    spectra : Dict[str, Tensor]
        Singular values of each matrix (any order of magnitude; descending).
    shapes : Dict[str, (out, in)]
        Each matrix's shape (for the parameter count with ``ratio``).
    threshold : float, optional
        ``tau`` in ``(0, 1]``: ``k = #{j : (s_j - s_n) / (s_1 - s_n) >= tau}``.
    ratio : float, optional
        In ``(0, 1]``: the smallest ``tau`` at which the matrices' parameters, ``k (out +
        in)`` for those whose factors are smaller than ``(1 - min_saving) out in`` and ``out
        in`` for the others, are at most ``ratio * sum(out in)``.  Exactly one of
        ``threshold`` and ``ratio``.
    min_saving : float
        In ``[0, 1)``; see above.

    Returns
    -------
    (float, Dict[str, int])
        A zero matrix gets rank 0 (and counts as dense under ``ratio``).
    """
    op = "choose_ranks"
    if (threshold is None) == (ratio is None):
        raise ValueError(f"{op}: give exactly one of threshold and ratio; got threshold={threshold!r}, ratio={ratio!r}")
    for arg, value in (("threshold", threshold), ("ratio", ratio)):
        if value is not None and (not is_real_number(value)
                                  or not 0.0 < value <= 1.0):
            raise ValueError(f"{op}: {arg} must be a number in (0, 1]; got {value!r}")
    if not is_real_number(min_saving) or not 0.0 <= min_saving < 1.0:
        raise ValueError(f"{op}: min_saving must be a number in [0, 1); got {min_saving!r}")
    if set(spectra) != set(shapes):
        raise ValueError(f"{op}: spectra and shapes must name the same matrices; got {sorted(spectra)} and "
                         f"{sorted(shapes)}")
    normalized = {name: _normalized(s) for name, s in spectra.items()}
    # Ascending copies for searchsorted: k(tau) = len - #(values < tau).
    ascending = {name: v.flip(0) for name, v in normalized.items()}

    def ranks_at(tau: float) -> Dict[str, int]:
        probe = torch.tensor([tau], dtype=torch.float64)
        return {name: v.numel() - int(torch.searchsorted(v, probe)) for name, v in ascending.items()}

    if threshold is not None:
        return float(threshold), ranks_at(float(threshold))

    total = sum(m * n for m, n in shapes.values())

    def parameters(ranks: Dict[str, int]) -> int:
        count = 0
        for name, k in ranks.items():
            m, n = shapes[name]
            count += k * (m + n) if 0 < k <= _k_max(m, n, min_saving) else m * n
        return count

    # parameters(ranks_at(tau)) does not increase with tau (ranks fall, and a matrix that
    # turns into an LRC shrinks): bisect over the distinct normalized values.
    candidates = torch.cat([v[v > 0] for v in normalized.values()] + [torch.ones(1, dtype=torch.float64)])
    candidates = candidates.unique()  # ascending
    budget = ratio * total
    if parameters(ranks_at(1.0)) > budget:
        smallest = parameters(ranks_at(1.0)) / total if total else 1.0
        raise ValueError(f"{op}: ratio={ratio:g} is out of reach: even threshold 1 (rank 1, or the matrices' "
                         f"repeated top singular values) keeps {smallest:.1%} of the parameters")
    lo, hi = 0, candidates.numel() - 1  # parameters at candidates[hi] fit the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if parameters(ranks_at(float(candidates[mid]))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    tau = float(candidates[hi])
    return tau, ranks_at(tau)


def _tail_error(s: torch.Tensor, k: int) -> float:
    """``||s[k:]|| / ||s||`` (0 for s = 0), on s divided by its largest entry, so that the
    squares of float64 singular values beyond 1e154 or below 1e-154 stay in range."""
    s = s.double()
    top = s.max().item() if s.numel() else 0.0
    if top == 0.0:
        return 0.0
    s = s / top
    norm_sq = s.square().sum().item()
    return math.sqrt(s[k:].square().sum().item() / norm_sq) if norm_sq > 0 else 0.0


@torch.no_grad()
def analyze(model: torch.nn.Module, *, threshold: Optional[float] = None, ratio: Optional[float] = None,
            target_modules: Optional[Union[str, Iterable[str]]] = None, min_saving: float = 0.0) -> WeLoreReport:
    """WeLore's ranks and LRC / N-LRC split without changing ``model``.

    Parameters as :func:`compress`.  The report's errors are the optimal rank-``k`` errors
    from the exact spectra; ``parameters_after`` and ``trainable_after`` are what
    :func:`compress` would give (with ``freeze=True``).
    """
    # Tied targets refused as compress refuses them: the report is compress's plan, and a
    # shared weight would be counted once per module in the parameter budget.
    targets = _targets("analyze", model, target_modules, replacing=True)
    spectra = singular_spectra(model, target_modules=target_modules)
    shapes = {name: tuple(linear.weight.shape) for name, linear in targets.items()}
    tau, ranks = choose_ranks(spectra, shapes, threshold=threshold, ratio=ratio, min_saving=min_saving)
    report = WeLoreReport(parameters_before=count_parameters(model, trainable_only=False), threshold=tau, ranks=ranks,
                          spectra={name: _normalized(s) for name, s in spectra.items()})
    report.parameters_after = report.parameters_before
    for name, linear in targets.items():
        out_features, in_features = shapes[name]
        k = ranks[name]
        bias = 0 if linear.bias is None else linear.bias.numel()
        before = out_features * in_features + bias
        error = _tail_error(spectra[name], k)
        report.errors[name] = error
        layer = lowrank_compress.LayerCompression(in_features, out_features, None, before, before)
        k_max = _k_max(out_features, in_features, min_saving)
        if k == 0:
            layer.skipped = "N-LRC: zero weight"
        elif k > k_max:
            layer.skipped = f"N-LRC: rank {k} saves less than min_saving={min_saving:g} (ranks <= {k_max} do)"
        else:
            layer.rank, layer.error = k, error
            layer.parameters_after = k * (in_features + out_features) + bias
            report.parameters_after -= before - layer.parameters_after
            report.trainable_after += k * (in_features + out_features)
        report.layers[name] = layer
    return report


def compress(model: torch.nn.Module, *, threshold: Optional[float] = None, ratio: Optional[float] = None,
             target_modules: Optional[Union[str, Iterable[str]]] = None, min_saving: float = 0.0, freeze: bool = True,
             n_iter: Union[int, str] = "auto", generator: Optional[torch.Generator] = None) -> WeLoreReport:
    """WeLore: replaces each low-rank component of ``model`` in place by ``B A`` factors and
    (``freeze=True``) leaves only those factors trainable.

    Parameters
    ----------
    model : nn.Module
        Not itself an ``nn.Linear``.
    threshold, ratio : float
        Exactly one (:func:`choose_ranks`): the global threshold ``tau`` on the normalized spectra,
        or the target ratio of the targeted weights' parameters after / before.
    target_modules : str or list of str, optional
        fnmatch patterns (full name or last component); default every module whose type is
        exactly ``nn.Linear``.
    min_saving : float
        In ``[0, 1)``: a matrix is an LRC when ``k (in + out) < (1 - min_saving) in out``.
    freeze : bool
        True (default): every parameter of the model is frozen except the LRCs' ``B`` and
        ``A`` (biases included in the freeze); False: ``requires_grad`` as the replaced
        weights had.
    n_iter, generator
        The factors' SVD (:func:`lowrank_ops.linalg.rsvd` at rank ``k`` when ``k <= min(in,
        out) / 2``, else the exact thin SVD; same generator state, same factors).  The
        generator must be of the weights' device (ValueError before any change otherwise).

    Returns
    -------
    WeLoreReport
        Each LRC's ``layers[name].error`` is that of the stored factors (exact on the SVD
        path, rsvd's probe estimate otherwise, marked ``error_is_estimate``).

    Notes
    -----
    The layer built is :mod:`lowrank_compress`'s ``Sequential(Linear(in, k, bias=False) <-
    A, Linear(k, out) <- B + bias)``, factors in the weight's dtype and device.
    """
    op = "compress"
    if isinstance(model, torch.nn.Linear):
        raise TypeError(f"{op}: model is itself an nn.Linear, which cannot be replaced in place; wrap it "
                        "(e.g. nn.Sequential(linear)) and compress that")
    report = analyze(model, threshold=threshold, ratio=ratio, target_modules=target_modules, min_saving=min_saving)
    # analyze checked the targets (ties, finiteness): one more walk for all their names.
    sites = linear_sites(op, model, target_modules)
    targets = {names[0]: linear for linear, names in sites}
    names_of = {id(linear): names for linear, names in sites}
    for name in report.replaced:  # before any change (rsvd would reject it at the first LRC it draws for)
        require_generator(op, "generator", generator, targets[name].weight.device, f"the weight of {name}")
    if freeze:
        model.requires_grad_(False)
    for name in report.replaced:
        linear = targets[name]
        W = linear.weight.detach()
        W = W if W.dtype == torch.float64 else W.float()
        U, S, Vh, error, estimate = lowrank_compress._rank_factors(W, report.ranks[name], n_iter, generator)
        root = S.sqrt()
        replacement = lowrank_compress._factored(linear, U * root, root[:, None] * Vh)
        if freeze:
            replacement[0].weight.requires_grad_(True)
            replacement[1].weight.requires_grad_(True)
        layer = report.layers[name]
        layer.error, layer.error_is_estimate = error, estimate
        replace_everywhere(model, names_of[id(linear)], replacement)
    report.parameters_after = count_parameters(model, trainable_only=False)
    report.trainable_after = count_parameters(model)
    report.applied = True
    return report
