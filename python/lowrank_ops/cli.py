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
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from ._bench_report import comparison_rows, format_compare, format_notes, format_table, markdown_report, plot_family
from ._bench_report import records_from_pytest_json
from ._machine import cpu_seconds, machine_info, machine_line, others_busy

__all__ = ["main"]

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

    bench = commands.add_parser(
        "bench", help="run the benchmark suites and print ours vs peers",
        description="Runs bench/bench_<family>.py (pytest-benchmark) in a subprocess: ours and the best peers "
                    "on the same problems, in the same run.  Prints a table (median ms, ratio peer/ours, "
                    "errors, GFLOP/s, GB/s) and writes to --out: cases.jsonl (each case as it finishes, with "
                    "the machine and the command first: --from-log renders it), results.json (everything), "
                    "results.md and <family>.png (ratio charts).",
        epilog=f"environment: LOWRANK_OPS_BENCH_TIME_BUDGET=seconds per case (default 0.4, 2 with --full), "
               f"{_FULL_ENV}=1 (what --full sets), LOWRANK_OPS_THREADS, LOWRANK_OPS_DISABLE_AVX512 "
               f"(recorded in the results)")
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
    try:
        print(json.dumps(facts, indent=2) if args.json else format_info(facts), flush=True)
    except BrokenPipeError:  # `lowrank-ops info --json | head`: the reader left, as for any CLI tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
    return 0


# ---------------------------------------------------------------------------- bench
def _cmd_bench(args: argparse.Namespace) -> int:
    bench_dir = (args.bench_dir or Path.cwd() / "bench").resolve()
    if not bench_dir.is_dir():
        return _fail(f"no benchmark directory at {bench_dir}; run from the repository root or pass --bench-dir DIR")
    available = sorted(path.stem[len("bench_"):] for path in bench_dir.glob("bench_*.py"))
    if args.families is not None and not args.families.strip(", "):  # ("" ran every family)
        return _fail(f"--families is empty; available: {', '.join(available) or 'none'}")
    families = (list(dict.fromkeys(name.strip() for name in args.families.split(",") if name.strip()))
                if args.families else available)
    missing = sorted(set(families) - set(available))
    if missing or not families:
        return _fail(f"no suite for families {missing or families} in {bench_dir}; available: {', '.join(available) or 'none'}")
    if args.from_log is not None:
        if args.keyword or args.device != "all" or args.full:  # (they were ignored: nothing runs)
            return _fail("--from-log runs nothing: -k, --device and --full do not apply (the log's cases are rendered; "
                         "--families selects among them)")
    else:
        budget = os.environ.get("LOWRANK_OPS_BENCH_TIME_BUDGET")
        if budget is not None and not _positive_float(budget):
            return _fail(f"LOWRANK_OPS_BENCH_TIME_BUDGET must be a number of seconds > 0; got {budget!r}")
        if args.device == "cuda" and not _cuda_usable():
            return _fail("--device cuda: no usable CUDA GPU (or lowrank_ops was built without CUDA); see lowrank-ops info")
    compare_with = None
    if args.compare is not None:
        try:
            compare_with = json.loads(args.compare.read_text())
        except (OSError, ValueError) as error:
            return _fail(f"--compare {args.compare}: cannot read it as JSON ({error})")
        # Checked before the run: a results.json ("records") or raw pytest-benchmark JSON
        # ("benchmarks"); anything else failed in the comparison, after the run, before
        # its results were written.
        if not (isinstance(compare_with, dict) and any(isinstance(compare_with.get(key), list)
                                                       for key in ("records", "benchmarks"))):
            return _fail(f"--compare {args.compare}: not a results.json or pytest-benchmark JSON (expected an "
                         "object with a 'records' or 'benchmarks' list)")
    for module in ("pytest", "pytest_benchmark"):
        if not _importable(module):
            return _fail(f"needs {module}: pip install pytest pytest-benchmark (or the package's [bench] extra)")

    now = _datetime.datetime.now().astimezone()
    logged = None
    if args.from_log is not None:  # read before the results directory is made (a bad log left it empty)
        try:
            machine, raw, logged = _read_case_log(args.from_log)
        except (OSError, ValueError, KeyError) as error:
            return _fail(f"--from-log {args.from_log}: cannot read it as a case log ({error})")
        # The logged run's settings (None from logs that predate them); --families selects
        # among the families its cases cover.
        in_log = list(dict.fromkeys(case.get("extra_info", {}).get("family") for case in raw["benchmarks"]))
        if args.families:
            absent = sorted(set(families) - set(in_log))
            if absent:
                return _fail(f"--from-log {args.from_log}: no case of families {absent}; it has {', '.join(in_log)}")
        else:
            families = in_log
        command = None if logged is None else dict(logged, families=families)
        raw["benchmarks"] = [case for case in raw["benchmarks"] if case.get("extra_info", {}).get("family") in families]
        raw["lowrank_ops"]["unsupported"] = [entry for entry in raw["lowrank_ops"]["unsupported"]
                                             if entry.get("family") in families]
    else:
        command = _command(args, families)
    out_dir = (args.out or bench_dir / "results" / "local" / now.strftime("%Y%m%d-%H%M%S")).resolve()
    try:  # before the run, not after it: a run of minutes must not end in a traceback
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return _fail(f"--out {out_dir}: cannot create the results directory ({error.strerror or error})")
    if args.from_log is not None:
        code = 0
    else:
        machine = machine_info(bench_dir, now)  # before the run: how busy the CPU is without us
        if (machine["cpu_busy_before"] or 0.0) > 0.25:
            print(f"note: {machine['cpu_busy_before']:.0%} of the CPU was busy before the run; other processes skew CPU timings")
        log_path = out_dir / "cases.jsonl"
        log_path.write_text(json.dumps({"machine": machine, "command": command}) + "\n")
        with tempfile.TemporaryDirectory(prefix="lowrank-ops-bench-") as tmp:
            raw_path = Path(tmp) / "pytest-benchmark.json"
            machine_before, ours_before = cpu_seconds(), os.times()
            code = _run_pytest(bench_dir, families, raw_path, log_path, args)
            machine["cpu_busy_others_during"] = others_busy(machine_before, cpu_seconds(), ours_before, os.times())
            # pytest-benchmark leaves an empty file when no case was timed (all skipped/deselected).
            text = raw_path.read_text() if raw_path.exists() else ""
        if not text.strip():
            print(f"\nno case was timed (pytest exit status {code}; cases skipped, deselected or failed)")
            return code or 1
        raw = json.loads(text)

    records = records_from_pytest_json(raw)
    unsupported = raw.get("lowrank_ops", {}).get("unsupported", [])
    rows = comparison_rows(records, unsupported)
    table = format_table(rows)
    notes = format_notes(records, unsupported)
    print()
    print(machine_line(machine))
    print(table)
    if notes:
        print(notes)
    comparison = ""
    if compare_with is not None:
        comparison = format_compare(records, compare_with)
        print()
        print(comparison)

    _write_results(out_dir, args, command, families, machine, code, rows, records, unsupported, notes, comparison)
    print(f"\nresults: {out_dir}")
    if (machine.get("cpu_busy_others_during") or 0.0) > 0.1:
        print(
            f"warning: other processes used {machine['cpu_busy_others_during']:.0%} of the CPU during the run; "
            "CPU timings are skewed (rerun on a quiet machine before recording them)"
        )
    if code != 0:
        print(f"lowrank-ops bench: pytest exited with status {code}", file=sys.stderr)
    return code


