"""Causal convolution modules: CausalConv1d (an nn.Conv1d drop-in for channels-last, causal input),
TemporalBlock (HierTCN's residual block) and TCN (a stack of them with exponentially growing dilation).
Every module runs a whole sequence with forward() and one event at a time with step(), on a state
from init_state(); stepping through a sequence gives forward()'s outputs."""

import math
import os

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .._ints import is_int
from .._extension import module as module_of_extension
from ..backends import ENV_VAR as BACKEND_ENV_VAR
from ..backends import _selected as selected_backend_var
from ..backends import BackendUnavailableError, compiling, compiling_here, requested_backend, resolve
from ..ops.conv import _context_inputs as context_inputs
from ..ops.conv import _generation as cache_generation
from ..ops.conv import (CAUSAL_CONV_DTYPES, CausalConvState, _stamp, causal_conv1d, causal_conv1d_step,
                        check_activation, check_reach, prepared_entry, tcn_step)
from ..ops._common import refuse_inputs_requiring_grad
from ._autocast import autocast_cast, autocast_dtype


def _recompute_hooked_weights(module) -> bool:
    """torch.nn.utils.weight_norm and spectral_norm (the hook-based ones, which Bai et al.'s TCN code uses) compute
    the weight in a forward pre-hook, and a step is no forward: run those hooks (they read no input) so that the
    step reads the weight forward would. True if the module has one (its weight is then a computed attribute)."""
    hooks = module._forward_pre_hooks
    found = False
    if hooks:
        for hook in list(hooks.values()):
            if isinstance(hook, (WeightNorm, SpectralNorm)):
                hook(module, ())
                found = True
    return found


