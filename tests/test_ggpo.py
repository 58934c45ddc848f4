"""LoRA-GGPO (optim.GGPO): the noise scale against the formula in float64, the drawn
perturbation, bitwise restore, the closure step in toy training loops (deterministic, the
same as the step by hand), PEFT layers, bad settings."""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops.nn import LoRALinear
from lowrank_ops.optim import GGPO

from helpers import assert_training_compiles

EPS64 = 2.0**-52


def lora(in_f, out_f, r, generator, dtype=torch.float64, **kwargs) -> LoRALinear:
    base = torch.nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=generator) / math.sqrt(in_f))
        base.bias.copy_(torch.randn(out_f, generator=generator))
    # init_lora_weights=False: A and B both random, so every term of the formula is nonzero.
    return LoRALinear(base, r=r, lora_alpha=2.0 * r, init_lora_weights=False, generator=generator, **kwargs)


def backward_once(model, in_f, generator, dtype=torch.float64):
    x = torch.randn(16, in_f, generator=generator, dtype=dtype)
    model(x).square().sum().backward()


def expected_std(layer: LoRALinear, sigma, alpha, beta, rank=None) -> torch.Tensor:
    """``sigma sqrt((alpha ||G'_i||^2 + beta ||W'_i||^2) / n)`` with dense float64 W' and G'."""
    k = layer.r if rank is None else rank
    A, B = layer.lora_A.detach()[:k].double(), layer.lora_B.detach()[:, :k].double()
    dA, dB = layer.lora_A.grad[:k].double(), layer.lora_B.grad[:, :k].double()
    s = layer.scaling
    W_eff = layer.base_layer.weight.detach().double() + s * B @ A
    G_eff = s * (dB @ A + B @ dA)
    variance = alpha * G_eff.square().sum(1) + beta * W_eff.square().sum(1)
    return sigma * (variance / A.shape[1]).sqrt()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("active_rank", [None, 2])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (30.0, 0.5), (0.0, 1.0), (2.0, 0.0)])
def test_noise_std_follows_the_formula(alpha, beta, active_rank, dtype, generator):
    layer = lora(24, 10, 4, generator, dtype)
    layer.active_rank = active_rank
    backward_once(layer, 24, generator, dtype)
    opt = GGPO(layer, torch.optim.SGD(layer.parameters(), lr=0.1), sigma=0.07, alpha=alpha, beta=beta)
    std = opt.noise_std(0)
    expected = expected_std(layer, 0.07, alpha, beta, active_rank)
    assert std.shape == (10,) and std.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Gram-based squared norms: cancellation-free sums of <= 2r(in + 2r) products in the
    # compute dtype, relative error ~ (terms) u; the square root halves it.
    unit = EPS64 if dtype == torch.float64 else 2.0**-24
    assert ((std.double() - expected).abs() <= 200 * unit * expected).all()
    for bad in (1, -1, 0.0):  # -1 returned the last adapter's, silently
        with pytest.raises(IndexError, match=rf"GGPO.noise_std: adapter_index must be an int in \[0, 1\) .*got {bad}"):
            opt.noise_std(bad)


@pytest.mark.parametrize("scale", [1e-30, 1e20])
def test_noise_std_at_extreme_float32_scales(scale, generator):
    """The squares (fourth powers in the gradient term) were formed in float32: weights or
    gradients of 1e20 gave inf / NaN noise scales (written into W by perturb), 1e-30 a
    zero noise.  They are formed in float64 now: the float32 result within a few units."""
    layer = lora(24, 10, 4, generator, torch.float32)
    with torch.no_grad():  # W' = W + s B A and G' = s (dB A + B dA) of the given scale
        for p in (layer.base_layer.weight, layer.lora_B):
            p.mul_(scale)
    layer.lora_A.grad = torch.randn(layer.lora_A.shape, generator=generator)
    layer.lora_B.grad = torch.randn(layer.lora_B.shape, generator=generator) * scale
    opt = GGPO(layer, torch.optim.SGD(layer.parameters(), lr=0.1), sigma=0.07, alpha=1.0, beta=1.0)
    std = opt.noise_std(0)
    expected = expected_std(layer, 0.07, 1.0, 1.0)
    assert std.dtype == torch.float32 and torch.isfinite(std).all() and (std > 0).all()
    assert ((std.double() - expected).abs() <= 200 * 2.0**-24 * expected).all()

