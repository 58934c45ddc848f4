"""IncreLoRA: the importance averages against a float64 recurrence, the allocation (top
scores, the budget, the schedule), new ranks leave the output unchanged, the optimizer
state of new slots, determinism, state_dict round trips, a toy fine-tuning run, bad input.

Devices: the reference, allocation, determinism, state-dict and training tests take the
``device`` fixture (cpu, and cuda where usable: ``pytest -m cuda``).  Their models and data
are drawn on the CPU from fixed seeds and moved, so both devices see the same numbers; the
float64 references run on the CPU.  The allocator's own generator is a CPU one: it draws
new rows on the CPU for adapters on any device."""
from __future__ import annotations

import io
import math

import pytest
import torch

from lowrank_ops.methods.increlora import IncreLoRAAllocator
from lowrank_ops.nn import LoRALinear

from helpers import OUTPUT_UNIT, assert_training_compiles, assert_within, randn, summation_bound


def adapter(in_features, out_features, r_max, generator, dtype=torch.float32):
    """A LoRALinear with random base weight, bias and A, and B nonzero in its first slot
    (so the adapter counts from the start; the later slots zero, as IncreLoRA requires)."""
    base = torch.nn.Linear(in_features, out_features, dtype=dtype)
    layer = LoRALinear(base, r_max, 4.0, generator=generator)
    with torch.no_grad():
        base.weight.copy_(randn(out_features, in_features, generator=generator))
        base.bias.copy_(randn(out_features, generator=generator))
        layer.lora_B[:, 0] = randn(out_features, generator=generator)
    return layer


