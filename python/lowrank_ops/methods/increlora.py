"""IncreLoRA (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning"): LoRA modules start with small ranks and, during
training, the modules with the highest importance scores periodically gain ranks, until a
total rank budget is spent.

Capacity is preallocated: every module is a :class:`~lowrank_ops.nn.LoRALinear` built with
``r = r_max`` rank slots, of which the first ``k`` are active (its ``active_rank``, which
:func:`lowrank_ops.ops.lora_linear` reads as ``rank=k``: views of ``A[:k]`` and
``B[:, :k]``, no copy, no work spent on the inactive slots, and the mask is exact: the
inactive slots take no part in the output and get exactly zero gradients).  Adding a rank
is ``k -> k + 1`` on the same parameters, so the optimizer keeps its parameters and state.

Importance: AdaLoRA's smoothed sensitivity on the factors' entries.  (The authors' code
scores a module on its whole update ``dW = B (A * E) s``, ``sum |dW * dL/ddW| /
sqrt(numel)`` smoothed per module, which needs the dense ``[out, in]`` update and its
gradient every step; this scores the entries of ``A`` and ``B`` that training produces
anyway.  The two pick different modules at times: 6 of 40 random toy setups in a review.)
For every adapter entry ``w``, after each backward,

    I = |w * dL/dw|,   Ibar <- beta1 Ibar + (1 - beta1) I,   U <- beta2 U + (1 - beta2) |I - Ibar|,

and the entry's score is ``Ibar * U`` (smoothed sensitivity times its uncertainty).  A
module's score is the mean of its active entries' scores (``A[:k]`` and ``B[:, :k]``): a
mean, not a sum, so that a module is not favored for the ranks it already holds.
Inactive entries have zero gradients, so their averages stay exactly 0 and the sums over
the whole preallocated tensors are the sums over the active entries.

Allocation: at steps ``warmup_steps + j * add_every`` (``j = 1, 2, ...``, up to
``final_step``), the ``ranks_per_step`` modules with the largest scores among those below
``max_rank`` each gain one rank, never beyond ``total_budget`` (ties go to the module
found first in ``model.named_modules()``).  After the budget is spent (or past
``final_step``), the scores are no longer updated and the call costs nothing.

A new rank ``k`` starts as LoRA's initialization of one rank: ``A[k]`` Kaiming-uniform
(``U(-1/sqrt(in), 1/sqrt(in))``, drawn from ``generator``) and ``B[:, k] = 0`` (a gate
entry, if any, 1), so the module's output is unchanged at the moment the rank is added
and its gradient for ``B[:, k]`` is nonzero from the next step on.  (The abstract does not
state the initialization.  The authors' code differs: its reserve ranks sit in the
optimizer from the start with ``E = 1e-5``, so their ``A`` and ``B`` train in advance
("advance learning") and a rank joins pre-trained; here a rank joins fresh, as LoRA's.)
With ``optimizer`` given, its state entries for the new slot (Adam's averages, SGD's
momentum: every state tensor of the parameter's shape) are zeroed, so that a rank starts
fresh even under an optimizer whose weight decay moved the inactive slots.  The scaling
stays ``lora_alpha / r_max`` (the LoRALinear's), whatever the active rank, so adding a
rank never rescales the others.

Example
-------
``model``, ``data``, ``loss_fn`` and ``path`` stand for yours (a toy model and random batches here):

>>> import torch
>>> from lowrank_ops.methods import increlora
>>> from lowrank_ops.nn import LoRALinear
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
>>> data = [(torch.randn(16, 64), torch.randint(0, 32, (16,))) for _ in range(400)]
>>> loss_fn, path = torch.nn.functional.cross_entropy, "increlora.pt"
>>> for name in ("0", "2"):                      # the layers to adapt, r_max = 16 rank slots each
...     model.set_submodule(name, LoRALinear(model.get_submodule(name), r=16, lora_alpha=16))
>>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
>>> allocator = increlora.IncreLoRAAllocator(model, total_budget=12, init_rank=2,
...                                          add_every=50, warmup_steps=100, final_step=300,
...                                          generator=torch.Generator().manual_seed(0), optimizer=optimizer)
>>> for step, (x, y) in enumerate(data):
...     loss_fn(model(x), y).backward()
...     ranks = allocator.update_and_allocate(step)   # after backward, before optimizer.step
...     optimizer.step(); optimizer.zero_grad()
>>> torch.save({"model": model.state_dict(), "allocator": allocator.state_dict()}, path)
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .._args import (generator_state, is_integer, require_generator_state, require_generator_type, require_int,
                     require_number, restore_generator)
from ..nn._init import fan_in_bound, uniform_
from ..nn.lora import LoRALinear
from ..optim.galore import zero_state_slot_
from ._layers import matches

__all__ = ["IncreLoRAAllocator"]

_OP = "IncreLoRAAllocator"


class IncreLoRAAllocator:
    """IncreLoRA's importance scores and rank schedule over a model's LoRALinear modules.

    Parameters
    ----------
    model : nn.Module
        Holding the :class:`~lowrank_ops.nn.LoRALinear` modules to schedule (the model
        itself may be one); each module's ``r`` is its number of preallocated rank slots.
        Not merged.  Each module shared under several names is scheduled once (under its
        first name).
    total_budget : int
        The total number of active ranks over the scheduled modules at the end; in
        ``[n * init_rank, sum of max ranks]`` (``n`` modules).
    init_rank : int
        Every module's active rank at the start, ``>= 1`` (set here: the modules'
        ``active_rank`` becomes ``init_rank``).  The slots past it must hold
        ``lora_B = 0`` (LoRA's default init), so that the model's function is unchanged.
    add_every : int
        Steps between two allocations (``>= 1``).
    max_rank : int, optional
        Per-module cap, ``<= r`` of every module (default: each module's ``r``).
    ranks_per_step : int, optional
        Modules that gain a rank at each allocation (``>= 1``).  Default: with
        ``final_step``, ``ceil((total_budget - n * init_rank) / allocations)`` so that the
        budget is reached by ``final_step`` (if that many modules are below their caps);
        without, 1.
    warmup_steps : int
        Steps before the first allocation (``>= 0``); the first is at
        ``warmup_steps + add_every``.  Scores are updated from step 0 on.
    final_step : int, optional
        No allocation after this step (``> warmup_steps``; default: until the budget is
        spent).
    beta1, beta2 : float
        Smoothing of the sensitivity and of its uncertainty, in ``(0, 1)`` (AdaLoRA's
        defaults 0.85).
    target_modules : sequence of str, optional
        fnmatch patterns of module names (or their last component) to schedule; default
        every LoRALinear.
    generator : torch.Generator, optional
        Draws the new ranks' ``A`` rows (reproducible allocations; its state is part of
        :meth:`state_dict`).  A CPU generator for CUDA adapters draws on the CPU and the
        row is copied over, so a seed gives the same rows on every device.  None: torch's
        global generator (of the adapters' device).
    optimizer : torch.optim.Optimizer, optional
        Its state for a new rank's slots is zeroed when the rank is added (see the module
        docstring).

    Attributes
    ----------
    names : list of str
        The scheduled modules' names, in model order.
    history : list of (int, list of str)
        Every allocation: the step and the modules that gained a rank.

    Notes
    -----
    The averages are kept in float32 (float64 for float64 adapters), one pair per ``A`` and
    ``B``: twice the adapters' memory, as PEFT's AdaLoRA.  A step costs a few fused
    ``torch._foreach`` kernels over all modules and no host synchronization; an allocation
    step reads the ``n`` module scores once.
    """

    def __init__(self, model: torch.nn.Module, total_budget: int, init_rank: int, *, add_every: int,
                 max_rank: Optional[int] = None, ranks_per_step: Optional[int] = None, warmup_steps: int = 0,
                 final_step: Optional[int] = None, beta1: float = 0.85, beta2: float = 0.85,
                 target_modules: Optional[Sequence[str]] = None, generator: Optional[torch.Generator] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{_OP}: model must be a torch.nn.Module; got {type(model).__name__}")
        if isinstance(target_modules, str):
            raise TypeError(f"{_OP}: target_modules must be a sequence of patterns, not a str; got {target_modules!r}")
        modules, seen = [], set()
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear) and id(module) not in seen and matches(name, target_modules):
                seen.add(id(module))
                modules.append((name, module))
        if not modules:
            raise ValueError(f"{_OP}: model has no LoRALinear module"
                             + ("" if target_modules is None else f" matching target_modules={list(target_modules)}"))
        for name, module in modules:
            if module.merged:
                raise RuntimeError(f"{_OP}: module {name!r} is merged into its base weight; unmerge() first")
        self.names: List[str] = [name for name, _ in modules]
        self._modules: List[LoRALinear] = [module for _, module in modules]

        init_rank = require_int(_OP, "init_rank", init_rank, 1)
        smallest = min(module.r for module in self._modules)
        if max_rank is None:
            self.max_ranks = [module.r for module in self._modules]
        else:
            max_rank = require_int(_OP, "max_rank", max_rank, 1)
            if max_rank > smallest:
                where = self.names[[m.r for m in self._modules].index(smallest)]
                raise ValueError(f"{_OP}: max_rank must be <= the rank slots r of every module ({smallest} for "
                                 f"{where!r}); got {max_rank}")
            self.max_ranks = [max_rank] * len(self._modules)
        if init_rank > min(self.max_ranks):
            raise ValueError(f"{_OP}: init_rank must be <= max_rank = {min(self.max_ranks)}; got {init_rank}")
        low, high = init_rank * len(self._modules), sum(self.max_ranks)
        if not is_integer(total_budget) or not low <= total_budget <= high:
            raise ValueError(f"{_OP}: total_budget must be an int in [n * init_rank, sum of max ranks] = "
                             f"[{low}, {high}] ({len(self._modules)} modules); got {total_budget!r}")
        self.total_budget, self.init_rank = int(total_budget), init_rank
        self.add_every = require_int(_OP, "add_every", add_every, 1)
        self.warmup_steps = require_int(_OP, "warmup_steps", warmup_steps, 0)
        if final_step is not None:
            final_step = require_int(_OP, "final_step", final_step, 0)
            if final_step < self.warmup_steps + self.add_every:
                raise ValueError(f"{_OP}: final_step must be >= warmup_steps + add_every = "
                                 f"{self.warmup_steps + self.add_every} (the first allocation); got {final_step}")
        self.final_step = final_step
        if ranks_per_step is None:
            if final_step is None:
                ranks_per_step = 1
            else:
                allocations = (final_step - self.warmup_steps) // self.add_every
                ranks_per_step = max(1, math.ceil((total_budget - low) / allocations))
        self.ranks_per_step = require_int(_OP, "ranks_per_step", ranks_per_step, 1)
        self.beta1 = require_number(_OP, "beta1", beta1, 0.0, 1.0, low_open=True)
        self.beta2 = require_number(_OP, "beta2", beta2, 0.0, 1.0, low_open=True)
        require_generator_type(_OP, "generator", generator)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{_OP}: optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self.generator, self.optimizer = generator, optimizer

        for name, module in modules:
            # The slots past init_rank must not take part in the function now, or
            # truncating to init_rank would change the model (PiSSA / OLoRA / LoRA-GA inits
            # fill every slot; LoRA's default leaves B = 0).
            if bool((module.lora_B.detach()[:, init_rank:] != 0).any()):
                raise ValueError(f"{_OP}: module {name!r} has nonzero lora_B columns past init_rank = {init_rank}; "
                                 f"expected the inactive slots to be zero (LoRA's default init), so that starting "
                                 f"at init_rank leaves the model's function unchanged.  To resume from a "
                                 f"checkpoint, build the allocator on the fresh model first, then load the model's "
                                 f"and the allocator's state dicts")
        self.ranks: List[int] = [init_rank] * len(self._modules)
        for module in self._modules:
            module.active_rank = init_rank
        # One flat list, A then B of each module: the foreach kernels run over all of them at once.
        self._params = [p for module in self._modules for p in (module.lora_A, module.lora_B)]
        self._exp_avg_ipt = [torch.zeros_like(p, dtype=_score_dtype(p)) for p in self._params]
        self._exp_avg_unc = [torch.zeros_like(p, dtype=_score_dtype(p)) for p in self._params]
        self.history: List[Tuple[int, List[str]]] = []
        self.last_step: Optional[int] = None

    # ------------------------------------------------------------------ the schedule
    @property
    def budget_spent(self) -> bool:
        """Whether every rank of ``total_budget`` has been added."""
        return sum(self.ranks) >= self.total_budget

    def is_allocation_step(self, step: int) -> bool:
        """Whether :meth:`update_and_allocate` allocates at ``step`` (before the budget runs out)."""
        past_warmup = step - self.warmup_steps
        return (past_warmup > 0 and past_warmup % self.add_every == 0
                and (self.final_step is None or step <= self.final_step))

    def _active(self, step: int) -> bool:
        """Whether scores still matter at ``step``: budget left and an allocation still to come."""
        return not self.budget_spent and (self.final_step is None or step <= self.final_step)

    def update_and_allocate(self, step: int) -> Dict[str, int]:
        """Updates the importance averages from the current gradients and, at an allocation
        step, adds ranks; call it after ``backward()`` and before ``optimizer.step()``.

        Parameters
        ----------
        step : int
            The training step (``>= 0``), strictly larger than at the previous call (one
            call per optimizer step).

        Returns
        -------
        dict of str to int
            Every scheduled module's active rank after this call (a new dict).

        Notes
        -----
        A module whose ``lora_A`` or ``lora_B`` has no gradient (not used in this step's
        forward) keeps its averages, and so does every entry whose gradient (or product
        with its weight) is not finite (a step that a GradScaler skips): one NaN made the
        module's score NaN for the rest of the run, ranked last at every allocation.
        """
        if not is_integer(step) or step < 0:
            raise ValueError(f"{_OP}.update_and_allocate: step must be an int >= 0; got {step!r}")
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"{_OP}.update_and_allocate: step must increase from call to call (> {self.last_step}, "
                             f"the previous step); got {step}")
        self.last_step = step
        if self._active(step):
            self._update_scores()
            if self.is_allocation_step(step):
                self._allocate(step)
        return dict(zip(self.names, self.ranks))

    @torch.no_grad()
    def _update_scores(self) -> None:
        chosen = [i for i in range(0, len(self._params), 2)
                  if self._params[i].grad is not None and self._params[i + 1].grad is not None]
        index = [j for i in chosen for j in (i, i + 1)]
        if not index:
            return
        params = [self._params[j] for j in index]
        ema, unc = [self._exp_avg_ipt[j] for j in index], [self._exp_avg_unc[j] for j in index]
        dtypes = [e.dtype for e in ema]
        # |w * g| in the averages' dtype (float32 for half adapters: their products underflow).
        ipt = torch._foreach_mul([p.detach().to(d) for p, d in zip(params, dtypes)],
                                 [p.grad.to(d) for p, d in zip(params, dtypes)])
        torch._foreach_abs_(ipt)
        # Entries whose I is not finite keep their averages (selected, not branched on: no
        # host synchronization).
        finite = [torch.isfinite(t) for t in ipt]
        new_ema = torch._foreach_lerp(ema, ipt, 1.0 - self.beta1)  # Ibar <- beta1 Ibar + (1 - beta1) I
        torch._foreach_sub_(ipt, new_ema)
        torch._foreach_abs_(ipt)
        new_unc = torch._foreach_lerp(unc, ipt, 1.0 - self.beta2)  # U <- beta2 U + (1 - beta2) |I - Ibar|
        for average, new, keep in zip(ema + unc, new_ema + new_unc, finite + finite):
            torch.where(keep, new, average, out=average)

    @torch.no_grad()
    def module_scores(self) -> torch.Tensor:
        """Every module's score: the mean of ``Ibar * U`` over its active entries.

        Returns
        -------
        Tensor[n]
            float64 on the CPU, in :attr:`names` order.
        """
        # The product in float64: in float32 it overflowed (inf scores, ties broken by order:
        # the rank went to the first module) for gradients of 1e20, and underflowed to 0 at 1e-30.
        totals = [(self._exp_avg_ipt[j].double() * self._exp_avg_unc[j].double()).sum()
                  for j in range(len(self._params))]
        # One copy to the host (one synchronization on CUDA), not one per tensor; modules
        # spread over several devices are copied one by one.
        if len({t.device for t in totals}) == 1:
            totals = torch.stack(totals).cpu()
        else:
            totals = torch.stack([t.cpu() for t in totals])
        scores = totals.view(-1, 2).sum(1)
        sizes = torch.tensor([k * (m.in_features + m.out_features) for k, m in zip(self.ranks, self._modules)],
                             dtype=torch.float64)
        return scores / sizes

    def _allocate(self, step: int) -> None:
        room = self.total_budget - sum(self.ranks)
        # One host read per allocation; a NaN score (non-finite gradients) ranks last, as
        # NaN would break the sort's comparisons.
        scores = [s if s == s else -math.inf for s in self.module_scores().tolist()]
        candidates = [i for i in range(len(self._modules)) if self.ranks[i] < self.max_ranks[i]]
        candidates.sort(key=lambda i: (-scores[i], i))
        chosen = sorted(candidates[:min(self.ranks_per_step, room)])
        for i in chosen:
            self._add_rank(i)
        if chosen:
            self.history.append((step, [self.names[i] for i in chosen]))

    @torch.no_grad()
    def _add_rank(self, i: int) -> None:
        module, k = self._modules[i], self.ranks[i]
        uniform_(module.lora_A[k], fan_in_bound(module.in_features), self.generator)
        module.lora_B[:, k] = 0.0
        if module.lora_gate is not None:
            module.lora_gate[k] = 1.0
        if self.optimizer is not None:
            for param, slot in ((module.lora_A, (k,)), (module.lora_B, (slice(None), k)),
                                (module.lora_gate, (k,))):
                if param is not None:
                    zero_state_slot_(self.optimizer.state.get(param, {}), param.shape, slot)
        self.ranks[i] = k + 1
        module.active_rank = k + 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The schedule's state: ranks, averages, history, last step, the generator's state.

        Save it beside ``model.state_dict()`` (which holds the adapters' values, not the
        active ranks); :meth:`load_state_dict` on an allocator built with the same settings
        over the same model restores the ranks on the modules.  To resume: build the model
        and the allocator (on the fresh model: its inactive slots must still be zero), then
        load the model's state dict and the allocator's.
        """
        return {
            "names": list(self.names),
            "ranks": list(self.ranks),
            "exp_avg_ipt": [t.clone() for t in self._exp_avg_ipt],
            "exp_avg_unc": [t.clone() for t in self._exp_avg_unc],
            "history": [(step, list(names)) for step, names in self.history],
            "last_step": self.last_step,
            "generator_state": generator_state(self.generator),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s result and sets every module's ``active_rank``.

        The state may come from another device (``torch.load(..., map_location=...)``):
        the averages are copied to the adapters' devices, the generator state to the CPU.

        Raises ValueError when the state was saved for other modules (names), other
        shapes, or holds ranks outside ``[init_rank, max_rank]`` or over the budget.
        """
        op = f"{_OP}.load_state_dict"
        if list(state["names"]) != self.names:
            raise ValueError(f"{op}: the state is for modules {list(state['names'])}; this allocator schedules "
                             f"{self.names}")
        ranks = [int(k) for k in state["ranks"]]
        for name, k, high in zip(self.names, ranks, self.max_ranks):
            if not self.init_rank <= k <= high:
                raise ValueError(f"{op}: rank of {name!r} must be in [init_rank, max_rank] = "
                                 f"[{self.init_rank}, {high}]; got {k}")
        if sum(ranks) > self.total_budget:
            raise ValueError(f"{op}: the ranks sum to {sum(ranks)}, over total_budget = {self.total_budget}")
        for what in ("exp_avg_ipt", "exp_avg_unc"):
            saved = state[what]
            mine = getattr(self, f"_{what}")
            if len(saved) != len(mine) or any(s.shape != m.shape for s, m in zip(saved, mine)):
                raise ValueError(f"{op}: {what} has shapes {[tuple(s.shape) for s in saved]}; expected "
                                 f"{[tuple(m.shape) for m in mine]}")
        # Checked before anything changes (a bad one failed after the averages and ranks were loaded).
        saved_generator = require_generator_state(op, "state['generator_state']", state.get("generator_state"))
        for what in ("exp_avg_ipt", "exp_avg_unc"):
            # copy_ per tensor: the saved averages may be on another device (map_location).
            for mine, saved in zip(getattr(self, f"_{what}"), state[what]):
                mine.copy_(saved)
        self.ranks = ranks
        for module, k in zip(self._modules, ranks):
            module.active_rank = k
        self.history = [(int(step), list(names)) for step, names in state["history"]]
        self.last_step = state["last_step"]
        restore_generator(self.generator, saved_generator)


def _score_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)
