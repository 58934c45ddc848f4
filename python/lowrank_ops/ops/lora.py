"""Fused low-rank adapter linear (LoRA, rsLoRA, DyLoRA rank truncation, SoRA gate) and merge.

``y = x W^T + b + s * ((D(x) A^T) * g) B^T``

Layers:

* ``torch.ops.lowrank_ops.lora_dropout``: ``D(x) = x * keep / (1 - p)`` with the keep
  mask drawn from a seed, so backward regenerates the mask instead of saving it.
* ``torch.ops.lowrank_ops.lora_linear_fwd``: the forward, returning ``y`` and the small
  ``u = D(x) A^T`` (``[N, r]``) that backward reuses.
* ``_LoRALinear``: the autograd Function; backward composes torch GEMMs.
* :func:`lora_linear`, :func:`lora_merge`, :func:`lora_unmerge`: validated entry points.

Implementation choice.  The op is GEMM-dominated: per call ``2 N in out`` flops for the
base against ``2 N r (in + out)`` for the adapter (r = 16 at 4096 x 4096: 0.8 % of the
work).  The adapter's GEMMs are composed torch ops, arranged to save traffic and
temporaries: the base product is written straight into ``y`` (bias included), the
adapter's expand is accumulated into the same buffer (``addmm_``, no second ``[N, out]``
tensor; float32 adapters on a half weight excepted, see ``_addmm_adapter_``), and the
scale and the gate are folded into the small ``[N, r]`` intermediate.  Backward saves
``x``, the frozen weight (a reference, not a copy), the factors and ``u``; never an
``[N, out]`` tensor.

The base products (``x W^T + b`` forward, ``dy W`` backward) are
:mod:`~lowrank_ops.ops.base_linear`'s: BLAS, or hand-written small-batch kernels for
float32 batches of a few to 32 rows on AVX-512 CPUs and weights of 4M+ elements (up to
2.2x MKL there).

Dropout (``dropout_p > 0``) applies to the adapter input only.  The mask is drawn from an
int64 seed, itself drawn from ``generator`` (or torch's default generator): the same
generator state gives the same mask, and backward redraws the mask from the seed, so
nothing of size ``[N, in]`` is saved for it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .._args import is_integer, is_real_number, require_finite_number, require_generator_type
from .._autocast import autocast_entry, autocast_off_backward
from .._dtypes import float_code
from .._finite import all_finite
from .._first_order import first_order_only
from ._layout import flatten_rows, require_apart
from ._library import (LIBRARY, checked_impl, composed_path, eager_or_op, in_functorch_transform, register_fake,
                       values_readable)
from .base_linear import _base_linear, grad_input_op

__all__ = ["lora_linear", "lora_merge", "lora_unmerge", "draw_seed"]

LIBRARY.define("lora_dropout(Tensor x, Tensor seed, float p) -> Tensor")
LIBRARY.define(
    "lora_linear_fwd(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, Tensor? gate, "
    "Tensor? seed, float scale, float dropout_p, Tensor? scale_tensor=None) -> (Tensor, Tensor)"
)  # scale_tensor (0-d), when given, replaces scale: a tensor scale changes without recompiling

_SEED_HIGH = 2**62


# ---------------------------------------------------------------------------- dropout
def draw_seed(generator: Optional[torch.Generator] = None, op: str = "dropout") -> torch.Tensor:
    """A fresh int64 dropout seed (0-d CPU tensor) drawn from ``generator`` or torch's default one.

    A generator on another device (a CUDA one) draws there and the seed is read back: one
    device-to-host copy (a wait for the queued work); a CPU generator costs none.  An
    explicit generator inside a backward pass raises (:func:`refuse_replay`)."""
    require_generator_type(op, "generator", generator)
    refuse_replay(op, generator, "dropout mask")
    if generator is None or generator.device.type == "cpu":
        return torch.randint(0, _SEED_HIGH, (), generator=generator, dtype=torch.int64)
    return torch.randint(0, _SEED_HIGH, (), generator=generator, dtype=torch.int64, device=generator.device).cpu()


def refuse_replay(op: str, generator: Optional[torch.Generator], what: str) -> None:
    """RuntimeError for a draw from an explicit, non-default ``generator`` inside a backward
    pass: typically the forward being recomputed by activation checkpointing
    (``torch.utils.checkpoint``, either mode), which replays torch's default generators
    only.  Such a generator has moved on, so the recomputation would draw another ``what``
    than the forward did: gradients of another function, silently (0.88 relative off for
    lora_linear's dropout).  torch's default generators (passed explicitly or as None)
    are replayed, and pass."""
    if generator is None or torch._C._current_graph_task_id() == -1:
        return
    if generator is torch.default_generator or (
            generator.device.type == "cuda" and any(generator is g for g in torch.cuda.default_generators)):
        return
    raise RuntimeError(
        f"{op}: a {what} drawn from an explicit generator inside a backward pass (e.g. activation checkpointing "
        f"recomputing the forward: torch.utils.checkpoint replays only torch's default generators, so the "
        f"recomputation would draw another {what} than the forward and give wrong gradients); use generator=None "
        f"(torch's default generator, which checkpointing replays) for such calls, or draw outside the backward pass"
    )


def _lora_dropout(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    if p == 0.0:
        return x.clone()
    # A private generator seeded per call: the mask depends only on (seed, shape, device),
    # so forward and backward draw the same one.
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep * (1.0 / (1.0 - p))


def _lora_dropout_fake(x, seed, p):
    return torch.empty_like(x)


def check_seed(op: str, seed, dropout_p: float = 0.0) -> None:
    """A dropout seed: a 0-d int64 CPU tensor (what :func:`draw_seed` returns), for direct
    callers of the ops (a float seed was truncated, a [2] one raised torch's "only one
    element tensors can be converted"); required when ``dropout_p > 0`` (without one the
    ops applied no dropout, silently)."""
    if seed is None:
        if dropout_p > 0.0:
            raise ValueError(f"{op}: dropout_p = {dropout_p} needs a seed (ops.lora.draw_seed(generator)); got None")
        return
    if not isinstance(seed, torch.Tensor) or seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
        what = (f"{seed.dtype} {tuple(seed.shape)} on {seed.device}" if isinstance(seed, torch.Tensor)
                else type(seed).__name__)
        raise ValueError(f"{op}: seed must be a 0-d int64 CPU tensor; got {what}")


def _check_dropout_op(x, seed, p) -> None:
    check_dropout("lora_dropout", p)
    _check_tensor("lora_dropout", "x", x, (torch.float32, torch.float64, torch.float16, torch.bfloat16), x.device)
    check_seed("lora_dropout", seed)


for _device in ("CPU", "CUDA"):
    LIBRARY.impl("lora_dropout", checked_impl(_check_dropout_op, _lora_dropout), _device)
register_fake("lora_dropout", _lora_dropout_fake)


def _adapter_input(x: torch.Tensor, seed: Optional[torch.Tensor], p: float) -> torch.Tensor:
    return x if seed is None or p == 0.0 else torch.ops.lowrank_ops.lora_dropout(x, seed, p)


def _gate_scale(gate: Optional[torch.Tensor], scale):
    """The per-rank factor ``s * g`` (a tensor) or ``s`` (a float or 0-d tensor) when there is no gate."""
    return scale if gate is None else gate * scale


def _widened_products(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a * b`` elementwise in ``dtype`` where the factors are narrower (half: a product past
    65504 is inf before any wider sum), else in their own dtype."""
    if torch.finfo(a.dtype).bits < torch.finfo(dtype).bits:
        return a.to(dtype).mul_(b)
    return a * b


def _addmm_adapter_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``out += left @ right`` in place, for the adapter's expand or its input gradient.

    ``left`` [N, r] and ``right`` [r, M] are in the adapters' dtype.  With float32 adapters
    on a half ``out`` the product stays float32 and is added elementwise, rounding ``out``
    once, as PEFT does.  A half ``addmm_`` measured 2.2x that composition's error in
    bfloat16 on an H100 (tests/test_lora.py), with the factors rounded to bfloat16 and also
    with each split into a bfloat16 hi + lo pair (on the CPU the split matched it exactly;
    the GPU's extra error was not isolated), so the float32 ``[N, M]`` temporary is paid,
    in this case only.
    """
    if out.dtype.itemsize >= left.dtype.itemsize:  # same dtype, or float32 adapters on float64
        return out.addmm_(left.to(out.dtype), right.to(out.dtype))
    return out.add_(left @ right)


# ---------------------------------------------------------------------------- forward
def _lora_linear_fwd(x, weight, lora_A, lora_B, bias, gate, seed, scale, dropout_p, scale_tensor=None):
    if scale_tensor is not None:
        scale = scale_tensor
    adapter_input = _adapter_input(x, seed, dropout_p)
    shrunk = adapter_input.to(lora_A.dtype) @ lora_A.T  # u = D(x) A^T, [N, r], in the adapters' dtype
    scaled = shrunk * _gate_scale(gate, scale)  # s * (u * g): the scale rides on the small tensor
    y = _base_linear(x, weight, bias)  # inside the op implementation: the kernel directly
    _addmm_adapter_(y, scaled, lora_B.T)  # in place: no second [N, out] tensor
    return y, shrunk


def _lora_linear_fwd_fake(x, weight, lora_A, lora_B, bias, gate, seed, scale, dropout_p, scale_tensor=None):
    _check_fwd_tensors(x, weight, lora_A, lora_B, bias, gate)  # shapes at trace time, as the op's own check
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype)


def _check_fwd_tensors(x, weight, lora_A, lora_B, bias, gate) -> None:
    op = "lora_linear_fwd"
    check_adapter(op, x, weight, lora_A, lora_B, bias, gate)
    if x.dim() != 2:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; expected 2-D (N, in_features)")


def _check_fwd_scalars(x, weight, lora_A, lora_B, bias, gate, seed, scale, dropout_p, scale_tensor=None) -> None:
    """:func:`lora_linear`'s checks, for direct callers of the op (torch's own errors, or
    integer adapters and a broadcast [N, r] gate accepted, silently, before)."""
    op = "lora_linear_fwd"
    _check_number(op, "scale", scale)
    check_dropout(op, dropout_p)
    _check_fwd_tensors(x, weight, lora_A, lora_B, bias, gate)
    check_scale_range(op, scale, lora_A.dtype, "adapters")
    check_seed(op, seed, dropout_p)
    if scale_tensor is not None:
        check_scale(op, scale_tensor, x.device)


for _device in ("CPU", "CUDA"):
    LIBRARY.impl("lora_linear_fwd", checked_impl(_check_fwd_scalars, _lora_linear_fwd), _device)
register_fake("lora_linear_fwd", _lora_linear_fwd_fake)


def _forward_op():
    """The forward: the registered op under torch.compile, else its implementation (eager_or_op)."""
    return eager_or_op("lora_linear_fwd", _lora_linear_fwd)


# ---------------------------------------------------------------------------- autograd
class _LoRALinear(torch.autograd.Function):
    """Autograd of ``y = x W^T + b + s ((D(x) A^T) g) B^T`` with x ``[N, in]``.

    Backward, with ``u = D(x) A^T`` (saved) and ``h = dy B``:
    ``dB = s dy^T (u g)``, ``dA = s (h g)^T D(x)``, ``dg = s sum_n h u``,
    ``dx = dy W + s D'((h g) A)``; ``dW = dy^T x`` and ``db = sum_n dy`` only when asked
    (the weight is normally frozen).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, gate, seed, scale, dropout_p, scale_tensor):
        y, shrunk = _forward_op()(x, weight, lora_A, lora_B, bias, gate, seed, scale, dropout_p, scale_tensor)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.save_for_backward(x, weight, lora_A, lora_B, gate, seed, shrunk, scale_tensor)
        return y

    @staticmethod
    @first_order_only
    @autocast_off_backward
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, gate, seed, shrunk, scale_tensor = ctx.saved_tensors
        need_x, need_W, need_A, need_B, need_bias, need_gate = ctx.needs_input_grad[:6]
        scale, p = ctx.scale if scale_tensor is None else scale_tensor, ctx.dropout_p
        dtype, adapter_dtype = x.dtype, lora_A.dtype
        factor = _gate_scale(gate, scale)
        grad_x = grad_W = grad_A = grad_B = grad_bias = grad_gate = None
        grad_y_adapter = grad_y.to(adapter_dtype)
        if need_B:
            # (u^T dy)^T, not dy^T u: the same sums, but MKL reads dy along its rows (1024 x 1024,
            # N = 128, r = 16: 31 against 51 us); autograd lays the transposed view out as lora_B.
            grad_B = ((shrunk * factor).T @ grad_y_adapter).T
        if need_x or need_A or need_gate:
            expanded = grad_y_adapter @ lora_B  # h = dy B, [N, r]
            if need_gate:  # products in float32 for half factors (+-1.2e5 cancelling gave NaN)
                grad_gate = _widened_products(expanded, shrunk).sum(0).mul_(scale).to(gate.dtype)
            expanded = expanded * factor  # h g s
            if need_A:
                grad_A = expanded.T @ _adapter_input(x, seed, p).to(adapter_dtype)
            if need_x:
                grad_x = grad_input_op()(grad_y, weight)
                if seed is None or p == 0.0:
                    _addmm_adapter_(grad_x, expanded, lora_A)
                else:  # D' is D (same mask, same 1 / (1 - p))
                    grad_x += _adapter_input((expanded @ lora_A).to(dtype), seed, p)
        if need_W:
            grad_W = grad_y.T @ x
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_W, grad_A, grad_B, grad_bias, grad_gate, None, None, None, None


