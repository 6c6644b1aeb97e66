"""The benchmark harness refuses to time variants that compute different things."""

import importlib.util
import os

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_harness", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                  "harness.py"))
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
