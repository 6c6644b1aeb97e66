"""torch.autocast across the API: the ops compute in their arguments' dtype inside an autocast region (their
reference compositions' products used to come out in bfloat16 next to float32 arguments, which the next op
refused); the modules and models run as torch.nn's do there; a refused step changes no state."""

import pytest
import torch

from hiertcn_fast.backends import BackendUnavailableError
from hiertcn_fast.models import HRNN
from hiertcn_fast.nn import TCN, CausalConv1d, TemporalBlock
from hiertcn_fast.ops import gru, linear_cross_entropy, session_update, tcn_step
from gru_helpers import layer_weights
from helpers import BACKEND_DEVICES
from model_helpers import lane_batch, random_sessions

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _session_args(batch=4, time=5, dim=6, hidden=7, layers=2):
    generator = torch.Generator().manual_seed(1)
    items = torch.randn(batch, time, dim, generator=generator)
    lengths = torch.tensor([5, 0, 2, 3])[:batch]
    h = torch.randn(layers, batch, hidden, generator=generator)
    keep = torch.tensor([True, True, False, True])[:batch]
    weights = [[t.detach() for t in layer] for layer in layer_weights(dim, hidden, layers, torch.float32, "cpu")]
    return items, lengths, h, keep, weights


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_session_update_and_gru_compute_in_float32_under_autocast(backend):
    items, lengths, h, keep, weights = _session_args()
    expected = session_update(items, lengths, h, keep, weights, backend=backend)
    with torch.autocast(**BF16):
        got = session_update(items, lengths, h, keep, weights, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    x, h0 = torch.randn(3, 4, 6), torch.randn(2, 3, 7)
    expected = gru(x, h0, weights, num_layers=2, backend=backend)
    with torch.autocast(**BF16):
        got = gru(x, h0, weights, num_layers=2, backend=backend)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_tcn_step_with_projections_under_autocast_is_the_float32_step(backend):
    """The stack's residual projection (8 -> 16 channels) ran as a bfloat16 F.linear on the layer-by-layer
    path, and the next layer refused it with layer 0 already stepped."""
    torch.manual_seed(0)
    tcn = TCN(8, [8, 16], kernel_size=3, context_channels=5, backend=backend).eval()
    x, context = torch.randn(2, 5, 8), torch.randn(2, 5)
    plain_state, autocast_state = tcn.init_state(2), tcn.init_state(2)
    with torch.no_grad():
        for t in range(5):
            want = tcn.step(x[:, t], plain_state, context)
            with torch.autocast(**BF16):
                got = tcn.step(x[:, t], autocast_state, context)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_refused_layer_leaves_no_layer_of_the_stack_stepped():
    """Layer by layer (the reference backend), every layer is checked before the first steps: a refused
    layer 1 (a bias of the wrong size, a projection of the wrong dtype) leaves layer 0's state as it was."""
    torch.manual_seed(1)
    tcn = TCN(4, [6, 6], kernel_size=3).eval()
    weights = [block.conv.weight.detach() for block in tcn.blocks]
    biases = [block.conv.bias.detach() for block in tcn.blocks]
    projections = [tcn.blocks[0].projection.weight.detach(), None]
    x = torch.randn(2, 4)
    bad_calls = [
        dict(biases=[biases[0], torch.zeros(5)], proj_weights=projections),
        dict(biases=biases, proj_weights=[projections[0].double(), None]),
        dict(biases=biases, proj_weights=[projections[0], None], proj_biases=[None, torch.zeros(6)]),
    ]
    for call in bad_calls:
        state = tcn.init_state(2)
        with torch.no_grad():
            tcn.step(x, state)  # one step in, so the histories hold something
        saved = [(layer.history.clone(), layer.position.clone()) for layer in state.layers]
        with pytest.raises((ValueError, TypeError)):
            tcn_step(x, weights, call["biases"], state.layers, proj_weights=call["proj_weights"],
                     proj_biases=call.get("proj_biases"), backend="reference")
        for layer, (history, position) in zip(state.layers, saved):
            assert torch.equal(layer.history, history) and torch.equal(layer.position, position)


def test_tcn_step_takes_a_bfloat16_context_with_a_float32_input_under_autocast():
    """The context often comes from a layer autocast ran (bfloat16) while the event's input is float32: the
    step casts both to the state's dtype, as CausalConv1d.step does."""
    torch.manual_seed(2)
    tcn = TCN(4, [8, 8], kernel_size=3, context_channels=6).eval()
    x, context = torch.randn(3, 4), torch.randn(3, 6).bfloat16()
    with torch.no_grad():
        want = tcn.step(x, tcn.init_state(3), context.float())
        with torch.autocast(**BF16):
            got = tcn.step(x, tcn.init_state(3), context)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_temporal_block_step_projects_in_the_states_dtype_under_autocast():
    torch.manual_seed(3)
    block = TemporalBlock(4, 6, 3, dilation=2).eval()
    x = torch.randn(2, 6, 4)
    plain_state, autocast_state = block.init_state(2), block.init_state(2)
    with torch.no_grad():
        for t in range(6):
            want = block.step(x[:, t], plain_state)
            with torch.autocast(**BF16):
                got = block.step(x[:, t], autocast_state)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_hrnn_runs_under_autocast():
    """HRNN's session GRU may run in bfloat16 under autocast (its initial state comes from an nn.Linear);
    its last output now reaches the user GRU in the state's dtype (session_update refused the mix)."""
    torch.manual_seed(4)
    model = HRNN(31, embedding_dim=8, session_hidden=8, user_hidden=8)
    sessions = random_sessions(torch.Generator().manual_seed(4), 31, lanes=3, max_sessions=2, max_length=5)
    batch = lane_batch(sessions)
    want, want_state = model(batch, None)
    with torch.autocast(**BF16):
        got, got_state = model(batch, None)
    assert got_state.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got_state, want_state, rtol=5e-2, atol=5e-2)