def _command(args, families) -> dict:
    """The run's settings, as results.json and the case log's first line record them."""
    return {"full": args.full, "families": families, "device": args.device, "keyword": args.keyword,
            "time_budget_s": os.environ.get("LOWRANK_OPS_BENCH_TIME_BUDGET")}


def _write_results(out_dir: Path, args, command, families, machine, code, rows, records, unsupported, notes,
                   comparison) -> None:
    """results.json (everything, for --compare and later analysis), results.md, <family>.png."""
    results = {
        "schema": 1,
        "machine": machine,
        "command": command,
        "pytest_exit_code": code,
        "rows": rows,
        "records": records,
        "unsupported": unsupported,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown_report(machine, rows, notes, comparison, command))
    if not args.no_plot:
        for family in families:
            plot_family(rows, family, out_dir / f"{family}.png", machine_line(machine))


def _read_case_log(path: Path):
    """(machine, pytest-benchmark-like JSON, the run's command or None) from a run's
    ``cases.jsonl``: timed cases, and peers recorded as unsupported (lines
    ``{"unsupported": ...}``)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or not isinstance(lines[0], dict) or not isinstance(lines[0].get("machine"), dict):
        raise ValueError("its first line is not the run's machine record")
    if not all(isinstance(line, dict) for line in lines[1:]):
        raise ValueError("a line after the first is not a JSON object")
    timed = [line for line in lines[1:] if "unsupported" not in line]
    unsupported = [line["unsupported"] for line in lines[1:] if "unsupported" in line]
    return (lines[0]["machine"], {"benchmarks": timed, "lowrank_ops": {"unsupported": unsupported}},
            lines[0].get("command"))


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


# ---------------------------------------------------------------------------- helpers
def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _positive_float(text: str) -> bool:
    try:
        return 0 < float(text) < float("inf")
    except ValueError:
        return False


def _cuda_usable() -> bool:
    from .info import info

    facts = info()
    return bool(facts.get("cuda_compiled")) and bool(facts.get("devices"))


def _fail(message: str) -> int:
    print(f"lowrank-ops bench: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
