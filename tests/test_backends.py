"""Backend discovery and selection: keyword, context manager, environment variable, auto."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import hiertcn_fast
from hiertcn_fast.backends import ENV_VAR, describe, requested_backend, resolve, triton_interpreted

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


def _record_gru_gates_backends(monkeypatch):
    """The backend that runs each gru_gates call, recorded where the op hands the work over: its reference
    function, or the kernel launcher with the backend's name."""
    gru_module = importlib.import_module("hiertcn_fast.ops.gru")  # the package's `gru` is the op, not the module
    ran = []
    reference, kernel = gru_module.gru_gates_reference, gru_module._gru_gates_kernel

    def recorded_reference(*args):
        ran.append("reference")
        return reference(*args)

    def recorded_kernel(name, *args):
        ran.append(name)
        return kernel(name, *args)

    monkeypatch.setattr(gru_module, "gru_gates_reference", recorded_reference)
    monkeypatch.setattr(gru_module, "_gru_gates_kernel", recorded_kernel)
    return ran


def test_keyword_context_and_environment_route_ops(monkeypatch):
    ran = _record_gru_gates_backends(monkeypatch)
    monkeypatch.delenv(ENV_VAR, raising=False)
    gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
    expected = hiertcn_fast.ops.gru_gates_reference(gi, gh, h)

    def call(backend=None):
        torch.testing.assert_close(hiertcn_fast.ops.gru_gates(gi, gh, h, backend=backend), expected)
        return ran.pop()

    assert call() == "cpu"  # auto, on CPU tensors
    with hiertcn_fast.use_backend("reference"):
        assert call() == "reference"
        assert call("cpu") == "cpu"
        with hiertcn_fast.use_backend("auto"):
            assert call() == "cpu"
        assert call() == "reference"
    assert call() == "cpu"
    monkeypatch.setenv(ENV_VAR, "reference")
    assert call() == "reference"
    with hiertcn_fast.use_backend("cpu"):
        assert call() == "cpu"
    if triton_interpreted() and not torch.cuda.is_available():
        monkeypatch.setenv(ENV_VAR, "triton")
        assert call() == "triton"
    assert ran == []


def test_cuda_backend_refuses_cpu_tensors_on_any_machine(monkeypatch):
    # Where CUDA runs, the refusal says the tensors are on the CPU; elsewhere, why the backend is missing and
    # its fix. Either way it is an error, never the cpu kernels in its place.
    ran = _record_gru_gates_backends(monkeypatch)
    monkeypatch.delenv(ENV_VAR, raising=False)
    gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
    refusal = r"gru_gates: backend 'cuda' cannot run this call: (it needs CUDA tensors, got tensors on cpu|.*fix: )"
    with pytest.raises(hiertcn_fast.BackendUnavailableError, match=refusal):
        hiertcn_fast.ops.gru_gates(gi, gh, h, backend="cuda")
    with hiertcn_fast.use_backend("cuda"):
        with pytest.raises(hiertcn_fast.BackendUnavailableError, match=refusal):
            hiertcn_fast.ops.gru_gates(gi, gh, h)
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(hiertcn_fast.BackendUnavailableError, match=refusal):
        hiertcn_fast.ops.gru_gates(gi, gh, h)
    assert ran == []


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "hiertcn_fast", "info"], capture_output=True, text=True, check=True)
    for name in ("cuda", "triton", "cpu", "reference"):
        assert name in out.stdout


@pytest.mark.parametrize("value,said", [(None, "HIERTCN_BACKEND unset: auto"), ("", "HIERTCN_BACKEND empty: auto"),
                                        ("cpu", "HIERTCN_BACKEND=cpu"),
                                        ("bogus", "HIERTCN_BACKEND='bogus' is INVALID, every op call will raise")])
def test_info_says_what_the_environment_selects(monkeypatch, value, said):
    """An invalid HIERTCN_BACKEND, which makes every op call raise, was shown as if it were a choice."""
    if value is None:
        monkeypatch.delenv("HIERTCN_BACKEND", raising=False)
    else:
        monkeypatch.setenv("HIERTCN_BACKEND", value)
    line = next(line for line in describe().splitlines() if "backend selection" in line)
    assert said in line, line


