"""LoRA adapter around a frozen ``nn.Linear`` (LoRA, rsLoRA, DyLoRA, SoRA gate, DoRA)."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .._args import is_integer, is_real_number, require_finite_number, require_generator_type
from .._finite import all_finite
from .._optimizer_steps import optimizer_steps
from ..ops._library import dispatch_needed
from ..ops.dora import DEFAULT_EPS, dora_linear, dora_row_norm, floor_zero_norms
from ..ops.lora import adapter_term, composed_dropout, lora_linear, lora_merge, lora_unmerge
from ._adapter_base import checkpoint_unmerged
from ._init import fan_in_bound, normal_, parse_lora_init, split_weight, uniform_
from ._plain import plain_linear, through_base
from ._traced_rank import ActiveRank

__all__ = ["LoRALinear"]


class LoRALinear(ActiveRank, torch.nn.Module):
    """``y = base(x) + scaling * ((dropout(x) A^T) * g) B^T`` around a frozen ``nn.Linear``.

    Names follow PEFT's LoRA layer: ``base_layer`` (the wrapped linear, frozen),
    ``lora_A [r, in]``, ``lora_B [out, r]``, ``scaling``, ``lora_dropout`` (the probability)
    and, with ``use_dora``, ``lora_magnitude_vector [out]``.

    Parameters
    ----------
    base_layer : nn.Linear
        Wrapped as is (not copied); its parameters are set to ``requires_grad=False``.
    r : int
        Adapter rank, ``>= 1``.
    lora_alpha : float
        ``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.
    lora_dropout : float
        Dropout probability on the adapter input (training mode only).
    use_rslora : bool
    use_gate : bool
        Adds SoRA's trainable gate ``lora_gate [r]`` (initialized to ones); train it with
        :class:`lowrank_ops.methods.sora.SparseAdamW`, then prune the zeroed ranks with
        :func:`lowrank_ops.methods.sora.prune_gated_ranks`.
    use_dora : bool
        DoRA: trainable ``lora_magnitude_vector`` initialized to the row norms of
        ``W + scaling B A``; the forward is :func:`lowrank_ops.ops.dora_linear`.
    dtype : torch.dtype, optional
        Of the adapter parameters: the base weight's (default) or float32.
    init_lora_weights : bool or str
        PEFT's names and meanings:

        * ``True`` (default): A Kaiming-uniform (a = sqrt(5)), B = 0: the layer starts as
          the base layer;
        * ``"gaussian"``: A ~ N(0, 1 / r^2), B = 0;
        * ``False``: A and B both Kaiming-uniform (not a no-op; for tests);
        * ``"pissa"``: PiSSA: ``s B A`` is the best rank-r approximation of the base
          weight (exact SVD) and the base weight becomes the residual, so the layer's
          function is unchanged up to rounding; needs ``r <= min(in, out)`` and
          ``scaling > 0``;
        * ``"pissa_niter_K"``: the same from :func:`lowrank_ops.linalg.rsvd` with K power
          iterations (seconds faster than the exact SVD at LLaMA shapes);
        * ``"olora"``: OLoRA: ``B = Q[:, :r]``, ``A = R[:r]`` from the QR factorization
          of the base weight, the residual left in the base.

        The SVD and QR run in float32 (float64 for float64 weights).  LoRA-GA, which
        needs a gradient of the model's loss, is applied after construction by
        :func:`lowrank_ops.methods.lora_ga.lora_ga_init_`.
    generator : torch.Generator, optional
        Makes the initialization reproducible.  Dropout masks come from torch's default
        generator (reproducible with ``torch.manual_seed``), because a Generator object
        cannot be traced by ``torch.compile(fullgraph=True)``.

    Attributes
    ----------
    active_rank : int or None
        DyLoRA: the number of leading ranks used by forward (None: all r); set it between
        steps, e.g. to a sampled rank; nothing is copied.
    merged : bool
        Whether the adapter is currently merged into the base weight.  ``state_dict()``
        always holds the unmerged base weight, and ``load_state_dict()`` into a merged
        layer re-merges with the loaded factors, so a checkpoint means the same whichever
        state saved or loads it (a merged weight loaded into an unmerged layer used to add
        the adapter twice).

    Notes
    -----
    Initialization as PEFT's default: ``A`` Kaiming-uniform (a = sqrt(5)), ``B = 0``, so the
    layer starts as the base layer (see ``init_lora_weights`` for the others).
    """

    _split_pending = False  # see __init__ (a class default for layers pickled before it existed)

    def __init__(
        self,
        base_layer: torch.nn.Linear,
        r: int,
        lora_alpha: float = 8.0,
        *,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_gate: bool = False,
        use_dora: bool = False,
        dtype: Optional[torch.dtype] = None,
        init_lora_weights: Union[bool, str] = True,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        if not isinstance(base_layer, torch.nn.Linear):
            raise TypeError(f"LoRALinear: base_layer must be a torch.nn.Linear; got {type(base_layer).__name__}")
        if not is_integer(r) or r < 1:
            raise ValueError(f"LoRALinear: r must be an int >= 1; got {r!r}")
        r = int(r)
        require_finite_number("LoRALinear", "lora_alpha", lora_alpha)
        if not is_real_number(lora_dropout) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoRALinear: lora_dropout must be a number in [0, 1); got {lora_dropout!r}")
        require_generator_type("LoRALinear", "generator", generator)
        if use_gate and use_dora:
            raise ValueError("LoRALinear: use_gate and use_dora cannot be combined (dora_linear has no gate)")
        self.init_lora_weights, self._init_iterations = parse_lora_init("LoRALinear", init_lora_weights)
        weight = base_layer.weight
        dtype = weight.dtype if dtype is None else dtype
        if dtype not in (weight.dtype, torch.float32):
            raise TypeError(f"LoRALinear: dtype is {dtype}; expected the base weight's ({weight.dtype}) or float32")
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha = r, float(lora_alpha)
        self.use_rslora, self.use_dora = use_rslora, use_dora
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        if self.init_lora_weights in ("pissa", "olora"):
            if r > min(self.in_features, self.out_features):
                raise ValueError(f"LoRALinear: init_lora_weights={init_lora_weights!r} needs r <= min(in_features, "
                                 f"out_features) = {min(self.in_features, self.out_features)}; got r = {r}")
            if self.init_lora_weights == "pissa" and not self.scaling > 0:
                raise ValueError(f"LoRALinear: init_lora_weights={init_lora_weights!r} needs scaling > 0 (it splits "
                                 f"the singular values as sqrt(S / scaling)); got lora_alpha = {lora_alpha}")
        self.lora_dropout = float(lora_dropout)
        self.active_rank: Optional[int] = None
        self.merged = False
        self._merged_norm: Optional[torch.Tensor] = None  # DoRA: the row norms the merge divided by
        self._merged_rank: Optional[int] = None  # the ranks merged (active_rank may change before unmerge)
        self._merged_lost_rows: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # DoRA: see merge
        self._norm_cache: Optional[Tuple[tuple, tuple, torch.Tensor]] = None  # DoRA, eval: (W A B, key, norms)
        checkpoint_unmerged(self)  # the saved form is always the unmerged one
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = torch.nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = torch.nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.lora_gate = torch.nn.Parameter(torch.ones(r, **factory)) if use_gate else None
        self.lora_magnitude_vector = (
            torch.nn.Parameter(torch.empty(self.out_features, **factory)) if use_dora else None
        )
        # PiSSA / OLoRA built on meta: no split (shapes only); reset_parameters() after to_empty()
        # splits the base weight then (the adapter's uninitialized factors are not part of it).
        self._split_pending = False
        self._initialize(None, generator)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-initializes the adapter as ``init_lora_weights`` says; gate = 1, magnitude = row
        norms of ``W + s B A``.

        PiSSA and OLoRA split the layer's current effective weight (base plus adapter, as
        :meth:`merge` would fold it) again, so the layer's function is kept and its
        principal part moves back into the adapter.  Raises RuntimeError while merged, and
        ValueError for PiSSA / OLoRA with ``active_rank`` below r (the split fills all r
        ranks, the forward would use fewer: the function changed).
        """
        if self.merged:
            raise RuntimeError("LoRALinear.reset_parameters: the adapter is merged into the base weight; unmerge() first")
        splits = self.init_lora_weights in ("pissa", "olora")
        if splits and self.active_rank not in (None, self.r):
            # The split fills all r ranks, while the forward would use the first active_rank.
            raise ValueError(f"LoRALinear.reset_parameters: init_lora_weights={self.init_lora_weights!r} splits the "
                             f"effective weight over all r = {self.r} ranks, but active_rank = {self.active_rank}; "
                             "set active_rank = None first")
        effective = self._effective_weight() if splits and not self._split_pending else None
        self._initialize(effective, generator)

    @torch.no_grad()
    def _initialize(self, effective: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> None:
        """Sets every adapter parameter; PiSSA and OLoRA split ``effective`` (default: the base
        weight) and write the residual into the base weight (rounded once)."""
        kind = self.init_lora_weights
        if kind in ("pissa", "olora"):
            weight = self.base_layer.weight
            if weight.is_meta or self.lora_A.is_meta:  # shapes only: no values to check or factorize
                self._split_pending = True
                return
            if effective is None:
                effective = weight.to(torch.promote_types(weight.dtype, torch.float32))
            if not all_finite(effective):  # the SVD would fail, the QR spread NaN
                raise ValueError(f"LoRALinear: init_lora_weights={self.init_lora_weights!r} splits the layer's weight, "
                                 f"which holds {int((~torch.isfinite(effective)).sum())} non-finite entries")
            A, B, residual = split_weight(effective, self.r, self.scaling, kind, self._init_iterations,
                                          self.lora_A.dtype, generator)
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            weight.copy_(residual)
            self._split_pending = False
        elif kind == "gaussian":
            normal_(self.lora_A, 1.0 / self.r, generator)
            self.lora_B.zero_()
        else:
            uniform_(self.lora_A, fan_in_bound(self.in_features), generator)  # kaiming_uniform_, a = sqrt(5)
            if kind is True:
                self.lora_B.zero_()
            else:  # False: B as nn.Linear would initialize a [out, r] weight
                uniform_(self.lora_B, fan_in_bound(self.r), generator)
        if self.lora_gate is not None:
            self.lora_gate.fill_(1.0)
        if self.lora_magnitude_vector is not None:
            norm = dora_row_norm(self.base_layer.weight, self.lora_A, self.lora_B, self.scaling)
            self.lora_magnitude_vector.copy_(norm)

    @torch.no_grad()
    def _effective_weight(self) -> torch.Tensor:
        """The weight the forward applies, ``W + s B diag(g) A`` (DoRA: its rows scaled to the
        magnitudes), in float32 (float64 for float64 weights)."""
        lora_A, lora_B, gate = self._factors()
        weight = self.base_layer.weight
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        expand = lora_B.to(accumulate) if gate is None else lora_B.to(accumulate) * gate.to(accumulate)
        effective = torch.addmm(weight.to(accumulate), expand, lora_A.to(accumulate), alpha=self.scaling)
        if self.use_dora:
            norm = floor_zero_norms(effective.norm(dim=1), DEFAULT_EPS)  # as the forward
            effective *= (self.lora_magnitude_vector.to(accumulate) / norm)[:, None]
        return effective

    def _factors(self, rank: Optional[int] = None):
        """``(A, B, gate)`` of the first ``rank`` ranks (default: ``active_rank``, or all r)."""
        # The traced value: under torch.compile a symbolic size, never the int itself (whose
        # every value would be a guard, hence a recompile).
        k = rank if rank is not None else ActiveRank.active_rank.traced(self)
        k = self.r if k is None else k
        if not (isinstance(k, torch.SymInt) or is_integer(k)) or not 0 <= k <= self.r:  # slicing would clamp it
            raise ValueError(f"LoRALinear: active_rank must be None or an int in [0, r] = [0, {self.r}]; got {k!r}")
        k = k if isinstance(k, torch.SymInt) else int(k)
        gate = None if self.lora_gate is None else self.lora_gate[:k]
        return self.lora_A[:k], self.lora_B[:, :k], gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer plus the adapter (or, after :meth:`merge`, the merged base layer).

        Parameters
        ----------
        x : Tensor[..., in_features]
            In the base weight's dtype (float32, float64, float16 or bfloat16) and on its
            device.  In training mode the adapter input goes through dropout with
            probability ``lora_dropout``; eval mode uses none.

        Returns
        -------
        Tensor[..., out_features]
            ``base(x) + scaling * ((dropout(x) A^T) * g) B^T`` on the first ``active_rank``
            ranks (:func:`lowrank_ops.ops.lora_linear`), or DoRA's output
            (:func:`lowrank_ops.ops.dora_linear`) with ``use_dora``; in x's dtype,
            differentiable in x and the adapter parameters.
        """
        if self.merged:
            return self.base_layer(x)
        p = self.lora_dropout if self.training else 0.0
        if not plain_linear(self.base_layer):
            return self._forward_through_base(x, p)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self.use_dora:
            lora_A, lora_B, _ = self._factors()
            return dora_linear(x, weight, lora_A, lora_B, self.lora_magnitude_vector, bias, scale=self.scaling,
                               dropout_p=p, norm=self._eval_row_norm(lora_A, lora_B))
        return lora_linear(x, weight, self.lora_A, self.lora_B, bias, scale=self.scaling, gate=self.lora_gate,
                           rank=ActiveRank.active_rank.traced(self), dropout_p=p)

    def _forward_through_base(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """The forward with ``base_layer`` called, composed of torch ops: for a base the fused
        ops may not read (hooks, a subclass's forward, a tensor-subclass weight: reading W and b
        skipped them, 0.64 off with a hook zeroing the base output).  DoRA as PEFT composes
        it, with ``c = m / ||W + s B A||`` (detached norm): ``c (base(x) - b + s B A x) + b``
        without dropout, ``base(x) + (c - 1) D(x) W^T + c s B A D(x)`` with it (W read for the
        dropped input, as PEFT and the fused op)."""
        lora_A, lora_B, gate = self._factors()
        if not self.use_dora:
            return through_base(self.base_layer, x, lora_A, lora_B, self.scaling, gate, p)
        base = self.base_layer(x)  # first: a pre-hook may recompute the weight the norm reads
        adapter_input = composed_dropout(x, p, None)  # the fused op's mask for the same generator state
        delta = adapter_term(adapter_input, lora_A, lora_B, None, self.scaling)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        norm = self._eval_row_norm(lora_A, lora_B)
        if norm is None:
            norm = dora_row_norm(weight, lora_A, lora_B, self.scaling)  # detached
        factor = self._dora_factor(norm)  # float32 (float64 weights: float64): a half m / n overflows
        if adapter_input is x:
            core = base if bias is None else base - bias
            out = factor * (core + delta.to(base.dtype))
            out = out if bias is None else out + bias
        else:
            out = base + (factor - 1) * (adapter_input @ weight.T) + factor * delta
        return out.to(base.dtype)

    def _eval_row_norm(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> Optional[torch.Tensor]:
        """DoRA's row norms ``||W + s B A||``, cached in eval mode (None in training mode).

        The norm is detached in DoRA's forward, so a cached one gives the same outputs and
        gradients; it is the op's largest cost at small batch (decoding: 4096 x 4096, r = 16,
        one row, it is most of the call).  The cache is keyed by the version counters (in-place
        writes such as ``copy_`` and ``load_state_dict`` bump them), the count of optimizer
        steps (fused optimizers do not bump versions), identity
        (it holds W, A and B), storage, dtype and strides of W, A and B, the scaling and the
        active rank; writes through ``.data``
        bypass version counters, so call :meth:`train` (which drops the cache) after them.
        Not used while ``torch.compile`` traces (no Python-side state in graphs), nor for
        parameters created in inference mode (they have no version counter).
        """
        weight = self.base_layer.weight
        if self.training or dispatch_needed(weight) or any(
                t.is_inference() for t in (weight, self.lora_A, self.lora_B)):  # no version counters there
            return None
        # The tensors themselves are kept and compared by identity: a key of addresses alone
        # matched a new tensor allocated where a freed one was (functional_call with fresh
        # factors each step) and returned the old norms.
        tensors = (weight, self.lora_A, self.lora_B)
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride()) for t in tensors) + (
            self.scaling, lora_A.shape[0], torch.is_inference_mode_enabled(), optimizer_steps())  # fused steps
        # do not bump versions
        cache = self._norm_cache
        if cache is None or any(a is not b for a, b in zip(cache[0], tensors)) or cache[1] != key:
            with torch.no_grad():
                self._norm_cache = cache = (tensors, key, dora_row_norm(weight, lora_A, lora_B, self.scaling))
        return cache[2]

    def train(self, mode: bool = True) -> "LoRALinear":
        """``nn.Module.train``; also drops the cached DoRA row norms (see :meth:`_eval_row_norm`)."""
        self._norm_cache = None
        return super().train(mode)

    def _dora_factor(self, norm: torch.Tensor) -> torch.Tensor:
        """DoRA's row scale ``m / n`` in the norm's dtype (float32, float64 for float64 weights),
        zero norms replaced as in the forward."""
        return self.lora_magnitude_vector.to(norm.dtype) / floor_zero_norms(norm, DEFAULT_EPS)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the adapter into the base weight in place (float32 accumulation, one rounding).

        LoRA: ``W <- W + s B diag(g) A``.  DoRA: ``W <- (m / n) (W + s B A)`` with n the row
        norms before merging (kept for :meth:`unmerge`), computed in float32 and rounded to
        W's dtype once (rounding ``W + s B A`` and then the scaled rows left 36 % of a
        bfloat16 weight's entries off the single rounding, tests/test_lora.py).  With
        ``active_rank`` set, its first ranks are merged, and :meth:`unmerge` takes out those
        same ranks even if ``active_rank`` has changed since.  DoRA rows whose magnitude is
        0 (the default initialization of a zero row of W) merge to zero whatever W held
        there: merge keeps a copy of those rows, which unmerge puts back (dividing by the
        zero scale wrote NaN into them, and into a merged layer's state dict).
        """
        if self.merged:
            return
        lora_A, lora_B, gate = self._factors()
        self._merged_rank = lora_A.shape[0]
        weight = self.base_layer.weight
        if self.use_dora:
            norm = dora_row_norm(weight, lora_A, lora_B, self.scaling)
            row_scale = self._dora_factor(norm)
            lost = torch.nonzero(row_scale == 0).flatten()
            self._merged_lost_rows = (lost, weight[lost].clone()) if lost.numel() else None
            lora_merge(weight, lora_A, lora_B, self.scaling, inplace=True, row_scale=row_scale)
            self._merged_norm = norm
        else:
            lora_merge(weight, lora_A, lora_B, self.scaling, gate=gate, inplace=True)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Inverse of :meth:`merge` (exact up to the rounding of the merged weight)."""
        if not self.merged:
            return
        self._take_out_adapter(self.base_layer.weight)
        self._merged_norm = self._merged_rank = self._merged_lost_rows = None
        self.merged = False

    @torch.no_grad()
    def _unmerged_weight(self) -> torch.Tensor:
        """A copy of the merged base weight with the adapter taken out (as :meth:`unmerge`)."""
        weight = self.base_layer.weight.detach().clone()
        self._take_out_adapter(weight)
        return weight

    def _take_out_adapter(self, weight: torch.Tensor) -> None:
        """:meth:`merge` undone on ``weight`` (the merged base weight or a copy), in place,
        with the ranks that were merged whatever ``active_rank`` is now."""
        lora_A, lora_B, gate = self._factors(self._merged_rank)
        if self.use_dora:
            row_scale = self._dora_factor(self._merged_norm)
            zero = row_scale == 0  # rows merged to zero (see merge): not divided, put back below
            lora_unmerge(weight, lora_A, lora_B, self.scaling, inplace=True,
                         row_scale=torch.where(zero, torch.ones_like(row_scale), row_scale))
            weight[zero] = 0  # a magnitude set to 0 while merged: W's row is lost (0, not NaN)
            if self._merged_lost_rows is not None:
                rows, values = self._merged_lost_rows
                weight[rows] = values.to(weight.device)
        else:
            lora_unmerge(weight, lora_A, lora_B, self.scaling, gate=gate, inplace=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "lora_A" in state_dict and not self.lora_A.is_meta:  # a split (or any factors) loaded
            self._split_pending = False

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self.init_lora_weights in ("pissa", "olora") and self.lora_A.is_meta:  # the split's values are gone
            self._split_pending = True
        return module

    def extra_repr(self) -> str:
        extras = [f"r={self.r}", f"scaling={self.scaling:g}", f"lora_dropout={self.lora_dropout:g}"]
        if self.init_lora_weights is not True:
            name = self.init_lora_weights
            if name == "pissa" and self._init_iterations is not None:
                name = f"pissa_niter_{self._init_iterations}"
            extras.append(f"init_lora_weights={name!r}")
        extras += [name for name in ("use_rslora", "use_dora") if getattr(self, name)]
        if self.lora_gate is not None:
            extras.append("use_gate")
        return ", ".join(extras)
