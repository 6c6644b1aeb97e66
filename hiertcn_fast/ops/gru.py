"""GRU op family (nn.GRU semantics: gate order r, z, n; reset applied to W_hn h + b_hn).

- ``gru_gates``: the fused gate math of one step, given both pre-activations.
- ``gru_cell``: nn.GRUCell.
- ``gru``: nn.GRU(batch_first=True), multi-layer, returning (output, h_n).
- ``session_update``: HierTCN's high-level step: masked session mean, optional projection, one step
  of a multi-layer GRU, rows without a session unchanged, ended users zeroed.
- ``session_update_steps``: session_update over all the steps of a lane batch in one op (the steps'
  inputs are known up front, so the products over all steps are one each).

Each op has a public function (validation and backend dispatch), a plain-PyTorch reference, an
autograd.Function around the compiled kernels, and the torch.library registrations (fake kernels for
the C++ schemas in csrc/ops.cpp, triton_op for the Triton kernels).

How the backends run a sequence: cpu and cuda call one compiled op per layer for the whole sequence
(csrc/cpu/gru_recurrence.cpp: the input projection of all steps as one matrix product, then the
recurrence and the backward through time in C++, matrix products by ATen, gates by our kernels).
triton runs the same loop in Python with the Triton gate kernels (and session mean kernels), and
autograd differentiates it; for half types that loop carries the state, and so the gradient through
time, in float32.

gru_cell and session_update on cpu and cuda are single ops (hiertcn_fast::gru_cell,
hiertcn_fast::session_update) whose autograd node is written in C++ around the out ops: at HierTCN's
sizes a Python autograd.Function and its Python-side allocations cost about as much as the step's
arithmetic. Under torch.compile they go through the Python autograd.Functions instead (traced once,
free per call). On CPU tensors a single step also runs its two independent matrix products at once,
one per thread, and adds the biases inside the gates kernel (see gru_recurrence.cpp).

Every backward is deterministic: the same inputs give the same bits run after run at a fixed thread count. The
weight gradients' matrix products (BLAS) split their sums by the thread count, so one and two threads may
differ in the last bits.

Not done yet on the GPU, for want of a GPU to measure on: fusing the recurrent matrix product with
the gates (one kernel per step at small batch) and a persistent kernel for the whole recurrence.
The cuda backend runs two launches per step (cuBLAS, then the gates) from the C++ loop.
"""

from collections.abc import Mapping

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from .. import _extension
from .._ints import is_int
from ..backends import compiling, default_kernel, dispatches_like, resolve
from ._common import (FLOATING, check_like, check_shape, check_tensor, in_input_dtype, new_output, on_device_of,
                      refuse_batched_gradient, refuse_graph_of_gradient, symbolic, unit_stride_rows)

# The dtypes every op of the family supports, per backend.
GRU_DTYPES = {
    "cuda": {torch.float16, torch.bfloat16, torch.float32, torch.float64},
    "triton": {torch.float16, torch.bfloat16, torch.float32},
    "cpu": {torch.float32, torch.float64},
    "reference": set(FLOATING),
}


