"""Maestro: the ordered-dropout forward against the float64 product at the sampled rank,
gradients only on the first b components, gradcheck, determinism, factorizing a Linear
(exact SVD and rsvd), shrinking within the dropped energy (optimizer state cut too),
convert, a toy run where shrinking finds a planted rank, bad input.

Devices: every test but the bad-input one takes the ``device`` fixture (cpu, and cuda
where usable: ``pytest -m cuda``).  Layers and data are drawn on the CPU from fixed seeds
and moved, so both devices see the same numbers (the layers' generators are CPU ones:
the sampled ranks are the same on both); the float64 references run on the CPU."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.methods import maestro
from lowrank_ops.methods.maestro import OrderedLowRankLinear

from helpers import (OUTPUT_UNIT, assert_compiled_matches_eager, assert_within, compile_fullgraph, randn,
                     summation_bound, with_spectrum)


def random_layer(in_features, out_features, rank, generator, dtype=torch.float32, device="cpu", **kwargs):
    layer = OrderedLowRankLinear(in_features, out_features, rank, generator=generator, dtype=dtype, **kwargs)
    with torch.no_grad():  # comparable scales for every component and the bias
        layer.U.copy_(randn(out_features, rank, generator=generator))
        layer.V.copy_(randn(rank, in_features, generator=generator))
        layer.bias.copy_(randn(out_features, generator=generator))
    return layer.to(device)


def reference(layer: OrderedLowRankLinear, x: torch.Tensor, b: int):
    """float64 ``x V_b^T U_b^T + bias`` and the rigorous bound on a float evaluation's
    error (on the CPU, whatever the layer's device)."""
    x64, U, V, bias = (t.double().cpu() for t in (x, layer.U[:, :b], layer.V[:b], layer.bias))
    y = (x64 @ V.T) @ U.T + bias
    abs_sum = (x64.abs() @ V.abs().T) @ U.abs().T + bias.abs()
    # Two dot products in a row (over in, then over b) plus the bias: Higham's gamma_n
    # with n = in + b + 2 bounds every summation order in the accumulator; the
    # intermediate h = x V_b^T is rounded to the dtype before the second product, an
    # error of at most u_dtype |h| per entry, which the second product carries into y as
    # at most u_dtype (|x| |V_b|^T) |U_b|^T = u_dtype * abs_sum (0 extra for float32 and
    # float64, whose unit is already in gamma_n).
    return y, summation_bound(abs_sum, y, x.shape[-1] + b + 2, x.dtype) + OUTPUT_UNIT[x.dtype] * abs_sum


# ------------------------------------------------------------------ forward
def exact_bf16_accumulation(device, monkeypatch):
    """cuBLAS may reduce bfloat16 GEMMs in bfloat16 unless told not to; the bounds here
    assume float32 accumulation (the CPU's), so CUDA runs turn that off."""
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_ordered_dropout_forward_is_the_float64_product(dtype, device, monkeypatch):
    exact_bf16_accumulation(device, monkeypatch)
    generator = torch.Generator().manual_seed(201)
    layer = random_layer(20, 13, 9, generator, dtype, device, min_rank=2).train()
    x = randn(3, 5, 20, generator=generator, dtype=dtype, device=device)  # batched
    seen = set()
    for _ in range(40):
        y = layer(x)
        b = layer.last_rank
        seen.add(b)
        assert y.shape == (3, 5, 13) and y.dtype == dtype and y.device.type == device
        expected, bound = reference(layer, x, b)
        assert_within(y.cpu(), expected, bound, f"ordered dropout at b = {b}")
    assert seen == set(range(2, 10))  # every rank from min_rank to r is sampled
    # Non-contiguous input (a transposed view) and an empty batch.
    xt = randn(20, 6, generator=generator, dtype=dtype, device=device).T
    y = layer(xt)
    expected, bound = reference(layer, xt, layer.last_rank)
    assert_within(y.cpu(), expected, bound, "transposed input")
    assert layer(torch.empty(0, 20, dtype=dtype, device=device)).shape == (0, 13)


def test_eval_uses_active_rank_or_all(device):
    generator = torch.Generator().manual_seed(202)
    layer = random_layer(8, 6, 5, generator, device=device).eval()
    x = randn(4, 8, generator=generator, device=device)
    for active, b in ((None, 5), (3, 3), (0, 0)):
        layer.active_rank = active
        y = layer(x)
        assert layer.last_rank == b
        expected, bound = reference(layer, x, b)
        assert_within(y.cpu(), expected, bound, f"eval at active_rank = {active}")
    layer.active_rank = 2
    layer.train()
    assert all(1 <= (layer(x), layer.last_rank)[1] <= 2 for _ in range(10))  # sampled up to active_rank
    assert layer(x, rank=4) is not None and layer.last_rank == 4  # an explicit rank wins
    layer.ordered_dropout = False
    layer(x)
    assert layer.last_rank == 2


def test_gradients_reach_only_the_first_b_components(device):
    generator = torch.Generator().manual_seed(203)
    layer = random_layer(10, 7, 6, generator, device=device).train()
    x = randn(9, 10, generator=generator, device=device).requires_grad_()
    for _ in range(6):
        layer.zero_grad()
        layer(x).square().sum().backward()
        b = layer.last_rank
        assert (layer.U_t.grad[b:] == 0).all() and (layer.V.grad[b:] == 0).all()
        assert (layer.U_t.grad[:b] != 0).all() and (layer.V.grad[:b] != 0).all()


def test_gradcheck(device):
    generator = torch.Generator().manual_seed(204)
    layer = random_layer(6, 5, 4, generator, torch.float64, device)
    x = randn(3, 6, generator=generator, dtype=torch.float64, device=device).requires_grad_()
    for b in (4, 2):
        # The layer reads its own U_t, V and bias, the tensors gradcheck perturbs.
        assert torch.autograd.gradcheck(lambda x, U_t, V, bias: layer(x, rank=b), (x, layer.U_t, layer.V, layer.bias))


def test_sampling_is_deterministic_with_a_generator(device):
    x = randn(4, 12, generator=torch.Generator().manual_seed(205), device=device)

    def run(seed, where=device):
        # Built on `where` directly: the CPU generator draws the values on the CPU.
        layer = OrderedLowRankLinear(12, 8, 7, generator=torch.Generator().manual_seed(seed), device=where)
        outputs, ranks = [], []
        for _ in range(12):
            outputs.append(layer(x.to(where)).detach())
            ranks.append(layer.last_rank)
        return ranks, outputs, layer

    ranks, first, layer = run(3)
    ranks_again, again, _ = run(3)
    _, other, _ = run(4)
    assert ranks == ranks_again and len(set(ranks)) > 1
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # The same seed gives the same initial values and ranks on every device.
    cpu_ranks, _, cpu_layer = run(3, "cpu")
    assert cpu_ranks == ranks
    assert all(torch.equal(p.detach().cpu(), q.detach()) for p, q in zip(layer.parameters(), cpu_layer.parameters()))
    # Without a generator, torch's global one: reproducible with manual_seed.
    layer.generator = None
    torch.manual_seed(0)
    ranks = [(layer(x), layer.last_rank)[1] for _ in range(10)]
    torch.manual_seed(0)
    assert ranks == [(layer(x), layer.last_rank)[1] for _ in range(10)]


# ------------------------------------------------------------------ factorizing a Linear
@pytest.mark.parametrize("rank", [None, 6, 0.25], ids=["full", "rank6", "fraction"])
def test_from_linear_is_the_ordered_svd(rank, device):
    """Exact SVD (full) and rsvd (rank 6 and 3: at most half of 12) on ``device``, with a
    CPU generator (rsvd draws on the weight's device from a generator seeded by it)."""
    generator = torch.Generator().manual_seed(206)
    spectrum = torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02], dtype=torch.float64)
    W = with_spectrum(12, 30, spectrum, generator)  # [out = 12, in = 30]
    linear = torch.nn.Linear(30, 12, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(W)
    linear, W, spectrum = linear.to(device), W.to(device), spectrum.to(device)
    sampler = torch.Generator().manual_seed(0)
    layer = OrderedLowRankLinear.from_linear(linear, rank, generator=sampler)
    # One draw for rsvd's seed, then the constructor's initialization: the same on every device.
    twin = torch.Generator().manual_seed(0)
    torch.randint(0, 2**62, (), generator=twin)
    OrderedLowRankLinear(30, 12, layer.rank, generator=twin, dtype=torch.float64)
    assert torch.equal(sampler.get_state(), twin.get_state())
    k = {None: 12, 6: 6, 0.25: 3}[rank]
    assert layer.rank == k and layer.U.dtype == torch.float64 and layer.U.device.type == device
    assert torch.equal(layer.bias, linear.bias) and layer.bias is not linear.bias
    # Components ordered by singular value, balanced: ||u_i|| = ||v_i|| = sqrt(s_i).
    norms = layer.component_norms()
    assert torch.allclose(norms, spectrum[:k], rtol=1e-10)
    assert torch.allclose(layer.U.norm(dim=0), layer.V.norm(dim=1), rtol=1e-10)
    error = torch.linalg.matrix_norm(layer.U @ layer.V - W)
    optimal = spectrum[k:].square().sum().sqrt()
    # Exact SVD (k > 6) to rounding; rsvd (k <= 6) within 1e-6 of the optimum on this
    # fast-decaying spectrum (power iterations make its excess error negligible).
    assert error <= optimal * (1 + 1e-6) + 1e-12
    x = randn(4, 30, generator=generator, dtype=torch.float64, device=device)
    if rank is None:  # full rank: the same layer
        assert torch.allclose(layer.eval()(x), linear(x), rtol=0, atol=1e-12)


def test_convert_replaces_matching_linears(device):
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4)).to(device)
    shared = model[0]
    model.add_module("again", shared)
    ranks = maestro.convert(model, 0.5, target_modules=["0", "again"], generator=torch.Generator().manual_seed(0))
    assert ranks == {"0": 6, "again": 6}
    assert isinstance(model[0], OrderedLowRankLinear) and model.again is model[0]
    assert model[0].V.device.type == device
    assert type(model[2]) is torch.nn.Linear
    with pytest.raises(ValueError, match="model is itself an nn.Linear"):
        maestro.convert(torch.nn.Linear(3, 3), 2)

    # A string is one pattern ("10" matched layers "1" and "0", character by character); a
    # pattern matching nothing raises, as the other converters; a rank too large names the layer.
    deep = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(12)])
    assert list(maestro.convert(deep, 2, target_modules="10")) == ["10"]
    with pytest.raises(ValueError, match=r"no nn.Linear module matches target_modules=\['nomatch'\]"):
        maestro.convert(deep, 2, target_modules="nomatch")
    with pytest.raises(ValueError, match=r"rank for layer '0' must be in \[1, 4\]"):
        maestro.convert(deep, 6)
    assert type(deep[0]) is torch.nn.Linear  # nothing replaced


