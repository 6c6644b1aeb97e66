"""Cases for the compiled CPU kernels that a mutation-testing audit found the other suites did not pin down:
gradients read by their strides, the weight gradient's row chunks, the stack step's thread team at channel
counts that do not split evenly, extreme softmax rows, the keep mask's backward. Each test names what it
guards."""

import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.ops import (CausalConvState, causal_conv1d, causal_conv1d_reference, causal_conv1d_step_reference,
                              linear_cross_entropy, tcn_step)
from conv_helpers import left_padded_conv1d
from gru_helpers import session_update_composition
from helpers import assert_close, rand

BACKEND = "cpu"


def _grads(out, leaves, grad_out):
    return torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_cpu_backward_reads_grad_out_by_its_row_strides(activation, residual):
    """The output concatenated with something else hands the backward a narrow view of the wider gradient: its
    rows are strided. The epilogue's backward (the activation's, and relu's from its sign bits) must step
    through grad_out by its batch and time strides, not as if it were contiguous (batch, time, C) rows."""
    x = rand(3, 11, 5).requires_grad_()
    weight = rand(6, 5, 3, scale=0.4).requires_grad_()
    bias = rand(6).requires_grad_()
    leaves = [x, weight, bias]
    extra_args = {}
    if residual:
        res = rand(3, 11, 6).requires_grad_()
        leaves.append(res)
        extra_args["residual"] = res
    out = causal_conv1d(x, weight, bias, dilation=2, activation=activation, backend=BACKEND, **extra_args)
    grad_wide = rand(3, 11, 9)
    got = _grads(torch.cat([out, torch.zeros(3, 11, 3, dtype=out.dtype)], -1), leaves, grad_wide)
    expected = causal_conv1d_reference(x, weight, bias, dilation=2, activation=activation, **extra_args)
    want = _grads(expected, leaves, grad_wide[..., :6].contiguous())
    for g, w in zip(got, want):
        assert_close(g, w, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_weight_gradient_row_chunks_that_start_mid_sequence(dtype):
    """Past 512 rows (batch x time) the dense weight gradient is summed in row chunks; 3 x 200 rows make two
    chunks of 300, the second starting at step 100 of batch row 1. Each chunk must resume the (batch, step)
    walk where its first row lies, not at step 0 (which shifts every source row and the causal cut-off)."""
    x = rand(3, 200, 6, dtype=dtype).requires_grad_()
    weight = rand(5, 6, 3, dtype=dtype, scale=0.4).requires_grad_()
    grad = rand(3, 200, 5, dtype=dtype)
    out = causal_conv1d(x, weight, dilation=7, activation="tanh", backend=BACKEND)
    got = _grads(out, [x, weight], grad)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = _grads(torch.tanh(left_padded_conv1d(x64, w64, dilation=7)), [x64, w64], grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                   atol=1e-4 if dtype == torch.float32 else 1e-10)


def test_cpu_stack_team_splits_channel_counts_that_are_not_even():
    """With two threads and one tile of rows (batch <= 8) a stack of over 1 MB of weights runs in a thread team
    that splits each layer's output units (32 float32 channels each) and its input channels' history copy
    between the threads. At 95 channels neither splits evenly (3 units, 95 channels): every unit and every
    history channel must still go to exactly one thread (shares from units * tid / nt to units * (tid + 1) / nt,
    not a fixed-size share that drops the remainder), so the steps equal the float64 reference's."""
    channels, kernels, dilations, steps = 95, (5, 4, 5, 3, 5, 4, 5), (1, 2, 1, 3, 1, 2, 1), 9
    assert sum(kernels) * channels * channels * 4 >= 1 << 20  # float32 weights past the team's 1 MiB threshold
    weights = [rand(channels, channels, k, dtype=torch.float32, scale=(channels * k) ** -0.5) for k in kernels]
    biases = [rand(channels, dtype=torch.float32) for _ in kernels]
    xs = rand(2, steps, channels, dtype=torch.float32)
    states = [CausalConvState.zeros(2, channels, k, d, dtype=torch.float32) for k, d in zip(kernels, dilations)]
    ref_states = [CausalConvState.zeros(2, channels, k, d, dtype=torch.float64) for k, d in zip(kernels, dilations)]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for t in range(steps):
            with torch.no_grad():
                out = tcn_step(xs[:, t], weights, biases, states, backend=BACKEND)
                h = xs[:, t].double()
                for l, state in enumerate(ref_states):
                    h = causal_conv1d_step_reference(h, weights[l].double(), state, biases[l].double(), residual=h,
                                                     activation="relu")
            torch.testing.assert_close(out.double(), h, rtol=1e-4, atol=1e-4, msg=f"step {t}")
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous


def test_cpu_softmax_rows_whose_logits_are_all_far_below_zero():
    """The fused loss shifts each row by its maximum; a row whose logits are all around -1000 must be shifted by
    that maximum (the running max starts from the row's first logit, not from 0), else every exponential
    underflows, the row's sum is 0 and the loss and gradients are infinite or NaN."""
    features = rand(6, 4, dtype=torch.float32).requires_grad_()
    weight = rand(20, 4, dtype=torch.float32, scale=0.5).requires_grad_()
    bias = (rand(20, dtype=torch.float32) - 1000.0).requires_grad_()
    targets = torch.randint(0, 20, (6,))
    ours = linear_cross_entropy(features, weight, bias, targets, backend=BACKEND)
    f64 = [t.detach().double().requires_grad_() for t in (features, weight, bias)]
    expected = F.cross_entropy(F.linear(*f64), targets, reduction="sum")
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)
    for g, w in zip(_grads(ours, [features, weight, bias], None), _grads(expected, f64, None)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_cpu_session_backward_writes_every_element_of_grad_h():
    """The keep mask's backward sends each row's gradient either to the GRU's states or to the kept old state
    and must zero the other side (grad_h's rows with a session receive only the gates' part after it). The op's
    grad_h arrives uninitialised (here NaN-filled), so a side left unwritten shows up as NaN or a wrong value."""
    ops = torch.ops.hiertcn_fast
    batch, time, dim, hidden, layers = 5, 4, 3, 6, 2
    items = rand(batch, time, dim)
    lengths = torch.tensor([0, 2, 4, 0, 1])
    h = rand(layers, batch, hidden)
    keep = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    flat = []
    for l in range(layers):
        flat += [rand(3 * hidden, dim if l == 0 else hidden, scale=0.4), rand(3 * hidden, hidden, scale=0.4),
                 rand(3 * hidden, scale=0.4), rand(3 * hidden, scale=0.4)]
    saved = dict(out=torch.empty_like(h), states=torch.empty_like(h), session_mean=torch.empty(batch, dim,
                 dtype=torch.float64), projected=None, gates=torch.empty(layers, batch, 4 * hidden, dtype=torch.float64))
    ops.session_update_forward_out(items, lengths, h, keep, flat, None, None, **saved)
    grad_out = rand(layers, batch, hidden)
    nan = float("nan")
    grads = dict(grad_item_embeddings=torch.full_like(items, nan), grad_h=torch.full_like(h, nan),
                 grad_weights=[torch.full_like(t, nan) for t in flat], grad_proj_weight=None, grad_proj_bias=None)
    ops.session_update_backward_out(grad_out, items, lengths, h, keep, flat, None, saved["session_mean"], None,
                                    saved["states"], saved["gates"], **grads)
    leaves = [t.clone().requires_grad_() for t in (items, h, *flat)]
    expected = session_update_composition(leaves[0], lengths, leaves[1], keep,
                                          [leaves[2 + 4 * l: 6 + 4 * l] for l in range(layers)])
    want = torch.autograd.grad(expected, leaves, grad_out)
    assert_close(grads["grad_h"], want[1], torch.float64)
    assert_close(grads["grad_item_embeddings"], want[0], torch.float64)
    for got, w in zip(grads["grad_weights"], want[2:]):
        assert_close(got, w, torch.float64)