class Stack(torch.nn.Module):
    """Adapters applied in turn with a tanh between them (the gradients of each depend on the others)."""

    def __init__(self, generator, widths=(10, 12, 9, 11, 8), r_max=6, dtype=torch.float32):
        super().__init__()
        self.layers = torch.nn.ModuleList(adapter(a, b, r_max, generator, dtype) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def backward(model, generator, n=16, dtype=torch.float32, device="cpu"):
    x = randn(n, model.layers[0].in_features, generator=generator, dtype=dtype, device=device)
    model.zero_grad()
    model(x).square().mean().backward()


def reference_output(layer: LoRALinear, x: torch.Tensor, k: int):
    """float64 output of the first k ranks and the rigorous rounding bound of a float
    evaluation (on the CPU, whatever the layer's device)."""
    x64 = x.double().cpu()
    W, b = layer.base_layer.weight.double().cpu(), layer.base_layer.bias.double().cpu()
    A, B = layer.lora_A[:k].double().cpu(), layer.lora_B[:, :k].double().cpu()
    s = layer.scaling
    y = x64 @ W.T + b + s * (x64 @ A.T) @ B.T
    abs_sum = x64.abs() @ W.abs().T + b.abs() + abs(s) * (x64.abs() @ A.abs().T) @ B.abs().T
    # Each entry: a dot product over `in` (base), one over `in` (shrink) and one over k
    # (expand), plus the bias and scale roundings: Higham's gamma bound for any order in
    # the accumulator.  Half dtypes also round intermediates to the dtype (u = x A^T, its
    # scaled copy, the base product before the sum): each such rounding moves the result
    # by at most u_dtype times its share of abs_sum, so 3 u_dtype abs_sum (0 for float32
    # and float64, whose unit is in gamma already).
    bound = summation_bound(abs_sum, y, 2 * x.shape[-1] + k + 4, x.dtype) + 3 * OUTPUT_UNIT[x.dtype] * abs_sum
    return y, bound


# ------------------------------------------------------------------ scores
def _reference_run(seed: int, steps: int, device, poison=None):
    """``(model, allocator, ema, unc)`` after ``steps`` backward passes and allocator updates
    (beta1 0.7, beta2 0.9), with the float64 recurrence of the averages beside them:
    ``Ibar <- beta1 Ibar + (1 - beta1) I``, ``U <- beta2 U + (1 - beta2) |I - Ibar|``, entries
    whose ``I = |w g|`` is not finite kept.  ``poison(step, params)`` may edit the gradients."""
    generator = torch.Generator().manual_seed(seed)
    model = Stack(generator).to(device)
    beta1, beta2 = 0.7, 0.9
    allocator = IncreLoRAAllocator(model, 12, 2, add_every=1000, beta1=beta1, beta2=beta2)
    params = [p for layer in model.layers for p in (layer.lora_A, layer.lora_B)]
    ema = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    unc = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for step in range(steps):
        backward(model, generator, device=device)
        if poison is not None:
            poison(step, params)
        for p, e, u in zip(params, ema, unc):
            ipt = (p.double() * p.grad.double()).abs().cpu()
            keep = torch.isfinite(ipt)
            e_new = beta1 * e + (1 - beta1) * ipt
            u_new = beta2 * u + (1 - beta2) * (ipt - e_new).abs()
            e.copy_(torch.where(keep, e_new, e))
            u.copy_(torch.where(keep, u_new, u))
        allocator.update_and_allocate(step)
    return model, allocator, ema, unc


def test_scores_are_the_float64_recurrence(device):
    model, allocator, ema, unc = _reference_run(101, 5, device)
    expected = []
    for i, layer in enumerate(model.layers):
        k = 2
        total = (ema[2 * i] * unc[2 * i])[:k].sum() + (ema[2 * i + 1] * unc[2 * i + 1])[:, :k].sum()
        expected.append(total / (k * (layer.in_features + layer.out_features)))
        # The inactive slots: exactly zero gradients, so exactly zero averages.
        assert (layer.lora_A.grad[k:] == 0).all() and (layer.lora_B.grad[:, k:] == 0).all()
        assert (allocator._exp_avg_ipt[2 * i][k:] == 0).all()
    expected = torch.stack(expected)
    scores = allocator.module_scores()
    assert scores.dtype == torch.float64 and (scores > 0).all()
    # Five float32 updates of values well above underflow: relative error a few float32
    # units per step (|w g|, two lerps, a subtraction, the product), far below 1e-5.
    assert torch.allclose(scores, expected, rtol=1e-5, atol=0)


def test_non_finite_gradient_entries_keep_their_averages(device):
    """A NaN or inf gradient entry (a step a GradScaler skips) made its module's score NaN for
    the rest of the run (ranked last at every allocation).  Such entries now keep their
    averages; the others follow the recurrence."""
    def poison(step, params):
        if step == 2:
            params[0].grad[0, 0], params[1].grad[1, 0] = float("nan"), float("inf")

    _, allocator, ema, unc = _reference_run(111, 4, device, poison)
    for j, (e, u) in enumerate(zip(ema, unc)):
        assert torch.isfinite(allocator._exp_avg_ipt[j]).all() and torch.isfinite(allocator._exp_avg_unc[j]).all()
        # float32 averages of four updates: a few float32 units (as the recurrence test).
        torch.testing.assert_close(allocator._exp_avg_ipt[j].cpu().double(), e, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(allocator._exp_avg_unc[j].cpu().double(), u, rtol=1e-5, atol=1e-12)
    assert torch.isfinite(allocator.module_scores()).all()


def test_ranks_go_to_the_highest_scores(device):
    generator = torch.Generator().manual_seed(102)
    model = Stack(generator, widths=(8,) * 7, r_max=4).to(device)  # six modules of the same size
    allocator = IncreLoRAAllocator(model, 6 * 1 + 5, 1, add_every=3, ranks_per_step=2)
    # A twin that never allocates, fed the same gradients: its scores are the ones the
    # allocation at step 3 ranked.
    twin = IncreLoRAAllocator(model, 6 * 1 + 5, 1, add_every=1000)
    factors = [1.0, 10.0, 0.5, 2.0, 6.0, 0.1]  # gradient scales per module
    for step in range(1, 4):
        for layer, f in zip(model.layers, factors):
            layer.lora_A.grad = randn(*layer.lora_A.shape, generator=generator, device=device) * f
            layer.lora_B.grad = randn(*layer.lora_B.shape, generator=generator, device=device) * f
        twin.update_and_allocate(step)
        ranks = allocator.update_and_allocate(step)
    scores = twin.module_scores()
    top = sorted(range(6), key=lambda i: -scores[i].item())[:2]
    assert sorted(top) == [1, 4]  # the two largest gradient scales
    assert [ranks[n] for n in allocator.names] == [2 if i in top else 1 for i in range(6)]
    assert allocator.history == [(3, [allocator.names[i] for i in sorted(top)])]


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_ranks_go_to_the_highest_scores_at_extreme_gradient_scales(scale):
    """The scores' product |w g| * uncertainty was formed in float32 before its float64 sum:
    inf for every module at gradients of 1e20 (the tie went to the first module), 0 at
    1e-30.  Formed in float64, the module with the largest gradients gets the rank."""
    generator = torch.Generator().manual_seed(7)
    model = Stack(generator, widths=(16,) * 4, r_max=4)  # three modules of the same size
    allocator = IncreLoRAAllocator(model, 3 * 1 + 1, 1, add_every=3, ranks_per_step=1)
    for step in range(1, 4):
        for layer, f in zip(model.layers, (1.0, 3.0, 1.0)):
            layer.lora_A.grad = randn(*layer.lora_A.shape, generator=generator) * (f * scale)
            layer.lora_B.grad = randn(*layer.lora_B.shape, generator=generator) * (f * scale)
        ranks = allocator.update_and_allocate(step)
    assert [ranks[n] for n in allocator.names] == [1, 2, 1]

def test_ties_go_to_the_first_module(generator):
    model = Stack(generator, widths=(8,) * 4, r_max=3)
    allocator = IncreLoRAAllocator(model, 4, 1, add_every=1)
    for layer in model.layers:  # no gradients at all: every score 0
        layer.lora_A.grad = torch.zeros_like(layer.lora_A)
        layer.lora_B.grad = torch.zeros_like(layer.lora_B)
    assert allocator.update_and_allocate(1) == {allocator.names[0]: 2, allocator.names[1]: 1, allocator.names[2]: 1}


# ------------------------------------------------------------------ adding ranks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_output_unchanged_when_a_rank_is_added(dtype, device, monkeypatch):
    if device == "cuda":  # bfloat16 GEMMs accumulate in float32 only with this off (the bound assumes it)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    generator = torch.Generator().manual_seed(103)
    model = Stack(generator, dtype=dtype).to(device)
    allocator = IncreLoRAAllocator(model, 4 * 2 + 4, 2, add_every=2, ranks_per_step=4,
                                   generator=torch.Generator().manual_seed(104))
    x = randn(7, 10, generator=generator, dtype=dtype, device=device)
    backward(model, generator, dtype=dtype, device=device)
    allocator.update_and_allocate(1)
    backward(model, generator, dtype=dtype, device=device)
    inputs, outputs = [], []
    h = x
    for i, layer in enumerate(model.layers):  # each layer's input and output before the allocation
        inputs.append(h)
        h = layer(h).detach()
        outputs.append(h)
        h = torch.tanh(h) if i + 1 < len(model.layers) else h
    ranks = allocator.update_and_allocate(2)
    assert set(ranks.values()) == {3}
    for layer, h, before in zip(model.layers, inputs, outputs):
        assert layer.active_rank == 3
        assert (layer.lora_B[:, 2] == 0).all() and (layer.lora_A[2] != 0).all()
        after = layer(h).detach()
        # The new rank's term is exactly zero, so the float64 value of the rank-2 layer is
        # the exact value of both evaluations: each within its rounding bound of it.
        reference, bound = reference_output(layer, h, 2)
        assert_within(after.cpu(), reference, bound, "after adding a rank")
        assert_within(before.cpu(), reference, bound, "before adding a rank")


def test_new_rank_trains_and_gradcheck(device):
    generator = torch.Generator().manual_seed(105)
    model = Stack(generator, dtype=torch.float64).to(device)
    allocator = IncreLoRAAllocator(model, 4 * 2 + 1, 2, add_every=1, generator=torch.Generator().manual_seed(106))
    backward(model, generator, dtype=torch.float64, device=device)
    allocator.update_and_allocate(1)
    (name, layer), = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.active_rank == 3]
    backward(model, generator, dtype=torch.float64, device=device)
    assert (layer.lora_B.grad[:, 2] != 0).all()  # B's new column gets a gradient at once
    assert (layer.lora_A.grad[3:] == 0).all() and (layer.lora_B.grad[:, 3:] == 0).all()
    x = randn(5, layer.in_features, generator=generator, dtype=torch.float64, device=device).requires_grad_()
    with torch.no_grad():
        layer.lora_B[:, 2] = randn(layer.out_features, generator=generator, dtype=torch.float64, device=device)
    # The layer reads its own lora_A and lora_B, the tensors gradcheck perturbs.
    assert torch.autograd.gradcheck(lambda x, A, B: layer(x), (x, layer.lora_A, layer.lora_B))


def test_optimizer_state_of_new_slots_is_zeroed(device):
    generator = torch.Generator().manual_seed(107)
    model = Stack(generator).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    allocator = IncreLoRAAllocator(model, 4 * 2 + 4, 2, add_every=3, ranks_per_step=4, optimizer=optimizer,
                                   generator=torch.Generator().manual_seed(3))
    for step in range(1, 4):
        backward(model, generator, device=device)
        # SGD's weight decay enters the momentum of every slot, active or not.
        before = [optimizer.state[layer.lora_A]["momentum_buffer"].clone() for layer in model.layers] if step > 1 \
            else None
        allocator.update_and_allocate(step)
        optimizer.step()
    for layer, old in zip(model.layers, before):
        momentum = optimizer.state[layer.lora_A]["momentum_buffer"]
        assert (old[2] != 0).all()  # the inactive slot had momentum from the weight decay
        # The slot's momentum restarted from 0 at the allocation: the step's buffer is
        # 0.9 * 0 + (grad + 0.1 A) with grad = 0 (the backward ran before the rank was
        # added), and the step scaled the new row by 1 - lr * 0.1.
        expected = 0.1 * layer.lora_A[2].detach() / (1 - 1e-2 * 0.1)
        assert torch.allclose(momentum[2], expected, rtol=1e-6, atol=0)  # float32 roundings of two products


def test_8bit_moments_of_new_slots_are_zeroed(generator):
    """GaLoreAdamW8bit's moments are uint8 codes: zeroing the codes set the new slot's first
    moment to -absmax (code 0), a spurious momentum; they are dequantized, zeroed and
    requantized."""
    from lowrank_ops.optim import GaLoreAdamW8bit
    from lowrank_ops.optim._quantized_state import dequantize_blockwise

    model = torch.nn.Sequential(*(LoRALinear(torch.nn.Linear(64, 64), r=8, init_lora_weights=False) for _ in range(2)))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.no_grad():  # the inactive slots zero, as IncreLoRA starts
        for layer in model:
            layer.lora_B[:, 2:] = 0
    optimizer = GaLoreAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2, min_8bit_size=256)
    allocator = IncreLoRAAllocator(model, 6, 2, add_every=3, optimizer=optimizer,
                                   generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, 64, generator=generator)
    grew = False
    for step in range(1, 5):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        before = list(allocator.ranks)
        allocator.update_and_allocate(step)
        for k, after, layer in zip(before, allocator.ranks, model):
            if after != k:
                grew = True
                state = optimizer.state[layer.lora_A]
                moment = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], True)
                assert moment.view_as(layer.lora_A)[k].abs().max() == 0
        optimizer.step()
    assert grew


