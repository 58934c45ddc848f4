"""CholeskyQR2 orthonormalization of tall-skinny blocks (GEMM-rich, no Householder).

``Y = Q R`` from Gram matrices: ``R1 = chol(Y^T Y)``, ``Q1 = Y R1^-1``, repeated once
(Yamamoto et al., "Roundoff error analysis of the CholeskyQR2 algorithm", 2015).  Plain
CholeskyQR2 needs ``cond(Y) < u^-1/2``; with ``shift=True`` a first pass on
``Y^T Y + s I`` with ``s = 11 (m n + n (n + 1)) u ||Y||_F^2`` conditions the block first
(shifted CholeskyQR3, Fukaya et al. 2020).  Measured on 500 x 30 blocks:
``||Q^T Q - I||_max`` stays at 1e-15 up to ``cond(Y) = 1e12`` in float64 (1e-13 at 1e14;
plain CholeskyQR2: 8e-8 at 1e12).  No condition estimate, and so no host
synchronization, is needed to decide.  Cost per pass: ``2 m n^2`` flops (Gram) + ``m
n^2`` (triangular solve).

float32 with ``shift=True``: the shift cannot work in float32 beyond small blocks, since
``11 (m n + n (n + 1)) u`` is 0.2 at 4096 x 74 and 0.37 at 4096 x 138: the shift is about
``||Y||^2`` itself, the shifted pass barely lowers the condition number, and the plain
passes after it fail from ``cond(Y) ~ 1e5`` (4096 x 138: ``||Q^T Q - I||_2`` 0.02 at
1e5, 7 at 1e6, where Q is no basis at all).  So a float32 block's first pass is a plain
pass in float64 instead (``_float64_pass``: Gram matrix, Cholesky factor and solve; Q
rounded to float32): ``||Q^T Q - I||`` about ``u_64 cond(Y)^2`` (2e-5 at cond 1e6) with
``range(Y)`` kept to float32's rounding, which the remaining plain passes, one fewer, in
float32, bring to orthonormal.  Measured (4096 x 138 and 200 x 20, cond 1e2 to 1e7):
``||Q^T Q - I||_2`` 4e-7 to 7e-7 with the default two plain passes (Householder QR: 3e-7
to 9e-7), 1e-8 to 3e-3 with one.  The same flops as the passes it replaces (a float64
pass costs about two float32 ones), and no decision from the data.

On the CPU (float32 and float64 blocks that need no gradient) the whole algorithm is one
call of the kernels of :mod:`lowrank_ops.ops.qr` (``cholesky_qr_``), in place on a copy
of Y: one new ``[m, n]`` buffer per call, none inside rsvd (which hands over its
temporary blocks).  On the 2-core VMs measured, the first touch of a fresh 1.2 MB buffer
costs about what a 4096 x 74 pass costs.  Elsewhere (CUDA, or a Y that needs a gradient)
torch's ops (cuBLAS / MKL; ``cholesky_qr_torch``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._args import is_integer
from .._autocast import without_autocast
from .._finite import all_finite
from ..ops._library import composed_path, values_readable
from ..ops.qr import _MAX_PLAIN_PASSES, cholesky_qr_, cholesky_qr_torch

__all__ = ["cholesky_qr2"]


def _cholesky_qr(Y: torch.Tensor, shift: bool, plain_passes: int, overwrite: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """cholesky_qr2 without the argument checks; ``overwrite``: Y is the caller's temporary,
    which the CPU kernel may overwrite (no new ``[m, n]`` buffer, whose first touch costs
    as much as a pass on the VMs measured)."""
    if Y.dtype in (torch.float16, torch.bfloat16):
        Y, overwrite = Y.float(), True
    if shift and Y.dtype == torch.float32:
        # The shifted pass's role goes to a plain pass in float64 (see the module
        # docstring); the later plain passes, one fewer, in float32.
        with without_autocast(Y.device):
            Q, R = _float64_pass(Y, overwrite)
            if plain_passes <= 1:
                return Q, R
            Q, R_rest = _cholesky_qr(Q, False, plain_passes - 1, overwrite=True)
            return Q, R_rest @ R
    with without_autocast(Y.device):
        if Y.device.type != "cpu" or (Y.requires_grad and torch.is_grad_enabled()) or composed_path():
            return cholesky_qr_torch(Y, shift, plain_passes)
        if not (Y.is_contiguous() or Y.transpose(-2, -1).is_contiguous()):  # e.g. an expand's shared elements
            Y = Y.contiguous()
        elif not overwrite:
            Y = Y.clone()  # in Y's layout
        return Y, cholesky_qr_(Y, shift, plain_passes)


def _float64_pass(Y: torch.Tensor, overwrite: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One plain CholeskyQR pass of a float32 block computed in float64 (Gram matrix,
    Cholesky factor and solve), Q rounded to float32: ``||Q^T Q - I||`` about ``u_64
    cond(Y)^2 + u_32`` and ``range(Y)`` kept to float32's rounding.  Measured (2048 x 70
    and 4096 x 138, cond 1e3 to 1e6): the part of Y outside ``range(Q)`` 2.6e-8 of
    ``||Y||_F`` throughout (Householder QR in float32: 3e-7 to 5e-7), where a float32
    solve with the float64 factor (mixed-precision CholeskyQR, 15 % faster) left ``u_32
    cond(Y)``: 3e-3 at 1e6, weak directions of Y lost before the next product.
    ``(Q, R)``, both float32; Q in Y's storage when ``overwrite``."""
    Q, R = _cholesky_qr(Y.double(), False, 1, overwrite=True)
    return (Y.copy_(Q) if overwrite and not Y.requires_grad else Q.float()), R.float()


