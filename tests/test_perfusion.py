"""Perfusion's key-locked gated rank-1 editing (methods.perfusion): the covariance and its
inverse, the edit's exactness at the concepts and away from them, the gated formula against
a float64 reference, multi-concept joint solving, merge, gradients, bad input."""
from __future__ import annotations

import math

import copy

import pytest
import torch

from lowrank_ops.methods.perfusion import RankOneEditLinear, input_covariance

from helpers import assert_compiled_matches_eager

EPS64 = 2.0**-52


def embeddings(n: int, d: int, generator, dtype=torch.float64) -> torch.Tensor:
    """Correlated, non-centered samples (a random mixing of Gaussians plus an offset), like
    text-encoder outputs: C has a spread of eigenvalues, not the identity."""
    mix = torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    mix += torch.eye(d, dtype=torch.float64)
    offset = torch.randn(d, generator=generator, dtype=torch.float64)
    return (torch.randn(n, d, generator=generator, dtype=torch.float64) @ mix + 0.5 * offset).to(dtype)


def linear(in_f: int, out_f: int, generator, dtype=torch.float64, bias=True) -> torch.nn.Linear:
    layer = torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=generator) / math.sqrt(in_f))
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=generator))
    return layer.requires_grad_(False)


def setup(in_f, out_f, k, generator, dtype=torch.float64, device="cpu", **kwargs):
    X = embeddings(8 * in_f, in_f, generator)
    cov = input_covariance(X)
    layer = linear(in_f, out_f, generator, dtype).to(device)
    concepts = torch.randn(k, in_f, generator=generator, dtype=torch.float64)
    targets = torch.randn(k, out_f, generator=generator, dtype=torch.float64)
    module = RankOneEditLinear(layer, cov.inv.to(device, dtype), concepts.to(device, dtype),
                               targets.to(device, dtype), **kwargs)
    return module, cov, layer, concepts, targets


def reference(x, W, b, C_inv, I, V, beta, tau, gated):
    """The module docstring's formula in float64 on the CPU, composed the slow, obvious way."""
    x, W, C_inv, I, V = (t.detach().double().cpu() for t in (x, W, C_inv, I, V))
    b = None if b is None else b.detach().cpu()
    G = I @ C_inv @ I.T
    a = torch.linalg.solve(G, I @ C_inv @ x.T).T  # [N, k]
    g = torch.sigmoid((a - beta) / tau) if gated else a
    y = (x - a @ I) @ W.T + g @ V
    return y if b is None else y + b.double()


# ---------------------------------------------------------------------------- covariance
def test_input_covariance_against_float64(generator):
    X = embeddings(300, 24, generator, torch.float32)
    result = input_covariance(X.reshape(3, 100, 24))  # leading dims are samples
    X64 = X.double()
    M = X64.T @ X64 / 300
    assert result.num_samples == 300 and result.cov.dtype == torch.float64
    # float64 accumulation of float32 inputs (exact products): 300 terms, |error| <= 300 eps sum|x x|.
    bound = 300 * EPS64 * (X64.abs().T @ X64.abs()) / 300
    assert ((result.cov - M).abs() <= bound).all()
    # The inverse: its residual against the identity is ~ cond(C) eps.
    cond = float(torch.linalg.cond(M))
    eye = torch.eye(24, dtype=torch.float64)
    assert (result.inv @ M - eye).abs().max() <= 24 * cond * EPS64
    assert torch.equal(result.inv, result.inv.T)


def test_input_covariance_chunks_center_shrinkage_ridge(generator):
    X = embeddings(200, 16, generator)
    chunked = input_covariance(iter([X[:70], X[70:150], X[150:]]), center=True, shrinkage=0.3, ridge=0.25)
    mean = X.mean(0)
    S = (X - mean).T @ (X - mean) / 200
    expected = 0.7 * S + 0.3 * torch.trace(S) / 16 * torch.eye(16, dtype=torch.float64) + 0.25 * torch.eye(16,
                                                                                                            dtype=torch.float64)
    # Differences only from summation order (float64, 200 terms of magnitude ~ max|x|^2).
    scale = float(X.abs().max()) ** 2
    assert (chunked.cov - expected).abs().max() <= 400 * EPS64 * scale
    full_shrink = input_covariance(X, shrinkage=1.0)
    M = X.T @ X / 200
    assert torch.allclose(full_shrink.cov, torch.trace(M) / 16 * torch.eye(16, dtype=torch.float64),
                          rtol=0, atol=100 * EPS64 * scale)
    assert input_covariance(X, dtype=torch.float32).inv.dtype == torch.float32


