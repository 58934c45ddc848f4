"""Multi-adapter LoRA: lora_linear_multi, its three kernels' ops, nn.MultiLoRALinear.

Every numerical check compares against the float64 reference (a loop of per-segment
matmuls, lowrank_ops.reference.lora_linear_multi) on fresh random data, with the
rigorous error bound described in ``error_bound``.  The CPU op runs large segments as
torch GEMMs and small ones in the C++ kernels; the ``cpu_path`` fixture forces each
path (and the automatic mix) so that both are tested at every shape.
"""
from __future__ import annotations

import math

import pytest
import torch

import lowrank_ops.ops.lora_multi as lora_multi_module
from lowrank_ops import reference
from lowrank_ops._extension import extension
from lowrank_ops.nn import MultiLoRALinear
from lowrank_ops.nn.lora_multi import group_rows, restore_rows
from lowrank_ops.ops import lora_linear_multi

from helpers import FLOAT_DTYPES, OUTPUT_UNIT, assert_within, check_autocast_against_torch, randn, summation_bound

IN, OUT, N_ADAPTERS, R_MAX = 37, 29, 4, 9

# (segment sizes, adapter ids, ranks): mixed ranks (one 0, one r_max), an empty segment,
# id -1, an adapter used by two segments, an unused adapter; segments above and below
# the CPU GEMM threshold (the cpu_path fixture forces either path).
ROUTINGS = {
    "mixed": ([5, 0, 19, 3, 11, 2], [1, 2, -1, 1, 0, 3], [4, R_MAX, 0, 1]),
    "decode": ([1] * 12, [0, 1, 2, 3, -1, 0, 1, 1, 3, 3, 0, -1], [9, 3, 5, 2]),
    "one_adapter": ([40], [2], [9, 9, 7, 9]),
    "all_base": ([6, 4], [-1, -1], [9, 9, 9, 9]),
    "empty": ([], [], [3, 3, 3, 3]),
}


@pytest.fixture(params=["mixed", "kernel", "gemm"])
def cpu_path(request, monkeypatch):
    """Forces the CPU op's split between the C++ kernels and per-segment torch GEMMs
    ("mixed": segments of 10+ rows to torch, the shorter ones to the kernels, in one call;
    the default threshold sends every segment of these small problems to the kernels)."""
    min_rows = {"mixed": 10, "kernel": 10**18, "gemm": 1}[request.param]
    monkeypatch.setattr(lora_multi_module, "_CPU_GEMM_MIN_ROWS", min_rows)
    return request.param


def make_problem(routing, dtype, device, generator, batch_shape=None, bias=True, dims=(IN, OUT, R_MAX)):
    """Random layer inputs for ``routing`` (a key of ROUTINGS or a (sizes, ids, ranks) triple)
    with ``dims`` = (in_features, out_features, r_max)."""
    sizes, ids, ranks = ROUTINGS[routing] if isinstance(routing, str) else routing
    in_features, out_features, r_max = dims
    n_rows, n_adapters = sum(sizes), len(ranks)
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    shape = batch_shape if batch_shape is not None else (n_rows,)
    assert torch.Size(shape).numel() == n_rows
    tensors = dict(
        x=randn(*shape, in_features, dtype=dtype, device=device, generator=generator),
        weight=randn(out_features, in_features, dtype=dtype, device=device, generator=generator),
        A_stack=randn(n_adapters, r_max, in_features, dtype=dtype, device=device, generator=generator),
        B_stack=randn(n_adapters, out_features, r_max, dtype=dtype, device=device, generator=generator),
        bias=randn(out_features, dtype=dtype, device=device, generator=generator) if bias else None,
    )
    scales = (torch.rand(n_adapters, generator=generator, dtype=torch.float64) * 2 - 0.5).tolist()
    routing_args = dict(segment_offsets=offsets, adapter_ids=ids, ranks=ranks, scales=scales)
    return tensors, routing_args


def run(tensors, routing_args, fn=lora_linear_multi):
    t = tensors
    return fn(t["x"], t["weight"], t["A_stack"], t["B_stack"], routing_args["segment_offsets"],
              routing_args["adapter_ids"], ranks=routing_args["ranks"], scales=routing_args["scales"], bias=t["bias"])


def error_bound(abs_value, ref, dtype, dims=(IN, OUT, R_MAX)):
    """Rigorous bound for every output and gradient (all are sums of products).

    ``abs_value`` is the same multilinear expression evaluated on |inputs| (float64), i.e.
    the sum of the absolute values of every product term.  fp32 accumulation of at most
    ``in + out + r_max + N + 3`` terms (``dims``; the longest chain: base GEMM, shrink, expand, the
    additions) gives Higham's gamma_n * abs_value; the result is rounded once to the
    output dtype.  Half types round twice more in between (the intermediate ``h = x A^T``
    or ``g = s dy B`` is stored in the input dtype, and the base result ``x W^T + b`` is
    rounded before the low-rank part is added), each at most one output unit of abs_value.
    """
    terms = sum(dims) + ref.shape[0] + 3 if ref.dim() else 1
    return summation_bound(abs_value, ref, terms, dtype) + 2 * OUTPUT_UNIT[dtype] * abs_value


def reference_and_bounds(tensors, routing_args, grad_y=None):
    """float64 reference (and gradients) plus their abs-value counterparts."""
    names = ("x", "A_stack", "B_stack")
    exact = {k: (v.detach().double().cpu().requires_grad_(k in names) if v is not None else None)
             for k, v in tensors.items()}
    absolute = {k: (v.abs().detach().requires_grad_(k in names) if v is not None else None) for k, v in exact.items()}
    abs_routing = dict(routing_args, scales=[abs(s) for s in routing_args["scales"]])
    y = run(exact, routing_args, reference.lora_linear_multi)
    y_abs = run(absolute, abs_routing, reference.lora_linear_multi)
    if grad_y is None:
        return (y.detach(),), (y_abs.detach(),)
    dy = grad_y.double().cpu()
    # allow_unused: with no segment, the stacks are not in the graph (their gradient is 0).
    grads = [torch.zeros_like(exact[k]) if g is None else g
             for k, g in zip(names, torch.autograd.grad(y, [exact[k] for k in names], dy, allow_unused=True))]
    abs_grads = [torch.zeros_like(exact[k]) if g is None else g
                 for k, g in zip(names, torch.autograd.grad(y_abs, [absolute[k] for k in names], dy.abs(),
                                                            allow_unused=True))]
    return (y.detach(), *grads), (y_abs.detach(), *abs_grads)


# --------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_forward_matches_reference(device, dtype, routing, cpu_path, generator):
    tensors, routing_args = make_problem(routing, dtype, device, generator)
    y = run(tensors, routing_args)
    assert y.dtype == dtype and y.shape == (tensors["x"].shape[0], OUT)
    (ref,), (abs_ref,) = reference_and_bounds(tensors, routing_args)
    assert_within(y.cpu(), ref, error_bound(abs_ref, ref, dtype), f"y {routing} {dtype}")


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_inference_path_equals_training_forward(device, routing, cpu_path, generator):
    """Without autograd the CPU may add each segment's products straight into y (no h
    buffer, see _infer): the same products in the same order, so the same bits."""
    tensors, routing_args = make_problem(routing, torch.float32, device, generator)
    with torch.no_grad():
        inferred = run(tensors, routing_args)
    trained = run(dict(tensors, x=tensors["x"].clone().requires_grad_()), routing_args)
    assert torch.equal(inferred, trained.detach())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("routing", ["mixed", "decode", "one_adapter", "empty"])
