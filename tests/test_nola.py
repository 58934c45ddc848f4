"""NOLALinear: LoRA factors as trained combinations of frozen random bases drawn from a seed."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

import lowrank_ops.nn._random_basis as random_basis
from lowrank_ops.nn import NOLALinear
from lowrank_ops.nn._random_basis import stream_seed

from helpers import (
    assert_adam_fits, assert_backward_ignores_autocast, assert_is_base_product, assert_meta_build_resets_to,
    assert_within,
    check_autocast_against_torch, randn, summation_bound,
)


def make_layer(out_features, in_features, r, k_A, k_B, base_dtype, generator, device="cpu", **kwargs):
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(randn(out_features, in_features, generator=generator))
        base.bias.copy_(randn(out_features, generator=generator))
    base = base.to(device=device, dtype=base_dtype)
    kwargs.setdefault("seed", int(torch.randint(0, 2**62, (), generator=generator)))
    return NOLALinear(base, r, k_A, k_B, **kwargs)


def randomize(layer, generator) -> None:
    """Nonzero random coefficients (beta starts at 0, which would hide half the math)."""
    with torch.no_grad():
        for p in (layer.nola_alpha, layer.nola_beta):
            p.copy_(randn(*p.shape, generator=generator).to(p.dtype))


def reference(layer, x, alpha, beta):
    """``x W^T + b + s (x A^T) B^T`` in float64 with ``A = sum alpha_i A_i``, ``B = sum beta_j B_j``."""
    bases_A, bases_B = (t.double() for t in layer.bases())
    A = torch.einsum("i,irc->rc", alpha, bases_A)
    B = torch.einsum("j,jor->or", beta, bases_B)
    weight, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    return x @ weight.T + bias + layer.scaling * (x @ A.T) @ B.T


def test_starts_as_base_and_trains_only_the_coefficients(generator):
    layer = make_layer(20, 30, 4, 16, 24, torch.float32, generator, seed=7)
    trainable = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    assert set(trainable) == {"nola_alpha", "nola_beta"}
    assert sum(p.numel() for p in trainable.values()) == 16 + 24
    assert torch.equal(layer.nola_beta, torch.zeros(24)) and layer.nola_alpha.abs().min() > 0
    # A saved adapter is the coefficients and the seed (plus the wrapped layer): no bases.
    assert set(layer.state_dict()) == {"nola_seed", "nola_alpha", "nola_beta", "base_layer.weight", "base_layer.bias"}
    assert int(layer.state_dict()["nola_seed"]) == 7
    assert layer.nola_basis_A.shape == (16, 4, 30) and layer.nola_basis_B.shape == (24, 20, 4)
    # alpha gives A the variance of a Kaiming-uniform lora_A, 1 / (3 in) (mean over 120 entries of
    # a sum of 16 terms: within 40 % of it, a > 4-sigma band for this sample size).
    A, B = layer.factors()
    assert torch.equal(B, torch.zeros(20, 4))
    assert abs(A.var().item() * 3 * 30 - 1) < 0.4
    x = randn(3, 5, 30, generator=generator)
    assert_is_base_product(layer(x), x, layer.base_layer, "beta = 0")  # the adapter adds exact zeros
    assert layer.extra_repr() == "r=4, num_basis_A=16, num_basis_B=24, scaling=2, seed=7, cache_bases=True"


def test_bases_are_the_documented_draw_and_follow_the_seed(generator):
    layer = make_layer(12, 10, 3, 5, 6, torch.float64, generator, seed=123)
    # The format: float32 U(-1/sqrt(in), 1/sqrt(in)) from the CPU generator seeded with stream 0's
    # seed (one block: 5 * 3 * 10 numbers), B likewise from stream 1 with bound 1/sqrt(r).
    g = torch.Generator().manual_seed(stream_seed(123, 0))
    want_A = torch.empty(5, 3, 10).uniform_(-1 / math.sqrt(10), 1 / math.sqrt(10), generator=g)
    g = torch.Generator().manual_seed(stream_seed(123, 1))
    want_B = torch.empty(6, 12, 3).uniform_(-1 / math.sqrt(3), 1 / math.sqrt(3), generator=g)
    assert torch.equal(layer.nola_basis_A, want_A.double()) and torch.equal(layer.nola_basis_B, want_B.double())
    same = make_layer(12, 10, 3, 5, 6, torch.float64, generator, seed=123)
    other = make_layer(12, 10, 3, 5, 6, torch.float64, generator, seed=124)
    assert torch.equal(same.nola_basis_A, layer.nola_basis_A) and torch.equal(same.nola_alpha, layer.nola_alpha)
    assert not torch.equal(other.nola_basis_A, layer.nola_basis_A)
    assert not torch.equal(other.nola_basis_B, layer.nola_basis_B)
    # Streams are decorrelated: stream 1 of seed s is not stream 0 of seed s + 1.
    assert stream_seed(5, 1) != stream_seed(6, 0) and len({stream_seed(s, k) for s in range(50) for k in range(3)}) == 150
    # The default seed comes from torch's default generator (reproducible with manual_seed).
    torch.manual_seed(0)
    first = NOLALinear(torch.nn.Linear(10, 12), 3, 5, 6)
    torch.manual_seed(0)
    second = NOLALinear(torch.nn.Linear(10, 12), 3, 5, 6)
    assert int(first.nola_seed) == int(second.nola_seed)
    # The bases and the init are the seed's alone: a float64 default dtype drew other numbers
    # (a checkpoint, which holds only the seed, loaded another function), and a seedless layer
    # built under `with torch.device("meta")` drew its seed on meta (".item() cannot be called").
    torch.set_default_dtype(torch.float64)
    try:
        again = NOLALinear(torch.nn.Linear(10, 12, dtype=torch.float32), 3, 5, 6, seed=int(first.nola_seed))
    finally:
        torch.set_default_dtype(torch.float32)
    for name in ("nola_basis_A", "nola_basis_B", "nola_alpha", "nola_beta"):
        assert torch.equal(getattr(again, name), getattr(first, name))
    with torch.device("meta"):
        assert NOLALinear(torch.nn.Linear(10, 12), 3, 5, 6).nola_alpha.is_meta


@pytest.mark.parametrize("cache_bases", [True, False], ids=["cached", "uncached"])
def test_state_dict_round_trip_redraws_the_bases(cache_bases, generator):
    layer = make_layer(12, 16, 3, 8, 9, torch.float32, generator)
    randomize(layer, generator)
    fresh = NOLALinear(torch.nn.Linear(16, 12), 3, 8, 9, seed=1, cache_bases=cache_bases)
    missing, unexpected = fresh.load_state_dict(layer.state_dict())
    assert not missing and not unexpected
    assert int(fresh.nola_seed) == int(layer.nola_seed)
    for mine, theirs in zip(fresh.bases(), layer.bases()):
        assert torch.equal(mine, theirs)
    x = randn(4, 16, generator=generator)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_uncached_bases_give_the_same_values_and_gradients(monkeypatch, generator):
    # Small blocks, so the bases span several draw blocks (block boundaries are the format).
    monkeypatch.setattr(random_basis, "BLOCK_ELEMENTS", 64)
    cached = make_layer(10, 14, 3, 23, 17, torch.float64, generator, seed=99)
    uncached = NOLALinear(torch.nn.Linear(14, 10, dtype=torch.float64), 3, 23, 17, seed=99, cache_bases=False)
    assert random_basis.block_size(3, 14) == 1 and random_basis.block_size(10, 3) == 2
    assert uncached.nola_basis_A is None and uncached.nola_basis_B is None
    uncached.load_state_dict(cached.state_dict())
    randomize(cached, generator)
    uncached.load_state_dict(cached.state_dict())
    x = randn(2, 3, 14, dtype=torch.float64, generator=generator)
    grad_y = randn(2, 3, 10, dtype=torch.float64, generator=generator)
    outputs = []
    for layer in (cached, uncached):
        y = layer(x)
        y.backward(grad_y)
        outputs.append([y, layer.nola_alpha.grad, layer.nola_beta.grad])
    for name, want, got in zip(["y", "d alpha", "d beta"], *outputs):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_same_bases_and_results_on_every_device(device, monkeypatch, generator):
    """The seed format's promise across devices: a CPU-trained adapter loaded onto ``device``
    redraws bitwise the same bases (drawn by the CPU generator, then moved), cached or not
    (uncached: every block redrawn on the CPU and copied in the forward and the backward),
    and gives the CPU layer's outputs and coefficient gradients."""
    monkeypatch.setattr(random_basis, "BLOCK_ELEMENTS", 64)  # several draw blocks per kind
    on_cpu = make_layer(10, 14, 3, 23, 17, torch.float64, generator, seed=99)
    randomize(on_cpu, generator)
    x = randn(2, 3, 14, dtype=torch.float64, generator=generator)
    grad_y = randn(2, 3, 10, dtype=torch.float64, generator=generator)
    y = on_cpu(x)
    y.backward(grad_y)
    want = [y.detach(), on_cpu.nola_alpha.grad, on_cpu.nola_beta.grad]
    for cache_bases in (True, False):
        layer = NOLALinear(torch.nn.Linear(14, 10, dtype=torch.float64, device=device), 3, 23, 17, seed=5,
                           cache_bases=cache_bases)
        layer.load_state_dict(on_cpu.state_dict())  # a new seed: the bases are redrawn on the device
        for mine, theirs in zip(layer.bases(), on_cpu.bases()):
            assert mine.device.type == device and torch.equal(mine.cpu(), theirs)
        y = layer(x.to(device))
        y.backward(grad_y.to(device))
        for name, expected, got in zip(["y", "d alpha", "d beta"], want,
                                       [y.detach(), layer.nola_alpha.grad, layer.nola_beta.grad]):
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()),
                                       msg=lambda m, name=name: f"cache_bases={cache_bases}, {name}: {m}")


