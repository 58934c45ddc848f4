"""LoRA-GA (methods.lora_ga): the gradient estimate, the singular subspaces the adapter
starts in, the unchanged output, and the first step against full fine-tuning's."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import summation_bound
from lowrank_ops.methods import lora_ga
from lowrank_ops.nn import LoRALinear

EPS64 = 2.0**-53


def orthonormal(rows: int, cols: int, generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def known_gradient(out_f: int, in_f: int, r: int, generator):
    """``G = U diag(s) V^T`` with U, V random orthonormal [., min] and distinct singular
    values: the top 2r + 2 spaced by 1 (from 2r + 3 down to 2), the rest geometric from
    1e-2 down: the rank-2r sketch of 4r columns converges as (s_{4r+1} / s_{2r})^9 < 1e-20."""
    k = min(out_f, in_f)
    U, V = orthonormal(out_f, k, generator), orthonormal(in_f, k, generator)
    head = torch.arange(2 * r + 3, 1, -1, dtype=torch.float64)
    tail = 1e-2 * 0.5 ** torch.arange(k - head.numel(), dtype=torch.float64)
    s = torch.cat([head, tail])
    return (U * s) @ V.T, U, s, V


def projector(basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the column space of ``basis`` (full column rank)."""
    Q = torch.linalg.qr(basis.double())[0]
    return Q @ Q.T


def make_layer(out_f, in_f, r, weight_dtype=torch.float64, generator=None, **kwargs) -> LoRALinear:
    linear = torch.nn.Linear(in_f, out_f, dtype=weight_dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=generator) / math.sqrt(in_f))
        linear.bias.copy_(torch.randn(out_f, generator=generator))
    return LoRALinear(linear, r=r, lora_alpha=2.0 * r, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr"])
@pytest.mark.parametrize("r", [3, 5])
def test_factors_span_the_gradient_singular_subspaces(direction, r, dtype, generator):
    G, U, _, V = known_gradient(40, 56, r, generator)
    layer = make_layer(40, 56, r, dtype, generator=generator)
    lora_ga.lora_ga_init_(layer, G.to(dtype), direction=direction, generator=generator)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    first, second = slice(0, r), slice(r, 2 * r)
    rows_A, cols_B = (first, second) if direction == "ArB2r" else (second, first)
    # Sign-independent: projectors.  The singular subspaces of a backward-stable SVD of the
    # (converged, see known_gradient) sketch are within ~eps ||G|| / gap of the exact ones,
    # gap = 1, ||G|| = 2r + 3 <= 13; 10 eps ||G|| leaves room for the QR steps' constants
    # (measured: at most 0.5 eps ||G||; eps of the computation: float32 for a float32 layer,
    # whose gradient is rounded to float32 too, a perturbation of eps ||G|| as well).
    eps = EPS64 if dtype == torch.float64 else 2.0**-24
    tol = 10 * eps * (2 * r + 3)
    assert (projector(A.T) - projector(V[:, rows_A])).abs().max() <= tol
    assert (projector(B) - projector(U[:, cols_B])).abs().max() <= tol
    # "stable" scale: orthonormal rows / columns times c = out^(1/4) / sqrt(16).
    c = 40 ** 0.25 / 4.0
    eye = torch.eye(r, dtype=torch.float64)
    assert (A @ A.T - c * c * eye).abs().max() <= tol
    assert (B.T @ B - c * c * eye).abs().max() <= tol


def test_scale_modes(generator):
    r, out_f, in_f = 4, 32, 48
    G = known_gradient(out_f, in_f, r, generator)[0]
    eye = torch.eye(r, dtype=torch.float64)
    for mode, expected in (("unit", lambda layer: 1.0), ("gd", lambda layer: 1.0 / layer.scaling)):
        layer = make_layer(out_f, in_f, r, generator=generator)
        lora_ga.lora_ga_init_(layer, G, scale_mode=mode, generator=generator)
        A = layer.lora_A.detach()
        assert torch.allclose(A @ A.T, expected(layer) ** 2 * eye, rtol=0, atol=1e-12), mode
    # weight_s: c = mean_i sqrt(S_i(W0) / s) over the top r of W0's singular values (W0 with a
    # decaying spectrum, so rsvd's values are exact to rounding).
    layer = make_layer(out_f, in_f, r, generator=generator)
    W0 = known_gradient(out_f, in_f, r, generator)[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(W0)
    lora_ga.lora_ga_init_(layer, G, scale_mode="weight_s", generator=generator)
    S = torch.linalg.svdvals(W0)[:r]
    c = (S / layer.scaling).sqrt().mean()
    A = layer.lora_A.detach()
    assert torch.allclose(A @ A.T, c * c * eye, rtol=0, atol=1e-12 * c * c)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float64, None), (torch.float32, None),
                                                 (torch.bfloat16, None), (torch.bfloat16, torch.float32)])
