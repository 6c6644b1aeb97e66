"""Shared benchmark harness: every fast path timed next to the PyTorch way, in the same run.

A bench module (benchmarks/bench_<op>.py) defines

    def cases(device: str, quick: bool) -> list[Case]: ...
    test_bench = harness.bench_test(cases)

and pytest runs it (``python -m pytest benchmarks/bench_<op>.py``; benchmarks/conftest.py wires the
timers). On the CPU a case's variants are timed together, interleaved in rounds (time_cpu_case: a change in
the machine's load then reaches every variant alike); on a GPU each by triton.testing.do_bench
(median of many runs after warm-up, L2 flushed between runs; the device's time), falling back to CUDA
events, and again by the wall clock over back-to-back calls (time_gpu_wall: the host's work counted, as
a caller's loop sees it; "wall" and "wall x" in the table). After the
run the harness prints, per case, each variant's median time, its speed-up over the baseline, the
achieved GB/s and TFLOP/s from the case's byte/FLOP model (with % of the device's peak on a GPU),
and the peak memory of one call; and writes all of it as JSON to benchmarks/results/.

Environment: HIERTCN_BENCH_DEVICE=cpu|cuda (default: cuda when present), HIERTCN_BENCH_FULL=1 for
the full shape matrix (default: the quick one), HIERTCN_BENCH_OUT=folder for the JSON (default
benchmarks/results), HIERTCN_BENCH_COMPILE=0 without the torch.compile variants, HIERTCN_BENCH_COMMIT=commit
recorded where the tree has no .git (a copy on a lent GPU machine).
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
import zlib
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch._dynamo

RESULTS_DIR = os.environ.get("HIERTCN_BENCH_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                  "results")

# Peak rates of GPUs we report against: (HBM bytes/s, dense bf16 tensor-core FLOP/s, fp32 FLOP/s), from
# the vendors' datasheets. Measured ceilings go into RESULTS.md beside the figures.
DEVICE_PEAKS = {
    "H200": (4.8e12, 989e12, 67e12),
    "H100": (3.35e12, 989e12, 67e12),
    "A100": (2.0e12, 312e12, 19.5e12),
}


@dataclasses.dataclass
class Case:
    """One benchmark shape of one op.

    make() builds the inputs and returns {variant name: zero-argument callable} for exactly the names
    in ``variants``, which include ``fast`` and ``baseline``. flops and bytes are per call (bytes: the
    minimal memory traffic, inputs read once and outputs written once), used for TFLOP/s and GB/s.
    """

    op: str
    name: str
    make: Callable[[], Dict[str, Callable[[], object]]]
    flops: Optional[float] = None
    bytes: Optional[float] = None
    fast: str = "hiertcn_fast"
    baseline: str = "torch eager"
    dtype: torch.dtype = torch.float32
    variants: tuple = ("hiertcn_fast", "torch eager", "torch.compile")
    # The variants compute the same thing: each one's first call is checked against the baseline's before
    # anything is timed (a speed-up of different work would mean nothing). False only where the variants'
    # results differ by design; the case says why.
    same_result: bool = True
    # A make() of the same case in float32, for the same-result check of a half-precision case whose variants
    # round differently enough to tip a ReLU (the conv's gradients in bfloat16): its variants are checked
    # against each other in float32 instead (the same function; the half kernels are the tests' subject).
    check_make: Optional[Callable[[], Dict[str, Callable[[], object]]]] = None

    @property
    def id(self):
        return f"{self.op}[{self.name}]"


def bench_device() -> str:
    return os.environ.get("HIERTCN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def full_matrix() -> bool:
    return os.environ.get("HIERTCN_BENCH_FULL", "0") == "1"


COMPILED = "torch.compile"


def with_compiled() -> bool:
    """HIERTCN_BENCH_COMPILE=0 drops the torch.compile variants (each compiles cold, seconds per case: a short
    first pass on a lent GPU runs without them)."""
    return os.environ.get("HIERTCN_BENCH_COMPILE", "1") != "0"


def run_variants(case: "Case") -> tuple:
    """The variants of ``case`` this run times."""
    return tuple(v for v in case.variants if v != COMPILED or with_compiled())


# ---- collection ------------------------------------------------------------------------------------

_results: List[dict] = []
_built = {"id": None, "variants": None}


def _variants(case: Case):
    # Variants of one case run back to back: build its inputs once, drop them when the case changes.
    if _built["id"] != case.id:
        _built["id"], _built["variants"] = None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # A fresh compiler per case: dynamo keeps its graphs on the compiled function's code object, which every
        # case's torch.compile(torch_way) shares; each case's shapes added an entry (dynamic ones after the first),
        # and at its recompile limit (8) dynamo ran the later cases eagerly under the name "torch.compile".
        torch._dynamo.reset()
        # The same inputs in every run: a result (and the same-result check, where a relu at its boundary can
        # tip one way in one variant's summation order and the other way in another's) reproduces.
        torch.manual_seed(zlib.crc32(case.id.encode()))
        variants = case.make()
        if set(variants) != set(case.variants):
            raise KeyError(f"{case.id}: make() returned variants {sorted(variants)}, declared {sorted(case.variants)}")
        if len(run_variants(case)) != len(variants):
            variants = {name: fn for name, fn in variants.items() if name in run_variants(case)}
        if case.same_result and case.check_make is None:
            check_same_result(case, variants)
        elif case.same_result:
            torch.manual_seed(zlib.crc32(case.id.encode()))  # the same draws, before their rounding to the dtype
            twins = {name: fn for name, fn in case.check_make().items() if name in variants}
            check_same_result(case, twins, torch.float32)
            del twins
        _built["variants"], _built["id"] = variants, case.id
    return _built["variants"]


def _tensors(result) -> list:
    if result is None:
        return []
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for part in result for t in _tensors(part)]
    raise TypeError(f"cannot compare a variant's result of type {type(result).__name__}")


# Agreement asked of a variant's first result with the baseline's, relative to the result's largest value: the
# variants sum in other orders (and torch.compile fuses), so float32 agrees to a few ulps of the largest term.
SAME_RESULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def check_same_result(case: Case, variants: dict, dtype: Optional[torch.dtype] = None) -> None:
    """Every variant's first result equals the baseline's (each tensor, within the tolerance of ``dtype``, by
    default the case's)."""
    expected = _tensors(variants[case.baseline]())
    for name, fn in variants.items():
        if name == case.baseline:
            continue
        got = _tensors(fn())
        if len(got) != len(expected):
            raise AssertionError(f"{case.id}: {name!r} returned {len(got)} tensors, {case.baseline!r} {len(expected)}")
        for i, (a, b) in enumerate(zip(got, expected)):
            if a.shape != b.shape:
                raise AssertionError(f"{case.id}: {name!r} result {i} has shape {tuple(a.shape)}, "
                                     f"{case.baseline!r} {tuple(b.shape)}")
            scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
            tolerance = SAME_RESULT_TOLERANCE[dtype or case.dtype] * scale
            torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=0, atol=tolerance,
                                       msg=lambda m: f"{case.id}: {name!r} differs from {case.baseline!r} in result "
                                                     f"{i}: {m}")


