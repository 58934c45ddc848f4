"""Numerical helpers for the tests: rigorous error bounds and fresh random data."""
from __future__ import annotations

import torch

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Unit roundoff of the accumulator (fp64 for fp64 inputs, fp32 otherwise) and of the
# output dtype (the one final rounding of each result).
ACCUMULATE_UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24}
OUTPUT_UNIT = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def summation_bound(abs_sum: torch.Tensor, reference: torch.Tensor, terms: int, dtype: torch.dtype) -> torch.Tensor:
    """Rigorous elementwise error bound of a dot product of ``terms`` products.

    Any summation order in the accumulator obeys ``|fl(sum) - sum| <= gamma_n * sum|a_i b_i|``
    with ``gamma_n = n u / (1 - n u)`` (Higham, Accuracy and Stability of Numerical
    Algorithms, eq. 3.5), plus one rounding of the result to the output dtype.  The
    inputs themselves are exact (the float64 reference is computed from the same,
    already rounded values), so this bound is not a tolerance chosen to pass.
    """
    n = max(terms, 1) + 1
    u = ACCUMULATE_UNIT[dtype]
    gamma = n * u / (1 - n * u)
    tiny = torch.finfo(dtype).tiny  # results that underflow to subnormals
    return gamma * abs_sum + OUTPUT_UNIT[dtype] * reference.abs() * (1 + gamma) + tiny


def assert_within(actual: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    error = (actual.double() - reference).abs()
    excess = error - bound
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    assert excess.max().item() <= 0 if excess.numel() else True, (
        f"{what}: error {error.max().item():.3e} exceeds the bound at "
        f"{int(excess.argmax())} (bound there {bound.flatten()[int(excess.argmax())].item():.3e})"
    )


def assert_is_base_product(layer_output: torch.Tensor, x: torch.Tensor, base: torch.nn.Linear, what: str) -> None:
    """``layer_output`` (float32) is ``base(x)`` within the float64-derived bound of an
    ``in_features``-term dot product plus the bias: what an adapter that adds exact zeros
    (a zero factor or gate) must give, in whatever order its products sum."""
    expected = x.double() @ base.weight.double().T + base.bias.double()
    abs_sum = x.double().abs() @ base.weight.double().abs().T + base.bias.double().abs()
    terms = base.in_features + 1
    assert_within(layer_output, expected, summation_bound(abs_sum, expected, terms, torch.float32), what)


def check_autocast_against_torch(ours, theirs, inputs: dict, device: str, dtype: torch.dtype, generator,
                                 what: str) -> None:
    """``ours(**inputs)`` against ``theirs(**inputs)``, the same function composed of torch
    ops (``F.linear`` ...), both under ``torch.autocast(device, dtype)`` on float32 leaves.

    Asserts: the same output dtype (the autocast dtype); parameter gradients in the
    parameters' dtype (float32), the same whether ``backward()`` is called inside the
    autocast region or after it; and, against ``theirs`` evaluated in float64 without
    autocast, our maximum error at most twice torch's, for the output and every gradient
    (DESIGN.md section 6's rule for half types: both round the same operands to the
    autocast dtype, so the bound compares the roundings inside the ops).
    """
    leaves = [{k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
              for _ in range(2)]
    with torch.autocast(device, dtype=dtype):
        y_ours, y_theirs = ours(**leaves[0]), theirs(**leaves[1])
    assert y_ours.dtype == y_theirs.dtype == dtype, (what, y_ours.dtype, y_theirs.dtype)
    doubles = {k: v.double().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    expected = theirs(**doubles)
    grad_y = torch.randn(expected.shape, dtype=torch.float64, generator=generator).to(device)
    torch.autograd.backward(expected, grad_y)
    y_ours.backward(grad_y.to(dtype))
    y_theirs.backward(grad_y.to(dtype))
    pairs = [("y", y_ours, y_theirs, expected)]
    pairs += [(f"d{k}", leaves[0][k].grad, leaves[1][k].grad, v.grad) for k, v in doubles.items()
              if v.is_floating_point()]
    # backward() called inside the autocast region: the same gradients.
    inside = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.autocast(device, dtype=dtype):
        ours(**inside).backward(grad_y.to(dtype))
    for k, v in inside.items():
        if v.is_floating_point():
            torch.testing.assert_close(v.grad, leaves[0][k].grad, rtol=0, atol=0, msg=f"{what} d{k}, backward in autocast")
    for name, mine, torchs, want in pairs:
        if name != "y":
            assert mine.dtype == inputs[name[1:]].dtype, (what, name, mine.dtype)
        mine_error = (mine.double() - want).abs().max().item()
        torch_error = (torchs.double() - want).abs().max().item()
        assert mine_error <= 2 * torch_error, f"{what} {name}: error {mine_error:.3e}, torch's {torch_error:.3e}"


def randn(*shape, dtype=torch.float32, device="cpu", generator=None) -> torch.Tensor:
    """Fresh N(0, 1) data rounded to ``dtype`` (never zeros)."""
    return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)


def with_spectrum(m: int, n: int, s: torch.Tensor, generator, batch=()) -> torch.Tensor:
    """``A [*batch, m, n] = U diag(s) V^T`` in float64 from random orthonormal ``U [m, k]``,
    ``V [n, k]`` (``k = len(s)``): a matrix with exactly the singular values ``s``."""
    k = s.shape[-1]
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=generator, dtype=torch.float64)).Q
    return (U * s) @ V.transpose(-2, -1)