def gru_gates_reference(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch gru_gates: the definition every backend is tested against (half types in float32)."""
    compute = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
    i_r, i_z, i_n = gi.to(compute).chunk(3, dim=-1)
    h_r, h_z, h_n = gh.to(compute).chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h.to(compute)).to(h.dtype)


def _check_gru_gates(gi, gh, h):
    check_tensor(h, "h", 2)
    check_tensor(gi, "gi", 2)
    check_tensor(gh, "gh", 2)
    check_like(gi, "gi", h, "h")
    check_like(gh, "gh", h, "h")
    batch, hidden = h.shape
    check_shape(gi, "gi (batch, 3 * hidden)", (batch, 3 * hidden))
    check_shape(gh, "gh (batch, 3 * hidden)", (batch, 3 * hidden))


@in_input_dtype
def gru_gates(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, *, backend=None) -> torch.Tensor:
    """One GRU step's gate math, fused: h' = (1 - z) * n + z * h.

    gi: (batch, 3 * hidden) = x W_ih^T + b_ih; gh: (batch, 3 * hidden) = h W_hh^T + b_hh;
    h: (batch, hidden). Gate order r, z, n as nn.GRU; n = tanh(gi_n + r * gh_n). Returns
    (batch, hidden). Differentiable in gi, gh and h.
    """
    _check_gru_gates(gi, gh, h)
    name = resolve("gru_gates", backend, h.device, h.dtype, GRU_DTYPES)
    if name == "reference":
        return gru_gates_reference(gi, gh, h)
    return _GruGatesFunction.apply(unit_stride_rows(gi), unit_stride_rows(gh), unit_stride_rows(h), name)


def _gru_gates_kernel(name, gi, gh, h, out):
    if name == "triton":
        torch.ops.hiertcn_fast.gru_gates_triton_out(gi, gh, h, out)
    else:
        torch.ops.hiertcn_fast.gru_gates_out(gi, gh, h, out=out)


def _gru_gates_backward_kernel(name, grad_out, gi, gh, h, grad_gi, grad_gh, grad_h):
    if name == "triton":
        torch.ops.hiertcn_fast.gru_gates_backward_triton_out(grad_out, gi, gh, h, grad_gi, grad_gh, grad_h)
    else:
        torch.ops.hiertcn_fast.gru_gates_backward_out(grad_out, gi, gh, h, grad_gi=grad_gi, grad_gh=grad_gh,
                                                      grad_h=grad_h)


class _GruGatesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi, gh, h, name):
        out = new_output(h.shape, h)
        _gru_gates_kernel(name, gi, gh, h, out)
        # An input made under inference_mode (which cannot be saved for backward) is saved as a copy: the reference
        # composition saves only tensors it made, and takes such inputs beside one that requires grad. (Not traced:
        # dynamo has no is_inference.)
        saved = (gi, gh, h)
        if not compiling():
            saved = tuple(t.clone() if t.is_inference() else t for t in saved)
        ctx.save_for_backward(*saved)
        ctx.backend = name
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_graph_of_gradient("gru_gates")
        refuse_batched_gradient("gru_gates", grad_out)
        gi, gh, h = ctx.saved_tensors
        grad_gi, grad_gh, grad_h = new_output(gi.shape, gi), new_output(gh.shape, gh), new_output(h.shape, h)
        _gru_gates_backward_kernel(ctx.backend, unit_stride_rows(grad_out), gi, gh, h, grad_gi, grad_gh, grad_h)
        return grad_gi, grad_gh, grad_h, None


# ---- weights -------------------------------------------------------------------------------------

def _layer_weights(weights, num_layers, input_size, hidden, ref, name="weights", ref_name="h"):
    """Validate per-layer GRU weights and return them as (w_ih, w_hh, b_ih, b_hh) tuples (biases may be None).

    weights: ``num_layers`` sequences (w_ih (3 * hidden, in), w_hh (3 * hidden, hidden)[, b_ih, b_hh
    (3 * hidden,)]), nn.GRU's layout and gate order, e.g. ``nn.GRU(...).all_weights``; ``in`` is
    input_size for layer 0 and hidden above it.
    """
    layers = _well_formed_layer_weights(weights, num_layers, input_size, hidden, ref)
    if layers is not None:
        return layers
    _check_weights_structure(weights, num_layers, name)
    layers = []
    for layer, tensors in enumerate(weights):
        w_ih, w_hh, b_ih, b_hh = (tuple(tensors) + (None, None))[:4]
        in_features = input_size if layer == 0 else hidden
        if (b_ih is None) != (b_hh is None):
            raise ValueError(f"{'' if name is None else f'{name}[{layer}]: '}b_ih and b_hh must be given together or "
                             "not at all")
        for label, t, ndim in (("w_ih", w_ih, 2), ("w_hh", w_hh, 2), ("b_ih", b_ih, 1), ("b_hh", b_hh, 1)):
            if t is None and label.startswith("b_"):  # (a missing weight is refused by check_tensor)
                continue
            arg = label if name is None else f"{name}[{layer}] ({label})"
            check_tensor(t, arg, ndim)
            check_like(t, arg, ref, ref_name)
            if t.shape[0] != 3 * hidden:
                raise ValueError(f"{arg} must have 3 * hidden = {3 * hidden} rows (gates r, z, n of hidden "
                                 f"size {hidden}), got shape {tuple(t.shape)}")
        where = "" if name is None else f"{name}[{layer}] "
        check_shape(w_ih, f"{where}(w_ih)" if where else "w_ih", (3 * hidden, in_features))
        check_shape(w_hh, f"{where}(w_hh)" if where else "w_hh", (3 * hidden, hidden))
        layers.append((w_ih, w_hh, b_ih, b_hh))
    return layers


def _is_sequence(value) -> bool:
    """A list, tuple or other indexable sized container (nn.GRU's all_weights, a ParameterList), but not a tensor
    (whose rows would pass for layers or weights), a str or a mapping, nor an iterator (used up by one look)."""
    return (hasattr(value, "__len__") and hasattr(value, "__getitem__")
            and not isinstance(value, (torch.Tensor, str, bytes, Mapping)))


def _check_weights_structure(weights, num_layers, name):
    """weights must be one (w_ih, w_hh[, b_ih, b_hh]) sequence per layer: said before any of its tensors is looked
    at (without h0, gru reads the hidden size from weights[0][1], which for a forgotten level of nesting is a row
    of w_ih)."""
    shown = "weights" if name is None else name
    if not _is_sequence(weights):
        got = "a tensor" if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise TypeError(f"{shown} must be a list or tuple of one (w_ih, w_hh[, b_ih, b_hh]) sequence per layer "
                        f"(num_layers={num_layers}), got {got}")
    if len(weights) != num_layers:
        raise ValueError(f"{shown} must hold one (w_ih, w_hh[, b_ih, b_hh]) sequence per layer "
                         f"(num_layers={num_layers}), got {len(weights)}")
    for layer, tensors in enumerate(weights):
        if not _is_sequence(tensors):
            got = "a tensor" if isinstance(tensors, torch.Tensor) else type(tensors).__name__
            raise TypeError(f"{shown}[{layer}] must be a list or tuple (w_ih, w_hh) or (w_ih, w_hh, b_ih, b_hh), "
                            f"got {got}")
        if len(tensors) not in (2, 4):
            raise ValueError(f"{shown}[{layer}] must be (w_ih, w_hh) or (w_ih, w_hh, b_ih, b_hh), "
                             f"got {len(tensors)} tensors")


def _well_formed_layer_weights(weights, num_layers, input_size, hidden, ref):
    """_layer_weights' result when every check passes, else None (then _layer_weights says what is wrong).

    One cheap pass: validation costs more than the kernels at HierTCN's small shapes.
    """
    if not isinstance(weights, (list, tuple)) or len(weights) != num_layers:
        return None
    dtype, device, rows = ref.dtype, ref.device, 3 * hidden
    layers = []
    for layer, tensors in enumerate(weights):
        if not isinstance(tensors, (list, tuple)):
            return None
        if len(tensors) == 4:
            w_ih, w_hh, b_ih, b_hh = tensors
            biases_ok = (isinstance(b_ih, torch.Tensor) and isinstance(b_hh, torch.Tensor)
                         and b_ih.shape == (rows,) and b_hh.shape == (rows,)
                         and b_ih.dtype == b_hh.dtype == dtype and b_ih.device == b_hh.device == device)
        elif len(tensors) == 2:
            (w_ih, w_hh), b_ih, b_hh, biases_ok = tensors, None, None, True
        else:
            return None
        if not (biases_ok and isinstance(w_ih, torch.Tensor) and isinstance(w_hh, torch.Tensor)
                and w_ih.shape == (rows, input_size if layer == 0 else hidden) and w_hh.shape == (rows, hidden)
                and w_ih.dtype == w_hh.dtype == dtype and w_ih.device == w_hh.device == device):
            return None
        layers.append((w_ih, w_hh, b_ih, b_hh))
    return layers


def _check_layer_input(x, name, batch, hidden_like):
    check_like(x, name, hidden_like, "h")
    if x.shape[0] != batch:
        raise ValueError(f"{name} has batch {x.shape[0]} but h has batch {batch}")


# ---- one layer over a sequence (the cell is one step of it) --------------------------------------

def _gates_any_state_dtype(gi, gh, h, backend):
    """The gates (reference or triton) with h in float32 while gi and gh are half: h' then comes in h's
    dtype, and so does its gradient (both kernels compute in float32 and store each output in its own
    dtype). The caller's shapes are right by construction; gru_gates validates the public calls."""
    if backend == "reference":
        return gru_gates_reference(gi, gh, h)
    return _GruGatesFunction.apply(unit_stride_rows(gi), unit_stride_rows(gh), unit_stride_rows(h), backend)


def _layer_composed(x, h0, w_ih, w_hh, b_ih, b_hh, gates_backend):
    """One GRU layer from torch matrix products and the gates op, step by step; autograd differentiates
    it. The reference (with the reference gates) and the triton backend (with the Triton gates).

    Half types carry the state in float32 from step to step, and so its gradient through time: dL/dh
    summed over hundreds of steps in half precision loses the small contributions of distant steps.
    Each step's products still run in the input's dtype (on h rounded to it)."""
    gi = F.linear(x, w_ih, b_ih)
    half = x.dtype in (torch.float16, torch.bfloat16)
    h = h0.float() if half else h0
    outputs = []
    for t in range(x.shape[1]):
        gh = F.linear(h.to(x.dtype) if half else h, w_hh, b_hh)
        h = _gates_any_state_dtype(gi[:, t], gh, h, gates_backend)
        outputs.append(h)
    return torch.stack(outputs, dim=1).to(x.dtype)


class _GruLayerFunction(torch.autograd.Function):
    """One layer over a whole sequence on the compiled kernels (cpu, cuda): one op call per direction.

    With single_step=True, x is (batch, input) and the result (batch, hidden): the cell, without the
    two view nodes that adding and dropping the time dimension outside would put in the graph.

    What the caller gets is never what the backward keeps, so that it may edit the result in place (h[done] = 0,
    as after torch.nn): one step keeps no output (its backward reads h0 and the gates only); a sequence keeps the
    states it ran through and returns a copy of them (the backward reads the states before each step).
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, single_step):
        x_seq = x.unsqueeze(1) if single_step else x
        batch, time, _ = x_seq.shape
        hidden = h0.shape[1]
        output = new_output((batch, time, hidden), h0)
        gates = new_output((time, batch, 4 * hidden), h0)  # per step and row: csrc/include/hiertcn/gru_gates.h
        torch.ops.hiertcn_fast.gru_layer_forward_out(x_seq, h0, w_ih, w_hh, b_ih, b_hh, output=output, gates=gates)
        ctx.save_for_backward(x_seq, h0, w_ih, w_hh, None if time == 1 else output, gates)
        ctx.bias = b_ih is not None
        ctx.single_step = single_step
        if single_step:
            return output.view(batch, hidden)
        return output if time == 1 else output.clone()

    @staticmethod
    def backward(ctx, grad_output):
        refuse_graph_of_gradient("gru")
        refuse_batched_gradient("gru", grad_output)
        x, h0, w_ih, w_hh, output, gates = ctx.saved_tensors
        if output is None:  # one step: the op reads no output (only those of the steps before the last)
            output = new_output((x.shape[0], 1, h0.shape[1]), h0)
        grad_output = (grad_output.unsqueeze(1) if ctx.single_step else grad_output).contiguous()
        # The products of the backward only for what wants a gradient: x, h0, each weight, the bias pair (a frozen
        # layer pays for dL/dh0 and the input's gradient alone; nn.GRU's zero h0 for no dL/dh0).
        need = ctx.needs_input_grad
        grad_x = new_output(x.shape, x) if need[0] else None
        biases = ctx.bias and (need[4] or need[5])
        grad_b_ih = new_output(w_ih.shape[:1], w_ih) if biases else None
        grad_b_hh = new_output(w_hh.shape[:1], w_hh) if biases else None
        grad_h0 = new_output(h0.shape, h0) if need[1] else None
        grad_w_ih = new_output(w_ih.shape, w_ih) if need[2] else None
        grad_w_hh = new_output(w_hh.shape, w_hh) if need[3] else None
        torch.ops.hiertcn_fast.gru_layer_backward_out(
            grad_output, x, h0, w_ih, w_hh, output, gates, grad_x=grad_x, grad_h0=grad_h0, grad_w_ih=grad_w_ih,
            grad_w_hh=grad_w_hh, grad_b_ih=grad_b_ih, grad_b_hh=grad_b_hh)
        if grad_x is not None and ctx.single_step:
            grad_x = grad_x.view(x.shape[0], x.shape[2])
        return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, None


def _gru_layer(name, x, h0, w_ih, w_hh, b_ih, b_hh, single_step=False):
    """One layer on backend ``name``: x (batch, time, input), h0 (batch, hidden) -> (batch, time, hidden);
    with single_step, x (batch, input) -> (batch, hidden)."""
    if name in ("cpu", "cuda") and not single_step and not compiling():
        # One op whose autograd node is C++ (csrc/cpu/gru_recurrence.cpp); torch.compile traces the
        # autograd.Function below instead, where the Python costs nothing per call.
        return torch.ops.hiertcn_fast.gru_layer.default(x, h0, w_ih, w_hh, b_ih, b_hh)
    if name in ("cpu", "cuda"):
        return _GruLayerFunction.apply(x, unit_stride_rows(h0), w_ih, w_hh, b_ih, b_hh, single_step)
    if single_step:
        return _layer_composed(x.unsqueeze(1), h0, w_ih, w_hh, b_ih, b_hh, name)[:, 0]
    return _layer_composed(x, h0, w_ih, w_hh, b_ih, b_hh, name)


def gru_cell_reference(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """Plain-PyTorch gru_cell (half types in float32 inside the gates)."""
    return gru_gates_reference(F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h)


def _well_formed_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """True when every check of gru_cell passes, in one cheap pass (else the full checks say what is wrong):
    at HierTCN's sizes the checks cost a noticeable share of a step."""
    if not (isinstance(x, torch.Tensor) and isinstance(h, torch.Tensor) and x.dim() == 2 and h.dim() == 2
            and h.dtype in FLOATING and x.dtype == h.dtype and x.device == h.device and x.shape[0] == h.shape[0]
            and (b_ih is None) == (b_hh is None)):
        return False
    weights = (w_ih, w_hh) if b_ih is None else (w_ih, w_hh, b_ih, b_hh)
    return _well_formed_layer_weights((weights,), 1, x.shape[1], h.shape[1], h) is not None


def gru_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih=None, b_hh=None, *,
             backend=None) -> torch.Tensor:
    """One GRU step, what nn.GRUCell computes: x (batch, input), h (batch, hidden) -> h' (batch, hidden).

    w_ih (3 * hidden, input), w_hh (3 * hidden, hidden), b_ih and b_hh (3 * hidden,) or both None:
    nn.GRUCell's weight_ih, weight_hh, bias_ih, bias_hh. Differentiable in every tensor argument.
    """
    if (backend is None and isinstance(h, torch.Tensor) and default_kernel("gru_cell", h, GRU_DTYPES)
            and dispatches_like(h, x, w_ih, w_hh, b_ih, b_hh)):
        return gru_cell_kernel(x, h, w_ih, w_hh, b_ih, b_hh)
    return _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, backend=backend)


