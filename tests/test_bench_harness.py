"""The benchmark harness refuses to time variants that compute different things."""

import importlib.util
import json
import os
import sys

import pytest
import torch
import torch._dynamo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
_spec = importlib.util.spec_from_file_location("bench_harness", os.path.join(BENCH, "harness.py"))
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def _case(variants, **kwargs):
    return harness.Case("op", "case", lambda: variants, variants=tuple(variants), **kwargs)


def test_variants_that_agree_pass():
    x = torch.randn(50, 40, dtype=torch.float32) * 100
    y = x + 1e-3 * torch.randn_like(x)  # another summation order: a few ulps of the largest value
    harness.check_same_result(_case({"hiertcn_fast": lambda: (x, None), "torch eager": lambda: (y, None)}),
                              {"hiertcn_fast": lambda: (x, None), "torch eager": lambda: (y, None)})


@pytest.mark.parametrize("wrong", ["value", "shape", "count"])
def test_variants_that_disagree_are_refused(wrong):
    x = torch.randn(6, 5)
    other = {"value": lambda: (x + 0.1,), "shape": lambda: (x[:, :4],), "count": lambda: (x, x)}[wrong]
    variants = {"hiertcn_fast": other, "torch eager": lambda: (x,)}
    with pytest.raises(AssertionError, match="op\\[case\\]: 'hiertcn_fast'"):
        harness.check_same_result(_case(variants), variants)


def test_the_check_runs_when_a_case_is_built_unless_opted_out():
    x = torch.randn(3)
    variants = {"hiertcn_fast": lambda: x + 1, "torch eager": lambda: x}
    harness._built.update(id=None, variants=None)
    with pytest.raises(AssertionError):
        harness._variants(_case(variants))
    harness._built.update(id=None, variants=None)
    assert harness._variants(_case(variants, same_result=False)) is variants


def test_a_half_case_with_a_float32_twin_is_checked_on_the_twin():
    """A bfloat16 case whose variants differ by more than bfloat16's tolerance (a ReLU tipped the other way) is
    checked on its float32 twin: agreeing twins pass, disagreeing twins are refused; the half variants are timed."""
    x = torch.randn(8)
    half = {"hiertcn_fast": lambda: x.bfloat16() + 1, "torch eager": lambda: x.bfloat16()}
    harness._built.update(id=None, variants=None)
    with pytest.raises(AssertionError):  # without a twin the half variants are compared, and differ
        harness._variants(_case(half, dtype=torch.bfloat16))
    twins_agree = {"hiertcn_fast": lambda: x * 3, "torch eager": lambda: x * 3 + 1e-6}
    harness._built.update(id=None, variants=None)
    assert harness._variants(_case(half, dtype=torch.bfloat16, check_make=lambda: twins_agree)) is half
    # The twin is held to float32's tolerance, not bfloat16's: a difference of 1e-2 is refused.
    twins_differ = {"hiertcn_fast": lambda: x * 3, "torch eager": lambda: x * 3 + 1e-2}
    harness._built.update(id=None, variants=None)
    with pytest.raises(AssertionError, match="op\\[case\\]: 'hiertcn_fast' differs"):
        harness._variants(_case(half, dtype=torch.bfloat16, check_make=lambda: twins_differ))
    harness._built.update(id=None, variants=None)


def test_the_bfloat16_conv_cases_pass_their_check_on_float32_twins(monkeypatch):
    """The GPU's conv cases run in bfloat16, where the grid's odd offsets round away and the variants' ReLUs tip
    apart (376 gradient elements differed in the CPU proxy): built here on the CPU in bfloat16, they pass."""
    monkeypatch.setenv("HIERTCN_BENCH_COMPILE", "0")
    monkeypatch.syspath_prepend(BENCH)
    import bench_causal_conv

    case = bench_causal_conv._conv_case("cpu", torch.bfloat16, "hiertcn dense", 32, 21, 128, 5, 2, backward=True)
    assert case.check_make is not None
    harness_of_bench = sys.modules["harness"]
    harness_of_bench._built.update(id=None, variants=None)
    made = harness_of_bench._variants(case)
    assert set(made) == {"hiertcn_fast", "torch eager"}
    assert all(t.dtype == torch.bfloat16 for t in made["hiertcn_fast"]())
    harness_of_bench._built.update(id=None, variants=None)


