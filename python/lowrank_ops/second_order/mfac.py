"""M-FAC inverse of the empirical Fisher over a window of gradients (Frantar et al., NeurIPS 2021).

With the ``n`` gradients currently held as the rows of ``G [n, d]`` and a damping
``lambda > 0``::

    F      = lambda I + G^T G / n
    F^-1 x = (x - G^T K^-1 G x) / lambda,    K = n lambda I_n + G G^T   (Woodbury)

State: the ring buffer ``G`` (``ngrads`` rows, storage dtype), the Gram matrix ``G G^T``
(float64, updated one row and column per new gradient from the fused pass), and the
upper Cholesky factor ``U`` of ``K = U^T U`` in float64.

Cost per optimizer step (:meth:`MFACInverse.update_ihvp`): one fused pass over ``G`` that
writes the new gradient into its slot and returns ``G g`` (the new Gram row, and the
first half of the IHVP), an ``O(m^2)`` update of the factor and solves, and one pass
``(g - G^T c) / lambda``: ``2 m d`` storage elements read, the floor for any method
that touches all of ``G``.  On the CPU without autograd, the solve and the second pass
(and for :meth:`MFACInverse.ihvp` also the first) run in one extension call
(``_C.mfac_apply_cpu``), with no Python work or tensors between the passes.

The factor: once the window is full, replacing gradient ``s`` replaces row and column
``s`` of ``K``, a rank-2 symmetric change; ``U`` is then updated in ``O(m^2)`` (a
triangular solve for the new column, then a rank-1 update and a rank-1 downdate of the
trailing block) instead of the ``O(m^3 / 3)`` refactorization: on the CPU by
``_C.mfac_cholesky_replace_cpu`` (single-threaded), on CUDA by its twin
``_C.mfac_cholesky_replace_cuda`` (the same rotations on one thread block, one barrier
per row; the official M-FAC code refactors every step instead).  ``U`` is refactored
from the Gram matrix when the window size ``n`` or ``lambda`` changes (every diagonal
entry moves), once every ``ngrads`` rank updates (so rounding errors of the updates
cannot accumulate beyond one ring cycle), and when a downdate finds the new ``K`` not
numerically positive definite (counted in :attr:`MFACInverse.downdate_fallbacks`).

Why float64 for the ``m x m`` work and the passes' sums: ``K``'s condition number is up
to ``1 + ||G||^2 / (n lambda)``; holding ``G G^T``, the factor and the solves in float64
costs ``O(m^2)`` memory and ``O(m^3)`` flops, negligible next to the passes.  For x in
the gradients' span, ``x - G^T c`` cancels, and any rounding of the dots ``G x``, of
``c`` or of the sum ``G^T c`` is amplified by about ``||G||^2 / (n lambda)`` (1.3e3 at
M-FAC's default ``lambda = 1e-5`` for gradients ``0.01 randn(4096)``, 1.3e5 at ``1e-7``).
So the passes sum in float64 (fp32 data times fp32 data is exact there), the dots and
``c`` stay float64 between them, and the result is rounded to float32 once: an IHVP of
a float32 (or bf16) buffer is then within about one float32 rounding of the float64
solve with the same stored data, whatever the damping.  Measured (d = 4096, m = 37,
gradients 0.01 randn, 45 updates: after the ring wrapped): relative error of
``update_ihvp(g)`` against the float64 dense solve 2.5e-8 at ``lambda = 1e-5, 1e-6,
1e-7`` (float32 sums: 1.6e-4, 1.6e-3, 1.5e-2), of a random vector 2.5e-8 (4e-8).
Float64 buffers keep 1e-10.
The differentiable path (``x`` requiring grad) goes through the public float32 ops
:func:`~lowrank_ops.ops.mfac.mfac_dots` / ``mfac_combine``, whose float32 dots and
coefficients keep the older accuracy.
"""
from __future__ import annotations

import functools
import math
import numbers
import threading
from typing import Any, Dict, Optional

import torch