def _one_int(value, name, minimum):
    """An int argument of nn.Conv1d's constructor, which also takes a 1-tuple; at least ``minimum``. Integers of other
    types (NumPy's) are taken as nn.Conv1d takes them, as a Python int."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not is_int(value):
        raise TypeError(f"{name} must be an int (or a 1-tuple of one), got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _cast(tensors, dtype):
    return [autocast_cast(t, dtype) for t in tensors]


def _check_tensors(**named):
    """Each named argument is a tensor (or None): the modules read x.device, x.requires_grad before the op's checks,
    which would say so, run."""
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_inference(**inputs):
    """step() runs the inference kernels (no autograd): refuse inputs that expect gradients, which would otherwise
    silently get none."""
    refuse_inputs_requiring_grad("step()", "forward() over the sequence", **inputs)


class CausalConv1d(nn.Module):
    """Dilated causal convolution over time, channels-last.

    Constructor as nn.Conv1d, positional arguments included, so an nn.Conv1d state_dict loads unchanged:
    the padding is causal ((k - 1) * dilation zeros before the start), so stride must be 1, padding 0
    (nn.Conv1d's defaults) and padding_mode "zeros"; plus ``context_channels`` (a time-constant input
    concatenated to every step, weight ``context_weight`` (out, ctx, k)) and a fused ``activation``
    (None, "relu", "gelu", "tanh"). kernel_size and dilation are kept as ints.

    forward(x, context=None, residual=None): x (batch, time, in_channels), channels-last (nn.Conv1d's
    input transposed), context (batch, context_channels), residual (batch, time, out_channels) ->
    (batch, time, out_channels). Under torch.autocast it runs in the autocast dtype, as nn.Conv1d does.
    step() is for inference (no autograd), in the state's dtype.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None, *, context_channels=0, activation=None,
                 backend=None):
        super().__init__()
        in_channels, out_channels = _one_int(in_channels, "in_channels", 1), _one_int(out_channels, "out_channels", 1)
        kernel_size, dilation = _one_int(kernel_size, "kernel_size", 1), _one_int(dilation, "dilation", 1)
        groups, context_channels = _one_int(groups, "groups", 1), _one_int(context_channels, "context_channels", 0)
        if _one_int(stride, "stride", 1) != 1:
            raise ValueError(f"stride must be 1 (a causal convolution keeps every step), got {stride}")
        # "valid" is nn.Conv1d's name for no padding, as 0 is.
        if padding not in (0, (0,), [0], "valid") or padding_mode != "zeros":
            raise ValueError(f"the padding is causal, (k - 1) * dilation zeros before the start: padding must be 0 "
                             f"(or 'valid') and padding_mode 'zeros' (nn.Conv1d's defaults), got {padding!r} and "
                             f"{padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups ({groups}) must divide in_channels ({in_channels}) and out_channels "
                             f"({out_channels})")
        check_reach(kernel_size, dilation)
        check_activation(activation)
        if backend is not None:
            requested_backend(backend)  # a known backend name
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.dilation, self.groups, self.context_channels = dilation, groups, context_channels
        self.activation, self.backend = activation, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, **factory))
        # Registered when absent too, as nn.Conv1d does: assigning a plain tensor is then refused, not kept as an
        # attribute that forward would read and the step would not.
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels, **factory)) if bias else None)
        self.register_parameter("context_weight", nn.Parameter(torch.empty(out_channels, context_channels,
                                                                            kernel_size, **factory))
                                if context_channels else None)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv1d's initialisation of the one conv over concat(x, context) that the layer computes, fan_in =
        # (in_channels / groups + context_channels) * kernel_size: the weights by kaiming_uniform_(a=sqrt(5))'s
        # bound, computed as it computes it (without context the draws equal nn.Conv1d's bit for bit), the bias
        # within 1 / sqrt(fan_in).
        fan_in = (self.weight.shape[1] + self.context_channels) * self.kernel_size
        if fan_in:
            bound = math.sqrt(3.0) * (nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in))
            for parameter in (self.weight, self.context_weight):
                if parameter is not None:
                    nn.init.uniform_(parameter, -bound, bound)
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def receptive_field(self) -> int:
        """Steps each output depends on: (k - 1) * dilation + 1."""
        return (self.kernel_size - 1) * self.dilation + 1

    def _context_args(self, context):
        if (context is None) != (self.context_weight is None):
            raise ValueError(f"this layer has context_channels={self.context_channels}: pass context exactly when "
                             f"it is nonzero")
        if context is not None and isinstance(context, torch.Tensor) and (
                context.dim() != 2 or context.shape[1] != self.context_channels):
            raise ValueError(f"context must be (batch, context_channels = {self.context_channels}), got shape "
                             f"{tuple(context.shape)}")
        return dict(context=context, context_weight=self.context_weight)

    def _check_step_input(self, x_t, state):
        """x_t must be (the state's batch, in_channels) in the state's dtype (autocast aside): said in the step's
        words, where the op would name its packed weights or the state's history."""
        if not isinstance(x_t, torch.Tensor) or not isinstance(state, CausalConvState):
            return  # the op says what is wrong
        batch = state.history.shape[0]
        if x_t.dim() != 2 or x_t.shape != (batch, self.in_channels):
            raise ValueError(f"x_t must be (batch, in_channels) = ({batch}, {self.in_channels}) for this layer and "
                             f"a state of {batch} rows, got shape {tuple(x_t.shape)}")
        if x_t.dtype != state.history.dtype and autocast_dtype(x_t.device.type) is None:
            raise TypeError(f"x_t has dtype {x_t.dtype} but the state holds {state.history.dtype}: the step runs "
                            f"in the state's dtype (make the state with init_state(batch, dtype=...), or convert "
                            f"x_t)")

    def _check_layout(self, x):
        """x's width, in the module's words (the op's shape checks would blame it on the weight), with a clear word
        for nn.Conv1d's channels-first layout."""
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] != self.in_channels:
            if x.shape[1] == self.in_channels:
                raise ValueError(f"x must be (batch, time, in_channels = {self.in_channels}), channels-last; got shape "
                                 f"{tuple(x.shape)}, which looks like nn.Conv1d's (batch, channels, time): pass "
                                 f"x.transpose(1, 2)")
            raise ValueError(f"x must be (batch, time, in_channels = {self.in_channels}), got shape {tuple(x.shape)}: "
                             f"{x.shape[-1]} channels where this layer takes {self.in_channels}")

    def forward(self, x, context=None, residual=None):
        _check_tensors(x=x, context=context, residual=residual)
        self._check_layout(x)
        args = self._context_args(context)
        weight, bias, context_weight = self.weight, self.bias, args["context_weight"]
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:
            if x.device.type == "cpu" and requested_backend(self.backend) == "cpu" and x.dtype != torch.float64:
                raise BackendUnavailableError(
                    f"{type(self).__name__}(backend='cpu') under torch.autocast runs in {dtype}, as nn.Conv1d does, "
                    f"and the cpu backend has no {dtype} kernels: use backend=None (auto) for the autocast "
                    f"region, or run this module outside it")
            x, context, residual, weight, bias, context_weight = _cast(
                (x, context, residual, weight, bias, context_weight), dtype)
        return causal_conv1d(x, weight, bias, dilation=self.dilation, groups=self.groups, activation=self.activation,
                             residual=residual, backend=self.backend, context=context, context_weight=context_weight)

    def init_state(self, batch, *, device=None, dtype=None) -> CausalConvState:
        """A fresh state for ``batch`` rows (on the parameters' device and dtype unless given)."""
        return CausalConvState.zeros(batch, self.in_channels, self.kernel_size, self.dilation,
                                     dtype=dtype if dtype is not None else self.weight.dtype,
                                     device=device if device is not None else self.weight.device)

    def _check_state(self, state, what="state"):
        if isinstance(state, CausalConvState) and state.dilation != self.dilation:
            raise ValueError(f"{what} was made for dilation {state.dilation} but this layer has dilation "
                             f"{self.dilation}: make it with this layer's init_state()")

    def step(self, x_t, state, context=None, residual=None):
        """x_t (batch, in_channels) -> (batch, out_channels); advances ``state`` by one step. For inference:
        no autograd; runs in the state's dtype (under autocast too)."""
        _check_tensors(x_t=x_t, context=context, residual=residual)
        _check_inference(x_t=x_t, context=context, residual=residual)
        self._check_state(state)
        self._check_step_input(x_t, state)
        return self._checked_step(x_t, state, context, residual)

    def _checked_step(self, x_t, state, context, residual):
        """step() after its module-level checks (TemporalBlock.step makes them before its projection)."""
        if isinstance(state, CausalConvState) and autocast_dtype(x_t.device.type) is not None:
            x_t, context, residual = _cast((x_t, context, residual), state.history.dtype)
        _recompute_hooked_weights(self)
        return causal_conv1d_step(x_t, self.weight, state, self.bias, groups=self.groups, activation=self.activation,
                                  residual=residual, backend=self.backend, **self._context_args(context))

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")
        if self.context_channels:
            text += f", context_channels={self.context_channels}"
        return text + (f", activation={self.activation!r}" if self.activation else "")