def forward_backward(model, inputs, upstream: torch.Tensor = None):
    """``model(*inputs)``, then backward of ``(y * upstream).sum()`` (``upstream`` random of
    y's shape, drawn by the caller, so that every output entry has its own weight), from
    zeroed gradients.  Returns ``[y, grad of each trainable parameter (None where it got
    none), grad of each input that requires grad]``, detached copies, in that order."""
    params = [p for p in model.parameters() if p.requires_grad]
    for t in params + [t for t in inputs if t.requires_grad]:
        t.grad = None
    y = model(*inputs)
    (y * upstream).sum().backward()
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    return [y.detach().clone()] + grads + [t.grad.detach().clone() for t in inputs if t.requires_grad]


def assert_compiled_matches_eager(model, inputs, generator, *, compiled=None) -> None:
    """``model``'s forward and backward under :func:`compile_fullgraph` (or ``compiled``,
    a compiled version of ``model``) against eager: the output, every trainable
    parameter's gradient and the inputs' gradients, bit for bit.

    Bitwise, not within a tolerance: ``aot_eager`` traces the forward and backward into
    graphs of the same aten ops and runs them with the same kernels on the same data, in the
    same order, so a single differing bit means the traced graph computes something else (a
    lost in-place update, a stale Python attribute baked into the graph, a missing
    gradient).  A gradient that is None in one run must be None in the other."""
    compiled = compile_fullgraph(model) if compiled is None else compiled
    y = model(*[t.detach() for t in inputs])
    upstream = torch.randn(y.shape, dtype=torch.float64, generator=generator).to(y.device, y.dtype)
    eager = forward_backward(model, inputs, upstream)
    traced = forward_backward(compiled, inputs, upstream)
    names = ["y"] + [f"d {name}" for name, p in model.named_parameters() if p.requires_grad]
    names += [f"d input {i}" for i, t in enumerate(inputs) if t.requires_grad]
    assert any(g is not None for g in eager[1:]), "nothing got a gradient: the test would check only the forward"
    for name, want, got in zip(names, eager, traced):
        assert (want is None) == (got is None), f"{name}: eager gives {want is not None}, compiled {got is not None}"
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def compile_fullgraph(model):
    """``torch.compile(model, fullgraph=True, backend="aot_eager")``: the tests' compiler
    (traced forward and backward graphs run with eager kernels, so results are bitwise
    those of eager; inductor would add its own codegen to what is tested)."""
    return torch.compile(model, fullgraph=True, backend="aot_eager")


