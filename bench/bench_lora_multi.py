"""Benchmarks of the multi-adapter LoRA linear (ALGORITHMS.md section 2, multi-adapter paragraph).

Op: ``y = x W^T + b + s_a (x_s A_a[:r_a]^T) B_a[:, :r_a]^T`` per segment s of rows, each
segment with its adapter a (ranks cycling through 8, 16, 32, 64, capped by r_max = 64).
Rows are grouped by adapter (one segment per adapter), with ``even`` segment sizes or
``skewed`` ones (Zipf-like: the i-th adapter gets a share proportional to 1 / (i + 1)^1.5).

Ops and implementations (same inputs, same run):

* ``lora_linear_multi.fwd``: ``ours`` (:func:`lowrank_ops.ops.lora_linear_multi`, routing
  tensors built once per batch, as a server shares them across a model's layers; B_stack
  in the rank-major storage :class:`~lowrank_ops.nn.MultiLoRALinear` keeps, same values);
  ``ours_per_row`` (the same op reached from one adapter id per row, rows in a fixed
  random order through :func:`~lowrank_ops.nn.lora_multi.route_rows` (sort, gather, the op,
  restore), what ``MultiLoRALinear`` does with per-row ids; PEFT's input is a name per row too, so ``peft`` against ``ours_per_row`` is
  the like-for-like mixed-batch ratio, and ``ours`` against it the price of routing);
  ``peft`` (a PEFT 0.21 LoRA model on one ``nn.Linear`` holding the same adapters,
  called with ``adapter_names=[...]`` per row: its mixed-batch inference path);
  ``loop`` (torch: the base GEMM, then per adapter two GEMMs on the segment's rows
  and an in-place add).
* ``lora_linear_multi.fwd+bwd``: forward plus the gradients of x and both stacks:
  ``ours`` and ``loop`` (autograd through the loop).  PEFT's mixed batch is
  inference-only (its docs), so it has no fwd+bwd case.
* ``lora_multi_shrink`` / ``lora_multi_expand``: the two gathered kernels alone
  (``h = x A^T`` per segment; ``y += s h B^T``), ``ours`` against the ``loop`` of
  per-segment torch GEMMs.  Their GB/s against the card's copy bandwidth is the GPU
  figure of merit (both are memory-bound at r <= 64).

Sizes: default in = out = 256, N = 256 rows, 1 / 8 / 32 adapters, float32.
``LOWRANK_OPS_BENCH_FULL=1``: LLaMA-like 4096 x 4096, N = 512 (CPU) and 512 / 4096 (CUDA).

Roofline (``flops``, ``bytes`` of every case, the same for every impl): forward
``2 N in out + 2 sum_rows r (in + out)`` flops; bytes: x, W, b, y and the used ranks of
the used adapters, once.  fwd+bwd: three times the flops (dx, and dA + dB), bytes plus
dy, dx, the stacks' gradients.  Shrink: ``2 sum_rows r in`` flops on
``x + h + used A`` bytes; expand: ``2 sum_rows r out`` on ``h + 2 y + used B``.
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Tuple

import pytest
import torch
import torch.nn.functional as F

from lowrank_ops import reference
from lowrank_ops.nn.lora_multi import route_rows
from lowrank_ops.ops import lora_linear_multi

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, rel_error, require_device

FAMILY = "lora_multi"
SEED = 0
R_MAX = 64
ALPHA = 16.0
_RANK_CYCLE = (8, 16, 32, 64)

# (in_features, out_features, n_adapters, n_rows, skew)
_ADAPTERS = (1, 8, 32)
if FULL:
    _ROWS = {"cpu": (512,), "cuda": (512, 4096)}
    _SHAPE = (4096, 4096)
else:
    _ROWS = {device: (256,) for device in DEVICES}
    _SHAPE = (256, 256)
# Every adapter count with even segments, the skewed split for 8 and 32 adapters; the
# kernels alone at 8 adapters, even (quick) or every problem (full).
_PROBLEMS = {
    device: [(*_SHAPE, n_adapters, n, skew) for n in _ROWS[device] for n_adapters in _ADAPTERS
             for skew in ("even", "skewed") if skew == "even" or n_adapters > 1]
    for device in DEVICES
}
_KERNEL_PROBLEMS = {
    device: [p for p in problems if FULL or (p[2] == 8 and p[4] == "even")] for device, problems in _PROBLEMS.items()
}


def _label(problem: tuple) -> str:
    in_features, out_features, n_adapters, n, skew = problem
    return f"{out_features}x{in_features} N={n} adapters={n_adapters} {skew}"


CASES_FWD = grid_cases(FAMILY, "lora_linear_multi.fwd", _PROBLEMS,
                       {"float32": ("ours", "ours_per_row", "peft", "loop")}, _label)
CASES_FWD_BWD = grid_cases(FAMILY, "lora_linear_multi.fwd+bwd", _PROBLEMS, {"float32": ("ours", "loop")}, _label)
CASES_SHRINK = grid_cases(FAMILY, "lora_multi_shrink", _KERNEL_PROBLEMS, {"float32": ("ours", "loop")}, _label)
CASES_EXPAND = grid_cases(FAMILY, "lora_multi_expand", _KERNEL_PROBLEMS, {"float32": ("ours", "loop")}, _label)


# ---------------------------------------------------------------------------- inputs
class Inputs(NamedTuple):
    x: torch.Tensor  # [N, in]
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor  # [out]
    A_stack: torch.Tensor  # [n_adapters, R_MAX, in]
    B_stack: torch.Tensor  # [n_adapters, out, R_MAX]
    dy: torch.Tensor  # [N, out]
    offsets: List[int]  # segment bounds, one segment per adapter
    ranks: List[int]
    scales: List[float]

    @property
    def segments(self) -> List[Tuple[int, int, int]]:
        """(adapter, first row, end row) of every non-empty segment."""
        return [(a, lo, hi) for a, (lo, hi) in enumerate(zip(self.offsets[:-1], self.offsets[1:])) if hi > lo]


def _segment_sizes(n: int, n_adapters: int, skew: str) -> List[int]:
    weights = [1.0 if skew == "even" else 1.0 / (i + 1) ** 1.5 for i in range(n_adapters)]
    sizes = [int(n * w / sum(weights)) for w in weights]
    sizes[0] += n - sum(sizes)
    return sizes


@functools.lru_cache(maxsize=2)
def _inputs(problem: tuple, device: str) -> Inputs:
    in_features, out_features, n_adapters, n, skew = problem
    generator = torch.Generator().manual_seed(SEED)
    ranks = [_RANK_CYCLE[a % len(_RANK_CYCLE)] for a in range(n_adapters)]
    A = torch.zeros(n_adapters, R_MAX, in_features)
    B = torch.zeros(n_adapters, out_features, R_MAX)
    for a, r in enumerate(ranks):  # only the used ranks are nonzero, as after add_adapter
        A[a, :r] = torch.randn(r, in_features, generator=generator) / in_features**0.5
        B[a, :, :r] = torch.randn(out_features, r, generator=generator) / r**0.5
    sizes = _segment_sizes(n, n_adapters, skew)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    tensors = (
        torch.randn(n, in_features, generator=generator),
        torch.randn(out_features, in_features, generator=generator) / in_features**0.5,
        torch.randn(out_features, generator=generator),
        A, B,
        torch.randn(n, out_features, generator=generator),
    )
    return Inputs(*(t.to(device) for t in tensors), offsets, ranks, [ALPHA / r for r in ranks])


@functools.lru_cache(maxsize=4)
def _reference(problem: tuple, device: str, backward: bool) -> Tuple[torch.Tensor, ...]:
    """float64 ``(y,)`` or ``(y, dx, dA, dB)``: the per-segment loop of lowrank_ops.reference."""
    inp = _inputs(problem, device)
    x, A, B = (t.double().requires_grad_(backward) for t in (inp.x, inp.A_stack, inp.B_stack))
    y = reference.lora_linear_multi(x, inp.weight.double(), A, B, inp.offsets, list(range(len(inp.ranks))),
                                    ranks=inp.ranks, scales=inp.scales, bias=inp.bias.double())
    if not backward:
        return (y.detach(),)
    return (y.detach(), *torch.autograd.grad(y, (x, A, B), inp.dy.double()))


def _roofline(inp: Inputs, op: str) -> Tuple[float, float]:
    n, in_features = inp.x.shape
    out_features = inp.weight.shape[0]
    element = inp.x.element_size()
    rank_rows = sum(inp.ranks[a] * (hi - lo) for a, lo, hi in inp.segments)
    used_ranks = sum(inp.ranks[a] for a, _, _ in inp.segments)
    if op == "lora_multi_shrink":
        return 2.0 * rank_rows * in_features, element * (n * in_features + n * R_MAX + used_ranks * in_features)
    if op == "lora_multi_expand":
        return 2.0 * rank_rows * out_features, element * (n * R_MAX + 2 * n * out_features + used_ranks * out_features)
    flops = 2.0 * n * in_features * out_features + 2.0 * rank_rows * (in_features + out_features)
    adapters = used_ranks * (in_features + out_features)
    moved = element * (n * (in_features + out_features) + in_features * out_features + out_features + adapters)
    if op.endswith("fwd+bwd"):
        return 3 * flops, 2 * moved + element * adapters
    return flops, moved


# ---------------------------------------------------------------------------- implementations
def _loop_forward(inp: Inputs, x, As, Bs) -> torch.Tensor:
    """The plain-torch peer: base GEMM, then two GEMMs per adapter on its rows' slice.

    ``As[a]`` ``[r_a, in]`` and ``Bs[a]`` ``[out, r_a]`` are separate tensors per adapter,
    as PEFT holds them: slices of one stacked leaf would make autograd accumulate a
    zero-padded full-stack gradient per adapter.

    Without autograd the updates are added in place (no temporary); with autograd they
    are concatenated and added once, because in-place adds into slices of y would make
    autograd copy the whole ``[N, out]`` gradient once per segment (CopySlices).
    Every row belongs to a segment in this suite, so the concatenation covers y.
    """
    y = F.linear(x, inp.weight, inp.bias)
    updates = []
    for a, lo, hi in inp.segments:
        update = (x[lo:hi] @ As[a].T) @ Bs[a].T
        if torch.is_grad_enabled() and x.requires_grad:
            updates.append(update * inp.scales[a])
        else:
            y[lo:hi].add_(update, alpha=inp.scales[a])
    return y + torch.cat(updates) if updates else y


def _per_adapter(inp: Inputs, A_stack, B_stack, grad: bool):
    """Each adapter's used factors as separate tensors (leaves when ``grad``)."""
    As = [A_stack[a, :r].detach().clone().requires_grad_(grad) for a, r in enumerate(inp.ranks)]
    Bs = [B_stack[a, :, :r].detach().clone().requires_grad_(grad) for a, r in enumerate(inp.ranks)]
    return As, Bs


