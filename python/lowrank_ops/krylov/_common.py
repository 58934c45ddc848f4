"""Argument checking and preconditioning shared by the Krylov solvers.

Preconditioning is from the right: the solvers iterate on ``A M^{-1} y = b`` and return
``x = M^{-1} y``, so the residual they minimize is the true residual ``b - A x`` and a
recycled subspace stays meaningful when ``M`` changes between systems (the recycling
solver recomputes ``C = A M^{-1} U`` for each new operator).  A diagonal (Jacobi)
``M^{-1}`` on a CSR matrix is folded into the matrix once (``A diag(d)``, O(nnz)), so
the preconditioned product costs one plain SpMV.
"""
from __future__ import annotations

import functools
import math
import sys
import types
import weakref
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch

from .._args import require_int as check_positive_int
from .._finite import all_finite
from ..ops._library import refuse_transforms
from .operators import LinearOperator, as_operator

__all__ = ["System", "setup_system", "check_positive_int", "conclude", "Progress", "fits"]

Preconditioner = Union[None, str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
Callback = Optional[Callable[[float], object]]


class System:
    """One validated system ``A x = b`` with its (right-)preconditioned operator.

    Attributes
    ----------
    A : LinearOperator
        The unpreconditioned operator (for true residuals).
    apply : callable
        ``y -> A M^{-1} y`` (counts products in ``matvecs``).
    precondition : callable or None
        ``y -> M^{-1} y`` (None: identity).
    inverse_diagonal : Tensor[n] or None
        ``M^{-1}`` when it is diagonal (``M='jacobi'`` or a tensor), else None.
    csr : CSRMatrix or None
        ``A M^{-1}`` as a CSR matrix when it is one (no or diagonal ``M`` on a matrix):
        the Arnoldi cycle then runs as one C++ call on the CPU.
    b, x0 : Tensor[n]
        The right-hand side and initial guess divided by ``scale``: the solvers solve
        ``A (x / scale) = b / scale`` and return :meth:`solution` of their iterate.
    scale : float
        A power of two within a factor 2 of ``max |b|`` (1 for ``b = 0``): dividing by it
        is exact, and ``||b||`` and the kernels' squared norms then neither overflow nor
        underflow (``|b| ~ 1e160`` in float64 or ``1e20`` in float32 would make them inf).
    bnorm : float
        ``||b / scale||``.
    target : float
        The stopping threshold on ``||b / scale - A (x / scale)||``:
        ``max(tol ||b||, atol) / scale`` (``inf`` when ``atol / scale`` overflows).
    callback : callable or None
        The user's per-iteration callback (see :class:`Progress`).
    matvecs : int
        Products with ``A`` so far.
    key : tuple
        Identifies the preconditioned operator (what the user passed and ``M``, by
        identity and in-place version); equal to another system's key only while both
        refer to the same live objects.
    """

    def __init__(self, A: LinearOperator, b: torch.Tensor, x0: torch.Tensor, M: Preconditioner, op: str,
                 tol: float, atol: float, callback: Callback = None):
        self.scale = _scale(b)
        self.A, self.b, self.x0 = A, b.div_(self.scale), x0.div_(self.scale)  # b, x0: the solver's own copies
        self.bnorm = float(torch.linalg.vector_norm(self.b))
        # The solvers iterate on the scaled system, whose residual is the user's divided by scale.
        # scale is a power of two: the division is exact unless it overflows (then no residual
        # can miss the target) or underflows (an atol below the float64 range is 0).
        absolute = atol / self.scale if atol <= self.scale * sys.float_info.max else math.inf
        self.target = max(float(tol) * self.bnorm, absolute)
        self.callback = callback
        self.matvecs = 0
        self.precondition: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.csr = None
        scale = self.inverse_diagonal = _diagonal_preconditioner(op, A, M)
        if scale is not None and A.matrix is not None:
            self.csr = A.matrix.scale_columns(scale)  # A diag(d): one SpMV per preconditioned product
            self._apply_raw = self.csr.matvec_unchecked
            self.precondition = lambda y: y * scale
        elif scale is not None:
            self._apply_raw = lambda y: A.apply(y * scale)
            self.precondition = lambda y: y * scale
        elif callable(M):
            function, n = M, A.n

            def precondition(y: torch.Tensor) -> torch.Tensor:
                z = torch.as_tensor(function(y), dtype=b.dtype, device=b.device).reshape(-1)
                if z.numel() != n:  # (torch's size-mismatch error, deep in the solver, named nothing)
                    raise ValueError(f"{op}: M(y) returned {z.numel()} entries; expected n = {n}")
                return z

            self.precondition = precondition
            self._apply_raw = lambda y: A.apply(self.precondition(y).contiguous())  # M may return strided views
        else:
            self._apply_raw = A.apply
            self.csr = A.matrix
        self._M = M

    @functools.cached_property
    def key(self) -> tuple:
        """Computed when a recycling solver first asks (a copy of a NumPy or scipy matrix's
        entries: not for plain ``cg`` / ``gmres`` calls, which never compare keys)."""
        return (_identity(self.A.source), _version(self.A.source, self.A.matrix), _preconditioner_key(self._M))

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        self.matvecs += 1
        return self._apply_raw(y)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``b - A x`` with the unpreconditioned operator (one product)."""
        self.matvecs += 1
        return self.b - self.A.apply(x)

    def unprecondition(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.precondition is None else self.precondition(y)

    def solution(self, x: torch.Tensor) -> torch.Tensor:
        """The solution of the user's system from the solver's iterate ``x`` (scaled back in place)."""
        return x.mul_(self.scale)


def _scale(b: torch.Tensor) -> float:
    """``2^e`` with ``2^e <= max |b| < 2^(e + 1)`` (1 for ``b = 0``); ``e`` is kept at or above the
    smallest normal number's exponent, so that ``1 / 2^e`` is finite too (torch may divide by
    a scalar as a multiplication by its reciprocal)."""
    largest = float(b.abs().max()) if b.numel() else 0.0
    if largest == 0.0:
        return 1.0
    exponent = max(math.frexp(largest)[1], math.frexp(torch.finfo(b.dtype).tiny)[1]) - 1
    return math.ldexp(1.0, exponent)


def fits(system: System, space: Optional[torch.Tensor]) -> bool:
    """Whether a kept subspace ``[k, n]`` (recycled or deflation) belongs to systems like
    ``system``: the same size, dtype and device (None: there is none)."""
    return space is not None and (space.shape[1] == system.A.n and space.dtype == system.b.dtype
                                  and space.device == system.b.device)


def conclude(status: str, rnorm: float, target: float) -> Tuple[bool, str]:
    """``(converged, status)`` of a finished solve from its final true residual norm: the two always agree.

    Converged is the loops' own test, ``rnorm <= target`` (:attr:`System.target`,
    ``max(tol ||b||, atol)`` scaled), for a finite ``rnorm``.  Otherwise a non-finite
    ``rnorm`` (A or M returned NaN or inf), or a loop that stopped as converged on the same
    test (an operator that is not a fixed linear map), is a ``"breakdown"``.
    """
    if rnorm <= target and math.isfinite(rnorm):  # an inf target (a huge atol) does not pass an inf residual
        return True, "converged"
    if status == "converged" or not math.isfinite(rnorm):
        return False, "breakdown"
    return False, status


class Stagnation:
    """CG's stop at its attainable accuracy, and the best iterate it confirmed.

    CG's recursive residual keeps falling after rounding has stopped the true one (float32
    on an ill-conditioned system: ``pde.darcy`` at grid 48 levels off at 2.2e-5, above the
    default tol 1e-5).  The loops then confirm on the true residual, fail, restart from it,
    and the recursive residual meets the target again within a few steps: before this test
    that went on until maxiter (10 n steps, 90x what float64 needs there), and returned the
    last iterate.  A failed confirmation is a strike unless its true residual is at most
    half the reference (the true residual at the last such halving); :data:`PATIENCE`
    strikes in a row end the solve as ``"stagnation"``.  (In float64, where a confirmation
    fails because the two residuals drifted apart, a restart usually gains digits.)  The
    solvers return the iterate with the smallest confirmed true residual, the initial
    guess included (the constructor's ``x0``): a solve that ends worse than it started, on
    a breakdown or at maxiter, returns its start.
    """

    #: Failed confirmations without halving the true residual that end a solve: restarts at
    #: the attainable accuracy take 2-3 steps each (darcy 48, float32), so ten cost ~30
    #: steps; a genuine restart in float64 halves the residual.
    PATIENCE = 10

    def __init__(self, x0: torch.Tensor, rnorm0: float):
        """``x0``: the start, whose true residual norm is ``rnorm0`` (kept as a candidate)."""
        self.reference, self.strikes = math.inf, 0
        self.best, self.best_x = math.inf, None
        self.consider(x0, rnorm0)

    def consider(self, x: torch.Tensor, rnorm: float) -> None:
        """Keep a copy of ``x`` (true residual norm ``rnorm``) if it is the best so far."""
        if rnorm < self.best:
            self.best = rnorm
            if self.best_x is None:
                self.best_x = x.clone()
            else:
                self.best_x.copy_(x)

    def failed_confirmation(self, x: torch.Tensor, rnorm: float) -> bool:
        """Record a failed confirmation at ``x`` (true residual norm ``rnorm``); True when the solve stagnated."""
        self.consider(x, rnorm)
        if rnorm <= 0.5 * self.reference:
            self.reference, self.strikes = rnorm, 0
        else:
            self.strikes += 1
        return self.strikes >= self.PATIENCE

    def best_solution(self, x: torch.Tensor, rnorm: float) -> Tuple[torch.Tensor, float]:
        """``(x, rnorm)`` of the final iterate, or of the best confirmed one when its true residual
        is smaller.  A finite ``x`` whose residual is not finite is kept: the operator (not the
        iterate) broke, and the others' residuals were measured before it did."""
        if self.best_x is None:
            return x, rnorm
        if self.best < rnorm if math.isfinite(rnorm) else not all_finite(x):
            return self.best_x, self.best
        return x, rnorm


class Progress:
    """Feeds a solve's residual history to the user's ``callback``, one float per iteration.

    ``callback(residuals[i])`` is called for ``i = 1, ..., iterations``, in order and once
    each, with the value :attr:`SolveInfo.residuals` finally holds: the solvers revise the
    last entry (the true residual recomputed at a restart or on convergence, the residual
    after a projection onto a recycled space), so an entry is handed over only once the
    solve has moved past it (:meth:`report` is called where every entry so far is final).
    The callback gets a Python float and nothing the solve uses; its return value is
    ignored and its exceptions propagate (a recycling solver then keeps its space from
    before the solve).
    """

    __slots__ = ("callback", "history", "done")

    def __init__(self, callback: Callback, history: List[float]):
        self.callback, self.history, self.done = callback, history, 1

    def report(self) -> None:
        """Call the callback on every history entry not yet reported (all of them final)."""
        if self.callback is None:
            return
        while self.done < len(self.history):
            value = float(self.history[self.done])
            self.done += 1
            self.callback(value)


def _version(source, matrix=None):
    """What changes with a matrix's entries.  A torch-backed one: its values tensor
    (identity: a ``CSRMatrix`` whose ``values`` was reassigned kept the old key, and GCRODR
    its stale recycled space) and that tensor's in-place modification counter.  A NumPy
    array or a scipy matrix (``matrix``: their conversion, made at every solve): the
    converted entries themselves, compared at the next solve (an array changed in place
    kept GCRODR's recycled space of the old matrix: a true residual of 5.3 reported as
    stagnation).  None for a callable.

    A callable changed in place is not detected: pass a new object (or call
    ``GCRODR.reset``) after changing one.
    """
    values = getattr(source, "values", None)
    if isinstance(values, torch.Tensor):
        return (_Identity(values), values._version)
    version = getattr(source, "_version", None)
    if version is None and matrix is not None and not isinstance(source, torch.Tensor):
        return _Entries(matrix)
    return version


class _Entries:
    """Stands for a converted matrix's entries in a key: equal to another ``_Entries`` of
    the same shape, pattern and values (one comparison pass, O(nnz), per solve).  A copy:
    the conversion of a scipy matrix shares its arrays, which an in-place change moves too."""

    __slots__ = ("_shape", "_arrays")

    def __init__(self, matrix):
        self._shape = matrix.shape
        self._arrays = (matrix.row_ptr.clone(), matrix.col_idx.clone(), matrix.values.clone())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Entries):
            return NotImplemented
        return self._shape == other._shape and all(
            a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
            for a, b in zip(self._arrays, other._arrays))

    __hash__ = None


