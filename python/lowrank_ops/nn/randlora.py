"""RandLoRA: a full-rank update from frozen random low-rank bases and trained diagonals.

RandLoRA (Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large
models", ICLR 2025) adds to a frozen ``W [out, in]`` the update

    dW = s sum_{b=1..n} B_b Lambda_b A Gamma_b           (in <= out)

with, writing ``m = min(in, out)``, ``M = max(in, out)`` and ``n = ceil(m / r)``:
``n`` frozen random bases ``B_b [M, r]``, one frozen random ``A [r, m]`` shared by all
terms (the paper's and PEFT's choice: the trained ``Gamma_b`` already make the terms
differ, and n separate A's would cost ``n r m ~ m^2`` more frozen numbers), and trained
diagonals ``Lambda_b = diag(lambda_b)``, ``lambda_b [r]``, and ``Gamma_b = diag(gamma_b)``,
``gamma_b [m]``.  ``n r >= m`` terms make dW full rank.  ``Gamma`` always acts on the
smaller dimension (PEFT's layout, fewer trained numbers): for ``out < in`` the update is
the transposed arrangement ``dW = s sum_b Gamma_b A^T Lambda_b B_b^T``.  Trained numbers:
``n (r + m)`` (``lambda [n, r]``, ``gamma [n, m]``).

Forward and backward never form dW (``[out, in]``, ``2 n r out in ~ 2 m out in`` flops).
With the trained factors folded into the small side, the update is one low-rank product of
rank ``n r`` on stacked bases:

    A~ [n r, m]: row (b, k) = gamma_b * A[k]          (elementwise, n r m numbers)
    B~ [M, n r]: column (b, k) = B_b[:, k]            (a frozen buffer)
    in <= out:  y = base(x) + s ((x A~^T) * lambda) B~^T
    out < in:   y = base(x) + s ((x B~) * lambda) A~

which is :func:`lowrank_ops.ops.lora_linear`'s form with ``lora_A = A~`` (or ``B~^T``),
``lora_B = B~`` (or ``A~^T``) and its per-rank ``gate = lambda`` (flattened).  The forward
is that op's registered forward (base product and adapter accumulated into one output,
scale and gate folded into the ``[N, n r]`` intermediate).  The backward is this module's
own autograd Function (:class:`_RandLoRALinear`) rather than ``lora_linear``'s: that one
saves its ``lora_A`` / ``lora_B`` for the backward, here the folded ``A~``, ``n r m``
numbers per layer (as large as W for a square layer: 64 MB at 4096 x 4096 in float32),
alive from every layer's forward to its backward (PEFT's layer keeps it too).  This one
refolds ``A~`` in the backward (``n r m`` multiplies against at least ``4 N n r m`` GEMM
flops there) and, with Gamma on the input side, keeps nothing new at all: ``d lambda`` and
``d gamma`` both come from ``G = (dy B~)^T D(x)`` (``[n r, in]``, the GEMM that ``d A~``
would cost) by two batched products; with Gamma on the output side it keeps
``u = D(x) B~`` (``[N, n r]``), which ``G = u^T dy`` needs.  Cost per call: forward
``2 N (in out + n r (in + out))`` flops against ``2 m in out + 2 N in out`` for the dense
composition (forming dW, then one GEMM): the factored form is cheaper while
``N < m in out / (n r (in + out))``, about ``in / 2`` tokens for a square layer, and
costlier for longer batches.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._args import require_finite_number, require_int
from .._autocast import autocast_entry, autocast_off_backward
from .._first_order import first_order_only
from ..ops._layout import flatten_rows
from ..ops.base_linear import grad_input_op
from ..ops._library import composed_path
from ..ops.lora import (_adapter_input, _addmm_adapter_, _forward_op, _widened_products, check_adapter, check_dropout,
                       draw_seed, lora_linear)
from ._adapter_base import MergeableAdapter, adapter_dtype, checkpoint_unmerged
from ._plain import plain_linear, through_base
from ._random_basis import SeededBases, check_seed, draw_bases, kaiming_bound, new_seed

__all__ = ["RandLoRALinear"]

# Streams of one layer's seed: the shared A, the B bases.
_STREAM_A, _STREAM_B = 0, 1


def _fold(gamma: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``A~ [n r, m]``: row ``b r + k`` is ``gamma_b * A[k]``."""
    return (gamma[:, None, :] * A).reshape(-1, A.shape[1])


