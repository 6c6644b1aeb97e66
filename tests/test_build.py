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
    assert "CUDA_HOME=/no/such/cuda" in result.stderr  # the value that was wrong, named
    assert "Traceback" not in result.stderr


def test_bad_knob_value_is_rejected():
    result = run_setup(HIERTCN_CUDA="yes")
    assert result.returncode != 0 and "HIERTCN_CUDA must be auto, 0 or 1" in result.stderr


@pytest.mark.parametrize("env, expected", [
    ({"HIERTCN_EXTENSION": "false"}, "HIERTCN_EXTENSION must be 0 or 1, got 'false'"),
    ({"MAX_JOBS": "0"}, "MAX_JOBS must be a positive integer, got '0'"),
    ({"MAX_JOBS": "abc"}, "MAX_JOBS must be a positive integer, got 'abc'"),
])
def test_bad_build_settings_are_one_line_errors(env, expected):
    """HIERTCN_EXTENSION=false went on to the full compile (only "0" was read), MAX_JOBS=abc was ignored by torch
    and MAX_JOBS=0 became ninja -j 0 (no limit at all)."""
    result = run_setup(**env)
    assert result.returncode != 0 and expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("archs", ["sm_90", "9.0,8.0", ";"])
def test_bad_cuda_archs_are_one_line_errors(archs):
    """A bad HIERTCN_CUDA_ARCHS reached torch, whose ValueError ("Unknown CUDA arch (sm_90) or GPU not supported")
    came as a 30-line traceback naming no variable."""
    if not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("needs the CUDA toolkit at /usr/local/cuda (the archs are read where the CUDA kernels are built)")
    result = run_setup(HIERTCN_CUDA="1", CUDA_HOME="/usr/local/cuda", HIERTCN_CUDA_ARCHS=archs)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "HIERTCN_CUDA_ARCHS must list CUDA architectures like 8.0;9.0+PTX" in result.stderr
    assert f"got {archs!r}" in result.stderr


