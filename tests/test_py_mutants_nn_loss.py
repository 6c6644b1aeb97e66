"""Tests that kill mutants of nn/conv.py, nn/gru.py, nn/_autocast.py and ops/loss.py which the rest of the suite
let survive (a mutation-testing audit): CausalConv1d's constructor checks, initialisation and autocast handling,
TemporalBlock.reset_parameters, TCN and TCNState, the GRU drop-ins, the autocast glue and linear_cross_entropy's
argument checks. Every expected value is hand-computed or recomputed with plain torch (F.conv1d, torch.nn.GRU,
a float64 logsumexp, torch.nn.init under the same seed), never taken from the code under test."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conv_helpers import left_padded_conv1d
from helpers import assert_close, rand
from hiertcn_fast.backends import BackendUnavailableError
from hiertcn_fast.nn import GRU, TCN, CausalConv1d, TemporalBlock
from hiertcn_fast.ops import linear_cross_entropy


# ----------------------------------------------------------------------------------------------------------------
# nn/conv.py: CausalConv1d
# ----------------------------------------------------------------------------------------------------------------

def test_groups_must_divide_the_output_channels_too():
    """Kills C5 (conv.py: the groups check reads only in_channels % groups). nn.Conv1d refuses
    out_channels % groups != 0 at construction; so must CausalConv1d, not at its first forward."""
    with pytest.raises(ValueError):
        torch.nn.Conv1d(4, 5, 3, groups=2)
    with pytest.raises(ValueError, match=r"groups \(2\) must divide"):
        CausalConv1d(4, 5, 3, groups=2)
    CausalConv1d(4, 6, 3, groups=2)  # both divisible: accepted


def test_integer_arguments_are_ints_or_1_tuples_of_one():
    """Kills C1 (conv.py: _one_int unpacks a tuple of any length) and C2 (conv.py: _one_int takes a bool for an
    int). nn.Conv1d's int arguments may be 1-tuples; a longer tuple (a 2-D kernel) or a bool is a TypeError,
    not its first element or 1."""
    for args in ((4, 8, (3, 5)), (4, 8, [3, 1]), (4, 8, True), (4, 8, 3, 1, 0, (2, 2)), (True, 8, 3)):
        with pytest.raises(TypeError, match="must be an int"):
            CausalConv1d(*args)
    conv = CausalConv1d((4,), [8], (3,), 1, 0, (2,))
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.dilation) == (4, 8, 3, 2)


def test_numpy_integers_are_taken_as_nn_conv1d_takes_them():
    """nn.Conv1d takes NumPy integers for its int arguments; the drop-in refused them (found by the audit). They are
    taken as Python ints, and the module then loads nn.Conv1d's state_dict and computes its outputs."""
    sizes = [np.int64(4), np.int32(6), np.int64(3)]
    peer = nn.Conv1d(*sizes, dilation=np.int64(2))
    conv = CausalConv1d(*sizes, dilation=np.int64(2))
    assert [type(v) for v in (conv.in_channels, conv.out_channels, conv.kernel_size, conv.dilation)] == [int] * 4
    conv.load_state_dict(peer.state_dict())
    x = torch.randn(2, 9, 4)
    torch.testing.assert_close(conv(x), left_padded_conv1d(x, peer.weight, peer.bias, 2))
    with pytest.raises(TypeError, match="must be an int"):
        CausalConv1d(4, 6, np.float64(3.0))


def test_context_weight_is_initialised_as_more_input_channels():
    """Kills C7 (conv.py: reset_parameters leaves context_weight as torch.empty's memory). The layer is one conv
    over concat(x, context), so it is initialised as nn.Conv1d(in + ctx, out, k) would be: fan_in = (4 + 2) * 3 = 18,
    the weight and then the context weight drawn within kaiming_uniform_(a=sqrt(5))'s bound 1/sqrt(18), the bias
    within 1/sqrt(18). Recomputed with torch's own draws under the same seed."""
    torch.manual_seed(3)
    conv = CausalConv1d(4, 5, 3, context_channels=2)
    torch.manual_seed(3)
    fan_in = (4 + 2) * 3
    bound = math.sqrt(3.0) * torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)
    assert bound == pytest.approx(1 / math.sqrt(fan_in))
    weight = torch.empty(5, 4, 3).uniform_(-bound, bound)
    context_weight = torch.empty(5, 2, 3).uniform_(-bound, bound)
    bias = torch.empty(5).uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
    assert torch.equal(conv.weight, weight)
    assert torch.equal(conv.context_weight, context_weight)
    assert torch.equal(conv.bias, bias)
    # Re-initialising reaches the context weight too, within the same bound.
    with torch.no_grad():
        conv.context_weight.zero_()
    conv.reset_parameters()
    assert torch.count_nonzero(conv.context_weight) == 10 * 3
    assert conv.context_weight.abs().max() <= bound


