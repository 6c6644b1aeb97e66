"""Tests written by a mutation-testing audit of the Python op layer (ops/conv.py, ops/gru.py, ops/_common.py,
backends.py): each kills a planted bug the rest of the suite let through (named in its docstring), by checking
against an independent computation (torch's own F.conv1d and GRU cell, plain-torch sums, values worked out by
hand), never against the code's own output."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import hiertcn_fast
from hiertcn_fast.backends import ENV_VAR, requested_backend, resolve, triton_interpreted
from hiertcn_fast.ops import _common
from hiertcn_fast.ops.conv import CausalConvState, causal_conv1d, causal_conv1d_step, tcn_step
from conv_helpers import left_padded_conv1d
from gru_helpers import layer_weights, torch_gru_cell
from helpers import CUDA

BACKENDS_MODULE = importlib.import_module("hiertcn_fast.backends")  # (the package's `backends` is a function)
DTYPES = {name: {torch.float32} for name in ("cuda", "triton", "cpu", "reference")}


def _device(backend):
    """Where a backend's kernels run here: the triton backend on CUDA tensors, or interpreted on CPU tensors
    without a GPU (conftest sets TRITON_INTERPRET then)."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


# ---- _common.py ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_conv_takes_two_channels_whose_elements_are_strided(backend):
    """Kills C4 (_common.py unit_stride_rows: rows of 2 elements with a non-unit stride passed to the kernels as
    they are): x with 2 channels that are every other element of a wider tensor must be read by its strides."""
    wide = torch.randn(2, 5, 4, dtype=torch.float64)
    x = wide[..., ::2]  # (2, 5, 2), last-dim stride 2
    assert x.stride(-1) == 2
    weight = torch.randn(3, 2, 2, dtype=torch.float64)
    out = causal_conv1d(x, weight, backend=backend)
    torch.testing.assert_close(out, left_padded_conv1d(x.contiguous(), weight))


def test_tcn_step_takes_two_channels_whose_elements_are_strided():
    """Kills C4 (_common.py unit_stride_rows) on the stack step, whose kernels read x as unit-stride rows."""
    weight = torch.randn(2, 2, 2, dtype=torch.float64)
    state = CausalConvState.zeros(3, 2, 2, dtype=torch.float64)
    inputs = [torch.randn(3, 4, dtype=torch.float64)[:, ::2] for _ in range(3)]
    outs = [tcn_step(x, [weight], [None], [state], activation=None, backend="cpu") for x in inputs]
    sequence = torch.stack([x.contiguous() for x in inputs], 1)
    conv = left_padded_conv1d(sequence, weight)
    for t, out in enumerate(outs):  # no activation: act(act(z) + x) = z + x
        torch.testing.assert_close(out, conv[:, t] + inputs[t])


def test_poison_outputs_puts_the_previous_setting_back():
    """Kills C7 (_common.py poison_outputs restoring the setting it entered with instead of the one before):
    leaving a poison_outputs(False) block inside a poisoned region must poison again."""
    like = torch.zeros(1)
    with _common.poison_outputs(True):
        with _common.poison_outputs(False):
            pass
        assert _common.new_output((64,), like).isnan().all()
    with _common.poison_outputs(False):
        with _common.poison_outputs(True):
            assert _common.new_output((64,), like).isnan().all()
        # (an unpoisoned allocation's values are whatever memory held: only the flag is checked)
        assert _common._poison is False


# ---- backends.py -----------------------------------------------------------------------------------

def test_an_empty_environment_variable_selects_auto(monkeypatch):
    """Kills B2 (backends.py requested_backend: HIERTCN_BACKEND='' refused as a bad name instead of meaning auto,
    as describe() reports it)."""
    monkeypatch.setenv(ENV_VAR, "")
    assert requested_backend() == "auto"
    assert resolve("op_empty_env", None, torch.device("cpu"), torch.float32, DTYPES) == "cpu"


