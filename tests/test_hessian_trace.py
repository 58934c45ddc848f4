"""Hutchinson Hessian traces per parameter block (lowrank_ops.second_order.hessian_trace).

Oracles: the exact float64 Hessian of a small model over its flattened parameters
(torch.func.hessian through functional_call), its block traces, and the exact variance of
the per-block Rademacher estimator; for quadratic losses ``w^T H w / 2`` with a known H,
the very probe the generator draws (re-drawn from the same seed) gives the exact sample
``v_j^T (H v)_j``.

Tolerances:
* statistical: an estimate from N probes must lie within K_SE = 5 exact standard errors
  ``sqrt(Var / N)`` of the exact trace, ``Var = 2 (||A||_F^2 - sum_i A_ii^2)`` for the
  symmetrized block form ``A``.  The generators are fixed, so each test is deterministic;
  5 standard errors is a two-sided Gaussian tail of 6e-7 (N >= 1000: the mean is close to
  normal), while a wrong estimator (a missing factor 2, a wrong block, Gaussian probes)
  is off by far more or fails the standard-error check;
* sample standard errors vs the exact ones: relative error of a sample standard
  deviation is about sqrt((kappa - 1) / (4 N)) (kappa the samples' kurtosis, under 10
  here): 0.035 at N = 2000, so 0.2 is over 5 of those;
* rounding: float64 samples against the re-drawn-probe oracle to 1e-12 relative (a few
  hundred terms per dot product: ~1e-14); float32 against the float64 run on the same
  probes to 1e-5 relative to the samples' scale (float32 unit 6e-8, amplified by the
  sums of the double-backward chain of a 2-layer net: measured 8.7e-8, so 1e-5 leaves
  a factor 100 and still fails a float32 path that loses more than ~7 bits).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call, hessian

from lowrank_ops.second_order import HessianTraceResult, hessian_trace

K_SE = 5.0


def mlp(dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model.to(device=device, dtype=dtype)


def data(generator, dtype=torch.float64, device="cpu", n=24):
    x = torch.randn(n, 6, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=generator).to(device)
    return x, y


def exact_hessian(model, x, y):
    """The float64 Hessian of the cross-entropy over all parameters, flattened in order."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    model64 = copy.deepcopy(model).double()
    x64 = x.double()

    def loss(flat):
        chunks = torch.split(flat, sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.nn.functional.cross_entropy(functional_call(model64, params, (x64,)), y)

    flat = torch.cat([p.detach().double().reshape(-1) for _, p in model.named_parameters()])
    return hessian(loss)(flat), names, sizes


def block_variances(H, sizes):
    """Exact variance of the Rademacher sample ``v_j^T (H v)_j`` per block and of the total."""
    out, o = [], 0
    for n in sizes:
        A = torch.zeros_like(H)
        A[o:o + n] = H[o:o + n]
        A = (A + A.T) / 2
        out.append(float(2 * (A.square().sum() - A.diagonal().square().sum())))
        o += n
    total = float(2 * (H.square().sum() - H.diagonal().square().sum()))
    return out, total


def test_mlp_against_exact_hessian(device):
    gen = torch.Generator().manual_seed(11)
    model = mlp(device=device)
    x, y = data(gen, device=device)
    H, names, sizes = exact_hessian(model, x, y)
    H = H.cpu()
    n = 2000
    result = hessian_trace(lambda: torch.nn.functional.cross_entropy(model(x), y), model.named_parameters(),
                           n_probes=n, max_probes=n, generator=torch.Generator().manual_seed(5), batch_probes=50)
    assert isinstance(result, HessianTraceResult)
    assert result.probes == n and result.samples.shape == (n, len(names))
    assert list(result.traces) == names
    variances, total_var = block_variances(H, sizes)
    o = 0
    for name, size, var in zip(names, sizes, variances):
        exact = float(H.diagonal()[o:o + size].sum())
        se = math.sqrt(var / n)
        assert abs(result.traces[name] - exact) <= K_SE * se, (name, result.traces[name], exact, se)
        assert abs(result.std_errors[name] - se) <= 0.2 * se, (name, result.std_errors[name], se)
        assert result.per_parameter_average[name] == pytest.approx(result.traces[name] / size, rel=1e-15)
        o += size
    se = math.sqrt(total_var / n)
    assert abs(result.total - float(H.trace())) <= K_SE * se
    assert abs(result.total_std_error - se) <= 0.2 * se
    # The blocks add up to the total, probe by probe and on average.
    assert sum(result.traces.values()) == pytest.approx(result.total, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(result.samples.sum(1).mean(), torch.tensor(result.total, dtype=torch.float64),
                               rtol=1e-13, atol=0)


def rademacher(seed, dim, count=1):
    """The probes hessian_trace draws from ``torch.Generator().manual_seed(seed)``."""
    bits = torch.randint(0, 2, (count, dim), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    return bits.double() * 2 - 1


def quadratic(H, params):
    """``w^T H w / 2`` for the concatenation ``w`` of ``params``."""
    def loss():
        w = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * w @ (H.to(w.dtype) @ w)
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonal_hessian_exact_with_one_probe(dtype):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 5, generator=gen).to(dtype).requires_grad_(), torch.randn(7, generator=gen).to(dtype).requires_grad_()]
    diag = torch.rand(27, generator=gen, dtype=torch.float64) * 4 - 1  # indefinite
    result = hessian_trace(quadratic(torch.diag(diag), params), params, n_probes=1, max_probes=1,
                           generator=torch.Generator().manual_seed(0))
    # Variance 0: every Rademacher probe gives v_i^2 H_ii = H_ii exactly.  float32: H rounded
    # to float32 and the 27-term sums, well inside 1e-6 relative.
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    assert result.probes == 1 and not result.converged  # one probe: the stopping test never ran
    assert result.traces["0"] == pytest.approx(float(diag[:20].sum()), rel=rtol)
    assert result.traces["1"] == pytest.approx(float(diag[20:].sum()), rel=rtol)
    assert result.total == pytest.approx(float(diag.sum()), rel=rtol)
    assert math.isinf(result.total_std_error)  # one sample: unknown, not 0 or NaN
    # More probes: identical samples, standard error 0, and the test stops at the first check.
    result = hessian_trace(quadratic(torch.diag(diag), params), params, n_probes=3, generator=torch.Generator().manual_seed(0))
    assert result.converged and result.probes == 3
    assert result.total_std_error == 0.0 and result.std_errors == {"0": 0.0, "1": 0.0}


def test_dense_quadratic_samples_match_the_drawn_probes():
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    H = A + A.T
    params = [("a", torch.randn(3, 6, generator=gen, dtype=torch.float64).requires_grad_()),
              ("b", torch.randn(12, generator=gen, dtype=torch.float64).requires_grad_())]
    tensors = [p for _, p in params]
    result = hessian_trace(quadratic(H, tensors), params, n_probes=9, max_probes=9,
                           generator=torch.Generator().manual_seed(21), batch_probes=4)
    V = rademacher(21, 30, 9)
    HV = V @ H  # rows: (H v)^T
    want = torch.stack([(V[:, :18] * HV[:, :18]).sum(1), (V[:, 18:] * HV[:, 18:]).sum(1)], 1)
    torch.testing.assert_close(result.samples, want, rtol=1e-12, atol=1e-12)
    assert result.total == pytest.approx(float(want.sum(1).mean()), rel=1e-12)


def test_unused_and_linear_parameters_get_zero():
    gen = torch.Generator().manual_seed(8)
    A = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    H = A @ A.T
    w = torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    linear = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, generator=gen, dtype=torch.float64)

    def loss():
        return 0.5 * w @ (H @ w) + c @ linear

    for batch in (1, 3):
        result = hessian_trace(loss, [("w", w), ("unused", unused), ("linear", linear)], n_probes=6, max_probes=6,
                               generator=torch.Generator().manual_seed(2), batch_probes=batch)
        assert result.traces["unused"] == 0.0 and result.traces["linear"] == 0.0
        assert result.std_errors["unused"] == 0.0 and result.per_parameter_average["linear"] == 0.0
        V = rademacher(2, 21, 6)[:, :10]
        torch.testing.assert_close(result.samples[:, 0], ((V @ H) * V).sum(1), rtol=1e-12, atol=1e-12)
    # No block reached: zero, converged at the first test.
    result = hessian_trace(lambda: c @ linear, [linear], n_probes=2, generator=torch.Generator().manual_seed(2))
    assert result.total == 0.0 and result.converged and result.probes == 2


