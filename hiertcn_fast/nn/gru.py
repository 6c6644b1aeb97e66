"""Drop-ins for torch.nn.GRUCell and torch.nn.GRU on hiertcn_fast's GRU ops.

They subclass the torch.nn modules, so the constructor arguments, parameter names (weight_ih_l0, ...),
initialisation and state_dicts are exactly torch's; only forward runs on hiertcn_fast.ops.
"""

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .._ints import is_int
from ..backends import default_kernel, dispatches_like, requested_backend
from ..ops import gru, gru_cell
from ..ops.gru import GRU_DTYPES
from ._autocast import autocast_cast as _autocast_cast, rnn_autocast_dtype as _autocast_dtype


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_input_size(input, input_size):
    if input.shape[-1] != input_size:
        raise ValueError(f"input.size(-1) must be equal to input_size. Expected {input_size}, got {input.shape[-1]}")


class DtypeMismatchError(TypeError, ValueError):
    """An input's dtype differs from the parameters' (or hx's from the input's). A TypeError, as this package's
    dtype errors are, and a ValueError, as torch.nn.GRU's is, so code written for either catches it."""


def _check_dtypes_and_devices(module, x, h, weight):
    """x, h (or None) and the weights as they go to the op: one dtype and one device, else an error that
    names input and hx (the op only knows x, h and weights[i])."""
    if x.dtype != weight.dtype:
        fix = (f"Convert the input: input.to({weight.dtype}), or the module: module.to({x.dtype})"
               if x.dtype.is_floating_point else f"The input must be floating point: input.to({weight.dtype})")
        raise DtypeMismatchError(f"{type(module).__name__}: input dtype ({x.dtype}) does not match the parameters' "
                                 f"dtype ({weight.dtype}). {fix}")
    if h is not None and h.dtype != x.dtype:
        raise DtypeMismatchError(f"{type(module).__name__}: hx has dtype {h.dtype} but input has {x.dtype}")
    device = x.device
    if device != weight.device:
        raise ValueError(f"{type(module).__name__}: input is on {device} but the parameters are on "
                         f"{weight.device}")
    if h is not None and h.device != device:
        raise ValueError(f"{type(module).__name__}: hx is on {h.device} but input is on {device}")


def _refuse_bool_sizes(**sizes):
    for name, value in sizes.items():
        if isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, not a bool ({value!r})")


