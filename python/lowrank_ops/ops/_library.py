"""The one ``torch.library`` namespace that every op family defines its ops in."""
import contextlib
import functools
import inspect
import threading
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor

_FAKE_MODE = torch._C._TorchDispatchModeKey.FAKE

NAMESPACE = "lowrank_ops"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def current_stream(tensor: torch.Tensor) -> int:
    """The raw ``cudaStream_t`` (as an int) that kernels for ``tensor`` must launch on."""
    return torch.cuda.current_stream(tensor.device).cuda_stream


def dispatch_needed(tensor: Optional[torch.Tensor] = None) -> bool:
    """Whether a call must go through the registered ops (see :func:`eager_or_op`): while
    torch.compile or torch.export traces, inside a torch.func transform, under a
    FakeTensorMode, or for a meta or fake ``tensor``."""
    return (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._get_dispatch_mode(_FAKE_MODE) is not None
            or (tensor is not None and (tensor.is_meta or isinstance(tensor, FakeTensor))))


def _tracing() -> bool:
    """torch.compile tracing, or a fake mode: no tensor's values exist."""
    return torch.compiler.is_compiling() or torch._C._get_dispatch_mode(_FAKE_MODE) is not None


def _has_values(tensor: torch.Tensor) -> bool:
    return not (tensor.is_meta or isinstance(tensor, FakeTensor))


def values_readable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s values can be read on the host, for data-dependent checks
    (finiteness, overflow rescaling): not while torch.compile traces, not for meta or fake
    tensors, and not under vmap (batched values); under grad-like transforms they can."""
    return not _tracing() and _has_values(tensor) and not under_vmap()


def routing_readable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the values of ``tensors`` (None skipped) can be read on the host: not while
    torch.compile traces, not meta or fake, and not batched by vmap.  Unlike
    :func:`values_readable` of the data, routing built from sequences stays a plain tensor
    under vmap (its values are the same for every batch entry) and is readable there."""
    if _tracing():
        return False
    for tensor in tensors:
        while tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor):  # as unwrapped()
            if torch._C._functorch.is_batchedtensor(tensor):
                return False
            tensor = torch._C._functorch.get_unwrapped(tensor)
        if tensor is not None and not _has_values(tensor):
            return False
    return True


def forward_mode_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``,
    ``torch.func.jvp``): inputs with tangents do not require grad, and paths that skip
    autograd for them dropped the tangent silently.  One attribute read; checking each
    input's tangent instead cost ~4 us per tensor, more than the composed path saves."""
    return torch.autograd.forward_ad._current_level >= 0