def test_output_is_unchanged_to_the_rounding_of_the_residual(dtype, adapter_dtype, generator):
    r, out_f, in_f = 4, 32, 48
    layer = make_layer(out_f, in_f, r, dtype, generator, dtype=adapter_dtype)
    W0 = layer.base_layer.weight.detach().double().clone()
    G = known_gradient(out_f, in_f, r, generator)[0]
    lora_ga.lora_ga_init_(layer, G, generator=generator)
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    assert B.abs().max() > 0  # not the default init's zero B
    s = layer.scaling
    W1 = layer.base_layer.weight.detach().double()
    # W1 = round_w(fl32(W0 - s B A)) from the stored (rounded) A, B: r + 1 terms accumulated
    # in float32 (float64 for float64), one rounding into W's dtype; so W1 + s B A - W0 is
    # within that bound (helpers.summation_bound, Higham eq. 3.5).
    exact = W0 - s * B @ A
    bound = summation_bound(W0.abs() + s * B.abs() @ A.abs(), exact, r + 1, dtype)
    error = (W1 - exact).abs()
    assert (error <= bound).all(), f"residual write off by {error.max():.3e}"
    # Layer output in exact arithmetic on the stored values: x (W1 + s B A)^T against x W0^T.
    x = torch.randn(8, in_f, generator=generator, dtype=torch.float64)
    delta = x @ (W1 + s * B @ A - W0).T
    assert (delta.abs() <= x.abs() @ bound.T + 64 * EPS64 * x.abs() @ (W0.abs() + s * B.abs() @ A.abs()).T).all()
    # And the module itself (its own rounding of the output at most that of x W^T in dtype).
    xd = x.to(dtype)
    with torch.no_grad():
        before = torch.nn.functional.linear(xd, W0.to(dtype), layer.base_layer.bias).double()
        after = layer(xd).double()
    unit = {torch.float64: EPS64, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]
    scale_y = xd.double().abs() @ (W0.abs() + s * B.abs() @ A.abs()).T + layer.base_layer.bias.double().abs()
    assert ((after - before).abs() <= 4 * unit * scale_y + x.abs() @ bound.T).all()