# ------------------------------------------------------------------ schedule and budget
def test_budget_is_never_exceeded_and_is_reached(device):
    generator = torch.Generator().manual_seed(108)
    model = Stack(generator, widths=(6,) * 6, r_max=5).to(device)
    budget = 5 * 2 + 11
    allocator = IncreLoRAAllocator(model, budget, 2, add_every=2, warmup_steps=3, final_step=11)
    # 4 allocations (steps 5, 7, 9, 11) for 11 ranks: ceil(11 / 4) = 3 per allocation.
    assert allocator.ranks_per_step == 3
    allocated_at = []
    for step in range(20):
        backward(model, generator, device=device)
        before = sum(allocator.ranks)
        ranks = allocator.update_and_allocate(step)
        assert sum(ranks.values()) <= budget
        assert all(2 <= k <= 5 for k in ranks.values())
        if sum(ranks.values()) > before:
            allocated_at.append(step)
    assert allocated_at == [5, 7, 9, 11]
    assert sum(allocator.ranks) == budget and allocator.budget_spent
    assert [len(names) for _, names in allocator.history] == [3, 3, 3, 2]  # the last one takes what is left


def test_max_rank_caps_every_module(generator):
    model = Stack(generator, widths=(6,) * 3, r_max=5)
    allocator = IncreLoRAAllocator(model, 6, 1, add_every=1, max_rank=3, ranks_per_step=2)
    for step in range(1, 10):
        backward(model, generator)
        ranks = allocator.update_and_allocate(step)
    assert list(ranks.values()) == [3, 3]
    assert [layer.active_rank for layer in model.layers] == [3, 3]