# ------------------------------------------------------------------ shrinking
def test_shrink_preserves_outputs_up_to_the_dropped_energy(device):
    generator = torch.Generator().manual_seed(207)
    layer = random_layer(15, 11, 8, generator, torch.float64, device)
    with torch.no_grad():  # trailing components of decreasing size, one small one in the middle
        scales = torch.tensor([3.0, 2.0, 1e-4, 1.5, 1.0, 1e-3, 1e-5, 1e-6], dtype=torch.float64, device=device)
        layer.U.mul_(scales / layer.U.norm(dim=0))
        layer.V.div_(layer.V.norm(dim=1, keepdim=True))
    norms = layer.component_norms()
    x = randn(30, 15, generator=generator, dtype=torch.float64, device=device)
    layer.eval()
    before = layer(x).detach()
    assert layer.shrink_(2e-3) == 5  # the small middle one stays: only trailing ones go
    assert layer.U.shape == (11, 5) and layer.V.shape == (5, 15) and layer.U_t.is_contiguous()
    assert layer.V.device.type == device
    after = layer(x).detach()
    dropped = norms[5:].sum()
    # ||x (W - W_5)^T||_row <= ||x||_row * sum of the dropped ||u_i|| ||v_i||, plus the
    # float64 rounding of the two evaluations (tiny against 1e-3).
    allowed = x.norm(dim=1) * dropped * (1 + 1e-9) + 1e-12
    assert ((after - before).norm(dim=1) <= allowed).all()
    assert ((after - before).norm(dim=1) > 0).all()
    assert layer.shrink_(2e-3) == 5  # nothing more to cut
    assert layer.shrink_(1e9) == 1  # at least one component stays
    assert layer.shrink_(0.0) == 1