@pytest.mark.parametrize("kind", ["use_dora", "use_gate"])
def test_output_is_unchanged_with_dora_or_a_gate(kind, generator):
    r, out_f, in_f = 3, 24, 40
    layer = make_layer(out_f, in_f, r, generator=generator, **{kind: True})
    if kind == "use_gate":
        with torch.no_grad():
            layer.lora_gate.copy_(torch.rand(r, generator=generator, dtype=torch.float64) + 0.5)
    x = torch.randn(6, in_f, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        lora_ga.lora_ga_init_(layer, known_gradient(out_f, in_f, r, generator)[0], generator=generator)
        after = layer(x)
    assert layer.lora_B.abs().max() > 0
    # float64 throughout: a few roundings of O(|x| |W|) sums (40 terms).
    assert torch.allclose(after, before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("init", [False, "pissa", "olora", "trained_dora"])
def test_output_is_unchanged_over_an_adapter_that_holds_a_function(init, generator):
    """The previous adapter (random B, PiSSA / OLoRA's principal part, a trained DoRA
    magnitude) was dropped: only the new s B A was subtracted from W0, and the output moved
    by 0.9-2.2 (the magnitude, reset to the row norms, by 0.67)."""
    r, out_f, in_f = 3, 24, 40
    dora = init == "trained_dora"
    layer = LoRALinear(torch.nn.Linear(in_f, out_f, dtype=torch.float64), r, 8.0, use_dora=dora,
                       init_lora_weights=True if dora else init, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if dora:
            layer.lora_B.copy_(torch.randn(out_f, r, generator=generator, dtype=torch.float64))
            layer.lora_magnitude_vector.mul_(1.5)
        x = torch.randn(6, in_f, generator=generator, dtype=torch.float64)
        before = layer(x)
        lora_ga.lora_ga_init_(layer, known_gradient(out_f, in_f, r, generator)[0], generator=generator)
        after = layer(x)
    assert torch.allclose(after, before, rtol=0, atol=1e-12)


def regression_gradient(generator):
    """A least-squares task on a float64 ``Linear(48, 32)``, 16 samples: G has rank <= 16 =
    the 4r columns of the rank-2r sketch at r = 4, so rsvd finds G's top 2r exactly."""
    in_f, out_f, n = 48, 32, 16
    linear = torch.nn.Linear(in_f, out_f, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=generator) / math.sqrt(in_f))
        linear.bias.zero_()
    X = torch.randn(n, in_f, generator=generator, dtype=torch.float64)
    Y = X @ torch.randn(in_f, out_f, generator=generator, dtype=torch.float64) / math.sqrt(in_f)

    def loss_fn(model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean()
    G = lora_ga.estimate_gradients(linear, loss_fn, [(X, Y)])[""]
    return linear, loss_fn, (X, Y), G


def adapter_step_direction(layer, loss_fn, batch):
    """``D = s (dL/dB A + B dL/dA)``: one SGD step of rate lr moves the effective weight by
    ``-lr D + lr^2 s dB dA``."""
    layer.zero_grad()
    loss_fn(layer, batch).backward()
    A, B, dA, dB = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_A.grad, layer.lora_B.grad
    return layer.scaling * (dB @ A + B @ dA), dA, dB


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_first_step_approximates_full_fine_tuning(generator):
    r = 4
    linear, loss_fn, batch, G = regression_gradient(generator)
    U, S, Vh = torch.linalg.svd(G)
    G2r = (U[:, :2 * r] * S[:2 * r]) @ Vh[:2 * r]
    ga = LoRALinear(torch.nn.Linear(48, 32, dtype=torch.float64), r=r, lora_alpha=8)
    ga.base_layer.load_state_dict(linear.state_dict())
    lora_ga.lora_ga_init_(ga, G, generator=generator)
    std = LoRALinear(torch.nn.Linear(48, 32, dtype=torch.float64), r=r, lora_alpha=8, generator=generator)
    std.base_layer.load_state_dict(linear.state_dict())

    D_ga, dA, dB = adapter_step_direction(ga, loss_fn, batch)
    D_std, _, _ = adapter_step_direction(std, loss_fn, batch)
    # LoRA-GA's step is s^2 c^2 G_2r exactly (module docstring), G_2r G's best rank-2r part.
    c = 32 ** 0.25 / 4.0
    factor = ga.scaling ** 2 * c * c
    assert (D_ga / factor - G2r).norm() <= 1e-10 * G2r.norm()
    cos_ga, cos_std = cosine(D_ga, G), cosine(D_std, G)
    # cos(G_2r, G) = ||G_2r|| / ||G||: the best any rank-2r step can do.
    assert cos_ga == pytest.approx(float(G2r.norm() / G.norm()), abs=1e-10)
    # Measured on generator seeds 0-4: cos_ga 0.953-0.972 (= ||G_8|| / ||G||), cos_std
    # 0.242-0.339 (the default's step is s^2 G A^T A: G on a random 4-dimensional row space).
    assert cos_ga > cos_std + 0.4, (cos_ga, cos_std)
    # The actual SGD step: the effective weight moves by -lr D + lr^2 s dB dA exactly.
    lr = 1e-2
    with torch.no_grad():
        before = ga.base_layer.weight + ga.scaling * ga.lora_B @ ga.lora_A
    torch.optim.SGD([ga.lora_A, ga.lora_B], lr=lr).step()
    with torch.no_grad():
        moved = ga.base_layer.weight + ga.scaling * ga.lora_B @ ga.lora_A - before
    assert torch.allclose(moved, -lr * D_ga + lr * lr * ga.scaling * dB @ dA, rtol=0, atol=1e-13)


def test_estimate_gradients_is_the_mean_of_per_batch_gradients(generator):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    batches = [(torch.randn(7, 12, generator=generator, dtype=torch.float64),
                torch.randn(7, 5, generator=generator, dtype=torch.float64)) for _ in range(3)]

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).sum()
    model[0].weight.requires_grad_(False)  # a frozen layer is still estimated, then stays frozen
    grads = lora_ga.estimate_gradients(model, loss_fn, batches)
    assert sorted(grads) == ["0", "2"]
    manual = {"0": 0, "2": 0}
    for batch in batches:
        weights = [model[0].weight.detach().requires_grad_(True), model[2].weight]
        out = torch.nn.functional.linear(batch[0], weights[0], model[0].bias)
        loss = ((model[2](torch.tanh(out)) - batch[1]) ** 2).sum()
        g0, g2 = torch.autograd.grad(loss, weights)
        manual["0"] = manual["0"] + g0 / 3
        manual["2"] = manual["2"] + g2 / 3
    for name in grads:  # float64 sums of 3 terms in another order: rounding only
        assert torch.allclose(grads[name], manual[name], rtol=1e-13, atol=1e-15), name
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())  # no .grad written
    # target_modules, and half weights accumulate in float32.
    only = lora_ga.estimate_gradients(model, loss_fn, batches, target_modules=["2"])
    assert list(only) == ["2"] and torch.equal(only["2"], grads["2"])
    half = model.to(torch.bfloat16)
    halves = lora_ga.estimate_gradients(
        half, lambda m, b: loss_fn(m, (b[0].bfloat16(), b[1].bfloat16())), batches)
    assert all(g.dtype == torch.float32 for g in halves.values())


def test_estimate_gradients_takes_one_string_pattern(generator):
    # target_modules="10" was matched character by character: layers "1" and "0".
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(12)])
    grads = lora_ga.estimate_gradients(model, lambda m, b: m(b).sum(), [torch.randn(3, 4, generator=generator)],
                                       target_modules="10")
    assert list(grads) == ["10"]