def test_allocation_is_deterministic(device):
    def run(seed):
        data = torch.Generator().manual_seed(11)
        model = Stack(torch.Generator().manual_seed(5)).to(device)
        allocator = IncreLoRAAllocator(model, 4 * 1 + 10, 1, add_every=2, ranks_per_step=2,
                                       generator=torch.Generator().manual_seed(seed))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(12):
            backward(model, data, device=device)
            allocator.update_and_allocate(step)
            optimizer.step()
        return allocator.history, [layer.lora_A.detach().clone() for layer in model.layers]

    history, weights = run(0)
    again, weights_again = run(0)
    other, weights_other = run(1)
    assert history == again and len(history) == 5
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_again))
    assert not all(torch.equal(a, b) for a, b in zip(weights, weights_other))  # the generator draws the new rows


def test_state_dict_round_trip_restores_ranks(device):
    """Saved on ``device``; the model and optimizer reloaded through the CPU
    (``map_location="cpu"``), the allocator both ways (its generator state lands on
    ``device`` with ``map_location=device``; its averages on the CPU with "cpu")."""
    def build():
        model = Stack(torch.Generator().manual_seed(2)).to(device)
        allocator = IncreLoRAAllocator(model, 4 * 1 + 8, 1, add_every=2, ranks_per_step=3,
                                       generator=torch.Generator().manual_seed(4))
        return model, allocator, torch.optim.Adam(model.parameters(), lr=1e-2)

    data = torch.Generator().manual_seed(7)
    model, allocator, optimizer = build()
    for step in range(5):
        backward(model, data, device=device)
        allocator.update_and_allocate(step)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "allocator": allocator.state_dict(),
                "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True, map_location="cpu")
    buffer.seek(0)
    on_device = torch.load(buffer, weights_only=True, map_location=device)
    fresh, fresh_allocator, fresh_optimizer = build()
    assert [layer.active_rank for layer in fresh.layers] == [1] * 4
    fresh.load_state_dict(saved["model"])
    fresh_allocator.load_state_dict(on_device["allocator"])
    fresh_allocator.load_state_dict(saved["allocator"])  # the same state again: loading is idempotent
    fresh_optimizer.load_state_dict(saved["optimizer"])
    assert fresh_allocator.ranks == allocator.ranks and max(allocator.ranks) > 1
    assert [layer.active_rank for layer in fresh.layers] == allocator.ranks
    x = randn(6, 10, generator=torch.Generator().manual_seed(8), device=device)
    assert torch.equal(fresh(x), model(x))
    # Continuing both gives the same allocations and values (averages and generator restored).
    state = data.get_state()
    for m, a, o in ((model, allocator, optimizer), (fresh, fresh_allocator, fresh_optimizer)):
        data.set_state(state)
        for step in range(5, 10):
            backward(m, data, device=device)
            a.update_and_allocate(step)
            o.step()
    assert fresh_allocator.history == allocator.history
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))


