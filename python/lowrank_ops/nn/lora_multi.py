"""A frozen ``nn.Linear`` serving (and training) many LoRA adapters in one batch."""
from __future__ import annotations

import json
import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._args import is_integer, require_finite_number, require_tensors
from ..ops._layout import flatten_rows
from ..ops._library import dispatch_needed
from ..ops.lora_multi import as_routing_tensor, lora_linear_multi
from ._init import fan_in_bound, generator_on

__all__ = ["MultiLoRALinear", "group_rows", "restore_rows", "route_rows"]


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


def route_rows(rows: torch.Tensor, row_ids: torch.Tensor, run) -> torch.Tensor:
    """``run(grouped_rows, segment_offsets, adapter_ids)`` (a :func:`~lowrank_ops.ops.lora_linear_multi`
    call) on rows routed one adapter id per row, its output in the rows' order.

    Rows already grouped (ids non-decreasing: one adapter, or sorted) go as they are; others
    are sorted by adapter (:func:`group_rows`), gathered, and restored (:func:`restore_rows`).
    ``rows [N, in]``, ``row_ids [N]`` int (-1: no adapter), on the rows' device or on the
    CPU: host ids (a scheduler's) are grouped on the host and only the row permutation is
    copied to the GPU (non-blocking), so the call never waits for the device.
    """
    if bool((row_ids[1:] >= row_ids[:-1]).all()):
        offsets, segment_ids = _segments(row_ids)
        return run(rows, offsets, segment_ids)
    order, offsets, segment_ids = group_rows(row_ids)
    order = order.to(rows.device, non_blocking=True)
    return restore_rows(run(rows.index_select(0, order), offsets, segment_ids), order)


