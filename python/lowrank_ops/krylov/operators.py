"""Linear operators for the Krylov solvers: a validated CSR matrix with a low-overhead SpMV.

:class:`CSRMatrix` holds ``row_ptr``, ``col_idx`` and ``values`` as torch tensors and
multiplies single vectors with the Krylov SpMV op (``torch.ops.lowrank_ops.krylov_spmv_``,
:mod:`lowrank_ops.ops.krylov`).  The public :func:`lowrank_ops.ops.spmv` validates its
arguments and goes through the torch.library dispatcher on every call (about 25 us),
and its kernel is tiled for batches of vectors (62 us for one vector of a 4096-row
Darcy matrix, against 13 us for scipy); inside a solver the same matrix is applied
thousands of times, so the matrix is validated once, at construction, and the solvers
call the one-vector kernel without the dispatcher or per-call checks
(:meth:`CSRMatrix.matvec_unchecked`: their vectors are valid by construction; under
torch.compile it is the op).  :meth:`CSRMatrix.matvec`, for users, checks
the vectors it is given (a few attribute reads, no pass over the data).

:func:`as_operator` turns what a user passes (a :class:`CSRMatrix`, a torch sparse CSR
or COO tensor, a scipy.sparse matrix, a dense tensor or array, or a callable with a
shape) into a :class:`LinearOperator`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from .._args import is_integer, require_tensors
from .._csr import check_col_idx, check_row_ptr, check_sparse_invariants, quiet_sparse_csr_beta, require_integer
from .._finite import all_finite
from ..ops._layout import may_overlap
from ._kernels import spmv

__all__ = ["CSRMatrix", "LinearOperator", "as_operator"]

_INT32_MAX = 2**31 - 1


def _check_vector(where: str, name: str, x, n: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raises unless ``x`` is a tensor of shape ``(n,)``, ``dtype`` and ``device`` (TypeError for the kind or dtype)."""
    require_tensors(where, **{name: x})
    if x.shape != (n,):
        raise ValueError(f"{where}: {name} has shape {tuple(x.shape)}; expected ({n},)")
    if x.dtype != dtype:
        raise TypeError(f"{where}: {name} has dtype {x.dtype}; expected {dtype}")
    if x.device != device:
        raise ValueError(f"{where}: {name} is on {x.device}; expected {device}")


