"""What was compiled and what is usable now: ``lowrank_ops.info()`` and ``lowrank-ops info``."""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import _extension

__version__ = "0.1.0"


def info() -> Dict[str, Any]:
    """Build and runtime facts about lowrank_ops.

    Returns
    -------
    dict
        ``version``; ``extension_loaded`` (and ``extension_error`` when it is not);
        ``cuda_compiled`` and ``cuda_archs`` (list of ``sm_XY``), ``cuda_compiler_version``;
        ``cuda_available`` (a CUDA build, a driver and a GPU that torch can use);
        ``devices`` (names of the usable GPUs); ``cuda_runtime_version`` /
        ``cuda_driver_version`` as seen by our kernels; ``torch_version``,
        ``torch_cuda_version``; ``cpu_threads`` (``torch.get_num_threads()``);
        ``cpu_features`` (instruction sets and facts that choose algorithms, e.g.
        ``amx_bf16``, ``genuine_intel``);
        ``cpu_threading`` (``"openmp"``: the CPU kernels run on torch's OpenMP team;
        ``"pool"``: on our own threads, see csrc/include/lowrank_ops/parallel.h).
    """
    result: Dict[str, Any] = {
        "version": __version__,
        "extension_loaded": _extension.import_error() is None,
        "cuda_compiled": False,
        "cuda_archs": [],
        "cuda_compiler_version": None,
        "cuda_available": False,
        "devices": [],
        "cuda_runtime_version": None,
        "cuda_driver_version": None,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "cpu_features": [],
        "cpu_threading": None,
    }
    if _extension.import_error() is not None:
        result["extension_error"] = str(_extension.import_error())
        return result
    module = _extension.extension()
    build = module.build_info()
    result["version"] = build["version"]
    result["cpu_features"] = [name for name, present in module.cpu_features().items() if present]
    result["cpu_threading"] = module.cpu_threading()
    result["cuda_compiled"] = bool(build["cuda_compiled"])
    if result["cuda_compiled"]:
        result["cuda_archs"] = [f"sm_{arch}" for arch in build["cuda_archs"].split(",") if arch]
        result["cuda_compiler_version"] = build["cuda_compiler_version"]
        runtime, driver = module.cuda_versions()
        result["cuda_runtime_version"] = _format_cuda_version(runtime)
        result["cuda_driver_version"] = _format_cuda_version(driver)
        # torch must see the GPU too: our ops allocate through torch.
        if torch.cuda.is_available():
            count = module.cuda_device_count()
            result["devices"] = [module.cuda_device_name(i) for i in range(count)]
            result["cuda_available"] = count > 0
    return result


def _format_cuda_version(code: int):
    return f"{code // 1000}.{(code % 1000) // 10}" if code else None


def format_info(facts: Dict[str, Any]) -> str:
    """``info()`` as aligned ``key: value`` lines."""
    width = max(len(key) for key in facts)
    lines = []
    for key, value in facts.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) if value else "-"
        lines.append(f"{key.ljust(width)} : {value}")
    return "\n".join(lines)
