"""methods.welore: per-matrix ranks from a global threshold on normalized spectra, low-rank
components replaced by B A factors and fine-tuned alone.

Weights are planted: low-rank plus small noise (the rank the threshold must find is the
planted one) and flat random spectra (no low-rank structure: N-LRC)."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from helpers import assert_compiled_matches_eager, randn, with_spectrum
from lowrank_ops.methods import welore
from lowrank_ops.methods.lowrank_compress import LayerCompression

# Device tests build the model on the CPU (cross_device_generator: the same numbers on every
# device), move it, and compare with float64 references computed on the CPU.  float32
# bounds on CUDA assume full float32 GEMMs: TF32 is used only when
# torch.backends.cuda.matmul.allow_tf32 is on (off by default).


def device_generator(device: str, seed: int) -> torch.Generator:
    """rsvd's random source must be a generator of the weights' device."""
    return torch.Generator(device=device).manual_seed(seed)


# Shapes (out, in) of the planted model, by name.
LOW = torch.tensor([5.0, 4.0, 3.0, 2.5], dtype=torch.float64)  # planted rank 4


def planted(m: int, n: int, rank_values: torch.Tensor, generator, noise: float = 1e-3) -> torch.Tensor:
    """A rank-``len(rank_values)`` matrix plus ``noise`` times a Gaussian of spectral norm
    about ``noise (sqrt(m) + sqrt(n))``."""
    return with_spectrum(m, n, rank_values, generator) + noise * torch.randn(m, n, generator=generator,
                                                                               dtype=torch.float64)


def build(generator, dtype=torch.float32) -> torch.nn.Module:
    model = torch.nn.Module()
    specs = {"attn.q_proj": (48, 40, "low"), "attn.k_proj": (48, 40, "low"), "attn.v_proj": (48, 40, "flat"),
             "mlp.up": (96, 40, "low"), "mlp.down": (40, 96, "flat")}
    model.attn, model.mlp = torch.nn.Module(), torch.nn.Module()
    for name, (m, n, kind) in specs.items():
        linear = torch.nn.Linear(n, m, dtype=dtype)
        W = planted(m, n, LOW, generator) if kind == "low" else torch.randn(m, n, generator=generator,
                                                                            dtype=torch.float64) / math.sqrt(n)
        with torch.no_grad():
            linear.weight.copy_(W)
            linear.bias.copy_(torch.randn(m, generator=generator, dtype=torch.float64))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_spectra_match_svdvals(dtype, device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    model = build(generator, dtype)
    # 48 x 40: the batched Jacobi path; 210 x 200 (beyond 64): LAPACK (cuSOLVER on CUDA); two
    # of a shape: one batched call; an empty weight: an empty spectrum.
    for name in ("big", "big2"):
        linear = torch.nn.Linear(200, 210, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(randn(210, 200, generator=generator, dtype=dtype) / 200**0.5)
        setattr(model, name, linear)
    with warnings.catch_warnings():  # torch warns that initializing a zero-element weight is a no-op
        warnings.simplefilter("ignore", UserWarning)
        model.empty = torch.nn.Linear(0, 3, dtype=dtype)
    model.to(device)
    spectra = welore.singular_spectra(model)
    assert list(spectra) == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.up", "mlp.down", "big", "big2", "empty"]
    for name, s in spectra.items():
        W = model.get_submodule(name).weight.detach().double().cpu()
        expected = torch.linalg.svdvals(W)
        assert s.dtype == torch.float64 and s.shape == expected.shape and s.device.type == device
        if not s.numel():
            continue
        s = s.cpu()
        # Backward-stable SVDs: |s_i - s_i'| <= c n eps ||W||_2 (Weyl); c n = 50 * 200 covers both orders.
        eps = torch.finfo(dtype).eps
        assert (s - expected).abs().max().item() <= 1e4 * eps * expected[0].item(), name


def test_threshold_finds_planted_ranks(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    model = build(generator).to(device)
    report = welore.analyze(model, threshold=0.05)
    # Planted: s_4 / s_1 = 0.5, noise / s_1 ~ 1e-3 * 14 / 5 < 0.01: rank exactly 4.
    for name in ("attn.q_proj", "attn.k_proj", "mlp.up"):
        assert report.ranks[name] == 4, (name, report.ranks)
        assert name in report.low_rank_components
    # Flat Gaussian spectra: s_j / s_1 > 0.05 for most j -> high rank, more parameters than W: N-LRC.
    for name in ("attn.v_proj", "mlp.down"):
        assert report.ranks[name] > 25 and name in report.skipped
        assert report.skipped[name].startswith("N-LRC")
    # Nothing changed by analyze; its errors are the exact spectral tails.
    assert all(type(m) is torch.nn.Linear for m in (model.attn.q_proj, model.mlp.down)) and not report.applied
    for name, k in report.ranks.items():
        s = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double().cpu())
        expected = (s[k:].square().sum() / s.square().sum()).sqrt().item()
        assert report.errors[name] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def brute_force_threshold(spectra, shapes, ratio, min_saving=0.0):
    """The smallest candidate tau meeting the budget, by trying every candidate."""
    normalized = {name: (s - s[-1]) / (s[0] - s[-1]) for name, s in spectra.items()}  # the authors' min-max
    total = sum(m * n for m, n in shapes.values())
    for tau in sorted(set(itertools.chain.from_iterable(v.tolist() for v in normalized.values()))):
        count = 0
        for name, v in normalized.items():
            m, n = shapes[name]
            k = int((v >= tau).sum())
            count += k * (m + n) if k * (m + n) < (1 - min_saving) * m * n else m * n
        if count <= ratio * total:
            return tau


@pytest.mark.parametrize("ratio,min_saving", [(0.3, 0.0), (0.6, 0.0), (0.5, 0.4)])
def test_ratio_search_is_the_smallest_threshold(ratio, min_saving, generator):
    shapes = {"a": (30, 20), "b": (20, 20), "c": (40, 10)}
    spectra = {name: torch.linalg.svdvals(randn(m, n, generator=generator, dtype=torch.float64)
                                          * (0.7 ** torch.arange(n, dtype=torch.float64)))
               for name, (m, n) in shapes.items()}
    tau, ranks = welore.choose_ranks(spectra, shapes, ratio=ratio, min_saving=min_saving)
    assert tau == brute_force_threshold(spectra, shapes, ratio, min_saving)
    assert ranks == {name: int(((s - s[-1]) / (s[0] - s[-1]) >= tau).sum()) for name, s in spectra.items()}


def test_rank_ceiling_is_strict_at_exact_boundaries():
    """k (in + out) < (1 - min_saving) in out, strictly: at 42 x 120 and min_saving 0.1,
    k = 28 gives exactly 0.9 in out (28 * 162 = 4536), but the floating-point bound
    0.9 * 5040 / 162 = 28.000000000000004 let it through (an LRC saving exactly 10 %)."""
    assert welore._k_max(42, 120, 0.1) == 27 and welore._k_max(42, 120, 0.0) == 31
    assert welore._k_max(10, 10, 0.0) == 4 and welore._k_max(4096, 4096, 0.5) == 1023
    for m, n, saving in itertools.product((3, 42, 120, 257), (5, 120, 1000), (0.0, 0.1, 0.25, 0.5)):
        k = welore._k_max(m, n, saving)
        bound = (1 - saving) * m * n
        assert k * (m + n) < bound + 1e-9 * bound and (k + 1) * (m + n) >= bound - 1e-9 * bound


def test_choose_ranks_errors():
    spectra, shapes = {"a": torch.tensor([2.0, 1.0])}, {"a": (2, 2)}
    with pytest.raises(ValueError, match="give exactly one of threshold and ratio"):
        welore.choose_ranks(spectra, shapes)
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\]; got 1.5"):
        welore.choose_ranks(spectra, shapes, threshold=1.5)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]; got 0"):
        welore.choose_ranks(spectra, shapes, ratio=0)
    with pytest.raises(ValueError, match=r"min_saving must be a number in \[0, 1\); got 1"):
        welore.choose_ranks(spectra, shapes, threshold=0.5, min_saving=1)
    with pytest.raises(ValueError, match=r"ratio=0.1 is out of reach: .* keeps \d+\.\d% of the parameters"):
        welore.choose_ranks(spectra, shapes, ratio=0.1)  # 2 x 2: no rank compresses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compress_replaces_lrcs_and_freezes_the_rest(dtype, device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    model = build(generator, dtype)
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    x = randn(7, 40, generator=generator, dtype=dtype)
    expected_q = model.attn.q_proj(x).detach()
    model.to(device)
    report = welore.compress(model, threshold=0.05, generator=device_generator(device, 0))
    assert report.applied and report.low_rank_components == ["attn.q_proj", "attn.k_proj", "mlp.up"]
    assert report.ranks["attn.q_proj"] == 4
    for name in report.low_rank_components:
        down, up = model.get_submodule(name)
        assert down.weight.device.type == up.weight.device.type == device
        k = report.ranks[name]
        assert down.weight.shape == (k, weights[name].shape[1]) and up.weight.shape == (weights[name].shape[0], k)
        assert down.weight.requires_grad and up.weight.requires_grad and not up.bias.requires_grad
        U, S, Vh = torch.linalg.svd(weights[name].double(), full_matrices=False)
        B, A = up.weight.detach().double().cpu(), down.weight.detach().double().cpu()
        # Balanced factors: B^T B = A A^T = S_k.
        tol = 1e-10 if dtype == torch.float64 else 1e-4  # float32: ~n eps ||W||; 1e-4 is ~20x that
        torch.testing.assert_close(B.T @ B, torch.diag(S[:k]), rtol=0, atol=tol)
        torch.testing.assert_close(B @ A, (U[:, :k] * S[:k]) @ Vh[:k], rtol=0, atol=tol)
        optimal = (S[k:].square().sum() / S.square().sum()).sqrt().item()
        layer = report.layers[name]
        assert isinstance(layer, LayerCompression) and layer.rank == k
        assert layer.error == pytest.approx(optimal, rel=0.5)  # rsvd's probe estimate: spread <= 18 %
    # N-LRCs stay dense and frozen; only the factors train.
    assert type(model.attn.v_proj) is torch.nn.Linear and not model.attn.v_proj.weight.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.trainable_after == 2 * 4 * (48 + 40) + 4 * (96 + 40)
    assert report.parameters_after == sum(p.numel() for p in model.parameters())
    assert report.ratio < 1
    # The planted layer computes nearly the same function (noise ~ 1e-3 removed).
    torch.testing.assert_close(model.attn.q_proj(x.to(device)).cpu(), expected_q, rtol=0, atol=0.05)
    assert "WeLore: threshold" in str(report)


def test_compress_deterministic(device, cross_device_generator):
    state = cross_device_generator.get_state()
    a, b = build(cross_device_generator).to(device), build(torch.Generator().set_state(state)).to(device)
    # The LRCs (ranks 4 of 40) take the rsvd path, which draws from the generator.
    welore.compress(a, threshold=0.05, generator=device_generator(device, 1))
    welore.compress(b, threshold=0.05, generator=device_generator(device, 1))
    for p, q in zip(a.parameters(), b.parameters()):
        assert p.device.type == device and torch.equal(p, q)


def test_compress_errors(generator):
    with pytest.raises(TypeError, match="model is itself an nn.Linear"):
        welore.compress(torch.nn.Linear(3, 3), threshold=0.5)
    with pytest.raises(ValueError, match=r"no nn.Linear module matches target_modules=\['q'\]"):
        welore.analyze(build(generator), threshold=0.5, target_modules="q")
    bad = build(generator)
    with torch.no_grad():
        bad.mlp.down.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the weight of mlp.down holds NaN or infinite values"):
        welore.compress(bad, threshold=0.5)
    assert type(bad.attn.q_proj) is torch.nn.Linear  # nothing replaced


def test_finetuning_only_lrcs_reduces_the_loss(device, cross_device_generator):
    generator = cross_device_generator  # the same data on every device
    # The compressed model, trained on its own task for a few steps, improves with the LRC
    # factors as the only trainable parameters.
    model = build(generator).to(device)
    welore.compress(model, threshold=0.05, generator=device_generator(device, 2))
    head = model.mlp.up
    x = randn(64, 40, generator=generator, device=device)
    y = randn(64, 96, generator=generator, device=device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = torch.nn.functional.mse_loss(head(x), y).item()
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(head(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.9 * start
    assert model.attn.v_proj.weight.grad is None


def test_generator_of_another_device_is_rejected_before_any_change(cuda_device, generator):
    model = build(generator).to(cuda_device)
    with pytest.raises(ValueError, match=r"compress: generator is a cpu generator; expected a cuda generator for the "
                                         r"weight of attn.q_proj on cuda"):
        welore.compress(model, threshold=0.05, generator=torch.Generator().manual_seed(0))
    assert type(model.attn.q_proj) is torch.nn.Linear and model.attn.q_proj.weight.requires_grad  # nothing changed


class Block(torch.nn.Module):
    """A forward through ``build``'s layers: the three projections of x and the MLP."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        attn, mlp = self.model.attn, self.model.mlp
        return torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.down(torch.tanh(mlp.up(x)))], dim=-1)


