"""The Triton backend at sizes past int32 and past CUDA's grid limits (found by a bug hunt; each test failed before
the fix it guards).

Nothing here needs a GPU, and none holds more than a few MiB resident:

- the grid tests run the real Triton launchers (hiertcn_fast/triton/*.py) on meta tensors with the launch replaced
  by a recorder: they check the grid each launcher asks for. CUDA refuses more than 65535 blocks on grid axes 1
  and 2; past that the driver answers only 'invalid argument', so a launcher must stay within the limits or raise
  hiertcn_fast.triton.checked_grid's clear ValueError.
- the int32 tests run the real Triton kernels in the Triton interpreter (which computes int32 arithmetic as the
  compiled kernel does: wrapping) in a subprocess, on a weight of 2**32 float16 elements whose address space is
  reserved but of which only a few pages are ever touched (8 GiB virtual, a few MiB resident).
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _record_grids(monkeypatch, module, call):
    """Runs ``call`` with ``module.launcher`` replaced by a recorder; returns (grids asked for, error raised)."""
    grids = []

    def recording_launcher(kernel):
        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    grids.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), tuple(grid)))
                return launch
        return Launch()

    monkeypatch.setattr(module, "launcher", recording_launcher)
    try:
        call()
    except (ValueError, RuntimeError) as error:
        return grids, error
    return grids, None


def _assert_within_cuda_limits(grids):
    past = [(name, grid) for name, grid in grids
            if any(size > limit for size, limit in zip(grid, CUDA_GRID_LIMITS))]
    assert not past, (f"launched with grids past CUDA's limits {CUDA_GRID_LIMITS}: {past}; on a GPU the driver "
                      "answers only 'invalid argument'")


def _assert_refused_by_checked_grid(grids, error):
    """The call was refused with checked_grid's ValueError for grid axis 1 (not any other error), and
    nothing was launched past CUDA's limits before it."""
    _assert_within_cuda_limits(grids)
    assert isinstance(error, ValueError), f"expected checked_grid's ValueError, got {error!r} (launches: {grids})"
    assert re.search(r"the launch needs \d+ blocks on grid axis 1, past CUDA's limit of 65535; split the call",
                     str(error)), str(error)


def _gru_gates_forward_wide(module):
    hidden = 65535 * 256 + 1  # 16,776,961 units: cdiv(hidden, BLOCK_HIDDEN = 256) = 65536 blocks on axis 1
    return lambda: module.gru_gates_forward(_meta(1, 3 * hidden), _meta(1, 3 * hidden), _meta(1, hidden),
                                            _meta(1, hidden))


def _gru_gates_backward_wide(module):
    hidden = 65535 * 256 + 1
    return lambda: module.gru_gates_backward(_meta(1, hidden), _meta(1, 3 * hidden), _meta(1, 3 * hidden),
                                             _meta(1, hidden), _meta(1, 3 * hidden), _meta(1, 3 * hidden),
                                             _meta(1, hidden))


def test_triton_gru_gates_grid_axis1_past_65535(monkeypatch):
    """The gates' grid is (batch, cdiv(hidden, 256)): at hidden >= 16,776,961 (gi and gh 200 MB in float32 at
    batch 1) it passes 65535 blocks on axis 1, which CUDA refuses with 'invalid argument'; the launchers must raise
    checked_grid's clear error instead (they launched before)."""
    from hiertcn_fast.triton import gru_gates

    for make in (_gru_gates_forward_wide, _gru_gates_backward_wide):
        grids, error = _record_grids(monkeypatch, gru_gates, make(gru_gates))
        _assert_refused_by_checked_grid(grids, error)


def test_triton_session_mean_forward_grid_axis1_past_65535(monkeypatch):
    """The session mean's forward grid (batch, cdiv(dim, 128)) passes 65535 blocks on axis 1 at dim >= 8,388,481:
    a clear error, as the backward's (the forward launched, and the driver would say only 'invalid argument')."""
    from hiertcn_fast.triton import gru_session

    dim = 65535 * 128 + 1
    lengths = torch.ones(1, dtype=torch.int64, device="meta")
    grids, error = _record_grids(monkeypatch, gru_session,
                                 lambda: gru_session.session_mean_forward(_meta(1, 2, dim), lengths, _meta(1, dim)))
    _assert_refused_by_checked_grid(grids, error)


def test_triton_conv_weight_grad_grid_axis1_past_65535(monkeypatch):
    """At 2,097,121 <= in_channels <= 4,194,240 the forward and the input gradient fit the grid (cdiv(in_channels,
    64) <= 65535 on axis 1), and so must the dense weight gradient: its input-channel blocks now share axis 0 with
    the taps and row chunks (they were axis 1, cdiv(in_channels, 32) blocks: 'invalid argument' on a GPU, where the
    cuda backend runs the same call)."""
    from hiertcn_fast.triton import causal_conv

    c_in = 65535 * 32 + 1
    grids, error = _record_grids(monkeypatch, causal_conv, lambda: causal_conv.causal_conv_backward(
        _meta(1, 4, 1), _meta(1, 4, c_in), _meta(1, c_in, 1), None, None, 1, 1, 0, _meta(1, 4, 1), _meta(1, 4, c_in),
        _meta(1, c_in, 1), None))
    assert error is None, f"the backward refused a size its input gradient runs: {error}"
    assert any(name == "_weight_grad_dense_kernel" for name, _ in grids), grids
    _assert_within_cuda_limits(grids)


