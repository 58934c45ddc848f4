"""Sparse Spectral Training's layer (SST; Zhao et al., "Sparse Spectral Training and
Inference on Euclidean and Hyperbolic Neural Networks", 2024).

The weight is kept in SVD form, ``W = U diag(s) Vh`` with ``U [out, K]``, ``s [K]``,
``Vh [K, in]``, and the layer computes ``y = ((x Vh^T) * s) U^T + b`` as two thin GEMMs.
Training updates every singular value ``s`` at every step, but only a sampled subset of
``r`` singular vector pairs ``(U[:, i], Vh[i])``: the indices are drawn multinomially
without replacement with probabilities proportional to ``|s_i|`` (the significant
directions are updated most often, every direction some of the time), and the gradients
of the other columns of ``U`` and rows of ``Vh`` are exactly zero.  Periodically the
factors are re-orthogonalized by an SVD of the current ``W`` (training moves ``U`` and
``Vh`` off the Stiefel manifold).

Our reading of the abstract (the paper's own schedule is not in the seed): sampling is
done per training step (:meth:`SpectralLinear.resample_`, driven by
:class:`lowrank_ops.methods.sst.SSTScheduler`), re-SVD every ``resvd_every`` steps; the
gradients are the plain gradients of the factorized parametrization, masked (the paper's
"enhanced" singular-vector gradients are not implemented).

Cost per step (``N`` rows of input): forward ``2 N K (in + out)`` flops; backward
``2 N K (in + out)`` for ``dx`` and ``ds``, plus ``2 N r (in + out)`` for the sampled
vectors' gradients instead of ``2 N K (in + out)``: the unsampled columns' weight
gradients are never computed (an autograd composition computes them all, then masks).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._args import require_int, require_values
from .._autocast import autocast_off_backward, without_autocast
from .._finite import all_finite
from .._first_order import first_order_only
from .._signs import normalize_signs
from .._thin_svd import thin_svd
from ..ops._library import composed_path
from ._init import generator_on

__all__ = ["SpectralLinear"]


class _SpectralLinearFn(torch.autograd.Function):
    """``y = ((x Vh^T) * s) U^T + b`` with the gradients of U and Vh restricted to the
    columns / rows ``index`` (all when None).  ``x [N, in]``, ``U [out, K]``, ``s [K]``,
    ``Vh [K, in]``, ``bias [out]`` or None, ``index [r]`` int64 or None."""

    @staticmethod
    def forward(ctx, x, U, s, Vh, bias, index):
        h = x @ Vh.transpose(0, 1)  # [N, K]
        y = (h * s) @ U.transpose(0, 1)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, U, s, Vh, h, index)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @first_order_only
    @autocast_off_backward
    def backward(ctx, g):
        x, U, s, Vh, h, index = ctx.saved_tensors
        need_x, need_U, need_s, need_Vh, need_b, _ = ctx.needs_input_grad
        dx = dU = ds = dVh = db = None
        gU = g @ U  # [N, K]: dL/d(h * s)
        if need_s:
            ds = (gU * h).sum(0)
        gh = gU * s  # dL/dh
        if need_x:
            dx = gh @ Vh
        if need_U:
            if index is None:
                dU = g.transpose(0, 1) @ (h * s)
            else:
                dU = torch.zeros_like(U)
                dU[:, index] = g.transpose(0, 1) @ (h[:, index] * s[index])
        if need_Vh:
            if index is None:
                dVh = gh.transpose(0, 1) @ x
            else:
                dVh = torch.zeros_like(Vh)
                dVh[index] = gh[:, index].transpose(0, 1) @ x
        if need_b and ctx.has_bias:
            db = g.sum(0)
        return dx, dU, ds, dVh, db, None


def spectral_linear(x: torch.Tensor, U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``((x Vh^T) * s) U^T + bias`` for ``x [..., in]``, gradients of ``U`` / ``Vh`` only
    in the columns / rows ``index`` (int64 ``[r]``; all when None), exact elsewhere."""
    op = "spectral_linear"
    K, in_features = Vh.shape
    if U.dim() != 2 or U.shape[1] != K or s.shape != (K,):
        raise ValueError(f"{op}: U has shape {tuple(U.shape)} and s {tuple(s.shape)}; expected (out, K) and (K,) "
                         f"with K = {K} (Vh's rows)")
    if x.dim() == 0 or x.shape[-1] != in_features:  # (0-d: "tuple index out of range" before)
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; expected (..., in_features) = (..., {in_features})")
    if x.dtype != U.dtype:
        raise TypeError(f"{op}: x has dtype {x.dtype}; expected the parameters' dtype {U.dtype}")
    if composed_path():  # torch.func sees through torch ops only: composed, same gradients
        if index is not None:  # U's columns / Vh's rows outside index get no gradient, as the Function's
            sampled = torch.zeros(K, dtype=torch.bool, device=U.device).index_fill_(0, index, True)
            U, Vh = torch.where(sampled, U, U.detach()), torch.where(sampled[:, None], Vh, Vh.detach())
        y = ((x @ Vh.T) * s) @ U.T
        return y if bias is None else y + bias
    y = _SpectralLinearFn.apply(x.reshape(-1, in_features), U, s, Vh, bias, index)
    return y.reshape(*x.shape[:-1], U.shape[0])


