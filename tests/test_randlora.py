"""RandLoRALinear: full-rank update from frozen random low-rank bases and trained diagonals."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import functional_call

from lowrank_ops.nn import RandLoRALinear
from lowrank_ops.nn._random_basis import stream_seed
from lowrank_ops.ops.lora import draw_seed

from helpers import (
    assert_adam_fits, assert_is_base_product, assert_meta_build_resets_to, assert_within, check_autocast_against_torch,
    randn, summation_bound,
)

# (out, in): in < out (Gamma on the input side), out < in (on the output side), square with
# r not dividing min(in, out) (a partly used last basis).
SHAPES = [pytest.param((30, 20), id="wide_out"), pytest.param((20, 30), id="wide_in"),
          pytest.param((17, 17), id="square")]


def make_layer(out_features, in_features, r, base_dtype, generator, device="cpu", **kwargs):
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(randn(out_features, in_features, generator=generator))
        base.bias.copy_(randn(out_features, generator=generator))
    base = base.to(device=device, dtype=base_dtype)
    kwargs.setdefault("seed", int(torch.randint(0, 2**62, (), generator=generator)))
    return RandLoRALinear(base, r, **kwargs)


def randomize(layer, generator) -> None:
    """Nonzero random diagonals (lambda starts at 0, gamma constant: both would hide terms)."""
    with torch.no_grad():
        for p in (layer.randlora_lambda, layer.randlora_gamma):
            p.copy_(randn(*p.shape, generator=generator).to(p.dtype))


def reference(layer, x, weight, bias, lam, gamma):
    """``x W^T + b + x dW^T`` in the inputs' dtype with dW summed term by term, straight from the
    paper's formula: ``s sum_b B_b diag(lambda_b) A diag(gamma_b)`` (in <= out) or its
    transposed arrangement (out < in)."""
    A = layer.randlora_A.to(x.dtype)
    r = layer.r
    terms = []
    for b in range(layer.num_bases):
        B_b = layer.randlora_B[:, b * r:(b + 1) * r].to(x.dtype)
        term = (B_b * lam[b]) @ (A * gamma[b])  # [M, m]
        terms.append(term if layer.in_features <= layer.out_features else term.T)
    delta = layer.scaling * torch.stack(terms).sum(0)
    return x @ weight.T + bias + x @ delta.T


def reference_and_abs(layer, x, grad_y):
    """float64 reference ``(y, dx, d lambda, d gamma)`` and the same polynomial evaluated on the
    absolute values of every input (and of grad_y): the sums of |terms| that bound rounding."""
    results = []
    base = layer.base_layer
    for transform in (lambda t: t, torch.abs):
        leaves = [transform(t.detach().double()).requires_grad_()
                  for t in (x, layer.randlora_lambda, layer.randlora_gamma)]
        weight, bias = (transform(t.detach().double()) for t in (base.weight, base.bias))
        if transform is torch.abs:
            saved = layer.randlora_A, layer.randlora_B
            layer.randlora_A, layer.randlora_B = saved[0].abs(), saved[1].abs()
        try:
            y = reference(layer, leaves[0], weight, bias, leaves[1], leaves[2])
        finally:
            if transform is torch.abs:
                layer.randlora_A, layer.randlora_B = saved
        grads = torch.autograd.grad(y, leaves, transform(grad_y.double()))
        results.append((y.detach(), *grads))
    return results


def test_starts_as_base_and_trains_only_the_diagonals(generator):
    layer = make_layer(30, 20, 6, torch.float32, generator, seed=11)
    # m = 20, M = 30, n = ceil(20 / 6) = 4 bases of rank 6 (24 >= 20 directions).
    assert layer.num_bases == 4
    trainable = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    assert {name: tuple(p.shape) for name, p in trainable.items()} == {"randlora_lambda": (4, 6),
                                                                        "randlora_gamma": (4, 20)}
    assert layer.randlora_A.shape == (6, 20) and layer.randlora_B.shape == (30, 24)
    assert set(layer.state_dict()) == {"randlora_seed", "randlora_lambda", "randlora_gamma", "base_layer.weight",
                                       "base_layer.bias"}
    assert torch.equal(layer.randlora_lambda, torch.zeros(4, 6))
    assert torch.equal(layer.randlora_gamma, torch.full((4, 20), 1 / 20))
    assert layer.scaling == 20.0  # alpha = 20 r by default
    x = randn(3, 5, 20, generator=generator)
    assert_is_base_product(layer(x), x, layer.base_layer, "lambda = 0")  # the gate zeroes the adapter exactly
    assert layer.extra_repr() == "r=6, num_bases=4, scaling=20, seed=11"


@pytest.mark.parametrize("shape", SHAPES)
def test_update_is_full_rank(shape, generator):
    out_features, in_features = shape
    layer = make_layer(out_features, in_features, 4, torch.float64, generator)
    randomize(layer, generator)
    delta = layer.delta_weight()
    assert delta.shape == (out_features, in_features)
    assert torch.linalg.matrix_rank(delta).item() == min(shape)
    # Each basis alone is rank r: the sum of n of them is what makes the update full rank.
    x = torch.eye(in_features, dtype=torch.float64)
    torch.testing.assert_close(delta.T, reference(layer, x, torch.zeros(out_features, in_features, dtype=torch.float64),
                                                  torch.zeros(out_features, dtype=torch.float64),
                                                  layer.randlora_lambda.detach(), layer.randlora_gamma.detach()),
                               rtol=1e-12, atol=1e-12)


def test_bases_are_the_documented_draw_and_follow_the_seed(generator):
    layer = make_layer(14, 9, 4, torch.float64, generator, seed=321)
    m, M, n, r = 9, 14, 3, 4
    g = torch.Generator().manual_seed(stream_seed(321, 0))
    want_A = torch.empty(1, r, m).uniform_(-1 / math.sqrt(m), 1 / math.sqrt(m), generator=g)[0]
    g = torch.Generator().manual_seed(stream_seed(321, 1))
    want_B = torch.empty(n, M, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=g)
    assert torch.equal(layer.randlora_A, want_A.double())
    for b in range(n):  # column b r + k of the stack is column k of basis b
        assert torch.equal(layer.randlora_B[:, b * r:(b + 1) * r], want_B[b].double())
    same = make_layer(14, 9, 4, torch.float64, generator, seed=321)
    other = make_layer(14, 9, 4, torch.float64, generator, seed=322)
    assert torch.equal(same.randlora_B, layer.randlora_B) and torch.equal(same.randlora_A, layer.randlora_A)
    assert not torch.equal(other.randlora_A, layer.randlora_A) and not torch.equal(other.randlora_B, layer.randlora_B)
    # The seed's alone (see test_nola): not torch's default dtype, and a seedless layer builds on meta.
    torch.set_default_dtype(torch.float64)
    try:
        again = make_layer(14, 9, 4, torch.float64, generator, seed=321)
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.equal(again.randlora_A, layer.randlora_A) and torch.equal(again.randlora_B, layer.randlora_B)
    with torch.device("meta"):
        assert RandLoRALinear(torch.nn.Linear(9, 14), 4).randlora_lambda.is_meta


def test_state_dict_round_trip_redraws_the_bases(generator):
    layer = make_layer(12, 16, 5, torch.float32, generator)
    randomize(layer, generator)
    fresh = RandLoRALinear(torch.nn.Linear(16, 12), 5, seed=1)
    missing, unexpected = fresh.load_state_dict(layer.state_dict())
    assert not missing and not unexpected
    assert torch.equal(fresh.randlora_A, layer.randlora_A) and torch.equal(fresh.randlora_B, layer.randlora_B)
    x = randn(4, 16, generator=generator)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_same_bases_and_results_on_every_device(device, generator):
    """A CPU-trained adapter loaded onto ``device`` redraws bitwise the same bases (CPU
    generator, then moved) and gives the CPU layer's outputs and diagonal gradients."""
    on_cpu = make_layer(12, 16, 5, torch.float64, generator, seed=77)
    randomize(on_cpu, generator)
    layer = RandLoRALinear(torch.nn.Linear(16, 12, dtype=torch.float64, device=device), 5, seed=1)
    layer.load_state_dict(on_cpu.state_dict())  # a new seed: the bases are redrawn on the device
    assert layer.randlora_A.device.type == device
    assert torch.equal(layer.randlora_A.cpu(), on_cpu.randlora_A) and torch.equal(layer.randlora_B.cpu(), on_cpu.randlora_B)
    x = randn(4, 16, dtype=torch.float64, generator=generator)
    grad_y = randn(4, 12, dtype=torch.float64, generator=generator)
    outputs = []
    for module, device_of in ((on_cpu, "cpu"), (layer, device)):
        y = module(x.to(device_of))
        y.backward(grad_y.to(device_of))
        outputs.append([y.detach().cpu(), module.randlora_lambda.grad.cpu(), module.randlora_gamma.grad.cpu()])
    for name, want, got in zip(["y", "d lambda", "d gamma"], *outputs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_float64_reference(shape, device, generator):
    out_features, in_features = shape
    layer = make_layer(out_features, in_features, 4, torch.float32, generator, device=device)
    randomize(layer, generator)
    x = randn(2, 7, in_features, generator=generator, device=device).requires_grad_()
    y = layer(x)
    grad_y = randn(*y.shape, generator=generator, device=device)
    y.backward(grad_y)
    assert layer.base_layer.weight.grad is None
    layer_cpu = layer.cpu()
    (want, abs_terms) = reference_and_abs(layer_cpu, x.cpu(), grad_y.cpu())
    got = (y, x.grad, layer.randlora_lambda.grad, layer.randlora_gamma.grad)
    # Every result is a sum of products; abs_terms holds the sums of their absolute values, and
    # no product passes through more than K = in + out + N + n r + 8 float32 roundings (the
    # folded gamma * A, the in- or out-term dot products, the n r-term expand or shrink, the
    # N-term batch sums of the gradients, the gate and scale products, the bias): the bound of
    # helpers.summation_bound is then rigorous for all four.
    chain = in_features + out_features + x.shape[:-1].numel() + layer.num_bases * layer.r + 8
    for name, mine, ref, abs_sum in zip(["y", "dx", "d lambda", "d gamma"], got, want, abs_terms):
        assert mine.shape == ref.shape, name
        assert_within(mine.cpu(), ref, summation_bound(abs_sum, ref, chain, torch.float32), name)


def test_empty_and_non_contiguous_inputs(generator):
    layer = make_layer(12, 16, 5, torch.float64, generator)
    randomize(layer, generator)
    empty = torch.zeros(0, 16, dtype=torch.float64, requires_grad=True)
    y = layer(empty)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.equal(layer.randlora_lambda.grad, torch.zeros_like(layer.randlora_lambda))
    assert torch.equal(layer.randlora_gamma.grad, torch.zeros_like(layer.randlora_gamma))
    x = randn(16, 3, 5, dtype=torch.float64, generator=generator).permute(2, 1, 0)  # [5, 3, 16], strided
    assert not x.is_contiguous()
    base = layer.base_layer
    expected = reference(layer, x, base.weight, base.bias, layer.randlora_lambda.detach(), layer.randlora_gamma.detach())
    # float64 throughout: only the summation order differs.
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck(shape, generator):
    out_features, in_features = shape
    layer = make_layer(out_features, in_features, 6, torch.float64, generator)
    x = randn(2, 3, in_features, dtype=torch.float64, generator=generator).requires_grad_()
    lam = randn(*layer.randlora_lambda.shape, dtype=torch.float64, generator=generator).requires_grad_()
    gamma = randn(*layer.randlora_gamma.shape, dtype=torch.float64, generator=generator).requires_grad_()

    def through_layer(x, lam, gamma):
        return functional_call(layer, {"randlora_lambda": lam, "randlora_gamma": gamma}, (x,))

    assert torch.autograd.gradcheck(through_layer, (x, lam, gamma))
    base = layer.base_layer
    torch.testing.assert_close(through_layer(x, lam, gamma), reference(layer, x, base.weight, base.bias, lam, gamma),
                               rtol=1e-12, atol=1e-12)
    # An unfrozen base layer gets its gradients too (dW = dy^T x, db = sum dy).
    weight, bias = (t.detach().clone().requires_grad_() for t in (base.weight, base.bias))

    def with_base(weight, bias, lam):
        return functional_call(layer, {"base_layer.weight": weight, "base_layer.bias": bias, "randlora_lambda": lam,
                                       "randlora_gamma": gamma.detach()}, (x.detach(),))

    assert torch.autograd.gradcheck(with_base, (weight, bias, lam))


def _peft_layer(ours, base, generator, dtype):
    """PEFT's RandLoRA layer on ``base`` with random bases and diagonals, and ``ours`` set to
    the same numbers (PEFT's pairing of rows and columns mapped onto ours)."""
    from peft import RandLoraConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.randlora.layer import Linear as PeftRandLoraLinear

    m, M = min(ours.in_features, ours.out_features), max(ours.in_features, ours.out_features)
    n, r = ours.num_bases, ours.r
    A = randn(r, 1, m, dtype=dtype, generator=generator)
    B = randn(M, n, r, dtype=dtype, generator=generator)
    config = RandLoraConfig(r=r, randlora_alpha=ours.randlora_alpha)
    peft = PeftRandLoraLinear(base, BufferDict({"default": A}), BufferDict({"default": B}), "default", config, r=r)
    lam, gamma = peft.randlora_lambda["default"], peft.randlora_gamma["default"]
    assert lam.shape == (r, n) and gamma.shape == (n, m)  # PEFT's layout
    with torch.no_grad():
        lam.copy_(randn(r, n, dtype=dtype, generator=generator))
        gamma.copy_(randn(n, m, dtype=dtype, generator=generator))
        ours.randlora_A.copy_(A[:, 0])
        ours.randlora_lambda.copy_(lam.T)
        ours.randlora_gamma.copy_(gamma)
        # PEFT pairs row k n + b of its scaled A (lambda[k, b] A[k] gamma[b]) with column k n + b
        # of its flattened [M, n, r] B; ours pairs row b r + k with column b r + k.
        order = torch.tensor([k * n + b for b in range(n) for k in range(r)])
        ours.randlora_B.copy_(B.reshape(M, n * r)[:, order])
    return peft


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_peft_randlora_layer(shape, dtype, generator):
    pytest.importorskip("peft.tuners.randlora")
    out_features, in_features = shape
    base = torch.nn.Linear(in_features, out_features, dtype=dtype)
    ours = RandLoRALinear(torch.nn.Linear(in_features, out_features, dtype=dtype), 4, seed=0)
    ours.base_layer.load_state_dict(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = _peft_layer(ours, base, generator, dtype)
    x = randn(3, 5, in_features, dtype=dtype, generator=generator).requires_grad_()
    grad_y = randn(3, 5, out_features, dtype=dtype, generator=generator)
    results = []
    for layer, lam, gamma in ((ours, ours.randlora_lambda, ours.randlora_gamma),
                              (peft, peft.randlora_lambda["default"], peft.randlora_gamma["default"])):
        x.grad = None
        y = layer(x)
        y.backward(grad_y)
        results.append([y.detach(), x.grad.clone(), lam.grad.reshape(lam.shape), gamma.grad])
    results[1][2] = results[1][2].T  # PEFT's lambda is [r, n]
    # Two float evaluations of one polynomial in different orders: float64 to 1e-12 relative;
    # float32 to 2e-5 of each result's largest entry (~ sqrt(terms) float32 units for these
    # <= 60-term sums; both sides round, so no one-sided bound applies).
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, mine, theirs in zip(["y", "dx", "d lambda", "d gamma"], *results):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=rtol * theirs.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["bf16_adapter", "fp32_adapter"])
def test_bfloat16_base_error_at_most_twice_torch(adapter_dtype, generator):
    layer = make_layer(48, 64, 8, torch.bfloat16, generator, dtype=adapter_dtype)
    ad = layer.randlora_lambda.dtype
    assert ad == (adapter_dtype or torch.bfloat16) and layer.randlora_B.dtype == ad
    randomize(layer, generator)
    x = randn(16, 64, dtype=torch.bfloat16, generator=generator)
    base = layer.base_layer
    expected = reference(layer, x.double(), base.weight.double(), base.bias.double(),
                         layer.randlora_lambda.detach().double(), layer.randlora_gamma.detach().double())
    # PEFT's composition on the same rounded operands: the base output, plus the two adapter
    # linears in the adapter dtype, then one cast.  DESIGN.md section 6: at most 2x its error.
    lora_A, lora_B, gate = layer.factors()
    adapter = layer.scaling * ((x.to(ad) @ lora_A.T) * gate) @ lora_B.T
    theirs = (torch.nn.functional.linear(x, base.weight, base.bias).to(ad) + adapter).to(torch.bfloat16)
    ours = layer(x)
    assert ours.dtype == torch.bfloat16
    ours_error = (ours.double() - expected).abs().max().item()
    torch_error = (theirs.double() - expected).abs().max().item()
    assert ours_error <= 2 * torch_error, (ours_error, torch_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 32), (32, 40)], ids=["wide_out", "wide_in"])