def gru_cell_kernel(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """gru_cell on its compiled kernel, for a call that backends.default_kernel sent there: the op checks every
    argument itself (shapes, dtypes, devices), so the Python checks run only when it refuses the call, and then the
    full entry point runs, which says what is wrong in this package's words (or, if every check passes, makes the
    call again). At batch 1 the Python checks and the selection cost about as much as the kernel."""
    try:
        return torch.ops.hiertcn_fast.gru_cell.default(x, h, w_ih, w_hh, b_ih, b_hh)
    except Exception:
        return _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)


@in_input_dtype
def _gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, *, backend=None):
    """gru_cell with every check and the full backend selection."""
    if not _well_formed_cell(x, h, w_ih, w_hh, b_ih, b_hh):
        check_tensor(h, "h", 2)
        check_tensor(x, "x", 2)
        _check_layer_input(x, "x", h.shape[0], h)
        if (b_ih is None) != (b_hh is None):
            raise ValueError("b_ih and b_hh must be given together or not at all")
        _layer_weights([(w_ih, w_hh) + ((b_ih, b_hh) if b_ih is not None else ())], 1, x.shape[1], h.shape[1], h,
                       name=None)  # the cell's arguments are named w_ih, w_hh, b_ih, b_hh
    name = resolve("gru_cell", backend, h.device, h.dtype, GRU_DTYPES)
    if name == "reference":
        return gru_cell_reference(x, h, w_ih, w_hh, b_ih, b_hh)
    if name in ("cpu", "cuda") and not compiling():
        # One op whose autograd node is C++ (csrc/cpu/gru_recurrence.cpp); torch.compile traces the
        # autograd.Function below instead, where the Python costs nothing per call.
        return torch.ops.hiertcn_fast.gru_cell.default(x, h, w_ih, w_hh, b_ih, b_hh)
    return _gru_layer(name, x, h, w_ih, w_hh, b_ih, b_hh, single_step=True)