def test_loss_in_float64_takes_the_cpu_path_under_autocast():
    """Autocast leaves float64 alone, so the fused loss serves float64 inside the region too."""
    features = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (9,))
    with torch.autocast(**BF16):
        loss = linear_cross_entropy(features, weight, None, targets, backend="cpu")
    assert loss.dtype == torch.float64 and "LinearCrossEntropy" in loss.grad_fn.name()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(features @ weight.t(), targets,
                                                                       reduction="sum"))


def test_conv_module_on_the_cpu_backend_under_autocast_says_why_it_cannot_run():
    conv = CausalConv1d(4, 5, 3, backend="cpu")
    with torch.autocast(**BF16), pytest.raises(BackendUnavailableError, match="autocast"):
        conv(torch.randn(2, 6, 4))


def test_compiled_ops_under_autocast_compute_in_float32_too():
    """torch.compile(fullgraph=True) of the reference compositions under autocast: the same float32 results as
    eager (the autocast switch is traced into the graph)."""
    from hiertcn_fast.ops import causal_conv1d

    items, lengths, h, keep, weights = _session_args()
    x, conv_weight = torch.randn(2, 7, 4), torch.randn(5, 4, 3)
    context, context_weight = torch.randn(2, 6), torch.randn(5, 6, 3)

    def step(items, h, x):
        return (session_update(items, lengths, h, keep, weights, backend="reference"),
                causal_conv1d(x, conv_weight, dilation=2, context=context, context_weight=context_weight,
                              backend="reference"))

    expected = step(items, h, x)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with torch.autocast(**BF16):
        got = compiled(items, h, x)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_autocast_is_switched_back_on_after_an_op_and_after_its_error():
    items, lengths, h, keep, weights = _session_args()
    with torch.autocast(**BF16):
        session_update(items, lengths, h, keep, weights)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with pytest.raises(ValueError):
            session_update(items, lengths, h[:, :2], keep, weights)
        assert torch.is_autocast_enabled("cpu")
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_every_backend_computes_in_float32_under_its_devices_autocast(backend, device):
    """The ops on each backend (cuda and triton on a GPU when there is one) inside autocast for their device:
    float32 results equal to the same call outside it, the context term and the GRU step included."""
    from hiertcn_fast.ops import causal_conv1d

    items, lengths, h, keep, weights = (t.to(device) if isinstance(t, torch.Tensor) else t
                                        for t in _session_args())
    weights = [[t.to(device) for t in layer] for layer in weights]
    generator = torch.Generator().manual_seed(2)
    x, conv_weight = torch.randn(2, 7, 4, generator=generator), torch.randn(5, 4, 3, generator=generator)
    context, context_weight = torch.randn(2, 6, generator=generator), torch.randn(5, 6, 3, generator=generator)
    x, conv_weight, context, context_weight = (t.to(device) for t in (x, conv_weight, context, context_weight))

    def run():
        return (session_update(items, lengths, h, keep, weights, backend=backend),
                causal_conv1d(x, conv_weight, dilation=2, context=context, context_weight=context_weight,
                              activation="relu", backend=backend))

    expected = run()
    with torch.autocast(device, dtype=torch.bfloat16):
        got = run()
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