def bench_test(cases_fn):
    """A pytest test function, parametrized over every (case, variant) of ``cases_fn(device, quick)``."""
    device = bench_device()
    params, seen = [], set()
    for case in cases_fn(device, not full_matrix()):
        if not {case.fast, case.baseline} <= set(case.variants):
            raise ValueError(f"{case.id}: variants {case.variants} must include {case.fast!r} and {case.baseline!r}")
        # The op leads the id: two ops' cases may share a shape's name (gru and session_update at b=32 t=20
        # h=128 l=2), and pytest then numbered them apart ("...-hiertcn_fast0"), ids no one could name a case by.
        if case.id in seen:
            raise ValueError(f"two cases are named {case.id}: give each case of an op its own name")
        seen.add(case.id)
        for variant in run_variants(case):
            params.append(pytest.param(case, variant, id=f"{case.op} {case.name}-{variant}"))

    @pytest.mark.parametrize("case,variant", params)
    def test(case, variant, bench_timer):
        bench_timer(case, variant, _variants(case)[variant])

    return test


# ---- timing ----------------------------------------------------------------------------------------

def time_gpu(fn) -> dict:
    fn()
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench

        times_ms = do_bench(fn, warmup=25, rep=100, return_mode="all")
        timer = "triton.testing.do_bench"
    except ImportError:
        timer = "cuda events"
        times_ms = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    return {"median_s": statistics.median(times_ms) / 1e3, "min_s": min(times_ms) / 1e3, "rounds": len(times_ms),
            "timer": timer}


def _calls_per_run(seconds_per_call: float) -> int:
    """Calls in a timed run of about 2 ms (1 to 1000), so that the timer's bookkeeping is not what is measured."""
    return max(1, min(1000, int(2e-3 / seconds_per_call)))