def test_channels_last_input_whose_time_equals_its_channels_is_not_a_layout_error():
    """Kills C14 (conv.py: _check_layout blames any x whose dim 1 equals in_channels). x (batch, time, in) with
    time == in_channels is channels-last and valid: it must run, and equal torch's left-padded conv1d."""
    conv = CausalConv1d(4, 5, 3, dilation=2, dtype=torch.float64)
    x = rand(2, 4, 4)
    assert_close(conv(x), left_padded_conv1d(x, conv.weight, conv.bias, 2).detach())
    block = TemporalBlock(4, 4, 3, dtype=torch.float64)
    out = block(x)
    assert out.shape == (2, 4, 4)


def test_a_float64_conv_on_the_cpu_backend_runs_under_cpu_autocast():
    """Kills C15 (conv.py: the cpu backend under autocast refused float64 too). Autocast leaves float64 alone,
    as nn.Conv1d's: the cpu backend's float64 kernel runs, in float64."""
    conv = CausalConv1d(4, 5, 3, backend="cpu", dtype=torch.float64)
    x = rand(2, 6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.float64
    assert_close(out, left_padded_conv1d(x, conv.weight, conv.bias).detach())


def test_a_float32_residual_is_cast_to_the_autocast_dtype_like_the_input():
    """Kills C16 (conv.py: forward under autocast leaves the residual uncast). Under CPU autocast the layer runs
    in bfloat16, a float32 residual (one made outside the region) included: bfloat16 out, close to the float64
    peer relu(relu(conv) + residual)."""
    conv = CausalConv1d(4, 5, 3, activation="relu")
    x, residual = rand(2, 6, 4, dtype=torch.float32), rand(2, 6, 5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x, residual=residual)
    assert out.dtype == torch.bfloat16
    z = torch.relu(left_padded_conv1d(x.double(), conv.weight.double(), conv.bias.double()))
    expected = torch.relu(z + residual.double()).detach()
    torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2)


def test_init_state_defaults_to_the_parameters_device():
    """Kills C18 (conv.py: init_state's device default ignores the parameters' device). On a meta-device module
    (the only non-CPU device here) the state is made on meta, for the layer, the block and the stack."""
    conv = CausalConv1d(4, 5, 3, device="meta")
    assert conv.init_state(2).history.device.type == "meta"
    assert TemporalBlock(4, 5, 3, device="meta").init_state(2).history.device.type == "meta"
    assert all(layer.history.device.type == "meta" for layer in TCN(4, [5, 5], 3, device="meta").init_state(2).layers)
    assert conv.init_state(2, device="cpu").history.device.type == "cpu"


def test_temporal_block_reset_parameters_reinitialises_its_projection():
    """Kills T6 (conv.py: TemporalBlock.reset_parameters skips a plain (context-free) projection). After zeroing
    every parameter, reset_parameters gives the projection nn.Linear's initialisation again: nonzero, within
    1/sqrt(in_features) = 1/2."""
    block = TemporalBlock(4, 6, 3)
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
    block.reset_parameters()
    for p in (block.projection.weight, block.projection.bias, block.conv.weight):
        assert torch.count_nonzero(p) == p.numel()
    assert block.projection.weight.abs().max() <= 0.5 and block.projection.bias.abs().max() <= 0.5


def test_temporal_block_step_records_no_graph():
    """Kills T8 (conv.py: TemporalBlock.step computes the residual projection outside torch.no_grad()). The
    projection's parameters require grad, so without no_grad its nn.Linear records a graph (and saves x_t for the
    weight's gradient) at every served event; the step is documented to record none."""
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    for backend in ("cpu", "reference"):
        block = TemporalBlock(4, 6, 3, context_channels=2, backend=backend)
        state = block.init_state(2)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block.step(torch.randn(2, 4), state, torch.randn(2, 2))
        assert packed == [] and not out.requires_grad, backend


# ----------------------------------------------------------------------------------------------------------------
# nn/conv.py: TCN and TCNState
# ----------------------------------------------------------------------------------------------------------------

