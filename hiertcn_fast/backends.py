"""Which backends exist here, which one an op uses, and why the others are missing.

Four backends implement every op:
  cuda       the C++/CUDA kernels in csrc/cuda (CUDA tensors)
  triton     the Triton kernels in hiertcn_fast/triton (CUDA tensors; CPU tensors under
             TRITON_INTERPRET=1, for testing, without the dtypes the interpreter computes wrongly:
             bfloat16 for causal_conv1d, whose kernels use tl.dot)
  cpu        the C++ kernels in csrc/cpu (CPU tensors)
  reference  plain PyTorch, any device and floating dtype: the definition the others are tested against

Selection, first match wins: the op's ``backend=`` keyword, the innermost ``use_backend(...)``
block, the HIERTCN_BACKEND environment variable, then ``auto``. ``auto`` picks, for CUDA tensors,
cuda if built, else triton, else reference; for CPU tensors, cpu if built, else reference (and
reference for dtypes the preferred backend lacks, inside torch.func transforms, and while a forward-mode AD level
of torch.autograd.forward_ad is active: the kernels' autograd functions have no jvp). A backend that was asked for
by name and cannot run raises BackendUnavailableError naming the fix; it never falls back silently.

Under torch.compile the backend is chosen when a graph is traced. The keyword and use_backend blocks are guarded
(a change recompiles); HIERTCN_BACKEND is read at tracing only: set it before compiling, or call
torch._dynamo.reset() after changing it (dynamo guards no environment variable).
"""

import contextlib
import contextvars
import dataclasses
import functools
import importlib.metadata
import importlib.util
import itertools
import os
import sys

import torch
import torch.autograd.forward_ad as forward_ad

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "HIERTCN_BACKEND"
_REINSTALL = "pip install --no-build-isolation --no-deps --force-reinstall . (from the source tree)"

_selected = contextvars.ContextVar("hiertcn_backend", default=None)


def torch_release() -> tuple:
    """(major, minor) of the torch running."""
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def compiling() -> bool:
    """torch.compiler.is_compiling(), for this thread: whether it is being traced (torch.compile, export).

    torch's flag is one for the process, and a compile session holds it: while one thread compiled, every other
    thread's eager calls read True, and skipped their refusals (a double backward through the kernels came out
    silently wrong) and their caches. It counts here only where this thread itself is traced: by Dynamo, or under
    a tracing context or a fake, proxy or functional tensor mode (AOTAutograd, make_fx, export), all per thread."""
    return torch.compiler.is_compiling() and compiling_here()


_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, key) for key in ("FAKE", "PROXY", "FUNCTIONAL"))


def compiling_here() -> bool:
    """The per-thread half of compiling(), asked once torch.compiler.is_compiling() is True (hot paths call the
    two inline: outside a compile session only the first is asked)."""
    if torch.compiler.is_dynamo_compiling():  # (a constant True in a trace: Dynamo reads no further)
        return True
    from torch._guards import TracingContext

    if TracingContext.try_get() is not None:
        return True
    return any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)


# torch.compile reads the use_backend selection while it traces an op. torch 2.14's dynamo traces ContextVar.get
# (and guards on the value: a compiled function recompiles in another use_backend block); torch 2.11's cannot, and
# a fullgraph compile of an op without backend= failed there. On releases before 2.14 a trace reads this
# module-level copy of the innermost selection instead, which dynamo guards as a global. It is right for one
# thread; threads (or asyncio tasks) selecting different backends at once would each trace with the latest
# selection. Leaving a block sets the copy to what the context selects then (it restored the copy the block found:
# blocks of two tasks or threads left out of order put back the other's selection, which outlived both).
_TRACE_READS_CONTEXTVAR = torch_release() >= (2, 14)
_selected_for_tracing = None