from .._args import require_int, require_tensors
from .._finite import all_finite
from ..ops._library import composed_path, in_functorch_transform
from ..ops.mfac import (_mfac_dots_write, cholesky_factor_op, cholesky_replace_op, combine_op, compute_dtype, dots_op,
                        first_noise_pivot, mfac_apply_op)

__all__ = ["MFACInverse"]

_STATE_KEYS = ("dim", "ngrads", "damp", "count", "dtype", "storage_dtype", "grads", "gram")

_STORAGE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Up to this window size the CPU factors K with _C's single-threaded Cholesky (under
# 10 ms): torch's threaded LAPACK call leaves its OpenMP workers spinning on the cores
# the next pass needs (a 32 x 32 factorization cost 6 ms per call that way, on 2 cores).
_SERIAL_CHOLESKY_MAX = 512
# The end of the errors for a Gram matrix that is not finite (G's products overflow).
_OVERFLOW = "the gradients overflow the Gram matrix (rescale them)"


class _NotPositiveDefinite(RuntimeError):
    """``K = n damp I + G G^T`` failed its Cholesky factorization (see ``_cholesky``)."""


def _direct(*tensors: torch.Tensor) -> bool:
    """Whether the passes may skip the dispatcher: CPU tensors and nothing to differentiate.

    The ops' CPU implementations are then called directly, which saves the ~14 us per
    call that torch's dispatcher spends on a Python-implemented op (measured on this
    2-core machine; a step makes two calls, about 3 % of one at m = 32, d = 1e5).
    """
    grad = torch.is_grad_enabled()
    return all(t.device.type == "cpu" and not (grad and t.requires_grad) for t in tensors)