def test_forward_and_gradients_match_float64_reference(device, generator):
    out_features, in_features, r, k_A, k_B = 24, 36, 5, 40, 30
    layer = make_layer(out_features, in_features, r, k_A, k_B, torch.float32, generator, device=device)
    randomize(layer, generator)
    x = randn(2, 7, in_features, generator=generator, device=device).requires_grad_()
    y = layer(x)
    grad_y = randn(*y.shape, generator=generator, device=device)
    y.backward(grad_y)
    assert layer.base_layer.weight.grad is None
    x64 = x.detach().double().requires_grad_()
    alpha64, beta64 = (p.detach().double().requires_grad_() for p in (layer.nola_alpha, layer.nola_beta))
    expected = reference(layer, x64, alpha64, beta64)
    expected.backward(grad_y.double())
    # Rigorous bounds from the float64 absolute sums of every product that enters each result
    # (helpers.summation_bound): a float32 result that chains K roundings per term is within
    # gamma_K of that sum.  Chains: A = sum of k_A terms, B of k_B, the base and shrink dot
    # products of `in` terms, the expand of r, the scale, the bias.
    bases_A, bases_B = (t.double().abs() for t in layer.bases())
    abs_A = torch.einsum("i,irc->rc", alpha64.detach().abs(), bases_A)
    abs_B = torch.einsum("j,jor->or", beta64.detach().abs(), bases_B)
    W, s = layer.base_layer.weight.double().abs(), layer.scaling
    ax, ag = x64.detach().abs().reshape(-1, in_features), grad_y.double().abs().reshape(-1, out_features)
    abs_y = ax @ W.T + layer.base_layer.bias.double().abs() + s * (ax @ abs_A.T) @ abs_B.T
    chain = k_A + k_B + in_features + r + 4
    assert_within(y.reshape(-1, out_features), expected.detach().reshape(-1, out_features),
                  summation_bound(abs_y, expected.detach().reshape(-1, out_features), chain, torch.float32), "y")
    abs_dx = ag @ W + s * (ag @ abs_B) @ abs_A
    assert_within(x.grad.reshape(-1, in_features), x64.grad.reshape(-1, in_features),
                  summation_bound(abs_dx, x64.grad.reshape(-1, in_features), k_A + k_B + out_features + r + 4,
                                  torch.float32), "dx")
    # d alpha_i = <dA, A_i> with dA = s (dy B)^T x (N + out + k_B terms, then r * in in the GEMV).
    abs_dA = s * (ag @ abs_B).T @ ax
    abs_dalpha = (bases_A * abs_dA).sum((1, 2))
    n = ax.shape[0]
    assert_within(layer.nola_alpha.grad, alpha64.grad,
                  summation_bound(abs_dalpha, alpha64.grad, n + out_features + k_B + r * in_features + 4,
                                  torch.float32), "d alpha")
    abs_dB = s * ag.T @ (ax @ abs_A.T)
    abs_dbeta = (bases_B * abs_dB).sum((1, 2))
    assert_within(layer.nola_beta.grad, beta64.grad,
                  summation_bound(abs_dbeta, beta64.grad, n + in_features + k_A + out_features * r + 4,
                                  torch.float32), "d beta")


