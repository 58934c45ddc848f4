"""Call lowrank_ops from NumPy, CuPy, JAX or any other DLPack producer, without copies.

The kernels take raw pointers (DESIGN.md): torch is only the allocator and the op
registry around them.  :func:`wrap` makes any lowrank_ops function accept the arrays of
another framework and return that framework's arrays::

    import numpy as np
    import lowrank_ops
    from lowrank_ops.integrations.dlpack import wrap

    batched_svd = wrap(lowrank_ops.linalg.batched_svd)
    A = np.random.rand(512, 64, 64).astype(np.float32)
    U, S, Vh, converged, sweeps, off_diagonal = batched_svd(A)   # numpy in, numpy out

    rsvd = wrap(lowrank_ops.linalg.rsvd)                          # cupy in, cupy out
    U, S, Vh = rsvd(cupy_matrix, 64)

How: every argument that is not a torch tensor but exports ``__dlpack__`` (also inside
lists, tuples and dicts) becomes a torch tensor sharing its memory (``torch.from_dlpack``;
strided arrays stay strided, the ops read them in place or copy as they would a strided
tensor); the function runs under ``torch.no_grad()`` (the other framework has no torch
autograd); tensors in the result (alone, or in tuples, NamedTuples, lists and dicts)
go back through the first array argument's framework (``numpy.from_dlpack``,
``cupy.from_dlpack``, ``jax.dlpack.from_dlpack``), again without copies.  Other results
(a :class:`~lowrank_ops.ot.OTResult`, a :class:`~lowrank_ops.sparse.FixedSupport`) are
returned as they are, holding torch tensors.

Streams (CuPy): the DLPack exchange orders the work: torch's current stream waits for
CuPy's when the inputs are taken, and CuPy's waits for torch's when the outputs are, so
no explicit synchronization is needed and none happens.

Read-only NumPy arrays (e.g. from ``np.frombuffer``) are copied once: torch tensors are
always writable, and an op writing in place must not write to read-only memory.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import torch

__all__ = ["wrap", "to_torch", "from_torch"]


def _is_foreign_array(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) and hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__")


def to_torch(array: Any) -> torch.Tensor:
    """The torch tensor sharing ``array``'s memory (any DLPack producer; a torch tensor is returned as is).

    A read-only NumPy array is copied (a torch tensor is always writable), and so is an
    array with a negative stride (``b[::-1]``: torch 2.13's ``from_dlpack`` aborted the
    process on one).  Raises TypeError for anything that is neither a tensor nor a DLPack
    producer.
    """
    if isinstance(array, torch.Tensor):
        return array
    if not _is_foreign_array(array):
        raise TypeError(f"to_torch: expected a torch tensor or an array with __dlpack__; got {type(array).__name__}")
    flags = getattr(array, "flags", None)
    if flags is not None and getattr(flags, "writeable", True) is False:
        # NumPy 2 exports read-only memory and torch would alias it as writable: an op that
        # writes in place (lora_merge(inplace=True), the M-FAC factor updates) would fault.
        array = array.copy()
    strides = getattr(array, "strides", None)  # NumPy and CuPy: bytes; a negative one is a reversed view
    if strides is not None and any(stride < 0 for stride in strides):
        array = array.copy()
    return torch.from_dlpack(array)


def _framework_from_dlpack(like: Any) -> Callable[[torch.Tensor], Any]:
    """``from_dlpack`` of the framework that ``like``'s type comes from."""
    root = type(like).__module__.split(".")[0]
    if root in ("jax", "jaxlib"):
        return importlib.import_module("jax.dlpack").from_dlpack
    module = importlib.import_module(root)
    convert = getattr(module, "from_dlpack", None)
    if convert is None:
        raise TypeError(f"from_torch: {root} has no from_dlpack; cannot return {type(like).__name__} arrays")
    return convert


def from_torch(value: Any, like: Any) -> Any:
    """``value`` with every torch tensor (alone or in tuples, NamedTuples, lists and dicts)
    turned into an array of ``like``'s framework, sharing memory; anything else unchanged."""
    convert = _framework_from_dlpack(like)

    def back(item):
        if isinstance(item, torch.Tensor):
            return convert(item.detach())
        if isinstance(item, tuple) and hasattr(item, "_fields"):  # NamedTuple: keep its type and names
            return type(item)(*(back(field) for field in item))
        if isinstance(item, (list, tuple)):
            return type(item)(back(field) for field in item)
        if isinstance(item, dict):
            return {key: back(field) for key, field in item.items()}
        return item

    return back(value)


def wrap(fn: Callable) -> Callable:
    """``fn`` taking and returning the arrays of any DLPack framework (see the module docstring).

    Parameters
    ----------
    fn : callable
        Any lowrank_ops function or op (``lowrank_ops.linalg.rsvd``,
        ``lowrank_ops.ops.spmv``, ``torch.ops.lowrank_ops.csr_spmm``, ...).

    Returns
    -------
    callable
        Same signature; array arguments of one framework in, that framework's arrays out
        (torch tensors when no argument was a foreign array).
    """
    if not callable(fn):
        raise TypeError(f"wrap: fn must be callable; got {type(fn).__name__}")

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        first = []

        def convert(item):
            if _is_foreign_array(item):
                if not first:
                    first.append(item)
                return to_torch(item)
            if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
                return type(item)(convert(part) for part in item)
            if isinstance(item, dict):
                return {key: convert(part) for key, part in item.items()}
            return item

        args = tuple(convert(arg) for arg in args)
        kwargs = {key: convert(value) for key, value in kwargs.items()}
        with torch.no_grad():
            result = fn(*args, **kwargs)
        return from_torch(result, first[0]) if first else result

    return wrapped