def check_storage_dtype(op: str, dtype: torch.dtype, storage_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The window's storage dtype for compute ``dtype`` (None: ``dtype``); a TypeError
    naming the allowed ones otherwise (MFACInverse, and the MFAC optimizer at construction)."""
    storage_dtype = dtype if storage_dtype is None else storage_dtype
    if storage_dtype not in _STORAGE_DTYPES or compute_dtype(storage_dtype) != dtype:
        allowed = "float64" if dtype == torch.float64 else "float32, bfloat16 or float16"
        raise TypeError(f"{op}: storage_dtype must be {allowed} for dtype={dtype}; got {storage_dtype}")
    return storage_dtype


def _check_damp(damp: float, op: str, dtype: torch.dtype = torch.float64) -> float:
    if isinstance(damp, (bool, str)) or not isinstance(damp, numbers.Real) or not 0 < damp < math.inf:
        raise ValueError(f"{op}: damp must be a finite number > 0; got {damp!r}")
    largest = torch.finfo(dtype).max
    if not 1.0 / float(damp) < largest:  # the products scale by 1 / damp, in the compute dtype
        # (float32 at damp 1e-40: 1 / damp overflowed and obs_scores returned all zeros)
        raise ValueError(f"{op}: damp must be at least {1.0 / largest:.3g} (1 / damp finite in the {dtype} compute "
                         f"dtype); got {damp!r}")
    return float(damp)


def _locked(method):
    """Runs ``method`` holding the object's lock: the kernels release the GIL, so threads
    sharing one window would interleave an update's slot, Gram row, count and factor update
    (lost updates, a Gram matrix off by 3 %, a broken factor)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


class MFACInverse:
    """Inverse of ``lambda I + G^T G / n`` for the last ``n <= ngrads`` gradients.

    Parameters
    ----------
    dim : int
        Length ``d`` of a gradient (>= 1).
    ngrads : int
        Window size ``m`` (>= 1, any value: no multiple-of-32 or 1024 limit).
    damp : float
        ``lambda > 0``.
    dtype : torch.dtype
        Compute dtype of vectors and results: float32 (default) or float64.
    storage_dtype : torch.dtype, optional
        Dtype of the buffer: ``dtype`` (default), or bfloat16 / float16 with float32 compute
        (half the memory and bytes read; every sum in float64, as for float32).
    device : torch.device or str, optional

    Notes
    -----
    While fewer than ``ngrads`` gradients have been added, ``n`` is the number added (the
    official code divides by ``m`` from the start, which acts as extra damping).  A
    gradient stored in bf16/fp16 is the rounded one: ``F`` is built from the stored rows,
    and :meth:`update_ihvp` returns ``F^-1`` of the stored, rounded gradient (exact for
    fp32/fp64).  Threads may share one object: a lock serializes its updates and products.
    """

    def __init__(self, dim: int, ngrads: int, damp: float, *, dtype: torch.dtype = torch.float32,
                 storage_dtype: Optional[torch.dtype] = None, device: Any = None):
        op = "MFACInverse"
        dim, ngrads = require_int(op, "dim", dim), require_int(op, "ngrads", ngrads)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: dtype must be torch.float32 or torch.float64; got {dtype}")
        storage_dtype = check_storage_dtype(op, dtype, storage_dtype)
        self._lock = threading.RLock()  # see _locked
        self.dim, self.ngrads = int(dim), int(ngrads)
        self._damp = _check_damp(damp, op, dtype)
        self.dtype, self.storage_dtype = dtype, storage_dtype
        try:
            self.grads = torch.zeros(self.ngrads, self.dim, dtype=storage_dtype, device=device)
            # The storage's device: "cuda" resolves to "cuda:<current>", what inputs report.
            self.device = self.grads.device
            self.gram = torch.zeros(self.ngrads, self.ngrads, dtype=torch.float64, device=self.device)
        except (RuntimeError, MemoryError) as error:  # the allocator's message names bytes, not the argument
            if not isinstance(error, MemoryError) and "alloc" not in str(error) and "out of memory" not in str(error):
                raise
            size = self.ngrads * (self.dim * storage_dtype.itemsize + self.ngrads * 8)
            raise MemoryError(f"{op}: the window of ngrads={self.ngrads} gradients of dim={self.dim} ({storage_dtype}) "
                              f"and its Gram matrix need {size / 2**30:.3g} GiB, which could not be allocated on "
                              f"{device or 'cpu'}; lower ngrads") from error
        self.count = 0  # gradients added since the last reset
        self._factor: Optional[torch.Tensor] = None  # upper U with U^T U = K (float64, contiguous)
        self._updates_since_factor = 0  # rank updates applied to _factor since it was computed
        self._work: Optional[torch.Tensor] = None  # workspace of the rank update, [2 ngrads] float64
        #: O(m^2) rank updates of the factor applied so far (full window; CPU and CUDA).
        self.rank_updates = 0
        #: Rank updates abandoned because the downdate found ``K`` not numerically positive
        #: definite (the factor is then recomputed from the Gram matrix).
        self.downdate_fallbacks = 0

    def __getstate__(self) -> Dict[str, Any]:  # copy.deepcopy, pickle: a lock is not copied
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def damp(self) -> float:
        """The damping ``lambda``; setting it keeps the window and refactors lazily."""
        return self._damp

    @damp.setter
    @_locked
    def damp(self, value: float) -> None:
        value = _check_damp(value, "MFACInverse.damp", self.dtype)
        if value != self._damp:
            self._damp = value
            self._factor = None

    # ------------------------------------------------------------------ window
    @property
    def n(self) -> int:
        """Number of gradients in the window, ``min(count, ngrads)``."""
        return min(self.count, self.ngrads)

    @_locked
    def reset(self) -> None:
        """Empties the window (``F^-1`` becomes ``I / lambda``)."""
        self.grads.zero_()
        self.gram.zero_()
        self.count = 0
        self._factor = None

    def _check_vectors(self, x: torch.Tensor, name: str, op: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MFACInverse.{op}: {name} must be a tensor; got {type(x).__name__}")
        if x.dim() not in (1, 2) or x.shape[-1] != self.dim:
            raise ValueError(
                f"MFACInverse.{op}: {name} has shape {tuple(x.shape)}; expected (dim,) or (k, dim) with dim = {self.dim}"
            )
        if not x.is_floating_point():
            raise TypeError(f"MFACInverse.{op}: {name} has dtype {x.dtype}; expected a floating-point tensor")
        if x.device != self.device:
            raise ValueError(f"MFACInverse.{op}: {name} is on {x.device}; expected {self.device}")
        return x.to(self.dtype)

    def _add(self, g: torch.Tensor) -> torch.Tensor:
        """Writes g into the next slot; returns ``G_new round(g)`` [n] (float64)."""
        if isinstance(g, torch.Tensor) and (g.dim() != 1 or g.shape[0] != self.dim):  # (k, dim) is ihvp's, not ours
            raise ValueError(
                f"MFACInverse.update: g has shape {tuple(g.shape)}; expected one gradient (dim,) = ({self.dim},)"
            )
        g = self._check_vectors(g, "g", "update").detach()  # the window is state, not part of a graph
        if not all_finite(g):
            raise ValueError("MFACInverse.update: g has non-finite entries (inf or nan); the window is left unchanged")
        slot = self.count % self.ngrads
        n_new = min(self.count + 1, self.ngrads)
        write = _mfac_dots_write if _direct(g) else torch.ops.lowrank_ops.mfac_dots_write_
        row = write(self.grads, g.unsqueeze(0), n_new, slot)[0]  # float64, summed in float64
        full = self.count >= self.ngrads  # n stays ngrads: only row/column slot of K changes
        # A rank update that succeeded has checked the row (a non-finite one fails it);
        # otherwise it is tested here, one host read on CUDA.
        fallbacks = self.downdate_fallbacks
        if not (full and self._replace_factor_row(slot, row)) and not all_finite(row):
            self.downdate_fallbacks = fallbacks  # the update failed on the overflow, not on a downdate
            if full:
                self.reset()  # g has overwritten the oldest gradient: no consistent window is left
            else:
                self.grads[slot].zero_()  # outside the window (n < ngrads): back to the zeros it held
            raise RuntimeError(
                f"MFACInverse.update: the products of g (stored as {self.storage_dtype}) with the window are not "
                f"finite; {_OVERFLOW}"
            )
        self.gram[slot, :n_new] = row
        self.gram[:n_new, slot] = row
        self.count += 1
        # The pass and the rank update write through pointers, which autograd's version
        # counters do not see: bump them, so that the backward of an ihvp taken before this
        # update raises instead of differentiating through the new window.
        torch.autograd.graph.increment_version(self.grads)
        if self._factor is not None:
            torch.autograd.graph.increment_version(self._factor)
        if not full:  # n grew: every diagonal entry n * damp of K moved
            self._factor = None
        return row

    def _replace_factor_row(self, slot: int, row: torch.Tensor) -> bool:
        """Updates the factor for the new row/column ``slot`` of ``K`` in ``O(m^2)``; whether it did.

        The ``mfac_cholesky_replace_`` op (on CUDA on the current stream, its success flag a
        device int read back here: one host synchronization per replacement, as the
        refactorization it replaces already made one, reading ``cholesky_ex``'s ``info``).  Falls back to a lazy refactorization without a
        factor yet, after ``ngrads`` updates, and when the downdate fails
        (``downdate_fallbacks``; a non-finite row fails the update too).
        """
        factor = self._factor
        if factor is None or self._updates_since_factor >= self.ngrads:
            self._factor = None
            return False
        n = self.ngrads
        k_row = row.clone()
        k_row[slot] += n * self.damp
        if self._work is None:
            self._work = torch.empty(2 * n, dtype=torch.float64, device=self.device)
        ok = bool(cholesky_replace_op()(factor, slot, k_row, self._work).item())
        if ok:
            self._updates_since_factor += 1
            self.rank_updates += 1
        else:
            self.downdate_fallbacks += 1
            self._factor = None
        return ok

    @_locked
    def update(self, g: torch.Tensor) -> None:
        """Adds gradient ``g [dim]`` to the window, replacing the oldest once full.

        Parameters
        ----------
        g : Tensor[dim]
            A floating-point gradient on the object's device, finite; cast to the compute
            dtype and stored in the storage dtype.

        Raises
        ------
        TypeError
            ``g`` is not a floating-point tensor.
        ValueError
            ``g`` of another shape or device, or with non-finite entries.

        Notes
        -----
        One pass over the buffer (the write and the new Gram row ``G g`` in one read).
        Raises ValueError for a wrong length or non-finite entries (the window is then
        unchanged), and RuntimeError when the products of ``g`` with the window are not
        finite (they are summed in float64, which float32 data cannot overflow; in float16
        storage from an entry > 65504, in float64 storage from ``||g|| > ~1e154``): a
        window not yet full is then unchanged, a full one has lost the gradient ``g``
        replaced and is emptied (:meth:`reset`).
        """
        self._add(g)

    @_locked
    def update_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        """Adds ``g`` to the window, then returns ``F^-1 g`` with the new window.

        Parameters
        ----------
        g : Tensor[dim]
            As :meth:`update`.

        Returns
        -------
        Tensor[dim]
            ``F^-1 g`` in the compute dtype (float32 or float64), on the object's device;
            with bf16/fp16 storage ``F^-1 round(g)``, ``round(g)`` the stored gradient.

        Notes
        -----
        The optimizer step: the pass that writes ``g`` also yields ``G g``, so the whole
        call reads the buffer twice (the ``2 m d`` floor).  Errors as :meth:`update`, and
        RuntimeError when the new window's ``K`` is not numerically positive definite (a
        damping too small for nearly parallel gradients, see :meth:`ihvp`): the window is
        then left as after update's RuntimeError (a window not yet full unchanged, a full
        one emptied).

        With bf16/fp16 storage both sides use the stored ``round(g)``: the pass's dots are
        those of the stored row, and ``F`` holds it.  ``F^-1 g`` of the unrounded ``g``
        would add ``F^-1 (g - round(g))``, a rounding error mostly outside the window's
        span, scaled by ``1 / lambda``: as large as the result itself at ``lambda = 1e-5``
        (0.9 of it, gradients 0.01 randn(4096), m = 32, bf16), noise rather than
        curvature.  (Before, the dots of ``round(g)`` were combined with the unrounded
        ``g``: 7.5e-2 from ``F^-1 g`` and 2.1 from ``F^-1 round(g)`` there.)

        Not differentiable: a ``g`` that requires grad while grad mode is on raises
        RuntimeError (the window is then unchanged), as its derivative through the new
        window is not computed.  Call it under ``torch.no_grad()`` (as optimizers do) or
        with ``g.detach()``; for a product differentiable in ``x`` with the window held
        fixed, call :meth:`update` then :meth:`ihvp`.
        """
        if isinstance(g, torch.Tensor) and g.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "MFACInverse.update_ihvp: g requires grad, but the result is not differentiable; pass g.detach() "
                "or call it under torch.no_grad() (update(g) then ihvp(x) is differentiable in x)"
            )
        was_full = self.count >= self.ngrads
        dots = self._add(g)
        slot = (self.count - 1) % self.ngrads
        stored = self.grads[slot].to(self.dtype)  # round(g), as G g used it
        # g is row `slot` of G, so G g = K e_s - n lambda e_s and Woodbury's
        # (g - G^T K^-1 G g) / lambda is n G^T K^-1 e_s: no subtraction.  The subtraction
        # cancelled once ||g||^2 / (n lambda) passed ~1 / u: steps 1e11x too large for
        # gradients of 1e10 at lambda = 1e-5, in float64 too, silently.
        unit = torch.zeros_like(dots)
        unit[slot] = 1.0
        try:
            return self._apply(stored.unsqueeze(0), unit.unsqueeze(0), 0.0, float(self.n))[0]
        except _NotPositiveDefinite:  # no product for this window: undone as update's errors undo it
            if was_full:
                self.reset()
            else:  # back to the zeros the slot held outside the window, its Gram row and column too
                self.count -= 1
                self.grads[self.count].zero_()
                self.gram[self.count].zero_()
                self.gram[:, self.count].zero_()
                self._factor = None
            raise

    # ------------------------------------------------------------------ products
    def _cholesky(self) -> torch.Tensor:
        """The upper factor ``U`` of ``K = U^T U`` (float64 ``[n, n]``, contiguous), computed if needed."""
        if self._factor is None:
            n = self.n
            K = self.gram[:n, :n].clone()
            K.diagonal().add_(n * self.damp)
            if K.device.type == "cpu" and n <= _SERIAL_CHOLESKY_MAX:
                factor = K  # factored in place, single-threaded (see _SERIAL_CHOLESKY_MAX)
                info = cholesky_factor_op()(K)
            else:
                factor, info = torch.linalg.cholesky_ex(K, upper=True)
                info = first_noise_pivot(factor, K.diagonal(), info)
            if int(info) != 0:
                # K is SPD in exact arithmetic and finite here (every row was checked when it
                # entered), but in float64 it is singular once n * damp is below the rounding
                # of G G^T's entries (~1e-16 of the largest squared norm) and some gradients
                # are parallel to others: the damping is too small for the gradients' scale.
                largest = float(self.gram[:n, :n].diagonal().max())
                raise _NotPositiveDefinite(
                    f"MFACInverse: n*damp*I + G G^T is not numerically positive definite (its Cholesky "
                    f"factorization failed at column {int(info)}): n*damp = {n * self.damp:.3g} is below the float64 "
                    f"rounding of the Gram matrix (largest squared gradient norm {largest:.3g}) for nearly parallel "
                    f"gradients; increase damp (or scale the gradients down)"
                )
            factor = factor.contiguous()  # row-major, as the CPU substitution and update read it
            if in_functorch_transform():
                # Not kept: a torch.func transform wraps every tensor made inside it, and a
                # later call outside would find a factor without storage.
                return factor
            self._factor = factor
            self._updates_since_factor = 0
        return self._factor

    def _apply(self, x: torch.Tensor, dots: Optional[torch.Tensor] = None, alpha: Optional[float] = None,
               beta: Optional[float] = None) -> torch.Tensor:
        """``F^-1 x`` for rows ``x [k, dim]``, from ``dots = G_n x^T`` rows ``[k, n]`` when given:
        ``alpha x + beta G^T K^-1 dots`` with Woodbury's ``alpha = 1 / lambda``, ``beta = -1 / lambda``
        unless given (:meth:`update_ihvp` passes its own).

        Without autograd, on every device: the ``mfac_apply`` op.  On the CPU that is one
        extension call for the passes and the solve: no Python work or tensors between the
        passes, and a single-threaded float64 substitution instead of a threaded LAPACK
        solve, which leaves OpenMP workers spinning on the cores the next pass needs (2.6 +
        2.6 ms passes took 9.0 ms in sequence at m = 256, d = 1e5 on 2 cores).  With
        autograd, forward-mode tangents or under torch.func / ``composite()``: the
        differentiable passes and torch's ``cholesky_solve``.
        """
        n = self.n
        if n == 0:
            return x / self.damp
        alpha = 1.0 / self.damp if alpha is None else alpha
        beta = -1.0 / self.damp if beta is None else beta
        differentiable = torch.is_grad_enabled() and (x.requires_grad or (dots is not None and dots.requires_grad))
        # (jvp's duals do not require grad: the op dropped their tangents, silently)
        if not (differentiable or composed_path()):
            return mfac_apply_op(x.device.type)(self.grads, x, n, self._cholesky(), alpha, beta, dots)
        if dots is None:
            dots = dots_op(self.grads, x, n)
        coef = torch.cholesky_solve(dots.T.to(torch.float64), self._cholesky(), upper=True).T.to(self.dtype)
        return combine_op(self.grads, coef.contiguous(), x, n, alpha, beta)

    @_locked
    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        """``F^-1 x`` for ``x [dim]`` or a batch ``x [k, dim]``; two passes over the buffer.

        Parameters
        ----------
        x : Tensor[dim] or Tensor[k, dim]
            Floating point, on the object's device; cast to the compute dtype.

        Returns
        -------
        Tensor[dim] or Tensor[k, dim]
            ``F^-1 x`` (row by row for a batch), in the compute dtype (float32 or float64)
            on the object's device; differentiable in ``x`` (``F^-1`` is symmetric).  An
            empty window gives ``x / lambda``.

        Raises
        ------
        TypeError
            ``x`` is not a floating-point tensor.
        ValueError
            ``x`` of another length or on another device.
        RuntimeError
            ``K = n lambda I + G G^T`` is not numerically positive definite (its Cholesky
            factorization fails): with nearly parallel gradients in the window, once
            ``n lambda`` is below the float64 rounding of ``G G^T`` (about ``1e-16`` of the
            largest squared gradient norm).  The message says so; increase ``damp``.
        """
        x = self._check_vectors(x, "x", "ihvp")
        squeeze = x.dim() == 1
        X = x.unsqueeze(0) if squeeze else x
        out = self._apply(X)
        return out[0] if squeeze else out

    @_locked
    def diag(self, block_size: Optional[int] = None) -> torch.Tensor:
        """Diagonal of ``F^-1`` ``[dim]``: ``(1 - ||L^-1 G[:, j]||^2) / lambda`` with ``K = L L^T``.

        Blocked over ``d``: columns are processed ``block_size`` at a time (default: about
        32 MB of float64 work per block), so memory stays ``O(m * block_size)``.  Cost
        ``O(m^2 d)`` (triangular solves, float64).

        Parameters
        ----------
        block_size : int, optional
            Columns of ``G`` per block (>= 1); default ``4 * 2^20 / n``.

        Returns
        -------
        Tensor[dim]
            The diagonal of ``F^-1`` in the compute dtype (float32 or float64), on the
            object's device; ``1 / lambda`` everywhere for an empty window.  Not
            differentiable.

        Raises
        ------
        ValueError
            ``block_size`` not an integer >= 1.
        """
        n = self.n
        if n == 0:
            return torch.full((self.dim,), 1.0 / self.damp, dtype=self.dtype, device=self.device)
        if block_size is None:
            block_size = max(1, (4 << 20) // n)
        block_size = require_int("MFACInverse.diag", "block_size", block_size)
        U = self._cholesky()
        out = torch.empty(self.dim, dtype=self.dtype, device=self.device)
        for c0 in range(0, self.dim, block_size):
            block = self.grads[:n, c0:c0 + block_size].to(torch.float64)
            Q = torch.linalg.solve_triangular(U.T, block, upper=False)
            out[c0:c0 + block_size] = ((1.0 - Q.square().sum(0)) / self.damp).to(self.dtype)
        return out

    # ------------------------------------------------------------------ construction, state
    @classmethod
    def from_gradients(cls, G: torch.Tensor, damp: float, *, dtype: Optional[torch.dtype] = None,
                       storage_dtype: Optional[torch.dtype] = None) -> "MFACInverse":
        """The static case (pruning): ``F^-1`` for the fixed set of gradients ``G [m, d]``.

        Parameters
        ----------
        G : Tensor[m, d]
            The gradients as rows (``m, d >= 1``), floating point, finite; the object is
            created on G's device.
        damp : float
            ``lambda``, finite and > 0.
        dtype : torch.dtype, optional
            Compute dtype, float32 or float64.
        storage_dtype : torch.dtype, optional
            Dtype of the buffer (default ``dtype``; bfloat16 or float16 with float32).

        Returns
        -------
        MFACInverse
            With ``dim = d``, ``ngrads = m`` and a full window holding ``G``.

        Raises
        ------
        ValueError
            ``G`` not 2-D with ``m, d >= 1``, non-finite entries, or a bad ``damp``.
        TypeError
            An unsupported ``dtype`` / ``storage_dtype`` combination.

        Notes
        -----
        The Gram matrix is ``G G^T`` of the stored rows in float64 (GEMMs through torch over
        blocks of about 32 MB of float64 columns, as the passes' float64 sums: see the
        module's notes); ``dtype`` defaults to float64 for float64 ``G``, else float32.
        Raises ValueError for non-finite entries, RuntimeError when ``G G^T`` is not
        finite (a float16 storage's overflowed entry).
        """
        require_tensors("MFACInverse.from_gradients", G=G)
        if G.dim() != 2 or G.shape[0] < 1 or G.shape[1] < 1:
            raise ValueError(f"MFACInverse.from_gradients: G has shape {tuple(G.shape)}; expected (m, d) with m, d >= 1")
        dtype = compute_dtype(G.dtype) if dtype is None else dtype
        inverse = cls(G.shape[1], G.shape[0], damp, dtype=dtype, storage_dtype=storage_dtype, device=G.device)
        if not all_finite(G):
            raise ValueError("MFACInverse.from_gradients: G has non-finite entries (inf or nan)")
        inverse.grads.copy_(G.detach())  # the window is state, not part of a graph (diag's gradients were wrong)
        m, d = G.shape
        block = max(1, (4 << 20) // m)
        inverse.gram.zero_()
        for c0 in range(0, d, block):
            stored = inverse.grads[:, c0:c0 + block].to(torch.float64)
            inverse.gram.addmm_(stored, stored.T)
        if not all_finite(inverse.gram):
            raise RuntimeError(f"MFACInverse.from_gradients: G G^T is not finite; {_OVERFLOW}")
        inverse.count = G.shape[0]
        return inverse

    @_locked
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: sizes, damping, dtypes, the buffer, Gram and count."""
        return {
            "dim": self.dim, "ngrads": self.ngrads, "damp": self.damp, "count": self.count,
            "dtype": self.dtype, "storage_dtype": self.storage_dtype,
            "grads": self.grads.clone(), "gram": self.gram.clone(),
        }

    @_locked
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output (moved to this object's device).

        Raises ValueError naming the key for a missing key, another ``dim``, ``ngrads`` or
        dtype, a ``damp`` that is not a finite number > 0, a ``count`` that is not an
        integer >= 0, and a ``grads`` or ``gram`` of another shape or dtype or with
        non-finite entries; the object is then unchanged.
        """
        op = "MFACInverse.load_state_dict"
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"{op}: state has no {', '.join(missing)}; expected the keys {', '.join(_STATE_KEYS)}")
        for key in ("dim", "ngrads", "dtype", "storage_dtype"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{op}: {key} is {state[key]}; expected {getattr(self, key)}")
        damp = _check_damp(state["damp"], op)
        count = state["count"]
        count = require_int(op, "count", count, 0)
        for key, shape, dtype in (("grads", (self.ngrads, self.dim), self.storage_dtype),
                                  ("gram", (self.ngrads, self.ngrads), torch.float64)):
            tensor = state[key]
            require_tensors(op, **{key: tensor})
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"{op}: {key} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; expected {shape} and {dtype}"
                )
            if not all_finite(tensor):
                raise ValueError(f"{op}: {key} has non-finite entries (inf or nan)")
        self.damp = damp
        self.grads.copy_(state["grads"])
        self.gram.copy_(state["gram"])
        self.count = count
        self._factor = None

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any], device: Any = None) -> "MFACInverse":
        """A new object restored from :meth:`state_dict`'s output.

        Parameters
        ----------
        state : dict
            What :meth:`state_dict` returned (possibly through ``torch.save`` / ``torch.load``).
        device : torch.device or str, optional
            Where to put the new object; default the device of ``state["grads"]``.

        Returns
        -------
        MFACInverse
            The same sizes, damping, dtypes, window and count; the factor is recomputed on
            first use.

        Raises
        ------
        KeyError, ValueError, TypeError
            A ``state`` that is not :meth:`state_dict`'s output (a missing key, invalid
            sizes, damping or dtypes; see :meth:`load_state_dict`).
        """
        inverse = cls(state["dim"], state["ngrads"], state["damp"], dtype=state["dtype"],
                      storage_dtype=state["storage_dtype"], device=device if device is not None else state["grads"].device)
        inverse.load_state_dict(state)
        return inverse
