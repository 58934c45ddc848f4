"""DoRA: the row-norm kernel (low-rank identity), dora_linear forward/backward, PEFT parity."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import lowrank_ops.nn.lora as lora_module
import lowrank_ops.ops.dora as dora_module
from lowrank_ops import reference
from lowrank_ops._extension import extension
from lowrank_ops.nn import LoRALinear
from lowrank_ops.ops import dora_linear, dora_row_norm
from lowrank_ops.ops.dora import _kernel_args
from lowrank_ops.ops.lora import draw_seed

from helpers import ACCUMULATE_UNIT, assert_within, check_autocast_against_torch, randn, summation_bound

NAMES = ("x", "weight", "lora_A", "lora_B", "magnitude", "bias")


def make_problem(out_features, in_features, rank, batch_shape, dtype, device, generator):
    t = dict(
        x=randn(*batch_shape, in_features, dtype=dtype, device=device, generator=generator),
        weight=randn(out_features, in_features, dtype=dtype, device=device, generator=generator),
        lora_A=randn(rank, in_features, dtype=dtype, device=device, generator=generator),
        lora_B=randn(out_features, rank, dtype=dtype, device=device, generator=generator),
        bias=randn(out_features, dtype=dtype, device=device, generator=generator),
    )
    t["magnitude"] = randn(out_features, dtype=dtype, device=device, generator=generator).abs() + 0.5
    return t


def norm_bound(weight, lora_A, lora_B, scale, exact, dtype):
    """Error bound of the identity's row norm.  Every term of ``n^2`` is a sum of products of
    the entries of ``|W_o| + |s| |B_o| |A|``, so the float-accumulated ``n^2`` is off by at
    most ``gamma * M_o`` with ``M_o = || |W_o| + |s| |B_o| |A| ||^2`` (in + r^2 + 4 roundings
    deep); then ``|sqrt(a) - sqrt(b)| <= min(|a - b| / sqrt(b), sqrt(|a - b|))``."""
    n = weight.shape[1] + lora_A.shape[0] ** 2 + 4
    u = ACCUMULATE_UNIT[dtype]
    gamma = n * u / (1 - n * u)
    majorant = reference.dora_row_norm(weight.abs(), lora_A.abs(), lora_B.abs(), abs(scale)) ** 2
    squared_error = gamma * majorant
    return torch.minimum(squared_error / exact.clamp_min(1e-300), squared_error.sqrt()) + u * exact


@pytest.mark.parametrize("in_cache_path", [True, False], ids=["torch-in-cache", "kernels"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_row_norm_matches_dense_reference(device, dtype, in_cache_path, generator, monkeypatch):
    """Every CPU path: float32 weights below SMALL_BATCH_MIN_WEIGHT elements take torch's
    ops; with the limit at 0 they take the one-pass or the two-pass kernel."""
    if not in_cache_path:
        monkeypatch.setattr(dora_module, "SMALL_BATCH_MIN_WEIGHT", 0)
    for out_features, in_features, rank in [(37, 300, 8), (5, 17, 33), (64, 1, 2), (3, 8, 0), (0, 5, 2)]:
        t = make_problem(out_features, in_features, rank, (1,), dtype, device, generator)
        weight, lora_A, lora_B = t["weight"], t["lora_A"], t["lora_B"]
        if out_features > 3:  # zero rows: W_o = 0 and B_o = 0 give an exact 0, no NaN
            weight[2] = 0
            lora_B[2] = 0
        for w in (weight, weight.T.contiguous().T):  # row- and column-major W
            norm = dora_row_norm(w, lora_A, lora_B, 0.6)
            exact = reference.dora_row_norm(*(v.double() for v in (weight, lora_A, lora_B)), 0.6)
            assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            bound = norm_bound(*(v.double() for v in (weight, lora_A, lora_B)), 0.6, exact, dtype)
            assert_within(norm, exact, bound, f"norm {out_features}x{in_features} r={rank}")
            if out_features > 3:
                assert norm[2] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_row_norm_half_error_at_most_twice_torch(device, dtype, generator):
    t = make_problem(128, 512, 16, (1,), dtype, device, generator)
    weight, lora_A, lora_B = t["weight"], t["lora_A"], t["lora_B"] * 0.1
    exact = reference.dora_row_norm(weight.double(), lora_A.double(), lora_B.double(), 0.5)
    ours = dora_row_norm(weight, lora_A, lora_B, 0.5)
    theirs = torch.linalg.vector_norm(weight + 0.5 * (lora_B @ lora_A), dim=1)  # PEFT's, in the half type
    ours_error, torch_error = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert ours_error <= 2 * torch_error, (ours_error.item(), torch_error.item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_and_backward_match_float64_reference(device, dtype, dropout, generator):
    scale = 0.45
    for out_features, in_features, rank, batch_shape in [(24, 40, 6, (9,)), (17, 33, 4, (2, 5)), (8, 12, 3, (0,))]:
        t = make_problem(out_features, in_features, rank, batch_shape, dtype, device, generator)
        t["weight"][1] = 0  # a zero-norm row: output b_1, finite gradients
        t["lora_B"][1] = 0
        leaves = {name: v.clone().requires_grad_() for name, v in t.items()}
        kwargs = dict(dropout_p=dropout, generator=torch.Generator().manual_seed(7)) if dropout else {}
        y = dora_linear(*(leaves[name] for name in NAMES), scale=scale, **kwargs)
        keep = None
        if dropout:
            ones = torch.ones(*batch_shape, in_features, dtype=torch.float64, device=device)
            seed = draw_seed(torch.Generator().manual_seed(7)).to(device)
            keep = torch.ops.lowrank_ops.lora_dropout(ones, seed, dropout) * (1 - dropout)

        def ref(*tensors, scale=scale):
            return reference.dora_linear(*tensors, scale=scale, keep=keep, dropout_p=dropout)

        args = [t[name] for name in NAMES]
        expected = ref(*(a.double() for a in args))
        if t["x"].numel():
            assert_within(y[..., 1], t["bias"][1].double().expand_as(y[..., 1]), torch.zeros(()), "zero row")
        norm = reference.dora_row_norm(*(a.double() for a in args[1:4]), scale)
        norm = torch.where(norm == 0, 1e-6, norm)

        def majorant(x, weight, lora_A, lora_B, magnitude, bias):
            """y's terms in absolute value (1 / n exact and detached), multilinear in the inputs."""
            dropped = x if keep is None else x * keep / (1 - dropout)
            rescaled = dropped @ weight.T + abs(scale) * ((dropped @ lora_A.T) @ lora_B.T)
            return x @ weight.T + dropped @ weight.T + magnitude / norm * rescaled + bias

        absolute = [a.double().abs().requires_grad_() for a in args]
        magnitude = majorant(*absolute)
        # Roundings behind one entry: the base and rescaled dot products (in), the adapter's
        # shrink and expand (in + r), the norm (whose relative error ~ gamma_(in + r^2)
        # multiplies the rescaled term) and a handful of scalings and adds.
        terms = 2 * in_features + rank * rank + rank + 10
        assert_within(y, expected, summation_bound(magnitude.detach(), expected, terms, dtype), "y")
        grad_y = randn(*y.shape, dtype=dtype, device=device, generator=generator)
        y.backward(grad_y)
        doubles = [a.double().requires_grad_() for a in args]
        wants = torch.autograd.grad(ref(*doubles), doubles, grad_y.double())
        scales = torch.autograd.grad(magnitude, absolute, grad_y.double().abs())
        rows = grad_y.numel() // out_features
        for name, want, scale_of in zip(NAMES, wants, scales):
            bound = summation_bound(scale_of, want, terms + out_features + rows, dtype)
            assert_within(leaves[name].grad, want, bound, f"d{name} p={dropout} {batch_shape}")


