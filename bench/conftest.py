"""pytest configuration of the benchmark suites.

* collects ``bench_*.py`` (so ``pytest bench/`` works, not only explicit file paths);
* ``--bench-device cpu|cuda|all`` deselects cases on other devices (each case's device is
  its ``case.device``);
* adds the harness's records of unsupported peers, and the size mode, to the
  pytest-benchmark JSON under the key ``"lowrank_ops"``, where ``lowrank-ops bench``
  reads them;
* appends every timed case to the run's case log once its test has returned (so what a
  suite adds to ``extra_info`` after timing, such as ``peak_mem_MB``, is in it).
"""
from __future__ import annotations

import pytest

import _harness


def pytest_addoption(parser):
    parser.addoption(
        "--bench-device",
        choices=("cpu", "cuda", "all"),
        default="all",
        help="run benchmark cases on this device only (default: all; unusable devices skip)",
    )


def pytest_collect_file(file_path, parent):
    # pytest collects test_*.py by default; explicit paths are collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--bench-device")
    if wanted == "all":
        return
    keep, drop = [], []
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        device = getattr(case, "device", None)
        (drop if device is not None and device != wanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    if outcome.excinfo is None and benchmark is not None and benchmark.stats is not None:
        _harness.log_case(benchmark)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["lowrank_ops"] = {"full": _harness.FULL, "unsupported": list(_harness.UNSUPPORTED)}