def test_torch_compile_compressed_model(generator):
    # WeLore's fine-tuning: after compress(freeze=True) only the low-rank components' factor
    # pairs train; the compiled model's forward and backward give the same output and the
    # same gradients, on those factors only (None for the frozen layers in both).
    model = Block(build(generator))
    report = welore.compress(model.model, threshold=0.05, generator=torch.Generator().manual_seed(0))
    assert report.low_rank_components == ["attn.q_proj", "attn.k_proj", "mlp.up"]
    assert_compiled_matches_eager(model, [randn(6, 40, generator=generator)], generator)


def test_normalization_is_the_authors_min_max():
    """The authors' adaptive_rank_pruning scales each spectrum to (s - s_min) / (s_max - s_min)
    and prunes the values below tau; s / s_1 kept 25 of 32 values of a spectrum falling
    evenly from 1 to 0.5 at tau = 0.6, where theirs keeps 13, so the paper's thresholds
    (0.175 for 50 % on LLaMA-2 7B) did not carry over.  A flat spectrum keeps every value
    (theirs divides by zero)."""
    s = torch.linspace(1.0, 0.5, 32, dtype=torch.float64)
    tau, ranks = welore.choose_ranks({"w": s}, {"w": (32, 32)}, threshold=0.6)
    assert ranks["w"] == int(((s - s.min()) / (s.max() - s.min()) >= 0.6).sum()) == 13
    _, flat = welore.choose_ranks({"w": torch.full((8,), 2.0, dtype=torch.float64)}, {"w": (8, 8)}, threshold=0.9)
    assert flat["w"] == 8
