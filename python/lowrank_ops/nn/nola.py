"""NOLA: LoRA factors as trained linear combinations of frozen random bases.

NOLA (Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random
Basis", ICLR 2024) writes the LoRA factors as

    A = sum_i alpha_i A_i  [r, in],    B = sum_j beta_j B_j  [out, r],
    y = base(x) + s ((x A^T) B^T),     s = lora_alpha / r,

with ``num_basis_A`` frozen random ``A_i`` and ``num_basis_B`` frozen random ``B_j``
drawn from one integer seed, and trains only the coefficients ``alpha`` and ``beta``:
the trainable parameter count is ``num_basis_A + num_basis_B``, independent of the rank
and of the layer's shape.  A saved adapter is ``alpha``, ``beta`` and the seed; the bases
are redrawn from the seed (:mod:`lowrank_ops.nn._random_basis`: CPU generator, the same
bases on every device).

Forward: two contractions ``alpha @ bases_A`` and ``beta @ bases_B`` (one GEMV each,
``num_basis (in + out) r`` multiply-adds), then :func:`lowrank_ops.ops.lora_linear`, the
fused op, which computes the gradients of A and B; autograd carries them back through
the contractions (``d alpha_i = <dA, A_i>``, one more GEMV each).

With ``cache_bases=False`` the bases are not kept: the forward redraws them block by
block (:data:`~lowrank_ops.nn._random_basis.BLOCK_ELEMENTS` numbers at a time) while
contracting, and the backward redraws them again for the coefficients' gradients; memory
is one block instead of ``(num_basis_A in + num_basis_B out) r`` numbers, paid for with
two draws of every basis per step (the CPU generator; on a GPU also a host-to-device copy).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._args import require_finite_number, require_int
from .._autocast import autocast_off_backward
from .._first_order import first_order_only
from ..ops._library import composed_path
from ..ops.lora import lora_linear
from ._adapter_base import MergeableAdapter, adapter_dtype, checkpoint_unmerged
from ._plain import plain_linear, through_base
from ._random_basis import SeededBases, check_seed, draw_bases, iter_bases, kaiming_bound, new_seed, stream_seed

__all__ = ["NOLALinear"]

# Streams of one layer's seed: the A bases, the B bases, the initial alpha.
_STREAM_A, _STREAM_B, _STREAM_INIT = 0, 1, 2


class _UncachedCombination(torch.autograd.Function):
    """``sum_i c_i basis_i`` ``[rows, cols]`` with the bases redrawn block by block (forward
    and backward), never all held; ``d c_i = <grad, basis_i>``."""

    @staticmethod
    def forward(ctx, coefficients, seed, stream, rows, cols, bound):
        ctx.draw = (seed, stream, rows, cols, bound)
        ctx.save_for_backward(coefficients)
        out = coefficients.new_zeros(rows * cols)
        for start, block in iter_bases(seed, stream, coefficients.shape[0], rows, cols, bound,
                                       coefficients.device, coefficients.dtype):
            out.addmv_(block.reshape(block.shape[0], -1).T, coefficients[start:start + block.shape[0]])
        return out.view(rows, cols)

    @staticmethod
    @first_order_only
    @autocast_off_backward
    def backward(ctx, grad):
        (coefficients,) = ctx.saved_tensors
        seed, stream, rows, cols, bound = ctx.draw
        grad_coefficients = torch.empty_like(coefficients)
        flat = grad.reshape(-1).to(coefficients.dtype)
        for start, block in iter_bases(seed, stream, coefficients.shape[0], rows, cols, bound,
                                       coefficients.device, coefficients.dtype):
            torch.mv(block.reshape(block.shape[0], -1), flat, out=grad_coefficients[start:start + block.shape[0]])
        return grad_coefficients, None, None, None, None, None


def _combination(coefficients, seed: int, stream: int, rows: int, cols: int, bound: float) -> torch.Tensor:
    """``sum_i c_i basis_i`` ``[rows, cols]`` with the bases redrawn: the fused Function, or
    where the ops compose torch ops (torch.func, ``ops.composite()``, forward-mode tangents)
    the same sums block by block in torch ops, differentiable to any order (the graph then
    holds every block: the memory ``cache_bases=False`` saves)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        # torch.export lifted the generator as an object whose state every call advances:
        # the exported program drew other bases at every call after the first, silently.
        raise RuntimeError("NOLALinear(cache_bases=False) cannot be traced by torch.compile or torch.export: its "
                           "bases are redrawn from a seeded torch.Generator at every call, which a graph cannot "
                           "replay; build the layer with cache_bases=True (the same function, bases kept)")
    if not composed_path():
        return _UncachedCombination.apply(coefficients, seed, stream, rows, cols, bound)
    out = coefficients.new_zeros(rows * cols)
    for start, block in iter_bases(seed, stream, coefficients.shape[0], rows, cols, bound, coefficients.device,
                                   coefficients.dtype):
        out = out + coefficients[start:start + block.shape[0]] @ block.reshape(block.shape[0], -1)
    return out.view(rows, cols)