class _Identity:
    """Stands for one object in a key: equal to another ``_Identity`` only while both refer
    to the very same live object.

    Not ``id(obj)``: once an object is garbage-collected its id may be handed to a new
    one, which would then pass for the old (GCRODR would keep ``C = A U`` of a matrix that
    no longer exists).  A weak reference dies with its object; an object that does not
    support weak references is held strongly instead (kept alive as long as the key).
    """

    __slots__ = ("_ref",)

    def __init__(self, obj: object):
        try:
            self._ref = weakref.ref(obj)
        except TypeError:
            self._ref = lambda: obj

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Identity):
            return NotImplemented
        target = self._ref()
        return target is not None and target is other._ref()

    __hash__ = None  # equality changes when the object dies: not usable as a dict key


def _identity(obj: object):
    """What identifies ``obj`` in a key: a bound method is a new object at every attribute
    access, so it is identified by its instance and function."""
    if isinstance(obj, types.MethodType):
        return (_Identity(obj.__self__), _Identity(obj.__func__))
    return _Identity(obj)


def _preconditioner_key(M: Preconditioner):
    if M is None or isinstance(M, str):
        return M
    return (_identity(M), getattr(M, "_version", None))


def _diagonal_preconditioner(op: str, A: LinearOperator, M: Preconditioner) -> Optional[torch.Tensor]:
    """``M^{-1}``'s diagonal for ``M='jacobi'`` or a tensor ``M``; None otherwise."""
    if M is None or callable(M) and not isinstance(M, torch.Tensor):
        return None
    if isinstance(M, str):
        if M != "jacobi":
            raise ValueError(f"{op}: M must be None, 'jacobi', a Tensor[n] (M^-1's diagonal) or a callable; got {M!r}")
        diagonal = A.diagonal(op)
        if bool((diagonal == 0).any()):
            raise ValueError(f"{op}: M='jacobi' needs a non-zero diagonal; A has {int((diagonal == 0).sum())} zero diagonal entries")
        return 1.0 / diagonal
    if isinstance(M, torch.Tensor):
        if M.shape != (A.n,):
            raise ValueError(f"{op}: M has shape {tuple(M.shape)}; expected (n,) = ({A.n},) (the diagonal of M^-1)")
        scale = M.to(device=A.device, dtype=A.dtype)
        if not all_finite(scale):
            raise ValueError(f"{op}: M holds non-finite entries")
        return scale
    raise TypeError(f"{op}: M must be None, 'jacobi', a Tensor[n] or a callable; got {type(M).__name__}")


