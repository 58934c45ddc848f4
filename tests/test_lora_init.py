"""LoRALinear's ``init_lora_weights`` (nn/_init.py): PEFT's default, gaussian and random
inits, and the weight-splitting PiSSA (exact and randomized SVD) and OLoRA (QR)."""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_ops.nn import LoRALinear

from helpers import assert_meta_build_loads

EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def spectral_linear(out_features, in_features, spectrum, generator, dtype=torch.float32) -> torch.nn.Linear:
    """An nn.Linear whose weight has the singular values ``spectrum`` (random singular vectors)."""
    k = len(spectrum)
    left, _ = torch.linalg.qr(torch.randn(out_features, k, dtype=torch.float64, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(in_features, k, dtype=torch.float64, generator=generator))
    weight = (left * torch.tensor(spectrum, dtype=torch.float64)) @ right.T
    layer = torch.nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.randn(out_features, generator=generator))
    return layer


def decaying(n: int) -> list:
    """Singular values 1, 0.8, 0.64, ...: distinct, with relative gaps of 20 %."""
    return [0.8**i for i in range(n)]


def best_rank(weight: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def adapter_product(layer: LoRALinear) -> torch.Tensor:
    return layer.scaling * layer.lora_B.double() @ layer.lora_A.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_6"])
def test_pissa_adapter_is_the_best_rank_r_part(dtype, init, generator):
    base = spectral_linear(48, 64, decaying(40), generator, dtype)
    original = base.weight.detach().double().clone()
    layer = LoRALinear(base, 8, 16, init_lora_weights=init, generator=generator)
    best = best_rank(original, 8)
    # Singular subspaces of a backward-stable SVD are within eps ||W|| / gap of the exact
    # ones; the gap here is 0.2 s_8 = 0.04 ||W||, and the randomized SVD (6 iterations,
    # oversampling 10) converges as (s_19 / s_8)^13 ~ 1e-16.  So 200 eps ||W|| bounds both.
    scale = original.norm(2).item()
    assert (adapter_product(layer) - best).abs().max() <= 200 * EPS[dtype] * scale
    # The base keeps the residual, rounded once: base + s B A gives back the weight.
    rebuilt = base.weight.double() + adapter_product(layer)
    assert (rebuilt - original).abs().max() <= 4 * EPS[dtype] * scale
    assert base.weight.requires_grad is False and layer.lora_A.requires_grad


def test_pissa_factors_split_singular_values_evenly(generator):
    layer = LoRALinear(spectral_linear(30, 20, decaying(20), generator), 4, 8, init_lora_weights="pissa")
    # A = sqrt(S / s) Vh and B = U sqrt(S / s): the rows of A and the columns of B have the same norms.
    torch.testing.assert_close(layer.lora_A.norm(dim=1), layer.lora_B.norm(dim=0), rtol=1e-5, atol=0)
    expected = torch.tensor(decaying(4)).div(layer.scaling).sqrt()
    torch.testing.assert_close(layer.lora_A.norm(dim=1), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_split_keeps_the_layer_function(device, init, use_dora, generator):
    base = spectral_linear(24, 40, decaying(24), generator).to(device)
    x = torch.randn(7, 40, generator=generator).to(device)
    expected = base(x).detach().double()
    # A CPU generator for a layer on any device, as for the default init.
    layer = LoRALinear(base, 6, 12, init_lora_weights=init, use_dora=use_dora, generator=generator)
    # float32 layer: one rounding of the residual plus the forward's own float32 sums.
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)


def test_olora_is_the_leading_qr_block(generator):
    base = spectral_linear(32, 48, decaying(32), generator)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, 5, 10, init_lora_weights="olora")
    Q, R = torch.linalg.qr(original)
    torch.testing.assert_close(layer.lora_B, Q[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_A, R[:5], rtol=0, atol=0)
    torch.testing.assert_close(base.weight + layer.scaling * layer.lora_B @ layer.lora_A, original, rtol=0, atol=1e-6)


def test_zero_b_and_random_inits(generator):
    fan_in = 256
    default = LoRALinear(torch.nn.Linear(fan_in, 64), 16, generator=generator)
    assert torch.count_nonzero(default.lora_B) == 0 and default.lora_A.abs().max() <= 1 / math.sqrt(fan_in)
    gaussian = LoRALinear(torch.nn.Linear(fan_in, 64), 16, init_lora_weights="gaussian", generator=generator)
    assert torch.count_nonzero(gaussian.lora_B) == 0
    # 4096 draws of N(0, (1/16)^2): the sample std is within 5 % of 1/16 with overwhelming probability.
    assert gaussian.lora_A.std().item() == pytest.approx(1 / 16, rel=0.05)
    random = LoRALinear(torch.nn.Linear(fan_in, 64), 16, init_lora_weights=False, generator=generator)
    assert torch.count_nonzero(random.lora_B) == random.lora_B.numel()
    assert random.lora_B.abs().max() <= 1 / math.sqrt(16)
    for layer in (default, gaussian, random):
        assert layer.base_layer.weight.requires_grad is False


def test_inits_are_reproducible_with_a_generator():
    for init in (True, False, "gaussian", "pissa_niter_3"):
        layers = []
        for _ in range(2):
            base = spectral_linear(20, 30, decaying(20), torch.Generator().manual_seed(0))
            layers.append(LoRALinear(base, 4, init_lora_weights=init, generator=torch.Generator().manual_seed(7)))
        assert torch.equal(layers[0].lora_A, layers[1].lora_A) and torch.equal(layers[0].lora_B, layers[1].lora_B)


def test_reset_re_splits_the_current_weight_and_keeps_the_function(generator):
    base = spectral_linear(24, 32, decaying(24), generator)
    layer = LoRALinear(base, 4, 8, init_lora_weights="pissa", use_gate=True, generator=generator)
    with torch.no_grad():  # as after some training steps
        layer.lora_B.add_(0.05 * torch.randn(layer.lora_B.shape, generator=generator))
        layer.lora_gate.mul_(0.5)
    x = torch.randn(5, 32, generator=generator)
    before = layer(x).detach()
    layer.reset_parameters()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)
    assert torch.equal(layer.lora_gate, torch.ones(4))
    effective = base.weight.double() + adapter_product(layer)
    torch.testing.assert_close(adapter_product(layer), best_rank(effective, 4), rtol=0, atol=1e-5)