def _cell_weights(cell):
    """(weight_ih, weight_hh, bias_ih, bias_hh) of a GRUCell, from its _parameters where all are there (a dict read
    each, where an attribute read goes through nn.Module.__getattr__), else as attributes: a parametrized weight, or
    one under the hook-based weight_norm, is computed on access or by a pre-hook and is not in _parameters."""
    params = cell._parameters
    w_ih, w_hh = params.get("weight_ih"), params.get("weight_hh")
    b_ih, b_hh = (params.get("bias_ih"), params.get("bias_hh")) if cell.bias else (None, None)
    if w_ih is None or w_hh is None or (cell.bias and (b_ih is None or b_hh is None)):
        return cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    return w_ih, w_hh, b_ih, b_hh


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell on hiertcn_fast.ops.gru_cell.

    input (batch, input_size) or (input_size,), hx (batch, hidden_size) or (hidden_size,) or None (zeros)
    -> (batch, hidden_size) or (hidden_size,). ``backend`` picks the op backend (None: the usual selection).

    Under torch.autocast it runs as torch's GRUCell does: on CUDA the input, hx and the weights in the
    autocast dtype, so the output has that dtype; on the CPU (whose autocast does not cast RNNs to its dtype)
    in hx's dtype, or the input's without hx. Gradients reach the float32 parameters.
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, backend=None):
        # (torch.nn.GRUCell would keep a NumPy size as it came, and a bool; the package keeps Python ints)
        _refuse_bool_sizes(input_size=input_size, hidden_size=hidden_size)
        input_size, hidden_size = (int(v) if is_int(v) else v for v in (input_size, hidden_size))
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        if backend is not None:
            requested_backend(backend)  # a known backend name, said now rather than at the first forward
        self.backend = backend

    def forward(self, input, hx=None):
        # The common call (batched, default backend, hx given or zeros) goes straight to the kernel, which checks
        # what it is given; the module's own sizes are compared here. Anything else, or anything the kernel
        # refuses, takes the path below, whose checks say what is wrong as torch.nn.GRUCell would.
        if (self.backend is None and isinstance(input, torch.Tensor) and input.dim() == 2
                and input.shape[1] == self.input_size
                and (hx is None or (isinstance(hx, torch.Tensor) and hx.dim() == 2 and hx.shape[0] == input.shape[0]
                                    and hx.shape[1] == self.hidden_size))
                and default_kernel("gru_cell", input, GRU_DTYPES)):
            w_ih, w_hh, b_ih, b_hh = _cell_weights(self)
            if (input.dtype == w_ih.dtype and (hx is None or hx.dtype == input.dtype)
                    and dispatches_like(input, hx, w_ih, w_hh, b_ih, b_hh)):
                h = input.new_zeros(input.shape[0], self.hidden_size) if hx is None else hx
                try:
                    return torch.ops.hiertcn_fast.gru_cell.default(input, h, w_ih, w_hh, b_ih, b_hh)
                except Exception:  # (a device apart, a weight replaced by one of another shape): said below
                    pass
        return self._forward_checked(input, hx)

    def _forward_checked(self, input, hx):
        _check_tensor(input, "input")
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: expected input to be 1-D or 2-D, got {input.dim()}-D")
        _check_input_size(input, self.input_size)
        batched = input.dim() == 2
        if hx is not None:
            _check_tensor(hx, "hx")
            expected = (input.shape[0], self.hidden_size) if batched else (self.hidden_size,)
            if hx.shape != expected:
                layout = "batched 2-D input, hx (batch, hidden_size)" if batched else \
                    "unbatched 1-D input, hx (hidden_size,)"
                raise ValueError(f"GRUCell: for {layout} must have shape {expected}, got {tuple(hx.shape)} "
                                 f"(input is of shape {tuple(input.shape)})")
        x = input if batched else input.unsqueeze(0)
        h = hx if hx is None or batched else hx.unsqueeze(0)
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        autocast_dtype = _autocast_dtype(x, h, self.weight_ih)
        if autocast_dtype is None:
            _check_dtypes_and_devices(self, x, h, self.weight_ih)
            out = self._cell(x, h, weights)
        else:
            x, h, *weights = (_autocast_cast(t, autocast_dtype) for t in (x, h, *weights))
            _check_dtypes_and_devices(self, x, h, weights[0])
            # The arguments are cast already; inside the op nothing may be cast again (torch's policy).
            with torch.autocast(x.device.type, enabled=False):
                out = self._cell(x, h, weights)
        return out if batched else out.squeeze(0)

    def _cell(self, x, h, weights):
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        return gru_cell(x, h, *weights, backend=self.backend)


