"""pytest wiring for the benchmarks: the timer fixture and the summary printed at the end."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


@pytest.fixture
def bench_timer(request):
    device = harness.bench_device()

    def run(case, variant, fn):
        if device == "cuda":
            timing = harness.time_gpu(fn)
            timing.update(harness.time_gpu_wall(fn))
        else:
            timing = harness.time_cpu_case(case, variant)
        timing["peak_bytes"] = harness.peak_bytes(fn, device)
        harness.record(case, variant, timing, device)

    return run


_run = {"files": set(), "deselected": False}


def pytest_collection_modifyitems(session, config, items):
    _run["files"] |= {os.path.basename(str(item.fspath)) for item in items}
    # Tests named by node id (file::test) are a selection that pytest does not report as deselected.
    if any("::" in str(arg) for arg in config.args):
        _run["deselected"] = True


def pytest_deselected(items):
    _run["deselected"] = True


def _whole_suite() -> bool:
    """Every benchmark file of the harness ran, nothing deselected: the run behind the all-<device>.json file
    (a partial run must not overwrite it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    harness_files = set()
    for name in os.listdir(here):
        if name.startswith("bench_") and name.endswith(".py"):
            with open(os.path.join(here, name)) as f:
                if "harness.bench_test(" in f.read():
                    harness_files.add(name)
    return not _run["deselected"] and harness_files <= _run["files"]


def results_label(rows, exitstatus) -> str:
    """"all" (the file behind RESULTS.md's tables) only for a whole run that finished with every case passed: an
    interrupted run (Ctrl-C) or one with failures reaches the summary too, with part of the rows. Otherwise the
    ops that ran."""
    return "all" if _whole_suite() and exitstatus == 0 else "-".join(sorted({r["op"] for r in rows}))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus):
    rows = harness.summary_rows()
    if not rows:
        return
    path = harness.write_results(results_label(rows, exitstatus), " ".join(sys.argv))
    terminalreporter.write_sep("=", f"hiertcn_fast benchmarks on {harness.bench_device()} (speedup = baseline time / "
                                    f"variant time, same run)")
    terminalreporter.write_line(harness.load_line())
    terminalreporter.write_line(harness.format_table(rows))
    terminalreporter.write_line(f"results: {path}")