def test_load_state_dict_checks(generator):
    model = Stack(generator)
    allocator = IncreLoRAAllocator(model, 10, 2, add_every=2)
    state = allocator.state_dict()
    other = IncreLoRAAllocator(model, 10, 2, add_every=2, target_modules=["layers.0", "layers.1"])
    with pytest.raises(ValueError, match=r"the state is for modules \['layers.0', 'layers.1', 'layers.2', 'layers.3'\]"):
        other.load_state_dict(state)
    bad = dict(state, ranks=[2, 2, 2, 7])
    with pytest.raises(ValueError, match=r"rank of 'layers.3' must be in \[init_rank, max_rank\] = \[2, 6\]; got 7"):
        allocator.load_state_dict(bad)
    bad = dict(state, ranks=[2, 2, 3, 4])
    with pytest.raises(ValueError, match=r"the ranks sum to 11, over total_budget = 10"):
        allocator.load_state_dict(bad)
    # A bad generator state failed after the averages and ranks were loaded: half a load.
    before = [t.clone() for t in allocator._exp_avg_ipt]
    with pytest.raises(TypeError, match=r"state\['generator_state'\] must be a torch.uint8 tensor"):
        allocator.load_state_dict(dict(state, ranks=[3, 2, 2, 2], exp_avg_ipt=[t + 1 for t in before],
                                       generator_state=3))
    assert allocator.ranks == [2, 2, 2, 2] and all(torch.equal(a, b) for a, b in zip(allocator._exp_avg_ipt, before))


