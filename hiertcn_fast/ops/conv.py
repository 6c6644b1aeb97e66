"""Dilated causal convolution op family: ``causal_conv1d`` (forward and backward, fused epilogue)
and ``causal_conv1d_step`` with its ``CausalConvState`` (one event at a time); ``tcn_step`` steps a whole
stack of residual layers at once.

Conventions (csrc/include/hiertcn/causal_conv.h has the kernel-side statement):
  x: (batch, time, in_channels), channels-last; weight: (out_channels, in_channels / groups, k) as
  nn.Conv1d; conv[t] = sum_j weight[:, :, j] x[t - (k - 1 - j) * dilation], zeros before the start,
  so tap k - 1 is the current step (exactly F.conv1d on the input left-padded by (k - 1) * dilation).
  With context (batch, ctx) and context_weight (out, ctx, k) the result equals convolving the
  concatenation [x, context repeated at every step] with [weight, context_weight]; the context term
  is computed as per-tap suffix sums (``context_table``), never by materialising the concatenation.
  Epilogue: out = act(z) or, with residual, act(act(z) + residual), z = conv + bias + context term.
"""

import contextlib
import dataclasses
import operator
import os
import weakref
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from .. import _extension
from .._ints import is_int
from ..backends import (INTERPRETER_UNSUPPORTED, compiling, functorch_transforms_active, requested_backend,
                        resolve)
from ._common import (FLOATING, check_like, check_shape, check_tensor, in_input_dtype, new_output, on_device_of,
                      refuse_batched_gradient, refuse_graph_of_gradient, refuse_inputs_requiring_grad, refuse_tangents,
                      fake, symbolic, unit_stride_rows)

# Activation codes shared with the kernels (hiertcn/causal_conv.h ActivationCode, triton/causal_conv.py).
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "tanh": 3}

CAUSAL_CONV_DTYPES = {
    "cuda": {torch.float16, torch.bfloat16, torch.float32, torch.float64},
    "triton": {torch.float16, torch.bfloat16, torch.float32},
    "cpu": {torch.float32, torch.float64},
    "reference": set(FLOATING),
}
# causal_conv1d's Triton kernels (forward and backward) run dense taps as tl.dot, which the Triton interpreter
# computes wrongly in bfloat16 (triton-lang/triton#11584): there the triton backend refuses bfloat16 CPU tensors
# (auto never picks triton for CPU tensors). The step kernels multiply without tl.dot and keep every dtype.
CAUSAL_CONV1D_DTYPES = {**CAUSAL_CONV_DTYPES, INTERPRETER_UNSUPPORTED: {torch.bfloat16}}

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype):
    return torch.float32 if dtype in _HALF else dtype


def _activate(v, activation):
    if activation is None:
        return v
    return {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation](v)


@in_input_dtype
def context_table(context: torch.Tensor, context_weight: torch.Tensor) -> torch.Tensor:
    """Per-tap suffix sums of the context term: (batch, k, out_channels), in the inputs' dtype (also under
    autocast, which would give its products in the autocast dtype: the kernels take the table in x's).

    context: (batch, ctx); context_weight: (out, ctx, k). Row m is sum_{j >= k-1-m} context_weight[:, :, j] @
    context: the context term of a step with m + 1 taps at or after the start of the sequence.
    """
    return _context_table(context, context_weight, False)


def _context_table(context, context_weight, lean_training):
    """context_table; lean_training (the kernels' backends): in training one product with the weight's cumulative
    packing, made per call, keeping only the context and the weight for its backward (_ContextTable); the
    reference keeps the plain definition (per-tap products, then suffix sums). Without gradients, one product
    with the packing cached per weight version. Traced (torch.compile), or inside a torch.func transform, the plain
    definition: the cache is not traceable, and a transform's wrapped tensors have no storage to key it on (under
    torch.func.grad with respect to x, the context and its weight require no grad)."""
    training = torch.is_grad_enabled() and (context.requires_grad or context_weight.requires_grad)
    if compiling() or functorch_transforms_active() or (training and not lean_training):
        return torch.einsum("bc,ocj->bjo", context, context_weight).flip(1).cumsum(1)
    if training:
        return _ContextTable.apply(context, context_weight)
    out_channels, _, k = context_weight.shape
    return (context @ _cumulative_context_matrix(context_weight)).view(context.shape[0], k, out_channels)


class _ContextTable(torch.autograd.Function):
    """context_table as one product, context @ the weight's cumulative packing, saving for the backward only the
    context and the weight itself: the backward packs the weight again (a few tens of microseconds at HierTCN's
    sizes) rather than keep a weight-sized packing per call (a training step calls this once per group of
    sessions) or share one between calls (which nothing reliably tells apart from a stale one: torch's fused
    optimizers and ``.data`` change a weight without moving its version)."""

    @staticmethod
    def forward(ctx, context, context_weight):
        out_channels, _, k = context_weight.shape
        ctx.save_for_backward(context, context_weight)
        return (context @ _pack_cumulative_context_weight(context_weight)).view(context.shape[0], k, out_channels)

    @staticmethod
    def backward(ctx, grad_table):
        refuse_graph_of_gradient("causal_conv1d")
        refuse_batched_gradient("causal_conv1d", grad_table)
        context, context_weight = ctx.saved_tensors
        out_channels, ctx_channels, k = context_weight.shape
        grad_rows = grad_table.reshape(context.shape[0], k * out_channels)
        grad_context = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_context = grad_rows @ _pack_cumulative_context_weight(context_weight).t()
        if ctx.needs_input_grad[1]:
            taps = (grad_rows.t() @ context).view(k, out_channels, ctx_channels)
            grad_weight = context_weight_grad(taps)
        return grad_context, grad_weight