def test_shrunk_checkpoint_loads_into_a_fresh_layer():
    """A state dict saved after shrink_ holds rank-r' factors: a freshly built (or
    converted) layer refused it with a size mismatch; it now takes the checkpoint's rank."""
    generator = torch.Generator().manual_seed(5)
    layer = OrderedLowRankLinear(20, 12, 8, generator=generator)
    with torch.no_grad():
        layer.V[5:].mul_(1e-6)
    assert layer.shrink_(1e-4) == 5
    layer.eval()
    fresh = OrderedLowRankLinear(20, 12, 8, min_rank=6)
    fresh.active_rank = 7
    # The usual resume order: the optimizer first.  The load replaced U_t and V by new
    # Parameters, so this optimizer updated orphans and the layer never trained.
    parameters = (fresh.U_t, fresh.V)
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh(torch.randn(3, 20, generator=generator)).sum().backward()  # a gradient of the old shape, dropped by the load
    fresh.load_state_dict(layer.state_dict())
    assert fresh.V.grad is None and fresh.U_t.grad is None
    fresh.eval()
    assert (fresh.rank, fresh.active_rank, fresh.min_rank) == (5, 5, 5)
    assert fresh.U_t is parameters[0] and fresh.V is parameters[1]
    x = torch.randn(3, 20, generator=generator)
    assert torch.equal(fresh(x), layer(x))
    fresh(x).square().sum().backward()
    before = fresh.V.detach().clone()
    optimizer.step()
    assert not torch.equal(fresh.V, before)
    with pytest.raises(RuntimeError, match="size mismatch"):  # other feature sizes still refused
        OrderedLowRankLinear(21, 12, 8).load_state_dict(layer.state_dict())


