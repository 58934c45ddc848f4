"""MKOR (Mozaffari, Li, Zhang, Dehnavi, 2023): KFAC-style preconditioning of ``nn.Linear``
layers whose Kronecker factors' inverses are kept directly and updated by rank-1
Sherman-Morrison updates with momentum.

For a Linear layer ``y = x W^T + b`` (``W [out, in]``), KFAC approximates the Fisher block
of ``[W | b]`` by ``L_g (x) L_a``: ``L_a`` the covariance of the layer inputs ``a = [x, 1]``
(``in + 1`` entries with a bias, ``in`` without), ``L_g`` that of the gradients ``g`` of the
loss with respect to the outputs.  KFAC forms both ``d x d`` covariances and inverts them
(``O(d^3)``), so it refreshes them rarely.  MKOR replaces each covariance by its rank-1
batch summary and keeps only the inverse, updated every step in ``O(d^2)``::

    a_bar = mean of the input rows a          (``[in(+1)]``; the bias entry is 1)
    g_bar = sum of the output-gradient rows   (``[out]``; = the mean per-row gradient of a
                                               loss averaged over the rows, KFAC's scaling)
    L     <- beta L + (1 - beta) v v^T         (v = a_bar or g_bar; L_0 = I)
    L^-1  <- (1 / beta) (L^-1 - c u u^T),  u = L^-1 v,  c = alpha / (1 + alpha v^T u),
                                           alpha = (1 - beta) / beta   (Sherman-Morrison)
    step  =  L_g^-1 [G_W | g_b] L_a^-1

One GEMV (``u``) and one rank-1 update per factor: :class:`ShermanMorrisonInverse` holds
``L^-1 = s M`` with a scalar ``s`` kept apart, so that the ``1 / beta`` factor is a scalar
update and the matrix pass is a single ``M -= w w^T`` (``w = sqrt(c s) M v``), not a
scale and then a rank-1 update (two passes).  The rank-1 update must keep ``M`` exactly
symmetric: the recursion damps symmetric rounding errors (relative to ``L^-1``) but
amplifies antisymmetric ones by up to ``1 / beta`` per step, so BLAS ``ger``, which
rounds ``(i, j)`` and ``(j, i)`` differently, diverges (see
:meth:`ShermanMorrisonInverse.update`).  Costs per layer and step: ``4 (d_a^2 + d_g^2)`` flops for
the two factor updates against ``~(d_a^3 + d_g^3)`` for KFAC's Cholesky inversions, plus
the preconditioning's two GEMMs, ``2 out in' (out + in')`` flops (``in' = in + 1`` with a
bias), which KFAC pays as well and which dominate both (see bench/bench_mkor.py).

Stabilization (our reading of the paper and of its official code, both of which
describe it only briefly):

* Norm-based stabilizer.  Without damping, ``L_t = beta^t I + sum_k (1 - beta) beta^(t-k)
  v_k v_k^T``: in the directions no mean vector has visited, ``L^-1`` grows like
  ``beta^-t``.  After each update, when the largest entry of ``L^-1`` exceeds
  ``inverse_bound``, the inverse is pulled toward the identity, ``L^-1 <- (1 - zeta) L^-1
  + zeta I`` (``zeta = stabilization``; still symmetric positive definite).  For a
  symmetric positive definite matrix the largest entry is on the diagonal
  (``|A_ij| <= sqrt(A_ii A_jj)``), so the test reads ``d`` entries, not ``d^2``.  The
  official code applies the blend at the next update instead of the SM update; here it
  follows the update that crossed the bound, so the inverse used to precondition is
  always within it.
* Gradient rescaling (``rescale=True``): the preconditioned step of each layer is scaled
  to the Frobenius norm of its gradient ``[G_W | g_b]`` (weight and bias together), so the
  learning rate keeps its SGD meaning and the scale of ``L^-1`` (``beta^-t`` growth, the
  scalars ``s``) cancels.
* Fallback to the plain gradient: when a factor update breaks (a non-finite or negative
  quadratic form ``v^T L^-1 v``, which rounding can produce once the kept inverse has lost
  its definiteness) or the preconditioned step is not finite (or is zero for a non-zero
  gradient, or the gradient's norm overflows the factor dtype), the layer's two inverses
  are reset to the identity and its step is the plain gradient;
  ``state[weight]["fallbacks"]`` counts it and a ``RuntimeWarning`` says so.
* Non-finite inputs: captured means with NaN or inf entries skip that factor's update
  (``state[weight]["skipped_factor_updates"]``); a non-finite gradient of a layer skips the
  layer's whole step (factors, momentum and parameters stay as they were, as
  ``torch.amp.GradScaler`` skips a step; ``state[weight]["skipped_steps"]``), and so does
  that of a parameter outside the Linear layers (``state[p]["skipped_steps"]``).  All warn.

Devices.  The factors live on their layer's device (``load_state_dict`` moves them to
the parameter's, so a state saved on one device and loaded with ``map_location`` on
another works).  On a GPU the decisions above are taken on the device, as tensors: a
refused update is a rank-1 pass with ``w = 0``, a blend not taken adds 0 to the
diagonal, a skipped layer's factor updates are masked, and the scalar ``s`` of each
inverse is a device tensor (folded when host-side bounds of it say it may leave its
range).  A step reads the host once per device: one stacked tensor of every layer's
flags (gradient finite, update broken, step failed, mean not finite) and of the other
parameters' gradient sums, after all the layers' kernels are queued; the counters,
warnings, identity resets and plain-gradient fallbacks follow from it.  (A gradient
outside the Linear layers whose sum overflows with finite entries costs one more read,
to tell it from a NaN.)  On the CPU, where reading a scalar costs nothing, the same
decisions are Python values and refused work is skipped (the device path's small tensor
ops cost a 256 x 256 layer's step 1.5x; see ``_HOST_DEVICE_TYPES``).

Not implemented: MKOR-H (the paper's switch to a first-order optimizer mid-training),
half-precision factors, the distributed all-reduce of the mean vectors, Conv2d layers.

Precision.  The factors are kept in ``factor_dtype`` (float32 for float32 / bf16 / fp16
weights, float64 for float64).  The scalars of an update (``v^T u``, ``c``, ``s``) are
float64: ``v^T u`` is a dot product with terms of both signs, and the denominator ``1 +
alpha v^T u`` decides whether the update is valid at all, so it is summed in float64
(``O(d)`` work) instead of float32.  The matrix passes stay in ``factor_dtype``: an
upcast copy of ``M`` would cost more than the update itself.  The subtraction ``M - (c/s)
u u^T`` cancels in the directions of recent mean vectors (where ``L^-1`` is small
against its largest entries), so float32 factors carry a relative error of about
``cond(L) * 2^-24`` there; ``factor_dtype=torch.float64`` removes it at twice the memory
traffic.

Usage::

    optimizer = MKOR(model, lr=0.05, momentum=0.9)
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)   # forward pre-hooks record the input means
        loss.backward()               # gradient hooks on the outputs record their sums
        optimizer.step()              # factor updates, preconditioning, SGD-momentum step
    optimizer.remove_hooks()          # when done (the hooks hold the optimizer alive)

To use another optimizer on the preconditioned gradients, call
``optimizer.precondition()`` (it writes them into the Linear layers' ``.grad``) and then
that optimizer's ``step()``, instead of ``optimizer.step()``.
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .._args import require_int, require_number
from .._dtypes import accumulate_dtype
from .._finite import all_finite
from ._checks import add_checked_group, check_lr, current_lr, require_real_params

__all__ = ["MKOR", "ShermanMorrisonInverse"]

# The scalar s of L^-1 = s M grows by 1/beta per update while M = L^-1 / s shrinks, and
# shrinks by 1 - zeta per blend of the stabilizer while M grows; s is folded into M (one
# pass) when it may have left [1 / _SCALE_FOLD, _SCALE_FOLD] -- every ~360 updates at
# beta = 0.95, every ~175 blends at zeta = 0.1 -- long before M's entries could approach
# float32's underflow or overflow range.  The host decides from bounds of s that it
# tracks itself (every update applied, every blend taken), so folding reads nothing.
_SCALE_FOLD = 1e8

# Where the factors live on these devices a scalar costs nothing to read (no queue to wait
# for), so the decisions are Python values there and refused work is skipped, as before
# the device path existed: the device path's ~100 small tensor ops made a step of a 256 x
# 256 layer 1.5x slower on the 2-core Xeon.  Elsewhere (CUDA) they stay tensors, read once
# per step.  tests/test_mkor.py runs every test both ways (the CPU on the device path).
_HOST_DEVICE_TYPES = ("cpu",)


def _on_host(device: torch.device) -> bool:
    return device.type in _HOST_DEVICE_TYPES


def _scalar(tensor: torch.Tensor):
    """A 0-d tensor's value as a Python number on the host (free there), else the tensor."""
    return tensor.item() if _on_host(tensor.device) else tensor