def test_input_covariance_singular_needs_ridge(generator):
    X = embeddings(10, 32, generator)  # 10 samples in 32 dims: rank 10
    with pytest.raises(ValueError, match=r"input_covariance: embeddings: .*n = 10 samples in d = 32.*(not positive "
                                         r"definite|numerically singular).*ridge > 0"):
        input_covariance(X)
    ridged = input_covariance(X, ridge=1e-3)
    assert (ridged.inv @ ridged.cov - torch.eye(32, dtype=torch.float64)).abs().max() < 1e-6
    shrunk = input_covariance(X, shrinkage=0.1)
    assert torch.isfinite(shrunk.inv).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"ridge": -1.0}, r"ridge must be >= 0"),
    ({"ridge": float("nan")}, r"ridge must be >= 0"),
    ({"shrinkage": 1.5}, r"shrinkage must be a number in \[0, 1\]; got 1.5"),
])
def test_input_covariance_bad_settings(kwargs, match, generator):
    with pytest.raises(ValueError, match=match):
        input_covariance(embeddings(50, 4, generator), **kwargs)


def test_input_covariance_bad_inputs(generator):
    with pytest.raises(ValueError, match=r"no samples"):
        input_covariance(torch.empty(0, 8))
    with pytest.raises(TypeError, match="input_covariance: dtype must be a floating torch.dtype; got torch.int32"):
        input_covariance(torch.randn(50, 6, generator=generator), dtype=torch.int32)  # (truncated cov / inv before)
    with pytest.raises(ValueError, match=r"chunk 1 has width 5; expected d = 4"):
        input_covariance([torch.randn(10, 4, generator=generator), torch.randn(10, 5, generator=generator)])
    bad = torch.randn(10, 4, generator=generator)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite"):
        input_covariance(bad)
    with pytest.raises(ValueError, match=r"floating tensors"):
        input_covariance(torch.ones(10, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"embeddings\[0\] must be a tensor"):
        input_covariance([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"width d = 0 \(shape \(4, 0\)\); expected d >= 1"):  # was reshape's
        input_covariance(torch.zeros(4, 0))


# ---------------------------------------------------------------------------- the edit
@pytest.mark.parametrize("k", [1, 3])
def test_ungated_maps_concepts_to_targets_exactly(k, generator):
    module, cov, layer, I, V = setup(20, 12, k, generator, gated=False)
    y = module(I)
    # a(i*_c) = e_c up to cond(G) eps; the residual is then ~ eps (|W i*| + |v*|).
    expected = V + layer.bias
    assert (y - expected).abs().max() <= 1e3 * EPS64 * float(expected.abs().max() + (I @ layer.weight.T).abs().max())
    assert (module.coefficients(I) - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e3 * EPS64


@pytest.mark.parametrize("k", [1, 2])
def test_inputs_orthogonal_to_the_concepts_are_unchanged(k, generator):
    module, cov, layer, I, V = setup(20, 12, k, generator, gated=False)
    # x with I* C^-1 x = 0: project random x C^-1-orthogonally off span(I*).
    x = torch.randn(7, 20, generator=generator, dtype=torch.float64)
    keys = I @ cov.inv  # [k, in]
    x = x - torch.linalg.solve(keys @ I.T, keys @ x.T).T @ I
    assert (x @ keys.T).abs().max() <= 1e-12
    assert (module(x) - layer(x)).abs().max() <= 1e3 * EPS64 * float(layer(x).abs().max())
    # Gated and saturated (tau small): sigma(-beta / tau) = e^-375 and 1 - sigma((1 - beta) / tau) = e^-125,
    # both below float64 resolution.
    module.gated, module.gate_temperature = True, 0.002
    assert (module(x) - layer(x)).abs().max() <= 1e3 * EPS64 * float(layer(x).abs().max())
    assert (module(I) - (V + layer.bias)).abs().max() <= 1e3 * EPS64 * float(V.abs().max() + layer.bias.abs().max())


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 3])
def test_forward_against_float64_reference(k, dtype, gated, device, generator):
    module, cov, layer, I, V = setup(24, 16, k, generator, dtype, device, gated=gated, gate_bias=0.6,
                                     gate_temperature=0.2)
    # Inputs around the concepts (energies spread over the gate's slope) and random ones,
    # batched [2, 5, in] and non-contiguous.
    near = I[torch.arange(10) % k] * torch.linspace(0.0, 1.5, 10, dtype=torch.float64)[:, None]
    x = (near + 0.1 * torch.randn(10, 24, generator=generator, dtype=torch.float64)).to(dtype)
    x = x.to(device).reshape(5, 2, 24).transpose(0, 1)
    assert not x.is_contiguous()
    y = module(x)
    assert y.shape == (2, 5, 16) and y.dtype == dtype and y.device == x.device
    # The reference from the module's own rounded buffers (concepts, targets, W stored in dtype).
    expected = reference(x.reshape(-1, 24), layer.weight, layer.bias, cov.inv, module.concept_input,
                         module.target, 0.6, 0.2, gated).reshape(2, 5, 16)
    # float64: ~cond eps; float32: P is rounded to float32 (relative 2^-24 cond(G)-amplified)
    # and every product accumulates in float32 over <= in terms: a few hundred units of 2^-24
    # relative to the magnitudes (|x| |W| + |a| |W i*| + |V|), scaled by 1/tau for the gate.
    unit = EPS64 if dtype == torch.float64 else 2.0**-24
    magnitude = float(x.abs().max() * layer.weight.abs().sum(1).max() + V.abs().max() + layer.bias.abs().max())
    assert (y.double().cpu() - expected).abs().max() <= 2e3 * unit * magnitude / 0.2


def test_empty_and_single_inputs(generator):
    module, cov, layer, I, V = setup(8, 6, 2, generator)
    assert module(torch.empty(0, 8, dtype=torch.float64)).shape == (0, 6)
    assert module(torch.empty(3, 0, 8, dtype=torch.float64)).shape == (3, 0, 6)
    x = torch.randn(8, generator=generator, dtype=torch.float64)
    expected = reference(x[None], layer.weight, layer.bias, cov.inv, I, V, 0.75, 0.1, True)[0]
    assert (module(x) - expected).abs().max() <= 1e-12


def test_bfloat16_inputs_follow_float32_compute(generator):
    module, cov, layer, I, V = setup(16, 8, 1, generator, torch.bfloat16, gated=True)
    x = (I * 0.8 + 0.05 * torch.randn(4, 16, generator=generator, dtype=torch.float64)).to(torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    expected = reference(x, layer.weight, layer.bias, cov.inv, module.concept_input, module.target, 0.75, 0.1, True)
    # Everything but two roundings happens in float32 (relative ~1e-6, the 1e-5 slack): the
    # base F.linear output is rounded to bfloat16 (2^-8 |W x + b|), and the sum once more
    # (2^-8 |y|).
    base = (x.double() @ layer.weight.double().T + layer.bias.double()).abs()
    assert ((y.double() - expected).abs() <= 2.0**-8 * (expected.abs() + base) * 1.01 + 1e-5).all()


def test_half_cast_keeps_a_float32_probe(generator):
    """``.half()`` / ``.bfloat16()`` of a float32 module keep the probe float32, as a module
    built on a half base stores it (cast to half, the gate's error grew tenfold); a float32
    x for a half module is named, not torch's "mat1 and mat2" error."""
    module, cov, layer, I, V = setup(16, 8, 1, generator, torch.float32, gated=True)
    probe = module.probe.clone()
    for cast in (torch.nn.Module.half, torch.nn.Module.bfloat16):
        converted = cast(copy.deepcopy(module))
        assert converted.probe.dtype == torch.float32 and torch.equal(converted.probe, probe)
        assert converted.concept_keys.dtype == converted.base_layer.weight.dtype
    assert torch.equal(copy.deepcopy(module).half().float().probe, probe)
    half = copy.deepcopy(module).half()
    with pytest.raises(TypeError, match=r"x has dtype torch.float32; expected torch.float16 \(the base weight's\)"):
        half(torch.randn(2, 16))


def test_key_locked_and_value_path(generator):
    in_f, out_f = 16, 10
    X = embeddings(200, in_f, generator)
    cov = input_covariance(X)
    layer = linear(in_f, out_f, generator, bias=False)
    concept = torch.randn(in_f, generator=generator, dtype=torch.float64)
    superordinate = torch.randn(in_f, generator=generator, dtype=torch.float64)
    keys = RankOneEditLinear.key_locked(layer, cov.inv, concept, superordinate, gated=False)
    assert "target" in dict(keys.named_buffers()) and not list(keys.parameters(recurse=False))
    # Key-locked: the concept's key is the superordinate concept's key.
    assert (keys(concept) - layer(superordinate)).abs().max() <= 1e-12
    values = RankOneEditLinear.value_path(layer, cov.inv, concept, superordinate)
    assert isinstance(values.target, torch.nn.Parameter) and values.target.requires_grad
    assert torch.equal(values.target.detach(), keys.target)


def test_gradcheck_target_and_input(generator):
    module, cov, layer, I, V = setup(6, 5, 2, generator, train_target=True, gate_bias=0.5, gate_temperature=0.3)
    x = (I[[0, 1, 0]] * 0.7 + 0.2 * torch.randn(3, 6, generator=generator, dtype=torch.float64)).requires_grad_()

    target = module.target.detach().clone().requires_grad_()
    # gradcheck of the module's function in x, and in v* through the Parameter itself:
    assert torch.autograd.gradcheck(lambda x: module(x), (x,))
    out = module(x)
    grad_out = torch.randn_like(out)
    (g_target,) = torch.autograd.grad(out, module.target, grad_out)
    # d y / d V* = g(a)^T: compare with the analytic gradient and with gradcheck on a
    # functional copy.
    a = module.coefficients(x.detach())
    assert (g_target - module._gate(a).T @ grad_out).abs().max() <= 1e-12
    assert torch.autograd.gradcheck(
        lambda t: torch.func.functional_call(module, {"target": t}, (x.detach(),)), (target,))


@pytest.mark.parametrize("dtype, gated, train_base", [(torch.float32, True, False), (torch.float32, False, True),
                                                    (torch.bfloat16, True, True)], ids=str)
def test_torch_compile_fullgraph(dtype, gated, train_base, generator):
    # The forward accumulates the edit into F.linear's output in place (addmm_): the traced
    # graph must keep that update and F.linear's backward (x, the target and, when trained,
    # the base weight and bias).  bfloat16: the float32 compute path (a widened copy of y).
    module, *_ = setup(10, 7, 2, generator, dtype, gated=gated, train_target=True)
    module.base_layer.requires_grad_(train_base)
    x = torch.randn(3, 4, 10, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    assert_compiled_matches_eager(module, [x], generator)


def test_multi_concept_joint_solve_vs_sum_of_edits(generator):
    """Correlated concepts: the joint solve is exact where the sum of single edits is not."""
    module, cov, layer, I, V = setup(12, 8, 2, generator, gated=False)
    I2 = torch.stack([I[0], I[0] + 0.3 * I[1]])  # strongly correlated concepts
    joint = RankOneEditLinear(layer, cov.inv, I2, V, gated=False)
    assert (joint(I2) - (V + layer.bias)).abs().max() <= 1e-11
    singles = [RankOneEditLinear(layer, cov.inv, I2[c], V[c], gated=False) for c in range(2)]
    summed = layer(I2) + sum(m(I2) - layer(I2) for m in singles)
    assert (summed - (V + layer.bias)).abs().max() > 1e-2  # the naive stack misses the targets
    # combine() rebuilds the joint solve from stored C^-1 i* rows, without C^-1.
    combined = RankOneEditLinear.combine(*singles)
    assert combined.num_concepts == 2
    assert (combined(I2) - joint(I2)).abs().max() <= 1e-11


def test_merge_matches_ungated_forward(generator):
    module, cov, layer, I, V = setup(20, 14, 3, generator, gated=False)
    merged = module.merge()
    x = torch.randn(9, 20, generator=generator, dtype=torch.float64)
    assert (merged(x) - module(x)).abs().max() <= 1e-12
    W_prime = layer.weight + (V.T - layer.weight @ I.T) @ torch.linalg.solve(I @ cov.inv @ I.T, I @ cov.inv)
    assert (module.merged_weight() - W_prime).abs().max() <= 1e-11
    module.gated = True
    with pytest.raises(ValueError, match=r"merge: the module is gated"):
        module.merge()


def test_state_dict_round_trip(generator):
    module, cov, layer, I, V = setup(10, 6, 2, generator, train_target=True)
    state = module.state_dict()
    assert {"concept_input", "concept_keys", "probe", "target"} <= set(state)
    other, *_ = setup(10, 6, 2, torch.Generator().manual_seed(7), train_target=True)
    other.load_state_dict(state)
    x = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    assert torch.equal(other(x), module(x))


def test_bad_inputs(generator):
    layer = linear(8, 5, generator)
    C_inv = input_covariance(embeddings(100, 8, generator)).inv
    concept = torch.randn(8, generator=generator, dtype=torch.float64)
    target = torch.randn(5, generator=generator, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"inv_cov has shape \(8, 7\).*expected .*\(in_features, in_features\) = "
                                         r"\(8, 8\)"):
        RankOneEditLinear(layer, C_inv[:, :7], concept, target)
    with pytest.raises(ValueError, match=r"concept_input has shape \(7,\).*expected .*\(in_features,\) = \(8,\)"):
        RankOneEditLinear(layer, C_inv, concept[:7], target)
    with pytest.raises(ValueError, match=r"target has shape \(4,\).*\(out_features,\) = \(5,\)"):
        RankOneEditLinear(layer, C_inv, concept, target[:4])
    with pytest.raises(ValueError, match=r"target has 1 rows; expected k = 2"):
        RankOneEditLinear(layer, C_inv, torch.stack([concept, -concept + 1]), target)
    with pytest.raises(ValueError, match=r"concept_input: the concepts' Gram matrix .* (not positive definite|"
                                         r"numerically singular)"):
        RankOneEditLinear(layer, C_inv, torch.stack([concept, 2 * concept]), torch.stack([target, target]))
    with pytest.raises(ValueError, match=r"gate_temperature must be > 0.*got 0.0"):
        RankOneEditLinear(layer, C_inv, concept, target, gate_temperature=0.0)
    with pytest.raises(ValueError, match=r"gate_bias must be finite"):
        RankOneEditLinear(layer, C_inv, concept, target, gate_bias=float("inf"))
    with pytest.raises(ValueError, match=r"inv_cov is not symmetric"):
        RankOneEditLinear(layer, C_inv + torch.triu(torch.ones(8, 8, dtype=torch.float64), 1), concept, target)
    with pytest.raises(TypeError, match=r"base_layer must be an nn.Linear"):
        RankOneEditLinear(torch.nn.Conv1d(8, 5, 1), C_inv, concept, target)
    nan_concept = concept.clone()
    nan_concept[0] = float("nan")
    with pytest.raises(ValueError, match=r"concept_input has non-finite"):
        RankOneEditLinear(layer, C_inv, nan_concept, target)
    module = RankOneEditLinear(layer, C_inv, concept, target)
    with pytest.raises(ValueError, match=r"x has shape \(3, 7\); expected \(..., in_features\) = \(..., 8\)"):
        module(torch.randn(3, 7, dtype=torch.float64))
    other = RankOneEditLinear(linear(8, 5, generator), C_inv, concept, target)
    with pytest.raises(ValueError, match=r"modules\[1\] wraps a different base layer"):
        RankOneEditLinear.combine(module, other)


def test_set_concepts_keeps_the_trained_target(generator):
    module, cov, layer, I, V = setup(12, 7, 2, generator, train_target=True, gated=False)
    with torch.no_grad():
        module.target.add_(0.5)  # "trained"
    target = module.target
    moved = I + 0.2 * torch.randn(2, 12, generator=generator, dtype=torch.float64)
    module.set_concepts(cov.inv, moved)
    assert module.target is target and torch.equal(module.concept_input, moved)
    assert (module(moved) - (target.detach() + layer.bias)).abs().max() <= 1e-11
    fresh = RankOneEditLinear(layer, cov.inv, moved, target.detach(), gated=False)
    for name in ("concept_keys", "probe"):
        assert torch.equal(getattr(module, name), getattr(fresh, name))
    with pytest.raises(ValueError, match=r"set_concepts: concept_input has 1 rows; expected k = 2"):
        module.set_concepts(cov.inv, moved[0])
    with pytest.raises(TypeError, match=r"combine: unexpected keyword arguments \['gate_bais'\]"):
        RankOneEditLinear.combine(module, gate_bais=0.5)