class CSRMatrix:
    """A square or rectangular sparse matrix in CSR form, validated once.

    Parameters
    ----------
    row_ptr : Tensor[n_rows + 1], int32 or int64
        Row pointers, starting at 0, non-decreasing, ending at ``nnz``.
    col_idx : Tensor[nnz], same dtype as ``row_ptr``
        Column of each stored entry, in ``[0, n_cols)`` (any order within a row).
    values : Tensor[nnz], float32 or float64
        Stored entries (finite).
    shape : (int, int)
        ``(n_rows, n_cols)``.

    Raises
    ------
    ValueError
        Malformed pointers or indices, mismatched lengths, non-finite values.

    Notes
    -----
    ``row_ptr``, ``col_idx`` and ``shape`` are read-only attributes, and ``values`` is
    checked when reassigned (length, dtype, device, finiteness): the kernels trust the
    pattern checked here (a reassigned shorter ``values`` or larger ``shape`` was read out
    of bounds: SIGSEGV).  The index arrays are copies of the caller's (editing the
    caller's afterwards changed a validated pattern); ``values`` is the caller's tensor
    when contiguous, so entries may be updated in place (the solvers see such updates
    through the tensor's version counter, and a reassignment through its identity).
    """

    def __init__(self, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, shape: Tuple[int, int]):
        where = "CSRMatrix"
        # (A float 2.0 was truncated silently; torch.Size, NumPy integers and arrays pass.)
        if isinstance(shape, np.ndarray):
            shape = tuple(shape.tolist())
        if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2 and all(is_integer(s) for s in shape)):
            raise TypeError(f"{where}: shape must be a pair of ints (n_rows, n_cols); got {shape!r}")
        n_rows, n_cols = (int(s) for s in shape)
        if n_rows < 0 or n_cols < 0:
            raise ValueError(f"{where}: shape must be non-negative; got {tuple(shape)}")
        require_tensors(where, row_ptr=row_ptr, col_idx=col_idx, values=values)
        for name, tensor in (("row_ptr", row_ptr), ("col_idx", col_idx), ("values", values)):
            if tensor.dim() != 1:
                raise ValueError(f"{where}: {name} must be a 1-D tensor; got {tuple(tensor.shape)}")
        if values.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{where}: values has dtype {values.dtype}; expected float32 or float64")
        require_integer(where, row_ptr=row_ptr, col_idx=col_idx)
        nnz = col_idx.numel()
        if row_ptr.numel() != n_rows + 1:
            raise ValueError(f"{where}: row_ptr has length {row_ptr.numel()}; expected n_rows + 1 = {n_rows + 1}")
        if values.numel() != nnz:
            raise ValueError(f"{where}: values has length {values.numel()}; expected nnz = len(col_idx) = {nnz}")
        # Checked before the conversion to the index dtype, which would wrap out-of-range int64 indices.
        check_row_ptr(where, row_ptr, nnz)
        check_col_idx(where, col_idx, n_cols)
        index_dtype = torch.int32 if max(nnz, n_rows, n_cols) <= _INT32_MAX else torch.int64
        row_ptr = row_ptr.to(device=values.device, dtype=index_dtype, copy=True).contiguous()
        col_idx = col_idx.to(device=values.device, dtype=index_dtype, copy=True).contiguous()
        if not all_finite(values):
            raise ValueError(f"{where}: values holds {int((~torch.isfinite(values)).sum())} non-finite entries")
        self._row_ptr, self._col_idx, self._values = row_ptr, col_idx, values.contiguous()
        self._shape = (n_rows, n_cols)

    def __setstate__(self, state: dict) -> None:
        # Pickles from before the attributes were read-only hold them under their public names.
        for name in ("row_ptr", "col_idx", "values", "shape"):
            if name in state:
                state["_" + name] = state.pop(name)
        self.__dict__.update(state)

    # ------------------------------------------------------------------ properties
    @property
    def row_ptr(self) -> torch.Tensor:
        """``[n_rows + 1]`` row pointers (int32 or int64; read-only attribute)."""
        return self._row_ptr

    @property
    def col_idx(self) -> torch.Tensor:
        """``[nnz]`` column indices (``row_ptr``'s dtype; read-only attribute)."""
        return self._col_idx

    @property
    def values(self) -> torch.Tensor:
        """``[nnz]`` stored entries (float32 or float64), writable in place; a reassigned tensor is checked."""
        return self._values

    @values.setter
    def values(self, values: torch.Tensor) -> None:
        where = "CSRMatrix.values"
        require_tensors(where, values=values)
        if values.shape != (self.nnz,):
            raise ValueError(f"{where}: the new values have shape {tuple(values.shape)}; expected (nnz,) = "
                             f"({self.nnz},)")
        if values.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{where}: the new values have dtype {values.dtype}; expected float32 or float64")
        if values.device != self._row_ptr.device:
            raise ValueError(f"{where}: the new values are on {values.device}; expected {self._row_ptr.device} "
                             "(the pattern's device)")
        if not all_finite(values):
            raise ValueError(f"{where}: the new values hold {int((~torch.isfinite(values)).sum())} non-finite entries")
        self._values = values.contiguous()

    @property
    def shape(self) -> Tuple[int, int]:
        """``(n_rows, n_cols)`` (read-only)."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "CSRMatrix":
        """The non-zero entries of a 2-D dense tensor.

        Parameters
        ----------
        dense : Tensor[n_rows, n_cols]
            float32 or float64, finite, on any device.

        Returns
        -------
        CSRMatrix
            ``dense``'s non-zero entries (exact zeros are not stored), in its dtype and on
            its device; int32 indices when they fit, else int64.

        Raises
        ------
        ValueError
            ``dense`` is not a 2-D tensor, or has non-finite entries.
        TypeError
            A dtype other than float32 or float64.
        """
        require_tensors("CSRMatrix.from_dense", dense=dense)
        if dense.dim() != 2:
            raise ValueError(f"CSRMatrix.from_dense: dense has shape {tuple(dense.shape)}; expected a 2-D tensor")
        with quiet_sparse_csr_beta():
            csr = dense.to_sparse_csr()
        # Plain tensors, not views into the sparse tensor (which torch.compile and opcheck reject).
        return cls(csr.crow_indices().clone(), csr.col_indices().clone(), csr.values().clone(), tuple(dense.shape))

    @classmethod
    def from_scipy(cls, matrix, dtype: torch.dtype = torch.float64) -> "CSRMatrix":
        """From any scipy.sparse matrix or array (converted to CSR; real dtypes only).

        Parameters
        ----------
        matrix : scipy.sparse matrix or array, shape (n_rows, n_cols)
            Any format (converted with ``tocsr()``); real, finite entries.
        dtype : torch.dtype
            Values dtype of the result: float64 (default) or float32.

        Returns
        -------
        CSRMatrix
            The stored entries (explicit zeros included) on the CPU, in ``dtype``; int32
            indices when they fit, else int64.

        Raises
        ------
        TypeError
            Complex entries, or ``dtype`` not float32 or float64.
        ValueError
            Non-finite entries.
        """
        csr = matrix.tocsr()
        if np.iscomplexobj(csr.data):
            raise TypeError("CSRMatrix.from_scipy: complex matrices are not supported; expected a real dtype")
        # Copies: shared with the scipy matrix, a later write to it (NaN, or a new operator)
        # reached a CSRMatrix validated once, unseen by the solvers' change checks.
        return cls(
            torch.from_numpy(np.array(csr.indptr, dtype=np.int64)),
            torch.from_numpy(np.array(csr.indices, dtype=np.int64)),
            torch.from_numpy(np.array(csr.data)).to(dtype),
            csr.shape,
        )

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> "CSRMatrix":
        """From a torch sparse CSR or COO tensor.

        Parameters
        ----------
        tensor : Tensor[n_rows, n_cols], sparse CSR or COO layout
            float32 or float64 values, finite; a COO tensor is coalesced first
            (duplicate entries summed).

        Returns
        -------
        CSRMatrix
            The stored entries in the tensor's dtype and on its device; int32 indices
            when they fit, else int64.

        Raises
        ------
        TypeError
            Another layout, or values not float32 or float64.
        ValueError
            Non-finite values.
        """
        if tensor.layout not in (torch.sparse_coo, torch.sparse_csr):
            raise TypeError(f"CSRMatrix.from_torch: expected a sparse CSR or COO tensor; got layout {tensor.layout}")
        check_sparse_invariants("CSRMatrix.from_torch", "tensor", tensor)  # (torch's conversions trust them)
        if tensor.layout == torch.sparse_coo:
            with quiet_sparse_csr_beta():
                tensor = tensor.coalesce().to_sparse_csr()
        return cls(tensor.crow_indices().clone(), tensor.col_indices().clone(), tensor.values().clone(),
                   tuple(tensor.shape))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CSRMatrix":
        """A copy on ``device`` with values of ``dtype`` (self when nothing changes).

        Parameters
        ----------
        device : torch.device or str, optional
            Target device; default the current one.
        dtype : torch.dtype, optional
            Values dtype, float32 or float64; default the current one.

        Returns
        -------
        CSRMatrix
            ``self`` when neither changes, else a new matrix with the same pattern (index
            arrays copied to ``device``) and converted values.
        """
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if device == self.device and dtype == self.dtype:
            return self
        values = self.values.to(device=device, dtype=dtype)
        return CSRMatrix(self.row_ptr.to(device), self.col_idx.to(device), values, self.shape)

    def to_dense(self) -> torch.Tensor:
        """The matrix as a dense ``[n_rows, n_cols]`` tensor."""
        dense = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return dense.index_put_((self.entry_rows(), self.col_idx.long()), self.values, accumulate=True)

    def to_scipy(self):
        """The matrix as a ``scipy.sparse.csr_matrix`` (a float64 copy on the host: writing to it
        leaves this matrix as it was)."""
        import scipy.sparse

        arrays = tuple(t.cpu().numpy().copy() for t in (self.values.double(), self.col_idx, self.row_ptr))
        return scipy.sparse.csr_matrix(arrays, shape=self.shape)

    # ------------------------------------------------------------------ algebra
    def entry_rows(self) -> torch.Tensor:
        """Row index of every stored entry, ``[nnz]`` int64."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.device), counts)

    def diagonal(self) -> torch.Tensor:
        """The main diagonal, ``[min(n_rows, n_cols)]`` (zeros where not stored)."""
        n = min(self.shape)
        rows = self.entry_rows()
        on_diagonal = rows == self.col_idx.long()
        diagonal = torch.zeros(n, dtype=self.dtype, device=self.device)
        return diagonal.index_add_(0, rows[on_diagonal], self.values[on_diagonal])

    def scale_columns(self, scale: torch.Tensor) -> "CSRMatrix":
        """``A diag(scale)`` with the same pattern (``scale`` is ``[n_cols]``)."""
        require_tensors("CSRMatrix.scale_columns", scale=scale)
        if scale.shape != (self.shape[1],):
            raise ValueError(f"CSRMatrix.scale_columns: scale has shape {tuple(scale.shape)}; expected (n_cols,) = "
                             f"({self.shape[1]},)")
        values = self.values * scale.index_select(0, self.col_idx)
        matrix = CSRMatrix.__new__(CSRMatrix)  # pattern already validated: skip the checks
        matrix.__dict__.update(self.__dict__)
        matrix._values = values
        return matrix

    def matvec(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``A x``, the matrix times one vector (the Krylov SpMV kernel, with the vectors checked).

        Parameters
        ----------
        x : Tensor[n_cols]
            The matrix's dtype (float32 or float64) and device; any strides (a strided
            ``x`` is copied to a contiguous one first).
        out : Tensor[n_rows], optional
            Receives the product: the matrix's dtype and device, contiguous, sharing no
            memory with ``x``.  Default: a new tensor.

        Returns
        -------
        Tensor[n_rows]
            ``A x`` in the matrix's dtype, on its device (``out`` itself when given), each
            entry summed in that dtype.

        Raises
        ------
        TypeError
            ``x`` or ``out`` is not a tensor, or not of the matrix's dtype.
        ValueError
            ``x`` or ``out`` of the wrong shape or on another device, ``out`` not
            contiguous or sharing memory with ``x``.
        """
        where = "CSRMatrix.matvec"
        _check_vector(where, "x", x, self.shape[1], self.dtype, self.device)
        if out is not None:
            _check_vector(where, "out", out, self.shape[0], self.dtype, self.device)
            if not out.is_contiguous():
                raise ValueError(f"{where}: out must be contiguous; got strides {out.stride()}")
            if out.numel() and x.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                raise ValueError(f"{where}: out must not share memory with x")
        return self.matvec_unchecked(x.contiguous(), out)

    def matvec_unchecked(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`matvec` without the checks, for the solvers (their vectors are contiguous ``[n_cols]``
        of the matrix's dtype and device by construction; ``out`` likewise ``[n_rows]``)."""
        if out is None:
            out = torch.empty(self.shape[0], dtype=self.dtype, device=self.device)
        spmv(self.row_ptr, self.col_idx, self.values, x, out)
        return out

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        require_tensors("CSRMatrix @ x", x=x)
        if x.shape != (self.shape[1],):
            raise ValueError(f"CSRMatrix @ x: x has shape {tuple(x.shape)}; expected ({self.shape[1]},)")
        return self.matvec(x.to(device=self.device, dtype=self.dtype).contiguous())

    def __repr__(self) -> str:
        return f"CSRMatrix(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype}, device={self.device})"


