"""Parameter initialisation shared by the layers."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..linalg import rsvd


def fan_in_bound(fan_in: int) -> float:
    """``1 / sqrt(fan_in)``: the bound of ``kaiming_uniform_(a=sqrt(5))`` (nn.Linear's and
    PEFT's init of lora_A); 0 for no inputs, as torch's own init."""
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def uniform_(tensor: torch.Tensor, bound: float, generator: Optional[torch.Generator]) -> None:
    """Fill ``tensor`` with U(-bound, bound) in place, drawn from ``generator``.

    A generator of another device than the tensor's (a CPU generator seeding a CUDA layer)
    draws on its own device and the values are copied over: the same seed gives the same
    layer on every device.
    """
    _draw_(tensor, generator, lambda t: t.uniform_(-bound, bound, generator=generator))


def normal_(tensor: torch.Tensor, std: float, generator: Optional[torch.Generator]) -> None:
    """Fill ``tensor`` with N(0, std^2) in place, drawn from ``generator`` (devices as :func:`uniform_`)."""
    _draw_(tensor, generator, lambda t: t.normal_(0.0, std, generator=generator))


def _draw_(tensor: torch.Tensor, generator: Optional[torch.Generator], fill) -> None:
    if generator is None or generator.device.type == tensor.device.type:
        fill(tensor)
    else:
        tensor.copy_(fill(torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)))


def generator_on(generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """``generator`` itself when it draws on ``device``'s type (or is None); else a new
    generator on ``device`` seeded from it (rsvd draws its test matrix on its input's
    device), so a CPU generator still makes a CUDA init reproducible."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------- LoRA inits
def parse_lora_init(where: str, init_lora_weights) -> Tuple[object, Optional[int]]:
    """Normalizes PEFT's ``init_lora_weights`` to ``(kind, n_iter)``.

    ``kind`` is True, False, "gaussian", "pissa" or "olora"; ``n_iter`` is the power
    iteration count of ``"pissa_niter_K"`` (None otherwise: exact SVD for "pissa").
    """
    if isinstance(init_lora_weights, bool):
        return init_lora_weights, None
    if isinstance(init_lora_weights, str):
        name = init_lora_weights.lower()
        if name in ("gaussian", "pissa", "olora"):
            return name, None
        prefix = "pissa_niter_"
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return "pissa", int(name[len(prefix):])
    raise ValueError(
        f"{where}: init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K >= 0 power "
        f"iterations) or 'olora'; got {init_lora_weights!r}"
    )


def split_weight(weight: torch.Tensor, r: int, scaling: float, kind: str, n_iter: Optional[int],
                 adapter_dtype: torch.dtype, generator: Optional[torch.Generator]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, residual)`` with ``weight = residual + scaling B A``: PiSSA or OLoRA.

    Parameters
    ----------
    weight : Tensor[out, in]
        float32 or float64 (the effective weight, already widened).
    kind : "pissa" or "olora"
        PiSSA (Meng et al. 2024): ``B A`` is the best rank-r approximation,
        ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``, from an exact SVD
        (``n_iter`` None, as PEFT's "pissa") or :func:`lowrank_ops.linalg.rsvd` with
        ``n_iter`` power iterations (PEFT's "pissa_niter_K", which uses
        ``torch.svd_lowrank`` without oversampling).  OLoRA (Buyukakyuz 2024):
        ``B = Q[:, :r]``, ``A = R[:r]`` from ``weight = Q R``.
    adapter_dtype : torch.dtype
        Of the returned A and B; ``residual`` (weight's dtype) is computed from the rounded
        factors, so ``residual + scaling B A`` reproduces ``weight`` up to its own rounding.

    Returns
    -------
    A : Tensor[r, in], B : Tensor[out, r] (adapter_dtype); residual : Tensor[out, in] (weight's dtype)
    """
    if kind == "olora":
        Q, R = torch.linalg.qr(weight)
        B, A = Q[:, :r], R[:r]
    else:
        if n_iter is None:
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, Vh = rsvd(weight, r, n_iter=n_iter, generator=generator_on(generator, weight.device))
        root = (S / scaling).sqrt()
        B, A = U * root, root[:, None] * Vh
    A, B = A.to(adapter_dtype).contiguous(), B.to(adapter_dtype).contiguous()
    residual = torch.addmm(weight, B.to(weight.dtype), A.to(weight.dtype), alpha=-scaling)
    return A, B, residual
