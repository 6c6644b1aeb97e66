"""The full-softmax cross-entropy of a linear output layer, fused on the CPU.

``linear_cross_entropy(features, weight, bias, targets)`` is
``F.cross_entropy(F.linear(features, weight, bias), targets, reduction="sum")``: the training loss of every
next-item model here, over the whole catalogue. PyTorch's way runs the product, a log-softmax pass, the
negative log-likelihood, and in the backward a zero-filled one-hot gradient, a log-softmax backward pass
and two products; it keeps its (events, items) log-softmax for the backward. The cpu backend goes through the
events in blocks of a few hundred rows: the block's product, one pass per row in cache (bias, max,
log-sum-exp, loss, and the row turned into softmax - one_hot, its gradient), and at once the block's share of
the gradients (two products and a column sum), since the loss is a scalar at the end of the graph; the
backward only scales them by the incoming gradient. Its memory is one block's logits (at most 1,024 rows) while
it runs and the gradients (events x dim, and the weight's size) kept for the backward, not an (events, items)
buffer, which at a web-scale catalogue would dwarf everything else a training step holds (a batch of no more
events than features keeps its (events, items) logits' gradient instead, then no larger than the weight's
gradient, and runs the two gradient products in the backward). Without a gradient to compute (no_grad,
evaluation) it computes the loss alone. It is once differentiable: create_graph=True is a clear error (the
reference has higher derivatives), and under forward-mode AD auto runs the reference. All of this is one
compiled op, torch.ops.hiertcn_fast.linear_cross_entropy, with its autograd node in C++: at a few events a
Python autograd.Function and block loop cost more than the product and the row pass.

Backends: cpu (csrc/cpu/softmax_xent.cpp; float32 and float64 CPU tensors) and reference (the composition
above). With auto, whatever the cpu kernel does not take (CUDA tensors, half types, torch.compile's tracing)
runs the reference composition; asking for cuda or triton, which this op does not have, or for cpu where it
cannot run, is an error that says so.
"""

import torch
import torch.nn.functional as F
import torch.autograd.forward_ad as forward_ad

from .. import _extension
from ..backends import (BackendUnavailableError, compiling, default_kernel, dispatches_like,
                        functorch_transforms_active, requested_backend)
from ._common import FLOATING, check_like, check_tensor, symbolic

_CPU_DTYPES = (torch.float32, torch.float64)
# For backends.default_kernel: the cpu kernel takes float32 and float64 CPU tensors, and the reference the rest.
_DTYPES = {"cuda": (), "triton": (), "cpu": _CPU_DTYPES, "reference": FLOATING}


def linear_cross_entropy_reference(features, weight, bias, targets):
    """Plain PyTorch: the summed cross-entropy of the logits features @ weight^T + bias (in float32 at least)."""
    logits = F.linear(features, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="sum")


# Rows per block of the cpu path: a block's logits, (rows, classes), are the only catalogue-wide buffer, reused
# block after block and never kept. Its size aims at 8 MiB; at least 256 rows, so that re-reading the weight
# and its gradient for every block stays cheap next to the block's products, and at most 1024.
_BLOCK_BYTES = 8 << 20
_MIN_BLOCK_ROWS, _MAX_BLOCK_ROWS = 256, 1024


