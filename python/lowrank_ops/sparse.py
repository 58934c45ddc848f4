"""Fixed sparsity patterns (supports) for sparse matrices whose values live elsewhere.

A :class:`FixedSupport` is the pattern of an ``[out_features, in_features]`` matrix S:
which entries may be non-zero.  The values are a plain dense ``[nnz]`` tensor kept by
the caller (typically an ``nn.Parameter``), so any optimizer works on them; this is how
SLTrain stores its sparse part.  The pattern is built once and stored as

* CSR: ``row_ptr [out+1]``, ``col_idx [nnz]`` (columns sorted within each row),
* CSC (the transpose map used by the backward pass): ``col_ptr [in+1]``,
  ``row_idx [nnz]`` and ``csc_to_csr [nnz]`` (CSC position -> index into ``values``),
* ``row_order [out]`` / ``col_order [in]``: rows (columns) longest first, the CUDA
  kernels' scheduling order,

all in int32 when every index fits, int64 otherwise.  ``FixedSupport`` is an
``nn.Module`` holding these as buffers, so it moves with ``.to(device)`` and is saved
and restored with the owning module's ``state_dict`` (a support of another size loads
too: the buffers are replaced, not copied into).

A support whose buffers are on the meta device holds no pattern, only its sizes, and
``to_empty()`` leaves it so (uninitialized index memory): such a support is refused by
the ops and by :meth:`FixedSupport.to_dense` until a pattern is loaded
(``load_state_dict``) or drawn (``SparseLowRankLinear.reset_parameters()``).
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Tuple, Union, overload

import torch

from ._args import require_fits_in_memory
from ._csr import check_index_range, check_row_ptr

__all__ = ["FixedSupport"]

_INT32_MAX = 2**31 - 1
_BUFFERS = ("row_ptr", "col_idx", "col_ptr", "row_idx", "csc_to_csr", "row_order", "col_order")


def _index_dtype(*extents: int) -> torch.dtype:
    return torch.int32 if max(extents, default=0) <= _INT32_MAX else torch.int64


def _check_shape(shape, where: str) -> Tuple[int, int]:
    try:
        sizes = tuple(shape)
        # Integers only (int() truncated 3.9 to a 3-row pattern): Python or NumPy ints, or
        # 0-d integer tensors (a torch.Size's entries).
        if len(sizes) != 2 or any(isinstance(s, bool) or int(s) != s or isinstance(s, float) for s in sizes):
            raise ValueError
        out_features, in_features = (int(s) for s in sizes)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: shape must be two integers (out_features, in_features); got {shape!r}") from None
    if out_features < 0 or in_features < 0:
        raise ValueError(f"{where}: shape must be non-negative; got ({out_features}, {in_features})")
    return out_features, in_features


class FixedSupport(torch.nn.Module):
    """The fixed sparsity pattern of an ``[out_features, in_features]`` matrix.

    Build one with :meth:`random`, :meth:`from_indices` or :meth:`from_csr`; the
    constructor takes already-validated sorted coordinates and is internal.

    Attributes
    ----------
    shape : tuple[int, int]
        ``(out_features, in_features)``.
    nnz : int
        Number of stored entries.
    density : float
        ``nnz / (out_features * in_features)`` (0 for an empty shape).
    index_dtype : torch.dtype
        int32 when ``nnz`` and both dimensions fit in int32, else int64.
    """

    # True while the buffers hold no pattern: on the meta device, or after to_empty() from
    # it (uninitialized memory).  Cleared when a pattern is set or loaded.
    _unset = False

    def __init__(
        self, rows: torch.Tensor, cols: torch.Tensor, shape: Tuple[int, int], *, index_dtype: Optional[torch.dtype] = None
    ):
        super().__init__()
        out_features, in_features = _check_shape(shape, "FixedSupport")
        self.out_features, self.in_features = out_features, in_features
        self._set_pattern(rows, cols, index_dtype)

    # ------------------------------------------------------------------ builders
    @classmethod
    def random(
        cls,
        out_features: int,
        in_features: int,
        density: float,
        *,
        generator: Optional[torch.Generator] = None,
        device: Union[str, torch.device, None] = None,
        index_dtype: Optional[torch.dtype] = None,
    ) -> "FixedSupport":
        """A pattern of ``round(density * out * in)`` entries drawn uniformly without replacement.

        Parameters
        ----------
        out_features, in_features : int
            Matrix shape.
        density : float
            Fraction of stored entries, in ``[0, 1]``.
        generator : torch.Generator, optional
            Source of randomness (sampling runs on the generator's device); the same
            generator state gives the same pattern.
        device : optional
            Device of the returned pattern (default: the generator's device, else CPU).
        index_dtype : torch.int32 or torch.int64, optional
            Index dtype of the buffers (default: int32 when every index fits).

        Returns
        -------
        FixedSupport
            The pattern, sorted by (row, column), with its buffers on ``device``.  On the
            meta device only the buffers' sizes are made: nothing is drawn (the generator
            is not advanced) and the support holds no pattern (see the module docstring).

        Raises
        ------
        ValueError
            A negative shape, ``density`` outside ``[0, 1]``, or an ``index_dtype`` that
            is neither int64 nor an int32 that fits.
        """
        out_features, in_features = _check_shape((out_features, in_features), "FixedSupport.random")
        if isinstance(density, (bool, str)) or not isinstance(density, numbers.Real) or not 0.0 <= density <= 1.0:
            raise ValueError(f"FixedSupport.random: density must be a number in [0, 1]; got {density!r}")
        density = float(density)
        total = out_features * in_features
        nnz = min(total, int(round(density * total)))
        if device is not None and torch.device(device).type == "meta":
            return cls._without_pattern((out_features, in_features), nnz, index_dtype)
        sample_device = generator.device if generator is not None else torch.device("cpu")
        if 4 * nnz > total:
            keys = torch.randperm(total, generator=generator, device=sample_device)[:nnz]
        else:
            keys = _sample_distinct(total, nnz, generator, sample_device)
        keys = keys.sort().values
        support = cls(
            keys // max(in_features, 1), keys % max(in_features, 1), (out_features, in_features), index_dtype=index_dtype
        )
        return support.to(device if device is not None else sample_device)

    @overload
    @classmethod
    def from_indices(cls, rows: torch.Tensor, cols: torch.Tensor, shape: Tuple[int, int]) -> "FixedSupport": ...

    @overload
    @classmethod
    def from_indices(
        cls, rows: torch.Tensor, cols: torch.Tensor, shape: Tuple[int, int], values: torch.Tensor
    ) -> Tuple["FixedSupport", torch.Tensor]: ...

    @classmethod
    def from_indices(
        cls, rows: torch.Tensor, cols: torch.Tensor, shape: Tuple[int, int], values: Optional[torch.Tensor] = None
    ) -> Union["FixedSupport", Tuple["FixedSupport", torch.Tensor]]:
        """A pattern from coordinate lists, in any order.

        Parameters
        ----------
        rows, cols : Tensor[nnz], integer
            Coordinates of the stored entries (any integer dtype, one device; sequences
            are converted); each pair at most once.
        shape : (int, int)
            ``(out_features, in_features)``.
        values : Tensor[nnz], optional
            Values in the order of ``rows``/``cols`` (any dtype and device).

        Returns
        -------
        FixedSupport or (FixedSupport, Tensor[nnz])
            The pattern, on the device of ``rows``, index dtype int32 when every index
            fits (else int64).  With ``values``: also the values permuted into the
            support's CSR order, same dtype and device as ``values`` (differentiable:
            an indexing of ``values``).

        Raises
        ------
        ValueError
            Coordinates out of range, duplicated, or of mismatched lengths.
        """
        out_features, in_features = _check_shape(shape, "FixedSupport.from_indices")
        rows = _as_index_vector(rows, "rows", "FixedSupport.from_indices")
        cols = _as_index_vector(cols, "cols", "FixedSupport.from_indices")
        if rows.shape != cols.shape or rows.device != cols.device:
            raise ValueError(
                f"FixedSupport.from_indices: rows has shape {tuple(rows.shape)} on {rows.device}; expected the "
                f"shape and device of cols, {tuple(cols.shape)} on {cols.device}"
            )
        check_index_range("FixedSupport.from_indices", rows, out_features, "rows")
        check_index_range("FixedSupport.from_indices", cols, in_features, "cols")
        keys = rows * in_features + cols
        keys, order = keys.sort()
        duplicate = keys[1:] == keys[:-1]
        if bool(duplicate.any()):
            first = int(keys[1:][duplicate][0])
            raise ValueError(
                f"FixedSupport.from_indices: {int(duplicate.sum())} duplicate coordinate(s); expected each (row, col) "
                f"at most once, first duplicate ({first // in_features}, {first % in_features})"
            )
        support = cls(rows[order], cols[order], (out_features, in_features))
        if values is None:
            return support
        if not isinstance(values, torch.Tensor) or values.shape != rows.shape:
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"FixedSupport.from_indices: values has shape {got}; expected (nnz,) = {tuple(rows.shape)}")
        return support, values[order.to(values.device)]

    @classmethod
    def from_csr(cls, row_ptr: torch.Tensor, col_idx: torch.Tensor, shape: Tuple[int, int]) -> "FixedSupport":
        """A pattern from CSR arrays, validated (columns strictly increasing within each row).

        Parameters
        ----------
        row_ptr : Tensor[out_features + 1], integer
            Row pointers: the entries of row ``i`` are ``col_idx[row_ptr[i]:row_ptr[i + 1]]``.
        col_idx : Tensor[nnz], integer
            Column of every entry, sorted within each row; on the device of ``row_ptr``.
            Both arrays may have any integer dtype (sequences are converted).
        shape : (int, int)
            ``(out_features, in_features)``.

        Returns
        -------
        FixedSupport
            The pattern (the same entry order, so values in CSR order stay valid), on the
            device of the arrays, index dtype int32 when every index fits (else int64).

        Raises
        ------
        ValueError
            Row pointers not starting at 0, decreasing, or not ending at ``len(col_idx)``;
            columns out of range, unsorted or duplicated within a row.
        """
        where = "FixedSupport.from_csr"
        out_features, in_features = _check_shape(shape, where)
        row_ptr = _as_index_vector(row_ptr, "row_ptr", where)
        col_idx = _as_index_vector(col_idx, "col_idx", where)
        rows = _csr_rows(row_ptr, col_idx, out_features, in_features, where)
        return cls(rows, col_idx, (out_features, in_features))

    @classmethod
    def _without_pattern(cls, shape: Tuple[int, int], nnz: int, index_dtype: Optional[torch.dtype]) -> "FixedSupport":
        """A support of ``nnz`` entries with meta buffers of the pattern's sizes and no pattern."""
        out_features, in_features = shape
        index_dtype = _resolve_index_dtype(nnz, out_features, in_features, index_dtype)
        support = cls.__new__(cls)
        torch.nn.Module.__init__(support)
        support.out_features, support.in_features = out_features, in_features
        sizes = {"row_ptr": out_features + 1, "col_idx": nnz, "col_ptr": in_features + 1, "row_idx": nnz,
                 "csc_to_csr": nnz, "row_order": out_features, "col_order": in_features}
        for name in _BUFFERS:
            support.register_buffer(name, torch.empty(sizes[name], dtype=index_dtype, device="meta"))
        support._unset = True
        return support

    # ------------------------------------------------------------------ pattern
    def _set_pattern(self, rows: torch.Tensor, cols: torch.Tensor, index_dtype: Optional[torch.dtype]) -> None:
        """Builds every buffer from coordinates sorted by (row, col), already validated."""
        for name, tensor in _pattern_buffers(rows, cols, self.shape, index_dtype).items():
            self.register_buffer(name, tensor)
        self._unset = False

    def _take_pattern(self, other: "FixedSupport") -> None:
        """Makes this support hold ``other``'s pattern (its buffers, shared), keeping this module's identity."""
        self.out_features, self.in_features = other.shape
        self._buffers.update({name: other._buffers[name] for name in _BUFFERS})
        self._unset = other._unset

    def _require_pattern(self, where: str) -> None:
        """Raises ValueError when the buffers hold no pattern (they are uninitialized memory
        after ``to_empty()`` from the meta device); a support still on meta passes, so
        shape inference on meta keeps working.  An attribute read: cheap on every call."""
        if self._unset and not self.col_idx.is_meta:
            raise ValueError(
                f"{where}: support holds no sparsity pattern (it was built on the meta device and to_empty() "
                f"left its {self.index_dtype} index buffers uninitialized on {self.device}); load one with "
                f"load_state_dict() or draw one with the owning layer's reset_parameters()"
            )

    def pattern(self) -> Dict[str, torch.Tensor]:
        """The pattern buffers by name (``row_ptr``, ``col_idx``, ...; see the class docstring).

        The module's own buffer dict, not a copy: one lookup instead of one
        ``nn.Module.__getattr__`` per buffer (about 0.5 us each, a tenth of a small SpMV's
        Python overhead).  Read-only by contract: assign buffers through the module.
        """
        return self._buffers

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.nnz / total if total else 0.0

    @property
    def index_dtype(self) -> torch.dtype:
        return self.col_idx.dtype

    @property
    def device(self) -> torch.device:
        return self.col_idx.device

    def rows(self) -> torch.Tensor:
        """Row index of every stored entry, ``[nnz]`` int64 (COO rows, CSR order).

        Found by binary search in the row pointers, so the output size is ``nnz``
        without reading data (torch.compile traces it without a graph break).
        """
        entries = torch.arange(self.nnz, device=self.device, dtype=self.row_ptr.dtype)
        return torch.searchsorted(self.row_ptr, entries, right=True).to(torch.int64) - 1

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """The ``[out_features, in_features]`` matrix with ``values`` at the support.

        Parameters
        ----------
        values : Tensor[nnz]
            The entries in CSR order, any dtype, on the support's device.

        Returns
        -------
        Tensor[out_features, in_features]
            Dense, zero off the support, in the dtype and on the device of ``values``;
            differentiable in ``values``.

        Raises
        ------
        TypeError
            ``values`` is not a tensor.
        ValueError
            ``values`` is not of shape ``(nnz,)``.
        """
        _check_values(self, values, "FixedSupport.to_dense")
        self._require_pattern("FixedSupport.to_dense")
        dense = values.new_zeros(self.shape)
        dense.index_put_((self.rows(), self.col_idx.to(torch.int64)), values)
        return dense

    def values_from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of a dense matrix at the support (the inverse of :meth:`to_dense`).

        Parameters
        ----------
        dense : Tensor[out_features, in_features]
            Any dtype, on any device (the indices are moved to it).

        Returns
        -------
        Tensor[nnz]
            The entries at the support in CSR order, in the dtype and on the device of
            ``dense``; differentiable in ``dense``.

        Raises
        ------
        ValueError
            ``dense`` is not of shape ``(out_features, in_features)``.
        """
        if tuple(dense.shape) != self.shape:
            raise ValueError(
                f"FixedSupport.values_from_dense: dense has shape {tuple(dense.shape)}; expected {self.shape}"
            )
        self._require_pattern("FixedSupport.values_from_dense")
        return dense[self.rows().to(dense.device), self.col_idx.to(device=dense.device, dtype=torch.int64)]

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn, recurse=True):
        # Every move (.to, to_empty) goes through here: buffers that reach the meta device
        # lose their pattern, and to_empty() from there leaves uninitialized memory.
        super()._apply(fn, recurse)
        if self.col_idx.is_meta:
            self._unset = True
        return self

    def extra_repr(self) -> str:
        return (
            f"shape=({self.out_features}, {self.in_features}), nnz={self.nnz}, density={self.density:.4g}, "
            f"index_dtype={self.index_dtype}"
        )

    def get_extra_state(self):
        return {"shape": self.shape}

    def set_extra_state(self, state) -> None:
        self.out_features, self.in_features = _check_shape(state["shape"], "FixedSupport.load_state_dict")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A saved support may have another nnz or index dtype than this one: replace the
        # buffers instead of copying into them (nn.Module's default would refuse).  The
        # kernels index with them unchecked, so the loaded pattern is validated as the
        # builders validate theirs; a bad one is reported and the previous one kept.  With
        # assign=True the saved tensors' device is kept, as nn.Module's assign does for
        # parameters (without it they move to this support's device, meta included).
        previous = (self.shape, {name: self._buffers[name] for name in _BUFFERS}, self._unset)
        assign = local_metadata.get("assign_to_params_buffers", False)
        errors_before = len(error_msgs)
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict:
                saved = state_dict[key]
                if not isinstance(saved, torch.Tensor) or saved.dim() != 1 or saved.dtype not in (torch.int32, torch.int64):
                    error_msgs.append(f"{key}: expected a 1-D int32/int64 tensor; got {saved!r:.80}")
                    continue
                self._buffers[name] = saved.clone() if assign else saved.to(self.device).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if len(error_msgs) == errors_before and not self.col_idx.is_meta:  # a meta pattern has no entries to check
            try:
                self._check_pattern(prefix)
                self._unset = False
            except ValueError as error:
                error_msgs.append(str(error))
        if len(error_msgs) > errors_before:
            (self.out_features, self.in_features), buffers, self._unset = previous
            self._buffers.update(buffers)

    def _check_pattern(self, prefix: str) -> None:
        """Raises ValueError unless the buffers are the pattern that from_csr builds from row_ptr and col_idx."""
        where = "FixedSupport.load_state_dict"
        rows = _csr_rows(self.row_ptr.to(torch.int64), self.col_idx.to(torch.int64), self.out_features,
                         self.in_features, where, prefix)
        expected = _pattern_buffers(rows, self.col_idx, self.shape, self.index_dtype)
        for name in _BUFFERS:
            buffer = self._buffers[name]
            want = expected[name]
            if buffer.dtype != want.dtype or not torch.equal(buffer, want):
                raise ValueError(
                    f"{where}: {prefix}{name} ({buffer.dtype}, {buffer.numel()} entries) does not match the "
                    f"{want.dtype} tensor of {want.numel()} entries that {prefix}row_ptr and {prefix}col_idx determine"
                )


def _sample_distinct(total: int, count: int, generator, device) -> torch.Tensor:
    """``count`` distinct integers in ``[0, total)``, uniformly (count <= total / 4).

    Draws with replacement until ``count`` distinct values are seen, then keeps a
    uniform random subset of them: by symmetry every ``count``-subset is equally likely.
    Memory is O(count), not O(total) as with randperm.
    """
    seen = torch.empty(0, dtype=torch.int64, device=device)
    while seen.numel() < count:
        draw = count - seen.numel()
        draw += draw // 4 + 16
        fresh = torch.randint(total, (draw,), generator=generator, device=device, dtype=torch.int64)
        seen = torch.unique(torch.cat([seen, fresh]))
    keep = torch.randperm(seen.numel(), generator=generator, device=device)[:count]
    return seen[keep]


def _csr_rows(row_ptr: torch.Tensor, col_idx: torch.Tensor, out_features: int, in_features: int, where: str,
              prefix: str = "") -> torch.Tensor:
    """The row of every entry of validated int64 CSR arrays (names in errors start with ``prefix``).

    Raises ValueError for row pointers not starting at 0, decreasing, or not ending at
    ``len(col_idx)``, and for columns out of range, unsorted or duplicated within a row.
    """
    if row_ptr.numel() != out_features + 1:
        raise ValueError(
            f"{where}: {prefix}row_ptr has length {row_ptr.numel()}; expected out_features + 1 = {out_features + 1}"
        )
    check_row_ptr(where, row_ptr, col_idx.numel(), prefix + "row_ptr")
    check_index_range(where, col_idx, in_features, prefix + "col_idx")
    rows = torch.repeat_interleave(torch.arange(out_features, device=row_ptr.device), row_ptr[1:] - row_ptr[:-1])
    same_row = rows[1:] == rows[:-1]
    bad = same_row & (col_idx[1:] <= col_idx[:-1])
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0]) + 1
        raise ValueError(
            f"{where}: {prefix}col_idx must be strictly increasing within each row (sorted, no duplicates); "
            f"row {int(rows[k])} has col_idx[{k - 1}] = {int(col_idx[k - 1])} then col_idx[{k}] = {int(col_idx[k])}"
        )
    return rows


def _resolve_index_dtype(nnz: int, out_features: int, in_features: int,
                         index_dtype: Optional[torch.dtype]) -> torch.dtype:
    """``index_dtype``, or the smallest that fits when None; ValueError for one that is neither int64 nor a fitting int32."""
    smallest = _index_dtype(nnz, out_features, in_features)
    if index_dtype is None:
        return smallest
    if index_dtype not in (torch.int32, torch.int64) or (index_dtype == torch.int32 and smallest == torch.int64):
        raise ValueError(
            f"FixedSupport: index_dtype must be int64, or int32 when every index fits; got {index_dtype} "
            f"(nnz={nnz}, shape=({out_features}, {in_features}))"
        )
    return index_dtype


def _pattern_buffers(rows: torch.Tensor, cols: torch.Tensor, shape: Tuple[int, int],
                     index_dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """Every buffer of the pattern (name -> contiguous tensor) from coordinates sorted by (row, col)."""
    out_features, in_features = shape
    if not rows.is_meta:  # per-row and per-column arrays (pointers, counts, orders: ~5 int64 each, while built)
        require_fits_in_memory("FixedSupport", "out_features + in_features", out_features + in_features, 40,
                               "rows and columns",
                               " (the pattern keeps pointer and order arrays per row and per column, whatever nnz)")
    index_dtype = _resolve_index_dtype(rows.numel(), out_features, in_features, index_dtype)
    rows = rows.to(torch.int64)
    cols = cols.to(torch.int64)
    row_counts = torch.bincount(rows, minlength=out_features)
    col_counts = torch.bincount(cols, minlength=in_features)
    csc_to_csr = torch.sort(cols * max(out_features, 1) + rows, stable=True).indices
    zero = torch.zeros(1, dtype=torch.int64, device=rows.device)
    buffers = {
        "row_ptr": torch.cat([zero, row_counts.cumsum(0)]),
        "col_idx": cols,
        "col_ptr": torch.cat([zero, col_counts.cumsum(0)]),
        "row_idx": rows[csc_to_csr],
        "csc_to_csr": csc_to_csr,
        "row_order": torch.sort(row_counts, descending=True, stable=True).indices,
        "col_order": torch.sort(col_counts, descending=True, stable=True).indices,
    }
    return {name: tensor.to(index_dtype).contiguous() for name, tensor in buffers.items()}


def _as_index_vector(tensor, name: str, where: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        # An empty sequence has no element to infer an integer dtype from (float32 by default).
        tensor = torch.as_tensor(tensor) if len(tensor) else torch.zeros(0, dtype=torch.int64)
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{where}: {name} must be a 1-D integer tensor; got shape {tuple(tensor.shape)}, dtype {tensor.dtype}")
    return tensor.to(torch.int64)


def _check_values(support: FixedSupport, values: torch.Tensor, where: str) -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{where}: values must be a tensor; got {type(values).__name__}")
    if values.dim() != 1 or values.numel() != support.nnz:
        raise ValueError(f"{where}: values has shape {tuple(values.shape)}; expected (nnz,) = ({support.nnz},)")