def test_gradcheck_x_magnitude_bias(device, generator):
    # The norm is detached (PEFT / DoRA paper), so finite differences in A, B or W, which move
    # the norm, do not match the gradients by design; those are checked against the detached
    # float64 reference above.  x, m and b do not move the norm: full gradcheck.
    t = make_problem(7, 9, 3, (2, 3), torch.float64, device, generator)
    for kwargs in (dict(), dict(dropout_p=0.4)):
        def fn(x, magnitude, bias):
            return dora_linear(x, t["weight"], t["lora_A"], t["lora_B"], magnitude, bias, scale=0.8,
                               generator=torch.Generator().manual_seed(3), **kwargs)

        inputs = (t["x"].requires_grad_(), t["magnitude"].requires_grad_(), t["bias"].requires_grad_())
        assert torch.autograd.gradcheck(fn, inputs), kwargs


def test_opcheck(device, generator):
    t = make_problem(12, 16, 4, (6,), torch.float32, device, generator)
    seed = draw_seed(generator).to(device)
    torch.library.opcheck(torch.ops.lowrank_ops.dora_row_norm.default, (t["weight"], t["lora_A"], t["lora_B"], 0.5))
    fwd = torch.ops.lowrank_ops.dora_linear_fwd.default
    args = [t[name] for name in NAMES]
    torch.library.opcheck(fwd, (*args, seed, 0.5, 0.25, 1e-6))
    torch.library.opcheck(fwd, (*args[:5], None, None, 2.0, 0.0, 1e-6))
    norm = dora_row_norm(t["weight"], t["lora_A"], t["lora_B"], 2.0)
    torch.library.opcheck(fwd, (*args[:5], None, None, 2.0, 0.0, 1e-6, norm))