def _block_rows(classes: int, element_size: int) -> int:
    return min(_MAX_BLOCK_ROWS, max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // max(1, classes * element_size)))


def _why_not_fused(features, weight, bias, targets) -> str:
    """Why the cpu kernel cannot take this call ('' when it can)."""
    if not _extension.loaded():
        return f"the compiled extension is not loaded ({_extension.load_error()})"
    if features.device.type != "cpu" or features.dtype not in _CPU_DTYPES:
        return f"it takes float32 or float64 CPU tensors, got {features.dtype} on {features.device}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != features.dtype or t.device != features.device):
            return f"{name} must have the dtype and device of features"
    if targets.device != features.device:
        return "targets must be on the device of features"
    if compiling():
        return "it does not run under torch.compile"
    if forward_ad._current_level >= 0:
        return "it has no forward-mode derivative (dual tensors)"
    if functorch_transforms_active():
        return ("torch.func transforms (grad, vjp, jacrev, vmap, ...) cannot see through the fused kernel's autograd "
                "function")
    if torch.is_autocast_enabled("cpu") and features.dtype != torch.float64:
        return "it does not run under CPU autocast (which leaves only float64 alone)"
    return ""


def _check_parameters_like_features(features, weight, bias):
    """weight and bias must be on features' device and (outside autocast) in its dtype, whichever backend runs,
    checked before one is chosen: otherwise auto sends the call to the reference composition (the cpu kernel
    refuses it), whose product fails with a message naming no argument (another dtype) or, for a meta-device
    weight next to CPU features, returns a finite loss computed from uninitialised memory. Under autocast on
    features' device the product casts its operands itself, so there mixed dtypes are what autocast makes
    (e.g. bfloat16 features and a float32 output layer) and are left to it."""
    autocast = features.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(features.device.type)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not (autocast and t.device == features.device):
            check_like(t, name, features, "features")


def _check_target_range(targets, classes):
    """Every target must be a class id, on every backend: F.cross_entropy (the reference) would skip the rows
    marked with its ignore_index -100 and the cpu kernel refuses them, so one backend would report a loss the
    other does not. Traced (torch.compile), there are no values to look at: the graph checks them itself (an
    assert in the graph, a RuntimeError when it runs; skipped, the compiled reference composition dropped the rows
    marked -100 from the loss without a word)."""
    if targets.numel() == 0:
        return
    traced = compiling()
    if not traced and symbolic(targets):  # fake tensors outside a trace (FakeTensorMode, opcheck): no values
        return
    if targets.device.type != "cpu" or traced:
        # Reading the values would make the host wait for the device once more per training step: the device
        # checks them itself (a device-side assert, which ends the process's CUDA context, never a skipped row).
        torch._assert_async(((targets >= 0) & (targets < classes)).all(), f"targets must lie in [0, {classes})")
        return
    # Inside torch.func transforms the values are those of the tensor they wrap (vmap's batch holds every sample's).
    while functorch_transforms_active() and torch._C._functorch.is_functorch_wrapped_tensor(targets):
        targets = torch._C._functorch.get_unwrapped(targets)
    low, high = torch.stack(torch.aminmax(targets)).tolist()
    if low < 0 or high >= classes:
        hint = " (there is no ignore_index: leave out the rows to skip)" if low < 0 else ""
        raise ValueError(f"targets must lie in [0, {classes}), got values in [{low}, {high}]{hint}")


def linear_cross_entropy(features: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, *,
                         backend=None) -> torch.Tensor:
    """Summed full-softmax cross-entropy of ``features @ weight.T + bias`` against ``targets``.

    features (events, dim), weight (classes, dim) and bias (classes,) or None (nn.Linear's), targets
    (events,) int64 class ids in [0, classes): any other value, F.cross_entropy's ignore_index -100 included,
    is a ValueError on every backend for CPU tensors, and a device-side assert for device tensors (checked
    without waiting for the device); under torch.compile, an assert in the graph (a RuntimeError). Returns a scalar
    (float32 for half-type inputs), differentiable in features, weight and bias; equals
    F.cross_entropy(F.linear(...), targets, reduction="sum").
    """
    # (backend="auto", as the trainer passes it, is the default too: only a use_backend block or the environment
    # could ask otherwise, and default_kernel reads both.)
    if ((backend is None or (type(backend) is str and backend == "auto")) and isinstance(features, torch.Tensor)
            and default_kernel("linear_cross_entropy", features, _DTYPES)
            and dispatches_like(features, weight, bias, targets)):
        # The compiled op checks every argument itself (shapes, dtypes, devices, target ids): the Python checks
        # run only when it refuses the call, and then say what is wrong in this package's words. At one event
        # they and the selection cost about half as much as the op.
        try:
            return torch.ops.hiertcn_fast.linear_cross_entropy.default(
                features, weight, bias, targets, _block_rows(weight.shape[0], features.element_size()))
        except Exception:
            pass
    return _checked_linear_cross_entropy(features, weight, bias, targets, backend)


def _checked_linear_cross_entropy(features, weight, bias, targets, backend):
    """linear_cross_entropy with every check and the full backend selection."""
    check_tensor(features, "features", 2)
    check_tensor(weight, "weight", 2)
    if weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must be (classes, {features.shape[1]}), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", 1)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    _check_parameters_like_features(features, weight, bias)
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.dim() != 1:
        raise ValueError("targets must be a 1-D int64 tensor of class ids")
    if targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets must hold one class id per row of features ({features.shape[0]}), got "
                         f"{targets.shape[0]}")
    _check_target_range(targets, weight.shape[0])
    requested = requested_backend(backend)
    if requested in ("cuda", "triton"):
        raise BackendUnavailableError(f"linear_cross_entropy has no {requested} backend (it has cpu and reference; "
                                      f"auto runs the reference on CUDA tensors)")
    why = "" if requested == "reference" else _why_not_fused(features, weight, bias, targets)
    if requested == "cpu" and why:
        raise BackendUnavailableError(f"linear_cross_entropy: backend 'cpu' cannot run this call: {why}")
    if requested == "reference" or why:
        return linear_cross_entropy_reference(features, weight, bias, targets)
    return torch.ops.hiertcn_fast.linear_cross_entropy.default(features, weight, bias, targets,
                                                               _block_rows(weight.shape[0], features.element_size()))


@_extension.register_fake("linear_cross_entropy")
def _linear_cross_entropy_fake(features, weight, bias, targets, block_rows):
    return features.new_empty(())


@_extension.register_fake("softmax_xent_out")
def _softmax_xent_out_fake(logits, targets, bias, *, loss):
    return None