def test_batch_size_does_not_change_the_result():
    gen = torch.Generator().manual_seed(12)
    model = mlp(seed=1)
    x, y = data(gen)

    def loss():
        return torch.nn.functional.cross_entropy(model(x), y)

    runs = [hessian_trace(loss, model.named_parameters(), generator=torch.Generator().manual_seed(9), tol=1e-2,
                          batch_probes=b) for b in (1, 4, 7)]
    for other in runs[1:]:
        assert other.probes == runs[0].probes and other.converged == runs[0].converged
        torch.testing.assert_close(other.samples, runs[0].samples, rtol=1e-12, atol=1e-14)
    assert runs[0].converged and 2 <= runs[0].probes < 100


def test_not_converged_is_reported():
    gen = torch.Generator().manual_seed(13)
    model = mlp(seed=2)
    x, y = data(gen)
    result = hessian_trace(lambda: torch.nn.functional.cross_entropy(model(x), y), model.parameters(),
                           n_probes=2, max_probes=5, tol=1e-12, generator=torch.Generator().manual_seed(1))
    assert not result.converged and result.probes == 5 and result.samples.shape[0] == 5


def test_float32_matches_float64_on_the_same_probes():
    gen = torch.Generator().manual_seed(14)
    x64, y = data(gen)
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = mlp(dtype=dtype, seed=3)
        x = x64.to(dtype)
        results[dtype] = hessian_trace(lambda: torch.nn.functional.cross_entropy(model(x), y), model.named_parameters(),
                                       n_probes=40, max_probes=40, generator=torch.Generator().manual_seed(6))
    s32, s64 = results[torch.float32].samples, results[torch.float64].samples
    assert s32.dtype == torch.float64
    scale = float(s64.abs().max())
    assert float((s32 - s64).abs().max()) <= 1e-5 * scale
    assert results[torch.float32].total == pytest.approx(results[torch.float64].total, rel=1e-5)