# An optional key of an op's dtypes table (see resolve): the dtypes the triton backend supports on CUDA but not
# in the Triton interpreter on CPU tensors, where the op's kernels would compute them wrongly.
INTERPRETER_UNSUPPORTED = "triton interpreter unsupported"


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run the call; the message says why and how to fix it."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str  # what it runs on when available, why not otherwise
    fix: str = ""  # how to make it available; empty when it is

    def __str__(self):
        mark = "yes" if self.available else "no "
        text = f"{self.name:<10} {mark}  {self.detail}"
        return text + (f"\n{'':<15}fix: {self.fix}" if self.fix else "")


# The words Triton reads as true in TRITON_INTERPRET (triton.knobs' boolean variables; any case): any other value,
# "false" and "off" included, leaves its kernels compiled.
_TRITON_TRUE = ("1", "true", "yes", "on", "y")


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), on CPU tensors: read as Triton
    reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRITON_TRUE


def interpreter_set_too_late() -> str:
    """Why TRITON_INTERPRET=1 cannot take effect in this process ('' when it can): Triton decides at its import
    whether its own @jit helpers (tl.cdiv, ...) run in the interpreter, and importing hiertcn_fast imports Triton
    (torch.library.triton_op looks for the kernels), so with the variable set after that every kernel fails inside
    the interpreter ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    if "triton" not in sys.modules:
        return ""
    try:
        from triton.language import cdiv
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # another Triton layout: nothing to tell by
        return ""
    if isinstance(cdiv, JITFunction) and not isinstance(cdiv, InterpretedFunction):
        return "TRITON_INTERPRET=1 was set after Triton was imported (importing hiertcn_fast imports it)"
    return ""


def _release(version: str) -> tuple:
    """The leading numbers of a version string: '3.6.0' -> (3, 6, 0), '2.4.0rc1' -> (2, 4, 0)."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


@functools.lru_cache(maxsize=None)
def interpreter_numpy_clash() -> str:
    """Why the Triton interpreter here cannot run this package's kernels ('' when it can): before triton 3.7 it
    turns a one-element array into an int with int(array), which NumPy 2.4 and later refuse, so every kernel with a
    loop over a loaded bound fails inside the interpreter ('only 0-dimensional arrays can be converted to Python
    scalars')."""
    import numpy

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return ""
    if _release(triton_version) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} cannot run with NumPy {numpy.__version__} "
                f"(NumPy 2.4 refuses the int(array) it calls)")
    return ""


def _extension_problem(how: str) -> tuple[str, str]:
    """(detail, fix) of a backend that needs the compiled extension, which is not loaded: out of date, missing
    from the source tree Python imports, or missing (or failing to load) elsewhere."""
    if _extension.stale_op() is not None:
        return (f"the compiled extension is out of date: it lacks hiertcn_fast::{_extension.stale_op()}",
                f"rebuild it: {_REINSTALL}; or, in a source tree, python setup.py build_ext --inplace")
    tree = _extension.unbuilt_source_tree()
    if tree is not None:
        return (f"this hiertcn_fast is the source tree {tree}, which holds no compiled extension "
                f"({_extension.load_error()}); run from {os.path.dirname(tree)}, Python imports it, not an "
                f"installed copy",
                f"run from another folder to use the installed package, or build the tree in place ({how}): "
                f"python setup.py build_ext --inplace, or pip install --no-build-isolation --no-deps -e .")
    return f"the compiled extension is not loaded ({_extension.load_error()})", f"build it {how}: {_REINSTALL}"


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True, "plain PyTorch on any device")
    if name == "cpu":
        if _extension.loaded():
            threads = ("parallel (OpenMP)" if "openmp=1" in _extension.build_info().split()
                       else "single-threaded: built without OpenMP")
            return BackendStatus(name, True, f"compiled C++ kernels for CPU tensors, {threads}")
        return BackendStatus(name, False, *_extension_problem("with a C++ compiler"))
    if name == "cuda":
        if not _extension.loaded():
            return BackendStatus(name, False, *_extension_problem("with nvcc on PATH or CUDA_HOME set"))
        if not _extension.compiled_with_cuda():
            return BackendStatus(name, False, "the extension was built without the CUDA kernels",
                                 f"rebuild with nvcc matching torch's CUDA {torch.version.cuda} "
                                 f"(CUDA_HOME, HIERTCN_CUDA=1): {_REINSTALL}")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "CUDA kernels compiled, but no CUDA device is visible",
                                 "run on a machine with an NVIDIA GPU and driver")
        return BackendStatus(name, True, f"compiled CUDA kernels on {torch.cuda.get_device_name()}")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(name, False, "triton is not installed", "pip install triton")
        if torch.cuda.is_available():
            return BackendStatus(name, True, f"Triton kernels on {torch.cuda.get_device_name()}")
        if triton_interpreted():
            clash = interpreter_numpy_clash()
            if clash:
                return BackendStatus(name, False, clash, "pip install 'numpy<2.4', or triton >= 3.7")
            late = interpreter_set_too_late()
            if late:
                return BackendStatus(name, False, late, "set TRITON_INTERPRET=1 before importing hiertcn_fast, e.g. "
                                     "in the environment the process starts with")
            return BackendStatus(name, True, "Triton kernels interpreted on CPU tensors (TRITON_INTERPRET=1; slow)")
        return BackendStatus(name, False, "no CUDA device is visible",
                             "use a GPU, or set TRITON_INTERPRET=1 before importing hiertcn_fast to interpret "
                             "the kernels on CPU tensors (for testing)")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backends():
    """The status of every backend here: a list of BackendStatus in the order cuda, triton, cpu, reference."""
    return [_status(name) for name in BACKENDS]