class _ScratchInside(torch.autograd.Function):
    """Allocates a 4 MB scratch buffer inside its forward and frees it before returning."""

    @staticmethod
    def forward(ctx, x):
        scratch = torch.empty(1_000_000).fill_(1.0)
        return x + scratch[:1].sum()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_cpu_peak_bytes_counts_every_allocation_in_time_order():
    """The peak of one call: a 4 MB buffer alone; two live together; and a buffer allocated inside another op
    and freed when it returns (replaying per-op net bytes read that one as 0)."""
    assert harness.peak_bytes(lambda: torch.empty(1_000_000).fill_(1.0), "cpu") == 4_000_000

    def two_live():
        a = torch.empty(1_000_000).fill_(1.0)
        b = torch.empty(1_000_000).fill_(2.0)
        return (a + b)[:1]

    assert harness.peak_bytes(two_live, "cpu") >= 12_000_000  # a, b and their sum
    x = torch.randn(3)
    assert harness.peak_bytes(lambda: _ScratchInside.apply(x), "cpu") >= 4_000_000


def test_compiled_variants_are_dropped_on_request(monkeypatch):
    """HIERTCN_BENCH_COMPILE=0 (a short first pass on a lent GPU) times no torch.compile variant and never calls
    it, not even for the same-result check; by default every declared variant runs."""
    x = torch.randn(3)
    calls = []

    def compiled():
        calls.append("compiled")
        return x

    case = harness.Case("op", "knob", lambda: {"hiertcn_fast": lambda: x, "torch eager": lambda: x,
                                               "torch.compile": compiled})
    assert harness.run_variants(case) == ("hiertcn_fast", "torch eager", "torch.compile")
    monkeypatch.setenv("HIERTCN_BENCH_COMPILE", "0")
    assert harness.run_variants(case) == ("hiertcn_fast", "torch eager")
    harness._built.update(id=None, variants=None)
    assert set(harness._variants(case)) == {"hiertcn_fast", "torch eager"} and calls == []
    monkeypatch.delenv("HIERTCN_BENCH_COMPILE")
    harness._built.update(id=None, variants=None)
    assert set(harness._variants(case)) == {"hiertcn_fast", "torch eager", "torch.compile"} and calls == ["compiled"]
    harness._built.update(id=None, variants=None)


def test_variants_are_timed_interleaved_in_rounds():
    """time_interleaved runs every variant in every round, the first one rotating, each a run of the same number
    of calls per round; a case's variants are timed once, together, and each reads its own timing."""
    order, counts = [], {"a": 0, "b": 0, "c": 0}

    def variant(name):
        def run():
            counts[name] += 1
            if not order or order[-1] != name:
                order.append(name)
        return run

    timings = harness.time_interleaved({name: variant(name) for name in counts}, budget_s=0.01)
    assert set(timings) == set(counts)
    rounds = timings["a"]["rounds"]
    assert 5 <= rounds <= 50 and all(t["rounds"] == rounds for t in timings.values())
    for name, timing in timings.items():
        assert counts[name] == 2 + rounds * timing["iterations"]  # two calls before the rounds, then the rounds'
        assert 0 < timing["min_s"] <= timing["median_s"]
    rounds_order = order[3:]  # after the warm-up, each round's runs in turn: abc, bca, cab, ...
    assert rounds_order[:6] == ["a", "b", "c", "b", "c", "a"]
    case = harness.Case("op", "interleaved", lambda: {"hiertcn_fast": variant("a"), "torch eager": variant("b")},
                        variants=("hiertcn_fast", "torch eager"))
    harness._built.update(id=None, variants=None)
    harness._interleaved.update(id=None, timings=None)
    first = harness.time_cpu_case(case, "torch eager")
    calls = dict(counts)
    assert harness.time_cpu_case(case, "hiertcn_fast")["rounds"] == first["rounds"] and counts == calls
    harness._built.update(id=None, variants=None)
    harness._interleaved.update(id=None, timings=None)