def test_backward_matches_reference(device, dtype, routing, cpu_path, generator):
    tensors, routing_args = make_problem(routing, dtype, device, generator)
    for name in ("x", "A_stack", "B_stack"):
        tensors[name].requires_grad_(True)
    y = run(tensors, routing_args)
    grad_y = randn(*y.shape, dtype=dtype, device=device, generator=generator)
    y.backward(grad_y)
    refs, abs_refs = reference_and_bounds(tensors, routing_args, grad_y)
    ours = (y.detach(), tensors["x"].grad, tensors["A_stack"].grad, tensors["B_stack"].grad)
    for what, value, ref, abs_ref in zip(("y", "dx", "dA", "dB"), ours, refs, abs_refs):
        assert value.dtype == dtype and value.shape == ref.shape, what
        assert_within(value.cpu(), ref, error_bound(abs_ref, ref, dtype), f"{what} {routing} {dtype}")
    # Ranks an adapter does not use, and adapters no segment uses, get exactly zero gradient.
    sizes, ids, ranks = ROUTINGS[routing]
    used = {a for a, size in zip(ids, sizes) if a >= 0 and size > 0}
    for a in range(N_ADAPTERS):
        r = ranks[a] if a in used else 0
        assert (tensors["A_stack"].grad[a, r:] == 0).all() and (tensors["B_stack"].grad[a, :, r:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("routing", ["mixed", "decode", "one_adapter", "empty"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
def test_float32_adapters_on_half_base(device, dtype, routing, grad, cpu_path, generator):
    """PEFT's default on half models (``autocast_adapter_dtype=True``): float32 adapters,
    half x / weight / bias.  The adapters' products run in float32 and are added to the
    half base output with one rounding, so the half-input bound holds (it allows two more
    roundings than this path makes); the stacks' gradients are float32 and meet the
    float32 bound (their terms, products of half values and float32 factors, are exact in
    float64); dx is half.  Float32 adapters on a float64 base (allowed, as lora_linear
    allows them): the adapters' float32 products bound every output (float32 bound)."""
    tensors, routing_args = make_problem(routing, dtype, device, generator)
    tensors["A_stack"], tensors["B_stack"] = tensors["A_stack"].float(), tensors["B_stack"].float()
    for name in ("x", "A_stack", "B_stack"):
        tensors[name].requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = run(tensors, routing_args)
    assert y.dtype == dtype
    bound_dtype = torch.float32 if dtype == torch.float64 else dtype
    if not grad:
        (ref,), (abs_ref,) = reference_and_bounds(tensors, routing_args)
        assert_within(y.cpu(), ref, error_bound(abs_ref, ref, bound_dtype), f"y {routing} {dtype}")
        return
    grad_y = randn(*y.shape, dtype=dtype, device=device, generator=generator)
    y.backward(grad_y)
    refs, abs_refs = reference_and_bounds(tensors, routing_args, grad_y)
    ours = (y.detach(), tensors["x"].grad, tensors["A_stack"].grad, tensors["B_stack"].grad)
    for what, value, ref, abs_ref, want in zip(("y", "dx", "dA", "dB"), ours, refs, abs_refs,
                                                (dtype, dtype, torch.float32, torch.float32)):
        assert value.dtype == want and value.shape == ref.shape, what
        bound = error_bound(abs_ref, ref, torch.float32 if want == torch.float64 else want)
        assert_within(value.cpu(), ref, bound, f"{what} {routing} {dtype}")


# Sizes that reach every register tile of the CPU kernels (16 float / 8 double lanes with
# AVX-512): adapter 0 (rank 40, 37 rows) packs its expand weight and splits its weight
# gradients into rank blocks of 32 and 8 (whole vectors of ranks, then rank rows);
# adapter 1 (rank 17, 5 rows) reads its weights by dot products; adapter 2 (rank 16,
# two segments of 20 rows) uses the 8-row tiles; adapter 3 (rank 3) the partial loads.
# Feature counts are not multiples of any vector width.
TILE_DIMS = (70, 67, 40)
TILE_ROUTING = ([30, 5, 11, 0, 7, 9, 18, 3], [0, 1, 2, 1, 0, 2, 3, -1], [40, 17, 16, 3])


def _stack_layout(stack: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another storage: "transposed" swaps the strides of the last two
    dimensions (A read along ranks, B along features), "strided" leaves a gap after every
    element (no unit stride at all: the kernels' general packing path)."""
    if layout == "transposed":
        return stack.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        spread = stack.new_zeros((*stack.shape[:2], 2 * stack.shape[2]))
        spread[..., ::2] = stack
        return spread[..., ::2]
    return stack


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_kernel_tiles_forward_backward(device, dtype, layout, generator, monkeypatch):
    """Several tiles and K-steps of the shrink / expand kernels (forward and every
    gradient) for each adapter-stack layout; "transposed" is MultiLoRALinear's
    rank-major lora_B."""
    monkeypatch.setattr(lora_multi_module, "_CPU_GEMM_MIN_ROWS", 10**18)
    tensors, routing_args = make_problem(TILE_ROUTING, dtype, device, generator, dims=TILE_DIMS)
    tensors["A_stack"] = _stack_layout(tensors["A_stack"], layout)
    tensors["B_stack"] = _stack_layout(tensors["B_stack"], layout)
    for name in ("x", "A_stack", "B_stack"):
        tensors[name].requires_grad_(True)
    y = run(tensors, routing_args)
    grad_y = randn(*y.shape, dtype=dtype, device=device, generator=generator)
    y.backward(grad_y)
    refs, abs_refs = reference_and_bounds(tensors, routing_args, grad_y)
    ours = (y.detach().cpu(), tensors["x"].grad.cpu(), tensors["A_stack"].grad.cpu(), tensors["B_stack"].grad.cpu())
    for what, value, ref, abs_ref in zip(("y", "dx", "dA", "dB"), ours, refs, abs_refs):
        assert_within(value, ref, error_bound(abs_ref, ref, dtype, TILE_DIMS), f"{what} {dtype}")
    for a, r in enumerate(TILE_ROUTING[2]):
        assert (tensors["A_stack"].grad[a, r:] == 0).all() and (tensors["B_stack"].grad[a, :, r:] == 0).all()

def test_autocast_matches_torch_composition(autocast_case, cpu_path, generator):
    device, dtype = autocast_case
    tensors, routing_args = make_problem("mixed", torch.float32, device, generator, dims=(128, 96, R_MAX))
    offsets, ids = routing_args["segment_offsets"], routing_args["adapter_ids"]
    ranks, scales = routing_args["ranks"], routing_args["scales"]

    def theirs(x, weight, A_stack, B_stack, bias):
        """Per segment, PEFT's adapter composed of F.linear (as its mixed-batch forward)."""
        linear = torch.nn.functional.linear
        y = linear(x, weight, bias)
        parts = []
        for s, a in enumerate(ids):
            rows = slice(offsets[s], offsets[s + 1])
            if a < 0:
                parts.append(torch.zeros_like(y[rows]))
            else:
                parts.append(linear(linear(x[rows], A_stack[a, :ranks[a]]), B_stack[a, :, :ranks[a]]) * scales[a])
        return y + torch.cat(parts)

    check_autocast_against_torch(lambda **t: run(t, routing_args), theirs, tensors, device, dtype, generator,
                                 f"lora_linear_multi {cpu_path}")


def test_batched_and_non_contiguous_x(device, cpu_path, generator):
    tensors, routing_args = make_problem("mixed", torch.float32, device, generator, batch_shape=(8, 5))
    (ref,), (abs_ref,) = reference_and_bounds(tensors, routing_args)
    ref, abs_ref = ref.reshape(-1, OUT), abs_ref.reshape(-1, OUT)
    y = run(tensors, routing_args)
    assert y.shape == (8, 5, OUT)
    bound = error_bound(abs_ref, ref, torch.float32)
    assert_within(y.reshape(-1, OUT).cpu(), ref, bound, "batched")
    # The same values in transposed storage, and a sliced (strided-row) view.
    transposed = dict(tensors, x=tensors["x"].transpose(0, 1).contiguous().transpose(0, 1))
    assert not transposed["x"].is_contiguous()
    assert_within(run(transposed, routing_args).reshape(-1, OUT).cpu(), ref, bound, "transposed x")
    wide = torch.cat([tensors["x"], tensors["x"]], dim=-1)[..., :IN]
    assert_within(run(dict(tensors, x=wide), routing_args).reshape(-1, OUT).cpu(), ref, bound, "sliced x")
    # Non-contiguous adapter stacks are read in place.
    stacks = dict(tensors, A_stack=tensors["A_stack"].transpose(1, 2).contiguous().transpose(1, 2),
                  B_stack=tensors["B_stack"].transpose(0, 1).contiguous().transpose(0, 1))
    assert_within(run(stacks, routing_args).reshape(-1, OUT).cpu(), ref, bound, "strided stacks")


def test_defaults_rank_r_max_and_scale_one(device, generator):
    tensors, routing_args = make_problem("mixed", torch.float64, device, generator, bias=False)
    t = tensors
    y = lora_linear_multi(t["x"], t["weight"], t["A_stack"], t["B_stack"], routing_args["segment_offsets"],
                          routing_args["adapter_ids"])
    ref = reference.lora_linear_multi(t["x"], t["weight"], t["A_stack"], t["B_stack"],
                                      routing_args["segment_offsets"], routing_args["adapter_ids"])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


#: test_gradcheck's routing: segments below and above the CPU GEMM threshold, an empty one,
#: id -1, rank 0 and a repeated adapter.
GRADCHECK_ROUTING = dict(segment_offsets=[0, 2, 2, 10, 11, 12], adapter_ids=[1, 2, -1, 0, 1], ranks=[2, 3, 0],
                         scales=[0.7, -1.3, 2.0])


def gradcheck_inputs(generator):
    """``(x, A_stack, B_stack, weight, bias)`` float64 leaves for GRADCHECK_ROUTING (small:
    gradcheck perturbs every input entry)."""
    n_rows, in_features, out_features = 12, 5, 4
    return tuple(randn(*shape, dtype=torch.float64, generator=generator).requires_grad_(True)
                 for shape in ((n_rows, in_features), (3, 3, in_features), (3, out_features, 3),
                               (out_features, in_features), (out_features,)))


def test_gradcheck(cpu_path, generator):
    # cpu_path forces either CPU path.
    inputs = gradcheck_inputs(generator)

    def fn(x, A_stack, B_stack, weight, bias):
        return lora_linear_multi(x, weight, A_stack, B_stack, bias=bias, **GRADCHECK_ROUTING)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_composite_matches_reference(device, dtype, routing, generator):
    """ops.composite() (and torch.func) compose torch ops: within the kernels' bound of the
    float64 reference, for every routing (ids -1, rank 0, empty segments)."""
    from lowrank_ops.ops import composite

    tensors, routing_args = make_problem(routing, dtype, device, generator)
    with composite():
        y = run(tensors, routing_args)
    (ref,), (abs_ref,) = reference_and_bounds(tensors, routing_args)
    assert y.dtype == dtype
    assert_within(y.cpu(), ref, error_bound(abs_ref, ref, dtype), f"y {routing} {dtype}")


def test_composite_second_derivatives(generator):
    """The composition is differentiable twice (the fused backward is first-order only):
    gradgradcheck on test_gradcheck's routing."""
    from lowrank_ops.ops import composite

    x, A_stack, B_stack, weight, bias = gradcheck_inputs(generator)
    offsets, ids, ranks, scales = GRADCHECK_ROUTING.values()

    def fn(x, A_stack, B_stack, weight, bias):
        with composite():
            return lora_linear_multi(x, weight, A_stack, B_stack, offsets, ids, ranks=ranks, scales=scales, bias=bias)

    assert torch.autograd.gradgradcheck(fn, (x, A_stack, B_stack, weight, bias))

    # Entries the kernels never read (beyond a rank, adapter 0 for rows of id -1): NaN
    # there stays out of the composition too (it multiplied masks and poisoned every row).
    A_nan, B_nan = A_stack.detach().clone(), B_stack.detach().clone()
    A_nan[0, 2:], A_nan[2], B_nan[2] = float("nan"), float("nan"), float("nan")  # rank 2; adapter 2 has rank 0
    fused = lora_linear_multi(x.detach(), weight.detach(), A_nan, B_nan, offsets, ids, ranks=ranks, scales=scales)
    with composite():
        composed = lora_linear_multi(x.detach(), weight.detach(), A_nan, B_nan, offsets, ids, ranks=ranks,
                                     scales=scales)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(composed, fused)


# --------------------------------------------------------------------------- torch.library / compile
def _op_samples(device, generator):
    tensors, routing_args = make_problem("mixed", torch.float32, device, generator)
    offsets = torch.tensor(routing_args["segment_offsets"], device=device)
    ids = torch.tensor(routing_args["adapter_ids"], device=device)
    ranks = torch.tensor(routing_args["ranks"], device=device)
    scales = torch.tensor(routing_args["scales"], dtype=torch.float64, device=device)
    x, A, B = tensors["x"], tensors["A_stack"], tensors["B_stack"]
    n = x.shape[0]
    h = randn(n, R_MAX, dtype=torch.float32, device=device, generator=generator)
    dy = randn(n, OUT, dtype=torch.float32, device=device, generator=generator)
    ops = torch.ops.lowrank_ops
    return [
        (ops.lora_multi_shrink.default, (x, A, offsets, ids, ranks, None, False)),
        (ops.lora_multi_shrink.default, (dy, B, offsets, ids, ranks, scales, True)),
        (ops.lora_multi_expand_.default, (dy.clone(), h, B, offsets, ids, ranks, scales, True)),
        (ops.lora_multi_expand_.default, (x.clone(), h, A, offsets, ids, ranks, None, False)),
        (ops.lora_multi_segment_outer.default, (h, x, offsets, ids, ranks, None, N_ADAPTERS, False)),
        (ops.lora_multi_segment_outer.default, (h, dy, offsets, ids, ranks, scales, N_ADAPTERS, True)),
    ]


def test_opcheck(device, cpu_path, generator):
    for op, args in _op_samples(device, generator):
        torch.library.opcheck(op, args)


def test_expand_rejects_overlapping_out(generator):
    offsets, ids, ranks = torch.tensor([0, 3]), torch.tensor([0]), torch.tensor([2])
    h, B = randn(3, 2, generator=generator), randn(1, 5, 2, generator=generator)
    out = randn(5, generator=generator).expand(3, 5)
    with pytest.raises(ValueError, match="out has overlapping rows"):
        torch.ops.lowrank_ops.lora_multi_expand_(out, h, B, offsets, ids, ranks, None, True)


def test_expand_rejects_out_sharing_memory_with_its_inputs(generator):
    """The kernel reads h and B while it writes out: an h that was a view of out gave sums
    9.3 off, silently (the long-segment addmm_ path happened to be right)."""
    offsets, ids, ranks = torch.tensor([0, 3, 7, 10]), torch.tensor([0, 2, 1]), torch.tensor([4, 2, 3])
    B = randn(3, 12, 4, generator=generator)
    buffer = randn(10, 12, generator=generator)
    with pytest.raises(ValueError, match="lora_multi_expand_: out must not share memory with h"):
        torch.ops.lowrank_ops.lora_multi_expand_(buffer, buffer[:, :4], B, offsets, ids, ranks, None, True)
    with pytest.raises(ValueError, match="lora_multi_expand_: out must not share memory with weight"):
        torch.ops.lowrank_ops.lora_multi_expand_(B.view(12, 12), randn(12, 4, generator=generator), B,
                                                 torch.tensor([0, 12]), torch.tensor([1]), torch.tensor([4]), None, True)


def _strided(tensor: torch.Tensor) -> torch.Tensor:
    """The same values with stride 2 (every other element of a buffer twice as long)."""
    spread = tensor.new_zeros(2 * tensor.numel())
    spread[::2] = tensor
    return spread[::2]


def test_strided_routing_tensors(device, cpu_path, generator):
    """Routing tensors are read through raw pointers: strided ones must be read by value."""
    tensors, routing_args = make_problem("mixed", torch.float32, device, generator)
    (ref,), (abs_ref,) = reference_and_bounds(tensors, routing_args)
    strided = {name: _strided(torch.tensor(value, device=device, dtype=torch.float64 if name == "scales" else None))
               for name, value in routing_args.items()}
    assert not any(t.is_contiguous() for t in strided.values())
    y = run(tensors, strided)
    assert_within(y.cpu(), ref, error_bound(abs_ref, ref, torch.float32), "strided routing")
    # The raw ops, with every routing tensor strided, against the contiguous ones.
    for op, args in _op_samples(device, generator):
        routed = [_strided(a) if isinstance(a, torch.Tensor) and a.dtype in (torch.int64, torch.float64) else a
                  for a in args]
        fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        strided_fresh = [a.clone() if isinstance(a, torch.Tensor) and a.is_contiguous() else a for a in routed]
        want, got = op(*fresh), op(*strided_fresh)
        if want is None:  # in place: compare the mutated first argument
            want, got = fresh[0], strided_fresh[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compile_fullgraph_forward_backward(device, generator):
    torch.manual_seed(0)
    layer = MultiLoRALinear(torch.nn.Linear(IN, OUT), max_rank=R_MAX).to(device)
    for name, rank in (("a", 4), ("b", 9), ("c", 2)):
        layer.add_adapter(name, rank, alpha=2.0 * rank, generator=generator)
    with torch.no_grad():
        layer.lora_B.copy_(randn(*layer.lora_B.shape, generator=generator))
    offsets = torch.tensor([0, 7, 7, 20, 26], device=device)
    ids = torch.tensor([1, 0, -1, 2], device=device)
    x = randn(26, IN, device=device, generator=generator)

    def step(x):
        return layer(x, adapter_ids=ids, segment_offsets=offsets).square().sum()

    eager_loss = step(x)
    eager_grads = torch.autograd.grad(eager_loss, (layer.lora_A, layer.lora_B))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, (layer.lora_A, layer.lora_B))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------- bad input
class TestBadInput:
    def setup_method(self):
        g = torch.Generator().manual_seed(5)
        self.tensors, self.routing = make_problem("mixed", torch.float32, "cpu", g)

    def call(self, **overrides):
        tensors = {k: overrides.pop(k, v) for k, v in self.tensors.items()}
        return run(tensors, dict(self.routing, **overrides))

    @pytest.mark.parametrize("offsets, message", [
        ([0, 5, 3, 24, 27, 38, 40], r"segment_offsets must be non-decreasing; got segment_offsets\[1\] = 5 > "),
        ([0, 5, 5, 24, 27, 38, 39], r"segment_offsets\[-1\] .*40.*39"),
        ([1, 5, 5, 24, 27, 38, 40], r"segment_offsets\[0\] .*1"),
        ([0, 5, 5, 24, 27, 38, 400], r"segment_offsets\[-1\]"),
    ])
    def test_bad_offsets(self, offsets, message, cpu_path):
        with pytest.raises(ValueError, match=message):
            self.call(segment_offsets=offsets)

    def test_offsets_and_ids_lengths(self):
        with pytest.raises(ValueError, match=r"adapter_ids has shape \(5,\); expected \(n_segments,\) = \(6,\)"):
            self.call(adapter_ids=[1, 2, -1, 1, 0])
        with pytest.raises(ValueError, match=r"segment_offsets has shape \(0,\)"):
            self.call(segment_offsets=[], adapter_ids=[])

    @pytest.mark.parametrize("bad_id", [4, -2, 10**12])
    def test_bad_adapter_ids(self, bad_id, cpu_path):
        with pytest.raises(ValueError, match=rf"adapter_ids\[3\] = {bad_id}; expected -1 \(no adapter\) or an adapter in \[0, 4\)"):
            self.call(adapter_ids=[1, 2, -1, bad_id, 0, 3])

    @pytest.mark.parametrize("bad_rank", [R_MAX + 1, -1])
    def test_bad_ranks(self, bad_rank, cpu_path):
        with pytest.raises(ValueError, match=rf"ranks\[2\] = {bad_rank}; expected 0 <= rank <= r_max = {R_MAX}"):
            self.call(ranks=[4, 9, bad_rank, 1])
        with pytest.raises(ValueError, match=r"ranks has shape \(3,\); expected \(n_adapters,\) = \(4,\)"):
            self.call(ranks=[4, 9, 1])

    def test_non_finite_scale(self, cpu_path):
        with pytest.raises(ValueError, match="scales"):
            self.call(scales=[1.0, float("nan"), 1.0, 1.0])

    def test_shape_mismatches(self):
        t = self.tensors
        with pytest.raises(ValueError, match=r"A_stack has shape \(4, 9, 36\); expected \(n_adapters, r_max, in_features\) = \(n_adapters, r_max, 37\)"):
            self.call(A_stack=t["A_stack"][..., :36])
        with pytest.raises(ValueError, match=r"B_stack has shape \(4, 29, 8\); expected \(n_adapters, out_features, r_max\) = \(4, 29, 9\)"):
            self.call(B_stack=t["B_stack"][..., :8])
        with pytest.raises(ValueError, match=r"x has shape \(40, 36\); expected \(\.\.\., in_features\) = \(\.\.\., 37\)"):
            self.call(x=t["x"][:, :36])
        with pytest.raises(ValueError, match=r"bias has shape \(28,\); expected \(out_features,\) = \(29,\)"):
            self.call(bias=t["bias"][:28])
        with pytest.raises(ValueError, match=r"segment_offsets\[-1\] .*39"):  # rows no longer covered
            self.call(x=t["x"][:39])

    def test_dtype_and_device_mismatches(self):
        t = self.tensors
        with pytest.raises(TypeError, match=r"A_stack has dtype torch.float64; expected torch.float32 \(the dtype of x, or float32\)"):
            self.call(A_stack=t["A_stack"].double())
        half = {name: t[name].bfloat16() for name in ("x", "weight", "bias")}
        with pytest.raises(TypeError, match=r"A_stack has dtype torch.float16; expected torch.bfloat16 or torch.float32"):
            self.call(**half, A_stack=t["A_stack"].half(), B_stack=t["B_stack"].half())
        with pytest.raises(TypeError, match=r"B_stack has dtype torch.bfloat16; expected the dtype of A_stack, torch.float32"):
            self.call(**half, B_stack=t["B_stack"].bfloat16())
        with pytest.raises(TypeError, match=r"x has dtype torch.int32; expected one of"):
            self.call(x=t["x"].int(), weight=t["weight"].int())
        with pytest.raises(ValueError, match=r"B_stack is on meta; expected the device of x, cpu"):
            self.call(B_stack=t["B_stack"].to("meta"))
        with pytest.raises(TypeError, match=r"segment_offsets has dtype torch.float32; expected an integer tensor"):
            self.call(segment_offsets=torch.tensor([0.0, 5, 5, 24, 27, 38, 40]))

    def test_cpp_rechecks_routing(self):
        """The C++ entry point validates on its own: garbage routing raises, never reads out of bounds."""
        x = torch.randn(4, 3)
        A = torch.randn(2, 2, 3)
        out = torch.zeros(4, 2)
        ranks = torch.tensor([2, 2])

        def call(offsets, ids):
            extension().segment_matmul_cpu(
                offsets=offsets.data_ptr(), ids=ids.data_ptr(), ranks=ranks.data_ptr(), scales=0, in_=x.data_ptr(),
                w=A.data_ptr(), out=out.data_ptr(), n_rows=4, n_segments=ids.numel(), n_adapters=2, r_max=2, J=3,
                C=2, in_stride_n=3, out_stride_n=2, w_stride_a=6, w_stride_j=1, w_stride_c=3, rank_on_c=True,
                accumulate=False, dtype=0, num_threads=1)

        with pytest.raises(ValueError, match=r"segment_offsets must be non-decreasing"):
            call(torch.tensor([0, 3, 1, 4]), torch.tensor([0, 1, 0]))
        with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 7"):
            call(torch.tensor([0, 1, 4]), torch.tensor([0, 7]))
        with pytest.raises(ValueError, match=r"segment_offsets\[-1\] must equal the number of rows \(4\); got 9"):
            call(torch.tensor([0, 1, 9]), torch.tensor([0, 1]))
        assert (out == 0).all()

    def test_cpp_checks_operand_sizes(self):
        """The size checks both back ends share (check_segment_matmul_sizes / _outer_sizes in
        lora_multi_cpu.cpp) name the argument and its actual value; they run before any pointer is read."""
        routing = dict(offsets=torch.tensor([0, 4]), ids=torch.tensor([0]), ranks=torch.tensor([2]))
        ptrs = {name: t.data_ptr() for name, t in routing.items()}

        def matmul(J, C, r_max=2):
            extension().segment_matmul_cpu(
                **ptrs, scales=0, in_=0, w=0, out=0, n_rows=4, n_segments=1, n_adapters=1, r_max=r_max, J=J, C=C,
                in_stride_n=0, out_stride_n=0, w_stride_a=0, w_stride_j=0, w_stride_c=0, rank_on_c=True,
                accumulate=False, dtype=0, num_threads=1)

        with pytest.raises(ValueError, match=r"segment_matmul: J and C must be >= 0; got J = -3, C = 2$"):
            matmul(J=-3, C=2)
        with pytest.raises(ValueError, match=r"segment_matmul: the rank dimension \(C = 1\) must be >= r_max = 2$"):
            matmul(J=3, C=1)
        with pytest.raises(ValueError, match=r"segment_matmul: sizes must be >= 0; got n_rows = 4, n_segments = 1, "
                                             r"n_adapters = 1, r_max = -1$"):
            matmul(J=3, C=2, r_max=-1)
        with pytest.raises(ValueError, match=r"segment_outer: J must be >= 0; got -5$"):
            extension().segment_outer_cpu(
                **ptrs, scales=0, left=0, right=0, out=0, n_rows=4, n_segments=1, n_adapters=1, r_max=2, J=-5,
                left_stride_n=0, right_stride_n=0, out_stride_a=0, out_stride_k=0, out_stride_j=0, dtype=0,
                num_threads=1)


# --------------------------------------------------------------------------- nn.MultiLoRALinear
def make_layer(device, generator, dtype=torch.float32):
    base = torch.nn.Linear(IN, OUT).to(device=device, dtype=dtype)
    layer = MultiLoRALinear(base, max_rank=R_MAX)
    for name, rank, alpha in (("fr", 4, 8.0), ("de", 9, 4.0), ("es", 1, 1.0)):
        B = randn(OUT, rank, dtype=dtype, device=device, generator=generator)
        layer.add_adapter(name, rank, alpha, lora_B=B, generator=generator)
    return layer


def test_old_module_name_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("lowrank_ops.nn.multi_lora", None)
    with pytest.warns(DeprecationWarning, match="lowrank_ops.nn.multi_lora is deprecated"):
        old = importlib.import_module("lowrank_ops.nn.multi_lora")
    assert old.MultiLoRALinear is MultiLoRALinear and old.group_rows is group_rows


def test_group_rows_round_trip(generator):
    ids = torch.randint(-1, 5, (50,), generator=generator)
    order, offsets, segment_ids = group_rows(ids)
    grouped = ids[order]
    assert offsets[0] == 0 and offsets[-1] == 50 and bool((offsets[1:] > offsets[:-1]).all())
    for s, a in enumerate(segment_ids.tolist()):
        assert (grouped[offsets[s]:offsets[s + 1]] == a).all()
    assert segment_ids.tolist() == sorted(set(ids.tolist()))
    assert torch.equal(restore_rows(grouped, order), ids)
    assert torch.equal(order[grouped == 2], (ids == 2).nonzero().flatten())  # stable


def test_multi_lora_linear_routes_rows_by_name(device, generator):
    layer = make_layer(device, generator)
    x = randn(3, 7, IN, device=device, generator=generator)
    names = [[None, "fr", "de", "es"][int(i)] for i in torch.randint(0, 4, (21,), generator=generator)]
    y = layer(x, names)
    assert y.shape == (3, 7, OUT)
    rows = x.reshape(-1, IN)
    expected = []
    for row, name in zip(rows, names):  # each row alone through its own adapter
        out = layer.base(row)
        if name is not None:
            a = layer.adapter_id(name)
            r, s = int(layer.ranks[a]), float(layer.scales[a])
            out = out + s * (row @ layer.lora_A[a, :r].T) @ layer.lora_B[a, :, :r].T
        expected.append(out)
    torch.testing.assert_close(y.reshape(-1, OUT), torch.stack(expected), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([layer.adapter_id(n) for n in names])
    torch.testing.assert_close(layer(x, adapter_ids=ids), y, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    assert layer.scales.tolist() == [2.0, 4.0 / 9.0, 1.0]


@pytest.mark.parametrize("routing", ["sorted", "one_adapter", "none"])
def test_multi_lora_linear_grouped_rows_skip_the_sort(device, generator, routing):
    """Rows already grouped (ids non-decreasing) go straight to the op; every id -1 is the
    base layer alone.  Outputs and gradients equal the explicit segment routing's."""
    layer = make_layer(device, generator)
    ids = {"sorted": [-1, -1, 0, 0, 0, 1, 2, 2], "one_adapter": [1] * 8, "none": [-1] * 8}[routing]
    x = randn(8, IN, device=device, generator=generator).requires_grad_()
    y = layer(x, adapter_ids=ids)
    dy = randn(8, OUT, device=device, generator=generator)
    y.backward(dy)
    grads = [x.grad.clone()] + [None if p.grad is None else p.grad.clone() for p in (layer.lora_A, layer.lora_B)]
    if routing == "none":
        torch.testing.assert_close(y, layer.base(x), rtol=0, atol=0)
        assert grads[1] is None and grads[2] is None  # the stacks are not in the graph
        return
    ids_tensor = torch.tensor(ids)
    segment_ids, counts = torch.unique_consecutive(ids_tensor, return_counts=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    expected = layer(x, adapter_ids=segment_ids, segment_offsets=offsets)
    expected.backward(dy)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    for got, want in zip(grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_multi_lora_linear_keeps_lora_B_rank_major(device, generator):
    """lora_B lives in a rank-major buffer (the CPU kernels read B^T in place) through
    add_adapter, training and state-dict round trips, with PEFT's shape."""
    layer = make_layer(device, generator)
    n = len(layer.adapter_names)
    assert layer.lora_B.shape == (n, OUT, R_MAX) and layer.lora_B.stride() == (R_MAX * OUT, 1, OUT)
    x = randn(6, IN, device=device, generator=generator)
    layer(x, ["fr", "de", "es", "fr", None, "de"]).square().sum().backward()
    assert layer.lora_B.grad.stride() == layer.lora_B.stride()
    copy = make_layer(device, generator)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.lora_B, layer.lora_B) and copy.lora_B.stride() == layer.lora_B.stride()


def test_multi_lora_linear_checkpoint_carries_adapter_names(device, generator):
    """The stacks are positional, so state dicts carry the names (a uint8 tensor: every
    value stays a tensor).  Loaded into a layer built with the same adapters in another
    order, the layer takes the checkpoint's order (before, each name silently got another
    adapter's factors); other adapters raise; a checkpoint without names loads by position."""
    layer = make_layer(device, generator)
    x = randn(7, IN, device=device, generator=generator)
    routing = ["fr", "de", "es", None, "es", "fr", "de"]
    expected = layer(x, routing).detach()
    state = layer.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert state["adapter_names"].dtype == torch.uint8

    def build(adapters):
        fresh = MultiLoRALinear(torch.nn.Linear(IN, OUT).to(device), max_rank=R_MAX)
        fresh.add_adapters([dict(name=name, rank=2) for name in adapters])
        return fresh

    reordered = build(["es", "fr", "de"])
    assert not reordered.load_state_dict(state).unexpected_keys
    assert reordered.adapter_names == ["fr", "de", "es"]
    assert torch.equal(reordered(x, routing), expected)
    nested = torch.nn.Sequential(build(["de", "es", "fr"]))  # under a prefix
    nested.load_state_dict(torch.nn.Sequential(layer).state_dict())
    assert nested[0].adapter_names == ["fr", "de", "es"] and torch.equal(nested[0](x, routing), expected)

    other = build(["fr", "de", "it"])
    with pytest.raises(RuntimeError, match=r"the checkpoint holds the adapters \['fr', 'de', 'es'\]; this layer "
                                           r"has \['fr', 'de', 'it'\]"):
        other.load_state_dict(state)
    positional = {key: value for key, value in state.items() if key != "adapter_names"}
    kept = build(["it", "fr", "de"])
    kept.load_state_dict(positional)  # by position: the layer's names are kept
    assert kept.adapter_names == ["it", "fr", "de"]
    assert torch.equal(kept(x, ["it", "fr", "de", None, "de", "it", "fr"]), expected)


def test_multi_lora_linear_refuses_bool_ranks():
    # isinstance(True, int): max_rank=True was accepted, and rank=True failed inside torch.rand.
    with pytest.raises(ValueError, match="max_rank must be a positive int; got True"):
        MultiLoRALinear(torch.nn.Linear(IN, OUT), max_rank=True)
    layer = MultiLoRALinear(torch.nn.Linear(IN, OUT), max_rank=R_MAX)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, max_rank = .*\]; got True"):
        layer.add_adapter("c", True)



def test_multi_lora_linear_takes_numpy_integer_ranks(generator):
    """np.int64 max_rank and adapter ranks were refused ("max_rank must be a positive int; got
    np.int64(9)"): stored as Python ints, the same adapters as Python ints."""
    np = pytest.importorskip("numpy")
    layers = []
    for convert in (int, np.int64):
        layer = MultiLoRALinear(torch.nn.Linear(IN, OUT), max_rank=convert(R_MAX))
        layer.add_adapter("a", convert(3), generator=torch.Generator().manual_seed(1))
        layer.add_adapters([{"name": "b", "rank": convert(R_MAX)}])
        assert type(layer.max_rank) is int
        layers.append(layer)
    assert layers[1].ranks.tolist() == [3, R_MAX]
    torch.testing.assert_close(layers[1].scales, layers[0].scales, rtol=0, atol=0)
    assert torch.equal(layers[1].lora_A[0], layers[0].lora_A[0])

def test_multi_lora_linear_scales_stay_float64_through_dtype_casts(generator):
    # .half() / .bfloat16() cast the float64 scales buffer too: 16/3 became 5.34375, and
    # stayed so after .float() (2e-3 relative error in the adapter term).
    layer = MultiLoRALinear(torch.nn.Linear(IN, OUT), max_rank=R_MAX)
    layer.add_adapter("a", 3, alpha=16.0, generator=generator)
    for cast in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.float()):
        cast(layer)
        assert layer.scales.dtype == torch.float64 and layer.scales.tolist() == [16.0 / 3]
    layer.add_adapter("b", 2, alpha=3.0, generator=generator)
    assert layer.scales.tolist() == [16.0 / 3, 1.5]


def test_multi_lora_linear_remove_adapter(device, generator):
    """Removing an adapter renumbers the later ones (ids are positions) and leaves the others'
    outputs and gradients bit for bit, lora_B rank-major, and a state dict that loads into a
    layer built with the remaining adapters."""
    layer = make_layer(device, generator)
    layer.add_adapter("it", 5, 3.0, lora_B=randn(OUT, 5, device=device, generator=generator), generator=generator)
    x = randn(9, IN, device=device, generator=generator)
    names = ["it", "fr", None, "es", "de", "it", "fr", "es", "de"]
    kept = [i for i, name in enumerate(names) if name != "de"]
    dy = randn(len(kept), OUT, device=device, generator=generator)
    routing = [names[i] for i in kept]
    layer(x[kept], routing).backward(dy)
    before = {name: (layer.lora_A.grad[layer.adapter_id(name)].clone(), layer.lora_B.grad[layer.adapter_id(name)].clone())
              for name in ("fr", "es", "it")}
    y_before = layer(x[kept], routing).detach()
    A, B, ranks, scales = (t.detach().clone() for t in (layer.lora_A, layer.lora_B, layer.ranks, layer.scales))

    assert layer.remove_adapter("de") == 1
    assert layer.adapter_names == ["fr", "es", "it"]
    assert [layer.adapter_id(n) for n in ("fr", "es", "it")] == [0, 1, 2]
    keep = [0, 2, 3]
    assert torch.equal(layer.lora_A, A[keep]) and torch.equal(layer.lora_B, B[keep])
    assert torch.equal(layer.ranks, ranks[keep]) and torch.equal(layer.scales, scales[keep])
    assert layer.lora_B.shape == (3, OUT, R_MAX) and layer.lora_B.stride() == (R_MAX * OUT, 1, OUT)
    assert layer.lora_A.grad is None and layer.lora_A.requires_grad and layer.lora_B.requires_grad
    y = layer(x[kept], routing)
    assert torch.equal(y, y_before)
    y.backward(dy)
    assert layer.lora_B.grad.stride() == layer.lora_B.stride()
    for name, (grad_A, grad_B) in before.items():
        a = layer.adapter_id(name)
        assert torch.equal(layer.lora_A.grad[a], grad_A) and torch.equal(layer.lora_B.grad[a], grad_B)

    fresh = MultiLoRALinear(torch.nn.Linear(IN, OUT).to(device), max_rank=R_MAX)
    fresh.add_adapters([dict(name="fr", rank=4), dict(name="es", rank=1), dict(name="it", rank=5)])
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x[kept], routing), y) and fresh.lora_B.stride() == layer.lora_B.stride()

    with pytest.raises(ValueError, match=r"remove_adapter: unknown adapter 'de'; known: \['fr', 'es', 'it'\]"):
        layer.remove_adapter("de")
    for name in ("fr", "es", "it"):
        layer.remove_adapter(name)
    assert layer.adapter_names == [] and layer.lora_A.shape == (0, R_MAX, IN) and layer.lora_B.shape == (0, OUT, R_MAX)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    assert layer.add_adapter("fr", 2) == 0


def test_multi_lora_linear_add_adapters_equals_one_by_one(device, generator):
    """add_adapters (one copy of the stacks) builds exactly what the same add_adapter calls
    build, default initializations drawing in order from a shared generator; a bad spec
    adds nothing."""
    factors = dict(lora_A=randn(3, IN, device=device, generator=generator),
                   lora_B=randn(OUT, 3, device=device, generator=generator))
    specs = [dict(name="a", rank=4, alpha=8.0), dict(name="b", rank=3, use_rslora=True, **factors),
             dict(name="c", rank=R_MAX, alpha=2.0)]
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    base = torch.nn.Linear(IN, OUT).to(device)
    one_by_one, batched = MultiLoRALinear(base, R_MAX), MultiLoRALinear(base, R_MAX)
    one_by_one.add_adapter("first", 2)
    batched.add_adapter("first", 2)
    batched.lora_A.data.copy_(one_by_one.lora_A)
    shared = torch.Generator().manual_seed(seed)
    ids = [one_by_one.add_adapter(**spec, generator=shared) for spec in specs]
    shared = torch.Generator().manual_seed(seed)
    assert batched.add_adapters([dict(spec, generator=shared) for spec in specs]) == ids == [1, 2, 3]
    assert batched.adapter_names == one_by_one.adapter_names == ["first", "a", "b", "c"]
    for name in ("lora_A", "lora_B", "ranks", "scales"):
        assert torch.equal(getattr(batched, name), getattr(one_by_one, name)), name
    assert batched.lora_B.stride() == (R_MAX * OUT, 1, OUT)
    assert batched.scales[2] == 3 / math.sqrt(3)
    assert torch.equal(batched.lora_A[2, :3], factors["lora_A"]) and not batched.lora_A[2, 3:].any()
    assert torch.equal(batched.lora_B[2, :, :3], factors["lora_B"]) and not batched.lora_B[2, :, 3:].any()

    with pytest.raises(ValueError, match=r"add_adapters: name must be a new string; got 'd' \(existing: .*'d'\]\)"):
        batched.add_adapters([dict(name="d", rank=1), dict(name="d", rank=2)])
    with pytest.raises(ValueError, match=r"add_adapters: specs\[1\] must be a mapping with keys name, rank"):
        batched.add_adapters([dict(name="d", rank=1), dict(name="e", rnak=2)])
    with pytest.raises(ValueError, match=r"add_adapters: lora_B has shape \(3, 2\); expected \(%d, 2\)" % OUT):
        batched.add_adapters([dict(name="d", rank=1), dict(name="e", rank=2, lora_B=torch.zeros(3, 2))])
    assert batched.adapter_names == ["first", "a", "b", "c"] and batched.lora_A.shape[0] == 4
    assert batched.add_adapters([]) == [] and batched.ranks.tolist() == [2, 4, 3, R_MAX]


def test_multi_lora_linear_default_init_takes_a_generator_of_the_layers_device(device):
    """A generator of the layer's device (a GPU's, for a CUDA layer) works too: the default A
    is drawn on the CPU from a generator it seeds, so the same seed gives the same A."""
    base = torch.nn.Linear(IN, OUT).to(device)
    first, second = MultiLoRALinear(base, R_MAX), MultiLoRALinear(base, R_MAX)
    for layer in (first, second):
        layer.add_adapter("a", 3, generator=torch.Generator(device=device).manual_seed(11))
    assert torch.equal(first.lora_A, second.lora_A) and first.lora_A.device.type == device
    drawn = first.lora_A[0, :3]
    assert 0 < drawn.abs().max() <= (1 + 1e-6) / math.sqrt(IN) and not first.lora_A[0, 3:].any()


def test_multi_lora_linear_trains_only_used_adapters(device, generator):
    layer = make_layer(device, generator)
    assert not layer.base.weight.requires_grad
    x = randn(10, IN, device=device, generator=generator)
    names = ["fr", "es", "fr", None, "es", "es", "fr", None, "fr", "es"]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    layer(x, names).square().mean().backward()
    optimizer.step()
    de = layer.adapter_id("de")
    assert torch.equal(layer.lora_A[de], before[0][de]) and torch.equal(layer.lora_B[de], before[1][de])
    assert not torch.equal(layer.lora_A[layer.adapter_id("fr")], before[0][layer.adapter_id("fr")])


def test_multi_lora_linear_bad_routing(generator):
    layer = make_layer("cpu", generator)
    x = torch.randn(4, IN)
    with pytest.raises(ValueError, match=r"unknown adapter 'xx'; known: \['fr', 'de', 'es'\]"):
        layer(x, ["fr", "xx", None, None])
    with pytest.raises(ValueError, match=r"adapter_names has 3 entries; expected one per row \(4\)"):
        layer(x, ["fr", None, None])
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, max_rank = 9\]; got 10"):
        layer.add_adapter("big", 10)
    with pytest.raises(ValueError, match="name must be a new string"):
        layer.add_adapter("fr", 2)
    with pytest.raises(ValueError, match="add_adapter: alpha must be finite; got nan"):
        layer.add_adapter("nan", 2, alpha=math.nan)
    with pytest.raises(TypeError, match=r"MultiLoRALinear: adapter_ids\[1\] = 0.9; expected an integer"):
        layer(x, adapter_ids=[0, 0.9, 1, 1])
    with pytest.raises(TypeError, match="MultiLoRALinear: x must be a tensor; got list"):
        layer(x.tolist(), adapter_ids=[0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"x has shape \(4, 7\); expected \(\.\.\., in_features\) = \(\.\.\., 37\)"):
        layer(torch.randn(4, 7), adapter_ids=[0, 0, 1, 1])


def test_routing_must_be_integers_and_constant(generator):
    """Float offsets are an error, not truncated; scales that require grad are an error,
    not a gradient silently dropped."""
    tensors, routing_args = make_problem("mixed", torch.float32, "cpu", generator)
    offsets = list(routing_args["segment_offsets"])
    offsets[1] += 0.5
    with pytest.raises(TypeError, match=r"lora_linear_multi: segment_offsets\[1\] = .*; expected an integer"):
        run(tensors, dict(routing_args, segment_offsets=offsets))
    with pytest.raises(TypeError, match="segment_offsets has dtype torch.float32; expected an integer tensor"):
        run(tensors, dict(routing_args, segment_offsets=torch.tensor(routing_args["segment_offsets"], dtype=torch.float32)))
    scales = torch.tensor(routing_args["scales"], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="scales requires grad; expected a constant"):
        run(tensors, dict(routing_args, scales=scales))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch's nn.Linear(0, 3)
def test_no_input_features():
    """in_features = 0: every row gets the bias alone (an empty product)."""
    weight, bias = torch.randn(3, 0), torch.randn(3)
    y = lora_linear_multi(torch.randn(2, 2, 0), weight, torch.randn(2, 4, 0), torch.randn(2, 3, 4), [0, 1, 4], [0, 1],
                          bias=bias)
    torch.testing.assert_close(y, bias.expand(2, 2, 3))
    layer = MultiLoRALinear(torch.nn.Linear(0, 3), max_rank=2)
    layer.add_adapter("a", 2)
    torch.testing.assert_close(layer(torch.randn(5, 0), adapter_ids=[0] * 5), layer.base.bias.detach().expand(5, 3))


def test_multi_lora_linear_matches_peft_mixed_batch(generator):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT))
    names, ranks = ["a0", "a1", "a2"], [4, 8, 2]
    peft_model = None
    for name, rank in zip(names, ranks):
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], init_lora_weights=False)
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    peft_layer = peft_model.base_model.model[0]
    ours = MultiLoRALinear(peft_layer.base_layer, max_rank=8)
    for name, rank in zip(names, ranks):
        ours.add_adapter(name, rank, 2 * rank, lora_A=peft_layer.lora_A[name].weight.detach(),
                         lora_B=peft_layer.lora_B[name].weight.detach())
    x = torch.randn(12, IN, generator=generator)
    routing = ["a1", "__base__", "a0", "a2", "a1", "a0", "__base__", "a2", "a2", "a0", "a1", "a1"]
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(x, adapter_names=routing)
        y = ours(x, [None if n == "__base__" else n for n in routing])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_multi_lora_linear_float32_adapters_on_a_bfloat16_base(device, generator):
    """``dtype=torch.float32`` on a half base: float32 stacks and gradients, half outputs,
    the op's float32-adapter path (same bits as calling it directly), any other dtype an
    error naming it; compiled (fullgraph) training gives the eager outputs and gradients."""
    base = torch.nn.Linear(IN, OUT).to(device=device, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"dtype is torch.float16; expected the base weight's \(torch.bfloat16\) "
                                        r"or torch.float32"):
        MultiLoRALinear(base, R_MAX, dtype=torch.float16)
    layer = MultiLoRALinear(base, R_MAX, dtype=torch.float32)
    layer.add_adapters([dict(name="a", rank=4, generator=generator), dict(name="b", rank=R_MAX, generator=generator)])
    with torch.no_grad():
        layer.lora_B.copy_(randn(*layer.lora_B.shape, device=device, generator=generator))
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = randn(6, IN, device=device, generator=generator).bfloat16()
    y = layer(x, ["b", None, "a", "a", "b", None])
    assert y.dtype == torch.bfloat16
    order = torch.tensor([1, 5, 2, 3, 0, 4])  # rows grouped by adapter id: -1, -1, 0, 0, 1, 1
    segments = dict(segment_offsets=[0, 2, 4, 6], adapter_ids=[-1, 0, 1])
    direct = lora_linear_multi(x[order], base.weight, layer.lora_A.detach(), layer.lora_B.detach(), **segments,
                               ranks=layer.ranks, scales=layer.scales, bias=base.bias)
    torch.testing.assert_close(y[order].detach(), direct, rtol=0, atol=0)
    results = []
    for model in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):  # segment routing traces whole
        layer.zero_grad()
        y = model(x[order], **segments)
        y.float().square().sum().backward()
        results.append((y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    assert results[0][1].dtype == results[0][2].dtype == torch.float32
    for eager, compiled in zip(results[0], results[1]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_compile_fullgraph_inference_path(device, generator):
    # Without autograd the op skips the autograd Function; compiled, it runs the registered
    # kernels' ops and must match the eager result (which shares one routing plan).
    x = randn(7, IN, device=device, generator=generator)
    weight = randn(OUT, IN, device=device, generator=generator)
    A_stack = randn(3, R_MAX, IN, device=device, generator=generator)
    B_stack = randn(3, OUT, R_MAX, device=device, generator=generator)
    offsets, ids = torch.tensor([0, 2, 2, 7], device=device), torch.tensor([1, -1, 2], device=device)
    call = lambda x: lora_linear_multi(x, weight, A_stack, B_stack, offsets, ids, ranks=[R_MAX, 2, 5],
                                       scales=[0.5, 2.0, 1.5])
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), call(x), rtol=0, atol=0)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_export_with_list_routing_ending_at_a_dynamic_batch(strict, generator):
    """Segment offsets given as a list ending at x.shape[0]: non-strict export traced them as
    a SymInt, refused with "segment_offsets[2] = s77; expected an integer"."""
    weight = randn(OUT, IN, generator=generator)
    A_stack, B_stack = randn(2, R_MAX, IN, generator=generator), randn(2, OUT, R_MAX, generator=generator)

    class Routed(torch.nn.Module):
        def forward(self, x):
            return lora_linear_multi(x, weight, A_stack, B_stack, [0, 2, x.shape[0]], [0, 1])

    batch = torch.export.Dim("batch", min=3)
    program = torch.export.export(Routed(), (randn(6, IN, generator=generator),), dynamic_shapes={"x": {0: batch}},
                                  strict=strict)
    x = randn(9, IN, generator=generator)
    torch.testing.assert_close(program.module()(x), Routed()(x), rtol=0, atol=0)


@pytest.mark.parametrize("where", ["lists", "device_tensors", "mixed"])
def test_routing_contents_checked_before_any_kernel(device, where):
    """Bad routing raises the same message whether it comes as sequences (checked on the
    host, then copied to the device once) or as tensors on x's device (read back once),
    and good routing of either kind gives the same result."""
    g = torch.Generator().manual_seed(11)
    tensors, routing = make_problem("mixed", torch.float32, device, g)

    def placed(routing):
        if where == "lists":
            return routing
        keys = ("segment_offsets", "adapter_ids", "ranks", "scales") if where == "device_tensors" else ("adapter_ids",)
        dtypes = dict(scales=torch.float64)
        return dict(routing, **{k: torch.tensor(routing[k], dtype=dtypes.get(k, torch.int64), device=device)
                                for k in keys})

    expected = run(tensors, routing)
    torch.testing.assert_close(run(tensors, placed(routing)), expected, rtol=0, atol=0)
    bad = [(dict(segment_offsets=[0, 5, 3, 24, 27, 38, 40]), r"segment_offsets must be non-decreasing; got "
            r"segment_offsets\[1\] = 5 > segment_offsets\[2\] = 3"),
           (dict(segment_offsets=[0, 5, 5, 24, 27, 38, 39]), r"segment_offsets\[-1\] must equal the number of rows "
            r"\(40\); got 39"),
           (dict(adapter_ids=[1, 2, -1, 4, 0, 3]), r"adapter_ids\[3\] = 4; expected -1 \(no adapter\) or an adapter "
            r"in \[0, 4\)"),
           (dict(ranks=[4, R_MAX + 1, 0, 1]), rf"ranks\[1\] = {R_MAX + 1}; expected 0 <= rank <= r_max = {R_MAX}"),
           (dict(scales=[1.0, float("inf"), 1.0, 1.0]), r"scales\[1\] = inf; expected a finite number")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            run(tensors, placed(dict(routing, **change)))


def test_host_routing_never_waits_for_the_gpu(cuda_device):
    """Routing from the host (sequences, CPU tensors, adapter names) is checked on the host and
    copied without a device synchronization: forward and backward of the op and of
    MultiLoRALinear run under torch.cuda's sync debug mode "error" and match the same calls
    made outside it."""
    g = torch.Generator().manual_seed(12)
    tensors, routing = make_problem("mixed", torch.float32, cuda_device, g)
    for t in tensors.values():
        t.requires_grad_(True)
    layer = MultiLoRALinear(torch.nn.Linear(IN, OUT).to(cuda_device), R_MAX)
    layer.add_adapters([dict(name=n, rank=r, generator=g) for n, r in (("a", 3), ("b", R_MAX))])
    names = ["b", None, "a", "a", "b", None, "b"]
    x_layer = randn(len(names), IN, device=cuda_device, generator=g)

    def calls():
        y = run(tensors, routing)
        y.square().sum().backward()
        z = layer(x_layer, names)
        z.square().sum().backward()
        return [y.detach(), z.detach()] + [t.grad.clone() for t in tensors.values()] + \
               [layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]

    expected = calls()  # also fills MultiLoRALinear's host copies of ranks and scales
    for t in list(tensors.values()) + [layer.lora_A, layer.lora_B]:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_multi_lora_host_copies_follow_the_buffers(device):
    """MultiLoRALinear's host copies of ranks and scales (kept on a GPU) follow every change
    of the buffers: adapters added and removed, scales changed in place, a loaded state dict."""
    g = torch.Generator().manual_seed(13)
    layer = MultiLoRALinear(torch.nn.Linear(IN, OUT).to(device), R_MAX)
    layer.add_adapters([dict(name=n, rank=r, alpha=2.0 * r, generator=g) for n, r in (("a", 3), ("b", R_MAX))])
    with torch.no_grad():
        layer.lora_B.copy_(randn(*layer.lora_B.shape, device=device, generator=g))
    x = randn(5, IN, device=device, generator=g)
    names = ["a", "b", None, "b", "a"]

    def expected():
        ids = torch.tensor([layer.adapter_id(n) for n in names])
        order = torch.argsort(ids, stable=True)
        counts = [int((ids == a).sum()) for a in (-1, 0, 1)]
        offsets = torch.tensor([0] + counts).cumsum(0).tolist()
        y = reference.lora_linear_multi(x[order.to(device)].double(), layer.base.weight.double(),
                                        layer.lora_A.double(), layer.lora_B.double(), offsets, [-1, 0, 1],
                                        ranks=layer.ranks.tolist(), scales=layer.scales.tolist(),
                                        bias=layer.base.bias.double())
        return restore_rows(y, order.to(device)).float()

    with torch.no_grad():
        torch.testing.assert_close(layer(x, names), expected(), rtol=1e-5, atol=1e-5)
        layer.scales.mul_(3.0)                       # in place
        torch.testing.assert_close(layer(x, names), expected(), rtol=1e-5, atol=1e-5)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.remove_adapter("a")
        layer.add_adapter("a", 2, 1.0, generator=g)  # new buffers, a different rank
        with torch.no_grad():
            layer.lora_B.copy_(randn(*layer.lora_B.shape, device=device, generator=g))
        torch.testing.assert_close(layer(x, names), expected(), rtol=1e-5, atol=1e-5)
        layer.load_state_dict(state)                 # copied in place into the buffers
        torch.testing.assert_close(layer(x, names), expected(), rtol=1e-5, atol=1e-5)


def test_meta_module_with_per_row_routing():
    """A module built on meta (low-memory loading, shape inference) takes per-row routing
    given on the host (names, ids as a list or CPU tensor): it is grouped there, and the
    ops' fake impls give the shapes.  The routing was moved to meta, where grouping raised
    "Tensor.item() cannot be called on meta tensors"."""
    with torch.device("meta"):
        module = MultiLoRALinear(torch.nn.Linear(8, 6), 4)
    module.add_adapter("a", 2)
    module.add_adapter("b", 4)
    x = torch.empty(5, 8, device="meta")
    for routing in (dict(adapter_names=["a", None, "b", "a", None]), dict(adapter_ids=[0, -1, 1, 0, -1]),
                    dict(adapter_ids=torch.tensor([1, 1, 0, 0, -1]))):
        y = module(x.reshape(5, 1, 8), **routing)
        assert y.shape == (5, 1, 6) and y.is_meta


def test_torch_func_and_compiled_composition(generator):
    """torch.func.grad / jacrev through lora_linear_multi and MultiLoRALinear (the routing
    check handed a transform's storage-less wrappers to C++: "Cannot access data pointer"),
    and a fullgraph compile inside composite() (the pybind check could not be traced)."""
    from lowrank_ops.ops import composite

    x = randn(6, 5, dtype=torch.float64, generator=generator)
    W = randn(4, 5, dtype=torch.float64, generator=generator)
    A = randn(2, 3, 5, dtype=torch.float64, generator=generator)
    B = randn(2, 4, 3, dtype=torch.float64, generator=generator)
    loss = lambda x: lora_linear_multi(x, W, A, B, [0, 2, 4, 6], [0, -1, 1], ranks=[3, 2]).square().sum()  # noqa: E731
    leaf = x.clone().requires_grad_()
    loss(leaf).backward()
    torch.testing.assert_close(torch.func.grad(loss)(x), leaf.grad)
    jacobian = torch.func.jacrev(lambda x: lora_linear_multi(x, W, A, B, [0, 2, 4, 6], [0, -1, 1]))(x)
    assert jacobian.shape == (6, 4, 6, 5)
    with pytest.raises(ValueError, match=r"adapter_ids\[2\] = 5; expected -1 \(no adapter\) or an adapter in \[0, 2\)"):
        torch.func.grad(lambda x: lora_linear_multi(x, W, A, B, [0, 2, 4, 6], [0, -1, 5]).sum())(x)
    module = MultiLoRALinear(torch.nn.Linear(5, 4).double(), 3)
    module.add_adapter("a", 3)
    params = {name: p.detach() for name, p in module.named_parameters()}
    names = ["a", None, "a", "a", None, "a"]
    per_parameter = torch.func.grad(lambda p: torch.func.functional_call(module, p, (x, names)).sum())(params)
    module(x, names).sum().backward()
    for name, p in module.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(per_parameter[name], p.grad)
    with composite():
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), loss(x))