def test_shrink_cuts_optimizer_state_and_keeps_training(device):
    generator = torch.Generator().manual_seed(208)
    layer = random_layer(10, 8, 6, generator, device=device)
    with torch.no_grad():
        layer.U[:, 4:] *= 1e-6  # components 4, 5: norms about 1e-5
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    x = randn(16, 10, generator=generator, device=device)
    layer(x, rank=6).square().mean().backward()
    optimizer.step()
    exp_avg = optimizer.state[layer.V]["exp_avg"].clone()
    step = optimizer.state[layer.V]["step"].clone()
    assert maestro.shrink_(layer, 0.1, optimizer) == {"": (6, 4)}  # Adam moved them to ~1e-3 entries
    U_t, V = layer.U_t, layer.V
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(U_t), id(V), id(layer.bias)]
    assert len(optimizer.state) == 3
    assert optimizer.state[V]["exp_avg"].shape == (4, 10) and torch.equal(optimizer.state[V]["step"], step)
    assert torch.equal(optimizer.state[V]["exp_avg"], exp_avg[:4])
    assert optimizer.state[U_t]["exp_avg_sq"].shape == (4, 8) and layer.U_t.grad.shape == (4, 8)
    layer(x).square().mean().backward()
    optimizer.step()  # the optimizer still works on the shrunk parameters
    assert torch.isfinite(layer.U).all()


