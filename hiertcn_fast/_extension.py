"""Guarded load of the compiled extension hiertcn_fast._C.

Importing hiertcn_fast never fails because of the extension: when it is missing or broken, the
error is kept here and reported by hiertcn_fast.backends().
"""

import glob
import importlib
import os

import torch  # noqa: F401  (loads libtorch, which the extension links against)

_module = None
_error = None
_stale_op = None  # the op a loaded but out-of-date extension lacks


def _load():
    global _module, _error
    try:
        _module = importlib.import_module("hiertcn_fast._C")
    except ImportError as exc:  # not built, or built against another torch
        _error = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    """True when the compiled operators are registered with torch."""
    return _module is not None


def load_error():
    """Why the extension could not be imported (None when it was)."""
    return _error


def stale_op():
    """The op an out-of-date extension lacks (None unless the extension was loaded and found out of date)."""
    return _stale_op


def unbuilt_source_tree():
    """The package's folder when it is a source checkout's (setup.py and csrc/ beside it) holding no compiled
    extension and the extension is missing: run from the checkout, Python imports this folder rather than an
    installed copy. None otherwise."""
    package = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package)
    if (_module is not None or _stale_op is not None or not os.path.isfile(os.path.join(root, "setup.py"))
            or not os.path.isdir(os.path.join(root, "csrc")) or glob.glob(os.path.join(package, "_C*"))):
        return None
    return package


def register_fake(op_name: str):
    """Decorator: register a fake (meta) kernel for the compiled op ``hiertcn_fast::op_name``.

    Without the extension it does nothing. When the extension is loaded but lacks the op (a build
    older than the Python sources), the extension is marked out of date instead of failing the
    import: the cpu and cuda backends then report it, with the fix, and auto uses the others.
    """

    def decorate(fn):
        global _module, _error, _stale_op
        if _module is None:
            return fn
        if not hasattr(torch.ops.hiertcn_fast, op_name):
            _module, _stale_op = None, op_name
            _error = (f"the compiled extension is out of date: it lacks hiertcn_fast::{op_name}; rebuild it "
                      f"(pip install --no-build-isolation --no-deps -e ., or python setup.py build_ext --inplace)")
            return fn
        return torch.library.register_fake(f"hiertcn_fast::{op_name}")(fn)

    return decorate


def module():
    """The compiled module hiertcn_fast._C (None when it is not loaded)."""
    return _module


def has_tcn_step_plan() -> bool:
    """True when the loaded extension has the prepared CPU stack step (hiertcn_fast._C.TcnStepPlan)."""
    return _module is not None and hasattr(_module, "TcnStepPlan")


def compiled_with_cuda() -> bool:
    """True when this build of the extension contains the CUDA kernels."""
    if _module is None:
        return False
    return "cuda=1" in build_info().split()


def build_info() -> str:
    """The compiled extension's build flags, e.g. "cuda=0 openmp=1" ("" when it is not loaded). Read once, at
    import: backend selection asks for it, also while torch.compile traces, where an op returning a string
    cannot be called."""
    global _build_info
    if _build_info is None:
        _build_info = torch.ops.hiertcn_fast.build_info() if _module is not None else ""
    return _build_info if _module is not None else ""


_build_info = None
_load()
build_info()
