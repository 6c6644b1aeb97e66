"""Regression tests for the op-layer audit's findings (D1-D5): empty tensors of any strides, session lengths
out of range on every backend, bfloat16 in the Triton interpreter, linear_cross_entropy's weight and bias
against its features, and the step state's position on every backend."""

import pytest
import torch

from hiertcn_fast import BackendUnavailableError
from hiertcn_fast.backends import triton_interpreted
from hiertcn_fast.ops import (CausalConvState, causal_conv1d, causal_conv1d_reference, causal_conv1d_step,
                              causal_conv1d_step_reference, gru, gru_cell, gru_gates, linear_cross_entropy,
                              linear_cross_entropy_reference, session_update, session_update_reference, tcn_step)

from helpers import BACKEND_DEVICES, EMULATING_CUDA, assert_close, rand

INTERPRETED = pytest.mark.skipif(torch.cuda.is_available() or not triton_interpreted(),
                                 reason="tests the Triton interpreter on CPU tensors")


def empty(*shape, dtype=torch.float64):
    """An empty tensor whose strides are all 0 (an expanded one), as autograd hands a sum's gradient over a
    batch of 0 to a backward; .contiguous() returns it unchanged (an empty tensor counts as contiguous)."""
    return torch.zeros(1, dtype=dtype).expand(*shape)


# ---- D1: empty tensors with any strides ------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("residual", [False, True])
def test_causal_conv1d_backward_of_an_empty_batch_gives_zero_gradients(activation, residual):
    """The gradient of a sum over a batch of 0 reaches the backward as an expanded zero (strides all 0), which
    the kernels' stride check refused: the backward must give the reference's empty and zero gradients."""
    leaves = dict(x=torch.zeros(0, 5, 4, dtype=torch.float64), weight=rand(6, 4, 3), bias=rand(6))
    if residual:
        leaves["residual"] = torch.zeros(0, 5, 6, dtype=torch.float64)
    for t in leaves.values():
        t.requires_grad_()
    out = causal_conv1d(**leaves, dilation=2, activation=activation, backend="cpu")
    assert out.shape == (0, 5, 6)
    out.sum().backward()
    for name, t in leaves.items():
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert torch.equal(t.grad, torch.zeros_like(t)), name


def test_causal_conv1d_takes_empty_inputs_of_any_strides():
    weight = rand(6, 4, 3)
    for x in (empty(0, 5, 4), torch.zeros(0, 4, 5, dtype=torch.float64).transpose(1, 2)):
        out = causal_conv1d(x, weight, backend="cpu")
        assert out.shape == (0, 5, 6)
        assert out.shape == causal_conv1d_reference(x, weight).shape
    out = causal_conv1d(torch.zeros(0, 5, 4, dtype=torch.float64), weight, residual=empty(0, 5, 6),
                        activation="tanh", backend="cpu")
    assert out.shape == (0, 5, 6)


@pytest.mark.parametrize("prepared", [False, True])
def test_steps_take_empty_inputs_of_any_strides(prepared):
    weight = rand(6, 4, 3)
    out = causal_conv1d_step(empty(0, 4), weight, CausalConvState.zeros(0, 4, 3, 1, dtype=torch.float64),
                             residual=empty(0, 6), backend="cpu")
    assert out.shape == (0, 6)
    weights, states = [rand(4, 4, 3), rand(4, 4, 3)], [CausalConvState.zeros(0, 4, 3, d, dtype=torch.float64)
                                                       for d in (1, 2)]
    # The third call with the same arguments runs the prepared step (csrc/python/tcn_step_plan.cpp).
    for _ in range(3 if prepared else 1):
        out = tcn_step(empty(0, 4), weights, [None, None], states, backend="cpu")
        assert out.shape == (0, 4)
    if not EMULATING_CUDA:  # emulated, every step runs through the op (tests/cuda_emu/proxy.py), never prepared
        assert (states[0]._prepared[2] is not None) == prepared


