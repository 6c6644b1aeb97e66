"""Helpers for the op tests: backend/device pairs, fresh random inputs, dtype tolerances."""

import contextlib
import inspect
import os
import sys
import threading

import pytest
import torch

CUDA = torch.cuda.is_available()
# The cpu backend's ops with CUDA kernels run those kernels in the CPU emulator (tests/cuda_emu/proxy.py).
EMULATING_CUDA = os.environ.get("HIERTCN_EMULATE_CUDA") == "1"

# (backend, device) pairs that run here; GPU ones carry the gpu marker and skip without CUDA.
BACKEND_DEVICES = [
    pytest.param("reference", "cpu", id="reference-cpu"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cuda" if CUDA else "cpu", id="triton-cuda" if CUDA else "triton-interpreted"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
]

# The dtype each backend is compared in against the float64 reference.
COMPARE_DTYPE = {"reference": torch.float64, "cpu": torch.float64, "triton": torch.float32, "cuda": torch.float32}

TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def rand(*shape, dtype=torch.float64, device="cpu", noncontiguous=False, scale=1.0):
    """Fresh random values, never all zero. With noncontiguous=True the tensor is a slice of a wider
    one, so it is not contiguous: its rows are strided, the last dimension keeping unit stride, or, for a
    1-D tensor (a bias), its elements are every other one of a longer vector."""
    if noncontiguous and len(shape) == 1 and shape[0] > 1:
        return (torch.randn(shape[0] * 2 + 1, dtype=dtype, device=device) * scale)[1::2]
    if noncontiguous:
        wide = torch.randn(*shape[:-1], shape[-1] * 2 + 3, dtype=dtype, device=device) * scale
        return wide[..., 1:1 + shape[-1]]
    return torch.randn(*shape, dtype=dtype, device=device) * scale


def assert_close(actual, expected, dtype=None):
    tol = TOLERANCE[dtype or actual.dtype]
    assert not torch.isnan(actual).any(), "output holds NaN: an element was left unwritten"
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol)


@contextlib.contextmanager
def conv_blas(mode):
    """The cpu backend's route for big dense convolutions forced to mode ("always", "never", "auto") inside the
    block, restored after it (the setting is one for the process; hiertcn_fast.ops.set_cpu_conv_blas)."""
    from hiertcn_fast.ops import set_cpu_conv_blas
    previous = set_cpu_conv_blas(mode)
    try:
        yield
    finally:
        set_cpu_conv_blas(previous)


@contextlib.contextmanager
def interrupt_at(function, snippet, hit=1):
    """Raise KeyboardInterrupt in ``function`` just before the ``hit``-th execution of its line containing
    ``snippet``, as a Ctrl-C landing there would (CPython delivers one between bytecodes: on a function's entry, a
    loop's next iteration, after a call returns). Yields a list that holds True once it fired."""
    function = inspect.unwrap(function)
    code = function.__code__
    lines, first = inspect.getsourcelines(function)
    targets = {first + i for i, line in enumerate(lines) if snippet in line}
    assert targets, f"{snippet!r} not in {function.__qualname__}"
    count, fired = [0], []

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno in targets:
            count[0] += 1
            if count[0] == hit:
                sys.settrace(None)
                fired.append(True)
                raise KeyboardInterrupt(f"simulated Ctrl-C at {function.__qualname__}: {snippet}")
        return local

    def global_(frame, event, arg):
        return local if frame.f_code is code else None

    sys.settrace(global_)
    try:
        yield fired
    finally:
        sys.settrace(None)


def interrupted_at_line(codes, n, call, recommender):
    """Runs ``call(recommender)`` raising KeyboardInterrupt before the ``n``-th line executed in any of ``codes``
    (every line start of the recommender's methods: a superset of where a real Ctrl-C can land). Returns where it
    fired, or None when the call has fewer lines."""
    count, fired = [0], []

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == n:
                sys.settrace(None)
                fired.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                raise KeyboardInterrupt
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code in codes else None)
    try:
        call(recommender)
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return fired[0] if fired else None


def run_bounded(function, seconds=20, what=lambda: ""):
    """``function()`` on a daemon thread; returns (result, exception). A call still running after ``seconds`` fails
    the test (saying ``what()``): a hang fails instead of blocking the run."""
    outcome = {}

    def body():
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: B902 - the test inspects whatever ended the call
            outcome["error"] = error

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang {what()}"
    return outcome.get("result"), outcome.get("error")