# Decisions on Python numbers (host) or 0-d tensors (device) alike.  NaN compares False.
def _finite(x):
    return (x > -math.inf) & (x < math.inf)


def _false(device: torch.device):
    """A False flag: a Python bool on the host, a bool tensor ``[]`` elsewhere."""
    return False if _on_host(device) else torch.zeros((), dtype=torch.bool, device=device)


def _not(flag):
    return (not flag) if isinstance(flag, bool) else ~flag


def _where(cond, a, b):
    return (a if cond else b) if isinstance(cond, bool) else torch.where(cond, a, b)


def _ratio(num, den):
    """``num / den`` where ``den > 0``, else 0 (no division by zero on the host)."""
    if isinstance(den, torch.Tensor):
        return torch.where(den > 0.0, num / den, 0.0)
    return num / den if den > 0.0 else 0.0


def _tensor_finite(tensor: torch.Tensor):
    """Whether every entry is finite: from the extremes (one pass, no temporary of the
    tensor's size); a Python bool on the host."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return _finite(_scalar(low)) & _finite(_scalar(high))


class ShermanMorrisonInverse:
    """The inverse ``L^-1 = scale * matrix`` of a symmetric positive definite factor
    ``L [d, d]`` (initially the identity), updated in place by
    ``L <- beta L + (1 - beta) v v^T`` with the Sherman-Morrison formula.

    Parameters
    ----------
    dim : int
        ``d`` (>= 1).
    dtype : torch.dtype
        float32 or float64: the dtype of ``matrix`` and of the GEMV and rank-1 passes.
    device : torch.device or str, optional

    Attributes
    ----------
    matrix : Tensor ``[d, d]``
        ``M``, symmetric.
    scale : float or Tensor ``[]``
        The scalar ``s``: a Python float for a CPU ``matrix``; elsewhere a float64 tensor
        on ``matrix``'s device, so that an update whose validity is decided on the device
        needs no host read to set it.

    Notes
    -----
    On a GPU, :meth:`update_` and :meth:`blend_identity_` take their decisions (is the
    update defined; is the bound exceeded) as tensors and read nothing to the host: the
    work is the same either way, masked.  On the CPU, where a read is free, they are
    Python values and refused work is skipped.  :meth:`update` and :meth:`max_entry`
    return Python values (one host read each).
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device=None):
        dim = require_int("ShermanMorrisonInverse", "dim", dim)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ShermanMorrisonInverse: dtype must be torch.float32 or torch.float64; got {dtype}")
        self.matrix = torch.eye(dim, dtype=dtype, device=device)
        self._host = _on_host(self.matrix.device)
        self.scale = self._unit_scale()
        self._scale_low = self._scale_high = 1.0  # host-side bounds of scale (see _SCALE_FOLD)
        self._u = torch.empty(dim, dtype=dtype, device=device)  # the GEMV's preallocated output

    def _unit_scale(self):
        return 1.0 if self._host else torch.ones((), dtype=torch.float64, device=self.matrix.device)

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def dense(self) -> torch.Tensor:
        """``L^-1 [d, d]`` as a new tensor (``scale * matrix``)."""
        return self.matrix * self.scale

    def max_entry_(self):
        """The largest entry of ``L^-1`` in absolute value (a float64 tensor ``[]``, no host
        read; a float on the CPU): its largest diagonal entry, as for every symmetric
        positive definite matrix (``d`` reads)."""
        largest = self.matrix.diagonal().max()
        return self.scale * (largest.item() if self._host else largest)

    def max_entry(self) -> float:
        """:meth:`max_entry_` as a Python float (one host read on CUDA)."""
        return float(self.max_entry_())

    def update_(self, v: torch.Tensor, beta: float, enabled=None):
        """``L^-1 <- (beta L + (1 - beta) v v^T)^-1`` in place: one GEMV and one symmetric
        rank-1 update (``O(d^2)``; ``u`` is a preallocated buffer), with no host read on a GPU.

        ``v [d]`` is any float tensor (converted to ``matrix``'s dtype); ``beta`` in
        ``(0, 1)``; ``enabled`` an optional bool tensor ``[]`` or bool (False: leave the
        inverse as it is).  Returns whether the update was applied, a bool tensor ``[]``
        (a bool on the CPU).  It is not (the inverse unchanged, bit for bit) when disabled
        or undefined: ``v^T L^-1 v`` not finite (as for every ``v`` with a NaN or inf
        entry: ``u`` then has one too), or so negative (the kept inverse lost its
        definiteness to rounding) that ``1 + alpha v^T L^-1 v <= 0``.  On a GPU the
        rank-1 pass runs either way, with ``w = 0`` when refused.
        """
        if v.shape != (self.dim,):
            raise ValueError(f"ShermanMorrisonInverse.update: v must have shape ({self.dim},); got {tuple(v.shape)}")
        v = v.to(self.matrix.dtype)
        u = torch.mv(self.matrix, v, out=self._u)  # M v; u = s M v = L^-1 v
        dot = torch.dot(v.double(), u.double())  # v^T M v, summed in float64
        quad = self.scale * (dot.item() if self._host else dot)  # v^T L^-1 v
        alpha = (1.0 - beta) / beta
        denominator = 1.0 + alpha * quad
        valid = (denominator > 0.0) & (denominator < math.inf)  # False for NaN
        if enabled is not None:
            valid = valid & enabled
        if valid is False:  # decided on the host: nothing to do
            return False
        c = alpha / denominator
        # (1/beta)(sM - c s^2 M v v^T M) = (s/beta)(M - w w^T), w = sqrt(c s) M v: one pass
        # over M.  Not BLAS ger (addr_): it rounds entries (i, j) and (j, i) differently
        # (alpha u_j first, or FMA in some lanes only), and the recursion multiplies an
        # antisymmetric error by up to 1/beta per update (it is stable only for symmetric
        # ones): beta = 0.5, d = 7, float64, measured 1e-16 -> 1 relative in 55 updates.
        # With w_i w_j = w_j w_i and the factor -1 exact, addcmul_ keeps M exactly symmetric.
        # Refused: w = 0 exactly (not sqrt(c s) * 0, NaN for a NaN u), and M - 0 = M.
        w = _where(valid, u.mul_((c * self.scale) ** 0.5), 0.0)
        self.matrix.addcmul_(w[:, None], w[None, :], value=-1.0)
        self.scale = _where(valid, self.scale / beta, self.scale)
        self._scale_high /= beta
        if self._scale_high > _SCALE_FOLD:
            self.fold()
        return valid

    def update(self, v: torch.Tensor, beta: float) -> bool:
        """:meth:`update_` returning a Python bool (one host read on CUDA)."""
        return bool(self.update_(v, beta))

    def fold(self) -> None:
        """Multiply ``scale`` into ``matrix`` (one pass); ``scale`` becomes 1."""
        self.matrix.mul_(self.scale)
        self.scale = self._unit_scale()
        self._scale_low = self._scale_high = 1.0

    def blend_identity_(self, weight: float, when=None) -> None:
        """``L^-1 <- (1 - weight) L^-1 + weight I`` (the norm-based stabilizer), where the
        bool tensor (or bool) ``when`` (default: always) holds; ``weight`` in ``[0, 1)``.
        ``O(d)`` and no host read: ``scale <- (1 - weight) scale`` and ``weight / scale``
        added to the diagonal of ``matrix``."""
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"ShermanMorrisonInverse.blend_identity_: weight must be in [0, 1); got {weight}")
        if when is None:
            when = True
        if when is False:
            return
        scale = _where(when, self.scale * (1.0 - weight), self.scale)
        self.matrix.diagonal().add_(_where(when, weight / scale, 0.0))
        self.scale = scale
        self._scale_low *= 1.0 - weight
        if self._scale_low < 1.0 / _SCALE_FOLD:
            self.fold()

    def blend_identity(self, weight: float) -> None:
        """``L^-1 <- (1 - weight) L^-1 + weight I`` for ``weight`` in ``[0, 1]`` (1: the
        identity)."""
        if weight == 1.0:
            self.reset()
        else:
            self.blend_identity_(weight)

    def reset(self) -> None:
        """Back to ``L = I``."""
        self.matrix.zero_().diagonal().fill_(1.0)
        self.scale = self._unit_scale()
        self._scale_low = self._scale_high = 1.0

    def state_dict(self) -> Dict[str, Any]:
        # The host-side bounds decide when scale is folded into matrix, which rounds it: a
        # resumed run must fold at the same steps to follow the uninterrupted one.
        return {"matrix": self.matrix, "scale": self.scale, "scale_bounds": (self._scale_low, self._scale_high)}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any], device=None, dtype=None) -> "ShermanMorrisonInverse":
        """From :meth:`state_dict` (``scale`` a float or a tensor, whichever the saving
        device kept), in ``dtype`` (default: the saved matrix's) on ``device``."""
        matrix = state["matrix"]
        inverse = cls(matrix.shape[0], dtype if dtype is not None else matrix.dtype,
                      device=device if device is not None else matrix.device)
        inverse.matrix.copy_(matrix)
        scale = float(state["scale"])  # one read, at load time
        inverse.scale = scale if inverse._host else torch.full_like(inverse.scale, scale)
        # Saved before the bounds were: bounded by the scale itself (a fold may then come
        # at another step than in the uninterrupted run).
        low, high = state.get("scale_bounds", (scale, scale))
        inverse._scale_low, inverse._scale_high = float(low), float(high)
        return inverse