# ------------------------------------------------------------------ training
def test_toy_regression_loss_drops_and_ranks_grow(device):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the Linear layers' initialization: the same model on every device and run
    d = 16
    teacher = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, d))
    student = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, d))
    with torch.no_grad():
        for t, s in zip(teacher, student):
            if isinstance(t, torch.nn.Linear):
                s.load_state_dict(t.state_dict())
                # The teacher differs by a rank-4 change of the first layer only.
                if t is teacher[0]:
                    t.weight += randn(d, 4, generator=g) @ randn(4, d, generator=g) * 0.3
    student[0] = LoRALinear(student[0], 8, 8.0, generator=g)
    student[2] = LoRALinear(student[2], 8, 8.0, generator=g)
    teacher, student = teacher.to(device), student.to(device)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    allocator = IncreLoRAAllocator(student, 8, 1, add_every=20, warmup_steps=20, final_step=200,
                                   generator=g, optimizer=optimizer)
    x_test = randn(256, d, generator=g, device=device)
    y_test = teacher(x_test).detach()

    def test_loss():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(student(x_test), y_test).item()

    start = test_loss()
    for step in range(400):
        x = randn(64, d, generator=g, device=device)
        loss = torch.nn.functional.mse_loss(student(x), teacher(x).detach())
        optimizer.zero_grad()
        loss.backward()
        allocator.update_and_allocate(step)
        optimizer.step()
    end = test_loss()
    assert end < 0.05 * start, (start, end)  # seeds 0-3: 3e-4, 0.027, 2e-5, 2e-4 of the start
    assert sum(allocator.ranks) == 8
    # The change lives in the first layer: it earns the larger share of the ranks.
    assert allocator.ranks[0] >= allocator.ranks[1], allocator.ranks  # seeds 0-3: 5-3, 4-4, 6-2, 6-2


