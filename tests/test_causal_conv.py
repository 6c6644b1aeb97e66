"""causal_conv1d: every backend against the reference and against F.conv1d on a left-padded input (an
independent peer), gradients, determinism, the incremental step, torch.library checks, bad input."""

import pytest
import torch

import hiertcn_fast
from hiertcn_fast.ops import (CausalConvState, causal_conv1d, causal_conv1d_reference, causal_conv1d_step, tcn_step,
                              context_table)
from hiertcn_fast.ops import conv as conv_ops
from hiertcn_fast.ops.conv import pack_weight
from conv_helpers import ConvCase, conv1d_peer, left_padded_conv1d, split_leaves
from helpers import BACKEND_DEVICES, CUDA, COMPARE_DTYPE, assert_close, conv_blas, rand

# The DESIGN.md shape matrix: k 1..9, dilations up to 64, time 1, prime, and shorter than the receptive
# field, batch 1, channel counts that are not multiples of 8, dense / depthwise / grouped, every epilogue.
CASES = [
    ConvCase(1, 1, 3, 5, 1, 1),
    ConvCase(2, 13, 6, 10, 3, 2, context_channels=4, activation="relu", residual=True),
    ConvCase(3, 7, 12, 12, 5, 4, groups=12, activation="tanh", residual=True),
    ConvCase(2, 31, 9, 6, 9, 1, groups=3, context_channels=5, activation="gelu"),
    ConvCase(2, 37, 5, 7, 2, 64, context_channels=3, activation="tanh"),
    ConvCase(1, 200, 4, 8, 4, 64, groups=4, activation="relu", residual=True),
    ConvCase(2, 19, 40, 70, 3, 2, context_channels=6, activation="gelu", residual=True),
    ConvCase(2, 11, 7, 7, 6, 1, bias=False, residual=True),
    # Big enough for the CPU backend's BLAS route (dense, >= 32 channels); the second with a tap past the start.
    ConvCase(3, 57, 36, 40, 5, 4, context_channels=5, activation="relu", residual=True),
    ConvCase(3, 40, 48, 32, 4, 16, activation="tanh"),
    # Widths 7 and 8 (every k of 1..9 is run here).
    ConvCase(2, 23, 5, 6, 7, 3, context_channels=2, activation="relu", residual=True),
    ConvCase(1, 17, 8, 8, 8, 2, groups=8, activation="gelu"),
]


def run_forward_backward(args, backend, grad_out=None):
    """Output and the gradients of every tensor argument (by name) for loss = <out, grad_out>."""
    call, leaves = split_leaves(args)
    out = causal_conv1d(**call, backend=backend)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)
    return out, {name: t.grad for name, t in leaves.items()}, grad_out


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_and_conv1d_peer(backend, device, case):
    dtype = COMPARE_DTYPE[backend]
    args = case.inputs(dtype, device, noncontiguous=case.batch == 2)
    out, grads, grad_out = run_forward_backward(args, backend)
    assert out.shape == (case.batch, case.time, case.out_channels) and out.dtype == dtype

    # The reference, and the independent peer (F.conv1d on a left-padded input): output and every gradient.
    for definition in (causal_conv1d_reference, conv1d_peer):
        def_args, def_leaves = split_leaves(args, torch.float64)
        expected = definition(**def_args)
        assert_close(out, expected, dtype)
        expected.backward(grad_out.double())
        for name, grad in grads.items():
            assert_close(grad, def_leaves[name].grad, dtype)


@pytest.mark.parametrize("case", [ConvCase(2, 29, 48, 40, 5, 3, context_channels=7, activation="gelu", residual=True),
                                  ConvCase(3, 17, 33, 67, 2, 8, activation="tanh")], ids=str)
def test_cpu_float32_register_blocks(case):
    # float32 has its own register-block widths in the CPU micro-kernels (16 lanes, not 8): full blocks,
    # half blocks and tails of input and output channels all occur here.
    args = case.inputs(torch.float32, "cpu", noncontiguous=True)
    out, grads, grad_out = run_forward_backward(args, "cpu")
    ref_args, ref_leaves = split_leaves(args, torch.float64)
    ref = causal_conv1d_reference(**ref_args)
    ref.backward(grad_out.double())
    assert_close(out, ref, torch.float32)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), ref_leaves[name].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_context_equals_explicit_concatenation(backend, device):
    dtype = COMPARE_DTYPE[backend]
    batch, time, channels, ctx_channels, k, dilation = 3, 10, 6, 5, 4, 3
    x = rand(batch, time, channels, dtype=dtype, device=device)
    context = rand(batch, ctx_channels, dtype=dtype, device=device)
    weight = rand(9, channels + ctx_channels, k, dtype=dtype, device=device)
    bias = rand(9, dtype=dtype, device=device)
    concatenated = torch.cat([x, context[:, None].expand(-1, time, -1)], dim=2)
    expected = left_padded_conv1d(concatenated, weight, bias, dilation)
    out = causal_conv1d(x, weight[:, :channels].contiguous(), bias, dilation=dilation, context=context,
                        context_weight=weight[:, channels:].contiguous(), backend=backend)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("context", [False, True])
def test_a_graph_of_the_kernels_gradient_is_a_clear_error(context):
    """The kernels' backward builds no graph: create_graph=True would give higher derivatives without the
    conv's terms (silently, before). It is refused; the reference builds the graph."""
    x = rand(2, 6, 3, dtype=torch.float64).requires_grad_()
    weight = rand(4, 3, 2, dtype=torch.float64).requires_grad_()
    extra = dict(context=rand(2, 5, dtype=torch.float64).requires_grad_(),
                 context_weight=rand(4, 5, 2, dtype=torch.float64).requires_grad_()) if context else {}
    out = causal_conv1d(x, weight, activation="tanh", backend="cpu", **extra)
    with pytest.raises(RuntimeError, match="once differentiable.*backend='reference'"):
        torch.autograd.grad(out.sum(), [x], create_graph=True)
    reference = causal_conv1d(x, weight, activation="tanh", backend="reference", **extra)
    (grad_x,) = torch.autograd.grad(reference.sum(), [x], create_graph=True)
    assert grad_x.requires_grad