def _has_cpu_helper(t: torch.Tensor) -> bool:
    """Whether the C++ helpers of the context weight (float CPU tensors only) take t."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and _extension.loaded()


def context_weight_grad(taps: torch.Tensor) -> torch.Tensor:
    """The context weight's gradient (out, ctx, k) from taps (k, out, ctx), the gradient of its cumulative
    packing by tap: grad[o, c, j] = sum over m >= k-1-j of taps[m, o, c]. In one pass in C++ for float CPU
    tensors (ATen's permuting copy of this shape runs at a few GB/s); elsewhere suffix sums and a permuted copy."""
    if _has_cpu_helper(taps):
        k, out_channels, ctx_channels = taps.shape
        grad = taps.new_empty((out_channels, ctx_channels, k))
        torch.ops.hiertcn_fast.context_weight_grad_out(taps.contiguous(), out=grad)
        return grad
    return taps.flip(0).cumsum(0).permute(1, 2, 0).contiguous()


def _pack_cumulative_context_weight(context_weight: torch.Tensor) -> torch.Tensor:
    """context_weight (out, ctx, k) as the (ctx, k * out) matrix M with M[c, m * out + o] = sum over j >= k-1-m of
    context_weight[o, c, j]: context @ M is the context table. In one pass in C++ for float CPU tensors (ATen's
    suffix sums over a last axis of k and the permuting copy cost six times as much); half types sum in float32."""
    out_channels, ctx_channels, k = context_weight.shape
    weight = context_weight.detach()
    if _has_cpu_helper(weight):
        matrix = weight.new_empty((ctx_channels, k, out_channels))
        torch.ops.hiertcn_fast.context_weight_pack_out(weight.contiguous(), out=matrix)
        return matrix.view(ctx_channels, k * out_channels)
    cumulative = weight.to(_compute_dtype(weight.dtype)).flip(2).cumsum(2).to(weight.dtype)
    return cumulative.permute(1, 2, 0).reshape(ctx_channels, k * out_channels).contiguous()


# The cumulative packing of a context weight, per weight tensor: (its _stamp when packed, the matrix). Weak on
# the weight, which the matrix does not refer to.
_context_weight_matrices = WeakIdKeyDictionary()


def _cumulative_context_matrix(context_weight: torch.Tensor) -> torch.Tensor:
    """_pack_cumulative_context_weight, repacked when the weight was modified in place or given new storage."""
    stamp = _stamp(context_weight)
    entry = _context_weight_matrices.get(context_weight)
    if entry is not None and entry[0] == stamp:
        return entry[1]
    matrix = _pack_cumulative_context_weight(context_weight)
    _context_weight_matrices[context_weight] = (stamp, matrix)
    return matrix


def context_rows(time: int, dilation: int, kernel_size: int, device) -> torch.Tensor:
    """(time,) int64: which context_table row applies at each step (the in-range taps minus one)."""
    return torch.clamp(torch.arange(time, device=device) // dilation, max=kernel_size - 1)


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernels' weight layout: (out, in/groups, k) -> (k, in_channels, out/groups), contiguous, with
    packed[j][ci][ol] = weight[g * out/groups + ol, ci - g * in/groups, j], g = ci // (in/groups): tap j as a
    (grouped) matrix from input rows to output rows (csrc/include/hiertcn/causal_conv_host.h does the same)."""
    out_channels, in_per_group, k = weight.shape
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, k)
    return grouped.permute(3, 0, 2, 1).reshape(k, groups * in_per_group, out_channels // groups).contiguous()


def _context_table_grad(grad_pre: torch.Tensor, dilation: int, kernel_size: int) -> torch.Tensor:
    """The gradient of context_table from dL/dz (batch, time, out): per-row sums over the steps that read
    each row, in a fixed order (deterministic). Row m < k-1 is read by steps [m * dilation, (m + 1) * dilation),
    the last row by every later step."""
    last = kernel_size - 1
    if last == 0:  # one row, read by every step (and no (0, dilation) view, whose strides overflow at a huge dilation)
        return grad_pre.sum(1, keepdim=True)
    time = grad_pre.shape[1]
    if time >= last * dilation:  # every row but the last has its dilation steps: one reduction for them all
        head = grad_pre[:, :last * dilation].unflatten(1, (last, dilation)).sum(2)
        return torch.cat([head, grad_pre[:, last * dilation:].sum(1, keepdim=True)], 1)
    rows = [grad_pre[:, m * dilation:(None if m == last else (m + 1) * dilation)].sum(1) for m in range(kernel_size)]
    return torch.stack(rows, 1)


def _tap_product(source: torch.Tensor, weight_tap: torch.Tensor, groups: int) -> torch.Tensor:
    """source (..., in_channels) times one tap weight_tap (out, in/groups), grouped: (..., out)."""
    out_channels, in_per_group = weight_tap.shape
    grouped = source.reshape(*source.shape[:-1], groups, in_per_group)
    w = weight_tap.reshape(groups, out_channels // groups, in_per_group)
    return torch.einsum("...gc,goc->...go", grouped, w).reshape(*source.shape[:-1], out_channels)


def _epilogue_reference(z, activation, residual):
    out = _activate(z, activation)
    return out if residual is None else _activate(out + residual, activation)


def causal_conv1d_reference(x, weight, bias=None, *, dilation=1, groups=1, context=None, context_weight=None,
                            activation=None, residual=None):
    """Plain-PyTorch causal_conv1d, as k shifted (grouped) matmuls: the definition every backend is tested
    against. Half types compute in float32. Shapes as causal_conv1d."""
    compute = _compute_dtype(x.dtype)
    batch, time, _ = x.shape
    out_channels, _, kernel_size = weight.shape
    xc, wc = x.to(compute), weight.to(compute)
    z = x.new_zeros(batch, time, out_channels, dtype=compute)
    for j in range(kernel_size):
        lag = (kernel_size - 1 - j) * dilation
        if lag >= time:
            continue
        shifted = F.pad(xc[:, :time - lag], (0, 0, lag, 0))
        z = z + _tap_product(shifted, wc[:, :, j], groups)
    if bias is not None:
        z = z + bias.to(compute)
    if context is not None:
        table = context_table(context.to(compute), context_weight.to(compute))
        z = z + table[:, context_rows(time, dilation, kernel_size, x.device)]
    res = None if residual is None else residual.to(compute)
    return _epilogue_reference(z, activation, res).to(x.dtype)


# The kernels' bound on a layer's reach (k - 1) * dilation (csrc/include/hiertcn/causal_conv_host.h, kMaxReach):
# offsets computed from a larger one would overflow int64.
MAX_REACH = 2 ** 62


CPU_CONV_BLAS_MODES = ("auto", "always", "never")


def _conv_blas_module(what):
    module = _extension.module()
    if module is None or not hasattr(module, "set_conv_blas_mode"):
        problem = ("the compiled extension is not loaded" if module is None else
                   "the compiled extension predates this setting (rebuild it)")
        raise RuntimeError(f"{what}: {problem}; the setting concerns only the cpu backend's compiled kernels")
    return module


def cpu_conv_blas() -> dict:
    """How the cpu backend runs dense causal convolutions (groups 1, >= 32 channels in and out, >= 2**19
    multiply-adds): {"mode": "auto", "always" or "never", "blas": whether such a convolution goes through the BLAS
    now}. In "auto" the route depends on the CPU: through torch's BLAS, except on an AMD CPU with AVX-512, where MKL
    (the BLAS of torch's x86 wheels) runs its AVX2 kernels and the package's AVX-512 micro-kernels are faster.
    Smaller, grouped and depthwise convolutions always run the micro-kernels. The HIERTCN_CPU_CONV_BLAS environment
    variable sets the mode at import."""
    module = _conv_blas_module("cpu_conv_blas")
    mode = CPU_CONV_BLAS_MODES[module.conv_blas_mode()]
    return {"mode": mode, "blas": mode == "always" or (mode == "auto" and module.conv_blas_auto_choice())}


def set_cpu_conv_blas(mode: str) -> str:
    """Set the cpu backend's route for big dense convolutions (see ``cpu_conv_blas``) for the whole process and
    return the previous mode. "always" and "never" force one route, for a benchmark or a test of both; each route
    is deterministic, and the two agree to rounding, not bitwise."""
    if not isinstance(mode, str) or mode not in CPU_CONV_BLAS_MODES:
        raise ValueError(f"set_cpu_conv_blas: mode must be one of {', '.join(CPU_CONV_BLAS_MODES)}; got {mode!r}")
    module = _conv_blas_module("set_cpu_conv_blas")
    previous = CPU_CONV_BLAS_MODES[module.conv_blas_mode()]
    module.set_conv_blas_mode(CPU_CONV_BLAS_MODES.index(mode))
    return previous


CPU_CONV_BLAS_ENV = "HIERTCN_CPU_CONV_BLAS"


def _apply_cpu_conv_blas_env() -> None:
    """HIERTCN_CPU_CONV_BLAS (auto, always, never) sets the route when hiertcn_fast is imported: for processes that
    cannot call set_cpu_conv_blas first (DDP workers, a benchmark's subprocesses). A bad value is an error at import
    (a typo would otherwise time the other route); without the compiled extension it is checked and has nothing to
    set (there is no cpu backend)."""
    value = os.environ.get(CPU_CONV_BLAS_ENV)
    if value is None:
        return
    if value not in CPU_CONV_BLAS_MODES:
        raise ValueError(f"the {CPU_CONV_BLAS_ENV} environment variable must be one of "
                         f"{', '.join(CPU_CONV_BLAS_MODES)}; got {value!r}")
    if _extension.loaded() and hasattr(_extension.module(), "set_conv_blas_mode"):
        set_cpu_conv_blas(value)


_apply_cpu_conv_blas_env()


def check_reach(kernel_size: int, dilation: int) -> None:
    """A layer's reach (k - 1) * dilation must stay below MAX_REACH, and the dilation itself too (with k = 1 the
    reach is 0 whatever the dilation, which the ops' int64 arguments must still hold)."""
    if (kernel_size - 1) * dilation >= MAX_REACH or dilation >= MAX_REACH:
        raise ValueError(f"dilation and (k - 1) * dilation must be below 2**62, got k = {kernel_size} and "
                         f"dilation = {dilation}")


def _check_int(value, name, minimum):
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_activation(activation) -> None:
    """activation must be None or one of the names in ACTIVATIONS (a list or other unhashable value was a bare
    "unhashable type" TypeError from the lookup)."""
    if not (activation is None or isinstance(activation, str)):
        raise TypeError(f"activation must be None or one of {tuple(a for a in ACTIVATIONS if a)}, got "
                        f"{type(activation).__name__} {activation!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")


def _check_conv_common(x, x_name, weight, bias, dilation, groups, context, context_weight, activation):
    """Checks shared by causal_conv1d and causal_conv1d_step; returns (out_channels, kernel_size)."""
    check_tensor(weight, "weight", 3)
    check_like(weight, "weight", x, x_name)
    _check_int(dilation, "dilation", 1)
    _check_int(groups, "groups", 1)
    in_channels = x.shape[-1]
    out_channels, in_per_group, kernel_size = weight.shape
    if kernel_size < 1:
        raise ValueError(f"weight must have k >= 1 taps (out_channels, in_channels / groups, k), "
                         f"got shape {tuple(weight.shape)}")
    check_reach(kernel_size, dilation)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups ({groups}) must divide in_channels ({in_channels}) and out_channels "
                         f"({out_channels})")
    if in_per_group * groups != in_channels:
        if x.dim() == 3 and x.shape[1] == in_per_group * groups:
            raise ValueError(f"{x_name} must be (batch, time, in_channels = {in_per_group * groups}), channels-last, "
                             f"for this weight; got shape {tuple(x.shape)}, which looks like nn.Conv1d's (batch, "
                             f"channels, time): pass {x_name}.transpose(1, 2)")
        raise ValueError(f"weight (out_channels, in_channels / groups, k) must have {in_channels // groups} input "
                         f"channels for {x_name} with {in_channels} channels and groups={groups}, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", 1)
        check_like(bias, "bias", x, x_name)
        check_shape(bias, "bias (out_channels,)", (out_channels,))
    if (context is None) != (context_weight is None):
        raise ValueError("context and context_weight must be given together")
    if context is not None:
        check_tensor(context, "context", 2)
        check_like(context, "context", x, x_name)
        check_tensor(context_weight, "context_weight", 3)
        check_like(context_weight, "context_weight", x, x_name)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context (batch, ctx_channels) must have batch {x.shape[0]}, got shape "
                             f"{tuple(context.shape)}")
        check_shape(context_weight, "context_weight (out_channels, ctx_channels, k)",
                    (out_channels, context.shape[1], kernel_size))
    check_activation(activation)
    return out_channels, kernel_size


def _check_causal_conv(x, weight, bias, dilation, groups, context, context_weight, activation, residual):
    check_tensor(x, "x", 3)
    if x.shape[1] == 0:
        raise ValueError(f"x (batch, time, in_channels) has an empty time axis (shape {tuple(x.shape)}); "
                         f"causal_conv1d needs at least one step")
    out_channels, _ = _check_conv_common(x, "x", weight, bias, dilation, groups, context, context_weight, activation)
    if residual is not None:
        check_tensor(residual, "residual", 3)
        check_like(residual, "residual", x, "x")
        check_shape(residual, "residual (batch, time, out_channels)", (*x.shape[:2], out_channels))


@in_input_dtype
def causal_conv1d(x, weight, bias=None, *, dilation=1, groups=1, context=None, context_weight=None, activation=None,
                  residual=None, backend=None):
    """Dilated causal convolution over time with a fused epilogue.

    x: (batch, time, in_channels); weight: (out_channels, in_channels / groups, k); bias: (out_channels,);
    context: (batch, ctx_channels) with context_weight (out_channels, ctx_channels, k): the time-constant
    input concatenated to every step; residual: (batch, time, out_channels); activation: None, "relu",
    "gelu" or "tanh". Returns (batch, time, out_channels) = act(z), or act(act(z) + residual) with a
    residual. Differentiable in every tensor argument, and the backward pays only for the gradients wanted: no
    input-gradient conv for an x that needs none (a first layer over data), no weight-gradient products for a
    frozen weight. The backward is deterministic: the same inputs give the same
    bits run after run at a fixed thread count (the cpu backend's dense layers of 32 channels or more take their
    products through BLAS, whose summation order, in the weight gradient, follows the thread count; so does the
    context gradient's, one BLAS product wherever the context enters). As with torch's own ops, the tensors an
    op keeps for its backward must not be modified in place before it runs (autograd's version check says so):
    on the kernels' backends these include the residual (with gelu, or tanh in half types), which the reference
    does not keep.
    Non-finite weights: a tap that reaches before the start multiplies zeros on some paths (inf * 0 = NaN, as
    F.conv1d on a left-padded input gives) and is skipped on others, so with an inf or NaN weight the first
    (k - 1) * dilation steps may be NaN on one backend and finite on another; finite weights agree everywhere.
    """
    _check_causal_conv(x, weight, bias, dilation, groups, context, context_weight, activation, residual)
    dilation, groups = int(dilation), int(groups)  # (a NumPy integer passes the checks; the ops take Python's)
    name = resolve("causal_conv1d", backend, x.device, x.dtype, CAUSAL_CONV1D_DTYPES)
    if name == "reference":
        return causal_conv1d_reference(x, weight, bias, dilation=dilation, groups=groups, context=context,
                                       context_weight=context_weight, activation=activation, residual=residual)
    table = None if context is None else _context_table(context, context_weight, True).contiguous()
    # The TCN block's identity residual is x itself: passed as a flag, not as a second argument (torch.compile
    # refuses an autograd.Function given one tensor twice), and its gradient joins x's.
    residual_is_x = residual is x
    x = unit_stride_rows(x)
    if residual is not None:
        residual = None if residual_is_x else unit_stride_rows(residual)
    # The kernels read the bias as one contiguous row (a strided view is copied; its gradient flows back).
    bias = None if bias is None else bias.contiguous()
    return _CausalConvFunction.apply(x, weight, bias, table, residual, residual_is_x, dilation, groups,
                                     ACTIVATIONS[activation], name)


def _forward_kernel(name, x, weight, bias, table, residual, dilation, groups, activation, out, pre):
    if name == "triton":
        torch.ops.hiertcn_fast.causal_conv1d_triton_out(x, pack_weight(weight, groups), bias, table, residual, dilation,
                                                        groups, activation, out, pre)
    else:
        torch.ops.hiertcn_fast.causal_conv1d_out(x, weight, bias, table, residual, dilation, groups, activation,
                                                 out=out, pre=pre)


def _backward_kernel(name, grad_out, x, weight, pre, residual, dilation, groups, activation, grad_pre, grad_x,
                     grad_weight, grad_residual):
    if name == "triton":
        torch.ops.hiertcn_fast.causal_conv1d_backward_triton_out(grad_out, x, weight, pre, residual, dilation, groups,
                                                                 activation, grad_pre, grad_x, grad_weight,
                                                                 grad_residual)
    else:
        torch.ops.hiertcn_fast.causal_conv1d_backward_out(grad_out, x, weight, pre, residual, dilation, groups,
                                                          activation, grad_pre=grad_pre, grad_x=grad_x,
                                                          grad_weight=grad_weight, grad_residual=grad_residual)


def _outer_grad_from_output(activation, dtype) -> bool:
    """Whether the output gives the outer activation's derivative exactly enough (for the activations whose kernels
    keep no sign bits): none's 1 in every dtype; tanh'(s) = 1 - out^2 in float32 and float64 only (a half-type out
    rounds to 1 near saturation, where the derivative is small but not 0)."""
    return activation == ACTIVATIONS[None] or (activation == ACTIVATIONS["tanh"]
                                               and dtype in (torch.float32, torch.float64))


def _outer_grad(grad_out, out, activation):
    """dL/d(act(z) + residual) from dL/dout and out = act(act(z) + residual), where _outer_grad_from_output."""
    if activation == ACTIVATIONS["tanh"]:  # one pass: ATen's own tanh backward
        return torch.ops.aten.tanh_backward(grad_out, out)
    return grad_out


class _CausalConvFunction(torch.autograd.Function):
    """What the backward keeps besides x and the weight:
    - relu: its two derivatives as sign bits, one byte per element written by the forward kernel (bit 0 z > 0,
      bit 1 out > 0, i.e. relu(z) + residual > 0; a NaN counts as > 0 there, as in torch.relu's backward): neither
      z nor the residual;
    - tanh (in float32 and float64) and no activation, with a residual of its own (not x itself, which is kept
      anyway): z and the output, whose outer derivative it gives, not the residual (the output is what the next
      block of a stack keeps anyway as its input; so, as after torch.tanh, an in-place change of it before the
      backward is an error);
    - otherwise z and the residual."""

    @staticmethod
    def forward(ctx, x, weight, bias, table, residual, residual_is_x, dilation, groups, activation, name):
        if residual_is_x:
            residual = x
        batch, time, _ = x.shape
        out_shape = (batch, time, weight.shape[0])
        out = new_output(out_shape, x)
        relu = activation == ACTIVATIONS["relu"]
        # z (or relu's sign bits) only when the backward needs it: an activation, and an input wanting a gradient.
        pre = None
        if activation != 0 and any(ctx.needs_input_grad[:5]):
            pre = x.new_empty(out_shape, dtype=torch.uint8) if relu else new_output(out_shape, x)
        _forward_kernel(name, x, weight, bias, table, residual, dilation, groups, activation, out, pre)
        from_out = residual is not None and residual is not x and _outer_grad_from_output(activation, x.dtype)
        kept = None if relu else (out if activation != 0 else None) if from_out else residual
        ctx.save_for_backward(x, weight, pre, kept)
        ctx.config = (dilation, groups, activation, name, bias is not None, table is not None, from_out,
                      residual_is_x, residual is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_graph_of_gradient("causal_conv1d")
        refuse_batched_gradient("causal_conv1d", grad_out)
        x, weight, pre, kept = ctx.saved_tensors
        dilation, groups, activation, name, has_bias, has_table, from_out, residual_is_x, has_residual = ctx.config
        grad_pre = new_output(grad_out.shape, x)
        # Each product of the backward only for an input that wants its gradient (x's also when x is the residual,
        # whose gradient joins it).
        grad_x = new_output(x.shape, x) if ctx.needs_input_grad[0] else None
        grad_weight = new_output(weight.shape, weight) if ctx.needs_input_grad[1] else None
        if pre is not None and pre.dtype == torch.uint8:
            # relu from the sign bits: the kernels read no residual, and write its gradient where there was one.
            grad_residual = new_output(grad_out.shape, x) if has_residual else None
            _backward_kernel(name, unit_stride_rows(grad_out), x, weight, pre, None, dilation, groups, activation,
                             grad_pre, grad_x, grad_weight, grad_residual)
        elif from_out:
            # dL/d(act(z) + residual) is the residual's gradient; the kernels take it from there as a block
            # without a residual (the inner activation's derivative from z).
            grad_residual = _outer_grad(unit_stride_rows(grad_out), kept, activation)
            _backward_kernel(name, unit_stride_rows(grad_residual), x, weight, pre, None, dilation, groups,
                             activation, grad_pre, grad_x, grad_weight, None)
        else:
            grad_residual = None if kept is None else new_output(kept.shape, x)
            _backward_kernel(name, unit_stride_rows(grad_out), x, weight, pre, kept, dilation, groups, activation,
                             grad_pre, grad_x, grad_weight, grad_residual)
        grad_table = _context_table_grad(grad_pre, dilation, weight.shape[2]) if has_table else None
        # The table's rows partition the steps: summing its gradient is summing grad_pre, on a k-step tensor.
        grad_bias = None if not has_bias else grad_pre.sum((0, 1)) if grad_table is None else grad_table.sum((0, 1))
        if residual_is_x:
            if grad_x is not None:
                grad_x += grad_residual
            grad_residual = None
        return grad_x, grad_weight, grad_bias, grad_table, grad_residual, None, None, None, None, None


# ---- incremental update --------------------------------------------------------------------------


@dataclasses.dataclass
class CausalConvState:
    """What causal_conv1d_step needs of the past, for one layer.

    history: (batch, (k - 1) * dilation, in_channels), a circular buffer: the input of step p of a row
    lives at slot p % ((k - 1) * dilation) until it falls out of the receptive field.
    position: (batch,) int64, steps taken per row since its last reset. Both are updated in place. A negative
    position (a state written from outside) is refused by the CPU kernels and, on CPU tensors, by the
    reference; the device kernels (cuda, triton) cannot refuse without a sync per step, so that row's output is
    NaN and its state is left unchanged. The kernels (cpu, cuda, triton) need both contiguous; the reference
    takes views. Each layer of a stack needs a state of its own (tcn_step refuses layers whose states overlap in
    memory). A state made under torch.inference_mode (its tensors then inference tensors) steps and resets
    outside it too, on every backend.
    The state also caches the layer's weight in the kernels' packing and the context term's table, so that
    a step neither repacks the one nor recomputes the other.
    """

    history: torch.Tensor
    position: torch.Tensor
    kernel_size: int
    dilation: int
    _packed: tuple = dataclasses.field(default=(), repr=False, compare=False)
    _table: tuple = dataclasses.field(default=(), repr=False, compare=False)
    _residual_term: tuple = dataclasses.field(default=(), repr=False, compare=False)
    _stack_checked: tuple = dataclasses.field(default=(), repr=False, compare=False)  # what tcn_step checked last
    # tcn_step's prepared CPU step: (argument objects, (activation, backend requested, layers), plan or None)
    _prepared: tuple = dataclasses.field(default=(), repr=False, compare=False)

    # Copies (copy.deepcopy, pickle, torch.save) keep the state itself, not its caches: those refer to the
    # layer's weights (megabytes, and a prepared step that cannot be pickled) and are rebuilt on the next step.
    def __getstate__(self):
        return {"history": self.history, "position": self.position, "kernel_size": self.kernel_size,
                "dilation": self.dilation}

    def __setstate__(self, state):
        self.__init__(state["history"], state["position"], state["kernel_size"], state["dilation"])

    def __post_init__(self):
        # An integer of any kind is kept as Python's, which the ops take (anything else is refused at the step).
        for name in ("kernel_size", "dilation"):
            if is_int(getattr(self, name)):
                setattr(self, name, int(getattr(self, name)))

    @classmethod
    def zeros(cls, batch, in_channels, kernel_size, dilation=1, *, dtype=torch.float32, device="cpu"):
        for value, name, minimum in ((batch, "batch", 0), (in_channels, "in_channels", 0),
                                     (kernel_size, "kernel_size", 1), (dilation, "dilation", 1)):
            _check_int(value, f"CausalConvState.zeros: {name}", minimum)
        batch, in_channels, kernel_size, dilation = int(batch), int(in_channels), int(kernel_size), int(dilation)
        check_reach(kernel_size, dilation)
        history = torch.zeros(batch, (kernel_size - 1) * dilation, in_channels, dtype=dtype, device=device)
        return cls(history, torch.zeros(batch, dtype=torch.int64, device=device), kernel_size, dilation)

    def reset(self, rows=None):
        """Start a new sequence in ``rows`` (a (batch,) bool mask or index tensor; None: every row)."""
        with _writing_state(self):  # (a state made under torch.inference_mode resets outside it too, as it steps)
            if rows is None:
                self.position.zero_()
                self.history.zero_()
            else:
                self.position[rows] = 0
                self.history[rows] = 0

    def to(self, device=None, dtype=None) -> "CausalConvState":
        """An independent copy on ``device``, history in ``dtype`` (position stays int64); caches are not carried."""
        return CausalConvState(self.history.to(device=device, dtype=dtype, copy=True),
                               self.position.to(device=device, copy=True),
                               self.kernel_size, self.dilation)

    def packed_weight(self, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """pack_weight(weight, groups), recomputed only when weight is another tensor or was modified in place.
        Traced (torch.compile), packed in the graph at every call: the cache is not traceable."""
        if compiling():
            return pack_weight(weight.detach(), groups)
        if not _cache_is_fresh(self._packed, (weight,), groups):
            self._packed = _cache_entry((weight,), groups, lambda: pack_weight(weight.detach(), groups))
        return self._packed[-1]

    def cached_context_table(self, context: torch.Tensor, context_weight: torch.Tensor) -> torch.Tensor:
        """context_table(context, context_weight), recomputed only when either is another tensor or was modified
        in place: a session's context term costs its FLOPs once, not at every step. Traced, computed at every call."""
        return self._cached_product("_table", context_table, context, context_weight)

    def cached_context_residual(self, context: torch.Tensor, context_proj_weight: torch.Tensor) -> torch.Tensor:
        """F.linear(context, context_proj_weight) (batch, out_channels): the context's term of a residual that
        projects concat(x, context), cached as the context table is."""
        return self._cached_product("_residual_term", _context_residual, context, context_proj_weight)

    def _cached_product(self, slot, make, context, weight):
        """make(context, weight), contiguous, kept in attribute ``slot`` and made again only when either is another
        tensor or changed. Traced, made at every call."""
        if compiling():
            return make(context.detach(), weight.detach()).contiguous()
        if context.is_inference():
            # An inference tensor has no version counter: on the CPU the cached product is kept with a copy of the
            # context it was made from (and the weight itself, with its stamp) and reused while the context (the
            # same tensor) still equals it, which a comparison of (batch, context_channels) values tells for a
            # fraction of the product's cost. On a device that comparison would make the host wait for it at
            # every step: there the product is made again, asynchronously. (An inference weight's stamp equals
            # nothing: its product is made again at every step.)
            entry = getattr(self, slot)
            stamp = _stamp(weight)  # (before the weight is read: see _cache_entry)
            if (entry and entry[-2] == "inference" and entry[0] is context and entry[2] is weight
                    and entry[3] == stamp and torch.equal(entry[1], context)):
                return entry[-1]
            with torch.no_grad():
                product = make(context, weight).contiguous()
            if context.device.type == "cpu":
                setattr(self, slot, (context, context.clone(), weight, stamp, "inference", product))
            return product
        entry = getattr(self, slot)
        if not _cache_is_fresh(entry, (context, weight), None):
            with torch.no_grad():  # the weight itself, not a detached alias, keys its packing's cache
                entry = _cache_entry((context, weight), None, lambda: make(context, weight).contiguous())
            setattr(self, slot, entry)
        return entry[-1]


@in_input_dtype
def _context_residual(context, context_proj_weight):
    """F.linear(context, context_proj_weight) in the inputs' dtype (also under autocast: the step's state dtype)."""
    return F.linear(context, context_proj_weight)


# Bumped by forget_weight_caches(): every cache of packed weights, context tables and prepared steps compares it.
_generation = [0]


def forget_weight_caches() -> None:
    """Drop every packing of weights the ops keep from call to call: the stack step's packed weights and
    prepared steps, the states' packed weights and context tables, the packed context weights. They notice a
    weight changed in place or given new storage (by its version counter and its storage object, which they
    hold: ``w.data = ...`` and a module's ``.half()``, ``.double()`` or ``.to()`` round trip are seen), but not a
    change made in place through ``.data`` (``w.data.copy_(...)``) or through another tensor sharing the weight's
    memory (the vector after ``nn.utils.vector_to_parameters``), which bypasses the weight's version counter:
    call this after such a change. Steps of torch's fused optimizers (``fused=True``), which move no version
    counter either, call it themselves (a global optimizer step hook, registered when hiertcn_fast is
    imported). The module-level caches are emptied at once (the storage they hold with them); a state's
    caches at its next step."""
    _packed_stacks.clear()
    _context_weight_matrices.clear()
    _generation[0] += 1


def weight_cache_generation() -> int:
    """How many times forget_weight_caches() was called (what the caches compare)."""
    return _generation[0]


def _around_optimizer_step(optimizer, args, kwargs) -> None:
    """torch's fused optimizers update parameters in one kernel that moves no version counter: around their step
    every cache keyed by versions is forgotten. The others' updates move the versions, which the caches see.

    Before the step (a pre-hook), and again after it: an interrupt that lands once the kernel has returned but
    before a post-hook runs (as it is entered, say) skipped the forgetting, and evaluation and serving went on
    with the weights' packings from before the step. One landing in the pre-hook stops the step itself. The
    post-hook stays for a closure's forward inside the step, which may fill a cache before the kernel runs."""
    if any(group.get("fused") for group in optimizer.param_groups):
        forget_weight_caches()


register_optimizer_step_pre_hook(_around_optimizer_step)
register_optimizer_step_post_hook(_around_optimizer_step)


def _stamp(t: torch.Tensor) -> tuple:
    """What a cache derived from t compares to see t unchanged: the version catches in-place changes, the
    storage object new storage under the same tensor (``w.data = ...``, which a module's ``.half()``, ``.to()``
    do), the data pointer a view moved within it (``set_``), the generation a call of forget_weight_caches()
    (for what none of them sees: in-place changes through ``.data``, and the steps of torch's fused optimizers,
    which move no version counter and call it through a step hook). The stamp holds the storage (torch keeps one
    Python object per storage, compared by identity), so that storage cannot be freed and its address reused by
    the new one while a cache still compares it. An inference tensor (made under torch.inference_mode) has no
    version counter and may change in place unseen: its stamp equals no other, so whatever is derived from it
    is derived again at every use."""
    if t.is_inference() or fake(t):  # (a fake tensor has no memory to point at)
        return object()
    return t._version, t.data_ptr(), _generation[0], t.untyped_storage()


def _cache_entry(sources, extra, make):
    """A cache entry of make()'s value, derived from the tensors ``sources``. Their stamps are taken before make()
    reads them: a write landing while it reads (another thread's optimizer step or ``w.add_()``; the version moves
    once the write is done) then leaves the entry stale, and it is made again at the next use. Stamped after, the
    entry would hold the new version beside a value of the old weights, for good. The entry holds its source
    tensors, so their memory cannot be reused by other tensors while cached."""
    stamps = [_stamp(t) for t in sources]
    return (*zip(sources, stamps), extra, make())


def _cache_is_fresh(entry, sources, extra):
    return bool(entry) and entry[-2] == extra and all(
        cached is t and stamp == _stamp(t) for (cached, stamp), t in zip(entry[:-2], sources))


def causal_conv1d_step_reference(x, weight, state, bias=None, *, groups=1, context=None, context_weight=None,
                                 activation=None, residual=None):
    """Plain-PyTorch causal_conv1d_step (updates ``state`` in place). Shapes as causal_conv1d_step; a negative
    position is an error on CPU tensors, as on the cpu backend."""
    _check_history_not_shared(state.history)
    _check_positions_not_negative(state.position)
    compute = _compute_dtype(x.dtype)
    kernel_size, dilation = state.kernel_size, state.dilation
    history_length = (kernel_size - 1) * dilation
    rows = torch.arange(x.shape[0], device=x.device)
    position = state.position
    wc = weight.to(compute)
    z = _tap_product(x.to(compute), wc[:, :, kernel_size - 1], groups)
    for j in range(kernel_size - 1):
        lag = (kernel_size - 1 - j) * dilation
        source = state.history[rows, (position - lag) % history_length].to(compute)
        source = torch.where((position >= lag)[:, None], source, torch.zeros_like(source))
        z = z + _tap_product(source, wc[:, :, j], groups)
    if bias is not None:
        z = z + bias.to(compute)
    if context is not None:
        table = context_table(context.to(compute), context_weight.to(compute))
        z = z + table[rows, torch.clamp(position // dilation, max=kernel_size - 1)]
    res = None if residual is None else residual.to(compute)
    out = _epilogue_reference(z, activation, res).to(x.dtype)
    with _writing_state(state):
        if history_length:
            state.history[rows, position % history_length] = x
        position += 1
    return out


def _writing_state(state):
    """The block that writes ``state`` in place. A state made under torch.inference_mode holds inference tensors,
    which torch lets only code inside inference mode update in place: the kernels of the other backends write
    its memory whatever the mode, and so does the reference, inside inference mode for the writes alone (its
    output stays a normal tensor). Nothing is lost by it: an inference tensor is in no autograd graph."""
    if not symbolic(state.history) and (state.history.is_inference() or state.position.is_inference()):
        return torch.inference_mode()
    return contextlib.nullcontext()


@in_input_dtype
def causal_conv1d_step(x, weight, state, bias=None, *, groups=1, context=None, context_weight=None, activation=None,
                       residual=None, backend=None):
    """One step of causal_conv1d for every row, updating ``state`` in place (inference: no autograd).

    x: (batch, in_channels), this step's input; weight, bias, groups, context, context_weight and
    activation as causal_conv1d (kernel size and dilation come from ``state``, a CausalConvState);
    residual: (batch, out_channels). Returns (batch, out_channels): what causal_conv1d would give at
    each row's current position. Reads k rows of history per row; writes one.
    """
    out_channels = _check_step(x, weight, state, bias, groups, context, context_weight, activation, residual)
    if forward_ad._current_level >= 0:
        refuse_tangents("causal_conv1d_step", x=x, weight=weight, bias=bias, context=context,
                        context_weight=context_weight, residual=residual)
    groups = int(groups)
    name = resolve("causal_conv1d_step", backend, x.device, x.dtype, CAUSAL_CONV_DTYPES)
    if torch.is_grad_enabled():  # the step is inference only; entering no_grad costs more than the check
        refuse_inputs_requiring_grad("causal_conv1d_step", "causal_conv1d over the sequence", x=x, context=context,
                                     residual=residual)
        with torch.no_grad():
            return _step(name, x, weight, state, bias, groups, context, context_weight, activation, residual,
                         out_channels)
    return _step(name, x, weight, state, bias, groups, context, context_weight, activation, residual, out_channels)


def _check_step(x, weight, state, bias, groups, context, context_weight, activation, residual, where=""):
    """causal_conv1d_step's argument checks (``where`` names the layer of a stack); returns out_channels."""
    check_tensor(x, "x", 2)
    if not isinstance(state, CausalConvState):
        raise TypeError(f"{where}state must be a CausalConvState, got {type(state).__name__}")
    try:
        out_channels, kernel_size = _check_conv_common(x, "x", weight, bias, state.dilation, groups, context,
                                                       context_weight, activation)
        if kernel_size != state.kernel_size:
            raise ValueError(f"weight has k={kernel_size} taps but the state was made for k={state.kernel_size}")
        check_like(state.history, "state.history", x, "x")
        check_shape(state.history, "state.history (batch, (k - 1) * dilation, in_channels)",
                    (x.shape[0], (kernel_size - 1) * state.dilation, x.shape[1]))
        _check_position(x, state.position, contiguous=False)
        if residual is not None:
            check_tensor(residual, "residual", 2)
            check_like(residual, "residual", x, "x")
            check_shape(residual, "residual (batch, out_channels)", (x.shape[0], out_channels))
    except (TypeError, ValueError) as error:
        if not where:
            raise
        raise type(error)(f"{where}{error}") from None
    return out_channels


def _check_position(x, position, contiguous):
    """state.position must be an int64 (batch,) tensor on x's device on every backend (contiguous too where the
    kernels read it as a plain vector: contiguous=True): the reference indexes the history with it, where a
    float one is an IndexError, another batch a shape mismatch, and an int32 one would be accepted where the
    kernels refuse it."""
    if (not isinstance(position, torch.Tensor) or position.dtype != torch.int64 or position.shape != (x.shape[0],)
            or position.device != x.device or (contiguous and not position.is_contiguous())):
        shown = (f"{position.dtype} {tuple(position.shape)} on {position.device}, "
                 f"{'contiguous' if position.is_contiguous() else 'strided'}"
                 if isinstance(position, torch.Tensor) else type(position).__name__)
        raise ValueError(f"state.position must be {'a contiguous' if contiguous else 'an'} int64 ({x.shape[0]},) "
                         f"tensor on x's device ({x.device}), got {shown}")


def _check_history_not_shared(history):
    """The step writes each row's input into its own slot of the history: an expanded history (a stride of 0 over
    rows or slots, e.g. one row's history expanded to a batch) would have rows overwrite each other's. The cpu,
    cuda and triton backends need a contiguous history and so refuse it; the reference, which takes strided views,
    says so in its own words (index_put would only warn, and write every row's input to the shared slot)."""
    if symbolic(history):
        return
    shared = [dim for dim, (size, stride) in enumerate(zip(history.shape, history.stride())) if size > 1 and not stride]
    if shared:
        raise ValueError(f"state.history must give every row and slot memory of its own (it is written in place), got "
                         f"an expanded tensor (stride 0 in dim {shared[0]}, shape {tuple(history.shape)}): pass "
                         f"history.clone(), or make the state with CausalConvState.zeros")


def _check_positions_not_negative(position, layer=None):
    """A position indexes the circular history: the reference refuses a negative one (a state corrupted or
    written by hand) on CPU tensors, in the cpu kernel's words, where it would otherwise step the row silently
    (its taps read as zeros, its input written at a wrapped slot). Device tensors are not read: that would make
    the host wait for the device at every step (the device kernels give the row NaN instead); nor traced or fake
    ones (torch.compile, FakeTensorMode: no values to look at)."""
    if position.device.type != "cpu" or position.numel() == 0 or symbolic(position):
        return
    low, row = (t.item() for t in position.min(0))
    if low < 0:
        where = "" if layer is None else f"layer {layer}, "
        raise ValueError(f"the step state's position must be >= 0 (steps taken since the row's reset); {where}row "
                         f"{row} has {low}")


def _check_kernel_state(x, state, backend, where="state"):
    """The step kernels (cpu, cuda, triton) index the history as contiguous and the positions as a contiguous
    vector (a strided view would be misread): refused here in words that say what to do, where the compiled ops
    would name only their own argument. The rest of the position (int64, (batch,), x's device) _check_step and
    _check_stack have checked. (The reference takes strided views.)"""
    if not state.history.is_contiguous():
        raise ValueError(f"{where}.history must be contiguous for the {backend} backend (a view, e.g. a slice of a "
                         f"wider history, is not), got strides {tuple(state.history.stride())} for shape "
                         f"{tuple(state.history.shape)}: pass a contiguous copy (CausalConvState(history.contiguous(), "
                         f"...)) or use backend='reference'")
    if not state.position.is_contiguous():
        _check_position(x, state.position, contiguous=True)


def _step(name, x, weight, state, bias, groups, context, context_weight, activation, residual, out_channels):
    if name == "reference":
        return causal_conv1d_step_reference(x, weight, state, bias, groups=groups, context=context,
                                            context_weight=context_weight, activation=activation, residual=residual)
    _check_kernel_state(x, state, name)
    table = None if context is None else state.cached_context_table(context, context_weight)
    out = new_output((x.shape[0], out_channels), x)
    bias = None if bias is None else bias.contiguous()
    args = (unit_stride_rows(x), state.packed_weight(weight, groups), bias, table,
            None if residual is None else unit_stride_rows(residual), state.dilation, groups, ACTIVATIONS[activation])
    if name == "triton":
        torch.ops.hiertcn_fast.causal_conv1d_step_triton_out(*args, state.history, state.position, out)
    else:
        torch.ops.hiertcn_fast.causal_conv1d_step_out(*args, history=state.history, position=state.position, out=out)
    return out


@in_input_dtype
def tcn_step(x, weights, biases, states, *, proj_weights=None, proj_biases=None, context=None, context_weight=None,
             context_proj_weight=None, activation="relu", backend=None):
    """One event through a stack of residual causal-conv layers (the TCN's blocks), updating every layer's
    state in place (inference: no autograd).

    Layer l maps h_l (batch, C_l) to h_{l+1} = act(act(z_l) + r_l) (batch, C_{l+1}), where z_l is the
    causal_conv1d_step of weights[l] (dense: (C_{l+1}, C_l, k_l)) over states[l] (a CausalConvState, which
    fixes k_l and the dilation) plus biases[l] (or None), plus for l = 0 the context term of context
    (batch, ctx) and context_weight (C_1, ctx, k_0); the residual r_l is h_l, or the nn.Linear
    proj_weights[l] (C_{l+1}, C_l) with proj_biases[l] applied to h_l (required where C_{l+1} != C_l); with
    context_proj_weight (C_1, ctx) (with context only), r_0 also adds F.linear(context, context_proj_weight):
    layer 0's residual is then a projection of concat(h_0, context) (HierTCN's first block).
    x: h_0 (batch, C_0); returns h_L. The cpu and cuda backends run the whole stack as one op (on CUDA
    one kernel launch); triton and reference step layer by layer, as do stacks of more than 32 layers. Each
    layer equals causal_conv1d_step with that residual.

    A negative position (a state corrupted or written by hand) is a ValueError on CPU tensors, before any layer
    steps. Device tensors are not read (the host would wait for the device at every step): the row's output is
    NaN; the fused CUDA stack then leaves every layer's state of that row as it was, while layer by layer the
    layers above the bad one step that row with a NaN input.
    """
    # A prepared CPU step for exactly these argument objects (the same TCN stepping the same state) skips the
    # checks below: they passed when it was prepared, and it checks x and the weights' versions itself.
    refuse_inputs_requiring_grad("tcn_step", "the stack's forward (causal_conv1d per layer) over the sequence", x=x,
                                 context=context)
    if forward_ad._current_level >= 0:
        refuse_tangents("tcn_step", x=x, weights=weights, biases=biases, proj_weights=proj_weights,
                        proj_biases=proj_biases, context=context, context_weight=context_weight,
                        context_proj_weight=context_proj_weight)
    entry = prepared_entry(weights, biases, states, proj_weights, proj_biases, context, context_weight,
                           context_proj_weight, activation, backend)
    if entry is not None and not symbolic(x):  # (it reads x's memory directly: not a fake x's)
        out = prepared_tcn_step(entry, x, states, context, context_weight, context_proj_weight)
        if out is not None:
            return out
    check_tensor(x, "x", 2)
    layers = len(weights)
    original_proj = (proj_weights, proj_biases)
    proj_weights = [None] * layers if proj_weights is None else list(proj_weights)
    proj_biases = [None] * layers if proj_biases is None else list(proj_biases)
    if not layers or not (len(biases) == len(states) == len(proj_weights) == len(proj_biases) == layers):
        raise ValueError(f"weights, biases, states, proj_weights and proj_biases need one entry per layer (at "
                         f"least one); got {layers}, {len(biases)}, {len(states)}, {len(proj_weights)} and "
                         f"{len(proj_biases)}")
    check_activation(activation)
    if (context is None) != (context_weight is None):
        raise ValueError("context and context_weight must be given together")
    if context_proj_weight is not None and context is None:
        raise ValueError("context_proj_weight (the residual's projection of the context) is given without context")
    # The kernels read biases as contiguous rows: strided views are copied, and such a step is not prepared for
    # reuse (the copies would not follow later changes of the views).
    strided = any(isinstance(b, torch.Tensor) and not b.is_contiguous() for b in (*biases, *proj_biases))
    if strided:
        biases = [b.contiguous() if isinstance(b, torch.Tensor) else b for b in biases]
        proj_biases = [b.contiguous() if isinstance(b, torch.Tensor) else b for b in proj_biases]
    name = resolve("tcn_step", backend, x.device, x.dtype, CAUSAL_CONV_DTYPES)
    if name in ("cpu", "cuda") and layers <= _MAX_STACK_LAYERS:
        if (name == "cpu" and not strided and _extension.has_tcn_step_plan()
                and not symbolic(x, *(state.history for state in states))):
            out = _prepared_step(x, weights, biases, states, proj_weights, proj_biases, context, context_weight,
                                 context_proj_weight, activation, backend, original_proj)
            if out is not None:
                return out
        plan = _stack_plan(x, weights, biases, states, proj_weights, proj_biases, context, context_weight,
                           context_proj_weight)
        if torch.is_grad_enabled():
            with torch.no_grad():
                return _run_stack_plan(plan, x, states, activation)
        return _run_stack_plan(plan, x, states, activation)
    # Layer by layer (the triton and reference backends, and stacks deeper than the fused kernels take). Every
    # layer is checked before the first one steps, so that a refused layer leaves no layer below it stepped:
    # the stack's checks, then each layer's step checks with its input and residual stood in for by empty
    # tensors of their shapes.
    _check_stack(x, weights, states, proj_weights, proj_biases, context, context_weight, context_proj_weight,
                 biases)
    h_like = x
    for l in range(layers):
        residual_like = h_like
        if proj_weights[l] is not None:
            check_like(proj_weights[l], f"proj_weights[{l}]", x, "x")
            if proj_biases[l] is not None:
                check_tensor(proj_biases[l], f"proj_biases[{l}]", 1)
                check_like(proj_biases[l], f"proj_biases[{l}]", x, "x")
                check_shape(proj_biases[l], f"proj_biases[{l}]", proj_weights[l].shape[:1])
            residual_like = x.new_empty((x.shape[0], proj_weights[l].shape[0]))
        extra = (context, context_weight) if l == 0 else (None, None)
        out_channels = _check_step(h_like, weights[l], states[l], biases[l], 1, *extra, activation, residual_like,
                                   where=f"layer {l}: ")
        # Each layer's step would refuse a negative position, but only after the layers below it stepped (CPU
        # tensors; device ones are not read, see the docstring).
        _check_positions_not_negative(states[l].position, l)
        if name == "triton":  # the same: a strided history or position of layer l, after layer 0 stepped
            _check_kernel_state(h_like, states[l], name, f"states[{l}]")
        h_like = x.new_empty((x.shape[0], out_channels))
    layer_backend = name if name in ("triton", "reference") else backend
    h = x
    with torch.no_grad():  # inference, as the fused stack
        for l in range(layers):
            residual = h if proj_weights[l] is None else F.linear(h, proj_weights[l], proj_biases[l])
            if l == 0 and context_proj_weight is not None:
                residual = residual + F.linear(context, context_proj_weight)
            extra = dict(context=context, context_weight=context_weight) if l == 0 else {}
            h = causal_conv1d_step(h, weights[l], states[l], biases[l], activation=activation, residual=residual,
                                   backend=layer_backend, **extra)
    return h


# hiertcn/causal_conv.h kMaxStackLayers: deeper stacks step layer by layer.
_MAX_STACK_LAYERS = 32


def _check_stack(x, weights, states, proj_weights, proj_biases, context, context_weight, context_proj_weight=None,
                 biases=None):
    """What the fused op cannot tell the user as clearly: the rest (shapes against the states, dtypes) the compiled
    op checks. Devices are checked here: the dispatcher picks the op's kernel by its arguments' devices, so a
    weight or bias on another device (meta included) would be stepped by another kernel, or by none (a fake
    kernel writes nothing, and the output came back uninitialised)."""
    biases = [None] * len(weights) if biases is None else biases
    for l, (weight, state, proj_weight) in enumerate(zip(weights, states, proj_weights)):
        if not isinstance(state, CausalConvState):
            raise TypeError(f"states[{l}] must be a CausalConvState, got {type(state).__name__}")
        # (The fused ops take the dilations as a list of ints: a bool or float one failed in the dispatcher's words,
        # a bool True passed as 1.)
        _check_int(state.kernel_size, f"states[{l}].kernel_size", 1)
        _check_int(state.dilation, f"states[{l}].dilation", 1)
        check_reach(state.kernel_size, state.dilation)
        check_tensor(weight, f"weights[{l}]", 3)
        check_like(weight, f"weights[{l}]", x, "x")
        width = x.shape[-1] if l == 0 else weights[l - 1].shape[0]
        if weight.shape[1] != width:  # (the cpu kernel's own check names its packed copy of the weight)
            source = "x's channels" if l == 0 else f"weights[{l - 1}]'s out_channels"
            raise ValueError(f"weights[{l}] (out_channels, in_channels, k) must have {width} input channels ({source}; "
                             f"the layers of a stack are dense), got shape {tuple(weight.shape)}")
        for name, t in ((f"biases[{l}]", biases[l]), (f"proj_weights[{l}]", proj_weight),
                        (f"proj_biases[{l}]", proj_biases[l])):
            if isinstance(t, torch.Tensor):
                check_like(t, name, x, "x")
        if weight.shape[2] != state.kernel_size:
            raise ValueError(f"weights[{l}] has k={weight.shape[2]} taps but states[{l}] was made for "
                             f"k={state.kernel_size}")
        if proj_weight is None and proj_biases[l] is not None:
            raise ValueError(f"proj_biases[{l}] is given without proj_weights[{l}]")
        if proj_weight is not None:
            check_tensor(proj_weight, f"proj_weights[{l}]", 2)
            check_shape(proj_weight, f"proj_weights[{l}] (out_channels, in_channels)", weight.shape[:2])
        # The dispatcher picks the op's kernel by device: a state on another device (meta included) would
        # otherwise be stepped by the wrong kernel, or by none.
        for name, t in ((f"states[{l}].history", state.history), (f"states[{l}].position", state.position)):
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move the state with .to()")
    _check_states_not_shared(states)
    if context is not None:
        check_tensor(context, "context", 2)
        check_tensor(context_weight, "context_weight", 3)
        check_like(context, "context", x, "x")
        check_like(context_weight, "context_weight", x, "x")
        check_shape(context, "context (batch, ctx_channels)", (x.shape[0], context.shape[1]))
        check_shape(context_weight, "context_weight (out_channels, ctx_channels, k)",
                    (weights[0].shape[0], context.shape[1], weights[0].shape[2]))
    if context_proj_weight is not None:
        check_tensor(context_proj_weight, "context_proj_weight", 2)
        check_like(context_proj_weight, "context_proj_weight", x, "x")
        check_shape(context_proj_weight, "context_proj_weight (out_channels, ctx_channels)",
                    (weights[0].shape[0], context.shape[1]))


def _memory_span(t: torch.Tensor):
    """(storage, first byte, one past the last byte) of the memory t's elements occupy; None when it holds none."""
    if t.numel() == 0:
        return None
    start = t.storage_offset()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    item = t.element_size()
    return t.untyped_storage().data_ptr(), start * item, (start + extent) * item


def _check_states_not_shared(states):
    """Every layer writes its state in place at each step: layers whose histories or positions share memory (one
    state passed for several layers, ``[state] * n``, or views of one tensor that overlap) would overwrite each
    other's, and the backends would each give another wrong answer. Refused, naming the layers."""
    spans = []
    for l, state in enumerate(states):
        for part in ("history", "position"):
            t = getattr(state, part)
            if symbolic(t):
                return
            span = _memory_span(t)
            if span is not None:
                spans.append((*span, f"states[{l}].{part}"))
    spans.sort(key=lambda span: span[:2])
    for (storage, _, end, name), (next_storage, next_start, _, next_name) in zip(spans, spans[1:]):
        if storage == next_storage and next_start < end:
            raise ValueError(f"{name} and {next_name} share memory, but every layer writes its own state in place at "
                             f"each step: give each layer a state of its own (CausalConvState.zeros per layer, or "
                             f"TCN.init_state)")


# The packed weights and projections of the stacks stepped so far, per first weight: a step of a stack whose
# weights are the same tensors, unmodified, packs nothing. Weak on both sides, so a cached stack never keeps
# its weights alive.
_packed_stacks = WeakIdKeyDictionary()  # weakref.WeakKeyDictionary would compare tensors with ==


def _stack_weight_block(out_channels: int, threads: int) -> int:
    """The CPU stack step's column block for a layer of out_channels: the widest of 64, 32 and 16 channels that
    divides out_channels into at least one block per thread (else the narrowest that divides it), so each
    thread steps whole blocks and keeps their weights in its own cache; out_channels (the plain packing) when
    none divides it."""
    dividing = [block for block in (64, 32, 16) if out_channels % block == 0 and block < out_channels]
    for block in dividing:
        if out_channels // block >= threads:
            return block
    return dividing[-1] if dividing else out_channels


def _blocked(packed: torch.Tensor, block: int) -> torch.Tensor:
    """(..., in, out) -> column blocks (out / block, ..., in, block), contiguous (hiertcn/causal_conv.h)."""
    *lead, in_channels, out_channels = packed.shape
    if block == out_channels:
        return packed.contiguous()
    split = packed.reshape(*lead, in_channels, out_channels // block, block)
    return split.movedim(-2, 0).contiguous()


def _pack_stack(weights, proj_weights, device_type, threads):
    packed, projections = [], []
    for w, p in zip(weights, proj_weights):
        # The CUDA kernel takes the plain packing; the CPU one column blocks (see tcn_step_cpu_kernel).
        block = _stack_weight_block(w.shape[0], threads) if device_type == "cpu" else w.shape[0]
        packed.append(_blocked(pack_weight(w.detach(), 1), block))
        projections.append(None if p is None else _blocked(p.detach().t(), block))
    return packed, projections


def _packed_stack(weights, proj_weights, device_type):
    if compiling():  # packed in the graph at every call (the cache is not traceable), with
        return _pack_stack(weights, proj_weights, device_type, 1)  # one thread's blocks (any block is valid)
    sources = (*weights, *proj_weights)
    threads = torch.get_num_threads() if device_type == "cpu" else 0
    versions = (threads, *[None if t is None else _stamp(t) for t in sources])
    entry = _packed_stacks.get(weights[0])
    if entry is not None and entry[1] == versions and all(
            (ref is None and t is None) or (ref is not None and ref() is t) for ref, t in zip(entry[0], sources)):
        return entry[2]
    packed, projections = _pack_stack(weights, proj_weights, device_type, threads)
    entry = (tuple(None if t is None else weakref.ref(t) for t in sources), versions, (packed, projections))
    _packed_stacks[weights[0]] = entry
    return entry[2]


def _stack_plan(x, weights, biases, states, proj_weights, proj_biases, context, context_weight, context_proj_weight):
    """The fused op's arguments: packed weights and projections (cached per stack of weights, repacked when
    one is another tensor or was modified in place, e.g. by an optimiser step), the context table (cached on
    the first layer's state, recomputed when the context changes), the context's residual term (likewise),
    and the stack's checks, run again only
    when the weights, projections, context, states or the states' tensors and sizes are other objects (a state's
    history or position replaced, by one on another device say, went unchecked: the op then ran on it)."""
    # Stored on states[0], which is therefore not in it (no reference cycle: a state is freed with its last use).
    checked = (*weights, *biases, *proj_weights, *proj_biases, context, context_weight, context_proj_weight,
               *states[1:], *[part for state in states for part in (state.history, state.position, state.kernel_size,
                                                                    state.dilation)])
    traced = compiling()  # traced: checked at every call, nothing stored on the state
    # x is not among the objects compared (each step brings a new one): its dtype, device and shape are compared
    # here at every call, so that one unlike the first call's is told as on that call, not in the op's words.
    if x.dtype != weights[0].dtype or x.device != weights[0].device:
        check_like(weights[0], "weights[0]", x, "x")
    if traced or len(states[0]._stack_checked) != len(checked) or not all(
            a is b for a, b in zip(states[0]._stack_checked, checked)):
        _check_stack(x, weights, states, proj_weights, proj_biases, context, context_weight, context_proj_weight,
                     biases)
        for l, state in enumerate(states):  # (the fused op's backend is the device's: cpu or cuda)
            _check_kernel_state(x, state, x.device.type, f"states[{l}]")
        if not traced:
            states[0]._stack_checked = checked
    if x.shape != (states[0].history.shape[0], weights[0].shape[1]):  # (after the stack's checks: they name a
        check_shape(x, "x (batch, in_channels): the states' batch and weights[0]'s input channels",  # weight first)
                    (states[0].history.shape[0], weights[0].shape[1]))
    packed, projections = _packed_stack(weights, proj_weights, x.device.type)
    table, term = _context_inputs(states[0], context, context_weight, context_proj_weight)
    return packed, list(biases), projections, list(proj_biases), table, term, [state.dilation for state in states]


def _context_inputs(state, context, context_weight, context_proj_weight):
    """The stack step's context table and the context's residual term (each None when absent), cached on the
    first layer's state."""
    table = None if context is None else state.cached_context_table(context, context_weight)
    term = None if context_proj_weight is None else state.cached_context_residual(context, context_proj_weight)
    return table, term


def _prepared_key(weights, biases, states, proj_weights, proj_biases, context, context_weight, context_proj_weight):
    """The argument objects a prepared step is valid for (compared by identity). It is kept on states[0], which
    is therefore left out: no reference cycle, so a state is freed with its last use."""
    return (context, context_weight, context_proj_weight, proj_weights is None, proj_biases is None, *weights, *biases,
            *(proj_weights or ()), *(proj_biases or ()), *states[1:], *[state.history for state in states],
            *[state.position for state in states])


def _prepared_mode(activation, backend, states) -> tuple:
    """What a prepared step is valid for besides its argument objects: the activation, the backend asked for,
    the stack's depth, and the weight-cache generation (forget_weight_caches drops it)."""
    return activation, requested_backend(backend), len(states), _generation[0]


def _prepared_step(x, weights, biases, states, proj_weights, proj_biases, context, context_weight,
                   context_proj_weight, activation, backend, original_proj):
    """The CPU step through a prepared plan (csrc/python/tcn_step_plan.cpp). The second call with the same
    argument objects (weights, biases, projections, context and its weight, states and their tensors),
    activation and requested backend prepares one, checked and packed once; later such calls run it first
    thing in tcn_step, without the checks or the dispatcher. None where the op must run instead: a first
    call, changed arguments, or weights modified in place since the plan was made (the op then repacks
    them, and the next call prepares again)."""
    key = _prepared_key(weights, biases, states, *original_proj, context, context_weight, context_proj_weight)
    mode = _prepared_mode(activation, backend, states)
    sources = [t for t in (*weights, *proj_weights) if t is not None]
    if any(t.is_inference() for t in sources):
        return None  # a plan checks its weights' version counters, which inference tensors do not have
    if not _entry_matches(states[0]._prepared, key, mode):
        states[0]._prepared = (key, mode, None)
        return None
    stamps = [_stamp(t) for t in sources]  # before the weights are packed (see _cache_entry)
    packed, biases, projections, proj_biases, table, term, dilations = _stack_plan(
        x, weights, biases, states, proj_weights, proj_biases, context, context_weight, context_proj_weight)
    plan = _extension.module().TcnStepPlan(
        unit_stride_rows(x), packed, biases, projections, proj_biases, table, term, dilations,
        ACTIVATIONS[activation], [state.history for state in states], [state.position for state in states], sources)
    if any(_stamp(t) != stamp for t, stamp in zip(sources, stamps)):
        # A weight was written while this call packed it (another thread): the plan, which took the weights'
        # versions as it was made, may hold the old weights under the new versions. Not kept; the op runs.
        states[0]._prepared = (key, mode, None)
        return None
    entry = (key, mode, plan)
    states[0]._prepared = entry
    return prepared_tcn_step(entry, x, states, context, context_weight, context_proj_weight)


def prepared_entry(weights, biases, states, proj_weights, proj_biases, context, context_weight, context_proj_weight,
                   activation, backend):
    """states[0]'s prepared step if it was made for exactly these argument objects, activation and requested
    backend (what tcn_step checks before running one), else None."""
    entry = states[0]._prepared if states and type(states[0]) is CausalConvState else ()
    if not entry or entry[2] is None:
        return None
    key = _prepared_key(weights, biases, states, proj_weights, proj_biases, context, context_weight,
                        context_proj_weight)
    return entry if _entry_matches(entry, key, _prepared_mode(activation, backend, states)) else None


def _entry_matches(entry, key, mode) -> bool:
    """Whether a states[0]._prepared entry was made for these argument objects (by identity) and this mode."""
    return bool(entry) and entry[1] == mode and len(entry[0]) == len(key) and all(map(operator.is_, entry[0], key))


def prepared_tcn_step(entry, x, states, context, context_weight, context_proj_weight=None):
    """Runs the prepared step of ``entry`` (a states[0]._prepared whose plan is set) on x: its output, or None
    where the plan refused (a weight changed in place), which also drops the plan. For callers that checked
    that the entry belongs to exactly these arguments (tcn_step, TCN.step)."""
    table, term = _context_inputs(states[0], context, context_weight, context_proj_weight)
    try:
        out = entry[2].step(x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous(), table, term)
    except RuntimeError:
        # The plan checks x (dtype, shape, strides) and the context's terms before it steps anything: one it
        # refuses goes the checked way, whose errors name the argument and the fix (the plan is kept).
        return None
    if out is None:  # a weight changed in place: the op repacks, and the next call prepares again
        states[0]._prepared = (entry[0], entry[1], None)
    return out


def _run_stack_plan(plan, x, states, activation):
    packed, biases, projections, proj_biases, table, term, dilations = plan
    out = new_output((x.shape[0], packed[-1].shape[0] * packed[-1].shape[-1] if packed[-1].dim() == 4
                      else packed[-1].shape[2]), x)
    torch.ops.hiertcn_fast.tcn_step_out(unit_stride_rows(x), packed, biases, projections, proj_biases, table, term,
                                        dilations, ACTIVATIONS[activation],
                                        histories=[state.history for state in states],
                                        positions=[state.position for state in states], out=out)
    return out


# ---- registrations -------------------------------------------------------------------------------

@_extension.register_fake("causal_conv1d_out")
def _causal_conv1d_out_fake(x, weight, bias, context_table, residual, dilation, groups, activation, *, out, pre):
    return None


@_extension.register_fake("causal_conv1d_backward_out")
def _causal_conv1d_backward_out_fake(grad_out, x, weight, pre, residual, dilation, groups, activation, *,
                                     grad_pre, grad_x, grad_weight, grad_residual):
    return None


@_extension.register_fake("context_weight_pack_out")
def _context_weight_pack_out_fake(weight, *, out):
    return None


@_extension.register_fake("context_weight_grad_out")
def _context_weight_grad_out_fake(taps, *, out):
    return None


@_extension.register_fake("causal_conv1d_step_out")
def _causal_conv1d_step_out_fake(x, packed_weight, bias, context_table, residual, dilation, groups, activation, *,
                                 history, position, out):
    return None


@_extension.register_fake("tcn_step_out")
def _tcn_step_out_fake(x, packed_weights, biases, proj_weights, proj_biases, context_table, context_residual, dilations,
                       activation, *, histories, positions, out):
    return None


def _check_sign_bits(pre, activation, residual):
    """The triton ops' word for what the C++ ops check (causal_conv_host.h check_pre): pre as uint8 sign bits is
    relu's, and with them the backward reads no residual."""
    if pre is None or pre.dtype != torch.uint8:
        return
    if activation != ACTIVATIONS["relu"]:
        raise RuntimeError(f"pre as uint8 sign bits is for relu only, got activation code {activation}")
    if residual is not None:
        raise RuntimeError("with pre as sign bits the residual is not read: pass None (and grad_residual where the "
                           "forward had a residual)")


@torch.library.triton_op("hiertcn_fast::causal_conv1d_triton_out", mutates_args={"out", "pre"})
def _causal_conv1d_triton_out(x: torch.Tensor, packed_weight: torch.Tensor, bias: Optional[torch.Tensor],
                              context_table: Optional[torch.Tensor], residual: Optional[torch.Tensor], dilation: int,
                              groups: int, activation: int, out: torch.Tensor, pre: Optional[torch.Tensor]) -> None:
    from ..triton import causal_conv as kernels

    _check_sign_bits(pre, activation, None)
    with on_device_of(x):
        kernels.causal_conv_forward(x, packed_weight, bias, context_table, residual, dilation, groups, activation, out,
                                    pre)


@torch.library.triton_op("hiertcn_fast::causal_conv1d_backward_triton_out",
                         mutates_args={"grad_pre", "grad_x", "grad_weight", "grad_residual"})
def _causal_conv1d_backward_triton_out(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                       pre: Optional[torch.Tensor], residual: Optional[torch.Tensor], dilation: int,
                                       groups: int, activation: int, grad_pre: torch.Tensor,
                                       grad_x: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor],
                                       grad_residual: Optional[torch.Tensor]) -> None:
    from ..triton import causal_conv as kernels

    _check_sign_bits(pre, activation, residual)
    with on_device_of(grad_out):
        kernels.causal_conv_backward(grad_out, x, weight, pre, residual, dilation, groups, activation, grad_pre, grad_x,
                                     grad_weight, grad_residual)


@torch.library.triton_op("hiertcn_fast::causal_conv1d_step_triton_out", mutates_args={"history", "position", "out"})
def _causal_conv1d_step_triton_out(x: torch.Tensor, packed_weight: torch.Tensor, bias: Optional[torch.Tensor],
                                   context_table: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                                   dilation: int, groups: int, activation: int, history: torch.Tensor,
                                   position: torch.Tensor, out: torch.Tensor) -> None:
    from ..triton import causal_conv as kernels

    with on_device_of(x):
        kernels.causal_conv_step(x, packed_weight, bias, context_table, residual, dilation, groups, activation, history,
                                 position, out)
