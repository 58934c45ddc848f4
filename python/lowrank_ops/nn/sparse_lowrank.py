"""SLTrain's sparse-plus-low-rank linear layer."""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from .._args import require_values
from .._dtypes import accumulate_dtype
from .._finite import all_finite
from ..ops.sparse_lowrank import STRATEGIES, sparse_lowrank_linear
from ..sparse import FixedSupport
from ._init import fan_in_bound, uniform_

__all__ = ["SparseLowRankLinear"]


class SparseLowRankLinear(torch.nn.Module):
    """``y = x (scale * B A + S)^T + b`` with S on a fixed random support (SLTrain).

    Trainable: ``lora_A [rank, in]``, ``lora_B [out, rank]``, ``values [nnz]`` (the
    entries of S) and ``bias [out]``.  The support is a
    :class:`~lowrank_ops.sparse.FixedSupport` submodule, saved with the state dict.

    Parameters
    ----------
    in_features, out_features : int
    rank : int
        Rank of the low-rank part, ``1 <= rank <= min(in_features, out_features)``.
    density : float
        Fraction of entries of S that are stored, in ``(0, 1]``.
    bias : bool
    scale : float, optional
        Multiplier of ``B A``; default ``alpha / rank``.
    alpha : float
        SLTrain's ``lora_alpha`` (its 1B and 7B runs use 8); ignored when ``scale`` is given.
    strategy : {"auto", "sparse", "dense"}
        Backward strategy, see :func:`lowrank_ops.ops.sparse_lowrank.sparse_lowrank_linear`.
    generator : torch.Generator, optional
        Makes the support and the initialization reproducible.
    device, dtype : optional
        Of the parameters.

    Notes
    -----
    Initialization follows the SLTrain paper: ``A ~ U(-1/sqrt(in), 1/sqrt(in))``
    (Kaiming-uniform with a = sqrt(5)), ``B = 0``, values ``~ U(-1/sqrt(in), 1/sqrt(in))``,
    bias ``~ U(-1/sqrt(out), 1/sqrt(out))``; so at step 0 the layer is the sparse matrix.
    Parameter count: ``rank (in + out) + nnz (+ out)`` instead of ``in out (+ out)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        density: float,
        bias: bool = True,
        *,
        scale: Optional[float] = None,
        alpha: float = 8.0,
        strategy: str = "auto",
        generator: Optional[torch.Generator] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        _check_config(in_features, out_features, rank, density, strategy)
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.scale = float(scale) if scale is not None else float(alpha) / self.rank
        self.strategy = strategy
        # Built on meta (device="meta" or `with torch.device("meta")`): only the pattern's sizes,
        # nothing drawn; reset_parameters() draws it once the layer has real storage (to_empty).
        on_meta = torch.empty(0, device=device).is_meta
        self.support = FixedSupport.random(out_features, in_features, density, generator=generator,
                                           device="meta" if on_meta else device)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = torch.nn.Parameter(torch.empty(out_features, rank, **factory))
        self.values = torch.nn.Parameter(torch.empty(self.support.nnz, **factory))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters(generator)
        self.register_load_state_dict_post_hook(_keep_consistent_after_load)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """SLTrain's initialization (see the class notes).

        A support without a pattern (the layer was built on meta, then ``to_empty()``) is
        drawn first, as the constructor draws it (same density, sampled on the generator's
        device): the same generator then gives the layer the constructor would have built.
        A support that holds a pattern is kept (it is fixed for the layer's life).
        """
        if self.support._unset and not self.values.is_meta:
            total = self.out_features * self.in_features
            fresh = FixedSupport.random(self.out_features, self.in_features, self.support.nnz / total,
                                        generator=generator, device=self.values.device,
                                        index_dtype=self.support.index_dtype)
            self.support._take_pattern(fresh)
        bound = fan_in_bound(self.in_features)
        with torch.no_grad():
            uniform_(self.lora_A, bound, generator)
            self.lora_B.zero_()
            uniform_(self.values, bound, generator)
            if self.bias is not None:
                uniform_(self.bias, fan_in_bound(self.out_features), generator)

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        rank: int,
        density: float,
        *,
        scale: float = 1.0,
        strategy: str = "auto",
        generator: Optional[torch.Generator] = None,
    ) -> "SparseLowRankLinear":
        """Approximates a trained ``nn.Linear`` by ``scale B A + S``.

        The low-rank part is the best rank-``rank`` approximation of the weight (a thin
        SVD, split evenly as ``B = U sqrt(s / scale)``, ``A = sqrt(s / scale) V^T``); the sparse
        values are the residual ``W - scale B A`` at a random support of the given
        density.  Bias is copied.  Computed in float32 (float64 for float64 weights).
        """
        weight = linear.weight.detach()
        require_values("SparseLowRankLinear.from_linear", "linear.weight", weight)
        if not all_finite(weight):  # LAPACK's SVD fails on it with a convergence error
            raise ValueError(f"SparseLowRankLinear.from_linear: linear.weight holds "
                             f"{int((~torch.isfinite(weight)).sum())} NaN or infinite entries")
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, rank, density, linear.bias is not None, scale=scale, strategy=strategy,
            generator=generator, device=weight.device, dtype=weight.dtype,
        )
        if not layer.scale > 0:  # the split divides the singular values by it: NaN for scale <= 0
            raise ValueError(f"SparseLowRankLinear.from_linear: scale must be > 0 (B A = U diag(s / scale) V^T); "
                             f"got {layer.scale!r}")
        work = weight.to(accumulate_dtype(weight.dtype))
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        root = (s[:rank] / layer.scale).sqrt()  # scale * B A = U_k diag(s_k) V_k^T, split evenly
        lora_B = u[:, :rank] * root
        lora_A = root[:, None] * vh[:rank]
        residual = work - layer.scale * (lora_B @ lora_A)
        with torch.no_grad():
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
            layer.values.copy_(layer.support.values_from_dense(residual))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x (scale B A + S)^T + b`` (:func:`lowrank_ops.ops.sparse_lowrank.sparse_lowrank_linear`).

        Parameters
        ----------
        x : Tensor[..., in_features]
            In the parameters' dtype (float32, float64, float16 or bfloat16) and on their
            device.

        Returns
        -------
        Tensor[..., out_features]
            In x's dtype; differentiable in x, ``lora_A``, ``lora_B``, ``values`` and ``bias``
            (backward by the layer's ``strategy``).
        """
        return sparse_lowrank_linear(
            x, self.lora_A, self.lora_B, self.values, self.support, self.bias, scale=self.scale, strategy=self.strategy
        )

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight ``scale B A + S``, ``[out, in]``."""
        with torch.no_grad():
            return self.scale * (self.lora_B @ self.lora_A) + self.support.to_dense(self.values)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"density={self.support.density:.4g}, scale={self.scale:.4g}, bias={self.bias is not None}, "
            f"strategy={self.strategy!r}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # What the post-load hook puts back when the load leaves the layer inconsistent.
        self._before_load = (self.get_extra_state(), self.support.shape,
                             {name: buffer for name, buffer in self.support._buffers.items()}, self.support._unset)
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        except BaseException:  # the load stops here: no post-load hook will take it
            del self._before_load
            raise

    # The support's shape changes nothing here, but scale, rank and strategy must
    # travel with the state dict for a loaded layer to compute the same function.
    def get_extra_state(self):
        return {"scale": self.scale, "rank": self.rank, "strategy": self.strategy}

    def set_extra_state(self, state) -> None:
        self.scale, self.rank, self.strategy = float(state["scale"]), int(state["rank"]), state["strategy"]


def _keep_consistent_after_load(module: "SparseLowRankLinear", incompatible_keys) -> None:
    """A load that failed on some tensors (torch reports the size mismatches after loading the
    rest) left the support of the checkpoint with the values of the layer (48 positions, 120
    values: every forward then raised), or its rank with the factors of the layer: the
    support and the extra state are put back whenever they disagree with the tensors."""
    before = module.__dict__.pop("_before_load", None)
    if before is None:
        return
    extra, shape, buffers, unset = before
    if module.values.numel() != module.support.nnz or module.lora_A.shape[0] != module.rank:
        module.support.out_features, module.support.in_features = shape
        module.support._buffers.update(buffers)
        module.support._unset = unset
        module.set_extra_state(extra)


def _check_config(in_features, out_features, rank, density, strategy) -> None:
    where = "SparseLowRankLinear"
    for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where}: {name} must be an integer; got {value!r}")
    if int(in_features) < 1 or int(out_features) < 1:
        raise ValueError(f"{where}: in_features and out_features must be >= 1; got ({in_features}, {out_features})")
    if not 1 <= int(rank) <= min(int(in_features), int(out_features)):
        raise ValueError(
            f"{where}: rank must be in [1, min(in_features, out_features)] = [1, {min(in_features, out_features)}]; "
            f"got {rank}"
        )
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{where}: density must be in (0, 1]; got {density}")
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: strategy must be one of {STRATEGIES}; got {strategy!r}")