# ------------------------------------------------------------------ bad input
def test_bad_budgets_and_settings(generator):
    model = Stack(generator)  # four modules of r = 6
    make = lambda **kw: IncreLoRAAllocator(model, **{"total_budget": 12, "init_rank": 2, "add_every": 5, **kw})
    with pytest.raises(ValueError, match=r"total_budget must be an int in \[n \* init_rank, sum of max ranks\] = "
                                         r"\[8, 24\] \(4 modules\); got 7"):
        make(total_budget=7)
    with pytest.raises(ValueError, match=r"= \[8, 24\] \(4 modules\); got 25"):
        make(total_budget=25)
    with pytest.raises(ValueError, match=r"= \[8, 12\] \(4 modules\); got 13"):
        make(total_budget=13, max_rank=3)
    with pytest.raises(ValueError, match=r"total_budget must be an int .* got 12.0"):
        make(total_budget=12.0)
    with pytest.raises(ValueError, match=r"max_rank must be <= the rank slots r of every module \(6 for 'layers.0'\); "
                                         r"got 7"):
        make(max_rank=7)
    with pytest.raises(ValueError, match=r"init_rank must be <= max_rank = 3; got 4"):
        make(init_rank=4, max_rank=3)
    with pytest.raises(ValueError, match=r"init_rank must be an integer >= 1; got 0"):
        make(init_rank=0)
    with pytest.raises(ValueError, match=r"add_every must be an integer >= 1; got 0"):
        make(add_every=0)
    with pytest.raises(ValueError, match=r"final_step must be >= warmup_steps \+ add_every = 15 .*; got 14"):
        make(warmup_steps=10, final_step=14)
    with pytest.raises(ValueError, match=r"beta1 must be in \(0, 1\); got 1.0"):
        make(beta1=1.0)
    with pytest.raises(ValueError, match=r"ranks_per_step must be an integer >= 1; got 0"):
        make(ranks_per_step=0)
    with pytest.raises(ValueError, match=r"model has no LoRALinear module matching target_modules=\['q'\]"):
        make(target_modules=["q"])
    with pytest.raises(TypeError, match=r"target_modules must be a sequence of patterns, not a str"):
        make(target_modules="layers.0")
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module; got list"):
        IncreLoRAAllocator([model], 12, 2, add_every=5)
    model.layers[1].merge()
    with pytest.raises(RuntimeError, match=r"module 'layers.1' is merged into its base weight"):
        make()
    model.layers[1].unmerge()
    with torch.no_grad():
        model.layers[2].lora_B[3, 4] = 0.5  # as a PiSSA init would leave it
    with pytest.raises(ValueError, match=r"module 'layers.2' has nonzero lora_B columns past init_rank = 2"):
        make()
    with torch.no_grad():
        model.layers[2].lora_B[3, 4] = 0.0
    allocator = make()
    allocator.update_and_allocate(3)
    with pytest.raises(ValueError, match=r"step must increase from call to call \(> 3, the previous step\); got 3"):
        allocator.update_and_allocate(3)
    with pytest.raises(ValueError, match=r"step must be an int >= 0; got -1"):
        allocator.update_and_allocate(-1)
    assert math.isfinite(allocator.module_scores().sum().item())



def test_numpy_integer_budget_and_steps(generator):
    """An np.int64 total_budget was refused ("total_budget must be an int in [n * init_rank,
    sum of max ranks]"), as an np.int64 step in update_and_allocate: the same allocations as
    Python ints; bools stay refused."""
    np = pytest.importorskip("numpy")
    model = Stack(generator)
    settings = dict(init_rank=2, add_every=2, max_rank=4, warmup_steps=0, final_step=6)
    ours = IncreLoRAAllocator(model, np.int64(12), **{k: np.int64(v) for k, v in settings.items()})
    theirs = IncreLoRAAllocator(model, 12, **settings)
    assert type(ours.total_budget) is int
    for step in range(1, 5):
        backward(model, generator)
        assert ours.update_and_allocate(np.int64(step)) == theirs.update_and_allocate(step)
    assert ours.history == theirs.history and type(ours.last_step) is int
    with pytest.raises(ValueError, match=r"total_budget must be an int .* got True"):
        IncreLoRAAllocator(model, True, 1, add_every=1)
    with pytest.raises(ValueError, match="step must be an int >= 0; got True"):
        ours.update_and_allocate(True)