def test_tcn_step_refuses_a_context_that_requires_grad():
    """Kills N4 (conv.py: TCN.step looks only at x_t.requires_grad before its inference check). A context that
    expects a gradient (the user state of a model being trained) would silently get none from the step."""
    tcn = TCN(4, [6], kernel_size=3, context_channels=2)
    state = tcn.init_state(2)
    context = torch.randn(2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"step\(\) is for inference"):
        tcn.step(torch.randn(2, 4), state, context)
    with torch.no_grad():
        assert tcn.step(torch.randn(2, 4), state, context).shape == (2, 6)


def test_tcn_dilations_must_match_the_blocks_one_to_one():
    """Kills N2 (conv.py: TCN accepts more dilations than blocks, silently dropping the extra ones)."""
    with pytest.raises(ValueError, match=r"one entry per block \(2\), got 3"):
        TCN(4, [5, 5], kernel_size=3, dilations=[1, 2, 4])
    with pytest.raises(ValueError, match=r"one entry per block \(2\), got 1"):
        TCN(4, [5, 5], kernel_size=3, dilations=[1])
    assert [block.conv.dilation for block in TCN(4, [5, 5], kernel_size=3, dilations=(3, 1)).blocks] == [3, 1]


def test_tcn_step_refuses_a_state_of_fewer_layers():
    """Kills N6 (conv.py: TCN.step refuses only a state with more layers than blocks). A state made by a shallower
    TCN is the clear ValueError, not a step of some of the blocks."""
    tcn = TCN(4, [5, 5, 5], kernel_size=3).eval()
    for other in (TCN(4, [5, 5], kernel_size=3), TCN(4, [5, 5, 5, 5], kernel_size=3)):
        with torch.no_grad(), pytest.raises(ValueError, match=r"state has \d layers but this TCN has 3 blocks"):
            tcn.step(torch.randn(2, 4), other.init_state(2))