def test_the_cpu_backend_refuses_tensors_on_another_device():
    """Kills B3 (backends.py _can_run: the cpu backend's device check dropped) and B14 (resolve's memo keyed
    without the device's type, so an answer for CPU tensors served CUDA ones): asked for by name for CUDA (or
    meta) tensors the cpu backend must refuse, naming the device, also after the same op ran on CPU tensors;
    only the device's type is read, so no GPU is needed."""
    assert resolve("op_cpu_elsewhere", "cpu", torch.device("cpu"), torch.float32, DTYPES) == "cpu"
    for device in ("cuda", "meta"):
        with pytest.raises(hiertcn_fast.BackendUnavailableError, match=f"needs CPU tensors, got tensors on {device}"):
            resolve("op_cpu_elsewhere", "cpu", torch.device(device), torch.float32, DTYPES)
    assert resolve("op_cpu_elsewhere", None, torch.device("cpu"), torch.float32, DTYPES) == "cpu"
    assert resolve("op_cpu_elsewhere", None, torch.device("cuda"), torch.float32, DTYPES) != "cpu"


def _gates_by_hand(gi, gh, h):
    """nn.GRU's gate math written out (gate order r, z, n)."""
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    return (1 - z) * torch.tanh(i_n + r * h_n) + z * h


def test_the_reference_asked_for_by_name_runs_inside_torch_func_transforms():
    """Kills B6 (backends.py _resolve_uncached: every backend named inside a torch.func transform refused, the
    reference too): the reference is plain PyTorch, which the transforms see through."""
    gi, gh, h = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64), torch.randn(
        2, 3, dtype=torch.float64)
    got = torch.func.grad(lambda g: hiertcn_fast.ops.gru_gates(g, gh, h, backend="reference").sum())(gi)
    leaf = gi.clone().requires_grad_()
    (want,) = torch.autograd.grad(_gates_by_hand(leaf, gh, h).sum(), leaf)
    torch.testing.assert_close(got, want)
    inside = []
    torch.func.grad(lambda t: inside.append(resolve("an_op_named", "reference", t.device, t.dtype, DTYPES))
                    or t.sum())(torch.ones(2))
    assert inside == ["reference"]