def test_reset_while_merged_raises(generator):
    layer = LoRALinear(torch.nn.Linear(8, 8), 2, generator=generator)
    layer.merge()
    with pytest.raises(RuntimeError, match=r"merged into the base weight; unmerge\(\) first"):
        layer.reset_parameters()


def test_bad_init_arguments():
    with pytest.raises(ValueError, match=r"init_lora_weights must be True, False, 'gaussian', .* got 'pisa'"):
        LoRALinear(torch.nn.Linear(8, 8), 2, init_lora_weights="pisa")
    with pytest.raises(ValueError, match=r"got 'pissa_niter_x'"):
        LoRALinear(torch.nn.Linear(8, 8), 2, init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' needs r <= min\(in_features, out_features\) = 6; "
                                         r"got r = 7"):
        LoRALinear(torch.nn.Linear(8, 6), 7, init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"'olora' needs r <= min"):
        LoRALinear(torch.nn.Linear(4, 9), 5, init_lora_weights="olora")
    with pytest.raises(ValueError, match=r"needs scaling > 0 .* got lora_alpha = -2"):
        LoRALinear(torch.nn.Linear(8, 8), 2, -2, init_lora_weights="pissa_niter_2")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_non_finite_weight_is_refused_before_any_change(init):
    base = torch.nn.Linear(8, 8)
    with torch.no_grad():
        base.weight[3, 5] = float("inf")
    before = base.weight.detach().clone()
    with pytest.raises(ValueError, match=r"LoRALinear: init_lora_weights='\w+' splits the layer's weight, which "
                                         r"holds 1 non-finite entries"):
        LoRALinear(base, 2, init_lora_weights=init)
    assert torch.equal(base.weight, before)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_matches_peft(init, generator):
    """PEFT's own init on a copy of the same model: the same adapter product and residual
    (exact SVD and QR: the same LAPACK calls), and for the randomized SVD an approximation
    at least as good as PEFT's ``torch.svd_lowrank`` one (which does not oversample)."""
    peft = pytest.importorskip("peft")
    base = spectral_linear(48, 64, decaying(48), generator)
    theirs = torch.nn.Sequential(spectral_linear(48, 64, decaying(48), torch.Generator()))
    with torch.no_grad():
        theirs[0].load_state_dict(base.state_dict())
    original = base.weight.detach().double().clone()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=init)
    model = peft.get_peft_model(theirs, config)
    peft_layer = model.base_model.model[0]
    peft_product = peft_layer.scaling["default"] * (
        peft_layer.lora_B["default"].weight.double() @ peft_layer.lora_A["default"].weight.double())
    layer = LoRALinear(base, 8, 16, init_lora_weights=init, generator=generator)
    if init == "pissa_niter_4":
        best = (original - best_rank(original, 8)).norm()
        ours, peft_error = (original - adapter_product(layer)).norm(), (original - peft_product).norm()
        assert ours <= peft_error * (1 + 1e-6) and ours <= best * 1.01, (ours.item(), peft_error.item(), best.item())
    else:
        torch.testing.assert_close(adapter_product(layer), peft_product, rtol=0, atol=1e-5)
        torch.testing.assert_close(base.weight, peft_layer.base_layer.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_half_weights_error_at_most_peft(init, generator):
    """bfloat16 base: the residual is rounded to bfloat16 once; our layer reproduces the
    original outputs at least as closely as PEFT's layer with the same init (x 1.25)."""
    peft = pytest.importorskip("peft")
    base = spectral_linear(64, 96, decaying(64), generator, torch.bfloat16)
    x = torch.randn(16, 96, generator=generator).to(torch.bfloat16)
    expected = (x.double() @ base.weight.double().T + base.bias.double())
    copy = torch.nn.Sequential(torch.nn.Linear(96, 64, dtype=torch.bfloat16))
    copy[0].load_state_dict(base.state_dict())
    model = peft.get_peft_model(copy, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=init))
    with torch.no_grad():
        peft_error = (model(x).double() - expected).abs().max()
        ours = LoRALinear(base, 8, 16, init_lora_weights=init)
        our_error = (ours(x).double() - expected).abs().max()
    assert our_error <= 1.25 * peft_error, (our_error.item(), peft_error.item())