def test_toy_training_finds_a_planted_rank(device):
    g = torch.Generator().manual_seed(0)
    d_in, d_out, planted = 24, 16, 3
    spectrum = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    teacher = (torch.linalg.qr(randn(d_out, planted, generator=g, dtype=torch.float64)).Q * spectrum) @ \
        torch.linalg.qr(randn(d_in, planted, generator=g, dtype=torch.float64)).Q.T
    teacher = teacher.float().to(device)
    layer = OrderedLowRankLinear(d_in, d_out, 10, bias=False, generator=g).to(device)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.05)
    ranks = []
    for step in range(1500):
        x = randn(64, d_in, generator=g, device=device)
        loss = torch.nn.functional.mse_loss(layer(x), x @ teacher.T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 300 == 299:  # progressive shrinking
            ranks.append(layer.shrink_(0.05, optimizer))
    assert ranks[-1] == planted, (ranks, layer.component_norms())
    assert ranks == sorted(ranks, reverse=True)
    # Ordered dropout recovered the teacher's singular values, in order (the data are
    # isotropic: the paper's SVD recovery); 5 % is the noise of 64-sample minibatches and
    # the weight decay's shrinkage (seeds 0-2 land within 1 %).
    assert torch.allclose(layer.component_norms().cpu(), spectrum, rtol=0.05), layer.component_norms()
    # The kept components are the teacher's SVD (ordered): the first one alone is its
    # best rank-1 approximation, and the whole layer is the teacher.
    W = (layer.U @ layer.V).detach().double()
    assert torch.linalg.matrix_norm(W - teacher.double()) < 0.05 * torch.linalg.matrix_norm(teacher.double())
    first = (layer.U[:, :1] @ layer.V[:1]).detach().double()
    best1 = torch.linalg.matrix_norm(teacher.double()) ** 2 - 16.0
    assert torch.linalg.matrix_norm(first - teacher.double()) ** 2 < best1 * 1.1


# ------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph_follows_active_rank(generator):
    # The documented way to compile a Maestro model whole: sample b outside the compiled call
    # and set active_rank (ordered_dropout=False).  One compiled module: every new b must
    # reach it, never a stale graph.  b reaches the graph as a symbolic size: every new b
    # recompiled (an int attribute is a constant to Dynamo), and fullgraph failed at the
    # ninth ("FailOnRecompileLimitHit").
    layer = random_layer(12, 10, 10, generator, ordered_dropout=False).train()
    compiled = compile_fullgraph(layer)
    for b in (10, 2, 4, 2, 3, 5, 6, 7, 8, 9, 1):
        layer.active_rank = b
        with torch.no_grad():
            compiled(randn(2, 12, generator=generator))
        assert layer.last_rank == b
        assert_compiled_matches_eager(layer, [randn(3, 4, 12, generator=generator).requires_grad_()], generator,
                                      compiled=compiled)
    layer.eval().active_rank = None
    assert_compiled_matches_eager(layer, [randn(5, 12, generator=generator).requires_grad_()], generator,
                                  compiled=compiled)


def test_torch_compile_ordered_dropout_samples_outside_the_graph(generator):
    # Ordered dropout cannot be one graph: the sampled b sets the shapes of the slices, and it
    # is read from the CPU generator (int() of a tensor).  fullgraph=True refuses it; without
    # fullgraph the draw runs eagerly between graphs: the same ranks as eager from the same
    # generator state, the same outputs and gradients.
    layer = random_layer(12, 10, 6, torch.Generator().manual_seed(31), min_rank=2).train()
    x = randn(8, 12, generator=generator)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        compile_fullgraph(layer)(x)
    start = layer.generator.get_state()

    def run(model):
        layer.generator.set_state(start)
        ranks, results = [], []
        for _ in range(6):
            layer.zero_grad()
            model(x).square().sum().backward()
            ranks.append(layer.last_rank)
            results += [p.grad.clone() for p in layer.parameters()]
        return ranks, results

    eager_ranks, eager = run(layer)
    compiled_ranks, compiled = run(torch.compile(layer, backend="aot_eager"))
    assert compiled_ranks == eager_ranks and len(set(eager_ranks)) > 1, eager_ranks
    for want, got in zip(eager, compiled):
        torch.testing.assert_close(got, want, rtol=0, atol=0)



def test_numpy_integer_ranks(generator):
    """An np.int64 rank to forward was refused ("rank must be an int in [0, r]") and an
    np.int64 n_iter to from_linear / convert failed in rsvd: the same results as Python
    ints; a bool rank stays refused."""
    np = pytest.importorskip("numpy")
    layer = random_layer(5, 4, 3, generator).eval()
    x = randn(2, 5, generator=generator)
    assert torch.equal(layer(x, rank=np.int64(2)), layer(x, rank=2))
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, r\] = \[0, 3\]; got True"):
        layer(x, rank=True)
    linear = torch.nn.Linear(5, 4)
    ours = OrderedLowRankLinear.from_linear(linear, np.int64(2), n_iter=np.int64(1), min_rank=np.int64(1),
                                            generator=torch.Generator().manual_seed(1))
    theirs = OrderedLowRankLinear.from_linear(linear, 2, n_iter=1, min_rank=1,
                                              generator=torch.Generator().manual_seed(1))
    assert ours.rank == 2 and torch.equal(ours.U, theirs.U) and torch.equal(ours.V, theirs.V)