def test_routing_is_checked_under_vmap_and_the_composed_rows_are_memory_safe():
    """Under vmap (and jacfwd) the routing's contents went unchecked (the data's values are
    not readable there), and offsets [0, 4000, 6] reached repeat_interleave(output_size=),
    which wrote past its buffer before raising: glibc aborted the process later.  Routing
    given as sequences is a plain tensor under vmap and is checked now; the composed path
    maps rows to segments by a search, memory-safe on any contents."""
    from lowrank_ops.ops.lora_multi import _composed

    x, W = torch.randn(6, 5), torch.randn(7, 5)
    A, B = torch.randn(3, 4, 5), torch.randn(3, 7, 4)
    bad = lambda v: lora_linear_multi(v, W, A, B, segment_offsets=[0, 4000, 6], adapter_ids=[0, 1])  # noqa: E731
    for transform in (lambda: torch.func.vmap(bad)(x[None]), lambda: torch.func.jacfwd(bad)(x)):
        with pytest.raises(ValueError, match="segment_offsets must be non-decreasing"):
            transform()
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] = -5; expected -1 \(no adapter\)"):
        torch.func.vmap(lambda v: lora_linear_multi(v, W, A, B, segment_offsets=[0, 4, 6], adapter_ids=[0, -5]))(x[None])
    good = lambda v: lora_linear_multi(v, W, A, B, segment_offsets=[0, 4, 6], adapter_ids=[2, -1])  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(good)(x[None])[0], good(x))
    as_tensor = lambda *values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
    out = _composed(x, W, None, A, B, as_tensor(0, 4000, 6), as_tensor(0, 7), as_tensor(4, 4, 4), None)
    assert out.shape == (6, 7) and torch.isfinite(out).all()  # wrong rows, but no write out of bounds