@functools.lru_cache(maxsize=2)
def _routing_tensors(problem: tuple, device: str) -> dict:
    """The routing as tensors, built once per batch (a server shares them across all layers)."""
    inp = _inputs(problem, device)
    return dict(
        segment_offsets=torch.tensor(inp.offsets, device=device),
        adapter_ids=torch.arange(len(inp.ranks), device=device),
        ranks=torch.tensor(inp.ranks, device=device),
        scales=torch.tensor(inp.scales, dtype=torch.float64, device=device),
    )


@functools.lru_cache(maxsize=1)
def _row_order(problem: tuple, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(perm, row_ids)``: a fixed random order of the rows and each row's adapter in it."""
    inp = _inputs(problem, device)
    ids = torch.cat([torch.full((hi - lo,), a, dtype=torch.int64) for a, lo, hi in inp.segments])
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(SEED + 1))
    return perm.to(device), ids[perm].to(device)


def _ours_per_row(inp: Inputs, routing: dict, x_rows, row_ids, B_stack) -> torch.Tensor:
    def run(rows, offsets, segment_ids):
        return lora_linear_multi(rows, inp.weight, inp.A_stack, B_stack, offsets, segment_ids,
                                 ranks=routing["ranks"], scales=routing["scales"], bias=inp.bias)

    return route_rows(x_rows, row_ids, run)