class GRU(torch.nn.GRU):
    """torch.nn.GRU on hiertcn_fast.ops.gru; ``step()`` advances it by one time step.

    Same arguments as torch.nn.GRU (bidirectional=True is not supported). batch_first=True is the
    ops' native layout; with batch_first=False input and output are transposed around the op.
    forward(input (batch, time, input_size) if batch_first else (time, batch, input_size), or
    unbatched (time, input_size), or a PackedSequence; hx (num_layers, batch, hidden_size), or
    (num_layers, hidden_size) for unbatched input, or None (zeros)) -> (output, h_n), as torch.nn.GRU:
    for a PackedSequence, output is a PackedSequence and h_n holds each sequence's state after its own
    last element.

    Under torch.autocast it runs as torch's GRU does: on CUDA the input, hx and the weights in the autocast
    dtype, so output and h_n have that dtype; on the CPU (whose autocast does not cast RNNs to its dtype) in
    hx's dtype, or the input's without hx. Gradients reach the float32 parameters.

    torch.compile(fullgraph=True) of the module needs ``torch._dynamo.config.allow_rnn = True``, as for
    torch.nn.GRU (Dynamo refuses every GRU subclass otherwise; the ops compile without it).
    torch.jit.script is not supported (the ops are Python); torch.jit.trace is.
    """

    def __init__(self, *args, backend=None, **kwargs):
        # Sizes may be NumPy integers, as everywhere in the package (torch.nn.GRU itself takes only Python's), but
        # not bools (which torch.nn.GRU keeps as sizes); bias, batch_first and bidirectional are bools.
        sizes = ("input_size", "hidden_size", "num_layers")
        _refuse_bool_sizes(**dict(zip(sizes, args)), **{k: v for k, v in kwargs.items() if k in sizes})
        args = tuple(int(a) if is_int(a) else a for a in args)
        kwargs = {k: int(v) if is_int(v) else v for k, v in kwargs.items()}
        super().__init__(*args, **kwargs)
        if self.bidirectional:
            raise ValueError("hiertcn_fast.nn.GRU does not support bidirectional=True; use torch.nn.GRU")
        if backend is not None:
            requested_backend(backend)  # a known backend name, said now rather than at the first forward
        self.backend = backend

    def _check_hx(self, hx, batch, input):
        """hx against (num_layers, batch, hidden_size), or (num_layers, hidden_size) when batch is None."""
        if hx is None:
            return
        _check_tensor(hx, "hx")
        if batch is None:
            layout, expected = "unbatched 2-D input, hx (num_layers, hidden_size)", (self.num_layers, self.hidden_size)
        else:
            layout, expected = "batched input, hx (num_layers, batch, hidden_size)", \
                (self.num_layers, batch, self.hidden_size)
        if hx.shape != expected:
            given = f"a PackedSequence of batch {batch}" if isinstance(input, PackedSequence) else \
                f"of shape {tuple(input.shape)}"
            raise ValueError(f"GRU: for {layout} must have shape {expected}, got {tuple(hx.shape)} "
                             f"(input is {given})")

    def _layers(self, x, h0, last=None):
        """x (batch, time, input), h0 (num_layers, batch, hidden) or None -> (output, h_n), dropout between
        layers. last (batch,) int64 on x's device, or None: each row's last valid step; h_n then holds every
        layer's state there rather than at the padded end (the recurrence is causal, so padding after a
        row's last step changes nothing before it)."""
        weights = self.all_weights
        autocast_dtype = _autocast_dtype(x, h0, weights[0][0])
        if autocast_dtype is None:
            _check_dtypes_and_devices(self, x, h0, weights[0][0])
            return self._run_layers(x, h0, weights, last)
        x, h0 = _autocast_cast(x, autocast_dtype), _autocast_cast(h0, autocast_dtype)
        weights = [[_autocast_cast(t, autocast_dtype) for t in layer] for layer in weights]
        _check_dtypes_and_devices(self, x, h0, weights[0][0])
        # The arguments are cast already; inside the op nothing may be cast again (torch's policy).
        with torch.autocast(x.device.type, enabled=False):
            return self._run_layers(x, h0, weights, last)

    def _run_layers(self, x, h0, weights, last):
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        dropout = self.dropout > 0 and self.training
        if last is None and not dropout:
            return gru(x, h0, weights, num_layers=self.num_layers, backend=self.backend)
        rows = None if last is None else torch.arange(x.shape[0], device=x.device)
        last_states = []
        for layer, layer_weights in enumerate(weights):
            if layer > 0 and dropout:
                x = F.dropout(x, self.dropout, training=True)
            x, h_n = gru(x, h0[layer:layer + 1], [layer_weights], num_layers=1, backend=self.backend)
            last_states.append(h_n[0] if last is None else x[rows, last])
        return x, torch.stack(last_states)

    def _forward_packed(self, input, hx):
        _check_tensor(input.data, "input.data")
        if input.data.dim() != 2:  # (the packed steps, each (input_size,)): said before the width or the padding
            raise ValueError(f"GRU: a PackedSequence's data must be 2-D (packed steps, input_size), got shape "
                             f"{tuple(input.data.shape)}")
        _check_input_size(input.data, self.input_size)
        self._check_hx(hx, int(input.batch_sizes[0]), input)
        x, lengths = pad_packed_sequence(input, batch_first=True)  # rows in the caller's order, as hx
        output, h_n = self._layers(x, hx, last=(lengths - 1).to(x.device))
        # Repack in the input's own row order (a fresh sort could order equal lengths differently).
        if input.sorted_indices is not None:
            output, lengths = output.index_select(0, input.sorted_indices), lengths[input.sorted_indices.cpu()]
        data = pack_padded_sequence(output, lengths, batch_first=True).data
        return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), h_n

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        _check_tensor(input, "input")
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: expected input to be 2-D or 3-D, got {input.dim()}-D")
        _check_input_size(input, self.input_size)
        batched = input.dim() == 3
        time_axis = (1 if self.batch_first else 0) if batched else 0
        if input.shape[time_axis] == 0:
            raise ValueError(f"GRU: input has an empty time axis (dimension {time_axis} of shape "
                             f"{tuple(input.shape)}, batch_first={self.batch_first}): a sequence needs at least one "
                             f"step")
        self._check_hx(hx, input.shape[0 if self.batch_first else 1] if batched else None, input)
        x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
        if not self.batch_first:
            x = x.transpose(0, 1)
        if hx is not None and not batched:
            hx = hx.unsqueeze(1)
        output, h_n = self._layers(x, hx)
        if not self.batch_first:  # time-major and contiguous, as nn.GRU's (callers flatten it with view)
            output = output.transpose(0, 1).contiguous()
        if not batched:
            output, h_n = output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return output, h_n

    def step(self, input, hx=None):
        """One time step: input (batch, input_size), hx (num_layers, batch, hidden_size) or None (zeros)
        -> (output (batch, hidden_size), h_n (num_layers, batch, hidden_size))."""
        # As GRUCell.forward: the common call takes the kernel a layer at a time (the cell op is a layer's step),
        # anything else or anything the kernel refuses the checked path.
        if (self.backend is None and isinstance(input, torch.Tensor) and input.dim() == 2
                and input.shape[1] == self.input_size and not (self.dropout > 0 and self.training)
                and (hx is None or (isinstance(hx, torch.Tensor) and hx.dim() == 3 and hx.shape[0] == self.num_layers
                                    and hx.shape[1] == input.shape[0] and hx.shape[2] == self.hidden_size))
                and default_kernel("gru_cell", input, GRU_DTYPES)):
            weights = self.all_weights
            if (input.dtype == weights[0][0].dtype and (hx is None or hx.dtype == input.dtype)
                    and dispatches_like(input, hx, *(t for layer in weights for t in layer))):
                h0 = input.new_zeros(self.num_layers, input.shape[0], self.hidden_size) if hx is None else hx
                cell = torch.ops.hiertcn_fast.gru_cell.default
                try:
                    h, states = input, []
                    for layer, layer_weights in enumerate(weights):
                        h = cell(h, h0[layer], *layer_weights) if len(layer_weights) == 4 else \
                            cell(h, h0[layer], *layer_weights, None, None)
                        states.append(h)
                    return h, torch.stack(states)
                except Exception:  # said by the checked path
                    pass
        return self._step_checked(input, hx)

    def _step_checked(self, input, hx):
        _check_tensor(input, "input")
        if input.dim() != 2:
            raise ValueError(f"GRU.step: expected input (batch, input_size), got shape {tuple(input.shape)}")
        _check_input_size(input, self.input_size)
        self._check_hx(hx, input.shape[0], input)
        output, h_n = self._layers(input.unsqueeze(1), hx)
        return output[:, 0], h_n
