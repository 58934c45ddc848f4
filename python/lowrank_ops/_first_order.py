"""The backward of the library's autograd Functions is first-order only (fused kernels):
:func:`first_order_only` makes a request for more fail with a clear error;
:func:`second_order_refusal` does so for backwards built from torch ops whose formula is
right to first order only, without refusing first-order uses of torch.func."""
from __future__ import annotations

import functools
from typing import Callable

import torch


def first_order_only(backward: Callable) -> Callable:
    """Wraps an autograd Function's ``backward`` (a staticmethod's function) so that a
    backward run with ``create_graph=True`` (second derivatives, Hessian-vector products,
    ``torch.autograd.functional.hvp``) raises, naming the Function.

    It replaces ``torch.autograd.function.once_differentiable``, whose error node sits on the
    gradients' graph: ``torch.autograd.grad(g, inputs, ...)`` never reaches it and returned
    None (or zeros with ``allow_unused``) for the second derivative, silently.  Autograd runs
    a backward with grad mode on exactly when the graph of the gradient is being built.
    """
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(ctx).__name__.removesuffix('Backward')}: lowrank_ops' fused backward is first-order only; "
                "second derivatives (create_graph=True, Hessian-vector products) need the composite torch path: "
                "run the forward inside lowrank_ops.ops.composite() (or use plain PEFT instead of use_lowrank_ops)")
        return backward(ctx, *grads)

    return wrapper


def second_order_refusal(name: str, message: str) -> type:
    """An autograd Function ``name`` whose ``apply(source)`` is a 0-d zero depending on
    ``source`` through a node whose backward (and jvp) raises RuntimeError(message).

    Added to a gradient formed from torch ops (with ``source`` an input of the Function,
    or a saved output that depends on it), it refuses every derivative of that gradient
    with respect to the inputs, and none with respect to the output's cotangent (the
    double-vjp trick of ``torch.autograd.functional.jvp`` differentiates only that,
    exactly: the gradient is linear in it).  Unlike :func:`first_order_only`, it does not
    raise when the backward merely runs with grad mode on (torch.func's first-order
    transforms), only when the gradient is differentiated again."""

    def forward(source):
        return source.new_zeros(())

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, _):
        raise RuntimeError(message)

    def jvp(ctx, _):  # forward over reverse / forward over forward: the same refusal
        raise RuntimeError(message)

    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp), "__doc__": second_order_refusal.__doc__,
    })
