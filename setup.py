"""Build hiertcn_fast and its compiled extension hiertcn_fast._C.

Knobs (environment variables; the README lists them in one table):
  HIERTCN_EXTENSION=0|1    0: pure-Python install: no compilation, the triton and reference backends
                           still work; 1 (default): build the extension.
  HIERTCN_CUDA=auto|0|1    build the CUDA kernels: auto (default) when nvcc is found and torch has
                           CUDA, 0 never, 1 always (a missing nvcc is then an error).
  HIERTCN_CUDA_ARCHS       CUDA architectures, default "8.0;9.0+PTX" (sm_80, sm_90 and PTX).
  CUDA_HOME                the CUDA toolkit; default /usr/local/cuda when it holds bin/nvcc.
  MAX_JOBS                 parallel compile jobs (a positive integer); default: the number of CPUs.
Nothing here touches the network. Needs setuptools >= 70.1, or an older one with the wheel package (pyproject.toml's
build requirements, which pip does not install with --no-build-isolation, the way this package is installed against
the torch already present).
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def fail(message):
    # SystemExit with a string prints the message alone: no traceback for a configuration problem.
    raise SystemExit(f"hiertcn_fast setup: {message}")


def note(message):
    print(f"hiertcn_fast setup: {message}", file=sys.stderr)


# What HIERTCN_CUDA_ARCHS (or TORCH_CUDA_ARCH_LIST) may hold: compute capabilities like 8.0, 9.0a or 9.0+PTX, or
# torch's architecture names (Ampere, Hopper, Ampere+Tegra, ...), separated by ";" or spaces.
ARCH_ENTRY = re.compile(r"\d+\.\d+[a-z]?(\+PTX)?|[A-Z][A-Za-z]*(\+[A-Z][A-Za-z]*)?")


def check_settings():
    """The knobs' values, each checked before anything else runs: a bad one is a one-line error naming it."""
    # pip builds a wheel (bdist_wheel), which setuptools holds from 70.1 and older ones take from the wheel package.
    version = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        fail(f"setuptools >= 70.1 (or the wheel package) is needed, found setuptools {setuptools.__version__} and no "
             f"wheel (pip installs no build requirements with --no-build-isolation): pip install 'setuptools>=70.1'")
    if os.environ.get("HIERTCN_EXTENSION", "1") not in ("0", "1"):
        fail(f"HIERTCN_EXTENSION must be 0 or 1, got {os.environ['HIERTCN_EXTENSION']!r}")
    jobs = os.environ.get("MAX_JOBS")
    if jobs is not None and not (jobs.isdigit() and int(jobs) > 0):
        fail(f"MAX_JOBS must be a positive integer, got {jobs!r}")


def check_archs(archs, source):
    entries = archs.replace(" ", ";").split(";")
    bad = [entry for entry in entries if entry and not ARCH_ENTRY.fullmatch(entry)]
    if bad or not any(entries):
        fail(f"{source} must list CUDA architectures like 8.0;9.0+PTX (separated by ';' or spaces), got {archs!r}")


def read_sources():
    """Return (cpp_sources, cuda_sources) from csrc/SOURCES, as paths relative to the repo root."""
    groups = {"cpp": [], "cuda": []}
    group = "cpp"
    with open(os.path.join(CSRC, "SOURCES")) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line == "[cuda]":
                group = "cuda"
                continue
            matches = sorted(glob.glob(os.path.join(CSRC, line)))
            groups[group].extend(os.path.relpath(m, ROOT) for m in matches)
    return groups["cpp"], groups["cuda"]


def find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # nvcc may be a link or a wrapper script outside the toolkit: the link is followed, and a wrapper is asked
    # where the real compiler lives (its dry run prints "#$ TOP=<toolkit>/bin/..").
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    try:
        dry_run = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                                 timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            home = os.path.normpath(line[len("#$ TOP="):].strip())  # (<toolkit>/bin/..)
            return home if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) else None
    return None