# ---------------------------------------------------------------------------- validation
def _check_tensor(op: str, name: str, tensor, dtypes, device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor; got {type(tensor).__name__}")
    float_code(tensor.dtype, op, name)
    if tensor.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dict.fromkeys(dtypes))
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; expected {wanted}")
    if tensor.device != device:
        raise ValueError(f"{op}: {name} is on {tensor.device}; expected {device} (the device of x or weight)")


# A NaN or infinite scale would turn every output into NaN or inf.
_check_number = require_finite_number


def check_adapter(op: str, x, weight, lora_A, lora_B, bias=None, gate=None, rank=None) -> int:
    """Validates a LoRA call's tensors; returns the rank used (``rank`` or r).

    x (None for weight-only ops such as merging) and weight share a dtype
    (float32/float64/float16/bfloat16) and device; the adapters (lora_A, lora_B, gate) share
    one dtype, the weight's or float32; bias has the weight's.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a tensor; got {type(weight).__name__}")
    reference_name, reference = ("weight", weight) if x is None else ("x", x)
    if not isinstance(reference, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor; got {type(reference).__name__}")
    float_code(reference.dtype, op, reference_name)
    device, dtype = reference.device, reference.dtype
    if x is not None and isinstance(weight, torch.Tensor) and weight.dtype != dtype:  # (x is the usual culprit)
        raise TypeError(f"{op}: x has dtype {dtype}; expected the weight's dtype {weight.dtype}")
    _check_tensor(op, "weight", weight, (dtype,), device)
    _check_tensor(op, "lora_A", lora_A, (dtype, torch.float32), device)
    _check_tensor(op, "lora_B", lora_B, (lora_A.dtype,), device)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}; expected 2-D (out_features, in_features)")
    out_features, in_features = weight.shape
    if x is not None and (x.dim() < 1 or x.shape[-1] != in_features):
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; expected (..., in_features) = (..., {in_features})")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(
            f"{op}: lora_A has shape {tuple(lora_A.shape)}; expected (r, in_features) = (r, {in_features})"
        )
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(
            f"{op}: lora_B has shape {tuple(lora_B.shape)}; expected (out_features, r) = ({out_features}, {r})"
        )
    if bias is not None:
        _check_tensor(op, "bias", bias, (dtype,), device)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected (out_features,) = ({out_features},)")
    if gate is not None:
        _check_tensor(op, "gate", gate, (lora_A.dtype,), device)
        if tuple(gate.shape) != (r,):
            raise ValueError(f"{op}: gate has shape {tuple(gate.shape)}; expected (r,) = ({r},)")
    if rank is None:
        return r
    if not is_integer(rank):
        raise TypeError(f"{op}: rank must be an int; got {type(rank).__name__}")
    if not 0 <= rank <= r:
        raise ValueError(f"{op}: rank must be in [0, r] = [0, {r}]; got {rank}")
    return int(rank)


def check_scale(op: str, scale, device: torch.device, owner: str = "x"):
    """``scale`` as a float, or as itself when it is a 0-d real tensor (PEFT's compiled
    hotswap stores the scalings as tensors, so that changing them does not recompile) on
    ``device`` or the CPU, without gradient.  A CPU tensor must be finite (checked where its
    value is readable: not while torch.compile traces); a CUDA tensor's finiteness is not
    checked (reading it would synchronize with the GPU)."""
    if not isinstance(scale, torch.Tensor):
        if not is_real_number(scale):
            raise TypeError(f"{op}: scale must be a number or a 0-d tensor; got {type(scale).__name__}")
        return _check_number(op, "scale", scale)
    if scale.dim() != 0:
        raise ValueError(f"{op}: scale has shape {tuple(scale.shape)}; expected a number or a 0-d tensor")
    if scale.dtype == torch.bool or scale.is_complex():
        raise TypeError(f"{op}: scale has dtype {scale.dtype}; expected a real (floating or integer) tensor")
    if scale.device != device and scale.device.type != "cpu":
        raise ValueError(f"{op}: scale is on {scale.device}; expected {device} (the device of {owner}) or cpu")
    if scale.requires_grad:
        raise ValueError(f"{op}: scale requires grad; expected a constant (no gradient flows to scale)")
    if scale.device.type == "cpu" and values_readable(scale) and not bool(torch.isfinite(scale)):
        raise ValueError(f"{op}: scale must be finite; got {scale.item()} (a 0-d tensor)")
    return scale


def check_scale_range(op: str, scale, dtype: torch.dtype, what: str) -> None:
    """A float scale beyond float32's range where the scaled term runs in ``dtype``
    narrower than float64 (so in float32 or below): a ValueError naming it (torch raised
    "value cannot be converted to type float without overflow", or the outputs were inf,
    silently).  ``what``: the tensor whose dtype that is, for the message."""
    limit = torch.finfo(torch.float32).max
    if isinstance(scale, float) and abs(scale) > limit and dtype != torch.float64:
        raise ValueError(f"{op}: scale {scale:g} is beyond float32's range (+-{limit:.4g}), in which the scaled term "
                         f"runs for {what} of dtype {dtype}")


def check_dropout(op: str, dropout_p) -> float:
    p = _check_number(op, "dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1); got {p}")
    return p


# ---------------------------------------------------------------------------- public API
@autocast_entry("x", "weight", "lora_A", "lora_B", "bias", "gate")
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    scale: Union[float, torch.Tensor] = 1.0,
    gate: Optional[torch.Tensor] = None,
    rank: Optional[int] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``y = x W^T + b + scale * ((D(x) A^T) * g) B^T``, differentiable in every tensor.

    Parameters
    ----------
    x : Tensor[..., in_features]
        float32, float64, float16 or bfloat16; leading batch dims allowed.
    weight : Tensor[out_features, in_features]
        The (normally frozen) base weight, x's dtype and device.  Its gradient is computed
        only when it requires grad.
    lora_A : Tensor[r, in_features]
    lora_B : Tensor[out_features, r]
        Adapter factors, both x's dtype or float32 (fp32 adapters on a half base weight:
        the adapter runs in float32 and is added to the half base output with one
        rounding, as PEFT does).
    bias : Tensor[out_features], optional
    scale : float or 0-d Tensor
        ``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA).  A 0-d real tensor (on x's
        device or the CPU, not requiring grad) is read at run time, so under
        ``torch.compile`` changing its value in place does not recompile (PEFT's
        ``prepare_model_for_compiled_hotswap`` stores the scalings so).
    gate : Tensor[r], optional
        Per-rank gate g (SoRA), the adapters' dtype; trainable.
    rank : int, optional
        Use only the first ``rank`` ranks (DyLoRA): ``A[:rank]``, ``B[:, :rank]``,
        ``g[:rank]`` as views, no copy.  ``0 <= rank <= r``; default r.
    dropout_p : float
        Dropout probability on the adapter input only, in ``[0, 1)``.
    generator : torch.Generator, optional
        Source of the dropout seed; the same state gives the same mask.  A CPU generator
        costs nothing; a CUDA one one device-to-host read of the seed.
        Default: torch's default generator (the one to use under ``torch.compile``, which
        cannot trace a Generator argument).

    Returns
    -------
    Tensor[..., out_features]
        x's dtype; under ``torch.autocast`` the autocast dtype: x, weight, bias and the
        adapters are cast to it, as ``F.linear``'s operands are, and the op runs with
        autocast disabled (:mod:`lowrank_ops._autocast`).

    Notes
    -----
    Saved for backward: x, weight, A, B, gate, ``u = D(x) A^T`` ``[N, r]`` and the dropout
    seed; no ``[N, out]`` tensor and no ``[N, in]`` dropout mask.  See the module docstring
    for why the GEMMs are composed torch ops.
    """
    op = "lora_linear"
    k = check_adapter(op, x, weight, lora_A, lora_B, bias, gate, rank)
    scale = check_scale(op, scale, x.device)
    check_scale_range(op, scale, lora_A.dtype, "adapters")
    scale, scale_tensor = (1.0, scale) if isinstance(scale, torch.Tensor) else (scale, None)
    p = check_dropout(op, dropout_p)
    if k != lora_A.shape[0]:
        lora_A, lora_B = lora_A[:k], lora_B[:, :k]
        gate = None if gate is None else gate[:k]
    if composed_path():
        return _composed(x, weight, lora_A, lora_B, bias, gate, scale if scale_tensor is None else scale_tensor, p,
                         generator)
    seed = draw_seed(generator, op) if p > 0.0 else None  # stays on the CPU: reading it never syncs a GPU
    batch_shape = x.shape[:-1]
    args = (flatten_rows(x), weight, lora_A, lora_B, bias, gate, seed, scale, p,
            scale_tensor)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6]):
        y = _LoRALinear.apply(*args)
    else:  # inference: no autograd Function, no saved tensors (~15 us less per call)
        y = _forward_op()(*args)[0]
    return y.reshape(*batch_shape, weight.shape[0])


