"""GaLore (Zhao et al., 2024): AdamW on low-rank projections of 2-D gradients.

For a matrix parameter with gradient ``G [m, n]``, every ``update_proj_gap`` steps a
projector ``P`` is refreshed from the top ``rank`` singular vectors of ``G``; the Adam
moments live on the projected gradient (``P^T G`` or ``G P^T``, a ``rank x n`` or
``m x rank`` matrix), and the normalized update is projected back and scaled:
``W -= lr * scale * P N``.  Optimizer state: ``2 rank max(m, n)`` instead of ``2 m n``.

The step follows the reference implementation (galore-torch 1.0) operation for
operation: bias correction folded into the step size, moments kept across refreshes,
decoupled weight decay applied after the update, projection side by shape
(``"std"``: right when ``m >= n``, left otherwise).  The difference is the refresh:
``svd="rsvd"`` (default) computes the projector with :func:`lowrank_ops.linalg.rsvd`,
warm-started from the previous projector, instead of a full ``torch.linalg.svd`` of
``G``; ``svd="full"`` reproduces the reference exactly.  Where the reference stops
training (a non-finite gradient at a refresh step: ``torch.linalg.svd`` raises), the
parameter's step is skipped instead (see :class:`GaLoreAdamW`).

``state_bits=8`` (:class:`GaLoreAdamW8bit`, galore-torch's ``GaLoreAdamW8bit``) keeps the
moments of large tensors as blockwise 8-bit codes (:mod:`._quantized_state`, Dettmers et
al., 2021) in torch ops, so it runs on CPU and CUDA alike (galore-torch's needs
bitsandbytes' CUDA kernels).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from .._args import (is_integer, require_generator_state, require_generator_type, require_int, require_number,
                     restore_generator)
from .._finite import all_finite
from ..linalg.rsvd import check_n_iter, rsvd
from ._checks import add_checked_group, check_lr, current_lr, require_real_params
from ._quantized_state import dequantize_blockwise, quantize_blockwise

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreProjector"]

_PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
_SVD_MODES = ("rsvd", "full")
_STATE_BITS = (32, 8)
# The two moments; 8-bit state keeps "<name>_codes" (uint8) and "<name>_absmax" (float32)
# instead of "<name>", exp_avg on the signed code map, exp_avg_sq on the unsigned one.
# exp_avg_sq is stored as the codes of its square root (see GaLoreAdamW's notes).
_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))
_QUANTIZED_KEYS = tuple(f"{name}_{part}" for name, _ in _MOMENTS for part in ("codes", "absmax"))
# State entries load_state_dict keeps as saved (torch's would cast them to the parameter's
# dtype: uint8 codes to floats, a float16 parameter's float32 moments to float16).
_KEPT_KEYS = _QUANTIZED_KEYS + tuple(name for name, _ in _MOMENTS)


class GaLoreProjector:
    """Projector of one matrix parameter; refreshed every ``update_proj_gap`` steps.

    ``side`` is ``"left"`` (``P [m, rank]``, low-rank gradient ``P^T G [rank, n]``),
    ``"right"`` (``P [rank, n]``, low-rank gradient ``G P^T [m, rank]``) or ``"full"``
    (``P [m, rank]`` and ``Q [rank, n]`` in ``right``, low-rank gradient ``P^T G Q^T
    [rank, rank]``: both sides, galore-torch's ``proj_type="full"``).
    """

    def __init__(self, rank: int, update_proj_gap: int, scale: float, proj_type: str, svd: str,
                 n_iter: Optional[int], oversample: int, generator: Optional[torch.Generator]):
        self.rank, self.update_proj_gap, self.scale = rank, update_proj_gap, scale
        self.proj_type, self.svd, self.n_iter, self.oversample = proj_type, svd, n_iter, oversample
        self.generator = generator
        self.matrix: Optional[torch.Tensor] = None
        self.right: Optional[torch.Tensor] = None  # "full" only: Q [rank, n]
        self.side: Optional[str] = None

    def _side(self, grad: torch.Tensor) -> str:
        tall = grad.shape[0] >= grad.shape[1]
        if self.proj_type == "std":
            return "right" if tall else "left"
        if self.proj_type == "reverse_std":
            return "left" if tall else "right"
        return self.proj_type

    def refresh(self, grad: torch.Tensor) -> bool:
        """Recomputes the projector from ``grad`` (float32 work, stored in grad's dtype).

        Returns False, keeping the current projector (None before the first refresh),
        when ``grad`` has a NaN or inf entry: its SVD is undefined (``torch.linalg.svd``
        raises).  That test reads one value back from the device (once per refresh).
        """
        if not all_finite(grad):
            return False
        side = self._side(grad)
        rank = min(self.rank, *grad.shape)
        right = None
        if self.svd == "full":  # as the reference: one full SVD of G in float32
            U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
            basis = Vh[:rank, :] if side == "right" else U[:, :rank]
            if side == "full":
                right = Vh[:rank, :]
        elif side == "full":  # both singular bases from one rsvd of G, warm-started from the left one
            init = self.matrix.float() if self.matrix is not None and self.side == side else None
            n_iter = "auto" if self.n_iter is None else self.n_iter
            U, _, Vh = rsvd(grad.float(), rank, oversample=self.oversample, n_iter=n_iter, init=init,
                            generator=self.generator, check_finite=False)
            basis, right = U, Vh
        else:
            # Factor G (left) or G^T (right): either way the projector is the top left
            # singular basis of `work`.  Warm start from the previous projector, which
            # spans nearly the same subspace after update_proj_gap steps.
            work = grad.float() if side == "left" else grad.float().T
            init = None
            if self.matrix is not None and self.side == side:
                init = (self.matrix if side == "left" else self.matrix.T).float()
            n_iter = "auto" if self.n_iter is None else self.n_iter
            U = rsvd(work, rank, oversample=self.oversample, n_iter=n_iter, init=init, generator=self.generator,
                     check_finite=False).U
            basis = U if side == "left" else U.T
        self.side = side
        compact = _same_order if self.svd == "full" else torch.Tensor.contiguous
        self.matrix = compact(basis.to(grad.dtype))
        self.right = None if right is None else compact(right.to(grad.dtype))
        return True

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """The low-rank gradient, refreshing the projector first when it is due.

        Parameters
        ----------
        grad : Tensor[m, n]
            The gradient (a higher-dimensional one viewed as ``[shape[0], -1]`` by the
            optimizer), floating point.
        step : int
            The parameter's step count; the projector is recomputed from ``grad`` when
            there is none yet or ``step % update_proj_gap == 0``.

        Returns
        -------
        Tensor[rank', n] or Tensor[m, rank'] or Tensor[rank', rank'] or None
            ``P^T G`` (side ``"left"``), ``G P^T`` (``"right"``) or ``P^T G Q^T`` (``"full"``), with
            ``rank' = min(rank, m, n)``; in grad's dtype (the projector is stored in the
            dtype of the gradient it was computed from), on grad's device.  None when a
            refresh was due and ``grad`` is not finite (see :meth:`refresh`).
        """
        if (self.matrix is None or step % self.update_proj_gap == 0) and not self.refresh(grad):
            return None
        if self.side == "full":
            return (self.matrix.T @ grad) @ self.right.T
        return self.matrix.T @ grad if self.side == "left" else grad @ self.matrix.T

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        """The full-size update ``scale * P N`` (left), ``scale * N P`` (right) or ``scale * P N Q`` (full).

        Parameters
        ----------
        low_rank : Tensor[rank', n] or Tensor[m, rank'] or Tensor[rank', rank']
            A tensor shaped as :meth:`project`'s output (the normalized Adam update).

        Returns
        -------
        Tensor[m, n]
            Projected back with the current projector and multiplied by ``scale``; in the
            promoted dtype of ``low_rank`` and the projector, on their device.
        """
        if self.side == "full":
            full = (self.matrix @ low_rank) @ self.right
        else:
            full = self.matrix @ low_rank if self.side == "left" else low_rank @ self.matrix
        return full * self.scale

    def add_projected_back_(self, target: torch.Tensor, low_rank: torch.Tensor, alpha: float) -> None:
        """``target += alpha * project_back(low_rank)`` as one GEMM accumulating into ``target``.

        No ``[m, n]`` temporary (project_back makes two: the product and its scaled copy)
        and one pass over ``target`` instead of three; the scale rides on ``alpha``.
        Measured (2-core Xeon, float32, 4 parameters of 1024 x 1024 at rank 128, one
        steady-state GaLoreAdamW step): 12.0-12.4 ms through project_back, 10.7-11.3 ms
        fused (galore-torch 12.6-13.3 ms in the same runs).
        ``target`` is the parameter viewed ``[m, n]``; all three tensors share its dtype.
        """
        alpha = alpha * self.scale
        if self.side == "full":
            target.addmm_(self.matrix, low_rank @ self.right, alpha=alpha)
        elif self.side == "left":
            target.addmm_(self.matrix, low_rank, alpha=alpha)
        else:
            target.addmm_(low_rank, self.matrix, alpha=alpha)


def _same_order(basis: torch.Tensor) -> torch.Tensor:
    """A compact copy of a 2-D slice of an SVD factor, in the slice's own element order:
    column-major for LAPACK's column-major U and Vh.  The full-SVD reference mode
    multiplies with the projector in the layout galore-torch keeps (the slice itself), so
    that BLAS takes the same path and gives the same bits: a row-major copy gave other
    roundings in MKL on an AMD EPYC (the same bits on an Intel Xeon)."""
    if basis.dim() == 2 and basis.stride(0) == 1 and basis.shape[1] > 1:
        return basis.T.contiguous().T
    return basis.contiguous()


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose matrix parameters are updated in a low-rank projected space.

    Parameters
    ----------
    params : iterable of tensors or dicts
        Parameter groups.  A group (or these defaults) with ``rank`` set applies GaLore to
        its parameters with at least 2 dimensions (higher-dimensional ones are viewed as
        ``[shape[0], -1]``); others get plain AdamW.  galore-torch style groups
        (``{"params": ..., "rank": 128, "update_proj_gap": 200, "scale": 0.25,
        "proj_type": "std"}``) work unchanged.
    lr, betas, eps, weight_decay, correct_bias
        As ``transformers.AdamW`` / galore-torch (decoupled weight decay, applied after
        the update; bias correction folded into the step size).
    rank : int, optional
        Projection rank (default for groups that do not set it; None: plain AdamW).
    update_proj_gap : int
        Steps between projector refreshes (GaLore: 200).
    scale : float
        GaLore's alpha, multiplying the projected-back update (GaLore: 0.25).
    proj_type : {"std", "reverse_std", "left", "right", "full"}
        Projection side, as galore-torch: ``"std"`` right when ``m >= n`` (left otherwise),
        ``"reverse_std"`` the opposite, ``"left"`` / ``"right"`` fixed, ``"full"`` both
        (``P^T G Q^T``: moments ``rank x rank``).
    svd : {"rsvd", "full"}
        How the projector is refreshed: warm-started randomized SVD (default) or a full
        ``torch.linalg.svd`` (the reference's choice, for comparison).  ``"full"`` is
        galore-torch's reference mode throughout: the update is also applied as galore-torch
        applies it (the full-size ``scale * P N``, then added), so the parameters match it bit
        for bit; with ``"rsvd"`` it is one GEMM accumulating into the parameter
        (:meth:`GaLoreProjector.add_projected_back_`: no ``[m, n]`` temporary, the same
        result up to rounding).
    rsvd_n_iter : int, optional
        Subspace iterations per rsvd refresh (default: 1 when warm, scikit-learn's rule cold).
    rsvd_oversample : int
        Extra columns of the rsvd sketch beyond ``rank`` (default 10).
    generator : torch.Generator, optional
        Makes rsvd refreshes deterministic.  Its state is saved in :meth:`state_dict` and
        restored by :meth:`load_state_dict` (into this optimizer's own generator), so a run
        resumed from a checkpoint draws the same sketches as an uninterrupted one.
    state_bits : {32, 8}
        Precision of the Adam moments.  32: in the gradient's dtype (as galore-torch's
        ``GaLoreAdamW``), but float32 for float16 gradients (float16's range underflows the
        second moment of gradients below 8e-3, and those steps were ~100x too large).
        8: for tensors whose moments have at least ``min_8bit_size`` elements, each moment
        is stored as blockwise 8-bit codes with a float32 scale per 256 values (1.016
        bytes per value instead of 4: the state of a large parameter is 3.9x smaller);
        every step dequantizes them to float32, updates them there and quantizes them
        again.  See :mod:`lowrank_ops.optim._quantized_state` for the code maps and the
        error bound.
    min_8bit_size : int
        With ``state_bits=8``, moments with fewer elements stay in the gradient's dtype
        (default 4096, bitsandbytes' ``min_8bit_size``): biases, norms and small matrices
        are a negligible share of the state, and quantizing them would save little memory
        while adding rounding (and a per-tensor overhead) to the parameters most sensitive
        to it.

    Notes
    -----
    Non-finite gradients.  At a step where a parameter's projector is due for a refresh
    (its first step, then every ``update_proj_gap`` steps), a gradient with a NaN or inf
    entry has no SVD (galore-torch stops with ``torch.linalg.svd``'s error).  Here that
    parameter's step is skipped, as ``torch.amp.GradScaler`` skips a whole step: the
    projector, the Adam moments, the step count and the parameter (weight decay
    included) stay as they were, so the refresh is retried at its next step and the
    run continues exactly as if this step had not happened for it.  Each skip warns
    (``RuntimeWarning``) and increments ``state[p]["skipped_refreshes"]``.  The test
    reads one value back from the device per refresh.  At other steps the gradient is
    not tested (that would synchronize every step): a non-finite one enters the moments
    as it does in ``torch.optim.AdamW`` (8-bit moments: a NaN or inf poisons its block
    of 256 values, not only its element).

    8-bit state.  The state of a quantized moment is two tensors, ``"exp_avg_codes"``
    (uint8, the moment's shape; signed code map) and ``"exp_avg_absmax"`` (float32, one
    per 256 values), likewise ``"exp_avg_sq_codes"`` / ``"exp_avg_sq_absmax"``, which code
    the square root of the second moment (unsigned map).  The root spans half as many
    decades as ``v``: coding ``v`` itself rounds its entries below ``5e-8`` of their
    block's largest to 0, and their next update divides by little more than ``eps``
    (measured, bench_galore's error over 4 GaLore steps against float64 moments: 18 %
    with ``v`` coded, 2 % with its root).  :meth:`state_dict` holds them as they are (no pickled
    classes) and :meth:`load_state_dict` restores them bit for bit (torch's own would
    cast them to the parameter's dtype).  As every group setting, ``state_bits`` comes
    back from the state dict; the format of a parameter's moments follows its group's
    ``state_bits`` at each step, so setting ``group["state_bits"]`` after loading converts
    the moments at the next step (a 32-bit checkpoint continued in 8 bits, or the
    reverse).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        rank: Optional[int] = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        svd: str = "rsvd",
        rsvd_n_iter: Optional[int] = None,
        rsvd_oversample: int = 10,
        generator: Optional[torch.Generator] = None,
        state_bits: int = 32,
        min_8bit_size: int = 4096,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                        rsvd_n_iter=rsvd_n_iter, rsvd_oversample=rsvd_oversample, state_bits=state_bits,
                        min_8bit_size=min_8bit_size)
        require_generator_type("GaLoreAdamW", "generator", generator)
        super().__init__(params, defaults)
        self.generator = generator

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, then the checks of every setting."""
        add_checked_group(self, super().add_param_group, param_group, _check_group)

    # torch's Optimizer.__getstate__ keeps defaults, state and param_groups only: a deep copy
    # or an unpickled GaLoreAdamW had no generator (state_dict() raised AttributeError).  One
    # copy of it is made per deepcopy (its memo), shared again by the copied projectors.
    def __getstate__(self) -> Dict[str, Any]:
        return dict(super().__getstate__(), generator=self.generator)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("generator", None)  # pickled before the generator was kept

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lrs = [current_lr("GaLoreAdamW", group) for group in self.param_groups]  # before any state changes
        for group, lr in zip(self.param_groups, lrs):
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                grad = p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                projected = group["rank"] is not None and p.dim() >= 2 and p.numel() > 0  # empty: nothing to project
                if projected:
                    if "projector" not in state:
                        state["projector"] = GaLoreProjector(
                            group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"], group["svd"],
                            group["rsvd_n_iter"], group["rsvd_oversample"], self.generator,
                        )
                    _follow_group(state["projector"], group, p)
                    grad = state["projector"].project(grad.reshape(grad.shape[0], -1), state["step"])
                    if grad is None:
                        state["skipped_refreshes"] = state.get("skipped_refreshes", 0) + 1
                        warnings.warn(
                            f"GaLoreAdamW: the gradient of a parameter of shape {tuple(p.shape)} has NaN or inf "
                            f"entries at a projector refresh (step {state['step']}); its step is skipped "
                            f"({state['skipped_refreshes']} so far) and the refresh retried at the next step",
                            RuntimeWarning,
                        )
                        continue
                quantized = group["state_bits"] == 8 and grad.numel() >= group["min_8bit_size"]
                exp_avg, exp_avg_sq = _moments(state, grad, quantized)
                work_dtype = grad.dtype
                if exp_avg.dtype != work_dtype:  # float32 work on float32 moments (dequantized, or float16's)
                    grad = grad.float()
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                root = exp_avg_sq.sqrt()
                if quantized:  # the moments as the next step will see them (the root: see the notes)
                    _store_quantized(state, exp_avg, root)
                denom = root.add_(group["eps"])
                step_size = lr
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                update = (exp_avg / denom).to(work_dtype)  # the projector's dtype
                if not projected:
                    p.add_(update, alpha=-step_size)
                elif (group["svd"] != "full" and p.is_contiguous()
                      and update.dtype == p.dtype == state["projector"].matrix.dtype):
                    state["projector"].add_projected_back_(p.view(p.shape[0], -1), update, -step_size)
                else:  # svd="full", galore-torch's reference mode: its operations, so its bits
                    p.add_(state["projector"].project_back(update).reshape(p.shape), alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-lr * group["weight_decay"])
        return loss

    def state_dict(self):
        # Projectors are plain objects: store their matrices as tensors so the state
        # dict is torch.save-able and loadable without pickling our classes.
        state = super().state_dict()
        # The packed entries are the live state dicts: copy before editing.
        state["state"] = {key: dict(entry) for key, entry in state["state"].items()}
        for entry in state["state"].values():
            projector = entry.pop("projector", None)
            if projector is not None:
                entry["projector_matrix"] = projector.matrix
                entry["projector_rank"] = projector.rank  # the moments' subspace, whatever the group says now
                entry["projector_type"] = _PROJ_TYPES.index(projector.proj_type)  # an int: see projector_left
                # A bool, not the side string: Optimizer.load_state_dict rebuilds
                # iterables element by element and would mangle a str.
                entry["projector_left"] = projector.side == "left"
                if projector.right is not None:  # side "full"
                    entry["projector_right_matrix"] = projector.right
        if self.generator is not None:  # so that a resumed run draws the same rsvd sketches
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        saved_generator = require_generator_state(  # absent: saved without a generator
            "GaLoreAdamW.load_state_dict", "state_dict['generator_state']", state_dict.pop("generator_state", None))
        # torch casts every floating-point state tensor to its parameter's dtype and would
        # turn the uint8 codes into floats (and round the float32 absmax of a bfloat16
        # parameter): set them aside and put them back, on the parameter's device, as saved.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, params))
        if len(saved_ids) == len(params):  # (else the base class refuses the groups, naming them)
            for key, entry in state_dict["state"].items():
                if key in by_id:
                    _check_saved_shapes(entry, by_id[key], key)
        kept = {}
        entries = dict(state_dict["state"])
        for key, entry in entries.items():
            if any(name in entry for name in _KEPT_KEYS):
                entries[key] = {k: v for k, v in entry.items() if k not in _KEPT_KEYS}
                kept[key] = {k: entry[k] for k in _KEPT_KEYS if k in entry}
        super().load_state_dict(dict(state_dict, state=entries))
        restore_generator(self.generator, saved_generator)
        for key, tensors in kept.items():
            p = by_id[key]
            self.state[p].update({k: v.to(p.device) for k, v in tensors.items()})
        for group in self.param_groups:
            # torch restores the saved groups' settings; a state dict saved before a setting
            # existed (state_bits, min_8bit_size) lacks it: this optimizer's default applies.
            for name, default in self.defaults.items():
                group.setdefault(name, default)
            for p in group["params"]:
                entry = self.state.get(p, {})
                if "projector_matrix" in entry:
                    projector = GaLoreProjector(
                        group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"], group["svd"],
                        group["rsvd_n_iter"], group["rsvd_oversample"], self.generator,
                    )
                    projector.matrix = entry.pop("projector_matrix")
                    if "projector_rank" in entry:  # absent from state dicts saved before it was kept
                        projector.rank = int(entry.pop("projector_rank"))
                        projector.proj_type = _PROJ_TYPES[int(entry.pop("projector_type"))]
                    projector.side = "left" if entry.pop("projector_left") else "right"
                    if "projector_right_matrix" in entry:
                        projector.right = entry.pop("projector_right_matrix")
                        projector.side = "full"
                    entry["projector"] = projector


def _check_saved_shapes(entry: Dict[str, Any], param: torch.Tensor, key) -> None:
    """A saved state entry whose projector or moments do not fit ``param`` (the state of
    another model) loaded silently and failed at the step, inside rsvd ("init has shape
    (32, 4); expected [..., m, j] = (40,) + (j,)"): refused at the load, naming both."""
    m = param.shape[0] if param.dim() else 1
    n = param.numel() // max(m, 1)
    matrix, right = entry.get("projector_matrix"), entry.get("projector_right_matrix")
    moments = [entry[name] for name in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes")
               if isinstance(entry.get(name), torch.Tensor)]  # (8-bit codes have the moment's shape)
    if isinstance(matrix, torch.Tensor):  # projected: left [m, r], moments [r, n]; right [r, n], [m, r]; full both
        if isinstance(right, torch.Tensor):
            fits, moment_shape = matrix.shape[0] == m and right.shape[-1] == n, (matrix.shape[-1], right.shape[0])
        elif entry.get("projector_left", True):
            fits, moment_shape = matrix.shape[0] == m, (matrix.shape[-1], n)
        else:
            fits, moment_shape = matrix.shape[-1] == n, (m, matrix.shape[0])
        what = f"a projector of shape {tuple(matrix.shape)}"
        if isinstance(right, torch.Tensor):
            what += f" and {tuple(right.shape)}"
    else:  # moments of the parameter's own shape
        fits, moment_shape, what = True, tuple(param.shape), "no projector"
    wrong = [tuple(moment.shape) for moment in moments if tuple(moment.shape) != tuple(moment_shape)]
    if not fits or wrong:
        raise ValueError(f"GaLoreAdamW.load_state_dict: state {key} ({what}, moments of shape "
                         f"{wrong[0] if wrong else tuple(moment_shape)}) does not fit the parameter of shape "
                         f"{tuple(param.shape)} (the state of another model?)")


def _follow_group(projector: GaLoreProjector, group: Dict[str, Any], param: torch.Tensor) -> None:
    """The group's current settings for this step: ``scale``, ``update_proj_gap``, ``svd`` and
    the rsvd settings may change between steps (a schedule, or a resumed run's saved
    groups); ``rank`` and ``proj_type`` are fixed once the projector exists, as the moments
    live in its subspace: a change raises rather than being ignored."""
    for name, current in (("rank", projector.rank), ("proj_type", projector.proj_type)):
        if group[name] != current:
            raise ValueError(
                f"GaLoreAdamW: the group's {name} changed to {group[name]!r}, but the parameter of shape "
                f"{tuple(param.shape)} has moments in the subspace of {name}={current!r}; {name} cannot change "
                f"after a parameter's first step (start a new optimizer, or put the parameter in a new group)")
    projector.update_proj_gap, projector.scale, projector.svd = group["update_proj_gap"], group["scale"], group["svd"]
    projector.n_iter, projector.oversample = group["rsvd_n_iter"], group["rsvd_oversample"]


def _moments(state: Dict[str, Any], grad: torch.Tensor, quantized: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The moments for this step: float32 dequantized copies (``quantized``) or the stored
    tensors themselves (updated in place; :func:`_moment_dtype`), created as zeros on the
    first step.  A moment stored in the other format (a state dict saved with other
    ``state_bits``) or dtype is converted."""
    dtype = torch.float32 if quantized else _moment_dtype(grad.dtype)
    moments = []
    for name, signed in _MOMENTS:
        if f"{name}_codes" in state:
            codes, absmax = state.pop(f"{name}_codes"), state.pop(f"{name}_absmax")
            moment = dequantize_blockwise(codes, absmax, signed)
            if not signed:  # the second moment's codes hold its square root
                moment.square_()
            if not quantized:
                moment = state[name] = moment.to(dtype)
        elif name in state:
            moment = state.pop(name).float() if quantized else state[name]
            if not quantized and moment.dtype != dtype:
                moment = state[name] = moment.to(dtype)
        else:
            moment = torch.zeros_like(grad, dtype=dtype)
            if not quantized:
                state[name] = moment
        moments.append(moment)
    return moments[0], moments[1]


def _moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of unquantized moments: the gradient's (as galore-torch's), but float32 for
    float16, whose range cannot hold the second moment: ``(1 - beta2) g^2`` underflows to 0
    for ``|g| < 8e-3``, and the step becomes ``m / eps`` (~100x too large; measured on a
    128 x 96 least-squares layer, 1509 of 2048 entries zero after one step)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _store_quantized(state: Dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq_root: torch.Tensor) -> None:
    for (name, signed), moment in zip(_MOMENTS, (exp_avg, exp_avg_sq_root)):
        state[f"{name}_codes"], state[f"{name}_absmax"] = quantize_blockwise(moment, signed)


def zero_state_slot_(state: Dict[str, Any], shape: torch.Size, slot) -> None:
    """Zeroes entry ``slot`` (an index into a parameter of ``shape``) of every moment an
    optimizer keeps for it, in ``state``: float tensors of that shape, and this module's
    8-bit moments (dequantized, zeroed, requantized: code 0 decodes to ``-absmax``, so
    zeroing the codes had set the first moment to ``-absmax``).  For callers that grow a
    parameter in place (:mod:`lowrank_ops.methods.increlora`)."""
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == shape:
            value[slot] = 0
    for name, signed in _MOMENTS:
        codes = state.get(f"{name}_codes")
        if isinstance(codes, torch.Tensor) and codes.shape == shape:
            moment = dequantize_blockwise(codes, state[f"{name}_absmax"], signed)
            moment[slot] = 0
            state[f"{name}_codes"], state[f"{name}_absmax"] = quantize_blockwise(moment, signed)


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` with ``state_bits=8`` by default: galore-torch's ``GaLoreAdamW8bit``
    (the GaLore paper's 8-bit setting), without bitsandbytes and on CPU as well as CUDA.

    Same parameters as :class:`GaLoreAdamW`, with galore-torch's 8-bit defaults (those of
    bitsandbytes' AdamW8bit): ``eps=1e-8``, ``weight_decay=0.01`` (``GaLoreAdamW``'s are
    ``1e-6`` and ``0``: a drop-in swap changed both, silently).  A group may still set
    ``state_bits=32``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, correct_bias: bool = True, *, state_bits: int = 8,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, state_bits=state_bits, **kwargs)


def _check_group(group) -> None:
    where = "GaLoreAdamW"
    group["lr"] = check_lr(where, group["lr"])
    for name in ("eps", "weight_decay", "scale"):
        group[name] = require_number(where, name, group[name], 0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1); got {betas!r}")
    group["betas"] = tuple(require_number(where, "betas", b, 0.0, 1.0) for b in betas)
    rank = group["rank"]
    if rank is not None and (not is_integer(rank) or rank < 1):
        raise ValueError(f"{where}: rank must be an int >= 1 or None; got {rank!r}")
    group["rank"] = None if rank is None else int(rank)
    gap = group["update_proj_gap"]
    if not is_integer(gap) or gap < 1:
        raise ValueError(f"{where}: update_proj_gap must be an int >= 1; got {gap!r}")
    group["update_proj_gap"] = int(gap)
    if group["rsvd_n_iter"] is not None:
        check_n_iter(where, "rsvd_n_iter", group["rsvd_n_iter"], auto=False)
        group["rsvd_n_iter"] = int(group["rsvd_n_iter"])
    group["rsvd_oversample"] = require_int(where, "rsvd_oversample", group["rsvd_oversample"], 0)
    require_real_params(where, group)
    if group["proj_type"] not in _PROJ_TYPES:
        raise ValueError(f"{where}: proj_type must be one of {_PROJ_TYPES}; got {group['proj_type']!r}")
    if group["svd"] not in _SVD_MODES:
        raise ValueError(f"{where}: svd must be one of {_SVD_MODES}; got {group['svd']!r}")
    if isinstance(group["state_bits"], bool) or group["state_bits"] not in _STATE_BITS:
        raise ValueError(f"{where}: state_bits must be one of {_STATE_BITS}; got {group['state_bits']!r}")
    group["state_bits"] = int(group["state_bits"])
    size = group["min_8bit_size"]
    if not is_integer(size) or size < 0:
        raise ValueError(f"{where}: min_8bit_size must be an int >= 0; got {size!r}")
    group["min_8bit_size"] = int(size)