def test_op_under_autocast_computes_the_context_term_in_the_inputs_dtype():
    """Under autocast the op called with float32 tensors computes in float32, its context term included (the
    term's product used to come out in bfloat16, which the kernel refused), with and without gradients."""
    x = rand(2, 7, 4, dtype=torch.float32).requires_grad_()
    weight = rand(5, 4, 3, dtype=torch.float32).requires_grad_()
    context = rand(2, 6, dtype=torch.float32).requires_grad_()
    context_weight = rand(5, 6, 3, dtype=torch.float32).requires_grad_()
    leaves = [x, weight, context, context_weight]
    expected = causal_conv1d_reference(x, weight, dilation=2, context=context, context_weight=context_weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            inference = causal_conv1d(x, weight, dilation=2, context=context, context_weight=context_weight,
                                      backend="cpu")
        out = causal_conv1d(x, weight, dilation=2, context=context, context_weight=context_weight, backend="cpu")
    for got in (inference, out):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_keeps_the_context_weight_not_a_packed_copy_of_it():
    """In training the kernels' backends keep the context and the context weight itself for the backward; an
    einsum kept a packed, weight-sized copy per call (HierTCN calls the first block once per group of
    sessions). Gradients still equal the reference's."""
    x = rand(3, 8, 4, dtype=torch.float64).requires_grad_()
    weight = rand(5, 4, 3, dtype=torch.float64).requires_grad_()
    context = rand(3, 6, dtype=torch.float64).requires_grad_()
    context_weight = rand(5, 6, 3, dtype=torch.float64).requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = causal_conv1d(x, weight, dilation=2, context=context, context_weight=context_weight,
                            activation="relu", backend="cpu")
    storages = {t.untyped_storage().data_ptr() for t in kept}
    assert context_weight.untyped_storage().data_ptr() in storages
    assert not [t for t in kept if t.numel() == context_weight.numel()
                and t.untyped_storage().data_ptr() != context_weight.untyped_storage().data_ptr()]
    expected = causal_conv1d_reference(x, weight, dilation=2, context=context, context_weight=context_weight,
                                       activation="relu")
    leaves, grad = [x, weight, context, context_weight], torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 6, 3), (128, 256, 5), (33, 17, 1), (16, 16, 16), (20, 40, 9)], ids=str)
