"""Perfusion's key-locked, gated rank-1 editing of a projection layer (Tewel, Gal, Chechik
and Atzmon, "Key-Locked Rank One Editing for Text-to-Image Personalization", SIGGRAPH
2023, arXiv:2305.01644).

The layer is a cross-attention key or value projection ``W [out, in]`` applied to
text-encoder embeddings ``x [..., in]``; ``C [in, in]`` is the second moment of such
embeddings (:func:`input_covariance`), ``i* [in]`` the concept's embedding and ``v* [out]``
the output it should produce.  The rank-1 edit (ROME's, which Perfusion builds on)

    W' = W + (v* - W i*) (C^-1 i*)^T / (i*^T C^-1 i*)

maps ``i*`` exactly to ``v*`` and leaves every input with ``x^T C^-1 i* = 0`` unchanged,
the smallest such change in the ``C``-weighted norm.  With the normalized energy of an
input along the edit direction,

    a(x) = x^T C^-1 i* / (i*^T C^-1 i*)          (a(i*) = 1),

the edited layer is ``W' x = W (x - a(x) i*) + a(x) v*``: W on the part of x outside the
concept, plus the concept's share of x sent to v*.

**Gate** (the paper's eq. 3, "gated rank-1 update", and its Algorithm 1): the linear
coefficient of ``v*`` becomes a sigmoid of the same energy,

    y = W (x - a(x) i*) + sigma((a(x) - beta) / tau) v*  (+ the base layer's bias),

with bias ``beta`` (``gate_bias``) and temperature ``tau`` (``gate_temperature``).  The
subtracted part ``a(x) W i*`` stays linear; only the injected ``v*`` is gated, so a token
carries the concept fully once its energy clears beta (the paper trains with beta = 0.75,
tau = 0.1 and tunes beta in 0.4-0.75 at inference to trade visual fidelity against text
alignment).  Note the difference from the form ``W x + sigma(.) (v* - W i*)`` (gate times
the whole difference vector): that form does not remove ``W i*``'s share of the input.
Limits: ``i*`` maps to ``sigma((1 - beta) / tau) v*`` and a C^-1-orthogonal input x to
``W x + sigma(-beta / tau) v*``; both become exact as tau -> 0 (saturated gate), and with
``gated=False`` the module is exactly ``W' x``.

**Key-locking**: for the key projection, ``v*`` is fixed to the superordinate concept's
key ``W i_super`` (``"a teddy*"`` attends where ``"a teddy"`` would); for the value
projection ``v*`` is trained (initialized to ``W i_super``).  See
:meth:`RankOneEditLinear.key_locked` and :meth:`RankOneEditLinear.value_path`.

**Several concepts** (the paper's multi-concept inference and its Appendix B): k concepts ``I* [k, in]``
with targets ``V* [k, out]``.  Summing k separate edits is exact only when the concepts
are C^-1-orthogonal; here they are solved jointly: with ``G = I* C^-1 I*^T [k, k]`` (SPD
when the concepts are linearly independent) the coefficients are

    a(x) = G^-1 I* C^-1 x  [k],

the C^-1-orthogonal projection of x onto span(I*) in the basis of the concepts, and

    y = W (x - I*^T a(x)) + V*^T sigma((a(x) - beta) / tau)     (gated)
    y = W' x,  W' = W + (V*^T - W I*^T) G^-1 I* C^-1              (ungated)

so each ``i*_c`` gives ``a = e_c`` (exactly, in exact arithmetic) and maps to ``v*_c``,
and inputs C^-1-orthogonal to every concept keep ``W x``.  This equals the paper's
Appendix B construction (QR of the concepts in the metric ``L^T``, ``L L^T = C^-1``)
written without the Cholesky root, and reduces to the single-concept formulas at k = 1.
The gate of concept c reads the jointly solved ``a_c(x)``, which equals the paper's
per-concept energy when the concepts are C^-1-orthogonal.

Cost: the forward is the base ``F.linear`` plus ``x P`` (``P = C^-1 I*^T G^-1``, ``[in,
k]``, precomputed) and one rank-2k ``addmm``: ``O(N in (out + k) + N k out)``; W' is never
formed (bench/bench_perfusion.py times it against forming W').  Only ``P``, ``C^-1 I*^T``,
``I*`` and ``V*`` are stored (the paper's "100KB model"), not ``C^-1``.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Union

import torch
import torch.nn.functional as F

from .._args import is_real_number, require_finite_number, require_number, require_tensors
from .._finite import all_finite

__all__ = ["InputCovariance", "RankOneEditLinear", "input_covariance"]

_EPS64 = 2.0**-52


class InputCovariance(NamedTuple):
    """Result of :func:`input_covariance`.

    Attributes
    ----------
    cov : Tensor[d, d]
        The regularized covariance ``C`` that was inverted (symmetric positive definite).
    inv : Tensor[d, d]
        ``C^-1`` (symmetric), from the Cholesky factor of C.
    num_samples : int
        The number of embeddings accumulated.
    """

    cov: torch.Tensor
    inv: torch.Tensor
    num_samples: int


def input_covariance(
    embeddings: Union[torch.Tensor, Iterable[torch.Tensor]],
    *,
    ridge: float = 0.0,
    shrinkage: float = 0.0,
    center: bool = False,
    dtype: torch.dtype = torch.float64,
) -> InputCovariance:
    """The input covariance ``C`` of a projection layer and its inverse, computed once.

    ``C = (1 - shrinkage) M + shrinkage (tr(M) / d) I + ridge I`` with ``M`` the second
    moment ``(1/n) sum_j x_j x_j^T`` of the n embeddings (ROME's and Perfusion's C; the
    covariance ``M - mu mu^T`` with ``center=True``).  Accumulated in float64 (sums of
    many outer products lose digits in float32), factored by Cholesky in float64, and
    inverted from the factor (``torch.cholesky_inverse``).

    Parameters
    ----------
    embeddings : Tensor[..., d] or iterable of Tensor[..., d]
        Text-encoder outputs (any float dtype); leading dims are flattened into samples.
        An iterable (a generator of batches, say) is accumulated chunk by chunk, so the
        samples never need to be in memory together.
    ridge : float
        ``>= 0``, added to the diagonal (absolute, in the embeddings' squared units).
    shrinkage : float
        In ``[0, 1]``: convex combination with the scaled identity ``tr(M)/d I``
        (Ledoit-Wolf's target), scale-free.
    center : bool
        Subtract the mean (the covariance); default False: the raw second moment, as
        the paper.
    dtype : torch.dtype
        Of the returned ``cov`` and ``inv`` (float64 by default: RankOneEditLinear solves
        with ``inv`` in float64 anyway).

    Returns
    -------
    InputCovariance
        ``(cov, inv, num_samples)``.

    Raises
    ------
    ValueError
        No samples, mismatched widths between chunks, non-finite values, bad
        ``ridge``/``shrinkage``, or a singular (or numerically singular: estimated
        reciprocal condition number below ``100 d 2^-52``) regularized covariance, for
        example fewer samples than dimensions without ``ridge``/``shrinkage``.
    """
    op = "input_covariance"
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:  # (int32: truncated cov and inv, silently)
        raise TypeError(f"{op}: dtype must be a floating torch.dtype; got {dtype}")
    ridge = require_number(op, "ridge", ridge, 0.0)
    if not is_real_number(shrinkage) or not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"{op}: shrinkage must be a number in [0, 1]; got {shrinkage!r}")
    shrinkage = float(shrinkage)
    chunks = [embeddings] if isinstance(embeddings, torch.Tensor) else embeddings
    moment = total = None
    count, width = 0, None
    for index, chunk in enumerate(chunks):
        require_tensors(op, **{f"embeddings[{index}]": chunk})
        if chunk.dim() < 1 or not chunk.is_floating_point():
            raise ValueError(f"{op}: embeddings must be floating tensors [..., d]; got dtype {chunk.dtype} "
                             f"and shape {tuple(chunk.shape)}")
        if width is None:
            width = chunk.shape[-1]
            if width == 0:
                raise ValueError(f"{op}: embeddings have width d = 0 (shape {tuple(chunk.shape)}); expected d >= 1")
        elif chunk.shape[-1] != width:
            raise ValueError(f"{op}: embeddings chunk {index} has width {chunk.shape[-1]}; expected d = {width} "
                             f"(the first chunk's)")
        rows = chunk.detach().reshape(-1, width).to(torch.float64)
        if not all_finite(rows):
            raise ValueError(f"{op}: embeddings chunk {index} has non-finite values")
        if moment is None:
            moment = rows.new_zeros(width, width)
            total = rows.new_zeros(width)
        moment.addmm_(rows.T, rows)
        total += rows.sum(0)
        count += rows.shape[0]
    if not count or not width:
        raise ValueError(f"{op}: embeddings has no samples (n = {count}, d = {width})")
    cov = moment / count
    if center:
        mean = total / count
        cov -= torch.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    if shrinkage:
        scale = cov.diagonal().sum() / width
        cov.mul_(1.0 - shrinkage)
        cov.diagonal().add_(shrinkage * scale)
    if ridge:
        cov.diagonal().add_(ridge)
    L = _cholesky_or_raise(cov, op, "embeddings", f"the regularized covariance of n = {count} samples in d = {width} "
                           f"(ridge = {ridge}, shrinkage = {shrinkage})", "; pass ridge > 0 or shrinkage > 0")
    # potri (torch.cholesky_inverse, n^3 flops after the factorization) rather than two
    # triangular solves against I (potrs, 2 n^3) or LU's getri: on the quiet 2-core Xeon,
    # float64, 6.2 / 14.6 / 112 ms at d = 768 / 1024 / 2048 against 17.8 / 21.3 / 163 (potrs)
    # and 21.7 / 36.3 / 261 (torch.linalg.inv).  (Under heavy load from other jobs every one
    # of them was erratic, potri most: medians of seconds.)
    inv = torch.cholesky_inverse(L)
    inv = 0.5 * (inv + inv.T)
    return InputCovariance(cov.to(dtype), inv.to(dtype), count)


def _cholesky_or_raise(matrix: torch.Tensor, op: str, name: str, what: str, hint: str = "") -> torch.Tensor:
    """The float64 Cholesky factor of the symmetric ``matrix``, or a ValueError when it is
    not positive definite or its estimated reciprocal condition number (the squared ratio
    of the factor's extreme diagonal entries, an upper bound of the true one) is below
    ``d * eps``: an inverse from such a factor has no correct digits."""
    L, info = torch.linalg.cholesky_ex(matrix)
    d = matrix.shape[0]
    if int(info) != 0:
        raise ValueError(f"{op}: {name}: {what} is not positive definite (Cholesky failed at column {int(info)}){hint}")
    diag = L.diagonal()
    rcond = float((diag.min() / diag.max()) ** 2)
    if not rcond >= 100 * d * _EPS64:
        raise ValueError(f"{op}: {name}: {what} is numerically singular (estimated reciprocal condition "
                         f"{rcond:.3e} < 100 d eps = {100 * d * _EPS64:.3e}){hint}")
    return L


def _as_rows(op: str, name: str, value: torch.Tensor, width: int, width_name: str) -> torch.Tensor:
    """``value`` [width] or [k, width] as [k, width] (k >= 1), finite; ValueError otherwise."""
    require_tensors(op, **{name: value})
    rows = value.unsqueeze(0) if value.dim() == 1 else value
    if rows.dim() != 2 or rows.shape[1] != width or rows.shape[0] < 1 or not value.is_floating_point():
        raise ValueError(f"{op}: {name} has shape {tuple(value.shape)} and dtype {value.dtype}; expected a float "
                         f"tensor ({width_name},) = ({width},) or (k, {width_name}) = (k, {width}) with k >= 1")
    if not all_finite(rows):
        raise ValueError(f"{op}: {name} has non-finite values")
    return rows


class RankOneEditLinear(torch.nn.Module):
    """A ``nn.Linear`` with Perfusion's gated rank-1 edits for k concepts, applied without
    forming the edited weight (see the module docstring for the formulas).

    ``y = W (x - I*^T a(x)) + V*^T g(a(x)) + b`` with ``a(x) = G^-1 I* C^-1 x``,
    ``g(a) = sigmoid((a - gate_bias) / gate_temperature)`` (``gated=True``) or ``g(a) = a``
    (``gated=False``: exactly ``W' x + b``, :meth:`merge`).

    Parameters
    ----------
    base_layer : nn.Linear
        The projection ``W [out, in]`` (bias ``b`` kept unchanged); wrapped, not copied.
        Its parameters keep their ``requires_grad`` (Perfusion freezes them: set it).
    inv_cov : Tensor[in, in]
        ``C^-1`` (:func:`input_covariance`'s ``inv``), symmetric positive definite; used
        once here (in float64) and not stored.
    concept_input : Tensor[in] or Tensor[k, in]
        The concepts' input embeddings ``i*`` (linearly independent), kept as a buffer (no
        gradient flows to it: Perfusion trains the concept word's embedding upstream and
        moves ``i*`` with :meth:`set_concepts`).
    target : Tensor[out] or Tensor[k, out]
        The outputs ``v*`` (before the bias).  A Parameter with ``train_target=True``
        (value path), otherwise a buffer (key path, locked).
    gate_bias : float
        beta (finite); default 0.75 as the paper's training setting.
    gate_temperature : float
        tau ``> 0``; default 0.1.
    gated : bool
        The sigmoid gate (True) or the linear, ungated edit (False); may be flipped later.
    train_target : bool
        Make ``target`` a trainable Parameter (the value path).

    Attributes
    ----------
    concept_input : buffer [k, in]
    target : Parameter or buffer [k, out]
    concept_keys : buffer [k, in]
        ``I* C^-1`` (the rows ``(C^-1 i*_c)^T``), kept so that :meth:`combine` can solve
        several modules' concepts jointly without C^-1.
    probe : buffer [in, k]
        ``P = C^-1 I*^T G^-1``: ``a(x) = x P``.  Computed in float64 and stored in the
        base weight's dtype (float32 for half weights).

    Notes
    -----
    Inputs x of dtype float16/bfloat16 compute ``a(x)`` and the rank-2k term in float32
    (the gate's argument ``(a - beta) / tau`` would otherwise carry a 10x amplified
    half-precision rounding) and round the sum once into x's dtype.
    """

    def __init__(
        self,
        base_layer: torch.nn.Linear,
        inv_cov: torch.Tensor,
        concept_input: torch.Tensor,
        target: torch.Tensor,
        *,
        gate_bias: float = 0.75,
        gate_temperature: float = 0.1,
        gated: bool = True,
        train_target: bool = False,
    ) -> None:
        super().__init__()
        op = "RankOneEditLinear"
        if not isinstance(base_layer, torch.nn.Linear):
            raise TypeError(f"{op}: base_layer must be an nn.Linear; got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._set_gate(op, gate_bias, gate_temperature, gated)
        concepts = _as_rows(op, "concept_input", concept_input, self.in_features, "in_features")
        keys = self._concept_keys(op, inv_cov, concepts)
        targets = _as_rows(op, "target", target, self.out_features, "out_features")
        self._store(op, concepts, keys, targets, train_target)

    # ------------------------------------------------------------------ construction
    def _set_gate(self, op: str, gate_bias: float, gate_temperature: float, gated: bool) -> None:
        self.gate_bias = require_finite_number(op, "gate_bias", gate_bias)
        self.gate_temperature = require_number(op, "gate_temperature", gate_temperature, 0.0, low_open=True)
        self.gated = bool(gated)

    def _concept_keys(self, op: str, inv_cov: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """``I* C^-1`` [k, in] in float64 after checking ``inv_cov`` (shape, finite, symmetric
        to 1e-6 of its largest entry)."""
        in_f = self.in_features
        require_tensors(op, inv_cov=inv_cov)
        if tuple(inv_cov.shape) != (in_f, in_f) or not inv_cov.is_floating_point():
            raise ValueError(f"{op}: inv_cov has shape {tuple(inv_cov.shape)} and dtype {inv_cov.dtype}; expected a "
                             f"float tensor (in_features, in_features) = ({in_f}, {in_f})")
        if not all_finite(inv_cov):
            raise ValueError(f"{op}: inv_cov has non-finite values")
        C_inv = inv_cov.detach().to(device=self.base_layer.weight.device, dtype=torch.float64)
        asym = float((C_inv - C_inv.T).abs().max())
        if asym > 1e-6 * float(C_inv.abs().max()):
            raise ValueError(f"{op}: inv_cov is not symmetric (max |inv_cov - inv_cov^T| = {asym:.3e})")
        return concepts.detach().to(C_inv) @ C_inv  # (C^-1 I*^T)^T, C^-1 symmetric

    def _store(self, op: str, concepts: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
               train_target: bool, keep_target: bool = False) -> None:
        """Checks the counts, solves for the probe and (re)registers the buffers and the
        target (left as it is with ``keep_target``)."""
        k = concepts.shape[0]
        if targets.shape[0] != k:
            raise ValueError(f"{op}: target has {targets.shape[0]} rows; expected k = {k} (one per concept_input row)")
        if k > self.in_features:
            raise ValueError(f"{op}: concept_input has k = {k} rows; expected k <= in_features = {self.in_features} "
                             f"(independent concepts)")
        weight = self.base_layer.weight
        factory = {"dtype": weight.dtype, "device": weight.device}
        probe = self._solve_probe(op, concepts.detach().to(keys), keys.to(torch.float64), weight)
        self.register_buffer("concept_input", concepts.detach().to(**factory).clone())
        self.register_buffer("concept_keys", keys.detach().to(**factory).clone())
        self.register_buffer("probe", probe)
        if keep_target:
            return
        targets = targets.detach().to(**factory).clone()
        if train_target:
            self.target = torch.nn.Parameter(targets)
        else:
            self.register_buffer("target", targets)

    def set_concepts(self, inv_cov: torch.Tensor, concept_input: torch.Tensor) -> None:
        """Replaces the concepts' input embeddings ``i*`` (same k), keeping the targets:
        Perfusion updates ``i*`` during training (a running mean of the concept word's
        encoder outputs).  ``inv_cov`` is needed again because only ``I* C^-1`` is stored."""
        op = "RankOneEditLinear.set_concepts"
        concepts = _as_rows(op, "concept_input", concept_input, self.in_features, "in_features")
        keys = self._concept_keys(op, inv_cov, concepts)
        k = self.target.shape[0]
        if concepts.shape[0] != k:
            raise ValueError(f"{op}: concept_input has {concepts.shape[0]} rows; expected k = {k} (the module's "
                             f"concepts)")
        self._store(op, concepts, keys, self.target, isinstance(self.target, torch.nn.Parameter), keep_target=True)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``to``, ``half``, ``cuda``, ...), keeping the probe in at least
        float32 as it is built: ``.half()`` cast it to float16 and the gate's ``(a - beta) /
        tau`` amplified its rounding tenfold (7.9e-4 against 8.1e-5 at d = 768)."""
        probe = getattr(self, "probe", None)
        module = super()._apply(fn, recurse)
        if probe is not None and self.probe.dtype in (torch.float16, torch.bfloat16):
            self.probe = probe.to(device=self.probe.device, dtype=torch.float32)
        return module

    @staticmethod
    def _solve_probe(op: str, concepts64: torch.Tensor, keys64: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``P = C^-1 I*^T G^-1`` with ``G = I* C^-1 I*^T``, in float64 (Cholesky of G),
        stored in the weight's dtype promoted to at least float32."""
        gram = concepts64 @ keys64.T
        gram = 0.5 * (gram + gram.T)
        L = _cholesky_or_raise(gram, op, "concept_input", "the concepts' Gram matrix I* C^-1 I*^T",
                               "; expected linearly independent concepts and a positive definite inv_cov")
        probe = torch.cholesky_solve(keys64, L).T  # (G^-1 I* C^-1)^T, G symmetric
        return probe.to(torch.promote_types(weight.dtype, torch.float32))

    @staticmethod
    def superordinate_target(base_layer: torch.nn.Linear, superordinate_input: torch.Tensor) -> torch.Tensor:
        """``W i_super`` [k, out] (no bias) in float64 accumulation, the key-locked target."""
        rows = _as_rows("RankOneEditLinear", "superordinate_input", superordinate_input, base_layer.in_features,
                        "in_features")
        weight = base_layer.weight.detach()
        return (rows.detach().to(weight.device, torch.float64) @ weight.double().T).to(weight.dtype)

    @classmethod
    def key_locked(cls, base_layer: torch.nn.Linear, inv_cov: torch.Tensor, concept_input: torch.Tensor,
                   superordinate_input: torch.Tensor, **kwargs) -> "RankOneEditLinear":
        """The key path: ``v* = W i_super`` locked (a buffer, never trained)."""
        target = cls.superordinate_target(base_layer, superordinate_input)
        return cls(base_layer, inv_cov, concept_input, target, train_target=False, **kwargs)

    @classmethod
    def value_path(cls, base_layer: torch.nn.Linear, inv_cov: torch.Tensor, concept_input: torch.Tensor,
                   superordinate_input: torch.Tensor, **kwargs) -> "RankOneEditLinear":
        """The value path: ``v*`` a Parameter initialized to ``W i_super`` (trained)."""
        target = cls.superordinate_target(base_layer, superordinate_input)
        return cls(base_layer, inv_cov, concept_input, target, train_target=True, **kwargs)

    @classmethod
    def combine(cls, *modules: "RankOneEditLinear", **kwargs) -> "RankOneEditLinear":
        """One module holding the concepts of several (trained) modules on the same base
        layer, solved jointly (the module docstring's multi-concept form).

        ``G = I* C^-1 I*^T`` is rebuilt from the stored ``concept_keys`` (``I* C^-1``),
        so C^-1 is not needed.  Gate settings come from the first module unless given in
        ``kwargs``; the target is trainable if any module's is.
        """
        op = "RankOneEditLinear.combine"
        if not modules or not all(isinstance(m, RankOneEditLinear) for m in modules):
            raise TypeError(f"{op}: expected one or more RankOneEditLinear modules; got "
                            f"{[type(m).__name__ for m in modules]}")
        base = modules[0].base_layer
        for index, module in enumerate(modules[1:], 1):
            if module.base_layer is not base:
                raise ValueError(f"{op}: modules[{index}] wraps a different base layer than modules[0]; "
                                 f"expected the same nn.Linear object")
        first = modules[0]
        settings = {"gate_bias": first.gate_bias, "gate_temperature": first.gate_temperature, "gated": first.gated,
                    "train_target": any(isinstance(m.target, torch.nn.Parameter) for m in modules)}
        unknown = sorted(set(kwargs) - set(settings))
        if unknown:
            raise TypeError(f"{op}: unexpected keyword arguments {unknown}; expected some of {sorted(settings)}")
        settings.update(kwargs)
        combined = cls.__new__(cls)
        torch.nn.Module.__init__(combined)
        combined.base_layer = base
        combined.in_features, combined.out_features = first.in_features, first.out_features
        combined._set_gate(op, settings["gate_bias"], settings["gate_temperature"], settings["gated"])
        concepts = torch.cat([m.concept_input for m in modules])
        keys = torch.cat([m.concept_keys for m in modules]).double()
        targets = torch.cat([m.target.detach() for m in modules])
        combined._store(op, concepts, keys, targets, settings["train_target"])
        return combined

    # ------------------------------------------------------------------ application
    @property
    def num_concepts(self) -> int:
        return self.concept_input.shape[0]

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """``a(x) = x P`` [..., k]: each concept's share of x (1 at its own ``i*``, 0 at the
        others' and at C^-1-orthogonal inputs), in float32 or float64."""
        probe = self.probe
        return x.to(probe.dtype) @ probe

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The coefficients of the targets, ``g(a(x))`` [..., k]."""
        a = self.coefficients(x)
        return self._gate(a)

    def _gate(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((a - self.gate_bias) / self.gate_temperature) if self.gated else a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The edited projection.

        Parameters
        ----------
        x : Tensor[..., in_features]
            In the base weight's dtype and on its device.

        Returns
        -------
        Tensor[..., out_features]
            ``W x + b + g(a)^T V* - a^T (I* W^T)`` in x's dtype; differentiable in x, the
            target (value path) and the base layer's parameters.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"RankOneEditLinear: x has shape {tuple(x.shape)}; expected (..., in_features) = "
                             f"(..., {self.in_features})")
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"RankOneEditLinear: x has dtype {x.dtype}; expected {weight.dtype} (the base weight's)")
        y = F.linear(x, weight, bias)
        compute = self.probe.dtype
        a = self.coefficients(x)
        # One rank-2k product for both the injected targets and the removed W i* share.
        # [k, out] = I* W^T in the compute dtype (a float32 copy of a half W: k rows of
        # output need it, at the cost of reading W once more).
        concept_out = F.linear(self.concept_input.to(compute), weight.to(compute))
        coef = torch.cat([self._gate(a), a], dim=-1)
        rows = torch.cat([self.target.to(compute), -concept_out], dim=0)
        coef = coef.reshape(-1, coef.shape[-1])
        # Accumulated into y in place (F.linear's backward does not need its output): no
        # [N, out] temporary and one pass over y fewer than ``y + coef @ rows``.
        if y.dtype == compute:
            y.view(-1, self.out_features).addmm_(coef, rows)
            return y
        wide = y.to(compute)
        wide.view(-1, self.out_features).addmm_(coef, rows)
        return wide.to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The ungated edit's dense ``W' = W + (V*^T - W I*^T) P^T`` [out, in], in float64
        arithmetic, rounded once to the base weight's dtype."""
        weight = self.base_layer.weight
        W = weight.double()
        delta = self.target.double().T - W @ self.concept_input.double().T  # [out, k]
        return torch.addmm(W, delta, self.probe.double().T).to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> torch.nn.Linear:
        """A new ``nn.Linear`` with weight :meth:`merged_weight` and the base bias: the same
        function as this module when ``gated=False``.

        Raises ValueError for a gated module (the gate is not linear in x, no dense W'
        reproduces it): set ``gated = False`` first to merge the ungated edit.
        """
        if self.gated:
            raise ValueError("RankOneEditLinear.merge: the module is gated (gated=True), whose output is not linear "
                             "in x; set gated = False to merge the ungated rank-1 edit")
        base = self.base_layer
        weight = base.weight
        merged = torch.nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                                 device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(self.merged_weight())
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, concepts={self.num_concepts}, "
                f"gated={self.gated}, gate_bias={self.gate_bias}, gate_temperature={self.gate_temperature}, "
                f"train_target={isinstance(self.target, torch.nn.Parameter)}")