def test_empty_and_non_contiguous_inputs(generator):
    layer = make_layer(12, 16, 3, 6, 5, torch.float64, generator)
    randomize(layer, generator)
    empty = torch.zeros(0, 16, dtype=torch.float64, requires_grad=True)
    y = layer(empty)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.equal(layer.nola_alpha.grad, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(layer.nola_beta.grad, torch.zeros(5, dtype=torch.float64))
    x = randn(16, 3, 5, dtype=torch.float64, generator=generator).permute(2, 1, 0)  # [5, 3, 16], strided
    assert not x.is_contiguous()
    alpha, beta = layer.nola_alpha.detach(), layer.nola_beta.detach()
    # float64 throughout: only the summation order differs (BLAS on a strided operand).
    torch.testing.assert_close(layer(x), reference(layer, x, alpha, beta), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_features, out_features", [(0, 4), (4, 0), (0, 0)])
def test_layers_without_inputs_or_outputs(in_features, out_features, generator):
    """nn.Linear(0, k) and (k, 0) are valid layers (LoRALinear wraps them); NOLA's basis bound
    1 / sqrt(in_features) raised ZeroDivisionError.  The adapter adds nothing to them."""
    base = torch.nn.Linear(in_features, out_features, dtype=torch.float64)
    with torch.no_grad():
        base.bias.normal_(generator=generator)
    layer = NOLALinear(base, 2, 4, 3)
    x = torch.randn(3, in_features, dtype=torch.float64, generator=generator, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, base(x))
    y.sum().backward()
    assert torch.equal(layer.nola_alpha.grad, torch.zeros(4, dtype=torch.float64))


def test_gradcheck(generator):
    layer = make_layer(7, 9, 3, 5, 4, torch.float64, generator)
    x = randn(2, 4, 9, dtype=torch.float64, generator=generator).requires_grad_()
    alpha = randn(5, dtype=torch.float64, generator=generator).requires_grad_()
    beta = randn(4, dtype=torch.float64, generator=generator).requires_grad_()

    def through_layer(x, alpha, beta):
        return functional_call(layer, {"nola_alpha": alpha, "nola_beta": beta}, (x,))

    assert torch.autograd.gradcheck(through_layer, (x, alpha, beta))
    torch.testing.assert_close(through_layer(x, alpha, beta), reference(layer, x, alpha, beta), rtol=1e-12, atol=1e-12)
    uncached = NOLALinear(layer.base_layer, 3, 5, 4, seed=int(layer.nola_seed), cache_bases=False)
    assert torch.autograd.gradcheck(
        lambda alpha, beta: functional_call(uncached, {"nola_alpha": alpha, "nola_beta": beta}, (x.detach(),)),
        (alpha, beta))


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["bf16_adapter", "fp32_adapter"])
def test_bfloat16_base_error_at_most_twice_torch(adapter_dtype, generator):
    layer = make_layer(48, 64, 8, 32, 32, torch.bfloat16, generator, dtype=adapter_dtype)
    ad = layer.nola_alpha.dtype
    assert ad == (adapter_dtype or torch.bfloat16) and layer.nola_basis_A.dtype == ad
    randomize(layer, generator)
    x = randn(16, 64, dtype=torch.bfloat16, generator=generator)
    expected = reference(layer, x.double(), layer.nola_alpha.detach().double(), layer.nola_beta.detach().double())
    # The torch composition on the same rounded operands (PEFT's order: the base output plus the
    # adapter's in the adapter dtype, one cast back).  DESIGN.md section 6: at most 2x its error.
    A, B = layer.factors()
    adapter = layer.scaling * (x.to(ad) @ A.T) @ B.T
    theirs = (torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias).to(ad) + adapter)
    ours = layer(x)
    assert ours.dtype == torch.bfloat16
    ours_error = (ours.double() - expected).abs().max().item()
    torch_error = (theirs.to(torch.bfloat16).double() - expected).abs().max().item()
    assert ours_error <= 2 * torch_error, (ours_error, torch_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype, generator):
    layer = make_layer(40, 32, 5, 12, 10, dtype, generator)
    randomize(layer, generator)
    x = randn(6, 32, dtype=dtype, generator=generator)
    y = layer(x)
    before = layer.base_layer.weight.detach().clone()
    merged_expected = before.double() + layer.delta_weight().double()
    layer.merge()
    assert layer.merged
    weight = layer.base_layer.weight
    merged_max = weight.abs().max().item()  # weight is updated in place by unmerge
    # One rounding of W + s B A (float32 accumulation of 5 terms; A and B are rounded to dtype first).
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-22
    torch.testing.assert_close(weight.double(), merged_expected, rtol=unit, atol=unit * merged_expected.abs().max().item())
    # bf16: y rounds the base and the adapter separately, the merged layer once: 2^-7 |y|.
    # float32: 32-term and 5-term sums in another order, 1e-5 |y| (~ 170 float32 units).
    tol = (2.0**-7 if dtype == torch.bfloat16 else 1e-5) * y.abs().max().item()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=tol)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_parameters()
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    # One rounding each way (2^-8 |W| in bf16), plus float32, the 5-term product computed twice.
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    A, B = layer.factors()
    abs_product = layer.scaling * (B.double().abs() @ A.double().abs())
    atol = u * (merged_max + before.abs().max().item()) + 2 * 7 * 2.0**-24 * abs_product.max().item()
    torch.testing.assert_close(layer.base_layer.weight, before, rtol=0, atol=atol)
    layer.reset_parameters()
    assert torch.equal(layer.nola_beta, torch.zeros(10, dtype=dtype))