def test_gru_ops_take_empty_inputs_of_any_strides():
    cell = torch.nn.GRUCell(4, 5).double()
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert gru_cell(empty(0, 4), empty(0, 5), *w, backend="cpu").shape == (0, 5)
    with torch.no_grad():
        assert gru_cell(empty(0, 4), empty(0, 5), *w, backend="cpu").shape == (0, 5)
    assert gru_gates(empty(0, 15), empty(0, 15), empty(0, 5), backend="cpu").shape == (0, 5)
    module = torch.nn.GRU(4, 5, batch_first=True).double()
    output, h_n = gru(empty(0, 3, 4), empty(1, 0, 5), module.all_weights, num_layers=1, backend="cpu")
    assert output.shape == (0, 3, 5) and h_n.shape == (1, 0, 5)
    out = session_update(empty(0, 3, 4), torch.zeros(0, dtype=torch.long), empty(1, 0, 5), empty(0),
                         module.all_weights, backend="cpu")
    assert out.shape == (0, 1, 5) or out.shape == (1, 0, 5)


def test_gru_backward_of_an_empty_batch_gives_zero_gradients():
    module = torch.nn.GRU(4, 5, batch_first=True).double()
    x = torch.zeros(0, 3, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(1, 0, 5, dtype=torch.float64, requires_grad=True)
    output, h_n = gru(x, h0, module.all_weights, num_layers=1, backend="cpu")
    (output.sum() + h_n.sum()).backward()
    assert x.grad.shape == x.shape and h0.grad.shape == h0.shape
    for p in module.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


# ---- D2: session lengths outside [0, time] ----------------------------------------------------------

def _session_args(dtype):
    module = torch.nn.GRU(3, 4).to(dtype)
    weights = [[p.detach() for p in layer] for layer in module.all_weights]
    return rand(2, 5, 3, dtype=dtype), torch.zeros(1, 2, 4, dtype=dtype), torch.ones(2, dtype=dtype), weights


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("lengths", [[7, 5], [-1, 5]], ids=["too long", "negative"])
@pytest.mark.parametrize("dtype_of_lengths", [torch.int64, torch.int32])  # the fast path and the converting one
@pytest.mark.cpu_kernels_only  # lengths out of range: the CUDA entry point clamps them (no device sync)
def test_session_lengths_out_of_range_are_an_error_on_every_backend(backend, device, lengths, dtype_of_lengths):
    if device != "cpu":
        pytest.skip("lengths are checked on CPU tensors (CUDA kernels clamp them)")
    items, h, keep, weights = _session_args(torch.float32)
    lengths = torch.tensor(lengths, dtype=dtype_of_lengths)
    # The cpu kernel's own check (TORCH_CHECK_VALUE) and the Python one raise the same ValueError.
    low, high = min(lengths.tolist()), max(lengths.tolist())
    with pytest.raises(ValueError, match=rf"lengths must lie in \[0, time = 5\], got values in \[{low}, {high}\]"):
        session_update(items, lengths, h, keep, weights, backend=backend)


def test_session_update_reference_checks_lengths_and_keeps_valid_ones():
    items, h, keep, weights = _session_args(torch.float64)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, time = 5\], got values in \[0, 6\]"):
        session_update_reference(items, torch.tensor([0, 6]), h, keep, weights)
    for lengths in ([0, 5], [5, 3]):  # the ends of the range are lengths
        lengths = torch.tensor(lengths)
        assert_close(session_update(items, lengths, h, keep, weights, backend="reference"),
                     session_update(items, lengths, h, keep, weights, backend="cpu"))


# ---- D3: bfloat16 in the Triton interpreter ---------------------------------------------------------

