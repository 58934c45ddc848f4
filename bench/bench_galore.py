"""Benchmarks of the GaLore optimizer step (:class:`lowrank_ops.optim.GaLoreAdamW`).

Op ``step``: one steady-state optimizer step (no projector refresh: ``update_proj_gap``
is set beyond the run, and the refresh happens once before timing) over ``count``
LLaMA-like matrix parameters of one shape, each with a fixed float32 gradient; rank
``r`` projections with galore-torch's defaults (``proj_type="std"``, scale 0.25), eps 1e-6,
no weight decay.  Implementations, on the same weights and gradients in the same run:

* ``ours``: GaLoreAdamW with 32-bit moments (float32, as galore-torch's);
* ``ours_8bit``: :class:`lowrank_ops.optim.GaLoreAdamW8bit` (blockwise 8-bit moments in
  torch ops; its ratio to ``ours`` is the cost of dequantizing and requantizing);
* ``galore_torch``: galore-torch 1.0's ``GaLoreAdamW`` (32-bit; full-SVD refresh);
* ``galore_torch_8bit``: galore-torch's ``GaLoreAdamW8bit`` (bitsandbytes' 8-bit kernels;
  recorded as unsupported where it raises, as on CPU: bitsandbytes' optimizer kernels
  need CUDA);
* ``adamw``: ``torch.optim.AdamW`` on the full matrices (no projection: the state GaLore
  saves, and the step time it saves or costs).

Error column: the parameter's change over ``STEPS`` steps after the refresh (gradients
``G + c_k H`` with fixed random G, H and varying c_k, so the moments change from step to
step), ``max |dW - dW_ref| / max |dW_ref|``, where ``dW_ref`` is the same algorithm with
float64 moments and arithmetic from the same starting weights, with the impl's own
projector (GaLore impls; their projectors differ: rsvd against full SVD) or plain AdamW
in float64 (``adamw``).  It isolates what the state's precision costs: float32
rounding for the 32-bit impls, the 8-bit codes for the 8-bit ones.  Measured on the
first parameter of the case.

Memory: ``extra_info["state_MB"]`` (shown under *notes*) is the optimizer state, every
tensor the optimizer keeps per parameter except the projectors (``r x n`` or ``m x r``
float32 per parameter, the same for every GaLore impl); the ``ours MB`` / ``peer MB``
columns are the peak memory of one step beyond what was live before it
(:func:`_harness.peak_memory_mb`): the 8-bit impl dequantizes one parameter's moments
at a time into float32 temporaries.
"""
from __future__ import annotations

import functools
import warnings
from typing import List

import pytest
import torch

from lowrank_ops.optim import GaLoreAdamW, GaLoreAdamW8bit

from _harness import DEVICES, FULL, MB, Case, measure, params, require_device

FAMILY = "galore"
STEPS = 4
LR, EPS, SCALE, BETAS = 1e-3, 1e-6, 0.25, (0.9, 0.999)
NEVER = 10 ** 9  # update_proj_gap: no refresh after the first step

# (count, m, n, rank): count parameters of shape m x n.
_PROBLEMS = [(2, 4096, 4096, 256), (2, 4096, 11008, 256)] if FULL else [(4, 1024, 1024, 128)]
_IMPLS = ("ours", "ours_8bit", "galore_torch", "galore_torch_8bit", "adamw")


def _cases() -> List[Case]:
    return [
        Case(FAMILY, "step", impl, device, "float32", f"{count}x{m}x{n} r={r}", (count, m, n, r))
        for device in DEVICES for count, m, n, r in _PROBLEMS for impl in _IMPLS
    ]


@functools.lru_cache(maxsize=1)
def _inputs(count: int, m: int, n: int, device: str):
    """Weights and the two gradient matrices G, H per parameter (fixed seed; cached: every
    impl of a case starts from the same ones).  G has a decaying spectrum plus noise, as
    a layer's gradient; H is noise."""
    generator = torch.Generator().manual_seed(0)
    weights, G, H = [], [], []
    for _ in range(count):
        weights.append((torch.randn(m, n, generator=generator) / n ** 0.5).to(device))
        k = 64
        left = torch.randn(m, k, generator=generator) * torch.arange(1, k + 1).reciprocal()
        G.append((left @ torch.randn(k, n, generator=generator) / k ** 0.5
                  + 0.05 * torch.randn(m, n, generator=generator)).to(device))
        H.append((0.5 * torch.randn(m, n, generator=generator)).to(device))
    return weights, G, H


def _coefficients():
    """c_k of the gradients G + c_k H of the error run."""
    return [0.3 * (-1) ** k * (k + 1) for k in range(STEPS)]