def test_non_finite_hessian_raises():
    w = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="non-finite"):
        hessian_trace(lambda: w.abs().pow(1.5).sum(), [w], n_probes=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="non-finite loss"):
        hessian_trace(lambda: (w / 0.0).sum(), [w], generator=torch.Generator().manual_seed(0))


def test_bad_input():
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def loss():
        return (w ** 4).sum()

    with pytest.raises(ValueError, match="loss_fn.*scalar.*shape \\(4,\\)"):
        hessian_trace(lambda: w ** 2, [w])
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        hessian_trace(loss(), [w])
    with pytest.raises(ValueError, match="n_probes must be an integer >= 1; got 0"):
        hessian_trace(loss, [w], n_probes=0)
    with pytest.raises(ValueError, match="max_probes must be >= n_probes = 8; got 4"):
        hessian_trace(loss, [w], max_probes=4)
    for tol in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="tol must be > 0"):
            hessian_trace(loss, [w], tol=tol)
    with pytest.raises(ValueError, match="batch_probes must be an integer >= 1"):
        hessian_trace(loss, [w], batch_probes=0)
    with pytest.raises(ValueError, match="params is empty"):
        hessian_trace(loss, [])
    with pytest.raises(ValueError, match="params\\[0\\].*does not require grad"):
        hessian_trace(loss, [w.detach()])
    with pytest.raises(ValueError, match="params\\[1\\].*repeats"):
        hessian_trace(loss, [w, w])
    with pytest.raises(TypeError, match="params\\[0\\] must be a tensor"):
        hessian_trace(loss, [3.0])
    with pytest.raises(TypeError, match="params\\[0\\].*floating-point"):
        hessian_trace(loss, [torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="does not require grad"):
        hessian_trace(lambda: w.detach().sum(), [w])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        hessian_trace(loss, [w], generator=0)


def test_runs_under_no_grad():
    # sum w^4 has the diagonal Hessian 12 w^2: every probe exact; loss_fn's graph is built
    # under enable_grad whatever the caller's mode.
    w = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(15), requires_grad=True)
    with torch.no_grad():
        result = hessian_trace(lambda: (w ** 4).sum(), [w], n_probes=3, max_probes=3, batch_probes=2,
                               generator=torch.Generator().manual_seed(0))
    assert result.total == pytest.approx(float((12 * w.detach() ** 2).sum()), rel=1e-14)