def test_torch_compile_fullgraph(generator):
    layer = make_layer(16, 24, 4, 12, 10, torch.float32, generator)
    randomize(layer, generator)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = randn(3, 5, 24, generator=generator).requires_grad_()
    results = []
    for model in (layer, compiled):
        layer.zero_grad()
        x.grad = None
        model(x).square().sum().backward()
        results.append([model(x).detach(), layer.nola_alpha.grad.clone(), layer.nola_beta.grad.clone(), x.grad.clone()])
    for name, want, got in zip(["y", "d alpha", "d beta", "dx"], *results):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_uncached_bases_refuse_export_and_compile_cached_ones_export(generator):
    """torch.export of cache_bases=False lifted the seeded generator as an object that each
    call advanced: the exported program matched the layer once, then drew other bases
    (4.97 off).  Tracing now raises; the cached layer exports and matches."""
    x = randn(6, 24, generator=generator)
    for cache_bases in (False, True):
        layer = make_layer(16, 24, 4, 12, 10, torch.float32, generator, cache_bases=cache_bases, seed=3).eval()
        randomize(layer, generator)
        if not cache_bases:
            with pytest.raises(RuntimeError, match=r"cache_bases=False\) cannot be traced by torch.compile or "
                                                    r"torch.export"):
                torch.export.export(layer, (x,), strict=False)
            with pytest.raises(Exception, match="cannot be traced"):
                torch.compile(layer, fullgraph=True, backend="eager")(x)
            continue
        exported = torch.export.export(layer, (x,), strict=False).module()
        for _ in range(2):
            torch.testing.assert_close(exported(x), layer(x), rtol=0, atol=0)