def test_torch_compile_fullgraph(device, generator):
    layer = LoRALinear(torch.nn.Linear(24, 16), 6, 12, use_dora=True).to(device)
    with torch.no_grad():
        layer.lora_B.copy_(randn(*layer.lora_B.shape, generator=generator))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = randn(3, 5, 24, device=device, generator=generator)
    params = [p for p in layer.parameters() if p.requires_grad]
    eager = layer(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in params]
    layer.zero_grad()
    now = compiled(x)
    now.square().sum().backward()
    torch.testing.assert_close(now, eager)
    for want, p in zip(eager_grads, params):
        torch.testing.assert_close(p.grad, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_error_at_most_twice_peft_style(device, dtype, generator):
    t = make_problem(96, 128, 8, (32,), dtype, device, generator)
    t["lora_B"] = t["lora_B"] * 0.05
    args = [t[name] for name in NAMES]
    expected = reference.dora_linear(*(a.double() for a in args), scale=0.5)
    ours = dora_linear(*args, scale=0.5)
    x, weight, lora_A, lora_B, magnitude, bias = args
    # PEFT's DoraLinearLayer.forward in the half type.
    factor = magnitude / torch.linalg.vector_norm(weight + 0.5 * (lora_B @ lora_A), dim=1)
    base = torch.nn.functional.linear(x, weight)
    theirs = base + bias + (factor - 1) * base + factor * ((x @ lora_A.T) @ lora_B.T) * 0.5
    ours_error, torch_error = (ours.double() - expected).abs().max(), (theirs.double() - expected).abs().max()
    assert ours_error <= 2 * torch_error, (ours_error.item(), torch_error.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_adapters_on_a_half_base_round_once(dtype):
    """PEFT's default on half models: float32 adapters (and magnitude) on a half base.  z and
    c z are kept in float32 and rounded once, as PEFT keeps its adapter term, and the row
    norms' W A^T is formed in float32 (A rounded to the half type and the rounded product
    gave 10-70x PEFT's error in dA and dB; rounding z to the half type, 1.3-1.8x in y and
    dm).  Over 8 seeds, ours at most PEFT's composition's error (mean), output and
    gradients."""
    ours_total, peft_total = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        t = make_problem(96, 128, 8, (32,), torch.float32, "cpu", generator)
        t["lora_B"] = t["lora_B"] * 0.05
        dy = torch.randn(32, 96, generator=generator)
        half = {name: t[name].to(dtype) for name in ("x", "weight", "bias")}
        adapters = {name: t[name] for name in ("lora_A", "lora_B", "magnitude")}  # float32

        def errors(function, tensors):
            leaves = {name: v.clone().requires_grad_(name in ("x", "lora_A", "lora_B", "magnitude"))
                      for name, v in tensors.items()}
            y = function(*(leaves[name] for name in NAMES))
            y.backward(dy.to(y.dtype))
            exact = {name: v.double().requires_grad_(name in ("x", "lora_A", "lora_B", "magnitude"))
                     for name, v in tensors.items()}
            reference_y = reference.dora_linear(*(exact[name] for name in NAMES), scale=0.5)
            reference_y.backward(dy.to(y.dtype).double())  # the dy both were given, rounded to y's dtype
            pairs = [(y, reference_y)] + [(leaves[name].grad, exact[name].grad)
                                          for name in ("x", "lora_A", "lora_B", "magnitude")]
            return torch.tensor([((a.double() - b).norm() / b.norm()).item() for a, b in pairs])

        tensors = dict(half, **adapters)
        ours_total += errors(lambda *a: dora_linear(*a, scale=0.5), tensors)
        peft_total += errors(peft_dora_float32_adapters, tensors)
    assert (ours_total <= 1.05 * peft_total).all(), (ours_total / peft_total).tolist()


def test_float32_adapters_on_a_float64_base_stay_float64():
    """Narrower adapters (float32 on a float64 base) are not "wider": the base path stays
    float64 (the mixed path rounded y and dx to float32: 3.6e-8 instead of 2.5e-17; with
    B = 0, DoRA's init, the float32 adapter term is zero and the rest is float64)."""
    generator = torch.Generator().manual_seed(0)
    t = make_problem(24, 40, 4, (6,), torch.float64, "cpu", generator)
    tensors = dict(t, lora_A=t["lora_A"].float(), lora_B=torch.zeros(24, 4), magnitude=t["magnitude"].float())
    x = tensors["x"].clone().requires_grad_()
    y = dora_linear(x, *(tensors[name] for name in NAMES[1:]), scale=0.5)
    y.sum().backward()
    exact_x = tensors["x"].clone().requires_grad_()
    expected = reference.dora_linear(exact_x, *(tensors[name].double() for name in NAMES[1:]), scale=0.5)
    expected.sum().backward()
    assert y.dtype == torch.float64
    assert ((y - expected).norm() / expected.norm()) < 1e-14
    assert ((x.grad - exact_x.grad).norm() / exact_x.grad.norm()) < 1e-13


def peft_dora(x, weight, lora_A, lora_B, magnitude, bias):
    """PEFT's LoRA layer with DoRA (peft.tuners.lora.dora.DoraLinearLayer.forward, no dropout,
    scale 0.5) composed of torch ops, with its final cast to the base result's dtype."""
    linear = torch.nn.functional.linear
    base = linear(x, weight, bias)
    eye = torch.eye(weight.shape[1], dtype=x.dtype, device=x.device)
    lora_weight = linear(linear(eye, lora_A), lora_B).T
    factor = magnitude / torch.linalg.vector_norm(weight + 0.5 * lora_weight, dim=1).detach()
    lora = linear(linear(x, lora_A), lora_B)
    return (base + (factor - 1) * (base - bias) + factor * lora * 0.5).to(base.dtype)


def peft_dora_float32_adapters(x, weight, lora_A, lora_B, magnitude, bias):
    """PEFT's DoRA forward with float32 adapters on a half base (autocast_adapter_dtype=True):
    the adapter path on x cast to float32, the norm of the promoted W + s B A, the DoRA term
    in float32 added to the half base result, cast back once."""
    linear = torch.nn.functional.linear
    base = linear(x, weight, bias)
    wide = x.to(lora_A.dtype)
    lora_weight = (lora_B @ lora_A) * 0.5
    factor = magnitude / torch.linalg.vector_norm(weight + lora_weight, dim=1).detach()
    lora = linear(linear(wide, lora_A), lora_B) * 0.5
    return (base + (factor - 1) * (base - bias) + factor * lora).to(base.dtype)


def test_autocast_matches_peft_composition(autocast_case, generator):
    device, dtype = autocast_case
    t = make_problem(96, 128, 8, (4, 16), torch.float32, device, generator)
    t["lora_B"] = t["lora_B"] * 0.05

    def ours(x, weight, lora_A, lora_B, magnitude, bias):
        return dora_linear(x, weight, lora_A, lora_B, magnitude, bias, scale=0.5)

    check_autocast_against_torch(ours, peft_dora, t, device, dtype, generator, "dora_linear")


def test_row_norm_ignores_autocast(autocast_case, generator, monkeypatch):
    # Under autocast the row norm's products would come back in the autocast dtype, and the
    # kernel would read them as float32: it runs with autocast disabled (as torch's norms run
    # in float32), giving the same norms.
    device, dtype = autocast_case
    monkeypatch.setattr(dora_module, "SMALL_BATCH_MIN_WEIGHT", 0)  # float32 W: the kernel path at r = 3
    t = make_problem(40, 64, 3, (1,), torch.float32, device, generator)
    expected = dora_row_norm(t["weight"], t["lora_A"], t["lora_B"], 0.5)
    with torch.autocast(device, dtype=dtype):
        norm = dora_row_norm(t["weight"], t["lora_A"], t["lora_B"], 0.5)
    torch.testing.assert_close(norm, expected, rtol=0, atol=0)


def test_matches_peft_dora_layer(generator):
    peft = pytest.importorskip("peft")
    base = torch.nn.Linear(40, 24)
    config = peft.LoraConfig(r=6, lora_alpha=12, use_dora=True, target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(torch.nn.Sequential(base), config)
    layer = model.base_model.model[0]
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():
        magnitude.mul_(torch.rand(24, generator=generator) + 0.5)
    x = torch.randn(11, 40, generator=generator)
    theirs = layer(x)
    grads_theirs = torch.autograd.grad(theirs.square().sum(), (lora_A, lora_B, magnitude))
    ours = dora_linear(x, base.weight, lora_A, lora_B, magnitude, base.bias, scale=layer.scaling["default"])
    grads_ours = torch.autograd.grad(ours.square().sum(), (lora_A, lora_B, magnitude))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for want, got in zip(grads_theirs, grads_ours):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_row_norm_kernel_runs_one_thread_for_num_threads_below_one(generator):
    """num_threads <= 0 runs one thread: the kernel used to split its rows into no blocks
    and leave the output unwritten.  300 x 256: above the size that runs serially anyway."""
    t = make_problem(300, 256, 4, (1,), torch.float32, "cpu", generator)
    weight, lora_A, lora_B = t["weight"], t["lora_A"], t["lora_B"]
    exact = reference.dora_row_norm(weight.double(), lora_A.double(), lora_B.double(), 0.6)
    bound = norm_bound(weight.double(), lora_A.double(), lora_B.double(), 0.6, exact, torch.float32)
    out, keep_alive, args = _kernel_args(weight, lora_A, lora_B, 0.6)
    for num_threads in (0, -1):
        out.fill_(float("nan"))
        extension().dora_row_norm_cpu(**args, num_threads=num_threads)
        assert_within(out, exact, bound, f"num_threads={num_threads}")


def test_given_norm_gives_the_same_outputs_and_gradients(device, generator):
    """``norm=`` (a cached dora_row_norm) replaces the op's own computation: bit for bit the
    same forward and backward (the norm is detached either way), and it is not modified."""
    t = make_problem(24, 20, 5, (3, 4), torch.float32, device, generator)
    args = [t[name].requires_grad_() for name in NAMES]
    dy = randn(3, 4, 24, device=device, generator=generator)
    norm = dora_row_norm(t["weight"].detach(), t["lora_A"].detach(), t["lora_B"].detach(), 0.7)
    kept = norm.clone()
    results = []
    for given in (None, norm):
        y = dora_linear(*args, scale=0.7, norm=given)
        results.append((y,) + torch.autograd.grad(y, args, dy))
    for own, cached in zip(*results):
        torch.testing.assert_close(cached, own, rtol=0, atol=0)
    assert torch.equal(norm, kept)


def test_lora_linear_caches_dora_norms_in_eval_mode(generator, monkeypatch):
    """Eval mode computes the row norms once while W, A and B do not change; an in-place
    update (an optimizer step, copy_, load_state_dict) or another active rank recomputes them;
    training mode never caches.  Outputs equal the uncached layer's throughout."""
    layer = LoRALinear(torch.nn.Linear(20, 16), 6, 12, use_dora=True, generator=generator)
    with torch.no_grad():
        layer.lora_B.copy_(randn(16, 6, generator=generator))
    calls = []
    row_norm = dora_module.dora_row_norm
    monkeypatch.setattr(lora_module, "dora_row_norm", lambda *a: calls.append(1) or row_norm(*a))
    x = randn(3, 20, generator=generator)

    def uncached():
        return dora_linear(x, layer.base_layer.weight, layer.lora_A[:layer.active_rank or 6],
                           layer.lora_B[:, :layer.active_rank or 6], layer.lora_magnitude_vector,
                           layer.base_layer.bias, scale=layer.scaling)

    layer.eval()
    for _ in range(3):
        torch.testing.assert_close(layer(x), uncached(), rtol=0, atol=0)
    assert len(calls) == 1
    with torch.no_grad():
        layer.lora_A.mul_(1.5)  # in place: the version counter moves
    torch.testing.assert_close(layer(x), uncached(), rtol=0, atol=0)
    layer.active_rank = 4
    torch.testing.assert_close(layer(x), uncached(), rtol=0, atol=0)
    assert len(calls) == 3
    layer.load_state_dict({k: v * 0.5 if k == "lora_B" else v for k, v in layer.state_dict().items()})
    torch.testing.assert_close(layer(x), uncached(), rtol=0, atol=0)
    assert len(calls) == 4
    layer.train()
    layer(x).sum().backward()
    layer(x)
    assert len(calls) == 4 and layer._norm_cache is None  # training computes the norm inside the op


def test_bad_input_errors(generator):
    t = make_problem(10, 12, 4, (3,), torch.float32, "cpu", generator)
    args = [t[name] for name in NAMES]
    with pytest.raises(ValueError, match=r"magnitude has shape \(9,\); expected \(out_features,\) = \(10,\)"):
        dora_linear(*args[:4], args[4][:9])
    with pytest.raises(TypeError, match="magnitude has dtype torch.float64"):
        dora_linear(*args[:4], args[4].double())
    with pytest.raises(ValueError, match="eps must be > 0"):
        dora_linear(*args, eps=0.0)
    with pytest.raises(ValueError, match="eps must be finite; got inf"):
        dora_linear(*args, eps=math.inf)
    with pytest.raises(TypeError, match="dora_row_norm: weight must be a tensor; got list"):
        dora_row_norm(args[1].tolist(), args[2], args[3])
    with pytest.raises(ValueError, match=r"lora_B has shape \(10, 3\)"):
        dora_linear(args[0], args[1], args[2], args[3][:, :3], args[4])
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 11\)"):
        dora_row_norm(args[1], args[2][:, :11], args[3])
    with pytest.raises(ValueError, match="magnitude is on meta"):
        dora_linear(*args[:4], args[4].to("meta"))
    with pytest.raises(ValueError, match=r"norm has shape \(9,\); expected \(out_features,\) = \(10,\)"):
        dora_linear(*args, norm=torch.ones(9))
    with pytest.raises(TypeError, match="norm has dtype torch.float64; expected torch.float32"):
        dora_linear(*args, norm=torch.ones(10, dtype=torch.float64))


def test_row_norm_is_not_differentiable_in_the_weight(generator):
    # Documented as not differentiable, it returned a grad_fn for a weight requiring grad
    # (whose backward then failed: "modified by an inplace operation").
    weight = torch.randn(6, 8, generator=generator, requires_grad=True)
    norm = dora_row_norm(weight, torch.randn(2, 8, generator=generator), torch.randn(6, 2, generator=generator), 0.5)
    assert not norm.requires_grad and norm.grad_fn is None


def test_eval_norm_cache_is_not_fooled_by_a_reused_address(generator):
    """functional_call with new factors whose storage sits where the cached ones were (a
    view of the same buffer, or a fresh tensor allocated after the old one was freed): the
    cache, once keyed by address and version only, returned the old norms (outputs 0.35 off)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 512), r=128, use_dora=True, init_lora_weights=False).eval()
    uncached = copy.deepcopy(layer).train()  # training mode never caches
    x = randn(3, 64, generator=generator)
    buffer = randn(512, 256, generator=generator)
    with torch.no_grad():
        for lora_B in (buffer[:, :128], buffer[:, ::2]):  # same data_ptr, version, dtype and device
            y = functional_call(layer, {"lora_B": lora_B}, (x,))
            assert torch.equal(y, functional_call(uncached, {"lora_B": lora_B}, (x,)))


def test_eval_norm_cache_follows_fused_optimizer_steps(generator):
    """A fused optimizer step does not bump the parameters' versions: the eval-mode norm
    cache also keys on the count of optimizer steps."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(32, 24), r=4, use_dora=True, init_lora_weights=False).eval()
    x = randn(3, 32, generator=generator)
    layer(x)  # caches the norms
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.5, fused=True)
    layer(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        fresh = copy.deepcopy(layer).train()(x)  # training mode computes the norm
        torch.testing.assert_close(layer(x), fresh)


def test_small_nonzero_row_norms_are_used_as_they_are(generator):
    """Only zero norms are replaced by eps: a floor on every norm (1e-6) rescaled a row of
    norm 6e-8 to 6 % of its base output at DoRA's init (B = 0, m = ||W_row||), where PEFT
    keeps the base function."""
    base = torch.nn.Linear(16, 6).double()
    with torch.no_grad():
        base.weight[2] *= 6e-8 / base.weight[2].norm()
    layer = LoRALinear(base, r=2, use_dora=True)
    x = torch.randn(5, 16, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-12, atol=1e-20)
    magnitude = torch.linalg.vector_norm(base.weight, dim=1)
    zeros = torch.zeros(6, 2, dtype=torch.float64)
    y = dora_linear(x, base.weight, torch.randn(2, 16, dtype=torch.float64, generator=generator), zeros, magnitude,
                    base.bias)
    torch.testing.assert_close(y, base(x), rtol=1e-12, atol=1e-20)


# The CPU paths of dora_row_norm: torch's ops for float32 W in cache, the one-pass
# small-batch kernel (float32 and bfloat16 W, AVX-512), the two-pass C++ kernel (every
# other case).
ROW_NORM_PATHS = [(torch.float32, "torch-in-cache"), (torch.float32, "one-pass"), (torch.float32, "two-pass"),
                  (torch.float64, "two-pass"), (torch.float16, "two-pass"), (torch.bfloat16, "one-pass"),
                  (torch.bfloat16, "two-pass")]


def force_row_norm_path(path: str, monkeypatch) -> None:
    if path != "torch-in-cache":
        monkeypatch.setattr(dora_module, "SMALL_BATCH_MIN_WEIGHT", 0)
    if path == "two-pass":
        monkeypatch.setattr(dora_module, "small_batch", lambda *args, **kwargs: False)


@pytest.mark.parametrize("dtype, path", ROW_NORM_PATHS, ids=lambda v: str(v).replace("torch.", ""))
def test_row_norm_where_the_identity_cancels_matches_the_dense_rows(device, dtype, path, generator, monkeypatch):
    """W = -s B A + noise: ||W_o|| / ||W_o + s B_o A|| from ~1.5 to ~2500.  The identity's
    error grows as u ||W_o||^2 / n^2: 0.87 relative at a ratio of 254 in float32, norms
    clamped to 0 beyond (then replaced by eps in dora_linear: outputs m / eps).  Those rows
    are recomputed from the dense row, with its error bound."""
    force_row_norm_path(path, monkeypatch)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    for noise in (1.0, 0.1, 1e-2, 1e-3):
        lora_A = randn(8, 256, dtype=dtype, device=device, generator=generator)
        lora_B = randn(96, 8, dtype=dtype, device=device, generator=generator)
        weight = (-0.5 * (lora_B.to(work) @ lora_A.to(work))
                  + noise * randn(96, 256, dtype=work, device=device, generator=generator)).to(dtype)
        exact = reference.dora_row_norm(*(v.double() for v in (weight, lora_A, lora_B)), 0.5)
        ours = dora_row_norm(weight, lora_A, lora_B, 0.5)
        # The dense row's entries are off by at most (r + 2) u (|W_oi| + |s| |B_o| |A_i|): twice
        # that in norm; the rows kept on the identity have n^2 >= ||W_o||^2 / 4, so its terms'
        # rounding, u (||W_o||^2 + ||s B_o A||^2) <= 13 u n^2 (||s B_o A|| <= ||W_o|| + n), is a
        # few units of n: 32 u n.
        u = ACCUMULATE_UNIT[dtype]
        majorant = torch.linalg.vector_norm(weight.double().abs() + 0.5 * (lora_B.double().abs() @ lora_A.double().abs()),
                                            dim=1)
        assert_within(ours, exact, 2 * 10 * u * majorant + 32 * u * exact, f"noise {noise}")


@pytest.mark.parametrize("dtype, path", ROW_NORM_PATHS, ids=lambda v: str(v).replace("torch.", ""))
def test_row_norm_at_extreme_scales(device, dtype, path, generator, monkeypatch):
    """The identity's squares left the type's range: float32 W and B of 1e-25 gave norms
    of 0 (dora_linear then rescaled by m / eps: a finite wrong output), of 1e20 inf; a
    float16 W A^T of 1.1e5 overflowed to inf (NaN norms for weights of 100).  Rows out of
    range are recomputed from the dense row scaled by its largest entry: relative errors
    of a few units of the accumulation type; zero rows stay exactly 0."""
    force_row_norm_path(path, monkeypatch)
    scales = {torch.float32: (1e-25, 1e-20, 1e20, 1e30), torch.float64: (1e-170, 1e-160, 1e160, 1e200),
              torch.float16: (1e-3, 100.0), torch.bfloat16: (1e-30, 1e30)}[dtype]
    for scale in scales:
        weight = randn(48, 64, dtype=torch.float64, device=device, generator=generator) * scale
        lora_B = randn(48, 4, dtype=torch.float64, device=device, generator=generator) * scale
        lora_A = randn(4, 64, dtype=torch.float64, device=device, generator=generator)
        if dtype == torch.float16:  # large A too: W A^T beyond the float16 range
            lora_A = lora_A * scale
        weight[5] = 0
        lora_B[5] = 0
        weight, lora_A, lora_B = (v.to(dtype) for v in (weight, lora_A, lora_B))
        # The float64 reference scaled to 1 first: at 1e-170 its own squares underflow.
        exact = reference.dora_row_norm(weight.double() / scale, lora_A.double(), lora_B.double() / scale, 0.5) * scale
        ours = dora_row_norm(weight, lora_A, lora_B, 0.5)
        assert ours[5] == 0
        relative = ((ours.double() - exact) / exact.clamp_min(1e-300)).abs().max().item()
        assert relative <= 200 * ACCUMULATE_UNIT[dtype], (scale, relative)
        x = (randn(3, 64, dtype=torch.float64, device=device, generator=generator) / exact.max()).to(dtype)  # z ~ 1
        magnitude = torch.ones(48, dtype=dtype, device=device)
        y = dora_linear(x, weight, lora_A, lora_B, magnitude, scale=0.5)
        assert torch.isfinite(y).all(), scale


def test_half_dora_linear_with_small_norms_does_not_overflow(device, generator):
    """c = m / n was rounded to float16: norms of 3.6e-6 gave c = 2.7e5 > 65504 and inf
    outputs (the norms themselves accurate).  c z is now formed in float32 and rounded
    once.  Bound: z is rounded to float16 (subnormal here: absolute spacing 2^-24), then
    c z and y once more (u = 2^-11 each)."""
    weight = (randn(4, 16, device=device, generator=generator) * 1e-6).half()
    lora_A = torch.zeros(2, 16, dtype=torch.float16, device=device)
    lora_B = torch.zeros(4, 2, dtype=torch.float16, device=device)
    x = randn(5, 16, device=device, generator=generator).half()
    magnitude = torch.ones(4, dtype=torch.float16, device=device)
    y = dora_linear(x, weight, lora_A, lora_B, magnitude)
    z = x.double() @ weight.double().T
    factor = 1 / torch.linalg.vector_norm(weight.double(), dim=1)
    expected = factor * z
    u = 2.0 ** -11
    bound = factor * (2.0 ** -25 + u * z.abs()) * 1.01 + u * expected.abs()
    assert_within(y, expected, bound, "float16 y with norms of ~4e-6")


def test_half_magnitude_and_gate_gradients_sum_float32_products(device):
    """dm = sum_rows dy z / n summed in float32, but the products dy z were formed in
    float16: entries of +-1.2e5 (cancelling to 2) were inf, and dm NaN, with a float32
    magnitude too (the fp16 AMP case).  lora_linear's gate gradient (SoRA; SVFit and LoLDU
    gate through it) had the same pattern.  Both form the products in float32 now."""
    from lowrank_ops.ops import lora_linear

    x = torch.zeros(5, 8, dtype=torch.float16, device=device)
    x[:4, 0], x[4, 0] = 240, 1
    dy = torch.zeros(5, 6, dtype=torch.float16, device=device)
    dy[:4, 0] = torch.tensor([250.0, 250.0, -250.0, -250.0])
    dy[4, 0] = 1
    weight = torch.zeros(6, 8, dtype=torch.float16, device=device)
    weight[:, 0] = 1
    lora_A = torch.zeros(2, 8, dtype=torch.float16, device=device)
    lora_A[0, 0] = 2
    lora_B = torch.zeros(6, 2, dtype=torch.float16, device=device)
    lora_B[0, 0] = 0.5
    for magnitude_dtype in (torch.float32, torch.float16):
        magnitude = torch.ones(6, dtype=magnitude_dtype, device=device, requires_grad=True)
        dora_linear(x, weight, lora_A, lora_B, magnitude).backward(dy)
        # output 0: W_0 + s B_0 A = 2 e_0, so n_0 = 2 and z = 480 (rows 0-3), 2 (row 4): dm_0 = 2 / 2
        assert magnitude.grad[0].item() == 1.0 and torch.isfinite(magnitude.grad).all(), magnitude_dtype
    lora_B[0, 0] = 1
    gate = torch.ones(2, dtype=torch.float16, device=device, requires_grad=True)
    lora_linear(x, weight, lora_A, lora_B, gate=gate).backward(dy)
    assert gate.grad.dtype == torch.float16 and gate.grad[0].item() == 2.0  # sum dy (x A^T): +-1.2e5 cancelling


@pytest.mark.parametrize("path", ["torch-in-cache", "one-pass"])
def test_zero_rows_are_not_recomputed(path, generator, monkeypatch):
    """Rows with W_o = 0 (DoRA's zero rows; B_o = 0 at init) went through the dense
    recomputation at every forward (flagged by their zero squares); only rows whose
    total is really unreliable are recomputed now, and a zero W_o with a trained B_o
    keeps the identity (its total s^2 ||B_o A||^2 has no cancellation)."""
    force_row_norm_path(path, monkeypatch)
    recomputed = []
    direct = dora_module.direct_row_norms
    monkeypatch.setattr(dora_module, "direct_row_norms",
                        lambda weight, *args: recomputed.append(weight.shape[0]) or direct(weight, *args))
    weight = randn(64, 96, generator=generator)
    lora_A, lora_B = randn(8, 96, generator=generator), randn(64, 8, generator=generator)
    weight[::4] = 0
    lora_B[::8] = 0  # rows 0, 8, ...: W_o and B_o zero; rows 4, 12, ...: W_o zero, B_o trained
    norm = dora_row_norm(weight, lora_A, lora_B, 0.5)
    assert recomputed == []
    exact = reference.dora_row_norm(weight.double(), lora_A.double(), lora_B.double(), 0.5)
    assert torch.equal(norm[::8], torch.zeros(8)) and (norm[4::8] > 0).all()
    torch.testing.assert_close(norm.double(), exact, rtol=1e-6, atol=0)
    # A A^T overflowing: a zero row's total is 0 * inf = NaN, and stays an exact 0 (as the kernels give it).
    huge = dora_row_norm(weight, lora_A * 1e25, lora_B / 1e25, 0.5)
    assert torch.equal(huge[::8], torch.zeros(8))


def test_row_norm_with_a_huge_scale(generator):
    """s^2 went to addmm as a float32 alpha: a scale above 1.8e19 raised "value cannot be
    converted to type float without overflow".  s is applied to each factor now."""
    weight, lora_A = randn(48, 64, generator=generator), randn(4, 64, generator=generator)
    lora_B = randn(48, 4, generator=generator) * 1e-20
    exact = reference.dora_row_norm(weight.double(), lora_A.double(), lora_B.double() * 1e20, 1.0)
    torch.testing.assert_close(dora_row_norm(weight, lora_A, lora_B, 1e20).double(), exact, rtol=1e-6, atol=0)


def test_zero_input_features():
    """in_features = 0 raised torch's "cannot compute the inf norm on the dimension 1"
    from the direct row norms; the rows are empty, their norms 0, and y = b."""
    bias = torch.randn(3)
    assert torch.equal(dora_row_norm(torch.randn(3, 0), torch.randn(2, 0), torch.randn(3, 2), 1.0), torch.zeros(3))
    y = dora_linear(torch.randn(4, 0), torch.randn(3, 0), torch.randn(2, 0), torch.randn(3, 2), torch.ones(3), bias)
    torch.testing.assert_close(y, bias.expand(4, 3))