def test_tcn_state_to_converts_every_layer_to_the_dtype():
    """Kills N9 (conv.py: TCNState.to passes the device but drops the dtype). A float32 stack's state moved to
    float64 continues in a float64 copy of the stack as the float32 one continues (the histories converted, the
    positions kept)."""
    torch.manual_seed(0)
    tcn = TCN(3, [4, 4], kernel_size=3).eval()
    state = tcn.init_state(2)
    x = torch.randn(6, 2, 3)
    with torch.no_grad():
        for t in range(3):
            tcn.step(x[t], state)
        moved = state.to(dtype=torch.float64)
        assert [layer.history.dtype for layer in moved.layers] == [torch.float64, torch.float64]
        for old, new in zip(state.layers, moved.layers):
            assert torch.equal(new.history, old.history.double()) and torch.equal(new.position, old.position)
        double = TCN(3, [4, 4], kernel_size=3).double().eval()
        double.load_state_dict(tcn.state_dict())
        for t in range(3, 6):
            assert_close(double.step(x[t].double(), moved), tcn.step(x[t], state).double(), torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# nn/gru.py
# ----------------------------------------------------------------------------------------------------------------

def _gru_twin(**kwargs):
    """A torch.nn.GRU and a hiertcn_fast.nn.GRU with its weights (float64, batch_first)."""
    peer = torch.nn.GRU(5, 8, batch_first=True, dtype=torch.float64, **kwargs)
    module = GRU(5, 8, batch_first=True, dtype=torch.float64, **kwargs)
    module.load_state_dict(peer.state_dict())
    return peer, module


def test_gru_dropout_is_off_in_eval_mode():
    """Kills G7 (gru.py: dropout between layers applied whatever self.training). In eval mode a GRU with
    dropout=0.5 is deterministic and equals torch.nn.GRU's eval output."""
    peer, module = _gru_twin(num_layers=2, dropout=0.5)
    peer.eval(), module.eval()
    x, h0 = rand(3, 6, 5), rand(2, 3, 8)
    with torch.no_grad():
        want = peer(x, h0)
        for _ in range(2):
            for got, expected in zip(module(x, h0), want):
                assert_close(got, expected)


def test_gru_dropout_falls_only_between_layers():
    """Kills G8 (gru.py: dropout applied to the first layer's input too). torch.nn.GRU drops out each layer's
    output on its way to the next layer only: with one layer (or in layer 0's final state) training-mode
    dropout changes nothing, so those equal torch's exactly, whatever the random masks."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that dropout does nothing with one layer
        peer, module = _gru_twin(num_layers=1, dropout=0.5)
    x, h0 = rand(3, 6, 5), rand(1, 3, 8)
    with torch.no_grad():
        for got, expected in zip(module.train()(x, h0), peer.train()(x, h0)):
            assert_close(got, expected)
        peer, module = _gru_twin(num_layers=2, dropout=0.5)
        h0 = rand(2, 3, 8)
        _, h_n = module.train()(x, h0)
        _, want = peer.eval()(x, h0)  # layer 0 never sees dropout: its final state is the eval one
        assert_close(h_n[0], want[0])


def test_unbatched_single_layer_gru_keeps_the_layer_axis_of_h_n():
    """Kills G14 (gru.py: unbatched h_n squeezed on every axis). torch.nn.GRU's unbatched h_n is
    (num_layers, hidden_size), (1, 8) here, not (8,)."""
    peer, module = _gru_twin(num_layers=1)
    x, h0 = rand(6, 5), rand(1, 8)
    with torch.no_grad():
        for args in ((x,), (x, h0)):
            output, h_n = module(*args)
            want_output, want_h_n = peer(*args)
            assert output.shape == (6, 8) and h_n.shape == (1, 8)
            assert_close(output, want_output)
            assert_close(h_n, want_h_n)


# ----------------------------------------------------------------------------------------------------------------
# nn/_autocast.py
# ----------------------------------------------------------------------------------------------------------------

def test_float64_modules_stay_float64_under_cpu_autocast():
    """Kills A2 (_autocast.py: autocast_cast casts float64 too). torch.autocast leaves float64 alone: a float64
    CausalConv1d and TCN run in float64 inside a bfloat16 region, equal to their float64 results outside it."""
    torch.manual_seed(0)
    conv = CausalConv1d(4, 5, 3, dtype=torch.float64)
    tcn = TCN(4, [5, 5], kernel_size=3, context_channels=2, dtype=torch.float64)
    x, context = rand(2, 6, 4), rand(2, 2)
    expected_conv = left_padded_conv1d(x, conv.weight, conv.bias).detach()
    with torch.no_grad():
        expected_tcn = tcn(x, context)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got_conv, got_tcn = conv(x), tcn(x, context)
    assert got_conv.dtype == got_tcn.dtype == torch.float64
    assert_close(got_conv, expected_conv)
    assert_close(got_tcn, expected_tcn)


# ----------------------------------------------------------------------------------------------------------------
# ops/loss.py: linear_cross_entropy
# ----------------------------------------------------------------------------------------------------------------

def _loss_peer(features, weight, bias, targets):
    """The summed cross-entropy recomputed in float64 from the same values: logsumexp(row) - row[target]."""
    logits = features.double() @ weight.double().T + (0 if bias is None else bias.double())
    return (torch.logsumexp(logits, 1) - logits.gather(1, targets[:, None])[:, 0]).sum()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_type_inputs_give_a_float32_loss(dtype):
    """Kills L1 (loss.py: the reference leaves half-type logits in their dtype). A half-type call (which auto
    and reference both run through the reference composition) returns a float32 scalar, as documented,
    close to the float64 recomputation."""
    torch.manual_seed(0)
    features, weight, bias = torch.randn(6, 8).to(dtype), (torch.randn(11, 8) / 3).to(dtype), torch.randn(11).to(dtype)
    targets = torch.tensor([0, 3, 10, 5, 5, 1])
    expected = _loss_peer(features, weight, bias, targets)
    for backend in (None, "reference"):
        loss = linear_cross_entropy(features, weight, bias, targets, backend=backend)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=2e-2)


def test_cpu_backend_names_a_weight_or_bias_of_another_dtype_under_autocast():
    """Kills L4 (loss.py: _why_not_fused no longer compares the weight's and bias's dtype with the features').
    Under CPU autocast the argument checks leave mixed dtypes to autocast; backend='cpu' must then say why its
    kernel cannot run (a BackendUnavailableError naming the parameter), not hand the kernel a float32 weight
    next to float64 features."""
    features, targets = rand(5, 4), torch.tensor([0, 6, 2, 2, 3])
    weight, bias = rand(7, 4), rand(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(BackendUnavailableError, match="weight must have the dtype"):
            linear_cross_entropy(features, weight.float(), bias, targets, backend="cpu")
        with pytest.raises(BackendUnavailableError, match="bias must have the dtype"):
            linear_cross_entropy(features, weight, bias.float(), targets, backend="cpu")
        # All float64: autocast leaves it alone and the kernel runs (the float64 recomputation).
        loss = linear_cross_entropy(features, weight, bias, targets, backend="cpu")
    torch.testing.assert_close(loss, _loss_peer(features, weight, bias, targets), rtol=1e-10, atol=1e-10)


def test_a_parameter_on_another_device_is_refused_under_autocast_too():
    """Kills L7 (loss.py: under autocast the weight and bias are not checked at all, not only their dtype). Autocast
    excuses a dtype, never a device: a meta-device weight (uninitialised) next to CPU features is the
    ValueError naming it, not a loss computed from no data (NaN here)."""
    features, targets = rand(5, 4, dtype=torch.float32), torch.tensor([0, 6, 2, 2, 3])
    for backend in (None, "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(ValueError, match="weight is on meta"):
                linear_cross_entropy(features, torch.empty(7, 4, device="meta"), None, targets, backend=backend)
            with pytest.raises(ValueError, match="bias is on meta"):
                linear_cross_entropy(features, rand(7, 4, dtype=torch.float32), torch.empty(7, device="meta"),
                                     targets, backend=backend)


class _AtenCalls(TorchDispatchMode):
    """Records the name of every aten (and hiertcn_fast) op that runs below autograd while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_without_grad_mode_no_gradient_products_are_computed(monkeypatch):
    """Kills L14 (the loss op: leaves requiring grad take the gradient-computing path even under no_grad). Under
    no_grad the documented behaviour is the loss alone: one product per block of rows (the logits), the row
    pass, no gradient products, even though features and weight require grad; the loss equals the float64
    recomputation. With grad mode on, the same call (600 events: more than the 4 features, so blocked) runs
    each block's gradient products too: the features' (mm) and the weight's (addmm_)."""
    import hiertcn_fast.ops.loss as loss_module

    monkeypatch.setattr(loss_module, "_MIN_BLOCK_ROWS", 256)
    monkeypatch.setattr(loss_module, "_MAX_BLOCK_ROWS", 256)
    features, weight = rand(600, 4).requires_grad_(), rand(6, 4).requires_grad_()
    targets = torch.randint(0, 6, (600,))
    with torch.no_grad(), _AtenCalls() as calls:
        loss = linear_cross_entropy(features, weight, None, targets, backend="cpu")
    assert not loss.requires_grad
    assert calls.names.count("mm") == 3 and "addmm_" not in calls.names  # blocks of 256, 256 and 88 rows
    assert calls.names.count("softmax_xent_out") == 3
    torch.testing.assert_close(loss, _loss_peer(features, weight, None, targets).detach(), rtol=1e-10, atol=1e-10)
    with _AtenCalls() as calls:
        loss = linear_cross_entropy(features, weight, None, targets, backend="cpu")
    assert loss.requires_grad
    assert calls.names.count("mm") == 6 and calls.names.count("addmm_") == 3


def test_strided_targets_take_the_cpu_path():
    """Kills L13 (loss.py: targets passed to the row kernel without .contiguous()). A strided view of the targets
    (every other one of a longer vector) is fine input: the cpu backend's loss and gradients equal the float64
    recomputation's, over more than one block of rows."""
    features, weight = rand(600, 4).requires_grad_(), rand(7, 4).requires_grad_()
    targets = torch.randint(0, 7, (1200,))[::2]
    assert not targets.is_contiguous()
    loss = linear_cross_entropy(features, weight, None, targets, backend="cpu")
    expected = _loss_peer(features, weight, None, targets)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    leaves = [features, weight]
    for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_targets_on_another_device_never_reach_the_kernel():
    """Kills L17 (loss.py: _why_not_fused no longer checks the targets' device). Meta-device targets (no data)
    next to CPU features: backend='cpu' says why it cannot run, and auto fails in the reference composition;
    neither returns a loss (the kernel would read no data and return garbage)."""
    features, weight = rand(6, 4), rand(7, 4)
    targets = torch.zeros(6, dtype=torch.int64, device="meta")
    with pytest.raises(BackendUnavailableError, match="targets must be on the device of features"):
        linear_cross_entropy(features, weight, None, targets, backend="cpu")
    with pytest.raises(RuntimeError, match="device"):
        linear_cross_entropy(features, weight, None, targets)