def _orient(scaled: torch.Tensor, B: torch.Tensor, gamma_on_input: bool):
    """``(lora_A [n r, in], lora_B [out, n r])`` of :func:`lowrank_ops.ops.lora_linear`'s form."""
    return (scaled, B) if gamma_on_input else (B.T, scaled.T)


class _RandLoRALinear(torch.autograd.Function):
    """Autograd of ``y = x W^T + b + s ((D(x) lora_A^T) * lambda) lora_B^T`` with the folded
    ``A~ = fold(gamma, A)`` on the small side, keeping for the backward no ``[n r, m]`` tensor
    (``A~``, as large as W for a square layer, is refolded there: ``n r m`` multiplies against
    the backward's ``>= 4 N n r m`` GEMM flops) and, with gamma on the input side, nothing
    new at all.

    Backward, with ``h = dy lora_B``, ``g = s lambda`` and ``P = G * A`` (``[n, r, m]``, A
    broadcast over the bases):

    * gamma on the input side: ``G = h^T D(x)`` (``[n r, in]``), so that
      ``d lambda_b = s P_b gamma_b`` and ``d gamma_b = s lambda_b^T P_b`` (two batched
      products: ``d lambda = s sum_n h u`` and ``d A~ = g G`` without ``u`` or ``d A~``);
    * gamma on the output side: ``u = D(x) B~`` is saved (``[N, n r]``; ``G`` would need it),
      ``d lambda = s sum_n h u``, ``G = u^T dy`` (``[n r, out]``), ``d gamma_b = s lambda_b^T P_b``;

    ``dx = dy W + D'((h g) lora_A)``; ``dW``, ``db`` only when asked.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, randlora_A, randlora_B, lam, gamma, scaled, seed, scale, dropout_p,
                gamma_on_input):
        lora_A, lora_B = _orient(scaled, randlora_B, gamma_on_input)
        y, shrunk = _forward_op()(x, weight, lora_A, lora_B, bias, lam.reshape(-1), seed, scale, dropout_p)
        ctx.scale, ctx.dropout_p, ctx.gamma_on_input = scale, dropout_p, gamma_on_input
        ctx.save_for_backward(x, weight, randlora_A, randlora_B, lam, gamma, seed,
                              None if gamma_on_input else shrunk)
        return y

    @staticmethod
    @first_order_only
    @autocast_off_backward
    def backward(ctx, grad_y):
        x, weight, randlora_A, randlora_B, lam, gamma, seed, shrunk = ctx.saved_tensors
        need_x, need_W, need_bias, _, _, need_lam, need_gamma = ctx.needs_input_grad[:7]
        scale, p, on_input = ctx.scale, ctx.dropout_p, ctx.gamma_on_input
        adapter_dtype = randlora_A.dtype
        grad_x = grad_W = grad_bias = grad_lam = grad_gamma = None
        lora_A, lora_B = _orient(_fold(gamma, randlora_A), randlora_B, on_input)
        grad_y_adapter = grad_y.to(adapter_dtype)
        expanded = grad_y_adapter @ lora_B  # h = dy lora_B, [N, n r]
        if need_lam or need_gamma:
            if on_input:
                outer = expanded.T @ _adapter_input(x, seed, p).to(adapter_dtype)  # G = h^T D(x)
            else:
                if need_lam:
                    grad_lam = _widened_products(expanded, shrunk).sum(0).mul_(scale).to(lam.dtype).view_as(lam)
                outer = shrunk.T @ grad_y_adapter  # G = u^T dy
            products = outer.view(lam.shape[0], lam.shape[1], -1).mul_(randlora_A)  # P, in G's memory
            if need_lam and on_input:
                grad_lam = torch.bmm(products, gamma.unsqueeze(2)).squeeze(2).mul_(scale)
            if need_gamma:
                grad_gamma = torch.bmm(lam.unsqueeze(1), products).squeeze(1).mul_(scale)
            del outer, products
        if need_x:
            expanded.mul_(lam.reshape(-1) * scale)  # h g
            grad_x = grad_input_op()(grad_y, weight)
            if seed is None or p == 0.0:
                _addmm_adapter_(grad_x, expanded, lora_A)
            else:  # D' is D (same mask, same 1 / (1 - p))
                grad_x += _adapter_input((expanded @ lora_A).to(grad_x.dtype), seed, p)
        if need_W:
            grad_W = grad_y.T @ x
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_W, grad_bias, None, None, grad_lam, grad_gamma, None, None, None, None, None


@autocast_entry("x", "weight", "bias", "randlora_A", "randlora_B", "lam", "gamma")
def _randlora_linear(x, weight, bias, randlora_A, randlora_B, lam, gamma, *, scale: float, dropout_p: float,
                     gamma_on_input: bool) -> torch.Tensor:
    """``base(x) + s x dW^T`` (RandLoRALinear's forward; see :class:`_RandLoRALinear`)."""
    op = "RandLoRALinear"
    if composed_path():  # lora_linear's torch-op composition, gamma folded with its graph
        lora_A, lora_B = _orient(_fold(gamma, randlora_A), randlora_B, gamma_on_input)
        return lora_linear(x, weight, lora_A, lora_B, bias, gate=lam.reshape(-1), scale=scale, dropout_p=dropout_p)
    with torch.no_grad():  # the Function refolds it in backward: no graph, freed after the forward
        scaled = _fold(gamma, randlora_A)
    lora_A, lora_B = _orient(scaled, randlora_B, gamma_on_input)
    check_adapter(op, x, weight, lora_A, lora_B, bias, lam.detach().reshape(-1))
    p = check_dropout(op, dropout_p)
    seed = draw_seed() if p > 0.0 else None
    batch_shape = x.shape[:-1]
    x2d = flatten_rows(x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lam, gamma)):
        y = _RandLoRALinear.apply(x2d, weight, bias, randlora_A, randlora_B, lam, gamma, scaled, seed, scale, p,
                                  gamma_on_input)
    else:  # inference: no autograd Function, nothing saved
        y = _forward_op()(x2d, weight, lora_A, lora_B, bias, lam.reshape(-1), seed, scale, p)[0]
    return y.reshape(*batch_shape, weight.shape[0])


