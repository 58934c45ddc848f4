"""LoLDU adapter around a frozen ``nn.Linear``: train a diagonal and a scale of a fixed LDU basis.

LoLDU (Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", 2024) factors the pre-trained weight with partial
pivoting, ``W0 = P L D U`` (``torch.linalg.lu``, then ``D = diag(U)`` and U divided by it:
L unit lower trapezoidal ``[out, k]``, U unit upper trapezoidal ``[k, in]``,
``k = min(out, in)``), keeps the leading r columns of L, rows of U and entries of D, and
trains only the diagonal ``d [r]`` and a scalar ``sigma``:

``W = W_res + sigma P L_r diag(d) U_r``,  ``W_res = W0 - sigma_0 P L_r diag(d_0) U_r``

with ``d_0 = D_r`` and ``sigma_0 = lora_alpha / r`` (the authors' code: ``lora_alpha = 1``
in its ``from_linear``), so the layer starts as the base layer up to the rounding of
``W_res``.  With ``lora_alpha = r`` (``sigma_0 = 1``) the residual is W0 minus its whole
rank-r LDU part, the split the paper's Figure 3 describes; with the default only
``1 / r`` of that part moves into the adapter.  This is the paper's "lu" initialization of the diagonal, its default; its other
heuristic initializations (constant, uniform, normal) are not implemented.  The base weight
becomes ``W_res`` in place (as PiSSA's residual does), rounded once to its dtype from a
float32 accumulation; ``P`` is not stored as a matrix (the authors keep an ``[out, out]``
one): ``lora_B = P L_r`` is L_r with its rows permuted.

Forward: :func:`lowrank_ops.ops.lora_linear` with ``lora_A = U_r``, ``lora_B = P L_r``
(frozen buffers) and ``gate = sigma * d`` (SoRA's gate path): one fused call, the gradients
of d and sigma through the ``[r]`` product.

Rank-deficient weights: a zero pivot ``D_j`` leaves row j of U undivided (``D_j U_j`` is 0
either way); the residual absorbs whatever the truncated factors miss, so the layer still
starts as the base layer, and such a rank's ``d_j`` starts at 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._args import require_finite_number
from ..ops.lora import lora_unmerge
from ._diag_adapter import DiagonalAdapterLinear, check_base_and_rank

__all__ = ["LoLDULinear"]


class LoLDULinear(DiagonalAdapterLinear):
    """``y = x W_res^T + b + sigma ((x U_r^T) * d) (P L_r)^T`` around a frozen ``nn.Linear`` (LoLDU).

    Trainable: ``loldu_diag [r]`` (d, initialized to the LDU pivots ``D_r``) and
    ``loldu_scale`` (sigma, 0-d, initialized to ``lora_alpha / r``): ``r + 1`` numbers.
    Frozen buffers: ``lora_A = U_r [r, in]`` (unit upper trapezoidal) and
    ``lora_B = P L_r [out, r]`` (the unit lower trapezoidal L_r, rows permuted).  The base
    weight is replaced in place by ``W_res = W0 - sigma_0 P L_r diag(d_0) U_r``.

    Parameters
    ----------
    base_layer : nn.Linear
        Wrapped as is (not copied); its parameters are set to ``requires_grad=False`` and its
        weight becomes the residual.  Its weight must be finite.
    r : int
        Rank of the LDU truncation, ``1 <= r <= min(in_features, out_features)``.
    lora_alpha : float
        ``sigma_0 = lora_alpha / r``; nonzero and finite.  The starting function does not
        depend on it (the residual absorbs it); the training dynamics do (d's gradient is
        scaled by sigma, sigma's by d).
    dtype : torch.dtype, optional
        Of the buffers and trainable parameters: the base weight's (default) or float32.
        The LU runs in float32 (float64 for a float64 weight).

    Attributes
    ----------
    merged : bool
        Whether the adapter is currently merged into the base weight.

    Notes
    -----
    The paper's ``sigma L_r D_r U_r`` with the LU of W0 as in the authors' released code
    (minloldu): pivoted LU of the full weight, leading r columns / rows, diagonal and scale
    trainable, the residual kept in the base weight.  With a half base weight the residual
    is rounded to the half type once, so the layer equals the base layer to within that
    rounding (about ``2^-9 |W_res|`` per entry in bfloat16), as with PiSSA.
    """

    def __init__(
        self,
        base_layer: torch.nn.Linear,
        r: int,
        *,
        lora_alpha: float = 1.0,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dtype = check_base_and_rank("LoLDULinear", base_layer, r, dtype)
        r = int(r)
        require_finite_number("LoLDULinear", "lora_alpha", lora_alpha)
        if lora_alpha == 0:
            raise ValueError("LoLDULinear: lora_alpha must be nonzero (sigma = lora_alpha / r scales every "
                             "gradient of the diagonal); got 0")
        self._setup(base_layer, r)
        self.lora_alpha = float(lora_alpha)
        weight = base_layer.weight
        if weight.is_meta:
            # Built on meta (low-memory loading): shapes only.  The factors and the residual
            # base weight are a checkpoint's (to_empty() then load_state_dict, or assign=True):
            # they cannot be recomputed from the residual the state dict holds.
            factory = {"device": weight.device, "dtype": dtype}
            lower, pivots, upper = (torch.empty(self.out_features, r, **factory), torch.empty(r, **factory),
                                    torch.empty(r, self.in_features, **factory))
        else:
            lower, pivots, upper = self._truncated_ldu()
        self.register_buffer("lora_A", upper.to(dtype).contiguous())
        self.register_buffer("lora_B", lower.to(dtype).contiguous())
        self.loldu_diag = torch.nn.Parameter(pivots.to(dtype))
        self.loldu_scale = torch.nn.Parameter(torch.tensor(self.lora_alpha / r, device=pivots.device, dtype=dtype))
        if not weight.is_meta:
            with torch.no_grad():  # W0 -> W_res from the rounded factors: W_res + sigma B diag(d) A = W0
                lora_unmerge(base_layer.weight, self.lora_A, self.lora_B, 1.0, gate=self._gate(), inplace=True)

    @torch.no_grad()
    def _truncated_ldu(self):
        """``(P L_r [out, r], D_r [r], U_r [r, in])`` of the base weight, in float32
        (float64 for float64)."""
        weight = self.base_layer.weight
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        P, L, U = torch.linalg.lu(weight)
        pivots = U.diagonal()[:self.r]
        upper = U[:self.r]
        nonzero = pivots != 0
        upper = torch.where(nonzero[:, None], upper / torch.where(nonzero, pivots, 1)[:, None], upper)
        # P @ L_r without the [out, out] product: row i of P L is row perm[i] of L.
        perm = P.argmax(dim=1)
        return L[:, :self.r][perm], pivots.clone(), upper

    def _gate(self) -> torch.Tensor:
        return self.loldu_diag * self.loldu_scale

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}"