def test_context_weight_layouts_against_their_definitions(shape, dtype):
    """The cumulative packing context_table multiplies by, and the context weight's gradient from the packing's
    gradient, in C++ (float CPU tensors), against suffix sums and permutes in torch (what other devices run).
    Shapes include ones that are no multiple of the kernels' tiles."""
    out_channels, ctx_channels, k = shape
    weight = rand(*shape, dtype=dtype)
    packed = conv_ops._pack_cumulative_context_weight(weight)
    expected = weight.flip(2).cumsum(2).permute(1, 2, 0).reshape(ctx_channels, k * out_channels)
    torch.testing.assert_close(packed, expected)
    context = rand(3, ctx_channels, dtype=dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10  # sums of up to 256 * 16 terms, in another order
    torch.testing.assert_close((context @ packed).view(3, k, out_channels),
                               torch.einsum("bc,ocj->bjo", context, weight).flip(1).cumsum(1), rtol=tolerance,
                               atol=tolerance)
    taps = rand(k, out_channels, ctx_channels, dtype=dtype)
    torch.testing.assert_close(conv_ops.context_weight_grad(taps), taps.flip(0).cumsum(0).permute(1, 2, 0))


def test_context_weight_layouts_without_the_cpu_helpers(monkeypatch):
    """What CUDA and half-precision tensors run (torch ops instead of the C++ helpers): the same packing and
    gradient layout, and the same conv results and gradients in training."""
    weight, taps = rand(5, 6, 3), rand(3, 5, 6)
    packed, grad = conv_ops._pack_cumulative_context_weight(weight), conv_ops.context_weight_grad(taps)
    args = ConvCase(2, 9, 4, 5, 3, 2, context_channels=6, activation="relu", residual=True).inputs(torch.float64, "cpu")
    call, leaves = split_leaves(args)
    out = causal_conv1d(**call, backend="cpu")
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    monkeypatch.setattr(conv_ops, "_has_cpu_helper", lambda t: False)
    torch.testing.assert_close(conv_ops._pack_cumulative_context_weight(weight), packed, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv_ops.context_weight_grad(taps), grad, rtol=0, atol=1e-12)
    out_fallback = causal_conv1d(**call, backend="cpu")
    torch.testing.assert_close(out_fallback, out, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out_fallback.sum(), list(leaves.values())), grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_context_weight_layout_ops_check_their_arguments():
    ops = torch.ops.hiertcn_fast
    weight = torch.randn(4, 3, 2)
    with pytest.raises(RuntimeError, match=r"out must have shape \(3, 2, 4\)"):
        ops.context_weight_pack_out(weight, out=torch.empty(4, 3, 2))
    with pytest.raises(RuntimeError, match="contiguous, of one dtype"):
        ops.context_weight_pack_out(weight.transpose(0, 1).contiguous().transpose(0, 1), out=torch.empty(3, 2, 4))
    with pytest.raises(RuntimeError, match="contiguous, of one dtype"):
        ops.context_weight_grad_out(torch.randn(2, 4, 3), out=torch.empty(4, 3, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be \\(k, out_channels, ctx_channels\\)"):
        ops.context_weight_grad_out(torch.randn(2, 4), out=torch.empty(4, 3, 2))
    torch.library.opcheck(ops.context_weight_pack_out.default, (weight,), {"out": torch.empty(3, 2, 4)})
    torch.library.opcheck(ops.context_weight_grad_out.default, (torch.randn(2, 4, 3),), {"out": torch.empty(4, 3, 2)})


def test_context_table_gradient_sums_each_rows_steps():
    """The context table's gradient: row m < k-1 sums the steps [m * dilation, (m + 1) * dilation), the last row
    every later step; times shorter than the rows' reach included."""
    for time in (1, 4, 5, 8, 21):
        for dilation in (1, 2, 3):
            for k in (1, 2, 5):
                grad_pre = rand(2, time, 3)
                rows = [grad_pre[:, m * dilation:(None if m == k - 1 else (m + 1) * dilation)].sum(1)
                        for m in range(k)]
                torch.testing.assert_close(conv_ops._context_table_grad(grad_pre, dilation, k), torch.stack(rows, 1))


def test_training_packs_the_context_weight_per_call_and_sees_unversioned_changes():
    """In training every call packs the context weight from its current values: a change that moves no version
    counter (through ``.data``, or a step of torch's fused Adam) is used by the next call even while an earlier
    call's graph is alive, and the backward packs again from the weight it saved. Without gradients the packing
    is cached, and a fused optimizer's step forgets it (hiertcn_fast's optimizer step hook)."""
    context_weight = torch.nn.Parameter(rand(5, 6, 3))
    context = rand(4, 6)
    x, weight = rand(4, 7, 2), rand(5, 2, 3)

    def forward():
        return causal_conv1d(x, weight, context=context, context_weight=context_weight, activation="relu",
                             backend="cpu")

    def expected():
        return causal_conv1d_reference(x, weight, context=context, context_weight=context_weight.detach(),
                                       activation="relu")

    first = forward()  # alive through the changes below
    context_weight.data.mul_(-2.0)
    second = forward()
    torch.testing.assert_close(second, expected())
    (grad,) = torch.autograd.grad(second.sum(), context_weight)
    (want,) = torch.autograd.grad(causal_conv1d_reference(x, weight, context=context, context_weight=context_weight,
                                                          activation="relu").sum(), context_weight)
    torch.testing.assert_close(grad, want)
    optimizer = torch.optim.Adam([context_weight], lr=0.5, fused=True)
    context_weight.grad = torch.ones_like(context_weight)
    with torch.no_grad():
        forward()  # caches the packing for inference
        version = context_weight._version
        optimizer.step()
        assert context_weight._version == version  # why the caches cannot see this step by themselves
        torch.testing.assert_close(forward(), expected())
    del first


def test_a_fused_step_interrupted_as_its_post_hook_starts_leaves_no_stale_packing():
    """The cached packing (inference) was forgotten only by a post-hook of the optimizer's step: an interrupt as that
    hook was entered, after fused Adam had moved the weight, skipped it, and later calls without gradients
    (evaluation, serving) used the weight from before the step. The caches are now forgotten before the step too."""
    import sys

    context_weight = torch.nn.Parameter(rand(5, 6, 3))
    context, x, weight = rand(4, 6), rand(4, 7, 2), rand(5, 2, 3)

    def forward():
        return causal_conv1d(x, weight, context=context, context_weight=context_weight, activation="relu",
                             backend="cpu")

    optimizer = torch.optim.Adam([context_weight], lr=0.5, fused=True)
    context_weight.grad = torch.ones_like(context_weight)
    with torch.no_grad():
        forward()  # caches the packing
        fired = []

        def at_the_hook_once_the_weight_moved(frame, event, arg):  # a line event at the hook's first line
            if event == "line" and optimizer.state.get(context_weight, {}).get("step") == 1:
                sys.settrace(None)
                fired.append(True)
                raise KeyboardInterrupt
            return at_the_hook_once_the_weight_moved

        hooks = {conv_ops._around_optimizer_step.__code__}
        sys.settrace(lambda frame, event, arg: at_the_hook_once_the_weight_moved if frame.f_code in hooks else None)
        try:
            with pytest.raises(KeyboardInterrupt):
                optimizer.step()
        finally:
            sys.settrace(None)
        assert fired and optimizer.state[context_weight]["step"] == 1  # the step ran; the hook after it did not
        torch.testing.assert_close(forward(), causal_conv1d_reference(
            x, weight, context=context, context_weight=context_weight.detach(), activation="relu"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", [ConvCase(2, 9, 4, 6, 3, 2, context_channels=3, activation="tanh", residual=True),
                                  ConvCase(1, 7, 4, 4, 4, 1, groups=4, activation="gelu", residual=True),
                                  ConvCase(2, 5, 3, 6, 2, 3, groups=3, context_channels=2)], ids=str)
def test_gradcheck_float64(backend, case):
    args = case.inputs(torch.float64, "cpu")
    names = [name for name in ("x", "weight", "bias", "context", "context_weight", "residual") if name in args]

    def fn(*tensors):
        return causal_conv1d(**{**args, **dict(zip(names, tensors))}, backend=backend)

    assert torch.autograd.gradcheck(fn, [args[name].detach().requires_grad_() for name in names])


@pytest.mark.parametrize("route", ["always", "never"])
def test_gradcheck_float64_cpu_blas_route(route):
    # Big enough for the CPU backend's BLAS route (forced on, and off); fast mode (random projections), as full
    # numerical Jacobians of this many inputs take tens of seconds.
    with conv_blas(route):
        _gradcheck_blas_sized()


def _gradcheck_blas_sized():
    args = ConvCase(3, 60, 32, 32, 3, 3, context_channels=2, activation="tanh", residual=True).inputs(torch.float64,
                                                                                                        "cpu")
    names = [name for name in ("x", "weight", "bias", "context", "context_weight", "residual") if name in args]

    def fn(*tensors):
        return causal_conv1d(**{**args, **dict(zip(names, tensors))}, backend="cpu")

    assert torch.autograd.gradcheck(fn, [args[name].detach().requires_grad_() for name in names], fast_mode=True)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "reference"])
@pytest.mark.parametrize("case", [ConvCase(3, 150, 20, 24, 5, 2, context_channels=4, activation="relu", residual=True),
                                  ConvCase(3, 150, 40, 48, 5, 2, context_channels=4, activation="relu", residual=True)],
                         ids=str)
def test_backward_is_deterministic(backend, device, case):
    args = case.inputs(COMPARE_DTYPE[backend], device)
    _, first, grad_out = run_forward_backward(args, backend)
    _, second, _ = run_forward_backward(args, backend, grad_out)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ---- incremental step ----------------------------------------------------------------------------

STEP_CASES = [
    ConvCase(3, 12, 5, 7, 3, 2, context_channels=4, activation="relu", residual=True),
    ConvCase(2, 9, 6, 6, 4, 3, groups=6, activation="tanh"),
    ConvCase(2, 6, 4, 5, 1, 1, activation="gelu"),
]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", STEP_CASES, ids=str)
def test_step_by_step_equals_forward(backend, device, case):
    dtype = COMPARE_DTYPE[backend]
    args = case.inputs(dtype, device, noncontiguous=case.batch == 2)  # strided rows and bias in some cases
    x, residual = args.pop("x"), args.pop("residual", None)
    dilation = args.pop("dilation")
    state = CausalConvState.zeros(case.batch, case.in_channels, case.kernel_size, dilation, dtype=dtype,
                                  device=device)
    steps = [causal_conv1d_step(x[:, t], state=state, residual=None if residual is None else residual[:, t], **args,
                                backend=backend) for t in range(case.time)]
    full = causal_conv1d_reference(x.double(), dilation=dilation, residual=None if residual is None else residual.double(),
                                   **{k: (v.double() if torch.is_tensor(v) else v) for k, v in args.items()})
    assert_close(torch.stack(steps, 1), full, dtype)
    assert torch.equal(state.position, torch.full((case.batch,), case.time, device=device))
    # The circular buffer holds exactly the last (k - 1) * dilation inputs, bitwise, at slot t % length.
    length = (case.kernel_size - 1) * dilation
    for t in range(max(0, case.time - length), case.time):
        assert torch.equal(state.history[:, t % length], x[:, t])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_step_rows_reset_independently(backend, device):
    dtype = COMPARE_DTYPE[backend]
    batch, channels, k, dilation = 3, 5, 3, 2
    weight = rand(4, channels, k, dtype=dtype, device=device)
    first = rand(batch, 7, channels, dtype=dtype, device=device)
    second = rand(batch, 6, channels, dtype=dtype, device=device)
    state = CausalConvState.zeros(batch, channels, k, dilation, dtype=dtype, device=device)
    for t in range(7):
        causal_conv1d_step(first[:, t], weight, state, backend=backend)
    state.reset(torch.tensor([False, True, False], device=device))
    # Row 1 starts a new sequence; rows 0 and 2 carry on with theirs.
    expected = causal_conv1d_reference(torch.cat([first, second], 1).double(), weight.double(), dilation=dilation)
    expected_row1 = causal_conv1d_reference(second[1:2].double(), weight.double(), dilation=dilation)
    outs = torch.stack([causal_conv1d_step(second[:, t], weight, state, backend=backend) for t in range(6)], 1)
    assert_close(outs[[0, 2]], expected[[0, 2], 7:], dtype)
    assert_close(outs[1:2], expected_row1, dtype)
    assert state.position.tolist() == [13, 6, 13]



@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("rows", ["mask", "index"])
def test_a_reset_row_holds_nothing_of_its_old_sequence(backend, rows):
    """After reset(rows), those rows' state is a fresh state's, bit for bit: the history slots the new sequence has
    not yet written are zero, not the old sequence's inputs (a state saved or served after a reset must not carry
    a previous session's items), and stepping on gives the states of a row that started from zeros. The other
    rows are untouched."""
    batch, channels, k, dilation = 3, 4, 3, 3
    weight = rand(5, channels, k, dtype=torch.float32)
    old, new = rand(batch, 9, channels, dtype=torch.float32), rand(batch, 2, channels, dtype=torch.float32)
    state = CausalConvState.zeros(batch, channels, k, dilation)
    for t in range(9):
        causal_conv1d_step(old[:, t], weight, state, backend=backend)
    before = state.history.clone()
    assert before[1].abs().min() > 0  # every slot of row 1 holds an old input
    state.reset(torch.tensor([False, True, False]) if rows == "mask" else torch.tensor([1]))
    assert torch.equal(state.history[1], torch.zeros_like(state.history[1]))
    assert torch.equal(state.history[[0, 2]], before[[0, 2]]) and state.position.tolist() == [9, 0, 9]
    fresh = CausalConvState.zeros(1, channels, k, dilation)
    for t in range(2):
        causal_conv1d_step(new[:, t], weight, state, backend=backend)
        causal_conv1d_step(new[1:2, t], weight, fresh, backend=backend)
    assert torch.equal(state.history[1:2], fresh.history) and state.position[1] == fresh.position[0] == 2


def test_step_backends_agree_bitwise_on_state():
    case = STEP_CASES[0]
    args = case.inputs(torch.float32, "cpu")
    x, residual, dilation = args.pop("x"), args.pop("residual"), args.pop("dilation")
    states = {name: CausalConvState.zeros(case.batch, case.in_channels, case.kernel_size, dilation)
              for name in ("reference", "cpu")}
    for t in range(case.time):
        outs = {name: causal_conv1d_step(x[:, t], state=state, residual=residual[:, t], **args, backend=name)
                for name, state in states.items()}
        assert_close(outs["cpu"], outs["reference"], torch.float32)
    assert torch.equal(states["reference"].history, states["cpu"].history)
    assert torch.equal(states["reference"].position, states["cpu"].position)


def test_step_recomputes_the_context_table_only_when_the_context_changes():
    state = CausalConvState.zeros(2, 4, 3, 1)
    context, context_weight = rand(2, 5, dtype=torch.float32), rand(6, 5, 3, dtype=torch.float32)
    table = state.cached_context_table(context, context_weight)
    assert state.cached_context_table(context, context_weight) is table
    context[1] += 1  # a new session's user state written in place
    fresh = state.cached_context_table(context, context_weight)
    assert fresh is not table and torch.equal(fresh, context_table(context, context_weight))
    assert state.cached_context_table(context.clone(), context_weight) is not fresh


def test_step_repacks_the_weight_only_when_it_changes():
    state = CausalConvState.zeros(2, 4, 3, 1)
    weight = rand(6, 4, 3, dtype=torch.float32)
    x = rand(2, 4, dtype=torch.float32)
    causal_conv1d_step(x, weight, state, backend="cpu")
    packed = state.packed_weight(weight, 1)
    assert state.packed_weight(weight, 1) is packed
    with torch.no_grad():
        weight.mul_(2)  # an in-place update (an optimiser step) must be seen by the next step
    assert state.packed_weight(weight, 1) is not packed
    reference_state = CausalConvState.zeros(2, 4, 3, 1)
    causal_conv1d_step(x, weight, reference_state, backend="reference")
    assert_close(causal_conv1d_step(x, weight, state, backend="cpu"),
                 causal_conv1d_step(x, weight, reference_state, backend="reference"), torch.float32)


# ---- torch.library -------------------------------------------------------------------------------

def _op_args(dtype=torch.float64, device="cpu"):
    case = ConvCase(2, 9, 4, 6, 3, 2, context_channels=3, activation="gelu", residual=True)
    args = case.inputs(dtype, device)
    table = context_table(args["context"], args["context_weight"]).contiguous()
    return (args["x"], args["weight"], args["bias"], table, args["residual"], 2, 1, 2), case


def test_opcheck_compiled_ops():
    ops = torch.ops.hiertcn_fast
    args, case = _op_args()
    x, weight = args[0], args[1]
    out_shape = (case.batch, case.time, case.out_channels)
    torch.library.opcheck(ops.causal_conv1d_out.default, args,
                          {"out": torch.empty(out_shape, dtype=x.dtype), "pre": torch.empty(out_shape, dtype=x.dtype)})
    pre = torch.empty(out_shape, dtype=x.dtype)
    ops.causal_conv1d_out(*args, out=torch.empty(out_shape, dtype=x.dtype), pre=pre)
    grads = dict(grad_pre=torch.empty(out_shape, dtype=x.dtype), grad_x=torch.empty_like(x),
                 grad_weight=torch.empty_like(weight), grad_residual=torch.empty(out_shape, dtype=x.dtype))
    torch.library.opcheck(ops.causal_conv1d_backward_out.default,
                          (torch.randn(out_shape, dtype=x.dtype), x, weight, pre, args[4], 2, 1, 2), grads)
    state = CausalConvState.zeros(case.batch, case.in_channels, case.kernel_size, 2, dtype=x.dtype)
    step_args = (x[:, 0], pack_weight(weight, 1), args[2], args[3], args[4][:, 0], 2, 1, 2)
    torch.library.opcheck(ops.causal_conv1d_step_out.default, step_args,
                          dict(history=state.history, position=state.position,
                               out=torch.empty(case.batch, case.out_channels, dtype=x.dtype)))


def test_triton_op_schema_check():
    # Fake-tensor and compile checks of a triton_op need a GPU (the interpreter reads data pointers):
    # test_triton_opcheck_and_compile_on_gpu runs them.
    device = "cuda" if CUDA else "cpu"
    args, case = _op_args(torch.float32, device)
    out_shape = (case.batch, case.time, case.out_channels)
    triton_args = (args[0], pack_weight(args[1], 1), *args[2:])
    torch.library.opcheck(torch.ops.hiertcn_fast.causal_conv1d_triton_out.default,
                          (*triton_args, torch.empty(out_shape, device=device), torch.empty(out_shape, device=device)),
                          test_utils=("test_schema",))


@pytest.mark.gpu
def test_opcheck_cuda_and_triton_ops_on_gpu():
    ops = torch.ops.hiertcn_fast
    args, case = _op_args(torch.float32, "cuda")
    out_shape = (case.batch, case.time, case.out_channels)
    empty = lambda: torch.empty(out_shape, device="cuda")  # noqa: E731
    torch.library.opcheck(ops.causal_conv1d_out.default, args, {"out": empty(), "pre": empty()})
    torch.library.opcheck(ops.causal_conv1d_triton_out.default,
                          (args[0], pack_weight(args[1], 1), *args[2:], empty(), empty()))
    pre = empty()
    ops.causal_conv1d_out(*args, out=empty(), pre=pre)
    x, weight = args[0], args[1]
    backward_args = (torch.randn(out_shape, device="cuda"), x, weight, pre, args[4], 2, 1, 2)
    torch.library.opcheck(ops.causal_conv1d_backward_triton_out.default,
                          (*backward_args, empty(), torch.empty_like(x), torch.empty_like(weight), empty()))


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("cuda", marks=pytest.mark.gpu),
                                     pytest.param("triton", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph(backend):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    case = ConvCase(2, 11, 6, 8, 3, 2, context_channels=3, activation="relu", residual=True)
    args = case.inputs(torch.float32, device)
    call, leaves = split_leaves(args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda kw: causal_conv1d(**kw, backend=backend), fullgraph=True)
    out = compiled(call)
    ref_args, ref_leaves = split_leaves(args, torch.float64)
    ref = causal_conv1d_reference(**ref_args)
    assert_close(out, ref, torch.float32)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    for name, leaf in leaves.items():  # the compiled graph's backward: every gradient, not just its presence
        assert leaf.grad is not None, name
        torch.testing.assert_close(leaf.grad.double(), ref_leaves[name].grad, rtol=1e-4, atol=1e-4, msg=name)


# ---- half types on the GPU -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [ConvCase(4, 21, 128, 128, 5, 2, context_channels=256, activation="relu",
                                           residual=True),
                                  ConvCase(2, 300, 64, 64, 4, 64, groups=64, activation="gelu")], ids=str)