def _vector(op: str, name: str, value, dtype: torch.dtype, device: torch.device, n: int) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, RuntimeError, ValueError):  # (None: torch's "Could not infer dtype of NoneType")
        raise TypeError(f"{op}: {name} must be a vector (a tensor, array or sequence of numbers) of length n = {n}; "
                        f"got {type(value).__name__}") from None
    if tensor.is_complex():
        raise TypeError(f"{op}: {name} is complex; expected a real vector")
    if tensor.dim() == 2 and tensor.shape[1] == 1:  # a column vector [n, 1]
        tensor = tensor[:, 0]
    tensor = tensor.to(device=device, dtype=dtype)
    if tensor.dim() != 1 or tensor.numel() != n:
        raise ValueError(f"{op}: {name} has shape {tuple(torch.as_tensor(value).shape)}; expected (n,) = ({n},) to match A")
    if not all_finite(tensor):
        raise ValueError(f"{op}: {name} holds {int((~torch.isfinite(tensor)).sum())} non-finite (NaN or inf) entries")
    return tensor.detach().contiguous().clone()  # the solvers are not differentiable: no graph on x


def _dtype_and_device(A, b):
    """float64 on CPU unless a torch ``b`` (or ``A``) says otherwise."""
    reference = b if isinstance(b, torch.Tensor) and b.is_floating_point() else None
    if reference is None and isinstance(A, torch.Tensor):
        reference = A
    matrix_values = getattr(A, "values", None)
    if reference is None and isinstance(matrix_values, torch.Tensor):
        reference = matrix_values
    if reference is None:
        return torch.float64, torch.device("cpu")
    dtype = reference.dtype if reference.dtype in (torch.float32, torch.float64) else torch.float64
    return dtype, reference.device