def assert_training_compiles(run) -> None:
    """``run(wrap)`` builds a seeded model and the method's objects, trains a few steps
    through ``wrap(model)`` for the forward and backward, and returns ``{name: tensor}``
    (losses, final parameters, ...).  Run eagerly (``wrap`` the identity) and through
    :func:`compile_fullgraph`, the results must agree bit for bit (see
    :func:`assert_compiled_matches_eager`): whatever the method changes between steps (a
    rank, a sample, weights rewritten in place, replaced submodules) reaches the compiled
    graphs, through their inputs or a recompilation, and is never baked in stale."""
    eager = run(lambda model: model)
    traced = run(compile_fullgraph)
    assert list(traced) == list(eager)
    for name, want in eager.items():
        torch.testing.assert_close(traced[name], want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def assert_adam_fits(layer, x: torch.Tensor, y_target: torch.Tensor, steps: int, lr: float = 0.05) -> None:
    """Adam on ``layer``'s parameters for ``steps`` full-batch steps lowers the MSE to
    ``y_target`` below 1e-3 of its start (targets the layer's family can reach exactly)."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    start = torch.nn.functional.mse_loss(layer(x), y_target).item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), y_target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-3 * start, (start, loss.item())


def assert_tensor_lr_follows_float_lr(build, steps: int = 4) -> None:
    """An optimizer given ``lr`` as a one-element tensor (as torch's optimizers accept)
    trains bit for bit as with the float, under torch's ``LambdaLR``, which fills a
    tensor lr in place; a bad tensor is refused naming ``lr``, and a NaN filled in later
    raises at the next step before any parameter or state changes.

    ``build(lr) -> (model, optimizer, loss_fn)``: a fresh model (same seed every call)
    and its optimizer with that ``lr``; ``loss_fn()`` a loss on fixed data."""
    import copy

    import pytest

    runs = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64)):  # float64: the same value as the float
        model, optimizer, loss_fn = build(lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn().backward()
            optimizer.step()
            scheduler.step()
        if isinstance(lr, torch.Tensor):
            assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.05 * 0.5 ** steps  # filled in place
        runs.append([p.detach().clone() for p in model.parameters()])
    for float_run, tensor_run in zip(*runs):
        assert torch.equal(float_run, tensor_run)
    for bad in (torch.tensor([0.1, 0.2]), torch.tensor(1), torch.tensor(-0.1)):
        with pytest.raises(ValueError, match="lr must be|Invalid learning rate"):
            build(bad)
    model, optimizer, loss_fn = build(torch.tensor(0.05))
    optimizer.zero_grad()
    loss_fn().backward()
    optimizer.param_groups[0]["lr"].fill_(float("nan"))  # e.g. a broken schedule
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict()["state"])
    with pytest.raises(ValueError, match="[A-Za-z]+: lr must be .*; got nan"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert repr(optimizer.state_dict()["state"]) == repr(state)


def assert_backward_ignores_autocast(forward, inputs, dtype=torch.bfloat16) -> None:
    """``backward()`` called inside a CPU ``torch.autocast`` region gives the same gradients
    as outside it (an autograd Function whose backward ran its products under the region
    computed them in ``dtype``: 4e-3 relative in bfloat16, or crashed on a dtype mismatch).

    ``forward(*inputs)`` returns a tensor (or a tuple, the first entry used); ``inputs``
    are leaves requiring grad."""
    grads = []
    for inside in (False, True):
        for t in inputs:
            t.grad = None
        out = forward(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        with torch.autocast("cpu", dtype=dtype, enabled=inside):
            out.backward(upstream)
        grads.append([t.grad.clone() for t in inputs])
    for outside, within in zip(*grads):
        assert outside.dtype == within.dtype and torch.equal(outside, within)


def assert_meta_build_loads(build, saved, x: torch.Tensor) -> None:
    """``build()`` under ``torch.device("meta")`` runs shapes only, and loaded with ``saved``'s
    state dict (after ``to_empty()``, or with ``assign=True``) is ``saved``'s layer on ``x``."""
    for assign in (False, True):
        with torch.device("meta"):
            layer = build()
        assert layer(torch.empty(x.shape, device="meta")).shape == saved(x).shape
        if not assign:
            layer.to_empty(device="cpu")
        layer.load_state_dict(saved.state_dict(), assign=assign)
        assert torch.equal(layer(x), saved(x))


def assert_meta_build_resets_to(build, built, refusal: str):
    """``build()`` under ``torch.device("meta")``, then ``to_empty()``: the forward refuses
    (``refusal``, a regex) until ``reset_parameters()``, which (with ``built``'s base layer
    copied in) gives ``built``'s state dict; one SGD step then stays finite.  Returns the layer."""
    import pytest

    with torch.device("meta"):
        layer = build()
    layer.to_empty(device="cpu")
    x = torch.randn(5, layer.base_layer.in_features)
    with pytest.raises(RuntimeError, match=refusal):
        layer(x)
    with torch.no_grad():
        layer.base_layer.load_state_dict(built.base_layer.state_dict())
    layer.reset_parameters()
    for (name, a), (_, b) in zip(built.state_dict().items(), layer.state_dict().items()):
        assert torch.equal(a, b), name
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    optimizer.step()
    assert all(p.isfinite().all() for p in layer.parameters()) and layer(x).isfinite().all()
    return layer