class _Hook:
    """A module hook that calls ``optimizer.<method>``, holding the optimizer weakly: the
    model does not keep it alive, and a deep copy or a pickle of the model (an EMA copy,
    ``torch.save(model)``) carries an inert hook instead of a copy of the optimizer (a
    copied MKOR lacked its layer map: the copy's first forward raised)."""

    def __init__(self, optimizer: Optional["MKOR"], method: str):
        self._optimizer = None if optimizer is None else weakref.ref(optimizer)
        self._method = method

    def __call__(self, *args):
        optimizer = None if self._optimizer is None else self._optimizer()
        return None if optimizer is None else getattr(optimizer, self._method)(*args)

    def __deepcopy__(self, memo) -> "_Hook":
        return _Hook(None, self._method)

    def __reduce__(self):
        return (_Hook, (None, self._method))


def _record_grad_output(optimizer: "weakref.ref[MKOR]", layer: "_Layer", grad: torch.Tensor) -> None:
    """The output's gradient hook (see ``MKOR._watch_output``); leaves the gradient as it is."""
    live = optimizer()
    if live is not None:
        live._capture_grad_output(layer, grad)


class _Layer:
    """One preconditioned Linear layer: its parameters and the statistics captured since
    the last step (sums in the factor dtype)."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.weight: torch.Tensor = module.weight
        self.bias: Optional[torch.Tensor] = module.bias if module.bias is not None and module.bias.requires_grad else None
        self.has_bias_column = module.bias is not None
        self.reset_capture()

    def reset_capture(self) -> None:
        self.a_sum: Optional[torch.Tensor] = None
        self.a_rows = 0
        self.g_sum: Optional[torch.Tensor] = None

    @property
    def a_dim(self) -> int:
        return self.module.in_features + (1 if self.has_bias_column else 0)

    def a_mean(self) -> Optional[torch.Tensor]:
        """``[in(+1)]``: the mean input row, with the bias entry 1; None if nothing was captured."""
        if self.a_sum is None or self.a_rows == 0:
            return None
        mean = self.a_sum / self.a_rows
        if self.has_bias_column:
            mean = torch.cat([mean, mean.new_ones(1)])
        return mean


class _Pending:
    """One layer's step as :meth:`MKOR._layer_direction` left it on the device: the
    preconditioned direction, the gradient ``[G_W | g_b]`` (the step where the
    preconditioning failed) and the flags that :meth:`resolve` is given back (counters,
    warnings, resets, the choice between the two)."""

    def __init__(self, layer: _Layer, direction: torch.Tensor, grad: torch.Tensor, flags: List[torch.Tensor],
                 skipped: Dict[str, torch.Tensor], broken: Dict[str, torch.Tensor]):
        self.layer, self.direction, self.grad, self.device = layer, direction, grad, grad.device
        self.names = list(skipped)
        # gradient finite, an update broke down, the preconditioned step failed; then per
        # factor: mean not finite, update broke down.
        self.flags = flags + list(skipped.values()) + list(broken.values())
        self.flag_at = 0  # where the flags start in the device's read-back list

    def resolve(self, optimizer: "MKOR", read: List[bool]):
        """``(weight step, bias step or None)``, or None when the step is skipped (a
        non-finite gradient), given the read-back flags; counts and warns as the flags say."""
        layer = self.layer
        weight = layer.weight
        state = optimizer.state[weight]
        grad_ok, broke, vanished, *per_factor = read[self.flag_at:self.flag_at + len(self.flags)]
        skipped, broken = per_factor[:len(self.names)], per_factor[len(self.names):]
        if not grad_ok:
            state["skipped_steps"] += 1
            warnings.warn(f"MKOR: the gradient of the Linear layer with weight {tuple(weight.shape)} has NaN or inf "
                          f"entries (step {state['step']}); its step is skipped, factors included "
                          f"({state['skipped_steps']} so far)", RuntimeWarning)
            return None
        for name, was_skipped in zip(self.names, skipped):
            if was_skipped:
                state["skipped_factor_updates"] += 1
                warnings.warn(f"MKOR: the {name} mean of the Linear layer with weight {tuple(weight.shape)} "
                              f"has NaN or inf entries (step {state['step']}); that factor's update is skipped "
                              f"({state['skipped_factor_updates']} so far)", RuntimeWarning)
        if broke:
            name = self.names[broken.index(True)]
            optimizer._fallback(layer, f"the {name} factor's Sherman-Morrison update broke down (v^T L^-1 v not "
                                       f"finite or negative)")
        state["step"] += 1
        if vanished and not broke:
            optimizer._fallback(layer, "the preconditioned gradient is not finite or vanished")
        direction = self.direction
        if broke or vanished:  # the plain gradient (its bias column is zero when the bias has none)
            direction = self.grad.clone() if self.grad is weight.grad else self.grad
        in_features = weight.shape[1]
        if layer.has_bias_column:
            bias_step = direction[:, in_features] if layer.bias is not None else None
            return direction[:, :in_features], bias_step
        return direction, None


class MKOR(torch.optim.Optimizer):
    """MKOR: SGD with momentum on ``L_g^-1 [G_W | g_b] L_a^-1`` for every Linear layer.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it must contain at least one ``torch.nn.Linear`` with a trainable
        weight.  All its trainable parameters are optimized (one parameter group);
        those outside Linear layers take plain SGD-momentum steps.  Hooks are registered
        on every such Linear (see :meth:`remove_hooks`).
    lr : float
        Learning rate (>= 0).
    momentum : float
        Heavy-ball momentum in ``[0, 1)`` (``torch.optim.SGD``'s, dampening 0) on the
        preconditioned step.
    beta : float
        Momentum (EMA factor) of the Kronecker factors, in ``(0, 1)``: ``L <- beta L +
        (1 - beta) v v^T``.  0 is excluded: ``L`` would be the singular ``v v^T``.
        Default 0.95 (the official code's ``stat_decay``).
    weight_decay : float
        L2 penalty added to the preconditioned step (as ``torch.optim.SGD``'s on the
        preconditioned gradient).
    update_freq : int
        Update the factors every ``update_freq`` steps (>= 1; the official ``inv_freq``);
        the inverses precondition every step.
    stabilization : float
        ``zeta`` in ``[0, 1)`` of the norm-based stabilizer (default 0.1).
    inverse_bound : float or None
        Blend the inverse toward the identity when its largest entry exceeds this (> 0;
        default 2.0, the official code's); None disables the stabilizer.
    rescale : bool
        Scale each layer's preconditioned step to its gradient's Frobenius norm (default True).
    factor_dtype : torch.dtype, optional
        float32 or float64 (default: float64 for float64 weights, else float32).

    Notes
    -----
    The hooks record inputs only while gradients are enabled (evaluation under
    ``torch.no_grad()`` leaves the statistics alone); everything recorded since the last
    step (several forward/backward passes, a layer called several times) is pooled.  A
    Linear whose forward is not called through its ``__call__`` (the output projection of
    ``nn.MultiheadAttention``) records nothing: its inverses stay the identity and its step
    is the (rescaled) plain gradient.  The output gradients are recorded by gradient hooks
    on the outputs, so in-place operations on them (``nn.ReLU(inplace=True)`` right after a
    Linear) are fine.

    ``state_dict()`` holds, per layer (under its weight), the two inverses
    (``"a_inverse"``, ``"g_inverse"``: matrix and scalar), the step count and the
    counters, plus the momentum buffers; ``load_state_dict`` restores them in this
    optimizer's factor dtype on the parameters' device.
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, momentum: float = 0.9, beta: float = 0.95,
                 weight_decay: float = 0.0, *, update_freq: int = 1, stabilization: float = 0.1,
                 inverse_bound: Optional[float] = 2.0, rescale: bool = True,
                 factor_dtype: Optional[torch.dtype] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MKOR: model must be a torch.nn.Module; got {type(model).__name__}")
        self.beta = require_number("MKOR", "beta", beta, 0.0, 1.0, low_open=True)
        self.update_freq = require_int("MKOR", "update_freq", update_freq)
        self.stabilization = require_number("MKOR", "stabilization", stabilization, 0.0, 1.0)
        if inverse_bound is not None:
            inverse_bound = require_number("MKOR", "inverse_bound", inverse_bound, 0.0, low_open=True)
        self.inverse_bound = inverse_bound
        if not isinstance(rescale, bool):
            raise TypeError(f"MKOR: rescale must be a bool; got {type(rescale).__name__}")
        self.rescale = rescale
        if factor_dtype not in (None, torch.float32, torch.float64):
            raise TypeError(f"MKOR: factor_dtype must be None, torch.float32 or torch.float64; got {factor_dtype}")
        self.factor_dtype = factor_dtype
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
        if not linears:
            found = sum(isinstance(m, nn.Linear) for m in model.modules())
            raise ValueError(f"MKOR: model must contain at least one torch.nn.Linear with a trainable weight; got "
                             f"{found} Linear layers ({found} frozen) in a {type(model).__name__}")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        # A layer with no inputs or no outputs has nothing to precondition (its factors would
        # be 0 x 0; the input hook's reshape failed): its empty parameters take the plain step.
        self._layers: List[_Layer] = [_Layer(m) for m in linears if m.weight.numel()]
        self._by_module = {id(layer.module): layer for layer in self._layers}
        self._handles = []
        self._register_hooks()

    # ------------------------------------------------------------------ copies
    # torch's Optimizer.__getstate__ keeps defaults, state and param_groups only: a deep copy
    # or an unpickled MKOR had no layers or settings (step() raised AttributeError).  The
    # settings and the layers (which hold their modules) now travel too, and the copy hooks
    # its layers' modules.  Copied together with the model (one deepcopy or pickle of both,
    # e.g. {"model": m, "optimizer": o}), those are the copied model's modules; copied alone,
    # the copy holds private copies of the modules and parameters, as any torch optimizer's.
    _SETTINGS = ("beta", "update_freq", "stabilization", "inverse_bound", "rescale", "factor_dtype", "_layers")
    _unusable: Optional[str] = None  # why step() cannot run (an incomplete unpickled optimizer)

    def __copy__(self):
        raise TypeError("MKOR: copy.copy would share the layers' captured statistics with this optimizer (both "
                        "hooks would record every forward into them); use copy.deepcopy, together with the model")

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._SETTINGS})
        state["_hooked"] = bool(self._handles)  # remove_hooks() before the copy: the copy has none either
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Also called by torch's load_state_dict with {"state", "param_groups"} alone: an update.
        copied = "defaults" in state
        missing = [name for name in self._SETTINGS if name not in state]
        if copied and missing:
            # Pickled by a version whose pickles dropped them (torch's __getstate__): the file
            # (and the model in it) still loads and state_dict() recovers the run; step() says how.
            super().__setstate__(state)
            self._layers, self._by_module, self._handles = [], {}, []
            self._unusable = (f"MKOR: this optimizer was unpickled from a version that did not save its layers and "
                              f"settings ({', '.join(missing)}); create a new MKOR on the model and load this "
                              f"one's state_dict()")
            return
        state = dict(state)
        hooked = state.pop("_hooked", False)
        super().__setstate__(state)
        if copied:
            self._by_module = {id(layer.module): layer for layer in self._layers}  # ids of the copied modules
            self._handles = []
            if hooked:
                self._register_hooks()

    # ------------------------------------------------------------------ hooks
    def _register_hooks(self) -> None:
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_pre_hook(_Hook(self, "_capture_input")))
            self._handles.append(layer.module.register_forward_hook(_Hook(self, "_watch_output")))

    def remove_hooks(self) -> None:
        """Remove the forward pre-hooks and forward hooks (idempotent); :meth:`step` then
        preconditions with the inverses as they are, without updating them."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers:
            layer.reset_capture()

    def _dtype(self, layer: _Layer) -> torch.dtype:
        return self.factor_dtype or accumulate_dtype(layer.weight.dtype)

    def _capturing(self, layer: _Layer) -> bool:
        return self.state[layer.weight].get("step", 0) % self.update_freq == 0

    def _capture_input(self, module: nn.Module, args) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return
        layer = self._by_module.get(id(module))
        if layer is None or not self._capturing(layer):
            return
        with torch.no_grad():
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            total = rows.sum(0, dtype=self._dtype(layer))
            layer.a_sum = total if layer.a_sum is None else layer.a_sum + total
            layer.a_rows += rows.shape[0]

    def _watch_output(self, module: nn.Module, args, output) -> None:
        """Forward hook: a gradient hook on the output records ``dL/dy`` (what a full
        backward hook gives, without wrapping the output in a backward-hook node: in a
        copy of the model, whose inert module backward hook still wrapped it, an
        ``nn.ReLU(inplace=True)`` after the Linear raised).  The tensor hook holds the
        optimizer weakly, as :class:`_Hook` does."""
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        layer = self._by_module.get(id(module))
        if layer is None or not self._capturing(layer):
            return
        output.register_hook(functools.partial(_record_grad_output, weakref.ref(self), layer))

    def _capture_grad_output(self, layer: _Layer, g: torch.Tensor) -> None:
        with torch.no_grad():
            total = g.detach().reshape(-1, g.shape[-1]).sum(0, dtype=self._dtype(layer))
            layer.g_sum = total if layer.g_sum is None else layer.g_sum + total

    # ------------------------------------------------------------------ settings
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, then the checks of every setting."""
        add_checked_group(self, super().add_param_group, param_group, _check_group)

    # ------------------------------------------------------------------ factors
    def _inverses(self, layer: _Layer):
        state = self.state[layer.weight]
        if "a_inverse" not in state:
            dtype, device = self._dtype(layer), layer.weight.device
            state["a_inverse"] = ShermanMorrisonInverse(layer.a_dim, dtype, device)
            state["g_inverse"] = ShermanMorrisonInverse(layer.module.out_features, dtype, device)
            state.setdefault("step", 0)
            for key in ("skipped_steps", "skipped_factor_updates", "fallbacks"):
                state.setdefault(key, 0)
        return state["a_inverse"], state["g_inverse"]

    def _fallback(self, layer: _Layer, why: str) -> None:
        state = self.state[layer.weight]
        state["a_inverse"].reset()
        state["g_inverse"].reset()
        state["fallbacks"] += 1
        warnings.warn(f"MKOR: {why} for the Linear layer with weight {tuple(layer.weight.shape)} (step "
                      f"{state['step']}); its inverse factors are reset to the identity and this step uses the plain "
                      f"gradient ({state['fallbacks']} fallbacks so far)", RuntimeWarning)

    def _update_factors(self, layer: _Layer, enabled: Optional[torch.Tensor] = None):
        """The captured means into the two inverses, where the bool tensor ``enabled``
        (default: always) holds; no host read.  Returns ``(broke, skipped, broken)``: bool
        tensors, ``broke`` whether an update broke down (the caller falls back), and per
        factor name whether its mean was not finite (that update skipped) and whether it
        broke down."""
        a_inverse, g_inverse = self._inverses(layer)
        broke = _false(layer.weight.device)
        skipped, broken = {}, {}
        for name, inverse, v in (("input", a_inverse, layer.a_mean()), ("output-gradient", g_inverse, layer.g_sum)):
            if v is None:
                continue
            # After a breakdown the layer falls back (both inverses reset): no later update.
            active = _not(broke) if enabled is None else enabled & _not(broke)
            applied = inverse.update_(v, self.beta, active)
            # The update refuses a non-finite v (v^T L^-1 v is then NaN or inf); a refusal
            # of a finite v is a breakdown.  (Read only after a refusal on the host.)
            finite = True if applied is True else _tensor_finite(v)
            skipped[name] = active & _not(finite)
            broken[name] = active & finite & _not(applied)
            broke = broke | broken[name]
            if self.inverse_bound is not None and applied is not False:
                inverse.blend_identity_(self.stabilization, applied & (inverse.max_entry_() > self.inverse_bound))
        return broke, skipped, broken

    # ------------------------------------------------------------------ step
    def _layer_direction(self, layer: _Layer) -> Optional[_Pending]:
        """One layer's factor updates and step direction (before momentum and weight decay),
        all on the device: the decisions that depend on values (a non-finite gradient skips
        the step, a breakdown falls back to the plain gradient) are tensors, resolved by
        :meth:`_directions`.  None when the weight has no gradient."""
        weight, bias = layer.weight, layer.bias
        a_inverse, g_inverse = self._inverses(layer)
        captured = layer.a_sum is not None or layer.g_sum is not None
        if weight.grad is None:
            layer.reset_capture()
            return None
        dtype = self._dtype(layer)
        out_features, in_features = weight.shape
        has_bias_grad = False
        if layer.has_bias_column:
            has_bias_grad = bias is not None and bias.grad is not None
            grad = torch.empty(out_features, in_features + 1, dtype=dtype, device=weight.device)
            grad[:, :in_features].copy_(weight.grad)
            if has_bias_grad:
                grad[:, in_features].copy_(bias.grad)
            else:
                grad[:, in_features].zero_()
        else:
            grad = weight.grad.to(dtype)
        # In the factor dtype, as the direction's norm: the rescale divides two norms of the
        # same (float32) accumulation, whose relative errors (~1e-5 at 1e6 entries) largely
        # cancel; a float64 norm of the gradient alone made the step 8x less accurate, and
        # costs a float64 copy.
        grad_norm = _scalar(torch.linalg.vector_norm(grad))
        # A finite norm means a finite gradient (on the host, no further pass); else, or on
        # a device, the extremes decide (a float32 sum of squares overflows for entries
        # beyond ~1e19).
        grad_ok = True if isinstance(grad_norm, float) and math.isfinite(grad_norm) else _tensor_finite(grad)
        if grad_ok is False:  # decided on the host: the step is skipped, nothing to compute
            layer.reset_capture()
            return _Pending(layer, None, grad, [False, False, False], {}, {})
        broke, skipped, broken = _false(grad.device), {}, {}
        if captured:
            broke, skipped, broken = self._update_factors(layer, grad_ok)
            layer.reset_capture()
        direction = torch.mm(torch.mm(g_inverse.matrix, grad), a_inverse.matrix)
        norm = _scalar(torch.linalg.vector_norm(direction))
        # A finite gradient whose norm overflowed cannot be rescaled: the plain gradient.
        vanished = _not(_finite(norm)) | _not(_finite(grad_norm)) | ((norm == 0.0) & (grad_norm > 0.0))
        direction.mul_(_ratio(grad_norm, norm) if self.rescale else g_inverse.scale * a_inverse.scale)
        return _Pending(layer, direction, grad, [grad_ok, broke, vanished], skipped, broken)

    def _directions(self, others: Sequence[torch.Tensor] = ()):
        """Per parameter of a Linear layer: its preconditioned step, or None (skipped); and
        per tensor of ``others`` (gradients outside the Linear layers) whether it is
        finite.  The only host read of a step: every layer's flags and the others' sums,
        one tensor per device."""
        pending = [self._layer_direction(layer) for layer in self._layers]
        flags: Dict[torch.device, List[torch.Tensor]] = {}
        for entry in pending:
            if entry is not None:
                entry.flag_at = len(flags.setdefault(entry.device, []))
                flags[entry.device] += entry.flags
        other_at = []
        for tensor in others:
            # The sum: one reduction, no temporary of the tensor's size (see _finite); a
            # non-finite sum is told apart from a finite overflow by all_finite, rarely.
            other_at.append((tensor.device, len(flags.setdefault(tensor.device, []))))
            flags[tensor.device].append(_scalar(torch.isfinite(tensor.sum())))
        # Python bools already on the host; elsewhere one stacked tensor, one read.
        read = {device: (values if _on_host(device) else torch.stack(values).tolist())
                for device, values in flags.items()}
        directions: Dict[torch.Tensor, Optional[torch.Tensor]] = {}
        for layer, entry in zip(self._layers, pending):
            result = None if entry is None else entry.resolve(self, read[entry.device])
            directions[layer.weight] = None if result is None else result[0]
            if layer.bias is not None:
                directions[layer.bias] = None if result is None else result[1]
        finite = [read[device][at] or all_finite(tensor) for tensor, (device, at) in zip(others, other_at)]
        return directions, finite

    @torch.no_grad()
    def precondition(self) -> None:
        """Update the factors from what the hooks captured and replace the ``.grad`` of every
        Linear layer's weight and bias by the preconditioned (and rescaled) gradient; a
        layer whose step is skipped (non-finite gradient) keeps its gradient.  For use
        with another optimizer's ``step()`` (not together with :meth:`step`, which does
        the same and would precondition twice)."""
        for p, direction in self._directions()[0].items():
            if direction is not None and p.grad is not None:
                p.grad.copy_(direction)

    # torch.amp.GradScaler hands its scale and inf check to step() (as for torch's fused
    # optimizers) instead of unscaling .grad itself: the output-gradient statistics the hooks
    # record are loss-scaled too, and only step() can unscale them (with the scale, the
    # factor update saw S v: parameters 0.1 off a run without the scaler), and a skipped
    # step must drop what was recorded (its inf sums spoiled the next step's update).
    _step_supports_amp_scaling = True

    def _take_amp_scaling(self) -> bool:
        """Applies a GradScaler's ``found_inf`` / ``grad_scale`` (set on the optimizer just
        before :meth:`step`); False for a skipped step (the records are dropped)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return True
        grad_scale = getattr(self, "grad_scale", None)
        if bool(found_inf):
            for layer in self._layers:
                layer.reset_capture()
            return False
        if grad_scale is None:  # the user called scaler.unscale_(optimizer): .grad is unscaled, the records not
            warnings.warn("MKOR: scaler.unscale_(optimizer) before scaler.step leaves MKOR's output-gradient "
                          "statistics loss-scaled (the scale is not handed over then); call scaler.step without "
                          "unscale_ (MKOR unscales itself), or use bf16 autocast, which needs no GradScaler",
                          RuntimeWarning)
            return True
        inverse = grad_scale.double().reciprocal()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inverse.to(p.grad.dtype))
        for layer in self._layers:
            if layer.g_sum is not None:
                layer.g_sum = layer.g_sum * inverse.to(layer.g_sum.dtype)
        return True

    # Not traced by torch.compile: from its second call a compiled step computed the later
    # layers' directions with the first layer's shapes (dynamo's frames for the per-layer
    # loop, resumed after the host reads, with automatically dynamic sizes): parameters
    # 0.07 off eager after 4 steps when the shapes happened to agree, a shape error when
    # not.  The step is per-layer small work and host reads (graph breaks) anyway.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Factor updates, preconditioning, then ``torch.optim.SGD``'s step (momentum,
        weight decay) on the preconditioned gradients; ``closure`` re-evaluates the loss
        (with grad; its forward and backward are what the hooks record).  Runs eagerly
        under ``torch.compile`` (see the comment above)."""
        if self._unusable:
            raise RuntimeError(self._unusable)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lrs = [current_lr("MKOR", group) for group in self.param_groups]  # before any state changes
        if not self._take_amp_scaling():
            return loss  # torch.amp.GradScaler found inf or NaN: a skipped step
        params = [p for group in self.param_groups for p in group["params"]]
        linear = {p for layer in self._layers for p in (layer.weight, layer.bias) if p is not None}
        others = [p for p in params if p.grad is not None and p not in linear]
        directions, finite = self._directions([p.grad for p in others])
        self._sgd_steps(lrs, directions, dict(zip(others, finite)))
        return loss

    def _sgd_steps(self, lrs: List[float], directions: Dict, others_finite: Dict) -> None:
        """torch.optim.SGD's update (weight decay, momentum) on the preconditioned directions."""
        for group, lr in zip(self.param_groups, lrs):
            momentum, weight_decay = group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p in directions:
                    d = directions[p]
                    if d is None:  # skipped: a non-finite gradient
                        continue
                    d = d.to(p.dtype)
                else:
                    d = p.grad
                    if not others_finite[p]:
                        state = self.state[p]
                        state["skipped_steps"] = state.get("skipped_steps", 0) + 1
                        warnings.warn(f"MKOR: the gradient of a parameter of shape {tuple(p.shape)} has NaN or inf "
                                      f"entries; its step is skipped ({state['skipped_steps']} so far)", RuntimeWarning)
                        continue
                if weight_decay != 0:
                    d = d.add(p, alpha=weight_decay)
                if momentum > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        state_dict = super().state_dict()
        # The packed state shares its per-parameter dicts with self.state: copy before replacing.
        state_dict["state"] = {
            index: {key: (value.state_dict() if isinstance(value, ShermanMorrisonInverse) else value)
                    for key, value in entry.items()}
            for index, entry in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # The inverses take this optimizer's factor dtype (float64 factors of float32 weights
        # with factor_dtype=torch.float64), not the parameter's: take them out before the base
        # class casts state tensors to the parameter's dtype.  Their sizes are checked first
        # (another model's state loaded, and the step failed in ShermanMorrisonInverse.update).
        kept = ("a_inverse", "g_inverse")
        own = {index: {key: entry[key] for key in kept if key in entry} for index, entry in state_dict["state"].items()}
        params = [p for group in self.param_groups for p in group["params"]]
        layers = {id(layer.weight): layer for layer in self._layers}
        if sum(len(group["params"]) for group in state_dict["param_groups"]) != len(params):
            own = {}  # (the base class refuses the groups, naming them)
        for index, entry in own.items():
            layer = layers.get(id(params[index])) if 0 <= index < len(params) else None
            for key, value in entry.items():
                size = None if layer is None else layer.a_dim if key == "a_inverse" else layer.module.out_features
                got = tuple(value["matrix"].shape)
                if size is not None and got != (size, size):
                    raise ValueError(f"MKOR.load_state_dict: state {index} holds {key} of shape {got}; the Linear "
                                     f"layer with weight {tuple(layer.weight.shape)} needs ({size}, {size}) (the "
                                     "state of another model?)")
        stripped = dict(state_dict)
        stripped["state"] = {index: {key: value for key, value in entry.items() if key not in kept}
                             for index, entry in state_dict["state"].items()}
        super().load_state_dict(stripped)
        for index, entry in own.items():
            param, layer = params[index], layers.get(id(params[index]))
            dtype = None if layer is None else self._dtype(layer)
            for key, value in entry.items():
                self.state[param][key] = ShermanMorrisonInverse.from_state_dict(value, device=param.device, dtype=dtype)


def _check_group(group: Dict[str, Any]) -> None:
    group["lr"] = check_lr("MKOR", group["lr"])
    group["momentum"] = require_number("MKOR", "momentum", group["momentum"], 0.0, 1.0)
    group["weight_decay"] = require_number("MKOR", "weight_decay", group["weight_decay"], 0.0)
    require_real_params("MKOR", group)