class LinearOperator:
    """A square linear map ``x -> A x`` on torch vectors, as the solvers see it.

    Calling it checks ``x`` (``[n]``, the operator's dtype and device; any strides).

    Attributes
    ----------
    n : int
        Size of the system.
    dtype, device
        Of the vectors the operator takes and returns.
    apply : callable
        ``x -> A x`` without the checks, for the solvers (their vectors are contiguous
        ``[n]`` of the operator's dtype and device by construction).
    matrix : CSRMatrix or None
        The CSR matrix behind the operator (None for a user callable).
    source : object
        What the user passed; the recycling solver compares it to decide whether the
        matrix changed between two solves.
    """

    def __init__(self, apply: Callable[[torch.Tensor], torch.Tensor], n: int, dtype: torch.dtype, device: torch.device,
                 matrix: Optional[CSRMatrix], source: object):
        self.apply, self.n, self.dtype, self.device = apply, n, dtype, device
        self.matrix, self.source = matrix, source

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_vector("LinearOperator", "x", x, self.n, self.dtype, self.device)
        return self.apply(x.contiguous())

    def diagonal(self, op: str) -> torch.Tensor:
        """The main diagonal (for Jacobi preconditioning); needs a matrix."""
        if self.matrix is None:
            raise ValueError(f"{op}: M='jacobi' needs the matrix's diagonal; A is a callable (pass M as a tensor instead)")
        return self.matrix.diagonal()


