"""Every Triton kernel compiles for sm_90 (a Hopper GPU) on this CPU-only machine: tests/triton_sm90_compile.py,
run in its own process without TRITON_INTERPRET (the interpreter, which the other tests use, replaces the kernels
the compiler needs and cannot see what only compilation rejects)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, os.path.join(HERE, "triton_sm90_compile.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-20000:]
    assert "compiled for sm_90" in done.stdout, done.stdout