class TemporalBlock(nn.Module):
    """HierTCN's residual block: out = relu(relu(conv(x) + bias + context term) + residual).

    The residual is the block's input: x, or a linear projection of x when the channel counts differ. With
    context (context_channels > 0) the block's input is concat(x, context) at every step, as in the official
    HierTCN, whose first block maps 384 inputs (item embedding and user state) to 128 channels: the residual
    is then always a linear projection of that concatenation, held as ``projection`` (nn.Linear over x, with
    the bias) and ``context_projection`` (nn.Linear over the context, no bias), so that neither the
    concatenation nor its per-step product is ever made. Both are initialised as the one nn.Linear of
    in_channels + context_channels inputs would be.

    forward(x, context=None): x (batch, time, in_channels) -> (batch, time, out_channels).
    """

    def __init__(self, in_channels, out_channels, kernel_size=5, dilation=1, *, context_channels=0, backend=None,
                 device=None, dtype=None):
        super().__init__()
        self.conv = CausalConv1d(in_channels, out_channels, kernel_size, dilation=dilation,
                                 context_channels=context_channels, activation="relu", backend=backend, device=device,
                                 dtype=dtype)
        factory = dict(device=device, dtype=dtype)
        # The widths as the conv took them: Python ints (a NumPy integer argument is converted, as everywhere).
        conv = self.conv
        in_channels, out_channels, context_channels = conv.in_channels, conv.out_channels, conv.context_channels
        self.projection = (nn.Linear(in_channels, out_channels, **factory)
                           if in_channels != out_channels or context_channels else None)
        self.context_projection = (nn.Linear(context_channels, out_channels, bias=False, **factory)
                                   if context_channels else None)
        if self.context_projection is not None:
            self._reset_concat_projection()

    # State dicts of version 1 (before the residual projected the context; also those without version metadata,
    # as torch's own modules read them) load as the same function: the missing context projection is zero, and a
    # missing projection of equal widths (the identity residual then) is the identity.
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.context_projection is not None and (local_metadata or {}).get("version", 1) < 2:
            # Only a whole version-1 block (every entry this block has but the projections version 2 added) is
            # completed: a partial dict (strict=False) must not have trained projections replaced unreported.
            weight = self.context_projection.weight
            identity = weight.shape[0] == self.projection.in_features  # version 1 had no projection then
            added = ("context_projection.", "projection.") if identity else ("context_projection.",)
            whole = all(prefix + key in state_dict for key in self.state_dict() if not key.startswith(added))
            if whole and prefix + "context_projection.weight" not in state_dict:
                state_dict[prefix + "context_projection.weight"] = torch.zeros_like(weight)
                if prefix + "projection.weight" not in state_dict and identity:
                    state_dict[prefix + "projection.weight"] = torch.eye(weight.shape[0], dtype=weight.dtype,
                                                                         device=weight.device)
                    state_dict[prefix + "projection.bias"] = torch.zeros_like(self.projection.bias)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _reset_concat_projection(self):
        """nn.Linear's initialisation for in_channels + context_channels inputs, split between the parts."""
        weight = torch.empty(self.projection.out_features,
                             self.projection.in_features + self.context_projection.in_features,
                             device=self.projection.weight.device, dtype=self.projection.weight.dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(weight.shape[1])
        with torch.no_grad():
            self.projection.weight.copy_(weight[:, :self.projection.in_features])
            self.context_projection.weight.copy_(weight[:, self.projection.in_features:])
            nn.init.uniform_(self.projection.bias, -bound, bound)

    def reset_parameters(self):
        self.conv.reset_parameters()
        if self.context_projection is not None:
            self._reset_concat_projection()
        elif self.projection is not None:
            self.projection.reset_parameters()

    def _residual(self, x, context=None):
        """x's residual (x: (batch, time, in) or one step's (batch, in)), with the context's term when this block
        has context."""
        if self.projection is None:
            return x
        residual = self.projection(x)
        if self.context_projection is not None and context is not None:
            term = self.context_projection(context)
            residual = residual + (term.unsqueeze(1) if x.dim() == 3 else term)
        return residual

    def _check_projected(self, x, context, name):
        """What the conv's op would check of x and the context, before the projections read them (nn.Linear would
        fail naming neither): the context's rank, width, batch, device and dtype, and a projected x's width and
        dtype. (Under autocast the dtypes may differ: both are cast.)"""
        self.conv._context_args(context)
        if self.projection is not None and x.dim() >= 1 and x.shape[-1] != self.projection.in_features:
            raise ValueError(f"{name} must have in_channels = {self.projection.in_features} in its last dimension, "
                             f"got shape {tuple(x.shape)}")
        plain = autocast_dtype(x.device.type) is None
        if self.projection is not None and plain and x.dtype != self.projection.weight.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but this block's parameters have "
                            f"{self.projection.weight.dtype}; use one dtype")
        if context is not None and x.dim() >= 1:
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context (batch, context_channels) must have {name}'s batch {x.shape[0]}, got shape "
                                 f"{tuple(context.shape)}")
            if context.device != x.device:
                raise ValueError(f"context is on {context.device} but {name} is on {x.device}; move them to one "
                                 f"device")
            if plain and context.dtype != x.dtype:
                raise TypeError(f"context has dtype {context.dtype} but {name} has {x.dtype}; use one dtype")

    def forward(self, x, context=None):
        _check_tensors(x=x, context=context)
        if x.dim() != 3:  # (first: the context's check below would blame the context for an unbatched x)
            raise ValueError(f"x must be 3-D (batch, time, in_channels = {self.conv.in_channels}), got shape "
                             f"{tuple(x.shape)}")
        self.conv._check_layout(x)
        self._check_projected(x, context, "x")  # before the projection reads them
        return self.conv(x, context, residual=self._residual(x, context))

    def init_state(self, batch, **kwargs) -> CausalConvState:
        return self.conv.init_state(batch, **kwargs)

    def step(self, x_t, state, context=None):
        """x_t (batch, in_channels) -> (batch, out_channels); advances ``state`` by one step (inference: no
        autograd)."""
        _check_tensors(x_t=x_t, context=context)
        _check_inference(x_t=x_t, context=context)
        self.conv._check_state(state)
        self.conv._check_step_input(x_t, state)
        self._check_projected(x_t, context, "x_t")
        with torch.no_grad():  # the projection's parameters require grad; the step records none
            if isinstance(state, CausalConvState) and autocast_dtype(x_t.device.type) is not None:
                # The step runs in the state's dtype under autocast: the projection too, not in autocast's. A state
                # of another dtype than the parameters' is refused as the conv's step refuses it (nn.Linear failed
                # on it first, with its own words).
                for module in (self.projection, self.context_projection):
                    if module is not None and module.weight.dtype != state.history.dtype:
                        raise TypeError(f"weight has dtype {module.weight.dtype} but the state holds "
                                        f"{state.history.dtype}; use one dtype")
                x_t, context = _cast((x_t, context), state.history.dtype)
                with torch.autocast(x_t.device.type, enabled=False):
                    residual = self._residual(x_t, context)
            else:
                residual = self._residual(x_t, context)
        return self.conv._checked_step(x_t, state, context, residual)