def test_merge_unmerge_round_trip(shape, dtype, generator):
    out_features, in_features = shape
    layer = make_layer(out_features, in_features, 8, dtype, generator)
    randomize(layer, generator)
    x = randn(6, in_features, dtype=dtype, generator=generator)
    y = layer(x)
    before = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight().double()
    layer.merge()
    assert layer.merged
    weight = layer.base_layer.weight
    merged_max = weight.abs().max().item()  # weight is updated in place by unmerge
    # One rounding of W + dW, whose float32 sum has n r = 32 terms: 2^-8 |.| in bf16, in float32
    # the 32 + 3 chained roundings of dW's largest absolute term sum plus W's own rounding.
    lora_A, lora_B, gate = layer.factors()
    abs_delta = layer.scaling * ((lora_B.double().abs() * gate.double().abs()) @ lora_A.double().abs())
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    atol = unit * (before.double() + delta).abs().max().item() + 36 * 2.0**-24 * abs_delta.max().item()
    torch.testing.assert_close(weight.double(), before.double() + delta, rtol=0, atol=atol)
    # bf16: y rounds the base and the adapter separately, the merged layer once: 2^-7 |y|.
    # float32: the same sums in another order, 1e-5 |y| (~ 170 float32 units).
    tol = (2.0**-7 if dtype == torch.bfloat16 else 1e-5) * y.abs().max().item()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=tol)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_parameters()
    layer.unmerge()
    assert not layer.merged
    atol = unit * (merged_max + before.abs().max().item()) + 2 * 36 * 2.0**-24 * abs_delta.max().item()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=atol)
    layer.reset_parameters()
    assert torch.equal(layer.randlora_lambda, torch.zeros_like(layer.randlora_lambda))


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)], ids=["wide_in", "wide_out"])
def test_torch_compile_fullgraph(shape, generator):
    out_features, in_features = shape
    layer = make_layer(out_features, in_features, 5, torch.float32, generator)
    randomize(layer, generator)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = randn(3, 5, in_features, generator=generator).requires_grad_()
    results = []
    for model in (layer, compiled):
        layer.zero_grad()
        x.grad = None
        y = model(x)
        y.square().sum().backward()
        results.append([y.detach(), layer.randlora_lambda.grad.clone(), layer.randlora_gamma.grad.clone(),
                        x.grad.clone()])
    for name, want, got in zip(["y", "d lambda", "d gamma", "dx"], *results):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_sgd_fits_a_full_rank_target(generator):
    # A target of full rank 12 (no rank-r LoRA could reach it) that lies in RandLoRA's family:
    # the diagonals of another draw on the same bases.  Adam on the 3 * (4 + 12) = 48 numbers fits it.
    layer = make_layer(12, 16, 4, torch.float64, generator, randlora_alpha=4.0)
    target = RandLoRALinear(torch.nn.Linear(16, 12, dtype=torch.float64), 4, seed=int(layer.randlora_seed),
                            randlora_alpha=4.0)
    target.base_layer.load_state_dict(layer.base_layer.state_dict())
    randomize(target, generator)
    assert torch.linalg.matrix_rank(target.delta_weight()).item() == 12
    x = randn(64, 16, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        y_target = target(x)
    assert_adam_fits(layer, x, y_target, 400)



def test_numpy_integer_seed_and_rank():
    """An np.int64 seed (from an np.random draw) was refused ("seed must be an int in [0,
    2^63)"): the same bases as a Python int; a bool seed stays refused."""
    np = pytest.importorskip("numpy")
    base = torch.nn.Linear(8, 6)
    layer = RandLoRALinear(base, np.int64(2), seed=np.int64(1234))
    twin = RandLoRALinear(base, 2, seed=1234)
    assert int(layer.randlora_seed) == 1234 and type(layer.r) is int
    assert torch.equal(layer.randlora_A, twin.randlora_A) and torch.equal(layer.randlora_B, twin.randlora_B)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\^63\); got True"):
        RandLoRALinear(base, 2, seed=True)

