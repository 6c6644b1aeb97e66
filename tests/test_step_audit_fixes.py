"""Session 33: the step ops' findings of the op-layer audit (helper 131). Each test failed on a15ff20, the code
before its fix; what it saw there is in the test's docstring.

S1 layers sharing state memory; S2 a state made under torch.inference_mode stepped outside it; S3 an x unlike the
first call's after the stack's checks were cached; S4 forward-mode AD tangents; S5 a state's dilation that is not
an int; S6 gru without h0 naming h; S7 a strided history on the cpu kernels."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from hiertcn_fast.nn import TCN
from hiertcn_fast.ops import CausalConvState, causal_conv1d, causal_conv1d_step, gru, tcn_step

from helpers import BACKEND_DEVICES

B, C, K = 3, 4, 3
DILATIONS = (1, 2, 4)
# The stack's paths: the fused cpu op (the first call and the cached checks of the second), the prepared step
# (third call on), and layer by layer (reference, triton).
STACK_BACKENDS = BACKEND_DEVICES


def dtype_for(backend):
    return torch.float32 if backend in ("triton", "cuda") else torch.float64


def stack(backend, device, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = dtype_for(backend)
    weights = [(torch.randn(C, C, K, generator=g, dtype=dtype) * 0.5).to(device) for _ in range(n)]
    biases = [torch.randn(C, generator=g, dtype=dtype).to(device) for _ in range(n)]
    return weights, biases


def states_for(backend, device, n=3):
    return [CausalConvState.zeros(B, C, K, d, dtype=dtype_for(backend), device=device) for d in DILATIONS[:n]]


def inputs(backend, device, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, generator=g, dtype=dtype_for(backend)).to(device) for _ in range(steps)]


def snapshot(states):
    return [(s.history.clone(), s.position.clone()) for s in states]


def assert_unchanged(states, before):
    for state, (history, position) in zip(states, before):
        assert torch.equal(state.position, position)
        assert torch.equal(state.history, history)


# ---- S1: layers sharing a state ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", STACK_BACKENDS)
def test_one_state_for_every_layer_is_refused_naming_the_layers(backend, device):
    """a15ff20 stepped [state] * 3 on cpu and reference, each giving another wrong output (cpu
    [0.0, 1.36, 2.76, ...], reference [6.05, 0.06, 3.92, ...]) and the shared state advanced three times."""
    weights, biases = stack(backend, device)
    shared = CausalConvState.zeros(B, C, K, 1, dtype=dtype_for(backend), device=device)
    x, = inputs(backend, device, 1)
    with pytest.raises(ValueError, match=r"states\[0\]\.(history|position) and states\[1\]\.(history|position) share "
                                         r"memory.*state of its own"):
        tcn_step(x, weights, biases, [shared] * 3, backend=backend)
    assert shared.position.tolist() == [0] * B


@pytest.mark.parametrize("backend,device", STACK_BACKENDS)
def test_overlapping_views_of_one_buffer_are_refused_and_disjoint_ones_step_as_separate_states(backend, device):
    """Views of one tensor: two layers' histories overlapping by one slot are refused (a15ff20 stepped them); views
    that do not overlap (one buffer holding every layer's state) step exactly as states of their own."""
    weights, biases = stack(backend, device, n=2)
    dtype = dtype_for(backend)
    slots = (K - 1) * DILATIONS[1]
    buffer = torch.zeros(B, 2 * slots - 1, C, dtype=dtype, device=device)
    overlapping = [CausalConvState(buffer[:, :slots], torch.zeros(B, dtype=torch.int64, device=device), K, 2),
                   CausalConvState(buffer[:, slots - 1:], torch.zeros(B, dtype=torch.int64, device=device), K, 2)]
    x, = inputs(backend, device, 1)
    with pytest.raises(ValueError, match=r"states\[0\]\.history and states\[1\]\.history share memory"):
        tcn_step(x, weights, biases, overlapping, backend=backend)

    whole = torch.zeros(2, B, slots, C, dtype=dtype, device=device)
    positions = torch.zeros(2, B, dtype=torch.int64, device=device)
    packed = [CausalConvState(whole[l], positions[l], K, 2) for l in range(2)]
    apart = [CausalConvState.zeros(B, C, K, 2, dtype=dtype, device=device) for _ in range(2)]
    for x in inputs(backend, device, 6):
        assert torch.equal(tcn_step(x, weights, biases, packed, backend=backend),
                           tcn_step(x, weights, biases, apart, backend=backend))
    for a, b in zip(packed, apart):
        assert torch.equal(a.history, b.history) and torch.equal(a.position, b.position)


# ---- S2: an inference-mode state stepped outside inference mode -------------------------------------------

@pytest.mark.parametrize("backend,device", STACK_BACKENDS)
def test_a_state_made_under_inference_mode_steps_outside_it_on_every_backend_alike(backend, device):
    """a15ff20: the cpu kernels stepped it, the reference raised torch's 'Inplace update to inference tensor outside
    InferenceMode is not allowed'. Every backend now steps it, exactly as a state made outside inference mode,
    single layer and stack, and resets it."""
    weights, biases = stack(backend, device)
    with torch.inference_mode():
        made_inside = states_for(backend, device)
        layer_inside = CausalConvState.zeros(B, C, K, 2, dtype=dtype_for(backend), device=device)
    assert made_inside[0].history.is_inference()
    made_outside = states_for(backend, device)
    layer_outside = CausalConvState.zeros(B, C, K, 2, dtype=dtype_for(backend), device=device)
    for step, x in enumerate(inputs(backend, device, 7)):
        if step == 4:  # a new session in row 1
            rows = torch.tensor([False, True, False], device=device)
            for state in (*made_inside, *made_outside, layer_inside, layer_outside):
                state.reset(rows)
        out = tcn_step(x, weights, biases, made_inside, backend=backend)
        assert not out.is_inference()
        assert torch.equal(out, tcn_step(x, weights, biases, made_outside, backend=backend))
        assert torch.equal(causal_conv1d_step(x, weights[0], layer_inside, biases[0], backend=backend),
                           causal_conv1d_step(x, weights[0], layer_outside, biases[0], backend=backend))
    for a, b in zip((*made_inside, layer_inside), (*made_outside, layer_outside)):
        assert torch.equal(a.history, b.history) and torch.equal(a.position, b.position)
    assert made_inside[0].position.tolist() == [7, 3, 7]


# ---- S3: x unlike the first call's once the checks are cached ---------------------------------------------

@pytest.mark.parametrize("calls_before", [1, 3])  # the cached checks of the fused op; the prepared step
def test_an_x_of_another_dtype_or_shape_after_good_steps_is_told_as_on_the_first_call(calls_before):
    """a15ff20, after one good call: RuntimeError 'packed_weights[0] must have the dtype of x (Double), got Float'
    (the compiled op's words, naming its own argument); after three (a prepared step): 'x must be a CPU Float tensor,
    got Double on cpu'. The first call said TypeError 'weights[0] has dtype torch.float32 but x has
    torch.float64'. Nothing steps."""
    weights, biases = stack("triton", "cpu")  # float32
    states = states_for("triton", "cpu")
    for x in inputs("triton", "cpu", calls_before):
        tcn_step(x, weights, biases, states, backend="cpu")
    before = snapshot(states)
    with pytest.raises(TypeError, match=r"^weights\[0\] has dtype torch.float32 but x has torch.float64"):
        tcn_step(torch.randn(B, C, dtype=torch.float64), weights, biases, states, backend="cpu")
    with pytest.raises(ValueError, match=r"x \(batch, in_channels\).* must have shape \(3, 4\), got \(2, 4\)"):
        tcn_step(torch.randn(2, C), weights, biases, states, backend="cpu")
    assert_unchanged(states, before)
    # and the next good call steps as if nothing had happened
    fresh = states_for("triton", "cpu")
    for x in inputs("triton", "cpu", calls_before):
        tcn_step(x, weights, biases, fresh, backend="cpu")
    x, = inputs("triton", "cpu", 1, seed=5)
    assert torch.equal(tcn_step(x, weights, biases, states, backend="cpu"),
                       tcn_step(x, weights, biases, fresh, backend="cpu"))


# ---- S4: forward-mode AD ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", STACK_BACKENDS)
@pytest.mark.parametrize("dual", ["x", "weight"])
def test_a_tangent_is_refused_by_every_step_on_every_backend(backend, device, dual):
    """a15ff20 under torch.no_grad(): the cpu step ops returned outputs without a tangent (it was dropped without a
    word), the reference ones carried it. Every backend now refuses it, for the single layer and the stack, before
    any state is written."""
    weights, biases = stack(backend, device)
    states = states_for(backend, device)
    layer = CausalConvState.zeros(B, C, K, 2, dtype=dtype_for(backend), device=device)
    x, = inputs(backend, device, 1)
    before = snapshot([*states, layer])
    with fwAD.dual_level(), torch.no_grad():
        if dual == "x":
            x = fwAD.make_dual(x, torch.ones_like(x))
        else:
            weights = [fwAD.make_dual(weights[0], torch.ones_like(weights[0])), *weights[1:]]
        shown = "x" if dual == "x" else r"weights?(\[0\])?"
        with pytest.raises(RuntimeError, match=rf"tcn_step is for inference.*no forward-mode derivative.*{shown} "
                                               r"carries a tangent.*backend='reference'"):
            tcn_step(x, weights, biases, states, backend=backend)
        with pytest.raises(RuntimeError, match=rf"causal_conv1d_step is for inference.*{shown} carries a tangent"):
            causal_conv1d_step(x, weights[0], layer, biases[0], backend=backend)
    assert_unchanged([*states, layer], before)


def test_tcn_module_step_refuses_a_tangent_after_its_shortcut_was_prepared():
    """TCN.step's shortcut (prepared after two plain steps) ran the prepared step on a dual x_t and returned no
    tangent (a15ff20). It now refuses it, and the next plain step uses the state as it was."""
    torch.manual_seed(0)
    tcn = TCN(C, [C, C], kernel_size=K).double().eval()
    twin = TCN(C, [C, C], kernel_size=K).double().eval()
    twin.load_state_dict(tcn.state_dict())
    state, twin_state = tcn.init_state(B), twin.init_state(B)
    with torch.no_grad():
        for x in inputs("cpu", "cpu", 3):
            tcn.step(x, state)
            twin.step(x, twin_state)
        x, = inputs("cpu", "cpu", 1, seed=9)
        with fwAD.dual_level():
            with pytest.raises(RuntimeError, match="carries a tangent"):
                tcn.step(fwAD.make_dual(x, torch.ones_like(x)), state)
        assert torch.equal(tcn.step(x, state), twin.step(x, twin_state))


def test_the_tangent_refusal_points_to_a_forward_that_carries_tangents():
    """The refusal's message sends the user to differentiate the forward over the sequence with
    backend='reference': it does carry forward-mode tangents (its jvp equals a finite difference)."""
    torch.manual_seed(0)
    x, w, t = torch.randn(2, 5, C, dtype=torch.float64), torch.randn(C, C, K, dtype=torch.float64), None
    t = torch.randn_like(x)
    with fwAD.dual_level():
        out = causal_conv1d(fwAD.make_dual(x, t), w, dilation=2, backend="reference")
        tangent = fwAD.unpack_dual(out).tangent
    eps = 1e-6
    numeric = (causal_conv1d(x + eps * t, w, dilation=2, backend="reference")
               - causal_conv1d(x - eps * t, w, dilation=2, backend="reference")) / (2 * eps)
    torch.testing.assert_close(tangent, numeric, rtol=1e-6, atol=1e-6)


# ---- S5: a state's dilation that is not an int --------------------------------------------------------------

@pytest.mark.parametrize("backend,device", STACK_BACKENDS)
@pytest.mark.parametrize("dilation,error,message", [(True, TypeError, "must be an int, got bool"),
                                                     (2.0, TypeError, "must be an int, got float"),
                                                     (0, ValueError, "must be >= 1, got 0")])
def test_a_stack_state_whose_dilation_is_not_a_positive_int_is_refused(backend, device, dilation, error, message):
    """a15ff20 on cpu: True was taken as 1 (then 'histories[1] must have shape [3, 2, 4]'), 2.0 failed in the
    dispatcher's words ("Expected a value of type 'List[int]' for argument 'dilations'") and 0 as
    'dilations[1] must be >= 1' (RuntimeError); the reference named the layer's dilation in its own check."""
    weights, biases = stack(backend, device)
    states = states_for(backend, device)
    states[1].dilation = dilation
    x, = inputs(backend, device, 1)
    with pytest.raises(error, match=rf"states\[1\]\.dilation {message}"):
        tcn_step(x, weights, biases, states, backend=backend)
    assert all(s.position.tolist() == [0] * B for s in states)


# ---- S6: gru without h0 ------------------------------------------------------------------------------------

def test_gru_without_h0_names_x_for_a_weight_of_another_dtype():
    """a15ff20: 'weights[0] (w_ih) has dtype torch.float64 but h has torch.float32' (no h was given: the zeros it
    makes are x's dtype). With h0 given, it is named h0."""
    x = torch.randn(3, 2, 4)
    weights = [(torch.randn(15, 4, dtype=torch.float64), torch.randn(15, 5))]
    with pytest.raises(TypeError, match=r"weights\[0\] \(w_ih\) has dtype torch.float64 but x has torch.float32"):
        gru(x, None, weights, num_layers=1)
    with pytest.raises(TypeError, match=r"weights\[0\] \(w_ih\) has dtype torch.float64 but h0 has torch.float32"):
        gru(x, torch.zeros(1, 3, 5), weights, num_layers=1)


# ---- S7: a strided history on the kernels --------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "reference"])
def test_a_strided_history_is_refused_with_the_fix_by_the_kernels(backend, device):
    """a15ff20 on cpu: the compiled op's bare 'history must be contiguous' (single layer) and 'histories[1] must be
    contiguous' (stack). Now a ValueError naming the state, the backend and what to do; the reference steps it."""
    dtype = dtype_for(backend)
    weights, biases = stack(backend, device)
    wide = torch.zeros(B, (K - 1) * 2, 2 * C, dtype=dtype, device=device)
    strided = CausalConvState(wide[..., :C], torch.zeros(B, dtype=torch.int64, device=device), K, 2)
    x, = inputs(backend, device, 1)
    with pytest.raises(ValueError, match=rf"^state\.history must be contiguous for the {backend} backend.*"
                                         r"contiguous copy"):
        causal_conv1d_step(x, weights[0], strided, biases[0], backend=backend)
    states = states_for(backend, device)
    states[1] = strided
    with pytest.raises(ValueError, match=rf"^states\[1\]\.history must be contiguous for the {backend} backend"):
        tcn_step(x, weights, biases, states, backend=backend)
    assert all(s.position.tolist() == [0] * B for s in states)
    # the reference steps the view as its contiguous copy
    copy = CausalConvState(strided.history.contiguous(), strided.position.clone(), K, 2)
    assert torch.equal(causal_conv1d_step(x, weights[0], strided, biases[0], backend="reference"),
                       causal_conv1d_step(x, weights[0], copy, biases[0], backend="reference"))
    assert torch.equal(strided.history, copy.history)


# ---- Session 37: from a sanitizer (ASan and UBSan) audit of the C++ kernels -----------------------------------


def test_a_prepared_plan_of_no_layers_is_refused():
    """The extension's TcnStepPlan read the last of an empty list of layers (a segfault) before the layer count
    was checked."""
    from hiertcn_fast import _extension

    plan = _extension.module().TcnStepPlan
    with pytest.raises(RuntimeError, match="takes 1 to 32 layers, got 0"):
        plan(torch.zeros(2, 4), [], [], [], [], None, None, [], 0, [], [], [])


@pytest.mark.parametrize("check", [("arg", 7, None), ("arg", -1, None), ("arg_item", 100000, "blocks", None)])
def test_a_shortcut_check_of_an_argument_past_the_three_is_refused(check):
    """TcnFastStep compared its checks' argument i (tcn, state, context) without a range check: index 7 read past
    the three (stack memory), and an "arg_item" check then handed that to Python (a segfault)."""
    from hiertcn_fast import _extension

    extension = _extension.module()
    x = torch.zeros(1, 4)
    plan = extension.TcnStepPlan(x, [torch.zeros(2, 4, 4)], [None], [None], [None], None, None, [1], 1,
                                 [torch.zeros(1, 1, 4)], [torch.zeros(1, dtype=torch.long)], [])
    with pytest.raises(RuntimeError, match=r"index must be 0 \(tcn\), 1 \(state\) or 2 \(context\)"):
        extension.TcnFastStep([check], plan, torch.Tensor, None, None, [])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_position_at_the_int64_limit_wraps_as_the_reference_does_and_is_then_refused(backend):
    """The kernels advanced a position with a signed overflow at 2**63 - 1 (undefined behaviour; setup.py's build
    wraps it through Python's -fwrapv, a build without, like the CMake one, need not): it goes to -2**63, as the
    reference's int64 addition does, and the next step refuses it."""
    torch.manual_seed(0)
    weight, x = torch.randn(2, 2, 2, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    state = CausalConvState(torch.zeros(1, 1, 2, dtype=torch.float64), torch.tensor([2**63 - 1]), 2, 1)
    with torch.no_grad():
        causal_conv1d_step(x, weight, state, backend=backend)
        assert state.position.tolist() == [-2**63]
        with pytest.raises(ValueError, match="position must be >= 0"):
            causal_conv1d_step(x, weight, state, backend=backend)
