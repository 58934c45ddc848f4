"""The SNS before/after runs of README.md: ``python cases.py CASE[,CASE...] ["kw=value, ..."]``
prints one JSON line per case (default settings unless keywords are given)."""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the suite's problem builders
from bench_ot import _blobs as blobs  # noqa: E402

from lowrank_ops.ot import sinkhorn_newton_sparse  # noqa: E402

torch.set_num_threads(2)


def inputs(kind, n, option):
    generator = torch.Generator().manual_seed(0)
    if kind == "assignment":
        a = torch.full((n,), 1.0 / n, dtype=torch.float64)
        return dict(a=a, b=a.clone(), C=torch.rand(n, n, generator=generator, dtype=torch.float64), reg=1.0 / option), 1e-8
    if kind == "images":
        grid = torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij"), -1).reshape(-1, 2).double()
        C = torch.cdist(grid, grid, p=1.0) if option == "l1" else torch.cdist(grid, grid) ** 2
        return dict(a=blobs(generator), b=blobs(generator), C=C / C.max(), reg=1e-3), 1e-8
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    y = torch.randn(n, 2, generator=generator, dtype=torch.float64) + 1.0
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return dict(a=a, b=a.clone(), x=x, y=y, reg=option), 1e-6

CASES = {"assign": ("assignment", 500, 1200.0), "img_l2": ("images", 28, "sqeuclidean"), "img_l1": ("images", 28, "l1"),
         "pts1k_1e-2": ("points", 1000, 1e-2), "pts1k_1e-3": ("points", 1000, 1e-3),
         "pts2k_1e-2": ("points", 2000, 1e-2), "pts2k_1e-3": ("points", 2000, 1e-3)}

def run(name, **kw):
    inp, tol = inputs(*CASES[name])
    args = dict(inp); reg = args.pop("reg"); a = args.pop("a"); b = args.pop("b")
    C = args.pop("C", None)
    t = time.perf_counter()
    r = sinkhorn_newton_sparse(a, b, C, reg, tol=tol, **args, **kw)
    wall = time.perf_counter() - t
    cg = r.cg_iterations[0]
    out = dict(case=name, kw={k: v for k, v in kw.items()}, iters=int(r.iterations), newton=int(r.newton_steps),
               sinkhorn=int(r.iterations) - int(r.newton_steps), cg_total=int(cg.sum()), cg_steps=len(cg),
               rejected=int((r.step_sizes[0] == 0).sum()), err=float(r.marginal_error), conv=bool(r.converged), wall=round(wall, 2))
    print(json.dumps(out), flush=True)
    return r

if __name__ == "__main__":
    names = sys.argv[1].split(",")
    kw = eval("dict(" + (sys.argv[2] if len(sys.argv) > 2 else "") + ")")
    for nm in names:
        run(nm, **kw)
