"""Validation of the solvers' inputs and the batched view of one OT problem family."""
from __future__ import annotations

import copy
import math
import numbers
from typing import Optional, Tuple

import numpy as np
import torch

from .._finite import all_finite
from ..ops import ot as ot_ops
from ..ops._library import refuse_transforms

__all__ = ["Problem"]

_DTYPES = (torch.float32, torch.float64)


def _is_number(value) -> bool:
    """A real Python or NumPy scalar (np.float32(0.1) too; a bool is not a number here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


class Problem:
    """A batch of ``B`` entropic OT problems in the kernels' layout.

    Attributes
    ----------
    C : Tensor[B, n, m] or None
        Cost matrices (a view of the user's tensor: ``C[None]`` when unbatched).
    x, y : Tensor[B, n, d], Tensor[B, m, d] or None
        Point clouds (cost computed on the fly).
    a, b : Tensor[B, n], Tensor[B, m]
        Masses, positive, summing to 1, in the working dtype (that of C or x).
    log_a, log_b : Tensor
        Their logarithms.
    code : int
        Cost code (lowrank_ops.ops.ot.COST_CODES).
    lead : tuple
        The user's batch shape (``()`` for one problem).
    """

    def __init__(self, op: str, a, b, C, x, y, cost: str, reg) -> None:
        refuse_transforms(op, "each problem stops on its own convergence test; pass the problems as a batch "
                              "[..., n, m] instead (grad, vjp, jacrev and jvp are supported; jacfwd and "
                              "hessian vmap the solve)", only_vmap=True)
        if not _is_number(reg) or not (0 < reg < math.inf):
            raise ValueError(f"{op}: reg must be a finite number > 0; got {reg!r}")
        self.reg = float(reg)
        if (C is None) == (x is None and y is None):
            raise ValueError(f"{op}: give either a cost matrix C or point clouds x and y (not both, not neither)")
        if C is not None:
            self._init_matrix(op, C)
        else:
            self._init_points(op, x, y, cost)
        self.a = self._masses(op, "a", a, self.n)
        self.b = self._masses(op, "b", b, self.m)
        with torch.no_grad():
            self.log_a, self.log_b = self.a.log(), self.b.log()

    # ---------------------------------------------------------------- construction
    def _check_tensor(self, op: str, name: str, t) -> torch.Tensor:
        """A finite float32/float64 cpu/cuda tensor of at least 2 dimensions (batch shape + 2)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor; got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected at least 2-D (batch shape + 2)")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected float32 or float64")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: {name} is on {t.device}; expected a cpu or cuda tensor")
        if not all_finite(t):
            raise ValueError(f"{op}: {name} has a non-finite entry (inf or nan); expected finite values")
        return t

    def _init_matrix(self, op: str, C) -> None:
        C = self._check_tensor(op, "C", C)
        self.lead = tuple(C.shape[:-2])
        self.C = C.reshape(math.prod(self.lead), *C.shape[-2:])  # the batch flattened (a view where strides merge)
        self.x = self.y = None
        self.code = ot_ops.COST_CODES["matrix"]
        self.cost_name = "matrix"
        self.dtype, self.device = C.dtype, C.device
        self.batch, self.n, self.m = self.C.shape

    def _init_points(self, op: str, x, y, cost: str) -> None:
        if x is None or y is None:
            raise ValueError(f"{op}: point clouds need both x and y")
        if cost not in ("sqeuclidean", "l1"):
            raise ValueError(f"{op}: cost must be 'sqeuclidean' or 'l1' for point clouds; got {cost!r}")
        x = self._check_tensor(op, "x", x)
        y = self._check_tensor(op, "y", y)
        if x.dim() != y.dim() or x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1] or x.shape[-1] < 1:
            raise ValueError(f"{op}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; expected "
                             "(..., n, d) and (..., m, d) with the same batch shape and d >= 1")
        if y.dtype != x.dtype or y.device != x.device:
            raise ValueError(f"{op}: y has dtype {y.dtype} on {y.device}; expected {x.dtype} on {x.device} (as x)")
        self.lead = tuple(x.shape[:-2])
        self.x = x.reshape(math.prod(self.lead), *x.shape[-2:])
        self.y = y.reshape(math.prod(self.lead), *y.shape[-2:])
        self.C = None
        self.code = ot_ops.COST_CODES[cost]
        self.cost_name = cost
        self.dtype, self.device = x.dtype, x.device
        self.batch, self.n = self.x.shape[:2]
        self.m = self.y.shape[1]

    def _masses(self, op: str, name: str, w, size: int) -> torch.Tensor:
        expected = self.lead + (size,)
        if size == 0:  # with or without masses: an empty side has no coupling
            raise ValueError(f"{op}: {name} is empty; expected at least one point on each side")
        if w is None:
            return torch.full((self.batch, size), 1.0 / size, dtype=self.dtype, device=self.device)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor; got {type(w).__name__}")
        if tuple(w.shape) != expected:
            side = "n" if name == "a" else "m"
            source = (f"C's shape {tuple(self.lead) + (self.n, self.m)}" if self.C is not None
                      else f"x's {tuple(self.x.shape)} and y's {tuple(self.y.shape)} shapes")
            raise ValueError(f"{op}: {name} has shape {tuple(w.shape)}; expected {expected} (batch shape + {side}, "
                             f"from {source}: a mismatch of {name} and the cost)")
        if w.device != self.device:
            raise ValueError(f"{op}: {name} is on {w.device}; expected {self.device}")
        # Checked at the precision of the coarser of the masses' and the cost's dtypes
        # (float32 masses normalized in float32 are off 1 by ~1e-8, beyond float64's check).
        tol = math.sqrt(max(torch.finfo(w.dtype).eps, torch.finfo(self.dtype).eps))
        w = w.to(self.dtype).reshape(self.batch, size)
        if self.batch:
            detached = w.detach()
            if not all_finite(detached) or bool((detached <= 0).any()):
                bad = (~(detached > 0) | ~torch.isfinite(detached)).reshape(expected)  # NaN included
                first = tuple(int(i) for i in torch.nonzero(bad)[0])  # the first offending entry, as given
                value = float(detached.reshape(expected)[first])
                raise ValueError(f"{op}: {name}[{', '.join(map(str, first))}] = {value:.3g}; expected positive finite "
                                 f"masses (drop zero-mass points)")
            total = detached.double().sum(-1)
            worst = float((total - 1).abs().max())
            if worst > tol:
                raise ValueError(f"{op}: {name} sums to {float(total[(total - 1).abs().argmax()]):.10g}; expected "
                                 f"masses summing to 1 (within {tol:.1e}) in every problem")
            # Renormalized (values only: gradients pass as before): the marginal error
            # cannot fall below |sum a - sum b|, so masses accepted 3e-4 off 1 in float32
            # ran every iteration against tol = 1e-5 and reported non-convergence.
            w = w + (detached / total.to(self.dtype)[:, None] - detached)
        return w

    # ---------------------------------------------------------------- kernels
    def lse(self, f, g, active: Optional[torch.Tensor] = None, *, columns: bool = False,
            with_cost: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Row (or column) log marginals of the plan of potentials (f, g)."""
        return ot_ops.row_lse(self.C, self.x, self.y, f, g, self.reg, self.code, active, columns=columns,
                              with_cost=with_cost)

    def dual(self, f: torch.Tensor, g: torch.Tensor, row_lse: torch.Tensor) -> torch.Tensor:
        """Dual objective ``<a, f> + <b, g> - reg sum P`` per problem (row_lse of (f, g))."""
        return (self.a * f).sum(-1) + (self.b * g).sum(-1) - self.reg * row_lse.exp().sum(-1)

    def initial_potentials(self, op: str, init) -> Tuple[torch.Tensor, torch.Tensor]:
        """The starting potentials ``(f [B, n], g [B, m])``: zeros, or a validated copy of
        ``init`` = ``(f0, g0)`` or an ``OTResult`` (its ``f``, ``g``), in the convention of
        ``OTResult.f`` / ``.g``, of shapes batch shape + ``(n,)`` / ``(m,)`` or ``(n,)`` /
        ``(m,)`` (the same start for every problem of a batch)."""
        if init is None:
            return self.zeros()
        from .result import OTResult  # result imports this module

        if isinstance(init, OTResult):
            init = (init.f, init.g)
        if not isinstance(init, (tuple, list)) or len(init) != 2:
            length = f" of length {len(init)}" if isinstance(init, (tuple, list)) else ""
            raise TypeError(f"{op}: init must be a pair (f0, g0) of tensors or an OTResult; got "
                            f"{type(init).__name__}{length}")
        out = []
        for name, t, size in (("f0", init[0], self.n), ("g0", init[1], self.m)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: init {name} must be a tensor; got {type(t).__name__}")
            expected = self.lead + (size,)
            if tuple(t.shape) not in (expected, (size,)):
                raise ValueError(f"{op}: init {name} has shape {tuple(t.shape)}; expected {expected} (batch shape + "
                                 f"{'n' if name == 'f0' else 'm'}) or ({size},)")
            if t.dtype != self.dtype:
                raise TypeError(f"{op}: init {name} has dtype {t.dtype}; expected {self.dtype} (the dtype of "
                                f"{'C' if self.C is not None else 'x'})")
            if t.device != self.device:
                raise ValueError(f"{op}: init {name} is on {t.device}; expected {self.device}")
            t = t.detach()
            if not all_finite(t):
                raise ValueError(f"{op}: init {name} has a non-finite entry (inf or nan); expected finite potentials")
            # A copy: the solvers never write into the user's tensors, and the result must not alias them.
            out.append(t.expand(*self.lead, size).reshape(self.batch, size).clone())
        return out[0], out[1]

    def with_reg(self, reg: float) -> "Problem":
        """The same problems at another regularization (a stage of epsilon scaling)."""
        other = copy.copy(self)
        other.reg = float(reg)
        return other

    def cost_spread(self) -> float:
        """An upper bound of ``max C - min C`` over the batch: one pass over a cost matrix;
        for point clouds, from the bounding box of x and y (O((n + m) d))."""
        if self.batch == 0:  # (reshape(0, -1) is ambiguous: it raised for an empty batch)
            return 0.0
        if self.C is not None:
            flat = self.C.detach().reshape(self.batch, -1)
            return float((flat.amax(-1) - flat.amin(-1)).max())
        points = torch.cat([self.x.detach(), self.y.detach()], 1)
        span = points.amax(1) - points.amin(1)  # [B, d]
        if self.code == ot_ops.COST_CODES["l1"]:
            return float(span.sum(-1).max())
        return float((span * span).sum(-1).max())

    def zeros(self) -> Tuple[torch.Tensor, torch.Tensor]:
        z = dict(dtype=self.dtype, device=self.device)
        return torch.zeros((self.batch, self.n), **z), torch.zeros((self.batch, self.m), **z)

    def dense_cost(self) -> torch.Tensor:
        """The cost matrices ``[B, n, m]`` (materialized for point clouds)."""
        if self.C is not None:
            return self.C
        if self.code == ot_ops.COST_CODES["l1"]:
            return torch.cdist(self.x, self.y, p=1.0)
        # Differences, not the |x|^2 + |y|^2 - 2 x.y expansion (which cancels catastrophically).
        return torch.cdist(self.x, self.y, compute_mode="donot_use_mm_for_euclid_dist") ** 2