def test_sgd_fits_a_target_update(generator):
    # The target is itself a NOLA update of the same bases: SGD on the 20 coefficients reaches it.
    layer = make_layer(12, 16, 2, 10, 10, torch.float64, generator, lora_alpha=2.0)
    with torch.no_grad():
        target = NOLALinear(torch.nn.Linear(16, 12, dtype=torch.float64), 2, 10, 10, seed=int(layer.nola_seed))
        target.base_layer.load_state_dict(layer.base_layer.state_dict())
        target.nola_beta.copy_(randn(10, dtype=torch.float64, generator=generator))
    x = randn(64, 16, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        y_target = target(x)
    assert_adam_fits(layer, x, y_target, 300)


def test_dropout_applies_in_training_only(generator):
    layer = make_layer(8, 12, 2, 4, 4, torch.float64, generator, lora_dropout=0.5)
    randomize(layer, generator)
    x = randn(32, 12, dtype=torch.float64, generator=generator)
    layer.eval()
    torch.testing.assert_close(layer(x), reference(layer, x, layer.nola_alpha.detach(), layer.nola_beta.detach()))
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))



def test_numpy_integer_seed_and_sizes():
    """An np.int64 seed (from an np.random draw) was refused ("seed must be an int in [0,
    2^63)"): the same bases as Python ints; a bool seed stays refused."""
    np = pytest.importorskip("numpy")
    base = torch.nn.Linear(8, 6)
    layer = NOLALinear(base, np.int64(2), np.int64(3), np.int32(4), seed=np.int64(99))
    twin = NOLALinear(base, 2, 3, 4, seed=99)
    assert torch.equal(layer.nola_basis_A, twin.nola_basis_A) and torch.equal(layer.nola_basis_B, twin.nola_basis_B)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\^63\); got True"):
        NOLALinear(base, 2, 3, 4, seed=True)