def test_perturbation_draws_the_formula_and_restore_is_bitwise(device, generator):
    in_f, out_f = 3000, 6
    layer = lora(in_f, out_f, 3, generator).to(device)
    layer(torch.randn(16, in_f, generator=generator, dtype=torch.float64).to(device)).square().sum().backward()
    seed = torch.Generator(device=device).manual_seed(5)
    opt = GGPO(layer, torch.optim.SGD(layer.parameters(), lr=0.1), sigma=0.1, alpha=50.0, beta=1.0, generator=seed)
    weight = layer.base_layer.weight
    before, A, B = weight.detach().clone(), layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    original_pointer = weight.data_ptr()
    std = opt.noise_std(0)
    z = torch.empty(out_f, in_f, dtype=torch.float64, device=device).normal_(
        generator=torch.Generator(device=device).manual_seed(5))
    opt.perturb()
    assert opt.perturbed
    delta = weight.detach() - before
    # (z std + W) - W: two roundings of magnitude |W| + |z std|.
    assert ((delta - z * std[:, None]).abs() <= 2 * EPS64 * (before.abs() + (z * std[:, None]).abs())).all()
    # The per-row empirical standard deviation over 3000 draws: within 4 / sqrt(2 n) ~ 5 %.
    empirical = delta.std(dim=1)
    assert ((empirical.cpu() / expected_std(layer, 0.1, 50.0, 1.0).cpu() - 1).abs() <= 4 / math.sqrt(2 * in_f)).all()
    opt.restore()
    assert not opt.perturbed
    assert torch.equal(weight.detach(), before) and weight.data_ptr() == original_pointer
    assert torch.equal(layer.lora_A.detach(), A) and torch.equal(layer.lora_B.detach(), B)


class TwoLayer(torch.nn.Module):
    def __init__(self, generator):
        super().__init__()
        self.first = lora(8, 16, 4, generator, torch.float32)
        self.second = lora(16, 3, 2, generator, torch.float32)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def train(source: str, steps: int = 25, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    model = TwoLayer(generator)
    x = torch.randn(64, 8, generator=generator)
    y = torch.randn(64, 3, generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = GGPO(model, torch.optim.Adam(params, lr=2e-2), sigma=0.05, alpha=1.0, beta=1.0, gradient_source=source,
               generator=torch.Generator().manual_seed(seed + 1))
    calls = []

    def closure():
        calls.append(1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    return model, opt, losses, len(calls)


@pytest.mark.parametrize("source, passes", [("current", 2), ("previous", 1)])
def test_closure_step_trains_and_is_deterministic(source, passes):
    model, opt, losses, calls = train(source)
    assert calls == passes * 25
    assert losses[-1] < 0.7 * losses[0], losses
    again, _, losses_again, _ = train(source)
    assert losses == losses_again
    for p, q in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    assert not opt.perturbed


def test_resumed_run_draws_the_same_noise():
    """The noise generator's state travels in state_dict: a run checkpointed after 10
    steps and resumed by a GGPO built with a differently seeded generator ends bitwise
    equal to the uninterrupted run."""
    import copy
    import io

    model, opt, _, _ = train("current", steps=10)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = copy.deepcopy(model)
    clone.load_state_dict(saved["model"])
    params = [p for p in clone.parameters() if p.requires_grad]
    resumed = GGPO(clone, torch.optim.Adam(params, lr=2e-2), sigma=0.05, alpha=1.0, beta=1.0,
                   gradient_source="current", generator=torch.Generator().manual_seed(99))
    resumed.load_state_dict(saved["opt"])
    data = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 8, generator=data), torch.randn(64, 3, generator=data)
    for net, optimizer in ((model, opt), (clone, resumed)):
        for _ in range(5):
            optimizer.step(lambda: torch.nn.functional.mse_loss(net(x), y).backward())
    for p, q in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_with_its_model_follows_the_copy(how):
    """deepcopy({"m": model, "o": ggpo}) left the copy's adapters reading the original
    model's factors (closures over the module) and pickle refused the local closure: the
    copy now trains its own model exactly as the original trains its own."""
    import copy
    import pickle

    model, opt, _, _ = train("previous", steps=3)
    pair = {"m": model, "o": opt}
    copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    clone, twin = copied["m"], copied["o"]
    for adapter, layer in zip(twin._adapters, (clone.first, clone.second)):
        assert adapter.module is layer and adapter.weight is layer.base_layer.weight
        assert adapter.factors()[0] is layer.lora_A
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 8, generator=data), torch.randn(64, 3, generator=data)
    for _ in range(3):
        twin.step(lambda: torch.nn.functional.mse_loss(clone(x), y).backward())
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key]), key
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y).backward())
    for p, q in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(p, q)