# ------------------------------------------------------------------ bad input
def test_bad_input(generator):
    with pytest.raises(ValueError, match=r"OrderedLowRankLinear: rank must be an integer >= 1; got 0"):
        OrderedLowRankLinear(4, 4, 0)
    with pytest.raises(ValueError, match=r"min_rank must be in \[1, rank\] = \[1, 3\]; got 4"):
        OrderedLowRankLinear(4, 4, 3, min_rank=4)
    with pytest.raises(ValueError, match=r"in_features must be an integer >= 1; got 0"):
        OrderedLowRankLinear(0, 4, 3)
    with pytest.raises(TypeError, match=r"generator must be a CPU torch.Generator"):
        OrderedLowRankLinear(4, 4, 3, generator=3)
    layer = random_layer(5, 4, 3, generator)
    with pytest.raises(ValueError, match=r"x has shape \(2, 6\); expected \(..., in_features\) = \(..., 5\)"):
        layer(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, r\] = \[0, 3\]; got 4"):
        layer(torch.randn(2, 5), rank=4)
    layer.active_rank = 7
    with pytest.raises(ValueError, match=r"active_rank must be in \[0, r\] = \[0, 3\]; got 7"):
        layer(torch.randn(2, 5))
    layer.active_rank = None
    for tol in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"shrink_: tol must be >= 0 and finite; got"):
            layer.shrink_(tol)
    with pytest.raises(ValueError, match=r"rank for the layer must be in \[1, 4\] or a fraction in \(0, 1\); got 5"):
        OrderedLowRankLinear.from_linear(torch.nn.Linear(4, 6), 5)
    linear = torch.nn.Linear(4, 6)
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"linear's weight holds 1 non-finite entries"):
        OrderedLowRankLinear.from_linear(linear)
    with pytest.raises(TypeError, match=r"linear must be a torch.nn.Linear; got OrderedLowRankLinear"):
        OrderedLowRankLinear.from_linear(layer)
    with torch.no_grad():
        layer.U[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"1 component norms are not finite"):
        layer.shrink_(0.1)
    with pytest.raises(TypeError, match=r"shrink_: model must be a torch.nn.Module; got list"):
        maestro.shrink_([layer], 0.1)


def test_checkpointed_rank_sampling_with_an_explicit_generator_is_refused():
    """With use_reentrant=True the recomputation sampled another rank from the layer's
    generator (8 in the forward, 4 recomputed): wrong gradients and last_rank, silently.
    The draw inside a backward pass now raises."""
    from torch.utils.checkpoint import checkpoint

    layer = OrderedLowRankLinear(12, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 12, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match="a rank drawn from an explicit generator inside a backward pass"):
        y.sum().backward()
