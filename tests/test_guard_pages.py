"""Every kernel (CPU, CUDA's in the emulator, Triton's in its interpreter) with its inputs against inaccessible
pages: a read past the end or before the start of an input kills the process (tests/guard_pages.py), even when the
value read is never used, which the NaN margins of the other tests cannot see."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard pages use Linux's mmap flags")


def run(mode, side):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    env.pop("HIERTCN_EMULATE_CUDA", None)
    return subprocess.run([sys.executable, os.path.join(HERE, "guard_pages.py"), mode, side], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("side", ["end", "start"])
def test_a_read_past_a_guarded_tensor_kills_the_process(side):
    result = run("probe", side)
    assert result.returncode == -11, (result.returncode, result.stdout, result.stderr[-2000:])
    assert result.stdout.splitlines() == ["probing"]


# The kernels' entry points each mode must have called with every tensor argument guarded (internal buffers and
# outputs included): a case that stopped reaching one would leave its kernel unguarded.
COMPILED_OUT_OPS = {"causal_conv1d_out", "causal_conv1d_backward_out", "causal_conv1d_step_out", "tcn_step_out",
                    "context_weight_pack_out", "context_weight_grad_out", "gru_gates_out", "gru_gates_backward_out",
                    "gru_layer_forward_out", "gru_layer_backward_out", "softmax_xent_out"}
GUARDED_OUT_OPS = {
    "cpu": COMPILED_OUT_OPS,
    "emulated": COMPILED_OUT_OPS,
    "triton": {"causal_conv1d_triton_out", "causal_conv1d_backward_triton_out", "causal_conv1d_step_triton_out",
               "gru_gates_triton_out", "gru_gates_backward_triton_out", "session_mean_triton_out",
               "session_mean_backward_triton_out"},
}


@pytest.mark.parametrize("side", ["end", "start"])
@pytest.mark.parametrize("mode", ["cpu", "emulated", "triton"])
def test_no_kernel_reads_outside_its_inputs(mode, side):
    """Nor outside the buffers an op makes for itself (packed weights, saved pre-activations, the pre-activation
    gradient, outputs), which reach the kernels' *_out entry points guarded too: a read or write past them dies."""
    result = run(mode, side)
    lines = result.stdout.splitlines()
    case = lines[-1] if lines else "(before the first case)"
    assert result.returncode == 0, f"{mode} kernels, inputs guarded at their {side}: case {case!r} died " \
                                   f"(status {result.returncode}):\n{result.stderr[-3000:]}"
    assert lines[-1] == "done" and len(lines) > 10
    assert lines[-2].startswith("guarded: "), lines[-2]
    missing = GUARDED_OUT_OPS[mode] - set(lines[-2].split()[1:])
    assert not missing, f"{mode}: no case called {sorted(missing)} with guarded arguments"
