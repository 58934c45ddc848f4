"""The backward of the library's autograd Functions is first-order only (fused kernels):
:func:`first_order_only` makes a request for more fail with a clear error."""
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