def _rank_major(B_stack: torch.Tensor) -> torch.Tensor:
    """B_stack with the storage MultiLoRALinear keeps its lora_B in (rank-major: the CPU
    kernels read B^T rows in place instead of packing them per call); same values."""
    return B_stack.transpose(1, 2).contiguous().transpose(1, 2)


def _ours_forward(inp: Inputs, routing: dict, x, A_stack, B_stack) -> torch.Tensor:
    return lora_linear_multi(x, inp.weight, A_stack, B_stack, bias=inp.bias, **routing)


@functools.lru_cache(maxsize=1)
def _peft_model(problem: tuple, device: str):
    """A PEFT LoRA model on one nn.Linear holding the problem's adapters (weights copied in)."""
    peft = pytest.importorskip("peft")
    inp = _inputs(problem, device)
    out_features, in_features = inp.weight.shape
    linear = torch.nn.Linear(in_features, out_features).to(device)
    with torch.no_grad():
        linear.weight.copy_(inp.weight)
        linear.bias.copy_(inp.bias)
    model = torch.nn.Sequential(linear)
    peft_model = None
    for a, r in enumerate(inp.ranks):
        config = peft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["0"], lora_dropout=0.0)
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=f"a{a}")
        else:
            peft_model.add_adapter(f"a{a}", config)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        for a, r in enumerate(inp.ranks):
            layer.lora_A[f"a{a}"].weight.copy_(inp.A_stack[a, :r])
            layer.lora_B[f"a{a}"].weight.copy_(inp.B_stack[a, :, :r])
    names = [f"a{a}" for a, lo, hi in inp.segments for _ in range(hi - lo)]
    return peft_model.eval(), names