class TCNState:
    """The per-layer CausalConvStates of a TCN, stepped together; rows reset together across layers."""

    def __init__(self, layers):
        self.layers = list(layers)
        # TCN.step's shortcut: (the objects its last op call was made of, the backend requested, the op's
        # prepared step it ran) or None.
        self._fast = None

    def reset(self, rows=None):
        """Start a new sequence in ``rows`` (a (batch,) bool mask or index tensor; None: every row)."""
        for layer in self.layers:
            layer.reset(rows)

    # Copies (copy.deepcopy, pickle, torch.save) keep the layers' states, not the shortcut (see CausalConvState).
    def __getstate__(self):
        return {"layers": self.layers}

    def __setstate__(self, state):
        self.__init__(state["layers"])

    def to(self, device=None, dtype=None) -> "TCNState":
        return TCNState(layer.to(device, dtype) for layer in self.layers)


class TCN(nn.Module):
    """A stack of TemporalBlocks, block i with dilation dilations[i] (default 2**i).

    ``channels`` lists each block's output channels; context (batch, context_channels), when the TCN
    has context_channels, enters the first block at every step (HierTCN's user state).
    forward(x, context=None): x (batch, time, in_channels) -> (batch, time, channels[-1]), under
    torch.autocast in the autocast dtype. step() is for inference (no autograd), in the state's dtype.
    """

    def __init__(self, in_channels, channels, kernel_size=5, dilations=None, context_channels=0, *, backend=None,
                 device=None, dtype=None):
        super().__init__()
        for name, value, example in (("channels", channels, "[64, 64, 64]"), ("dilations", dilations, "[1, 2, 4]")):
            if value is not None and (isinstance(value, (str, bytes, torch.Tensor)) or not hasattr(value, "__iter__")):
                raise TypeError(f"{name} must be a sequence with one int per block (e.g. {example}), got "
                                f"{type(value).__name__} {value!r}")
        channels = list(channels)
        dilations = [2 ** i for i in range(len(channels))] if dilations is None else list(dilations)
        if not channels:
            raise ValueError("channels must list at least one block's output channels")
        if len(dilations) != len(channels):
            raise ValueError(f"dilations must have one entry per block ({len(channels)}), got {len(dilations)}")
        widths = [in_channels] + channels
        self.blocks = nn.ModuleList(
            TemporalBlock(widths[i], widths[i + 1], kernel_size, dilations[i],
                          context_channels=context_channels if i == 0 else 0, backend=backend, device=device,
                          dtype=dtype)
            for i in range(len(channels)))
        self.context_channels = self.blocks[0].conv.context_channels  # checked there, and a Python int

    @property
    def receptive_field(self) -> int:
        return 1 + sum(block.conv.receptive_field - 1 for block in self.blocks)

    def forward(self, x, context=None):
        _check_tensors(x=x, context=context)
        for i, block in enumerate(self.blocks):
            x = block(x, context if i == 0 else None)
        return x

    def init_state(self, batch, **kwargs) -> TCNState:
        """A fresh state for ``batch`` rows (device and dtype: the parameters', unless given)."""
        return TCNState(block.init_state(batch, **kwargs) for block in self.blocks)

    def step(self, x_t, state, context=None):
        """One event per row: x_t (batch, in_channels) -> (batch, channels[-1]); advances every layer of
        ``state``. On the cpu and cuda backends the whole stack is one op (one CUDA launch): ops.tcn_step."""
        if not isinstance(state, TCNState):
            raise TypeError(f"state must be a TCNState (from TCN.init_state), got {type(state).__name__}")
        # A step runs once per event, and at batch 1 its Python costs as much as the kernel. When the last call
        # with this state prepared a step (on the cpu backend), a compiled guard checks that this call is made of
        # the same objects (this TCN's modules, parameters and attributes, the state's layers and tensors, the
        # context, the backend asked for) and that x_t is what that step takes, and runs it; where anything
        # differs it returns None and the full path below runs, checks and all. (See _fast_step; dynamo traces
        # the full path.)
        # (It stays in place until a full path completes: a bad input's error leaves it for the next good one.)
        fast = getattr(state, "_fast", None)  # None on a state made before the shortcut existed (unpickled)
        # (Not under forward-mode AD, whose dual inputs the shortcut cannot see: tcn_step refuses them.)
        if (fast is not None and not (torch.compiler.is_compiling() and compiling_here())
                and forward_ad._current_level < 0):
            out = fast.step(self, x_t, state, context)
            if out is not None:
                return out
        if not isinstance(x_t, torch.Tensor) or not (context is None or isinstance(context, torch.Tensor)):
            _check_tensors(x_t=x_t, context=context)
        if x_t.requires_grad or (context is not None and context.requires_grad):
            _check_inference(x_t=x_t, context=context)
        # Under autocast the input may come in the autocast dtype: the step runs in the state's dtype. (The dtype
        # is compared first: this runs once per event, and the autocast query costs more.)
        if state.layers and (x_t.dtype != state.layers[0].history.dtype
                             or (context is not None and context.dtype != state.layers[0].history.dtype)):
            if autocast_dtype(x_t.device.type) is not None:
                x_t, context = _cast((x_t, context), state.layers[0].history.dtype)
        blocks = self._modules["blocks"]._modules.values()
        if len(state.layers) != len(blocks):
            raise ValueError(f"state has {len(state.layers)} layers but this TCN has {len(blocks)} blocks")
        # The parameters are read from the modules' dicts, not through nn.Module.__getattr__, which costs a
        # microsecond per lookup.
        convs = [block._modules["conv"] for block in blocks]
        for i, (conv, layer) in enumerate(zip(convs, state.layers)):
            conv._check_state(layer, f"state.layers[{i}]")
        if convs:
            convs[0]._check_step_input(x_t, state.layers[0])
        projections = [block._modules.get("projection") for block in blocks]
        context_projection = next(iter(blocks))._modules.get("context_projection")
        # A parametrized module (weight_norm, ...) computes its weight on access, a hook-based one (the older
        # weight_norm, spectral_norm) in its forward pre-hook, run here: no prepared step for either.
        modules = [m for m in (*convs, *projections, context_projection) if m is not None]
        hooked = [_recompute_hooked_weights(m) for m in modules]
        parametrized = any(hooked) or any(parametrize.is_parametrized(m) for m in modules)
        if parametrized:
            weights, biases = [conv.weight for conv in convs], [conv.bias for conv in convs]
            proj_weights = [None if p is None else p.weight for p in projections]
            proj_biases = [None if p is None else p.bias for p in projections]
            context_proj_weight = None if context_projection is None else context_projection.weight
        else:
            params = [conv._parameters for conv in convs]
            projections = [None if p is None else p._parameters for p in projections]
            weights, biases = [p["weight"] for p in params], [p.get("bias") for p in params]
            proj_weights = [None if p is None else p["weight"] for p in projections]
            proj_biases = [None if p is None else p.get("bias") for p in projections]
            context_proj_weight = None if context_projection is None else context_projection._parameters["weight"]
        if any(conv.backend != convs[0].backend for conv in convs):
            return self._step_block_by_block(x_t, state, context, list(blocks), convs)
        first = convs[0]._context_args(context)
        backend = convs[0].backend
        out = tcn_step(x_t, weights, biases, state.layers, proj_weights=proj_weights, proj_biases=proj_biases,
                       context_proj_weight=context_proj_weight, activation="relu", backend=backend, **first)
        if not compiling():
            # Shortcut the next call only through a prepared step made for exactly this call's objects (the op
            # may have run another backend and left an older one in place). The weight-cache generation the
            # shortcut compares is read before the prepared step is looked up: a forget_weight_caches() in between
            # (another thread) then fails the shortcut's check, instead of passing it with a forgotten plan.
            generation = tuple(cache_generation)
            entry = None if parametrized else prepared_entry(weights, biases, state.layers, proj_weights, proj_biases,
                                                             context, first["context_weight"], context_proj_weight,
                                                             "relu", backend)
            state._fast = (None if entry is None
                           else self._fast_step(state, context, entry, first["context_weight"], context_proj_weight,
                                                generation))
        return out

    def _step_block_by_block(self, x_t, state, context, blocks, convs):
        """A step of a TCN whose blocks ask for different backends, each block on its own (as forward runs them; the
        stack's one op ran all of them on the first block's). Every block's backend is resolved first, so that one
        that cannot run refuses the call before any layer has stepped."""
        for conv in convs:
            resolve("causal_conv1d_step", conv.backend, x_t.device, state.layers[0].history.dtype, CAUSAL_CONV_DTYPES)
        state._fast = None
        h = x_t
        for i, (block, layer) in enumerate(zip(blocks, state.layers)):
            h = block.step(h, layer, context if i == 0 else None)
        return h

    # What the guard of the shortcut reads of each module: its parameters, and the plain attributes a step reads.
    _GUARDED_PARAMETERS = ("weight", "bias", "context_weight")
    _GUARDED_ATTRIBUTES = ("backend", "dilation", "in_channels", "context_channels")

    def _fast_step(self, state, context, entry, context_weight, context_proj_weight, generation):
        """The shortcut of the next step made of this step's objects (csrc/python/tcn_step_plan.cpp, TcnFastStep):
        identity checks of everything this call read, from this TCN and the state down (each module's __dict__,
        its _modules and _parameters and the items the step used, the plain attributes it read, the state's
        layers with their tensors and prepared step), the context, the backend asked for (the conv's attribute,
        a use_backend block, the environment) and the weight-cache generation; and the prepared step with the
        context's cached table and residual term. None where no shortcut applies (an extension without it, an
        inference-mode context or weight, whose cached terms are recomputed at every use)."""
        extension = module_of_extension()
        fast_step = getattr(extension, "TcnFastStep", None)
        sources = [] if context is None else [context, context_weight]
        if context_proj_weight is not None:
            sources.append(context_proj_weight)
        if fast_step is None or any(t.is_inference() for t in sources):
            return None
        checks = [("arg", 0, self), ("arg", 2, context)]

        def guard_module(module, names=("_modules", "_parameters"), attributes=()):
            attrs = module.__dict__
            checks.append(("dict_of", module, attrs))
            for name in (*names, *attributes):
                checks.append(("item", attrs, name, attrs.get(name)))
            return attrs

        modules = guard_module(self, ("_modules",))["_modules"]
        checks.append(("item", modules, "blocks", modules["blocks"]))
        blocks = guard_module(modules["blocks"], ("_modules",))["_modules"]
        checks.append(("values", blocks, tuple(blocks.values())))
        for i, block in enumerate(blocks.values()):
            children = guard_module(block, ("_modules",))["_modules"]
            for name in ("conv", "projection", "context_projection"):
                child = children.get(name)
                checks.append(("item", children, name, child))
                if child is None or (name == "context_projection" and i > 0):
                    continue
                params = guard_module(child, ("_modules", "_parameters"),
                                      self._GUARDED_ATTRIBUTES if name == "conv" else ())["_parameters"]
                checks.extend(("item", params, p, params.get(p)) for p in self._GUARDED_PARAMETERS)
        layers = state.layers
        checks.append(("arg_item", 1, "layers", layers))
        if type(layers) is not list:
            return None
        checks.append(("list", layers, tuple(layers)))
        for layer in layers:
            attrs = layer.__dict__
            checks.append(("dict_of", layer, attrs))
            checks.extend(("item", attrs, name, attrs.get(name)) for name in ("history", "position", "dilation",
                                                                                "_prepared"))
        checks.append(("env", BACKEND_ENV_VAR, os.environ.get(BACKEND_ENV_VAR)))
        checks.append(("context_var", selected_backend_var, selected_backend_var.get()))
        checks.append(("list", cache_generation, generation))
        stamps = [_stamp(t) for t in sources]  # before the table and term are read (see ops.conv._cache_entry)
        table, term = context_inputs(layers[0], context, context_weight, context_proj_weight)
        fast = fast_step(checks, entry[2], torch.Tensor, table, term, sources)
        # A context tensor written meanwhile (another thread) may have left the table of its old values under the
        # new version, which the shortcut took as it was made: no shortcut then.
        return fast if all(_stamp(t) == stamp for t, stamp in zip(sources, stamps)) else None