def test_closure_step_equals_the_step_by_hand(generator):
    """step(closure) = backward at W, perturb with those gradients, backward at W + eps,
    restore, base step: the same bits as the sequence written out."""
    def build():
        g = torch.Generator().manual_seed(11)
        model = TwoLayer(g)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, GGPO(model, torch.optim.SGD(params, lr=0.1), sigma=0.2, alpha=5.0, beta=1.0,
                           generator=torch.Generator().manual_seed(3))

    x = torch.randn(32, 8, generator=generator)
    auto, opt_auto = build()
    opt_auto.step(lambda: auto(x).square().mean().backward())
    manual, opt_manual = build()
    manual(x).square().mean().backward()
    opt_manual.perturb()
    perturbed_weight = manual.first.base_layer.weight.detach().clone()
    opt_manual.zero_grad()
    manual(x).square().mean().backward()
    opt_manual.restore()
    opt_manual.base_optimizer.step()
    assert not torch.equal(perturbed_weight, manual.first.base_layer.weight)
    for p, q in zip(auto.state_dict().values(), manual.state_dict().values()):
        assert torch.equal(p, q)


def test_previous_mode_scales_with_kept_gradient_norms(generator):
    """"previous": the first perturbation has the weight term alone; the next one uses the
    gradient norms kept from the gradients at the perturbed point.  (lr = 0 keeps A and B
    fixed, so the formula can be evaluated after the step.)"""
    layer = lora(10, 7, 3, generator)
    opt = GGPO(layer, torch.optim.SGD(layer.parameters(), lr=0.0), sigma=0.1, alpha=4.0, beta=1.0,
               gradient_source="previous", generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, 10, generator=generator, dtype=torch.float64)
    backward_once(layer, 10, generator)  # gradients present but not kept: must be ignored
    assert ((opt.noise_std(0) - expected_std(layer, 0.1, 0.0, 1.0)).abs() <= 1e-14).all()
    seen = []

    def closure():
        seen.append(layer.base_layer.weight.detach().clone())
        layer(x).square().sum().backward()

    opt.step(closure)
    assert len(seen) == 1 and not torch.equal(seen[0], layer.base_layer.weight)  # one pass, at W + eps
    # .grad now holds the gradients at the perturbed point; the kept norms are theirs.
    assert ((opt.noise_std(0) - expected_std(layer, 0.1, 4.0, 1.0)).abs() <= 1e-14).all()
    state = opt.state_dict()
    fresh = GGPO(layer, torch.optim.SGD(layer.parameters(), lr=0.0), sigma=0.1, alpha=4.0, beta=1.0,
                 gradient_source="previous")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.noise_std(0), opt.noise_std(0))


def test_one_buffer_per_adapter_is_reused():
    model, opt, _, _ = train("current", steps=1)
    pointers = {a.name: {a.buffer.data_ptr(), a.weight.data_ptr()} for a in opt._adapters}
    x = torch.randn(4, 8)
    for _ in range(3):
        opt.step(lambda: model(x).sum().backward())
        for a in opt._adapters:
            assert {a.buffer.data_ptr(), a.weight.data_ptr()} == pointers[a.name]