_NAMES = (*BACKENDS, "auto")
_ENV_SOURCE = f"the {ENV_VAR} environment variable"


def _check_name(name, source):
    if name not in _NAMES:  # (a constant: this runs at every op call and every TCN step)
        raise ValueError(f"{source} must be one of {_NAMES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops called inside the block on backend ``name`` (or "auto")."""
    global _selected_for_tracing
    token = _selected.set(_check_name(name, "use_backend(name)"))
    _selected_for_tracing = name
    try:
        yield
    finally:
        _selected.reset(token)
        _selected_for_tracing = _selected.get()


def requested_backend(backend=None):
    """The backend asked for, by precedence: argument, use_backend block, environment, "auto"."""
    if backend is not None:
        return _check_name(backend, "backend")
    selected = (_selected_for_tracing if not _TRACE_READS_CONTEXTVAR and compiling()
                else _selected.get())
    if selected is not None:
        return selected
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", _ENV_SOURCE)


def _can_run(name, device: torch.device, dtype, dtypes) -> str:
    """Why backend ``name`` cannot run on this device and dtype ('' when it can)."""
    status = _status(name)
    if not status.available:
        return f"{status.detail}; fix: {status.fix}"
    if name == "cuda" and device.type != "cuda":
        return f"it needs CUDA tensors, got tensors on {device}"
    if name == "cpu" and device.type != "cpu":
        return f"it needs CPU tensors, got tensors on {device}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return f"it needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    if dtype not in dtypes[name]:
        supported = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes[name]))
        return f"it does not support {dtype} (supported: {supported})"
    if name == "triton" and device.type == "cpu" and dtype in dtypes.get(INTERPRETER_UNSUPPORTED, ()):
        # The interpreter computes bfloat16 tl.dot wrongly (triton-lang/triton#11584): the result would be
        # garbage with no error, so such a call is refused rather than run.
        return (f"the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) computes {dtype} tl.dot wrongly "
                f"(triton-lang/triton#11584), which this op's kernels use; run it on a CUDA device, in another "
                f"dtype, or on backend 'cpu' or 'reference'")
    return ""


_resolved = {}


