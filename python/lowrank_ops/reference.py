"""Pure-torch references of the fused ops (sparse, Krylov, optimal transport, M-FAC, LoRA
family), float64-capable; the oracles of the tests and the accuracy baseline of the
benchmarks.  Slow and simple on purpose: dense matrices, plain matmuls, no custom kernels.
"""
from __future__ import annotations

import torch

__all__ = ["fixed_sparse_matmul", "csr_spmm", "csr_sddmm", "csr_rows"]


def csr_rows(row_ptr: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Row index of every entry of a CSR pattern, ``[nnz]`` int64."""
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(n_rows, device=row_ptr.device), counts)


def _dense_from_csr(row_ptr, col_idx, values, n_rows: int, n_cols: int) -> torch.Tensor:
    dense = values.new_zeros((n_rows, n_cols))
    dense.index_put_((csr_rows(row_ptr, n_rows), col_idx.to(torch.int64)), values, accumulate=True)
    return dense


def fixed_sparse_matmul(x: torch.Tensor, values: torch.Tensor, support) -> torch.Tensor:
    """``x @ S^T`` with S densified: x ``[..., in]``, values ``[nnz]`` -> ``[..., out]``."""
    return x @ support.to_dense(values).T


def csr_spmm(row_ptr, col_idx, values, dense, n_rows: int) -> torch.Tensor:
    """Reference of ``torch.ops.lowrank_ops.csr_spmm``: ``dense @ S^T``, S ``[n_rows, dense.shape[1]]``."""
    return dense @ _dense_from_csr(row_ptr, col_idx, values, n_rows, dense.shape[1]).T


def csr_sddmm(row_ptr, col_idx, left, dense) -> torch.Tensor:
    """Reference of ``torch.ops.lowrank_ops.csr_sddmm``: ``(left^T dense)`` at the pattern, ``[nnz]``."""
    full = left.T @ dense
    return full[csr_rows(row_ptr, left.shape[1]), col_idx.to(torch.int64)]


# ---- Krylov ----
__all__ += ["krylov_spmv", "gram_schmidt_pass", "krylov_gram", "krylov_combine"]


def krylov_spmv(row_ptr, col_idx, values, x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Reference of the Krylov SpMV kernel: ``S x`` with S densified, ``[n_rows]``."""
    return _dense_from_csr(row_ptr, col_idx, values, n_rows, x.shape[0]) @ x


def gram_schmidt_pass(basis: torch.Tensor, w: torch.Tensor):
    """Reference of one classical Gram-Schmidt pass: ``(h, w - Q^T h, ||w||^2, ||w - Q^T h||^2)`` with ``h = Q w``."""
    h = basis @ w
    updated = w - basis.T @ h
    return h, updated, torch.dot(w, w), torch.dot(updated, updated)


def krylov_gram(basis: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Reference of the block kernel's gram mode: ``Q W^T``, ``[rows, cols]``."""
    return basis @ other.T


def krylov_combine(basis: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Reference of the block kernel's combine mode: ``C^T Q``, ``[cols, n]``."""
    return coefficients.T @ basis
# ---- optimal transport ----
__all__ += ["krylov_cg"]


def krylov_cg(row_ptr, col_idx, values, inverse_diagonal, x: torch.Tensor, r: torch.Tensor, steps: int,
              target: float, bnorm: float):
    """Reference of the ``krylov_cg_`` op: up to ``steps`` (Jacobi-)preconditioned CG steps from
    ``x`` and its residual ``r``, step for step as the kernel (contract: krylov.h), in the
    inputs' dtype.  Returns ``(x, r, history [taken] float64, taken, status)`` with status 0
    (``||r|| <= target``), 1 (steps exhausted) or 2 (breakdown: ``p . q <= 0``, ``r . z <= 0``
    or a non-finite residual)."""
    A = _dense_from_csr(row_ptr, col_idx, values, r.shape[0], r.shape[0]).to(r.dtype)
    x, r = x.clone(), r.clone()
    d = None if inverse_diagonal is None else inverse_diagonal.to(r.dtype)
    z = r if d is None else d * r
    p = z.clone()
    rho = torch.dot(r, z)
    history = []
    for _ in range(steps):
        q = A @ p
        curvature = torch.dot(p, q)
        if not (curvature > 0 and rho > 0 and torch.isfinite(curvature)):
            return x, r, torch.tensor(history, dtype=torch.float64), len(history), 2
        alpha = rho / curvature
        x = x + alpha * p
        r = r - alpha * q
        z = r if d is None else d * r
        rnorm = float(torch.linalg.vector_norm(r))
        history.append(rnorm / bnorm)
        if not rnorm < float("inf"):
            return x, r, torch.tensor(history, dtype=torch.float64), len(history), 2
        if rnorm <= target:
            return x, r, torch.tensor(history, dtype=torch.float64), len(history), 0
        rho_new = torch.dot(r, z)
        p = z + (rho_new / rho) * p
        rho = rho_new
    return x, r, torch.tensor(history, dtype=torch.float64), len(history), 1


__all__ += ["ot_point_cost", "ot_log_plan", "ot_row_lse", "ot_hessian_matvec"]


def ot_point_cost(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """Cost matrices ``[B, n, m]`` of point clouds x ``[B, n, d]``, y ``[B, m, d]`` (``"sqeuclidean"`` or ``"l1"``)."""
    diff = x.unsqueeze(2) - y.unsqueeze(1)
    return (diff * diff).sum(-1) if cost == "sqeuclidean" else diff.abs().sum(-1)


def ot_log_plan(C: torch.Tensor, f: torch.Tensor, g: torch.Tensor, reg: float) -> torch.Tensor:
    """``(f_i + g_j - C_ij) / reg``, ``[B, n, m]``: the log of the entropic plan."""
    return (f.unsqueeze(2) + g.unsqueeze(1) - C) / reg


def ot_row_lse(C: torch.Tensor, f: torch.Tensor, g: torch.Tensor, reg: float, columns: bool = False):
    """Reference of ``lowrank_ops.ops.ot.row_lse``: (log marginals, P-weighted mean cost per row or column)."""
    s = ot_log_plan(C, f, g, reg)
    dim = 1 if columns else 2
    lse = torch.logsumexp(s, dim)
    mean_cost = (torch.softmax(s, dim) * C).sum(dim)
    return lse, mean_cost


def ot_hessian_matvec(P_sparse: torch.Tensor, r, c, vx, vy):
    """Reference of ``ot_hessian_matvec`` with the kept entries as a dense ``[B, n, m]`` matrix."""
    out_x = r * vx + (P_sparse @ vy.unsqueeze(-1)).squeeze(-1)
    out_y = c * vy + (P_sparse.transpose(1, 2) @ vx.unsqueeze(-1)).squeeze(-1)
    return out_x, out_y
# ---- M-FAC ----
__all__ += ["mfac_dots", "mfac_combine", "mfac_fisher", "mfac_ihvp", "mfac_inverse_diag", "MFACShermanMorrison",
            "MFACInverseTorch"]


def mfac_dots(grads: torch.Tensor, x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Reference of the ``mfac_dots`` op: ``x G_n^T`` (``[k, n_rows]``) in float64."""
    return x.double() @ grads[:n_rows].double().T


def mfac_combine(grads: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, alpha: float, beta: float,
                 n_rows: int) -> torch.Tensor:
    """Reference of the ``mfac_combine`` op: ``alpha x + beta coef G_n`` (``[k, dim]``) in float64."""
    return alpha * x.double() + beta * coef.double() @ grads[:n_rows].double()


def mfac_fisher(G: torch.Tensor, damp: float) -> torch.Tensor:
    """The dense damped empirical Fisher ``damp I + G^T G / m`` ``[d, d]`` (float64), G ``[m, d]``."""
    G = G.to(torch.float64)
    return damp * torch.eye(G.shape[1], dtype=torch.float64, device=G.device) + G.T @ G / G.shape[0]


def mfac_ihvp(G: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """``F^-1 x`` by a dense float64 solve; x ``[d]`` or ``[k, d]``."""
    F = mfac_fisher(G, damp)
    return torch.linalg.solve(F, x.to(torch.float64).unsqueeze(-1)).squeeze(-1)


def mfac_inverse_diag(G: torch.Tensor, damp: float) -> torch.Tensor:
    """Diagonal of the dense ``F^-1`` (float64)."""
    return torch.linalg.inv(mfac_fisher(G, damp)).diagonal()


class MFACShermanMorrison:
    """The M-FAC paper's static algorithm (official ``prun.py: HInvFastBatch``): ``F^-1`` as
    ``m`` Sherman-Morrison rank-1 corrections, ``O(m^2 d)`` to build, two passes per IHVP.

    ``v_i = F_{i-1}^-1 g_i = g_i / damp - sum_{j<i} (v_j . g_i / q_j) v_j``,
    ``q_i = m + g_i . v_i``, and ``F^-1 x = x / damp - sum_i (v_i . x / q_i) v_i``.
    A new gradient in a sliding window changes every ``v_i``: the build is the update cost.
    """

    def __init__(self, G: torch.Tensor, damp: float):
        m = G.shape[0]
        self.damp = damp
        self.V = G / damp  # row i becomes v_i; rows are finished in order
        self.q = G.new_empty(m)
        for i in range(m):
            if i > 0:
                coef = (self.V[:i] @ G[i]) / self.q[:i]
                self.V[i] -= coef @ self.V[:i]
            self.q[i] = m + G[i] @ self.V[i]

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.damp - ((x @ self.V.T) / self.q) @ self.V


class MFACInverseTorch:
    """The same formulas as :class:`lowrank_ops.second_order.MFACInverse` in plain torch ops
    (GEMV for ``G g``, ``index_copy_`` for the ring write, ``addmm`` for ``x - G^T c``,
    Cholesky of the float64 ``K`` recomputed per update): the benchmarks' dense peer."""

    def __init__(self, dim: int, ngrads: int, damp: float, dtype=torch.float32, device=None):
        self.damp, self.ngrads, self.count = damp, ngrads, 0
        self.grads = torch.zeros(ngrads, dim, dtype=dtype, device=device)
        self.gram = torch.zeros(ngrads, ngrads, dtype=torch.float64, device=device)
        self.factor = None

    def update(self, g: torch.Tensor) -> torch.Tensor:
        slot, n = self.count % self.ngrads, min(self.count + 1, self.ngrads)
        self.grads[slot] = g
        dots = self.grads[:n] @ g
        self.gram[slot, :n] = dots
        self.gram[:n, slot] = dots
        self.count += 1
        K = self.gram[:n, :n].clone()
        K.diagonal().add_(n * self.damp)
        self.factor = torch.linalg.cholesky(K)
        return dots

    def _apply(self, x: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
        n = min(self.count, self.ngrads)
        coef = torch.cholesky_solve(dots.to(torch.float64).unsqueeze(-1), self.factor).squeeze(-1).to(x.dtype)
        return torch.addmv(x, self.grads[:n].T, coef, alpha=-1.0) / self.damp

    def update_ihvp(self, g: torch.Tensor) -> torch.Tensor:
        return self._apply(g, self.update(g))

    def ihvp(self, x: torch.Tensor) -> torch.Tensor:
        n = min(self.count, self.ngrads)
        return self._apply(x, self.grads[:n] @ x)
# ---- frozen-weight products (ops/base_linear.py) and SLTrain (ops/sparse_lowrank.py) ----
__all__ += ["base_linear", "base_linear_grad_input", "sparse_lowrank_linear"]


def base_linear(x, weight, bias=None):
    """``x W^T + b`` for x ``[N, in]``, W ``[out, in]``."""
    y = x @ weight.T
    return y if bias is None else y + bias


def base_linear_grad_input(grad_y, weight):
    """``dy W``: the input gradient of :func:`base_linear`."""
    return grad_y @ weight


def sparse_lowrank_linear(x, lora_A, lora_B, values, bias, support, scale):
    """``x (scale B A + S)^T + b`` through a dense float64 weight (S: ``values`` on ``support``)."""
    weight = scale * lora_B.double() @ lora_A.double() + support.to_dense(values.double())
    y = x.double() @ weight.T
    return y if bias is None else y + bias.double()


# ---- LoRA family ----
__all__ += ["lora_linear", "lora_merge", "dora_row_norm", "dora_linear"]


def lora_linear(x, weight, lora_A, lora_B, bias=None, gate=None, *, scale=1.0, rank=None, keep=None, dropout_p=0.0):
    """``x W^T + b + scale ((D(x) A^T) g) B^T`` on the first ``rank`` ranks; ``D(x) = x keep / (1 - p)``."""
    k = lora_A.shape[0] if rank is None else rank
    adapter_input = x if keep is None else x * keep / (1 - dropout_p)
    shrunk = adapter_input @ lora_A[:k].T
    if gate is not None:
        shrunk = shrunk * gate[:k]
    y = x @ weight.T + scale * (shrunk @ lora_B[:, :k].T)
    return y if bias is None else y + bias


def lora_merge(weight, lora_A, lora_B, scale=1.0, gate=None, *, rank=None):
    """``W + scale B[:, :k] diag(g[:k]) A[:k]``."""
    k = lora_A.shape[0] if rank is None else rank
    lora_B = lora_B[:, :k] if gate is None else lora_B[:, :k] * gate[:k]
    return weight + scale * (lora_B @ lora_A[:k])


def dora_row_norm(weight, lora_A, lora_B, scale=1.0):
    """``||W_o + scale B_o A||`` through the dense ``[out, in]`` matrix."""
    return torch.linalg.vector_norm(weight + scale * (lora_B @ lora_A), dim=1)


def dora_linear(x, weight, lora_A, lora_B, magnitude, bias=None, *, scale=1.0, keep=None, dropout_p=0.0, eps=1e-6):
    """PEFT's DoRA with the norm detached: ``x W^T + b + (m / n - 1) D(x) W^T + (m / n) s D(x) (B A)^T``."""
    norm = dora_row_norm(weight, lora_A, lora_B, scale).detach()
    norm = torch.where(norm == 0, eps, norm)  # zero rows only
    adapter_input = x if keep is None else x * keep / (1 - dropout_p)
    factor = magnitude / norm
    y = x @ weight.T + (factor - 1) * (adapter_input @ weight.T) + factor * scale * ((adapter_input @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias
# ---- multi-adapter LoRA ----
__all__ += ["lora_linear_multi"]


def lora_linear_multi(x, weight, A_stack, B_stack, segment_offsets, adapter_ids, *, ranks=None, scales=None,
                      bias=None) -> torch.Tensor:
    """Reference of :func:`lowrank_ops.ops.lora_linear_multi`: a loop of per-segment matmuls.

    Differentiable through plain autograd (the oracle of the gradient tests too).
    """
    n_adapters, r_max = A_stack.shape[:2]
    rows = x.reshape(x.shape[:-1].numel(), weight.shape[1])
    y = torch.nn.functional.linear(rows, weight, bias)
    offsets = [int(v) for v in segment_offsets]
    pieces = []
    for s, adapter in enumerate(int(v) for v in adapter_ids):
        y_s = y[offsets[s]:offsets[s + 1]]
        if adapter >= 0:
            rank = r_max if ranks is None else int(ranks[adapter])
            scale = 1.0 if scales is None else float(scales[adapter])
            x_s = rows[offsets[s]:offsets[s + 1]]
            y_s = y_s + scale * (x_s @ A_stack[adapter, :rank].T) @ B_stack[adapter, :, :rank].T
        pieces.append(y_s)
    y = torch.cat(pieces) if pieces else y
    return y.reshape(*x.shape[:-1], weight.shape[0])