def test_peft_lora_layers(generator):
    peft = pytest.importorskip("peft")
    base = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5)).double()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model(torch.randn(8, 12, generator=generator, dtype=torch.float64)).square().sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = GGPO(model, torch.optim.SGD(params, lr=0.1), sigma=0.1, alpha=3.0, beta=1.0,
               generator=torch.Generator().manual_seed(0))
    assert [a.name.rsplit(".", 1)[-1] for a in opt._adapters] == ["0", "2"]
    layer = model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    W_eff = layer.base_layer.weight.detach() + s * B.detach() @ A.detach()
    G_eff = s * (B.grad @ A.detach() + B.detach() @ A.grad)
    expected = 0.1 * ((3.0 * G_eff.square().sum(1) + W_eff.square().sum(1)) / 12).sqrt()
    assert ((opt.noise_std(0) - expected).abs() <= 200 * EPS64 * expected).all()
    before = layer.base_layer.weight.detach().clone()
    opt.perturb()
    assert not torch.equal(layer.base_layer.weight, before)
    opt.restore()
    assert torch.equal(layer.base_layer.weight, before)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma": 0.0}, r"sigma must be > 0 and finite; got 0.0"),
    ({"sigma": -0.1}, r"sigma must be > 0"),
    ({"sigma": float("nan")}, r"sigma must be > 0"),
    ({"alpha": -1.0}, r"alpha must be >= 0"),
    ({"beta": float("inf")}, r"beta must be >= 0"),
    ({"alpha": 0.0, "beta": 0.0}, r"alpha \+ beta must be > 0"),
    ({"gradient_source": "next"}, r"gradient_source must be one of \('current', 'previous'\); got 'next'"),
])
def test_bad_hyperparameters(kwargs, match, generator):
    layer = lora(6, 4, 2, generator)
    with pytest.raises(ValueError, match=match):
        GGPO(layer, torch.optim.SGD(layer.parameters(), lr=0.1), **kwargs)


def test_bad_usage(generator):
    layer = lora(6, 4, 2, generator)
    sgd = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"base_optimizer must be a torch.optim.Optimizer; got list"):
        GGPO(layer, [sgd])
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None; got int"):
        GGPO(layer, sgd, generator=3)
    with pytest.raises(ValueError, match=r"model has no LoRA adapters"):
        GGPO(torch.nn.Linear(3, 3), sgd)
    with pytest.raises(ValueError, match=r"use_dora=True.*expected a plain LoRA adapter"):
        GGPO(lora(6, 4, 2, generator, use_dora=True), sgd)
    opt = GGPO(layer, sgd)
    with pytest.raises(RuntimeError, match=r"not perturbed; call perturb\(\) first"):
        opt.restore()
    opt.perturb()
    with pytest.raises(RuntimeError, match=r"already perturbed; call restore\(\) first"):
        opt.perturb()
    opt.restore()
    with pytest.raises(TypeError, match=r"closure must be a callable"):
        opt.step(None)
    layer.merge()
    with pytest.raises(RuntimeError, match=r"is merged; expected an unmerged adapter"):
        opt.perturb()


@pytest.mark.parametrize("source", ["current", "previous"])
def test_torch_compile_training(source):
    # GGPO's closure steps through a compiled model: the noise is written into the base
    # weights in place and taken out again (restore), which the compiled graphs must see
    # (the weights are their inputs, not constants): the same losses and adapters as eager.
    def run(wrap):
        generator = torch.Generator().manual_seed(14)
        model = TwoLayer(generator)
        x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 3, generator=generator)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = GGPO(model, torch.optim.Adam(params, lr=2e-2), sigma=0.05, alpha=1.0, beta=1.0,
                   gradient_source=source, generator=torch.Generator().manual_seed(15))
        forward = wrap(model)

        def closure():
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            return loss

        losses = torch.stack([opt.step(closure).detach() for _ in range(4)])
        return {"losses": losses, **{name: p.detach().clone() for name, p in model.named_parameters()}}

    assert_training_compiles(run)