def cholesky_qr2(Y: torch.Tensor, *, shift: bool = True, plain_passes: int = 2,
                 check_finite: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall-skinny block by CholeskyQR2.

    Parameters
    ----------
    Y : Tensor[..., m, n]
        ``m >= n``; float32 or float64 (half types are computed in float32).
    shift : bool
        Precede the plain passes by a shifted one (shifted CholeskyQR3), for blocks whose
        condition number may exceed ``u^-1/2``.  For float32 the shifted pass is a plain
        pass in float64 instead, and the plain passes after it one fewer (see the module
        docstring): orthonormal up to ``cond(Y) ~ 1e7``.
    plain_passes : int
        Unshifted passes after the optional shifted one (2: CholeskyQR2).  ``0`` with
        ``shift=True`` spans exactly ``range(Y)`` with a basis whose condition number is
        at most about ``u^-1/2``, not orthonormal: enough between the products of a
        power iteration (float32: the float64 pass alone, as with 1).
    check_finite : bool, optional
        ValueError for NaN or inf in ``Y`` (whose Q and R would be NaN); default True on
        the CPU, False on CUDA (a host synchronization), as :func:`rsvd`'s.

    Returns
    -------
    (Q, R) : Tensor[..., m, n], Tensor[..., n, n]
        ``Q`` with orthonormal columns and upper-triangular ``R`` with ``Y = Q R``, to
        working precision when ``cond(Y)`` is within the limits above, for any finite
        ``Y`` (the Gram matrices are formed from ``Y`` scaled by a power of two, so they
        cannot overflow).  Computed in ``Y``'s precision (float32 for half types) even
        inside ``torch.autocast``, which is turned off here.  Columns of a rank-deficient
        block beyond its rank are not orthonormal; use ``torch.linalg.qr`` there.

    Raises
    ------
    ValueError
        ``Y`` has fewer than 2 dimensions or more columns than rows, or (``check_finite``)
        NaN or infinite entries.
    """
    if not isinstance(Y, torch.Tensor) or Y.dim() < 2:
        raise ValueError(f"cholesky_qr2: Y must be a tensor [..., m, n]; got {getattr(Y, 'shape', type(Y).__name__)}")
    m, n = Y.shape[-2:]
    if n > m:
        raise ValueError(f"cholesky_qr2: Y has shape {tuple(Y.shape)}; expected a tall block with m >= n")
    if not Y.dtype.is_floating_point:
        raise TypeError(f"cholesky_qr2: Y has dtype {Y.dtype}; expected a floating dtype")
    if not is_integer(plain_passes) or not (0 if shift else 1) <= plain_passes <= _MAX_PLAIN_PASSES:
        raise ValueError(f"cholesky_qr2: plain_passes must be an int in [{0 if shift else 1}, {_MAX_PLAIN_PASSES}] "
                         f"with shift={shift}; got {plain_passes!r}")
    if check_finite is None:
        check_finite = Y.device.type == "cpu" and values_readable(Y)
    if check_finite and not all_finite(Y):
        raise ValueError("cholesky_qr2: Y contains NaN or infinite values")
    return _cholesky_qr(Y, shift, int(plain_passes), overwrite=False)
