"""Benchmarks of Perfusion's rank-1 editing (:mod:`lowrank_ops.methods.perfusion`,
ALGORITHMS.md section 8).

Problems: a cross-attention key/value projection ``W [out, in]`` applied to N text tokens
(77 CLIP tokens per prompt: N = 154 for one image with classifier-free guidance, 616 for
four), ``in`` the text encoder's width (768: SD 1.5's
CLIP ViT-L; 2048: SDXL's), ``out`` the attention width (320 / 1280), k concepts.  ``C``
from 4 in random correlated embeddings; every impl of a case uses the same W, C^-1,
concepts and targets.  Inference (no autograd graph).

Op ``rank1_edit`` (the ungated edit, ``y = W' x``, so that forming W' is a valid peer):

* ``ours``: :class:`RankOneEditLinear` with ``gated=False`` (``F.linear`` + ``x P`` +
  one rank-2k ``addmm``; W' never formed);
* ``form_w_prime``: forms ``W' = W + (V* - W I*^T) P^T`` every call (``P`` precomputed,
  as ours) and calls ``F.linear``: what a user merging per call (per prompt, per concept
  set) pays;
* ``merged``: ``F.linear`` with a W' formed once before timing: the floor (a plain linear
  layer), possible only for the ungated edit of fixed concepts;
* ``naive``: the paper's Algorithm 1 as written (and as lucidrains/perfusion-pytorch
  evaluates it): the energy ``x C^-1 i*`` through the full ``C^-1`` per call, ``[N, in]
  x [in, in]``.

Op ``rank1_edit_gated``: the gated edit (the paper's inference path), ``ours`` against
``naive`` (no dense W' reproduces a gate).

Op ``input_covariance``: C and C^-1 from n = 4 in samples: ``ours``
(:func:`input_covariance`: float64 accumulation, Cholesky, ``cholesky_inverse``) against
``torch_inv64`` (the same float64 accumulation, ``torch.linalg.inv``: the ratio is the
inversion's) and ``torch_inv32`` (float32 accumulation and ``torch.linalg.inv``, the
common practice).  Error column: ``max |C^-1 C - I|`` against the float64 moment.

Error column of the edits: ``max|y - y_ref| / max|y_ref|`` against the module docstring's
formula in float64.  Sizes: default as above; ``LOWRANK_OPS_BENCH_FULL=1`` adds batch
32 (N = 2464).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from lowrank_ops.methods.perfusion import RankOneEditLinear, input_covariance

from _harness import DEVICES, FULL, Case, grid_cases, measure, params, rel_error, require_device

FAMILY = "perfusion"
BETA, TAU = 0.75, 0.1

# (tokens N, in, out, concepts k)
_EDITS = [(154, 768, 320, 1), (154, 768, 1280, 1), (616, 768, 320, 1), (616, 768, 1280, 1), (616, 768, 1280, 2),
          (616, 2048, 1280, 1)]
if FULL:
    _EDITS += [(2464, 768, 1280, 1), (2464, 2048, 1280, 1)]
_COVS = [768, 1024, 2048]


def _edit_label(problem) -> str:
    n, in_f, out_f, k = problem
    return f"N={n} {in_f}->{out_f} k={k}"


def _cases():
    return (grid_cases(FAMILY, "rank1_edit", {d: _EDITS for d in DEVICES},
                       {"float32": ("ours", "form_w_prime", "merged", "naive")}, _edit_label)
            + grid_cases(FAMILY, "rank1_edit_gated", {d: _EDITS for d in DEVICES}, {"float32": ("ours", "naive")},
                         _edit_label)
            + grid_cases(FAMILY, "input_covariance", {d: _COVS for d in DEVICES},
                         {"float32": ("ours", "torch_inv64", "torch_inv32")}, lambda d: f"n={4 * d} d={d}"))


def _embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated, non-centered float32 samples (text-encoder-like: C far from identity)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d) + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix + 0.5 * torch.randn(d, generator=g)


@functools.lru_cache(maxsize=2)
def _edit_inputs(problem, device: str):
    n, in_f, out_f, k = problem
    g = torch.Generator().manual_seed(1)
    cov = input_covariance(_embeddings(4 * in_f, in_f, 0))
    layer = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f))
    concepts = torch.randn(k, in_f, generator=g)
    targets = torch.randn(k, out_f, generator=g)
    # Tokens: half random, half near the concepts (energies across the gate's slope).
    x = torch.randn(n, in_f, generator=g)
    x[: n // 2] = concepts[torch.arange(n // 2) % k] * torch.rand(n // 2, 1, generator=g) * 1.5 \
        + 0.1 * x[: n // 2]
    layer = layer.to(device).requires_grad_(False)
    return layer, cov.inv, concepts.to(device), targets.to(device), x.to(device)


def _reference(layer, C_inv, I, V, x, gated: bool) -> torch.Tensor:
    W, C_inv, I, V, x = (t.detach().double().cpu() for t in (layer.weight, C_inv, I, V, x))
    a = torch.linalg.solve(I @ C_inv @ I.T, I @ C_inv @ x.T).T
    g = torch.sigmoid((a - BETA) / TAU) if gated else a
    return (x - a @ I) @ W.T + g @ V


def _naive(layer, C_inv32, I, V, gated: bool):
    """Algorithm 1 composed per call, the energy through the full C^-1 (k = 1 as the paper;
    for k > 1 the joint k x k solve as ours, so the outputs agree)."""
    W = layer.weight
    energy = torch.einsum("ci,ij,cj->c", I, C_inv32, I) if I.shape[0] == 1 else None
    gram = I @ C_inv32 @ I.T

    def run(x):
        sim = (x @ C_inv32) @ I.T  # [N, k]: N in^2 flops
        a = sim / energy if energy is not None else torch.linalg.solve(gram, sim.T).T
        orthogonal = F.linear(x, W) - a @ F.linear(I, W)
        g = torch.sigmoid((a - BETA) / TAU) if gated else a
        return orthogonal + g @ V

    return run


@pytest.mark.parametrize("case", params(_cases()))
def test_perfusion(benchmark, case: Case):
    require_device(case.device)
    if case.op == "input_covariance":
        return _bench_covariance(benchmark, case)
    gated = case.op == "rank1_edit_gated"
    n, in_f, out_f, k = case.problem
    layer, C_inv, I, V, x = _edit_inputs(case.problem, case.device)
    C_inv32 = C_inv.to(device=case.device, dtype=torch.float32)
    expected = _reference(layer, C_inv, I, V, x, gated)

    def build():
        module = RankOneEditLinear(layer, C_inv, I, V, gated=gated, gate_bias=BETA, gate_temperature=TAU)
        if case.impl == "ours":
            return lambda: module(x)
        if case.impl == "naive":
            run = _naive(layer, C_inv32, I, V, gated)
            return lambda: run(x)
        P, W = module.probe, layer.weight
        if case.impl == "merged":
            W_prime = module.merged_weight()
            return lambda: F.linear(x, W_prime)
        if case.impl == "form_w_prime":
            return lambda: F.linear(x, torch.addmm(W, V.T - W @ I.T, P.T))
        raise ValueError(case.impl)

    flops = 2.0 * n * in_f * out_f + 2.0 * n * in_f * k + 4.0 * n * k * out_f
    moved = 4.0 * (n * in_f + in_f * out_f + n * out_f)
    with torch.no_grad():
        measure(benchmark, case, build, lambda y: rel_error([y], [expected]), flops=flops, bytes=moved)


def _bench_covariance(benchmark, case: Case):
    d = case.problem
    X = _embeddings(4 * d, d, 2).to(case.device)
    X64 = X.double()
    moment = X64.T @ X64 / X64.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=case.device)

    def build():
        if case.impl == "ours":
            return lambda: input_covariance(X).inv
        if case.impl == "torch_inv64":
            def run():
                rows = X.double()
                return torch.linalg.inv(rows.T @ rows / rows.shape[0])
            return run
        if case.impl == "torch_inv32":
            return lambda: torch.linalg.inv(X.T @ X / X.shape[0])
        raise ValueError(case.impl)

    def check(inv) -> float:
        return float((inv.double() @ moment - eye).abs().max())

    flops = 2.0 * 4 * d * d * d + d**3  # X^T X, then ~d^3 for factor + inverse
    measure(benchmark, case, build, check, flops=flops, bytes=8.0 * (4 * d * d + 2 * d * d))