def resolve(op: str, backend, device: torch.device, dtype: torch.dtype, dtypes) -> str:
    """The backend that runs ``op`` on tensors of ``device``/``dtype``.

    ``dtypes`` maps each backend name to the dtypes that op supports on it (constant per op); under the key
    INTERPRETER_UNSUPPORTED, optionally, those of the triton backend's that the Triton interpreter computes
    wrongly (refused for CPU tensors).
    Answers are memoised: what is installed does not change while the process runs, and this sits
    on every op call (a TCN step calls it once per layer per event).
    """
    name = requested_backend(backend)
    transformed = functorch_transforms_active()
    # (A module attribute: -1 outside forward_ad.dual_level(). The inference steps have no derivative to compute
    # and refuse a tangent themselves, naming the input that carries it.)
    dual = forward_ad._current_level >= 0 and op not in _INFERENCE_STEPS
    if compiling():
        # Traced, the memo is not read: dynamo would guard the graph on its contents, which the trace itself
        # fills, so the first call of a compiled function in a process compiled it twice.
        return _resolve_uncached(op, name, device, dtype, dtypes, transformed, dual)
    # TRITON_INTERPRET matters only to the triton backend asked for by name (auto never picks triton for CPU
    # tensors, and for CUDA tensors the interpreter plays no part): read only then, as it costs an environment read.
    key = (op, name, device.type, dtype, name == "triton" and triton_interpreted(), transformed, dual)
    answer = _resolved.get(key)
    if answer is None:
        try:
            answer = _resolve_uncached(op, name, device, dtype, dtypes, transformed, dual)
        except (BackendUnavailableError, TypeError) as exc:
            answer = exc
        _resolved[key] = answer
    if isinstance(answer, Exception):
        raise type(answer)(*answer.args)
    return answer


# Whether autocast is on for any device: one query (private to torch; the public per-device queries where it is
# missing).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(device_type) for device_type in ("cpu", "cuda")))
# How many TorchDispatchModes are active (FakeTensorMode, a proxy mode, a user's): under one, the entry points take
# their checked path, whose Python checks then run on the mode's tensors (a fake kernel checks nothing).
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None) or (lambda: 1)
_KERNEL_BACKENDS = ("cpu", "cuda")
_default_kernels = {}


def default_kernel(op: str, t: torch.Tensor, dtypes) -> bool:
    """Whether a call of ``op`` on tensors like ``t`` (its device and dtype) that asks for no backend anywhere runs a
    compiled kernel (cpu or cuda) directly: no backend= keyword, use_backend block or HIERTCN_BACKEND other than
    auto, and not traced (torch.compile), inside torch.func transforms, under a forward-mode AD level or under
    autocast. Then the answer depends on the op, device type and dtype alone and is memoised, so an op's eager entry
    point can take its compiled kernel after a few cheap reads of the global state instead of the whole selection
    (at batch 1 the selection cost about as much as a GRU cell's kernel). False wherever the full selection must
    run: it is the judge of every other case, errors included."""
    # Traced, nothing after the first test is read (dynamo folds is_compiling() to True): the full selection knows
    # what a trace may read (the use_backend context variable not, on some torch releases).
    if torch.compiler.is_compiling():
        return False
    if t.is_cpu:
        kind = "cpu"
    elif t.is_cuda:
        kind = "cuda"
    else:
        return False
    if (_selected.get() is not None or functorch_transforms_active() or forward_ad._current_level >= 0
            or _any_autocast() or _dispatch_modes() or _backend_variable() not in (None, "auto", "")):
        return False
    dtype = t.dtype
    answer = _default_kernels.get((op, kind, dtype))
    if answer is None:
        try:
            answer = resolve(op, None, t.device, dtype, dtypes) in _KERNEL_BACKENDS
        except (BackendUnavailableError, TypeError, ValueError):
            answer = False
        _default_kernels[(op, kind, dtype)] = answer
    return answer