def test_out_of_date_extension_is_reported_not_fatal(monkeypatch):
    from hiertcn_fast import _extension

    monkeypatch.setattr(_extension, "_module", _extension._module)
    monkeypatch.setattr(_extension, "_error", _extension._error)
    monkeypatch.setattr(_extension, "_stale_op", _extension._stale_op)
    fake = _extension.register_fake("op_this_build_lacks")(lambda: None)
    assert fake() is None
    assert not _extension.loaded()
    assert "out of date" in _extension.load_error() and "op_this_build_lacks" in _extension.load_error()
    for status in (s for s in hiertcn_fast.backends() if s.name in ("cpu", "cuda")):
        # One reason and one fix: it said "not loaded (... out of date ...; rebuild it ...)", then "build it with a
        # C++ compiler".
        assert not status.available
        assert status.detail == "the compiled extension is out of date: it lacks hiertcn_fast::op_this_build_lacks"
        assert status.fix.startswith("rebuild it: pip install --no-build-isolation"), status.fix


@pytest.mark.parametrize("reads_contextvar", [True, False], ids=["contextvar", "module copy"])
def test_a_compiled_op_follows_the_use_backend_block(monkeypatch, reads_contextvar):
    """torch.compile traces the use_backend selection and recompiles in another block: through the ContextVar
    (torch >= 2.14's dynamo traces it) and through the module-level copy read on older releases (2.11's dynamo
    cannot trace a ContextVar), which this forces here."""
    module = sys.modules["hiertcn_fast.backends"]
    if reads_contextvar and not module._TRACE_READS_CONTEXTVAR:
        pytest.skip(f"torch {torch.__version__}'s dynamo cannot trace a ContextVar (the module copy serves)")
    monkeypatch.setattr(module, "_TRACE_READS_CONTEXTVAR", reads_contextvar)
    monkeypatch.delenv(ENV_VAR, raising=False)
    ran = []  # per call: whether the graph that ran calls the cpu kernel

    def capture(graph_module, example_inputs):
        calls_kernel = "hiertcn_fast.gru_gates_out" in graph_module.code

        def run(*args):
            ran.append(calls_kernel)
            return graph_module.forward(*args)
        return run

    torch._dynamo.reset()
    compiled = torch.compile(lambda gi, gh, h: hiertcn_fast.ops.gru_gates(gi, gh, h), backend=capture,
                             fullgraph=True)
    gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)
    expected = hiertcn_fast.ops.gru_gates_reference(gi, gh, h)
    for block, kernel in (("reference", False), ("cpu", True), ("reference", False), ("auto", True)):
        with hiertcn_fast.use_backend(block):
            torch.testing.assert_close(compiled(gi, gh, h), expected)
        assert ran.pop() == kernel, block


@pytest.mark.parametrize("triton_version, numpy_version, clash", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.5.5", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
    ("3.8.0", "2.4.6", False), ("3.6.0", "2.4.0rc1", True), ("3.10.0", "3.0.0", False)])
def test_the_interpreter_of_triton_before_3_7_with_numpy_2_4_is_refused_with_the_fix(
        monkeypatch, triton_version, numpy_version, clash):
    """Triton 3.6's interpreter fails inside itself on NumPy >= 2.4 ('only 0-dimensional arrays can be converted to
    Python scalars'): the triton backend then says so, with the fix, instead of running into that error."""
    import importlib.metadata

    import numpy

    backends_module = importlib.import_module("hiertcn_fast.backends")  # the package's `backends` is a function
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: triton_version if name == "triton" else real_version(name))
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backends_module.interpreter_numpy_clash.cache_clear()
    try:
        reason = backends_module.interpreter_numpy_clash()
        status = backends_module._status("triton")
    finally:
        backends_module.interpreter_numpy_clash.cache_clear()
    assert bool(reason) == clash
    assert status.available == (not clash) or importlib.util.find_spec("triton") is None
    if clash:
        assert f"triton {triton_version}" in reason and f"NumPy {numpy_version}" in reason
        assert "numpy<2.4" in status.fix