@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_split_built_on_meta_then_loaded_or_reset(kind):
    """Built on meta, PiSSA's constructor raised ("Tensor.item() cannot be called on meta
    tensors": the finiteness check before the SVD).  Now the split waits: loaded after
    to_empty() (or assigned) the layer is the saved one, and reset_parameters() after
    to_empty() splits the base weight alone (not the adapter's uninitialized factors),
    as the constructor does."""
    torch.manual_seed(0)
    saved = LoRALinear(torch.nn.Linear(16, 12), 4, init_lora_weights=kind)
    with torch.no_grad():
        saved.lora_B.add_(0.1)
    x = torch.randn(5, 16)
    assert_meta_build_loads(lambda: LoRALinear(torch.nn.Linear(16, 12), 4, init_lora_weights=kind), saved, x)
    base = torch.nn.Linear(16, 12)
    with torch.device("meta"):
        layer = LoRALinear(torch.nn.Linear(16, 12), 4, init_lora_weights=kind)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.base_layer.load_state_dict(base.state_dict())
        layer.lora_A.fill_(float("nan"))  # uninitialized memory: never read
    layer.reset_parameters()
    built = LoRALinear(base, 4, init_lora_weights=kind)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(layer, name), getattr(built, name), rtol=0, atol=0)
    assert torch.equal(layer.base_layer.weight, built.base_layer.weight)