def test_triton_conv_step_grid_axis1_past_65535(monkeypatch):
    """The step's grid (batch, cdiv(out_channels, 64)) passes 65535 blocks on axis 1 at out_channels >= 4,194,241:
    a clear error, as the forward's (the step launched, and the driver would say only 'invalid argument')."""
    from hiertcn_fast.triton import causal_conv

    c_out = 65535 * 64 + 1
    position = torch.zeros(1, dtype=torch.int64, device="meta")
    grids, error = _record_grids(monkeypatch, causal_conv, lambda: causal_conv.causal_conv_step(
        _meta(1, 1), _meta(1, 1, c_out), None, None, None, 1, 1, 0, _meta(1, 0, 1), position, _meta(1, c_out)))
    _assert_refused_by_checked_grid(grids, error)


# ---- int32 weight offsets in the Triton conv kernels -------------------------------------------------------------

_KERNEL_SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [{root!r}, {here!r}]
import torch
from hiertcn_fast.triton import causal_conv as cc

IN, OUT, K = {c_in}, 2 ** 26, 2      # tap K - 1 starts at element (K - 1) * IN * OUT of the packed weight
dt = torch.float16
packed = torch.empty(K, IN, OUT, dtype=dt)   # address space only: the pages below are the only ones touched
g = torch.Generator().manual_seed(0)
for j in range(K):
    packed[j, :, :64] = torch.randn(IN, 64, generator=g).to(dt)
kind = {kind!r}
if kind == "forward":
    x = torch.randn(1, 1, IN, generator=g).to(dt)
    out = torch.full((1, 1, 64), float("nan"), dtype=dt)
    # the first program only (output channels 0..63 of step 0): at step 0 only the newest tap, K - 1, lands
    cc._conv_kernel[(1, 1)](x, packed, out, out, out, out, out, 1, IN, OUT, IN, OUT, K, 1, 1, x.stride(0),
                            x.stride(1), 0, 0, DENSE=True, HAS_BIAS=False, HAS_TABLE=False, HAS_RESIDUAL=False,
                            WRITE_PRE=False, PRE_BITS=False, ACTIVATION=0, DOT_PRECISION=None, BLOCK_T=32, BLOCK_O=64,
                            BLOCK_C=32)
    got, row = out[0, 0], x[0, 0]
else:
    x = torch.randn(1, IN, generator=g).to(dt)
    history, position = torch.zeros(1, 1, IN, dtype=dt), torch.zeros(1, dtype=torch.int64)
    out = torch.full((1, 64), float("nan"), dtype=dt)
    cc._step_kernel[(1, 1)](x, packed, out, out, out, history, position, out, IN, OUT, IN, OUT, K, 1, 1, x.stride(0),
                            0, DENSE=True, HAS_BIAS=False, HAS_TABLE=False, HAS_RESIDUAL=False, ACTIVATION=0,
                            BLOCK_O=64, BLOCK_C=32)
    got, row = out[0], x[0]
expected = row.double() @ packed[K - 1, :, :64].double()
diff = (got.double() - expected).abs().max().item()
print("max abs diff", diff)
sys.exit(0 if diff < 0.05 else 3)
"""


def _run_kernel(kind, c_in):
    script = _KERNEL_SCRIPT.format(root=ROOT, here=HERE, c_in=c_in, kind=kind)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("kind", ["forward", "step"])
def test_triton_conv_weight_offsets_past_int32(kind):
    """The packed weight's offsets are int64 in the Triton conv kernels. They were int32 (j * in_channels *
    out_per_group in _conv_kernel, tap_size = in_channels * out_per_group in _step_kernel, and the same class in
    the weight gradients): for a dense layer with (k - 1) * in * out >= 2**31 (e.g. k = 3 and 32768 channels each
    side, 6.4 GB in bfloat16) the newest tap's offset wrapped negative and the kernel read 4 GiB before the weight.
    The cuda and cpu backends compute these offsets in int64.

    Run in the Triton interpreter (int32 wraps there as compiled): with in = 16 (no wrap; the control) and in = 32
    ((k - 1) * in * out = 2**31, where the process died with SIGSEGV in the weight load) the output must match."""
    control = _run_kernel(kind, 16)
    assert control.returncode == 0, (f"{kind} kernel below 2**31 (the control): rc {control.returncode}; "
                                     f"{control.stdout[-300:]} {control.stderr[-1500:]}")
    wrapped = _run_kernel(kind, 32)
    assert wrapped.returncode == 0, (f"{kind} kernel at (k - 1) * in * out = 2**31: rc {wrapped.returncode} "
                                     f"(-11: SIGSEGV from the wrapped int32 offset); {wrapped.stdout[-300:]}")