# ---- multi-layer sequence ------------------------------------------------------------------------

def _check_gru(x, h0, weights, num_layers):
    check_tensor(x, "x", 3)
    if x.shape[1] < 1:
        raise ValueError(f"x must hold at least one time step, got shape {tuple(x.shape)}")
    if not is_int(num_layers):
        raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__} {num_layers!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    given_h0 = h0 is not None
    if h0 is None:
        _check_weights_structure(weights, num_layers, "weights")
        # The hidden size comes from layer 0's w_hh: checked first, so that a bad one is named as it is with h0.
        check_tensor(weights[0][1], "weights[0] (w_hh)", 2)
        hidden = weights[0][1].shape[-1]
        h0 = x.new_zeros(num_layers, x.shape[0], hidden)
    check_tensor(h0, "h0", 3)
    check_like(x, "x", h0, "h0")
    check_shape(h0, "h0 (num_layers, batch, hidden)", (num_layers, x.shape[0], h0.shape[2]))
    # Without h0 the zeros made here are x's dtype and device: a weight unlike them is unlike x, the argument given.
    return h0, _layer_weights(weights, num_layers, x.shape[2], h0.shape[2], h0,
                              ref_name="h0" if given_h0 else "x")


def gru_reference(x, h0, weights, *, num_layers):
    """Plain-PyTorch gru, step by step with the reference gates."""
    h0, layers = _check_gru(x, h0, weights, num_layers)
    return _gru_layers("reference", x, h0, layers)


def _gru_layers(name, x, h0, layers):
    layer_input, last_states = x, []
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        layer_input = _gru_layer(name, layer_input, h0[layer], w_ih, w_hh, b_ih, b_hh)
        last_states.append(layer_input[:, -1])
    return layer_input, torch.stack(last_states)


@in_input_dtype
def gru(x: torch.Tensor, h0, weights, *, num_layers: int, backend=None):
    """A multi-layer GRU over a sequence, what nn.GRU(batch_first=True) computes.

    x: (batch, time, input); h0: (num_layers, batch, hidden), or None for zeros; weights: one
    (w_ih, w_hh[, b_ih, b_hh]) sequence per layer in nn.GRU's layout, e.g. ``module.all_weights``.
    Returns (output (batch, time, hidden) = the last layer's states, h_n (num_layers, batch, hidden)).
    Differentiable in x, h0 and every weight.
    """
    if backend is None and isinstance(x, torch.Tensor) and default_kernel("gru", x, GRU_DTYPES):
        layers = _well_formed_gru(x, h0, weights, num_layers)
        if layers is not None:
            return _gru_layers("cpu" if x.is_cpu else "cuda", x, h0, layers)
    h0, layers = _check_gru(x, h0, weights, num_layers)
    name = resolve("gru", backend, h0.device, h0.dtype, GRU_DTYPES)
    return _gru_layers(name, x, h0, layers)


def _well_formed_gru(x, h0, weights, num_layers):
    """The layers' weights when every check of gru passes, for a call that backends.default_kernel sent to the
    compiled kernels, in one cheap pass; else None (then the full checks say what is wrong). At a few short
    sequences the checks and the selection cost a noticeable share of the recurrence."""
    if not (type(num_layers) is int and num_layers >= 1 and x.dim() == 3 and x.shape[1] >= 1
            and isinstance(h0, torch.Tensor) and h0.dim() == 3 and h0.dtype == x.dtype and h0.device == x.device
            and h0.shape[0] == num_layers and h0.shape[1] == x.shape[0] and dispatches_like(x, h0)):
        return None
    return _well_formed_layer_weights(weights, num_layers, x.shape[2], h0.shape[2], h0)


# ---- HierTCN's session-level update --------------------------------------------------------------

def _session_mean_reference(items, lengths):
    """items (batch, time, dim), lengths (batch,) -> the mean over each row's first lengths[b] items (0 if none).
    Lengths are clamped to [0, time] as the CUDA and Triton kernels clamp them (on CPU tensors they were checked)."""
    lengths = lengths.clamp(0, items.shape[1])
    in_session = torch.arange(items.shape[1], device=items.device) < lengths[:, None]
    total = torch.where(in_session[..., None], items, torch.zeros((), dtype=items.dtype, device=items.device)).sum(1)
    return total / lengths.clamp(min=1).to(items.dtype)[:, None]


class _SessionMeanTritonFunction(torch.autograd.Function):
    """The session mean on the Triton kernels, differentiable in items."""

    @staticmethod
    def forward(ctx, items, lengths):
        mean = new_output((items.shape[0], items.shape[2]), items)
        torch.ops.hiertcn_fast.session_mean_triton_out(items, lengths, mean)
        ctx.save_for_backward(lengths)
        ctx.items_shape = items.shape
        return mean

    @staticmethod
    def backward(ctx, grad_mean):
        refuse_graph_of_gradient("session_update")
        refuse_batched_gradient("session_update", grad_mean)
        (lengths,) = ctx.saved_tensors
        grad_items = new_output(ctx.items_shape, grad_mean)
        torch.ops.hiertcn_fast.session_mean_backward_triton_out(unit_stride_rows(grad_mean), lengths, grad_items)
        return grad_items, None


def _session_update_composed(items, lengths, h, keep, layers, proj_weight, proj_bias, backend):
    """session_update from torch ops, the session mean and the gates op on ``backend`` (reference or triton),
    differentiated by autograd."""
    if backend == "triton":
        layer_input = _SessionMeanTritonFunction.apply(unit_stride_rows(items), lengths)
    else:
        layer_input = _session_mean_reference(items, lengths)
    if proj_weight is not None:
        layer_input = F.linear(layer_input, proj_weight, proj_bias)
    states = []
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        layer_input = gru_gates(F.linear(layer_input, w_ih, b_ih), F.linear(h[layer], w_hh, b_hh), h[layer],
                                backend=backend)
        states.append(layer_input)
    active = (lengths > 0)[None, :, None]
    return torch.where(active, torch.stack(states), h) * keep[None, :, None]


def _weight_grad_buffers(need, weights, proj_weight):
    """The session ops' weight gradients' buffers, for what wants a gradient (need: ctx.needs_input_grad of a node
    over (items, lengths, h, keep, proj_weight, proj_bias, *weights)): (one per weight, or none at all where no
    weight of the GRU wants one; the projection weight's or None; its bias's or None)."""
    return ([new_output(w.shape, w) for w in weights] if any(need[6:]) else [],
            new_output(proj_weight.shape, proj_weight) if need[4] else None,
            new_output(proj_weight.shape[:1], proj_weight) if need[5] else None)


class _SessionUpdateFunction(torch.autograd.Function):
    """session_update on the compiled kernels (cpu, cuda): one op call forward, one backward."""

    @staticmethod
    def forward(ctx, items, lengths, h, keep, proj_weight, proj_bias, *weights):
        batch, dim = items.shape[0], items.shape[2]
        layers, hidden = h.shape[0], h.shape[2]
        out, states = new_output(h.shape, h), new_output(h.shape, h)
        session_mean = new_output((batch, dim), h)
        projected = new_output((batch, proj_weight.shape[0]), h) if proj_weight is not None else None
        gates = new_output((layers, batch, 4 * hidden), h)  # per row: csrc/include/hiertcn/gru_gates.h
        torch.ops.hiertcn_fast.session_update_forward_out(
            items, lengths, h, keep, list(weights), proj_weight, proj_bias, out=out, states=states,
            session_mean=session_mean, projected=projected, gates=gates)
        # The item embeddings' shape is all the backward needs of them (see the C++ node).
        ctx.save_for_backward(lengths, h, keep, proj_weight, session_mean, projected, states, gates, *weights)
        ctx.items_shape = items.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_graph_of_gradient("session_update")
        refuse_batched_gradient("session_update", grad_out)
        lengths, h, keep, proj_weight, session_mean, projected, states, gates, *weights = ctx.saved_tensors
        batch, time, dim = ctx.items_shape
        items = h.new_empty(dim).as_strided((batch, time, dim), (0, 0, 1))  # a stand-in with the shape
        grad_out = grad_out.contiguous()
        grad_items = new_output(items.shape, items) if ctx.needs_input_grad[0] else None
        grad_h = new_output(h.shape, h) if ctx.needs_input_grad[2] else None
        grad_weights, grad_proj_weight, grad_proj_bias = _weight_grad_buffers(ctx.needs_input_grad, weights,
                                                                              proj_weight)
        torch.ops.hiertcn_fast.session_update_backward_out(
            grad_out, items, lengths, h, keep, weights, proj_weight, session_mean, projected, states, gates,
            grad_item_embeddings=grad_items, grad_h=grad_h, grad_weights=grad_weights,
            grad_proj_weight=grad_proj_weight, grad_proj_bias=grad_proj_bias)
        grad_keep = None
        if ctx.needs_input_grad[3]:
            kept = torch.where((lengths > 0)[None, :, None], states, h)
            grad_keep = (grad_out * kept).sum(dim=(0, 2))
        return (grad_items, None, grad_h, grad_keep, grad_proj_weight, grad_proj_bias,
                *(grad_weights or [None] * len(weights)))


def _check_session_update(items, lengths, h, keep, weights, proj_weight, proj_bias):
    """Validate session_update's arguments; returns (lengths as int64, keep in h's dtype, layers)."""
    check_tensor(h, "h", 3)
    check_tensor(items, "item_embeddings", 3)
    check_like(items, "item_embeddings", h, "h")
    layers_count, batch, hidden = h.shape
    if layers_count < 1:
        raise ValueError(f"h (layers, batch, hidden) must hold at least one layer, got shape {tuple(h.shape)}")
    if items.shape[0] != batch:
        raise ValueError(f"item_embeddings has batch {items.shape[0]} but h (layers, batch, hidden) has {batch}")
    if (not isinstance(lengths, torch.Tensor) or lengths.dtype == torch.bool or lengths.dtype.is_floating_point
            or lengths.dtype.is_complex):
        # A bool is not a length: a mask of the rows with a session would silently count as lengths 0 and 1.
        raise TypeError(f"lengths must be an integer tensor of session lengths, got "
                        f"{getattr(lengths, 'dtype', type(lengths))}")
    check_shape(lengths, "lengths (batch,)", (batch,))
    if lengths.device != h.device:
        raise ValueError(f"lengths is on {lengths.device} but h is on {h.device}; move them to one device")
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep must be a tensor, got {type(keep).__name__}")
    check_shape(keep, "keep (batch,)", (batch,))
    if keep.device != h.device:
        raise ValueError(f"keep is on {keep.device} but h is on {h.device}; move them to one device")
    if keep.dtype != torch.bool:
        check_like(keep, "keep", h, "h")
    input_size = items.shape[2]
    if proj_weight is not None:
        check_tensor(proj_weight, "proj_weight", 2)
        check_like(proj_weight, "proj_weight", h, "h")
        if proj_weight.shape[1] != items.shape[2]:
            raise ValueError(f"proj_weight must be (projected, dim = {items.shape[2]}), got {tuple(proj_weight.shape)}")
        input_size = proj_weight.shape[0]
        if proj_bias is not None:
            check_tensor(proj_bias, "proj_bias", 1)
            check_like(proj_bias, "proj_bias", h, "h")
            check_shape(proj_bias, "proj_bias (projected,)", (input_size,))
    elif proj_bias is not None:
        raise ValueError("proj_bias needs proj_weight")
    layers = _layer_weights(weights, layers_count, input_size, hidden, h)
    if len({w[2] is None for w in layers}) > 1:
        raise ValueError("weights must have biases in every layer or in none")
    # The kernels read lengths as one int64 per row, unit stride.
    return lengths.to(torch.int64).contiguous(), keep.to(h.dtype), layers


def _well_formed_session_update(items, lengths, h, keep, weights, proj_weight, proj_bias):
    """The layers of _check_session_update when its checks pass and lengths (contiguous int64) and keep (h's
    dtype) need no conversion, in one cheap pass; else None (then _check_session_update converts or says what
    is wrong)."""
    if not (isinstance(h, torch.Tensor) and isinstance(items, torch.Tensor) and isinstance(lengths, torch.Tensor)
            and isinstance(keep, torch.Tensor) and h.dim() == 3 and items.dim() == 3 and h.dtype in FLOATING
            and h.shape[0] >= 1):
        return None
    dtype, device = h.dtype, h.device
    batch = h.shape[1]
    if not (items.dtype == dtype and items.device == device and items.shape[0] == batch
            and lengths.dtype == torch.int64 and lengths.device == device and lengths.shape == (batch,)
            and lengths.is_contiguous()
            and keep.dtype == dtype and keep.device == device and keep.shape == (batch,)):
        return None
    input_size = items.shape[2]
    if proj_weight is not None:
        if not (isinstance(proj_weight, torch.Tensor) and proj_weight.dim() == 2 and proj_weight.dtype == dtype
                and proj_weight.device == device and proj_weight.shape[1] == input_size):
            return None
        input_size = proj_weight.shape[0]
        if proj_bias is not None and not (isinstance(proj_bias, torch.Tensor) and proj_bias.dtype == dtype
                                          and proj_bias.device == device and proj_bias.shape == (input_size,)):
            return None
    elif proj_bias is not None:
        return None
    layers = _well_formed_layer_weights(weights, h.shape[0], input_size, h.shape[2], h)
    if layers is None or len({w[2] is None for w in layers}) > 1:
        return None
    return layers


def _check_lengths_in_range(lengths, time):
    """On CPU tensors every length must lie in [0, time], as the cpu kernel checks: the reference composition
    would count a longer session as the whole padded row and a negative one as no session, and the Triton
    kernels would read past the row, each silently and each differently. lengths: int64 (what the checks
    return). Device tensors are not read (that would make the host wait for the device; their kernels clamp),
    nor fake ones outside a trace (FakeTensorMode, opcheck: no values to look at). Traced by torch.compile, the
    graph checks them itself: an assert in the graph, a RuntimeError when it runs (without it the compiled
    reference clamped them without a word, where the cpu kernel refuses them)."""
    if lengths.device.type != "cpu" or lengths.numel() == 0:
        return
    if compiling():
        # (A constant message: formatting the time into it would specialise the graph on it, one compile a length.)
        torch._assert_async(((lengths >= 0) & (lengths <= time)).all(),
                            "lengths must lie in [0, time], time the item embeddings' padded session length")
        return
    if symbolic(lengths):
        return
    low, high = torch.stack(torch.aminmax(lengths)).tolist()
    if low < 0 or high > time:
        raise ValueError(f"lengths must lie in [0, time = {time}], got values in [{low}, {high}]")


def session_update_reference(item_embeddings, lengths, h, keep, weights, *, proj_weight=None, proj_bias=None):
    """Plain-PyTorch session_update."""
    lengths, keep, layers = _check_session_update(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias)
    _check_lengths_in_range(lengths, item_embeddings.shape[1])
    return _session_update_composed(item_embeddings, lengths, h, keep, layers, proj_weight, proj_bias, "reference")


def session_update(item_embeddings: torch.Tensor, lengths: torch.Tensor, h: torch.Tensor, keep: torch.Tensor,
                   weights, *, proj_weight=None, proj_bias=None, backend=None) -> torch.Tensor:
    """HierTCN's high-level step for a batch of lanes, in one op. Returns the new h (layers, batch, hidden).

    item_embeddings: (batch, time, dim), the current session of every lane, padded; lengths: (batch,)
    integers in [0, time] (any integer dtype but bool, any strides), the session lengths; h: (layers,
    batch, hidden), the GRU state; keep: (batch,) bool or h's dtype, 0 where the lane's user has ended
    (its state restarts from zero); weights: one (w_ih, w_hh[, b_ih, b_hh]) sequence per layer in
    nn.GRU's layout; proj_weight (projected, dim) and proj_bias (projected,): an optional input
    projection.

        x    = mean(item_embeddings[b, :lengths[b]])          (0 for a row of length 0)
        x    = x proj_weight^T + proj_bias                    (when proj_weight is given)
        h'_l = GRUCell_l(h'_{l-1} (x for l = 0), h_l)
        out  = keep * (h' where lengths > 0, else h)

    Differentiable in item_embeddings, h, the weights, the projection and a floating keep. Lengths
    outside [0, time] are an error on CPU tensors on every backend (a ValueError with the same message, the cpu
    kernel's own check included; compiled by torch.compile, a RuntimeError when the graph runs);
    on a GPU every backend clamps them (checking would synchronise).
    """
    if backend is None and isinstance(h, torch.Tensor) and default_kernel("session_update", h, GRU_DTYPES):
        flat = _session_kernel_weights(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias)
        if flat is not None:
            # As gru_cell's shortcut: the op checks every argument (the lengths' values too, on CPU tensors), and
            # where it refuses the call the checked path below says what is wrong.
            try:
                return torch.ops.hiertcn_fast.session_update.default(item_embeddings, lengths, h, keep, flat,
                                                                     proj_weight, proj_bias)
            except Exception:
                pass
    return _session_update_checked(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias, backend)


def _session_kernel_weights(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias):
    """The weights as the op takes them (flat, per layer w_ih, w_hh[, b_ih, b_hh]) where the call can go to it as
    it is: lengths int64 and keep in h's dtype (the checked path converts others), h and lengths contiguous, one
    weight sequence per layer, all with or all without biases, and every tensor of h's kind (dispatches_like).
    None otherwise."""
    if not (isinstance(lengths, torch.Tensor) and isinstance(keep, torch.Tensor) and lengths.dtype == torch.int64
            and keep.dtype == h.dtype and h.dim() == 3 and h.is_contiguous() and lengths.is_contiguous()
            and isinstance(weights, (list, tuple)) and len(weights) == h.shape[0] >= 1):
        return None
    per_layer = len(weights[0]) if isinstance(weights[0], (list, tuple)) else 0
    if per_layer not in (2, 4) or any(not isinstance(layer, (list, tuple)) or len(layer) != per_layer
                                      for layer in weights):
        return None
    flat = [t for layer in weights for t in layer]
    if proj_bias is not None and proj_weight is None:
        return None
    return flat if dispatches_like(h, item_embeddings, lengths, keep, proj_weight, proj_bias, *flat) else None


@in_input_dtype
def _session_update_checked(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias, backend):
    """session_update with every check and the full backend selection."""
    layers = _well_formed_session_update(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias)
    if layers is None:
        lengths, keep, layers = _check_session_update(item_embeddings, lengths, h, keep, weights, proj_weight,
                                                      proj_bias)
    name = resolve("session_update", backend, h.device, h.dtype, GRU_DTYPES)
    if name in ("reference", "triton"):
        # The checks above (and the fast path, which skips them) leave the values of lengths alone; the cpu
        # kernel checks them itself.
        _check_lengths_in_range(lengths, item_embeddings.shape[1])
        return _session_update_composed(item_embeddings, lengths, h, keep, layers, proj_weight, proj_bias, name)
    flat = [t for layer in layers for t in layer if t is not None]
    if not compiling():
        # One op whose autograd node is C++; torch.compile traces the autograd.Function below.
        return torch.ops.hiertcn_fast.session_update.default(item_embeddings, lengths, h, keep, flat, proj_weight,
                                                             proj_bias)
    return _SessionUpdateFunction.apply(unit_stride_rows(item_embeddings), lengths, h.contiguous(), keep, proj_weight,
                                        proj_bias, *flat)


# ---- all of a batch's session steps in one op ------------------------------------------------------

def _check_session_update_steps(items, lengths, h, keep, weights, proj_weight, proj_bias):
    """Validate session_update_steps's arguments; returns (lengths as contiguous int64 (steps, batch), keep in
    h's dtype, contiguous, layers). One step's checks are session_update's."""
    check_tensor(h, "h", 3)
    check_tensor(items, "item_embeddings", 4)
    steps, batch = items.shape[0], h.shape[1]
    for value, name in ((lengths, "lengths"), (keep, "keep")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        check_shape(value, f"{name} (steps, batch)", (steps, batch))
    if steps == 0:  # session_update's checks on a step of the same shape, with nothing in it
        step_items = items.new_empty(items.shape[1:])
        step_lengths, step_keep = lengths.new_zeros(batch), keep.new_ones(batch)
    else:
        step_items, step_lengths, step_keep = items[0], lengths[0], keep[0]
    _, _, layers = _check_session_update(step_items, step_lengths, h, step_keep, weights, proj_weight, proj_bias)
    return lengths.to(torch.int64).contiguous(), keep.to(h.dtype).contiguous(), layers


def _session_update_steps_composed(items, lengths, h, keep, layers, proj_weight, proj_bias, backend):
    """session_update_steps as session_update's composition (reference or triton), one step after another."""
    states = [h]
    for step in range(items.shape[0]):
        states.append(_session_update_composed(items[step], lengths[step], states[-1], keep[step], layers,
                                               proj_weight, proj_bias, backend))
    return torch.stack(states)


def _session_update_steps_forward(items, lengths, h, keep, proj_weight, proj_bias, weights, keep_gates):
    """The compiled forward: (out, cells, session_mean, projected, gates). Without keep_gates (a forward only) the
    gates are one step's scratch, not every step's."""
    steps, batch, _, dim = items.shape
    layers, hidden = h.shape[0], h.shape[2]
    out = new_output((steps + 1, layers, batch, hidden), h)
    cells = new_output((layers, steps, batch, hidden), h)
    session_mean = new_output((steps, batch, dim), h)
    projected = new_output((steps, batch, proj_weight.shape[0]), h) if proj_weight is not None else None
    # per row: csrc/include/hiertcn/gru_gates.h
    gates = new_output((layers, steps if keep_gates else 1, batch, 4 * hidden), h)
    torch.ops.hiertcn_fast.session_update_steps_forward_out(
        items, lengths, h, keep, weights, proj_weight, proj_bias, out=out, cells=cells, session_mean=session_mean,
        projected=projected, gates=gates)
    return out, cells, session_mean, projected, gates


class _SessionUpdateStepsFunction(torch.autograd.Function):
    """session_update_steps on the compiled kernels (cpu, cuda): one op call forward, one backward."""

    @staticmethod
    def forward(ctx, items, lengths, h, keep, proj_weight, proj_bias, *weights):
        out, cells, session_mean, projected, gates = _session_update_steps_forward(
            items, lengths, h, keep, proj_weight, proj_bias, list(weights), keep_gates=True)
        # As session_update's: the item embeddings' shape is all the backward needs of them. The states are kept
        # and a copy returned (a few hundred KB at HierTCN's sizes): the caller may edit what it gets in place
        # (zero a lane's final state, say) before the backward, as it may session_update's result.
        ctx.save_for_backward(lengths, keep, proj_weight, session_mean, projected, out, cells, gates, *weights)
        ctx.items_shape = items.shape
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        refuse_graph_of_gradient("session_update_steps")
        refuse_batched_gradient("session_update_steps", grad_out)
        lengths, keep, proj_weight, session_mean, projected, out, cells, gates, *weights = ctx.saved_tensors
        items = out.new_empty(ctx.items_shape[-1]).as_strided(ctx.items_shape, (0, 0, 0, 1))  # a stand-in
        grad_items = new_output(items.shape, items) if ctx.needs_input_grad[0] else None
        grad_h = new_output(out.shape[1:], out) if ctx.needs_input_grad[2] else None
        grad_weights, grad_proj_weight, grad_proj_bias = _weight_grad_buffers(ctx.needs_input_grad, weights,
                                                                              proj_weight)
        grad_keep = new_output(keep.shape, keep) if ctx.needs_input_grad[3] else None
        torch.ops.hiertcn_fast.session_update_steps_backward_out(
            grad_out.contiguous(), items, lengths, keep, weights, proj_weight, session_mean, projected, out, cells,
            gates, grad_item_embeddings=grad_items, grad_h=grad_h, grad_weights=grad_weights,
            grad_proj_weight=grad_proj_weight, grad_proj_bias=grad_proj_bias, grad_keep=grad_keep)
        return (grad_items, None, grad_h, grad_keep, grad_proj_weight, grad_proj_bias,
                *(grad_weights or [None] * len(weights)))


def session_update_steps_reference(item_embeddings, lengths, h, keep, weights, *, proj_weight=None, proj_bias=None):
    """Plain-PyTorch session_update_steps: session_update_reference step after step."""
    lengths, keep, layers = _check_session_update_steps(item_embeddings, lengths, h, keep, weights, proj_weight,
                                                        proj_bias)
    _check_lengths_in_range(lengths, item_embeddings.shape[2])
    return _session_update_steps_composed(item_embeddings, lengths, h, keep, layers, proj_weight, proj_bias,
                                          "reference")


@in_input_dtype
def session_update_steps(item_embeddings: torch.Tensor, lengths: torch.Tensor, h: torch.Tensor, keep: torch.Tensor,
                         weights, *, proj_weight=None, proj_bias=None, backend=None) -> torch.Tensor:
    """session_update over the steps of a lane batch, in one op: the states before and after every step,
    (steps + 1, layers, batch, hidden).

    item_embeddings: (steps, batch, time, dim); lengths, keep: (steps, batch); h, weights, proj_weight and
    proj_bias as session_update's. out[0] = h and

        out[s + 1] = session_update(item_embeddings[s], lengths[s], out[s], keep[s], weights, ...)

    The high level reads only item embeddings, so every step's input is known up front: the cpu and cuda
    backends run the steps layer by layer, with one session-mean pass and one input product per layer over all
    steps, and in the backward each weight's gradient as one product over all steps; only the state products
    and the gates go step by step. The results equal session_update's step by step up to rounding (the sums
    run in another order). Without gradients to compute (no_grad, inference_mode, no input that requires one) the
    cpu and cuda forward keeps one step's gates as scratch instead of every step's. The reference and triton
    backends run session_update's composition step by step.
    Differentiable in item_embeddings, h, the weights, the projection and a floating keep; lengths outside
    [0, time] are an error on CPU tensors, as for session_update.
    """
    lengths, keep, layers = _check_session_update_steps(item_embeddings, lengths, h, keep, weights, proj_weight,
                                                        proj_bias)
    name = resolve("session_update_steps", backend, h.device, h.dtype, GRU_DTYPES)
    if name in ("reference", "triton") or item_embeddings.shape[0] == 0:
        _check_lengths_in_range(lengths, item_embeddings.shape[2])
        return _session_update_steps_composed(item_embeddings, lengths, h, keep, layers, proj_weight, proj_bias,
                                              name)
    flat = [t for layer in layers for t in layer if t is not None]
    items = unit_stride_rows(item_embeddings)
    # No gradient wanted: the forward alone. (Under forward-mode AD a dual tensor does not require grad, and the
    # forward alone dropped its tangent without a word: the autograd function refuses it instead.)
    if not compiling() and forward_ad._current_level < 0 and not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (items, h, keep, proj_weight, proj_bias, *flat) if t is not None)):
        return _session_update_steps_forward(items, lengths, h.contiguous(), keep, proj_weight, proj_bias, flat,
                                             keep_gates=False)[0]
    return _SessionUpdateStepsFunction.apply(items, lengths, h.contiguous(), keep, proj_weight, proj_bias, *flat)