def test_torch_func_transforms_run_the_reference_under_auto_and_refuse_a_named_compiled_backend():
    """torch.func.grad (per-sample gradients, MAML) through the modules: the compiled kernels' autograd functions
    cannot be transformed (torch refuses them), so auto picks the reference inside a transform, and the same
    module outside a transform still runs the compiled kernels. A compiled backend asked for by name is refused."""
    from hiertcn_fast.nn import GRU, TCN, CausalConv1d, GRUCell

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    padded = torch.nn.functional.pad(x.transpose(1, 2), (4, 0))  # nn.Conv1d's input for the causal conv
    def first(out):
        return out[0]

    def same(out):
        return out

    # (ours, its torch.nn peer, our input, the peer's, what of our output, what of the peer's)
    cases = [(GRU(4, 6, num_layers=2, batch_first=True), torch.nn.GRU(4, 6, num_layers=2, batch_first=True), x, x,
              first, first),
             (GRUCell(4, 6), torch.nn.GRUCell(4, 6), x[:, 0], x[:, 0], same, same),
             (CausalConv1d(4, 6, 3, dilation=2), torch.nn.Conv1d(4, 6, 3, dilation=2), x, padded, same,
              lambda out: out.transpose(1, 2))]
    for module, peer, given, peer_given, our_output, peer_output in cases:
        module, peer = module.double(), peer.double()
        peer.load_state_dict(module.state_dict())
        weights = torch.randn_like(our_output(module(given)))

        def ours(parameters):
            return (our_output(torch.func.functional_call(module, parameters, (given,))) * weights).sum()

        def theirs(parameters):
            return (peer_output(torch.func.functional_call(peer, parameters, (peer_given,))) * weights).sum()

        got = torch.func.grad(ours)(dict(module.named_parameters()))
        want = torch.func.grad(theirs)(dict(peer.named_parameters()))
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=f"{type(module).__name__} {name}")
    # A TCN with the context (HierTCN's low level): against ordinary autograd of the reference.
    context = torch.randn(3, 6, dtype=torch.float64)
    tcn = TCN(4, [6, 6], 3, context_channels=6).double()
    got = torch.func.grad(lambda p: torch.func.functional_call(tcn, p, (x, context)).square().sum())(
        dict(tcn.named_parameters()))
    with hiertcn_fast.use_backend("reference"):
        want = torch.autograd.grad(tcn(x, context).square().sum(), list(tcn.parameters()))
    for (name, value), expected in zip(got.items(), want):
        torch.testing.assert_close(value, expected, msg=f"TCN {name}")
    named = GRUCell(4, 6, backend="cpu").double()
    with pytest.raises(hiertcn_fast.BackendUnavailableError, match="backend 'cpu' cannot run this call: torch.func"):
        torch.func.grad(lambda p: torch.func.functional_call(named, p, (x[:, 0],)).sum())(
            dict(named.named_parameters()))
    # What auto resolves to inside a transform and, again, outside it.
    inside = []

    def records(t):
        inside.append(resolve("an_op", None, t.device, t.dtype, DTYPES))
        return t.sum()

    torch.func.grad(records)(torch.ones(2))
    assert inside == ["reference"]
    assert resolve("an_op", None, torch.device("cpu"), torch.float32, DTYPES) == "cpu"


def test_triton_grids_past_cudas_limits_are_a_clear_error():
    """A grid of batch * time blocks on axis 0 passes 2**31 - 1 at billions of rows: the driver's 'invalid
    argument' would not say why. (Axes 1 and 2: 65535.)"""
    from hiertcn_fast.triton import checked_grid

    assert checked_grid((2 ** 31 - 1, 65535, 65535), "k") == (2 ** 31 - 1, 65535, 65535)
    for grid, axis in (((2 ** 31, 1), 0), ((1, 65536), 1), ((1, 1, 65536), 2)):
        with pytest.raises(ValueError, match=rf"k: the launch needs {grid[axis]} blocks on grid axis {axis}"):
            checked_grid(grid, "k")
    assert checked_grid((object(), 1), "k")[1] == 1  # a traced size is left to the launch


_INTERPRETER_SET_LATE = r"""
import os, torch
import hiertcn_fast
from hiertcn_fast.ops import causal_conv1d
os.environ["TRITON_INTERPRET"] = "1"  # after importing hiertcn_fast, which imports triton
x, w = torch.randn(2, 5, 3), torch.randn(4, 3, 2)
status = {s.name: s for s in hiertcn_fast.backends()}["triton"]
assert not status.available and "TRITON_INTERPRET=1 was set after Triton was imported" in status.detail, status
assert "before importing hiertcn_fast" in status.fix, status
try:
    causal_conv1d(x, w, backend="triton")
except hiertcn_fast.BackendUnavailableError as error:
    assert "TRITON_INTERPRET=1 was set after Triton was imported" in str(error), str(error)
else:
    raise AssertionError("the triton backend ran with Triton's helpers built for compiled kernels")
torch.testing.assert_close(causal_conv1d(x, w), causal_conv1d(x, w, backend="reference"))  # auto is unaffected
print("REFUSED")
"""


def test_triton_interpret_set_after_importing_the_package_is_a_clear_refusal():
    """Triton decides at its import whether its own @jit helpers run in the interpreter, and importing hiertcn_fast
    imports it (torch.library.triton_op). TRITON_INTERPRET=1 set after that made the backend say it was available,
    and every kernel then failed inside the interpreter ("Cannot call @triton.jit'd outside of the scope of a
    kernel"); the backend is now unavailable, and says why and what to do."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(hiertcn_fast.__file__)),
                                         env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_SET_LATE], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "REFUSED" in done.stdout, done.stderr[-3000:]
