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
        else:
            timing = harness.time_cpu_case(case, variant)
        timing["peak_bytes"] = harness.peak_bytes(fn, device)
        harness.record(case, variant, timing, device)

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    rows = harness.summary_rows()
    if not rows:
        return
    label = "-".join(sorted({r["op"] for r in rows})) if len({r["op"] for r in rows}) <= 2 else "all"
    path = harness.write_results(label, " ".join(sys.argv))
    terminalreporter.write_sep("=", f"hiertcn_fast benchmarks on {harness.bench_device()} (speedup = baseline time / "
                                    f"variant time, same run)")
    terminalreporter.write_line(harness.format_table(rows))
    terminalreporter.write_line(f"results: {path}")
