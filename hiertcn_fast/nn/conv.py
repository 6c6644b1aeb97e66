"""Causal convolution modules: CausalConv1d (an nn.Conv1d drop-in for channels-last, causal input),
TemporalBlock (HierTCN's residual block) and TCN (a stack of them with exponentially growing dilation).
Every module runs a whole sequence with forward() and one event at a time with step(), on a state
from init_state(); stepping through a sequence gives forward()'s outputs."""

import math
import operator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._ints import is_int
from ..backends import BackendUnavailableError, requested_backend
from ..ops.conv import (ACTIVATIONS, CausalConvState, causal_conv1d, causal_conv1d_step, check_reach, prepared_entry,
                        prepared_tcn_step, tcn_step, weight_cache_generation)
from ..ops._common import refuse_inputs_requiring_grad, symbolic
from ._autocast import autocast_cast, autocast_dtype


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
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if backend is not None:
            requested_backend(backend)  # a known backend name
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.dilation, self.groups, self.context_channels = dilation, groups, context_channels
        self.activation, self.backend = activation, backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.context_weight = (nn.Parameter(torch.empty(out_channels, context_channels, kernel_size, **factory))
                               if context_channels else None)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv1d's initialisation; the context weight as if its channels were more input channels.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.context_weight is not None:
            nn.init.kaiming_uniform_(self.context_weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size
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
        """A clear word for nn.Conv1d's channels-first layout, which the shape checks would blame on the weight."""
        if (isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] != self.in_channels
                and x.shape[1] == self.in_channels):
            raise ValueError(f"x must be (batch, time, in_channels = {self.in_channels}), channels-last; got shape "
                             f"{tuple(x.shape)}, which looks like nn.Conv1d's (batch, channels, time): pass "
                             f"x.transpose(1, 2)")

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
                # The step runs in the state's dtype under autocast: the projection too, not in autocast's.
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
        channels = list(channels)
        dilations = [2 ** i for i in range(len(channels))] if dilations is None else list(dilations)
        if not channels:
            raise ValueError("channels must list at least one block's output channels")
        if len(dilations) != len(channels):
            raise ValueError(f"dilations must have one entry per block ({len(channels)}), got {len(dilations)}")
        self.context_channels = context_channels
        widths = [in_channels] + channels
        self.blocks = nn.ModuleList(
            TemporalBlock(widths[i], widths[i + 1], kernel_size, dilations[i],
                          context_channels=context_channels if i == 0 else 0, backend=backend, device=device,
                          dtype=dtype)
            for i in range(len(channels)))

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
        # A step runs once per event, and at batch 1 its Python costs as much as the kernel. When this TCN
        # steps this state with the same objects as last time (every module, parameter, state tensor and the
        # context, compared by identity) and the op prepared a step for that call, run it directly: the op
        # would check exactly what it checked then. The prepared step itself refuses to run on parameters
        # modified in place.
        fast = getattr(state, "_fast", None)  # None on a state made before the shortcut existed (unpickled)
        if fast is not None and not symbolic(x_t):  # (the prepared step reads x_t's memory directly)
            key = self._step_objects(state, context)
            if (len(key) == len(fast[0]) and all(map(operator.is_, key, fast[0]))
                    and fast[1] == (requested_backend(key[2].backend), weight_cache_generation())):
                out = prepared_tcn_step(fast[2], x_t, state.layers, context, key[5], key[1])
                if out is not None:
                    return out
            state._fast = None
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
        # A parametrized module (weight_norm, ...) computes its weight on access: no prepared step for it.
        parametrized = any(parametrize.is_parametrized(m) for m in (*convs, *projections, context_projection)
                           if m is not None)
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
        first = convs[0]._context_args(context)
        backend = convs[0].backend
        out = tcn_step(x_t, weights, biases, state.layers, proj_weights=proj_weights, proj_biases=proj_biases,
                       context_proj_weight=context_proj_weight, activation="relu", backend=backend, **first)
        if not torch.compiler.is_compiling() and not parametrized:
            # Shortcut the next call only through a prepared step made for exactly this call's objects (the op
            # may have run another backend and left an older one in place).
            entry = prepared_entry(weights, biases, state.layers, proj_weights, proj_biases, context,
                                   first["context_weight"], context_proj_weight, "relu", backend)
            if entry is not None:
                state._fast = (self._step_objects(state, context), (requested_backend(backend),
                                                                    weight_cache_generation()), entry)
        return out

    def _step_objects(self, state, context):
        """Everything a step's op call is made of, flat: the context and the first block's context projection
        weight, then per block its conv, the conv's weight, bias and context weight and the projection with its
        parameters, then per layer the state with its tensors and prepared step. Index 1 is the context
        projection's weight, index 2 the first conv, index 5 its context weight."""
        blocks = self._modules["blocks"]._modules.values()
        context_projection = next(iter(blocks))._modules.get("context_projection")
        objects = [context, None if context_projection is None else context_projection._parameters.get("weight")]
        add = objects.append
        for block in blocks:
            modules = block._modules
            conv = modules["conv"]
            params = conv._parameters
            add(conv)
            add(params.get("weight"))  # None when parametrized: then no shortcut is armed
            add(params.get("bias"))
            add(params.get("context_weight"))
            projection = modules.get("projection")
            add(projection)
            if projection is not None:
                params = projection._parameters
                add(params["weight"])
                add(params.get("bias"))
        for layer in state.layers:
            add(layer)
            add(layer.history)
            add(layer.position)
            add(layer._prepared)
        return objects