class NOLALinear(SeededBases, MergeableAdapter):
    """``y = base(x) + s (x A^T) B^T`` with ``A = sum_i alpha_i A_i``, ``B = sum_j beta_j B_j``
    around a frozen ``nn.Linear`` (NOLA).

    Trainable: ``nola_alpha [num_basis_A]`` and ``nola_beta [num_basis_B]`` only.  Buffers:
    ``nola_seed`` (0-d int64, saved in the state dict) and, with ``cache_bases``, the
    frozen bases ``nola_basis_A [num_basis_A, r, in]`` and ``nola_basis_B
    [num_basis_B, out, r]`` (not saved: :meth:`load_state_dict` redraws them from the
    loaded seed).

    Parameters
    ----------
    base_layer : nn.Linear
        Wrapped as is (not copied); its parameters are set to ``requires_grad=False``.
    r : int
        Rank of A and B, ``>= 1``.
    num_basis_A, num_basis_B : int
        Numbers of random bases of A and of B, ``>= 1`` each.
    lora_alpha : float
        ``s = lora_alpha / r`` (LoRA's scaling).
    lora_dropout : float
        Dropout probability on the adapter input (training mode only), in ``[0, 1)``.
    seed : int, optional
        Seed of the bases (and of the initial ``alpha``), in ``[0, 2^63)``.  Default: one
        drawn from torch's default generator, so that layers get different bases
        (reproducible with ``torch.manual_seed``).
    dtype : torch.dtype, optional
        Of the coefficients and bases: the base weight's (default) or float32.
    cache_bases : bool
        Keep the bases as buffers (default; fastest) or redraw them at every forward and
        backward (memory: one 4 MB block instead of ``(num_basis_A in + num_basis_B out) r``
        numbers; not traceable by ``torch.compile`` or ``torch.export``: a RuntimeError
        says so, as a graph cannot replay a seeded ``torch.Generator``).

    Attributes
    ----------
    scaling : float
        ``lora_alpha / r``.
    merged : bool
        Whether the adapter is currently merged into the base weight.

    Notes
    -----
    Bases: entries U(-1/sqrt(in), 1/sqrt(in)) for ``A_i`` and U(-1/sqrt(r), 1/sqrt(r)) for
    ``B_j`` (the Kaiming-uniform bounds nn.Linear would use for a ``[r, in]`` and an
    ``[out, r]`` weight), float32 from the CPU generator, then cast to ``dtype``.

    Initialization: ``beta = 0`` (B = 0, the layer starts as the base layer, as LoRA's and
    NOLA's) and ``alpha`` U(-sqrt(3 / num_basis_A), sqrt(3 / num_basis_A)) from the seed, so
    that ``A``'s entries have the variance of a Kaiming-uniform ``lora_A``, ``1 / (3 in)``
    (``E[alpha_i^2] = 1 / num_basis_A``): B then receives gradients from the first step.
    (NOLA's GPT-2 code keeps a frozen Kaiming-uniform offset in A and starts both
    coefficient vectors at 0; drawing alpha instead gives A the same scale with no extra
    frozen matrix, and ``alpha`` alone describes A.)
    """

    _seed_buffer, _basis_buffer, _coefficient = "nola_seed", "nola_basis_A", "nola_alpha"  # see SeededBases

    def __init__(
        self,
        base_layer: torch.nn.Linear,
        r: int,
        num_basis_A: int,
        num_basis_B: int,
        *,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        seed: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        cache_bases: bool = True,
    ):
        super().__init__()
        where = "NOLALinear"
        if not isinstance(base_layer, torch.nn.Linear):
            raise TypeError(f"{where}: base_layer must be a torch.nn.Linear; got {type(base_layer).__name__}")
        r = require_int(where, "r", r)
        num_basis_A = require_int(where, "num_basis_A", num_basis_A)
        num_basis_B = require_int(where, "num_basis_B", num_basis_B)
        require_finite_number(where, "lora_alpha", lora_alpha)
        lora_dropout = require_finite_number(where, "lora_dropout", lora_dropout)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"{where}: lora_dropout must be in [0, 1); got {lora_dropout}")
        seed = new_seed() if seed is None else check_seed(where, seed)
        if not isinstance(cache_bases, bool):
            raise TypeError(f"{where}: cache_bases must be a bool; got {type(cache_bases).__name__}")
        weight = base_layer.weight
        dtype = adapter_dtype(where, weight, dtype)
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.num_basis_A, self.num_basis_B = r, num_basis_A, num_basis_B
        self.lora_alpha, self.lora_dropout = float(lora_alpha), lora_dropout
        self.scaling = self.lora_alpha / r
        self.cache_bases = cache_bases
        self.merged = False
        checkpoint_unmerged(self)  # the saved form is always the unmerged one
        factory = {"device": weight.device, "dtype": dtype}
        self.register_buffer("nola_seed", torch.tensor(seed, dtype=torch.int64, device=weight.device))
        self.nola_alpha = torch.nn.Parameter(torch.empty(num_basis_A, **factory))
        self.nola_beta = torch.nn.Parameter(torch.empty(num_basis_B, **factory))
        self.register_buffer("nola_basis_A", None, persistent=False)
        self.register_buffer("nola_basis_B", None, persistent=False)
        # The layer's seed as a Python int: on meta the buffer holds no value, and to_empty()
        # leaves it uninitialized, so reset_parameters() writes this one back.
        self._seed = seed
        self._bases_seed: Optional[int] = None  # the seed the bases were drawn from; None: not drawn (meta)
        self._draw_bases()
        self.reset_parameters()

    # ------------------------------------------------------------------ bases
    def _basis_spec(self) -> Tuple[Tuple[int, int, int, int, float], Tuple[int, int, int, int, float]]:
        """``(stream, count, rows, cols, bound)`` of the A bases and of the B bases."""
        return ((_STREAM_A, self.num_basis_A, self.r, self.in_features, kaiming_bound(self.in_features)),
                (_STREAM_B, self.num_basis_B, self.out_features, self.r, kaiming_bound(self.r)))

    @torch.no_grad()
    def _draw_bases(self) -> None:
        """(Re)draws the bases buffers from ``nola_seed`` (nothing without ``cache_bases``)."""
        factory = {"device": self.nola_alpha.device, "dtype": self.nola_alpha.dtype}
        spec_A, spec_B = self._basis_spec()
        if self.nola_seed.is_meta:  # built on meta (low-memory loading): shapes only, drawn at load_state_dict
            self._bases_seed = None
            if self.cache_bases:
                self.nola_basis_A, self.nola_basis_B = (torch.empty(count, rows, cols, **factory)
                                                        for _, count, rows, cols, _ in (spec_A, spec_B))
            return
        seed = self._seed = int(self.nola_seed)
        if not self.cache_bases:
            self._bases_seed = seed
            return
        self.nola_basis_A = draw_bases(seed, *spec_A, **factory)
        self.nola_basis_B = draw_bases(seed, *spec_B, **factory)
        self._bases_seed = seed

    def bases(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(bases_A [num_basis_A, r, in], bases_B [num_basis_B, out, r])``: the cached
        buffers, or freshly drawn ones without ``cache_bases``."""
        if self.cache_bases:
            return self.nola_basis_A, self.nola_basis_B
        factory = {"device": self.nola_alpha.device, "dtype": self.nola_alpha.dtype}
        seed = int(self.nola_seed)
        return tuple(draw_bases(seed, *spec, **factory) for spec in self._basis_spec())

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``beta = 0`` and ``alpha`` redrawn from the seed (see the class Notes): the layer
        is the base layer again.  Raises RuntimeError while merged.

        Built on meta then ``to_empty()``: the seed given to the constructor is written back
        into ``nola_seed`` and the bases are drawn from it first (the same layer as one built
        off meta with that seed)."""
        if self.merged:
            raise RuntimeError("NOLALinear.reset_parameters: the adapter is merged into the base weight; unmerge() first")
        if self.nola_seed.is_meta:  # no values on meta
            return
        self._restore_seed()
        generator = torch.Generator().manual_seed(stream_seed(int(self.nola_seed), _STREAM_INIT))
        bound = math.sqrt(3.0 / self.num_basis_A)
        draw = torch.empty(self.num_basis_A, dtype=torch.float32, device="cpu")  # as the bases: the seed's function
        self.nola_alpha.copy_(draw.uniform_(-bound, bound, generator=generator))
        self.nola_beta.zero_()

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])``, differentiable in ``nola_alpha`` and ``nola_beta``."""
        self._require_bases()
        if not self.cache_bases:
            (stream_A, _, *shape_A), (stream_B, _, *shape_B) = self._basis_spec()
            seed = self._bases_seed  # the buffer's value as a Python int: no device sync per call
            if seed is None:  # on meta, where only the shapes matter
                seed = 0
            return (_combination(self.nola_alpha, seed, stream_A, *shape_A),
                    _combination(self.nola_beta, seed, stream_B, *shape_B))
        # One GEMV per factor: [k] @ [k, rows * cols].
        A = (self.nola_alpha @ self.nola_basis_A.reshape(self.num_basis_A, -1)).view(self.r, self.in_features)
        B = (self.nola_beta @ self.nola_basis_B.reshape(self.num_basis_B, -1)).view(self.out_features, self.r)
        return A, B

    # ------------------------------------------------------------------ forward, merge
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer plus the adapter (or, after :meth:`merge`, the merged base layer).

        Parameters
        ----------
        x : Tensor[..., in_features]
            In the base weight's dtype (float32, float64, float16 or bfloat16) and on its
            device.  In training mode the adapter input goes through dropout with
            probability ``lora_dropout``.

        Returns
        -------
        Tensor[..., out_features]
            ``base(x) + s (x A^T) B^T`` (:func:`lowrank_ops.ops.lora_linear`), in x's dtype;
            differentiable in x, ``nola_alpha`` and ``nola_beta``.
        """
        if self.merged:
            return self.base_layer(x)
        A, B = self.factors()
        p = self.lora_dropout if self.training else 0.0
        if not plain_linear(self.base_layer):  # hooks, a subclass's forward: call it (nn/_plain.py)
            return through_base(self.base_layer, x, A, B, self.scaling, dropout_p=p)
        return lora_linear(x, self.base_layer.weight, A, B, self.base_layer.bias, scale=self.scaling, dropout_p=p)

    def _merge_factors(self):
        A, B = self.factors()
        return A, B, None

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_basis_A={self.num_basis_A}, num_basis_B={self.num_basis_B}, "
                f"scaling={self.scaling:g}, seed={'?' if self.nola_seed.is_meta else int(self.nola_seed)}, "
                f"cache_bases={self.cache_bases}")
