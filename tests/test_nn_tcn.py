"""hiertcn_fast.nn causal convolution modules: nn.Conv1d compatibility, the TemporalBlock semantics,
and TCN stepping equal to its forward."""

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.nn import TCN, CausalConv1d, TemporalBlock
from conv_helpers import left_padded_conv1d
from helpers import BACKEND_DEVICES, COMPARE_DTYPE, assert_close, rand


def test_causal_conv1d_loads_an_nn_conv1d_state_dict():
    torch_conv = torch.nn.Conv1d(6, 9, 4, dilation=3, groups=3).double()
    conv = CausalConv1d(6, 9, 4, dilation=3, groups=3, dtype=torch.float64)
    conv.load_state_dict(torch_conv.state_dict())
    x = rand(2, 17, 6)
    expected = torch_conv(F.pad(x.transpose(1, 2), (9, 0))).transpose(1, 2)
    assert_close(conv(x), expected.detach())


def test_causal_conv1d_initialises_like_nn_conv1d():
    torch.manual_seed(0)
    torch_conv = torch.nn.Conv1d(5, 7, 3)
    torch.manual_seed(0)
    conv = CausalConv1d(5, 7, 3)
    assert torch.equal(conv.weight, torch_conv.weight) and torch.equal(conv.bias, torch_conv.bias)