def missing_cuda_library_headers(cuda_home):
    """Include folders for the CUDA library headers (cuSPARSE, cuBLAS, ...) that torch's headers need
    but a minimal toolkit lacks: taken from the nvidia-* wheels that a CUDA build of torch installs."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    found = sorted({os.path.dirname(p) for root in roots for p in glob.glob(os.path.join(root, "*", "include",
                                                                                          "cusparse.h"))})
    return found[:1]


def nvcc_release(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def extension_modules():
    check_settings()
    if os.environ.get("HIERTCN_EXTENSION", "1") == "0":
        note("HIERTCN_EXTENSION=0: pure-Python install (triton and reference backends only)")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        fail("no C++ compiler found (looked for $CXX or c++). Install one (Debian: apt-get install g++) "
             "or set HIERTCN_EXTENSION=0 for a pure-Python install.")

    cuda_mode = os.environ.get("HIERTCN_CUDA", "auto")
    if cuda_mode not in ("auto", "0", "1"):
        fail(f"HIERTCN_CUDA must be auto, 0 or 1, got {cuda_mode!r}")
    cuda_home = find_cuda_home() if cuda_mode != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        fail("torch must be installed before building the extension: pip install torch, then install "
             "hiertcn_fast with --no-build-isolation (or set HIERTCN_EXTENSION=0).")

    with_cuda = False
    if cuda_mode != "0":
        reason = None
        if cuda_home is None:
            given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
            reason = (f"nvcc not found in CUDA_HOME={given} (expected {given}/bin/nvcc)" if given else
                      "nvcc not found (set CUDA_HOME to the CUDA toolkit)")
        elif torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        else:
            release = nvcc_release(cuda_home)
            torch_major = int(torch.version.cuda.split(".")[0])
            if release is None:
                reason = f"could not run {cuda_home}/bin/nvcc --version"
            elif release[0] != torch_major:
                reason = (f"nvcc {release[0]}.{release[1]} at {cuda_home} does not match torch's CUDA "
                          f"{torch.version.cuda}")
        if reason is None:
            with_cuda = True
        elif cuda_mode == "1":
            fail(f"HIERTCN_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        else:
            note(f"building without the CUDA kernels: {reason}")

    cpp_sources, cuda_sources = read_sources()
    # The Python module (pybind11) itself: only in this build, not in the CMake library.
    sources = cpp_sources + sorted(os.path.relpath(m, ROOT) for m in glob.glob(os.path.join(CSRC, "python", "*.cpp")))
    # -fopenmp: at::parallel_for is a header template that runs in parallel only where the including code is
    # compiled with OpenMP (torch's own build is); without it every kernel of ours would run on one thread.
    # The extension then needs libgomp.so.1, the runtime torch has already loaded.
    # -g0: Python's own compiler flags ask for debug information, 31 of the library's 33 MB.
    cxx_flags = ["-O3", "-Wall", "-Wno-unused-function", "-fopenmp", "-g0"]
    link_flags = ["-fopenmp"]
    macros = []
    if with_cuda:
        # HIERTCN_CUDA_ARCHS, else torch's own TORCH_CUDA_ARCH_LIST (a user's choice was overwritten), else ours.
        source = next((name for name in ("HIERTCN_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST") if os.environ.get(name)), None)
        archs = os.environ[source] if source else DEFAULT_CUDA_ARCHS
        check_archs(archs, source)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        note(f"building CUDA kernels with {cuda_home} for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        macros.append(("HIERTCN_WITH_CUDA", "1"))
        extra_includes = missing_cuda_library_headers(cuda_home)
        if extra_includes:
            note(f"{cuda_home} lacks the CUDA library headers; using {extra_includes[0]}")
        ext = CUDAExtension(
            "hiertcn_fast._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(CSRC, "include")] + extra_includes,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
            libraries=["dl"],  # cpu_blas.h looks up torch's BLAS entry points
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("hiertcn_fast._C", sources, include_dirs=[os.path.join(CSRC, "include")],
                           define_macros=macros, extra_compile_args={"cxx": cxx_flags}, libraries=["dl"],
                           extra_link_args=link_flags)
    use_ninja = shutil.which("ninja") is not None
    if not use_ninja:
        note("ninja not found: compiling serially (pip install ninja for parallel builds)")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = extension_modules()
setup(
    packages=find_packages(include=["hiertcn_fast", "hiertcn_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
