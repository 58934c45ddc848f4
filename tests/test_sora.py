"""SoRA: the soft threshold against the float64 formula, SparseAdamW = torch's AdamW + the
threshold (bit for bit), its groups and state dict, pruning (same outputs within a rigorous
bound, r' = 0, DyLoRA's active_rank, merged layers), the lambda schedule, bad input."""
from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from lowrank_ops.methods import sora
from lowrank_ops.nn import LoRALinear

from helpers import FLOAT_DTYPES, assert_tensor_lr_follows_float_lr, assert_training_compiles, assert_within, randn, summation_bound


def soft_threshold_64(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of ``threshold * |.|``, written as the case split (not the
    sign * max form the library evaluates), in float64."""
    v = values.double()
    return torch.where(v > threshold, v - threshold, torch.where(v < -threshold, v + threshold, torch.zeros_like(v)))


def gated_layer(in_features, out_features, r, generator, device="cpu", dtype=torch.float32, **kwargs):
    """A gated LoRALinear with random base, A, B and gates (never zero unless set)."""
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(randn(out_features, in_features, generator=generator))
        base.bias.copy_(randn(out_features, generator=generator))
    layer = LoRALinear(base.to(device=device, dtype=dtype), r, 12.0, use_gate=True, generator=generator, **kwargs)
    with torch.no_grad():
        layer.lora_B.copy_(randn(out_features, r, generator=generator))
        layer.lora_gate.copy_(randn(r, generator=generator))
    return layer


class Heads(torch.nn.Module):
    """Layers applied to the same input, outputs concatenated: each output entry comes from
    one layer, so the per-layer error bound applies entry by entry."""

    def __init__(self, **layers):
        super().__init__()
        self.layers = torch.nn.ModuleDict(layers)

    def forward(self, x):
        return torch.cat([layer(x) for layer in self.layers.values()], dim=-1)


def make_heads(generator, device="cpu", dtype=torch.float32) -> Heads:
    return Heads(q=gated_layer(24, 16, 6, generator, device, dtype), v=gated_layer(24, 12, 5, generator, device, dtype),
                 k=gated_layer(24, 8, 4, generator, device, dtype), plain=torch.nn.Linear(24, 4).to(device, dtype))


def reference_and_bound(model: Heads, x: torch.Tensor):
    """The float64 output of the model's current values and a rigorous bound on the error
    of any float evaluation of it (see the comment in the body)."""
    outputs, bounds = [], []
    x64 = x.double()
    for layer in model.layers.values():
        base = layer.base_layer if isinstance(layer, LoRALinear) else layer
        W, b = base.weight.double(), base.bias.double()
        y, abs_sum, terms = x64 @ W.T + b, x64.abs() @ W.abs().T + b.abs(), x.shape[-1]
        if isinstance(layer, LoRALinear):
            k = layer.active_rank or layer.r
            A, B = layer.lora_A[:k].double(), layer.lora_B[:, :k].double()
            g = layer.lora_gate[:k].double() if layer.lora_gate is not None else torch.ones(k, dtype=torch.float64)
            y = y + layer.scaling * ((x64 @ A.T) * g.to(y.device)) @ B.T
            abs_sum = abs_sum + abs(layer.scaling) * ((x64.abs() @ A.abs().T) * g.abs().to(y.device)) @ B.abs().T
            terms += x.shape[-1] + k
        # Each entry is a sum of at most `terms` products (the base dot product, the shrink
        # over `in`, the expand over r) plus the bias, scale, gate and folded-gate roundings
        # (8 more): Higham's gamma_n bound on |fl - exact| <= gamma_n * sum |terms| holds for
        # any summation order, for the gated and the pruned layer alike (folding g into B is
        # one more rounding of each product term).  The values are the same rounded ones the
        # float64 reference uses, so this is not a tolerance tuned to pass.
        outputs.append(y)
        bounds.append(summation_bound(abs_sum, y, terms + 8, x.dtype))
    return torch.cat(outputs, -1), torch.cat(bounds, -1)


# ------------------------------------------------------------------ proximal step
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_proximal_step_is_the_float64_formula(device, dtype, generator):
    lr, sparse_lambda = 0.013, 17.0
    threshold = lr * sparse_lambda  # 0.221: not a float32 number, so rounding it first would show
    values = randn(300, generator=generator) * 0.5
    values[:6] = torch.tensor([threshold, -threshold, 0.0, -0.0, 2 * threshold, -0.5 * threshold])
    gate = values.to(device=device, dtype=dtype)
    before = gate.double().cpu().clone()  # float64 on the CPU: .double().cpu() would alias gate
    zeros = sora.proximal_step_(gate, lr, sparse_lambda)
    expected = soft_threshold_64(before, threshold).to(dtype)  # the exact value, rounded once
    assert torch.equal(gate.cpu(), expected)
    crossed = before.abs() <= threshold
    assert 0 < int(crossed.sum()) < gate.numel()  # both cases occur
    assert (gate.cpu()[crossed] == 0).all()
    kept = gate.cpu() != 0
    assert torch.equal(gate.cpu()[kept].sign(), before[kept].sign().to(dtype))
    assert zeros == int((expected == 0).sum())


def test_proximal_step_zero_threshold_is_identity_and_lists_mix_dtypes(device, generator):
    gates = [randn(n, dtype=dtype, device=device, generator=generator)
             for n, dtype in [(5, torch.float32), (3, torch.bfloat16), (7, torch.float32), (4, torch.float64)]]
    before = [g.clone() for g in gates]
    assert sora.proximal_step_(gates, 0.5, 0.0) == 0
    assert sora.proximal_step_(gates, 0.0, 3.0) == 0
    assert all(torch.equal(g, b) for g, b in zip(gates, before))
    zeros = sora.proximal_step_(iter(gates), 0.5, 1.0)  # any iterable; buckets by dtype
    for g, b in zip(gates, before):
        assert torch.equal(g.cpu(), soft_threshold_64(b.cpu(), 0.5).to(g.dtype))
    assert zeros == sum(int((g == 0).sum()) for g in gates) > 0


def test_proximal_step_bad_input():
    gate = torch.randn(4)
    for name, lr, sparse_lambda in [("lr", -1e-3, 1.0), ("lr", math.nan, 1.0), ("sparse_lambda", 1e-3, -0.5),
                                    ("sparse_lambda", 1e-3, math.inf), ("sparse_lambda", 1e-3, math.nan)]:
        with pytest.raises(ValueError, match=rf"proximal_step_: {name} must be >= 0 and finite"):
            sora.proximal_step_(gate, lr, sparse_lambda)
    with pytest.raises(ValueError, match=r"gates\[1\] has shape \(4, 3\) and dtype torch.float32; expected a SoRA"):
        sora.proximal_step_([gate, torch.randn(4, 3)], 1e-3, 1.0)
    with pytest.raises(ValueError, match=r"gates\[0\] has shape \(4,\) and dtype torch.int64"):
        sora.proximal_step_(torch.arange(4), 1e-3, 1.0)
    with pytest.raises(TypeError, match=r"gates\[0\] must be a tensor; got list"):
        sora.proximal_step_([[1.0, 2.0]], 1e-3, 1.0)
    with pytest.raises(TypeError, match="gates must be a tensor or an iterable of tensors; got float"):
        sora.proximal_step_(1.0, 1e-3, 1.0)
    with pytest.raises(ValueError, match=r"proximal_step_: lr must be >= 0 and finite; got tensor"):
        sora.proximal_step_(gate, torch.tensor(1e-3), 1.0)


# ------------------------------------------------------------------ gate parameters
def test_gate_parameters(generator):
    shared = gated_layer(8, 8, 3, generator)
    model = torch.nn.Sequential(gated_layer(8, 8, 2, generator), LoRALinear(torch.nn.Linear(8, 8), 4), shared,
                                torch.nn.Linear(8, 8), shared)
    assert [id(g) for g in sora.gate_parameters(model)] == [id(model[0].lora_gate), id(shared.lora_gate)]
    assert sora.gate_parameters(torch.nn.Linear(3, 3)) == []
    with pytest.raises(TypeError, match="gate_parameters: model must be a torch.nn.Module; got list"):
        sora.gate_parameters([shared])


# ------------------------------------------------------------------ SparseAdamW
def split_params(model):
    gates = sora.gate_parameters(model)
    ids = {id(g) for g in gates}
    return gates, [p for p in model.parameters() if p.requires_grad and id(p) not in ids]


def test_sparse_adamw_is_adamw_then_soft_threshold(device, generator):
    model_a = make_heads(generator, device)
    with torch.no_grad():
        for gate in sora.gate_parameters(model_a):
            gate.uniform_(-1.0, 1.0, generator=torch.Generator(device).manual_seed(gate.numel()))
    model_b = copy.deepcopy(model_a)
    x = randn(32, 24, device=device, generator=generator)
    target = randn(32, 40, device=device, generator=generator)
    sparse_lambda, decay = 2.0, lambda step: 0.9 ** step  # threshold 0.1 * lr factor > a step of Adam
    optimizers = {}
    for name, model in (("a", model_a), ("b", model_b)):
        gates, rest = split_params(model)
        if name == "a":
            gate_opt = sora.SparseAdamW(gates, lr=0.05, weight_decay=0.01, sparse_lambda=sparse_lambda)
        else:
            gate_opt = torch.optim.AdamW(gates, lr=0.05, eps=1e-6, weight_decay=0.01)
        optimizers[name] = (torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1), gate_opt,
                            torch.optim.lr_scheduler.LambdaLR(gate_opt, decay), gates)
    for _ in range(8):
        for name, model in (("a", model_a), ("b", model_b)):
            rest_opt, gate_opt, scheduler, gates = optimizers[name]
            loss = (model(x) - target).square().mean()
            loss.backward()
            rest_opt.step()
            if name == "a":
                assert gate_opt.step(lambda: (model(x) - target).square().mean()) is not None  # the closure's loss
            else:
                gate_opt.step()
                with torch.no_grad():
                    threshold = gate_opt.param_groups[0]["lr"] * sparse_lambda  # this step's lr
                    for gate in gates:
                        gate.copy_(soft_threshold_64(gate, threshold))
            scheduler.step()
            rest_opt.zero_grad()
            gate_opt.zero_grad()
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(p, q)
    zeros = sum(int((g == 0).sum()) for g in sora.gate_parameters(model_a))
    assert 0 < zeros < 15  # some ranks switched off, not all

    # Training's result prunes to a smaller model with the same outputs.
    report = sora.prune_gated_ranks(model_a)
    expected, bound = reference_and_bound(model_b, x)
    assert_within(model_a(x), expected, bound, "pruned after training")
    assert sum(before - after for before, after in report.ranks.values()) == zeros


def test_sparse_adamw_groups_defaults_and_bad_settings(generator):
    g1, g2, g3, g4 = (randn(n, generator=generator) for n in (6, 5, 4, 3))
    g1[:2] = torch.tensor([0.3, -2.0])  # one entry below the threshold 0.5, one above
    for g in (g1, g2, g3, g4):
        g.requires_grad_()
    optimizer = sora.SparseAdamW([{"params": [g1, g3], "sparse_lambda": 5.0}, {"params": [g2]}], lr=0.1,
                                 sparse_lambda=0.0)
    assert [group["sparse_lambda"] for group in optimizer.param_groups] == [5.0, 0.0]
    before = [g.detach().clone() for g in (g1, g2, g3)]
    g1.grad, g2.grad = torch.zeros_like(g1), torch.zeros_like(g2)  # Adam's update is then 0: the threshold alone
    optimizer.step()
    assert torch.equal(g1, soft_threshold_64(before[0], 0.5).float()) and g1[0] == 0 and g1[1] == -1.5
    assert torch.equal(g2, before[1])  # lambda = 0
    assert torch.equal(g3, before[2])  # no gradient: not stepped, as AdamW
    optimizer.add_param_group({"params": [g4]})
    assert optimizer.param_groups[-1]["sparse_lambda"] == 0.0
    bad_groups = [({"params": [randn(2).requires_grad_()], "sparse_lambda": -1.0}, "sparse_lambda must be >= 0"),
                  ({"params": [randn(2).requires_grad_()], "lr": torch.tensor([0.1, 0.2])}, "lr must be a number"),
                  ({"params": [randn(3, 2).requires_grad_()]}, r"params\[0\] has shape \(3, 2\)")]
    for group, message in bad_groups:
        with pytest.raises(ValueError, match=f"SparseAdamW: {message}"):
            optimizer.add_param_group(group)
        assert len(optimizer.param_groups) == 3  # the bad group was not kept
    with pytest.raises(ValueError, match=r"SparseAdamW: params\[0\] has shape \(6, 24\) and dtype torch.float32; "
                                        r"expected a SoRA gate"):
        sora.SparseAdamW(make_heads(generator).parameters(), sparse_lambda=1.0)
    with pytest.raises(ValueError, match="SparseAdamW: sparse_lambda must be >= 0 and finite; got nan"):
        sora.SparseAdamW([g1], sparse_lambda=math.nan)
    with pytest.raises(TypeError, match="sparse_lambda"):
        sora.SparseAdamW([g1])  # required
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # wraps AdamW.step in torch's hook runner
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    optimizer.step()
    assert calls == ["pre", "post"]  # once each: the threshold is a post-hook, not a step calling AdamW's
    optimizer.param_groups[0]["sparse_lambda"] = -2.0  # e.g. a bad schedule: caught at the next step
    with pytest.raises(ValueError, match="SparseAdamW: sparse_lambda must be >= 0 and finite; got -2.0"):
        optimizer.step()


def test_sparse_adamw_state_dict_round_trip(generator):
    model = make_heads(generator)
    for p in model.parameters():
        p.requires_grad_(False)
    gates = sora.gate_parameters(model)
    for gate in gates:
        gate.requires_grad_(True)
    x, target = randn(16, 24, generator=generator), randn(16, 40, generator=generator)

    def train(model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            (model(x) - target).square().mean().backward()
            optimizer.step()

    optimizer = sora.SparseAdamW([{"params": gates[:2]}, {"params": gates[2:], "sparse_lambda": 3.0}], lr=0.05,
                                 sparse_lambda=1.0, amsgrad=True)
    train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    twin = copy.deepcopy(model)
    twin_gates = sora.gate_parameters(twin)
    restored = sora.SparseAdamW([{"params": twin_gates[:2]}, {"params": twin_gates[2:]}], lr=0.5, sparse_lambda=9.0,
                                amsgrad=True)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    assert [g["sparse_lambda"] for g in restored.param_groups] == [1.0, 3.0]
    assert [g["lr"] for g in restored.param_groups] == [0.05, 0.05]
    train(model, optimizer, 2)
    train(twin, restored, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)

    # A copy (pickle drops an optimizer's hooks) still thresholds.
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    train(model, optimizer, 2)
    train(model_copy, optimizer_copy, 2)
    for p, q in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ pruning
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_prune_keeps_outputs_and_drops_zero_ranks(device, dtype, generator):
    model = make_heads(generator, device, dtype)
    q, k = model.layers["q"], model.layers["k"]
    with torch.no_grad():
        q.lora_gate[[1, 4]] = 0.0
        k.lora_gate.zero_()  # r' = 0
    untouched = LoRALinear(torch.nn.Linear(24, 4), 2).to(device, dtype)  # no gate: left alone
    model.layers["lora"] = untouched
    x = randn(10, 24, dtype=dtype, device=device, generator=generator)
    expected, bound = reference_and_bound(model, x)
    assert_within(model(x), expected, bound, "gated")
    old = {name: (layer.lora_A.detach().clone(), (layer.lora_B * layer.lora_gate).detach().clone(), layer.scaling)
           for name, layer in model.layers.items() if name in ("q", "v")}
    old_gates = {id(g) for g in sora.gate_parameters(model)}
    k_base = k.base_layer
    before = sum(p.numel() for p in model.parameters())
    rng_state = torch.get_rng_state()

    report = sora.prune_gated_ranks(model)

    assert torch.equal(torch.get_rng_state(), rng_state)  # building the layers drew nothing from torch's RNG
    assert report.ranks == {"layers.q": (6, 4), "layers.v": (5, 5), "layers.k": (4, 0)}
    removed = (6 - 4) * (24 + 16) + 6 + 5 + (4 - 0) * (24 + 8) + 4  # A and B columns, and every gate
    assert (report.parameters_before, report.parameters_after) == (before, before - removed)
    assert "total rank 15 -> 9 (1 replaced by their base layer)" in str(report)
    assert model.layers["k"] is k_base and not any(p.requires_grad for p in k_base.parameters())
    assert model.layers["lora"] is untouched
    for name, keep in (("q", [0, 2, 3, 5]), ("v", list(range(5)))):
        layer = model.layers[name]
        A, B_gated, scaling = old[name]
        assert isinstance(layer, LoRALinear) and layer.lora_gate is None and layer.r == len(keep)
        assert layer.scaling == scaling and layer.lora_alpha / layer.r == pytest.approx(scaling, rel=1e-15)
        assert torch.equal(layer.lora_A, A[keep]) and torch.equal(layer.lora_B, B_gated[:, keep])
    assert_within(model(x), expected, bound, "pruned")
    assert_within(model.layers["k"](x), expected[:, 28:36], bound[:, 28:36], "r' = 0")

    # The pruned ranks are gone: no gate, no parameter or gradient of the old size.
    assert sora.gate_parameters(model) == [] and not old_gates & {id(p) for p in model.parameters()}
    model(x).square().sum().backward()
    assert model.layers["q"].lora_A.grad.shape == (4, 24) and model.layers["q"].lora_B.grad.shape == (16, 4)
    assert sora.prune_gated_ranks(model).ranks == {}  # nothing left to prune


def test_prune_with_active_rank_considers_only_the_active_ranks(generator):
    layer = gated_layer(20, 10, 6, generator)
    with torch.no_grad():
        layer.lora_gate.copy_(torch.tensor([0.0, 0.7, -0.4, 0.9, 0.0, 1.1]))
    layer.active_rank = 3  # DyLoRA: ranks 3.. are not used by forward, whatever their gate
    model = Heads(layer=layer)
    x = randn(7, 20, generator=generator)
    expected, bound = reference_and_bound(model, x)
    report = sora.prune_gated_ranks(model)
    pruned = model.layers["layer"]
    assert report.ranks == {"layers.layer": (6, 2)} and pruned.r == 2 and pruned.active_rank is None
    assert torch.equal(pruned.lora_A, layer.lora_A[1:3])
    assert_within(model(x), expected, bound, "pruned at active_rank 3")


def test_pruned_layer_tol_rslora_and_the_original_left_alone(generator):
    layer = gated_layer(16, 12, 4, generator, use_rslora=True, lora_dropout=0.1)
    with torch.no_grad():
        layer.lora_gate.copy_(torch.tensor([0.05, -0.5, 0.01, 2.0]))
    layer.lora_A.requires_grad_(False)
    layer.eval()
    snapshot = {name: p.detach().clone() for name, p in layer.named_parameters()}
    pruned = sora.pruned_layer(layer, tol=0.06)
    assert pruned.r == 2 and pruned.use_rslora and pruned.lora_dropout == 0.1 and not pruned.training
    assert pruned.scaling == layer.scaling and pruned.lora_alpha / math.sqrt(2) == pytest.approx(layer.scaling)
    assert not pruned.lora_A.requires_grad and pruned.lora_B.requires_grad
    assert pruned.base_layer is layer.base_layer
    assert all(torch.equal(p, snapshot[name]) for name, p in layer.named_parameters())
    assert layer.lora_gate is not None and layer.r == 4


def test_prune_refuses_bad_input_before_changing_anything(generator):
    model = make_heads(generator)
    model.layers["v"].merge()
    with pytest.raises(RuntimeError, match="prune_gated_ranks: module 'layers.v' is merged into its base weight; "
                                           "unmerge\\(\\) first"):
        sora.prune_gated_ranks(model)
    assert model.layers["q"].lora_gate is not None  # checked all layers first
    model.layers["v"].unmerge()
    with torch.no_grad():
        model.layers["k"].lora_gate[1] = math.nan
    with pytest.raises(ValueError, match="the gate of module 'layers.k' holds 1 non-finite entries"):
        sora.prune_gated_ranks(model)
    with pytest.raises(ValueError, match="prune_gated_ranks: tol must be >= 0 and finite; got -0.1"):
        sora.prune_gated_ranks(model, tol=-0.1)
    with pytest.raises(TypeError, match="prune_gated_ranks: model must be a torch.nn.Module"):
        sora.prune_gated_ranks({"q": model.layers["q"]})
    with pytest.raises(ValueError, match=r"model is itself a gated LoRALinear.*use pruned_layer\(model, tol\)"):
        sora.prune_gated_ranks(model.layers["q"])
    with pytest.raises(ValueError, match="pruned_layer: layer has no gate"):
        sora.pruned_layer(LoRALinear(torch.nn.Linear(4, 4), 2))
    with pytest.raises(TypeError, match="pruned_layer: layer must be a LoRALinear; got Linear"):
        sora.pruned_layer(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="pruned_layer: tol must be >= 0 and finite; got nan"):
        sora.pruned_layer(model.layers["q"], tol=math.nan)


# ------------------------------------------------------------------ lambda schedule
def test_lambda_schedule_matches_the_official_spacings():
    np.testing.assert_allclose(sora.lambda_schedule(1e-3, 1.0, 5), np.linspace(1e-3, 1.0, 5), rtol=1e-15)
    np.testing.assert_allclose(sora.lambda_schedule(0.5, 3.0, 4, "log_linear"),
                               np.log(np.linspace(np.exp(0.5), np.exp(3.0), 4)), rtol=1e-14)
    values = sora.lambda_schedule(1e-4, 1e-1, 4, "exp_linear")
    np.testing.assert_allclose(values, np.exp(np.linspace(np.log(1e-4), np.log(1e-1), 4)), rtol=1e-14)
    assert values[0] == 1e-4 and values[-1] == 1e-1 and sora.lambda_schedule(2.0, 5.0, 1) == [2.0]
    with pytest.raises(ValueError, match="lambda_schedule: spacing must be one of"):
        sora.lambda_schedule(0.1, 1.0, 3, "cosine")
    with pytest.raises(ValueError, match="lambda_schedule: start must be > 0 and finite; got 0.0"):
        sora.lambda_schedule(0.0, 1.0, 3, "exp_linear")
    with pytest.raises(ValueError, match="lambda_schedule: num must be an int >= 1; got 0"):
        sora.lambda_schedule(0.1, 1.0, 0)
    # An np.int64 num (an np.arange loop) was refused ("num must be an int >= 1"); a bool stays refused.
    assert sora.lambda_schedule(1e-3, 1.0, np.int64(5)) == sora.lambda_schedule(1e-3, 1.0, 5)
    with pytest.raises(ValueError, match="lambda_schedule: num must be an int >= 1; got True"):
        sora.lambda_schedule(0.1, 1.0, True)
    # num=2**40 built a Python list value by value for hours; refused at once now.
    with pytest.raises(MemoryError, match=r"lambda_schedule: num = 1099511627776 values need .* GiB, more than"):
        sora.lambda_schedule(0.1, 1.0, 2**40)


def test_torch_compile_training_and_pruned_model():
    # SoRA's loop: AdamW on A and B, SparseAdamW's soft threshold on the gates (driving some
    # to exactly zero), the gated layers compiled whole; then the pruned model (gated layers
    # replaced by plain LoRALinear ones of fewer ranks) under the same compiled wrapper.
    def run(wrap):
        generator = torch.Generator().manual_seed(11)
        model = make_heads(generator)
        with torch.no_grad():  # drawn by torch's global generator in make_heads
            for p in model.layers["plain"].parameters():
                p.copy_(randn(*p.shape, generator=generator))
        x, y = randn(16, 24, generator=generator), randn(16, 40, generator=generator)
        gates = sora.gate_parameters(model)
        others = [p for p in model.parameters() if p.requires_grad and all(p is not g for g in gates)]
        optimizers = [torch.optim.AdamW(others, lr=0.01), sora.SparseAdamW(gates, lr=0.1, sparse_lambda=1.0)]
        forward, losses = wrap(model), []
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
        zeros = sum(int((g == 0).sum()) for g in gates)
        sora.prune_gated_ranks(model)
        pruned = forward(x)
        pruned.square().sum().backward()
        return {"losses": torch.stack(losses), "zero gates": torch.tensor(zeros), "pruned y": pruned.detach(),
                **{name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}}

    results = {}
    assert_training_compiles(lambda wrap: results.setdefault(wrap, run(wrap)))
    zeros = [int(r["zero gates"]) for r in results.values()]
    assert all(0 < z < 15 for z in zeros), zeros  # the threshold zeroed some gates, not all 15


def test_sparse_adamw_tensor_lr_follows_the_float_lr():
    """A tensor lr (AdamW takes one; LambdaLR fills it in place) was refused; the threshold
    uses its value at the step."""
    def build(lr):
        torch.manual_seed(0)
        gates = torch.nn.Parameter(torch.randn(6))
        weights = torch.nn.Parameter(torch.randn(6, 4))
        model = torch.nn.ParameterList([gates, weights])
        x = torch.randn(8, 4)
        optimizer = sora.SparseAdamW([gates], lr=lr, sparse_lambda=2.0)
        return model, optimizer, lambda: ((x @ weights.T) * gates).square().mean()

    assert_tensor_lr_follows_float_lr(build)