def test_causal_conv1d_with_context_initialises_as_one_nn_conv1d_over_the_concatenation():
    """weight, context weight and bias all within nn.Conv1d(in + context, out, k)'s bound, each reaching near it (the
    weight and the bias once had bounds of in * k alone, the context weight of context * k alone)."""
    torch.manual_seed(0)
    conv = CausalConv1d(8, 16, 3, context_channels=24)
    bound = 1 / ((8 + 24) * 3) ** 0.5
    for parameter in (conv.weight, conv.context_weight, conv.bias):
        assert bound * 0.8 < parameter.abs().max() <= bound
    # bias=False and no context: both registered as None, as nn.Conv1d registers its absent bias, so a plain
    # tensor is refused instead of becoming an attribute that forward reads and step() does not.
    plain = CausalConv1d(4, 4, 3, bias=False)
    assert plain._parameters["bias"] is None and plain._parameters["context_weight"] is None
    with pytest.raises(TypeError, match="bias"):
        plain.bias = torch.zeros(4)
    plain.bias = torch.nn.Parameter(torch.zeros(4))
    assert set(plain.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("in_channels,out_channels", [(6, 6), (4, 7)])
def test_temporal_block_semantics(in_channels, out_channels):
    block = TemporalBlock(in_channels, out_channels, kernel_size=5, dilation=2, context_channels=3,
                          dtype=torch.float64)
    x, context = rand(2, 11, in_channels), rand(2, 3)
    conv = block.conv
    concatenated = torch.cat([x, context[:, None].expand(-1, 11, -1)], 2)
    z = left_padded_conv1d(concatenated, torch.cat([conv.weight, conv.context_weight], 1), conv.bias, 2)
    # The block's input is concat(x, context) at every step: its residual is a linear projection of it (the
    # official HierTCN's first block, 384 -> 128), here even where in_channels == out_channels.
    assert block.projection is not None and block.context_projection.bias is None
    projection = torch.cat([block.projection.weight, block.context_projection.weight], 1)
    residual = torch.nn.functional.linear(concatenated, projection, block.projection.bias)
    assert_close(block(x, context), torch.relu(torch.relu(z) + residual).detach())
    # Stepping gives the forward's outputs.
    state = block.init_state(2)
    with torch.no_grad():
        steps = torch.stack([block.step(x[:, t], state, context) for t in range(11)], 1)
    assert_close(steps, block(x, context).detach())


def test_temporal_block_residual_projection_is_initialised_as_one_linear_over_the_concatenation():
    torch.manual_seed(0)
    block = TemporalBlock(16, 16, context_channels=48)
    bound = 1 / (16 + 48) ** 0.5  # nn.Linear(64, 16)'s: kaiming_uniform(a=sqrt(5)) and its bias bound
    weights = torch.cat([block.projection.weight, block.context_projection.weight], 1)
    assert weights.shape == (16, 64)
    assert weights.abs().max() <= bound and weights.abs().max() > 0.9 * bound
    assert block.projection.bias.abs().max() <= bound and block.projection.bias.abs().max() > 0.5 * bound
    block.reset_parameters()
    assert not torch.equal(torch.cat([block.projection.weight, block.context_projection.weight], 1), weights)
    assert torch.cat([block.projection.weight, block.context_projection.weight], 1).abs().max() <= bound
    # Without context the residual is the input itself where the widths agree, as before.
    assert TemporalBlock(16, 16).projection is None and TemporalBlock(16, 16).context_projection is None
    assert set(TemporalBlock(16, 16, context_channels=4).state_dict()) == {
        "conv.weight", "conv.bias", "conv.context_weight", "projection.weight", "projection.bias",
        "context_projection.weight"}


def test_tcn_shapes_and_receptive_field():
    tcn = TCN(5, [8, 8, 6], kernel_size=3, context_channels=4)
    assert [b.conv.dilation for b in tcn.blocks] == [1, 2, 4]
    assert tcn.receptive_field == 1 + 2 * (1 + 2 + 4)
    out = tcn(torch.randn(2, 10, 5), torch.randn(2, 4))
    assert out.shape == (2, 10, 6)
    # Causality: changing a later step never changes an earlier output.
    x = torch.randn(1, 10, 5)
    context = torch.randn(1, 4)
    changed = x.clone()
    changed[:, 6:] += 1
    assert torch.equal(tcn(x, context)[:, :6], tcn(changed, context)[:, :6])
    with pytest.raises(ValueError, match="context_channels=4"):
        tcn(x)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_tcn_step_equals_forward(backend, device):
    dtype = COMPARE_DTYPE[backend]
    tcn = TCN(5, [8, 6], kernel_size=3, context_channels=4, backend=backend, device=device, dtype=dtype)
    x, context = rand(3, 9, 5, dtype=dtype, device=device), rand(3, 4, dtype=dtype, device=device)
    with torch.no_grad():
        full = tcn(x, context)
        state = tcn.init_state(3)
        steps = torch.stack([tcn.step(x[:, t], state, context) for t in range(9)], 1)
    assert_close(steps, full, dtype)
    # A new session in row 2 only: that row restarts from an empty history, while rows 0 and 1 continue their
    # sequences (their tenth step is that of a forward over ten steps).
    state.reset(torch.tensor([2], device=device))
    with torch.no_grad():
        again = tcn.step(x[:, 0], state, context)
        longer = tcn(torch.cat([x, x[:, :1]], 1), context)
    assert_close(again[2], full[2, 0], dtype)
    assert_close(again[:2], longer[:2, 9], dtype)


def test_tcn_state_moves_and_continues():
    tcn = TCN(3, [4], kernel_size=3, dtype=torch.float64)
    x = rand(2, 6, 3)
    with torch.no_grad():
        full = tcn(x)
        state = tcn.init_state(2)
        first = [tcn.step(x[:, t], state) for t in range(3)]
        moved = state.to("cpu", torch.float64)
        assert moved.layers[0].history is not state.layers[0].history
        rest = [tcn.step(x[:, t], moved) for t in range(3, 6)]
    assert_close(torch.stack(first + rest, 1), full)


def test_tcn_trains():
    torch.manual_seed(0)
    tcn = TCN(4, [8, 8], kernel_size=3)
    optimiser = torch.optim.Adam(tcn.parameters(), lr=1e-2)
    x = torch.randn(8, 12, 4)
    target = torch.roll(x, 1, dims=1)[..., :1].expand(-1, -1, 8)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = F.mse_loss(tcn(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_tcn_step_shortcut_runs_only_for_the_objects_it_was_made_for(monkeypatch):
    """TCN.step skips the op's argument handling when the same TCN steps the same state with the same modules,
    parameters, state tensors and context as last time; any replaced, rebound or modified one, or another
    backend asked for, must give the result of a fresh computation (a twin TCN on the reference backend)."""
    import copy

    import hiertcn_fast.nn.conv as nn_conv
    from hiertcn_fast import _extension, use_backend
    from hiertcn_fast.ops.conv import forget_weight_caches
    if not _extension.has_tcn_step_plan():
        # The suite requires the built extension (test_backends), and every build of it has the prepared step
        # (csrc/python/tcn_step_plan.cpp): without it the shortcut under test silently never runs.
        pytest.fail("the compiled extension has no prepared TCN step (hiertcn_fast._C.TcnStepPlan), a build "
                    f"regression: {_extension.load_error() or 'loaded, but without its python bindings'}")
    runs = []
    real = nn_conv.TCN._fast_step

    class Counted:  # the compiled shortcut, its steps counted
        def __init__(self, shortcut):
            self.shortcut = shortcut

        def step(self, *args):
            out = self.shortcut.step(*args)
            if out is not None:
                runs.append(1)
            return out

    def counted(*args):
        shortcut = real(*args)
        return None if shortcut is None else Counted(shortcut)

    monkeypatch.setattr(nn_conv.TCN, "_fast_step", counted)
    torch.manual_seed(0)
    tcn = TCN(5, [6, 6, 4], kernel_size=3, context_channels=3, dtype=torch.float64)
    twin = copy.deepcopy(tcn)
    state, twin_state = tcn.init_state(2), twin.init_state(2)
    context = rand(2, 3)

    def step(expect_shortcut, x=None):
        before = len(runs)
        x = rand(2, 5) if x is None else x
        with torch.no_grad():
            out = tcn.step(x, state, context)
            with use_backend("reference"):
                expected = twin.step(x, twin_state, context)
        assert_close(out, expected)
        assert (len(runs) > before) == expect_shortcut

    step(False)  # the op
    step(False)  # the op's prepared step, made now
    step(True)
    step(True)

    def both(change):
        change(tcn)
        change(twin)

    # A parameter replaced by another Parameter: never the old packing.
    both(lambda m: setattr(m.blocks[1].conv, "weight", torch.nn.Parameter(m.blocks[1].conv.weight.detach() * -1)))
    step(False)
    step(False)
    step(True)
    # A weight modified in place: the prepared step refuses, and the op repacks and prepares again in the same
    # call. A bias modified in place is read as it is now (it is not packed).
    with torch.no_grad():
        both(lambda m: m.blocks[2].conv.weight.mul_(3))
    step(False)
    step(True)
    with torch.no_grad():
        both(lambda m: m.blocks[2].conv.bias.mul_(3))
    step(True)
    # New storage under the same weight; under the context weight (the context term is recomputed from it).
    both(lambda m: setattr(m.blocks[0].conv.weight, "data", m.blocks[0].conv.weight.data * 0.5))
    step(False)
    step(True)
    both(lambda m: setattr(m.blocks[0].conv.context_weight, "data", m.blocks[0].conv.context_weight.data * 0.5))
    step(False)  # the full path recomputes the context's table
    step(True)
    # A whole block replaced (its weights copied into the twin's).
    block = TemporalBlock(6, 6, 3, 2, dtype=torch.float64)
    tcn.blocks[1] = block
    twin.blocks[1] = copy.deepcopy(block)
    step(False)
    step(False)
    step(True)
    # A state tensor rebound.
    state.layers[2].history = state.layers[2].history.clone()
    step(False)
    step(False)
    step(True)
    # Another context tensor (a new session's user state).
    context = rand(2, 3)
    step(False)
    step(False)
    step(True)
    # Another backend asked for: by the environment, then by the first conv.
    monkeypatch.setenv("HIERTCN_BACKEND", "reference")
    step(False)
    # A parameter replaced while the reference backend runs: the prepared step left from before is for the old
    # one, and must not be taken up.
    both(lambda m: setattr(m.blocks[2].conv, "weight", torch.nn.Parameter(m.blocks[2].conv.weight.detach() + 1)))
    step(False)
    step(False)
    monkeypatch.delenv("HIERTCN_BACKEND")
    step(False)
    step(False)
    step(True)
    tcn.blocks[0].conv.backend = "reference"
    step(False)
    tcn.blocks[0].conv.backend = None
    step(False)
    step(True)
    # Inside a use_backend block; after forget_weight_caches().
    with use_backend("reference"):
        step(False)
        step(False)
    step(False)
    step(True)
    forget_weight_caches()
    step(False)
    step(False)
    step(True)
    # The context modified in place: its table is recomputed (by the full path), then the shortcut takes it up.
    with torch.no_grad():
        context.mul_(-2)
    step(False)
    step(True)
    # A layer of the state replaced by a copy of itself (the twin's too), or the state's list of layers rebound.
    state.layers[1] = copy.deepcopy(state.layers[1])
    twin_state.layers[1] = copy.deepcopy(twin_state.layers[1])
    step(False)
    step(False)
    step(True)
    state.layers = list(state.layers)
    step(False)
    step(True)
    # x not contiguous along channels, or a tensor subclass: the same result (the shortcut copies the one, and
    # leaves the other to the full path).
    step(True, rand(2, 10)[:, ::2])

    class Marked(torch.Tensor):
        pass

    step(False, rand(2, 5).as_subclass(Marked))
    step(True)
    # A bad input is still a clear error, the state is not advanced by it, and the shortcut stays for the next
    # good one: the wrong batch, dtype, or an input that wants gradients.
    positions = [layer.position.clone() for layer in state.layers]
    with torch.no_grad(), pytest.raises(ValueError, match=r"x_t must be \(batch, in_channels\) = \(2, 5\)"):
        tcn.step(rand(3, 5), state, context)
    with torch.no_grad(), pytest.raises(TypeError, match="x_t has dtype torch.float32 but the state holds"):
        tcn.step(rand(2, 5).float(), state, context)
    with pytest.raises(RuntimeError, match="x_t requires grad"):
        tcn.step(rand(2, 5).requires_grad_(), state, context)
    assert all(torch.equal(layer.position, kept) for layer, kept in zip(state.layers, positions, strict=True))
    step(True)
    # Under no_grad, an input that requires grad is taken (as by the full path).
    step(True, rand(2, 5).requires_grad_())
    # An attribute a step reads, changed: the full path sees it (a dilation that no longer fits the state).
    tcn.blocks[1].conv.dilation = 4
    with torch.no_grad(), pytest.raises(ValueError, match=r"state.layers\[1\] was made for dilation 2"):
        tcn.step(rand(2, 5), state, context)
    tcn.blocks[1].conv.dilation = 2  # as it was when the shortcut was made: taken again
    step(True)
    # A block removed: the state no longer fits.
    del tcn.blocks[2]
    with torch.no_grad(), pytest.raises(ValueError, match="state has 3 layers but this TCN has 2 blocks"):
        tcn.step(rand(2, 5), state, context)


# ---- drop-in details: constructor, layout, autocast, copies, misuse --------------------------------

def test_constructor_takes_nn_conv1d_arguments_in_nn_conv1d_order():
    # nn.Conv1d(in, out, k, stride, padding, dilation, groups, bias): the same positions here.
    torch_conv = torch.nn.Conv1d(4, 8, (3,), 1, 0, 2, 2, False).double()
    conv = CausalConv1d(4, 8, (3,), 1, 0, 2, 2, False, dtype=torch.float64)
    assert (conv.kernel_size, conv.dilation, conv.groups, conv.bias) == (3, 2, 2, None)
    conv.load_state_dict(torch_conv.state_dict())
    x = rand(2, 11, 4)
    assert_close(conv(x), torch_conv(F.pad(x.transpose(1, 2), (4, 0))).transpose(1, 2).detach())
    refused = {
        (4, 8, 3, 2): (ValueError, "stride must be 1"),  # nn.Conv1d's fourth argument is the stride
        (4, 8, 3, 1, 1): (ValueError, "padding must be 0"),
        (4, 8, 3, 1, "same"): (ValueError, "padding must be 0"),
        (4, 8, 0): (ValueError, "kernel_size must be >= 1"),
        (4, 8, 3, 1, 0, 0): (ValueError, "dilation must be >= 1"),
        (4, 8, 3, 1, 0, 1, 0): (ValueError, "groups must be >= 1"),
        (4, 8, 3, 1, 0, 1, 3): (ValueError, r"groups \(3\) must divide"),
        (4, 8, 3.0): (TypeError, "kernel_size must be an int"),
        (4, 8, 3, 1, 0, 2 ** 62): (ValueError, r"must be below 2\*\*62"),
    }
    for args, (error, message) in refused.items():
        with pytest.raises(error, match=message):
            CausalConv1d(*args)
    # nn.Conv1d's padding="valid" is no padding, as 0 is (it was refused).
    valid = CausalConv1d(4, 8, (3,), 1, "valid", 2, 2, False, dtype=torch.float64)
    valid.load_state_dict(torch_conv.state_dict())
    assert torch.equal(valid(x), conv(x))
    with pytest.raises(ValueError, match="padding_mode 'zeros'"):
        CausalConv1d(4, 8, 3, padding_mode="reflect")
    # device and dtype by position too, as nn.Conv1d takes them (they were keyword-only: a TypeError).
    torch_conv = torch.nn.Conv1d(4, 8, 3, 1, 0, 2, 1, True, "zeros", "cpu", torch.float64)
    conv = CausalConv1d(4, 8, 3, 1, 0, 2, 1, True, "zeros", "cpu", torch.float64)
    assert conv.weight.dtype == conv.bias.dtype == torch.float64 and conv.weight.device.type == "cpu"
    conv.load_state_dict(torch_conv.state_dict())
    assert_close(conv(x), torch_conv(F.pad(x.transpose(1, 2), (4, 0))).transpose(1, 2).detach())
    with pytest.raises(ValueError, match="activation must be one of"):
        CausalConv1d(4, 8, 3, activation="silu")
    with pytest.raises(ValueError, match="channels must list at least one block"):
        TCN(4, [])


def test_channels_first_input_gets_a_layout_error():
    conv, tcn = CausalConv1d(4, 8, 3), TCN(4, [5, 6], kernel_size=3)
    x = torch.randn(2, 4, 11)  # nn.Conv1d's (batch, channels, time)
    for module in (conv, tcn):
        with pytest.raises(ValueError, match=r"channels-last.*x.transpose\(1, 2\)"):
            module(x)
    assert conv(x.transpose(1, 2)).shape == (2, 11, 8)


def test_states_copy_and_pickle_without_their_caches():
    """After a few steps a state holds caches (packed weights, a prepared step that cannot be pickled): copies
    keep only the state, and every copy steps on exactly like the original."""
    import copy
    import io
    import pickle
    tcn = TCN(5, [8, 6], kernel_size=3, context_channels=4).double().eval()
    x, context = rand(3, 9, 5), rand(3, 4)
    state = tcn.init_state(3)
    with torch.no_grad():
        full = tcn(x, context)
        for t in range(4):
            tcn.step(x[:, t], state, context)
    assert state._fast is not None and state.layers[0]._prepared[2] is not None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert buffer.tell() < 20_000  # the weights (about 4,800 float64 values) are not in it
    buffer.seek(0)
    copies = [copy.deepcopy(state), pickle.loads(pickle.dumps(state)), torch.load(buffer, weights_only=False),
              type(state)([copy.deepcopy(layer) for layer in state.layers])]
    for copied in copies:
        assert copied._fast is None and copied.layers[0]._prepared == ()
        with torch.no_grad():
            steps = [tcn.step(x[:, t], copied, context) for t in range(4, 9)]
        assert_close(torch.stack(steps, 1), full[:, 4:])
    with torch.no_grad():
        assert_close(torch.stack([tcn.step(x[:, t], state, context) for t in range(4, 9)], 1), full[:, 4:])


def test_a_state_of_another_dilation_or_device_is_refused():
    tcn = TCN(4, [4, 4, 4], kernel_size=3)  # dilations 1, 2, 4
    other = TCN(4, [4, 4, 4], kernel_size=3, dilations=[1, 1, 1]).init_state(2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"state.layers\[1\] was made for dilation 1 but this layer "
                                                          r"has dilation 2"):
        tcn.step(torch.randn(2, 4), other)
    conv = CausalConv1d(4, 4, 3, dilation=4)
    with torch.no_grad(), pytest.raises(ValueError, match="made for dilation 1"):
        conv.step(torch.randn(2, 4), CausalConv1d(4, 4, 3).init_state(2))
    with torch.no_grad(), pytest.raises(ValueError, match=r"states\[0\].history is on meta but x is on cpu"):
        tcn.step(torch.randn(2, 4), tcn.init_state(2, device="meta"))


def test_step_is_inference_only_and_says_so():
    tcn = TCN(4, [6], kernel_size=3, context_channels=2)
    block, state = tcn.blocks[0], tcn.init_state(2)
    x_t, context = torch.randn(2, 4, requires_grad=True), torch.randn(2, 2)
    for step in (lambda: tcn.step(x_t, state, context), lambda: block.step(x_t, state.layers[0], context),
                 lambda: block.conv.step(x_t, state.layers[0], context)):
        with pytest.raises(RuntimeError, match="step\\(\\) is for inference"):
            step()
    assert tcn.step(x_t.detach(), state, context).shape == (2, 6)  # parameters requiring grad are fine
    assert block.step(x_t.detach(), tcn.init_state(2).layers[0], context).shape == (2, 6)
    with torch.no_grad():
        tcn.step(x_t, state, context)


def test_weight_norm_steps_like_forward():
    torch.manual_seed(3)
    tcn = TCN(5, [6, 6], kernel_size=3).double().eval()
    for block in tcn.blocks:
        torch.nn.utils.parametrizations.weight_norm(block.conv, "weight")
    x = rand(2, 7, 5)
    state = tcn.init_state(2)
    with torch.no_grad():
        full = tcn(x)
        steps = torch.stack([tcn.step(x[:, t], state) for t in range(7)], 1)
    assert_close(steps, full)
    assert state._fast is None  # no prepared step for a weight computed on access


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
def test_hook_based_weight_norm_steps_like_forward():
    """torch.nn.utils.weight_norm (the hook-based one, Bai et al.'s TCN) computes the weight in a forward pre-hook:
    the steps run it too (TCN.step read the missing _parameters["weight"]: a KeyError; a layer's step read the
    weight of the last forward, stale after weight_v changed)."""
    torch.manual_seed(5)
    tcn = TCN(4, [6, 5], kernel_size=3, dilations=[1, 2]).double().eval()
    for block in tcn.blocks:
        torch.nn.utils.weight_norm(block.conv)
        torch.nn.utils.weight_norm(block.projection)
    x = rand(2, 7, 4)
    with torch.no_grad():
        full = tcn(x)
        for block in tcn.blocks:  # an optimizer's step between the forward and the steps
            block.conv.weight_v.mul_(-1.5)
            block.projection.weight_g.mul_(0.5)
        full_after = tcn(x)
        for block in tcn.blocks:
            block.conv.weight_v.div_(-1.5)
            block.projection.weight_g.div_(0.5)
        tcn(x)  # the hooks' attributes hold the first weights again
        for block in tcn.blocks:
            block.conv.weight_v.mul_(-1.5)
            block.projection.weight_g.mul_(0.5)
        state = tcn.init_state(2)
        steps = torch.stack([tcn.step(x[:, t], state) for t in range(7)], 1)
        conv = tcn.blocks[0].conv
        layer_state = conv.init_state(2)
        residual = tcn.blocks[0].projection(x)
        layer_steps = torch.stack([conv.step(x[:, t], layer_state, residual=residual[:, t]) for t in range(7)], 1)
    assert not torch.allclose(full, full_after)
    assert_close(steps, full_after)
    assert state._fast is None  # no prepared step for a weight computed in a hook
    assert_close(layer_steps, conv(x, residual=residual))


def test_autocast_runs_in_the_autocast_dtype_like_nn_conv1d():
    """Under autocast the input may already be bfloat16 (an nn.Linear in the region): the module runs in the
    autocast dtype as nn.Conv1d does, its gradients reach the float32 parameters, and step() runs in the
    state's dtype."""
    torch.manual_seed(4)
    linear, conv = torch.nn.Linear(5, 5), CausalConv1d(5, 6, 3, dilation=2, context_channels=2)
    torch_conv = torch.nn.Conv1d(5, 6, 3, dilation=2)
    with torch.no_grad():
        torch_conv.weight.copy_(conv.weight)
        torch_conv.bias.copy_(conv.bias)
        conv.context_weight.zero_()
    x, context = torch.randn(2, 9, 5), torch.randn(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = linear(x)
        assert h.dtype == torch.bfloat16
        out = conv(h, context)
        expected = torch_conv(F.pad(h.transpose(1, 2), (4, 0))).transpose(1, 2)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
    assert linear.weight.grad is not None
    tcn = TCN(5, [6], kernel_size=3)
    state = tcn.init_state(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert tcn(linear(x)).dtype == torch.bfloat16
        stepped = tcn.step(linear(x[:, 0]), state)
    assert stepped.dtype == torch.float32


def test_steps_with_a_context_under_autocast_are_the_steps_without():
    """TCN.step and CausalConv1d.step with a context under autocast (float32 or bfloat16 inputs) run in the
    state's dtype and give the float32 steps' outputs: the context term's table was computed in bfloat16, and
    the step refused it."""
    torch.manual_seed(6)
    tcn = TCN(4, [8, 8], kernel_size=3, context_channels=6).eval()
    conv = CausalConv1d(4, 5, 3, dilation=2, context_channels=6).eval()
    x, context = torch.randn(3, 5, 4), torch.randn(3, 6)
    for module in (tcn, conv):
        plain_state, autocast_state = module.init_state(3), module.init_state(3)
        with torch.no_grad():
            plain = [module.step(x[:, t], plain_state, context) for t in range(5)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                stepped = [module.step(x[:, t], autocast_state, context) for t in range(5)]
        for got, want in zip(stepped, plain):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want)
    state = tcn.init_state(3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tcn.step(x[:, 0].bfloat16(), state, context.bfloat16())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("built_in_inference_mode", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_tcn_under_inference_mode_equals_no_grad_and_sees_changes(backend, built_in_inference_mode):
    """Serving computes a user's context and steps the TCN under torch.inference_mode: forward and step (with a
    context, the state made there too, the model possibly built there) give no_grad's results. Inference tensors
    have no version counter, so nothing derived from one is cached: a context or weight changed in place inside
    inference_mode reaches the next step."""
    torch.manual_seed(11)
    make = lambda: TCN(4, [6, 5], kernel_size=3, dilations=[1, 2], context_channels=3, backend=backend,
                       dtype=torch.float64)
    expected_tcn = make()
    if built_in_inference_mode:
        with torch.inference_mode():
            tcn = make()
            tcn.load_state_dict(expected_tcn.state_dict())
    else:
        tcn = make()
        tcn.load_state_dict(expected_tcn.state_dict())
    x, context = rand(2, 7, 4), rand(2, 3)
    with torch.no_grad():
        expected_forward = expected_tcn(x, context)
        expected_state = expected_tcn.init_state(2)
        expected_steps = [expected_tcn.step(x[:, t], expected_state, context) for t in range(4)]
    with torch.inference_mode():
        inference_context = context * 1.0  # an inference tensor
        assert_close(tcn(x, inference_context), expected_forward)
        state = tcn.init_state(2)
        for t in range(4):
            assert_close(tcn.step(x[:, t], state, inference_context), expected_steps[t])
        # Changed in place inside inference_mode: no version counter moves, so only an uncached derivation sees it.
        inference_context.mul_(-1.5)
        weight = tcn.blocks[0].conv.context_weight
        changed_in_place = weight.is_inference()
        if changed_in_place:
            weight.mul_(0.5)
        with torch.no_grad():
            if changed_in_place:
                expected_tcn.blocks[0].conv.context_weight.mul_(0.5)
            expected_after = [expected_tcn.step(x[:, t], expected_state, context * -1.5) for t in range(4, 7)]
        for t, expected in zip(range(4, 7), expected_after):
            assert_close(tcn.step(x[:, t], state, inference_context), expected)
        assert changed_in_place == built_in_inference_mode


def test_step_input_errors_name_the_step_arguments():
    """The steps' bad input in the steps' words, on the first step too (before a prepared step exists): x_t of
    the wrong width, batch or dtype, and a context of the wrong width (forward too), rather than messages about
    packed weights, histories or the context weight."""
    tcn = TCN(4, [6, 5], kernel_size=3, context_channels=2)
    block = TemporalBlock(4, 6, 3)
    conv = CausalConv1d(4, 6, 3, context_channels=2)
    with torch.no_grad():
        for step, state, context in ((tcn.step, tcn.init_state(3), torch.randn(3, 2)),
                                     (block.step, block.init_state(3), None),
                                     (conv.step, conv.init_state(3), torch.randn(3, 2))):
            call = (lambda x: step(x, state, context)) if context is not None else (lambda x: step(x, state))
            with pytest.raises(ValueError, match=r"x_t must be \(batch, in_channels\) = \(3, 4\) .* got shape \(3, 5\)"):
                call(torch.randn(3, 5))
            with pytest.raises(ValueError, match=r"a state of 3 rows, got shape \(2, 4\)"):
                call(torch.randn(2, 4))
            with pytest.raises(TypeError, match="x_t has dtype torch.float64 but the state holds torch.float32"):
                call(torch.randn(3, 4, dtype=torch.float64))
            assert call(torch.randn(3, 4)).shape[0] == 3  # the state is still usable
        with pytest.raises(ValueError, match=r"context must be \(batch, context_channels = 2\), got shape \(3, 3\)"):
            tcn.step(torch.randn(3, 4), tcn.init_state(3), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"context must be \(batch, context_channels = 2\), got shape \(2, 3\)"):
        conv(torch.randn(2, 7, 4), torch.randn(2, 3))


def test_an_inference_context_table_is_computed_once_per_session(monkeypatch):
    """Under inference_mode the session's context (an inference tensor, no version counter) still costs its table
    once, not at every step; a new context, or the same one changed in place, makes a new table."""
    import hiertcn_fast.ops.conv as conv_ops

    tcn = TCN(4, [6, 6], kernel_size=3, context_channels=5).eval()
    calls = []
    original = conv_ops.context_table
    monkeypatch.setattr(conv_ops, "context_table", lambda *args: calls.append(1) or original(*args))
    with torch.inference_mode():
        context = torch.randn(2, 5) * 1.0
        state = tcn.init_state(2)
        for _ in range(6):
            tcn.step(torch.randn(2, 4), state, context)
        assert len(calls) == 1
        context.mul_(2.0)
        tcn.step(torch.randn(2, 4), state, context)
        tcn.step(torch.randn(2, 4), state, torch.randn(2, 5) * 1.0)
        assert len(calls) == 3


def test_an_inference_context_table_follows_a_new_weight_at_a_reused_address():
    """The inference-mode table cache keys the weight by identity too: a new weight that lands at a freed one's
    address with the same version (its stamp equal) still gets its own table."""
    from hiertcn_fast.ops import CausalConvState
    from hiertcn_fast.ops.conv import context_table

    import numpy as np

    state = CausalConvState.zeros(2, 4, 3, 1)
    memory = np.random.default_rng(3).standard_normal((6, 5, 3)).astype(np.float32)
    with torch.inference_mode():
        context = torch.randn(2, 5) * 1.0
    for i in range(1, 4):
        # A new tensor object over the same memory, at version 0, with other values: what a freed weight's
        # successor at its address looks like (NumPy writes move no version counter).
        memory *= -2.0
        weight = torch.from_numpy(memory)
        with torch.no_grad():
            expected = context_table(context, weight.clone())
        assert torch.equal(state.cached_context_table(context, weight), expected), i


def test_a_state_dict_from_before_the_context_residual_loads_as_the_same_function():
    """Version-1 state dicts (the first block's residual was x alone, or x's projection, without the context) load
    with a zero context projection and, where the widths agree, an identity projection: the same outputs."""
    torch.manual_seed(0)
    for in_channels, out_channels in ((8, 8), (6, 8)):
        block = TemporalBlock(in_channels, out_channels, kernel_size=3, context_channels=5, dtype=torch.float64)
        current = block.state_dict()
        old = collections.OrderedDict(
            (key, value) for key, value in current.items() if key != "context_projection.weight"
            and (in_channels != out_channels or not key.startswith("projection.")))
        old._metadata = {"": {"version": 1}, "conv": {"version": 1}}
        if in_channels != out_channels:
            old["projection.weight"] = torch.randn(out_channels, in_channels, dtype=torch.float64)
        loaded = TemporalBlock(in_channels, out_channels, kernel_size=3, context_channels=5, dtype=torch.float64)
        loaded.load_state_dict(old)
        x, context = rand(2, 7, in_channels), rand(2, 5)
        residual = x if in_channels == out_channels else torch.nn.functional.linear(
            x, old["projection.weight"], old["projection.bias"])
        expected = loaded.conv(x, context, residual=residual)
        assert torch.equal(loaded(x, context), expected)
        # A current (version 2) state dict missing the keys is an error, as for any module.
        old._metadata = current._metadata
        with pytest.raises(RuntimeError, match="context_projection.weight"):
            TemporalBlock(in_channels, out_channels, kernel_size=3, context_channels=5,
                          dtype=torch.float64).load_state_dict(old)


def test_a_partial_state_dict_without_metadata_leaves_the_projections_and_reports_them():
    """A dict without version metadata reads as version 1, which is completed only when it is a whole block: a
    partial one (strict=False) had the trained projections replaced by the identity and zero, unreported."""
    torch.manual_seed(0)
    block = TemporalBlock(4, 4, 3, context_channels=2)
    before = {key: value.clone() for key, value in block.state_dict().items()}
    result = block.load_state_dict({"conv.weight": torch.randn(4, 4, 3)}, strict=False)
    assert set(result.missing_keys) == {"conv.bias", "conv.context_weight", "projection.weight", "projection.bias",
                                        "context_projection.weight"}
    for key in ("projection.weight", "projection.bias", "context_projection.weight"):
        assert torch.equal(block.state_dict()[key], before[key]), key
    # A whole version-1 block without metadata is still completed.
    whole = {key: value for key, value in before.items() if not key.startswith(("projection.", "context_projection."))}
    assert not TemporalBlock(4, 4, 3, context_channels=2).load_state_dict(whole).missing_keys


def test_step_under_cpu_autocast_follows_a_context_changed_in_place():
    """The stack step runs in the state's dtype under autocast too: the context's residual term, made again when
    the context (a serving buffer, rewritten in place at a session's close) or its projection changes, must be
    made in that dtype, not autocast's, on the prepared shortcut as well."""
    torch.manual_seed(0)
    tcn = TCN(8, [8, 8], kernel_size=3, context_channels=4, backend="cpu").eval()
    state, expected_state = tcn.init_state(2), tcn.init_state(2)
    context = torch.randn(2, 4)
    with torch.no_grad():
        for t in range(8):
            x = torch.randn(2, 8)
            if t == 3:
                context.mul_(2)
            if t == 5:
                tcn.blocks[0].context_projection.weight.mul_(0.5)
            expected = tcn.step(x, expected_state, context.clone())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = tcn.step(x, state, context)
            assert out.dtype == torch.float32
            assert_close(out, expected)
        assert state.layers[0]._residual_term[-1].dtype == torch.float32


def test_a_version_1_state_dict_of_a_weight_normed_block_is_upgraded():
    """A parametrized conv saves conv.parametrizations.weight.original0/1, not conv.weight: still this block's."""
    def block():
        made = TemporalBlock(8, 8, 3, context_channels=4)
        torch.nn.utils.parametrizations.weight_norm(made.conv)
        return made

    current = block().state_dict()
    old = collections.OrderedDict((k, v) for k, v in current.items()
                                  if not k.startswith(("context_projection.", "projection.")))
    old._metadata = {k: dict(v) for k, v in current._metadata.items()}
    old._metadata[""]["version"] = 1
    loaded = block()
    loaded.load_state_dict(old)
    assert torch.equal(loaded.projection.weight, torch.eye(8)) and not loaded.context_projection.weight.any()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_tcn_compiles_with_fullgraph_and_keeps_its_gradients(backend):
    """torch.compile(fullgraph=True) of a whole TCN: the second block's residual is its input itself, which the op
    takes as a flag (an autograd.Function given one tensor twice is refused by dynamo: 'duplicate tensor input')."""
    torch.manual_seed(0)
    tcn = TCN(6, [8, 8], kernel_size=3, context_channels=3, backend=backend)
    x, context = torch.randn(2, 7, 6, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(tcn, fullgraph=True)
    leaves = [x, context, *tcn.parameters()]
    out = compiled(x, context)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    expected = tcn(x, context)
    expected_grads = torch.autograd.grad(expected.square().sum(), leaves)
    assert_close(out, expected, torch.float32)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5)


# Found by fuzzing the modules against torch.nn (session 22): each failed before the fix, with an AttributeError or
# a RuntimeError from inside nn.Linear that named no argument.
# The conv modules read x.device (x_t.requires_grad) before any check that x is a tensor, so a non-tensor input (a
# list, a NumPy array) failed with an AttributeError from inside, not the TypeError naming the argument that the GRU
# modules and nn.Conv1d give.

@pytest.mark.parametrize("x", [[[[1.0, 2.0, 3.0]]], np.ones((1, 2, 3), dtype=np.float32)], ids=["list", "ndarray"])
def test_causal_conv1d_forward_refuses_a_non_tensor_input_with_a_type_error(x):
    conv = CausalConv1d(3, 4, 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got (list|ndarray)"):
        conv(x)


def test_temporal_block_and_tcn_forward_refuse_a_non_tensor_input_with_a_type_error():
    for module in (TemporalBlock(3, 3, 2), TCN(3, [3], 2)):
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
            module([[[1.0, 2.0, 3.0]]])


def test_causal_conv1d_step_refuses_a_non_tensor_input_with_a_type_error():
    conv = CausalConv1d(3, 4, 2)
    state = conv.init_state(1)
    with pytest.raises(TypeError, match="x_t must be a torch.Tensor, got list"):
        conv.step([[1.0, 2.0, 3.0]], state)
    assert state.position.tolist() == [0]


def test_temporal_block_step_refuses_a_non_tensor_input_with_a_type_error():
    block = TemporalBlock(3, 3, 2)
    with pytest.raises(TypeError, match="x_t must be a torch.Tensor, got list"):
        block.step([[1.0, 2.0, 3.0]], block.init_state(1))


def test_tcn_step_refuses_a_non_tensor_input_or_context_with_a_type_error():
    tcn = TCN(3, [3], 2, context_channels=2)
    state = tcn.init_state(1)
    with pytest.raises(TypeError, match="x_t must be a torch.Tensor, got list"):
        tcn.step([[1.0, 2.0, 3.0]], state, torch.randn(1, 2))
    with pytest.raises(TypeError, match="context must be a torch.Tensor, got list"):
        tcn.step(torch.randn(1, 3), state, [[1.0, 2.0]])
    assert [layer.position.tolist() for layer in state.layers] == [[0]]


# TemporalBlock (and TCN, through its first block) applied its residual projection to x and the context before any
# check of their batch and dtype (only the context's rank and width were checked), so a context of another batch or
# dtype, or a projected x of another dtype or width, failed inside nn.Linear or the broadcast add, naming neither.

def _context_block_and_tcn():
    torch.manual_seed(0)
    return TemporalBlock(3, 5, 3, 2, context_channels=2), TCN(3, [5, 5], 3, context_channels=2)


def test_temporal_block_and_tcn_forward_name_a_context_of_another_batch():
    x = torch.randn(2, 6, 3)
    for module in _context_block_and_tcn():
        with pytest.raises(ValueError, match="context .batch, context_channels. must have x(_t)?'s batch 2"):
            module(x, torch.randn(3, 2))


def test_temporal_block_and_tcn_forward_name_a_context_of_another_dtype():
    x = torch.randn(2, 6, 3)
    for module in _context_block_and_tcn():
        with pytest.raises(TypeError, match="context has dtype torch.float64 but x(_t)? has torch.float32"):
            module(x, torch.randn(2, 2, dtype=torch.float64))


def test_temporal_block_step_names_a_context_of_another_batch_or_dtype():
    block, _ = _context_block_and_tcn()
    state = block.init_state(2)
    with pytest.raises(ValueError, match="context .batch, context_channels. must have x(_t)?'s batch 2"):
        block.step(torch.randn(2, 3), state, torch.randn(3, 2))
    with pytest.raises(TypeError, match="context has dtype torch.float64 but x(_t)? has torch.float32"):
        block.step(torch.randn(2, 3), state, torch.randn(2, 2, dtype=torch.float64))
    assert state.position.tolist() == [0, 0]


def test_projecting_temporal_block_names_an_x_of_another_dtype_or_width():
    torch.manual_seed(0)
    block = TemporalBlock(3, 5, 3, 2)  # 3 -> 5 channels: the residual is a projection
    with pytest.raises(TypeError, match="x has dtype torch.float64 but this block's parameters have torch.float32"):
        block(torch.randn(2, 6, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be \(batch, time, in_channels = 3\), got shape \(2, 6, 7\)"):
        block(torch.randn(2, 6, 7))