def test_leaving_a_use_backend_block_restores_what_a_trace_reads(monkeypatch):
    """Kills B10 (backends.py use_backend leaving its selection in the module-level copy that traces read before
    torch 2.14): once the block is left, a trace must read the outer selection again, not the block's."""
    module = BACKENDS_MODULE
    monkeypatch.setattr(module, "_TRACE_READS_CONTEXTVAR", False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # read as a trace reads it
    with hiertcn_fast.use_backend("cpu"):
        with hiertcn_fast.use_backend("reference"):
            assert requested_backend() == "reference"
        assert requested_backend() == "cpu"
    assert requested_backend() == "auto"


@pytest.mark.parametrize("value, interpreted", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), ("y", True),
    ("0", False), ("false", False), ("False", False), ("off", False), ("no", False), ("2", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, interpreted):
    """Kills B12 (backends.py triton_interpreted taking only '1'), and guards the audit's fix: Triton interprets its
    kernels for its true words (1, true, yes, on, y; any case) and compiles them for anything else, so the
    backend's status must say the same. Before the fix every value but '' and '0' counted as interpreted: with
    TRITON_INTERPRET=false the triton backend counted as available for CPU tensors and ran into Triton's own error
    on them instead of refusing with BackendUnavailableError and its fix. Where triton.knobs exists (triton 3.4
    and later) Triton itself is asked too, as the peer."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreted() is interpreted
    try:
        from triton import knobs
    except ImportError:
        return
    assert knobs.runtime.interpret is interpreted


# ---- conv.py -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_groups_must_divide_the_output_channels(backend):
    """Kills V2 (conv.py _check_conv_common: only in_channels checked against groups): 3 output channels cannot
    be split into 2 groups, whatever the input channels, and the refusal must say so (not a reshape error)."""
    x = torch.randn(2, 4, 4)
    weight = torch.randn(3, 2, 2)  # in_channels / groups = 2 matches x's 4 channels in 2 groups
    with pytest.raises(ValueError, match=r"groups \(2\) must divide in_channels \(4\) and out_channels \(3\)"):
        causal_conv1d(x, weight, groups=2, backend=backend)
    state = CausalConvState.zeros(2, 4, 2)
    with pytest.raises(ValueError, match="must divide"):
        causal_conv1d_step(x[:, 0], weight, state, groups=2, backend=backend)



@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_context_alone_gets_its_gradient(backend):
    """Kills V10 (conv.py _ContextTable.backward computing the context's gradient when the weight needs one,
    instead of when the context does): a context requiring a gradient next to a frozen context weight."""
    kw = dict(dtype=torch.float64 if backend == "cpu" else torch.float32, device=_device(backend))
    x, weight = torch.randn(2, 7, 3, **kw), torch.randn(4, 3, 3, **kw)
    context_weight = torch.randn(4, 5, 3, **kw)
    context = torch.randn(2, 5, **kw, requires_grad=True)
    grad = torch.randn(2, 7, 4, **kw)
    (got,) = torch.autograd.grad(causal_conv1d(x, weight, dilation=2, context=context, context_weight=context_weight,
                                               backend=backend), context, grad)
    # The context repeated at every step, convolved by torch's conv1d.
    peer_context = context.detach().requires_grad_()
    peer = left_padded_conv1d(x, weight, dilation=2) + left_padded_conv1d(
        peer_context[:, None, :].expand(-1, 7, -1), context_weight, dilation=2)
    (want,) = torch.autograd.grad(peer, peer_context, grad)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_residual_alone_gets_its_gradient_through_an_activation(backend, activation):
    """Kills V14 (conv.py _CausalConvFunction.forward keeping z, or relu's sign bits, only when x, the weight, the
    bias or the context table need a gradient): with only the residual requiring one, its gradient still goes
    through the outer activation, whose derivative needs them."""
    kw = dict(dtype=torch.float64 if backend == "cpu" else torch.float32, device=_device(backend))
    x, weight = torch.randn(2, 6, 3, **kw), torch.randn(4, 3, 2, **kw)
    residual = torch.randn(2, 6, 4, **kw, requires_grad=True)
    grad = torch.randn(2, 6, 4, **kw)
    (got,) = torch.autograd.grad(causal_conv1d(x, weight, activation=activation, residual=residual, backend=backend),
                                 residual, grad)
    act = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation]
    peer_residual = residual.detach().requires_grad_()
    (want,) = torch.autograd.grad(act(act(left_padded_conv1d(x, weight)) + peer_residual), peer_residual, grad)
    torch.testing.assert_close(got, want)



@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_step_is_inference_even_with_weights_that_require_gradients(backend):
    """Kills V21 (conv.py causal_conv1d_step stepping under grad mode): the step is inference only, so with
    parameters requiring gradients (a model's own, outside no_grad) neither its output nor the state it writes
    joins a graph; the output is still the convolution's value at the step. (An input requiring gradients is
    refused: it would silently get none.)"""
    device = _device(backend)
    weight = torch.randn(3, 2, 2, device=device, requires_grad=True)
    bias = torch.randn(3, device=device, requires_grad=True)
    state = CausalConvState.zeros(2, 2, 2, device=device)
    xs = [torch.randn(2, 2, device=device) for _ in range(2)]
    with pytest.raises(RuntimeError, match="causal_conv1d_step is for inference .* but x requires grad"):
        causal_conv1d_step(xs[0].clone().requires_grad_(), weight, state, bias, backend=backend)
    outs = [causal_conv1d_step(x, weight, state, bias, backend=backend) for x in xs]
    assert not any(out.requires_grad for out in outs)
    assert not state.history.requires_grad and state.history.grad_fn is None
    want = left_padded_conv1d(torch.stack(xs, 1).detach(), weight.detach(), bias.detach())
    torch.testing.assert_close(torch.stack(outs, 1), want, atol=1e-5, rtol=1e-5)



def test_a_state_moved_to_its_own_device_is_an_independent_copy():
    """Kills V23 (conv.py CausalConvState.to sharing the position tensor when it needs no move): stepping or
    resetting the copy must leave the original's positions and history as they were."""
    weight = torch.randn(3, 2, 3)
    state = CausalConvState.zeros(2, 2, 3, dilation=2)
    causal_conv1d_step(torch.randn(2, 2), weight, state, backend="reference")
    before_position, before_history = state.position.clone(), state.history.clone()
    copy = state.to("cpu")
    assert copy.kernel_size == 3 and copy.dilation == 2
    causal_conv1d_step(torch.randn(2, 2), weight, copy, backend="reference")
    assert copy.position.tolist() == [2, 2]
    copy.reset(torch.tensor([True, False]))
    assert state.position.tolist() == before_position.tolist() == [1, 1]
    assert torch.equal(state.history, before_history)



@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_stack_of_no_layers_is_a_clear_error(backend):
    """Kills V29 (conv.py tcn_step taking an empty stack): no layers is refused, saying why, on every backend."""
    with pytest.raises(ValueError, match=r"one entry per layer \(at least one\); got 0, 0, 0, 0 and 0"):
        tcn_step(torch.randn(2, 3), [], [], [], backend=backend)



@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_projection_bias_without_its_projection_is_a_clear_error(backend):
    """Kills V32 (conv.py _check_stack: proj_biases[l] without proj_weights[l] let through, and then ignored)."""
    device = _device(backend)
    x, weight = torch.randn(2, 3, device=device), torch.randn(3, 3, 2, device=device)
    state = CausalConvState.zeros(2, 3, 2, device=device)
    with pytest.raises(ValueError, match=r"proj_biases\[0\] is given without proj_weights\[0\]"):
        tcn_step(x, [weight], [None], [state], proj_biases=[torch.randn(3, device=device)], backend=backend)
    assert state.position.tolist() == [0, 0]


@pytest.mark.parametrize("which", ["history", "position"])
def test_the_cpu_stack_refuses_a_state_on_another_device(which):
    """Kills V33 (conv.py _check_stack: the states' devices unchecked): a state on the meta device would be
    stepped by the op's meta kernel, which writes nothing; the stack step must refuse it, naming the tensor."""
    x, weight, state = torch.randn(2, 3), torch.randn(3, 3, 2), CausalConvState.zeros(2, 3, 2)
    setattr(state, which, getattr(state, which).to("meta"))
    with pytest.raises(ValueError, match=rf"states\[0\]\.{which} is on meta but x is on cpu"):
        tcn_step(x, [weight], [None], [state], backend="cpu")


def test_a_prepared_step_follows_a_rebound_position_tensor():
    """Kills V35 (conv.py _prepared_key leaving the states' position tensors out): a state whose position was
    rebound to a new tensor (a new sequence started by replacing it) must be stepped from that tensor, not by a
    plan prepared for the old one."""
    weight = torch.randn(3, 3, 2, dtype=torch.float64)
    state = CausalConvState.zeros(2, 3, 2, dtype=torch.float64)
    xs = [torch.randn(2, 3, dtype=torch.float64) for _ in range(4)]
    for x in xs[:3]:  # the op, then a prepared plan (made on the second call), then the plan again
        tcn_step(x, [weight], [None], [state], activation=None, backend="cpu")
    old_position = state.position
    assert old_position.tolist() == [3, 3]
    state.position = torch.zeros(2, dtype=torch.int64)  # a new sequence; the history's slots are not read at 0
    out = tcn_step(xs[3], [weight], [None], [state], activation=None, backend="cpu")
    # At a sequence's first step only the current tap reads: z = W[:, :, k - 1] x; no activation: z + x.
    torch.testing.assert_close(out, xs[3] @ weight[:, :, 1].T + xs[3])
    assert state.position.tolist() == [1, 1] and old_position.tolist() == [3, 3]



def test_the_cpu_stack_reads_a_strided_projection_bias_by_its_strides():
    """Kills V41 (conv.py tcn_step copying strided biases but not strided projection biases before the fused op,
    which reads them as contiguous rows)."""
    x = torch.randn(2, 3, dtype=torch.float64)
    weight = torch.randn(4, 3, 2, dtype=torch.float64)
    proj_weight = torch.randn(4, 3, dtype=torch.float64)
    proj_bias = torch.randn(8, dtype=torch.float64)[::2]  # every other element
    state = CausalConvState.zeros(2, 3, 2, dtype=torch.float64)
    out = tcn_step(x, [weight], [None], [state], proj_weights=[proj_weight], proj_biases=[proj_bias],
                   activation=None, backend="cpu")
    # A first step: z = W[:, :, 1] x; the residual is the projection x P^T + b; no activation: z + residual.
    torch.testing.assert_close(out, x @ weight[:, :, 1].T + x @ proj_weight.T + proj_bias)


@pytest.mark.cpu_kernels_only  # the CUDA kernels cannot raise without a sync per step: a NaN row instead
def test_the_reference_step_refuses_a_negative_position_in_a_batch_of_one():
    """Kills V42 (conv.py _check_positions_not_negative skipping batches of one row): a lone row with a negative
    position is refused too, as the cpu backend refuses it, and the state is left as it was."""
    weight = torch.randn(2, 2, 2)
    state = CausalConvState.zeros(1, 2, 2)
    state.position.fill_(-1)
    for backend in ("reference", "cpu"):
        with pytest.raises((ValueError, RuntimeError), match=r"position must be >= 0.*row 0 has -1"):
            causal_conv1d_step(torch.randn(1, 2), weight, state, backend=backend)
    assert state.position.tolist() == [-1]



@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_bool_is_not_a_dilation_or_a_group_count(backend):
    """Kills V43 (conv.py _check_int taking a bool, an int subclass, for an int argument)."""
    x, weight = torch.randn(2, 5, 2), torch.randn(2, 2, 2)
    with pytest.raises(TypeError, match="dilation must be an int, got bool"):
        causal_conv1d(x, weight, dilation=True, backend=backend)
    with pytest.raises(TypeError, match="groups must be an int, got bool"):
        causal_conv1d(x, weight, groups=True, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_step_residual_of_the_wrong_width_is_a_clear_error(backend):
    """Kills V47 (conv.py _check_step: the residual's shape unchecked), before the state moves."""
    weight, state = torch.randn(3, 2, 2), CausalConvState.zeros(2, 2, 2)
    with pytest.raises(ValueError, match=r"residual \(batch, out_channels\) must have shape \(2, 3\), got \(2, 4\)"):
        causal_conv1d_step(torch.randn(2, 2), weight, state, residual=torch.randn(2, 4), backend=backend)
    assert state.position.tolist() == [0, 0]



@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_layer_by_layer_stack_refuses_a_projection_bias_of_the_wrong_length(backend):
    """Kills V48 (conv.py tcn_step's layer-by-layer checks: a projection bias's length unchecked), before any
    layer steps."""
    device = _device(backend)
    x, weight = torch.randn(2, 3, device=device), torch.randn(4, 3, 2, device=device)
    state = CausalConvState.zeros(2, 3, 2, device=device)
    with pytest.raises(ValueError, match=r"proj_biases\[0\] must have shape \(4,\), got \(3,\)"):
        tcn_step(x, [weight], [None], [state], proj_weights=[torch.randn(4, 3, device=device)],
                 proj_biases=[torch.randn(3, device=device)], backend=backend)
    assert state.position.tolist() == [0, 0]


def test_the_cpu_stack_refuses_a_context_of_another_batch():
    """Kills V49 (conv.py _check_stack: the context's batch unchecked), in the stack's own words."""
    x, weight, state = torch.randn(2, 3), torch.randn(3, 3, 2), CausalConvState.zeros(2, 3, 2)
    with pytest.raises(ValueError, match=r"context \(batch, ctx_channels\) must have shape \(2, 5\), got \(3, 5\)"):
        tcn_step(x, [weight], [None], [state], context=torch.randn(3, 5), context_weight=torch.randn(3, 5, 2),
                 backend="cpu")


# ---- gru.py ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gates_refuse_a_state_pre_activation_of_the_wrong_width(backend):
    """Kills G1 (gru.py _check_gru_gates: gh's shape unchecked): gh must be (batch, 3 * hidden) like gi."""
    gi, h = torch.randn(2, 9), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"gh \(batch, 3 \* hidden\) must have shape \(2, 9\), got \(2, 6\)"):
        hiertcn_fast.ops.gru_gates(gi, torch.randn(2, 6), h, backend=backend)



def _cell_weights(input_size=4, hidden=3):
    return (torch.randn(3 * hidden, input_size), torch.randn(3 * hidden, hidden), torch.randn(3 * hidden),
            torch.randn(3 * hidden))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_hidden_bias_of_the_wrong_length_is_a_clear_error(backend):
    """Kills G3 (gru.py _well_formed_layer_weights: b_hh's shape unchecked on the fast path, so a wrong one skips
    the full checks): b_hh of 6 elements for hidden 3 is refused by name, for the cell and the sequence."""
    w_ih, w_hh, b_ih, _ = _cell_weights()
    b_hh = torch.randn(6)
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"b_hh must have 3 \* hidden = 9 rows"):
        hiertcn_fast.ops.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, backend=backend)
    with pytest.raises(ValueError, match=r"weights\[0\] \(b_hh\) must have 3 \* hidden = 9 rows"):
        hiertcn_fast.ops.gru(x[:, None], h[None], [(w_ih, w_hh, b_ih, b_hh)], num_layers=1, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_cell_given_only_its_hidden_bias_is_a_clear_error(backend):
    """Kills G4 (gru.py _well_formed_cell not checking that b_ih and b_hh come together: with b_ih None the fast
    path saw no biases and ran, b_hh ignored or misread)."""
    w_ih, w_hh, _, b_hh = _cell_weights()
    with pytest.raises(ValueError, match="b_ih and b_hh must be given together"):
        hiertcn_fast.ops.gru_cell(torch.randn(2, 4), torch.randn(2, 3), w_ih, w_hh, None, b_hh, backend=backend)



@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_sequence_without_steps_is_a_clear_error(backend):
    """Kills G7 (gru.py _check_gru letting an empty time axis through)."""
    x, h0 = torch.randn(2, 0, 4), torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=r"x must hold at least one time step, got shape \(2, 0, 4\)"):
        hiertcn_fast.ops.gru(x, h0, [_cell_weights()], num_layers=1, backend=backend)


