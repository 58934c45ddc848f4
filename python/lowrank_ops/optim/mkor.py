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
  gradient), the layer's two inverses are reset to the identity and its step is the plain
  gradient; ``state[weight]["fallbacks"]`` counts it and a ``RuntimeWarning`` says so.
* Non-finite inputs: captured means with NaN or inf entries skip that factor's update
  (``state[weight]["skipped_factor_updates"]``); a non-finite gradient of a layer skips the
  layer's whole step (factors, momentum and parameters stay as they were, as
  ``torch.amp.GradScaler`` skips a step; ``state[weight]["skipped_steps"]``), and so does
  that of a parameter outside the Linear layers (``state[p]["skipped_steps"]``).  All warn.

Devices.  The factors live on their layer's device (``load_state_dict`` moves them to
the parameter's, so a state saved on one device and loaded with ``map_location`` on
another works).  The decisions above are Python branches on scalars, so on CUDA a step
reads a few scalars per layer to the host: the gradient norm and the preconditioned
step's norm, and per factor update ``v^T L^-1 v`` (the validity test) and, with
``inverse_bound``, the largest diagonal entry (6 reads per layer on an updating step, 2
otherwise; a mean's finiteness is read only after an update refused it).  Each read
waits for the layer's queued kernels; for layers of a few hundred features or more the
``O(d^2)`` passes and the GEMMs dominate, for tiny layers the latency does.

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
        loss.backward()               # full backward hooks record the output-gradient sums
        optimizer.step()              # factor updates, preconditioning, SGD-momentum step
    optimizer.remove_hooks()          # when done (the hooks hold the optimizer alive)

To use another optimizer on the preconditioned gradients, call
``optimizer.precondition()`` (it writes them into the Linear layers' ``.grad``) and then
that optimizer's ``step()``, instead of ``optimizer.step()``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .._args import require_int, require_number
from .._dtypes import accumulate_dtype
from .._finite import all_finite
from ._checks import add_checked_group

__all__ = ["MKOR", "ShermanMorrisonInverse"]

# The scalar s of L^-1 = s M grows by 1/beta per update while M = L^-1 / s shrinks; s is
# folded into M (one pass, every ~360 updates at beta = 0.95 unless the stabilizer resets
# it first) long before M's entries could approach float32's underflow range.
_SCALE_FOLD = 1e8


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
        ``M``, symmetric; ``scale`` (a Python float) the scalar ``s``.
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device=None):
        dim = require_int("ShermanMorrisonInverse", "dim", dim)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ShermanMorrisonInverse: dtype must be torch.float32 or torch.float64; got {dtype}")
        self.matrix = torch.eye(dim, dtype=dtype, device=device)
        self.scale = 1.0
        self._u = torch.empty(dim, dtype=dtype, device=device)  # the GEMV's preallocated output

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def dense(self) -> torch.Tensor:
        """``L^-1 [d, d]`` as a new tensor (``scale * matrix``)."""
        return self.matrix * self.scale

    def max_entry(self) -> float:
        """The largest entry of ``L^-1`` in absolute value: its largest diagonal entry, as
        for every symmetric positive definite matrix (``d`` reads)."""
        return self.scale * float(self.matrix.diagonal().max())

    def update(self, v: torch.Tensor, beta: float) -> bool:
        """``L^-1 <- (beta L + (1 - beta) v v^T)^-1`` in place: one GEMV and one symmetric
        rank-1 update (``O(d^2)``; ``u`` is a preallocated buffer).

        ``v [d]`` is any float tensor (converted to ``matrix``'s dtype); ``beta`` in
        ``(0, 1)``.  Returns False, leaving the inverse unchanged, when the update is
        undefined: ``v^T L^-1 v`` not finite (as for every ``v`` with a NaN or inf entry:
        ``u`` then has one too), or so negative (the kept inverse lost its definiteness to
        rounding) that ``1 + alpha v^T L^-1 v <= 0``.  On CUDA it reads one scalar to the
        host (the validity test).
        """
        if v.shape != (self.dim,):
            raise ValueError(f"ShermanMorrisonInverse.update: v must have shape ({self.dim},); got {tuple(v.shape)}")
        v = v.to(self.matrix.dtype)
        u = torch.mv(self.matrix, v, out=self._u)  # M v; u = s M v = L^-1 v
        quad = self.scale * float(torch.dot(v.double(), u.double()))  # v^T L^-1 v, summed in float64
        alpha = (1.0 - beta) / beta
        denominator = 1.0 + alpha * quad
        if not math.isfinite(denominator) or denominator <= 0.0:
            return False
        c = alpha / denominator
        # (1/beta)(sM - c s^2 M v v^T M) = (s/beta)(M - w w^T), w = sqrt(c s) M v: one pass
        # over M.  Not BLAS ger (addr_): it rounds entries (i, j) and (j, i) differently
        # (alpha u_j first, or FMA in some lanes only), and the recursion multiplies an
        # antisymmetric error by up to 1/beta per update (it is stable only for symmetric
        # ones): beta = 0.5, d = 7, float64, measured 1e-16 -> 1 relative in 55 updates.
        # With w_i w_j = w_j w_i and the factor -1 exact, addcmul_ keeps M exactly symmetric.
        u.mul_(math.sqrt(c * self.scale))
        self.matrix.addcmul_(u[:, None], u[None, :], value=-1.0)
        self.scale /= beta
        if self.scale > _SCALE_FOLD:
            self.fold()
        return True

    def fold(self) -> None:
        """Multiply ``scale`` into ``matrix`` (one pass); ``scale`` becomes 1."""
        self.matrix.mul_(self.scale)
        self.scale = 1.0

    def blend_identity(self, weight: float) -> None:
        """``L^-1 <- (1 - weight) L^-1 + weight I`` (the norm-based stabilizer)."""
        self.matrix.mul_(self.scale * (1.0 - weight))
        self.matrix.diagonal().add_(weight)
        self.scale = 1.0

    def reset(self) -> None:
        """Back to ``L = I``."""
        self.matrix.zero_().diagonal().fill_(1.0)
        self.scale = 1.0

    def state_dict(self) -> Dict[str, Any]:
        return {"matrix": self.matrix, "scale": self.scale}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any], device=None) -> "ShermanMorrisonInverse":
        matrix = state["matrix"]
        inverse = cls(matrix.shape[0], matrix.dtype, device=device if device is not None else matrix.device)
        inverse.matrix.copy_(matrix)
        inverse.scale = float(state["scale"])
        return inverse


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
    is the (rescaled) plain gradient.  Full backward hooks do not allow in-place operations
    on the layer's output (``nn.ReLU(inplace=True)`` right after a Linear raises in
    backward); use out-of-place activations.

    ``state_dict()`` holds, per layer (under its weight), the two inverses
    (``"a_inverse"``, ``"g_inverse"``: matrix and scalar), the step count and the
    counters, plus the momentum buffers; ``load_state_dict`` restores them in their own
    dtype on the parameters' device.
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
        self._layers: List[_Layer] = [_Layer(m) for m in linears]
        self._by_module = {id(layer.module): layer for layer in self._layers}
        self._handles = []
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_pre_hook(self._capture_input))
            self._handles.append(layer.module.register_full_backward_hook(self._capture_grad_output))

    # ------------------------------------------------------------------ hooks
    def remove_hooks(self) -> None:
        """Remove the forward pre-hooks and backward hooks (idempotent); :meth:`step` then
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
        layer = self._by_module[id(module)]
        if not self._capturing(layer):
            return
        with torch.no_grad():
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            total = rows.sum(0, dtype=self._dtype(layer))
            layer.a_sum = total if layer.a_sum is None else layer.a_sum + total
            layer.a_rows += rows.shape[0]

    def _capture_grad_output(self, module: nn.Module, grad_input, grad_output) -> None:
        g = grad_output[0] if grad_output else None
        if g is None:
            return
        layer = self._by_module[id(module)]
        if not self._capturing(layer):
            return
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

    def _update_factors(self, layer: _Layer) -> bool:
        """The captured means into the two inverses; False when one broke (fallback)."""
        state = self.state[layer.weight]
        a_inverse, g_inverse = self._inverses(layer)
        for name, inverse, v in (("input", a_inverse, layer.a_mean()), ("output-gradient", g_inverse, layer.g_sum)):
            if v is None:
                continue
            # The update itself refuses a non-finite v (v^T L^-1 v is then NaN or inf) and
            # leaves the inverse as it was, so v's finiteness is read only when it refused:
            # one host read per factor on CUDA instead of two.
            if not inverse.update(v, self.beta):
                if not all_finite(v):
                    state["skipped_factor_updates"] += 1
                    warnings.warn(f"MKOR: the {name} mean of the Linear layer with weight {tuple(layer.weight.shape)} "
                                  f"has NaN or inf entries (step {state['step']}); that factor's update is skipped "
                                  f"({state['skipped_factor_updates']} so far)", RuntimeWarning)
                    continue
                self._fallback(layer, f"the {name} factor's Sherman-Morrison update broke down (v^T L^-1 v not "
                                      f"finite or negative)")
                return False
            if self.inverse_bound is not None and inverse.max_entry() > self.inverse_bound:
                inverse.blend_identity(self.stabilization)
        return True

    # ------------------------------------------------------------------ step
    def _layer_direction(self, layer: _Layer):
        """``(weight step, bias step or None)`` of one layer (before momentum and weight
        decay), or None when its step is skipped (a non-finite gradient)."""
        weight, bias = layer.weight, layer.bias
        state = self.state[weight]
        a_inverse, g_inverse = self._inverses(layer)
        captured = layer.a_sum is not None or layer.g_sum is not None
        if weight.grad is None:
            layer.reset_capture()
            return None
        dtype = self._dtype(layer)
        out_features, in_features = weight.shape
        bias_grad = None
        if layer.has_bias_column:
            bias_grad = bias.grad if bias is not None and bias.grad is not None else None
            grad = torch.empty(out_features, in_features + 1, dtype=dtype, device=weight.device)
            grad[:, :in_features].copy_(weight.grad)
            if bias_grad is not None:
                grad[:, in_features].copy_(bias_grad)
            else:
                grad[:, in_features].zero_()
        else:
            grad = weight.grad.to(dtype)
        grad_norm = float(torch.linalg.vector_norm(grad))
        if not math.isfinite(grad_norm) and all_finite(grad):  # float32 overflow of the sum of squares
            grad_norm = float(torch.linalg.vector_norm(grad.double()))
        if not math.isfinite(grad_norm):
            layer.reset_capture()
            state["skipped_steps"] += 1
            warnings.warn(f"MKOR: the gradient of the Linear layer with weight {tuple(weight.shape)} has NaN or inf "
                          f"entries (step {state['step']}); its step is skipped, factors included "
                          f"({state['skipped_steps']} so far)", RuntimeWarning)
            return None
        ok = True
        if captured:
            ok = self._update_factors(layer)
            layer.reset_capture()
        state["step"] += 1
        if ok:
            direction = torch.mm(torch.mm(g_inverse.matrix, grad), a_inverse.matrix)
            norm = float(torch.linalg.vector_norm(direction))
            if not math.isfinite(norm) or (norm == 0.0 and grad_norm > 0.0):
                self._fallback(layer, "the preconditioned gradient is not finite or vanished")
                ok = False
            elif self.rescale:
                direction.mul_(grad_norm / norm if norm > 0.0 else 0.0)
            else:
                direction.mul_(g_inverse.scale * a_inverse.scale)
        if not ok:  # the plain gradient
            direction = grad.clone() if grad is weight.grad else grad
            if layer.has_bias_column and bias_grad is None:
                direction[:, in_features].zero_()
        if layer.has_bias_column:
            return direction[:, :in_features], (direction[:, in_features] if bias is not None else None)
        return direction, None

    def _directions(self) -> Dict[torch.Tensor, Optional[torch.Tensor]]:
        """Per parameter of a Linear layer: its preconditioned step, or None (skipped)."""
        directions: Dict[torch.Tensor, Optional[torch.Tensor]] = {}
        for layer in self._layers:
            result = self._layer_direction(layer)
            directions[layer.weight] = None if result is None else result[0]
            if layer.bias is not None:
                directions[layer.bias] = None if result is None else result[1]
        return directions

    @torch.no_grad()
    def precondition(self) -> None:
        """Update the factors from what the hooks captured and replace the ``.grad`` of every
        Linear layer's weight and bias by the preconditioned (and rescaled) gradient; a
        layer whose step is skipped (non-finite gradient) keeps its gradient.  For use
        with another optimizer's ``step()`` (not together with :meth:`step`, which does
        the same and would precondition twice)."""
        for p, direction in self._directions().items():
            if direction is not None and p.grad is not None:
                p.grad.copy_(direction)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Factor updates, preconditioning, then ``torch.optim.SGD``'s step (momentum,
        weight decay) on the preconditioned gradients; ``closure`` re-evaluates the loss
        (with grad; its forward and backward are what the hooks record)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        directions = self._directions()
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
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
                    if not all_finite(d):
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
        return loss

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
        # The inverses keep their own dtype (float64 factors of float32 weights): take them
        # out before the base class casts state tensors to the parameter's dtype.
        kept = ("a_inverse", "g_inverse")
        own = {index: {key: entry[key] for key in kept if key in entry} for index, entry in state_dict["state"].items()}
        stripped = dict(state_dict)
        stripped["state"] = {index: {key: value for key, value in entry.items() if key not in kept}
                             for index, entry in state_dict["state"].items()}
        super().load_state_dict(stripped)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in own.items():
            param = params[index]
            for key, value in entry.items():
                self.state[param][key] = ShermanMorrisonInverse.from_state_dict(value, device=param.device)


def _check_group(group: Dict[str, Any]) -> None:
    group["lr"] = require_number("MKOR", "lr", group["lr"], 0.0)
    group["momentum"] = require_number("MKOR", "momentum", group["momentum"], 0.0, 1.0)
    group["weight_decay"] = require_number("MKOR", "weight_decay", group["weight_decay"], 0.0)