def test_gated_modules_and_the_end_of_the_schedule(generator):
    layers = torch.nn.Sequential(LoRALinear(torch.nn.Linear(8, 8), 4, 4.0, use_gate=True, generator=generator),
                                 LoRALinear(torch.nn.Linear(8, 8), 4, 4.0, use_gate=True, generator=generator))
    with torch.no_grad():
        for layer in layers:
            layer.lora_B[:, 0] = randn(8, generator=generator)
            layer.lora_gate.copy_(randn(4, generator=generator))  # SoRA-trained gates, none equal to 1
    allocator = IncreLoRAAllocator(layers, 4, 1, add_every=2, final_step=6, ranks_per_step=1)
    x = randn(5, 8, generator=generator)
    checked = 0
    for step in range(1, 9):
        layers.zero_grad()
        before = [layer(x).detach() for layer in layers]  # each layer on the same input
        layers(x).square().sum().backward()
        scores = allocator.module_scores()
        ranks = list(allocator.ranks)
        allocator.update_and_allocate(step)
        for layer, y, k in zip(layers, before, ranks):
            if layer.active_rank == k + 1:  # grew: gate slot 1, B's new column 0
                assert layer.lora_gate[k] == 1.0 and (layer.lora_B[:, k] == 0).all()
                # Both evaluations are within the gated rank-k layer's rounding bound of its
                # float64 value (the new rank's term is exactly zero).
                W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
                A, B, g = (layer.lora_A[:k].double(), layer.lora_B[:, :k].double(),
                           layer.lora_gate[:k].detach().double())
                x64 = x.double()
                exact = x64 @ W.T + b + layer.scaling * ((x64 @ A.T) * g) @ B.T
                abs_sum = (x64.abs() @ W.abs().T + b.abs()
                           + layer.scaling * ((x64.abs() @ A.abs().T) * g.abs()) @ B.abs().T)
                bound = summation_bound(abs_sum, exact, 2 * 8 + k + 6, torch.float32)
                assert_within(y, exact, bound, "before the rank was added")
                assert_within(layer(x).detach(), exact, bound, "after the rank was added")
                checked += 1
        if step > 6:  # past final_step: the scores are no longer updated
            assert torch.equal(allocator.module_scores(), scores)
    # Allocations at steps 2 and 4 spend the budget (4 = 2 x 1 + 2); step 6 has nothing left.
    assert sum(allocator.ranks) == 4 and [s for s, _ in allocator.history] == [2, 4] and checked == 2


def test_torch_compile_training_follows_the_allocations():
    # The allocator raises active_rank and writes new A rows in place at every step: the
    # compiled model must pick up every new rank, training exactly as eager.  The ranks
    # reach the graphs as symbolic sizes: 12 allocations over 4 layers used to recompile
    # at each one (an int attribute is a constant to Dynamo), and fullgraph failed at the
    # ninth ("FailOnRecompileLimitHit").
    def run(wrap):
        generator = torch.Generator().manual_seed(12)
        model = Stack(generator)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
        allocator = IncreLoRAAllocator(model, 4 * 1 + 12, 1, add_every=1, generator=generator, optimizer=optimizer)
        x, y = randn(16, 10, generator=generator), randn(16, 8, generator=generator)
        forward, losses = wrap(model), []
        for step in range(1, 15):
            loss = torch.nn.functional.mse_loss(forward(x), y)
            loss.backward()
            allocator.update_and_allocate(step)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        ranks = torch.tensor([layer.active_rank for layer in model.layers])
        assert int(ranks.sum()) == 16
        return {"losses": torch.stack(losses), "ranks": ranks,
                **{name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}}

    assert_training_compiles(run)