def test_the_table_shows_case_names_in_full():
    """Names were cut to 52 characters: "... ctx=256 fwd+bwd" read as the forward case "... ctx=256 fwd"."""
    rows = [{"op": "causal_conv1d", "case": "hiertcn block1 b=1024 t=21 c=128 k=5 d=1 ctx=256 " + kind,
             "variant": "hiertcn_fast", "median_s": 1e-3, "speedup": 2.0, "peak_bytes": None} for kind in
            ("fwd", "fwd+bwd")]
    table = harness.format_table(rows)
    assert rows[1]["case"] + " " in table and table.count(rows[0]["case"] + " ") == 1


def test_summarize_says_which_run_each_row_comes_from(tmp_path, capsys, monkeypatch):
    """Rows merged from several files (other commits, other loads) are labelled with their file's number."""
    monkeypatch.syspath_prepend(BENCH)
    import summarize

    row = {"op": "gru_cell", "case": "b=32 h=128 fwd", "variant": "hiertcn_fast", "median_s": 1e-4, "speedup": 1.5,
           "peak_bytes": None}
    for name, speedup in (("a.json", 1.5), ("b.json", 1.7)):
        (tmp_path / name).write_text(json.dumps({"date": name, "machine": {}, "results": [{**row, "speedup": speedup}]}))
    summarize.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert "[1] " in out and "[2] " in out
    lines = [line for line in out.splitlines() if "gru_cell" in line]
    assert lines[0].startswith("[1]") and "1.50x" in lines[0] and lines[1].startswith("[2]") and "1.70x" in lines[1]


def test_the_gpu_timer_names_the_timer_it_used(monkeypatch):
    """Without triton the timing comes from CUDA events, and says so (it said triton.testing.do_bench)."""
    class Event:
        def __init__(self, **kwargs):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    monkeypatch.setitem(sys.modules, "triton.testing", None)  # the import fails
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    timing = harness.time_gpu(lambda: None)
    assert timing["timer"] == "cuda events" and timing["rounds"] == 50


def test_bench_e2e_reports_each_models_own_device_peak(monkeypatch):
    """The device peak is the process's, reset at each train(): read once at the end, every model got the peak
    of the one that trained last."""
    import types

    monkeypatch.syspath_prepend(BENCH)
    import bench_e2e

    true_peak = {"hiertcn": 100, "hiertcn (reference)": 500, "hrnn": 300, "history_tcn": 900}
    device = {"peak": 0}

    class Trainer:
        def __init__(self, label):
            self.label, self.memory, self.model = label, types.SimpleNamespace(peak_bytes=1), torch.nn.Linear(1, 1)

        @property
        def peak_memory_bytes(self):
            return device["peak"]

    def epoch(trainer, _):
        device["peak"] = true_peak[trainer.label]  # what train() leaves: this model's own peak
        return 1000.0

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args: device.update(peak=0))
    monkeypatch.setattr(bench_e2e, "make_trainer", lambda cache, name, backend, *args: Trainer(
        next(label for label, n, b in bench_e2e.RUNS if (n, b) == (name, backend))))
    monkeypatch.setattr(bench_e2e, "timed_epoch", epoch)
    runs = [run for run in bench_e2e.RUNS if run[0] in true_peak]
    results = bench_e2e.measure_all(None, runs, 32, 2, types.SimpleNamespace(type="cuda"), 32)
    assert {label: result["device_peak_bytes"] for label, result in results.items()} == true_peak


