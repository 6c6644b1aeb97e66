"""Backend discovery and selection: keyword, context manager, environment variable, auto."""

import subprocess
import sys

import pytest
import torch

import hiertcn_fast
from hiertcn_fast import backends as backend_module  # noqa: F401
from hiertcn_fast.backends import ENV_VAR, requested_backend, resolve

DTYPES = {name: {torch.float32} for name in ("cuda", "triton", "cpu", "reference")}


def test_status_lists_every_backend_with_reason_and_fix():
    statuses = hiertcn_fast.backends()
    assert [s.name for s in statuses] == ["cuda", "triton", "cpu", "reference"]
    for status in statuses:
        assert status.detail
        assert status.available or status.fix, f"{status.name} unavailable without a fix"
    by_name = {s.name: s for s in statuses}
    assert by_name["reference"].available
    assert by_name["cpu"].available, "the compiled extension must be built for the tests: " + by_name["cpu"].detail
    assert by_name["cuda"].available == (torch.cuda.is_available() and hiertcn_fast._extension.compiled_with_cuda())


def test_precedence_keyword_then_context_then_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert requested_backend() == "reference"
    with hiertcn_fast.use_backend("cpu"):
        assert requested_backend() == "cpu"
        assert requested_backend("triton") == "triton"
        with hiertcn_fast.use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "cpu"
    assert requested_backend() == "reference"
    monkeypatch.delenv(ENV_VAR)
    assert requested_backend() == "auto"


def test_bad_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with hiertcn_fast.use_backend("gpu"):
            pass
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=ENV_VAR):
        requested_backend()


def test_auto_prefers_compiled_cpu_kernels_for_cpu_tensors():
    assert resolve("op", None, torch.device("cpu"), torch.float32, DTYPES) == "cpu"
    no_cpu_kernel = dict(DTYPES, cpu=set())
    assert resolve("op_without_cpu_kernel", None, torch.device("cpu"), torch.float32, no_cpu_kernel) == "reference"


def test_refusals_are_remembered_and_raised_again():
    no_cpu_kernel = dict(DTYPES, cpu=set())
    for _ in range(2):
        with pytest.raises(hiertcn_fast.BackendUnavailableError, match="does not support torch.float32"):
            resolve("op_refusing_cpu", "cpu", torch.device("cpu"), torch.float32, no_cpu_kernel)


def test_context_manager_routes_ops():
    gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
    with hiertcn_fast.use_backend("cuda"):
        if not torch.cuda.is_available():
            with pytest.raises(hiertcn_fast.BackendUnavailableError, match="fix|CUDA tensors"):
                hiertcn_fast.ops.gru_gates(gi, gh, h)


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "hiertcn_fast", "info"], capture_output=True, text=True, check=True)
    for name in ("cuda", "triton", "cpu", "reference"):
        assert name in out.stdout
