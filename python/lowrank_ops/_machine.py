"""Where and with what a benchmark ran: CPU model, cores, threads, GPUs, versions, git SHA, and
how busy the machine was before and during the run (Linux ``/proc/stat``)."""
from __future__ import annotations

import datetime as _datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Optional

def machine_info(bench_dir: Path, now: _datetime.datetime) -> Dict[str, Any]:
    """Where and with what the numbers were measured."""
    import torch

    from .info import info

    facts = info()
    return {
        "timestamp": now.isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": facts.get("devices", []),
        "cuda_compiled": facts.get("cuda_compiled"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_mkl": torch.backends.mkl.is_available(),
        "lowrank_ops": facts.get("version"),
        "git_sha": _git(bench_dir, "rev-parse", "HEAD"),
        "git_dirty": bool(_git(bench_dir, "status", "--porcelain", "--untracked-files=no")),
        "cpu_busy_before": _cpu_busy(),
        "peers": _peer_versions(),
        "environment": {name: os.environ[name] for name in _ENVIRONMENT if name in os.environ},
    }


#: The environment variables that change what a benchmark measures.
_ENVIRONMENT = ("LOWRANK_OPS_BENCH_TIME_BUDGET", "LOWRANK_OPS_BENCH_FULL", "LOWRANK_OPS_THREADS",
                "LOWRANK_OPS_DISABLE_AVX512", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")

#: The distributions the suites time against (peers) or through (numpy, transformers).
_PEERS = ("peft", "POT", "scipy", "scikit-learn", "galore-torch", "transformers", "numpy", "cupy-cuda12x",
          "cupy-cuda13x")


def _peer_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the peers (None: not installed), read from the package
    metadata without importing them."""
    from importlib import metadata

    versions: Dict[str, Optional[str]] = {}
    for distribution in _PEERS:
        try:
            versions[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[distribution] = None
    return versions


def cpu_seconds() -> Optional[tuple]:
    """(busy, total) CPU seconds of the whole machine so far, from Linux ``/proc/stat``."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def others_busy(machine_before, machine_after, ours_before, ours_after) -> Optional[float]:
    """Fraction of all cores that processes other than the benchmark used during the run."""
    if machine_before is None or machine_after is None or machine_after[1] <= machine_before[1]:
        return None
    ours = (ours_after.children_user + ours_after.children_system) - (ours_before.children_user + ours_before.children_system)
    others = (machine_after[0] - machine_before[0]) - ours
    return round(max(0.0, others / (machine_after[1] - machine_before[1])), 2)


def _cpu_busy(seconds: float = 0.5) -> Optional[float]:
    """Fraction of all cores busy during the next ``seconds`` (None where unknown).

    Taken just before the run: the load average lags by a minute and would blame the
    previous run.
    """
    before = cpu_seconds()
    time.sleep(seconds)
    after = cpu_seconds()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(cwd: Path, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_line(machine: Dict[str, Any]) -> str:
    """One line describing the machine record (fields a record lacks, e.g. in a hand-edited
    or older case log, print as "?")."""
    def field(key: str) -> Any:
        value = machine.get(key)
        return "?" if value is None else value

    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
    sha = str(machine.get("git_sha") or "unknown")[:10] + ("+dirty" if machine.get("git_dirty") else "")
    return (
        f"{field('cpu')} ({field('cpu_cores')} cores, {field('torch_threads')} torch threads), {gpus}; "
        f"python {field('python')}, torch {field('torch')}, lowrank_ops {field('lowrank_ops')}, "
        f"git {sha}; {field('timestamp')}, CPU busy before: {_percent(machine.get('cpu_busy_before'))}, "
        f"others during: {_percent(machine.get('cpu_busy_others_during'))}"
    )


def _percent(fraction: Optional[float]) -> str:
    return "?" if fraction is None else f"{fraction:.0%}"