def test_an_old_setuptools_without_wheel_is_a_one_line_error(tmp_path):
    """With --no-build-isolation (the install README gives) pip installs no build requirement, and a fresh Python
    3.11 venv's setuptools 65.5 (without the wheel package) failed with "error: invalid command 'bdist_wheel'",
    naming nothing. Run without site-packages (python -S), where only a stand-in setuptools 65.5 is found."""
    fake = tmp_path / "setuptools"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '65.5.0'\n"
                                      "def find_packages(**kwargs):\n    return []\n"
                                      "def setup(**kwargs):\n    pass\n")
    result = subprocess.run([sys.executable, "-S", "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "setuptools >= 70.1 (or the wheel package) is needed, found setuptools 65.5.0 and no wheel" in result.stderr


@pytest.mark.parametrize("env", [{"HIERTCN_EXTENSION": "0"}, {"HIERTCN_CUDA": "0"}])
def test_configurations_without_cuda_or_compilation_configure(env):
    result = run_setup(**env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("0.1.0")


def run_unbuilt_copy(folder, code, source_tree=False):
    """Runs ``code`` in a fresh interpreter that imports a copy of the pure-Python package (no _C) made in
    ``folder`` (with setup.py and csrc/ beside it when ``source_tree``, as in a checkout); returns its stdout."""
    import shutil
    import site

    shutil.copytree(os.path.join(ROOT, "hiertcn_fast"), folder / "hiertcn_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if source_tree:
        shutil.copy(os.path.join(ROOT, "setup.py"), folder / "setup.py")
        (folder / "csrc").mkdir()
    # -S skips .pth files, so an editable install of the real package cannot supply its _C.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder)] + site.getsitepackages()))
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_and_reference_backend_work_without_the_extension(tmp_path):
    # A copy of the pure-Python package (no _C) must import and report why cpu/cuda are missing.
    code = ("import torch, hiertcn_fast as hf; from hiertcn_fast.ops import gru_gates\n"
            "s = {b.name: b for b in hf.backends()}\n"
            "assert not s['cpu'].available and 'not loaded' in s['cpu'].detail, s['cpu']\n"
            "gi, gh, h = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 2)\n"
            "print(gru_gates(gi, gh, h).shape)\n"
            "try:\n    gru_gates(gi, gh, h, backend='cpu')\nexcept hf.BackendUnavailableError as e:\n"
            "    print('refused:', e)\n")
    stdout = run_unbuilt_copy(tmp_path, code)
    assert "torch.Size([2, 2])" in stdout and "refused:" in stdout


@pytest.mark.parametrize("layout", ["source tree", "package only"])
def test_an_unbuilt_source_tree_on_the_path_is_named_as_such(tmp_path, layout):
    """Installed with the README's `pip install ... .`, then run from the checkout: Python imports the checkout's
    hiertcn_fast, which holds no extension, and the cpu backend said "not loaded" with, as its fix, the install
    just done. It now says which folder was imported and why, and how to use the installed copy or build in place."""
    code = ("import hiertcn_fast as hf\n"
            "s = {b.name: b for b in hf.backends()}\n"
            "print('DETAIL', s['cpu'].detail)\nprint('FIX', s['cpu'].fix)\n")
    stdout = run_unbuilt_copy(tmp_path, code, source_tree=layout == "source tree")
    detail = stdout.split("DETAIL ", 1)[1].split("\nFIX ")[0]
    fix = stdout.split("FIX ", 1)[1]
    if layout == "source tree":
        assert detail.startswith(f"this hiertcn_fast is the source tree {tmp_path / 'hiertcn_fast'}, which holds no "
                                 f"compiled extension (ModuleNotFoundError"), detail
        assert fix.startswith("run from another folder to use the installed package, or build the tree in place")
        assert "python setup.py build_ext --inplace" in fix
    else:  # a copy of the package alone is no checkout: the plain message
        assert detail.startswith("the compiled extension is not loaded (ModuleNotFoundError"), detail
        assert fix.startswith("build it with a C++ compiler: pip install"), fix


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


def test_the_sdist_holds_everything_the_build_reads(tmp_path):
    """Without MANIFEST.in the sdist held only the listed extension sources: no csrc/SOURCES (which setup.py reads
    first), no header, no CMakeLists.txt, and pip install of it failed at once."""
    import shutil
    import tarfile

    # From a copy of the source files: setuptools also packs what a stale *.egg-info/SOURCES.txt lists, and CI
    # runs these tests in copies of the tree that are not git checkouts.
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    shutil.copytree(os.path.join(ROOT, "hiertcn_fast"), tree / "hiertcn_fast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "tests"), tree / "tests", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "benchmarks"), tree / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__", "results"))
    (tree / "benchmarks" / "results").mkdir()
    (tree / "benchmarks" / "results" / "scratch.json").write_text("{}")  # a local run's output: not packed
    for name in ("setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", "MANIFEST.in", "Makefile"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), tree / name)
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                            cwd=tree, env=dict(os.environ, HIERTCN_CUDA="0"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = ["CMakeLists.txt"] + [os.path.relpath(os.path.join(folder, name), ROOT)
                                   for folder, _, files in os.walk(os.path.join(ROOT, "csrc")) for name in files]
    assert "csrc/SOURCES" in needed and not sorted(set(needed) - names)
    # The tests with their helpers (setuptools alone packed the test_*.py files without conftest.py, helpers.py,
    # cuda_emu/, which 27 of them import), and nothing compiled.
    tests = [os.path.relpath(os.path.join(folder, name), ROOT)
             for folder, _, files in os.walk(os.path.join(ROOT, "tests")) if "__pycache__" not in folder
             for name in files if not name.endswith((".pyc", ".so", ".o"))]
    assert "tests/conftest.py" in tests and "tests/cuda_emu/proxy.py" in tests and not sorted(set(tests) - names)
    assert not [name for name in names if name.endswith((".so", ".o", ".pyc")) or "__pycache__" in name]
    # What three test files read (benchmarks/harness.py and the scripts beside it) and the Makefile the README's
    # commands run; a local run's results are left out.
    benchmarks = [os.path.relpath(os.path.join(folder, name), ROOT)
                  for folder, _, files in os.walk(os.path.join(ROOT, "benchmarks"))
                  if "__pycache__" not in folder and "results" not in folder for name in files]
    assert "benchmarks/harness.py" in benchmarks and not sorted(set(benchmarks) - names)
    assert "Makefile" in names and not [name for name in names if name.startswith("benchmarks/results")]


CUDA_TOOLKIT = "/usr/local/cuda/bin/nvcc"


@pytest.mark.skipif(not os.path.exists(CUDA_TOOLKIT), reason="needs the CUDA toolkit at /usr/local/cuda")
def test_torchs_arch_list_is_used_when_ours_is_not_set():
    """A user's TORCH_CUDA_ARCH_LIST was replaced by the default (CI's sm_90-only build compiled two)."""
    env = dict(os.environ, HIERTCN_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", CUDA_HOME="/usr/local/cuda")
    env.pop("HIERTCN_CUDA_ARCHS", None)
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=120)
    assert "building CUDA kernels with /usr/local/cuda for 9.0\n" in result.stdout + result.stderr, result.stderr


@pytest.mark.skipif(not os.path.exists(CUDA_TOOLKIT), reason="needs the CUDA toolkit at /usr/local/cuda")
def test_an_nvcc_wrapper_script_on_the_path_leads_to_its_toolkit(tmp_path, monkeypatch):
    """nvcc found on PATH as a wrapper script outside the toolkit (as /usr/local/bin/nvcc is on some machines) was
    not followed to the toolkit: the CUDA kernels were dropped, or HIERTCN_CUDA=1 failed."""
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {CUDA_TOOLKIT} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])
    source = open(os.path.join(ROOT, "setup.py")).read().split("def missing_cuda_library_headers")[0]
    namespace = {"__file__": os.path.join(ROOT, "setup.py"), "__name__": "setup_functions"}
    exec(compile(source, "setup.py", "exec"), namespace)
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda path: False if path == CUDA_TOOLKIT else real_exists(path))
    assert os.path.realpath(namespace["find_cuda_home"]()) == os.path.realpath("/usr/local/cuda")