# ---- registrations -------------------------------------------------------------------------------

@_extension.register_fake("gru_gates_out")
def _gru_gates_out_fake(gi, gh, h, *, out):
    return None


@_extension.register_fake("gru_gates_backward_out")
def _gru_gates_backward_out_fake(grad_out, gi, gh, h, *, grad_gi, grad_gh, grad_h):
    return None


@_extension.register_fake("gru_layer_forward_out")
def _gru_layer_forward_out_fake(x, h0, w_ih, w_hh, b_ih, b_hh, *, output, gates):
    return None


@_extension.register_fake("gru_layer_backward_out")
def _gru_layer_backward_out_fake(grad_output, x, h0, w_ih, w_hh, output, gates, *, grad_x, grad_h0, grad_w_ih,
                                 grad_w_hh, grad_b_ih, grad_b_hh):
    return None


@_extension.register_fake("gru_cell")
def _gru_cell_fake(x, h, w_ih, w_hh, b_ih, b_hh):
    return h.new_empty(h.shape)


@_extension.register_fake("gru_layer")
def _gru_layer_fake(x, h0, w_ih, w_hh, b_ih, b_hh):
    return h0.new_empty((x.shape[0], x.shape[1], h0.shape[1]))


@_extension.register_fake("session_update")
def _session_update_fake(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias):
    return h.new_empty(h.shape)