def test_init_is_reproducible_with_a_generator(generator):
    G = known_gradient(24, 32, 3, generator)[0] + 0.1 * torch.randn(24, 32, generator=generator, dtype=torch.float64)
    layers = []
    for _ in range(2):
        layer = make_layer(24, 32, 3, generator=torch.Generator().manual_seed(1))
        lora_ga.lora_ga_init_(layer, G, generator=torch.Generator().manual_seed(2))
        layers.append(layer)
    assert torch.equal(layers[0].lora_A, layers[1].lora_A) and torch.equal(layers[0].lora_B, layers[1].lora_B)
    assert torch.equal(layers[0].base_layer.weight, layers[1].base_layer.weight)


def test_bad_inputs_name_the_argument(generator):
    layer = make_layer(8, 16, 5, generator=generator)  # 2r = 10 > min(16, 8)
    G = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"r <= min\(in_features, out_features\) / 2 = 4; got r = 5"):
        lora_ga.lora_ga_init_(layer, G)
    layer = make_layer(8, 16, 2, generator=generator)
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"gradient must have the base weight's shape \(8, 16\); got \(16, 8\)"):
        lora_ga.lora_ga_init_(layer, G.T)
    bad = G.clone()
    bad[1, 2] = float("nan")
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="gradient holds 2 non-finite entries"):
        lora_ga.lora_ga_init_(layer, bad)
    with pytest.raises(TypeError, match="gradient must be a floating-point tensor"):
        lora_ga.lora_ga_init_(layer, G.long())
    with pytest.raises(ValueError, match="scale_mode must be one of"):
        lora_ga.lora_ga_init_(layer, G, scale_mode="weightS")
    with pytest.raises(ValueError, match="direction must be one of"):
        lora_ga.lora_ga_init_(layer, G, direction="random")
    with pytest.raises(ValueError, match="stable_gamma must be > 0"):
        lora_ga.lora_ga_init_(layer, G, stable_gamma=0.0)
    with pytest.raises(TypeError, match="layer must be a lowrank_ops.nn.LoRALinear"):
        lora_ga.lora_ga_init_(layer.base_layer, G)
    layer.active_rank = 1
    with pytest.raises(ValueError, match="active_rank = 1"):
        lora_ga.lora_ga_init_(layer, G)
    layer.active_rank = None
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        lora_ga.lora_ga_init_(layer, G)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, weight, rtol=0, atol=1e-15)  # nothing written before the errors
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="batches is empty"):
        lora_ga.estimate_gradients(model, lambda m, b: m(b).sum(), [])
    with pytest.raises(ValueError, match=r"one-element tensor; got \(2, 3\)"):
        lora_ga.estimate_gradients(model, lambda m, b: m(b), [torch.randn(2, 4)])
    assert model[0].weight.requires_grad  # restored after the error
    with pytest.raises(ValueError, match="no nn.Linear of the model matches"):
        lora_ga.estimate_gradients(model, lambda m, b: m(b).sum(), [torch.randn(2, 4)], target_modules=["q_proj"])