def _adapter_layer(name: str) -> torch.nn.Module:
    from lowrank_ops import nn as lnn

    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10).double()
    layer = {
        "LoRALinear": lambda: lnn.LoRALinear(base, r=3),
        "LoRALinear-DoRA": lambda: lnn.LoRALinear(base, r=3, use_dora=True),
        "SVFitLinear": lambda: lnn.SVFitLinear(base, 3, svd="full"),
        "LoLDULinear": lambda: lnn.LoLDULinear(base, 3),
        "SpectralLinear": lambda: lnn.SpectralLinear(12, 10, sample_rank=2, dtype=torch.float64),
        "NOLALinear": lambda: lnn.NOLALinear(base, 3, 4, 4, seed=0),
        "NOLALinear-uncached": lambda: lnn.NOLALinear(base, 3, 4, 4, seed=0, cache_bases=False),
        "RandLoRALinear": lambda: lnn.RandLoRALinear(base, 3, seed=0),
        "SparseLowRankLinear": lambda: lnn.SparseLowRankLinear(12, 10, 3, 0.2, dtype=torch.float64),
        "MultiLoRALinear": lambda: lnn.MultiLoRALinear(base, 3),
    }[name]()
    if name == "MultiLoRALinear":
        layer.add_adapter("a", 3)
        layer.add_adapter("b", 2)
    with torch.no_grad():  # off the zero / identity inits, where some Hessian blocks vanish
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("name", ["LoRALinear", "LoRALinear-DoRA", "SVFitLinear", "LoLDULinear", "SpectralLinear",
                                  "NOLALinear", "NOLALinear-uncached", "RandLoRALinear", "SparseLowRankLinear",
                                  "MultiLoRALinear"])
def test_the_librarys_own_layers(name):
    """Their fused backward is first-order only: hessian_trace raised "first-order only" on
    every layer of lowrank_ops.nn.  It runs the loss under ops.composite() (torch
    compositions), so its samples are the drawn probes' exact v^T H v."""
    from lowrank_ops.ops import composite

    layer = _adapter_layer(name)
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kwargs = {"adapter_names": ["a"] * 4 + ["b"] * 3 + [None] * 2} if name == "MultiLoRALinear" else {}
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    result = hessian_trace(lambda: torch.tanh(layer(x, **kwargs)).square().mean(), params, n_probes=3, max_probes=3,
                           generator=torch.Generator().manual_seed(5))
    sizes = [p.numel() for _, p in params]

    def loss(flat):
        values = dict(zip([n for n, _ in params], [v.view_as(p) for v, (_, p) in zip(flat.split(sizes), params)]))
        return torch.tanh(torch.func.functional_call(layer, values, (x,), kwargs)).square().mean()

    with composite():
        H = torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for _, p in params]))
    V = rademacher(5, sum(sizes), 3)
    HV = V @ H
    want = torch.stack([(v * hv).sum(1) for v, hv in zip(V.split(sizes, 1), HV.split(sizes, 1))], 1)
    torch.testing.assert_close(result.samples, want, rtol=1e-10, atol=1e-12)


def test_checkpointed_layers():
    """Activation checkpointing recomputes the forward inside the backward passes, which
    must compose as the first forward did: hessian_trace runs whole inside composite()
    (it raised CheckpointError "Recomputed values ... have different metadata")."""
    from torch.utils.checkpoint import checkpoint

    layer = _adapter_layer("LoRALinear")
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    plain = hessian_trace(lambda: torch.tanh(layer(x)).square().mean(), params, n_probes=3, max_probes=3,
                          generator=torch.Generator().manual_seed(5))
    checkpointed = hessian_trace(lambda: torch.tanh(checkpoint(layer, x, use_reentrant=False)).square().mean(), params,
                                 n_probes=3, max_probes=3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(checkpointed.samples, plain.samples, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["LoRALinear", "LoRALinear-DoRA", "SVFitLinear", "LoLDULinear", "SpectralLinear",
                                  "NOLALinear", "NOLALinear-uncached", "RandLoRALinear", "SparseLowRankLinear",
                                  "MultiLoRALinear"])
def test_forward_mode_through_the_librarys_own_layers(name):
    """torch.autograd.forward_ad tangents through every layer (linear in x: the tangent is
    layer(x + v) - layer(x)).  The fused paths dropped them (MultiLoRALinear's small-batch
    kernels: a wrong tangent, silently) or had no jvp (DoRA, uncached NOLA raised)."""
    layer = _adapter_layer(name)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = torch.randn(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kwargs = {"adapter_names": ["a", "b", None, "a", "b"]} if name == "MultiLoRALinear" else {}
    with torch.no_grad():
        expected = layer(x + v, **kwargs) - layer(x, **kwargs)
    with torch.autograd.forward_ad.dual_level():
        y = layer(torch.autograd.forward_ad.make_dual(x, v), **kwargs)
        tangent = torch.autograd.forward_ad.unpack_dual(y).tangent
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-12)