def _build(case: Case, inp: Inputs) -> Callable[[], Callable]:
    op = case.op
    if op == "lora_linear_multi.fwd":
        if case.impl == "peft":
            model, names = _peft_model(case.problem, case.device)
            return lambda: torch.no_grad()(lambda: model(inp.x, adapter_names=names))
        if case.impl == "ours":
            routing = _routing_tensors(case.problem, case.device)
            B_stack = _rank_major(inp.B_stack)
            return lambda: (lambda: _ours_forward(inp, routing, inp.x, inp.A_stack, B_stack))
        if case.impl == "ours_per_row":
            routing = _routing_tensors(case.problem, case.device)
            B_stack = _rank_major(inp.B_stack)
            perm, row_ids = _row_order(case.problem, case.device)
            x_rows = inp.x.index_select(0, perm)
            return lambda: (lambda: _ours_per_row(inp, routing, x_rows, row_ids, B_stack))

        def build_loop():
            As, Bs = _per_adapter(inp, inp.A_stack, inp.B_stack, grad=False)
            return lambda: _loop_forward(inp, inp.x, As, Bs)

        return build_loop

    if op == "lora_linear_multi.fwd+bwd":

        def build():
            x = inp.x.detach().clone().requires_grad_()
            if case.impl == "ours":
                A, B = (t.detach().clone().requires_grad_() for t in (inp.A_stack, _rank_major(inp.B_stack)))
                routing = _routing_tensors(case.problem, case.device)

                def run():
                    y = _ours_forward(inp, routing, x, A, B)
                    return (y,) + torch.autograd.grad(y, (x, A, B), inp.dy)

                return run
            As, Bs = _per_adapter(inp, inp.A_stack, inp.B_stack, grad=True)

            def run_loop():
                y = _loop_forward(inp, x, As, Bs)
                grads = torch.autograd.grad(y, (x, *As, *Bs), inp.dy, allow_unused=True)
                return y, grads[0], grads[1:1 + len(As)], grads[1 + len(As):]

            return run_loop

        return build

    offsets = torch.tensor(inp.offsets, device=inp.x.device)
    ids = torch.arange(len(inp.ranks), device=inp.x.device)
    ranks = torch.tensor(inp.ranks, device=inp.x.device)
    scales = torch.tensor(inp.scales, dtype=torch.float64, device=inp.x.device)
    ops = torch.ops.lowrank_ops
    h = ops.lora_multi_shrink(inp.x, inp.A_stack, offsets, ids, ranks, None, False)
    if op == "lora_multi_shrink":
        if case.impl == "ours":
            return lambda: (lambda: ops.lora_multi_shrink(inp.x, inp.A_stack, offsets, ids, ranks, None, False))

        def shrink_loop():
            out = inp.x.new_zeros(inp.x.shape[0], R_MAX)
            for a, lo, hi in inp.segments:
                out[lo:hi, :inp.ranks[a]] = inp.x[lo:hi] @ inp.A_stack[a, :inp.ranks[a]].T
            return out

        return lambda: shrink_loop
    y = torch.zeros_like(inp.dy)
    if case.impl == "ours":
        B_stack = _rank_major(inp.B_stack)
        return lambda: (lambda: (ops.lora_multi_expand_(y, h, B_stack, offsets, ids, ranks, scales, True), y)[1])

    def expand_loop():
        for a, lo, hi in inp.segments:
            r = inp.ranks[a]
            y[lo:hi].addmm_(h[lo:hi, :r], inp.B_stack[a, :, :r].T, alpha=inp.scales[a])
        return y

    return lambda: expand_loop


