"""Helpers shared by every op module: output allocation and argument validation."""

import contextlib
import functools
import os

import torch
import torch.autograd.forward_ad as forward_ad

from ..backends import _any_autocast, compiling, compiling_here, torch_release

_poison = os.environ.get("HIERTCN_POISON_OUTPUTS", "0") == "1"

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill every output that an op allocates with NaN before its kernel runs.

    A kernel that leaves an element unwritten then shows up as NaN in the result. Tests turn this
    on; HIERTCN_POISON_OUTPUTS=1 turns it on for a whole process.
    """
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def symbolic(*tensors) -> bool:
    """Whether these values are only being traced (torch.compile) or are fake (FakeTensorMode, opcheck, export):
    then no Python code may read their values or data pointers, and no C++ helper called outside the dispatcher
    (a prepared step, which reads its inputs' memory directly) may see them."""
    if torch.compiler.is_compiling() and compiling_here():  # (compiling(), inline: this runs at every step)
        return True
    # A plain tensor (the common case, once per step) is never fake: only subclasses need the full test. (A loop,
    # not any() over a generator, which cost a step of the TCN 2 us.)
    for t in tensors:
        if isinstance(t, torch.Tensor) and fake(t):
            return True
    return False


_PLAIN = (torch.Tensor, torch.nn.Parameter, type(None))


def fake(t: torch.Tensor) -> bool:
    """Whether t is a fake tensor: symbolic's test of one tensor, without its torch.compile query (for the
    per-step paths, where that costs)."""
    return type(t) not in _PLAIN and _is_fake(t)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def in_input_dtype(op):
    """The op computes in its arguments' dtype, inside a torch.autocast region too, as a custom op outside
    autocast's lists does: autocast is switched off for its body (its reference composition's products would
    otherwise come out in the autocast dtype, next to arguments that are not). The nn modules cast their
    arguments under autocast the way torch.nn's modules do."""

    @functools.wraps(op)
    def run(*args, **kwargs):
        if compiling():  # (traced: the autocast state is a constant of the graph)
            enabled = [device_type for device_type in _AUTOCAST_DEVICES if torch.is_autocast_enabled(device_type)]
        elif not _any_autocast():
            return op(*args, **kwargs)
        else:
            enabled = [device_type for device_type in _AUTOCAST_DEVICES
                       if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)]
            if not enabled:
                return op(*args, **kwargs)
            # Eager: the switch itself (a fifth of what entering torch.autocast costs), put back on every path.
            for device_type in enabled:
                torch.set_autocast_enabled(device_type, False)
            try:
                return op(*args, **kwargs)
            finally:
                for device_type in enabled:
                    torch.set_autocast_enabled(device_type, True)
        if not enabled:
            return op(*args, **kwargs)
        if len(enabled) == 1:
            with torch.autocast(enabled[0], enabled=False):
                return op(*args, **kwargs)
        with torch.autocast(enabled[0], enabled=False), torch.autocast(enabled[1], enabled=False):
            return op(*args, **kwargs)

    return run


def refuse_inputs_requiring_grad(step: str, train_with: str, **inputs) -> None:
    """For the inference steps (no autograd): an input that requires grad would silently get no gradient, so it is
    refused while grad mode is on. Weights may require grad (a module's parameters do): nothing is expected of
    them."""
    if torch.is_grad_enabled():
        for name, t in inputs.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"{step} is for inference and records no gradients, but {name} requires grad: run "
                                   f"{train_with} to train, or step under torch.no_grad() (or detach {name})")


def refuse_tangents(step: str, **inputs) -> None:
    """For the inference steps under forward-mode AD (call it only while a dual level is active: checking costs a
    call per input): the kernels write plain outputs, so a tangent of an input (a dual tensor, which does not
    require grad and so passes refuse_inputs_requiring_grad) would be dropped without a word. Refused on every
    backend alike. Inputs may be tensors, None, or lists of them (a stack's weights)."""
    for name, value in inputs.items():
        for i, t in enumerate(value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
                shown = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                raise RuntimeError(f"{step} is for inference and has no forward-mode derivative, but {shown} carries a "
                                   f"tangent (a dual tensor of torch.autograd.forward_ad): its tangent would be "
                                   f"dropped; step outside forward-mode AD, or differentiate the forward over the "
                                   f"sequence with backend='reference' (the others' forwards have no jvp either)")


def refuse_graph_of_gradient(op: str) -> None:
    """For the backward of an op whose gradients come from kernels (or were computed in its forward): under
    create_graph=True the gradients would have no graph, so higher derivatives through them would silently
    be wrong. Call it at the start of such a backward (where grad mode is create_graph's)."""
    if torch.is_grad_enabled() and not compiling():
        raise RuntimeError(f"{op}: its backward is once differentiable (the gradients come from fused kernels), "
                           f"so create_graph=True would give higher derivatives without these terms; use "
                           f"backend='reference' where you need a graph of the gradient")


def refuse_batched_gradient(op: str, grad) -> None:
    """For the backward of an op whose gradients come from kernels: a batched gradient (torch.autograd.grad's
    is_grads_batched=True, jacobian(vectorize=True), gradcheck(check_batched_grad=True)) would reach the kernels'
    out ops, which have no batching rule, and fail in the dispatcher's words (naming an internal op). Refused in
    words that name the way out; the reference backend's plain PyTorch takes batched gradients."""
    if grad is not None and not compiling() and torch._C._functorch.is_legacy_batchedtensor(grad):
        raise RuntimeError(f"{op}: its backward runs fused kernels, which take no batched gradient "
                           f"(is_grads_batched=True, jacobian(vectorize=True), gradcheck(check_batched_grad=True)); "
                           f"use backend='reference' there, or unbatched gradients")


def on_device_of(t: torch.Tensor):
    """The tensor's CUDA device made current for the block (Triton launches on the current device, not on its
    arguments' device); nothing for other devices."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# Before torch 2.14, not while torch.compile traces: torch 2.11's compiled backward returned zeros for gradient
# buffers filled here and then written by an out op (2.14's is right; without the fill both are).
_POISON_WHILE_TRACING = torch_release() >= (2, 14)


def new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh contiguous output on ``like``'s device (NaN-filled under poison_outputs)."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if _poison and out.is_floating_point() and (_POISON_WHILE_TRACING or not compiling()):
        out.fill_(float("nan"))
    return out


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride (what the kernels index), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def check_tensor(t, name: str, ndim: int, dtypes=FLOATING) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have a floating dtype {tuple(str(d) for d in dtypes)}, got {t.dtype}")


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` must share ``ref``'s device and dtype."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; use one dtype")


def check_shape(t: torch.Tensor, name: str, expected) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