def _session_inputs(layers=2):
    items = torch.randn(2, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([2, 0])
    h = torch.randn(layers, 2, 3, dtype=torch.float64)
    keep = torch.ones(2, dtype=torch.float64)
    return items, lengths, h, keep, layer_weights(4, 3, layers, torch.float64, "cpu")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("which", ["lengths", "keep"])
def test_session_update_refuses_lengths_or_keep_on_another_device(backend, which):
    """Kills G13 (gru.py _check_session_update: lengths' device unchecked): lengths (or keep) on the meta device
    next to a CPU state is refused, naming it, for one step and for all steps."""
    items, lengths, h, keep, weights = _session_inputs()
    args = dict(lengths=lengths, keep=keep)
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} is on meta but h is on cpu"):
        hiertcn_fast.ops.session_update(items, args["lengths"], h, args["keep"], weights, backend=backend)
    with pytest.raises(ValueError, match=f"{which} is on meta but h is on cpu"):
        hiertcn_fast.ops.session_update_steps(items[None], args["lengths"][None], h, args["keep"][None], weights,
                                              backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_session_update_refuses_biases_in_some_layers_only(backend):
    """Kills G14 (gru.py _check_session_update: layers with and without biases mixed)."""
    items, lengths, h, keep, weights = _session_inputs()
    weights[1] = weights[1][:2]  # layer 1 without biases, layer 0 with them
    with pytest.raises(ValueError, match="weights must have biases in every layer or in none"):
        hiertcn_fast.ops.session_update(items, lengths, h, keep, weights, backend=backend)



@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_projection_bias_without_a_projection_is_a_clear_error(backend):
    """Kills G15 (gru.py _check_session_update: proj_bias without proj_weight let through, and then ignored)."""
    items, lengths, h, keep, weights = _session_inputs()
    with pytest.raises(ValueError, match="proj_bias needs proj_weight"):
        hiertcn_fast.ops.session_update(items, lengths, h, keep, weights, proj_bias=torch.randn(4, dtype=torch.float64),
                                        backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_session_update_steps_differentiates_a_keep_that_alone_requires_it(backend):
    """Kills G19 (gru.py session_update_steps taking the forward-only path when only keep requires a gradient):
    out[1] = keep * (GRUCell(mean of the session, h) where the row has a session, else h), so the gradient of
    sum(g * out[1]) in keep[0, b] is sum over j of g[b, j] times that state."""
    items, lengths, h, _, weights = _session_inputs(layers=1)
    keep = torch.tensor([[0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    out = hiertcn_fast.ops.session_update_steps(items[None], lengths[None], h, keep, weights, backend=backend)
    g = torch.randn(2, 3, dtype=torch.float64)
    (got,) = torch.autograd.grad((out[1, 0] * g).sum(), keep)
    mean = items[0, :2].mean(0)  # row 0: a session of 2 items; row 1: none (its state stays h)
    state = torch.stack([torch_gru_cell(mean[None], h[0, :1], *weights[0])[0], h[0, 1]])
    torch.testing.assert_close(got, (g * state).sum(1)[None])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_keep_must_be_bool_or_the_states_dtype(backend):
    """Kills G24 (gru.py _check_session_update converting a keep of another dtype silently): keep is a bool
    mask or h's dtype; float32 or int64 next to a float64 state is refused."""
    items, lengths, h, keep, weights = _session_inputs()
    for wrong in (keep.float(), keep.long()):
        with pytest.raises(TypeError, match=rf"keep has dtype {wrong.dtype} but h has torch.float64"):
            hiertcn_fast.ops.session_update(items, lengths, h, wrong, weights, backend=backend)



@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_session_update_refuses_item_embeddings_of_another_batch(backend):
    """Kills G33 (gru.py _check_session_update: the item embeddings' batch unchecked)."""
    items, lengths, h, keep, weights = _session_inputs()
    with pytest.raises(ValueError, match=r"item_embeddings has batch 3 but h \(layers, batch, hidden\) has 2"):
        hiertcn_fast.ops.session_update(torch.randn(3, 3, 4, dtype=torch.float64), lengths, h, keep, weights,
                                        backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_an_upper_layer_takes_the_hidden_size_as_its_input(backend):
    """Kills G2 (gru.py _layer_weights expecting input_size columns in every layer's w_ih, not hidden above layer
    0): a layer-1 w_ih of input_size columns is refused by name; the right one runs, matching torch's GRU cells."""
    x, h0 = torch.randn(2, 1, 4, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)
    weights = layer_weights(4, 3, 2, torch.float64, "cpu")
    wrong = [weights[0], [torch.randn(9, 4, dtype=torch.float64), *weights[1][1:]]]
    with pytest.raises(ValueError, match=r"weights\[1\] \(w_ih\) must have shape \(9, 3\), got \(9, 4\)"):
        hiertcn_fast.ops.gru(x, h0, wrong, num_layers=2, backend=backend)
    # Through the full checks (a non-contiguous lengths skips the fast one) a right stack runs.
    items, _, h, keep, _ = _session_inputs()
    lengths = torch.tensor([2, 9, 0, 9])[::2]  # [2, 0], strided
    out = hiertcn_fast.ops.session_update(items, lengths, h, keep, weights, backend=backend)
    layer0 = torch_gru_cell(items[:1, :2].mean(1), h[0, :1], *weights[0])
    layer1 = torch_gru_cell(layer0, h[1, :1], *weights[1])
    torch.testing.assert_close(out[:, 0], torch.cat([layer0, layer1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1], h[:, 1])  # no session: the state as it was