def test_half_types_on_gpu(backend, dtype, case):
    args = case.inputs(dtype, "cuda")
    out, grads, grad_out = run_forward_backward(args, backend)
    assert out.dtype == dtype
    ref_args, ref_leaves = split_leaves(args, torch.float64)
    ref = causal_conv1d_reference(**ref_args)
    ref.backward(grad_out.double())
    scale = ref.abs().max().item() + 1
    torch.testing.assert_close(out.double() / scale, ref.detach() / scale, rtol=0, atol=2e-2)
    for name, grad in grads.items():
        expected = ref_leaves[name].grad
        gscale = expected.abs().max().item() + 1
        torch.testing.assert_close(grad.double() / gscale, expected / gscale, rtol=0, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_large_shapes_on_gpu(backend):
    case = ConvCase(3, 700, 96, 80, 7, 32, context_channels=16, activation="tanh", residual=True)
    args = case.inputs(torch.float32, "cuda", noncontiguous=True)
    out, grads, grad_out = run_forward_backward(args, backend)
    ref_args, ref_leaves = split_leaves(args, torch.float64)
    ref = causal_conv1d_reference(**ref_args)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), ref_leaves[name].grad, rtol=1e-4, atol=1e-3)


# ---- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error():
    x, weight = rand(2, 5, 4, dtype=torch.float32), rand(6, 4, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="x must be 3-D"):
        causal_conv1d(x[0], weight)
    with pytest.raises(ValueError, match="weight must be 3-D"):
        causal_conv1d(x, weight[0])
    with pytest.raises(ValueError, match=r"must have 4 input channels .* got shape \(6, 3, 3\)"):
        causal_conv1d(x, weight[:, :3])
    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        causal_conv1d(x, weight, dilation=0)
    with pytest.raises(TypeError, match="dilation must be an int"):
        causal_conv1d(x, weight, dilation=1.5)
    with pytest.raises(ValueError, match="k >= 1"):
        causal_conv1d(x, weight[:, :, :0])
    with pytest.raises(ValueError, match="empty time axis"):
        causal_conv1d(x[:, :0], weight)
    with pytest.raises(ValueError, match=r"groups \(3\) must divide"):
        causal_conv1d(x, weight, groups=3)
    with pytest.raises(ValueError, match=r"bias \(out_channels,\) must have shape \(6,\)"):
        causal_conv1d(x, weight, rand(5, dtype=torch.float32))
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        causal_conv1d(x, weight.double())
    with pytest.raises(ValueError, match="context and context_weight must be given together"):
        causal_conv1d(x, weight, context=rand(2, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"context_weight \(out_channels, ctx_channels, k\) must have shape"):
        causal_conv1d(x, weight, context=rand(2, 3, dtype=torch.float32),
                      context_weight=rand(6, 3, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"residual \(batch, time, out_channels\) must have shape \(2, 5, 6\)"):
        causal_conv1d(x, weight, residual=rand(2, 5, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d(x, weight, activation="sigmoid")
    with pytest.raises(TypeError, match="must have a floating dtype"):
        causal_conv1d(x.long(), weight)
    # Another device: the meta device stands in for a GPU on machines without one.
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        causal_conv1d(x, weight.to("meta"))
    with pytest.raises(ValueError, match=r"context \(batch, ctx_channels\) must have batch 2"):
        causal_conv1d(x, weight, context=rand(3, 3, dtype=torch.float32),
                      context_weight=rand(6, 3, 3, dtype=torch.float32))
    # A reach (k - 1) * dilation past 2**62 would overflow the kernels' int64 tap offsets.
    with pytest.raises(ValueError, match=r"\(k - 1\) \* dilation must be below 2\*\*62"):
        causal_conv1d(x, weight, dilation=2 ** 61)
    causal_conv1d(x, weight, dilation=2 ** 61 - 1)  # just below: every tap but the newest falls before the start
    # With k = 1 the reach is 0 at any dilation, but the ops' int64 arguments must hold it (the cpu backend failed
    # in the dispatcher with "Expected a value of type 'int' ... but instead found type 'int'").
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=r"dilation and \(k - 1\) \* dilation must be below 2\*\*62"):
            causal_conv1d(x, weight[:, :, :1], dilation=2 ** 63, backend=backend)
    if CUDA:
        with pytest.raises(ValueError, match="weight is on cuda"):
            causal_conv1d(x, weight.cuda())


@pytest.mark.parametrize("k,dilation", [(3, 2 ** 63 - 1), (5, 2 ** 62 + 1)])
def test_compiled_op_refuses_a_reach_that_overflows(k, dilation):
    """The op itself refuses such a dilation: (k - 1) * dilation wraps around int64 (to -2, or to 4, which a
    history of 4 rows would have matched), and the kernels would address memory outside x and the history."""
    x, weight = rand(2, 64, 64, dtype=torch.float32), rand(64, 64, k, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"\(k - 1\) \* dilation must be below 2\^62"):
        torch.ops.hiertcn_fast.causal_conv1d_out(x, weight, None, None, None, dilation, 1, 0,
                                                 out=torch.empty(2, 64, 64), pre=None)
    packed = weight.permute(2, 1, 0).contiguous()
    history = torch.zeros(2, 4, 64)
    with pytest.raises(RuntimeError, match=r"\(k - 1\) \* dilation must be below 2\^62"):
        torch.ops.hiertcn_fast.tcn_step_out(x[:, 0], [packed], [None], [None], [None], None, None, [dilation], 0,
                                            histories=[history], positions=[torch.zeros(2, dtype=torch.int64)],
                                            out=torch.empty(2, 64))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_dilations_past_int32(backend, device):
    """Tap offsets past 2**31 (and up to the 2**62 bound) are computed in 64 bits: only the newest tap lands."""
    dtype = COMPARE_DTYPE[backend]
    x, weight = rand(2, 9, 4, dtype=dtype, device=device), rand(6, 4, 3, dtype=dtype, device=device)
    for dilation in (2 ** 31 + 5, 2 ** 61 - 1):
        out = causal_conv1d(x, weight, dilation=dilation, backend=backend)
        assert_close(out, torch.einsum("btc,oc->bto", x.double(), weight[:, :, -1].double()), dtype)


@pytest.mark.parametrize("kernel_size,dilation", [(5, 2 ** 30), (4, 1431655766)])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_dilations_whose_reach_wraps_int32(backend, device, kernel_size, dilation):
    """Dilations below 2**31 whose reach (k - 1) * dilation is not (4 * 2**30 wraps to 0, 3 * 1431655766 to 2):
    the forward and both gradients see only the newest tap, as if the lags were computed in 64 bits (the step's
    history would hold (k - 1) * dilation rows: not testable at these reaches)."""
    dtype = COMPARE_DTYPE[backend]
    x = rand(2, 9, 4, dtype=dtype, device=device).requires_grad_()
    weight = rand(6, 4, kernel_size, dtype=dtype, device=device).requires_grad_()
    out = causal_conv1d(x, weight, dilation=dilation, backend=backend)
    newest = weight[:, :, -1].detach().double()
    assert_close(out, torch.einsum("btc,oc->bto", x.detach().double(), newest), dtype)
    grad = rand(2, 9, 6, dtype=dtype, device=device)
    grad_x, grad_weight = torch.autograd.grad(out, (x, weight), grad)
    assert_close(grad_x, grad.double() @ newest, dtype)
    expected_weight = torch.zeros(6, 4, kernel_size, dtype=torch.float64, device=device)
    expected_weight[:, :, -1] = torch.einsum("bto,btc->oc", grad.double(), x.detach().double())
    assert_close(grad_weight, expected_weight, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_strided_biases(backend, device):
    """A bias that is a strided view (every other element of a longer vector) gives the result of its contiguous
    copy, in the forward, its gradient, the step and the stack step; the kernels read biases as plain rows."""
    dtype = COMPARE_DTYPE[backend]
    x = rand(2, 9, 4, dtype=dtype, device=device)
    weight = rand(6, 4, 3, dtype=dtype, device=device)
    bias = rand(6, dtype=dtype, device=device, noncontiguous=True)
    assert not bias.is_contiguous()
    leaf = bias.detach().requires_grad_()
    out = causal_conv1d(x, weight, leaf, dilation=2, activation="tanh", backend=backend)
    expected = causal_conv1d_reference(x, weight, bias.contiguous(), dilation=2, activation="tanh")
    assert_close(out, expected, dtype)
    out.sum().backward()
    assert_close(leaf.grad, (1 - expected ** 2).sum((0, 1)), dtype)

    state, copy_state = (CausalConvState.zeros(2, 4, 3, 2, dtype=dtype, device=device) for _ in range(2))
    for t in range(4):
        assert_close(causal_conv1d_step(x[:, t], weight, state, bias, backend=backend),
                     causal_conv1d_step(x[:, t], weight, copy_state, bias.contiguous(), backend=backend), dtype)

    square = rand(4, 4, 3, dtype=dtype, device=device)
    proj_bias = rand(4, dtype=dtype, device=device, noncontiguous=True)
    proj = rand(4, 4, dtype=dtype, device=device)
    states, copy_states = ([CausalConvState.zeros(2, 4, 3, d, dtype=dtype, device=device) for d in (1, 2)]
                           for _ in range(2))
    for t in range(4):
        got = tcn_step(x[:, t], [square, square], [bias[:4], None], states, proj_weights=[None, proj],
                       proj_biases=[None, proj_bias], backend=backend)
        want = tcn_step(x[:, t], [square, square], [bias[:4].contiguous(), None], copy_states,
                        proj_weights=[None, proj], proj_biases=[None, proj_bias.contiguous()], backend=backend)
        assert_close(got, want, dtype)
    bias_values = bias.clone()
    bias.mul_(2)  # the views changed in place: the next stack step follows
    want = tcn_step(x[:, 4], [square, square], [bias[:4].contiguous(), None], copy_states,
                    proj_weights=[None, proj], proj_biases=[None, proj_bias.contiguous()], backend=backend)
    got = tcn_step(x[:, 4], [square, square], [bias[:4], None], states, proj_weights=[None, proj],
                   proj_biases=[None, proj_bias], backend=backend)
    assert_close(got, want, dtype)
    assert not torch.equal(bias, bias_values)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_relu_keeps_a_nan_as_torch_relu_does(backend, device, residual):
    """A NaN reaches every output that reads it with activation="relu" too, as torch.relu(nan) = nan and the
    reference give: in the forward, the step and the stack step (a relu written v > 0 ? v : 0 makes it 0 and hides
    a diverged model behind finite outputs), and the backward gives relu's gradient there, 0, as torch's does."""
    dtype = COMPARE_DTYPE[backend]
    x = rand(2, 6, 3, dtype=dtype, device=device)
    x[0, 2, 1] = float("nan")
    weight = rand(4, 3, 2, dtype=dtype, device=device)
    res = rand(2, 6, 4, dtype=dtype, device=device) if residual else None
    expected = causal_conv1d_reference(x, weight, activation="relu", residual=res)
    nan = torch.zeros(2, 6, dtype=torch.bool, device=device)
    nan[0, 2:4] = True  # the NaN's step and the next (k = 2, dilation 1), in row 0 only
    assert torch.equal(torch.isnan(expected).all(-1), nan) and torch.equal(torch.isnan(expected).any(-1), nan)
    leaf = x.detach().requires_grad_()
    out = causal_conv1d(leaf, weight, activation="relu", residual=res, backend=backend)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert_close(torch.nan_to_num(out), torch.nan_to_num(expected), dtype)
    grad = rand(2, 6, 4, dtype=dtype, device=device)
    (grad_x,) = torch.autograd.grad(out, leaf, grad)
    peer = x.detach().requires_grad_()
    (expected_grad,) = torch.autograd.grad(causal_conv1d_reference(peer, weight, activation="relu", residual=res),
                                           peer, grad)
    assert torch.equal(torch.isnan(grad_x), torch.isnan(expected_grad))
    assert_close(torch.nan_to_num(grad_x), torch.nan_to_num(expected_grad), dtype)

    state = CausalConvState.zeros(2, 3, 2, 1, dtype=dtype, device=device)
    steps = torch.stack([causal_conv1d_step(x[:, t], weight, state, activation="relu",
                                            residual=None if res is None else res[:, t], backend=backend)
                         for t in range(6)], 1)
    assert torch.equal(torch.isnan(steps), torch.isnan(expected))
    square = rand(3, 3, 2, dtype=dtype, device=device)
    states = [CausalConvState.zeros(2, 3, 2, 1, dtype=dtype, device=device)]
    stacked = torch.stack([tcn_step(x[:, t], [square], [None], states, backend=backend) for t in range(6)], 1)
    assert torch.equal(torch.isnan(stacked).any(-1), nan)


def test_step_bad_input_is_a_clear_error():
    weight = rand(6, 4, 3, dtype=torch.float32)
    state = CausalConvState.zeros(2, 4, 3, 2)
    with pytest.raises(ValueError, match="x must be 2-D"):
        causal_conv1d_step(rand(2, 1, 4, dtype=torch.float32), weight, state)
    with pytest.raises(ValueError, match="the state was made for k=3"):
        causal_conv1d_step(rand(2, 4, dtype=torch.float32), weight[:, :, :2], state)
    with pytest.raises(ValueError, match=r"state.history .* must have shape \(3, 4, 4\)"):
        causal_conv1d_step(rand(3, 4, dtype=torch.float32), weight, state)
    with pytest.raises(TypeError, match="state must be a CausalConvState"):
        causal_conv1d_step(rand(2, 4, dtype=torch.float32), weight, state.history)
    strided = CausalConvState(torch.zeros(2, 4, 4), torch.zeros(4, dtype=torch.int64)[::2], 3, 2)
    # (refused in Python, as for the triton backend, before the compiled op's "position must be a contiguous int64
    # tensor, got a Long tensor with strides [2]")
    with pytest.raises(ValueError, match=r"state.position must be a contiguous int64 \(2,\) tensor on x's device "
                                         r"\(cpu\), got torch.int64 \(2,\) on cpu, strided"):
        causal_conv1d_step(rand(2, 4, dtype=torch.float32), weight, strided, backend="cpu")
    with pytest.raises(TypeError, match="state.history has dtype torch.float64 but x has torch.float32"):
        causal_conv1d_step(rand(2, 4, dtype=torch.float32), weight, CausalConvState.zeros(2, 4, 3, 1,
                                                                                        dtype=torch.float64))
    # An expanded history (rows sharing memory) is refused on every backend, before anything is written.
    for backend in ("reference", "cpu"):
        shared = CausalConvState(torch.zeros(1, 4, 4).expand(2, 4, 4), torch.zeros(2, dtype=torch.int64), 3, 2)
        with pytest.raises((ValueError, RuntimeError), match="history must .*(contiguous|memory of its own)"):
            causal_conv1d_step(rand(2, 4, dtype=torch.float32), weight, shared, backend=backend)
        assert shared.position.tolist() == [0, 0] and not shared.history.any(), backend


def test_compiled_op_checks_arguments_itself():
    x, weight = rand(2, 5, 4, dtype=torch.float32), rand(6, 4, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.hiertcn_fast.causal_conv1d_out(x, weight, None, None, None, 1, 1, 0, out=torch.empty(2, 5, 5),
                                                 pre=None)
    with pytest.raises(RuntimeError, match="dilation must be >= 1"):
        torch.ops.hiertcn_fast.causal_conv1d_out(x, weight, None, None, None, 0, 1, 0, out=torch.empty(2, 5, 6),
                                                 pre=None)
    with pytest.raises(RuntimeError, match="must have the dtype of x"):
        torch.ops.hiertcn_fast.causal_conv1d_out(x, weight.double(), None, None, None, 1, 1, 0,
                                                 out=torch.empty(2, 5, 6), pre=None)


def test_explicit_backend_never_falls_back():
    x, weight = rand(2, 5, 4, dtype=torch.float16), rand(6, 4, 3, dtype=torch.float16)
    with pytest.raises(hiertcn_fast.BackendUnavailableError, match="does not support torch.float16"):
        causal_conv1d(x, weight, backend="cpu")
    # auto picks a backend that supports the dtype: the reference, for float16 on the CPU.
    assert_close(causal_conv1d(x, weight), causal_conv1d_reference(x.double(), weight.double()), torch.float16)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "reference"])
@pytest.mark.parametrize("activation", [None, "relu", "tanh", "gelu"])
def test_a_residual_of_its_own_is_not_kept_where_the_output_gives_the_derivative(backend, device, activation):
    """out = act(act(z) + residual): for relu, tanh and none the outer derivative comes from out, so a residual
    that is not x itself (a projection's output) is not kept for the backward; the gradients still equal the
    reference's. gelu keeps it (its derivative needs its input)."""
    dtype = COMPARE_DTYPE[backend]
    x, weight, bias = rand(3, 11, 6, dtype=dtype, device=device), rand(5, 6, 3, dtype=dtype, device=device), \
        rand(5, dtype=dtype, device=device)
    residual = rand(3, 11, 5, dtype=dtype, device=device)
    leaves = [t.requires_grad_() for t in (x, weight, bias, residual)]
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = causal_conv1d(x, weight, bias, dilation=2, activation=activation, residual=residual, backend=backend)
    assert (residual.untyped_storage().data_ptr() in kept) == (activation == "gelu")
    grad_out = rand(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_out = causal_conv1d_reference(*(t.double() for t in (x, weight, bias)), dilation=2, activation=activation,
                                           residual=residual.double())
    expected = torch.autograd.grad(expected_out, leaves, grad_out.double())
    assert_close(out, expected_out, dtype)
    for grad, want in zip(grads, expected):
        assert_close(grad, want, dtype)
    # With tanh the output is kept: an in-place change of it before the backward is refused, as after torch.tanh.
    if activation == "tanh":
        out = causal_conv1d(x, weight, bias, activation=activation, residual=residual, backend=backend)
        out.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_triton_half_precision_tanh_keeps_its_residual_for_an_exact_derivative_near_saturation():
    """tanh's derivative from a float16 output rounds to 0 near saturation (out == 1.0): in half types the residual
    is kept and the derivative comes from z and the residual in float32, as the reference's does."""
    backend = "triton"  # the interpreter on this machine; the same Python path as cuda
    x, weight = torch.zeros(1, 4, 2, dtype=torch.float16), torch.zeros(3, 2, 1, dtype=torch.float16)
    residual = torch.tensor([3.8, 4.2, 5.0], dtype=torch.float16).expand(1, 4, 3).clone().requires_grad_()
    kept = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.add(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        out = causal_conv1d(x, weight, activation="tanh", residual=residual, backend=backend)
    assert residual.untyped_storage().data_ptr() in kept
    grad, = torch.autograd.grad(out.float().sum(), [residual])
    exact = 1 - torch.tanh(torch.tensor([3.8, 4.2, 5.0], dtype=torch.float16).float()) ** 2
    torch.testing.assert_close(grad[0, 0].float(), exact, rtol=2e-3, atol=1e-6)
    assert (grad > 0).all()


@pytest.mark.parametrize("groups", [1, 6], ids=["dense", "depthwise"])
def test_triton_weight_gradient_split_into_row_chunks(groups):
    """The triton weight gradient sums its batch x time rows in chunks of about 512 (partials added in chunk order):
    with 3 x 401 rows, three chunks; equal to the reference, and bitwise the same run after run."""
    backend, device = BACKEND_DEVICES[2].values
    from hiertcn_fast.triton.causal_conv import _weight_grad_chunks
    assert _weight_grad_chunks(3 * 401) == (3, 401) and _weight_grad_chunks(100) == (1, 100)
    x = rand(3, 401, 6, dtype=torch.float32, device=device)
    weight = rand(6, 6 // groups, 3, dtype=torch.float32, device=device, scale=0.5).requires_grad_()
    grad_out = rand(3, 401, 6, dtype=torch.float32, device=device)
    grads = []
    for _ in range(2):
        out = causal_conv1d(x, weight, dilation=5, groups=groups, activation="relu", backend=backend)
        grads.append(torch.autograd.grad(out, weight, grad_out)[0])
    assert torch.equal(grads[0], grads[1])
    weight64 = weight.detach().double().requires_grad_()
    expected = causal_conv1d_reference(x.double(), weight64, dilation=5, groups=groups, activation="relu")
    assert_close(grads[0], torch.autograd.grad(expected, weight64, grad_out.double())[0], torch.float32)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if p.values[0] != "reference"])
@pytest.mark.parametrize("residual_kind", ["none", "own", "x"])
def test_relu_keeps_one_byte_of_sign_bits_instead_of_z_and_the_residual(backend, device, residual_kind):
    """relu's backward needs only signs: of z (relu'(z)) and of relu(z) + residual (the output's). The forward
    kernel writes both as bits of one byte per element, and that byte is all the backward keeps besides x and
    the weight: not z, not the residual, not the output. The gradients equal the reference's in every case, and
    the output may be changed in place before the backward, as nothing refers to it."""
    dtype = COMPARE_DTYPE[backend]
    x = rand(3, 9, 5, dtype=dtype, device=device).requires_grad_()
    weight = rand(5, 5, 3, dtype=dtype, device=device).requires_grad_()
    residual = {"none": None, "x": x, "own": rand(3, 9, 5, dtype=dtype, device=device).requires_grad_()}[residual_kind]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        out = causal_conv1d(x, weight, dilation=2, activation="relu", residual=residual, backend=backend)
    same_shape = [kept_dtype for kept_dtype, shape in kept if shape == tuple(out.shape)]
    assert sorted(map(str, same_shape)) == sorted(map(str, [torch.uint8, dtype]))  # the bits, and x (as wide)
    leaves = [x, weight] + ([residual] if residual_kind == "own" else [])
    grad_out = rand(*out.shape, dtype=dtype, device=device)
    out.mul_(1)  # an in-place change: allowed, nothing kept refers to the output
    grads = torch.autograd.grad(out, leaves, grad_out)
    wide = {id(t): t.detach().double().requires_grad_() for t in leaves}
    expected = causal_conv1d_reference(wide[id(x)], wide[id(weight)], dilation=2, activation="relu",
                                       residual=None if residual is None else wide[id(residual)])
    assert_close(out.detach(), expected.detach(), dtype)
    for grad, want in zip(grads, torch.autograd.grad(expected, list(wide.values()), grad_out.double())):
        assert_close(grad, want, dtype)


def test_compiled_ops_take_sign_bits_for_relu_only_and_then_no_residual():
    x, weight = rand(2, 5, 4, dtype=torch.float32), rand(3, 4, 2, dtype=torch.float32)
    out, bits = torch.empty(2, 5, 3), torch.empty(2, 5, 3, dtype=torch.uint8)
    ops = torch.ops.hiertcn_fast
    with pytest.raises(RuntimeError, match="pre as uint8 sign bits is for relu only"):
        ops.causal_conv1d_out(x, weight, None, None, None, 1, 1, 2, out=out, pre=bits)
    ops.causal_conv1d_out(x, weight, None, None, None, 1, 1, 1, out=out, pre=bits)  # relu: fine
    assert set(bits.unique().tolist()) <= {0, 1, 3}  # bit 1 (out > 0) only where bit 0 (z > 0), without residual
    grads = dict(grad_pre=torch.empty(2, 5, 3), grad_x=torch.empty(2, 5, 4), grad_weight=torch.empty(3, 4, 2))
    with pytest.raises(RuntimeError, match="with pre as sign bits the residual is not read"):
        ops.causal_conv1d_backward_out(torch.ones(2, 5, 3), x, weight, bits, torch.zeros(2, 5, 3), 1, 1, 1,
                                       grad_residual=torch.empty(2, 5, 3), **grads)
    ops.causal_conv1d_backward_out(torch.ones(2, 5, 3), x, weight, bits, None, 1, 1, 1, grad_residual=None, **grads)
    assert torch.equal(grads["grad_pre"], (bits & 1).float())


def test_triton_ops_take_sign_bits_for_relu_only_and_then_no_residual():
    """The triton ops check what the C++ ones do (a uint8 pre is relu's sign bits; with them no residual is read)."""
    backend, device = BACKEND_DEVICES[2].values
    x, weight = rand(2, 5, 4, dtype=torch.float32, device=device), rand(3, 4, 2, dtype=torch.float32, device=device)
    out, bits = x.new_empty(2, 5, 3), torch.empty(2, 5, 3, dtype=torch.uint8, device=device)
    packed = pack_weight(weight, 1)
    ops = torch.ops.hiertcn_fast
    with pytest.raises(RuntimeError, match="pre as uint8 sign bits is for relu only"):
        ops.causal_conv1d_triton_out(x, packed, None, None, None, 1, 1, 3, out, bits)
    ops.causal_conv1d_triton_out(x, packed, None, None, None, 1, 1, 1, out, bits)
    grads = [x.new_empty(2, 5, 3), x.new_empty(2, 5, 4), x.new_empty(3, 4, 2)]
    with pytest.raises(RuntimeError, match="with pre as sign bits the residual is not read"):
        ops.causal_conv1d_backward_triton_out(torch.ones_like(out), x, weight, bits, torch.zeros_like(out), 1, 1, 1,
                                              *grads, x.new_empty(2, 5, 3))
    with pytest.raises(RuntimeError, match="pre as uint8 sign bits is for relu only"):
        ops.causal_conv1d_backward_triton_out(torch.ones_like(out), x, weight, bits, None, 1, 1, 3, *grads, None)
    ops.causal_conv1d_backward_triton_out(torch.ones_like(out), x, weight, bits, None, 1, 1, 1, *grads, None)
    assert torch.equal(grads[0], (bits & 1).float())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_one_tap_with_a_context_takes_any_dilation_the_op_accepts(backend, device):
    """With k = 1 the dilation changes nothing, so a huge one (the op accepts any below 2**62) gives the gradients of
    dilation 1. The context table's gradient once viewed an empty slice as (0, dilation) rows, whose stride
    (dilation * out_channels) overflowed int64 ('Stride calculation overflowed')."""
    dtype = COMPARE_DTYPE[backend]
    inputs = [rand(*shape, dtype=dtype, device=device) for shape in ((2, 3, 2), (4, 2, 1), (2, 2), (4, 2, 1))]
    results = []
    for dilation in (1, 2 ** 62 - 1, 2 ** 61):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = causal_conv1d(leaves[0], leaves[1], dilation=dilation, context=leaves[2], context_weight=leaves[3],
                            backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            assert torch.equal(got, expected)
    definition = split_leaves(dict(x=inputs[0], weight=inputs[1], context=inputs[2], context_weight=inputs[3]),
                              torch.float64)[0]
    assert_close(results[0][0], conv1d_peer(**definition), dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_tanh_is_accurate_relative_to_small_preactivations(backend, device):
    """tanh(v) near 0 is v to float32 rounding; 2 / (1 + e^-2v) - 1 (how the Triton kernels had it) cancels there to
    an absolute error of a float ulp of 1: tanh(1e-5) came out 1.0013580e-5, tanh(1e-30) 0."""
    v = torch.tensor([1e-3, -1e-4, 1e-5, -1e-7, 1e-30, 0.3, -0.39, 0.41, -0.6, 2.0, -9.0, 30.0], device=device)
    dtype = COMPARE_DTYPE[backend]
    x = v.to(dtype).view(1, -1, 1).requires_grad_()
    weight = torch.ones(1, 1, 1, dtype=dtype, device=device)
    out = causal_conv1d(x, weight, activation="tanh", backend=backend)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    exact = torch.tanh(v.double()).view(1, -1, 1)
    torch.testing.assert_close(out.double(), exact, rtol=4 * torch.finfo(dtype).eps, atol=0.0)
    # 1 - y^2 is computed from the rounded y: near |y| = 1 it keeps an absolute error of a few ulps of 1.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.double(), 1 - exact * exact, rtol=4 * eps, atol=4 * eps)