def time_gpu_wall(fn, rounds: int = 20) -> dict:
    """Wall-clock seconds per call on a GPU, the host's work included: runs of back-to-back calls of about 2 ms,
    the device synchronised before and after each run, ``rounds`` runs. do_bench (time_gpu) times the device
    alone, and it clears the L2 cache before each call: while the device clears it, the host is already running
    the call's Python and launches, so up to the clearing's time of host work is not counted. A launch-bound
    call (the TCN step at batch 1, serving) then reads faster than it runs for its caller; back to back, a call
    costs the larger of its host and its device time, what a loop of them gets."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    count = _calls_per_run(max(time.perf_counter() - start, 1e-7))
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(count):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / count)
    return {"wall_median_s": statistics.median(samples), "wall_min_s": min(samples), "wall_iterations": count}


_interleaved = {"id": None, "timings": None}


def time_cpu_case(case: Case, variant: str) -> dict:
    """The CPU timing of one variant of ``case``: on the first request, every variant the run times is timed
    together (time_interleaved) and the timings kept for the case's other variants."""
    if _interleaved["id"] != case.id:
        _interleaved["id"], _interleaved["timings"] = None, None
        _interleaved["timings"] = time_interleaved(_variants(case))
        _interleaved["id"] = case.id
    return dict(_interleaved["timings"][variant])


def time_interleaved(variants: Dict[str, Callable[[], object]], budget_s: float = 1.0) -> Dict[str, dict]:
    """Per variant: median and minimum seconds per call over rounds in which every variant runs in turn (the
    first one rotating from round to round), each a run of back-to-back calls of about 2 ms, so that the timer's
    bookkeeping is not what is measured. About ``budget_s`` per variant in all, 5 to 50 rounds. On a shared
    machine the load changes from second to second: timed one after the other, one variant could get a quiet
    second and another a busy one (a 1.6x swing was seen); interleaved, both see the same load."""
    names = list(variants)
    once = {}
    for name in names:
        variants[name]()  # warm-up outside the rounds (first-call dispatch, compile)
        start = time.perf_counter()
        variants[name]()
        once[name] = max(time.perf_counter() - start, 1e-7)
    iterations = {name: _calls_per_run(once[name]) for name in names}
    per_round = sum(once[name] * iterations[name] for name in names)
    rounds = max(5, min(50, int(budget_s * len(names) / per_round)))
    samples = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            fn, count = variants[name], iterations[name]
            start = time.perf_counter()
            for _ in range(count):
                fn()
            samples[name].append((time.perf_counter() - start) / count)
    return {name: {"median_s": statistics.median(samples[name]), "min_s": min(samples[name]), "rounds": rounds,
                   "iterations": iterations[name], "timer": "interleaved rounds (harness.time_interleaved)"}
            for name in names}


def peak_bytes(fn, device: str) -> Optional[int]:
    """Peak bytes allocated during one call, above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # CPU: replay the allocator's records from the profiler, one record per allocation and free, in time order.
    # (Summing each op's own net bytes instead under-reads: a buffer an op allocates inside another op and that
    # the outer one frees shows as a negative amount at the outer op's start, before the allocation.)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda r: r[0])
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


def record(case: Case, variant: str, timing: dict, device: str) -> None:
    row = {"op": case.op, "case": case.name, "variant": variant, "baseline": case.baseline, "device": device,
           "dtype": str(case.dtype),
           "flops": case.flops, "bytes": case.bytes, **timing}
    seconds = timing["median_s"]
    if case.bytes:
        row["GB/s"] = case.bytes / seconds / 1e9
    if case.flops:
        row["TFLOP/s"] = case.flops / seconds / 1e12
    peaks = device_peaks() if device == "cuda" else None
    if peaks:
        hbm, bf16, fp32 = peaks
        if case.bytes:
            row["%HBM"] = 100 * case.bytes / seconds / hbm
        if case.flops:
            compute_peak = fp32 if case.dtype in (torch.float32, torch.float64) else bf16
            row["%FLOP peak"] = 100 * case.flops / seconds / compute_peak
    _results.append(row)


def device_peaks():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None


# ---- reporting -------------------------------------------------------------------------------------

def summary_rows() -> List[dict]:
    """Results with speed-up over each case's baseline (baseline time / variant time) filled in."""
    by_case = {}
    for row in _results:
        by_case.setdefault((row["op"], row["case"]), {})[row["variant"]] = row
    rows = []
    for row in _results:
        base = by_case[(row["op"], row["case"])].get(row["baseline"], {})
        extra = {}
        if row.get("wall_median_s"):  # a GPU run: the same ratio of the host-inclusive times (time_gpu_wall)
            extra["wall_speedup"] = base["wall_median_s"] / row["wall_median_s"] if base.get("wall_median_s") else None
        rows.append(dict(row, speedup=base["median_s"] / row["median_s"] if base.get("median_s") else None, **extra))
    return rows


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module says: figures from machines of
    two vendors differ, and the ratios with them (this project's VMs have been Intel Xeons and AMD EPYCs)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The machine's load when the benchmarks were imported (before any case ran), and at the end (machine()): on a
# shared CPU more busy threads than cores make a variant's OpenMP waits stall unequally, and a ratio can swing by
# orders of magnitude (a GRU gates case read 249x at 2 threads under a load of 3, 2.1x at 1 thread).
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def threads_and_load() -> dict:
    """torch's thread counts, the thread environment variables, and the 1-minute load average at the start of the
    run and now."""
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "thread_env": {name: os.environ[name] for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                           if name in os.environ},
            "load_at_start": None if _LOAD_AT_START is None else round(_LOAD_AT_START[0], 2),
            "load_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def load_line() -> str:
    """One line for the table's header: threads and load, with a warning when they oversubscribe the cores."""
    info, cores = threads_and_load(), os.cpu_count() or 1
    line = (f"{info['threads']} torch thread(s) on {cores} core(s); 1-minute load {info['load_at_start']} at the "
            f"start, {info['load_at_end']} at the end")
    # The load at the end counts this run's own threads; the one at the start, what else was running (and, for a
    # minute, earlier runs).
    start = info["load_at_start"]
    if bench_device() == "cpu" and start is not None and start + info["threads"] > cores + 0.5:
        line += (" -- WARNING: the machine was busy when the run started (load + threads > cores): CPU ratios from "
                 "this run may not be reliable; rerun on an idle machine" +
                 (" or with OMP_NUM_THREADS=1" if info["threads"] > 1 else ""))
    return line


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            **threads_and_load()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=here).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=here)
        if status.returncode == 0 and info["commit"]:
            info["uncommitted_changes"] = bool(status.stdout.strip())
    except OSError:
        pass
    # A copy of the tree without .git (a lent GPU machine's): the caller names the commit.
    if not info.get("commit") and os.environ.get("HIERTCN_BENCH_COMMIT"):
        info["commit"] = os.environ["HIERTCN_BENCH_COMMIT"]
    return info