class RandLoRALinear(SeededBases, MergeableAdapter):
    """``y = base(x) + s x dW^T`` with RandLoRA's full-rank ``dW = sum_b B_b Lambda_b A Gamma_b``
    around a frozen ``nn.Linear`` (module docstring: the formulation, the orientation for
    ``out < in``, and the forward).

    Trainable: ``randlora_lambda [n, r]`` and ``randlora_gamma [n, m]`` only (``m = min(in,
    out)``, ``n = ceil(m / r)``).  Buffers: ``randlora_seed`` (0-d int64, saved in the state
    dict) and the frozen bases ``randlora_A [r, m]`` and ``randlora_B [M, n r]`` (``M =
    max(in, out)``; column ``b r + k`` is column k of basis b), not saved:
    :meth:`load_state_dict` redraws them from the loaded seed.

    Parameters
    ----------
    base_layer : nn.Linear
        Wrapped as is (not copied); its parameters are set to ``requires_grad=False``.
    r : int
        Rank of each random basis, ``1 <= r <= min(in_features, out_features)``; the number
        of bases is ``n = ceil(min(in, out) / r)``, so a smaller r trains more numbers.
    randlora_alpha : float, optional
        ``s = randlora_alpha / r``; default ``20 r`` (s = 20), the value PEFT's RandLoraConfig
        recommends ("typically 20 times the rank"; its default is 640 at r = 32).
    randlora_dropout : float
        Dropout probability on the adapter input (training mode only), in ``[0, 1)``.
    seed : int, optional
        Seed of the bases, in ``[0, 2^63)``.  Default: one drawn from torch's default
        generator (reproducible with ``torch.manual_seed``).
    dtype : torch.dtype, optional
        Of the trained diagonals and the bases: the base weight's (default) or float32.

    Attributes
    ----------
    scaling : float
        ``randlora_alpha / r``.
    num_bases : int
        ``n``.
    merged : bool
        Whether the adapter is currently merged into the base weight.

    Notes
    -----
    As PEFT's RandLoRA layer (``peft.tuners.randlora``): bases Kaiming-uniform
    (``A`` entries U(+-1/sqrt(m)), ``B_b`` entries U(+-1/sqrt(r)), PEFT's bounds for its
    ``[r, 1, m]`` and ``[M, 1, r]`` draws), ``lambda = 0`` (the layer starts as the base
    layer) and ``gamma = 1 / m``, scaling ``alpha / r``.  The same function as PEFT's layer
    given the same numbers: PEFT stores ``lambda`` as ``[r, n]`` and pairs the row
    ``k n + b`` of its scaled A with column ``k n + b`` of its flattened ``[M, n, r]`` B, so
    its ``(lambda.T, gamma, A[:, 0], B columns reordered)`` are ours
    (tests/test_randlora.py checks the outputs agree).  The bases differ in how they are
    stored: PEFT draws them once per model, in bfloat16, and saves them by default; here
    they are float32 draws from this layer's seed (:mod:`lowrank_ops.nn._random_basis`),
    never saved.

    Memory: the frozen ``B~`` is ``M n r ~ in out`` numbers, as large as W (as PEFT's).
    Between forward and backward the layer keeps no new tensor for ``in <= out`` and
    ``u = x B~`` (``[N, n r]``) otherwise; PEFT's layer (and ``lora_linear`` on the stacked
    bases) keeps ``A~`` (``n r m`` numbers), plus ``u`` for ``out < in``.
    """

    _seed_buffer, _basis_buffer, _coefficient = "randlora_seed", "randlora_A", "randlora_lambda"  # see SeededBases

    def __init__(
        self,
        base_layer: torch.nn.Linear,
        r: int,
        *,
        randlora_alpha: Optional[float] = None,
        randlora_dropout: float = 0.0,
        seed: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        where = "RandLoRALinear"
        if not isinstance(base_layer, torch.nn.Linear):
            raise TypeError(f"{where}: base_layer must be a torch.nn.Linear; got {type(base_layer).__name__}")
        in_features, out_features = base_layer.in_features, base_layer.out_features
        small = min(in_features, out_features)
        r = require_int(where, "r", r)
        if small < 1:
            raise ValueError(f"{where}: base_layer has shape (out, in) = ({out_features}, {in_features}); "
                             f"RandLoRA needs in_features >= 1 and out_features >= 1")
        if r > small:
            raise ValueError(f"{where}: r must be in [1, min(in_features, out_features)] = [1, {small}]; got {r}")
        randlora_alpha = 20.0 * r if randlora_alpha is None else randlora_alpha
        require_finite_number(where, "randlora_alpha", randlora_alpha)
        randlora_dropout = require_finite_number(where, "randlora_dropout", randlora_dropout)
        if not 0.0 <= randlora_dropout < 1.0:
            raise ValueError(f"{where}: randlora_dropout must be in [0, 1); got {randlora_dropout}")
        seed = new_seed() if seed is None else check_seed(where, seed)
        weight = base_layer.weight
        dtype = adapter_dtype(where, weight, dtype)
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r, self.num_bases = r, math.ceil(small / r)
        self.randlora_alpha, self.randlora_dropout = float(randlora_alpha), randlora_dropout
        self.scaling = self.randlora_alpha / r
        self.merged = False
        checkpoint_unmerged(self)  # the saved form is always the unmerged one
        factory = {"device": weight.device, "dtype": dtype}
        self.register_buffer("randlora_seed", torch.tensor(seed, dtype=torch.int64, device=weight.device))
        self.randlora_lambda = torch.nn.Parameter(torch.empty(self.num_bases, r, **factory))
        self.randlora_gamma = torch.nn.Parameter(torch.empty(self.num_bases, small, **factory))
        self.register_buffer("randlora_A", None, persistent=False)
        self.register_buffer("randlora_B", None, persistent=False)
        # The layer's seed as a Python int: on meta the buffer holds no value, and to_empty()
        # leaves it uninitialized, so reset_parameters() writes this one back.
        self._seed = seed
        self._bases_seed: Optional[int] = None  # the seed the bases were drawn from; None: not drawn (meta)
        self._draw_bases()
        self.reset_parameters()

    @property
    def _gamma_on_input(self) -> bool:
        """Whether Gamma scales the input side (``in <= out``) or the output side."""
        return self.in_features <= self.out_features

    @torch.no_grad()
    def _draw_bases(self) -> None:
        """(Re)draws ``randlora_A`` and ``randlora_B`` from ``randlora_seed``."""
        n, r = self.num_bases, self.r
        small, large = self.randlora_gamma.shape[1], max(self.in_features, self.out_features)
        factory = {"device": self.randlora_gamma.device, "dtype": self.randlora_gamma.dtype}
        if self.randlora_seed.is_meta:  # built on meta (low-memory loading): shapes only, drawn at load_state_dict
            self.randlora_A = torch.empty(r, small, **factory)
            self.randlora_B = torch.empty(large, n * r, **factory)
            self._bases_seed = None
            return
        seed = self._seed = int(self.randlora_seed)
        self.randlora_A = draw_bases(seed, _STREAM_A, 1, r, small, kaiming_bound(small), **factory)[0]
        stack = draw_bases(seed, _STREAM_B, n, large, r, kaiming_bound(r), **factory)  # [n, M, r]
        self.randlora_B = stack.permute(1, 0, 2).reshape(large, n * r).contiguous()
        self._bases_seed = seed

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``lambda = 0``, ``gamma = 1 / m`` (PEFT's init): the layer is the base layer again.
        Raises RuntimeError while merged.

        Built on meta then ``to_empty()``: the seed given to the constructor is written back
        into ``randlora_seed`` and the bases are drawn from it first (the same layer as one
        built off meta with that seed)."""
        if self.merged:
            raise RuntimeError("RandLoRALinear.reset_parameters: the adapter is merged into the base weight; "
                               "unmerge() first")
        self._restore_seed()
        self.randlora_lambda.zero_()
        self.randlora_gamma.fill_(1.0 / self.randlora_gamma.shape[1])

    def factors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lora_A [n r, in], lora_B [out, n r], gate [n r])`` with ``dW = s lora_B diag(gate)
        lora_A``: the stacked bases with Gamma folded in, differentiable in the diagonals."""
        self._require_bases()
        lora_A, lora_B = _orient(_fold(self.randlora_gamma, self.randlora_A), self.randlora_B, self._gamma_on_input)
        return lora_A, lora_B, self.randlora_lambda.reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer plus the adapter (or, after :meth:`merge`, the merged base layer).

        Parameters
        ----------
        x : Tensor[..., in_features]
            In the base weight's dtype (float32, float64, float16 or bfloat16) and on its
            device.  In training mode the adapter input goes through dropout with
            probability ``randlora_dropout``.

        Returns
        -------
        Tensor[..., out_features]
            ``base(x) + s x dW^T`` through :func:`lowrank_ops.ops.lora_linear` on the stacked
            bases (:meth:`factors`), in x's dtype; differentiable in x, ``randlora_lambda``
            and ``randlora_gamma``.
        """
        if self.merged:
            return self.base_layer(x)
        self._require_bases()
        p = self.randlora_dropout if self.training else 0.0
        if not plain_linear(self.base_layer):  # hooks, a subclass's forward: call it (nn/_plain.py)
            lora_A, lora_B, gate = self.factors()
            return through_base(self.base_layer, x, lora_A, lora_B, self.scaling, gate, p)
        return _randlora_linear(x, self.base_layer.weight, self.base_layer.bias, self.randlora_A, self.randlora_B,
                                self.randlora_lambda, self.randlora_gamma, scale=self.scaling, dropout_p=p,
                                gamma_on_input=self._gamma_on_input)

    def _merge_factors(self):
        return self.factors()

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_bases={self.num_bases}, scaling={self.scaling:g}, "
                f"seed={'?' if self.randlora_seed.is_meta else int(self.randlora_seed)}")