@_extension.register_fake("session_update_forward_out")
def _session_update_forward_out_fake(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias, *, out,
                                     states, session_mean, projected, gates):
    return None


@_extension.register_fake("session_update_backward_out")
def _session_update_backward_out_fake(grad_out, item_embeddings, lengths, h, keep, weights, proj_weight,
                                      session_mean, projected, states, gates, *, grad_item_embeddings, grad_h,
                                      grad_weights, grad_proj_weight, grad_proj_bias):
    return None


@_extension.register_fake("session_update_steps_forward_out")
def _session_update_steps_forward_out_fake(item_embeddings, lengths, h, keep, weights, proj_weight, proj_bias, *, out,
                                           cells, session_mean, projected, gates):
    return None


@_extension.register_fake("session_update_steps_backward_out")
def _session_update_steps_backward_out_fake(grad_out, item_embeddings, lengths, keep, weights, proj_weight,
                                            session_mean, projected, out, cells, gates, *, grad_item_embeddings,
                                            grad_h, grad_weights, grad_proj_weight, grad_proj_bias, grad_keep):
    return None


@torch.library.triton_op("hiertcn_fast::gru_gates_triton_out", mutates_args={"out"})
def _gru_gates_triton_out(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> None:
    from ..triton import gru_gates as kernels

    with on_device_of(gi):
        kernels.gru_gates_forward(gi, gh, h, out)


@torch.library.triton_op("hiertcn_fast::gru_gates_backward_triton_out",
                         mutates_args={"grad_gi", "grad_gh", "grad_h"})
def _gru_gates_backward_triton_out(grad_out: torch.Tensor, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
                                   grad_gi: torch.Tensor, grad_gh: torch.Tensor, grad_h: torch.Tensor) -> None:
    from ..triton import gru_gates as kernels

    with on_device_of(grad_out):
        kernels.gru_gates_backward(grad_out, gi, gh, h, grad_gi, grad_gh, grad_h)


@torch.library.triton_op("hiertcn_fast::session_mean_triton_out", mutates_args={"mean"})
def _session_mean_triton_out(items: torch.Tensor, lengths: torch.Tensor, mean: torch.Tensor) -> None:
    from ..triton import gru_session as kernels

    with on_device_of(items):
        kernels.session_mean_forward(items, lengths, mean)


@torch.library.triton_op("hiertcn_fast::session_mean_backward_triton_out", mutates_args={"grad_items"})
def _session_mean_backward_triton_out(grad_mean: torch.Tensor, lengths: torch.Tensor, grad_items: torch.Tensor) -> None:
    from ..triton import gru_session as kernels

    with on_device_of(grad_mean):
        kernels.session_mean_backward(grad_mean, lengths, grad_items)