def _check(case: Case, inp: Inputs):
    if case.op in ("lora_multi_shrink", "lora_multi_expand"):
        h = torch.zeros(inp.x.shape[0], R_MAX, dtype=torch.float64, device=inp.x.device)
        for a, lo, hi in inp.segments:
            h[lo:hi, :inp.ranks[a]] = inp.x[lo:hi].double() @ inp.A_stack[a, :inp.ranks[a]].double().T
        if case.op == "lora_multi_shrink":
            return lambda out: rel_error([out], [h])
        # The timed expand accumulates into one buffer over the rounds: check the first call only.
        expected = torch.zeros_like(inp.dy, dtype=torch.float64)
        for a, lo, hi in inp.segments:
            r = inp.ranks[a]
            expected[lo:hi] += inp.scales[a] * h[lo:hi, :r].float().double() @ inp.B_stack[a, :, :r].double().T
        return lambda out: rel_error([out], [expected])
    backward = case.op.endswith("fwd+bwd")
    refs = _reference(case.problem, case.device, backward)

    def stacked(grads, like):
        """Per-adapter gradients (the loop's) zero-padded into the stack's shape."""
        if isinstance(grads, torch.Tensor):
            return grads
        out = torch.zeros_like(like, dtype=grads[0].dtype if grads else like.dtype)
        for a, (g, r) in enumerate(zip(grads, inp.ranks)):
            if g is not None:
                (out[a, :r] if like is inp.A_stack else out[a, :, :r]).copy_(g)
        return out

    if backward:
        return lambda out: rel_error(
            [out[0], out[1], stacked(out[2], inp.A_stack), stacked(out[3], inp.B_stack)], refs)
    if case.impl == "ours_per_row":  # its rows come in the random order: put them back first
        perm, _ = _row_order(case.problem, case.device)
        return lambda out: rel_error([torch.empty_like(out).index_copy_(0, perm, out)], refs)
    return lambda out: rel_error([out], refs)


def _run(benchmark, case: Case) -> None:
    require_device(case.device)
    inp = _inputs(case.problem, case.device)
    flops, moved = _roofline(inp, case.op)
    measure(benchmark, case, _build(case, inp), _check(case, inp), flops=flops, bytes=moved)


@pytest.mark.parametrize("case", params(CASES_FWD))
def test_forward(benchmark, case: Case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", params(CASES_FWD_BWD))
def test_forward_backward(benchmark, case: Case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", params(CASES_SHRINK))
def test_shrink(benchmark, case: Case):
    _run(benchmark, case)


@pytest.mark.parametrize("case", params(CASES_EXPAND))
def test_expand(benchmark, case: Case):
    _run(benchmark, case)