def _callable_operator(op: str, A, dtype: torch.dtype, device: torch.device) -> LinearOperator:
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{op}: a callable A must have a .shape attribute (n, n); got {shape!r}")
    n = int(shape[0])
    if int(shape[1]) != n:
        raise ValueError(f"{op}: A has shape {tuple(shape)}; expected a square matrix (n, n)")
    function = A.matvec if hasattr(A, "matvec") else A

    def apply(x: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(function(x), dtype=dtype, device=device).reshape(-1)
        if y.numel() != n:
            raise ValueError(f"{op}: A(x) returned {y.numel()} entries; expected n = {n}")
        if y.numel() and may_overlap(y, x):  # x itself (an identity): the solvers update products in place
            y = y.clone()
        return y

    return LinearOperator(apply, n, dtype, device, None, A)


def as_operator(op: str, A, dtype: torch.dtype, device: Union[str, torch.device]) -> LinearOperator:
    """Wrap ``A`` as a square :class:`LinearOperator` with vectors of ``dtype`` on ``device``.

    Parameters
    ----------
    op : str
        Name of the calling solver (for error messages).
    A : CSRMatrix, torch sparse CSR/COO tensor, dense 2-D tensor or ndarray, scipy.sparse
        matrix, or a callable with ``.shape == (n, n)`` (called as ``A(x)`` or
        ``A.matvec(x)`` on a torch vector).
    dtype : torch.dtype
        The solver's working dtype, float32 or float64: a matrix is converted to it, a
        callable's output is cast to it.
    device : torch.device or str
        The solver's device: a matrix is moved there, a callable's output is moved there.

    Returns
    -------
    LinearOperator
        ``x -> A x`` on vectors ``[n]`` of ``dtype`` on ``device``.  For a matrix input,
        ``operator.matrix`` is the converted :class:`CSRMatrix` (a dense matrix keeps its
        non-zero entries only); for a callable, ``operator.matrix`` is None.

    Raises
    ------
    ValueError
        ``A`` not square (or a callable without a 2-D ``.shape``), or malformed / non-finite
        matrix entries.
    TypeError
        ``A`` of an unsupported kind, or complex entries.
    """
    device = torch.device(device)
    if isinstance(A, CSRMatrix):
        matrix = A
    elif isinstance(A, torch.Tensor):
        if A.dim() != 2:
            raise ValueError(f"{op}: A has shape {tuple(A.shape)}; expected a square matrix (n, n)")
        if A.is_complex():  # (the cast below kept the real part, and the solve reported success)
            raise TypeError(f"{op}: A has dtype {A.dtype}; expected real entries (complex systems are not supported)")
        matrix = CSRMatrix.from_torch(A) if A.layout != torch.strided else CSRMatrix.from_dense(A.to(dtype))
    elif hasattr(A, "tocsr") and hasattr(A, "nnz"):  # scipy.sparse, without importing scipy
        matrix = CSRMatrix.from_scipy(A, dtype)
    elif isinstance(A, np.ndarray):
        if A.ndim != 2:
            raise ValueError(f"{op}: A has shape {A.shape}; expected a square matrix (n, n)")
        if np.iscomplexobj(A):
            raise TypeError(f"{op}: A has dtype {A.dtype}; expected real entries (complex systems are not supported)")
        matrix = CSRMatrix.from_dense(torch.as_tensor(A, dtype=dtype))
    elif callable(A) or hasattr(A, "matvec"):
        return _callable_operator(op, A, dtype, device)
    else:
        raise TypeError(f"{op}: A must be a CSRMatrix, a sparse or dense matrix, or a callable; got {type(A).__name__}")
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{op}: A has shape {matrix.shape}; expected a square matrix (n, n)")
    matrix = matrix.to(device=device, dtype=dtype)
    return LinearOperator(matrix.matvec_unchecked, matrix.shape[0], dtype, matrix.device, matrix, A)
