"""A process-wide count of optimizer steps, for caches of values derived from parameters.

The PEFT backend's adapter stacks and LoRALinear's eval-mode DoRA norms are keyed by the
parameters' version counters, which in-place writes bump.  Fused optimizers do not: torch's
``fused=True`` AdamW / Adam / SGD (the Hugging Face Trainer's default optimizer) update the
parameters in place without moving ``_version``, and a cache keyed by versions alone kept
serving the pre-step values (mixed-batch outputs 2.4 off after one step).  Every
``torch.optim.Optimizer`` step runs the global post-step hooks, so counting them there
invalidates such caches after any optimizer's step, fused or not.
"""
from __future__ import annotations

from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["optimizer_steps"]

_steps = 0
_hook = None


def _count(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1


def optimizer_steps() -> int:
    """The number of optimizer steps taken since the first call (which registers the hook)."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_count)
    return _steps