def _segments(grouped_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(segment_offsets, adapter_ids)`` of ids whose equal values are adjacent."""
    segment_ids, counts = torch.unique_consecutive(grouped_ids, return_counts=True)
    offsets = torch.zeros(segment_ids.numel() + 1, dtype=torch.int64, device=grouped_ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets, segment_ids


def restore_rows(grouped: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of the grouping: ``restore_rows(rows[order], order) == rows`` (differentiable)."""
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return grouped.index_select(0, inverse)


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus many LoRA adapters, chosen per row or per segment.

    ``y = base(x) + scale_a * (x A_a^T) B_a^T`` with ``a`` the adapter of the row, through
    :func:`~lowrank_ops.ops.lora_linear_multi` (one batched call for all adapters,
    forward and backward).  Adapters are stacked: ``lora_A [n_adapters, max_rank, in]``,
    ``lora_B [n_adapters, out, max_rank]``; adapter ``a`` uses its first ``ranks[a]``
    ranks.  ``add_adapter``, ``add_adapters`` and ``remove_adapter`` replace the two
    Parameters (one copy of the stacks each, so add many adapters with ``add_adapters``),
    so create optimizers after changing adapters.  Ids are positions in
    ``adapter_names``: removing an adapter renumbers the later ones.

    ``lora_B`` is stored rank-major (a ``[n_adapters, max_rank, out]`` buffer seen
    transposed: strides ``(max_rank out, 1, out)``), so the CPU kernels read ``B^T`` rows in
    place instead of packing them on every call: the expand ``y += s h B^T`` measured
    1.6-1.7x faster (256 x 256 and 4096 x 4096, 8 adapters, 2-core Xeon).  Shapes, names
    and state dicts are unchanged.

    State dicts carry the adapter names (key ``adapter_names``: their JSON as a uint8
    tensor, so every value stays a tensor), because the stacks are positional: loaded into
    a layer built with the same adapters in another order, the layer takes the
    checkpoint's order (names follow their factors); a layer with other adapters raises
    (drop the key to load the stacks by position, keeping the layer's names).
    Checkpoints without the key load by position.

    Parameters
    ----------
    base : nn.Linear
        The layer to wrap; its weight and bias are frozen (``requires_grad = False``).
    max_rank : int
        Largest rank an adapter may have (the stacks' ``r_max``).
    dtype : torch.dtype, optional
        The stacks' dtype: the base weight's (default) or float32 (float32 adapters on a
        half base, as PEFT keeps them by default: the adapters' products run in float32
        and are added to the half output with one rounding, see
        :func:`~lowrank_ops.ops.lora_linear_multi`).
    """

    def __init__(self, base: nn.Linear, max_rank: int, *, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoRALinear: base must be an nn.Linear; got {type(base).__name__}")
        if not is_integer(max_rank) or max_rank < 1:
            raise ValueError(f"MultiLoRALinear: max_rank must be a positive int; got {max_rank!r}")
        max_rank = int(max_rank)
        weight = base.weight
        dtype = weight.dtype if dtype is None else dtype
        if dtype not in (weight.dtype, torch.float32):
            raise TypeError(f"MultiLoRALinear: dtype is {dtype}; expected the base weight's ({weight.dtype}) "
                            "or torch.float32")
        self.base = base.requires_grad_(False)
        self.max_rank = max_rank
        self.adapter_names: List[str] = []
        self.lora_A = nn.Parameter(weight.new_zeros((0, max_rank, base.in_features), dtype=dtype))
        self.lora_B = nn.Parameter(weight.new_zeros((0, max_rank, base.out_features), dtype=dtype).transpose(1, 2))
        self.register_buffer("ranks", torch.zeros(0, dtype=torch.int64, device=weight.device))
        self.register_buffer("scales", torch.zeros(0, dtype=torch.float64, device=weight.device))
        self._host_routing_cache = None  # see _routing_constants
        self._loading_names: Optional[Tuple[str, Optional[List[str]]]] = None  # see _check_loaded_names
        self.register_state_dict_post_hook(_save_adapter_names)
        self.register_load_state_dict_pre_hook(_check_loaded_names)
        self.register_load_state_dict_post_hook(_adopt_loaded_names)

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

        Copies both stacks (``O(n_adapters)``), so adding ``n`` adapters one by one copies
        ``O(n^2)``; :meth:`add_adapters` adds many in one copy.

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
            For the default initialization of A, drawn on the CPU (a generator of another
            device, e.g. the layer's GPU, seeds a CPU generator with one draw).

        Returns
        -------
        int
            The new adapter's id: its position in ``adapter_names`` and the stacks, for
            ``adapter_ids`` routing (:meth:`remove_adapter` renumbers later adapters).

        Raises
        ------
        ValueError
            A name already used (or not a string), a rank outside ``[1, max_rank]``, or
            factors of the wrong shape.
        """
        spec = dict(name=name, rank=rank, alpha=alpha, use_rslora=use_rslora, lora_A=lora_A, lora_B=lora_B,
                    generator=generator)
        return self._add("add_adapter", [spec])[0]

    def add_adapters(self, specs: Sequence[Mapping[str, Any]]) -> List[int]:
        """Add many adapters with one copy of the stacks (``O(total)``, not ``O(n^2)``).

        Parameters
        ----------
        specs : sequence of mappings
            One per adapter, with :meth:`add_adapter`'s arguments as keys: ``name`` and
            ``rank`` required; ``alpha``, ``use_rslora``, ``lora_A``, ``lora_B``,
            ``generator`` optional.  Adapters with the default initialization and one
            shared generator draw in order, as the same :meth:`add_adapter` calls would.

        Returns
        -------
        list of int
            The new adapters' ids, in order.

        Raises
        ------
        ValueError
            As :meth:`add_adapter` (a name repeated within ``specs`` too), or a spec with
            an unknown or missing key; nothing is added then.
        """
        return self._add("add_adapters", list(specs))

    _SPEC_KEYS = ("name", "rank", "alpha", "use_rslora", "lora_A", "lora_B", "generator")

    def _add(self, caller: str, specs: List[Mapping[str, Any]]) -> List[int]:
        where = f"MultiLoRALinear.{caller}"
        names = list(self.adapter_names)
        checked = []  # validate every spec before changing anything
        for i, spec in enumerate(specs):
            if not isinstance(spec, Mapping) or not {"name", "rank"} <= set(spec) \
                    or not set(spec) <= set(self._SPEC_KEYS):
                raise ValueError(f"{where}: specs[{i}] must be a mapping with keys name, rank and optionally "
                                 f"{', '.join(self._SPEC_KEYS[2:])}; got {spec!r}")
            name, rank, alpha = spec["name"], spec["rank"], spec.get("alpha")
            if not isinstance(name, str) or name in names:
                raise ValueError(f"{where}: name must be a new string; got {name!r} (existing: {names})")
            if not is_integer(rank) or not 1 <= rank <= self.max_rank:
                raise ValueError(f"{where}: rank must be an int in [1, max_rank = {self.max_rank}]; got {rank!r}")
            rank = int(rank)
            if alpha is not None:
                require_finite_number(where, "alpha", alpha)
            alpha = float(rank if alpha is None else alpha)
            scale = alpha / math.sqrt(rank) if spec.get("use_rslora", False) else alpha / rank
            lora_A, lora_B = spec.get("lora_A"), spec.get("lora_B")
            if lora_A is not None:
                self._check_factor(where, "lora_A", lora_A, (rank, self.in_features))
            if lora_B is not None:
                self._check_factor(where, "lora_B", lora_B, (self.out_features, rank))
            names.append(name)
            checked.append((rank, scale, lora_A, lora_B, spec.get("generator")))
        # One copy per call, no spare capacity: a Parameter viewing the first n rows of a
        # larger buffer would be saved whole by torch.save (it writes a view's entire
        # storage), and .to() / deepcopy / load_state_dict(assign=True) would detach it.
        n, k = len(self.adapter_names), len(checked)
        old_A, old_B = self.lora_A, self.lora_B
        new_A = old_A.new_zeros((n + k, self.max_rank, self.in_features))
        new_B = old_B.new_zeros((n + k, self.max_rank, self.out_features))  # rank-major, see the class
        with torch.no_grad():
            new_A[:n] = old_A
            new_B[:n] = old_B.transpose(1, 2)
            for j, (rank, _, lora_A, lora_B, generator) in enumerate(checked, start=n):
                if lora_A is None:
                    bound = fan_in_bound(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
                    # Drawn on the CPU (the same A on every device); a generator of another device seeds a CPU one.
                    cpu_generator = generator_on(generator, torch.device("cpu"))
                    values = torch.rand((rank, self.in_features), generator=cpu_generator, dtype=torch.float64) * 2 - 1
                    new_A[j, :rank] = (values * bound).to(new_A.dtype)
                else:
                    new_A[j, :rank] = lora_A
                if lora_B is not None:
                    new_B[j, :rank] = lora_B.T
        self.lora_A = nn.Parameter(new_A, requires_grad=old_A.requires_grad)
        self.lora_B = nn.Parameter(new_B.transpose(1, 2), requires_grad=old_B.requires_grad)
        self.ranks = torch.cat([self.ranks, self.ranks.new_tensor([c[0] for c in checked])])
        self.scales = torch.cat([self.scales, self.scales.new_tensor([c[1] for c in checked])])
        self.adapter_names = names
        return list(range(n, n + k))

    def remove_adapter(self, name: str) -> int:
        """Remove the adapter called ``name`` and return the id it had.

        Ids are positions: every adapter after it moves down by one (``adapter_id`` of
        the others stays right; ids kept from before must be looked up again).  The
        remaining adapters keep their factors, ranks and scales, so a state dict taken
        afterwards loads into a layer built with the remaining adapters in order.
        Replaces the stacks' Parameters (one ``O(n_adapters)`` copy, rank-major
        ``lora_B`` kept): create optimizers afterwards.

        Raises
        ------
        ValueError
            An unknown name.
        """
        if name not in self.adapter_names:
            raise ValueError(f"MultiLoRALinear.remove_adapter: unknown adapter {name!r}; "
                             f"known: {self.adapter_names}")
        a = self.adapter_names.index(name)
        old_A, old_B = self.lora_A, self.lora_B
        with torch.no_grad():
            B_rank_major = old_B.transpose(1, 2)
            new_A = torch.cat([old_A[:a], old_A[a + 1:]])
            new_B = torch.cat([B_rank_major[:a], B_rank_major[a + 1:]])
        self.lora_A = nn.Parameter(new_A, requires_grad=old_A.requires_grad)
        self.lora_B = nn.Parameter(new_B.transpose(1, 2), requires_grad=old_B.requires_grad)
        self.ranks = torch.cat([self.ranks[:a], self.ranks[a + 1:]])
        self.scales = torch.cat([self.scales[:a], self.scales[a + 1:]])
        self.adapter_names = self.adapter_names[:a] + self.adapter_names[a + 1:]
        return a

    @staticmethod
    def _check_factor(where: str, name: str, tensor: torch.Tensor, shape: Tuple[int, int]) -> None:
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{where}: {name} has shape {got}; expected {shape}")

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
        rows = flatten_rows(x)
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
        row_ids = as_routing_tensor("MultiLoRALinear", adapter_ids, torch.int64, self._routing_device(adapter_ids, x),
                                    "adapter_ids").reshape(-1)
        if row_ids.numel() != n_rows:
            raise ValueError(f"MultiLoRALinear: adapter_ids has {row_ids.numel()} entries; expected one per row "
                             f"({n_rows}) (or pass segment_offsets)")
        if bool((row_ids < 0).all()):  # no row has an adapter: the base layer alone
            return self.base(x)
        return route_rows(rows, row_ids, self._lora_forward).reshape(*x.shape[:-1], self.out_features)

    def _lora_forward(self, rows: torch.Tensor, segment_offsets, adapter_ids) -> torch.Tensor:
        ranks, scales = self._routing_constants()
        return lora_linear_multi(rows, self.base.weight, self.lora_A, self.lora_B, segment_offsets, adapter_ids,
                                 ranks=ranks, scales=scales, bias=self.base.bias)

    @staticmethod
    def _routing_device(adapter_ids, x: torch.Tensor) -> torch.device:
        """Where per-row ids are grouped: the host, unless they already are on x's device
        (or torch.compile traces, which keeps the routing on x's device).  A meta x with
        host-side ids (names, a list): the host, where the grouping can read them."""
        on_x = isinstance(adapter_ids, torch.Tensor) and adapter_ids.device == x.device
        if on_x or (dispatch_needed(x) and not x.is_meta):
            return x.device
        return torch.device("cpu")

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``to``, ``half``, ``cuda``, ...), keeping ``scales`` float64:
        ``.half()`` / ``.bfloat16()`` cast every floating buffer, and a scale of 16/3
        became 5.34375 for good (2e-3 relative in the adapter term, kept after ``.float()``)."""
        scales = self.scales
        module = super()._apply(fn, recurse)
        if self.scales.dtype != torch.float64:
            self.scales = scales.to(device=self.scales.device, dtype=torch.float64)
        return module

    def _routing_constants(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ranks, scales)`` for :func:`~lowrank_ops.ops.lora_linear_multi`, scales in
        float64 (``module.to(dtype)`` casts floating buffers too).

        On a GPU, host copies: the op checks the routing on the host, and copies of the
        buffers kept here spare every call a device-to-host read (a wait for all queued
        work).  They are refreshed when a buffer is replaced (adapters added or removed,
        ``module.to``) or changed in place (``load_state_dict``: its version counter moves).
        """
        ranks, scales = self.ranks, self.scales
        if ranks.device.type == "cpu" or dispatch_needed(ranks):
            return ranks, scales.double()
        cache = self._host_routing_cache
        if (cache is None or cache[0] is not ranks or cache[1] is not scales
                or cache[2] != (ranks._version, scales._version)):
            cache = (ranks, scales, (ranks._version, scales._version), ranks.cpu(), scales.double().cpu())
            self._host_routing_cache = cache
        return cache[3], cache[4]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, max_rank={self.max_rank}, "
                f"adapters={self.adapter_names}")


# ---------------------------------------------------------------------------- checkpoint hooks
# Module-level functions: they pickle and deep-copy with the module.
ADAPTER_NAMES_KEY = "adapter_names"


def _save_adapter_names(module: MultiLoRALinear, state_dict, prefix: str, local_metadata) -> None:
    encoded = json.dumps(module.adapter_names).encode("utf-8")
    state_dict[prefix + ADAPTER_NAMES_KEY] = torch.tensor(list(encoded), dtype=torch.uint8)


def _check_loaded_names(module: MultiLoRALinear, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """Compare the checkpoint's adapter names with the layer's (before its tensors are copied)."""
    key = prefix + ADAPTER_NAMES_KEY
    if key not in state_dict:
        return  # a checkpoint saved before the names were: by position
    saved = _decode_names(state_dict[key])
    current = module.adapter_names
    if saved is None:
        error_msgs.append(f"MultiLoRALinear: {key} does not hold a JSON list of adapter names")
    elif len(saved) != len(current) or saved == current:
        saved = None  # a different count is reported by the stacks' size mismatch
    elif sorted(saved) != sorted(current):
        # Reported whatever ``strict`` (torch hands the hooks strict=True either way).
        error_msgs.append(f"MultiLoRALinear: the checkpoint holds the adapters {saved}; this layer has {current} "
                          f"(build the layer with the checkpoint's adapters; to load the stacks by position "
                          f"and keep this layer's names, drop the entry {key!r})")
        saved = None
    module._loading_names = (key, saved)


def _adopt_loaded_names(module: MultiLoRALinear, incompatible_keys) -> None:
    """The same adapters in another order: the layer takes the checkpoint's order, which its
    (positional) factors, ranks and scales now follow.  The names' key is no unexpected key."""
    if module._loading_names is None:
        return
    key, saved = module._loading_names
    module._loading_names = None
    if key in incompatible_keys.unexpected_keys:
        incompatible_keys.unexpected_keys.remove(key)
    if saved is not None:
        module.adapter_names = saved


def _decode_names(value) -> Optional[List[str]]:
    try:
        names = json.loads(bytes(torch.as_tensor(value).cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, TypeError, RuntimeError):
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return None
    return names