def test_bad_input_errors():
    base = torch.nn.Linear(8, 6)
    for r, kwargs, error, match in [
        (0, {}, ValueError, r"RandLoRALinear: r must be an integer >= 1; got 0"),
        (-2, {}, ValueError, r"r must be an integer >= 1; got -2"),
        (7, {}, ValueError, r"r must be in \[1, min\(in_features, out_features\)\] = \[1, 6\]; got 7"),
        ("4", {}, ValueError, r"r must be an integer >= 1; got '4'"),
        (2, dict(randlora_alpha=float("inf")), ValueError, r"randlora_alpha must be finite; got inf"),
        (2, dict(randlora_dropout=-0.1), ValueError, r"randlora_dropout must be in \[0, 1\); got -0.1"),
        (2, dict(seed=-5), ValueError, r"seed must be an int in \[0, 2\^63\); got -5"),
        (2, dict(dtype=torch.float16), TypeError, r"dtype is torch.float16; expected the base weight's"),
    ]:
        with pytest.raises(error, match=match):
            RandLoRALinear(base, r, **kwargs)
    with pytest.raises(TypeError, match="base_layer must be a torch.nn.Linear; got Embedding"):
        RandLoRALinear(torch.nn.Embedding(4, 4), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that initializing a zero-element weight is a no-op
        empty_base = torch.nn.Linear(0, 3)
    with pytest.raises(ValueError, match=r"base_layer has shape \(out, in\) = \(3, 0\)"):
        RandLoRALinear(empty_base, 1)
    layer = RandLoRALinear(base, 2, seed=0)
    with pytest.raises(ValueError, match=r"x has shape \(4, 7\); expected \(\.\.\., in_features\) = \(\.\.\., 8\)"):
        layer(torch.ones(4, 7))


@pytest.mark.parametrize("shape", [(12, 16), (16, 12)], ids=["wide_in", "wide_out"])
def test_dropout_mask_in_forward_and_backward(shape, generator):
    # The mask comes from a seed drawn from torch's default generator: redrawing the same seed
    # gives the mask, and the float64 reference with that D(x) pins forward and gradients.
    out_features, in_features = shape
    layer = make_layer(out_features, in_features, 4, torch.float64, generator, randlora_dropout=0.4)
    randomize(layer, generator)
    x = randn(3, 6, in_features, dtype=torch.float64, generator=generator).requires_grad_()
    grad_y = randn(3, 6, out_features, dtype=torch.float64, generator=generator)
    torch.manual_seed(5)
    y = layer(x)
    y.backward(grad_y)
    torch.manual_seed(5)
    seed = draw_seed()
    x64 = x.detach().clone().requires_grad_()
    lam, gamma = (p.detach().clone().requires_grad_() for p in (layer.randlora_lambda, layer.randlora_gamma))
    # D(x) = x * keep / (1 - p), the keep mask a function of (seed, shape): read it off a ones tensor.
    scaled_mask = torch.ops.lowrank_ops.lora_dropout(torch.ones(18, in_features, dtype=torch.float64), seed, 0.4)
    assert (scaled_mask == 0).any() and (scaled_mask != 0).any()
    dropped = x64 * scaled_mask.reshape(x64.shape)
    base = layer.base_layer
    zero_base = torch.zeros_like(base.weight), torch.zeros_like(base.bias)
    expected = x64 @ base.weight.T + base.bias + reference(layer, dropped, *zero_base, lam, gamma)
    expected.backward(grad_y)
    for name, got, want in [("y", y, expected), ("dx", x.grad, x64.grad), ("d lambda", layer.randlora_lambda.grad,
                            lam.grad), ("d gamma", layer.randlora_gamma.grad, gamma.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    layer.eval()  # no dropout in eval mode
    torch.testing.assert_close(layer(x.detach()), reference(layer, x.detach(), base.weight, base.bias,
                                                            layer.randlora_lambda.detach(),
                                                            layer.randlora_gamma.detach()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(20, 28), (28, 20)], ids=["wide_in", "wide_out"])
def test_saves_for_backward_no_folded_basis(shape, generator):
    # The training-memory claim: between forward and backward the layer keeps, besides
    # references to tensors that exist anyway (x, W, the bases, the diagonals), nothing when
    # gamma is on the input side (in <= out) and u = x B~ [N, n r] otherwise; never the folded
    # A~ [n r, m] (as large as W for a square layer), which the backward refolds.
    out_features, in_features = shape
    layer = make_layer(out_features, in_features, 4, torch.float32, generator)
    randomize(layer, generator)
    x = randn(5, in_features, generator=generator).requires_grad_()
    existing = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    new = [t for t in saved if t.untyped_storage().data_ptr() not in existing]
    stacked = layer.num_bases * layer.r
    expected = [] if in_features <= out_features else [(5, stacked)]
    assert [tuple(t.shape) for t in new] == expected, [tuple(t.shape) for t in new]
    y.sum().backward()  # and the refolding backward runs
    assert layer.randlora_gamma.grad.shape == layer.randlora_gamma.shape


def test_autocast_error_at_most_twice_torch(autocast_case, generator):
    device, dtype = autocast_case
    layer = make_layer(32, 24, 4, torch.float32, generator, device=device)  # in <= out: gamma on the input side
    base = layer.base_layer
    inputs = dict(x=randn(3, 5, 24, generator=generator, device=device),
                  lam=randn(*layer.randlora_lambda.shape, generator=generator, device=device),
                  gamma=randn(*layer.randlora_gamma.shape, generator=generator, device=device) / 8)

    def ours(x, lam, gamma):
        return functional_call(layer, {"randlora_lambda": lam, "randlora_gamma": gamma}, (x,))

    def theirs(x, lam, gamma):  # PEFT's composition: two linears on the stacked bases
        scaled = (gamma[:, None, :] * layer.randlora_A.to(gamma.dtype)).reshape(-1, 24)
        weight, bias, B = (t.to(x.dtype) for t in (base.weight, base.bias, layer.randlora_B))
        u = torch.nn.functional.linear(x, scaled) * lam.reshape(-1)
        return torch.nn.functional.linear(x, weight, bias) + layer.scaling * torch.nn.functional.linear(u, B)

    check_autocast_against_torch(ours, theirs, inputs, device, dtype, generator, "RandLoRALinear")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_bases_cast_up_from_half_precision_are_redrawn(half):
    """As NOLA's: ``.half().float()`` redraws the half-rounded bases, so the layer computes
    the function of its state dict loaded into a fresh layer."""
    torch.manual_seed(0)
    layer = RandLoRALinear(torch.nn.Linear(12, 10), 4, seed=1)
    with torch.no_grad():
        layer.randlora_lambda.normal_()
    x = torch.randn(4, 12)
    layer.to(half).float()
    fresh = RandLoRALinear(torch.nn.Linear(12, 10), 4, seed=2)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(layer.randlora_A, fresh.randlora_A) and torch.equal(layer.randlora_B, fresh.randlora_B)
    assert torch.equal(layer(x), fresh(x))


@pytest.mark.parametrize("assign", [False, True])
def test_built_on_meta_then_loaded(assign):
    """As NOLA's: built on meta (low-memory loading), then loaded, it is the saved layer."""
    saved = RandLoRALinear(torch.nn.Linear(16, 12), 4, seed=1)
    with torch.no_grad():
        saved.randlora_lambda.normal_()
    layer = RandLoRALinear(torch.nn.Linear(16, 12, device="meta"), 4, seed=1)
    assert layer(torch.randn(5, 16, device="meta")).shape == (5, 12)
    if not assign:
        layer = layer.to_empty(device="cpu")
    layer.load_state_dict(saved.state_dict(), assign=assign)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), saved(x))


def test_built_on_meta_then_reset_parameters():
    """As NOLA's: to_empty() left randlora_seed and the bases uninitialized; reset_parameters()
    writes the constructor's seed back and draws the bases, and until then the forward refuses."""
    built = RandLoRALinear(torch.nn.Linear(16, 12), 4, seed=7)
    layer = assert_meta_build_resets_to(lambda: RandLoRALinear(torch.nn.Linear(16, 12), 4, seed=7), built,
                                        "RandLoRALinear: the bases and randlora_seed hold uninitialized memory")
    assert int(layer.randlora_seed) == 7
    assert torch.equal(layer.randlora_A, built.randlora_A) and torch.equal(layer.randlora_B, built.randlora_B)