# HIERTCN_BACKEND as os.environ holds it, read on every call of an op. os.environ.get raises and catches a KeyError
# inside when the variable is unset (the usual case), which costs more than the rest of default_kernel's reads; the
# dict behind os.environ (updated by every assignment to os.environ, monkeypatch.setenv's included) answers at once.
# Where os.environ is not CPython's mapping, or has been replaced, the plain reading.
_ENVIRON = os.environ
_ENVIRON_DATA = getattr(_ENVIRON, "_data", None)
try:
    _ENVIRON_KEY = _ENVIRON.encodekey(ENV_VAR) if isinstance(_ENVIRON_DATA, dict) else None
    _decode_value = _ENVIRON.decodevalue
except Exception:
    _ENVIRON_KEY = None


def _backend_variable():
    if _ENVIRON_KEY is None or os.environ is not _ENVIRON:
        return os.environ.get(ENV_VAR)
    value = _ENVIRON_DATA.get(_ENVIRON_KEY)
    return None if value is None else _decode_value(value)


def dispatches_like(t: torch.Tensor, *others) -> bool:
    """True when every one of ``others`` (None taken for an absent optional tensor) is a tensor of t's kind, CPU or
    CUDA, so that a call with them all goes to t's kernel, which then checks devices, dtypes and shapes itself. A
    tensor of another kind (meta, above all) would take the call to its own kernel, an op's fake one that checks
    nothing; anything not a tensor is left to the checked path too."""
    cpu = t.is_cpu
    for other in others:
        if other is not None and (not isinstance(other, torch.Tensor) or other.is_cpu is not cpu
                                  or not (cpu or other.is_cuda)):
            return False
    return True


def functorch_transforms_active() -> bool:
    """True inside a torch.func transform (grad, vjp, jacrev, vmap, ...), traced by torch.compile too: dynamo
    traces a compiled transform's function with the transform's levels pushed (taken for False there, the compiled
    kernels ran inside torch.compile(torch.func.grad(...)) and their gradients came out all zero)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


_TRANSFORMS = ("torch.func transforms (grad, vjp, jacrev, vmap, ...) cannot differentiate through the compiled "
               "kernels' autograd functions (torch's own check refuses them); backend 'reference' runs there")
_FORWARD_AD = ("a forward-mode AD level (torch.autograd.forward_ad.dual_level) is active and the compiled kernels' "
               "autograd functions have no jvp, so a tangent could not pass through them; backend 'reference' (or "
               "the default, auto, which picks it there) computes the tangent")
# The inference-only step ops: they run their kernels under forward-mode AD as elsewhere and refuse a tangent.
_INFERENCE_STEPS = frozenset(("causal_conv1d_step", "tcn_step"))


def _resolve_uncached(op, name, device, dtype, dtypes, transformed=False, dual=False) -> str:
    if name != "auto":
        why = _can_run(name, device, dtype, dtypes)
        if not why and name != "reference":
            why = _TRANSFORMS if transformed else _FORWARD_AD if dual else ""
        if why:
            raise BackendUnavailableError(f"{op}: backend {name!r} cannot run this call: {why}")
        return name
    if transformed or dual:  # auto: the plain-PyTorch definition, which the transforms and forward AD see through
        why = _can_run("reference", device, dtype, dtypes)
        if why:
            where = "under torch.func transforms" if transformed else "under forward-mode AD"
            raise TypeError(f"{op}: no backend supports {dtype} on {device} {where}: {why}")
        return "reference"
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for candidate in order:
        if not _can_run(candidate, device, dtype, dtypes):
            return candidate
    raise TypeError(f"{op}: no backend supports {dtype} on {device}")


def describe() -> str:
    """A human-readable report of the backends, for `python -m hiertcn_fast info`."""
    value = os.environ.get(ENV_VAR)
    try:
        _check_name(value or "auto", _ENV_SOURCE)
        selection = f"{ENV_VAR}={value}" if value else f"{ENV_VAR} {'unset' if value is None else 'empty'}: auto"
    except ValueError as error:  # every op call would raise this: said here, where the backends are checked
        selection = f"{ENV_VAR}={value!r} is INVALID, every op call will raise ValueError: {error}"
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
             f"backend selection: {selection}", ""]
    lines += [str(status) for status in backends()]
    return "\n".join(lines)
