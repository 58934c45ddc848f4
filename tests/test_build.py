"""The build and packaging contract (DESIGN.md section 3): what was compiled, import
without a GPU, info() and the command line."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_ops
from lowrank_ops import _extension


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def elf_section_names(path: str) -> set:
    """Names of the sections of a 64-bit little-endian ELF file (enough for our .so)."""
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected a 64-bit ELF shared object"
    section_offset = struct.unpack_from("<Q", data, 0x28)[0]
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    names_header = section_offset + names_index * entry_size
    names_offset = struct.unpack_from("<Q", data, names_header + 0x18)[0]
    names = set()
    for i in range(count):
        name_offset = struct.unpack_from("<I", data, section_offset + i * entry_size)[0]
        start = names_offset + name_offset
        names.add(data[start : data.index(b"\0", start)].decode())
    return names


def test_extension_imports_and_reports():
    assert _extension.import_error() is None
    facts = lowrank_ops.info()
    assert facts["extension_loaded"] and facts["version"] == lowrank_ops.__version__
    assert facts["torch_version"] == torch.__version__
    assert facts["cpu_threads"] == torch.get_num_threads()
    if not torch.cuda.is_available():
        assert facts["cuda_available"] is False and facts["devices"] == []


def test_type_stub_parses_and_lists_every_function():
    """python/lowrank_ops/_C.pyi: valid Python, one stub per function of the compiled module."""
    import ast
    import pathlib

    stub = pathlib.Path(lowrank_ops.__file__).with_name("_C.pyi")
    tree = ast.parse(stub.read_text())
    stubbed = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    compiled = {name for name in dir(_extension.extension()) if not name.startswith("_")
                and callable(getattr(_extension.extension(), name))}
    assert compiled - stubbed == set(), f"functions of _C without a stub: {sorted(compiled - stubbed)}"
    assert stubbed - compiled == set(), f"stubs without a function in _C: {sorted(stubbed - compiled)}"


@pytest.mark.skipif(not nvcc_available(), reason="nvcc is not installed: CUDA kernels are not expected")
@pytest.mark.skipif(os.environ.get("LOWRANK_OPS_CUDA", "AUTO").upper() == "OFF", reason="CUDA disabled by LOWRANK_OPS_CUDA=OFF")
def test_cuda_kernels_compiled_whenever_nvcc_is_present():
    facts = lowrank_ops.info()
    assert facts["cuda_compiled"], "nvcc is on this machine but the CUDA kernels were not compiled"
    archs = os.environ.get("LOWRANK_OPS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    assert facts["cuda_archs"] == [f"sm_{arch}" for arch in archs]
    # Device code really is in the module, not just a flag.
    assert ".nv_fatbin" in elf_section_names(_extension.extension().__file__)


def test_import_needs_no_gpu_or_driver():
    # A fresh interpreter with every GPU hidden must import and report cleanly.
    code = "import json, lowrank_ops; print(json.dumps(lowrank_ops.info()))"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["cuda_available"] is False and facts["extension_loaded"] is True


def test_kernels_without_avx512():
    """The AVX2 / generic paths that CPU-feature checks choose on machines without AVX-512
    (32-byte tiles of the multi-adapter kernels, the scalar SpMV loop, BLAS for the small-batch
    base products), run here by hiding AVX-512 (LOWRANK_OPS_DISABLE_AVX512) in a subprocess."""
    if "avx512f" not in lowrank_ops.info()["cpu_features"]:
        pytest.skip("no AVX-512 on this CPU: the default run already takes these paths")
    tests = Path(__file__).parent
    env = dict(os.environ, LOWRANK_OPS_DISABLE_AVX512="1")
    code = "import lowrank_ops; assert 'avx512f' not in lowrank_ops.info()['cpu_features']"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
               str(tests / "test_lora_multi.py"), str(tests / "test_sparse.py"), str(tests / "test_base_linear.py"),
               "-k", "not cuda and (kernel_tiles or matches_reference or spmv or small_batch or dispatch)"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_import_does_not_change_torch_global_flags():
    code = (
        "import torch; before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, "
        "torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()); import lowrank_ops; "
        "after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, "
        "torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()); assert before == after, (before, after)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_info(capsys):
    from lowrank_ops.cli import main

    assert main(["info", "--json"]) in (0, None)
    facts = json.loads(capsys.readouterr().out)
    assert facts["version"] == lowrank_ops.__version__ and "cuda_compiled" in facts
    assert main(["info"]) in (0, None)
    assert "cuda_compiled" in capsys.readouterr().out


def test_console_script_is_installed():
    executable = shutil.which("lowrank-ops")
    if executable is None:
        pytest.skip("lowrank-ops is not on PATH (package not installed as a distribution)")
    result = subprocess.run([executable, "info"], capture_output=True, text=True, check=True)
    assert "version" in result.stdout


def test_bench_table_bounds_ratios_of_truncated_solvers():
    from lowrank_ops._bench_report import comparison_rows, format_table

    case = dict(family="ot", op="ot.images", shape="images", dtype="float64", device="cpu", flops=0.0, bytes=0.0)
    records = [dict(case, impl="ours", median_s=0.4, max_error=1e-9),
               dict(case, impl="capped_peer", median_s=0.2, max_error=0.5, truncated=True),
               dict(case, impl="converged_peer", median_s=0.8, max_error=1e-9, truncated=False)]
    table = format_table(comparison_rows(records, []))
    lines = {line.split()[6]: line for line in table.splitlines() if "peer" in line and "ot.images" in line}
    assert ">=0.50x" in lines["capped_peer"] and " 2.00x" in lines["converged_peer"]
    ours_capped = [dict(records[0], truncated=True), records[2]]
    assert "<=2.00x" in format_table(comparison_rows(ours_capped, []))


def test_bench_from_log_renders_timed_cases_memory_and_unsupported_peers(tmp_path, capsys):
    """``lowrank-ops bench --from-log`` re-renders a run from its case log: timed cases with
    what the suite recorded after timing (peak memory), and peers that could not run."""
    from lowrank_ops.cli import main

    machine = dict(timestamp="2026-01-01T00:00:00+00:00", cpu="test cpu", cpu_cores=2, torch_threads=2, gpus=[],
                   cuda_compiled=False, platform="linux", python="3", torch="2", lowrank_ops="0",
                   git_sha="0" * 40, git_dirty=False, cpu_busy_before=0.0)
    case = dict(family="sparse_lowrank", op="sparse_lowrank_linear.fwd", shape="8x8", dtype="float32", device="cpu",
                flops=1e6, bytes=1e6)
    stats = dict(min=1e-3, max=1e-3, mean=1e-3, stddev=0.0, median=1e-3, iqr=0.0, rounds=5)
    lines = [{"machine": machine},
             {"name": "a", "extra_info": dict(case, impl="ours", max_error=1e-7, peak_mem_MB=1.0), "stats": stats},
             {"name": "b", "extra_info": dict(case, impl="paper", max_error=1e-7, peak_mem_MB=4.0),
              "stats": dict(stats, median=2e-3)},
             {"unsupported": dict(case, impl="old_peer", reason="RuntimeError: too big")}]
    log = tmp_path / "cases.jsonl"
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["bench", "--from-log", str(log), "--out", str(tmp_path / "out"), "--no-plot"]) == 0
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| paper | 2.00 | 2.00x |" in report and "| 1.0 | 4.0 | 4.00x |" in report
    assert "| old_peer | unsupported |" in report and "old_peer on sparse_lowrank_linear.fwd 8x8" in report


def test_bench_out_that_cannot_be_created_fails_before_the_run(tmp_path, capsys):
    from lowrank_ops.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "--families", "qr", "--out", str(blocker / "out"), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert f"lowrank-ops bench: --out {blocker / 'out'}: cannot create the results directory (Not a directory)" in err


def test_bench_bad_compare_file_and_sparse_log_records_fail_cleanly(tmp_path, capsys):
    """--compare with JSON that is not a results file failed with an AttributeError after
    the run, before its results were written: now refused before the run.  A case log
    whose machine record lacks fields (hand-edited, older) rendered with a KeyError: now '?'."""
    from lowrank_ops.cli import main

    not_results = tmp_path / "list.json"
    not_results.write_text("[]")
    assert main(["bench", "--families", "qr", "--compare", str(not_results), "--out", str(tmp_path / "o"),
                 "--no-plot"]) == 2
    assert "--compare" in capsys.readouterr().err and not (tmp_path / "o").exists()
    log = tmp_path / "cases.jsonl"
    log.write_text(json.dumps({"machine": {}}) + "\n")
    assert main(["bench", "--from-log", str(log), "--out", str(tmp_path / "out"), "--no-plot"]) == 0
    log.write_text(json.dumps({"machine": []}) + "\n")
    assert main(["bench", "--from-log", str(log), "--out", str(tmp_path / "out2"), "--no-plot"]) == 2
    assert "not the run's machine record" in capsys.readouterr().err


def test_compare_skips_malformed_old_records():
    """Hand-edited records in the --compare file ([{'junk': 1}, 5, None], string times)
    raised AttributeError / TypeError tracebacks after the run; now they are skipped."""
    from lowrank_ops._bench_report import CASE_KEYS, format_compare

    case = {key: f"v{i}" for i, key in enumerate(CASE_KEYS)}
    now = [dict(case, impl="ours", median_s=0.002)]
    junk = [{"junk": 1}, 5, None, dict(case, impl="ours", median_s="fast"), dict(case, impl="ours", median_s=True)]
    assert format_compare(now, {"records": junk}).endswith("no matching cases")
    text = format_compare(now, {"records": junk + [dict(case, impl="ours", median_s=0.004)]})
    assert "-50.0%" in text


def test_bench_refuses_bad_settings_before_the_run(tmp_path, capsys, monkeypatch):
    """An empty --families ran every suite; a bad LOWRANK_OPS_BENCH_TIME_BUDGET failed in
    pytest's collection (10 lines, exit 4); --device cuda without a GPU exited 0 with
    nothing timed; a bad --from-log left an empty results directory."""
    from lowrank_ops.cli import main

    out = tmp_path / "out"
    assert main(["bench", "--families", " ,", "--out", str(out)]) == 2
    assert "--families is empty; available:" in capsys.readouterr().err
    monkeypatch.setenv("LOWRANK_OPS_BENCH_TIME_BUDGET", "abc")
    assert main(["bench", "--families", "qr", "--out", str(out)]) == 2
    assert "LOWRANK_OPS_BENCH_TIME_BUDGET must be a number of seconds > 0; got 'abc'" in capsys.readouterr().err
    monkeypatch.delenv("LOWRANK_OPS_BENCH_TIME_BUDGET")
    if not (lowrank_ops.info()["cuda_compiled"] and lowrank_ops.info()["devices"]):
        assert main(["bench", "--families", "qr", "--device", "cuda", "--out", str(out)]) == 2
        assert "--device cuda: no usable CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "--from-log", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert not out.exists()


def test_bench_from_log_keeps_the_logged_runs_settings(tmp_path, capsys):
    """--from-log recorded the rendering command's settings (a --full run saved as full:
    false, every family listed); --families selected the plots only, not the table."""
    from lowrank_ops.cli import main

    stats = dict(min=1e-3, max=1e-3, mean=1e-3, stddev=0.0, median=1e-3, iqr=0.0, rounds=5)
    command = dict(full=True, families=["qr", "ot"], device="cpu", keyword=None, time_budget_s="2")
    lines = [{"machine": {}, "command": command}]
    for family in ("qr", "ot"):
        case = dict(family=family, op=f"{family}.op", shape="s", dtype="float64", device="cpu", flops=0.0, bytes=0.0)
        lines += [{"name": f"{family}a", "extra_info": dict(case, impl="ours", max_error=0.0), "stats": stats},
                  {"name": f"{family}b", "extra_info": dict(case, impl="peer", max_error=0.0), "stats": stats}]
    log = tmp_path / "cases.jsonl"
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert main(["bench", "--from-log", str(log), "--families", "ot", "--out", str(tmp_path / "o"), "--no-plot"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["command"] == dict(command, families=["ot"])
    assert {row["family"] for row in results["rows"]} == {"ot"}
    assert all(row["ours_gflops"] is None for row in results["rows"])  # no flops recorded: "-", not 0.0
    report = (tmp_path / "o" / "results.md").read_text()
    assert "run: --full (the papers' sizes), device cpu, families ot, 2 s per case" in report
    assert main(["bench", "--from-log", str(log), "--families", "lora", "--out", str(tmp_path / "x")]) == 2
    assert "no case of families ['lora']; it has qr, ot" in capsys.readouterr().err
    assert main(["bench", "--from-log", str(log), "-k", "ours", "--out", str(tmp_path / "x")]) == 2
    assert "-k, --device and --full do not apply" in capsys.readouterr().err
    log.write_text("\n".join(json.dumps(line) for line in [{"machine": {}}] + lines[1:]) + "\n")  # an older log
    assert main(["bench", "--from-log", str(log), "--out", str(tmp_path / "old"), "--no-plot"]) == 0
    old = json.loads((tmp_path / "old" / "results.json").read_text())
    assert old["command"] is None and {row["family"] for row in old["rows"]} == {"qr", "ot"}
    assert "run settings: not recorded" in (tmp_path / "old" / "results.md").read_text()


def test_bench_interleaved_times_the_suites_own_builds(capsys):
    """bench/interleaved.py builds the chosen impls of one case through the suite's own
    ``measure`` call (the same inputs and functions as the suite times) and times them in
    turns; an impl without such a case is an error naming it."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "interleaved.py"
    spec = importlib.util.spec_from_file_location("bench_interleaved", path)
    interleaved = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interleaved)
    interleaved.main(["sparse", "test_spmv", "2048x5461", "ours,torch_csr", "--reps", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["ours: spmv 2048x5461 d=0.03 float32 cpu", "torch_csr: spmv 2048x5461 d=0.03 float32 cpu"]
    assert [line.split(":")[0].strip() for line in lines[2:]] == ["ours", "torch_csr"]
    assert "ratio  1.000" in lines[2] and " ms " in lines[3]
    with pytest.raises(SystemExit, match="for no_such_impl"):
        interleaved.main(["sparse", "test_spmv", "2048x5461", "ours,no_such_impl", "--reps", "1"])
    capsys.readouterr()
    # One op among several under a shape label (bench_qr: the first case was always tall_gram).
    interleaved.main(["qr", "test_qr", "4096x74 row", "ours,torch", "--op", "cholesky_qr2", "--reps", "1"])
    assert capsys.readouterr().out.splitlines()[0] == "ours: cholesky_qr2 4096x74 row float32 cpu"
    with pytest.raises(SystemExit, match="benchmark.pedantic"):
        interleaved.main(["krylov", "test_solve_sequence", "darcy", "ours", "--reps", "1"])