#: The relative tolerance of ``tol=None``, per dtype: float64 1e-8; float32 1e-5 (scipy's
#: default rtol), because float32 recurrences level off near a relative residual of 1e-6
#: even on well-conditioned systems (measured: a 400 x 400 SPD system, condition ~40, true
#: residual 1.5e-6 after 4000 CG iterations): under a fixed 1e-8, float32 CG ran to
#: maxiter and GMRES stopped on stagnation, both reporting converged = False.  Worse
#: conditioned systems level off higher: pde.darcy at grids 32-64 at 1e-5 to 3e-5 in float32,
#: where every solver reports "stagnation" within a few hundred steps (keep them in float64).
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}


def steps_per_call(n: int) -> int:
    """The most CG steps one kernel call runs: the kernels allocate a history entry per
    step asked for, so ``maxiter=2**40`` asked for terabytes (an allocation error naming
    no argument); at least the default ``maxiter`` (10 n), so a default solve stays one call."""
    return max(10 * n, 1 << 16)


def setup_system(op: str, A, b, x0, tol: Optional[float], M: Preconditioner, atol: float = 0.0,
                 callback: Callback = None) -> System:
    """Validate a solver's arguments and build its :class:`System` (``tol=None``: the
    system dtype's :data:`DEFAULT_TOL`).

    Raises
    ------
    ValueError
        Non-square ``A``, ``b`` or ``x0`` of the wrong length, non-finite ``b``/``x0``,
        ``tol`` not a positive finite number, ``atol`` not a finite number >= 0, a bad
        preconditioner.
    TypeError
        ``callback`` neither None nor callable.
    """
    refuse_transforms(op, "the Krylov solvers are not differentiable and each system stops on its own residual "
                          "test; solve the systems one by one outside the transform")
    # Compared as floats: a Python int beyond float range (10**400) is not finite either.
    if tol is not None and (not _real_number(tol) or not (0 < _as_float(tol) < math.inf)):
        raise ValueError(f"{op}: tol must be None or a positive finite number; got {tol!r}")
    if not _real_number(atol) or not (0 <= _as_float(atol) < math.inf):
        raise ValueError(f"{op}: atol must be a finite number >= 0; got {atol!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"{op}: callback must be None or a callable taking the relative residual norm; "
                        f"got {type(callback).__name__}")
    dtype, device = _dtype_and_device(A, b)
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    operator = as_operator(op, A, dtype, device)
    b = _vector(op, "b", b, dtype, device, operator.n)
    x0 = torch.zeros_like(b) if x0 is None else _vector(op, "x0", x0, dtype, device, operator.n)
    return System(operator, b, x0, M, op, float(tol), float(atol), callback)


def _as_float(value) -> float:
    """``float(value)``, or inf for a number beyond float range."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _real_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