def composed_dropout(x: torch.Tensor, p: float, generator) -> torch.Tensor:
    """``D(x)`` for the torch-op compositions: the fused op's seeded mask (the same
    generator state gives the same mask) applied as a differentiable product; inside
    torch.func transforms ``F.dropout`` (torch's random stream, ``vmap(randomness=...)``
    rules), the seeded op having no batching rule."""
    if p == 0.0:
        return x
    if in_functorch_transform():
        return torch.nn.functional.dropout(x, p)
    keep = torch.ops.lowrank_ops.lora_dropout(torch.ones_like(x), draw_seed(generator), p) != 0
    return x * keep * (1.0 / (1.0 - p))  # as the op scales: 1 / (1 - p) unrounded (a half mask rounded it)


def adapter_term(adapter_input, lora_A, lora_B, gate, scale) -> torch.Tensor:
    """``scale ((h A^T) * g) B^T`` for the adapter input ``h = D(x)`` (:func:`composed_dropout`),
    in torch ops and the factors' dtype (``gate`` None: no gate)."""
    shrunk = adapter_input.to(lora_A.dtype) @ lora_A.T
    if gate is not None:
        shrunk = shrunk * gate
    return (shrunk @ lora_B.T) * scale


def add_adapter(y: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
    """``y + adapter`` in y's dtype, rounded once: a float32 adapter on a half ``y`` is added in float32."""
    return y + adapter if adapter.dtype == y.dtype else (y.to(adapter.dtype) + adapter).to(y.dtype)


def _composed(x, weight, lora_A, lora_B, bias, gate, scale, p: float, generator) -> torch.Tensor:
    """:func:`lora_linear` composed of torch ops (:func:`~lowrank_ops.ops._library.composed_path`:
    torch.func transforms, ``composite()``, forward-mode tangents), which see through torch
    ops only: the same arithmetic."""
    return add_adapter(torch.nn.functional.linear(x, weight, bias),
                       adapter_term(composed_dropout(x, p, generator), lora_A, lora_B, gate, scale))


# Rows of W merged per step: bounds the float32 temporary of half weights to
# _MERGE_ROWS x in (16 MB at in = 4096) instead of a full float32 copy of W.
_MERGE_ROWS = 1024


def _merge(op: str, weight, lora_A, lora_B, scale, gate, rank, inplace: bool, sign: float,
           row_scale=None) -> torch.Tensor:
    k = check_adapter(op, None, weight, lora_A, lora_B, None, gate, rank)
    scale = check_scale(op, scale, weight.device, "weight")
    if isinstance(scale, torch.Tensor):  # PEFT's hotswap scalings; a merge is not in a compiled hot path
        scale = float(scale)
    check_scale_range(op, scale, weight.dtype, "a weight")  # (merged in float64 for a float64 weight)
    if row_scale is not None:
        if not isinstance(row_scale, torch.Tensor):
            raise TypeError(f"{op}: row_scale must be a tensor; got {type(row_scale).__name__}")
        float_code(row_scale.dtype, op, "row_scale")
        if tuple(row_scale.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: row_scale has shape {tuple(row_scale.shape)}; expected (out_features,) = "
                             f"({weight.shape[0]},)")
        if row_scale.device != weight.device:
            raise ValueError(f"{op}: row_scale is on {row_scale.device}; expected {weight.device} (the device of weight)")
        # A merge is not in a hot path: one host read for each check (NaN rows came out silently).
        readable = values_readable(row_scale)
        if readable and not all_finite(row_scale):
            raise ValueError(f"{op}: row_scale has NaN or infinite entries; expected finite values")
        if readable and sign < 0 and bool((row_scale == 0).any()):
            row = int(torch.nonzero(row_scale == 0)[0])
            raise ValueError(f"{op}: row_scale[{row}] is 0; expected non-zero entries (unmerging divides the rows by "
                             f"them: a row merged with a zero scale cannot be recovered)")
    if inplace:  # row blocks of W are written while A, B, the gate and row_scale are read
        require_apart(op, "weight", weight, lora_A=lora_A, lora_B=lora_B, gate=gate, row_scale=row_scale)
    accumulate = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        lora_A, lora_B = lora_A[:k].to(accumulate), lora_B[:, :k].to(accumulate)
        if gate is not None:
            lora_B = lora_B * gate[:k].to(accumulate)
        if row_scale is not None:
            row_scale = row_scale.to(accumulate)[:, None]
        out = weight if inplace else torch.empty_like(weight, memory_format=torch.contiguous_format)
        for row in range(0, weight.shape[0], _MERGE_ROWS):
            rows = slice(row, row + _MERGE_ROWS)
            # (W + s B A) r, or W / r - s B A, in float32 (float64 for float64 W), rounded to W's dtype once.
            block = weight[rows].to(accumulate)
            if row_scale is not None and sign < 0:
                block = block / row_scale[rows]  # not in place: for a float32 W, block is W itself
            block = torch.addmm(block, lora_B[rows], lora_A, alpha=sign * scale)
            if row_scale is not None and sign > 0:
                block.mul_(row_scale[rows])
            out[rows] = block
    return out


@autocast_entry()
def lora_merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scale: Union[float, torch.Tensor] = 1.0, *,
               gate: Optional[torch.Tensor] = None, rank: Optional[int] = None, inplace: bool = False,
               row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(W + scale * B diag(g) A) diag(row_scale)`` with float32 accumulation, rounded to W's dtype once.

    Parameters
    ----------
    weight : Tensor[out_features, in_features]
        float32, float64, float16 or bfloat16.
    lora_A : Tensor[r, in_features]
        W's dtype or float32, on W's device.
    lora_B : Tensor[out_features, r]
        The dtype of ``lora_A``, on W's device.
    scale : float or 0-d Tensor
        The adapter scaling ``s`` (``lora_alpha / r`` in PEFT); a 0-d tensor (PEFT's
        compiled-hotswap scalings) is read once (a host synchronization on CUDA).
    gate : Tensor[r], optional
        Per-rank gate ``g`` (SoRA), the dtype of ``lora_A``; None: all ones.
    rank : int, optional
        Merge only the first ``rank`` ranks (DyLoRA), ``0 <= rank <= r``; None: all r.
    inplace : bool
        Write into ``weight`` (no new ``[out, in]`` tensor); otherwise return a new one.
    row_scale : Tensor[out_features], optional
        Multiplies row o of the merged weight by ``row_scale[o]`` before the rounding
        (DoRA's ``m / ||W + s B A||_row``); any floating dtype, on W's device.

    Returns
    -------
    Tensor[out_features, in_features]
        The merged weight in W's dtype on W's device (``weight`` itself when
        ``inplace``, else a new contiguous tensor); not differentiable.

    Raises
    ------
    TypeError
        A tensor argument that is not a tensor or has an unsupported dtype, a
        ``scale`` that is not a number, a ``rank`` that is not an int.
    ValueError
        Shapes that do not fit W, tensors on another device, ``rank`` out of range.

    Notes
    -----
    The product is computed block by block of 1024 rows in float32 (float64 for a float64
    weight) and added to the widened weight before the single rounding, so a bf16 merge
    equals ``(W.float() + s B.float() A.float()).bfloat16()`` exactly (up to GEMM order).
    Under ``torch.autocast`` it runs with autocast disabled (the same result).
    """
    return _merge("lora_merge", weight, lora_A, lora_B, scale, gate, rank, inplace, 1.0, row_scale)


@autocast_entry()
def lora_unmerge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scale: Union[float, torch.Tensor] = 1.0, *,
                 gate: Optional[torch.Tensor] = None, rank: Optional[int] = None, inplace: bool = False,
                 row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``W diag(row_scale)^-1 - scale * B diag(g) A``: the inverse of :func:`lora_merge` (same
    arguments, same accumulation).

    For float32/float64 weights unmerge(merge(W)) returns W up to one rounding per entry;
    for bf16/fp16 the merged weight was rounded once to the half type, so W comes back to
    within that rounding (``2^-8 |W + s B A|`` for bf16).

    Parameters
    ----------
    weight : Tensor[out_features, in_features]
        The merged weight; float32, float64, float16 or bfloat16.
    lora_A : Tensor[r, in_features]
        W's dtype or float32, on W's device.
    lora_B : Tensor[out_features, r]
        The dtype of ``lora_A``, on W's device.
    scale : float or 0-d Tensor
        The scaling the adapter was merged with.
    gate : Tensor[r], optional
        Per-rank gate (SoRA), the dtype of ``lora_A``; None: all ones.
    rank : int, optional
        Remove only the first ``rank`` ranks, ``0 <= rank <= r``; None: all r.
    inplace : bool
        Write into ``weight``; otherwise return a new tensor.
    row_scale : Tensor[out_features], optional
        The row scaling the adapter was merged with (DoRA); divides row o before the
        subtraction, in the same accumulation.

    Returns
    -------
    Tensor[out_features, in_features]
        The base weight in W's dtype on W's device (``weight`` itself when ``inplace``,
        else a new contiguous tensor); not differentiable.

    Raises
    ------
    TypeError, ValueError
        As :func:`lora_merge`.
    """
    return _merge("lora_unmerge", weight, lora_A, lora_B, scale, gate, rank, inplace, -1.0, row_scale)