def test_a_partial_benchmark_run_does_not_write_the_whole_suites_file(tmp_path):
    """all-<device>.json holds the whole suite's run (RESULTS.md's tables); a run of a few cases of three ops
    wrote it too, over the whole suite's figures."""
    import subprocess

    env = {**os.environ, "HIERTCN_BENCH_OUT": str(tmp_path), "HIERTCN_BENCH_COMPILE": "0",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    cases = ["gru_cell b=32 h=128 fwd", "gru b=8 t=500 h=128 l=2 fwd", "session_update b=256 t=20 h=128 l=2 fwd"]
    nodes = [f"{os.path.join(BENCH, 'bench_gru.py')}::test_bench[{case}-hiertcn_fast]" for case in cases]
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodes], env=env, check=True,
                   cwd=ROOT, capture_output=True, timeout=600)
    written = sorted(path.name for path in tmp_path.glob("*.json"))
    assert written == ["gru-gru_cell-session_update-nocompile-cpu.json"], written  # (run without compile)


def test_node_ids_from_every_benchmark_file_do_not_write_the_whole_suites_file(tmp_path):
    """One case of each harness file, named by node id: no test was 'deselected', every file ran, and the few rows
    were written as all-cpu.json."""
    import subprocess

    env = {**os.environ, "HIERTCN_BENCH_OUT": str(tmp_path), "HIERTCN_BENCH_COMPILE": "0",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    nodes = [f"{os.path.join(BENCH, name)}::test_bench[{case}]" for name, case in (
        ("bench_gru_gates.py", "gru_gates b=32 h=128 fwd-hiertcn_fast"),
        ("bench_gru.py", "gru_cell b=32 h=128 fwd-hiertcn_fast"),
        ("bench_causal_conv.py", "tcn_step tcn step b=1 c=128 k=5 layers=3 window=21-hiertcn_fast"),
        ("bench_loss.py", "linear_cross_entropy events=2000 dim=128 classes=1683 fwd-hiertcn_fast"),
        ("bench_serve.py", "serve hiertcn one event, history of 30 events-streaming"))]
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodes], env=env, check=True,
                   cwd=ROOT, capture_output=True, timeout=600)
    written = sorted(path.name for path in tmp_path.glob("*.json"))
    assert len(written) == 1 and not written[0].startswith("all"), written


