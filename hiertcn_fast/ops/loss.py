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
gradient, and runs the two gradient products in the backward: see _few_rows). Without a gradient
to compute (no_grad, evaluation) it computes the loss alone. It is once differentiable: create_graph=True
is a clear error (the reference has higher derivatives), and under forward-mode AD auto runs the reference.

Backends: cpu (csrc/cpu/softmax_xent.cpp; float32 and float64 CPU tensors) and reference (the composition
above). With auto, whatever the cpu kernel does not take (CUDA tensors, half types, torch.compile's tracing)
runs the reference composition; asking for cuda or triton, which this op does not have, or for cpu where it
cannot run, is an error that says so.
"""

import torch
import torch.nn.functional as F
import torch.autograd.forward_ad as forward_ad

from .. import _extension
from ..backends import BackendUnavailableError, compiling, functorch_transforms_active, requested_backend
from ._common import check_like, check_tensor, new_output, refuse_graph_of_gradient, symbolic

_CPU_DTYPES = (torch.float32, torch.float64)


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


def _blocked_loss_and_gradients(features, weight, bias, targets, need_features, need_weight, need_bias):
    """The cpu path, one block of rows at a time: the block's logits (product), then the row kernel (bias,
    log-sum-exp, loss, the rows turned into softmax - one_hot, their gradient), then that block's share of
    the gradients for a unit loss gradient. Returns (loss, grad_features, grad_weight, grad_bias); a gradient
    not asked for is None."""
    events, classes = features.shape[0], weight.shape[0]
    loss_rows = new_output((events,), features)
    grad_features = torch.empty_like(features) if need_features else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_bias = torch.zeros_like(bias) if need_bias else None
    rows = _block_rows(classes, features.element_size())
    block = features.new_empty((min(rows, events), classes))
    weight_t = weight.t()
    for start in range(0, events, rows):
        stop = min(start + rows, events)
        x, logits = features[start:stop], block[:stop - start]
        torch.mm(x, weight_t, out=logits)
        torch.ops.hiertcn_fast.softmax_xent_out(logits, targets[start:stop], bias, loss=loss_rows[start:stop])
        if need_features:
            torch.mm(logits, weight, out=grad_features[start:stop])
        if need_weight:
            grad_weight.addmm_(logits.t(), x)
        if need_bias:
            grad_bias.add_(logits.sum(0))
    return loss_rows.sum(), grad_features, grad_weight, grad_bias


def _few_rows(events: int, dim: int, classes: int, element_size: int) -> bool:
    """Whether a batch is small enough to keep its (events, classes) logits' gradient for the backward: no more
    rows than features (so that buffer is no larger than the weight's gradient, which the blocked path keeps),
    in one block. There the blocked path's weight gradient, summed into a zeroed buffer in the forward and
    scaled into a new one in the backward, cost more than the products themselves: at one event, 1,683 classes
    and 128 features, twice PyTorch's time."""
    return events <= min(dim, _block_rows(classes, element_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss is a scalar at the end of the graph, so its gradients are those for a unit loss gradient
    times the incoming one: they are computed in the forward, block by block, and the backward only scales
    them. What is kept for the backward is then the gradients (events x dim and the weight's size), never
    the (events, classes) logits. A batch of no more rows than features (_few_rows) keeps instead the
    gradient of its logits, no larger than the weight's gradient, and runs the two products in the backward on
    it scaled by the incoming gradient: the weight's gradient is then written once, not zeroed, summed into and
    scaled."""

    @staticmethod
    def forward(ctx, features, weight, bias, targets):
        need = ctx.needs_input_grad
        need_bias = bias is not None and need[2]
        events, dim = features.shape
        ctx.few_rows = _few_rows(events, dim, weight.shape[0], features.element_size())
        if ctx.few_rows:
            grad_logits = features.new_empty((events, weight.shape[0]))
            torch.mm(features, weight.t(), out=grad_logits)
            loss_rows = new_output((events,), features)
            # The row kernel turns the logits into their gradient, softmax - one_hot, in place.
            torch.ops.hiertcn_fast.softmax_xent_out(grad_logits, targets, bias, loss=loss_rows)
            ctx.save_for_backward(grad_logits, weight if need[0] else None, features if need[1] else None)
            return loss_rows.sum()
        loss, grad_features, grad_weight, grad_bias = _blocked_loss_and_gradients(
            features, weight, bias, targets, need[0], need[1], need_bias)
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_graph_of_gradient("linear_cross_entropy")
        if not ctx.few_rows:
            return (*(None if g is None else g * grad_loss for g in ctx.saved_tensors), None)
        grad_logits, weight, features = ctx.saved_tensors
        scaled = grad_logits * grad_loss
        return (None if weight is None else torch.mm(scaled, weight),
                None if features is None else torch.mm(scaled.t(), features),
                scaled.sum(0) if ctx.needs_input_grad[2] else None, None)


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
    features, weight, targets = features.contiguous(), weight.contiguous(), targets.contiguous()
    bias = None if bias is None else bias.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (features, weight, bias)):
        return _LinearCrossEntropy.apply(features, weight, bias, targets)
    # No gradient wanted (evaluation, no_grad): the loss alone, without the gradient products.
    return _blocked_loss_and_gradients(features, weight, bias, targets, False, False, False)[0]


@_extension.register_fake("softmax_xent_out")
def _softmax_xent_out_fake(logits, targets, bias, *, loss):
    return None
