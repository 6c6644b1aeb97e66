"""Differential fuzzing of the causal convolution ops (causal_conv1d, causal_conv1d_step, tcn_step) on the cpu and
reference backends against an independent peer built here from torch.nn.functional.conv1d on a left-padded input
with the context explicitly concatenated to every step."""

import random

import pytest
import torch
import torch.nn.functional as F

from helpers import EMULATING_CUDA, conv_blas
from hiertcn_fast.ops.conv import (CausalConvState, causal_conv1d, causal_conv1d_step, forget_weight_caches,
                                   tcn_step)

BACKENDS = ("cpu", "reference")


def _cuda_kernels(backend):
    """The cpu backend runs csrc/cuda's kernels in the emulator: a negative position is not refused there (refusing
    would take a device sync per step), and there is no prepared (CPU) plan."""
    return backend == "cpu" and EMULATING_CUDA
ACTS = (None, "relu", "gelu", "tanh")
CHANNELS = (1, 7, 8, 15, 16, 17, 31, 32, 33, 64, 65)


# ---- the independent peer ------------------------------------------------------------------------------------------

def _act(v, activation):
    return {None: lambda u: u, "relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation](v)


def peer(x, weight, bias=None, *, dilation=1, groups=1, context=None, context_weight=None, activation=None,
         residual=None):
    """F.conv1d on [x, context at every step] (explicitly concatenated along channels) left-padded with
    (k - 1) * dilation zeros. For groups > 1 the context is a dense term, so it is convolved on its own."""
    batch, time, _ = x.shape
    k = weight.shape[2]
    pad = (k - 1) * dilation
    if context is not None and groups == 1:
        tiled = context[:, None, :].expand(batch, time, context.shape[1])
        inp = torch.cat([x, tiled], 2)
        w = torch.cat([weight, context_weight], 1)
        z = F.conv1d(F.pad(inp.transpose(1, 2), (pad, 0)), w, bias, dilation=dilation)
    else:
        z = F.conv1d(F.pad(x.transpose(1, 2), (pad, 0)), weight, bias, dilation=dilation, groups=groups)
        if context is not None:
            tiled = context[:, None, :].expand(batch, time, context.shape[1])
            z = z + F.conv1d(F.pad(tiled.transpose(1, 2), (pad, 0)), context_weight, None, dilation=dilation)
    z = z.transpose(1, 2)
    out = _act(z, activation)
    return out if residual is None else _act(out + residual, activation)


# ---- random problems -----------------------------------------------------------------------------------------------

def _strided_leaf(t, kind):
    """A leaf (requiring grad) and a view of it holding t's values with other strides: 'slice' (a slice of a wider
    tensor), 'transpose' (stored with the last two axes swapped), 'stride2' (every other element of the last axis),
    'step0' (the first axis sliced with a step), 'time_major' (stored (time, batch, channels)), or 'plain'. Also the
    function mapping the leaf's gradient to the view's."""
    if kind == "slice":
        wide = torch.randn(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        wide[..., 2:2 + t.shape[-1]] = t
        wide.requires_grad_()
        view = lambda w: w[..., 2:2 + t.shape[-1]]
        return wide, view(wide), view
    if kind == "transpose" and t.dim() >= 2:
        store = t.transpose(-1, -2).contiguous().requires_grad_()
        view = lambda w: w.transpose(-1, -2)
        return store, view(store), view
    if kind == "stride2":
        wide = torch.randn(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        wide[..., ::2] = t
        wide.requires_grad_()
        view = lambda w: w[..., ::2]
        return wide, view(wide), view
    if kind == "step0" and t.dim() >= 2:
        wide = torch.randn(t.shape[0] * 3, *t.shape[1:], dtype=t.dtype)
        wide[1::3] = t
        wide.requires_grad_()
        view = lambda w: w[1::3]
        return wide, view(wide), view
    if kind == "time_major" and t.dim() == 3:  # stored (time, batch, channels)
        store = t.transpose(0, 1).contiguous().requires_grad_()
        view = lambda w: w.transpose(0, 1)
        return store, view(store), view
    leaf = t.clone().requires_grad_()
    return leaf, leaf, lambda w: w


def _random_case(rng, dtype=torch.float64):
    batch = rng.choice([1, 1, 2, 3, 5])
    time = rng.choice([1, 2, 3, 5, 7, 11, 13, 17, 31, 37])
    k = rng.choice([1, 2, 3, 4, 5, 7, 9, 16])
    dilation = rng.choice([1, 1, 2, 3, 7, 64, 1024])
    groups_kind = rng.choice(["dense", "dense", "depthwise", "grouped"])
    if groups_kind == "depthwise":
        cin = rng.choice(CHANNELS)
        cout = cin * rng.choice([1, 1, 2])
        groups = cin
    elif groups_kind == "grouped":
        groups = rng.choice([2, 3, 4])
        cin = groups * rng.choice([1, 2, 3, 5])
        cout = groups * rng.choice([1, 2, 4])
    else:
        groups = 1
        cin, cout = rng.choice(CHANNELS), rng.choice(CHANNELS)
    ctx = rng.choice([0, 0, 1, 3, 8, 17])
    activation = rng.choice(ACTS)
    residual = rng.choice([False, True, True])
    bias = rng.choice([False, True, True])
    return dict(batch=batch, time=time, k=k, dilation=dilation, groups=groups, cin=cin, cout=cout, ctx=ctx,
                activation=activation, residual=residual, bias=bias, dtype=dtype)


def _make_inputs(case, rng):
    dt = case["dtype"]
    b, t, cin, cout, k, g = case["batch"], case["time"], case["cin"], case["cout"], case["k"], case["groups"]
    args = dict(x=torch.randn(b, t, cin, dtype=dt),
                weight=torch.randn(cout, cin // g, k, dtype=dt) * (cin // g * k) ** -0.5)
    if case["bias"]:
        args["bias"] = torch.randn(cout, dtype=dt)
    if case["ctx"]:
        args["context"] = torch.randn(b, case["ctx"], dtype=dt)
        args["context_weight"] = torch.randn(cout, case["ctx"], k, dtype=dt) * (case["ctx"] * k) ** -0.5
    if case["residual"]:
        args["residual"] = torch.randn(b, t, cout, dtype=dt)
    return args


def _leaves(args, rng, strided):
    """Leaves requiring grad, the call's arguments (views of them, strided when asked), and the maps from a leaf's
    gradient to its argument's."""
    leaves, call, views = {}, {}, {}
    for name, value in args.items():
        kind = rng.choice(["plain", "slice", "transpose", "stride2", "step0", "time_major"]) if strided else "plain"
        leaves[name], call[name], views[name] = _strided_leaf(value.detach(), kind)
    return leaves, call, views


def _run(fn, args, leaves_args, case, grad_out):
    kwargs = dict(dilation=case["dilation"], groups=case["groups"], activation=case["activation"])
    for name in ("bias", "context", "context_weight", "residual"):
        if name in leaves_args:
            kwargs[name] = leaves_args[name]
    out = fn(leaves_args["x"], leaves_args["weight"], **kwargs)
    out.backward(grad_out)
    return out


def _grad_out(shape, dtype, kind):
    """The output's gradient as backward may receive it: contiguous, expanded over time (as from out.sum(1)) or
    batch, a slice of a wider tensor, or stored transposed."""
    b, t, c = shape
    if kind == "time0":
        return torch.randn(b, 1, c, dtype=dtype).expand(b, t, c)
    if kind == "batch0":
        return torch.randn(1, t, c, dtype=dtype).expand(b, t, c)
    if kind == "slice":
        return torch.randn(b, t, c + 2, dtype=dtype)[..., 1:1 + c]
    if kind == "transpose":
        return torch.randn(b, c, t, dtype=dtype).transpose(1, 2)
    return torch.randn(shape, dtype=dtype)


def _tolerance(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


def _check_case(case, rng, backend, strided):
    args = _make_inputs(case, rng)
    out_shape = (case["batch"], case["time"], case["cout"])
    grad_kind = rng.choice(["plain", "plain", "time0", "batch0", "slice", "transpose"]) if strided else "plain"
    grad_out = _grad_out(out_shape, case["dtype"], grad_kind)
    p_leaves, p_call, _ = _leaves({n: v.double() for n, v in args.items()}, rng, False)
    expected = _run(peer, args, p_call, case, grad_out.double())
    leaves, call, views = _leaves(args, rng, strided)
    got = _run(lambda *a, **kw: causal_conv1d(*a, backend=backend, **kw), args, call, case, grad_out)
    tol = _tolerance(case["dtype"])
    assert got.shape == out_shape and got.dtype == case["dtype"]
    torch.testing.assert_close(got.double(), expected.detach(), **tol, msg=lambda m: f"out {case}: {m}")
    for name, leaf in leaves.items():
        assert leaf.grad is not None, f"no gradient for {name} {case}"
        torch.testing.assert_close(views[name](leaf.grad).double(), p_leaves[name].grad, **tol,
                                   msg=lambda m, name=name: f"grad {name} {case} grad_out {grad_kind}: {m}")
        torch.testing.assert_close(leaf.grad.abs().sum(), views[name](leaf.grad).abs().sum(),
                                   msg=f"gradient outside the view of {name}")


# ---- forward and backward against the peer -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_random_cases_float64_match_the_conv1d_peer(backend, seed):
    rng = random.Random(1000 + seed)
    torch.manual_seed(1000 + seed)
    for _ in range(12):
        _check_case(_random_case(rng), rng, backend, strided=rng.random() < 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_random_cases_float32_match_the_conv1d_peer(backend, seed):
    rng = random.Random(2000 + seed)
    torch.manual_seed(2000 + seed)
    for _ in range(10):
        _check_case(_random_case(rng, torch.float32), rng, backend, strided=rng.random() < 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", CHANNELS)
def test_channel_thresholds_dense_and_depthwise(backend, channels):
    rng = random.Random(channels)
    torch.manual_seed(channels)
    for dtype in (torch.float64, torch.float32):
        for groups in (1, channels):
            for activation in ACTS:
                case = dict(batch=2, time=13, k=3, dilation=2, groups=groups, cin=channels, cout=channels,
                            ctx=rng.choice([0, 5]), activation=activation, residual=rng.random() < 0.6, bias=True,
                            dtype=dtype)
                _check_case(case, rng, backend, strided=rng.random() < 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("route", ["always", "never"])
def test_blas_route_shapes(backend, dtype, route):
    """Dense layers of >= 32 channels with >= 2**19 multiply-adds go through BLAS on the cpu backend, unless the
    route is "never" (or "auto" on a CPU where the micro-kernels are faster): both routes, whatever this CPU is."""
    with conv_blas(route):
        _blas_route_shapes(backend, dtype)


def _blas_route_shapes(backend, dtype):
    rng = random.Random(7)
    torch.manual_seed(7)
    for cin, cout, time, k, dilation in ((32, 32, 128, 4, 1), (33, 64, 97, 3, 5), (65, 32, 61, 5, 16),
                                         (64, 65, 40, 9, 3), (32, 33, 200, 3, 1024)):
        for activation in ACTS:
            case = dict(batch=3, time=time, k=k, dilation=dilation, groups=1, cin=cin, cout=cout,
                        ctx=rng.choice([0, 4]), activation=activation, residual=rng.random() < 0.6, bias=True,
                        dtype=dtype)
            _check_case(case, rng, backend, strided=rng.random() < 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    rng = random.Random(3)
    torch.manual_seed(3)
    shapes = [  # batch, time, cin, cout, k, dilation, groups
        (1, 1, 1, 1, 1, 1, 1), (1, 1, 3, 5, 16, 1024, 1), (2, 1, 4, 4, 1, 1024, 4), (1, 2, 7, 7, 2, 1, 7),
        (3, 5, 6, 6, 16, 1, 3), (2, 17, 8, 16, 16, 1, 8), (1, 31, 1, 3, 3, 30, 1), (2, 31, 2, 2, 3, 15, 2),
        (2, 16, 9, 9, 5, 4, 9), (4, 8, 16, 16, 9, 1, 1), (1, 9, 3, 3, 9, 1, 1), (1, 1024, 2, 3, 2, 1023, 1),
        (2, 37, 12, 6, 4, 1, 6), (2, 7, 17, 34, 2, 3, 17),
    ]
    for b, t, cin, cout, k, d, g in shapes:
        for activation in ACTS:
            for residual in (False, True):
                for ctx in (0, 3):
                    case = dict(batch=b, time=t, k=k, dilation=d, groups=g, cin=cin, cout=cout, ctx=ctx,
                                activation=activation, residual=residual, bias=rng.random() < 0.7,
                                dtype=torch.float64)
                    _check_case(case, rng, backend, strided=rng.random() < 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_identity_residual_is_x_itself(backend, seed):
    """residual=x (the TCN block's identity residual, passed as the same tensor): its gradient joins x's."""
    rng = random.Random(3000 + seed)
    torch.manual_seed(3000 + seed)
    for _ in range(10):
        case = _random_case(rng)
        case["cout"] = case["cin"]
        if case["groups"] != 1 and case["cin"] % case["groups"]:
            case["groups"] = 1
        case["residual"] = False
        args = _make_inputs(case, rng)
        grad_out = torch.randn(case["batch"], case["time"], case["cout"], dtype=torch.float64)
        p_leaves, p_call, _ = _leaves(args, rng, False)
        kw = dict(dilation=case["dilation"], groups=case["groups"], activation=case["activation"])
        extra = {n: p_call[n] for n in ("bias", "context", "context_weight") if n in p_call}
        peer(p_call["x"], p_call["weight"], **kw, **extra, residual=p_call["x"]).backward(grad_out)
        leaves, call, views = _leaves(args, rng, rng.random() < 0.5)
        extra = {n: call[n] for n in ("bias", "context", "context_weight") if n in call}
        out = causal_conv1d(call["x"], call["weight"], **kw, **extra, residual=call["x"], backend=backend)
        expected = peer(args["x"], args["weight"], **kw, **{n: args[n] for n in extra}, residual=args["x"])
        torch.testing.assert_close(out.detach(), expected, rtol=1e-9, atol=1e-9)
        out.backward(grad_out)
        for name, leaf in leaves.items():
            torch.testing.assert_close(views[name](leaf.grad), p_leaves[name].grad, rtol=1e-9, atol=1e-9,
                                       msg=lambda m, name=name: f"grad {name} {case}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_expanded_inputs(backend, seed):
    """Inputs with stride 0 (expanded views): x over batch or time, the residual over time or batch, the context
    over batch, the weight over output channels, the bias from a scalar. Gradients flow back through the expand."""
    rng = random.Random(4000 + seed)
    torch.manual_seed(4000 + seed)
    cases = [_random_case(rng) for _ in range(8)]
    # and one through the cpu backend's BLAS route (dense, >= 32 channels, >= 2**19 multiply-adds)
    cases.append(dict(batch=3, time=96, k=3, dilation=1 + seed, groups=1, cin=33, cout=64, ctx=4,
                      activation=ACTS[seed % len(ACTS)], residual=True, bias=True, dtype=torch.float64))
    for case in cases:
        case["residual"], case["bias"] = True, True
        if not case["ctx"]:
            case["ctx"] = 3
        b, t, cin, cout, k, g = case["batch"], case["time"], case["cin"], case["cout"], case["k"], case["groups"]
        dt = torch.float64
        seeds = dict(
            x=torch.randn(1, t, cin, dtype=dt) if rng.random() < 0.5 else torch.randn(b, 1, cin, dtype=dt),
            residual=torch.randn(b, 1, cout, dtype=dt) if rng.random() < 0.5 else torch.randn(1, t, cout, dtype=dt),
            context=torch.randn(1, case["ctx"], dtype=dt),
            weight=torch.randn(1, cin // g, k, dtype=dt) * 0.5,
            bias=torch.randn((), dtype=dt),
            context_weight=torch.randn(cout, case["ctx"], k, dtype=dt) * 0.5)
        shapes = dict(x=(b, t, cin), residual=(b, t, cout), context=(b, case["ctx"]), weight=(cout, cin // g, k),
                      bias=(cout,), context_weight=(cout, case["ctx"], k))
        kw = dict(dilation=case["dilation"], groups=g, activation=case["activation"])
        grad_out = torch.randn(b, t, cout, dtype=dt)
        results = []
        for fn in (peer, lambda *a, **kwargs: causal_conv1d(*a, backend=backend, **kwargs)):
            leaves = {n: v.clone().requires_grad_() for n, v in seeds.items()}
            call = {n: leaves[n].expand(shapes[n]) for n in leaves}
            if fn is peer:  # the peer gets contiguous copies (their graph still reaches the leaves)
                call = {n: v.contiguous() for n, v in call.items()}
            out = fn(call.pop("x"), call.pop("weight"), **call, **kw)
            out.backward(grad_out)
            results.append((out.detach(), {n: v.grad for n, v in leaves.items()}))
        (expected, expected_grads), (got, grads) = results
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"out {case}: {m}")
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-9, atol=1e-9,
                                       msg=lambda m, name=name: f"grad {name} {case}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_bitwise_deterministic(backend):
    rng = random.Random(5)
    torch.manual_seed(5)
    cases = [_random_case(rng, rng.choice([torch.float32, torch.float64])) for _ in range(12)]
    cases.append(dict(batch=3, time=128, k=4, dilation=2, groups=1, cin=64, cout=64, ctx=5, activation="gelu",
                      residual=True, bias=True, dtype=torch.float32))
    cases.append(dict(batch=4, time=61, k=3, dilation=1, groups=16, cin=16, cout=32, ctx=5, activation="tanh",
                      residual=True, bias=True, dtype=torch.float32))
    for case in cases:
        args = _make_inputs(case, rng)
        grad_out = torch.randn(case["batch"], case["time"], case["cout"], dtype=case["dtype"])
        runs = []
        for _ in range(3):
            leaves, call, _ = _leaves(args, rng, False)
            out = _run(lambda *a, **kw: causal_conv1d(*a, backend=backend, **kw), args, call, case, grad_out)
            runs.append((out.detach(), {n: v.grad for n, v in leaves.items()}))
        for out, grads in runs[1:]:
            assert torch.equal(out, runs[0][0]), case
            for name in grads:
                assert torch.equal(grads[name], runs[0][1][name]), f"{name} differs between runs: {case}"


# ---- steps against the peer over each row's sequence since its last reset ----------------------------------------

def _row_peer_last(inputs, weight, bias, dilation, groups, context_row, context_weight, activation, residual_last):
    """The peer's output at the last step of one row's sequence (inputs: list of (in,) tensors)."""
    x = torch.stack(inputs)[None]
    res = None
    if residual_last is not None:
        res = torch.zeros(1, x.shape[1], residual_last.shape[0], dtype=x.dtype)
        res[0, -1] = residual_last
    out = peer(x, weight, bias, dilation=dilation, groups=groups,
               context=None if context_row is None else context_row[None], context_weight=context_weight,
               activation=activation, residual=res)
    return out[0, -1]


def _random_rows(rng, batch):
    """A random subset of rows as a bool mask or an index tensor (maybe empty, maybe with repeats, maybe negative
    indices), and the rows it names."""
    chosen = sorted(rng.sample(range(batch), rng.randint(0, batch)))
    form = rng.choice(["mask", "index", "index_neg", "index_dup"])
    if form == "mask":
        mask = torch.zeros(batch, dtype=torch.bool)
        mask[chosen] = True
        return mask, chosen
    index = list(chosen)
    if form == "index_neg":
        index = [i - batch for i in index]
    if form == "index_dup" and index:
        index = index + index[:1]
        rng.shuffle(index)
    return torch.tensor(index, dtype=torch.int64), chosen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_step_interleaved_with_resets_copies_and_weight_changes(backend, seed):
    rng = random.Random(6000 + seed)
    torch.manual_seed(6000 + seed)
    for _ in range(3):
        case = _random_case(rng)
        case["dilation"] = rng.choice([1, 2, 3, 5])
        case["k"] = rng.choice([1, 2, 3, 4, 5])
        dt = torch.float64
        b, cin, cout, k, g, d = case["batch"], case["cin"], case["cout"], case["k"], case["groups"], case["dilation"]
        weight = torch.randn(cout, cin // g, k, dtype=dt) * (cin // g * k) ** -0.5
        if rng.random() < 0.3:  # a strided weight
            weight = weight.transpose(0, 2).contiguous().transpose(0, 2)
        bias = torch.randn(cout, dtype=dt) if case["bias"] else None
        context = torch.randn(b, case["ctx"], dtype=dt) if case["ctx"] else None
        context_weight = torch.randn(cout, case["ctx"], k, dtype=dt) * 0.3 if case["ctx"] else None
        state = CausalConvState.zeros(b, cin, k, d, dtype=dt)
        sequences = [[] for _ in range(b)]
        log = []
        for step in range(rng.randint(5, 25)):
            event = rng.random()
            if event < 0.15:
                rows, chosen = _random_rows(rng, b)
                state.reset(rows)
                for r in chosen:
                    sequences[r] = []
                log.append(("reset", rows.tolist()))
            elif event < 0.22:
                copy = state.to(dtype=dt)
                log.append("copy")
                state = copy
            elif event < 0.3:
                with torch.no_grad():
                    weight.mul_(-1.5)  # in place: caches must notice; the peer reads the new weight
                log.append("weight in place")
            elif event < 0.34:
                weight.data.add_(0.25)  # through .data: only forget_weight_caches tells the caches
                forget_weight_caches()
                log.append("weight.data + forget")
            elif event < 0.4 and context is not None:
                with torch.no_grad():
                    context.mul_(2.0)  # a context changed in place: the cached table must follow
                log.append("context in place")
            elif event < 0.45 and context is not None:
                context = torch.randn(b, case["ctx"], dtype=dt)
                log.append("new context")
            x = torch.randn(b, cin, dtype=dt)
            if rng.random() < 0.3:
                x = torch.randn(b, cin * 2, dtype=dt)[:, ::2]
            residual = torch.randn(b, cout, dtype=dt) if case["residual"] else None
            out = causal_conv1d_step(x, weight, state, bias, groups=g, context=context, context_weight=context_weight,
                                     activation=case["activation"], residual=residual, backend=backend)
            for r in range(b):
                sequences[r].append(x[r].clone())
                want = _row_peer_last(sequences[r], weight, bias, d, g, None if context is None else context[r],
                                      context_weight, case["activation"],
                                      None if residual is None else residual[r])
                torch.testing.assert_close(out[r], want, rtol=1e-9, atol=1e-9,
                                           msg=lambda m, r=r: f"row {r} step {step} {case} after {log}: {m}")
            assert state.position.tolist() == [len(s) for s in sequences]


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_copy_is_independent(backend):
    torch.manual_seed(11)
    for dtype in (torch.float32, torch.float64):
        weight = torch.randn(5, 3, 3, dtype=dtype)
        state = CausalConvState.zeros(2, 3, 3, 2, dtype=dtype)
        for _ in range(4):
            causal_conv1d_step(torch.randn(2, 3, dtype=dtype), weight, state, backend=backend)
        before = (state.history.clone(), state.position.clone())
        copy = state.to(dtype=dtype)
        copy.reset(torch.tensor([True, False]))
        x = torch.randn(2, 3, dtype=dtype)
        causal_conv1d_step(x, weight, copy, backend=backend)
        assert torch.equal(state.history, before[0]) and torch.equal(state.position, before[1])
        other = state.to(dtype=torch.float64 if dtype == torch.float32 else torch.float32)
        assert other.history.dtype != dtype and other.position.dtype == torch.int64
        got = causal_conv1d_step(x.to(other.history.dtype), weight.to(other.history.dtype), other, backend=backend)
        want = causal_conv1d_step(x, weight, state, backend=backend)
        torch.testing.assert_close(got.to(dtype), want, rtol=1e-5, atol=1e-5)


# ---- tcn_step against the peer ------------------------------------------------------------------------------------

def _stack_peer_step(layer_inputs, x_row, weights, biases, dilations, proj_weights, proj_biases, context_row,
                     context_weight, context_proj_weight, activation):
    """One step of one row through the stack, by the peer: layer l's output is the peer over the inputs that layer
    received since the row's reset (layer_inputs[l], appended to here) with the current weights. (A deeper layer's
    past inputs are what the layers below gave at the time: a weight changed since then does not rewrite them.)"""
    h = x_row
    for l, w in enumerate(weights):
        layer_inputs[l].append(h)
        residual = h if proj_weights[l] is None else F.linear(h, proj_weights[l], proj_biases[l])
        if l == 0 and context_proj_weight is not None:
            residual = residual + F.linear(context_row, context_proj_weight)
        h = _row_peer_last(layer_inputs[l], w, biases[l], dilations[l], 1, context_row if l == 0 else None,
                           context_weight if l == 0 else None, activation, residual)
    return h


@pytest.fixture
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_restore_threads")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_tcn_step_interleaved_with_resets_copies_and_weight_changes(backend, seed):
    rng = random.Random(7000 + seed)
    torch.manual_seed(7000 + seed)
    dt = rng.choice([torch.float64, torch.float32])
    tol = dict(rtol=1e-9, atol=1e-9) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for _ in range(2):
        layers = rng.randint(1, 4)
        channels = [rng.choice([1, 3, 8, 16, 17, 33]) for _ in range(layers + 1)]
        b = rng.choice([1, 2, 3, 5, 9])
        ks = [rng.choice([1, 2, 3, 5]) for _ in range(layers)]
        dilations = [rng.choice([1, 2, 4, 7]) for _ in range(layers)]
        activation = rng.choice(ACTS)
        weights = [torch.randn(channels[l + 1], channels[l], ks[l], dtype=dt) * (channels[l] * ks[l]) ** -0.5
                   for l in range(layers)]
        biases = [torch.randn(channels[l + 1], dtype=dt) if rng.random() < 0.7 else None for l in range(layers)]
        if rng.random() < 0.3:  # strided biases (views of wider tensors), copied by the op at every step
            biases = [None if bias is None else torch.randn(2 * bias.shape[0], dtype=dt)[::2] for bias in biases]
        proj_weights = [None if channels[l] == channels[l + 1] and rng.random() < 0.7 else
                        torch.randn(channels[l + 1], channels[l], dtype=dt) * 0.3 for l in range(layers)]
        proj_biases = [None if p is None or rng.random() < 0.3 else torch.randn(p.shape[0], dtype=dt)
                       for p in proj_weights]
        ctx = rng.choice([0, 3, 8])
        context = torch.randn(b, ctx, dtype=dt) if ctx else None
        context_weight = torch.randn(channels[1], ctx, ks[0], dtype=dt) * 0.3 if ctx else None
        context_proj_weight = torch.randn(channels[1], ctx, dtype=dt) * 0.3 if ctx and rng.random() < 0.5 else None
        states = [CausalConvState.zeros(b, channels[l], ks[l], dilations[l], dtype=dt) for l in range(layers)]
        sequences = [[[] for _ in range(layers)] for _ in range(b)]
        log, kept = [], []
        for step in range(rng.randint(6, 20)):
            event = rng.random()
            if event < 0.15:
                rows, chosen = _random_rows(rng, b)
                for s in states:
                    s.reset(rows)
                for r in chosen:
                    sequences[r] = [[] for _ in range(layers)]
                log.append(("reset", rows.tolist()))
            elif event < 0.2:
                states = [s.to(dtype=dt) for s in states]
                log.append("copy")
            elif event < 0.28:
                l = rng.randrange(layers)
                with torch.no_grad():
                    weights[l].mul_(-1.25)
                    if biases[l] is not None:
                        biases[l].sub_(0.5)
                log.append(f"weight and bias {l} in place")
            elif event < 0.32:
                l = rng.randrange(layers)
                if proj_weights[l] is not None:
                    proj_weights[l].data.mul_(0.5)
                if biases[l] is not None:
                    biases[l].data.add_(0.5)
                weights[l].data.add_(0.1)
                forget_weight_caches()
                log.append(f"layer {l} .data + forget")
            elif event < 0.38 and context is not None:
                with torch.no_grad():
                    context.add_(1.0)
                    context_weight.mul_(0.5)
                log.append("context in place")
            elif event < 0.42 and context is not None:
                with torch.no_grad():
                    context[0].mul_(-1)  # a change of one row only
                log.append("context row in place")
            elif event < 0.47:
                threads = rng.choice([1, 2])
                torch.set_num_threads(threads)
                log.append(f"threads {threads}")
            x = torch.randn(b, channels[0], dtype=dt)
            if rng.random() < 0.25:
                x = torch.randn(b, channels[0] + 2, dtype=dt)[:, 1:1 + channels[0]]
            with torch.no_grad():
                out = tcn_step(x, weights, biases, states, proj_weights=proj_weights, proj_biases=proj_biases,
                               context=context, context_weight=context_weight,
                               context_proj_weight=context_proj_weight, activation=activation, backend=backend)
            assert out.shape == (b, channels[-1])
            kept.append((out, out.clone()))
            for r in range(b):
                want = _stack_peer_step(sequences[r], x[r].clone(), weights, biases, dilations, proj_weights,
                                        proj_biases, None if context is None else context[r], context_weight,
                                        context_proj_weight, activation)
                torch.testing.assert_close(out[r], want, **tol,
                                           msg=lambda m, r=r: f"row {r} step {step} ch {channels} k {ks} d "
                                                              f"{dilations} {activation} after {log}: {m}")
            for s in states:
                assert s.position.tolist() == [len(q[0]) for q in sequences]
        for i, (out, copy) in enumerate(kept):  # an output is the caller's: a later step must not overwrite it
            assert torch.equal(out, copy), f"output of step {i} changed by a later step"


@pytest.mark.usefixtures("_restore_threads")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 8, 9, 17])
def test_tcn_step_big_stack_teams_and_tiles(threads, batch):
    """A stack whose weights pass the CPU step's team threshold (1 MiB): with two threads and one tile of rows the
    team splits each layer's output channels; with more tiles than threads each thread takes whole tiles."""
    torch.set_num_threads(threads)
    torch.manual_seed(batch)
    rng = random.Random(batch)
    dt = torch.float32
    channels, ks, dilations = [96, 208, 208, 144], [5, 3, 4], [1, 3, 2]
    # (1.3 MB of float32 weights: past the team threshold)
    assert sum(channels[l] * channels[l + 1] * ks[l] for l in range(3)) * 4 >= 2 ** 20
    weights = [torch.randn(channels[l + 1], channels[l], ks[l], dtype=dt) * (channels[l] * ks[l]) ** -0.5
               for l in range(3)]
    biases = [torch.randn(c, dtype=dt) for c in channels[1:]]
    proj_weights = [torch.randn(channels[1], channels[0], dtype=dt) * 0.1, None,
                    torch.randn(channels[3], channels[2], dtype=dt) * 0.1]
    proj_biases = [None, None, torch.randn(channels[3], dtype=dt)]
    context = torch.randn(batch, 6, dtype=dt)
    context_weight = torch.randn(channels[1], 6, ks[0], dtype=dt) * 0.2
    context_proj_weight = torch.randn(channels[1], 6, dtype=dt) * 0.2
    states = [CausalConvState.zeros(batch, channels[l], ks[l], dilations[l], dtype=dt) for l in range(3)]
    sequences = [[[] for _ in range(3)] for _ in range(batch)]
    kept = []
    for step in range(9):
        if step in (4, 7):
            rows, chosen = _random_rows(rng, batch)
            for s in states:
                s.reset(rows)
            for r in chosen:
                sequences[r] = [[] for _ in range(3)]
        if step == 6:
            with torch.no_grad():
                weights[1].mul_(0.5)
        x = torch.randn(batch, channels[0], dtype=dt)
        out = tcn_step(x, weights, biases, states, proj_weights=proj_weights, proj_biases=proj_biases,
                       context=context, context_weight=context_weight, context_proj_weight=context_proj_weight,
                       activation="relu", backend="cpu")
        kept.append((out, out.clone()))
        for r in range(batch):
            want = _stack_peer_step(sequences[r], x[r].clone(), weights, biases, dilations, proj_weights, proj_biases,
                                    context[r], context_weight, context_proj_weight, "relu")
            torch.testing.assert_close(out[r], want, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, r=r: f"row {r} step {step}: {m}")
    for out, copy in kept:
        assert torch.equal(out, copy)


# ---- bad input: clear errors, nothing stepped ---------------------------------------------------------------------

def _assert_refused(call, states, what):
    before = [(s.history.clone(), s.position.clone()) for s in states]
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        call()
    assert str(info.value).strip(), f"{what}: an error without a message"
    for l, (s, (history, position)) in enumerate(zip(states, before)):
        assert torch.equal(s.position, position), f"{what}: layer {l}'s positions changed by a refused call"
        assert torch.equal(s.history, history), f"{what}: layer {l}'s history changed by a refused call"
    return info.value


def good_conv_args():
    """A valid causal_conv1d call (float64, context and residual, dilation 2) for the bad-input tests to spoil."""
    dt = torch.float64
    x, weight, bias = torch.randn(2, 5, 4, dtype=dt), torch.randn(6, 4, 3, dtype=dt), torch.randn(6, dtype=dt)
    context, context_weight = torch.randn(2, 3, dtype=dt), torch.randn(6, 3, 3, dtype=dt)
    residual = torch.randn(2, 5, 6, dtype=dt)
    good = dict(x=x, weight=weight, bias=bias, context=context, context_weight=context_weight, residual=residual,
                dilation=2, groups=1, activation="relu")
    return good


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_conv1d_bad_input(backend):
    good = good_conv_args()
    x, weight, bias, context = good["x"], good["weight"], good["bias"], good["context"]
    context_weight, residual = good["context_weight"], good["residual"]
    bad = [
        ("x 2-D", dict(x=x[0])), ("x 4-D", dict(x=x[None])), ("weight 2-D", dict(weight=weight[0])),
        ("channel mismatch", dict(weight=weight[:, :3])), ("dilation 0", dict(dilation=0)),
        ("dilation -1", dict(dilation=-1)), ("dilation float", dict(dilation=2.0)),
        ("dilation bool", dict(dilation=True)),
        ("k 0", dict(weight=weight[:, :, :0], context_weight=context_weight[:, :, :0])),
        ("empty time", dict(x=x[:, :0], residual=residual[:, :0])), ("groups 0", dict(groups=0)),
        ("groups 3", dict(groups=3)), ("groups 2 with a dense weight", dict(groups=2)),
        ("bias shape", dict(bias=bias[:5])), ("bias 2-D", dict(bias=bias[None])),
        ("bias dtype", dict(bias=bias.float())), ("weight dtype", dict(weight=weight.float())),
        ("x int", dict(x=x.long())), ("context dtype", dict(context=context.float())),
        ("context_weight dtype", dict(context_weight=context_weight.float())),
        ("residual dtype", dict(residual=residual.float())), ("residual shape", dict(residual=residual[:, :4])),
        ("residual channels", dict(residual=residual[..., :5])), ("context batch", dict(context=context[:1])),
        ("context_weight k", dict(context_weight=context_weight[:, :, :2])),
        ("context_weight out", dict(context_weight=context_weight[:5])),
        ("context alone", dict(context_weight=None)), ("context_weight alone", dict(context=None)),
        ("weight on meta", dict(weight=weight.to("meta"))), ("bias on meta", dict(bias=bias.to("meta"))),
        ("context on meta", dict(context=context.to("meta"))),
        ("residual on meta", dict(residual=residual.to("meta"))), ("activation", dict(activation="sigmoid")),
        ("x not a tensor", dict(x=x.tolist())),
    ]
    for what, change in bad:
        args = dict(good, **change)
        args = {n: v for n, v in args.items() if v is not None}
        with pytest.raises((ValueError, TypeError)) as info:
            causal_conv1d(args.pop("x"), args.pop("weight"), **args, backend=backend)
        assert str(info.value).strip(), what


def _step_setup(dt=torch.float64, batch=3):
    weight, bias = torch.randn(6, 4, 3, dtype=dt), torch.randn(6, dtype=dt)
    context, context_weight = torch.randn(batch, 2, dtype=dt), torch.randn(6, 2, 3, dtype=dt)
    state = CausalConvState.zeros(batch, 4, 3, 2, dtype=dt)
    return weight, bias, context, context_weight, state


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_conv1d_step_bad_input_changes_nothing(backend):
    dt = torch.float64
    weight, bias, context, context_weight, state = _step_setup()
    for _ in range(3):
        causal_conv1d_step(torch.randn(3, 4, dtype=dt), weight, state, bias, backend=backend)
    state.reset(torch.tensor([1]))
    x, residual = torch.randn(3, 4, dtype=dt), torch.randn(3, 6, dtype=dt)
    good = dict(x=x, weight=weight, state=state, bias=bias, context=context, context_weight=context_weight,
                residual=residual, groups=1, activation="tanh")
    other_dilation = CausalConvState(torch.zeros(3, 6, 4, dtype=dt), torch.zeros(3, dtype=torch.int64), 3, 2)
    strided_history = CausalConvState(torch.zeros(3, 4, 8, dtype=dt)[..., :4], torch.zeros(3, dtype=torch.int64), 3, 2)
    bad = [
        ("x 1-D", dict(x=x[0])), ("x 3-D", dict(x=x[None])), ("x channels", dict(x=x[:, :3])),
        ("x batch", dict(x=x[:2], residual=residual[:2], context=context[:2])),
        ("weight k", dict(weight=weight[:, :, :2], context_weight=context_weight[:, :, :2])),
        ("weight dtype", dict(weight=weight.float())), ("x dtype", dict(x=x.float())),
        ("bias dtype", dict(bias=bias.float())), ("residual dtype", dict(residual=residual.float())),
        ("residual shape", dict(residual=residual[:, :5])), ("residual 3-D", dict(residual=residual[None])),
        ("context batch", dict(context=context[:2])), ("context dtype", dict(context=context.float())),
        ("groups 0", dict(groups=0)), ("groups 2", dict(groups=2)), ("activation", dict(activation="elu")),
        ("weight on meta", dict(weight=weight.to("meta"))), ("residual on meta", dict(residual=residual.to("meta"))),
        ("state of another dilation", dict(state=other_dilation)),
        ("state not a state", dict(state=(state.history, state.position))),
    ]
    for what, change in bad:
        args = dict(good, **change)
        s = args["state"]
        states = [s] if isinstance(s, CausalConvState) else [state]
        _assert_refused(lambda: causal_conv1d_step(args["x"], args["weight"], args["state"], args["bias"],
                                                   groups=args["groups"], context=args["context"],
                                                   context_weight=args["context_weight"],
                                                   activation=args["activation"], residual=args["residual"],
                                                   backend=backend), states + [state], what)
    # A state whose position is negative in one row, int32, of another batch, or on another device.
    if _cuda_kernels(backend):  # the row's output is NaN and none of its state is touched (see causal_conv.cu)
        s = CausalConvState(state.history.clone(), torch.tensor([2, -1, 0]), 3, 2)
        before = s.history.clone()
        out = causal_conv1d_step(x, weight, s, bias, backend=backend)
        assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
        assert torch.equal(s.history[1], before[1]) and int(s.position[1]) == -1
        assert not torch.equal(s.history[[0, 2]], before[[0, 2]]) and s.position[[0, 2]].tolist() == [3, 1]
    negative = [] if _cuda_kernels(backend) else [("negative", torch.tensor([2, -1, 0]))]
    for what, position in (*negative, ("int32", torch.zeros(3, dtype=torch.int32)),
                           ("batch", torch.zeros(2, dtype=torch.int64)),
                           ("meta", torch.zeros(3, dtype=torch.int64, device="meta"))):
        s = CausalConvState(state.history.clone(), position, 3, 2)
        before = s.history.clone()
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            causal_conv1d_step(x, weight, s, bias, backend=backend)
        assert torch.equal(s.history, before), what
        if position.device.type == "cpu":
            assert torch.equal(s.position, position), what
    # A strided (sliced) history: refused by the cpu kernels, or stepped correctly by the reference.
    copy = CausalConvState(strided_history.history.contiguous(), strided_history.position.clone(), 3, 2)
    try:
        got = causal_conv1d_step(x, weight, strided_history, bias, backend=backend)
    except (ValueError, RuntimeError):
        assert backend != "reference"
        assert not strided_history.history.any() and not strided_history.position.any()
    else:
        want = causal_conv1d_step(x, weight, copy, bias, backend="reference")
        torch.testing.assert_close(got, want)
        assert torch.equal(strided_history.history, copy.history)


def _stack_setup(dt=torch.float64, batch=3):
    channels, ks, dilations = [4, 6, 6], [3, 2], [1, 3]
    weights = [torch.randn(channels[l + 1], channels[l], ks[l], dtype=dt) * 0.3 for l in range(2)]
    biases = [torch.randn(c, dtype=dt) for c in channels[1:]]
    proj_weights = [torch.randn(6, 4, dtype=dt) * 0.3, None]
    proj_biases = [torch.randn(6, dtype=dt), None]
    context, context_weight = torch.randn(batch, 2, dtype=dt), torch.randn(6, 2, 3, dtype=dt)
    states = [CausalConvState.zeros(batch, channels[l], ks[l], dilations[l], dtype=dt) for l in range(2)]
    return dict(weights=weights, biases=biases, proj_weights=proj_weights, proj_biases=proj_biases, context=context,
                context_weight=context_weight, states=states)


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tcn_step_bad_input_changes_nothing(backend, prepared):
    dt = torch.float64
    p = _stack_setup()
    states = p["states"]
    x = torch.randn(3, 4, dtype=dt)

    def step(**change):
        args = dict(p, **change)
        return tcn_step(args.get("x", x), args["weights"], args["biases"], args["states"],
                        proj_weights=args["proj_weights"], proj_biases=args["proj_biases"], context=args["context"],
                        context_weight=args["context_weight"], activation="relu", backend=backend)

    with torch.no_grad():
        for _ in range(3 if prepared else 1):
            step()
    if prepared and backend == "cpu" and not _cuda_kernels(backend):
        assert states[0]._prepared and states[0]._prepared[2] is not None
    other_dilation = CausalConvState(torch.zeros(3, 2, 6, dtype=dt), torch.zeros(3, dtype=torch.int64), 2, 3)
    other_batch = CausalConvState.zeros(2, 6, 2, 3, dtype=dt)
    other_k = CausalConvState.zeros(3, 6, 3, 1, dtype=dt)
    bad = [
        ("x 1-D", dict(x=x[0])), ("x 3-D", dict(x=x[None])), ("x channels", dict(x=x[:, :3])),
        ("x batch", dict(x=x[:2])), ("x dtype", dict(x=x.float())), ("x int", dict(x=x.long())),
        ("x on meta", dict(x=x.to("meta"))),
        ("layer 1 state of another dilation", dict(states=[states[0], other_dilation])),
        ("layer 1 state of another batch", dict(states=[states[0], other_batch])),
        ("layer 1 state of another k", dict(states=[states[0], other_k])),
        ("layer 1 state of another dtype", dict(states=[states[0], states[1].to(dtype=torch.float32)])),
        ("weights chain", dict(weights=[p["weights"][0], torch.randn(6, 5, 2, dtype=dt)])),
        ("no projection where channels change", dict(proj_weights=None, proj_biases=None)),
        ("bias shape", dict(biases=[p["biases"][0], p["biases"][1][:5]])),
        ("proj bias shape", dict(proj_biases=[p["proj_biases"][0][:5], None])),
        ("context batch", dict(context=p["context"][:2])),
        ("context_weight k", dict(context_weight=p["context_weight"][:, :, :2])),
        ("context_weight out", dict(context_weight=p["context_weight"][:4])),
        ("one layer too few states", dict(states=states[:1])),
    ]
    for what, change in bad:
        with torch.no_grad():
            _assert_refused(lambda: step(**change), states, what)
    # A negative position in the deeper layer: nothing stepped, in either layer.
    states[1].position[2] = -4
    if _cuda_kernels(backend):  # the row's output is NaN and none of its state is touched (see causal_conv.cu)
        before = [(s.history[2].clone(), int(s.position[2])) for s in states]
        with torch.no_grad():
            out = step()
        assert out[2].isnan().all() and not out[:2].isnan().any()
        assert all(torch.equal(s.history[2], h) and int(s.position[2]) == q for s, (h, q) in zip(states, before))
        return
    with torch.no_grad():
        _assert_refused(step, states, "negative position in layer 1")
    states[1].position[2] = 0
    with torch.no_grad():
        step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tcn_step_refuses_a_state_moved_to_another_device_after_the_first_step(backend):
    # tcn_step (cpu backend) checked the states' devices (_check_stack) only when the weights, context or states were
    # other objects than at the last call (states[0]._stack_checked); a state whose history (or position) was given
    # a tensor on another device in between was not refused: the dispatcher picked the meta (on a GPU machine, the
    # CUDA) kernel for the whole stack, the output was uninitialised memory and nothing was stepped. The same call
    # on fresh states raises "states[1].history is on meta but x is on cpu".
    w = [torch.randn(4, 4, 3), torch.randn(4, 4, 2)]
    for layer in (0, 1):
        for name in ("history", "position"):
            states = [CausalConvState.zeros(2, 4, 3, 1), CausalConvState.zeros(2, 4, 2, 2)]
            x = torch.randn(2, 4)
            with torch.no_grad():
                tcn_step(x, w, [None, None], states, backend=backend)
                setattr(states[layer], name, getattr(states[layer], name).to("meta"))
                with pytest.raises(ValueError, match=rf"states\[{layer}\]\.{name} is on meta but x is on cpu"):
                    out = tcn_step(x, w, [None, None], states, backend=backend)
                    pytest.fail(f"layer {layer} {name} on meta: no error, output {out.tolist()}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_gradients_of_any_subset_of_the_inputs(backend, seed):
    """Only some inputs require grad (a frozen weight, a constant context, ...): those get the peer's gradients,
    the others none; and the output under no_grad is the output with gradients (to rounding: the context table is
    made another way without gradients)."""
    rng = random.Random(8000 + seed)
    torch.manual_seed(8000 + seed)
    for _ in range(12):
        case = _random_case(rng)
        args = _make_inputs(case, rng)
        wanting = {n for n in args if rng.random() < 0.4}
        grad_out = torch.randn(case["batch"], case["time"], case["cout"], dtype=torch.float64)
        kw = dict(dilation=case["dilation"], groups=case["groups"], activation=case["activation"])
        results = []
        for fn in (peer, lambda *a, **k: causal_conv1d(*a, backend=backend, **k)):
            leaves = {n: v.clone().requires_grad_(n in wanting) for n, v in args.items()}
            call = dict(leaves)
            out = fn(call.pop("x"), call.pop("weight"), **call, **kw)
            if out.requires_grad:
                out.backward(grad_out)
            results.append((out.detach(), {n: v.grad for n, v in leaves.items()}))
        with torch.no_grad():
            call = dict(args)
            plain = causal_conv1d(call.pop("x"), call.pop("weight"), **call, **kw, backend=backend)
        (expected, expected_grads), (got, grads) = results
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(plain, got, rtol=1e-12, atol=1e-12, msg=lambda m: f"no_grad output {case}: {m}")
        for name in args:
            if name in wanting:
                torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-9, atol=1e-9,
                                           msg=lambda m, name=name: f"grad {name} of {sorted(wanting)} {case}: {m}")
            else:
                assert grads[name] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_cpu_equals_reference_at_large_and_mixed_positions(dtype):
    """Rows far into their sequences (positions past the history's length, up to 2**40) and rows just reset, with a
    random history: the cpu kernel and the reference read the same slots and the same context row."""
    rng = random.Random(9)
    torch.manual_seed(9)
    for _ in range(20):
        case = _random_case(rng, dtype)
        b, cin, cout, g = case["batch"], case["cin"], case["cout"], case["groups"]
        k, d = rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 3, 7])
        weight = torch.randn(cout, cin // g, k, dtype=dtype)
        context = torch.randn(b, 3, dtype=dtype)
        context_weight = torch.randn(cout, 3, k, dtype=dtype)
        history = torch.randn(b, (k - 1) * d, cin, dtype=dtype)
        position = torch.tensor([rng.choice([0, 1, d, (k - 1) * d, (k - 1) * d + 1, 12345, 2 ** 40 + 3])
                                 for _ in range(b)], dtype=torch.int64)
        states = [CausalConvState(history.clone(), position.clone(), k, d) for _ in BACKENDS]
        for _ in range(3):
            x = torch.randn(b, cin, dtype=dtype)
            outs = [causal_conv1d_step(x, weight, s, groups=g, context=context, context_weight=context_weight,
                                       activation=case["activation"], backend=name)
                    for s, name in zip(states, BACKENDS)]
            torch.testing.assert_close(outs[0], outs[1], **_tolerance(dtype))
            assert torch.equal(states[0].history, states[1].history)
            assert torch.equal(states[0].position, states[1].position)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tcn_step_deeper_than_the_fused_op(backend):
    """A stack of 34 layers (past the fused op's 32) steps layer by layer: still the peer's stack."""
    torch.manual_seed(10)
    rng = random.Random(10)
    layers, b, dt = 34, 2, torch.float64
    ks = [rng.choice([1, 2, 3]) for _ in range(layers)]
    dilations = [rng.choice([1, 2]) for _ in range(layers)]
    weights = [torch.randn(3, 3, k, dtype=dt) * 0.4 for k in ks]
    biases = [torch.randn(3, dtype=dt) * 0.1 for _ in ks]
    context, context_weight = torch.randn(b, 2, dtype=dt), torch.randn(3, 2, ks[0], dtype=dt) * 0.3
    states = [CausalConvState.zeros(b, 3, k, d, dtype=dt) for k, d in zip(ks, dilations)]
    sequences = [[[] for _ in range(layers)] for _ in range(b)]
    for step in range(5):
        if step == 3:
            for s in states:
                s.reset(torch.tensor([False, True]))
            sequences[1] = [[] for _ in range(layers)]
        x = torch.randn(b, 3, dtype=dt)
        out = tcn_step(x, weights, biases, states, context=context, context_weight=context_weight, activation="tanh",
                       backend=backend)
        for r in range(b):
            want = _stack_peer_step(sequences[r], x[r], weights, biases, dilations, [None] * layers, [None] * layers,
                                    context[r], context_weight, None, "tanh")
            torch.testing.assert_close(out[r], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_caches_follow_changes_between_calls(backend):
    """Without gradients the context weight's packing (causal_conv1d) and a state's packed weight and context table
    (causal_conv1d_step) are cached: in-place changes, new storage (w.data = ...), and .data changes followed by
    forget_weight_caches() are all seen by the next call."""
    torch.manual_seed(12)
    dt = torch.float64
    x = torch.randn(2, 6, 4, dtype=dt)
    weight, context_weight = torch.randn(5, 4, 3, dtype=dt), torch.randn(5, 2, 3, dtype=dt)
    context = torch.randn(2, 2, dtype=dt)
    changes = [
        ("in place", lambda t: t.mul_(-2)),
        ("new storage", lambda t: setattr(t, "data", t.data * 3)),
        (".data + forget", lambda t: (t.data.add_(1), forget_weight_caches())),
        ("row in place", lambda t: t[0].zero_()),
    ]
    with torch.no_grad():
        for what, change in changes:
            for target in ("weight", "context_weight", "context"):
                state = CausalConvState.zeros(2, 4, 3, 2, dtype=dt)
                causal_conv1d(x, weight, context=context, context_weight=context_weight, dilation=2, backend=backend)
                for t in range(3):
                    causal_conv1d_step(x[:, t], weight, state, context=context, context_weight=context_weight,
                                       backend=backend)
                change({"weight": weight, "context_weight": context_weight, "context": context}[target])
                got = causal_conv1d(x, weight, context=context, context_weight=context_weight, dilation=2,
                                    backend=backend)
                want = peer(x, weight, context=context, context_weight=context_weight, dilation=2)
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what} {target}: {m}")
                step = causal_conv1d_step(x[:, 3], weight, state, context=context, context_weight=context_weight,
                                          backend=backend)
                # the state's history holds the inputs, so the step equals the forward with today's weights
                torch.testing.assert_close(step, want[:, 3], rtol=1e-9, atol=1e-9,
                                           msg=lambda m: f"step {what} {target}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_windows_as_inputs(backend):
    """x and the residual as overlapping windows of one sequence (Tensor.unfold: time stride 1, channel stride 1),
    gradients flowing back to the sequence."""
    torch.manual_seed(13)
    rng = random.Random(13)
    for _ in range(10):
        b, length, cin = rng.choice([1, 2, 3]), rng.choice([9, 20, 41]), rng.choice([1, 3, 8, 17])
        cout, k, d = cin, rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 7])
        activation = rng.choice(ACTS)
        seq = torch.randn(b, length + cin, dtype=torch.float64)
        res_seq = torch.randn(b, length + cout, dtype=torch.float64)
        weight = torch.randn(cout, cin, k, dtype=torch.float64) * 0.4
        grad_out = torch.randn(b, length + 1, cout, dtype=torch.float64)
        grads = []
        for fn in (peer, lambda *a, **kw: causal_conv1d(*a, backend=backend, **kw)):
            leaves = [seq.clone().requires_grad_(), res_seq.clone().requires_grad_(), weight.clone().requires_grad_()]
            x, residual = leaves[0].unfold(1, cin, 1), leaves[1].unfold(1, cout, 1)
            assert x.shape == (b, length + 1, cin) and residual.shape == (b, length + 1, cout)
            out = fn(x, leaves[2], dilation=d, activation=activation, residual=residual)
            out.backward(grad_out)
            grads.append((out.detach(), [leaf.grad for leaf in leaves]))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-9)
        for got, want in zip(grads[1][1], grads[0][1]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
