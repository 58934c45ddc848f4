"""Loads the compiled module ``lowrank_ops._C`` without ever failing the import.

Everything that calls into ``_C`` goes through :func:`extension` (CPU kernels) or
:func:`cuda_extension` (CUDA kernels); both raise a ``RuntimeError`` that names the fix
when the needed part is missing.
"""
from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType
from typing import Optional

# Read by the C++ thread layer (csrc/cpu/parallel.cpp), which knows one value: any other
# was ignored silently (a typo left torch's OpenMP team in use).
_THREADS = os.environ.get("LOWRANK_OPS_THREADS")
if _THREADS not in (None, "", "pool"):
    warnings.warn(f"LOWRANK_OPS_THREADS={_THREADS!r} is ignored: its only value is 'pool' (run the kernels on "
                  "lowrank_ops' own threads instead of torch's OpenMP team)", RuntimeWarning, stacklevel=2)

try:
    from . import _C as _compiled
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as error:  # a source checkout that was never built, or a broken build
    _compiled = None
    _IMPORT_ERROR = error

__all__ = ["extension", "cuda_extension", "import_error", "cuda_compiled"]


def import_error() -> Optional[BaseException]:
    """The exception raised while importing ``lowrank_ops._C``, or None."""
    return _IMPORT_ERROR


def cuda_compiled() -> bool:
    """True when ``_C`` was built with the CUDA kernels."""
    return _compiled is not None and _has_cuda_kernels(_compiled)


@functools.lru_cache(maxsize=None)
def _has_cuda_kernels(module) -> bool:
    # Asked once per module: every CUDA op call checks it, and build_info builds a dict.
    return bool(module.build_info()["cuda_compiled"])


def extension() -> ModuleType:
    """The compiled module; raises RuntimeError when it could not be imported."""
    if _compiled is None:
        raise RuntimeError(
            "lowrank_ops: the compiled extension lowrank_ops._C could not be imported "
            f"({_IMPORT_ERROR}); install the package with `pip install .` from the repository root"
        )
    return _compiled


def cuda_extension(op: str) -> ModuleType:
    """The compiled module, checked to hold CUDA kernels; raises RuntimeError otherwise."""
    module = extension()
    if not cuda_compiled():
        raise RuntimeError(
            f"{op}: got CUDA tensors, but lowrank_ops was built without CUDA kernels; rebuild with "
            "nvcc on PATH: `LOWRANK_OPS_CUDA=ON pip install --no-build-isolation .`"
        )
    return module
