"""SVFit adapter around a frozen ``nn.Linear``: train only the top-r singular values.

SVFit (Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models
Using Singular Values", 2024) writes the pre-trained weight as ``W0 = U S V^T`` and trains
only the top-r singular values ``S_r``, the singular subspaces ``U_r``, ``V_r`` staying
fixed.  We keep W0 as it is and train the shift ``delta = S_r' - S_r``:

``W = W0 + U_r diag(delta) V_r^T``,  ``y = x W0^T + b + ((x V_r) * delta) U_r^T``

which equals the paper's ``W_res + U_r diag(S_r + delta) V_r^T`` (``W_res = W0 - U_r S_r
V_r^T``) in exact arithmetic, with ``delta = 0`` at initialization, so the layer starts as
the base layer.  Why this form: the base weight is not rewritten (no residual rounded to a
half type, nothing to undo when the adapter is dropped) and the forward is exactly
:func:`lowrank_ops.ops.lora_linear` with ``lora_A = V_r^T``, ``lora_B = U_r`` (frozen
buffers) and ``gate = delta`` (SoRA's gate path), one fused call.  The gradient with
respect to ``delta`` is the gradient with respect to ``S_r'``, so plain SGD and Adam take
the same steps as the paper's parametrization; decoupled weight decay differs (it pulls
``delta`` to 0, i.e. towards the pre-trained weight, not ``S_r'`` to 0).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._finite import all_finite
from ..linalg import rsvd
from ._diag_adapter import DiagonalAdapterLinear, check_base_and_rank
from ._init import generator_on

__all__ = ["SVFitLinear"]

_SVD_CHOICES = ("rsvd", "full")


class SVFitLinear(DiagonalAdapterLinear):
    """``y = base(x) + ((x V_r) * svfit_delta) U_r^T`` around a frozen ``nn.Linear`` (SVFit).

    Trainable: ``svfit_delta [r]`` only (initialized to 0: the layer starts as the base
    layer), the shift of the top-r singular values.  Frozen buffers (saved in the
    state dict, so a reloaded layer keeps its subspaces): ``lora_A = V_r^T [r, in]``,
    ``lora_B = U_r [out, r]`` and ``singular_values = S_r [r]``, in descending order.

    Parameters
    ----------
    base_layer : nn.Linear
        Wrapped as is (not copied); its parameters are set to ``requires_grad=False``.
        Its weight must be finite.
    r : int
        Number of singular values trained, ``1 <= r <= min(in_features, out_features)``.
    svd : {"rsvd", "full"}
        How the top-r triplets are computed: :func:`lowrank_ops.linalg.rsvd` (default;
        oversampling 10, its automatic power iteration count) or the exact
        ``torch.linalg.svd`` (small layers, or where the exact subspaces matter).  Either
        runs in float32 (float64 for a float64 weight).
    generator : torch.Generator, optional
        Makes the randomized SVD reproducible (any device: a generator of another device
        seeds one on the weight's).
    dtype : torch.dtype, optional
        Of the buffers and ``svfit_delta``: the base weight's (default) or float32.

    Attributes
    ----------
    merged : bool
        Whether the adapter is currently merged into the base weight.

    Notes
    -----
    Parameters trained per layer: ``r``, against LoRA's ``r (in + out)`` at the same rank
    (4096 x 4096, r = 16: 16 against 131,072).  Memory: the frozen ``U_r``, ``V_r``
    (``r (in + out)`` numbers, LoRA's adapter size) but no gradient or optimizer state for
    them.
    """

    _svd_pending = False  # True while the subspaces hold no SVD (built on meta); a class default for old pickles

    def __init__(
        self,
        base_layer: torch.nn.Linear,
        r: int,
        *,
        svd: str = "rsvd",
        generator: Optional[torch.Generator] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dtype = check_base_and_rank("SVFitLinear", base_layer, r, dtype)
        r = int(r)
        if svd not in _SVD_CHOICES:
            raise ValueError(f"SVFitLinear: svd must be one of {_SVD_CHOICES}; got {svd!r}")
        self._setup(base_layer, r)
        self.svd = svd
        weight = base_layer.weight
        if weight.is_meta:  # built on meta (low-memory loading): shapes only, the SVD at reset_parameters / load
            factory = {"device": weight.device, "dtype": dtype}
            U, S, Vh = (torch.empty(self.out_features, r, **factory), torch.empty(r, **factory),
                        torch.empty(r, self.in_features, **factory))
        else:
            U, S, Vh = self._top_triplets(generator)
        self._svd_pending = weight.is_meta
        self.register_buffer("lora_A", Vh.to(dtype).contiguous())
        self.register_buffer("lora_B", U.to(dtype).contiguous())
        self.register_buffer("singular_values", S.to(dtype))
        self.svfit_delta = torch.nn.Parameter(torch.zeros(r, device=U.device, dtype=dtype))

    @torch.no_grad()
    def _top_triplets(self, generator: Optional[torch.Generator]):
        """``(U_r [out, r], S_r [r], Vh_r [r, in])`` of the base weight, in float32 (float64
        for float64)."""
        weight = self.base_layer.weight
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        if self.svd == "full":
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            return U[:, :self.r], S[:self.r], Vh[:self.r]
        # rsvd draws on the weight's device: a generator elsewhere seeds one there.
        return rsvd(weight, self.r, generator=generator_on(generator, weight.device))

    def _gate(self) -> torch.Tensor:
        return self.svfit_delta

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """``svfit_delta = 0``: the layer is the base layer again (the subspaces are kept).
        Raises RuntimeError while merged.

        Built on meta then ``to_empty()``: the subspaces were never computed; they are now,
        from the base weight as it is (initialize or load it first), as the constructor
        computes them (``generator``: of the randomized SVD)."""
        if self.merged:
            raise RuntimeError("SVFitLinear.reset_parameters: the adapter is merged into the base weight; "
                               "unmerge() first")
        with torch.no_grad():
            if self._svd_pending and not self.lora_A.is_meta:
                weight = self.base_layer.weight
                if not all_finite(weight):
                    raise ValueError(f"SVFitLinear.reset_parameters: the base weight holds "
                                     f"{int((~torch.isfinite(weight)).sum())} non-finite entries (built on meta: "
                                     f"initialize or load the base layer first); its SVD needs a finite weight")
                U, S, Vh = self._top_triplets(generator)
                self.lora_A.copy_(Vh)
                self.lora_B.copy_(U)
                self.singular_values.copy_(S)
                self._svd_pending = False
            self.svfit_delta.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "lora_A" in state_dict and not self.lora_A.is_meta:  # the subspaces loaded
            self._svd_pending = False

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self.lora_A.is_meta:  # the subspaces' values are gone
            self._svd_pending = True
        return module

    @property
    def adapted_singular_values(self) -> torch.Tensor:
        """``S_r + svfit_delta`` ``[r]``: the paper's trained singular values (detached)."""
        return (self.singular_values + self.svfit_delta).detach()

    def extra_repr(self) -> str:
        return f"r={self.r}, svd={self.svd!r}"