def test_every_benchmark_id_is_unique_and_names_its_op():
    """gru and session_update cases shared names, and pytest numbered their ids apart (...-hiertcn_fast0/1)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", BENCH],
                            env=env, check=True, cwd=ROOT, capture_output=True, text=True, timeout=600).stdout
    ids = [line.split("::", 1)[1] for line in listed.splitlines() if "::test_bench[" in line]
    assert len(ids) > 100 and len(set(ids)) == len(ids)
    ops = {"causal_conv1d", "tcn_step", "gru_cell", "gru", "session_update", "session_update_steps", "gru_gates",
           "linear_cross_entropy", "serve", "nn.GRUCell", "nn.GRU.step"}
    assert all(i.startswith("test_bench[") and i[len("test_bench["):].split(" ", 1)[0] in ops for i in ids), ids
    assert not any(i.rstrip("]")[-1].isdigit() for i in ids)


def test_a_whole_run_that_failed_or_was_stopped_is_not_the_whole_suites_file(monkeypatch):
    """Ctrl-C or a failed case still reaches the summary, with part of the rows: labelled by its ops, not 'all'."""
    monkeypatch.syspath_prepend(BENCH)  # conftest imports harness by name
    spec = importlib.util.spec_from_file_location("bench_conftest", os.path.join(BENCH, "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    monkeypatch.setattr(conftest, "_whole_suite", lambda: True)
    rows = [{"op": "gru_cell"}, {"op": "causal_conv1d"}]
    assert conftest.results_label(rows, 0) == "all"
    for status in (1, 2):  # tests failed; interrupted
        assert conftest.results_label(rows, status) == "causal_conv1d-gru_cell"
    monkeypatch.setattr(conftest, "_whole_suite", lambda: False)
    assert conftest.results_label(rows, 0) == "causal_conv1d-gru_cell"


def test_the_table_columns_stay_aligned_with_long_op_and_variant_names():
    rows = [{"op": op, "case": "c", "variant": variant, "median_s": 1e-3, "speedup": 2.0, "peak_bytes": None}
            for op, variant in (("gru_cell", "hiertcn_fast"), ("linear_cross_entropy", "torch eager, streaming step"))]
    header, _, *lines = harness.format_table(rows).splitlines()
    end = header.index("speedup") + len("speedup")
    assert all(line[end - 5:end] == "2.00x" for line in lines), lines


def test_the_results_record_threads_and_load():
    info = harness.machine()
    assert info["threads"] == torch.get_num_threads() and "load_at_start" in info and "load_at_end" in info
    assert f"{torch.get_num_threads()} torch thread(s)" in harness.load_line()


def test_the_results_name_their_commit_and_their_knobs(tmp_path, monkeypatch):
    """A tree without .git (a lent GPU machine's copy) records the commit its caller names; a run without the
    compiled variants, or of the full matrix, writes a file of its own, not the default run's."""
    monkeypatch.setenv("HIERTCN_BENCH_COMMIT", "abc1234")
    monkeypatch.setattr(harness.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    assert harness.machine()["commit"] == "abc1234"
    monkeypatch.undo()
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(harness, "_results", [{"op": "op"}])
    monkeypatch.setattr(harness, "summary_rows", lambda: [])
    monkeypatch.setattr(harness, "machine", lambda: {})
    names = []
    for compile_, full in (("1", "0"), ("0", "0"), ("1", "1"), ("0", "1")):
        monkeypatch.setenv("HIERTCN_BENCH_COMPILE", compile_)
        monkeypatch.setenv("HIERTCN_BENCH_FULL", full)
        path = harness.write_results("all", "cmd")
        names.append(os.path.basename(path))
        with open(path) as f:
            assert json.load(f)["compiled"] == (compile_ == "1")
    device = harness.bench_device()
    assert names == [f"all-{device}.json", f"all-nocompile-{device}.json", f"all-full-{device}.json",
                     f"all-full-nocompile-{device}.json"]


def _counting_backend(calls):
    """A torch.compile backend that runs the captured graph as it is and counts every run of a compiled graph."""
    def backend(gm, example_inputs):
        def run(*args):
            calls.append(1)
            return gm.forward(*args)
        return run
    return backend


def test_every_conv_cases_torch_compile_variant_runs_compiled(monkeypatch):
    """Every conv case compiles the same function, ``torch.compile(torch_way)``, and nothing between cases reset
    dynamo. Dynamo keeps its cache on torch_way's code object, shared by all those wrappers, and the cases' shapes,
    dilations, groups, context and requires_grad each add an entry; at config.recompile_limit (8) dynamo gives up
    and runs torch_way eagerly. In the quick matrix the last case ("long depthwise ... fwd+bwd") then times plain
    eager PyTorch under the name "torch.compile" (the log says "torch._dynamo hit config.recompile_limit (8)
    function: 'torch_way'"), so that row and the fast path's speed-up over torch.compile were not what they claim.
    The full matrix (HIERTCN_BENCH_FULL=1) lost both "long depthwise ... fwd+bwd" cases the same way, and
    bench_gru.py's full matrix its gru_cell "b=1 h=512 fwd" (every case compiles a new GRUCell, all sharing
    GRUCell.forward's code object). harness._variants now resets dynamo per case. Here the compiled graphs run
    through a counting backend (the same dynamo front end and its caching, without inductor's build time); every
    case's torch.compile variant must run a compiled graph."""

    monkeypatch.delenv("HIERTCN_BENCH_COMPILE", raising=False)
    monkeypatch.syspath_prepend(BENCH)
    import bench_causal_conv
    harness = bench_causal_conv.harness

    calls = []
    backend = _counting_backend(calls)
    real_compile = torch.compile

    def compile_with_counting_backend(model=None, **kwargs):
        return real_compile(model, **{**kwargs, "backend": backend})

    monkeypatch.setattr(torch, "compile", compile_with_counting_backend)
    torch._dynamo.reset()
    harness._built.update(id=None, variants=None)
    eager_ones = []
    try:
        for case in bench_causal_conv.cases("cpu", True):
            if case.op != "causal_conv1d":
                continue
            variants = harness._variants(case)  # as the benchmark builds a case (same-result check included)
            before = len(calls)
            variants[harness.COMPILED]()
            if len(calls) == before:
                eager_ones.append(case.name)
    finally:
        harness._built.update(id=None, variants=None)
        torch._dynamo.reset()
    assert not eager_ones, f"torch.compile variant ran eagerly (dynamo's recompile limit) in: {eager_ones}"


def test_the_gpu_wall_timer_counts_the_hosts_work_between_synchronisations(monkeypatch):
    """time_gpu_wall: on a clock that a call advances by its host time and a synchronisation by the device work
    still queued, a call costs the larger of the two (here the host's 10 us against 4 us of device work), which
    do_bench, timing the device alone, does not show. Each run is synchronised before and after."""
    clock = {"now": 0.0, "device_free_at": 0.0}
    syncs = []

    def call():
        clock["now"] += 10e-6  # the host's launches
        clock["device_free_at"] = max(clock["device_free_at"], clock["now"]) + 4e-6

    def synchronize(*args):
        syncs.append(clock["now"])
        clock["now"] = max(clock["now"], clock["device_free_at"])

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["now"])
    timing = harness.time_gpu_wall(call, rounds=7)
    assert timing["wall_iterations"] == int(2e-3 / 14e-6)  # the first call: 10 us of host, then 4 us of device
    # host-bound: the device work hides behind the next launches (but for the last call of each run)
    assert timing["wall_median_s"] == pytest.approx(10e-6, rel=1e-2)
    assert len(syncs) == 2 + 2 * 7


def test_gpu_rows_carry_the_wall_clock_ratio_and_the_table_shows_it(monkeypatch):
    rows = [{"op": "op", "case": "c", "variant": v, "baseline": "eager", "median_s": m, "wall_median_s": w}
            for v, m, w in (("eager", 40e-6, 100e-6), ("fast", 10e-6, 50e-6))]
    monkeypatch.setattr(harness, "_results", rows)
    summary = {r["variant"]: r for r in harness.summary_rows()}
    assert summary["fast"]["speedup"] == pytest.approx(4.0)
    assert summary["fast"]["wall_speedup"] == pytest.approx(2.0)
    table = harness.format_table(list(summary.values()))
    assert "wall x" in table.splitlines()[0] and "2.00x" in table and "50.0us" in table
    cpu_rows = [{k: v for k, v in r.items() if not k.startswith("wall")} for r in rows]
    monkeypatch.setattr(harness, "_results", cpu_rows)
    assert "wall" not in harness.format_table(harness.summary_rows()).splitlines()[0]


def test_the_serving_benchmarks_recompute_gives_the_streaming_answer(monkeypatch):
    """bench_serve's baseline recomputes the streaming answer: the sessions as the stream cut them, and the features
    after the newest event. Its make() checks that; a recompute over other sessions (every ten events from the first,
    as it once was; the stream starts one event earlier) is refused there."""
    monkeypatch.syspath_prepend(BENCH)
    import bench_serve

    case = bench_serve.cases("cpu", True)[0]
    made = case.make()
    assert made["recompute"]().shape == made["streaming"]().shape
    real = bench_serve.SessionBatch

    class OldCut:
        @staticmethod
        def of_sessions(sessions, device):
            items = [item for session in sessions for item in session][:-1]
            step = bench_serve.SESSION_EVENTS
            return real.of_sessions([items[i:i + step] for i in range(0, len(items), step)], device)

    monkeypatch.setattr(bench_serve, "SessionBatch", OldCut)
    with pytest.raises(AssertionError, match="recompute differs from the streaming answer"):
        case.make()