def unwrapped(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``tensor`` without torch.func's wrappers (the plain tensor under a grad transform's
    wrapper), for host-side checks that hand raw pointers to C++; None stays None."""
    while tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active (its tensors' values are not readable)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    vmap = torch._C._functorch.TransformType.Vmap
    return any(interpreter.key() == vmap for interpreter in retrieve_all_functorch_interpreters())


def refuse_transforms(op: str, reason: str, *, only_vmap: bool = False) -> None:
    """Raises a RuntimeError naming ``op`` inside a torch.func transform (``only_vmap``:
    inside ``vmap``), for what cannot run there: iterative solvers and data-dependent
    selections, whose loops read values (torch's own message blames "data-dependent
    control flow"), and functions that are not differentiable (grad would silently return
    zeros).  ``reason`` says why and what to do instead."""
    if under_vmap() if only_vmap else in_functorch_transform():
        raise RuntimeError(f"{op}: torch.func {'vmap is' if only_vmap else 'transforms (grad, vmap, ...) are'} "
                           f"not supported: {reason}")


_COMPOSITE = threading.local()  # the depth of the blocks this thread opened
_COMPOSITE_LOCK = threading.Lock()
_composite_blocks = 0  # every thread's


@contextlib.contextmanager
def composite():
    """Runs the differentiable ops as torch compositions (the same arithmetic, torch's own
    kernels) instead of the fused first-order kernels while the block is open, so that
    their gradients are differentiable again: Hessian-vector products, gradient penalties,
    MAML-style inner steps (``create_graph=True``), and
    :func:`lowrank_ops.second_order.hessian_trace`, which enters it itself.  The graph
    built inside keeps the composed ops after the block.

    It covers the thread that opens it and, while it is open, every backward pass (the
    autograd engine runs CUDA backward passes on its own threads, and activation
    checkpointing recomputes the forward there, which must take the path of the first
    forward, else "Recomputed values ... have different metadata"); with checkpointing,
    run the backward passes inside the block too.  Other threads' forwards stay fused (a
    serving thread's multi-adapter batches would gather ``[N, r, in + out]`` factors).
    Nests.

    Example (``model``, ``x`` yours, ``w`` one of its parameters, ``v`` a tensor of
    ``w``'s shape)::

        with lowrank_ops.ops.composite():
            loss = model(x).square().mean()
            (g,) = torch.autograd.grad(loss, [w], create_graph=True)
            (hvp,) = torch.autograd.grad((g * v).sum(), [w])  # H v, through the LoRA / DoRA layers too
    """
    global _composite_blocks
    _COMPOSITE.depth = getattr(_COMPOSITE, "depth", 0) + 1
    with _COMPOSITE_LOCK:
        _composite_blocks += 1
    try:
        yield
    finally:
        with _COMPOSITE_LOCK:
            _composite_blocks -= 1
        _COMPOSITE.depth -= 1


def composed_path() -> bool:
    """Whether the public ops compose torch ops instead of calling their fused autograd
    Functions: inside a torch.func transform (which sees through torch ops only), a
    :func:`composite` block (this thread's, or any while a backward pass runs here), or
    while a forward-mode AD level is open (:func:`forward_mode_active`)."""
    if getattr(_COMPOSITE, "depth", 0) > 0 or forward_mode_active() or in_functorch_transform():
        return True
    return _composite_blocks > 0 and torch._C._current_graph_task_id() != -1


def in_functorch_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) is active: the fused ops'
    autograd Functions are opaque to them, so the public functions then compose torch ops.
    Not while torch.compile traces, which runs under such an interpreter itself (the
    registered ops are what it must see)."""
    # (Dynamo cannot tell a user's transform from its own interpreter, nor trace the
    # stack's kinds: so torch.compile around torch.func over these ops is not supported.)
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def eager_or_op(name: str, impl: Callable) -> Callable:
    """``impl``, the implementation of op ``torch.ops.lowrank_ops.<name>``, called directly
    (eager calls skip the dispatcher: 5-40 us a call, ~5 of lora_linear's 35 us at 16 x 64 x
    64, ~40 of a 180 us SpMV), or the op itself wherever the dispatcher must decide and no
    raw pointer can be taken: while torch.compile or torch.export traces, inside a
    torch.func transform (vmap, grad: the op's own error instead of a data-pointer one),
    under a FakeTensorMode, and for meta or fake tensors (the fake impl infers the shapes;
    the call's first tensor argument stands for all: the ops refuse meta mixed with real
    tensors).  About 1 us of checks per call."""
    if dispatch_needed():
        return getattr(torch.ops.lowrank_ops, name)
    return functools.partial(_eager_call, name, impl)


def _eager_call(name: str, impl: Callable, *args, **kwargs):
    first = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(first, torch.Tensor) and (first.is_meta or isinstance(first, FakeTensor)):
        return getattr(torch.ops.lowrank_ops, name)(*args, **kwargs)
    return impl(*args, **kwargs)


def checked_impl(check: Callable[..., None], impl: Callable) -> Callable:
    """``impl`` preceded by ``check`` on the same arguments: what an op registers, so that
    direct callers of ``torch.ops.lowrank_ops.*`` (and the public functions under
    torch.compile) get the public functions' checks, while eager public calls check once
    and run ``impl`` directly (eager_or_op).  Unchecked, a float32 R with a float64 Y made
    a kernel read R as doubles, and a dropout p of -0.5 scaled the inputs."""
    def run(*args, **kwargs):
        check(*args, **kwargs)
        return impl(*args, **kwargs)
    run.__name__ = impl.__name__
    return run


def register_fake(name: str, fake: Callable) -> None:
    """Registers ``fake`` as the fake (meta) impl of ``lowrank_ops::<name>``.

    One meta tensor among real ones sends a call to the fake impl (the dispatcher's Meta
    key outranks CPU and CUDA), which would hand back uninitialized memory on the real
    tensors' device; such a call raises instead, naming the arguments.  Under
    torch.compile the fake tensors report their real devices, so the check never fires.
    """
    signature = inspect.signature(fake)

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        on_meta, elsewhere = None, None
        for arg, value in signature.bind(*args, **kwargs).arguments.items():
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                # 0-d CPU tensors (e.g. lora_linear's dropout seed) go with any device, as in torch.
                if isinstance(tensor, torch.Tensor) and not (tensor.dim() == 0 and tensor.device.type == "cpu"):
                    if tensor.device.type == "meta":
                        on_meta = on_meta or arg
                    else:
                        elsewhere = elsewhere or (arg, tensor.device)
        if on_meta and elsewhere:
            raise ValueError(f"{name}: {on_meta} is on meta; expected {elsewhere[1]} (the device of {elsewhere[0]}): "
                             "every tensor argument on one device")
        return fake(*args, **kwargs)

    torch.library.register_fake(f"{NAMESPACE}::{name}", checked, lib=LIBRARY)


def _outputs_not_differentiable(ctx, inputs, output) -> None:
    outputs = output if isinstance(output, tuple) else (output,)
    ctx.mark_non_differentiable(*[tensor for tensor in outputs if isinstance(tensor, torch.Tensor)])


def _refuse_backward(ctx, *grads):  # unreachable: every output is marked non-differentiable
    raise RuntimeError("lowrank_ops: this op is not differentiable")


def mark_undifferentiable_ops() -> None:
    """Gives every non-mutating op of the namespace that has no autograd formula one that
    marks its outputs non-differentiable.

    These ops are building blocks: the differentiable entry points are autograd Functions
    (``lora_linear``, ``dora_linear``, ``batched_svd``, ...) or ops with
    ``register_autograd`` (``mfac_dots``, ``mfac_combine``).  Without a formula, torch's
    autograd fallback let gradients flow through whichever torch ops an implementation
    happened to use, or through none where it called a kernel: ``base_linear`` gave x a
    gradient at 100 rows (addmm) and None at 8 (the small-batch kernel), and None under
    torch.compile.  Mutating ops (``*_``) keep torch's fallback (register_autograd does not
    take them); they are not differentiable either.
    """
    prefix = NAMESPACE + "::"
    for qualified in torch._C._dispatch_get_all_op_names():
        if not qualified.startswith(prefix):
            continue
        op = getattr(torch.ops.lowrank_ops, qualified[len(prefix):]).default
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd"):
            continue
        if any(argument.alias_info is not None and argument.alias_info.is_write for argument in op._schema.arguments):
            continue
        torch.library.register_autograd(qualified, _refuse_backward, setup_context=_outputs_not_differentiable,
                                        lib=LIBRARY)
