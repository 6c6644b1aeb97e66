"""setup.py's configuration errors are one clear line, never a traceback; the pure-Python mode works."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_setup(**env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_missing_compiler_is_a_clear_message():
    result = run_setup(CXX="/no/such/compiler")
    assert result.returncode != 0
    assert "no C++ compiler found" in result.stderr and "HIERTCN_EXTENSION=0" in result.stderr
    assert "Traceback" not in result.stderr


def test_required_cuda_without_nvcc_is_a_clear_message():
    result = run_setup(HIERTCN_CUDA="1", CUDA_HOME="/no/such/cuda")
    assert result.returncode != 0
    assert "HIERTCN_CUDA=1 but the CUDA kernels cannot be built: nvcc not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_knob_value_is_rejected():
    result = run_setup(HIERTCN_CUDA="yes")
    assert result.returncode != 0 and "HIERTCN_CUDA must be auto, 0 or 1" in result.stderr


@pytest.mark.parametrize("env", [{"HIERTCN_EXTENSION": "0"}, {"HIERTCN_CUDA": "0"}])
def test_configurations_without_cuda_or_compilation_configure(env):
    result = run_setup(**env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("0.1.0")


def test_import_and_reference_backend_work_without_the_extension(tmp_path):
    # A copy of the pure-Python package (no _C) must import and report why cpu/cuda are missing.
    import shutil

    shutil.copytree(os.path.join(ROOT, "hiertcn_fast"), tmp_path / "hiertcn_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = ("import torch, hiertcn_fast as hf; from hiertcn_fast.ops import gru_gates\n"
            "s = {b.name: b for b in hf.backends()}\n"
            "assert not s['cpu'].available and 'not loaded' in s['cpu'].detail, s['cpu']\n"
            "gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)\n"
            "print(gru_gates(gi, gh, h).shape)\n"
            "try:\n    gru_gates(gi, gh, h, backend='cpu')\nexcept hf.BackendUnavailableError as e:\n"
            "    print('refused:', e)\n")
    # -S skips .pth files, so an editable install of the real package cannot supply its _C.
    import site

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + site.getsitepackages()))
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 2])" in result.stdout and "refused:" in result.stdout


def test_the_built_extension_runs_its_cpu_kernels_in_parallel():
    """The CPU kernels' at::parallel_for is parallel only in code compiled with OpenMP; a build without it
    passed every other test while running each kernel on one thread."""
    from hiertcn_fast import _extension
    if not _extension.loaded():
        pytest.fail(f"the compiled extension is not loaded: {_extension.load_error()}")
    assert "openmp=1" in _extension.build_info().split(), _extension.build_info()
    # And the runtime is torch's own: one OpenMP runtime in the process.
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes
