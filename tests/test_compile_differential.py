"""Differential fuzz of torch.compile over the public ops and nn modules, on the cpu and reference backends.

The peers: eager mode, and for values plain PyTorch written here (F.conv1d on a left-padded input, torch.nn.GRUCell
and torch.nn.GRU with the same weights, F.cross_entropy). What is fuzzed is what the other compile tests leave out:
dynamic=True with the shapes changing between calls of one compiled function (batch, time, time 1, time shorter than
the receptive field), k = 1, a huge dilation, non-contiguous arguments (transposed, sliced, strided weights and
biases), float32 and float64 in the same compiled function, requires_grad changing between calls (the graph that
was traced without gradients must not be reused for one that needs them), backward through the compiled graph,
compiled steps mutating their state, the inductor backend (which lays out the fake kernels' outputs itself), and
torch.library.opcheck of the registered ops on edge-case arguments.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from hiertcn_fast import ops
from hiertcn_fast.nn import GRU, TCN, CausalConv1d, GRUCell, TemporalBlock
from hiertcn_fast.ops import CausalConvState
from hiertcn_fast.ops.conv import context_table, pack_weight

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread_fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)


# ---- independent references -------------------------------------------------------------------------------------

_ACT = {None: lambda v: v, "relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}


def conv_ref(x, weight, bias=None, *, dilation=1, groups=1, context=None, context_weight=None, activation=None,
             residual=None):
    """F.conv1d on the input left-padded by the reach (taps reaching before the start dropped first, so that a
    huge dilation pads nothing), the context concatenated to every step."""
    batch, time, _ = x.shape
    if context is not None:
        x = torch.cat([x, context[:, None, :].expand(batch, time, context.shape[1])], 2)
        if groups != 1:
            raise NotImplementedError
        weight = torch.cat([weight, context_weight], 1)
    k = weight.shape[2]
    first = 0
    while (k - 1 - first) * dilation >= time:
        first += 1
    weight = weight[:, :, first:]
    k = weight.shape[2]
    d = dilation if k > 1 else 1
    z = F.conv1d(F.pad(x.transpose(1, 2), ((k - 1) * d, 0)), weight, bias, dilation=d, groups=groups).transpose(1, 2)
    act = _ACT[activation]
    out = act(z)
    return out if residual is None else act(out + residual)


def cell_ref(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    cell = torch.nn.GRUCell(x.shape[-1], h.shape[-1], bias=b_ih is not None, dtype=x.dtype)
    params = {"weight_ih": w_ih, "weight_hh": w_hh}
    if b_ih is not None:
        params.update(bias_ih=b_ih, bias_hh=b_hh)
    return torch.func.functional_call(cell, params, (x, h))


def gru_ref(x, h0, layers):
    bias = len(layers[0]) == 4
    module = torch.nn.GRU(x.shape[2], layers[0][1].shape[1], num_layers=len(layers), bias=bias, batch_first=True,
                          dtype=x.dtype)
    params = {}
    for l, ws in enumerate(layers):
        for name, t in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), ws):
            params[f"{name}_l{l}"] = t
    return torch.func.functional_call(module, params, (x, h0))


def session_ref(items, lengths, h, keep, layers, proj_weight=None, proj_bias=None):
    batch, time, _ = items.shape
    lengths = lengths.to(torch.int64)
    mask = (torch.arange(time)[None, :] < lengths[:, None]).to(items.dtype)
    x = (items * mask[..., None]).sum(1) / lengths.clamp(min=1).to(items.dtype)[:, None]
    if proj_weight is not None:
        x = F.linear(x, proj_weight, proj_bias)
    new = []
    for l, ws in enumerate(layers):
        x = cell_ref(x, h[l], *ws)
        new.append(x)
    return torch.where((lengths > 0)[None, :, None], torch.stack(new), h) * keep.to(h.dtype)[None, :, None]


# ---- helpers ----------------------------------------------------------------------------------------------------

def _same_strides_copy(t):
    """A leaf with t's values, shape and strides (and requires_grad)."""
    if not isinstance(t, torch.Tensor):
        return t
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t.detach())
    return copy.requires_grad_(t.requires_grad)


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _check_outputs_and_grads(got, want, got_args, want_args, tol=None, msg=""):
    """got == want, then the gradients of a random cotangent through both."""
    tol = tol or {}
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (msg, i, a.shape, b.shape, a.dtype, b.dtype)
        torch.testing.assert_close(a, b, msg=f"{msg} output {i}", **tol)
    leaves_got, leaves_want = _leaves(got_args), _leaves(want_args)
    if not leaves_got:
        return
    cotangents = [torch.randn_like(b) for b in want]
    g1 = torch.autograd.grad(got, leaves_got, cotangents, allow_unused=True)
    g2 = torch.autograd.grad(want, leaves_want, cotangents, allow_unused=True)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert (a is None) == (b is None), (msg, i)
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, (msg, i)
            torch.testing.assert_close(a, b, msg=f"{msg} grad {i}", **tol)


def _randn(*shape, dtype=F64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# ---- causal_conv1d ----------------------------------------------------------------------------------------------

CONV_SHAPES = [(2, 1), (3, 2), (2, 13), (3, 2)]  # time 1, shorter than the reach, longer; back to a seen one


@pytest.mark.parametrize("k,dilation", [(1, 7), (3, 2), (2, 2 ** 40), (4, 3)])
def test_conv_cpu_dynamic_shapes_with_context_and_residual(k, dilation):
    """One dynamic compile per layer shape, batch and time changing between calls: the compiled forward and backward
    equal F.conv1d's and eager's, for every input."""
    def fn(x, w, b, c, cw, r):
        return ops.causal_conv1d(x, w, b, dilation=dilation, context=c, context_weight=cw, activation="tanh",
                                 residual=r, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, time in CONV_SHAPES:
        args = [_randn(batch, time, 3), _randn(4, 3, k), _randn(4), _randn(batch, 2), _randn(4, 2, k),
                _randn(batch, time, 4)]
        ref_args = [_same_strides_copy(a) for a in args]
        eager_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        x, w, b, c, cw, r = ref_args
        want = conv_ref(x, w, b, dilation=dilation, context=c, context_weight=cw, activation="tanh", residual=r)
        _check_outputs_and_grads(got, want, args, ref_args, msg=f"k={k} d={dilation} {batch}x{time}")
        torch.testing.assert_close(got, fn(*eager_args))


def test_conv_reference_dynamic_shapes():
    k, dilation = 3, 2

    def fn(x, w, b, c, cw, r):
        return ops.causal_conv1d(x, w, b, dilation=dilation, context=c, context_weight=cw, activation="relu",
                                 residual=r, backend="reference")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, time in [(2, 1), (3, 9)]:
        args = [_randn(batch, time, 3), _randn(4, 3, k), _randn(4), _randn(batch, 2), _randn(4, 2, k),
                _randn(batch, time, 4)]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        x, w, b, c, cw, r = ref_args
        want = conv_ref(x, w, b, dilation=dilation, context=c, context_weight=cw, activation="relu", residual=r)
        _check_outputs_and_grads(got, want, args, ref_args, msg=f"k={k} d={dilation} {batch}x{time}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_conv_non_contiguous_everything_grouped(backend):
    """x, weight, bias, residual all strided views (groups=2, gelu): compiled equals F.conv1d, gradients included,
    with contiguous calls in between (the strides change between calls of one compiled function)."""
    def fn(x, w, b, r):
        return ops.causal_conv1d(x, w, b, dilation=2, groups=2, activation="gelu", residual=r, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    plan = [(2, 5, True), (3, 1, False), (1, 3, True), (4, 8, True), (2, 6, False)]
    for batch, time, strided in (plan if backend == "cpu" else plan[:2]):
        if strided:
            args = [torch.randn(batch, 4, time, dtype=F64).transpose(1, 2), torch.randn(3, 2, 6, dtype=F64).permute(2, 1, 0),
                    torch.randn(12, dtype=F64)[::2], torch.randn(batch, time, 12, dtype=F64)[:, :, 3:9]]
        else:
            args = [torch.randn(batch, time, 4, dtype=F64), torch.randn(6, 2, 3, dtype=F64), torch.randn(6, dtype=F64),
                    torch.randn(batch, time, 6, dtype=F64)]
        args = [a.requires_grad_() for a in args]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        x, w, b, r = ref_args
        want = conv_ref(x, w, b, dilation=2, groups=2, activation="gelu", residual=r)
        _check_outputs_and_grads(got, want, args, ref_args, msg=f"{backend} {batch}x{time} strided={strided}")


def test_conv_requires_grad_and_dtype_change_between_calls():
    """A compiled function called without gradients, then with each input wanting one in turn, under no_grad, and in
    float32 and float64: every call's output and gradients equal eager's (the identity residual included)."""
    def fn(x, w, b, c, cw):
        return ops.causal_conv1d(x, w, b, dilation=2, context=c, context_weight=cw, activation="relu", residual=x,
                                 backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    plan = [((2, 5), (), F64, False), ((3, 4), (0, 1, 2, 3, 4), F64, False), ((2, 3), (1,), torch.float32, False),
            ((1, 1), (0, 3), F64, False), ((4, 2), (4,), torch.float32, False), ((2, 6), (0, 1), F64, True),
            ]
    for (batch, time), wanting, dtype, no_grad in plan:
        args = [torch.randn(batch, time, 4), torch.randn(4, 4, 3), torch.randn(4), torch.randn(batch, 2),
                torch.randn(4, 2, 3)]
        args = [a.to(dtype).requires_grad_(i in wanting) for i, a in enumerate(args)]
        eager_args = [_same_strides_copy(a) for a in args]
        context = torch.no_grad() if no_grad else contextlib.nullcontext()
        with context:
            got = compiled(*args)
            want = fn(*eager_args)
        assert got.dtype == dtype
        assert got.requires_grad == (bool(wanting) and not no_grad)
        tol = {} if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
        x, w, b, c, cw = [a.detach() for a in eager_args]
        torch.testing.assert_close(want, conv_ref(x, w, b, dilation=2, context=c, context_weight=cw,
                                                  activation="relu", residual=x), **tol)
        if got.requires_grad:
            _check_outputs_and_grads(got, want, args, eager_args, tol=tol, msg=f"{wanting} {dtype}")
        else:
            torch.testing.assert_close(got, want, **tol)


# ---- causal_conv1d_step -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,k,dilation", [("cpu", 1, 1), ("cpu", 3, 2), ("reference", 2, 5)])
def test_step_compiled_mutates_state_like_eager(backend, k, dilation):
    """A compiled step over a sequence, with the batch changing between sequences: the outputs are the sequence
    conv's (F.conv1d), and the state it leaves equals the eager step's."""
    def fn(x, w, state, b, c, cw, r):
        return ops.causal_conv1d_step(x, w, state, b, context=c, context_weight=cw, activation="relu", residual=r,
                                      backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        for batch, time in [(2, 5), (3, 2), (1, 4)]:
            x, w, b = torch.randn(batch, time, 3, dtype=F64), torch.randn(4, 3, k, dtype=F64), torch.randn(4, dtype=F64)
            c, cw, r = torch.randn(batch, 2, dtype=F64), torch.randn(4, 2, k, dtype=F64), torch.randn(batch, time, 4,
                                                                                                       dtype=F64)
            state = CausalConvState.zeros(batch, 3, k, dilation, dtype=F64)
            eager_state = CausalConvState.zeros(batch, 3, k, dilation, dtype=F64)
            got = torch.stack([compiled(x[:, t], w, state, b, c, cw, r[:, t]) for t in range(time)], 1)
            for t in range(time):
                fn(x[:, t], w, eager_state, b, c, cw, r[:, t])
            want = conv_ref(x, w, b, dilation=dilation, context=c, context_weight=cw, activation="relu", residual=r)
            torch.testing.assert_close(got, want, msg=f"{batch}x{time}")
            torch.testing.assert_close(state.position, torch.full((batch,), time, dtype=torch.int64))
            torch.testing.assert_close(state.position, eager_state.position)
            torch.testing.assert_close(state.history, eager_state.history)


# ---- GRU ops ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gru_cell_dynamic_shapes_and_strides(backend):
    hidden = 5
    compiled = torch.compile(lambda *a: ops.gru_cell(*a, backend=backend), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    for batch, strided, bias in [(2, False, True), (1, True, True), (7, True, False), (3, False, False),
                                 (4, False, True)]:
        if strided:
            x, h = torch.randn(3, batch, dtype=F64).t(), torch.randn(batch, 2 * hidden, dtype=F64)[:, ::2]
            ws = [torch.randn(3, 3 * hidden, dtype=F64).t(), torch.randn(hidden, 3 * hidden, dtype=F64).t()]
            if bias:
                ws += [torch.randn(6 * hidden, dtype=F64)[::2], torch.randn(6 * hidden, dtype=F64)[1::2]]
        else:
            x, h = torch.randn(batch, 3, dtype=F64), torch.randn(batch, hidden, dtype=F64)
            ws = [torch.randn(3 * hidden, 3, dtype=F64), torch.randn(3 * hidden, hidden, dtype=F64)]
            if bias:
                ws += [torch.randn(3 * hidden, dtype=F64), torch.randn(3 * hidden, dtype=F64)]
        args = [t.requires_grad_() for t in (x, h, *ws)]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        _check_outputs_and_grads(got, cell_ref(*ref_args), args, ref_args, msg=f"{batch} {strided} {bias}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gru_dynamic_shapes_two_layers(backend):
    hidden = 4

    def fn(x, h0, *w):
        return ops.gru(x, h0, [w[:4], w[4:]], num_layers=2, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    sizes = [(2, 5), (3, 1), (1, 3), (4, 5)] if backend == "cpu" else [(2, 3), (3, 1)]
    for batch, time in sizes:
        x = torch.randn(batch, 3, time, dtype=F64).transpose(1, 2).requires_grad_()
        ws = [_randn(3 * hidden, 3), _randn(3 * hidden, hidden), _randn(3 * hidden), _randn(3 * hidden),
              _randn(3 * hidden, hidden), _randn(3 * hidden, hidden), _randn(3 * hidden), _randn(3 * hidden)]
        args = [x, _randn(2, batch, hidden), *ws]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        want = gru_ref(ref_args[0], ref_args[1], [ref_args[2:6], ref_args[6:]])
        _check_outputs_and_grads(got, want, args, ref_args, msg=f"{batch}x{time}")


def test_gru_without_bias_and_h0_compiled():
    hidden = 3

    def fn(x, w_ih, w_hh):
        return ops.gru(x, None, [(w_ih, w_hh)], num_layers=1, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, time in [(2, 4), (5, 1), (1, 6)]:
        args = [_randn(batch, time, 2), _randn(3 * hidden, 2), _randn(3 * hidden, hidden)]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        want = gru_ref(ref_args[0], torch.zeros(1, batch, hidden, dtype=F64), [ref_args[1:]])
        _check_outputs_and_grads(got, want, args, ref_args, msg=f"{batch}x{time}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_session_update_dynamic_shapes(backend):
    hidden, dim, projected = 4, 3, 5

    def fn(items, lengths, h, keep, pw, pb, *w):
        return ops.session_update(items, lengths, h, keep, [w[:4], w[4:]], proj_weight=pw, proj_bias=pb,
                                  backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    plan = [(3, 4, False), (1, 1, True), (5, 2, True), (4, 3, False)]
    for batch, time, odd in (plan if backend == "cpu" else plan[1:3]):
        lengths = torch.randint(0, time + 1, (batch,))
        lengths[0] = 0
        keep = torch.rand(batch, dtype=F64).requires_grad_()
        items = _randn(batch, time, dim)
        if odd:  # int32 strided lengths, transposed item embeddings, a bool keep
            lengths = torch.stack([lengths, lengths]).t().to(torch.int32)[:, 0]
            items = torch.randn(time, batch, dim, dtype=F64).transpose(0, 1).requires_grad_()
            keep = torch.rand(batch) > 0.3
        ws = [_randn(3 * hidden, projected), _randn(3 * hidden, hidden), _randn(3 * hidden), _randn(3 * hidden),
              _randn(3 * hidden, hidden), _randn(3 * hidden, hidden), _randn(3 * hidden), _randn(3 * hidden)]
        args = [items, lengths, _randn(2, batch, hidden), keep, _randn(projected, dim), _randn(projected), *ws]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        i, l, h, k, pw, pb = ref_args[:6]
        want = session_ref(i, l, h, k, [ref_args[6:10], ref_args[10:]], pw, pb)
        _check_outputs_and_grads(got, want, args, ref_args, msg=f"{batch}x{time} odd={odd}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_session_update_steps_dynamic_shapes(backend):
    hidden, dim = 4, 3

    def fn(items, lengths, h, keep, *w):
        return ops.session_update_steps(items, lengths, h, keep, [w], backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    sizes = [(2, 3, 4), (1, 1, 1), (3, 2, 5), (0, 2, 2)] if backend == "cpu" else [(2, 3, 4), (1, 1, 1)]
    for steps, batch, time in sizes:
        items = _randn(steps, batch, time, dim)
        lengths = torch.randint(0, time + 1, (batch, steps), dtype=torch.int16).t()  # strided, narrow
        keep = (torch.rand(steps, batch) > 0.3).to(F64).requires_grad_()
        ws = [_randn(3 * hidden, dim), torch.randn(hidden, 3 * hidden, dtype=F64).t().requires_grad_(),
              _randn(3 * hidden), _randn(3 * hidden)]
        args = [items, lengths, _randn(1, batch, hidden), keep, *ws]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        i, l, h, k = ref_args[:4]
        states = [h]
        for s in range(steps):
            states.append(session_ref(i[s], l[s], states[-1], k[s], [ref_args[4:]]))
        want = torch.stack(states)
        _check_outputs_and_grads(got, want, args, ref_args, msg=f"{steps}x{batch}x{time}")


def test_inductor_cpu_ops_in_one_graph():
    """inductor (which allocates the out ops' buffers from the fake kernels' layout) on the cpu backend, float32: the
    conv (x transposed or sliced and its own residual, with context, time 1 and shorter than the reach), gru, gru_cell,
    session_update and session_update_steps in one graph, forward and backward."""
    hidden = 4

    def fn(x, h0, items, lengths, keep, conv_w, conv_b, context, context_w, *w):
        conv = ops.causal_conv1d(x, conv_w, conv_b, dilation=3, context=context, context_weight=context_w,
                                 activation="relu", residual=x, backend="cpu")
        out, h_n = ops.gru(x, h0, [w], num_layers=1, backend="cpu")
        cell = ops.gru_cell(x[:, 0], h0[0], *w, backend="cpu")
        su = ops.session_update(items, lengths, h0, keep, [w], backend="cpu")
        steps = ops.session_update_steps(torch.stack([items, items.flip(1)]), torch.stack([lengths, lengths]), h0,
                                         torch.stack([keep, keep]), [w], backend="cpu")
        return conv, out, h_n, cell, su, steps

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for batch, time, layout in [(3, 4, "sliced")]:  # (one compile: inductor is slow here; time < the reach 6)
        x = torch.randn(batch, 3, time).transpose(1, 2) if layout == "transposed" else torch.randn(batch, time, 9)[
            :, :, 2:5]
        args = [x.requires_grad_(), torch.randn(1, batch, hidden, requires_grad=True),
                torch.randn(batch, time, 3, requires_grad=True), torch.randint(0, time + 1, (batch,)),
                torch.rand(batch, requires_grad=True), torch.randn(3, 3, 3, requires_grad=True),
                torch.randn(3, requires_grad=True), torch.randn(batch, 2, requires_grad=True),
                torch.randn(3, 2, 3, requires_grad=True), torch.randn(3 * hidden, 3, requires_grad=True),
                torch.randn(3 * hidden, hidden, requires_grad=True), torch.randn(3 * hidden, requires_grad=True),
                torch.randn(3 * hidden, requires_grad=True)]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        x, h0, items, lengths, keep, cw, cb, c, ccw, *w = [a.double() if a.is_floating_point() else a
                                                          for a in ref_args]
        out, h_n = gru_ref(x, h0, [w])
        states = [h0]
        for it in (items, items.flip(1)):
            states.append(session_ref(it, lengths, states[-1], keep, [w]))
        want64 = (conv_ref(x, cw, cb, dilation=3, context=c, context_weight=ccw, activation="relu", residual=x),
                  out, h_n, cell_ref(x[:, 0], h0[0], *w), session_ref(items, lengths, h0, keep, [w]),
                  torch.stack(states))
        for i, (a, b) in enumerate(zip(got, want64)):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=f"{layout} {time} output {i}")
        _check_outputs_and_grads(got, fn(*ref_args), args, ref_args, tol=dict(rtol=1e-4, atol=1e-5),
                                 msg=f"{layout} {time}")


# ---- linear_cross_entropy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "reference"])
def test_loss_dynamic_shapes_and_target_check(backend):
    compiled = torch.compile(lambda f, w, b, t: ops.linear_cross_entropy(f, w, b, t, backend=backend),
                             fullgraph=True, dynamic=True, backend="aot_eager")
    for events, classes, bias in [(5, 7, True), (1, 7, True), (9, 3, False), (2, 1, True), (0, 4, False),
                                  (6, 5, True)]:
        features = torch.randn(3, events, dtype=F64).t().requires_grad_()  # transposed
        weight = torch.randn(3, classes, dtype=F64).t().requires_grad_()
        b = _randn(classes) if bias else None
        targets = torch.randint(0, classes, (2 * events,))[::2]
        args = [features, weight, b, targets]
        ref_args = [_same_strides_copy(a) for a in args]
        got = compiled(*args)
        want = F.cross_entropy(F.linear(*ref_args[:3]), ref_args[3], reduction="sum")
        _check_outputs_and_grads(got, want, args, ref_args, msg=f"{events}x{classes}")
    with pytest.raises(Exception, match=r"targets must lie in \[0, 5\)"):
        compiled(torch.randn(3, 2, dtype=F64), torch.randn(5, 2, dtype=F64), None, torch.tensor([0, 5, 1]))
    with pytest.raises(Exception, match=r"targets must lie in \[0, 5\)"):
        compiled(torch.randn(3, 2, dtype=F64), torch.randn(5, 2, dtype=F64), None, torch.tensor([0, -100, 1]))


# ---- nn modules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_tcn_forward_dynamic_and_step(backend):
    torch.manual_seed(0)
    tcn = TCN(3, [4, 4, 5], kernel_size=3, context_channels=2, backend=backend).double()
    compiled = torch.compile(tcn, fullgraph=True, dynamic=True, backend="aot_eager")
    sizes = [(2, 5), (3, 1), (2, 19)] if backend == "cpu" else [(2, 3)]
    for batch, time in sizes:
        x, c = _randn(batch, time, 3), _randn(batch, 2)
        got = compiled(x, c)
        x2, c2 = _same_strides_copy(x), _same_strides_copy(c)
        want = tcn(x2, c2)
        # the independent value: each block by F.conv1d
        h = x2.detach()
        for i, block in enumerate(tcn.blocks):
            conv = block.conv
            ctx = dict(context=c2.detach(), context_weight=conv.context_weight.detach()) if i == 0 else {}
            residual = h if block.projection is None else block.projection(h)
            if block.context_projection is not None:
                residual = residual + block.context_projection(c2.detach())[:, None]
            h = conv_ref(h, conv.weight.detach(), conv.bias.detach(), dilation=conv.dilation, activation="relu",
                         residual=residual.detach(), **ctx)
        torch.testing.assert_close(want.detach(), h)
        params = list(tcn.parameters())
        _check_outputs_and_grads(got, want, [x, c, *params], [x2, c2, *params], msg=f"{batch}x{time}")
    if backend != "cpu":
        return  # (the reference step is compiled in test_step_compiled_mutates_state_like_eager)
    step = torch.compile(lambda x_t, s, c: tcn.step(x_t, s, c), fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        for batch, time in [(2, 4), (3, 2)]:
            x, c = torch.randn(batch, time, 3, dtype=F64), torch.randn(batch, 2, dtype=F64)
            state = tcn.init_state(batch)
            got = torch.stack([step(x[:, t], state, c) for t in range(time)], 1)
            torch.testing.assert_close(got, tcn(x, c))


def test_causal_conv1d_and_temporal_block_modules_compiled():
    torch.manual_seed(1)
    conv = CausalConv1d(4, 6, 1, dilation=5, groups=2, activation="tanh", backend="cpu").double()
    block = TemporalBlock(3, 5, 4, dilation=3, context_channels=2, backend="cpu").double()
    torch_conv = torch.nn.Conv1d(4, 6, 1, groups=2).double()
    torch_conv.load_state_dict(conv.state_dict())
    compiled_conv = torch.compile(conv, fullgraph=True, dynamic=True, backend="aot_eager")
    compiled_block = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, time in [(2, 5), (1, 1), (3, 2), (2, 12)]:
        x = torch.randn(batch, 4, time, dtype=F64).transpose(1, 2).requires_grad_()
        x2 = _same_strides_copy(x)
        got = compiled_conv(x)
        want = torch.tanh(torch_conv(x2.transpose(1, 2)).transpose(1, 2))
        _check_outputs_and_grads(got, want, [x, *conv.parameters()], [x2, *torch_conv.parameters()],
                                 msg=f"conv {batch}x{time}")
        xb, cb = _randn(batch, time, 3), _randn(batch, 2)
        xb2, cb2 = _same_strides_copy(xb), _same_strides_copy(cb)
        got = compiled_block(xb, cb)
        want = block(xb2, cb2)
        params = list(block.parameters())
        _check_outputs_and_grads(got, want, [xb, cb, *params], [xb2, cb2, *params], msg=f"block {batch}x{time}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gru_modules_compiled_match_torch_nn(backend):
    torch.manual_seed(2)
    with torch._dynamo.config.patch(allow_rnn=True):
        for batch_first in ((True,) if backend == "cpu" else (False,)):
            gru = GRU(3, 4, num_layers=2, batch_first=batch_first, backend=backend).double()
            torch_gru = torch.nn.GRU(3, 4, num_layers=2, batch_first=batch_first).double()
            torch_gru.load_state_dict(gru.state_dict())
            torch._dynamo.reset()
            compiled = torch.compile(gru, fullgraph=True, dynamic=True, backend="aot_eager")
            cases = [((2, 4, 3), True), ((3, 1, 3), False), ((4, 3), True)]
            if backend == "cpu":
                cases.append(((1, 2, 3), True))
            for shape, with_hx in cases:
                x = _randn(*shape)
                batched = len(shape) == 3
                batch = (shape[0] if batch_first else shape[1]) if batched else None
                hx = (_randn(2, batch, 4) if batched else _randn(2, 4)) if with_hx else None
                got = compiled(x, hx)
                x2, hx2 = _same_strides_copy(x), _same_strides_copy(hx)
                want = torch_gru(x2, hx2)
                extra, extra2 = ([hx], [hx2]) if with_hx else ([], [])
                _check_outputs_and_grads(got, want, [x, *gru.parameters(), *extra],
                                         [x2, *torch_gru.parameters(), *extra2],
                                         msg=f"{backend} batch_first={batch_first} {shape} hx={with_hx}")
        cell = GRUCell(3, 4, backend=backend).double()
        torch_cell = torch.nn.GRUCell(3, 4).double()
        torch_cell.load_state_dict(cell.state_dict())
        torch._dynamo.reset()
        compiled = torch.compile(cell, fullgraph=True, dynamic=True, backend="aot_eager")
        for shape, with_hx in [((2, 3), True), ((3,), True), ((5, 3), False), ((3,), False), ((1, 3), True)]:
            x = _randn(*shape)
            hx = _randn(*shape[:-1], 4) if with_hx else None
            got = compiled(x, hx)
            x2, hx2 = _same_strides_copy(x), _same_strides_copy(hx)
            want = torch_cell(x2, hx2)
            extra, extra2 = ([hx], [hx2]) if with_hx else ([], [])
            _check_outputs_and_grads(got, want, [x, *cell.parameters(), *extra], [x2, *torch_cell.parameters(), *extra2],
                                     msg=f"cell {shape} hx={with_hx}")


# ---- opcheck on edge-case arguments -----------------------------------------------------------------------------

OPS = torch.ops.hiertcn_fast


def _r(*shape):
    return torch.randn(*shape, dtype=F64)


@pytest.mark.parametrize("batch,time,k,dilation,context,activation,residual,layout,groups", [
    (2, 1, 3, 2, True, 3, True, "plain", 1),
    (1, 5, 1, 1, True, 2, False, "plain", 1),
    (3, 4, 3, 2 ** 40, True, 3, True, "plain", 1),
    (2, 7, 2, 3, False, 0, True, "sliced", 1),
    (2, 6, 3, 1, False, 2, False, "plain", 2),
    (0, 3, 3, 1, False, 3, True, "plain", 1),
    (2, 3, 4, 1, True, 1, True, "sliced", 1),
])
def test_opcheck_causal_conv1d_out_ops(batch, time, k, dilation, context, activation, residual, layout, groups):
    cin, cout = 4, 6
    x = _r(batch, time, cin + 3)[:, :, 1:cin + 1] if layout == "sliced" else _r(batch, time, cin)
    weight, bias = _r(cout, cin // groups, k), _r(cout)
    table = context_table(_r(batch, 2), _r(cout, 2, k)).contiguous() if context else None
    res = _r(batch, time, cout) if residual else None
    pre_dtype = torch.uint8 if activation == 1 else F64
    out = torch.empty(batch, time, cout, dtype=F64)
    pre = torch.empty(batch, time, cout, dtype=pre_dtype) if activation else None
    torch.library.opcheck(OPS.causal_conv1d_out.default, (x, weight, bias, table, res, dilation, groups, activation),
                          {"out": out, "pre": pre})
    if activation:
        pre = torch.empty(batch, time, cout, dtype=pre_dtype)
        OPS.causal_conv1d_out(x, weight, bias, table, res, dilation, groups, activation, out=torch.empty_like(out),
                              pre=pre)
        kept = None if activation == 1 else res
        grads = dict(grad_pre=torch.empty(batch, time, cout, dtype=F64), grad_x=torch.empty(batch, time, cin, dtype=F64),
                     grad_weight=torch.empty_like(weight),
                     grad_residual=torch.empty(batch, time, cout, dtype=F64) if residual else None)
        torch.library.opcheck(OPS.causal_conv1d_backward_out.default,
                              (_r(batch, time, cout), x, weight, pre, kept, dilation, groups, activation), grads)


@pytest.mark.parametrize("batch,k,dilation,context", [(2, 1, 1, True), (3, 3, 2, True), (1, 2, 5, False),
                                                     (2, 4, 1, False)])
def test_opcheck_causal_conv1d_step_out(batch, k, dilation, context):
    cin, cout = 4, 5
    state = CausalConvState.zeros(batch, cin, k, dilation, dtype=F64)
    state.position.copy_(torch.randint(0, 9, (batch,)))
    if state.history.numel():
        state.history.normal_()
    weight = _r(cout, cin, k)
    table = context_table(_r(batch, 2), _r(cout, 2, k)).contiguous() if context else None
    torch.library.opcheck(OPS.causal_conv1d_step_out.default,
                          (_r(batch, cin), pack_weight(weight, 1), _r(cout), table, _r(batch, cout), dilation, 1, 3),
                          dict(history=state.history, position=state.position, out=torch.empty(batch, cout, dtype=F64)))


def test_opcheck_gru_cell_edge_arguments():
    hidden = 4
    cases = [
        (_r(3, 2).t(), _r(2, 2 * hidden)[:, ::2], _r(3 * hidden, 3), _r(3 * hidden, hidden), _r(3 * hidden),
         _r(3 * hidden)),  # strided x and h
        (_r(2, 3), _r(hidden, 2).t(), _r(3 * hidden, 3), _r(3 * hidden, hidden), None, None),  # transposed h, no bias
        (_r(0, 3), _r(0, hidden), _r(3 * hidden, 3), _r(3 * hidden, hidden), _r(3 * hidden), _r(3 * hidden)),  # batch 0
        (_r(1, 3), _r(1, hidden), _r(3, 3 * hidden).t(), _r(hidden, 3 * hidden).t(), _r(6 * hidden)[::2],
         _r(3 * hidden)),  # strided weights
    ]
    for args in cases:
        torch.library.opcheck(OPS.gru_cell.default, args)
    grad_args = [t.clone().requires_grad_() for t in cases[0]]
    torch.library.opcheck(OPS.gru_cell.default, grad_args)


@pytest.mark.parametrize("batch,time,strided_h,grads,proj", [(3, 4, False, False, True), (3, 4, True, False, False),
                                                             (2, 5, True, True, True), (1, 1, False, True, False)])
def test_opcheck_session_update_edge_arguments(batch, time, strided_h, grads, proj):
    hidden, dim, projected = 4, 3, 5
    items = _r(batch, time, dim)
    lengths = torch.randint(0, time + 1, (batch,))
    keep = torch.rand(batch, dtype=F64)
    h = _r(2, batch, 2 * hidden)[:, :, ::2] if strided_h else _r(2, batch, hidden)
    width = projected if proj else dim
    weights = [_r(3 * hidden, width), _r(3 * hidden, hidden), _r(3 * hidden), _r(3 * hidden),
               _r(3 * hidden, hidden), _r(3 * hidden, hidden), _r(3 * hidden), _r(3 * hidden)]
    pw, pb = (_r(projected, dim), _r(projected)) if proj else (None, None)
    if grads:
        for t in (items, h, keep, *weights, *([pw, pb] if proj else [])):
            t.requires_grad_()
    torch.library.opcheck(OPS.session_update.default, (items, lengths, h, keep, weights, pw, pb))


def test_opcheck_softmax_xent_out_edge_arguments():
    for events, classes, bias in [(3, 5, True), (1, 1, False), (4, 2, False), (0, 3, True)]:
        logits = _r(events, classes)
        targets = torch.randint(0, classes, (events,))
        torch.library.opcheck(OPS.softmax_xent_out.default, (logits, targets, _r(classes) if bias else None),
                              {"loss": torch.empty(events, dtype=F64)})
