"""A frozen ``nn.Linear`` serving (and training) many LoRA adapters in one batch."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._args import require_finite_number, require_tensors
from ..ops.lora_multi import as_routing_tensor, lora_linear_multi
from ._init import fan_in_bound

__all__ = ["MultiLoRALinear", "group_rows", "restore_rows"]


def group_rows(row_adapter_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort rows by adapter into segments, one segment per adapter present.

    Parameters
    ----------
    row_adapter_ids : Tensor[N] of int
        Adapter of every row (-1: none).

    Returns
    -------
    order : Tensor[N] int64
        Stable permutation: ``rows[order]`` groups the rows by adapter, keeping their order
        within an adapter.
    segment_offsets : Tensor[n_segments + 1] int64
    adapter_ids : Tensor[n_segments] int64
        Ascending adapter ids (-1 first if present); pass them with ``segment_offsets`` to
        :func:`~lowrank_ops.ops.lora_linear_multi`.
    """
    ids = row_adapter_ids.to(torch.int64).reshape(-1)
    order = torch.argsort(ids, stable=True)
    offsets, segment_ids = _segments(ids[order])
    return order, offsets, segment_ids


def _segments(grouped_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(segment_offsets, adapter_ids)`` of ids whose equal values are adjacent."""
    segment_ids, counts = torch.unique_consecutive(grouped_ids, return_counts=True)
    offsets = torch.zeros(segment_ids.numel() + 1, dtype=torch.int64, device=grouped_ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets, segment_ids


def restore_rows(grouped: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of the grouping: ``restore_rows(rows[order], order) == rows`` (differentiable)."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return grouped.index_select(0, inverse)


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus many LoRA adapters, chosen per row or per segment.

    ``y = base(x) + scale_a * (x A_a^T) B_a^T`` with ``a`` the adapter of the row, through
    :func:`~lowrank_ops.ops.lora_linear_multi` (one batched call for all adapters,
    forward and backward).  Adapters are stacked: ``lora_A [n_adapters, max_rank, in]``,
    ``lora_B [n_adapters, out, max_rank]``; adapter ``a`` uses its first ``ranks[a]``
    ranks.  ``add_adapter`` replaces the two Parameters by larger ones, so create
    optimizers after adding adapters.

    ``lora_B`` is stored rank-major (a ``[n_adapters, max_rank, out]`` buffer seen
    transposed: strides ``(max_rank out, 1, out)``), so the CPU kernels read ``B^T`` rows in
    place instead of packing them on every call: the expand ``y += s h B^T`` measured
    1.6-1.7x faster (256 x 256 and 4096 x 4096, 8 adapters, 2-core Xeon).  Shapes, names
    and state dicts are unchanged.

    Parameters
    ----------
    base : nn.Linear
        The layer to wrap; its weight and bias are frozen (``requires_grad = False``).
    max_rank : int
        Largest rank an adapter may have (the stacks' ``r_max``).
    """

    def __init__(self, base: nn.Linear, max_rank: int) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear: base must be an nn.Linear; got {type(base).__name__}")
        if not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"MultiLoRALinear: max_rank must be a positive int; got {max_rank!r}")
        self.base = base.requires_grad_(False)
        self.max_rank = max_rank
        self.adapter_names: List[str] = []
        weight = base.weight
        self.lora_A = nn.Parameter(weight.new_zeros((0, max_rank, base.in_features)))
        self.lora_B = nn.Parameter(weight.new_zeros((0, max_rank, base.out_features)).transpose(1, 2))
        self.register_buffer("ranks", torch.zeros(0, dtype=torch.int64, device=weight.device))
        self.register_buffer("scales", torch.zeros(0, dtype=torch.float64, device=weight.device))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: Optional[float] = None,
        *,
        use_rslora: bool = False,
        lora_A: Optional[torch.Tensor] = None,
        lora_B: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> int:
        """Add an adapter and return its id.

        Parameters
        ----------
        name : str
            Unique name, used for routing by name.
        rank : int
            ``1 <= rank <= max_rank``.
        alpha : float, optional
            Scale numerator: ``scale = alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``);
            default ``rank`` (scale 1 without rsLoRA).
        use_rslora : bool
        lora_A, lora_B : Tensor[rank, in_features], Tensor[out_features, rank], optional
            Initial factors (e.g. loaded from a PEFT checkpoint).  Default: PEFT's LoRA
            initialization, A Kaiming-uniform (``a = sqrt(5)``) and B zero.
        generator : torch.Generator, optional
            For the default initialization of A.

        Returns
        -------
        int
            The new adapter's id (its index in ``adapter_names`` and the stacks), for
            ``adapter_ids`` routing.

        Raises
        ------
        ValueError
            A name already used (or not a string), a rank outside ``[1, max_rank]``, or
            factors of the wrong shape.
        """
        if not isinstance(name, str) or name in self.adapter_names:
            raise ValueError(f"MultiLoRALinear.add_adapter: name must be a new string; got {name!r} "
                             f"(existing: {self.adapter_names})")
        if not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise ValueError(f"MultiLoRALinear.add_adapter: rank must be an int in [1, max_rank = {self.max_rank}]; "
                             f"got {rank!r}")
        if alpha is not None:
            require_finite_number("MultiLoRALinear.add_adapter", "alpha", alpha)
        alpha = float(rank if alpha is None else alpha)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weight = self.base.weight
        new_A = weight.new_zeros((1, self.max_rank, self.in_features))
        new_B = weight.new_zeros((1, self.max_rank, self.out_features)).transpose(1, 2)  # rank-major, see the class
        with torch.no_grad():
            if lora_A is None:
                bound = fan_in_bound(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
                values = torch.rand((rank, self.in_features), generator=generator, dtype=torch.float64) * 2 - 1
                new_A[0, :rank] = (values * bound).to(weight.dtype)
            else:
                self._check_factor("lora_A", lora_A, (rank, self.in_features))
                new_A[0, :rank] = lora_A
            if lora_B is not None:
                self._check_factor("lora_B", lora_B, (self.out_features, rank))
                new_B[0, :, :rank] = lora_B
        self.lora_A = nn.Parameter(torch.cat([self.lora_A.detach(), new_A]))
        self.lora_B = nn.Parameter(torch.cat([self.lora_B.detach().transpose(1, 2), new_B.transpose(1, 2)]).transpose(1, 2))
        self.ranks = torch.cat([self.ranks, self.ranks.new_tensor([rank])])
        self.scales = torch.cat([self.scales, self.scales.new_tensor([scale])])
        self.adapter_names.append(name)
        return len(self.adapter_names) - 1

    @staticmethod
    def _check_factor(name: str, tensor: torch.Tensor, shape: Tuple[int, int]) -> None:
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"MultiLoRALinear.add_adapter: {name} has shape {got}; expected {shape}")

    def adapter_id(self, name: Optional[str]) -> int:
        """Id of the adapter called ``name``; -1 for None (the base layer only)."""
        if name is None:
            return -1
        try:
            return self.adapter_names.index(name)
        except ValueError:
            raise ValueError(f"MultiLoRALinear: unknown adapter {name!r}; known: {self.adapter_names}") from None

    def forward(
        self,
        x: torch.Tensor,
        adapter_names: Optional[Sequence[Optional[str]]] = None,
        *,
        adapter_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        segment_offsets: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    ) -> torch.Tensor:
        """Apply the base layer and each row's adapter.

        Routing, one of:

        * ``adapter_names``: one name (or None: no adapter) per row, rows being the
          flattened leading dimensions of x, like PEFT's mixed batch;
        * ``adapter_ids`` alone: one id (-1: none) per row;
        * ``segment_offsets`` and ``adapter_ids``: rows already grouped, one id per segment
          (no sorting; what a server that batches by adapter passes, and what
          ``torch.compile`` traces without a graph break).

        Per-row routing sorts the rows by adapter (:func:`group_rows`), runs one batched
        call and restores the order; rows that are already grouped (one adapter, or ids
        in non-decreasing order) skip the sort, the gather and the restore.  With no
        routing, or every id -1, only the base layer runs (the stacks then get no
        gradient: ``grad`` stays None, which optimizers skip).

        Parameters
        ----------
        x : Tensor[..., in_features]
            In the base weight's dtype (float32, float64, float16 or bfloat16) and on its
            device; rows are the flattened leading dimensions.
        adapter_names : sequence of (str or None), optional
            One per row.
        adapter_ids : Tensor[N] or Tensor[n_segments] of int, or sequence of int, optional
            One id per row (-1: none), or one per segment with ``segment_offsets``.
        segment_offsets : Tensor[n_segments + 1] or sequence of int, optional
            Non-decreasing row offsets from 0 to the number of rows.

        Returns
        -------
        Tensor[..., out_features]
            In x's dtype; differentiable in x and the adapter stacks
            (:func:`~lowrank_ops.ops.lora_linear_multi`).

        Raises
        ------
        ValueError
            An unknown adapter name, routing of the wrong length, or a conflicting
            combination of routing arguments.
        """
        require_tensors("MultiLoRALinear", x=x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"MultiLoRALinear: x has shape {tuple(x.shape)}; expected "
                             f"(..., in_features) = (..., {self.in_features})")
        rows = x.reshape(x.shape[:-1].numel(), self.in_features)
        n_rows = rows.shape[0]
        if segment_offsets is not None:
            if adapter_names is not None or adapter_ids is None:
                raise ValueError("MultiLoRALinear: segment_offsets needs adapter_ids (one per segment) "
                                 "and no adapter_names")
            y = self._lora_forward(rows, segment_offsets, adapter_ids)
            return y.reshape(*x.shape[:-1], self.out_features)
        if adapter_names is not None:
            if adapter_ids is not None:
                raise ValueError("MultiLoRALinear: pass adapter_names or adapter_ids, not both")
            if len(adapter_names) != n_rows:
                raise ValueError(f"MultiLoRALinear: adapter_names has {len(adapter_names)} entries; "
                                 f"expected one per row ({n_rows})")
            adapter_ids = torch.tensor([self.adapter_id(name) for name in adapter_names], dtype=torch.int64)
        if adapter_ids is None:
            return self.base(x)
        row_ids = as_routing_tensor("MultiLoRALinear", adapter_ids, torch.int64, x.device, "adapter_ids").reshape(-1)
        if row_ids.numel() != n_rows:
            raise ValueError(f"MultiLoRALinear: adapter_ids has {row_ids.numel()} entries; expected one per row "
                             f"({n_rows}) (or pass segment_offsets)")
        if bool((row_ids[1:] >= row_ids[:-1]).all()):  # already grouped (one adapter, or sorted): no gather
            offsets, segment_ids = _segments(row_ids)
            if bool((segment_ids < 0).all()):  # no row has an adapter: the base layer alone
                return self.base(x)
            y = self._lora_forward(rows, offsets, segment_ids)
        else:
            order, offsets, segment_ids = group_rows(row_ids)
            y = restore_rows(self._lora_forward(rows.index_select(0, order), offsets, segment_ids), order)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _lora_forward(self, rows: torch.Tensor, segment_offsets, adapter_ids) -> torch.Tensor:
        # scales in float64 even after module.to(dtype), which casts floating buffers too
        return lora_linear_multi(rows, self.base.weight, self.lora_A, self.lora_B, segment_offsets, adapter_ids,
                                 ranks=self.ranks, scales=self.scales.double(), bias=self.base.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_rank={self.max_rank}, "
                f"adapters={self.adapter_names}")
