"""The data-generation job: ``lowrank-ops generate <family> --grid N --num K --out data.npz``.

Generates ``num`` samples of a PDE family (:mod:`lowrank_ops.pde`), solves them with SKR
(greedy nearest-neighbour order of the coefficient fields, GCRO-DR recycling), checks
every solution's true residual with an independent product (gather and scatter-add
in torch, not our SpMV kernel), and writes ``(coefficient, solution)`` pairs to one ``.npz``.

Crash safety and resuming:

* Work goes to ``<out>.parts/``: ``manifest.json`` (the run's parameters and solve
  order) and one shard file per block of ``shard_size`` consecutive systems of the solve
  order.  Every file is written to a temporary name, flushed to disk and renamed
  (``os.replace``), so a file either exists complete or not at all.
* A shard also stores the recycled subspace ``U`` as it was after its last system.  A
  rerun skips the shards on disk and restarts the next one from the previous shard's
  ``U``: the resumed run performs exactly the computation of an uninterrupted one, so no
  sample is lost, duplicated or different.
* When every shard exists, the shards are assembled (checking each index occurs once)
  into ``<out>`` (temporary name + rename), and ``<out>.parts/`` is removed.
* Rerunning a finished command (``<out>`` holds a data set of the same settings) does
  nothing and succeeds; any other existing ``<out>`` is refused, never overwritten.

Sample ``i`` depends only on ``(seed, i)`` (see :func:`lowrank_ops.pde.sample_generator`).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, TextIO

import numpy as np
import torch

from . import pde
from ._args import is_real_number, require_int
from .krylov import GCRODR, gmres, greedy_order, solve_sequence

__all__ = ["add_parser", "generate_dataset", "main"]

_MANIFEST = "manifest.json"
_FORMAT = 1


def add_parser(commands) -> None:
    """Add the ``generate`` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "generate", help="generate a PDE data set with SKR (resumable)",
        description="Generate (coefficient, solution) pairs of a PDE family, solved with SKR (sorted + recycled "
                    "GCRO-DR). Interrupt it at any time; rerunning the same command resumes (and, once the "
                    "data set is complete, reports it as done).")
    parser.add_argument("family", choices=sorted(pde.FAMILIES), help="problem family")
    parser.add_argument("--grid", type=int, default=64, help="interior nodes per side (default 64)")
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--out", type=Path, required=True, help="output .npz file")
    parser.add_argument("--seed", type=int, default=0, help="run seed (sample i depends on (seed, i) only)")
    parser.add_argument("--tol", type=float, default=1e-8, help="relative residual tolerance (default 1e-8)")
    parser.add_argument("--m", type=int, default=40, help="GCRO-DR cycle length (default 40)")
    parser.add_argument("--k", type=int, default=10, help="recycled vectors (default 10)")
    parser.add_argument("--shard-size", type=int, default=25, help="systems per shard file (default 25)")
    parser.add_argument("--jacobi", action="store_true", help="Jacobi (diagonal) preconditioning")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """CLI handler: returns the exit status."""
    try:
        generate_dataset(args.family, args.grid, args.num, args.out, seed=args.seed, tol=args.tol, m=args.m, k=args.k,
                         shard_size=args.shard_size, jacobi=args.jacobi, progress=None if args.quiet else sys.stderr)
    except (ValueError, FileExistsError) as error:
        print(f"lowrank-ops generate: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an --out that cannot be created or written (no traceback)
        print(f"lowrank-ops generate: --out {args.out}: {error.strerror or error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        print(f"lowrank-ops generate: {error}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- files
def _write_atomically(path: Path, payload: bytes) -> None:
    """``path`` holds ``payload`` completely or not at all, even if the process dies mid-write."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _shard_path(parts: Path, shard: int) -> Path:
    return parts / f"shard_{shard:05d}.npz"


# ---------------------------------------------------------------------------- progress
class _Progress:
    """A one-line progress bar on ``stream`` with the running speed and the time left."""

    def __init__(self, stream: Optional[TextIO], label: str, total: int, done: int):
        self.stream, self.label, self.total, self.done = stream, label, total, done
        self.start, self.solved, self.last = time.perf_counter(), 0, 0.0

    def step(self, count: int = 1) -> None:
        self.done += count
        self.solved += count
        now = time.perf_counter()
        if self.stream is not None and (now - self.last > 0.2 or self.done == self.total):
            self.last = now
            rate = self.solved / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else math.inf
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            eta = "?" if math.isinf(left) else f"{int(left // 60)}m{int(left % 60):02d}s"
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                              f"{rate:.2f} samples/s ETA {eta} ")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- the job
def _features(family: str, grid: int, num: int, seed: int) -> torch.Tensor:
    """Sorting features of every sample: coefficient fields pooled to at most 32 x 32."""
    side = min(grid, 32)
    rows = []
    for index in range(num):
        field = pde.FAMILIES[family](grid, seed=seed, index=index).coefficient
        rows.append(torch.nn.functional.adaptive_avg_pool2d(field[None, None], (side, side)).reshape(-1))
    return torch.stack(rows) if rows else torch.zeros(0, side * side)


def _true_residual(problem: pde.PDEProblem, x: torch.Tensor) -> float:
    """``||b - A x|| / ||b||`` by gather and scatter-add (independent of the solver's SpMV kernel)."""
    matrix = problem.matrix
    product = torch.zeros(matrix.shape[0], dtype=torch.float64).index_add_(
        0, matrix.entry_rows(), matrix.values * x.to(torch.float64)[matrix.col_idx.long()])
    residual = problem.rhs - product
    return float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(problem.rhs))


def _solve_shard(family: str, grid: int, seed: int, indices: List[int], solver: GCRODR, tol: float,
                 progress: _Progress) -> Dict[str, np.ndarray]:
    problems = [pde.FAMILIES[family](grid, seed=seed, index=index) for index in indices]
    result = solve_sequence(problems, method="gcrodr", order="given", tol=tol, recycler=solver,
                            callback=lambda done, index, x, info: progress.step())
    residuals, solutions, iterations, matvecs = [], [], [], []
    for problem, x, info in zip(problems, result.solutions, result.infos):
        residual = _true_residual(problem, x)
        iterations.append(info.iterations)
        matvecs.append(info.matvecs)
        if not residual <= tol * (1 + 1e-6):  # what GCRO-DR reported, recomputed independently
            x, info = gmres(problem.matrix, problem.rhs, tol=tol, restart=solver.m, maxiter=50 * grid * grid, M=solver.M)
            iterations[-1] += info.iterations  # the sample's whole cost: the rejected solve and this one
            matvecs[-1] += info.matvecs
            residual = _true_residual(problem, x)
            if not residual <= tol * (1 + 1e-6):
                raise RuntimeError(
                    f"sample {problem.index}: no solution to tol = {tol:g} (true residual {residual:.3g} after "
                    f"recycled and plain GMRES solves; status {info.status})")
        residuals.append(residual)
        solutions.append(x.reshape(grid, grid).numpy())
    return {
        "index": np.asarray(indices, dtype=np.int64),
        "coefficient": np.stack([p.coefficient.numpy() for p in problems]),
        "rhs": np.stack([p.rhs.reshape(grid, grid).numpy() for p in problems]),
        "solution": np.stack(solutions),
        "residual": np.asarray(residuals),
        "iterations": np.asarray(iterations, dtype=np.int64),
        "matvecs": np.asarray(matvecs, dtype=np.int64),
        "recycle_U": (solver.U if solver.U is not None else torch.zeros(0, grid * grid, dtype=torch.float64)).numpy(),
    }


def _open_run(parts: Path, settings: dict, family: str, grid: int, num: int, seed: int) -> List[int]:
    """Create or check ``parts/manifest.json``; returns the solve order."""
    manifest_path = parts / _MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:  # a truncated or foreign file: json's error named neither
            raise ValueError(f"{manifest_path} is not a manifest this job wrote ({error}); delete {parts} to start "
                             "over") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{manifest_path} is not a manifest this job wrote (a JSON {type(manifest).__name__}); "
                             f"delete {parts} to start over")
        if manifest.get("settings") != settings:
            raise ValueError(
                f"{parts} holds an unfinished run with other settings ({manifest.get('settings')}); rerun with those, "
                f"or delete {parts} to start over")
        order = manifest.get("order")
        if not (isinstance(order, list) and sorted(order) == list(range(num))):
            raise ValueError(f"{manifest_path} holds no solve order of the {num} samples; delete {parts} to start over")
        return order
    parts.mkdir(parents=True, exist_ok=True)
    order = greedy_order(_features(family, grid, num, seed)) if num > 1 else list(range(num))
    _write_atomically(manifest_path, json.dumps({"format": _FORMAT, "settings": settings, "order": order}).encode())
    return order


def generate_dataset(family: str, grid: int, num: int, out, *, seed: int = 0, tol: float = 1e-8, m: int = 40, k: int = 10,
                     shard_size: int = 25, jacobi: bool = False, progress: Optional[TextIO] = None) -> Path:
    """Generate, solve and save ``num`` samples; resumable (see the module docstring).

    Parameters
    ----------
    family : {"darcy", "poisson", "helmholtz", "thermal"}
    grid : int
        Interior nodes per side.
    num : int
        Number of samples.
    out : path
        Output ``.npz``: ``coefficient``, ``rhs``, ``solution`` ``[num, grid, grid]``
        float64, ``residual`` (true relative residuals), ``iterations``, ``matvecs``
        ``[num]`` (each sample's whole cost: a recycled solve whose true residual misses
        ``tol`` is redone by plain GMRES, and both count), ``order`` (the solve order)
        and ``settings`` (JSON).
    seed, tol, m, k, shard_size, jacobi
        Run seed, solver tolerance, GCRO-DR(m, k), systems per shard, Jacobi preconditioning.
    progress : text stream, optional
        Where to draw the progress bar (None: silent).

    Returns
    -------
    Path
        ``out``.  When ``out`` already holds a finished data set of the same settings
        (a rerun of a completed command), it is returned as it is: nothing is solved.

    Raises
    ------
    FileExistsError
        ``out`` exists and is not a finished data set of these settings.
    ValueError
        Bad arguments, or an unfinished run with other settings in ``<out>.parts``.
    RuntimeError
        A sample whose solution does not meet ``tol`` (nothing is written for it).
    """
    out = Path(out)
    if family not in pde.FAMILIES:
        raise ValueError(f"family must be one of {sorted(pde.FAMILIES)}; got {family!r}")
    # Python or NumPy integers, as ints: they go into the JSON settings (an np.int64 seed
    # failed there, after the parts directory was made).
    op = "generate_dataset"
    grid, num, shard_size, m = (require_int(op, name, value) for name, value in
                                (("grid", grid), ("num", num), ("shard_size", shard_size), ("m", m)))
    k = require_int(op, "k", k, minimum=0)
    seed = require_int(op, "seed", seed, minimum=0)
    if not (is_real_number(tol) and 0 < tol < 1):  # (tol >= 1: every solution 0, reported solved)
        raise ValueError(f"{op}: tol must be a number in (0, 1) (a relative residual); got {tol!r}")
    tol = float(tol)  # a NumPy scalar goes into the JSON settings
    if not isinstance(jacobi, (bool, np.bool_)):
        raise TypeError(f"{op}: jacobi must be a bool; got {jacobi!r}")
    jacobi = bool(jacobi)
    settings = {"family": family, "grid": grid, "num": num, "seed": seed, "tol": tol, "m": m, "k": k,
                "shard_size": shard_size, "jacobi": jacobi}
    if out.exists():
        if _finished_settings(out) != settings:
            raise FileExistsError(f"{out} exists; remove it or choose another --out")
        if progress is not None:
            progress.write(f"{out} is complete ({num} samples, same settings): nothing to do\n")
        return out
    solver = GCRODR(m, k, M="jacobi" if jacobi else None, maxiter=20 * grid * grid)  # validates m > k
    parts = out.with_name(out.name + ".parts")
    order = _open_run(parts, settings, family, grid, num, seed)
    shards = [order[start: start + shard_size] for start in range(0, num, shard_size)]
    done = [s for s in range(len(shards)) if _shard_path(parts, s).exists()]
    bar = _Progress(progress, f"generate {family} {grid}x{grid}", num, sum(len(shards[s]) for s in done))
    try:
        for shard, indices in enumerate(shards):
            path = _shard_path(parts, shard)
            if path.exists():
                continue
            solver.reset()
            if shard > 0:  # continue from the recycled space the previous shard ended with
                with np.load(_shard_path(parts, shard - 1)) as previous:
                    recycled = torch.from_numpy(previous["recycle_U"])
                solver.U = recycled if recycled.shape[0] else None
            arrays = _solve_shard(family, grid, seed, indices, solver, tol, bar)
            _write_atomically(path, _npz_bytes(arrays))
    finally:
        bar.close()
    _assemble(parts, out, len(shards), num, order, settings)
    shutil.rmtree(parts)
    return out


def _finished_settings(out: Path) -> Optional[dict]:
    """The settings stored in ``out`` when it is a data set this job wrote, else None."""
    try:
        with np.load(out) as data:
            return json.loads(data["settings"].item())
    except (OSError, EOFError, TypeError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _assemble(parts: Path, out: Path, n_shards: int, num: int, order: List[int], settings: dict) -> None:
    """Merge the shards into ``out`` in sample order, checking that every index occurs exactly once."""
    fields = ("coefficient", "rhs", "solution", "residual", "iterations", "matvecs")
    merged: Dict[str, np.ndarray] = {}
    seen = np.zeros(num, dtype=np.int64)
    for shard in range(n_shards):
        with np.load(_shard_path(parts, shard)) as data:
            index = data["index"]
            seen[index] += 1
            for name in fields:
                if name not in merged:
                    merged[name] = np.zeros((num,) + data[name].shape[1:], dtype=data[name].dtype)
                merged[name][index] = data[name]
    if not (seen == 1).all():
        raise RuntimeError(f"{parts}: samples missing {np.flatnonzero(seen == 0)[:10].tolist()} or duplicated "
                           f"{np.flatnonzero(seen > 1)[:10].tolist()}; delete {parts} and rerun")
    merged["order"] = np.asarray(order, dtype=np.int64)
    merged["settings"] = np.asarray(json.dumps(settings))
    _write_atomically(out, _npz_bytes(merged))