@INTERPRETED
def test_interpreted_triton_refuses_bfloat16_causal_conv1d():
    """The interpreter computes bfloat16 tl.dot wrongly (triton-lang/triton#11584): the triton backend must
    refuse bfloat16 CPU tensors with the reason, not return garbage; auto runs a backend that works."""
    x, weight = rand(2, 6, 4).bfloat16(), rand(5, 4, 3).bfloat16()
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' cannot run this call: the Triton "
                                                      r"interpreter .* computes torch.bfloat16 tl.dot wrongly"):
        causal_conv1d(x, weight, backend="triton")
    expected = causal_conv1d_reference(x.double(), weight.double())
    assert_close(causal_conv1d(x, weight), expected, torch.bfloat16)
    assert_close(causal_conv1d(x, weight, backend="auto"), expected, torch.bfloat16)
    # float16 is computed right there, and the step kernels (no tl.dot) keep bfloat16.
    assert_close(causal_conv1d(x.half(), weight.half(), backend="triton"), expected, torch.float16)
    state, reference_state = (CausalConvState.zeros(2, 4, 3, 1, dtype=torch.bfloat16) for _ in range(2))
    for t in range(3):
        assert_close(causal_conv1d_step(x[:, t], weight, state, backend="triton"),
                     causal_conv1d_step_reference(x[:, t], weight, reference_state).double(), torch.bfloat16)


# ---- D4: linear_cross_entropy's weight and bias against features ------------------------------------

@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
def test_linear_cross_entropy_checks_weight_and_bias_dtype_and_device(backend):
    features, weight, bias = rand(3, 4, dtype=torch.float32), rand(5, 4, dtype=torch.float32), rand(5, dtype=torch.float32)
    targets = torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but features has torch.float32"):
        linear_cross_entropy(features, weight.double(), bias, targets, backend=backend)
    with pytest.raises(TypeError, match="bias has dtype torch.float64 but features has torch.float32"):
        linear_cross_entropy(features, weight, bias.double(), targets, backend=backend)
    with pytest.raises(ValueError, match="weight is on meta but features is on cpu"):
        linear_cross_entropy(features, weight.to("meta"), None, targets, backend=backend)
    with pytest.raises(ValueError, match="bias is on meta but features is on cpu"):
        linear_cross_entropy(features, weight, bias.to("meta"), targets, backend=backend)