class SpectralLinear(torch.nn.Module):
    """A linear layer stored as ``W = U diag(s) Vh`` and trained by Sparse Spectral Training.

    Parameters
    ----------
    in_features, out_features : int
    rank : int, optional
        ``K``, the number of singular triplets kept, ``1 <= K <= min(in, out)``; default
        ``min(in, out)`` (full rank, as SST).
    sample_rank : int, optional
        ``r``, the singular vector pairs updated per step, ``1 <= r <= K``; default ``K``
        (every pair: plain training of the factors).
    bias : bool
    generator : torch.Generator, optional
        Random source of the initial weight (``nn.Linear``'s default distribution,
        ``U(-1/sqrt(in), 1/sqrt(in))``) and of the first sample: same state, same layer.
    device, dtype
        Of the parameters (float32 or float64; the SVD runs in that precision).  The input
        has the parameters' dtype, or is float16 / bfloat16 with float32 parameters (a
        converted half-precision layer: computed in float32, returned in the input's
        dtype); no half-precision parameters (a half-precision ``U`` would lose the
        orthogonality that the re-SVD restores; ``.half()`` keeps them float32), and so no autocast path: under
        ``torch.autocast`` the layer computes in its parameters' precision.

    Attributes
    ----------
    U : Parameter[out, K]
    s : Parameter[K]
    Vh : Parameter[K, in]
    bias : Parameter[out] or None
    sampled : LongTensor[r] (buffer)
        The pairs whose vectors the next backward passes update, ascending.
    """

    def __init__(self, in_features: int, out_features: int, rank: Optional[int] = None,
                 sample_rank: Optional[int] = None, bias: bool = True, *, generator: Optional[torch.Generator] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self._setup("SpectralLinear", in_features, out_features, rank, sample_rank, bias, device, dtype)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """The constructor's initialization: ``U, s, Vh`` the truncated SVD of a weight drawn
        from ``nn.Linear``'s distribution ``U(-1/sqrt(in), 1/sqrt(in))`` (as the bias), then
        the first sample; the same generator state gives the same layer.  Built on meta
        (``device="meta"`` or ``with torch.device("meta")``) the constructor makes the shapes
        only (nothing drawn, no SVD); after ``to_empty()`` this draws them (or
        ``load_state_dict`` loads them)."""
        if self.U.is_meta:  # no values on meta
            return
        bound = 1.0 / math.sqrt(self.in_features)
        # Drawn on the CPU from the generator (of any device), as the layer's deterministic init.
        cpu = dict(dtype=self.U.dtype, device="cpu", generator=generator_on(generator, torch.device("cpu")))
        W = torch.rand(self.out_features, self.in_features, **cpu) * (2 * bound) - bound
        with torch.no_grad():
            self.set_weight_(W.to(self.U.device))
            if self.bias is not None:
                self.bias.copy_(torch.rand(self.out_features, **cpu) * (2 * bound) - bound)
        self.resample_(generator)

    def _setup(self, op: str, in_features, out_features, rank, sample_rank, bias: bool, device,
               dtype: torch.dtype) -> None:
        """Checks the sizes and creates the (uninitialized) parameters and the sample buffer."""
        self.in_features = require_int(op, "in_features", in_features)
        self.out_features = require_int(op, "out_features", out_features)
        smallest = min(self.in_features, self.out_features)
        self.rank = smallest if rank is None else require_int(op, "rank", rank)
        if self.rank > smallest:
            raise ValueError(f"{op}: rank must be in [1, min(in_features, out_features)] = [1, {smallest}]; "
                             f"got {rank}")
        self.sample_rank = self.rank if sample_rank is None else require_int(op, "sample_rank", sample_rank)
        if self.sample_rank > self.rank:
            raise ValueError(f"{op}: sample_rank must be in [1, rank] = [1, {self.rank}]; got {sample_rank}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{op}: dtype must be torch.float32 or torch.float64; got {dtype}")
        options = dict(device=device, dtype=dtype)
        self.U = torch.nn.Parameter(torch.empty(self.out_features, self.rank, **options))
        self.s = torch.nn.Parameter(torch.empty(self.rank, **options))
        self.Vh = torch.nn.Parameter(torch.empty(self.rank, self.in_features, **options))
        self.bias = torch.nn.Parameter(torch.empty(self.out_features, **options)) if bias else None
        self.register_buffer("sampled", torch.arange(self.sample_rank, device=device))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rank: Optional[int] = None, sample_rank: Optional[int] = None, *,
                    generator: Optional[torch.Generator] = None) -> "SpectralLinear":
        """A layer holding the rank-``K`` truncated SVD of ``linear.weight`` (exact when ``K =
        min(in, out)``) and a copy of its bias, on its device, in its dtype (float16 and
        bfloat16 weights give float32 factors); ``generator`` draws the first sample."""
        op = "SpectralLinear.from_linear"
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{op}: linear must be an nn.Linear; got {type(linear).__name__}")
        weight = linear.weight.detach()
        require_values(op, "linear.weight", weight)
        if not all_finite(weight):
            raise ValueError(f"{op}: linear.weight holds NaN or infinite values")
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer._setup(op, linear.in_features, linear.out_features, rank, sample_rank, linear.bias is not None,
                     weight.device, dtype)
        with torch.no_grad():
            layer.set_weight_(weight.to(dtype))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.resample_(generator)
        return layer.train(linear.training)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``to``, ``half``, ``cuda``, ...) with the parameters kept in
        float32 where a cast would make them float16 / bfloat16 (see the class docstring: a
        converted half-precision layer keeps float32 factors).  ``model.half()`` gave half
        factors, which the forward accepted and the first ``resvd_`` (an SSTScheduler's
        periodic re-SVD) failed on."""
        before = {name: (param.data, param.grad) for name, param in self._parameters.items() if param is not None}
        module = super()._apply(fn, recurse)
        for name, param in self._parameters.items():
            if param is not None and param.dtype in (torch.float16, torch.bfloat16):
                data, grad = before[name]
                param.data = data.to(device=param.device, dtype=torch.float32)
                if grad is not None:  # the pre-cast gradient, not its half rounding
                    param.grad = grad.to(device=param.device, dtype=torch.float32)
        return module

    @torch.no_grad()
    def set_weight_(self, W: torch.Tensor) -> torch.Tensor:
        """Sets the factors in place to the rank-``K`` truncated SVD of ``W [out, in]``
        (signs normalized: the largest entry of each column of ``U`` positive) and returns
        the discarded singular values ``[min(in, out) - K]``."""
        if W.shape != (self.out_features, self.in_features):
            raise ValueError(f"set_weight_: W has shape {tuple(W.shape)}; expected (out_features, in_features) = "
                             f"({self.out_features}, {self.in_features})")
        U, S, Vh = thin_svd(W.to(self.U.dtype))
        U, Vh = normalize_signs(U[:, :self.rank], Vh[:self.rank])
        self.U.copy_(U)
        self.s.copy_(S[:self.rank])
        self.Vh.copy_(Vh)
        return S[self.rank:]

    def dense_weight(self) -> torch.Tensor:
        """The dense ``W = U diag(s) Vh [out, in]`` (differentiable)."""
        return (self.U * self.s) @ self.Vh

    @torch.no_grad()
    def resample_(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draws the ``r`` pairs that the next backward passes update: multinomial without
        replacement, probability proportional to ``|s_i|`` (uniform when every ``s_i`` is 0),
        returned sorted ascending and stored in :attr:`sampled`.  ``generator``: a CPU
        generator, or one on the parameters' device (same state, same draw; a CPU generator
        draws the same pairs for CPU and CUDA parameters of the same ``s``, up to ties).

        The draw is ``torch.multinomial``'s own algorithm for sampling without replacement
        (the ``r`` largest ``|s_i| / q_i``, ``q_i ~ Exp(1)``: the same pairs from the same
        generator state), written out so that it costs one host read on CUDA (the
        finiteness check) instead of multinomial's two validity reads, and so that a CPU
        generator's ``q`` goes to the device instead of ``s`` to the host.
        """
        K, r = self.rank, self.sample_rank
        if r == K:
            index = torch.arange(K, device=self.s.device)
        else:
            weights = self.s.detach().abs().double()
            if not all_finite(weights):
                raise ValueError("resample_: the singular values s hold NaN or infinite values")
            # Uniform when every s_i is 0, without a host read.
            weights = torch.where(weights.sum() > 0, weights, torch.ones_like(weights))
            draw_device = weights.device if generator is None else generator.device
            q = torch.empty(K, dtype=torch.float64, device=draw_device).exponential_(generator=generator)
            # A CPU q goes to the device without blocking (torch's blocking host-to-device copy
            # synchronizes the stream after it; from pageable memory the driver stages q first,
            # so freeing it is safe).  Device-to-host stays blocking: the host reads the result.
            q = q.to(weights.device, non_blocking=q.device.type == "cpu")
            index = torch.topk(weights / q, r).indices.sort().values
        self.sampled = index
        return self.sampled

    @torch.no_grad()
    def resvd_(self) -> None:
        """Re-orthogonalizes the factors: ``U, s, Vh`` <- the SVD of the current ``U diag(s)
        Vh`` (the same weight up to rounding; ``s`` nonnegative and descending again).
        Optimizer states of ``U``, ``s`` and ``Vh`` refer to the old basis afterwards (see
        :class:`lowrank_ops.methods.sst.SSTScheduler`, which can clear them)."""
        self.set_weight_(self.dense_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = None if self.sample_rank == self.rank else self.sampled
        # Under torch.autocast the products would run in half precision (4e-3 relative at
        # 256 x 256 in bfloat16) while returning float32: no autocast path (see the class).
        with without_autocast(self.U.device):
            if (isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16)
                    and self.U.dtype == torch.float32):
                # The float32 factors of a half-precision layer (from_linear): computed in
                # float32, returned in x's dtype, as the nn.Linear it replaced returned.
                return spectral_linear(x.float(), self.U, self.s, self.Vh, self.bias, index).to(x.dtype)
            return spectral_linear(x, self.U, self.s, self.Vh, self.bias, index)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"sample_rank={self.sample_rank}, bias={self.bias is not None}")
