"""The ``lowrank-ops`` command line.

``lowrank-ops info [--json]``
    What was compiled and what is usable now (:func:`lowrank_ops.info`).
``lowrank-ops bench [--full] [--families sparse,...] [--device cpu|cuda|all] ...``
    Runs the pytest-benchmark suites ``bench/bench_<family>.py`` in a subprocess, prints
    ours against each peer (median time, ratio, accuracy, achieved GFLOP/s and GB/s) and
    saves ``results.json``, ``results.md`` and one ``<family>.png`` per family.
``lowrank-ops generate darcy|poisson|helmholtz|thermal --grid N --num K --out data.npz ...``
    Generates a PDE data set solved with SKR; resumable (:mod:`lowrank_ops.generate`).

pytest, pytest-benchmark and matplotlib are imported lazily (or only in the subprocess),
so this module imports without them.
"""
from __future__ import annotations

import argparse
import datetime as _datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main"]

#: Columns of a benchmark record that identify a case (with ``impl``, one timing).
CASE_KEYS = ("family", "op", "shape", "dtype", "device")
_FULL_ENV = "LOWRANK_OPS_BENCH_FULL"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lowrank-ops`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-ops", description="lowrank_ops command line: build facts, benchmarks and PDE data-set generation.")
    commands = parser.add_subparsers(dest="command", metavar="{info,bench,generate}")

    info = commands.add_parser("info", help="what was compiled and what is usable now")
    info.add_argument("--json", action="store_true", help="print JSON instead of aligned lines")
    info.set_defaults(handler=_cmd_info)

    bench = commands.add_parser("bench", help="run the benchmark suites and print ours vs peers")
    bench.add_argument("--full", action="store_true", help=f"full sizes (the papers' shapes; sets {_FULL_ENV}=1)")
    bench.add_argument("--families", help="comma-separated families (default: every bench/bench_<family>.py)")
    bench.add_argument("--bench-dir", type=Path, help="directory of the suites (default: ./bench)")
    bench.add_argument("--out", type=Path, help="results directory (default: <bench-dir>/results/local/<timestamp>/)")
    bench.add_argument("--compare", type=Path, metavar="OLD.json", help="compare ours with an earlier results.json")
    bench.add_argument("--device", choices=("cpu", "cuda", "all"), default="all", help="devices to run (default: all usable)")
    bench.add_argument("--no-plot", action="store_true", help="do not write <family>.png")
    bench.add_argument("-k", dest="keyword", help="pytest -k expression to select cases")
    bench.add_argument("--from-log", type=Path, metavar="cases.jsonl",
                       help="run nothing: render the cases a run logged (its results directory's cases.jsonl, "
                            "kept even when the run was killed)")
    bench.set_defaults(handler=_cmd_bench)

    from .generate import add_parser as add_generate_parser

    add_generate_parser(commands)
    return parser


# ---------------------------------------------------------------------------- info
def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, info

    facts = info()
    print(json.dumps(facts, indent=2) if args.json else format_info(facts))
    return 0


# ---------------------------------------------------------------------------- bench
def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = (args.bench_dir or Path.cwd() / "bench").resolve()
    if not bench_dir.is_dir():
        return _fail(f"no benchmark directory at {bench_dir}; run from the repository root or pass --bench-dir DIR")
    available = sorted(path.stem[len("bench_"):] for path in bench_dir.glob("bench_*.py"))
    families = [name.strip() for name in args.families.split(",") if name.strip()] if args.families else available
    missing = sorted(set(families) - set(available))
    if missing or not families:
        return _fail(f"no suite for families {missing or families} in {bench_dir}; available: {', '.join(available) or 'none'}")
    compare_with = None
    if args.compare is not None:
        try:
            compare_with = json.loads(args.compare.read_text())
        except (OSError, ValueError) as error:
            return _fail(f"--compare {args.compare}: cannot read it as JSON ({error})")
    for module in ("pytest", "pytest_benchmark"):
        if not _importable(module):
            return _fail(f"needs {module}: pip install pytest pytest-benchmark (or the package's [bench] extra)")

    now = _datetime.datetime.now().astimezone()
    out_dir = (args.out or bench_dir / "results" / "local" / now.strftime("%Y%m%d-%H%M%S")).resolve()
    if args.from_log is not None:
        try:
            machine, raw = _read_case_log(args.from_log)
        except (OSError, ValueError, KeyError) as error:
            return _fail(f"--from-log {args.from_log}: cannot read it as a case log ({error})")
        code = 0
    else:
        machine = machine_info(bench_dir, now)  # before the run: how busy the CPU is without us
        if (machine["cpu_busy_before"] or 0.0) > 0.25:
            print(f"note: {machine['cpu_busy_before']:.0%} of the CPU was busy before the run; other processes skew CPU timings")
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / "cases.jsonl"
        log_path.write_text(json.dumps({"machine": machine}) + "\n")
        with tempfile.TemporaryDirectory(prefix="lowrank-ops-bench-") as tmp:
            raw_path = Path(tmp) / "pytest-benchmark.json"
            machine_before, ours_before = _cpu_seconds(), os.times()
            code = _run_pytest(bench_dir, families, raw_path, log_path, args)
            machine["cpu_busy_others_during"] = _others_busy(machine_before, _cpu_seconds(), ours_before, os.times())
            # pytest-benchmark leaves an empty file when no case was timed (all skipped/deselected).
            text = raw_path.read_text() if raw_path.exists() else ""
        if not text.strip():
            print(f"\nno case was timed (pytest exit status {code}; cases skipped, deselected or failed)")
            return code
        raw = json.loads(text)

    records = records_from_pytest_json(raw)
    unsupported = raw.get("lowrank_ops", {}).get("unsupported", [])
    rows = comparison_rows(records, unsupported)
    table = format_table(rows)
    notes = format_notes(records, unsupported)
    print()
    print(_machine_line(machine))
    print(table)
    if notes:
        print(notes)
    comparison = ""
    if compare_with is not None:
        comparison = format_compare(records, compare_with)
        print()
        print(comparison)

    _write_results(out_dir, args, families, machine, code, rows, records, unsupported, notes, comparison)
    print(f"\nresults: {out_dir}")
    if (machine.get("cpu_busy_others_during") or 0.0) > 0.1:
        print(
            f"warning: other processes used {machine['cpu_busy_others_during']:.0%} of the CPU during the run; "
            "CPU timings are skewed (rerun on a quiet machine before recording them)"
        )
    if code != 0:
        print(f"lowrank-ops bench: pytest exited with status {code}", file=sys.stderr)
    return code


def _write_results(out_dir: Path, args, families, machine, code, rows, records, unsupported, notes, comparison) -> None:
    """results.json (everything, for --compare and later analysis), results.md, <family>.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "schema": 1,
        "machine": machine,
        "command": {"full": args.full, "families": families, "device": args.device, "keyword": args.keyword},
        "pytest_exit_code": code,
        "rows": rows,
        "records": records,
        "unsupported": unsupported,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(_markdown(machine, rows, notes, comparison))
    if not args.no_plot:
        for family in families:
            plot_family(rows, family, out_dir / f"{family}.png", _machine_line(machine))


def _read_case_log(path: Path):
    """(machine, pytest-benchmark-like JSON) from a run's ``cases.jsonl``."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or "machine" not in lines[0]:
        raise ValueError("its first line is not the run's machine record")
    return lines[0]["machine"], {"benchmarks": lines[1:]}


def _run_pytest(bench_dir: Path, families: List[str], raw_path: Path, log_path: Path, args: argparse.Namespace) -> int:
    command = [
        sys.executable, "-m", "pytest", *(str(bench_dir / f"bench_{name}.py") for name in families),
        "-q", "-p", "no:cacheprovider", f"--benchmark-json={raw_path}", "--benchmark-disable-gc",
        "--benchmark-quiet",  # our table replaces pytest-benchmark's
        f"--bench-device={args.device}",
    ]
    if args.keyword:
        command += ["-k", args.keyword]
    env = dict(os.environ, **{_FULL_ENV: "1" if args.full else "0", "LOWRANK_OPS_BENCH_LOG": str(log_path)})
    print("running:", " ".join(command), f"({_FULL_ENV}={env[_FULL_ENV]})", flush=True)
    # cwd = the bench directory so that pytest-benchmark's storage and anything else relative stays there.
    return subprocess.run(command, cwd=bench_dir, env=env).returncode


# ---------------------------------------------------------------------------- results
def records_from_pytest_json(raw: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One record per timed case: its ``extra_info``, ``median_s`` and the pytest-benchmark stats."""
    records = []
    for bench in raw.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if not all(key in info for key in CASE_KEYS + ("impl",)):
            continue  # not written by the bench harness
        stats = {key: value for key, value in bench["stats"].items() if key != "data"}
        info.update(median_s=stats["median"], name=bench["name"], stats=stats)
        records.append(info)
    return records


def comparison_rows(records: List[Dict[str, Any]], unsupported: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Ours against each peer: one row per (family, op, shape, dtype, device, peer).

    A case with no peer timing gives one row with ``peer`` None; a peer that could not
    run the case gives a row with ``peer_ms`` None and its ``unsupported`` reason.
    """
    cases: Dict[tuple, Dict[str, Any]] = {}
    for record in records + [dict(entry, unsupported=True) for entry in unsupported]:
        cases.setdefault(tuple(record[key] for key in CASE_KEYS), {})[record["impl"]] = record
    rows = []
    for key, impls in cases.items():
        ours = impls.get("ours")
        peers = [name for name in impls if name != "ours"] or [None]
        for peer_name in peers:
            peer = impls.get(peer_name) if peer_name else None
            row: Dict[str, Any] = dict(zip(CASE_KEYS, key))
            row.update(
                ours_ms=_ms(ours), peer=peer_name, peer_ms=_ms(peer),
                ratio=None, ours_error=ours.get("max_error") if ours else None,
                peer_error=peer.get("max_error") if peer else None,
                ours_gflops=None, ours_gbps=None,
                ours_mem_mb=ours.get("peak_mem_MB") if ours else None,
                peer_mem_mb=peer.get("peak_mem_MB") if peer else None, mem_ratio=None,
                unsupported=peer.get("reason") if peer and peer.get("unsupported") else None,
                # Solvers stopped at an iteration cap before their tolerance (extra_info
                # "truncated"): their time is a lower bound of the time to the tolerance.
                peer_truncated=bool(peer and peer.get("truncated")),
                ours_truncated=bool(ours and ours.get("truncated")),
            )
            if row["ours_ms"] and row["peer_ms"]:
                row["ratio"] = row["peer_ms"] / row["ours_ms"]
            if row["ours_mem_mb"] and row["peer_mem_mb"] is not None:
                row["mem_ratio"] = row["peer_mem_mb"] / row["ours_mem_mb"]
            if row["ours_ms"]:
                row["ours_gflops"] = ours["flops"] / (row["ours_ms"] * 1e-3) / 1e9
                row["ours_gbps"] = ours["bytes"] / (row["ours_ms"] * 1e-3) / 1e9
            rows.append(row)
    return rows


def _ms(record: Optional[Dict[str, Any]]) -> Optional[float]:
    if not record or record.get("unsupported") or record.get("median_s") is None:
        return None
    return record["median_s"] * 1e3


_COLUMNS = (
    ("family", "family"), ("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("device", "device"),
    ("ours_ms", "ours ms"), ("peer", "peer"), ("peer_ms", "peer ms"), ("ratio", "ratio"),
    ("ours_error", "err ours"), ("peer_error", "err peer"), ("ours_gflops", "GFLOP/s"), ("ours_gbps", "GB/s"),
)
# Shown only when some suite recorded peak memory (extra_info "peak_mem_MB").
_MEMORY_COLUMNS = (("ours_mem_mb", "ours MB"), ("peer_mem_mb", "peer MB"), ("mem_ratio", "mem ratio"))


def _columns(rows: List[Dict[str, Any]]):
    has_memory = any(row.get("ours_mem_mb") is not None for row in rows)
    return _COLUMNS + (_MEMORY_COLUMNS if has_memory else ())


def _cell(row: Dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "peer_ms" and row.get("unsupported"):
        return "unsupported"
    if value is None:
        return "-"
    if key in ("ours_ms", "peer_ms"):
        return _format_ms(value)
    if key == "ratio":
        # A truncated peer: its time to the tolerance is longer, the ratio a lower bound;
        # ours truncated: an upper bound (both truncated: no bound).
        bound = {(True, False): ">=", (False, True): "<="}.get((row.get("peer_truncated"), row.get("ours_truncated")), "")
        mark = "*" if row.get("peer_truncated") and row.get("ours_truncated") else ""
        return f"{bound}{value:.2f}x{mark}"
    if key in ("ours_error", "peer_error"):
        return f"{value:.1e}"
    if key in ("ours_gflops", "ours_gbps", "ours_mem_mb", "peer_mem_mb"):
        return f"{value:.1f}"
    if key == "mem_ratio":
        return f"{value:.2f}x"
    return str(value)


def _format_ms(ms: float) -> str:
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.3g}"  # three significant digits down to microseconds


def format_table(rows: List[Dict[str, Any]], markdown: bool = False) -> str:
    """The comparison rows as an aligned text table, or a markdown table."""
    columns = _columns(rows)
    header = [title for _, title in columns]
    body = [[_cell(row, key) for key, _ in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(cells[i]) for cells in [header] + body) for i in range(len(header))]
    numeric = {i for i, (key, _) in enumerate(columns) if key.endswith(("_ms", "ratio", "_error", "_gflops", "_gbps", "_mb"))}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body])


def format_notes(records: List[Dict[str, Any]], unsupported: List[Dict[str, Any]]) -> str:
    """Footnotes: peers that could not run a case, and notes the suites recorded."""
    lines = []
    for entry in records + unsupported:
        text = entry.get("note") or (f"unsupported: {entry['reason']}" if entry.get("reason") else None)
        if text:
            where = " ".join(str(entry[key]) for key in ("op", "shape", "dtype", "device"))
            lines.append(f"- {entry['impl']} on {where}: {text}")
    return ("notes:\n" + "\n".join(lines)) if lines else ""


def format_compare(records: List[Dict[str, Any]], old: Dict[str, Any]) -> str:
    """Ours now against ours in an earlier ``results.json`` (or raw pytest-benchmark JSON)."""
    old_records = old.get("records") if "records" in old else records_from_pytest_json(old)
    then = {tuple(r[k] for k in CASE_KEYS): r for r in old_records or [] if r.get("impl") == "ours"}
    rows = []
    for record in records:
        key = tuple(record[k] for k in CASE_KEYS)
        if record["impl"] != "ours" or key not in then or not then[key].get("median_s"):
            continue
        now_ms, then_ms = record["median_s"] * 1e3, then[key]["median_s"] * 1e3
        rows.append(list(key) + [_format_ms(now_ms), _format_ms(then_ms), f"{(now_ms / then_ms - 1) * 100:+.1f}%"])
    machine = old.get("machine", {})
    title = f"compared with {machine.get('timestamp', '?')} (git {str(machine.get('git_sha') or '?')[:10]}, {machine.get('cpu', '?')})"
    if not rows:
        return f"{title}: no matching cases"
    header = list(CASE_KEYS) + ["ours ms now", "ours ms then", "change"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [title + "; change < 0 means faster now"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- machine
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
        "lowrank_ops": facts.get("version"),
        "git_sha": _git(bench_dir, "rev-parse", "HEAD"),
        "git_dirty": bool(_git(bench_dir, "status", "--porcelain", "--untracked-files=no")),
        "cpu_busy_before": _cpu_busy(),
    }


def _cpu_seconds() -> Optional[tuple]:
    """(busy, total) CPU seconds of the whole machine so far, from Linux ``/proc/stat``."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def _others_busy(machine_before, machine_after, ours_before, ours_after) -> Optional[float]:
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
    before = _cpu_seconds()
    time.sleep(seconds)
    after = _cpu_seconds()
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


def _machine_line(machine: Dict[str, Any]) -> str:
    gpus = ", ".join(machine["gpus"]) or "no GPU"
    sha = (machine["git_sha"] or "unknown")[:10] + ("+dirty" if machine["git_dirty"] else "")
    return (
        f"{machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads), {gpus}; "
        f"python {machine['python']}, torch {machine['torch']}, lowrank_ops {machine['lowrank_ops']}, "
        f"git {sha}; {machine['timestamp']}, CPU busy before: {_percent(machine.get('cpu_busy_before'))}, "
        f"others during: {_percent(machine.get('cpu_busy_others_during'))}"
    )


def _percent(fraction: Optional[float]) -> str:
    return "?" if fraction is None else f"{fraction:.0%}"


def _markdown(machine: Dict[str, Any], rows: List[Dict[str, Any]], notes: str, comparison: str) -> str:
    parts = [
        "# lowrank_ops benchmark results", "", _machine_line(machine), "",
        "ours/peer ms: median wall time of one call; ratio = peer / ours (> 1: ours faster); "
        "err: max abs error / max abs of the float64 reference; GFLOP/s, GB/s: ours, on the op's "
        "useful flops and compulsory bytes (see bench/README.md); ours/peer MB (suites that record it): "
        "peak extra memory of one call, mem ratio = peer / ours (> 1: ours uses less). "
        "Iterative solvers stopped at an iteration cap before their tolerance (the error column "
        "shows where they stopped): >= marks a ratio that is a lower bound (the peer was stopped), "
        "<= an upper bound (ours was), * both.", "",
        format_table(rows, markdown=True), "",
    ]
    if notes:
        parts += [notes, ""]
    if comparison:
        parts += ["```", comparison, "```", ""]
    return "\n".join(parts)


def plot_family(rows: List[Dict[str, Any]], family: str, path: Path, subtitle: str = "") -> bool:
    """Bar chart of the ratio peer/ours per case of ``family``; False when nothing was drawn."""
    rows = [row for row in rows if row["family"] == family and row["ratio"]]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipped {path.name} (pip install matplotlib)")
        return False
    peers = sorted({row["peer"] for row in rows})
    colors = {peer: plt.get_cmap("tab10")(i) for i, peer in enumerate(peers)}
    labels = [f"{row['op']}  {row['shape']}  {row['dtype']} {row['device']}  vs {row['peer']}" for row in rows]
    ratios = [row["ratio"] for row in rows]
    figure, axes = plt.subplots(figsize=(9, 1.4 + 0.3 * len(rows)))
    positions = list(range(len(rows)))[::-1]  # first row on top
    # Bars grow from 1 (parity): right when ours is faster, left when it is slower.
    axes.barh(positions, [r - 1.0 for r in ratios], left=1.0, color=[colors[row["peer"]] for row in rows])
    axes.set_xscale("log")
    axes.set_xlim(min(min(ratios), 1.0) / 1.5, max(max(ratios), 1.0) * 1.6)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(positions, labels, fontsize=7)
    axes.set_xlabel("peer time / ours time (> 1: ours faster; log scale)")
    for y, ratio in zip(positions, ratios):
        axes.text(ratio, y, f" {ratio:.2f}x ", va="center", ha="left" if ratio >= 1 else "right", fontsize=7)
    axes.set_title("\n".join([f"{family}: ours vs peers"] + textwrap.wrap(subtitle, 120)), fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[peer]) for peer in peers]
    axes.legend(handles, peers, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.savefig(path, dpi=120, bbox_inches="tight")  # "tight": keep the long case labels
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------- helpers
def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _fail(message: str) -> int:
    print(f"lowrank-ops bench: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