def _optimizer(impl: str, parameters, r: int):
    group = {"params": parameters, "rank": r, "update_proj_gap": NEVER, "scale": SCALE, "proj_type": "std"}
    if impl in ("ours", "ours_8bit"):
        cls = GaLoreAdamW8bit if impl == "ours_8bit" else GaLoreAdamW
        return cls([group], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, generator=torch.Generator(
            device=parameters[0].device).manual_seed(1))
    if impl == "adamw":
        return torch.optim.AdamW(parameters, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    try:
        import galore_torch
    except ImportError as error:
        raise RuntimeError(f"galore-torch is not installed ({error})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch's AdamW deprecation notice
        if impl == "galore_torch":
            return galore_torch.GaLoreAdamW([group], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
        return galore_torch.GaLoreAdamW8bit([group], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)


def _projector(impl: str, state):
    """``(side, matrix)`` of a GaLore impl's projector: ``"left"`` (``P [m, r]``, ``P^T G``)
    or ``"right"`` (``P [r, n]``, ``G P^T``)."""
    projector = state["projector"]
    if impl.startswith("ours"):
        return projector.side, projector.matrix
    matrix = projector.ortho_matrix  # galore-torch "std": right [r, n] when m >= n, else left [m, r]
    return ("right" if matrix.shape[0] < matrix.shape[1] else "left"), matrix


def _reference_change(impl: str, W0, grads, projection) -> torch.Tensor:
    """The parameter's change over ``grads`` from ``W0``, in float64 (moments included)."""
    if projection is None:  # plain AdamW
        W = torch.nn.Parameter(W0.double().clone())
        adamw = torch.optim.AdamW([W], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
        for grad in grads:
            W.grad = grad.double()
            adamw.step()
        return W.detach() - W0.double()
    side, P = projection[0], projection[1].double()
    change = torch.zeros_like(W0, dtype=torch.float64)
    exp_avg = exp_avg_sq = 0.0
    for step, grad in enumerate(grads, start=1):
        low = P.T @ grad.double() if side == "left" else grad.double() @ P.T
        exp_avg = BETAS[0] * exp_avg + (1 - BETAS[0]) * low
        exp_avg_sq = BETAS[1] * exp_avg_sq + (1 - BETAS[1]) * low * low
        step_size = LR * (1 - BETAS[1] ** step) ** 0.5 / (1 - BETAS[0] ** step)
        normalized = exp_avg / (exp_avg_sq.sqrt() + EPS)
        back = P @ normalized if side == "left" else normalized @ P
        change -= step_size * SCALE * back
    return change


def _state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for k, v in state.items() if torch.is_tensor(v) and k != "projector")
    return total


@pytest.mark.parametrize("case", params(_cases()))
def test_galore_step(benchmark, case: Case):
    require_device(case.device)
    count, m, n, r = case.problem
    weights, G, H = _inputs(count, m, n, case.device)
    found = {}

    def build():
        parameters = [torch.nn.Parameter(w.clone()) for w in weights]
        try:
            optimizer = _optimizer(case.impl, parameters, r)
            # The error run: STEPS steps with changing gradients on fresh moments.  The
            # first one refreshes the projectors (none after it: update_proj_gap = NEVER).
            W0 = parameters[0].detach().clone()
            grads = [G[0] + c * H[0] for c in _coefficients()]
            for step, grad in enumerate(grads):
                for i, p in enumerate(parameters):
                    p.grad = grad if i == 0 else G[i] + _coefficients()[step] * H[i]
                optimizer.step()
        except AssertionError as error:  # torch's "Torch not compiled with CUDA enabled" (bitsandbytes)
            raise RuntimeError(str(error)) from None
        projection = None if case.impl == "adamw" else _projector(case.impl, optimizer.state[parameters[0]])
        found["change"] = parameters[0].detach() - W0
        found["reference"] = _reference_change(case.impl, W0, grads, projection)
        found["state_MB"] = _state_bytes(optimizer) / MB

        def step():
            for p, grad in zip(parameters, G):
                p.grad = grad  # galore-torch's 8-bit step leaves the projected gradient in p.grad
            optimizer.step()

        return step

    def check(_):
        reference = found["reference"]
        error = (found["change"].double().cpu() - reference.cpu()).abs().max() / reference.abs().max()
        benchmark.extra_info["state_MB"] = found["state_MB"]
        benchmark.extra_info["note"] = f"optimizer state {found['state_MB']:.1f} MB"
        return float(error)

    # One step: GaLore's projection and projection back (2 m n r each) per parameter;
    # compulsory traffic: read the gradient, read and write the weight (float32).
    measure(benchmark, case, build, check, flops=4.0 * m * n * r * count, bytes=12.0 * m * n * count,
            peak_memory=True)