def format_table(rows: List[dict], runs: Optional[List[str]] = None) -> str:
    """One line per row; case names in full (cut, "fwd+bwd" read as "fwd"). ``runs``: a label per row naming the
    run it came from (summarize.py, which merges files), shown in a first column."""
    width = max([52, *(len(r["case"]) for r in rows)])
    op_width = max([16, *(len(r["op"]) for r in rows)])  # (wider names would shift every later column)
    variant_width = max([14, *(len(r["variant"]) for r in rows)])
    run_width = max([3, *(len(run) for run in runs)]) if runs else 0
    wall = any("wall_median_s" in r for r in rows)  # GPU runs: the host-inclusive time and its ratio too
    header = (f"{'run':<{run_width}} " if runs else "") + \
        f"{'op':<{op_width}} {'case':<{width}} {'variant':<{variant_width}} {'median':>10} {'speedup':>8} " \
        + (f"{'wall':>10} {'wall x':>8} " if wall else "") + \
        f"{'GB/s':>8} {'TFLOP/s':>8} {'%peak':>6} {'peak MiB':>9}"
    lines = [header, "-" * len(header)]
    for i, r in enumerate(rows):
        pct = r.get("%HBM") if r.get("%HBM") is not None else r.get("%FLOP peak")
        wall_columns = ""
        if wall:
            wall_time = _fmt_time(r["wall_median_s"]) if r.get("wall_median_s") is not None else "-"
            wall_columns = f"{wall_time:>10} {_fmt(r.get('wall_speedup'), 'x'):>8} "
        lines.append(
            (f"{runs[i]:<{run_width}} " if runs else "") +
            f"{r['op']:<{op_width}} {r['case']:<{width}} {r['variant']:<{variant_width}} "
            f"{_fmt_time(r['median_s']):>10} "
            f"{_fmt(r['speedup'], 'x'):>8} " + wall_columns +
            f"{_fmt(r.get('GB/s')):>8} {_fmt(r.get('TFLOP/s'), '', 3):>8} "
            f"{_fmt(pct):>6} {_fmt(r['peak_bytes'] / 2**20 if r.get('peak_bytes') is not None else None):>9}")
    return "\n".join(lines)


def _fmt(value, suffix="", digits=2):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _fmt_time(seconds):
    return f"{seconds * 1e6:.1f}us" if seconds < 1e-3 else f"{seconds * 1e3:.2f}ms"


def write_results(label: str, command: str) -> Optional[str]:
    if not _results:
        return None
    os.makedirs(RESULTS_DIR, exist_ok=True)
    # The knobs that change what a run holds name its file too: a run without the compiled variants, or of the
    # full matrix, must not replace the default run's file (all-cpu.json, behind RESULTS.md's tables).
    knobs = ("-full" if full_matrix() else "") + ("" if with_compiled() else "-nocompile")
    path = os.path.join(RESULTS_DIR, f"{label}{knobs}-{bench_device()}.json")
    payload = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": command, "machine": machine(), "full_matrix": full_matrix(), "compiled": with_compiled(),
               "results": summary_rows()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
    return path