def test_bad_input_errors(generator):
    base = torch.nn.Linear(8, 6)
    for kwargs, error, match in [
        (dict(r=0), ValueError, r"NOLALinear: r must be an integer >= 1; got 0"),
        (dict(r=2.0), ValueError, r"r must be an integer >= 1; got 2.0"),
        (dict(num_basis_A=0), ValueError, r"num_basis_A must be an integer >= 1; got 0"),
        (dict(num_basis_B=-3), ValueError, r"num_basis_B must be an integer >= 1; got -3"),
        (dict(num_basis_B=True), ValueError, r"num_basis_B must be an integer >= 1; got True"),
        (dict(lora_alpha=float("nan")), ValueError, r"lora_alpha must be finite; got nan"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\); got 1.0"),
        (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\^63\); got -1"),
        (dict(seed=2**63), ValueError, r"seed must be an int in \[0, 2\^63\)"),
        (dict(seed=1.5), ValueError, r"seed must be an int in \[0, 2\^63\); got 1.5"),
        (dict(dtype=torch.float64), TypeError, r"dtype is torch.float64; expected the base weight's \(torch.float32\)"),
        (dict(cache_bases=1), TypeError, r"cache_bases must be a bool; got int"),
    ]:
        args = dict(r=2, num_basis_A=3, num_basis_B=3)
        args.update(kwargs)
        with pytest.raises(error, match=match):
            NOLALinear(base, args.pop("r"), args.pop("num_basis_A"), args.pop("num_basis_B"), **args)
    with pytest.raises(TypeError, match="base_layer must be a torch.nn.Linear; got Conv1d"):
        NOLALinear(torch.nn.Conv1d(3, 3, 1), 2, 3, 3)
    layer = NOLALinear(base, 2, 3, 3, seed=0)
    with pytest.raises(ValueError, match=r"x has shape \(4, 7\); expected \(\.\.\., in_features\) = \(\.\.\., 8\)"):
        layer(torch.ones(4, 7))


def test_autocast_error_at_most_twice_torch(autocast_case, generator):
    device, dtype = autocast_case
    layer = make_layer(24, 32, 4, 16, 12, torch.float32, generator, device=device)
    base = layer.base_layer
    inputs = dict(x=randn(3, 5, 32, generator=generator, device=device),
                  alpha=randn(16, generator=generator, device=device),
                  beta=randn(12, generator=generator, device=device))

    def ours(x, alpha, beta):
        return functional_call(layer, {"nola_alpha": alpha, "nola_beta": beta}, (x,))

    def theirs(x, alpha, beta):  # the authors' composition: contractions, then the unfused branch
        A = torch.einsum("i,irc->rc", alpha, layer.nola_basis_A.to(alpha.dtype))
        B = torch.einsum("j,jor->or", beta, layer.nola_basis_B.to(beta.dtype))
        weight, bias = base.weight.to(x.dtype), base.bias.to(x.dtype)
        lora = torch.nn.functional.linear(torch.nn.functional.linear(x, A), B)
        return torch.nn.functional.linear(x, weight, bias) + layer.scaling * lora

    check_autocast_against_torch(ours, theirs, inputs, device, dtype, generator, "NOLALinear")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_bases_cast_up_from_half_precision_are_redrawn(half):
    """``.half().float()`` used to keep the half-rounded cached bases (~1e-4 relative off
    the function of the same state dict in a fresh layer); cast from a half dtype they are
    redrawn, while a cast down from float32 keeps the cast (it is what a draw gives)."""
    torch.manual_seed(0)
    layer = NOLALinear(torch.nn.Linear(12, 10), 3, 4, 5, seed=1)
    with torch.no_grad():
        layer.nola_beta.normal_()
    x = torch.randn(4, 12)
    layer.to(half)
    drawn = NOLALinear(torch.nn.Linear(12, 10), 3, 4, 5, seed=1).to(half)
    assert torch.equal(layer.nola_basis_A, drawn.nola_basis_A)
    layer.float()
    fresh = NOLALinear(torch.nn.Linear(12, 10), 3, 4, 5, seed=2)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(layer.nola_basis_A, fresh.nola_basis_A) and torch.equal(layer.nola_basis_B, fresh.nola_basis_B)
    assert torch.equal(layer(x), fresh(x))


