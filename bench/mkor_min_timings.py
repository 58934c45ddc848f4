"""Min-of-N timings of bench_mkor.py's impls (same layers, gradients and mean vectors),
for a machine shared with other jobs, where the suite's medians are dominated by
preemption: the fastest of N calls is the least disturbed one.

    PYTHONPATH=<install> python bench/mkor_min_timings.py [threads]   (default 1)
"""
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mkor as B  # noqa: E402

warnings.simplefilter("ignore")
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)

def tmin(f, n):
    f()
    best = 1e9
    for _ in range(n):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best * 1e3

for shape, n in (((1024, 1024), 15), ((4096, 1024), 4)):
    p = B._problem(*shape, "cpu")
    res = {}
    for impl in ("ours", "kfac_cholesky", "kfac_inv", "sgd_momentum"):
        case = B.Case(B.FAMILY, "mkor.step", impl, "cpu", "float32", "", shape)
        obj = B._impl(case, p)
        res[impl, "step"] = tmin(obj.step, n)
        if impl != "sgd_momentum":
            obj = B._impl(case, p)
            res[impl, "factors"] = tmin(obj.factors, n)
    o = res["ours", "step"]; of = res["ours", "factors"]
    print(shape, f"threads={torch.get_num_threads()}",
          f"step: ours {o:.1f} ms, kfac_chol {res['kfac_cholesky','step']:.1f} ({res['kfac_cholesky','step']/o:.2f}x), "
          f"kfac_inv {res['kfac_inv','step']:.1f} ({res['kfac_inv','step']/o:.2f}x), sgd {res['sgd_momentum','step']:.2f} "
          f"(ours/sgd {o/res['sgd_momentum','step']:.1f}x); factors: ours {of:.2f} ms, kfac_chol "
          f"{res['kfac_cholesky','factors']:.1f} ({res['kfac_cholesky','factors']/of:.0f}x), kfac_inv "
          f"{res['kfac_inv','factors']:.1f} ({res['kfac_inv','factors']/of:.0f}x)", flush=True)