def test_linear_cross_entropy_leaves_mixed_dtypes_to_autocast():
    """Under autocast the product casts its operands itself: bfloat16 features next to a float32 output layer
    are what autocast makes, and keep working."""
    features, weight, bias = rand(3, 4, dtype=torch.float32), rand(5, 4, dtype=torch.float32), rand(5, dtype=torch.float32)
    targets = torch.tensor([0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(features.bfloat16(), weight, bias, targets)
        expected = linear_cross_entropy_reference(features.bfloat16(), weight, bias, targets)
    torch.testing.assert_close(loss, expected)


# ---- D5: the step state's position --------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_step_position_must_be_an_int64_batch_vector_on_every_backend(backend, device):
    weight = rand(5, 8, 3, dtype=torch.float32, device=device)
    x = rand(3, 8, dtype=torch.float32, device=device)
    for position, shown in ((torch.zeros(3, device=device), r"torch.float32 \(3,\)"),
                            (torch.zeros(3, dtype=torch.int32, device=device), r"torch.int32 \(3,\)"),
                            (torch.zeros(2, dtype=torch.int64, device=device), r"torch.int64 \(2,\)"),
                            (torch.zeros(3, dtype=torch.int64, device="meta"), r"torch.int64 \(3,\) on meta"),
                            ([0, 0, 0], "list")):
        state = CausalConvState(torch.zeros(3, 2, 8, device=device), position, 3, 1)
        with pytest.raises(ValueError, match=r"state.position must be (a contiguous|an) int64 \(3,\) tensor on x's "
                                             rf"device \({device}\), got {shown}"):
            causal_conv1d_step(x, weight, state, backend=backend)
        assert torch.equal(state.history, torch.zeros_like(state.history))


@pytest.mark.cpu_kernels_only  # the CUDA kernels cannot raise without a sync per step: a NaN row instead
def test_reference_step_refuses_a_negative_position_as_the_cpu_backend_does():
    weight, x = rand(5, 8, 3), rand(3, 8)
    for backend in ("reference", "cpu"):
        state = CausalConvState.zeros(3, 8, 3, 2, dtype=torch.float64)
        state.position[1] = -3
        history = state.history.clone()
        with pytest.raises(ValueError, match=r"the step state's position must be >= 0 \(steps taken since the row's "
                                        r"reset\); row 1 has -3"):
            causal_conv1d_step(x, weight, state, backend=backend)
        assert state.position.tolist() == [0, -3, 0] and torch.equal(state.history, history)
    state = CausalConvState.zeros(3, 8, 3, 2, dtype=torch.float64)
    state.position[2] = -1
    with pytest.raises(ValueError, match="row 2 has -1"):
        causal_conv1d_step_reference(x, weight, state)


def test_reference_tcn_step_refuses_a_negative_position_before_any_layer_steps():
    weights = [rand(4, 4, 3), rand(4, 4, 3)]
    states = [CausalConvState.zeros(2, 4, 3, d, dtype=torch.float64) for d in (1, 2)]
    states[1].position[1] = -7
    before = [(s.history.clone(), s.position.clone()) for s in states]
    with pytest.raises(ValueError, match=r"position must be >= 0.*layer 1, row 1 has -7"):
        tcn_step(rand(2, 4), weights, [None, None], states, backend="reference")
    for state, (history, position) in zip(states, before):
        assert torch.equal(state.history, history) and torch.equal(state.position, position)
    states[1].position = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"layer 1: state.position must be an int64 \(2,\) tensor"):
        tcn_step(rand(2, 4), weights, [None, None], states, backend="reference")
    assert torch.equal(states[0].position, before[0][1])


# ---- session 30's audit ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shapes,layer,width", [([(4, 2, 3)], 0, 4), ([(4, 5, 3)], 0, 4), ([(4, 4, 3), (4, 6, 3)], 1, 4)])
def test_tcn_step_names_a_weight_of_the_wrong_input_width(backend, shapes, layer, width):
    """The cpu kernel's check named its packed copy of the weight, with a permuted shape ("packed_weights[0] must be
    ... got shape [3, 2, 4]")."""
    from hiertcn_fast.ops.conv import CausalConvState, tcn_step

    x = torch.randn(2, 4)
    weights = [torch.randn(shape) for shape in shapes]
    states = [CausalConvState.zeros(2, w.shape[1], w.shape[2]) for w in weights]
    with pytest.raises(ValueError, match=rf"weights\[{layer}\] \(out_channels, in_channels, k\) must have {width} "
                                         rf"input channels .*got shape \({', '.join(map(str, shapes[layer]))}\)"):
        tcn_step(x, weights, [None] * len(weights), states, backend=backend)


@pytest.mark.parametrize("module", ["block", "tcn"])
def test_an_unbatched_x_with_a_context_is_refused_for_its_rank(module):
    """With a context, the context's batch check ran first and blamed the context ("must have x's batch 7")."""
    from hiertcn_fast.nn import TCN, TemporalBlock

    layer = TemporalBlock(3, 4, 2, context_channels=2) if module == "block" else TCN(3, [4], 2, context_channels=2)
    for context in (torch.randn(1, 2), torch.randn(7, 2), None):
        with pytest.raises(ValueError, match=r"x must be 3-D .*got shape \(7, 3\)"):
            layer(torch.randn(7, 3), context)


def test_the_reference_session_mean_clamps_lengths_as_the_device_kernels_do():
    """On a GPU, session_update's lengths are not checked (that would synchronise): the CUDA and Triton kernels clamp
    them to [0, time]; the reference divided a too-long row's sum by its unclamped length (row 0: by 7, not 4)."""
    from hiertcn_fast.ops.gru import _session_mean_reference

    items = torch.randn(3, 4, 5, dtype=torch.float64)
    got = _session_mean_reference(items, torch.tensor([7, -2, 2]))
    expected = torch.stack([items[0].mean(0), torch.zeros(5, dtype=torch.float64), items[2, :2].mean(0)])
    torch.testing.assert_close(got, expected)
