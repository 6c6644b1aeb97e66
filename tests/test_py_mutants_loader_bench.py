"""Tests that kill mutants of hiertcn_fast/_extension.py, hiertcn_fast/triton/__init__.py, the package __init__.py
files and benchmarks/harness.py and benchmarks/summarize.py which the rest of the suite let survive (a
mutation-testing audit): the guarded load of the compiled extension and its build flags, the Triton launcher,
what each package exports, and the benchmark harness's building of cases, same-result check, timing rounds,
medians, speed-ups, GB/s and TFLOP/s, device peaks, machine description, table and JSON output.

Every expected value is hand-computed (a fake clock whose costs are powers of two, so that every sum is exact;
fake CUDA timers and allocators; hand-written rows) or read independently (pyproject.toml, git, the extension's
own build_info op), never taken from the code under test. Nothing here times anything for real or needs a GPU;
module state that a test replaces (the extension's globals, the harness's caches) is restored by monkeypatch."""

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
import types

import pytest
import torch

import hiertcn_fast
from hiertcn_fast import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load_harness():
    spec = importlib.util.spec_from_file_location("bench_harness_mutants", os.path.join(BENCH, "harness.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


@pytest.fixture
def fresh_harness(monkeypatch):
    """The harness with empty caches and results, restored afterwards."""
    monkeypatch.setattr(harness, "_results", [])
    monkeypatch.setattr(harness, "_built", {"id": None, "variants": None})
    monkeypatch.setattr(harness, "_interleaved", {"id": None, "timings": None})
    monkeypatch.delenv("HIERTCN_BENCH_COMPILE", raising=False)
    monkeypatch.delenv("HIERTCN_BENCH_FULL", raising=False)
    monkeypatch.setenv("HIERTCN_BENCH_DEVICE", "cpu")
    return harness


class FakeClock:
    """harness.time with a perf_counter that only the variants advance: calls cost what they say, exactly."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _costing(clock, cost, calls):
    def run():
        clock.now += cost(len(calls))
        calls.append(None)
    return run


# ----------------------------------------------------------------------------------------------------------------
# hiertcn_fast/_extension.py
# ----------------------------------------------------------------------------------------------------------------

def test_an_extension_built_against_another_torch_is_reported_not_raised(monkeypatch):
    """Kills E1 (_extension.py: _load catches only ModuleNotFoundError) and E2 (_extension.py: the kept error
    drops the exception's type). A _C built against another torch fails with ImportError (an undefined symbol),
    not ModuleNotFoundError: the import of hiertcn_fast must still succeed, with the error kept as 'Type: text'."""
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", None)

    def broken(name):
        assert name == "hiertcn_fast._C"
        raise ImportError("undefined symbol: _ZN3c104impl3cow")

    monkeypatch.setattr(_extension, "importlib", types.SimpleNamespace(import_module=broken))
    _extension._load()
    assert not _extension.loaded() and _extension.module() is None
    assert _extension.load_error() == "ImportError: undefined symbol: _ZN3c104impl3cow"


def test_without_the_extension_register_fake_keeps_the_load_error(monkeypatch):
    """Kills E4 (_extension.py: register_fake's early return without the extension dropped). Without _C every
    decorator must hand the function back untouched and keep the real reason (not loaded), not replace it with
    'out of date' for an op the missing build of course lacks."""
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", "ModuleNotFoundError: No module named 'hiertcn_fast._C'")

    def fake(x):
        return x

    assert _extension.register_fake("an_op_no_build_has")(fake) is fake
    assert _extension.load_error() == "ModuleNotFoundError: No module named 'hiertcn_fast._C'"
    assert not _extension.loaded()


def test_the_prepared_tcn_step_needs_a_loaded_extension_that_has_it(monkeypatch):
    """Kills E9 (_extension.py: has_tcn_step_plan reads `loaded or has TcnStepPlan`). A loaded build without the
    python bindings has no prepared step."""
    monkeypatch.setattr(_extension, "_module", types.SimpleNamespace())
    assert _extension.has_tcn_step_plan() is False
    monkeypatch.setattr(_extension, "_module", types.SimpleNamespace(TcnStepPlan=object))
    assert _extension.has_tcn_step_plan() is True
    monkeypatch.setattr(_extension, "_module", None)
    assert _extension.has_tcn_step_plan() is False


def test_compiled_with_cuda_reads_the_cuda_flag_not_the_word(monkeypatch):
    """Kills E11 (_extension.py: compiled_with_cuda tests `"cuda" in build_info()`). A CPU-only build says
    "cuda=0": it has no CUDA kernels. The real answer agrees with the op's own flags, read here directly."""
    assert _extension.loaded(), _extension.load_error()
    flags = torch.ops.hiertcn_fast.build_info().split()
    assert _extension.compiled_with_cuda() == ("cuda=1" in flags)
    monkeypatch.setattr(_extension, "_build_info", "cuda=0 openmp=1")
    assert _extension.compiled_with_cuda() is False
    monkeypatch.setattr(_extension, "_build_info", "cuda=1 openmp=1")
    assert _extension.compiled_with_cuda() is True


def test_an_extension_marked_out_of_date_has_no_build_flags(monkeypatch):
    """Kills E12 (_extension.py: build_info returns the flags read at import even after register_fake marked the
    extension out of date). The cuda backend must not be offered by a build that is not used."""
    monkeypatch.setattr(_extension, "_module", _extension._module)
    monkeypatch.setattr(_extension, "_error", _extension._error)
    monkeypatch.setattr(_extension, "_build_info", "cuda=1 openmp=1")
    _extension.register_fake("op_this_build_lacks")(lambda: None)
    assert not _extension.loaded()
    assert _extension.build_info() == "" and _extension.compiled_with_cuda() is False


_TRACE_BUILD_FLAGS = """
import torch
import hiertcn_fast
from hiertcn_fast import _extension
assert _extension.loaded(), _extension.load_error()

def f(x):
    return x + 1 if _extension.compiled_with_cuda() else x - 1

print(torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)).tolist())
"""


def test_the_build_flags_are_read_at_import_so_that_compiled_code_can_ask(monkeypatch):
    """Kills E13 (_extension.py: build_info calls the op at every call) and E14 (_extension.py: the import no
    longer reads the flags). Backend selection asks for them while torch.compile traces, where an op returning a
    string cannot be called: a fullgraph trace of a function asking compiled_with_cuda() must work, also as the
    first question of a fresh process (a subprocess)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("HIERTCN_EMULATE_CUDA", None)
    done = subprocess.run([sys.executable, "-c", _TRACE_BUILD_FLAGS], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    flags = torch.ops.hiertcn_fast.build_info().split()
    assert done.stdout.strip().splitlines()[-1] == ("[1.0, 1.0]" if "cuda=1" in flags else "[-1.0, -1.0]")


# ----------------------------------------------------------------------------------------------------------------
# hiertcn_fast/triton/__init__.py
# ----------------------------------------------------------------------------------------------------------------

def test_the_launcher_wraps_compiled_kernels_and_passes_interpreted_ones(monkeypatch):
    """Kills T1 (triton/__init__.py: the interpreter check dropped, interpreted kernels go through wrap_triton too,
    which torch 2.11 refuses; this torch accepts them, so only the launcher's answer shows it) and T2 (launcher
    returns the kernel without torch.library.wrap_triton, also killed by test_triton_compile.py). Outside the
    interpreter the launch must go through wrap_triton (what torch.compile traces), looked up at each call."""
    import hiertcn_fast.triton as kernels

    wrapped = []

    def recording_wrap_triton(kernel):
        wrapped.append(kernel)
        return ("wrapped", kernel)

    kernel = object()
    monkeypatch.setattr(torch.library, "wrap_triton", recording_wrap_triton)
    monkeypatch.setattr(kernels, "triton_interpreted", lambda: False)
    assert kernels.launcher(kernel) == ("wrapped", kernel) and wrapped == [kernel]
    monkeypatch.setattr(kernels, "triton_interpreted", lambda: True)
    assert kernels.launcher(kernel) is kernel and wrapped == [kernel]


# ----------------------------------------------------------------------------------------------------------------
# the package __init__.py files
# ----------------------------------------------------------------------------------------------------------------

EXPORTS = {
    "hiertcn_fast": {"BackendStatus", "BackendUnavailableError", "backends", "nn", "ops", "use_backend",
                     "__version__"},
    "hiertcn_fast.ops": {"CausalConvState", "causal_conv1d", "causal_conv1d_reference", "causal_conv1d_step",
                         "causal_conv1d_step_reference", "context_table", "cpu_conv_blas", "forget_weight_caches", "gru",
                         "gru_cell", "gru_cell_reference", "gru_gates", "gru_gates_reference", "gru_reference",
                         "linear_cross_entropy", "linear_cross_entropy_reference", "session_update",
                         "session_update_reference", "session_update_steps", "session_update_steps_reference",
                         "set_cpu_conv_blas", "tcn_step"},
    "hiertcn_fast.nn": {"CausalConv1d", "GRU", "GRUCell", "TCN", "TCNState", "TemporalBlock"},
    "hiertcn_fast.models": {"HISTORY_SCOPES", "EvalEvents", "iter_split_events", "RULES", "MostPopular",
                            "RepeatPrevious", "RuleModel", "TransitionCounts", "NextItemModel", "HierTCN", "HierGRU",
                            "HRNN", "SessionGRU", "HistoryTCN", "HistoryBatch", "UserHistoryBatcher",
                            "NEURAL_MODELS"},
    "hiertcn_fast.data": {"ArraySource", "CacheCorruptError", "SessionCache", "PreprocessParams", "cache_key",
                          "preprocess", "DelimitedSource", "InteractionChunk", "InteractionSource",
                          "MalformedRecordError", "ReadStats", "RecBoleInterSource", "XingSource", "load_dataset",
                          "recbole_example_path", "SyntheticSource", "BATCH_FIELDS", "LaneStateCache",
                          "SessionBatch", "SessionBatcher", "PinnedRingQueue", "QueueStats"},
}


@pytest.mark.parametrize("package", sorted(EXPORTS))
def test_each_package_exports_its_public_names(package):
    """Kills I2 (__init__.py: use_backend left out of __all__), I4 (ops/__init__.py: tcn_step left out), I5
    (nn/__init__.py: a misspelt name in __all__), I7 (models/__init__.py: NextItemModel left out), I8 and I9
    (data/__init__.py: SyntheticSource left out; QueueStats misspelt). `from package import *` gives exactly the
    public names, each the package's own attribute."""
    namespace = {}
    exec(f"from {package} import *", namespace)
    del namespace["__builtins__"]
    assert set(namespace) == EXPORTS[package]
    module = sys.modules[package]
    assert all(namespace[name] is getattr(module, name) for name in namespace)


def test_the_version_is_the_distributions():
    """Kills I1 (__init__.py: __version__ drifts from the version pyproject.toml gives the distribution)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert hiertcn_fast.__version__ == tomllib.load(f)["project"]["version"]


def test_the_neural_models_are_named_for_their_classes():
    """Kills I6 (models/__init__.py: NEURAL_MODELS maps "hrnn" and "hiergru" to each other's class). HierTCN
    comes first, as the docstring says."""
    from hiertcn_fast.models import NEURAL_MODELS

    assert {name: cls.__name__ for name, cls in NEURAL_MODELS.items()} == {
        "hiertcn": "HierTCN", "hrnn": "HRNN", "hiergru": "HierGRU", "session_gru": "SessionGRU",
        "history_tcn": "HistoryTCN"}
    assert next(iter(NEURAL_MODELS)) == "hiertcn"


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/harness.py: environment knobs, building cases, the same-result check
# ----------------------------------------------------------------------------------------------------------------

def test_the_quick_matrix_is_the_default(fresh_harness, monkeypatch):
    """Kills H2 (harness.py: HIERTCN_BENCH_FULL defaults to "1"). Only HIERTCN_BENCH_FULL=1 asks for the full
    shape matrix; unset, the quick one runs."""
    assert harness.full_matrix() is False
    monkeypatch.setenv("HIERTCN_BENCH_FULL", "1")
    assert harness.full_matrix() is True


def test_the_results_folder_follows_the_environment(monkeypatch, tmp_path):
    """Kills H1 (harness.py: RESULTS_DIR reads another variable than HIERTCN_BENCH_OUT)."""
    monkeypatch.setenv("HIERTCN_BENCH_OUT", str(tmp_path))
    assert _load_harness().RESULTS_DIR == str(tmp_path)
    monkeypatch.delenv("HIERTCN_BENCH_OUT")
    assert _load_harness().RESULTS_DIR == os.path.join(BENCH, "results")


def test_a_cases_inputs_are_the_same_in_every_run(fresh_harness):
    """Kills H5 (harness.py: the per-case seed dropped). A case's inputs are drawn from a seed of its own, not from
    whatever state the generator was left in: built twice, with the generator disturbed in between, the same."""
    drawn = []

    def make():
        x = torch.randn(8)
        drawn.append(x)
        return {"hiertcn_fast": lambda: x, "torch eager": lambda: x}

    case = harness.Case("op", "seeded", make, variants=("hiertcn_fast", "torch eager"))
    harness._variants(case)
    harness._built.update(id=None, variants=None)
    torch.manual_seed(987654)
    torch.randn(100)
    harness._variants(case)
    assert len(drawn) == 2 and torch.equal(drawn[0], drawn[1])


def test_make_must_return_exactly_the_declared_variants(fresh_harness):
    """Kills H6 (harness.py: the check of make()'s variant names against the declared ones dropped)."""
    x = torch.ones(2)
    case = harness.Case("op", "extra", lambda: {"hiertcn_fast": lambda: x, "torch eager": lambda: x,
                                                "extra": lambda: x}, variants=("hiertcn_fast", "torch eager"))
    with pytest.raises(KeyError, match="make\\(\\) returned variants"):
        harness._variants(case)


def test_a_case_is_built_once_for_all_its_variants(fresh_harness):
    """Kills H8 (harness.py: the built case is not remembered). The variants of one case run back to back on the
    same inputs: make() runs once, and every variant gets the same callables."""
    made = []
    x = torch.ones(2)

    def make():
        made.append(None)
        return {"hiertcn_fast": lambda: x, "torch eager": lambda: x}

    case = harness.Case("op", "once", make, variants=("hiertcn_fast", "torch eager"))
    first = harness._variants(case)
    assert harness._variants(case) is first and len(made) == 1


def test_a_result_that_is_not_tensors_cannot_be_compared(fresh_harness):
    """Kills H9 (harness.py: a result of another type reads as no tensors). A dict of tensors must not pass the
    same-result check by comparing nothing."""
    x = torch.ones(3)
    variants = {"hiertcn_fast": lambda: {"out": x + 1}, "torch eager": lambda: {"out": x}}
    case = harness.Case("op", "dict", lambda: variants, variants=tuple(variants))
    with pytest.raises(TypeError, match="cannot compare a variant's result of type dict"):
        harness.check_same_result(case, variants)


def _check(dtype, expected, got):
    variants = {"hiertcn_fast": lambda: got, "torch eager": lambda: expected}
    harness.check_same_result(harness.Case("op", "tol", lambda: variants, variants=tuple(variants), dtype=dtype),
                              variants)


def test_the_same_result_tolerance_scales_with_the_largest_magnitude(fresh_harness):
    """Kills H11 (harness.py: the tolerance scales with the largest value, not the largest magnitude). Results of
    about -1000 that agree to 0.1 (float32: 2e-4 * 1000 = 0.2) agree; read as scale 1, they were refused."""
    expected = torch.full((4,), -1000.0)
    _check(torch.float32, expected, expected + 0.1)
    with pytest.raises(AssertionError):
        _check(torch.float32, expected, expected + 0.5)


def test_the_same_result_tolerance_is_the_cases_dtypes(fresh_harness):
    """Kills H12 (harness.py: every case gets float32's tolerance) and H13 (harness.py: float32's tolerance 2e-3,
    not 2e-4). Per dtype, on values of magnitude <= 1: float16 allows 2e-2, float32 2e-4, float64 1e-9."""
    half = torch.full((3,), 0.5, dtype=torch.float16)
    _check(torch.float16, half, half + 0.01)
    single = torch.full((3,), 0.5)
    _check(torch.float32, single, single + 1e-4)
    with pytest.raises(AssertionError):
        _check(torch.float32, single, single + 1e-3)
    double = torch.full((3,), 0.5, dtype=torch.float64)
    _check(torch.float64, double, double + 1e-10)
    with pytest.raises(AssertionError):
        _check(torch.float64, double, double + 1e-6)


def test_a_case_without_its_baseline_is_refused(fresh_harness):
    """Kills H14 (harness.py: bench_test checks only that the fast variant is declared). A speed-up needs the
    baseline's time: a case that declares no baseline variant is an error when the benchmarks are collected."""
    def cases(device, quick):
        return [harness.Case("op", "nobase", dict, variants=("hiertcn_fast", "torch.compile"))]

    with pytest.raises(ValueError, match="must include 'hiertcn_fast' and 'torch eager'"):
        harness.bench_test(cases)


def test_no_compiled_variant_is_collected_when_they_are_off(fresh_harness, monkeypatch):
    """Kills H15 (harness.py: bench_test parametrizes every declared variant, not the ones this run times). With
    HIERTCN_BENCH_COMPILE=0 no torch.compile test may be collected (it would fail: its variant is not built)."""
    def cases(device, quick):
        return [harness.Case("op", "c", dict)]

    def ids(test):
        return [param.id for param in test.pytestmark[0].args[1]]

    assert ids(harness.bench_test(cases)) == ["op c-hiertcn_fast", "op c-torch eager", "op c-torch.compile"]
    monkeypatch.setenv("HIERTCN_BENCH_COMPILE", "0")
    assert ids(harness.bench_test(cases)) == ["op c-hiertcn_fast", "op c-torch eager"]


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/harness.py: timing
# ----------------------------------------------------------------------------------------------------------------

def test_the_gpu_timer_reports_the_median_and_minimum_in_seconds(monkeypatch):
    """Kills H16 (harness.py: time_gpu's median is the mean) and H17 (harness.py: its minimum divided by 1e6).
    do_bench's times are milliseconds: [3, 1, 2, 10] ms -> median 2.5 ms, minimum 1 ms, 4 rounds."""
    calls = []
    testing = types.ModuleType("triton.testing")
    testing.do_bench = lambda fn, warmup, rep, return_mode: [3.0, 1.0, 2.0, 10.0]
    monkeypatch.setitem(sys.modules, "triton.testing", testing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    timing = harness.time_gpu(lambda: calls.append(None))
    assert timing == {"median_s": pytest.approx(2.5e-3), "min_s": pytest.approx(1e-3), "rounds": 4,
                      "timer": "triton.testing.do_bench"}
    assert len(calls) == 1  # the warm-up call; do_bench (faked) makes the others


def test_interleaved_rounds_on_a_fake_clock(fresh_harness, monkeypatch):
    """Kills H20 (harness.py: runs of about 0.2 ms, not 2 ms), H21 (harness.py: the budget is not per variant),
    H22 (harness.py: at most 20 rounds, not 50), H23 (harness.py: the median is the mean) and H24 (harness.py: a
    sample is the run's time, not the time per call).

    On a clock only the variants advance: "a" costs 2**-14 s a call (2**-13 in rounds r with r % 3 != 0), "b"
    2**-10 s. Runs of 2 ms: int(2e-3 * 2**14) = 32 calls of a, int(2e-3 * 2**10) = 2 of b; a round takes
    32 * 2**-14 + 2 * 2**-10 = 2**-8 s; a budget of 0.05 s per variant gives int(0.1 * 2**8) = 25 rounds, of
    which 9 (r = 0, 3, ..., 24) are a's fast ones: a's median 2**-13, minimum 2**-14."""
    clock = FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    a_calls, b_calls = [], []

    def a_cost(n):
        return 2.0 ** -14 if n < 2 or (n - 2) // 32 % 3 == 0 else 2.0 ** -13

    variants = {"a": _costing(clock, a_cost, a_calls), "b": _costing(clock, lambda n: 2.0 ** -10, b_calls)}
    timings = harness.time_interleaved(variants, budget_s=0.05)
    assert {name: {key: t[key] for key in ("median_s", "min_s", "rounds", "iterations")}
            for name, t in timings.items()} == {
        "a": {"median_s": 2.0 ** -13, "min_s": 2.0 ** -14, "rounds": 25, "iterations": 32},
        "b": {"median_s": 2.0 ** -10, "min_s": 2.0 ** -10, "rounds": 25, "iterations": 2}}
    assert len(a_calls) == 2 + 25 * 32 and len(b_calls) == 2 + 25 * 2
    # The number of rounds stays within 5 and 50: a budget of 1 s asks for 512, one of 0 for none.
    assert harness.time_interleaved(variants, budget_s=1.0)["a"]["rounds"] == 50
    assert harness.time_interleaved(variants, budget_s=0.0)["b"]["rounds"] == 5


def test_a_variant_faster_than_the_clock_is_timed(fresh_harness, monkeypatch):
    """Kills H19 (harness.py: the single call's time is not floored at 1e-7 s). A call the clock does not see
    (0 s) must give runs of 1000 calls, not a ZeroDivisionError."""
    clock = FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    timing = harness.time_interleaved({"free": lambda: None}, budget_s=0.0)["free"]
    assert (timing["iterations"], timing["rounds"], timing["median_s"], timing["min_s"]) == (1000, 5, 0.0, 0.0)


def test_each_variant_gets_its_own_copy_of_the_cases_timing(fresh_harness, monkeypatch):
    """Kills H18 (harness.py: time_cpu_case hands out the cached timing itself). The caller adds peak_bytes to what
    it gets: that must not leak into the cached timing, which the case's other requests read."""
    clock = FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    step = _costing(clock, lambda n: 2.0 ** -10, [])
    case = harness.Case("op", "copies", lambda: {"hiertcn_fast": step, "torch eager": step},
                        variants=("hiertcn_fast", "torch eager"), same_result=False)
    first = harness.time_cpu_case(case, "hiertcn_fast")
    first["peak_bytes"] = 123
    again = harness.time_cpu_case(case, "hiertcn_fast")
    assert "peak_bytes" not in again and again["median_s"] == 2.0 ** -10


def test_the_gpu_peak_is_above_what_was_allocated_before(monkeypatch):
    """Kills H25 (harness.py: the CUDA peak includes what was allocated before the call). 1000 bytes live before,
    a peak of 5000 during the call: the call's own peak is 4000."""
    memory = {"allocated": 1000, "peak": 1000}

    def call():
        memory["peak"] = 5000

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *args: memory["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args: memory.update(peak=memory["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: memory["peak"])
    assert harness.peak_bytes(call, "cuda") == 4000


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/harness.py: rows, rates, device peaks, speed-ups
# ----------------------------------------------------------------------------------------------------------------

def _rated_case(dtype=torch.float32):
    return harness.Case("op", "rated", dict, flops=6e12, bytes=4e9, dtype=dtype)


def test_a_row_has_its_baseline_and_decimal_rates(fresh_harness, monkeypatch):
    """Kills H27 (harness.py: the row's baseline is the fast variant's name), H28 (harness.py: GB/s in GiB/s),
    H29 (harness.py: TFLOP/s divided by 1e9) and H31 (harness.py: % of a GPU's peak on CPU rows). 4e9 bytes and
    6e12 FLOP in 2 s: 2.0 GB/s, 3.0 TFLOP/s; a CPU row has no % of peak, whatever GPU the machine has."""
    monkeypatch.setattr(harness, "device_peaks", lambda: (1e12, 100e12, 10e12))
    harness.record(_rated_case(), "torch.compile", {"median_s": 2.0, "min_s": 1.5, "rounds": 5}, "cpu")
    (row,) = harness._results
    assert row["baseline"] == "torch eager" and row["variant"] == "torch.compile" and row["device"] == "cpu"
    assert row["GB/s"] == pytest.approx(2.0) and row["TFLOP/s"] == pytest.approx(3.0)
    assert "%HBM" not in row and "%FLOP peak" not in row


def test_a_gpu_row_has_percent_of_the_peak_for_its_dtype(fresh_harness, monkeypatch):
    """Kills H30 (harness.py: float32 compared with the bf16 tensor-core peak, bf16 with fp32's) and H32
    (harness.py: %HBM as a fraction). Peaks (1 TB/s, 100 TFLOP/s bf16, 10 TFLOP/s fp32); 4e9 bytes and 6e12
    FLOP in 2 s: 0.2 % of HBM; 30 % of fp32's peak for float32, 3 % of bf16's for bfloat16."""
    monkeypatch.setattr(harness, "device_peaks", lambda: (1e12, 100e12, 10e12))
    harness.record(_rated_case(), "hiertcn_fast", {"median_s": 2.0}, "cuda")
    harness.record(_rated_case(torch.bfloat16), "hiertcn_fast", {"median_s": 2.0}, "cuda")
    single, half = harness._results
    assert single["%HBM"] == pytest.approx(0.2) and single["%FLOP peak"] == pytest.approx(30.0)
    assert half["%FLOP peak"] == pytest.approx(3.0)


def test_the_device_peaks_are_found_by_the_gpus_name(monkeypatch):
    """Kills H33 (harness.py: the table's key must contain the device name, not the name the key). torch names a
    GPU e.g. "NVIDIA H100 80GB HBM3"; the datasheet HBM bandwidths: H100 SXM 3.35 TB/s, H200 4.8 TB/s."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, hbm in (("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H200", 4.8e12), ("NVIDIA A100-SXM4-80GB", 2.0e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, name=name: name)
        assert harness.device_peaks()[0] == hbm
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100-SXM2-16GB")
    assert harness.device_peaks() is None


def _row(op, case, variant, median_s, baseline="torch eager"):
    return {"op": op, "case": case, "variant": variant, "baseline": baseline, "median_s": median_s}


def test_the_speedup_is_the_baselines_time_over_the_variants(fresh_harness, monkeypatch):
    """Kills H34 (harness.py: the speed-up inverted), H35 (harness.py: baselines looked up per op, not per case)
    and H36 (harness.py: each row compared with itself). Two cases of one op with different baseline times; a
    case whose baseline did not run has no speed-up."""
    monkeypatch.setattr(harness, "_results", [
        _row("op", "small", "hiertcn_fast", 5e-4), _row("op", "small", "torch eager", 2e-3),
        _row("op", "large", "torch eager", 8e-3), _row("op", "large", "hiertcn_fast", 1e-3),
        _row("op", "alone", "hiertcn_fast", 1e-3)])
    speedups = {(row["case"], row["variant"]): row["speedup"] for row in harness.summary_rows()}
    assert speedups == {("small", "hiertcn_fast"): pytest.approx(4.0), ("small", "torch eager"): pytest.approx(1.0),
                        ("large", "torch eager"): pytest.approx(1.0), ("large", "hiertcn_fast"): pytest.approx(8.0),
                        ("alone", "hiertcn_fast"): None}


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/harness.py: the machine, the load line, the table, the JSON file
# ----------------------------------------------------------------------------------------------------------------

CPUINFO = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
           "model name\t: Intel(R) Xeon(R) Platinum 8480+\nstepping\t: 8\n")


def test_the_cpu_model_is_read_from_its_own_line(monkeypatch):
    """Kills H37 (harness.py: the first line starting "model" is taken: "model : 143") and H38 (harness.py:
    without /proc/cpuinfo the fallback is platform.processor() alone, empty on Linux)."""
    import io
    import platform

    monkeypatch.setattr(harness, "open", lambda path, *args: io.StringIO(CPUINFO), raising=False)
    assert harness.cpu_model() == "Intel(R) Xeon(R) Platinum 8480+"

    def no_file(path, *args):
        raise FileNotFoundError(path)

    monkeypatch.setattr(harness, "open", no_file, raising=False)
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert harness.cpu_model() == "aarch64"


@pytest.fixture
def two_cores(monkeypatch):
    """2 cores, 2 torch threads, 1-minute loads read: (start, 5 min, 15 min) set by the test, 1.5 at the end."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 6.0, 9.0))

    def start_load(load):
        monkeypatch.setattr(harness, "_LOAD_AT_START", (load, 5.0, 7.0))
    return start_load


def test_the_load_warning_allows_half_a_core(two_cores, monkeypatch):
    """Kills H39 (harness.py: no half-core slack in the busy-machine warning) and H40 (harness.py: the warning on
    GPU runs instead of CPU ones). 2 threads on 2 cores: a start load of 0.4 (2.4 <= 2.5) is quiet, 0.6 is busy;
    a GPU run is never warned about."""
    monkeypatch.setenv("HIERTCN_BENCH_DEVICE", "cpu")
    two_cores(0.4)
    assert harness.load_line() == ("2 torch thread(s) on 2 core(s); 1-minute load 0.4 at the start, 1.5 at the end")
    two_cores(0.6)
    assert "WARNING: the machine was busy" in harness.load_line()
    monkeypatch.setenv("HIERTCN_BENCH_DEVICE", "cuda")
    assert "WARNING" not in harness.load_line()


def test_the_machine_description(two_cores, monkeypatch):
    """Kills H41 (harness.py: load_at_start is the 5-minute load), H42 (harness.py: "cores" is torch's thread count),
    H43 (harness.py: the full commit hash, not the short one) and H51 (harness.py: the triton version under another
    key). The commit is asked of git here, independently."""
    two_cores(0.456)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    info = harness.machine()
    assert (info["load_at_start"], info["load_at_end"], info["cores"], info["threads"]) == (0.46, 1.5, 2, 7)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH).stdout.strip()
    assert info["commit"] == commit
    try:
        import triton
    except ImportError:
        assert "triton" not in info
    else:
        assert info["triton"] == triton.__version__


def test_the_table_row_formats(fresh_harness):
    """Kills H44 (harness.py: the %peak column prefers %FLOP peak to %HBM), H45 (harness.py: peak MiB in MB), H46
    (harness.py: TFLOP/s with 2 digits, not 3) and H47 (harness.py: 1 ms printed as 1000.0us)."""
    row = {"op": "o", "case": "c", "variant": "v", "median_s": 1e-3, "speedup": None, "GB/s": 1.5,
           "TFLOP/s": 0.1234, "%HBM": 12.5, "%FLOP peak": 50.0, "peak_bytes": 3 * 2 ** 20}
    fast = dict(row, median_s=2.5e-4, speedup=4.0, peak_bytes=None, **{"%HBM": None})
    lines = harness.format_table([row, fast]).splitlines()
    assert lines[2].split() == ["o", "c", "v", "1.00ms", "-", "1.50", "0.123", "12.50", "3.00"]
    assert lines[3].split() == ["o", "c", "v", "250.0us", "4.00x", "1.50", "0.123", "50.00", "-"]


def test_an_empty_run_writes_no_file(fresh_harness, monkeypatch, tmp_path):
    """Kills H48 (harness.py: write_results writes a file for a run without results)."""
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path / "out"))
    assert harness.write_results("all", "pytest benchmarks") is None
    assert not (tmp_path / "out").exists()


def test_the_json_file_has_the_speedups_and_the_command(fresh_harness, monkeypatch, tmp_path):
    """Kills H49 (harness.py: the JSON rows without their speed-ups) and H50 (harness.py: the command recorded
    as the label)."""
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(harness, "_results", [_row("op", "c", "hiertcn_fast", 1e-3),
                                              _row("op", "c", "torch eager", 3e-3)])
    path = harness.write_results("op", "pytest benchmarks/bench_op.py -k c")
    assert path == os.path.join(str(tmp_path), "op-cpu.json")
    with open(path) as f:
        payload = json.load(f)
    assert payload["command"] == "pytest benchmarks/bench_op.py -k c" and payload["full_matrix"] is False
    assert [row["speedup"] for row in payload["results"]] == [pytest.approx(3.0), pytest.approx(1.0)]


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/summarize.py
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def summarize(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import summarize as module
    return module


def _table_row(case, speedup):
    return {"op": "gru_cell", "case": case, "variant": "hiertcn_fast", "median_s": 1e-4, "speedup": speedup,
            "peak_bytes": None}


def test_one_file_is_shown_without_a_run_column(summarize, tmp_path, capsys):
    """Kills S1 (summarize.py: the run column shown for a single file) and S4 (summarize.py: the file's line shows
    its command, not its date)."""
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"date": "2026-01-02T03:04:05+00:00", "machine": "m1", "command": "pytest x",
                                "results": [_table_row("b=1", 2.0)]}))
    summarize.main([str(path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[1] {path}: 2026-01-02T03:04:05+00:00 m1"
    assert out[1].split()[0] == "op" and out[3].split()[:2] == ["gru_cell", "b=1"]


def test_every_row_of_every_file_is_labelled_with_its_file(summarize, tmp_path, capsys):
    """Kills S3 (summarize.py: one label per file, not per row: the labels shift onto the next file's rows). Two
    files of two rows each: [1], [1], [2], [2]."""
    paths = []
    for n in (1, 2):
        paths.append(tmp_path / f"{n}.json")
        paths[-1].write_text(json.dumps({"date": n, "machine": {}, "results": [_table_row(f"f{n} r{i}", 1.0)
                                                                                for i in (1, 2)]}))
    summarize.main([str(path) for path in paths])
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines() if "gru_cell" in line]
    assert rows == [["[1]", "gru_cell", "f1"], ["[1]", "gru_cell", "f1"], ["[2]", "gru_cell", "f2"],
                    ["[2]", "gru_cell", "f2"]]


def test_a_file_of_another_layout_is_shown_as_it_is(summarize, tmp_path, capsys):
    """Kills S2 (summarize.py: a file counts as the harness's when any row, not every row, has an op). A
    standalone benchmark's list of other records is printed as JSON beside the harness's rows, not a crash."""
    harness_file, other = tmp_path / "h.json", tmp_path / "other.json"
    harness_file.write_text(json.dumps({"date": "d", "machine": "m", "results": [_table_row("b=1", 2.0)]}))
    other.write_text(json.dumps({"results": [{"op": "x"}, {"epoch": 1, "seconds": 2.5}]}))
    summarize.main([str(harness_file), str(other)])
    out = capsys.readouterr().out
    assert f"{other}:\n" in out and '"epoch": 1' in out
    assert [line.split()[:2] for line in out.splitlines() if "gru_cell" in line] == [["gru_cell", "b=1"]]