@pytest.mark.parametrize("cache_bases", [True, False])
@pytest.mark.parametrize("assign", [False, True])
def test_built_on_meta_then_loaded(cache_bases, assign):
    """Low-memory loading: a layer built on meta (reading its seed raised) infers shapes, and
    once loaded (into to_empty storage, or assigned) computes the saved layer's function."""
    saved = NOLALinear(torch.nn.Linear(16, 12), 3, 4, 5, seed=1, cache_bases=cache_bases)
    with torch.no_grad():
        saved.nola_beta.normal_()
    layer = NOLALinear(torch.nn.Linear(16, 12, device="meta"), 3, 4, 5, seed=1, cache_bases=cache_bases)
    assert layer(torch.randn(5, 16, device="meta")).shape == (5, 12) and "seed=?" in repr(layer)
    if not assign:
        layer = layer.to_empty(device="cpu")
    layer.load_state_dict(saved.state_dict(), assign=assign)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), saved(x))


@pytest.mark.parametrize("cache_bases", [True, False])
def test_built_on_meta_then_reset_parameters(cache_bases):
    """to_empty() left nola_seed and the bases uninitialized and reset_parameters() kept them
    (the constructor's seed was lost; NaN after a step): the seed is written back and the
    bases drawn from it, and until then the forward refuses."""
    built = NOLALinear(torch.nn.Linear(16, 12), 3, 4, 5, seed=123, cache_bases=cache_bases)
    layer = assert_meta_build_resets_to(
        lambda: NOLALinear(torch.nn.Linear(16, 12), 3, 4, 5, seed=123, cache_bases=cache_bases), built,
        "NOLALinear: the bases and nola_seed hold uninitialized memory")
    assert int(layer.nola_seed) == 123
    for a, b in zip(built.bases(), layer.bases()):
        assert torch.equal(a, b)


def test_an_earlier_pickle_keeps_its_seed_through_meta():
    """A layer pickled before the constructor's seed was kept as an attribute: moved to meta,
    to_empty() and reset_parameters() raised AttributeError ('_seed'); the seed is now taken
    from the buffer before the move."""
    built = NOLALinear(torch.nn.Linear(16, 12), 3, 4, 5, seed=77)
    del built.__dict__["_seed"]  # as unpickled from the earlier version
    layer = copy.deepcopy(built)
    layer.to("meta")
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.base_layer.weight.copy_(built.base_layer.weight)
        layer.base_layer.bias.copy_(built.base_layer.bias)
    layer.reset_parameters()
    assert int(layer.nola_seed) == 77
    for a, b in zip(built.bases(), layer.bases()):
        assert torch.equal(a, b)




def test_uncached_backward_inside_autocast(generator):
    """The uncached combination's backward (torch.mv of the redrawn bases) ran under the
    caller's autocast region; now as outside it, as the cached layer's."""
    layer = make_layer(16, 24, 4, 12, 10, torch.float32, generator, cache_bases=False)
    randomize(layer, generator)
    x = randn(3, 24, generator=generator).requires_grad_()
    assert_backward_ignores_autocast(lambda x, alpha, beta: layer(x), [x, layer.nola_alpha, layer.nola_beta])
